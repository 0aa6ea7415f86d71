//! The event stream of `keyflight load` and `keyflight demo`, pure: which
//! key comes next (Zipf or uniform popularity, bursts of one key back to
//! back), with per-key versions that only grow, and the article's scenarios
//! as explicit steps. The CLI produces what this yields.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadSpec {
    pub events: u64,
    pub keys: u64,
    /// Zipf exponent of key popularity; `None`: uniform.
    pub zipf: Option<f64>,
    /// Events per key back to back (a burst); 1: no bursts.
    pub burst: u32,
    pub seed: u64,
}

/// One generated event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadEvent {
    pub key: String,
    /// Per key: 1, 2, 3, ... in production order.
    pub version: u64,
    /// Position in the whole stream, from 0.
    pub seq: u64,
}

impl LoadEvent {
    /// The event as the JSON document keyflight reads by default.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({ "version": self.version, "seq": self.seq, "key": self.key })
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    #[error("--keys must be at least 1")]
    NoKeys,
    #[error("--zipf must be a positive number, got {0}")]
    Zipf(f64),
    #[error("--burst must be at least 1")]
    NoBurst,
}

/// Yields the events of a [`LoadSpec`].
pub struct Generator {
    spec: LoadSpec,
    rng: StdRng,
    zipf: Option<Zipf<f64>>,
    versions: Vec<u64>,
    seq: u64,
    /// The key of the burst in progress and the events it still gets.
    burst: Option<(usize, u32)>,
}

impl Generator {
    pub fn new(spec: LoadSpec) -> Result<Self, SpecError> {
        if spec.keys == 0 {
            return Err(SpecError::NoKeys);
        }
        if spec.burst == 0 {
            return Err(SpecError::NoBurst);
        }
        let zipf = match spec.zipf {
            None => None,
            Some(s) if s > 0.0 && s.is_finite() => {
                Some(Zipf::new(spec.keys as f64, s).map_err(|_| SpecError::Zipf(s))?)
            }
            Some(s) => return Err(SpecError::Zipf(s)),
        };
        Ok(Self {
            rng: StdRng::seed_from_u64(spec.seed),
            zipf,
            versions: vec![0; spec.keys as usize],
            seq: 0,
            burst: None,
            spec,
        })
    }

    fn next_key(&mut self) -> usize {
        match &self.zipf {
            // Zipf yields 1..=keys, the most popular first.
            Some(zipf) => (zipf.sample(&mut self.rng) as usize).clamp(1, self.versions.len()) - 1,
            None => self.rng.random_range(0..self.versions.len()),
        }
    }
}

impl Iterator for Generator {
    type Item = LoadEvent;

    fn next(&mut self) -> Option<LoadEvent> {
        if self.seq >= self.spec.events {
            return None;
        }
        let key = match self.burst {
            Some((key, left)) if left > 0 => {
                self.burst = Some((key, left - 1));
                key
            }
            _ => {
                let key = self.next_key();
                self.burst = Some((key, self.spec.burst - 1));
                key
            }
        };
        self.versions[key] += 1;
        let event = LoadEvent {
            key: key_name(key),
            version: self.versions[key],
            seq: self.seq,
        };
        self.seq += 1;
        Some(event)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = (self.spec.events - self.seq) as usize;
        (left, Some(left))
    }
}

/// The name of key number `k`: sortable, and the same in every run.
pub fn key_name(k: usize) -> String {
    format!("key-{k:06}")
}

/// One step of the article's scenarios: produce `events`, then pause
/// `pause_ms` so the push they start is in flight when the next step lands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScenarioStep {
    pub events: Vec<LoadEvent>,
    pub pause_ms: u64,
}

