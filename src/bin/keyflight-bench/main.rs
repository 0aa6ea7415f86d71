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

mod copy;
mod stats;

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use keyflight::codec::InputFormat;
use keyflight::config::{KafkaValue, Settings};
use keyflight::kafka::load::{self, LoadProducer};
use keyflight::kafka::reader::{self, Range, Start};
use keyflight::kafka::{client_config, Role};
use keyflight::loadgen::{Generator, LoadSpec};
use keyflight::metrics::scrape::{http_get, Scrape};
use keyflight::state::{Marker, MarkerCodec, Store};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::Headers;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::Message;
use serde::Serialize;

use stats::Latency;

/// The same allocator as `keyflight`, so the copy is compared like for like.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// keyflight against a bare consume→produce copy, on one broker.
#[derive(Parser)]
#[command(name = "keyflight-bench", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The whole comparison (see the crate docs); prints a report
    Run(RunArgs),
    /// The bare copy itself (started by `run` as a child process)
    Copy(CopyArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Broker to use; without it an in-process mock cluster (librdkafka's)
    #[arg(long)]
    brokers: Option<String>,
    /// Name of this run in the report
    #[arg(long, default_value = "run")]
    label: String,
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    /// Events per key back to back
    #[arg(long, default_value_t = 4)]
    burst: u32,
    #[arg(long, default_value_t = 12)]
    partitions: i32,
    /// Seconds of load in the latency phase
    #[arg(long, default_value_t = 20.0)]
    latency_seconds: f64,
    /// Which maximum rate the latency phase runs at half of: `live`, the
    /// rate through the copy while the driver produces as fast as it can
    /// beside it (a latency is measured on a live stream, with the producer
    /// on the same machine); or `drain`, the copy's rate over the backlog,
    /// which has the machine to itself (at half of it, the producer, the
    /// broker and the system under test kept this 2-core machine 70–92 %
    /// busy)
    #[arg(long, value_enum, default_value_t = Reference::Live)]
    latency_of: Reference,
    /// Events/s in the latency phase instead of half a maximum rate
    #[arg(long)]
    latency_rate: Option<f64>,
    /// Rounds of the latency phase, each running the copy and keyflight once
    /// (which goes first alternates). The report gives every round and the
    /// median of the rounds' added latencies: on this 2-core machine one
    /// round's added p99 moved by tens of milliseconds either way
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    latency_rounds: u32,
    /// Seconds at the start of the latency phase left out of its figures:
    /// the consumers' first fetches (offset lookups, fetch sessions) made
    /// the first half second's events wait 300–600 ms in both systems
    #[arg(long, default_value_t = 1.0)]
    warmup_seconds: f64,
    /// Markers in the scan and restore measurements
    #[arg(long, default_value_t = 1_000_000)]
    markers: u64,
    /// Open markers among them in the scan measurement
    #[arg(long, default_value_t = 100)]
    open: u64,
    /// Also run `keyflight verify` over the throughput phase
    #[arg(long)]
    verify: bool,
    /// librdkafka's fetch.wait.max.ms for both systems: how long a broker
    /// may hold a fetch that has too little data (its 500 ms default would
    /// dominate the latencies on Tansu and the mock cluster)
    #[arg(long, default_value_t = 10)]
    fetch_wait_ms: u32,
    /// librdkafka's fetch.queue.backoff.ms for both systems: how long a
    /// consumer whose local queue is over its thresholds waits before the
    /// next fetch. Its 1000 ms default held the copy to about 130 000
    /// events/s on the mock cluster (bursts with 750 ms gaps), a quarter of
    /// what it copies with 10 ms
    #[arg(long, default_value_t = 10)]
    fetch_queue_backoff_ms: u32,
    /// Write the report as JSON here too
    #[arg(long)]
    json: Option<PathBuf>,
}

/// A maximum rate that the latency phase runs at half of.
#[derive(Clone, Copy, Debug, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Reference {
    Live,
    Drain,
}

