//! The `keyflight` command line: global options, subcommands, exit codes.
//!
//! Exit status: 0 success, 1 a runtime failure (broker unreachable, topic
//! layout mismatch), 2 a usage or configuration error.

mod config_cmd;
mod demo;
mod dev;
mod load;
mod receive;
mod replay;
mod run;
mod state_cmd;
mod tail;
mod topics;
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::builder::NonEmptyStringValueParser;
use clap::{Args, Parser, Subcommand};

use crate::config::{self, ConfigError, Overrides, Settings};

const LONG_ABOUT: &str = "\
keyflight turns bursts of keyed change events into pushes, one push in flight
per key at a time, and guarantees that the last push of every key carries its
latest event.

It reads `events.in`, merges the events that arrive while a key's push is in
flight into that key's next push, and produces pushes to `events.pushed`.
Durable t1/t2 markers (RocksDB, backed by a compacted changelog topic) let a
periodic scan re-push any key whose last push did not finish.

Configuration is layered: built-in defaults < --config FILE <
KEYFLIGHT_* environment variables < flags. `keyflight config show` prints the
result; config/keyflight.toml documents every key.";

const EXAMPLES: &str = "\
Examples:
  # See it work with nothing installed (embedded broker, load, verify)
  keyflight demo

  # Create the topics on a local broker (idempotent), then process
  keyflight topics create --brokers localhost:9092 --partitions 6
  keyflight run --brokers localhost:9092 --state-dir ./state

  # After an incident: is every key's last push its latest event?
  keyflight --config prod.toml verify

  # See the effective configuration after file, environment and flags
  KEYFLIGHT_COMPENSATION__INTERVAL=30s keyflight --config config/keyflight.toml config show";

/// Per-key singleflight Kafka stream processor.
#[derive(Debug, Parser)]
#[command(name = "keyflight", version, long_about = LONG_ABOUT, after_help = EXAMPLES, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every subcommand accepts, before or after its name.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// TOML configuration file (config/keyflight.toml lists every key)
    #[arg(long, global = true, env = "KEYFLIGHT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Kafka bootstrap servers, comma separated [default: localhost:9092]
    #[arg(long, global = true, env = "KEYFLIGHT_BROKERS", value_name = "LIST",
          value_parser = NonEmptyStringValueParser::new())]
    pub brokers: Option<String>,

    /// Log level or filter: error, warn, info, debug, trace, or directives
    /// like `keyflight=debug,rdkafka=warn` (RUST_LOG wins when set) [default: info]
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<String>,

    /// Log lines as `text` or `json` (one object per line) [default: text]
    #[arg(long, global = true, value_name = "FORMAT")]
    pub log_format: Option<crate::config::LogFormat>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the processor: consume, merge per key, push, mark, compensate
    #[command(long_about = run::RUN_ABOUT, after_help = run::RUN_EXAMPLES)]
    Run(run::RunArgs),
    /// Create and check the topics keyflight reads and writes
    Topics(topics::TopicsArgs),
    /// Show the effective configuration
    Config(config_cmd::ConfigArgs),
    /// Check that every key's last push carries its latest event
    #[command(long_about = verify::VERIFY_ABOUT, after_help = verify::VERIFY_EXAMPLES)]
    Verify(verify::VerifyArgs),
    /// Reset the group's offsets on the input topic to process it again
    #[command(long_about = replay::REPLAY_ABOUT, after_help = replay::REPLAY_EXAMPLES)]
    Replay(replay::ReplayArgs),
    /// Inspect or rebuild the local marker stores
    State(state_cmd::StateArgs),
    /// Run against an embedded in-memory broker (development only)
    #[command(long_about = dev::DEV_ABOUT, after_help = dev::DEV_EXAMPLES)]
    Dev(dev::DevArgs),
    /// One command, nothing installed: embedded broker, processor, load, verify
    #[command(long_about = demo::DEMO_ABOUT)]
    Demo(demo::DemoArgs),
    /// Produce generated events (Zipf keys, bursts, the article's cases)
    #[command(long_about = load::LOAD_ABOUT, after_help = load::LOAD_EXAMPLES)]
    Load(load::LoadArgs),
    /// Print a topic's records, one readable line each
    #[command(long_about = tail::TAIL_ABOUT, after_help = tail::TAIL_EXAMPLES)]
    Tail(tail::TailArgs),
    /// A webhook receiver for the HTTP sink, with injected failures and delays
    #[command(long_about = receive::RECEIVE_ABOUT, after_help = receive::RECEIVE_EXAMPLES)]
    Receive(receive::ReceiveArgs),
}

/// A failure of a command, with the exit status it maps to.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Topics(#[from] crate::kafka::admin::TopicsError),
    /// The configuration's record sizes do not fit the cluster's limits.
    #[error(transparent)]
    Limits(#[from] crate::kafka::limits::LimitsError),
    #[error("{0}")]
    Runtime(String),
    /// The brokers lack what the configuration asks for (transactions).
    #[error("{0}")]
    Unsupported(String),
    /// A check that ran and said no (verify found problems, replay refused).
    #[error("{0}")]
    Failed(String),
}

