//! The per-partition singleflight table.
//!
//! Per key a tiny state machine:
//!
//! ```text
//! Idle ──event e──▶ InFlight{push(e), pending: None}
//! InFlight ──event e──▶ InFlight{.., pending: fold(pending, e)}
//! InFlight ──ack, pending = Some(p)──▶ InFlight{push(p), pending: None}
//! InFlight ──ack, pending = None──▶ Idle
//! InFlight ──failure──▶ InFlight{push(failed ∪ pending), pending: None}
//! ```
//!
//! A key never has two pushes in flight, so a stale push can never land after
//! a fresh one: the last push to start is the last to finish, and it starts
//! after the last event arrived. That is the fix for the article's Case 1 and
//! Case 2. The table is pure: the caller passes the clock in, performs the
//! pushes and reports their outcome back.

use std::collections::HashMap;

use bytes::Bytes;

use super::merge::{MergeError, MergePolicy, Payload};
use super::offsets::{OffsetTracker, OutOfOrder};

/// A record key. Cheap to clone (reference counted).
pub type Key = Bytes;

/// How the table stores keys: inline up to 24 bytes, so a lookup compares
/// bytes in the hash-map bucket itself instead of chasing a pointer.
type StoredKey = smallvec::SmallVec<[u8; 24]>;

/// One input event, decoded.
#[derive(Clone, Debug)]
pub struct Event {
    pub key: Key,
    /// Source offset in the partition.
    pub offset: i64,
    /// The event's own version, when it carries one; otherwise its offset
    /// orders it. Use one or the other per topic, not both.
    pub version: Option<u64>,
    pub payload: Payload,
}

impl Event {
    /// The version that orders this event among its key's events.
    pub fn effective_version(&self) -> u64 {
        self.version.unwrap_or(self.offset.max(0) as u64)
    }
}

/// A push the caller must perform now: produce `payload` for `key`, then
/// report [`Table::complete`] or [`Table::fail`] with the same `tn`.
#[derive(Clone, Debug, PartialEq)]
pub struct Push {
    pub key: Key,
    /// Start time in nanoseconds, unique and increasing per key (the marker's t1/t2).
    pub tn: u64,
    /// Version of the newest event this push carries.
    pub version: u64,
    pub payload: Payload,
    /// How many events this push covers (0 for a compensation push).
    pub merged: u32,
    /// A re-push of stored state by the compensation scan (or the retry of
    /// one): it covers no new event.
    pub compensation: bool,
}

/// What the table did with an offered event.
#[derive(Clone, Debug, PartialEq)]
pub enum Offer {
    /// The key was idle: push this now.
    Started(Push),
    /// The key has a push in flight: the event folded into its pending push.
    Merged,
    /// The event is not newer than what the key already pushed or holds:
    /// dropped, and its offset counts as covered.
    Stale,
}

/// Errors the table reports instead of panicking.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Merge(#[from] MergeError),
    #[error(transparent)]
    OutOfOrder(#[from] OutOfOrder),
    #[error("no push with tn {tn} is in flight for this key")]
    UnknownPush { tn: u64 },
}

/// Counters of what the table did since it was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableStats {
    pub events: u64,
    pub merged: u64,
    pub stale: u64,
    pub pushes_started: u64,
    pub compensations_started: u64,
    pub compensations_skipped: u64,
    pub acked: u64,
    pub failed: u64,
}

/// Events folded together and not yet acknowledged downstream.
#[derive(Debug, Default)]
struct Batch {
    version: u64,
    offsets: Vec<i64>,
    merged: u32,
}

impl Batch {
    /// Folds an older batch (a failed push) into this newer one.
    fn absorb_older(&mut self, older: Batch) {
        self.version = self.version.max(older.version);
        self.offsets.extend(older.offsets);
        self.merged += older.merged;
    }
}

#[derive(Debug)]
struct Flight {
    tn: u64,
    batch: Batch,
}

/// What a key with a push in flight needs besides its [`KeyState`]; kept in
/// a slab so the per-key entry of every known key stays small.
#[derive(Debug)]
struct Active {
    flight: Flight,
    /// Events that arrived during the flight, folded into the next push.
    pending: Option<Batch>,
}

