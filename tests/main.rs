//! keyflight's integration tests, one crate (each test binary links RocksDB
//! and librdkafka, so one binary builds and links once). A module per
//! concern; `support` starts a real broker (Tansu) per test, `sim` and
//! `task_sim` are the simulations' models.
//!
//! Run one module with `cargo test --test integration MODULE::`, e.g.
//! `cargo test --test integration simulation::`.

mod support;

mod sim;
mod task_sim;

mod bench_smoke;
mod broker;
mod claims;
mod cli;
mod decoders;
mod deploy;
mod devtools;
mod exactly_once;
mod faults;
mod http_sink;
mod interop;
mod operability;
mod ownership;
mod pipeline;
mod receive;
mod recovery;
mod schemas;
mod shaping;
mod simulation;
mod state_crash;
mod task_faults;
mod task_simulation;
