//! What the core's unit tests share: a lossless in-order network of
//! replicas ([`Net`]) and small helpers. The simulator in `tests/simulation`
//! is the faulty version.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;

use super::ballot::{Ballot, NodeId, Slot};
use super::config::Config;
use super::message::{
    Accepted, Envelope, Membership, Message, ReadId, Ready, SnapshotFetch, Value,
};
use super::replica::{Replica, Restore};

/// A client command with `s` as its bytes.
pub fn cmd(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// A batch of the commands `items`.
pub fn batch(items: &[&str]) -> Value {
    Value::Batch(items.iter().map(|s| cmd(s)).collect())
}

/// Small messages: one command of at most 1000 bytes per slot, and at most
/// 3000 bytes per message, which hold two such slots.
pub fn small_messages(cfg: &mut Config) {
    cfg.max_batch = 1;
    cfg.max_batch_bytes = 1000;
    cfg.max_message_bytes = 3000;
}

/// Replica `id` of a cluster of `1..=n`, with short timeouts.
pub fn config(id: NodeId, n: u32) -> Config {
    let mut cfg = Config::new(id, (1..=n).collect());
    cfg.heartbeat_ticks = 2;
    cfg.election_ticks = 10;
    cfg.resend_ticks = 5;
    cfg.catch_up_ticks = 3;
    cfg
}

/// A new replica `id` of a cluster of `1..=n`.
pub fn replica(id: NodeId, n: u32) -> Replica {
    Replica::new(config(id, n), Restore::default()).unwrap()
}

/// Makes `r` a candidate: ticks it until its election timer fires, then
/// grants its pre-vote from a peer. What it has to send is left in its
/// Ready, the pre-vote aside.
pub fn campaign(r: &mut Replica) {
    loop {
        r.tick();
        let ready = r.take_ready();
        let pre_vote = ready.messages.iter().find_map(|e| match e.msg {
            Message::PreVote { ballot } => Some((e.to, ballot)),
            _ => None,
        });
        if let Some((peer, ballot)) = pre_vote {
            let granted = true;
            r.step(peer, Message::PreVoteReply { ballot, granted })
                .unwrap();
            return;
        }
    }
}

/// The messages in `ready` (sent at once or after the sync) addressed to `to`.
pub fn only(ready: &Ready, to: NodeId) -> Vec<&Message> {
    ready
        .messages
        .iter()
        .chain(&ready.persisted_messages)
        .filter(|e| e.to == to)
        .map(|e| &e.msg)
        .collect()
}

/// A lossless, in-order network of replicas, enough to put one replica in a
/// given state.
pub struct Net {
    pub nodes: BTreeMap<NodeId, Replica>,
    /// Messages sent and not yet delivered, with their sender.
    pub queue: VecDeque<(NodeId, Envelope)>,
    /// What each replica was told is chosen, in order.
    pub chosen: BTreeMap<NodeId, Vec<(Slot, Value)>>,
    /// Every read whose barrier passed, on any replica.
    pub reads: Vec<(ReadId, Slot)>,
    /// Replicas cut off: what they send and what is sent to them is lost.
    pub cut: BTreeSet<NodeId>,
    /// Every message delivered, as `(from, to, message)`.
    pub delivered: Vec<(NodeId, NodeId, Message)>,
    /// Every snapshot fetch asked for, by the replica that asked.
    pub fetches: Vec<(NodeId, SnapshotFetch)>,
    /// Every membership persisted, by replica, in order.
    pub memberships: Vec<(NodeId, Membership)>,
}

impl Net {
    /// Replicas `1..=n`, all new.
    pub fn new(n: u32) -> Self {
        Self::with_config(n, |_| {})
    }

    /// Replicas `1..=n`, all new, with [`config`] changed by `change`.
    pub fn with_config(n: u32, change: impl Fn(&mut Config)) -> Self {
        let nodes = (1..=n)
            .map(|id| {
                let mut cfg = config(id, n);
                change(&mut cfg);
                (id, Replica::new(cfg, Restore::default()).unwrap())
            })
            .collect();
        Net {
            nodes,
            queue: VecDeque::new(),
            chosen: BTreeMap::new(),
            reads: Vec::new(),
            cut: BTreeSet::new(),
            delivered: Vec::new(),
            fetches: Vec::new(),
            memberships: Vec::new(),
        }
    }

    /// Replaces replica `id` by one restored from `promised` and `votes`,
    /// with its configuration as it was.
    pub fn restore(&mut self, id: NodeId, promised: Ballot, votes: Vec<Accepted>) {
        let cfg = self.node(id).config().clone();
        let restore = Restore {
            promised,
            votes,
            ..Restore::default()
        };
        self.nodes.insert(id, Replica::new(cfg, restore).unwrap());
    }

    /// Replaces replica `id` by one restored from `restore`, with its
    /// configuration as it was.
    pub fn replace(&mut self, id: NodeId, restore: Restore) {
        let cfg = self.node(id).config().clone();
        self.nodes.insert(id, Replica::new(cfg, restore).unwrap());
    }

    /// Replica `id`.
    pub fn node(&mut self, id: NodeId) -> &mut Replica {
        self.nodes.get_mut(&id).unwrap()
    }

    /// Takes a replica's Ready as a driver would (persisting is a no-op
    /// here: the core already holds the state in memory).
    pub fn flush(&mut self, id: NodeId) {
        let ready = self.node(id).take_ready();
        for e in ready.messages.into_iter().chain(ready.persisted_messages) {
            self.queue.push_back((id, e));
        }
        self.chosen.entry(id).or_default().extend(ready.chosen);
        self.reads.extend(ready.reads);
        self.fetches.extend(ready.fetch_snapshot.map(|f| (id, f)));
        self.memberships
            .extend(ready.persist.membership.map(|m| (id, m)));
    }

    /// Delivers everything until quiet.
    pub fn run(&mut self) {
        let ids: Vec<_> = self.nodes.keys().copied().collect();
        for &id in &ids {
            self.flush(id);
        }
        while let Some((from, e)) = self.queue.pop_front() {
            if self.cut.contains(&from) || self.cut.contains(&e.to) {
                continue;
            }
            self.delivered.push((from, e.to, e.msg.clone()));
            if from == e.to {
                self.node(e.to).step_own(e.msg);
            } else {
                self.node(e.to).step(from, e.msg).unwrap();
            }
            self.flush(e.to);
        }
    }

    /// Ticks every replica once (cut-off ones too), then delivers
    /// everything.
    pub fn tick_all(&mut self) {
        for r in self.nodes.values_mut() {
            r.tick();
        }
        self.run();
    }

    /// Ticks replica `id` until it leads, delivering everything each tick.
    pub fn elect(&mut self, id: NodeId) {
        while !self.node(id).is_leader() {
            self.node(id).tick();
            self.run();
        }
    }
}
