//! `paxoskv.v1.Admin`: what a replica knows of itself and its peers, for
//! `paxoskv status`, tests and operators (also callable with grpcurl).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::directory::Directory;
use crate::kv;
use crate::node::{NodeError, NodeHandle};
use crate::paxos::{Membership, Role, Value};
use crate::pb;

/// The Admin service of one replica.
pub struct AdminService {
    node: NodeHandle,
    directory: Arc<Directory>,
}

impl AdminService {
    /// Reports on `node`; `directory` gives every replica's addresses.
    pub fn new(node: NodeHandle, directory: Arc<Directory>) -> Self {
        AdminService { node, directory }
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> pb::admin_server::AdminServer<Self> {
        pb::admin_server::AdminServer::new(self)
            .max_decoding_message_size(crate::service::MAX_REQUEST_BYTES)
    }
}

/// The name a replica's part goes by in status output: its role if it
/// votes; `learner` while it rejoins after losing its data (it votes on
/// nothing); `joining` while an empty replica asks its peers whether the
/// cluster is new.
pub fn role_name(role: Role, membership: Option<Membership>) -> &'static str {
    match (membership, role) {
        (None, _) => "joining",
        (Some(Membership::Learner), _) => "learner",
        (Some(Membership::Voter), Role::Leader) => "leader",
        (Some(Membership::Voter), Role::Follower) => "follower",
        (Some(Membership::Voter), Role::Candidate) => "candidate",
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let status = self.node.status().await.map_err(|e| match e {
            NodeError::Stopped => crate::service::stopped(&self.node),
            other => Status::internal(format!("{other:?}")),
        })?;
        let tick_ms = status.tick.as_millis() as u64;
        let peers = self
            .directory
            .peers()
            .iter()
            .map(|(&id, address)| {
                let follower = status.core.followers.iter().find(|f| f.id == id);
                pb::Peer {
                    id,
                    peer_address: address.clone(),
                    client_address: self.directory.client_address(id).unwrap_or_default(),
                    committed: follower.map_or(0, |f| f.committed),
                    silent_ms: follower.map_or(0, |f| f.silent_ticks * tick_ms),
                    connected: id == status.core.id
                        || status.connected.get(&id).copied().unwrap_or(false),
                }
            })
            .collect();
        Ok(Response::new(pb::StatusResponse {
            id: status.core.id,
            role: role_name(status.core.role, status.core.membership).to_string(),
            leader: status.core.leader.unwrap_or(0),
            ballot_round: status.core.promised.round,
            ballot_node: status.core.promised.node,
            committed: status.core.committed,
            applied: status.applied,
            snapshot: status.snapshot,
            peers,
        }))
    }

    async fn acceptor(
        &self,
        request: Request<pb::AcceptorRequest>,
    ) -> Result<Response<pb::AcceptorResponse>, Status> {
        let slot = request.into_inner().slot;
        let view = self.node.acceptor(slot).await.map_err(|e| match e {
            NodeError::Stopped => crate::service::stopped(&self.node),
            other => Status::internal(format!("{other:?}")),
        })?;
        let (vote, (vote_round, vote_node), commands) = match &view.vote {
            Some((ballot, value)) => ("voted", (ballot.round, ballot.node), describe_value(value)),
            None if slot <= view.compacted => ("compacted", (0, 0), Vec::new()),
            None => ("none", (0, 0), Vec::new()),
        };
        Ok(Response::new(pb::AcceptorResponse {
            id: self.node.id(),
            promised_round: view.promised.round,
            promised_node: view.promised.node,
            slot,
            vote: vote.to_string(),
            vote_round,
            vote_node,
            commands,
            compacted: view.compacted,
            last_slot: view.last_slot,
        }))
    }
}

/// A log value for people: `no-op`, or one line per command (what it
/// does, and its request id).
fn describe_value(value: &Value) -> Vec<String> {
    match value {
        Value::Noop => vec!["no-op".to_string()],
        Value::Batch(commands) => commands
            .iter()
            .map(|bytes| match kv::Command::decode(bytes) {
                Ok(c) => format!(
                    "{:?} {:?} (client {} sequence {})",
                    c.op, c.key, c.client_id, c.sequence
                ),
                Err(e) => format!("undecodable command ({} bytes): {e}", bytes.len()),
            })
            .collect(),
    }
}
