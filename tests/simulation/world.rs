//! A deterministic world for the consensus core: replicas, a faulty network,
//! crashing disks, and clients that retry — all driven by one seed.
//!
//! Each replica runs the shipping [`Driver`] — the core plus the bookkeeping
//! of its waiting calls, the very code `paxoskv serve` runs — with a
//! simulated disk (only what a `Work` asked to persist survives a crash) and
//! a state machine (applied entries survive, as sled's do). The network
//! drops, duplicates, delays (and so reorders) and partitions messages.
//! Replicas checkpoint their state machine and compact their logs; a
//! replica the log cannot catch up fetches a snapshot from another and
//! installs it (transfers fail, crash midway, or complete late); a crash
//! may wipe a disk (and state machine), after which the replica restarts
//! with an empty data directory and must rejoin as a learner first; and
//! some clusters start with empty data directories and bootstrap.
//! Clients open a session first, then send each operation to a random
//! replica and retry through others on redirects and timeouts, keeping
//! their `(client_id, sequence)` so a retried write applies once. Sessions
//! are kept under small limits (drawn per seed), so they expire and are
//! evicted while clients still use them: a write then gets "session
//! expired", its outcome unknown to its client, which opens a new session.
//!
//! After every step the world checks safety, from what each replica has
//! persisted, never from what a replica believes:
//! - two votes for one slot under one ballot carry the same value;
//! - no two values are ever chosen (held durably by a majority under one
//!   ballot) for one slot;
//! - **chosen value**: whenever a replica treats a slot as chosen (commits
//!   it, applies it, answers a client from it), a majority holds that very
//!   value durably under one ballot;
//! - **durability order**: a `Promise`, `Accepted` or `HeartbeatAck` leaves
//!   a replica only when its disk already holds what the message reports
//!   (or held it, durably, before a compaction dropped it);
//! - **only voters vote**: a learner or unknown replica never sends a
//!   `Promise`, `Accepted`, `HeartbeatAck`, `Nack` or pre-vote answer;
//! - **fresh means blank**: `ProbeReply { fresh: true }` comes only from a
//!   replica whose disk and state machine hold nothing, not a learner;
//! - **installs**: an installed snapshot at A is the reference state
//!   machine over the chosen log through A;
//! - every replica's applied log is a prefix of one log, and equal applied
//!   prefixes give equal KV state;
//! - **answers**: every call a replica takes is answered exactly once (or
//!   dies with the replica); a write with the reply its command got in the
//!   chosen log; "certainly not in the log" only for commands never chosen;
//! - **exactly once**: in the chosen log, a write (client id, sequence) is
//!   executed at most once, and never after any copy of it was refused as
//!   "session expired" (observed from the state machine's reads of the
//!   key, not from its replies);
//! - **reads**: a read is served from a state that includes every slot
//!   applied anywhere before it arrived, and a leader that a majority had
//!   durably deposed when a read arrived never serves it (the
//!   leader-isolation fault steers reads to the deposed leader to give it
//!   the chance).
//!
//! On some seeds the leader is told, now and then, to hand leadership off
//! (`Driver::hand_off`, as `paxoskv serve` does on SIGTERM); sometimes its
//! target then crashes, is cut off, or freezes, so the hand-off must fail
//! safely (the leader resumes, or an ordinary election follows). Every
//! check above runs throughout.
//!
//! At the end it heals the network, restarts everyone, requires every
//! operation and every call to complete, every replica to converge and to
//! be a durable voter (within a bound: wiped ones rejoined), and checks the
//! client history for linearizability.
//!
//! The safety ledger (`votes`, `truly_chosen`) is history: it keeps every
//! vote ever durable, so a value once chosen stays the chosen one when
//! disks compact or are wiped.

use std::cell::Cell;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};

use paxoskv::driver::{Answer, CallError, Driver, Limits, Work};
use paxoskv::forwarding::{Batch, Link, Lost};
use paxoskv::kv::{Command, KvState, MemState, Op, Reply, Session, SessionLimits, SlotApplier};
use paxoskv::paxos::rng::Rng;
use paxoskv::paxos::{
    Accepted, Ballot, Config, Envelope, Membership, Message, NodeId, Persist, Replica, Restore,
    Slot, SnapshotFetch, Value,
};

use paxoskv::check::linearizability::{self, Input, Operation, Output};

/// What one seed runs: sizes and fault rates, all drawn from the seed.
#[derive(Clone, Debug)]
pub struct Params {
    pub replicas: u32,
    pub clients: usize,
    pub keys: usize,
    pub ops: usize,
    /// Probability that a message is lost.
    pub drop: f64,
    /// Probability that a message is delivered twice.
    pub duplicate: f64,
    /// Messages take 1..=max_delay ticks; different delays reorder them.
    pub max_delay: u64,
    /// Per tick: probability of a crash of a random replica.
    pub crash: f64,
    /// Per tick: probability that the partition changes.
    pub partition: f64,
    /// Probability that a crash strikes between sending and syncing a Ready.
    pub torn_ready: f64,
    /// A sync takes 0..=max_sync ticks; the replica keeps working meanwhile.
    pub max_sync: u64,
    /// Per tick: probability that a random replica freezes (a long GC or VM
    /// pause): no ticks, no messages, until it resumes and finds them queued.
    pub pause: f64,
    /// Probability that a message arrives very late (one to ten election
    /// timeouts), as messages queued for a disconnected peer do when the
    /// stream comes back: stale votes and promises reach a replica that has
    /// moved on, even one re-elected under a newer ballot.
    pub late: f64,
    /// Probability that the state machine applies what was chosen only a
    /// few ticks later (in order), so reads and writers wait for it.
    pub apply_lag: f64,
    /// A replica checkpoints its state machine every this many applied
    /// slots (0: never, and nothing is ever compacted).
    pub snapshot_every: u64,
    /// A checkpoint at A compacts the log through A - keep.
    pub keep: u64,
    /// A snapshot transfer takes 1..=max_transfer ticks.
    pub max_transfer: u64,
    /// Probability that a crash also wipes the replica's disk and state
    /// machine: it restarts with an empty data directory.
    pub wipe: f64,
    /// Probability that a replica crashes just as a snapshot transfer
    /// completes, before installing it (the install is lost: it is atomic).
    pub install_crash: f64,
    /// Probability that a snapshot transfer's completion is reported twice,
    /// the second time late (after the fetch ended, often after a restart).
    pub stale_transfer: f64,
    /// The replicas start with empty data directories and bootstrap by
    /// probing each other (else: formatted as voters).
    pub bootstrap: bool,
    /// When the state machines forget client sessions: small, so that they
    /// expire and are evicted while clients still use them.
    pub sessions: SessionLimits,
    /// How many calls may wait on a replica: small, so that calls are
    /// refused `Busy` while others are in flight.
    pub limits: Limits,
    /// Probability that a write carries a deadline, and the most ticks it
    /// gives: short, so that some pass while the write waits for a slot.
    pub deadline: f64,
    pub max_deadline: u64,
    /// A replica that does not lead forwards a client's call to the leader
    /// it knows on its forwarding link (the shipping
    /// `paxoskv::forwarding::Link`), as the service does, rather than
    /// telling the client to go there. One hop: the leader's answer, even
    /// "not the leader", goes back to the client.
    pub forward: bool,
    /// Calls a forwarding link holds before it refuses more.
    pub forward_limit: usize,
    /// Per tick: probability that the leader is told to hand leadership
    /// off (as on SIGTERM).
    pub hand_off: f64,
    /// Probability that the hand-off's target then crashes, is cut off or
    /// freezes, right after being picked.
    pub hand_off_fault: f64,
}

impl Params {
    /// Draws a scenario from the seed: 3 or 5 replicas and fault rates from
    /// none to harsh.
    pub fn from_seed(seed: u64, ops: usize) -> Self {
        let mut rng = Rng::new(seed ^ 0x005e_ed0f_fa17);
        let harsh = rng.range(0, 4) == 0;
        let mut p = Params {
            replicas: if rng.range(0, 2) == 0 { 3 } else { 5 },
            clients: rng.range(2, 7) as usize,
            keys: rng.range(1, 6) as usize,
            ops,
            drop: rng.range(0, if harsh { 25 } else { 8 }) as f64 / 100.0,
            duplicate: rng.range(0, 6) as f64 / 100.0,
            max_delay: rng.range(1, 9),
            crash: rng.range(0, if harsh { 40 } else { 10 }) as f64 / 10_000.0,
            partition: rng.range(0, if harsh { 40 } else { 10 }) as f64 / 10_000.0,
            torn_ready: rng.range(0, 30) as f64 / 1000.0,
            max_sync: rng.range(0, 5),
            pause: rng.range(0, if harsh { 40 } else { 10 }) as f64 / 10_000.0,
            late: rng.range(0, 80) as f64 / 1000.0,
            apply_lag: rng.range(0, 40) as f64 / 100.0,
            snapshot_every: if rng.range(0, 5) == 0 {
                0
            } else {
                rng.range(3, 31)
            },
            keep: rng.range(0, 21),
            max_transfer: rng.range(1, 3 * ELECTION),
            wipe: if rng.range(0, 3) == 0 {
                0.0
            } else {
                rng.range(5, 40) as f64 / 100.0
            },
            install_crash: rng.range(0, 10) as f64 / 100.0,
            stale_transfer: rng.range(0, 20) as f64 / 100.0,
            bootstrap: rng.range(0, 3) == 0,
            sessions: SessionLimits::DEFAULT,
            limits: Limits::DEFAULT,
            deadline: 0.0,
            max_deadline: 1,
            forward: false,
            forward_limit: 1,
            hand_off: 0.0,
            hand_off_fault: 0.0,
        };
        // Room for about every client's session, so that eviction strikes
        // now and then (a retried open, or a client that lost its session,
        // adds one); and an idle span that a client waiting out a
        // partition can exceed. A write whose session expired ends with no
        // output, which the linearizability check pays for, so not too
        // often.
        let clients = p.clients as u64;
        p.sessions = SessionLimits {
            max_sessions: rng.range(clients, clients + 4),
            idle_slots: rng.range(30, 150),
        };
        if rng.range(0, 3) == 0 {
            p.limits = Limits {
                max_writes: rng.range(1, clients + 1) as usize,
                max_reads: rng.range(1, clients + 1) as usize,
            };
        }
        p.deadline = rng.range(0, 50) as f64 / 100.0;
        p.max_deadline = rng.range(1, 4 * p.max_delay + p.max_sync + 3);
        p.forward = rng.range(0, 4) != 0;
        p.forward_limit = if rng.range(0, 3) == 0 {
            rng.range(1, clients + 1) as usize
        } else {
            paxoskv::forwarding::DEFAULT_LIMIT
        };
        // Drawn after the rest, so that the scenarios drawn above stay what
        // they were for every seed. Two seeds in three hand off.
        if rng.range(0, 3) != 0 {
            p.hand_off = rng.range(1, 40) as f64 / 10_000.0;
            p.hand_off_fault = rng.range(0, 50) as f64 / 100.0;
        }
        p
    }
}

/// Counts of what happened, for the summary.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub ops_completed: usize,
    pub ops_unanswered: usize,
    pub messages: u64,
    pub dropped: u64,
    pub duplicated: u64,
    pub crashes: u64,
    pub torn_readies: u64,
    pub partitions: u64,
    pub pauses: u64,
    pub late: u64,
    pub released: u64,
    pub leader_changes: u64,
    pub slots_chosen: u64,
    pub ticks: u64,
    /// Checkpoints taken (each compacts the log unless `keep` holds it).
    pub checkpoints: u64,
    /// Promises that reported a snapshot above the candidate's commit index
    /// (phase 1 across a compacted prefix).
    pub promises_past_commit: u64,
    /// Snapshot fetches started, installed, failed (source gone, cut off or
    /// behind; or the requester crashed meanwhile) and completions ignored
    /// because they belonged to an ended fetch or incarnation.
    pub fetches: u64,
    pub installs: u64,
    pub failed_fetches: u64,
    pub stale_fetches: u64,
    /// Crashes that wiped the disk, and wiped replicas that rejoined as
    /// voters.
    pub wipes: u64,
    pub rejoins: u64,
    /// Sessions opened; writes answered "session expired" (of which, ones
    /// an earlier copy of had been executed).
    pub sessions_opened: u64,
    pub expired_writes: u64,
    pub expired_after_applied: u64,
    /// Calls refused for a full replica; writes taken back because their
    /// deadline passed before they got a slot.
    pub busy: u64,
    pub withdrawn: u64,
    /// Calls forwarded to the leader; batches they went in, and the largest;
    /// calls lost with a broken link, sent and unsent; sent calls cancelled
    /// because their client moved on; calls refused for a full link.
    pub forwarded: u64,
    pub forward_batches: u64,
    pub forward_batch_max: u64,
    pub forward_lost_in_flight: u64,
    pub forward_lost_unsent: u64,
    pub forward_cancelled: u64,
    pub forward_full: u64,
    /// Hand-offs started; of those, the ones whose target was the next
    /// leader; the ones whose target was then made to fail; and seeds with
    /// at least one hand-off completed.
    pub hand_offs: u64,
    pub hand_offs_completed: u64,
    pub hand_offs_faulted: u64,
    pub seeds_handed_off: u64,
}

