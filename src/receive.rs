//! `keyflight receive`: a webhook receiver to point the HTTP sink at.
//!
//! It answers every request (any method, any path) as one *call*, records
//! what keyflight's headers said about it (key, version, tn, merged,
//! compensation, idempotency key) and what it answered, and can misbehave on
//! purpose: fail (503), throttle (429 with `Retry-After`), refuse a key for
//! good (422), answer slowly. That makes the sink's retries, its timeouts and
//! the compensation scan visible, by hand (one readable line per call) or in
//! a test (one JSON object per call in a log file, read back with
//! [`read_log`]). It also watches the sink's central promise: two calls for
//! the same key open at once are flagged as an overlap.
//!
//! The pure parts (the fault decision, key decoding, base64, overlap
//! bookkeeping, the counts) are plain functions and types; [`Receiver`]
//! serves them over any [`axum::serve::Listener`], [`bind`] makes a plain
//! or TLS one.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::{self, Debug};
use std::fs::File;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

/// The request headers the HTTP sink sends with every push.
pub use crate::sink::http as headers;

/// `GET` here answers the counts as JSON; it is not a call (not logged, not
/// counted, never delayed or failed), so tests can poll it.
pub const STATS_PATH: &str = "/_receive/stats";

/// The status logged for a call whose client closed the connection before
/// the answer (nginx's convention): a sink's timeout shows up as one.
pub const CLIENT_CLOSED: u16 = 499;

/// Bodies beyond this answer 400 (a receiver for tests, not a store).
pub const MAX_BODY: usize = 64 * 1024 * 1024;

/// How long a TLS client may take over its handshake before it is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Options and the fault decision
// ---------------------------------------------------------------------------

/// What a receiver does besides answering 200.
#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    pub faults: Faults,
    /// Every call (failures too) waits this long before its answer.
    pub delay: Duration,
    /// Plus a uniform random 0..jitter on top of `delay`.
    pub jitter: Duration,
    /// Seeds the one random generator behind faults and jitter.
    pub seed: u64,
    /// Append one JSON line per call here instead of printing a readable
    /// line per call to stdout.
    pub log: Option<PathBuf>,
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        ReceiveOptions {
            faults: Faults::default(),
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            seed: 0,
            log: None,
        }
    }
}

/// Injected answers: rates are probabilities per call, refused keys always.
#[derive(Debug, Clone, PartialEq)]
pub struct Faults {
    /// Probability of answering 503.
    pub fail_rate: f64,
    /// Probability of answering 429.
    pub throttle_rate: f64,
    /// The `Retry-After` of a 429, in seconds.
    pub retry_after: u64,
    /// Keys (decoded) answered 422 on every call.
    pub refuse_keys: BTreeSet<String>,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            fail_rate: 0.0,
            throttle_rate: 0.0,
            retry_after: 1,
            refuse_keys: BTreeSet::new(),
        }
    }
}

/// An answer the receiver made up instead of 200.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injection {
    /// 422 for a refused key: the sink must give up on it for good.
    Refuse,
    /// 429 with `Retry-After`: the sink must wait that long, then retry.
    Throttle,
    /// 503: the sink must retry.
    Fail,
}

impl Injection {
    /// The name in the log's `injected` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Injection::Refuse => "refuse",
            Injection::Throttle => "throttle",
            Injection::Fail => "fail",
        }
    }

    pub fn status(self) -> u16 {
        match self {
            Injection::Refuse => 422,
            Injection::Throttle => 429,
            Injection::Fail => 503,
        }
    }
}

/// One call's random numbers, each uniform in `[0, 1)`. Every call draws all
/// of them, in this order, whatever the options: a seed then replays the same
/// faults for the same sequence of calls.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Draws {
    pub throttle: f64,
    pub fail: f64,
    pub jitter: f64,
}

impl Draws {
    pub fn from_rng(rng: &mut impl Rng) -> Draws {
        Draws {
            throttle: rng.random(),
            fail: rng.random(),
            jitter: rng.random(),
        }
    }
}

