//! The task core off the graceful path, one scripted fault each: a push or
//! a dead letter the broker refuses, a push that keeps failing, a marker
//! too large for the changelog, a record read again below the position.

use std::sync::Arc;
use std::time::Duration;

use keyflight::engine::MergePolicy;
use keyflight::metrics::Metrics;
use keyflight::processor::task::core::{
    Holds, OtherRecord, ProduceError, PUSH_REFUSED, REDELIVERED,
};
use keyflight::processor::task::{Action, InputRecord, SinkAnswer, TaskCore, Timer};

use crate::task_sim::{configured_core, new_core, ModelStore};

const NOW: u64 = 1_700_000_000_000_000_000;
const MS: u64 = 1_000_000;

fn actions(core: &mut TaskCore<ModelStore>) -> Vec<Action> {
    std::iter::from_fn(|| core.poll_action()).collect()
}

fn event(offset: i64, key: &str, version: u64) -> InputRecord {
    let value = format!(r#"{{"v":{version}}}"#);
    InputRecord::copied(offset, Some(key.as_bytes()), Some(value.as_bytes()))
}

/// Takes `records` in one turn and returns its actions.
fn feed(core: &mut TaskCore<ModelStore>, records: Vec<InputRecord>, now: u64) -> Vec<Action> {
    core.take_batch(records);
    core.end_turn(now);
    actions(core)
}

/// Takes `records` in one turn, whose one action is a push: its flight.
fn pushed(
    core: &mut TaskCore<ModelStore>,
    records: Vec<InputRecord>,
) -> keyflight::processor::task::Flight {
    match feed(core, records, NOW).pop() {
        Some(Action::Push { flight, .. }) => flight,
        other => panic!("the event is pushed: {other:?}"),
    }
}

/// A core whose push of key `k` was acknowledged, at the flush that hands
/// its marker to the changelog: that write's action.
fn marker_written(policy: MergePolicy, metrics: &Arc<Metrics>) -> (TaskCore<ModelStore>, Action) {
    let mut core = new_core(policy, metrics);
    let flight = pushed(&mut core, vec![event(0, "k", 1)]);
    core.push_done(NOW, flight, Ok(()), Duration::ZERO);
    core.end_turn(NOW);
    core.tick(NOW, Timer::ChangelogFlush);
    let mut written = actions(&mut core);
    assert!(
        matches!(written.as_slice(), [Action::WriteChangelog { .. }]),
        "the marker is written: {written:?}"
    );
    let write = written.pop().expect("one write");
    (core, write)
}

/// A commit tick, with every changelog write it hands over landing: the
/// commits it sent.
fn commits(core: &mut TaskCore<ModelStore>, now: u64) -> Vec<i64> {
    core.tick(now, Timer::Commit);
    let (mut sent, mut offset) = (Vec::new(), 0);
    loop {
        let turn = actions(core);
        if turn.is_empty() {
            return sent;
        }
        for action in turn {
            match action {
                Action::Commit(position) => sent.push(position),
                Action::WriteChangelog { .. } => {
                    core.changelog_done(now, Ok(offset));
                    offset += 1;
                }
                _ => {}
            }
        }
    }
}

/// A push the broker refuses for good (here: too large) is not retried:
/// its value goes to the dead-letter topic as `push-refused`, with its key
/// and version; the key's events stay uncommitted until the dead letter
/// lands, then the key moves on and pushes what merged meanwhile.
#[test]
fn a_push_the_broker_refuses_is_dead_lettered_and_its_key_moves_on() {
    let metrics = Arc::new(Metrics::new());
    let mut core = new_core(MergePolicy::Latest, &metrics);
    let flight = pushed(&mut core, vec![event(0, "k", 1)]);
    assert!(
        feed(&mut core, vec![event(1, "k", 2)], NOW).is_empty(),
        "v2 merges"
    );
    core.push_done(
        NOW,
        flight,
        Err(ProduceError::TooLarge(
            "Broker: Message size too large".into(),
        )),
        Duration::ZERO,
    );
    core.end_turn(NOW);
    let letter = match actions(&mut core).as_slice() {
        [Action::DeadLetter { letter, delay }] => {
            assert_eq!(*delay, Duration::ZERO);
            letter.clone()
        }
        other => panic!("one dead letter, no retry: {other:?}"),
    };
    assert_eq!(letter.reason, PUSH_REFUSED);
    assert_eq!(letter.version, Some(1));
    assert_eq!(letter.record.key.as_deref(), Some(&b"k"[..]));
    assert_eq!(letter.record.payload.as_deref(), Some(&br#"{"v":1}"#[..]));
    assert!(letter.detail.contains("Message size too large"));
    assert!(matches!(letter.holds, Holds::Push(_)));
    assert_eq!(core.in_flight().0, 1, "the key stays in flight");
    assert!(
        commits(&mut core, NOW).iter().all(|p| *p == 0),
        "no commit passes its events yet"
    );

    core.dead_letter_done(NOW, letter.id, Ok(()));
    core.end_turn(NOW);
    match actions(&mut core).as_slice() {
        [Action::Push { flight, .. }] => assert_eq!(flight.push.version, 2),
        other => panic!("the merged v2 is pushed next: {other:?}"),
    }
}

/// A refused push whose key has nothing merged behind it closes its
/// marker once its dead letter landed, so neither the compensation scan
/// nor a restart pushes the refused value again; its offset is committed.
#[test]
fn a_refused_push_closes_its_marker_and_its_offset_is_committed_once_dead_lettered() {
    let metrics = Arc::new(Metrics::new());
    let mut core = new_core(MergePolicy::Latest, &metrics);
    let flight = pushed(&mut core, vec![event(0, "k", 1)]);
    core.push_done(
        NOW,
        flight,
        Err(ProduceError::Refused(
            "Broker: Topic authorization failed".into(),
        )),
        Duration::ZERO,
    );
    let Some(Action::DeadLetter { letter, .. }) = core.poll_action() else {
        panic!("dead-lettered");
    };
    core.dead_letter_done(NOW, letter.id, Ok(()));
    core.end_turn(NOW);
    let marker = core.marker(&"k".into()).unwrap().expect("a marker");
    assert!(!marker.is_open(), "closed: {marker:?}");
    assert_eq!(marker.version, 1);
    assert_eq!(commits(&mut core, NOW), vec![1]);
}

/// Retriable failures are retried with the key's newest value after a
/// backoff that doubles (100, 200, 400 ms, then the 800 ms maximum); once
/// the key has been failing for `give_up_after`, its push is dead-lettered
/// as `push-refused`, so one key never holds the partition's commits
/// longer than that.
#[test]
fn a_push_failing_with_retriable_errors_backs_off_longer_and_is_given_up_after_the_bound() {
    let metrics = Arc::new(Metrics::new());
    let mut core = configured_core(ModelStore::new(Default::default()), &metrics, |c| {
        c.give_up_after = Duration::from_secs(2)
    });
    let mut flight = pushed(&mut core, vec![event(0, "k", 1)]);
    let mut now = NOW;
    let mut delays = Vec::new();
    loop {
        core.push_done(
            now,
            flight,
            Err(ProduceError::Retriable("Local: Message timed out".into())),
            Duration::ZERO,
        );
        core.end_turn(now);
        match actions(&mut core).pop() {
            Some(Action::Push {
                flight: retry,
                delay,
            }) => {
                delays.push(delay.as_millis() as u64);
                now += delay.as_nanos() as u64 + MS;
                flight = retry;
            }
            Some(Action::DeadLetter { letter, .. }) => {
                assert_eq!(letter.reason, PUSH_REFUSED);
                assert!(
                    letter.detail.starts_with("gave up after")
                        && letter.detail.contains("Message timed out"),
                    "{}",
                    letter.detail
                );
                break;
            }
            other => panic!("a retry or the dead letter: {other:?}"),
        }
    }
    assert_eq!(delays[..4], [100, 200, 400, 800], "{delays:?}");
    assert!(delays[4..].iter().all(|d| *d == 800), "{delays:?}");
    let failing_for = (now - NOW) / MS;
    assert!(
        (2_000..2_000 + 800 + 10).contains(&failing_for),
        "given up at the bound, not later: {failing_for} ms"
    );
}

/// A sink that is busy (an HTTP 429) names how long to wait: the retry
/// waits at least that, more than the backoff alone, but never past
/// `give_up_after`, so a huge Retry-After cannot hold a key for days.
#[test]
fn a_throttled_push_is_retried_no_sooner_than_asked_within_the_give_up_bound() {
    let metrics = Arc::new(Metrics::new());
    let mut core = configured_core(ModelStore::new(Default::default()), &metrics, |c| {
        c.give_up_after = Duration::from_secs(60)
    });
    let flight = pushed(&mut core, vec![event(0, "k", 1)]);
    let retry_after = |core: &mut TaskCore<ModelStore>, flight, wait| {
        let throttled = ProduceError::Throttled {
            message: "HTTP 429".into(),
            retry_after: wait,
        };
        core.push_done(NOW, flight, Err(throttled), Duration::ZERO);
        core.end_turn(NOW);
        match actions(core).pop() {
            Some(Action::Push { flight, delay }) => (flight, delay),
            other => panic!("a retry: {other:?}"),
        }
    };
    let (flight, delay) = retry_after(&mut core, flight, Duration::from_secs(3));
    assert_eq!(
        delay,
        Duration::from_secs(3),
        "Retry-After beats the 100 ms backoff"
    );
    let (flight, delay) = retry_after(&mut core, flight, Duration::ZERO);
    assert_eq!(
        delay,
        Duration::from_millis(200),
        "no Retry-After: the backoff"
    );
    let (_, delay) = retry_after(&mut core, flight, Duration::from_secs(86_400));
    assert_eq!(delay, Duration::from_secs(60), "capped at give_up_after");
}

/// A push the sink answers with a refusal for good (an HTTP 4xx) is
/// dead-lettered at once, and its dead letter carries the answer.
#[test]
fn a_push_the_sink_rejects_is_dead_lettered_with_its_answer() {
    let metrics = Arc::new(Metrics::new());
    let mut core = new_core(MergePolicy::Latest, &metrics);
    let flight = pushed(&mut core, vec![event(0, "k", 1)]);
    let answer = SinkAnswer {
        status: 422,
        excerpt: "unknown user".into(),
    };
    core.push_done(
        NOW,
        flight,
        Err(ProduceError::Rejected(answer.clone())),
        Duration::ZERO,
    );
    let Some(Action::DeadLetter { letter, delay }) = core.poll_action() else {
        panic!("dead-lettered, not retried");
    };
    assert_eq!(delay, Duration::ZERO);
    assert_eq!(letter.reason, PUSH_REFUSED);
    assert_eq!(letter.answer, Some(answer));
    assert_eq!(letter.detail, "refused with HTTP 422: unknown user");
    core.dead_letter_done(NOW, letter.id, Ok(()));
    core.end_turn(NOW);
    assert_eq!(commits(&mut core, NOW), vec![1]);
}

/// With one push slot (the HTTP sink's `max_in_flight`), a second key's
/// push waits unstarted: no markT1, no action. Events it gets meanwhile
/// merge into it, so when the slot frees it leaves with the newest value;
/// the first key's acknowledgement reaches the changelog meanwhile, and
/// the waiting key's events stay uncommitted until its push is answered.
#[test]
fn a_push_beyond_the_slots_waits_unstarted_and_leaves_with_its_keys_newest_value() {
    let metrics = Arc::new(Metrics::new());
    let mut core = configured_core(ModelStore::new(Default::default()), &metrics, |c| {
        c.max_pushes_in_flight = 1
    });
    let a = pushed(&mut core, vec![event(0, "a", 1), event(1, "b", 1)]);
    assert_eq!(a.push.key, "a");
    assert!(feed(&mut core, vec![event(2, "b", 2), event(3, "a", 2)], NOW).is_empty());
    assert_eq!(core.in_flight().0, 1, "one push on its way");
    core.push_done(NOW, a, Ok(()), Duration::ZERO);
    core.end_turn(NOW);
    let b = match actions(&mut core).as_slice() {
        [Action::Push { flight, .. }] => flight.clone(),
        other => panic!("the waiting push of b starts, a's next waits: {other:?}"),
    };
    assert_eq!(
        (&b.push.key[..], b.push.version, b.push.merged),
        (&b"b"[..], 2, 2)
    );
    assert_eq!(b.value.as_deref(), Some(&br#"{"v":2}"#[..]));
    // a's v1 is acknowledged in the changelog although its next push waits.
    core.tick(NOW, Timer::ChangelogFlush);
    let a_marker = core.marker(&"a".into()).unwrap().expect("a's marker");
    assert!(
        !a_marker.is_open(),
        "a's markT2 is held for the changelog: {a_marker:?}"
    );
    assert_eq!(
        commits(&mut core, NOW),
        vec![1],
        "b's and a's v2 hold the rest"
    );
    core.push_done(NOW, b, Ok(()), Duration::ZERO);
    core.end_turn(NOW);
    match actions(&mut core).as_slice() {
        [Action::Push { flight, .. }] => {
            assert_eq!((flight.push.version, flight.push.merged), (2, 1))
        }
        other => panic!("a's v2 leaves once b's slot frees: {other:?}"),
    }
}

/// A dead letter the topic refuses as too large is written again at once
/// with its value cut to what the topic takes, then without its value;
/// past that it is given up and releases its offset: nothing is retried
/// forever.
#[test]
fn a_dead_letter_too_large_for_its_topic_is_cut_and_never_retried_forever() {
    let metrics = Arc::new(Metrics::new());
    let mut core = new_core(MergePolicy::Latest, &metrics);
    let letter = match feed(
        &mut core,
        vec![InputRecord::copied(0, Some(b"k"), Some(b"not json"))],
        NOW,
    )
    .as_slice()
    {
        [Action::DeadLetter { letter, .. }] => letter.clone(),
        other => panic!("dead-lettered: {other:?}"),
    };
    assert_eq!(letter.cut_to, None, "whole at first");
    let too_large = || {
        Err(ProduceError::TooLarge(
            "Broker: Message size too large".into(),
        ))
    };
    let mut cuts = Vec::new();
    for _ in 0..2 {
        core.dead_letter_done(NOW, letter.id, too_large());
        match actions(&mut core).as_slice() {
            [Action::DeadLetter { letter, delay }] if delay.is_zero() => cuts.push(letter.cut_to),
            other => panic!("written again at once, cut: {other:?}"),
        }
    }
    assert_eq!(cuts, vec![Some(1 << 20), Some(0)]);
    core.dead_letter_done(NOW, letter.id, too_large());
    assert!(actions(&mut core).is_empty(), "given up");
    assert!(core.wants_records());
    assert_eq!(commits(&mut core, NOW), vec![1], "its offset is released");
}

/// A record read again at an offset the task already passed (an offset
/// reset after log truncation) is dead-lettered as `redelivered` and
/// counted, and no commit goes out until that dead letter landed. Before,
/// it was only logged: neither processed nor dead-lettered.
#[test]
fn a_record_read_again_below_the_position_is_dead_lettered_and_holds_commits() {
    let metrics = Arc::new(Metrics::new());
    let mut core = new_core(MergePolicy::Latest, &metrics);
    let flight = pushed(&mut core, vec![event(5, "k", 1)]);
    core.push_done(NOW, flight, Ok(()), Duration::ZERO);
    core.end_turn(NOW);
    let letter = match feed(&mut core, vec![event(3, "j", 1)], NOW).as_slice() {
        [Action::DeadLetter { letter, .. }] => letter.clone(),
        other => panic!("dead-lettered: {other:?}"),
    };
    assert_eq!(letter.reason, REDELIVERED);
    assert_eq!(letter.record.offset, 3);
    assert!(commits(&mut core, NOW).is_empty(), "held while in flight");
    core.dead_letter_done(NOW, letter.id, Ok(()));
    assert_eq!(commits(&mut core, NOW), vec![6]);
    let text = metrics.render();
    assert!(
        text.contains(r#"keyflight_dead_letters_total{partition="0",reason="redelivered"} 1"#),
        "counted"
    );
}

/// A marker the changelog refuses as too large (a merge-patch document
/// grown past the topic's limit) is written again without its value, so
/// the partition commits again; the key keeps its version.
#[test]
fn a_marker_too_large_for_the_changelog_is_written_again_without_its_value() {
    let metrics = Arc::new(Metrics::new());
    let (mut core, write) = marker_written(MergePolicy::JsonMergePatch, &metrics);
    assert!(matches!(
        write,
        Action::WriteChangelog { value: Some(_), .. }
    ));
    core.changelog_done(
        NOW,
        Err(ProduceError::TooLarge(
            "Broker: Message size too large".into(),
        )),
    );
    core.tick(NOW, Timer::ChangelogFlush);
    let rewritten = match actions(&mut core).as_slice() {
        [Action::WriteChangelog {
            value: Some(bytes), ..
        }] => keyflight::state::MarkerCodec::new().decode(bytes).unwrap(),
        other => panic!("written again: {other:?}"),
    };
    assert_eq!((rewritten.version, &rewritten.value), (1, &None));
    assert!(
        rewritten.value_cut && !rewritten.is_deleted(),
        "marked as cut, not taken for a delete's marker: {rewritten:?}"
    );
    core.changelog_done(NOW, Ok(0));
    assert_eq!(commits(&mut core, NOW), vec![1]);
}

/// Acknowledges every push and changelog write of one turn's actions,
/// until none is left: the pushes' versions and values, in order.
fn settle(core: &mut TaskCore<ModelStore>, now: u64) -> Vec<(u64, Option<String>)> {
    let mut pushed = Vec::new();
    let mut offset = 1000;
    loop {
        let turn = actions(core);
        if turn.is_empty() {
            return pushed;
        }
        for action in turn {
            match action {
                Action::Push { flight, .. } => {
                    let value = flight
                        .value
                        .as_ref()
                        .map(|v| String::from_utf8_lossy(v).into_owned());
                    pushed.push((flight.push.version, value));
                    core.push_done(now, flight, Ok(()), Duration::ZERO);
                }
                Action::WriteChangelog { .. } => {
                    core.changelog_done(now, Ok(offset));
                    offset += 1;
                }
                _ => {}
            }
        }
        core.end_turn(now);
        core.tick(now, Timer::ChangelogFlush);
    }
}

fn versioned(offset: i64, key: &str, version: u64) -> InputRecord {
    let value = format!(r#"{{"v":{version}}}"#);
    InputRecord::copied(offset, Some(key.as_bytes()), Some(value.as_bytes()))
}

fn delete(offset: i64, key: &str, header: Option<&str>) -> InputRecord {
    InputRecord::copied(offset, Some(key.as_bytes()), None)
        .with_delete_version(header.map(str::as_bytes))
}

/// The issue's case with per-key counters: versions 1–5, a delete without
/// a version, then the key re-created with 6 and 7 (below the delete's
/// offset). The delete comes after version 5 and keeps it, so 6 and 7 are
/// pushed and a straggler 3 is stale. Before, the delete was versioned by
/// its offset (20) and every later event of the key was dropped.
#[test]
fn a_delete_without_a_version_lets_the_key_be_created_again() {
    let metrics = Arc::new(Metrics::new());
    let mut core = new_core(MergePolicy::Latest, &metrics);
    let records: Vec<InputRecord> = (1..=5).map(|v| versioned(10 + v as i64, "k", v)).collect();
    core.take_batch(records);
    core.end_turn(NOW);
    settle(&mut core, NOW);
    core.take_batch(vec![delete(20, "k", None)]);
    core.end_turn(NOW);
    assert_eq!(
        settle(&mut core, NOW),
        vec![(5, None)],
        "the delete keeps v5"
    );
    core.take_batch(vec![versioned(21, "k", 3), versioned(22, "k", 6)]);
    core.end_turn(NOW);
    core.take_batch(vec![versioned(23, "k", 7)]);
    core.end_turn(NOW);
    let pushed = settle(&mut core, NOW);
    assert_eq!(
        pushed.last(),
        Some(&(7, Some(r#"{"v":7}"#.to_string()))),
        "{pushed:?}"
    );
    assert!(
        pushed.iter().all(|(v, _)| *v >= 6),
        "the straggler is stale: {pushed:?}"
    );
}

/// A delete may carry its version in a header: an older one is stale, a
/// newer one is pushed with its version, and a header that is not a
/// number is dead-lettered as `invalid-version`.
#[test]
fn a_delete_with_a_version_header_is_ordered_by_it() {
    let metrics = Arc::new(Metrics::new());
    let mut core = new_core(MergePolicy::Latest, &metrics);
    core.take_batch(vec![versioned(0, "k", 5)]);
    core.end_turn(NOW);
    settle(&mut core, NOW);
    core.take_batch(vec![delete(1, "k", Some("4"))]);
    core.end_turn(NOW);
    assert!(
        settle(&mut core, NOW).is_empty(),
        "the older delete is stale"
    );
    core.take_batch(vec![delete(2, "k", Some("9"))]);
    core.end_turn(NOW);
    assert_eq!(settle(&mut core, NOW), vec![(9, None)]);
    let letters = feed(&mut core, vec![delete(3, "k", Some("soon"))], NOW);
    match letters.as_slice() {
        [Action::DeadLetter { letter, .. }] => assert_eq!(letter.reason, "invalid-version"),
        other => panic!("dead-lettered: {other:?}"),
    }
}

/// An acknowledged delete's marker stays (its version keeps a straggler
/// stale after a restart or a move) until `deletes.retention`; then the
/// sweep, with the compensation scan, removes the key's state: a
/// changelog tombstone, and the store's marker once it is acknowledged.
#[test]
fn a_deletes_marker_is_kept_until_the_retention_then_swept() {
    let metrics = Arc::new(Metrics::new());
    let store = ModelStore::new(Default::default());
    let mut core = configured_core(store, &metrics, |c| {
        c.delete_retention = Duration::from_secs(60)
    });
    core.take_batch(vec![versioned(0, "k", 5), delete(1, "k", None)]);
    core.end_turn(NOW);
    settle(&mut core, NOW);
    core.tick(NOW, Timer::ChangelogFlush);
    settle(&mut core, NOW);
    let kept = core
        .marker(&"k".into())
        .unwrap()
        .expect("the delete's marker");
    assert!(kept.is_deleted() && kept.version == 5, "{kept:?}");

    core.tick(NOW + 59 * 1_000 * MS, Timer::Compensation);
    assert!(actions(&mut core).is_empty(), "kept within the retention");
    core.tick(NOW + 61 * 1_000 * MS, Timer::Compensation);
    core.tick(NOW + 61 * 1_000 * MS, Timer::ChangelogFlush);
    match actions(&mut core).as_slice() {
        [Action::WriteChangelog {
            key, value: None, ..
        }] => assert_eq!(&key[..], b"k"),
        other => panic!("a changelog tombstone: {other:?}"),
    }
    core.changelog_done(NOW, Ok(2000));
    assert_eq!(
        core.marker(&"k".into()).unwrap(),
        None,
        "gone from the store"
    );
}

/// After a restart, a delete without a version that is replayed at or
/// below the offset its key's marker names is already reflected there:
/// stale, not pushed (it cannot be ordered by version). A later one is.
#[test]
fn a_replayed_delete_below_its_keys_marker_is_stale() {
    let metrics = Arc::new(Metrics::new());
    let marker = keyflight::state::Marker::started(0, 100, 29, Some(r#"{"v":29}"#.into()))
        .at_offset(Some(29))
        .acknowledged(100);
    let store = ModelStore::new([("k".into(), marker)].into_iter().collect());
    let mut core = configured_core(store, &metrics, |_| {});
    core.take_batch(vec![delete(15, "k", None), versioned(16, "k", 16)]);
    core.end_turn(NOW);
    assert!(settle(&mut core, NOW).is_empty(), "replayed: both stale");
    core.take_batch(vec![delete(30, "k", None)]);
    core.end_turn(NOW);
    assert_eq!(
        settle(&mut core, NOW),
        vec![(29, None)],
        "a new delete is pushed"
    );
}

/// A lost partition (a session that expired: another member may own it
/// already) is dropped at once: the core answers with a close that
/// commits nothing, and writes no marker, no checkpoint and no push
/// afterwards, whatever completes late. A graceful close of the same state
/// would flush the held marker, checkpoint and commit.
#[test]
fn a_lost_partition_is_dropped_at_once_without_markers_commit_or_checkpoint() {
    let metrics = Arc::new(Metrics::new());
    let mut core = new_core(MergePolicy::Latest, &metrics);
    let flight = pushed(&mut core, vec![event(0, "k", 1)]);
    assert!(feed(&mut core, vec![event(1, "k", 2)], NOW).is_empty());

    core.lose();
    assert!(
        matches!(actions(&mut core).as_slice(), [Action::Closed(None)]),
        "closed at once, committing nothing"
    );
    assert!(core.is_closed());
    core.push_done(NOW, flight, Ok(()), Duration::ZERO);
    core.end_turn(NOW);
    core.changelog_done(NOW, Ok(0));
    for timer in [Timer::Commit, Timer::ChangelogFlush, Timer::Compensation] {
        core.tick(NOW, timer);
    }
    let late = actions(&mut core);
    assert!(late.is_empty(), "nothing after the loss: {late:?}");
}

/// A dead letter the dead-letter topic refuses for good (no authorisation,
/// an invalid record) is given up at once, counted and logged, and what it
/// held goes: a dead letter that never lands would pause its partition for
/// good. Before, it was retried forever.
#[test]
fn a_dead_letter_refused_for_good_is_given_up_and_counted() {
    let metrics = Arc::new(Metrics::new());
    let mut core = new_core(MergePolicy::Latest, &metrics);
    let letter = match feed(
        &mut core,
        vec![InputRecord::copied(0, None, Some(br#"{"v":1}"#))],
        NOW,
    )
    .as_slice()
    {
        [Action::DeadLetter { letter, .. }] => letter.clone(),
        other => panic!("a keyless record is dead-lettered: {other:?}"),
    };
    core.dead_letter_done(
        NOW,
        letter.id,
        Err(ProduceError::Refused(
            "Broker: Topic authorization failed".into(),
        )),
    );
    assert!(actions(&mut core).is_empty(), "not written again");
    assert!(core.wants_records(), "the partition goes on");
    assert_eq!(commits(&mut core, NOW), vec![1], "its offset is released");
    assert!(metrics
        .render()
        .contains(r#"keyflight_dead_letters_abandoned_total{partition="0"} 1"#));
}

/// A marker the changelog refuses for good stops the task with a clear
/// reason (the process exits and says why) rather than leave the partition
/// processing without ever committing again, as before.
#[test]
fn a_marker_the_changelog_refuses_for_good_fails_the_task() {
    let metrics = Arc::new(Metrics::new());
    let (mut core, _) = marker_written(MergePolicy::Latest, &metrics);
    core.changelog_done(
        NOW,
        Err(ProduceError::Refused("Broker: Policy violation".into())),
    );
    match actions(&mut core).as_slice() {
        [Action::Fail(reason)] => assert!(reason.contains("Policy violation"), "{reason}"),
        other => panic!("the task fails: {other:?}"),
    }
}

/// An open marker whose value the changelog could not take (cut) is not
/// re-pushed by compensation: it has no value, and pushing it would send a
/// delete nobody asked for. Before marker schema v3, such a marker could
/// not be told from a delete's.
#[test]
fn an_open_marker_without_its_value_is_not_compensated_as_a_delete() {
    let metrics = Arc::new(Metrics::new());
    let cut = keyflight::state::Marker::started(0, NOW, 3, Some("{}".into())).cut();
    assert!(cut.is_open() && !cut.is_deleted());
    let store = ModelStore::new([("k".into(), cut)].into_iter().collect());
    let mut core = configured_core(store, &metrics, |_| {});
    let scanned = core.tick(NOW + 3_600 * 1_000 * MS, Timer::Compensation);
    assert_eq!(scanned.map(|s| s.repushed), Some(0));
    assert!(actions(&mut core).is_empty(), "nothing pushed");
}

/// A record without a version field (its offset orders it) and value `value`.
fn unversioned(offset: i64, key: &str, value: &str) -> InputRecord {
    InputRecord::copied(offset, Some(key.as_bytes()), Some(value.as_bytes()))
}

/// `singleflight.skip_unchanged`: a re-send of a key's acknowledged value is
/// not pushed, yet its offset is covered and the skip counted; a changed
/// value is pushed. After a restart the key's closed marker still says what
/// was pushed last, so a re-send is skipped there too, while a key whose
/// marker is open (its push may not have landed) is pushed again.
#[test]
fn skip_unchanged_drops_re_sends_of_the_acknowledged_value_also_after_a_restart() {
    use keyflight::state::MarkerStore;
    let metrics = Arc::new(Metrics::new());
    let skipping = |c: &mut keyflight::processor::task::core::CoreConfig| c.table.digests = true;
    let mut core = configured_core(ModelStore::new(Default::default()), &metrics, skipping);
    for (offset, key) in [(0, "k"), (1, "open")] {
        let flight = match feed(&mut core, vec![unversioned(offset, key, r#"{"x":1}"#)], NOW).pop()
        {
            Some(Action::Push { flight, .. }) => flight,
            other => panic!("the first value is pushed: {other:?}"),
        };
        if key == "k" {
            core.push_done(NOW, flight, Ok(()), Duration::ZERO);
        }
    }
    let same = feed(&mut core, vec![unversioned(2, "k", r#"{"x":1}"#)], NOW + MS);
    assert!(
        !same.iter().any(|a| matches!(a, Action::Push { .. })),
        "the re-send is skipped: {same:?}"
    );
    let changed = feed(
        &mut core,
        vec![unversioned(3, "k", r#"{"x":2}"#)],
        NOW + 2 * MS,
    );
    let flight = match changed.as_slice() {
        [Action::Push { flight, .. }] => flight.clone(),
        other => panic!("a changed value is pushed: {other:?}"),
    };
    core.push_done(NOW + 2 * MS, flight, Ok(()), Duration::ZERO);
    core.end_turn(NOW + 2 * MS);
    assert_eq!(
        commits(&mut core, NOW + 3 * MS),
        vec![1],
        "the skipped offset 2 is covered; `open`'s push (offset 1) is not"
    );
    assert!(metrics
        .render()
        .contains(r#"keyflight_pushes_skipped_total{partition="0"} 1"#));

    // A restart over the store the changelog's writes reached.
    let markers = ["k", "open"]
        .iter()
        .map(|key| {
            let key = bytes::Bytes::from(key.to_string());
            let marker = core.store().get(&key).unwrap().expect("a marker");
            (key, marker)
        })
        .collect();
    let mut restarted = configured_core(ModelStore::new(markers), &metrics, skipping);
    let turn = feed(
        &mut restarted,
        vec![
            unversioned(4, "k", r#"{"x":2}"#),
            unversioned(5, "open", r#"{"x":1}"#),
        ],
        NOW + 4 * MS,
    );
    let pushed: Vec<&[u8]> = turn
        .iter()
        .filter_map(|a| match a {
            Action::Push { flight, .. } => Some(&flight.push.key[..]),
            _ => None,
        })
        .collect();
    assert_eq!(
        pushed,
        vec![&b"open"[..]],
        "k's re-send is skipped, `open` is pushed: {turn:?}"
    );
}

/// `state.ttl`: the sweep, with the compensation scan, removes the marker
/// of an idle key whose last push was acknowledged longer than the TTL ago
/// (a changelog tombstone, then out of the store), and keeps a key
/// acknowledged within the TTL, a key whose push is in flight, and an open
/// marker (compensation's).
#[test]
fn an_idle_keys_marker_expires_after_the_ttl_and_busy_keys_stay() {
    use keyflight::state::Marker;
    let metrics = Arc::new(Metrics::new());
    let closed = |at: u64| Marker::started(0, at, 1, Some(r#"{"v":1}"#.into())).acknowledged(at);
    let second = 1_000 * MS;
    let store = ModelStore::new(
        [
            ("old".into(), closed(NOW)),
            ("recent".into(), closed(NOW + 50 * second)),
            ("busy".into(), closed(NOW)),
            (
                "open".into(),
                Marker::started(0, NOW, 1, Some(r#"{"v":1}"#.into())),
            ),
        ]
        .into_iter()
        .collect(),
    );
    let mut core = configured_core(store, &metrics, |c| c.state_ttl = Duration::from_secs(30));
    let busy = feed(&mut core, vec![event(0, "busy", 2)], NOW + 60 * second);
    assert!(matches!(busy.as_slice(), [Action::Push { .. }]), "{busy:?}");
    core.tick(NOW + 61 * second, Timer::Compensation);
    core.tick(NOW + 61 * second, Timer::ChangelogFlush);
    let tombstones: Vec<Vec<u8>> = actions(&mut core)
        .into_iter()
        .filter_map(|a| match a {
            Action::WriteChangelog {
                key, value: None, ..
            } => Some(key.to_vec()),
            _ => None,
        })
        .collect();
    assert_eq!(tombstones, vec![b"old".to_vec()]);
    assert!(metrics
        .render()
        .contains(r#"keyflight_markers_expired_total{partition="0"} 1"#));
}

// ---------------------------------------------------------------------------
// Claims: other writers in the task's changelog partition.

/// A core that claimed its partition at changelog offset 9 and pushed `k`,
/// whose marker went to the changelog and landed at `landed`: the actions
/// that followed the acknowledgement.
fn claimed_and_written(core: &mut TaskCore<ModelStore>, landed: i64) -> Vec<Action> {
    core.claimed(9);
    written_at(core, event(0, "k", 1), landed)
}

/// A record of another writer at `offset`: a claim, or a marker of `owner`.
fn other(offset: i64, key: &str, claim: bool, owner: Option<i64>) -> OtherRecord {
    OtherRecord {
        offset,
        key: key.to_string().into(),
        claim,
        owner,
    }
}

/// Pushes `record`'s key, flushes its marker to the changelog and lands it
/// at `landed`: the actions that followed the acknowledgement.
fn written_at(core: &mut TaskCore<ModelStore>, record: InputRecord, landed: i64) -> Vec<Action> {
    let flight = pushed(core, vec![record]);
    core.push_done(NOW, flight, Ok(()), Duration::ZERO);
    core.end_turn(NOW);
    core.tick(NOW, Timer::ChangelogFlush);
    assert!(matches!(
        actions(core).as_slice(),
        [Action::WriteChangelog { .. }]
    ));
    core.changelog_done(NOW, Ok(landed));
    actions(core)
}

/// The task's own writes land one after another from its claim on; a
/// write that lands further on shows another writer's records in between,
/// which the task reads. A newer claim among them means another instance
/// took the partition over without this one hearing of it: the task drops
/// the partition (no push, marker, commit or checkpoint follows) and fails,
/// so the process restarts rather than act on a partition it lost.
#[test]
fn a_newer_claim_between_the_tasks_writes_drops_the_partition_and_fails_the_task() {
    let metrics = Arc::new(Metrics::new());
    let mut core = new_core(MergePolicy::Latest, &metrics);
    let after = claimed_and_written(&mut core, 10);
    assert!(
        !after
            .iter()
            .any(|a| matches!(a, Action::ReadChangelog { .. })),
        "its own write right after its claim: nothing to read ({after:?})"
    );
    let read = written_at(&mut core, event(1, "k", 2), 13);
    assert!(
        matches!(
            read.as_slice(),
            [Action::ReadChangelog { from: 11, to: 13 }]
        ),
        "offsets 11 and 12 are another writer's: {read:?}"
    );

    core.changelog_read(vec![
        other(11, "j", false, Some(3)),
        other(12, "keyflight-claim/1-2", true, None),
    ]);
    match actions(&mut core).as_slice() {
        [Action::Closed(None), Action::Fail(reason)] => assert!(
            reason.contains("another instance claimed it (changelog offset 12)"),
            "{reason}"
        ),
        other => panic!("dropped as lost, then failed: {other:?}"),
    }
    assert!(core.is_closed());
    for timer in [Timer::Commit, Timer::ChangelogFlush, Timer::Compensation] {
        core.tick(NOW, timer);
    }
    assert!(actions(&mut core).is_empty(), "nothing after");
}

/// Records of an earlier owner between the task's writes (a frozen or lost
/// instance's late writes, which do not count): each key's marker is
/// written again, so that the late record is not the key's last once the
/// changelog compacts; a key without a marker gets a tombstone. Until they
/// are read, the task writes no checkpoint.
#[test]
fn an_earlier_owners_late_writes_are_written_over_and_hold_checkpoints_until_read() {
    let metrics = Arc::new(Metrics::new());
    let mut core = new_core(MergePolicy::Latest, &metrics);
    let read = claimed_and_written(&mut core, 12);
    assert!(
        matches!(
            read.as_slice(),
            [Action::ReadChangelog { from: 10, to: 12 }]
        ),
        "{read:?}"
    );
    core.changelog_read(vec![
        other(10, "k", false, Some(4)),
        other(11, "j", false, Some(4)),
    ]);
    core.tick(NOW, Timer::ChangelogFlush);
    let mut rewritten: Vec<(String, Option<u64>)> = actions(&mut core)
        .into_iter()
        .map(|action| match action {
            Action::WriteChangelog { key, value, .. } => (
                String::from_utf8_lossy(&key).into_owned(),
                value.map(|v| {
                    keyflight::state::MarkerCodec::new()
                        .decode(&v)
                        .unwrap()
                        .version
                }),
            ),
            other => panic!("only rewrites: {other:?}"),
        })
        .collect();
    rewritten.sort();
    assert_eq!(
        rewritten,
        [("j".to_string(), None), ("k".to_string(), Some(1))],
        "k's own marker again, a tombstone for j"
    );

    // A read that has not come back holds the checkpoint at the close.
    let mut core = new_core(MergePolicy::Latest, &metrics);
    let read = claimed_and_written(&mut core, 12);
    assert!(matches!(read.as_slice(), [Action::ReadChangelog { .. }]));
    core.close();
    let closing = actions(&mut core);
    assert!(
        matches!(closing.as_slice(), [Action::Closed(Some(1))]),
        "committed, not checkpointed: {closing:?}"
    );
}
