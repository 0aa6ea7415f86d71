//! Durable per-partition state: one RocksDB store per assigned partition,
//! under `<state_dir>/<application_id>/<topic>-<partition>`.
//!
//! * column family `markers`: key → encoded [`Marker`];
//! * column family `open`: the index of markers that need attention,
//!   mirrored in memory while the store is open: key → t1 (8 bytes,
//!   big-endian) for an open marker, key → t2 and `D` (9 bytes) for a
//!   delete's closed marker (kept for `deletes.retention`). So the
//!   compensation scan and the sweep of old deletes cost O(their markers),
//!   not O(keys): RocksDB iterators step over every delete tombstone, and
//!   closing a marker deletes its index entry, so a scan of the column
//!   family would grow with the keys ever pushed.
//!
//! Writes are held in memory, the newest per key, and applied to RocksDB as
//! one batch once [`PENDING_LIMIT`] keys have changed, and before every
//! checkpoint: a key written twice in between reaches RocksDB as one
//! write. Reads see the held writes first.
//!
//! The changelog topic is the durable log, so RocksDB's WAL is off, and the
//! task writes a marker here only once the changelog acknowledged it: what a
//! crash leaves on disk is never ahead of the changelog. Flushes are atomic
//! across the two column families (RocksDB's `atomic_flush`), so the `open`
//! index on disk always agrees with `markers`. The
//! checkpoint file records the changelog offset the store is complete up to;
//! it is written only after a flush (on revoke and shutdown, and with a
//! commit at most every 30 s) and removed when the store opens. A crash
//! before the first checkpoint of a run leaves none, and the next open starts
//! from an empty store and restores the whole changelog, as Kafka Streams
//! does; later, the next open replays the changelog from the last checkpoint.

pub mod claim;
pub mod marker;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;
use rocksdb::{ColumnFamilyDescriptor, Options, WriteBatch, WriteOptions, DB};

pub use marker::{Marker, MarkerCodec, MarkerDecodeError};

const MARKERS: &str = "markers";
const OPEN: &str = "open";
const CHECKPOINT: &str = "checkpoint";
/// The last byte of a delete's entry in the `open` family (after its t2).
const DELETED: u8 = b'D';

/// Changed keys held in memory before they are applied to RocksDB as one
/// batch (a few milliseconds of inserts: small enough not to stall the
/// partition's loop for long).
pub const PENDING_LIMIT: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state store {path}: {source}")]
    Rocks {
        path: PathBuf,
        source: rocksdb::Error,
    },
    #[error("state store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state store {path}: key {key:?}: {source}")]
    Corrupt {
        path: PathBuf,
        key: String,
        source: MarkerDecodeError,
    },
}

/// Memtable bytes of every store of the process together: past this, the
/// largest memtables are flushed, so memory does not grow with the number
/// of assigned partitions.
const WRITE_BUFFERS: usize = 64 << 20;

fn write_buffers() -> &'static rocksdb::WriteBufferManager {
    static MANAGER: std::sync::OnceLock<rocksdb::WriteBufferManager> = std::sync::OnceLock::new();
    MANAGER
        .get_or_init(|| rocksdb::WriteBufferManager::new_write_buffer_manager(WRITE_BUFFERS, false))
}

/// Memory per store is bounded, because a process holds one per assigned
/// partition: memtables of `write_buffer` bytes (two at most), and one block
/// cache shared by every store of the process instead of RocksDB's default
/// of one per store.
fn family_options(write_buffer: usize) -> Options {
    static CACHE: std::sync::OnceLock<rocksdb::Cache> = std::sync::OnceLock::new();
    let cache = CACHE.get_or_init(|| rocksdb::Cache::new_lru_cache(32 << 20));
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_block_cache(cache);
    // Most reads are of keys a partition has not seen yet: a bloom filter
    // answers those without reading a block.
    table.set_bloom_filter(10.0, false);
    let mut options = Options::default();
    // The same for the memtable, where a partition's recent keys are: a
    // miss skips the skiplist search (2 % of bits of the write buffer: about
    // 20 bits per marker).
    options.set_memtable_prefix_bloom_ratio(0.02);
    options.set_memtable_whole_key_filtering(true);
    options.set_write_buffer_size(write_buffer);
    options.set_max_write_buffer_number(2);
    options.set_block_based_table_factory(&table);
    options
}