impl Faults {
    /// Rates must be probabilities.
    pub fn validate(&self) -> Result<(), String> {
        for (flag, rate) in [
            ("--fail-rate", self.fail_rate),
            ("--throttle-rate", self.throttle_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!("{flag} must be between 0 and 1, not {rate}"));
            }
        }
        Ok(())
    }

    /// The injected answer for a call, if any. A refused key is refused on
    /// every call (a permanent error is permanent); otherwise throttling and
    /// failure are independent draws, throttling winning when both hit, so
    /// each rate is exactly the probability of its own draw.
    pub fn decide(&self, key: Option<&str>, draws: &Draws) -> Option<Injection> {
        if key.is_some_and(|key| self.refuse_keys.contains(key)) {
            Some(Injection::Refuse)
        } else if draws.throttle < self.throttle_rate {
            Some(Injection::Throttle)
        } else if draws.fail < self.fail_rate {
            Some(Injection::Fail)
        } else {
            None
        }
    }
}

/// The wait before a call's answer: `delay` plus `jitter` scaled by a draw.
pub fn wait_for(delay: Duration, jitter: Duration, draw: f64) -> Duration {
    delay + jitter.mul_f64(draw.clamp(0.0, 1.0))
}

// ---------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------

/// A `Keyflight-Key` header as the key it names: percent-decoded when that
/// gives UTF-8, else the header's raw text (so a key is always readable).
pub fn decode_key(raw: &[u8]) -> String {
    let decoded: Vec<u8> = percent_encoding::percent_decode(raw).collect();
    match String::from_utf8(decoded) {
        Ok(key) => key,
        Err(_) => String::from_utf8_lossy(raw).into_owned(),
    }
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 (RFC 4648, `+/`, padded).
pub fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(BASE64[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The inverse of [`base64_encode`]; padding is required, whitespace is not
/// allowed.
pub fn base64_decode(text: &str) -> Result<Vec<u8>, String> {
    let bytes = text.as_bytes();
    if !bytes.len().is_multiple_of(4) {
        return Err(format!(
            "base64 length {} is not a multiple of 4",
            bytes.len()
        ));
    }
    let value = |c: u8, at: usize| -> Result<u32, String> {
        match c {
            b'A'..=b'Z' => Ok(u32::from(c - b'A')),
            b'a'..=b'z' => Ok(u32::from(c - b'a') + 26),
            b'0'..=b'9' => Ok(u32::from(c - b'0') + 52),
            b'+' => Ok(62),
            b'/' => Ok(63),
            _ => Err(format!("invalid base64 character {:?} at {at}", c as char)),
        }
    };
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    let quads = bytes.len() / 4;
    for (q, quad) in bytes.chunks(4).enumerate() {
        // Padding only at the very end: `xx==` or `xxx=`.
        let padding = quad.iter().rev().take_while(|&&c| c == b'=').count();
        if padding > 2 || (padding > 0 && q + 1 != quads) {
            return Err(format!("misplaced base64 padding in group {}", q + 1));
        }
        let mut n = 0u32;
        for (i, &c) in quad.iter().enumerate() {
            let v = if i >= 4 - padding {
                0
            } else {
                value(c, q * 4 + i)?
            };
            n = (n << 6) | v;
        }
        let decoded = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&decoded[..3 - padding]);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Bookkeeping
// ---------------------------------------------------------------------------

/// Open calls per key. The sink keeps at most one push per key in flight,
/// so a call arriving while its key already has one open is an overlap.
#[derive(Debug, Default)]
pub struct OpenCalls {
    by_key: HashMap<String, u32>,
}

impl OpenCalls {
    /// Registers a call for `key`; true when another was already open.
    pub fn open(&mut self, key: &str) -> bool {
        let count = self.by_key.entry(key.to_string()).or_insert(0);
        *count += 1;
        *count > 1
    }

    /// Ends a call for `key` (a key with no open call is forgotten).
    pub fn close(&mut self, key: &str) {
        if let Some(count) = self.by_key.get_mut(key) {
            *count -= 1;
            if *count == 0 {
                self.by_key.remove(key);
            }
        }
    }

    /// Calls open now, all keys together.
    pub fn total(&self) -> u64 {
        self.by_key.values().map(|&n| u64::from(n)).sum()
    }
}

/// What a receiver has answered so far: the `/_receive/stats` JSON and the
/// summary at exit. `open` counts calls that arrived and are not answered
/// yet, so a test can wait for a call to be in progress.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Calls answered (or abandoned by their client).
    pub calls: u64,
    /// Answered calls by status code.
    pub by_status: BTreeMap<u16, u64>,
    /// Answered calls that arrived while their key had another call open.
    pub overlaps: u64,
    /// Calls arrived and not answered yet.
    #[serde(default)]
    pub open: u64,
}

impl Stats {
    pub fn record(&mut self, status: u16, overlapped: bool) {
        self.calls += 1;
        *self.by_status.entry(status).or_insert(0) += 1;
        if overlapped {
            self.overlaps += 1;
        }
    }

    /// `received N calls (200: a, 503: b), O overlaps`.
    pub fn summary(&self) -> String {
        let by_status: Vec<String> = self
            .by_status
            .iter()
            .map(|(status, n)| format!("{status}: {n}"))
            .collect();
        if by_status.is_empty() {
            format!("received {} calls, {} overlaps", self.calls, self.overlaps)
        } else {
            format!(
                "received {} calls ({}), {} overlaps",
                self.calls,
                by_status.join(", "),
                self.overlaps
            )
        }
    }
}

// ---------------------------------------------------------------------------
// The call record and its log
// ---------------------------------------------------------------------------

/// One call as the JSON log records it (one object per line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallRecord {
    /// Arrival order, from 1. Lines are written when a call is answered, so
    /// a slow call's line may come after a later call's.
    pub seq: u64,
    pub method: String,
    /// Path and query, as requested.
    pub path: String,
    /// `Keyflight-Key` percent-decoded (its raw text if that is not UTF-8).
    pub key: Option<String>,
    pub version: Option<u64>,
    pub tn: Option<u64>,
    pub merged: Option<u64>,
    pub compensation: Option<bool>,
    pub idempotency_key: Option<String>,
    pub content_type: Option<String>,
    /// The body when non-empty UTF-8.
    pub body: Option<String>,
    /// The body in base64 when non-empty and not UTF-8.
    pub body_base64: Option<String>,
    /// The status answered ([`CLIENT_CLOSED`] if the client left first).
    pub status: u16,
    /// `fail`, `throttle` or `refuse` when the answer was injected.
    pub injected: Option<String>,
    /// Arrival, ns since the Unix epoch.
    pub start_ns: u64,
    /// Just before the answer (after any delay), ns since the Unix epoch.
    pub end_ns: u64,
    /// Another call for the same key was open when this one arrived.
    pub overlapped: bool,
}

impl CallRecord {
    /// The body as it arrived (`None` when empty).
    pub fn body_bytes(&self) -> Option<Vec<u8>> {
        match (&self.body, &self.body_base64) {
            (Some(text), _) => Some(text.clone().into_bytes()),
            (None, Some(encoded)) => base64_decode(encoded).ok(),
            (None, None) => None,
        }
    }

    /// How long the call took to answer.
    pub fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.end_ns.saturating_sub(self.start_ns))
    }

    /// One readable line:
    /// `200 POST /users/u1 key=u1 v=12 merged=3 comp=false 14ms`.
    pub fn line(&self) -> String {
        let mut line = format!("{} {} {}", self.status, self.method, self.path);
        let mut field = |name: &str, value: Option<String>| {
            if let Some(value) = value {
                line.push_str(&format!(" {name}={value}"));
            }
        };
        field("key", self.key.clone());
        field("v", self.version.map(|v| v.to_string()));
        field("merged", self.merged.map(|v| v.to_string()));
        field("comp", self.compensation.map(|v| v.to_string()));
        field("injected", self.injected.clone());
        line.push_str(&format!(" {}ms", self.elapsed().as_millis()));
        if self.overlapped {
            line.push_str(" OVERLAPPED");
        }
        line
    }
}

