//! Real processes: leadership hand-off on SIGTERM. A 3-replica cluster of
//! `paxoskv serve` on 127.0.0.1, written to continuously through the
//! followers, has its leader stopped: once with SIGTERM (it hands
//! leadership off, then drains and exits 0) and, on a fresh cluster, with
//! SIGKILL (the others wait out an election timeout). Either way no
//! acknowledged write is lost, a new leader is elected, and the stopped
//! replica rejoins when restarted. The largest interval with no
//! acknowledged write is printed for both; it is measured, never asserted
//! on (tests check correctness; timings depend on the machine).

mod common;

use std::time::{Duration, Instant};

use common::load::{Acked, Load, Traffic};
use common::{Cluster, sample, verify_disks, wait_caught_up};

/// How the leader is stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    Term,
    Kill,
}

/// A pod's default termination grace period: SIGTERM must end the process
/// well within it.
const GRACE: Duration = Duration::from_secs(30);

/// The largest interval between consecutive acknowledgements that ends
/// after `from` and starts before `to`: the writes' outage around the stop
/// at `from`, before the restart at `to` (which has pauses of its own: the
/// client tries the replica while it starts).
fn largest_gap(acked: &Acked, from: Instant, to: Instant) -> Duration {
    let mut acks: Vec<Instant> = acked.times.iter().map(|&(_, ack)| ack).collect();
    acks.sort();
    acks.windows(2)
        .filter(|w| w[1] > from && w[0] < to)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default()
}

/// Stops the leader of a fresh cluster under writes through the followers,
/// as `stop` says; checks what must hold and returns the largest gap with
/// no acknowledged write.
async fn stop_the_leader_under_load(name: &str, stop: Stop) -> Duration {
    let mut cluster = Cluster::start(name, 3);
    cluster.wait_ready(1, Duration::from_secs(15)).await;
    let old = cluster.leader(Duration::from_secs(5)).await;
    let followers: Vec<u32> = (1..=3).filter(|&i| i != old).collect();
    let load = Load::start(&cluster, Traffic::AckedInserts);
    load.aim(followers.clone());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(load.acked() > 0, "no write acknowledged before the stop");

    let stopped_at = Instant::now();
    match stop {
        Stop::Term => {
            // Blocks while it waits: let the load run on another thread.
            let status = tokio::task::block_in_place(|| cluster.terminate(old, GRACE));
            let took = stopped_at.elapsed();
            assert!(
                status.is_some_and(|s| s.success()),
                "leader {old} did not exit 0 within {GRACE:?} of SIGTERM: {status:?}\n--- log ---\n{}",
                cluster.log(old)
            );
            println!("SIGTERM: leader {old} exited 0 after {took:?}");
        }
        Stop::Kill => cluster.kill(old),
    }

    let new = cluster.leader(Duration::from_secs(10)).await;
    assert_ne!(new, old, "a new leader is elected");
    // Writes go on through the new leader.
    let deadline = stopped_at + Duration::from_secs(10);
    while load.first_ack_of_a_write_sent_after(stopped_at).is_none() {
        assert!(
            Instant::now() < deadline,
            "no write acknowledged within 10 s of stopping the leader"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;

    if stop == Stop::Term {
        let log = cluster.log(old);
        assert!(
            log.contains("handed leadership off"),
            "leader {old} did not hand off before stopping:\n{log}"
        );
        // The replica it handed off to counts the election it was asked for.
        let page = cluster.scrape(new).expect("scrape the new leader");
        let elections = sample(&page, "paxoskv_handoff_elections_total");
        assert!(
            elections.is_some_and(|n| n >= 1.0),
            "replica {new} took over without a hand-off election: {elections:?}"
        );
    }

    // The stopped replica comes back and catches up.
    let restarted_at = Instant::now();
    cluster.spawn(old);
    load.aim(vec![1, 2, 3]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let acked = load.finish().await;
    let gap = largest_gap(&acked, stopped_at, restarted_at);
    wait_caught_up(&cluster, &[1, 2, 3], Duration::from_secs(20)).await;
    println!(
        "{stop:?} of leader {old} (new leader {new}): {} writes acknowledged; largest gap with no acknowledged write: {gap:?}",
        acked.values.len()
    );
    // Every acknowledged write is on every disk; every replica exits 0.
    verify_disks(&mut cluster, &acked);
    gap
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_the_leader_hands_off_and_loses_nothing_and_sigkill_is_compared() {
    // One after the other, not in parallel: the figures are meant to be
    // compared.
    let term = stop_the_leader_under_load("handoff-term", Stop::Term).await;
    let kill = stop_the_leader_under_load("handoff-kill", Stop::Kill).await;
    println!("largest gap with no acknowledged write: SIGTERM {term:?}, SIGKILL {kill:?}");
}