impl Stats {
    /// Adds another seed's counts to these.
    pub fn absorb(&mut self, s: &Stats) {
        let Stats {
            ops_completed,
            ops_unanswered,
            messages,
            dropped,
            duplicated,
            crashes,
            torn_readies,
            partitions,
            pauses,
            late,
            released,
            leader_changes,
            slots_chosen,
            ticks,
            checkpoints,
            promises_past_commit,
            fetches,
            installs,
            failed_fetches,
            stale_fetches,
            wipes,
            rejoins,
            sessions_opened,
            expired_writes,
            expired_after_applied,
            busy,
            withdrawn,
            forwarded,
            forward_batches,
            forward_batch_max,
            forward_lost_in_flight,
            forward_lost_unsent,
            forward_cancelled,
            forward_full,
            hand_offs,
            hand_offs_completed,
            hand_offs_faulted,
            seeds_handed_off,
        } = s;
        self.ops_completed += ops_completed;
        self.ops_unanswered += ops_unanswered;
        self.messages += messages;
        self.dropped += dropped;
        self.duplicated += duplicated;
        self.crashes += crashes;
        self.torn_readies += torn_readies;
        self.partitions += partitions;
        self.pauses += pauses;
        self.late += late;
        self.released += released;
        self.leader_changes += leader_changes;
        self.slots_chosen += slots_chosen;
        self.ticks += ticks;
        self.checkpoints += checkpoints;
        self.promises_past_commit += promises_past_commit;
        self.fetches += fetches;
        self.installs += installs;
        self.failed_fetches += failed_fetches;
        self.stale_fetches += stale_fetches;
        self.wipes += wipes;
        self.rejoins += rejoins;
        self.sessions_opened += sessions_opened;
        self.expired_writes += expired_writes;
        self.expired_after_applied += expired_after_applied;
        self.busy += busy;
        self.withdrawn += withdrawn;
        self.forwarded += forwarded;
        self.forward_batches += forward_batches;
        self.forward_batch_max = self.forward_batch_max.max(*forward_batch_max);
        self.forward_lost_in_flight += forward_lost_in_flight;
        self.forward_lost_unsent += forward_lost_unsent;
        self.forward_cancelled += forward_cancelled;
        self.forward_full += forward_full;
        self.hand_offs += hand_offs;
        self.hand_offs_completed += hand_offs_completed;
        self.hand_offs_faulted += hand_offs_faulted;
        self.seeds_handed_off += seeds_handed_off;
    }
}

/// A request a client sends to a replica.
#[derive(Clone, Debug)]
enum Request {
    Read {
        key: String,
    },
    OpenSession,
    Write {
        client_id: u64,
        sequence: u64,
        key: String,
        op: Op,
    },
}

/// A replica's answer to a client.
#[derive(Clone, Debug)]
enum Response {
    Done(Output),
    /// A session was opened: its client id.
    Opened(u64),
    /// The write's session expired: its outcome is unknown to the client.
    Expired,
    /// Not the leader (hint), or the request was dropped: try elsewhere.
    Retry(Option<NodeId>),
}

#[derive(Clone, Debug)]
enum Event {
    Peer {
        from: NodeId,
        to: NodeId,
        msg: Message,
        incarnation: Option<u64>,
    },
    ToReplica {
        ticket: Ticket,
        to: NodeId,
        req: Request,
    },
    ToClient {
        ticket: Ticket,
        from: NodeId,
        resp: Response,
    },
    Restart {
        node: NodeId,
    },
    /// A batch on the forwarding stream from `from` to the leader `to`,
    /// opened while they had these incarnations. A stream delivers in
    /// order, never twice; it breaks rather than lose a message.
    ForwardBatch {
        from: NodeId,
        to: NodeId,
        stream: Stream,
        batch: Batch<Forwarded>,
    },
    /// The leader `from`'s answers on that stream, by call id.
    ForwardAnswers {
        from: NodeId,
        to: NodeId,
        stream: Stream,
        answers: Vec<(u64, Response)>,
    },
    SyncDone {
        node: NodeId,
        incarnation: u64,
    },
    /// The state machine catches up with what was chosen (see `apply_lag`).
    ApplyDue {
        node: NodeId,
        incarnation: u64,
    },
    /// A snapshot transfer to `node` from `from` completes (see
    /// `Work::fetch_snapshot`); `fetch` identifies the fetch it belongs to.
    TransferDone {
        node: NodeId,
        incarnation: u64,
        fetch: u64,
        from: NodeId,
        min_index: Slot,
    },
}

/// A forwarding stream, by the incarnations of its two ends when it opened:
/// it dies with either.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Stream {
    follower: u64,
    leader: u64,
}

/// A follower's link to one leader, and the stream it runs over (`None`:
/// none open).
struct ForwardLink {
    link: Link<(Ticket, u64), Forwarded>,
    stream: Option<Stream>,
}

/// A forwarded call as its stream carries it: a tag unique in the world
/// (for the oracles), the client's ticket, and its request.
type Forwarded = (u64, Ticket, Request);

/// Which attempt of which operation of which client a message is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Ticket {
    client: usize,
    op: usize,
    attempt: u64,
}

/// A `Ready`'s durable part, on its way to disk.
struct Write {
    persist: Persist,
    persisted_messages: Vec<Envelope>,
    chosen: Vec<(Slot, Value)>,
}

/// What survives a crash (but not a wipe): the Paxos log.
#[derive(Default)]
struct Disk {
    /// `None`: the data directory is empty (new, or wiped).
    membership: Option<Membership>,
    promised: Ballot,
    /// Votes above `compacted` only.
    votes: BTreeMap<Slot, Accepted>,
    /// The last snapshot recorded: the state machine is durable at or past
    /// it (a checkpoint, or an install).
    snapshot: Slot,
    /// The votes through here are gone (`snapshot - keep` at a checkpoint,
    /// the snapshot itself at an install).
    compacted: Slot,
}

impl Disk {
    /// A formatted data directory: a voter with nothing yet.
    fn voter() -> Disk {
        Disk {
            membership: Some(Membership::Voter),
            ..Disk::default()
        }
    }

    /// Drops the votes through `through`.
    fn compact(&mut self, through: Slot) {
        if through > self.compacted {
            self.votes = self.votes.split_off(&(through + 1));
            self.compacted = through;
        }
    }
}

/// The state machine, durable like sled's trees (every apply survives a
/// crash, so a checkpoint's durable snapshot is the machine itself at the
/// index the disk records); gone in a wipe.
#[derive(Default)]
struct Machine {
    kv: MemState,
    applied: Slot,
}

/// One call a replica took: a client's attempt, as delivered (a duplicated
/// delivery is a second call).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Call {
    id: u64,
    ticket: Ticket,
    /// A forwarded call: the replica that forwarded it, the stream, and the
    /// call's id on it, where its answer goes instead of to the client.
    via: Option<(NodeId, Stream, u64)>,
}

struct Node {
    /// The shipping driver (core and waiting calls); `None` while crashed.
    driver: Option<Driver<Call, Call>>,
    incarnation: u64,
    disk: Disk,
    machine: Machine,
    /// Syncs in progress, completing in order; lost in a crash.
    syncing: VecDeque<Write>,
    /// Chosen slots the state machine has not applied yet; lost in a crash.
    unapplied: VecDeque<(Slot, Value)>,
    last_sync_done: u64,
    group: u32,
    paused_until: u64,
    /// The snapshot fetch running, by id; ends with the incarnation.
    fetching: Option<u64>,
    /// Wiped, and not yet a voter again.
    wiped: bool,
    /// Forwarding links, by leader; lost in a crash.
    links: BTreeMap<NodeId, ForwardLink>,
}

/// `Pending::op` of a client opening a session (not an operation of the
/// history).
const OPENING: usize = usize::MAX;

struct Pending {
    /// The operation in `World::history`, or [`OPENING`].
    op: usize,
    attempt: u64,
    req: Request,
    deadline: u64,
}

struct Client {
    /// The client in the history.
    id: u64,
    /// The session its writes go in, once opened: the id the state machine
    /// issued.
    session: Option<u64>,
    sequence: u64,
    pending: Option<Pending>,
    /// The replica that answered last: asked first next time, as real
    /// clients keep the leader they found.
    last_answered: Option<NodeId>,
}

/// The world of one seed.
pub struct World {
    seed: u64,
    p: Params,
    rng: Rng,
    now: u64,
    events: BinaryHeap<Reverse<(u64, u64, usize)>>,
    event_store: Vec<Option<Event>>,
    next_event: u64,
    nodes: BTreeMap<NodeId, Node>,
    clients: Vec<Client>,
    history: Vec<Operation>,
    issued: usize,
    next_value: i32,
    healed: bool,
    /// When the network healed and the faults stopped.
    healed_at: u64,
    next_fetch: u64,
    // The safety ledger.
    votes: BTreeMap<(Slot, Ballot), (Value, BTreeSet<NodeId>)>,
    truly_chosen: BTreeMap<Slot, Value>,
    applied_log: Vec<Value>,
    /// The digest of the reference state machine after each slot.
    digests: BTreeMap<Slot, u64>,
    /// The state machine over the chosen log, and the reply each command
    /// got there, by proposal id: what a writer must be answered.
    reference: MemState,
    reference_replies: BTreeMap<u64, Reply>,
    /// For the exactly-once oracle, by (client id, sequence): the slot at
    /// which each write was executed, and those refused as expired.
    executed: BTreeMap<(u64, u64), Slot>,
    refused_expired: BTreeSet<(u64, u64)>,
    /// Proposals answered as certainly not in the log.
    not_in_log: BTreeSet<u64>,
    /// Forwarded calls their link reported lost unsent (so their clients
    /// may be told NOT_PROPOSED): (follower, stream, id). None may ever
    /// reach a leader.
    lost_unsent: BTreeSet<u64>,
    /// Forwarded calls that reached a leader, by tag.
    arrived: BTreeSet<u64>,
    next_tag: u64,
    /// The request of each client call a replica took, for forwarding it.
    call_requests: BTreeMap<u64, Request>,
    next_call: u64,
    /// Calls each replica took and has not answered; a crash ends them.
    outstanding: BTreeMap<NodeId, BTreeSet<u64>>,
    call_proposal: BTreeMap<u64, u64>,
    /// Reads that arrived at a leader already deposed (see `on_request`).
    deposed_reads: BTreeSet<u64>,
    /// The longest applied log when each read arrived: it must be served
    /// from a state at least that far along.
    read_floor: BTreeMap<u64, Slot>,
    /// Messages kept for a peer that could not be reached, by (from, to).
    held: BTreeMap<(NodeId, NodeId), VecDeque<Message>>,
    /// A deposed leader that clients are steered to for a while, to give
    /// it reads it must refuse.
    bait: Option<(NodeId, u64)>,
    last_leader: Option<(NodeId, Ballot)>,
    /// The hand-off under way: (leader, its ballot, target, tick started).
    hand_off: Option<(NodeId, Ballot, NodeId, u64)>,
    /// A hand-off's target cut off until this tick (then the network is
    /// whole again: on seeds with no partitions drawn, nothing else would
    /// end the cut).
    cut_until: Option<u64>,
    pub stats: Stats,
}

type Check = Result<(), String>;

const HEARTBEAT: u64 = 3;
const ELECTION: u64 = 20;
const CLIENT_TIMEOUT: u64 = 120;
const MAX_TICKS: u64 = 400_000;
/// Most messages kept per (sender, receiver) while they cannot reach each
/// other (the transport keeps 1,024; the simulator's windows are smaller).
const HELD_PER_PEER: usize = 64;
/// Once healed and converged, every open call is answered within this many
/// ticks (a write in doubt waits at most three election timeouts).
const ANSWER_WITHIN: u64 = 10 * ELECTION;
/// Once healed, every replica is a voter within this many ticks: a wiped
/// one has rejoined, a new cluster bootstrapped.
const REJOIN_WITHIN: u64 = 100 * ELECTION;

impl World {
    pub fn new(seed: u64, p: Params) -> Self {
        let nodes = (1..=p.replicas)
            .map(|id| {
                let node = Node {
                    driver: None,
                    incarnation: 0,
                    disk: if p.bootstrap {
                        Disk::default()
                    } else {
                        Disk::voter()
                    },
                    machine: Machine::default(),
                    syncing: VecDeque::new(),
                    unapplied: VecDeque::new(),
                    last_sync_done: 0,
                    group: 0,
                    paused_until: 0,
                    fetching: None,
                    wiped: false,
                    links: BTreeMap::new(),
                };
                (id, node)
            })
            .collect();
        let clients = (0..p.clients)
            .map(|i| Client {
                id: i as u64 + 1,
                session: None,
                sequence: 0,
                pending: None,
                last_answered: None,
            })
            .collect();
        let mut world = World {
            seed,
            rng: Rng::new(seed),
            p,
            now: 0,
            events: BinaryHeap::new(),
            event_store: Vec::new(),
            next_event: 0,
            nodes,
            clients,
            history: Vec::new(),
            issued: 0,
            next_value: 1,
            healed: false,
            healed_at: 0,
            next_fetch: 1,
            votes: BTreeMap::new(),
            truly_chosen: BTreeMap::new(),
            applied_log: Vec::new(),
            digests: BTreeMap::new(),
            reference: MemState::new(),
            reference_replies: BTreeMap::new(),
            executed: BTreeMap::new(),
            refused_expired: BTreeSet::new(),
            not_in_log: BTreeSet::new(),
            lost_unsent: BTreeSet::new(),
            arrived: BTreeSet::new(),
            next_tag: 1,
            call_requests: BTreeMap::new(),
            next_call: 1,
            outstanding: BTreeMap::new(),
            call_proposal: BTreeMap::new(),
            deposed_reads: BTreeSet::new(),
            read_floor: BTreeMap::new(),
            held: BTreeMap::new(),
            bait: None,
            last_leader: None,
            hand_off: None,
            cut_until: None,
            stats: Stats::default(),
        };
        for id in 1..=world.p.replicas {
            world.start(id);
        }
        world
    }

