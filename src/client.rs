//! The command-line client: one call to one replica, printed for a person,
//! with an exit code for a script.

use std::collections::BTreeMap;
use std::time::Duration;

use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use crate::dial::Dialer;
use crate::pb;
use crate::pb::admin_client::AdminClient;
use crate::pb::kv_store_client::KvStoreClient;
use crate::service::Unavailable;

/// One client call.
#[derive(Clone, Debug)]
pub enum Call {
    /// Reads a key.
    Get { key: String },
    /// Adds a key that must be absent.
    Insert { key: String, value: i32 },
    /// Changes a key that must be present.
    Update { key: String, value: i32 },
    /// Inserts or updates.
    Upsert { key: String, value: i32 },
    /// Deletes a key that must be present.
    Remove { key: String },
}

/// Exit codes, one per outcome a script may want to tell apart.
pub mod exit {
    /// The call succeeded.
    pub const OK: i32 = 0;
    /// Anything not listed below.
    pub const OTHER: i32 = 1;
    /// NOT_FOUND: the key is absent.
    pub const NOT_FOUND: i32 = 3;
    /// ALREADY_EXISTS: the key is present.
    pub const ALREADY_EXISTS: i32 = 4;
    /// INVALID_ARGUMENT: the request was malformed.
    pub const INVALID_ARGUMENT: i32 = 5;
    /// UNAVAILABLE or DEADLINE_EXCEEDED: no answer from a quorum in time.
    pub const UNAVAILABLE: i32 = 6;
}

/// The exit code for a gRPC status.
pub fn exit_code(status: &Status) -> i32 {
    match status.code() {
        Code::NotFound => exit::NOT_FOUND,
        Code::AlreadyExists => exit::ALREADY_EXISTS,
        Code::InvalidArgument => exit::INVALID_ARGUMENT,
        Code::Unavailable | Code::DeadlineExceeded => exit::UNAVAILABLE,
        _ => exit::OTHER,
    }
}

/// Connects to the replica at `address` (any form [`Dialer::endpoint`]
/// accepts) with `dialer` (plaintext or TLS), allowing the connect the
/// call's whole `timeout`.
async fn connect(dialer: &Dialer, address: &str, timeout: Duration) -> Result<Channel, Status> {
    dialer
        .endpoint(address)
        .map_err(|e| Status::invalid_argument(e.to_string()))?
        .connect_timeout(timeout)
        .connect()
        .await
        .map_err(|e| {
            Status::unavailable(format!("cannot connect to {address}: {}", error_chain(&e)))
        })
}

/// Makes the call against `endpoint` (`host:port`, or `http://host:port`
/// or `https://host:port` as `dialer` speaks plaintext or TLS) and returns
/// what to print on success.
pub async fn run(
    dialer: &Dialer,
    endpoint: &str,
    timeout: Duration,
    call: Call,
) -> Result<String, Status> {
    let client = KvStoreClient::new(connect(dialer, endpoint, timeout).await?);
    make(client, timeout, call)
        .await
        .map_err(|status| explained(dialer, status))
}

/// A plaintext call to a port that serves TLS fails deep in HTTP/2 (the
/// server's TLS alert is no HTTP/2 frame); say what is the likely cause.
fn explained(dialer: &Dialer, status: Status) -> Status {
    if !dialer.is_tls() && status.message().contains("h2 protocol error") {
        let message = format!(
            "{}: the replica may be serving TLS; give --tls-cert, --tls-key and --tls-ca",
            status.message()
        );
        return Status::new(status.code(), message);
    }
    status
}