/// Reads a `--log` file back, in file order (blank lines skipped).
pub fn read_log(path: &Path) -> Result<Vec<CallRecord>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the call log {}: {e}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line)
                .map_err(|e| format!("{}: line {}: not a call record: {e}", path.display(), i + 1))
        })
        .collect()
}

// ---------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------

/// A receiver ready to serve: options checked, log file open.
pub struct Receiver {
    shared: Arc<Shared>,
}

struct Shared {
    faults: Faults,
    delay: Duration,
    jitter: Duration,
    rng: Mutex<StdRng>,
    next_seq: AtomicU64,
    open: Mutex<OpenCalls>,
    stats: Mutex<Stats>,
    log: Option<(PathBuf, Mutex<File>)>,
}

impl Receiver {
    /// Checks the options and opens (creates, appends to) the log file.
    pub fn new(options: ReceiveOptions) -> Result<Receiver, String> {
        options.faults.validate()?;
        let log = match options.log {
            Some(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(|e| format!("cannot open the call log {}: {e}", path.display()))?;
                Some((path, Mutex::new(file)))
            }
            None => None,
        };
        Ok(Receiver {
            shared: Arc::new(Shared {
                faults: options.faults,
                delay: options.delay,
                jitter: options.jitter,
                rng: Mutex::new(StdRng::seed_from_u64(options.seed)),
                next_seq: AtomicU64::new(1),
                open: Mutex::new(OpenCalls::default()),
                stats: Mutex::new(Stats::default()),
                log,
            }),
        })
    }

