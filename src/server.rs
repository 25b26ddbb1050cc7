//! One replica, assembled: storage, core, node, transport, and two gRPC
//! servers, as etcd has its client and peer URLs:
//!
//! - the **client port** (`--listen`): the client API (`KvStore`), `Admin`,
//!   health and reflection;
//! - the **peer port** (`--peer-listen`): the replica protocol
//!   (`paxoskv.v1.Paxos`: the Paxos streams, snapshots, forwarded calls)
//!   and nothing else;
//! - if asked for (`--http-listen`), the **HTTP port**: the client API as
//!   HTTP/JSON ([`crate::http`]), made through the client port's own
//!   `KvService`.
//!
//! Whoever can send Paxos messages to an acceptor can make it promise or
//! accept anything, so the replica protocol is not served where clients
//! connect; operators keep the peer port reachable by the replicas alone.
//! With TLS ([`ServeOptions::tls`]) both ports require a client certificate
//! from the cluster's CA, and the peer port takes calls only from the other
//! replicas' certificates (see [`crate::handshake`]).
//!
//! Optionally a third, the **health port** (`--health-listen`): the
//! standard health service alone (and reflection describing only it),
//! always in plaintext, as the metrics port is, for probes that present no
//! certificate (Kubernetes' gRPC probes). What health says is
//! [`crate::readiness`]'s.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::admin::AdminService;
use crate::dial::Dialer;
use crate::directory::Directory;
use crate::listener::{self, Limits};
use crate::metrics as m;
use crate::node::{Node, NodeHandle};
use crate::paxos::{self, HandOffError, NodeId, Replica};
use crate::pb;
use crate::service::KvService;
use crate::storage::Storage;
use crate::storage::identity::{self, Identity};
use crate::tls::{self, Holder, TlsConfig};
use crate::transport::{Forwarded, NotOnThisPort, PaxosService, Transport};

