//! Paxos messages between replicas, over long-lived gRPC streams.
//!
//! # Design
//!
//! Every replica dials every peer and keeps **one outbound stream per peer**:
//! a single call of the bidirectional `paxoskv.v1.Paxos/Stream` RPC, on whose
//! request side it sends all of its messages for that peer, in the order they
//! were handed to [`Transport::send`]. The peer's [`PaxosService`] reads them
//! off that stream and hands them to its node. The response side of the call
//! is left open and unused: the server sends nothing on it and closes it only
//! when the call is over. A peer sends its own messages (the answers, too) on
//! *its* outbound stream to us. So between two replicas there are two calls,
//! one per direction, and a leader has one ordered, pipelined stream to each
//! follower: phase 2 needs no round trip per slot.
//!
//! ```text
//!   replica 1                                replica 2
//!   Transport ── Stream call (1 → 2) ──────▶ PaxosService ──▶ inbox
//!   inbox ◀──── PaxosService ◀──── Stream call (2 → 1) ── Transport
//! ```
//!
//! ## Sending
//!
//! [`Transport::send`] never blocks: it encodes the message and pushes it
//! onto the peer's bounded queue ([`QUEUE_CAPACITY`] messages). If the queue
//! is full or the peer is unknown, the message is dropped and counted (see
//! [`Transport::dropped`]). Paxos tolerates lost messages: the core re-sends
//! what matters (accepts on its pipeline timer, heartbeats every tick,
//! prepares on election timeouts).
//!
//! Each peer has one task that owns the receiving end of that queue. It
//! loops: connect, open the `Stream` call, forward the queue into the call
//! until the call fails or ends, then reconnect with exponential backoff
//! ([`MIN_BACKOFF`] doubling to [`MAX_BACKOFF`], back to the minimum after a
//! connection succeeds). Messages already handed to a call that then dies are
//! lost, as on any network.
//!
//! While a peer is unreachable, its queue keeps filling. Before every
//! connection attempt the task trims it to the **newest**
//! [`KEEP_WHILE_DISCONNECTED`] messages (the older ones are counted as
//! dropped), so a long outage does not replay a flood of stale traffic when
//! the peer comes back, while a short blip loses nothing.
//!
//! ## Noticing a dead peer
//!
//! A crashed peer's kernel resets the connection and the call fails at once.
//! A peer that is gone without a word (power loss, partition, `SIGSTOP`) is
//! noticed by HTTP/2 keepalive: a PING every [`KEEPALIVE_INTERVAL`], and the
//! connection is dropped if one is not answered within [`KEEPALIVE_TIMEOUT`].
//! Opening the call is bounded by [`OPEN_TIMEOUT`] as well.
//!
//! ## Logging
//!
//! A peer that was reachable and is no longer is logged once at WARN ("lost
//! peer"), and once at INFO when it is back ("peer reachable"); individual
//! retries are at DEBUG. A peer never reached since start-up is logged at
//! WARN ("peer unreachable") only once it has been failing for
//! [`STARTUP_GRACE`], so that a cluster whose replicas start a few seconds
//! apart stays quiet.
//!
//! ## Saying who is calling
//!
//! The `Stream` call's request metadata names the dialling replica
//! ([`REPLICA_ID`]), its cluster ([`CLUSTER`]) and, when it has one, the
//! address where it serves clients ([`CLIENT_ADDRESS`]). The receiving
//! [`PaxosService`] checks them (and, with TLS, the caller's certificate)
//! with a [`Gate`] before it reads a message (see [`crate::handshake`]),
//! and records the client address in its [`Directory`], so that every
//! replica knows its peers' client addresses without being configured with
//! them. Every message on the stream must then name that replica as its
//! sender: one that does not is dropped. A refused stream is retried like
//! an unreachable peer, and its status is the reason logged.
//!
//! ## Receiving, and shutting down
//!
//! [`PaxosService`] decodes each incoming message and awaits room in the
//! node's inbox (backpressure travels back to the sender through HTTP/2 flow
//! control). A message that does not decode is logged at WARN and skipped;
//! the stream carries on.
//!
//! Because the streams are long-lived, a server's graceful shutdown (tonic's
//! `serve_with_shutdown`, which waits for every call to finish) would wait on
//! them forever. Give the service a shutdown signal with
//! [`PaxosService::with_shutdown`]: once it turns true, every open stream
//! ends and the dialling peers go back to reconnecting.
//!
//! ## Forwarded client calls
//!
//! `Paxos/Forward` is a stream on which a replica that does not lead sends
//! the leader its clients' calls, in batches, and gets their answers. The
//! transport only routes it: the client API, which lives above, serves it
//! through the [`Forwarded`] it gives [`PaxosService::with_forwarding`].

use std::collections::BTreeMap;
use std::error::Error as StdError;
use std::future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{self, Instant};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, error, info, warn};

use crate::dial::{DialError, Dialer};
use crate::directory::Directory;
#[cfg(doc)]
use crate::directory::{CLIENT_ADDRESS, CLUSTER, REPLICA_ID};
use crate::handshake::{Caller, Gate, PeerCall};
use crate::paxos::{Message, NodeId};
use crate::pb;
use crate::pb::paxos_client::PaxosClient;
use crate::pb::paxos_server::{Paxos, PaxosServer};
use crate::wire;

/// Capacity of each peer's outbound queue, in messages.
pub const QUEUE_CAPACITY: usize = 8192;

/// While a peer is unreachable, its queue is trimmed to this many of the
/// newest messages before every connection attempt.
pub const KEEP_WHILE_DISCONNECTED: usize = 1024;

/// First delay between connection attempts.
pub const MIN_BACKOFF: Duration = Duration::from_millis(50);

/// Longest delay between connection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// How long the peer may take to answer the opening of a `Stream` call.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(3);