    /// Serves until `shutdown` resolves, then lets open calls finish and
    /// returns the counts.
    pub async fn serve<L>(
        self,
        listener: L,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<Stats, String>
    where
        L: axum::serve::Listener,
        L::Addr: Debug,
    {
        let router = Router::new()
            .fallback(handle)
            .with_state(self.shared.clone());
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(|e| format!("the receiver stopped: {e}"))?;
        Ok(self.shared.stats())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take the receiver down with it.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Shared {
    fn stats(&self) -> Stats {
        let mut stats = lock(&self.stats).clone();
        stats.open = lock(&self.open).total();
        stats
    }

    /// Writes a finished call to the log (one whole line, one write) or to
    /// stdout, and counts it.
    fn record(&self, record: &CallRecord) {
        match &self.log {
            Some((path, file)) => {
                let mut line = serde_json::to_vec(record).unwrap_or_default();
                line.push(b'\n');
                let mut file = lock(file);
                if let Err(e) = file.write_all(&line).and_then(|()| file.flush()) {
                    tracing::error!("cannot write the call log {}: {e}", path.display());
                }
            }
            None => {
                let _ = writeln!(std::io::stdout().lock(), "{}", record.line());
            }
        }
        lock(&self.stats).record(record.status, record.overlapped);
    }
}

/// A call in progress. Finishing it closes its key and records it; a call
/// dropped unfinished (its client closed the connection, so hyper dropped
/// the handler) is recorded as [`CLIENT_CLOSED`], so a sink's timeout is
/// seen in the log like any other answer.
struct Call {
    shared: Arc<Shared>,
    record: CallRecord,
    open_key: Option<String>,
    finished: bool,
}

impl Call {
    fn finish(&mut self, status: u16) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.record.status = status;
        self.record.end_ns = now_ns();
        // Closed before the answer leaves: a sink that sends the key's next
        // push as soon as it has this answer must not look overlapping.
        if let Some(key) = self.open_key.take() {
            lock(&self.shared.open).close(&key);
        }
        self.shared.record(&self.record);
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.finish(CLIENT_CLOSED);
    }
}

fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
}

/// A numeric or boolean header; a malformed one is reported and read as absent.
fn header_parsed<T: std::str::FromStr>(headers: &HeaderMap, name: &str, seq: u64) -> Option<T> {
    let text = header_text(headers, name)?;
    match text.trim().parse() {
        Ok(value) => Some(value),
        Err(_) => {
            let _ = writeln!(
                std::io::stderr().lock(),
                "call {seq}: header {name} is malformed: `{text}`"
            );
            None
        }
    }
}

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let start_ns = now_ns();
    let (parts, body) = request.into_parts();
    if parts.method == Method::GET && parts.uri.path() == STATS_PATH {
        return stats_response(&shared.stats());
    }

