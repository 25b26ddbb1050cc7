//! Real processes: a 3-replica cluster of `paxoskv serve` on 127.0.0.1,
//! written to continuously while replicas are SIGKILLed and restarted.
//! Afterwards every acknowledged write must be on every replica's disk, and
//! the replicas' states must be identical.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Cluster;
use paxoskv::pb;
use paxoskv::pb::admin_client::AdminClient;
use paxoskv::storage::Storage;
use tokio::sync::watch;

/// Replica `id`'s own status, if it answers.
async fn status(cluster: &Cluster, id: u32) -> Option<pb::StatusResponse> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.addrs[&id]))
        .ok()?
        .connect_timeout(Duration::from_millis(300))
        .connect_lazy();
    let mut req = tonic::Request::new(pb::StatusRequest {});
    req.set_timeout(Duration::from_millis(500));
    AdminClient::new(channel)
        .status(req)
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// The replica that leads with the highest ballot, among those alive.
async fn leader(cluster: &Cluster, alive: &[u32]) -> Option<u32> {
    let mut best = None;
    for &id in alive {
        if let Some(s) = status(cluster, id).await
            && s.role == "leader"
            && best.is_none_or(|(r, n, _)| (s.ballot_round, s.ballot_node) > (r, n))
        {
            best = Some((s.ballot_round, s.ballot_node, id));
        }
    }
    best.map(|(_, _, id)| id)
}

