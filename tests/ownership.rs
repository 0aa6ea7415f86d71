//! One owner per partition, even when an instance freezes: a member whose
//! assignment was lost drops its partitions at once.

use std::time::Duration;

use crate::support::{produce_records_at, read_all_at, round, rounds, wait_until, App, FAST_GROUP};

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
    let records = rounds(20, 1..=200);
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
    // Lost, the partition's task closes. A hears it from the group, or
    // first from the changelog, where B's claim is newer than its own: then
    // it fails by itself (exit 1), as an instance that lost a partition
    // without notice does (claims.rs). Which comes first is a race.
    a.await_log("partition closed", 1, Duration::from_secs(60));
    let status = a.terminate(Duration::from_secs(30));
    let log = a.log();
    let claimed = log.contains("another instance claimed it");
    assert!(
        status.success() || (claimed && status.code() == Some(1)),
        "A stopped cleanly, or failed on B's claim ({status}):\n{log}"
    );
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
        log.contains("assignment lost") || claimed,
        "A heard it lost the partition:\n{log}"
    );

    // Whatever A had handed to its producer before it froze may still have
    // landed when it woke (the at-least-once window): pushes older than a
    // push of their key already in the topic. Measured, not asserted.
    let pushed = read_all_at(&bootstrap, &app.pushed);
    let late = late_pushes(&pushed);
    println!(
        "frozen owner: {late} of {} pushes landed after a newer push of their key",
        pushed.len()
    );
    // B's next pushes end every key on its newest event.
    let newest = round(20, 2_000);
    produce_records_at(&bootstrap, &app.input, &newest).await;
    let report = app.await_verified(Duration::from_secs(90), || b.log());
    assert_eq!(report["events_behind"], 0, "{report}");
    b.stop(Duration::from_secs(30));
}

/// Writes `count` closed markers for keys `m-<partition>-<n>` straight to
/// each partition of the changelog (what an earlier owner left).
async fn fill_changelog(bootstrap: &str, app: &App, partitions: i32, count: usize) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .unwrap();
    let codec = keyflight::state::MarkerCodec::new();
    let mut pending = Vec::with_capacity(count * partitions as usize);
    for partition in 0..partitions {
        for n in 0..count {
            let marker =
                keyflight::state::Marker::started(1, 2, 1, Some("{}".into())).acknowledged(2);
            let value = codec.encode(&marker);
            let key = format!("m-{partition}-{n}");
            let record = FutureRecord::to(&app.changelog)
                .partition(partition)
                .key(&key)
                .payload(&value);
            pending.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
        }
    }
    for delivery in pending {
        delivery.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
}

/// A rebalance while the partitions are still restoring a large changelog:
/// the restoring tasks answer the revoke at once and stop restoring, the
/// partitions' next tasks on the same host wait for the stores rather than
/// fail on RocksDB's lock, neither process exits, and everything produced
/// verifies. Before, a restoring task could not see the close: the revoke
/// waited out the shutdown timeout for each partition in turn, and a
/// partition assigned back to the same host found its store still locked,
/// so the process exited with an error.
#[tokio::test(flavor = "multi_thread")]
async fn a_rebalance_while_restoring_loses_nothing_and_no_process_exits() {
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let app = App::on_mock_cluster(&cluster, 2, FAST_GROUP);
    fill_changelog(&bootstrap, &app, 2, 300_000).await;
    // Every request now takes 300 ms: a restore reads its 18 MB a
    // fetch (1 MB) at a time, for seconds, while the group rebalances.
    cluster
        .broker_round_trip_time(1, Duration::from_millis(300))
        .unwrap();

    let mut a = app.start(&app.state_dir("a"));
    a.await_log("consuming", 1, Duration::from_secs(30));
    a.await_log("partition assigned", 2, Duration::from_secs(30));
    // B joins while A restores: the group rebalances under A's restores.
    let mut b = app.start(&app.state_dir("b"));
    wait_until(Duration::from_secs(120), Duration::from_millis(200), || {
        let restored = a.log().matches("partition restored").count()
            + b.log().matches("partition restored").count();
        (restored >= 2)
            .then_some(())
            .ok_or_else(|| format!("{restored} restored\nA:\n{}\nB:\n{}", a.log(), b.log()))
    });
    let log = a.log();
    let revoked = log
        .find("partitions revoked")
        .expect("A's partitions were revoked");
    assert!(
        log[..revoked].matches("partition restored").count() < 2,
        "A's revoke was over while its partitions still restored (a restoring task answers a close at once):\n{log}"
    );
    let events = round(40, 1);
    produce_records_at(&bootstrap, &app.input, &events).await;
    let report = app.await_verified(Duration::from_secs(120), || {
        format!("A:\n{}\nB:\n{}", a.log(), b.log())
    });
    assert_eq!(report["events_behind"], 0, "{report}");
    for (name, processor) in [("A", &mut a), ("B", &mut b)] {
        assert!(
            !processor.log().contains("partition task failed"),
            "{name} kept running:\n{}",
            processor.log()
        );
        processor.stop(Duration::from_secs(30));
    }
}

