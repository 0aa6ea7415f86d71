//! Operating keyflight against a real broker: the Prometheus endpoint,
//! readiness, and the metrics a run leaves behind.

use std::time::Duration;

use crate::support::{
    await_final_state, create_topic, http_get, produce, produce_bytes, scrape, wait_until, App,
    Broker, TestEvent,
};

/// A crash leaves 20 open markers behind (pushes failed: the output topic
/// was missing). The next instance serves /readyz as not ready until its
/// partitions are restored, then ready; compensation repairs the 20 keys;
/// new events (some merged), stale replays and bad records all show up in
/// /metrics with the counts the run implies.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_and_readiness_follow_a_run_with_compensation() {
    let broker = Broker::start();
    let config = format!(
        "[compensation]\ninterval = \"1s\"\ngrace = \"500ms\"\n[kafka.producer]\n\"message.timeout.ms\" = 1500\n\"linger.ms\" = 50\n{}",
        crate::support::FAST_GROUP
    );
    let app = App::create(&broker, 2, &config).with_missing_output(&broker);
    let crashed_events: Vec<TestEvent> = (0..20)
        .map(|k| TestEvent {
            key: format!("key-{k:02}"),
            value: Some(format!("{{\"k\":{k}}}")),
        })
        .collect();
    app.crash_with_open_markers(&broker, &crashed_events).await;
    create_topic(&broker, &app.pushed, 2).await;

    // Readiness: not ready (no assignment, then restoring), then ready.
    let processor = app.start(&app.state_dir("b"));
    let addr = processor.metrics_addr(Duration::from_secs(30));
    let (status, body) = http_get(&addr, "/healthz").unwrap();
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let mut seen = Vec::new();
    wait_until(Duration::from_secs(60), Duration::from_millis(20), || {
        let (status, body) = http_get(&addr, "/readyz").map_err(|e| e.to_string())?;
        if seen.last() != Some(&(status, body.clone())) {
            seen.push((status, body.clone()));
        }
        (status == 200)
            .then_some(())
            .ok_or_else(|| format!("{seen:?}"))
    });
    assert_eq!(seen.first().map(|s| s.0), Some(503), "{seen:?}");
    assert!(
        seen[0].1.starts_with("not ready: "),
        "a reason is given: {seen:?}"
    );
    assert_eq!(
        seen.last().unwrap().1,
        "ready: consuming partitions [0, 1]\n"
    );
    assert_eq!(
        processor
            .log()
            .matches("partition restored from changelog")
            .count(),
        2,
        "ready only after both restores"
    );

    // New keys in bursts (merges), and bad records with two reasons.
    let burst: Vec<TestEvent> = (0..200)
        .map(|i| TestEvent {
            key: format!("hot-{}", i % 4),
            value: Some(format!("{{\"version\":{},\"i\":{i}}}", i / 4 + 1)),
        })
        .collect();
    produce(&broker, &app.input, &burst).await;
    let bad: Vec<(String, Option<Vec<u8>>)> = (0..6)
        .map(|i| (format!("bad-{i}"), Some(b"{not json".to_vec())))
        .collect();
    produce_bytes(&broker, &app.input, &bad).await;
    let all: Vec<TestEvent> = crashed_events.iter().chain(&burst).cloned().collect();
    await_final_state(&broker, &app, &all, Duration::from_secs(60), &processor);

    let consumed = (crashed_events.len() + burst.len() + bad.len()) as f64;
    // Gauges and flushed counters settle at the next commit and scan.
    // The changelog gets every pushed key's newest marker: at least one
    // record per key, at most one per marker written (each push's markT1,
    // merged with the previous push's markT2 when it follows one at once,
    // and a key's last markT2), fewer where a key's markers came within the
    // changelog's coalescing window.
    let keys_pushed = (crashed_events.len() + 4) as f64;
    let m = wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        let m = scrape(&addr);
        let settled = m.sum("keyflight_events_consumed_total", &[]) == consumed
            && m.sum("keyflight_open_markers", &[]) == 0.0
            && m.sum("keyflight_consumer_lag_records", &[]) == 0.0
            && m.sum("keyflight_keys_in_flight", &[]) == 0.0
            && m.sum("keyflight_committed_offset", &[]) == consumed
            && (keys_pushed..=m.sum("keyflight_pushes_total", &[]) + keys_pushed)
                .contains(&m.sum("keyflight_changelog_records_written_total", &[]));
        settled.then_some(()).ok_or_else(|| {
            let families = [
                "keyflight_events_consumed_total",
                "keyflight_open_markers",
                "keyflight_consumer_lag_records",
                "keyflight_keys_in_flight",
                "keyflight_committed_offset",
                "keyflight_changelog_records_written_total",
                "keyflight_pushes_total",
            ];
            let sums: Vec<_> = families.iter().map(|f| (f, m.sum(f, &[]))).collect();
            format!("not settled (want {consumed} consumed): {sums:?}")
        })?;
        Ok(m)
    });

    // Every one of the 20 repairs is a compensation push; the replayed
    // originals are stale against their restored markers.
    let kind = |k: &str| m.sum("keyflight_pushes_total", &[&format!("kind=\"{k}\"")]);
    assert_eq!(kind("compensation"), 20.0);
    assert_eq!(
        m.sum("keyflight_compensation_repushed_keys_total", &[]),
        20.0
    );
    assert_eq!(m.sum("keyflight_events_stale_dropped_total", &[]), 20.0);
    // Every burst event either started a push or was merged into one.
    let merged = m.sum("keyflight_events_merged_total", &[]);
    assert!(kind("normal") >= 4.0, "one push per hot key at least");
    assert!(merged > 0.0, "a burst of 50 per key merges");
    assert!(kind("normal") + merged >= burst.len() as f64);
    assert!(kind("normal") <= burst.len() as f64);
    assert_eq!(
        m.sum("keyflight_dead_letters_total", &["reason=\"invalid-json\""]),
        bad.len() as f64
    );
    assert_eq!(m.sum("keyflight_push_failures_total", &[]), 0.0);
    assert_eq!(
        m.sum(
            "keyflight_push_latency_seconds_count",
            &["kind=\"compensation\""]
        ),
        20.0
    );
    assert!(m.sum("keyflight_push_latency_seconds_sum", &[]) > 0.0);
    assert!(m.sum("keyflight_changelog_records_restored_total", &[]) >= 20.0);
    assert_eq!(
        m.series("keyflight_restore_duration_seconds", &[]).count(),
        2
    );
    assert!(m.sum("keyflight_compensation_scan_duration_seconds_count", &[]) >= 2.0);
    assert_eq!(m.sum("keyflight_assigned_partitions", &[]), 2.0);
    assert_eq!(m.sum("keyflight_ready", &[]), 1.0);
    assert_eq!(
        m.sum(
            "keyflight_build_info",
            &[&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    // Per partition where it matters.
    for family in [
        "keyflight_events_consumed_total",
        "keyflight_committed_offset",
        "keyflight_consumer_lag_records",
        "keyflight_open_markers",
    ] {
        for p in ["partition=\"0\"", "partition=\"1\""] {
            assert_eq!(m.series(family, &[p]).count(), 1, "{family} {p}");
        }
    }
}

/// A metrics address that is taken stops `run` at start with a message that
/// names the address and the key, before it joins the group.
#[test]
fn a_taken_metrics_address_is_a_clear_error() {
    let broker = Broker::start();
    let app = App::create(&broker, 1, "");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut processor = app.start_with_env(
        &app.state_dir("a"),
        &[("KEYFLIGHT_METRICS_ADDR", addr.as_str())],
    );
    let status = processor.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{}", processor.log());
    let log = processor.log();
    assert!(
        log.contains(&format!("cannot serve metrics on {addr} (metrics_addr)")),
        "{log}"
    );
    assert!(!log.contains("consuming"), "{log}");
}
