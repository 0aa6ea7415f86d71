//! `keyflight-bench`: keyflight side by side with a bare consume→produce
//! copy on the same broker, plus the compensation scan, restore and memory
//! figures. `scripts/bench.sh` runs it on Tansu and on librdkafka's mock
//! cluster; BENCHMARKS.md has the results and what they mean.
//!
//! One `run`:
//! 1. loads N events (Zipf keys, bursts) into a fresh input topic;
//! 2. drains that backlog with the bare copy (`keyflight-bench copy`, its own
//!    process) and then with `keyflight run` (the release binary next to this
//!    one): events/s over the output's first-to-last timestamp window,
//!    pushes/s, collapse, peak RSS;
//! 3. finds the live maximum: the rate through the copy while this process
//!    produces a fresh stream as fast as it can beside it;
//! 4. at half the live maximum, produces a fresh stream into each system
//!    while it runs: event→output latency p50/p99 from the event's
//!    timestamp to the output record's, in rounds (copy and keyflight each
//!    once per round) whose added latencies give a median;
//! 5. times the compensation scan (100 open markers among M) against a full
//!    scan of all markers, in this process;
//! 6. restores M markers from a changelog in a fresh `keyflight run`:
//!    seconds, records/s, and the process's peak RSS with M keys in state.
//!
//! `http` measures the HTTP sink instead: keyflight against a bare HTTP
//! client loop (`post`, its own process) posting to `keyflight receive`,
//! and the collapse behind a slow receiver (see the `http` module).

mod copy;
mod stats;

mod cluster;
mod drain;
mod http;
mod http_report;
mod latency;
mod post;
mod process;
mod report;
mod restore;
mod scan;

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use keyflight::config::Settings;
use keyflight::loadgen::LoadSpec;
use serde::Serialize;

use stats::Latency;

/// The same allocator as `keyflight`, so the copy is compared like for like.
use cluster::*;
use drain::*;
use http_report::*;
use latency::*;
use process::*;
use report::*;
use restore::*;
use scan::*;

#[global_allocator]
pub(crate) static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// keyflight against a bare consume→produce copy, on one broker.
#[derive(Parser)]
#[command(name = "keyflight-bench", version)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Cmd,
}

#[derive(Subcommand)]
pub(crate) enum Cmd {
    /// The whole comparison (see the crate docs); prints a report
    Run(RunArgs),
    /// The bare copy itself (started by `run` as a child process)
    Copy(CopyArgs),
    /// The HTTP sink against a bare HTTP client loop, and its collapse
    /// behind a slow receiver; prints a report. A later option overrides an
    /// earlier one (scripts/bench.sh's HTTP_ARGS come last)
    #[command(args_override_self = true)]
    Http(http::HttpArgs),
    /// The bare HTTP client loop itself (started by `http` as a child process)
    Post(post::PostArgs),
}

#[derive(Args)]
pub(crate) struct RunArgs {
    /// Broker to use; without it an in-process mock cluster (librdkafka's)
    #[arg(long)]
    pub(crate) brokers: Option<String>,
    /// Name of this run in the report
    #[arg(long, default_value = "run")]
    pub(crate) label: String,
    #[arg(long, default_value_t = 1_000_000)]
    pub(crate) events: u64,
    #[arg(long, default_value_t = 100_000)]
    pub(crate) keys: u64,
    #[arg(long, default_value_t = 1.0)]
    pub(crate) zipf: f64,
    /// Events per key back to back
    #[arg(long, default_value_t = 4)]
    pub(crate) burst: u32,
    #[arg(long, default_value_t = 12)]
    pub(crate) partitions: i32,
    /// Seconds of load in the latency phase
    #[arg(long, default_value_t = 20.0)]
    pub(crate) latency_seconds: f64,
    /// Which maximum rate the latency phase runs at half of: `live`, the
    /// rate through the copy while the driver produces as fast as it can
    /// beside it (a latency is measured on a live stream, with the producer
    /// on the same machine); or `drain`, the copy's rate over the backlog,
    /// which has the machine to itself (at half of it, the producer, the
    /// broker and the system under test kept this 2-core machine 70–92 %
    /// busy)
    #[arg(long, value_enum, default_value_t = Reference::Live)]
    pub(crate) latency_of: Reference,
    /// Events/s in the latency phase instead of half a maximum rate
    #[arg(long)]
    pub(crate) latency_rate: Option<f64>,
    /// Rounds of the latency phase, each running the copy and keyflight once
    /// (which goes first alternates). The report gives every round and the
    /// median of the rounds' added latencies: on this 2-core machine one
    /// round's added p99 moved by tens of milliseconds either way
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) latency_rounds: u32,
    /// Seconds at the start of the latency phase left out of its figures:
    /// the consumers' first fetches (offset lookups, fetch sessions) made
    /// the first half second's events wait 300–600 ms in both systems
    #[arg(long, default_value_t = 1.0)]
    pub(crate) warmup_seconds: f64,
    /// Markers in the scan and restore measurements
    #[arg(long, default_value_t = 1_000_000)]
    pub(crate) markers: u64,
    /// Open markers among them in the scan measurement
    #[arg(long, default_value_t = 100)]
    pub(crate) open: u64,
    /// Also run `keyflight verify` over the throughput phase
    #[arg(long)]
    pub(crate) verify: bool,
    #[command(flatten)]
    pub(crate) fetch: Fetch,
    /// Write the report as JSON here too
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
}

