//! `keyflight-bench http`: the HTTP sink (`sink.kind = "http"`) against a
//! bare HTTP client loop, and its collapse behind a slow receiver.
//!
//! 1. Throughput, in rounds (which side goes first alternates): a bare
//!    client loop (`keyflight-bench post`, its own process) posts N bodies,
//!    one per key, to a fresh `keyflight receive` with `in_flight` requests
//!    at once; keyflight drains a backlog of the same N events (one per
//!    key, so one push each) through the HTTP sink, `max_in_flight =
//!    in_flight`, to another fresh receiver. Both are measured the same
//!    way, from the receiver's log: calls answered over the window from the
//!    first call's arrival to the last one's answer, with each process's
//!    CPU time over that window (sampled every 50 ms). The ratio of each
//!    round is keyflight over the bare loop of that round. Once, keyflight
//!    also drains the same events through the Kafka sink: what its pipeline
//!    costs per push without HTTP.
//! 2. Live latency, in rounds: at half the slower side's median rate, the
//!    bare loop sends request i at its due time (start + i/rate), and the
//!    driver produces event i at that pace into keyflight. The latency is
//!    from the request's due time, or the event's produce timestamp, to the
//!    call's arrival at the receiver (its log's `start_ns`); keyflight's
//!    added latency is the difference of the two.
//! 3. Collapse: the load generator's Zipf backlog drained by keyflight with
//!    the Kafka sink, then through the HTTP sink to a receiver answering
//!    every call after `delay_ms`: events per push (per call) of each; then
//!    the same load as a live stream at `collapse_rate`, through each sink:
//!    collapse, pushes/s, and each event's latency to the first push that
//!    carries it.
//!
//! `--verify` runs `keyflight verify` over every keyflight drain (with
//! `--http-log` on the receiver's log for the HTTP sink).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use clap::Args;
use keyflight::config::SinkKind;
use keyflight::loadgen::{Generator, LoadEvent, LoadSpec};
use keyflight::metrics::scrape::{http_get, Scrape};
use keyflight::receive::{read_log, CallRecord};

use crate::http_report::*;
use crate::post::{self, now_ns, PostResult};
use crate::{
    drain_limit, histogram_ms, is_drained, machine_cpu_ticks, path_str, print_http_report,
    process_cpu_seconds, produce_events, push_ack_ms, read_consumer, records_with, say, scrape,
    sibling, stats, versions, window, App, Child, Cluster, Env, Fetch, Result, WorkDir,
};

#[derive(Args)]
pub(crate) struct HttpArgs {
    /// Broker to use; without it an in-process mock cluster (librdkafka's)
    #[arg(long)]
    pub(crate) brokers: Option<String>,
    /// Name of this run in the report
    #[arg(long, default_value = "http")]
    pub(crate) label: String,
    /// Pushes in each throughput measurement: events over as many keys,
    /// one each
    #[arg(long, default_value_t = 200_000)]
    pub(crate) pushes: u64,
    /// Requests in flight at once: the bare loop's concurrency and
    /// keyflight's sink.http.max_in_flight
    #[arg(long, default_value_t = 64)]
    pub(crate) in_flight: usize,
    /// How long the throughput phase's receivers wait before answering each
    /// call, ms, for both sides. At 0 both sides are bound by CPU per
    /// request on this machine; an endpoint that takes a while to answer
    /// bounds both by `in_flight` instead
    #[arg(long, default_value_t = 0)]
    pub(crate) answer_ms: u64,
    /// Rounds of the throughput and the latency phases, each measuring the
    /// bare loop and keyflight once (which goes first alternates)
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) rounds: u32,
    /// Seconds of load in each latency measurement; 0 skips the phase
    #[arg(long, default_value_t = 10.0)]
    pub(crate) latency_seconds: f64,
    /// Requests (events)/s in the latency phase instead of half the slower
    /// side's median throughput
    #[arg(long)]
    pub(crate) latency_rate: Option<f64>,
    /// Seconds at the start of each latency measurement left out of its
    /// figures (connections, fetch sessions)
    #[arg(long, default_value_t = 1.0)]
    pub(crate) warmup_seconds: f64,
    /// Events of the collapse phase's Zipf backlog; 0 skips the phase
    #[arg(long, default_value_t = 1_000_000)]
    pub(crate) events: u64,
    #[arg(long, default_value_t = 100_000)]
    pub(crate) keys: u64,
    #[arg(long, default_value_t = 1.0)]
    pub(crate) zipf: f64,
    /// Events per key back to back
    #[arg(long, default_value_t = 4)]
    pub(crate) burst: u32,
    /// How long the collapse phase's receiver waits before answering each
    /// call, ms
    #[arg(long, default_value_t = 20)]
    pub(crate) delay_ms: u64,
    /// Events/s of the collapse phase's live stream (the same Zipf load
    /// produced while each sink runs); 0 skips it
    #[arg(long, default_value_t = 20_000.0)]
    pub(crate) collapse_rate: f64,
    /// Seconds of the collapse phase's live stream
    #[arg(long, default_value_t = 10.0)]
    pub(crate) collapse_seconds: f64,
    #[arg(long, default_value_t = 12)]
    pub(crate) partitions: i32,
    /// Also run `keyflight verify` over every keyflight drain
    #[arg(long)]
    pub(crate) verify: bool,
    #[command(flatten)]
    pub(crate) fetch: Fetch,
    /// Write the report as JSON here too
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
}

