//! Reading a snapshot of a whole topic: every partition from a start
//! (its beginning, or the first record at or after a time) to the high
//! watermark it had when the read began. `verify`, `replay`, restore and
//! the tests read this way; nothing is committed.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};

use super::{client_config, Role};
use crate::config::Settings;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("topic {topic}: {source}")]
    Kafka {
        topic: String,
        source: rdkafka::error::KafkaError,
    },
    #[error("topic {0} does not exist (create it with `keyflight topics create`)")]
    Missing(String),
    #[error(
        "topic {topic}: no record for {stall:?} with {remaining} partitions not read to their end"
    )]
    Stalled {
        topic: String,
        stall: Duration,
        remaining: i64,
    },
}

/// Where a read starts in every partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    Beginning,
    /// The first record with a timestamp at or after this (ms since the epoch).
    Time(i64),
}

/// One partition's range to read: `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub partition: i32,
    pub start: i64,
    pub end: i64,
}

/// How long a read may go without a record before it gives up.
const STALL: Duration = Duration::from_secs(60);
const TIMEOUT: Duration = Duration::from_secs(30);

/// librdkafka prefetches until a partition's queue holds this many bytes...
const PREFETCH: &str = "queued.max.messages.kbytes";
/// ... or this many records.
const PREFETCH_RECORDS: &str = "queued.min.messages";

/// A consumer for reading by assignment: the consumer role's settings
/// (security, tuning) with a group of its own that never commits.
pub fn consumer(
    settings: &Settings,
    purpose: &str,
) -> Result<BaseConsumer, rdkafka::error::KafkaError> {
    let mut config = client_config(settings, Role::Consumer);
    config
        .set("group.id", format!("{}-{purpose}", settings.application_id))
        .set("enable.partition.eof", "false");
    // Restore runs one reader per assigned partition at once, so
    // librdkafka's default prefetch (64 MiB or 100 000 records each, and a
    // queued record costs a few hundred bytes beyond its own) would be
    // paid per partition: 4 MiB or 10 000 records each.
    limit_prefetch(&mut config, 4096, 10_000);
    config.create()
}

/// Bounds how much librdkafka fetches ahead of the reader (kilobytes, or
/// records), unless `[kafka.consumer]` sets it.
pub fn limit_prefetch(config: &mut rdkafka::ClientConfig, kbytes: u32, records: u32) {
    for (property, value) in [(PREFETCH, kbytes), (PREFETCH_RECORDS, records)] {
        if config.get(property).is_none() {
            config.set(property, value.to_string());
        }
    }
}

/// The partition count of `topic`, or [`ReadError::Missing`].
pub fn partitions(consumer: &BaseConsumer, topic: &str) -> Result<i32, ReadError> {
    let metadata = consumer
        .fetch_metadata(Some(topic), TIMEOUT)
        .map_err(|source| kafka(topic, source))?;
    match metadata.topics().first() {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
            Ok(t.partitions().len() as i32)
        }
        _ => Err(ReadError::Missing(topic.to_string())),
    }
}

/// The ranges a read of `topic` from `start` covers, as of now.
pub fn ranges(consumer: &BaseConsumer, topic: &str, start: Start) -> Result<Vec<Range>, ReadError> {
    let count = partitions(consumer, topic)?;
    let mut ranges = Vec::with_capacity(count as usize);
    for partition in 0..count {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, TIMEOUT)
            .map_err(|source| kafka(topic, source))?;
        ranges.push(Range {
            partition,
            start: low,
            end: high,
        });
    }
    if let Start::Time(ms) = start {
        let mut query = TopicPartitionList::new();
        for range in &ranges {
            query
                .add_partition_offset(topic, range.partition, Offset::Offset(ms))
                .map_err(|source| kafka(topic, source))?;
        }
        let found = consumer
            .offsets_for_times(query, TIMEOUT)
            .map_err(|source| kafka(topic, source))?;
        for range in &mut ranges {
            let offset = found
                .find_partition(topic, range.partition)
                .map(|e| e.offset());
            range.start = match offset {
                Some(Offset::Offset(o)) => o.clamp(range.start, range.end),
                // No record at or after the time: nothing to read.
                _ => range.end,
            };
        }
    }
    Ok(ranges)
}

