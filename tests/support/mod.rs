//! Test support: a real Kafka-compatible broker (Tansu) per test.
//!
//! [`Broker::start`] launches `tansu broker` as a child process on a free
//! loopback port with a SQLite store in a temporary directory, waits until it
//! answers a metadata request, and kills it when the guard drops (also when
//! the test panics, and, through PR_SET_PDEATHSIG, when the test process
//! itself dies). A test that cannot find or start the broker fails loudly:
//! broker tests never skip.
//!
//! The broker binary: `$TANSU_BIN`, else `$HOME/.cache/keyflight/tansu/bin/tansu`
//! (where `scripts/test.sh` installs it), else `tansu` on `PATH`.

#![allow(dead_code)]

mod app;
mod broker;
mod load;
mod receiver;
mod tls;
mod topics;

pub use app::*;
pub use broker::*;
pub use load::*;
pub use receiver::*;
pub use tls::*;
pub use topics::*;
