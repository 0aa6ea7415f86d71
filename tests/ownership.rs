//! One owner per partition, even when an instance freezes: a member whose
//! assignment was lost drops its partitions at once.

use std::time::Duration;

use crate::support::{produce_records_at, read_all_at, wait_until, App, FAST_GROUP};

/// `keys` keys with version `version` each.
fn round(keys: usize, version: u64) -> Vec<crate::support::Record> {
    (0..keys)
        .map(|k| {
            let key = format!("key-{k:02}");
            let value = format!(r#"{{"version":{version},"key":{k}}}"#);
            (Some(key.into_bytes()), Some(value.into_bytes()))
        })
        .collect()
}

/// Instance A owns the partition and is frozen (SIGSTOP) mid-stream; its
/// session expires, B takes the partition over and pushes newer events;
/// then A wakes (SIGCONT). A hears that its assignment was lost and drops
/// the partition: no commit, no checkpoint (the next store opened on A's
/// host restores in full), nothing more of it. Afterwards the newest
/// events still end every key, and `verify` passes. Before, a lost
/// assignment was closed like a revoke: A's pushes in flight finished,
/// its markers went to the changelog after B's, it committed and wrote a
/// checkpoint that skipped B's changelog records.
///
/// On librdkafka's mock cluster: Tansu 0.6's coordinator does not time a
/// silent member out of the group (see `recovery`).
#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_owner_that_wakes_drops_its_lost_partition_without_commit_or_checkpoint() {
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let app = App::on_mock_cluster(&cluster, 1, FAST_GROUP);
    let a_state = app.state_dir("a");
    let mut a = app.start(&a_state);
    a.await_log("partition restored", 1, Duration::from_secs(60));
    let mut records = Vec::new();
    for version in 1..=200 {
        records.extend(round(20, version));
    }
    produce_records_at(&bootstrap, &app.input, &records).await;
    // Frozen while it works through the burst.
    wait_until(Duration::from_secs(30), Duration::from_millis(20), || {
        (!read_all_at(&bootstrap, &app.pushed).is_empty())
            .then_some(())
            .ok_or_else(|| "no push yet".to_string())
    });
    a.freeze();

    let mut b = app.start(&app.state_dir("b"));
    b.await_log("partition restored", 1, Duration::from_secs(90));
    let newer = round(20, 1_000);
    produce_records_at(&bootstrap, &app.input, &newer).await;
    wait_until(Duration::from_secs(60), Duration::from_millis(100), || {
        let pushed = read_all_at(&bootstrap, &app.pushed);
        let newest = pushed
            .iter()
            .filter(|p| p.headers.get("keyflight-version").map(String::as_str) == Some("1000"))
            .count();
        (newest >= 20)
            .then_some(())
            .ok_or_else(|| format!("B pushed {newest} of 20 newest\n{}", b.log()))
    });

    a.thaw();
    // Lost or revoked, the partition's task closes.
    a.await_log("partition closed", 1, Duration::from_secs(60));
    a.stop(Duration::from_secs(30));
    let log = a.log();
    assert!(
        !log.contains("committed on close"),
        "A committed nothing:\n{log}"
    );
    let checkpoint =
        keyflight::state::Store::dir(&a_state, &app.id, &app.input, 0).join("checkpoint");
    assert!(
        !checkpoint.exists(),
        "A wrote no checkpoint for the lost partition:\n{log}"
    );
    assert!(
        log.contains("assignment lost"),
        "A heard it lost the partition:\n{log}"
    );

    // Whatever A had handed to its producer before it froze may still have
    // landed when it woke (the at-least-once window); B's next pushes end
    // every key on its newest event.
    let newest = round(20, 2_000);
    produce_records_at(&bootstrap, &app.input, &newest).await;
    let report = app.await_verified(Duration::from_secs(90), || b.log());
    assert_eq!(report["events_behind"], 0, "{report}");
    b.stop(Duration::from_secs(30));
}