    fn config(&self, id: NodeId, incarnation: u64) -> Config {
        let mut cfg = Config::new(id, (1..=self.p.replicas).collect());
        cfg.heartbeat_ticks = HEARTBEAT;
        cfg.election_ticks = ELECTION;
        cfg.resend_ticks = 12;
        cfg.catch_up_ticks = 8;
        cfg.window = 8;
        cfg.max_batch = 4;
        cfg.max_catch_up = 16;
        // Small messages, so that catch-ups and promises go in pieces.
        cfg.max_batch_bytes = 256;
        cfg.max_message_bytes = 1024;
        cfg.seed = self.seed ^ (u64::from(id) << 32) ^ incarnation;
        cfg
    }

    /// Starts (or restarts) a replica from its disk and state machine.
    fn start(&mut self, id: NodeId) {
        let node = &self.nodes[&id];
        let cfg = self.config(id, node.incarnation + 1);
        let restore = Restore {
            promised: node.disk.promised,
            votes: node.disk.votes.values().cloned().collect(),
            applied: node.machine.applied,
            snapshot: node.disk.compacted,
            membership: node.disk.membership,
            // Fresh per incarnation.
            nonce: self.rng.next_u64(),
        };
        let applied = restore.applied;
        let replica = Replica::new(cfg, restore).expect("a valid config and disk");
        let node = self.nodes.get_mut(&id).expect("node exists");
        node.incarnation += 1;
        // Proposal ids unique across replicas and incarnations.
        let first_proposal = (u64::from(id) << 56) | (node.incarnation << 40);
        node.driver =
            Some(Driver::new(replica, applied, first_proposal).with_limits(self.p.limits));
    }

    /// A crash of a random replica; maybe one that also wipes its disk and
    /// state machine. Only while the others include a majority of durable
    /// voters, so that at most a minority are wiped (or not yet members)
    /// at once: a majority that loses its disks has lost what it chose,
    /// which no protocol can bring back, and without a majority of voters
    /// no leader can be elected for a learner to rejoin under. Beyond that,
    /// nothing restricts a wipe: the core's membership rules must make it
    /// safe.
    fn crash_random(&mut self) {
        let id = self.rng.range(1, u64::from(self.p.replicas) + 1) as NodeId;
        let voters = self
            .nodes
            .iter()
            .filter(|&(&other, n)| {
                other != id && !n.wiped && n.disk.membership == Some(Membership::Voter)
            })
            .count();
        let room = voters >= self.majority();
        if room && self.chance(self.p.wipe) {
            self.crash(id);
            self.stats.wipes += 1;
            let node = self.nodes.get_mut(&id).expect("node exists");
            node.disk = Disk::default();
            node.machine = Machine::default();
            node.wiped = true;
        } else {
            self.crash(id);
        }
    }

    fn crash(&mut self, id: NodeId) {
        let node = self.nodes.get_mut(&id).expect("node exists");
        if node.driver.take().is_some() {
            node.syncing.clear();
            node.unapplied.clear();
            // A fetch running dies with the process.
            node.fetching = None;
            // So do its forwarding links, and their callers' calls.
            node.links.clear();
            // Its calls die with it; their clients time out and retry.
            self.outstanding.remove(&id);
            self.stats.crashes += 1;
            let downtime = self.rng.range(1, 4 * ELECTION);
            self.schedule(downtime, Event::Restart { node: id });
        }
    }

    fn schedule(&mut self, delay: u64, event: Event) {
        let idx = self.event_store.len();
        self.event_store.push(Some(event));
        self.events
            .push(Reverse((self.now + delay, self.next_event, idx)));
        self.next_event += 1;
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && (self.rng.next_u64() % 1_000_000) as f64 / 1_000_000.0 < p
    }

    fn faulty(&self) -> bool {
        !self.healed
    }

    /// Sends over the network: maybe lost, maybe twice, after a random delay.
    fn transmit(&mut self, event: Event) {
        self.stats.messages += 1;
        if self.faulty() && self.chance(self.p.drop) {
            self.stats.dropped += 1;
            return;
        }
        let copies = if self.faulty() && self.chance(self.p.duplicate) {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = if self.faulty() && self.chance(self.p.late) {
                self.stats.late += 1;
                self.rng.range(ELECTION, 10 * ELECTION)
            } else {
                self.rng.range(1, self.p.max_delay + 1)
            };
            self.schedule(delay, event.clone());
        }
    }

    fn alive(&self, id: NodeId) -> bool {
        self.nodes[&id].driver.is_some()
    }

    fn connected(&self, a: NodeId, b: NodeId) -> bool {
        self.nodes[&a].group == self.nodes[&b].group
    }

    // ----- the main loop ---------------------------------------------------

    /// Runs the scenario to the end; `Err` describes the first violation.
    pub fn run(&mut self) -> Check {
        let mut settled_at = None;
        loop {
            self.tick()?;
            if !self.healed && self.issued >= self.p.ops {
                self.heal();
            }
            if self.healed && self.now - self.healed_at > REJOIN_WITHIN {
                self.check_all_voters()?;
            }
            if !(self.healed
                && self.clients.iter().all(|c| c.pending.is_none())
                && self.converged()
                && self.check_all_voters().is_ok())
            {
                settled_at = None;
                continue;
            }
            if self.outstanding.values().all(BTreeSet::is_empty)
                && self
                    .nodes
                    .values()
                    .all(|n| n.links.values().all(|l| l.link.is_empty()))
            {
                break;
            }
            // Healed, quiet and converged: every call still open must be
            // answered soon (a write in doubt within the driver's bound).
            let since = *settled_at.get_or_insert(self.now);
            if self.now - since > ANSWER_WITHIN {
                let open: Vec<_> = self
                    .outstanding
                    .iter()
                    .filter(|(_, c)| !c.is_empty())
                    .collect();
                return Err(format!(
                    "calls never answered, {ANSWER_WITHIN} ticks after the cluster settled: {open:?}"
                ));
            }
        }
        self.stats.ticks = self.now;
        self.stats.slots_chosen = self.truly_chosen.len() as u64;
        self.stats.ops_completed = self.history.iter().filter(|o| o.output.is_some()).count();
        self.stats.ops_unanswered = self.history.len() - self.stats.ops_completed;
        self.stats.seeds_handed_off = u64::from(self.stats.hand_offs_completed > 0);
        linearizability::check(&self.history).map_err(|v| v.to_string())
    }

