//! The client side of `processing_guarantee = "exactly-once"`: the
//! transactional producer of one input partition, what its errors mean,
//! and the start-up check that the brokers have transactions at all.
//!
//! A partition's transactional id is `<application_id>-<topic>-<partition>`:
//! the member that takes a partition over initialises the same id, which
//! makes the broker abort the previous owner's open transaction and refuse
//! every later write of it (a zombie is fenced, whatever it had queued).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::{Offset, TopicPartitionList};

use super::{client_config, Role};
use crate::config::Settings;

/// How long one transaction call (init, offsets, commit, abort) may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The transactional id of an input partition's producer.
pub fn transactional_id(settings: &Settings, topic: &str, partition: i32) -> String {
    format!("{}-{topic}-{partition}", settings.application_id)
}

/// The producer of one input partition, with its transactions initialised
/// (fencing the partition's previous owner) and the first one begun.
/// Blocking: call it off the async runtime.
pub fn start(settings: &Settings, topic: &str, partition: i32) -> KafkaResult<FutureProducer> {
    let producer: FutureProducer = client_config(settings, Role::Producer)
        .set(
            "transactional.id",
            transactional_id(settings, topic, partition),
        )
        .create()?;
    producer.init_transactions(CALL_TIMEOUT)?;
    producer.begin_transaction()?;
    Ok(producer)
}

/// Commits the open transaction, with the input `position` if there is a
/// new one, and begins the next. Every record produced before the call is
/// in it (librdkafka flushes them first). Blocking.
pub fn commit(
    producer: &FutureProducer,
    input: (&str, i32),
    position: Option<i64>,
    group: Option<&ConsumerGroupMetadata>,
) -> KafkaResult<()> {
    if let (Some(position), Some(group)) = (position, group) {
        let mut offsets = TopicPartitionList::new();
        offsets.add_partition_offset(input.0, input.1, Offset::Offset(position))?;
        retrying(|| producer.send_offsets_to_transaction(&offsets, group, CALL_TIMEOUT))?;
    }
    await_deliveries(producer);
    retrying(|| producer.commit_transaction(CALL_TIMEOUT))?;
    producer.begin_transaction()
}

