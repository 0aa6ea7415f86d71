//! The partition task's decisions, with no I/O, no clock and no async: the
//! shell ([`super::shell`]) feeds it what happened and carries out the
//! [`Action`]s it asks for, in order, before it feeds the next input.
//!
//! Inputs: records ([`TaskCore::take_batch`], processed by
//! [`TaskCore::end_turn`]), a push's outcome ([`TaskCore::push_done`]), the
//! oldest changelog write's outcome ([`TaskCore::changelog_done`]), a dead
//! letter's outcome ([`TaskCore::dead_letter_done`]), a commit that did
//! not go through ([`TaskCore::commit_failed`]), timers
//! ([`TaskCore::tick`]), and closing ([`TaskCore::close`],
//! [`TaskCore::close_timed_out`]). Every input carries the clock (`now`, ns
//! since the epoch) it happened at.
//!
//! The rules it keeps, each checked by the task simulation
//! (`tests/task_simulation.rs`):
//!
//! * **markT1 before the push.** A push's marker is the key's marker (held
//!   for the changelog) before the [`Action::Push`] that produces it.
//! * **Durable before committed.** An [`Action::Commit`] goes out only once
//!   every changelog write made before it was asked is acknowledged (or
//!   written again and acknowledged): the `CommitGate`.
//! * **The store is never ahead of the changelog.** A marker reaches the
//!   store only once the changelog acknowledged it; until then it is held in
//!   memory (and read from there). So whatever part of the store a crash
//!   leaves on disk, replaying the changelog from the last checkpoint (the
//!   offset one past the newest acknowledged record) gives the changelog's
//!   view.
//! * **Closing** lets pushes in flight finish (without follow-up pushes),
//!   hands every held marker to the changelog, waits for those writes, and
//!   only then reports the final position ([`Action::Closed`]).
//!
//! The state store is the core's memory, not its I/O: a local cache of the
//! acknowledged changelog, reached through [`MarkerStore`] so that the simulation can
//! put a model with crash semantics in RocksDB's place.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use tracing::{debug, warn};

use std::sync::Arc;

use crate::codec::Codec;
use crate::engine::{Event, Offer, Payload, Push, Table, TableConfig, TableStats};
use crate::internal_events::{
    ChangelogWritten, DeadLetterAbandoned, DeadLettered, EventMerged, KeysInFlight, MarkersExpired,
    PushAcknowledged, PushFailed, PushSkipped, RecordReceived, StaleEventDropped,
};
use crate::metrics::PartitionMetrics;
pub use crate::processor::claim_watch::OtherRecord;
use crate::processor::claim_watch::{ClaimWatch, Others};
use crate::processor::commit_gate::CommitGate;
use crate::state::{Marker, MarkerStore, StateError};

use super::InputRecord;

/// What a task is configured with (from [`crate::config::Settings`]).
#[derive(Clone, Debug)]
pub struct CoreConfig {
    pub partition: i32,
    pub table: TableConfig,
    /// How old an open marker must be before the scan re-pushes it.
    pub compensation_grace: Duration,
    /// How often a commit also checkpoints the store (closing always does).
    pub checkpoint_every: Duration,
    /// Delay before a failed push or dead letter is tried again the first
    /// time; it doubles with every further attempt, up to
    /// `max_retry_backoff`.
    pub retry_backoff: Duration,
    pub max_retry_backoff: Duration,
    /// How long a key's push may keep failing with retriable errors before
    /// it is dead-lettered (`push-refused`): the bound on how long one key
    /// holds the partition's commits.
    pub give_up_after: Duration,
    /// The largest dead-letter value the dead-letter topic takes whole: a
    /// dead letter refused as too large is written again with its value cut
    /// to this many bytes.
    pub dead_letter_max_value: usize,
    /// How long a delete's marker is kept before the sweep removes the key's
    /// state from the store and the changelog.
    pub delete_retention: Duration,
    /// How long an idle key's closed marker is kept after its last
    /// acknowledged push (`state.ttl`; zero: for good).
    pub state_ttl: Duration,
    /// Pushes on their way at once (the HTTP sink's `max_in_flight`;
    /// `usize::MAX`: no limit). A push beyond it waits unstarted, without
    /// its markT1, and takes in the events its key gets meanwhile: it
    /// leaves with the key's newest value, not the one it had when queued.
    pub max_pushes_in_flight: usize,
}

/// Why a produce failed, as far as the core's decision goes (the shell
/// classifies the client's errors).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProduceError {
    /// Worth another attempt: a broker away, a leader moving, a timeout.
    Retriable(String),
    /// The record is larger than the producer or the topic takes.
    TooLarge(String),
    /// Refused for good: an invalid record, no authorisation, ...
    Refused(String),
    /// Busy: worth another attempt, not before `retry_after` (an HTTP 429's
    /// `Retry-After`).
    Throttled {
        message: String,
        retry_after: Duration,
    },
    /// The sink answered that it will never take this push (an HTTP 4xx):
    /// its dead letter carries the answer.
    Rejected(SinkAnswer),
}

/// A sink's answer refusing a push, as its dead letter records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SinkAnswer {
    pub status: u16,
    /// The start of the answer's body, as text.
    pub excerpt: String,
}

impl std::fmt::Display for ProduceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProduceError::Retriable(e) | ProduceError::TooLarge(e) | ProduceError::Refused(e) => {
                f.write_str(e)
            }
            ProduceError::Throttled { message, .. } => f.write_str(message),
            ProduceError::Rejected(answer) => {
                write!(f, "refused with HTTP {}: {}", answer.status, answer.excerpt)
            }
        }
    }
}

/// The reason a refused push's dead letter carries.
pub const PUSH_REFUSED: &str = "push-refused";
/// The reason of a record read again at an offset the task already passed.
pub const REDELIVERED: &str = "redelivered";

/// A timer the shell runs and reports with [`TaskCore::tick`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timer {
    /// Commit the covered position (`commit_interval`).
    Commit,
    /// Hand the held markers to the changelog ([`CHANGELOG_EVERY`]).
    ChangelogFlush,
    /// The compensation scan (`compensation.interval`), and with it the
    /// sweep of deletes older than `deletes.retention`.
    Compensation,
    /// The earliest waiting key's window may have ended (at
    /// [`TaskCore::next_wake`]): the keys whose window did start their push.
    Wake,
}

/// How long a key's marker may wait in memory for a newer one before it is
/// written to the changelog: a key's writes within this window become one
/// record.
pub const CHANGELOG_EVERY: Duration = Duration::from_millis(100);

/// How many markers one step of the expiry sweep reads (one step per
/// compensation scan): a pass over N markers takes N / this many scans.
pub const EXPIRY_STEP: usize = 10_000;

