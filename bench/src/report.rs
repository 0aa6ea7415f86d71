//! The report: what a run measured, as JSON and as text.

use std::io::Write;

use serde::Serialize;

use crate::stats::Latency;

use crate::Reference;

// The report

#[derive(Serialize, Default)]
pub(crate) struct Report {
    pub(crate) label: String,
    pub(crate) broker: String,
    pub(crate) partitions: i32,
    pub(crate) events: u64,
    pub(crate) keys: u64,
    pub(crate) load_events_per_s: f64,
    pub(crate) copy: Drain,
    pub(crate) keyflight: Drain,
    pub(crate) throughput_ratio: f64,
    /// The copy on a live stream produced as fast as the driver can.
    pub(crate) live: Option<SystemLatency>,
    pub(crate) latency: LatencyPhase,
    pub(crate) scan: Scan,
    pub(crate) restore: Restore,
}

#[derive(Serialize, Default)]
pub(crate) struct Drain {
    pub(crate) events_per_s: f64,
    pub(crate) outputs: u64,
    pub(crate) outputs_per_s: f64,
    pub(crate) collapse: f64,
    pub(crate) peak_rss_mb: f64,
    /// Changelog records written per event (keyflight; 0 for the copy).
    pub(crate) changelog_per_event: f64,
    /// The process's CPU time (user + system, start to stop) per event
    /// consumed: its cost, steadier than a rate on this noisy machine.
    pub(crate) cpu_us_per_event: f64,
    pub(crate) verify: Option<bool>,
}

#[derive(Serialize, Default)]
pub(crate) struct LatencyPhase {
    pub(crate) target_rate: f64,
    /// The maximum rate `target_rate` is half of (`None`: `--latency-rate`).
    pub(crate) half_of: Option<Reference>,
    pub(crate) warmup_seconds: f64,
    /// Events produced into each system in each round.
    pub(crate) events: u64,
    pub(crate) rounds: Vec<LatencyRound>,
    /// Medians of each round's keyflight − copy figure, over the rounds
    /// that have it.
    pub(crate) added_p50_ms: Option<f64>,
    pub(crate) added_p99_ms: Option<f64>,
}

/// One round of the latency phase: the copy and keyflight, one after the other.
#[derive(Serialize)]
pub(crate) struct LatencyRound {
    pub(crate) copy_first: bool,
    /// `None` when the round failed.
    pub(crate) copy: Option<SystemLatency>,
    pub(crate) keyflight: Option<SystemLatency>,
    pub(crate) added_p50_ms: Option<i64>,
    pub(crate) added_p99_ms: Option<i64>,
    /// Why the round has no figures.
    pub(crate) failed: Option<String>,
}

#[derive(Serialize)]
pub(crate) struct SystemLatency {
    /// The rate the driver achieved, events/s.
    pub(crate) rate: f64,
    /// Events over the span from the first event's timestamp to the last
    /// output's: the rate through the whole pipeline.
    pub(crate) through_per_s: f64,
    /// The system's CPU time (user + system) from the first event to the
    /// last output, per event.
    pub(crate) cpu_us_per_event: f64,
    /// The driver's CPU time while it produced, per event: its generator
    /// and producer, and on the mock cluster the broker, which runs in it.
    pub(crate) driver_cpu_us_per_event: f64,
    /// Share of the machine's CPU time (all cores) that was busy while the
    /// driver produced, 0–1: near 1, threads wait for a core and the
    /// latencies are those of a saturated machine.
    pub(crate) machine_busy: f64,
    /// Events after the warm-up: the population of the percentiles.
    pub(crate) measured: usize,
    pub(crate) latency: Option<Latency>,
    /// keyflight only: p50 and p99 of its pushes' produce → acknowledgement
    /// time (bucket bounds of `keyflight_push_latency_seconds`), what an
    /// event arriving behind a push in flight waits before its own push.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) push_ack_ms: Option<(f64, f64)>,
}

#[derive(Serialize, Default)]
pub(crate) struct Scan {
    pub(crate) markers: u64,
    pub(crate) open: u64,
    pub(crate) open_scan_ms: f64,
    pub(crate) full_scan_ms: f64,
    /// One step of the `state.ttl` sweep (`EXPIRY_STEP` markers), mean
    /// over a walk of the whole store, and the whole walk.
    pub(crate) expiry_step_ms: f64,
    pub(crate) expiry_walk_ms: f64,
}

#[derive(Serialize, Default)]
pub(crate) struct Restore {
    pub(crate) markers: u64,
    pub(crate) seconds: f64,
    pub(crate) records_per_s: f64,
    pub(crate) start_to_ready_seconds: f64,
    pub(crate) peak_rss_mb: f64,
}

