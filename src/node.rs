//! The async shell around the [`Driver`].
//!
//! One tokio task owns the driver (the consensus core and the calls waiting
//! on it) and runs a loop: take an input (a peer's message, a client's
//! request, a clock tick), then everything else already queued, then do
//! what the driver's [`Work`](crate::driver::Work) says — send, sync, send
//! what waited for the sync, answer, apply (a follower applies in batches:
//! see `Node::apply_due`). While a sync runs, new inputs queue up and go
//! into the next sync together: that is the group commit.
//!
//! Which caller gets which answer is decided by the driver, not here: this
//! module only turns its answers into replies on the callers' channels (a
//! read's value is read from the state machine when the driver says so).
//!
//! Two kinds of slow work run beside the loop and report back to it:
//! - a **checkpoint** every [`SnapshotPolicy::every`] applied slots: the
//!   storage makes the state machine durable and compacts the log, then
//!   the loop lets the core drop the votes it no longer needs;
//! - a **snapshot fetch** when the core asks for one: the chunks are
//!   fetched and written into an install beside the live state, then the
//!   loop switches it in (no apply runs meanwhile) and tells the core.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::driver::{Answer, Driver, Limits};
use crate::kv::{self, KvState, Op, Reply};
use crate::metrics as m;
use crate::paxos::{
    Ballot, Envelope, HandOffError, Membership, Message, NodeId, Persist, Replica, Role, Slot,
    SnapshotFetch, Status, Value,
};
use crate::storage::Storage;
use crate::storage::{Checkpoint, SnapshotInstall, SnapshotMeta, StorageError};
use crate::transport::Transport;

/// Why the node could not serve a call (decided by the [`Driver`]).
pub use crate::driver::CallError as NodeError;

type WriteReply = oneshot::Sender<Result<Reply, NodeError>>;
type ReadReply = oneshot::Sender<Result<Option<i32>, NodeError>>;

enum Request {
    Write {
        command: kv::Command,
        reply: WriteReply,
        /// When the caller stops waiting, if it said.
        deadline: Option<Instant>,
    },
    Read {
        key: String,
        reply: ReadReply,
    },
    Status {
        reply: oneshot::Sender<NodeStatus>,
    },
    Acceptor {
        slot: Slot,
        reply: oneshot::Sender<AcceptorView>,
    },
    HandOff {
        reply: oneshot::Sender<Result<NodeId, HandOffError>>,
    },
}

/// What this replica's acceptor holds for one slot, and its promise.
#[derive(Clone, Debug)]
pub struct AcceptorView {
    /// The highest ballot promised.
    pub promised: Ballot,
    /// The slot asked about.
    pub slot: Slot,
    /// Its vote for the slot, if it has one.
    pub vote: Option<(Ballot, Value)>,
    /// Every slot up to here is compacted: chosen, in the snapshot, and
    /// without a vote here.
    pub compacted: Slot,
    /// The highest slot with a vote here; 0 if none.
    pub last_slot: Slot,
}

/// What a node reports about itself.
#[derive(Clone, Debug)]
pub struct NodeStatus {
    /// The core's view.
    pub core: Status,
    /// The state machine has applied every slot up to this one.
    pub applied: Slot,
    /// The last snapshot recorded in the log; 0 if none.
    pub snapshot: Slot,
    /// Whether the stream to each peer is connected.
    pub connected: BTreeMap<NodeId, bool>,
    /// The core's clock period, to turn ticks into time.
    pub tick: Duration,
}

/// A cheap, cloneable way to call into a running node.
#[derive(Clone)]
pub struct NodeHandle {
    id: NodeId,
    requests: mpsc::Sender<Request>,
    leader: watch::Receiver<Option<NodeId>>,
    failure: watch::Receiver<Option<String>>,
}

impl NodeHandle {
    /// The replica's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The leader this replica currently follows (itself when leading).
    pub fn leader(&self) -> Option<NodeId> {
        *self.leader.borrow()
    }

    /// Why this replica's storage failed, once it has: the node then
    /// answers every call [`NodeError::Stopped`] until the process stops.
    pub fn failure(&self) -> Option<String> {
        self.failure.borrow().clone()
    }

    /// A receiver that sees the storage failure, for health reporting.
    pub fn watch_failure(&self) -> watch::Receiver<Option<String>> {
        self.failure.clone()
    }

    /// Waits until the known leader changes (or the node stops).
    pub async fn leader_changed(&mut self) -> Result<(), NodeError> {
        self.leader.changed().await.map_err(|_| NodeError::Stopped)
    }

    /// Proposes a write and waits until it is applied here; returns the
    /// state machine's reply. A write still waiting for a slot at
    /// `deadline` is taken back and answered [`NodeError::Expired`].
    pub async fn write(
        &self,
        key: String,
        op: Op,
        client_id: u64,
        sequence: u64,
        deadline: Option<Instant>,
    ) -> Result<Reply, NodeError> {
        let command = kv::Command {
            proposal_id: 0, // assigned by the driver, which knows which ids are free
            client_id,
            sequence,
            key,
            op,
        };
        let (reply, rx) = oneshot::channel();
        let request = Request::Write {
            command,
            reply,
            deadline,
        };
        self.call(request, rx).await?
    }