#[derive(Debug, Default)]
struct KeyState {
    /// Newest version accepted for this key (pushed, in flight or pending),
    /// meaningful when `versioned`.
    newest_version: u64,
    /// Last tn handed out, so tn never goes backwards for the key.
    last_tn: u64,
    /// The key's whole current value, not yet handed to a push. Under
    /// `latest` the push takes it; under `json-merge-patch` it stays, since
    /// the next patch folds onto it.
    current: Option<Payload>,
    /// 1 + the index of the key's [`Active`] state in the slab; 0 when idle.
    slot: u32,
    versioned: bool,
}

impl KeyState {
    fn newest(&self) -> Option<u64> {
        self.versioned.then_some(self.newest_version)
    }

    fn set_newest(&mut self, version: u64) {
        self.newest_version = version;
        self.versioned = true;
    }
}

/// Settings of one table.
#[derive(Clone, Copy, Debug)]
pub struct TableConfig {
    pub policy: MergePolicy,
    /// Keys in flight beyond which the table reports saturation.
    pub max_active_keys: usize,
}

impl Default for TableConfig {
    fn default() -> Self {
        Self {
            policy: MergePolicy::Latest,
            max_active_keys: 10_000,
        }
    }
}

/// The singleflight table of one partition.
#[derive(Debug)]
pub struct Table {
    config: TableConfig,
    keys: HashMap<StoredKey, KeyState, ahash::RandomState>,
    /// In-flight state of active keys, indexed by `KeyState::slot - 1`;
    /// the keys in flight are the occupied slots.
    flights: Vec<Option<Active>>,
    free_slots: Vec<u32>,
    offsets: OffsetTracker,
    stats: TableStats,
    /// Emptied offset vectors, reused so steady state does not allocate.
    spare: Vec<Vec<i64>>,
}

impl Table {
    pub fn new(config: TableConfig) -> Self {
        Self {
            config,
            keys: HashMap::default(),
            flights: Vec::new(),
            free_slots: Vec::new(),
            offsets: OffsetTracker::new(),
            stats: TableStats::default(),
            spare: Vec::new(),
        }
    }

    pub fn policy(&self) -> MergePolicy {
        self.config.policy
    }

    /// Takes in one event. Events of a partition must be offered in offset order.
    pub fn offer(&mut self, event: Event, now_ns: u64) -> Result<Offer, EngineError> {
        // Refuse an out-of-order offset before anything changes.
        self.offsets.check(event.offset)?;
        let version = event.effective_version();
        let policy = self.config.policy;
        let state = self
            .keys
            .entry(StoredKey::from_slice(&event.key))
            .or_default();
        if state.newest().is_some_and(|newest| version <= newest) {
            self.offsets.track_done(event.offset)?;
            self.stats.events += 1;
            self.stats.stale += 1;
            return Ok(Offer::Stale);
        }
        policy.fold(&mut state.current, event.payload)?;
        self.offsets.track(event.offset)?;
        self.stats.events += 1;
        state.set_newest(version);

        if state.slot != 0 {
            let active = self.flights[state.slot as usize - 1]
                .as_mut()
                .expect("an active key's slot is in use");
            let pending = active.pending.get_or_insert_with(|| Batch {
                offsets: self.spare.pop().unwrap_or_default(),
                ..Batch::default()
            });
            pending.version = version;
            pending.offsets.push(event.offset);
            pending.merged += 1;
            self.stats.merged += 1;
            return Ok(Offer::Merged);
        }
        let mut offsets = self.spare.pop().unwrap_or_default();
        offsets.push(event.offset);
        let batch = Batch {
            version,
            offsets,
            merged: 1,
        };
        self.stats.pushes_started += 1;
        let push = start_idle(
            event.key,
            state,
            batch,
            now_ns,
            policy,
            &mut self.flights,
            &mut self.free_slots,
        );
        Ok(Offer::Started(push))
    }

