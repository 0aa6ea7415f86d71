//! `keyflight run`: the consumer-group member.
//!
//! One OS thread (the poll thread) owns the consumer. librdkafka runs the
//! rebalance callbacks on it, so a revoke can block there, bounded, while
//! the revoked partitions finish their pushes, commit and checkpoint, before
//! the group hands them to another member. The poll thread routes records to
//! one tokio task per assigned partition ([`super::task`]) and performs
//! the commits those tasks ask for.
//!
//! Backpressure is one mechanism: a task whose table is saturated stops
//! taking records from its channel; the poll thread counts what it has
//! handed over and the task has not processed yet, in the channel or in
//! the task's inbox (the task's [`task::Backlog`]), and pauses the
//! partition once that passes [`PAUSE_RECORDS`] or
//! `singleflight.max_held_bytes`; it resumes the partition once the task
//! has processed half of it. Memory stays bounded whatever the input rate.
//!
//! Records are taken from a fetch queue of keyflight's own, many per call
//! (`FetchQueue`); the consumer queue keeps the events (rebalances, commit
//! results, errors) that rust-rdkafka's `poll` serves.
//!
//! Why not a bounded channel: pausing at every full channel made librdkafka
//! drop and fetch again a paused partition's prefetched records (3.6×
//! slower in the benchmark), and holding records in the poll thread to
//! avoid that meant refilling the channel only between polls: 1 024
//! records per 100 ms poll, about 10 000 events/s for a partition that had
//! fallen behind.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::producer::Producer;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use tracing::{debug, info, warn};

use super::task::shell::TaskResources;
use super::task::{self, InputRecord, TaskInput};
use crate::config::Settings;
use crate::internal_events::{LagSampled, OffsetsCommitted, PartitionsAssigned, PartitionsRevoked};
use crate::kafka::ffi::{self, FetchQueue};
use crate::kafka::{client_config, Role};
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot create the Kafka {role} client: {source}")]
    Client {
        role: &'static str,
        source: rdkafka::error::KafkaError,
    },
    #[error("cannot subscribe to {topic}: {source}")]
    Subscribe {
        topic: String,
        source: rdkafka::error::KafkaError,
    },
    #[error("{0}")]
    Partition(String),
}

/// Records waiting for a task before its partition is paused (bytes: the
/// `singleflight.max_held_bytes` setting).
pub const PAUSE_RECORDS: usize = 32 * 1024;

/// A partition's task, as the poll thread sees it.
struct Assigned {
    input: TaskInput,
    /// Paused since its backlog passed a bound.
    paused: bool,
}

/// Whether a backlog of (records, bytes) is past a bound.
fn over_bound((records, bytes): (usize, usize), max_bytes: usize) -> bool {
    records >= PAUSE_RECORDS || bytes >= max_bytes
}

/// Whether a paused partition's backlog is down to half its bounds.
fn resumable((records, bytes): (usize, usize), max_bytes: usize) -> bool {
    records <= PAUSE_RECORDS / 2 && bytes <= max_bytes / 2
}

/// The consumer's context: rebalance callbacks start and stop partition tasks.
struct GroupMember {
    resources: Arc<TaskResources>,
    runtime: tokio::runtime::Handle,
    assigned: Mutex<HashMap<i32, Assigned>>,
    /// The offsets this member last committed, per partition (for the lag).
    committed: Mutex<HashMap<i32, i64>>,
    fetch: FetchQueue,
}

impl ClientContext for GroupMember {}

