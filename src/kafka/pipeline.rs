//! `keyflight run`: the consumer-group member.
//!
//! One OS thread (the poll thread) owns the consumer. librdkafka runs the
//! rebalance callbacks on it, so a revoke can block there, bounded, while
//! the revoked partitions finish their pushes, commit and checkpoint, before
//! the group hands them to another member. The poll thread routes records to
//! one tokio task per assigned partition ([`super::partition`]) and performs
//! the commits those tasks ask for.
//!
//! Backpressure is one mechanism: a task whose table is saturated stops
//! taking records from its channel; the poll thread counts what it has
//! handed over and the task has not processed yet, in the channel or in
//! the task's inbox (the task's [`partition::Backlog`]), and pauses the
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
use std::ffi::CString;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{IsError, KafkaError, KafkaResult};
use rdkafka::producer::Producer;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use tracing::{debug, info, warn};

use super::partition::{self, InputRecord, Shared, TaskHandle};
use super::{client_config, Role};
use crate::codec::Codec;
use crate::config::Settings;
use crate::internal_events::{LagSampled, OffsetsCommitted, PartitionsAssigned, PartitionsRevoked};
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
    handle: TaskHandle,
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
struct Context {
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
    assigned: Mutex<HashMap<i32, Assigned>>,
    /// The offsets this member last committed, per partition (for the lag).
    committed: Mutex<HashMap<i32, i64>>,
    fetch: FetchQueue,
}

impl ClientContext for Context {}

impl ConsumerContext for Context {
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
                self.shared.metrics.emit(PartitionsAssigned(&new));
                for element in list.elements() {
                    assigned
                        .entry(element.partition())
                        .or_insert_with(|| Assigned {
                            handle: partition::spawn(
                                self.shared.clone(),
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
                self.shared.metrics.emit(OffsetsCommitted(&offsets));
            }
            Err(e) => debug!("commit not acknowledged (retried at the next interval): {e}"),
        }
    }
}

/// The assigned partitions' records, forwarded from their librdkafka
/// queues to one queue of keyflight's own and taken up to [`ROUTE_BATCH`]
/// per call (`rd_kafka_consume_batch_queue`, which rust-rdkafka does not
/// wrap). rust-rdkafka's `poll` returns one record per call, each with a
/// queue lock and clock reads of its own: that was a quarter of the poll
/// thread's time.
///
/// librdkafka clears a partition's forwarding when it stops fetching it (a
/// revoke). It finishes stops before it starts an assignment, so a new
/// assignment's forward should stand; should a stop ever land after it,
/// the partition's records would sit in its own queue, unread. The poll
/// thread therefore forwards every assigned partition again every
/// [`REFORWARD_INTERVAL`] (records left meanwhile move along, in order): a
/// cheap guard against a silent stall.
struct FetchQueue(AtomicPtr<rd::rd_kafka_queue_t>);

impl FetchQueue {
    /// Creates the queue of `consumer`'s client.
    fn open(&self, consumer: &BaseConsumer<Context>) {
        // SAFETY: the client pointer is valid while `consumer` lives; the
        // queue is destroyed in `close`, before the consumer.
        let queue = unsafe { rd::rd_kafka_queue_new(consumer.client().native_ptr()) };
        self.0.store(queue, Ordering::Release);
    }

    /// Destroys the queue; records still in it are not committed, so the
    /// next owner reads them again. Call before the consumer is dropped.
    fn close(&self) {
        let queue = self.0.swap(std::ptr::null_mut(), Ordering::AcqRel);
        if !queue.is_null() {
            // SAFETY: created by `open`, destroyed once (swapped out above).
            unsafe { rd::rd_kafka_queue_destroy(queue) };
        }
    }

    /// Sends `partition`'s records to this queue.
    fn forward<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>, topic: &str, partition: i32) {
        let queue = self.0.load(Ordering::Acquire);
        let Ok(topic) = CString::new(topic) else {
            return;
        };
        if queue.is_null() {
            return;
        }
        // SAFETY: the client and `queue` are alive (see `open`); the
        // partition queue handle is ours and released right after, which
        // keeps the forwarding.
        unsafe {
            let rk = consumer.client().native_ptr();
            let from = rd::rd_kafka_queue_get_partition(rk, topic.as_ptr(), partition);
            if from.is_null() {
                // Its records stay on the consumer queue, which `poll` serves.
                return warn!(partition, "cannot forward the partition's records");
            }
            rd::rd_kafka_queue_forward(from, queue);
            rd::rd_kafka_queue_destroy(from);
        }
    }

