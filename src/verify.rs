//! The oracle behind `keyflight verify`: from the input topic, the pushed
//! topic and the dead-letter topic, decide whether every key's last push
//! carries its latest event and whether every rejected record was
//! dead-lettered. Pure: the caller feeds records in, the [`Verifier`] keeps
//! no I/O handle, so the logic is tested without a broker.
//!
//! The expected final value of a key folds its events exactly as the engine
//! does: in offset order, an event not newer (by version, else by offset)
//! than the newest accepted one is stale, every other event folds under the
//! merge policy. A record [`Codec::decode_record`] refuses must be in the
//! dead-letter topic, named by its source partition and offset headers.

use std::collections::{BTreeSet, HashMap};

use bytes::Bytes;
use serde::Serialize;

use crate::codec::{Codec, DecodeError};
use crate::engine::{Event, MergePolicy, Payload};

/// What the input says a key must end as.
#[derive(Debug, Default)]
struct Expected {
    /// Versions of the accepted (non-stale) events, increasing.
    versions: Vec<u64>,
    current: Option<Payload>,
}

/// The newest push seen for a key.
#[derive(Debug)]
struct LastPush {
    partition: i32,
    offset: i64,
    timestamp: i64,
    version: Option<u64>,
    value: Option<Bytes>,
}

/// A key that does not verify, for the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyProblem {
    /// The key, as UTF-8 where it is (lossy otherwise).
    pub key: String,
    /// Version of the key's latest event.
    pub expected_version: Option<u64>,
    /// Version of its last push (`keyflight-version` header), if pushed.
    pub pushed_version: Option<u64>,
    /// Accepted events newer than the last push: lost unless pushed later.
    pub events_behind: u64,
}

/// A record that should be in the dead-letter topic and is not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MissingDeadLetter {
    pub partition: i32,
    pub offset: i64,
    pub reason: &'static str,
}

/// The result of a verification.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    pub events: u64,
    pub pushes: u64,
    pub keys: u64,
    pub matched: u64,
    /// Keys with events and no push.
    pub missing: Vec<KeyProblem>,
    /// Keys whose last push is older than their latest event.
    pub stale: Vec<KeyProblem>,
    /// Keys whose last push has the latest version but another value.
    pub differing: Vec<KeyProblem>,
    /// Keys pushed without any event in the input.
    pub unexpected: Vec<String>,
    /// Accepted events newer than their key's last push, summed over keys.
    pub events_behind: u64,
    pub dead_letters_expected: u64,
    pub dead_letters_found: u64,
    pub dead_letters_missing: Vec<MissingDeadLetter>,
    /// Keys whose latest events went to the dead-letter topic in a push the
    /// broker refused (`push-refused`): they pass, as dead letters do.
    pub refused_pushes: u64,
    /// Keys whose last push is older than their latest event but carries
    /// the same value (`singleflight.skip_unchanged` skipped the newer push):
    /// they pass, counted in `matched` too.
    pub unchanged: u64,
}

impl Report {
    /// Every key matches and every rejected record is dead-lettered.
    pub fn passed(&self) -> bool {
        self.missing.is_empty()
            && self.stale.is_empty()
            && self.differing.is_empty()
            && self.unexpected.is_empty()
            && self.dead_letters_missing.is_empty()
    }

    /// The one-line summary `verify` always prints.
    pub fn summary(&self) -> String {
        format!(
            "verify: {} — {} keys checked, {} matched, {} missing, {} stale, {} differing, {} unexpected; \
             {} events ({} behind their last push), {} pushes; dead letters: {} expected, {} found, {} missing, {} keys' refused pushes{}",
            if self.passed() { "PASS" } else { "FAIL" },
            self.keys,
            self.matched,
            self.missing.len(),
            self.stale.len(),
            self.differing.len(),
            self.unexpected.len(),
            self.events,
            self.events_behind,
            self.pushes,
            self.dead_letters_expected,
            self.dead_letters_found,
            self.dead_letters_missing.len(),
            self.refused_pushes,
            if self.unchanged > 0 {
                format!(
                    "; {} keys end on an older push of the same value (skip_unchanged)",
                    self.unchanged
                )
            } else {
                String::new()
            },
        )
    }
}

