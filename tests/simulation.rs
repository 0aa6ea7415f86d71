//! The engine proven against the article: scripted Case 1 and Case 2, and
//! hundreds of thousands of random schedules checked by an independent oracle.
//!
//! `SIM_SCHEDULES=1000000 cargo test --test integration simulation::` runs the long mode;
//! `SIM_SEED=N` replays one failing seed.

use std::collections::BTreeMap;

use crate::sim::{run, ArticleModel, ByVersion, Engine, Input, Outcome, System};
use keyflight::engine::MergePolicy;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::json;

/// One key's events, named by letter, at the given times; versions 1, 2, ...
fn events(script: &[(char, u64)]) -> Vec<Input> {
    script
        .iter()
        .enumerate()
        .map(|(i, &(name, at))| Input {
            at,
            key: 0,
            version: Some(i as u64 + 1),
            value: Some(json!({ "event": name.to_string() })),
        })
        .collect()
}

fn final_event(out: &Outcome) -> String {
    let (_, value) = out.final_values().remove(&0).expect("key 0 was pushed");
    value.unwrap()["event"].as_str().unwrap().to_string()
}

fn pushed_events(out: &Outcome) -> Vec<String> {
    out.completed
        .iter()
        .map(|p| {
            p.value.as_ref().unwrap()["event"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

fn run_scripted(system: &mut dyn System, inputs: &[Input], latencies: &[(u64, u64)]) -> Outcome {
    let mut latency = ByVersion(latencies.iter().copied().collect::<BTreeMap<_, _>>(), 5);
    run(
        system,
        inputs,
        &[],
        &mut latency,
        &mut ChaCha8Rng::seed_from_u64(0),
        true,
    )
}

// Versions: A=1 B=2 C=3 D=4 E=5 F=6 G=7.
const A_TAKES_10: (u64, u64) = (1, 10);
const D_TAKES_50: (u64, u64) = (4, 50);

/// Case 1: B, C, D wait behind A and run merged as D; E arrives while D's
/// push is slow. The article lets E start its own push, which finishes
/// first: the final output is D'' (stale). keyflight holds E until D'' and
/// ends on E''.
#[test]
fn case_1_reference_model_ends_stale_on_d_and_engine_ends_on_e() {
    let inputs = events(&[('A', 0), ('B', 1), ('C', 2), ('D', 3), ('E', 20)]);
    let latencies = [A_TAKES_10, D_TAKES_50, (5, 5)];

    let model = run_scripted(
        &mut ArticleModel::new(MergePolicy::Latest),
        &inputs,
        &latencies,
    );
    assert_eq!(
        pushed_events(&model),
        ["A", "E", "D"],
        "E'' lands before D''"
    );
    assert_eq!(
        final_event(&model),
        "D",
        "the article's algorithm ends stale"
    );
    assert!(
        !model.violations.is_empty(),
        "two pushes of one key were in flight together"
    );

    let engine = run_scripted(&mut Engine::new(MergePolicy::Latest), &inputs, &latencies);
    assert_eq!(engine.violations, Vec::<String>::new());
    assert_eq!(pushed_events(&engine), ["A", "D", "E"]);
    assert_eq!(final_event(&engine), "E");
    assert_eq!(engine.final_position, Some(5), "every event covered");
}

/// Case 2: as Case 1, and F, G arrive during E's push and finish (merged as
/// G) before D'': the article ends on D'' instead of G''. keyflight ends on G''.
#[test]
fn case_2_reference_model_ends_stale_on_d_and_engine_ends_on_g() {
    let inputs = events(&[
        ('A', 0),
        ('B', 1),
        ('C', 2),
        ('D', 3),
        ('E', 20),
        ('F', 21),
        ('G', 22),
    ]);
    let latencies = [A_TAKES_10, D_TAKES_50, (5, 10), (7, 5)];

    let model = run_scripted(
        &mut ArticleModel::new(MergePolicy::Latest),
        &inputs,
        &latencies,
    );
    assert_eq!(pushed_events(&model), ["A", "E", "G", "D"]);
    assert_eq!(
        final_event(&model),
        "D",
        "the article's algorithm ends stale"
    );

    let engine = run_scripted(&mut Engine::new(MergePolicy::Latest), &inputs, &latencies);
    assert_eq!(engine.violations, Vec::<String>::new());
    assert_eq!(
        pushed_events(&engine),
        ["A", "D", "G"],
        "E, F, G merge into one push"
    );
    assert_eq!(final_event(&engine), "G");
    assert_eq!(engine.final_position, Some(7));
}

/// The ideal case from the article: B, C, D wait behind A and one push
/// carries D. Three pushes saved.
#[test]
fn ideal_case_collapses_the_burst_into_one_push() {
    let inputs = events(&[('A', 0), ('B', 1), ('C', 2), ('D', 3)]);
    let engine = run_scripted(
        &mut Engine::new(MergePolicy::Latest),
        &inputs,
        &[A_TAKES_10],
    );
    assert_eq!(pushed_events(&engine), ["A", "D"]);
    assert_eq!(engine.completed[1].version, 4);
}

/// A burst read in one poll batch (one instant) is one push: the push the
/// first event started is produced after the batch, carrying its newest
/// event. Later batches' events wait behind it as usual.
#[test]
fn a_burst_read_in_one_batch_is_one_push() {
    let inputs = events(&[('A', 0), ('B', 0), ('C', 0), ('D', 0), ('E', 1), ('F', 2)]);
    let engine = run_scripted(&mut Engine::batched(MergePolicy::Latest), &inputs, &[]);
    assert_eq!(pushed_events(&engine), ["D", "F"]);
    assert_eq!(engine.started, 2);
    assert_eq!(engine.final_position, Some(6));
    // Unbatched, the first push carries A, already stale when it lands,
    // and B, C, D wait a whole push for the next.
    let unbatched = run_scripted(&mut Engine::new(MergePolicy::Latest), &inputs, &[]);
    assert_eq!(pushed_events(&unbatched), ["A", "F"]);
}

/// Events that arrive in the turn of an acknowledgement join the next push
/// it starts: A's push is acknowledged as C and D arrive, and one push
/// carries B, C and D.
#[test]
fn events_arriving_with_an_acknowledgement_join_the_next_push() {
    let inputs = events(&[('A', 0), ('B', 5), ('C', 10), ('D', 10)]);
    let mut engine = Engine::batched(MergePolicy::Latest);
    assert!(
        engine.event(0, &inputs[0], 0).is_empty(),
        "produced at the turn's end"
    );
    let a = engine.end_of_turn(0);
    assert_eq!(a.len(), 1);
    assert!(engine.event(1, &inputs[1], 5).is_empty());
    assert!(engine.end_of_turn(5).is_empty(), "B waits behind A");
    // The turn of A's acknowledgement takes in C and D, already read.
    assert!(engine.done(&a[0], true, 10).is_empty());
    assert!(engine.event(2, &inputs[2], 10).is_empty());
    assert!(engine.event(3, &inputs[3], 10).is_empty());
    let next = engine.end_of_turn(10);
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].version, 4, "one push of D covers B, C and D");
    assert!(engine.done(&next[0], true, 20).is_empty());
    assert!(engine.end_of_turn(20).is_empty());
    assert_eq!(engine.table.commit_position(), Some(4));
}

/// With merge patches, collapsing loses no field: the merged push of B, C, D
/// carries all their fields.
#[test]
fn merge_patch_collapse_keeps_every_field() {
    let inputs: Vec<Input> = [
        json!({"a": 1}),
        json!({"b": 2}),
        json!({"c": 3}),
        json!({"a": null, "d": 4}),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, patch)| Input {
        at: i as u64,
        key: 0,
        version: None,
        value: Some(patch),
    })
    .collect();
    let engine = run_scripted(
        &mut Engine::new(MergePolicy::JsonMergePatch),
        &inputs,
        &[(0, 10)],
    );
    assert_eq!(engine.completed.len(), 2);
    assert_eq!(
        engine.completed[1].value,
        Some(json!({"b": 2, "c": 3, "d": 4}))
    );
}

/// Never two pushes in flight for a key; the last push of every key carries
/// its latest event (folded by the policy); the commit position never passes
/// an uncovered event and ends past the last one; pushes ≤ events. Random
/// schedules with failures, stale events, deletes and compensation calls.
#[test]
fn random_schedules_keep_every_invariant() {
    if let Some(seed) = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        let problems = crate::sim::check_engine_schedule(seed);
        assert!(problems.is_empty(), "seed {seed}:\n{}", problems.join("\n"));
        return;
    }
    let total = crate::sim::schedules();
    let failures = crate::sim::failing_seeds(total, || crate::sim::check_engine_schedule);
    if let Some((seed, problems)) = failures.first() {
        panic!(
            "{} of {total} schedules failed; first: seed {seed} (rerun: SIM_SEED={seed} cargo test --test integration simulation::random_schedules)\n{}",
            failures.len(),
            problems.join("\n")
        );
    }
}

