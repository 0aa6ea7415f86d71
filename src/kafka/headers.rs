//! The names of the headers keyflight writes: on every push (its version,
//! tn, how many events it merged, whether compensation sent it) and on every
//! dead letter (why, and where the record came from). `verify`, `tail`,
//! `demo` and the benchmark read them back by these names.

/// The per-key version of the newest event a push carries.
pub const VERSION: &str = "keyflight-version";
/// The push's start time (ns), its marker's t1.
pub const TN: &str = "keyflight-tn";
/// How many events the push covers (0 for a compensation push).
pub const MERGED: &str = "keyflight-merged";
/// `true` for a re-push of stored state by the compensation scan.
pub const COMPENSATION: &str = "keyflight-compensation";

/// A dead letter's reason in words (the decoder's or the broker's error).
pub const ERROR: &str = "keyflight-error";
/// A dead letter's reason as a short stable name (`invalid-json`, ...).
pub const ERROR_REASON: &str = "keyflight-error-reason";
/// Where a dead letter came from: topic, partition and offset.
pub const SOURCE_TOPIC: &str = "keyflight-source-topic";
pub const SOURCE_PARTITION: &str = "keyflight-source-partition";
pub const SOURCE_OFFSET: &str = "keyflight-source-offset";
/// On a dead letter whose value the dead-letter topic refused whole: the
/// value's size in bytes before it was cut to what the topic takes.
pub const VALUE_CUT_FROM: &str = "keyflight-value-cut-from";
/// On a push the HTTP sink's endpoint refused: the status it answered.
pub const HTTP_STATUS: &str = "keyflight-http-status";
/// On a push the HTTP sink's endpoint refused: the start of its answer.
pub const HTTP_BODY: &str = "keyflight-http-body";