/// Accumulates the three topics, in any interleaving of topics but in
/// offset order within each input partition.
pub struct Verifier {
    codec: Codec,
    policy: MergePolicy,
    input_topic: String,
    expected: HashMap<Bytes, Expected, ahash::RandomState>,
    pushes: HashMap<Bytes, LastPush, ahash::RandomState>,
    /// Rejected input records: (partition, offset) → reason.
    rejected: HashMap<(i32, i64), &'static str, ahash::RandomState>,
    dead_lettered: BTreeSet<(i32, i64)>,
    /// The newest version of each key's refused pushes (`push-refused`).
    refused: HashMap<Bytes, u64, ahash::RandomState>,
    events: u64,
    push_count: u64,
    /// Only part of the history is read (`verify --since`).
    partial: bool,
    /// `singleflight.skip_unchanged`: an older last push of the latest value passes.
    skip_unchanged: bool,
}

impl Verifier {
    pub fn new(codec: Codec, policy: MergePolicy, input_topic: impl Into<String>) -> Self {
        Self {
            codec,
            policy,
            input_topic: input_topic.into(),
            expected: HashMap::default(),
            pushes: HashMap::default(),
            rejected: HashMap::default(),
            dead_lettered: BTreeSet::new(),
            refused: HashMap::default(),
            events: 0,
            push_count: 0,
            partial: false,
            skip_unchanged: false,
        }
    }

    /// For a read of part of the history: keys pushed without events read
    /// are not unexpected, and merge-patch values (folds of a part of the
    /// patches) are not compared, only versions.
    pub fn partial(mut self) -> Self {
        self.partial = true;
        self
    }

    /// The pipeline skips pushes of unchanged values
    /// (`singleflight.skip_unchanged`): a key whose last push is older than
    /// its latest event passes when the values are equal.
    pub fn skip_unchanged(mut self) -> Self {
        self.skip_unchanged = true;
        self
    }

    /// One record of the input topic (`delete_version`: a tombstone's
    /// version header, as it came).
    pub fn event(
        &mut self,
        partition: i32,
        offset: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        delete_version: Option<&[u8]>,
    ) {
        let mut decoded = match self.codec.decode_record(key, value) {
            Ok(decoded) => decoded,
            Err(e) => return self.reject(partition, offset, &e),
        };
        if let Some(header) = delete_version.filter(|_| value.is_none()) {
            match crate::codec::delete_version(header) {
                Ok(version) => decoded.version = Some(version),
                Err(e) => return self.reject(partition, offset, &e),
            }
        }
        let event = Event {
            key: Bytes::copy_from_slice(key.unwrap_or_default()),
            offset,
            version: decoded.version,
            payload: decoded.payload,
        };
        let expected = self.expected.entry(event.key.clone()).or_default();
        // The engine's ordering, deletes without a version included.
        let (version, stale) = event.ordered_after(expected.versions.last().copied());
        if stale {
            self.events += 1;
            return; // stale: the engine drops it too
        }
        let mut folded = expected.current.clone();
        if self.policy.fold(&mut folded, event.payload).is_err() {
            // The pipeline dead-letters what its table cannot fold.
            self.rejected.insert((partition, offset), "unprocessable");
            return;
        }
        expected.current = folded;
        expected.versions.push(version);
        self.events += 1;
    }

    fn reject(&mut self, partition: i32, offset: i64, error: &DecodeError) {
        self.rejected.insert((partition, offset), error.reason());
    }

    /// One record of the pushed topic, with its `keyflight-version` header.
    pub fn push(
        &mut self,
        partition: i32,
        offset: i64,
        timestamp: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        version: Option<u64>,
    ) {
        self.push_count += 1;
        let push = LastPush {
            partition,
            offset,
            timestamp,
            version,
            value: value.map(Bytes::copy_from_slice),
        };
        let key = Bytes::copy_from_slice(key.unwrap_or_default());
        match self.pushes.get_mut(&key) {
            // One key lands in one partition, where offsets order its pushes;
            // across partitions (a repartitioned topic) the timestamp decides.
            Some(last)
                if (last.partition == partition && last.offset > offset)
                    || (last.partition != partition && last.timestamp > timestamp) => {}
            Some(last) => *last = push,
            None => {
                self.pushes.insert(key, push);
            }
        }
    }

    /// One record of the dead-letter topic, by its source headers.
    pub fn dead_letter(&mut self, source_topic: Option<&str>, partition: i32, offset: i64) {
        if source_topic.is_none_or(|t| t == self.input_topic) {
            self.dead_lettered.insert((partition, offset));
        }
    }

    /// One dead letter of a push the broker refused (`push-refused`): the
    /// key's events up to `version` are accounted for there.
    pub fn refused_push(&mut self, source_topic: Option<&str>, key: Option<&[u8]>, version: u64) {
        if source_topic.is_some_and(|t| t != self.input_topic) {
            return;
        }
        let key = Bytes::copy_from_slice(key.unwrap_or_default());
        let newest = self.refused.entry(key).or_default();
        *newest = (*newest).max(version);
    }