#[derive(Args)]
struct CopyArgs {
    /// The keyflight config of the run being compared: same brokers, same
    /// librdkafka settings, same input topic and commit interval
    #[arg(long)]
    config: PathBuf,
    #[arg(long)]
    output: String,
    #[arg(long)]
    group: String,
}

type Result<T> = std::result::Result<T, String>;

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
// The report

#[derive(Serialize, Default)]
struct Report {
    label: String,
    broker: String,
    partitions: i32,
    events: u64,
    keys: u64,
    load_events_per_s: f64,
    copy: Drain,
    keyflight: Drain,
    throughput_ratio: f64,
    /// The copy on a live stream produced as fast as the driver can.
    live: Option<SystemLatency>,
    latency: LatencyPhase,
    scan: Scan,
    restore: Restore,
}

#[derive(Serialize, Default)]
struct Drain {
    events_per_s: f64,
    outputs: u64,
    outputs_per_s: f64,
    collapse: f64,
    peak_rss_mb: f64,
    /// Changelog records written per event (keyflight; 0 for the copy).
    changelog_per_event: f64,
    /// The process's CPU time (user + system, start to stop) per event
    /// consumed: its cost, steadier than a rate on this noisy machine.
    cpu_us_per_event: f64,
    verify: Option<bool>,
}

#[derive(Serialize, Default)]
struct LatencyPhase {
    target_rate: f64,
    /// The maximum rate `target_rate` is half of (`None`: `--latency-rate`).
    half_of: Option<Reference>,
    warmup_seconds: f64,
    /// Events produced into each system in each round.
    events: u64,
    rounds: Vec<LatencyRound>,
    /// Medians of each round's keyflight − copy figure, over the rounds
    /// that have it.
    added_p50_ms: Option<f64>,
    added_p99_ms: Option<f64>,
}

/// One round of the latency phase: the copy and keyflight, one after the other.
#[derive(Serialize)]
struct LatencyRound {
    copy_first: bool,
    /// `None` when the round failed.
    copy: Option<SystemLatency>,
    keyflight: Option<SystemLatency>,
    added_p50_ms: Option<i64>,
    added_p99_ms: Option<i64>,
    /// Why the round has no figures.
    failed: Option<String>,
}

#[derive(Serialize)]
struct SystemLatency {
    /// The rate the driver achieved, events/s.
    rate: f64,
    /// Events over the span from the first event's timestamp to the last
    /// output's: the rate through the whole pipeline.
    through_per_s: f64,
    /// The system's CPU time (user + system) from the first event to the
    /// last output, per event.
    cpu_us_per_event: f64,
    /// The driver's CPU time while it produced, per event: its generator
    /// and producer, and on the mock cluster the broker, which runs in it.
    driver_cpu_us_per_event: f64,
    /// Share of the machine's CPU time (all cores) that was busy while the
    /// driver produced, 0–1: near 1, threads wait for a core and the
    /// latencies are those of a saturated machine.
    machine_busy: f64,
    /// Events after the warm-up: the population of the percentiles.
    measured: usize,
    latency: Option<Latency>,
    /// keyflight only: p50 and p99 of its pushes' produce → acknowledgement
    /// time (bucket bounds of `keyflight_push_latency_seconds`), what an
    /// event arriving behind a push in flight waits before its own push.
    #[serde(skip_serializing_if = "Option::is_none")]
    push_ack_ms: Option<(f64, f64)>,
}

#[derive(Serialize, Default)]
struct Scan {
    markers: u64,
    open: u64,
    open_scan_ms: f64,
    full_scan_ms: f64,
}

#[derive(Serialize, Default)]
struct Restore {
    markers: u64,
    seconds: f64,
    records_per_s: f64,
    start_to_ready_seconds: f64,
    peak_rss_mb: f64,
}

