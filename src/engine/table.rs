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
//! InFlight, not yet produced ──catch_up──▶ InFlight{push(flight ∪ pending), pending: None}
//! ```
//!
//! With push shaping ([`Windows`]) a key may also wait, holding its events
//! without a push in flight:
//!
//! ```text
//! Idle ──event e, inside delay or min_interval──▶ Waiting{pending: e, due}
//! Waiting ──event e──▶ Waiting{pending: fold(pending, e), due (delay slides, up to max_delay)}
//! InFlight ──ack, pending = Some(p), inside min_interval──▶ Waiting{pending: p, due}
//! Waiting ──wake at due──▶ InFlight{push(pending), pending: None}
//! ```
//!
//! A waiting key's events hold the commit position like pending ones, and
//! its deadline sits in one heap for the whole table: a million waiting
//! keys cost a million heap entries, not a million timers.
//!
//! A key never has two pushes in flight, so a stale push can never land after
//! a fresh one: the last push to start is the last to finish, and it starts
//! after the last event arrived. That is the fix for the article's Case 1 and
//! Case 2. The table is pure: the caller passes the clock in, performs the
//! pushes and reports their outcome back.

use bytes::Bytes;

use super::keys::{Entry, Keys};
use super::merge::{MergeError, MergePolicy, Payload};
use super::offsets::{Group, OffsetTracker, OutOfOrder};

/// A record key. Cheap to clone (reference counted).
pub type Key = Bytes;

/// One input event, decoded.
#[derive(Clone, Debug)]
pub struct Event {
    pub key: Key,
    /// Source offset in the partition.
    pub offset: i64,
    /// The event's own version, when it carries one; otherwise its offset
    /// orders it. Use one or the other per topic, not both. A delete
    /// without one is the exception: see [`Event::comes_after_all`].
    pub version: Option<u64>,
    pub payload: Payload,
}

impl Event {
    /// The version that orders this event among its key's events.
    #[inline]
    pub fn effective_version(&self) -> u64 {
        self.version.unwrap_or(self.offset.max(0) as u64)
    }

    /// A delete without a version of its own comes after whatever its key
    /// had (it is never stale) and leaves the key's version as it was (a key
    /// without one gets version 0), so
    /// the next event is compared with the version before the delete: an
    /// offset is no version to compare timestamps or counters with.
    #[inline]
    pub fn comes_after_all(&self) -> bool {
        self.version.is_none() && matches!(self.payload, Payload::Tombstone)
    }

    /// Where this event stands after its key's `newest` version (`None`:
    /// none yet): its version, and whether it is stale (not newer). The
    /// table and `verify` order events by this one rule.
    #[inline]
    pub fn ordered_after(&self, newest: Option<u64>) -> (u64, bool) {
        if self.comes_after_all() {
            return (newest.unwrap_or(0), false);
        }
        let version = self.effective_version();
        (version, newest.is_some_and(|newest| version <= newest))
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
    /// Offset of the newest event this push carries (`None`: a
    /// compensation push, which carries stored state).
    pub offset: Option<i64>,
    /// A re-push of stored state by the compensation scan (or the retry of
    /// one): it covers no new event.
    pub compensation: bool,
    /// tn of the key's last acknowledged push when this one started (the
    /// t2 its marker keeps), 0 when none is known: the caller writes markT1
    /// without reading the key's previous marker.
    pub acked_tn: u64,
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
    /// The key was idle but inside its window (`delay`, or `min_interval`
    /// since its last push started): it waits, and [`Table::wake`] starts
    /// its push when the window ends.
    Waiting,
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
    /// Events that found their key idle and made it wait (a window opened).
    pub windows_opened: u64,
    /// Idle keys forgotten beyond the cache.
    pub evicted: u64,
}

/// Events folded together and not yet acknowledged downstream. Their offsets
/// form one group of the offset tracker: they become done together.
#[derive(Clone, Copy, Debug)]
struct Batch {
    version: u64,
    /// The offsets' group; `None` exactly when the batch holds no event.
    group: Option<Group>,
    /// How many events; 0 for a compensation push (or no pending push).
    merged: u32,
    /// Offset of its newest event (-1: none).
    newest_offset: i64,
}

impl Batch {
    const EMPTY: Batch = Batch {
        version: 0,
        group: None,
        merged: 0,
        newest_offset: -1,
    };

