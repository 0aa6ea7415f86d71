//! The zero-setup tools: `dev` (an embedded broker that outside clients
//! use), `load` (counts and per-key versions, on the real broker), `tail`,
//! and `demo` (exit 0 and a passing verify).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use crate::support::{keyflight, read_all, read_all_at, wait_until, App, Broker};
use keyflight::codec::{Codec, InputFormat};
use keyflight::engine::MergePolicy;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

/// `keyflight dev` prints a bootstrap address; a plain rdkafka client
/// produces to the input topic there and reads the pushes back; the printed
/// metrics address serves them; SIGINT stops it with status 0.
#[tokio::test(flavor = "multi_thread")]
async fn dev_serves_an_embedded_broker_that_outside_clients_use() {
    let mut child = keyflight()
        .args(["dev", "--partitions", "2", "--metrics-addr", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("keyflight dev starts");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut banner = String::new();
    let bootstrap = loop {
        let line = lines
            .next()
            .expect("dev prints its banner")
            .expect("stdout readable");
        banner.push_str(&line);
        banner.push('\n');
        if let Some(address) = line.trim().strip_prefix("bootstrap") {
            break address.trim().to_string();
        }
    };
    let rest: Vec<String> = lines.by_ref().take(10).map(|l| l.unwrap()).collect();
    let banner = banner + &rest.join("\n");
    assert!(banner.contains("development only"), "{banner}");
    assert!(
        banner.contains("events.in") && banner.contains("events.pushed"),
        "{banner}"
    );

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap();
    for i in 0..40 {
        let key = format!("k{}", i % 8);
        let value = format!("{{\"version\":{},\"i\":{i}}}", i / 8 + 1);
        producer
            .send(
                FutureRecord::to("events.in").key(&key).payload(&value),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("produced to the embedded broker");
    }
    let last = wait_until(Duration::from_secs(60), Duration::from_millis(200), || {
        let pushed = read_all_at(&bootstrap, "events.pushed");
        let last: BTreeMap<String, String> = pushed
            .into_iter()
            .map(|p| (p.key, p.value.unwrap_or_default()))
            .collect();
        let done = last.len() == 8 && last.values().all(|v| v.starts_with("{\"version\":5,"));
        done.then_some(last.clone())
            .ok_or(format!("pushed so far: {last:?}"))
    });
    assert_eq!(last.len(), 8);
    let metrics = banner
        .lines()
        .find_map(|l| l.trim().strip_prefix("metrics"))
        .and_then(|rest| rest.trim().strip_prefix("http://"))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no metrics address in the banner:\n{banner}"));
    let (addr, path) = metrics.split_once('/').unwrap();
    wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        let (status, body) = crate::support::http_get(addr, &format!("/{path}")).unwrap();
        let consumed =
            crate::support::Scrape::parse(&body).sum("keyflight_events_consumed_total", &[]);
        (status == 200 && consumed == 40.0)
            .then_some(())
            .ok_or(format!("{status}: consumed {consumed}"))
    });

    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
        child.try_wait().unwrap().ok_or("still running".to_string())
    });
    assert!(status.success(), "dev exited with {status}");
}

