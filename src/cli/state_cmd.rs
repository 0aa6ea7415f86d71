//! `keyflight state inspect` and `keyflight state rebuild`.

use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use clap::{Args, Subcommand};

use super::{progress_bar, CliError};
use crate::config::Settings;
use crate::processor::restore;
use crate::state::{Marker, Store};

#[derive(Debug, Args)]
pub struct StateArgs {
    #[command(subcommand)]
    pub command: StateCommand,
}

#[derive(Debug, Subcommand)]
pub enum StateCommand {
    /// Show the markers of the local stores: t1, t2, version, open or not
    #[command(long_about = INSPECT_ABOUT, after_help = INSPECT_EXAMPLES)]
    Inspect(InspectArgs),
    /// Wipe local stores and restore them from the changelog
    #[command(long_about = REBUILD_ABOUT, after_help = REBUILD_EXAMPLES)]
    Rebuild(RebuildArgs),
}

const INSPECT_ABOUT: &str = "\
Show the markers in the local stores under the state dir, per partition:
key, t1 and t2 (push start and acknowledgement, nanoseconds since the epoch),
version, whether the marker is open (t1 > t2: a push started and not known
to have finished, which the compensation scan re-pushes), and the size of
the stored value; then the counts per partition.

Reads without changing anything. While a processor runs it shows the store
as last flushed (at the latest commit), since writes skip RocksDB's WAL.";

const INSPECT_EXAMPLES: &str = "\
Examples:
  keyflight --config prod.toml state inspect --state-dir /var/lib/keyflight
  keyflight state inspect --state-dir ./state --open          # only open markers
  keyflight state inspect --state-dir ./state --key user-42";

const REBUILD_ABOUT: &str = "\
Wipe the local stores and restore them from the changelog topic, the way a
processor does at start when a store has no clean checkpoint. Rebuilds the
stores under the state dir (or every partition of the input topic when there
are none, or the partitions named with --partition).

The application must be stopped: rebuild refuses while its consumer group has
active members.";

const REBUILD_EXAMPLES: &str = "\
Examples:
  keyflight --config prod.toml state rebuild --state-dir /var/lib/keyflight
  keyflight state rebuild --state-dir ./state --partition 0 --partition 3";

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Directory of the local state stores [default: from the config]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Only open markers
    #[arg(long)]
    pub open: bool,

    /// Only this key
    #[arg(long, value_name = "KEY")]
    pub key: Option<String>,

    /// Only these partitions (repeatable)
    #[arg(long, value_name = "P")]
    pub partition: Vec<i32>,

    /// List at most N markers per partition (0: all); counts cover all
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub limit: usize,
}

#[derive(Debug, Args)]
pub struct RebuildArgs {
    /// Directory of the local state stores [default: from the config]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Only these partitions (repeatable)
    #[arg(long, value_name = "P")]
    pub partition: Vec<i32>,

    /// Skip the check for active group members when the broker cannot
    /// describe the group (a running process on this state dir still refuses)
    #[arg(long)]
    pub force: bool,
}

impl StateCommand {
    pub fn state_dir(&self) -> Option<PathBuf> {
        match self {
            StateCommand::Inspect(args) => args.state_dir.clone(),
            StateCommand::Rebuild(args) => args.state_dir.clone(),
        }
    }
}

pub fn run(settings: &Settings, args: StateArgs) -> Result<(), CliError> {
    match args.command {
        StateCommand::Inspect(args) => inspect(settings, &args),
        StateCommand::Rebuild(args) => rebuild(settings, &args),
    }
}

fn stores(settings: &Settings, only: &[i32]) -> Vec<(i32, PathBuf)> {
    Store::existing(
        &settings.state_dir,
        &settings.application_id,
        &settings.topics.input,
    )
    .into_iter()
    .filter(|(p, _)| only.is_empty() || only.contains(p))
    .collect()
}

