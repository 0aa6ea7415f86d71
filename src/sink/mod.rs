//! Where pushes go: the pushed topic (`sink.kind = "kafka"`, the default)
//! or an HTTP endpoint (`"http"`).
//!
//! A sink only carries a push out and says how it went, as a
//! [`ProduceError`](crate::processor::task::ProduceError) the task core
//! already knows how to handle: retriable (retried with backoff, the
//! marker open), throttled (retried no sooner than asked), refused for good
//! (dead-lettered). Everything that makes a push safe (one in flight per
//! key, markT1 before, markT2 after, compensation, commits following
//! coverage) stays in the core, so both sinks keep the same guarantees.

pub mod http;

use std::sync::Arc;

use crate::config::{Settings, SinkKind};
use crate::metrics::Metrics;

pub use http::HttpSink;

/// The sink of a running processor, shared by its partition tasks.
#[derive(Clone)]
pub enum Sink {
    /// Produce each push to `topics.pushed`.
    Kafka,
    /// One HTTP request per push; with `audit`, each acknowledged push is
    /// also produced to that topic.
    Http {
        client: Arc<HttpSink>,
        audit: Option<String>,
    },
}

impl Sink {
    /// The configured sink; an HTTP sink's headers and CA file are read now,
    /// so a missing secret stops `run` at start, naming its key.
    pub fn from_settings(settings: &Settings, metrics: Arc<Metrics>) -> Result<Sink, String> {
        Ok(match settings.sink.kind {
            SinkKind::Kafka => Sink::Kafka,
            SinkKind::Http => Sink::Http {
                client: Arc::new(HttpSink::new(settings, metrics)?),
                audit: settings.pushes_topic().map(str::to_string),
            },
        })
    }
}
