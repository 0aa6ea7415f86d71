//! docker-compose.yml and config/prometheus.yml.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

use keyflight::config::{flatten, Settings};
use serde_yaml::Mapping;

use super::dockerfile::{dockerfile, words};
use super::*;

pub(super) struct Compose {
    pub(super) doc: Value,
    pub(super) services: Vec<Service>,
}

pub(super) struct Service {
    pub(super) name: String,
    pub(super) spec: Mapping,
}

#[derive(Debug, PartialEq)]
pub(super) enum MountKind {
    Bind,
    Volume,
}

#[derive(Debug)]
pub(super) struct Mount {
    pub(super) kind: MountKind,
    /// Host path (bind) or volume name (empty for an anonymous volume).
    pub(super) source: String,
    pub(super) target: String,
}

#[derive(Debug)]
pub(super) struct Port {
    pub(super) host_ip: Option<String>,
    pub(super) host: Option<u16>,
    pub(super) container: u16,
}

pub(super) fn compose() -> Compose {
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
    pub(super) fn keyflight_services(&self) -> Vec<&Service> {
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
    pub(super) fn keyflight_command(&self, service: &Service) -> Vec<String> {
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
    pub(super) fn run_services(&self) -> Vec<&Service> {
        self.keyflight_services()
            .into_iter()
            .filter(|s| self.keyflight_command(s).first().map(String::as_str) == Some("run"))
            .collect()
    }

    /// The one keyflight service running `topics create`.
    pub(super) fn topics_service(&self) -> &Service {
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
    pub(super) fn kafka(&self) -> &Service {
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

    pub(super) fn declared_volumes(&self) -> BTreeSet<String> {
        self.doc
            .get("volumes")
            .and_then(Value::as_mapping)
            .map(|m| m.keys().filter_map(scalar).collect())
            .unwrap_or_default()
    }
}

impl Service {
    pub(super) fn get(&self, key: &str) -> Option<&Value> {
        self.spec.get(key)
    }

    pub(super) fn image(&self) -> Option<String> {
        self.get("image").and_then(scalar)
    }

    /// `environment:` as a mapping or as a list of `KEY=value`.
    pub(super) fn env(&self) -> BTreeMap<String, String> {
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

    pub(super) fn env_var(&self, key: &str) -> String {
        self.env().remove(key).unwrap_or_else(|| {
            panic!(
                "service `{}`: environment variable {key} is not set",
                self.name
            )
        })
    }

    /// `command:` as a list, or a string split at whitespace.
    pub(super) fn command(&self) -> Vec<String> {
        match self.get("command") {
            None => Vec::new(),
            Some(Value::Sequence(items)) => items.iter().filter_map(scalar).collect(),
            Some(value) => scalar(value)
                .map(|s| s.split_whitespace().map(String::from).collect())
                .unwrap_or_default(),
        }
    }

    /// The build context and Dockerfile, when the service builds an image.
    pub(super) fn build(&self) -> Option<(PathBuf, PathBuf)> {
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

    pub(super) fn builds_this_repo(&self) -> bool {
        self.build().is_some_and(|(context, dockerfile)| {
            context.canonicalize().ok() == repo().canonicalize().ok()
                && dockerfile.canonicalize().ok() == repo().join("Dockerfile").canonicalize().ok()
        })
    }

    pub(super) fn mounts(&self) -> Vec<Mount> {
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

    pub(super) fn ports(&self) -> Vec<Port> {
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
    pub(super) fn depends_on(&self) -> BTreeMap<String, String> {
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
    pub(super) fn healthcheck(&self) -> Option<String> {
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
    pub(super) fn settings(&self) -> Settings {
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

/// A Kafka listener, `NAME://host:port`.
#[derive(Debug, Clone)]
pub(super) struct Listener {
    pub(super) name: String,
    pub(super) host: String,
    pub(super) port: u16,
}

pub(super) fn listeners(kafka: &Service, var: &str) -> Vec<Listener> {
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

pub(super) fn metrics_port(service: &Service, settings: &Settings) -> u16 {
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
