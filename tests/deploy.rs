//! The deployment files, checked without a Docker engine: docker-compose.yml,
//! config/prometheus.yml, the Dockerfile, .dockerignore and
//! config/production.toml agree with each other and with keyflight's
//! configuration.
//!
//! The configuration a compose service runs with is not guessed: the
//! `keyflight` binary prints it (`config show`) from exactly that service's
//! environment, as it would inside the container.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use keyflight::config::{flatten, load, Overrides, Settings, DEFAULT_METRICS_ADDR};
use serde_yaml::{Mapping, Value};

const KEYFLIGHT: &str = env!("CARGO_BIN_EXE_keyflight");
/// The variable that carries the SASL password in production.
const PASSWORD_VAR: &str = "KEYFLIGHT_KAFKA__COMMON__SASL__PASSWORD";

// ---------------------------------------------------------------------------
// Reading the files
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// docker-compose.yml
// ---------------------------------------------------------------------------

struct Compose {
    doc: Value,
    services: Vec<Service>,
}

struct Service {
    name: String,
    spec: Mapping,
}

#[derive(Debug, PartialEq)]
enum MountKind {
    Bind,
    Volume,
}

#[derive(Debug)]
struct Mount {
    kind: MountKind,
    /// Host path (bind) or volume name (empty for an anonymous volume).
    source: String,
    target: String,
}

#[derive(Debug)]
struct Port {
    host_ip: Option<String>,
    host: Option<u16>,
    container: u16,
}

fn compose() -> Compose {
    let doc = yaml("docker-compose.yml");
    let services = doc
        .get("services")
        .and_then(Value::as_mapping)
        .expect("docker-compose.yml: no `services` mapping")
        .iter()
        .map(|(name, spec)| Service {
            name: name.as_str().expect("a service name is a string").into(),
            spec: spec
                .as_mapping()
                .unwrap_or_else(|| panic!("service `{name:?}` is not a mapping"))
                .clone(),
        })
        .collect();
    Compose { doc, services }
}

impl Compose {
    /// Services that run this repository's image: they build its Dockerfile,
    /// or use the image such a service builds.
    fn keyflight_services(&self) -> Vec<&Service> {
        let built: BTreeSet<String> = self
            .services
            .iter()
            .filter(|s| s.builds_this_repo())
            .filter_map(|s| s.image())
            .collect();
        self.services
            .iter()
            .filter(|s| s.builds_this_repo() || s.image().is_some_and(|i| built.contains(&i)))
            .collect()
    }

    /// What a keyflight service runs: its `command:`, else the image's CMD.
    fn keyflight_command(&self, service: &Service) -> Vec<String> {
        let command = service.command();
        if !command.is_empty() {
            return command;
        }
        dockerfile()
            .last()
            .and_then(|stage| stage.last("CMD").map(words))
            .unwrap_or_default()
    }

    /// The keyflight services that run `run`.
    fn run_services(&self) -> Vec<&Service> {
        self.keyflight_services()
            .into_iter()
            .filter(|s| self.keyflight_command(s).first().map(String::as_str) == Some("run"))
            .collect()
    }

    /// The one keyflight service running `topics create`.
    fn topics_service(&self) -> &Service {
        let found: Vec<&Service> = self
            .keyflight_services()
            .into_iter()
            .filter(|s| {
                self.keyflight_command(s)
                    .starts_with(&["topics".into(), "create".into()])
            })
            .collect();
        assert_eq!(
            found.len(),
            1,
            "docker-compose.yml: expected exactly one keyflight service with command `topics create`, found {:?}",
            found.iter().map(|s| &s.name).collect::<Vec<_>>()
        );
        found[0]
    }

    /// The one service running the official apache/kafka image.
    fn kafka(&self) -> &Service {
        let found: Vec<&Service> = self
            .services
            .iter()
            .filter(|s| s.image().is_some_and(|i| i.starts_with("apache/kafka:")))
            .collect();
        assert_eq!(
            found.len(),
            1,
            "docker-compose.yml: expected exactly one service with an `apache/kafka:<version>` image, found {:?}",
            found.iter().map(|s| &s.name).collect::<Vec<_>>()
        );
        found[0]
    }

    fn declared_volumes(&self) -> BTreeSet<String> {
        self.doc
            .get("volumes")
            .and_then(Value::as_mapping)
            .map(|m| m.keys().filter_map(scalar).collect())
            .unwrap_or_default()
    }
}

impl Service {
    fn get(&self, key: &str) -> Option<&Value> {
        self.spec.get(key)
    }

    fn image(&self) -> Option<String> {
        self.get("image").and_then(scalar)
    }

    /// `environment:` as a mapping or as a list of `KEY=value`.
    fn env(&self) -> BTreeMap<String, String> {
        let name = &self.name;
        match self.get("environment") {
            None => BTreeMap::new(),
            Some(Value::Mapping(map)) => map
                .iter()
                .map(|(k, v)| {
                    let key = scalar(k).expect("a variable name is a string");
                    let value = scalar(v).unwrap_or_else(|| {
                        panic!("service `{name}`: `{key}` has no value (Compose would take it from the host's environment); give it one in docker-compose.yml")
                    });
                    (key, value)
                })
                .collect(),
            Some(Value::Sequence(items)) => items
                .iter()
                .map(|item| {
                    let text = scalar(item).expect("an environment entry is a string");
                    let (k, v) = text.split_once('=').unwrap_or_else(|| {
                        panic!("service `{name}`: `{text}` has no value (Compose would take it from the host's environment); write KEY=value")
                    });
                    (k.to_string(), v.to_string())
                })
                .collect(),
            Some(other) => panic!("service `{name}`: `environment` is neither a mapping nor a list: {other:?}"),
        }
    }