/// Interval between HTTP/2 keepalive PINGs on a peer connection.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);

/// A connection whose keepalive PING goes unanswered this long is dropped.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);

/// A peer never reached since start-up is logged at WARN only after it has
/// been unreachable this long.
pub const STARTUP_GRACE: Duration = Duration::from_secs(5);

/// Largest Paxos message accepted from a peer. Promise and CatchUp messages
/// carry many log entries, far more than gRPC's 4 MiB default.
pub const MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;

/// Messages handed from the peer task to the live call but not yet taken by
/// HTTP/2. Small: the real buffer is the peer's queue, and whatever sits here
/// when the connection dies is lost.
const CALL_BUFFER: usize = 64;

/// The sending side: one outbound stream per peer, each kept up by its own
/// task.
///
/// Dropping the `Transport` stops every peer task (and so closes the
/// streams).
#[derive(Debug)]
pub struct Transport {
    /// This replica's id, stamped on every outgoing message.
    id: NodeId,
    /// The peers, by id.
    peers: BTreeMap<NodeId, PeerHandle>,
    /// Messages dropped: queue full, unknown peer, or trimmed while the peer
    /// was unreachable. Shared with the peer tasks.
    dropped: Arc<AtomicU64>,
    /// How peers are dialled.
    dialer: Dialer,
    /// The metadata every call to a peer opens with.
    hello: Arc<MetadataMap>,
}

/// What the [`Transport`] keeps of one peer.
#[derive(Debug)]
struct PeerHandle {
    /// The peer's outbound queue, drained by its task.
    queue: mpsc::Sender<pb::PeerMessage>,
    /// Whether a `Stream` call to the peer is open right now.
    connected: Arc<AtomicBool>,
    /// Its address, as `--peers` gave it.
    addr: String,
    /// The peer task, aborted when the transport is dropped.
    task: JoinHandle<()>,
}

impl Transport {
    /// Starts a transport for replica `id` of cluster
    /// [`crate::directory::DEFAULT_CLUSTER`], dialling in plaintext, with
    /// one task per peer dialling `peers[peer]` (any form
    /// [`Dialer::endpoint`] accepts). An entry for `id` itself is
    /// ignored, and so is a peer whose address is invalid (logged at ERROR;
    /// `paxoskv serve` refuses such addresses at start).
    ///
    /// Must be called from within a tokio runtime. Returns at once; the
    /// connections are made in the background and messages sent before they
    /// are up wait in the queues.
    pub fn start(id: NodeId, peers: BTreeMap<NodeId, String>) -> Transport {
        Transport::advertising(id, peers, None)
    }

    /// As [`Transport::start`], and every stream it opens tells the peer
    /// that this replica serves clients at `client_address` (see the
    /// module's "Saying who is calling").
    pub fn advertising(
        id: NodeId,
        peers: BTreeMap<NodeId, String>,
        client_address: Option<String>,
    ) -> Transport {
        let directory = Directory::new(id, BTreeMap::new(), String::new());
        let hello = hello(&directory, client_address.as_deref());
        Transport::build(id, peers, hello, Dialer::plain())
    }

    /// The transport of the replica `directory` describes: it dials every
    /// other member at its peer address with the directory's dialer
    /// (plaintext or TLS), and introduces itself with its id, its cluster
    /// and its client address.
    pub fn for_directory(directory: &Directory) -> Transport {
        let id = directory.id();
        let others = directory
            .peers()
            .iter()
            .filter(|(peer, _)| **peer != id)
            .map(|(peer, addr)| (*peer, addr.clone()))
            .collect();
        let hello = hello(directory, directory.client_address(id).as_deref());
        Transport::build(id, others, hello, directory.dialer().clone())
    }

    fn build(
        id: NodeId,
        peers: BTreeMap<NodeId, String>,
        hello: MetadataMap,
        dialer: Dialer,
    ) -> Transport {
        // Made once: every (re)connection sends the same metadata.
        let hello = Arc::new(hello);
        let dropped = Arc::new(AtomicU64::new(0));
        let mut handles = BTreeMap::new();

        for (peer, addr) in peers {
            if peer == id {
                continue;
            }
            let (queue, rx) = mpsc::channel(QUEUE_CAPACITY);
            let connected = Arc::new(AtomicBool::new(false));
            let task = PeerTask {
                peer,
                addr: addr.clone(),
                dialer: dialer.clone(),
                hello: Arc::clone(&hello),
                queue: rx,
                connected: connected.clone(),
                dropped: dropped.clone(),
                link: Link::Starting {
                    since: Instant::now(),
                },
            };
            let task = tokio::spawn(task.run());
            handles.insert(
                peer,
                PeerHandle {
                    queue,
                    connected,
                    addr,
                    task,
                },
            );
        }

        Transport {
            id,
            peers: handles,
            dropped,
            dialer,
            hello,
        }
    }

    /// The address of peer `id`, as configured.
    pub fn address(&self, id: NodeId) -> Option<&str> {
        self.peers.get(&id).map(|p| p.addr.as_str())
    }

    /// Where to fetch a snapshot from peer `id`, dialled and introduced as
    /// this transport's streams are; `None` if `id` is not a peer.
    pub fn snapshot_source(&self, id: NodeId) -> Option<crate::transfer::Source> {
        let addr = self.address(id)?;
        Some(crate::transfer::Source {
            address: addr.to_string(),
            endpoint: self.dialer.endpoint(addr),
            hello: MetadataMap::clone(&self.hello),
        })
    }

    /// Queues `msg` for peer `to`. Never blocks: if the peer's queue is full,
    /// or `to` is not a known peer, the message is dropped and counted.
    pub fn send(&self, to: NodeId, msg: &Message) {
        let Some(peer) = self.peers.get(&to) else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            debug!(peer = to, "dropping message for unknown peer");
            return;
        };

