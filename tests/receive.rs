//! `keyflight receive`, the webhook receiver, as the real binary: the JSON
//! call log, injected faults, overlap detection, TLS, flag errors, and the
//! summary at SIGTERM. Synchronisation is by events: the listening line on
//! stdout and polling `/_receive/stats`.

use std::io::{Read, Write};
use std::path::Path;
use std::process::Output;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keyflight::receive::{read_log, CallRecord};

use crate::support::{certificates, keyflight, start_receiver};

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn log_path(dir: &tempfile::TempDir) -> String {
    dir.path().join("calls.jsonl").to_str().unwrap().to_string()
}

fn sorted_log(path: &str) -> Vec<CallRecord> {
    let mut records = read_log(Path::new(path)).unwrap();
    records.sort_by_key(|r| r.seq);
    records
}

#[tokio::test]
async fn calls_are_logged_as_json_lines_with_every_field() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_path(&dir);
    let mut receiver = start_receiver(&["--log", &log]);
    let client = reqwest::Client::new();
    let before = now_ns();

    let response = client
        .post(receiver.url("/users/user%201?source=test"))
        .header("Keyflight-Key", "user%201%2F%C3%A9")
        .header("Keyflight-Version", "12")
        .header("Keyflight-Tn", "1700000000123456789")
        .header("Keyflight-Merged", "3")
        .header("Keyflight-Compensation", "false")
        .header("Idempotency-Key", "user%201%2F%C3%A9:12")
        .header("Content-Type", "application/json")
        .body(r#"{"name":"Ada"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.bytes().await.unwrap().len(), 0);

    let binary = vec![0xff, 0x00, 0x80, 0x41];
    let response = client
        .put(receiver.url("/blobs"))
        .header("Keyflight-Key", "bin%FF")
        .header("Keyflight-Version", "7")
        .header("Keyflight-Compensation", "true")
        .header("Content-Type", "application/octet-stream")
        .body(binary.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let response = client
        .delete(receiver.url("/users/k3"))
        .header("Keyflight-Key", "k3")
        .header("Keyflight-Version", "5")
        .header("Keyflight-Merged", "1")
        .header("Idempotency-Key", "k3:5")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let response = client.get(receiver.url("/plain")).send().await.unwrap();
    assert_eq!(response.status(), 200);

    // The stats endpoint answers the counts and is not a call itself.
    let stats = receiver.stats(&client).await;
    assert_eq!(stats.calls, 4, "{stats:?}");
    assert_eq!(stats.by_status.get(&200), Some(&4));
    assert_eq!(stats.overlaps, 0);

    // Each line was written before its response: all four are there now.
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.lines().count(), 4, "{text}");
    for line in text.lines() {
        let value: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(value.as_object().unwrap().len(), 17, "{line}");
    }
    let records = read_log(Path::new(&log)).unwrap();
    let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, [1, 2, 3, 4], "sequential calls, in file order");
    let after = now_ns();
    for r in &records {
        assert!(
            before <= r.start_ns && r.start_ns <= r.end_ns && r.end_ns <= after,
            "{r:?}"
        );
        assert_eq!(
            (r.status, r.injected.as_deref(), r.overlapped),
            (200, None, false)
        );
    }

    let post = &records[0];
    assert_eq!(post.method, "POST");
    assert_eq!(post.path, "/users/user%201?source=test");
    assert_eq!(post.key.as_deref(), Some("user 1/é"));
    assert_eq!(post.version, Some(12));
    assert_eq!(post.tn, Some(1_700_000_000_123_456_789));
    assert_eq!(post.merged, Some(3));
    assert_eq!(post.compensation, Some(false));
    assert_eq!(
        post.idempotency_key.as_deref(),
        Some("user%201%2F%C3%A9:12")
    );
    assert_eq!(post.content_type.as_deref(), Some("application/json"));
    assert_eq!(post.body.as_deref(), Some(r#"{"name":"Ada"}"#));
    assert_eq!(post.body_base64, None);

    let put = &records[1];
    assert_eq!(put.method, "PUT");
    assert_eq!(put.key.as_deref(), Some("bin%FF"), "not UTF-8 decoded: raw");
    assert_eq!((put.version, put.tn, put.merged), (Some(7), None, None));
    assert_eq!(put.compensation, Some(true));
    assert_eq!(put.body, None);
    assert_eq!(put.body_base64.as_deref(), Some("/wCAQQ=="));
    assert_eq!(put.body_bytes(), Some(binary));

    let delete = &records[2];
    assert_eq!(delete.method, "DELETE");
    assert_eq!(delete.path, "/users/k3");
    assert_eq!(delete.key.as_deref(), Some("k3"));
    assert_eq!((delete.version, delete.merged), (Some(5), Some(1)));
    assert_eq!(delete.idempotency_key.as_deref(), Some("k3:5"));
    assert_eq!(
        (delete.body.as_deref(), delete.body_base64.as_deref()),
        (None, None)
    );
    assert_eq!(delete.body_bytes(), None);

    let get = &records[3];
    assert_eq!((get.method.as_str(), get.path.as_str()), ("GET", "/plain"));
    assert_eq!(get.key, None);
    assert_eq!(
        (get.version, get.tn, get.merged, get.compensation),
        (None, None, None, None)
    );
    assert_eq!(
        (get.idempotency_key.as_deref(), get.content_type.as_deref()),
        (None, None)
    );

    let stopped = receiver.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    // With --log, nothing per call on stdout: only the summary.
    assert_eq!(stopped.stdout, "received 4 calls (200: 4), 0 overlaps\n");
}

#[tokio::test]
async fn refused_keys_get_422_failures_503_throttling_429_with_retry_after() {
    let mut receiver = start_receiver(&["--refuse-key", "k1", "--fail-rate", "1.0", "--seed", "7"]);
    let client = reqwest::Client::new();
    let call = |key: Option<&str>| {
        let mut request = client.post(receiver.url(&format!("/{}", key.unwrap_or("none"))));
        if let Some(key) = key {
            request = request
                .header("Keyflight-Key", key)
                .header("Keyflight-Version", "1");
        }
        request.body("{}").send()
    };
    let refused = call(Some("k1")).await.unwrap();
    assert_eq!(refused.status(), 422);
    let text = refused.text().await.unwrap();
    assert!(text.contains("k1"), "{text}");
    let failed = call(Some("k2")).await.unwrap();
    assert_eq!(failed.status(), 503);
    assert_eq!(failed.text().await.unwrap().trim(), "injected failure");
    assert_eq!(call(None).await.unwrap().status(), 503);
    let stopped = receiver.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    // Without --log: one readable line per call, then the summary.
    let lines: Vec<&str> = stopped.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{}", stopped.stdout);
    assert!(
        lines[0].starts_with("422 POST /k1 key=k1 v=1 injected=refuse "),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].starts_with("503 POST /k2 key=k2 v=1 injected=fail "),
        "{}",
        lines[1]
    );
    assert!(
        lines[2].starts_with("503 POST /none injected=fail "),
        "{}",
        lines[2]
    );
    assert_eq!(lines[3], "received 3 calls (422: 1, 503: 2), 0 overlaps");

    // Throttling wins over failure, refusal over both.
    let dir = tempfile::tempdir().unwrap();
    let log = log_path(&dir);
    let mut receiver = start_receiver(&[
        "--throttle-rate",
        "1",
        "--retry-after",
        "3",
        "--fail-rate",
        "1",
        "--refuse-key",
        "k1",
        "--log",
        &log,
    ]);
    let throttled = client
        .post(receiver.url("/k2"))
        .header("Keyflight-Key", "k2")
        .send()
        .await
        .unwrap();
    assert_eq!(throttled.status(), 429);
    assert_eq!(throttled.headers()["retry-after"], "3");
    let refused = client
        .post(receiver.url("/k1"))
        .header("Keyflight-Key", "k1")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 422);
    let records = sorted_log(&log);
    let answers: Vec<(u16, Option<&str>)> = records
        .iter()
        .map(|r| (r.status, r.injected.as_deref()))
        .collect();
    assert_eq!(answers, [(429, Some("throttle")), (422, Some("refuse"))]);
    let stopped = receiver.stop();
    assert_eq!(
        stopped.stdout,
        "received 2 calls (422: 1, 429: 1), 0 overlaps\n"
    );
}