    fn env_var(&self, key: &str) -> String {
        self.env().remove(key).unwrap_or_else(|| {
            panic!(
                "service `{}`: environment variable {key} is not set",
                self.name
            )
        })
    }

    /// `command:` as a list, or a string split at whitespace.
    fn command(&self) -> Vec<String> {
        match self.get("command") {
            None => Vec::new(),
            Some(Value::Sequence(items)) => items.iter().filter_map(scalar).collect(),
            Some(value) => scalar(value)
                .map(|s| s.split_whitespace().map(String::from).collect())
                .unwrap_or_default(),
        }
    }

    /// The build context and Dockerfile, when the service builds an image.
    fn build(&self) -> Option<(PathBuf, PathBuf)> {
        let (context, dockerfile) = match self.get("build")? {
            Value::Mapping(map) => (
                map.get("context")
                    .and_then(scalar)
                    .unwrap_or_else(|| ".".into()),
                map.get("dockerfile")
                    .and_then(scalar)
                    .unwrap_or_else(|| "Dockerfile".into()),
            ),
            value => (scalar(value)?, "Dockerfile".into()),
        };
        let context = repo().join(context);
        let dockerfile = context.join(dockerfile);
        Some((context, dockerfile))
    }

    fn builds_this_repo(&self) -> bool {
        self.build().is_some_and(|(context, dockerfile)| {
            context.canonicalize().ok() == repo().canonicalize().ok()
                && dockerfile.canonicalize().ok() == repo().join("Dockerfile").canonicalize().ok()
        })
    }

    fn mounts(&self) -> Vec<Mount> {
        let Some(Value::Sequence(items)) = self.get("volumes") else {
            return Vec::new();
        };
        items
            .iter()
            .map(|item| match item {
                Value::Mapping(map) => {
                    let field = |k: &str| map.get(k).and_then(scalar).unwrap_or_default();
                    Mount {
                        kind: if field("type") == "bind" {
                            MountKind::Bind
                        } else {
                            MountKind::Volume
                        },
                        source: field("source"),
                        target: field("target"),
                    }
                }
                value => {
                    let text = scalar(value).expect("a volume entry is a string");
                    let parts: Vec<&str> = text.split(':').collect();
                    let (source, target) = match parts.as_slice() {
                        [target] => ("", *target),
                        [source, target, ..] => (*source, *target),
                        [] => unreachable!(),
                    };
                    let bind = [".", "/", "~"].iter().any(|p| source.starts_with(p));
                    Mount {
                        kind: if bind {
                            MountKind::Bind
                        } else {
                            MountKind::Volume
                        },
                        source: source.into(),
                        target: target.into(),
                    }
                }
            })
            .collect()
    }

    fn ports(&self) -> Vec<Port> {
        let name = &self.name;
        let Some(Value::Sequence(items)) = self.get("ports") else {
            return Vec::new();
        };
        let number = |text: &str| -> u16 {
            text.parse().unwrap_or_else(|_| {
                panic!("service `{name}`: port `{text}` is not a single port number")
            })
        };
        items
            .iter()
            .map(|item| match item {
                Value::Mapping(map) => Port {
                    host_ip: map.get("host_ip").and_then(scalar),
                    host: map.get("published").and_then(scalar).map(|p| number(&p)),
                    container: number(&map.get("target").and_then(scalar).unwrap_or_default()),
                },
                value => {
                    let text = scalar(value).expect("a port entry is a string");
                    let text = text.split('/').next().unwrap_or_default();
                    let parts: Vec<&str> = text.split(':').collect();
                    match parts.as_slice() {
                        [container] => Port {
                            host_ip: None,
                            host: None,
                            container: number(container),
                        },
                        [host, container] => Port {
                            host_ip: None,
                            host: Some(number(host)),
                            container: number(container),
                        },
                        [ip, host, container] => Port {
                            host_ip: Some(ip.to_string()),
                            host: Some(number(host)),
                            container: number(container),
                        },
                        _ => panic!("service `{name}`: cannot read port `{text}`"),
                    }
                }
            })
            .collect()
    }

    /// `depends_on:` as service → condition (a plain list means `service_started`).
    fn depends_on(&self) -> BTreeMap<String, String> {
        match self.get("depends_on") {
            None => BTreeMap::new(),
            Some(Value::Sequence(items)) => items
                .iter()
                .filter_map(scalar)
                .map(|s| (s, "service_started".into()))
                .collect(),
            Some(Value::Mapping(map)) => map
                .iter()
                .map(|(k, v)| {
                    let condition = v
                        .get("condition")
                        .and_then(scalar)
                        .unwrap_or_else(|| "service_started".into());
                    (scalar(k).unwrap_or_default(), condition)
                })
                .collect(),
            Some(other) => panic!("service `{}`: bad depends_on: {other:?}", self.name),
        }
    }

    /// The healthcheck command as one string, if there is one.
    fn healthcheck(&self) -> Option<String> {
        let test = self.get("healthcheck")?.get("test")?;
        Some(match test {
            Value::Sequence(items) => items
                .iter()
                .filter_map(scalar)
                .collect::<Vec<_>>()
                .join(" "),
            value => scalar(value).unwrap_or_default(),
        })
    }

