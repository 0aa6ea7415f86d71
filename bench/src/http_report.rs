//! The `http` report: what a run of the HTTP sink measured, as JSON and as
//! text.

use std::io::Write;

use serde::Serialize;

use crate::stats::Latency;

#[derive(Serialize, Default)]
pub(crate) struct HttpReport {
    pub(crate) label: String,
    pub(crate) broker: String,
    pub(crate) partitions: i32,
    /// The bare loop's concurrency and keyflight's sink.http.max_in_flight.
    pub(crate) in_flight: usize,
    /// Pushes (requests) per throughput measurement, one per key.
    pub(crate) pushes: u64,
    /// How long the throughput phase's receivers wait before answering, ms.
    pub(crate) answer_ms: u64,
    pub(crate) throughput: Vec<HttpRound>,
    /// Median over the rounds of keyflight's calls/s over the bare loop's.
    pub(crate) ratio: Option<f64>,
    /// keyflight draining the same events through the Kafka sink: its
    /// pipeline's cost per push without HTTP.
    pub(crate) kafka_reference: Option<SinkDrain>,
    pub(crate) live: Option<LivePhase>,
    pub(crate) collapse: Option<CollapsePhase>,
}

/// One throughput round: the bare loop and keyflight, one after the other.
#[derive(Serialize)]
pub(crate) struct HttpRound {
    pub(crate) bare_first: bool,
    pub(crate) bare: Option<SinkDrain>,
    pub(crate) keyflight: Option<SinkDrain>,
    /// keyflight's calls/s over the bare loop's.
    pub(crate) ratio: Option<f64>,
    pub(crate) failed: Option<String>,
}

/// Pushes (calls to a receiver, or records on the pushed topic) over their
/// window, from the first call's arrival to the last one's answer (the
/// first to the last record's timestamp), and what the processes used over
/// that window.
#[derive(Serialize, Default)]
pub(crate) struct SinkDrain {
    /// Calls answered 2xx, or records on the pushed topic.
    pub(crate) calls: u64,
    /// Calls answered otherwise (or abandoned by the client).
    pub(crate) other_calls: u64,
    /// Calls that arrived while their key had another call open.
    pub(crate) overlaps: u64,
    pub(crate) calls_per_s: f64,
    pub(crate) events: u64,
    /// Keys the events touched: the fewest pushes that can carry them all.
    pub(crate) keys: Option<u64>,
    /// Events per call.
    pub(crate) collapse: f64,
    /// Events per second over the same window.
    pub(crate) events_per_s: f64,
    /// Requests in flight over the window: keyflight's
    /// `keyflight_http_requests_in_flight`, the mean of readings every
    /// 250 ms; the bare loop's workers keep their limit by construction.
    pub(crate) mean_in_flight: Option<f64>,
    /// Send → answer at the client, ms, p50 and p99: the bare loop's own
    /// measure, keyflight's bucket bounds of
    /// `keyflight_http_request_duration_seconds`.
    pub(crate) request_ms: Option<(f64, f64)>,
    /// keyflight's `keyflight_push_latency_seconds{kind="normal"}`, ms, p50
    /// and p99 (bucket bounds): from the push's start (markT1) to its
    /// answer, which under the HTTP sink includes the wait for a
    /// `max_in_flight` slot.
    pub(crate) push_ms: Option<(f64, f64)>,
    /// keyflight's changelog records (markers) per push: a key's markT1 and
    /// markT2 within the changelog's 100 ms coalescing share one record.
    pub(crate) changelog_per_push: Option<f64>,
    /// keyflight's `keyflight_http_retries_total`.
    pub(crate) retries: f64,
    /// CPU time (user + system) per call over the window: of the client
    /// (the bare loop, its whole run; or keyflight), of the receiver, and of
    /// the driver (which runs the mock cluster).
    pub(crate) client_cpu_us_per_call: f64,
    pub(crate) receiver_cpu_us_per_call: Option<f64>,
    pub(crate) driver_cpu_us_per_call: f64,
    /// Share of the machine's CPU time busy over the window, 0–1.
    pub(crate) machine_busy: f64,
    pub(crate) verify: Option<bool>,
}

#[derive(Serialize, Default)]
pub(crate) struct LivePhase {
    /// Requests (events)/s asked of both sides.
    pub(crate) rate: f64,
    pub(crate) events: u64,
    pub(crate) warmup_seconds: f64,
    pub(crate) rounds: Vec<LiveRound>,
    /// Medians of each round's keyflight − bare figure.
    pub(crate) added_p50_ms: Option<f64>,
    pub(crate) added_p99_ms: Option<f64>,
}