impl ConsumerContext for GroupMember {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(list) => {
                let partitions: Vec<i32> = list.elements().iter().map(|e| e.partition()).collect();
                self.close(consumer, &partitions);
            }
            // Before the assignment starts fetching, so that no record of
            // these partitions reaches the consumer queue.
            Rebalance::Assign(list) => {
                for element in list.elements() {
                    self.fetch
                        .forward(consumer, element.topic(), element.partition());
                }
            }
            Rebalance::Error(_) => {}
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                let mut assigned = self.assigned.lock().expect("assignment lock");
                let new: Vec<i32> = list
                    .elements()
                    .iter()
                    .map(|e| e.partition())
                    .filter(|p| !assigned.contains_key(p))
                    .collect();
                self.resources.metrics.emit(PartitionsAssigned(&new));
                for element in list.elements() {
                    assigned
                        .entry(element.partition())
                        .or_insert_with(|| Assigned {
                            input: task::spawn(
                                self.resources.clone(),
                                &self.runtime,
                                element.topic().to_string(),
                                element.partition(),
                            ),
                            paused: false,
                        });
                }
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => warn!("rebalance error: {e}"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => {
                let offsets = positions(offsets);
                self.committed
                    .lock()
                    .expect("committed lock")
                    .extend(offsets.iter().copied());
                self.resources.metrics.emit(OffsetsCommitted(&offsets));
            }
            Err(e) => debug!("commit not acknowledged (retried at the next interval): {e}"),
        }
    }
}

impl GroupMember {
    /// Forwards every assigned partition to the fetch queue again (see
    /// [`FetchQueue`]).
    fn reforward(&self, consumer: &BaseConsumer<GroupMember>) {
        let topic = &self.resources.settings.topics.input;
        for partition in self.assigned_partitions() {
            self.fetch.forward(consumer, topic, partition);
        }
    }

    fn assigned_partitions(&self) -> Vec<i32> {
        let assigned = self.assigned.lock().expect("assignment lock");
        assigned.keys().copied().collect()
    }

    /// Stops the tasks of `partitions` (bounded by the shutdown timeout),
    /// then commits their final positions synchronously.
    fn close(&self, consumer: &BaseConsumer<Self>, partitions: &[i32]) {
        let closing: Vec<(i32, Assigned)> = {
            let mut assigned = self.assigned.lock().expect("assignment lock");
            partitions
                .iter()
                .filter_map(|p| assigned.remove(p).map(|a| (*p, a)))
                .collect()
        };
        let revoked: Vec<i32> = closing.iter().map(|(p, _)| *p).collect();
        let mut waiting = Vec::new();
        for (partition, task) in closing {
            let (tx, rx) = std::sync::mpsc::channel();
            if task.input.close.send(tx).is_ok() {
                waiting.push((partition, rx));
            }
        }
        let limit = self.resources.settings.shutdown_timeout + Duration::from_secs(5);
        let mut offsets = TopicPartitionList::new();
        for (partition, rx) in waiting {
            match rx.recv_timeout(limit) {
                Ok(Some(position)) => {
                    let _ = offsets.add_partition_offset(
                        &self.resources.settings.topics.input,
                        partition,
                        Offset::Offset(position),
                    );
                }
                Ok(None) => {}
                Err(_) => warn!(
                    partition,
                    "partition task did not close in time; its uncommitted events will be replayed"
                ),
            }
        }
        if offsets.count() > 0 {
            match consumer.commit(&offsets, CommitMode::Sync) {
                Ok(()) => info!(offsets = ?positions(&offsets), "committed on close"),
                Err(e) => warn!("commit on close failed (events will be replayed): {e}"),
            }
        }
        let mut committed = self.committed.lock().expect("committed lock");
        committed.retain(|p, _| !revoked.contains(p));
        drop(committed);
        self.resources.metrics.emit(PartitionsRevoked(&revoked));
    }
}

fn positions(list: &TopicPartitionList) -> Vec<(i32, i64)> {
    list.elements()
        .iter()
        .filter_map(|e| e.offset().to_raw().map(|o| (e.partition(), o)))
        .collect()
}