    /// The configuration keyflight runs with in this service: `keyflight
    /// config show` with exactly the service's environment.
    fn settings(&self) -> Settings {
        // Configuration given as flags would escape this check.
        const CONFIG_FLAGS: &[&str] = &[
            "--config",
            "--brokers",
            "--log-level",
            "--log-format",
            "--state-dir",
            "--metrics-addr",
        ];
        for arg in self.command() {
            let option = arg.split('=').next().unwrap_or_default();
            assert!(
                !CONFIG_FLAGS.contains(&option),
                "service `{}`: configure keyflight through KEYFLIGHT_* variables, not `{arg}` on the command line",
                self.name
            );
        }
        let env = self.env();
        for (key, value) in &env {
            assert!(
                !value.contains('$'),
                "service `{}`: {key}={value} depends on the host's environment (Compose interpolation); the stack should run as written",
                self.name
            );
        }
        let output = Command::new(KEYFLIGHT)
            .env_clear()
            .envs(&env)
            .args(["config", "show"])
            .output()
            .expect("run keyflight");
        let stdout = expect_success(&output, &format!("service `{}`", self.name));
        toml::from_str(&stdout).unwrap_or_else(|e| {
            panic!(
                "service `{}`: cannot read `config show`: {e}\n{stdout}",
                self.name
            )
        })
    }
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

/// A Kafka listener, `NAME://host:port`.
#[derive(Debug, Clone)]
struct Listener {
    name: String,
    host: String,
    port: u16,
}

fn listeners(kafka: &Service, var: &str) -> Vec<Listener> {
    kafka
        .env_var(var)
        .split(',')
        .map(|entry| {
            let entry = entry.trim();
            let (name, address) = entry
                .split_once("://")
                .unwrap_or_else(|| panic!("{var}: `{entry}` is not NAME://host:port"));
            let (host, port) = address
                .rsplit_once(':')
                .unwrap_or_else(|| panic!("{var}: `{entry}` has no port"));
            Listener {
                name: name.into(),
                host: host.trim_matches(['[', ']']).into(),
                port: port
                    .parse()
                    .unwrap_or_else(|_| panic!("{var}: `{entry}`: bad port")),
            }
        })
        .collect()
}

fn metrics_port(service: &Service, settings: &Settings) -> u16 {
    settings
        .metrics_socket()
        .unwrap_or_else(|| {
            panic!(
                "service `{}`: metrics are off (metrics_addr = {:?}); set KEYFLIGHT_METRICS_ADDR=0.0.0.0:9464",
                service.name, settings.metrics_addr
            )
        })
        .port()
}

// ---------------------------------------------------------------------------
// docker-compose.yml tests
// ---------------------------------------------------------------------------

#[test]
fn compose_runs_kafka_in_kraft_mode_from_the_official_image() {
    let compose = compose();
    let kafka = compose.kafka();
    let image = kafka.image().unwrap();
    let tag = image.trim_start_matches("apache/kafka:");
    assert!(
        !tag.is_empty() && tag != "latest",
        "service `{}`: pin the Kafka version (apache/kafka:3.9.1, ...), not `{image}`",
        kafka.name
    );

    let env = kafka.env();
    assert!(
        !env.contains_key("KAFKA_ZOOKEEPER_CONNECT"),
        "service `{}`: KRaft mode needs no ZooKeeper",
        kafka.name
    );
    let roles: BTreeSet<String> = kafka
        .env_var("KAFKA_PROCESS_ROLES")
        .split(',')
        .map(|r| r.trim().to_string())
        .collect();
    assert_eq!(
        roles,
        BTreeSet::from(["broker".to_string(), "controller".to_string()]),
        "service `{}`: KAFKA_PROCESS_ROLES must make the single node both broker and controller",
        kafka.name
    );

    // The quorum is this node, on its controller listener.
    let node = kafka.env_var("KAFKA_NODE_ID");
    let controller_name = kafka.env_var("KAFKA_CONTROLLER_LISTENER_NAMES");
    let controller = listeners(kafka, "KAFKA_LISTENERS")
        .into_iter()
        .find(|l| l.name == controller_name)
        .unwrap_or_else(|| {
            panic!("KAFKA_LISTENERS has no `{controller_name}` listener (KAFKA_CONTROLLER_LISTENER_NAMES)")
        });
    let voters = kafka.env_var("KAFKA_CONTROLLER_QUORUM_VOTERS");
    let hosts = [
        kafka.name.clone(),
        kafka.get("hostname").and_then(scalar).unwrap_or_default(),
    ];
    assert!(
        hosts
            .iter()
            .any(|h| voters == format!("{node}@{h}:{}", controller.port)),
        "service `{}`: KAFKA_CONTROLLER_QUORUM_VOTERS is `{voters}`; expected node {node} at {}:{}",
        kafka.name,
        kafka.name,
        controller.port
    );

    for (var, expected) in [
        ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "1"),
        ("KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS", "0"),
    ] {
        assert_eq!(
            kafka.env_var(var),
            expected,
            "service `{}`: {var} must be {expected} on a single node",
            kafka.name
        );
    }

    let health = kafka.healthcheck().unwrap_or_else(|| {
        panic!(
            "service `{}` has no healthcheck; `topics` waits for it to be healthy",
            kafka.name
        )
    });
    assert!(
        health.contains("/opt/kafka/bin/"),
        "service `{}`: the healthcheck should use the image's own tools in /opt/kafka/bin, not `{health}`",
        kafka.name
    );
}