/// The partitions a member's log says it was assigned, in order (one entry
/// per task started).
fn assigned(log: &str) -> Vec<i32> {
    log.lines()
        .filter(|l| l.contains("partition assigned"))
        .filter_map(|l| {
            let at = l.find("partition=")? + "partition=".len();
            l[at..].split_whitespace().next()?.parse().ok()
        })
        .collect()
}

/// Scale 1 → 3 → 1 under load with the default cooperative-sticky
/// assignment: when B and C join, A gives up only the partitions that move
/// to them; the partitions it keeps are never revoked, so their tasks never
/// stop (A starts no second task for any partition until B and C leave).
/// When they leave, A takes their partitions back, and `verify` passes.
/// With `group.assignment = "eager"` (the only behaviour before), every
/// join revokes all six partitions and A starts a new task for each one it
/// keeps.
#[test]
fn scaling_out_with_cooperative_assignment_leaves_unmoved_partitions_running() {
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let app = App::on_mock_cluster(&cluster, 6, FAST_GROUP);
    let load = crate::support::Load::start_at(&bootstrap, &app.input, 200, 300);
    let a = app.start(&app.state_dir("a"));
    a.await_log("partition restored", 6, Duration::from_secs(60));
    let mut b = app.start(&app.state_dir("b"));
    let mut c = app.start(&app.state_dir("c"));
    b.await_log("partition restored", 1, Duration::from_secs(90));
    c.await_log("partition restored", 1, Duration::from_secs(90));
    wait_until(Duration::from_secs(60), Duration::from_millis(200), || {
        let moved = assigned(&b.log()).len() + assigned(&c.log()).len();
        (moved >= 4)
            .then_some(())
            .ok_or_else(|| format!("{moved} partitions moved to B and C so far"))
    });
    let kept: Vec<i32> = (0..6)
        .filter(|p| !assigned(&b.log()).contains(p) && !assigned(&c.log()).contains(p))
        .collect();
    println!(
        "scale-out ({}): A's kept partitions {kept:?} paused {:?}",
        std::env::var("KEYFLIGHT_GROUP__ASSIGNMENT")
            .unwrap_or_else(|_| "cooperative-sticky".into()),
        pause_of(&a.log(), &kept)
    );
    let started_by_a = assigned(&a.log());
    let mut sorted = started_by_a.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(
        (started_by_a.len(), sorted.len()),
        (6, 6),
        "A started one task per partition and none again while B and C joined: {started_by_a:?}\n{}",
        a.log()
    );

    b.stop(Duration::from_secs(30));
    c.stop(Duration::from_secs(30));
    let events = load.stop();
    let report = app.await_verified(Duration::from_secs(120), || a.log());
    assert_eq!(report["events_behind"], 0, "{report}");
    println!(
        "scale 1 -> 3 -> 1 (cooperative): {events} events; A's tasks: {:?}",
        assigned(&a.log())
    );
}

/// Pushes that landed after a push of the same key with a higher
/// `keyflight-version` (in a one-partition topic's order).
fn late_pushes(pushed: &[crate::support::Pushed]) -> usize {
    let mut newest = std::collections::HashMap::new();
    let mut late = 0;
    for push in pushed {
        let version: u64 = push.headers["keyflight-version"].parse().unwrap_or(0);
        let seen = newest.entry(push.key.clone()).or_insert(0);
        if version < *seen {
            late += 1;
        }
        *seen = (*seen).max(version);
    }
    late
}

