//! The HTTP sink: one request per push to `sink.http.url`.
//!
//! The request carries the push's value as its body (in the input format)
//! and its metadata as headers; `Idempotency-Key` (key and version) lets
//! the endpoint drop repeats, which retries and compensation produce by
//! design. A delete is a `DELETE` without a body.
//!
//! How an answer counts is [`classify`]: a 2xx acknowledges the push
//! (markT2); 408, 429 (no sooner than its `Retry-After`), 5xx, timeouts and
//! connection failures are retried with the key's newest value while its
//! marker stays open; every other status refuses the push for good, and its
//! dead letter carries the status and the start of the answer.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use reqwest::Url;
use tokio::sync::Semaphore;

use crate::codec::InputFormat;
use crate::config::{HeaderValueSetting, HttpMethod, Settings};
use crate::engine::Push;
use crate::internal_events::{HttpCallEnded, HttpCallStarted};
use crate::metrics::Metrics;
use crate::processor::task::{ProduceError, SinkAnswer};

/// Headers every request carries, set by keyflight (configuration may not).
pub const RESERVED_HEADERS: &[&str] = &[KEY, VERSION, TN, MERGED, COMPENSATION, IDEMPOTENCY_KEY];
pub const KEY: &str = "Keyflight-Key";
pub const VERSION: &str = "Keyflight-Version";
pub const TN: &str = "Keyflight-Tn";
pub const MERGED: &str = "Keyflight-Merged";
pub const COMPENSATION: &str = "Keyflight-Compensation";
/// `<key>:<version>`, the key percent-encoded as in `Keyflight-Key`.
pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";

/// How much of a refusal's body its dead letter keeps.
const EXCERPT_BYTES: usize = 512;

/// RFC 3986's unreserved characters stay as they are; every other byte of
/// a key is percent-encoded, in the URL and in the headers alike.
const KEY_ESCAPES: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A key as the URL and the headers carry it.
pub fn encode_key(key: &[u8]) -> String {
    percent_encoding::percent_encode(key, KEY_ESCAPES).to_string()
}

/// The configured endpoint and the client that calls it.
pub struct HttpSink {
    client: reqwest::Client,
    target: Target,
    method: reqwest::Method,
    /// Configured headers, resolved at start.
    headers: HeaderMap,
    /// A body's type: configured, or what the input format holds.
    content_type: HeaderValue,
    timeout: Duration,
    /// Requests in flight across keys and partitions (`max_in_flight`).
    slots: Semaphore,
    metrics: Arc<Metrics>,
}

/// Where a push's request goes: `sink.http.url` with the key in place of
/// each `{key}`. What does not depend on the key is parsed once.
enum Target {
    /// No `{key}`: one URL for every push.
    Fixed(Url),
    /// `{key}` only in the path or the query: each push's path and query
    /// are resolved against the origin parsed at start, so the host is not
    /// parsed again per request.
    Relative {
        origin: Url,
        /// The path and query, split at each `{key}`.
        rest: Vec<String>,
    },
    /// `{key}` in the host (or anywhere before the path): the whole URL is
    /// parsed per request.
    Whole(Vec<String>),
}

impl Target {
    fn new(template: &str) -> Result<Target, String> {
        let parse = |url: &str| {
            Url::parse(url).map_err(|e| format!("sink.http.url: `{template}` is not a URL ({e})"))
        };
        let Some(first_key) = template.find("{key}") else {
            return parse(template).map(Target::Fixed);
        };
        let split = |text: &str| text.split("{key}").map(str::to_string).collect();
        // The path starts at the first `/`, `?` or `#` after `scheme://`.
        let path_start = template.find("://").and_then(|scheme_end| {
            let authority = scheme_end + 3;
            template[authority..]
                .find(['/', '?', '#'])
                .map(|at| authority + at)
        });
        // A path starting `//` would resolve as another host's.
        let resolvable = |at: usize| {
            let slash = |b: Option<&u8>| matches!(b, Some(b'/' | b'\\'));
            let path = &template.as_bytes()[at..];
            !(slash(path.first()) && slash(path.get(1)))
        };
        match path_start {
            Some(path_start) if path_start < first_key && resolvable(path_start) => {
                Ok(Target::Relative {
                    origin: parse(&template[..path_start])?,
                    rest: split(&template[path_start..]),
                })
            }
            _ => Ok(Target::Whole(split(template))),
        }
    }

