//! config/production.toml.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

use keyflight::config::{flatten, load, Overrides, Settings, DEFAULT_METRICS_ADDR};

use super::*;

fn production() -> PathBuf {
    repo().join("config/production.toml")
}

#[test]
fn production_config_is_valid_sasl_ssl_and_holds_no_password() {
    let settings = load(Some(&production()), &Overrides::default())
        .unwrap_or_else(|e| panic!("config/production.toml does not load: {e}"));
    assert!(
        settings.state_dir.is_absolute(),
        "config/production.toml: state_dir {:?} should be an absolute path on a persistent volume",
        settings.state_dir
    );
    let default_port: SocketAddr = DEFAULT_METRICS_ADDR.parse().unwrap();
    let metrics = settings
        .metrics_socket()
        .expect("config/production.toml: metrics are off");
    assert!(
        metrics.ip().is_unspecified() && metrics.port() == default_port.port(),
        "config/production.toml: metrics_addr {metrics} should be 0.0.0.0:{} so Prometheus can scrape it",
        default_port.port()
    );

    // The file alone (the environment of this test could add a password).
    let text = read("config/production.toml");
    let file: Settings = toml::from_str(&text)
        .unwrap_or_else(|e| panic!("config/production.toml is not a keyflight configuration: {e}"));
    let common = flatten(&file.kafka.common);
    for (key, expected) in [
        ("security.protocol", "SASL_SSL"),
        ("sasl.mechanisms", "SCRAM-SHA-512"),
    ] {
        assert_eq!(
            common.get(key).map(String::as_str),
            Some(expected),
            "config/production.toml: [kafka.common] {key}"
        );
    }
    for key in ["sasl.username", "ssl.ca.location"] {
        assert!(
            common.get(key).is_some_and(|v| !v.is_empty()),
            "config/production.toml: [kafka.common] should set {key}"
        );
    }
    for (table, values) in [
        ("common", &file.kafka.common),
        ("consumer", &file.kafka.consumer),
        ("producer", &file.kafka.producer),
    ] {
        for key in flatten(values).keys() {
            assert!(
                !key.contains("password") && !key.contains("secret"),
                "config/production.toml: [kafka.{table}] {key} is a secret; it belongs in {PASSWORD_VAR} (or another variable), not in the file"
            );
        }
    }
    assert!(
        text.contains(PASSWORD_VAR),
        "config/production.toml should tell where the password comes from ({PASSWORD_VAR})"
    );
}

#[test]
fn production_config_takes_the_sasl_password_from_the_environment_and_redacts_it() {
    let secret = "pr0duction-Secret-4f1d2c";
    let show = |password: Option<&str>| {
        let mut command = Command::new(KEYFLIGHT);
        command
            .env_clear()
            .arg("--config")
            .arg(production())
            .args(["config", "show"]);
        if let Some(password) = password {
            command.env(PASSWORD_VAR, password);
        }
        let output = command.output().expect("run keyflight");
        let stdout = expect_success(&output, "config/production.toml");
        assert!(
            !stdout.contains(secret) && !String::from_utf8_lossy(&output.stderr).contains(secret),
            "`config show` printed the SASL password:\n{stdout}"
        );
        let settings: Settings = toml::from_str(&stdout)
            .unwrap_or_else(|e| panic!("cannot read `config show`: {e}\n{stdout}"));
        flatten(&settings.kafka.common)
    };

    let with = show(Some(secret));
    assert_eq!(
        with.get("sasl.password").map(String::as_str),
        Some("<redacted>"),
        "{PASSWORD_VAR} should become the librdkafka property sasl.password (shown redacted); [kafka.common] = {with:?}"
    );
    assert_eq!(
        with.get("security.protocol").map(String::as_str),
        Some("SASL_SSL"),
        "the file's settings stay next to the password from the environment"
    );
    let without = show(None);
    assert!(
        !without.contains_key("sasl.password"),
        "without {PASSWORD_VAR} there should be no sasl.password, found {without:?}"
    );
}

#[test]
fn production_config_properties_are_all_known_to_librdkafka() {
    use keyflight::config::KafkaValue;
    use keyflight::kafka::{client_config, Role};
    use rdkafka::admin::AdminClient;
    use rdkafka::client::DefaultClientContext;
    use rdkafka::consumer::BaseConsumer;
    use rdkafka::producer::BaseProducer;

    let mut settings = load(Some(&production()), &Overrides::default())
        .unwrap_or_else(|e| panic!("config/production.toml does not load: {e}"));
    // librdkafka opens the CA file when a client is created; that path
    // exists only in production. `probe`: the system's CA store.
    let common = &mut settings.kafka.common;
    common.insert("ssl.ca.location".into(), KafkaValue::Str("probe".into()));
    common.insert(
        "sasl.password".into(),
        KafkaValue::Str("from-the-environment".into()),
    );

    // Creating a client checks every property name and value; nothing
    // connects before it is used.
    fn create<T: rdkafka::config::FromClientConfig>(settings: &Settings, role: Role) -> T {
        client_config(settings, role).create().unwrap_or_else(|e| {
            panic!(
                "config/production.toml: librdkafka refuses the {} configuration: {e}",
                role.name()
            )
        })
    }
    let _: BaseConsumer = create(&settings, Role::Consumer);
    let _: BaseProducer = create(&settings, Role::Producer);
    let _: AdminClient<DefaultClientContext> = create(&settings, Role::Admin);
}