/// Runs the processor until `stop` is set, then shuts down cleanly.
pub fn run(
    settings: Settings,
    metrics: Arc<Metrics>,
    runtime: tokio::runtime::Handle,
    stop: Arc<AtomicBool>,
) -> Result<(), RunError> {
    let producer = client_config(&settings, Role::Producer)
        .create()
        .map_err(|source| RunError::Client {
            role: "producer",
            source,
        })?;
    let (commits, commit_requests) = std::sync::mpsc::channel();
    let (failures, failed) = std::sync::mpsc::channel();
    let resources = Arc::new(TaskResources {
        codec: Arc::new(settings.codec()),
        changelog: settings.changelog_topic(),
        producer,
        commits,
        failures,
        settings,
        metrics,
    });
    let member = GroupMember {
        resources: resources.clone(),
        runtime,
        assigned: Mutex::new(HashMap::new()),
        committed: Mutex::new(HashMap::new()),
        fetch: FetchQueue::default(),
    };
    let consumer: BaseConsumer<GroupMember> = client_config(&resources.settings, Role::Consumer)
        .create_with_context(member)
        .map_err(|source| RunError::Client {
            role: "consumer",
            source,
        })?;
    let input = resources.settings.topics.input.clone();
    consumer
        .subscribe(&[&input])
        .map_err(|source| RunError::Subscribe {
            topic: input.clone(),
            source,
        })?;
    // Before the first poll, whose rebalance forwards to it; closed below,
    // before the consumer goes.
    consumer.context().fetch.open(&consumer);
    info!(topic = %input, group = %resources.settings.application_id, "consuming");

    let mut failure = None;
    let mut lag_sampled = Instant::now();
    let mut reforwarded = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if let Ok(message) = failed.try_recv() {
            failure = Some(message);
            break;
        }
        commit_requested(&consumer, &commit_requests, &input);
        if lag_sampled.elapsed() >= LAG_SAMPLE_INTERVAL {
            sample_lag(&consumer, &input);
            lag_sampled = Instant::now();
        }
        if reforwarded.elapsed() >= REFORWARD_INTERVAL {
            consumer.context().reforward(&consumer);
            reforwarded = Instant::now();
        }
        // Events (rebalances, commit results, errors) first. Records reach
        // the consumer queue only if a partition could not be forwarded;
        // they are older than any of theirs in the fetch queue, so all of
        // them go first.
        let mut stray = Vec::new();
        loop {
            match consumer.poll(Duration::ZERO) {
                Some(Ok(message)) => stray.push((message.partition(), InputRecord::of(&message))),
                Some(Err(e)) => warn!("consumer error: {e}"),
                None => break,
            }
        }
        route(&consumer, stray, &input);
        // While a partition is paused, wait briefly, to resume it as soon
        // as its task has room.
        let any_paused = resume_ready(&consumer, &input);
        let timeout = Duration::from_millis(if any_paused { 5 } else { 100 });
        // Records come in batches (a fetch's worth): take what is ready and
        // route it under one lock, then do the housekeeping above again.
        let mut batch = Vec::new();
        consumer
            .context()
            .fetch
            .take::<ROUTE_BATCH>(timeout, |partition, offset, key, value| {
                batch.push((partition, InputRecord::copied(offset, key, value)));
            });
        route(&consumer, batch, &input);
    }

    info!(
        failed = failure.is_some(),
        "shutting down: finishing pushes in flight"
    );
    resources.metrics.health.stopping();
    let partitions = consumer.context().assigned_partitions();
    consumer.context().close(&consumer, &partitions);
    consumer.unsubscribe();
    consumer.context().fetch.close();
    let _ = resources.producer.flush(Duration::from_secs(5));
    info!("stopped");
    match failure {
        Some(message) => Err(RunError::Partition(message)),
        None => Ok(()),
    }
}

/// Records taken from the fetch queue per call and routed per lock of the
/// assignment, at most.
const ROUTE_BATCH: usize = 512;

/// How often the assigned partitions are forwarded to the fetch queue again
/// (see [`FetchQueue`]).
const REFORWARD_INTERVAL: Duration = Duration::from_millis(100);

/// How often the consumer lag gauge is refreshed.
const LAG_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// Consumer lag per assigned partition: the high watermark librdkafka last
/// saw in a fetch response (no broker round trip) minus the offset this
/// member last committed, or, before its first commit, its fetch position.
fn sample_lag(consumer: &BaseConsumer<GroupMember>, topic: &str) {
    let context = consumer.context();
    let partitions = context.assigned_partitions();
    let committed = context.committed.lock().expect("committed lock").clone();
    let position = consumer.position().unwrap_or_default();
    for partition in partitions {
        let Some((low, high)) = ffi::cached_watermarks(consumer, topic, partition) else {
            continue;
        };
        let from = committed.get(&partition).copied().or_else(|| {
            position
                .find_partition(topic, partition)
                .and_then(|e| e.offset().to_raw())
                .filter(|o| *o >= 0)
        });
        context.resources.metrics.emit(LagSampled {
            partition,
            lag: (high - from.unwrap_or(low)).max(0),
        });
    }
}

