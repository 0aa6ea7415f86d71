//! The Kafka client layer: client configuration built from [`Settings`],
//! the header names keyflight writes ([`headers`]), the admin operations
//! (`topics create`), the operator tools' I/O ([`reader`]: a snapshot of a
//! whole topic, for `verify`; [`replay`]: offset resets), and the
//! development helpers ([`embedded`]: an in-process broker; [`load`]:
//! producing generated events). The processor of `keyflight run` is
//! [`crate::processor`].

pub mod admin;
pub mod embedded;
pub(crate) mod ffi;
pub mod headers;
pub mod limits;
pub mod load;
pub mod reader;
pub mod replay;
pub mod transactions;

use std::sync::atomic::{AtomicU64, Ordering};

use rdkafka::error::KafkaError;
use rdkafka::message::DeliveryResult;
use rdkafka::producer::ProducerContext;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, ClientContext};

use crate::config::{flatten, Settings};

/// keyflight's producer `linger.ms` unless `[kafka.producer]` sets one.
pub const DEFAULT_LINGER_MS: &str = "1";

/// Hands a record to a producer with `send` (any of rust-rdkafka's
/// producers), waiting while the producer's queue is full: the queue drains
/// in librdkafka's own thread, so a full queue is the backpressure of a
/// broker slower than the caller, not an error.
pub fn send_waiting<R, T>(
    mut record: R,
    mut send: impl FnMut(R) -> Result<T, (KafkaError, R)>,
) -> Result<T, KafkaError> {
    loop {
        match send(record) {
            Ok(sent) => return Ok(sent),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

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
                // pays the linger; keep it short (BENCHMARKS.md).
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
