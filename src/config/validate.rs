//! Checks of a merged configuration that its types cannot express: ranges,
//! topic names, addresses, and the librdkafka properties keyflight owns.

use super::layers::describe_source;
use super::*;

/// Checks values that parse but cannot work.
pub(super) fn validate(s: &Settings, figment: &Figment) -> Result<(), ConfigError> {
    let mut problems = Vec::new();
    let mut check = |key: &str, problem: Option<String>| {
        if let Some(message) = problem {
            problems.push(Problem {
                source: describe_source(figment.find_metadata(key), key),
                key: key.to_string(),
                message,
            });
        }
    };
    check("application_id", topic_name_problem(&s.application_id));
    check(
        "brokers",
        s.brokers
            .trim()
            .is_empty()
            .then(|| "must name at least one broker (host:port)".into()),
    );
    check(
        "log_level",
        tracing_subscriber::EnvFilter::try_new(&s.log_level)
            .err()
            .map(|e| {
                format!("not a log level or filter ({e}); try error, warn, info, debug or trace")
            }),
    );
    check(
        "state_dir",
        s.state_dir
            .as_os_str()
            .is_empty()
            .then(|| "must not be empty".into()),
    );
    check("metrics_addr", parse_metrics_addr(&s.metrics_addr).err());
    check("commit_interval", positive(s.commit_interval));
    check("push.retry_backoff", positive(s.push.retry_backoff));
    check(
        "push.max_retry_backoff",
        (s.push.max_retry_backoff < s.push.retry_backoff).then(|| {
            format!(
                "must be at least push.retry_backoff ({})",
                humantime::format_duration(s.push.retry_backoff)
            )
        }),
    );
    check("push.give_up_after", positive(s.push.give_up_after));
    check(
        "deletes.version_header",
        (s.deletes.version_header.is_empty() || s.deletes.version_header.contains('\0'))
            .then(|| "must be a header name (not empty, no NUL)".into()),
    );
    check("deletes.retention", positive(s.deletes.retention));
    check("shutdown_timeout", positive(s.shutdown_timeout));
    check(
        "input.version_field",
        s.input
            .version_field
            .is_empty()
            .then(|| "must not be empty".into()),
    );
    check(
        "input.max_value_bytes",
        (s.input.max_value_bytes == 0).then(|| "must be at least 1".into()),
    );
    check(
        "input.format",
        (s.input.format == InputFormat::Raw && s.singleflight.merge_policy == MergePolicy::JsonMergePatch)
            .then(|| "`raw` values cannot be merge patches; use format \"json\" or merge_policy \"latest\"".into()),
    );
    check(
        "input.schema_id",
        (s.input.format == InputFormat::Avro
            && s.input.avro_framing == AvroFraming::Confluent
            && s.input.schema_id == 0)
            .then(|| {
                "confluent framing needs the Schema Registry id of schemas/event.avsc (1 or more)"
                    .into()
            }),
    );
    check("topics.input", topic_name_problem(&s.topics.input));
    check("topics.pushed", topic_name_problem(&s.topics.pushed));
    check(
        "topics.dead_letter",
        topic_name_problem(&s.topics.dead_letter),
    );
    if !s.topics.changelog.is_empty() {
        check("topics.changelog", topic_name_problem(&s.topics.changelog));
    }
    let names = [
        ("topics.input", s.topics.input.clone()),
        ("topics.pushed", s.topics.pushed.clone()),
        ("topics.dead_letter", s.topics.dead_letter.clone()),
        ("topics.changelog", s.changelog_topic()),
    ];
    for (i, (key, name)) in names.iter().enumerate() {
        if let Some((other, _)) = names[..i].iter().find(|(_, n)| n == name) {
            check(
                key,
                Some(format!(
                    "`{name}` is also {other}; every topic must be different"
                )),
            );
        }
    }
    check(
        "singleflight.max_active_keys",
        (s.singleflight.max_active_keys == 0).then(|| "must be at least 1".into()),
    );
    if let Some(max_delay) = s.singleflight.max_delay {
        check(
            "singleflight.max_delay",
            (max_delay < s.singleflight.delay || max_delay.is_zero()).then(|| {
                format!(
                    "must be at least singleflight.delay ({}) and above 0",
                    humantime::format_duration(s.singleflight.delay)
                )
            }),
        );
    }
    check(
        "state.cached_keys",
        (s.state.cached_keys == 0).then(|| "must be at least 1".into()),
    );
    check(
        "singleflight.max_held_bytes",
        (s.singleflight.max_held_bytes == 0).then(|| "must be at least 1".into()),
    );
    check("compensation.interval", positive(s.compensation.interval));
    if s.sink.kind == SinkKind::Http {
        validate_http_sink(&s.sink.http, &mut check);
        check(
            "sink.kind",
            (s.processing_guarantee == ProcessingGuarantee::ExactlyOnce).then(|| {
                "an HTTP call cannot be part of a Kafka transaction; use processing_guarantee \"at-least-once\" (requests carry Idempotency-Key for the receiver to drop repeats)".into()
            }),
        );
    }
    let mut consumer = flatten(&s.kafka.common);
    consumer.extend(flatten(&s.kafka.consumer));
    let uncommitted = consumer
        .get("isolation.level")
        .is_some_and(|level| level == "read_uncommitted");
    if s.processing_guarantee == ProcessingGuarantee::ExactlyOnce && uncommitted {
        check(
            "kafka.consumer.isolation.level",
            Some("exactly-once reads committed records only (`read_committed`, librdkafka's default): restoring aborted markers would bring back state that never counted".into()),
        );
    }
    for (table, values, reserved) in [
        ("kafka.common", &s.kafka.common, RESERVED_COMMON),
        ("kafka.consumer", &s.kafka.consumer, RESERVED_CONSUMER),
        ("kafka.producer", &s.kafka.producer, RESERVED_PRODUCER),
    ] {
        for (property, value) in flatten(values) {
            let key = format!("{table}.{property}");
            let reserved = reserved
                .iter()
                .chain(RESERVED_COMMON)
                .find(|(name, _)| *name == property);
            if let Some((_, why)) = reserved {
                check(&key, Some(format!("keyflight sets this itself: {why}")));
            } else if value.is_empty() {
                check(&key, Some("must not be empty".into()));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigError { problems })
    }
}

/// The HTTP sink's URL, method-independent limits and headers.
fn validate_http_sink(http: &HttpSinkSettings, check: &mut impl FnMut(&str, Option<String>)) {
    let url = if http.url.is_empty() {
        Err("must be set when sink.kind = \"http\" (for example \"https://hooks.example.com/users/{key}\")".to_string())
    } else {
        reqwest::Url::parse(&http.url.replace("{key}", "k"))
            .map_err(|e| format!("`{}` is not a URL ({e})", http.url))
            .and_then(|url| match url.scheme() {
                "http" | "https" => Ok(()),
                other => Err(format!(
                    "scheme `{other}` is not supported; use http or https"
                )),
            })
    };
    check("sink.http.url", url.err());
    check("sink.http.timeout", positive(http.timeout));
    check(
        "sink.http.max_in_flight",
        (http.max_in_flight == 0).then(|| "must be at least 1".into()),
    );
    if let Some(file) = &http.ca_file {
        check(
            "sink.http.ca_file",
            std::fs::metadata(file)
                .err()
                .map(|e| format!("cannot read `{}`: {e}", file.display())),
        );
    }
    if !http.audit_topic.is_empty() {
        check(
            "sink.http.audit_topic",
            topic_name_problem(&http.audit_topic),
        );
    }
    for (name, value) in &http.headers {
        let key = format!("sink.http.headers.{name}");
        let problem = if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
            Some(format!("`{name}` is not a header name"))
        } else if crate::sink::http::RESERVED_HEADERS
            .iter()
            .any(|reserved| reserved.eq_ignore_ascii_case(name))
        {
            Some(format!("keyflight sets `{name}` itself on every request"))
        } else {
            match value {
                HeaderValueSetting::Env { env } if env.is_empty() => {
                    Some("`env` must name an environment variable".into())
                }
                HeaderValueSetting::Env { .. } => None,
                HeaderValueSetting::Text(text) => reqwest::header::HeaderValue::from_str(text)
                    .err()
                    .map(|_| "not a valid header value (visible ASCII, no line breaks)".into()),
            }
        };
        check(&key, problem);
    }
}

