//! The bare consume→produce copy: the practical limit of a processor on
//! this broker and machine. It runs as its own process, like `keyflight
//! run`, with the same librdkafka settings (keyflight's consumer and
//! producer roles: a consumer group without auto-commit, an idempotent
//! `acks=all` producer), and does nothing per record but forward it: no
//! decoding, no state, no changelog. Offsets are committed every
//! `commit_interval` without waiting for deliveries.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use keyflight::config::Settings;
use keyflight::kafka::{client_config, Deliveries, Role};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Announces assignments on stderr, where the driver waits for them.
struct Announce;

impl ClientContext for Announce {}

impl ConsumerContext for Announce {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            eprintln!("copy: partitions assigned: {}", list.count());
        }
    }
}

/// Copies `input` to `output` until SIGTERM or SIGINT.
pub fn run(settings: &Settings, input: &str, output: &str) -> Result<(), KafkaError> {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    // The processor's prefetch too: the same librdkafka settings.
    let mut config = client_config(settings, Role::Consumer);
    keyflight::processor::member::limit_prefetch(&mut config);
    let consumer: BaseConsumer<Announce> = config.create_with_context(Announce)?;
    let producer: ThreadedProducer<Deliveries> =
        client_config(settings, Role::Producer).create_with_context(Deliveries::default())?;
    // The output topic's metadata before the first record. A producer that
    // learns it on its first send held the first records about 0.8 s on
    // Tansu while the consumer went on fetching (keyflight's first pushes
    // left with its first fetch): the rate's window, first to last output,
    // then started late. With it the copy's rate there rose, if anything.
    producer
        .client()
        .fetch_metadata(Some(output), Duration::from_secs(10))?;
    consumer.subscribe(&[input])?;

    let mut positions: HashMap<i32, i64> = HashMap::new();
    let mut last_commit = Instant::now();
    let mut copied = 0u64;
    while !STOP.load(Ordering::Relaxed) {
        if let Some((failed, first)) = producer.context().failures() {
            // A copy that loses records measures nothing: stop loudly.
            eprintln!("copy: {failed} deliveries failed, the first: {first}");
            return Err(first);
        }
        if last_commit.elapsed() >= settings.commit_interval {
            commit(&consumer, input, &positions, CommitMode::Async);
            last_commit = Instant::now();
        }
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = message?;
        let mut record = BaseRecord::<[u8], [u8]>::to(output);
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        if let Some(value) = message.payload() {
            record = record.payload(value);
        }
        #[allow(clippy::result_large_err)] // rust-rdkafka hands the record back
        keyflight::kafka::send_waiting(record, |r| producer.send(r))?;
        positions.insert(message.partition(), message.offset() + 1);
        copied += 1;
    }
    producer.flush(Duration::from_secs(30))?;
    commit(&consumer, input, &positions, CommitMode::Sync);
    eprintln!("copy: stopped after {copied} records");
    Ok(())
}

fn commit(
    consumer: &BaseConsumer<Announce>,
    topic: &str,
    positions: &HashMap<i32, i64>,
    mode: CommitMode,
) {
    let mut offsets = TopicPartitionList::new();
    for (partition, offset) in positions {
        let _ = offsets.add_partition_offset(topic, *partition, Offset::Offset(*offset));
    }
    if offsets.count() > 0 {
        if let Err(e) = consumer.commit(&offsets, mode) {
            eprintln!("copy: commit failed: {e}");
        }
    }
}