/// What a partition task's core needs of its store: the markers by key,
/// the index of open ones, and their changelog encoding. [`Store`] is the
/// real one; the task simulation puts a model with crash semantics in its
/// place.
pub trait MarkerStore {
    fn get(&self, key: &[u8]) -> Result<Option<Marker>, StateError>;
    fn put(&self, key: &[u8], marker: &Marker) -> Result<(), StateError>;
    fn delete(&self, key: &[u8]) -> Result<(), StateError>;
    /// Open markers whose t1 is at or before `started_before`, in key order.
    fn open_markers(&self, started_before: u64) -> Result<Vec<(Bytes, Marker)>, StateError>;
    fn open_count(&self) -> usize;
    /// Keys whose marker is a delete's, acknowledged at or before
    /// `acknowledged_before`, in key order.
    fn deleted_before(&self, acknowledged_before: u64) -> Vec<Bytes>;
    /// One step of a walk over every marker in key order: of up to `limit`
    /// markers after key `after` (`None`: from the first), the keys of the
    /// closed ones (no delete's) acknowledged at or before
    /// `acknowledged_before`, and where the next step starts (`None`: the
    /// walk reached the end).
    fn closed_before(
        &self,
        after: Option<&[u8]>,
        acknowledged_before: u64,
        limit: usize,
    ) -> Result<(Vec<Bytes>, Option<Bytes>), StateError>;
    /// The changelog encoding of a marker.
    fn encode(&self, marker: &Marker) -> Vec<u8>;
}

impl MarkerStore for Store {
    fn get(&self, key: &[u8]) -> Result<Option<Marker>, StateError> {
        Store::get(self, key)
    }
    fn put(&self, key: &[u8], marker: &Marker) -> Result<(), StateError> {
        Store::put(self, key, marker)
    }
    fn delete(&self, key: &[u8]) -> Result<(), StateError> {
        Store::delete(self, key)
    }
    fn open_markers(&self, started_before: u64) -> Result<Vec<(Bytes, Marker)>, StateError> {
        Store::open_markers(self, started_before)
    }
    fn deleted_before(&self, acknowledged_before: u64) -> Vec<Bytes> {
        Store::deleted_before(self, acknowledged_before)
    }
    fn closed_before(
        &self,
        after: Option<&[u8]>,
        acknowledged_before: u64,
        limit: usize,
    ) -> Result<(Vec<Bytes>, Option<Bytes>), StateError> {
        Store::closed_before(self, after, acknowledged_before, limit)
    }
    fn open_count(&self) -> usize {
        self.memory().open.len()
    }
    fn encode(&self, marker: &Marker) -> Vec<u8> {
        Store::encode(self, marker)
    }
}

/// The store of one partition.
pub struct Store {
    db: DB,
    path: PathBuf,
    codec: MarkerCodec,
    no_wal: WriteOptions,
    memory: Mutex<Memory>,
    /// The newest changelog claim when the checkpoint it opened from was
    /// written (see [`claim`]).
    checkpoint_claim: Option<i64>,
}

/// What the store keeps in memory (behind one lock: a store belongs to one
/// partition task, so it is never contended).
#[derive(Default)]
struct Memory {
    /// The open markers, key → t1: RocksDB's `open` family as it will be
    /// once `pending` is applied.
    open: HashMap<Vec<u8>, u64, ahash::RandomState>,
    /// The deletes' closed markers, key → t2.
    deleted: HashMap<Vec<u8>, u64, ahash::RandomState>,
    /// Writes not yet in RocksDB: the newest marker per key (`None`: deleted).
    pending: HashMap<Vec<u8>, Option<Marker>, ahash::RandomState>,
    /// Keys that have an entry in RocksDB's `open` family (so changing them
    /// deletes it, and changing others writes no tombstone).
    open_on_disk: HashSet<Vec<u8>, ahash::RandomState>,
}

