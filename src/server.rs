//! One replica, assembled: storage, core, node, transport, and the gRPC
//! server that carries the client API, the replica service, health and
//! reflection on one address.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::admin::AdminService;
use crate::listener::{self, Limits};
use crate::node::Node;
use crate::paxos::{self, NodeId, Replica};
use crate::pb;
use crate::service::KvService;
use crate::storage::Storage;
use crate::storage::identity::{self, Identity};
use crate::transport::{PaxosService, Transport};

/// How to run a replica.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// This replica's id; must be a key of `peers`.
    pub id: NodeId,
    /// Where to serve gRPC.
    pub listen: SocketAddr,
    /// Every replica's gRPC address, this one included.
    pub peers: BTreeMap<NodeId, String>,
    /// sled's directory.
    pub data_dir: PathBuf,
    /// The core's clock period.
    pub tick: Duration,
    /// sled's cache size.
    pub cache_bytes: u64,
    /// Size of each new Paxos log segment.
    pub log_segment_bytes: u64,
    /// When to checkpoint and how much log to keep.
    pub snapshots: crate::node::SnapshotPolicy,
    /// How long in-flight calls get to finish after SIGTERM.
    pub drain: Duration,
    /// Where to serve Prometheus metrics (`/metrics`), if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// The cluster's name: the data directory must be this cluster's (see
    /// [`crate::storage::identity`]).
    pub cluster_name: String,
    /// Fault injection, for tests: after this many log syncs, every sync
    /// fails (see [`Storage::fail_syncs_after`]).
    pub fail_syncs_after: Option<u64>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Client connections a replica holds, within what its file descriptors
/// allow: [`Limits::CLIENTS`], less [`RESERVED_FDS`] below the descriptor
/// limit, so that clients can never take what the log, the state machine
/// and the peer streams need.
fn client_limits(fd_limit: Option<u64>) -> Limits {
    let mut limits = Limits::CLIENTS;
    if let Some(fds) = fd_limit {
        let room = fds.saturating_sub(RESERVED_FDS).max(16);
        limits.max_connections = limits.max_connections.min(room as usize);
    }
    limits
}

/// File descriptors kept back from client connections.
pub const RESERVED_FDS: u64 = 256;

/// HTTP/2 streams (calls) at once on one connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 256;

