//! When a partition's commit may go out: only once the markers behind it
//! are durable in the changelog. Pure bookkeeping, no I/O: the partition
//! task reports its changelog writes and their outcomes, and asks.
//!
//! A commit asked for at write `n` (the newest changelog write then) waits
//! until every write up to `n` is acknowledged. A key whose write failed is
//! [`unwritten`](CommitGate::unwritten): it holds every commit until it is
//! written again (from the store's current marker, with the task's next
//! hand-over of markers), and the held commit then waits for that write
//! too: the next owner must never start from offsets whose markers the
//! changelog lacks.

use std::collections::HashSet;

use bytes::Bytes;

/// A commit asked for before the changelog caught up with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Held {
    position: i64,
    /// The newest changelog write the commit waits for.
    after_write: u64,
}

#[derive(Debug, Default)]
pub struct CommitGate {
    held: Option<Held>,
    /// Keys whose failed write could not be written again yet (their marker
    /// could not be read back): no commit goes out while there are any.
    unwritten: HashSet<Bytes>,
}

impl CommitGate {
    /// A commit of `position` is asked for; `newest_write` is the newest
    /// changelog write made so far (0: none). It replaces a commit still
    /// held, which it covers.
    pub fn ask(&mut self, position: i64, newest_write: u64) {
        self.held = Some(Held {
            position,
            after_write: newest_write,
        });
    }

    /// The write of `key` failed (or its marker could not be read back to
    /// write it again): commits wait until [`CommitGate::retry`] hands it
    /// out and the caller writes it.
    pub fn unwritten(&mut self, key: Bytes) {
        self.unwritten.insert(key);
    }

    /// The keys to try writing again (each goes back through
    /// [`CommitGate::unwritten`] if it still cannot be read, or is written
    /// as a new write that the held commit then waits for, see
    /// [`CommitGate::wrote_again`]).
    pub fn retry(&mut self) -> Vec<Bytes> {
        self.unwritten.drain().collect()
    }

    /// A key handed out by [`CommitGate::retry`] was written as `write`: a
    /// held commit waits for it too.
    pub fn wrote_again(&mut self, write: u64) {
        if let Some(held) = &mut self.held {
            held.after_write = held.after_write.max(write);
        }
    }

    /// The commit to send now, if one is held and the changelog caught up:
    /// `oldest_pending` is the oldest changelog write not yet acknowledged
    /// (`None`: all are).
    pub fn release(&mut self, oldest_pending: Option<u64>) -> Option<i64> {
        let held = self.held?;
        if !self.unwritten.is_empty() || oldest_pending.is_some_and(|w| w <= held.after_write) {
            return None;
        }
        self.held = None;
        Some(held.position)
    }

    /// Whether a key's marker is still missing from the changelog (closing
    /// then commits nothing).
    pub fn is_blocked(&self) -> bool {
        !self.unwritten.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_commit_waits_for_the_writes_made_before_it_was_asked() {
        let mut gate = CommitGate::default();
        assert_eq!(gate.release(None), None, "nothing asked");
        gate.ask(10, 3);
        assert_eq!(gate.release(Some(2)), None);
        assert_eq!(gate.release(Some(3)), None);
        assert_eq!(
            gate.release(Some(4)),
            Some(10),
            "later writes do not hold it"
        );
        assert_eq!(gate.release(None), None, "sent once");
        gate.ask(20, 4);
        assert_eq!(gate.release(None), Some(20));
    }

    #[test]
    fn a_marker_that_could_not_be_written_again_holds_every_commit_until_it_is() {
        let mut gate = CommitGate::default();
        gate.ask(10, 3);
        gate.unwritten(Bytes::from_static(b"k"));
        assert!(gate.is_blocked());
        assert_eq!(gate.release(None), None, "the changelog lacks k's marker");
        gate.ask(20, 5);
        assert_eq!(gate.release(None), None, "a newer commit waits too");
        // The retry still cannot read it: it goes back.
        let keys = gate.retry();
        assert_eq!(keys, vec![Bytes::from_static(b"k")]);
        gate.unwritten(keys[0].clone());
        assert_eq!(gate.release(None), None);
        // Now it is written as write 8: the commit waits for that write.
        assert_eq!(gate.retry().len(), 1);
        gate.wrote_again(8);
        assert!(!gate.is_blocked());
        assert_eq!(gate.release(Some(8)), None);
        assert_eq!(gate.release(Some(9)), Some(20));
    }

    #[derive(Clone, Debug)]
    enum Step {
        Write,
        Ack,
        Fail,
        Retry { readable: bool },
        Ask,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => Just(Step::Write),
            3 => Just(Step::Ack),
            1 => Just(Step::Fail),
            1 => any::<bool>().prop_map(|readable| Step::Retry { readable }),
            2 => Just(Step::Ask),
        ]
    }

    proptest! {
        /// Against a model of the changelog: a commit that goes out never
        /// covers a write asked before it that is neither acknowledged nor
        /// acknowledged through a rewrite.
        #[test]
        fn a_released_commit_never_covers_a_marker_the_changelog_lacks(
            steps in proptest::collection::vec(step(), 0..80)
        ) {
            let mut gate = CommitGate::default();
            let mut seq = 0u64;
            // Writes in flight, oldest first: (seq, key).
            let mut pending: std::collections::VecDeque<(u64, u32)> = Default::default();
            // Keys whose write is not durable yet.
            let mut missing: HashSet<u32> = HashSet::new();
            let mut asked: Option<(i64, Vec<u32>)> = None;
            let mut position = 0i64;
            let mut next_key = 0u32;
            for step in steps {
                match step {
                    Step::Write => {
                        seq += 1;
                        next_key += 1;
                        pending.push_back((seq, next_key));
                        missing.insert(next_key);
                    }
                    Step::Ack => {
                        if let Some((_, key)) = pending.pop_front() {
                            missing.remove(&key);
                        }
                    }
                    Step::Fail => {
                        if let Some((_, key)) = pending.pop_front() {
                            gate.unwritten(Bytes::from(key.to_be_bytes().to_vec()));
                        }
                    }
                    Step::Retry { readable } => {
                        for key in gate.retry() {
                            if readable {
                                seq += 1;
                                let k = u32::from_be_bytes(key[..].try_into().unwrap());
                                pending.push_back((seq, k));
                                gate.wrote_again(seq);
                            } else {
                                gate.unwritten(key);
                            }
                        }
                    }
                    Step::Ask => {
                        position += 1;
                        gate.ask(position, seq);
                        asked = Some((position, missing.iter().copied().collect()));
                    }
                }
                if let Some(released) = gate.release(pending.front().map(|(s, _)| *s)) {
                    let (position, behind) = asked.take().expect("released what was asked");
                    prop_assert_eq!(released, position);
                    for key in behind {
                        prop_assert!(!missing.contains(&key), "key {} not durable", key);
                    }
                }
            }
        }
    }
}