pub(crate) fn run(args: HttpArgs) -> Result<()> {
    let cluster = Cluster::new(args.brokers.as_deref())?;
    let work = WorkDir::new()?;
    let env = Env {
        cluster: &cluster,
        partitions: args.partitions,
        fetch: args.fetch,
        work: work.path(),
    };
    let mut report = HttpReport {
        label: args.label.clone(),
        broker: cluster.describe(),
        partitions: args.partitions,
        in_flight: args.in_flight,
        pushes: args.pushes,
        answer_ms: args.answer_ms,
        ..HttpReport::default()
    };
    let http = Sink::Http {
        delay_ms: args.answer_ms,
        in_flight: args.in_flight,
    };
    let distinct = |n: u64| (0..n).map(post::event);

    // 1. Throughput.
    for round in 1..=args.rounds {
        let bare_first = round % 2 == 1;
        let bare = || {
            say(&format!(
                "throughput, round {round} of {}: the bare loop, {} requests, {} in flight",
                args.rounds, args.pushes, args.in_flight
            ));
            bare_drain(&env, round, args.pushes, args.in_flight, args.answer_ms)
        };
        let keyflight = || {
            say(&format!(
                "throughput, round {round} of {}: keyflight, {} pushes, max_in_flight {}",
                args.rounds, args.pushes, args.in_flight
            ));
            let name = format!("ht-kf-{round}");
            backlog(
                &env,
                &name,
                http,
                distinct(args.pushes),
                args.pushes,
                args.verify,
            )
        };
        let measured = if bare_first {
            bare().and_then(|b| Ok((b, keyflight()?)))
        } else {
            keyflight().and_then(|k| Ok((bare()?, k)))
        };
        report.throughput.push(match measured {
            Ok((bare, keyflight)) => HttpRound {
                bare_first,
                ratio: Some(keyflight.calls_per_s / bare.calls_per_s),
                bare: Some(bare),
                keyflight: Some(keyflight),
                failed: None,
            },
            Err(e) => {
                say(&format!("throughput, round {round} failed: {e}"));
                HttpRound {
                    bare_first,
                    bare: None,
                    keyflight: None,
                    ratio: None,
                    failed: Some(first_line(&e)),
                }
            }
        });
    }
    let of_rounds = |figure: fn(&HttpRound) -> Option<f64>| {
        median(
            &report
                .throughput
                .iter()
                .filter_map(figure)
                .collect::<Vec<_>>(),
        )
    };
    report.ratio = of_rounds(|r| r.ratio);
    let bare_rate = of_rounds(|r| Some(r.bare.as_ref()?.calls_per_s));
    let keyflight_rate = of_rounds(|r| Some(r.keyflight.as_ref()?.calls_per_s));
    say(&format!(
        "throughput, reference: keyflight, {} pushes through the Kafka sink",
        args.pushes
    ));
    report.kafka_reference = backlog(
        &env,
        "ht-kafka",
        Sink::Kafka,
        distinct(args.pushes),
        args.pushes,
        args.verify,
    )
    .map_err(|e| say(&format!("the Kafka sink's reference failed: {e}")))
    .ok();

    // 2. Live latency.
    let rate = args
        .latency_rate
        .or(match (bare_rate, keyflight_rate) {
            (Some(b), Some(k)) => Some(b.min(k) / 2.0),
            _ => None,
        })
        .filter(|_| args.latency_seconds > 0.0);
    if let Some(rate) = rate {
        let events = ((rate * args.latency_seconds) as u64).max(1_000);
        let warmup = Duration::from_secs_f64(args.warmup_seconds);
        let mut live = LivePhase {
            rate,
            events,
            warmup_seconds: args.warmup_seconds,
            ..LivePhase::default()
        };
        for round in 1..=args.rounds {
            let bare_first = round % 2 == 1;
            let bare = || {
                say(&format!(
                    "latency, round {round} of {}: the bare loop, {events} requests at {rate:.0}/s",
                    args.rounds
                ));
                live_bare(&env, round, events, rate, warmup, args.in_flight)
            };
            let keyflight = || {
                say(&format!(
                    "latency, round {round} of {}: keyflight, {events} events at {rate:.0}/s",
                    args.rounds
                ));
                live_keyflight(&env, round, events, rate, warmup, args.in_flight)
            };
            let measured = if bare_first {
                bare().and_then(|b| Ok((b, keyflight()?)))
            } else {
                keyflight().and_then(|k| Ok((bare()?, k)))
            };
            live.rounds.push(match measured {
                Ok((bare, keyflight)) => {
                    let added = |figure: fn(&stats::Latency) -> i64| {
                        Some(figure(keyflight.latency.as_ref()?) - figure(bare.latency.as_ref()?))
                    };
                    LiveRound {
                        bare_first,
                        added_p50_ms: added(|l| l.p50_ms),
                        added_p99_ms: added(|l| l.p99_ms),
                        bare: Some(bare),
                        keyflight: Some(keyflight),
                        failed: None,
                    }
                }
                Err(e) => {
                    say(&format!("latency, round {round} failed: {e}"));
                    LiveRound {
                        bare_first,
                        bare: None,
                        keyflight: None,
                        added_p50_ms: None,
                        added_p99_ms: None,
                        failed: Some(first_line(&e)),
                    }
                }
            });
        }
        let of_rounds = |figure: fn(&LiveRound) -> Option<i64>| {
            stats::median(&live.rounds.iter().filter_map(figure).collect::<Vec<_>>())
        };
        live.added_p50_ms = of_rounds(|r| r.added_p50_ms);
        live.added_p99_ms = of_rounds(|r| r.added_p99_ms);
        report.live = Some(live);
    }

    // 3. Collapse behind a slow receiver, beside the Kafka sink's.
    if args.events > 0 {
        let spec = |events| LoadSpec {
            events,
            keys: args.keys,
            zipf: Some(args.zipf),
            burst: args.burst,
            seed: 7,
        };
        let zipf = |events| Generator::new(spec(events)).map_err(|e| e.to_string());
        let slow = Sink::Http {
            delay_ms: args.delay_ms,
            in_flight: args.in_flight,
        };
        let mut collapse = CollapsePhase {
            events: args.events,
            keys: args.keys,
            zipf: args.zipf,
            burst: args.burst,
            delay_ms: args.delay_ms,
            ceiling_calls_per_s: args.in_flight as f64 * 1000.0 / args.delay_ms.max(1) as f64,
            backlog: Vec::new(),
            live: Vec::new(),
        };
        for (name, sink) in [("hz-kafka", Sink::Kafka), ("hz-http", slow)] {
            say(&format!(
                "collapse: a backlog of {} events over {} keys through the {}",
                args.events,
                args.keys,
                sink.describe()
            ));
            collapse.backlog.push(backlog(
                &env,
                name,
                sink,
                zipf(args.events)?,
                args.events,
                args.verify,
            )?);
        }
        if args.collapse_rate > 0.0 {
            let events = ((args.collapse_rate * args.collapse_seconds) as u64).max(1_000);
            let warmup = Duration::from_secs_f64(args.warmup_seconds);
            for (name, sink) in [("hzl-kafka", Sink::Kafka), ("hzl-http", slow)] {
                say(&format!(
                    "collapse, live: {events} events at {:.0}/s through the {}",
                    args.collapse_rate,
                    sink.describe()
                ));
                collapse.live.push(live_zipf(
                    &env,
                    name,
                    sink,
                    zipf(events)?,
                    events,
                    args.collapse_rate,
                    warmup,
                    args.verify,
                )?);
            }
        }
        report.collapse = Some(collapse);
    }

    print_http_report(&report);
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

fn first_line(error: &str) -> String {
    let line = error.lines().next().unwrap_or_default();
    line.trim_end_matches(':').to_string()
}

/// The median of `values` (the mean of the middle two); `None` if empty.
pub(crate) fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// Where keyflight's pushes go in a measurement.
#[derive(Clone, Copy)]
enum Sink {
    /// The pushed topic.
    Kafka,
    /// A fresh receiver answering after `delay_ms`, `in_flight` requests at
    /// most (sink.http.max_in_flight).
    Http { delay_ms: u64, in_flight: usize },
}

impl Sink {
    fn describe(self) -> String {
        match self {
            Sink::Kafka => "Kafka sink".into(),
            Sink::Http { delay_ms: 0, .. } => "HTTP sink".into(),
            Sink::Http { delay_ms, .. } => format!("HTTP sink, receiver {delay_ms} ms"),
        }
    }

    /// The receiver the sink needs, started.
    fn receiver(self, work: &Path, name: &str) -> Result<Option<Receiver>> {
        match self {
            Sink::Kafka => Ok(None),
            Sink::Http { delay_ms, .. } => Receiver::start(work, name, delay_ms).map(Some),
        }
    }

    /// An app whose keyflight pushes through this sink (to `receiver`).
    fn app(self, env: &Env, name: &str, receiver: Option<&Receiver>) -> Result<App> {
        App::create_with(env, name, |settings| {
            if let (Sink::Http { in_flight, .. }, Some(receiver)) = (self, receiver) {
                settings.sink.kind = SinkKind::Http;
                settings.sink.http.url = receiver.url();
                settings.sink.http.max_in_flight = in_flight;
            }
        })
    }
}

// ---------------------------------------------------------------------------
// The receiver

/// A `keyflight receive` child logging every call to a file.
struct Receiver {
    child: Child,
    /// host:port
    addr: String,
    log: PathBuf,
}

impl Receiver {
    fn start(work: &Path, name: &str, delay_ms: u64) -> Result<Receiver> {
        let log = work.join(format!("{name}.calls.jsonl"));
        let mut command = Command::new(sibling("keyflight")?);
        command.args([
            "receive",
            "--listen",
            "127.0.0.1:0",
            "--log",
            path_str(&log)?,
        ]);
        if delay_ms > 0 {
            command.args(["--delay", &format!("{delay_ms}ms")]);
        }
        let mut child = Child::spawn(&mut command, &work.join(format!("{name}.receive.log")))?;
        let addr = child.wait(Duration::from_secs(30), |c| {
            c.log()
                .lines()
                .find_map(|l| l.strip_prefix("listening on http://"))
                .map(|addr| addr.trim().to_string())
        })?;
        Ok(Receiver { child, addr, log })
    }

    fn url(&self) -> String {
        format!("http://{}/push/{{key}}", self.addr)
    }

    fn pid(&self) -> u32 {
        self.child.child.id()
    }

    /// Stops it; its calls, from its log.
    fn finish(self) -> Result<Vec<CallRecord>> {
        self.child.stop()?;
        read_log(&self.log)
    }
}

/// Removes a receiver's log once read and verified (about 350 bytes a
/// call), unless BENCH_KEEP_WORKDIR keeps the work directory for a look.
fn discard(log: &Path) {
    if std::env::var_os("BENCH_KEEP_WORKDIR").is_none() {
        let _ = std::fs::remove_file(log);
    }
}

/// A receiver's log, counted.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Calls {
    /// Answered 2xx: pushes.
    pub(crate) ok: u64,
    pub(crate) other: u64,
    pub(crate) overlaps: u64,
    /// The first call's arrival and the last one's answer, ns.
    pub(crate) first_ns: u64,
    pub(crate) last_ns: u64,
}

