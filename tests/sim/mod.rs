//! A deterministic discrete-event simulation of one partition.
//!
//! A seeded scheduler interleaves event arrivals, push completions (with
//! random latencies and failures) and compensation calls. A [`System`] is
//! what is being simulated: keyflight's engine, or the article's algorithm
//! as a reference model. The oracle here is independent of keyflight's code:
//! it computes accepted events, expected final values (its own RFC 7396) and
//! offset coverage from the schedule alone.

#![allow(dead_code)]

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};

use bytes::Bytes;
use keyflight::engine::{
    Event, MergePolicy, Offer, Payload, Push, Table, TableConfig, Value, Windows,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

/// A key's value as the simulation sees it: a JSON document, or deleted.
pub type Doc = Option<serde_json::Value>;

/// One input event. Its offset is its index in the schedule.
#[derive(Clone, Debug)]
pub struct Input {
    pub at: u64,
    pub key: u32,
    pub version: Option<u64>,
    /// The event's value (a merge patch under json-merge-patch); `None` deletes.
    pub value: Doc,
}

impl Input {
    /// Its version, given its key's newest so far: its own, else its
    /// offset; a delete without one takes the key's newest (it comes after
    /// whatever the key had and leaves its version as it was).
    pub fn version_after(&self, offset: i64, newest: Option<u64>) -> u64 {
        match (self.version, &self.value) {
            (None, None) => newest.unwrap_or(0),
            (version, _) => version.unwrap_or(offset as u64),
        }
    }

    fn comes_after_all(&self) -> bool {
        self.version.is_none() && self.value.is_none()
    }
}

/// Each input's version and whether it is accepted (newer than every
/// earlier accepted event of its key; a delete without a version always).
pub fn versions(inputs: &[Input]) -> Vec<(u64, bool)> {
    let mut newest: HashMap<u32, u64> = HashMap::new();
    inputs
        .iter()
        .enumerate()
        .map(|(offset, input)| {
            let version = input.version_after(offset as i64, newest.get(&input.key).copied());
            if input.comes_after_all() {
                newest.entry(input.key).or_insert(version);
                return (version, true);
            }
            match newest.get(&input.key) {
                Some(&n) if version <= n => (version, false),
                _ => {
                    newest.insert(input.key, version);
                    (version, true)
                }
            }
        })
        .collect()
}

/// A push started by a system.
#[derive(Clone, Debug, PartialEq)]
pub struct Started {
    pub key: u32,
    pub id: u64,
    pub version: u64,
    pub value: Doc,
    pub compensation: bool,
}

/// What is being simulated.
pub trait System {
    fn event(&mut self, offset: i64, input: &Input, now: u64) -> Vec<Started>;
    fn done(&mut self, push: &Started, ok: bool, now: u64) -> Vec<Started>;
    /// A turn ended: an action and the arrivals of the same instant right
    /// behind it (what keyflight's partition task handles in one turn of
    /// its loop: an acknowledgement or a poll batch, and a batch already
    /// waiting).
    fn end_of_turn(&mut self, _now: u64) -> Vec<Started> {
        Vec::new()
    }
    fn compensate(&mut self, _key: u32, _version: u64, _value: Doc, _now: u64) -> Vec<Started> {
        Vec::new()
    }
    /// The pushes of keys whose window ended by `now`.
    fn wake(&mut self, _now: u64) -> Vec<Started> {
        Vec::new()
    }
    /// When the system wants [`System::wake`] called next.
    fn next_wake(&self) -> Option<u64> {
        None
    }
    /// The position the system would commit, if it tracks one.
    fn commit_position(&self) -> Option<i64> {
        None
    }
}

/// Decides how long each push takes and whether it fails.
pub trait Latency {
    fn latency(&mut self, push: &Started) -> u64;
    fn fails(&mut self, _push: &Started) -> bool {
        false
    }
}

/// Random latencies (mostly short, sometimes very slow) and failures.
pub struct RandomLatency {
    pub rng: ChaCha8Rng,
    pub fail_rate: f64,
}

impl Latency for RandomLatency {
    fn latency(&mut self, _push: &Started) -> u64 {
        if self.rng.random_bool(0.1) {
            self.rng.random_range(100..400)
        } else {
            self.rng.random_range(1..40)
        }
    }
    fn fails(&mut self, _push: &Started) -> bool {
        self.fail_rate > 0.0 && self.rng.random_bool(self.fail_rate)
    }
}

/// Latency by the version a push carries (scripted cases).
pub struct ByVersion(pub BTreeMap<u64, u64>, pub u64);

impl Latency for ByVersion {
    fn latency(&mut self, push: &Started) -> u64 {
        self.0.get(&push.version).copied().unwrap_or(self.1)
    }
}

/// What happened in one run.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Acknowledged pushes in completion order.
    pub completed: Vec<Started>,
    pub started: usize,
    pub failed: usize,
    pub violations: Vec<String>,
    pub final_position: Option<i64>,
    /// What happened, in order (for checks of timing).
    pub trace: Vec<Step>,
}