    /// Folds an older batch (a failed push) into this newer one. The older
    /// batch's group has the smaller offsets, so it stands for both: this
    /// batch's own group closes (the older one holds the position below
    /// every offset of both until the merged batch is acknowledged).
    fn absorb_older(&mut self, older: Batch, offsets: &mut OffsetTracker) {
        self.version = self.version.max(older.version);
        self.merged += older.merged;
        self.newest_offset = self.newest_offset.max(older.newest_offset);
        if let Some(older_group) = older.group {
            if let Some(own) = self.group.replace(older_group) {
                offsets.close(own);
            }
        }
    }
}

/// What a key with a push in flight needs besides its [`Entry`]; kept in a
/// slab so the entry of every known key stays small.
#[derive(Debug)]
struct Active {
    /// Start time of the push in flight.
    tn: u64,
    /// The events the push in flight carries.
    flight: Batch,
    /// Events that arrived during the flight, folded into the next push
    /// (`merged == 0`: none).
    pending: Batch,
    /// The key's whole current value, not yet handed to a push. Under
    /// `latest` a push takes it; under `json-merge-patch` it stays, since
    /// the next patch folds onto it, and goes back to
    /// [`Table::values`] when the key turns idle.
    current: Option<Payload>,
    /// Set while the key waits without a push in flight (then `flight` is
    /// empty, `tn` is 0 and `pending` holds the events).
    waiting: Option<Waiting>,
}

/// A key waiting for its window to end.
#[derive(Debug)]
struct Waiting {
    key: Key,
    /// When the window opened (the first event, or the acknowledgement that
    /// found the key inside `min_interval`).
    opened: u64,
    /// When its push starts; it only ever moves later.
    due: u64,
    /// Whether later events move `due` (a `delay` window: the quiet period
    /// starts again with each event, up to `max_delay` after `opened`).
    slides: bool,
}

/// Settings of one table.
#[derive(Clone, Copy, Debug)]
pub struct TableConfig {
    pub policy: MergePolicy,
    /// Keys in flight or waiting beyond which the table reports saturation.
    pub max_active_keys: usize,
    pub windows: Windows,
    /// Keep a digest of each key's last acknowledged value
    /// ([`Table::acked_digest`]), for `singleflight.skip_unchanged`.
    pub digests: bool,
    /// Idle keys kept beyond those in flight or waiting; past it the
    /// table forgets idle keys (the caller seeds a key it does not know
    /// from its marker again).
    pub cached_keys: usize,
}

impl Default for TableConfig {
    fn default() -> Self {
        Self {
            policy: MergePolicy::Latest,
            max_active_keys: 10_000,
            windows: Windows::default(),
            digests: false,
            cached_keys: usize::MAX,
        }
    }
}

/// Push shaping, in nanoseconds of the caller's clock; 0 turns each off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Windows {
    /// A quiet period: an event that finds its key idle makes the key wait
    /// this long after the key's latest event before its push starts.
    pub delay: u64,
    /// The longest a `delay` window stays open after its first event, so a
    /// key that never goes quiet is still pushed (at least `delay`).
    pub max_delay: u64,
    /// A cooldown: a key's push starts no sooner than this after its
    /// previous push started. Retries of a failed push and compensation
    /// pushes do not wait for it.
    pub min_interval: u64,
}

impl Windows {
    /// When a push of a key whose last push started at `last_start` (0:
    /// none known) may start, by `min_interval`.
    #[inline]
    fn interval_ends(&self, last_start: u64) -> u64 {
        if self.min_interval == 0 || last_start == 0 {
            0
        } else {
            last_start.saturating_add(self.min_interval)
        }
    }

    /// When a `delay` window opened at `opened` may end, its key's newest
    /// event having come at `now` (0: no delay). `max_delay` counts as at
    /// least `delay`.
    #[inline]
    fn quiet_until(&self, now: u64, opened: u64) -> u64 {
        if self.delay == 0 {
            return 0;
        }
        let cap = opened.saturating_add(self.max_delay.max(self.delay));
        now.saturating_add(self.delay).min(cap)
    }

    /// Whether any window is on.
    #[inline]
    fn any(&self) -> bool {
        self.delay != 0 || self.min_interval != 0
    }
}

/// The singleflight table of one partition.
#[derive(Debug)]
pub struct Table {
    config: TableConfig,
    keys: Keys,
    /// The current value of each idle key, by [`Entry::id`], when the policy
    /// retains values (`json-merge-patch`); empty otherwise. A key in flight
    /// keeps it in its [`Active::current`].
    values: Vec<Option<Payload>>,
    /// The tn of each key's last acknowledged push, by [`Entry::id`] (0: none
    /// known). Beside the entries, which fill their cache line.
    acked: Vec<u64>,
    /// A digest of each key's last acknowledged value, by [`Entry::id`] (0:
    /// not known), when [`TableConfig::digests`]; empty otherwise.
    digests: Vec<u128>,
    /// In-flight state of active keys, indexed by `Entry::slot - 1`; the
    /// keys in flight are the slots not in `free_slots`.
    flights: Vec<Active>,
    free_slots: Vec<u32>,
    /// When each waiting key's window ends: `(due, slot)`, one entry per
    /// waiting key. An entry may be earlier than its key's `due` (a delay
    /// that slid); [`Table::wake`] then puts it back at the later time.
    wakes: std::collections::BinaryHeap<std::cmp::Reverse<(u64, u32)>>,
    /// The eviction hand: the bucket [`Table::evict_one`] looks at next.
    hand: usize,
    offsets: OffsetTracker,
    stats: TableStats,
}

impl Table {
    pub fn new(config: TableConfig) -> Self {
        Self {
            config,
            keys: Keys::new(),
            values: Vec::new(),
            acked: Vec::new(),
            digests: Vec::new(),
            flights: Vec::new(),
            free_slots: Vec::new(),
            wakes: Default::default(),
            hand: 0,
            offsets: OffsetTracker::new(),
            stats: TableStats::default(),
        }
    }

    pub fn policy(&self) -> MergePolicy {
        self.config.policy
    }

    /// The bucket of `key`, created idle when the key is new (and then,
    /// past the cache, an idle key is forgotten to make room).
    #[inline(always)]
    fn entry_of(&mut self, key: &[u8]) -> usize {
        let (mut pos, new) = self.keys.get_or_insert(key);
        self.keys.buckets[pos].referenced = true;
        if new {
            self.new_id(self.keys.buckets[pos].id as usize);
            if self.keys.len - self.active_keys() > self.config.cached_keys {
                self.evict_one(key);
                pos = self.keys.get(key).expect("the new key stays");
            }
        }
        pos
    }

