//! `keyflight load`: a load generator for any broker.

use clap::Args;

use super::{progress_bar, CliError};
use crate::codec::InputFormat;
use crate::config::Settings;
use crate::kafka::load::{self, LoadProducer};
use crate::loadgen::{self, Generator, LoadSpec};

pub const LOAD_ABOUT: &str = "\
Produce keyed JSON (or Avro) events to the input topic of any broker: N
events over K keys, key popularity Zipf or uniform, optional bursts of one
key back to back, as fast as possible or at a fixed rate. Every key's
`version` counts 1, 2, 3, ... in production order, so `keyflight verify`
can check the result exactly.

--scenarios first plays the article's cases on dedicated keys case-0..:
a push in flight, a burst behind it (Case 1), a late event and more behind
it (Case 2), and an old straggler that must be dropped as stale.

Ends with a summary: events sent, keys, seconds, events/s.";

pub const LOAD_EXAMPLES: &str = "\
Examples:
  keyflight load --brokers localhost:9092 --events 100000 --keys 10000 --zipf 1.0
  keyflight load --events 1000000 --keys 100000 --zipf 1.0 --burst 5 --rate 20000
  keyflight load --scenarios --events 0       # only the article's cases";

#[derive(Debug, Args)]
pub struct LoadArgs {
    /// Events to produce (besides --scenarios)
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub events: u64,

    /// Distinct keys (key-000000, key-000001, ...)
    #[arg(long, value_name = "K", default_value_t = 1_000)]
    pub keys: u64,

    /// Zipf exponent of key popularity (1.0: a few keys get most events);
    /// without it keys are uniform
    #[arg(long, value_name = "S")]
    pub zipf: Option<f64>,

    /// Events per key back to back: bursts that singleflight merges
    #[arg(long, value_name = "B", default_value_t = 1)]
    pub burst: u32,

    /// Events per second [default: as fast as possible]
    #[arg(long, value_name = "R", value_parser = positive_rate)]
    pub rate: Option<f64>,

    /// Value format [default: input.format from the config]
    #[arg(long, value_name = "FORMAT", value_parser = parse_format)]
    pub format: Option<InputFormat>,

    /// Also play the article's scenarios first (keys case-0 .. case-9)
    #[arg(long)]
    pub scenarios: bool,

    /// Seed of the key choice (the same seed gives the same stream)
    #[arg(long, value_name = "SEED", default_value_t = 1)]
    pub seed: u64,

    /// The topic to produce to [default: topics.input]
    #[arg(long, value_name = "TOPIC")]
    pub topic: Option<String>,
}

fn positive_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate > 0.0 && rate.is_finite() => Ok(rate),
        _ => Err(format!(
            "`{text}` is not a positive number of events per second"
        )),
    }
}

fn parse_format(text: &str) -> Result<InputFormat, String> {
    match text {
        "json" => Ok(InputFormat::Json),
        "avro" => Ok(InputFormat::Avro),
        other => Err(format!("`{other}` is not a load format; use json or avro")),
    }
}

/// Keys and pause of the scenarios `load --scenarios` and `demo` play.
pub const SCENARIO_KEYS: usize = 10;
pub const SCENARIO_PAUSE_MS: u64 = 300;

pub fn run(settings: &Settings, args: LoadArgs) -> Result<(), CliError> {
    let format = args.format.unwrap_or(settings.input.format);
    if format == InputFormat::Raw {
        return Err(CliError::Failed(
            "load produces json or avro; pass --format json or --format avro".into(),
        ));
    }
    let topic = args
        .topic
        .clone()
        .unwrap_or_else(|| settings.topics.input.clone());
    let generator = Generator::new(LoadSpec {
        events: args.events,
        keys: args.keys,
        zipf: args.zipf,
        burst: args.burst,
        seed: args.seed,
    })
    .map_err(|e| CliError::Failed(e.to_string()))?;
    let runtime = |e: load::LoadError| CliError::Runtime(e.to_string());
    let mut producer = LoadProducer::new(settings, &topic, format).map_err(runtime)?;
    if args.scenarios {
        let steps = loadgen::scenarios(SCENARIO_KEYS, SCENARIO_PAUSE_MS);
        let played = load::scenarios(&mut producer, &steps).map_err(runtime)?;
        println!(
            "scenarios: {played} events on keys case-0..case-{}",
            SCENARIO_KEYS - 1
        );
    }
    let bar = progress_bar(args.events, &topic);
    let stop = super::stop_flag();
    let summary = load::run(&mut producer, generator, args.rate, &stop, |n| {
        bar.set_position(n)
    })
    .map_err(runtime)?;
    bar.finish_and_clear();
    println!(
        "load: {} events over {} keys to {topic} in {:.2}s, {:.0} events/s",
        summary.events,
        summary.keys,
        summary.seconds,
        summary.rate()
    );
    Ok(())
}