/// How to run a replica.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// This replica's id; must be a key of `peers`.
    pub id: NodeId,
    /// Where to serve clients: KvStore, Admin, health, reflection.
    pub listen: SocketAddr,
    /// Where to serve the other replicas: `paxoskv.v1.Paxos` only. Must
    /// match this replica's entry in `peers`.
    pub peer_listen: SocketAddr,
    /// Where clients reach this replica, as told to the other replicas and
    /// shown in status; `listen` if unset (which must then be a specific
    /// address, not 0.0.0.0 or `[::]`).
    pub advertise_client: Option<String>,
    /// Every replica's peer address, this one included.
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
    /// How many calls may wait on this replica before it refuses more
    /// (`RESOURCE_EXHAUSTED`).
    pub limits: crate::driver::Limits,
    /// Where to serve Prometheus metrics (`/metrics`), if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Where to serve the client API as HTTP/JSON ([`crate::http`]), if
    /// anywhere; HTTPS with the same mutual TLS as the client port when
    /// `tls` is set.
    pub http_listen: Option<SocketAddr>,
    /// Where to serve the health service alone, in plaintext even with
    /// TLS, if anywhere (for Kubernetes' gRPC probes).
    pub health_listen: Option<SocketAddr>,
    /// The cluster's name: the data directory must be this cluster's (see
    /// [`crate::storage::identity`]).
    pub cluster_name: String,
    /// Fault injection, for tests: after this many log syncs, every sync
    /// fails (see [`Storage::fail_syncs_after`]).
    pub fail_syncs_after: Option<u64>,
    /// A deliberate bug, for `paxoskv check --break` only (see
    /// [`crate::node::TestBug`]); `None` in every real use.
    pub test_bug: Option<crate::node::TestBug>,
    /// Mutual TLS on both ports and between replicas, if set; this
    /// replica's certificate must name it (`paxoskv-replica-ID`, see
    /// [`crate::tls`]).
    pub tls: Option<TlsConfig>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl ServeOptions {
    /// Where clients reach this replica: `advertise_client`, or `listen`.
    pub fn client_address(&self) -> String {
        match &self.advertise_client {
            Some(address) => address.trim().to_string(),
            None => self.listen.to_string(),
        }
    }

    /// How this replica dials its peers: with TLS if it has it.
    pub fn dialer(&self) -> Dialer {
        Dialer::for_config(self.tls.as_ref())
    }

    /// Refuses a configuration that cannot work, with a message that names
    /// the flag and the value at fault: an address that does not parse (or
    /// whose scheme is not the one TLS calls for), `--id` not in `--peers`,
    /// two replicas with one peer address, the client and peer ports
    /// overlapping, `--peer-listen` not matching this replica's own
    /// `--peers` entry, no address clients can dial, or a `--tls-cert`
    /// that does not name this replica.
    pub fn check(&self) -> Result<(), String> {
        let dialer = self.dialer();
        let normalize = |addr: &str| dialer.normalize(addr);
        for (id, addr) in &self.peers {
            normalize(addr).map_err(|e| format!("--peers: replica {id}: {e}"))?;
        }
        let Some(own) = self.peers.get(&self.id) else {
            return Err(format!(
                "--id {} is not among --peers (replicas {})",
                self.id,
                self.peers
                    .keys()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        };
        let mut seen: BTreeMap<String, NodeId> = BTreeMap::new();
        for (&id, addr) in &self.peers {
            let key = normalize(addr)
                .map_err(|e| format!("--peers: replica {id}: {e}"))?
                .to_ascii_lowercase();
            if let Some(other) = seen.insert(key, id) {
                return Err(format!(
                    "--peers: replicas {other} and {id} have the same peer address {}",
                    addr.trim()
                ));
            }
        }
        if overlap(self.listen, self.peer_listen) {
            return Err(format!(
                "--listen {} and --peer-listen {} are the same address: clients and peers need a port each",
                self.listen, self.peer_listen
            ));
        }
        // Each listener needs a port of its own.
        let fixed = [
            ("--listen", Some(self.listen)),
            ("--peer-listen", Some(self.peer_listen)),
            ("--metrics-listen", self.metrics_listen),
        ];
        for (flag, addr, why) in [
            (
                "--http-listen",
                self.http_listen,
                "each needs a port of its own",
            ),
            (
                "--health-listen",
                self.health_listen,
                "health probes need a port of their own",
            ),
        ] {
            let Some(addr) = addr else { continue };
            if let Some((other_flag, other)) = fixed
                .iter()
                .find_map(|&(f, a)| a.filter(|&a| overlap(a, addr)).map(|a| (f, a)))
            {
                return Err(format!(
                    "{flag} {addr} and {other_flag} {other} are the same address: {why}"
                ));
            }
        }
        if let (Some(http), Some(health)) = (self.http_listen, self.health_listen)
            && overlap(http, health)
        {
            return Err(format!(
                "--http-listen {http} and --health-listen {health} are the same address: each needs a port of its own"
            ));
        }
        self.check_own_peer_entry(own)?;
        match &self.advertise_client {
            Some(address) => {
                let uri = normalize(address).map_err(|e| format!("--advertise-client: {e}"))?;
                let peer = self
                    .peers
                    .iter()
                    .find(|(_, a)| normalize(a).is_ok_and(|a| a.eq_ignore_ascii_case(&uri)));
                if let Some((id, _)) = peer {
                    return Err(format!(
                        "--advertise-client {} is replica {id}'s peer address in --peers: clients would be sent to a peer port",
                        address.trim()
                    ));
                }
            }
            None if self.listen.ip().is_unspecified() => {
                return Err(format!(
                    "--listen {} is an unspecified address, which no client can dial: give --advertise-client HOST:PORT, where clients reach this replica",
                    self.listen
                ));
            }
            None => {}
        }
        if let Some(tls) = &self.tls {
            // Peers know a replica by its certificate: one that names
            // another replica (or a client) would be refused by all of
            // them, so refuse it here, where the cause is plain.
            let holder = tls.holder();
            if *holder != Holder::Replica(self.id) {
                return Err(format!(
                    "--tls-cert {} names {holder}, but this is replica {}: a replica's certificate must have the Common Name {}",
                    tls.files().cert.display(),
                    self.id,
                    tls::replica_common_name(self.id)
                ));
            }
        }
        Ok(())
    }

    /// `--peer-listen` must be where the others dial this replica: the same
    /// port as its `--peers` entry and, unless it listens on every address
    /// (0.0.0.0 or [::]), the same host. A host name in `--peers` is
    /// resolved and must include the listening address; one that does not
    /// resolve yet (DNS records of a starting pod, say) is let through, as
    /// nothing can be checked.
    fn check_own_peer_entry(&self, own: &str) -> Result<(), String> {
        let mismatch = |why: String| {
            Err(format!(
                "--peer-listen {} does not match this replica's --peers entry {}={}: {why}",
                self.peer_listen,
                self.id,
                own.trim()
            ))
        };
        let (host, port) = host_and_port(&self.dialer(), own)
            .map_err(|e| format!("--peers: replica {}: {e}", self.id))?;
        if port != self.peer_listen.port() {
            return mismatch(format!("port {} is not {port}", self.peer_listen.port()));
        }
        let ip = self.peer_listen.ip();
        if ip.is_unspecified() {
            return Ok(());
        }
        match host.parse::<IpAddr>() {
            Ok(host_ip) if same_ip(host_ip, ip) => Ok(()),
            Ok(host_ip) => mismatch(format!("host {ip} is not {host_ip}")),
            Err(_) => match (host.as_str(), port).to_socket_addrs() {
                Ok(resolved) => {
                    let resolved: Vec<IpAddr> = resolved.map(|a| a.ip()).collect();
                    if resolved.iter().any(|&r| same_ip(r, ip)) {
                        Ok(())
                    } else {
                        mismatch(format!(
                            "{host} resolves to {}, not {ip}",
                            resolved
                                .iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ))
                    }
                }
                Err(_) => Ok(()),
            },
        }
    }
}

/// Whether listening on `a` and on `b` would take the same port: the same
/// port, on the same address or on every address.
fn overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && (a.ip().is_unspecified() || b.ip().is_unspecified() || same_ip(a.ip(), b.ip()))
}

/// IP equality that takes an IPv4-mapped IPv6 address for its IPv4 one.
fn same_ip(a: IpAddr, b: IpAddr) -> bool {
    a.to_canonical() == b.to_canonical()
}

/// The host (without brackets) and port of an address `dialer` accepts.
fn host_and_port(dialer: &Dialer, addr: &str) -> Result<(String, u16), String> {
    let uri: tonic::codegen::http::Uri = dialer
        .normalize(addr)
        .map_err(|e| e.to_string())?
        .parse()
        .map_err(|e| format!("{addr:?}: {e}"))?;
    let host = uri
        .host()
        .ok_or_else(|| format!("{addr:?}: no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().ok_or_else(|| format!("{addr:?}: no port"))?;
    Ok((host, port))
}

/// Client connections a replica holds, within what its file descriptors
/// allow: [`Limits::CLIENTS`], less [`RESERVED_FDS`] below the descriptor
/// limit, so that clients can never take what the log, the state machine
/// and the peer streams need (peers have a listener, and a limit, of their
/// own).
fn client_limits(fd_limit: Option<u64>) -> Limits {
    let mut limits = Limits::CLIENTS;
    if let Some(fds) = fd_limit {
        let room = fds.saturating_sub(RESERVED_FDS).max(16);
        limits.max_connections = limits.max_connections.min(room as usize);
    }
    limits
}

/// Connections the HTTP port holds: [`Limits::HTTP`], and, like the client
/// port's, never more than the descriptors leave room for.
fn http_limits(fd_limit: Option<u64>) -> Limits {
    let mut limits = Limits::HTTP;
    limits.max_connections = limits
        .max_connections
        .min(client_limits(fd_limit).max_connections);
    limits
}

/// File descriptors kept back from client connections.
pub const RESERVED_FDS: u64 = 256;

/// HTTP/2 streams (calls) at once on one client connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 256;

/// Runs the replica until `shutdown` resolves (in `paxoskv serve`: SIGTERM
/// or SIGINT), then stops taking calls, lets those in flight finish (up to
/// `drain`), flushes and returns.
pub async fn serve(
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), BoxError> {
    // `main.rs` checks these before it starts; a server assembled another
    // way fails here, at start, rather than when it first dials a peer.
    opts.check()?;
    // Both ports: TLS, and a client certificate from the CA required.
    let server_builder = || -> Result<tonic::transport::Server, BoxError> {
        let builder = tonic::transport::Server::builder();
        Ok(match &opts.tls {
            Some(tls) => builder
                .tls_config(tls.server())
                .map_err(|e| format!("TLS (--tls-cert, --tls-key, --tls-ca): {e}"))?,
            None => builder,
        })
    };
    let client_builder = server_builder()?;
    let mut peer_builder = server_builder()?;
    if let Some(tls) = &opts.tls {
        info!(
            replica = opts.id,
            cert = %tls.files().cert.display(),
            ca = %tls.files().ca.display(),
            "mutual TLS on both ports and between replicas"
        );
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
        max_peer_connections = Limits::PEERS.max_connections,
        max_http_connections = opts.http_listen.map(|_| http_limits(fd_limit).max_connections),
        "limits"
    );
    let client_listener = TcpListener::bind(opts.listen)
        .await
        .map_err(|e| format!("cannot listen on --listen {}: {e}", opts.listen))?;
    let peer_listener = TcpListener::bind(opts.peer_listen)
        .await
        .map_err(|e| format!("cannot listen on --peer-listen {}: {e}", opts.peer_listen))?;
    // The HTTP port: HTTPS with the client port's mutual TLS, never
    // plaintext when TLS is configured.
    let http_listener = match opts.http_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on --http-listen {addr}: {e}"))?;
            let tls = match &opts.tls {
                Some(tls) => Some(tls.https_server().map_err(|e| {
                    format!("TLS for --http-listen (--tls-cert, --tls-key, --tls-ca): {e}")
                })?),
                None => None,
            };
            Some((listener, tls))
        }
        None => None,
    };
    let health_listener = match opts.health_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on --health-listen {addr}: {e}"))?,
        ),
        None => None,
    };
    let directory = Arc::new(
        Directory::new(opts.id, opts.peers.clone(), opts.client_address())
            .with_cluster(opts.cluster_name.clone())
            .with_dialer(opts.dialer()),
    );
    let (peer_tx, peer_rx) = mpsc::channel(64 * 1024);
    let transport = Transport::for_directory(&directory);
    let (node, handle) = Node::new(
        replica,
        Arc::clone(&storage),
        transport,
        peer_rx,
        opts.tick,
        opts.snapshots,
    )
    .map_err(|e| format!("cannot start the log writer thread: {e}"))?;
    let node = node.with_test_bug(opts.test_bug).with_limits(opts.limits);
    let (stop_node, node_stopped) = watch::channel(false);
    let mut node_task = tokio::spawn(node.run(node_stopped));
    let kv = Arc::new(KvService::new(handle.clone(), Arc::clone(&directory)));
    let handle_for_shutdown = handle.clone();

    // The client port: no Paxos here, and its reflection describes none.
    // Not ready until the readiness task says so.
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_not_serving::<pb::kv_store_server::KvStoreServer<KvService>>()
        .await;
    // Live ("") while the process serves; ready (KvStore) while it has a
    // leader and is caught up; neither once its storage failed.
    let (stop_readiness, readiness_stopped) = watch::channel(false);
    let mut readiness_task = tokio::spawn(crate::readiness::run(
        handle.clone(),
        health.clone(),
        readiness_stopped,
    ));
    // Each reflection service describes itself; give each the other's
    // descriptor too, so both versions list every service.
    let reflection = |other_reflection_version| {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::CLIENT_FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(other_reflection_version)
    };
    let (stop_clients, mut clients_stopped) = watch::channel(false);
    let client_server = client_builder
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health_service.clone())
        .add_service(reflection(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET).build_v1()?)
        .add_service(reflection(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET).build_v1alpha()?)
        .add_service(AdminService::new(handle.clone(), Arc::clone(&directory)).into_server())
        .add_service(KvService::server(Arc::clone(&kv)))
        // Refuses, saying where to go instead; listed by no reflection.
        .add_service(NotOnThisPort.into_server())
        .serve_with_incoming_shutdown(
            listener::incoming(client_listener, clients, "clients"),
            async move {
                let _ = clients_stopped.wait_for(|&stop| stop).await;
            },
        );
    let mut client_task = tokio::spawn(client_server);

    // The peer port: the replica protocol and nothing else.
    let (stop_peers, peers_stopped) = watch::channel(false);
    let mut peer_server_stopped = peers_stopped.clone();
    let peer_server = peer_builder
        .add_service(
            PaxosService::new(peer_tx, Arc::clone(&directory))
                .with_shutdown(peers_stopped)
                .with_snapshots(Arc::clone(&storage))
                .with_forwarding(Arc::clone(&kv) as Arc<dyn Forwarded>)
                .into_server(),
        )
        .serve_with_incoming_shutdown(
            listener::incoming(peer_listener, Limits::PEERS, "peers"),
            async move {
                let _ = peer_server_stopped.wait_for(|&stop| stop).await;
            },
        );
    let mut peer_task = tokio::spawn(peer_server);

    // The HTTP port: the same KvService, so the same calls.
    let (stop_http, http_stopped) = watch::channel(false);
    let mut http_task = http_listener.map(|(listener, tls)| {
        tokio::spawn(crate::http::serve(
            listener,
            http_limits(fd_limit),
            Arc::clone(&kv),
            tls,
            http_stopped,
        ))
    });
    // The health port, if asked for: health alone, plaintext.
    let (stop_probes, mut probes_stopped) = watch::channel(false);
    // Reflection there describes health alone, so that grpcurl works too.
    let probe_reflection = |other_reflection_version| {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(other_reflection_version)
    };
    let probe_reflection_v1 =
        probe_reflection(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET).build_v1()?;
    let probe_reflection_v1alpha =
        probe_reflection(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET).build_v1alpha()?;
    let health_task = health_listener.map(|health_listener| {
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health_service)
                .add_service(probe_reflection_v1)
                .add_service(probe_reflection_v1alpha)
                .serve_with_incoming_shutdown(
                    listener::incoming(health_listener, Limits::PROBES, "health probes"),
                    async move {
                        let _ = probes_stopped.wait_for(|&stop| stop).await;
                    },
                ),
        )
    });
    info!(
        replica = opts.id,
        listen = %opts.listen,
        peer_listen = %opts.peer_listen,
        http_listen = ?opts.http_listen,
        health_listen = ?opts.health_listen,
        client_address = %opts.client_address(),
        "serving"
    );

    let stop_all = || {
        let _ = stop_readiness.send(true);
        let _ = stop_probes.send(true);
        let _ = stop_clients.send(true);
        let _ = stop_http.send(true);
        let _ = stop_peers.send(true);
        let _ = stop_node.send(true);
    };
    // Run until told to stop, or until the node or a server fails on its
    // own.
    tokio::select! {
        () = shutdown => info!(replica = opts.id, "shutting down"),
        result = &mut node_task => {
            stop_all();
            return match result {
                Ok(Ok(())) => Err("node stopped unexpectedly".into()),
                Ok(Err(failure)) => Err(failure.into()),
                Err(e) => Err(e.into()),
            };
        }
        result = &mut client_task => {
            stop_all();
            return Err(server_ended("client", result));
        }
        result = &mut peer_task => {
            stop_all();
            return Err(server_ended("peer", result));
        }
        result = async {
            match &mut http_task {
                Some(task) => task.await,
                None => std::future::pending().await,
            }
        } => {
            stop_all();
            return Err(match result {
                Ok(()) => "the HTTP server stopped unexpectedly".into(),
                Err(e) => Box::new(e),
            });
        }
    }

    // A leader first hands leadership off, so that the cluster need not wait
    // out an election timeout; calls keep coming in meanwhile and go to
    // the next leader (see `hand_off`).
    hand_off(&handle_for_shutdown, opts.id).await;

    // Stop taking calls, and let those in flight finish, here and those
    // forwarded here, while the peer port stays up: a call in flight needs
    // the Paxos streams to reach a quorum. Only then close the peer port
    // (its streams never end on their own, so that is bounded too).
    let deadline = tokio::time::Instant::now() + opts.drain;
    // Readiness stops first, so that nothing says SERVING again.
    let _ = stop_readiness.send(true);
    if tokio::time::timeout(Duration::from_secs(1), &mut readiness_task)
        .await
        .is_err()
    {
        readiness_task.abort();
    }
    health
        .set_not_serving::<pb::kv_store_server::KvStoreServer<KvService>>()
        .await;
    let _ = stop_clients.send(true);
    let _ = stop_http.send(true);
    let drained = async {
        let _ = (&mut client_task).await;
        if let Some(task) = &mut http_task {
            let _ = task.await;
        }
        kv.drain_forwarded().await;
    };
    if tokio::time::timeout_at(deadline, drained).await.is_err() {
        warn!(replica = opts.id, drain = ?opts.drain, "calls still in flight after the drain period; dropping them");
    }
    client_task.abort();
    if let Some(task) = &http_task {
        task.abort();
    }
    let _ = stop_peers.send(true);
    let grace = deadline
        .saturating_duration_since(tokio::time::Instant::now())
        .max(Duration::from_millis(500));
    if tokio::time::timeout(grace, &mut peer_task).await.is_err() {
        peer_task.abort();
    }
    let _ = stop_probes.send(true);
    if let Some(health_task) = health_task {
        health_task.abort();
    }
    let _ = stop_node.send(true);
    let node_result = match node_task.await {
        Ok(result) => result.map_err(BoxError::from),
        Err(e) => Err(format!("node task: {e}").into()),
    };
    // Even after a storage failure: the state machine holds only whole
    // batches, and the next start's scan deals with the log.
    storage.flush()?;
    info!(replica = opts.id, "stopped");
    node_result
}