/// `keyflight load` produces exactly the events asked for, and every key's
/// versions count 1, 2, 3, ... in partition order; `--scenarios` adds the
/// article's cases; Avro events decode with keyflight's own codec.
#[tokio::test(flavor = "multi_thread")]
async fn load_produces_the_count_with_growing_versions_per_key() {
    let broker = Broker::start();
    let app = App::create(&broker, 3, "");
    let out = app.cli(&[
        "load",
        "--events",
        "3000",
        "--keys",
        "50",
        "--zipf",
        "1.0",
        "--burst",
        "3",
        "--scenarios",
    ]);
    let stdout = crate::support::succeeded(&out);
    assert!(stdout.contains("load: 3000 events over"), "{stdout}");
    assert!(stdout.contains("scenarios: 110 events"), "{stdout}");

    let records = read_all(&broker, &app.input);
    assert_eq!(records.len(), 3_110);
    let mut versions: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for record in &records {
        let value: serde_json::Value =
            serde_json::from_str(record.value.as_deref().unwrap()).unwrap();
        versions
            .entry(record.key.clone())
            .or_default()
            .push(value["version"].as_u64().unwrap());
    }
    for (key, seen) in &versions {
        if key.starts_with("case-") {
            // The stragglers repeat an old version on purpose (stale).
            assert_eq!(seen.last(), Some(&2), "{key}: {seen:?}");
            continue;
        }
        let expected: Vec<u64> = (1..=seen.len() as u64).collect();
        assert_eq!(seen, &expected, "{key}");
    }
    let hot = versions["key-000000"].len();
    assert!(hot > 3_000 / 50, "Zipf makes key-000000 hot: {hot} events");

    // Avro, through keyflight's own decoder.
    let topic = broker.unique("avro");
    crate::support::create_topic(&broker, &topic, 1).await;
    let out = app.cli(&[
        "load", "--events", "200", "--keys", "10", "--format", "avro", "--topic", &topic,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let codec = Codec::new(InputFormat::Avro, MergePolicy::Latest, "version");
    let records = read_all(&broker, &topic);
    assert_eq!(records.len(), 200);
    for record in records {
        let decoded = codec.decode(record.raw.as_deref()).expect("an Avro event");
        assert!(decoded.version.is_some_and(|v| v >= 1));
    }
}

/// `keyflight tail` prints one line per record with key, value and headers.
#[test]
fn tail_prints_records_with_keyflight_headers() {
    let broker = Broker::start();
    let app = App::create(&broker, 1, "");
    let processor = app.start(&app.state_dir("a"));
    let out = app.cli(&["load", "--events", "30", "--keys", "3"]);
    assert!(out.status.success());
    app.await_verified(Duration::from_secs(60), || processor.log());
    let out = app.cli(&["tail", "--from-beginning", "--count", "2"]);
    let stdout = crate::support::succeeded(&out);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    for line in lines {
        assert!(line.starts_with("0/"), "{line}");
        assert!(
            line.contains(" key=key-") && line.contains("\"version\":"),
            "{line}"
        );
        assert!(
            line.contains(" version=")
                && line.contains(" merged=")
                && line.contains(" compensation=false"),
            "{line}"
        );
    }
    let out = app.cli(&[
        "tail",
        "--topic",
        &app.input,
        "--from-beginning",
        "--idle-exit",
        "2s",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 30);
}

/// `keyflight demo`: exit 0, a passing verify, the report's lines.
#[test]
fn demo_runs_to_a_passing_verify() {
    let out = keyflight()
        .args(["demo", "--events", "5000", "--keys", "300"])
        .output()
        .unwrap();
    let stdout = crate::support::succeeded(&out);
    for needle in [
        "verify: PASS",
        "events in",
        "pushes out",
        "collapse",
        "stale events dropped",
        "compensation pushes",
        "Next: README.md",
    ] {
        assert!(stdout.contains(needle), "no {needle:?} in:\n{stdout}");
    }
    let stale: u64 = stdout
        .lines()
        .find(|l| l.contains("stale events dropped"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse().ok())
        .expect("a stale count");
    assert!(
        stale >= 10,
        "the scenario stragglers are dropped as stale:\n{stdout}"
    );
}

/// `demo --sink http`: the pushes go to an embedded receiver that fails a
/// fifth of the calls; the retries land, no two calls of a key overlap,
/// and verify over the receiver's log passes.
#[test]
fn demo_with_the_http_sink_retries_failed_calls_to_a_passing_verify() {
    let out = keyflight()
        .args([
            "demo",
            "--events",
            "3000",
            "--keys",
            "200",
            "--sink",
            "http",
            "--fail-rate",
            "0.2",
        ])
        .output()
        .unwrap();
    let stdout = crate::support::succeeded(&out);
    for needle in [
        "verify: PASS",
        "sink: HTTP calls to http://127.0.0.1:",
        "0 overlaps",
    ] {
        assert!(stdout.contains(needle), "no {needle:?} in:\n{stdout}");
    }
    let receiver = stdout
        .lines()
        .find(|l| l.contains("receiver: received"))
        .unwrap_or_else(|| panic!("no receiver line in:\n{stdout}"));
    assert!(receiver.contains("503: "), "failed calls: {receiver}");
}
