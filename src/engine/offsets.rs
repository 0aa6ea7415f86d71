//! Offset coverage for one partition: which position is safe to commit.
//!
//! Every offset the processor takes in is *tracked*; it becomes *done* when
//! its effect is durable downstream (the push that carries it was
//! acknowledged, it was dropped as stale, or its dead letter was written).
//! The commit position is the smallest tracked offset that is not done yet,
//! or one past the highest tracked offset when everything is done.
//!
//! Offsets become done in *groups*: all the events one push carries are
//! acknowledged together. So the tracker keeps one entry per group (its
//! first, i.e. smallest, offset and whether it is done), not one per offset:
//! a group's later offsets are all above its first, and the position never
//! passes an open group's first offset. Offsets arrive in increasing order but
//! may have gaps (compaction, transaction markers), which cost nothing here.

use std::collections::VecDeque;

/// Tracks in-progress offsets of one partition. Pure data, no I/O.
#[derive(Debug, Default, Clone)]
pub struct OffsetTracker {
    /// Groups from the oldest not-done one upwards, in offset order: first
    /// offset and done flag.
    window: VecDeque<(i64, bool)>,
    /// Sequence number of `window[0]` (groups are numbered as they open).
    front: u64,
    /// One past the highest offset tracked so far.
    next: Option<i64>,
}

/// A group of offsets that become done together, opened by
/// [`OffsetTracker::open`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Group(u64);

/// An offset handed to the tracker out of order (not above the last one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("offset {offset} is not above the last tracked offset {last}")]
pub struct OutOfOrder {
    pub offset: i64,
    pub last: i64,
}

