//! `keyflight verify`.

use clap::Args;
use rdkafka::message::Headers;
use rdkafka::Message;

use super::{progress_bar, CliError};
use crate::config::Settings;
use crate::kafka::headers;
use crate::kafka::reader::{self, ReadError, Start};
use crate::processor::task::core::PUSH_REFUSED;
use crate::verify::{Report, Verifier};

pub const VERIFY_ABOUT: &str = "\
Check that the pushed topic is right: read the input, pushed and dead-letter
topics (whole, as of now), fold every key's events the way the processor does
(stale events dropped by version, else by offset; the merge policy; deletes),
and compare with the key's last push.

A key is `missing` (events, no push), `stale` (its last push carries an older
version than its latest event), `differing` (same version, other value) or
`unexpected` (pushed, no event). Every record the processor must refuse (a
null key, an undecodable or oversized value) must be in the dead-letter topic,
found by its keyflight-source-partition/-offset headers.

Under the HTTP sink (sink.kind = \"http\") the pushes are read from
sink.http.audit_topic, or, with --http-log, from a `keyflight receive --log`
file: every call answered 2xx counts as a push, in arrival order, and a call
that arrived while another call of its key was open is a problem too.

Exit status 0 only when every key matches and every refused record is
dead-lettered; 1 otherwise, or when a topic cannot be read. Run it after the
processor has caught up (consumer lag 0), with the same configuration.";

pub const VERIFY_EXAMPLES: &str = "\
Examples:
  keyflight --config prod.toml verify
  keyflight --config prod.toml verify --json > report.json
  keyflight verify --since 2026-11-27T08:00:00Z   # events and pushes since then
  keyflight verify --since 30m                    # ... or in the last 30 minutes
  keyflight --config http.toml verify --http-log calls.jsonl  # an HTTP sink's receiver";

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Only events and pushes at or after TIME: RFC 3339
    /// (2026-11-27T08:00:00Z) or an age (30m, 2h). Keys without events since
    /// then are not checked; under json-merge-patch only versions are
    /// compared, since the fold of a part of the history is not the value
    #[arg(long, value_name = "TIME", value_parser = super::parse_time)]
    pub since: Option<i64>,

    /// Print the whole report as one JSON document on stdout
    #[arg(long)]
    pub json: bool,

    /// How many problem keys to list per kind in the human report
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub show: usize,

    /// Read the pushes from this `keyflight receive --log` file (the HTTP
    /// sink's receiver) instead of a topic
    #[arg(long, value_name = "FILE")]
    pub http_log: Option<std::path::PathBuf>,
}