    let seq = shared.next_seq.fetch_add(1, Ordering::Relaxed);
    let headers = &parts.headers;
    let key = headers
        .get(headers::KEY)
        .map(|value| decode_key(value.as_bytes()));
    let overlapped = match &key {
        Some(key) => lock(&shared.open).open(key),
        None => false,
    };
    if overlapped {
        let key = key.as_deref().unwrap_or_default();
        let _ = writeln!(
            std::io::stderr().lock(),
            "overlap: two calls for key {key} open at once"
        );
    }
    let mut call = Call {
        shared: shared.clone(),
        open_key: key.clone(),
        finished: false,
        record: CallRecord {
            seq,
            method: parts.method.to_string(),
            path: parts
                .uri
                .path_and_query()
                .map_or_else(|| parts.uri.path().to_string(), |pq| pq.to_string()),
            key,
            version: header_parsed(headers, headers::VERSION, seq),
            tn: header_parsed(headers, headers::TN, seq),
            merged: header_parsed(headers, headers::MERGED, seq),
            compensation: header_parsed(headers, headers::COMPENSATION, seq),
            idempotency_key: header_text(headers, headers::IDEMPOTENCY_KEY),
            content_type: header_text(headers, "content-type"),
            body: None,
            body_base64: None,
            status: 0,
            injected: None,
            start_ns,
            end_ns: 0,
            overlapped,
        },
    };

    let draws = Draws::from_rng(&mut *lock(&shared.rng));
    let wait = wait_for(shared.delay, shared.jitter, draws.jitter);
    let answer = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(bytes) => {
            if !bytes.is_empty() {
                match std::str::from_utf8(&bytes) {
                    Ok(text) => call.record.body = Some(text.to_string()),
                    Err(_) => call.record.body_base64 = Some(base64_encode(&bytes)),
                }
            }
            match shared.faults.decide(call.record.key.as_deref(), &draws) {
                Some(injection) => {
                    call.record.injected = Some(injection.as_str().to_string());
                    injected_answer(injection, call.record.key.as_deref(), &shared.faults)
                }
                None => (StatusCode::OK, HeaderMap::new(), String::new()),
            }
        }
        Err(e) => (
            StatusCode::BAD_REQUEST,
            HeaderMap::new(),
            format!("cannot read the request body: {e}\n"),
        ),
    };
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    let (status, headers, body) = answer;
    call.finish(status.as_u16());
    (status, headers, body).into_response()
}

fn injected_answer(
    injection: Injection,
    key: Option<&str>,
    faults: &Faults,
) -> (StatusCode, HeaderMap, String) {
    let mut headers = HeaderMap::new();
    let body = match injection {
        Injection::Refuse => format!(
            "key `{}` is refused (--refuse-key)\n",
            key.unwrap_or_default()
        ),
        Injection::Throttle => {
            headers.insert(
                axum::http::header::RETRY_AFTER,
                HeaderValue::from(faults.retry_after),
            );
            "injected throttle\n".to_string()
        }
        Injection::Fail => "injected failure\n".to_string(),
    };
    let status = StatusCode::from_u16(injection.status()).unwrap_or(StatusCode::OK);
    (status, headers, body)
}

