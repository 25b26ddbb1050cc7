//! A failed write says whether it surely did not happen, on real
//! processes: `NOT_PROPOSED` when no leader ever had it, `OUTCOME_UNKNOWN`
//! when a leader proposed it and could not get it chosen in time.

mod common;

use std::time::Duration;

use common::Cluster;
use paxoskv::certainty::Certainty;
use paxoskv::pb;
use tonic::Code;

/// Upserts `key` on replica `id` with a request id of `client_id`'s
/// session, expecting it to fail within `deadline`.
async fn upsert_within(
    cluster: &Cluster,
    id: u32,
    client_id: u64,
    key: &str,
    deadline: Duration,
) -> tonic::Status {
    let mut client = cluster.client(id).await;
    let mut request = tonic::Request::new(pb::UpsertRequest {
        key: key.into(),
        value: Some(1),
        request_id: Some(pb::RequestId {
            client_id,
            sequence: 1,
        }),
    });
    request.set_timeout(deadline);
    client
        .upsert(request)
        .await
        .expect_err("no quorum: the write fails")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_no_leader_ever_had_is_not_proposed() {
    // One replica of three: no leader can be elected.
    let mut cluster = Cluster::start("not-proposed", 3);
    cluster.kill(2);
    cluster.kill(3);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while cluster.status(1).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "replica 1 never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // No leader, so no session can be opened either: the id is one no
    // replica issued, and the write never reaches a log to be refused.
    let status = upsert_within(&cluster, 1, 7, "k", Duration::from_secs(2)).await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        Certainty::of(&status),
        Some(Certainty::NotProposed),
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_a_leader_proposed_without_a_quorum_has_an_unknown_outcome() {
    let mut cluster = Cluster::start("outcome-unknown", 3);
    let leader = cluster.leader(Duration::from_secs(20)).await;
    // A session the log issued, so the write would apply were it chosen.
    let client_id = cluster
        .client(leader)
        .await
        .open_session(pb::OpenSessionRequest {})
        .await
        .expect("open a session")
        .into_inner()
        .client_id;
    for id in (1..=3).filter(|&id| id != leader) {
        cluster.kill(id);
    }
    let status = upsert_within(&cluster, leader, client_id, "k", Duration::from_secs(2)).await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        Certainty::of(&status),
        Some(Certainty::OutcomeUnknown),
        "{status:?}"
    );
}
