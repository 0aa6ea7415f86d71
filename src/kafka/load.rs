//! Producing generated events ([`crate::loadgen`]) to a topic: paced or as
//! fast as the producer goes, JSON or Avro, every delivery counted.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};

use super::{client_config, Deliveries, Role};
use crate::codec::{Codec, InputFormat};
use crate::config::Settings;
use crate::engine::{MergePolicy, Payload, Value};
use crate::loadgen::{LoadEvent, ScenarioStep};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot create the Kafka producer: {0}")]
    Client(KafkaError),
    #[error("cannot produce to {topic}: {source}")]
    Produce { topic: String, source: KafkaError },
    #[error("{failed} events to {topic} were not delivered; the first error: {source}")]
    Delivery {
        topic: String,
        failed: u64,
        source: KafkaError,
    },
}

/// What a load run did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadSummary {
    pub events: u64,
    pub keys: u64,
    pub seconds: f64,
}

impl LoadSummary {
    pub fn rate(&self) -> f64 {
        self.events as f64 / self.seconds.max(1e-9)
    }
}

/// Encodes events in the input format keyflight reads.
pub struct Encoder {
    avro: Option<Codec>,
}

impl Encoder {
    /// Avro is framed as `run` with these input settings reads it.
    pub fn new(format: InputFormat, input: &crate::config::Input) -> Self {
        Self {
            avro: (format == InputFormat::Avro).then(|| {
                Codec::new(InputFormat::Avro, MergePolicy::JsonMergePatch, "version")
                    .with_avro_framing(input.avro_framing, input.schema_id)
            }),
        }
    }

    pub fn encode(&self, event: &LoadEvent) -> Vec<u8> {
        match &self.avro {
            None => event.json().to_string().into_bytes(),
            Some(codec) => {
                let fields = serde_json::json!({ "seq": event.seq, "key": event.key });
                let payload = Payload::Value(Value::Json(fields));
                codec
                    .encode(&payload, event.version)
                    .map(|b| b.to_vec())
                    .unwrap_or_default()
            }
        }
    }
}

/// A producer for load: keyflight's producer settings, batching for throughput.
pub struct LoadProducer {
    producer: ThreadedProducer<Deliveries>,
    topic: String,
    encoder: Encoder,
    keys: HashSet<String>,
    sent: u64,
}

impl LoadProducer {
    pub fn new(settings: &Settings, topic: &str, format: InputFormat) -> Result<Self, LoadError> {
        let mut config = client_config(settings, Role::Producer);
        config
            .set("linger.ms", "5")
            .set("batch.num.messages", "10000");
        // [kafka.producer] still wins for what it sets.
        for (key, value) in crate::config::flatten(&settings.kafka.producer) {
            config.set(key, value);
        }
        let producer = config
            .create_with_context(Deliveries::default())
            .map_err(LoadError::Client)?;
        Ok(Self {
            producer,
            topic: topic.to_string(),
            encoder: Encoder::new(format, &settings.input),
            keys: HashSet::new(),
            sent: 0,
        })
    }

    /// Queues one event (waiting while the producer's queue is full).
    pub fn send(&mut self, event: &LoadEvent) -> Result<(), LoadError> {
        let value = self.encoder.encode(event);
        let record = BaseRecord::<str, [u8]>::to(&self.topic)
            .key(event.key.as_str())
            .payload(&value);
        #[allow(clippy::result_large_err)] // rust-rdkafka hands the record back
        super::send_waiting(record, |r| self.producer.send(r)).map_err(|source| {
            LoadError::Produce {
                topic: self.topic.clone(),
                source,
            }
        })?;
        if !self.keys.contains(&event.key) {
            self.keys.insert(event.key.clone());
        }
        self.sent += 1;
        Ok(())
    }

    /// Waits until every queued event is acknowledged; fails if any was not.
    pub fn flush(&self) -> Result<(), LoadError> {
        self.producer
            .flush(Duration::from_secs(120))
            .map_err(|source| LoadError::Produce {
                topic: self.topic.clone(),
                source,
            })?;
        match self.producer.context().failures() {
            Some((failed, source)) => Err(LoadError::Delivery {
                topic: self.topic.clone(),
                failed,
                source,
            }),
            None => Ok(()),
        }
    }

    pub fn acked(&self) -> u64 {
        self.producer.context().acked()
    }

    pub fn sent(&self) -> u64 {
        self.sent
    }

    pub fn keys(&self) -> u64 {
        self.keys.len() as u64
    }
}

/// How far ahead of its schedule a paced load gets before it sleeps.
const PACING_STEP: Duration = Duration::from_millis(1);

/// Produces `events`, at most `rate` per second when given, until done or
/// `stop` is set; `progress` sees the count sent so far.
pub fn run(
    producer: &mut LoadProducer,
    events: impl Iterator<Item = LoadEvent>,
    rate: Option<f64>,
    stop: &AtomicBool,
    mut progress: impl FnMut(u64),
) -> Result<LoadSummary, LoadError> {
    let started = Instant::now();
    let mut count = 0u64;
    for event in events {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if let Some(rate) = rate {
            // Pacing to the requested rate, in steps of a millisecond: the
            // events in between go back to back, since a sleep per event
            // would cost a syscall and a context switch each.
            let due = started + Duration::from_secs_f64(count as f64 / rate);
            let now = Instant::now();
            if due > now + PACING_STEP {
                std::thread::sleep(due - now);
            }
        }
        producer.send(&event)?;
        count += 1;
        if count.is_multiple_of(1024) {
            progress(count);
        }
    }
    progress(count);
    producer.flush()?;
    Ok(LoadSummary {
        events: count,
        keys: producer.keys(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Produces the article's scenario steps, each acknowledged before its pause.
pub fn scenarios(producer: &mut LoadProducer, steps: &[ScenarioStep]) -> Result<u64, LoadError> {
    let mut count = 0;
    for step in steps {
        for event in &step.events {
            producer.send(event)?;
            count += 1;
        }
        producer.flush()?;
        std::thread::sleep(Duration::from_millis(step.pause_ms)); // lets the pushes start
    }
    Ok(count)
}