        // Reserve room first, so a dropped message costs no encoding.
        match peer.queue.try_reserve() {
            Ok(permit) => permit.send(wire::message_to_pb(self.id, msg)),
            Err(mpsc::error::TrySendError::Full(())) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                debug!(peer = to, "peer queue full; dropping message");
            }
            Err(mpsc::error::TrySendError::Closed(())) => {
                // Only if the peer task has died; it logged why.
                self.dropped.fetch_add(1, Ordering::Relaxed);
                debug!(peer = to, "peer task stopped; dropping message");
            }
        }
    }

    /// Whether a stream to peer `to` is open right now (false for unknown
    /// peers).
    pub fn peer_connected(&self, to: NodeId) -> bool {
        self.peers
            .get(&to)
            .is_some_and(|peer| peer.connected.load(Ordering::Relaxed))
    }

    /// The peers this transport sends to, in id order.
    pub fn peer_ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.peers.keys().copied()
    }

    /// Total messages dropped so far: queue full, unknown peer, or discarded
    /// while the peer was unreachable.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for Transport {
    fn drop(&mut self) {
        for peer in self.peers.values() {
            peer.task.abort();
        }
    }
}

/// What the peer task knows about the link, to log changes once.
#[derive(Clone, Copy, Debug)]
enum Link {
    /// Never reached since the task started at `since`.
    Starting { since: Instant },
    /// A `Stream` call is open.
    Up,
    /// Unreachable, and already logged as such.
    Down,
}

/// How a `Stream` call ended.
enum CallEnd {
    /// The transport was dropped: stop for good.
    Shutdown,
    /// The call failed or the peer closed it: reconnect.
    Lost(String),
}

/// The metadata every `Stream` call of the replica `directory` describes
/// opens with: its id, its cluster, and its client address if it has one.
/// An address that cannot be sent as metadata is left out (and logged):
/// `paxoskv serve` refuses such addresses at start.
fn hello(directory: &Directory, client_address: Option<&str>) -> MetadataMap {
    let mut meta = MetadataMap::new();
    directory.introduce(&mut meta);
    if let Some(address) = client_address.filter(|a| !a.trim().is_empty()) {
        match MetadataValue::try_from(address.trim()) {
            Ok(value) => {
                meta.insert(crate::directory::CLIENT_ADDRESS, value);
            }
            Err(_) => error!(
                client_address = address,
                "the client address cannot be sent as gRPC metadata; peers will not know it"
            ),
        }
    }
    meta
}

/// The task that keeps one peer's outbound stream up.
struct PeerTask {
    peer: NodeId,
    addr: String,
    /// Plaintext or TLS.
    dialer: Dialer,
    /// The metadata each `Stream` call opens with.
    hello: Arc<MetadataMap>,
    /// The receiving end of the peer's queue.
    queue: mpsc::Receiver<pb::PeerMessage>,
    /// Mirrors `link` being `Up`, for [`Transport::peer_connected`].
    connected: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
    link: Link,
}