/// Waits, in short steps, until every record handed to `producer` has its
/// delivery report. A commit must flush them first, and rust-rdkafka's
/// flush waits on the producer's event queue in 100 ms steps while the
/// producer's own thread takes the events off it, so each commit with
/// records in flight would stall for whole steps.
fn await_deliveries(producer: &FutureProducer) {
    let deadline = std::time::Instant::now() + CALL_TIMEOUT;
    while producer.in_flight_count() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// Aborts the open transaction: none of its records become visible to
/// `read_committed` readers, and its offsets are not committed. Blocking.
pub fn abort(producer: &FutureProducer) -> KafkaResult<()> {
    producer.abort_transaction(CALL_TIMEOUT)
}

/// Calls `call` again while it fails with an error librdkafka marks
/// retriable (a timeout, a coordinator moving), a few times.
fn retrying(mut call: impl FnMut() -> KafkaResult<()>) -> KafkaResult<()> {
    let mut attempts = 0;
    loop {
        match call() {
            Err(KafkaError::Transaction(e)) if e.is_retriable() && attempts < 3 => {
                attempts += 1;
                std::thread::sleep(Duration::from_millis(100 << attempts));
            }
            other => return other,
        }
    }
}

/// Whether a transaction error means another instance owns the partition
/// now (other fatal errors, such as a broken idempotence sequence, do not).
pub fn is_fenced(error: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as Code;
    matches!(
        error.rdkafka_error_code(),
        Some(Code::ProducerFenced | Code::InvalidProducerEpoch | Code::Fenced)
    )
}

/// The Kafka API keys exactly-once needs beyond producing and fetching.
const TRANSACTION_APIS: [(i16, &str); 5] = [
    (22, "InitProducerId"),
    (24, "AddPartitionsToTxn"),
    (25, "AddOffsetsToTxn"),
    (26, "EndTxn"),
    (28, "TxnOffsetCommit"),
];

/// Asks the first reachable bootstrap broker for its API versions and
/// names the transaction APIs it lacks. `Ok(None)`: it has them all, or it
/// could not be asked in plain text (TLS or SASL is configured: the first
/// transaction then reports the same). Blocking.
pub fn missing_transaction_apis(settings: &Settings) -> Result<Option<String>, String> {
    let security = client_config(settings, Role::Producer)
        .get("security.protocol")
        .map(str::to_ascii_lowercase);
    if security.is_some_and(|p| p != "plaintext") {
        return Ok(None);
    }
    let mut last_error = String::from("no broker in `brokers`");
    for broker in settings.brokers.split(',').map(str::trim) {
        match api_keys(broker) {
            Ok(keys) => {
                let missing: Vec<&str> = TRANSACTION_APIS
                    .iter()
                    .filter(|(key, _)| !keys.contains(key))
                    .map(|(_, name)| *name)
                    .collect();
                return Ok((!missing.is_empty())
                    .then(|| format!("broker {broker} does not support {}", missing.join(", "))));
            }
            Err(e) => last_error = format!("{broker}: {e}"),
        }
    }
    Err(last_error)
}

/// The API keys a broker supports: an ApiVersions v0 request, which every
/// Kafka-compatible broker answers.
fn api_keys(broker: &str) -> std::io::Result<Vec<i16>> {
    let timeout = Duration::from_secs(5);
    let addr = broker
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other("no address"))?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let client_id = b"keyflight";
    // Header v1: api key 18, version 0, correlation id, client id; no body.
    let mut request = Vec::with_capacity(32);
    request.extend_from_slice(&18i16.to_be_bytes());
    request.extend_from_slice(&0i16.to_be_bytes());
    request.extend_from_slice(&1i32.to_be_bytes());
    request.extend_from_slice(&(client_id.len() as i16).to_be_bytes());
    request.extend_from_slice(client_id);
    stream.write_all(&(request.len() as i32).to_be_bytes())?;
    stream.write_all(&request)?;
    let mut size = [0u8; 4];
    stream.read_exact(&mut size)?;
    let size = i32::from_be_bytes(size);
    if !(10..=1 << 20).contains(&size) {
        return Err(std::io::Error::other(format!(
            "unexpected ApiVersions response size {size}"
        )));
    }
    let mut response = vec![0u8; size as usize];
    stream.read_exact(&mut response)?;
    parse_api_keys(&response).ok_or_else(|| std::io::Error::other("malformed ApiVersions response"))
}

/// Correlation id, error code, then (api key, min, max) entries.
fn parse_api_keys(response: &[u8]) -> Option<Vec<i16>> {
    let i16_at = |at: usize| {
        Some(i16::from_be_bytes(
            response.get(at..at + 2)?.try_into().ok()?,
        ))
    };
    let error = i16_at(4)?;
    if error != 0 {
        return None;
    }
    let count = i32::from_be_bytes(response.get(6..10)?.try_into().ok()?);
    (0..count.max(0) as usize)
        .map(|i| i16_at(10 + i * 6))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_api_versions_response_lists_its_keys() {
        let mut response = vec![0, 0, 0, 1, 0, 0, 0, 0, 0, 2];
        for (key, min, max) in [(0i16, 0i16, 9i16), (26, 0, 3)] {
            for n in [key, min, max] {
                response.extend_from_slice(&n.to_be_bytes());
            }
        }
        assert_eq!(parse_api_keys(&response), Some(vec![0, 26]));
        response[5] = 35; // UNSUPPORTED_VERSION
        assert_eq!(parse_api_keys(&response), None);
        assert_eq!(parse_api_keys(&response[..12]), None);
    }

    #[test]
    fn a_partitions_transactional_id_names_application_topic_and_partition() {
        let settings = Settings {
            application_id: "orders".into(),
            ..Settings::default()
        };
        assert_eq!(
            transactional_id(&settings, "events.in", 3),
            "orders-events.in-3"
        );
    }
}