    /// Compares what the input expects with what was pushed.
    pub fn report(&self) -> Report {
        let mut report = Report {
            events: self.events,
            pushes: self.push_count,
            keys: self.expected.len() as u64,
            ..Report::default()
        };
        for (key, expected) in &self.expected {
            let expected_version = expected.versions.last().copied();
            let problem = |push: Option<&LastPush>| {
                let pushed_version = push.and_then(|p| p.version);
                let behind = match (push, pushed_version) {
                    (None, _) | (Some(_), None) => expected.versions.len(),
                    (Some(_), Some(v)) => {
                        expected.versions.len() - expected.versions.partition_point(|&e| e <= v)
                    }
                };
                KeyProblem {
                    key: String::from_utf8_lossy(key).into_owned(),
                    expected_version,
                    pushed_version,
                    events_behind: behind as u64,
                }
            };
            let refused = self.refused.get(key).copied();
            if refused.is_some() && refused >= expected_version {
                let pushed = self.pushes.get(key).and_then(|p| p.version);
                if pushed.is_none() || pushed < expected_version {
                    report.refused_pushes += 1;
                    continue;
                }
            }
            let Some(push) = self.pushes.get(key) else {
                let problem = problem(None);
                report.events_behind += problem.events_behind;
                report.missing.push(problem);
                continue;
            };
            let older = push.version.is_some_and(|v| Some(v) < expected_version);
            if older
                && self.skip_unchanged
                && self.values_comparable()
                && self.same_value(expected.current.as_ref(), push.value.as_ref())
            {
                report.unchanged += 1;
                report.matched += 1;
            } else if older {
                let problem = problem(Some(push));
                report.events_behind += problem.events_behind;
                report.stale.push(problem);
            } else if !self.same_value(expected.current.as_ref(), push.value.as_ref()) {
                report.differing.push(problem(Some(push)));
            } else {
                report.matched += 1;
            }
        }
        report.unexpected = self
            .pushes
            .keys()
            .filter(|key| !self.partial && !self.expected.contains_key(*key))
            .map(|key| String::from_utf8_lossy(key).into_owned())
            .collect();
        report.dead_letters_expected = self.rejected.len() as u64;
        report.dead_letters_found = self
            .rejected
            .keys()
            .filter(|at| self.dead_lettered.contains(at))
            .count() as u64;
        report.dead_letters_missing = self
            .rejected
            .iter()
            .filter(|(at, _)| !self.dead_lettered.contains(at))
            .map(|(&(partition, offset), &reason)| MissingDeadLetter {
                partition,
                offset,
                reason,
            })
            .collect();
        for list in [
            &mut report.missing,
            &mut report.stale,
            &mut report.differing,
        ] {
            list.sort_by(|a, b| a.key.cmp(&b.key));
        }
        report.unexpected.sort();
        report
            .dead_letters_missing
            .sort_by_key(|m| (m.partition, m.offset));
        report
    }

    /// Whether expected and pushed values can be compared: not when only
    /// part of the history was read under `json-merge-patch` (the expected
    /// document folds a part of the patches).
    fn values_comparable(&self) -> bool {
        !(self.partial && self.policy == MergePolicy::JsonMergePatch)
    }

