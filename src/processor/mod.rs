//! The processor behind `keyflight run`, laid out along its seams (Kafka
//! Streams' StreamThread / StreamTask / RecordCollector /
//! StoreChangelogReader):
//!
//! * [`member`]: the consumer-group member. Its poll thread owns the
//!   consumer, runs the rebalance callbacks (a task per assigned partition
//!   starts on assign and closes on revoke), and sends the commits the
//!   tasks ask for.
//! * `router`: records to the tasks in batches, and backpressure: a
//!   partition whose task has fallen behind is paused.
//! * [`task`]: one assigned partition. Its [`task::core`] decides
//!   everything (decode, singleflight table, markers, changelog writes,
//!   commits, checkpoints, dead letters, compensation, closing) with no
//!   I/O; its [`task::shell`] restores the store, then carries out the
//!   core's actions against the producer and the store and feeds the
//!   outcomes back.
//! * `commit_gate`: when a task's commit may go out (only once the
//!   markers behind it are durable in the changelog). Pure.
//! * `claim_watch`: whether a task's changelog partition gets another
//!   writer's records after its claim. Pure.
//! * `restore`: a store from its slice of the changelog, before the task
//!   processes any event.
//!
//! One record's path, by name: `FetchQueue::take` (the poll thread, [`member`]) →
//! `Router::route` → `TaskInput::records` → `TaskCore::take_batch` /
//! `TaskCore::end_turn` (decode, `Table::offer`, markT1) →
//! `Action::Push` → `shell::Shell::push` (produce to `events.pushed`) →
//! `TaskCore::push_done` (markT2, the key's next push) → `Action::WriteChangelog`
//! → `TaskCore::changelog_done` → `Action::Commit` → the poll thread's commit.

pub(crate) mod claim_watch;
pub(crate) mod commit_gate;
pub mod member;
pub(crate) mod restore;
pub(crate) mod router;
pub mod task;
