//! `keyflight run` against a real broker: consume, collapse, push, mark,
//! restore. Every test starts its own Tansu broker and keyflight process.

use keyflight::kafka::headers as header;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::support::{
    await_final_state, http_get, produce, read_all, wait_until, App, Broker, Scrape, TestEvent,
};
use keyflight::state::{Marker, Store};

/// `bursts` rounds; in each, every key gets `per_burst` events back to back.
fn bursty_events(keys: usize, bursts: usize, per_burst: usize, round: usize) -> Vec<TestEvent> {
    let mut events = Vec::new();
    for b in 0..bursts {
        for k in 0..keys {
            for i in 0..per_burst {
                events.push(TestEvent {
                    key: format!("key-{k:03}"),
                    value: Some(format!(
                        "{{\"key\":{k},\"round\":{round},\"burst\":{b},\"i\":{i}}}"
                    )),
                });
            }
        }
    }
    events
}

/// The markers of every partition's store (after a clean stop).
fn stored_markers(app: &App, state_dir: &std::path::Path) -> BTreeMap<(i32, String), Marker> {
    let mut all = BTreeMap::new();
    for partition in 0..app.partitions {
        let dir = Store::dir(state_dir, &app.id, &app.input, partition);
        if !dir.exists() {
            continue;
        }
        let (store, _) = Store::open(&dir).unwrap();
        for (key, marker) in store.markers().unwrap() {
            all.insert(
                (partition, String::from_utf8_lossy(&key).into_owned()),
                marker,
            );
        }
        // Reopening consumed the checkpoint; put it back for the next start.
        store.checkpoint(0, None).unwrap();
    }
    all
}

/// Test 1: 10 000 events over 100 keys in bursts. The last record of every
/// key in the output is its latest event, with fewer pushes than events.
#[tokio::test(flavor = "multi_thread")]
async fn bursts_collapse_and_every_key_ends_on_its_latest_event() {
    let broker = Broker::start();
    let app = App::create(&broker, 4, "");
    let mut processor = app.start(&app.state_dir("a"));
    let events = bursty_events(100, 10, 10, 0);
    assert_eq!(events.len(), 10_000);

    let started = Instant::now();
    produce(&broker, &app.input, &events).await;
    let pushed = await_final_state(&broker, &app, &events, Duration::from_secs(120), &processor);
    let seconds = started.elapsed().as_secs_f64();
    processor.stop(Duration::from_secs(30));

    let normal = pushed
        .iter()
        .filter(|p| p.headers[header::COMPENSATION] == "false")
        .count();
    assert!(
        normal < events.len(),
        "{normal} pushes for {} events",
        events.len()
    );
    let merged: u64 = pushed
        .iter()
        .map(|p| p.headers[header::MERGED].parse::<u64>().unwrap())
        .sum();
    assert_eq!(
        merged,
        events.len() as u64,
        "every event is covered by exactly one acknowledged push"
    );
    for p in &pushed {
        assert!(
            p.headers[header::VERSION].parse::<u64>().is_ok()
                && p.headers[header::TN].parse::<u64>().is_ok()
        );
    }
    println!(
        "test 1: {} events, {} pushes, collapse {:.1}x, {:.0} events/s end to end (produce to final state, {:.2}s)",
        events.len(),
        pushed.len(),
        events.len() as f64 / pushed.len() as f64,
        events.len() as f64 / seconds,
        seconds
    );
}

