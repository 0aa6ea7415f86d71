//! Configuration: one typed [`Settings`] tree, layered
//! built-in defaults < TOML file (`--config`) < `KEYFLIGHT_*` environment < flags.
//!
//! Environment variables map to keys with `__` between levels:
//! `KEYFLIGHT_COMPENSATION__INTERVAL=30s` sets `compensation.interval`.
//! Every error names where the value came from (file, variable or flag), the
//! key, and the problem; the CLI turns it into exit status 2.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Map};
use figment::{Figment, Metadata, Profile, Provider, Source};
use serde::{Deserialize, Serialize};

use crate::codec::{AvroFraming, Codec, InputFormat};
use crate::engine::MergePolicy;

mod layers;
mod validate;

pub use layers::{load, ConfigError, LogFormat, Overrides, Problem};
use validate::parse_metrics_addr;

/// Prefix of the environment variables that set configuration keys.
pub const ENV_PREFIX: &str = "KEYFLIGHT_";
/// Variables with the prefix that are CLI options, not configuration keys.
pub(crate) const ENV_NOT_KEYS: &[&str] = &["CONFIG"];

/// The whole configuration of a keyflight instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Consumer group id, prefix of the changelog topic and of the state directory.
    pub application_id: String,
    /// Kafka bootstrap servers, comma separated (`host:port,host:port`).
    pub brokers: String,
    /// Log filter when `RUST_LOG` is unset: a level or `tracing` directives.
    pub log_level: String,
    /// `text` (human-readable) or `json` (one JSON object per line).
    pub log_format: LogFormat,
    /// Directory of the local RocksDB stores (one per assigned partition).
    pub state_dir: PathBuf,
    /// Where `run` serves `/metrics`, `/healthz` and `/readyz` (`host:port`,
    /// port 0 picks a free one), or `off`.
    pub metrics_addr: String,
    /// `at-least-once` (default): pushes, markers and offset commits are
    /// separate writes, and a crash or a frozen owner may repeat a push.
    /// `exactly-once`: per input partition, one Kafka transaction per commit
    /// interval holds its pushes, markers, dead letters and input offset,
    /// and a new owner fences the old one (needs a broker with
    /// transactions; readers of the outputs use `read_committed`).
    pub processing_guarantee: ProcessingGuarantee,
    /// How often the safe position of each partition is committed (under
    /// `exactly-once`: how often its transaction commits, 100ms unless set).
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// How long a revoke or a shutdown waits for pushes in flight.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    pub input: Input,
    pub topics: Topics,
    pub singleflight: Singleflight,
    pub group: Group,
    pub push: PushSettings,
    pub deletes: Deletes,
    pub state: StateSettings,
    pub compensation: Compensation,
    pub sink: SinkSettings,
    pub kafka: KafkaSettings,
}

/// Where pushes go: the pushed topic (default), or an HTTP endpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SinkSettings {
    /// `kafka`: produce each push to `topics.pushed`. `http`: one request
    /// per push to `sink.http.url`, with the same per-key guarantees.
    pub kind: SinkKind,
    pub http: HttpSinkSettings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SinkKind {
    #[default]
    Kafka,
    Http,
}

/// The HTTP sink: one request per push, at most one in flight per key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSinkSettings {
    /// `http://` or `https://` URL; `{key}` is replaced by the push's key,
    /// percent-encoded.
    pub url: String,
    /// `POST` or `PUT` for a value; a delete is always a `DELETE`.
    pub method: HttpMethod,
    /// Extra request headers: a value, or `{ env = "NAME" }` to read it
    /// from the environment at start (for secrets).
    pub headers: BTreeMap<String, HeaderValueSetting>,
    /// How long one request may take before it counts as failed (and is retried).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Requests in flight at once, across keys and partitions.
    pub max_in_flight: usize,
    /// PEM file of CA certificates trusted besides the built-in roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Also produce every acknowledged push to this topic (as the Kafka
    /// sink would), so that `verify` and `tail` read it; empty: off.
    pub audit_topic: String,
}