    /// A linearizable read of `key`.
    pub async fn read(&self, key: String) -> Result<Option<i32>, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.call(Request::Read { key, reply }, rx).await?
    }

    /// The acceptor's promise and its vote for `slot`, read-only.
    pub async fn acceptor(&self, slot: Slot) -> Result<AcceptorView, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.call(Request::Acceptor { slot, reply }, rx).await
    }

    /// As leader, hands leadership off before stopping ([`Driver::hand_off`]):
    /// returns the follower told to take over. Watch [`NodeHandle::leader`]
    /// (and [`NodeHandle::leader_changed`]) to learn when another leader is
    /// known.
    pub async fn hand_off(&self) -> Result<Result<NodeId, HandOffError>, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.call(Request::HandOff { reply }, rx).await
    }

    /// The core's view of the replica and, when leading, of its followers.
    pub async fn status(&self) -> Result<NodeStatus, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.call(Request::Status { reply }, rx).await
    }

    /// Hands `request` to the node and waits for its answer. A full queue
    /// refuses at once: waiting for room would only hold the call past its
    /// deadline.
    async fn call<T>(&self, request: Request, rx: oneshot::Receiver<T>) -> Result<T, NodeError> {
        self.requests.try_send(request).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => NodeError::Busy {
                what: "calls queued for the replica's loop",
                limit: REQUEST_QUEUE,
            },
            mpsc::error::TrySendError::Closed(_) => NodeError::Stopped,
        })?;
        rx.await.map_err(|_| NodeError::Stopped)
    }
}

/// The node's fatal failures: after one, the replica must stop.
#[derive(Debug)]
pub struct NodeFailure(pub String);

impl std::fmt::Display for NodeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NodeFailure {}

/// A deliberate bug, for tests only: switched on by the hidden flag
/// `paxoskv serve --unsafe-test-bug NAME`, which `paxoskv check --break
/// NAME` passes to every replica it starts. Each exists only to prove that
/// `paxoskv check` catches a real bug of its kind (see `tests/check.rs`); a
/// replica running one is not safe, and says so at start. Each switch is a
/// few lines in this file, marked `UNSAFE TEST BUG`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestBug {
    /// `forget-votes`: the acceptor answers `Accepted` but its votes (and
    /// the chosen values it learns) are never written to the log; promises
    /// still are. A restarted replica has forgotten what it voted: a sync
    /// bug of the kind the log's group commit exists to prevent.
    ForgetVotes,
    /// `ack-early`: the leader answers a write as soon as it proposes it,
    /// with the reply its state machine would give now, instead of the
    /// reply the command gets once its slot is chosen and applied.
    AckEarly,
    /// `local-reads`: every replica serves `Get` from its own state machine,
    /// without the leader or a ReadIndex round.
    LocalReads,
}

impl TestBug {
    /// Every bug, in the order `--help` texts list them.
    pub const ALL: [TestBug; 3] = [TestBug::ForgetVotes, TestBug::AckEarly, TestBug::LocalReads];

    /// The name the flags take.
    pub fn name(self) -> &'static str {
        match self {
            TestBug::ForgetVotes => "forget-votes",
            TestBug::AckEarly => "ack-early",
            TestBug::LocalReads => "local-reads",
        }
    }

    /// The bug called `name`; the error lists the names.
    pub fn parse(name: &str) -> Result<TestBug, String> {
        TestBug::ALL
            .into_iter()
            .find(|b| b.name() == name)
            .ok_or_else(|| {
                let names: Vec<_> = TestBug::ALL.iter().map(|b| b.name()).collect();
                format!("unknown test bug {name:?}; one of: {}", names.join(", "))
            })
    }
}

/// When this replica snapshots its state machine and compacts its log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotPolicy {
    /// Checkpoint every this many applied slots; 0 never.
    pub every: Slot,
    /// Slots kept in the log below each checkpoint, so that a follower a
    /// little behind catches up from the log rather than by snapshot.
    pub keep: Slot,
}

/// The longest a snapshot fetch may take before it is given up and asked
/// for again.
const FETCH_TIMEOUT: Duration = Duration::from_secs(120);

/// Slow work done beside the loop, reporting back.
enum Background {
    Checkpointed {
        result: Result<Checkpoint, StorageError>,
        started: Instant,
    },
    Fetched {
        from: NodeId,
        result: Result<Box<(SnapshotInstall, SnapshotMeta)>, String>,
        started: Instant,
    },
}

/// A write's caller, and when it was proposed (for the commit latency).
type WriteWaiter = (WriteReply, Instant);

/// A sync for the log writer: what one round asked to persist, numbered in
/// the order asked.
struct SyncJob {
    seq: u64,
    persist: Persist,
}

/// The log writer's report: every job up to `through` is durable, or the
/// sync failed (and the writer stopped).
struct Synced {
    through: u64,
    result: Result<(), StorageError>,
    took: Duration,
    bytes: u64,
}

/// What a round leaves for after its sync and every earlier one: the
/// replies that vouch for what was written, and the slots to apply.
struct AfterSync {
    /// The last sync this round waits for.
    seq: u64,
    persisted_messages: Vec<Envelope>,
    chosen: Vec<(Slot, Value)>,
}