async fn wait_for_leader(cluster: &Cluster, alive: &[u32], within: Duration) -> u32 {
    let deadline = Instant::now() + within;
    loop {
        if let Some(l) = leader(cluster, alive).await {
            return l;
        }
        assert!(
            Instant::now() < deadline,
            "no leader among {alive:?} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Acknowledged writes: key -> value, and for each, when the attempt that
/// succeeded was sent and when it was acknowledged.
#[derive(Default)]
struct Acked {
    values: BTreeMap<String, i32>,
    times: Vec<(Instant, Instant)>,
}

/// Writes distinct keys in a loop, each through a replica chosen in turn
/// among `targets`, retrying with the same request id on failure (so a
/// retry is applied at most once). Records what was acknowledged.
async fn writer(
    cluster_addrs: BTreeMap<u32, String>,
    targets: watch::Receiver<Vec<u32>>,
    acked: Arc<Mutex<Acked>>,
    mut stop: watch::Receiver<bool>,
) {
    let client_id = 0xC0FFEE;
    let mut seq = 0u64;
    let mut turn = 0usize;
    while !*stop.borrow() {
        seq += 1;
        let key = format!("key-{seq:06}");
        let value = seq as i32;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if *stop.borrow() || Instant::now() > deadline {
                break;
            }
            let live = targets.borrow().clone();
            turn += 1;
            let id = live[turn % live.len()];
            let channel =
                tonic::transport::Endpoint::from_shared(format!("http://{}", cluster_addrs[&id]))
                    .expect("endpoint")
                    .connect_timeout(Duration::from_millis(300))
                    .connect_lazy();
            let mut client = pb::kv_store_client::KvStoreClient::new(channel);
            let mut req = tonic::Request::new(pb::InsertRequest {
                key: key.clone(),
                value: Some(value),
                request_id: Some(pb::RequestId {
                    client_id,
                    sequence: seq,
                }),
            });
            req.set_timeout(Duration::from_secs(2));
            let sent = Instant::now();
            match client.insert(req).await {
                Ok(_) => {
                    let mut a = acked.lock().unwrap();
                    a.values.insert(key.clone(), value);
                    a.times.push((sent, Instant::now()));
                    break;
                }
                Err(_) => {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                        _ = stop.changed() => {}
                    }
                }
            }
        }
    }
}

/// Waits until every replica in `ids` has applied as far as the leader has
/// committed (with writes stopped).
async fn wait_caught_up(cluster: &Cluster, ids: &[u32], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let mut applied = Vec::new();
        for &id in ids {
            applied.push(status(cluster, id).await.map(|s| (s.committed, s.applied)));
        }
        let leader_commit = applied.iter().flatten().map(|(c, _)| *c).max().unwrap_or(0);
        if leader_commit > 0
            && applied
                .iter()
                .all(|a| a.is_some_and(|(_, ap)| ap == leader_commit))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "replicas did not catch up within {within:?}: {applied:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stops every replica, opens every data directory, and checks that each
/// holds every acknowledged write and that all hold the same state.
fn verify_disks(cluster: &mut Cluster, acked: &Acked) {
    for id in 1..=3 {
        let status = cluster.terminate(id, Duration::from_secs(10));
        assert!(
            status.is_some_and(|s| s.success()),
            "replica {id} did not exit cleanly on SIGTERM: {status:?}"
        );
    }
    let mut states = Vec::new();
    for id in 1..=3 {
        let storage =
            Storage::open(&cluster.dir.join(format!("data-{id}")), 8 << 20).expect("open data dir");
        let state = storage.entries().expect("read the state machine");
        for (key, value) in &acked.values {
            assert_eq!(
                state.get(key),
                Some(value),
                "replica {id} lost acknowledged write {key}"
            );
        }
        states.push(state);
    }
    assert_eq!(states[0], states[1], "replicas 1 and 2 diverge");
    assert_eq!(states[0], states[2], "replicas 1 and 3 diverge");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_under_load_loses_no_acknowledged_write() {
    let mut cluster = Cluster::start("kill-leader", 3);
    cluster.wait_ready(1, Duration::from_secs(15)).await;
    let acked = Arc::new(Mutex::new(Acked::default()));
    let (targets_tx, targets) = watch::channel(vec![1, 2, 3]);
    let (stop_tx, stop) = watch::channel(false);
    let w = tokio::spawn(writer(
        cluster.addrs.clone(),
        targets,
        Arc::clone(&acked),
        stop,
    ));

    tokio::time::sleep(Duration::from_secs(1)).await;
    let old = wait_for_leader(&cluster, &[1, 2, 3], Duration::from_secs(5)).await;
    let before = acked.lock().unwrap().values.len();
    assert!(before > 0, "no write acknowledged before the kill");
    cluster.kill(old);
    let killed_at = Instant::now();
    let alive: Vec<u32> = (1..=3).filter(|&i| i != old).collect();
    targets_tx.send(alive.clone()).unwrap();

    // A new leader takes writes within a few seconds: the first write sent
    // after the kill is acknowledged within 10 s.
    let new = wait_for_leader(&cluster, &alive, Duration::from_secs(10)).await;
    assert_ne!(new, old);
    let deadline = killed_at + Duration::from_secs(10);
    let first_after = loop {
        if let Some((_, t)) = acked
            .lock()
            .unwrap()
            .times
            .iter()
            .find(|(sent, _)| *sent > killed_at)
        {
            break *t;
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
    targets_tx.send(vec![1, 2, 3]).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_tx.send(true).unwrap();
    w.await.unwrap();
    wait_caught_up(&cluster, &[1, 2, 3], Duration::from_secs(20)).await;
    let acked = acked.lock().unwrap();
    println!("acknowledged writes: {}", acked.values.len());
    verify_disks(&mut cluster, &acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_killed_and_restarted_in_turn_while_writing() {
    let mut cluster = Cluster::start("rolling-kill", 3);
    cluster.wait_ready(1, Duration::from_secs(15)).await;
    let acked = Arc::new(Mutex::new(Acked::default()));
    let (targets_tx, targets) = watch::channel(vec![1, 2, 3]);
    let (stop_tx, stop) = watch::channel(false);
    let w = tokio::spawn(writer(
        cluster.addrs.clone(),
        targets,
        Arc::clone(&acked),
        stop,
    ));

    for id in 1..=3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        cluster.kill(id);
        targets_tx
            .send((1..=3).filter(|&i| i != id).collect())
            .unwrap();
        let count = acked.lock().unwrap().values.len();
        // The other two keep taking writes.
        let deadline = Instant::now() + Duration::from_secs(10);
        while acked.lock().unwrap().values.len() < count + 5 {
            assert!(
                Instant::now() < deadline,
                "no progress with replica {id} down"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        cluster.spawn(id);
        targets_tx.send(vec![1, 2, 3]).unwrap();
        wait_for_leader(&cluster, &[1, 2, 3], Duration::from_secs(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_tx.send(true).unwrap();
    w.await.unwrap();
    wait_caught_up(&cluster, &[1, 2, 3], Duration::from_secs(20)).await;
    let acked = acked.lock().unwrap();
    println!("acknowledged writes: {}", acked.values.len());
    verify_disks(&mut cluster, &acked);
}
