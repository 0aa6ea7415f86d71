//! Poison records and limits against a real broker: a push the producer
//! refuses, a configuration whose limits disagree.

use std::time::Duration;

use keyflight::kafka::headers as header;

use crate::support::{
    await_final_state, committed_and_high, produce, read_all, wait_until, App, Broker, TestEvent,
};

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

    wait_until(Duration::from_secs(30), Duration::from_millis(300), || {
        let (committed, high) = committed_and_high(&broker, &app.id, &app.input, 1);
        (committed == high)
            .then_some(())
            .ok_or_else(|| format!("committed {committed:?} of {high:?}"))
    });
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