    /// Whether a pushed value is the expected payload: compared decoded, so
    /// a re-serialised merge-patch document matches whatever its key order.
    fn same_value(&self, expected: Option<&Payload>, pushed: Option<&Bytes>) -> bool {
        if !self.values_comparable() {
            return true;
        }
        let pushed = self.codec.stored(pushed);
        match expected {
            None => false,
            Some(expected) => *expected == pushed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::InputFormat;

    fn verifier(policy: MergePolicy) -> Verifier {
        Verifier::new(
            Codec::new(InputFormat::Json, policy, "version"),
            policy,
            "in",
        )
    }

    fn push(v: &mut Verifier, offset: i64, key: &str, value: Option<&str>, version: u64) {
        v.push(
            0,
            offset,
            offset,
            Some(key.as_bytes()),
            value.map(str::as_bytes),
            Some(version),
        );
    }

    #[test]
    fn the_last_push_must_carry_the_latest_event() {
        let mut v = verifier(MergePolicy::Latest);
        v.event(0, 0, Some(b"a"), Some(br#"{"v":1}"#), None);
        v.event(0, 1, Some(b"a"), Some(br#"{"v":2}"#), None);
        v.event(0, 2, Some(b"b"), Some(br#"{"v":1}"#), None);
        v.event(0, 3, Some(b"c"), Some(br#"{"v":1}"#), None);
        push(&mut v, 0, "a", Some(r#"{"v":1}"#), 0);
        push(&mut v, 1, "b", Some(r#"{"v":1}"#), 2);
        push(&mut v, 2, "a", Some(r#"{"v":2}"#), 1);
        let report = v.report();
        assert_eq!((report.keys, report.matched), (3, 2));
        assert_eq!(report.missing.len(), 1, "{report:?}");
        assert_eq!(report.missing[0].key, "c");
        assert_eq!(report.events_behind, 1);
        assert!(!report.passed());

        push(&mut v, 3, "c", Some(r#"{"v":1}"#), 3);
        assert!(v.report().passed(), "{}", v.report().summary());
    }

    /// Key `k` gets versions 1, 2 and 3; its only push carries version 1.
    fn three_versions_of_k_and_a_push_of_the_first() -> Verifier {
        let mut v = verifier(MergePolicy::Latest);
        for version in 1..=3u64 {
            let body = format!(r#"{{"version":{version}}}"#);
            v.event(
                0,
                version as i64 - 1,
                Some(b"k"),
                Some(body.as_bytes()),
                None,
            );
        }
        push(&mut v, 0, "k", Some(r#"{"version":1}"#), 1);
        v
    }

    #[test]
    fn an_older_push_last_is_stale_and_counts_the_events_behind() {
        let v = three_versions_of_k_and_a_push_of_the_first();
        let report = v.report();
        assert_eq!(report.stale.len(), 1);
        assert_eq!(report.stale[0].events_behind, 2);
        assert_eq!(report.stale[0].pushed_version, Some(1));
        assert_eq!(report.stale[0].expected_version, Some(3));
    }

    #[test]
    fn a_key_whose_latest_events_were_refused_and_dead_lettered_passes_and_is_counted() {
        let mut v = three_versions_of_k_and_a_push_of_the_first();
        v.refused_push(Some("in"), Some(b"k"), 2);
        assert_eq!(
            v.report().stale.len(),
            1,
            "a refusal older than the latest event"
        );
        v.refused_push(Some("other-input"), Some(b"k"), 3);
        assert_eq!(v.report().stale.len(), 1, "another input's refusal");
        v.refused_push(Some("in"), Some(b"k"), 3);
        let report = v.report();
        assert!(report.passed(), "{}", report.summary());
        assert_eq!(report.refused_pushes, 1);
        assert!(report.summary().contains("1 keys' refused pushes"));
    }

    #[test]
    fn stale_events_do_not_change_the_expectation() {
        let mut v = verifier(MergePolicy::Latest);
        v.event(0, 0, Some(b"k"), Some(br#"{"version":5,"x":"new"}"#), None);
        v.event(0, 1, Some(b"k"), Some(br#"{"version":4,"x":"old"}"#), None);
        push(&mut v, 0, "k", Some(r#"{"version":5,"x":"new"}"#), 5);
        assert!(v.report().passed());
    }

    #[test]
    fn merge_patches_fold_and_compare_as_documents() {
        let mut v = verifier(MergePolicy::JsonMergePatch);
        v.event(0, 0, Some(b"k"), Some(br#"{"a":1}"#), None);
        v.event(0, 1, Some(b"k"), Some(br#"{"b":2}"#), None);
        push(&mut v, 0, "k", Some(r#"{"b":2,"a":1}"#), 1);
        assert!(v.report().passed(), "{:?}", v.report());
        push(&mut v, 1, "k", Some(r#"{"b":2}"#), 1);
        assert_eq!(v.report().differing.len(), 1);
    }

    #[test]
    fn deletes_expect_a_tombstone() {
        let mut v = verifier(MergePolicy::Latest);
        v.event(0, 0, Some(b"k"), Some(b"{}"), None);
        v.event(0, 1, Some(b"k"), None, None);
        push(&mut v, 0, "k", Some("{}"), 0);
        assert_eq!(
            v.report().differing.len(),
            1,
            "a value where a delete is due (the delete keeps version 0)"
        );
        push(&mut v, 2, "k", None, 0);
        assert!(v.report().passed());
    }

    /// The issue's case: per-key counters, a delete without a version, then
    /// the key re-created with versions above its old ones (but below the
    /// delete's offset): the re-created key's last push must carry them, and
    /// a straggler older than the delete stays stale.
    #[test]
    fn a_delete_without_a_version_keeps_the_keys_version_for_the_next_event() {
        let mut v = verifier(MergePolicy::Latest);
        for (offset, version) in (1..=5).enumerate() {
            let body = format!(r#"{{"version":{version}}}"#);
            v.event(
                0,
                10 + offset as i64,
                Some(b"k"),
                Some(body.as_bytes()),
                None,
            );
        }
        v.event(0, 20, Some(b"k"), None, None);
        v.event(0, 21, Some(b"k"), Some(br#"{"version":3}"#), None);
        push(&mut v, 0, "k", None, 5);
        assert!(
            v.report().passed(),
            "the straggler v3 is stale: {}",
            v.report().summary()
        );
        v.event(0, 22, Some(b"k"), Some(br#"{"version":6}"#), None);
        push(&mut v, 1, "k", Some(r#"{"version":6}"#), 6);
        assert!(v.report().passed(), "{}", v.report().summary());
    }

    /// A delete's version may come in a header: then it orders like any
    /// event's (an older one is stale), and a header that is not a number
    /// is a dead letter.
    #[test]
    fn a_delete_with_a_version_header_is_ordered_by_it() {
        let mut v = verifier(MergePolicy::Latest);
        v.event(0, 0, Some(b"k"), Some(br#"{"version":5}"#), None);
        v.event(0, 1, Some(b"k"), None, Some(b"4"));
        push(&mut v, 0, "k", Some(r#"{"version":5}"#), 5);
        assert!(v.report().passed(), "the older delete is stale");
        v.event(0, 2, Some(b"k"), None, Some(b"9"));
        assert_eq!(v.report().stale.len(), 1);
        push(&mut v, 1, "k", None, 9);
        assert!(v.report().passed());
        v.event(0, 3, Some(b"k"), None, Some(b"soon"));
        assert_eq!(v.report().dead_letters_missing[0].reason, "invalid-version");
    }

    #[test]
    fn rejected_records_must_be_dead_lettered() {
        let mut v = verifier(MergePolicy::Latest);
        v.event(0, 0, Some(b"k"), Some(b"{not json"), None);
        v.event(1, 7, None, Some(b"{}"), None);
        let report = v.report();
        assert_eq!(report.keys, 0);
        assert_eq!(report.dead_letters_expected, 2);
        assert_eq!(
            report.dead_letters_missing,
            vec![
                MissingDeadLetter {
                    partition: 0,
                    offset: 0,
                    reason: "invalid-json"
                },
                MissingDeadLetter {
                    partition: 1,
                    offset: 7,
                    reason: "null-key"
                }
            ]
        );
        v.dead_letter(Some("in"), 0, 0);
        v.dead_letter(Some("other-topic"), 1, 7);
        assert_eq!(v.report().dead_letters_found, 1);
        v.dead_letter(Some("in"), 1, 7);
        assert!(v.report().passed());
    }

    #[test]
    fn pushes_of_keys_without_events_are_unexpected() {
        let mut v = verifier(MergePolicy::Latest);
        push(&mut v, 0, "ghost", Some("{}"), 1);
        let report = v.report();
        assert_eq!(report.unexpected, vec!["ghost".to_string()]);
        assert!(!report.passed());
    }

    #[test]
    fn with_skip_unchanged_an_older_push_of_the_same_value_passes_and_is_reported() {
        for skip in [false, true] {
            let mut v = verifier(MergePolicy::Latest);
            if skip {
                v = v.skip_unchanged();
            }
            v.event(0, 0, Some(b"k"), Some(br#"{"a":1}"#), None);
            v.event(0, 1, Some(b"k"), Some(br#"{"a":2}"#), None);
            v.event(0, 2, Some(b"k"), Some(br#"{"a":1}"#), None);
            v.event(0, 3, Some(b"j"), Some(br#"{"a":1}"#), None);
            v.event(0, 4, Some(b"j"), Some(br#"{"a":2}"#), None);
            push(&mut v, 0, "k", Some(r#"{"a":1}"#), 0);
            push(&mut v, 1, "k", Some(r#"{"a":2}"#), 1);
            push(&mut v, 2, "k", Some(r#"{"a":1}"#), 2);
            push(&mut v, 3, "j", Some(r#"{"a":1}"#), 3);
            // k's events 3 and 4 re-send its values: skipped, k ends on 2.
            v.event(0, 5, Some(b"k"), Some(br#"{"a":1}"#), None);
            let report = v.report();
            assert_eq!(
                report.stale.len(),
                if skip { 1 } else { 2 },
                "j's older push differs: stale either way"
            );
            assert_eq!(report.unchanged, u64::from(skip));
            assert_eq!(report.summary().contains("skip_unchanged"), skip);
        }
    }
}
