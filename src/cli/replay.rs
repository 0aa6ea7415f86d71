//! `keyflight replay`.

use std::path::PathBuf;

use clap::{ArgGroup, Args};

use super::{progress_bar, CliError};
use crate::config::Settings;
use crate::kafka::replay::{self, Move, Target};
use crate::state::Store;

pub const REPLAY_ABOUT: &str = "\
Move the committed offsets of the application's consumer group on the input
topic, so the next `keyflight run` processes the input again from there.

Nothing changes without --execute: by default the plan is printed (per
partition: current offset -> new offset). Every keyflight instance of the
application must be stopped first: replay refuses while the group has active
members or a process holds a store under the state dir.

Without --reset-state the markers stay, so replayed events the markers show
as already pushed are dropped as stale: a replay re-pushes nothing that
landed and catches up on anything that did not. With --reset-state the
markers are forgotten (a tombstone per key in the changelog, and the local
stores under the state dir wiped), so the replay pushes every key again from
its events, as a first run would. Open markers are forgotten too: replay from
a point at or before the events behind them.";

pub const REPLAY_EXAMPLES: &str = "\
Examples:
  keyflight --config prod.toml replay --to-earliest                 # show the plan
  keyflight --config prod.toml replay --to-earliest --execute
  keyflight --config prod.toml replay --to-datetime 2026-11-27T08:00:00Z --execute
  keyflight --config prod.toml replay --to-offset 0:1200 --to-offset 3:0 --execute
  keyflight --config prod.toml replay --to-earliest --reset-state --state-dir /var/lib/keyflight --execute";

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("target").required(true).args(["to_earliest", "to_latest", "to_datetime", "to_offset"])))]
pub struct ReplayArgs {
    /// Every partition to its first retained record
    #[arg(long)]
    pub to_earliest: bool,

    /// Every partition to its end: skip everything not yet processed
    #[arg(long)]
    pub to_latest: bool,

    /// Every partition to its first record at or after TIME: RFC 3339
    /// (2026-11-27T08:00:00Z) or an age (30m, 2h)
    #[arg(long, value_name = "TIME", value_parser = super::parse_time)]
    pub to_datetime: Option<i64>,

    /// One partition to an offset; repeat for more partitions (the others keep theirs)
    #[arg(long, value_name = "PARTITION:OFFSET", value_parser = parse_partition_offset)]
    pub to_offset: Vec<(i32, i64)>,

    /// Also forget every marker: tombstones to the changelog and the local
    /// stores under the state dir wiped, so every key is pushed again
    #[arg(long)]
    pub reset_state: bool,

    /// The state dir whose local stores --reset-state wipes [default: from the config]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Apply the plan (without it, replay only prints what it would do)
    #[arg(long)]
    pub execute: bool,

    /// Skip the check for active group members when the broker cannot
    /// describe the group (a running process on this state dir still refuses)
    #[arg(long)]
    pub force: bool,
}

fn parse_partition_offset(text: &str) -> Result<(i32, i64), String> {
    let (partition, offset) = text
        .split_once(':')
        .ok_or_else(|| format!("`{text}` is not PARTITION:OFFSET (for example 0:1200)"))?;
    let partition = partition
        .trim()
        .parse::<i32>()
        .ok()
        .filter(|p| *p >= 0)
        .ok_or_else(|| format!("partition `{partition}` is not a partition number"))?;
    let offset = offset
        .trim()
        .parse::<i64>()
        .ok()
        .filter(|o| *o >= 0)
        .ok_or_else(|| format!("offset `{offset}` is not a non-negative offset"))?;
    Ok((partition, offset))
}

pub fn run(settings: &Settings, args: ReplayArgs) -> Result<(), CliError> {
    let runtime_error = |e: replay::ReplayError| CliError::Runtime(e.to_string());
    let target = if args.to_earliest {
        Target::Earliest
    } else if args.to_latest {
        Target::Latest
    } else if let Some(ms) = args.to_datetime {
        Target::Time(ms)
    } else {
        Target::Offsets(args.to_offset.clone())
    };
    super::ensure_stopped(settings, args.force, "a replay")?;
    let moves = replay::plan(settings, &target).map_err(runtime_error)?;
    print_plan(settings, &moves);
    let stores = Store::existing(
        &settings.state_dir,
        &settings.application_id,
        &settings.topics.input,
    );
    if args.reset_state {
        println!(
            "reset state: forget every marker in {} and wipe {} local store(s) under {}",
            settings.changelog_topic(),
            stores.len(),
            settings.state_dir.display()
        );
    }
    if !args.execute {
        println!("dry run: nothing changed; add --execute to apply");
        return Ok(());
    }
    if args.reset_state {
        let bar = progress_bar(0, "reading the changelog");
        let forgotten = replay::forget_markers(settings, |read, total| {
            bar.set_length(total);
            bar.set_position(read);
        })
        .map_err(runtime_error)?;
        bar.finish_and_clear();
        for (_, dir) in &stores {
            Store::wipe(dir).map_err(|e| CliError::Runtime(e.to_string()))?;
        }
        println!(
            "forgot {forgotten} marker(s) and wiped {} local store(s)",
            stores.len()
        );
    }
    replay::execute(settings, &moves).map_err(runtime_error)?;
    println!(
        "committed {} offset(s) for group `{}`; the next `keyflight run` starts there",
        moves.len(),
        settings.application_id
    );
    Ok(())
}

fn print_plan(settings: &Settings, moves: &[Move]) {
    println!(
        "group `{}`, topic `{}`:",
        settings.application_id, settings.topics.input
    );
    for m in moves {
        let current = m.current.map_or("(none)".to_string(), |o| o.to_string());
        println!("  partition {:>3}: {current:>12} -> {}", m.partition, m.new);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_offsets_parse_or_explain() {
        assert_eq!(parse_partition_offset("3:1200"), Ok((3, 1200)));
        assert!(parse_partition_offset("3")
            .unwrap_err()
            .contains("PARTITION:OFFSET"));
        assert!(parse_partition_offset("x:1")
            .unwrap_err()
            .contains("partition"));
        assert!(parse_partition_offset("1:-5")
            .unwrap_err()
            .contains("offset"));
    }
}
