//! The pure arithmetic of the benchmark: latency percentiles, matching an
//! output record to the input event it carries, rates over a window.

use std::collections::HashMap;

/// Nearest-rank percentile (`q` in 0..=100) of sorted values; `None` if empty.
pub fn percentile(sorted: &[i64], q: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Latency distribution in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Latency {
    pub samples: usize,
    pub p50_ms: i64,
    pub p99_ms: i64,
    pub max_ms: i64,
}

/// Event→output latency: for every output record, its timestamp minus the
/// timestamp of the input event it carries (`(key, version)`). Outputs
/// whose event is unknown are skipped (and counted by the caller).
pub fn latencies(
    inputs: &HashMap<(String, u64), i64>,
    outputs: &[(String, u64, i64)],
) -> Option<Latency> {
    let mut samples: Vec<i64> = outputs
        .iter()
        .filter_map(|(key, version, out_ts)| {
            inputs
                .get(&(key.clone(), *version))
                .map(|in_ts| (out_ts - in_ts).max(0))
        })
        .collect();
    samples.sort_unstable();
    Some(Latency {
        samples: samples.len(),
        p50_ms: percentile(&samples, 50.0)?,
        p99_ms: percentile(&samples, 99.0)?,
        max_ms: *samples.last()?,
    })
}

/// Items per second over `[first_ms, last_ms]`; a window under 1 ms counts as 1 ms.
pub fn rate(items: u64, first_ms: i64, last_ms: i64) -> f64 {
    items as f64 / (((last_ms - first_ms).max(1)) as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<i64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile(&[7], 99.0), Some(7));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn latency_matches_outputs_to_their_events() {
        let inputs: HashMap<(String, u64), i64> = [
            (("a".to_string(), 1), 1_000),
            (("a".to_string(), 2), 1_010),
            (("b".to_string(), 1), 1_000),
        ]
        .into_iter()
        .collect();
        let outputs = vec![
            ("a".to_string(), 2, 1_013), // carries a@2: 3 ms
            ("b".to_string(), 1, 1_001), // 1 ms
            ("c".to_string(), 1, 5_000), // unknown: skipped
        ];
        let l = latencies(&inputs, &outputs).unwrap();
        assert_eq!(l.samples, 2);
        assert_eq!((l.p50_ms, l.p99_ms, l.max_ms), (1, 3, 3));
        assert!(latencies(&inputs, &[]).is_none());
    }

    #[test]
    fn rates_over_a_window() {
        assert_eq!(rate(1_000, 0, 500), 2_000.0);
        assert_eq!(rate(5, 10, 10), 5_000.0, "at least 1 ms");
    }
}
