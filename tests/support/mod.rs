//! Test support: a real Kafka-compatible broker (Tansu) per test.
//!
//! [`Broker::start`] launches `tansu broker` as a child process on a free
//! loopback port with a SQLite store in a temporary directory, waits until it
//! answers a metadata request, and kills it when the guard drops (also when
//! the test panics, and, through PR_SET_PDEATHSIG, when the test process
//! itself dies). A test that cannot find or start the broker fails loudly:
//! broker tests never skip.
//!
//! The broker binary: `$TANSU_BIN`, else `$HOME/.cache/keyflight/tansu/bin/tansu`
//! (where `scripts/test.sh` installs it), else `tansu` on `PATH`.

#![allow(dead_code)]

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

static TOPIC_COUNTER: AtomicUsize = AtomicUsize::new(0);

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
        // SAFETY: prctl is async-signal-safe; this only asks the kernel to
        // kill the broker if the test process dies without dropping the guard.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
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

// ---------------------------------------------------------------------------
// The processor under test and the topics around it.

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::Headers;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use std::collections::BTreeMap;

/// The topics and config file of one test's application.
pub struct App {
    pub id: String,
    pub input: String,
    pub pushed: String,
    pub dlq: String,
    pub changelog: String,
    pub partitions: i32,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

impl App {
    /// Unique topics, created through `keyflight topics create`, and a
    /// config file; `extra` is appended to the config (TOML).
    pub fn create(broker: &Broker, partitions: i32, extra: &str) -> App {
        let id = broker.unique("app");
        let (input, pushed, dlq) = (
            broker.unique("in"),
            broker.unique("pushed"),
            broker.unique("dlq"),
        );
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("keyflight.toml");
        std::fs::write(
            &config,
            format!(
                "{}[topics]\ninput = \"{input}\"\npushed = \"{pushed}\"\ndead_letter = \"{dlq}\"\n",
                base_config(&id, &broker.bootstrap, extra)
            ),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_keyflight"))
            .args([
                "--config",
                config.to_str().unwrap(),
                "topics",
                "create",
                "--partitions",
                &partitions.to_string(),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "topics create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        App {
            changelog: format!("{id}-markers-changelog"),
            id,
            input,
            pushed,
            dlq,
            partitions,
            dir,
            config,
        }
    }

    /// Points the output at a topic that does not exist yet (created later
    /// with [`create_topic`]), so pushes fail meanwhile.
    pub fn with_missing_output(mut self, broker: &Broker) -> App {
        self.pushed = self.retarget("pushed", &self.pushed, broker.unique("pushed-later"));
        self
    }

    /// Points the dead-letter topic at one that does not exist yet, so dead
    /// letters fail meanwhile.
    pub fn with_missing_dead_letter(mut self, broker: &Broker) -> App {
        self.dlq = self.retarget("dead_letter", &self.dlq, broker.unique("dlq-later"));
        self
    }

    /// Rewrites `key = "old"` to `key = "new"` in the config; returns `new`.
    fn retarget(&self, key: &str, old: &str, new: String) -> String {
        let text = std::fs::read_to_string(&self.config).unwrap();
        std::fs::write(
            &self.config,
            text.replace(&format!("{key} = \"{old}\""), &format!("{key} = \"{new}\"")),
        )
        .unwrap();
        new
    }

    /// Points the changelog at a topic that does not exist (yet).
    pub fn with_missing_changelog(mut self, broker: &Broker) -> App {
        let missing = broker.unique("changelog-later");
        let mut text = std::fs::read_to_string(&self.config).unwrap();
        text.push_str(&format!("changelog = \"{missing}\"\n")); // the file ends in [topics]
        std::fs::write(&self.config, text).unwrap();
        self.changelog = missing;
        self
    }

    /// With the output missing ([`App::with_missing_output`]): runs a
    /// processor on state dir `a` until every key of `events` has its markT1
    /// in the changelog and pushes are failing, then kills it and outlives
    /// its session. Leaves one open marker per key.
    pub async fn crash_with_open_markers(&self, broker: &Broker, events: &[TestEvent]) {
        let keys: std::collections::BTreeSet<&String> = events.iter().map(|e| &e.key).collect();
        let mut crashed = self.start(&self.state_dir("a"));
        produce(broker, &self.input, events).await;
        wait_until(Duration::from_secs(60), Duration::from_millis(200), || {
            let marked: std::collections::BTreeSet<String> = read_all(broker, &self.changelog)
                .into_iter()
                .map(|r| r.key)
                .collect();
            if marked.len() == keys.len() && crashed.log().contains("push failed") {
                Ok(())
            } else {
                Err(format!("markers not in the changelog:\n{}", crashed.log()))
            }
        });
        crashed.kill_and_outlive_session();
    }

    pub fn state_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts `keyflight run` with this app's config and the given state dir.
    pub fn start(&self, state_dir: &std::path::Path) -> Processor {
        self.start_with_env(state_dir, &[])
    }

    /// [`App::start`] with extra environment (e.g. `KEYFLIGHT_*` settings).
    pub fn start_with_env(&self, state_dir: &std::path::Path, env: &[(&str, &str)]) -> Processor {
        let log_path = state_dir.with_extension(format!(
            "{}.log",
            TOPIC_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let log = std::fs::File::create(&log_path).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_keyflight"));
        command
            .args([
                "--config",
                self.config.to_str().unwrap(),
                "run",
                "--state-dir",
                state_dir.to_str().unwrap(),
            ])
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: see Broker::start.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        Processor {
            child: Some(command.spawn().expect("keyflight run starts")),
            log_path,
        }
    }
}

/// A dead member's partitions move on after the session timeout, and a
/// rebalance waits for members that do not rejoin up to the rebalance
/// timeout (`max.poll.interval.ms`): both short, so restarts after SIGKILL
/// rebalance in seconds rather than librdkafka's default 45 s and 5 min.
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(6);
pub const FAST_GROUP: &str = "[kafka.consumer]\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"1000\"\n\"max.poll.interval.ms\" = \"20000\"\n";

/// A test app's config: fast commits and shutdown, quiet librdkafka, a free
/// metrics port, then `extra` (which may open tables of its own).
fn base_config(id: &str, bootstrap: &str, extra: &str) -> String {
    format!(
        "application_id = \"{id}\"\nbrokers = \"{bootstrap}\"\ncommit_interval = \"500ms\"\nshutdown_timeout = \"10s\"\n\
         log_level = \"info,librdkafka=warn\"\nmetrics_addr = \"127.0.0.1:0\"\n{extra}\n"
    )
}

/// The stdout of a command that must have exited 0; its output otherwise.
pub fn succeeded(out: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A running `keyflight run`; killed on drop unless stopped.
pub struct Processor {
    child: Option<Child>,
    pub log_path: PathBuf,
}

impl Processor {
    /// SIGKILL: no shutdown, no commit, no checkpoint.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGKILL, then waits out the dead member's session (apps made with
    /// [`FAST_GROUP`]) before anyone restarts it. Tansu 0.6's coordinator
    /// keeps a SIGKILLed member as the group's leader if a new member joins
    /// while its session lives, and hands the newcomer an empty assignment.
    /// A sleep, because there is nothing to await: Tansu cannot describe
    /// groups on its SQLite storage.
    pub fn kill_and_outlive_session(&mut self) {
        self.kill();
        std::thread::sleep(SESSION_TIMEOUT + Duration::from_secs(1));
    }

    /// Waits for the process to exit by itself; returns its status.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let log = self.log_path.clone();
        wait_until(limit, Duration::from_millis(50), || {
            child.try_wait().unwrap().ok_or_else(|| {
                format!(
                    "keyflight did not exit:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            })
        })
    }

    /// Waits until the log contains `needle` at least `count` times.
    pub fn await_log(&self, needle: &str, count: usize, limit: Duration) {
        wait_until(limit, Duration::from_millis(100), || {
            let log = self.log();
            if log.matches(needle).count() >= count {
                Ok(())
            } else {
                Err(format!("no {count}x {needle:?} in the log:\n{log}"))
            }
        })
    }

    /// SIGTERM, then waits for a clean exit (status 0) within `limit`.
    pub fn stop(&mut self, limit: Duration) {
        let pid = self.child.as_ref().expect("running").id();
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let status = self.wait_exit(limit);
        assert!(
            status.success(),
            "keyflight exited with {status}:\n{}",
            self.log()
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The address the processor serves /metrics on, once it has logged it.
    pub fn metrics_addr(&self, limit: Duration) -> String {
        wait_until(limit, Duration::from_millis(5), || {
            let log = self.log();
            keyflight::metrics::scrape::served_addr(&log)
                .ok_or_else(|| format!("no metrics address in the log:\n{log}"))
        })
    }
}

#[allow(unused_imports)] // not every test binary scrapes
pub use keyflight::metrics::scrape::{http_get, Scrape};

impl Drop for Processor {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A keyed event as tests produce it.
#[derive(Clone, Debug)]
pub struct TestEvent {
    pub key: String,
    pub value: Option<String>,
}

/// Produces records with binary values (`None`: a delete).
pub async fn produce_bytes(broker: &Broker, topic: &str, records: &[(String, Option<Vec<u8>>)]) {
    let producer: FutureProducer = broker
        .client_config()
        .set("partitioner", "murmur2_random")
        .create()
        .unwrap();
    for (key, value) in records {
        let mut record = FutureRecord::to(topic).key(key);
        if let Some(value) = value {
            record = record.payload(value);
        }
        producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)
            .expect("delivered");
    }
}

/// Produces events in order (keys hash to partitions like Java clients).
pub async fn produce(broker: &Broker, topic: &str, events: &[TestEvent]) {
    let producer: FutureProducer = broker
        .client_config()
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let mut pending = Vec::with_capacity(events.len());
    for event in events {
        let mut record = FutureRecord::to(topic).key(&event.key);
        if let Some(value) = &event.value {
            record = record.payload(value);
        }
        match producer.send_result(record) {
            Ok(delivery) => pending.push(delivery),
            Err((e, _)) => panic!("produce failed: {e}"),
        }
    }
    for delivery in pending {
        delivery.await.expect("delivery future").expect("delivered");
    }
}

/// One record of an output topic.
#[derive(Clone, Debug)]
pub struct Pushed {
    pub key: String,
    pub value: Option<String>,
    pub raw: Option<Vec<u8>>,
    pub headers: BTreeMap<String, String>,
    pub partition: i32,
    pub offset: i64,
}

/// Reads a whole topic (every partition, to its high watermark now).
pub fn read_all(broker: &Broker, topic: &str) -> Vec<Pushed> {
    read_all_at(&broker.bootstrap, topic)
}

/// [`read_all`] on any broker address.
pub fn read_all_at(bootstrap: &str, topic: &str) -> Vec<Pushed> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set(
            "group.id",
            format!("reader-{}", TOPIC_COUNTER.fetch_add(1, Ordering::Relaxed)),
        )
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let partitions = metadata.topics()[0].partitions().len() as i32;
    let mut assignment = TopicPartitionList::new();
    let mut remaining = 0;
    for p in 0..partitions {
        let (_, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .unwrap();
        if high > 0 {
            assignment
                .add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
            remaining += high;
        }
    }
    let mut out = Vec::new();
    if remaining == 0 {
        return out;
    }
    consumer.assign(&assignment).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while (out.len() as i64) < remaining {
        assert!(
            Instant::now() < deadline,
            "read {} of {remaining} records of {topic}",
            out.len()
        );
        if let Some(message) = consumer.poll(Duration::from_millis(200)) {
            let message = message.expect("consume");
            let headers = message
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            (
                                h.key.to_string(),
                                String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(Pushed {
                key: String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned(),
                value: message
                    .payload()
                    .map(|v| String::from_utf8_lossy(v).into_owned()),
                raw: message.payload().map(<[u8]>::to_vec),
                headers,
                partition: message.partition(),
                offset: message.offset(),
            });
        }
    }
    out.sort_by_key(|p| (p.partition, p.offset));
    out
}

/// The last record per key (topics are partitioned by key, so per-partition
/// order is per-key order).
pub fn last_per_key(records: &[Pushed]) -> BTreeMap<String, Pushed> {
    records.iter().map(|r| (r.key.clone(), r.clone())).collect()
}

/// The latest event per key, in production order.
pub fn latest_per_key(events: &[TestEvent]) -> BTreeMap<String, Option<String>> {
    events
        .iter()
        .map(|e| (e.key.clone(), e.value.clone()))
        .collect()
}

/// Waits until the last push of every key equals its latest event; returns
/// everything pushed. Panics with the differences (and the log) at `limit`.
pub fn await_final_state(
    broker: &Broker,
    app: &App,
    events: &[TestEvent],
    limit: Duration,
    processor: &Processor,
) -> Vec<Pushed> {
    let expected = latest_per_key(events);
    wait_until(limit, Duration::from_millis(300), || {
        let pushed = read_all(broker, &app.pushed);
        let last = last_per_key(&pushed);
        let wrong: Vec<_> = expected
            .iter()
            .filter(|(key, value)| last.get(*key).map(|p| &p.value) != Some(*value))
            .map(|(key, value)| {
                format!(
                    "{key}: want {value:?}, got {:?}",
                    last.get(key).map(|p| &p.value)
                )
            })
            .collect();
        if wrong.is_empty() {
            return Ok(pushed);
        }
        Err(format!(
            "{} keys not final, e.g. {:?}\nlog:\n{}",
            wrong.len(),
            &wrong[..wrong.len().min(5)],
            processor.log()
        ))
    })
}

/// Polls `check` every `every` until it yields a value; once `limit` has
/// passed, panics with its last complaint.
pub fn wait_until<T>(
    limit: Duration,
    every: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        match check() {
            Ok(value) => return value,
            Err(why) if Instant::now() > deadline => panic!("not within {limit:?}: {why}"),
            Err(_) => std::thread::sleep(every),
        }
    }
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

impl App {
    /// An app on librdkafka's mock cluster (hosted by the test process, on a
    /// loopback port): the topics are created on the cluster directly, since
    /// the mock broker has no CreateTopics.
    pub fn on_mock_cluster(
        cluster: &rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
        partitions: i32,
        extra: &str,
    ) -> App {
        let id = format!("app-{}", TOPIC_COUNTER.fetch_add(1, Ordering::Relaxed));
        let (input, pushed, dlq) = (
            "events.in".to_string(),
            "events.pushed".to_string(),
            "events.dlq".to_string(),
        );
        let changelog = format!("{id}-markers-changelog");
        for topic in [&input, &pushed, &dlq, &changelog] {
            cluster.create_topic(topic, partitions, 1).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("keyflight.toml");
        std::fs::write(
            &config,
            base_config(&id, &cluster.bootstrap_servers(), extra),
        )
        .unwrap();
        App {
            id,
            input,
            pushed,
            dlq,
            changelog,
            partitions,
            dir,
            config,
        }
    }

    /// Runs `keyflight --config <this app's config> <args>` to completion.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_keyflight"))
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env_remove("RUST_LOG")
            .output()
            .expect("keyflight runs")
    }

    /// `keyflight verify --json`: the report when it passes, else why not.
    pub fn verify(&self) -> Result<serde_json::Value, String> {
        let out = self.cli(&["verify", "--json"]);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let report: serde_json::Value = serde_json::from_str(&stdout).map_err(|e| {
            format!(
                "verify printed no JSON ({e}): {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        assert_eq!(
            out.status.success(),
            report["passed"] == true,
            "exit status agrees with the report"
        );
        if out.status.success() {
            Ok(report["report"].clone())
        } else {
            Err(format!("verify failed: {}", summary(&report["report"])))
        }
    }

    /// Waits until `verify` passes; returns its report.
    pub fn await_verified(&self, limit: Duration, log: impl Fn() -> String) -> serde_json::Value {
        wait_until(limit, Duration::from_millis(500), || {
            self.verify().map_err(|e| format!("{e}\nlog:\n{}", log()))
        })
    }
}

/// The counts of a verify report, on one line.
pub fn summary(report: &serde_json::Value) -> String {
    let len = |k: &str| report[k].as_array().map_or(0, Vec::len);
    format!(
        "{} keys, {} matched, {} missing, {} stale, {} differing, {} unexpected, {} events ({} behind), dead letters {}/{} (first problems: {:?} {:?})",
        report["keys"], report["matched"], len("missing"), len("stale"), len("differing"),
        len("unexpected"), report["events"], report["events_behind"],
        report["dead_letters_found"], report["dead_letters_expected"],
        report["missing"].get(0), report["stale"].get(0)
    )
}

/// A record to produce: optional key, optional value.
pub type Record = (Option<Vec<u8>>, Option<Vec<u8>>);

/// Produces records with optional keys and values, in order.
pub async fn produce_records(broker: &Broker, topic: &str, records: &[Record]) {
    let producer: FutureProducer = broker
        .client_config()
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let mut pending = Vec::with_capacity(records.len());
    for (key, value) in records {
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic);
        if let Some(key) = key {
            record = record.key(&key[..]);
        }
        if let Some(value) = value {
            record = record.payload(&value[..]);
        }
        match producer.send_result(record) {
            Ok(delivery) => pending.push(delivery),
            Err((e, _)) => panic!("produce failed: {e}"),
        }
    }
    for delivery in pending {
        delivery.await.expect("delivery future").expect("delivered");
    }
}

/// Continuous load in a background thread: JSON events over `keys` keys
/// whose per-key `version` only grows, `rate` events per second, until
/// stopped.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    produced: std::sync::Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl Load {
    pub fn start(broker: &Broker, topic: &str, keys: usize, rate: usize) -> Load {
        Load::start_at(&broker.bootstrap, topic, keys, rate)
    }

    /// [`Load::start`] on any broker address.
    pub fn start_at(bootstrap: &str, topic: &str, keys: usize, rate: usize) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let produced = std::sync::Arc::new(AtomicUsize::new(0));
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("enable.idempotence", "true")
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "5")
            .create()
            .unwrap();
        let topic = topic.to_string();
        let thread = {
            let (stop, produced) = (stop.clone(), produced.clone());
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    let mut versions = vec![0u64; keys];
                    let batch = (rate / 20).max(1); // 20 batches a second
                    let started = Instant::now();
                    let mut sent = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        let mut pending = Vec::with_capacity(batch);
                        for i in 0..batch {
                            // Every third event hits one of ten hot keys;
                            // the others (the m-th of them) walk all keys.
                            let n = sent + i;
                            let k = if n.is_multiple_of(3) {
                                (n / 3) % keys.min(10)
                            } else {
                                (n - n / 3 - 1) * 7919 % keys
                            };
                            versions[k] += 1;
                            let key = format!("key-{k:04}");
                            let value = format!(
                                "{{\"version\":{},\"key\":{k},\"seq\":{}}}",
                                versions[k],
                                sent + i
                            );
                            let record = FutureRecord::to(&topic).key(&key).payload(&value);
                            match producer.send_result(record) {
                                Ok(delivery) => pending.push(delivery),
                                Err((e, _)) => panic!("produce failed: {e}"),
                            }
                        }
                        for delivery in pending {
                            delivery.await.expect("delivery future").expect("delivered");
                        }
                        sent += batch;
                        produced.store(sent, Ordering::Relaxed);
                        // Pace to the rate (a rate limit, not a wait for an event).
                        let due = started + Duration::from_secs_f64(sent as f64 / rate as f64);
                        tokio::time::sleep_until(due.into()).await;
                    }
                    sent
                })
            })
        };
        Load {
            stop,
            produced,
            thread: Some(thread),
        }
    }

    /// Events acknowledged so far.
    pub fn produced(&self) -> usize {
        self.produced.load(Ordering::Relaxed)
    }

    /// Stops and returns the number of events produced.
    pub fn stop(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().expect("load thread")
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
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