/// Starts the log writer, a thread of its own: it takes the jobs in order,
/// writes every job waiting when it wakes in one group commit (one
/// `fdatasync`), and reports each sync. So the node loop goes on taking
/// messages and calls (and sending its accepts) while a sync runs, and
/// what arrives meanwhile goes into the next one. It stops when the jobs'
/// sender is dropped, or after a failed sync: the log is then poisoned.
fn start_log_writer(
    storage: Arc<Storage>,
    mut jobs: mpsc::UnboundedReceiver<SyncJob>,
    done: mpsc::UnboundedSender<Synced>,
) -> std::io::Result<std::sync::mpsc::Receiver<()>> {
    // Disconnected once the thread has let go of the storage.
    let (exiting, exited) = std::sync::mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("paxoskv-log".into())
        .spawn(move || {
            while let Some(SyncJob { seq, mut persist }) = jobs.blocking_recv() {
                let mut through = seq;
                while let Ok(next) = jobs.try_recv() {
                    through = next.seq;
                    persist.absorb(next.persist);
                }
                let (started, written) = (std::time::Instant::now(), storage.bytes_written());
                let result = storage.persist(&persist);
                let failed = result.is_err();
                let synced = Synced {
                    through,
                    result,
                    took: started.elapsed(),
                    bytes: storage.bytes_written() - written,
                };
                if done.send(synced).is_err() || failed {
                    break;
                }
            }
            drop(storage);
            drop(exiting);
        })?;
    Ok(exited)
}

/// The async shell: owns the [`Driver`] (the core and its waiting calls)
/// and the I/O it asks for.
pub struct Node {
    driver: Driver<WriteWaiter, ReadReply>,
    storage: Arc<Storage>,
    transport: Transport,
    tick: Duration,
    peer_rx: mpsc::Receiver<(NodeId, Message)>,
    requests: mpsc::Receiver<Request>,
    leader_tx: watch::Sender<Option<NodeId>>,
    failure_tx: watch::Sender<Option<String>>,
    ticks: u64,
    last_role: Role,
    /// When a refused peer message was last logged, and how many since.
    refused_log: (Option<Instant>, u64),
    last_membership: Option<Membership>,
    policy: SnapshotPolicy,
    /// The last checkpoint's (or install's) index.
    last_snapshot: Slot,
    checkpointing: bool,
    fetching: bool,
    background_tx: mpsc::Sender<Background>,
    background_rx: mpsc::Receiver<Background>,
    /// Jobs for the log writer ([`start_log_writer`]), and its reports.
    sync_jobs: mpsc::UnboundedSender<SyncJob>,
    synced_rx: mpsc::UnboundedReceiver<Synced>,
    /// The last sync asked for, and the last known durable.
    sync_asked: u64,
    sync_durable: u64,
    /// Rounds waiting for their sync, oldest first.
    after_sync: VecDeque<AfterSync>,
    /// Slots known chosen and durable here, not yet applied; a follower
    /// applies them in batches ([`Node::apply_due`]).
    unapplied: Vec<(Slot, Value)>,
    /// Disconnected once the log writer has stopped and let go of the
    /// storage (see `Drop`).
    log_writer_exited: std::sync::mpsc::Receiver<()>,
    /// A deliberate bug, for `paxoskv check --break` only; see [`TestBug`].
    test_bug: Option<TestBug>,
}

/// A follower applies chosen slots once this many wait, or every tick.
const FOLLOWER_APPLY_BATCH: usize = 64;

/// How many inputs one loop iteration takes before it syncs.
const MAX_INPUTS_PER_ROUND: usize = 4096;

/// Calls handed to the node loop and not yet taken in; past this a call is
/// refused ([`NodeError::Busy`]). The loop takes calls in far faster than
/// the log commits them, so this fills only when the loop stalls.
const REQUEST_QUEUE: usize = 16 * 1024;

impl Node {
    /// A node over `replica` (already restored from `storage`); messages from
    /// peers arrive on `peer_rx`. Returns the node to run and a handle to it.
    pub fn new(
        replica: Replica,
        storage: Arc<Storage>,
        transport: Transport,
        peer_rx: mpsc::Receiver<(NodeId, Message)>,
        tick: Duration,
        policy: SnapshotPolicy,
    ) -> std::io::Result<(Node, NodeHandle)> {
        let (tx, requests) = mpsc::channel(REQUEST_QUEUE);
        let (sync_jobs, jobs) = mpsc::unbounded_channel();
        let (synced_tx, synced_rx) = mpsc::unbounded_channel();
        let log_writer_exited = start_log_writer(Arc::clone(&storage), jobs, synced_tx)?;
        let (leader_tx, leader) = watch::channel(None);
        let (failure_tx, failure) = watch::channel(None);
        let id = replica.id();
        let applied = replica.committed();
        // Proposal ids need only be unique among this replica's waiters;
        // starting from the clock keeps a restarted replica from matching a
        // reply to a proposal of its previous life.
        let first_proposal = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            ^ (u64::from(id) << 56);
        let (background_tx, background_rx) = mpsc::channel(4);
        let last_membership = replica.status().membership;
        if last_membership == Some(Membership::Learner) {
            warn!(
                replica = id,
                "this replica lost its data (or may have): rejoining as a non-voting learner until it has caught up"
            );
        }
        let node = Node {
            last_membership,
            policy,
            last_snapshot: storage.snapshot_index(),
            checkpointing: false,
            fetching: false,
            background_tx,
            background_rx,
            sync_jobs,
            synced_rx,
            sync_asked: 0,
            sync_durable: 0,
            after_sync: VecDeque::new(),
            unapplied: Vec::new(),
            log_writer_exited,
            last_role: Role::Follower,
            refused_log: (None, 0),
            driver: Driver::new(replica, applied, first_proposal),
            storage,
            transport,
            tick,
            peer_rx,
            requests,
            leader_tx,
            failure_tx,
            ticks: 0,
            test_bug: None,
        };
        Ok((
            node,
            NodeHandle {
                id,
                requests: tx,
                leader,
                failure,
            },
        ))
    }