/// Test 2: SIGTERM, produce more, restart: the state is restored (replayed
/// events are not pushed again), and every key ends on its newest event.
#[tokio::test(flavor = "multi_thread")]
async fn restart_after_sigterm_restores_state_and_ends_correct() {
    let broker = Broker::start();
    let app = App::create(&broker, 2, "");
    let state = app.state_dir("a");
    let mut processor = app.start(&state);
    let first = bursty_events(20, 3, 5, 0);
    produce(&broker, &app.input, &first).await;
    await_final_state(&broker, &app, &first, Duration::from_secs(60), &processor);
    processor.stop(Duration::from_secs(30));
    // Closing committed every event: the group's offsets are the input's end.
    let (committed, high) = crate::support::committed_and_high(&broker, &app.id, &app.input, 2);
    // (-1: nothing committed, for a partition that got no event.)
    let committed: Vec<i64> = committed.iter().map(|&c| c.max(0)).collect();
    assert_eq!(committed, high, "{}", processor.log());
    // Where each output partition ended before the restart.
    let mut before: BTreeMap<i32, i64> = BTreeMap::new();
    for p in read_all(&broker, &app.pushed) {
        before.insert(p.partition, p.offset + 1);
    }

    let second = bursty_events(20, 2, 5, 1);
    produce(&broker, &app.input, &second).await;
    let mut processor = app.start(&state);
    let all: Vec<TestEvent> = first.iter().chain(&second).cloned().collect();
    let pushed = await_final_state(&broker, &app, &all, Duration::from_secs(60), &processor);
    processor.stop(Duration::from_secs(30));
    assert!(
        processor
            .log()
            .contains("partition restored from changelog"),
        "{}",
        processor.log()
    );

    // After the restart no key was pushed from round-0 (stale) data.
    let after: Vec<_> = pushed
        .iter()
        .filter(|p| p.offset >= before.get(&p.partition).copied().unwrap_or(0))
        .collect();
    assert!(!after.is_empty());
    for p in after {
        assert!(
            p.value.as_deref().unwrap().contains("\"round\":1"),
            "stale push after restart: {p:?}"
        );
    }
}

/// Test 3: a fresh instance with an empty state dir restores the markers
/// from the changelog.
#[tokio::test(flavor = "multi_thread")]
async fn fresh_instance_restores_markers_from_the_changelog() {
    let broker = Broker::start();
    let app = App::create(&broker, 2, "");
    let first_dir = app.state_dir("first");
    let mut processor = app.start(&first_dir);
    let events = bursty_events(30, 2, 4, 0);
    produce(&broker, &app.input, &events).await;
    await_final_state(&broker, &app, &events, Duration::from_secs(60), &processor);
    processor.stop(Duration::from_secs(30));
    let original = stored_markers(&app, &first_dir);
    assert_eq!(original.len(), 30, "one marker per key");
    assert!(
        original.values().all(|m| !m.is_open()),
        "every push finished"
    );

    let fresh_dir = app.state_dir("fresh");
    let mut fresh = app.start(&fresh_dir);
    // The fresh instance logs the restore of each partition before processing.
    fresh.await_log(
        "partition restored from changelog",
        app.partitions as usize,
        Duration::from_secs(60),
    );
    fresh.stop(Duration::from_secs(30));
    let restored = stored_markers(&app, &fresh_dir);
    assert_eq!(
        restored, original,
        "the fresh store equals the original, marker for marker"
    );
}

/// Test 4: pushes fail (the output topic is missing) while their markers
/// reach the changelog; the process dies. Once the output exists, a fresh
/// instance restores the open markers, the replayed events are stale against
/// them, and the compensation scan alone repairs every key.
#[tokio::test(flavor = "multi_thread")]
async fn compensation_repairs_failed_pushes_after_a_crash() {
    let broker = Broker::start();
    let config = "[compensation]\ninterval = \"1s\"\ngrace = \"500ms\"\n[kafka.producer]\n\"message.timeout.ms\" = 1500\n";
    let config = format!("{config}{}", crate::support::FAST_GROUP);
    let app = App::create(&broker, 2, &config).with_missing_output(&broker);
    let events: Vec<TestEvent> = (0..20)
        .map(|k| TestEvent {
            key: format!("key-{k:02}"),
            value: Some(format!("{{\"k\":{k},\"v\":\"only\"}}")),
        })
        .collect();

    // Every key's markT1 is in the changelog, and pushes are failing.
    app.crash_with_open_markers(&broker, &events).await;
    assert!(crate::support::read_markers(&broker, &app.changelog)
        .iter()
        .all(|r| r.value.is_some()));

    crate::support::create_topic(&broker, &app.pushed, 2).await;
    let mut repaired = app.start(&app.state_dir("b"));
    let pushed = await_final_state(&broker, &app, &events, Duration::from_secs(60), &repaired);
    repaired.stop(Duration::from_secs(30));
    assert!(
        repaired
            .log()
            .contains("compensation re-pushed open markers"),
        "{}",
        repaired.log()
    );
    for p in &pushed {
        assert_eq!(
            p.headers[header::COMPENSATION],
            "true",
            "only compensation can repair: {p:?}"
        );
        assert_eq!(p.headers[header::MERGED], "0");
    }
    // Repaired markers are closed: a later scan has nothing to do.
    let markers = stored_markers(&app, &app.state_dir("b"));
    assert_eq!(markers.len(), 20);
    assert!(markers.values().all(|m| !m.is_open()), "{markers:?}");
}

