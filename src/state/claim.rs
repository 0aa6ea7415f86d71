//! Which changelog records count: claims and owners (at-least-once mode).
//!
//! An owner that froze, or lost its partition without knowing, can have
//! marker writes queued in its producer that land after the next owner took
//! over. Such a late marker is older than the new owner's and, being the
//! key's last record, would win the changelog's compaction: the next
//! restore would seed the key with it, and compensation could re-push a
//! value older than one already pushed.
//!
//! So every owner first writes a **claim** record (its own unique key, so
//! compaction keeps every claim) and restores through it; the claim's
//! offset is the owner's id, and every marker it writes carries that id in
//! its [`OWNER_HEADER`]. Claim offsets grow with each takeover, so a
//! restore keeps the newest claim seen so far and a record whose owner is
//! older than it was written after another owner took over: it does not
//! count ([`Claims::counts`]). A key whose last record did not count is
//! *shadowed*: the new owner writes its marker again, so the late record is
//! not the key's last once compaction runs.
//!
//! Records without an owner (written before claims existed, by `replay`, or
//! under exactly-once, whose fencing keeps late writes out of what a
//! `read_committed` restore reads) always count.

use std::collections::HashSet;

use bytes::Bytes;

/// Marks a claim record (its value says which application and process
/// claimed the partition, and when, for people reading it).
pub const CLAIM_HEADER: &str = "keyflight-claim";
/// On a marker record: the offset of its writer's claim.
pub const OWNER_HEADER: &str = "keyflight-owner";

/// The key of a claim record: unique per claim (the time and a random
/// number), so compaction never removes one.
pub fn claim_key(now_ns: u64) -> Vec<u8> {
    format!("keyflight-claim/{now_ns:x}-{:016x}", rand::random::<u64>()).into_bytes()
}

/// An owner id as its header carries it.
pub fn owner_header(claim: i64) -> String {
    claim.to_string()
}

/// An owner header's id; `None` for a value that is not one (counted as a
/// record without an owner).
pub fn parse_owner(value: &[u8]) -> Option<i64> {
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// The fold of a changelog's records, in offset order, into which count.
#[derive(Debug, Default)]
pub struct Claims {
    /// The newest claim's offset (its owner's id) seen so far.
    current: Option<i64>,
    /// The claim of the checkpoint the fold started from.
    checkpoint: Option<i64>,
    /// Keys whose last record read did not count.
    shadowed: HashSet<Bytes>,
    /// A record of the checkpoint's own writer did not count.
    store_suspect: bool,
}

impl Claims {
    /// A fold that starts at a checkpoint written while `claim` was the
    /// newest claim (`None`: from the start, or a checkpoint without one).
    pub fn from(claim: Option<i64>) -> Claims {
        Claims {
            current: claim,
            checkpoint: claim,
            ..Claims::default()
        }
    }

    /// A claim record at `offset`.
    pub fn claim(&mut self, offset: i64) {
        self.current = self.current.max(Some(offset));
    }

    /// Whether a marker record of `key` written by `owner` counts; one
    /// that does not shadows its key until the key's next record that does.
    pub fn counts(&mut self, key: &[u8], owner: Option<i64>) -> bool {
        let counts = match owner {
            Some(owner) if self.current.is_some_and(|current| owner < current) => false,
            Some(owner) => {
                // An owner's records follow its claim, so its id is a
                // claim too (the claim record may be before the range read).
                self.claim(owner);
                true
            }
            None => true,
        };
        if counts {
            self.shadowed.remove(key);
        } else {
            self.shadowed.insert(Bytes::copy_from_slice(key));
            self.store_suspect |= owner.is_some() && owner == self.checkpoint;
        }
        counts
    }

    /// Whether the store the fold started from may hold records that do
    /// not count: the checkpoint's writer went on writing its store after
    /// another owner claimed the partition (it had lost it without
    /// knowing), and a restore skips those records rather than overwrite
    /// them. Such a store must be restored in full.
    pub fn store_suspect(&self) -> bool {
        self.store_suspect
    }

    /// The newest claim seen (what a checkpoint at this point records).
    pub fn current(&self) -> Option<i64> {
        self.current
    }

    /// The keys whose last record did not count, sorted.
    pub fn into_shadowed(self) -> Vec<Bytes> {
        let mut keys: Vec<Bytes> = self.shadowed.into_iter().collect();
        keys.sort();
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_of_an_owner_older_than_the_newest_claim_does_not_count() {
        let mut claims = Claims::from(None);
        assert!(claims.counts(b"legacy", None), "no owner: counts");
        claims.claim(10);
        assert!(claims.counts(b"k", Some(10)));
        claims.claim(20);
        assert!(claims.counts(b"k", Some(20)));
        assert!(!claims.counts(b"k", Some(10)), "written after 20 took over");
        assert!(!claims.counts(b"j", Some(10)));
        assert!(
            claims.counts(b"j", Some(20)),
            "j's next record counts again"
        );
        assert!(claims.counts(b"n", None), "no owner: counts");
        assert_eq!(claims.current(), Some(20));
        assert_eq!(claims.into_shadowed(), [Bytes::from_static(b"k")]);
    }

    #[test]
    fn an_owners_record_stands_for_its_claim_when_the_claim_was_not_read() {
        // From a checkpoint written under claim 10; claim 20 lies before
        // the range read, and its owner's record is the first one.
        let mut claims = Claims::from(Some(10));
        assert!(claims.counts(b"a", Some(20)));
        assert!(!claims.counts(b"b", Some(10)));
        assert_eq!(claims.current(), Some(20));
    }

    #[test]
    fn a_late_record_of_the_checkpoints_writer_makes_its_store_suspect() {
        let mut claims = Claims::from(Some(10));
        claims.claim(20);
        assert!(!claims.counts(b"a", Some(5)), "an older owner's");
        assert!(!claims.store_suspect(), "never wrote this store");
        assert!(!claims.counts(b"a", Some(10)));
        assert!(claims.store_suspect(), "the writer of this store went on");
    }

    #[test]
    fn owner_headers_round_trip_and_garbage_is_no_owner() {
        assert_eq!(parse_owner(owner_header(42).as_bytes()), Some(42));
        assert_eq!(parse_owner(b"x"), None);
        assert_ne!(claim_key(1), claim_key(1), "unique even at the same time");
    }
}
