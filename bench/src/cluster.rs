//! The broker under test (librdkafka's mock cluster in process, or an
//! external one), fresh topics per measurement, and loading events.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use keyflight::codec::InputFormat;
use keyflight::config::{KafkaValue, Settings};
use keyflight::kafka::load::{self, LoadProducer, LoadSummary};
use keyflight::loadgen::{Generator, LoadEvent, LoadSpec};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

use crate::{Child, Result};

// Broker and topics

pub(crate) enum Cluster {
    Mock(MockCluster<'static, DefaultProducerContext>),
    External(String),
}

impl Cluster {
    pub(crate) fn new(brokers: Option<&str>) -> Result<Cluster> {
        match brokers {
            Some(b) => Ok(Cluster::External(b.to_string())),
            None => MockCluster::new(1)
                .map(Cluster::Mock)
                .map_err(|e| format!("cannot start the mock cluster: {e}")),
        }
    }

    pub(crate) fn bootstrap(&self) -> String {
        match self {
            Cluster::Mock(c) => c.bootstrap_servers(),
            Cluster::External(b) => b.clone(),
        }
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            Cluster::Mock(_) => "librdkafka mock cluster (in process)".into(),
            Cluster::External(b) => format!("external at {b}"),
        }
    }

    pub(crate) fn create(&self, topics: &[&str], partitions: i32) -> Result<()> {
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
pub(crate) struct Env<'a> {
    pub(crate) cluster: &'a Cluster,
    pub(crate) partitions: i32,
    pub(crate) fetch: Fetch,
    pub(crate) work: &'a Path,
}

/// The consumers' fetch timing, the same for every system measured.
#[derive(Debug, Clone, Copy, clap::Args)]
pub(crate) struct Fetch {
    /// librdkafka's fetch.wait.max.ms for both systems: how long a broker
    /// may hold a fetch that has too little data (its 500 ms default would
    /// dominate the latencies on Tansu and the mock cluster)
    #[arg(long = "fetch-wait-ms", value_name = "MS", default_value_t = 10)]
    pub(crate) wait_ms: u32,
    /// librdkafka's fetch.queue.backoff.ms for both systems: how long a
    /// consumer whose local queue is over its thresholds waits before the
    /// next fetch. Its 1000 ms default held the copy to about 130 000
    /// events/s on the mock cluster (bursts with 750 ms gaps), a quarter of
    /// what it copies with 10 ms
    #[arg(
        long = "fetch-queue-backoff-ms",
        value_name = "MS",
        default_value_t = 10
    )]
    pub(crate) queue_backoff_ms: u32,
}

/// One fresh set of topics, a keyflight config for them, and a state dir.
pub(crate) struct App {
    pub(crate) settings: Settings,
    pub(crate) copied: String,
    pub(crate) config: PathBuf,
    pub(crate) state: PathBuf,
}

impl App {
    pub(crate) fn create(env: &Env, name: &str) -> Result<App> {
        App::create_with(env, name, |_| {})
    }

    /// [`App::create`], with `configure` changing the settings before
    /// they are written (the HTTP sink, for instance).
    pub(crate) fn create_with(
        env: &Env,
        name: &str,
        configure: impl FnOnce(&mut Settings),
    ) -> Result<App> {
        let (cluster, partitions, work) = (env.cluster, env.partitions, env.work);
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
            KafkaValue::Int(env.fetch.wait_ms.into()),
        );
        settings.kafka.consumer.insert(
            "fetch.queue.backoff.ms".into(),
            KafkaValue::Int(env.fetch.queue_backoff_ms.into()),
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
        configure(&mut settings);
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

    pub(crate) fn keyflight(&self, log: &Path) -> Result<Child> {
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

    pub(crate) fn copy(&self, log: &Path) -> Result<Child> {
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
pub(crate) fn sibling(name: &str) -> Result<PathBuf> {
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let path = me.with_file_name(name);
    path.is_file().then_some(path.clone()).ok_or_else(|| {
        format!(
            "{} not found: build it with `cargo build --release --bins`",
            path.display()
        )
    })
}

pub(crate) fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .ok_or_else(|| format!("{} is not UTF-8", path.display()))
}

/// Produces a generated stream to the app's input; returns events/s.
pub(crate) fn produce(app: &App, spec: LoadSpec, rate: Option<f64>) -> Result<f64> {
    let generator = Generator::new(spec).map_err(|e| e.to_string())?;
    Ok(produce_events(app, generator, rate)?.rate())
}

/// Produces `events` to the app's input: how many, over how many keys, how fast.
pub(crate) fn produce_events(
    app: &App,
    events: impl Iterator<Item = LoadEvent>,
    rate: Option<f64>,
) -> Result<LoadSummary> {
    let mut producer =
        LoadProducer::new(&app.settings, &app.settings.topics.input, InputFormat::Json)
            .map_err(|e| e.to_string())?;
    load::run(&mut producer, events, rate, &AtomicBool::new(false), |_| {})
        .map_err(|e| e.to_string())
}
