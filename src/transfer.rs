//! Snapshot transfer between replicas over `paxoskv.v1.Paxos/Snapshot`: the
//! serving side streams its state machine as of its applied index, the
//! fetching side builds an install from the chunks.
//!
//! The storage does the hard parts: a reader consistent at one applied
//! index while applies go on, and an install that is switched in
//! atomically only once it matches the sender's digest. This module only
//! moves chunks, and runs the storage's blocking calls off the async
//! threads.

use std::fmt;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::transport::Endpoint;
use tonic::{Request, Response, Status};

use crate::dial::DialError;
use crate::paxos::{NodeId, Slot};
use crate::pb;
use crate::pb::paxos_client::PaxosClient;
use crate::storage::{Digest, SnapshotChunk, SnapshotInstall, SnapshotMeta, Storage};

/// Chunks encoded ahead of the network, per transfer.
const CHUNKS_AHEAD: usize = 2;
/// Largest message either side accepts: a chunk is about 1 MiB of entries
/// ([`crate::storage::CHUNK_BYTES`]), plus framing.
pub const MAX_CHUNK_MESSAGE: usize = 8 << 20;

/// The stream a `Snapshot` call answers with.
pub type ChunkStream = ReceiverStream<Result<pb::SnapshotChunk, Status>>;

/// Serves one `Snapshot` call from `storage`: a header, then every chunk.
pub async fn serve(
    storage: Arc<Storage>,
    request: Request<pb::SnapshotRequest>,
) -> Result<Response<ChunkStream>, Status> {
    let pb::SnapshotRequest { from, min_index } = request.into_inner();
    let reader = tokio::task::spawn_blocking(move || storage.snapshot_reader())
        .await
        .map_err(|e| Status::internal(format!("snapshot task: {e}")))?
        .map_err(|e| Status::internal(format!("cannot read a snapshot: {e}")))?;
    let meta = reader.meta();
    if meta.applied < min_index {
        return Err(Status::failed_precondition(format!(
            "this replica has applied up to slot {}, below the {min_index} asked for",
            meta.applied
        )));
    }
    tracing::info!(
        to = from,
        applied = meta.applied,
        entries = meta.digest.entries,
        "sending a snapshot"
    );
    let (tx, rx) = mpsc::channel(CHUNKS_AHEAD);
    tokio::task::spawn_blocking(move || {
        let header = pb::SnapshotHeader {
            applied: meta.applied,
            entries: meta.digest.entries,
            digest: meta.digest.sum,
        };
        let mut first = Some(header);
        let mut reader = reader;
        loop {
            let next = match reader.next_chunk() {
                Ok(Some(chunk)) => Ok(chunk_to_pb(first.take(), chunk)),
                // An empty state still sends its header.
                Ok(None) if first.is_some() => Ok(chunk_to_pb(
                    first.take(),
                    SnapshotChunk {
                        kv: Vec::new(),
                        sessions: Vec::new(),
                    },
                )),
                Ok(None) => return,
                Err(e) => Err(Status::internal(format!("reading the snapshot: {e}"))),
            };
            let failed = next.is_err();
            // The caller went away: stop reading.
            if tx.blocking_send(next).is_err() || failed {
                return;
            }
        }
    });
    Ok(Response::new(ReceiverStream::new(rx)))
}

/// A replica to fetch a snapshot from: dialled and introduced as the
/// transport's streams are (see [`crate::transport::Transport::snapshot_source`]).
#[derive(Clone, Debug)]
pub struct Source {
    /// Its peer address, as configured (for messages).
    pub address: String,
    /// How to reach it (plaintext or TLS), or why it cannot be.
    pub endpoint: Result<Endpoint, DialError>,
    /// The metadata the call opens with: this replica's id and cluster.
    pub hello: MetadataMap,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.address)
    }
}

/// Fetches a snapshot covering at least `min_index` from `endpoint`, into
/// a new install in `storage`. Returns the install, ready for
/// [`Storage::finish_install`], and what it must match.
pub async fn fetch(
    storage: Arc<Storage>,
    me: NodeId,
    endpoint: &Source,
    min_index: Slot,
) -> Result<(SnapshotInstall, SnapshotMeta), String> {
    let channel = endpoint
        .endpoint
        .clone()
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connecting to {endpoint}: {}", error_chain(&e)))?;
    let mut client = PaxosClient::new(channel).max_decoding_message_size(MAX_CHUNK_MESSAGE);
    let mut request = Request::new(pb::SnapshotRequest {
        from: me,
        min_index,
    });
    *request.metadata_mut() = endpoint.hello.clone();
    let mut chunks = client
        .snapshot(request)
        .await
        .map_err(|s| format!("asking {endpoint} for a snapshot: {}", s.message()))?
        .into_inner();
    let received = |s: Status| format!("receiving the snapshot from {endpoint}: {}", s.message());
    let first = chunks
        .message()
        .await
        .map_err(received)?
        .ok_or_else(|| format!("{endpoint} sent an empty snapshot"))?;
    let header = first
        .header
        .ok_or_else(|| format!("{endpoint}'s snapshot has no header"))?;
    let meta = SnapshotMeta {
        applied: header.applied,
        digest: Digest {
            entries: header.entries,
            sum: header.digest,
        },
    };
    if meta.applied < min_index {
        return Err(format!(
            "{endpoint} sent a snapshot at {}, below the {min_index} asked for",
            meta.applied
        ));
    }
    let applied = meta.applied;
    let mut install = blocking(storage.clone(), move |s| s.begin_install(applied)).await?;
    let mut next = Some(first);
    while let Some(message) = next {
        let chunk = chunk_from_pb(message);
        install = tokio::task::spawn_blocking(move || {
            install
                .add_chunk(&chunk)
                .map(|()| install)
                .map_err(|e| format!("installing the snapshot: {e}"))
        })
        .await
        .map_err(|e| format!("install task: {e}"))??;
        next = chunks.message().await.map_err(received)?;
    }
    Ok((install, meta))
}

/// An error and its causes, as one line (a transport error alone says
/// little more than "transport error").
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

async fn blocking<T: Send + 'static>(
    storage: Arc<Storage>,
    f: impl FnOnce(&Storage) -> Result<T, crate::storage::StorageError> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(move || f(&storage).map_err(|e| e.to_string()))
        .await
        .map_err(|e| format!("storage task: {e}"))?
}

fn chunk_to_pb(header: Option<pb::SnapshotHeader>, chunk: SnapshotChunk) -> pb::SnapshotChunk {
    pb::SnapshotChunk {
        header,
        kv: chunk
            .kv
            .into_iter()
            .map(|(key, value)| pb::SnapshotEntry { key, value })
            .collect(),
        sessions: chunk
            .sessions
            .into_iter()
            .map(|(client_id, session)| pb::SnapshotSession { client_id, session })
            .collect(),
    }
}

/// A received chunk as the storage takes it. Whatever the bytes, nothing
/// is trusted here: the install checks every entry it decodes and, at the
/// end, the whole against the header's digest.
fn chunk_from_pb(chunk: pb::SnapshotChunk) -> SnapshotChunk {
    SnapshotChunk {
        kv: chunk.kv.into_iter().map(|e| (e.key, e.value)).collect(),
        sessions: chunk
            .sessions
            .into_iter()
            .map(|s| (s.client_id, s.session))
            .collect(),
    }
}
