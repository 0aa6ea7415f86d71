//! Restoring a partition's store from its slice of the changelog, before
//! any event of the partition is processed.

use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::config::Settings;
use crate::state::{Opened, StateError, Store};

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("changelog {topic}[{partition}]: {source}")]
    Kafka {
        topic: String,
        partition: i32,
        source: rdkafka::error::KafkaError,
    },
    #[error("changelog {topic}[{partition}]: no progress for {0:?} while restoring", .stall)]
    Stalled {
        topic: String,
        partition: i32,
        stall: Duration,
    },
    #[error(transparent)]
    State(#[from] StateError),
}

/// What a restore read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    pub records: u64,
    /// The changelog offset the store is now complete up to (exclusive).
    pub next_offset: i64,
}

/// How long a restore may go without reading a record before it gives up.
const STALL: Duration = Duration::from_secs(60);

/// Reads the changelog partition from the checkpoint (or its start) to its
/// current end and applies every record to the store, reporting
/// `(records read, records to read at most)` as it goes. Blocking.
pub fn restore(
    settings: &Settings,
    topic: &str,
    partition: i32,
    store: &Store,
    opened: Opened,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Restored, RestoreError> {
    let kafka = |source| RestoreError::Kafka {
        topic: topic.to_string(),
        partition,
        source,
    };
    // Never the group's own offsets: the changelog is read by assignment.
    let consumer = super::reader::consumer(settings, "restore").map_err(kafka)?;
    let (low, high) = consumer
        .fetch_watermarks(topic, partition, Duration::from_secs(30))
        .map_err(kafka)?;
    let start = match opened {
        Opened::FromCheckpoint(next) => next.max(low),
        Opened::Empty => low,
    };
    if start >= high {
        return Ok(Restored {
            records: 0,
            next_offset: high.max(start),
        });
    }
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, partition, Offset::Offset(start))
        .map_err(kafka)?;
    consumer.assign(&assignment).map_err(kafka)?;
    let mut records = 0;
    let total = (high - start) as u64;
    let mut last_progress = Instant::now();
    loop {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                store.restore(message.key().unwrap_or_default(), message.payload())?;
                records += 1;
                last_progress = Instant::now();
                progress(records, total);
                if message.offset() + 1 >= high {
                    return Ok(Restored {
                        records,
                        next_offset: message.offset() + 1,
                    });
                }
            }
            Some(Err(e)) => return Err(kafka(e)),
            None if last_progress.elapsed() > STALL => {
                return Err(RestoreError::Stalled {
                    topic: topic.to_string(),
                    partition,
                    stall: STALL,
                })
            }
            None => {}
        }
    }
}