impl PeerTask {
    /// Connects, streams, reconnects, until the transport is dropped.
    async fn run(mut self) {
        let endpoint = match self.endpoint() {
            Ok(endpoint) => endpoint,
            Err(err) => {
                // A configuration error: retrying will not fix it.
                error!(
                    peer = self.peer,
                    addr = %self.addr,
                    error = %err,
                    "invalid peer address; not dialling this peer"
                );
                return;
            }
        };

        let mut backoff = MIN_BACKOFF;
        loop {
            self.trim_queue();

            let reason = match self.open(&endpoint).await {
                Ok((calls, replies)) => {
                    self.mark_up();
                    backoff = MIN_BACKOFF;
                    match self.pump(calls, replies).await {
                        CallEnd::Shutdown => return,
                        CallEnd::Lost(reason) => reason,
                    }
                }
                Err(reason) => reason,
            };
            self.mark_down(&reason);

            time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// The endpoint for the peer: the shared dial settings, and the
    /// keepalives above, which notice a peer gone without a word.
    fn endpoint(&self) -> Result<Endpoint, DialError> {
        Ok(self
            .dialer
            .endpoint(&self.addr)?
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true))
    }

    /// Makes a fresh connection and opens the `Stream` call on it. Returns
    /// the sender that feeds the call's request stream and the (unused)
    /// response stream, which ends or fails when the call does.
    async fn open(
        &self,
        endpoint: &Endpoint,
    ) -> Result<(mpsc::Sender<pb::PeerMessage>, Streaming<pb::PeerMessage>), String> {
        let channel: Channel = endpoint
            .connect()
            .await
            .map_err(|err| format!("connect: {}", error_chain(&err)))?;
        let mut client = PaxosClient::new(channel).max_decoding_message_size(MAX_MESSAGE_SIZE);

        let (calls, outbound) = mpsc::channel(CALL_BUFFER);
        let mut request = Request::new(ReceiverStream::new(outbound));
        *request.metadata_mut() = MetadataMap::clone(&self.hello);
        let opened = time::timeout(OPEN_TIMEOUT, client.stream(request))
            .await
            .map_err(|_| "open stream: timed out".to_string())?
            .map_err(|status| format!("open stream: {}", status_text(&status)))?;
        Ok((calls, opened.into_inner()))
    }

    /// Forwards the queue into the open call until the call ends.
    async fn pump(
        &mut self,
        calls: mpsc::Sender<pb::PeerMessage>,
        mut replies: Streaming<pb::PeerMessage>,
    ) -> CallEnd {
        loop {
            tokio::select! {
                // The peer sends nothing on this side of the call, so this
                // only completes when the call ends or fails.
                reply = replies.message() => match reply {
                    Ok(Some(_)) => debug!(peer = self.peer, "ignoring message on response stream"),
                    Ok(None) => return CallEnd::Lost("peer closed the stream".to_string()),
                    Err(status) => return CallEnd::Lost(status_text(&status)),
                },
                msg = self.queue.recv() => {
                    let Some(msg) = msg else {
                        // Every sender is gone: the transport was dropped.
                        return CallEnd::Shutdown;
                    };
                    // Waits only while HTTP/2 flow control holds the call
                    // back. If the connection dies meanwhile, hyper drops the
                    // request stream and this fails.
                    if calls.send(msg).await.is_err() {
                        return CallEnd::Lost("connection closed".to_string());
                    }
                }
            }
        }
    }

    /// Discards all but the newest [`KEEP_WHILE_DISCONNECTED`] queued
    /// messages.
    fn trim_queue(&mut self) {
        let mut discarded = 0;
        while self.queue.len() > KEEP_WHILE_DISCONNECTED {
            if self.queue.try_recv().is_err() {
                break;
            }
            discarded += 1;
        }
        if discarded > 0 {
            self.dropped.fetch_add(discarded, Ordering::Relaxed);
            debug!(
                peer = self.peer,
                discarded, "discarded stale messages queued while peer was unreachable"
            );
        }
    }

    /// A `Stream` call is open.
    fn mark_up(&mut self) {
        self.connected.store(true, Ordering::Relaxed);
        match self.link {
            Link::Starting { .. } | Link::Down => {
                info!(peer = self.peer, addr = %self.addr, "peer reachable");
            }
            Link::Up => {}
        }
        self.link = Link::Up;
    }

    /// A connection attempt failed, or the open call ended, for `reason`.
    fn mark_down(&mut self, reason: &str) {
        self.connected.store(false, Ordering::Relaxed);
        match self.link {
            Link::Up => {
                warn!(peer = self.peer, addr = %self.addr, reason, "lost peer");
                self.link = Link::Down;
            }
            Link::Starting { since } if since.elapsed() >= STARTUP_GRACE => {
                warn!(peer = self.peer, addr = %self.addr, reason, "peer unreachable");
                self.link = Link::Down;
            }
            Link::Starting { .. } | Link::Down => {
                debug!(peer = self.peer, addr = %self.addr, reason, "peer still unreachable");
            }
        }
    }
}

/// The answers of a `Paxos/Forward` stream, as the server sends them.
pub type ForwardAnswerStream = ReceiverStream<Result<pb::ForwardAnswers, Status>>;

/// Serves the client calls that other replicas forward to this one
/// (`Paxos/Forward`). The client API implements it; the transport, below
/// it, only routes the streams.
pub trait Forwarded: Send + Sync + 'static {
    /// Serves the calls replica `from` sends on `calls`, answering on the
    /// stream returned, until `calls` ends or `shutdown` turns true.
    fn forwarded(
        self: Arc<Self>,
        from: NodeId,
        calls: Streaming<pb::ForwardBatch>,
        shutdown: Option<watch::Receiver<bool>>,
    ) -> ForwardAnswerStream;
}

/// The receiving side: the `paxoskv.v1.Paxos` gRPC service, which hands
/// every message a peer streams to us to the local node's inbox, serves
/// snapshots, and routes forwarded client calls, each only once its caller
/// has passed the [`Gate`]. It belongs on the peer port only.
#[derive(Clone)]
pub struct PaxosService {
    /// Where decoded messages go, with the sender's id.
    inbox: mpsc::Sender<(NodeId, Message)>,
    /// Who may call, checked on every call (see [`crate::handshake`]).
    gate: Arc<Gate>,
    /// Once this turns true, every open stream ends.
    shutdown: Option<watch::Receiver<bool>>,
    /// Where `Snapshot` calls read from; without it they are refused.
    snapshots: Option<Arc<crate::storage::Storage>>,
    /// Who serves `Forward` streams; without it they are refused.
    forwarding: Option<Arc<dyn Forwarded>>,
}

impl std::fmt::Debug for PaxosService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PaxosService")
            .field("gate", &self.gate)
            .field("shutdown", &self.shutdown.is_some())
            .field("snapshots", &self.snapshots.is_some())
            .field("forwarding", &self.forwarding.is_some())
            .finish()
    }
}

impl PaxosService {
    /// A service for the replica `directory` describes, which admits calls
    /// from the other members of its cluster only (by their certificates
    /// too, if the directory's dialer speaks TLS), records the client
    /// addresses they advertise in `directory`, and pushes each `(from,
    /// message)` it receives into `inbox`, waiting for room when it is full.
    pub fn new(inbox: mpsc::Sender<(NodeId, Message)>, directory: Arc<Directory>) -> Self {
        PaxosService {
            inbox,
            gate: Arc::new(Gate::new(directory)),
            shutdown: None,
            snapshots: None,
            forwarding: None,
        }
    }

    /// Serves `Forward` streams with `forwarding`.
    pub fn with_forwarding(mut self, forwarding: Arc<dyn Forwarded>) -> Self {
        self.forwarding = Some(forwarding);
        self
    }

    /// Serves `Snapshot` calls from `storage`'s state machine.
    pub fn with_snapshots(mut self, storage: Arc<crate::storage::Storage>) -> Self {
        self.snapshots = Some(storage);
        self
    }

    /// Ends every open stream, and refuses to read from new ones, once
    /// `shutdown` holds true. Needed for a graceful server shutdown, which
    /// otherwise waits forever for the peers' long-lived streams to finish.
    pub fn with_shutdown(mut self, shutdown: watch::Receiver<bool>) -> Self {
        self.shutdown = Some(shutdown);
        self
    }

    /// The gRPC server for this service, accepting messages up to
    /// [`MAX_MESSAGE_SIZE`].
    pub fn into_server(self) -> PaxosServer<Self> {
        PaxosServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(crate::transfer::MAX_CHUNK_MESSAGE)
    }
}

