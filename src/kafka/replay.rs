//! `keyflight replay`: moving the group's committed offsets on the input
//! topic, and forgetting markers so a replay pushes every key again.
//!
//! Only safe while no member of the group runs (a running member would
//! commit over the reset), so [`active_members`] is checked first.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::{Message, Offset, TopicPartitionList};

use super::reader::{self, ReadError, Start};
use super::{client_config, Deliveries, Role};
use crate::config::Settings;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("{what}: {source}")]
    Kafka {
        what: String,
        source: rdkafka::error::KafkaError,
    },
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("partition {partition} of {topic} does not exist (it has {count})")]
    NoSuchPartition {
        topic: String,
        partition: i32,
        count: i32,
    },
    #[error("offset {offset} is outside partition {partition}'s range [{low}, {high}]")]
    OutOfRange {
        partition: i32,
        offset: i64,
        low: i64,
        high: i64,
    },
}

/// Where to move the group's offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Earliest,
    Latest,
    /// The first record at or after this time (ms since the epoch).
    Time(i64),
    /// Explicit offsets; partitions not named keep theirs.
    Offsets(Vec<(i32, i64)>),
}

/// One partition's change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    pub partition: i32,
    /// The committed offset now (`None`: nothing committed).
    pub current: Option<i64>,
    pub new: i64,
}

const TIMEOUT: Duration = Duration::from_secs(30);

fn kafka(what: impl Into<String>) -> impl FnOnce(rdkafka::error::KafkaError) -> ReplayError {
    let what = what.into();
    move |source| ReplayError::Kafka { what, source }
}

/// A consumer in the application's own group that never joins it: it only
/// reads and commits offsets.
fn group_consumer(settings: &Settings) -> Result<BaseConsumer, ReplayError> {
    client_config(settings, Role::Consumer)
        .create()
        .map_err(kafka("cannot create the Kafka consumer"))
}

/// Members of the application's consumer group right now (client id and
/// host); an error when the broker cannot describe the group.
pub fn active_members(settings: &Settings) -> Result<Vec<String>, ReplayError> {
    let consumer = group_consumer(settings)?;
    let group = &settings.application_id;
    let list = consumer
        .fetch_group_list(Some(group), TIMEOUT)
        .map_err(kafka(format!("cannot describe consumer group {group}")))?;
    Ok(list
        .groups()
        .iter()
        .filter(|g| g.name() == group)
        .flat_map(|g| g.members())
        .map(|m| format!("{} ({})", m.client_id(), m.client_host()))
        .collect())
}

/// The moves that reach `target`, per partition of the input topic.
pub fn plan(settings: &Settings, target: &Target) -> Result<Vec<Move>, ReplayError> {
    let consumer = group_consumer(settings)?;
    let topic = &settings.topics.input;
    let start = match target {
        Target::Time(ms) => Start::Time(*ms),
        _ => Start::Beginning,
    };
    let ranges = reader::ranges(&consumer, topic, start)?;
    let committed = reader::committed(&consumer, topic, &ranges)?;
    let current = |partition| {
        ranges
            .iter()
            .position(|r| r.partition == partition)
            .and_then(|i| committed[i])
    };
    let mut moves = Vec::new();
    match target {
        Target::Offsets(wanted) => {
            for &(partition, offset) in wanted {
                let Some(range) = ranges.iter().find(|r| r.partition == partition) else {
                    return Err(ReplayError::NoSuchPartition {
                        topic: topic.clone(),
                        partition,
                        count: ranges.len() as i32,
                    });
                };
                if offset < range.start || offset > range.end {
                    return Err(ReplayError::OutOfRange {
                        partition,
                        offset,
                        low: range.start,
                        high: range.end,
                    });
                }
                moves.push(Move {
                    partition,
                    current: current(partition),
                    new: offset,
                });
            }
        }
        _ => {
            for range in &ranges {
                let new = match target {
                    Target::Latest => range.end,
                    // Earliest: the low watermark; a time: the first record at or after it.
                    _ => range.start,
                };
                moves.push(Move {
                    partition: range.partition,
                    current: current(range.partition),
                    new,
                });
            }
        }
    }
    moves.sort_by_key(|m| m.partition);
    Ok(moves)
}

/// Commits the planned offsets for the group.
pub fn execute(settings: &Settings, moves: &[Move]) -> Result<(), ReplayError> {
    let consumer = group_consumer(settings)?;
    let topic = &settings.topics.input;
    let mut offsets = TopicPartitionList::new();
    for m in moves {
        offsets
            .add_partition_offset(topic, m.partition, Offset::Offset(m.new))
            .map_err(kafka("bad offset"))?;
    }
    consumer
        .commit(&offsets, CommitMode::Sync)
        .map_err(kafka(format!(
            "cannot commit the new offsets for group {}",
            settings.application_id
        )))
}

/// Writes a tombstone to the changelog for every key that has a marker, so
/// every store restored afterwards is empty and a replay pushes every key
/// again. Returns the number of tombstones written.
pub fn forget_markers(
    settings: &Settings,
    mut progress: impl FnMut(u64, u64),
) -> Result<u64, ReplayError> {
    let topic = settings.changelog_topic();
    let consumer =
        reader::consumer(settings, "replay").map_err(kafka("cannot create the Kafka consumer"))?;
    let ranges = reader::ranges(&consumer, &topic, Start::Beginning)?;
    let total = reader::size(&ranges);
    // The live keys per partition: the last record of each key decides.
    let mut live: std::collections::HashMap<(i32, Vec<u8>), bool> = Default::default();
    let mut seen = 0;
    reader::read(&consumer, &topic, &ranges, |message| {
        seen += 1;
        // Owners' claims stay: they are no marker, and restores order the
        // records after them by them.
        let (claim, _) = crate::processor::restore::claim_headers(message);
        if claim {
            return progress(seen, total);
        }
        let key = message.key().unwrap_or_default().to_vec();
        live.insert((message.partition(), key), message.payload().is_some());
        progress(seen, total);
    })?;
    let producer: ThreadedProducer<Deliveries> = client_config(settings, Role::Producer)
        .create_with_context(Deliveries::default())
        .map_err(kafka("cannot create the Kafka producer"))?;
    let mut written = 0;
    for ((partition, key), _) in live.into_iter().filter(|(_, alive)| *alive) {
        let record = BaseRecord::<[u8], [u8]>::to(&topic)
            .key(&key[..])
            .partition(partition);
        #[allow(clippy::result_large_err)] // rust-rdkafka hands the record back
        super::send_waiting(record, |r| producer.send(r))
            .map_err(kafka(format!("cannot write a tombstone to {topic}")))?;
        written += 1;
    }
    producer
        .flush(Duration::from_secs(60))
        .map_err(kafka(format!("tombstones to {topic} not acknowledged")))?;
    if let Some((failed, first)) = producer.context().failures() {
        return Err(ReplayError::Kafka {
            what: format!("{failed} of {written} tombstones to {topic} failed"),
            source: first,
        });
    }
    Ok(written)
}