/// One happening of a run, at its instant.
#[derive(Clone, Debug)]
pub enum Step {
    Arrived { at: u64, input: usize },
    Started { at: u64, push: Started, retry: bool },
    Finished { at: u64, key: u32, id: u64 },
}

impl Outcome {
    /// The value of the last acknowledged push of each key.
    pub fn final_values(&self) -> BTreeMap<u32, (u64, Doc)> {
        let mut last = BTreeMap::new();
        for push in &self.completed {
            last.insert(push.key, (push.version, push.value.clone()));
        }
        last
    }
}

enum Action {
    Arrive(usize),
    Finish(Started, bool),
    Compensate(u32),
    Wake,
}

/// Runs a schedule. With `check`, asserts the engine's invariants at every
/// step: never two pushes in flight for a key, and the commit position never
/// passes an uncovered event.
pub fn run(
    system: &mut dyn System,
    inputs: &[Input],
    compensations: &[(u64, u32)],
    latency: &mut dyn Latency,
    tie_rng: &mut ChaCha8Rng,
    check: bool,
) -> Outcome {
    let mut queue: BinaryHeap<Reverse<(u64, u32, usize)>> = BinaryHeap::new();
    let mut actions: Vec<Option<Action>> = Vec::new();
    // Ties at one instant: arrivals keep their offset order (a partition is
    // read in order) while completions fall randomly before or after them.
    let schedule = |queue: &mut BinaryHeap<_>,
                    actions: &mut Vec<Option<Action>>,
                    at: u64,
                    action: Action,
                    rng: &mut ChaCha8Rng| {
        let tie = match action {
            Action::Arrive(_) => u32::MAX / 2,
            _ => rng.random::<u32>(),
        };
        actions.push(Some(action));
        queue.push(Reverse((at, tie, actions.len() - 1)));
    };
    for (i, input) in inputs.iter().enumerate() {
        schedule(
            &mut queue,
            &mut actions,
            input.at,
            Action::Arrive(i),
            tie_rng,
        );
    }
    for &(at, key) in compensations {
        schedule(
            &mut queue,
            &mut actions,
            at,
            Action::Compensate(key),
            tie_rng,
        );
    }

    let mut out = Outcome::default();
    let mut coverage = Coverage::new(inputs);
    let mut in_flight: HashMap<u32, u64> = HashMap::new();
    // The marker's stored data: the last push started per key.
    let mut marker: HashMap<u32, (u64, Doc)> = HashMap::new();

    // Wakes scheduled and not yet run, by instant.
    let mut wakes = std::collections::BTreeSet::new();
    while let Some(Reverse((now, _, index))) = queue.pop() {
        let mut retry = false;
        let mut started = match actions[index].take().expect("each action runs once") {
            Action::Arrive(i) => {
                coverage.arrived(i);
                out.trace.push(Step::Arrived { at: now, input: i });
                system.event(i as i64, &inputs[i], now)
            }
            Action::Wake => {
                wakes.remove(&now);
                system.wake(now)
            }
            Action::Finish(push, ok) => {
                if in_flight.get(&push.key) == Some(&push.id) {
                    in_flight.remove(&push.key);
                }
                out.trace.push(Step::Finished {
                    at: now,
                    key: push.key,
                    id: push.id,
                });
                retry = !ok;
                if ok {
                    coverage.acked(push.key, push.version);
                    out.completed.push(push.clone());
                } else {
                    out.failed += 1;
                }
                system.done(&push, ok, now)
            }
            Action::Compensate(key) => match marker.get(&key) {
                Some((version, value)) => system.compensate(key, *version, value.clone(), now),
                None => Vec::new(),
            },
        };
        // A turn of keyflight's partition task: this action and the
        // arrivals of the same instant right behind it.
        let turn_goes_on = queue.peek().is_some_and(|Reverse((at, _, next))| {
            *at == now && matches!(actions[*next], Some(Action::Arrive(_)))
        });
        if !turn_goes_on {
            started.extend(system.end_of_turn(now));
        }
        for push in started {
            if check {
                if let Some(other) = in_flight.get(&push.key) {
                    out.violations.push(format!(
                        "t={now}: key {} started push {} while push {other} is in flight",
                        push.key, push.id
                    ));
                }
            }
            in_flight.insert(push.key, push.id);
            out.trace.push(Step::Started {
                at: now,
                push: push.clone(),
                retry,
            });
            marker.insert(push.key, (push.version, push.value.clone()));
            out.started += 1;
            let ok = !latency.fails(&push);
            let at = now + latency.latency(&push);
            schedule(
                &mut queue,
                &mut actions,
                at,
                Action::Finish(push, ok),
                tie_rng,
            );
        }
        if let Some(at) = system.next_wake() {
            let at = at.max(now);
            if wakes.insert(at) {
                schedule(&mut queue, &mut actions, at, Action::Wake, tie_rng);
            }
        }
        if check {
            if let (Some(position), Some(uncovered)) =
                (system.commit_position(), coverage.min_uncovered())
            {
                if position > uncovered {
                    out.violations.push(format!(
                        "t={now}: commit position {position} passes uncovered offset {uncovered}"
                    ));
                }
            }
        }
    }
    out.final_position = system.commit_position();
    out
}