#[tonic::async_trait]
impl Paxos for PaxosService {
    /// Never yields a message; ends when the call is over.
    type StreamStream = ReceiverStream<Result<pb::PeerMessage, Status>>;
    type SnapshotStream = crate::transfer::ChunkStream;
    type ForwardStream = ForwardAnswerStream;

    async fn snapshot(
        &self,
        request: Request<pb::SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        let caller = self.admit(PeerCall::Snapshot, &request)?;
        // `from` is only logged; still, it must not contradict the caller.
        if request.get_ref().from != caller.id {
            return Err(Status::invalid_argument(format!(
                "SnapshotRequest.from is {}, but the caller is replica {}",
                request.get_ref().from,
                caller.id
            )));
        }
        match &self.snapshots {
            Some(storage) => crate::transfer::serve(Arc::clone(storage), request).await,
            None => Err(Status::unimplemented("this server holds no state machine")),
        }
    }

    async fn forward(
        &self,
        request: Request<Streaming<pb::ForwardBatch>>,
    ) -> Result<Response<Self::ForwardStream>, Status> {
        let caller = self.admit(PeerCall::Forward, &request)?;
        match &self.forwarding {
            Some(forwarding) => Ok(Response::new(Arc::clone(forwarding).forwarded(
                caller.id,
                request.into_inner(),
                self.shutdown.clone(),
            ))),
            None => Err(Status::unimplemented(
                "this server takes no forwarded client calls",
            )),
        }
    }

    async fn stream(
        &self,
        request: Request<Streaming<pb::PeerMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let caller = self.admit(PeerCall::Stream, &request)?;
        let remote = remote_of(&request);
        let inbound = request.into_inner();

        // The response stream stays open for as long as the reader task
        // holds `open`, and ends when the task drops it.
        let (open, response) = mpsc::channel(1);
        let inbox = self.inbox.clone();
        let shutdown = self.shutdown.clone();
        let gate = Arc::clone(&self.gate);
        tokio::spawn(async move {
            debug!(%remote, peer = caller.id, "peer stream opened");
            tokio::select! {
                () = read_stream(inbound, inbox, &gate, &caller, &remote) => {}
                () = shutting_down(shutdown) => {
                    debug!(%remote, "closing peer stream: shutting down");
                }
            }
            drop(open);
        });

        Ok(Response::new(ReceiverStream::new(response)))
    }
}

/// What the client port answers to every `paxoskv.v1.Paxos` call:
/// `UNIMPLEMENTED`, with a message that says where the service is. Nothing
/// a call carries is looked at. (Without it, the answer would be the same
/// code with an empty message.)
#[derive(Clone, Copy, Debug, Default)]
pub struct NotOnThisPort;

impl NotOnThisPort {
    /// The tonic server for this stand-in.
    pub fn into_server(self) -> PaxosServer<Self> {
        PaxosServer::new(self)
    }

    fn refuse() -> Status {
        Status::unimplemented(
            "paxoskv.v1.Paxos is not served on the client port; replicas speak it on their peer port (--peer-listen)",
        )
    }
}

#[tonic::async_trait]
impl Paxos for NotOnThisPort {
    type StreamStream = ReceiverStream<Result<pb::PeerMessage, Status>>;
    type SnapshotStream = crate::transfer::ChunkStream;
    type ForwardStream = ForwardAnswerStream;

    async fn stream(
        &self,
        _: Request<Streaming<pb::PeerMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        Err(Self::refuse())
    }

    async fn snapshot(
        &self,
        _: Request<pb::SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        Err(Self::refuse())
    }

    async fn forward(
        &self,
        _: Request<Streaming<pb::ForwardBatch>>,
    ) -> Result<Response<Self::ForwardStream>, Status> {
        Err(Self::refuse())
    }
}

impl PaxosService {
    /// The gate's verdict on `request` (see [`crate::handshake`]).
    fn admit<T>(&self, call: PeerCall, request: &Request<T>) -> Result<Caller, Status> {
        let certs = request.peer_certs();
        self.gate.admit(
            call,
            request.metadata(),
            certs.as_deref().map(Vec::as_slice),
            &remote_of(request),
        )
    }
}

/// The caller's address, for logs.
fn remote_of<T>(request: &Request<T>) -> String {
    request
        .remote_addr()
        .map_or_else(|| "unknown".to_string(), |addr| addr.to_string())
}

/// Reads the stream `caller` opened into the inbox until the stream ends
/// or fails, or the inbox is closed. A message that names a sender other
/// than `caller` is dropped (see [`Gate::sent_by`]).
async fn read_stream(
    mut inbound: Streaming<pb::PeerMessage>,
    inbox: mpsc::Sender<(NodeId, Message)>,
    gate: &Gate,
    caller: &Caller,
    remote: &str,
) {
    loop {
        let msg = match inbound.message().await {
            Ok(Some(msg)) => msg,
            Ok(None) => {
                debug!(%remote, "peer stream ended");
                return;
            }
            Err(status) => {
                debug!(%remote, error = %status_text(&status), "peer stream failed");
                return;
            }
        };

        match wire::message_from_pb(msg) {
            Ok((from, _)) if !gate.sent_by(caller, from, remote) => {}
            Ok(decoded) => {
                if inbox.send(decoded).await.is_err() {
                    debug!(%remote, "inbox closed; dropping peer stream");
                    return;
                }
            }
            Err(err) => {
                warn!(%remote, error = %err, "skipping peer message that does not decode");
            }
        }
    }
}

/// Completes once `shutdown` holds true; never, without a signal or once its
/// sender is gone.
pub(crate) async fn shutting_down(shutdown: Option<watch::Receiver<bool>>) {
    if let Some(mut shutdown) = shutdown
        && shutdown.wait_for(|&stop| stop).await.is_ok()
    {
        return;
    }
    future::pending().await
}

