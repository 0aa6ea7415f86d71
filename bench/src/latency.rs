//! Event-to-output latency at a fixed rate, in rounds.

use std::time::Duration;

use keyflight::loadgen::LoadSpec;
use keyflight::metrics::scrape::{http_get, Scrape};

use crate::{
    drain_limit, drained, machine_cpu_ticks, process_cpu_seconds, produce, read_consumer,
    records_with, scrape, stats, versions, App, Env, Result, SystemLatency,
};

#[derive(Clone, Copy, PartialEq)]
pub(crate) enum System {
    Copy,
    Keyflight,
}

/// Runs `system` on fresh topics (for `round`), produces `spec` at `rate`
/// (`None`: as fast as it can) while it runs, and returns the achieved
/// rate, how many events were produced after `warmup`, and their
/// event→output latencies.
pub(crate) fn latency(
    env: &Env,
    system: System,
    round: u32,
    spec: LoadSpec,
    rate: Option<f64>,
    warmup: Duration,
) -> Result<SystemLatency> {
    let name = match system {
        System::Copy => format!("lat-copy-{round}"),
        System::Keyflight => format!("lat-keyflight-{round}"),
    };
    let app = App::create(env, &name)?;
    let events = spec.events;
    let log = app.state.with_extension("log");
    let (mut child, output) = match system {
        System::Copy => {
            let mut child = app.copy(&log)?;
            child.wait(Duration::from_secs(60), |c| {
                c.log().contains("partitions assigned").then_some(())
            })?;
            (child, app.copied.clone())
        }
        System::Keyflight => {
            let mut child = app.keyflight(&log)?;
            let addr = child.metrics_addr()?;
            child.wait(Duration::from_secs(120), |_| {
                http_get(&addr, "/readyz").ok().filter(|(s, _)| *s == 200)
            })?;
            (child, app.settings.topics.pushed.clone())
        }
    };
    let idle_cpu = child.cpu_seconds();
    let (driver_cpu, machine) = (process_cpu_seconds("self"), machine_cpu_ticks());
    let achieved = produce(&app, spec, rate)?;
    let driver_cpu = process_cpu_seconds("self") - driver_cpu;
    let machine_busy = stats::busy_share(machine, machine_cpu_ticks());
    let reader = read_consumer(&app)?;
    // Drained; keyflight's acknowledgement times are read once it is.
    let push_ack_ms = match system {
        System::Copy => {
            child.wait(drain_limit(events), |_| {
                records_with(&reader, &output)
                    .ok()
                    .filter(|n| *n >= events)
                    .map(drop)
            })?;
            None
        }
        System::Keyflight => {
            let addr = child.metrics_addr()?;
            child.wait(drain_limit(events), |_| {
                drained(&addr, events).then_some(())
            })?;
            push_ack_ms(&scrape(&addr)?)
        }
    };
    let cpu = child.cpu_seconds() - idle_cpu;
    child.stop()?;
    let mut inputs = versions(&app, &app.settings.topics.input)?;
    let start = inputs.iter().map(|(_, _, ts)| *ts).min().unwrap_or(0);
    inputs.retain(|(_, _, ts)| *ts >= start + warmup.as_millis() as i64);
    let outputs = versions(&app, &output)?;
    let last_output = outputs.iter().map(|(_, _, ts)| *ts).max().unwrap_or(start);
    Ok(SystemLatency {
        rate: achieved,
        through_per_s: stats::rate(events, start, last_output),
        cpu_us_per_event: cpu * 1e6 / events as f64,
        driver_cpu_us_per_event: driver_cpu * 1e6 / events as f64,
        machine_busy,
        measured: inputs.len(),
        latency: stats::latencies(&inputs, &outputs),
        push_ack_ms,
    })
}

/// p50 and p99 (ms, bucket bounds) of keyflight's normal pushes' produce →
/// acknowledgement time.
pub(crate) fn push_ack_ms(metrics: &Scrape) -> Option<(f64, f64)> {
    histogram_ms(
        metrics,
        "keyflight_push_latency_seconds_bucket",
        &["kind=\"normal\""],
    )
}

/// p50 and p99 (ms, bucket bounds) of a histogram in seconds, given its
/// `_bucket` series and the labels to select.
pub(crate) fn histogram_ms(metrics: &Scrape, buckets: &str, having: &[&str]) -> Option<(f64, f64)> {
    let buckets: Vec<(f64, f64)> = metrics
        .series(buckets, having)
        .filter_map(|(labels, count)| {
            let bound = labels.split(',').find_map(|l| l.strip_prefix("le="))?;
            let bound = bound.trim_matches('"');
            let bound = if bound == "+Inf" {
                f64::INFINITY
            } else {
                bound.parse().ok()?
            };
            Some((bound, count))
        })
        .collect();
    let ms = |q| stats::histogram_percentile(&buckets, q).map(|s| s * 1e3);
    Some((ms(50.0)?, ms(99.0)?))
}
