//! Producing test events and reading topics back.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::message::Headers;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;

use super::*;

/// A keyed event as tests produce it.
#[derive(Clone, Debug)]
pub struct TestEvent {
    pub key: String,
    pub value: Option<String>,
}

/// Produces records with binary values (`None`: a delete).
pub async fn produce_bytes(broker: &Broker, topic: &str, records: &[(String, Option<Vec<u8>>)]) {
    let producer: FutureProducer = broker
        .client_config()
        .set("partitioner", "murmur2_random")
        .create()
        .unwrap();
    for (key, value) in records {
        let mut record = FutureRecord::to(topic).key(key);
        if let Some(value) = value {
            record = record.payload(value);
        }
        producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)
            .expect("delivered");
    }
}

/// Produces events in order (keys hash to partitions like Java clients).
pub async fn produce(broker: &Broker, topic: &str, events: &[TestEvent]) {
    let records: Vec<Record> = events
        .iter()
        .map(|e| {
            (
                Some(e.key.clone().into_bytes()),
                e.value.clone().map(String::into_bytes),
            )
        })
        .collect();
    produce_records(broker, topic, &records).await;
}

/// One record of an output topic.
#[derive(Clone, Debug)]
pub struct Pushed {
    pub key: String,
    pub value: Option<String>,
    pub raw: Option<Vec<u8>>,
    pub headers: BTreeMap<String, String>,
    pub partition: i32,
    pub offset: i64,
    /// The record's timestamp (ms since the epoch): for keyflight's pushes,
    /// when the push was produced.
    pub timestamp: Option<i64>,
}

/// Reads a whole topic (every partition, to its high watermark now).
pub fn read_all(broker: &Broker, topic: &str) -> Vec<Pushed> {
    read_all_at(&broker.bootstrap, topic)
}

/// [`read_all`] on any broker address, with keyflight's own topic reader.
pub fn read_all_at(bootstrap: &str, topic: &str) -> Vec<Pushed> {
    use keyflight::kafka::reader::{self, Start};
    let settings = keyflight::config::Settings {
        brokers: bootstrap.to_string(),
        application_id: format!("reader-{}", TOPIC_COUNTER.fetch_add(1, Ordering::Relaxed)),
        ..Default::default()
    };
    let consumer = reader::consumer(&settings, "test").expect("a reader");
    let ranges = reader::ranges(&consumer, topic, Start::Beginning)
        .unwrap_or_else(|e| panic!("cannot read {topic}: {e}"));
    let mut out = Vec::new();
    reader::read(&consumer, topic, &ranges, |message| {
        let headers = message
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_string(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push(Pushed {
            key: String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned(),
            value: message
                .payload()
                .map(|v| String::from_utf8_lossy(v).into_owned()),
            raw: message.payload().map(<[u8]>::to_vec),
            headers,
            partition: message.partition(),
            offset: message.offset(),
            timestamp: message.timestamp().to_millis(),
        });
    })
    .unwrap_or_else(|e| panic!("cannot read {topic}: {e}"));
    out.sort_by_key(|p| (p.partition, p.offset));
    out
}

/// The marker records of a changelog topic: [`read_all`] without the
/// owners' claims (`keyflight::state::claim`).
pub fn read_markers(broker: &Broker, changelog: &str) -> Vec<Pushed> {
    let mut records = read_all(broker, changelog);
    records.retain(|r| {
        !r.headers
            .contains_key(keyflight::state::claim::CLAIM_HEADER)
    });
    records
}

/// The last record per key (topics are partitioned by key, so per-partition
/// order is per-key order).
pub fn last_per_key(records: &[Pushed]) -> BTreeMap<String, Pushed> {
    records.iter().map(|r| (r.key.clone(), r.clone())).collect()
}

/// The latest event per key, in production order.
pub fn latest_per_key(events: &[TestEvent]) -> BTreeMap<String, Option<String>> {
    events
        .iter()
        .map(|e| (e.key.clone(), e.value.clone()))
        .collect()
}

/// Waits until the last push of every key equals its latest event; returns
/// everything pushed. Panics with the differences (and the log) at `limit`.
pub fn await_final_state(
    broker: &Broker,
    app: &App,
    events: &[TestEvent],
    limit: Duration,
    processor: &Processor,
) -> Vec<Pushed> {
    let expected = latest_per_key(events);
    wait_until(limit, Duration::from_millis(300), || {
        let pushed = read_all(broker, &app.pushed);
        let last = last_per_key(&pushed);
        let wrong: Vec<_> = expected
            .iter()
            .filter(|(key, value)| last.get(*key).map(|p| &p.value) != Some(*value))
            .map(|(key, value)| {
                format!(
                    "{key}: want {value:?}, got {:?}",
                    last.get(key).map(|p| &p.value)
                )
            })
            .collect();
        if wrong.is_empty() {
            return Ok(pushed);
        }
        Err(format!(
            "{} keys not final, e.g. {:?}\nlog:\n{}",
            wrong.len(),
            &wrong[..wrong.len().min(5)],
            processor.log()
        ))
    })
}

/// Polls `check` every `every` until it yields a value; once `limit` has
/// passed, panics with its last complaint.
pub fn wait_until<T>(
    limit: Duration,
    every: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        match check() {
            Ok(value) => return value,
            Err(why) if Instant::now() > deadline => panic!("not within {limit:?}: {why}"),
            Err(_) => std::thread::sleep(every),
        }
    }
}

/// `keys` keys (`key-000`, `key-001`, …), each with a JSON value of
/// version `version`.
pub fn round(keys: usize, version: u64) -> Vec<Record> {
    (0..keys)
        .map(|k| {
            let key = format!("key-{k:03}");
            let value = format!(r#"{{"version":{version},"key":{k}}}"#);
            (Some(key.into_bytes()), Some(value.into_bytes()))
        })
        .collect()
}

/// One [`round`] of `keys` keys per version in `versions`, in order.
pub fn rounds(keys: usize, versions: std::ops::RangeInclusive<u64>) -> Vec<Record> {
    versions.flat_map(|version| round(keys, version)).collect()
}

/// Produces records with optional keys and values, in order (keys hash
/// to partitions like Java clients).
pub async fn produce_records(broker: &Broker, topic: &str, records: &[Record]) {
    produce_records_at(&broker.bootstrap, topic, records).await
}

/// [`produce_records`] to the broker at `bootstrap`.
pub async fn produce_records_at(bootstrap: &str, topic: &str, records: &[Record]) {
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let mut pending = Vec::with_capacity(records.len());
    for (key, value) in records {
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic);
        if let Some(key) = key {
            record = record.key(&key[..]);
        }
        if let Some(value) = value {
            record = record.payload(&value[..]);
        }
        match producer.send_result(record) {
            Ok(delivery) => pending.push(delivery),
            Err((e, _)) => panic!("produce failed: {e}"),
        }
    }
    for delivery in pending {
        delivery.await.expect("delivery future").expect("delivered");
    }
}