#[test]
fn compose_creates_the_topics_once_kafka_is_healthy_before_any_instance_starts() {
    let compose = compose();
    let kafka = compose.kafka();
    let topics = compose.topics_service();
    let runs = compose.run_services();

    assert_eq!(
        topics.depends_on().get(&kafka.name).map(String::as_str),
        Some("service_healthy"),
        "service `{}` must wait for `{}` with condition: service_healthy",
        topics.name,
        kafka.name
    );
    let restart = topics.get("restart").and_then(scalar);
    assert!(
        matches!(restart.as_deref(), None | Some("no")),
        "service `{}` is a one-shot; restart: {restart:?} would run it again and again",
        topics.name
    );

    let command = compose.keyflight_command(topics);
    let partitions: usize = command
        .iter()
        .position(|a| a == "--partitions")
        .and_then(|i| command.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "service `{}`: give `topics create` --partitions N, got {command:?}",
                topics.name
            )
        });
    assert!(
        partitions >= runs.len(),
        "service `{}`: {partitions} partitions leave some of the {} instances idle",
        topics.name,
        runs.len()
    );

    for run in runs {
        assert_eq!(
            run.depends_on().get(&topics.name).map(String::as_str),
            Some("service_completed_successfully"),
            "service `{}` must wait for `{}` with condition: service_completed_successfully (run stops when a topic is missing)",
            run.name,
            topics.name
        );
    }
}

#[test]
fn compose_runs_two_instances_in_one_group_with_their_own_state_volumes() {
    let compose = compose();
    let runs = compose.run_services();
    assert_eq!(
        runs.len(),
        2,
        "docker-compose.yml: expected exactly two keyflight services running `run`, found {:?}",
        runs.iter().map(|s| &s.name).collect::<Vec<_>>()
    );

    let declared = compose.declared_volumes();
    let mut groups = BTreeSet::new();
    let mut volumes = BTreeMap::new();
    for run in &runs {
        let settings = run.settings();
        groups.insert(settings.application_id.clone());
        assert!(
            settings.state_dir.is_absolute(),
            "service `{}`: state_dir {:?} should be an absolute path on its volume",
            run.name,
            settings.state_dir
        );
        let mount = run
            .mounts()
            .into_iter()
            .find(|m| settings.state_dir.starts_with(&m.target))
            .unwrap_or_else(|| {
                panic!(
                    "service `{}`: state_dir {:?} is on no volume; the stores would be lost with the container",
                    run.name, settings.state_dir
                )
            });
        assert!(
            mount.kind == MountKind::Volume && !mount.source.is_empty(),
            "service `{}`: the state dir should be on a named volume, not {mount:?}",
            run.name
        );
        assert!(
            declared.contains(&mount.source),
            "service `{}`: volume `{}` is not declared under the top-level `volumes:`",
            run.name,
            mount.source
        );
        if let Some(other) = volumes.insert(mount.source.clone(), run.name.clone()) {
            panic!(
                "services `{other}` and `{}` share the state volume `{}`; each instance needs its own",
                run.name, mount.source
            );
        }
    }
    assert_eq!(
        groups.len(),
        1,
        "the instances must share one application_id (one consumer group), found {groups:?}"
    );
}

#[test]
fn compose_services_agree_on_application_id_topics_and_brokers() {
    let compose = compose();
    let services = compose.keyflight_services();
    let all: Vec<(&str, Settings)> = services
        .iter()
        .map(|s| (s.name.as_str(), s.settings()))
        .collect();
    let view = |s: &Settings| {
        (
            s.application_id.clone(),
            s.brokers.clone(),
            s.topics.input.clone(),
            s.topics.pushed.clone(),
            s.topics.dead_letter.clone(),
            s.changelog_topic(),
        )
    };
    let (first_name, first) = &all[0];
    for (name, settings) in &all[1..] {
        assert_eq!(
            view(settings),
            view(first),
            "services `{name}` and `{first_name}` disagree on (application_id, brokers, input, pushed, dead letter, changelog)"
        );
    }

    // Without KEYFLIGHT_TOPICS__* overrides the stack uses the documented
    // defaults (events.in, events.pushed, ...).
    let overridden = services
        .iter()
        .any(|s| s.env().keys().any(|k| k.starts_with("KEYFLIGHT_TOPICS__")));
    if !overridden {
        assert_eq!(
            first.topics,
            Settings::default().topics,
            "the services set no KEYFLIGHT_TOPICS__* variable, so their topics should be the defaults"
        );
    }

    // Every topic name the compose file mentions (comments included) is one
    // the services use.
    let used: BTreeSet<String> = [
        first.topics.input.clone(),
        first.topics.pushed.clone(),
        first.topics.dead_letter.clone(),
        first.changelog_topic(),
    ]
    .into();
    let text = read("docker-compose.yml");
    for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || "._-".contains(c))) {
        let word = word.trim_end_matches('.');
        if word.starts_with("events.") || word.ends_with("-markers-changelog") {
            assert!(
                used.contains(word),
                "docker-compose.yml mentions topic `{word}`, but the services use {used:?}"
            );
        }
    }
}

#[test]
fn compose_gives_instances_longer_to_stop_than_their_shutdown_timeout() {
    let compose = compose();
    for run in compose.run_services() {
        let settings = run.settings();
        let grace = run
            .get("stop_grace_period")
            .and_then(scalar)
            .map(|t| duration(&t, &format!("service `{}`: stop_grace_period", run.name)))
            .unwrap_or(Duration::from_secs(10)); // Docker's default
        assert!(
            grace > settings.shutdown_timeout,
            "service `{}`: stop_grace_period {grace:?} must exceed shutdown_timeout {:?}, or docker stop kills pushes in flight",
            run.name,
            settings.shutdown_timeout
        );
    }
}

