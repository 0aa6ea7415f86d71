//! The state store killed with SIGKILL: what is on disk afterwards.
//!
//! The writer is this test binary run again as a child (the test named
//! `killed_store_writer` does the writing only when `KEYFLIGHT_KILLED_STORE`
//! names a directory), so the kill hits a real process holding RocksDB.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use bytes::Bytes;
use keyflight::state::{Marker, Opened, Store};

const CHILD_ENV: &str = "KEYFLIGHT_KILLED_STORE";
/// Enough open markers that the `open` family's memtable (1 MiB) fills and
/// flushes, but not the `markers` family's (8 MiB).
const OPEN_MARKERS: u64 = 40_000;

/// The child half: a checkpointed store, then open markers written, the
/// background flushes awaited, "ready" printed, and a wait for the kill.
#[test]
fn killed_store_writer() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return; // run as a child of the test below only
    };
    let (store, _) = Store::open(dir.as_ref()).expect("the store opens");
    store
        .checkpoint(0, None)
        .expect("the checkpoint is written");
    for i in 0..OPEN_MARKERS {
        let value = Bytes::from(format!("{{\"v\":{i},\"doc\":\"some document\"}}"));
        let marker = Marker::started(0, 1_000 + i, i, Some(value));
        store
            .put(format!("key-{i:08}").as_bytes(), &marker)
            .expect("the write is taken");
    }
    store.settle().expect("background work settles");
    println!("ready");
    // Blocks until the parent kills this process.
    let _ = std::io::stdin().lines().next();
    panic!("the parent closed stdin instead of killing the writer");
}

/// A process killed while its store holds unflushed writes leaves the two
/// column families in agreement: every key in the `open` index has an open
/// marker and every open marker is in the index (flushes are atomic across
/// families; without that, the small `open` family flushed alone and the
/// index named markers that never reached the disk).
#[test]
fn a_killed_store_keeps_its_open_index_in_agreement_with_its_markers() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("events.in-0");
    let mut child = Command::new(std::env::current_exe().expect("the test binary"))
        .args([
            "state_crash::killed_store_writer",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the writer starts");
    let stdout = child.stdout.take().expect("the writer's stdout");
    let ready = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|line| line.trim_end().ends_with("ready"));
    assert!(ready, "the writer reports ready");
    child.kill().expect("SIGKILL");
    child.wait().expect("the writer is reaped");

    let (store, opened) = Store::open(&path).expect("the store reopens");
    assert_eq!(opened, Opened::FromCheckpoint(0), "the checkpoint is kept");
    let open_markers = store
        .markers()
        .expect("markers read")
        .into_iter()
        .filter(|(_, m)| m.is_open())
        .count();
    let indexed = store.open_count().expect("the index is read");
    let indexed_with_marker = store.open_markers(u64::MAX).expect("open markers").len();
    assert_eq!(
        (indexed, indexed_with_marker),
        (open_markers, open_markers),
        "the open index ({indexed} keys, {indexed_with_marker} with a marker) agrees with the {open_markers} open markers"
    );
}
