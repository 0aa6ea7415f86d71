//! `processing_guarantee = "exactly-once"`: a transaction per partition and
//! commit interval, fencing, and the start-up check for brokers without
//! transactions.
//!
//! What these tests can and cannot show: librdkafka's mock cluster speaks
//! the transactional protocol (InitProducerId, AddPartitionsToTxn,
//! TxnOffsetCommit, EndTxn), so the processor's transactions run end to end
//! on it, and its injected errors make a commit fail as a fenced one does.
//! But it keeps none of the semantics: every InitProducerId hands out a new
//! producer id (so nobody is fenced), EndTxn changes nothing, no transaction
//! marker is written (a `read_committed` reader sees aborted records), and
//! TxnOffsetCommit stores no offset. Tansu 0.6 routes no EndTxn at all.
//! A frozen owner's zombie writes being hidden is Kafka's part, and no
//! broker here can show it.

use std::time::Duration;

use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

use crate::support::{
    produce_records_at, read_all_at, round, rounds, scrape, wait_until, App, Broker, FAST_GROUP,
};

const EXACTLY_ONCE: &str = "processing_guarantee = \"exactly-once\"\n";
/// The mode's own default commit interval (the tests' config sets 500ms).
const EVERY_100MS: (&str, &str) = ("KEYFLIGHT_COMMIT_INTERVAL", "100ms");

/// Two exactly-once instances share four partitions through a rebalance:
/// every partition's pushes, markers and input position go through its own
/// transactions (committed ones counted, the committed position reaching
/// the partition's end), the last push of every key carries its latest
/// event, and nothing is aborted.
#[tokio::test(flavor = "multi_thread")]
async fn exactly_once_instances_push_every_keys_latest_event_through_transactions() {
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let app = App::on_mock_cluster(&cluster, 4, &format!("{EXACTLY_ONCE}{FAST_GROUP}"));
    let mut a = app.start_with_env(&app.state_dir("a"), &[EVERY_100MS]);
    a.await_log("partition restored", 4, Duration::from_secs(60));
    let records = rounds(100, 1..=20);
    produce_records_at(&bootstrap, &app.input, &records).await;
    app.await_verified(Duration::from_secs(60), || a.log());

    // Every event is covered by a committed transaction's position.
    let addr = a.metrics_addr(Duration::from_secs(10));
    wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
        let metrics = scrape(&addr);
        let committed = metrics.sum("keyflight_committed_offset", &[]);
        let transactions = metrics.sum("keyflight_transactions_total", &["outcome=\"committed\""]);
        (committed as usize == records.len() && transactions >= 4.0)
            .then_some(())
            .ok_or_else(|| {
                format!(
                    "{committed} of {} events committed in {transactions} transactions\n{}",
                    records.len(),
                    a.log()
                )
            })
    });

    // A second instance: the partitions that move start their transactions
    // on B (fencing A's, had A kept writing) before B restores them.
    let mut b = app.start_with_env(&app.state_dir("b"), &[EVERY_100MS]);
    b.await_log("partition restored", 1, Duration::from_secs(60));
    let newer = rounds(100, 100..=110);
    produce_records_at(&bootstrap, &app.input, &newer).await;
    let report = app.await_verified(Duration::from_secs(60), || {
        format!("{}\n{}", a.log(), b.log())
    });
    assert_eq!(report["events_behind"], 0, "{report}");
    a.stop(Duration::from_secs(30));
    b.stop(Duration::from_secs(30));
    for log in [a.log(), b.log()] {
        assert!(!log.contains("transaction aborted"), "{log}");
        assert!(
            !log.contains("committed on close"),
            "the member commits nothing itself:\n{log}"
        );
    }
}

/// A commit the broker answers as fenced (what a partition's new owner's
/// InitProducerId makes of the old owner's next commit) drops the
/// partition at once: its transaction is aborted, nothing more is
/// committed or checkpointed, and the instance stops, saying why. A
/// successor then takes over and ends every key on its latest event.
#[tokio::test(flavor = "multi_thread")]
async fn a_fenced_transaction_drops_the_partition_and_stops_the_instance_saying_why() {
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let app = App::on_mock_cluster(&cluster, 1, &format!("{EXACTLY_ONCE}{FAST_GROUP}"));
    let a_state = app.state_dir("a");
    let mut a = app.start_with_env(&a_state, &[EVERY_100MS]);
    a.await_log("partition restored", 1, Duration::from_secs(60));
    produce_records_at(&bootstrap, &app.input, &round(20, 1)).await;
    app.await_verified(Duration::from_secs(60), || a.log());

    cluster.request_errors(
        RDKafkaApiKey::EndTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED; 4],
    );
    produce_records_at(&bootstrap, &app.input, &round(20, 2)).await;
    let status = a.wait_exit(Duration::from_secs(60));
    let log = a.log();
    assert!(!status.success(), "A stopped with an error:\n{log}");
    assert!(
        log.contains("fenced: another instance took the partition over"),
        "{log}"
    );
    assert!(
        log.contains(&format!("{}-{}-0", app.id, app.input)),
        "names the transactional id:\n{log}"
    );
    assert!(!log.contains("committed on close"), "{log}");
    let checkpoint =
        keyflight::state::Store::dir(&a_state, &app.id, &app.input, 0).join("checkpoint");
    assert!(
        !checkpoint.exists(),
        "no checkpoint after the fence:\n{log}"
    );
    cluster.clear_request_errors(RDKafkaApiKey::EndTxn);

    let mut b = app.start_with_env(&app.state_dir("b"), &[EVERY_100MS]);
    produce_records_at(&bootstrap, &app.input, &round(20, 3)).await;
    let report = app.await_verified(Duration::from_secs(90), || b.log());
    assert_eq!(report["events_behind"], 0, "{report}");
    let last = crate::support::last_per_key(&read_all_at(&bootstrap, &app.pushed));
    assert!(
        last.values()
            .all(|p| p.headers.get("keyflight-version").map(String::as_str) == Some("3")),
        "{last:?}"
    );
    b.stop(Duration::from_secs(30));
}

/// On a broker without transactions (Tansu 0.6 has no EndTxn), `run` in
/// exactly-once mode stops at once with exit status 2, naming what is
/// missing and the way out, instead of failing at its first commit.
#[tokio::test(flavor = "multi_thread")]
async fn exactly_once_on_a_broker_without_transactions_stops_at_start_naming_what_is_missing() {
    let broker = Broker::start();
    let app = App::create(&broker, 1, EXACTLY_ONCE);
    let mut processor = app.start(&app.state_dir("a"));
    let status = processor.wait_exit(Duration::from_secs(30));
    let log = processor.log();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("EndTxn"), "{log}");
    assert!(
        log.contains("use \"at-least-once\" with this broker"),
        "{log}"
    );
}
