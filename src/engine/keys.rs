//! The singleflight table's index of known keys: an open-addressing hash
//! table whose buckets are the keys' entries (one cache line each), with
//! linear probing, removal without tombstones and recycled ids.

use std::hash::{BuildHasher, Hasher};

/// How the table stores keys: inline up to 24 bytes, so a lookup compares
/// bytes in the entry itself instead of chasing a pointer.
type StoredKey = smallvec::SmallVec<[u8; 24]>;

/// Per known key: one bucket of [`Keys`], a cache line.
#[derive(Debug, Default)]
#[repr(align(64))]
pub(super) struct Entry {
    pub(super) key: StoredKey,
    /// Newest version accepted for this key (pushed, in flight or pending),
    /// meaningful when `versioned`.
    pub(super) newest_version: u64,
    /// Last tn handed out, so tn never goes backwards for the key.
    pub(super) last_tn: u64,
    /// The high half of the key's hash with the top bit set; 0 in an empty
    /// bucket.
    pub(super) tag: u32,
    /// 1 + the index of the key's `Active` state (`super::table`) in the slab; 0 when idle.
    pub(super) slot: u32,
    /// The key's number, in the order keys became known (stable, unlike the
    /// bucket, which moves when the table grows).
    pub(super) id: u32,
    pub(super) versioned: bool,
    /// Used since the eviction hand last passed (spared once, CLOCK).
    pub(super) referenced: bool,
    /// Never evicted: what it holds is not in its marker (see [`Table::pin`](super::table::Table::pin)).
    pub(super) pinned: bool,
}

// One entry per cache line.
const _: () = assert!(std::mem::size_of::<Entry>() == 64);

impl Entry {
    #[inline]
    pub(super) fn newest(&self) -> Option<u64> {
        self.versioned.then_some(self.newest_version)
    }

    #[inline]
    pub(super) fn set_newest(&mut self, version: u64) {
        self.newest_version = version;
        self.versioned = true;
    }

    /// `tn = max(now, last_tn + 1)`, recorded as the key's last.
    #[inline]
    pub(super) fn next_tn(&mut self, now_ns: u64) -> u64 {
        let tn = now_ns.max(self.last_tn + 1);
        self.last_tn = tn;
        tn
    }
}

/// The known keys: an open-addressing hash table with linear probing whose
/// buckets are the entries themselves, so finding a key costs one cache
/// line (its bucket) rather than an index slot and then the entry. Each call
/// hashes the key once (ahash, randomly seeded); a probe compares the key
/// only when the 32-bit tag matches. At most [`Keys::MAX_LOAD`] full, so
/// a known key costs 128 to 256 bytes here (a `hashbrown` map of the previous
/// 96-byte entries: 110 to 220). Idle keys beyond
/// [`TableConfig::cached_keys`](super::table::TableConfig::cached_keys) are removed (see
/// `Table::evict_one`).
#[derive(Debug)]
pub(super) struct Keys {
    hasher: ahash::RandomState,
    pub(super) buckets: Vec<Entry>,
    pub(super) len: usize,
    /// Ids of removed keys, handed to new ones (so the per-id vectors stay
    /// as long as the most keys ever known at once).
    free_ids: Vec<u32>,
    next_id: u32,
}

impl Keys {
    const INITIAL_BUCKETS: usize = 16;
    /// Maximum load factor, as a fraction (numerator, denominator).
    const MAX_LOAD: (usize, usize) = (1, 2);

    pub(super) fn new() -> Self {
        Self {
            hasher: ahash::RandomState::new(),
            buckets: empty_buckets(Self::INITIAL_BUCKETS),
            len: 0,
            free_ids: Vec::new(),
            next_id: 0,
        }
    }

    #[inline(always)]
    fn hash(&self, key: &[u8]) -> u64 {
        let mut hasher = self.hasher.build_hasher();
        hasher.write(key);
        hasher.finish()
    }

    #[inline(always)]
    fn tag(hash: u64) -> u32 {
        (hash >> 32) as u32 | 1 << 31
    }

    /// `Ok(bucket)` of `key`, or `Err(empty bucket)` where it would go.
    #[inline(always)]
    fn find(&self, key: &[u8], hash: u64) -> Result<usize, usize> {
        let mask = self.buckets.len() - 1;
        let tag = Self::tag(hash);
        let mut pos = hash as usize & mask;
        loop {
            let entry = &self.buckets[pos];
            if entry.tag == tag && same_key(&entry.key, key) {
                return Ok(pos);
            }
            if entry.tag == 0 {
                return Err(pos);
            }
            pos = (pos + 1) & mask;
        }
    }