    /// The push `(key, tn)` was acknowledged. Returns the next push of the
    /// key when events arrived meanwhile. The key's marker closes (t2 = tn).
    pub fn complete(
        &mut self,
        key: &Key,
        tn: u64,
        now_ns: u64,
    ) -> Result<Option<Push>, EngineError> {
        let policy = self.config.policy;
        let (state, slot, active) = take_active(&mut self.keys, &mut self.flights, key, tn)?;
        let Active {
            flight: Flight { mut batch, .. },
            pending,
        } = active;
        for offset in batch.offsets.drain(..) {
            self.offsets.complete(offset);
        }
        self.spare.push(batch.offsets);
        self.stats.acked += 1;
        match pending {
            Some(pending) => {
                self.stats.pushes_started += 1;
                let (push, flight) = start_flight(key.clone(), state, pending, now_ns, policy);
                self.flights[slot] = Some(Active {
                    flight,
                    pending: None,
                });
                Ok(Some(push))
            }
            None => {
                state.slot = 0;
                self.free_slots.push(slot as u32);
                Ok(None)
            }
        }
    }

    /// The push failed for good (after the client's own retries). Its marker
    /// stays open; the key is pushed again at once with its newest value (the
    /// failed push's own, unless newer events arrived), covering the failed
    /// push's events too. The caller may delay producing the returned push
    /// (backoff); the key counts as in flight.
    pub fn fail(&mut self, failed: Push, now_ns: u64) -> Result<Push, EngineError> {
        let policy = self.config.policy;
        let (state, slot, active) =
            take_active(&mut self.keys, &mut self.flights, &failed.key, failed.tn)?;
        if state.current.is_none() {
            state.current = Some(failed.payload);
        }
        let mut retry = match active.pending {
            Some(pending) => pending,
            None => Batch {
                offsets: self.spare.pop().unwrap_or_default(),
                ..Batch::default()
            },
        };
        retry.absorb_older(active.flight.batch);
        self.stats.failed += 1;
        self.stats.pushes_started += 1;
        let (push, flight) = start_flight(failed.key, state, retry, now_ns, policy);
        self.flights[slot] = Some(Active {
            flight,
            pending: None,
        });
        Ok(push)
    }

    /// Compensation: re-push the stored `(version, payload)` of a key whose
    /// marker is open. Skipped (`None`) while the key is in flight (that push
    /// will close the marker) or when the table already knows a newer version
    /// (the newer push, acknowledged, superseded the stored one).
    pub fn compensate(
        &mut self,
        key: &Key,
        version: u64,
        payload: Payload,
        now_ns: u64,
    ) -> Option<Push> {
        let policy = self.config.policy;
        let state = self.keys.entry(StoredKey::from_slice(key)).or_default();
        if state.slot != 0 || state.newest().is_some_and(|newest| newest > version) {
            self.stats.compensations_skipped += 1;
            return None;
        }
        state.set_newest(version);
        if state.current.is_none() {
            state.current = Some(payload);
        }
        self.stats.compensations_started += 1;
        let batch = Batch {
            version,
            offsets: self.spare.pop().unwrap_or_default(),
            merged: 0,
        };
        Some(start_idle(
            key.clone(),
            state,
            batch,
            now_ns,
            policy,
            &mut self.flights,
            &mut self.free_slots,
        ))
    }

    /// Seeds an idle key from durable state (its marker after a restore):
    /// replayed events not newer than `version` are then dropped as stale,
    /// and merge patches fold onto `payload`.
    pub fn seed(&mut self, key: Key, version: u64, last_tn: u64, payload: Option<Payload>) {
        let state = self.keys.entry(StoredKey::from_slice(&key)).or_default();
        if state.slot != 0 {
            return;
        }
        if state.newest().is_none_or(|newest| newest < version) {
            state.set_newest(version);
            if self.config.policy.retains_value() {
                state.current = payload;
            }
        }
        state.last_tn = state.last_tn.max(last_tn);
    }

    /// Holds the commit position at `offset` for a record handled outside the
    /// table (a dead letter being written); release it with [`Self::release`].
    pub fn hold(&mut self, offset: i64) -> Result<(), EngineError> {
        Ok(self.offsets.track(offset)?)
    }