/// A maximum rate that the latency phase runs at half of.
#[derive(Clone, Copy, Debug, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Reference {
    Live,
    Drain,
}

#[derive(Args)]
pub(crate) struct CopyArgs {
    /// The keyflight config of the run being compared: same brokers, same
    /// librdkafka settings, same input topic and commit interval
    #[arg(long)]
    pub(crate) config: PathBuf,
    #[arg(long)]
    pub(crate) output: String,
    #[arg(long)]
    pub(crate) group: String,
}

pub(crate) type Result<T> = std::result::Result<T, String>;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Cmd::Copy(args) => keyflight::config::load(Some(&args.config), &Default::default())
            .map_err(|e| e.to_string())
            .and_then(|settings| {
                let settings = Settings {
                    application_id: args.group,
                    ..settings
                };
                copy::run(&settings, &settings.topics.input, &args.output)
                    .map_err(|e| e.to_string())
            }),
        Cmd::Run(args) => run(args),
        Cmd::Http(args) => http::run(args),
        Cmd::Post(args) => post::run(args),
    };
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keyflight-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------

pub(crate) fn run(args: RunArgs) -> Result<()> {
    let cluster = Cluster::new(args.brokers.as_deref())?;
    let p = args.partitions;
    let mut report = Report {
        label: args.label.clone(),
        broker: cluster.describe(),
        partitions: p,
        events: args.events,
        keys: args.keys,
        ..Report::default()
    };
    let work = WorkDir::new()?;
    let env = Env {
        cluster: &cluster,
        partitions: p,
        fetch: args.fetch,
        work: work.path(),
    };
    let spec = |events| LoadSpec {
        events,
        keys: args.keys,
        zipf: Some(args.zipf),
        burst: args.burst,
        seed: 7,
    };

    // 1-2. The backlog, drained by the copy and then by keyflight.
    let app = App::create(&env, "tp")?;
    say(&format!(
        "loading {} events over {} keys",
        args.events, args.keys
    ));
    report.load_events_per_s = produce(&app, spec(args.events), None)?;
    say("draining the backlog with the bare copy");
    report.copy = drain_copy(&app, args.events)?;
    say("draining the backlog with keyflight");
    report.keyflight = drain_keyflight(&app, args.events, args.verify)?;
    report.throughput_ratio = report.keyflight.events_per_s / report.copy.events_per_s;
    say(&format!(
        "backlog: copy {:.0} events/s ({:.2} us CPU each), keyflight {:.0} events/s ({:.2} us CPU each) ({:.2}), collapse {:.2}, changelog records per event {:.2}, verify {:?}",
        report.copy.events_per_s,
        report.copy.cpu_us_per_event,
        report.keyflight.events_per_s,
        report.keyflight.cpu_us_per_event,
        report.throughput_ratio,
        report.keyflight.collapse,
        report.keyflight.changelog_per_event,
        report.keyflight.verify
    ));

    // 3. The live maximum. Should it fail (a stalled broker), the latency
    // phase falls back to half the backlog rate and the report says so.
    say("live maximum: the copy while this process produces as fast as it can");
    report.live = latency(
        &env,
        System::Copy,
        0,
        spec(args.events),
        None,
        Duration::ZERO,
    )
    .map_err(|e| say(&format!("live maximum failed: {e}")))
    .ok();

    // 4. Latency at half a maximum rate (or --latency-rate).
    let live_max = report.live.as_ref().map(|l| l.through_per_s);
    let (rate, half_of) = match (args.latency_rate, args.latency_of, live_max) {
        (Some(rate), _, _) => (rate, None),
        (None, Reference::Live, Some(max)) => (max / 2.0, Some(Reference::Live)),
        (None, _, _) => (report.copy.events_per_s / 2.0, Some(Reference::Drain)),
    };
    let events = ((rate * args.latency_seconds) as u64).clamp(1_000, args.events);
    report.latency.target_rate = rate;
    report.latency.half_of = half_of;
    report.latency.warmup_seconds = args.warmup_seconds;
    report.latency.events = events;
    let warmup = Duration::from_secs_f64(args.warmup_seconds);
    for round in 0..args.latency_rounds {
        // Alternating who goes first cancels a drift of the machine over
        // the phase.
        let copy_first = round % 2 == 0;
        let measure = |system| {
            say(&format!(
                "latency, round {} of {}: {events} events at {rate:.0}/s through {}",
                round + 1,
                args.latency_rounds,
                match system {
                    System::Copy => "the copy",
                    System::Keyflight => "keyflight",
                }
            ));
            latency(&env, system, round + 1, spec(events), Some(rate), warmup)
        };
        let measured = if copy_first {
            measure(System::Copy).and_then(|copy| Ok((copy, measure(System::Keyflight)?)))
        } else {
            measure(System::Keyflight).and_then(|keyflight| Ok((measure(System::Copy)?, keyflight)))
        };
        // A failed round (a stalled broker, a system that did not drain)
        // is reported and the phase goes on: the other rounds still count.
        let (copy, keyflight, failed) = match measured {
            Ok((copy, keyflight)) => (Some(copy), Some(keyflight), None),
            Err(e) => {
                say(&format!("latency, round {} failed: {e}", round + 1));
                let reason = e.lines().next().unwrap_or_default();
                let reason = reason.trim_end_matches(':').to_string();
                (None, None, Some(reason))
            }
        };
        let added = |figure: fn(&Latency) -> i64| {
            let of = |system: &Option<SystemLatency>| system.as_ref()?.latency.as_ref().map(figure);
            Some(of(&keyflight)? - of(&copy)?)
        };
        report.latency.rounds.push(LatencyRound {
            copy_first,
            added_p50_ms: added(|l| l.p50_ms),
            added_p99_ms: added(|l| l.p99_ms),
            copy,
            keyflight,
            failed,
        });
    }
    // Over the rounds that have the figure.
    let median_of = |figure: fn(&LatencyRound) -> Option<i64>| {
        let values: Vec<i64> = report.latency.rounds.iter().filter_map(figure).collect();
        stats::median(&values)
    };
    report.latency.added_p50_ms = median_of(|r| r.added_p50_ms);
    report.latency.added_p99_ms = median_of(|r| r.added_p99_ms);

    // 5. The compensation scan.
    say(&format!(
        "scan: {} markers, {} open",
        args.markers, args.open
    ));
    report.scan = scan(args.markers, args.open, work.path())?;

    // 6. Restore and memory.
    say(&format!(
        "restore: {} markers from the changelog",
        args.markers
    ));
    report.restore = restore(&env, args.markers)?;

    print_report(&report);
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

pub(crate) fn say(what: &str) {
    eprintln!("keyflight-bench: {what}");
}

/// A scratch directory for configs, logs and stores; removed at the end.
pub(crate) struct WorkDir(PathBuf);

impl WorkDir {
    pub(crate) fn new() -> Result<WorkDir> {
        let dir = std::env::temp_dir().join(format!("keyflight-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(WorkDir(dir))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        // BENCH_KEEP_WORKDIR=1 keeps the logs and stores for a look (not
        // KEYFLIGHT_*: keyflight reads those as settings).
        if std::env::var_os("BENCH_KEEP_WORKDIR").is_some() {
            return say(&format!("kept {}", self.0.display()));
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
