//! Restoring a partition's store from its slice of the changelog, before
//! any event of the partition is processed. The changelog is read with the
//! one topic reader ([`crate::kafka::reader`]).
//!
//! A record is read with every released marker schema
//! ([`crate::state::marker`]). One that none reads (an unknown
//! fingerprint, a truncated datum, garbage) is logged with its offset,
//! counted (`keyflight_changelog_records_unreadable_total`) and skipped, and
//! its key's state is removed rather than guessed: an older record of the
//! key does not stand in for it, and the key's next event is pushed as new.
//! The restore goes on, so such a record never stops a partition (nor, on
//! every restart, the process).
//!
//! Claims decide which marker records count ([`crate::state::claim`]): a
//! record that an owner wrote after another owner claimed the partition is
//! skipped, and its key reported as *shadowed* for the new owner to write
//! again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::Message;

use crate::config::Settings;
use crate::internal_events::ChangelogRecordUnreadable;
use crate::kafka::reader::{self, Range, ReadError, Stopped};
use crate::metrics::PartitionMetrics;
use crate::processor::task::core::OtherRecord;
use crate::state::claim::{self, Claims};
use crate::state::{MarkerCodec, Opened, StateError, Store};

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("changelog {topic}[{partition}]: {source}")]
    Kafka {
        topic: String,
        partition: i32,
        source: rdkafka::error::KafkaError,
    },
    #[error("changelog partition {partition}: {source}")]
    Read { partition: i32, source: ReadError },
    #[error(transparent)]
    State(#[from] StateError),
    /// The partition was revoked or lost while it restored.
    #[error("changelog partition {partition}: the restore was cancelled (the partition left)")]
    Cancelled { partition: i32 },
}

/// What a restore read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Restored {
    /// Records read, the unreadable ones among them.
    pub records: u64,
    /// Records no released marker schema reads: skipped, their keys'
    /// state removed.
    pub unreadable: u64,
    /// Marker records written by an owner after another claimed the
    /// partition: skipped.
    pub superseded: u64,
    /// The keys whose last record was superseded, for the new owner to
    /// write again (see [`crate::state::claim`]).
    pub shadowed: Vec<bytes::Bytes>,
    /// The newest claim read (what a checkpoint records).
    pub claim: Option<i64>,
    /// The changelog offset the store is now complete up to (exclusive).
    pub next_offset: i64,
}

