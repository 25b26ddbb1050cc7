//! The command-line client: one call to one replica, printed for a person,
//! with an exit code for a script.

use std::time::Duration;

use tonic::transport::Endpoint;
use tonic::{Code, Request, Status};

use crate::pb;
use crate::pb::kv_store_client::KvStoreClient;

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

/// Makes the call against `endpoint` (host:port) and returns what to print
/// on success.
pub async fn run(endpoint: &str, timeout: Duration, call: Call) -> Result<String, Status> {
    let url = if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    };
    let channel = Endpoint::from_shared(url)
        .map_err(|e| Status::invalid_argument(format!("bad --endpoint {endpoint:?}: {e}")))?
        .connect_timeout(timeout)
        .connect()
        .await
        .map_err(|e| Status::unavailable(format!("cannot connect to {endpoint}: {e}")))?;
    let mut client = KvStoreClient::new(channel);
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

fn with_deadline<T>(message: T, timeout: Duration) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(timeout);
    request
}
