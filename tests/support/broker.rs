//! The broker: one Tansu per test, and direct topic administration.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::dies_with_tests;

pub static TOPIC_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A running broker; killed on drop.
pub struct Broker {
    child: Child,
    /// `127.0.0.1:PORT`, for `bootstrap.servers` / `--brokers`.
    pub bootstrap: String,
    dir: tempfile::TempDir,
}

impl Broker {
    pub fn start() -> Broker {
        let bin = tansu_binary();
        let dir = tempfile::tempdir().expect("temporary directory for the broker");
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let log = std::fs::File::create(dir.path().join("tansu.log")).expect("broker log file");
        let mut command = Command::new(&bin);
        command
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            // Relative to the working directory: the store lives in the temp dir.
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(dir.path())
            .env_remove("STORAGE_ENGINE")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("broker log file"))
            .stderr(log);
        dies_with_tests(&mut command);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the broker {}: {e}", bin.display()));
        let mut broker = Broker {
            child,
            bootstrap: format!("127.0.0.1:{port}"),
            dir,
        };
        broker.wait_ready(Duration::from_secs(60));
        broker
    }

    /// Waits until the broker answers metadata with itself as a broker.
    fn wait_ready(&mut self, limit: Duration) {
        let client: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("log_level", "3")
            .create()
            .expect("metadata client");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("broker status") {
                panic!(
                    "the broker exited with {status} before it was ready:\n{}",
                    self.log()
                );
            }
            // Blocks up to a second while librdkafka connects and asks.
            match client.fetch_metadata(None, Duration::from_secs(1)) {
                Ok(metadata) if !metadata.brokers().is_empty() => return,
                _ if Instant::now() > deadline => {
                    panic!(
                        "the broker at {} did not answer metadata within {limit:?}:\n{}",
                        self.bootstrap,
                        self.log()
                    )
                }
                _ => {}
            }
        }
    }

    /// A topic name no other test uses.
    pub fn unique(&self, prefix: &str) -> String {
        format!(
            "{prefix}-{}-{}",
            std::process::id(),
            TOPIC_COUNTER.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// What the broker printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tansu.log")).unwrap_or_default()
    }

    /// A librdkafka configuration pointing at this broker.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap);
        config
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn tansu_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TANSU_BIN") {
        return PathBuf::from(path);
    }
    if let Some(home) = std::env::var_os("HOME") {
        let cached = PathBuf::from(home).join(".cache/keyflight/tansu/bin/tansu");
        if cached.is_file() {
            return cached;
        }
    }
    let on_path = std::env::var_os("PATH").map(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("tansu"))
            .find(|p| p.is_file())
    });
    on_path.flatten().unwrap_or_else(|| {
        panic!(
            "no Tansu broker found: set TANSU_BIN, or run scripts/test.sh, which installs it into \
             $HOME/.cache/keyflight/tansu (cargo install tansu --version 0.6.0 --features libsql)"
        )
    })
}

/// Creates a topic directly (bypassing keyflight).
pub async fn create_topic(broker: &Broker, name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = broker.client_config().create().unwrap();
    let results = admin
        .create_topics(
            &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
    results
        .into_iter()
        .for_each(|r| drop(r.expect("topic created")));
}

/// The committed offsets of `group` on `topic` (-1 where none), and the
/// high watermarks, per partition.
pub fn committed_and_high(
    broker: &Broker,
    group: &str,
    topic: &str,
    partitions: i32,
) -> (Vec<i64>, Vec<i64>) {
    let consumer: BaseConsumer = broker
        .client_config()
        .set("group.id", group)
        .create()
        .unwrap();
    let mut list = TopicPartitionList::new();
    for p in 0..partitions {
        list.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(list, Duration::from_secs(10))
        .unwrap();
    let committed = (0..partitions)
        .map(
            |p| match committed.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => -1,
            },
        )
        .collect();
    let high = (0..partitions)
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .unwrap()
                .1
        })
        .collect();
    (committed, high)
}
