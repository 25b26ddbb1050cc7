//! Deterministic simulation tests for the Multi-Paxos key-value store. The
//! client histories they record are checked for linearizability by the
//! library's checker (`paxoskv::check::linearizability`), the one
//! `paxoskv check` runs too.

mod world;

use std::panic::{AssertUnwindSafe, catch_unwind};

use world::{Params, Stats, World};

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

/// Runs one seed; a panic inside the core counts as a failure of that seed.
fn run_seed(seed: u64, ops: usize) -> Result<Stats, String> {
    let params = Params::from_seed(seed, ops);
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let mut world = World::new(seed, params.clone());
        world.run().map(|()| world.stats.clone())
    }));
    match outcome {
        Ok(Ok(stats)) => Ok(stats),
        Ok(Err(violation)) => Err(format!("{violation}\n  params: {params:?}")),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(format!("panicked: {msg}\n  params: {params:?}"))
        }
    }
}

/// The simulator over many seeds (`PAXOSKV_SIM_SEEDS`, default 500, from
/// `PAXOSKV_SIM_FIRST_SEED`, default 1), each with `PAXOSKV_SIM_OPS` client
/// operations (default 200); or exactly one seed with `PAXOSKV_SIM_SEED`.
#[test]
fn simulated_clusters_stay_safe_linearizable_and_live() {
    let ops = env_u64("PAXOSKV_SIM_OPS", 200) as usize;
    let seeds: Vec<u64> = match std::env::var("PAXOSKV_SIM_SEED") {
        Ok(seed) => vec![seed.parse().expect("PAXOSKV_SIM_SEED is a number")],
        Err(_) => {
            let first = env_u64("PAXOSKV_SIM_FIRST_SEED", 1);
            (first..first + env_u64("PAXOSKV_SIM_SEEDS", 500)).collect()
        }
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunks: Vec<Vec<u64>> = (0..threads)
        .map(|t| seeds.iter().copied().skip(t).step_by(threads).collect())
        .collect();
    let results: Vec<(u64, Result<Stats, String>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                scope.spawn(move || {
                    chunk
                        .into_iter()
                        .map(|seed| (seed, run_seed(seed, ops)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("simulation thread"))
            .collect()
    });

    let mut total = Stats::default();
    let mut failures = Vec::new();
    for (seed, result) in &results {
        match result {
            Ok(s) => total.absorb(s),
            Err(e) => failures.push(format!(
                "seed {seed} failed (replay: PAXOSKV_SIM_SEED={seed}): {e}"
            )),
        }
    }
    println!("simulated {} seeds x {ops} ops: {total:?}", results.len());
    println!(
        "hand-offs: {} started, {} completed (the target was the next leader), {} with the target made to fail; {} of {} seeds completed at least one",
        total.hand_offs,
        total.hand_offs_completed,
        total.hand_offs_faulted,
        total.seeds_handed_off,
        results.len()
    );
    if !failures.is_empty() {
        panic!(
            "{} of {} seeds failed:\n{}",
            failures.len(),
            results.len(),
            failures.join("\n")
        );
    }
}

/// A follower cut off and reconnected again and again never deposes the
/// leader the majority can reach (PreVote), with 3 and with 5 replicas.
/// A leader told to hand off is replaced by its target within an election
/// timeout, again and again, with 3 and with 5 replicas and clients
/// writing throughout.
#[test]
fn a_hand_off_elects_its_target_within_an_election_timeout() {
    for (seed, replicas) in [(1, 3), (2, 5), (3, 3), (4, 5)] {
        let mut params = Params::from_seed(seed, 100);
        params.replicas = replicas;
        // A quick network: the bound is one election timeout.
        params.max_delay = 2;
        params.max_sync = 1;
        let mut world = World::new(seed, params.clone());
        if let Err(e) = world.run_hand_offs(5) {
            panic!("seed {seed}, {replicas} replicas: {e}\n  params: {params:?}");
        }
    }
}

#[test]
fn a_flaky_follower_never_deposes_a_reachable_leader() {
    for (seed, replicas) in [(1, 3), (2, 5), (3, 3), (4, 5)] {
        let mut params = Params::from_seed(seed, 100);
        params.replicas = replicas;
        let mut world = World::new(seed, params.clone());
        if let Err(e) = world.run_flaky_follower(6) {
            panic!("seed {seed}, {replicas} replicas: {e}\n  params: {params:?}");
        }
    }
}