    /// Sets up the per-id state of a new key. A recycled id's is clean
    /// already ([`Table::evict_one`] clears it).
    #[inline(always)]
    fn new_id(&mut self, id: usize) {
        if id < self.acked.len() {
            return;
        }
        self.acked.push(0);
        if self.config.digests {
            self.digests.push(0);
        }
        if self.config.policy.retains_value() {
            self.values.push(None);
        }
    }

    /// Forgets one idle key other than `keep`, in CLOCK order: the hand
    /// goes round the buckets, sparing once a key used since it last
    /// passed. A key in flight or waiting, or pinned, is never forgotten.
    /// Nothing is lost: an idle key's state is its marker's (version, t1,
    /// t2, value), which the caller reads back when the key comes again.
    #[cold]
    fn evict_one(&mut self, keep: &[u8]) {
        let mask = self.keys.buckets.len() - 1;
        for _ in 0..2 * self.keys.buckets.len() {
            let pos = self.hand & mask;
            let entry = &mut self.keys.buckets[pos];
            if entry.tag != 0 && entry.slot == 0 && !entry.pinned && &entry.key[..] != keep {
                if !entry.referenced {
                    let id = self.keys.remove(pos).id as usize;
                    self.acked[id] = 0;
                    if let Some(digest) = self.digests.get_mut(id) {
                        *digest = 0;
                    }
                    if let Some(value) = self.values.get_mut(id) {
                        *value = None;
                    }
                    self.stats.evicted += 1;
                    return; // the hand stays: an entry may have moved here
                }
                entry.referenced = false;
            }
            self.hand = (pos + 1) & mask;
        }
    }

    /// Keeps the key in memory for good: its marker does not hold all of
    /// its state (a marker written without its value).
    pub fn pin(&mut self, key: &[u8]) {
        let pos = self.entry_of(key);
        self.keys.buckets[pos].pinned = true;
    }

    /// Where an idle key keeps its value (`json-merge-patch` only).
    #[inline]
    fn value_of(&mut self, pos: usize) -> &mut Option<Payload> {
        &mut self.values[self.keys.buckets[pos].id as usize]
    }

    /// Takes in one event. Events of a partition must be offered in offset order.
    #[inline]
    pub fn offer(&mut self, event: Event, now_ns: u64) -> Result<Offer, EngineError> {
        // Refuse an out-of-order offset before anything changes.
        self.offsets.check(event.offset)?;
        let policy = self.config.policy;
        let pos = self.entry_of(&event.key);
        let entry = &mut self.keys.buckets[pos];
        let after_all = event.comes_after_all();
        let (version, stale) = event.ordered_after(entry.newest());
        if stale {
            self.offsets.track_done(event.offset)?;
            self.stats.events += 1;
            self.stats.stale += 1;
            return Ok(Offer::Stale);
        }

        if entry.slot != 0 {
            let active = &mut self.flights[entry.slot as usize - 1];
            policy.fold(&mut active.current, event.payload)?;
            // (A delete of a key without a version gives it version 0, as
            // its marker will after a restart.)
            if !after_all || entry.newest().is_none() {
                entry.set_newest(version);
            }
            let pending = &mut active.pending;
            if pending.merged == 0 {
                pending.group = Some(self.offsets.open(event.offset)?);
            } else {
                self.offsets.join(event.offset)?;
            }
            pending.version = version;
            pending.merged += 1;
            pending.newest_offset = event.offset;
            if let Some(waiting) = active.waiting.as_mut().filter(|w| w.slides) {
                let quiet = self.config.windows.quiet_until(now_ns, waiting.opened);
                waiting.due = waiting.due.max(quiet);
            }
            self.stats.events += 1;
            self.stats.merged += 1;
            return Ok(Offer::Merged);
        }

        let (payload, current) = match policy {
            // The event's value is the key's whole value: straight into the push.
            MergePolicy::Latest => (event.payload, None),
            MergePolicy::JsonMergePatch => {
                let mut current = self.value_of(pos).take();
                if let Err(e) = policy.fold(&mut current, event.payload) {
                    *self.value_of(pos) = current;
                    return Err(e.into());
                }
                (push_value(&mut current, true), current)
            }
        };
        if !after_all || self.keys.buckets[pos].newest().is_none() {
            self.keys.buckets[pos].set_newest(version);
        }
        let batch = Batch {
            version,
            group: Some(self.offsets.open(event.offset)?),
            merged: 1,
            newest_offset: event.offset,
        };
        self.stats.events += 1;
        let windows = self.config.windows;
        if windows.any() {
            let due = windows
                .quiet_until(now_ns, now_ns)
                .max(windows.interval_ends(self.keys.buckets[pos].last_tn));
            if due > now_ns {
                self.stats.windows_opened += 1;
                let waiting = Waiting {
                    key: event.key,
                    opened: now_ns,
                    due,
                    slides: windows.delay != 0,
                };
                // The push takes its value from `current` when it starts.
                let held = if policy.retains_value() {
                    current
                } else {
                    Some(payload)
                };
                self.wait_idle(pos, batch, held, waiting);
                return Ok(Offer::Waiting);
            }
        }
        self.stats.pushes_started += 1;
        Ok(Offer::Started(self.start_idle(
            event.key, pos, batch, payload, current, now_ns,
        )))
    }

