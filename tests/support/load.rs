//! Continuous load from a background thread.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

use super::*;

/// Continuous load in a background thread: JSON events over `keys` keys
/// whose per-key `version` only grows, `rate` events per second, until
/// stopped.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    produced: std::sync::Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl Load {
    pub fn start(broker: &Broker, topic: &str, keys: usize, rate: usize) -> Load {
        Load::start_at(&broker.bootstrap, topic, keys, rate)
    }

    /// [`Load::start`] on any broker address.
    pub fn start_at(bootstrap: &str, topic: &str, keys: usize, rate: usize) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let produced = std::sync::Arc::new(AtomicUsize::new(0));
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("enable.idempotence", "true")
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "5")
            .create()
            .unwrap();
        let topic = topic.to_string();
        let thread = {
            let (stop, produced) = (stop.clone(), produced.clone());
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    let mut versions = vec![0u64; keys];
                    let batch = (rate / 20).max(1); // 20 batches a second
                    let started = Instant::now();
                    let mut sent = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        let mut pending = Vec::with_capacity(batch);
                        for i in 0..batch {
                            // Every third event hits one of ten hot keys;
                            // the others (the m-th of them) walk all keys.
                            let n = sent + i;
                            let k = if n.is_multiple_of(3) {
                                (n / 3) % keys.min(10)
                            } else {
                                (n - n / 3 - 1) * 7919 % keys
                            };
                            versions[k] += 1;
                            let key = format!("key-{k:04}");
                            let value = format!(
                                "{{\"version\":{},\"key\":{k},\"seq\":{}}}",
                                versions[k],
                                sent + i
                            );
                            let record = FutureRecord::to(&topic).key(&key).payload(&value);
                            match producer.send_result(record) {
                                Ok(delivery) => pending.push(delivery),
                                Err((e, _)) => panic!("produce failed: {e}"),
                            }
                        }
                        for delivery in pending {
                            delivery.await.expect("delivery future").expect("delivered");
                        }
                        sent += batch;
                        produced.store(sent, Ordering::Relaxed);
                        // Pace to the rate (a rate limit, not a wait for an event).
                        let due = started + Duration::from_secs_f64(sent as f64 / rate as f64);
                        tokio::time::sleep_until(due.into()).await;
                    }
                    sent
                })
            })
        };
        Load {
            stop,
            produced,
            thread: Some(thread),
        }
    }

    /// Events acknowledged so far.
    pub fn produced(&self) -> usize {
        self.produced.load(Ordering::Relaxed)
    }

    /// Stops and returns the number of events produced.
    pub fn stop(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().expect("load thread")
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