/// The article's cases on `keys` dedicated keys (`case-0`, `case-1`, ...):
/// a first event starts a push; a burst arrives while it is in flight (Case
/// 1: the burst must not be lost behind the in-flight push); then a late
/// event, then more events behind it (Case 2: the last push must carry the
/// newest of them, never an older one); finally a straggler with an old
/// version (a retried produce, say), which must be dropped as stale.
pub fn scenarios(keys: usize, pause_ms: u64) -> Vec<ScenarioStep> {
    let mut versions = vec![0u64; keys];
    let mut seq = 0;
    let mut step = |per_key: u64, pause_ms: u64| {
        let mut events = Vec::new();
        for _ in 0..per_key {
            for (k, version) in versions.iter_mut().enumerate() {
                *version += 1;
                events.push(LoadEvent {
                    key: format!("case-{k}"),
                    version: *version,
                    seq,
                });
                seq += 1;
            }
        }
        ScenarioStep { events, pause_ms }
    };
    let mut steps = vec![
        step(1, pause_ms), // the first push of every case key
        step(5, pause_ms), // Case 1: a burst while it is in flight
        step(1, pause_ms), // the late event
        step(3, pause_ms), // Case 2: more behind it
    ];
    let stragglers = (0..keys)
        .map(|k| LoadEvent {
            key: format!("case-{k}"),
            version: 2,
            seq: seq + k as u64,
        })
        .collect();
    steps.push(ScenarioStep {
        events: stragglers,
        pause_ms: 0,
    });
    steps
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn spec(events: u64, keys: u64, zipf: Option<f64>, burst: u32) -> LoadSpec {
        LoadSpec {
            events,
            keys,
            zipf,
            burst,
            seed: 7,
        }
    }

    #[test]
    fn versions_grow_per_key_and_counts_match() {
        let events: Vec<_> = Generator::new(spec(10_000, 100, Some(1.0), 3))
            .unwrap()
            .collect();
        assert_eq!(events.len(), 10_000);
        let mut last: HashMap<&str, u64> = HashMap::new();
        for e in &events {
            let previous = last.insert(&e.key, e.version).unwrap_or(0);
            assert_eq!(e.version, previous + 1, "{e:?}");
        }
        assert!(last.len() <= 100);
        assert!(events.iter().enumerate().all(|(i, e)| e.seq == i as u64));
    }

    #[test]
    fn bursts_repeat_a_key_back_to_back() {
        let events: Vec<_> = Generator::new(spec(30, 1_000, None, 5)).unwrap().collect();
        for chunk in events.chunks(5) {
            assert!(chunk.iter().all(|e| e.key == chunk[0].key), "{chunk:?}");
        }
    }

    #[test]
    fn zipf_makes_low_keys_hot() {
        let events: Vec<_> = Generator::new(spec(20_000, 1_000, Some(1.0), 1))
            .unwrap()
            .collect();
        let hot = events.iter().filter(|e| e.key == key_name(0)).count();
        let cold = events.iter().filter(|e| e.key == key_name(999)).count();
        assert!(
            hot > 100 * cold.max(1) / 10 && hot > 1_000,
            "hot {hot}, cold {cold}"
        );
    }

    #[test]
    fn the_same_seed_gives_the_same_stream() {
        let a: Vec<_> = Generator::new(spec(500, 50, Some(1.2), 2))
            .unwrap()
            .collect();
        let b: Vec<_> = Generator::new(spec(500, 50, Some(1.2), 2))
            .unwrap()
            .collect();
        assert_eq!(a, b);
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        assert_eq!(
            Generator::new(spec(1, 0, None, 1)).err(),
            Some(SpecError::NoKeys)
        );
        assert_eq!(
            Generator::new(spec(1, 1, None, 0)).err(),
            Some(SpecError::NoBurst)
        );
        assert_eq!(
            Generator::new(spec(1, 1, Some(-1.0), 1)).err(),
            Some(SpecError::Zipf(-1.0))
        );
    }

    #[test]
    fn scenarios_follow_the_article() {
        let steps = scenarios(2, 100);
        let sizes: Vec<_> = steps.iter().map(|s| s.events.len()).collect();
        assert_eq!(sizes, vec![2, 10, 2, 6, 2]);
        assert_eq!(steps[3].events.last().unwrap().version, 10);
        assert!(
            steps[4].events.iter().all(|e| e.version == 2),
            "stale stragglers"
        );
        assert_eq!(steps[4].pause_ms, 0);
    }
}