    /// Starts the push of every waiting key whose window ended by `now_ns`
    /// (the caller calls this at [`Table::next_wake`]).
    pub fn wake(&mut self, now_ns: u64) -> Vec<Push> {
        let retains = self.config.policy.retains_value();
        let mut started = Vec::new();
        while let Some(&std::cmp::Reverse((due, slot))) = self.wakes.peek() {
            if due > now_ns {
                break;
            }
            self.wakes.pop();
            let active = &mut self.flights[slot as usize];
            let Some(waiting) = active.waiting.take() else {
                debug_assert!(false, "a wake for a key that is not waiting");
                continue;
            };
            if waiting.due > now_ns {
                // Its delay slid since: wake it later.
                self.wakes.push(std::cmp::Reverse((waiting.due, slot)));
                active.waiting = Some(waiting);
                continue;
            }
            let pos = self.keys.get(&waiting.key).expect("a waiting key is known");
            let entry = &mut self.keys.buckets[pos];
            let batch = std::mem::replace(&mut active.pending, Batch::EMPTY);
            let payload = push_value(&mut active.current, retains);
            let acked = self.acked[entry.id as usize];
            self.stats.pushes_started += 1;
            started.push(start_flight(
                waiting.key,
                entry,
                active,
                batch,
                payload,
                now_ns,
                acked,
            ));
        }
        started
    }

    /// When the earliest waiting key's window may end (`None`: no key
    /// waits). Possibly early: [`Table::wake`] then starts nothing.
    pub fn next_wake(&self) -> Option<u64> {
        self.wakes.peek().map(|std::cmp::Reverse((due, _))| *due)
    }

    /// Keys waiting for their window to end.
    pub fn waiting_keys(&self) -> usize {
        self.wakes.len()
    }

    /// The digest the caller recorded for the key's last acknowledged
    /// value (`None`: none known, or digests are off).
    pub fn acked_digest(&self, key: &[u8]) -> Option<u128> {
        let pos = self.keys.get(key)?;
        let digest = *self.digests.get(self.keys.buckets[pos].id as usize)?;
        (digest != 0).then_some(digest)
    }

    /// Records the digest of the key's last acknowledged value (`None`:
    /// forget it). Nothing when digests are off.
    pub fn set_acked_digest(&mut self, key: &[u8], digest: Option<u128>) {
        if !self.config.digests {
            return;
        }
        let pos = self.entry_of(key);
        let id = self.keys.buckets[pos].id as usize;
        self.digests[id] = digest.unwrap_or(0);
    }

    /// The push `(key, tn)` was acknowledged. Returns the next push of the
    /// key when events arrived meanwhile. The key's marker closes (t2 = tn).
    #[inline]
    pub fn complete(
        &mut self,
        key: &Key,
        tn: u64,
        now_ns: u64,
    ) -> Result<Option<Push>, EngineError> {
        let (pos, slot) = self.flight_of(key, tn)?;
        let retains = self.config.policy.retains_value();
        let entry = &mut self.keys.buckets[pos];
        let active = &mut self.flights[slot];
        if let Some(group) = active.flight.group {
            self.offsets.close(group);
        }
        self.acked[entry.id as usize] = tn;
        self.stats.acked += 1;
        if active.pending.merged == 0 {
            if retains {
                self.values[entry.id as usize] = active.current.take();
            }
            active.flight = Batch::EMPTY;
            entry.slot = 0;
            self.free_slots.push(slot as u32);
            return Ok(None);
        }
        let due = self.config.windows.interval_ends(entry.last_tn);
        if due > now_ns {
            // The events merged behind it wait for the cooldown.
            active.flight = Batch::EMPTY;
            active.tn = 0;
            let waiting = Waiting {
                key: key.clone(),
                opened: now_ns,
                due,
                slides: false,
            };
            self.wait(slot, waiting);
            return Ok(None);
        }
        let batch = std::mem::replace(&mut active.pending, Batch::EMPTY);
        self.stats.pushes_started += 1;
        let payload = push_value(&mut active.current, retains);
        Ok(Some(start_flight(
            key.clone(),
            entry,
            active,
            batch,
            payload,
            now_ns,
            tn,
        )))
    }

    /// A push started but not yet produced takes in the events that merged
    /// behind it meanwhile (a caller that starts a batch's pushes after the
    /// whole batch is offered). Returns the push carrying them all under the
    /// same tn, so a burst read in one batch becomes one push rather than a
    /// push of its first event and a second one of the rest. Unchanged when
    /// nothing merged, or when the push is not the key's flight.
    pub fn catch_up(&mut self, push: Push) -> Push {
        let Ok((_, slot)) = self.flight_of(&push.key, push.tn) else {
            return push;
        };
        let retains = self.config.policy.retains_value();
        let active = &mut self.flights[slot];
        if active.pending.merged == 0 {
            return push;
        }
        let mut batch = std::mem::replace(&mut active.pending, Batch::EMPTY);
        batch.absorb_older(active.flight, &mut self.offsets);
        active.flight = batch;
        Push {
            payload: push_value(&mut active.current, retains),
            version: batch.version,
            merged: batch.merged,
            offset: (batch.newest_offset >= 0).then_some(batch.newest_offset),
            compensation: false,
            ..push
        }
    }

