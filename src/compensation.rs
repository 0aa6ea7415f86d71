//! The compensation scan: which open markers are due for a re-push.
//!
//! The article's safety net: a marker with `t1 != t2` had a push that did not
//! finish (a crash, a failed produce) or was overtaken. Every
//! `compensation.interval`, each partition task re-pushes the stored value
//! of its open markers older than `compensation.grace`, through its
//! singleflight table (so never concurrently with a normal push of the key,
//! and skipped while the key is in flight). The scan reads the store's index
//! of open markers only: its cost is O(open markers), not O(keys).

use bytes::Bytes;

#[cfg(test)]
use crate::state::Store;
use crate::state::{Marker, MarkerStore, StateError};

/// Open markers whose push started at least `grace_ns` before `now_ns`.
pub fn due(
    store: &impl MarkerStore,
    now_ns: u64,
    grace_ns: u64,
) -> Result<Vec<(Bytes, Marker)>, StateError> {
    store.open_markers(now_ns.saturating_sub(grace_ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_open_markers_past_the_grace_period_are_due() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let m = |t1, t2| Marker {
            t1,
            t2,
            version: 1,
            value: None,
            offset: None,
            value_cut: false,
        };
        store.put(b"closed", &m(100, 100)).unwrap();
        store.put(b"old-open", &m(100, 50)).unwrap();
        store.put(b"young-open", &m(950, 100)).unwrap();
        let due: Vec<_> = due(&store, 1_000, 100)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(due, [&b"old-open"[..]]);
    }
}
