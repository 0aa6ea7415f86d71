//! A deterministic simulation of one partition's task core against a model
//! broker, with crashes, restarts and a second owner.
//!
//! The model broker keeps a log per topic: the input, `events.pushed`, the
//! dead-letter topic, and the changelog (which compacts: the last record of
//! each key stays, offsets are kept). Every action the core asks for is
//! carried out against it with a random latency and, while faults are on, a
//! random failure; pushes, changelog writes and dead letters complete in
//! any order across topics, changelog writes in order among themselves.
//!
//! Each host has a disk: the store image at its last checkpoint and the
//! checkpoint offset (the real store writes its checkpoint file only after
//! a flush and removes it when it opens). A crash happens between two
//! actions, at a chosen action boundary: the owner's queued writes land or
//! not (changelog writes as a prefix, they share a partition), its store
//! falls back to the disk image plus a random prefix of the store's writes
//! since (RocksDB flushes full memtables on its own, every column family
//! at once), and a new owner restores from disk and the changelog. A revoke is a graceful handover to an owner on either host.
//!
//! The oracle is independent of keyflight's code: the expected final value
//! of every key comes from the input alone, coverage is checked against
//! the model's logs, and the store after a restore against a fold of the
//! changelog.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use keyflight::codec::{Codec, InputFormat};
use keyflight::engine::{MergePolicy, TableConfig, Windows};
use keyflight::metrics::Metrics;
use keyflight::processor::task::core::{OtherRecord, Scanned};
use keyflight::processor::task::core::{ProduceError, SinkAnswer, PUSH_REFUSED};
use keyflight::processor::task::{
    Action, CoreConfig, DeadLetter, Flight, InputRecord, TaskCore, Timer,
};
use keyflight::state::claim::Claims;
use keyflight::state::{Marker, MarkerCodec, MarkerStore, StateError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

/// Virtual milliseconds, as nanoseconds (the core's clock unit).
const MS: u64 = 1_000_000;
/// The simulation's epoch: tn values are large and positive, like real ones.
const EPOCH: u64 = 1_700_000_000_000 * MS;

// ---------------------------------------------------------------------------
// The model store.

/// A host's disk: what survives a crash.
#[derive(Clone, Debug, Default)]
pub struct Disk {
    /// The store as of the last checkpoint.
    image: BTreeMap<Bytes, Marker>,
    /// The checkpoint file: the changelog offset the image is complete up to.
    checkpoint: Option<i64>,
    /// The owner whose store wrote the checkpoint.
    written_by: u32,
    /// The newest claim when the checkpoint was written.
    claim: Option<i64>,
}

/// The store of one owner: its markers in memory, and the writes since
/// its last checkpoint (any prefix of which a crash may leave on disk).
pub struct ModelStore {
    markers: RefCell<BTreeMap<Bytes, Marker>>,
    since_checkpoint: RefCell<Vec<(Bytes, Option<Marker>)>>,
    codec: MarkerCodec,
}

impl ModelStore {
    pub fn new(markers: BTreeMap<Bytes, Marker>) -> Self {
        ModelStore {
            markers: RefCell::new(markers),
            since_checkpoint: RefCell::default(),
            codec: MarkerCodec::new(),
        }
    }
}

/// A task core over an empty model store, as the simulation configures it.
pub fn new_core(policy: MergePolicy, metrics: &Arc<Metrics>) -> TaskCore<ModelStore> {
    let store = ModelStore::new(BTreeMap::new());
    core_with(policy, 4, Timing::NEVER, store, 0, metrics, EPOCH)
}

/// A task core over `store` (latest policy), as [`new_core`] but for what
/// `configure` changes, e.g. `|c| c.state_ttl = Duration::from_secs(30)`.
pub fn configured_core(
    store: ModelStore,
    metrics: &Arc<Metrics>,
    configure: impl FnOnce(&mut CoreConfig),
) -> TaskCore<ModelStore> {
    let mut config = core_config(MergePolicy::Latest, 4, Timing::NEVER);
    configure(&mut config);
    core_from(config, store, 0, metrics, EPOCH)
}

/// A core's clocks and limits that a schedule sets.
#[derive(Clone, Copy)]
struct Timing {
    checkpoint_every: Duration,
    give_up_after: Duration,
    /// Idle keys the table keeps in memory (`state.cached_keys`).
    cached_keys: usize,
    windows: Windows,
    /// Pushes on their way at once (the HTTP sink's `max_in_flight`).
    push_slots: usize,
}

impl Timing {
    const NEVER: Timing = Timing {
        checkpoint_every: Duration::from_secs(3600),
        give_up_after: Duration::from_secs(3600),
        cached_keys: usize::MAX,
        windows: Windows {
            delay: 0,
            max_delay: 0,
            min_interval: 0,
        },
        push_slots: usize::MAX,
    };
}

/// A task core as the simulation configures it (JSON input, version field
/// `v`, the model's grace period and retry backoff).
fn core_with(
    policy: MergePolicy,
    max_active_keys: usize,
    timing: Timing,
    store: ModelStore,
    changelog_next: i64,
    metrics: &Arc<Metrics>,
    now: u64,
) -> TaskCore<ModelStore> {
    let config = core_config(policy, max_active_keys, timing);
    core_from(config, store, changelog_next, metrics, now)
}

fn core_config(
    policy: MergePolicy,
    max_active_keys: usize,
    Timing {
        checkpoint_every,
        give_up_after,
        cached_keys,
        windows,
        push_slots,
    }: Timing,
) -> CoreConfig {
    CoreConfig {
        partition: 0,
        table: TableConfig {
            policy,
            max_active_keys,
            cached_keys,
            windows,
            ..TableConfig::default()
        },
        compensation_grace: Duration::from_millis(GRACE),
        checkpoint_every,
        retry_backoff: Duration::from_millis(100),
        max_retry_backoff: Duration::from_millis(800),
        give_up_after,
        dead_letter_max_value: 1 << 20,
        delete_retention: Duration::from_secs(3600),
        state_ttl: Duration::ZERO,
        max_pushes_in_flight: push_slots,
    }
}

fn core_from(
    config: CoreConfig,
    store: ModelStore,
    changelog_next: i64,
    metrics: &Arc<Metrics>,
    now: u64,
) -> TaskCore<ModelStore> {
    let codec = Arc::new(Codec::new(InputFormat::Json, config.table.policy, "v"));
    TaskCore::new(
        config,
        codec,
        store,
        changelog_next,
        metrics.partition(0),
        now,
    )
}

impl MarkerStore for ModelStore {
    fn get(&self, key: &[u8]) -> Result<Option<Marker>, StateError> {
        Ok(self.markers.borrow().get(key).cloned())
    }
    fn put(&self, key: &[u8], marker: &Marker) -> Result<(), StateError> {
        let key = Bytes::copy_from_slice(key);
        self.markers
            .borrow_mut()
            .insert(key.clone(), marker.clone());
        self.since_checkpoint
            .borrow_mut()
            .push((key, Some(marker.clone())));
        Ok(())
    }
    fn delete(&self, key: &[u8]) -> Result<(), StateError> {
        self.markers.borrow_mut().remove(key);
        self.since_checkpoint
            .borrow_mut()
            .push((Bytes::copy_from_slice(key), None));
        Ok(())
    }
    fn open_markers(&self, started_before: u64) -> Result<Vec<(Bytes, Marker)>, StateError> {
        Ok(self
            .markers
            .borrow()
            .iter()
            .filter(|(_, m)| m.is_open() && m.t1 <= started_before)
            .map(|(k, m)| (k.clone(), m.clone()))
            .collect())
    }
    fn deleted_before(&self, acknowledged_before: u64) -> Vec<Bytes> {
        self.markers
            .borrow()
            .iter()
            .filter(|(_, m)| m.is_deleted() && m.t2 <= acknowledged_before)
            .map(|(k, _)| k.clone())
            .collect()
    }
    fn closed_before(
        &self,
        after: Option<&[u8]>,
        acknowledged_before: u64,
        limit: usize,
    ) -> Result<(Vec<Bytes>, Option<Bytes>), StateError> {
        let markers = self.markers.borrow();
        let from = match after {
            Some(key) => std::ops::Bound::Excluded(Bytes::copy_from_slice(key)),
            None => std::ops::Bound::Unbounded,
        };
        let step: Vec<(Bytes, Marker)> = markers
            .range((from, std::ops::Bound::Unbounded))
            .take(limit + 1)
            .map(|(k, m)| (k.clone(), m.clone()))
            .collect();
        let more = step.len() > limit;
        let step = &step[..step.len().min(limit)];
        let expired = step
            .iter()
            .filter(|(_, m)| !m.is_open() && !m.is_deleted() && m.t2 <= acknowledged_before)
            .map(|(k, _)| k.clone())
            .collect();
        let next = more.then(|| step.last().map(|(k, _)| k.clone())).flatten();
        Ok((expired, next))
    }
    fn open_count(&self) -> usize {
        self.markers
            .borrow()
            .values()
            .filter(|m| m.is_open())
            .count()
    }
    fn encode(&self, marker: &Marker) -> Vec<u8> {
        self.codec.encode(marker)
    }
}

// ---------------------------------------------------------------------------
// The model broker.

/// One changelog record: the marker (`None`: a tombstone) and, for checks,
/// the version it stands for (a tombstone: the version of the delete whose
/// acknowledgement removed the key).
#[derive(Clone, Debug)]
struct ChangelogRecord {
    offset: i64,
    key: Bytes,
    marker: Option<Marker>,
    version: u64,
    /// The claim of the owner that wrote it (a claim record: its own).
    owner: i64,
    claim: bool,
}

/// A push as it landed in `events.pushed`.
#[derive(Clone, Debug)]
pub struct Pushed {
    pub key: Bytes,
    pub version: u64,
    pub value: Option<serde_json::Value>,
    pub owner: u32,
    /// The input offset of the push's newest event (`None`: not known).
    pub offset: Option<i64>,
}

impl Pushed {
    /// A refused push's dead letter, as it lands.
    fn refused(letter: &DeadLetter, owner: u32) -> Pushed {
        Pushed {
            key: letter
                .record
                .key
                .clone()
                .expect("a refused push has its key"),
            version: letter.version.expect("a refused push has its version"),
            value: letter
                .record
                .payload
                .as_ref()
                .map(|v| serde_json::from_slice(v).expect("pushes are JSON")),
            owner,
            offset: None,
        }
    }

    /// A push of `owner` as it lands.
    fn of(flight: &Flight, owner: u32) -> Pushed {
        Pushed {
            key: flight.push.key.clone(),
            version: flight.push.version,
            value: flight
                .value
                .as_ref()
                .map(|v| serde_json::from_slice(v).expect("pushes are JSON")),
            owner,
            offset: flight.push.offset,
        }
    }
}

#[derive(Default)]
struct Broker {
    /// The compacted changelog (what a restore reads).
    changelog: Vec<ChangelogRecord>,
    /// Every changelog record that ever landed, uncompacted (for checks).
    changelog_history: Vec<ChangelogRecord>,
    changelog_next: i64,
    pushed: Vec<Pushed>,
    dead_letters: Vec<i64>,
    committed: i64,
}

impl Broker {
    fn append_changelog(
        &mut self,
        key: Bytes,
        marker: Option<Marker>,
        version: u64,
        owner: i64,
    ) -> i64 {
        self.append(ChangelogRecord {
            offset: self.changelog_next,
            key,
            marker,
            version,
            owner,
            claim: false,
        })
    }

    /// A new owner's claim (its own key, so compaction keeps it): its
    /// offset, the owner's id.
    fn append_claim(&mut self) -> i64 {
        let offset = self.changelog_next;
        self.append(ChangelogRecord {
            offset,
            key: Bytes::from(format!("claim/{offset}")),
            marker: None,
            version: 0,
            owner: offset,
            claim: true,
        })
    }

    /// Appends a record at the next offset (its `offset`); returns it.
    fn append(&mut self, record: ChangelogRecord) -> i64 {
        debug_assert_eq!(record.offset, self.changelog_next);
        self.changelog_next += 1;
        self.changelog.push(record.clone());
        self.changelog_history.push(record);
        self.changelog_next - 1
    }

    /// A restore with keyflight's rule for which records count: from a
    /// checkpoint `(next, claim)` over `image`, or from the start.
    fn restore(
        &self,
        image: BTreeMap<Bytes, Marker>,
        checkpoint: Option<(i64, Option<i64>)>,
    ) -> (BTreeMap<Bytes, Marker>, i64, Claims) {
        let (mut markers, from, mut claims) = match checkpoint {
            Some((next, claim)) => (image, next, Claims::from(claim)),
            None => (BTreeMap::new(), 0, Claims::from(None)),
        };
        for r in self.changelog.iter().filter(|r| r.offset >= from) {
            if r.claim {
                claims.claim(r.offset);
                continue;
            }
            if !claims.counts(&r.key, Some(r.owner)) {
                continue;
            }
            match &r.marker {
                Some(m) => markers.insert(r.key.clone(), m.clone()),
                None => markers.remove(&r.key),
            };
        }
        (markers, from, claims)
    }

    /// Log compaction: the last record of each key stays (tombstones too),
    /// at its offset.
    fn compact(&mut self) {
        let mut last: HashMap<Bytes, i64> = HashMap::new();
        for r in &self.changelog {
            last.insert(r.key.clone(), r.offset);
        }
        self.changelog.retain(|r| last[&r.key] == r.offset);
    }

    /// The newest version the changelog history holds for a key in records
    /// that count, and whether the last of them is an open marker.
    fn logged(&self, key: &[u8]) -> Option<(u64, bool)> {
        let mut newest: Option<(u64, bool)> = None;
        let mut newest_claim = -1;
        for r in &self.changelog_history {
            if r.claim {
                newest_claim = r.offset;
            }
            if r.key != key || r.owner < newest_claim {
                continue;
            }
            let open = r.marker.as_ref().is_some_and(Marker::is_open);
            newest = Some((newest.map_or(r.version, |(v, _)| v.max(r.version)), open));
        }
        newest
    }
}

/// Each key's last record that counts. A record written by an owner after
/// a newer claim landed does not count: the owner had lost the partition
/// by then.
fn counting<'a>(
    records: impl IntoIterator<Item = &'a ChangelogRecord>,
) -> BTreeMap<Bytes, &'a ChangelogRecord> {
    let mut last = BTreeMap::new();
    let mut newest_claim = -1;
    for r in records {
        if r.claim {
            newest_claim = r.offset;
        } else if r.owner >= newest_claim {
            last.insert(r.key.clone(), r);
        }
    }
    last
}