    /// The push failed for good (after the client's own retries). Its marker
    /// stays open; the key is pushed again at once with its newest value (the
    /// failed push's own, unless newer events arrived), covering the failed
    /// push's events too. The caller may delay producing the returned push
    /// (backoff); the key counts as in flight.
    pub fn fail(&mut self, failed: Push, now_ns: u64) -> Result<Push, EngineError> {
        let (pos, slot) = self.flight_of(&failed.key, failed.tn)?;
        let retains = self.config.policy.retains_value();
        let entry = &mut self.keys.buckets[pos];
        let active = &mut self.flights[slot];
        if active.current.is_none() {
            active.current = Some(failed.payload);
        }
        let mut retry = std::mem::replace(&mut active.pending, Batch::EMPTY);
        retry.absorb_older(active.flight, &mut self.offsets);
        self.stats.failed += 1;
        self.stats.pushes_started += 1;
        let payload = push_value(&mut active.current, retains);
        let acked = self.acked[entry.id as usize];
        Ok(start_flight(
            failed.key, entry, active, retry, payload, now_ns, acked,
        ))
    }

    /// Compensation: re-push the stored `(version, payload)` of a key whose
    /// marker is open. Skipped (`None`) while the key is in flight (that push
    /// will close the marker) or when the table already knows a newer version
    /// (the newer push, acknowledged, superseded the stored one).
    ///
    /// `offset` is the stored state's (its marker's): the push, and its
    /// retries, carry it on.
    pub fn compensate(
        &mut self,
        key: &Key,
        version: u64,
        offset: Option<i64>,
        payload: Payload,
        now_ns: u64,
    ) -> Option<Push> {
        let pos = self.entry_of(key);
        let entry = &mut self.keys.buckets[pos];
        if entry.slot != 0 || entry.newest().is_some_and(|newest| newest > version) {
            self.stats.compensations_skipped += 1;
            return None;
        }
        entry.set_newest(version);
        let retains = self.config.policy.retains_value();
        let mut current = if retains {
            self.value_of(pos).take()
        } else {
            None
        };
        if current.is_none() {
            current = Some(payload);
        }
        let payload = push_value(&mut current, retains);
        self.stats.compensations_started += 1;
        let batch = Batch {
            version,
            newest_offset: offset.unwrap_or(-1),
            ..Batch::EMPTY
        };
        Some(self.start_idle(key.clone(), pos, batch, payload, current, now_ns))
    }

    /// Seeds an idle key from durable state (its marker: `version`, the tn
    /// of its last started push `t1` and of its last acknowledged one `t2`):
    /// replayed events not newer than `version` are then dropped as stale,
    /// merge patches fold onto `payload`, and tn moves on from `t1`.
    pub fn seed(&mut self, key: Key, version: u64, t1: u64, t2: u64, payload: Option<Payload>) {
        let pos = self.entry_of(&key);
        let entry = &mut self.keys.buckets[pos];
        if entry.slot != 0 {
            return;
        }
        entry.last_tn = entry.last_tn.max(t1).max(t2);
        let acked = &mut self.acked[entry.id as usize];
        *acked = (*acked).max(t2);
        if entry.newest().is_none_or(|newest| newest < version) {
            entry.set_newest(version);
            if self.config.policy.retains_value() {
                *self.value_of(pos) = payload;
            }
        }
    }

    /// Whether an event at `offset` can be offered or held: it is above
    /// every offset the table tracked (records come in offset order, unless
    /// the partition was read again from further back).
    pub fn accepts(&self, offset: i64) -> Result<(), EngineError> {
        Ok(self.offsets.check(offset)?)
    }

    /// Holds the commit position at `offset` for a record handled outside the
    /// table (a dead letter being written); release it with [`Self::release`].
    pub fn hold(&mut self, offset: i64) -> Result<(), EngineError> {
        Ok(self.offsets.track(offset)?)
    }

    /// Passes an event known to be stale without offering it (the caller
    /// decided, from what the table does not know).
    pub fn drop_stale(&mut self, offset: i64) -> Result<(), EngineError> {
        self.stats.events += 1;
        self.stats.stale += 1;
        Ok(self.offsets.track_done(offset)?)
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
        self.keys.get(key).is_some()
    }

    /// Whether the key has a push in flight.
    pub fn in_flight(&self, key: &[u8]) -> bool {
        self.keys
            .get(key)
            .is_some_and(|pos| self.keys.buckets[pos].slot != 0)
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
        self.keys.len
    }

    pub fn stats(&self) -> TableStats {
        self.stats
    }

    /// The bucket and slab slot of `key` when its flight is `tn`.
    #[inline(always)]
    fn flight_of(&self, key: &[u8], tn: u64) -> Result<(usize, usize), EngineError> {
        let unknown = EngineError::UnknownPush { tn };
        let pos = self.keys.get(key).ok_or(unknown.clone())?;
        let slot = (self.keys.buckets[pos].slot as usize)
            .checked_sub(1)
            .ok_or(unknown.clone())?;
        if self.flights[slot].tn != tn {
            return Err(unknown);
        }
        Ok((pos, slot))
    }

    /// An idle key starts a push of `payload`; `current` is what it keeps
    /// meanwhile ([`Active::current`]). Its in-flight state takes a free slot.
    #[inline(always)]
    fn start_idle(
        &mut self,
        key: Key,
        pos: usize,
        batch: Batch,
        payload: Payload,
        current: Option<Payload>,
        now_ns: u64,
    ) -> Push {
        let slot = self.take_slot(pos, current);
        let entry = &mut self.keys.buckets[pos];
        let active = &mut self.flights[slot];
        let acked = self.acked[entry.id as usize];
        start_flight(key, entry, active, batch, payload, now_ns, acked)
    }

