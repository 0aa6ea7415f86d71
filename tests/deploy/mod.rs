//! The deployment files, checked without a Docker engine: docker-compose.yml,
//! config/prometheus.yml, the Dockerfile, .dockerignore and
//! config/production.toml agree with each other and with keyflight's
//! configuration.
//!
//! The configuration a compose service runs with is not guessed: the
//! `keyflight` binary prints it (`config show`) from exactly that service's
//! environment, as it would inside the container.

mod compose;
mod dockerfile;
mod production;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use serde_yaml::Value;

const KEYFLIGHT: &str = env!("CARGO_BIN_EXE_keyflight");
/// The variable that carries the SASL password in production.
const PASSWORD_VAR: &str = "KEYFLIGHT_KAFKA__COMMON__SASL__PASSWORD";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(repo().join(relative))
        .unwrap_or_else(|e| panic!("cannot read {relative}: {e}"))
}

fn yaml(relative: &str) -> Value {
    let mut doc: Value = serde_yaml::from_str(&read(relative))
        .unwrap_or_else(|e| panic!("{relative} is not valid YAML: {e}"));
    // `<<: *anchor` merge keys, as Compose applies them.
    doc.apply_merge()
        .unwrap_or_else(|e| panic!("{relative}: bad `<<` merge key: {e}"));
    doc
}

fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A Go-style duration as Compose and Prometheus write them ("5s", "1m30s").
fn duration(text: &str, what: &str) -> Duration {
    humantime::parse_duration(text)
        .unwrap_or_else(|e| panic!("{what}: `{text}` is not a duration: {e}"))
}

fn version(text: &str) -> (u64, u64, u64) {
    let mut parts = text.split('.').map(|p| {
        p.parse::<u64>()
            .unwrap_or_else(|_| panic!("`{text}` is not a version like 1.88 or 1.88.0"))
    });
    (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

fn expect_success(output: &Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{what}: `keyflight config show` refused the configuration ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}