    /// Bounds the calls waiting on this replica (see [`Limits`]).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.driver.set_limits(limits);
        self
    }

    /// Switches on a deliberate bug (none if `None`): for `paxoskv check
    /// --break` only, to prove that it catches real bugs. See [`TestBug`].
    pub fn with_test_bug(mut self, bug: Option<TestBug>) -> Self {
        if let Some(bug) = bug {
            warn!(
                replica = self.driver.replica().id(),
                bug = bug.name(),
                "UNSAFE: this replica runs a deliberate bug (--unsafe-test-bug), to test paxoskv check; it is NOT consistent; never use it for data"
            );
        }
        self.test_bug = bug;
        self
    }

    /// Runs until `shutdown` turns true (or every handle is gone). Calls in
    /// flight are then failed with [`NodeError::Stopped`].
    ///
    /// If the storage fails (a write or sync to disk returns an error, the
    /// disk is full), the replica may not answer anything that depends on
    /// what it could not persist: it halts until `shutdown`,
    /// and then returns the failure.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), NodeFailure> {
        match self.serve(&mut shutdown).await {
            Ok(()) => {
                info!(replica = self.driver.replica().id(), "node stopping");
                let answers = self.driver.stop();
                self.answer(answers)
            }
            Err(failure) => self.halted(failure, shutdown).await,
        }
    }

    async fn serve(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<(), NodeFailure> {
        let mut ticker = tokio::time::interval(self.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Whether this round took client calls and nothing else.
            let mut only_calls = false;
            tokio::select! {
                biased;
                _ = shutdown.changed() => return Ok(()),
                synced = self.synced_rx.recv() => match synced {
                    Some(synced) => self.on_synced(synced)?,
                    // It reports every sync, a failed one included, and
                    // stops on its own only after a failure: it panicked.
                    None => return Err(NodeFailure("the log writer thread stopped".into())),
                },
                Some((from, msg)) = self.peer_rx.recv() => self.step_peer(from, msg),
                request = self.requests.recv() => match request {
                    Some(request) => {
                        only_calls = true;
                        self.on_request(request);
                    }
                    None => return Ok(()),
                },
                _ = ticker.tick() => self.on_tick()?,
                Some(done) = self.background_rx.recv() => self.on_background(done).await?,
            }
            // Everything already waiting joins this round (and its sync).
            for _ in 0..MAX_INPUTS_PER_ROUND {
                if let Ok((from, msg)) = self.peer_rx.try_recv() {
                    only_calls = false;
                    self.step_peer(from, msg);
                } else if let Ok(request) = self.requests.try_recv() {
                    self.on_request(request);
                } else {
                    break;
                }
            }
            // Calls that arrive while a sync runs wait for it to finish,
            // then go into slots together: one slot per few calls would
            // cost more messages and CPU per call than the sync they would
            // not wait for. A call on an idle replica goes out at once.
            if only_calls && self.sync_asked > self.sync_durable {
                continue;
            }
            self.process_ready()?;
            self.publish_leader();
        }
    }

    /// After a storage failure: this replica's acceptor state on disk is not
    /// what the core holds, so it sends nothing, answers no peer and serves
    /// no call (each gets [`NodeError::Stopped`]; [`NodeHandle::failure`]
    /// says why) until `shutdown`. It is not a panic: whatever is on disk
    /// stays as it was, and a restart recovers from it (the log's scan
    /// truncates a torn tail). Health and metrics report the failure.
    async fn halted(
        mut self,
        failure: NodeFailure,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), NodeFailure> {
        let id = self.driver.replica().id();
        error!(
            replica = id,
            error = %failure,
            "storage failed: this replica no longer votes or serves calls; fix the disk and restart it (it recovers from what is on disk)"
        );
        metrics::gauge!(m::STORAGE_FAILED).set(1.0);
        metrics::gauge!(m::IS_LEADER).set(0.0);
        // Published before the callers waiting are answered, so that each
        // is told why.
        self.failure_tx.send_replace(Some(failure.0.clone()));
        self.leader_tx.send_replace(None);
        let answers = self.driver.stop();
        // `stop` answers with errors only: no read touches the storage.
        let _ = self.answer(answers);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                // Read and dropped, so that the peers' streams do not stall.
                Some(_) = self.peer_rx.recv() => {}
                request = self.requests.recv() => match request {
                    Some(Request::Write { reply, .. }) => {
                        let _ = reply.send(Err(NodeError::Stopped));
                    }
                    Some(Request::Read { reply, .. }) => {
                        let _ = reply.send(Err(NodeError::Stopped));
                    }
                    // Dropping the reply answers the caller `Stopped`.
                    Some(
                        Request::Status { .. } | Request::Acceptor { .. } | Request::HandOff { .. },
                    ) => {}
                    None => break,
                },
                Some(_) = self.background_rx.recv() => {}
            }
        }
        info!(replica = id, "node stopping");
        Err(failure)
    }

    /// Hands a peer's message to the core. A refusal (which honest members
    /// never cause) is logged at most once a second.
    fn step_peer(&mut self, from: NodeId, msg: Message) {
        if let Err(refused) = self.driver.step(from, msg) {
            let (last, suppressed) = &mut self.refused_log;
            if last.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                warn!(replica = self.driver.replica().id(), peer = from, %refused, suppressed = *suppressed, "refused a peer's message");
                *last = Some(Instant::now());
                *suppressed = 0;
            } else {
                *suppressed += 1;
            }
        }
    }

    fn on_tick(&mut self) -> Result<(), NodeFailure> {
        self.apply_due(true)?;
        self.driver.tick();
        self.ticks += 1;
        // Callers that gave up (deadline passed) leave their waiter behind;
        // sweep those now and then.
        if self.ticks.is_multiple_of(100) {
            self.driver
                .retain_callers(|(tx, _)| !tx.is_closed(), |tx| !tx.is_closed());
        }
        if self.ticks.is_multiple_of(10) {
            self.export_metrics();
        }
        Ok(())
    }

    fn on_request(&mut self, request: Request) {
        match request {
            // UNSAFE TEST BUG (ack-early), see `TestBug::AckEarly`: the
            // reply the state machine would give now, before any slot.
            // Its caller has gone (cancelled, or its deadline passed while
            // the call waited in the queue): not worth a slot.
            Request::Write { reply, .. } if reply.is_closed() => {}
            Request::Read { reply, .. } if reply.is_closed() => {}
            Request::Write { command, reply, .. }
                if self.test_bug == Some(TestBug::AckEarly)
                    && command.op != Op::OpenSession
                    && self.driver.replica().is_leader() =>
            {
                let mut now = kv::MemState::new();
                if let Ok(Some(value)) = self.storage.get(&command.key) {
                    now.put(&command.key, value);
                }
                let command_now = kv::Command {
                    client_id: 0,
                    ..command.clone()
                };
                let early = kv::apply_slot(
                    &mut now,
                    &kv::SessionLimits::DEFAULT,
                    0,
                    std::slice::from_ref(&command_now),
                );
                let _ = reply.send(Ok(early
                    .into_iter()
                    .next()
                    .unwrap_or(Reply::SessionExpired)));
                let (ignored, _) = oneshot::channel();
                self.driver.write(command, (ignored, Instant::now()), None);
            }
            Request::Write {
                command,
                reply,
                deadline,
            } => {
                let deadline = deadline.map(|d| self.deadline_tick(d));
                self.driver
                    .write(command, (reply, Instant::now()), deadline);
            }
            // UNSAFE TEST BUG (local-reads), see `TestBug::LocalReads`.
            Request::Read { key, reply } if self.test_bug == Some(TestBug::LocalReads) => {
                let _ = reply.send(self.storage.get(&key).map_err(|_| NodeError::Stopped));
            }
            Request::Read { key, reply } => self.driver.read(key, reply),
            Request::Status { reply } => {
                let replica = self.driver.replica();
                let connected = replica
                    .config()
                    .peers()
                    .map(|p| (p, self.transport.peer_connected(p)))
                    .collect();
                let _ = reply.send(NodeStatus {
                    core: replica.status(),
                    applied: self.driver.applied(),
                    snapshot: self.storage.snapshot_index(),
                    connected,
                    tick: self.tick,
                });
            }
            Request::HandOff { reply } => {
                let result = self.driver.hand_off();
                match result {
                    Ok(target) => info!(
                        replica = self.driver.replica().id(),
                        target, "handing leadership off: told the follower to campaign now"
                    ),
                    Err(e) => info!(
                        replica = self.driver.replica().id(),
                        reason = %e,
                        "cannot hand leadership off"
                    ),
                }
                let _ = reply.send(result);
            }
            Request::Acceptor { slot, reply } => {
                let acceptor = self.driver.replica().acceptor();
                let _ = reply.send(AcceptorView {
                    promised: acceptor.promised(),
                    slot,
                    vote: acceptor.vote(slot).map(|(b, v)| (b, v.clone())),
                    compacted: acceptor.compacted(),
                    last_slot: acceptor.last_slot(),
                });
            }
        }
    }

    /// The driver's tick by which `deadline` has passed.
    fn deadline_tick(&self, deadline: Instant) -> u64 {
        let left = deadline.saturating_duration_since(Instant::now());
        let ticks = left.as_nanos().div_ceil(self.tick.as_nanos().max(1));
        self.driver
            .now()
            .saturating_add(u64::try_from(ticks).unwrap_or(u64::MAX))
    }

    /// Does what the driver asks until it asks nothing more. Each round's
    /// messages go out at once; its persist goes to the log writer, and
    /// what depends on it waits in `after_sync` for the writer's report
    /// ([`Node::on_synced`]), in order (see [`crate::paxos::Ready`]).
    fn process_ready(&mut self) -> Result<(), NodeFailure> {
        let id = self.driver.replica().id();
        loop {
            let work = self.driver.take_ready();
            if work.is_empty() {
                return Ok(());
            }
            let mut to_self = Vec::new();
            for e in work.messages {
                if let Message::CatchUpRequest {
                    ballot,
                    from_slot,
                    to_slot,
                    ..
                } = &e.msg
                {
                    info!(replica = id, leader = e.to, %ballot, from_slot, to_slot, "catching up");
                }
                if e.to == id {
                    to_self.push(e.msg);
                } else {
                    self.transport.send(e.to, &e.msg);
                }
            }
            self.answer(work.answers)?;
            if let Some(fetch) = work.fetch_snapshot {
                self.start_fetch(fetch);
            }
            if !work.persist.is_empty() {
                let mut persist = work.persist;
                // UNSAFE TEST BUG (forget-votes), see `TestBug::ForgetVotes`.
                if self.test_bug == Some(TestBug::ForgetVotes) {
                    persist.entries.clear();
                }
                self.sync_asked += 1;
                let job = SyncJob {
                    seq: self.sync_asked,
                    persist,
                };
                self.sync_jobs
                    .send(job)
                    .map_err(|_| NodeFailure("the log writer stopped".into()))?;
            }
            self.after_sync.push_back(AfterSync {
                seq: self.sync_asked,
                persisted_messages: work.persisted_messages,
                chosen: work.chosen,
            });
            to_self.extend(self.run_synced()?);
            for msg in to_self {
                self.driver.step_own(msg);
            }
        }
    }

    /// The log writer made syncs durable (or failed: the replica halts).
    fn on_synced(&mut self, synced: Synced) -> Result<(), NodeFailure> {
        synced
            .result
            .map_err(|e| NodeFailure(format!("storage: {e}")))?;
        metrics::histogram!(m::SYNC_DURATION).record(synced.took.as_secs_f64());
        metrics::counter!(m::WRITTEN_BYTES).increment(synced.bytes);
        self.export_log_size();
        debug_assert!(synced.through > self.sync_durable && synced.through <= self.sync_asked);
        self.sync_durable = synced.through;
        for msg in self.run_synced()? {
            self.driver.step_own(msg);
        }
        Ok(())
    }

    /// Finishes, in order, the rounds whose syncs are durable: sends the
    /// replies that vouch for what was written and applies what is chosen.
    /// Returns the messages addressed to this replica, for the core.
    fn run_synced(&mut self) -> Result<Vec<Message>, NodeFailure> {
        let id = self.driver.replica().id();
        let mut to_self = Vec::new();
        while self
            .after_sync
            .front()
            .is_some_and(|round| round.seq <= self.sync_durable)
        {
            let Some(round) = self.after_sync.pop_front() else {
                break;
            };
            for e in round.persisted_messages {
                if e.to == id {
                    to_self.push(e.msg);
                } else {
                    self.transport.send(e.to, &e.msg);
                }
            }
            self.unapplied.extend(round.chosen);
        }
        self.apply_due(false)?;
        Ok(to_self)
    }

    /// Applies the chosen slots waiting in `unapplied`: at once on the
    /// leader, whose callers wait for the replies; on a follower, once
    /// [`FOLLOWER_APPLY_BATCH`] slots wait, or when `force` (every tick).
    ///
    /// Why followers wait: each sled transaction wakes every idle thread
    /// of sled's I/O pool (its `notify_all`) twice, and on a follower that
    /// work competes for the CPU with the `Accepted` every write waits
    /// for. Nothing on a follower waits for its applied index (reads and
    /// writes are served by the leader; a replica that becomes leader
    /// applies in its first round as leader), so applying a tick's slots
    /// in one transaction costs it nothing.
    fn apply_due(&mut self, force: bool) -> Result<(), NodeFailure> {
        let due = force
            || self.unapplied.len() >= FOLLOWER_APPLY_BATCH
            || self.driver.replica().is_leader();
        if !due || self.unapplied.is_empty() {
            return Ok(());
        }
        // Slots a snapshot installed meanwhile are in the state machine
        // already.
        let applied = self.driver.applied();
        let chosen: Vec<_> = std::mem::take(&mut self.unapplied)
            .into_iter()
            .filter(|(slot, _)| *slot > applied)
            .collect();
        if !chosen.is_empty() {
            self.apply(chosen)?;
            self.maybe_checkpoint();
        }
        Ok(())
    }

    /// Starts a checkpoint if one is due and none is running.
    fn maybe_checkpoint(&mut self) {
        let due = self.last_snapshot.saturating_add(self.policy.every);
        if self.policy.every == 0 || self.checkpointing || self.driver.applied() < due {
            return;
        }
        self.checkpointing = true;
        let (storage, tx) = (Arc::clone(&self.storage), self.background_tx.clone());
        let keep = self.policy.keep;
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let result = storage.checkpoint(keep);
            let _ = tx.blocking_send(Background::Checkpointed { result, started });
        });
    }

    /// Starts fetching the snapshot the core asked for, unless a fetch is
    /// running (the core asks again while it still needs one).
    fn start_fetch(&mut self, fetch: SnapshotFetch) {
        if self.fetching {
            return;
        }
        let id = self.driver.replica().id();
        let Some(endpoint) = self.transport.snapshot_source(fetch.from) else {
            warn!(
                replica = id,
                from = fetch.from,
                "asked to fetch a snapshot from an unknown replica"
            );
            return;
        };
        info!(
            replica = id,
            from = fetch.from,
            min_index = fetch.min_index,
            "fetching a snapshot"
        );
        self.fetching = true;
        let (storage, tx) = (Arc::clone(&self.storage), self.background_tx.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let fetched = crate::transfer::fetch(storage, id, &endpoint, fetch.min_index);
            let result = match tokio::time::timeout(FETCH_TIMEOUT, fetched).await {
                Ok(result) => result.map(Box::new),
                Err(_) => Err(format!("no complete snapshot within {FETCH_TIMEOUT:?}")),
            };
            let _ = tx
                .send(Background::Fetched {
                    from: fetch.from,
                    result,
                    started,
                })
                .await;
        });
    }

    /// Finishes what a background task started.
    async fn on_background(&mut self, done: Background) -> Result<(), NodeFailure> {
        let id = self.driver.replica().id();
        match done {
            Background::Checkpointed { result, started } => {
                self.checkpointing = false;
                // A failed checkpoint is a failed fsync or a poisoned log:
                // nothing on disk can be trusted to be as we think.
                let cp = result.map_err(|e| NodeFailure(format!("checkpoint: {e}")))?;
                let took = started.elapsed();
                self.last_snapshot = self.last_snapshot.max(cp.snapshot);
                self.driver.compact(cp.compacted.min(self.driver.applied()));
                metrics::histogram!(m::SNAPSHOT_DURATION).record(took.as_secs_f64());
                metrics::counter!(m::SNAPSHOTS).increment(1);
                metrics::gauge!(m::SNAPSHOT_INDEX).set(cp.snapshot as f64);
                metrics::gauge!(m::SNAPSHOT_ENTRIES).set(cp.entries as f64);
                self.export_log_size();
                debug!(
                    replica = id,
                    snapshot = cp.snapshot,
                    compacted = cp.compacted,
                    segments_deleted = cp.segments_deleted,
                    ?took,
                    "checkpoint"
                );
            }
            Background::Fetched {
                from,
                result,
                started,
            } => {
                let finished = match result {
                    Ok(fetched) => {
                        let (install, meta) = *fetched;
                        // Not `blocking`: a snapshot that does not match its
                        // digest is refused, and the replica goes on.
                        let storage = Arc::clone(&self.storage);
                        match tokio::task::spawn_blocking(move || {
                            storage.finish_install(install, meta)
                        })
                        .await
                        {
                            Ok(Ok(())) => Ok(meta),
                            Ok(Err(e)) => Err(format!("installing: {e}")),
                            Err(e) => Err(format!("install task: {e}")),
                        }
                    }
                    Err(e) => Err(e),
                };
                self.fetching = false;
                match finished {
                    Ok(meta) => {
                        let took = started.elapsed();
                        info!(
                            replica = id,
                            from,
                            applied = meta.applied,
                            entries = meta.digest.entries,
                            ?took,
                            "installed a snapshot"
                        );
                        self.last_snapshot = self.last_snapshot.max(meta.applied);
                        self.driver.snapshot_installed(meta.applied);
                        metrics::counter!(m::SNAPSHOTS_INSTALLED).increment(1);
                        metrics::histogram!(m::SNAPSHOT_INSTALL_DURATION)
                            .record(took.as_secs_f64());
                        metrics::gauge!(m::SNAPSHOT_INDEX).set(meta.applied as f64);
                        metrics::gauge!(m::SNAPSHOT_ENTRIES).set(meta.digest.entries as f64);
                        self.export_log_size();
                        self.process_ready()?;
                    }
                    // The core asks again, rate-limited, while it still needs one.
                    Err(e) => warn!(replica = id, from, error = %e, "snapshot fetch failed"),
                }
            }
        }
        Ok(())
    }

    fn export_log_size(&self) {
        let (segments, bytes) = self.storage.log_size();
        metrics::gauge!(m::LOG_SEGMENTS).set(segments as f64);
        metrics::gauge!(m::LOG_BYTES).set(bytes as f64);
    }

    fn apply(&mut self, chosen: Vec<(Slot, Value)>) -> Result<(), NodeFailure> {
        let last = chosen
            .last()
            .map_or(self.driver.applied(), |(slot, _)| *slot);
        for (_, value) in &chosen {
            if let Value::Batch(commands) = value {
                metrics::counter!(m::COMMANDS_COMMITTED).increment(commands.len() as u64);
                metrics::histogram!(m::BATCH_SIZE).record(commands.len() as f64);
            }
        }
        // On the loop itself, as reads are served: one sled transaction
        // with no flush takes microseconds, less than handing it to another
        // thread and back.
        let replies = self
            .storage
            .apply(&chosen)
            .map_err(|e| NodeFailure(format!("storage: {e}")))?;
        let answers = self.driver.applied_through(last, replies);
        self.answer(answers)
    }

    /// Delivers the driver's answers; a read is served from the state
    /// machine as it is now.
    fn answer(&self, answers: Vec<Answer<WriteWaiter, ReadReply>>) -> Result<(), NodeFailure> {
        for answer in answers {
            match answer {
                Answer::Write {
                    caller: (tx, proposed),
                    result,
                } => {
                    if result.is_ok() {
                        metrics::histogram!(m::COMMIT_DURATION)
                            .record(proposed.elapsed().as_secs_f64());
                    }
                    let _ = tx.send(result);
                }
                Answer::Read {
                    caller,
                    result: Ok(key),
                } => {
                    let value = self
                        .storage
                        .get(&key)
                        .map_err(|e| NodeFailure(format!("reading {key:?}: {e}")))?;
                    let _ = caller.send(Ok(value));
                }
                Answer::Read {
                    caller,
                    result: Err(e),
                } => {
                    let _ = caller.send(Err(e));
                }
            }
        }
        Ok(())
    }

    fn publish_leader(&mut self) {
        let status = self.driver.replica().status();
        if status.membership != self.last_membership {
            match status.membership {
                Some(Membership::Voter) if self.last_membership.is_none() => {
                    info!(
                        replica = status.id,
                        "every peer is new too: a new cluster; voting"
                    )
                }
                Some(Membership::Voter) => info!(
                    replica = status.id,
                    committed = status.committed,
                    "caught up after losing its data: voting again"
                ),
                Some(Membership::Learner) => warn!(
                    replica = status.id,
                    "this replica lost its data (or may have): rejoining as a non-voting learner until it has caught up"
                ),
                None => {}
            }
            self.last_membership = status.membership;
        }
        if status.role != self.last_role {
            match status.role {
                Role::Leader => info!(
                    replica = status.id,
                    ballot = %status.promised,
                    committed = status.committed,
                    "elected leader"
                ),
                Role::Candidate => debug!(replica = status.id, "campaigning"),
                Role::Follower if self.last_role == Role::Leader => warn!(
                    replica = status.id,
                    ballot = %status.promised,
                    "lost leadership"
                ),
                Role::Follower => {}
            }
            self.last_role = status.role;
        }
        self.leader_tx.send_if_modified(|leader| {
            if *leader != status.leader {
                if let Some(l) = status.leader
                    && status.role == Role::Follower
                {
                    info!(replica = status.id, leader = l, ballot = %status.promised, "following leader");
                }
                *leader = status.leader;
                metrics::counter!(m::LEADER_CHANGES).increment(1);
                true
            } else {
                false
            }
        });
    }
}