    /// The URL of a push for `key` (percent-encoded).
    fn url(&self, key: &str) -> Result<Url, String> {
        let url = match self {
            Target::Fixed(url) => return Ok(url.clone()),
            Target::Relative { origin, rest } => origin.join(&rest.join(key)),
            Target::Whole(parts) => Url::parse(&parts.join(key)),
        };
        url.map_err(|e| format!("the key makes the URL invalid ({e})"))
    }
}

/// The metadata headers' names, built once (names are case-insensitive;
/// HTTP/1 sends them as written here).
static KEY_NAME: HeaderName = HeaderName::from_static("keyflight-key");
static VERSION_NAME: HeaderName = HeaderName::from_static("keyflight-version");
static TN_NAME: HeaderName = HeaderName::from_static("keyflight-tn");
static MERGED_NAME: HeaderName = HeaderName::from_static("keyflight-merged");
static COMPENSATION_NAME: HeaderName = HeaderName::from_static("keyflight-compensation");
static IDEMPOTENCY_KEY_NAME: HeaderName = HeaderName::from_static("idempotency-key");

impl HttpSink {
    /// Reads the headers' environment variables and the CA file; every
    /// error names its configuration key.
    pub fn new(settings: &Settings, metrics: Arc<Metrics>) -> Result<HttpSink, String> {
        let http = &settings.sink.http;
        let mut headers = HeaderMap::new();
        for (name, value) in &http.headers {
            let key = format!("sink.http.headers.{name}");
            let text = match value {
                HeaderValueSetting::Text(text) => text.clone(),
                HeaderValueSetting::Env { env } => std::env::var(env).map_err(|_| {
                    format!("{key}: environment variable `{env}` is not set (or not UTF-8)")
                })?,
            };
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("{key}: not a header name"))?;
            let mut value = HeaderValue::from_str(&text)
                .map_err(|_| format!("{key}: not a valid header value"))?;
            // Kept out of reqwest's debug output: values may be credentials.
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        let mut client = reqwest::Client::builder()
            // A redirect would repeat a push to a place nobody configured.
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(http.max_in_flight)
            .connect_timeout(http.timeout)
            // Every request's bound, set once rather than on each request.
            .timeout(http.timeout);
        if let Some(file) = &http.ca_file {
            let pem = std::fs::read(file)
                .map_err(|e| format!("sink.http.ca_file: cannot read `{}`: {e}", file.display()))?;
            let certificates = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                format!(
                    "sink.http.ca_file: `{}` holds no PEM certificate ({e})",
                    file.display()
                )
            })?;
            if certificates.is_empty() {
                return Err(format!(
                    "sink.http.ca_file: `{}` holds no PEM certificate",
                    file.display()
                ));
            }
            for certificate in certificates {
                client = client.add_root_certificate(certificate);
            }
        }
        let client = client
            .build()
            .map_err(|e| format!("sink.http: cannot build the HTTP client ({e})"))?;
        Ok(HttpSink {
            client,
            target: Target::new(&http.url)?,
            method: match http.method {
                HttpMethod::Post => reqwest::Method::POST,
                HttpMethod::Put => reqwest::Method::PUT,
            },
            content_type: headers
                .remove(CONTENT_TYPE)
                .unwrap_or_else(|| HeaderValue::from_static(content_type(settings.input.format))),
            headers,
            timeout: http.timeout,
            slots: Semaphore::new(http.max_in_flight),
            metrics,
        })
    }

    /// Sends one push (`value`: `None` for a delete) and says how it went.
    pub async fn call(&self, push: &Push, value: Option<Bytes>) -> Result<(), ProduceError> {
        // The semaphore is never closed.
        let _slot = self.slots.acquire().await;
        let mut call = Call::start(&self.metrics);
        let (outcome, status) = self.request(push, value).await;
        call.status = status;
        call.retried = matches!(
            outcome,
            Err(ProduceError::Retriable(_) | ProduceError::Throttled { .. })
        );
        outcome
    }

    /// The request for a push, as [`HttpSink::call`] sends it.
    fn build(&self, push: &Push, value: Option<Bytes>) -> Result<reqwest::Request, String> {
        let key = encode_key(&push.key);
        let url = self.target.url(&key)?;
        let method = match value {
            Some(_) => self.method.clone(),
            None => reqwest::Method::DELETE,
        };
        let mut request = reqwest::Request::new(method, url);
        let headers = request.headers_mut();
        headers.reserve(self.headers.len() + 7);
        for (name, value) in &self.headers {
            headers.append(name, value.clone());
        }
        // Digits and percent-encoded keys are always valid header values.
        let text = |s: String| {
            HeaderValue::from_maybe_shared(Bytes::from(s))
                .map_err(|e| format!("not a header value: {e}"))
        };
        let number = |n: u64| text(itoa::Buffer::new().format(n).to_owned());
        let version = itoa::Buffer::new().format(push.version).to_owned();
        headers.insert(&IDEMPOTENCY_KEY_NAME, text(format!("{key}:{version}"))?);
        headers.insert(&VERSION_NAME, text(version)?);
        headers.insert(&TN_NAME, number(push.tn)?);
        headers.insert(&MERGED_NAME, number(push.merged.into())?);
        headers.insert(
            &COMPENSATION_NAME,
            HeaderValue::from_static(if push.compensation { "true" } else { "false" }),
        );
        headers.insert(&KEY_NAME, text(key)?);
        if let Some(value) = value {
            headers.insert(CONTENT_TYPE, self.content_type.clone());
            *request.body_mut() = Some(value.into());
        }
        Ok(request)
    }

    async fn request(
        &self,
        push: &Push,
        value: Option<Bytes>,
    ) -> (Result<(), ProduceError>, Option<u16>) {
        let request = match self.build(push, value) {
            Ok(request) => request,
            Err(e) => return (Err(ProduceError::Refused(e)), None),
        };
        // Only a failure names the URL: it is built again then.
        let url = || {
            let key = encode_key(&push.key);
            self.target.url(&key).map_or(key, String::from)
        };
        let response = match self.client.execute(request).await {
            Ok(response) => response,
            Err(e) => return (Err(transport_error(&url(), &e, self.timeout)), None),
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let excerpt = if response.status().is_success() {
            String::new()
        } else {
            excerpt(response).await
        };
        let outcome = classify(status, retry_after.as_deref(), excerpt, SystemTime::now());
        (outcome.map_err(|e| with_url(e, &url())), Some(status))
    }
}

