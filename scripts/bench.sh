#!/usr/bin/env bash
# keyflight's benchmark suite: keyflight against a bare consume→produce copy
# on two brokers, plus the compensation scan, restore and memory figures,
# then the engine's criterion benchmark. Results and their reading are in
# BENCHMARKS.md.
#
#   scripts/bench.sh                      the full run (1 000 000 events, 100 000 keys)
#   EVENTS=100000 KEYS=10000 MARKERS=100000 scripts/bench.sh   a shorter one
#   BROKERS="mock" scripts/bench.sh       one broker only (tansu, mock)
#   BROKERS="mock mock-eos-100ms mock-eos-1s" ENGINE=0 scripts/bench.sh
#                                         at-least-once against exactly-once
#                                         (commit interval after mock-eos-)
#   BROKERS="mock mock-delay-100ms mock-interval-1s" ENGINE=0 scripts/bench.sh
#                                         push shaping (singleflight.delay,
#                                         singleflight.min_interval) against none
#   KEYS=1000000 BROKERS="mock mock-cache-100000000" ENGINE=0 scripts/bench.sh
#                                         idle keys cached (state.cached_keys)
#   BROKERS="mock-http" ENGINE=0 scripts/bench.sh
#                                         the HTTP sink against a bare HTTP client
#                                         loop (PUSHES pushes, 200 000 by default),
#                                         and its collapse behind a 20 ms receiver
#                                         (EVENTS over KEYS) beside the Kafka sink's
#   BROKERS="mock-http mock-http-256" ENGINE=0 scripts/bench.sh
#                                         ... and with 256 requests in flight
#                                         (sink.http.max_in_flight after mock-http-)
#   HTTP_ARGS="--rounds 5" scripts/bench.sh   more options for the http runs
#                                         (keyflight-bench http --help lists them)
#   ENGINE=0 scripts/bench.sh             skip the criterion benchmark
#   BENCH_ARGS="--latency-rate 100000" scripts/bench.sh   more driver options
#
# Reports go to target/bench/<broker>.json (under $CARGO_TARGET_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${XDG_CACHE_HOME:-$HOME/.cache}/keyflight"
mkdir -p "$cache"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target}"

# shellcheck source=scripts/setup.sh
source scripts/setup.sh
setup_system_packages
setup_tansu

events="${EVENTS:-1000000}"
keys="${KEYS:-100000}"
markers="${MARKERS:-1000000}"
partitions="${PARTITIONS:-12}"
brokers="${BROKERS:-tansu mock}"
out="$CARGO_TARGET_DIR/bench"
mkdir -p "$out"

say "building the release binaries"
cargo build --release --locked --workspace --bins
bench="$CARGO_TARGET_DIR/release/keyflight-bench"
args=(run --events "$events" --keys "$keys" --markers "$markers" --partitions "$partitions" --verify)
# More options for every run, e.g. BENCH_ARGS="--latency-rate 100000"
# (keyflight-bench run --help lists them).
read -ra extra <<< "${BENCH_ARGS:-}"
args+=("${extra[@]}")
# The HTTP sink's runs (mock-http, mock-http-<in flight>).
http_args=(http --pushes "${PUSHES:-200000}" --events "$events" --keys "$keys" --partitions "$partitions" --verify)
read -ra http_extra <<< "${HTTP_ARGS:-}"
http_args+=("${http_extra[@]}")

# Tansu 0.6 keeps record headers in an SQLite table without an index, and
# reads a fetched record's headers with a query over that table: every
# header on the broker (keyflight's pushes carry four) slows every later
# fetch of any record. Measured: a copy draining 30 000 records after
# keyflight had written 2 236 pushes took 15–20 s, not 1.1–1.4 s. (Kafka
# keeps headers inside the record batch.) TANSU_HEADER_INDEX=0 measures
# stock Tansu.
index_headers() {
    [ "${TANSU_HEADER_INDEX:-1}" = 0 ] && return 0
    python3 - "$tansu_dir/tansu.db" <<'PY'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=30)
db.execute("create index if not exists header_record on header (topition, offset_id)")
db.commit()
PY
}

# Tansu on a free loopback port with SQLite storage in a scratch directory.
start_tansu() {
    tansu_dir="$(mktemp -d)"
    port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
    (cd "$tansu_dir" && exec "$TANSU_BIN" broker \
        --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
        --storage-engine sqlite://tansu.db >tansu.log 2>&1) &
    tansu_pid=$!
    trap 'kill $tansu_pid 2>/dev/null || true; rm -rf "$tansu_dir"' EXIT
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            index_headers
            return 0
        fi
        sleep 0.1 # the broker binds its port once ready; nothing else to await
    done
    echo "Tansu did not start; its log:" >&2
    cat "$tansu_dir/tansu.log" >&2
    exit 1
}

for broker in $brokers; do
    case "$broker" in
        tansu)
            start_tansu
            say "keyflight vs the bare copy on Tansu at 127.0.0.1:$port"
            "$bench" "${args[@]}" --label tansu --brokers "127.0.0.1:$port" --json "$out/tansu.json"
            kill "$tansu_pid"; wait "$tansu_pid" 2>/dev/null || true
            ;;
        mock)
            say "keyflight vs the bare copy on librdkafka's mock cluster"
            "$bench" "${args[@]}" --label mock --json "$out/mock.json"
            ;;
        mock-eos-*)
            interval="${broker#mock-eos-}"
            say "keyflight exactly-once (transactions every $interval) vs the bare copy on the mock cluster"
            KEYFLIGHT_PROCESSING_GUARANTEE=exactly-once KEYFLIGHT_COMMIT_INTERVAL="$interval" \
                "$bench" "${args[@]}" --label "$broker" --json "$out/$broker.json"
            ;;
        mock-delay-*)
            say "keyflight with singleflight.delay = ${broker#mock-delay-} vs the bare copy on the mock cluster"
            KEYFLIGHT_SINGLEFLIGHT__DELAY="${broker#mock-delay-}" \
                "$bench" "${args[@]}" --label "$broker" --json "$out/$broker.json"
            ;;
        mock-interval-*)
            say "keyflight with singleflight.min_interval = ${broker#mock-interval-} vs the bare copy on the mock cluster"
            KEYFLIGHT_SINGLEFLIGHT__MIN_INTERVAL="${broker#mock-interval-}" \
                "$bench" "${args[@]}" --label "$broker" --json "$out/$broker.json"
            ;;
        mock-cache-*)
            say "keyflight with state.cached_keys = ${broker#mock-cache-} vs the bare copy on the mock cluster"
            KEYFLIGHT_STATE__CACHED_KEYS="${broker#mock-cache-}" \
                "$bench" "${args[@]}" --label "$broker" --json "$out/$broker.json"
            ;;
        mock-http)
            say "keyflight's HTTP sink vs a bare HTTP client loop on the mock cluster"
            "$bench" "${http_args[@]}" --label "$broker" --json "$out/$broker.json"
            ;;
        mock-http-*)
            say "keyflight's HTTP sink vs a bare HTTP client loop, ${broker#mock-http-} in flight, on the mock cluster"
            "$bench" "${http_args[@]}" --in-flight "${broker#mock-http-}" --label "$broker" --json "$out/$broker.json"
            ;;
        *) echo "unknown broker $broker (tansu, mock, mock-eos-<interval>, mock-delay-<d>, mock-interval-<d>, mock-cache-<n>, mock-http, mock-http-<in flight>)" >&2; exit 2 ;;
    esac
done

if [ "${ENGINE:-1}" != 0 ]; then
    say "the engine (criterion)"
    cargo bench --locked --bench engine
fi
say "reports in $out"
