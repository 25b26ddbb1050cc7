//! A deterministic world for the consensus core: replicas, a faulty network,
//! crashing disks, and clients that retry — all driven by one seed.
//!
//! Each replica is a [`Replica`] with a simulated disk (only what a `Ready`
//! asked to persist survives a crash) and a state machine (applied entries
//! survive, as sled's do). The network drops, duplicates, delays (and so
//! reorders) and partitions messages. Clients send each operation to a
//! random replica and retry through others on redirects and timeouts,
//! keeping their `(client_id, sequence)` so a retried write applies once.
//!
//! After every step the world checks safety:
//! - two votes for one slot under one ballot carry the same value;
//! - no two values are ever chosen (accepted by a majority under one
//!   ballot) for one slot;
//! - every value a replica learns as chosen is the one truly chosen;
//! - every replica's applied log is a prefix of the longest, and equal
//!   applied prefixes give equal KV state;
//! - every reply a client gets is for a command that was chosen.
//!
//! At the end it heals the network, restarts everyone, requires every
//! operation to complete and every replica to converge, and checks the
//! client history for linearizability.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};

use paxoskv::kv::{self, Command, KvState, MemState, Op, Reply};
use paxoskv::paxos::rng::Rng;
use paxoskv::paxos::{
    Accepted, Ballot, Config, Envelope, Message, NodeId, Persist, ReadId, Ready, Replica, Slot,
    Value,
};

use crate::linearizability::{self, Input, Operation, Output};

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
}