fn stats_response(stats: &Stats) -> Response {
    let body = serde_json::to_string(stats).unwrap_or_default();
    (
        StatusCode::OK,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

// ---------------------------------------------------------------------------
// Listening, plain or TLS
// ---------------------------------------------------------------------------

/// The PEM files of `--tls-cert` and `--tls-key`.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The certificate chain, server certificate first.
    pub cert: PathBuf,
    /// The server certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// A TLS acceptor (rustls, ring) serving the certificate in `files`.
pub fn tls_acceptor(files: &TlsFiles) -> Result<TlsAcceptor, String> {
    use rustls_pki_types::pem::{self, PemObject};
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    let read = |path: &Path, what: &str| {
        std::fs::read(path)
            .map_err(|e| format!("cannot read the TLS {what} {}: {e}", path.display()))
    };
    let cert_pem = read(&files.cert, "certificate")?;
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM certificate: {e}", files.cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no CERTIFICATE in it (expected a PEM certificate chain, server certificate first)",
            files.cert.display()
        ));
    }
    let key_pem = read(&files.key, "key")?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        pem::Error::NoItemsFound => format!(
            "{}: no private key in it (expected a PEM PKCS#8, PKCS#1 or SEC1 key)",
            files.key.display()
        ),
        e => format!("{}: not a PEM private key: {e}", files.key.display()),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            format!(
                "{} with {}: not a usable certificate and key: {e}",
                files.cert.display(),
                files.key.display()
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A TCP listener that hands out connections once their TLS handshake
/// succeeded. Handshakes run concurrently, so a slow or silent client
/// delays no one; a failed one is logged at debug and dropped, never the
/// end of the server.
pub struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    handshakes: JoinSet<Result<(tokio_rustls::server::TlsStream<TcpStream>, SocketAddr), String>>,
}

