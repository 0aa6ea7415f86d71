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
//!  events.in ──▶ processor::member ──▶ processor::task ─────────────────────▶ events.pushed
//!   (keyed)      poll thread: group,    core (pure): codec → engine::Table     (one push per key
//!                routing, pause,        → markT1 → push → markT2 → changelog    in flight)
//!                commits                shell (async): produce, await, feed back
//!                                             │ ▲
//!                                             ▼ │ restore
//!                                    state (RocksDB markers) ◀─▶ <app>-markers-changelog (compacted)
//! ```
//!
//! * [`engine`]: the heart, pure and synchronous. The per-partition
//!   singleflight [`engine::Table`] (a state machine per key: idle, in
//!   flight, in flight with a pending merged push), the merge policies
//!   (`latest`, RFC 7396 `json-merge-patch`), stale-event dropping by
//!   version, the per-key `tn` clock, offset coverage (the position safe
//!   to commit), and push shaping: a key may wait in a window (`delay`,
//!   `min_interval`) whose end sits in one heap per table, driven by the
//!   caller's clock. Idle keys beyond a cache are forgotten (their markers
//!   hold their state; the task core reads a key it does not know back).
//! * [`processor`]: `keyflight run`, along Kafka Streams' seams.
//!   [`processor::member`] is the consumer-group member (rebalances, routing
//!   records to tasks in batches, pausing, commits);
//!   [`processor::task`] is one assigned partition: a pure
//!   [`processor::task::core`] that decides everything (markers, changelog
//!   writes, commits, checkpoints, dead letters, compensation, closing) and
//!   an async [`processor::task::shell`] that carries out its actions;
//!   `processor::commit_gate` holds commits until the changelog has the
//!   markers behind them; `processor::restore` rebuilds a store from the
//!   changelog.
//! * [`state`]: the per-partition RocksDB store of markers `{t1, t2,
//!   version, value}` with an index of open markers and Kafka Streams'
//!   checkpoint rule (no clean checkpoint, full restore), encoded for the
//!   changelog with `schemas/marker.avsc`.
//! * [`kafka`]: the client layer only. Client configuration from
//!   [`config::Settings`], the one produce-with-backpressure helper, every
//!   raw librdkafka call behind safe wrappers (`kafka::ffi`), the header
//!   names ([`kafka::headers`]), the one topic reader ([`kafka::reader`],
//!   used by restore, `verify`, `replay` and the tests), admin, replay, the
//!   embedded broker and the load producer. Under `processing_guarantee =
//!   "exactly-once"`, [`kafka::transactions`] gives each partition task a
//!   transactional producer; the shell then commits one transaction per
//!   commit interval (pushes, markers, dead letters and the input position).
//! * [`sink`]: where a push goes. The Kafka sink is the pushed topic; the
//!   HTTP sink ([`sink::http`]) sends one request per push and classifies
//!   the answer into what the core already handles (acknowledged,
//!   retriable, throttled for a `Retry-After`, refused for good), so both
//!   sinks keep the same guarantees. [`receive`] is `keyflight receive`, a
//!   webhook receiver to point it at, that logs calls and fails on request.
//! * [`compensation`]: which open markers the periodic scan re-pushes (the
//!   task core pushes them through the same table, never concurrently with
//!   a normal push of the key).
//! * [`codec`]: input formats (`json` with an optional version field,
//!   `avro` single-object or Confluent-framed, `raw`) to
//!   [`engine::Payload`] and back, and the one rule for what is
//!   dead-lettered (null key, undecodable, oversized).
//! * [`config`]: one typed settings tree layered defaults < TOML file <
//!   `KEYFLIGHT_*` environment < flags; every error names its source, its
//!   key and the problem.
//! * `internal_events` and [`metrics`]: every happening worth a log line
//!   or a metric is an event value that does both in one place; the
//!   Prometheus registry, readiness, and the `/metrics` `/healthz`
//!   `/readyz` server.
//! * `verify`, [`loadgen`]: the pure oracle of `keyflight verify` and the
//!   event stream of `load` and `demo`.
//! * [`cli`]: the `keyflight` binary's subcommands, one module each.
//!
//! One record, by name: `FetchQueue::take` (poll thread) → `Router::route`
//! → `TaskInput::records` → `TaskCore::take_batch` → `TaskCore::end_turn`
//! (`Codec::decode_record_bytes`, `Table::offer`, markT1 held for the
//! changelog) →
//! `Action::Push` → `Shell::push` (produce to `events.pushed`) →
//! `TaskCore::push_done` (markT2, the key's next push) →
//! `Action::WriteChangelog` → `TaskCore::changelog_done` (the marker into
//! the store) →
//! `Action::Commit` → the poll thread commits.
//!
//! ## Guarantees, and the simulation that checks each
//!
//! The engine's simulation is `tests/simulation.rs` (the table against an
//! independent oracle and the article's algorithm); the task's is
//! `tests/task_simulation.rs` (the task core against a model broker, with
//! crashes at action boundaries, failed acknowledgements, compaction,
//! restarts and handovers). Both run 100 000 seeded schedules in the test
//! command.
//!
//! * Never two pushes of one key in flight: the last push to start is the
//!   last to finish, and it starts after the key's last event arrived
//!   (`simulation::random_schedules_keep_every_invariant`).
//! * Every key's last push carries its latest accepted event, across
//!   crashes, failed pushes and handovers
//!   (`task_simulation::random_schedules_keep_every_task_invariant`,
//!   `task_simulation::a_crash_at_every_action_boundary_keeps_every_task_invariant`).
//! * markT1 before the push: a push is produced only once it is its key's
//!   marker (checked at every push in the task simulation).
//! * At-least-once, durable before committed: a committed offset never
//!   passes an event whose push is unacknowledged (unless its open marker
//!   is in the changelog for compensation to repair) or whose marker the
//!   changelog lacks, so the next owner restores markers at least as new as
//!   the offsets it starts from (the task simulation's commit check, and
//!   the `processor::commit_gate` proptest).
//! * The store is never ahead of the changelog: a marker reaches it once
//!   acknowledged, and its column families flush atomically. A checkpoint
//!   never claims more than the changelog holds, and after every restore
//!   (from whatever a crash left on disk) the store equals the changelog's
//!   view (the task simulation's checkpoint and restore checks;
//!   `state_crash` for RocksDB killed mid-write).
//! * No failure that stops leaves a key or a partition pinned: every run
//!   settles with everything committed and nothing in flight or open (the
//!   task simulation's final check, with refused pushes among the faults).
//!   A push refused for good, or failing past `push.give_up_after`, is
//!   dead-lettered (`push-refused`); dead letters are cut rather than
//!   retried forever (`task_faults`).
//! * A straggler older than a delete stays stale across restarts and moves
//!   (`task_simulation::a_straggler_older_than_a_delete_stays_stale_after_a_handover`).
//! * Pushes carry a per-key version so consumers can drop duplicates
//!   (compensation re-pushes are duplicates by design).
//!
//! * A lost assignment is dropped at once: no push, marker, commit or
//!   checkpoint after the member hears of it (`TaskCore::lose`;
//!   `ownership` on the mock cluster with a member frozen by SIGSTOP).
//! * A marker an owner wrote after another claimed the partition does not
//!   count: restores skip it, owners write over it, and an owner that finds
//!   a newer claim stops ([`state::claim`];
//!   `task_simulation::late_markers_of_a_frozen_or_lost_owner_do_not_count`).
//!
//! What is not guaranteed yet, and seen by the task simulation
//! (`task_simulation::known_defects`, each to become an invariant test
//! with its fix): what an owner handed to the broker before it heard it
//! lost its partition (frozen, or unaware its session expired) can land
//! after the new owner's newer pushes; fencing it needs the exactly-once
//! mode.

pub mod cli;
pub mod codec;
pub mod compensation;
pub mod config;
pub mod engine;
pub(crate) mod internal_events;
pub mod kafka;
pub mod loadgen;
pub mod metrics;
pub mod processor;
pub mod receive;
pub mod sink;
pub mod state;
pub(crate) mod verify;