pub(crate) fn print_report(r: &Report) {
    let mut out = std::io::stdout().lock();
    let lat = |s: &SystemLatency| {
        s.latency.map_or("n/a".to_string(), |l| {
            let acks = s.push_ack_ms.map_or(String::new(), |(p50, p99)| {
                format!(", acks p50 <= {p50} ms, p99 <= {p99} ms")
            });
            format!(
                "p50 {:>3} ms, p99 {:>4} ms, CPU {:.2} us/event{acks}, driver {:.2} us/event, machine {:.0}% busy",
                l.p50_ms,
                l.p99_ms,
                s.cpu_us_per_event,
                s.driver_cpu_us_per_event,
                s.machine_busy * 100.0
            )
        })
    };
    let ms = |v: Option<i64>| v.map_or("n/a".into(), |v| v.to_string());
    let rounds: String = r
        .latency
        .rounds
        .iter()
        .enumerate()
        .map(|(i, round)| {
            let order = if round.copy_first {
                "(copy first)"
            } else {
                "(keyflight first)"
            };
            match (&round.copy, &round.keyflight) {
                (Some(copy), Some(keyflight)) => format!(
                    "\n  round {:<2} {order:<17} copy {}   keyflight {}   added p50 {} ms, p99 {} ms",
                    i + 1,
                    lat(copy),
                    lat(keyflight),
                    ms(round.added_p50_ms),
                    ms(round.added_p99_ms),
                ),
                _ => format!(
                    "\n  round {:<2} {order:<17} failed: {}",
                    i + 1,
                    round.failed.as_deref().unwrap_or("no figures")
                ),
            }
        })
        .collect();
    let _ = writeln!(
        out,
        "\n== keyflight-bench: {} ({}), {} partitions, {} events over {} keys ==\n\
         load (producer)              {:>12.0} events/s\n\
         bare copy                    {:>12.0} events/s   peak RSS {:.0} MB   CPU {:.2} us/event\n\
         keyflight                    {:>12.0} events/s   peak RSS {:.0} MB   CPU {:.2} us/event   {:.0} pushes/s   collapse {:.2}{}\n\
         throughput keyflight/copy    {:>12.2}           (target >= 0.80)\n\
         live maximum (copy)          {}\n\
         latency at {:.0}/s{}, {} events per system and round (the first {} s left out){}\n\
         added latency                p50 {} ms, p99 {} ms (median of the rounds)   (target p99 <= 5 ms)\n\
         compensation scan            {:.3} ms with {} open of {} (full scan {:.0} ms)   (target <= 5 ms)\n\
         expiry sweep (state.ttl)     {:.1} ms a step of {} markers, {:.0} ms a walk over all\n\
         restore                      {} markers in {:.2} s = {:.0} records/s (start to ready {:.1} s)   (target <= 10 s)\n\
         peak RSS with {} keys   {:.0} MB   (target <= 300 MB)",
        r.label,
        r.broker,
        r.partitions,
        r.events,
        r.keys,
        r.load_events_per_s,
        r.copy.events_per_s,
        r.copy.peak_rss_mb,
        r.copy.cpu_us_per_event,
        r.keyflight.events_per_s,
        r.keyflight.peak_rss_mb,
        r.keyflight.cpu_us_per_event,
        r.keyflight.outputs_per_s,
        r.keyflight.collapse,
        match r.keyflight.verify {
            Some(true) => "   verify PASS",
            Some(false) => "   verify FAIL",
            None => "",
        },
        r.throughput_ratio,
        r.live.as_ref().map_or("n/a".into(), |l| format!(
            "{:>12.0} events/s   (while this process produced as fast as it could: {:.0} events/s; machine {:.0}% busy)",
            l.through_per_s,
            l.rate,
            l.machine_busy * 100.0
        )),
        r.latency.target_rate,
        match r.latency.half_of {
            Some(Reference::Live) => " (half the live maximum)",
            Some(Reference::Drain) => " (half the copy's backlog rate)",
            None => "",
        },
        r.latency.events,
        r.latency.warmup_seconds,
        rounds,
        r.latency.added_p50_ms.map_or("n/a".into(), |v| v.to_string()),
        r.latency.added_p99_ms.map_or("n/a".into(), |v| v.to_string()),
        r.scan.open_scan_ms,
        r.scan.open,
        r.scan.markers,
        r.scan.full_scan_ms,
        r.scan.expiry_step_ms,
        keyflight::processor::task::core::EXPIRY_STEP,
        r.scan.expiry_walk_ms,
        r.restore.markers,
        r.restore.seconds,
        r.restore.records_per_s,
        r.restore.start_to_ready_seconds,
        r.restore.markers,
        r.restore.peak_rss_mb,
    );
}
