//! Kafka I/O: client configuration built from [`Settings`], the admin
//! operations (`topics create`), and the pipeline of `keyflight run`:
//! [`pipeline`] (the consumer-group member and its poll thread),
//! [`partition`] (one task per assigned partition, with [`commit_gate`]
//! deciding when its commits may go out), [`restore`] (a store from its
//! changelog); and the operator tools' I/O: [`reader`] (a snapshot
//! of a whole topic, for `verify`) and [`replay`] (offset resets); and the
//! development helpers: [`embedded`] (an in-process broker) and [`load`]
//! (producing generated events).

pub mod admin;
pub mod commit_gate;
pub mod embedded;
pub mod load;
pub mod partition;
pub mod pipeline;
pub mod reader;
pub mod replay;
pub mod restore;

use std::sync::atomic::{AtomicU64, Ordering};

use rdkafka::message::DeliveryResult;
use rdkafka::producer::ProducerContext;
use rdkafka::{ClientConfig, ClientContext};

use crate::config::{flatten, Settings};

/// keyflight's producer `linger.ms` unless `[kafka.producer]` sets one.
pub const DEFAULT_LINGER_MS: &str = "1";

/// Which kind of client a configuration is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Admin,
    Consumer,
    Producer,
}

/// librdkafka configuration for one client: keyflight's required settings
/// and defaults, then `[kafka.common]`, then the role's own table
/// (validation has already refused user values for the properties keyflight
/// must own).
pub fn client_config(settings: &Settings, role: Role) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &settings.brokers);
    config.set(
        "client.id",
        format!("{}-{}", settings.application_id, role.name()),
    );
    match role {
        Role::Admin => {}
        Role::Consumer => {
            config
                .set("group.id", &settings.application_id)
                .set("enable.auto.commit", "false")
                .set("enable.auto.offset.store", "false")
                .set("auto.offset.reset", "earliest");
        }
        Role::Producer => {
            config
                .set("enable.idempotence", "true")
                .set("acks", "all")
                // The partitioner Java clients use, so keys land where they would.
                .set("partitioner", "murmur2_random")
                // A default, not a requirement: a key's next push waits for
                // its previous push's acknowledgement, so every merged event
                // pays the linger. librdkafka's 5 ms doubled keyflight's
                // added p50 latency in the benchmark and made its p99 5×.
                .set("linger.ms", DEFAULT_LINGER_MS);
        }
    }
    let own = match role {
        Role::Admin => None,
        Role::Consumer => Some(&settings.kafka.consumer),
        Role::Producer => Some(&settings.kafka.producer),
    };
    for table in std::iter::once(&settings.kafka.common).chain(own) {
        for (key, value) in flatten(table) {
            config.set(key, value);
        }
    }
    config
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Consumer => "consumer",
            Role::Producer => "producer",
        }
    }
}

/// Counts the deliveries of a producer whose sends are not awaited one by
/// one (`load`, replay's tombstones), keeping the first error.
#[derive(Default)]
pub struct Deliveries {
    acked: AtomicU64,
    failed: AtomicU64,
    first_error: std::sync::Mutex<Option<rdkafka::error::KafkaError>>,
}

impl Deliveries {
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// How many deliveries failed and the first error, if any did.
    pub fn failures(&self) -> Option<(u64, rdkafka::error::KafkaError)> {
        let first = self.first_error.lock().ok()?.clone()?;
        Some((self.failed.load(Ordering::Relaxed), first))
    }
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.acked.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, _)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut first) = self.first_error.lock() {
                    first.get_or_insert_with(|| e.clone());
                }
            }
        }
    }
}