    /// An idle key starts waiting with `batch` pending; `current` is its
    /// value meanwhile.
    fn wait_idle(&mut self, pos: usize, batch: Batch, current: Option<Payload>, waiting: Waiting) {
        let slot = self.take_slot(pos, current);
        self.flights[slot].pending = batch;
        self.wait(slot, waiting);
    }

    /// The key in `slot` waits (its events pending, no push in flight)
    /// until [`Table::wake`] at its due time: one heap entry per waiting key.
    fn wait(&mut self, slot: usize, waiting: Waiting) {
        self.wakes
            .push(std::cmp::Reverse((waiting.due, slot as u32)));
        self.flights[slot].waiting = Some(waiting);
    }

    /// A free slot for the key at `pos`, holding `current`.
    #[inline(always)]
    fn take_slot(&mut self, pos: usize, current: Option<Payload>) -> usize {
        let slot = match self.free_slots.pop() {
            Some(slot) => slot as usize,
            None => {
                self.flights.push(Active {
                    tn: 0,
                    flight: Batch::EMPTY,
                    pending: Batch::EMPTY,
                    current: None,
                    waiting: None,
                });
                self.flights.len() - 1
            }
        };
        self.keys.buckets[pos].slot = slot as u32 + 1;
        let active = &mut self.flights[slot];
        // A free slot holds no value (the key that left it took or returned it).
        debug_assert!(active.current.is_none() && active.waiting.is_none());
        if current.is_some() {
            active.current = current;
        }
        slot
    }
}

/// The value a push of the key carries: its current value, taken, or cloned
/// when the policy retains it.
#[inline(always)]
fn push_value(current: &mut Option<Payload>, retains: bool) -> Payload {
    // Every path into a flight has just folded or stored a value.
    let value = if retains {
        current.clone()
    } else {
        current.take()
    };
    value.expect("a key starting a push holds its current value")
}