/// One request's metrics; it ends when dropped, so a call abandoned at a
/// close leaves the in-flight gauge too.
struct Call<'a> {
    metrics: &'a Metrics,
    started: Instant,
    status: Option<u16>,
    retried: bool,
}

impl<'a> Call<'a> {
    fn start(metrics: &'a Metrics) -> Self {
        metrics.emit(HttpCallStarted);
        Call {
            metrics,
            started: Instant::now(),
            status: None,
            retried: false,
        }
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        self.metrics.emit(HttpCallEnded {
            status: self.status,
            elapsed: self.started.elapsed(),
            retried: self.retried,
        });
    }
}

/// How a request's answer counts for its push.
pub fn classify(
    status: u16,
    retry_after: Option<&str>,
    excerpt: String,
    now: SystemTime,
) -> Result<(), ProduceError> {
    match status {
        200..=299 => Ok(()),
        429 => Err(ProduceError::Throttled {
            message: format!("HTTP 429 (too many requests): {excerpt}"),
            retry_after: retry_after
                .and_then(|text| parse_retry_after(text, now))
                .unwrap_or_default(),
        }),
        408 | 500..=599 => Err(ProduceError::Retriable(format!("HTTP {status}: {excerpt}"))),
        _ => Err(ProduceError::Rejected(SinkAnswer { status, excerpt })),
    }
}

