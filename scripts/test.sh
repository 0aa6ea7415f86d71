#!/usr/bin/env bash
# keyflight's one test command: on a fresh machine it installs what is
# missing, starts nothing by hand, and runs every test (unit, simulation,
# CLI, and the broker tests against a real Tansu broker over TCP).
#
#   scripts/test.sh                 everything (what CI runs)
#   SIM_SCHEDULES=1000000 scripts/test.sh   the long simulation mode
#
# Caches (outside the repo, reused between runs):
#   $HOME/.cache/keyflight/target   Cargo target dir (rocksdb, librdkafka built once)
#   $HOME/.cache/keyflight/tansu    the Tansu broker binary (built once, ~15 min)
#   $HOME/.cache/keyflight/venv     Python with fastavro (the Avro interop test)
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${XDG_CACHE_HOME:-$HOME/.cache}/keyflight"
mkdir -p "$cache"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

# shellcheck source=scripts/setup.sh
source scripts/setup.sh
setup_system_packages
setup_tansu
setup_fastavro

# Build and run every test: lib and bin unit tests, the integration tests
# (tests/main.rs, one crate: CLI, simulations, broker, pipeline, recovery,
# operability, interop, deployment files, the benchmark driver CI-sized) and the criterion benchmark in test
# mode (each runs once). There are no doc tests (lib.rs code blocks are text).
say "building and running the tests"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
# The binaries first: the benchmark driver's smoke test runs keyflight-bench,
# a crate of its own in the workspace.
cargo build --locked --workspace --bins
cargo test --locked --workspace --all-targets 2>&1 | tee "$log"

# One closing line for the whole run.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) } }
     END { printf "\nkeyflight: %d passed, %d failed\n", p, f }' "$log"
