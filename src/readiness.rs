//! What the standard health service (`grpc.health.v1.Health`) says, and so
//! what Kubernetes' gRPC probes see:
//!
//! - **live**, the server as a whole (service `""`): `SERVING` while the
//!   process serves, whatever the cluster does. A replica that lost its
//!   quorum, or has not found its peers yet, is alive: restarting it would
//!   not bring the quorum back, and would make things worse. Only a failed
//!   disk (the replica halts, see [`crate::storage`]) turns it
//!   `NOT_SERVING`, as nothing but a restart on a working disk helps then.
//! - **ready**, [`READY_SERVICE`] (`paxoskv.v1.KvStore`): `SERVING` when a
//!   KV call made here can be answered now: this replica knows its cluster
//!   (it is not still asking its peers whether the cluster is new), it
//!   knows a leader, and it has applied within [`MAX_LAG`] slots of that
//!   leader's commit index. Otherwise `NOT_SERVING`, and the log says why
//!   (once per change). Kubernetes then sends clients to the other
//!   replicas, and a rolling update waits for the restarted replica to be
//!   caught up before it restarts the next.
//!
//! The rule ([`judge`]) is a pure function of the core's status; [`run`]
//! polls the node every [`POLL`] and tells the health reporter. A poll the
//! node refuses because its queue is full changes nothing: a loaded
//! replica is not an unready one.

use std::time::Duration;

use tokio::sync::watch;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::info;

use crate::node::{NodeError, NodeHandle};
use crate::paxos::{Slot, Status};

/// The health service name that means "ready to serve KV calls": the
/// client API's own gRPC service name. Kubernetes' readiness probe asks for
/// it (`grpc: {port: ..., service: paxoskv.v1.KvStore}`).
pub const READY_SERVICE: &str = "paxoskv.v1.KvStore";

/// The health service name that means "the process serves": the empty
/// name, the whole server. Kubernetes' liveness probe asks for it (a gRPC
/// probe without `service`).
pub const LIVE_SERVICE: &str = "";

/// How far behind its leader's commit index a replica may have applied and
/// still be ready: a few hundred milliseconds of writes at full load (a
/// slot is a batch of writes), far less than a snapshot transfer.
pub const MAX_LAG: Slot = 1_000;

/// How often readiness is re-judged.
pub const POLL: Duration = Duration::from_millis(500);

/// Whether a replica whose core reports `status`, and which has applied
/// every slot up to `applied`, is ready to serve KV calls; if not, why.
pub fn judge(status: &Status, applied: Slot) -> Result<(), String> {
    if status.membership.is_none() {
        return Err(
            "joining: asking its peers whether the cluster is new or this replica lost its data"
                .into(),
        );
    }
    let Some(leader) = status.leader else {
        return Err("no leader known (no quorum reached yet, or an election is on)".into());
    };
    let lag = status.leader_commit.saturating_sub(applied);
    if lag > MAX_LAG {
        return Err(format!(
            "catching up: applied slot {applied}, {lag} slots behind leader {leader}'s commit index {} (ready within {MAX_LAG})",
            status.leader_commit
        ));
    }
    Ok(())
}

/// Keeps [`READY_SERVICE`]'s health status in step with [`judge`] until
/// `stop` turns true, re-judging every [`POLL`]. Once the replica's storage
/// fails it sets both [`READY_SERVICE`] and [`LIVE_SERVICE`] to
/// `NOT_SERVING` and returns: the replica serves nothing until restarted.
pub async fn run(handle: NodeHandle, health: HealthReporter, mut stop: watch::Receiver<bool>) {
    let mut failure = handle.watch_failure();
    let mut last: Option<Result<(), String>> = None;
    loop {
        if failure.borrow().is_some() {
            health
                .set_service_status(READY_SERVICE, ServingStatus::NotServing)
                .await;
            health
                .set_service_status(LIVE_SERVICE, ServingStatus::NotServing)
                .await;
            return;
        }
        let verdict = match handle.status().await {
            Ok(status) => Some(judge(&status.core, status.applied)),
            // A full queue means a busy replica, not an unready one: keep
            // the last verdict (turning a loaded replica unready would send
            // its load to the others).
            Err(NodeError::Busy { .. }) => None,
            Err(e) => Some(Err(format!("the node does not answer: {e:?}"))),
        };
        if let Some(verdict) = verdict
            && last.as_ref() != Some(&verdict)
        {
            match &verdict {
                Ok(()) => info!(replica = handle.id(), "ready: serving KV calls"),
                Err(why) => info!(replica = handle.id(), reason = %why, "not ready"),
            }
            let serving = if verdict.is_ok() {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            // The failure may have come while the status was asked: never
            // say SERVING after it.
            if failure.borrow().is_none() {
                health.set_service_status(READY_SERVICE, serving).await;
            }
            last = Some(verdict);
        }
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            _ = failure.changed() => {}
            _ = stop.wait_for(|&s| s) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paxos::{Ballot, Membership, Role};

    fn status(leader: Option<u32>, committed: Slot, leader_commit: Slot) -> Status {
        Status {
            id: 2,
            role: Role::Follower,
            promised: Ballot::ZERO,
            leader,
            committed,
            leader_commit,
            compacted: 0,
            in_flight: 0,
            queued: 0,
            followers: Vec::new(),
            elections: 0,
            handoff_elections: 0,
            membership: Some(Membership::Voter),
            handing_off: None,
        }
    }

    #[test]
    fn ready_with_a_leader_and_caught_up_within_the_bound() {
        judge(&status(Some(1), 10, 10), 10).expect("caught up");
        judge(&status(Some(1), 10, 10 + MAX_LAG), 10).expect("at the bound");
        let mut learner = status(Some(1), 5, 5);
        learner.membership = Some(Membership::Learner);
        judge(&learner, 5).expect("a caught-up learner forwards calls like any replica");
    }

    #[test]
    fn not_ready_without_a_leader_while_joining_or_far_behind() {
        let err = judge(&status(None, 10, 10), 10).unwrap_err();
        assert!(err.contains("no leader"), "{err}");

        let mut joining = status(Some(1), 0, 0);
        joining.membership = None;
        assert!(judge(&joining, 0).unwrap_err().contains("joining"));

        let err = judge(&status(Some(1), 10, 11 + MAX_LAG), 10).unwrap_err();
        assert!(
            err.contains("applied slot 10, 1001 slots behind leader 1's commit index 1011"),
            "{err}"
        );
    }

    #[test]
    fn the_ready_service_is_the_kv_service() {
        use tonic::server::NamedService;
        assert_eq!(
            READY_SERVICE,
            <crate::pb::kv_store_server::KvStoreServer<crate::service::KvService> as NamedService>::NAME
        );
    }
}
