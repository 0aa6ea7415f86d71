//! Internal events: every happening worth a log line or a metric is a value
//! here that does both, in one place (the model is Vector's internal
//! events). The processor says *what happened*
//! (`metrics.emit(DeadLettered { .. })`); how it is logged and counted lives
//! in the event's `emit`, so a log and its metric never drift apart.
//!
//! Partition events run inside the partition task's span, which carries the
//! topic and partition; member events ([`MemberEvent`]) run on the poll
//! thread.

use std::time::Duration;

use tracing::{debug, info, warn};

use crate::metrics::{Metrics, PartitionMetrics};
use crate::state::{MarkerDecodeError, Opened};

/// A happening in one partition's task.
pub trait PartitionEvent {
    fn emit(self, metrics: &PartitionMetrics);
}

/// A happening of the group member as a whole.
pub trait MemberEvent {
    fn emit(self, metrics: &Metrics);
}

impl PartitionMetrics {
    pub fn emit(&self, event: impl PartitionEvent) {
        event.emit(self)
    }
}

impl Metrics {
    pub fn emit(&self, event: impl MemberEvent) {
        event.emit(self)
    }
}

/// The store caught up with the changelog; the partition starts consuming.
pub struct PartitionRestored<'a> {
    pub topic: &'a str,
    pub records: u64,
    pub open_markers: usize,
    pub from: Opened,
    pub elapsed: Duration,
}

impl PartitionEvent for PartitionRestored<'_> {
    fn emit(self, m: &PartitionMetrics) {
        info!(
            topic = %self.topic, partition = m.partition,
            records = self.records, open_markers = self.open_markers, from = ?self.from,
            seconds = self.elapsed.as_secs_f64(),
            "partition restored from changelog"
        );
        m.changelog_restored.inc_by(self.records);
        m.restore_duration.set(self.elapsed.as_secs_f64());
        m.open_markers.set(self.open_markers as i64);
        m.member.health.consuming(m.partition);
    }
}

/// A changelog record that no released marker schema reads (an unknown
/// fingerprint, a truncated datum, garbage) was skipped while restoring, and
/// its key's state dropped: the key's next event is pushed as new.
pub struct ChangelogRecordUnreadable<'a> {
    pub topic: &'a str,
    pub offset: i64,
    pub key: &'a [u8],
    pub error: &'a MarkerDecodeError,
}

impl PartitionEvent for ChangelogRecordUnreadable<'_> {
    fn emit(self, m: &PartitionMetrics) {
        warn!(
            topic = %self.topic, partition = m.partition, offset = self.offset,
            key = %String::from_utf8_lossy(self.key),
            "changelog record unreadable, skipped; the key's state is dropped: {}", self.error
        );
        m.changelog_unreadable.inc();
    }
}

/// A dead letter was given up: nothing may be retried forever, and a
/// dead letter that never lands would pin its partition.
pub struct DeadLetterAbandoned<'a> {
    pub offset: i64,
    pub key: &'a [u8],
    pub reason: &'static str,
    pub error: &'a str,
}

impl PartitionEvent for DeadLetterAbandoned<'_> {
    fn emit(self, m: &PartitionMetrics) {
        tracing::error!(
            partition = m.partition, offset = self.offset, reason = self.reason,
            key = %String::from_utf8_lossy(self.key),
            "dead letter given up (the record is lost to the dead-letter topic): {}", self.error
        );
        m.dead_letters_abandoned.inc();
    }
}

/// A record of the input partition reached the task.
pub struct RecordReceived;

impl PartitionEvent for RecordReceived {
    fn emit(self, m: &PartitionMetrics) {
        m.events_consumed.inc();
    }
}

/// An event joined the pending push of a key already in flight.
pub struct EventMerged;

impl PartitionEvent for EventMerged {
    fn emit(self, m: &PartitionMetrics) {
        m.events_merged.inc();
    }
}