impl Calls {
    pub(crate) fn of(records: &[CallRecord]) -> Calls {
        let mut calls = Calls {
            first_ns: u64::MAX,
            ..Calls::default()
        };
        for record in records {
            if (200..300).contains(&record.status) {
                calls.ok += 1;
            } else {
                calls.other += 1;
            }
            calls.overlaps += u64::from(record.overlapped);
            calls.first_ns = calls.first_ns.min(record.start_ns);
            calls.last_ns = calls.last_ns.max(record.end_ns);
        }
        calls.first_ns = calls.first_ns.min(calls.last_ns);
        calls
    }

    /// 2xx calls per second over the window (at least 1 ms).
    pub(crate) fn per_s(&self) -> f64 {
        let seconds = (self.last_ns.saturating_sub(self.first_ns) as f64 / 1e9).max(1e-3);
        self.ok as f64 / seconds
    }
}

// ---------------------------------------------------------------------------
// CPU over a window

/// One reading of the processes' CPU times (seconds) and the machine's.
struct Sample {
    at_ns: u64,
    client: f64,
    receiver: f64,
    driver: f64,
    machine: (u64, u64),
    /// keyflight's `keyflight_http_requests_in_flight`, when scraped.
    in_flight: Option<f64>,
}

impl Sample {
    fn now(client: Option<u32>, receiver: Option<u32>) -> Sample {
        let cpu = |pid: Option<u32>| pid.map_or(0.0, |pid| process_cpu_seconds(&pid.to_string()));
        Sample {
            at_ns: now_ns(),
            client: cpu(client),
            receiver: cpu(receiver),
            driver: process_cpu_seconds("self"),
            machine: machine_cpu_ticks(),
            in_flight: None,
        }
    }
}

