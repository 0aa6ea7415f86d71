//! Routing records from the poll thread to the partitions' tasks, and the
//! one backpressure mechanism.
//!
//! A task whose table is saturated stops taking records from its channel.
//! The router counts what it has handed to a task and the task has not
//! processed yet, in the channel or in the core's inbox (the task's
//! [`Backlog`](super::task::Backlog)), and pauses the partition once that
//! passes [`PAUSE_RECORDS`] or `singleflight.max_held_bytes`; it resumes
//! the partition once the task has processed half of it. Memory stays
//! bounded whatever the input rate. The channel itself is unbounded:
//! handing a batch over never waits, and a paused partition keeps what
//! librdkafka has prefetched for it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::TopicPartitionList;
use tracing::warn;

use super::task::{InputRecord, TaskInput};
use crate::internal_events::{PartitionPaused, PartitionResumed};
use crate::metrics::Metrics;

/// Records waiting for a task before its partition is paused (bytes: the
/// `singleflight.max_held_bytes` setting).
pub const PAUSE_RECORDS: usize = 32 * 1024;

/// A partition's task, as the poll thread sees it.
struct Routed {
    input: TaskInput,
    /// Paused since its backlog passed a bound.
    paused: bool,
}

/// The tasks of the assigned partitions, by partition.
pub struct Router {
    topic: String,
    max_bytes: usize,
    tasks: Mutex<HashMap<i32, Routed>>,
    metrics: Arc<Metrics>,
}

impl Router {
    pub fn new(topic: String, max_bytes: usize, metrics: Arc<Metrics>) -> Self {
        Router {
            topic,
            max_bytes,
            tasks: Mutex::default(),
            metrics,
        }
    }

    fn tasks(&self) -> MutexGuard<'_, HashMap<i32, Routed>> {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a task for each partition that has none (`start` makes it);
    /// returns the partitions that were new.
    pub fn assign(&self, partitions: &[i32], mut start: impl FnMut(i32) -> TaskInput) -> Vec<i32> {
        let mut tasks = self.tasks();
        let mut new = Vec::new();
        for &partition in partitions {
            tasks.entry(partition).or_insert_with(|| {
                new.push(partition);
                Routed {
                    input: start(partition),
                    paused: false,
                }
            });
        }
        new
    }

    /// Takes the tasks of `partitions` out (to close them).
    pub fn revoke(&self, partitions: &[i32]) -> Vec<(i32, TaskInput)> {
        let mut tasks = self.tasks();
        partitions
            .iter()
            .filter_map(|p| tasks.remove(p).map(|t| (*p, t.input)))
            .collect()
    }

    pub fn partitions(&self) -> Vec<i32> {
        self.tasks().keys().copied().collect()
    }

    /// Tells the task of `partition`, if still assigned here, that its
    /// commit of `position` did not go through.
    pub fn commit_failed(&self, partition: i32, position: i64) {
        if let Some(task) = self.tasks().get(&partition) {
            let _ = task.input.commit_failures.send(position);
        }
    }

    /// Whether `partition` is assigned here.
    pub fn holds(&self, partition: i32) -> bool {
        self.tasks().contains_key(&partition)
    }

    /// Hands records to their partitions' tasks; pauses a partition whose
    /// task's backlog is past a bound.
    pub fn route<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        batch: Vec<(i32, InputRecord)>,
    ) {
        if batch.is_empty() {
            return;
        }
        let mut tasks = self.tasks();
        // A fetch's records come one partition at a time: each run of
        // records of one partition goes to its task as one batch.
        let mut batch = batch.into_iter().peekable();
        while let Some((partition, first)) = batch.next() {
            let mut records = vec![first];
            while let Some((_, record)) = batch.next_if(|(p, _)| *p == partition) {
                records.push(record);
            }
            let Some(task) = tasks.get_mut(&partition) else {
                continue; // revoked meanwhile: the next owner reads it from the committed offset
            };
            task.input.backlog.handed(&records);
            if task.input.records.send(records).is_err() {
                continue; // the task is closing; its events stay uncommitted
            }
            let backlog = task.input.backlog.size();
            if !task.paused && over_bound(backlog, self.max_bytes) {
                match consumer.pause(&self.one_partition(partition)) {
                    Ok(()) => {
                        task.paused = true;
                        self.metrics.emit(PartitionPaused {
                            partition,
                            held: backlog.0,
                        });
                    }
                    Err(e) => warn!(partition, "pause failed: {e}"),
                }
            }
        }
    }

    /// Resumes paused partitions whose tasks have processed half their
    /// backlog; true if some partition stays paused.
    pub fn resume_ready<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>) -> bool {
        let mut tasks = self.tasks();
        let mut still_paused = false;
        for (partition, task) in tasks.iter_mut().filter(|(_, t)| t.paused) {
            if !resumable(task.input.backlog.size(), self.max_bytes) {
                still_paused = true;
                continue;
            }
            match consumer.resume(&self.one_partition(*partition)) {
                Ok(()) => {
                    task.paused = false;
                    self.metrics.emit(PartitionResumed(*partition));
                }
                Err(e) => {
                    still_paused = true;
                    warn!(partition, "resume failed: {e}");
                }
            }
        }
        still_paused
    }

    fn one_partition(&self, partition: i32) -> TopicPartitionList {
        let mut list = TopicPartitionList::new();
        list.add_partition(&self.topic, partition);
        list
    }
}

/// Whether a backlog of (records, bytes) is past a bound.
fn over_bound((records, bytes): (usize, usize), max_bytes: usize) -> bool {
    records >= PAUSE_RECORDS || bytes >= max_bytes
}

/// Whether a paused partition's backlog is down to half its bounds.
fn resumable((records, bytes): (usize, usize), max_bytes: usize) -> bool {
    records <= PAUSE_RECORDS / 2 && bytes <= max_bytes / 2
}