    /// One tick of the world: due deliveries, faults (until healed), every
    /// replica's clock, and the clients; then the safety checks.
    fn tick(&mut self) -> Check {
        self.now += 1;
        if self.now > MAX_TICKS {
            return Err(format!(
                "no progress: {} of {} ops done by tick {}",
                self.done_ops(),
                self.p.ops,
                self.now
            ));
        }
        self.deliver_due()?;
        if self.faulty() {
            self.inject_faults();
        }
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            if self.paused(id) {
                continue;
            }
            if let Some(d) = self.nodes.get_mut(&id).and_then(|n| n.driver.as_mut()) {
                d.tick();
            }
            self.drain(id)?;
            self.flush_links(id)?;
        }
        self.clients_act();
        self.deliver_due()?;
        self.track_leader();
        Ok(())
    }

    /// PreVote's promise, scripted: with no random faults and clients
    /// writing, one follower after another is cut off for several election
    /// timeouts and reconnected, `cycles` times. The leader the majority can
    /// reach must stay leader, under the same ballot, throughout; then the
    /// run ends as usual.
    pub fn run_flaky_follower(&mut self, cycles: u64) -> Check {
        self.healed = true; // no random faults: only the scripted cuts
        self.healed_at = self.now;
        // Settle first: one leader that every replica follows.
        let (leader, ballot) = loop {
            self.tick()?;
            if let Some((leader, ballot)) = self.last_leader
                && self.nodes.values().all(|n| {
                    n.driver.as_ref().is_some_and(|d| {
                        d.replica().leader() == Some(leader)
                            && d.replica().status().promised == ballot
                    })
                })
            {
                break (leader, ballot);
            }
        };
        let followers: Vec<NodeId> = self
            .nodes
            .keys()
            .copied()
            .filter(|&id| id != leader)
            .collect();
        for cycle in 0..cycles {
            let flaky = followers[cycle as usize % followers.len()];
            for (group, ticks) in [(1, 6 * ELECTION), (0, 3 * ELECTION)] {
                self.nodes.get_mut(&flaky).expect("node").group = group;
                for _ in 0..ticks {
                    self.tick()?;
                    let leading = self.nodes[&leader]
                        .driver
                        .as_ref()
                        .is_some_and(|d| d.replica().is_leader());
                    if !leading || self.last_leader != Some((leader, ballot)) {
                        let states: Vec<String> = self
                            .nodes
                            .values()
                            .filter_map(|n| n.driver.as_ref())
                            .map(|d| format!("{:?}", d.replica().status()))
                            .collect();
                        return Err(format!(
                            "cycle {cycle} (tick {}): replica {flaky}, cut off and back, cost leader {leader} (ballot {ballot}) its leadership; leader now {:?}\n{}",
                            self.now,
                            self.last_leader,
                            states.join("\n")
                        ));
                    }
                }
            }
        }
        self.run()
    }

    /// Hand-off, scripted: with no random faults and clients writing, the
    /// leader is told to hand off `count` times, a few election timeouts
    /// apart. Each time the target must lead, under a higher ballot, within
    /// one election timeout: before any acceptor would stop ignoring a
    /// candidate for leader stickiness, so only the hand-off path can do
    /// it. Then the run ends as usual (every check, linearizability too).
    pub fn run_hand_offs(&mut self, count: u64) -> Check {
        self.healed = true; // no random faults
        self.healed_at = self.now;
        for round in 0..count {
            // Settle: one leader that every replica follows.
            let (leader, ballot) = loop {
                self.tick()?;
                if let Some((leader, ballot)) = self.last_leader
                    && self.nodes.values().all(|n| {
                        n.driver.as_ref().is_some_and(|d| {
                            d.replica().leader() == Some(leader)
                                && d.replica().status().promised == ballot
                        })
                    })
                {
                    break (leader, ballot);
                }
            };
            for _ in 0..2 * ELECTION {
                self.tick()?;
            }
            let d = self.driver(leader);
            let target = d
                .hand_off()
                .map_err(|e| format!("round {round}: leader {leader} cannot hand off: {e}"))?;
            self.stats.hand_offs += 1;
            let started = self.now;
            loop {
                self.tick()?;
                if let Some((id, b)) = self.last_leader
                    && id == target
                    && b > ballot
                {
                    self.stats.hand_offs_completed += 1;
                    break;
                }
                if self.now - started > ELECTION {
                    return Err(format!(
                        "round {round} (tick {}): leader {leader} (ballot {ballot}) handed off to {target}, which did not lead within an election timeout; leader now {:?}",
                        self.now, self.last_leader
                    ));
                }
            }
        }
        self.run()
    }

    fn done_ops(&self) -> usize {
        self.history.iter().filter(|o| o.output.is_some()).count()
    }

    fn heal(&mut self) {
        self.healed = true;
        self.healed_at = self.now;
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            let node = self.nodes.get_mut(&id).expect("node");
            node.group = 0;
            node.paused_until = 0;
            if !self.alive(id) {
                self.start(id);
            }
        }
        self.release_held();
    }

    /// Every replica is a voter, durably: one that lost its disk has
    /// rejoined (and a new cluster has bootstrapped).
    fn check_all_voters(&self) -> Check {
        for (id, node) in &self.nodes {
            if node.disk.membership != Some(Membership::Voter) {
                return Err(format!(
                    "replica {id} is not a voter {} ticks after the network healed: membership {:?}, applied {} of {}; {:?}",
                    self.now - self.healed_at,
                    node.disk.membership,
                    node.machine.applied,
                    self.applied_log.len(),
                    node.driver.as_ref().map(|d| d.replica().status())
                ));
            }
        }
        Ok(())
    }

    /// Every replica has applied everything chosen.
    fn converged(&self) -> bool {
        let target = self.applied_log.len() as Slot;
        self.nodes.values().all(|n| n.machine.applied == target)
    }

    fn inject_faults(&mut self) {
        if self.cut_until.is_some_and(|t| self.now >= t) {
            self.cut_until = None;
            for node in self.nodes.values_mut() {
                node.group = 0;
            }
            self.release_held();
        }
        if self.chance(self.p.hand_off) {
            self.hand_off_now();
        }
        if self.chance(self.p.crash) {
            self.crash_random();
        }
        if self.chance(self.p.pause) {
            self.stats.pauses += 1;
            let id = self.rng.range(1, u64::from(self.p.replicas) + 1) as NodeId;
            let until = self.now + self.rng.range(1, 6 * ELECTION);
            self.nodes.get_mut(&id).expect("node").paused_until = until;
        }
        // The classic nemesis: cut the leader off, often frozen too, so that
        // it wakes up believing it still leads while another has taken over.
        if self.chance(self.p.partition / 2.0)
            && let Some((leader, _)) = self.last_leader
        {
            self.stats.partitions += 1;
            let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
            for id in ids {
                self.nodes.get_mut(&id).expect("node").group = u32::from(id == leader);
            }
            self.release_held();
            // Steer reads to it while the others elect a new leader.
            self.bait = Some((leader, self.now + 8 * ELECTION));
            if self.rng.range(0, 2) == 0 {
                self.stats.pauses += 1;
                let until = self.now + self.rng.range(ELECTION, 6 * ELECTION);
                self.nodes.get_mut(&leader).expect("node").paused_until = until;
            }
        }
        if self.chance(self.p.partition) {
            self.stats.partitions += 1;
            let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
            let heal = self.rng.range(0, 3) == 0;
            for id in ids {
                let group = if heal { 0 } else { self.rng.range(0, 3) as u32 };
                self.nodes.get_mut(&id).expect("node").group = group;
            }
            self.release_held();
        }
    }

    /// Tells the leader (if one runs, unfrozen) to hand off, as SIGTERM does;
    /// maybe then makes its target fail: a crash, a cut, or a freeze.
    fn hand_off_now(&mut self) {
        let Some((leader, ballot)) = self.last_leader else {
            return;
        };
        if self.paused(leader) {
            return;
        }
        let Some(d) = self.nodes.get_mut(&leader).and_then(|n| n.driver.as_mut()) else {
            return;
        };
        if !d.replica().is_leader() || d.replica().status().promised != ballot {
            return;
        }
        let Ok(target) = d.hand_off() else {
            return;
        };
        self.stats.hand_offs += 1;
        self.hand_off = Some((leader, ballot, target, self.now));
        if self.chance(self.p.hand_off_fault) {
            self.stats.hand_offs_faulted += 1;
            match self.rng.range(0, 3) {
                0 => self.crash(target),
                1 => {
                    self.stats.partitions += 1;
                    let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
                    for id in ids {
                        self.nodes.get_mut(&id).expect("node").group = u32::from(id == target);
                    }
                    self.release_held();
                    self.cut_until = Some(self.now + self.rng.range(ELECTION, 10 * ELECTION));
                }
                _ => {
                    self.stats.pauses += 1;
                    let until = self.now + self.rng.range(1, 6 * ELECTION);
                    self.nodes.get_mut(&target).expect("node").paused_until = until;
                }
            }
        }
    }

    /// A message between replicas that cannot reach each other: dropped,
    /// or (half the time) kept, as the transport keeps the newest messages
    /// for a disconnected peer, up to a bound, and sends them when the
    /// stream is back.
    fn hold(&mut self, from: NodeId, to: NodeId, msg: Message) {
        if !self.chance(0.5) {
            self.stats.dropped += 1;
            return;
        }
        let queue = self.held.entry((from, to)).or_default();
        queue.push_back(msg);
        if queue.len() > HELD_PER_PEER {
            queue.pop_front();
            self.stats.dropped += 1;
        }
    }

    /// Partitions changed: what was kept for peers now reachable goes out,
    /// in a burst, in order.
    fn release_held(&mut self) {
        let ready: Vec<(NodeId, NodeId)> = self
            .held
            .keys()
            .copied()
            .filter(|&(from, to)| self.connected(from, to))
            .collect();
        for (from, to) in ready {
            let queue = self.held.remove(&(from, to)).unwrap_or_default();
            self.stats.released += queue.len() as u64;
            for msg in queue {
                let delay = self.rng.range(1, self.p.max_delay + 1);
                self.schedule(
                    delay,
                    Event::Peer {
                        from,
                        to,
                        msg,
                        incarnation: None,
                    },
                );
            }
        }
    }

    fn deliver_due(&mut self) -> Check {
        while let Some(&Reverse((at, _, idx))) = self.events.peek() {
            if at > self.now {
                break;
            }
            self.events.pop();
            let event = self.event_store[idx].take().expect("event delivered once");
            self.deliver(event)?;
        }
        Ok(())
    }

    fn paused(&self, id: NodeId) -> bool {
        self.nodes[&id].paused_until > self.now
    }

    fn deliver(&mut self, event: Event) -> Check {
        // A frozen replica finds what arrived meanwhile queued, in order.
        let target = match &event {
            Event::Peer { to, .. }
            | Event::ToReplica { to, .. }
            | Event::ForwardBatch { to, .. }
            | Event::ForwardAnswers { to, .. } => Some(*to),
            Event::SyncDone { node, .. }
            | Event::ApplyDue { node, .. }
            | Event::TransferDone { node, .. } => Some(*node),
            Event::Restart { .. } | Event::ToClient { .. } => None,
        };
        if let Some(id) = target.filter(|&id| self.paused(id)) {
            let delay = self.nodes[&id].paused_until - self.now;
            self.schedule(delay, event);
            return Ok(());
        }
        match event {
            Event::Restart { node } => {
                if !self.alive(node) {
                    self.start(node);
                }
                Ok(())
            }
            Event::SyncDone { node, incarnation } => {
                if self.nodes[&node].incarnation == incarnation && self.alive(node) {
                    self.complete_sync(node)?;
                }
                Ok(())
            }
            Event::ApplyDue { node, incarnation } => {
                if self.nodes[&node].incarnation == incarnation && self.alive(node) {
                    self.apply_chosen(node)?;
                }
                Ok(())
            }
            Event::TransferDone {
                node,
                incarnation,
                fetch,
                from,
                min_index,
            } => self.complete_transfer(node, incarnation, fetch, from, min_index),
            Event::Peer {
                from,
                to,
                msg,
                incarnation,
            } => {
                let node = &self.nodes[&to];
                if incarnation.is_some_and(|i| i != node.incarnation) {
                    return Ok(()); // a message to self from before a crash
                }
                if from != to && !self.connected(from, to) {
                    self.hold(from, to, msg);
                    return Ok(());
                }
                let Some(d) = self.nodes.get_mut(&to).and_then(|n| n.driver.as_mut()) else {
                    return Ok(());
                };
                if let Message::Promise { snapshot, .. } = &msg
                    && *snapshot > d.replica().committed()
                    && from != to
                {
                    self.stats.promises_past_commit += 1;
                }
                if from == to {
                    d.step_own(msg);
                } else if let Err(refused) = d.step(from, msg) {
                    return Err(format!(
                        "replica {to} refused a message from {from}: {refused}"
                    ));
                }
                self.drain(to)
            }
            Event::ToReplica { ticket, to, req } => {
                self.on_request(ticket, to, req, None);
                self.drain(to)
            }
            Event::ToClient { ticket, from, resp } => self.on_response(ticket, from, resp),
            Event::ForwardBatch {
                from,
                to,
                stream,
                batch,
            } => self.on_forward_batch(from, to, stream, batch),
            Event::ForwardAnswers {
                from,
                to,
                stream,
                answers,
            } => self.on_forward_answers(from, to, stream, answers),
        }
    }

    // ----- a replica's server: the shipping driver, over simulated I/O -----

    /// Does what the driver asks, in the order `Work` prescribes, until it
    /// has nothing more.
    fn drain(&mut self, id: NodeId) -> Check {
        loop {
            let Some(d) = self.nodes.get_mut(&id).and_then(|n| n.driver.as_mut()) else {
                return Ok(());
            };
            let work = d.take_ready();
            if work.is_empty() {
                return Ok(());
            }
            self.handle_work(id, work)?;
        }
    }

    fn handle_work(&mut self, id: NodeId, work: Work<Call, Call>) -> Check {
        let Work {
            messages,
            persist,
            persisted_messages,
            chosen,
            answers,
            fetch_snapshot,
        } = work;
        if let Some(fetch) = fetch_snapshot {
            self.start_fetch(id, fetch);
        }
        // Oracle: a replica treats a slot as chosen only if a majority holds
        // that very value durably under one ballot; a leader, under its own
        // ballot (it counts only votes cast under it).
        let leading = self.nodes[&id]
            .driver
            .as_ref()
            .map(Driver::replica)
            .filter(|r| r.is_leader())
            .map(|r| r.status().promised);
        for (slot, value) in &chosen {
            self.check_chosen(id, *slot, value)?;
            if let Some(ballot) = leading {
                self.check_chosen_under(id, *slot, value, ballot)?;
            }
        }
        for e in messages {
            self.send_peer(id, e.to, e.msg)?;
        }
        self.answer(id, answers)?;
        // A crash between sending and syncing: the persist and everything
        // that depends on it are lost.
        if self.faulty() && !persist.is_empty() && self.chance(self.p.torn_ready) {
            self.stats.torn_readies += 1;
            self.crash(id);
            return Ok(());
        }
        // The sync runs while the replica goes on; what depends on it waits.
        let write = Write {
            persist,
            persisted_messages,
            chosen,
        };
        let latency = if write.persist.is_empty() {
            0
        } else {
            self.rng.range(0, self.p.max_sync + 1)
        };
        let node = self.nodes.get_mut(&id).expect("node");
        if node.syncing.is_empty() && latency == 0 {
            node.syncing.push_back(write);
            self.complete_sync(id)?;
        } else {
            let done = (self.now + latency).max(node.last_sync_done);
            node.last_sync_done = done;
            node.syncing.push_back(write);
            let incarnation = node.incarnation;
            self.schedule(
                done - self.now,
                Event::SyncDone {
                    node: id,
                    incarnation,
                },
            );
        }
        Ok(())
    }

    /// The oldest sync in progress reaches the disk: its state survives from
    /// now on, and what waited for it goes out.
    fn complete_sync(&mut self, id: NodeId) -> Check {
        let node = self.nodes.get_mut(&id).expect("node");
        let Some(Write {
            persist,
            persisted_messages,
            chosen,
        }) = node.syncing.pop_front()
        else {
            return Ok(());
        };
        if let Some(m) = persist.membership {
            // Unknown becomes a learner or a voter, a learner a voter; a
            // voter stays one for as long as its disk lives.
            if node.disk.membership == Some(Membership::Voter) && m != Membership::Voter {
                return Err(format!("replica {id}, a voter, persisted membership {m:?}"));
            }
            node.disk.membership = Some(m);
            if m == Membership::Voter && node.wiped {
                node.wiped = false;
                self.stats.rejoins += 1;
            }
        }
        let node = self.nodes.get_mut(&id).expect("node");
        if node.disk.membership.is_none() && !persist.is_empty() {
            return Err(format!(
                "replica {id}, with no membership yet, persisted {persist:?}"
            ));
        }
        if let Some(b) = persist.promised {
            if b < node.disk.promised {
                return Err(format!(
                    "replica {id} persisted promise {b} below {}",
                    node.disk.promised
                ));
            }
            node.disk.promised = b;
        }
        for vote in &persist.entries {
            // A vote for a slot compacted meanwhile (an install) is
            // obsolete as it lands: a restart drops it.
            if vote.slot > node.disk.compacted {
                node.disk.votes.insert(vote.slot, vote.clone());
            }
        }
        for vote in persist.entries {
            self.record_vote(id, vote)?;
        }
        for e in persisted_messages {
            self.send_peer(id, e.to, e.msg)?;
        }
        if chosen.is_empty() {
            return Ok(());
        }
        // The state machine may lag behind what is chosen (in order): reads
        // then wait for their index, and nothing may be answered early.
        let node = self.nodes.get_mut(&id).expect("node");
        let was_lagging = !node.unapplied.is_empty();
        node.unapplied.extend(chosen);
        if was_lagging {
            return Ok(()); // an ApplyDue is already on its way
        }
        if self.faulty() && self.chance(self.p.apply_lag) {
            let incarnation = self.nodes[&id].incarnation;
            let delay = self.rng.range(1, 3 * HEARTBEAT);
            self.schedule(
                delay,
                Event::ApplyDue {
                    node: id,
                    incarnation,
                },
            );
            return Ok(());
        }
        self.apply_chosen(id)
    }

    /// Applies every chosen slot waiting for the state machine, and reports
    /// the replies to the driver.
    fn apply_chosen(&mut self, id: NodeId) -> Check {
        let node = self.nodes.get_mut(&id).expect("node");
        let applied = node.machine.applied;
        // Slots an installed snapshot covered are in the state machine
        // already: they are skipped, as sled skips them.
        let chosen: Vec<(Slot, Value)> = node
            .unapplied
            .drain(..)
            .filter(|&(slot, _)| slot > applied)
            .collect();
        let Some(&(last, _)) = chosen.last() else {
            return Ok(());
        };
        let mut replies = Vec::new();
        for (slot, value) in chosen {
            replies.extend(self.apply(id, slot, value)?);
        }
        let d = self.driver(id);
        let answers = d.applied_through(last, replies);
        self.answer(id, answers)?;
        self.checkpoint_if_due(id);
        Ok(())
    }

    /// Every `snapshot_every` applied slots: the state machine is durable at
    /// its applied index A (it always is, here), the disk records snapshot A
    /// and drops the votes through A - keep, and the core is told.
    fn checkpoint_if_due(&mut self, id: NodeId) {
        let every = self.p.snapshot_every;
        let node = self.nodes.get_mut(&id).expect("node");
        let a = node.machine.applied;
        if every == 0 || a < node.disk.snapshot + every {
            return;
        }
        self.stats.checkpoints += 1;
        node.disk.snapshot = a;
        let through = a.saturating_sub(self.p.keep);
        if through > node.disk.compacted {
            node.disk.compact(through);
            self.driver(id).compact(through);
        }
    }

    /// `Work::fetch_snapshot`: unless one is running already, a transfer
    /// from the replica named starts, and completes after a while.
    fn start_fetch(&mut self, id: NodeId, fetch: SnapshotFetch) {
        let node = &self.nodes[&id];
        if node.fetching.is_some() {
            return;
        }
        let (incarnation, fetch_id) = (node.incarnation, self.next_fetch);
        self.next_fetch += 1;
        self.nodes.get_mut(&id).expect("node").fetching = Some(fetch_id);
        self.stats.fetches += 1;
        let event = Event::TransferDone {
            node: id,
            incarnation,
            fetch: fetch_id,
            from: fetch.from,
            min_index: fetch.min_index,
        };
        let delay = self.rng.range(1, self.p.max_transfer + 1);
        self.schedule(delay, event.clone());
        // Reported again, late: it must find the fetch (or the incarnation)
        // ended, and change nothing.
        if self.faulty() && self.chance(self.p.stale_transfer) {
            let late = delay + self.rng.range(1, 8 * ELECTION);
            self.schedule(late, event);
        }
    }

    /// A snapshot transfer completes: if the source is up and reachable and
    /// its state machine has reached `min_index`, its state (consistent at
    /// its applied index A) is installed here atomically — the state
    /// machine becomes it, the disk records snapshot A and drops the votes
    /// through A — and the driver is told. Otherwise the fetch failed, and
    /// the core asks again if it still needs one.
    fn complete_transfer(
        &mut self,
        id: NodeId,
        incarnation: u64,
        fetch: u64,
        from: NodeId,
        min_index: Slot,
    ) -> Check {
        let node = &self.nodes[&id];
        if node.incarnation != incarnation || node.fetching != Some(fetch) || !self.alive(id) {
            self.stats.stale_fetches += 1;
            return Ok(());
        }
        self.nodes.get_mut(&id).expect("node").fetching = None;
        if !self.alive(from) || !self.connected(from, id) || self.paused(from) {
            self.stats.failed_fetches += 1;
            return Ok(());
        }
        let source = &self.nodes[&from].machine;
        let (index, kv) = (source.applied, source.kv.clone());
        let committed = self.driver(id).replica().committed();
        // Below `min_index` it is no use; at or below the commit index the
        // driver would ignore it, so it is not installed either.
        if index < min_index || index <= committed {
            self.stats.failed_fetches += 1;
            return Ok(());
        }
        if self.faulty() && self.chance(self.p.install_crash) {
            self.stats.failed_fetches += 1;
            self.crash(id);
            return Ok(());
        }
        self.check_install(id, index, &kv)?;
        self.stats.installs += 1;
        let node = self.nodes.get_mut(&id).expect("node");
        node.machine = Machine { kv, applied: index };
        node.disk.snapshot = index;
        node.disk.compact(index);
        // Chosen slots waiting for the state machine are all at or below the
        // commit index, so in the snapshot.
        node.unapplied.clear();
        self.driver(id).snapshot_installed(index);
        self.drain(id)
    }

    /// Oracle: a snapshot installed at `index` is the reference state
    /// machine over the chosen log through `index`.
    fn check_install(&self, id: NodeId, index: Slot, kv: &MemState) -> Check {
        match self.digests.get(&index) {
            Some(&d) if d == kv.digest() => Ok(()),
            Some(_) => Err(format!(
                "replica {id} installs a snapshot at {index} that differs from the chosen log's state there"
            )),
            None => Err(format!(
                "replica {id} installs a snapshot at {index}, past the chosen log ({} slots)",
                self.applied_log.len()
            )),
        }
    }

    fn driver(&mut self, id: NodeId) -> &mut Driver<Call, Call> {
        self.nodes
            .get_mut(&id)
            .and_then(|n| n.driver.as_mut())
            .expect("a live replica")
    }

    /// Sends a peer message; checks first that it promises or acknowledges
    /// only what the sender's disk already holds.
    fn send_peer(&mut self, from: NodeId, to: NodeId, msg: Message) -> Check {
        self.check_durable_before_send(from, &msg)?;
        self.check_only_voters_vote(from, &msg)?;
        self.check_fresh_only_when_blank(from, &msg)?;
        if from == to {
            // Local delivery: reliable, but gone if the replica crashes first.
            let incarnation = Some(self.nodes[&from].incarnation);
            self.schedule(
                0,
                Event::Peer {
                    from,
                    to,
                    msg,
                    incarnation,
                },
            );
        } else {
            self.transmit(Event::Peer {
                from,
                to,
                msg,
                incarnation: None,
            });
        }
        Ok(())
    }

    /// Oracle: a `Promise`, `Accepted` or `HeartbeatAck` leaves a replica
    /// only when its disk already holds the promise or vote it reports.
    fn check_durable_before_send(&self, from: NodeId, msg: &Message) -> Check {
        let disk = &self.nodes[&from].disk;
        let promised = |ballot: &Ballot, what: &str| {
            if disk.promised < *ballot {
                Err(format!(
                    "replica {from} sent {what} for ballot {ballot} while its disk holds promise {}",
                    disk.promised
                ))
            } else {
                Ok(())
            }
        };
        // A vote the disk dropped since (the slot was compacted: a
        // checkpoint or an install while the message waited for its sync)
        // counts if the ledger saw it durable here.
        let compacted_after_sync = |slot: Slot, ballot: Ballot, value: Option<&Value>| {
            slot <= disk.compacted
                && self.votes.get(&(slot, ballot)).is_some_and(|(v, voters)| {
                    voters.contains(&from) && value.is_none_or(|value| v == value)
                })
        };
        match msg {
            Message::Promise {
                ballot, accepted, ..
            } => {
                promised(ballot, "a Promise")?;
                for vote in accepted {
                    if disk.votes.get(&vote.slot) != Some(vote)
                        && !compacted_after_sync(vote.slot, vote.ballot, Some(&vote.value))
                    {
                        return Err(format!(
                            "replica {from} reported vote {vote:?} in a Promise before it was on disk"
                        ));
                    }
                }
                Ok(())
            }
            Message::Accepted { ballot, slot } => match disk.votes.get(slot) {
                Some(vote) if vote.ballot == *ballot => Ok(()),
                _ if compacted_after_sync(*slot, *ballot, None) => Ok(()),
                other => Err(format!(
                    "replica {from} sent Accepted({ballot}, slot {slot}) while its disk holds {other:?}"
                )),
            },
            Message::HeartbeatAck { ballot, .. } => promised(ballot, "a HeartbeatAck"),
            _ => Ok(()),
        }
    }

    /// Oracle: only a voter votes. A learner or an unknown replica (one
    /// that lost its disk, or may have) never sends a `Promise`, an
    /// `Accepted` or a `HeartbeatAck` (each needs a durable voter
    /// membership: it leaves after the sync that made it one), nor a `Nack`
    /// or a pre-vote answer (not a voter right now).
    fn check_only_voters_vote(&self, from: NodeId, msg: &Message) -> Check {
        let node = &self.nodes[&from];
        let durable = node.disk.membership;
        let now = node
            .driver
            .as_ref()
            .and_then(|d| d.replica().status().membership);
        let (what, standing) = match msg {
            Message::Promise { .. } => ("a Promise", durable),
            Message::Accepted { .. } => ("an Accepted", durable),
            Message::HeartbeatAck { .. } => ("a HeartbeatAck", durable),
            Message::Nack { .. } => ("a Nack", now),
            Message::PreVoteReply { .. } => ("a PreVoteReply", now),
            _ => return Ok(()),
        };
        if standing == Some(Membership::Voter) && now == Some(Membership::Voter) {
            Ok(())
        } else {
            Err(format!(
                "replica {from} sent {what} as a non-voter (durable membership {durable:?}, now {now:?}): {msg:?}"
            ))
        }
    }

    /// Oracle: `ProbeReply { fresh: true }` comes only from a replica whose
    /// disk and state machine hold nothing at all and that is not a learner.
    fn check_fresh_only_when_blank(&self, from: NodeId, msg: &Message) -> Check {
        let Message::ProbeReply { fresh: true, .. } = msg else {
            return Ok(());
        };
        let node = &self.nodes[&from];
        let disk = &node.disk;
        let learner = |m: Option<Membership>| m == Some(Membership::Learner);
        let now = node
            .driver
            .as_ref()
            .and_then(|d| d.replica().status().membership);
        let blank = disk.promised == Ballot::ZERO
            && disk.votes.is_empty()
            && disk.snapshot == 0
            && disk.compacted == 0
            && node.machine.applied == 0
            && !learner(disk.membership)
            && !learner(now);
        if blank {
            Ok(())
        } else {
            Err(format!(
                "replica {from} answered a probe fresh, but holds promise {}, {} votes, snapshot {}, applied {}, membership {:?} (now {now:?})",
                disk.promised,
                disk.votes.len(),
                disk.snapshot,
                node.machine.applied,
                disk.membership
            ))
        }
    }

    /// Oracle: `value` is chosen for `slot` by durable votes — a majority
    /// holds it on disk under one and the same ballot.
    fn check_chosen(&self, id: NodeId, slot: Slot, value: &Value) -> Check {
        match self.truly_chosen.get(&slot) {
            Some(v) if v == value => Ok(()),
            Some(v) => Err(format!(
                "replica {id} took {value:?} as chosen for slot {slot}, but {v:?} was chosen"
            )),
            None => Err(format!(
                "replica {id} took slot {slot} = {value:?} as chosen, which no majority holds durably"
            )),
        }
    }

    /// Oracle, for a leader's own commits: a majority holds `value` for
    /// `slot` durably under the leader's `ballot` itself.
    fn check_chosen_under(&self, id: NodeId, slot: Slot, value: &Value, ballot: Ballot) -> Check {
        match self.votes.get(&(slot, ballot)) {
            Some((v, voters)) if v == value && voters.len() >= self.majority() => Ok(()),
            other => Err(format!(
                "leader {id} took slot {slot} as chosen under its ballot {ballot}, but the durable votes under it are {:?}",
                other.map(|(v, voters)| (v == value, voters))
            )),
        }
    }

    /// Applies a chosen slot to the replica's state machine; returns the
    /// state machine's replies by proposal id, for the driver.
    fn apply(&mut self, id: NodeId, slot: Slot, value: Value) -> Result<Vec<(u64, Reply)>, String> {
        self.check_chosen(id, slot, &value)?;
        let node = self.nodes.get_mut(&id).expect("node");
        if slot != node.machine.applied + 1 {
            return Err(format!(
                "replica {id} applies slot {slot} after {}",
                node.machine.applied
            ));
        }
        // The applied logs must all be prefixes of one log. The first to
        // apply a slot extends it, and the reference state machine with it.
        match self.applied_log.get(slot as usize - 1) {
            Some(v) if *v != value => {
                return Err(format!(
                    "replica {id} applied a different value at slot {slot}"
                ));
            }
            Some(_) => {}
            None => {
                let commands = commands_of(slot, &value)?;
                let limits = self.p.sessions;
                let mut observed = Observed {
                    state: &mut self.reference,
                    reads: Cell::new(0),
                };
                let mut applier = SlotApplier::new(&mut observed, &limits, slot);
                for cmd in &commands {
                    let reply = applier.apply(cmd);
                    // Executed iff it read its key: dedup, staleness and
                    // expiry are decided from the session alone.
                    let executed = applier.state().reads.take() > 0;
                    self.reference_replies.insert(cmd.proposal_id, reply);
                    if self.not_in_log.contains(&cmd.proposal_id) {
                        return Err(format!(
                            "{cmd:?} was answered as certainly not in the log, yet slot {slot} holds it"
                        ));
                    }
                    check_exactly_once(
                        &mut self.executed,
                        &mut self.refused_expired,
                        slot,
                        cmd,
                        reply,
                        executed,
                    )?;
                }
                self.applied_log.push(value.clone());
                self.digests.insert(slot, self.reference.digest());
            }
        }
        let commands = commands_of(slot, &value)?;
        let mut applier = SlotApplier::new(&mut node.machine.kv, &self.p.sessions, slot);
        let replies: Vec<(u64, Reply)> = commands
            .iter()
            .map(|cmd| (cmd.proposal_id, applier.apply(cmd)))
            .collect();
        node.machine.applied = slot;
        if self.digests.get(&slot) != Some(&node.machine.kv.digest()) {
            return Err(format!(
                "replica {id} has a different KV state after slot {slot}"
            ));
        }
        Ok(replies)
    }

    /// Delivers the driver's answers to the clients, checking each: every
    /// call is answered once, a write with the reply its command really got
    /// in the chosen log, a read never by a leader deposed when it arrived.
    fn answer(&mut self, id: NodeId, answers: Vec<Answer<Call, Call>>) -> Check {
        let mut forwarded: BTreeMap<(NodeId, Stream), Vec<(u64, Response)>> = BTreeMap::new();
        for answer in answers {
            let (call, resp) = match answer {
                Answer::Write { caller, result } => {
                    let proposal = self.call_proposal.get(&caller.id).copied();
                    let resp = match result {
                        Ok(reply) => {
                            let Some(proposal) = proposal else {
                                return Err(format!(
                                    "replica {id} answered {caller:?} with {reply:?}, but never proposed it"
                                ));
                            };
                            let truth = self.reference_replies.get(&proposal);
                            if truth != Some(&reply) {
                                return Err(format!(
                                    "replica {id} answered {caller:?} with {reply:?}, but its command got {truth:?} in the chosen log"
                                ));
                            }
                            match reply {
                                Reply::Inserted => Some(Response::Done(Output::Inserted)),
                                Reply::Updated { previous } => {
                                    Some(Response::Done(Output::Updated { previous }))
                                }
                                Reply::Removed { previous } => {
                                    Some(Response::Done(Output::Removed { previous }))
                                }
                                Reply::AlreadyExists => Some(Response::Done(Output::AlreadyExists)),
                                Reply::NotFound => Some(Response::Done(Output::NotFound)),
                                // An older attempt of a write its client has
                                // moved past: nobody waits for it.
                                Reply::Stale { .. } => None,
                                Reply::SessionOpened { client_id } => {
                                    Some(Response::Opened(client_id))
                                }
                                Reply::SessionExpired => Some(Response::Expired),
                                Reply::SessionNotOpened => Some(Response::Retry(None)),
                            }
                        }
                        Err(e) => {
                            match e {
                                CallError::Busy { .. } => self.stats.busy += 1,
                                CallError::Expired => self.stats.withdrawn += 1,
                                _ => {}
                            }
                            // What the service tells a client NOT_PROPOSED
                            // rests on this: such an answer proves absence.
                            if e.proves_not_in_log()
                                && let Some(p) = proposal
                            {
                                if self.reference_replies.contains_key(&p) {
                                    return Err(format!(
                                        "replica {id} answered {caller:?} as not in the log, but it was applied"
                                    ));
                                }
                                self.not_in_log.insert(p);
                            }
                            Some(retry(e))
                        }
                    };
                    (caller, resp)
                }
                Answer::Read { caller, result } => {
                    if matches!(result, Err(CallError::Busy { .. })) {
                        self.stats.busy += 1;
                    }
                    let resp = match result {
                        Ok(key) => {
                            if self.deposed_reads.contains(&caller.id) {
                                return Err(format!(
                                    "replica {id} served read {caller:?}, which arrived after a majority had promised a higher ballot than its own"
                                ));
                            }
                            let machine = &self.nodes[&id].machine;
                            let floor = self.read_floor.get(&caller.id).copied().unwrap_or(0);
                            if machine.applied < floor {
                                return Err(format!(
                                    "replica {id} served read {caller:?} at slot {}, but slot {floor} was applied before it arrived",
                                    machine.applied
                                ));
                            }
                            let value = machine.kv.get(&key);
                            Response::Done(Output::Value(value))
                        }
                        Err(e) => retry(e),
                    };
                    (caller, Some(resp))
                }
            };
            let outstanding = self.outstanding.entry(id).or_default();
            if !outstanding.remove(&call.id) {
                return Err(format!(
                    "replica {id} answered {call:?} twice, or a call it never took"
                ));
            }
            let request = self.call_requests.remove(&call.id);
            match (resp, call.via, request) {
                (None, _, _) => {}
                // A forwarded call: the answer goes back on its stream.
                (Some(resp), Some((follower, stream, id_there)), _) => forwarded
                    .entry((follower, stream))
                    .or_default()
                    .push((id_there, resp)),
                // Not the leader, and it knows who is: forward the call
                // there, as the service does.
                (Some(Response::Retry(Some(leader))), None, Some(req)) if leader != id => {
                    self.forward(id, leader, call.ticket, req);
                }
                (Some(resp), None, _) => self.transmit(Event::ToClient {
                    ticket: call.ticket,
                    from: id,
                    resp,
                }),
            }
        }
        for ((follower, stream), answers) in forwarded {
            let delay = self.rng.range(1, self.p.max_delay + 1);
            self.schedule(
                delay,
                Event::ForwardAnswers {
                    from: id,
                    to: follower,
                    stream,
                    answers,
                },
            );
        }
        Ok(())
    }

    // ----- forwarding: the shipping link, over simulated streams -----------

    /// Replica `from` forwards a client's call to `leader` on its link.
    fn forward(&mut self, from: NodeId, leader: NodeId, ticket: Ticket, req: Request) {
        let tag = self.next_tag;
        self.next_tag += 1;
        let limit = self.p.forward_limit;
        let link = &mut self
            .nodes
            .get_mut(&from)
            .expect("node")
            .links
            .entry(leader)
            .or_insert_with(|| ForwardLink {
                link: Link::new(limit),
                stream: None,
            })
            .link;
        match link.submit((ticket, tag), (tag, ticket, req)) {
            Ok(_) => self.stats.forwarded += 1,
            // Refused before it was sent: the client tries again.
            Err(full) => {
                self.stats.forward_full += 1;
                self.transmit(Event::ToClient {
                    ticket: full.caller.0,
                    from,
                    resp: Response::Retry(None),
                });
            }
        }
    }

    /// Replica `id`'s links, once a tick: calls whose clients moved on are
    /// cancelled; a stream whose leader crashed, restarted or is cut off
    /// breaks; what is ready goes out, one batch per link.
    fn flush_links(&mut self, id: NodeId) -> Check {
        if !self.alive(id) {
            return Ok(());
        }
        let own = self.nodes[&id].incarnation;
        let leaders: Vec<NodeId> = self.nodes[&id].links.keys().copied().collect();
        for leader in leaders {
            let up = self.alive(leader) && self.connected(id, leader);
            let theirs = self.nodes[&leader].incarnation;
            let clients = &self.clients;
            let fl = self
                .nodes
                .get_mut(&id)
                .and_then(|n| n.links.get_mut(&leader))
                .expect("a link");
            fl.link.retain(|(t, _)| {
                clients[t.client]
                    .pending
                    .as_ref()
                    .is_some_and(|p| p.op == t.op && p.attempt == t.attempt)
            });
            let broken = fl.stream.is_some_and(|s| !up || s.leader != theirs);
            if broken || (!up && fl.link.has_batch()) {
                self.break_link(id, leader)?;
                continue;
            }
            let Some(batch) = fl.link.take_batch() else {
                continue;
            };
            let stream = *fl.stream.get_or_insert(Stream {
                follower: own,
                leader: theirs,
            });
            self.stats.forward_batches += 1;
            self.stats.forward_batch_max =
                self.stats.forward_batch_max.max(batch.calls.len() as u64);
            self.stats.forward_cancelled += batch.cancelled.len() as u64;
            let delay = self.rng.range(1, self.p.max_delay + 1);
            self.schedule(
                delay,
                Event::ForwardBatch {
                    from: id,
                    to: leader,
                    stream,
                    batch,
                },
            );
        }
        Ok(())
    }

    /// The stream from `follower` to `leader` broke: the link ends every
    /// open call, saying which were sent. Oracle: a call it says was not
    /// sent (for which the service tells the client NOT_PROPOSED) has not
    /// reached the leader, and never will.
    fn break_link(&mut self, follower: NodeId, leader: NodeId) -> Check {
        let Some(fl) = self
            .nodes
            .get_mut(&follower)
            .and_then(|n| n.links.get_mut(&leader))
        else {
            return Ok(());
        };
        fl.stream = None;
        for ((ticket, tag), how) in fl.link.broken() {
            match how {
                Lost::Unsent => {
                    self.stats.forward_lost_unsent += 1;
                    if self.arrived.contains(&tag) {
                        return Err(format!(
                            "replica {follower}'s link to {leader} reported call {tag} ({ticket:?}) lost unsent, but it had reached the leader"
                        ));
                    }
                    self.lost_unsent.insert(tag);
                }
                Lost::InFlight => self.stats.forward_lost_in_flight += 1,
            }
            // Either way the client tries again (with the same request id).
            self.transmit(Event::ToClient {
                ticket,
                from: follower,
                resp: Response::Retry(None),
            });
        }
        Ok(())
    }

    /// Whether the stream still joins the incarnations it was opened
    /// between, across a network that connects them.
    fn stream_up(&self, follower: NodeId, leader: NodeId, stream: Stream) -> bool {
        self.alive(follower)
            && self.alive(leader)
            && self.nodes[&follower].incarnation == stream.follower
            && self.nodes[&leader].incarnation == stream.leader
            && self.connected(follower, leader)
    }

    /// Whether `follower` still runs `stream` to `leader`.
    fn runs_stream(&self, follower: NodeId, leader: NodeId, stream: Stream) -> bool {
        self.alive(follower)
            && self.nodes[&follower].incarnation == stream.follower
            && self.nodes[&follower]
                .links
                .get(&leader)
                .is_some_and(|fl| fl.stream == Some(stream))
    }

    /// A batch reaches the leader: cancelled calls are forgotten, new ones
    /// served like a client's own, their answers kept for the stream.
    fn on_forward_batch(
        &mut self,
        follower: NodeId,
        leader: NodeId,
        stream: Stream,
        batch: Batch<Forwarded>,
    ) -> Check {
        if !self.stream_up(follower, leader, stream) {
            // It broke under the batch; the follower finds out.
            if self.runs_stream(follower, leader, stream) {
                self.break_link(follower, leader)?;
            }
            return Ok(());
        }
        if !batch.cancelled.is_empty() {
            let gone = |c: &Call| matches!(c.via, Some((f, s, id)) if f == follower && s == stream && batch.cancelled.contains(&id));
            let dropped = std::cell::RefCell::new(Vec::new());
            if let Some(d) = self.nodes.get_mut(&leader).and_then(|n| n.driver.as_mut()) {
                let keep = |c: &Call| {
                    let keep = !gone(c);
                    if !keep {
                        dropped.borrow_mut().push(c.id);
                    }
                    keep
                };
                d.retain_callers(keep, keep);
            }
            let outstanding = self.outstanding.entry(leader).or_default();
            for id in dropped.into_inner() {
                outstanding.remove(&id);
            }
        }
        for (id_there, (tag, ticket, req)) in batch.calls {
            if self.lost_unsent.contains(&tag) {
                return Err(format!(
                    "call {tag} ({ticket:?}) reached leader {leader} from {follower}, after its link reported it lost unsent"
                ));
            }
            self.arrived.insert(tag);
            self.on_request(ticket, leader, req, Some((follower, stream, id_there)));
        }
        self.drain(leader)
    }

    /// The leader's answers reach the follower, which hands each to the
    /// client whose call it still holds.
    fn on_forward_answers(
        &mut self,
        leader: NodeId,
        follower: NodeId,
        stream: Stream,
        answers: Vec<(u64, Response)>,
    ) -> Check {
        if !self.runs_stream(follower, leader, stream) {
            return Ok(());
        }
        if !self.stream_up(follower, leader, stream) {
            return self.break_link(follower, leader);
        }
        for (id_there, resp) in answers {
            let link = &mut self
                .nodes
                .get_mut(&follower)
                .and_then(|n| n.links.get_mut(&leader))
                .expect("a link")
                .link;
            if let Some((ticket, _)) = link.answered(id_there) {
                self.transmit(Event::ToClient {
                    ticket,
                    from: follower,
                    resp,
                });
            }
        }
        Ok(())
    }

    /// The ledger of every durable vote: checks the two core safety
    /// properties of Paxos as votes are cast.
    fn record_vote(&mut self, id: NodeId, vote: Accepted) -> Check {
        let majority = self.majority();
        let entry = self
            .votes
            .entry((vote.slot, vote.ballot))
            .or_insert_with(|| (vote.value.clone(), BTreeSet::new()));
        if entry.0 != vote.value {
            return Err(format!(
                "slot {} has two values under ballot {}: {:?} and {:?} (replica {id})",
                vote.slot, vote.ballot, entry.0, vote.value
            ));
        }
        entry.1.insert(id);
        if entry.1.len() >= majority {
            match self.truly_chosen.get(&vote.slot) {
                Some(v) if *v != vote.value => {
                    return Err(format!(
                        "slot {} chosen twice: {:?} and then {:?} under ballot {}",
                        vote.slot, v, vote.value, vote.ballot
                    ));
                }
                Some(_) => {}
                None => {
                    self.truly_chosen.insert(vote.slot, vote.value);
                }
            }
        }
        Ok(())
    }

    fn track_leader(&mut self) {
        let leader = self
            .nodes
            .iter()
            .filter_map(|(&id, n)| {
                n.driver
                    .as_ref()
                    .map(Driver::replica)
                    .filter(|r| r.is_leader())
                    .map(|r| (id, r.status().promised))
            })
            .max_by_key(|&(_, b)| b);
        if leader.is_some() && leader != self.last_leader {
            self.stats.leader_changes += 1;
            self.last_leader = leader;
            // The next leader after a hand-off, if soon after: was it the
            // target? (Two election timeouts on, the hand-off has lapsed.)
            if let (Some((_, old, target, at)), Some((id, ballot))) = (self.hand_off.take(), leader)
                && id == target
                && ballot > old
                && self.now - at <= 2 * ELECTION
            {
                self.stats.hand_offs_completed += 1;
            }
        }
    }

    // ----- the server around the core, and the clients ---------------------

    fn on_request(
        &mut self,
        ticket: Ticket,
        to: NodeId,
        req: Request,
        via: Option<(NodeId, Stream, u64)>,
    ) {
        let Some(replica) = self.nodes[&to].driver.as_ref().map(Driver::replica) else {
            return;
        };
        let call = Call {
            id: self.next_call,
            ticket,
            via,
        };
        self.next_call += 1;
        if self.p.forward && via.is_none() {
            self.call_requests.insert(call.id, req.clone());
        }
        // For the reads oracle: was this leader already deposed, durably,
        // by a majority when the read arrived? Then it must never serve it.
        let deposed = replica.is_leader() && {
            let ballot = replica.status().promised;
            let above = self
                .nodes
                .values()
                .filter(|n| n.disk.promised > ballot)
                .count();
            above >= self.majority()
        };
        if deposed {
            self.deposed_reads.insert(call.id);
        }
        // For the reads oracle: the read must see every slot applied
        // anywhere before it arrived, and (ReadIndex) at least the leader's
        // commit index when it arrived.
        let index = if replica.is_leader() {
            replica.committed()
        } else {
            0
        };
        let floor = (self.applied_log.len() as Slot).max(index);
        self.read_floor.insert(call.id, floor);
        self.outstanding.entry(to).or_default().insert(call.id);
        // Some writes say how long their caller waits.
        let deadline = self
            .chance(self.p.deadline)
            .then(|| self.rng.range(0, self.p.max_deadline + 1));
        let d = self.driver(to);
        let deadline = deadline.map(|ticks| d.now() + ticks);
        match req {
            Request::Read { key } => d.read(key, call),
            Request::OpenSession => {
                let command = Command {
                    proposal_id: 0,
                    client_id: 0,
                    sequence: 0,
                    key: String::new(),
                    op: Op::OpenSession,
                };
                if let Some(proposal) = d.write(command, call, deadline) {
                    self.call_proposal.insert(call.id, proposal);
                }
            }
            Request::Write {
                client_id,
                sequence,
                key,
                op,
            } => {
                let command = Command {
                    proposal_id: 0,
                    client_id,
                    sequence,
                    key,
                    op,
                };
                if let Some(proposal) = d.write(command, call, deadline) {
                    self.call_proposal.insert(call.id, proposal);
                }
            }
        }
    }

    fn majority(&self) -> usize {
        self.p.replicas as usize / 2 + 1
    }

    fn on_response(&mut self, ticket: Ticket, from: NodeId, resp: Response) -> Check {
        let now = self.now;
        let client = ticket.client;
        let Some(pending) = &self.clients[client].pending else {
            return Ok(());
        };
        if pending.op != ticket.op {
            return Ok(()); // about an operation already answered
        }
        match resp {
            Response::Done(output) if pending.op != OPENING => {
                // Any attempt's answer is the operation's answer: writes are
                // deduplicated, and a read ran after its attempt was sent.
                let op = &mut self.history[pending.op];
                op.output = Some(output);
                op.ret = now;
                self.clients[client].pending = None;
                self.clients[client].last_answered = Some(from);
            }
            Response::Opened(session) if pending.op == OPENING => {
                // Any attempt's session will do (the others go unused, and
                // expire).
                let c = &mut self.clients[client];
                c.session = Some(session);
                c.sequence = 0;
                c.pending = None;
                c.last_answered = Some(from);
                self.stats.sessions_opened += 1;
            }
            Response::Expired if pending.op != OPENING => {
                if let Request::Write {
                    client_id,
                    sequence,
                    ..
                } = pending.req
                    && self.executed.contains_key(&(client_id, sequence))
                {
                    self.stats.expired_after_applied += 1;
                }
                // The write may or may not have been applied by an earlier
                // attempt: the history keeps it without an output (it may
                // take effect, once, anywhere after its call). The client
                // opens a new session for its next write.
                let c = &mut self.clients[client];
                c.session = None;
                c.pending = None;
                c.last_answered = Some(from);
                self.stats.expired_writes += 1;
            }
            Response::Done(_) | Response::Opened(_) | Response::Expired => {
                return Err(format!(
                    "client {client} got {resp:?} from replica {from} for {:?}",
                    pending.req
                ));
            }
            Response::Retry(hint) => {
                if ticket.attempt == pending.attempt {
                    let target = hint.unwrap_or_else(|| self.random_replica());
                    self.resend(client, target);
                }
            }
        }
        Ok(())
    }

    fn random_replica(&mut self) -> NodeId {
        self.rng.range(1, u64::from(self.p.replicas) + 1) as NodeId
    }

    fn resend(&mut self, client: usize, target: NodeId) {
        let deadline = self.now + CLIENT_TIMEOUT;
        let Some(pending) = self.clients[client].pending.as_mut() else {
            return;
        };
        pending.attempt += 1;
        pending.deadline = deadline;
        let ticket = Ticket {
            client,
            op: pending.op,
            attempt: pending.attempt,
        };
        let req = pending.req.clone();
        self.transmit(Event::ToReplica {
            ticket,
            to: target,
            req,
        });
    }

    fn clients_act(&mut self) {
        for c in 0..self.clients.len() {
            match &self.clients[c].pending {
                Some(p) if self.now >= p.deadline => {
                    let target = self.random_replica();
                    self.resend(c, target);
                }
                Some(_) => {}
                None if self.issued < self.p.ops && self.clients[c].session.is_none() => {
                    self.open_session(c)
                }
                None if self.issued < self.p.ops && self.rng.range(0, 4) == 0 => self.issue(c),
                None => {}
            }
        }
    }

    /// Client `c` opens a session (retried like an operation until
    /// answered).
    fn open_session(&mut self, c: usize) {
        self.clients[c].pending = Some(Pending {
            op: OPENING,
            attempt: 0,
            req: Request::OpenSession,
            deadline: 0,
        });
        let target = match self.clients[c].last_answered {
            Some(id) if self.rng.range(0, 4) != 0 => id,
            _ => self.random_replica(),
        };
        self.resend(c, target);
    }

    fn issue(&mut self, c: usize) {
        let key = format!("k{}", self.rng.range(0, self.p.keys as u64));
        let value = self.next_value;
        self.next_value += 1;
        let (input, req) = match self.rng.range(0, 10) {
            0..=2 => (Input::Get, Request::Read { key: key.clone() }),
            kind => {
                let (input, op) = match kind {
                    3 | 4 => (Input::Insert(value), Op::Insert(value)),
                    5 | 6 => (Input::Update(value), Op::Update(value)),
                    7 | 8 => (Input::Upsert(value), Op::Upsert(value)),
                    _ => (Input::Remove, Op::Remove),
                };
                let client = &mut self.clients[c];
                client.sequence += 1;
                let req = Request::Write {
                    client_id: client.session.expect("a session before any operation"),
                    sequence: client.sequence,
                    key: key.clone(),
                    op,
                };
                (input, req)
            }
        };
        self.history.push(Operation {
            client: self.clients[c].id,
            key,
            input,
            output: None,
            call: self.now,
            ret: u64::MAX,
        });
        self.issued += 1;
        self.clients[c].pending = Some(Pending {
            op: self.history.len() - 1,
            attempt: 0,
            req,
            deadline: 0,
        });
        let bait = self
            .bait
            .filter(|&(_, until)| self.now < until && self.faulty())
            .map(|(id, _)| id);
        let is_read = matches!(self.history.last().map(|o| &o.input), Some(Input::Get));
        let target = match (bait, self.clients[c].last_answered) {
            (Some(id), _) if is_read && self.rng.range(0, 2) == 0 => id,
            (_, Some(id)) if self.rng.range(0, 4) != 0 => id,
            _ => self.random_replica(),
        };
        self.resend(c, target);
    }
}

