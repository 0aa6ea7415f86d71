//! `keyflight topics create`.

use std::time::Duration;

use clap::{Args, Subcommand};

use super::{runtime, CliError};
use crate::config::Settings;
use crate::kafka::admin;

#[derive(Debug, Args)]
pub struct TopicsArgs {
    #[command(subcommand)]
    command: TopicsCommand,
}

#[derive(Debug, Subcommand)]
enum TopicsCommand {
    /// Create the input, pushed, dead-letter and changelog topics
    #[command(long_about = CREATE_ABOUT, after_help = CREATE_EXAMPLES)]
    Create(CreateArgs),
}

const CREATE_ABOUT: &str = "\
Create the topics keyflight uses, through the Kafka admin API:

  topics.input        (events.in)      change events, keyed
  topics.pushed       (events.pushed)  one record per push
  topics.dead_letter  (events.dlq)     records that could not be processed
  topics.changelog    (<application_id>-markers-changelog)
                      durable markers, cleanup.policy=compact, exactly one
                      partition per input partition

Idempotent: topics that already exist with a compatible layout are kept. A
layout keyflight cannot work with (the changelog's partition count differs
from the input's, the changelog is not compacted, --partitions disagrees
with an existing input topic) is reported and nothing is created.";

const CREATE_EXAMPLES: &str = "\
Examples:
  keyflight topics create --brokers localhost:9092
  keyflight topics create --brokers kafka-1:9092,kafka-2:9092 --partitions 12 --replication 3
  keyflight --config prod.toml topics create   # names and security from the file";

#[derive(Debug, Args)]
struct CreateArgs {
    /// Partitions of every topic; default: the existing input topic's count, or 3
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..=100_000))]
    partitions: Option<i32>,

    /// Replication factor of the created topics
    #[arg(long, value_name = "R", default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..=32))]
    replication: i32,

    /// How long to wait for the cluster to answer
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

pub fn run(settings: &Settings, args: TopicsArgs) -> Result<(), CliError> {
    match args.command {
        TopicsCommand::Create(create) => {
            let report = runtime()?.block_on(admin::create_topics(
                settings,
                create.partitions,
                create.replication,
                create.timeout,
            ))?;
            print!("{report}");
            Ok(())
        }
    }
}
