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

/// The `q` percentile (0..=100) of a Prometheus histogram given as its
/// cumulative buckets `(upper bound, count)`: the upper bound of the first
/// bucket holding that rank, so a bound on the value rather than the value.
/// `None` when it is empty or the rank lies past the last finite bound.
pub fn histogram_percentile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let mut buckets = buckets.to_vec();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = (q / 100.0 * total).ceil().max(1.0);
    buckets
        .iter()
        .find(|(_, count)| *count >= rank)
        .map(|(bound, _)| *bound)
        .filter(|bound| bound.is_finite())
}

/// The median of `values` (the mean of the middle two for an even count);
/// `None` if empty.
pub fn median(values: &[i64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2] as f64),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) as f64 / 2.0),
    }
}

/// Latency distribution in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Latency {
    pub samples: usize,
    pub p50_ms: i64,
    pub p99_ms: i64,
    pub max_ms: i64,
}

/// Event→output latency of every input event: from its timestamp to the
/// timestamp of the first output of its key that carries its version or a
/// later one (a merged event is delivered by the push that carries a newer
/// version). Inputs and outputs are `(key, version, timestamp ms)`. Events
/// with no such output are left out; the caller compares `samples` with
/// the events sent.
pub fn latencies(inputs: &[(String, u64, i64)], outputs: &[(String, u64, i64)]) -> Option<Latency> {
    let mut by_key: HashMap<&str, Vec<(u64, i64)>> = HashMap::new();
    for (key, version, ts) in outputs {
        by_key.entry(key).or_default().push((*version, *ts));
    }
    for pushes in by_key.values_mut() {
        pushes.sort_unstable();
    }
    let mut samples: Vec<i64> = inputs
        .iter()
        .filter_map(|(key, version, in_ts)| {
            let pushes = by_key.get(key.as_str())?;
            // Sorted by (version, timestamp): the earliest of the lowest
            // version at or above the event's.
            let (_, out_ts) = pushes.get(pushes.partition_point(|(v, _)| v < version))?;
            Some((out_ts - in_ts).max(0))
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

/// Busy share of the CPU time between two (busy, total) tick readings,
/// 0–1 (0 when no time passed).
pub fn busy_share(before: (u64, u64), after: (u64, u64)) -> f64 {
    let total = after.1.saturating_sub(before.1);
    if total == 0 {
        return 0.0;
    }
    after.0.saturating_sub(before.0) as f64 / total as f64
}

/// Items per second over `[first_ms, last_ms]`; a window under 1 ms counts as 1 ms.
pub fn rate(items: u64, first_ms: i64, last_ms: i64) -> f64 {
    items as f64 / (((last_ms - first_ms).max(1)) as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_share_is_busy_ticks_over_all_ticks_between_readings() {
        assert_eq!(busy_share((100, 1000), (250, 1200)), 0.75);
        assert_eq!(busy_share((100, 1000), (100, 1000)), 0.0);
    }

    #[test]
    fn histogram_percentiles_are_the_bound_of_the_bucket_holding_the_rank() {
        let buckets = [
            (0.001, 10.0),
            (0.002, 90.0),
            (0.004, 99.0),
            (0.008, 100.0),
            (f64::INFINITY, 100.0),
        ];
        assert_eq!(histogram_percentile(&buckets, 50.0), Some(0.002));
        assert_eq!(histogram_percentile(&buckets, 99.0), Some(0.004));
        assert_eq!(histogram_percentile(&buckets, 100.0), Some(0.008));
        let past = [(0.001, 1.0), (f64::INFINITY, 100.0)];
        assert_eq!(
            histogram_percentile(&past, 99.0),
            None,
            "past the last bound"
        );
        assert_eq!(histogram_percentile(&[(f64::INFINITY, 0.0)], 50.0), None);
        assert_eq!(histogram_percentile(&[], 50.0), None);
    }

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
    fn every_event_waits_for_the_first_output_carrying_it() {
        let event = |k: &str, v, ts| (k.to_string(), v, ts);
        let inputs = vec![
            event("a", 1, 1_000),
            event("a", 2, 1_010), // merged with a@3: delivered by the a@3 push
            event("a", 3, 1_011),
            event("b", 1, 1_000),
            event("c", 1, 1_000), // never delivered: left out
        ];
        let outputs = vec![
            event("a", 1, 1_004),
            event("a", 3, 1_020),
            event("b", 1, 1_001),
            event("b", 1, 1_009), // a later copy of b@1 does not count
            event("z", 1, 5_000), // no event: ignored
        ];
        let l = latencies(&inputs, &outputs).unwrap();
        assert_eq!(l.samples, 4);
        // Latencies 4, 10, 9 and 1 ms: nearest-rank p50 4, p99 10.
        assert_eq!((l.p50_ms, l.p99_ms, l.max_ms), (4, 10, 10));
        assert!(latencies(&inputs, &[]).is_none());
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[7]), Some(7.0));
        assert_eq!(median(&[30, -5, 12]), Some(12.0));
        assert_eq!(median(&[4, 1, 3, 10]), Some(3.5));
    }

    #[test]
    fn rates_over_a_window() {
        assert_eq!(rate(1_000, 0, 500), 2_000.0);
        assert_eq!(rate(5, 10, 10), 5_000.0, "at least 1 ms");
    }
}