impl Default for HttpSinkSettings {
    fn default() -> Self {
        Self {
            url: String::new(),
            method: HttpMethod::Post,
            headers: BTreeMap::new(),
            timeout: Duration::from_secs(10),
            max_in_flight: 64,
            ca_file: None,
            audit_topic: String::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HttpMethod {
    #[serde(rename = "POST", alias = "post")]
    Post,
    #[serde(rename = "PUT", alias = "put")]
    Put,
}

/// A header's value as configured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum HeaderValueSetting {
    /// Read from this environment variable when the sink starts.
    Env {
        env: String,
    },
    Text(String),
}

/// How much state of keys nobody writes to is kept, in memory and for good.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StateSettings {
    /// A key whose last push was acknowledged longer ago than this, and
    /// that is idle, is forgotten: its marker is removed from the store and
    /// tombstoned in the changelog (0s: never). A straggler older than the
    /// forgotten version is then taken for new.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Idle keys a partition keeps in memory besides those in flight or
    /// waiting; past it the least recently used are forgotten and read back
    /// from their markers when they come again.
    pub cached_keys: usize,
}

impl Default for StateSettings {
    fn default() -> Self {
        Self {
            ttl: Duration::ZERO,
            cached_keys: 20_000,
        }
    }
}

/// What a crash or a frozen owner may do to the outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProcessingGuarantee {
    #[default]
    AtLeastOnce,
    ExactlyOnce,
}

/// The commit interval of `exactly-once` unless one is set: every push
/// waits for its transaction's commit to be visible downstream.
pub const EXACTLY_ONCE_COMMIT_INTERVAL: Duration = Duration::from_millis(100);

/// How the instances of an application share the input's partitions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Group {
    /// `cooperative-sticky`: a rebalance moves only the partitions that
    /// change hands, the others keep processing; `eager`: every partition
    /// is revoked and assigned again (librdkafka's `range,roundrobin`).
    pub assignment: Assignment,
    /// Static membership (`group.instance.id`), unique per instance (set it
    /// per instance, e.g. `KEYFLIGHT_GROUP__INSTANCE_ID=$HOSTNAME`): a
    /// restart within the session timeout causes no rebalance. Empty: none.
    pub instance_id: String,
}

impl Default for Group {
    fn default() -> Self {
        Self {
            assignment: Assignment::CooperativeSticky,
            instance_id: String::new(),
        }
    }
}

/// How partitions move in a rebalance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Assignment {
    CooperativeSticky,
    Eager,
}

impl Assignment {
    /// librdkafka's `partition.assignment.strategy` for it.
    pub fn strategy(self) -> &'static str {
        match self {
            Assignment::CooperativeSticky => "cooperative-sticky",
            Assignment::Eager => "range,roundrobin",
        }
    }
}

/// What a delete (a record with a null value) carries, and how long its
/// tombstone marker is kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Deletes {
    /// Record header holding a delete's version (decimal). A delete without
    /// it comes after whatever its key had, and leaves the key's version as it was.
    pub version_header: String,
    /// How long a delete's tombstone marker is kept, so that an older event
    /// arriving late (a straggler) is still known to be stale, also after a
    /// restart or a move. Past it the key's state is removed from the store
    /// and the changelog, and such a straggler would be taken for new.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
}

impl Default for Deletes {
    fn default() -> Self {
        Self {
            version_header: "version".into(),
            retention: Duration::from_secs(24 * 3600),
        }
    }
}

/// How failed pushes are retried, and when they are given up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PushSettings {
    /// Delay before a failed push is tried again; it doubles with each further failure.
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// The longest delay between two attempts.
    #[serde(with = "humantime_serde")]
    pub max_retry_backoff: Duration,
    /// A key whose pushes keep failing with retriable errors this long is
    /// dead-lettered (reason `push-refused`): the longest one key holds its
    /// partition's commits.
    #[serde(with = "humantime_serde")]
    pub give_up_after: Duration,
}