impl Params {
    /// Draws a scenario from the seed: 3 or 5 replicas and fault rates from
    /// none to harsh.
    pub fn from_seed(seed: u64, ops: usize) -> Self {
        let mut rng = Rng::new(seed ^ 0x005e_ed0f_fa17);
        let harsh = rng.range(0, 4) == 0;
        Params {
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
        }
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
    pub leader_changes: u64,
    pub slots_chosen: u64,
    pub ticks: u64,
}

/// A request a client sends to a replica.
#[derive(Clone, Debug)]
enum Request {
    Read {
        key: String,
    },
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
    SyncDone {
        node: NodeId,
        incarnation: u64,
    },
}

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

/// What survives a crash.
#[derive(Default)]
struct Disk {
    promised: Ballot,
    votes: BTreeMap<Slot, Accepted>,
}

/// The state machine, durable like sled's trees.
#[derive(Default)]
struct Machine {
    kv: MemState,
    applied: Slot,
}

/// Volatile per-replica bookkeeping of the simulated server around the core.
#[derive(Default)]
struct Waiters {
    writes: BTreeMap<u64, Ticket>,
    reads: BTreeMap<ReadId, (Ticket, String)>,
    /// Reads whose barrier passed, waiting for the applied index.
    ready_reads: Vec<(ReadId, Slot)>,
}

struct Node {
    replica: Option<Replica>,
    incarnation: u64,
    disk: Disk,
    machine: Machine,
    waiters: Waiters,
    /// Syncs in progress, completing in order; lost in a crash.
    syncing: VecDeque<Write>,
    last_sync_done: u64,
    group: u32,
    paused_until: u64,
}

struct Pending {
    op: usize,
    attempt: u64,
    req: Request,
    deadline: u64,
}

struct Client {
    id: u64,
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
    next_id: u64,
    healed: bool,
    // The safety ledger.
    votes: BTreeMap<(Slot, Ballot), (Value, BTreeSet<NodeId>)>,
    truly_chosen: BTreeMap<Slot, Value>,
    applied_log: Vec<Value>,
    digests: BTreeMap<Slot, u64>,
    applied_commands: BTreeSet<(u64, u64)>,
    last_leader: Option<(NodeId, Ballot)>,
    pub stats: Stats,
}

type Check = Result<(), String>;

const HEARTBEAT: u64 = 3;
const ELECTION: u64 = 20;
const CLIENT_TIMEOUT: u64 = 120;
const MAX_TICKS: u64 = 400_000;

impl World {
    pub fn new(seed: u64, p: Params) -> Self {
        let nodes = (1..=p.replicas)
            .map(|id| {
                let node = Node {
                    replica: None,
                    incarnation: 0,
                    disk: Disk::default(),
                    machine: Machine::default(),
                    waiters: Waiters::default(),
                    syncing: VecDeque::new(),
                    last_sync_done: 0,
                    group: 0,
                    paused_until: 0,
                };
                (id, node)
            })
            .collect();
        let clients = (0..p.clients)
            .map(|i| Client {
                id: i as u64 + 1,
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
            next_id: 1,
            healed: false,
            votes: BTreeMap::new(),
            truly_chosen: BTreeMap::new(),
            applied_log: Vec::new(),
            digests: BTreeMap::new(),
            applied_commands: BTreeSet::new(),
            last_leader: None,
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
        let votes = node.disk.votes.values().cloned().collect();
        let replica = Replica::new(cfg, node.disk.promised, votes, node.machine.applied)
            .expect("valid config");
        let node = self.nodes.get_mut(&id).expect("node exists");
        node.incarnation += 1;
        node.replica = Some(replica);
        node.waiters = Waiters::default();
    }

    fn crash(&mut self, id: NodeId) {
        let node = self.nodes.get_mut(&id).expect("node exists");
        if node.replica.take().is_some() {
            node.waiters = Waiters::default();
            node.syncing.clear();
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
            let delay = self.rng.range(1, self.p.max_delay + 1);
            self.schedule(delay, event.clone());
        }
    }

    fn alive(&self, id: NodeId) -> bool {
        self.nodes[&id].replica.is_some()
    }

    fn connected(&self, a: NodeId, b: NodeId) -> bool {
        self.nodes[&a].group == self.nodes[&b].group
    }

    // ----- the main loop ---------------------------------------------------

    /// Runs the scenario to the end; `Err` describes the first violation.
    pub fn run(&mut self) -> Check {
        loop {
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
                if let Some(r) = self.nodes.get_mut(&id).and_then(|n| n.replica.as_mut()) {
                    r.tick();
                }
                self.drain(id)?;
            }
            self.clients_act();
            self.deliver_due()?;
            self.track_leader();
            if !self.healed && self.issued >= self.p.ops {
                self.heal();
            }
            if self.healed && self.clients.iter().all(|c| c.pending.is_none()) && self.converged() {
                break;
            }
        }
        self.stats.ticks = self.now;
        self.stats.slots_chosen = self.truly_chosen.len() as u64;
        self.stats.ops_completed = self.history.iter().filter(|o| o.output.is_some()).count();
        self.stats.ops_unanswered = self.history.len() - self.stats.ops_completed;
        linearizability::check(&self.history).map_err(|v| v.to_string())
    }

    fn done_ops(&self) -> usize {
        self.history.iter().filter(|o| o.output.is_some()).count()
    }

    fn heal(&mut self) {
        self.healed = true;
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            let node = self.nodes.get_mut(&id).expect("node");
            node.group = 0;
            node.paused_until = 0;
            if !self.alive(id) {
                self.start(id);
            }
        }
    }

    /// Every replica has applied everything chosen.
    fn converged(&self) -> bool {
        let target = self.applied_log.len() as Slot;
        self.nodes.values().all(|n| n.machine.applied == target)
    }

