//! Claims on Tansu: changelog records an owner wrote after another claimed
//! the partition do not count (`keyflight::state::claim`).

use std::time::Duration;

use keyflight::state::claim::{owner_header, CLAIM_HEADER, OWNER_HEADER};
use keyflight::state::MarkerCodec;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::support::{
    produce_records, read_all, round, wait_until, App, Broker, Pushed, FAST_GROUP,
};

/// The claims in the changelog, oldest first: their offsets.
fn claims(changelog: &[Pushed]) -> Vec<i64> {
    changelog
        .iter()
        .filter(|r| r.headers.contains_key(CLAIM_HEADER))
        .map(|r| r.offset)
        .collect()
}

/// The changelog's marker records written by the owner of claim `owner`.
fn written_by(changelog: &[Pushed], owner: i64) -> Vec<&Pushed> {
    let owner = owner_header(owner);
    changelog
        .iter()
        .filter(|r| r.headers.get(OWNER_HEADER) == Some(&owner))
        .collect()
}

/// Writes records into changelog partition 0 as the owner of claim
/// `owner` (or, with `owner` `None`, a claim), as a frozen instance's
/// producer would still send them when it wakes.
async fn write_late(
    broker: &Broker,
    changelog: &str,
    records: &[(String, Vec<u8>)],
    owner: Option<i64>,
) {
    let producer: FutureProducer = broker.client_config().create().unwrap();
    let (header, value) = match owner {
        Some(owner) => (OWNER_HEADER, owner_header(owner)),
        None => (CLAIM_HEADER, "claim".to_string()),
    };
    for (key, payload) in records {
        let headers = OwnedHeaders::new().insert(Header {
            key: header,
            value: Some(&value),
        });
        producer
            .send(
                FutureRecord::to(changelog)
                    .partition(0)
                    .key(key)
                    .payload(payload)
                    .headers(headers),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("delivered");
    }
}

/// Open markers of version 1 for the 20 keys, as owner A wrote them (its
/// markT1s): what a frozen A would still send.
fn open_markers_of(changelog: &[Pushed], owner: i64) -> Vec<(String, Vec<u8>)> {
    let codec = MarkerCodec::new();
    written_by(changelog, owner)
        .into_iter()
        .map(|r| {
            let mut marker = codec.decode(r.raw.as_deref().unwrap()).unwrap();
            marker.t2 = 0; // open: a push that may not have landed
            (r.key.clone(), codec.encode(&marker))
        })
        .collect()
}

/// A owns the partition and pushes version 1 of 20 keys, then hands it to
/// B, which pushes version 2. Then A's markers land late, as open markers
/// of version 1 (what a frozen A's producer would still send):
///
/// * a fresh instance C restores the changelog, skips them, and writes its
///   own markers (B's, version 2, closed) over them; before claims it took
///   them for the keys' state, and compensation re-pushed version 1 behind
///   version 2;
/// * B's records landing late while C runs: C finds them between its own
///   writes and writes over them;
/// * a newer claim landing while C runs: C lost the partition without
///   hearing of it, so it exits 1 saying so.
#[tokio::test(flavor = "multi_thread")]
async fn late_markers_of_an_earlier_owner_are_skipped_and_written_over() {
    let broker = Broker::start();
    let app = App::create(&broker, 1, FAST_GROUP);
    let mut a = app.start(&app.state_dir("a"));
    a.await_log("partition restored", 1, Duration::from_secs(60));
    produce_records(&broker, &app.input, &round(20, 1)).await;
    app.await_verified(Duration::from_secs(90), || a.log());
    a.stop(Duration::from_secs(30));

    let mut b = app.start(&app.state_dir("b"));
    b.await_log("partition restored", 1, Duration::from_secs(60));
    produce_records(&broker, &app.input, &round(20, 2)).await;
    app.await_verified(Duration::from_secs(90), || b.log());
    b.stop(Duration::from_secs(30));

    let changelog = read_all(&broker, &app.changelog);
    let [a_claim, b_claim] = claims(&changelog)[..] else {
        panic!("one claim each: {:?}", claims(&changelog));
    };
    write_late(
        &broker,
        &app.changelog,
        &open_markers_of(&changelog, a_claim),
        Some(a_claim),
    )
    .await;

    let mut c = app.start(&app.state_dir("c"));
    c.await_log("partition restored", 1, Duration::from_secs(60));
    // C writes its markers for the 20 keys over A's late ones.
    let codec = MarkerCodec::new();
    // C's marker records after offset `after`, once there are 20.
    let written_over = |owner: i64, after: i64, log: &dyn Fn() -> String| {
        let changelog = read_all(&broker, &app.changelog);
        let rewrites: Vec<_> = written_by(&changelog, owner)
            .into_iter()
            .filter(|r| r.offset > after)
            .map(|r| {
                (
                    r.key.clone(),
                    codec.decode(r.raw.as_deref().unwrap()).unwrap(),
                )
            })
            .collect();
        match rewrites.len() {
            20.. => Ok(rewrites),
            n => Err(format!("{n} keys written over\n{}", log())),
        }
    };
    let c_claim = *claims(&read_all(&broker, &app.changelog)).last().unwrap();
    let rewrites = wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
        written_over(c_claim, c_claim, &|| c.log())
    });
    assert!(
        rewrites.iter().all(|(_, m)| m.version == 2 && !m.is_open()),
        "B's closed markers of version 2, not A's open ones: {rewrites:?}"
    );
    assert!(
        c.log().contains("superseded=20"),
        "the restore skipped A's 20 late markers:\n{}",
        c.log()
    );

    // B's late records, while C runs: C writes over them at its next write.
    let late_b = open_markers_of(&read_all(&broker, &app.changelog), b_claim);
    let before = read_all(&broker, &app.changelog).last().unwrap().offset;
    write_late(&broker, &app.changelog, &late_b, Some(b_claim)).await;
    produce_records(&broker, &app.input, &round(1, 3)).await;
    let rewrites = wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
        written_over(c_claim, before + late_b.len() as i64, &|| c.log())
    });
    assert!(
        rewrites
            .iter()
            .filter(|(key, _)| key != "key-000") // pushed again meanwhile
            .all(|(_, m)| m.version == 2 && !m.is_open()),
        "C's own closed markers again, not B's late open ones: {rewrites:?}"
    );

    // A newer claim, while C runs: at its next write, C stops.
    write_late(
        &broker,
        &app.changelog,
        &[("keyflight-claim/late".into(), b"{}".to_vec())],
        None,
    )
    .await;
    produce_records(&broker, &app.input, &round(1, 4)).await;
    let status = c.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(1), "{}", c.log());
    assert!(
        c.log().contains("another instance claimed it"),
        "says why:\n{}",
        c.log()
    );
}