#[test]
fn prometheus_scrapes_every_instance_on_its_metrics_port() {
    let compose = compose();
    let prometheus = compose
        .services
        .iter()
        .find(|s| s.image().is_some_and(|i| i.starts_with("prom/prometheus:")))
        .expect("docker-compose.yml: no service with a prom/prometheus:<version> image");
    let image = prometheus.image().unwrap();
    assert!(
        !image.ends_with(":latest"),
        "service `{}`: pin the Prometheus version, not `{image}`",
        prometheus.name
    );
    let mounted = prometheus.mounts().into_iter().any(|m| {
        m.kind == MountKind::Bind
            && repo().join(&m.source).canonicalize().ok()
                == repo().join("config/prometheus.yml").canonicalize().ok()
            && m.target == "/etc/prometheus/prometheus.yml"
    });
    assert!(
        mounted,
        "service `{}` must mount ./config/prometheus.yml at /etc/prometheus/prometheus.yml (where the image reads its configuration)",
        prometheus.name
    );

    let config = yaml("config/prometheus.yml");
    let global_interval = config
        .get("global")
        .and_then(|g| g.get("scrape_interval"))
        .and_then(scalar)
        .unwrap_or_else(|| "1m".into()); // Prometheus' default
    let mut targets = BTreeMap::new();
    for job in config
        .get("scrape_configs")
        .and_then(Value::as_sequence)
        .expect("config/prometheus.yml: no scrape_configs")
    {
        let name = job.get("job_name").and_then(scalar).unwrap_or_default();
        let interval = job
            .get("scrape_interval")
            .and_then(scalar)
            .unwrap_or_else(|| global_interval.clone());
        let path = job
            .get("metrics_path")
            .and_then(scalar)
            .unwrap_or_else(|| "/metrics".into());
        for target in job
            .get("static_configs")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .filter_map(|c| c.get("targets").and_then(Value::as_sequence))
            .flatten()
            .filter_map(scalar)
        {
            targets.insert(target, (name.clone(), interval.clone(), path.clone()));
        }
    }

    let runs = compose.run_services();
    let mut expected = BTreeSet::new();
    for run in &runs {
        let settings = run.settings();
        let addr: SocketAddr = settings.metrics_socket().unwrap_or_else(|| {
            panic!(
                "service `{}`: metrics are off; Prometheus cannot scrape it",
                run.name
            )
        });
        assert!(
            addr.ip().is_unspecified(),
            "service `{}`: metrics_addr {addr} listens only inside its container; use 0.0.0.0:{} so Prometheus can scrape it",
            run.name,
            addr.port()
        );
        let target = format!("{}:{}", run.name, addr.port());
        let (job, interval, path) = targets.get(&target).unwrap_or_else(|| {
            panic!(
                "config/prometheus.yml does not scrape `{target}` (service `{}`); its targets: {:?}",
                run.name,
                targets.keys().collect::<Vec<_>>()
            )
        });
        assert_eq!(path, "/metrics", "job `{job}`: keyflight serves /metrics");
        let interval = duration(interval, &format!("job `{job}`: scrape_interval"));
        assert!(
            interval <= Duration::from_secs(15),
            "job `{job}`: scrape interval {interval:?} is too long for a demo stack; 5s to 15s"
        );
        expected.insert(target);
    }
    for target in targets.keys() {
        assert!(
            expected.contains(target),
            "config/prometheus.yml scrapes `{target}`, which is no keyflight instance in docker-compose.yml (expected {expected:?})"
        );
    }
}

#[test]
fn compose_publishes_each_instances_metrics_on_its_own_host_port() {
    let compose = compose();
    let mut host_ports = BTreeMap::new();
    for service in &compose.services {
        for port in service.ports() {
            if let Some(host) = port.host {
                let key = (port.host_ip.clone().unwrap_or_default(), host);
                if let Some(other) = host_ports.insert(key, service.name.clone()) {
                    panic!(
                        "services `{other}` and `{}` both publish host port {host}",
                        service.name
                    );
                }
            }
        }
    }
    for run in compose.run_services() {
        let settings = run.settings();
        let port = metrics_port(run, &settings);
        assert!(
            run.ports()
                .iter()
                .any(|p| p.container == port && p.host.is_some()),
            "service `{}`: publish its metrics port {port} on a host port (\"127.0.0.1:<host port>:{port}\")",
            run.name
        );
        if let Some(health) = run.healthcheck() {
            assert!(
                health.contains(&port.to_string())
                    && (health.contains("/healthz") || health.contains("/readyz")),
                "service `{}`: the healthcheck should probe /healthz or /readyz on the metrics port {port}: `{health}`",
                run.name
            );
        }
    }
}

