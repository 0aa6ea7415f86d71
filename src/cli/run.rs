//! `keyflight run`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Args;

use super::{runtime, CliError};
use crate::config::{ProcessingGuarantee, Settings};
use crate::kafka::transactions;
use crate::metrics::{server, Metrics};
use crate::processor::member;

pub const RUN_ABOUT: &str = "\
Join the consumer group `application_id` on the input topic and process it:
per key at most one push in flight, events arriving meanwhile merged into the
next push, pushes produced to the pushed topic with the headers
keyflight-version, keyflight-tn, keyflight-merged and keyflight-compensation.

Each assigned partition restores its marker store from the changelog before
it processes an event. Offsets are committed only once the events they cover
are pushed (at-least-once). With processing_guarantee = \"exactly-once\", each
partition's pushes, markers and offsets commit together in one Kafka
transaction per commit_interval (100ms), and a partition's new owner fences
its old one; it needs a broker with transactions. SIGINT or SIGTERM stops fetching, lets pushes in
flight finish (up to shutdown_timeout), commits, checkpoints and exits 0.

Start several instances with the same application_id to share the partitions.";

pub const RUN_EXAMPLES: &str = "\
Examples:
  keyflight run --brokers localhost:9092 --state-dir /var/lib/keyflight
  KEYFLIGHT_SINGLEFLIGHT__MERGE_POLICY=json-merge-patch keyflight --config prod.toml run";

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Directory of the local state stores [default: from the config, `state`]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Serve /metrics, /healthz and /readyz here: host:port (port 0 picks a
    /// free one, logged at start) or `off` [default: from the config, 127.0.0.1:9464]
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<String>,
}

pub fn run(settings: Settings) -> Result<(), CliError> {
    run_announcing(settings, |_| {})
}

/// [`run`], telling `announce` where metrics are served (`None`: off) once
/// the endpoint is bound and before the processor starts.
pub fn run_announcing(
    settings: Settings,
    announce: impl FnOnce(Option<SocketAddr>),
) -> Result<(), CliError> {
    // The effective configuration, once, for whoever reads the logs later;
    // secrets (SASL passwords, TLS keys) are redacted.
    let shown = serde_json::to_string(&settings.redacted()).unwrap_or_default();
    tracing::info!(config = %shown, version = env!("CARGO_PKG_VERSION"), "starting");
    if settings.processing_guarantee == ProcessingGuarantee::ExactlyOnce {
        match transactions::missing_transaction_apis(&settings) {
            Ok(None) => {}
            Ok(Some(missing)) => {
                return Err(CliError::Unsupported(format!(
                    "processing_guarantee = \"exactly-once\" needs a broker with transactions \
                     (KIP-98), and {missing}; use \"at-least-once\" with this broker"
                )))
            }
            // The clients will say more, and the first transaction fails the same.
            Err(e) => tracing::warn!("cannot ask the brokers for their transaction support: {e}"),
        }
    }
    let runtime = runtime()?;
    let metrics = Arc::new(Metrics::new());
    let mut served = None;
    if let Some(addr) = settings.metrics_socket() {
        let endpoint = runtime.block_on(server::bind(addr)).map_err(|e| {
            CliError::Runtime(format!(
                "cannot serve metrics on {addr} (metrics_addr): {e}; \
                 choose another address with --metrics-addr, or `off`"
            ))
        })?;
        tracing::info!(addr = %endpoint.addr, "serving /metrics, /healthz and /readyz");
        served = Some(endpoint.addr);
        runtime.spawn(endpoint.serve(metrics.clone()));
    }
    announce(served);
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let (stop, handle) = (stop.clone(), runtime.handle().clone());
        std::thread::Builder::new()
            .name("keyflight-poll".into())
            .spawn(move || member::run(settings, metrics, handle, stop))
            .map_err(|e| CliError::Runtime(format!("cannot start the consumer thread: {e}")))?
    };
    let result = runtime.block_on(async {
        let worker = tokio::task::spawn_blocking(move || worker.join());
        tokio::pin!(worker);
        tokio::select! {
            finished = &mut worker => return finished,
            _ = super::shutdown_signal() => {}
        }
        tracing::info!("signal received, stopping");
        stop.store(true, Ordering::Relaxed);
        worker.await
    });
    // Tasks still holding a client drop it here; bounded, as the member's
    // own teardown is.
    runtime.shutdown_timeout(std::time::Duration::from_secs(10));
    match result {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(member::RunError::Limits(e)))) => Err(CliError::Limits(e)),
        Ok(Ok(Err(member::RunError::Sink(e)))) => Err(CliError::Unsupported(e)),
        Ok(Ok(Err(e))) => Err(CliError::Runtime(e.to_string())),
        Ok(Err(_)) | Err(_) => Err(CliError::Runtime("the consumer thread panicked".into())),
    }
}