    /// Releases an offset taken with [`Self::hold`].
    pub fn release(&mut self, offset: i64) -> bool {
        self.offsets.complete(offset)
    }

    /// The position safe to commit for this partition (`None` before any event).
    pub fn commit_position(&self) -> Option<i64> {
        self.offsets.position()
    }

    /// Whether the table has any state for the key (else the caller may
    /// [`seed`](Self::seed) it from the store first).
    pub fn knows(&self, key: &[u8]) -> bool {
        self.keys.contains_key(key)
    }

    /// Whether the key has a push in flight.
    pub fn in_flight(&self, key: &[u8]) -> bool {
        self.keys.get(key).is_some_and(|s| s.slot != 0)
    }

    /// Keys with a push in flight (each may also have a pending push).
    pub fn active_keys(&self) -> usize {
        self.flights.len() - self.free_slots.len()
    }

    /// True when the active-key bound is reached: the caller should pause
    /// the partition until this turns false again.
    pub fn is_saturated(&self) -> bool {
        self.active_keys() >= self.config.max_active_keys
    }

    /// Keys the table knows (active and idle).
    pub fn known_keys(&self) -> usize {
        self.keys.len()
    }

    pub fn stats(&self) -> TableStats {
        self.stats
    }
}

/// Takes the in-flight state of `key` out of its slot when its flight is
/// `tn` (free functions over the table's fields, so the caller can keep
/// using the other fields while it holds the key's state).
fn take_active<'a>(
    keys: &'a mut HashMap<StoredKey, KeyState, ahash::RandomState>,
    flights: &mut [Option<Active>],
    key: &Key,
    tn: u64,
) -> Result<(&'a mut KeyState, usize, Active), EngineError> {
    let state = keys
        .get_mut(&key[..])
        .ok_or(EngineError::UnknownPush { tn })?;
    let slot = (state.slot as usize)
        .checked_sub(1)
        .ok_or(EngineError::UnknownPush { tn })?;
    match flights[slot].take_if(|active| active.flight.tn == tn) {
        Some(active) => Ok((state, slot, active)),
        None => Err(EngineError::UnknownPush { tn }),
    }
}

/// An idle key starts a push: its in-flight state takes a free slot.
fn start_idle(
    key: Key,
    state: &mut KeyState,
    batch: Batch,
    now_ns: u64,
    policy: MergePolicy,
    flights: &mut Vec<Option<Active>>,
    free: &mut Vec<u32>,
) -> Push {
    let (push, flight) = start_flight(key, state, batch, now_ns, policy);
    let active = Some(Active {
        flight,
        pending: None,
    });
    state.slot = match free.pop() {
        Some(index) => {
            flights[index as usize] = active;
            index + 1
        }
        None => {
            flights.push(active);
            flights.len() as u32
        }
    };
    push
}