/// An event older than what its key already saw; dropped.
pub struct StaleEventDropped {
    pub offset: i64,
}

impl PartitionEvent for StaleEventDropped {
    fn emit(self, m: &PartitionMetrics) {
        debug!(offset = self.offset, "stale event dropped");
        m.events_stale.inc();
    }
}

/// The number of keys with a push in flight changed.
pub struct KeysInFlight {
    pub in_flight: usize,
    /// Keys waiting for their push window, without a push in flight.
    pub waiting: usize,
}

impl PartitionEvent for KeysInFlight {
    fn emit(self, m: &PartitionMetrics) {
        m.keys_in_flight.set(self.in_flight as i64);
        m.keys_waiting.set(self.waiting as i64);
    }
}

/// The expiry sweep (`state.ttl`) removed this many idle keys' markers.
pub struct MarkersExpired(pub usize);

impl PartitionEvent for MarkersExpired {
    fn emit(self, m: &PartitionMetrics) {
        m.markers_expired.inc_by(self.0 as u64);
    }
}

/// A push was not produced: its value equals the key's last acknowledged
/// one (`singleflight.skip_unchanged`).
pub struct PushSkipped;

impl PartitionEvent for PushSkipped {
    fn emit(self, m: &PartitionMetrics) {
        m.pushes_skipped.inc();
    }
}

/// The broker acknowledged a push.
pub struct PushAcknowledged {
    pub compensation: bool,
    pub latency: Duration,
}

impl PartitionEvent for PushAcknowledged {
    fn emit(self, m: &PartitionMetrics) {
        let (count, latency) = if self.compensation {
            (&m.pushes_compensation, &m.latency_compensation)
        } else {
            (&m.pushes_normal, &m.latency_normal)
        };
        count.inc();
        latency.observe(self.latency.as_secs_f64());
    }
}

/// The broker refused a push (or it timed out); it is retried.
pub struct PushFailed<'a> {
    pub key: &'a [u8],
    pub error: &'a str,
}

impl PartitionEvent for PushFailed<'_> {
    fn emit(self, m: &PartitionMetrics) {
        warn!(
            partition = %m.label, key = %String::from_utf8_lossy(self.key),
            "push failed, retrying with the newest value: {}", self.error
        );
        m.push_failures.inc();
    }
}

/// A record goes unchanged to the dead-letter topic.
pub struct DeadLettered<'a> {
    pub offset: i64,
    pub reason: &'static str,
    pub detail: &'a str,
}

impl PartitionEvent for DeadLettered<'_> {
    fn emit(self, m: &PartitionMetrics) {
        warn!(
            partition = %m.label, offset = self.offset, reason = self.reason,
            "dead-lettering a record: {}", self.detail
        );
        m.dead_letters
            .with_label_values(&[m.label.as_str(), self.reason])
            .inc();
    }
}

/// The changelog acknowledged marker records.
pub struct ChangelogWritten(pub u64);

impl PartitionEvent for ChangelogWritten {
    fn emit(self, m: &PartitionMetrics) {
        m.changelog_written.inc_by(self.0);
    }
}

/// One compensation scan finished.
pub struct CompensationScanned {
    pub elapsed: Duration,
    /// Open markers in the store (due or not).
    pub open_markers: usize,
    pub repushed: u64,
}

impl PartitionEvent for CompensationScanned {
    fn emit(self, m: &PartitionMetrics) {
        if self.repushed > 0 {
            info!(
                partition = %m.label, pushed = self.repushed,
                "compensation re-pushed open markers"
            );
        }
        m.compensation_scan.observe(self.elapsed.as_secs_f64());
        m.compensation_repushed.inc_by(self.repushed);
        m.open_markers.set(self.open_markers as i64);
    }
}

/// A rebalance assigned partitions to this member.
pub struct PartitionsAssigned<'a>(pub &'a [i32]);