#[test]
fn every_file_a_compose_service_mounts_or_builds_exists() {
    let compose = compose();
    let declared = compose.declared_volumes();
    for service in &compose.services {
        for mount in service.mounts() {
            match mount.kind {
                MountKind::Bind => {
                    let path = repo().join(&mount.source);
                    assert!(
                        path.exists(),
                        "service `{}` mounts {} at {}, but that file is not in the repository",
                        service.name,
                        mount.source,
                        mount.target
                    );
                }
                MountKind::Volume if !mount.source.is_empty() => assert!(
                    declared.contains(&mount.source),
                    "service `{}` uses volume `{}`, which the top-level `volumes:` does not declare",
                    service.name,
                    mount.source
                ),
                MountKind::Volume => {}
            }
        }
        if let Some((context, dockerfile)) = service.build() {
            assert!(
                context.is_dir() && dockerfile.is_file(),
                "service `{}` builds {} with {}, which does not exist",
                service.name,
                context.display(),
                dockerfile.display()
            );
        }
    }
    assert!(
        !compose.keyflight_services().is_empty(),
        "no service builds this repository's Dockerfile"
    );
}

#[test]
fn keyflight_bootstraps_from_a_listener_kafka_advertises_to_containers() {
    let compose = compose();
    let kafka = compose.kafka();
    let names: BTreeSet<String> = [
        Some(kafka.name.clone()),
        kafka.get("hostname").and_then(scalar),
    ]
    .into_iter()
    .flatten()
    .collect();
    let advertised = listeners(kafka, "KAFKA_ADVERTISED_LISTENERS");
    let bound = listeners(kafka, "KAFKA_LISTENERS");
    let protocols: BTreeMap<String, String> = kafka
        .env_var("KAFKA_LISTENER_SECURITY_PROTOCOL_MAP")
        .split(',')
        .filter_map(|pair| pair.split_once(':'))
        .map(|(n, p)| (n.trim().to_string(), p.trim().to_string()))
        .collect();

    for service in compose.keyflight_services() {
        let settings = service.settings();
        let protocol = flatten(&settings.kafka.common)
            .get("security.protocol")
            .cloned()
            .unwrap_or_else(|| "PLAINTEXT".into())
            .to_ascii_uppercase();
        for broker in settings.brokers.split(',').map(str::trim) {
            let listener = advertised
                .iter()
                .find(|l| format!("{}:{}", l.host, l.port) == broker && names.contains(&l.host))
                .unwrap_or_else(|| {
                    panic!(
                        "service `{}` bootstraps from `{broker}`, which `{}` does not advertise under a name the compose network resolves ({names:?}); KAFKA_ADVERTISED_LISTENERS = {advertised:?}",
                        service.name, kafka.name
                    )
                });
            assert!(
                bound
                    .iter()
                    .any(|l| l.name == listener.name && l.port == listener.port),
                "listener `{}` is advertised on port {} but KAFKA_LISTENERS binds it elsewhere ({bound:?}); containers connect directly",
                listener.name,
                listener.port
            );
            assert_eq!(
                protocols.get(&listener.name).map(String::as_str),
                Some(protocol.as_str()),
                "service `{}` speaks {protocol} to listener `{}`, which KAFKA_LISTENER_SECURITY_PROTOCOL_MAP maps otherwise",
                service.name,
                listener.name
            );
        }
    }
}

#[test]
fn host_clients_reach_kafka_through_a_published_listener_advertised_as_localhost() {
    let compose = compose();
    let kafka = compose.kafka();
    let bound = listeners(kafka, "KAFKA_LISTENERS");
    let external: Vec<Listener> = listeners(kafka, "KAFKA_ADVERTISED_LISTENERS")
        .into_iter()
        .filter(|l| ["localhost", "127.0.0.1", "::1"].contains(&l.host.as_str()))
        .collect();
    assert!(
        !external.is_empty(),
        "service `{}`: no listener is advertised as localhost, so a client on the host would be redirected to a container name it cannot resolve",
        kafka.name
    );
    for listener in external {
        let inside = bound
            .iter()
            .find(|l| l.name == listener.name)
            .unwrap_or_else(|| {
                panic!(
                    "listener `{}` is advertised but not in KAFKA_LISTENERS",
                    listener.name
                )
            });
        let published = kafka
            .ports()
            .into_iter()
            .find(|p| p.host == Some(listener.port))
            .unwrap_or_else(|| {
                panic!(
                    "listener `{}` is advertised as {}:{}, but `{}` does not publish host port {}",
                    listener.name, listener.host, listener.port, kafka.name, listener.port
                )
            });
        assert_eq!(
            published.container, inside.port,
            "host port {} must lead to the `{}` listener's port {} in the container",
            listener.port, listener.name, inside.port
        );
        assert!(
            matches!(
                published.host_ip.as_deref(),
                None | Some("127.0.0.1") | Some("0.0.0.0")
            ),
            "listener `{}` is advertised as {} but published on {:?}",
            listener.name,
            listener.host,
            published.host_ip
        );
    }
}

// ---------------------------------------------------------------------------
// config/production.toml
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// Dockerfile and .dockerignore
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct Instruction {
    keyword: String,
    args: String,
}

#[derive(Debug)]
struct Stage {
    image: String,
    name: Option<String>,
    instructions: Vec<Instruction>,
}

impl Stage {
    fn all(&self, keyword: &str) -> impl Iterator<Item = &str> {
        let keyword = keyword.to_string();
        self.instructions
            .iter()
            .filter(move |i| i.keyword == keyword)
            .map(|i| i.args.as_str())
    }

    fn last(&self, keyword: &str) -> Option<&str> {
        self.all(keyword).last()
    }
}

