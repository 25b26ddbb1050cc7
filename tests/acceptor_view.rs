//! The acceptor, read-only, on the client port: `Admin/Acceptor` and
//! `paxoskv acceptor SLOT` show a replica's promise and its vote for a
//! slot, as a learner would ask an acceptor by hand.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{Cluster, binary, channel};
use paxoskv::pb;
use paxoskv::pb::admin_client::AdminClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_shows_its_promise_and_its_vote_for_a_slot() {
    let cluster = Cluster::start("acceptor-view", 3);
    let leader = cluster.leader(Duration::from_secs(20)).await;
    let mut client = cluster.client(leader).await;
    let client_id = client
        .open_session(pb::OpenSessionRequest {})
        .await
        .expect("open a session")
        .into_inner()
        .client_id;
    client
        .upsert(pb::UpsertRequest {
            key: "apple".into(),
            value: Some(41),
            request_id: Some(pb::RequestId {
                client_id,
                sequence: 1,
            }),
        })
        .await
        .expect("write");
    let status = cluster.status(leader).await.expect("status");
    // The write's slot: the last one committed (the cluster is idle).
    let slot = status.committed;
    for id in 1..=3 {
        let mut admin = AdminClient::new(channel(&cluster.addrs[&id]));
        let view = admin
            .acceptor(pb::AcceptorRequest { slot })
            .await
            .expect("acceptor view")
            .into_inner();
        assert_eq!(view.id, id);
        assert_eq!(
            (view.promised_round, view.promised_node),
            (status.ballot_round, status.ballot_node)
        );
        // A follower's vote for the last slot may still be on its way.
        if view.vote == "voted" {
            assert_eq!(
                (view.vote_round, view.vote_node),
                (status.ballot_round, status.ballot_node)
            );
            assert_eq!(view.commands.len(), 1, "{view:?}");
            assert!(view.commands[0].contains("\"apple\""), "{view:?}");
            assert!(view.commands[0].contains("41"), "{view:?}");
            let id = format!("client {client_id} sequence 1");
            assert!(view.commands[0].contains(&id), "{view:?}");
        } else {
            assert_ne!(
                id, leader,
                "the leader voted for its own proposal: {view:?}"
            );
        }
        let far = admin
            .acceptor(pb::AcceptorRequest { slot: slot + 1000 })
            .await
            .expect("acceptor view")
            .into_inner();
        assert_eq!(far.vote, "none");
    }
    // The CLI says the same, for people.
    let out = tokio::process::Command::new(binary())
        .args([
            "acceptor",
            &slot.to_string(),
            "--endpoint",
            &cluster.addrs[&leader],
        ])
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run paxoskv acceptor");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!(
            "slot {slot}: voted in ballot {}.{}",
            status.ballot_round, status.ballot_node
        )),
        "{text}"
    );
    assert!(text.contains("\"apple\""), "{text}");
}
