//! Real processes: a 3-replica cluster of `paxoskv serve` on 127.0.0.1,
//! written to continuously while replicas are SIGKILLed and restarted.
//! Afterwards every acknowledged write must be on every replica's disk, and
//! the replicas' states must be identical. And a stranger who can reach
//! only the client port cannot speak Paxos to an acceptor.

mod common;

use std::time::{Duration, Instant};

use common::load::{Load, Traffic};
use common::{Cluster, verify_disks, wait_caught_up};
use paxoskv::pb;
use paxoskv::pb::paxos_client::PaxosClient;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

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

/// A forged Prepare, claiming to come from the leader with a ballot far
/// above the cluster's, for replica `target`'s Paxos stream.
fn forged_prepare(leader: u32, round: u64) -> pb::PeerMessage {
    pb::PeerMessage {
        from: leader,
        kind: Some(pb::peer_message::Kind::Prepare(pb::Prepare {
            ballot: Some(pb::Ballot {
                round,
                node: leader,
            }),
            from_slot: 1,
            handed_off_by: None,
        })),
    }
}

/// Opens a Paxos stream to `addr`, saying it is the sender of `msg` in
/// cluster `paxoskv` (as a replica would), and sends `msg` on it; the
/// status if the stream is refused.
async fn send_on_stream(addr: &str, msg: pb::PeerMessage) -> Result<(), tonic::Status> {
    let mut client = PaxosClient::new(common::channel(addr));
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let from = msg.from;
    tx.send(msg).await.expect("queue the message");
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request.set_timeout(Duration::from_secs(5));
    let meta = request.metadata_mut();
    meta.insert("x-paxoskv-replica-id", from.into());
    meta.insert("x-paxoskv-cluster", "paxoskv".parse().expect("ascii"));
    let call = client.stream(request).await?;
    // Keep the stream open a moment so that the message is read.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(call);
    drop(tx);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_on_the_client_port_cannot_speak_paxos() {
    let cluster = Cluster::start("stranger", 3);
    cluster.wait_ready(1, Duration::from_secs(15)).await;
    let leader = cluster.leader(Duration::from_secs(10)).await;
    let target = (1..=3).find(|&id| id != leader).expect("a follower");
    let before = cluster.status(target).await.expect("status");
    let forged_round = before.ballot_round + 1000;
    let client_port = &cluster.addrs[&target];

    // Every Paxos method on the client port is refused, and says where
    // the replica protocol is served.
    let refused = send_on_stream(client_port, forged_prepare(leader, forged_round))
        .await
        .expect_err("a Paxos stream on the client port");
    assert_eq!(refused.code(), Code::Unimplemented, "{refused:?}");
    assert!(refused.message().contains("peer port"), "{refused:?}");
    let mut paxos = PaxosClient::new(common::channel(client_port));
    let snapshot = paxos
        .snapshot(pb::SnapshotRequest {
            from: leader,
            min_index: 0,
        })
        .await
        .expect_err("a snapshot from the client port");
    assert_eq!(snapshot.code(), Code::Unimplemented, "{snapshot:?}");
    let smuggled = pb::ForwardBatch {
        calls: vec![pb::ForwardedCall {
            id: 1,
            call: Some(pb::ForwardRequest {
                call: Some(pb::forward_request::Call::Upsert(pb::UpsertRequest {
                    key: "smuggled".into(),
                    value: Some(1),
                    request_id: None,
                })),
            }),
            timeout_micros: 1_000_000,
            hops: 1,
        }],
        cancelled: vec![],
    };
    let forward = paxos
        .forward(tokio_stream::iter([smuggled]))
        .await
        .expect_err("a forwarded call on the client port");
    assert_eq!(forward.code(), Code::Unimplemented, "{forward:?}");

    // And nothing changed: the forged ballot was not promised.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = cluster.status(target).await.expect("status");
    assert!(
        after.ballot_round < forged_round,
        "replica {target} promised the forged ballot sent to its client port: {after:?}"
    );
    assert_eq!(after.leader, leader, "{after:?}");

    // The same message on the peer port is heard (which is why that port
    // must be reachable by the replicas alone): it shows the message above
    // would have done harm had the client port taken it.
    send_on_stream(
        &cluster.peer_addrs[&target],
        forged_prepare(leader, forged_round),
    )
    .await
    .expect("the peer port takes Paxos streams");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = cluster.status(target).await.expect("status");
        if now.ballot_round >= forged_round {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replica {target} never promised the forged ballot sent to its peer port: {now:?}\n{}",
            cluster.log(target)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The forged messages of the reliability issue, sent to a follower's peer
/// port with TLS off (so only the core's own rules stand in the way): a
/// Prepare at round `u64::MAX`, which would have left no round for any
/// leader ever again, and an Accept that says its own slot is already
/// committed, which a follower would have applied. Both are refused with a
/// WARN naming the rule, and the cluster keeps its leader and writes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_messages_on_the_peer_port_are_refused() {
    let cluster = Cluster::start("out-of-range", 3);
    cluster.wait_ready(1, Duration::from_secs(15)).await;
    let leader = cluster.leader(Duration::from_secs(10)).await;
    let target = (1..=3).find(|&id| id != leader).expect("a follower");
    let before = cluster.status(target).await.expect("status");
    let peer_port = &cluster.peer_addrs[&target];

    send_on_stream(peer_port, forged_prepare(leader, u64::MAX))
        .await
        .expect("the peer port takes Paxos streams");
    // Refusals are logged at most once a second: let the next one show.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let forged_accept = pb::PeerMessage {
        from: leader,
        kind: Some(pb::peer_message::Kind::Accept(pb::Accept {
            ballot: Some(pb::Ballot {
                round: before.ballot_round,
                node: leader,
            }),
            slot: before.committed + 1,
            value: Some(pb::Value {
                kind: Some(pb::value::Kind::Noop(pb::Noop {})),
            }),
            commit: before.committed + 1,
        })),
    };
    send_on_stream(peer_port, forged_accept)
        .await
        .expect("the peer port takes Paxos streams");

    let mut client = cluster.client(leader).await;
    client
        .upsert(pb::UpsertRequest {
            key: "after-forgery".into(),
            value: Some(1),
            request_id: None,
        })
        .await
        .expect("the cluster still writes");
    let after = cluster.status(target).await.expect("status");
    assert_eq!(
        (after.ballot_round, after.ballot_node, after.leader),
        (before.ballot_round, before.ballot_node, leader),
        "replica {target} took a forged message: {after:?}"
    );
    let log = cluster.log(target);
    for rule in ["out of range", "outside the window"] {
        assert!(
            log.contains("refused a peer's message") && log.contains(rule),
            "replica {target} logged no refusal ({rule}):\n{log}"
        );
    }
}
