//! Real processes: snapshots, log compaction, and replicas that lose their
//! data. Three `paxoskv serve` processes on 127.0.0.1 snapshot every few
//! dozen slots, so that a replica that was away must be sent a snapshot.
//! Afterwards every acknowledged write must be on every replica's disk,
//! and the replicas' states must be identical.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::load::{Load, Traffic};
use common::{Cluster, sample, verify_disks, wait_caught_up};

/// Snapshot every 40 applied slots, keeping 10 below each: a replica away
/// for a second or two is behind the others' compacted logs.
const FREQUENT_SNAPSHOTS: &[&str] = &["--snapshot-every", "40", "--log-keep", "10"];

/// Waits until replica `id` reports `role`.
async fn wait_role(cluster: &Cluster, id: u32, role: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let now = cluster.status(id).await.ok().map(|s| s.role);
        if now.as_deref() == Some(role) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "replica {id} is not {role} after {within:?}: {now:?}\n{}",
            cluster.log(id)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A follower (not the leader), once there is a leader.
async fn a_follower(cluster: &Cluster) -> u32 {
    let leader = cluster.leader(Duration::from_secs(10)).await;
    (1..=3).find(|&id| id != leader).expect("three replicas")
}

/// Writes for `long`, or until `acked` more writes are acknowledged.
async fn write_for(load: &Load, long: Duration, acked: usize) {
    let (start, from) = (Instant::now(), load.acked());
    while start.elapsed() < long && load.acked() < from + acked {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn installs(cluster: &Cluster, id: u32) -> f64 {
    cluster
        .scrape(id)
        .ok()
        .and_then(|page| sample(&page, "paxoskv_snapshots_installed_total"))
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_whose_data_directory_is_deleted_rejoins_by_snapshot_and_converges() {
    let mut cluster = Cluster::start_args("wiped", 3, FREQUENT_SNAPSHOTS);
    cluster.wait_ready(1, Duration::from_secs(15)).await;
    let load = Load::start(&cluster, Traffic::AckedInserts);
    write_for(&load, Duration::from_secs(10), 100).await;

    let wiped = a_follower(&cluster).await;
    cluster.kill(wiped);
    load.aim((1..=3).filter(|&i| i != wiped).collect());
    std::fs::remove_dir_all(cluster.dir.join(format!("data-{wiped}"))).expect("delete data dir");
    // The others go on, snapshot and compact past everything it had.
    write_for(&load, Duration::from_secs(10), 150).await;

    cluster.spawn(wiped);
    let back = Instant::now();
    // It knows it lost its data: it rejoins without voting, is sent a
    // snapshot, catches up, and only then votes again.
    wait_role(&cluster, wiped, "follower", Duration::from_secs(30)).await;
    println!(
        "wiped replica {wiped} voting again after {:?}",
        back.elapsed()
    );
    assert!(
        installs(&cluster, wiped) >= 1.0,
        "replica {wiped} rejoined without installing a snapshot:\n{}",
        cluster.log(wiped)
    );
    assert!(
        cluster.log(wiped).contains("voting again"),
        "no sign of the rejoin in replica {wiped}'s log:\n{}",
        cluster.log(wiped)
    );
    load.aim(vec![1, 2, 3]);
    write_for(&load, Duration::from_secs(2), 20).await;
    let acked = load.finish().await;
    wait_caught_up(&cluster, &[1, 2, 3], Duration::from_secs(30)).await;
    println!("acknowledged writes: {}", acked.values.len());
    verify_disks(&mut cluster, &acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_state_machine_is_detected_and_recovered_from_the_peers() {
    let mut cluster = Cluster::start_args("damaged", 3, FREQUENT_SNAPSHOTS);
    cluster.wait_ready(1, Duration::from_secs(15)).await;
    let load = Load::start(&cluster, Traffic::AckedInserts);
    write_for(&load, Duration::from_secs(10), 100).await;

    // Stopped cleanly, so that its state machine is flushed and sealed,
    // then 64 bytes in the middle of sled's file are flipped.
    let damaged = a_follower(&cluster).await;
    load.aim((1..=3).filter(|&i| i != damaged).collect());
    let status = cluster.terminate(damaged, Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let db = cluster.dir.join(format!("data-{damaged}/state/db"));
    flip_middle(&db, 64);
    write_for(&load, Duration::from_secs(10), 100).await;

    cluster.spawn(damaged);
    wait_role(&cluster, damaged, "follower", Duration::from_secs(30)).await;
    let log = cluster.log(damaged);
    assert!(
        log.contains("the state machine cannot be trusted"),
        "the damage went unreported:\n{log}"
    );
    assert!(
        installs(&cluster, damaged) >= 1.0,
        "replica {damaged} serves again without a snapshot:\n{log}"
    );
    load.aim(vec![1, 2, 3]);
    write_for(&load, Duration::from_secs(2), 20).await;
    let acked = load.finish().await;
    wait_caught_up(&cluster, &[1, 2, 3], Duration::from_secs(30)).await;
    verify_disks(&mut cluster, &acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_directories_stay_bounded_under_continuous_writes() {
    // 8 KiB segments: a bound in segments shows in seconds, not hours.
    let args = [
        "--snapshot-every",
        "300",
        "--log-keep",
        "150",
        "--log-segment-bytes",
        "8192",
    ];
    let cluster = Cluster::start_args("bounded", 3, &args);
    cluster.wait_ready(1, Duration::from_secs(15)).await;
    let load = Load::start(&cluster, Traffic::EveryMethod);
    let mut most = [0usize; 4];
    let start = Instant::now();
    let mut committed = 0;
    // Enough slots that, kept whole, the log would take several times the
    // bound below.
    while committed < 3000 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "only {committed} slots in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        for id in 1..=3 {
            let segments = count_segments(&cluster.dir.join(format!("data-{id}/log")));
            most[id as usize] = most[id as usize].max(segments);
            if let Ok(s) = cluster.status(id).await {
                committed = committed.max(s.committed);
            }
        }
    }
    let answered = load.finish().await.answered;
    let snapshots: Vec<f64> = (1..=3)
        .map(|id| {
            cluster
                .scrape(id)
                .ok()
                .and_then(|page| sample(&page, "paxoskv_snapshots_total"))
                .unwrap_or(0.0)
        })
        .collect();
    println!(
        "{committed} slots, {answered} calls; most log segments per replica: {most:?}; snapshots: {snapshots:?}"
    );
    // At most `every + keep` = 450 slots of votes stay in the log, a few
    // dozen KiB; 3,000 slots kept whole would take about seven times that.
    for (id, &n) in most.iter().enumerate().skip(1) {
        assert!(n <= 16, "replica {id}'s log grew to {n} segments");
        assert!(snapshots[id - 1] >= 5.0, "replica {id}: {snapshots:?}");
    }
}

fn count_segments(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".wal"))
            })
            .count()
    })
}

fn flip_middle(path: &Path, len: usize) {
    let mut bytes = std::fs::read(path).expect("read db");
    let at = bytes.len() / 2;
    for b in &mut bytes[at..at + len] {
        *b ^= 0xa5;
    }
    std::fs::write(path, &bytes).expect("write db");
}