impl CliError {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            CliError::Config(_) | CliError::Limits(_) | CliError::Unsupported(_) => {
                ExitCode::from(2)
            }
            CliError::Topics(_) | CliError::Runtime(_) | CliError::Failed(_) => ExitCode::from(1),
        }
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            error.exit_code()
        }
    }
}

fn run(mut cli: Cli) -> Result<(), CliError> {
    // The demo prints its own story; the processor's logs would drown it.
    if matches!(cli.command, Command::Demo(_)) && cli.global.log_level.is_none() {
        cli.global.log_level = Some("error".into());
    }
    let state_dir = match &cli.command {
        Command::Run(args) => args.state_dir.clone(),
        Command::Replay(args) => args.state_dir.clone(),
        Command::State(args) => args.command.state_dir(),
        _ => None,
    };
    let metrics_addr = match &cli.command {
        Command::Run(args) => args.metrics_addr.clone(),
        Command::Dev(args) => args.metrics_addr.clone(),
        _ => None,
    };
    let settings = load_settings(&cli.global, state_dir, metrics_addr)?;
    init_logging(&settings);
    match cli.command {
        Command::Run(_) => run::run(settings),
        Command::Topics(args) => topics::run(&settings, args),
        Command::Config(args) => config_cmd::run(&settings, args),
        Command::Verify(args) => verify::run(&settings, args),
        Command::Replay(args) => replay::run(&settings, args),
        Command::State(args) => state_cmd::run(&settings, args),
        Command::Dev(args) => dev::run(settings, args),
        Command::Demo(args) => demo::run(settings, args),
        Command::Load(args) => load::run(&settings, args),
        Command::Tail(args) => tail::run(&settings, args),
        Command::Receive(args) => receive::run(args),
    }
}

fn load_settings(
    global: &GlobalArgs,
    state_dir: Option<PathBuf>,
    metrics_addr: Option<String>,
) -> Result<Settings, ConfigError> {
    let overrides = Overrides {
        brokers: global.brokers.clone(),
        log_level: global.log_level.clone(),
        log_format: global.log_format,
        state_dir,
        metrics_addr,
    };
    config::load(global.config.as_deref(), &overrides)
}

fn init_logging(settings: &Settings) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.log_level));
    // Colours only on a terminal: log files and collectors get plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    // A second initialisation (tests calling in twice) is harmless: keep the first.
    let _ = match settings.log_format {
        crate::config::LogFormat::Text => builder.try_init(),
        crate::config::LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}

/// A progress bar on stderr (drawn only when stderr is a terminal).
fn progress_bar(length: u64, message: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(length),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg:24} [{bar:32}] {human_pos}/{human_len} records, {per_sec}, {eta} left",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(message.to_string());
    bar
}

/// A point in time from RFC 3339 (`2026-11-27T08:00:00Z`) or an age
/// (`30m`: that long ago), as milliseconds since the epoch.
fn parse_time(text: &str) -> Result<i64, String> {
    let at = match humantime::parse_rfc3339_weak(text) {
        Ok(at) => at,
        Err(_) => {
            let age = humantime::parse_duration(text).map_err(|_| {
                format!("`{text}` is neither an RFC 3339 time (2026-11-27T08:00:00Z) nor an age (30m, 2h)")
            })?;
            std::time::SystemTime::now()
                .checked_sub(age)
                .ok_or_else(|| format!("`{text}` is too long ago"))?
        }
    };
    at.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .map_err(|_| format!("`{text}` is before 1970"))
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// A flag that SIGINT or SIGTERM sets, for commands that loop without a
/// runtime of their own (tail, load).
fn stop_flag() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let set = flag.clone();
    let _ = std::thread::Builder::new()
        .name("keyflight-signals".into())
        .spawn(move || {
            if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                runtime.block_on(shutdown_signal());
                set.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        });
    flag
}

/// A multi-threaded runtime for commands that talk to Kafka.
fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Runtime(format!("cannot start the async runtime: {e}")))
}

/// Refuses to change offsets or state while the application may be running:
/// a store under the state dir held by a live process, or members in the
/// consumer group. `force` skips the group check only (for brokers that
/// cannot describe groups), never the local one.
fn ensure_stopped(settings: &Settings, force: bool, what: &str) -> Result<(), CliError> {
    let stores = crate::state::Store::existing(
        &settings.state_dir,
        &settings.application_id,
        &settings.topics.input,
    );
    if let Some((partition, dir)) = stores
        .iter()
        .find(|(_, dir)| crate::state::Store::in_use(dir))
    {
        return Err(CliError::Failed(format!(
            "a keyflight process is running with this state dir (the store of partition {partition}, {}, is locked); stop it before {what}",
            dir.display()
        )));
    }
    match crate::kafka::replay::active_members(settings) {
        Ok(members) if members.is_empty() => Ok(()),
        Ok(members) => Err(CliError::Failed(format!(
            "consumer group `{}` has {} active member(s): {}; stop every keyflight instance of this application before {what}",
            settings.application_id,
            members.len(),
            members.join(", ")
        ))),
        Err(e) if force => {
            tracing::warn!("--force: not checking the group's members ({e})");
            Ok(())
        }
        Err(e) => Err(CliError::Failed(format!(
            "cannot tell whether consumer group `{}` has active members ({e}); stop every keyflight instance of this application, then pass --force to skip this check",
            settings.application_id
        ))),
    }
}
