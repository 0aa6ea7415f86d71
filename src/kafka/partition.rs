//! The task of one assigned partition: restore, then consume → decode →
//! table → push → mark, with compensation and commits on timers.
//!
//! Order of effects per push (the article's markT1 / push / markT2):
//! 1. markT1: the store gets `t1 = tn` with the push's version and value,
//!    and the changelog gets it within `CHANGELOG_EVERY` (100 ms);
//! 2. the push is produced to the output topic;
//! 3. on acknowledgement, markT2 (`t2 = tn`) and the table moves on: the next
//!    merged push of the key starts, or the key goes idle (a delete's state
//!    is removed).
//!
//! Commits follow the table's coverage and wait for the changelog records
//! written before them, so the next owner restores markers at least as new
//! as the offsets it starts from. The task never blocks on that wait: a
//! commit is held until the acknowledgements reach the write it was asked
//! after, while records keep flowing.
//!
//! The changelog gets a key's newest marker, not every marker: a key's
//! writes within `CHANGELOG_EVERY` become one record (a hot key's
//! markT1, markT2, next markT1 ... were a record each). Durability is
//! unchanged: a commit, a checkpoint and closing first hand every held
//! marker to the producer, and a commit waits for their acknowledgements,
//! so the next owner still restores markers at least as new as the offsets
//! it starts from; a crash replays from the last commit as before.
//!
//! Records are handed to the producer when they are written, not in a task
//! of their own: the changelog keeps the order of a key's markers (its
//! compaction keeps the last one), and a delivery costs no tokio task.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::Message;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tracing::{debug, info, warn, Instrument};

use crate::codec::Codec;
use crate::config::Settings;
use crate::engine::{Event, Offer, Push, Table, TableConfig};
use crate::internal_events::{
    ChangelogWritten, CompensationScanned, DeadLettered, EventMerged, KeysInFlight,
    PartitionRestored, PushAcknowledged, PushFailed, RecordReceived, StaleEventDropped,
};
use crate::metrics::{Metrics, PartitionMetrics};
use crate::state::{Marker, StateError, Store};

use super::commit_gate::CommitGate;
use super::restore;

/// What every partition task shares.
pub struct Shared {
    pub settings: Settings,
    pub producer: FutureProducer,
    pub codec: Codec,
    pub changelog: String,
    /// Commit requests to the poll thread: (partition, offset).
    pub commits: std::sync::mpsc::Sender<(i32, i64)>,
    /// A partition task that cannot go on reports here; the process stops
    /// with an error rather than hold a partition it does not process.
    pub failures: std::sync::mpsc::Sender<String>,
    pub metrics: Arc<Metrics>,
}

/// How the poll thread reaches a task.
pub struct TaskHandle {
    /// Records in the order of their offsets, in batches (one channel
    /// operation and one wake-up per batch, not per record). Unbounded: the
    /// poll thread bounds it by pausing the partition (see [`Backlog`]), so
    /// handing records over never waits.
    pub records: mpsc::UnboundedSender<Vec<InputRecord>>,
    pub backlog: Arc<Backlog>,
    /// Asks the task to stop; it answers with its final commit position.
    pub close: oneshot::Sender<std::sync::mpsc::Sender<Option<i64>>>,
}

/// Records handed to a task and not yet processed by it (in its channel or
/// its inbox), counted on both sides: the poll thread pauses the partition
/// when they pass a bound and resumes it once the task has processed half
/// of them.
#[derive(Default)]
pub struct Backlog {
    records: AtomicUsize,
    bytes: AtomicUsize,
}

