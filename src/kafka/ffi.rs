//! Every call into librdkafka that rust-rdkafka does not wrap, behind safe
//! functions: the fetch queue of `keyflight run` (records taken many per
//! call), the cached watermarks (no broker round trip), and an
//! asynchronous commit whose outcome reaches the consumer's own queue.

use std::ffi::{CStr, CString};
use std::sync::atomic::{AtomicPtr, Ordering};
use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{IsError, KafkaError, KafkaResult};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::TopicPartitionList;
use tracing::warn;

/// The assigned partitions' records, forwarded from their librdkafka
/// queues to one queue of keyflight's own and taken many per call
/// (`rd_kafka_consume_batch_queue`). rust-rdkafka's `poll` returns one
/// record per call, each with a queue lock and clock reads of its own.
///
/// librdkafka clears a partition's forwarding when it stops fetching it (a
/// revoke), and finishes stops before it starts an assignment, so a new
/// assignment's forward stands; the caller forwards its partitions again
/// now and then as a guard against a stop landing after it (records left
/// meanwhile move along, in order).
pub struct FetchQueue(AtomicPtr<rd::rd_kafka_queue_t>);

impl Default for FetchQueue {
    fn default() -> Self {
        FetchQueue(AtomicPtr::new(std::ptr::null_mut()))
    }
}

impl FetchQueue {
    /// Creates the queue of `consumer`'s client. Call [`FetchQueue::close`]
    /// before the consumer is dropped.
    pub fn open<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>) {
        // SAFETY: the client pointer is valid while `consumer` lives; the
        // queue is destroyed in `close`, before the consumer.
        let queue = unsafe { rd::rd_kafka_queue_new(consumer.client().native_ptr()) };
        self.0.store(queue, Ordering::Release);
    }

    /// Destroys the queue; records still in it are not committed, so the
    /// next owner reads them again.
    pub fn close(&self) {
        let queue = self.0.swap(std::ptr::null_mut(), Ordering::AcqRel);
        if !queue.is_null() {
            // SAFETY: created by `open`, destroyed once (swapped out above).
            unsafe { rd::rd_kafka_queue_destroy(queue) };
        }
    }

    /// Sends `partition`'s records to this queue (else they stay on the
    /// consumer queue, which `poll` serves).
    pub fn forward<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        topic: &str,
        partition: i32,
    ) {
        let queue = self.0.load(Ordering::Acquire);
        let Ok(topic) = CString::new(topic) else {
            return;
        };
        if queue.is_null() {
            return;
        }
        // SAFETY: the client and `queue` are alive (see `open`); the
        // partition queue handle is ours and released right after, which
        // keeps the forwarding.
        unsafe {
            let rk = consumer.client().native_ptr();
            let from = rd::rd_kafka_queue_get_partition(rk, topic.as_ptr(), partition);
            if from.is_null() {
                return warn!(partition, "cannot forward the partition's records");
            }
            rd::rd_kafka_queue_forward(from, queue);
            rd::rd_kafka_queue_destroy(from);
        }
    }

    /// Takes up to `MAX` records, waiting up to `timeout` for the first,
    /// and hands each to `record` as (partition, offset, key, value, and
    /// for a tombstone its header `delete_header`) in the order they were
    /// fetched. Returns how many were taken (errors included, which are
    /// logged).
    pub fn take<const MAX: usize>(
        &self,
        timeout: Duration,
        delete_header: &CStr,
        mut record: impl FnMut(i32, i64, Option<&[u8]>, Option<&[u8]>, Option<&[u8]>),
    ) -> usize {
        let queue = self.0.load(Ordering::Acquire);
        if queue.is_null() || MAX == 0 {
            return 0;
        }
        let mut messages = [std::ptr::null_mut::<rd::rd_kafka_message_t>(); MAX];
        // librdkafka waits out the timeout until the whole batch is there,
        // so: wait for one record, then take what else is ready at once.
        // SAFETY: `queue` is alive (see `open`); librdkafka fills at most
        // the given number of pointers, each destroyed below after use.
        let taken = unsafe {
            let first = rd::rd_kafka_consume_batch_queue(
                queue,
                timeout.as_millis() as i32,
                messages.as_mut_ptr(),
                1,
            );
            if first == 1 {
                let more = rd::rd_kafka_consume_batch_queue(
                    queue,
                    0,
                    messages.as_mut_ptr().add(1),
                    MAX - 1,
                );
                1 + more.max(0)
            } else {
                first
            }
        };
        let taken = usize::try_from(taken).unwrap_or(0).min(MAX);
        for &message in &messages[..taken] {
            // SAFETY: a message librdkafka handed over, valid until
            // destroyed; the slices do not outlive the call to `record`.
            unsafe {
                let m = &*message;
                if m.err == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                    let slice = |ptr: *mut libc::c_void, len: usize| {
                        (!ptr.is_null()).then(|| std::slice::from_raw_parts(ptr as *const u8, len))
                    };
                    // Only a tombstone's headers are read: other records
                    // carry their version in their value.
                    let mut header: Option<&[u8]> = None;
                    let mut headers = std::ptr::null_mut();
                    if m.payload.is_null()
                        && rd::rd_kafka_message_headers(message, &mut headers)
                            == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
                    {
                        let (mut value, mut size) = (std::ptr::null(), 0);
                        if rd::rd_kafka_header_get_last(
                            headers,
                            delete_header.as_ptr(),
                            &mut value,
                            &mut size,
                        ) == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
                        {
                            header = slice(value as *mut libc::c_void, size);
                        }
                    }
                    record(
                        m.partition,
                        m.offset,
                        slice(m.key, m.key_len),
                        slice(m.payload, m.len),
                        header,
                    );
                } else {
                    let code: RDKafkaErrorCode = m.err.into();
                    warn!(partition = m.partition, "consumer error: {code}");
                }
                rd::rd_kafka_message_destroy(message);
            }
        }
        taken
    }
}

/// The watermarks librdkafka last saw in a fetch response for a partition
/// (`rd_kafka_get_watermark_offsets`: no broker round trip), if any fetch
/// has returned them yet.
pub fn cached_watermarks<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partition: i32,
) -> Option<(i64, i64)> {
    let topic = CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer lives as long as `consumer`; the topic is
    // a valid C string and the out-pointers point at live locals.
    let err = unsafe {
        rd::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
        .then_some((low.max(0), high))
}

/// An asynchronous commit whose outcome comes back through
/// `ConsumerContext::commit_callback` when the consumer queue is polled.
/// librdkafka only reports a manual async commit to a queue it is given,
/// and rust-rdkafka's `commit` passes none.
pub fn commit_async<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    offsets: &TopicPartitionList,
) -> KafkaResult<()> {
    let rk = consumer.client().native_ptr();
    // SAFETY: `rk` and `offsets` outlive the call; librdkafka copies the
    // offsets. The queue reference from `rd_kafka_queue_get_consumer` is ours
    // and released right after; the pending reply keeps its own reference.
    let err = unsafe {
        let queue = rd::rd_kafka_queue_get_consumer(rk);
        if queue.is_null() {
            return consumer.commit(offsets, CommitMode::Async);
        }
        let err = rd::rd_kafka_commit_queue(rk, offsets.ptr(), queue, None, std::ptr::null_mut());
        rd::rd_kafka_queue_destroy(queue);
        err
    };
    if err.is_error() {
        Err(KafkaError::ConsumerCommit(err.into()))
    } else {
        Ok(())
    }
}