/// Runs the replica until `shutdown` resolves (in `paxoskv serve`: SIGTERM
/// or SIGINT), then stops taking calls, lets those in flight finish (up to
/// `drain`), flushes and returns.
pub async fn serve(
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), BoxError> {
    if !opts.peers.contains_key(&opts.id) {
        return Err(format!(
            "--id {} is not among --peers {:?}",
            opts.id,
            opts.peers.keys().collect::<Vec<_>>()
        )
        .into());
    }
    // `main.rs` checks these when parsing; a server assembled another way
    // fails here, at start, rather than when it first dials the peer.
    for (id, addr) in &opts.peers {
        crate::dial::endpoint(addr).map_err(|e| format!("--peers: replica {id}: {e}"))?;
    }
    if let Some(addr) = opts.metrics_listen {
        crate::metrics::install(addr)?;
    }
    let identity = Identity {
        cluster: opts.cluster_name.clone(),
        replica: opts.id,
    };
    if identity::check_or_record(&opts.data_dir, &identity)? == identity::Found::Recorded {
        info!(replica = opts.id, cluster = %opts.cluster_name, data_dir = %opts.data_dir.display(), "recorded this replica's identity in its data directory");
    }
    let (storage, durable) =
        Storage::open_with(&opts.data_dir, opts.cache_bytes, opts.log_segment_bytes)?;
    if let Some(n) = opts.fail_syncs_after {
        warn!(
            replica = opts.id,
            syncs = n,
            "fault injection: every log sync after this many fails"
        );
        storage.fail_syncs_after(n);
    }
    let storage = Arc::new(storage);
    info!(
        replica = opts.id,
        data_dir = %opts.data_dir.display(),
        promised = %durable.promised,
        votes = durable.votes.len(),
        applied = durable.applied,
        "restored"
    );
    let mut cfg = paxos::Config::new(opts.id, opts.peers.keys().copied().collect());
    let now_nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    cfg.seed = now_nanos ^ u64::from(opts.id);
    let membership = match durable.membership {
        Some(m) => Some(m),
        None if durable.promised == paxos::Ballot::ZERO
            && durable.votes.is_empty()
            && durable.applied == 0 =>
        {
            info!(
                replica = opts.id,
                "empty data directory: asking the peers whether this is a new cluster or a rejoin"
            );
            None
        }
        // State without a membership record: the log was lost or replaced,
        // so promises may have been forgotten. Never vote on that.
        None => {
            warn!(
                replica = opts.id,
                data_dir = %opts.data_dir.display(),
                "the data directory holds state but its log has no membership record (log lost?); rejoining as a non-voting learner"
            );
            Some(paxos::Membership::Learner)
        }
    };
    let restore = paxos::Restore {
        promised: durable.promised,
        votes: durable.votes,
        applied: durable.applied,
        snapshot: durable.compacted,
        membership,
        // Per incarnation: answers to an earlier one's probes and catch-up
        // requests must not count.
        nonce: now_nanos.rotate_left(17) ^ u64::from(std::process::id()),
    };
    let replica = Replica::new(cfg, restore)?;

    let fd_limit = listener::raise_fd_limit();
    let clients = client_limits(fd_limit);
    info!(
        replica = opts.id,
        fd_limit = ?fd_limit,
        max_client_connections = clients.max_connections,
        "limits"
    );
    let listener = TcpListener::bind(opts.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", opts.listen))?;

    let (peer_tx, peer_rx) = mpsc::channel(64 * 1024);
    let others = opts
        .peers
        .iter()
        .filter(|(id, _)| **id != opts.id)
        .map(|(id, a)| (*id, a.clone()))
        .collect();
    let transport = Transport::start(opts.id, others);
    let (node, handle) = Node::new(
        replica,
        Arc::clone(&storage),
        transport,
        peer_rx,
        opts.tick,
        opts.snapshots,
    );
    let (stop_node, node_stopped) = watch::channel(false);
    let mut node_task = tokio::spawn(node.run(node_stopped));

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<pb::kv_store_server::KvStoreServer<KvService>>()
        .await;
    // A replica whose storage failed serves nothing: say so to health
    // checks (the whole server, "", and the KV service).
    let mut failure = handle.watch_failure();
    let failed_health = health.clone();
    tokio::spawn(async move {
        if failure.wait_for(Option::is_some).await.is_ok() {
            failed_health
                .set_not_serving::<pb::kv_store_server::KvStoreServer<KvService>>()
                .await;
            failed_health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
        }
    });
    // Each reflection service describes itself; give each the other's
    // descriptor too, so both versions list every service.
    let reflection = |other_reflection_version| {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(other_reflection_version)
    };
    let (stop_server, server_stopped) = watch::channel(false);
    let mut server_stopped_rx = server_stopped.clone();
    let server = tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health_service)
        .add_service(reflection(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET).build_v1()?)
        .add_service(reflection(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET).build_v1alpha()?)
        .add_service(AdminService::new(handle.clone(), opts.peers.clone()).into_server())
        .add_service(KvService::new(handle, opts.peers.clone()).into_server())
        .add_service(
            PaxosService::new(peer_tx)
                .with_shutdown(server_stopped.clone())
                .with_snapshots(Arc::clone(&storage))
                .into_server(),
        )
        .serve_with_incoming_shutdown(
            listener::incoming(listener, clients, "clients"),
            async move {
                let _ = server_stopped_rx.changed().await;
            },
        );
    let mut server_task = tokio::spawn(server);
    info!(replica = opts.id, listen = %opts.listen, "serving");

    // Run until told to stop, or until the node or the server fails on its
    // own.
    tokio::select! {
        () = shutdown => info!(replica = opts.id, "shutting down"),
        result = &mut node_task => {
            let _ = stop_server.send(true);
            return match result {
                Ok(Ok(())) => Err("node stopped unexpectedly".into()),
                Ok(Err(failure)) => Err(failure.into()),
                Err(e) => Err(e.into()),
            };
        }
        result = &mut server_task => {
            let _ = stop_node.send(true);
            return match result {
                Ok(Ok(())) => Err("gRPC server stopped unexpectedly".into()),
                Ok(Err(e)) => Err(e.into()),
                Err(e) => Err(e.into()),
            };
        }
    }
    drop(server_stopped);

    // Stop taking calls; calls in flight still have the node to finish on.
    health
        .set_not_serving::<pb::kv_store_server::KvStoreServer<KvService>>()
        .await;
    let _ = stop_server.send(true);
    // Peer streams never end on their own, so graceful shutdown is bounded.
    if tokio::time::timeout(opts.drain, &mut server_task)
        .await
        .is_err()
    {
        server_task.abort();
    }
    let _ = stop_node.send(true);
    let node_result = match node_task.await {
        Ok(result) => result.map_err(BoxError::from),
        Err(e) => Err(format!("node task: {e}").into()),
    };
    // Even after a failure: what the state machine holds is consistent,
    // and the log's damage (if any) is found by the next start's scan.
    storage.flush()?;
    info!(replica = opts.id, "stopped");
    node_result
}