/// Where `verify` reads the pushes from.
enum Pushes<'a> {
    Topic(&'a str),
    HttpLog(&'a std::path::Path),
}

pub fn run(settings: &Settings, args: VerifyArgs) -> Result<(), CliError> {
    let pushes = match (&args.http_log, settings.pushes_topic()) {
        (Some(log), _) => Pushes::HttpLog(log),
        (None, Some(topic)) => Pushes::Topic(topic),
        (None, None) => {
            return Err(CliError::Failed(
                "sink.kind = \"http\" without sink.http.audit_topic writes pushes to no topic: pass --http-log FILE (a `keyflight receive --log` file) or set sink.http.audit_topic".into(),
            ))
        }
    };
    let (report, overlaps) = verify_from(settings, args.since, pushes)?;
    if overlaps > 0 {
        eprintln!("{overlaps} calls arrived while another call of their key was open (see `overlapped` in the log)");
    }
    if args.json {
        let json = serde_json::json!({ "passed": report.passed(), "report": report });
        println!("{json}");
    } else {
        print_problems(&report, args.show);
        println!("{}", report.summary());
    }
    if report.passed() {
        overlap_failure(overlaps).map_or(Ok(()), Err)
    } else {
        Err(CliError::Failed(format!(
            "verification failed: {} missing, {} stale, {} differing, {} unexpected, {} dead letters missing",
            report.missing.len(),
            report.stale.len(),
            report.differing.len(),
            report.unexpected.len(),
            report.dead_letters_missing.len()
        )))
    }
}

/// Reads the three topics and returns the report.
pub fn verify(settings: &Settings, since: Option<i64>) -> Result<Report, CliError> {
    let topic = settings.pushes_topic().unwrap_or(&settings.topics.pushed);
    verify_from(settings, since, Pushes::Topic(topic)).map(|(report, _)| report)
}

/// [`verify`] with the pushes read from a receiver's log; a call that
/// overlapped another of its key fails it.
pub fn verify_http_log(settings: &Settings, log: &std::path::Path) -> Result<Report, CliError> {
    let (report, overlaps) = verify_from(settings, None, Pushes::HttpLog(log))?;
    overlap_failure(overlaps).map_or(Ok(report), Err)
}

/// Calls that overlapped another call of their key fail a verify that
/// reads a receiver's log, whatever its report says.
fn overlap_failure(overlaps: usize) -> Option<CliError> {
    (overlaps > 0).then(|| {
        CliError::Failed(format!(
            "verification failed: {overlaps} calls overlapped another call of their key"
        ))
    })
}

/// Reads the input and dead-letter topics and the pushes; returns the
/// report and how many HTTP calls overlapped another of their key.
fn verify_from(
    settings: &Settings,
    since: Option<i64>,
    pushes: Pushes<'_>,
) -> Result<(Report, usize), CliError> {
    let read_error = |e: ReadError| CliError::Runtime(e.to_string());
    let consumer = reader::consumer(settings, "verify")
        .map_err(|e| CliError::Runtime(format!("cannot create the Kafka consumer: {e}")))?;
    let start = since.map_or(Start::Beginning, Start::Time);
    let topics = &settings.topics;
    let input = reader::ranges(&consumer, &topics.input, start).map_err(read_error)?;
    // The pushes: a topic's ranges, or a receiver's calls.
    let (pushed, calls) = match pushes {
        Pushes::Topic(topic) => {
            let ranges = reader::ranges(&consumer, topic, start).map_err(read_error)?;
            (Some((topic, ranges)), Vec::new())
        }
        Pushes::HttpLog(path) => (
            None,
            crate::receive::read_log(path).map_err(CliError::Runtime)?,
        ),
    };
    let dead = match reader::ranges(&consumer, &topics.dead_letter, start) {
        Ok(ranges) => ranges,
        Err(ReadError::Missing(_)) => Vec::new(), // nothing was dead-lettered
        Err(e) => return Err(read_error(e)),
    };
    let bar = progress_bar(
        reader::size(&input)
            + pushed
                .as_ref()
                .map_or(0, |(_, ranges)| reader::size(ranges))
            + reader::size(&dead),
        "reading",
    );
    let policy = settings.singleflight.merge_policy;
    let mut verifier = Verifier::new(settings.codec(), policy, &topics.input);
    if since.is_some() {
        verifier = verifier.partial();
    }
    if settings.singleflight.skip_unchanged {
        verifier = verifier.skip_unchanged();
    }

    bar.set_message(topics.input.clone());
    reader::read(&consumer, &topics.input, &input, |m| {
        let delete_version = m
            .payload()
            .is_none()
            .then(|| header_bytes(m, &settings.deletes.version_header))
            .flatten();
        verifier.event(
            m.partition(),
            m.offset(),
            m.key(),
            m.payload(),
            delete_version,
        );
        bar.inc(1);
    })
    .map_err(read_error)?;
    let overlaps = http_calls(&mut verifier, calls, since);
    if let Some((topic, ranges)) = &pushed {
        bar.set_message(topic.to_string());
        reader::read(&consumer, topic, ranges, |m| {
            let version = header(m, headers::VERSION).and_then(|v| v.parse().ok());
            let timestamp = m.timestamp().to_millis().unwrap_or_default();
            verifier.push(
                m.partition(),
                m.offset(),
                timestamp,
                m.key(),
                m.payload(),
                version,
            );
            bar.inc(1);
        })
        .map_err(read_error)?;
    }
    bar.set_message(topics.dead_letter.clone());
    reader::read(&consumer, &topics.dead_letter, &dead, |m| {
        let partition = header(m, headers::SOURCE_PARTITION).and_then(|v| v.parse().ok());
        let offset = header(m, headers::SOURCE_OFFSET).and_then(|v| v.parse().ok());
        let reason = header(m, headers::ERROR_REASON);
        let version = header(m, headers::VERSION).and_then(|v| v.parse().ok());
        if let (Some(PUSH_REFUSED), Some(version)) = (reason.as_deref(), version) {
            let topic = header(m, headers::SOURCE_TOPIC);
            verifier.refused_push(topic.as_deref(), m.key(), version);
        } else if let (Some(partition), Some(offset)) = (partition, offset) {
            let topic = header(m, headers::SOURCE_TOPIC);
            verifier.dead_letter(topic.as_deref(), partition, offset);
        }
        bar.inc(1);
    })
    .map_err(read_error)?;
    bar.finish_and_clear();
    Ok((verifier.report(), overlaps))
}

/// An HTTP receiver's calls as pushes: those answered 2xx, in arrival
/// order (`seq` stands for the offset); returns the overlapping calls.
fn http_calls(
    verifier: &mut Verifier,
    calls: Vec<crate::receive::CallRecord>,
    since: Option<i64>,
) -> usize {
    let mut overlaps = 0;
    for call in calls {
        let at_ms = (call.start_ns / 1_000_000) as i64;
        if since.is_some_and(|since| at_ms < since) {
            continue;
        }
        overlaps += usize::from(call.overlapped);
        if !(200..300).contains(&call.status) {
            continue;
        }
        let body = call.body_bytes();
        verifier.push(
            0,
            call.seq as i64,
            at_ms,
            call.key.as_deref().map(str::as_bytes),
            body.as_deref(),
            call.version,
        );
    }
    overlaps
}

/// The value of header `name`, as text.
pub(super) fn header<M: Message>(message: &M, name: &str) -> Option<String> {
    header_bytes(message, name).map(|v| String::from_utf8_lossy(v).into_owned())
}

/// The value of the last header `name` (as the processor reads it).
fn header_bytes<'m, M: Message>(message: &'m M, name: &str) -> Option<&'m [u8]> {
    let headers = message.headers()?;
    headers
        .iter()
        .filter(|h| h.key == name)
        .last()
        .and_then(|h| h.value)
}

fn print_problems(report: &Report, show: usize) {
    let version = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    for (kind, list) in [
        ("missing", &report.missing),
        ("stale", &report.stale),
        ("differing", &report.differing),
    ] {
        for problem in list.iter().take(show) {
            println!(
                "{kind:<9} key={:?} latest version={} pushed version={} events behind={}",
                problem.key,
                version(problem.expected_version),
                version(problem.pushed_version),
                problem.events_behind
            );
        }
        if list.len() > show {
            println!("{kind:<9} ... and {} more", list.len() - show);
        }
    }
    for key in report.unexpected.iter().take(show) {
        println!("unexpected key={key:?} pushed without any event in the input");
    }
    for missing in report.dead_letters_missing.iter().take(show) {
        println!(
            "no dead letter for partition {} offset {} ({})",
            missing.partition, missing.offset, missing.reason
        );
    }
}