// ---------------------------------------------------------------------------
// Schedules.

/// One input record and what the oracle knows of it.
#[derive(Clone, Debug)]
pub struct InputEvent {
    pub at: u64,
    pub key: u32,
    /// The event's version (its offset, or an older one for a straggler);
    /// `None`: a delete, versioned by its offset.
    pub version: Option<u64>,
    /// `None`: a delete. Garbage: not JSON, dead-lettered.
    pub value: Option<serde_json::Value>,
    pub garbage: bool,
}

impl InputEvent {
    fn record(&self, offset: i64) -> InputRecord {
        let key = format!("k{}", self.key);
        let payload = if self.garbage {
            Some(b"not json".to_vec())
        } else {
            self.value.as_ref().map(|v| v.to_string().into_bytes())
        };
        InputRecord::copied(offset, Some(key.as_bytes()), payload.as_deref())
    }
}

/// Each input's version under keyflight's rule: its own, else its offset;
/// a delete without one takes its key's newest version (0 before any) and
/// is always accepted. `None` for garbage (dead-lettered).
pub fn versions(inputs: &[InputEvent]) -> Vec<Option<(u64, bool)>> {
    let mut newest: HashMap<u32, u64> = HashMap::new();
    inputs
        .iter()
        .enumerate()
        .map(|(offset, input)| {
            if input.garbage {
                return None;
            }
            let known = newest.get(&input.key).copied();
            if input.version.is_none() && input.value.is_none() {
                newest.entry(input.key).or_insert(0);
                return Some((known.unwrap_or(0), true));
            }
            let version = input.version.unwrap_or(offset as u64);
            if known.is_some_and(|n| version <= n) {
                return Some((version, false));
            }
            newest.insert(input.key, version);
            Some((version, true))
        })
        .collect()
}

