//! The singleflight engine: pure logic, no I/O, no async runtime.
//!
//! * [`table`]: the per-partition table that keeps at most one push in flight
//!   per key and folds what arrives meanwhile into the next push.
//! * [`merge`]: payloads and the merge policies (`latest`, `json-merge-patch`).
//! * [`offsets`]: offset coverage, i.e. the position safe to commit.

mod keys;
pub mod merge;
pub mod offsets;
pub mod table;

pub use merge::{MergeError, MergePolicy, Payload, Value};
pub use offsets::OffsetTracker;
pub use table::{EngineError, Event, Key, Offer, Push, Table, TableConfig, TableStats, Windows};