/// The longest time any of `partitions` spent between a revoke (the start
/// of the "partitions revoked" line's rebalance, as logged) and its next
/// restore, from the log's timestamps; zero if none was revoked.
fn pause_of(log: &str, partitions: &[i32]) -> Duration {
    let at = |line: &str| {
        line.split_whitespace()
            .next()
            .and_then(|t| humantime::parse_rfc3339(t).ok())
    };
    // The event's own field, after the span's.
    let field = |line: &str, name: &str| -> Option<String> {
        let start = line.rfind(name)? + name.len();
        Some(line[start..].split_whitespace().next()?.to_string())
    };
    let mut revoked_at: std::collections::HashMap<i32, std::time::SystemTime> = Default::default();
    let mut longest = Duration::ZERO;
    for line in log.lines().map(plain) {
        let line = line.as_str();
        if line.contains("partitions revoked") {
            let Some(when) = at(line) else { continue };
            let list = line[line.find('[').unwrap_or(0)..].trim_matches(|c| c == '[' || c == ']');
            for p in list
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|p| p.parse().ok())
            {
                if partitions.contains(&p) {
                    revoked_at.entry(p).or_insert(when);
                }
            }
        } else if line.contains("partition restored") {
            let (Some(when), Some(p)) = (
                at(line),
                field(line, "partition=").and_then(|p| p.parse().ok()),
            ) else {
                continue;
            };
            if let Some(since) = revoked_at.remove(&p) {
                longest = longest.max(when.duration_since(since).unwrap_or_default());
            }
        }
    }
    longest
}

/// A log line without its terminal colour codes (`ESC [ … m`).
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Static membership on Tansu: A and B each own one of two partitions; A
/// stops (SIGTERM) and starts again on the same state directory. With
/// `group.instance_id` set, the restart is within the session timeout and
/// the group does not rebalance: B's partition is never revoked, A gets its
/// own partition back, and everything produced meanwhile verifies. The
/// same restart without instance ids runs first as the control: there, A's
/// leave and rejoin revoke B's partition. Eager assignment makes any
/// rebalance visible in B's log (cooperative assignment revokes nothing
/// from B when B keeps its partition).
#[tokio::test(flavor = "multi_thread")]
async fn a_static_member_restarting_within_its_session_moves_no_partition() {
    let broker = crate::support::Broker::start();
    for static_members in [false, true] {
        let app = crate::support::App::create(
            &broker,
            2,
            "[group]\nassignment = \"eager\"\n[kafka.consumer]\n\"session.timeout.ms\" = \"30000\"\n\"heartbeat.interval.ms\" = \"1000\"\n\"max.poll.interval.ms\" = \"30000\"\n",
        );
        let env = |name: &'static str| -> Vec<(&'static str, &'static str)> {
            if static_members {
                vec![("KEYFLIGHT_GROUP__INSTANCE_ID", name)]
            } else {
                vec![]
            }
        };
        let mut a = app.start_with_env(&app.state_dir("a"), &env("a"));
        a.await_log("partition restored", 2, Duration::from_secs(60));
        let b = app.start_with_env(&app.state_dir("b"), &env("b"));
        b.await_log("partition restored", 1, Duration::from_secs(60));
        let b_owns = assigned(&b.log());
        let b_before = b.log();

        a.stop(Duration::from_secs(30));
        let a_owned: Vec<i32> = (0..2).filter(|p| !b_owns.contains(p)).collect();
        let mut a = app.start_with_env(&app.state_dir("a"), &env("a"));
        a.await_log("partition restored", 1, Duration::from_secs(60));
        produce_records_at(&broker.bootstrap, &app.input, &round(40, 1)).await;
        let report = app.await_verified(Duration::from_secs(90), || {
            format!("A:\n{}\nB:\n{}", a.log(), b.log())
        });
        assert_eq!(report["events_behind"], 0, "{report}");
        let b_after = b.log()[b_before.len()..].to_string();
        let b_rebalanced =
            b_after.contains("partitions revoked") || b_after.contains("partition assigned");
        println!(
            "static membership {static_members}: B rebalanced {b_rebalanced}, A restarted with {:?}",
            assigned(&a.log())
        );
        if static_members {
            assert!(
                !b_rebalanced,
                "B kept its partition through A's restart:\n{b_after}"
            );
            assert_eq!(assigned(&a.log()), a_owned, "A got its own partition back");
        } else {
            assert!(
                b_rebalanced,
                "control: a dynamic member's restart rebalances B:\n{b_after}"
            );
        }
        a.stop(Duration::from_secs(30));
        let mut b = b;
        b.stop(Duration::from_secs(30));
    }
}
