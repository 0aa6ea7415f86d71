//! The record sizes the cluster takes, and whether keyflight's records fit.
//!
//! A value keyflight accepts (`input.max_value_bytes`) is produced twice:
//! in its push, and inside its key's marker in the changelog. Both must fit
//! the producer's `message.max.bytes` (librdkafka refuses a larger record
//! before sending it) and the topic's `max.message.bytes` (the broker
//! refuses it). `run` reads both at start and refuses a configuration under
//! which an accepted value cannot be written. A merge-patch document can
//! still grow past the limit from small patches: that push is dead-lettered
//! (`push-refused`), and a dead letter too large for its topic is written
//! with its value cut to [`Limits::dead_letter_max_value`].

use std::fmt;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;

use super::admin::topic_configs;
use super::{client_config, Role};
use crate::config::Settings;

/// What a record needs beyond its value: its key, keyflight's headers and
/// the batch framing. A key longer than this leaves correspondingly less
/// room for the value (such a push is dead-lettered if it does not fit).
pub const RECORD_ALLOWANCE: usize = 4096;

/// librdkafka's default `message.max.bytes`.
pub const PRODUCER_DEFAULT: usize = 1_000_000;

/// The limits that bound keyflight's records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The producer's `message.max.bytes`.
    pub producer: usize,
    /// Each output topic's `max.message.bytes` (`None`: the broker does not
    /// say, or the topic does not exist yet).
    pub pushed: Option<usize>,
    pub changelog: Option<usize>,
    pub dead_letter: Option<usize>,
}

/// A configuration under which an accepted value cannot be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct LimitsError {
    pub problems: Vec<String>,
}

impl fmt::Display for LimitsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "the record size limits do not agree:")?;
        for problem in &self.problems {
            writeln!(f, "  {problem}")?;
        }
        write!(
            f,
            "an accepted value is written whole in its push and in its marker, plus up to \
             {RECORD_ALLOWANCE} bytes of key, headers and framing"
        )
    }
}

impl Limits {
    /// The producer's limit from the configuration, the topics' unknown.
    pub fn of_producer(settings: &Settings) -> Limits {
        let producer = client_config(settings, Role::Producer)
            .get("message.max.bytes")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(PRODUCER_DEFAULT);
        Limits {
            producer,
            pushed: None,
            changelog: None,
            dead_letter: None,
        }
    }

    /// Reads the topics' `max.message.bytes` from the cluster (a topic
    /// whose limit cannot be read is left unknown: some Kafka-compatible
    /// brokers do not implement DescribeConfigs).
    pub async fn read(settings: &Settings, timeout: Duration) -> Limits {
        let mut limits = Limits::of_producer(settings);
        let Ok(admin) =
            client_config(settings, Role::Admin).create::<AdminClient<DefaultClientContext>>()
        else {
            return limits;
        };
        let options = AdminOptions::new().request_timeout(Some(timeout));
        let changelog = settings.changelog_topic();
        let topics = [
            settings.pushes_topic().unwrap_or(&settings.topics.pushed),
            changelog.as_str(),
            settings.topics.dead_letter.as_str(),
        ];
        let read = topic_configs(&admin, &topics, "max.message.bytes", &options);
        let Ok(found) = tokio::time::timeout(timeout, read).await else {
            return limits;
        };
        let mut found = found.into_iter().map(|v| v?.parse().ok());
        limits.pushed = found.next().flatten();
        limits.changelog = found.next().flatten();
        limits.dead_letter = found.next().flatten();
        limits
    }

    /// Refuses a configuration under which a value of
    /// `input.max_value_bytes` cannot be pushed or its marker written.
    pub fn check(&self, settings: &Settings) -> Result<(), LimitsError> {
        let value = settings.input.max_value_bytes;
        let changelog = settings.changelog_topic();
        let mut problems = Vec::new();
        let mut fits = |topic: &str, key: &str, topic_limit: Option<usize>| {
            let (limit, named) = match topic_limit {
                Some(t) if t < self.producer => {
                    (t, format!("topic {topic}'s max.message.bytes = {t}"))
                }
                _ => (
                    self.producer,
                    format!("kafka.producer.\"message.max.bytes\" = {}", self.producer),
                ),
            };
            if value + RECORD_ALLOWANCE > limit {
                problems.push(format!(
                    "input.max_value_bytes = {value} does not fit {key} ({topic}): {named} leaves room \
                     for values up to {}; lower input.max_value_bytes to at most that, or raise the limit",
                    limit.saturating_sub(RECORD_ALLOWANCE)
                ));
            }
        };
        match settings.pushes_topic() {
            Some(topic) if topic == settings.topics.pushed => {
                fits(topic, "topics.pushed", self.pushed)
            }
            Some(topic) => fits(topic, "sink.http.audit_topic", self.pushed),
            None => {}
        }
        fits(&changelog, "topics.changelog", self.changelog);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(LimitsError { problems })
        }
    }

    /// The largest value a dead letter carries whole: a dead letter the
    /// topic refuses as too large is written again cut to this.
    pub fn dead_letter_max_value(&self) -> usize {
        self.dead_letter
            .map_or(self.producer, |t| t.min(self.producer))
            .saturating_sub(RECORD_ALLOWANCE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(producer: usize, pushed: Option<usize>, changelog: Option<usize>) -> Limits {
        Limits {
            producer,
            pushed,
            changelog,
            dead_letter: None,
        }
    }

    #[test]
    fn the_defaults_agree() {
        let settings = Settings::default();
        let broker_default = Some(1_048_588);
        let found = limits(PRODUCER_DEFAULT, broker_default, broker_default);
        assert_eq!(found.check(&settings), Ok(()));
        assert_eq!(Limits::of_producer(&settings).producer, PRODUCER_DEFAULT);
    }

    #[test]
    fn a_value_limit_above_the_producers_names_both_keys() {
        let mut settings = Settings::default();
        settings.input.max_value_bytes = 1024 * 1024;
        let err = limits(PRODUCER_DEFAULT, None, None)
            .check(&settings)
            .unwrap_err();
        assert_eq!(err.problems.len(), 2, "the push and the marker: {err}");
        let text = err.to_string();
        assert!(text.contains("input.max_value_bytes = 1048576"), "{text}");
        assert!(
            text.contains("kafka.producer.\"message.max.bytes\" = 1000000"),
            "{text}"
        );
        assert!(text.contains("values up to 995904"), "{text}");
    }

    #[test]
    fn a_topic_below_the_producer_is_the_one_named() {
        let settings = Settings::default();
        let err = limits(PRODUCER_DEFAULT, None, Some(100_000))
            .check(&settings)
            .unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert!(
            err.problems[0].contains("topics.changelog")
                && err.problems[0].contains("max.message.bytes = 100000"),
            "{err}"
        );
    }

    #[test]
    fn the_producer_limit_is_read_from_the_configuration() {
        let mut settings = Settings::default();
        settings.kafka.producer.insert(
            "message.max.bytes".into(),
            crate::config::KafkaValue::Int(2_000_000),
        );
        assert_eq!(Limits::of_producer(&settings).producer, 2_000_000);
        let dl = Limits {
            dead_letter: Some(500_000),
            ..Limits::of_producer(&settings)
        };
        assert_eq!(dl.dead_letter_max_value(), 500_000 - RECORD_ALLOWANCE);
    }
}
