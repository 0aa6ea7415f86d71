//! The benchmark driver (`keyflight-bench run`, what `scripts/bench.sh`
//! runs), CI-sized, on both brokers it is meant for: so the suite cannot
//! rot. These check that every figure is produced and that the measured run
//! was correct (`verify`); they assert nothing about speed, which is the
//! benchmark's business (BENCHMARKS.md).

use std::process::Command;

use crate::support::Broker;
use serde_json::Value;

/// The benchmark driver, a crate of its own in the workspace: built beside
/// this test binary's directory by `cargo build --workspace --bins`
/// (`scripts/test.sh` does that before the tests).
fn bench_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/integration-<hash> -> target/<profile>/keyflight-bench
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("keyflight-bench");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build --workspace --bins` (scripts/test.sh does)",
        path.display()
    );
    path
}

fn bench(brokers: Option<&str>) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let mut command = Command::new(bench_binary());
    command.args([
        "run",
        "--events",
        "3000",
        "--keys",
        "300",
        "--partitions",
        "3",
        "--markers",
        "3000",
        "--latency-seconds",
        "1",
        // A second of 3 000 events: all of it is measured.
        "--warmup-seconds",
        "0",
        "--latency-rounds",
        "2",
        "--verify",
        "--json",
        json.to_str().unwrap(),
    ]);
    if let Some(brokers) = brokers {
        command.args(["--brokers", brokers]);
    }
    let out = command.env_remove("RUST_LOG").output().unwrap();
    let stdout = crate::support::succeeded(&out);
    for line in [
        "bare copy",
        "keyflight",
        "throughput keyflight/copy",
        "live maximum (copy)",
        "(half the live maximum)",
        "added latency",
        "compensation scan",
        "restore",
        "peak RSS with",
    ] {
        assert!(stdout.contains(line), "no {line:?} in:\n{stdout}");
    }
    serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap()
}

fn positive(report: &Value, path: &str) -> f64 {
    let value = report
        .pointer(path)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{path} missing in {report:#}"));
    assert!(value > 0.0, "{path} = {value} in {report:#}");
    value
}

fn check(report: &Value) {
    for path in [
        "/load_events_per_s",
        "/copy/events_per_s",
        "/copy/peak_rss_mb",
        "/keyflight/events_per_s",
        "/keyflight/outputs_per_s",
        "/keyflight/peak_rss_mb",
        "/throughput_ratio",
        "/latency/target_rate",
        "/live/rate",
        "/live/through_per_s",
        "/scan/open_scan_ms",
        "/scan/full_scan_ms",
        "/restore/seconds",
        "/restore/records_per_s",
        "/restore/peak_rss_mb",
    ] {
        positive(report, path);
    }
    assert_eq!(report["keyflight"]["verify"], true, "{report:#}");
    // By default the latency phase runs at half the live maximum.
    assert_eq!(report["latency"]["half_of"], "live", "{report:#}");
    // (serde_json's default float parsing may be one unit in the last
    // place off, so not an exact comparison.)
    let half = positive(report, "/live/through_per_s") / 2.0;
    let target = positive(report, "/latency/target_rate");
    assert!((target - half).abs() <= half * 1e-9, "{report:#}");
    assert!(positive(report, "/keyflight/collapse") >= 1.0);
    assert_eq!(report["copy"]["outputs"], 3000);
    let rounds = report["latency"]["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2, "{report:#}");
    assert!(rounds.iter().all(|r| r["failed"].is_null()), "{report:#}");
    assert_eq!(
        (
            rounds[0]["copy_first"].as_bool(),
            rounds[1]["copy_first"].as_bool()
        ),
        (Some(true), Some(false)),
        "the order alternates"
    );
    for (round, system) in rounds.iter().flat_map(|r| [(r, "copy"), (r, "keyflight")]) {
        assert_eq!(
            round[system]["measured"], report["latency"]["events"],
            "no warm-up: every event is measured: {report:#}"
        );
        assert_eq!(
            round[system]["latency"]["samples"], round[system]["measured"],
            "every event is matched to the output that delivers it: {report:#}"
        );
        // CPU time is counted in clock ticks (10 ms): a system can copy a
        // round of 3 000 events in less than one.
        assert!(
            round[system]["cpu_us_per_event"].as_f64() >= Some(0.0),
            "{report:#}"
        );
        // The system used CPU over the span, so the machine was busy.
        let busy = round[system]["machine_busy"].as_f64().unwrap();
        assert!(0.0 < busy && busy <= 1.0, "{report:#}");
        assert!(
            round[system]["driver_cpu_us_per_event"].as_f64() >= Some(0.0),
            "{report:#}"
        );
    }
    // keyflight's acknowledgement times, when within the histogram's
    // bounds (a stalled broker can pass them): p50 ≤ p99.
    for round in rounds {
        if let Some(acks) = round["keyflight"]["push_ack_ms"].as_array() {
            let (p50, p99) = (acks[0].as_f64().unwrap(), acks[1].as_f64().unwrap());
            assert!(0.0 < p50 && p50 <= p99, "{report:#}");
        }
        assert!(round["copy"]["push_ack_ms"].is_null(), "the copy has none");
    }
    // The median of two rounds is their mean.
    let added: Vec<f64> = rounds
        .iter()
        .map(|r| r["added_p99_ms"].as_f64().unwrap())
        .collect();
    assert_eq!(
        report["latency"]["added_p99_ms"].as_f64(),
        Some((added[0] + added[1]) / 2.0),
        "{report:#}"
    );
    assert_eq!(report["restore"]["markers"], 3000);
    assert_eq!(report["scan"]["open"], 100);
}

#[test]
fn the_benchmark_runs_on_the_mock_cluster() {
    let report = bench(None);
    check(&report);
    for round in report["latency"]["rounds"].as_array().unwrap() {
        assert!(
            round["keyflight"]["push_ack_ms"].is_array(),
            "keyflight's acknowledgement times are reported: {report:#}"
        );
    }
}

#[test]
fn the_benchmark_runs_on_tansu() {
    let broker = Broker::start();
    let report = bench(Some(&broker.bootstrap));
    assert!(report["broker"].as_str().unwrap().starts_with("external"));
    check(&report);
}
