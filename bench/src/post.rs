//! The bare HTTP client loop (`keyflight-bench post`, started by `http` as
//! a child process): what the HTTP sink is measured against. It posts the
//! bodies keyflight would push for the comparison's events (one event per
//! key, so one push each) to the same kind of receiver, with the same
//! headers and the same client (reqwest, rustls, a pool of `in_flight`
//! idle connections), at most `in_flight` requests at once, and nothing
//! else: no Kafka, no state, no per-key bookkeeping.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Args;
use keyflight::loadgen::{key_name, LoadEvent};
use keyflight::sink::http::{encode_key, COMPENSATION, IDEMPOTENCY_KEY, KEY, MERGED, TN, VERSION};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::{process_cpu_seconds, stats, Result};

#[derive(Args)]
pub(crate) struct PostArgs {
    /// The receiver's URL; `{key}` is replaced by the percent-encoded key
    #[arg(long)]
    pub(crate) url: String,
    /// Requests to send: events 0..N, one per key
    #[arg(long)]
    pub(crate) requests: u64,
    /// Requests in flight at once (as sink.http.max_in_flight)
    #[arg(long, default_value_t = 64)]
    pub(crate) in_flight: usize,
    /// Requests per second, request i due at start + i/rate; without it, as
    /// fast as `in_flight` allows
    #[arg(long)]
    pub(crate) rate: Option<f64>,
    /// Where to write the result (JSON)
    #[arg(long)]
    pub(crate) out: PathBuf,
}

/// What a `post` run measured.
#[derive(Serialize, Deserialize, Default, Clone)]
pub(crate) struct PostResult {
    pub(crate) requests: u64,
    /// Requests not answered 2xx (or not answered at all).
    pub(crate) failed: u64,
    pub(crate) first_error: Option<String>,
    /// From the first request's start to the last answer.
    pub(crate) seconds: f64,
    /// The wall clock (ns since the Unix epoch) at the start: request i was
    /// due `i / rate` seconds after it.
    pub(crate) start_wall_ns: u64,
    /// Each request's time from its send to its answer (µs): p50, p99, max.
    pub(crate) latency_us: Option<(i64, i64, i64)>,
    /// The process's CPU time (user + system) over the whole run.
    pub(crate) cpu_seconds: f64,
}

/// Event `i` of the comparison: key `i`, version 1, the body keyflight
/// reads from the input and pushes unchanged (the `latest` policy).
pub(crate) fn event(i: u64) -> LoadEvent {
    LoadEvent {
        key: key_name(i as usize),
        version: 1,
        seq: i,
    }
}

pub(crate) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// As the load producer paces: requests due within a millisecond go at once.
const PACING_STEP: Duration = Duration::from_millis(1);

struct Poster {
    client: reqwest::Client,
    /// The URL split at each `{key}`.
    url: Vec<String>,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Poster {
    /// One request as the HTTP sink sends a first push of a key (version 1,
    /// one event), its answer dropped unread as the sink drops a 2xx's.
    async fn post(&self, i: u64) {
        let event = event(i);
        let key = encode_key(event.key.as_bytes());
        let url = self.url.join(&key);
        let body = event.json().to_string();
        let sent = self
            .client
            .post(&url)
            .timeout(Duration::from_secs(10))
            .header(KEY, &key)
            .header(VERSION, "1")
            .header(TN, "1")
            .header(MERGED, "1")
            .header(COMPENSATION, "false")
            .header(IDEMPOTENCY_KEY, format!("{key}:1"))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await;
        let error = match sent {
            Ok(answer) if answer.status().is_success() => return,
            Ok(answer) => format!("{url}: HTTP {}", answer.status()),
            Err(e) => format!("{url}: {e}"),
        };
        self.failed.fetch_add(1, Ordering::Relaxed);
        self.first_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(error);
    }
}

pub(crate) fn run(args: PostArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    // As the HTTP sink builds its client.
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(args.in_flight)
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;
    let poster = Arc::new(Poster {
        client,
        url: args.url.split("{key}").map(str::to_string).collect(),
        failed: AtomicU64::new(0),
        first_error: Mutex::new(None),
    });
    let (start_wall_ns, started) = (now_ns(), Instant::now());
    let mut latencies = runtime.block_on(async {
        match args.rate {
            None => unpaced(poster.clone(), args.requests, args.in_flight).await,
            Some(rate) => paced(poster.clone(), args.requests, args.in_flight, rate, started).await,
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let result = PostResult {
        requests: args.requests,
        failed: poster.failed.load(Ordering::Relaxed),
        first_error: poster
            .first_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone(),
        seconds,
        start_wall_ns,
        latency_us: stats::percentile(&latencies, 50.0).and_then(|p50| {
            Some((
                p50,
                stats::percentile(&latencies, 99.0)?,
                *latencies.last()?,
            ))
        }),
        cpu_seconds: process_cpu_seconds("self"),
    };
    // Whole or not at all: the driver reads the file once it exists.
    let text = serde_json::to_string(&result).map_err(|e| e.to_string())?;
    let partial = args.out.with_extension("partial");
    std::fs::write(&partial, text).map_err(|e| format!("{}: {e}", partial.display()))?;
    std::fs::rename(&partial, &args.out).map_err(|e| format!("{}: {e}", args.out.display()))
}

/// `in_flight` workers, each sending the next request as soon as its last
/// one is answered; returns every request's latency (µs).
async fn unpaced(poster: Arc<Poster>, requests: u64, in_flight: usize) -> Vec<i64> {
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..in_flight {
        let (poster, next) = (poster.clone(), next.clone());
        workers.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests {
                    return latencies;
                }
                let sent = Instant::now();
                poster.post(i).await;
                latencies.push(sent.elapsed().as_micros() as i64);
            }
        });
    }
    let mut all = Vec::with_capacity(requests as usize);
    while let Some(done) = workers.join_next().await {
        all.extend(done.unwrap_or_default());
    }
    all
}

/// Request i sent at `started + i / rate` (or once a slot frees, if all
/// `in_flight` are taken); returns every request's latency (µs), from its
/// send.
async fn paced(
    poster: Arc<Poster>,
    requests: u64,
    in_flight: usize,
    rate: f64,
    started: Instant,
) -> Vec<i64> {
    let slots = Arc::new(Semaphore::new(in_flight));
    let mut calls = JoinSet::new();
    let mut all = Vec::with_capacity(requests as usize);
    for i in 0..requests {
        let due = started + Duration::from_secs_f64(i as f64 / rate);
        if due > Instant::now() + PACING_STEP {
            tokio::time::sleep_until(due.into()).await;
        }
        let slot = slots.clone().acquire_owned().await.expect("never closed");
        let poster = poster.clone();
        calls.spawn(async move {
            let sent = Instant::now();
            poster.post(i).await;
            drop(slot);
            sent.elapsed().as_micros() as i64
        });
        while let Some(done) = calls.try_join_next() {
            all.extend(done.ok());
        }
    }
    while let Some(done) = calls.join_next().await {
        all.extend(done.ok());
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparison_events_are_one_per_key_each_a_first_version() {
        let e = event(42);
        assert_eq!((e.key.as_str(), e.version, e.seq), ("key-000042", 1, 42));
        assert_ne!(event(1).key, event(2).key);
        assert_eq!(
            event(7).json().to_string(),
            r#"{"key":"key-000007","seq":7,"version":1}"#
        );
    }
}