    fn inject_faults(&mut self) {
        if self.chance(self.p.crash) {
            let id = self.rng.range(1, u64::from(self.p.replicas) + 1) as NodeId;
            self.crash(id);
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
            Event::Peer { to, .. } | Event::ToReplica { to, .. } => Some(*to),
            Event::SyncDone { node, .. } => Some(*node),
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
                    self.stats.dropped += 1;
                    return Ok(());
                }
                let Some(r) = self.nodes.get_mut(&to).and_then(|n| n.replica.as_mut()) else {
                    return Ok(());
                };
                if from == to {
                    r.step_own(msg);
                } else if let Err(refused) = r.step(from, msg) {
                    return Err(format!(
                        "replica {to} refused a message from {from}: {refused}"
                    ));
                }
                self.drain(to)
            }
            Event::ToReplica { ticket, to, req } => {
                self.on_request(ticket, to, req);
                self.drain(to)
            }
            Event::ToClient { ticket, from, resp } => self.on_response(ticket, from, resp),
        }
    }

    // ----- a replica's driver ---------------------------------------------

    /// Does what the core asks, in the order `Ready` prescribes, until it
    /// has nothing more.
    fn drain(&mut self, id: NodeId) -> Check {
        loop {
            let Some(r) = self.nodes.get_mut(&id).and_then(|n| n.replica.as_mut()) else {
                return Ok(());
            };
            let ready = r.take_ready();
            if ready.is_empty() {
                return Ok(());
            }
            self.handle_ready(id, ready)?;
        }
    }

    fn handle_ready(&mut self, id: NodeId, ready: Ready) -> Check {
        let Ready {
            messages,
            persist,
            persisted_messages,
            chosen,
            reads,
            failed_reads,
            dropped,
            abandoned_through: _,
        } = ready;
        for e in messages {
            self.send_peer(id, e.to, e.msg);
        }
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
        self.nodes
            .get_mut(&id)
            .expect("node")
            .waiters
            .ready_reads
            .extend(reads);
        for read in failed_reads {
            let node = self.nodes.get_mut(&id).expect("node");
            if let Some((ticket, _)) = node.waiters.reads.remove(&read) {
                self.transmit(Event::ToClient {
                    ticket,
                    from: id,
                    resp: Response::Retry(None),
                });
            }
        }
        for command in dropped {
            let cmd = Command::decode(&command)
                .map_err(|e| format!("dropped command undecodable: {e}"))?;
            let node = self.nodes.get_mut(&id).expect("node");
            if let Some(ticket) = node.waiters.writes.remove(&cmd.proposal_id) {
                self.transmit(Event::ToClient {
                    ticket,
                    from: id,
                    resp: Response::Retry(None),
                });
            }
        }
        self.serve_reads(id);
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
            node.disk.votes.insert(vote.slot, vote.clone());
        }
        for vote in persist.entries {
            self.record_vote(id, vote)?;
        }
        for e in persisted_messages {
            self.send_peer(id, e.to, e.msg);
        }
        for (slot, value) in chosen {
            self.apply(id, slot, value)?;
        }
        self.serve_reads(id);
        Ok(())
    }

    fn send_peer(&mut self, from: NodeId, to: NodeId, msg: Message) {
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
    }

    /// Applies a chosen slot to the replica's state machine and answers the
    /// client waiting for it here, if any.
    fn apply(&mut self, id: NodeId, slot: Slot, value: Value) -> Check {
        match self.truly_chosen.get(&slot) {
            Some(v) if *v == value => {}
            Some(v) => {
                return Err(format!(
                    "replica {id} learned {value:?} for slot {slot}, but {v:?} was chosen"
                ));
            }
            None => {
                return Err(format!(
                    "replica {id} learned slot {slot} = {value:?}, which no majority accepted"
                ));
            }
        }
        let node = self.nodes.get_mut(&id).expect("node");
        if slot != node.machine.applied + 1 {
            return Err(format!(
                "replica {id} applies slot {slot} after {}",
                node.machine.applied
            ));
        }
        // The applied logs must all be prefixes of one log.
        match self.applied_log.get(slot as usize - 1) {
            Some(v) if *v != value => {
                return Err(format!(
                    "replica {id} applied a different value at slot {slot}"
                ));
            }
            Some(_) => {}
            None => self.applied_log.push(value.clone()),
        }
        let mut replies = Vec::new();
        if let Value::Batch(commands) = &value {
            for bytes in commands {
                let cmd = Command::decode(bytes).map_err(|e| format!("slot {slot}: {e}"))?;
                let reply = kv::apply(&mut node.machine.kv, &cmd);
                if let Some(waiter) = node.waiters.writes.remove(&cmd.proposal_id) {
                    replies.push((waiter, cmd.clone(), reply));
                }
                if cmd.client_id != 0 {
                    self.applied_commands.insert((cmd.client_id, cmd.sequence));
                }
            }
        }
        node.machine.applied = slot;
        let digest = node.machine.kv.digest();
        match self.digests.get(&slot) {
            Some(&d) if d != digest => {
                return Err(format!(
                    "replica {id} has a different KV state after slot {slot}"
                ));
            }
            Some(_) => {}
            None => {
                self.digests.insert(slot, digest);
            }
        }
        for (ticket, cmd, reply) in replies {
            let output = match reply {
                Reply::Inserted => Output::Inserted,
                Reply::Updated { previous } => Output::Updated { previous },
                Reply::Removed { previous } => Output::Removed { previous },
                Reply::AlreadyExists => Output::AlreadyExists,
                Reply::NotFound => Output::NotFound,
                // An older attempt of a write its client has moved past.
                Reply::Stale { .. } => continue,
            };
            if !self
                .applied_commands
                .contains(&(cmd.client_id, cmd.sequence))
            {
                return Err(format!("reply for {cmd:?}, which was never applied"));
            }
            self.transmit(Event::ToClient {
                ticket,
                from: id,
                resp: Response::Done(output),
            });
        }
        Ok(())
    }

    fn serve_reads(&mut self, id: NodeId) {
        let node = self.nodes.get_mut(&id).expect("node");
        let applied = node.machine.applied;
        let (now, later): (Vec<_>, Vec<_>) = node
            .waiters
            .ready_reads
            .drain(..)
            .partition(|&(_, index)| index <= applied);
        node.waiters.ready_reads = later;
        let mut out = Vec::new();
        for (read, _) in now {
            if let Some((ticket, key)) = node.waiters.reads.remove(&read) {
                out.push((ticket, Output::Value(node.machine.kv.get(&key))));
            }
        }
        for (ticket, output) in out {
            self.transmit(Event::ToClient {
                ticket,
                from: id,
                resp: Response::Done(output),
            });
        }
    }

    /// The ledger of every durable vote: checks the two core safety
    /// properties of Paxos as votes are cast.
    fn record_vote(&mut self, id: NodeId, vote: Accepted) -> Check {
        let majority = self.p.replicas as usize / 2 + 1;
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
                n.replica
                    .as_ref()
                    .filter(|r| r.is_leader())
                    .map(|r| (id, r.status().promised))
            })
            .max_by_key(|&(_, b)| b);
        if leader.is_some() && leader != self.last_leader {
            self.stats.leader_changes += 1;
            self.last_leader = leader;
        }
    }

    // ----- the server around the core, and the clients ---------------------

    fn on_request(&mut self, ticket: Ticket, to: NodeId, req: Request) {
        let proposal_id = self.next_id;
        self.next_id += 1;
        let Some(node) = self.nodes.get_mut(&to) else {
            return;
        };
        let Some(r) = node.replica.as_mut() else {
            return;
        };
        let result = match &req {
            Request::Read { key } => r.read(proposal_id).map(|()| {
                node.waiters
                    .reads
                    .insert(proposal_id, (ticket, key.clone()));
            }),
            Request::Write {
                client_id,
                sequence,
                key,
                op,
            } => {
                let cmd = Command {
                    proposal_id,
                    client_id: *client_id,
                    sequence: *sequence,
                    key: key.clone(),
                    op: *op,
                };
                r.propose(cmd.encode()).map(|()| {
                    node.waiters.writes.insert(proposal_id, ticket);
                })
            }
        };
        if let Err(not_leader) = result {
            self.transmit(Event::ToClient {
                ticket,
                from: to,
                resp: Response::Retry(not_leader.leader),
            });
        }
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
            Response::Done(output) => {
                // Any attempt's answer is the operation's answer: writes are
                // deduplicated, and a read ran after its attempt was sent.
                let op = &mut self.history[pending.op];
                op.output = Some(output);
                op.ret = now;
                self.clients[client].pending = None;
                self.clients[client].last_answered = Some(from);
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
                None if self.issued < self.p.ops && self.rng.range(0, 4) == 0 => self.issue(c),
                None => {}
            }
        }
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
                    client_id: client.id,
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
        let target = match self.clients[c].last_answered {
            Some(id) if self.rng.range(0, 4) != 0 => id,
            _ => self.random_replica(),
        };
        self.resend(c, target);
    }
}