/// The commands of a chosen value (none for a no-op).
fn commands_of(slot: Slot, value: &Value) -> Result<Vec<Command>, String> {
    match value {
        Value::Noop => Ok(Vec::new()),
        Value::Batch(commands) => commands
            .iter()
            .map(|bytes| Command::decode(bytes).map_err(|e| format!("slot {slot}: {e}")))
            .collect(),
    }
}

/// Oracle (exactly once), for one command of the chosen log at `slot`,
/// which got `reply` and did or did not execute (`ran`): a write (client
/// id, sequence) executes at most once, never once a copy of it was
/// refused as expired, and a refused copy executes nothing.
fn check_exactly_once(
    executed: &mut BTreeMap<(u64, u64), Slot>,
    refused: &mut BTreeSet<(u64, u64)>,
    slot: Slot,
    cmd: &Command,
    reply: Reply,
    ran: bool,
) -> Check {
    if cmd.client_id == 0 || cmd.op == Op::OpenSession {
        return Ok(());
    }
    let write = (cmd.client_id, cmd.sequence);
    if reply == Reply::SessionExpired {
        if ran {
            return Err(format!(
                "{cmd:?} at slot {slot} was refused as expired, yet executed"
            ));
        }
        refused.insert(write);
        return Ok(());
    }
    if !ran {
        return Ok(());
    }
    if refused.contains(&write) {
        return Err(format!(
            "{cmd:?} was executed at slot {slot}, after a copy of it was refused as expired"
        ));
    }
    if let Some(first) = executed.insert(write, slot) {
        return Err(format!(
            "{cmd:?} was executed twice: at slots {first} and {slot}"
        ));
    }
    Ok(())
}

