//! Avro that other tools read: events encoded by a third-party Avro
//! implementation (Python's fastavro, installed by the test command) go
//! through keyflight on the real broker, and fastavro decodes the pushes.
//! Both framings: Confluent's wire format (schema id from the config) and
//! Avro single-object encoding.
//!
//! The interpreter: `$INTEROP_PYTHON`, else the virtualenv
//! `scripts/test.sh` makes at `$HOME/.cache/keyflight/venv`. Missing, the
//! test fails and says how to install it; it never skips.

use keyflight::kafka::headers as header;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::{last_per_key, produce_bytes, read_all, wait_until, App, Broker};
use serde_json::{json, Value};

fn python() -> PathBuf {
    let path = std::env::var_os("INTEROP_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").expect("HOME is set");
            PathBuf::from(home).join(".cache/keyflight/venv/bin/python")
        });
    let ok = Command::new(&path)
        .args(["-c", "import fastavro"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "no Python with fastavro at {} (scripts/test.sh installs it; or set INTEROP_PYTHON)",
        path.display()
    );
    path
}

/// Runs tests/interop/fastavro_events.py `command` with `input` on stdin.
fn fastavro(command: &str, framing: &str, schema_id: u32, input: &str) -> String {
    let dir = env!("CARGO_MANIFEST_DIR");
    let mut child = Command::new(python())
        .arg(format!("{dir}/tests/interop/fastavro_events.py"))
        .args([command, &format!("{dir}/schemas/event.avsc"), framing])
        .arg(schema_id.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python starts");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "fastavro {command}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

/// Key k's versions 1..=4 as JSON merge patches: version 1 sets every
/// attribute type, later versions change some and version 3 removes one.
fn patches(keys: usize) -> Vec<Value> {
    let mut events = Vec::new();
    for version in 1..=4 {
        for k in 0..keys {
            let fields = match version {
                1 => {
                    json!({"name": format!("item-{k}"), "count": k, "ok": true, "ratio": 0.5, "tmp": "x"})
                }
                2 => json!({"count": k * 10, "ratio": 1.25}),
                3 => json!({"tmp": null, "ok": false}),
                _ => json!({"count": k * 100 + version}),
            };
            events
                .push(json!({"key": format!("key-{k:02}"), "version": version, "fields": fields}));
        }
    }
    events
}

/// The expected final document per key: RFC 7396 over the patches.
fn folded(events: &[Value]) -> BTreeMap<String, Value> {
    let mut out: BTreeMap<String, Value> = BTreeMap::new();
    for event in events {
        let doc = out
            .entry(event["key"].as_str().unwrap().to_string())
            .or_insert_with(|| json!({}));
        json_patch::merge(doc, &event["fields"]);
    }
    out
}

async fn round_trip(framing: &str, schema_id: u32) {
    let broker = Broker::start();
    let config = format!(
        "[input]\nformat = \"avro\"\navro_framing = \"{framing}\"\nschema_id = {schema_id}\n\
         [singleflight]\nmerge_policy = \"json-merge-patch\"\n"
    );
    let app = App::create(&broker, 2, &config);
    let events = patches(12);
    let lines: String = events.iter().map(|e| format!("{e}\n")).collect();
    let encoded = fastavro("encode", framing, schema_id, &lines);
    let mut records: Vec<(String, Option<Vec<u8>>)> = encoded
        .lines()
        .map(|l| {
            let (key, value) = l.split_once('\t').unwrap();
            (key.to_string(), Some(unhex(value)))
        })
        .collect();
    // A record another schema wrote: dead-lettered, not misread.
    let foreign_id = schema_id + 1;
    let foreign = fastavro(
        "encode",
        framing,
        foreign_id,
        "{\"key\": \"foreign\", \"version\": 1, \"fields\": {}}\n",
    );
    if framing == "confluent" {
        let (key, value) = foreign.trim_end().split_once('\t').unwrap();
        records.push((key.to_string(), Some(unhex(value))));
    }
    produce_bytes(&broker, &app.input, &records).await;

    let mut processor = app.start(&app.state_dir("a"));
    let want = folded(&events);
    let last = wait_until(Duration::from_secs(90), Duration::from_millis(300), || {
        let last = last_per_key(&read_all(&broker, &app.pushed));
        let done = want.keys().all(|k| {
            last.get(k)
                .is_some_and(|p| p.headers[header::VERSION] == "4")
        });
        done.then_some(last.clone())
            .ok_or_else(|| format!("{} keys pushed:\n{}", last.len(), processor.log()))
    });
    processor.stop(Duration::from_secs(30));

    let pushes: String = want
        .keys()
        .map(|k| format!("{k}\t{}\n", hex(last[k].raw.as_deref().unwrap())))
        .collect();
    let decoded = fastavro("decode", framing, schema_id, &pushes);
    let mut seen = 0;
    for line in decoded.lines() {
        let push: Value = serde_json::from_str(line).unwrap();
        let key = push["key"].as_str().unwrap();
        assert_eq!(push["version"], 4, "{push}");
        assert_eq!(push["fields"], want[key], "{key} ({framing})");
        seen += 1;
    }
    assert_eq!(seen, want.len());

    if framing == "confluent" {
        let dead = read_all(&broker, &app.dlq);
        assert_eq!(dead.len(), 1, "{dead:?}");
        assert_eq!(dead[0].headers[header::ERROR_REASON], "invalid-avro");
        assert!(
            dead[0].headers[header::ERROR].contains(&format!("schema id {foreign_id}")),
            "{:?}",
            dead[0].headers
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn fastavro_confluent_framed_events_round_trip_through_keyflight() {
    round_trip("confluent", 17).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fastavro_single_object_events_round_trip_through_keyflight() {
    round_trip("single-object", 0).await;
}