    /// Up to `ROUTE_BATCH` records, waiting up to `timeout` for the first:
    /// (partition, record) in the order they were fetched.
    fn take(&self, timeout: Duration) -> Vec<(i32, InputRecord)> {
        let queue = self.0.load(Ordering::Acquire);
        if queue.is_null() {
            return Vec::new();
        }
        let mut messages = [std::ptr::null_mut::<rd::rd_kafka_message_t>(); ROUTE_BATCH];
        // librdkafka waits out the timeout until the whole batch is there,
        // so: wait for one record, then take what else is ready at once.
        // SAFETY: `queue` is alive (see `open`); librdkafka fills at most
        // the given number of pointers, each destroyed below after it is
        // copied.
        let taken = unsafe {
            let first = rd::rd_kafka_consume_batch_queue(
                queue,
                timeout.as_millis() as i32,
                messages.as_mut_ptr(),
                1,
            );
            if first == 1 {
                let more = rd::rd_kafka_consume_batch_queue(
                    queue,
                    0,
                    messages.as_mut_ptr().add(1),
                    ROUTE_BATCH - 1,
                );
                1 + more.max(0)
            } else {
                first
            }
        };
        let taken = usize::try_from(taken).unwrap_or(0).min(ROUTE_BATCH);
        let mut records = Vec::with_capacity(taken);
        for &message in &messages[..taken] {
            // SAFETY: a message librdkafka handed over, valid until destroyed.
            unsafe {
                let m = &*message;
                if m.err == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                    let slice = |ptr: *mut libc::c_void, len: usize| {
                        (!ptr.is_null()).then(|| std::slice::from_raw_parts(ptr as *const u8, len))
                    };
                    records.push((
                        m.partition,
                        InputRecord::copied(
                            m.offset,
                            slice(m.key, m.key_len),
                            slice(m.payload, m.len),
                        ),
                    ));
                } else {
                    let code: RDKafkaErrorCode = m.err.into();
                    warn!(partition = m.partition, "consumer error: {code}");
                }
                rd::rd_kafka_message_destroy(message);
            }
        }
        records
    }
}

