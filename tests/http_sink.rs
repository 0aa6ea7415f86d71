//! The HTTP sink against Tansu and `keyflight receive`: the receiver's last
//! call per key carries the key's latest event and no two calls of a key
//! overlap, also when the receiver fails, throttles and is slow; a kill -9
//! with calls in flight is repaired by compensation; a 4xx dead-letters the
//! push with the answer; TLS with a private CA.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use keyflight::receive::{read_log, CallRecord};

use crate::support::{
    certificates, produce_records, read_all, round, rounds, scrape, start_receiver, succeeded,
    wait_until, App, Broker, Running, FAST_GROUP,
};

/// `keyflight receive` logging calls as JSON lines.
struct Receiver {
    /// Killed on drop.
    _running: Running,
    /// `host:port` it listens on.
    addr: String,
    log: PathBuf,
}

impl Receiver {
    /// Starts a receiver on a free port with `args`; returns once it listens.
    fn start(dir: &Path, args: &[&str]) -> Receiver {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let log = dir.join(format!(
            "calls-{}.jsonl",
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let mut all = vec!["--log", log.to_str().unwrap()];
        all.extend_from_slice(args);
        let running = start_receiver(&all);
        let addr = running.url.rsplit("://").next().unwrap().to_string();
        Receiver {
            _running: running,
            addr,
            log,
        }
    }

    /// Every call answered so far.
    fn calls(&self) -> Vec<CallRecord> {
        if !self.log.exists() {
            return Vec::new();
        }
        read_log(&self.log).unwrap()
    }
}

/// The sink settings of an app pushing to `url`, then `extra`.
fn http_sink(url: &str, extra: &str) -> String {
    format!("[sink]\nkind = \"http\"\n[sink.http]\nurl = \"{url}\"\n{extra}\n")
}

/// `keyflight verify --json --http-log`: the report when it passes.
fn verify_http_log(app: &App, receiver: &Receiver) -> Result<serde_json::Value, String> {
    let out = app.cli(&[
        "verify",
        "--json",
        "--http-log",
        receiver.log.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        Ok(report["report"].clone())
    } else {
        Err(format!(
            "verify --http-log failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Waits until `verify --http-log` passes.
fn await_http_verified(
    app: &App,
    receiver: &Receiver,
    log: impl Fn() -> String,
) -> serde_json::Value {
    wait_until(Duration::from_secs(120), Duration::from_millis(500), || {
        verify_http_log(app, receiver).map_err(|e| format!("{e}\nlog:\n{}", log()))
    })
}

/// No call of a key started before the previous call of that key ended,
/// by the receiver's own clock (calls the client abandoned count too).
fn assert_no_overlap(calls: &[CallRecord]) {
    let mut per_key: BTreeMap<&str, Vec<&CallRecord>> = BTreeMap::new();
    for call in calls {
        assert!(!call.overlapped, "overlapping call: {call:?}");
        per_key
            .entry(call.key.as_deref().expect("every call has a key"))
            .or_default()
            .push(call);
    }
    for (key, mut calls) in per_key {
        calls.sort_by_key(|c| c.start_ns);
        for pair in calls.windows(2) {
            assert!(
                pair[1].start_ns >= pair[0].end_ns,
                "two calls of {key} overlap: {:?} and {:?}",
                pair[0],
                pair[1]
            );
        }
    }
}

/// The version of every key's last answered (2xx) call.
fn last_answered(calls: &[CallRecord]) -> BTreeMap<String, u64> {
    let mut answered: Vec<&CallRecord> = calls
        .iter()
        .filter(|c| (200..300).contains(&c.status))
        .collect();
    answered.sort_by_key(|c| c.seq);
    answered
        .into_iter()
        .filter_map(|c| Some((c.key.clone()?, c.version?)))
        .collect()
}

/// 10 000 events over 100 keys in bursts, to a receiver: its last answered
/// call per key carries version 100, no two calls of a key overlap, bursts
/// collapse (fewer calls than events), and with the audit topic plain
/// `verify` passes too.
#[tokio::test(flavor = "multi_thread")]
async fn every_keys_last_call_carries_its_latest_event_and_calls_never_overlap() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(dir.path(), &["--delay", "2ms"]);
    let audit = broker.unique("audit");
    let app = App::create(
        &broker,
        2,
        &http_sink(
            &format!("http://{}/users/{{key}}", receiver.addr),
            &format!("audit_topic = \"{audit}\"\n"),
        ),
    );
    let mut processor = app.start(&app.state_dir("a"));
    for burst in 0..10u64 {
        let versions = burst * 10 + 1..=burst * 10 + 10;
        produce_records(&broker, &app.input, &rounds(100, versions)).await;
    }
    let report = await_http_verified(&app, &receiver, || processor.log());
    assert_eq!(report["events"], 10_000, "{report}");
    let calls = receiver.calls();
    assert_no_overlap(&calls);
    let last = last_answered(&calls);
    assert_eq!(last.len(), 100);
    assert!(last.values().all(|v| *v == 100), "{last:?}");
    assert!(
        calls.len() < 10_000,
        "bursts merge: {} calls for 10 000 events",
        calls.len()
    );
    for call in &calls {
        let key = call.key.as_deref().unwrap();
        assert_eq!(call.path, format!("/users/{key}"));
        assert_eq!(call.method, "POST");
        assert_eq!(call.content_type.as_deref(), Some("application/json"));
        assert_eq!(
            call.idempotency_key.as_deref(),
            Some(format!("{key}:{}", call.version.unwrap()).as_str())
        );
    }
    // The audit topic holds every answered call, so verify reads it as is.
    let audited = read_all(&broker, &audit);
    assert_eq!(audited.len(), calls.len());
    let report = app.verify().unwrap();
    assert_eq!(report["events_behind"], 0, "{report}");
    processor.stop(Duration::from_secs(30));
}

/// A receiver that fails 30 % of calls with 503, throttles 10 % with 429
/// and `Retry-After: 1`, and takes 20–30 ms per call: every key still ends
/// on its latest event, calls never overlap, the retries are counted, and
/// a throttled key waits out its Retry-After.
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_throttling_slow_receiver_still_gets_every_keys_latest_event() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(
        dir.path(),
        &[
            "--fail-rate",
            "0.3",
            "--throttle-rate",
            "0.1",
            "--retry-after",
            "1",
            "--delay",
            "20ms",
            "--jitter",
            "10ms",
            "--seed",
            "7",
        ],
    );
    let app = App::create(
        &broker,
        1,
        &format!(
            "[push]\nretry_backoff = \"20ms\"\nmax_retry_backoff = \"200ms\"\n{}",
            http_sink(&format!("http://{}/hook/{{key}}", receiver.addr), "")
        ),
    );
    let mut processor = app.start(&app.state_dir("a"));
    produce_records(&broker, &app.input, &rounds(20, 1..=50)).await;
    await_http_verified(&app, &receiver, || processor.log());
    let calls = receiver.calls();
    assert_no_overlap(&calls);
    assert!(last_answered(&calls).values().all(|v| *v == 50));
    let failed = calls.iter().filter(|c| c.status == 503).count();
    assert!(failed > 0, "the receiver failed calls");
    let metrics = scrape(&processor.metrics_addr(Duration::from_secs(10)));
    let retries = metrics.sum("keyflight_http_retries_total", &[]);
    assert!(
        retries >= failed as f64,
        "{retries} retries for {failed} failures"
    );
    assert!(metrics.sum("keyflight_http_requests_total", &["class=\"5xx\""]) >= failed as f64);
    assert!(metrics.sum("keyflight_http_requests_total", &["class=\"2xx\""]) > 0.0);
    // After a 429 the key's next call waits for its Retry-After (1 s).
    let mut per_key: BTreeMap<&str, Vec<&CallRecord>> = BTreeMap::new();
    for call in &calls {
        per_key
            .entry(call.key.as_deref().unwrap())
            .or_default()
            .push(call);
    }
    let mut throttled = 0;
    for calls in per_key.values_mut() {
        calls.sort_by_key(|c| c.start_ns);
        for pair in calls.windows(2).filter(|p| p[0].status == 429) {
            throttled += 1;
            let waited = Duration::from_nanos(pair[1].start_ns - pair[0].end_ns);
            assert!(
                waited >= Duration::from_millis(990),
                "{waited:?} after a 429"
            );
        }
    }
    println!(
        "{} calls: {failed} failed, {throttled} throttled, {retries} retries",
        calls.len()
    );
    processor.stop(Duration::from_secs(30));
}

/// Calls in flight when the processor is killed (the receiver takes 3 s
/// per call): their markers stay open, and after the restart compensation
/// calls every key again (`Keyflight-Compensation: true`), so the final
/// state is right although the killed calls' answers never arrived.
#[tokio::test(flavor = "multi_thread")]
async fn a_kill_with_calls_in_flight_is_repaired_by_compensation_after_the_restart() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(dir.path(), &["--delay", "3s"]);
    let app = App::create(
        &broker,
        1,
        &format!(
            "[compensation]\ninterval = \"1s\"\ngrace = \"1s\"\n{}{FAST_GROUP}",
            http_sink(&format!("http://{}/k/{{key}}", receiver.addr), "")
        ),
    );
    let state = app.state_dir("a");
    let mut processor = app.start(&state);
    produce_records(&broker, &app.input, &round(10, 1)).await;
    // Every key's markT1 is in the changelog: its call has started.
    wait_until(Duration::from_secs(60), Duration::from_millis(100), || {
        let marked = crate::support::read_markers(&broker, &app.changelog).len();
        (marked >= 10)
            .then_some(())
            .ok_or_else(|| format!("{marked} markers\n{}", processor.log()))
    });
    assert!(
        receiver.calls().is_empty(),
        "no call answered before the kill"
    );
    processor.kill_and_outlive_session();
    let restarted = app.start(&state);
    await_http_verified(&app, &receiver, || restarted.log());
    let calls = receiver.calls();
    let compensated: std::collections::BTreeSet<&str> = calls
        .iter()
        .filter(|c| c.compensation == Some(true) && (200..300).contains(&c.status))
        .filter_map(|c| c.key.as_deref())
        .collect();
    assert_eq!(
        compensated.len(),
        10,
        "every key re-sent by compensation: {calls:?}"
    );
    assert_no_overlap(&calls);
}

/// A 422 for one key: its push is dead-lettered (`push-refused`) with the
/// status and the answer's start in headers, the other keys are pushed (a
/// deleted one as a DELETE without a body), and verify accepts the refused
/// key through its dead letter.
#[tokio::test(flavor = "multi_thread")]
async fn a_4xx_dead_letters_the_push_with_the_status_and_answer() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(dir.path(), &["--refuse-key", "key-003"]);
    let app = App::create(
        &broker,
        1,
        &http_sink(&format!("http://{}/k/{{key}}", receiver.addr), ""),
    );
    let mut processor = app.start(&app.state_dir("a"));
    // key-001 is deleted after its event: a DELETE without a body.
    let mut records = round(5, 1);
    records.push((Some(b"key-001".to_vec()), None));
    produce_records(&broker, &app.input, &records).await;
    let letters = wait_until(Duration::from_secs(60), Duration::from_millis(200), || {
        let letters = read_all(&broker, &app.dlq);
        (!letters.is_empty())
            .then_some(letters)
            .ok_or_else(|| format!("no dead letter\n{}", processor.log()))
    });
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter.key, "key-003");
    assert_eq!(letter.headers["keyflight-error-reason"], "push-refused");
    assert_eq!(letter.headers["keyflight-http-status"], "422");
    assert!(
        letter.headers["keyflight-http-body"].contains("key-003"),
        "{letter:?}"
    );
    assert!(
        letter.headers["keyflight-error"].contains("422"),
        "{letter:?}"
    );
    let report = await_http_verified(&app, &receiver, || processor.log());
    assert_eq!(report["matched"], 4, "{report}");
    assert_eq!(report["refused_pushes"], 1, "{report}");
    let calls = receiver.calls();
    let last = calls
        .iter()
        .filter(|c| c.key.as_deref() == Some("key-001"))
        .max_by_key(|c| c.seq)
        .unwrap();
    assert_eq!(
        (
            last.method.as_str(),
            last.body.as_deref(),
            last.content_type.as_deref()
        ),
        ("DELETE", None, None),
        "{last:?}"
    );
    processor.stop(Duration::from_secs(30));
}

/// HTTPS to a receiver whose certificate a private CA signed: without
/// `ca_file` every call fails on the certificate; with it the keys arrive.
#[tokio::test(flavor = "multi_thread")]
async fn https_to_a_receiver_signed_by_a_private_ca_trusted_through_ca_file() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, ca) = certificates(dir.path());
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca).unwrap();
    let ca_file = ca_file.to_str().unwrap();
    let receiver = Receiver::start(dir.path(), &["--tls-cert", &cert, "--tls-key", &key]);
    let port = receiver.addr.rsplit(':').next().unwrap();
    let app = App::create(
        &broker,
        1,
        &http_sink(&format!("https://localhost:{port}/k/{{key}}"), ""),
    );
    produce_records(&broker, &app.input, &round(5, 1)).await;
    let mut untrusting = app.start(&app.state_dir("a"));
    untrusting.await_log("invalid peer certificate", 1, Duration::from_secs(60));
    untrusting.stop(Duration::from_secs(30));
    assert!(receiver.calls().is_empty());
    let trusting = app.start_with_env(
        &app.state_dir("a"),
        &[("KEYFLIGHT_SINK__HTTP__CA_FILE", ca_file)],
    );
    await_http_verified(&app, &receiver, || trusting.log());
    assert_eq!(last_answered(&receiver.calls()).len(), 5);
}