/// `Retry-After` as seconds or as an HTTP date (RFC 9110 §10.2.3).
pub fn parse_retry_after(text: &str, now: SystemTime) -> Option<Duration> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(text).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

/// The content type of a push's body: what the input format holds.
fn content_type(format: InputFormat) -> &'static str {
    match format {
        InputFormat::Json => "application/json",
        InputFormat::Avro => "avro/binary",
        InputFormat::Raw => "application/octet-stream",
    }
}

/// The start of an answer's body, as text (lossy), for a dead letter.
async fn excerpt(mut response: reqwest::Response) -> String {
    let mut body = Vec::new();
    while body.len() < EXCERPT_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    body.truncate(EXCERPT_BYTES);
    String::from_utf8_lossy(&body).trim().to_string()
}

/// A request that got no answer: worth another attempt, unless it could
/// not even be built.
fn transport_error(url: &str, error: &reqwest::Error, timeout: Duration) -> ProduceError {
    if error.is_builder() {
        ProduceError::Refused(format!("cannot build the request to {url}: {error}"))
    } else if error.is_timeout() {
        ProduceError::Retriable(format!(
            "{url}: no answer within {} (sink.http.timeout)",
            humantime::format_duration(timeout)
        ))
    } else {
        // reqwest's Display stops at its own layer; the cause says why.
        let mut message = error.to_string();
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        ProduceError::Retriable(message)
    }
}