#[tokio::test]
async fn a_seed_replays_the_same_faults() {
    let mut runs = Vec::new();
    for _ in 0..2 {
        let mut receiver = start_receiver(&["--fail-rate", "0.5", "--seed", "42"]);
        let client = reqwest::Client::new();
        let mut statuses = Vec::new();
        for i in 0..20 {
            let response = client
                .post(receiver.url("/k"))
                .header("Keyflight-Key", format!("k{i}"))
                .send()
                .await
                .unwrap();
            statuses.push(response.status().as_u16());
        }
        receiver.stop();
        runs.push(statuses);
    }
    assert_eq!(runs[0], runs[1]);
    assert!(
        runs[0].contains(&200) && runs[0].contains(&503),
        "{:?}",
        runs[0]
    );
}

#[tokio::test]
async fn two_open_calls_for_one_key_are_an_overlap_for_two_keys_not() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_path(&dir);
    let mut receiver = start_receiver(&["--delay", "300ms", "--log", &log]);
    let client = reqwest::Client::new();
    let push = |key: &str| {
        client
            .post(receiver.url(&format!("/items/{key}")))
            .header("Keyflight-Key", key)
            .body("{}")
            .send()
    };

    // Same key: the second call arrives while the first is open.
    let first = tokio::spawn(push("same"));
    receiver.wait_for(&client, |s| s.open == 1).await;
    assert_eq!(push("same").await.unwrap().status(), 200);
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    let stats = receiver.wait_for(&client, |s| s.calls == 2).await;
    assert_eq!(stats.overlaps, 1, "{stats:?}");

    // Different keys at once: no overlap.
    let first = tokio::spawn(push("x"));
    receiver.wait_for(&client, |s| s.open == 1).await;
    assert_eq!(push("y").await.unwrap().status(), 200);
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    let stats = receiver.wait_for(&client, |s| s.calls == 4).await;
    assert_eq!((stats.overlaps, stats.open), (1, 0), "{stats:?}");

    let records = sorted_log(&log);
    let seen: Vec<(&str, bool)> = records
        .iter()
        .map(|r| (r.key.as_deref().unwrap(), r.overlapped))
        .collect();
    assert_eq!(
        seen,
        [("same", false), ("same", true), ("x", false), ("y", false)]
    );
    for r in &records {
        assert!(
            r.elapsed() >= Duration::from_millis(300),
            "the delay applies: {r:?}"
        );
    }
    // The two calls for `same` were open at once, those for x and y too.
    assert!(records[1].start_ns < records[0].end_ns);
    assert!(records[3].start_ns < records[2].end_ns);

    let stopped = receiver.stop();
    assert!(stopped.status.success());
    assert!(
        stopped
            .stderr
            .contains("overlap: two calls for key same open at once"),
        "{}",
        stopped.stderr
    );
    assert!(!stopped.stderr.contains("key x"), "{}", stopped.stderr);
    assert_eq!(stopped.stdout, "received 4 calls (200: 4), 1 overlaps\n");
}

