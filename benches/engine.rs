//! Engine throughput: events/s through one singleflight table, 100 000 keys
//! with Zipf(1.0) popularity, one core.
//!
//! * `immediate`: every push is acknowledged right after it starts.
//! * `delayed`: pushes stay in flight while the next 1 000 events arrive, so
//!   hot keys merge (the realistic case).
//! * `baseline`: the least any per-key processor does, one hash-map upsert
//!   per event, measured in the same process so the ratio is meaningful on a
//!   noisy machine.
//!
//! Run: `cargo bench --bench engine` (results in BENCHMARKS.md).

use std::collections::{HashMap, VecDeque};
use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, Criterion, Throughput};
use keyflight::engine::{Event, Key, MergePolicy, Offer, Payload, Table, TableConfig, Value};
use rand::{Rng, SeedableRng};
use rand_distr::Zipf;

const KEYS: usize = 100_000;
const SEQUENCE: usize = 1 << 20;
const IN_FLIGHT: usize = 1_000;

/// A pre-drawn sequence of keys with Zipf(1.0) popularity.
///
/// The keys' bytes live in one static buffer and each key is a
/// `Bytes::from_static` slice of it, so the drivers' own key clones and drops
/// (baseline and engine alike) are plain copies: no reference-count atomics
/// on a cold cache line, which were the driver's cost, not the engine's.
fn zipf_keys() -> Vec<Key> {
    let names: Vec<String> = (0..KEYS).map(|k| format!("user-{k:06}")).collect();
    let arena: &'static str = String::leak(names.concat());
    let mut start = 0;
    let keys: Vec<Key> = names
        .iter()
        .map(|name| {
            let key = Bytes::from_static(&arena.as_bytes()[start..start + name.len()]);
            start += name.len();
            key
        })
        .collect();
    let zipf = Zipf::new(KEYS as f64, 1.0).expect("valid Zipf parameters");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
    (0..SEQUENCE)
        .map(|_| keys[rng.sample(zipf) as usize - 1].clone())
        .collect()
}

struct Driver {
    table: Table,
    sequence: Vec<Key>,
    /// The 30-byte value every event carries.
    value: Bytes,
    offset: i64,
    in_flight: VecDeque<(Key, u64)>,
}

impl Driver {
    fn new(sequence: Vec<Key>) -> Self {
        Self {
            table: Table::new(TableConfig {
                policy: MergePolicy::Latest,
                max_active_keys: usize::MAX,
                ..TableConfig::default()
            }),
            sequence,
            value: Bytes::from_static(br#"{"status":"active","score":42}"#),
            offset: 0,
            in_flight: VecDeque::with_capacity(IN_FLIGHT * 2),
        }
    }

    fn offer(&mut self) -> Offer {
        let key = self.sequence[self.offset as usize % SEQUENCE].clone();
        let event = Event {
            key,
            offset: self.offset,
            version: None,
            payload: Payload::Value(Value::Bytes(self.value.clone())),
        };
        self.offset += 1;
        self.table
            .offer(event, self.offset as u64)
            .expect("valid event")
    }

    fn immediate(&mut self) {
        if let Offer::Started(push) = self.offer() {
            let next = self
                .table
                .complete(&push.key, push.tn, self.offset as u64)
                .expect("in flight");
            black_box(next);
        }
    }

    fn delayed(&mut self) {
        if let Offer::Started(push) = self.offer() {
            self.in_flight.push_back((push.key, push.tn));
        }
        while self.in_flight.len() > IN_FLIGHT {
            let (key, tn) = self.in_flight.pop_front().expect("non-empty");
            if let Some(next) = self
                .table
                .complete(&key, tn, self.offset as u64)
                .expect("in flight")
            {
                self.in_flight.push_back((next.key, next.tn));
            }
        }
    }
}

#[inline(never)] // one call per sample; a symbol for callgrind --toggle-collect
fn timed(iters: u64, mut step: impl FnMut()) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        step();
    }
    start.elapsed()
}

fn engine(c: &mut Criterion) {
    let sequence = zipf_keys();
    let mut group = c.benchmark_group("engine_100k_keys_zipf1");
    group.throughput(Throughput::Elements(1));

    let mut baseline: HashMap<Key, i64, ahash::RandomState> = HashMap::default();
    let mut offset = 0usize;
    group.bench_function("baseline_hashmap_upsert", |b| {
        b.iter_custom(|iters| {
            timed(iters, || {
                let key = sequence[offset % SEQUENCE].clone();
                *baseline.entry(key).or_default() = offset as i64;
                offset += 1;
            })
        })
    });

    let mut driver = Driver::new(sequence.clone());
    group.bench_function("immediate_completion", |b| {
        b.iter_custom(|iters| timed(iters, || driver.immediate()))
    });

    let mut driver = Driver::new(sequence);
    group.bench_function("delayed_completion_1000_in_flight", |b| {
        b.iter_custom(|iters| timed(iters, || driver.delayed()))
    });
    let stats = driver.table.stats();
    eprintln!(
        "delayed: {} events, {} pushes ({:.2} events per push), {} merged",
        stats.events,
        stats.pushes_started,
        stats.events as f64 / stats.pushes_started.max(1) as f64,
        stats.merged
    );
    group.finish();
}

criterion_group!(benches, engine);

/// `ENGINE_BENCH_STEPS=n ENGINE_BENCH=immediate|delayed|baseline` runs that
/// many steps of one driver outside criterion, for `valgrind --tool=callgrind`
/// or `perf stat` (a fixed amount of work, so instruction counts compare).
fn main() {
    if let Ok(steps) = std::env::var("ENGINE_BENCH_STEPS") {
        let steps: u64 = steps.parse().expect("ENGINE_BENCH_STEPS is a number");
        let which = std::env::var("ENGINE_BENCH").unwrap_or_else(|_| "immediate".into());
        let sequence = zipf_keys();
        let elapsed = match which.as_str() {
            "baseline" => {
                let mut map: HashMap<Key, i64, ahash::RandomState> = HashMap::default();
                let mut offset = 0usize;
                timed(steps, || {
                    let key = sequence[offset % SEQUENCE].clone();
                    *map.entry(key).or_default() = offset as i64;
                    offset += 1;
                })
            }
            "immediate" => {
                let mut driver = Driver::new(sequence);
                timed(steps, || driver.immediate())
            }
            "delayed" => {
                let mut driver = Driver::new(sequence);
                timed(steps, || driver.delayed())
            }
            other => panic!("unknown ENGINE_BENCH {other}"),
        };
        eprintln!(
            "{which}: {steps} steps in {elapsed:?} ({:.2} M/s)",
            steps as f64 / elapsed.as_secs_f64() / 1e6
        );
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