/// A state machine's state, counting the reads of keys: a write reads its
/// key exactly when it is executed (not deduplicated, stale or refused).
struct Observed<'a> {
    state: &'a mut MemState,
    reads: Cell<u64>,
}

impl KvState for Observed<'_> {
    fn get(&self, key: &str) -> Option<i32> {
        self.reads.set(self.reads.get() + 1);
        self.state.get(key)
    }
    fn put(&mut self, key: &str, value: i32) {
        self.state.put(key, value)
    }
    fn delete(&mut self, key: &str) {
        self.state.delete(key)
    }
    fn session(&self, client_id: u64) -> Option<Session> {
        self.state.session(client_id)
    }
    fn set_session(&mut self, client_id: u64, session: Session) {
        self.state.set_session(client_id, session)
    }
    fn remove_session(&mut self, client_id: u64) {
        self.state.remove_session(client_id)
    }
    fn oldest_session(&self) -> Option<(Slot, u64)> {
        self.state.oldest_session()
    }
    fn session_count(&self) -> u64 {
        self.state.session_count()
    }
}

/// The response a client gets for a call the driver could not serve.
fn retry(e: CallError) -> Response {
    match e {
        CallError::NotLeader(hint) => Response::Retry(hint),
        // The client retries with the same request id, which is safe.
        CallError::Retry
        | CallError::Unknown
        | CallError::Stopped
        | CallError::Busy { .. }
        | CallError::Expired => Response::Retry(None),
    }
}

