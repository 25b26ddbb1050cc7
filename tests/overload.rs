//! Overload on real processes: a leader holding at most a few writes
//! refuses the rest at once with `RESOURCE_EXHAUSTED` (`NOT_PROPOSED`,
//! naming the limit), never applies a refused write, stays within its
//! memory bound, and serves again as soon as the load drops.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::Cluster;
use paxoskv::certainty::Certainty;
use paxoskv::pb;
use tonic::Code;

/// Calls sent at once, far above the limit below.
const CALLS: usize = 600;
/// `--max-waiting-writes` of every replica.
const LIMIT: &str = "8";
/// Each call's deadline.
const DEADLINE: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_its_limit_a_leader_refuses_at_once_applies_nothing_refused_and_recovers() {
    let cluster = Cluster::start_args("overload", 3, &["--max-waiting-writes", LIMIT]);
    let leader = cluster.leader(Duration::from_secs(20)).await;
    let follower = (1..=3).find(|&id| id != leader).expect("a follower");

    // Half the calls straight to the leader, half through a follower (which
    // forwards them), over a few connections each, all at once.
    let mut clients = Vec::new();
    for id in [leader, follower] {
        for _ in 0..4 {
            clients.push(cluster.client(id).await);
        }
    }
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..CALLS {
        let mut client = clients[i % clients.len()].clone();
        calls.spawn(async move {
            let mut request = tonic::Request::new(pb::UpsertRequest {
                key: format!("ov-{i}"),
                value: Some(i as i32),
                request_id: None,
            });
            request.set_timeout(DEADLINE);
            let sent = Instant::now();
            let result = client.upsert(request).await;
            (i, result.map(drop), sent.elapsed())
        });
    }
    let (mut ok, mut refused) = (BTreeSet::new(), BTreeSet::new());
    while let Some(joined) = calls.join_next().await {
        let (i, result, took) = joined.expect("call task");
        match result {
            Ok(()) => {
                ok.insert(i);
            }
            Err(status) if status.code() == Code::ResourceExhausted => {
                assert!(
                    status.message().contains("writes waiting"),
                    "the refusal names the limit: {status:?}"
                );
                assert_eq!(
                    Certainty::of(&status),
                    Some(Certainty::NotProposed),
                    "a refused write was surely not proposed: {status:?}"
                );
                // Answered, not timed out: refused before any work.
                assert!(took < DEADLINE, "refused only after {took:?}");
                refused.insert(i);
            }
            Err(status) => panic!("call {i}: unexpected {status:?}"),
        }
    }
    println!("{} written, {} refused", ok.len(), refused.len());
    assert!(
        !refused.is_empty(),
        "{CALLS} calls at once against a limit of {LIMIT}: none refused"
    );
    assert!(!ok.is_empty(), "every call refused");

    // The load is gone: the leader writes again at once, and every replica
    // has exactly the writes that were acknowledged, none of the refused.
    let mut client = cluster.client(leader).await;
    client
        .upsert(pb::UpsertRequest {
            key: "after".into(),
            value: Some(1),
            request_id: None,
        })
        .await
        .expect("a write after the load");
    for id in 1..=3 {
        let mut client = cluster.client(id).await;
        for i in 0..CALLS {
            let got = client
                .get(pb::GetRequest {
                    key: format!("ov-{i}"),
                })
                .await;
            if ok.contains(&i) {
                assert_eq!(
                    got.expect("an acknowledged write").into_inner().value,
                    i as i32
                );
            } else {
                let status = got.expect_err("a refused write is never applied");
                assert_eq!(status.code(), Code::NotFound, "replica {id}, key ov-{i}");
            }
        }
    }

    // Memory stayed bounded: 200 MB, the bound the README states.
    for id in 1..=3 {
        let pid = cluster.pid(id).expect("running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
        let hwm_kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM");
        assert!(hwm_kb < 200 * 1024, "replica {id} peaked at {hwm_kb} kB");
    }
}