/// A push to produce, and what the core needs back with its outcome.
#[derive(Clone, Debug)]
pub struct Flight {
    pub push: Push,
    /// The marker markT1 wrote for this push. One push per key is in flight,
    /// so it is still the key's marker when the push is acknowledged.
    pub marker: Marker,
    /// The push's value as produced (`None`: a tombstone).
    pub value: Option<Bytes>,
    /// Failed attempts so far at pushing the key (this flight's value or
    /// an older one it replaces), and since when (ns): for the backoff and
    /// the give-up bound.
    pub failures: u32,
    pub failing_since: u64,
}

/// A record on its way to the dead-letter topic.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    /// Names this dead letter in [`TaskCore::dead_letter_done`].
    pub id: u64,
    /// The record (a refused push's: its key and value, offset -1).
    pub record: InputRecord,
    pub reason: &'static str,
    pub detail: String,
    /// A refused push's version (its `keyflight-version` header).
    pub version: Option<u64>,
    /// Write the value cut to this many bytes: the topic refused it whole.
    pub cut_to: Option<usize>,
    /// The sink's answer when it refused the push (its headers say so).
    pub answer: Option<SinkAnswer>,
    /// What the dead letter holds until it lands.
    pub holds: Holds,
    /// Failed attempts so far (for the backoff).
    failures: u32,
}

/// What a dead letter holds back until it lands, so that nothing is
/// committed past a record that is in neither the output nor the
/// dead-letter topic.
#[derive(Clone, Debug)]
pub enum Holds {
    /// Its record's offset.
    Offset,
    /// Every commit (a record below the position already read).
    Commits,
    /// A refused push: the key stays in flight until its events are
    /// dead-lettered.
    Push(Box<Flight>),
}

/// What the shell must carry out, in the order given.
#[derive(Debug)]
pub enum Action {
    /// Produce this push after `delay` (a retry's backoff), then report
    /// [`TaskCore::push_done`] with the flight.
    Push { flight: Flight, delay: Duration },
    /// Produce a changelog record (`None`: a tombstone) to the task's
    /// changelog partition. Writes are acknowledged in `seq` order; report
    /// each with [`TaskCore::changelog_done`].
    WriteChangelog {
        seq: u64,
        key: Bytes,
        value: Option<Vec<u8>>,
    },
    /// Produce a dead letter after `delay`, then report
    /// [`TaskCore::dead_letter_done`].
    DeadLetter { letter: DeadLetter, delay: Duration },
    /// Commit the input partition at this position.
    Commit(i64),
    /// Checkpoint the store: it is complete up to this changelog offset.
    Checkpoint(i64),
    /// Read the task's changelog partition from `from` to `to`
    /// (exclusive): records another writer put between the task's own,
    /// for [`TaskCore::changelog_read`].
    ReadChangelog { from: i64, to: i64 },
    /// Closing is over: commit this final position, if any, and drop the task.
    Closed(Option<i64>),
    /// The partition cannot go on (its changelog refuses its markers for
    /// good): stop the process with this reason rather than hold the
    /// partition without ever committing again.
    Fail(String),
}

/// A changelog write awaiting its acknowledgement.
struct ChangelogWrite {
    seq: u64,
    key: Bytes,
    marker: Option<Marker>,
}

/// Where the task is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Running,
    /// No more records; pushes and dead letters in flight may finish.
    Draining,
    /// Every held marker is handed to the changelog; waiting for the writes
    /// up to `until` (rewrites of failed ones are not waited for).
    Flushing {
        until: u64,
        ok: bool,
    },
    Closed,
}

/// What a compensation scan did, for its metric.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Scanned {
    pub open_markers: usize,
    pub repushed: u64,
}

/// The pure core of one partition's task.
pub struct TaskCore<S> {
    config: CoreConfig,
    codec: Arc<Codec>,
    table: Table,
    store: S,
    phase: Phase,
    /// Records taken and not yet processed: a batch is taken whole and
    /// processed while the table is not saturated.
    inbox: std::vec::IntoIter<InputRecord>,
    /// Pushes started in this turn, produced at its end
    /// ([`TaskCore::end_turn`]) so that each carries what the turn merged
    /// behind it.
    starting: Vec<Push>,
    /// Pushes handed to the shell whose outcome is not known yet.
    pushes_in_flight: usize,
    /// Pushes started by the table beyond `max_pushes_in_flight`, oldest
    /// first; their keys are in flight for the table (so their events stay
    /// uncommitted and merge), not yet for the sink.
    parked: VecDeque<Push>,
    dead_letters: HashMap<u64, DeadLetter>,
    /// Dead letters whose last attempt failed: while there are any, the
    /// task takes no more records (the partition pauses), so a dead-letter
    /// topic that refuses writes cannot make memory grow with the input.
    dead_letters_failing: HashSet<u64>,
    next_dead_letter: u64,
    /// Dead letters of records read again below the position already read:
    /// no commit goes out while any is in flight.
    commits_held: usize,
    /// Keys seeded from a marker that names its newest event's offset:
    /// a delete without a version replayed at or below it is already
    /// reflected in the marker (it cannot be ordered by version). Dropped
    /// once the input passes `replayed_until`.
    seeded_offsets: HashMap<Bytes, i64, ahash::RandomState>,
    replayed_until: i64,
    /// Where the expiry sweep's walk over the store goes on (`None`: from
    /// the first key).
    sweep_cursor: Option<Bytes>,
    /// Markers not yet handed to the changelog, the newest per key (`None`:
    /// a tombstone). Encoded only when written: most are replaced before.
    unlogged: HashMap<Bytes, Option<Marker>, ahash::RandomState>,
    /// Changelog writes not yet acknowledged, oldest first: each goes to the
    /// store once acknowledged.
    changelog_writes: VecDeque<ChangelogWrite>,
    /// The `seq` of each key's newest write in `changelog_writes` (whose
    /// `seq`s are consecutive, so it indexes the queue).
    newest_write: HashMap<Bytes, u64, ahash::RandomState>,
    /// `seq` of the newest changelog write.
    changelog_seq: u64,
    /// One past the newest acknowledged changelog offset (for checkpoints).
    changelog_next: i64,
    /// The task's claim of the partition in the changelog (see
    /// [`TaskCore::claimed`]).
    claim: Option<ClaimWatch>,
    commit_gate: CommitGate,
    committed: Option<i64>,
    /// When the store was last checkpointed (ns).
    checkpointed_at: u64,
    actions: VecDeque<Action>,
    metrics: PartitionMetrics,
}