/// Starts a push of `payload`, `tn = max(now, last_tn + 1)`. A push that
/// carries no new event is a compensation push (also when it retries a
/// failed one).
#[inline(always)]
fn start_flight(
    key: Key,
    entry: &mut Entry,
    active: &mut Active,
    batch: Batch,
    payload: Payload,
    now_ns: u64,
    acked_tn: u64,
) -> Push {
    let tn = entry.next_tn(now_ns);
    active.tn = tn;
    active.flight = batch;
    Push {
        key,
        tn,
        version: batch.version,
        payload,
        merged: batch.merged,
        offset: (batch.newest_offset >= 0).then_some(batch.newest_offset),
        compensation: batch.merged == 0,
        acked_tn,
    }
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
    fn a_push_carries_the_tn_of_its_keys_last_acknowledged_push() {
        let mut t = table();
        let a = started(t.offer(ev("k", 0, "A"), 100).unwrap());
        assert_eq!(a.acked_tn, 0, "nothing acknowledged yet");
        assert_eq!(t.offer(ev("k", 1, "B"), 110).unwrap(), Offer::Merged);
        let b = t
            .complete(&key("k"), a.tn, 120)
            .unwrap()
            .expect("B was pending");
        assert_eq!(b.acked_tn, a.tn);
        let retry = t.fail(b.clone(), 130).unwrap();
        assert_eq!(retry.acked_tn, a.tn, "a failure acknowledges nothing");
        assert_eq!(t.complete(&key("k"), retry.tn, 140).unwrap(), None);
        let c = started(t.offer(ev("k", 2, "C"), 150).unwrap());
        assert_eq!(c.acked_tn, retry.tn);

        // A seeded key goes on from its marker's t2; a compensation push too.
        t.seed(key("s"), 5, 1_000, 900, None);
        assert_eq!(started(t.offer(ev("s", 9, "S"), 1).unwrap()).acked_tn, 900);
        t.seed(key("o"), 5, 1_000, 800, None);
        let push = t.compensate(&key("o"), 5, None, bytes("O"), 1).unwrap();
        assert_eq!(push.offset, None);
        assert_eq!((push.acked_tn, push.tn), (800, 1_001));
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
    fn a_push_not_yet_produced_catches_up_with_what_merged_behind_it() {
        let mut t = table();
        let a = started(t.offer(ev("k", 0, "A"), 100).unwrap());
        let other = started(t.offer(ev("o", 1, "O"), 100).unwrap());
        assert_eq!(t.offer(ev("k", 2, "B"), 100).unwrap(), Offer::Merged);
        assert_eq!(t.offer(ev("k", 3, "C"), 100).unwrap(), Offer::Merged);
        let tn = a.tn;
        let c = t.catch_up(a);
        assert_eq!(
            (c.tn, c.version, c.merged, c.compensation),
            (tn, 3, 3, false)
        );
        assert_eq!(c.payload, bytes("C"));
        // Nothing merged behind `o`: its push is unchanged.
        assert_eq!(t.catch_up(other.clone()), other);
        assert_eq!(t.commit_position(), Some(0));
        t.complete(&key("o"), other.tn, 101).unwrap();
        assert_eq!(t.commit_position(), Some(0), "k's offsets 0, 2, 3 are open");
        assert_eq!(
            t.complete(&key("k"), tn, 102).unwrap(),
            None,
            "nothing is left pending"
        );
        assert_eq!(t.commit_position(), Some(4));
        let s = t.stats();
        assert_eq!((s.events, s.merged, s.pushes_started), (4, 2, 2));
        assert_eq!(
            t.catch_up(c.clone()),
            c,
            "a push no longer in flight comes back unchanged"
        );
    }

    #[test]
    fn a_merge_patch_push_catches_up_with_every_field() {
        let mut t = Table::new(TableConfig {
            policy: MergePolicy::JsonMergePatch,
            max_active_keys: 10,
            ..TableConfig::default()
        });
        let patch = |offset, v: serde_json::Value| Event {
            key: key("k"),
            offset,
            version: None,
            payload: Payload::Value(Value::Json(v)),
        };
        let a = started(t.offer(patch(0, json!({"a": 1})), 1).unwrap());
        t.offer(patch(1, json!({"b": 2})), 1).unwrap();
        let c = t.catch_up(a);
        assert_eq!(
            c.payload,
            Payload::Value(Value::Json(json!({"a": 1, "b": 2})))
        );
        t.complete(&key("k"), c.tn, 2).unwrap();
        // The value stays for the next patch.
        let d = started(t.offer(patch(2, json!({"a": null})), 3).unwrap());
        assert_eq!(d.payload, Payload::Value(Value::Json(json!({"b": 2}))));
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
        assert_eq!(t.compensate(&key("k"), 0, None, bytes("A"), 11), None);
        t.complete(&key("k"), a.tn, 12).unwrap();
        let c = t.compensate(&key("k"), 0, None, bytes("A"), 13).unwrap();
        assert!(c.compensation);
        assert_eq!((c.version, c.merged, c.payload.clone()), (0, 0, bytes("A")));
        // An event during the compensation push waits behind it.
        assert_eq!(t.offer(ev("k", 1, "B"), 14).unwrap(), Offer::Merged);
        let b = t.complete(&key("k"), c.tn, 15).unwrap().unwrap();
        assert_eq!(b.payload, bytes("B"));
        // A stored marker older than what the table knows is not re-pushed.
        t.complete(&key("k"), b.tn, 16).unwrap();
        assert_eq!(t.compensate(&key("k"), 0, None, bytes("A"), 17), None);
        assert_eq!(t.stats().compensations_skipped, 2);
    }

    #[test]
    fn retry_of_a_failed_compensation_is_still_a_compensation() {
        let mut t = table();
        let c = t.compensate(&key("k"), 3, None, bytes("S"), 10).unwrap();
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
            ..TableConfig::default()
        });
        t.seed(
            key("k"),
            5,
            1_000,
            900,
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
            ..TableConfig::default()
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
            ..TableConfig::default()
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
    fn keys_survive_the_table_growing_and_keep_their_state() {
        let mut t = Table::new(TableConfig {
            policy: MergePolicy::JsonMergePatch,
            max_active_keys: usize::MAX,
            ..TableConfig::default()
        });
        let n = 5_000;
        let mut pushes = Vec::new();
        for k in 0..n {
            let e = Event {
                key: key(&format!("key-{k}-with-a-name-longer-than-24-bytes")),
                offset: k,
                version: None,
                payload: Payload::Value(Value::Json(json!({ "k": k }))),
            };
            pushes.push(started(t.offer(e, 1).unwrap()));
        }
        assert_eq!((t.known_keys(), t.active_keys()), (n as usize, n as usize));
        for p in &pushes[..n as usize / 2] {
            assert_eq!(t.complete(&p.key, p.tn, 2).unwrap(), None);
        }
        for (k, p) in pushes.iter().enumerate() {
            assert!(t.knows(&p.key));
            assert_eq!(t.in_flight(&p.key), k >= n as usize / 2);
        }
        assert!(!t.knows(b"key-unknown"));
        // An idle key folds its next patch onto the value it kept.
        let e = Event {
            key: pushes[0].key.clone(),
            offset: n,
            version: None,
            payload: Payload::Value(Value::Json(json!({ "more": true }))),
        };
        let p = started(t.offer(e, 3).unwrap());
        assert_eq!(
            p.payload,
            Payload::Value(Value::Json(json!({ "k": 0, "more": true })))
        );
        assert!(p.tn > pushes[0].tn);
        assert_eq!(t.commit_position(), Some(n / 2));
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

    /// A compensation push carries its stored state's offset, and so does
    /// its retry, so the marker the retry writes still names it (a delete
    /// replayed below it is then known to be stale).
    #[test]
    fn a_retried_compensation_keeps_the_stored_offset() {
        let mut t = table();
        let push = t.compensate(&key("k"), 7, Some(42), bytes("S"), 1).unwrap();
        assert_eq!(push.offset, Some(42));
        let retry = t.fail(push, 2).unwrap();
        assert_eq!((retry.offset, retry.version), (Some(42), 7));
    }

    fn shaped(delay: u64, max_delay: u64, min_interval: u64) -> Table {
        Table::new(TableConfig {
            windows: Windows {
                delay,
                max_delay,
                min_interval,
            },
            ..TableConfig::default()
        })
    }

    #[test]
    fn a_burst_inside_the_delay_is_one_push_when_the_key_goes_quiet() {
        let mut t = shaped(100, 1_000, 0);
        assert_eq!(t.offer(ev("k", 0, "A"), 10).unwrap(), Offer::Waiting);
        assert_eq!(t.offer(ev("k", 1, "B"), 50).unwrap(), Offer::Merged);
        assert_eq!(t.offer(ev("k", 2, "C"), 90).unwrap(), Offer::Merged);
        assert_eq!(
            t.commit_position(),
            Some(0),
            "waiting events hold the commit"
        );
        assert_eq!(t.next_wake(), Some(110), "A's due, slid since");
        assert!(t.wake(110).is_empty(), "the quiet period restarted at C");
        assert_eq!(t.next_wake(), Some(190), "put back at C's due");
        let push = t.wake(190).pop().expect("quiet since C");
        assert_eq!(
            (push.payload, push.merged, push.offset),
            (bytes("C"), 3, Some(2))
        );
        assert_eq!(t.next_wake(), None);
        assert_eq!(t.complete(&key("k"), push.tn, 200).unwrap(), None);
        assert_eq!(t.commit_position(), Some(3));
    }

    #[test]
    fn max_delay_pushes_a_key_that_never_goes_quiet() {
        let mut t = shaped(100, 250, 0);
        assert_eq!(t.offer(ev("k", 0, "A"), 0).unwrap(), Offer::Waiting);
        let mut pushed = None;
        for (n, at) in (50..=300).step_by(50).enumerate() {
            if let Some(push) = t.wake(at).pop() {
                pushed = Some((at, push));
                break;
            }
            assert_eq!(
                t.offer(ev("k", n as i64 + 1, "x"), at).unwrap(),
                Offer::Merged
            );
        }
        let (at, push) = pushed.expect("pushed while events kept coming");
        assert_eq!(
            (at, push.merged),
            (250, 5),
            "max_delay after the first event"
        );
    }

    #[test]
    fn min_interval_holds_a_keys_next_push_and_its_events_commit() {
        let mut t = shaped(0, 0, 1_000);
        let first = started(t.offer(ev("k", 0, "A"), 100).unwrap());
        assert_eq!(t.offer(ev("k", 1, "B"), 200).unwrap(), Offer::Merged);
        assert_eq!(
            t.complete(&key("k"), first.tn, 300).unwrap(),
            None,
            "B waits"
        );
        assert_eq!(t.commit_position(), Some(1), "B is not covered yet");
        assert_eq!(t.offer(ev("k", 2, "C"), 400).unwrap(), Offer::Merged);
        assert_eq!(
            t.next_wake(),
            Some(first.tn + 1_000),
            "no sliding for a cooldown"
        );
        let next = t
            .wake(first.tn + 1_000)
            .pop()
            .expect("the cooldown is over");
        assert_eq!((next.payload.clone(), next.merged), (bytes("C"), 2));
        assert_eq!(next.acked_tn, first.tn);
        assert_eq!(t.complete(&key("k"), next.tn, 1_200).unwrap(), None);
        assert_eq!(t.commit_position(), Some(3));
        // An idle key inside its cooldown waits too; past it, it starts at once.
        assert_eq!(t.offer(ev("k", 3, "D"), 1_300).unwrap(), Offer::Waiting);
        let d = t.wake(next.tn + 1_000).pop().expect("D");
        t.complete(&key("k"), d.tn, d.tn + 1).unwrap();
        started(t.offer(ev("k", 4, "E"), d.tn + 5_000).unwrap());
    }

    #[test]
    fn a_waiting_key_is_not_compensated_and_counts_as_active() {
        let mut t = shaped(100, 100, 0);
        assert_eq!(t.offer(ev("k", 0, "A"), 0).unwrap(), Offer::Waiting);
        assert_eq!(t.active_keys(), 1);
        assert!(t.compensate(&key("k"), 0, None, bytes("old"), 10).is_none());
        let push = t.wake(100).pop().unwrap();
        assert_eq!(push.payload, bytes("A"));
    }

    #[test]
    fn idle_keys_beyond_the_cache_are_forgotten_in_clock_order_and_busy_ones_never() {
        let mut t = Table::new(TableConfig {
            cached_keys: 2,
            ..TableConfig::default()
        });
        let busy = started(t.offer(ev("busy", 0, "B"), 1).unwrap());
        for (n, k) in ["a", "b", "c", "d"].iter().enumerate() {
            let push = started(t.offer(ev(k, n as i64 + 1, "x"), 2).unwrap());
            t.complete(&key(k), push.tn, 3).unwrap();
        }
        assert!(t.knows(b"busy"), "a key in flight stays");
        assert_eq!(t.known_keys(), 3, "two idle keys and the busy one");
        assert_eq!(t.stats().evicted, 2);
        // The newest idle keys are the ones kept (the hand spares used ones once).
        assert!(
            t.knows(b"c") && t.knows(b"d"),
            "{:?}",
            ["a", "b", "c", "d"].map(|k| t.knows(k.as_bytes()))
        );
        // A forgotten key comes back unknown: the caller seeds it again.
        assert!(!t.knows(b"a"));
        t.seed(key("a"), 9, 5, 5, None);
        assert_eq!(
            t.offer(ev("a", 5, "x"), 6).unwrap(),
            Offer::Stale,
            "its seeded version keeps it"
        );
        t.complete(&key("busy"), busy.tn, 7).unwrap();
    }

    #[test]
    fn a_pinned_key_is_never_forgotten() {
        let mut t = Table::new(TableConfig {
            cached_keys: 1,
            ..TableConfig::default()
        });
        let push = started(t.offer(ev("pinned", 0, "x"), 1).unwrap());
        t.complete(&key("pinned"), push.tn, 2).unwrap();
        t.pin(b"pinned");
        for (n, k) in ["a", "b", "c"].iter().enumerate() {
            let push = started(t.offer(ev(k, n as i64 + 1, "x"), 3).unwrap());
            t.complete(&key(k), push.tn, 4).unwrap();
        }
        assert!(t.knows(b"pinned"));
    }
}