fn run(args: RunArgs) -> Result<()> {
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
        fetch_wait_ms: args.fetch_wait_ms,
        fetch_queue_backoff_ms: args.fetch_queue_backoff_ms,
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

fn say(what: &str) {
    eprintln!("keyflight-bench: {what}");
}

/// A scratch directory for configs, logs and stores; removed at the end.
struct WorkDir(PathBuf);

impl WorkDir {
    fn new() -> Result<WorkDir> {
        let dir = std::env::temp_dir().join(format!("keyflight-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(WorkDir(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------
// Broker and topics

enum Cluster {
    Mock(MockCluster<'static, DefaultProducerContext>),
    External(String),
}

impl Cluster {
    fn new(brokers: Option<&str>) -> Result<Cluster> {
        match brokers {
            Some(b) => Ok(Cluster::External(b.to_string())),
            None => MockCluster::new(1)
                .map(Cluster::Mock)
                .map_err(|e| format!("cannot start the mock cluster: {e}")),
        }
    }

    fn bootstrap(&self) -> String {
        match self {
            Cluster::Mock(c) => c.bootstrap_servers(),
            Cluster::External(b) => b.clone(),
        }
    }

    fn describe(&self) -> String {
        match self {
            Cluster::Mock(_) => "librdkafka mock cluster (in process)".into(),
            Cluster::External(b) => format!("external at {b}"),
        }
    }

    fn create(&self, topics: &[&str], partitions: i32) -> Result<()> {
        match self {
            Cluster::Mock(c) => topics.iter().try_for_each(|t| {
                c.create_topic(t, partitions, 1)
                    .map_err(|e| format!("create {t}: {e}"))
            }),
            Cluster::External(b) => {
                let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
                    .set("bootstrap.servers", b)
                    .create()
                    .map_err(|e| e.to_string())?;
                let new: Vec<NewTopic> = topics
                    .iter()
                    .map(|t| {
                        let topic = NewTopic::new(t, partitions, TopicReplication::Fixed(1));
                        if t.ends_with("changelog") {
                            topic.set("cleanup.policy", "compact")
                        } else {
                            topic
                        }
                    })
                    .collect();
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                let results = runtime
                    .block_on(admin.create_topics(&new, &AdminOptions::new()))
                    .map_err(|e| e.to_string())?;
                results
                    .into_iter()
                    .try_for_each(|r| r.map(drop).map_err(|(t, e)| format!("create {t}: {e}")))
            }
        }
    }
}

/// What every measurement shares.
struct Env<'a> {
    cluster: &'a Cluster,
    partitions: i32,
    fetch_wait_ms: u32,
    fetch_queue_backoff_ms: u32,
    work: &'a Path,
}

/// One fresh set of topics, a keyflight config for them, and a state dir.
struct App {
    settings: Settings,
    copied: String,
    config: PathBuf,
    state: PathBuf,
}

impl App {
    fn create(env: &Env, name: &str) -> Result<App> {
        let (cluster, partitions, work) = (env.cluster, env.partitions, env.work);
        let fetch_wait_ms = env.fetch_wait_ms;
        let mut settings = Settings {
            application_id: format!("bench-{name}"),
            brokers: cluster.bootstrap(),
            log_level: "warn,keyflight::cli::run=info".into(),
            metrics_addr: "127.0.0.1:0".into(),
            commit_interval: Duration::from_secs(1),
            ..Settings::default()
        };
        settings.kafka.consumer.insert(
            "fetch.wait.max.ms".into(),
            KafkaValue::Int(fetch_wait_ms.into()),
        );
        settings.kafka.consumer.insert(
            "fetch.queue.backoff.ms".into(),
            KafkaValue::Int(env.fetch_queue_backoff_ms.into()),
        );
        if let Cluster::Mock(_) = cluster {
            // The mock cluster keeps at most 5 MB per partition and drops
            // older records; compressed, a million events fit in 12.
            settings
                .kafka
                .producer
                .insert("compression.type".into(), KafkaValue::Str("lz4".into()));
        }
        settings.topics.input = format!("{name}.in");
        settings.topics.pushed = format!("{name}.pushed");
        settings.topics.dead_letter = format!("{name}.dlq");
        let copied = format!("{name}.copied");
        let changelog = settings.changelog_topic();
        cluster.create(
            &[
                &settings.topics.input,
                &settings.topics.pushed,
                &settings.topics.dead_letter,
                &changelog,
                &copied,
            ],
            partitions,
        )?;
        let config = work.join(format!("{name}.toml"));
        // The config file is these settings: the copy loads it too.
        let text = toml::to_string(&settings).map_err(|e| e.to_string())?;
        std::fs::write(&config, text).map_err(|e| e.to_string())?;
        Ok(App {
            state: work.join(format!("{name}.state")),
            settings,
            copied,
            config,
        })
    }

    fn keyflight(&self, log: &Path) -> Result<Child> {
        Child::spawn(
            Command::new(sibling("keyflight")?).args([
                "--config",
                path_str(&self.config)?,
                "run",
                "--state-dir",
                path_str(&self.state)?,
            ]),
            log,
        )
    }

    fn copy(&self, log: &Path) -> Result<Child> {
        Child::spawn(
            Command::new(std::env::current_exe().map_err(|e| e.to_string())?).args([
                "copy",
                "--config",
                path_str(&self.config)?,
                "--output",
                &self.copied,
                "--group",
                &format!("{}-copy", self.settings.application_id),
            ]),
            log,
        )
    }
}

/// A binary next to this one (`keyflight` is built with it).
fn sibling(name: &str) -> Result<PathBuf> {
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let path = me.with_file_name(name);
    path.is_file().then_some(path.clone()).ok_or_else(|| {
        format!(
            "{} not found: build it with `cargo build --release --bins`",
            path.display()
        )
    })
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .ok_or_else(|| format!("{} is not UTF-8", path.display()))
}

/// Produces a generated stream to the app's input; returns events/s.
fn produce(app: &App, spec: LoadSpec, rate: Option<f64>) -> Result<f64> {
    let mut producer =
        LoadProducer::new(&app.settings, &app.settings.topics.input, InputFormat::Json)
            .map_err(|e| e.to_string())?;
    let generator = Generator::new(spec).map_err(|e| e.to_string())?;
    let summary = load::run(
        &mut producer,
        generator,
        rate,
        &AtomicBool::new(false),
        |_| {},
    )
    .map_err(|e| e.to_string())?;
    Ok(summary.rate())
}

// ---------------------------------------------------------------------------
// Child processes

struct Child {
    child: std::process::Child,
    log: PathBuf,
}

/// A child left running by an error (a failed latency round) must not
/// load the machine during the next measurement.
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Child {
    fn spawn(command: &mut Command, log: &Path) -> Result<Child> {
        let file = std::fs::File::create(log).map_err(|e| e.to_string())?;
        command
            .env_remove("RUST_LOG")
            .stdout(file.try_clone().map_err(|e| e.to_string())?)
            .stderr(file)
            .stdin(Stdio::null());
        // SAFETY: prctl in the child before exec; it dies with the driver.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command.spawn().map_err(|e| e.to_string())?;
        Ok(Child {
            child,
            log: log.to_path_buf(),
        })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls until `check` yields, the child exits, or `limit` passes.
    fn wait<T>(&mut self, limit: Duration, mut check: impl FnMut(&Self) -> Option<T>) -> Result<T> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(value) = check(self) {
                return Ok(value);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("child exited with {status}:\n{}", self.log()));
            }
            if Instant::now() > deadline {
                return Err(format!("not within {limit:?}; child log:\n{}", self.log()));
            }
            // Checks cost the broker requests (Tansu is single-threaded): 4/s.
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The address keyflight logged for its metrics endpoint.
    fn metrics_addr(&mut self) -> Result<String> {
        self.wait(Duration::from_secs(60), |c| {
            keyflight::metrics::scrape::served_addr(&c.log())
        })
    }

    /// Peak resident memory (VmHWM) in MB.
    fn peak_rss_mb(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }

    /// CPU time used so far (user + system), in seconds.
    fn cpu_seconds(&self) -> f64 {
        process_cpu_seconds(&self.child.id().to_string())
    }

    /// SIGTERM, then a clean exit within a minute.
    fn stop(mut self) -> Result<()> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.child.try_wait().map_err(|e| e.to_string())? {
                Some(status) if status.success() => return Ok(()),
                Some(status) => return Err(format!("child exited with {status}:\n{}", self.log())),
                None if Instant::now() > deadline => {
                    return Err(format!("child did not stop:\n{}", self.log()))
                }
                None => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

/// CPU time a process used so far (user + system), in seconds; `pid` may
/// be `self`.
fn process_cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are
    // the 14th and 15th of the line, in clock ticks.
    let ticks: u64 = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().skip(11).take(2))
        .into_iter()
        .flatten()
        .filter_map(|t| t.parse::<u64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    ticks as f64 / per_second as f64
}

/// The machine's CPU time so far, in clock ticks summed over its CPUs:
/// (busy, total), from the first line of `/proc/stat`.
fn machine_cpu_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|t| t.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    // user nice system idle iowait irq softirq steal (guest time is
    // already counted in user).
    let total: u64 = ticks.iter().take(8).sum();
    let idle: u64 = ticks.iter().skip(3).take(2).sum();
    (total - idle, total)
}

fn scrape(addr: &str) -> Result<Scrape> {
    let (status, body) = http_get(addr, "/metrics").map_err(|e| e.to_string())?;
    (status == 200)
        .then(|| Scrape::parse(&body))
        .ok_or_else(|| format!("/metrics answered {status}"))
}

/// keyflight consumed `events`, has nothing in flight, and committed it all.
fn drained(addr: &str, events: u64) -> bool {
    scrape(addr).is_ok_and(|m| {
        m.sum("keyflight_events_consumed_total", &[]) >= events as f64
            && m.sum("keyflight_keys_in_flight", &[]) == 0.0
            && m.sum("keyflight_consumer_lag_records", &[]) == 0.0
    })
}

fn drain_limit(events: u64) -> Duration {
    Duration::from_secs(120 + events / 1_000)
}

// ---------------------------------------------------------------------------
// Reading topics

fn read_consumer(app: &App) -> Result<rdkafka::consumer::BaseConsumer> {
    reader::consumer(&app.settings, "bench-reader").map_err(|e| e.to_string())
}

fn records(app: &App, topic: &str) -> Result<u64> {
    records_with(&read_consumer(app)?, topic)
}

fn records_with(consumer: &rdkafka::consumer::BaseConsumer, topic: &str) -> Result<u64> {
    let ranges = reader::ranges(consumer, topic, Start::Beginning).map_err(|e| e.to_string())?;
    Ok(reader::size(&ranges))
}

/// The earliest first and latest last record timestamps (ms) of a topic.
fn window(app: &App, topic: &str) -> Result<(i64, i64)> {
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
fn versions(app: &App, topic: &str) -> Result<Vec<(String, u64, i64)>> {
    let consumer = read_consumer(app)?;
    let ranges = reader::ranges(&consumer, topic, Start::Beginning).map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(reader::size(&ranges) as usize);
    reader::read(&consumer, topic, &ranges, |m| {
        let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
        let header = m.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key == "keyflight-version")
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

fn drain_copy(app: &App, events: u64) -> Result<Drain> {
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

fn drain_keyflight(app: &App, events: u64, verify: bool) -> Result<Drain> {
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

#[derive(Clone, Copy, PartialEq)]
enum System {
    Copy,
    Keyflight,
}

/// Runs `system` on fresh topics (for `round`), produces `spec` at `rate`
/// (`None`: as fast as it can) while it runs, and returns the achieved
/// rate, how many events were produced after `warmup`, and their
/// event→output latencies.
fn latency(
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
fn push_ack_ms(metrics: &Scrape) -> Option<(f64, f64)> {
    let buckets: Vec<(f64, f64)> = metrics
        .series(
            "keyflight_push_latency_seconds_bucket",
            &["kind=\"normal\""],
        )
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

/// Times the compensation scan (open index) against a full scan.
fn scan(markers: u64, open: u64, work: &Path) -> Result<Scan> {
    let dir = work.join("scan-store");
    let (store, _) = Store::open(&dir).map_err(|e| e.to_string())?;
    let every = (markers / open.max(1)).max(1);
    let value = bytes::Bytes::from_static(br#"{"status":"active","score":42}"#);
    for i in 0..markers {
        let is_open = i % every == 0 && i / every < open;
        let marker = Marker {
            t1: 1_000,
            t2: if is_open { 500 } else { 1_000 },
            version: i,
            value: Some(value.clone()),
        };
        store
            .put(format!("user-{i:07}").as_bytes(), &marker)
            .map_err(|e| e.to_string())?;
    }
    store.checkpoint(0).map_err(|e| e.to_string())?;
    let rounds = 20;
    let started = Instant::now();
    let mut found = 0;
    for _ in 0..rounds {
        found = keyflight::compensation::due(&store, u64::MAX, 0)
            .map_err(|e| e.to_string())?
            .len();
    }
    let open_scan = started.elapsed().as_secs_f64() * 1000.0 / rounds as f64;
    if found as u64 != open.min(markers) {
        return Err(format!(
            "the scan found {found} open markers, expected {open}"
        ));
    }
    let started = Instant::now();
    let all = store.markers().map_err(|e| e.to_string())?.len();
    let full_scan = started.elapsed().as_secs_f64() * 1000.0;
    if all as u64 != markers {
        return Err(format!(
            "the full scan found {all} markers, expected {markers}"
        ));
    }
    Ok(Scan {
        markers,
        open,
        open_scan_ms: open_scan,
        full_scan_ms: full_scan,
    })
}

/// Restores `markers` markers in a fresh `keyflight run`.
fn restore(env: &Env, markers: u64) -> Result<Restore> {
    let partitions = env.partitions;
    let app = App::create(env, "restore")?;
    let changelog = app.settings.changelog_topic();
    let producer: ThreadedProducer<DefaultProducerContext> =
        client_config(&app.settings, Role::Producer)
            .set("linger.ms", "20")
            .set("batch.num.messages", "10000")
            .create()
            .map_err(|e| e.to_string())?;
    let codec = MarkerCodec::new();
    let value = bytes::Bytes::from_static(br#"{"status":"active","score":42}"#);
    for i in 0..markers {
        let key = format!("user-{i:07}");
        let encoded = codec.encode(&Marker {
            t1: 1_000,
            t2: 1_000,
            version: i,
            value: Some(value.clone()),
        });
        let mut record = BaseRecord::<str, [u8]>::to(&changelog)
            .key(&key)
            .payload(&encoded)
            .partition((i % partitions as u64) as i32);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(1)); // queue full: let it drain
                }
            }
        }
    }
    producer
        .flush(Duration::from_secs(120))
        .map_err(|e| e.to_string())?;

    let started = Instant::now();
    let mut kf = app.keyflight(&app.state.with_extension("restore.log"))?;
    let addr = kf.metrics_addr()?;
    kf.wait(drain_limit(markers), |_| {
        let ready = http_get(&addr, "/readyz").is_ok_and(|(s, _)| s == 200);
        let restored = scrape(&addr)
            .map(|m| m.sum("keyflight_changelog_records_restored_total", &[]))
            .unwrap_or(0.0);
        (ready && restored >= markers as f64).then_some(())
    })?;
    let start_to_ready = started.elapsed().as_secs_f64();
    let m = scrape(&addr)?;
    let seconds = m
        .series("keyflight_restore_duration_seconds", &[])
        .map(|(_, v)| v)
        .fold(0.0, f64::max);
    let rss = kf.peak_rss_mb();
    kf.stop()?;
    Ok(Restore {
        markers,
        seconds,
        records_per_s: markers as f64 / seconds.max(1e-9),
        start_to_ready_seconds: start_to_ready,
        peak_rss_mb: rss,
    })
}

// ---------------------------------------------------------------------------

fn print_report(r: &Report) {
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
        r.restore.markers,
        r.restore.seconds,
        r.restore.records_per_s,
        r.restore.start_to_ready_seconds,
        r.restore.markers,
        r.restore.peak_rss_mb,
    );
}
