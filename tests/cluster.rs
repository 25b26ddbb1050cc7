//! Real processes: a 3-replica cluster of `paxoskv serve` on 127.0.0.1,
//! written to continuously while replicas are SIGKILLed and restarted.
//! Afterwards every acknowledged write must be on every replica's disk, and
//! the replicas' states must be identical.

mod common;

use std::time::{Duration, Instant};

use common::load::{Load, Traffic};
use common::{Cluster, verify_disks, wait_caught_up};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_under_load_loses_no_acknowledged_write() {
    let mut cluster = Cluster::start("kill-leader", 3);
    cluster.wait_ready(1, Duration::from_secs(15)).await;
    let load = Load::start(&cluster, Traffic::AckedInserts);

    tokio::time::sleep(Duration::from_secs(1)).await;
    let old = cluster.leader(Duration::from_secs(5)).await;
    assert!(load.acked() > 0, "no write acknowledged before the kill");
    cluster.kill(old);
    let killed_at = Instant::now();
    load.aim((1..=3).filter(|&i| i != old).collect());

    // A new leader takes writes within a few seconds: the first write sent
    // after the kill is acknowledged within 10 s.
    let new = cluster.leader(Duration::from_secs(10)).await;
    assert_ne!(new, old);
    let deadline = killed_at + Duration::from_secs(10);
    let first_after = loop {
        if let Some(t) = load.first_ack_of_a_write_sent_after(killed_at) {
            break t;
        }
        assert!(
            Instant::now() < deadline,
            "no write acknowledged within 10 s of killing the leader"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!(
        "time from SIGKILL of leader {old} to the first write acknowledged by leader {new}: {:?}",
        first_after - killed_at
    );

    // The killed replica comes back and catches up.
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.spawn(old);
    load.aim(vec![1, 2, 3]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let acked = load.finish().await;
    wait_caught_up(&cluster, &[1, 2, 3], Duration::from_secs(20)).await;
    println!("acknowledged writes: {}", acked.values.len());
    verify_disks(&mut cluster, &acked);
}

/// Log segments of 4 KiB, the least allowed: a few dozen commits each, so the
/// writes below cross many rotations, and the kills land near some.
const SMALL_SEGMENTS: &[&str] = &["--log-segment-bytes", "4096"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_killed_and_restarted_in_turn_while_writing() {
    let mut cluster = Cluster::start_args("rolling-kill", 3, SMALL_SEGMENTS);
    cluster.wait_ready(1, Duration::from_secs(15)).await;
    let load = Load::start(&cluster, Traffic::AckedInserts);

    for id in 1..=3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        cluster.kill(id);
        load.aim((1..=3).filter(|&i| i != id).collect());
        // The other two keep taking writes.
        let count = load.acked();
        let deadline = Instant::now() + Duration::from_secs(10);
        while load.acked() < count + 5 {
            assert!(
                Instant::now() < deadline,
                "no progress with replica {id} down"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        cluster.spawn(id);
        load.aim(vec![1, 2, 3]);
        cluster.leader(Duration::from_secs(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let acked = load.finish().await;
    wait_caught_up(&cluster, &[1, 2, 3], Duration::from_secs(20)).await;
    println!("acknowledged writes: {}", acked.values.len());
    for id in 1..=3 {
        let segments = std::fs::read_dir(cluster.dir.join(format!("data-{id}/log")))
            .expect("log directory")
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".wal"))
            })
            .count();
        assert!(
            segments > 1,
            "replica {id}'s log never rotated: {segments} segment"
        );
    }
    verify_disks(&mut cluster, &acked);
}
