//! The compensation scan's cost: open markers among many.

use std::path::Path;
use std::time::Instant;

use keyflight::state::{Marker, Store};

use crate::{Result, Scan};

/// Times the compensation scan (open index) against a full scan.
pub(crate) fn scan(markers: u64, open: u64, work: &Path) -> Result<Scan> {
    let dir = work.join("scan-store");
    let (store, _) = Store::open(&dir).map_err(|e| e.to_string())?;
    let every = (markers / open.max(1)).max(1);
    let value = bytes::Bytes::from_static(br#"{"status":"active","score":42}"#);
    for i in 0..markers {
        let is_open = i % every == 0 && i / every < open;
        let marker = Marker {
            t1: 1_000,
            t2: if is_open { 500 } else { 1_000 },
            version: i,
            value: Some(value.clone()),
            offset: None,
            value_cut: false,
        };
        store
            .put(format!("user-{i:07}").as_bytes(), &marker)
            .map_err(|e| e.to_string())?;
    }
    store.checkpoint(0, None).map_err(|e| e.to_string())?;
    let rounds = 20;
    let started = Instant::now();
    let mut found = 0;
    for _ in 0..rounds {
        found = keyflight::compensation::due(&store, u64::MAX, 0)
            .map_err(|e| e.to_string())?
            .len();
    }
    let open_scan = started.elapsed().as_secs_f64() * 1000.0 / rounds as f64;
    if found as u64 != open.min(markers) {
        return Err(format!(
            "the scan found {found} open markers, expected {open}"
        ));
    }
    let started = Instant::now();
    let all = store.markers().map_err(|e| e.to_string())?.len();
    let full_scan = started.elapsed().as_secs_f64() * 1000.0;
    if all as u64 != markers {
        return Err(format!(
            "the full scan found {all} markers, expected {markers}"
        ));
    }
    // The expiry sweep walks every marker a step at a time; none has
    // expired here (t2 = 1 000 > 999), so it measures the reading alone.
    let (mut cursor, mut steps) = (None, 0u32);
    let started = Instant::now();
    loop {
        let (expired, next) = store
            .closed_before(
                cursor.as_deref(),
                999,
                keyflight::processor::task::core::EXPIRY_STEP,
            )
            .map_err(|e| e.to_string())?;
        if !expired.is_empty() {
            return Err(format!(
                "the expiry walk found {} expired markers, expected none",
                expired.len()
            ));
        }
        steps += 1;
        match next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    let expiry_walk = started.elapsed().as_secs_f64() * 1000.0;
    Ok(Scan {
        markers,
        open,
        open_scan_ms: open_scan,
        full_scan_ms: full_scan,
        expiry_step_ms: expiry_walk / f64::from(steps),
        expiry_walk_ms: expiry_walk,
    })
}