impl Context {
    /// Forwards every assigned partition to the fetch queue again (see
    /// [`FetchQueue`]).
    fn reforward(&self, consumer: &BaseConsumer<Context>) {
        let topic = &self.shared.settings.topics.input;
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
            if task.handle.close.send(tx).is_ok() {
                waiting.push((partition, rx));
            }
        }
        let limit = self.shared.settings.shutdown_timeout + Duration::from_secs(5);
        let mut offsets = TopicPartitionList::new();
        for (partition, rx) in waiting {
            match rx.recv_timeout(limit) {
                Ok(Some(position)) => {
                    let _ = offsets.add_partition_offset(
                        &self.shared.settings.topics.input,
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
        self.shared.metrics.emit(PartitionsRevoked(&revoked));
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
    let shared = Arc::new(Shared {
        codec: Codec::from_settings(&settings),
        changelog: settings.changelog_topic(),
        producer,
        commits,
        failures,
        settings,
        metrics,
    });
    let context = Context {
        shared: shared.clone(),
        runtime,
        assigned: Mutex::new(HashMap::new()),
        committed: Mutex::new(HashMap::new()),
        fetch: FetchQueue(AtomicPtr::new(std::ptr::null_mut())),
    };
    let consumer: BaseConsumer<Context> = client_config(&shared.settings, Role::Consumer)
        .create_with_context(context)
        .map_err(|source| RunError::Client {
            role: "consumer",
            source,
        })?;
    let input = shared.settings.topics.input.clone();
    consumer
        .subscribe(&[&input])
        .map_err(|source| RunError::Subscribe {
            topic: input.clone(),
            source,
        })?;
    // Before the first poll, whose rebalance forwards to it; closed below,
    // before the consumer goes.
    consumer.context().fetch.open(&consumer);
    info!(topic = %input, group = %shared.settings.application_id, "consuming");

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
        let batch = consumer.context().fetch.take(timeout);
        route(&consumer, batch, &input);
    }

    info!(
        failed = failure.is_some(),
        "shutting down: finishing pushes in flight"
    );
    shared.metrics.health.stopping();
    let partitions = consumer.context().assigned_partitions();
    consumer.context().close(&consumer, &partitions);
    consumer.unsubscribe();
    consumer.context().fetch.close();
    let _ = shared.producer.flush(Duration::from_secs(5));
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
fn sample_lag(consumer: &BaseConsumer<Context>, topic: &str) {
    let context = consumer.context();
    let partitions = context.assigned_partitions();
    let committed = context.committed.lock().expect("committed lock").clone();
    let position = consumer.position().unwrap_or_default();
    for partition in partitions {
        let Some((low, high)) = cached_watermarks(consumer, topic, partition) else {
            continue;
        };
        let from = committed.get(&partition).copied().or_else(|| {
            position
                .find_partition(topic, partition)
                .and_then(|e| e.offset().to_raw())
                .filter(|o| *o >= 0)
        });
        context.shared.metrics.emit(LagSampled {
            partition,
            lag: (high - from.unwrap_or(low)).max(0),
        });
    }
}

/// `rd_kafka_get_watermark_offsets`: the cached watermarks, if any fetch
/// has returned them yet (rust-rdkafka only wraps the querying variant).
fn cached_watermarks(
    consumer: &BaseConsumer<Context>,
    topic: &str,
    partition: i32,
) -> Option<(i64, i64)> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer lives as long as `consumer`; the topic is
    // a valid C string and the out-pointers point at live locals.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
        .then_some((low.max(0), high))
}

/// Commits the positions partition tasks asked for, if still assigned here.
fn commit_requested(
    consumer: &BaseConsumer<Context>,
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
        if let Err(e) = commit_async(consumer, &offsets) {
            warn!("commit failed (retried at the next interval): {e}");
        }
    }
}

/// An asynchronous commit whose outcome comes back through
/// [`ConsumerContext::commit_callback`] on the poll thread. librdkafka only
/// reports a manual async commit to a queue it is given, and rust-rdkafka's
/// `commit` passes none, so this calls `rd_kafka_commit_queue` with the
/// consumer queue the poll loop serves.
fn commit_async(consumer: &BaseConsumer<Context>, offsets: &TopicPartitionList) -> KafkaResult<()> {
    use rdkafka::bindings as rd;
    let rk = consumer.client().native_ptr();
    // SAFETY: `rk` and `offsets` outlive the call; librdkafka copies the
    // offsets. The queue reference from `rd_kafka_queue_get_consumer` is ours
    // and released right after; the pending reply keeps its own reference.
    let err = unsafe {
        let queue = rd::rd_kafka_queue_get_consumer(rk);
        if queue.is_null() {
            return consumer.commit(offsets, CommitMode::Async);
        }
        let err = rd::rd_kafka_commit_queue(rk, offsets.ptr(), queue, None, std::ptr::null_mut());
        rd::rd_kafka_queue_destroy(queue);
        err
    };
    if err.is_error() {
        Err(KafkaError::ConsumerCommit(err.into()))
    } else {
        Ok(())
    }
}

/// Hands records to their partitions' tasks; pauses a partition whose
/// task's backlog is past a bound.
fn route(consumer: &BaseConsumer<Context>, batch: Vec<(i32, InputRecord)>, topic: &str) {
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
        task.handle.backlog.handed(&records);
        if task.handle.records.send(records).is_err() {
            continue; // the task is closing; its events stay uncommitted
        }
        let backlog = task.handle.backlog.size();
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

fn max_held_bytes(consumer: &BaseConsumer<Context>) -> usize {
    consumer
        .context()
        .shared
        .settings
        .singleflight
        .max_held_bytes
}

/// Resumes paused partitions whose tasks have processed half their backlog;
/// true if some partition stays paused.
fn resume_ready(consumer: &BaseConsumer<Context>, topic: &str) -> bool {
    let max_bytes = max_held_bytes(consumer);
    let mut assigned = consumer.context().assigned.lock().expect("assignment lock");
    let mut still_paused = false;
    for (partition, task) in assigned.iter_mut().filter(|(_, t)| t.paused) {
        if !resumable(task.handle.backlog.size(), max_bytes) {
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