#[derive(Serialize)]
pub(crate) struct LiveRound {
    pub(crate) bare_first: bool,
    pub(crate) bare: Option<LiveSide>,
    pub(crate) keyflight: Option<LiveSide>,
    pub(crate) added_p50_ms: Option<i64>,
    pub(crate) added_p99_ms: Option<i64>,
    pub(crate) failed: Option<String>,
}

#[derive(Serialize)]
pub(crate) struct LiveSide {
    /// The rate achieved: the bare loop's requests, or the driver's events.
    pub(crate) rate: f64,
    /// Events (requests) after the warm-up: the population of the percentiles.
    pub(crate) measured: usize,
    /// From the event's produce timestamp (keyflight) or the request's due
    /// time (the bare loop) to the call's arrival at the receiver, ms.
    pub(crate) latency: Option<Latency>,
    /// CPU time per call of the client process (the bare loop's whole run;
    /// keyflight's over the calls' window).
    pub(crate) client_cpu_us_per_call: f64,
    /// Share of the machine's CPU time busy over the calls' window, 0–1.
    pub(crate) machine_busy: f64,
}

#[derive(Serialize)]
pub(crate) struct CollapsePhase {
    pub(crate) events: u64,
    pub(crate) keys: u64,
    pub(crate) zipf: f64,
    pub(crate) burst: u32,
    /// The slow receiver's answer delay.
    pub(crate) delay_ms: u64,
    /// in_flight / delay: the most calls/s the HTTP sink can make to it.
    pub(crate) ceiling_calls_per_s: f64,
    /// The backlog through the Kafka sink, then the HTTP sink.
    pub(crate) backlog: Vec<SinkDrain>,
    /// A live stream of the same load at a fixed rate, through each sink.
    pub(crate) live: Vec<ZipfLive>,
}

/// keyflight on a live Zipf stream through one sink.
#[derive(Serialize)]
pub(crate) struct ZipfLive {
    pub(crate) sink: String,
    pub(crate) events: u64,
    /// Events/s the driver achieved.
    pub(crate) rate: f64,
    /// Pushes: records on the pushed topic, or calls answered 2xx.
    pub(crate) pushes: u64,
    /// Over the first to the last push.
    pub(crate) pushes_per_s: f64,
    /// Events per push.
    pub(crate) collapse: f64,
    /// keyflight's requests in flight (HTTP), the mean of readings.
    pub(crate) mean_in_flight: Option<f64>,
    /// keyflight's CPU time per event over the pushes' window.
    pub(crate) cpu_us_per_event: f64,
    /// Events after the warm-up.
    pub(crate) measured: usize,
    /// From the event's produce timestamp to the first push carrying it (or
    /// a later version): the pushed record's timestamp, or the call's
    /// arrival at the receiver.
    pub(crate) latency: Option<Latency>,
    pub(crate) verify: Option<bool>,
}

fn verdict(verify: Option<bool>) -> &'static str {
    match verify {
        Some(true) => ", verify PASS",
        Some(false) => ", verify FAIL",
        None => "",
    }
}

fn drain_line(d: &SinkDrain, what: &str) -> String {
    let mut request = d.request_ms.map_or(String::new(), |(p50, p99)| {
        format!("request p50 {p50:.2} ms, p99 {p99:.2} ms; ")
    });
    if let Some((p50, p99)) = d.push_ms {
        request.push_str(&format!("push p50 {p50} ms, p99 {p99} ms; "));
    }
    if let Some(changelog) = d.changelog_per_push {
        request.push_str(&format!("{changelog:.2} changelog records/push; "));
    }
    let in_flight = d
        .mean_in_flight
        .map_or(String::new(), |o| format!("in flight {o:.1}; "));
    let receiver = d
        .receiver_cpu_us_per_call
        .map_or(String::new(), |r| format!(", receiver {r:.1} us"));
    let other = if d.other_calls + d.overlaps > 0 || d.retries > 0.0 {
        format!(
            ", {} other calls, {} overlaps, {} retries",
            d.other_calls, d.overlaps, d.retries
        )
    } else {
        String::new()
    };
    format!(
        "{:>8.0} {what}/s ({request}{in_flight}CPU/call: client {:.1} us{receiver}, driver {:.1} us; machine {:.0}% busy{other}{})",
        d.calls_per_s,
        d.client_cpu_us_per_call,
        d.driver_cpu_us_per_call,
        d.machine_busy * 100.0,
        verdict(d.verify),
    )
}