/// Test 5: two instances in one group share the partitions; after one
/// leaves, the other takes its partitions over with their state restored.
#[tokio::test(flavor = "multi_thread")]
async fn two_instances_share_partitions_and_one_takes_over() {
    let broker = Broker::start();
    let app = App::create(&broker, 4, "");
    let mut a = app.start(&app.state_dir("a"));
    a.await_log("partition assigned", 1, Duration::from_secs(60));
    let mut b = app.start(&app.state_dir("b"));
    b.await_log("partition assigned", 1, Duration::from_secs(60));

    let first = bursty_events(40, 3, 4, 0);
    produce(&broker, &app.input, &first).await;
    await_final_state(&broker, &app, &first, Duration::from_secs(90), &a);
    let b_partitions = b.log().matches("partition restored from changelog").count();
    assert!(b_partitions >= 1, "b took part:\n{}", b.log());

    b.stop(Duration::from_secs(30));
    assert!(b.log().contains("committed on close"), "{}", b.log());
    let second = bursty_events(40, 2, 4, 1);
    produce(&broker, &app.input, &second).await;
    let all: Vec<TestEvent> = first.iter().chain(&second).cloned().collect();
    await_final_state(&broker, &app, &all, Duration::from_secs(90), &a);
    a.stop(Duration::from_secs(30));
    // a restored b's partitions from the changelog before processing them.
    let restores = a.log().matches("partition restored from changelog").count();
    assert!(
        restores > 4 - b_partitions,
        "a took over b's partitions:\n{}",
        a.log()
    );
}

/// Test 6: the article's Case 1 through the real pipeline. A, then B, C, D
/// while A's push is in flight (merged into one push of D), then E while D's
/// push is in flight: keyflight holds E until D'' and ends on E''.
#[tokio::test(flavor = "multi_thread")]
async fn article_case_1_through_the_pipeline_ends_on_the_newest_value() {
    let broker = Broker::start();
    // Every push takes about a second: the producer waits that long to batch.
    let app = App::create(
        &broker,
        1,
        "[kafka.producer]\n\"linger.ms\" = 1500\n[kafka.consumer]\n\"fetch.wait.max.ms\" = 20\n",
    );
    let mut processor = app.start(&app.state_dir("a"));
    processor.await_log(
        "partition restored from changelog",
        1,
        Duration::from_secs(60),
    );
    let event = |name: &str| TestEvent {
        key: "k".into(),
        value: Some(format!("{{\"event\":\"{name}\"}}")),
    };

    // B, C, D must arrive while A's push is in flight, not in A's poll
    // batch (a batch's burst is one push): they go once the gauge shows it.
    produce(&broker, &app.input, &[event("A")]).await;
    let addr = processor.metrics_addr(Duration::from_secs(30));
    wait_until(Duration::from_secs(30), Duration::from_millis(20), || {
        let (_, body) = http_get(&addr, "/metrics").map_err(|e| e.to_string())?;
        match Scrape::parse(&body).sum("keyflight_keys_in_flight", &[]) {
            n if n >= 1.0 => Ok(()),
            _ => Err(format!(
                "A's push is not in flight yet:\n{}",
                processor.log()
            )),
        }
    });
    produce(&broker, &app.input, &[event("B"), event("C"), event("D")]).await;
    // A'' is visible: D' has started; E arrives while D's push is in flight.
    wait_until(Duration::from_secs(30), Duration::from_millis(20), || {
        if read_all(&broker, &app.pushed).is_empty() {
            Err(format!("no push yet:\n{}", processor.log()))
        } else {
            Ok(())
        }
    });
    produce(&broker, &app.input, &[event("E")]).await;
    let all = [event("A"), event("B"), event("C"), event("D"), event("E")];
    let pushed = await_final_state(&broker, &app, &all, Duration::from_secs(30), &processor);
    processor.stop(Duration::from_secs(30));

    let sequence: Vec<_> = pushed.iter().map(|p| p.value.clone().unwrap()).collect();
    let merged: Vec<_> = pushed
        .iter()
        .map(|p| p.headers[header::MERGED].clone())
        .collect();
    assert_eq!(
        sequence,
        [
            "{\"event\":\"A\"}",
            "{\"event\":\"D\"}",
            "{\"event\":\"E\"}"
        ],
        "A'', D'', E''"
    );
    assert_eq!(merged, ["1", "3", "1"], "B, C, D merged into one push");
    let tns: Vec<u64> = pushed
        .iter()
        .map(|p| p.headers[header::TN].parse().unwrap())
        .collect();
    assert!(
        tns.windows(2).all(|w| w[0] < w[1]),
        "pushes started in order: {tns:?}"
    );
}

