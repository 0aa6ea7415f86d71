//! Whether a task's changelog partition gets writes other than its own
//! after its claim (see [`crate::state::claim`]). Pure bookkeeping, no I/O:
//! the task reports where its writes landed, asks to read the offsets in
//! between, and sorts what another writer put there.
//!
//! The producer acknowledges a task's writes in order, each at its own
//! offset, so an acknowledged offset past the next one expected shows
//! another writer's records in between.

use bytes::Bytes;

/// A changelog record another writer put between a task's own.
#[derive(Debug, Clone)]
pub struct OtherRecord {
    pub offset: i64,
    pub key: Bytes,
    /// A claim record.
    pub claim: bool,
    /// The owner a marker record names.
    pub owner: Option<i64>,
}

/// What another writer's records mean for the task.
#[derive(Debug, PartialEq, Eq)]
pub enum Others {
    /// A claim or a record of a newer owner, at this offset: another
    /// instance took the partition over without the task hearing of it.
    Superseded(i64),
    /// The keys of an earlier owner's late writes (which do not count).
    Late(Vec<Bytes>),
}

#[derive(Debug)]
pub struct ClaimWatch {
    /// The claim's offset: the task's owner id.
    claim: i64,
    /// Where the task's next acknowledged write lands if nobody else writes.
    expected: i64,
    /// Reads of another writer's records asked for and not answered.
    unread: u32,
}

impl ClaimWatch {
    /// A task that claimed its partition at `claim` and whose store is
    /// complete up to `restored` (exclusive), at least through its claim.
    pub fn new(claim: i64, restored: i64) -> ClaimWatch {
        ClaimWatch {
            claim,
            expected: restored.max(claim + 1),
            unread: 0,
        }
    }

    /// The task's write landed at `offset`: the offsets another writer
    /// took before it (`from..to`), if any, which the task should read.
    pub fn acknowledged(&mut self, offset: i64) -> Option<(i64, i64)> {
        let others = (offset > self.expected).then_some((self.expected, offset));
        if others.is_some() {
            self.unread += 1;
        }
        self.expected = self.expected.max(offset + 1);
        others
    }

    /// Whether records of another writer wait to be read (they may be a
    /// newer owner's, whose writes the task's store lacks).
    pub fn unread(&self) -> bool {
        self.unread > 0
    }

    /// A read asked for by [`ClaimWatch::acknowledged`] came back.
    pub fn read(&mut self, records: &[OtherRecord]) -> Others {
        self.unread = self.unread.saturating_sub(1);
        let mine = self.claim;
        if let Some(newer) = records
            .iter()
            .find(|r| r.claim || r.owner.is_some_and(|owner| owner > mine))
        {
            return Others::Superseded(newer.offset);
        }
        Others::Late(
            records
                .iter()
                .filter(|r| r.owner.is_some_and(|owner| owner < mine))
                .map(|r| r.key.clone())
                .collect(),
        )
    }

    /// The claim's offset.
    pub fn claim(&self) -> i64 {
        self.claim
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(offset: i64, claim: bool, owner: Option<i64>) -> OtherRecord {
        OtherRecord {
            offset,
            key: Bytes::from(format!("k{offset}")),
            claim,
            owner,
        }
    }

    #[test]
    fn a_write_past_the_expected_offset_asks_for_the_gap_once() {
        let mut watch = ClaimWatch::new(9, 0);
        assert_eq!(watch.acknowledged(10), None, "right after the claim");
        assert_eq!(watch.acknowledged(13), Some((11, 13)));
        assert!(watch.unread());
        assert_eq!(watch.acknowledged(14), None);
        let late = watch.read(&[record(11, false, Some(3)), record(12, false, Some(9))]);
        assert_eq!(late, Others::Late(vec![Bytes::from("k11")]), "not its own");
        assert!(!watch.unread());
    }

    #[test]
    fn a_claim_or_a_newer_owner_supersedes_the_task() {
        let mut watch = ClaimWatch::new(9, 20);
        assert_eq!(
            watch.acknowledged(21),
            Some((20, 21)),
            "from the restore's end"
        );
        assert_eq!(
            watch.read(&[record(20, true, None)]),
            Others::Superseded(20)
        );
        assert_eq!(
            watch.read(&[record(3, false, Some(2)), record(4, false, Some(15))]),
            Others::Superseded(4)
        );
    }
}
