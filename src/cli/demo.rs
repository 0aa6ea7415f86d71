//! `keyflight demo`: everything in one process, ending in a verified report.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;

use super::dev::TempState;
use super::load::{SCENARIO_KEYS, SCENARIO_PAUSE_MS};
use super::verify::header;
use super::{runtime, CliError};
use crate::config::{Settings, SinkKind};
use crate::kafka::embedded::Embedded;
use crate::kafka::load::{self, LoadProducer};
use crate::kafka::{headers, reader};
use crate::loadgen::{self, Generator, LoadSpec};
use crate::processor::member;
use crate::receive::{self, Faults, ReceiveOptions, Receiver, Stats};

pub const DEMO_ABOUT: &str = "\
See keyflight do its job with nothing installed: an embedded broker (in
memory), the processor, a load run that includes the article's cases (a
burst while a push is in flight, a late event, more events behind it, an
old straggler), then `verify` over the result. Ends with a short report:
events in, pushes out, the collapse ratio, stale events dropped,
compensation pushes, and the verify result. Exit status 0 when verify passes.

With --sink http the pushes go to an embedded `keyflight receive` instead of
a topic: one HTTP call per push, a share of them failed on purpose (503) so
the retries show, and `verify --http-log` over the receiver's calls.";

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Events of the load run (besides the scenarios)
    #[arg(long, value_name = "N", default_value_t = 20_000)]
    pub events: u64,

    /// Distinct keys of the load run (Zipf 1.0 popularity, bursts of 4)
    #[arg(long, value_name = "K", default_value_t = 1_000)]
    pub keys: u64,

    /// Partitions of every topic
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=64))]
    pub partitions: i32,

    /// Where the pushes go: `kafka` (the pushed topic) or `http` (an
    /// embedded webhook receiver that fails some calls)
    #[arg(long, value_enum, default_value_t = DemoSink::Kafka)]
    pub sink: DemoSink,

    /// Under --sink http: the share of calls the receiver answers 503
    #[arg(long, value_name = "F", default_value_t = 0.1)]
    pub fail_rate: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoSink {
    Kafka,
    Http,
}

/// The embedded receiver of `--sink http` (it logs to [`receiver_log`]).
struct EmbeddedReceiver {
    stop: tokio::sync::oneshot::Sender<()>,
    served: tokio::task::JoinHandle<Result<Stats, String>>,
}

/// How long the processor may take to catch up before the demo gives up.
const CATCH_UP: Duration = Duration::from_secs(90);

