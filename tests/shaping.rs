//! Push shaping and bounded state against Tansu: a quiet period
//! (`singleflight.delay`) turns a burst into one push per key, a cooldown
//! (`singleflight.min_interval`) bounds a hot key's push rate,
//! `singleflight.skip_unchanged` pushes no value a key already has
//! downstream, and `state.ttl` forgets idle keys. The engine's own rules
//! for the windows are checked on random schedules in `simulation`.

use std::collections::BTreeMap;
use std::time::Duration;

use keyflight::kafka::headers as header;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::support::{read_all, round, wait_until, App, Broker, Record};

/// Produces `rounds` one after another, each round once the broker has
/// acknowledged the one before: a burst spread over the time the broker
/// takes (milliseconds per round here), not one batch.
async fn produce_rounds(broker: &Broker, topic: &str, rounds: impl Iterator<Item = Vec<Record>>) {
    let producer: FutureProducer = broker
        .client_config()
        .set("linger.ms", "0")
        .create()
        .unwrap();
    for records in rounds {
        let sends: Vec<_> = records
            .iter()
            .map(|(key, value)| {
                let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic);
                if let Some(key) = key {
                    record = record.key(&key[..]);
                }
                if let Some(value) = value {
                    record = record.payload(&value[..]);
                }
                producer.send_result(record).map_err(|(e, _)| e).unwrap()
            })
            .collect();
        for send in sends {
            send.await.unwrap().map_err(|(e, _)| e).unwrap();
        }
    }
}

/// Pushes per key.
fn pushes_per_key(app: &App, broker: &Broker) -> BTreeMap<String, usize> {
    let mut per_key = BTreeMap::new();
    for push in read_all(broker, &app.pushed) {
        *per_key.entry(push.key).or_default() += 1;
    }
    per_key
}

/// 20 keys get 50 events each, round after round as the broker
/// acknowledges them (the rounds a few milliseconds apart). With `delay =
/// 200ms` every key waits until it has been quiet for 200 ms: one push per
/// key, carrying all 50 events, and `verify` passes. The same burst without
/// a delay (the control, run first) pushes a key's first event at once and
/// the rest as it arrives: more than one push per key.
#[tokio::test(flavor = "multi_thread")]
async fn a_burst_inside_the_delay_is_one_push_per_key() {
    let broker = Broker::start();
    for delay in ["0s", "200ms"] {
        // Fetches that wait at most 20 ms: the quiet period is measured where
        // keyflight reads, so the broker's own waits must be shorter (Tansu
        // holds every fetch for up to half of `fetch.wait.max.ms`, 500 ms
        // by default, even when it has records).
        let app = App::create(
            &broker,
            1,
            &format!("[singleflight]\ndelay = \"{delay}\"\n[kafka.consumer]\n\"fetch.wait.max.ms\" = \"20\"\n"),
        );
        let mut processor = app.start(&app.state_dir("a"));
        processor.await_log("partition restored", 1, Duration::from_secs(60));
        produce_rounds(&broker, &app.input, (1..=50).map(|v| round(20, v))).await;
        let report = app.await_verified(Duration::from_secs(90), || processor.log());
        assert_eq!(report["events_behind"], 0, "{report}");
        let per_key = pushes_per_key(&app, &broker);
        let total: usize = per_key.values().sum();
        println!("delay {delay}: {total} pushes for 20 keys x 50 events");
        if delay == "0s" {
            assert!(
                total > 20,
                "control: without a delay the burst is pushed as it comes ({per_key:?})"
            );
        } else {
            assert_eq!(per_key.len(), 20);
            assert!(
                per_key.values().all(|n| *n == 1),
                "one push per key: {per_key:?}"
            );
            for push in read_all(&broker, &app.pushed) {
                assert_eq!(push.headers[header::MERGED], "50", "{push:?}");
            }
        }
        processor.stop(Duration::from_secs(30));
    }
}

