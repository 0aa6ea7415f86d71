//! The async shell of a partition task: it opens and restores the store,
//! then feeds the [`TaskCore`] what happens (records, push, changelog and
//! dead-letter outcomes, timers, the close request) and carries out the
//! actions the core asks for, in order, before the next input.
//!
//! Records are produced when the core asks, not in a task of their own:
//! the changelog keeps the order of a key's markers (its compaction keeps
//! the last one), and a delivery costs no tokio task. The shell awaits the
//! deliveries itself (push and dead-letter outcomes in any order, changelog
//! acknowledgements oldest first: they all go to one partition).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn, Instrument};

use crate::codec::Codec;
use crate::config::{ProcessingGuarantee, Settings};
use crate::engine::{Push, TableConfig};
use crate::internal_events::{CompensationScanned, PartitionRestored, TransactionEnded};
use crate::kafka::{headers, send_waiting, transactions};
use crate::metrics::Metrics;
use crate::processor::restore;
use crate::sink::{HttpSink, Sink};
use crate::state::{claim, Store};

use super::core::{
    Action, CoreConfig, DeadLetter, Flight, OtherRecord, ProduceError, TaskCore, Timer,
    CHANGELOG_EVERY,
};
use super::{Backlog, Close, InputRecord, TaskInput};

/// What every partition task of a member uses.
pub struct TaskResources {
    pub settings: Settings,
    pub producer: FutureProducer,
    /// Where pushes go (the producer writes everything else).
    pub sink: Sink,
    pub codec: Arc<Codec>,
    pub changelog: String,
    /// Commit requests to the poll thread: (partition, offset).
    pub commits: std::sync::mpsc::Sender<(i32, i64)>,
    /// Positions an exactly-once transaction committed, for the poll
    /// thread's record of committed offsets (lag, metrics).
    pub committed_in_transactions: std::sync::mpsc::Sender<(i32, i64)>,
    /// A partition task that cannot go on reports here; the process stops
    /// with an error rather than hold a partition it does not process.
    pub failures: std::sync::mpsc::Sender<String>,
    pub metrics: Arc<Metrics>,
    /// The largest value a dead letter carries whole (see
    /// [`crate::kafka::limits`]): the producer's limit until the topics'
    /// are read.
    pub dead_letter_max_value: std::sync::atomic::AtomicUsize,
    /// One lock per partition's store, held by its task from before it
    /// opens the store until the store is dropped: a task that outlives
    /// its close (a restore finishing its current read) makes the next
    /// task of the partition wait, not fail on RocksDB's lock.
    pub store_locks: StoreLocks,
    /// The consumer's group membership (member id, generation) as of the
    /// last rebalance: exactly-once transactions commit input offsets under
    /// it, so that a member the group has moved on from cannot commit.
    pub group_metadata: std::sync::Mutex<Option<Arc<ConsumerGroupMetadata>>>,
}

impl TaskResources {
    pub fn set_group_metadata(&self, metadata: Option<ConsumerGroupMetadata>) {
        *self
            .group_metadata
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = metadata.map(Arc::new);
    }

    fn group_metadata(&self) -> Option<Arc<ConsumerGroupMetadata>> {
        self.group_metadata
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn exactly_once(&self) -> bool {
        self.settings.processing_guarantee == ProcessingGuarantee::ExactlyOnce
    }
}

/// The locks of the partitions' stores (see [`TaskResources::store_locks`]).
#[derive(Default)]
pub struct StoreLocks(
    std::sync::Mutex<std::collections::HashMap<i32, Arc<tokio::sync::Mutex<()>>>>,
);

impl StoreLocks {
    /// Waits until no other task of `partition` holds its store.
    async fn acquire(&self, partition: i32) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(partition)
            .or_default()
            .clone();
        lock.lock_owned().await
    }
}

/// How often a commit also checkpoints the store (revoke and shutdown always do).
const CHECKPOINT_EVERY: Duration = Duration::from_secs(30);

