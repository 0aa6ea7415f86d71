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

say() { printf '\n==> %s\n' "$*"; }

# 1. System packages: libclang for rocksdb's bindgen, a C/C++ toolchain and
#    OpenSSL headers for librdkafka.
missing=()
for pkg in libclang-dev pkg-config libssl-dev make g++ zlib1g-dev; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
    say "installing system packages: ${missing[*]}"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# 2. The broker the tests run against: Tansu 0.6.0 with SQLite storage.
tansu="$cache/tansu/bin/tansu"
if [ ! -x "$tansu" ]; then
    say "installing the Tansu broker into $cache/tansu (once, about 15 minutes)"
    CARGO_TARGET_DIR="$cache/tansu-target" \
        cargo install tansu --version 0.6.0 --features libsql --locked --root "$cache/tansu"
fi
export TANSU_BIN="$tansu"
"$TANSU_BIN" --version

# 3. Python's fastavro, the third-party Avro implementation of the interop
#    test (tests/interop.rs), in a virtualenv of its own.
venv="$cache/venv"
if ! "$venv/bin/python" -c 'import fastavro' >/dev/null 2>&1; then
    say "installing fastavro into $venv"
    if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
        sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends python3 python3-venv
    fi
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "fastavro==1.10.0"
fi
# Not KEYFLIGHT_*: that prefix is keyflight's configuration.
export INTEROP_PYTHON="$venv/bin/python"

# 4. Build and run every test: lib and bin unit tests, tests/*.rs (CLI,
#    simulation, broker, pipeline) and the benchmarks in test mode (each
#    runs once). There are no doc tests (lib.rs code blocks are text).
say "building and running the tests"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo test --locked --all-targets 2>&1 | tee "$log"

# One closing line for the whole run.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) } }
     END { printf "\nkeyflight: %d passed, %d failed\n", p, f }' "$log"