/// Reads every record in `ranges` and hands each to `each`; returns the
/// number read. Order holds within a partition only.
pub fn read(
    consumer: &BaseConsumer,
    topic: &str,
    ranges: &[Range],
    mut each: impl FnMut(&BorrowedMessage<'_>),
) -> Result<u64, ReadError> {
    try_read(consumer, topic, ranges, |message| {
        each(message);
        Ok::<(), std::convert::Infallible>(())
    })
    .map_err(|stopped| match stopped {
        Stopped::Read(e) => e,
        Stopped::By(never) => match never {},
    })
}

/// Why [`try_read`] stopped early: the read failed, or the caller's
/// function did.
#[derive(Debug)]
pub enum Stopped<E> {
    Read(ReadError),
    By(E),
}

/// [`read`] with a function that may fail: the first error stops the read.
pub fn try_read<E>(
    consumer: &BaseConsumer,
    topic: &str,
    ranges: &[Range],
    mut each: impl FnMut(&BorrowedMessage<'_>) -> Result<(), E>,
) -> Result<u64, Stopped<E>> {
    let failed = |source| Stopped::Read(kafka(topic, source));
    let mut assignment = TopicPartitionList::new();
    let mut open: std::collections::HashMap<i32, i64> = Default::default();
    for range in ranges.iter().filter(|r| r.start < r.end) {
        assignment
            .add_partition_offset(topic, range.partition, Offset::Offset(range.start))
            .map_err(failed)?;
        open.insert(range.partition, range.end);
    }
    if open.is_empty() {
        return Ok(0);
    }
    consumer.assign(&assignment).map_err(failed)?;
    let mut read = 0;
    let mut last_progress = Instant::now();
    while !open.is_empty() {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                last_progress = Instant::now();
                let Some(&end) = open.get(&message.partition()) else {
                    continue;
                };
                if message.offset() >= end {
                    open.remove(&message.partition());
                    continue;
                }
                each(&message).map_err(Stopped::By)?;
                read += 1;
                // A compacted topic may have gaps; the high watermark is
                // reached when the next offset would be at or past it.
                if message.offset() + 1 >= end {
                    open.remove(&message.partition());
                }
            }
            // A lost connection is reported through poll, and librdkafka
            // reconnects by itself: go on (the stall bound still applies).
            Some(Err(source)) if is_transient(&source) => {
                tracing::warn!(topic, "reading goes on after a broker error: {source}");
            }
            Some(Err(source)) => return Err(failed(source)),
            // Nothing more to deliver: a partition whose position reached
            // its end is done even if no record sits at end - 1, as under
            // `read_committed` when a transaction marker (a control record,
            // never delivered) or an aborted transaction ends the range.
            None => {
                if let Ok(positions) = consumer.position() {
                    for element in positions.elements_for_topic(topic) {
                        let reached = element.offset().to_raw().is_some_and(|position| {
                            open.get(&element.partition())
                                .is_some_and(|&end| position >= end)
                        });
                        if reached {
                            open.remove(&element.partition());
                            last_progress = Instant::now();
                        }
                    }
                }
            }
        }
        if !open.is_empty() && last_progress.elapsed() > STALL {
            return Err(Stopped::Read(ReadError::Stalled {
                topic: topic.to_string(),
                stall: STALL,
                remaining: open.len() as i64,
            }));
        }
    }
    consumer.unassign().map_err(failed)?;
    Ok(read)
}

/// Errors about broker connections, which librdkafka retries by itself.
fn is_transient(error: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::error::KafkaError;
    use rdkafka::types::RDKafkaErrorCode as Code;
    matches!(
        error,
        KafkaError::MessageConsumption(
            Code::AllBrokersDown
                | Code::BrokerTransportFailure
                | Code::Resolve
                | Code::OperationTimedOut
                | Code::RequestTimedOut
        )
    )
}

/// Records in `ranges` (an upper bound on a compacted topic).
pub fn size(ranges: &[Range]) -> u64 {
    ranges.iter().map(|r| (r.end - r.start).max(0) as u64).sum()
}

fn kafka(topic: &str, source: rdkafka::error::KafkaError) -> ReadError {
    ReadError::Kafka {
        topic: topic.to_string(),
        source,
    }
}

/// The committed offset of the consumer's group per range's partition
/// (`None` where nothing is committed), in the order of `ranges`.
pub fn committed(
    consumer: &BaseConsumer,
    topic: &str,
    ranges: &[Range],
) -> Result<Vec<Option<i64>>, ReadError> {
    let mut query = TopicPartitionList::new();
    for range in ranges {
        query.add_partition(topic, range.partition);
    }
    let committed = consumer
        .committed_offsets(query, TIMEOUT)
        .map_err(|source| kafka(topic, source))?;
    Ok(ranges
        .iter()
        .map(|range| {
            match committed
                .find_partition(topic, range.partition)
                .map(|e| e.offset())
            {
                Some(Offset::Offset(o)) => Some(o),
                _ => None,
            }
        })
        .collect())
}

/// The application's consumer-group lag on `topic`: per partition, the high
/// watermark minus the committed offset (minus the low watermark where
/// nothing is committed), summed.
pub fn group_lag(settings: &Settings, topic: &str) -> Result<i64, ReadError> {
    let consumer: BaseConsumer = client_config(settings, Role::Consumer)
        .create()
        .map_err(|source| kafka(topic, source))?;
    let ranges = ranges(&consumer, topic, Start::Beginning)?;
    let committed = committed(&consumer, topic, &ranges)?;
    Ok(ranges
        .iter()
        .zip(committed)
        .map(|(range, at)| (range.end - at.unwrap_or(range.start)).max(0))
        .sum())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::error::KafkaError;
    use rdkafka::types::RDKafkaErrorCode;

    #[test]
    fn connection_errors_are_transient_and_partition_errors_are_not() {
        let consumption = KafkaError::MessageConsumption;
        assert!(is_transient(&consumption(RDKafkaErrorCode::AllBrokersDown)));
        assert!(is_transient(&consumption(
            RDKafkaErrorCode::BrokerTransportFailure
        )));
        assert!(!is_transient(&consumption(
            RDKafkaErrorCode::OffsetOutOfRange
        )));
        assert!(!is_transient(&consumption(
            RDKafkaErrorCode::UnknownTopicOrPartition
        )));
        // A fatal error is not retried, whatever its code.
        assert!(!is_transient(&KafkaError::MessageConsumptionFatal(
            RDKafkaErrorCode::AllBrokersDown
        )));
    }
}