/// Starts the task of one assigned partition on `runtime`.
pub fn spawn(
    resources: Arc<TaskResources>,
    runtime: &tokio::runtime::Handle,
    topic: String,
    partition: i32,
) -> TaskInput {
    let (records_tx, records) = mpsc::unbounded_channel();
    let backlog = Arc::new(Backlog::default());
    let (close_tx, close) = oneshot::channel();
    let (commit_failures_tx, commit_failures) = mpsc::unbounded_channel();
    let pipe = Pipe {
        records,
        backlog: backlog.clone(),
        commit_failures,
    };
    let span = tracing::info_span!("partition", topic = %topic, partition);
    runtime.spawn(
        async move {
            let failures = resources.failures.clone();
            if let Err(error) = run(resources, topic.clone(), partition, pipe, close).await {
                tracing::error!("partition task failed: {error}");
                let _ = failures.send(format!("partition {topic}[{partition}]: {error}"));
            }
        }
        .instrument(span),
    );
    TaskInput {
        records: records_tx,
        backlog,
        close: close_tx,
        commit_failures: commit_failures_tx,
    }
}

/// The task's end of its [`TaskInput`].
struct Pipe {
    records: mpsc::UnboundedReceiver<Vec<InputRecord>>,
    backlog: Arc<Backlog>,
    commit_failures: mpsc::UnboundedReceiver<i64>,
}

/// A push on its way (produced, or waiting out a retry's backoff),
/// resolving to its outcome and its time from produce to outcome.
type PushInFlight =
    Pin<Box<dyn Future<Output = (Flight, Result<(), ProduceError>, Duration)> + Send>>;

/// A dead letter on its way, resolving to its id and outcome.
type DeadLetterInFlight = Pin<Box<dyn Future<Output = (u64, Result<(), ProduceError>)> + Send>>;

/// The shell's side of a running task: the core, and the deliveries it
/// awaits on the core's behalf.
struct Shell {
    resources: Arc<TaskResources>,
    topic: String,
    partition: i32,
    core: TaskCore<Store>,
    /// The member's producer, or under exactly-once the partition's own
    /// transactional one.
    producer: FutureProducer,
    /// Under exactly-once: what the open transaction commits with it.
    transaction: Option<Transaction>,
    pushes: FuturesUnordered<PushInFlight>,
    dead_letters: FuturesUnordered<DeadLetterInFlight>,
    /// Changelog writes not yet acknowledged, oldest first: the delivery,
    /// or why the producer refused the record.
    changelog_writes: VecDeque<Result<DeliveryFuture, ProduceError>>,
    /// Where the final position goes once the core has closed.
    reply: Option<std::sync::mpsc::Sender<Option<i64>>>,
    /// The offset of the task's claim in the changelog (`None` under
    /// exactly-once), and as its marker records carry it.
    claim: Option<i64>,
    owner_header: Option<String>,
    /// Reads of another writer's changelog records (see
    /// [`Action::ReadChangelog`]).
    changelog_reads: FuturesUnordered<ChangelogRead>,
}

/// A read of another writer's changelog records, on a blocking thread.
type ChangelogRead = Pin<Box<dyn Future<Output = Result<Vec<OtherRecord>, String>> + Send>>;

/// Under exactly-once, what waits for the open transaction's commit: the
/// input position it commits, and the checkpoint that may claim its
/// changelog records only once they are committed (an aborted transaction
/// takes them back).
#[derive(Default)]
struct Transaction {
    position: Option<i64>,
    checkpoint: Option<i64>,
}

