# Shared set-up of scripts/test.sh and scripts/bench.sh: installs what a
# fresh Debian machine lacks, once, into caches outside the repository.
# Source it after setting $cache; each step is a function.

say() { printf '\n==> %s\n' "$*"; }

apt_install() {
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@"
}

# System packages: libclang for rocksdb's bindgen, a C/C++ toolchain and
# OpenSSL headers for librdkafka.
setup_system_packages() {
    local missing=() pkg
    for pkg in libclang-dev pkg-config libssl-dev make g++ zlib1g-dev; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        say "installing system packages: ${missing[*]}"
        apt_install "${missing[@]}"
    fi
}

# The broker the tests and the benchmark run against: Tansu 0.6.0 with
# SQLite storage. Exports TANSU_BIN.
setup_tansu() {
    local tansu="$cache/tansu/bin/tansu"
    if [ ! -x "$tansu" ]; then
        say "installing the Tansu broker into $cache/tansu (once, about 15 minutes)"
        CARGO_TARGET_DIR="$cache/tansu-target" \
            cargo install tansu --version 0.6.0 --features libsql --locked --root "$cache/tansu"
    fi
    export TANSU_BIN="$tansu"
    "$TANSU_BIN" --version
}

# Python's fastavro, the third-party Avro implementation of the interop test
# (tests/interop.rs), in a virtualenv of its own. Exports INTEROP_PYTHON
# (not KEYFLIGHT_*: that prefix is keyflight's configuration).
setup_fastavro() {
    local venv="$cache/venv"
    if ! "$venv/bin/python" -c 'import fastavro' >/dev/null 2>&1; then
        say "installing fastavro into $venv"
        python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || apt_install python3 python3-venv
        rm -rf "$venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q --disable-pip-version-check "fastavro==1.10.0"
    fi
    export INTEROP_PYTHON="$venv/bin/python"
}
