//! The processor under test: an application's topics and config, and
//! `keyflight run` as a child process.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::*;

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
            let marked: std::collections::BTreeSet<String> = read_markers(broker, &self.changelog)
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
        dies_with_tests(&mut command);
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

/// Asks the kernel to kill the child `command` starts when the test
/// process dies, also without dropping its guard (a crash, SIGKILL).
pub fn dies_with_tests(command: &mut Command) {
    // SAFETY: prctl is async-signal-safe, as pre_exec requires.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// The keyflight binary, with none of the `KEYFLIGHT_*` settings or the
/// `RUST_LOG` of the environment the tests run in.
pub fn keyflight() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_keyflight"));
    command.env_remove("RUST_LOG");
    for (name, _) in std::env::vars() {
        if name.starts_with("KEYFLIGHT_") {
            command.env_remove(name);
        }
    }
    command
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

    /// SIGSTOP: the process freezes (no heartbeats, no I/O) until
    /// [`Processor::thaw`].
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after [`Processor::freeze`].
    pub fn thaw(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = self.child.as_ref().expect("running").id();
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid as i32, signal) };
    }

    /// SIGTERM (harmless if it already exited), then waits for the exit
    /// within `limit`; returns its status.
    pub fn terminate(&mut self, limit: Duration) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit(limit)
    }

    /// SIGTERM, then waits for a clean exit (status 0) within `limit`.
    pub fn stop(&mut self, limit: Duration) {
        let status = self.terminate(limit);
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

pub use keyflight::metrics::scrape::{http_get, Scrape};

/// `GET /metrics` at `addr`, which must answer 200, parsed.
pub fn scrape(addr: &str) -> Scrape {
    let (status, body) = http_get(addr, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{body}");
    Scrape::parse(&body)
}

impl Drop for Processor {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
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

    /// Waits until the group has committed the (one-partition) input up to
    /// its end as of this call, for `limit`; `log` explains a timeout.
    pub fn await_committed(&self, broker: &Broker, limit: Duration, log: impl Fn() -> String) {
        let (_, high) = committed_and_high(broker, &self.id, &self.input, 1);
        wait_until(limit, Duration::from_millis(200), || {
            let (committed, _) = committed_and_high(broker, &self.id, &self.input, 1);
            (committed >= high)
                .then_some(())
                .ok_or_else(|| format!("committed {committed:?} of {high:?}\n{}", log()))
        });
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