impl Node {
    /// Sets the gauges that describe this replica and, as leader, its
    /// followers.
    fn export_metrics(&self) {
        let status = self.driver.replica().status();
        let leading = status.role == Role::Leader;
        metrics::gauge!(m::COMMIT_INDEX).set(status.committed as f64);
        metrics::gauge!(m::APPLIED_INDEX).set(self.driver.applied() as f64);
        metrics::gauge!(m::BALLOT_ROUND).set(status.promised.round as f64);
        metrics::gauge!(m::IS_LEADER).set(if leading { 1.0 } else { 0.0 });
        metrics::gauge!(m::IN_FLIGHT).set(status.in_flight as f64);
        metrics::counter!(m::ELECTIONS).absolute(status.elections);
        metrics::counter!(m::HANDOFF_ELECTIONS).absolute(status.handoff_elections);
        metrics::counter!(m::PEER_MESSAGES_DROPPED).absolute(self.transport.dropped());
        for peer in self.driver.replica().config().peers() {
            let label = peer.to_string();
            let up = self.transport.peer_connected(peer);
            metrics::gauge!(m::PEER_REACHABLE, "peer" => label.clone()).set(if up {
                1.0
            } else {
                0.0
            });
            // Only a leader knows its followers; elsewhere these read 0.
            let follower = status.followers.iter().find(|f| f.id == peer);
            let lag = follower.map_or(0, |f| status.committed.saturating_sub(f.committed));
            let silence =
                follower.map_or(0.0, |f| (f.silent_ticks as f64) * self.tick.as_secs_f64());
            metrics::gauge!(m::FOLLOWER_LAG, "peer" => label.clone()).set(lag as f64);
            metrics::gauge!(m::FOLLOWER_SILENCE, "peer" => label).set(silence);
        }
    }
}

impl Drop for Node {
    /// Stops the log writer and waits (a few seconds at most, in case a sync
    /// hangs on a dead disk) until it has let go of the storage, so that
    /// whoever opens the data directory next finds it free.
    fn drop(&mut self) {
        let (closed, _) = mpsc::unbounded_channel();
        drop(std::mem::replace(&mut self.sync_jobs, closed));
        let _ = self.log_writer_exited.recv_timeout(Duration::from_secs(5));
    }
}