/// What can go wrong in a schedule.
#[derive(Clone, Debug)]
pub struct Faults {
    /// Crashes, each at an action boundary (the index of the action before
    /// which the owner dies).
    pub crashes: Vec<usize>,
    /// Graceful handovers, at these times (ms).
    pub revokes: Vec<u64>,
    /// Failure rates of pushes, changelog writes and dead letters while
    /// faults are on.
    pub push_failure: f64,
    /// Of the failed pushes, the share the broker refuses for good (too
    /// large, invalid): dead-lettered as `push-refused`.
    pub push_refusal: f64,
    /// How long a key's pushes may fail with retriable errors before they
    /// are dead-lettered (ms).
    pub give_up_after: u64,
    pub changelog_failure: f64,
    pub dead_letter_failure: f64,
    /// Failure rate of commits (the broker refuses or the request is lost).
    pub commit_failure: f64,
    /// Until when (ms) failures are injected; afterwards the run settles.
    pub until: u64,
    /// Take mid-run checkpoints (every `checkpoint_every` ms of commits).
    pub checkpoint_every: u64,
    /// The owner freezes at this time (ms) and wakes at the second; a new
    /// owner takes the partition meanwhile. The woken one hears that its
    /// assignment was lost and drops the partition (`TaskCore::lose`); what
    /// it had handed to the broker before it froze still lands.
    pub freeze: Option<(u64, u64)>,
    /// The owner loses the partition at this time (ms) without knowing (its
    /// session expired) and goes on working; a new owner takes over; at the
    /// second time it hears of it and drops the partition
    /// (`TaskCore::lose`).
    pub lost: Option<(u64, u64)>,
    /// How long a graceful close waits for pushes in flight (ms).
    pub close_timeout: u64,
}

/// One random schedule.
#[derive(Clone, Debug)]
pub struct Schedule {
    pub inputs: Vec<InputEvent>,
    pub policy: MergePolicy,
    pub max_active_keys: usize,
    /// Idle keys the cores keep in memory; beyond, they read markers back.
    pub cached_keys: usize,
    /// Push shaping (ns).
    pub windows: Windows,
    /// Pushes on their way at once per core (`usize::MAX`: the Kafka sink).
    pub push_slots: usize,
    pub faults: Faults,
}

/// Which fault classes a schedule generator may use.
#[derive(Clone, Copy, Debug)]
pub struct FaultClasses {
    pub mid_run_checkpoints: bool,
    pub freeze: bool,
    pub lost: bool,
    /// Closes whose wait for pushes in flight runs out.
    pub close_timeouts: bool,
    /// Stragglers older than a delete of their key, which a restart or a
    /// move may take for new (the delete removed the key's marker).
    pub stragglers_after_deletes: bool,
}

impl FaultClasses {
    /// What keyflight holds against today.
    pub const HANDLED: FaultClasses = FaultClasses {
        mid_run_checkpoints: true,
        freeze: false,
        lost: false,
        close_timeouts: false,
        stragglers_after_deletes: true,
    };
}

pub fn random_schedule(rng: &mut ChaCha8Rng, classes: FaultClasses) -> Schedule {
    let keys = rng.random_range(1..=5u32);
    let events = rng.random_range(1..=60usize);
    let mut at = 0;
    let mut newest: HashMap<u32, u64> = HashMap::new();
    let mut deleted: std::collections::HashSet<u32> = Default::default();
    let inputs: Vec<InputEvent> = (0..events)
        .map(|offset| {
            at += match rng.random_range(0..10) {
                0..=4 => 0, // a burst: same instant
                5..=8 => rng.random_range(1..30),
                _ => rng.random_range(30..400),
            };
            let key = rng.random_range(0..keys);
            let garbage = rng.random_bool(0.03);
            let delete = !garbage && rng.random_bool(0.06);
            let straggler = !garbage
                && !delete
                && newest.contains_key(&key)
                && (classes.stragglers_after_deletes || !deleted.contains(&key))
                && rng.random_bool(0.08);
            if delete {
                deleted.insert(key);
            }
            let version = if delete {
                None
            } else if straggler {
                Some(rng.random_range(0..=newest[&key]))
            } else {
                Some(offset as u64)
            };
            let value = (!delete).then(|| {
                json!({"v": version, "key": key, ("f".to_string() + &rng.random_range(0..3).to_string()): offset})
            });
            if !garbage {
                let v = version.unwrap_or(offset as u64);
                let n = newest.entry(key).or_insert(v);
                *n = (*n).max(v);
            }
            InputEvent {
                at,
                key,
                version,
                value,
                garbage,
            }
        })
        .collect();
    let span = at + 500;
    let crashes = (0..rng.random_range(0..=2))
        .map(|_| rng.random_range(0..events * 4 + 4))
        .collect();
    let revokes = (0..rng.random_range(0..=2))
        .map(|_| rng.random_range(0..span))
        .collect();
    let failing = rng.random_bool(0.5);
    let rate = |rng: &mut ChaCha8Rng| {
        if failing {
            rng.random_range(0.0..0.3)
        } else {
            0.0
        }
    };
    let faults = Faults {
        crashes,
        revokes,
        push_failure: rate(rng),
        push_refusal: if rng.random_bool(0.3) {
            rng.random_range(0.0..1.0)
        } else {
            0.0
        },
        give_up_after: if rng.random_bool(0.3) {
            rng.random_range(50..1000)
        } else {
            3_600_000
        },
        changelog_failure: rate(rng),
        dead_letter_failure: rate(rng),
        commit_failure: rate(rng),
        until: span,
        checkpoint_every: if classes.mid_run_checkpoints && rng.random_bool(0.5) {
            rng.random_range(0..200)
        } else {
            u64::MAX / MS
        },
        freeze: (classes.freeze && rng.random_bool(0.7)).then(|| {
            let from = rng.random_range(0..span);
            (from, from + rng.random_range(300..1500))
        }),
        lost: (classes.lost && rng.random_bool(0.7)).then(|| {
            let from = rng.random_range(0..span);
            (from, from + SESSION + rng.random_range(0..1000))
        }),
        close_timeout: if classes.close_timeouts {
            rng.random_range(1..300)
        } else {
            CLOSE_TIMEOUT
        },
    };
    Schedule {
        inputs,
        policy: if rng.random_bool(0.5) {
            MergePolicy::Latest
        } else {
            MergePolicy::JsonMergePatch
        },
        max_active_keys: rng.random_range(1..=4),
        cached_keys: if rng.random_bool(0.5) {
            usize::MAX
        } else {
            rng.random_range(1..=3)
        },
        windows: if rng.random_bool(0.5) {
            Windows::default()
        } else {
            let delay = rng.random_range(0..40) * MS;
            Windows {
                delay,
                max_delay: delay * rng.random_range(1..4),
                min_interval: rng.random_range(0..60) * MS,
            }
        },
        push_slots: if rng.random_bool(0.5) {
            usize::MAX
        } else {
            rng.random_range(1..=2)
        },
        faults,
    }
}