async fn run(
    resources: Arc<TaskResources>,
    topic: String,
    partition: i32,
    mut pipe: Pipe,
    mut close: oneshot::Receiver<Close>,
) -> Result<(), String> {
    let settings = &resources.settings;
    let dir = Store::dir(
        &settings.state_dir,
        &settings.application_id,
        &topic,
        partition,
    );
    // A close before the task is running is answered at once (nothing to
    // commit), so that it never holds up a rebalance.
    let _store_lock = tokio::select! {
        guard = resources.store_locks.acquire(partition) => guard,
        closing = &mut close => {
            answer(closing.ok());
            return Ok(());
        }
    };
    // Under exactly-once, the partition's transactions start before its
    // restore: initialising them fences the previous owner and aborts its
    // open transaction, so the restore (reading committed records only)
    // sees all that will ever count and the previous owner adds nothing.
    let producer = if resources.exactly_once() {
        let starting = {
            let (settings, topic) = (resources.settings.clone(), topic.clone());
            tokio::task::spawn_blocking(move || transactions::start(&settings, &topic, partition))
        };
        tokio::select! {
            started = starting => started
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("cannot start the partition's transactions (processing_guarantee = \"exactly-once\"): {e}"))?,
            closing = &mut close => {
                answer(closing.ok());
                return Ok(());
            }
        }
    } else {
        resources.producer.clone()
    };
    let (store, opened) = Store::open(&dir).map_err(|e| e.to_string())?;
    let started = Instant::now();
    // Under at-least-once the task claims the partition in the changelog
    // and restores through its claim: whatever an earlier owner wrote
    // before it counts, and what one writes after it does not (see
    // `state::claim`). Exactly-once fences earlier owners instead.
    let claim = match resources.exactly_once() {
        true => None,
        false => tokio::select! {
            claimed = claim_partition(&resources, partition) => Some(claimed?),
            closing = &mut close => {
                answer(closing.ok());
                return Ok(());
            }
        },
    };
    let cancelled = Arc::new(AtomicBool::new(false));
    let restoring = {
        let (resources, cancelled) = (resources.clone(), cancelled.clone());
        tokio::task::spawn_blocking(move || {
            // Asked over the producer's open connections: a partition whose
            // store is complete then needs no reader of its own (on a
            // rebalance, one per assigned partition, each connecting). On
            // failure the restore's own reader asks, and reports the error.
            let watermarks = resources
                .producer
                .client()
                .fetch_watermarks(&resources.changelog, partition, restore::WATERMARKS_TIMEOUT)
                .ok()
                .map(|(low, high)| (low, claim.map_or(high, |claim| claim + 1)));
            let result = restore::restore(
                &resources.settings,
                &resources.changelog,
                partition,
                &store,
                opened,
                watermarks,
                &resources.metrics.partition(partition),
                &cancelled,
                &mut |_, _| {},
            );
            (store, result)
        })
    };
    tokio::pin!(restoring);
    let (store, restored) = tokio::select! {
        done = &mut restoring => done.map_err(|e| e.to_string())?,
        closing = &mut close => {
            cancelled.store(true, Ordering::Relaxed);
            answer(closing.ok());
            // The store and its lock go once the restore stops (at its
            // next record).
            let _ = restoring.await;
            return Ok(());
        }
    };
    let restored = restored.map_err(|e| e.to_string())?;
    let metrics = resources.metrics.partition(partition);
    metrics.emit(PartitionRestored {
        topic: &topic,
        records: restored.records,
        open_markers: store.open_count().unwrap_or(0),
        from: opened,
        elapsed: started.elapsed(),
    });

    let config = CoreConfig {
        partition,
        table: TableConfig {
            policy: settings.singleflight.merge_policy,
            max_active_keys: settings.singleflight.max_active_keys,
            windows: settings.singleflight.windows(),
            digests: settings.singleflight.skip_unchanged,
            cached_keys: settings.state.cached_keys,
        },
        compensation_grace: settings.compensation.grace,
        checkpoint_every: CHECKPOINT_EVERY,
        retry_backoff: settings.push.retry_backoff,
        max_retry_backoff: settings.push.max_retry_backoff,
        give_up_after: settings.push.give_up_after,
        dead_letter_max_value: resources
            .dead_letter_max_value
            .load(std::sync::atomic::Ordering::Relaxed),
        delete_retention: settings.deletes.retention,
        state_ttl: settings.state.ttl,
        // Beyond the sink's slots a push would wait with its value fixed;
        // unstarted it takes in what its key gets meanwhile.
        max_pushes_in_flight: match resources.sink {
            Sink::Kafka => usize::MAX,
            Sink::Http { .. } => settings.sink.http.max_in_flight,
        },
    };
    let mut core = TaskCore::new(
        config,
        resources.codec.clone(),
        store,
        restored.next_offset,
        metrics,
        now_ns(),
    );
    if let Some(claim) = claim {
        core.claimed(claim);
    }
    core.rewrite_shadowed(restored.shadowed);
    let mut shell = Shell {
        transaction: resources.exactly_once().then(Transaction::default),
        resources: resources.clone(),
        topic,
        partition,
        core,
        producer,
        pushes: FuturesUnordered::new(),
        dead_letters: FuturesUnordered::new(),
        changelog_writes: VecDeque::new(),
        reply: None,
        claim,
        owner_header: claim.map(claim::owner_header),
        changelog_reads: FuturesUnordered::new(),
    };
    // The scan's duration is the shell's to measure (the core has no clock).
    let scan_metrics = resources.metrics.partition(partition);
    let mut commit_tick = tokio::time::interval(settings.commit_interval);
    let mut compensation_tick = tokio::time::interval(settings.compensation.interval);
    let mut changelog_tick = tokio::time::interval(CHANGELOG_EVERY);
    compensation_tick.tick().await; // the first tick is immediate; skip it

    let mut commit_due = false;
    loop {
        let wake = shell.core.next_wake();
        let wake_in = Duration::from_nanos(wake.unwrap_or(0).saturating_sub(now_ns()));
        let closing = tokio::select! {
            biased;
            closing = &mut close => Some(closing.ok()),
            Some((flight, outcome, latency)) = shell.pushes.next(), if !shell.pushes.is_empty() => {
                let now = now_ns();
                shell.core.push_done(now, flight, outcome, latency);
                // Answers that came meanwhile join this turn.
                while let Some(Some((flight, outcome, latency))) = shell.pushes.next().now_or_never() {
                    shell.core.push_done(now, flight, outcome, latency);
                }
                None
            }
            acked = front_acknowledged(&mut shell.changelog_writes), if !shell.changelog_writes.is_empty() => {
                let now = now_ns();
                shell.changelog_writes.pop_front();
                shell.core.changelog_done(now, acked);
                // The producer acknowledges in batches: the rest of the
                // batch joins this turn.
                while let Some(acked) = front_acknowledged(&mut shell.changelog_writes).now_or_never() {
                    shell.changelog_writes.pop_front();
                    shell.core.changelog_done(now, acked);
                }
                None
            }
            Some((id, outcome)) = shell.dead_letters.next(), if !shell.dead_letters.is_empty() => {
                shell.core.dead_letter_done(now_ns(), id, outcome);
                None
            }
            Some(read) = shell.changelog_reads.next(), if !shell.changelog_reads.is_empty() => {
                match read {
                    Ok(records) => shell.core.changelog_read(records),
                    // Unread, they keep the task from checkpointing.
                    Err(e) => warn!(partition, "cannot read another writer's records in the changelog: {e}"),
                }
                None
            }
            Some(position) = pipe.commit_failures.recv() => {
                shell.core.commit_failed(position);
                None
            }
            _ = commit_tick.tick() => {
                shell.core.tick(now_ns(), Timer::Commit);
                commit_due = true;
                None
            }
            _ = changelog_tick.tick() => { shell.core.tick(now_ns(), Timer::ChangelogFlush); None }
            _ = tokio::time::sleep(wake_in), if wake.is_some() => { shell.core.tick(now_ns(), Timer::Wake); None }
            _ = compensation_tick.tick() => {
                let started = Instant::now();
                if let Some(scanned) = shell.core.tick(now_ns(), Timer::Compensation) {
                    scan_metrics.emit(CompensationScanned {
                        elapsed: started.elapsed(),
                        open_markers: scanned.open_markers,
                        repushed: scanned.repushed,
                    });
                }
                None
            }
            batch = pipe.records.recv(), if shell.core.wants_records() => match batch {
                Some(batch) => { shell.core.take_batch(batch); None }
                None => Some(None),
            },
        };
        shell.carry_out().await?;
        if std::mem::take(&mut commit_due) {
            shell.commit_transaction().await?;
        }
        match closing {
            Some(Some(Close { reply, lost: true })) => {
                // Another member may own the partition already: nothing
                // more of this task may reach the broker or the store.
                warn!(partition, "partition lost: dropped without pushes, markers, commit or checkpoint; the next owner replays from the last commit");
                shell.reply = Some(reply);
                shell.core.lose();
                return shell.carry_out().await; // its Closed(None) answers
            }
            Some(closing) => {
                shell.reply = closing.map(|c| c.reply);
                break;
            }
            None => {}
        }
        // Records that are already waiting join this turn, so the pushes it
        // starts (an acknowledgement's next push too) carry them.
        if shell.core.wants_records() {
            if let Ok(batch) = pipe.records.try_recv() {
                shell.core.take_batch(batch);
            }
        }
        let (records, bytes) = shell.core.end_turn(now_ns());
        if records > 0 {
            pipe.backlog.processed(records, bytes);
        }
        shell.carry_out().await?;
    }

    // Closing (revoke or shutdown): the core stops taking events, lets
    // pushes in flight finish (bounded here), flushes its markers, and
    // reports the position to commit.
    pipe.records.close();
    shell.core.close();
    shell.carry_out().await?;
    let deadline = tokio::time::Instant::now() + settings.shutdown_timeout;
    let mut timed_out = false;
    while !shell.core.is_closed() {
        tokio::select! {
            Some((flight, outcome, latency)) = shell.pushes.next(), if !shell.pushes.is_empty() => {
                shell.core.push_done(now_ns(), flight, outcome, latency);
            }
            Some((id, outcome)) = shell.dead_letters.next(), if !shell.dead_letters.is_empty() => {
                shell.core.dead_letter_done(now_ns(), id, outcome);
            }
            acked = front_acknowledged(&mut shell.changelog_writes), if !shell.changelog_writes.is_empty() => {
                shell.changelog_writes.pop_front();
                shell.core.changelog_done(now_ns(), acked);
            }
            _ = tokio::time::sleep_until(deadline), if !timed_out => {
                timed_out = true;
                shell.core.close_timed_out();
                shell.pushes.clear();
                shell.dead_letters.clear();
            }
            // Nothing left that could finish the close (the core waits only
            // on what the shell awaits, so this is a guard, not a path).
            else => break,
        }
        shell.carry_out().await?;
    }
    Ok(())
}