/// Readings every 50 ms over a measurement, so that its figures cover the
/// window of its calls only (not keyflight's start, restore, or stop).
struct Probe {
    receiver: Option<u32>,
    samples: Vec<Sample>,
}

/// What the processes used over a window.
struct Used {
    client: f64,
    receiver: f64,
    driver: f64,
    machine_busy: f64,
    mean_in_flight: Option<f64>,
}

impl Probe {
    /// Starts with a reading before the client runs.
    fn new(receiver: Option<u32>) -> Probe {
        Probe {
            receiver,
            samples: vec![Sample::now(None, receiver)],
        }
    }

    /// Reads every 50 ms until `done` (asked every 250 ms, with the reading
    /// it may add to) says so, or `limit` passes.
    fn watch(
        &mut self,
        client: u32,
        limit: Duration,
        mut done: impl FnMut(&mut Sample) -> Result<bool>,
    ) -> Result<()> {
        let deadline = Instant::now() + limit;
        for tick in 0u64.. {
            let mut sample = Sample::now(Some(client), self.receiver);
            let finished = tick % 5 == 0 && done(&mut sample)?;
            self.samples.push(sample);
            if finished {
                // `done` may have taken a while (a scrape of a busy
                // keyflight): a reading after what it saw.
                self.samples.push(Sample::now(Some(client), self.receiver));
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("not done within {limit:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        unreachable!("the loop returns")
    }

    /// From the last reading at or before `first_ns` to the first at or
    /// after `last_ns`.
    fn used(&self, first_ns: u64, last_ns: u64) -> Used {
        let samples = &self.samples;
        let from = samples
            .iter()
            .rev()
            .find(|s| s.at_ns <= first_ns)
            .unwrap_or(&samples[0]);
        let to = samples
            .iter()
            .find(|s| s.at_ns >= last_ns)
            .unwrap_or(&samples[samples.len() - 1]);
        let in_flight: Vec<f64> = samples
            .iter()
            .filter(|s| (first_ns..=last_ns).contains(&s.at_ns))
            .filter_map(|s| s.in_flight)
            .collect();
        Used {
            client: to.client - from.client,
            receiver: to.receiver - from.receiver,
            driver: to.driver - from.driver,
            machine_busy: stats::busy_share(from.machine, to.machine),
            mean_in_flight: (!in_flight.is_empty())
                .then(|| in_flight.iter().sum::<f64>() / in_flight.len() as f64),
        }
    }
}

// ---------------------------------------------------------------------------
// The bare loop

/// Runs `keyflight-bench post` to the receiver until it exits.
fn post(
    env: &Env,
    receiver: &Receiver,
    name: &str,
    requests: u64,
    in_flight: usize,
    rate: Option<f64>,
) -> Result<(PostResult, Probe)> {
    let out = env.work.join(format!("{name}.post.json"));
    let mut command = Command::new(std::env::current_exe().map_err(|e| e.to_string())?);
    command.args([
        "post",
        "--url",
        &receiver.url(),
        "--requests",
        &requests.to_string(),
        "--in-flight",
        &in_flight.to_string(),
        "--out",
        path_str(&out)?,
    ]);
    if let Some(rate) = rate {
        command.args(["--rate", &rate.to_string()]);
    }
    let mut probe = Probe::new(Some(receiver.pid()));
    let mut child = Child::spawn(&mut command, &env.work.join(format!("{name}.post.log")))?;
    let pid = child.child.id();
    probe.watch(pid, drain_limit(requests), |_| {
        match child.child.try_wait().map_err(|e| e.to_string())? {
            Some(status) if status.success() => Ok(true),
            Some(status) => Err(format!(
                "the bare loop exited with {status}:\n{}",
                child.log()
            )),
            None => Ok(false),
        }
    })?;
    let text = std::fs::read_to_string(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let result: PostResult = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    if result.failed > 0 {
        return Err(format!(
            "the bare loop: {} of {} requests failed, the first: {}",
            result.failed,
            result.requests,
            result.first_error.as_deref().unwrap_or("?")
        ));
    }
    Ok((result, probe))
}

fn bare_drain(
    env: &Env,
    round: u32,
    requests: u64,
    in_flight: usize,
    answer_ms: u64,
) -> Result<SinkDrain> {
    let name = format!("ht-bare-{round}");
    let receiver = Receiver::start(env.work, &name, answer_ms)?;
    let (result, probe) = post(env, &receiver, &name, requests, in_flight, None)?;
    let log = receiver.log.clone();
    let calls = Calls::of(&receiver.finish()?);
    discard(&log);
    let used = probe.used(calls.first_ns, calls.last_ns);
    let per_call = |seconds: f64| seconds * 1e6 / calls.ok.max(1) as f64;
    Ok(SinkDrain {
        calls: calls.ok,
        other_calls: calls.other,
        overlaps: calls.overlaps,
        calls_per_s: calls.per_s(),
        events: requests,
        keys: Some(requests),
        collapse: 1.0,
        events_per_s: calls.per_s(),
        // Every worker sends its next request once its last is answered.
        mean_in_flight: Some(in_flight as f64),
        request_ms: result
            .latency_us
            .map(|(p50, p99, _)| (p50 as f64 / 1e3, p99 as f64 / 1e3)),
        push_ms: None,
        changelog_per_push: None,
        retries: 0.0,
        // The process lives for about the window: all of its CPU time.
        client_cpu_us_per_call: per_call(result.cpu_seconds),
        receiver_cpu_us_per_call: Some(per_call(used.receiver)),
        driver_cpu_us_per_call: per_call(used.driver),
        machine_busy: used.machine_busy,
        verify: None,
    })
}

// ---------------------------------------------------------------------------
// keyflight

/// keyflight drains a backlog of `events` (`count` of them) through `sink`.
fn backlog(
    env: &Env,
    name: &str,
    sink: Sink,
    events: impl Iterator<Item = LoadEvent>,
    count: u64,
    verify: bool,
) -> Result<SinkDrain> {
    let receiver = sink.receiver(env.work, name)?;
    let app = sink.app(env, name, receiver.as_ref())?;
    let loaded = produce_events(&app, events, None)?;
    Ok(SinkDrain {
        keys: Some(loaded.keys),
        ..drain(&app, receiver, count, verify)?
    })
}

/// Starts keyflight and waits until it drained `events`, reading the
/// processes' CPU meanwhile. With `live` (events and a rate), it waits until
/// keyflight is ready and produces them while it runs. Returns the last
/// metrics, the readings, and the rate the driver achieved.
fn run_keyflight<E: Iterator<Item = LoadEvent> + Send>(
    app: &App,
    receiver: Option<&Receiver>,
    events: u64,
    live: Option<(E, f64)>,
) -> Result<(Scrape, Probe, Option<f64>)> {
    let mut kf = app.keyflight(&app.state.with_extension("keyflight.log"))?;
    let addr = kf.metrics_addr()?;
    if live.is_some() {
        kf.wait(Duration::from_secs(120), |_| {
            http_get(&addr, "/readyz").ok().filter(|(s, _)| *s == 200)
        })?;
    }
    let mut probe = Probe::new(receiver.map(Receiver::pid));
    let pid = kf.child.id();
    let (metrics, achieved) = std::thread::scope(|scope| {
        let producer =
            live.map(|(events, rate)| scope.spawn(move || produce_events(app, events, Some(rate))));
        let mut last = None;
        probe.watch(pid, drain_limit(events), |sample| {
            if let Some(status) = kf.child.try_wait().map_err(|e| e.to_string())? {
                return Err(format!("keyflight exited with {status}:\n{}", kf.log()));
            }
            let Ok(metrics) = scrape(&addr) else {
                return Ok(false);
            };
            sample.in_flight = Some(metrics.sum("keyflight_http_requests_in_flight", &[]));
            let produced = producer.as_ref().is_none_or(|p| p.is_finished());
            let done = produced && is_drained(&metrics, events);
            last = Some(metrics);
            Ok(done)
        })?;
        let achieved = producer
            .map(|p| p.join().map_err(|_| "the producer panicked".to_string())?)
            .transpose()?
            .map(|loaded| loaded.rate());
        Ok::<_, String>((last.expect("drained by a scrape"), achieved))
    })?;
    kf.stop()?;
    Ok((metrics, probe, achieved))
}

/// keyflight drains the app's backlog of `events` through its sink (to
/// `receiver` for the HTTP sink); figures over the pushes' window.
fn drain(app: &App, receiver: Option<Receiver>, events: u64, verify: bool) -> Result<SinkDrain> {
    let (metrics, probe, _) = run_keyflight(
        app,
        receiver.as_ref(),
        events,
        None::<(std::iter::Empty<_>, f64)>,
    )?;
    let (calls, log) = match receiver {
        Some(receiver) => {
            let log = receiver.log.clone();
            (Calls::of(&receiver.finish()?), Some(log))
        }
        None => {
            let topic = &app.settings.topics.pushed;
            let pushes = records_with(&read_consumer(app)?, topic)?;
            let (first, last) = window(app, topic)?;
            let ns = |ms: i64| ms as u64 * 1_000_000;
            let calls = Calls {
                ok: pushes,
                first_ns: ns(first),
                // The last push's timestamp is its produce; its window
                // ends with that millisecond.
                last_ns: ns(last + 1),
                ..Calls::default()
            };
            (calls, None)
        }
    };
    let used = probe.used(calls.first_ns, calls.last_ns);
    let changelog = records_with(&read_consumer(app)?, &app.settings.changelog_topic())?;
    let verified = verify
        .then(|| run_verify(app, log.as_deref()))
        .transpose()?;
    if let Some(log) = &log {
        discard(log);
    }
    let per_call = |seconds: f64| seconds * 1e6 / calls.ok.max(1) as f64;
    let http = log.is_some();
    Ok(SinkDrain {
        calls: calls.ok,
        other_calls: calls.other,
        overlaps: calls.overlaps,
        calls_per_s: calls.per_s(),
        events,
        keys: None,
        collapse: events as f64 / calls.ok.max(1) as f64,
        events_per_s: events as f64 * calls.per_s() / calls.ok.max(1) as f64,
        mean_in_flight: used.mean_in_flight.filter(|_| http),
        request_ms: histogram_ms(
            &metrics,
            "keyflight_http_request_duration_seconds_bucket",
            &[],
        ),
        push_ms: push_ack_ms(&metrics),
        changelog_per_push: Some(changelog as f64 / calls.ok.max(1) as f64),
        retries: metrics.sum("keyflight_http_retries_total", &[]),
        client_cpu_us_per_call: per_call(used.client),
        receiver_cpu_us_per_call: http.then(|| per_call(used.receiver)),
        driver_cpu_us_per_call: per_call(used.driver),
        machine_busy: used.machine_busy,
        verify: verified,
    })
}

/// `keyflight verify` over the app's input and its pushes: the pushed
/// topic, or the receiver's log.
fn run_verify(app: &App, http_log: Option<&Path>) -> Result<bool> {
    let mut command = Command::new(sibling("keyflight")?);
    command.args(["--config", path_str(&app.config)?, "verify"]);
    if let Some(log) = http_log {
        command.args(["--http-log", path_str(log)?]);
    }
    let out = command
        .env_remove("RUST_LOG")
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        say(&format!(
            "verify failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(out.status.success())
}

// ---------------------------------------------------------------------------
// Live latency

/// The calls answered 2xx as (key, version, arrival ms): the outputs that
/// [`stats::latencies`] matches events to.
fn arrivals(records: &[CallRecord]) -> Vec<(String, u64, i64)> {
    records
        .iter()
        .filter(|r| (200..300).contains(&r.status))
        .filter_map(|r| Some((r.key.clone()?, r.version?, (r.start_ns / 1_000_000) as i64)))
        .collect()
}

fn live_bare(
    env: &Env,
    round: u32,
    events: u64,
    rate: f64,
    warmup: Duration,
    in_flight: usize,
) -> Result<LiveSide> {
    let name = format!("hl-bare-{round}");
    let receiver = Receiver::start(env.work, &name, 0)?;
    let (result, probe) = post(env, &receiver, &name, events, in_flight, Some(rate))?;
    let log = receiver.log.clone();
    let records = receiver.finish()?;
    discard(&log);
    let calls = Calls::of(&records);
    // Request i was due at start + i/rate: its "produce timestamp", in ms
    // as a Kafka timestamp is.
    let due_ms = |i: u64| ((result.start_wall_ns as f64 + i as f64 * 1e9 / rate) / 1e6) as i64;
    let start = due_ms(0);
    let inputs: Vec<(String, u64, i64)> = (0..events)
        .map(|i| (post::event(i).key, 1, due_ms(i)))
        .filter(|(_, _, due)| *due >= start + warmup.as_millis() as i64)
        .collect();
    Ok(LiveSide {
        rate: events as f64 / result.seconds.max(1e-9),
        measured: inputs.len(),
        latency: stats::latencies(&inputs, &arrivals(&records)),
        client_cpu_us_per_call: result.cpu_seconds * 1e6 / events as f64,
        machine_busy: probe.used(calls.first_ns, calls.last_ns).machine_busy,
    })
}

fn live_keyflight(
    env: &Env,
    round: u32,
    events: u64,
    rate: f64,
    warmup: Duration,
    in_flight: usize,
) -> Result<LiveSide> {
    let name = format!("hl-kf-{round}");
    let sink = Sink::Http {
        delay_ms: 0,
        in_flight,
    };
    let receiver = sink.receiver(env.work, &name)?.expect("an HTTP sink");
    let app = sink.app(env, &name, Some(&receiver))?;
    let stream = (0..events).map(post::event);
    let (_, probe, achieved) = run_keyflight(&app, Some(&receiver), events, Some((stream, rate)))?;
    let log = receiver.log.clone();
    let records = receiver.finish()?;
    discard(&log);
    let calls = Calls::of(&records);
    let used = probe.used(calls.first_ns, calls.last_ns);
    let mut inputs = versions(&app, &app.settings.topics.input)?;
    let start = inputs.iter().map(|(_, _, ts)| *ts).min().unwrap_or(0);
    inputs.retain(|(_, _, ts)| *ts >= start + warmup.as_millis() as i64);
    Ok(LiveSide {
        rate: achieved.unwrap_or_default(),
        measured: inputs.len(),
        latency: stats::latencies(&inputs, &arrivals(&records)),
        client_cpu_us_per_call: used.client * 1e6 / calls.ok.max(1) as f64,
        machine_busy: used.machine_busy,
    })
}

/// keyflight on a live Zipf stream (`events`, `count` of them) at `rate`
/// through `sink`: pushes, collapse, and each event's latency to the first
/// push carrying it.
#[allow(clippy::too_many_arguments)]
fn live_zipf(
    env: &Env,
    name: &str,
    sink: Sink,
    events: impl Iterator<Item = LoadEvent> + Send,
    count: u64,
    rate: f64,
    warmup: Duration,
    verify: bool,
) -> Result<ZipfLive> {
    let receiver = sink.receiver(env.work, name)?;
    let app = sink.app(env, name, receiver.as_ref())?;
    let (_, probe, achieved) = run_keyflight(&app, receiver.as_ref(), count, Some((events, rate)))?;
    let mut inputs = versions(&app, &app.settings.topics.input)?;
    let (outputs, log) = match receiver {
        Some(receiver) => {
            let log = receiver.log.clone();
            (arrivals(&receiver.finish()?), Some(log))
        }
        None => (versions(&app, &app.settings.topics.pushed)?, None),
    };
    let verified = verify
        .then(|| run_verify(&app, log.as_deref()))
        .transpose()?;
    if let Some(log) = &log {
        discard(log);
    }
    let start = inputs.iter().map(|(_, _, ts)| *ts).min().unwrap_or(0);
    let (first, last) = (
        outputs.iter().map(|(_, _, ts)| *ts).min().unwrap_or(0),
        outputs.iter().map(|(_, _, ts)| *ts).max().unwrap_or(0),
    );
    let ns = |ms: i64| ms as u64 * 1_000_000;
    let used = probe.used(ns(first), ns(last + 1));
    inputs.retain(|(_, _, ts)| *ts >= start + warmup.as_millis() as i64);
    Ok(ZipfLive {
        sink: sink.describe(),
        events: count,
        rate: achieved.unwrap_or_default(),
        pushes: outputs.len() as u64,
        pushes_per_s: stats::rate(outputs.len() as u64, first, last),
        collapse: count as f64 / outputs.len().max(1) as f64,
        mean_in_flight: used.mean_in_flight.filter(|_| log.is_some()),
        cpu_us_per_event: used.client * 1e6 / count as f64,
        measured: inputs.len(),
        latency: stats::latencies(&inputs, &outputs),
        verify: verified,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(key: &str, status: u16, start_ns: u64, end_ns: u64, overlapped: bool) -> CallRecord {
        CallRecord {
            seq: 1,
            method: "POST".into(),
            path: format!("/push/{key}"),
            key: Some(key.into()),
            version: Some(1),
            tn: Some(1),
            merged: Some(1),
            compensation: Some(false),
            idempotency_key: None,
            content_type: None,
            body: None,
            body_base64: None,
            status,
            injected: None,
            start_ns,
            end_ns,
            overlapped,
        }
    }

    #[test]
    fn calls_count_2xx_over_the_window_from_first_arrival_to_last_answer() {
        let records = [
            call("a", 200, 2_000_000_000, 2_100_000_000, false),
            call("b", 503, 1_000_000_000, 1_500_000_000, false),
            call("c", 204, 1_500_000_000, 3_000_000_000, true),
        ];
        let calls = Calls::of(&records);
        assert_eq!(
            calls,
            Calls {
                ok: 2,
                other: 1,
                overlaps: 1,
                first_ns: 1_000_000_000,
                last_ns: 3_000_000_000,
            }
        );
        assert_eq!(calls.per_s(), 1.0);
        assert_eq!(Calls::of(&[]).per_s(), 0.0);
    }

    #[test]
    fn arrivals_are_the_2xx_calls_in_ms() {
        let records = [
            call("a", 200, 2_000_999_999, 2_100_000_000, false),
            call("b", 503, 1_000_000_000, 1_500_000_000, false),
        ];
        assert_eq!(arrivals(&records), vec![("a".to_string(), 1, 2_000)]);
    }

    fn sample(at_ns: u64, client: f64, in_flight: Option<f64>) -> Sample {
        Sample {
            at_ns,
            client,
            receiver: client / 2.0,
            driver: 0.0,
            machine: (at_ns / 2, at_ns),
            in_flight,
        }
    }

    #[test]
    fn a_probe_reads_from_the_last_sample_before_a_window_to_the_first_after_it() {
        let probe = Probe {
            receiver: None,
            samples: vec![
                sample(0, 0.0, None),
                sample(100, 1.0, Some(0.0)),
                sample(200, 3.0, Some(60.0)),
                sample(300, 6.0, Some(64.0)),
                sample(400, 10.0, Some(2.0)),
            ],
        };
        let used = probe.used(150, 290);
        assert_eq!((used.client, used.receiver), (5.0, 2.5), "100 to 300");
        assert_eq!(used.machine_busy, 0.5);
        assert_eq!(used.mean_in_flight, Some(60.0), "only the sample within");
        let all = probe.used(0, 1_000);
        assert_eq!(all.client, 10.0, "the last sample when none is after");
        assert_eq!(all.mean_in_flight, Some(31.5));
    }

    #[test]
    fn medians_of_floats() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[0.7, 0.9, 0.8]), Some(0.8));
        assert_eq!(median(&[1.0, 0.5]), Some(0.75));
    }
}