/// The expected final (version, value) of every key that has an accepted
/// event: its accepted events folded in offset order with the policy.
pub fn expected_finals(
    inputs: &[InputEvent],
    policy: MergePolicy,
) -> BTreeMap<u32, (u64, Option<serde_json::Value>)> {
    let mut finals: BTreeMap<u32, (u64, Option<serde_json::Value>)> = BTreeMap::new();
    for (input, versioned) in inputs.iter().zip(versions(inputs)) {
        let Some((version, true)) = versioned else {
            continue; // garbage or stale
        };
        let entry = finals.entry(input.key).or_insert((0, None));
        entry.0 = version;
        entry.1 = match (policy, &input.value) {
            (MergePolicy::Latest, value) | (MergePolicy::JsonMergePatch, value @ None) => {
                value.clone()
            }
            (MergePolicy::JsonMergePatch, Some(patch)) => Some(crate::sim::merge_patch(
                entry.1.clone().unwrap_or(json!(null)),
                patch,
            )),
        };
    }
    finals
}

// ---------------------------------------------------------------------------
// The run.

/// What the model's queue holds: something that happens at a time.
#[derive(Debug)]
enum Happening {
    /// Records become readable up to this offset (exclusive).
    Arrived(usize),
    PushDone {
        owner: u32,
        flight: Box<Flight>,
        ok: bool,
        /// Failed for good (else retriable), when not `ok`.
        refused: bool,
        latency: u64,
    },
    /// The oldest pending changelog write of `owner` completes.
    ChangelogDone {
        owner: u32,
    },
    /// `owner`'s read of other writers' changelog records completes.
    ChangelogRead {
        owner: u32,
        from: i64,
        to: i64,
    },
    DeadLetterDone {
        owner: u32,
        id: u64,
        offset: i64,
        /// A refused push's dead letter: it stands for the push.
        refused_push: Option<Pushed>,
        ok: bool,
    },
    /// A commit of `owner` did not go through.
    CommitFailed {
        owner: u32,
        position: i64,
    },
    Tick {
        owner: u32,
        timer: Timer,
    },
    Revoke,
    CloseDeadline {
        owner: u32,
    },
    Compact,
    Freeze,
    Wake,
    /// The member's session expires: it no longer holds the partition, and
    /// does not know it yet.
    Lose,
    /// The owner that lost the partition hears of it.
    Hear,
    /// The group assigns the partition to a new owner on this host.
    Start {
        host: usize,
    },
}

/// A changelog write queued in the model broker.
#[derive(Debug)]
struct QueuedWrite {
    key: Bytes,
    value: Option<Vec<u8>>,
    ok: bool,
    /// The writer's claim.
    owner: i64,
}

struct Owner {
    id: u32,
    host: usize,
    /// The offset of its claim in the changelog.
    claim: i64,
    core: TaskCore<ModelStore>,
    /// The next input offset this owner reads.
    position: usize,
    /// Its changelog writes, oldest first, not yet completed.
    writes: std::collections::VecDeque<QueuedWrite>,
    /// When its newest queued changelog write completes (they complete in order).
    writes_done_at: u64,
    /// Its pushes and dead letters not yet completed (for a crash).
    pushes_pending: usize,
    /// Holds the partition in the group (a frozen owner no longer does).
    member: bool,
    frozen: bool,
    /// The committed offset it started from, and how many pushes had
    /// landed by then.
    started_from: (i64, usize),
    /// When its core's next `Timer::Wake` is scheduled (ms), if any.
    wake_at: Option<u64>,
}

const COMMIT_EVERY: u64 = 50;
const FLUSH_EVERY: u64 = 100;
const COMPENSATE_EVERY: u64 = 1000;
const GRACE: u64 = 500;
const CLOSE_TIMEOUT: u64 = 30_000;
/// How long the group takes to hand a dead or frozen owner's partition on.
const SESSION: u64 = 200;
/// Steps after which a run that has not settled counts as pinned.
const MAX_STEPS: usize = 400_000;

pub struct Sim<'a> {
    schedule: &'a Schedule,
    /// Each input's version (see [`versions`]).
    versions: Vec<Option<(u64, bool)>>,
    rng: ChaCha8Rng,
    metrics: Arc<Metrics>,
    now: u64,
    queue: BinaryHeap<Reverse<(u64, u64, usize)>>,
    happenings: Vec<Option<Happening>>,
    seq: u64,
    broker: Broker,
    disks: [Disk; 2],
    owners: Vec<Owner>,
    next_owner: u32,
    arrived: usize,
    /// The owner that lost the partition and has not heard of it yet.
    lost_owner: Option<u32>,
    /// Input offsets below this were checked by an earlier commit.
    commit_checked: usize,
    /// Actions carried out so far (crash points count these).
    actions: usize,
    crashes: Vec<usize>,
    faults_on: bool,
    pub violations: Vec<String>,
    pub log: Vec<String>,
    /// Restores that lacked a key's marker because compaction removed it in
    /// favour of a late write (see `Sim::check_restore`).
    pub compacted_away: usize,
}

/// Runs one schedule; returns the violations found.
pub fn check(schedule: &Schedule, seed: u64, metrics: &Arc<Metrics>) -> Vec<String> {
    let mut sim = Sim::new(schedule, seed, metrics.clone());
    sim.run();
    sim.violations
}

