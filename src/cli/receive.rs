//! `keyflight receive`: a webhook receiver to point the HTTP sink at (the
//! server itself is [`crate::receive`]).

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::CliError;
use crate::receive::{self, Faults, ReceiveOptions, Receiver, TlsFiles};

pub const RECEIVE_ABOUT: &str = "\
A small webhook receiver to point keyflight's HTTP sink at, to see its
retries, timeouts and compensation at work.

It answers every request (any method, any path) and reads keyflight's push
headers (Keyflight-Key, -Version, -Tn, -Merged, -Compensation,
Idempotency-Key). Without --log it prints one line per call; with --log FILE
it appends one JSON object per call instead (what a test reads back). Two
calls for the same key open at once are flagged on stderr as an overlap: the
sink promises at most one push per key in flight.

It can misbehave on purpose: --fail-rate answers 503 (the sink retries),
--throttle-rate answers 429 with Retry-After (the sink waits, then retries),
--refuse-key answers 422 for a key (the sink gives up on it for good),
--delay and --jitter answer slowly (a delay beyond the sink's timeout makes
it time out and retry; such a call is logged with status 499). Faults are
drawn from a seeded generator: --seed replays them.

GET /_receive/stats answers the counts so far as JSON (not counted as a
call). The first line on stdout is `listening on http://ADDR`; Ctrl-C or
SIGTERM stops it after the calls in progress, printing a summary.";

pub const RECEIVE_EXAMPLES: &str = "\
Examples:
  # Print every push the sink sends to http://127.0.0.1:8080/...
  keyflight receive

  # A flaky, slow receiver: 20% 503s, 5% 429s, 50-150ms per call, a log to read
  keyflight receive --listen 127.0.0.1:9000 --fail-rate 0.2 --throttle-rate 0.05 \\
      --retry-after 2 --delay 50ms --jitter 100ms --seed 42 --log calls.jsonl

  # One key refused for good (422), every other call answered 200
  keyflight receive --refuse-key user-13

  # HTTPS with your own certificate (point the sink at https://localhost:8443)
  keyflight receive --listen 127.0.0.1:8443 --tls-cert server.pem --tls-key server-key.pem

  # Counts so far
  curl -s http://127.0.0.1:8080/_receive/stats";

#[derive(Debug, Args)]
pub struct ReceiveArgs {
    /// Address to listen on; port 0 picks a free port (the first stdout line
    /// says which)
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    pub listen: String,

    /// Append one JSON object per call to FILE (created if missing) instead
    /// of printing a line per call
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,

    /// Answer this fraction of calls 503 `injected failure`, e.g. 0.2
    #[arg(long, value_name = "F", default_value_t = 0.0, value_parser = parse_rate)]
    pub fail_rate: f64,

    /// Answer this fraction of calls 429 with Retry-After (wins over
    /// --fail-rate when both hit)
    #[arg(long, value_name = "F", default_value_t = 0.0, value_parser = parse_rate)]
    pub throttle_rate: f64,

    /// The Retry-After of a throttled call, in seconds
    #[arg(long, value_name = "SECONDS", default_value_t = 1)]
    pub retry_after: u64,

    /// Answer every call for KEY 422 (a refusal the sink must not retry);
    /// repeatable; wins over throttling and failure
    #[arg(long = "refuse-key", value_name = "KEY")]
    pub refuse_keys: Vec<String>,

    /// Wait this long before answering every call, failures too (e.g. 20ms)
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub delay: Option<Duration>,

    /// Wait a further uniform random 0..DURATION per call
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub jitter: Option<Duration>,

    /// Seed of the faults and jitter, to replay a run [default: from the clock]
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,

    /// Serve HTTPS with this PEM certificate chain (needs --tls-key)
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The PEM private key of --tls-cert
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

fn parse_rate(text: &str) -> Result<f64, String> {
    let rate: f64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number"))?;
    if (0.0..=1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(format!("{rate} is not between 0 and 1"))
    }
}

pub fn run(args: ReceiveArgs) -> Result<(), CliError> {
    let random = args.fail_rate > 0.0 || args.throttle_rate > 0.0 || args.jitter.is_some();
    let seed = args.seed.unwrap_or_else(|| {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        if random {
            eprintln!("seed {seed} (--seed {seed} replays these faults)");
        }
        seed
    });
    let options = ReceiveOptions {
        faults: Faults {
            fail_rate: args.fail_rate,
            throttle_rate: args.throttle_rate,
            retry_after: args.retry_after,
            refuse_keys: args.refuse_keys.into_iter().collect(),
        },
        delay: args.delay.unwrap_or_default(),
        jitter: args.jitter.unwrap_or_default(),
        seed,
        log: args.log,
    };
    // clap's `requires` makes these both or neither.
    let tls = match (args.tls_cert, args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
        _ => None,
    };
    let receiver = Receiver::new(options).map_err(CliError::Runtime)?;
    let runtime = super::runtime()?;
    let stats = runtime.block_on(async {
        let bound = receive::bind(&args.listen, tls.as_ref()).await?;
        // The first stdout line, flushed: a test reads the port from it.
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "listening on {}", bound.url());
        let _ = stdout.flush();
        drop(stdout);
        bound.serve(receiver, super::shutdown_signal()).await
    });
    let stats = stats.map_err(CliError::Runtime)?;
    let _ = writeln!(std::io::stdout().lock(), "{}", stats.summary());
    Ok(())
}
