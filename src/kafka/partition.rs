//! The task of one assigned partition: restore, then consume → decode →
//! table → push → mark, with compensation and commits on timers.
//!
//! Order of effects per push (the article's markT1 / push / markT2):
//! 1. markT1: the store and the changelog get `t1 = tn` with the push's
//!    version and value;
//! 2. the push is produced to the output topic;
//! 3. on acknowledgement, markT2 (`t2 = tn`) and the table moves on: the next
//!    merged push of the key starts, or the key goes idle (a delete's state
//!    is removed).
//!
//! Commits follow the table's coverage and wait for the changelog records
//! written before them, so the next owner restores markers at least as new
//! as the offsets it starts from.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
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
use crate::state::{Marker, Store};

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
    pub records: mpsc::Sender<OwnedMessage>,
    /// Asks the task to stop; it answers with its final commit position.
    pub close: oneshot::Sender<std::sync::mpsc::Sender<Option<i64>>>,
}

/// How often a commit also checkpoints the store (revoke and shutdown always do).
const CHECKPOINT_EVERY: Duration = Duration::from_secs(30);

/// Delay before a failed push or dead letter is tried again.
const RETRY_BACKOFF: Duration = Duration::from_secs(1);
/// Records buffered between the poll thread and a task.
pub const CHANNEL_CAPACITY: usize = 1024;

pub fn spawn(
    shared: Arc<Shared>,
    runtime: &tokio::runtime::Handle,
    topic: String,
    partition: i32,
) -> TaskHandle {
    let (records_tx, records) = mpsc::channel(CHANNEL_CAPACITY);
    let (close_tx, close) = oneshot::channel();
    let span = tracing::info_span!("partition", topic = %topic, partition);
    runtime.spawn(
        async move {
            let failures = shared.failures.clone();
            if let Err(error) = run(shared, topic.clone(), partition, records, close).await {
                tracing::error!("partition task failed: {error}");
                let _ = failures.send(format!("partition {topic}[{partition}]: {error}"));
            }
        }
        .instrument(span),
    );
    TaskHandle {
        records: records_tx,
        close: close_tx,
    }
}

/// Outcome of a push, back from its delivery task.
struct Delivered {
    push: Push,
    /// The marker markT1 wrote for this push. One push per key is in flight,
    /// so it is still the key's marker when the push is acknowledged.
    marker: Marker,
    ok: Result<(), String>,
    /// From produce to acknowledgement (or failure).
    latency: Duration,
}

struct Task {
    shared: Arc<Shared>,
    topic: String,
    partition: i32,
    table: Table,
    store: Store,
    pushes: JoinSet<Delivered>,
    dead_letters: JoinSet<i64>,
    /// Changelog writes not yet known acknowledged: the offset, or the key
    /// whose write failed.
    changelog_writes: JoinSet<Result<i64, (Bytes, String)>>,
    /// One past the newest acknowledged changelog offset (for checkpoints).
    changelog_next: i64,
    committed: Option<i64>,
    /// When the store was last checkpointed (see [`CHECKPOINT_EVERY`]).
    checkpointed: Instant,
    metrics: PartitionMetrics,
}