/// Answers a close that came before the core ran: nothing to commit.
fn answer(closing: Option<Close>) {
    if let Some(closing) = closing {
        let _ = closing.reply.send(None);
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Shell {
    /// Carries out every action the core asked for, in order; the core's
    /// failure is the task's.
    async fn carry_out(&mut self) -> Result<(), String> {
        while let Some(action) = self.core.poll_action() {
            match action {
                Action::Fail(reason) => return Err(reason),
                Action::Push { flight, delay } => self.push(flight, delay),
                Action::WriteChangelog { key, value, .. } => {
                    let mut record = FutureRecord::to(&self.resources.changelog)
                        .key(key.as_ref())
                        .partition(self.partition);
                    if let Some(owner) = &self.owner_header {
                        record = record.headers(OwnedHeaders::new().insert(Header {
                            key: claim::OWNER_HEADER,
                            value: Some(owner),
                        }));
                    }
                    if let Some(value) = value.as_deref() {
                        record = record.payload(value);
                    }
                    let delivery = produce_now(&self.producer, record);
                    self.changelog_writes.push_back(delivery);
                }
                Action::DeadLetter { letter, delay } => self.dead_letter(letter, delay),
                Action::ReadChangelog { from, to } => {
                    let (resources, partition) = (self.resources.clone(), self.partition);
                    let read = tokio::task::spawn_blocking(move || {
                        restore::read_others(
                            &resources.settings,
                            &resources.changelog,
                            partition,
                            from,
                            to,
                        )
                    });
                    self.changelog_reads.push(Box::pin(async move {
                        read.await.map_err(|e| e.to_string())?
                    }));
                }
                Action::Commit(position) => match &mut self.transaction {
                    Some(transaction) => transaction.position = Some(position),
                    None => {
                        let _ = self.resources.commits.send((self.partition, position));
                    }
                },
                Action::Checkpoint(next_offset) => match &mut self.transaction {
                    Some(transaction) => transaction.checkpoint = Some(next_offset),
                    None => self.checkpoint(next_offset),
                },
                Action::Closed(position) => {
                    info!(partition = self.partition, ?position, stats = ?self.core.stats(), "partition closed");
                    // Under exactly-once the position is committed by the
                    // last transaction, never by the member.
                    let (position, ended) = match self.transaction.is_some() {
                        true => (None, self.end_transactions(position).await),
                        false => (position, Ok(())),
                    };
                    if let Some(reply) = self.reply.take() {
                        let _ = reply.send(position);
                    }
                    ended?;
                }
            }
        }
        Ok(())
    }

    fn checkpoint(&self, next_offset: i64) {
        if let Err(e) = self.core.store().checkpoint(next_offset, self.claim) {
            warn!(
                partition = self.partition,
                "checkpoint failed (a restart restores in full): {e}"
            );
        }
    }

    /// Under exactly-once: commits the open transaction (every record
    /// produced so far, and the newest covered input position), then the
    /// checkpoint that waited for it, and begins the next. A transaction
    /// that cannot commit is aborted and the partition dropped as if lost:
    /// what this task holds in memory is now ahead of what counts.
    async fn commit_transaction(&mut self) -> Result<(), String> {
        let Some(transaction) = self.transaction.as_mut() else {
            return Ok(());
        };
        let group = self.resources.group_metadata();
        // Offsets go with the member's current generation, once it has one.
        let position = group.as_ref().and(transaction.position.take());
        let (producer, topic, partition) =
            (self.producer.clone(), self.topic.clone(), self.partition);
        let committed = tokio::task::spawn_blocking(move || {
            transactions::commit(&producer, (&topic, partition), position, group.as_deref())
        })
        .await
        .map_err(|e| e.to_string())?;
        match committed {
            Ok(()) => {
                self.resources.metrics.emit(TransactionEnded {
                    partition: self.partition,
                    committed: true,
                });
                if let Some(position) = position {
                    let _ = self
                        .resources
                        .committed_in_transactions
                        .send((self.partition, position));
                }
                let checkpoint = self.transaction.as_mut().and_then(|t| t.checkpoint.take());
                if let Some(next_offset) = checkpoint {
                    self.checkpoint(next_offset);
                }
                Ok(())
            }
            Err(e) => Err(self.drop_transactions(&e).await),
        }
    }

    /// Under exactly-once, at the close: the last transaction commits with
    /// the final position, or, with none (a lost partition, a failed
    /// flush), is aborted.
    async fn end_transactions(&mut self, position: Option<i64>) -> Result<(), String> {
        match position {
            Some(position) => {
                if let Some(transaction) = self.transaction.as_mut() {
                    transaction.position = Some(position);
                }
                self.commit_transaction().await
            }
            None => {
                self.transaction = None;
                self.abort().await;
                Ok(())
            }
        }
    }

    /// Nothing more of the open transaction may reach the broker: its
    /// queue is dropped, and what was sent is aborted (by this producer,
    /// or, if it was fenced, by the next owner's initialisation).
    async fn abort(&mut self) {
        let producer = self.producer.clone();
        let _ = tokio::task::spawn_blocking(move || {
            producer.purge(rdkafka::producer::PurgeConfig::default().queue());
            transactions::abort(&producer)
        })
        .await;
        self.resources.metrics.emit(TransactionEnded {
            partition: self.partition,
            committed: false,
        });
    }

    /// A transaction failed: aborts it, drops the partition like a lost one
    /// (nothing more is produced, committed or checkpointed), and says why.
    async fn drop_transactions(&mut self, error: &rdkafka::error::KafkaError) -> String {
        self.transaction = None;
        self.core.lose();
        while let Some(action) = self.core.poll_action() {
            if let (Action::Closed(_), Some(reply)) = (action, self.reply.take()) {
                let _ = reply.send(None);
            }
        }
        self.abort().await;
        let id =
            transactions::transactional_id(&self.resources.settings, &self.topic, self.partition);
        if transactions::is_fenced(error) {
            format!(
                "fenced: another instance took the partition over (it initialised transactional id \
                 {id}); this one stops, and nothing it wrote since its last commit counts ({error})"
            )
        } else {
            format!(
                "transaction of {id} failed and was aborted; the partition is replayed from its \
                 last commit ({error})"
            )
        }
    }

    /// Produces a push (after `delay`, for retries).
    fn push(&mut self, flight: Flight, delay: Duration) {
        if let Sink::Http { client, audit } = &self.resources.sink {
            let call = http_push(
                client.clone(),
                audit.clone(),
                self.producer.clone(),
                flight,
                delay,
            );
            return self.pushes.push(Box::pin(call));
        }
        let topic = &self.resources.settings.topics.pushed;
        let in_flight: PushInFlight = if delay.is_zero() {
            let produced = Instant::now();
            let sent = produce_now(
                &self.producer,
                push_record(topic, &flight.push, flight.value.as_deref()),
            );
            Box::pin(delivery(flight, sent, produced))
        } else {
            let (producer, topic) = (self.producer.clone(), topic.clone());
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                let produced = Instant::now();
                let sent = produce_now(
                    &producer,
                    push_record(&topic, &flight.push, flight.value.as_deref()),
                );
                delivery(flight, sent, produced).await
            })
        };
        self.pushes.push(in_flight);
    }

    /// Produces a record unchanged to the dead-letter topic (after `delay`,
    /// for retries), with where it came from and why in its headers.
    fn dead_letter(&mut self, letter: DeadLetter, delay: Duration) {
        let producer = self.producer.clone();
        let topic = self.resources.settings.topics.dead_letter.clone();
        let source = self.topic.clone();
        let partition = self.partition;
        self.dead_letters.push(Box::pin(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let (partition, offset) = (partition.to_string(), letter.record.offset.to_string());
            let mut headers = OwnedHeaders::new_with_capacity(8)
                .insert(Header {
                    key: headers::ERROR,
                    value: Some(&letter.detail),
                })
                .insert(Header {
                    key: headers::ERROR_REASON,
                    value: Some(letter.reason),
                })
                .insert(Header {
                    key: headers::SOURCE_TOPIC,
                    value: Some(&source),
                })
                .insert(Header {
                    key: headers::SOURCE_PARTITION,
                    value: Some(&partition),
                });
            // A refused push stands for events, not one record.
            if letter.record.offset >= 0 {
                headers = headers.insert(Header {
                    key: headers::SOURCE_OFFSET,
                    value: Some(&offset),
                });
            }
            let version = letter.version.map(|v| v.to_string());
            if let Some(version) = &version {
                headers = headers.insert(Header {
                    key: headers::VERSION,
                    value: Some(version),
                });
            }
            let status = letter.answer.as_ref().map(|a| a.status.to_string());
            if let (Some(status), Some(answer)) = (&status, &letter.answer) {
                headers = headers
                    .insert(Header {
                        key: headers::HTTP_STATUS,
                        value: Some(status),
                    })
                    .insert(Header {
                        key: headers::HTTP_BODY,
                        value: Some(&answer.excerpt),
                    });
            }
            let mut value = letter.record.payload.as_deref();
            let original_size = value.map_or(0, <[u8]>::len).to_string();
            if let (Some(cut_to), Some(whole)) = (letter.cut_to, value) {
                if whole.len() > cut_to {
                    value = Some(&whole[..cut_to]);
                    headers = headers.insert(Header {
                        key: headers::VALUE_CUT_FROM,
                        value: Some(&original_size),
                    });
                }
            }
            let mut out = FutureRecord::to(&topic).headers(headers);
            if let Some(key) = letter.record.key.as_deref() {
                out = out.key(key);
            }
            if let Some(value) = value {
                out = out.payload(value);
            }
            let outcome = match producer.send(out, Timeout::Never).await {
                Ok(_) => Ok(()),
                Err((e, _)) => Err(produce_error(&e)),
            };
            (letter.id, outcome)
        }));
    }
}