/// A gRPC status as one line: its code, message and underlying causes.
fn status_text(status: &Status) -> String {
    let text = format!("{:?}: {}", status.code(), status.message());
    with_causes(text, status.source())
}

/// An error and its chain of causes, as one line (tonic's transport errors
/// say little more than "transport error" on their own).
fn error_chain(err: &(dyn StdError + 'static)) -> String {
    with_causes(err.to_string(), err.source())
}

/// Appends each cause in the chain from `source` to `text`, skipping those
/// whose text is already there (errors often repeat their cause).
fn with_causes(mut text: String, mut source: Option<&(dyn StdError + 'static)>) -> String {
    while let Some(err) = source {
        let cause = err.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
        source = err.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use bytes::Bytes;
    use tokio::net::TcpListener;
    use tokio::sync::oneshot;
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::transport::Server;

    use super::*;
    use crate::directory::{CLIENT_ADDRESS, CLUSTER, DEFAULT_CLUSTER, REPLICA_ID};
    use crate::paxos::{Ballot, Value};

    /// The directory of the replica the test servers play: replica 2 of
    /// three, in the default cluster, plaintext.
    fn server_directory() -> Arc<Directory> {
        let peers = (1..=3).map(|id| (id, format!("127.0.0.1:{id}"))).collect();
        Arc::new(Directory::new(2, peers, "127.0.0.1:9002".to_string()))
    }

    /// A plaintext channel to `addr`.
    async fn connect(addr: SocketAddr) -> Channel {
        Dialer::plain()
            .endpoint(&addr.to_string())
            .expect("endpoint")
            .connect()
            .await
            .expect("connect")
    }

    /// A `Stream` request that introduces replica `id` of the default
    /// cluster, carrying what `rx` yields.
    fn stream_as(
        id: &str,
        rx: mpsc::Receiver<pb::PeerMessage>,
    ) -> Request<ReceiverStream<pb::PeerMessage>> {
        let mut request = Request::new(ReceiverStream::new(rx));
        request
            .metadata_mut()
            .insert(REPLICA_ID, id.parse().expect("ascii"));
        request
            .metadata_mut()
            .insert(CLUSTER, DEFAULT_CLUSTER.parse().expect("ascii"));
        request
    }

    /// Bound on every wait in these tests.
    const WAIT: Duration = Duration::from_secs(5);

    fn heartbeat(read_round: u64) -> Message {
        Message::Heartbeat {
            ballot: Ballot::new(1, 1),
            commit: 0,
            read_round,
        }
    }

    /// The `read_round` of a heartbeat, to identify test messages.
    fn round_of(msg: &Message) -> u64 {
        match msg {
            Message::Heartbeat { read_round, .. } => *read_round,
            other => panic!("expected a heartbeat, got {other:?}"),
        }
    }

    /// Binds a listener on 127.0.0.1 (port 0 for any), retrying briefly in
    /// case a just-stopped server's socket is not quite released.
    async fn bind(addr: SocketAddr) -> TcpListener {
        let mut last_err = None;
        for _ in 0..50 {
            match TcpListener::bind(addr).await {
                Ok(listener) => return listener,
                Err(err) => last_err = Some(err),
            }
            time::sleep(Duration::from_millis(100)).await;
        }
        panic!("cannot bind {addr}: {last_err:?}");
    }

    /// A `PaxosService` server running on the test's runtime, stopped
    /// gracefully through the service's shutdown signal.
    struct GracefulServer {
        addr: SocketAddr,
        stop: watch::Sender<bool>,
        task: JoinHandle<Result<(), tonic::transport::Error>>,
    }

    impl GracefulServer {
        async fn start(addr: SocketAddr, inbox: mpsc::Sender<(NodeId, Message)>) -> Self {
            let listener = bind(addr).await;
            Self::serve(listener, PaxosService::new(inbox, server_directory()))
        }

        /// Serves `service` (given a shutdown signal here) on `listener`.
        fn serve(listener: TcpListener, service: PaxosService) -> Self {
            let addr = listener.local_addr().expect("local addr");
            let (stop, stopped) = watch::channel(false);
            let service = service.with_shutdown(stopped.clone());
            let mut signal = stopped;
            let task = tokio::spawn(
                Server::builder()
                    .add_service(service.into_server())
                    .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                        let _ = signal.wait_for(|&stop| stop).await;
                    }),
            );
            GracefulServer { addr, stop, task }
        }

        /// Stops the server and waits (bounded) for it to finish.
        async fn stop(self) {
            self.stop.send_replace(true);
            time::timeout(WAIT, self.task)
                .await
                .expect("graceful shutdown finishes despite open peer streams")
                .expect("server task")
                .expect("server");
        }
    }

    /// A `PaxosService` server on its own runtime and thread, so that it can
    /// be killed outright: dropping the runtime drops every connection, as a
    /// crash would.
    struct CrashableServer {
        addr: SocketAddr,
        kill: oneshot::Sender<()>,
        thread: std::thread::JoinHandle<()>,
    }

    impl CrashableServer {
        fn start(addr: SocketAddr, inbox: mpsc::Sender<(NodeId, Message)>) -> Self {
            let (bound_tx, bound_rx) = std::sync::mpsc::channel();
            let (kill, killed) = oneshot::channel::<()>();
            let thread = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                runtime.block_on(async move {
                    let listener = bind(addr).await;
                    bound_tx
                        .send(listener.local_addr().expect("local addr"))
                        .expect("report address");
                    let server = Server::builder()
                        .add_service(PaxosService::new(inbox, server_directory()).into_server())
                        .serve_with_incoming(TcpListenerStream::new(listener));
                    tokio::select! {
                        _ = server => {}
                        _ = killed => {}
                    }
                });
                // Dropping the runtime here kills every connection task.
                drop(runtime);
            });
            let addr = bound_rx.recv_timeout(WAIT).expect("server bound");
            CrashableServer { addr, kill, thread }
        }

        async fn kill(self) {
            let _ = self.kill.send(());
            let thread = self.thread;
            time::timeout(WAIT, tokio::task::spawn_blocking(move || thread.join()))
                .await
                .expect("server thread exits")
                .expect("join task")
                .expect("server thread");
        }
    }

    /// The next message in the inbox, waiting at most [`WAIT`].
    async fn next(inbox: &mut mpsc::Receiver<(NodeId, Message)>) -> (NodeId, Message) {
        time::timeout(WAIT, inbox.recv())
            .await
            .expect("a message within the wait")
            .expect("inbox open")
    }

    /// Waits (bounded) until `peer_connected(2)` is `want`.
    async fn wait_connected(transport: &Transport, want: bool) {
        time::timeout(WAIT, async {
            while transport.peer_connected(2) != want {
                time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("peer_connected(2) never became {want}"));
    }

    fn peers(addr: SocketAddr) -> BTreeMap<NodeId, String> {
        BTreeMap::from([(1, "127.0.0.1:1".to_string()), (2, addr.to_string())])
    }

    #[tokio::test]
    async fn messages_arrive_in_order_with_sender_id() {
        let (inbox_tx, mut inbox) = mpsc::channel(1024);
        let server = GracefulServer::start("127.0.0.1:0".parse().unwrap(), inbox_tx).await;
        // The entry for node 1 (ourselves) is ignored.
        let transport = Transport::start(1, peers(server.addr));
        assert_eq!(transport.peer_ids().collect::<Vec<_>>(), vec![2]);

        let accept = Message::Accept {
            ballot: Ballot::new(3, 1),
            slot: 7,
            value: Value::Batch(vec![Bytes::from_static(b"cmd")]),
            commit: 6,
        };
        let sent = vec![heartbeat(1), accept, heartbeat(2), heartbeat(3)];
        for msg in &sent {
            transport.send(2, msg);
        }

        for want in &sent {
            let (from, got) = next(&mut inbox).await;
            assert_eq!(from, 1);
            assert_eq!(&got, want);
        }
        wait_connected(&transport, true).await;
        assert_eq!(transport.dropped(), 0);

        server.stop().await;
    }

    #[tokio::test]
    async fn a_dialling_replica_tells_its_client_address_and_bad_metadata_is_refused() {
        let (inbox_tx, mut inbox) = mpsc::channel(1024);
        let listener = bind("127.0.0.1:0".parse().unwrap()).await;
        let addr = listener.local_addr().expect("local addr");
        let directory = Arc::new(Directory::new(2, peers(addr), "127.0.0.1:9002".to_string()));
        let service = PaxosService::new(inbox_tx, Arc::clone(&directory));
        let server = GracefulServer::serve(listener, service);

        assert_eq!(directory.client_address(1), None);
        let transport =
            Transport::advertising(1, peers(addr), Some("http://127.0.0.1:9001".into()));
        transport.send(2, &heartbeat(1));
        assert_eq!(next(&mut inbox).await, (1, heartbeat(1)));
        assert_eq!(
            directory.client_address(1).as_deref(),
            Some("http://127.0.0.1:9001")
        );

        // By hand: metadata a replica would never send.
        let mut client = PaxosClient::new(connect(addr).await);
        for (id, address, want) in [
            (Some("1"), Some("https://127.0.0.1:9001"), "https"),
            (Some("one"), Some("127.0.0.1:9001"), "is not a replica id"),
            (
                Some("7"),
                Some("127.0.0.1:9001"),
                "replica 7 is not a member",
            ),
            (Some("2"), Some("127.0.0.1:9001"), "is this replica"),
            (None, Some("127.0.0.1:9001"), "without x-paxoskv-replica-id"),
        ] {
            let (_tx, rx) = mpsc::channel::<pb::PeerMessage>(1);
            let mut request = Request::new(ReceiverStream::new(rx));
            request
                .metadata_mut()
                .insert(CLUSTER, DEFAULT_CLUSTER.parse().expect("ascii"));
            if let Some(id) = id {
                request
                    .metadata_mut()
                    .insert(REPLICA_ID, id.parse().expect("ascii"));
            }
            if let Some(address) = address {
                request
                    .metadata_mut()
                    .insert(CLIENT_ADDRESS, address.parse().expect("ascii"));
            }
            let status = client
                .stream(request)
                .await
                .expect_err("malformed metadata is refused");
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
            assert!(status.message().contains(want), "{status:?}: {want}");
        }
        // Nothing a refused call said was recorded.
        assert_eq!(
            directory.client_address(1).as_deref(),
            Some("http://127.0.0.1:9001")
        );
        assert_eq!(
            directory.client_address(2).as_deref(),
            Some("127.0.0.1:9002")
        );

        drop(transport);
        server.stop().await;
    }

    #[tokio::test]
    async fn unknown_peer_is_dropped_and_counted() {
        let transport = Transport::start(1, BTreeMap::new());
        transport.send(9, &heartbeat(1));
        assert_eq!(transport.dropped(), 1);
        assert!(!transport.peer_connected(9));
    }

    #[tokio::test]
    async fn reconnects_after_peer_crash() {
        let (inbox_tx, mut inbox) = mpsc::channel(1024);
        let server = CrashableServer::start("127.0.0.1:0".parse().unwrap(), inbox_tx.clone());
        let addr = server.addr;
        let transport = Transport::start(1, peers(addr));

        for round in 1..=3 {
            transport.send(2, &heartbeat(round));
        }
        for round in 1..=3 {
            assert_eq!(round_of(&next(&mut inbox).await.1), round);
        }
        wait_connected(&transport, true).await;

        // Kill the peer; the transport notices.
        server.kill().await;
        wait_connected(&transport, false).await;

        // Sent while the peer is down: kept in the queue (far fewer than
        // KEEP_WHILE_DISCONNECTED), delivered once it is back.
        for round in 100..105 {
            transport.send(2, &heartbeat(round));
        }

        // Restart on the same port.
        let server = CrashableServer::start(addr, inbox_tx);
        assert_eq!(server.addr, addr);
        wait_connected(&transport, true).await;
        for round in 1000..1004 {
            transport.send(2, &heartbeat(round));
        }

        let mut got = Vec::new();
        while got.last() != Some(&1003) {
            let (from, msg) = next(&mut inbox).await;
            assert_eq!(from, 1);
            got.push(round_of(&msg));
        }
        let want: Vec<u64> = (100..105).chain(1000..1004).collect();
        assert_eq!(got, want);

        server.kill().await;
    }

    #[tokio::test]
    async fn graceful_shutdown_ends_streams_and_transport_reconnects() {
        let (inbox_tx, mut inbox) = mpsc::channel(1024);
        let server = GracefulServer::start("127.0.0.1:0".parse().unwrap(), inbox_tx.clone()).await;
        let addr = server.addr;
        let transport = Transport::start(1, peers(addr));

        transport.send(2, &heartbeat(1));
        assert_eq!(round_of(&next(&mut inbox).await.1), 1);

        // Would hang without `with_shutdown`: the stream never ends by itself.
        server.stop().await;
        wait_connected(&transport, false).await;
        transport.send(2, &heartbeat(2)); // may or may not survive: fine

        let server = GracefulServer::start(addr, inbox_tx).await;
        wait_connected(&transport, true).await;
        for round in 10..13 {
            transport.send(2, &heartbeat(round));
        }
        let mut got = Vec::new();
        while got.last() != Some(&12) {
            got.push(round_of(&next(&mut inbox).await.1));
        }
        got.retain(|&round| round != 2);
        assert_eq!(got, vec![10, 11, 12]);

        server.stop().await;
    }

    #[tokio::test]
    async fn undecodable_message_is_skipped_and_stream_survives() {
        let (inbox_tx, mut inbox) = mpsc::channel(1024);
        let server = GracefulServer::start("127.0.0.1:0".parse().unwrap(), inbox_tx).await;

        // Dial by hand, to send a message with no kind.
        let mut client = PaxosClient::new(connect(server.addr).await);
        let (tx, rx) = mpsc::channel(8);
        let call = client.stream(stream_as("1", rx)).await.expect("open");

        tx.send(pb::PeerMessage {
            from: 1,
            kind: None,
        })
        .await
        .expect("send bad");
        tx.send(wire::message_to_pb(1, &heartbeat(5)))
            .await
            .expect("send good");

        let (from, msg) = next(&mut inbox).await;
        assert_eq!((from, round_of(&msg)), (1, 5));

        drop(call);
        drop(tx);
        server.stop().await;
    }

    #[tokio::test]
    async fn a_message_naming_another_sender_never_reaches_the_node() {
        let (inbox_tx, mut inbox) = mpsc::channel(1024);
        let server = GracefulServer::start("127.0.0.1:0".parse().unwrap(), inbox_tx).await;
        let mut client = PaxosClient::new(connect(server.addr).await);
        let (tx, rx) = mpsc::channel(8);
        let call = client.stream(stream_as("1", rx)).await.expect("open");

        // Replica 1's stream, carrying messages that say they are replica
        // 3's (a member) and the receiver's own, then one of its own.
        for forged_from in [3, 2] {
            tx.send(wire::message_to_pb(forged_from, &heartbeat(7)))
                .await
                .expect("send forged");
        }
        tx.send(wire::message_to_pb(1, &heartbeat(8)))
            .await
            .expect("send good");
        let (from, msg) = next(&mut inbox).await;
        assert_eq!(
            (from, round_of(&msg)),
            (1, 8),
            "the forged ones are dropped"
        );
        assert!(inbox.try_recv().is_err(), "nothing else arrived");

        // A stream that names no replica is refused: there would be no one
        // to hold its messages to.
        let (_tx, rx) = mpsc::channel::<pb::PeerMessage>(1);
        let mut request = stream_as("1", rx);
        request.metadata_mut().remove(REPLICA_ID);
        let status = client.stream(request).await.expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

        drop(call);
        drop(tx);
        server.stop().await;
    }

    #[tokio::test]
    async fn a_replica_of_another_cluster_is_refused_naming_both_clusters() {
        let (inbox_tx, mut inbox) = mpsc::channel(1024);
        let server = GracefulServer::start("127.0.0.1:0".parse().unwrap(), inbox_tx).await;
        let peers = peers(server.addr);
        let directory =
            Directory::new(1, peers.clone(), "127.0.0.1:9001".into()).with_cluster("staging");
        let transport = Transport::for_directory(&directory);
        transport.send(2, &heartbeat(1));
        time::sleep(Duration::from_millis(500)).await;
        assert!(!transport.peer_connected(2));
        assert!(
            inbox.try_recv().is_err(),
            "nothing of another cluster arrives"
        );

        // The same refusal, by hand, to read its status.
        let mut client = PaxosClient::new(connect(server.addr).await);
        let (_tx, rx) = mpsc::channel::<pb::PeerMessage>(1);
        let mut request = stream_as("1", rx);
        request
            .metadata_mut()
            .insert(CLUSTER, "staging".parse().expect("ascii"));
        let status = client.stream(request).await.expect_err("refused");
        assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
        assert!(
            status
                .message()
                .contains("replica 1 belongs to cluster \"staging\", this is cluster \"paxoskv\""),
            "{status:?}"
        );
        drop(transport);
        server.stop().await;
    }
}