/// The oracle's view of coverage: an accepted event is covered once an
/// acknowledged push of its key carries its version or a newer one; a stale
/// event is covered when it arrives.
struct Coverage {
    /// Per key: accepted, not yet covered events (offset, version), in order.
    uncovered: HashMap<u32, std::collections::VecDeque<(i64, u64)>>,
    /// Per input: its key, its version, and whether it is accepted.
    inputs: Vec<(u32, u64, bool)>,
}

impl Coverage {
    fn new(inputs: &[Input]) -> Self {
        Self {
            uncovered: HashMap::new(),
            inputs: inputs
                .iter()
                .zip(versions(inputs))
                .map(|(input, (version, accepted))| (input.key, version, accepted))
                .collect(),
        }
    }
    /// Inputs arrive in offset order, so each key's queue stays sorted.
    fn arrived(&mut self, i: usize) {
        let (key, version, accepted) = self.inputs[i];
        if accepted {
            self.uncovered
                .entry(key)
                .or_default()
                .push_back((i as i64, version));
        }
    }
    fn acked(&mut self, key: u32, version: u64) {
        if let Some(queue) = self.uncovered.get_mut(&key) {
            while queue.front().is_some_and(|&(_, v)| v <= version) {
                queue.pop_front();
            }
        }
    }
    fn min_uncovered(&self) -> Option<i64> {
        self.uncovered
            .values()
            .filter_map(|q| q.front().map(|&(o, _)| o))
            .min()
    }
}

/// Which events are accepted (see [`versions`]).
pub fn accepted_events(inputs: &[Input]) -> Vec<bool> {
    versions(inputs)
        .into_iter()
        .map(|(_, accepted)| accepted)
        .collect()
}