/// Calls the HTTP sink with a push (after `delay`, for retries); with an
/// audit topic, an answered push counts once the topic has it too (if it
/// does not, the call is repeated: the endpoint sees the same
/// Idempotency-Key again).
async fn http_push(
    client: Arc<HttpSink>,
    audit: Option<String>,
    producer: FutureProducer,
    flight: Flight,
    delay: Duration,
) -> (Flight, Result<(), ProduceError>, Duration) {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let started = Instant::now();
    let mut outcome = client.call(&flight.push, flight.value.clone()).await;
    if let (Ok(()), Some(topic)) = (&outcome, &audit) {
        let record = push_record(topic, &flight.push, flight.value.as_deref());
        outcome = delivered(produce_now(&producer, record))
            .await
            .map_err(|e| {
                ProduceError::Retriable(format!(
                    "the audit topic {topic} did not take the answered push: {e}"
                ))
            });
    }
    (flight, outcome, started.elapsed())
}

/// Writes a claim of the partition to the changelog until one lands, and
/// returns its offset: the task's owner id (see [`claim`]).
async fn claim_partition(resources: &TaskResources, partition: i32) -> Result<i64, String> {
    let changelog = &resources.changelog;
    loop {
        let now = now_ns();
        let key = claim::claim_key(now);
        let value = format!(
            r#"{{"application_id":"{}","pid":{},"at_ns":{now}}}"#,
            resources.settings.application_id,
            std::process::id()
        );
        let record = FutureRecord::to(changelog)
            .key(&key[..])
            .payload(value.as_bytes())
            .partition(partition)
            .headers(OwnedHeaders::new().insert(Header {
                key: claim::CLAIM_HEADER,
                value: Some("claim"),
            }));
        #[allow(clippy::result_large_err)] // rust-rdkafka hands the record back
        let sent = send_waiting(record, |r| resources.producer.send_result(r));
        let error = match sent {
            Ok(delivery) => match delivery.await {
                Ok(Ok(delivered)) => return Ok(delivered.offset),
                Ok(Err((e, _))) => e,
                Err(_) => rdkafka::error::KafkaError::Canceled,
            },
            Err(e) => e,
        };
        // A changelog that does not exist stops the task, as its restore
        // would; anything else retriable is waited out.
        use rdkafka::types::RDKafkaErrorCode as Code;
        let missing = matches!(
            error.rdkafka_error_code(),
            Some(Code::UnknownTopicOrPartition | Code::UnknownTopic | Code::UnknownPartition)
        );
        match produce_error(&error) {
            ProduceError::Retriable(e) if !missing => {
                warn!(
                    partition,
                    "cannot claim the partition in {changelog} yet, retrying: {e}"
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            _ => {
                return Err(format!(
                    "cannot claim the partition in {changelog}: {error}"
                ))
            }
        }
    }
}

/// The outcome of the oldest changelog write: its offset, or why it failed.
/// Cancel-safe: the write stays at the front until the caller pops it.
async fn front_acknowledged(
    writes: &mut VecDeque<Result<DeliveryFuture, ProduceError>>,
) -> Result<i64, ProduceError> {
    match writes.front_mut() {
        Some(Ok(delivery)) => acknowledged(delivery.await),
        Some(Err(refused)) => Err(refused.clone()),
        None => std::future::pending().await,
    }
}

/// Awaits a produced push's delivery.
async fn delivery(
    flight: Flight,
    sent: Result<DeliveryFuture, ProduceError>,
    produced: Instant,
) -> (Flight, Result<(), ProduceError>, Duration) {
    let outcome = delivered(sent).await;
    (flight, outcome, produced.elapsed())
}

/// Whether a record handed to the producer was delivered.
async fn delivered(sent: Result<DeliveryFuture, ProduceError>) -> Result<(), ProduceError> {
    acknowledged(sent?.await).map(drop)
}

/// A delivery's offset, or its error.
fn acknowledged(
    delivery: Result<rdkafka::producer::future_producer::OwnedDeliveryResult, impl Sized>,
) -> Result<i64, ProduceError> {
    match delivery {
        Ok(Ok(delivered)) => Ok(delivered.offset),
        Ok(Err((e, _))) => Err(produce_error(&e)),
        Err(_) => Err(ProduceError::Retriable(
            "the producer dropped the delivery report".into(),
        )),
    }
}

/// What a produce error means for the record: too large, refused for good,
/// or worth another attempt (everything else, including an unknown topic,
/// which may yet be created: the core's give-up bound covers it).
fn produce_error(error: &rdkafka::error::KafkaError) -> ProduceError {
    use rdkafka::types::RDKafkaErrorCode as Code;
    let message = error.to_string();
    match error.rdkafka_error_code() {
        Some(Code::MessageSizeTooLarge | Code::MessageBatchTooLarge) => {
            ProduceError::TooLarge(message)
        }
        Some(
            Code::InvalidMessageSize
            | Code::InvalidTopic
            | Code::InvalidRequiredAcks
            | Code::TopicAuthorizationFailed
            | Code::ClusterAuthorizationFailed
            | Code::TransactionalIdAuthorizationFailed
            | Code::InvalidTimestamp
            | Code::UnsupportedForMessageFormat
            | Code::PolicyViolation
            | Code::InvalidRecord
            | Code::InvalidArgument,
        ) => ProduceError::Refused(message),
        _ => ProduceError::Retriable(message),
    }
}

/// Hands a record to the producer now, so records leave in the order they
/// are written (a full queue is waited out: see [`send_waiting`]).
#[allow(clippy::result_large_err)] // rust-rdkafka hands the record back
fn produce_now(
    producer: &FutureProducer,
    record: FutureRecord<'_, [u8], [u8]>,
) -> Result<DeliveryFuture, ProduceError> {
    send_waiting(record, |r| producer.send_result(r)).map_err(|e| produce_error(&e))
}

/// A push as a record: the merged value, keyflight's metadata in headers.
fn push_record<'a>(
    topic: &'a str,
    push: &'a Push,
    value: Option<&'a [u8]>,
) -> FutureRecord<'a, [u8], [u8]> {
    let (mut version, mut tn, mut merged) = (
        itoa::Buffer::new(),
        itoa::Buffer::new(),
        itoa::Buffer::new(),
    );
    let headers = OwnedHeaders::new_with_capacity(4)
        .insert(Header {
            key: headers::VERSION,
            value: Some(version.format(push.version)),
        })
        .insert(Header {
            key: headers::TN,
            value: Some(tn.format(push.tn)),
        })
        .insert(Header {
            key: headers::MERGED,
            value: Some(merged.format(push.merged)),
        })
        .insert(Header {
            key: headers::COMPENSATION,
            value: Some(if push.compensation { "true" } else { "false" }),
        });
    let mut record = FutureRecord::to(topic)
        .key(push.key.as_ref())
        .headers(headers);
    if let Some(value) = value {
        record = record.payload(value);
    }
    record
}