/// A header read from an unset environment variable stops `run` at start
/// (exit 2) naming the key and the variable, before any broker is reached.
#[test]
fn a_header_from_an_unset_variable_stops_run_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("keyflight.toml");
    std::fs::write(
        &config,
        "brokers = \"127.0.0.1:1\"\nmetrics_addr = \"off\"\n[sink]\nkind = \"http\"\n[sink.http]\nurl = \"http://127.0.0.1:1/{key}\"\n[sink.http.headers]\nAuthorization = { env = \"KEYFLIGHT_TEST_UNSET_TOKEN\" }\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_keyflight"))
        .arg("--config")
        .arg(&config)
        .args(["run", "--state-dir"])
        .arg(dir.path().join("state"))
        .env_remove("KEYFLIGHT_TEST_UNSET_TOKEN")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("sink.http.headers.Authorization")
            && stderr.contains("KEYFLIGHT_TEST_UNSET_TOKEN"),
        "{stderr}"
    );
    // `config show` names the variable, never a written-out value.
    std::fs::write(
        &config,
        "[sink.http.headers]\nAuthorization = { env = \"TOKEN\" }\nX-Api-Key = \"hunter2\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_keyflight"))
        .arg("--config")
        .arg(&config)
        .args(["config", "show"])
        .output()
        .unwrap();
    let shown = succeeded(&out);
    assert!(shown.contains("env = \"TOKEN\""), "{shown}");
    assert!(
        !shown.contains("hunter2") && shown.contains("<redacted>"),
        "{shown}"
    );
}
