//! `keyflight run`: the consumer-group member.
//!
//! One OS thread (the poll thread) owns the consumer. librdkafka runs the
//! rebalance callbacks on it, so a revoke can block there, bounded, while
//! the revoked partitions finish their pushes, commit and checkpoint, before
//! the group hands them to another member. The poll thread routes records to
//! one tokio task per assigned partition ([`super::task`]) and performs
//! the commits those tasks ask for.
//!
//! Records reach the tasks through the `Router` (`super::router`), which also pauses a
//! partition whose task has fallen behind.
//!
//! Records are taken from a fetch queue of keyflight's own, many per call
//! (`FetchQueue`); the consumer queue keeps the events (rebalances, commit
//! results, errors) that rust-rdkafka's `poll` serves.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::producer::Producer;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use tracing::{debug, info, warn};

use super::router::Router;
use super::task::shell::TaskResources;
use super::task::{self, InputRecord};
use crate::config::Settings;
use crate::internal_events::{LagSampled, OffsetsCommitted, PartitionsAssigned, PartitionsRevoked};
use crate::kafka::ffi::{self, FetchQueue};
use crate::kafka::limits::Limits;
use crate::kafka::{client_config, Role};
use crate::metrics::Metrics;
use crate::sink::Sink;

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
    #[error(transparent)]
    Limits(#[from] crate::kafka::limits::LimitsError),
    /// The sink's configuration cannot work (a header's variable unset, an
    /// unreadable CA file).
    #[error("{0}")]
    Sink(String),
}

/// The consumer's context: rebalance callbacks start and stop partition tasks.
struct GroupMember {
    resources: Arc<TaskResources>,
    runtime: tokio::runtime::Handle,
    router: Router,
    /// The offsets this member last committed, per partition (for the lag).
    committed: Mutex<HashMap<i32, i64>>,
    fetch: FetchQueue,
}

impl ClientContext for GroupMember {}