#[tokio::test]
async fn a_client_that_gives_up_is_logged_as_499() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_path(&dir);
    let mut receiver = start_receiver(&["--delay", "10s", "--log", &log]);
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let error = impatient
        .post(receiver.url("/slow"))
        .header("Keyflight-Key", "slow")
        .send()
        .await
        .unwrap_err();
    assert!(error.is_timeout(), "{error}");
    let client = reqwest::Client::new();
    let stats = receiver.wait_for(&client, |s| s.calls == 1).await;
    assert_eq!(stats.by_status.get(&499), Some(&1), "{stats:?}");
    let records = sorted_log(&log);
    assert_eq!(records[0].status, 499);
    assert!(
        records[0].elapsed() < Duration::from_secs(5),
        "{:?}",
        records[0]
    );
    let stopped = receiver.stop();
    assert_eq!(stopped.stdout, "received 1 calls (499: 1), 0 overlaps\n");
}

#[tokio::test]
async fn an_unreadable_body_answers_400_and_is_logged() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_path(&dir);
    let mut receiver = start_receiver(&["--log", &log]);
    let address = receiver.url.strip_prefix("http://").unwrap().to_string();
    let answer = tokio::task::spawn_blocking(move || {
        // A chunked body whose chunk size is not hex.
        let mut stream = std::net::TcpStream::connect(address).unwrap();
        stream
            .write_all(
                b"POST /bad HTTP/1.1\r\nHost: x\r\nKeyflight-Key: k\r\n\
                  Transfer-Encoding: chunked\r\n\r\nzz\r\n\r\n",
            )
            .unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut answer = vec![0; 4096];
        let n = stream.read(&mut answer).unwrap();
        String::from_utf8_lossy(&answer[..n]).into_owned()
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let records = sorted_log(&log);
    assert_eq!(records.len(), 1);
    assert_eq!(
        (records[0].status, records[0].key.as_deref()),
        (400, Some("k"))
    );
    // Still serving.
    let client = reqwest::Client::new();
    assert_eq!(
        client.get(receiver.url("/")).send().await.unwrap().status(),
        200
    );
    let stopped = receiver.stop();
    assert!(stopped.status.success());
    assert!(!stopped.stderr.contains("panicked"), "{}", stopped.stderr);
    assert_eq!(
        stopped.stdout,
        "received 2 calls (200: 1, 400: 1), 0 overlaps\n"
    );
}

#[tokio::test]
async fn tls_serves_https_to_clients_trusting_the_ca_only() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, ca) = certificates(dir.path());
    let mut receiver = start_receiver(&["--tls-cert", &cert, "--tls-key", &key]);
    assert!(
        receiver.url.starts_with("https://127.0.0.1:"),
        "{}",
        receiver.url
    );

    // A client without the CA: the handshake fails, the server carries on.
    let stranger = reqwest::Client::new();
    let error = stranger.get(receiver.url("/")).send().await.unwrap_err();
    assert!(error.is_connect(), "{error:?}");
    // Plain HTTP on the TLS port: no answer, no harm.
    let plain = receiver.url.replace("https://", "http://");
    assert!(stranger.get(format!("{plain}/")).send().await.is_err());

    let trusting = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .build()
        .unwrap();
    let response = trusting
        .post(receiver.url("/users/u1"))
        .header("Keyflight-Key", "u1")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let stats = receiver.stats(&trusting).await;
    assert_eq!(stats.calls, 1, "failed handshakes are not calls: {stats:?}");

    let stopped = receiver.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    assert!(
        stopped
            .stdout
            .ends_with("received 1 calls (200: 1), 0 overlaps\n"),
        "{}",
        stopped.stdout
    );
}