/// Avro input under json-merge-patch: partial updates fold into whole
/// documents, a delete ends as a tombstone with its state removed, and an
/// undecodable record goes to the dead-letter topic with its reason while
/// everything else proceeds.
#[tokio::test(flavor = "multi_thread")]
async fn avro_merge_patch_deletes_and_dead_letters_through_the_pipeline() {
    use apache_avro::types::Value as Avro;
    use apache_avro::{GenericSingleObjectReader, GenericSingleObjectWriter, Schema};

    let schema = Schema::parse_str(keyflight::codec::EVENT_SCHEMA).unwrap();
    let encode = |fields: &[(&str, Avro)]| {
        let record = Avro::Record(vec![
            ("version".into(), Avro::Union(0, Box::new(Avro::Null))),
            (
                "fields".into(),
                Avro::Map(
                    fields
                        .iter()
                        .map(|(k, v)| {
                            (
                                k.to_string(),
                                Avro::Union(
                                    if matches!(v, Avro::Null) {
                                        0
                                    } else if matches!(v, Avro::Long(_)) {
                                        2
                                    } else {
                                        4
                                    },
                                    Box::new(v.clone()),
                                ),
                            )
                        })
                        .collect(),
                ),
            ),
        ]);
        let mut out = Vec::new();
        GenericSingleObjectWriter::new_with_capacity(&schema, 64)
            .unwrap()
            .write_value_ref(&record, &mut out)
            .unwrap();
        Some(out)
    };
    let broker = Broker::start();
    let app = App::create(
        &broker,
        1,
        "[input]\nformat = \"avro\"\n[singleflight]\nmerge_policy = \"json-merge-patch\"\n",
    );
    let mut processor = app.start(&app.state_dir("a"));
    let records = vec![
        (
            "user-1".to_string(),
            encode(&[
                ("name", Avro::String("ada".into())),
                ("visits", Avro::Long(1)),
            ]),
        ),
        (
            "user-2".to_string(),
            encode(&[("name", Avro::String("bob".into()))]),
        ),
        (
            "user-1".to_string(),
            encode(&[
                ("visits", Avro::Long(2)),
                ("plan", Avro::String("pro".into())),
            ]),
        ),
        ("user-3".to_string(), Some(b"this is not avro".to_vec())),
        ("user-1".to_string(), encode(&[("plan", Avro::Null)])),
        ("user-2".to_string(), None),
    ];
    crate::support::produce_bytes(&broker, &app.input, &records).await;

    let reader = GenericSingleObjectReader::new(schema.clone()).unwrap();
    let decode = |raw: &[u8]| -> BTreeMap<String, String> {
        let Avro::Record(fields) = reader.read_value(&mut &raw[..]).unwrap() else {
            panic!("a record")
        };
        let Avro::Map(map) = fields[1].1.clone() else {
            panic!("a map")
        };
        map.into_iter()
            .map(|(k, v)| (k, format!("{v:?}")))
            .collect()
    };
    let expected: BTreeMap<String, String> = [
        ("name".to_string(), "Union(4, String(\"ada\"))".to_string()),
        ("visits".to_string(), "Union(2, Long(2))".to_string()),
    ]
    .into();
    wait_until(Duration::from_secs(60), Duration::from_millis(200), || {
        let last = crate::support::last_per_key(&read_all(&broker, &app.pushed));
        let user1 = last
            .get("user-1")
            .and_then(|p| p.raw.clone())
            .map(|raw| decode(&raw));
        let user2_deleted = last.get("user-2").is_some_and(|p| p.raw.is_none());
        if user1.as_ref() == Some(&expected) && user2_deleted {
            Ok(())
        } else {
            Err(format!(
                "user-1 {user1:?}, user-2 deleted {user2_deleted}\n{}",
                processor.log()
            ))
        }
    });
    let dead = read_all(&broker, &app.dlq);
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].key, "user-3");
    assert_eq!(
        dead[0].raw.as_deref(),
        Some(&b"this is not avro"[..]),
        "dead letters keep the record unchanged"
    );
    assert_eq!(dead[0].headers[header::ERROR_REASON], "invalid-avro");
    assert_eq!(dead[0].headers[header::SOURCE_OFFSET], "3");
    processor.stop(Duration::from_secs(30));
    let markers = stored_markers(&app, &app.state_dir("a"));
    assert!(markers.keys().any(|(_, k)| k == "user-1"));
    let deleted = markers
        .iter()
        .find(|((_, k), _)| k == "user-2")
        .map(|(_, m)| m);
    assert!(
        deleted.is_some_and(Marker::is_deleted),
        "a delete's marker stays (until deletes.retention): {deleted:?}"
    );
}