/// Each oracle, shown to fail on the bug it exists for (and to pass the
/// same situation done right), so none can silently stop checking.
#[cfg(test)]
mod oracles_can_fail {
    use super::*;

    fn world() -> World {
        let mut p = Params::from_seed(1, 10);
        p.replicas = 3;
        p.bootstrap = false;
        World::new(1, p)
    }

    /// Restarts replica `id` from `disk` (and its state machine as is).
    fn restart_with(w: &mut World, id: NodeId, disk: Disk) {
        w.crash(id);
        w.nodes.get_mut(&id).unwrap().disk = disk;
        w.start(id);
    }

    #[test]
    fn exactly_once_catches_a_write_executed_twice_or_after_it_was_refused_as_expired() {
        let write = Command {
            proposal_id: 9,
            client_id: 1 << 16,
            sequence: 3,
            key: "k".into(),
            op: Op::Upsert(1),
        };
        let (mut executed, mut refused) = (BTreeMap::new(), BTreeSet::new());
        let mut check = |slot, reply, ran| {
            check_exactly_once(&mut executed, &mut refused, slot, &write, reply, ran)
        };
        // Executed once, then deduplicated: fine; executed again: caught.
        assert_eq!(check(5, Reply::Inserted, true), Ok(()));
        assert_eq!(check(6, Reply::Inserted, false), Ok(()));
        assert!(check(7, Reply::Updated { previous: 1 }, true).is_err());
        // Refused as expired (after its execution: fine), then executed
        // again: caught; a refusal that executed anything: caught.
        let (mut executed, mut refused) = (BTreeMap::new(), BTreeSet::new());
        let mut check = |slot, reply, ran| {
            check_exactly_once(&mut executed, &mut refused, slot, &write, reply, ran)
        };
        assert_eq!(check(5, Reply::SessionExpired, false), Ok(()));
        assert!(check(8, Reply::Inserted, true).is_err());
        assert!(check(9, Reply::SessionExpired, true).is_err());
        // Writes without a session are not deduplicated: never caught.
        let anonymous = Command {
            client_id: 0,
            sequence: 0,
            ..write.clone()
        };
        let (mut executed, mut refused) = (BTreeMap::new(), BTreeSet::new());
        for slot in 1..3 {
            assert_eq!(
                check_exactly_once(
                    &mut executed,
                    &mut refused,
                    slot,
                    &anonymous,
                    Reply::Inserted,
                    true
                ),
                Ok(())
            );
        }
    }