/// Names the URL in a failure's message.
fn with_url(error: ProduceError, url: &str) -> ProduceError {
    match error {
        ProduceError::Retriable(m) => ProduceError::Retriable(format!("{url}: {m}")),
        ProduceError::Throttled {
            message,
            retry_after,
        } => ProduceError::Throttled {
            message: format!("{url}: {message}"),
            retry_after,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(seconds)
    }

    #[test]
    fn a_2xx_acknowledges_and_every_other_status_has_one_meaning() {
        for status in [200, 201, 202, 204, 299] {
            assert_eq!(classify(status, None, String::new(), at(0)), Ok(()));
        }
        for status in [408, 500, 502, 503, 504, 599] {
            assert!(matches!(
                classify(status, None, "busy".into(), at(0)),
                Err(ProduceError::Retriable(m)) if m.contains(&status.to_string()) && m.contains("busy")
            ));
        }
        for status in [300, 301, 400, 401, 403, 404, 409, 422, 451] {
            assert_eq!(
                classify(status, None, "no".into(), at(0)),
                Err(ProduceError::Rejected(SinkAnswer {
                    status,
                    excerpt: "no".into()
                }))
            );
        }
    }

    #[test]
    fn a_429_waits_as_long_as_its_retry_after_says() {
        let throttled = |header| match classify(429, header, String::new(), at(1_000)) {
            Err(ProduceError::Throttled { retry_after, .. }) => retry_after,
            other => panic!("not throttled: {other:?}"),
        };
        assert_eq!(throttled(Some("7")), Duration::from_secs(7));
        assert_eq!(throttled(Some(" 0 ")), Duration::ZERO);
        // An HTTP date 30 s after now; one in the past means at once.
        let later = httpdate::fmt_http_date(at(1_030));
        assert_eq!(throttled(Some(&later)), Duration::from_secs(30));
        let earlier = httpdate::fmt_http_date(at(900));
        assert_eq!(throttled(Some(&earlier)), Duration::ZERO);
        // Missing or unreadable: the backoff alone.
        assert_eq!(throttled(None), Duration::ZERO);
        assert_eq!(throttled(Some("soon")), Duration::ZERO);
    }

    #[test]
    fn a_push_url_is_the_template_with_the_key_wherever_it_stands() {
        let url = |template: &str, key: &str| {
            Target::new(template)
                .unwrap()
                .url(&encode_key(key.as_bytes()))
                .unwrap()
                .to_string()
        };
        // In the path and the query: resolved against the parsed origin.
        assert!(matches!(
            Target::new("http://h:8/p/{key}").unwrap(),
            Target::Relative { .. }
        ));
        assert_eq!(url("http://h:8/p/{key}", "a/b c"), "http://h:8/p/a%2Fb%20c");
        assert_eq!(
            url("http://h:8/p/{key}/x?k={key}", "a"),
            "http://h:8/p/a/x?k=a"
        );
        assert_eq!(url("https://u:pw@h/?k={key}", "a"), "https://u:pw@h/?k=a");
        assert_eq!(url("http://h:8/p/{key}", ".."), "http://h:8/");
        assert_eq!(url("http://h:8//p/{key}", "a"), "http://h:8//p/a");
        // In the host: parsed whole.
        assert!(matches!(
            Target::new("http://{key}.h/p").unwrap(),
            Target::Whole(_)
        ));
        assert_eq!(url("http://{key}.h/p", "a"), "http://a.h/p");
        // Without a key: one URL.
        assert!(matches!(
            Target::new("http://h/p").unwrap(),
            Target::Fixed(_)
        ));
        assert_eq!(url("http://h/p", "a"), "http://h/p");
        // A key the host cannot hold is a failed push, not a panic.
        assert!(Target::new("http://{key}/p").unwrap().url("%FF").is_err());
    }

    #[test]
    fn a_request_carries_the_push_metadata_and_the_configured_headers() {
        let mut settings = Settings::default();
        settings.sink.http.url = "http://127.0.0.1:9/push/{key}".into();
        settings
            .sink
            .http
            .headers
            .insert("X-Team".into(), HeaderValueSetting::Text("ops".into()));
        let sink = HttpSink::new(&settings, Arc::new(Metrics::new())).unwrap();
        let push = Push {
            key: Bytes::from_static(b"user 7"),
            version: 12,
            tn: 3,
            merged: 4,
            payload: crate::engine::Payload::Tombstone,
            offset: None,
            compensation: true,
            acked_tn: 0,
        };
        let request = sink.build(&push, Some(Bytes::from_static(b"{}"))).unwrap();
        assert_eq!(request.method(), reqwest::Method::POST);
        assert_eq!(request.url().as_str(), "http://127.0.0.1:9/push/user%207");
        let header = |name: &str| request.headers()[name].to_str().unwrap().to_string();
        assert_eq!(header(KEY), "user%207");
        assert_eq!(header(VERSION), "12");
        assert_eq!(header(TN), "3");
        assert_eq!(header(MERGED), "4");
        assert_eq!(header(COMPENSATION), "true");
        assert_eq!(header(IDEMPOTENCY_KEY), "user%207:12");
        assert_eq!(header("x-team"), "ops");
        assert_eq!(header("content-type"), "application/json");
        assert_eq!(request.timeout(), None, "the client's timeout applies");
        let delete = sink.build(&push, None).unwrap();
        assert_eq!(delete.method(), reqwest::Method::DELETE);
        assert!(delete.body().is_none() && !delete.headers().contains_key("content-type"));
    }

    #[test]
    fn keys_keep_unreserved_characters_and_escape_everything_else() {
        assert_eq!(encode_key(b"user-42_a.b~c"), "user-42_a.b~c");
        assert_eq!(encode_key(b"a/b c?d#e%"), "a%2Fb%20c%3Fd%23e%25");
        assert_eq!(encode_key(&[0xff, 0x00, b'x']), "%FF%00x");
        assert_eq!(encode_key("é".as_bytes()), "%C3%A9");
    }
}
