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

/// How long a watermark query may take.
pub const WATERMARKS_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads the changelog partition from the checkpoint (or its start) to its
/// current end and applies every record to the store, reporting
/// `(records read, records to read at most)` as it goes. Blocking.
///
/// `watermarks` are the partition's (low, high) offsets if the caller has
/// them (`keyflight run` asks its producer, whose connections are open);
/// otherwise a reader asks. The reader, a consumer with connections of its
/// own, is created only when there is something to read: a store that is
/// complete (or a changelog that is empty) costs no new client.
pub fn restore(
    settings: &Settings,
    topic: &str,
    partition: i32,
    store: &Store,
    opened: Opened,
    watermarks: Option<(i64, i64)>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Restored, RestoreError> {
    let kafka = |source| RestoreError::Kafka {
        topic: topic.to_string(),
        partition,
        source,
    };
    // Never the group's own offsets: the changelog is read by assignment.
    let reader = || super::reader::consumer(settings, "restore").map_err(kafka);
    let (consumer, (low, high)) = match watermarks {
        Some(known) => (None, known),
        None => {
            let consumer = reader()?;
            let known = consumer
                .fetch_watermarks(topic, partition, WATERMARKS_TIMEOUT)
                .map_err(kafka)?;
            (Some(consumer), known)
        }
    };
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
    let consumer = match consumer {
        Some(consumer) => consumer,
        None => reader()?,
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Restores with known watermarks against a broker nothing listens on:
    /// a restore that reached for it would wait out the watermark timeout
    /// and fail, not return at once.
    fn restore_known(store: &Store, opened: Opened, watermarks: (i64, i64)) -> Restored {
        let unreachable = Settings {
            brokers: "127.0.0.1:1".into(),
            ..Settings::default()
        };
        restore(
            &unreachable,
            "t",
            0,
            store,
            opened,
            Some(watermarks),
            &mut |_, _| panic!("no records to read"),
        )
        .unwrap()
    }

    #[test]
    fn a_store_complete_up_to_known_watermarks_is_restored_without_the_broker() {
        let dir = tempfile::tempdir().unwrap();
        let (store, opened) = Store::open(dir.path()).unwrap();
        // An empty store and an empty changelog partition (low = high).
        assert_eq!(
            restore_known(&store, opened, (7, 7)),
            Restored {
                records: 0,
                next_offset: 7
            }
        );
        // A checkpoint at the end of the changelog: nothing left to read.
        store.checkpoint(12).unwrap();
        drop(store);
        let (store, opened) = Store::open(dir.path()).unwrap();
        assert_eq!(opened, Opened::FromCheckpoint(12));
        assert_eq!(restore_known(&store, opened, (3, 12)).next_offset, 12);
    }
}
