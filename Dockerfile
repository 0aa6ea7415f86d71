# keyflight container image.
#
#   docker build -t keyflight .
#   docker run --rm keyflight --help
#   docker run -v keyflight-state:/var/lib/keyflight -p 9464:9464 \
#     -e KEYFLIGHT_BROKERS=kafka:9092 -e KEYFLIGHT_STATE_DIR=/var/lib/keyflight \
#     -e KEYFLIGHT_METRICS_ADDR=0.0.0.0:9464 keyflight run
#
# The image sets no KEYFLIGHT_* variable: environment variables outrank a
# --config file, so defaults baked in here would silently override a mounted
# production.toml. Give the settings as variables (docker-compose.yml does)
# or in a file (`--config /etc/keyflight/production.toml`, see config/).
# Inside a container the metrics must listen on 0.0.0.0 (metrics_addr's
# default is loopback), and the state dir belongs on the volume.

# --- build ------------------------------------------------------------------
# At least Cargo.toml's rust-version (which the locked dependencies set:
# uuid 1.29 wants 1.89); tests/deploy/ checks this tag against both.
FROM rust:1.93-bookworm AS builder

# RocksDB: a C++ compiler and libclang (bindgen, loaded at build time);
# librdkafka: make, pkg-config, OpenSSL and zlib headers. No cmake: rdkafka
# builds with librdkafka's own configure script.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        build-essential clang libclang-dev pkg-config libssl-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /build

# Dependencies first, against stub sources: RocksDB and librdkafka take most
# of the build (about 20 minutes on 2 cores) and this layer survives any
# change that leaves Cargo.toml and Cargo.lock alone.
COPY Cargo.toml Cargo.lock ./
COPY bench/Cargo.toml bench/
RUN mkdir -p src benches bench/src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && echo 'fn main() {}' > benches/engine.rs \
 && echo 'fn main() {}' > bench/src/main.rs \
 && cargo build --release --locked -p keyflight \
 && rm -rf src benches bench/src

COPY src src
COPY schemas schemas
COPY benches benches
# The benchmark driver is a workspace member: cargo loads its manifest.
COPY bench bench
# touch: the stubs' build is newer than the copied files' timestamps.
RUN touch src/lib.rs src/main.rs \
 && cargo build --release --locked -p keyflight \
 && install -m 0755 target/release/keyflight /usr/local/bin/keyflight

# --- runtime ----------------------------------------------------------------
# Same Debian release as the builder: the binary links its glibc, libstdc++,
# OpenSSL 3 and zlib dynamically (RocksDB, librdkafka and lz4 are static).
FROM debian:bookworm-slim

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates libssl3 libstdc++6 zlib1g \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 keyflight \
 && useradd --system --uid 10001 --gid keyflight --no-create-home \
        --home-dir /var/lib/keyflight --shell /usr/sbin/nologin keyflight \
 && mkdir -p /var/lib/keyflight \
 && chown keyflight:keyflight /var/lib/keyflight

COPY --from=builder /usr/local/bin/keyflight /usr/local/bin/keyflight

# Numeric, so Kubernetes' runAsNonRoot can check it.
USER 10001:10001
# The RocksDB stores (state_dir). A new named volume is initialised from this
# directory and so owned by the keyflight user; the relative default state_dir
# ("state") lands here too.
WORKDIR /var/lib/keyflight
VOLUME ["/var/lib/keyflight"]

# /metrics, /healthz, /readyz (metrics_addr; set KEYFLIGHT_METRICS_ADDR=0.0.0.0:9464).
EXPOSE 9464

# SIGTERM (docker stop) is a graceful shutdown: pushes in flight finish, up to
# shutdown_timeout (30 s by default); give the container longer than that.
ENTRYPOINT ["keyflight"]
CMD ["run"]