pub fn run(mut settings: Settings, args: DemoArgs) -> Result<(), CliError> {
    let started = Instant::now();
    let embedded = Embedded::start(&settings, args.partitions)
        .map_err(|e| CliError::Runtime(format!("cannot start the embedded broker: {e}")))?;
    let state = TempState::new("demo")?;
    settings.brokers = embedded.bootstrap();
    settings.state_dir = state.0.clone();
    settings.commit_interval = Duration::from_millis(200);
    println!(
        "keyflight demo: embedded broker at {} (in memory, development only), {} partitions",
        settings.brokers, args.partitions
    );

    let runtime = runtime()?;
    let receiver = match args.sink {
        DemoSink::Kafka => None,
        DemoSink::Http => {
            let receiver = start_receiver(&runtime, &state.0, args.fail_rate)?;
            settings.sink.kind = SinkKind::Http;
            settings.sink.http.url = format!("{}/push/{{key}}", receiver.0);
            // Failed calls are retried soon, so the demo ends soon.
            settings.push.retry_backoff = Duration::from_millis(20);
            settings.push.max_retry_backoff = Duration::from_millis(500);
            println!(
                "  sink: HTTP calls to {} (keyflight receive, {:.0} % of calls answered 503)",
                settings.sink.http.url,
                args.fail_rate * 100.0
            );
            Some(receiver.1)
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let (settings, handle, stop) = (settings.clone(), runtime.handle().clone(), stop.clone());
        // Not served: the demo reports its own figures.
        let metrics = Arc::new(crate::metrics::Metrics::new());
        std::thread::Builder::new()
            .name("keyflight-poll".into())
            .spawn(move || member::run(settings, metrics, handle, stop))
            .map_err(|e| CliError::Runtime(format!("cannot start the processor: {e}")))?
    };

    let outcome = (|| {
        let failed = |e: load::LoadError| CliError::Runtime(e.to_string());
        let mut producer =
            LoadProducer::new(&settings, &settings.topics.input, settings.input.format)
                .map_err(failed)?;
        let steps = loadgen::scenarios(SCENARIO_KEYS, SCENARIO_PAUSE_MS);
        let played = load::scenarios(&mut producer, &steps).map_err(failed)?;
        println!(
            "  scenarios: {played} events on keys case-0..case-{} (the article's Case 1 and Case 2, then stale stragglers)",
            SCENARIO_KEYS - 1
        );
        let generator = Generator::new(LoadSpec {
            events: args.events,
            keys: args.keys,
            zipf: Some(1.0),
            burst: 4,
            seed: 1,
        })
        .map_err(|e| CliError::Failed(e.to_string()))?;
        let summary = load::run(
            &mut producer,
            generator,
            None,
            &AtomicBool::new(false),
            |_| {},
        )
        .map_err(failed)?;
        println!(
            "  load: {} events over {} keys (Zipf 1.0, bursts of 4) in {:.2}s",
            summary.events, summary.keys, summary.seconds
        );
        let waiting = Instant::now();
        loop {
            if worker.is_finished() {
                return Err(CliError::Runtime("the processor stopped early".into()));
            }
            match reader::group_lag(&settings, &settings.topics.input) {
                Ok(0) => break,
                Ok(_) | Err(_) if waiting.elapsed() < CATCH_UP => {
                    // Polling the group's committed offsets: nothing to await.
                    std::thread::sleep(Duration::from_millis(200));
                }
                Ok(lag) => {
                    return Err(CliError::Runtime(format!(
                        "the processor did not catch up within {CATCH_UP:?} (lag {lag})"
                    )))
                }
                Err(e) => return Err(CliError::Runtime(e.to_string())),
            }
        }
        println!(
            "  processor caught up in {:.2}s",
            waiting.elapsed().as_secs_f64()
        );
        Ok(())
    })();

    stop.store(true, Ordering::Relaxed);
    let stopped = worker.join();
    outcome?;
    match stopped {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(CliError::Runtime(e.to_string())),
        Err(_) => return Err(CliError::Runtime("the processor panicked".into())),
    }

    let (report, pushes) = match receiver {
        None => (
            super::verify::verify(&settings, None)?,
            pushed_counts(&settings)?,
        ),
        Some(receiver) => {
            let stats = runtime.block_on(receiver.stop())?;
            println!("  receiver: {}", stats.summary());
            let report = super::verify::verify_http_log(&settings, &receiver_log(&state.0))?;
            (report, called_counts(&receiver_log(&state.0))?)
        }
    };
    drop(embedded);
    let dead = report.dead_letters_found;
    let stale = report.events.saturating_sub(pushes.merged);
    println!("\n{}\n", report.summary());
    println!("  events in            {:>9}", report.events + dead);
    println!(
        "  pushes out           {:>9}   collapse {:.1}x (events per push)",
        pushes.total,
        report.events as f64 / pushes.total.max(1) as f64
    );
    println!("  stale events dropped {stale:>9}   (older than what the key already had)");
    println!("  compensation pushes  {:>9}", pushes.compensation);
    println!("  dead letters         {dead:>9}");
    println!(
        "  verify               {:>9}   {} keys, each one's last push is its latest event",
        if report.passed() { "PASS" } else { "FAIL" },
        report.matched
    );
    println!(
        "  took                 {:>8.1}s",
        started.elapsed().as_secs_f64()
    );
    println!(
        "\nNext: README.md, \"Use it against a Kafka cluster\" (topics create, run) and\n\
         \"Recover and prove\" (verify, replay, state); `keyflight dev` keeps this setup running."
    );
    if report.passed() {
        Ok(())
    } else {
        Err(CliError::Failed("verify failed".into()))
    }
}

/// Starts `keyflight receive` in this process on a free loopback port;
/// returns its URL.
fn start_receiver(
    runtime: &tokio::runtime::Runtime,
    dir: &std::path::Path,
    fail_rate: f64,
) -> Result<(String, EmbeddedReceiver), CliError> {
    let options = ReceiveOptions {
        faults: Faults {
            fail_rate,
            ..Faults::default()
        },
        seed: 1,
        log: Some(receiver_log(dir)),
        ..ReceiveOptions::default()
    };
    let receiver = Receiver::new(options).map_err(CliError::Failed)?;
    let bound = runtime
        .block_on(receive::bind("127.0.0.1:0", None))
        .map_err(CliError::Runtime)?;
    let url = bound.url();
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let served = runtime.spawn(bound.serve(receiver, async {
        let _ = stopped.await;
    }));
    Ok((url, EmbeddedReceiver { stop, served }))
}

fn receiver_log(dir: &std::path::Path) -> std::path::PathBuf {
    dir.join("calls.jsonl")
}

impl EmbeddedReceiver {
    async fn stop(self) -> Result<Stats, CliError> {
        let _ = self.stop.send(());
        match self.served.await {
            Ok(served) => served.map_err(CliError::Runtime),
            Err(e) => Err(CliError::Runtime(format!("the receiver failed: {e}"))),
        }
    }
}

/// The pushes a receiver answered 2xx, as [`pushed_counts`] counts them.
fn called_counts(log: &std::path::Path) -> Result<PushCounts, CliError> {
    let calls = receive::read_log(log).map_err(CliError::Runtime)?;
    let mut counts = PushCounts::default();
    for call in calls.iter().filter(|c| (200..300).contains(&c.status)) {
        counts.add(call.compensation == Some(true), call.merged.unwrap_or(0));
    }
    Ok(counts)
}

#[derive(Default)]
struct PushCounts {
    total: u64,
    compensation: u64,
    /// Events covered by the pushes (their keyflight-merged headers).
    merged: u64,
}

impl PushCounts {
    fn add(&mut self, compensation: bool, merged: u64) {
        self.total += 1;
        self.compensation += u64::from(compensation);
        self.merged += merged;
    }
}

fn pushed_counts(settings: &Settings) -> Result<PushCounts, CliError> {
    let runtime = |e: reader::ReadError| CliError::Runtime(e.to_string());
    let consumer = reader::consumer(settings, "demo")
        .map_err(|e| CliError::Runtime(format!("cannot create the Kafka consumer: {e}")))?;
    let topic = &settings.topics.pushed;
    let ranges = reader::ranges(&consumer, topic, reader::Start::Beginning).map_err(runtime)?;
    let mut counts = PushCounts::default();
    reader::read(&consumer, topic, &ranges, |message| {
        counts.add(
            header(message, headers::COMPENSATION).as_deref() == Some("true"),
            header(message, headers::MERGED)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0),
        );
    })
    .map_err(runtime)?;
    Ok(counts)
}