/// Backpressure: with at most 2 keys in flight per partition the table
/// saturates, the task stops reading, its channel fills, the poll thread
/// holds records until they pass `max_held_bytes` (64 KB here) and pauses
/// the partition, and resumes it once the task took them; nothing is lost
/// or reordered.
#[tokio::test(flavor = "multi_thread")]
async fn saturated_partitions_pause_and_resume_without_losing_events() {
    let broker = Broker::start();
    // Tansu holds a fetch for fetch.wait.max.ms even when it has data:
    // shorter, the poll thread is fed faster than the saturated task drains.
    let app = App::create(
        &broker,
        1,
        "[singleflight]\nmax_active_keys = 2\nmax_held_bytes = 65536\n[kafka.consumer]\n\"fetch.wait.max.ms\" = 10\n",
    );
    let mut processor = app.start(&app.state_dir("a"));
    let events = bursty_events(200, 3, 5, 0);
    produce(&broker, &app.input, &events).await;
    let pushed = await_final_state(&broker, &app, &events, Duration::from_secs(120), &processor);
    let addr = processor.metrics_addr(Duration::from_secs(30));
    let (status, body) = crate::support::http_get(&addr, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{body}");
    let metrics = crate::support::Scrape::parse(&body);
    processor.stop(Duration::from_secs(30));
    let merged: u64 = pushed
        .iter()
        .map(|p| p.headers[header::MERGED].parse::<u64>().unwrap())
        .sum();
    assert_eq!(
        merged,
        events.len() as u64,
        "every event covered exactly once"
    );
    assert!(
        metrics.sum("keyflight_partition_pauses_total", &[]) >= 1.0,
        "backpressure engaged: the partition was paused\n{body}"
    );
    assert_eq!(
        metrics.sum("keyflight_partition_paused", &[]),
        0.0,
        "and resumed once its task caught up\n{body}"
    );
}

/// A partition that cannot be restored (its changelog topic is missing)
/// stops the process with status 1 and says why, instead of holding the
/// partition without processing it.
#[tokio::test(flavor = "multi_thread")]
async fn missing_changelog_stops_the_processor_with_an_error() {
    let broker = Broker::start();
    let app = App::create(&broker, 1, "").with_missing_changelog(&broker);
    let mut processor = app.start(&app.state_dir("a"));
    let status = processor.wait_exit(Duration::from_secs(60));
    let log = processor.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains(&app.changelog) && log.contains("error:"),
        "{log}"
    );
}