/// How long a stopping leader waits for another leader to be seen after it
/// handed off, before it stops anyway.
pub const HAND_OFF_WAIT: Duration = Duration::from_secs(2);

/// How often, within [`HAND_OFF_WAIT`], a stopping replica that still leads
/// asks its core to hand off again (the target may have crashed, or the
/// `TimeoutNow` been lost: a fresh pick and a fresh message).
const HAND_OFF_RETRY: Duration = Duration::from_millis(500);

/// Before stopping: if this replica leads, hands leadership off and waits
/// (up to [`HAND_OFF_WAIT`]) until it knows another leader. Calls queued
/// without a slot are answered `Retry` by the driver and calls arriving
/// meanwhile `NotLeader`, so the service sends both on to the next leader;
/// writes that already had a slot are answered with their reply, or in
/// doubt, never "not proposed". A follower does nothing here: it just
/// drains. Counted in [`m::LEADER_HANDOFFS`] by result.
async fn hand_off(handle: &NodeHandle, id: NodeId) {
    if handle.leader() != Some(id) {
        return;
    }
    let started = tokio::time::Instant::now();
    let deadline = started + HAND_OFF_WAIT;
    let mut leader = handle.clone();
    let result = loop {
        match handle.hand_off().await {
            Ok(Ok(_)) => {}
            // Stepped down meanwhile (a higher ballot): wait for the news.
            Ok(Err(HandOffError::NotLeader)) => {}
            Ok(Err(HandOffError::NoTarget)) => break "no_target",
            Err(_) => break "timed_out",
        }
        let next_try = (tokio::time::Instant::now() + HAND_OFF_RETRY).min(deadline);
        let elsewhere = async {
            loop {
                if leader.leader().is_some_and(|l| l != id) {
                    return true;
                }
                if leader.leader_changed().await.is_err() {
                    return false;
                }
            }
        };
        match tokio::time::timeout_at(next_try, elsewhere).await {
            Ok(true) => break "completed",
            Ok(false) => break "timed_out",
            Err(_) if tokio::time::Instant::now() >= deadline => break "timed_out",
            Err(_) => {}
        }
    };
    metrics::counter!(m::LEADER_HANDOFFS, "result" => result).increment(1);
    match result {
        "completed" => info!(
            replica = id,
            leader = ?handle.leader(),
            took = ?started.elapsed(),
            "handed leadership off"
        ),
        _ => warn!(
            replica = id,
            result,
            waited = ?started.elapsed(),
            "leadership hand-off did not complete; stopping anyway (the others elect a leader after an election timeout)"
        ),
    }
}