async fn run(
    shared: Arc<Shared>,
    topic: String,
    partition: i32,
    mut records: mpsc::Receiver<OwnedMessage>,
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
            let result = restore::restore(
                &shared.settings,
                &shared.changelog,
                partition,
                &store,
                opened,
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
        pushes: JoinSet::new(),
        dead_letters: JoinSet::new(),
        changelog_writes: JoinSet::new(),
        changelog_next: restored.next_offset,
        committed: None,
        checkpointed: Instant::now(),
        metrics,
        shared: shared.clone(),
        topic,
        partition,
    };
    let mut commit_tick = tokio::time::interval(settings.commit_interval);
    let mut compensation_tick = tokio::time::interval(settings.compensation.interval);
    compensation_tick.tick().await; // the first tick is immediate; skip it

    let reply = loop {
        tokio::select! {
            biased;
            reply = &mut close => break reply.ok(),
            Some(done) = task.pushes.join_next(), if !task.pushes.is_empty() => {
                if let Ok(done) = done { task.delivered(done); }
            }
            Some(done) = task.dead_letters.join_next(), if !task.dead_letters.is_empty() => {
                if let Ok(offset) = done { task.table.release(offset); }
            }
            _ = commit_tick.tick() => task.commit().await,
            _ = compensation_tick.tick() => task.compensate(),
            record = records.recv(), if !task.table.is_saturated() => match record {
                Some(record) => task.record(record),
                None => break None,
            },
        }
    };
    // Closing (revoke or shutdown): stop taking events, let pushes in flight
    // finish (bounded), commit what is covered, checkpoint.
    records.close();
    let deadline = tokio::time::Instant::now() + settings.shutdown_timeout;
    while !task.pushes.is_empty() || !task.dead_letters.is_empty() {
        tokio::select! {
            Some(done) = task.pushes.join_next(), if !task.pushes.is_empty() => {
                // markT2 only for a push that landed; a failed one keeps its
                // marker open for compensation after the restart. No
                // follow-up pushes while closing: their events stay
                // uncommitted and are replayed by the next owner.
                if let Ok(Delivered { push, marker, ok: Ok(()), latency }) = done {
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
    task.pushes.abort_all();
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
    fn record(&mut self, record: OwnedMessage) {
        self.metrics.emit(RecordReceived);
        let offset = record.offset();
        let decoded = match self
            .shared
            .codec
            .decode_record(record.key(), record.payload())
        {
            Ok(decoded) => decoded,
            Err(e) => return self.dead_letter(record, e.reason(), e.to_string()),
        };
        let key = Bytes::copy_from_slice(record.key().unwrap_or_default());
        if !self.table.knows(&key) {
            self.seed(&key);
        }
        let event = Event {
            key,
            offset,
            version: decoded.version,
            payload: decoded.payload,
        };
        match self.table.offer(event, now_ns()) {
            Ok(Offer::Started(push)) => self.start(push, Duration::ZERO),
            Ok(Offer::Merged) => self.metrics.emit(EventMerged),
            Ok(Offer::Stale) => self.metrics.emit(StaleEventDropped { offset }),
            Err(e) => self.dead_letter(record, "unprocessable", e.to_string()),
        }
    }

    /// Starts the table's entry for a key from its stored marker, so replayed
    /// events are not pushed again and patches fold onto the stored value.
    fn seed(&mut self, key: &Bytes) {
        match self.store.get(key) {
            Ok(Some(marker)) => {
                let payload = self.shared.codec.stored(marker.value.as_ref());
                self.table.seed(
                    key.clone(),
                    marker.version,
                    marker.t1.max(marker.t2),
                    Some(payload),
                );
            }
            Ok(None) => {}
            Err(e) => warn!(
                partition = self.partition,
                "reading the marker failed, key starts unseeded: {e}"
            ),
        }
    }

    /// markT1, then produce the push (after `delay`, for retries).
    fn start(&mut self, push: Push, delay: Duration) {
        let previous = self.store.get(&push.key).ok().flatten();
        self.start_after(push, delay, previous)
    }

    /// [`Task::start`] where the key's current marker is known: `previous`
    /// (after an acknowledgement, the acknowledged marker, which then needs
    /// no write of its own: markT2 and the next markT1 become one record).
    fn start_after(&mut self, push: Push, delay: Duration, previous: Option<Marker>) {
        let value = self.shared.codec.encode(&push.payload, push.version);
        let marker = Marker::started(previous.as_ref(), push.tn, push.version, value.clone());
        self.mark(&push.key, Some(&marker));

        self.metrics.emit(KeysInFlight(self.table.active_keys()));
        let producer = self.shared.producer.clone();
        let topic = self.shared.settings.topics.pushed.clone();
        self.pushes.spawn(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let produced = Instant::now();
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "keyflight-version",
                    value: Some(&push.version.to_string()),
                })
                .insert(Header {
                    key: "keyflight-tn",
                    value: Some(&push.tn.to_string()),
                })
                .insert(Header {
                    key: "keyflight-merged",
                    value: Some(&push.merged.to_string()),
                })
                .insert(Header {
                    key: "keyflight-compensation",
                    value: Some(if push.compensation { "true" } else { "false" }),
                });
            let mut record = FutureRecord::to(&topic)
                .key(push.key.as_ref())
                .headers(headers);
            if let Some(value) = value.as_deref() {
                record = record.payload(value);
            }
            let ok = producer
                .send(record, Timeout::Never)
                .await
                .map(drop)
                .map_err(|(e, _)| e.to_string());
            Delivered {
                push,
                marker,
                ok,
                latency: produced.elapsed(),
            }
        });
    }

    fn delivered(&mut self, done: Delivered) {
        match done.ok {
            Ok(()) => self.acknowledge(done.push, done.marker, done.latency, true),
            Err(error) => {
                self.metrics.emit(PushFailed {
                    key: &done.push.key,
                    error: &error,
                });
                match self.table.fail(done.push, now_ns()) {
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
            match self.table.complete(&push.key, push.tn, now_ns()) {
                Ok(next) => next,
                Err(e) => return debug!("acknowledgement of an unknown push: {e}"),
            }
        } else {
            None
        };
        let acknowledged = marker.acknowledged(push.tn);
        match next {
            // markT2 and the next push's markT1 in one write: {t1: next, t2: this}.
            Some(next) => self.start_after(next, Duration::ZERO, Some(acknowledged)),
            None => {
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

    /// Writes a marker (or removes it) in the store and the changelog.
    fn mark(&mut self, key: &Bytes, marker: Option<&Marker>) {
        let encoded = match marker {
            Some(marker) => match self.store.put(key, marker) {
                Ok(encoded) => Some(encoded),
                Err(e) => return warn!(partition = self.partition, "store write failed: {e}"),
            },
            None => match self.store.delete(key) {
                Ok(()) => None,
                Err(e) => return warn!(partition = self.partition, "store delete failed: {e}"),
            },
        };
        self.send_changelog(key.clone(), encoded);
    }

    /// Produces one changelog record (`None`: a tombstone) in the background.
    fn send_changelog(&mut self, key: Bytes, encoded: Option<Vec<u8>>) {
        let producer = self.shared.producer.clone();
        let topic = self.shared.changelog.clone();
        let partition = self.partition;
        self.changelog_writes.spawn(async move {
            let mut record = FutureRecord::to(&topic)
                .key(key.as_ref())
                .partition(partition);
            if let Some(encoded) = encoded.as_deref() {
                record = record.payload(encoded);
            }
            let sent = producer.send(record, Timeout::Never).await;
            sent.map(|d| d.offset)
                .map_err(|(e, _)| (key, e.to_string()))
        });
    }

    /// Produces a record unchanged to the dead-letter topic, holding its
    /// offset until the dead letter is acknowledged (retrying, never dropping).
    fn dead_letter(&mut self, record: OwnedMessage, reason: &'static str, detail: String) {
        let offset = record.offset();
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
                if let Some(key) = record.key() {
                    out = out.key(key);
                }
                if let Some(value) = record.payload() {
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
        let due = match crate::compensation::due(&self.store, now_ns(), grace) {
            Ok(due) => due,
            Err(e) => return warn!(partition = self.partition, "compensation scan failed: {e}"),
        };
        let mut pushed = 0;
        for (key, marker) in due {
            if self.table.in_flight(&key) {
                continue;
            }
            let payload = self.shared.codec.stored(marker.value.as_ref());
            if let Some(push) = self
                .table
                .compensate(&key, marker.version, payload, now_ns())
            {
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

    /// Waits for every changelog write so far; false if one failed. A key
    /// whose write failed is written again from the store's *current* marker
    /// (re-sending the failed bytes could let an older marker win
    /// compaction over a newer one), and is awaited by the next flush.
    async fn flush_changelog(&mut self) -> bool {
        let mut failed = Vec::new();
        let mut written = 0;
        while let Some(done) = self.changelog_writes.join_next().await {
            match done {
                Ok(Ok(offset)) => {
                    written += 1;
                    self.changelog_next = self.changelog_next.max(offset + 1);
                }
                Ok(Err((key, e))) => {
                    warn!(
                        partition = self.partition,
                        "changelog write failed, will write the key again: {e}"
                    );
                    failed.push(key);
                }
                Err(e) => warn!(
                    partition = self.partition,
                    "changelog write task failed: {e}"
                ),
            }
        }
        self.metrics.emit(ChangelogWritten(written));
        let ok = failed.is_empty();
        for key in failed {
            match self.store.get(&key) {
                Ok(marker) => {
                    let encoded = marker.map(|m| self.store.encode(&m));
                    self.send_changelog(key, encoded);
                }
                Err(e) => warn!(
                    partition = self.partition,
                    "cannot re-read a marker to rewrite it: {e}"
                ),
            }
        }
        ok
    }

    /// Commits the covered position once the changelog has caught up with it.
    async fn commit(&mut self) {
        let Some(position) = self.table.commit_position() else {
            return;
        };
        if self.committed == Some(position) {
            return;
        }
        if !self.flush_changelog().await {
            return; // hold the offsets: markers behind them are not durable
        }
        if self.shared.commits.send((self.partition, position)).is_ok() {
            self.committed = Some(position);
        }
        // A checkpoint flushes the store's memtables, synchronously: not at
        // every commit (the benchmark's p99 latency showed the stalls), but
        // often enough that a restart after a crash replays little.
        if self.checkpointed.elapsed() >= CHECKPOINT_EVERY {
            self.checkpointed = Instant::now();
            if let Err(e) = self.store.checkpoint(self.changelog_next) {
                warn!(partition = self.partition, "checkpoint failed: {e}");
            }
        }
    }
}