    /// The bucket of `key`, if known.
    #[inline(always)]
    pub(super) fn get(&self, key: &[u8]) -> Option<usize> {
        self.find(key, self.hash(key)).ok()
    }

    /// The bucket of `key`, and whether the key is new (created idle).
    #[inline(always)]
    pub(super) fn get_or_insert(&mut self, key: &[u8]) -> (usize, bool) {
        let hash = self.hash(key);
        match self.find(key, hash) {
            Ok(pos) => (pos, false),
            Err(pos) => (self.insert(key, hash, pos), true),
        }
    }

    #[cold]
    #[inline(never)]
    fn insert(&mut self, key: &[u8], hash: u64, mut pos: usize) -> usize {
        assert!(self.len < u32::MAX as usize, "too many keys for one table");
        let (num, den) = Self::MAX_LOAD;
        if (self.len + 1) * den > self.buckets.len() * num {
            self.grow();
            pos = self
                .find(key, hash)
                .expect_err("a new key is not in the table");
        }
        let id = self.free_ids.pop().unwrap_or_else(|| {
            self.next_id += 1;
            self.next_id - 1
        });
        self.buckets[pos] = Entry {
            key: StoredKey::from_slice(key),
            tag: Self::tag(hash),
            id,
            ..Entry::default()
        };
        self.len += 1;
        pos
    }

    /// Removes the entry at `pos` and returns it. Linear probing without
    /// tombstones: each entry after it in its cluster moves back into the
    /// gap unless that would put it before its home bucket.
    pub(super) fn remove(&mut self, mut pos: usize) -> Entry {
        let mask = self.buckets.len() - 1;
        let removed = std::mem::take(&mut self.buckets[pos]);
        let mut next = (pos + 1) & mask;
        while self.buckets[next].tag != 0 {
            let home = self.hash(&self.buckets[next].key) as usize & mask;
            // Its home lies outside (pos, next] (cyclically): it may move to pos.
            if next.wrapping_sub(home) & mask >= next.wrapping_sub(pos) & mask {
                self.buckets[pos] = std::mem::take(&mut self.buckets[next]);
                pos = next;
            }
            next = (next + 1) & mask;
        }
        self.len -= 1;
        self.free_ids.push(removed.id);
        removed
    }

    fn grow(&mut self) {
        let bigger = empty_buckets(self.buckets.len() * 2);
        let old = std::mem::replace(&mut self.buckets, bigger);
        let mask = self.buckets.len() - 1;
        for entry in old.into_iter().filter(|entry| entry.tag != 0) {
            let mut pos = self.hash(&entry.key) as usize & mask;
            while self.buckets[pos].tag != 0 {
                pos = (pos + 1) & mask;
            }
            self.buckets[pos] = entry;
        }
    }
}

fn empty_buckets(n: usize) -> Vec<Entry> {
    std::iter::repeat_with(Entry::default).take(n).collect()
}

/// Byte equality, without a `memcmp` call for the usual short keys.
#[inline(always)]
fn same_key(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    let word = |s: &[u8], at: usize| u64::from_ne_bytes(s[at..at + 8].try_into().unwrap());
    let half = |s: &[u8], at: usize| u32::from_ne_bytes(s[at..at + 4].try_into().unwrap());
    match n {
        // Two overlapping loads cover the key.
        8..=16 => word(a, 0) == word(b, 0) && word(a, n - 8) == word(b, n - 8),
        4..=7 => half(a, 0) == half(b, 0) && half(a, n - 4) == half(b, n - 4),
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Removal without tombstones keeps every other key findable, also
        /// across growth and wrap-around clusters (a 16-bucket start).
        #[test]
        fn removed_keys_are_gone_and_the_rest_stay_findable(
            ops in proptest::collection::vec((0u16..64, proptest::bool::ANY), 1..400)
        ) {
            let mut keys = Keys::new();
            let mut model = std::collections::BTreeSet::new();
            for (k, insert) in ops {
                let key = k.to_be_bytes();
                if insert {
                    keys.get_or_insert(&key);
                    model.insert(k);
                } else if let Some(pos) = keys.get(&key) {
                    keys.remove(pos);
                    model.remove(&k);
                }
                proptest::prop_assert_eq!(keys.len, model.len());
                for k in 0u16..64 {
                    proptest::prop_assert_eq!(keys.get(&k.to_be_bytes()).is_some(), model.contains(&k));
                }
            }
            let mut ids: Vec<u32> = keys.buckets.iter().filter(|e| e.tag != 0).map(|e| e.id).collect();
            ids.sort_unstable();
            ids.dedup();
            proptest::prop_assert_eq!(ids.len(), model.len(), "ids are unique");
        }
    }
}