/// The error for a gRPC server (`port`: "client" or "peer") whose task
/// ended while the replica was meant to be running.
fn server_ended(
    port: &str,
    result: Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>,
) -> BoxError {
    match result {
        Ok(Ok(())) => format!("the {port} gRPC server stopped unexpectedly").into(),
        Ok(Err(e)) => format!("the {port} gRPC server failed: {e}").into(),
        Err(e) => Box::new(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replica 1 of three, every address on 127.0.0.1: clients on 808N,
    /// peers on 818N.
    fn opts() -> ServeOptions {
        ServeOptions {
            id: 1,
            listen: "127.0.0.1:8081".parse().unwrap(),
            peer_listen: "127.0.0.1:8181".parse().unwrap(),
            advertise_client: None,
            peers: (1..=3)
                .map(|id| (id, format!("127.0.0.1:{}", 8180 + id)))
                .collect(),
            data_dir: PathBuf::from("unused"),
            tick: Duration::from_millis(10),
            cache_bytes: 1 << 20,
            log_segment_bytes: 1 << 20,
            snapshots: crate::node::SnapshotPolicy { every: 0, keep: 0 },
            drain: Duration::from_secs(1),
            limits: crate::driver::Limits::DEFAULT,
            metrics_listen: None,
            http_listen: None,
            health_listen: None,
            cluster_name: "paxoskv".into(),
            fail_syncs_after: None,
            test_bug: None,
            tls: None,
        }
    }

    fn refused(opts: &ServeOptions, wanted: &[&str]) {
        let err = opts.check().expect_err("should be refused");
        for want in wanted {
            assert!(err.contains(want), "{err:?} should say {want:?}");
        }
    }

    #[test]
    fn a_configuration_that_can_work_is_accepted() {
        opts().check().expect("the default test options");
        assert_eq!(opts().client_address(), "127.0.0.1:8081");

        // Every address: peers must still give the port; clients need to
        // be told where to go.
        let mut o = opts();
        o.listen = "0.0.0.0:8081".parse().unwrap();
        o.peer_listen = "[::]:8181".parse().unwrap();
        o.advertise_client = Some("paxoskv-0.paxoskv:8081".into());
        o.check()
            .expect("unspecified listen addresses with an advertised one");
        assert_eq!(o.client_address(), "paxoskv-0.paxoskv:8081");

        // Other spellings of this replica's own peer address.
        for own in ["http://127.0.0.1:8181/", "localhost:8181"] {
            let mut o = opts();
            o.peers.insert(1, own.into());
            o.check().unwrap_or_else(|e| panic!("{own}: {e}"));
        }

        // A client port on another interface than the peer port.
        let mut o = opts();
        o.listen = "127.0.0.2:8181".parse().unwrap();
        o.check().expect("same port, other address");
    }

    #[test]
    fn an_address_that_does_not_parse_is_named() {
        let mut o = opts();
        o.peers.insert(2, "127.0.0.1:http".into());
        refused(&o, &["--peers: replica 2", "127.0.0.1:http"]);

        let mut o = opts();
        o.advertise_client = Some("https://db.example:8081".into());
        refused(&o, &["--advertise-client", "https://db.example:8081"]);
    }

    #[test]
    fn an_id_not_in_peers_is_refused() {
        let mut o = opts();
        o.id = 4;
        refused(&o, &["--id 4 is not among --peers (replicas 1, 2, 3)"]);
    }

    #[test]
    fn two_replicas_with_one_peer_address_are_refused() {
        for spelling in [
            "127.0.0.1:8182",
            "http://127.0.0.1:8182",
            "HTTP://127.0.0.1:8182/",
        ] {
            let mut o = opts();
            o.peers.insert(3, spelling.into());
            refused(
                &o,
                &[
                    "--peers: replicas 2 and 3 have the same peer address",
                    spelling,
                ],
            );
        }
    }

    #[test]
    fn the_client_and_peer_ports_must_differ() {
        let mut o = opts();
        o.listen = o.peer_listen;
        refused(
            &o,
            &[
                "--listen 127.0.0.1:8181 and --peer-listen 127.0.0.1:8181 are the same address",
                "a port each",
            ],
        );
        // Every address and one of them: the same port all the same.
        let mut o = opts();
        o.listen = "0.0.0.0:8181".parse().unwrap();
        o.advertise_client = Some("127.0.0.1:8181".into());
        refused(
            &o,
            &["--listen 0.0.0.0:8181 and --peer-listen 127.0.0.1:8181"],
        );
    }

    #[test]
    fn the_health_port_is_a_port_of_its_own() {
        let mut o = opts();
        o.health_listen = Some("0.0.0.0:8281".parse().unwrap());
        o.metrics_listen = Some("127.0.0.1:9091".parse().unwrap());
        o.check().expect("a port of its own");
        for (taken, flag) in [
            ("127.0.0.1:8081", "--listen 127.0.0.1:8081"),
            ("0.0.0.0:8181", "--peer-listen 127.0.0.1:8181"),
            ("127.0.0.1:9091", "--metrics-listen 127.0.0.1:9091"),
        ] {
            o.health_listen = Some(taken.parse().unwrap());
            refused(
                &o,
                &[&format!(
                    "--health-listen {taken} and {flag} are the same address"
                )],
            );
        }
    }

    #[test]
    fn peer_listen_must_match_this_replicas_peers_entry() {
        let mut o = opts();
        o.peer_listen = "127.0.0.1:9181".parse().unwrap();
        refused(
            &o,
            &[
                "--peer-listen 127.0.0.1:9181 does not match this replica's --peers entry 1=127.0.0.1:8181",
                "port 9181 is not 8181",
            ],
        );
        // Even listening on every address, the port must be the one the
        // others dial.
        o.peer_listen = "0.0.0.0:9181".parse().unwrap();
        refused(&o, &["port 9181 is not 8181"]);

        let mut o = opts();
        o.peer_listen = "127.0.0.2:8181".parse().unwrap();
        refused(&o, &["host 127.0.0.2 is not 127.0.0.1"]);

        // A name that resolves, to somewhere else.
        let mut o = opts();
        o.peers.insert(1, "localhost:8181".into());
        o.peer_listen = "127.0.0.2:8181".parse().unwrap();
        refused(
            &o,
            &["1=localhost:8181", "localhost resolves to", "not 127.0.0.2"],
        );
    }

    #[test]
    fn the_http_port_needs_a_port_of_its_own() {
        let mut o = opts();
        o.http_listen = Some("127.0.0.1:8281".parse().unwrap());
        o.metrics_listen = Some("127.0.0.1:9091".parse().unwrap());
        o.check().expect("an HTTP port of its own");
        for (taken, flag) in [
            ("127.0.0.1:8081", "--listen 127.0.0.1:8081"),
            ("0.0.0.0:8181", "--peer-listen 127.0.0.1:8181"),
            ("127.0.0.1:9091", "--metrics-listen 127.0.0.1:9091"),
        ] {
            let mut o = o.clone();
            o.http_listen = Some(taken.parse().unwrap());
            refused(
                &o,
                &[&format!(
                    "--http-listen {taken} and {flag} are the same address"
                )],
            );
        }
    }

    #[test]
    fn clients_must_be_told_a_dialable_address() {
        for listen in ["0.0.0.0:8081", "[::]:8081"] {
            let mut o = opts();
            o.listen = listen.parse().unwrap();
            refused(
                &o,
                &[
                    &format!("--listen {listen} is an unspecified address"),
                    "--advertise-client",
                ],
            );
        }
        let mut o = opts();
        o.advertise_client = Some("http://127.0.0.1:8182".into());
        refused(
            &o,
            &["--advertise-client http://127.0.0.1:8182 is replica 2's peer address"],
        );
    }

    #[test]
    fn with_tls_addresses_are_https_and_the_certificate_must_name_this_replica() {
        let dir = tempfile::tempdir().expect("temp dir");
        let made = tls::generate(dir.path(), &[1, 2], &["127.0.0.1"]).expect("made");
        let load = |files| TlsConfig::load(files).expect("loads");

        let mut o = opts();
        o.tls = Some(load(&made.replicas[&1]));
        o.check().expect("replica 1 with its own certificate");
        for (id, form) in [(2, "https://127.0.0.1:8182"), (3, "127.0.0.1:8183")] {
            o.peers.insert(id, form.into());
        }
        o.advertise_client = Some("https://127.0.0.1:8081".into());
        o.check().expect("https:// and HOST:PORT with TLS");

        // Plaintext spellings are refused with TLS, https without.
        let mut plain_peer = o.clone();
        plain_peer.peers.insert(2, "http://127.0.0.1:8182".into());
        refused(&plain_peer, &["--peers: replica 2", "TLS is on"]);
        let mut no_tls = o.clone();
        no_tls.tls = None;
        refused(&no_tls, &["--peers: replica 2", "https needs TLS"]);

        // Another replica's certificate, or a client's.
        let mut o = opts();
        o.tls = Some(load(&made.replicas[&2]));
        refused(
            &o,
            &[
                "--tls-cert",
                "names replica 2 (CN paxoskv-replica-2), but this is replica 1",
                "Common Name paxoskv-replica-1",
            ],
        );
        o.tls = Some(load(&made.client));
        refused(&o, &["names CN \"paxoskv-client\", but this is replica 1"]);
    }

    #[test]
    fn overlap_and_host_parsing() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(overlap(a("127.0.0.1:1"), a("127.0.0.1:1")));
        assert!(overlap(a("[::]:1"), a("127.0.0.1:1")));
        assert!(overlap(a("[::ffff:127.0.0.1]:1"), a("127.0.0.1:1")));
        assert!(!overlap(a("127.0.0.1:1"), a("127.0.0.1:2")));
        assert!(!overlap(a("127.0.0.1:1"), a("127.0.0.2:1")));
        let plain = Dialer::plain();
        assert_eq!(
            host_and_port(&plain, "http://[::1]:8181"),
            Ok(("::1".to_string(), 8181))
        );
        assert_eq!(
            host_and_port(&plain, "node-1.example:8181"),
            Ok(("node-1.example".to_string(), 8181))
        );
    }
}