/// How a store was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// A clean checkpoint: restore the changelog from this offset.
    FromCheckpoint(i64),
    /// No checkpoint (first start or unclean stop): the store was wiped;
    /// restore the whole changelog.
    Empty,
}

/// A checkpoint file's next offset and claim: one number a line, the
/// claim's line absent in checkpoints written before claims existed.
fn parse_checkpoint(text: &str) -> (Option<i64>, Option<i64>) {
    let mut lines = text.lines().map(|line| line.trim().parse::<i64>().ok());
    let next = lines.next().flatten();
    (next, next.and(lines.next().flatten()))
}

impl Store {
    /// The directory of one partition's store.
    pub fn dir(state_dir: &Path, application_id: &str, topic: &str, partition: i32) -> PathBuf {
        state_dir
            .join(application_id)
            .join(format!("{topic}-{partition}"))
    }

    /// The partitions of `topic` that have a store under `state_dir`, sorted.
    pub fn existing(state_dir: &Path, application_id: &str, topic: &str) -> Vec<(i32, PathBuf)> {
        let prefix = format!("{topic}-");
        let mut found: Vec<(i32, PathBuf)> = std::fs::read_dir(state_dir.join(application_id))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let partition = name.strip_prefix(&prefix)?.parse().ok()?;
                Some((partition, entry.path()))
            })
            .collect();
        found.sort();
        found
    }

    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: &Path) -> Result<(Store, Opened), StateError> {
        let io = |source| StateError::Io {
            path: path.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(path).map_err(io)?;
        let checkpoint_path = path.join(CHECKPOINT);
        let (checkpoint, checkpoint_claim) = match std::fs::read_to_string(&checkpoint_path) {
            Ok(text) => parse_checkpoint(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (None, None),
            Err(e) => return Err(io(e)),
        };
        let db_path = path.join("db");
        let rocks = |source| StateError::Rocks {
            path: db_path.clone(),
            source,
        };
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        options.set_write_buffer_manager(write_buffers());
        // Without a WAL, a column family flushed alone (a full memtable)
        // would leave the other's matching writes to die with the process.
        options.set_atomic_flush(true);
        if checkpoint.is_none() {
            // Whatever is there may be older or newer than the changelog: start over.
            DB::destroy(&options, &db_path).map_err(rocks)?;
        }
        let families = [(MARKERS, 8 << 20), (OPEN, 1 << 20)]
            .map(|(name, buffer)| ColumnFamilyDescriptor::new(name, family_options(buffer)));
        let db = DB::open_cf_descriptors(&options, &db_path, families).map_err(rocks)?;
        // From here on the store changes: until the next clean checkpoint,
        // a crash must lead to a full restore.
        match std::fs::remove_file(&checkpoint_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let mut no_wal = WriteOptions::default();
        no_wal.disable_wal(true);
        let store = Store {
            db,
            path: path.to_path_buf(),
            codec: MarkerCodec::new(),
            no_wal,
            memory: Mutex::default(),
            checkpoint_claim,
        };
        // Drop the index's tombstones once, then read what is open.
        let open = store.cf(OPEN);
        store
            .db
            .compact_range_cf(open, None::<&[u8]>, None::<&[u8]>);
        store.load_open_index()?;
        Ok((
            store,
            checkpoint.map_or(Opened::Empty, Opened::FromCheckpoint),
        ))
    }

    /// Opens an existing store without changing it (for `state inspect`,
    /// also while a processor holds it); returns its checkpoint, if clean.
    pub fn open_read_only(path: &Path) -> Result<(Store, Option<i64>), StateError> {
        let (checkpoint, checkpoint_claim) = std::fs::read_to_string(path.join(CHECKPOINT))
            .map_or((None, None), |text| parse_checkpoint(&text));
        let db_path = path.join("db");
        let db = DB::open_cf_for_read_only(&Options::default(), &db_path, [MARKERS, OPEN], false)
            .map_err(|source| StateError::Rocks {
            path: db_path.clone(),
            source,
        })?;
        let store = Store {
            db,
            path: path.to_path_buf(),
            codec: MarkerCodec::new(),
            no_wal: WriteOptions::default(),
            memory: Mutex::default(),
            checkpoint_claim,
        };
        store.load_open_index()?;
        Ok((store, checkpoint))
    }

    /// Whether a running process holds the store open (RocksDB's LOCK file
    /// is locked with fcntl), checked without opening or changing anything.
    pub fn in_use(path: &Path) -> bool {
        use std::os::fd::AsRawFd;
        let Ok(file) = std::fs::File::open(path.join("db").join("LOCK")) else {
            return false; // no store, or never opened
        };
        // SAFETY: F_GETLK only reads lock state into the struct we pass.
        unsafe {
            let mut probe: libc::flock = std::mem::zeroed();
            probe.l_type = libc::F_WRLCK as libc::c_short;
            probe.l_whence = libc::SEEK_SET as libc::c_short;
            if libc::fcntl(file.as_raw_fd(), libc::F_GETLK, &mut probe) != 0 {
                return false;
            }
            probe.l_type != libc::F_UNLCK as libc::c_short
        }
    }

    /// Removes a store from disk (its next open restores the changelog).
    pub fn wipe(path: &Path) -> Result<bool, StateError> {
        match std::fs::remove_dir_all(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(StateError::Io {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Marker>, StateError> {
        if let Some(held) = self.memory().pending.get(key) {
            return Ok(held.clone());
        }
        let bytes = self
            .db
            .get_cf(self.cf(MARKERS), key)
            .map_err(|e| self.rocks(e))?;
        bytes.map(|b| self.decode(key, &b)).transpose()
    }

    /// Writes a marker and keeps the open index in step.
    pub fn put(&self, key: &[u8], marker: &Marker) -> Result<(), StateError> {
        self.write(key, Some(marker.clone()))
    }

    /// The changelog encoding of a marker.
    pub fn encode(&self, marker: &Marker) -> Vec<u8> {
        self.codec.encode(marker)
    }

    /// Removes a key's state (a delete was acknowledged).
    pub fn delete(&self, key: &[u8]) -> Result<(), StateError> {
        self.write(key, None)
    }

    /// Holds a write in memory, applying the held ones once there are
    /// [`PENDING_LIMIT`].
    fn write(&self, key: &[u8], marker: Option<Marker>) -> Result<(), StateError> {
        let mut memory = self.memory();
        // A key written again (the usual case: markT1, then markT2) finds
        // its entries in place, without copying the key.
        match &marker {
            Some(m) if m.is_open() => match memory.open.get_mut(key) {
                Some(t1) => *t1 = m.t1,
                None => {
                    memory.open.insert(key.to_vec(), m.t1);
                }
            },
            _ => {
                memory.open.remove(key);
            }
        }
        // Deletes are rare: their index is kept without the in-place care.
        match &marker {
            Some(m) if m.is_deleted() => {
                memory.deleted.insert(key.to_vec(), m.t2);
            }
            _ => {
                if !memory.deleted.is_empty() {
                    memory.deleted.remove(key);
                }
            }
        }
        match memory.pending.get_mut(key) {
            Some(held) => *held = marker,
            None => {
                memory.pending.insert(key.to_vec(), marker);
            }
        }
        if memory.pending.len() >= PENDING_LIMIT {
            self.apply(&mut memory)?;
        }
        Ok(())
    }

    /// Applies the held writes to RocksDB as one batch.
    fn apply(&self, memory: &mut Memory) -> Result<(), StateError> {
        if memory.pending.is_empty() {
            return Ok(()); // also: a read-only store never writes
        }
        let (markers, open) = (self.cf(MARKERS), self.cf(OPEN));
        let mut batch = WriteBatch::default();
        let Memory {
            pending,
            open_on_disk,
            ..
        } = memory;
        for (key, marker) in pending.drain() {
            match marker {
                Some(marker) => {
                    batch.put_cf(markers, &key, self.codec.encode(&marker));
                    if marker.is_open() {
                        batch.put_cf(open, &key, marker.t1.to_be_bytes());
                        open_on_disk.insert(key);
                    } else if marker.is_deleted() {
                        let mut entry = [DELETED; 9];
                        entry[..8].copy_from_slice(&marker.t2.to_be_bytes());
                        batch.put_cf(open, &key, entry);
                        open_on_disk.insert(key);
                    } else if open_on_disk.remove(&key) {
                        batch.delete_cf(open, &key);
                    }
                }
                None => {
                    batch.delete_cf(markers, &key);
                    if open_on_disk.remove(&key) {
                        batch.delete_cf(open, &key);
                    }
                }
            }
        }
        self.db
            .write_opt(batch, &self.no_wal)
            .map_err(|e| self.rocks(e))
    }

    fn memory(&self) -> MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn load_open_index(&self) -> Result<(), StateError> {
        let mut memory = self.memory();
        for item in self
            .db
            .iterator_cf(self.cf(OPEN), rocksdb::IteratorMode::Start)
        {
            let (key, entry) = item.map_err(|e| self.rocks(e))?;
            let tn = entry
                .get(..8)
                .and_then(|tn| tn.try_into().ok())
                .map_or(0, u64::from_be_bytes);
            if entry.get(8) == Some(&DELETED) {
                memory.deleted.insert(key.to_vec(), tn);
            } else {
                memory.open.insert(key.to_vec(), tn);
            }
            memory.open_on_disk.insert(key.to_vec());
        }
        Ok(())
    }

    /// Applies one changelog record during restore (`None` = tombstone).
    pub fn restore(&self, key: &[u8], value: Option<&[u8]>) -> Result<(), StateError> {
        match value {
            None => self.delete(key),
            Some(bytes) => {
                let marker = self.decode(key, bytes)?;
                self.write(key, Some(marker))
            }
        }
    }

    /// Open markers whose t1 is at or before `started_before` (nanoseconds),
    /// read from the open index only.
    pub fn open_markers(&self, started_before: u64) -> Result<Vec<(Bytes, Marker)>, StateError> {
        let mut due: Vec<Vec<u8>> = self
            .memory()
            .open
            .iter()
            .filter(|(_, t1)| **t1 <= started_before)
            .map(|(key, _)| key.clone())
            .collect();
        due.sort_unstable(); // in key order, whatever the index's order
        let mut out = Vec::with_capacity(due.len());
        for key in due {
            if let Some(marker) = self.get(&key)? {
                out.push((Bytes::from(key), marker));
            }
        }
        Ok(out)
    }

    /// The keys whose marker is a delete's, acknowledged at or before
    /// `acknowledged_before` (ns), in key order.
    pub fn deleted_before(&self, acknowledged_before: u64) -> Vec<Bytes> {
        let mut keys: Vec<Bytes> = self
            .memory()
            .deleted
            .iter()
            .filter(|(_, t2)| **t2 <= acknowledged_before)
            .map(|(key, _)| Bytes::copy_from_slice(key))
            .collect();
        keys.sort_unstable();
        keys
    }

    /// See [`MarkerStore::closed_before`]. Reads RocksDB after applying the
    /// held writes, one iterator per step.
    pub fn closed_before(
        &self,
        after: Option<&[u8]>,
        acknowledged_before: u64,
        limit: usize,
    ) -> Result<(Vec<Bytes>, Option<Bytes>), StateError> {
        self.apply(&mut self.memory())?;
        let mode = match after {
            Some(key) => rocksdb::IteratorMode::From(key, rocksdb::Direction::Forward),
            None => rocksdb::IteratorMode::Start,
        };
        let (mut expired, mut last, mut read) = (Vec::new(), None, 0);
        for item in self.db.iterator_cf(self.cf(MARKERS), mode) {
            let (key, value) = item.map_err(|e| self.rocks(e))?;
            if after == Some(&key[..]) {
                continue;
            }
            if read == limit {
                return Ok((expired, last));
            }
            read += 1;
            let marker = self.decode(&key, &value)?;
            let key = Bytes::copy_from_slice(&key);
            if !marker.is_open() && !marker.is_deleted() && marker.t2 <= acknowledged_before {
                expired.push(key.clone());
            }
            last = Some(key);
        }
        Ok((expired, None))
    }

    /// How many markers are open (the open index's size).
    pub fn open_count(&self) -> Result<usize, StateError> {
        Ok(self.memory().open.len())
    }

    /// Removes every marker, as a store opened without a checkpoint starts
    /// (a restore that cannot trust its checkpoint reads the whole
    /// changelog into an empty store).
    pub fn clear(&self) -> Result<(), StateError> {
        let mut memory = self.memory();
        memory.pending.clear();
        memory.open.clear();
        memory.deleted.clear();
        memory.open_on_disk.clear();
        let mut batch = WriteBatch::default();
        for family in [MARKERS, OPEN] {
            let cf = self.cf(family);
            for item in self.db.iterator_cf(cf, rocksdb::IteratorMode::Start) {
                let (key, _) = item.map_err(|e| self.rocks(e))?;
                batch.delete_cf(cf, key);
            }
        }
        self.db
            .write_opt(batch, &self.no_wal)
            .map_err(|e| self.rocks(e))
    }

    /// Every marker (for restore checks and `state inspect`).
    pub fn markers(&self) -> Result<Vec<(Bytes, Marker)>, StateError> {
        self.apply(&mut self.memory())?;
        self.db
            .iterator_cf(self.cf(MARKERS), rocksdb::IteratorMode::Start)
            .map(|item| {
                let (key, value) = item.map_err(|e| self.rocks(e))?;
                Ok((Bytes::copy_from_slice(&key), self.decode(&key, &value)?))
            })
            .collect()
    }

    /// The newest changelog claim when the checkpoint the store opened from
    /// was written (`None`: no checkpoint, or one without a claim).
    pub fn checkpoint_claim(&self) -> Option<i64> {
        self.checkpoint_claim
    }

    /// Flushes the memtables and records that the store is complete up to
    /// changelog offset `next_offset` (exclusive), where `claim` is the
    /// newest changelog claim (see [`claim`]). Written atomically.
    pub fn checkpoint(&self, next_offset: i64, claim: Option<i64>) -> Result<(), StateError> {
        self.apply(&mut self.memory())?;
        self.db
            .flush_cfs_opt(
                &[self.cf(MARKERS), self.cf(OPEN)],
                &rocksdb::FlushOptions::default(),
            )
            .map_err(|e| self.rocks(e))?;
        let io = |source| StateError::Io {
            path: self.path.clone(),
            source,
        };
        let tmp = self.path.join(format!("{CHECKPOINT}.tmp"));
        let text = match claim {
            Some(claim) => format!("{next_offset}\n{claim}\n"),
            None => format!("{next_offset}\n"),
        };
        std::fs::write(&tmp, text).map_err(io)?;
        std::fs::rename(&tmp, self.path.join(CHECKPOINT)).map_err(io)
    }

    /// Applies the held writes and waits until RocksDB's background flushes
    /// and compactions are done, without flushing the memtables: what is on
    /// disk then stays as it is until the next write.
    pub fn settle(&self) -> Result<(), StateError> {
        self.apply(&mut self.memory())?;
        let mut wait = rocksdb::WaitForCompactOptions::default();
        wait.set_flush(false);
        self.db.wait_for_compact(&wait).map_err(|e| self.rocks(e))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column families are created on open")
    }

    fn decode(&self, key: &[u8], bytes: &[u8]) -> Result<Marker, StateError> {
        self.codec
            .decode(bytes)
            .map_err(|source| StateError::Corrupt {
                path: self.path.clone(),
                key: String::from_utf8_lossy(key).into_owned(),
                source,
            })
    }

    fn rocks(&self, source: rocksdb::Error) -> StateError {
        StateError::Rocks {
            path: self.path.clone(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marker(t1: u64, t2: u64, v: &'static [u8]) -> Marker {
        Marker {
            t1,
            t2,
            version: t1,
            value: Some(Bytes::from_static(v)),
            offset: None,
            value_cut: false,
        }
    }

    #[test]
    fn open_index_follows_markers() {
        let dir = tempfile::tempdir().unwrap();
        let (store, opened) = Store::open(dir.path()).unwrap();
        assert_eq!(opened, Opened::Empty);
        store.put(b"a", &marker(10, 10, b"A")).unwrap();
        store.put(b"b", &marker(20, 10, b"B")).unwrap();
        store.put(b"c", &marker(30, 0, b"C")).unwrap();
        let open: Vec<_> = store
            .open_markers(u64::MAX)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(open, [&b"b"[..], &b"c"[..]]);
        assert_eq!(store.open_count().unwrap(), 2);
        let old: Vec<_> = store
            .open_markers(25)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            old,
            [&b"b"[..]],
            "only markers old enough for the grace period"
        );
        store.put(b"b", &marker(20, 20, b"B")).unwrap();
        store.delete(b"c").unwrap();
        assert!(store.open_markers(u64::MAX).unwrap().is_empty());
        assert_eq!(store.get(b"c").unwrap(), None);
        assert_eq!(store.get(b"b").unwrap(), Some(marker(20, 20, b"B")));
    }

    /// A delete's closed marker is indexed (for the sweep after the
    /// retention) beside the open ones, survives a checkpointed reopen,
    /// and leaves the index when the key is written again or removed.
    #[test]
    fn a_walk_over_closed_markers_goes_on_from_its_cursor_and_skips_open_ones_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        store.put(b"a", &marker(5, 5, b"x")).unwrap();
        store.put(b"b", &marker(9, 9, b"x")).unwrap(); // acknowledged too late
        store.put(b"c", &marker(6, 5, b"x")).unwrap(); // open
        let mut deleted = marker(5, 5, b"x");
        deleted.value = None;
        store.put(b"d", &deleted).unwrap();
        store.put(b"e", &marker(5, 5, b"x")).unwrap();
        let (first, next) = store.closed_before(None, 8, 2).unwrap();
        assert_eq!(
            (first, next.as_deref()),
            (vec![Bytes::from("a")], Some(&b"b"[..]))
        );
        let (second, next) = store.closed_before(next.as_deref(), 8, 2).unwrap();
        assert_eq!((second, next.as_deref()), (vec![], Some(&b"d"[..])));
        let (third, next) = store.closed_before(next.as_deref(), 8, 2).unwrap();
        assert_eq!(
            (third, next),
            (vec![Bytes::from("e")], None),
            "the end of the walk"
        );
    }

    #[test]
    fn deletes_are_indexed_until_the_key_changes() {
        let dir = tempfile::tempdir().unwrap();
        let deleted = |t2: u64| Marker {
            t1: t2,
            t2,
            version: 5,
            value: None,
            offset: Some(9),
            value_cut: false,
        };
        {
            let (store, _) = Store::open(dir.path()).unwrap();
            store.put(b"a", &deleted(10)).unwrap();
            store.put(b"b", &deleted(20)).unwrap();
            store.put(b"c", &marker(30, 0, b"C")).unwrap();
            assert_eq!(store.deleted_before(15), [Bytes::from_static(b"a")]);
            store.checkpoint(0, None).unwrap();
        }
        let (store, opened) = Store::open(dir.path()).unwrap();
        assert_eq!(opened, Opened::FromCheckpoint(0));
        assert_eq!(store.deleted_before(u64::MAX), [&b"a"[..], &b"b"[..]]);
        assert_eq!(
            store.open_count().unwrap(),
            1,
            "c is still open, a and b are not"
        );
        store.put(b"a", &marker(40, 40, b"A")).unwrap();
        store.delete(b"b").unwrap();
        store.checkpoint(0, None).unwrap();
        drop(store);
        let (store, _) = Store::open(dir.path()).unwrap();
        assert!(store.deleted_before(u64::MAX).is_empty());
        assert_eq!(store.get(b"b").unwrap(), None);
    }

    #[test]
    fn clean_checkpoint_keeps_state_and_unclean_stop_wipes_it() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, _) = Store::open(dir.path()).unwrap();
            store.put(b"k", &marker(5, 0, b"V")).unwrap();
            store.checkpoint(42, Some(7)).unwrap();
        }
        {
            let (store, opened) = Store::open(dir.path()).unwrap();
            assert_eq!(opened, Opened::FromCheckpoint(42));
            assert_eq!(store.checkpoint_claim(), Some(7), "with its claim");
            assert_eq!(store.get(b"k").unwrap(), Some(marker(5, 0, b"V")));
            store.put(b"k", &marker(6, 0, b"W")).unwrap();
            // Dropped without a checkpoint: an unclean stop.
        }
        let (store, opened) = Store::open(dir.path()).unwrap();
        assert_eq!(opened, Opened::Empty, "no checkpoint means a full restore");
        assert_eq!(store.get(b"k").unwrap(), None);
    }

    #[test]
    fn restore_applies_changelog_records_and_tombstones() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let codec = MarkerCodec::new();
        store
            .restore(b"k", Some(&codec.encode(&marker(9, 0, b"X"))))
            .unwrap();
        assert_eq!(store.open_markers(u64::MAX).unwrap().len(), 1);
        store.restore(b"k", None).unwrap();
        assert_eq!(store.get(b"k").unwrap(), None);
        assert!(matches!(
            store.restore(b"bad", Some(b"junk")),
            Err(StateError::Corrupt { .. })
        ));
    }

    /// Keys whose marker is in RocksDB's column family `family` (not the
    /// held writes).
    fn on_disk(store: &Store, family: &str) -> Vec<Vec<u8>> {
        store
            .db
            .iterator_cf(store.cf(family), rocksdb::IteratorMode::Start)
            .map(|item| item.unwrap().0.to_vec())
            .collect()
    }

    #[test]
    fn writes_are_held_until_the_limit_or_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        // markT1 then markT2 of one push: one write, never in `open`.
        store.put(b"k", &marker(5, 0, b"V")).unwrap();
        assert_eq!(store.get(b"k").unwrap(), Some(marker(5, 0, b"V")));
        assert_eq!(store.open_count().unwrap(), 1);
        store.put(b"k", &marker(5, 5, b"V")).unwrap();
        assert!(on_disk(&store, MARKERS).is_empty(), "held in memory");
        // A key still open when the limit is reached lands in both families.
        store.put(b"open", &marker(7, 0, b"O")).unwrap();
        for i in 0..PENDING_LIMIT - 2 {
            store
                .put(format!("x{i}").as_bytes(), &marker(1, 1, b"X"))
                .unwrap();
        }
        assert_eq!(on_disk(&store, MARKERS).len(), PENDING_LIMIT);
        assert_eq!(on_disk(&store, OPEN), [b"open".to_vec()]);
        // Closing it deletes its entry; a delete removes a held marker.
        store.put(b"open", &marker(7, 7, b"O")).unwrap();
        store.put(b"gone", &marker(8, 0, b"G")).unwrap();
        store.delete(b"gone").unwrap();
        assert_eq!(store.get(b"gone").unwrap(), None);
        store.checkpoint(1, None).unwrap();
        assert!(on_disk(&store, OPEN).is_empty());
        assert_eq!(on_disk(&store, MARKERS).len(), PENDING_LIMIT);
        assert_eq!(store.get(b"open").unwrap(), Some(marker(7, 7, b"O")));
        assert_eq!(store.open_count().unwrap(), 0);
    }

    #[test]
    fn store_directory_layout() {
        let dir = Store::dir(Path::new("/var/lib/kf"), "app", "events.in", 3);
        assert_eq!(dir, Path::new("/var/lib/kf/app/events.in-3"));
    }
}