/// The expected final (version, value) of every key: its accepted events
/// folded in order with the policy.
pub fn expected_finals(inputs: &[Input], policy: MergePolicy) -> BTreeMap<u32, (u64, Doc)> {
    let mut finals: BTreeMap<u32, (u64, Doc)> = BTreeMap::new();
    for (input, (version, _)) in inputs
        .iter()
        .zip(versions(inputs))
        .filter(|(_, (_, accepted))| *accepted)
    {
        let entry = finals.entry(input.key).or_insert((0, None));
        entry.0 = version;
        entry.1 = match (policy, &input.value) {
            (MergePolicy::Latest, value) | (MergePolicy::JsonMergePatch, value @ None) => {
                value.clone()
            }
            (MergePolicy::JsonMergePatch, Some(patch)) => {
                Some(merge_patch(entry.1.clone().unwrap_or(json!(null)), patch))
            }
        };
    }
    finals
}

/// RFC 7396, written from the RFC's pseudocode, independent of keyflight.
pub fn merge_patch(target: serde_json::Value, patch: &serde_json::Value) -> serde_json::Value {
    let serde_json::Value::Object(patch) = patch else {
        return patch.clone();
    };
    let mut target = match target {
        serde_json::Value::Object(map) => map,
        _ => serde_json::Map::new(),
    };
    for (name, value) in patch {
        if value.is_null() {
            target.remove(name);
        } else {
            let old = target.remove(name).unwrap_or(serde_json::Value::Null);
            target.insert(name.clone(), merge_patch(old, value));
        }
    }
    serde_json::Value::Object(target)
}

// ---------------------------------------------------------------------------
// The systems.

/// keyflight's engine.
pub struct Engine {
    pub table: Table,
    /// Produce the pushes a turn started (by arrivals or by an
    /// acknowledgement) only at the end of the turn, caught up with what
    /// merged behind them (as keyflight's partition task does), rather than
    /// at once.
    pub batched: bool,
    starting: Vec<Push>,
}

impl Engine {
    pub fn new(policy: MergePolicy) -> Self {
        Self::shaped(policy, Windows::default())
    }

    /// An engine whose keys wait in `windows`.
    pub fn shaped(policy: MergePolicy, windows: Windows) -> Self {
        Self {
            table: Table::new(TableConfig {
                policy,
                max_active_keys: usize::MAX,
                windows,
                digests: false,
                cached_keys: usize::MAX,
            }),
            batched: false,
            starting: Vec::new(),
        }
    }

    pub fn batched(policy: MergePolicy) -> Self {
        Self {
            batched: true,
            ..Self::new(policy)
        }
    }
}

fn key_bytes(key: u32) -> Bytes {
    Bytes::from(key.to_be_bytes().to_vec())
}

fn to_payload(doc: &Doc) -> Payload {
    match doc {
        Some(v) => Payload::Value(Value::Json(v.clone())),
        None => Payload::Tombstone,
    }
}

fn started(key: u32, push: Push) -> Started {
    let value = match push.payload {
        Payload::Value(Value::Json(v)) => Some(v),
        Payload::Value(Value::Bytes(_)) => panic!("the simulation only feeds JSON"),
        Payload::Tombstone => None,
    };
    Started {
        key,
        id: push.tn,
        version: push.version,
        value,
        compensation: push.compensation,
    }
}

impl System for Engine {
    fn event(&mut self, offset: i64, input: &Input, now: u64) -> Vec<Started> {
        let event = Event {
            key: key_bytes(input.key),
            offset,
            version: input.version,
            payload: to_payload(&input.value),
        };
        match self
            .table
            .offer(event, now)
            .expect("the simulation offers valid events")
        {
            Offer::Started(push) if self.batched => {
                self.starting.push(push);
                Vec::new()
            }
            Offer::Started(push) => vec![started(input.key, push)],
            Offer::Merged | Offer::Stale | Offer::Waiting => Vec::new(),
        }
    }

    fn end_of_turn(&mut self, _now: u64) -> Vec<Started> {
        std::mem::take(&mut self.starting)
            .into_iter()
            .map(|push| {
                let key = u32::from_be_bytes(push.key[..].try_into().expect("a u32 key"));
                started(key, self.table.catch_up(push))
            })
            .collect()
    }