    #[test]
    fn durability_order_takes_a_vote_compacted_since_only_if_it_was_durable() {
        let mut w = world();
        let b = Ballot::new(1, 2);
        let accepted = Message::Accepted { ballot: b, slot: 1 };
        let promise = promise_message(Ballot::new(2, 3), vec![vote(1, b, "x")]);
        w.nodes.get_mut(&1).unwrap().disk.promised = Ballot::new(2, 3);
        // Slot 1 is compacted on disk, but the vote was never durable here.
        w.nodes.get_mut(&1).unwrap().disk.compacted = 1;
        assert!(w.check_durable_before_send(1, &accepted).is_err());
        assert!(w.check_durable_before_send(1, &promise).is_err());
        // Durable on another replica only: still not here.
        w.record_vote(2, vote(1, b, "x")).unwrap();
        assert!(w.check_durable_before_send(1, &promise).is_err());
        // Durable here, then compacted away: fine.
        w.record_vote(1, vote(1, b, "x")).unwrap();
        assert_eq!(w.check_durable_before_send(1, &accepted), Ok(()));
        assert_eq!(w.check_durable_before_send(1, &promise), Ok(()));
        // But not as another value, nor under another ballot.
        let other = promise_message(Ballot::new(2, 3), vec![vote(1, b, "y")]);
        assert!(w.check_durable_before_send(1, &other).is_err());
        let other = Message::Accepted {
            ballot: Ballot::new(1, 3),
            slot: 1,
        };
        assert!(w.check_durable_before_send(1, &other).is_err());
        // Above the compacted index the disk itself must hold it.
        w.nodes.get_mut(&1).unwrap().disk.compacted = 0;
        assert!(w.check_durable_before_send(1, &accepted).is_err());
    }

    #[test]
    fn only_voters_vote_catches_a_learner_or_unknown_replica_voting() {
        let mut w = world();
        let b = Ballot::new(3, 2);
        let votes = [
            Message::Accepted { ballot: b, slot: 1 },
            promise_message(b, vec![]),
            Message::HeartbeatAck {
                ballot: b,
                read_round: 0,
                committed: 0,
            },
        ];
        let refusals = [
            Message::Nack { promised: b },
            Message::PreVoteReply {
                ballot: b,
                granted: true,
            },
        ];
        for m in votes.iter().chain(&refusals) {
            assert_eq!(w.check_only_voters_vote(1, m), Ok(()), "a voter: {m:?}");
        }
        // A wiped replica, unknown until its probes settle; it still probes.
        restart_with(&mut w, 1, Disk::default());
        let probe = Message::Probe { nonce: 1 };
        assert_eq!(w.check_only_voters_vote(1, &probe), Ok(()));
        for m in votes.iter().chain(&refusals) {
            assert!(w.check_only_voters_vote(1, m).is_err(), "unknown: {m:?}");
        }
        // A learner.
        let learner = Disk {
            membership: Some(Membership::Learner),
            ..Disk::default()
        };
        restart_with(&mut w, 1, learner);
        for m in votes.iter().chain(&refusals) {
            assert!(w.check_only_voters_vote(1, m).is_err(), "learner: {m:?}");
        }
        // A voter in memory whose voter membership is not durable yet (a
        // learner rejoining, its sync in progress) may refuse, not vote.
        restart_with(&mut w, 1, Disk::voter());
        w.nodes.get_mut(&1).unwrap().disk.membership = Some(Membership::Learner);
        for m in &votes {
            assert!(w.check_only_voters_vote(1, m).is_err(), "rejoining: {m:?}");
        }
        for m in &refusals {
            assert_eq!(w.check_only_voters_vote(1, m), Ok(()), "rejoining: {m:?}");
        }
    }

    #[test]
    fn fresh_means_blank_catches_a_replica_with_state_answering_fresh() {
        let mut w = world();
        let fresh = Message::ProbeReply {
            nonce: 1,
            fresh: true,
        };
        let not_fresh = Message::ProbeReply {
            nonce: 1,
            fresh: false,
        };
        // A voter that holds nothing is fresh.
        assert_eq!(w.check_fresh_only_when_blank(1, &fresh), Ok(()));
        let changes: [fn(&mut Node); 5] = [
            |n| n.disk.promised = Ballot::new(1, 1),
            |n| {
                n.disk.votes.insert(1, vote(1, Ballot::new(1, 1), "x"));
            },
            |n| n.disk.snapshot = 4,
            |n| n.machine.applied = 4,
            |n| n.disk.membership = Some(Membership::Learner),
        ];
        for change in changes {
            let mut w = world();
            change(w.nodes.get_mut(&1).unwrap());
            assert!(w.check_fresh_only_when_blank(1, &fresh).is_err());
            assert_eq!(w.check_fresh_only_when_blank(1, &not_fresh), Ok(()));
        }
        // A learner in memory whose membership is not durable yet.
        let learner = Disk {
            membership: Some(Membership::Learner),
            ..Disk::default()
        };
        restart_with(&mut w, 1, learner);
        w.nodes.get_mut(&1).unwrap().disk.membership = None;
        assert!(w.check_fresh_only_when_blank(1, &fresh).is_err());
    }

    #[test]
    fn installs_catch_a_snapshot_that_is_not_the_chosen_state() {
        let mut w = world();
        let b = Ballot::new(1, 1);
        w.record_vote(1, vote(1, b, "x")).unwrap();
        w.record_vote(2, vote(1, b, "x")).unwrap();
        w.apply(1, 1, value("x")).unwrap();
        let right = w.nodes[&1].machine.kv.clone();
        assert_eq!(w.check_install(2, 1, &right), Ok(()));
        // The state before slot 1, claimed to be at slot 1.
        assert!(w.check_install(2, 1, &MemState::new()).is_err());
        // A snapshot past the chosen log.
        assert!(w.check_install(2, 2, &right).is_err());
    }

    #[test]
    fn the_end_catches_a_replica_that_never_became_a_voter_again() {
        let mut w = world();
        assert_eq!(w.check_all_voters(), Ok(()));
        w.nodes.get_mut(&2).unwrap().disk.membership = Some(Membership::Learner);
        assert!(w.check_all_voters().is_err());
        w.nodes.get_mut(&2).unwrap().disk.membership = None;
        assert!(w.check_all_voters().is_err());
    }

    fn value(s: &str) -> Value {
        let cmd = Command {
            proposal_id: 77,
            client_id: 0,
            sequence: 0,
            key: s.into(),
            op: Op::Upsert(1),
        };
        Value::Batch(vec![cmd.encode()])
    }

    fn vote(slot: Slot, ballot: Ballot, s: &str) -> Accepted {
        Accepted {
            slot,
            ballot,
            value: value(s),
        }
    }

    #[test]
    fn durability_order_catches_an_accepted_sent_before_its_sync() {
        let mut w = world();
        let b = Ballot::new(1, 2);
        let accepted = Message::Accepted { ballot: b, slot: 1 };
        assert!(w.check_durable_before_send(1, &accepted).is_err());
        w.nodes
            .get_mut(&1)
            .unwrap()
            .disk
            .votes
            .insert(1, vote(1, b, "x"));
        assert_eq!(w.check_durable_before_send(1, &accepted), Ok(()));
        // A vote on disk under another ballot does not back it either.
        let other = Message::Accepted {
            ballot: Ballot::new(2, 3),
            slot: 1,
        };
        assert!(w.check_durable_before_send(1, &other).is_err());
    }

    #[test]
    fn durability_order_catches_a_promise_or_ack_sent_before_the_promise_is_on_disk() {
        let mut w = world();
        let b = Ballot::new(4, 2);
        let ack = Message::HeartbeatAck {
            ballot: b,
            read_round: 0,
            committed: 0,
        };
        let promise = promise_message(b, vec![vote(3, Ballot::new(1, 1), "v")]);
        assert!(w.check_durable_before_send(1, &ack).is_err());
        assert!(w.check_durable_before_send(1, &promise).is_err());
        w.nodes.get_mut(&1).unwrap().disk.promised = b;
        assert_eq!(w.check_durable_before_send(1, &ack), Ok(()));
        // The promise is durable, the vote it reports is not yet.
        assert!(w.check_durable_before_send(1, &promise).is_err());
        w.nodes
            .get_mut(&1)
            .unwrap()
            .disk
            .votes
            .insert(3, vote(3, Ballot::new(1, 1), "v"));
        assert_eq!(w.check_durable_before_send(1, &promise), Ok(()));
    }

    #[test]
    fn chosen_value_catches_a_slot_taken_as_chosen_without_a_durable_majority() {
        let mut w = world();
        let b = Ballot::new(1, 1);
        assert!(w.check_chosen(1, 1, &value("x")).is_err());
        w.record_vote(1, vote(1, b, "x")).unwrap();
        // The leader's own vote and one from an older ballot: no majority
        // under one ballot.
        w.record_vote(2, vote(1, Ballot::new(0, 2), "x")).unwrap();
        assert!(w.check_chosen(1, 1, &value("x")).is_err());
        w.record_vote(3, vote(1, b, "x")).unwrap();
        assert_eq!(w.check_chosen(1, 1, &value("x")), Ok(()));
        assert!(w.check_chosen(2, 1, &value("y")).is_err());
    }

    #[test]
    fn chosen_value_catches_a_leader_counting_votes_of_another_ballot() {
        let mut w = world();
        let (old, new) = (Ballot::new(1, 1), Ballot::new(3, 1));
        // The value was chosen under the old ballot; the re-elected leader
        // re-proposes it, and has only its own vote under the new one.
        w.record_vote(1, vote(1, old, "x")).unwrap();
        w.record_vote(2, vote(1, old, "x")).unwrap();
        w.record_vote(1, vote(1, new, "x")).unwrap();
        assert_eq!(w.check_chosen(1, 1, &value("x")), Ok(()));
        assert!(w.check_chosen_under(1, 1, &value("x"), new).is_err());
        w.record_vote(3, vote(1, new, "x")).unwrap();
        assert_eq!(w.check_chosen_under(1, 1, &value("x"), new), Ok(()));
    }

    fn promise_message(ballot: Ballot, accepted: Vec<Accepted>) -> Message {
        Message::Promise {
            ballot,
            from_slot: 1,
            to_slot: None,
            accepted,
            snapshot: 0,
        }
    }

    fn call(w: &mut World, node: NodeId) -> Call {
        let call = Call {
            id: w.next_call,
            ticket: Ticket {
                client: 0,
                op: 0,
                attempt: 0,
            },
            via: None,
        };
        w.next_call += 1;
        w.outstanding.entry(node).or_default().insert(call.id);
        call
    }

    #[test]
    fn answers_catch_a_wrong_reply_and_a_second_answer() {
        let mut w = world();
        let c = call(&mut w, 1);
        w.call_proposal.insert(c.id, 5);
        w.reference_replies.insert(5, Reply::Inserted);
        let wrong = Answer::Write {
            caller: c,
            result: Ok(Reply::AlreadyExists),
        };
        assert!(w.answer(1, vec![wrong]).is_err());
        let right = || Answer::Write {
            caller: c,
            result: Ok(Reply::Inserted),
        };
        assert_eq!(w.answer(1, vec![right()]), Ok(()));
        assert!(w.answer(1, vec![right()]).is_err(), "answered twice");
        // "Certainly not in the log" for a command that was applied.
        let c = call(&mut w, 1);
        w.call_proposal.insert(c.id, 5);
        let retry = Answer::Write {
            caller: c,
            result: Err(CallError::Retry),
        };
        assert!(w.answer(1, vec![retry]).is_err());
    }

    #[test]
    fn reads_catch_a_deposed_leader_serving_a_read() {
        let mut w = world();
        let c = call(&mut w, 1);
        w.deposed_reads.insert(c.id);
        let served = Answer::Read {
            caller: c,
            result: Ok("k".into()),
        };
        assert!(w.answer(1, vec![served]).is_err());
        let c = call(&mut w, 1);
        w.deposed_reads.insert(c.id);
        let refused = Answer::Read {
            caller: c,
            result: Err(CallError::Retry),
        };
        assert_eq!(w.answer(1, vec![refused]), Ok(()));
    }

    #[test]
    fn reads_catch_a_read_served_from_before_a_write_applied_elsewhere() {
        let mut w = world();
        let c = call(&mut w, 1);
        // Slot 1 was applied somewhere before the read arrived at replica 1,
        // whose state machine has not got there.
        w.read_floor.insert(c.id, 1);
        let served = || Answer::Read {
            caller: c,
            result: Ok("k".into()),
        };
        assert!(w.answer(1, vec![served()]).is_err());
        w.nodes.get_mut(&1).unwrap().machine.applied = 1;
        assert_eq!(w.answer(1, vec![served()]), Ok(()));
    }
}
