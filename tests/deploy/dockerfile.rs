//! The Dockerfile and .dockerignore.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::Command;

use keyflight::config::DEFAULT_METRICS_ADDR;

use super::compose::compose;
use super::*;

#[derive(Debug)]
pub(super) struct Instruction {
    pub(super) keyword: String,
    pub(super) args: String,
}

#[derive(Debug)]
pub(super) struct Stage {
    pub(super) image: String,
    pub(super) name: Option<String>,
    pub(super) instructions: Vec<Instruction>,
}

impl Stage {
    pub(super) fn all(&self, keyword: &str) -> impl Iterator<Item = &str> {
        let keyword = keyword.to_string();
        self.instructions
            .iter()
            .filter(move |i| i.keyword == keyword)
            .map(|i| i.args.as_str())
    }

    pub(super) fn last(&self, keyword: &str) -> Option<&str> {
        self.all(keyword).last()
    }
}

/// Instructions by stage: continuation lines joined, comments dropped.
pub(super) fn dockerfile() -> Vec<Stage> {
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
pub(super) fn words(args: &str) -> Vec<String> {
    if args.starts_with('[') {
        serde_json::from_str(args)
            .unwrap_or_else(|e| panic!("Dockerfile: bad JSON array `{args}`: {e}"))
    } else {
        args.split_whitespace().map(String::from).collect()
    }
}

pub(super) fn builder_rust_version(stages: &[Stage]) -> ((u64, u64, u64), String) {
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
pub(super) fn ignored(path: &str, patterns: &[String]) -> bool {
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