    fn done(&mut self, push: &Started, ok: bool, now: u64) -> Vec<Started> {
        let key = key_bytes(push.key);
        if ok {
            let next = self
                .table
                .complete(&key, push.id, now)
                .expect("completion of a push in flight");
            if self.batched {
                self.starting.extend(next);
                return Vec::new();
            }
            next.into_iter().map(|p| started(push.key, p)).collect()
        } else {
            let failed = Push {
                key,
                tn: push.id,
                version: push.version,
                payload: to_payload(&push.value),
                merged: 0,
                offset: None,
                compensation: push.compensation,
                acked_tn: 0,
            };
            let retry = self
                .table
                .fail(failed, now)
                .expect("failure of a push in flight");
            vec![started(push.key, retry)]
        }
    }

    fn compensate(&mut self, key: u32, version: u64, value: Doc, now: u64) -> Vec<Started> {
        self.table
            .compensate(&key_bytes(key), version, None, to_payload(&value), now)
            .map(|p| started(key, p))
            .into_iter()
            .collect()
    }

    fn wake(&mut self, now: u64) -> Vec<Started> {
        self.table
            .wake(now)
            .into_iter()
            .map(|push| {
                let key = u32::from_be_bytes(push.key[..].try_into().expect("a u32 key"));
                started(key, push)
            })
            .collect()
    }

    fn next_wake(&self) -> Option<u64> {
        self.table.next_wake()
    }

    fn commit_position(&self) -> Option<i64> {
        self.table.commit_position()
    }
}

/// The article's algorithm: the first event of a key starts a push (the
/// leader); events arriving during it wait; when it finishes they start one
/// merged push, which does *not* hold back new events: the next event finds
/// no leader and starts its own push, concurrently with the merged one.
pub struct ArticleModel {
    policy: MergePolicy,
    keys: HashMap<u32, ModelKey>,
    next_id: u64,
}

#[derive(Default)]
struct ModelKey {
    current: Doc,
    leader: Option<u64>,
    /// Version of the newest waiting event, if any wait.
    waiting: Option<u64>,
    /// The newest version seen.
    newest: Option<u64>,
}

impl ArticleModel {
    pub fn new(policy: MergePolicy) -> Self {
        Self {
            policy,
            keys: HashMap::new(),
            next_id: 0,
        }
    }
}

impl System for ArticleModel {
    fn event(&mut self, offset: i64, input: &Input, _now: u64) -> Vec<Started> {
        let state = self.keys.entry(input.key).or_default();
        state.current = match (self.policy, &input.value) {
            (MergePolicy::JsonMergePatch, Some(patch)) => Some(merge_patch(
                state.current.clone().unwrap_or(json!(null)),
                patch,
            )),
            (_, value) => value.clone(),
        };
        let version = input.version_after(offset, state.newest);
        state.newest = Some(state.newest.map_or(version, |n| n.max(version)));
        if state.leader.is_some() {
            state.waiting = Some(version);
            return Vec::new();
        }
        self.next_id += 1;
        state.leader = Some(self.next_id);
        vec![Started {
            key: input.key,
            id: self.next_id,
            version,
            value: state.current.clone(),
            compensation: false,
        }]
    }

    fn done(&mut self, push: &Started, _ok: bool, _now: u64) -> Vec<Started> {
        let state = self.keys.get_mut(&push.key).expect("a push of a known key");
        if state.leader != Some(push.id) {
            return Vec::new(); // a merged push finished: nothing waits on it
        }
        state.leader = None;
        let Some(version) = state.waiting.take() else {
            return Vec::new();
        };
        self.next_id += 1;
        vec![Started {
            key: push.key,
            id: self.next_id,
            version,
            value: state.current.clone(),
            compensation: false,
        }]
    }
}

// ---------------------------------------------------------------------------
// Random schedules.

/// A random schedule: a few keys, bursts and pauses, sometimes explicit
/// versions that go backwards (stale events), deletes, and compensation calls.
pub struct Schedule {
    pub inputs: Vec<Input>,
    pub compensations: Vec<(u64, u32)>,
    pub fail_rate: f64,
    pub policy: MergePolicy,
}