impl Backlog {
    pub fn handed(&self, batch: &[InputRecord]) {
        self.records.fetch_add(batch.len(), Ordering::Relaxed);
        let bytes = batch.iter().map(InputRecord::bytes).sum();
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The task processed `records` records of `bytes` key and value bytes.
    fn processed(&self, records: usize, bytes: usize) {
        self.records.fetch_sub(records, Ordering::Relaxed);
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// (records, key and value bytes) waiting for the task.
    pub fn size(&self) -> (usize, usize) {
        (
            self.records.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }
}

/// An input record as its task needs it: no topic name or headers to copy
/// (rust-rdkafka's `OwnedMessage` copies both), key and value shared.
pub struct InputRecord {
    pub offset: i64,
    pub key: Option<Bytes>,
    pub payload: Option<Bytes>,
}

impl InputRecord {
    pub fn of(message: &impl Message) -> InputRecord {
        InputRecord::copied(message.offset(), message.key(), message.payload())
    }

    /// A record whose key and value are copied from the consumer's buffers,
    /// into one buffer they share: one allocation and one reference count
    /// per record, where two `Bytes::copy_from_slice` were two allocations,
    /// each promoted by a third and fourth when the task first clones them.
    pub fn copied(offset: i64, key: Option<&[u8]>, payload: Option<&[u8]>) -> InputRecord {
        let (key_len, payload_len) = (key.map_or(0, <[u8]>::len), payload.map_or(0, <[u8]>::len));
        let mut buffer = Vec::with_capacity(key_len + payload_len);
        buffer.extend_from_slice(key.unwrap_or_default());
        buffer.extend_from_slice(payload.unwrap_or_default());
        let buffer = Bytes::from(buffer);
        InputRecord {
            offset,
            key: key.map(|_| buffer.slice(..key_len)),
            payload: payload.map(|_| buffer.slice(key_len..)),
        }
    }

    /// What it weighs in a [`Backlog`]: its key and value bytes.
    pub fn bytes(&self) -> usize {
        self.key.as_ref().map_or(0, Bytes::len) + self.payload.as_ref().map_or(0, Bytes::len)
    }
}

/// How long a key's marker may wait in memory for a newer one before it is
/// written to the changelog (see the module docs).
const CHANGELOG_EVERY: Duration = Duration::from_millis(100);

/// How often a commit also checkpoints the store (revoke and shutdown always do).
const CHECKPOINT_EVERY: Duration = Duration::from_secs(30);

/// Delay before a failed push or dead letter is tried again.
const RETRY_BACKOFF: Duration = Duration::from_secs(1);

pub fn spawn(
    shared: Arc<Shared>,
    runtime: &tokio::runtime::Handle,
    topic: String,
    partition: i32,
) -> TaskHandle {
    let (records_tx, records) = mpsc::unbounded_channel();
    let backlog = Arc::new(Backlog::default());
    let (close_tx, close) = oneshot::channel();
    let feed = Feed {
        records,
        backlog: backlog.clone(),
    };
    let span = tracing::info_span!("partition", topic = %topic, partition);
    runtime.spawn(
        async move {
            let failures = shared.failures.clone();
            if let Err(error) = run(shared, topic.clone(), partition, feed, close).await {
                tracing::error!("partition task failed: {error}");
                let _ = failures.send(format!("partition {topic}[{partition}]: {error}"));
            }
        }
        .instrument(span),
    );
    TaskHandle {
        records: records_tx,
        backlog,
        close: close_tx,
    }
}

/// The task's end of its [`TaskHandle`].
struct Feed {
    records: mpsc::UnboundedReceiver<Vec<InputRecord>>,
    backlog: Arc<Backlog>,
}

/// Outcome of a push, once its delivery is known.
struct Delivered {
    push: Push,
    /// The marker markT1 wrote for this push. One push per key is in flight,
    /// so it is still the key's marker when the push is acknowledged.
    marker: Marker,
    ok: Result<(), String>,
    /// From produce to acknowledgement (or failure).
    latency: Duration,
}

/// A push on its way: produced (or waiting out a retry's backoff) and
/// resolving to its outcome.
type PushInFlight = Pin<Box<dyn Future<Output = Delivered> + Send>>;

/// A changelog record handed to the producer, not yet acknowledged.
struct ChangelogWrite {
    /// Position among the task's changelog writes (1, 2, ...).
    seq: u64,
    key: Bytes,
    /// The delivery, or why the producer refused the record.
    delivery: Result<DeliveryFuture, String>,
}

struct Task {
    shared: Arc<Shared>,
    topic: String,
    partition: i32,
    table: Table,
    store: Store,
    /// Records taken from the feed and not yet processed: a batch is taken
    /// whole, and processed while the table is not saturated. They still
    /// count in the [`Backlog`] until processed.
    inbox: std::vec::IntoIter<InputRecord>,
    backlog: Arc<Backlog>,
    /// Pushes started in this turn of the task's loop (by the inbox's
    /// events, or by an acknowledgement with events pending), produced at
    /// its end by [`Task::finish_turn`], so each carries everything the
    /// turn merged behind it.
    starting: Vec<Push>,
    pushes: FuturesUnordered<PushInFlight>,
    dead_letters: JoinSet<i64>,
    /// Markers written to the store and not yet to the changelog, the
    /// newest per key (`None`: a tombstone). Encoded only when logged: most
    /// are replaced before.
    unlogged: HashMap<Bytes, Option<Marker>, ahash::RandomState>,
    /// Changelog writes not yet acknowledged, oldest first. They all go to
    /// this task's changelog partition, so they are acknowledged in order.
    changelog_writes: VecDeque<ChangelogWrite>,
    /// `seq` of the newest changelog write.
    changelog_seq: u64,
    /// One past the newest acknowledged changelog offset (for checkpoints).
    changelog_next: i64,
    /// When the asked commit may go out (see [`CommitGate`]).
    commit_gate: CommitGate,
    committed: Option<i64>,
    /// When the store was last checkpointed (see [`CHECKPOINT_EVERY`]).
    checkpointed: Instant,
    /// The clock of this turn of the loop (ns since the epoch), read once
    /// when first needed (see [`Task::now`]).
    turn_clock: Option<u64>,
    metrics: PartitionMetrics,
}

async fn run(
    shared: Arc<Shared>,
    topic: String,
    partition: i32,
    mut feed: Feed,
    mut close: oneshot::Receiver<std::sync::mpsc::Sender<Option<i64>>>,
) -> Result<(), String> {
    let settings = &shared.settings;
    let dir = Store::dir(
        &settings.state_dir,
        &settings.application_id,
        &topic,
        partition,
    );
    let (store, opened) = Store::open(&dir).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let (store, restored) = {
        let shared = shared.clone();
        tokio::task::spawn_blocking(move || {
            // Asked over the producer's open connections: a partition whose
            // store is complete then needs no reader of its own (on a
            // rebalance, one per assigned partition, each connecting). On
            // failure the restore's own reader asks, and reports the error.
            let watermarks = shared
                .producer
                .client()
                .fetch_watermarks(&shared.changelog, partition, restore::WATERMARKS_TIMEOUT)
                .ok();
            let result = restore::restore(
                &shared.settings,
                &shared.changelog,
                partition,
                &store,
                opened,
                watermarks,
                &mut |_, _| {},
            );
            (store, result)
        })
        .await
        .map_err(|e| e.to_string())?
    };
    let restored = restored.map_err(|e| e.to_string())?;
    let metrics = shared.metrics.partition(partition);
    metrics.emit(PartitionRestored {
        topic: &topic,
        records: restored.records,
        open_markers: store.open_count().unwrap_or(0),
        from: opened,
        elapsed: started.elapsed(),
    });

    let mut task = Task {
        table: Table::new(TableConfig {
            policy: settings.singleflight.merge_policy,
            max_active_keys: settings.singleflight.max_active_keys,
        }),
        store,
        inbox: Vec::new().into_iter(),
        backlog: feed.backlog.clone(),
        starting: Vec::new(),
        pushes: FuturesUnordered::new(),
        dead_letters: JoinSet::new(),
        unlogged: HashMap::default(),
        changelog_writes: VecDeque::new(),
        changelog_seq: 0,
        changelog_next: restored.next_offset,
        commit_gate: CommitGate::default(),
        committed: None,
        checkpointed: Instant::now(),
        turn_clock: None,
        metrics,
        shared: shared.clone(),
        topic,
        partition,
    };
    let mut commit_tick = tokio::time::interval(settings.commit_interval);
    let mut compensation_tick = tokio::time::interval(settings.compensation.interval);
    let mut changelog_tick = tokio::time::interval(CHANGELOG_EVERY);
    compensation_tick.tick().await; // the first tick is immediate; skip it

    let reply = loop {
        tokio::select! {
            biased;
            reply = &mut close => break reply.ok(),
            Some(done) = task.pushes.next(), if !task.pushes.is_empty() => task.delivered(done),
            acked = front_acknowledged(&mut task.changelog_writes), if !task.changelog_writes.is_empty() => {
                task.changelog_acknowledged(acked);
            }
            Some(done) = task.dead_letters.join_next(), if !task.dead_letters.is_empty() => {
                if let Ok(offset) = done { task.table.release(offset); }
            }
            _ = commit_tick.tick() => task.commit(),
            _ = changelog_tick.tick() => task.log_markers(),
            _ = compensation_tick.tick() => task.compensate(),
            batch = feed.records.recv(), if task.wants_records() => match batch {
                Some(batch) => task.take(batch),
                None => break None,
            },
        }
        // Records that are already waiting join this turn, so the pushes it
        // starts (an acknowledgement's next push too) carry them.
        if task.wants_records() {
            if let Ok(batch) = feed.records.try_recv() {
                task.take(batch);
            }
        }
        task.finish_turn();
    };
    // Closing (revoke or shutdown): stop taking events, let pushes in flight
    // finish (bounded), commit what is covered, checkpoint.
    feed.records.close();
    let deadline = tokio::time::Instant::now() + settings.shutdown_timeout;
    while !task.pushes.is_empty() || !task.dead_letters.is_empty() {
        tokio::select! {
            Some(done) = task.pushes.next(), if !task.pushes.is_empty() => {
                // markT2 only for a push that landed; a failed one keeps its
                // marker open for compensation after the restart. No
                // follow-up pushes while closing: their events stay
                // uncommitted and are replayed by the next owner.
                if let Delivered { push, marker, ok: Ok(()), latency } = done {
                    task.acknowledge(push, marker, latency, false);
                }
            }
            Some(done) = task.dead_letters.join_next(), if !task.dead_letters.is_empty() => {
                if let Ok(offset) = done { task.table.release(offset); }
            }
            _ = tokio::time::sleep_until(deadline) => {
                warn!(partition = task.partition, pending = task.pushes.len(), "pushes still in flight at the shutdown timeout; their events will be replayed");
                break;
            }
        }
    }
    task.pushes.clear();
    task.log_markers();
    let position = task
        .flush_changelog()
        .await
        .then(|| task.table.commit_position())
        .flatten();
    if let Err(e) = task.store.checkpoint(task.changelog_next) {
        warn!(
            partition = task.partition,
            "checkpoint failed (next start restores fully): {e}"
        );
    }
    info!(partition = task.partition, ?position, stats = ?task.table.stats(), "partition closed");
    if let Some(reply) = reply {
        let _ = reply.send(position);
    }
    Ok(())
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Task {
    /// The clock for the table (tn, arrival of events): read once per turn
    /// of the loop rather than per record, since a turn takes well under a
    /// millisecond and tn only has to grow per key, which the table ensures.
    fn now(&mut self) -> u64 {
        *self.turn_clock.get_or_insert_with(now_ns)
    }

    /// Whether the task takes another batch: its inbox is done and the
    /// table has room.
    fn wants_records(&self) -> bool {
        self.inbox.as_slice().is_empty() && !self.table.is_saturated()
    }

    /// A batch from the feed becomes the inbox.
    fn take(&mut self, batch: Vec<InputRecord>) {
        self.inbox = batch.into_iter();
    }

    /// Ends a turn of the task's loop: processes the inbox's records until
    /// it is empty or the table is saturated (the rest waits for
    /// acknowledgements to free keys), then produces the pushes started
    /// this turn. A push is produced only after the records in hand are
    /// offered, so it carries the newest of them: a burst of a key read in
    /// one batch is one push, not a push of its first event that the rest
    /// then wait behind.
    fn finish_turn(&mut self) {
        let (mut records, mut bytes) = (0, 0);
        while !self.table.is_saturated() {
            let Some(record) = self.inbox.next() else {
                break;
            };
            records += 1;
            bytes += record.bytes();
            self.record(record);
        }
        if records > 0 {
            self.backlog.processed(records, bytes);
        }
        let mut starting = std::mem::take(&mut self.starting);
        for push in starting.drain(..) {
            let push = self.table.catch_up(push);
            self.start(push, Duration::ZERO);
        }
        self.starting = starting;
        self.turn_clock = None;
    }

    fn record(&mut self, record: InputRecord) {
        self.metrics.emit(RecordReceived);
        let offset = record.offset;
        let decoded = match self
            .shared
            .codec
            .decode_record_bytes(record.key.as_deref(), record.payload.as_ref())
        {
            Ok(decoded) => decoded,
            Err(e) => return self.dead_letter(record, e.reason(), e.to_string()),
        };
        let key = record.key.clone().unwrap_or_default();
        // An unknown key's marker is read once, to seed it; from then on the
        // table knows what its next marker needs.
        if !self.table.knows(&key) {
            self.seed(&key);
        }
        let event = Event {
            key,
            offset,
            version: decoded.version,
            payload: decoded.payload,
        };
        let now = self.now();
        match self.table.offer(event, now) {
            Ok(Offer::Started(push)) => self.starting.push(push),
            Ok(Offer::Merged) => self.metrics.emit(EventMerged),
            Ok(Offer::Stale) => self.metrics.emit(StaleEventDropped { offset }),
            Err(e) => self.dead_letter(record, "unprocessable", e.to_string()),
        }
    }

    /// Starts the table's entry for a key from its stored marker, so replayed
    /// events are not pushed again and patches fold onto the stored value.
    fn seed(&mut self, key: &Bytes) {
        match self.store.get(key) {
            Ok(Some(marker)) => self.seed_from(key, &marker),
            Ok(None) => {}
            Err(e) => warn!(
                partition = self.partition,
                "reading the marker failed, key starts unseeded: {e}"
            ),
        }
    }

    /// The table learns a key's marker: its version, t1 and t2, and its value.
    fn seed_from(&mut self, key: &Bytes, marker: &Marker) {
        let payload = self.shared.codec.stored(marker.value.as_ref());
        self.table.seed(
            key.clone(),
            marker.version,
            marker.t1,
            marker.t2,
            Some(payload),
        );
    }

    /// markT1, then produce the push (after `delay`, for retries). The
    /// marker is written from the push alone (its `acked_tn` is the t2 the
    /// marker keeps), without reading the key's previous one; after an
    /// acknowledgement it is also that push's markT2: one write, one
    /// changelog record.
    fn start(&mut self, push: Push, delay: Duration) {
        let value = self.shared.codec.encode(&push.payload, push.version);
        let marker = Marker::started(push.acked_tn, push.tn, push.version, value.clone());
        self.mark(&push.key, Some(&marker));

        self.metrics.emit(KeysInFlight(self.table.active_keys()));
        let topic = &self.shared.settings.topics.pushed;
        let in_flight: PushInFlight = if delay.is_zero() {
            let produced = Instant::now();
            let sent = produce_now(
                &self.shared.producer,
                push_record(topic, &push, value.as_deref()),
            );
            Box::pin(delivery(push, marker, sent, produced))
        } else {
            let (producer, topic) = (self.shared.producer.clone(), topic.clone());
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                let produced = Instant::now();
                let sent = produce_now(&producer, push_record(&topic, &push, value.as_deref()));
                delivery(push, marker, sent, produced).await
            })
        };
        self.pushes.push(in_flight);
    }

    fn delivered(&mut self, done: Delivered) {
        match done.ok {
            Ok(()) => self.acknowledge(done.push, done.marker, done.latency, true),
            Err(error) => {
                self.metrics.emit(PushFailed {
                    key: &done.push.key,
                    error: &error,
                });
                let now = self.now();
                match self.table.fail(done.push, now) {
                    Ok(retry) => self.start(retry, RETRY_BACKOFF),
                    Err(e) => debug!("failure of an unknown push: {e}"),
                }
            }
        }
    }

    /// markT2 and the table's next step for the key.
    fn acknowledge(&mut self, push: Push, marker: Marker, latency: Duration, continue_key: bool) {
        self.metrics.emit(PushAcknowledged {
            compensation: push.compensation,
            latency,
        });
        let next = if continue_key {
            let now = self.now();
            match self.table.complete(&push.key, push.tn, now) {
                Ok(next) => next,
                Err(e) => return debug!("acknowledgement of an unknown push: {e}"),
            }
        } else {
            None
        };
        match next {
            // markT2 and the next push's markT1 in one write: {t1: next, t2:
            // this}, at the end of the turn (see `starting`).
            Some(next) => self.starting.push(next),
            None => {
                let acknowledged = marker.acknowledged(push.tn);
                if marker.value.is_none() && continue_key {
                    // A delete that stayed the key's last word: its state goes.
                    self.mark(&push.key, None)
                } else {
                    self.mark(&push.key, Some(&acknowledged))
                }
                self.metrics.emit(KeysInFlight(self.table.active_keys()))
            }
        }
    }

    /// Writes a marker (or removes it) in the store, and holds it for the
    /// changelog (see [`Task::log_markers`]).
    fn mark(&mut self, key: &Bytes, marker: Option<&Marker>) {
        let written = match marker {
            Some(marker) => self.store.put(key, marker).map_err(|e| ("write", e)),
            None => self.store.delete(key).map_err(|e| ("delete", e)),
        };
        if let Err((what, e)) = written {
            return warn!(partition = self.partition, "store {what} failed: {e}");
        }
        self.unlogged.insert(key.clone(), marker.cloned());
    }

    /// Hands the held markers to the producer, one record per key, after
    /// another attempt at the keys whose failed write could not be written
    /// again (see [`Task::changelog_acknowledged`]).
    fn log_markers(&mut self) {
        for key in self.commit_gate.retry() {
            match self.write_again(key) {
                Ok(write) => self.commit_gate.wrote_again(write),
                Err(e) => debug!(partition = self.partition, "marker still unreadable: {e}"),
            }
        }
        for (key, marker) in std::mem::take(&mut self.unlogged) {
            self.send_changelog(key, marker.as_ref());
        }
    }

    /// Produces one changelog record (`None`: a tombstone); its
    /// acknowledgement is awaited by the task's loop.
    fn send_changelog(&mut self, key: Bytes, marker: Option<&Marker>) {
        let encoded = marker.map(|m| self.store.encode(m));
        let mut record = FutureRecord::to(&self.shared.changelog)
            .key(key.as_ref())
            .partition(self.partition);
        if let Some(encoded) = encoded.as_deref() {
            record = record.payload(encoded);
        }
        let delivery = produce_now(&self.shared.producer, record);
        self.changelog_seq += 1;
        self.changelog_writes.push_back(ChangelogWrite {
            seq: self.changelog_seq,
            key,
            delivery,
        });
    }

    /// The oldest changelog write was acknowledged (or failed). A key whose
    /// write failed is written again from the store's *current* marker
    /// (re-sending the failed bytes could let an older marker win
    /// compaction over a newer one); a commit held behind the failed write
    /// now waits for the rewrite. If the marker cannot be read back, no
    /// commit goes out until a later attempt writes it. Returns false for a
    /// failure.
    fn changelog_acknowledged(&mut self, acked: Result<i64, String>) -> bool {
        let Some(write) = self.changelog_writes.pop_front() else {
            return true;
        };
        match acked {
            Ok(offset) => {
                self.metrics.emit(ChangelogWritten(1));
                self.changelog_next = self.changelog_next.max(offset + 1);
                self.release_held_commit();
                true
            }
            Err(e) => {
                warn!(
                    partition = self.partition,
                    "changelog write failed, will write the key again: {e}"
                );
                match self.write_again(write.key) {
                    Ok(rewrite) => self.commit_gate.rewritten(write.seq, rewrite),
                    Err(e) => warn!(
                        partition = self.partition,
                        "cannot re-read a marker to write it again; commits wait until it is written: {e}"
                    ),
                }
                false
            }
        }
    }

    /// Writes a key whose changelog write failed again, with its current
    /// marker (the one held for the changelog, else the store's): the new
    /// write's `seq`. An error if the marker cannot be read back; the commit
    /// gate then holds commits until a later attempt (see
    /// [`Task::log_markers`]).
    fn write_again(&mut self, key: Bytes) -> Result<u64, StateError> {
        let marker = match self.unlogged.remove(&key) {
            Some(held) => Ok(held),
            None => self.store.get(&key),
        };
        match marker {
            Ok(marker) => {
                self.send_changelog(key, marker.as_ref());
                Ok(self.changelog_seq)
            }
            Err(e) => {
                self.commit_gate.unwritten(key);
                Err(e)
            }
        }
    }

    /// Produces a record unchanged to the dead-letter topic, holding its
    /// offset until the dead letter is acknowledged (retrying, never dropping).
    fn dead_letter(&mut self, record: InputRecord, reason: &'static str, detail: String) {
        let offset = record.offset;
        if let Err(e) = self.table.hold(offset) {
            return warn!(
                partition = self.partition,
                offset, "cannot hold the offset of a dead letter: {e}"
            );
        }
        self.metrics.emit(DeadLettered {
            offset,
            reason,
            detail: &detail,
        });
        let producer = self.shared.producer.clone();
        let topic = self.shared.settings.topics.dead_letter.clone();
        let source = self.topic.clone();
        let partition = self.partition;
        self.dead_letters.spawn(async move {
            loop {
                let headers = OwnedHeaders::new()
                    .insert(Header {
                        key: "keyflight-error",
                        value: Some(&detail),
                    })
                    .insert(Header {
                        key: "keyflight-error-reason",
                        value: Some(reason),
                    })
                    .insert(Header {
                        key: "keyflight-source-topic",
                        value: Some(&source),
                    })
                    .insert(Header {
                        key: "keyflight-source-partition",
                        value: Some(&partition.to_string()),
                    })
                    .insert(Header {
                        key: "keyflight-source-offset",
                        value: Some(&offset.to_string()),
                    });
                let mut out = FutureRecord::to(&topic).headers(headers);
                if let Some(key) = record.key.as_deref() {
                    out = out.key(key);
                }
                if let Some(value) = record.payload.as_deref() {
                    out = out.payload(value);
                }
                match producer.send(out, Timeout::Never).await {
                    Ok(_) => return offset,
                    Err((e, _)) => {
                        warn!(partition, offset, "dead letter not written, retrying: {e}");
                        tokio::time::sleep(RETRY_BACKOFF).await;
                    }
                }
            }
        });
    }

    /// The compensation scan: re-push open markers older than the grace
    /// period whose key is not in flight, through the table.
    fn compensate(&mut self) {
        let started = Instant::now();
        let grace = self.shared.settings.compensation.grace.as_nanos() as u64;
        let now = self.now();
        let due = match crate::compensation::due(&self.store, now, grace) {
            Ok(due) => due,
            Err(e) => return warn!(partition = self.partition, "compensation scan failed: {e}"),
        };
        let mut pushed = 0;
        for (key, marker) in due {
            if self.table.in_flight(&key) {
                continue;
            }
            if !self.table.knows(&key) {
                // As for an event of an unknown key: the table learns the
                // marker first (the push's marker keeps its t2).
                self.seed_from(&key, &marker);
            }
            let payload = self.shared.codec.stored(marker.value.as_ref());
            if let Some(push) = self.table.compensate(&key, marker.version, payload, now) {
                pushed += 1;
                self.start(push, Duration::ZERO);
            }
        }
        self.metrics.emit(CompensationScanned {
            elapsed: started.elapsed(),
            open_markers: self.store.open_count().unwrap_or(0),
            repushed: pushed,
        });
    }

    /// Waits for every changelog write so far (used when closing); false
    /// if one failed or a marker is still missing from the changelog.
    /// Rewrites of failed keys are left in flight.
    async fn flush_changelog(&mut self) -> bool {
        let mut ok = !self.commit_gate.is_blocked();
        for _ in 0..self.changelog_writes.len() {
            let acked = front_acknowledged(&mut self.changelog_writes).await;
            ok &= self.changelog_acknowledged(acked);
        }
        ok
    }

    /// Commits the covered position once the changelog has caught up with
    /// it: at once if every write is acknowledged, else held until the
    /// writes made so far are (see [`Task::release_held_commit`]).
    fn commit(&mut self) {
        let Some(position) = self.table.commit_position() else {
            return;
        };
        if self.committed == Some(position) {
            return;
        }
        // The markers behind `position` may still be held: write them now,
        // and hold the commit until they are acknowledged.
        self.log_markers();
        self.commit_gate.ask(position, self.changelog_seq);
        self.release_held_commit();
    }

    /// Sends the held commit if the markers behind it are durable (see
    /// [`CommitGate::release`]).
    fn release_held_commit(&mut self) {
        let oldest_pending = self.changelog_writes.front().map(|write| write.seq);
        let Some(position) = self.commit_gate.release(oldest_pending) else {
            return; // markers behind the offsets are not durable yet
        };
        if self.shared.commits.send((self.partition, position)).is_ok() {
            self.committed = Some(position);
        }
        // A checkpoint flushes the store's memtables, synchronously: not at
        // every commit (the benchmark's p99 latency showed the stalls), but
        // often enough that a restart after a crash replays little.
        if self.checkpointed.elapsed() >= CHECKPOINT_EVERY {
            self.checkpointed = Instant::now();
            // Every marker in the checkpoint is at least on its way to the
            // changelog, as when markers were written one by one.
            self.log_markers();
            if let Err(e) = self.store.checkpoint(self.changelog_next) {
                warn!(partition = self.partition, "checkpoint failed: {e}");
            }
        }
    }
}

/// The outcome of the oldest changelog write: its offset, or why it failed.
/// Cancel-safe: the write stays at the front until the caller pops it.
async fn front_acknowledged(writes: &mut VecDeque<ChangelogWrite>) -> Result<i64, String> {
    match writes.front_mut().map(|w| &mut w.delivery) {
        Some(Ok(delivery)) => acknowledged(delivery.await),
        Some(Err(refused)) => Err(refused.clone()),
        None => std::future::pending().await,
    }
}

/// Awaits a produced push's delivery.
async fn delivery(
    push: Push,
    marker: Marker,
    sent: Result<DeliveryFuture, String>,
    produced: Instant,
) -> Delivered {
    let ok = match sent {
        Ok(delivery) => acknowledged(delivery.await).map(drop),
        Err(refused) => Err(refused),
    };
    Delivered {
        push,
        marker,
        ok,
        latency: produced.elapsed(),
    }
}

/// A delivery's offset, or its error.
fn acknowledged(
    delivery: Result<rdkafka::producer::future_producer::OwnedDeliveryResult, impl Sized>,
) -> Result<i64, String> {
    match delivery {
        Ok(Ok(delivered)) => Ok(delivered.offset),
        Ok(Err((e, _))) => Err(e.to_string()),
        Err(_) => Err("the producer dropped the delivery report".into()),
    }
}

/// Hands a record to the producer now, so records leave in the order they
/// are written. A full producer queue is waited out here: that is the
/// backpressure of a broker slower than the input.
fn produce_now(
    producer: &FutureProducer,
    mut record: FutureRecord<'_, [u8], [u8]>,
) -> Result<DeliveryFuture, String> {
    loop {
        match producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(e.to_string()),
        }
    }
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
            key: "keyflight-version",
            value: Some(version.format(push.version)),
        })
        .insert(Header {
            key: "keyflight-tn",
            value: Some(tn.format(push.tn)),
        })
        .insert(Header {
            key: "keyflight-merged",
            value: Some(merged.format(push.merged)),
        })
        .insert(Header {
            key: "keyflight-compensation",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backlog_counts_records_until_they_are_processed() {
        let backlog = Backlog::default();
        let batch = vec![
            InputRecord::copied(0, Some(b"a"), Some(b"12")),
            InputRecord::copied(1, Some(b"b"), None),
        ];
        backlog.handed(&batch);
        assert_eq!(backlog.size(), (2, 4));
        // Taken into the inbox and one processed: the other still counts.
        backlog.processed(1, batch[0].bytes());
        assert_eq!(backlog.size(), (1, 1));
        backlog.processed(1, batch[1].bytes());
        assert_eq!(backlog.size(), (0, 0));
    }

    #[test]
    fn a_copied_record_keeps_its_key_and_value_apart_and_absent_ones_absent() {
        let both = InputRecord::copied(7, Some(b"key"), Some(b"{\"v\":1}"));
        assert_eq!(both.offset, 7);
        assert_eq!(both.key.as_deref(), Some(&b"key"[..]));
        assert_eq!(both.payload.as_deref(), Some(&b"{\"v\":1}"[..]));
        assert_eq!(both.bytes(), 3 + 7);

        let tombstone = InputRecord::copied(8, Some(b"k"), None);
        assert_eq!(
            (tombstone.key.as_deref(), tombstone.payload),
            (Some(&b"k"[..]), None)
        );
        let keyless = InputRecord::copied(9, None, Some(b""));
        assert_eq!(
            (keyless.key, keyless.payload.as_deref()),
            (None, Some(&b""[..]))
        );
    }
}