/// Instructions by stage: continuation lines joined, comments dropped.
fn dockerfile() -> Vec<Stage> {
    let text = read("Dockerfile");
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                logical.push(std::mem::take(&mut current));
            }
        }
    }
    let mut stages: Vec<Stage> = Vec::new();
    for line in logical {
        let (keyword, args) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
        let keyword = keyword.to_ascii_uppercase();
        let args = args.trim().to_string();
        if keyword == "FROM" {
            let words: Vec<&str> = args
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            let name = match words.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some(name.to_string()),
                _ => None,
            };
            stages.push(Stage {
                image: words.first().expect("FROM without an image").to_string(),
                name,
                instructions: Vec::new(),
            });
        } else {
            stages
                .last_mut()
                .expect("Dockerfile: an instruction before the first FROM")
                .instructions
                .push(Instruction { keyword, args });
        }
    }
    stages
}

/// `["a", "b"]` (exec form) or whitespace-separated words.
fn words(args: &str) -> Vec<String> {
    if args.starts_with('[') {
        serde_json::from_str(args)
            .unwrap_or_else(|e| panic!("Dockerfile: bad JSON array `{args}`: {e}"))
    } else {
        args.split_whitespace().map(String::from).collect()
    }
}

fn builder_rust_version(stages: &[Stage]) -> ((u64, u64, u64), String) {
    let image = &stages[0].image;
    let tag = image
        .strip_prefix("rust:")
        .unwrap_or_else(|| panic!("Dockerfile: the first stage should build on a rust:<version>-bookworm image, not `{image}`"));
    let number = tag.split('-').next().unwrap_or_default();
    assert!(
        number.chars().next().is_some_and(|c| c.is_ascii_digit()),
        "Dockerfile: pin the Rust version of `{image}` (rust:1.93-bookworm, ...)"
    );
    (version(number), image.clone())
}

#[test]
fn dockerfile_builds_in_a_rust_stage_and_ships_a_slim_debian_of_the_same_release() {
    let stages = dockerfile();
    assert!(
        stages.len() >= 2,
        "Dockerfile: expected a build stage and a runtime stage, found {} FROM",
        stages.len()
    );
    let builder = &stages[0];
    let runtime = stages.last().unwrap();
    let (rust, image) = builder_rust_version(&stages);

    let manifest: toml::Value = toml::from_str(&read("Cargo.toml")).unwrap();
    let msrv = manifest["package"]["rust-version"].as_str().unwrap();
    assert!(
        rust >= version(msrv),
        "Dockerfile: `{image}` is older than the crate's rust-version {msrv}"
    );
    assert!(
        builder
            .all("RUN")
            .any(|r| r.contains("cargo build --release --locked")),
        "Dockerfile: the build stage should run `cargo build --release --locked` (Cargo.lock, as tested)"
    );

    assert!(
        runtime.image.contains("slim"),
        "Dockerfile: the final stage should be a slim image, not `{}`",
        runtime.image
    );
    // glibc, OpenSSL and libstdc++ are linked dynamically: the runtime must be
    // the Debian release the binary was built on.
    let release = ["bookworm", "trixie", "bullseye"]
        .into_iter()
        .find(|r| image.contains(r))
        .unwrap_or_else(|| {
            panic!("Dockerfile: name the Debian release in the builder tag (`{image}`)")
        });
    assert!(
        runtime.image.contains(release),
        "Dockerfile: built on {release} (`{image}`) but shipped on `{}`",
        runtime.image
    );
    let builder_name = builder.name.clone().unwrap_or_else(|| "0".into());
    assert!(
        runtime
            .all("COPY")
            .any(|c| c.contains(&format!("--from={builder_name}")) && c.contains("keyflight")),
        "Dockerfile: the final stage should copy the keyflight binary from the `{builder_name}` stage"
    );
}

#[test]
fn dockerfile_builder_rust_is_new_enough_for_every_locked_dependency() {
    let stages = dockerfile();
    let (rust, image) = builder_rust_version(&stages);
    let output = Command::new(env!("CARGO"))
        .current_dir(repo())
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        .args(["--filter-platform", "x86_64-unknown-linux-gnu"])
        .output()
        .expect("run cargo metadata");
    assert!(
        output.status.success(),
        "cargo metadata --locked --offline failed (the image builds with --locked too):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let packages: BTreeMap<&str, (&str, &str, Option<&str>)> = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["id"].as_str().unwrap(),
                (
                    p["name"].as_str().unwrap(),
                    p["version"].as_str().unwrap(),
                    p["rust_version"].as_str(),
                ),
            )
        })
        .collect();
    let nodes: BTreeMap<&str, &serde_json::Value> = metadata["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["id"].as_str().unwrap(), n))
        .collect();

    // What `cargo build --release` compiles: normal and build dependencies.
    let root = metadata["resolve"]["root"].as_str().unwrap();
    let mut seen = BTreeSet::from([root]);
    let mut queue = vec![root];
    while let Some(id) = queue.pop() {
        for dep in nodes[id]["deps"].as_array().unwrap() {
            let built = dep["dep_kinds"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k["kind"].as_str() != Some("dev"));
            let pkg = dep["pkg"].as_str().unwrap();
            if built && seen.insert(pkg) {
                queue.push(pkg);
            }
        }
    }
    let too_new: Vec<String> = seen
        .iter()
        .filter_map(|id| {
            let (name, ver, needs) = packages[id];
            let needs = needs?;
            (version(needs) > rust).then(|| format!("{name} {ver} needs Rust {needs}"))
        })
        .collect();
    assert!(
        too_new.is_empty(),
        "Dockerfile: `{image}` cannot build the locked dependencies: {}",
        too_new.join("; ")
    );
}