/// Pushes that fail while the processor shuts down (SIGTERM) keep their
/// markers open, so after a restart compensation repairs them; closing a
/// failed push's marker would leave those keys unpushed for good (their
/// replayed events are stale against the marker).
#[tokio::test(flavor = "multi_thread")]
async fn pushes_failing_during_shutdown_keep_their_markers_open() {
    let broker = Broker::start();
    let config = "[compensation]\ninterval = \"1s\"\ngrace = \"500ms\"\n[kafka.producer]\n\"message.timeout.ms\" = 1500\n";
    let app = App::create(&broker, 1, config).with_missing_output(&broker);
    let events: Vec<TestEvent> = (0..10)
        .map(|k| TestEvent {
            key: format!("key-{k:02}"),
            value: Some(format!("{{\"k\":{k}}}")),
        })
        .collect();

    let mut stopping = app.start(&app.state_dir("a"));
    produce(&broker, &app.input, &events).await;
    stopping.await_log("push failed", 1, Duration::from_secs(60));
    // Retries are in flight and fail during the shutdown.
    stopping.stop(Duration::from_secs(30));
    let markers = stored_markers(&app, &app.state_dir("a"));
    assert_eq!(markers.len(), 10);
    assert!(
        markers.values().all(Marker::is_open),
        "no push succeeded, every marker stays open: {markers:?}"
    );

    crate::support::create_topic(&broker, &app.pushed, 1).await;
    let mut restarted = app.start(&app.state_dir("a"));
    let pushed = await_final_state(&broker, &app, &events, Duration::from_secs(60), &restarted);
    restarted.stop(Duration::from_secs(30));
    assert!(
        pushed
            .iter()
            .all(|p| p.headers[header::COMPENSATION] == "true"),
        "{pushed:?}"
    );
}

/// `log_format = "json"`: every log line is one JSON object; partition
/// tasks' lines carry their span's topic and partition.
#[tokio::test(flavor = "multi_thread")]
async fn json_logs_are_one_object_per_line_with_the_partition_span() {
    let broker = Broker::start();
    let app = App::create(&broker, 2, "log_format = \"json\"\n");
    let mut processor = app.start(&app.state_dir("a"));
    processor.await_log("partition restored", 2, Duration::from_secs(60));
    processor.stop(Duration::from_secs(30));
    let log = processor.log();
    let mut restored = 0;
    for line in log.lines() {
        let object: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(
            object["level"].is_string() && object["timestamp"].is_string(),
            "{line}"
        );
        if object["fields"]["message"] == "partition restored from changelog" {
            restored += 1;
            assert_eq!(object["span"]["topic"], app.input.as_str(), "{line}");
            assert!(object["span"]["partition"].is_number(), "{line}");
        }
    }
    assert_eq!(restored, 2, "{log}");
}

/// The configuration echoed at start never shows a secret.
#[tokio::test(flavor = "multi_thread")]
async fn the_config_echoed_at_start_redacts_secrets() {
    let broker = Broker::start();
    let secret = "hunter2-do-not-log";
    let app = App::create(
        &broker,
        1,
        &format!("[kafka.common]\n\"sasl.password\" = \"{secret}\"\n\"sasl.username\" = \"svc\"\n"),
    );
    let mut processor = app.start(&app.state_dir("a"));
    processor.await_log("partition restored", 1, Duration::from_secs(60));
    processor.stop(Duration::from_secs(30));
    let log = processor.log();
    let start = log
        .lines()
        .find(|l| l.contains("starting"))
        .expect("a start line");
    assert!(
        start.contains("sasl.password") && start.contains("<redacted>"),
        "{start}"
    );
    assert!(start.contains("svc"), "non-secrets are shown: {start}");
    assert!(!log.contains(secret), "{log}");
}