impl Default for PushSettings {
    fn default() -> Self {
        Self {
            retry_backoff: Duration::from_millis(100),
            max_retry_backoff: Duration::from_secs(10),
            give_up_after: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Input {
    /// How record values are read: `json`, `avro` (schemas/event.avsc) or `raw` (opaque bytes, `latest` only).
    pub format: InputFormat,
    /// Top-level JSON field holding the event's version (else its offset orders it).
    pub version_field: String,
    /// Values larger than this are dead-lettered (reason `too-large`) instead of processed.
    /// With up to 4 KiB of key and headers it must fit the producer's
    /// `message.max.bytes` and the pushed and changelog topics' `max.message.bytes`
    /// (`run` checks at start).
    pub max_value_bytes: usize,
    /// How `avro` values are framed: `single-object` or `confluent`.
    pub avro_framing: AvroFraming,
    /// The Schema Registry id of schemas/event.avsc, for `confluent` framing:
    /// events must carry it, pushes are written with it.
    pub schema_id: u32,
}

impl Default for Input {
    fn default() -> Self {
        Self {
            format: InputFormat::Json,
            version_field: "version".into(),
            max_value_bytes: crate::codec::DEFAULT_MAX_VALUE_BYTES,
            avro_framing: AvroFraming::SingleObject,
            schema_id: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Topics {
    /// Change events to read.
    pub input: String,
    /// Where pushes are produced.
    pub pushed: String,
    /// Records that cannot be processed, with the reason in a header.
    pub dead_letter: String,
    /// Compacted marker changelog; empty means `<application_id>-markers-changelog`.
    pub changelog: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Singleflight {
    /// How events arriving during a push fold into the next one.
    pub merge_policy: MergePolicy,
    /// Keys in flight per partition before the partition is paused.
    pub max_active_keys: usize,
    /// Bytes of records held for a saturated partition task before the
    /// partition is paused (its fetched records are then dropped by the
    /// client and fetched again on resume).
    pub max_held_bytes: usize,
    /// A quiet period: a key's push starts this long after its latest event
    /// when the first of them found it idle (0: at once).
    #[serde(with = "humantime_serde")]
    pub delay: Duration,
    /// The longest a key that never goes quiet waits under `delay`; unset:
    /// ten times `delay`.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_delay: Option<Duration>,
    /// A cooldown: a key's next push starts no sooner than this after its
    /// previous push started (0: off).
    #[serde(with = "humantime_serde")]
    pub min_interval: Duration,
    /// No push when a key's merged value equals its last acknowledged push's
    /// value (the events are covered, the marker moves to the new version).
    pub skip_unchanged: bool,
}

impl Singleflight {
    /// How many times `delay` a key waits at most when `max_delay` is unset.
    pub const MAX_DELAY_FACTOR: u32 = 10;

    /// The table's push shaping, in nanoseconds.
    pub fn windows(&self) -> crate::engine::Windows {
        let ns = |d: Duration| d.as_nanos().min(u64::MAX as u128) as u64;
        let max_delay = self
            .max_delay
            .unwrap_or(self.delay * Self::MAX_DELAY_FACTOR);
        crate::engine::Windows {
            delay: ns(self.delay),
            max_delay: ns(max_delay.max(self.delay)),
            min_interval: ns(self.min_interval),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Compensation {
    /// How often open markers are scanned and re-pushed.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Minimum age of an open marker before the scan re-pushes it.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
}

/// Free-form librdkafka properties. Keys may be quoted (`"security.protocol"`)
/// or written as nested TOML tables (`security.protocol = ...`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaSettings {
    /// Applied to every client (consumer, producer, admin): security, client.id.
    pub common: BTreeMap<String, KafkaValue>,
    pub consumer: BTreeMap<String, KafkaValue>,
    pub producer: BTreeMap<String, KafkaValue>,
}

/// A librdkafka property value as TOML spells it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum KafkaValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Table(BTreeMap<String, KafkaValue>),
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            application_id: "keyflight".into(),
            brokers: "localhost:9092".into(),
            log_level: "info".into(),
            log_format: LogFormat::Text,
            state_dir: PathBuf::from("state"),
            metrics_addr: DEFAULT_METRICS_ADDR.into(),
            processing_guarantee: ProcessingGuarantee::AtLeastOnce,
            commit_interval: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(30),
            input: Input::default(),
            topics: Topics::default(),
            singleflight: Singleflight::default(),
            group: Group::default(),
            push: PushSettings::default(),
            deletes: Deletes::default(),
            state: StateSettings::default(),
            compensation: Compensation::default(),
            sink: SinkSettings::default(),
            kafka: KafkaSettings::default(),
        }
    }
}

impl Default for Topics {
    fn default() -> Self {
        Self {
            input: "events.in".into(),
            pushed: "events.pushed".into(),
            dead_letter: "events.dlq".into(),
            changelog: String::new(),
        }
    }
}

impl Default for Singleflight {
    fn default() -> Self {
        Self {
            merge_policy: MergePolicy::Latest,
            max_active_keys: 10_000,
            max_held_bytes: 8 * 1024 * 1024,
            delay: Duration::ZERO,
            max_delay: None,
            min_interval: Duration::ZERO,
            skip_unchanged: false,
        }
    }
}

impl Default for Compensation {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            grace: Duration::from_secs(10),
        }
    }
}

/// Loopback only by default: exposing metrics is a deliberate choice.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";

impl Settings {
    /// The codec for these settings' input format, merge policy, version
    /// field, size bound and Avro framing.
    pub fn codec(&self) -> Codec {
        Codec::new(
            self.input.format,
            self.singleflight.merge_policy,
            self.input.version_field.clone(),
        )
        .with_max_value_bytes(self.input.max_value_bytes)
        .with_avro_framing(self.input.avro_framing, self.input.schema_id)
    }

    /// The metrics address, `None` when `metrics_addr = "off"` (validated).
    pub fn metrics_socket(&self) -> Option<std::net::SocketAddr> {
        parse_metrics_addr(&self.metrics_addr).ok().flatten()
    }

    /// The changelog topic: configured, or derived from the application id.
    pub fn changelog_topic(&self) -> String {
        if self.topics.changelog.is_empty() {
            format!("{}-markers-changelog", self.application_id)
        } else {
            self.topics.changelog.clone()
        }
    }

    /// The topic that records every acknowledged push (what `verify` and
    /// `tail` read): `topics.pushed` for the Kafka sink, the audit topic
    /// for the HTTP sink, if it has one.
    pub fn pushes_topic(&self) -> Option<&str> {
        match self.sink.kind {
            SinkKind::Kafka => Some(&self.topics.pushed),
            SinkKind::Http => {
                Some(self.sink.http.audit_topic.as_str()).filter(|topic| !topic.is_empty())
            }
        }
    }

    /// The settings with secret librdkafka values replaced, safe to print or log.
    pub fn redacted(&self) -> Settings {
        let mut copy = self.clone();
        for table in [
            &mut copy.kafka.common,
            &mut copy.kafka.consumer,
            &mut copy.kafka.producer,
        ] {
            let flat = flatten(table);
            table.clear();
            for (key, value) in flat {
                let shown = if is_secret(&key) {
                    "<redacted>".to_string()
                } else {
                    value
                };
                table.insert(key, KafkaValue::Str(shown));
            }
        }
        // Header values written out may be credentials; those read from
        // the environment show only the variable's name.
        for value in copy.sink.http.headers.values_mut() {
            if let HeaderValueSetting::Text(text) = value {
                *text = "<redacted>".into();
            }
        }
        copy
    }
}

/// Flattens nested tables into librdkafka's dotted property names.
pub fn flatten(table: &BTreeMap<String, KafkaValue>) -> BTreeMap<String, String> {
    fn walk(
        prefix: &str,
        table: &BTreeMap<String, KafkaValue>,
        out: &mut BTreeMap<String, String>,
    ) {
        for (key, value) in table {
            let name = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            match value {
                KafkaValue::Table(inner) => walk(&name, inner, out),
                KafkaValue::Bool(b) => drop(out.insert(name, b.to_string())),
                KafkaValue::Int(i) => drop(out.insert(name, i.to_string())),
                KafkaValue::Float(f) => drop(out.insert(name, f.to_string())),
                KafkaValue::Str(s) => drop(out.insert(name, s.clone())),
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", table, &mut out);
    out
}

fn is_secret(property: &str) -> bool {
    property.contains("password")
        || property.contains("secret")
        || property.ends_with(".pem")
        || property == "sasl.oauthbearer.config"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(toml: &str) -> Result<Settings, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.toml");
        std::fs::write(&path, toml).unwrap();
        load(Some(&path), &Overrides::default())
    }

    #[test]
    fn defaults_are_valid_and_derive_the_changelog() {
        let s = load(None, &Overrides::default()).unwrap();
        assert_eq!(s.application_id, "keyflight");
        assert_eq!(s.changelog_topic(), "keyflight-markers-changelog");
        assert_eq!(s.compensation.interval, Duration::from_secs(10));
    }

    #[test]
    fn exactly_once_commits_every_100ms_unless_an_interval_is_set() {
        let s = load_str("processing_guarantee = \"exactly-once\"\n").unwrap();
        assert_eq!(s.processing_guarantee, ProcessingGuarantee::ExactlyOnce);
        assert_eq!(s.commit_interval, EXACTLY_ONCE_COMMIT_INTERVAL);
        let s = load_str("processing_guarantee = \"exactly-once\"\ncommit_interval = \"1s\"\n")
            .unwrap();
        assert_eq!(s.commit_interval, Duration::from_secs(1));
        let s = load(None, &Overrides::default()).unwrap();
        assert_eq!(s.processing_guarantee, ProcessingGuarantee::AtLeastOnce);
        assert_eq!(s.commit_interval, Duration::from_secs(5));
        let err = load_str("processing_guarantee = \"exactly_once\"\n").unwrap_err();
        assert!(err.to_string().contains("exactly-once"), "{err}");
        let err = load_str(
            "processing_guarantee = \"exactly-once\"\n[kafka.consumer]\n\"isolation.level\" = \"read_uncommitted\"\n",
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("kafka.consumer.isolation.level"),
            "{err}"
        );
        let err = load_str("[kafka.producer]\n\"transactional.id\" = \"x\"\n").unwrap_err();
        assert!(
            err.to_string().contains("keyflight sets this itself"),
            "{err}"
        );
    }

    #[test]
    fn an_http_sink_needs_a_usable_url_and_headers_keyflight_does_not_set() {
        let http = |extra: &str| load_str(&format!("[sink]\nkind = \"http\"\n{extra}"));
        let s = http("[sink.http]\nurl = \"https://h.example/u/{key}\"\nmethod = \"PUT\"\n[sink.http.headers]\nX-Tenant = \"acme\"\nAuthorization = { env = \"TOKEN\" }\n").unwrap();
        assert_eq!(s.sink.kind, SinkKind::Http);
        assert_eq!(s.sink.http.method, HttpMethod::Put);
        assert_eq!(s.sink.http.max_in_flight, 64);
        assert_eq!(
            s.sink.http.headers["Authorization"],
            HeaderValueSetting::Env {
                env: "TOKEN".into()
            }
        );
        // No audit topic: no topic records the pushes.
        assert_eq!(s.pushes_topic(), None);
        for (extra, key, says) in [
            ("", "sink.http.url", "must be set"),
            (
                "[sink.http]\nurl = \"ftp://h/{key}\"\n",
                "sink.http.url",
                "scheme `ftp`",
            ),
            (
                "[sink.http]\nurl = \"not a url\"\n",
                "sink.http.url",
                "not a URL",
            ),
            (
                "[sink.http]\nurl = \"http://h\"\nmax_in_flight = 0\n",
                "sink.http.max_in_flight",
                "at least 1",
            ),
            (
                "[sink.http]\nurl = \"http://h\"\ntimeout = \"0s\"\n",
                "sink.http.timeout",
                "greater than 0",
            ),
            (
                "[sink.http]\nurl = \"http://h\"\n[sink.http.headers]\nIdempotency-Key = \"x\"\n",
                "sink.http.headers.Idempotency-Key",
                "sets `Idempotency-Key` itself",
            ),
            (
                "[sink.http]\nurl = \"http://h\"\n[sink.http.headers]\n\"Bad Name\" = \"x\"\n",
                "sink.http.headers.Bad Name",
                "not a header name",
            ),
            (
                "[sink.http]\nurl = \"http://h\"\nca_file = \"/nonexistent/ca.pem\"\n",
                "sink.http.ca_file",
                "cannot read",
            ),
            (
                "[sink.http]\nurl = \"http://h\"\naudit_topic = \"a b\"\n",
                "sink.http.audit_topic",
                "contains ' '",
            ),
        ] {
            let err = http(extra).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(says), "{extra}: {err}");
        }
        let err = load_str("processing_guarantee = \"exactly-once\"\n[sink]\nkind = \"http\"\n[sink.http]\nurl = \"http://h\"\n").unwrap_err();
        assert!(
            err.to_string().contains("sink.kind") && err.to_string().contains("transaction"),
            "{err}"
        );
        let s = http("[sink.http]\nurl = \"http://h\"\naudit_topic = \"pushes.audit\"\n").unwrap();
        assert_eq!(s.pushes_topic(), Some("pushes.audit"));
        assert_eq!(Settings::default().pushes_topic(), Some("events.pushed"));
    }

    #[test]
    fn written_out_header_values_are_redacted_and_variables_named() {
        let s = load_str(
            "[sink.http.headers]\nX-Api-Key = \"hunter2\"\nAuthorization = { env = \"TOKEN\" }\n",
        )
        .unwrap();
        let shown = toml::to_string(&s.redacted()).unwrap();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("X-Api-Key = \"<redacted>\""), "{shown}");
        assert!(shown.contains("env = \"TOKEN\""), "{shown}");
    }

    #[test]
    fn file_then_flags_override() {
        let s = load_str(
            "application_id = \"orders\"\nbrokers = \"a:1\"\n[compensation]\ninterval = \"2s\"\n",
        )
        .unwrap();
        assert_eq!(
            (s.application_id.as_str(), s.brokers.as_str()),
            ("orders", "a:1")
        );
        assert_eq!(s.changelog_topic(), "orders-markers-changelog");
        assert_eq!(s.compensation.interval, Duration::from_secs(2));
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let err = load_str("[singleflight]\nmax_active = 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("k.toml"), "{err}");
        assert!(err.contains("`singleflight.max_active`"), "{err}");
        assert!(err.contains("unknown key"), "{err}");
    }

    #[test]
    fn wrong_type_and_impossible_values_are_named() {
        let err = load_str("[singleflight]\nmax_active_keys = \"many\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`singleflight.max_active_keys`"), "{err}");
        let err = load_str("[compensation]\ninterval = \"0s\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`compensation.interval`") && err.contains("greater than 0"),
            "{err}"
        );
        let err = load_str("[topics]\ninput = \"\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`topics.input`") && err.contains("must not be empty"),
            "{err}"
        );
        let err = load_str("[singleflight]\nmerge_policy = \"oldest\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("json-merge-patch"), "{err}");
    }

    #[test]
    fn push_shaping_reads_durations_and_defaults_max_delay_to_ten_delays() {
        let s = load_str("[singleflight]\ndelay = \"200ms\"\nmin_interval = \"1s\"\n").unwrap();
        let w = s.singleflight.windows();
        assert_eq!(
            (w.delay, w.max_delay, w.min_interval),
            (200_000_000, 2_000_000_000, 1_000_000_000)
        );
        let s = load_str("[singleflight]\ndelay = \"200ms\"\nmax_delay = \"500ms\"\n").unwrap();
        assert_eq!(s.singleflight.windows().max_delay, 500_000_000);
        let err = load_str("[singleflight]\ndelay = \"1s\"\nmax_delay = \"500ms\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`singleflight.max_delay`")
                && err.contains("at least singleflight.delay (1s)"),
            "{err}"
        );
    }

    #[test]
    fn raw_input_with_merge_patch_is_refused() {
        let err = load_str(
            "[input]\nformat = \"raw\"\n[singleflight]\nmerge_policy = \"json-merge-patch\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("`input.format`"), "{err}");
    }

    #[test]
    fn same_topic_twice_is_refused() {
        let err = load_str("[topics]\npushed = \"events.in\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`topics.pushed`") && err.contains("topics.input"),
            "{err}"
        );
    }

    #[test]
    fn kafka_properties_flatten_and_reserved_ones_are_refused() {
        let s = load_str("[kafka.common]\nsecurity.protocol = \"SASL_SSL\"\n\"sasl.password\" = \"hunter2\"\n[kafka.producer]\n\"linger.ms\" = 5\n").unwrap();
        let common = flatten(&s.kafka.common);
        assert_eq!(common["security.protocol"], "SASL_SSL");
        assert_eq!(flatten(&s.kafka.producer)["linger.ms"], "5");
        let shown = flatten(&s.redacted().kafka.common);
        assert_eq!(shown["sasl.password"], "<redacted>");
        let err = load_str("[kafka.consumer]\n\"enable.auto.commit\" = true\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`kafka.consumer.enable.auto.commit`"), "{err}");
    }

    #[test]
    fn several_problems_are_all_reported() {
        let err = load_str("commit_interval = \"0ms\"\n[singleflight]\nmax_active_keys = 0\n")
            .unwrap_err();
        assert_eq!(err.problems.len(), 2, "{err}");
    }
}

#[cfg(test)]
mod shipped_file {
    use super::*;

    /// config/keyflight.toml documents every key with its default value;
    /// `commit_interval` and `singleflight.max_delay` only in a comment, as
    /// their defaults depend on other keys.
    #[test]
    fn documented_file_lists_every_key_with_its_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/keyflight.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\n# commit_interval = \"5s\"\n"));
        assert!(text.contains("\n# max_delay = \"1s\"\n"));
        let documented: toml::Value = toml::from_str(&text).unwrap();
        let mut defaults = toml::Value::try_from(Settings::default()).unwrap();
        defaults.as_table_mut().unwrap().remove("commit_interval");
        assert_eq!(documented, defaults);
        assert_eq!(
            load(Some(&path), &Overrides::default()).unwrap(),
            Settings::default()
        );
    }
}