async fn make(
    mut client: KvStoreClient<Channel>,
    timeout: Duration,
    call: Call,
) -> Result<String, Status> {
    Ok(match call {
        Call::Get { key } => client
            .get(with_deadline(pb::GetRequest { key }, timeout))
            .await?
            .into_inner()
            .value
            .to_string(),
        Call::Insert { key, value } => {
            let msg = pb::InsertRequest {
                key: key.clone(),
                value: Some(value),
                request_id: None,
            };
            client.insert(with_deadline(msg, timeout)).await?;
            format!("inserted {key} = {value}")
        }
        Call::Update { key, value } => {
            let msg = pb::UpdateRequest {
                key: key.clone(),
                value: Some(value),
                request_id: None,
            };
            let previous = client
                .update(with_deadline(msg, timeout))
                .await?
                .into_inner()
                .previous;
            format!("updated {key} = {value} (was {previous})")
        }
        Call::Upsert { key, value } => {
            let msg = pb::UpsertRequest {
                key: key.clone(),
                value: Some(value),
                request_id: None,
            };
            let inserted = client
                .upsert(with_deadline(msg, timeout))
                .await?
                .into_inner()
                .inserted;
            format!(
                "{} {key} = {value}",
                if inserted { "inserted" } else { "updated" }
            )
        }
        Call::Remove { key } => {
            let msg = pb::RemoveRequest {
                key: key.clone(),
                request_id: None,
            };
            let previous = client
                .remove(with_deadline(msg, timeout))
                .await?
                .into_inner()
                .previous;
            format!("removed {key} (was {previous})")
        }
    })
}

/// An error and its causes, as one line: a TLS failure is only in the
/// causes of tonic's "transport error".
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn with_deadline<T>(message: T, timeout: Duration) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(timeout);
    request
}

/// One replica's line in `paxoskv status`.
struct Row {
    id: u32,
    /// Where clients (and so this command) reach it, once some replica
    /// has told us.
    client: Option<String>,
    /// Where the other replicas reach it.
    peer: String,
    /// Its own view, if it was asked and answered.
    status: Option<pb::StatusResponse>,
    /// Whether it was asked.
    asked: bool,
    /// It answered that its storage failed.
    storage_failed: bool,
}

/// Asks `endpoint` for the cluster's members, then every member for its
/// status at its client address, and renders a table. Returns the table
/// and, if the cluster is not healthy (no leader, or fewer than a majority
/// answering), why.
///
/// A replica knows a peer's client address once that peer's Paxos stream
/// to it has opened; an address the first replica does not know is looked
/// for in the answers of the others.
pub async fn cluster_status(
    dialer: &Dialer,
    endpoint: &str,
    timeout: Duration,
) -> Result<(String, Option<String>), Status> {
    let first = admin_status(dialer, endpoint, timeout).await?;
    let mut rows: BTreeMap<u32, Row> = first
        .peers
        .iter()
        .map(|p| {
            let row = Row {
                id: p.id,
                client: known(&p.client_address),
                peer: p.peer_address.clone(),
                status: None,
                asked: false,
                storage_failed: false,
            };
            (p.id, row)
        })
        .collect();
    if let Some(row) = rows.get_mut(&first.id) {
        row.status = Some(first.clone());
        row.asked = true;
    }
    loop {
        let calls: Vec<_> = rows
            .values_mut()
            .filter(|r| !r.asked)
            .filter_map(|r| {
                let address = r.client.clone()?;
                r.asked = true;
                let id = r.id;
                let dialer = dialer.clone();
                Some(async move { (id, admin_status(&dialer, &address, timeout).await) })
            })
            .collect();
        if calls.is_empty() {
            break;
        }
        for (id, status) in futures_join_all(calls).await {
            let status = match status {
                Ok(status) => status,
                Err(e) => {
                    if let Some(row) = rows.get_mut(&id) {
                        row.storage_failed =
                            Unavailable::of(&e) == Some(Unavailable::StorageFailed);
                    }
                    continue;
                }
            };
            for p in &status.peers {
                if let Some(row) = rows.get_mut(&p.id)
                    && row.client.is_none()
                {
                    row.client = known(&p.client_address);
                }
            }
            if let Some(row) = rows.get_mut(&id) {
                row.status = Some(status);
            }
        }
    }
    let rows: Vec<Row> = rows.into_values().collect();
    let leader = rows
        .iter()
        .filter_map(|r| r.status.as_ref())
        .filter(|s| s.role == "leader")
        .max_by_key(|s| (s.ballot_round, s.ballot_node))
        .cloned();
    let mut out = format!(
        "{:<4} {:<21} {:<21} {:<10} {:<9} {:>10} {:>10} {:>10} {:>6} {:>13}\n",
        "ID",
        "CLIENT",
        "PEER",
        "ROLE",
        "BALLOT",
        "COMMITTED",
        "APPLIED",
        "SNAPSHOT",
        "LAG",
        "LAST CONTACT"
    );
    for row in &rows {
        let client = row.client.as_deref().unwrap_or("-");
        let Some(s) = &row.status else {
            // Asked and silent, or never asked: no replica knew where its
            // clients reach it.
            let what = match (row.asked, row.storage_failed) {
                (true, true) => "storage failed: restart it once its disk is fixed",
                (true, false) => "unreachable",
                (false, _) => "unknown",
            };
            out += &format!(
                "{:<4} {:<21} {:<21} {:<10}\n",
                row.id, client, row.peer, what
            );
            continue;
        };
        let lag = leader.as_ref().map_or("-".to_string(), |l| {
            l.committed.saturating_sub(s.applied).to_string()
        });
        let contact = match &leader {
            Some(l) if l.id == s.id => "leader".to_string(),
            Some(l) => l
                .peers
                .iter()
                .find(|p| p.id == s.id)
                .map_or("-".to_string(), |p| format!("{} ms ago", p.silent_ms)),
            None => "-".to_string(),
        };
        out += &format!(
            "{:<4} {:<21} {:<21} {:<10} {:<9} {:>10} {:>10} {:>10} {:>6} {:>13}\n",
            s.id,
            client,
            row.peer,
            s.role,
            format!("{}.{}", s.ballot_round, s.ballot_node),
            s.committed,
            s.applied,
            s.snapshot,
            lag,
            contact
        );
    }
    let answering = rows.iter().filter(|r| r.status.is_some()).count();
    let majority = rows.len() / 2 + 1;
    let problem = if answering < majority {
        Some(format!(
            "no quorum: {answering} of {} replicas answer, {majority} needed",
            rows.len()
        ))
    } else if leader.is_none() {
        Some("no leader".to_string())
    } else {
        None
    };
    Ok((out, problem))
}