fn receive(args: &[&str]) -> Output {
    keyflight().arg("receive").args(args).output().unwrap()
}

fn assert_fails(out: &Output, code: i32, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    for needle in needles {
        assert!(err.contains(needle), "missing {needle:?} in: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    assert!(out.stdout.is_empty(), "nothing listened");
}

#[test]
fn bad_flags_and_files_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = certificates(dir.path());
    // Half of a TLS pair: a usage error naming the missing flag.
    assert_fails(&receive(&["--tls-cert", &cert]), 2, &["--tls-key"]);
    assert_fails(&receive(&["--tls-key", &key]), 2, &["--tls-cert"]);
    assert_fails(
        &receive(&["--fail-rate", "1.5"]),
        2,
        &["--fail-rate", "between 0 and 1"],
    );
    // Files it cannot use: an error naming the file.
    let missing = dir.path().join("missing.pem");
    let missing = missing.to_str().unwrap();
    assert_fails(
        &receive(&[
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            missing,
            "--tls-key",
            &key,
        ]),
        1,
        &["missing.pem"],
    );
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let garbage = garbage.to_str().unwrap();
    assert_fails(
        &receive(&[
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            garbage,
            "--tls-key",
            &key,
        ]),
        1,
        &["garbage.pem", "no CERTIFICATE"],
    );
    assert_fails(
        &receive(&[
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            &cert,
            "--tls-key",
            &cert,
        ]),
        1,
        &["server.pem", "no private key"],
    );
    let help = keyflight().args(["receive", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for needle in [
        "--fail-rate",
        "--tls-cert",
        "Examples:",
        "/_receive/stats",
        "Retry-After",
    ] {
        assert!(help.contains(needle), "missing {needle:?} in:\n{help}");
    }
}