pub fn random_schedule(rng: &mut ChaCha8Rng) -> Schedule {
    let keys = rng.random_range(1..=6u32);
    let events = rng.random_range(1..=60usize);
    let explicit_versions = rng.random_bool(0.3);
    let policy = if rng.random_bool(0.5) {
        MergePolicy::Latest
    } else {
        MergePolicy::JsonMergePatch
    };
    let mut version_of: HashMap<u32, u64> = HashMap::new();
    let mut at = 0u64;
    let mut inputs = Vec::with_capacity(events);
    for n in 0..events {
        at += if rng.random_bool(0.6) {
            rng.random_range(0..3)
        } else {
            rng.random_range(0..80)
        };
        let key = rng.random_range(0..keys);
        let version = explicit_versions.then(|| {
            let v = version_of.entry(key).or_insert(0);
            // Mostly forward, sometimes a repeat or a step back (stale).
            *v = match rng.random_range(0..10) {
                0 => v.saturating_sub(rng.random_range(1..3)),
                1 => *v,
                _ => *v + rng.random_range(1..4),
            };
            *v
        });
        let value = if rng.random_bool(0.05) {
            None
        } else {
            let field = format!("f{}", rng.random_range(0..4));
            Some(
                json!({ field: n, "last": n, "gone": if rng.random_bool(0.2) { json!(null) } else { json!(n) } }),
            )
        };
        inputs.push(Input {
            at,
            key,
            version,
            value,
        });
    }
    let compensations = if rng.random_bool(0.3) {
        (0..rng.random_range(1..6))
            .map(|_| (rng.random_range(0..=at + 200), rng.random_range(0..keys)))
            .collect()
    } else {
        Vec::new()
    };
    let fail_rate = if rng.random_bool(0.3) { 0.2 } else { 0.0 };
    Schedule {
        inputs,
        compensations,
        fail_rate,
        policy,
    }
}

/// Runs one seeded random schedule through the engine and returns every
/// violated property (empty when the schedule passes).
pub fn check_engine_schedule(seed: u64) -> Vec<String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let schedule = random_schedule(&mut rng);
    let mut latency = RandomLatency {
        rng: ChaCha8Rng::seed_from_u64(seed ^ 0x9E37_79B9_7F4A_7C15),
        fail_rate: schedule.fail_rate,
    };
    // Half the schedules shape pushes (drawn apart, so the schedule of a
    // seed is the same with and without).
    let mut shaping = ChaCha8Rng::seed_from_u64(seed ^ 0x5EED_5A4E);
    let windows = if shaping.random_bool(0.5) {
        Windows::default()
    } else {
        let delay = if shaping.random_bool(0.6) {
            shaping.random_range(1..50)
        } else {
            0
        };
        Windows {
            delay,
            max_delay: delay * shaping.random_range(1..5),
            min_interval: if shaping.random_bool(0.5) {
                shaping.random_range(1..80)
            } else {
                0
            },
        }
    };
    // Odd seeds produce each batch's pushes at its end, as keyflight does.
    let mut engine = Engine::shaped(schedule.policy, windows);
    engine.batched = seed % 2 == 1;
    let out = run(
        &mut engine,
        &schedule.inputs,
        &schedule.compensations,
        &mut latency,
        &mut rng,
        true,
    );
    let mut problems = out.violations.clone();
    problems.extend(window_violations(&schedule.inputs, &out.trace, windows));

    let expected = expected_finals(&schedule.inputs, schedule.policy);
    let actual = out.final_values();
    for (key, want) in &expected {
        match actual.get(key) {
            Some(got) if got == want => {}
            got => problems.push(format!(
                "key {key}: last push {got:?}, latest event {want:?}"
            )),
        }
    }
    if let Some(extra) = actual.keys().find(|k| !expected.contains_key(k)) {
        problems.push(format!("key {extra} was pushed but never had an event"));
    }
    let n = schedule.inputs.len() as i64;
    if out.final_position != Some(n) {
        problems.push(format!(
            "final commit position {:?}, expected {n}",
            out.final_position
        ));
    }
    let accepted = accepted_events(&schedule.inputs)
        .iter()
        .filter(|a| **a)
        .count();
    let normal_acked = out.completed.iter().filter(|p| !p.compensation).count();
    if normal_acked > accepted {
        problems.push(format!(
            "{normal_acked} acknowledged pushes for {accepted} accepted events"
        ));
    }
    if out.failed == 0 {
        let normal_started = out.started - out.completed.iter().filter(|p| p.compensation).count();
        if normal_started > schedule.inputs.len() {
            problems.push(format!(
                "{normal_started} pushes for {} events",
                schedule.inputs.len()
            ));
        }
    }
    problems
}

