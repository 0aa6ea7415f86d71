//! Draining a backlog: the copy, then keyflight; rates over the output's
//! first-to-last timestamp window.

use std::process::Command;
use std::time::Duration;

use keyflight::kafka::reader::{self, Range, Start};
use keyflight::metrics::scrape::{http_get, Scrape};
use rdkafka::message::Headers;
use rdkafka::Message;

use crate::{path_str, sibling, stats, App, Drain, Result};

pub(crate) fn scrape(addr: &str) -> Result<Scrape> {
    let (status, body) = http_get(addr, "/metrics").map_err(|e| e.to_string())?;
    (status == 200)
        .then(|| Scrape::parse(&body))
        .ok_or_else(|| format!("/metrics answered {status}"))
}

/// keyflight consumed `events`, has nothing in flight, and committed it all.
pub(crate) fn drained(addr: &str, events: u64) -> bool {
    scrape(addr).is_ok_and(|m| is_drained(&m, events))
}

/// [`drained`], by metrics already scraped.
pub(crate) fn is_drained(m: &Scrape, events: u64) -> bool {
    m.sum("keyflight_events_consumed_total", &[]) >= events as f64
        && m.sum("keyflight_keys_in_flight", &[]) == 0.0
        && m.sum("keyflight_keys_waiting", &[]) == 0.0
        && m.sum("keyflight_consumer_lag_records", &[]) == 0.0
}

pub(crate) fn drain_limit(events: u64) -> Duration {
    Duration::from_secs(120 + events / 1_000)
}

// ---------------------------------------------------------------------------
// Reading topics

pub(crate) fn read_consumer(app: &App) -> Result<rdkafka::consumer::BaseConsumer> {
    reader::consumer(&app.settings, "bench-reader").map_err(|e| e.to_string())
}

pub(crate) fn records(app: &App, topic: &str) -> Result<u64> {
    records_with(&read_consumer(app)?, topic)
}

pub(crate) fn records_with(consumer: &rdkafka::consumer::BaseConsumer, topic: &str) -> Result<u64> {
    let ranges = reader::ranges(consumer, topic, Start::Beginning).map_err(|e| e.to_string())?;
    Ok(reader::size(&ranges))
}

/// The earliest first and latest last record timestamps (ms) of a topic.
pub(crate) fn window(app: &App, topic: &str) -> Result<(i64, i64)> {
    let consumer = read_consumer(app)?;
    let ranges = reader::ranges(&consumer, topic, Start::Beginning).map_err(|e| e.to_string())?;
    let ends: Vec<Range> = ranges
        .iter()
        .filter(|r| r.end > r.start)
        .flat_map(|r| {
            [
                Range {
                    end: r.start + 1,
                    ..*r
                },
                Range {
                    start: r.end - 1,
                    ..*r
                },
            ]
        })
        .collect();
    let (mut first, mut last) = (i64::MAX, i64::MIN);
    for pair in ends.chunks(2) {
        for range in pair {
            reader::read(&consumer, topic, std::slice::from_ref(range), |m| {
                let ts = m.timestamp().to_millis().unwrap_or(0);
                first = first.min(ts);
                last = last.max(ts);
            })
            .map_err(|e| e.to_string())?;
        }
    }
    (first <= last)
        .then_some((first, last))
        .ok_or_else(|| format!("{topic} is empty"))
}

/// Every record of a topic as (key, version, timestamp ms); the version is
/// the `keyflight-version` header, else the JSON value's `version`.
pub(crate) fn versions(app: &App, topic: &str) -> Result<Vec<(String, u64, i64)>> {
    let consumer = read_consumer(app)?;
    let ranges = reader::ranges(&consumer, topic, Start::Beginning).map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(reader::size(&ranges) as usize);
    reader::read(&consumer, topic, &ranges, |m| {
        let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
        let header = m.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key == keyflight::kafka::headers::VERSION)
                .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse().ok())
        });
        let version = header.or_else(|| {
            serde_json::from_slice::<serde_json::Value>(m.payload()?)
                .ok()?
                .get("version")?
                .as_u64()
        });
        if let Some(version) = version {
            out.push((key, version, m.timestamp().to_millis().unwrap_or(0)));
        }
    })
    .map_err(|e| e.to_string())?;
    Ok(out)
}

// ---------------------------------------------------------------------------
// The measurements

pub(crate) fn drain_copy(app: &App, events: u64) -> Result<Drain> {
    let mut copy = app.copy(&app.state.with_extension("copy.log"))?;
    let reader = read_consumer(app)?;
    copy.wait(drain_limit(events), |_| {
        records_with(&reader, &app.copied)
            .ok()
            .filter(|n| *n >= events)
    })?;
    let rss = copy.peak_rss_mb();
    let cpu = copy.cpu_seconds();
    copy.stop()?;
    let (first, last) = window(app, &app.copied)?;
    Ok(Drain {
        events_per_s: stats::rate(events, first, last),
        outputs: events,
        outputs_per_s: stats::rate(events, first, last),
        collapse: 1.0,
        peak_rss_mb: rss,
        cpu_us_per_event: cpu * 1e6 / events as f64,
        changelog_per_event: 0.0,
        verify: None,
    })
}

pub(crate) fn drain_keyflight(app: &App, events: u64, verify: bool) -> Result<Drain> {
    let mut kf = app.keyflight(&app.state.with_extension("keyflight.log"))?;
    let addr = kf.metrics_addr()?;
    kf.wait(drain_limit(events), |_| {
        drained(&addr, events).then_some(())
    })?;
    let rss = kf.peak_rss_mb();
    let cpu = kf.cpu_seconds();
    kf.stop()?;
    let pushes = records(app, &app.settings.topics.pushed)?;
    let changelog = records(app, &app.settings.changelog_topic())?;
    let (first, last) = window(app, &app.settings.topics.pushed)?;
    let verified = verify
        .then(|| {
            Command::new(sibling("keyflight")?)
                .args(["--config", path_str(&app.config)?, "verify"])
                .env_remove("RUST_LOG")
                .output()
                .map(|o| o.status.success())
                .map_err(|e| e.to_string())
        })
        .transpose()?;
    Ok(Drain {
        events_per_s: stats::rate(events, first, last),
        outputs: pushes,
        outputs_per_s: stats::rate(pushes, first, last),
        collapse: events as f64 / pushes.max(1) as f64,
        peak_rss_mb: rss,
        cpu_us_per_event: cpu * 1e6 / events as f64,
        changelog_per_event: changelog as f64 / events as f64,
        verify: verified,
    })
}
