//! `keyflight dev`: the processor against an embedded broker.

use clap::Args;

use super::CliError;
use crate::config::Settings;
use crate::kafka::embedded::Embedded;

pub const DEV_ABOUT: &str = "\
Start an embedded Kafka-protocol broker inside this process (librdkafka's mock
cluster, on a loopback port), create keyflight's topics on it, and run the
processor against it. Any Kafka client can produce to the input topic and
read the pushed topic at the printed bootstrap address while it runs.

The embedded broker keeps everything in memory and forgets it at exit, and so
does the processor's state (a temporary state dir): for development and
trying things out only, never for data you need. Ctrl-C stops cleanly.";

pub const DEV_EXAMPLES: &str = "\
Examples:
  keyflight dev                                   # then, in another terminal:
  keyflight load --brokers <printed address> --events 10000 --keys 100 --scenarios
  keyflight tail --brokers <printed address> --from-beginning";

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Partitions of every topic
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=64))]
    pub partitions: i32,
    /// Serve /metrics, /healthz and /readyz here (host:port, port 0 for a free one, or `off`)
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<String>,
}

pub fn run(mut settings: Settings, args: DevArgs) -> Result<(), CliError> {
    let embedded = Embedded::start(&settings, args.partitions)
        .map_err(|e| CliError::Runtime(format!("cannot start the embedded broker: {e}")))?;
    let state = TempState::new("dev")?;
    settings.brokers = embedded.bootstrap();
    settings.state_dir = state.0.clone();
    let topics = settings.topics.clone();
    let (brokers, changelog) = (settings.brokers.clone(), settings.changelog_topic());
    let partitions = args.partitions;
    let announce = move |metrics: Option<std::net::SocketAddr>| {
        let metrics = metrics.map_or("off".to_string(), |a| {
            format!("http://{a}/metrics  (also /healthz, /readyz)")
        });
        println!(
            "keyflight dev: an embedded Kafka-protocol broker runs in this process.\n\
             It keeps everything in memory and is for development only.\n\n\
             \x20 bootstrap  {brokers}\n\
             \x20 input      {} ({partitions} partitions)\n\
             \x20 pushed     {}\n\
             \x20 dead       {}\n\
             \x20 changelog  {changelog}\n\
             \x20 metrics    {metrics}\n\n\
             Produce keyed events to {} with any Kafka client, for example:\n\
             \x20 keyflight load --brokers {brokers} --events 10000 --keys 100 --scenarios\n\
             \x20 keyflight tail --brokers {brokers} --from-beginning\n\
             Ctrl-C stops.",
            topics.input, topics.pushed, topics.dead_letter, topics.input,
        );
    };
    let result = super::run::run_announcing(settings, announce);
    drop(embedded); // after the processor, which still talks to it while stopping
    result
}

/// A state dir of its own for an in-memory broker's processor (state from
/// an earlier run would not match the new, empty broker); removed on drop.
pub struct TempState(pub std::path::PathBuf);

impl TempState {
    pub fn new(purpose: &str) -> Result<Self, CliError> {
        let dir = std::env::temp_dir().join(format!(
            "keyflight-{purpose}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        std::fs::create_dir_all(&dir).map_err(|e| {
            CliError::Runtime(format!(
                "cannot create the state dir {}: {e}",
                dir.display()
            ))
        })?;
        Ok(TempState(dir))
    }
}

impl Drop for TempState {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