/// The shaping rules, checked on a run's trace: no push starts inside its
/// key's `delay` (the quiet period after the newest event of a window that
/// opened on an idle key, at most `max_delay` after it opened) or its
/// `min_interval` (after the key's previous push started), and no key
/// waits longer than the later of the two. Retries and compensation pushes
/// start at once.
pub fn window_violations(inputs: &[Input], trace: &[Step], w: Windows) -> Vec<String> {
    #[derive(Default)]
    struct KeyState {
        in_flight: bool,
        /// Events not in a push yet: behind a flight, or held after one.
        pending: bool,
        /// A window opened by an event that found the key idle: (opened, newest event).
        window: Option<(u64, u64)>,
        last_start: u64,
    }
    let accepted = accepted_events(inputs);
    let mut keys: HashMap<u32, KeyState> = HashMap::new();
    let mut problems = Vec::new();
    for step in trace {
        match step {
            Step::Arrived { at, input } => {
                if !accepted[*input] {
                    continue;
                }
                let key = keys.entry(inputs[*input].key).or_default();
                match key.window.as_mut() {
                    Some((_, newest)) => *newest = *at,
                    None if key.in_flight || key.pending => key.pending = true,
                    None => key.window = Some((*at, *at)),
                }
            }
            Step::Finished { key, .. } => {
                keys.entry(*key).or_default().in_flight = false;
            }
            Step::Started { at, push, retry } => {
                let key = keys.entry(push.key).or_default();
                if !retry && !push.compensation {
                    let interval_ends = if w.min_interval > 0 && key.last_start > 0 {
                        key.last_start + w.min_interval
                    } else {
                        0
                    };
                    if *at < interval_ends {
                        problems.push(format!(
                            "t={at}: key {} pushed {} after its previous push started (min_interval {})",
                            push.key,
                            at - key.last_start,
                            w.min_interval
                        ));
                    }
                    if let Some((opened, newest)) = key.window {
                        let quiet = if w.delay > 0 {
                            (newest + w.delay).min(opened + w.max_delay)
                        } else {
                            0
                        };
                        if *at < quiet {
                            problems.push(format!(
                                "t={at}: key {} pushed inside its delay (window opened at {opened}, newest event at {newest}, delay {}, max_delay {})",
                                push.key, w.delay, w.max_delay
                            ));
                        }
                        let latest = quiet.max(interval_ends).max(opened);
                        if *at > latest {
                            problems.push(format!(
                                "t={at}: key {} waited past its window (opened at {opened}, due by {latest})",
                                push.key
                            ));
                        }
                    }
                    key.window = None;
                }
                if !push.compensation {
                    key.pending = false;
                }
                key.in_flight = true;
                key.last_start = push.id;
            }
        }
    }
    problems
}

/// How many random schedules a simulation test runs: `SIM_SCHEDULES`, else
/// 100 000.
pub fn schedules() -> u64 {
    std::env::var("SIM_SCHEDULES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000)
}

/// Checks seeds `0..total` on every core and returns the failing ones with
/// their violations (a few per thread at most: the first one is what to
/// replay). `checker` makes each thread's check (a thread may keep state,
/// such as a metrics registry, across its seeds).
pub fn failing_seeds<C>(total: u64, checker: impl Fn() -> C + Sync) -> Vec<(u64, Vec<String>)>
where
    C: FnMut(u64) -> Vec<String>,
{
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    let checker = &checker;
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    let mut check = checker();
                    (t..total)
                        .step_by(threads as usize)
                        .map(|seed| (seed, check(seed)))
                        .filter(|(_, problems)| !problems.is_empty())
                        .take(3)
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    })
}
