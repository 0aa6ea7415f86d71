//! `keyflight tail`: print a topic's records, one readable line each.

use std::time::{Duration, Instant};

use clap::Args;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::{Message, Offset, TopicPartitionList};

use super::CliError;
use crate::codec::Codec;
use crate::config::Settings;
use crate::kafka::reader;

pub const TAIL_ABOUT: &str = "\
Print the records of a topic as they arrive, one line each: partition and
offset, key, value, and keyflight's headers (version, tn, merged,
compensation on pushes; the error reason and source on dead letters).

Values print as text when they are UTF-8 (JSON as is); Avro events
(input.format = \"avro\") print decoded as JSON; anything else prints as
escaped bytes. Reads without joining the consumer group and commits nothing.";

pub const TAIL_EXAMPLES: &str = "\
Examples:
  keyflight tail                              # new pushes, until Ctrl-C
  keyflight tail --from-beginning --count 20  # the first 20 pushes, then exit
  keyflight tail --topic events.dlq --from-beginning";

#[derive(Debug, Args)]
pub struct TailArgs {
    /// The topic to print [default: the pushes' topic: topics.pushed,
    /// `events.pushed`, or sink.http.audit_topic under the HTTP sink]
    #[arg(long, value_name = "TOPIC")]
    pub topic: Option<String>,

    /// Start at the first retained record instead of the end
    #[arg(long)]
    pub from_beginning: bool,

    /// Exit after printing N records
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,

    /// Exit once no record arrived for this long (e.g. 5s) [default: never]
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub idle_exit: Option<Duration>,
}

pub fn run(settings: &Settings, args: TailArgs) -> Result<(), CliError> {
    let topic = args
        .topic
        .clone()
        .or_else(|| settings.pushes_topic().map(str::to_string))
        .ok_or_else(|| {
            CliError::Failed(
                "sink.kind = \"http\" without sink.http.audit_topic writes pushes to no topic; name one with --topic".into(),
            )
        })?;
    let consumer = reader::consumer(settings, "tail")
        .map_err(|e| CliError::Runtime(format!("cannot create the Kafka consumer: {e}")))?;
    let partitions =
        reader::partitions(&consumer, &topic).map_err(|e| CliError::Runtime(e.to_string()))?;
    let mut assignment = TopicPartitionList::new();
    let start = if args.from_beginning {
        Offset::Beginning
    } else {
        Offset::End
    };
    for partition in 0..partitions {
        assignment
            .add_partition_offset(&topic, partition, start)
            .map_err(|e| CliError::Runtime(e.to_string()))?;
    }
    consumer
        .assign(&assignment)
        .map_err(|e| CliError::Runtime(format!("cannot read {topic}: {e}")))?;
    // Avro shows decoded: the merge-patch reading yields the attributes.
    let codec = Codec::new(
        settings.input.format,
        crate::engine::MergePolicy::JsonMergePatch,
        settings.input.version_field.clone(),
    );
    let stop = super::stop_flag();
    let mut printed = 0;
    let mut last_record = Instant::now();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        if args.count.is_some_and(|n| printed >= n) {
            break;
        }
        if args
            .idle_exit
            .is_some_and(|idle| last_record.elapsed() >= idle)
        {
            break;
        }
        match poll(&consumer) {
            Some(Ok(message)) => {
                println!("{}", line(&message, &codec));
                printed += 1;
                last_record = Instant::now();
            }
            Some(Err(e)) => return Err(CliError::Runtime(format!("reading {topic}: {e}"))),
            None => {}
        }
    }
    Ok(())
}

fn poll(consumer: &BaseConsumer) -> Option<rdkafka::error::KafkaResult<BorrowedMessage<'_>>> {
    consumer.poll(Duration::from_millis(200))
}

/// One record as a line: `P/OFFSET key=... value=... header=value ...`.
pub fn line(message: &BorrowedMessage<'_>, codec: &Codec) -> String {
    let mut out = format!(
        "{}/{} key={} value={}",
        message.partition(),
        message.offset(),
        message.key().map_or("null".to_string(), show),
        match message.payload() {
            None => "null (delete)".to_string(),
            Some(value) => value_text(value, codec),
        }
    );
    if let Some(headers) = message.headers() {
        for header in headers.iter() {
            let name = header.key.strip_prefix("keyflight-").unwrap_or(header.key);
            let value = header.value.map_or("null".to_string(), show);
            out.push_str(&format!(" {name}={value}"));
        }
    }
    out
}

fn value_text(value: &[u8], codec: &Codec) -> String {
    if let Ok(text) = std::str::from_utf8(value) {
        return text.to_string();
    }
    match codec.decode(Some(value)) {
        Ok(decoded) => match decoded.payload {
            crate::engine::Payload::Value(crate::engine::Value::Json(fields)) => {
                serde_json::json!({ "version": decoded.version, "fields": fields }).to_string()
            }
            _ => show(value),
        },
        Err(_) => show(value),
    }
}

/// Bytes as text when they are UTF-8, else escaped.
fn show(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_string(),
        Err(_) => bytes.escape_ascii().to_string(),
    }
}