impl<'a> Sim<'a> {
    pub fn new(schedule: &'a Schedule, seed: u64, metrics: Arc<Metrics>) -> Self {
        let mut crashes = schedule.faults.crashes.clone();
        crashes.sort_unstable();
        Sim {
            schedule,
            versions: versions(&schedule.inputs),
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x5eed),
            metrics,
            now: 0,
            queue: BinaryHeap::new(),
            happenings: Vec::new(),
            seq: 0,
            broker: Broker::default(),
            disks: Default::default(),
            owners: Vec::new(),
            next_owner: 0,
            arrived: 0,
            lost_owner: None,
            commit_checked: 0,
            actions: 0,
            crashes,
            faults_on: true,
            violations: Vec::new(),
            compacted_away: 0,
            log: Vec::new(),
        }
    }

    fn at(&mut self, time: u64, happening: Happening) {
        self.seq += 1;
        self.happenings.push(Some(happening));
        self.queue
            .push(Reverse((time, self.seq, self.happenings.len() - 1)));
    }

    fn violation(&mut self, what: String) {
        if self.violations.len() < 10 {
            self.violations.push(format!("t={}ms: {what}", self.now));
        }
    }

    fn fails(&mut self, rate: f64) -> bool {
        self.faults_on && rate > 0.0 && self.rng.random_bool(rate)
    }

    fn latency(&mut self) -> u64 {
        if self.rng.random_bool(0.1) {
            self.rng.random_range(100..400)
        } else {
            self.rng.random_range(1..40)
        }
    }

    pub fn run(&mut self) {
        let schedule = self.schedule;
        let mut arrivals: Vec<(u64, usize)> = Vec::new();
        for (i, input) in schedule.inputs.iter().enumerate() {
            match arrivals.last_mut() {
                Some((at, upto)) if *at == input.at => *upto = i + 1,
                _ => arrivals.push((input.at, i + 1)),
            }
        }
        for (at, upto) in arrivals {
            self.at(at, Happening::Arrived(upto));
        }
        for &at in &schedule.faults.revokes {
            self.at(at, Happening::Revoke);
        }
        if let Some((freeze, wake)) = schedule.faults.freeze {
            self.at(freeze, Happening::Freeze);
            self.at(wake, Happening::Wake);
        }
        if let Some((lost, heard)) = schedule.faults.lost {
            self.at(lost, Happening::Lose);
            self.at(heard, Happening::Hear);
        }
        let mut t = 0;
        while t < schedule.faults.until {
            t += self.rng.random_range(100..600);
            self.at(t, Happening::Compact);
        }
        self.start_owner(0);

        let mut steps = 0;
        let mut quiet_since = 0;
        while let Some(Reverse((time, _, index))) = self.queue.pop() {
            steps += 1;
            if steps > MAX_STEPS {
                self.violation("the run did not settle: a key or the partition is pinned".into());
                return;
            }
            self.now = time;
            if self.faults_on && time > schedule.faults.until {
                self.faults_on = false;
                self.crashes.clear();
            }
            let Some(happening) = self.happenings[index].take() else {
                continue; // cancelled by a crash
            };
            if let Some(wake) = self.held_until_wake(&happening) {
                self.seq += 1;
                self.happenings[index] = Some(happening);
                self.queue.push(Reverse((wake, self.seq, index)));
                continue;
            }
            let is_tick = matches!(happening, Happening::Tick { .. } | Happening::Compact);
            self.happen(happening);
            if !is_tick {
                quiet_since = time;
            }
            if !self.faults_on && self.settled() && time >= quiet_since + 3 * COMPENSATE_EVERY {
                break;
            }
        }
        self.final_checks();
    }

    /// Nothing is left to do but timers.
    fn settled(&self) -> bool {
        self.arrived == self.schedule.inputs.len()
            && self.owners.iter().all(|o| {
                o.writes.is_empty() && o.pushes_pending == 0 && o.core.in_flight() == (0, 0)
            })
            && self
                .owners
                .iter()
                .any(|o| o.member && o.position == self.schedule.inputs.len())
    }

    fn owner_index(&self, id: u32) -> Option<usize> {
        self.owners.iter().position(|o| o.id == id)
    }

    fn happen(&mut self, happening: Happening) {
        match happening {
            Happening::Arrived(upto) => {
                self.arrived = self.arrived.max(upto);
                // A turn may end an owner (and remove it): by id, not index.
                let ids: Vec<u32> = self.owners.iter().map(|o| o.id).collect();
                for id in ids {
                    if let Some(i) = self.owner_index(id) {
                        self.turn(i, |_| {});
                    }
                }
            }
            Happening::PushDone {
                owner,
                flight,
                ok,
                refused,
                latency,
            } => {
                if ok {
                    self.broker.pushed.push(Pushed::of(&flight, owner));
                }
                if let Some(i) = self.owner_index(owner) {
                    self.owners[i].pushes_pending -= 1;
                    let now = self.clock();
                    self.turn(i, move |core| {
                        // Every failure class a sink reports, chosen by the
                        // (seeded) latency: the Kafka sink's and the HTTP sink's.
                        let outcome = match (ok, refused, latency % 2 == 0) {
                            (true, _, _) => Ok(()),
                            (false, true, false) => {
                                Err(ProduceError::Refused("injected refusal".into()))
                            }
                            (false, true, true) => Err(ProduceError::Rejected(SinkAnswer {
                                status: 422,
                                excerpt: "injected".into(),
                            })),
                            (false, false, false) => {
                                Err(ProduceError::Retriable("injected".into()))
                            }
                            (false, false, true) => Err(ProduceError::Throttled {
                                message: "injected 429".into(),
                                retry_after: Duration::from_millis(latency),
                            }),
                        };
                        core.push_done(now, *flight, outcome, Duration::from_millis(latency));
                    });
                }
            }
            Happening::ChangelogDone { owner } => {
                let Some(i) = self.owner_index(owner) else {
                    return;
                };
                let write = self.owners[i].writes.pop_front().expect("a queued write");
                let key = write.key.clone();
                let outcome = if write.ok {
                    Ok(self.land_changelog(write))
                } else {
                    Err(ProduceError::Retriable("injected".into()))
                };
                self.log.push(format!(
                    "t={}: owner {owner}: changelog write of {key:?}: {outcome:?}",
                    self.now
                ));
                let now = self.clock();
                self.turn(i, move |core| core.changelog_done(now, outcome));
            }
            Happening::ChangelogRead { owner, from, to } => {
                let Some(i) = self.owner_index(owner) else {
                    return;
                };
                // What the (compacted) changelog holds there by now.
                let records: Vec<OtherRecord> = self
                    .broker
                    .changelog
                    .iter()
                    .filter(|r| (from..to).contains(&r.offset))
                    .map(|r| OtherRecord {
                        offset: r.offset,
                        key: r.key.clone(),
                        claim: r.claim,
                        owner: Some(r.owner),
                    })
                    .collect();
                self.log.push(format!(
                    "t={}: owner {owner} reads other writers' changelog records {from}..{to}: {:?}",
                    self.now,
                    records
                        .iter()
                        .map(|r| (r.offset, r.claim, r.owner))
                        .collect::<Vec<_>>()
                ));
                self.turn(i, move |core| core.changelog_read(records));
            }
            Happening::DeadLetterDone {
                owner,
                id,
                offset,
                refused_push,
                ok,
            } => {
                if ok {
                    self.land_dead_letter(offset, refused_push);
                }
                if let Some(i) = self.owner_index(owner) {
                    self.owners[i].pushes_pending -= 1;
                    let now = self.clock();
                    self.turn(i, move |core| {
                        let outcome = if ok {
                            Ok(())
                        } else {
                            Err(ProduceError::Retriable("injected".into()))
                        };
                        core.dead_letter_done(now, id, outcome)
                    });
                }
            }
            Happening::CommitFailed { owner, position } => {
                if let Some(i) = self.owner_index(owner) {
                    self.turn(i, move |core| core.commit_failed(position));
                }
            }
            Happening::Tick { owner, timer } => {
                let Some(i) = self.owner_index(owner) else {
                    return;
                };
                let period = match timer {
                    Timer::Commit => COMMIT_EVERY,
                    Timer::ChangelogFlush => FLUSH_EVERY,
                    Timer::Compensation => COMPENSATE_EVERY,
                    // Not a period: when the core asks (see `turn`).
                    Timer::Wake => {
                        self.owners[i].wake_at = None;
                        let now = self.clock();
                        return self.turn(i, move |core| {
                            let _: Option<Scanned> = core.tick(now, Timer::Wake);
                        });
                    }
                };
                self.at(self.now + period, Happening::Tick { owner, timer });
                let now = self.clock();
                self.turn(i, move |core| {
                    let _: Option<Scanned> = core.tick(now, timer);
                });
            }
            Happening::Revoke => {
                // The member holding the partition hands it over.
                if let Some(i) = self.owners.iter().position(|o| o.member && !o.frozen) {
                    self.close(i);
                }
            }
            Happening::CloseDeadline { owner } => {
                if let Some(i) = self.owner_index(owner) {
                    self.turn(i, |core| core.close_timed_out());
                }
            }
            Happening::Compact => self.broker.compact(),
            Happening::Freeze => {
                if let Some(i) = self.owners.iter().position(|o| o.member && !o.frozen) {
                    self.owners[i].frozen = true;
                    self.owners[i].member = false;
                    let host = 1 - self.owners[i].host;
                    self.at(self.now + SESSION, Happening::Start { host });
                }
            }
            Happening::Wake => {
                if let Some(i) = self.owners.iter().position(|o| o.frozen) {
                    self.owners[i].frozen = false;
                    // It hears that its assignment was lost and drops the
                    // partition; what completes afterwards (its queued
                    // happenings were held) reaches a closed core.
                    self.turn(i, |core| core.lose());
                }
            }
            Happening::Lose => {
                if let Some(i) = self.owners.iter().position(|o| o.member && !o.frozen) {
                    self.owners[i].member = false;
                    self.lost_owner = Some(self.owners[i].id);
                    let host = 1 - self.owners[i].host;
                    self.at(self.now + SESSION, Happening::Start { host });
                }
            }
            Happening::Hear => {
                if let Some(i) = self.lost_owner.take().and_then(|id| self.owner_index(id)) {
                    self.turn(i, |core| core.lose());
                }
            }
            Happening::Start { host } => self.start_owner(host),
        }
    }

    /// After a restore, the store holds each key's last record that counts
    /// in the changelog's whole history. Where compaction removed that record in
    /// favour of a late write of an earlier owner, which does not count, no
    /// restore from the changelog can know it: the store may then lack it
    /// (counted in `compacted_away`, the known cost of at-least-once).
    fn check_restore(&mut self, host: usize, from: i64, markers: &BTreeMap<Bytes, Marker>) {
        let genuine = counting(&self.broker.changelog_history);
        let compacted = counting(&self.broker.changelog);
        let keys: std::collections::BTreeSet<&Bytes> =
            genuine.keys().chain(markers.keys()).collect();
        let (mut removed_keys, mut differs) = (Vec::new(), None);
        for key in keys {
            let want = genuine.get(key).map(|r| (r.offset, &r.marker));
            let have = markers.get(key);
            if want.and_then(|(_, m)| m.as_ref()) == have {
                continue;
            }
            let removed = want
                .is_some_and(|(offset, _)| compacted.get(key).map(|r| r.offset) != Some(offset));
            if removed {
                removed_keys.push(format!("{key:?}: {want:?}, restored {have:?}"));
            } else {
                differs.get_or_insert(format!("{key:?}: changelog {want:?}, store {have:?}"));
            }
        }
        for removed in removed_keys {
            self.compacted_away += 1;
            self.log.push(format!(
                "t={}: compaction removed a marker in favour of a late write, so the restore on host {host} lacks it: {removed}",
                self.now
            ));
        }
        if let Some(differs) = differs {
            self.violation(format!(
                "after a restore on host {host} (from offset {from}), the store differs from the changelog's view: {differs}"
            ));
        }
    }

    /// Actions carried out so far.
    pub fn actions(&self) -> usize {
        self.actions
    }

    fn clock(&self) -> u64 {
        EPOCH + self.now * MS
    }

    /// A frozen owner's I/O and timers wait until it wakes.
    fn held_until_wake(&self, happening: &Happening) -> Option<u64> {
        let owner = match happening {
            Happening::PushDone { owner, .. }
            | Happening::ChangelogDone { owner }
            | Happening::ChangelogRead { owner, .. }
            | Happening::DeadLetterDone { owner, .. }
            | Happening::Tick { owner, .. }
            | Happening::CommitFailed { owner, .. }
            | Happening::CloseDeadline { owner } => *owner,
            _ => return None,
        };
        let frozen = self.owners.iter().any(|o| o.id == owner && o.frozen);
        frozen.then(|| {
            self.schedule
                .faults
                .freeze
                .map_or(self.now, |(_, wake)| wake.max(self.now))
        })
    }

    /// A new owner on `host`: the store opens (from the disk's checkpoint,
    /// or empty: opening removes the checkpoint file), restores the
    /// changelog from there, and reads the input from the committed offset.
    fn start_owner(&mut self, host: usize) {
        // It claims the partition first and restores through its claim,
        // with keyflight's rule for which records count.
        let claim = self.broker.append_claim();
        let disk = &mut self.disks[host];
        let checkpoint = disk.checkpoint.take().map(|next| (next, disk.claim));
        let (mut markers, mut from, mut claims) =
            self.broker.restore(disk.image.clone(), checkpoint);
        if claims.store_suspect() {
            // The checkpoint's writer went on after another claim: in full.
            (markers, from, claims) = self.broker.restore(BTreeMap::new(), None);
        }
        self.check_restore(host, from, &markers);
        let shadowed = claims.into_shadowed();
        if !shadowed.is_empty() {
            self.log.push(format!(
                "t={}: the restore on host {host} skipped late records; writes {shadowed:?} again",
                self.now
            ));
        }
        let schedule = self.schedule;
        let mut core = core_with(
            schedule.policy,
            schedule.max_active_keys,
            Timing {
                checkpoint_every: Duration::from_millis(schedule.faults.checkpoint_every),
                give_up_after: Duration::from_millis(schedule.faults.give_up_after),
                cached_keys: schedule.cached_keys,
                windows: schedule.windows,
                push_slots: schedule.push_slots,
            },
            ModelStore::new(markers),
            self.broker.changelog_next,
            &self.metrics,
            self.clock(),
        );
        core.claimed(claim);
        core.rewrite_shadowed(shadowed);
        let id = self.next_owner;
        self.next_owner += 1;
        self.log.push(format!(
            "t={}: owner {id} starts on host {host} from offset {}",
            self.now, self.broker.committed
        ));
        self.owners.push(Owner {
            id,
            host,
            claim,
            core,
            position: self.broker.committed as usize,
            writes: Default::default(),
            writes_done_at: 0,
            pushes_pending: 0,
            member: true,
            frozen: false,
            started_from: (self.broker.committed, self.broker.pushed.len()),
            wake_at: None,
        });
        for (timer, period) in [
            (Timer::Commit, COMMIT_EVERY),
            (Timer::ChangelogFlush, FLUSH_EVERY),
            (Timer::Compensation, COMPENSATE_EVERY),
        ] {
            self.at(self.now + period, Happening::Tick { owner: id, timer });
        }
        let i = self.owners.len() - 1;
        self.turn(i, |_| {});
    }

    /// One turn of the shell's loop for owner `i`: an input, its actions,
    /// the records already waiting, the end of the turn and its actions.
    fn turn(&mut self, i: usize, input: impl FnOnce(&mut TaskCore<ModelStore>)) {
        if self.owners[i].frozen {
            return;
        }
        input(&mut self.owners[i].core);
        let id = self.owners[i].id;
        if !self.carry_out(id) {
            return;
        }
        let Some(i) = self.owner_index(id) else {
            return;
        };
        let owner = &mut self.owners[i];
        if owner.core.wants_records() && owner.position < self.arrived {
            let take = self
                .rng
                .random_range(1..=8)
                .min(self.arrived - owner.position);
            let batch = (owner.position..owner.position + take)
                .map(|o| self.schedule.inputs[o].record(o as i64))
                .collect();
            owner.position += take;
            owner.core.take_batch(batch);
        }
        let now = self.clock();
        self.owners[i].core.end_turn(now);
        if self.carry_out(id) {
            // More records wait and the table has room: another turn.
            if let Some(i) = self.owner_index(id) {
                let o = &self.owners[i];
                if o.core.wants_records() && o.position < self.arrived {
                    self.at(self.now, Happening::Arrived(self.arrived));
                }
                self.schedule_wake(i);
            }
        }
    }

    /// Schedules owner `i`'s next `Timer::Wake` when its core's earliest
    /// window ends before the one already scheduled (as the shell sleeps
    /// until `next_wake`).
    fn schedule_wake(&mut self, i: usize) {
        let Some(ns) = self.owners[i].core.next_wake() else {
            return;
        };
        let at = (ns.saturating_sub(EPOCH).div_ceil(MS)).max(self.now);
        if self.owners[i]
            .wake_at
            .is_none_or(|scheduled| at < scheduled)
        {
            self.owners[i].wake_at = Some(at);
            let owner = self.owners[i].id;
            self.at(
                at,
                Happening::Tick {
                    owner,
                    timer: Timer::Wake,
                },
            );
        }
    }

    /// Carries out the owner's actions, in order; false if it crashed
    /// before one of them.
    fn carry_out(&mut self, id: u32) -> bool {
        loop {
            let Some(i) = self.owner_index(id) else {
                return false;
            };
            let Some(action) = self.owners[i].core.poll_action() else {
                return true;
            };
            if self.crashes.first().is_some_and(|&at| at <= self.actions) {
                self.crashes.remove(0);
                self.crash(i);
                return false;
            }
            self.actions += 1;
            match action {
                Action::Push { flight, delay } => {
                    let key = &flight.push.key;
                    let marked = self.owners[i]
                        .core
                        .marker(key)
                        .expect("the model store reads")
                        .map(|m| m.t1);
                    if marked != Some(flight.push.tn) {
                        self.violation(format!(
                            "the push of {key:?} (tn {}) is produced before its markT1 (marker t1 {marked:?})",
                            flight.push.tn
                        ));
                    }
                    // A compensation repairs a push that may not have
                    // landed: it never steps a key back behind a push that
                    // had landed, covered by the commit its owner started
                    // from (a stale marker that won the changelog's
                    // compaction must not undo it).
                    if flight.push.compensation {
                        let (committed, landed) = self.owners[i].started_from;
                        let covered = self.broker.pushed[..landed]
                            .iter()
                            .filter(|p| p.key == *key && p.offset.is_some_and(|o| o < committed))
                            .map(|p| p.version)
                            .max();
                        if covered.is_some_and(|covered| covered > flight.push.version) {
                            self.violation(format!(
                                "a compensation re-pushes {key:?} at version {}, behind version {covered:?}, which the commit its owner started from covers",
                                flight.push.version
                            ));
                        }
                    }
                    let ok = !self.fails(self.schedule.faults.push_failure);
                    let refused = !ok && self.rng.random_bool(self.schedule.faults.push_refusal);
                    let latency = self.latency();
                    self.owners[i].pushes_pending += 1;
                    let done = self.now + delay.as_millis() as u64 + latency;
                    self.at(
                        done,
                        Happening::PushDone {
                            owner: id,
                            flight: Box::new(flight),
                            ok,
                            refused,
                            latency,
                        },
                    );
                }
                Action::WriteChangelog { key, value, .. } => {
                    let ok = !self.fails(self.schedule.faults.changelog_failure);
                    let latency = self.latency();
                    let owner = &mut self.owners[i];
                    owner.writes_done_at = owner.writes_done_at.max(self.now + latency);
                    let done = owner.writes_done_at;
                    let claim = owner.claim;
                    owner.writes.push_back(QueuedWrite {
                        key,
                        value,
                        ok,
                        owner: claim,
                    });
                    self.at(done, Happening::ChangelogDone { owner: id });
                }
                Action::DeadLetter { letter, delay } => {
                    let ok = !self.fails(self.schedule.faults.dead_letter_failure);
                    let latency = self.latency();
                    self.owners[i].pushes_pending += 1;
                    self.at(
                        self.now + delay.as_millis() as u64 + latency,
                        Happening::DeadLetterDone {
                            owner: id,
                            id: letter.id,
                            offset: letter.record.offset,
                            refused_push: (letter.reason == PUSH_REFUSED)
                                .then(|| Pushed::refused(&letter, id)),
                            ok,
                        },
                    );
                }
                Action::Commit(position) => {
                    // The group refuses a commit of a member that lost the
                    // partition: only a member's commits must hold.
                    if self.owners[i].member {
                        self.check_commit(position);
                    }
                    if self.fails(self.schedule.faults.commit_failure) {
                        let latency = self.latency();
                        self.at(
                            self.now + latency,
                            Happening::CommitFailed {
                                owner: id,
                                position,
                            },
                        );
                    } else if self.owners[i].member {
                        self.broker.committed = position;
                    }
                }
                Action::Checkpoint(next) => {
                    self.log
                        .push(format!("t={}: owner {id} checkpoints at {next}", self.now));
                    self.check_checkpoint(i, next);
                    let owner = &self.owners[i];
                    let store = owner.core.store();
                    store.since_checkpoint.borrow_mut().clear();
                    self.disks[owner.host] = Disk {
                        image: store.markers.borrow().clone(),
                        checkpoint: Some(next),
                        written_by: owner.id,
                        claim: Some(owner.claim),
                    };
                }
                Action::ReadChangelog { from, to } => {
                    let latency = self.latency();
                    self.at(
                        self.now + latency,
                        Happening::ChangelogRead {
                            owner: id,
                            from,
                            to,
                        },
                    );
                }
                // An owner that finds another's claim after its own stops
                // (its process exits, as after a crash).
                Action::Fail(reason) if reason.contains("another instance claimed it") => {
                    self.log
                        .push(format!("t={}: owner {id} stops: {reason}", self.now));
                    self.crash(i);
                    return false;
                }
                // The model's changelog refuses nothing for good.
                Action::Fail(reason) => self.violation(format!("the task failed: {reason}")),
                Action::Closed(position) => {
                    let member = self.owners[i].member;
                    if let Some(position) = position.filter(|_| member) {
                        self.check_commit(position);
                        self.broker.committed = position;
                    }
                    self.owners[i].member = false;
                    self.log
                        .push(format!("t={}: owner {id} closed at {position:?}", self.now));
                    if member {
                        let host = self.rng.random_range(0..2);
                        self.at(self.now, Happening::Start { host });
                    }
                }
            }
        }
    }

    /// A dead letter lands. A refused push's stands for the push: it is
    /// the key's last word until a later push.
    fn land_dead_letter(&mut self, offset: i64, refused_push: Option<Pushed>) {
        match refused_push {
            Some(push) => self.broker.pushed.push(push),
            None => self.broker.dead_letters.push(offset),
        }
    }

    /// A changelog write lands: its offset.
    fn land_changelog(&mut self, write: QueuedWrite) -> i64 {
        let (marker, version) = match &write.value {
            Some(bytes) => {
                let marker = MarkerCodec::new().decode(bytes).expect("a marker");
                let version = marker.version;
                (Some(marker), version)
            }
            // A tombstone: the key's acknowledged delete.
            None => {
                let version = self
                    .broker
                    .pushed
                    .iter()
                    .rev()
                    .find(|p| p.key == write.key)
                    .map_or(0, |p| p.version);
                (None, version)
            }
        };
        self.broker
            .append_changelog(write.key, marker, version, write.owner)
    }

    /// The owner dies before its next action: what it had handed to the
    /// broker lands or not, its memory is gone, its disk stays.
    fn crash(&mut self, i: usize) {
        let owner = self.owners.remove(i);
        self.log
            .push(format!("t={}: owner {} crashes", self.now, owner.id));
        // Its store's writes since its checkpoint reach the disk up to a
        // point (a flush of full memtables).
        let disk = &mut self.disks[owner.host];
        if disk.checkpoint.is_some() && disk.written_by == owner.id {
            let writes = owner.core.store().since_checkpoint.take();
            let flushed = self.rng.random_range(0..=writes.len());
            for (key, marker) in writes.into_iter().take(flushed) {
                match marker {
                    Some(marker) => disk.image.insert(key, marker),
                    None => disk.image.remove(&key),
                };
            }
        }
        // Changelog writes share a partition: a prefix of them lands.
        let mut landing = true;
        for write in owner.writes {
            landing = landing && write.ok && self.rng.random_bool(0.5);
            if landing {
                self.land_changelog(write);
            }
        }
        for slot in self.happenings.iter_mut() {
            let cancel = match slot {
                Some(Happening::PushDone { owner: o, .. })
                | Some(Happening::DeadLetterDone { owner: o, .. })
                | Some(Happening::ChangelogDone { owner: o })
                | Some(Happening::ChangelogRead { owner: o, .. })
                | Some(Happening::Tick { owner: o, .. })
                | Some(Happening::CommitFailed { owner: o, .. })
                | Some(Happening::CloseDeadline { owner: o }) => *o == owner.id,
                _ => false,
            };
            if !cancel {
                continue;
            }
            match slot.take() {
                Some(Happening::PushDone {
                    flight, ok: true, ..
                }) if self.rng.random_bool(0.5) => {
                    self.broker.pushed.push(Pushed::of(&flight, owner.id))
                }
                Some(Happening::DeadLetterDone {
                    offset,
                    refused_push,
                    ok: true,
                    ..
                }) if self.rng.random_bool(0.5) => match refused_push {
                    Some(push) => self.broker.pushed.push(push),
                    None => self.broker.dead_letters.push(offset),
                },
                _ => {}
            }
        }
        if owner.member {
            let host = self.rng.random_range(0..2);
            self.at(self.now + SESSION, Happening::Start { host });
        }
    }

    /// A graceful close (a revoke), bounded by the close timeout.
    fn close(&mut self, i: usize) {
        let id = self.owners[i].id;
        self.at(
            self.now + self.schedule.faults.close_timeout,
            Happening::CloseDeadline { owner: id },
        );
        self.turn(i, |core| core.close());
    }

    /// A commit of `position` never passes an event whose push is
    /// unacknowledged (unless its marker is open in the changelog, which
    /// compensation repairs) or whose marker the changelog lacks, nor a
    /// dead letter that did not land.
    fn check_commit(&mut self, position: i64) {
        let inputs = &self.schedule.inputs;
        let mut problems = Vec::new();
        // What an earlier commit covered stays covered (the logs only
        // grow), so each offset is checked when a commit first passes it.
        let from = self.commit_checked;
        let until = (position.max(0) as usize).min(inputs.len());
        self.commit_checked = self.commit_checked.max(until);
        for (offset, input) in inputs.iter().enumerate().take(until).skip(from) {
            if input.garbage {
                if !self.broker.dead_letters.contains(&(offset as i64)) {
                    problems.push(format!("offset {offset}: its dead letter did not land"));
                }
                continue;
            }
            let key = Bytes::from(format!("k{}", input.key));
            let Some((version, _)) = self.versions[offset] else {
                continue;
            };
            let pushed = self
                .broker
                .pushed
                .iter()
                .any(|p| p.key == key && p.version >= version);
            match self.broker.logged(&key) {
                None => problems.push(format!(
                    "offset {offset} ({key:?} v{version}): the changelog has no marker"
                )),
                Some((logged, _)) if logged < version => problems.push(format!(
                    "offset {offset} ({key:?} v{version}): the changelog's newest marker is v{logged}"
                )),
                Some((_, open)) if !pushed && !open => problems.push(format!(
                    "offset {offset} ({key:?} v{version}): no push acknowledged and no open marker"
                )),
                _ => {}
            }
        }
        if let Some(first) = problems.first() {
            self.violation(format!(
                "commit {position} passes an uncovered event: {first}"
            ));
        }
    }

    /// A checkpoint never claims more than the changelog holds: its offset
    /// is within the changelog, and the store holds every record below it
    /// (or something newer for the key).
    fn check_checkpoint(&mut self, i: usize, next: i64) {
        if next > self.broker.changelog_next {
            return self.violation(format!(
                "checkpoint {next} is past the changelog's end {}",
                self.broker.changelog_next
            ));
        }
        // A key's newest record below `next` that counts: its marker, or a
        // tombstone of that version.
        let below: BTreeMap<Bytes, (Option<Marker>, u64)> = counting(
            self.broker
                .changelog_history
                .iter()
                .filter(|r| r.offset < next),
        )
        .into_iter()
        .map(|(key, r)| (key, (r.marker.clone(), r.version)))
        .collect();
        let order = |m: &Marker| (m.version, m.t1, m.t2);
        let store = self.owners[i].core.store().markers.borrow().clone();
        for (key, (logged, version)) in below {
            let held = store.get(&key);
            let ok = match (&logged, held) {
                (Some(logged), Some(held)) => order(held) >= order(logged),
                (Some(_), None) => false,
                (None, Some(held)) => held.version >= version,
                (None, None) => true,
            };
            if !ok {
                return self.violation(format!(
                    "checkpoint {next} claims {key:?} as of {logged:?} (v{version}) but the store holds {held:?}"
                ));
            }
        }
    }

    /// Once settled: every key's last push carries its latest accepted
    /// event, everything is committed, nothing is in flight or open.
    fn final_checks(&mut self) {
        let expected = expected_finals(&self.schedule.inputs, self.schedule.policy);
        for (key, (version, value)) in &expected {
            let name = Bytes::from(format!("k{key}"));
            let last = self.broker.pushed.iter().rev().find(|p| p.key == name);
            match last {
                None => self.violation(format!("{name:?}: never pushed (expected v{version})")),
                Some(p) if p.version != *version || p.value != *value => {
                    let got = format!("v{} {:?} by owner {}", p.version, p.value, p.owner);
                    self.violation(format!(
                        "{name:?}: the last push is {got}, expected v{version} {value:?}"
                    ))
                }
                _ => {}
            }
        }
        let end = self.schedule.inputs.len() as i64;
        if self.broker.committed != end {
            self.violation(format!(
                "the committed offset is {}, not the input's end {end}: the partition is pinned",
                self.broker.committed
            ));
        }
        let member = self.owners.iter().find(|o| o.member);
        match member {
            None => self.violation("no owner holds the partition at the end".into()),
            Some(o) => {
                let (pushes, letters) = o.core.in_flight();
                let open = o.core.store().open_count();
                if pushes + letters + open > 0 {
                    self.violation(format!(
                        "at the end: {pushes} pushes and {letters} dead letters in flight, {open} markers open"
                    ));
                }
            }
        }
    }
}

/// Runs `total` random schedules of the given fault classes on every core;
/// the failing seeds (a few per thread at most) and their violations.
pub fn run_many(total: u64, classes: FaultClasses) -> Vec<(u64, Vec<String>)> {
    crate::sim::failing_seeds(total, || {
        let metrics = Arc::new(Metrics::new());
        move |seed| check_seed(seed, classes, &metrics)
    })
}

/// One seed's schedule, run and checked.
pub fn check_seed(seed: u64, classes: FaultClasses, metrics: &Arc<Metrics>) -> Vec<String> {
    let schedule = random_schedule(&mut ChaCha8Rng::seed_from_u64(seed), classes);
    check(&schedule, seed, metrics)
}