/// Commits the positions partition tasks asked for, if still assigned here.
fn commit_requested(
    consumer: &BaseConsumer<GroupMember>,
    requests: &std::sync::mpsc::Receiver<(i32, i64)>,
    topic: &str,
) {
    let mut latest: HashMap<i32, i64> = HashMap::new();
    while let Ok((partition, offset)) = requests.try_recv() {
        latest.insert(partition, offset);
    }
    if latest.is_empty() {
        return;
    }
    let assigned = consumer.context().assigned.lock().expect("assignment lock");
    let mut offsets = TopicPartitionList::new();
    for (partition, offset) in latest {
        // A partition that moved to another member is that member's to commit.
        if assigned.contains_key(&partition) {
            let _ = offsets.add_partition_offset(topic, partition, Offset::Offset(offset));
        }
    }
    drop(assigned);
    if offsets.count() > 0 {
        if let Err(e) = ffi::commit_async(consumer, &offsets) {
            warn!("commit failed (retried at the next interval): {e}");
        }
    }
}

/// Hands records to their partitions' tasks; pauses a partition whose
/// task's backlog is past a bound.
fn route(consumer: &BaseConsumer<GroupMember>, batch: Vec<(i32, InputRecord)>, topic: &str) {
    if batch.is_empty() {
        return;
    }
    let max_bytes = max_held_bytes(consumer);
    let mut assigned = consumer.context().assigned.lock().expect("assignment lock");
    // A fetch's records come one partition at a time: each run of records
    // of one partition goes to its task as one batch.
    let mut batch = batch.into_iter().peekable();
    while let Some((partition, first)) = batch.next() {
        let mut records = vec![first];
        while let Some((_, record)) = batch.next_if(|(p, _)| *p == partition) {
            records.push(record);
        }
        let Some(task) = assigned.get_mut(&partition) else {
            continue; // revoked meanwhile: the next owner reads it from the committed offset
        };
        task.input.backlog.handed(&records);
        if task.input.records.send(records).is_err() {
            continue; // the task is closing; its events stay uncommitted
        }
        let backlog = task.input.backlog.size();
        if !task.paused && over_bound(backlog, max_bytes) {
            match consumer.pause(&one_partition(topic, partition)) {
                Ok(()) => {
                    task.paused = true;
                    debug!(
                        partition,
                        held = backlog.0,
                        "partition paused: its task is saturated"
                    );
                }
                Err(e) => warn!(partition, "pause failed: {e}"),
            }
        }
    }
}

fn max_held_bytes(consumer: &BaseConsumer<GroupMember>) -> usize {
    consumer
        .context()
        .resources
        .settings
        .singleflight
        .max_held_bytes
}

/// Resumes paused partitions whose tasks have processed half their backlog;
/// true if some partition stays paused.
fn resume_ready(consumer: &BaseConsumer<GroupMember>, topic: &str) -> bool {
    let max_bytes = max_held_bytes(consumer);
    let mut assigned = consumer.context().assigned.lock().expect("assignment lock");
    let mut still_paused = false;
    for (partition, task) in assigned.iter_mut().filter(|(_, t)| t.paused) {
        if !resumable(task.input.backlog.size(), max_bytes) {
            still_paused = true;
            continue;
        }
        match consumer.resume(&one_partition(topic, *partition)) {
            Ok(()) => {
                task.paused = false;
                debug!(partition, "partition resumed");
            }
            Err(e) => {
                still_paused = true;
                warn!(partition, "resume failed: {e}");
            }
        }
    }
    still_paused
}

fn one_partition(topic: &str, partition: i32) -> TopicPartitionList {
    let mut list = TopicPartitionList::new();
    list.add_partition(topic, partition);
    list
}
