//! The `keyflight` binary as a user meets it: help, configuration layering,
//! configuration errors (exit 2, naming source and key, no panic).

use std::process::{Command, Output};

fn keyflight(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_keyflight"));
    command.args(args).env_remove("RUST_LOG");
    // Start from a clean environment for keyflight's own variables.
    for (name, _) in std::env::vars() {
        if name.starts_with("KEYFLIGHT_") {
            command.env_remove(name);
        }
    }
    command
        .envs(env.iter().copied())
        .output()
        .expect("keyflight runs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}
fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn config_file(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, text).unwrap();
    let path = path.to_str().unwrap().to_string();
    (dir, path)
}

/// A configuration error: exit 2, one line naming source and key, no panic.
fn assert_config_error(out: &Output, needles: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    for needle in needles {
        assert!(err.contains(needle), "missing {needle:?} in: {err}");
    }
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
}

#[test]
fn help_explains_and_shows_examples() {
    let out = keyflight(&["--help"], &[]);
    assert!(out.status.success());
    let text = stdout(&out);
    for needle in [
        "one push in flight",
        "topics",
        "--config",
        "--brokers",
        "--log-level",
        "Examples:",
        "KEYFLIGHT_",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    let out = keyflight(&["topics", "create", "--help"], &[]);
    assert!(out.status.success());
    let text = stdout(&out);
    for needle in [
        "cleanup.policy=compact",
        "Idempotent",
        "--partitions",
        "--replication",
        "Examples:",
        "keyflight topics create --brokers",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}

#[test]
fn layers_apply_in_order_defaults_file_env_flags() {
    let (_dir, path) = config_file("application_id = \"from-file\"\nbrokers = \"file:9092\"\nlog_level = \"warn\"\n[compensation]\ninterval = \"3s\"\n");
    let shown = stdout(&keyflight(&["--config", &path, "config", "show"], &[]));
    assert!(shown.contains("application_id = \"from-file\""), "{shown}");
    assert!(shown.contains("brokers = \"file:9092\""), "{shown}");
    assert!(shown.contains("interval = \"3s\""), "{shown}");
    assert!(
        shown.contains("grace = \"10s\""),
        "defaults fill the rest: {shown}"
    );

    let env = [
        ("KEYFLIGHT_BROKERS", "env:9092"),
        ("KEYFLIGHT_COMPENSATION__INTERVAL", "7s"),
    ];
    let shown = stdout(&keyflight(&["--config", &path, "config", "show"], &env));
    assert!(shown.contains("brokers = \"env:9092\""), "{shown}");
    assert!(shown.contains("interval = \"7s\""), "{shown}");

    // Global flags win, and work after the subcommand too.
    let shown = stdout(&keyflight(
        &[
            "config",
            "show",
            "--config",
            &path,
            "--brokers",
            "flag:9092",
            "--log-level",
            "debug",
        ],
        &env,
    ));
    assert!(shown.contains("brokers = \"flag:9092\""), "{shown}");
    assert!(shown.contains("log_level = \"debug\""), "{shown}");
}

#[test]
fn unknown_key_in_file_exits_2_naming_file_and_key() {
    let (_dir, path) = config_file("[compensation]\nintervall = \"5s\"\n");
    let out = keyflight(&["--config", &path, "config", "show"], &[]);
    assert_config_error(
        &out,
        &[
            "bad.toml",
            "compensation.intervall",
            "unknown key",
            "interval",
        ],
    );
}

#[test]
fn wrong_type_exits_2_naming_the_key() {
    let (_dir, path) = config_file("[singleflight]\nmax_active_keys = \"lots\"\n");
    let out = keyflight(&["--config", &path, "config", "show"], &[]);
    assert_config_error(&out, &["bad.toml", "singleflight.max_active_keys"]);
}

#[test]
fn impossible_values_exit_2_naming_the_key() {
    let (_dir, path) = config_file("[compensation]\ninterval = \"0s\"\n[topics]\npushed = \"\"\n");
    let out = keyflight(&["--config", &path, "config", "show"], &[]);
    assert_config_error(
        &out,
        &[
            "bad.toml",
            "compensation.interval",
            "greater than 0",
            "topics.pushed",
            "must not be empty",
        ],
    );
}

#[test]
fn bad_environment_value_names_the_variable() {
    let out = keyflight(
        &["config", "show"],
        &[("KEYFLIGHT_COMPENSATION__INTERVAL", "0s")],
    );
    assert_config_error(
        &out,
        &["KEYFLIGHT_COMPENSATION__INTERVAL", "compensation.interval"],
    );
    let out = keyflight(
        &["config", "show"],
        &[("KEYFLIGHT_SINGLEFLIGHT__MERGE_POLICY", "oldest")],
    );
    assert_config_error(
        &out,
        &["KEYFLIGHT_SINGLEFLIGHT__MERGE_POLICY", "json-merge-patch"],
    );
}

#[test]
fn bad_flag_value_names_the_flag() {
    let out = keyflight(&["config", "show", "--log-level", "loud=verbose=yes"], &[]);
    assert_config_error(&out, &["--log-level", "log_level"]);
}

#[test]
fn bad_metrics_address_and_confluent_without_schema_id_exit_2() {
    // `run` checks the address before it touches a broker.
    let out = keyflight(&["run", "--metrics-addr", "localhost"], &[]);
    assert_config_error(&out, &["flag --metrics-addr", "metrics_addr", "host:port"]);
    let (_dir, path) = config_file("[input]\nformat = \"avro\"\navro_framing = \"confluent\"\n");
    let out = keyflight(&["--config", &path, "config", "show"], &[]);
    assert_config_error(&out, &["input.schema_id", "Schema Registry id"]);
}

#[test]
fn missing_config_file_exits_2() {
    let out = keyflight(
        &["--config", "/nonexistent/keyflight.toml", "config", "show"],
        &[],
    );
    assert_config_error(&out, &["/nonexistent/keyflight.toml", "no such file"]);
}

#[test]
fn secrets_are_redacted_when_the_config_is_shown() {
    let (_dir, path) = config_file(
        "[kafka.common]\n\"sasl.password\" = \"hunter2\"\n\"sasl.username\" = \"svc\"\n",
    );
    let shown = stdout(&keyflight(&["--config", &path, "config", "show"], &[]));
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(
        shown.contains("<redacted>") && shown.contains("svc"),
        "{shown}"
    );
}

#[test]
fn usage_errors_exit_2() {
    let out = keyflight(&["topics", "create", "--partitions", "0"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = keyflight(&["frobnicate"], &[]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn the_recovery_tools_teach_in_their_help() {
    for (command, needles) in [
        (
            "verify",
            &["missing", "stale", "--since", "--json", "Exit status 0"][..],
        ),
        (
            "replay",
            &[
                "--to-earliest",
                "--to-offset",
                "--reset-state",
                "--execute",
                "the plan is printed",
                "active",
            ][..],
        ),
    ] {
        let out = keyflight(&[command, "--help"], &[]);
        assert!(out.status.success());
        for needle in needles {
            assert!(
                stdout(&out).contains(needle),
                "{command} --help lacks {needle}:\n{}",
                stdout(&out)
            );
        }
    }
    let out = keyflight(&["state", "inspect", "--help"], &[]);
    assert!(stdout(&out).contains("open"), "{}", stdout(&out));
}

#[test]
fn replay_usage_errors_exit_2_and_say_what_is_wrong() {
    let out = keyflight(&["replay"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--to-earliest"), "{}", stderr(&out));
    let out = keyflight(&["replay", "--to-earliest", "--to-latest"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("cannot be used with"),
        "{}",
        stderr(&out)
    );
    let out = keyflight(&["replay", "--to-offset", "3"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("PARTITION:OFFSET"),
        "{}",
        stderr(&out)
    );
    let out = keyflight(&["verify", "--since", "yesterday-ish"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("RFC 3339"), "{}", stderr(&out));
}
