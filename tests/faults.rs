//! Poison records, limits and deletes against a real broker: a push the
//! producer refuses, a configuration whose limits disagree, deleted keys
//! created again and stragglers older than a delete.

use std::time::Duration;

use keyflight::kafka::headers as header;

use crate::support::{await_final_state, produce, read_all, wait_until, App, Broker, TestEvent};

/// A merge-patch document that grows past the producer's
/// `message.max.bytes` (1 000 000) from patches that each fit: its push is
/// refused, so it goes to the dead-letter topic as `push-refused` with the
/// broker's error, its value cut to what that topic takes; its marker,
/// refused by the changelog too, is written without its value. The other
/// keys are pushed, the partition commits to its end, and `verify` passes,
/// counting the refused key. Before, the refused push was retried forever:
/// no other key of the partition was pushed and its offset never moved
/// (the issue's reproduction on Tansu: lag 3 001 after 120 s, 97 % CPU).
#[tokio::test(flavor = "multi_thread")]
async fn a_document_grown_past_the_limit_is_dead_lettered_and_the_partition_moves_on() {
    let broker = Broker::start();
    let app = App::create(
        &broker,
        1,
        "[singleflight]\nmerge_policy = \"json-merge-patch\"\n",
    );
    let mut events: Vec<TestEvent> = (0..3)
        .map(|i| TestEvent {
            key: "big".into(),
            value: Some(format!(r#"{{"part{i}":"{}"}}"#, "x".repeat(400_000))),
        })
        .collect();
    let ordinary: Vec<TestEvent> = (0..200)
        .map(|i| TestEvent {
            key: format!("k{}", i % 20),
            value: Some(format!(r#"{{"n":{i}}}"#)),
        })
        .collect();
    events.extend(ordinary.iter().cloned());
    produce(&broker, &app.input, &events).await;

    let mut processor = app.start(&app.state_dir("a"));
    // Merge patches fold into whole documents: each key's last push is the
    // fold of its patches, here its latest (every patch sets `n`).
    await_final_state(
        &broker,
        &app,
        &ordinary,
        Duration::from_secs(90),
        &processor,
    );
    let refused = wait_until(Duration::from_secs(30), Duration::from_millis(300), || {
        read_all(&broker, &app.dlq)
            .into_iter()
            .find(|r| r.key == "big")
            .ok_or_else(|| format!("no dead letter yet\nlog:\n{}", processor.log()))
    });
    let reason = refused
        .headers
        .get(header::ERROR_REASON)
        .map(String::as_str);
    assert_eq!(reason, Some("push-refused"), "{:?}", refused.headers);
    assert!(
        refused.headers[header::ERROR].contains("too large"),
        "the broker's error: {:?}",
        refused.headers[header::ERROR]
    );
    assert_eq!(refused.headers[header::VERSION], "2", "the newest patch's");
    let whole: usize = refused.headers[header::VALUE_CUT_FROM].parse().unwrap();
    assert!(whole > 1_200_000, "the merged document's size: {whole}");
    let kept = refused.raw.as_ref().map_or(0, Vec::len);
    assert!(
        (900_000..1_000_000).contains(&kept),
        "cut to the limit: {kept}"
    );
    assert!(
        !read_all(&broker, &app.pushed)
            .iter()
            .any(|p| p.key == "big"),
        "never pushed"
    );

    app.await_committed(&broker, Duration::from_secs(30), || processor.log());
    let report = app.verify().expect("verify passes");
    assert_eq!(report["refused_pushes"], 1, "{report}");
    assert!(
        processor
            .log()
            .contains("the changelog refuses the marker as too large"),
        "{}",
        processor.log()
    );
    processor.stop(Duration::from_secs(30));
}

/// A value limit the producer cannot write (1 MiB against librdkafka's
/// default `message.max.bytes` of 1 000 000) stops `run` at once with exit
/// status 2, naming the keys to change; before, every such value's push
/// was retried forever.
#[tokio::test(flavor = "multi_thread")]
async fn limits_that_disagree_stop_run_naming_the_keys() {
    let broker = Broker::start();
    let app = App::create(&broker, 1, "[input]\nmax_value_bytes = 1048576\n");
    let mut processor = app.start(&app.state_dir("a"));
    let status = processor.wait_exit(Duration::from_secs(60));
    let log = processor.log();
    assert_eq!(status.code(), Some(2), "{log}");
    for named in [
        "input.max_value_bytes = 1048576",
        "kafka.producer.\"message.max.bytes\" = 1000000",
        "topics.pushed",
        "topics.changelog",
    ] {
        assert!(log.contains(named), "names {named}: {log}");
    }
}

/// The issue's reproduction on Tansu, with per-key counters: 80 keys get
/// versions 1–5 and then a delete without a version; 40 of them are
/// created again with versions 6 and 7. Every re-created key ends on
/// version 7 and every other on its delete. Then, on another host (a fresh
/// state directory: the state comes from the changelog), stragglers with
/// version 3 for ten deleted keys stay stale, and a delete whose header
/// says version 8 is pushed. `verify` agrees. Before, every re-created key
/// ended on its delete (its versions were below the delete's offset), and
/// a restart forgot the deletes (their markers were removed).
#[tokio::test(flavor = "multi_thread")]
async fn deleted_keys_created_again_end_on_their_newest_event_and_stragglers_stay_stale() {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let broker = Broker::start();
    let app = App::create(&broker, 1, "");
    let event = |key: usize, version: u64| TestEvent {
        key: format!("key-{key}"),
        value: Some(format!(r#"{{"version":{version},"key":{key}}}"#)),
    };
    let mut events: Vec<TestEvent> = (1..=5)
        .flat_map(|v| (0..80).map(move |k| (k, v)))
        .map(|(k, v)| event(k, v))
        .collect();
    events.extend((0..80).map(|k| TestEvent {
        key: format!("key-{k}"),
        value: None,
    }));
    events.extend(
        (6..=7)
            .flat_map(|v| (0..40).map(move |k| (k, v)))
            .map(|(k, v)| event(k, v)),
    );
    produce(&broker, &app.input, &events).await;
    let mut first = app.start(&app.state_dir("a"));
    await_final_state(&broker, &app, &events, Duration::from_secs(90), &first);
    first.stop(Duration::from_secs(30));

    let stragglers: Vec<TestEvent> = (40..50).map(|k| event(k, 3)).collect();
    produce(&broker, &app.input, &stragglers).await;
    let producer: FutureProducer = broker.client_config().create().unwrap();
    let headers = OwnedHeaders::new().insert(Header {
        key: "version",
        value: Some("8"),
    });
    producer
        .send(
            FutureRecord::<str, [u8]>::to(&app.input)
                .key("key-0")
                .headers(headers),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("the delete is produced");
    let mut moved = app.start(&app.state_dir("b"));
    wait_until(Duration::from_secs(60), Duration::from_millis(300), || {
        let last = crate::support::last_per_key(&read_all(&broker, &app.pushed));
        let key0 = &last["key-0"];
        (key0.value.is_none() && key0.headers.get(header::VERSION).map(String::as_str) == Some("8"))
            .then_some(())
            .ok_or_else(|| format!("key-0: {key0:?}\nlog:\n{}", moved.log()))
    });
    let last = crate::support::last_per_key(&read_all(&broker, &app.pushed));
    for k in 40..50 {
        let pushed = &last[&format!("key-{k}")];
        assert_eq!(
            pushed.value, None,
            "key-{k}'s straggler is stale: {pushed:?}"
        );
    }
    let report = app.verify().expect("verify passes");
    assert_eq!(report["keys"], 80, "{report}");
    moved.stop(Duration::from_secs(30));
}