fn inspect(settings: &Settings, args: &InspectArgs) -> Result<(), CliError> {
    let stores = stores(settings, &args.partition);
    if stores.is_empty() {
        return Err(CliError::Failed(format!(
            "no state store of `{}` for topic `{}` under {}",
            settings.application_id,
            settings.topics.input,
            settings.state_dir.display()
        )));
    }
    let state = |e: crate::state::StateError| CliError::Runtime(e.to_string());
    let mut totals = (0, 0);
    let mut summaries = Vec::new();
    for (partition, dir) in stores {
        let (store, checkpoint) = Store::open_read_only(&dir).map_err(state)?;
        let markers: Vec<(bytes::Bytes, Marker)> = match &args.key {
            Some(key) => store
                .get(key.as_bytes())
                .map_err(state)?
                .map(|m| (bytes::Bytes::from(key.clone().into_bytes()), m))
                .into_iter()
                .collect(),
            None => store.markers().map_err(state)?,
        };
        let open = markers.iter().filter(|(_, m)| m.is_open()).count();
        let shown = markers.iter().filter(|(_, m)| !args.open || m.is_open());
        let limit = if args.limit == 0 {
            usize::MAX
        } else {
            args.limit
        };
        for (key, marker) in shown.clone().take(limit) {
            println!(
                "partition={partition} key={:?} t1={} ({}) t2={} ({}) version={} open={} value_bytes={}",
                String::from_utf8_lossy(key),
                marker.t1,
                time(marker.t1),
                marker.t2,
                time(marker.t2),
                marker.version,
                marker.is_open(),
                marker.value.as_ref().map_or("null (delete)".to_string(), |v| v.len().to_string())
            );
        }
        let hidden = shown.count().saturating_sub(limit);
        if hidden > 0 {
            println!("partition={partition} ... {hidden} more (--limit 0 lists all)");
        }
        let clean = match checkpoint {
            Some(offset) => format!("clean checkpoint at changelog offset {offset}"),
            None => "no clean checkpoint: the next start restores it from the changelog".into(),
        };
        summaries.push(format!(
            "partition {partition}: {} markers, {open} open; {clean}",
            markers.len()
        ));
        totals.0 += markers.len();
        totals.1 += open;
    }
    for line in summaries {
        println!("{line}");
    }
    println!("total: {} markers, {} open", totals.0, totals.1);
    Ok(())
}

fn time(ns: u64) -> String {
    if ns == 0 {
        return "-".into();
    }
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_nanos(ns)).to_string()
}

fn rebuild(settings: &Settings, args: &RebuildArgs) -> Result<(), CliError> {
    super::ensure_stopped(settings, args.force, "rebuilding its state")?;
    let mut partitions: Vec<i32> = stores(settings, &args.partition)
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    if partitions.is_empty() {
        partitions = if args.partition.is_empty() {
            let consumer = crate::kafka::reader::consumer(settings, "rebuild")
                .map_err(|e| CliError::Runtime(format!("cannot create the Kafka consumer: {e}")))?;
            let count = crate::kafka::reader::partitions(&consumer, &settings.topics.input)
                .map_err(|e| CliError::Runtime(e.to_string()))?;
            (0..count).collect()
        } else {
            args.partition.clone()
        };
    }
    let changelog = settings.changelog_topic();
    let state = |e: crate::state::StateError| CliError::Runtime(e.to_string());
    for partition in partitions {
        let dir = Store::dir(
            &settings.state_dir,
            &settings.application_id,
            &settings.topics.input,
            partition,
        );
        // Opening first fails clearly if a processor still holds the store.
        drop(Store::open(&dir).map_err(state)?);
        Store::wipe(&dir).map_err(state)?;
        let (store, opened) = Store::open(&dir).map_err(state)?;
        let bar = progress_bar(0, &format!("{changelog}[{partition}]"));
        let restored = restore::restore(
            settings,
            &changelog,
            partition,
            &store,
            opened,
            None,
            &std::sync::Arc::new(crate::metrics::Metrics::new()).partition(partition),
            &std::sync::atomic::AtomicBool::new(false),
            &mut |read, total| {
                bar.set_length(total);
                bar.set_position(read);
            },
        )
        .map_err(|e| CliError::Runtime(e.to_string()))?;
        bar.finish_and_clear();
        store
            .checkpoint(restored.next_offset, restored.claim)
            .map_err(state)?;
        let markers = store.markers().map_err(state)?;
        let open = markers.iter().filter(|(_, m)| m.is_open()).count();
        println!(
            "partition {partition}: restored {} changelog records: {} markers, {open} open (checkpoint at {})",
            restored.records,
            markers.len(),
            restored.next_offset
        );
        if restored.unreadable > 0 {
            println!(
                "partition {partition}: skipped {} unreadable changelog records (logged with their offsets); their keys have no state",
                restored.unreadable
            );
        }
    }
    Ok(())
}
