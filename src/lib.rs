//! # keyflight
//!
//! A Kafka stream processor that turns bursts of keyed change events into
//! pushes: per key at most one push in flight, the events that arrive
//! meanwhile merged into the next push, and the last push of every key
//! carrying its latest event. Durable t1/t2 markers and a periodic
//! compensation scan repair pushes that a crash or a failed produce cut short.
//!
//! ## The tour
//!
//! ```text
//!  events.in ──▶ kafka (consumer) ──▶ codec ──▶ engine::Table ──push──▶ kafka (producer) ──▶ events.pushed
//!   (keyed)       one task per          decode    singleflight      ▲        │ ack/fail
//!                 assigned partition    or DLQ    per key           │        ▼
//!                                                    ▲       compensation ◀── state (RocksDB markers
//!                                                    └────── commit position   + compacted changelog)
//! ```
//!
//! * [`engine`] — the heart, pure and synchronous: the per-partition
//!   singleflight [`engine::Table`] (a state machine per key: idle, in flight,
//!   in flight with a pending merged push), the merge policies (`latest`,
//!   RFC 7396 `json-merge-patch`), stale-event dropping by version, the
//!   per-key `tn` clock, and offset coverage (the position safe to commit).
//!   No I/O and no async runtime, so it is tested exhaustively by seeded
//!   simulation (`tests/simulation.rs`) against the article's algorithm.
//! * [`state`] — per-partition RocksDB store of markers `{t1, t2, version,
//!   value}` with an index of open markers and Kafka Streams' checkpoint
//!   rule (no clean checkpoint, full restore), encoded for the compacted
//!   changelog topic with `schemas/marker.avsc`. Writes are held in memory,
//!   the newest per key, and reach RocksDB in batches and at checkpoints.
//! * [`kafka`] — everything that talks to a broker: client configuration
//!   from [`config::Settings`] (librdkafka pass-through for security and
//!   tuning), the admin operations behind `topics create`, and the consumer
//!   and producer tasks of the pipeline.
//! * [`compensation`] — the periodic scan of open markers that re-pushes a
//!   key's stored value through the same table, so never concurrently with a
//!   normal push of that key.
//! * [`codec`] — input formats (`json` with an optional version field,
//!   `avro` single-object or Confluent-framed, `raw`) to [`engine::Payload`] and back, and the
//!   one rule for what is dead-lettered (null key, undecodable, oversized);
//!   a refused record gets a reason and goes to the dead-letter topic with it.
//! * [`config`] — one typed settings tree layered defaults < TOML file <
//!   `KEYFLIGHT_*` environment < flags; every error names its source, its key
//!   and the problem.
//! * [`internal_events`] and [`metrics`] — every happening worth a log line
//!   or a metric is an event value that does both in one place; the
//!   Prometheus registry, readiness, and the `/metrics` `/healthz` `/readyz`
//!   server of `run`.
//! * [`verify`] — the oracle of `keyflight verify`: folds the input topic
//!   the way the engine does and checks every key's last push and every
//!   dead letter. Pure; the topics are read by [`kafka::reader`].
//! * [`loadgen`] — the event stream of `load` and `demo` (Zipf or uniform
//!   keys, bursts, growing per-key versions, the article's scenarios). Pure.
//! * [`cli`] — the `keyflight` binary's subcommands (`run`, `topics`,
//!   `config`, `verify`, `replay`, `state`, `dev`, `demo`, `load`, `tail`);
//!   one module per command.
//!
//! ## Guarantees, in one place
//!
//! * Never two pushes of one key in flight: the last push to start is the
//!   last to finish, and it starts after the key's last event arrived.
//! * At-least-once: a partition's committed offset never passes an event whose
//!   push is not acknowledged (or that was not dropped as stale or
//!   dead-lettered). A crash replays; markers and the scan repair.
//! * Durable before committed: a committed offset never passes an event
//!   whose marker the changelog lacks, so the next owner restores markers
//!   at least as new as the offsets it starts from ([`kafka::commit_gate`]).
//! * Pushes carry a per-key version so consumers can drop duplicates
//!   (compensation re-pushes are duplicates by design).

pub mod cli;
pub mod codec;
pub mod compensation;
pub mod config;
pub mod engine;
pub mod internal_events;
pub mod kafka;
pub mod loadgen;
pub mod metrics;
pub mod state;
pub mod verify;