/// One hot key gets an event every 20 ms for 3 s. With `min_interval =
/// 500ms` its pushes start at least 500 ms apart (by the pushes' produce
/// timestamps), so about seven pushes carry 150 events, and the last one
/// carries the newest event (`verify` passes).
#[tokio::test(flavor = "multi_thread")]
async fn min_interval_bounds_a_hot_keys_push_rate() {
    let broker = Broker::start();
    let app = App::create(&broker, 1, "[singleflight]\nmin_interval = \"500ms\"\n");
    let mut processor = app.start(&app.state_dir("a"));
    processor.await_log("partition restored", 1, Duration::from_secs(60));
    let producer: FutureProducer = broker
        .client_config()
        .set("linger.ms", "0")
        .create()
        .unwrap();
    // The input's pace, not a wait for anything: an event every 20 ms.
    let mut pace = tokio::time::interval(Duration::from_millis(20));
    for version in 1..=150u64 {
        pace.tick().await;
        let value = format!(r#"{{"version":{version},"key":0}}"#);
        producer
            .send(
                FutureRecord::to(&app.input).key("hot").payload(&value),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    let report = app.await_verified(Duration::from_secs(90), || processor.log());
    assert_eq!(report["events_behind"], 0, "{report}");
    let starts: Vec<i64> = read_all(&broker, &app.pushed)
        .iter()
        .map(|p| p.timestamp.expect("pushes carry their produce time"))
        .collect();
    let gaps: Vec<i64> = starts.windows(2).map(|w| w[1] - w[0]).collect();
    println!(
        "min_interval 500ms: {} pushes for 150 events over 3 s, gaps {gaps:?} ms",
        starts.len()
    );
    assert!(
        starts.len() >= 2,
        "the key was pushed more than once: {starts:?}"
    );
    // A push starts when the cooldown ends, and its record is stamped when
    // the shell hands it to the producer, a little later: the gap between
    // two stamps is the cooldown less the first one's lag.
    assert!(
        gaps.iter().all(|gap| *gap >= 490),
        "pushes at least 500 ms apart: {gaps:?}"
    );
    processor.stop(Duration::from_secs(30));
}

/// Values `{"key":k,"value":tag}` for keys `keys`, without a version field
/// (offsets order them).
fn values(tag: &str, keys: std::ops::Range<usize>) -> Vec<Record> {
    keys.map(|k| {
        (
            Some(format!("key-{k:03}").into_bytes()),
            Some(format!(r#"{{"key":{k},"value":"{tag}"}}"#).into_bytes()),
        )
    })
    .collect()
}

/// `skip_unchanged = true`: 10 keys get a value, then the same 10 values
/// again and 5 of them a new one: 15 pushes, not 25. A second instance
/// then restores the changelog on a fresh state directory and gets every
/// key's current value once more: nothing is pushed, since the markers say
/// what each key last pushed. `verify` passes throughout and reports the
/// keys that end on an older push of the same value.
#[tokio::test(flavor = "multi_thread")]
async fn skip_unchanged_drops_identical_re_sends_and_survives_a_restart() {
    let broker = Broker::start();
    let app = App::create(&broker, 1, "[singleflight]\nskip_unchanged = true\n");
    let mut a = app.start(&app.state_dir("a"));
    a.await_log("partition restored", 1, Duration::from_secs(60));
    crate::support::produce_records(&broker, &app.input, &values("a", 0..10)).await;
    app.await_committed(&broker, Duration::from_secs(60), || a.log());
    let mut again = values("a", 0..10);
    again.extend(values("b", 0..5));
    crate::support::produce_records(&broker, &app.input, &again).await;
    app.await_committed(&broker, Duration::from_secs(60), || a.log());
    assert_eq!(
        read_all(&broker, &app.pushed).len(),
        15,
        "the 10 re-sends were skipped"
    );
    let report = app.verify().expect("verify passes");
    assert_eq!(report["unchanged"], 5, "{report}");
    a.stop(Duration::from_secs(30));

    let mut b = app.start(&app.state_dir("b"));
    b.await_log("partition restored", 1, Duration::from_secs(60));
    let mut current = values("b", 0..5);
    current.extend(values("a", 5..10));
    crate::support::produce_records(&broker, &app.input, &current).await;
    app.await_committed(&broker, Duration::from_secs(60), || b.log());
    assert_eq!(
        read_all(&broker, &app.pushed).len(),
        15,
        "after the restore, nothing is pushed again:\n{}",
        b.log()
    );
    let report = app.verify().expect("verify passes");
    assert_eq!(report["unchanged"], 10, "{report}");
    b.stop(Duration::from_secs(30));
}

/// `state.ttl = "1s"`, the sweep running with a compensation scan every
/// 500 ms: 10 keys pushed once are forgotten, each with a tombstone as its
/// last changelog record. A second instance restoring the changelog on a
/// fresh state directory then holds no marker, and pushes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn expired_keys_are_tombstoned_in_the_changelog_and_stay_gone_after_a_restore() {
    let broker = Broker::start();
    let app = App::create(
        &broker,
        1,
        "[state]\nttl = \"1s\"\n[compensation]\ninterval = \"500ms\"\n",
    );
    let mut a = app.start(&app.state_dir("a"));
    a.await_log("partition restored", 1, Duration::from_secs(60));
    crate::support::produce_records(&broker, &app.input, &values("a", 0..10)).await;
    wait_until(Duration::from_secs(60), Duration::from_millis(200), || {
        let last =
            crate::support::last_per_key(&crate::support::read_markers(&broker, &app.changelog));
        let gone = last
            .values()
            .filter(|record| record.value.is_none())
            .count();
        (last.len() == 10 && gone == 10)
            .then_some(())
            .ok_or_else(|| format!("{gone} of {} keys tombstoned\n{}", last.len(), a.log()))
    });
    assert_eq!(read_all(&broker, &app.pushed).len(), 10);
    a.stop(Duration::from_secs(30));

    let state = app.state_dir("b");
    let mut b = app.start(&state);
    b.await_log("partition restored", 1, Duration::from_secs(60));
    b.stop(Duration::from_secs(30));
    let dir = keyflight::state::Store::dir(&state, &app.id, &app.input, 0);
    let (store, _) = keyflight::state::Store::open_read_only(&dir).unwrap();
    assert_eq!(store.markers().unwrap(), vec![], "nothing comes back");
    assert_eq!(
        read_all(&broker, &app.pushed).len(),
        10,
        "nothing pushed again"
    );
}