pub(crate) fn print_http_report(r: &HttpReport) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "\n== keyflight-bench http: {} ({}), {} partitions, {} in flight ==\n\
         throughput: {} pushes over as many keys (one push each), receivers answering {}",
        r.label,
        r.broker,
        r.partitions,
        r.in_flight,
        r.pushes,
        match r.answer_ms {
            0 => "at once".to_string(),
            ms => format!("after {ms} ms"),
        }
    );
    for (i, round) in r.throughput.iter().enumerate() {
        let order = if round.bare_first {
            "(bare first)"
        } else {
            "(keyflight first)"
        };
        let _ = match (&round.bare, &round.keyflight, round.ratio) {
            (Some(bare), Some(keyflight), Some(ratio)) => writeln!(
                out,
                "  round {} {order}\n    bare loop  {}\n    keyflight  {}\n    ratio      {ratio:.2}",
                i + 1,
                drain_line(bare, "requests"),
                drain_line(keyflight, "pushes"),
            ),
            _ => writeln!(
                out,
                "  round {} {order} failed: {}",
                i + 1,
                round.failed.as_deref().unwrap_or("no figures")
            ),
        };
    }
    let _ = writeln!(
        out,
        "throughput keyflight/bare    {}   (median of the rounds; goal >= 0.80)",
        r.ratio.map_or("n/a".into(), |v| format!("{v:.2}"))
    );
    if let Some(reference) = &r.kafka_reference {
        let _ = writeln!(
            out,
            "the same pushes through the Kafka sink (no HTTP)\n    keyflight  {}",
            drain_line(reference, "pushes")
        );
    }
    if let Some(live) = &r.live {
        let _ = writeln!(
            out,
            "latency at {:.0}/s, {} per side and round (the first {} s left out): from the event's produce (keyflight) or the request's due time (bare loop) to the call's arrival",
            live.rate, live.events, live.warmup_seconds
        );
        let side = |s: &LiveSide| {
            s.latency.map_or("n/a".into(), |l| {
                format!(
                    "p50 {:>3} ms, p99 {:>4} ms, max {:>4} ms ({} of {} at {:.0}/s, CPU {:.1} us/call, machine {:.0}% busy)",
                    l.p50_ms,
                    l.p99_ms,
                    l.max_ms,
                    l.samples,
                    s.measured,
                    s.rate,
                    s.client_cpu_us_per_call,
                    s.machine_busy * 100.0
                )
            })
        };
        let ms = |v: Option<i64>| v.map_or("n/a".into(), |v| v.to_string());
        for (i, round) in live.rounds.iter().enumerate() {
            let order = if round.bare_first {
                "(bare first)"
            } else {
                "(keyflight first)"
            };
            let _ = match (&round.bare, &round.keyflight) {
                (Some(bare), Some(keyflight)) => writeln!(
                    out,
                    "  round {} {order}\n    bare loop  {}\n    keyflight  {}\n    added      p50 {} ms, p99 {} ms",
                    i + 1,
                    side(bare),
                    side(keyflight),
                    ms(round.added_p50_ms),
                    ms(round.added_p99_ms)
                ),
                _ => writeln!(
                    out,
                    "  round {} {order} failed: {}",
                    i + 1,
                    round.failed.as_deref().unwrap_or("no figures")
                ),
            };
        }
        let _ = writeln!(
            out,
            "added latency                p50 {} ms, p99 {} ms (median of the rounds)",
            live.added_p50_ms.map_or("n/a".into(), |v| v.to_string()),
            live.added_p99_ms.map_or("n/a".into(), |v| v.to_string())
        );
    }
    if let Some(c) = &r.collapse {
        let _ = writeln!(
            out,
            "collapse: {} events over {} keys (Zipf {}, bursts of {}); the slow receiver answers after {} ms (ceiling {:.0} calls/s)",
            c.events, c.keys, c.zipf, c.burst, c.delay_ms, c.ceiling_calls_per_s
        );
        for (d, sink) in c.backlog.iter().zip(["Kafka sink", "HTTP sink, slow"]) {
            let _ = writeln!(
                out,
                "  backlog, {sink:<16} {:>8.0} events/s, collapse {:.2} ({} pushes for {} keys): {}",
                d.events_per_s,
                d.collapse,
                d.calls,
                d.keys.map_or("?".into(), |k| k.to_string()),
                drain_line(d, "pushes")
            );
        }
        for l in &c.live {
            let latency = l.latency.map_or("n/a".into(), |l| {
                format!("event to push p50 {} ms, p99 {} ms", l.p50_ms, l.p99_ms)
            });
            let _ = writeln!(
                out,
                "  live at {:.0} events/s, {:<27} {:>8.0} pushes/s, collapse {:.2}, {latency}, CPU {:.2} us/event{}{}",
                l.rate,
                format!("{}:", l.sink),
                l.pushes_per_s,
                l.collapse,
                l.cpu_us_per_event,
                l.mean_in_flight
                    .map_or(String::new(), |o| format!(", in flight {o:.1}")),
                verdict(l.verify),
            );
        }
    }
}