impl OffsetTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts tracking `offset`; it holds the commit position until
    /// [`complete`](Self::complete) is called for it.
    pub fn track(&mut self, offset: i64) -> Result<(), OutOfOrder> {
        self.open(offset).map(drop)
    }

    /// Tracks an offset that is already done (a stale event, for instance).
    #[inline]
    pub fn track_done(&mut self, offset: i64) -> Result<(), OutOfOrder> {
        self.advance(offset)
    }

    /// Marks a tracked offset done. Returns false when the offset is not
    /// outstanding (never tracked, already done, or a later member of a
    /// group rather than its first).
    pub fn complete(&mut self, offset: i64) -> bool {
        let Ok(index) = self.window.binary_search_by_key(&offset, |&(o, _)| o) else {
            return false;
        };
        self.close(Group(self.front + index as u64))
    }

    /// Starts tracking `offset` as the first of a new group: it and the
    /// offsets later [`join`](Self::join)ed to the group hold the commit
    /// position until [`close`](Self::close) is called for it.
    #[inline]
    pub fn open(&mut self, offset: i64) -> Result<Group, OutOfOrder> {
        self.advance(offset)?;
        self.window.push_back((offset, false));
        Ok(Group(self.front + self.window.len() as u64 - 1))
    }

    /// Tracks `offset` as a member of a group that is open: it becomes done
    /// when that group closes. (Every open group's first offset is below it,
    /// so it needs no entry of its own.)
    #[inline]
    pub fn join(&mut self, offset: i64) -> Result<(), OutOfOrder> {
        self.advance(offset)
    }

    /// Marks every offset of the group done. Returns false when the group
    /// was already closed.
    #[inline]
    pub fn close(&mut self, group: Group) -> bool {
        let Some(index) = group.0.checked_sub(self.front) else {
            return false;
        };
        match self.window.get_mut(index as usize) {
            Some((_, done)) if !*done => *done = true,
            _ => return false,
        }
        while matches!(self.window.front(), Some(&(_, true))) {
            self.window.pop_front();
            self.front += 1;
        }
        true
    }

    /// The position safe to commit: the smallest offset not yet done, or one
    /// past the highest tracked offset. `None` before anything was tracked.
    #[inline]
    pub fn position(&self) -> Option<i64> {
        match self.window.front() {
            Some(&(offset, _)) => Some(offset),
            None => self.next,
        }
    }

    /// How many groups (single offsets tracked with [`track`](Self::track),
    /// or groups opened with [`open`](Self::open)) are not done.
    pub fn outstanding(&self) -> usize {
        self.window.iter().filter(|(_, done)| !done).count()
    }

    /// Whether `offset` may be tracked next (it is above every tracked one).
    #[inline]
    pub fn check(&self, offset: i64) -> Result<(), OutOfOrder> {
        match self.next {
            Some(next) if offset < next => Err(OutOfOrder {
                offset,
                last: next - 1,
            }),
            _ => Ok(()),
        }
    }

    #[inline]
    fn advance(&mut self, offset: i64) -> Result<(), OutOfOrder> {
        self.check(offset)?;
        self.next = Some(offset + 1);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn empty_tracker_has_no_position() {
        assert_eq!(OffsetTracker::new().position(), None);
    }

    #[test]
    fn position_waits_for_the_oldest_outstanding_offset() {
        let mut t = OffsetTracker::new();
        for o in [10, 11, 12] {
            t.track(o).unwrap();
        }
        assert_eq!(t.position(), Some(10));
        assert!(t.complete(11));
        assert_eq!(t.position(), Some(10));
        assert!(t.complete(10));
        assert_eq!(t.position(), Some(12));
        assert!(t.complete(12));
        assert_eq!(t.position(), Some(13));
        assert_eq!(t.outstanding(), 0);
    }

    #[test]
    fn done_offsets_and_gaps_move_the_position() {
        let mut t = OffsetTracker::new();
        t.track_done(5).unwrap();
        assert_eq!(t.position(), Some(6));
        t.track(9).unwrap();
        t.track_done(20).unwrap();
        assert_eq!(t.position(), Some(9));
        t.complete(9);
        assert_eq!(t.position(), Some(21));
    }

    #[test]
    fn out_of_order_and_unknown_offsets_are_refused() {
        let mut t = OffsetTracker::new();
        t.track(3).unwrap();
        assert_eq!(t.track(3), Err(OutOfOrder { offset: 3, last: 3 }));
        assert!(!t.complete(4));
        assert!(t.complete(3));
        assert!(!t.complete(3), "completing twice is refused");
    }

    #[test]
    fn a_group_holds_the_position_at_its_first_offset_until_it_closes() {
        let mut t = OffsetTracker::new();
        let a = t.open(10).unwrap();
        let b = t.open(11).unwrap();
        t.join(12).unwrap(); // joins a (or b: either holds the position below it)
        t.track_done(13).unwrap();
        assert_eq!(
            t.join(12),
            Err(OutOfOrder {
                offset: 12,
                last: 13
            })
        );
        assert!(t.close(b));
        assert_eq!(t.position(), Some(10));
        assert!(t.close(a));
        assert_eq!(t.position(), Some(14));
        assert!(!t.close(a), "closing twice is refused");
        assert!(!t.close(b));
    }

    proptest! {
        /// Groups against a brute-force model: every offset of an open group
        /// is outstanding; the position is the smallest outstanding offset,
        /// or one past the highest tracked.
        #[test]
        fn groups_match_a_brute_force_model(
            steps in proptest::collection::vec((0u8..4, 1i64..4, any::<prop::sample::Index>()), 1..300)
        ) {
            let mut t = OffsetTracker::new();
            // Open groups: handle and member offsets.
            let mut open: Vec<(Group, Vec<i64>)> = Vec::new();
            let mut next = 0i64;
            for (op, gap, pick) in steps {
                let offset = next + gap - 1;
                match op {
                    0 => {
                        open.push((t.open(offset).unwrap(), vec![offset]));
                        next = offset + 1;
                    }
                    1 if !open.is_empty() => {
                        t.join(offset).unwrap();
                        let member = pick.index(open.len());
                        open[member].1.push(offset);
                        next = offset + 1;
                    }
                    2 if !open.is_empty() => {
                        let (group, _) = open.remove(pick.index(open.len()));
                        prop_assert!(t.close(group));
                        prop_assert!(!t.close(group));
                    }
                    _ => {
                        t.track_done(offset).unwrap();
                        next = offset + 1;
                    }
                }
                let expected = open.iter().flat_map(|(_, o)| o).min().copied().unwrap_or(next);
                prop_assert_eq!(t.position(), Some(expected));
                prop_assert_eq!(t.outstanding(), open.len());
            }
        }


        /// Against a brute-force model: the position is the smallest
        /// outstanding offset, or one past the highest tracked.
        #[test]
        fn position_matches_a_brute_force_model(
            steps in proptest::collection::vec((1i64..4, any::<bool>(), any::<prop::sample::Index>()), 1..200)
        ) {
            let mut t = OffsetTracker::new();
            let mut outstanding: Vec<i64> = Vec::new();
            let mut next = 0i64;
            for (gap, complete_one, pick) in steps {
                let offset = next + gap - 1;
                next = offset + 1;
                t.track(offset).unwrap();
                outstanding.push(offset);
                if complete_one && !outstanding.is_empty() {
                    let victim = outstanding.remove(pick.index(outstanding.len()));
                    prop_assert!(t.complete(victim));
                }
                let expected = outstanding.iter().min().copied().unwrap_or(next);
                prop_assert_eq!(t.position(), Some(expected));
                prop_assert_eq!(t.outstanding(), outstanding.len());
            }
        }
    }
}