#[test]
fn dockerfile_runs_as_a_non_root_user() {
    let stages = dockerfile();
    let runtime = stages.last().unwrap();
    let user = runtime
        .last("USER")
        .expect("Dockerfile: the final stage has no USER, so keyflight would run as root");
    let name = user.split(':').next().unwrap_or_default();
    assert!(
        !name.is_empty() && name != "root" && name != "0",
        "Dockerfile: the final stage's USER is `{user}`; run as an unprivileged user"
    );
}

#[test]
fn dockerfile_exposes_the_default_metrics_port() {
    let stages = dockerfile();
    let runtime = stages.last().unwrap();
    let port = DEFAULT_METRICS_ADDR
        .parse::<SocketAddr>()
        .unwrap()
        .port()
        .to_string();
    let exposed: Vec<String> = runtime
        .all("EXPOSE")
        .flat_map(words)
        .map(|p| p.split('/').next().unwrap_or_default().to_string())
        .collect();
    assert!(
        exposed.contains(&port),
        "Dockerfile: EXPOSE {port} (the port of DEFAULT_METRICS_ADDR {DEFAULT_METRICS_ADDR}); exposed: {exposed:?}"
    );
}

#[test]
fn dockerfile_runs_keyflight_with_its_state_on_a_volume_compose_mounts() {
    let stages = dockerfile();
    let runtime = stages.last().unwrap();
    assert_eq!(
        runtime.last("ENTRYPOINT").map(words),
        Some(vec!["keyflight".to_string()]),
        "Dockerfile: ENTRYPOINT [\"keyflight\"] (so `docker run IMAGE <subcommand>` works)"
    );
    assert_eq!(
        runtime.last("CMD").map(words),
        Some(vec!["run".to_string()]),
        "Dockerfile: CMD [\"run\"]"
    );
    let volumes: BTreeSet<String> = runtime.all("VOLUME").flat_map(words).collect();
    let compose = compose();
    for run in compose.run_services() {
        let settings = run.settings();
        let mount = run
            .mounts()
            .into_iter()
            .find(|m| settings.state_dir.starts_with(&m.target))
            .unwrap_or_else(|| panic!("service `{}`: its state dir is on no volume", run.name));
        assert!(
            volumes.contains(&mount.target),
            "service `{}` keeps its state on {}, which the Dockerfile does not declare as a VOLUME ({volumes:?}); the image's directory (owned by the keyflight user) is what a new volume starts from",
            run.name,
            mount.target
        );
    }
}

/// A `.dockerignore` pattern match, enough for the patterns used here:
/// `*` within a path segment, a leading `**/`, and directories excluding
/// everything below them.
fn ignored(path: &str, patterns: &[String]) -> bool {
    fn glob(pattern: &[u8], text: &[u8]) -> bool {
        match (pattern.first(), text.first()) {
            (None, None) => true,
            (Some(b'*'), _) => {
                glob(&pattern[1..], text)
                    || (!text.is_empty() && text[0] != b'/' && glob(pattern, &text[1..]))
            }
            (Some(p), Some(t)) if p == t => glob(&pattern[1..], &text[1..]),
            _ => false,
        }
    }
    let components: Vec<&str> = path.split('/').collect();
    let mut excluded = false;
    for pattern in patterns {
        let (negate, pattern) = match pattern.strip_prefix('!') {
            Some(p) => (true, p),
            None => (false, pattern.as_str()),
        };
        let pattern = pattern.trim_start_matches('/').trim_end_matches('/');
        let hit = (1..=components.len()).any(|n| {
            let prefix = components[..n].join("/");
            match pattern.strip_prefix("**/") {
                Some(rest) => (0..n)
                    .any(|start| glob(rest.as_bytes(), components[start..n].join("/").as_bytes())),
                None => glob(pattern.as_bytes(), prefix.as_bytes()),
            }
        });
        if hit {
            excluded = !negate;
        }
    }
    excluded
}

#[test]
fn dockerignore_keeps_what_the_dockerfile_copies_and_drops_target_and_git() {
    let patterns: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    for dropped in ["target", "target/release/keyflight", ".git", ".git/HEAD"] {
        assert!(
            ignored(dropped, &patterns),
            ".dockerignore should exclude `{dropped}` (the context would be gigabytes)"
        );
    }
    let stages = dockerfile();
    let mut copied = 0;
    for stage in &stages {
        for copy in stage.all("COPY").chain(stage.all("ADD")) {
            let args: Vec<String> = words(copy)
                .into_iter()
                .filter(|w| !w.starts_with("--"))
                .collect();
            if copy.contains("--from=") || args.len() < 2 {
                continue;
            }
            for source in &args[..args.len() - 1] {
                let source = source.trim_start_matches("./").trim_end_matches('/');
                assert!(
                    repo().join(source).exists(),
                    "Dockerfile copies `{source}`, which is not in the repository"
                );
                assert!(
                    !ignored(source, &patterns),
                    "Dockerfile copies `{source}`, but .dockerignore excludes it from the build context"
                );
                copied += 1;
            }
        }
    }
    assert!(
        copied > 0,
        "Dockerfile copies nothing from the build context"
    );
    // Cargo needs the files a manifest target points at.
    for needed in [
        "Cargo.toml",
        "Cargo.lock",
        "src/main.rs",
        "src/lib.rs",
        "schemas/event.avsc",
        "benches/engine.rs",
    ] {
        assert!(
            !ignored(needed, &patterns),
            ".dockerignore excludes `{needed}`, which the build needs"
        );
    }
}