/// An address from a status answer: `None` when empty (not known there).
fn known(address: &str) -> Option<String> {
    (!address.is_empty()).then(|| address.to_string())
}

async fn admin_status(
    dialer: &Dialer,
    endpoint: &str,
    timeout: Duration,
) -> Result<pb::StatusResponse, Status> {
    let response = AdminClient::new(connect(dialer, endpoint, timeout).await?)
        .status(with_deadline(pb::StatusRequest {}, timeout))
        .await
        .map_err(|status| explained(dialer, status))?;
    Ok(response.into_inner())
}

/// One replica's acceptor, for people: its promise and its vote for
/// `slot` (`paxoskv acceptor SLOT`).
pub async fn acceptor(
    dialer: &Dialer,
    endpoint: &str,
    slot: u64,
    timeout: Duration,
) -> Result<String, Status> {
    let a = AdminClient::new(connect(dialer, endpoint, timeout).await?)
        .acceptor(with_deadline(pb::AcceptorRequest { slot }, timeout))
        .await?
        .into_inner();
    let mut out = format!(
        "replica {}: promised {}.{}; votes up to slot {}; compacted through {}\n",
        a.id, a.promised_round, a.promised_node, a.last_slot, a.compacted
    );
    out += &match a.vote.as_str() {
        "voted" => format!(
            "slot {}: voted in ballot {}.{} for\n{}",
            a.slot,
            a.vote_round,
            a.vote_node,
            a.commands
                .iter()
                .map(|c| format!("  {c}\n"))
                .collect::<String>()
        ),
        "compacted" => format!(
            "slot {}: compacted (chosen, and in the state machine's snapshot; its vote is gone)\n",
            a.slot
        ),
        _ => format!("slot {}: no vote here\n", a.slot),
    };
    Ok(out)
}

/// Awaits every future concurrently, keeping their order.
async fn futures_join_all<F>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}