/// The harness can see the article's bug: over random single-key schedules
/// the reference model ends stale in some, the engine in none.
#[test]
fn random_schedules_catch_the_reference_model_stale() {
    let mut model_stale = 0;
    for seed in 0..5_000u64 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut schedule = crate::sim::random_schedule(&mut rng);
        schedule.inputs.iter_mut().for_each(|i| {
            i.key = 0;
            i.version = None;
        });
        let expected = crate::sim::expected_finals(&schedule.inputs, schedule.policy);
        let mut latency = crate::sim::RandomLatency {
            rng: ChaCha8Rng::seed_from_u64(!seed),
            fail_rate: 0.0,
        };
        let mut tie = ChaCha8Rng::seed_from_u64(seed);
        let model = run(
            &mut ArticleModel::new(schedule.policy),
            &schedule.inputs,
            &[],
            &mut latency,
            &mut tie,
            false,
        );
        if model.final_values() != expected {
            model_stale += 1;
        }
        let mut latency = crate::sim::RandomLatency {
            rng: ChaCha8Rng::seed_from_u64(!seed),
            fail_rate: 0.0,
        };
        let mut tie = ChaCha8Rng::seed_from_u64(seed);
        let engine = run(
            &mut Engine::new(schedule.policy),
            &schedule.inputs,
            &[],
            &mut latency,
            &mut tie,
            true,
        );
        assert_eq!(
            engine.final_values(),
            expected,
            "engine stale on seed {seed}"
        );
    }
    assert!(
        model_stale > 0,
        "the reference model never went stale: the harness would miss the bug"
    );
}