/// Starts a push of the key's current value, `tn = max(now, last_tn + 1)`.
/// A push that carries no new event is a compensation push (also when it
/// retries a failed one).
fn start_flight(
    key: Key,
    state: &mut KeyState,
    batch: Batch,
    now_ns: u64,
    policy: MergePolicy,
) -> (Push, Flight) {
    let tn = now_ns.max(state.last_tn + 1);
    state.last_tn = tn;
    // Every path into a flight has just folded or stored a value.
    let payload = if policy.retains_value() {
        state.current.clone()
    } else {
        state.current.take()
    };
    let push = Push {
        key,
        tn,
        version: batch.version,
        payload: payload.expect("a key starting a push holds its current value"),
        merged: batch.merged,
        compensation: batch.merged == 0,
    };
    (push, Flight { tn, batch })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::merge::Value;
    use serde_json::json;

    fn key(k: &str) -> Key {
        Bytes::copy_from_slice(k.as_bytes())
    }
    fn bytes(v: &str) -> Payload {
        Payload::Value(Value::Bytes(Bytes::copy_from_slice(v.as_bytes())))
    }
    fn ev(k: &str, offset: i64, v: &str) -> Event {
        Event {
            key: key(k),
            offset,
            version: None,
            payload: bytes(v),
        }
    }
    fn started(offer: Offer) -> Push {
        match offer {
            Offer::Started(push) => push,
            other => panic!("expected a push to start, got {other:?}"),
        }
    }
    fn table() -> Table {
        Table::new(TableConfig::default())
    }

    #[test]
    fn idle_key_starts_a_push_and_busy_key_merges() {
        let mut t = table();
        let a = started(t.offer(ev("k", 0, "A"), 100).unwrap());
        assert_eq!(
            (a.tn, a.version, a.merged, a.compensation),
            (100, 0, 1, false)
        );
        assert_eq!(a.payload, bytes("A"));
        for (o, v) in [(1, "B"), (2, "C"), (3, "D")] {
            assert_eq!(t.offer(ev("k", o, v), 101).unwrap(), Offer::Merged);
        }
        assert!(t.in_flight(b"k"));
        assert_eq!(t.commit_position(), Some(0));
        let d = t
            .complete(&key("k"), a.tn, 50)
            .unwrap()
            .expect("pending push starts");
        assert_eq!((d.version, d.merged), (3, 3));
        assert_eq!(d.payload, bytes("D"));
        assert_eq!(
            d.tn, 101,
            "tn never goes backwards even when the clock does"
        );
        assert_eq!(t.commit_position(), Some(1));
        assert_eq!(t.complete(&key("k"), d.tn, 200).unwrap(), None);
        assert_eq!(t.commit_position(), Some(4));
        assert_eq!(t.active_keys(), 0);
        let s = t.stats();
        assert_eq!(
            (s.events, s.merged, s.pushes_started, s.acked),
            (4, 3, 2, 2)
        );
    }

    #[test]
    fn stale_events_are_dropped_and_covered() {
        let mut t = table();
        let mut e = ev("k", 0, "new");
        e.version = Some(10);
        let p = started(t.offer(e, 1).unwrap());
        let mut old = ev("k", 1, "old");
        old.version = Some(9);
        assert_eq!(t.offer(old, 2).unwrap(), Offer::Stale);
        let mut dup = ev("k", 2, "dup");
        dup.version = Some(10);
        assert_eq!(t.offer(dup, 2).unwrap(), Offer::Stale);
        assert_eq!(t.commit_position(), Some(0));
        t.complete(&key("k"), p.tn, 3).unwrap();
        assert_eq!(t.commit_position(), Some(3));
        assert_eq!(t.stats().stale, 2);
    }

    #[test]
    fn failed_push_retries_with_newest_data_and_holds_offsets() {
        let mut t = table();
        let a = started(t.offer(ev("k", 0, "A"), 10).unwrap());
        t.offer(ev("k", 1, "B"), 11).unwrap();
        let a_tn = a.tn;
        let retry = t.fail(a, 12).unwrap();
        assert_eq!(retry.payload, bytes("B"));
        assert_eq!((retry.version, retry.merged), (1, 2));
        assert!(retry.tn > a_tn);
        assert_eq!(
            t.commit_position(),
            Some(0),
            "failed offsets stay uncommitted"
        );
        assert_eq!(
            t.complete(&key("k"), a_tn, 13),
            Err(EngineError::UnknownPush { tn: a_tn })
        );
        t.complete(&key("k"), retry.tn, 14).unwrap();
        assert_eq!(t.commit_position(), Some(2));
    }

    #[test]
    fn compensation_is_skipped_while_in_flight_and_runs_when_idle() {
        let mut t = table();
        let a = started(t.offer(ev("k", 0, "A"), 10).unwrap());
        assert_eq!(t.compensate(&key("k"), 0, bytes("A"), 11), None);
        t.complete(&key("k"), a.tn, 12).unwrap();
        let c = t.compensate(&key("k"), 0, bytes("A"), 13).unwrap();
        assert!(c.compensation);
        assert_eq!((c.version, c.merged, c.payload.clone()), (0, 0, bytes("A")));
        // An event during the compensation push waits behind it.
        assert_eq!(t.offer(ev("k", 1, "B"), 14).unwrap(), Offer::Merged);
        let b = t.complete(&key("k"), c.tn, 15).unwrap().unwrap();
        assert_eq!(b.payload, bytes("B"));
        // A stored marker older than what the table knows is not re-pushed.
        t.complete(&key("k"), b.tn, 16).unwrap();
        assert_eq!(t.compensate(&key("k"), 0, bytes("A"), 17), None);
        assert_eq!(t.stats().compensations_skipped, 2);
    }

    #[test]
    fn retry_of_a_failed_compensation_is_still_a_compensation() {
        let mut t = table();
        let c = t.compensate(&key("k"), 3, bytes("S"), 10).unwrap();
        let retry = t.fail(c, 11).unwrap();
        assert!(retry.compensation && retry.merged == 0);
        assert_eq!(
            retry.payload,
            bytes("S"),
            "the failed push's value is retried"
        );
        // New events merged in make the retry a normal push.
        t.offer(ev("k", 4, "N"), 12).unwrap();
        let normal = t.fail(retry, 13).unwrap();
        assert!(!normal.compensation);
        assert_eq!((normal.merged, normal.payload.clone()), (1, bytes("N")));
    }

    #[test]
    fn seeded_key_drops_replayed_events_and_folds_patches_onto_stored_value() {
        let mut t = Table::new(TableConfig {
            policy: MergePolicy::JsonMergePatch,
            max_active_keys: 10,
        });
        t.seed(
            key("k"),
            5,
            1_000,
            Some(Payload::Value(Value::Json(json!({"a": 1, "b": 1})))),
        );
        let replay = Event {
            key: key("k"),
            offset: 5,
            version: None,
            payload: Payload::Value(Value::Json(json!({"a": 0}))),
        };
        assert_eq!(t.offer(replay, 1).unwrap(), Offer::Stale);
        let newer = Event {
            key: key("k"),
            offset: 6,
            version: None,
            payload: Payload::Value(Value::Json(json!({"b": 2}))),
        };
        let p = started(t.offer(newer, 1).unwrap());
        assert_eq!(
            p.payload,
            Payload::Value(Value::Json(json!({"a": 1, "b": 2})))
        );
        assert_eq!(p.tn, 1_001, "tn continues after the stored marker's");
    }

    #[test]
    fn saturation_follows_active_keys() {
        let mut t = Table::new(TableConfig {
            policy: MergePolicy::Latest,
            max_active_keys: 2,
        });
        let a = started(t.offer(ev("a", 0, "1"), 1).unwrap());
        assert!(!t.is_saturated());
        started(t.offer(ev("b", 1, "1"), 1).unwrap());
        assert!(t.is_saturated());
        t.complete(&key("a"), a.tn, 2).unwrap();
        assert!(!t.is_saturated());
    }

    #[test]
    fn refused_events_change_nothing() {
        let mut t = Table::new(TableConfig {
            policy: MergePolicy::JsonMergePatch,
            max_active_keys: 2,
        });
        let p = started(
            t.offer(
                Event {
                    key: key("k"),
                    offset: 3,
                    version: None,
                    payload: Payload::Value(Value::Json(json!({"a": 1}))),
                },
                1,
            )
            .unwrap(),
        );
        assert!(matches!(
            t.offer(ev("k", 4, "raw"), 2),
            Err(EngineError::Merge(_))
        ));
        assert!(matches!(
            t.offer(
                Event {
                    key: key("k"),
                    offset: 2,
                    version: None,
                    payload: Payload::Tombstone
                },
                2
            ),
            Err(EngineError::OutOfOrder(_))
        ));
        assert_eq!(t.complete(&key("k"), p.tn, 3).unwrap(), None);
        assert_eq!(t.stats().events, 1);
    }

    #[test]
    fn dead_letters_hold_the_commit_position() {
        let mut t = table();
        t.hold(0).unwrap();
        let p = started(t.offer(ev("k", 1, "A"), 1).unwrap());
        t.complete(&key("k"), p.tn, 2).unwrap();
        assert_eq!(t.commit_position(), Some(0));
        assert!(t.release(0));
        assert_eq!(t.commit_position(), Some(2));
    }
}