/// How long a watermark query may take.
pub const WATERMARKS_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads the changelog partition from the checkpoint (or its start) to its
/// current end and applies every record to the store, reporting
/// `(records read, records to read at most)` as it goes. Blocking.
/// Unreadable records are skipped and counted in `metrics` (module docs).
///
/// `watermarks` are the partition's (low, high) offsets if the caller has
/// them (`keyflight run` asks its producer, whose connections are open);
/// otherwise a reader asks. The reader, a consumer with connections of its
/// own, is created only when there is something to read: a store that is
/// complete (or a changelog that is empty) costs no new client.
#[allow(clippy::too_many_arguments)]
pub fn restore(
    settings: &Settings,
    topic: &str,
    partition: i32,
    store: &Store,
    opened: Opened,
    watermarks: Option<(i64, i64)>,
    metrics: &PartitionMetrics,
    cancelled: &AtomicBool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Restored, RestoreError> {
    let kafka = |source| RestoreError::Kafka {
        topic: topic.to_string(),
        partition,
        source,
    };
    // Never the group's own offsets: the changelog is read by assignment.
    let reader = || reader::consumer(settings, "restore").map_err(kafka);
    let (consumer, (low, high)) = match watermarks {
        Some(known) => (None, known),
        None => {
            let consumer = reader()?;
            let known = consumer
                .fetch_watermarks(topic, partition, WATERMARKS_TIMEOUT)
                .map_err(kafka)?;
            (Some(consumer), known)
        }
    };
    // The fold of which records count goes on from the checkpoint's claim
    // when the restore goes on from the checkpoint.
    let (start, from_claim) = match opened {
        // A checkpoint outside the changelog's offsets belongs to another
        // log (the topic was recreated or truncated) or to records that
        // retention removed: the store cannot be trusted, so it starts over
        // and reads the whole changelog, as after an unclean stop.
        Opened::FromCheckpoint(next) if next < low || next > high => {
            tracing::warn!(
                topic,
                partition,
                checkpoint = next,
                low,
                high,
                "the store's checkpoint is outside the changelog's offsets: restoring in full"
            );
            store.clear()?;
            (low, None)
        }
        Opened::FromCheckpoint(next) => (next, store.checkpoint_claim()),
        Opened::Empty => (low, None),
    };
    let mut claims = Claims::from(from_claim);
    if start >= high {
        return Ok(Restored {
            claim: claims.current(),
            next_offset: high.max(start),
            ..Restored::default()
        });
    }
    let consumer = match consumer {
        Some(consumer) => consumer,
        None => reader()?,
    };
    let range = Range {
        partition,
        start,
        end: high,
    };
    let total = (high - start) as u64;
    let codec = MarkerCodec::new();
    let (mut records, mut unreadable, mut superseded) = (0, 0, 0);
    reader::try_read(&consumer, topic, &[range], |message| {
        // A partition that left stops restoring at its next record.
        if cancelled.load(Ordering::Relaxed) {
            return Err(RestoreError::Cancelled { partition });
        }
        records += 1;
        progress(records, total);
        let key = message.key().unwrap_or_default();
        let (claimed, owner) = claim_headers(message);
        if claimed {
            claims.claim(message.offset());
            return Ok(());
        }
        if !claims.counts(key, owner) {
            superseded += 1;
            return Ok(());
        }
        match message.payload().map(|bytes| codec.decode(bytes)) {
            None => store.delete(key)?, // a tombstone
            Some(Ok(marker)) => store.put(key, &marker)?,
            Some(Err(error)) => {
                metrics.emit(ChangelogRecordUnreadable {
                    topic,
                    offset: message.offset(),
                    key,
                    error: &error,
                });
                unreadable += 1;
                store.delete(key)?;
            }
        }
        Ok(())
    })
    .map_err(|stopped| match stopped {
        Stopped::Read(source) => RestoreError::Read { partition, source },
        Stopped::By(e) => e,
    })?;
    if claims.store_suspect() {
        tracing::warn!(
            topic,
            partition,
            "the instance that checkpointed this store went on writing it after another had claimed the partition: restoring in full"
        );
        store.clear()?;
        return restore(
            settings,
            topic,
            partition,
            store,
            Opened::Empty,
            Some((low, high)),
            metrics,
            cancelled,
            progress,
        );
    }
    if superseded > 0 {
        tracing::warn!(
            topic,
            partition,
            superseded,
            "skipped changelog records that an owner wrote after another had claimed the partition (a frozen or lost instance's late writes)"
        );
    }
    Ok(Restored {
        records,
        unreadable,
        superseded,
        claim: claims.current(),
        shadowed: claims.into_shadowed(),
        next_offset: high,
    })
}

/// Reads the records of changelog partition `partition` from `from` to
/// `to` (exclusive) that a task found between its own writes: who wrote
/// them (see [`crate::processor::task::TaskCore::changelog_read`]).
/// Blocking.
pub fn read_others(
    settings: &Settings,
    topic: &str,
    partition: i32,
    from: i64,
    to: i64,
) -> Result<Vec<OtherRecord>, String> {
    let consumer = reader::consumer(settings, "changelog-check").map_err(|e| e.to_string())?;
    let range = Range {
        partition,
        start: from,
        end: to,
    };
    let mut records = Vec::new();
    reader::try_read(&consumer, topic, &[range], |message| {
        let (claim, owner) = claim_headers(message);
        records.push(OtherRecord {
            offset: message.offset(),
            key: bytes::Bytes::copy_from_slice(message.key().unwrap_or_default()),
            claim,
            owner,
        });
        Ok::<_, std::convert::Infallible>(())
    })
    .map_err(|stopped| match stopped {
        Stopped::Read(e) => e.to_string(),
        Stopped::By(never) => match never {},
    })?;
    Ok(records)
}

/// Whether a changelog record is a claim, and the owner a marker record
/// names.
pub(crate) fn claim_headers(message: &impl Message) -> (bool, Option<i64>) {
    use rdkafka::message::Headers;
    let Some(headers) = message.headers() else {
        return (false, None);
    };
    let (mut claimed, mut owner) = (false, None);
    for header in headers.iter() {
        match header.key {
            claim::CLAIM_HEADER => claimed = true,
            claim::OWNER_HEADER => owner = header.value.and_then(claim::parse_owner),
            _ => {}
        }
    }
    (claimed, owner)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::metrics::Metrics;

    /// The keys the store holds, in order.
    fn keys_of(store: &Store) -> Vec<bytes::Bytes> {
        let markers = store.markers().unwrap();
        markers.into_iter().map(|(k, _)| k).collect()
    }

    /// Restores with known watermarks against a broker nothing listens on:
    /// a restore that reached for it would wait out the watermark timeout
    /// and fail, not return at once.
    fn restore_known(store: &Store, opened: Opened, watermarks: (i64, i64)) -> Restored {
        let unreachable = Settings {
            brokers: "127.0.0.1:1".into(),
            ..Settings::default()
        };
        restore(
            &unreachable,
            "t",
            0,
            store,
            opened,
            Some(watermarks),
            &Arc::new(Metrics::new()).partition(0),
            &AtomicBool::new(false),
            &mut |_, _| panic!("no records to read"),
        )
        .unwrap()
    }

    /// Signals every warning logged on the thread it is the default for.
    struct Warnings(std::sync::mpsc::Sender<()>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Warnings {
        fn on_event(
            &self,
            event: &tracing::Event<'_>,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            if *event.metadata().level() == tracing::Level::WARN {
                let _ = self.0.send(());
            }
        }
    }

    /// A mock cluster with an empty one-partition topic `changelog`, and
    /// settings pointing at it.
    fn mock_changelog() -> (
        rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
        Settings,
    ) {
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        cluster.create_topic("changelog", 1, 1).unwrap();
        let settings = Settings {
            brokers: cluster.bootstrap_servers(),
            ..Settings::default()
        };
        (cluster, settings)
    }

    #[test]
    fn a_restore_waits_for_a_broker_that_went_down_and_finishes_when_it_is_back() {
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
        use tracing_subscriber::layer::SubscriberExt;

        let (cluster, settings) = mock_changelog();
        // Three tombstones: each is a record to restore (as a delete).
        let producer: BaseProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &settings.brokers)
            .create()
            .unwrap();
        for key in ["a", "b", "c"] {
            producer
                .send(BaseRecord::<str, [u8]>::to("changelog").key(key))
                .unwrap();
        }
        producer.flush(Duration::from_secs(10)).unwrap();
        cluster.broker_down(1).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let (store, opened) = Store::open(dir.path()).unwrap();
        let (warned, warnings) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            let restoring = scope.spawn(|| {
                let subscriber = tracing_subscriber::registry().with(Warnings(warned));
                let _default = tracing::subscriber::set_default(subscriber);
                restore(
                    &settings,
                    "changelog",
                    0,
                    &store,
                    opened,
                    Some((0, 3)),
                    &Arc::new(Metrics::new()).partition(0),
                    &AtomicBool::new(false),
                    &mut |_, _| {},
                )
            });
            // The lost broker is reported as a warning (a restore that gave
            // up on it would have returned an error instead).
            warnings
                .recv_timeout(Duration::from_secs(30))
                .expect("the restore reports the lost broker and goes on");
            cluster.broker_up(1).unwrap();
            assert_eq!(
                restoring.join().unwrap().unwrap(),
                Restored {
                    records: 3,
                    unreadable: 0,
                    next_offset: 3,
                    ..Restored::default()
                }
            );
        });
    }

    /// A checkpoint past the changelog's end (the topic was recreated, say)
    /// is not trusted: the store starts over and the whole changelog is
    /// read, so nothing the old store held outlives it.
    #[test]
    fn a_checkpoint_past_the_changelog_end_restores_in_full() {
        use crate::state::Marker;
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

        let (_cluster, settings) = mock_changelog(); // the broker lives to the end
        let marker = |version| Marker {
            t1: 7,
            t2: 7,
            version,
            value: None,
            offset: None,
            value_cut: false,
        };
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        // The old store: a key the new changelog does not have, and a
        // checkpoint at offset 12 of a log that is gone.
        store.put(b"z", &marker(9)).unwrap();
        store.checkpoint(12, None).unwrap();
        let producer: BaseProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &settings.brokers)
            .create()
            .unwrap();
        for (key, version) in [("a", 1), ("b", 2), ("c", 3)] {
            let value = store.encode(&marker(version));
            producer
                .send(BaseRecord::to("changelog").key(key).payload(&value))
                .unwrap();
        }
        producer.flush(Duration::from_secs(10)).unwrap();
        drop(store);

        let (store, opened) = Store::open(dir.path()).unwrap();
        assert_eq!(opened, Opened::FromCheckpoint(12));
        let restored = restore(
            &settings,
            "changelog",
            0,
            &store,
            opened,
            None,
            &Arc::new(Metrics::new()).partition(0),
            &AtomicBool::new(false),
            &mut |_, _| {},
        )
        .unwrap();
        assert_eq!(
            restored,
            Restored {
                records: 3,
                unreadable: 0,
                next_offset: 3,
                ..Restored::default()
            }
        );
        let keys = keys_of(&store);
        assert_eq!(keys, [&b"a"[..], b"b", b"c"], "z went with the old log");
        assert_eq!(store.open_count().unwrap(), 0);
    }

    /// Collects the `offset` of every warning logged on the thread it is
    /// the default for.
    struct WarnedOffsets(std::sync::Arc<std::sync::Mutex<Vec<i64>>>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for WarnedOffsets {
        fn on_event(
            &self,
            event: &tracing::Event<'_>,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            struct Offset(Option<i64>);
            impl tracing::field::Visit for Offset {
                fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
                    if field.name() == "offset" {
                        self.0 = Some(value);
                    }
                }
                fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
            }
            if *event.metadata().level() == tracing::Level::WARN {
                let mut offset = Offset(None);
                event.record(&mut offset);
                self.0.lock().unwrap().extend(offset.0);
            }
        }
    }

    /// A record no released marker schema reads is skipped, logged with its
    /// offset and counted, and its key's state is removed, also when an
    /// earlier good record of the key was restored: nothing is guessed, and
    /// the restore (so the process) goes on.
    #[test]
    fn unreadable_changelog_records_are_skipped_counted_and_leave_their_keys_without_state() {
        use crate::state::Marker;
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
        use tracing_subscriber::layer::SubscriberExt;

        let (_cluster, settings) = mock_changelog();
        let marker = |version| Marker {
            t1: 7,
            t2: 5, // open: a good marker the compensation scan would re-push
            version,
            value: Some(bytes::Bytes::from_static(b"{}")),
            offset: None,
            value_cut: false,
        };
        let codec = MarkerCodec::new();
        // A single-object record of a schema no version released.
        let mut unknown_schema = codec.encode(&marker(3));
        unknown_schema[2..10].copy_from_slice(b"unknown!");
        let truncated = codec.encode(&marker(4));
        let truncated = &truncated[..truncated.len() - 1];
        let records: [(&str, &[u8]); 4] = [
            ("a", &codec.encode(&marker(1))),
            ("b", &codec.encode(&marker(2))),
            ("c", &unknown_schema),
            ("b", truncated),
        ];
        let producer: BaseProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &settings.brokers)
            .create()
            .unwrap();
        for (key, value) in records {
            producer
                .send(BaseRecord::to("changelog").key(key).payload(value))
                .unwrap();
        }
        producer.flush(Duration::from_secs(10)).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let (store, opened) = Store::open(dir.path()).unwrap();
        let metrics = Arc::new(Metrics::new());
        let warned = Arc::new(std::sync::Mutex::new(Vec::new()));
        let subscriber = tracing_subscriber::registry().with(WarnedOffsets(warned.clone()));
        let restored = tracing::subscriber::with_default(subscriber, || {
            restore(
                &settings,
                "changelog",
                0,
                &store,
                opened,
                None,
                &metrics.partition(0),
                &AtomicBool::new(false),
                &mut |_, _| {},
            )
        })
        .expect("unreadable records do not stop the restore");
        assert_eq!(
            restored,
            Restored {
                records: 4,
                unreadable: 2,
                next_offset: 4,
                ..Restored::default()
            }
        );
        assert_eq!(*warned.lock().unwrap(), [2, 3], "logged with their offsets");
        assert!(metrics
            .render()
            .contains("keyflight_changelog_records_unreadable_total{partition=\"0\"} 2"));
        assert_eq!(store.get(b"a").unwrap(), Some(marker(1)));
        assert_eq!(store.get(b"b").unwrap(), None, "not b's older record");
        assert_eq!(store.get(b"c").unwrap(), None);
        let keys = keys_of(&store);
        assert_eq!(keys, [&b"a"[..]]);
        assert_eq!(store.open_count().unwrap(), 1, "only a's marker is open");
    }

    /// A changelog with two claims (offsets 0 and 2) and late records of
    /// the first owner after the second claim: they do not count, their
    /// keys are reported when they were the last word, and a store whose
    /// checkpointing owner wrote such records is restored in full.
    #[test]
    fn records_of_an_owner_written_after_a_newer_claim_do_not_count() {
        use crate::state::Marker;
        use rdkafka::message::{Header, OwnedHeaders};
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

        let (_cluster, settings) = mock_changelog();
        let marker = |version| Marker {
            t1: 7,
            t2: 7,
            version,
            value: Some(bytes::Bytes::from_static(b"{}")),
            offset: None,
            value_cut: false,
        };
        let codec = MarkerCodec::new();
        let producer: BaseProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &settings.brokers)
            .create()
            .unwrap();
        let claim = |key: &str| (key.to_string(), None, claim::CLAIM_HEADER, "claim".into());
        let by = |key: &str, version, owner: i64| {
            (
                key.to_string(),
                Some(codec.encode(&marker(version))),
                claim::OWNER_HEADER,
                claim::owner_header(owner),
            )
        };
        let records = [
            claim("keyflight-claim/a"), // 0
            by("k", 1, 0),
            claim("keyflight-claim/b"), // 2
            by("k", 2, 2),
            by("k", 9, 0), // late: k's last record
            by("j", 9, 0), // late, then j moves on
            by("j", 6, 2),
        ];
        for (key, value, header, header_value) in &records {
            let headers = OwnedHeaders::new().insert(Header {
                key: header,
                value: Some(header_value.as_str()),
            });
            let payload: &[u8] = value.as_deref().unwrap_or(b"{}");
            producer
                .send(
                    BaseRecord::to("changelog")
                        .key(key.as_str())
                        .payload(payload)
                        .headers(headers),
                )
                .unwrap();
        }
        producer.flush(Duration::from_secs(10)).unwrap();
        let restore_from = |store: &Store, opened| {
            restore(
                &settings,
                "changelog",
                0,
                store,
                opened,
                None,
                &Arc::new(Metrics::new()).partition(0),
                &AtomicBool::new(false),
                &mut |_, _| {},
            )
            .unwrap()
        };

        let dir = tempfile::tempdir().unwrap();
        let (store, opened) = Store::open(dir.path()).unwrap();
        let restored = restore_from(&store, opened);
        assert_eq!(
            (restored.superseded, restored.claim, restored.next_offset),
            (2, Some(2), 7)
        );
        assert_eq!(restored.shadowed, [bytes::Bytes::from_static(b"k")]);
        assert_eq!(store.get(b"k").unwrap(), Some(marker(2)));
        assert_eq!(store.get(b"j").unwrap(), Some(marker(6)));
        assert_eq!(keys_of(&store), [&b"j"[..], b"k"], "no claim in the store");

        // The first owner checkpointed at 2 and then wrote its late records
        // to its own store too: from that checkpoint, the store is suspect.
        store.clear().unwrap();
        store.put(b"k", &marker(9)).unwrap();
        store.put(b"z", &marker(9)).unwrap();
        store.checkpoint(2, Some(0)).unwrap();
        drop(store);
        let (store, opened) = Store::open(dir.path()).unwrap();
        assert_eq!(opened, Opened::FromCheckpoint(2));
        let restored = restore_from(&store, opened);
        assert_eq!(restored.records, 7, "read again in full");
        assert_eq!(store.get(b"k").unwrap(), Some(marker(2)));
        assert_eq!(keys_of(&store), [&b"j"[..], b"k"], "z went with the store");
    }

    #[test]
    fn a_store_complete_up_to_known_watermarks_is_restored_without_the_broker() {
        let dir = tempfile::tempdir().unwrap();
        let (store, opened) = Store::open(dir.path()).unwrap();
        // An empty store and an empty changelog partition (low = high).
        assert_eq!(
            restore_known(&store, opened, (7, 7)),
            Restored {
                records: 0,
                unreadable: 0,
                next_offset: 7,
                ..Restored::default()
            }
        );
        // A checkpoint at the end of the changelog: nothing left to read.
        store.checkpoint(12, None).unwrap();
        drop(store);
        let (store, opened) = Store::open(dir.path()).unwrap();
        assert_eq!(opened, Opened::FromCheckpoint(12));
        assert_eq!(restore_known(&store, opened, (3, 12)).next_offset, 12);
    }
}