const RESERVED_COMMON: &[(&str, &str)] =
    &[("bootstrap.servers", "use the `brokers` key or --brokers")];
const RESERVED_CONSUMER: &[(&str, &str)] = &[
    ("group.id", "the group is the `application_id`"),
    (
        "enable.auto.commit",
        "offsets are committed only once their pushes are acknowledged",
    ),
    (
        "enable.auto.offset.store",
        "offsets are committed only once their pushes are acknowledged",
    ),
];
const RESERVED_PRODUCER: &[(&str, &str)] = &[
    ("enable.idempotence", "pushes need the idempotent producer"),
    ("acks", "pushes need acks=all"),
    (
        "transactional.id",
        "processing_guarantee = \"exactly-once\" gives each input partition its own",
    ),
];

pub(super) fn parse_metrics_addr(text: &str) -> Result<Option<std::net::SocketAddr>, String> {
    if text == "off" {
        return Ok(None);
    }
    use std::net::ToSocketAddrs;
    match text.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .map(Some)
            .ok_or_else(|| format!("`{text}` resolves to no address")),
        Err(e) => Err(format!(
            "`{text}` is not host:port ({e}); for example \"127.0.0.1:9464\", \"0.0.0.0:9464\" or \"off\""
        )),
    }
}

fn positive(d: Duration) -> Option<String> {
    d.is_zero()
        .then(|| "must be greater than 0 (for example \"5s\" or \"500ms\")".into())
}

/// Kafka's rules for topic names (keyflight derives some from `application_id`).
fn topic_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        Some("must not be empty".into())
    } else if name == "." || name == ".." {
        Some(format!("`{name}` is not a valid topic name"))
    } else if name.len() > 200 {
        Some(format!(
            "is {} characters long; at most 200 are allowed",
            name.len()
        ))
    } else {
        name.chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
            .map(|bad| {
                format!("`{name}` contains {bad:?}; use only letters, digits, '.', '_' and '-'")
            })
    }
}