impl TlsListener {
    pub fn new(tcp: TcpListener, acceptor: TlsAcceptor) -> TlsListener {
        TlsListener {
            tcp,
            acceptor,
            handshakes: JoinSet::new(),
        }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    // Cancel-safe (axum drops it at shutdown): handshakes in progress live in
    // `self`, and TcpListener::accept and JoinSet::join_next lose nothing.
    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            tokio::select! {
                accepted = self.tcp.accept() => match accepted {
                    Ok((stream, addr)) => {
                        let acceptor = self.acceptor.clone();
                        self.handshakes.spawn(async move {
                            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                                Ok(Ok(stream)) => Ok((stream, addr)),
                                Ok(Err(e)) => Err(format!("TLS handshake with {addr} failed: {e}")),
                                Err(_) => Err(format!("TLS handshake with {addr} timed out")),
                            }
                        });
                    }
                    Err(e) => {
                        tracing::debug!("accept failed: {e}");
                        // Out of file descriptors and the like: let some close.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    match done {
                        Ok(Ok(connection)) => return connection,
                        Ok(Err(e)) => tracing::debug!("{e}"),
                        Err(e) => tracing::debug!("TLS handshake task failed: {e}"),
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// A bound listening socket, plain or TLS.
pub struct Bound {
    tcp: TcpListener,
    tls: Option<TlsAcceptor>,
    addr: SocketAddr,
}

impl fmt::Debug for Bound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bound")
            .field("addr", &self.addr)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// Binds `listen` (`HOST:PORT`; port 0 picks a free one), loading the TLS
/// files first so that a bad file fails before anything listens.
pub async fn bind(listen: &str, tls: Option<&TlsFiles>) -> Result<Bound, String> {
    let tls = tls.map(tls_acceptor).transpose()?;
    let tcp = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let addr = tcp
        .local_addr()
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    Ok(Bound { tcp, tls, addr })
}

impl Bound {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR` or `https://ADDR`.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// [`Receiver::serve`] on this socket.
    pub async fn serve(
        self,
        receiver: Receiver,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<Stats, String> {
        match self.tls {
            Some(acceptor) => {
                receiver
                    .serve(TlsListener::new(self.tcp, acceptor), shutdown)
                    .await
            }
            None => receiver.serve(self.tcp, shutdown).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draws(throttle: f64, fail: f64) -> Draws {
        Draws {
            throttle,
            fail,
            jitter: 0.0,
        }
    }

    fn faults(fail: f64, throttle: f64, refuse: &[&str]) -> Faults {
        Faults {
            fail_rate: fail,
            throttle_rate: throttle,
            retry_after: 1,
            refuse_keys: refuse.iter().map(|k| k.to_string()).collect(),
        }
    }

    #[test]
    fn refusal_wins_over_throttle_which_wins_over_fail() {
        let all = faults(1.0, 1.0, &["k1"]);
        assert_eq!(
            all.decide(Some("k1"), &draws(0.0, 0.0)),
            Some(Injection::Refuse)
        );
        assert_eq!(
            all.decide(Some("k2"), &draws(0.0, 0.0)),
            Some(Injection::Throttle)
        );
        assert_eq!(
            all.decide(None, &draws(0.5, 0.5)),
            Some(Injection::Throttle)
        );
        let fail = faults(1.0, 0.0, &["k1"]);
        assert_eq!(
            fail.decide(Some("k2"), &draws(0.0, 0.99)),
            Some(Injection::Fail)
        );
        assert_eq!(
            fail.decide(Some("k1"), &draws(0.99, 0.99)),
            Some(Injection::Refuse)
        );
    }

    #[test]
    fn a_rate_is_the_probability_of_its_draw() {
        let f = faults(0.3, 0.1, &[]);
        assert_eq!(
            f.decide(Some("k"), &draws(0.09, 0.9)),
            Some(Injection::Throttle)
        );
        assert_eq!(
            f.decide(Some("k"), &draws(0.1, 0.29)),
            Some(Injection::Fail)
        );
        assert_eq!(f.decide(Some("k"), &draws(0.1, 0.3)), None);
        let none = Faults::default();
        assert_eq!(none.decide(Some("k"), &draws(0.0, 0.0)), None);
        // Over many seeded calls the rates come out as given.
        let mut rng = StdRng::seed_from_u64(7);
        let mut counts = [0u32; 3];
        for _ in 0..20_000 {
            match f.decide(Some("k"), &Draws::from_rng(&mut rng)) {
                Some(Injection::Throttle) => counts[0] += 1,
                Some(Injection::Fail) => counts[1] += 1,
                _ => counts[2] += 1,
            }
        }
        assert!((1_800..2_200).contains(&counts[0]), "{counts:?}");
        // Fail: 0.9 * 0.3 = 27%.
        assert!((5_000..5_800).contains(&counts[1]), "{counts:?}");
    }

    #[test]
    fn rates_outside_0_1_are_refused_naming_the_flag() {
        let error = faults(1.5, 0.0, &[]).validate().unwrap_err();
        assert!(error.contains("--fail-rate"), "{error}");
        let error = faults(0.0, -0.1, &[]).validate().unwrap_err();
        assert!(error.contains("--throttle-rate"), "{error}");
        assert!(faults(0.0, 1.0, &[]).validate().is_ok());
    }

    #[test]
    fn wait_is_delay_plus_scaled_jitter() {
        let ms = Duration::from_millis;
        assert_eq!(wait_for(ms(20), ms(10), 0.0), ms(20));
        assert_eq!(wait_for(ms(20), ms(10), 0.5), ms(25));
        assert_eq!(wait_for(ms(0), ms(0), 0.7), ms(0));
    }

    #[test]
    fn keys_are_percent_decoded_or_left_raw() {
        assert_eq!(decode_key(b"user-1_a.b~c"), "user-1_a.b~c");
        assert_eq!(decode_key(b"user%201%2F%C3%A9"), "user 1/é");
        // Not UTF-8 once decoded: the header text as it came.
        assert_eq!(decode_key(b"bin%FF%00"), "bin%FF%00");
        // A stray percent sign is kept.
        assert_eq!(decode_key(b"50%"), "50%");
    }

    #[test]
    fn base64_matches_rfc_4648_and_round_trips() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(plain.as_bytes()), encoded);
            assert_eq!(base64_decode(encoded).unwrap(), plain.as_bytes());
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(base64_decode(&base64_encode(&all)).unwrap(), all);
        assert_eq!(base64_encode(&[0xff, 0xfe]), "//4=");
        for bad in ["Zm9", "Zm9v!A==", "Zg==Zg==", "Z===", "Zm9v\n"] {
            assert!(base64_decode(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_second_open_call_for_a_key_overlaps() {
        let mut open = OpenCalls::default();
        assert!(!open.open("a"));
        assert!(!open.open("b"));
        assert!(open.open("a"));
        assert_eq!(open.total(), 3);
        open.close("a");
        assert!(open.open("a"), "one call for a is still open");
        open.close("a");
        open.close("a");
        assert!(!open.open("a"));
        open.close("never-opened");
        assert_eq!(open.total(), 2);
    }

    #[test]
    fn stats_count_and_summarise() {
        let mut stats = Stats::default();
        assert_eq!(stats.summary(), "received 0 calls, 0 overlaps");
        stats.record(200, false);
        stats.record(503, false);
        stats.record(200, true);
        assert_eq!(
            stats.summary(),
            "received 3 calls (200: 2, 503: 1), 1 overlaps"
        );
        let json: serde_json::Value = serde_json::to_value(&stats).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"calls":3,"by_status":{"200":2,"503":1},"overlaps":1,"open":0})
        );
    }

    fn record() -> CallRecord {
        CallRecord {
            seq: 1,
            method: "POST".into(),
            path: "/users/u1".into(),
            key: Some("u1".into()),
            version: Some(12),
            tn: Some(99),
            merged: Some(3),
            compensation: Some(false),
            idempotency_key: Some("u1:12".into()),
            content_type: Some("application/json".into()),
            body: Some("{}".into()),
            body_base64: None,
            status: 200,
            injected: None,
            start_ns: 1_000_000_000,
            end_ns: 1_014_000_000,
            overlapped: false,
        }
    }

    #[test]
    fn a_record_reads_as_one_line() {
        let mut r = record();
        assert_eq!(
            r.line(),
            "200 POST /users/u1 key=u1 v=12 merged=3 comp=false 14ms"
        );
        r.status = 503;
        r.injected = Some("fail".into());
        r.overlapped = true;
        r.key = None;
        assert_eq!(
            r.line(),
            "503 POST /users/u1 v=12 merged=3 comp=false injected=fail 14ms OVERLAPPED"
        );
    }

    #[test]
    fn body_bytes_come_back_from_text_or_base64() {
        let mut r = record();
        assert_eq!(r.body_bytes(), Some(b"{}".to_vec()));
        r.body = None;
        r.body_base64 = Some(base64_encode(&[0xff, 0, 1]));
        assert_eq!(r.body_bytes(), Some(vec![0xff, 0, 1]));
        r.body_base64 = None;
        assert_eq!(r.body_bytes(), None);
    }

    #[test]
    fn read_log_round_trips_and_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("calls.jsonl");
        let mut second = record();
        second.seq = 2;
        second.key = None;
        let text = format!(
            "{}\n\n{}\n",
            serde_json::to_string(&record()).unwrap(),
            serde_json::to_string(&second).unwrap()
        );
        std::fs::write(&path, text).unwrap();
        assert_eq!(read_log(&path).unwrap(), vec![record(), second]);
        let line = serde_json::to_string(&record()).unwrap();
        std::fs::write(&path, format!("{line}\n{{\"seq\":\n")).unwrap();
        let error = read_log(&path).unwrap_err();
        assert!(error.contains("calls.jsonl: line 2"), "{error}");
        let error = read_log(&dir.path().join("missing.jsonl")).unwrap_err();
        assert!(error.contains("missing.jsonl"), "{error}");
    }

    #[test]
    fn null_key_is_serialized_as_null() {
        let mut r = record();
        r.key = None;
        let json: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert!(json["key"].is_null());
        assert!(json["body_base64"].is_null());
        let names: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(names.len(), 17, "{names:?}");
    }
}