impl ConsumerContext for GroupMember {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.resources.set_group_metadata(consumer.group_metadata());
        match rebalance {
            Rebalance::Revoke(list) => {
                let partitions: Vec<i32> = list.elements().iter().map(|e| e.partition()).collect();
                // rust-rdkafka reports a lost assignment as a revoke.
                let lost = consumer.assignment_lost();
                self.close(consumer, &partitions, lost);
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

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        // The generation the tasks' transactions commit offsets under.
        self.resources.set_group_metadata(consumer.group_metadata());
        match rebalance {
            Rebalance::Assign(list) => {
                let partitions: Vec<i32> = list.elements().iter().map(|e| e.partition()).collect();
                let topic = &self.resources.settings.topics.input;
                let new = self.router.assign(&partitions, |partition| {
                    task::spawn(
                        self.resources.clone(),
                        &self.runtime,
                        topic.clone(),
                        partition,
                    )
                });
                self.resources.metrics.emit(PartitionsAssigned(&new));
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => warn!("rebalance error: {e}"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        // A partition's commit went through if the request did and its own
        // entry carries no error; a task whose commit did not asks again.
        let mut done = Vec::new();
        for element in offsets.elements() {
            let Some(offset) = element.offset().to_raw() else {
                continue;
            };
            match result.as_ref().and(element.error().as_ref()) {
                Ok(()) => done.push((element.partition(), offset)),
                Err(e) => {
                    debug!(
                        partition = element.partition(),
                        offset, "commit not acknowledged (asked again at the next interval): {e}"
                    );
                    self.router.commit_failed(element.partition(), offset);
                }
            }
        }
        self.record_committed(&done);
    }
}

impl GroupMember {
    /// Records offsets the group now has committed, by the member or by an
    /// exactly-once transaction (for the lag and the metrics).
    fn record_committed(&self, done: &[(i32, i64)]) {
        if done.is_empty() {
            return;
        }
        self.committed
            .lock()
            .expect("committed lock")
            .extend(done.iter().copied());
        self.resources.metrics.emit(OffsetsCommitted(done));
    }

    /// Forwards every assigned partition to the fetch queue again (see
    /// [`FetchQueue`]).
    fn reforward(&self, consumer: &BaseConsumer<GroupMember>) {
        let topic = &self.resources.settings.topics.input;
        for partition in self.router.partitions() {
            self.fetch.forward(consumer, topic, partition);
        }
    }

    /// Stops the tasks of `partitions`, all at once and bounded as a whole
    /// by the shutdown timeout, then commits their final positions
    /// synchronously. Lost partitions (`lost`) are dropped at once, with
    /// nothing committed.
    fn close(&self, consumer: &BaseConsumer<Self>, partitions: &[i32], lost: bool) {
        let closing = self.router.revoke(partitions);
        let revoked: Vec<i32> = closing.iter().map(|(p, _)| *p).collect();
        if lost && !revoked.is_empty() {
            warn!(partitions = ?revoked, "assignment lost (session expired?): dropping the partitions without a commit");
        }
        let mut waiting = Vec::new();
        for (partition, task) in closing {
            let (reply, rx) = std::sync::mpsc::channel();
            if task.close.send(task::Close { reply, lost }).is_ok() {
                waiting.push((partition, rx));
            }
        }
        let deadline =
            Instant::now() + self.resources.settings.shutdown_timeout + Duration::from_secs(5);
        let mut offsets = TopicPartitionList::new();
        for (partition, rx) in waiting {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
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

/// The group member's consumer: the client's configuration, the
/// assignment strategy (unless `[kafka.consumer]` names one) and static
/// membership.
fn group_config(settings: &Settings) -> rdkafka::ClientConfig {
    let mut config = client_config(settings, Role::Consumer);
    if config.get("partition.assignment.strategy").is_none() {
        config.set(
            "partition.assignment.strategy",
            settings.group.assignment.strategy(),
        );
    }
    if !settings.group.instance_id.is_empty() {
        config.set("group.instance.id", &settings.group.instance_id);
    }
    // Records waiting in librdkafka's queues are memory the processor
    // cannot use yet: its tasks hold up to `max_held_bytes` each already.
    limit_prefetch(&mut config);
    config
}

/// The processor's prefetch, unless `[kafka.consumer]` sets it: 16 MiB or
/// 5 000 records a partition (librdkafka's defaults are 64 MiB and 100 000).
/// Fewer records cost drain rate, more cost memory (BENCHMARKS.md).
pub fn limit_prefetch(config: &mut rdkafka::ClientConfig) {
    crate::kafka::reader::limit_prefetch(config, 16 * 1024, 5_000);
}

/// Runs the processor until `stop` is set, then shuts down cleanly.
pub fn run(
    settings: Settings,
    metrics: Arc<Metrics>,
    runtime: tokio::runtime::Handle,
    stop: Arc<AtomicBool>,
) -> Result<(), RunError> {
    // The producer's limit at once; the topics' as the brokers answer
    // (some never do: the wait must not delay the start).
    let limits = Limits::of_producer(&settings);
    limits.check(&settings)?;
    let mut topic_limits = Some(runtime.spawn({
        let settings = settings.clone();
        async move { Limits::read(&settings, LIMITS_TIMEOUT).await }
    }));
    let producer = client_config(&settings, Role::Producer)
        .create()
        .map_err(|source| RunError::Client {
            role: "producer",
            source,
        })?;
    let sink = Sink::from_settings(&settings, metrics.clone()).map_err(RunError::Sink)?;
    let (commits, commit_requests) = std::sync::mpsc::channel();
    let (committed_in_transactions, transaction_commits) = std::sync::mpsc::channel();
    let (failures, failed) = std::sync::mpsc::channel();
    let resources = Arc::new(TaskResources {
        codec: Arc::new(settings.codec()),
        changelog: settings.changelog_topic(),
        producer,
        sink,
        commits,
        committed_in_transactions,
        failures,
        settings,
        metrics,
        dead_letter_max_value: AtomicUsize::new(limits.dead_letter_max_value()),
        store_locks: Default::default(),
        group_metadata: Default::default(),
    });
    let member = GroupMember {
        resources: resources.clone(),
        runtime,
        router: Router::new(
            resources.settings.topics.input.clone(),
            resources.settings.singleflight.max_held_bytes,
            resources.metrics.clone(),
        ),
        committed: Mutex::new(HashMap::new()),
        fetch: FetchQueue::default(),
    };
    let consumer: BaseConsumer<GroupMember> = group_config(&resources.settings)
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

    // Validated: not empty, no NUL.
    let delete_header = std::ffi::CString::new(resources.settings.deletes.version_header.as_str())
        .unwrap_or_default();
    let mut failure = None;
    let mut limits_refused = None;
    let mut lag_sampled = Instant::now();
    let mut reforwarded = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if let Ok(message) = failed.try_recv() {
            failure = Some(message);
            break;
        }
        if let Some(read) = topic_limits.take_if(|read| read.is_finished()) {
            let limits = consumer
                .context()
                .runtime
                .block_on(read)
                .unwrap_or_else(|_| Limits::of_producer(&resources.settings));
            resources
                .dead_letter_max_value
                .store(limits.dead_letter_max_value(), Ordering::Relaxed);
            if let Err(e) = limits.check(&resources.settings) {
                limits_refused = Some(e);
                break;
            }
        }
        commit_requested(&consumer, &commit_requests, &input);
        committed_in_transaction(&consumer, &transaction_commits);
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
                Some(Ok(message)) => stray.push((
                    message.partition(),
                    InputRecord::of(&message, &resources.settings.deletes.version_header),
                )),
                Some(Err(e)) => warn!("consumer error: {e}"),
                None => break,
            }
        }
        consumer.context().router.route(&consumer, stray);
        // While a partition is paused, wait briefly, to resume it as soon
        // as its task has room.
        let any_paused = consumer.context().router.resume_ready(&consumer);
        let timeout = Duration::from_millis(if any_paused { 5 } else { 100 });
        // Records come in batches (a fetch's worth): take what is ready and
        // route it under one lock, then do the housekeeping above again.
        let mut batch = Vec::new();
        consumer.context().fetch.take::<ROUTE_BATCH>(
            timeout,
            &delete_header,
            |partition, offset, key, value, header| {
                let record = InputRecord::copied(offset, key, value);
                batch.push((partition, record.with_delete_version(header)));
            },
        );
        consumer.context().router.route(&consumer, batch);
    }

    info!(
        failed = failure.is_some() || limits_refused.is_some(),
        "shutting down: finishing pushes in flight"
    );
    resources.metrics.health.stopping();
    let partitions = consumer.context().router.partitions();
    consumer.context().close(&consumer, &partitions, false);
    consumer.unsubscribe();
    consumer.context().fetch.close();
    let _ = resources.producer.flush(Duration::from_secs(5));
    info!("stopped");
    close_clients_within(TEARDOWN_LIMIT, move || drop((consumer, resources)));
    if let Some(refused) = limits_refused {
        return Err(RunError::Limits(refused));
    }
    match failure {
        Some(message) => Err(RunError::Partition(message)),
        None => Ok(()),
    }
}

/// Runs the clients' teardown (leaving the group, destroying the
/// librdkafka handles) on a thread of its own and waits for it at most
/// `limit`: everything is committed by then, and a teardown that hangs in
/// the client must not keep the process from exiting on a signal.
fn close_clients_within(limit: Duration, teardown: impl FnOnce() + Send + 'static) {
    let (done, finished) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("keyflight-teardown".into())
        .spawn(move || {
            teardown();
            let _ = done.send(());
        });
    if spawned.is_ok() && finished.recv_timeout(limit).is_err() {
        warn!(
            "the Kafka clients did not close within {}; exiting without them (everything was committed)",
            humantime::format_duration(limit)
        );
    }
}

/// How long the clients' teardown may take after everything is committed.
const TEARDOWN_LIMIT: Duration = Duration::from_secs(10);

/// Records taken from the fetch queue per call and routed per lock of the
/// assignment, at most.
const ROUTE_BATCH: usize = 512;

/// How long the start waits for the topics' size limits (a broker that
/// does not answer leaves them unknown, and the producer's limit decides).
const LIMITS_TIMEOUT: Duration = Duration::from_secs(5);

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
    let partitions = context.router.partitions();
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

/// Records the positions exactly-once transactions committed, as the
/// commit callback does for the member's own commits.
fn committed_in_transaction(
    consumer: &BaseConsumer<GroupMember>,
    committed: &std::sync::mpsc::Receiver<(i32, i64)>,
) {
    let context = consumer.context();
    // A revoked partition's last transaction may report after its revoke.
    let assigned = context.router.partitions();
    let done: Vec<(i32, i64)> = committed
        .try_iter()
        .filter(|(partition, _)| assigned.contains(partition))
        .collect();
    context.record_committed(&done);
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
    let router = &consumer.context().router;
    let mut offsets = TopicPartitionList::new();
    for (partition, offset) in latest {
        // A partition that moved to another member is that member's to commit.
        if router.holds(partition) {
            let _ = offsets.add_partition_offset(topic, partition, Offset::Offset(offset));
        }
    }
    if offsets.count() > 0 {
        if let Err(e) = ffi::commit_async(consumer, &offsets) {
            warn!("commit failed (asked again at the next interval): {e}");
            for (partition, offset) in positions(&offsets) {
                router.commit_failed(partition, offset);
            }
        }
    }
}
