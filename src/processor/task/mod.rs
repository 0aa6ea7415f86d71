//! One assigned partition's task: a pure [`core`] that decides, and an
//! async [`shell`] that restores the store, feeds the core what happened
//! and carries out its actions. This module holds the pipe between the
//! group member's poll thread and the task: [`TaskInput`] (records in
//! batches, the backlog that pauses the partition, the close request).

pub mod core;
pub mod shell;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use rdkafka::Message;
use tokio::sync::{mpsc, oneshot};

pub use self::core::{
    Action, CoreConfig, DeadLetter, Flight, ProduceError, SinkAnswer, TaskCore, Timer,
};
pub use shell::spawn;

/// The poll thread's end of a task's pipe.
pub struct TaskInput {
    /// Records in the order of their offsets, in batches (one channel
    /// operation and one wake-up per batch, not per record). Unbounded: the
    /// poll thread bounds it by pausing the partition (see [`Backlog`]), so
    /// handing records over never waits.
    pub records: mpsc::UnboundedSender<Vec<InputRecord>>,
    pub backlog: Arc<Backlog>,
    /// Asks the task to stop; it answers with its final commit position.
    pub close: oneshot::Sender<Close>,
    /// Commits of the task's positions that did not go through.
    pub commit_failures: mpsc::UnboundedSender<i64>,
}

/// A request to stop a partition's task.
pub struct Close {
    /// Where the task answers with its final commit position (`None`:
    /// commit nothing).
    pub reply: std::sync::mpsc::Sender<Option<i64>>,
    /// The partition was lost, not revoked: taken away without notice (a
    /// session that expired, a frozen process), so another member may own
    /// it already. The task drops it at once (see [`TaskCore::lose`]).
    pub lost: bool,
}

/// Records handed to a task and not yet processed by it (in its channel or
/// its core's inbox), counted on both sides: the poll thread pauses the
/// partition when they pass a bound and resumes it once the task has
/// processed half of them.
#[derive(Default)]
pub struct Backlog {
    records: AtomicUsize,
    bytes: AtomicUsize,
}

impl Backlog {
    pub fn handed(&self, batch: &[InputRecord]) {
        self.records.fetch_add(batch.len(), Ordering::Relaxed);
        let bytes = batch.iter().map(InputRecord::bytes).sum();
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The task processed `records` records of `bytes` key and value bytes.
    fn processed(&self, records: usize, bytes: usize) {
        self.records.fetch_sub(records, Ordering::Relaxed);
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// (records, key and value bytes) waiting for the task.
    pub fn size(&self) -> (usize, usize) {
        (
            self.records.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }
}

/// An input record as its task needs it: no topic name or headers to copy
/// (rust-rdkafka's `OwnedMessage` copies both), key and value shared.
#[derive(Clone, Debug)]
pub struct InputRecord {
    pub offset: i64,
    pub key: Option<Bytes>,
    pub payload: Option<Bytes>,
    /// A tombstone's version header (`deletes.version_header`), as it came.
    pub delete_version: Option<Bytes>,
}

impl InputRecord {
    /// A consumed record; a tombstone's `delete_header` is kept.
    pub fn of(message: &impl Message, delete_header: &str) -> InputRecord {
        use rdkafka::message::Headers;
        let record = InputRecord::copied(message.offset(), message.key(), message.payload());
        if message.payload().is_some() {
            return record;
        }
        let header = message.headers().and_then(|headers| {
            headers
                .iter()
                .filter(|h| h.key == delete_header)
                .last()
                .and_then(|h| h.value)
        });
        record.with_delete_version(header)
    }

    /// The record with a tombstone's version header.
    pub fn with_delete_version(mut self, header: Option<&[u8]>) -> InputRecord {
        self.delete_version = header.map(Bytes::copy_from_slice);
        self
    }

    /// A record whose key and value are copied from the consumer's buffers,
    /// into one buffer they share: one allocation and one reference count
    /// per record, where two `Bytes::copy_from_slice` were two allocations,
    /// each promoted by a third and fourth when the task first clones them.
    pub fn copied(offset: i64, key: Option<&[u8]>, payload: Option<&[u8]>) -> InputRecord {
        let (key_len, payload_len) = (key.map_or(0, <[u8]>::len), payload.map_or(0, <[u8]>::len));
        let mut buffer = Vec::with_capacity(key_len + payload_len);
        buffer.extend_from_slice(key.unwrap_or_default());
        buffer.extend_from_slice(payload.unwrap_or_default());
        let buffer = Bytes::from(buffer);
        InputRecord {
            offset,
            key: key.map(|_| buffer.slice(..key_len)),
            payload: payload.map(|_| buffer.slice(key_len..)),
            delete_version: None,
        }
    }

    /// What it weighs in a [`Backlog`]: its key and value bytes.
    pub fn bytes(&self) -> usize {
        self.key.as_ref().map_or(0, Bytes::len) + self.payload.as_ref().map_or(0, Bytes::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backlog_counts_records_until_they_are_processed() {
        let backlog = Backlog::default();
        let batch = vec![
            InputRecord::copied(0, Some(b"a"), Some(b"12")),
            InputRecord::copied(1, Some(b"b"), None),
        ];
        backlog.handed(&batch);
        assert_eq!(backlog.size(), (2, 4));
        // Taken into the inbox and one processed: the other still counts.
        backlog.processed(1, batch[0].bytes());
        assert_eq!(backlog.size(), (1, 1));
        backlog.processed(1, batch[1].bytes());
        assert_eq!(backlog.size(), (0, 0));
    }

    #[test]
    fn a_copied_record_keeps_its_key_and_value_apart_and_absent_ones_absent() {
        let both = InputRecord::copied(7, Some(b"key"), Some(b"{\"v\":1}"));
        assert_eq!(both.offset, 7);
        assert_eq!(both.key.as_deref(), Some(&b"key"[..]));
        assert_eq!(both.payload.as_deref(), Some(&b"{\"v\":1}"[..]));
        assert_eq!(both.bytes(), 3 + 7);

        let tombstone = InputRecord::copied(8, Some(b"k"), None);
        assert_eq!(
            (tombstone.key.as_deref(), tombstone.payload),
            (Some(&b"k"[..]), None)
        );
        let keyless = InputRecord::copied(9, None, Some(b""));
        assert_eq!(
            (keyless.key, keyless.payload.as_deref()),
            (None, Some(&b""[..]))
        );
    }
}