impl MemberEvent for PartitionsAssigned<'_> {
    fn emit(self, m: &Metrics) {
        for partition in self.0 {
            info!(partition, "partition assigned");
        }
        m.health.assigned(self.0);
    }
}

/// A rebalance (or shutdown) takes partitions away from this member.
pub struct PartitionsRevoked<'a>(pub &'a [i32]);

impl MemberEvent for PartitionsRevoked<'_> {
    fn emit(self, m: &Metrics) {
        info!(partitions = ?self.0, "partitions revoked");
        m.health.revoking(self.0);
        for partition in self.0 {
            m.forget_partition(*partition);
        }
    }
}

/// The group coordinator stored these offsets for this member.
pub struct OffsetsCommitted<'a>(pub &'a [(i32, i64)]);

impl MemberEvent for OffsetsCommitted<'_> {
    fn emit(self, m: &Metrics) {
        debug!(offsets = ?self.0, "offsets committed");
        for (partition, offset) in self.0 {
            m.committed_offset
                .with_label_values(&[&partition.to_string()])
                .set(*offset);
        }
    }
}

/// An exactly-once transaction of a partition ended.
pub struct TransactionEnded {
    pub partition: i32,
    pub committed: bool,
}

impl MemberEvent for TransactionEnded {
    fn emit(self, m: &Metrics) {
        let outcome = if self.committed {
            "committed"
        } else {
            "aborted"
        };
        if !self.committed {
            warn!(partition = self.partition, "transaction aborted");
        }
        m.transactions
            .with_label_values(&[&self.partition.to_string(), outcome])
            .inc();
    }
}

/// A partition's task fell behind: the partition is paused until it
/// catches up (backpressure).
pub struct PartitionPaused {
    pub partition: i32,
    /// Records handed to the task and not yet processed.
    pub held: usize,
}

impl MemberEvent for PartitionPaused {
    fn emit(self, m: &Metrics) {
        debug!(
            partition = self.partition,
            held = self.held,
            "partition paused: its task is saturated"
        );
        let label = self.partition.to_string();
        m.partition_pauses.with_label_values(&[&label]).inc();
        m.partition_paused.with_label_values(&[&label]).set(1);
    }
}

/// A paused partition's task caught up: the partition is resumed.
pub struct PartitionResumed(pub i32);

impl MemberEvent for PartitionResumed {
    fn emit(self, m: &Metrics) {
        debug!(partition = self.0, "partition resumed");
        m.partition_paused
            .with_label_values(&[&self.0.to_string()])
            .set(0);
    }
}

/// A sample of how far the committed offset trails the partition's end.
pub struct LagSampled {
    pub partition: i32,
    pub lag: i64,
}

impl MemberEvent for LagSampled {
    fn emit(self, m: &Metrics) {
        m.consumer_lag
            .with_label_values(&[&self.partition.to_string()])
            .set(self.lag);
    }
}

/// The HTTP sink sent a request.
pub struct HttpCallStarted;

impl MemberEvent for HttpCallStarted {
    fn emit(self, m: &Metrics) {
        m.http_in_flight.inc();
    }
}

/// The HTTP sink's request ended: answered with `status`, or not at all.
pub struct HttpCallEnded {
    pub status: Option<u16>,
    pub elapsed: Duration,
    /// The push is tried again (the key's marker stays open meanwhile).
    pub retried: bool,
}

impl MemberEvent for HttpCallEnded {
    fn emit(self, m: &Metrics) {
        m.http_in_flight.dec();
        let class = match self.status {
            Some(200..=299) => "2xx",
            Some(300..=399) => "3xx",
            Some(400..=499) => "4xx",
            Some(500..=599) => "5xx",
            Some(_) | None => "error",
        };
        m.http_requests.with_label_values(&[class]).inc();
        m.http_request_duration.observe(self.elapsed.as_secs_f64());
        if self.retried {
            m.http_retries.inc();
        }
    }
}