impl<S: MarkerStore> TaskCore<S> {
    /// A task over a restored store, complete up to changelog offset
    /// `changelog_next`.
    pub fn new(
        config: CoreConfig,
        codec: Arc<Codec>,
        store: S,
        changelog_next: i64,
        metrics: PartitionMetrics,
        now: u64,
    ) -> Self {
        TaskCore {
            table: Table::new(config.table),
            config,
            codec,
            store,
            phase: Phase::Running,
            inbox: Vec::new().into_iter(),
            starting: Vec::new(),
            pushes_in_flight: 0,
            parked: VecDeque::new(),
            dead_letters: HashMap::new(),
            dead_letters_failing: HashSet::new(),
            next_dead_letter: 0,
            commits_held: 0,
            seeded_offsets: HashMap::default(),
            replayed_until: -1,
            sweep_cursor: None,
            unlogged: HashMap::default(),
            changelog_writes: VecDeque::new(),
            newest_write: HashMap::default(),
            changelog_seq: 0,
            changelog_next,
            claim: None,
            commit_gate: CommitGate::default(),
            committed: None,
            checkpointed_at: now,
            actions: VecDeque::new(),
            metrics,
        }
    }

    /// The next action to carry out.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn stats(&self) -> TableStats {
        self.table.stats()
    }

    /// Whether the task takes another batch: it is running, its inbox is
    /// done, the table has room and no dead letter is failing.
    pub fn wants_records(&self) -> bool {
        self.phase == Phase::Running
            && self.inbox.as_slice().is_empty()
            && !self.table.is_saturated()
            && self.dead_letters_failing.is_empty()
    }

    /// Whether closing is over.
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// Pushes and dead letters whose outcome is awaited.
    pub fn in_flight(&self) -> (usize, usize) {
        (self.pushes_in_flight, self.dead_letters.len())
    }

    /// A batch of records, in offset order, becomes the inbox (processed by
    /// [`TaskCore::end_turn`]). Only when [`TaskCore::wants_records`].
    pub fn take_batch(&mut self, batch: Vec<InputRecord>) {
        debug_assert!(self.wants_records());
        self.inbox = batch.into_iter();
    }

    /// Ends a turn of the shell's loop: processes the inbox until it is
    /// empty or the table is saturated (the rest waits for acknowledgements
    /// to free keys), then produces the pushes started this turn, each
    /// carrying the newest of the records in hand: a burst of a key read in
    /// one batch is one push. Returns the (records, key and value bytes)
    /// processed, for the backlog.
    pub fn end_turn(&mut self, now: u64) -> (usize, usize) {
        let (mut records, mut bytes) = (0, 0);
        while self.phase == Phase::Running && !self.table.is_saturated() {
            let Some(record) = self.inbox.next() else {
                break;
            };
            records += 1;
            bytes += record.bytes();
            self.process(record, now);
        }
        // Pushes that waited for a slot go first: a key whose push was just
        // answered queues its next one behind them.
        self.start_parked(now);
        // A skipped push (skip_unchanged) can start the key's next one.
        while !self.starting.is_empty() {
            let mut starting = std::mem::take(&mut self.starting);
            for push in starting.drain(..) {
                let push = self.table.catch_up(push);
                self.start_push(push, Duration::ZERO, now);
            }
            if self.starting.is_empty() {
                self.starting = starting; // keep the allocation
            }
        }
        (records, bytes)
    }

    /// Starts parked pushes while there is room, each with what its key
    /// merged while it waited.
    fn start_parked(&mut self, now: u64) {
        while self.phase == Phase::Running
            && self.pushes_in_flight < self.config.max_pushes_in_flight
        {
            let Some(push) = self.parked.pop_front() else {
                break;
            };
            let push = self.table.catch_up(push);
            self.start_now(push, Duration::ZERO, now);
        }
    }

    fn process(&mut self, record: InputRecord, now: u64) {
        self.metrics.emit(RecordReceived);
        let offset = record.offset;
        if let Err(e) = self.table.accepts(offset) {
            // The partition was read again from further back (an offset
            // reset after log truncation, or a seek): the record cannot be
            // ordered among what the table tracks, so it goes to the
            // dead-letter topic, and no commit goes out until it is there.
            let detail = format!("{e}: the partition was read again from an earlier offset (an offset reset after log truncation, or a seek)");
            return self.dead_letter(record, REDELIVERED, detail, Holds::Commits);
        }
        let mut decoded = match self
            .codec
            .decode_record_bytes(record.key.as_deref(), record.payload.as_ref())
        {
            Ok(decoded) => decoded,
            Err(e) => return self.dead_letter(record, e.reason(), e.to_string(), Holds::Offset),
        };
        if let Some(header) = &record.delete_version {
            match crate::codec::delete_version(header) {
                Ok(version) => decoded.version = Some(version),
                Err(e) => {
                    return self.dead_letter(record, e.reason(), e.to_string(), Holds::Offset)
                }
            }
        }
        let key = record.key.clone().unwrap_or_default();
        // An unknown key's marker is read once, to seed it; from then on the
        // table knows what its next marker needs.
        if !self.table.knows(&key) {
            self.seed(&key);
        }
        if offset > self.replayed_until && !self.seeded_offsets.is_empty() {
            self.seeded_offsets = HashMap::default(); // past every replay
        }
        let event = Event {
            key,
            offset,
            version: decoded.version,
            payload: decoded.payload,
        };
        // A version-less delete at or below the offset its key's marker
        // names is already reflected there (see `seeded_offsets`).
        if event.comes_after_all()
            && self
                .seeded_offsets
                .get(&event.key)
                .is_some_and(|seen| offset <= *seen)
        {
            if let Err(e) = self.table.drop_stale(offset) {
                warn!(
                    partition = self.config.partition,
                    offset, "cannot pass a replayed delete: {e}"
                );
            }
            return self.metrics.emit(StaleEventDropped { offset });
        }
        match self.table.offer(event, now) {
            Ok(Offer::Started(push)) => self.starting.push(push),
            Ok(Offer::Merged) => self.metrics.emit(EventMerged),
            Ok(Offer::Waiting) => self.report_keys(),
            Ok(Offer::Stale) => self.metrics.emit(StaleEventDropped { offset }),
            Err(e) => self.dead_letter(record, "unprocessable", e.to_string(), Holds::Offset),
        }
    }

    /// Reports the keys in flight and waiting.
    fn report_keys(&self) {
        let waiting = self.table.waiting_keys();
        self.metrics.emit(KeysInFlight {
            in_flight: self.table.active_keys() - waiting,
            waiting,
        });
    }

    /// Starts the table's entry for a key from its stored marker, so replayed
    /// events are not pushed again and patches fold onto the stored value.
    fn seed(&mut self, key: &Bytes) {
        match self.marker(key) {
            Ok(Some(marker)) => self.seed_from(key, &marker),
            Ok(None) => {}
            Err(e) => warn!(
                partition = self.config.partition,
                "reading the marker failed, key starts unseeded: {e}"
            ),
        }
    }

    /// The table learns a key's marker: its version, t1 and t2, and its value.
    fn seed_from(&mut self, key: &Bytes, marker: &Marker) {
        if let Some(offset) = marker.offset {
            self.seeded_offsets.insert(key.clone(), offset);
            self.replayed_until = self.replayed_until.max(offset);
        }
        let payload = self.codec.stored(marker.value.as_ref());
        if self.config.table.digests {
            // A closed marker holds the value of the key's last acknowledged
            // push; an open one holds a push that may not have landed.
            let acked =
                (marker.t1 == marker.t2 && !marker.value_cut).then(|| self.digest(&payload));
            self.table.set_acked_digest(key, acked);
        }
        self.table.seed(
            key.clone(),
            marker.version,
            marker.t1,
            marker.t2,
            Some(payload),
        );
    }

    /// Starts a push, or parks it while every slot is taken or others wait
    /// for one already (first come, first served, so that a busy key
    /// cannot starve the others).
    fn start_push(&mut self, push: Push, delay: Duration, now: u64) {
        if self.pushes_in_flight >= self.config.max_pushes_in_flight || !self.parked.is_empty() {
            return self.parked.push_back(push);
        }
        self.start_now(push, delay, now)
    }

    /// markT1, then the push (after `delay`, for retries). The marker is
    /// written from the push alone (its `acked_tn` is the t2 the marker
    /// keeps), without reading the key's previous one; after an
    /// acknowledgement it is also that push's markT2: one write, one
    /// changelog record.
    ///
    /// Under `skip_unchanged`, a push whose value equals the key's last
    /// acknowledged value is not produced: it is done with at once, as if
    /// acknowledged (its events covered, the marker closed at its version).
    fn start_now(&mut self, push: Push, delay: Duration, now: u64) {
        if self.config.table.digests
            && !push.compensation
            && self.phase == Phase::Running
            && self
                .table
                .acked_digest(&push.key)
                .is_some_and(|acked| acked == self.digest(&push.payload))
        {
            let (_, marker) = self.marker_of(&push);
            self.metrics.emit(PushSkipped);
            return self.done_with(push, marker, now);
        }
        self.start_retry(push, delay, 0, 0);
    }

    /// The bytes a push carries and its markT1 (which an acknowledgement
    /// turns into its markT2).
    fn marker_of(&self, push: &Push) -> (Option<Bytes>, Marker) {
        let value = self.codec.encode(&push.payload, push.version);
        let marker = Marker::started(push.acked_tn, push.tn, push.version, value.clone())
            .at_offset(push.offset);
        (value, marker)
    }

    /// A digest of the value a push of `payload` carries, whatever its
    /// version (a tombstone has one too), never 0.
    fn digest(&self, payload: &Payload) -> u128 {
        // Fixed seeds: digests of one process are compared with each other
        // only, but a run is then repeatable.
        let hash = |seed: u64, bytes: &[u8]| {
            ahash::RandomState::with_seeds(seed, !seed, seed.rotate_left(17), 0x6b66)
                .hash_one(bytes)
        };
        match self.codec.encode(payload, 0) {
            None => 1,
            Some(bytes) => {
                let digest = (u128::from(hash(0x5eed_0001, &bytes)) << 64)
                    | u128::from(hash(0x5eed_0002, &bytes));
                digest.max(2)
            }
        }
    }

    /// [`TaskCore::start_push`], for a key whose pushes failed `failures`
    /// times since `failing_since`.
    fn start_retry(&mut self, push: Push, delay: Duration, failures: u32, failing_since: u64) {
        let (value, marker) = self.marker_of(&push);
        self.write_marker(&push.key, Some(&marker));
        self.report_keys();
        self.pushes_in_flight += 1;
        self.actions.push_back(Action::Push {
            flight: Flight {
                push,
                marker,
                value,
                failures,
                failing_since,
            },
            delay,
        });
    }

    /// The delay before attempt `failures + 1`: the backoff, doubled with
    /// every failure after the first, up to the maximum.
    fn backoff(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(20);
        (self.config.retry_backoff * 2u32.pow(doublings)).min(self.config.max_retry_backoff)
    }

    /// A push's outcome: acknowledged (`Ok`) after `latency`, or failed.
    ///
    /// While running, a retriable failure is tried again with the key's
    /// newest value after a backoff that grows with each failure, until the
    /// key has been failing for `give_up_after`; then, or at once for a
    /// push the broker refuses for good (too large, invalid, not
    /// authorised), its value goes to the dead-letter topic (`push-refused`)
    /// and the key moves on once it landed. While closing a failed push
    /// keeps its marker open for compensation after the restart.
    pub fn push_done(
        &mut self,
        now: u64,
        flight: Flight,
        outcome: Result<(), ProduceError>,
        latency: Duration,
    ) {
        if matches!(self.phase, Phase::Flushing { .. } | Phase::Closed) {
            return; // abandoned at the close's deadline
        }
        self.pushes_in_flight -= 1;
        let error = match outcome {
            Ok(()) => return self.acknowledge(flight.push, flight.marker, latency, now),
            Err(error) => error,
        };
        self.metrics.emit(PushFailed {
            key: &flight.push.key,
            error: &error.to_string(),
        });
        if self.phase != Phase::Running {
            return self.drained();
        }
        let failing_since = if flight.failures == 0 {
            now
        } else {
            flight.failing_since
        };
        let failing_for = Duration::from_nanos(now.saturating_sub(failing_since));
        // The sink may ask for a longer wait than the backoff (Retry-After).
        let at_least = match &error {
            ProduceError::Throttled { retry_after, .. } => Some(*retry_after),
            ProduceError::Retriable(_) => Some(Duration::ZERO),
            _ => None,
        };
        if let Some(at_least) = at_least.filter(|_| failing_for < self.config.give_up_after) {
            let failures = flight.failures + 1;
            // A Retry-After beyond the give-up bound is not waited out whole.
            let delay = self
                .backoff(failures)
                .max(at_least.min(self.config.give_up_after));
            return match self.table.fail(flight.push, now) {
                Ok(retry) => self.start_retry(retry, delay, failures, failing_since),
                Err(e) => debug!("failure of an unknown push: {e}"),
            };
        }
        let detail = match &error {
            ProduceError::Retriable(_) | ProduceError::Throttled { .. } => format!(
                "gave up after {} failed attempts over {}: {error}",
                flight.failures + 1,
                humantime::format_duration(Duration::from_secs(failing_for.as_secs()))
            ),
            _ => error.to_string(),
        };
        let answer = match error {
            ProduceError::Rejected(answer) => Some(answer),
            _ => None,
        };
        self.refuse(flight, detail, answer);
    }

    /// A push the broker will not take: its value goes to the dead-letter
    /// topic, and the key stays in flight (its events uncommitted, later
    /// ones merging) until it landed ([`TaskCore::refused_push_landed`]).
    fn refuse(&mut self, flight: Flight, detail: String, answer: Option<SinkAnswer>) {
        self.pushes_in_flight += 1; // until its dead letter lands
        let record = InputRecord {
            offset: -1,
            key: Some(flight.push.key.clone()),
            payload: flight.value.clone(),
            delete_version: None,
        };
        let version = Some(flight.push.version);
        self.send_dead_letter(
            record,
            (PUSH_REFUSED, detail),
            answer,
            version,
            Holds::Push(Box::new(flight)),
        );
    }

    /// A refused push is in the dead-letter topic: the key moves on as if it
    /// had been acknowledged (its marker closes, so neither the scan nor a
    /// restart pushes the refused value again; events merged meanwhile are
    /// pushed next).
    fn refused_push_landed(&mut self, flight: Flight, now: u64) {
        self.pushes_in_flight -= 1;
        // Downstream never got it: what it holds is not known any more.
        self.table.set_acked_digest(&flight.push.key, None);
        self.done_with(flight.push, flight.marker, now);
    }

    /// An acknowledged push: markT2 and the key's next step.
    fn acknowledge(&mut self, push: Push, marker: Marker, latency: Duration, now: u64) {
        self.metrics.emit(PushAcknowledged {
            compensation: push.compensation,
            latency,
        });
        if self.config.table.digests {
            let digest = self.digest(&push.payload);
            self.table.set_acked_digest(&push.key, Some(digest));
        }
        self.done_with(push, marker, now);
    }

    /// A push is done with (acknowledged, or its refusal dead-lettered):
    /// markT2 and the table's next step for the key. While closing there is
    /// no next step: the events merged behind the push stay uncommitted and
    /// are replayed by the next owner.
    fn done_with(&mut self, push: Push, marker: Marker, now: u64) {
        let running = self.phase == Phase::Running;
        let next = if running {
            match self.table.complete(&push.key, push.tn, now) {
                Ok(next) => next,
                Err(e) => return debug!("the end of an unknown push: {e}"),
            }
        } else {
            None
        };
        match next {
            // markT2 and the next push's markT1 in one write: {t1: next, t2:
            // this}, at the end of the turn (see `starting`). The markT2
            // written here is what the changelog gets if the next push is
            // parked instead (the two writes of a key in one turn are one
            // changelog record).
            Some(next) => {
                if self.config.max_pushes_in_flight != usize::MAX {
                    self.write_marker(&push.key, Some(&marker.acknowledged(push.tn)));
                }
                self.starting.push(next)
            }
            None => {
                // A delete's marker stays too (its version keeps a late older
                // event stale) until the sweep (`deletes.retention`).
                self.write_marker(&push.key, Some(&marker.acknowledged(push.tn)));
                self.report_keys()
            }
        }
        if !running {
            self.drained();
        }
    }

    /// The task claimed the partition at changelog offset `claim`, and
    /// restored through it (see [`crate::state::claim`]). From here on the
    /// partition's changelog should get the task's writes only; records of
    /// another writer between them are read ([`Action::ReadChangelog`],
    /// `processor::claim_watch`).
    pub fn claimed(&mut self, claim: i64) {
        self.claim = Some(ClaimWatch::new(claim, self.changelog_next));
    }

    /// Another writer's changelog records, read after
    /// [`Action::ReadChangelog`]:
    /// * a claim, or a record of a newer owner: another instance took the
    ///   partition over without this one hearing of it. The task drops it
    ///   as lost and fails, so the process restarts and rejoins rather than
    ///   act on a partition it does not own;
    /// * records of an earlier owner (late writes of a frozen or lost
    ///   instance, which do not count): each key's marker is written again,
    ///   so that once the changelog compacts, the late write is not its last
    ///   record.
    pub fn changelog_read(&mut self, records: Vec<OtherRecord>) {
        let Some(watch) = &mut self.claim else {
            return;
        };
        let others = watch.read(&records);
        if self.phase == Phase::Closed {
            return;
        }
        match others {
            Others::Superseded(offset) => {
                let reason = format!(
                    "partition {}: another instance claimed it (changelog offset {offset}) after this one did (offset {}): it was lost without notice; dropped without pushes, markers, commit or checkpoint",
                    self.config.partition,
                    watch.claim()
                );
                self.lose();
                self.actions.push_back(Action::Fail(reason));
            }
            Others::Late(keys) => self.write_markers_again(keys),
        }
    }

    /// A checkpoint at the changelog's acknowledged end, unless records of
    /// another writer behind it are not read yet (they may be another
    /// owner's, whose writes this store lacks).
    fn checkpoint(&mut self) {
        if self.claim.as_ref().is_some_and(ClaimWatch::unread) {
            warn!(
                partition = self.config.partition,
                "another writer's changelog records are not read yet: no checkpoint now"
            );
            return;
        }
        self.actions
            .push_back(Action::Checkpoint(self.changelog_next));
    }

    /// Writes the restored markers of keys whose last changelog record was
    /// superseded (an earlier owner's late write, see
    /// [`crate::state::claim`]) again, so that the late record is not the
    /// key's last when the changelog compacts. A key without a marker gets
    /// a tombstone.
    pub fn rewrite_shadowed(&mut self, keys: Vec<Bytes>) {
        self.write_markers_again(keys);
    }

    /// Writes each key's newest marker (a tombstone for none) to the
    /// changelog again, over another writer's record of it.
    fn write_markers_again(&mut self, keys: Vec<Bytes>) {
        for key in keys {
            match self.marker(&key) {
                Ok(marker) => self.write_marker(&key, marker.as_ref()),
                Err(e) => warn!(
                    partition = self.config.partition,
                    "cannot read a marker back to write it over another writer's: {e}"
                ),
            }
        }
    }

    /// Writes a key's marker (`None`: removes it): held for the changelog
    /// (see [`TaskCore::hand_markers_to_changelog`]), and in the store once
    /// the changelog acknowledged it.
    fn write_marker(&mut self, key: &Bytes, marker: Option<&Marker>) {
        self.unlogged.insert(key.clone(), marker.cloned());
    }

    /// A key's newest marker: held for the changelog, on its way there, or
    /// in the store.
    pub fn marker(&self, key: &Bytes) -> Result<Option<Marker>, StateError> {
        if let Some(held) = self.unlogged.get(key) {
            return Ok(held.clone());
        }
        let on_its_way = self.newest_write.get(key).and_then(|seq| {
            let oldest = self.changelog_writes.front()?.seq;
            self.changelog_writes.get((seq - oldest) as usize)
        });
        match on_its_way {
            Some(write) => Ok(write.marker.clone()),
            None => self.store.get(key),
        }
    }

    /// Whether a key has a marker newer than the store's, in memory.
    fn holds_marker(&self, key: &Bytes) -> bool {
        self.unlogged.contains_key(key) || self.newest_write.contains_key(key)
    }

    /// The store learns an acknowledged changelog record.
    fn store_acknowledged(&mut self, key: &Bytes, marker: Option<&Marker>) {
        let written = match marker {
            Some(marker) => self.store.put(key, marker).map_err(|e| ("write", e)),
            None => self.store.delete(key).map_err(|e| ("delete", e)),
        };
        if let Err((what, e)) = written {
            warn!(
                partition = self.config.partition,
                "store {what} failed: {e}"
            );
        }
    }

    /// Hands the held markers to the changelog, one record per key, after
    /// another attempt at the keys whose failed write could not be written
    /// again (see [`TaskCore::changelog_done`]).
    fn hand_markers_to_changelog(&mut self) {
        for key in self.commit_gate.retry() {
            match self.write_again(key) {
                Ok(write) => self.commit_gate.wrote_again(write),
                Err(e) => debug!(
                    partition = self.config.partition,
                    "marker still unreadable: {e}"
                ),
            }
        }
        for (key, marker) in std::mem::take(&mut self.unlogged) {
            self.write_changelog(key, marker);
        }
    }

    /// One changelog record (`None`: a tombstone).
    fn write_changelog(&mut self, key: Bytes, marker: Option<Marker>) {
        let value = marker.as_ref().map(|m| self.store.encode(m));
        self.changelog_seq += 1;
        self.newest_write.insert(key.clone(), self.changelog_seq);
        self.changelog_writes.push_back(ChangelogWrite {
            seq: self.changelog_seq,
            key: key.clone(),
            marker,
        });
        self.actions.push_back(Action::WriteChangelog {
            seq: self.changelog_seq,
            key,
            value,
        });
    }

    /// The oldest changelog write was acknowledged at `offset` (its marker
    /// goes to the store), or failed. A key whose write failed is written
    /// again, with the next hand-over of markers, with its *current* marker
    /// (re-sending the failed bytes after a newer write could let an older
    /// marker win compaction); no commit goes out until it is written, and
    /// then a held commit waits for the rewrite.
    ///
    /// A marker the changelog refuses as too large (a merge-patch document
    /// that grew past the topic's limit) is written again without its value
    /// (`Marker::cut`): the key keeps its version and tn, a restart seeds
    /// it as an empty document, and such a marker is neither a delete's nor
    /// re-pushed by compensation; better than a partition that never
    /// commits again.
    pub fn changelog_done(&mut self, now: u64, outcome: Result<i64, ProduceError>) {
        let Some(ChangelogWrite { seq, key, marker }) = self.changelog_writes.pop_front() else {
            return;
        };
        if self.newest_write.get(&key) == Some(&seq) {
            self.newest_write.remove(&key);
        }
        let ok = match outcome {
            Ok(offset) => {
                self.metrics.emit(ChangelogWritten(1));
                self.store_acknowledged(&key, marker.as_ref());
                self.changelog_next = self.changelog_next.max(offset + 1);
                let others = self.claim.as_mut().and_then(|w| w.acknowledged(offset));
                if let Some((from, to)) = others.filter(|_| self.phase != Phase::Closed) {
                    self.actions.push_back(Action::ReadChangelog { from, to });
                }
                if self.phase == Phase::Running {
                    self.release_held_commit(now);
                }
                true
            }
            Err(e) if matches!(self.phase, Phase::Flushing { .. }) => {
                // No write outlives the close: one landing after the next
                // owner restored would be missing from its store, or win
                // compaction over its newer marker. The close then commits
                // and checkpoints nothing, so the next owner replays from
                // the last commit, whose markers the changelog has.
                warn!(
                    partition = self.config.partition,
                    "changelog write failed while closing: {e}"
                );
                false
            }
            Err(ProduceError::Refused(e)) => {
                self.actions.push_back(Action::Fail(format!(
                    "the changelog topic refuses a marker for good ({e}); check its configuration \
                     (cleanup.policy=compact, no record policy against keyflight's markers) and ACLs"
                )));
                self.phase = Phase::Closed;
                return;
            }
            Err(e) => {
                // Written again with the next hand-over of markers (the
                // flush tick), not at once: a write the producer refuses
                // outright fails again at once, and retrying it in the same
                // turn would starve the loop's other work. No commit goes
                // out meanwhile.
                warn!(
                    partition = self.config.partition,
                    "changelog write failed, will write the key again: {e}"
                );
                if !self.holds_marker(&key) {
                    let marker = match (e, marker) {
                        (ProduceError::TooLarge(_), Some(marker)) => {
                            warn!(
                                partition = self.config.partition,
                                key = %String::from_utf8_lossy(&key),
                                "the changelog refuses the marker as too large; writing it without its value"
                            );
                            // Its value is in memory only from now on.
                            self.table.pin(&key);
                            Some(marker.cut())
                        }
                        (_, marker) => marker,
                    };
                    self.unlogged.insert(key.clone(), marker);
                }
                self.commit_gate.unwritten(key);
                false
            }
        };
        if let Phase::Flushing { until, ok: flushed } = &mut self.phase {
            if seq <= *until {
                *flushed &= ok;
            }
            self.flushed();
        }
    }

    /// Writes a key whose changelog write failed again, with its current
    /// marker: the new write's `seq`. An error if the marker cannot be read
    /// back; the commit gate then holds commits until a later attempt.
    fn write_again(&mut self, key: Bytes) -> Result<u64, StateError> {
        let marker = match self.unlogged.remove(&key) {
            Some(held) => Ok(held),
            None => self.marker(&key),
        };
        match marker {
            Ok(marker) => {
                self.write_changelog(key, marker);
                Ok(self.changelog_seq)
            }
            Err(e) => {
                self.commit_gate.unwritten(key);
                Err(e)
            }
        }
    }

    /// Sends a record to the dead-letter topic unchanged, holding its
    /// offset (or what `holds` says) until the dead letter is acknowledged.
    fn dead_letter(
        &mut self,
        record: InputRecord,
        reason: &'static str,
        detail: String,
        holds: Holds,
    ) {
        let offset = record.offset;
        match holds {
            Holds::Offset => {
                if let Err(e) = self.table.hold(offset) {
                    return warn!(
                        partition = self.config.partition,
                        offset, "cannot hold the offset of a dead letter: {e}"
                    );
                }
            }
            Holds::Commits => self.commits_held += 1,
            Holds::Push(_) => {}
        }
        self.send_dead_letter(record, (reason, detail), None, None, holds);
    }

    fn send_dead_letter(
        &mut self,
        record: InputRecord,
        (reason, detail): (&'static str, String),
        answer: Option<SinkAnswer>,
        version: Option<u64>,
        holds: Holds,
    ) {
        self.metrics.emit(DeadLettered {
            offset: record.offset,
            reason,
            detail: &detail,
        });
        self.next_dead_letter += 1;
        let letter = DeadLetter {
            id: self.next_dead_letter,
            record,
            reason,
            detail,
            version,
            cut_to: None,
            answer,
            holds,
            failures: 0,
        };
        self.dead_letters.insert(letter.id, letter.clone());
        self.actions.push_back(Action::DeadLetter {
            letter,
            delay: Duration::ZERO,
        });
    }

    /// A dead letter's outcome. Acknowledged: what it held goes. Refused as
    /// too large: written again at once with its value cut to what the
    /// topic takes, then with no value at all. A retriable failure (the
    /// topic away, a broker down): written again after the backoff, and no
    /// more records are taken until it lands, so the record is never lost.
    /// One the topic refuses for good (also without its value) would never
    /// land and pin its partition: it is given up, logged with its record's
    /// place and counted, and what it held goes.
    pub fn dead_letter_done(&mut self, now: u64, id: u64, outcome: Result<(), ProduceError>) {
        if matches!(self.phase, Phase::Flushing { .. } | Phase::Closed) {
            return; // abandoned at the close's deadline
        }
        let Some(letter) = self.dead_letters.get_mut(&id) else {
            return;
        };
        let cut_to = match (&outcome, letter.cut_to) {
            (Ok(()), _) => None,
            (Err(ProduceError::TooLarge(_)), None) => Some(self.config.dead_letter_max_value),
            (Err(ProduceError::TooLarge(_)), Some(cut)) if cut > 0 => Some(0),
            (Err(ProduceError::Retriable(e)), _) => {
                letter.failures += 1;
                let (letter, failures) = (letter.clone(), letter.failures);
                warn!(
                    partition = self.config.partition,
                    offset = letter.record.offset,
                    "dead letter not written, retrying (no more records until it is): {e}"
                );
                self.dead_letters_failing.insert(id);
                return self.actions.push_back(Action::DeadLetter {
                    letter,
                    delay: self.backoff(failures),
                });
            }
            (Err(e), _) => {
                self.metrics.emit(DeadLetterAbandoned {
                    offset: letter.record.offset,
                    key: letter.record.key.as_deref().unwrap_or_default(),
                    reason: letter.reason,
                    error: &e.to_string(),
                });
                None
            }
        };
        if let Some(cut_to) = cut_to {
            letter.cut_to = Some(cut_to);
            let letter = letter.clone();
            return self.actions.push_back(Action::DeadLetter {
                letter,
                delay: Duration::ZERO,
            });
        }
        self.dead_letters_failing.remove(&id);
        let Some(letter) = self.dead_letters.remove(&id) else {
            return;
        };
        match letter.holds {
            Holds::Offset => {
                self.table.release(letter.record.offset);
            }
            Holds::Commits => self.commits_held -= 1,
            Holds::Push(flight) => return self.refused_push_landed(*flight, now),
        }
        if self.phase != Phase::Running {
            self.drained();
        }
    }

    /// A timer fired. The compensation scan returns what it did.
    pub fn tick(&mut self, now: u64, timer: Timer) -> Option<Scanned> {
        if self.phase != Phase::Running {
            return None;
        }
        match timer {
            Timer::Commit => self.commit(now),
            Timer::ChangelogFlush => self.hand_markers_to_changelog(),
            Timer::Compensation => {
                self.sweep_deletes(now);
                self.sweep_expired(now);
                return Some(self.compensate(now));
            }
            Timer::Wake => {
                for push in self.table.wake(now) {
                    self.start_push(push, Duration::ZERO, now);
                }
            }
        }
        None
    }

    /// When to tick [`Timer::Wake`] next (`None`: no key waits in a window,
    /// or the task is closing; a closing task's waiting events stay
    /// uncommitted for the next owner).
    pub fn next_wake(&self) -> Option<u64> {
        (self.phase == Phase::Running)
            .then(|| self.table.next_wake())
            .flatten()
    }

    /// Removes the state of keys deleted longer than `delete_retention` ago
    /// (and idle since): the store's marker, and the changelog's record
    /// with a tombstone. The table keeps the key's version while it runs.
    fn sweep_deletes(&mut self, now: u64) {
        let retention = self.config.delete_retention.as_nanos() as u64;
        let Some(before) = now.checked_sub(retention) else {
            return;
        };
        let deleted = self.store.deleted_before(before);
        self.forget_idle(deleted);
    }

    /// Removes the state of those of `keys` that are idle (a tombstone to
    /// the changelog, then out of the store); a key with a push in flight,
    /// waiting, or with a marker on its way was written again since.
    /// Returns how many were removed.
    fn forget_idle(&mut self, keys: Vec<Bytes>) -> usize {
        let mut removed = 0;
        for key in keys {
            if self.table.in_flight(&key) || self.holds_marker(&key) {
                continue;
            }
            self.write_marker(&key, None);
            removed += 1;
        }
        removed
    }

    /// One step of the expiry sweep (`state.ttl`): of the next
    /// [`EXPIRY_STEP`] markers of the store, those closed longer than the
    /// TTL ago whose key is idle are removed like a swept delete's
    /// ([`TaskCore::forget_idle`]); an open marker is compensation's, never
    /// expired.
    fn sweep_expired(&mut self, now: u64) {
        let ttl = self.config.state_ttl.as_nanos().min(u64::MAX as u128) as u64;
        let Some(before) = now.checked_sub(ttl).filter(|_| ttl > 0) else {
            return;
        };
        let step = self
            .store
            .closed_before(self.sweep_cursor.as_deref(), before, EXPIRY_STEP);
        let (expired, next) = match step {
            Ok(step) => step,
            Err(e) => {
                return warn!(
                    partition = self.config.partition,
                    "the expiry sweep could not read the store (tried again at the next scan): {e}"
                )
            }
        };
        self.sweep_cursor = next;
        let removed = self.forget_idle(expired);
        if removed > 0 {
            self.metrics.emit(MarkersExpired(removed));
        }
    }

    /// Commits the covered position once the changelog has caught up with
    /// it: at once if every write is acknowledged, else held until the
    /// writes made so far are (see [`TaskCore::release_held_commit`]).
    fn commit(&mut self, now: u64) {
        if self.commits_held > 0 {
            return; // a redelivered record's dead letter has not landed
        }
        let Some(position) = self.table.commit_position() else {
            return;
        };
        if self.committed == Some(position) {
            return;
        }
        // The markers behind `position` may still be held: write them now,
        // and hold the commit until they are acknowledged.
        self.hand_markers_to_changelog();
        self.commit_gate.ask(position, self.changelog_seq);
        self.release_held_commit(now);
    }

    /// The commit of `position` did not go through (the broker refused it,
    /// or it could not be sent): the next commit tick asks for it again. A
    /// newer commit sent since makes the failure moot.
    pub fn commit_failed(&mut self, position: i64) {
        if self.committed == Some(position) {
            self.committed = None;
        }
    }

    /// Sends the held commit if the markers behind it are durable (see
    /// [`CommitGate::release`]), and with it, every `checkpoint_every`, a
    /// checkpoint.
    fn release_held_commit(&mut self, now: u64) {
        let oldest_pending = self.changelog_writes.front().map(|w| w.seq);
        let Some(position) = self.commit_gate.release(oldest_pending) else {
            return; // the markers behind the offsets are not durable yet
        };
        self.committed = Some(position);
        self.actions.push_back(Action::Commit(position));
        // A checkpoint flushes the store's memtables, synchronously: not at
        // every commit (the stall shows in the push latency), but often
        // enough that a restart after a crash replays little.
        let every = self.config.checkpoint_every.as_nanos() as u64;
        if now.saturating_sub(self.checkpointed_at) >= every {
            self.checkpointed_at = now;
            self.checkpoint();
        }
    }

    /// The compensation scan: re-push open markers older than the grace
    /// period whose key is not in flight, through the table.
    fn compensate(&mut self, now: u64) -> Scanned {
        let grace = self.config.compensation_grace.as_nanos() as u64;
        let due = match crate::compensation::due(&self.store, now, grace) {
            Ok(due) => due,
            Err(e) => {
                warn!(
                    partition = self.config.partition,
                    "compensation scan failed: {e}"
                );
                return Scanned::default();
            }
        };
        let mut repushed = 0;
        for (key, marker) in due {
            // A key whose newest marker is in memory has moved on from the
            // store's open one (a marker in memory is open only while its
            // push is in flight).
            if self.table.in_flight(&key) || self.holds_marker(&key) {
                continue;
            }
            if marker.value_cut {
                // Its value never reached the changelog: nothing to re-push.
                warn!(
                    partition = self.config.partition,
                    key = %String::from_utf8_lossy(&key),
                    version = marker.version,
                    "an open marker without its value (too large for the changelog) cannot be re-pushed"
                );
                continue;
            }
            if !self.table.knows(&key) {
                // As for an event of an unknown key: the table learns the
                // marker first (the push's marker keeps its t2).
                self.seed_from(&key, &marker);
            }
            let payload = self.codec.stored(marker.value.as_ref());
            let stored = (marker.version, marker.offset);
            if let Some(push) = self
                .table
                .compensate(&key, stored.0, stored.1, payload, now)
            {
                repushed += 1;
                self.start_push(push, Duration::ZERO, now);
            }
        }
        Scanned {
            open_markers: self.store.open_count(),
            repushed,
        }
    }

    /// Closing (revoke or shutdown): stop taking events, let pushes and
    /// dead letters in flight finish, then flush the markers, checkpoint and
    /// report the final position. The shell bounds the wait with
    /// [`TaskCore::close_timed_out`].
    pub fn close(&mut self) {
        if self.phase != Phase::Running {
            return;
        }
        self.phase = Phase::Draining;
        // Unprocessed records stay uncommitted: the next owner reads them.
        self.inbox = Vec::new().into_iter();
        // Pushes started this turn and not produced (no marker written
        // yet): their events are not committed either, and the next owner
        // replays them.
        self.starting.clear();
        self.drained();
    }

    /// The partition was lost: taken away without a revoke (a session that
    /// expired, a process that froze), so another member may own it and
    /// have written newer pushes and markers already. The task drops it at
    /// once: no further push, marker write, commit or checkpoint (anything
    /// it wrote now could land after the new owner's writes, win the
    /// changelog's compaction, or checkpoint past them). What is in flight
    /// is abandoned; the next owner replays from the last commit. The next
    /// store opened on this host starts from its last checkpoint, which
    /// claims only what the changelog acknowledged, and replays the rest.
    pub fn lose(&mut self) {
        if self.phase == Phase::Closed {
            return;
        }
        self.phase = Phase::Closed;
        self.inbox = Vec::new().into_iter();
        self.starting.clear();
        self.parked.clear();
        self.unlogged.clear();
        self.actions.clear();
        self.pushes_in_flight = 0;
        self.dead_letters.clear();
        self.dead_letters_failing.clear();
        self.actions.push_back(Action::Closed(None));
    }

    /// The close's wait for pushes and dead letters ran out: they are
    /// abandoned (their events stay uncommitted and are replayed).
    pub fn close_timed_out(&mut self) {
        if self.phase != Phase::Draining {
            return;
        }
        warn!(
            partition = self.config.partition,
            pending = self.pushes_in_flight,
            "pushes still in flight at the shutdown timeout; their events will be replayed"
        );
        self.pushes_in_flight = 0;
        self.dead_letters.clear();
        self.dead_letters_failing.clear();
        self.drained();
    }

    /// While draining: once nothing is in flight, hand every held marker to
    /// the changelog and wait for those writes.
    fn drained(&mut self) {
        if self.phase != Phase::Draining
            || self.pushes_in_flight > 0
            || !self.dead_letters.is_empty()
        {
            return;
        }
        self.hand_markers_to_changelog();
        self.phase = Phase::Flushing {
            until: self.changelog_seq,
            ok: !self.commit_gate.is_blocked(),
        };
        self.flushed();
    }

    /// While flushing: once the writes it waits for are answered, the
    /// checkpoint and the final position (only if they all succeeded), and
    /// the end.
    fn flushed(&mut self) {
        let Phase::Flushing { until, ok } = self.phase else {
            return;
        };
        if self
            .changelog_writes
            .front()
            .is_some_and(|w| w.seq <= until)
        {
            return;
        }
        // A checkpoint claims the store is complete up to what the
        // changelog acknowledged: after a failed flush the store holds
        // markers the changelog may never get, so there is none, and the
        // next start here restores in full. Nor is anything committed.
        let position = if ok {
            self.checkpoint();
            // Nor past a redelivered record whose dead letter was abandoned.
            self.table
                .commit_position()
                .filter(|_| self.commits_held == 0)
        } else {
            None
        };
        self.actions.push_back(Action::Closed(position));
        self.phase = Phase::Closed;
    }
}
