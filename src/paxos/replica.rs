//! One replica's share of Multi-Paxos: acceptor, learner, and — when elected
//! — leader, as a deterministic state machine.
//!
//! The driver feeds it [`Replica::tick`], [`Replica::step`] (a message),
//! [`Replica::propose`] and [`Replica::read`], then collects the work to do
//! with [`Replica::take_ready`]. Nothing here does I/O or reads a clock.
//!
//! How a leadership goes:
//!
//! 1. A follower that hears no leader for a randomised election timeout
//!    picks a ballot above every one it has seen, promises it to itself and
//!    sends `Prepare(ballot, first slot it does not know chosen)`.
//! 2. With a majority of promises it re-proposes, under its ballot, the
//!    highest-ballot vote reported for every slot up to the highest reported
//!    one, and a no-op where none was reported ([`recover`]).
//! 3. It then streams one `Accept` per slot without waiting for earlier
//!    slots, up to `window` slots in flight; commands that arrive meanwhile
//!    wait and go together into the next slot. A slot is chosen on a majority
//!    of `Accepted` under the leader's ballot, the leader's own counted only
//!    once durable. The commit index (end of the contiguous chosen prefix)
//!    rides on every accept and heartbeat.
//! 4. It steps down the moment it sees a higher ballot, or when it has not
//!    heard from a majority for two election timeouts.

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;

use super::acceptor::Acceptor;
use super::ballot::{Ballot, NodeId, Slot};
use super::config::Config;
use super::message::{Accepted, Envelope, Message, ReadId, Ready, Value};
use super::recovery::recover;
use super::rng::Rng;

/// The replica's part in the protocol right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Follows a leader (or waits for one).
    Follower,
    /// Running phase 1 for its ballot.
    Candidate,
    /// Leading with its ballot.
    Leader,
}

/// This replica is not the leader; `leader` is the one it follows, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotLeader {
    /// The replica to ask instead, when known.
    pub leader: Option<NodeId>,
}

/// A snapshot of the replica's state, for metrics and status displays.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// This replica's id.
    pub id: NodeId,
    /// Its role.
    pub role: Role,
    /// The highest ballot it has promised.
    pub promised: Ballot,
    /// The leader it follows (itself when leading).
    pub leader: Option<NodeId>,
    /// Every slot up to this one is known chosen here.
    pub committed: Slot,
    /// As leader: slots proposed and not yet committed.
    pub in_flight: usize,
    /// As leader: commands waiting for a slot.
    pub queued: usize,
    /// As leader: what it knows of each follower.
    pub followers: Vec<FollowerStatus>,
    /// Elections this replica has started since it was created.
    pub elections: u64,
}

/// The leader's view of one follower.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FollowerStatus {
    /// The follower.
    pub id: NodeId,
    /// The follower's committed index, as it last reported it.
    pub committed: Slot,
    /// Ticks since the follower last answered.
    pub silent_ticks: u64,
}

/// The leader a follower believes in, and what it said of its commit index.
#[derive(Clone, Copy, Debug)]
struct Leadership {
    id: NodeId,
    ballot: Ballot,
    commit: Slot,
}

#[derive(Debug)]
struct Candidate {
    ballot: Ballot,
    from_slot: Slot,
    promises: BTreeMap<NodeId, Vec<Accepted>>,
}

/// A slot the leader proposed and has not yet committed.
#[derive(Debug)]
struct Proposal {
    value: Value,
    acks: Vec<NodeId>,
    chosen: bool,
    sent_at: u64,
}

#[derive(Debug, Default)]
struct Progress {
    last_ack: u64,
    read_round: u64,
    committed: Slot,
}

/// A read waiting for a quorum to confirm leadership in round `round`.
#[derive(Debug)]
struct PendingRead {
    id: ReadId,
    round: u64,
    index: Slot,
}

#[derive(Debug)]
struct Leader {
    ballot: Ballot,
    /// The last slot recovered in phase 1; reads wait until it is committed.
    recovered_through: Slot,
    next_slot: Slot,
    in_flight: BTreeMap<Slot, Proposal>,
    queued: VecDeque<Bytes>,
    progress: BTreeMap<NodeId, Progress>,
    heartbeat_due: u64,
    /// The last read round announced to the followers.
    read_round: u64,
    /// Reads that arrived before recovery finished: not yet given an index.
    unindexed_reads: Vec<ReadId>,
    reads: VecDeque<PendingRead>,
}

#[derive(Debug)]
enum State {
    Follower,
    Candidate(Candidate),
    Leader(Leader),
}

/// A replica of the Multi-Paxos log, sans I/O.
#[derive(Debug)]
pub struct Replica {
    cfg: Config,
    rng: Rng,
    now: u64,
    acceptor: Acceptor,
    /// Every slot up to here is known chosen and has been handed out in
    /// `Ready::chosen`.
    committed: Slot,
    state: State,
    leadership: Option<Leadership>,
    last_leader_contact: u64,
    election_deadline: u64,
    max_round_seen: u64,
    catch_up_sent_at: Option<u64>,
    elections: u64,
    ready: Ready,
}

impl Replica {
    /// A replica restored from its durable acceptor state (`promised`,
    /// `votes`) and the index its state machine has applied up to. A new
    /// replica passes `Ballot::ZERO`, no votes, and 0.
    pub fn new(
        cfg: Config,
        promised: Ballot,
        votes: Vec<Accepted>,
        applied: Slot,
    ) -> Result<Self, String> {
        cfg.validate()?;
        let mut replica = Replica {
            rng: Rng::new(cfg.seed),
            cfg,
            now: 0,
            acceptor: Acceptor::restore(promised, votes),
            committed: applied,
            state: State::Follower,
            leadership: None,
            last_leader_contact: 0,
            election_deadline: 0,
            max_round_seen: promised.round,
            catch_up_sent_at: None,
            elections: 0,
            ready: Ready::default(),
        };
        replica.reset_election_timer();
        Ok(replica)
    }

    /// This replica's id.
    pub fn id(&self) -> NodeId {
        self.cfg.id
    }

    /// Its configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// True while leading.
    pub fn is_leader(&self) -> bool {
        matches!(self.state, State::Leader(_))
    }

    /// The leader this replica follows (itself when leading), if any.
    pub fn leader(&self) -> Option<NodeId> {
        self.leadership.map(|l| l.id)
    }

    /// Every slot up to this one is known chosen (and handed out).
    pub fn committed(&self) -> Slot {
        self.committed
    }

    /// A snapshot of the replica's state.
    pub fn status(&self) -> Status {
        let (role, in_flight, queued, followers) = match &self.state {
            State::Follower => (Role::Follower, 0, 0, Vec::new()),
            State::Candidate(_) => (Role::Candidate, 0, 0, Vec::new()),
            State::Leader(l) => {
                let followers = l
                    .progress
                    .iter()
                    .map(|(&id, p)| FollowerStatus {
                        id,
                        committed: p.committed,
                        silent_ticks: self.now.saturating_sub(p.last_ack),
                    })
                    .collect();
                (Role::Leader, l.in_flight.len(), l.queued.len(), followers)
            }
        };
        Status {
            id: self.cfg.id,
            role,
            promised: self.acceptor.promised(),
            leader: self.leader(),
            committed: self.committed,
            in_flight,
            queued,
            followers,
            elections: self.elections,
        }
    }

    /// Queues a client command for the log. It gets a slot in
    /// [`take_ready`](Self::take_ready), batched with the others queued by
    /// then. Only the leader takes commands.
    pub fn propose(&mut self, command: Bytes) -> Result<(), NotLeader> {
        match &mut self.state {
            State::Leader(l) => {
                l.queued.push_back(command);
                Ok(())
            }
            _ => Err(self.not_leader()),
        }
    }

    /// Orders a linearizable read (ReadIndex). Once a majority has confirmed
    /// this replica is still leader after the read arrived, `Ready::reads`
    /// yields `(id, index)`: answer the read from the state machine once it
    /// has applied `index`. A new leader gives reads an index only once every
    /// slot it recovered is chosen under its own ballot.
    pub fn read(&mut self, id: ReadId) -> Result<(), NotLeader> {
        let recovered = self.recovered();
        let committed = self.committed;
        match &mut self.state {
            State::Leader(l) => {
                if recovered {
                    l.reads.push_back(PendingRead {
                        id,
                        round: l.read_round + 1,
                        index: committed,
                    });
                } else {
                    l.unindexed_reads.push(id);
                }
                Ok(())
            }
            _ => Err(self.not_leader()),
        }
    }

    /// Advances the clock by one tick: elections, heartbeats, re-sends.
    pub fn tick(&mut self) {
        self.now += 1;
        let now = self.now;
        match &mut self.state {
            State::Leader(l) => {
                // Check quorum: a leader cut off from a majority steps down,
                // so its clients go elsewhere and it stops ignoring candidates.
                let window = 2 * self.cfg.election_ticks;
                let heard = l
                    .progress
                    .values()
                    .filter(|p| now - p.last_ack < window)
                    .count();
                if heard + 1 < self.cfg.majority() {
                    self.step_down();
                    return;
                }
                if now >= l.heartbeat_due {
                    self.broadcast_heartbeat();
                }
                self.resend_unanswered_accepts();
            }
            State::Follower | State::Candidate(_) => {
                if now >= self.election_deadline {
                    self.start_election();
                } else {
                    self.request_catch_up();
                }
            }
        }
    }

    /// Handles a message from replica `from` (which may be this one: the
    /// driver feeds back messages addressed to self).
    pub fn step(&mut self, from: NodeId, msg: Message) {
        match msg {
            Message::Prepare { ballot, from_slot } => self.on_prepare(from, ballot, from_slot),
            Message::Promise { ballot, accepted } => self.on_promise(from, ballot, accepted),
            Message::Nack { promised } => self.observe(promised),
            Message::Accept {
                ballot,
                slot,
                value,
                commit,
            } => self.on_accept(from, ballot, slot, value, commit),
            Message::Accepted { ballot, slot } => self.on_accepted(from, ballot, slot),
            Message::Heartbeat {
                ballot,
                commit,
                read_round,
            } => self.on_heartbeat(from, ballot, commit, read_round),
            Message::HeartbeatAck {
                ballot,
                read_round,
                committed,
            } => self.on_heartbeat_ack(from, ballot, read_round, committed),
            Message::CatchUpRequest {
                ballot,
                from_slot,
                to_slot,
            } => self.on_catch_up_request(from, ballot, from_slot, to_slot),
            Message::CatchUp {
                ballot,
                entries,
                commit,
            } => self.on_catch_up(from, ballot, entries, commit),
        }
    }

    /// Gives queued commands their slots, announces pending read rounds, and
    /// returns everything the driver must now do.
    pub fn take_ready(&mut self) -> Ready {
        self.fill_pipeline();
        self.announce_read_round();
        std::mem::take(&mut self.ready)
    }

    // ----- elections -------------------------------------------------------

    fn start_election(&mut self) {
        self.step_down();
        self.elections += 1;
        let round = self.acceptor.promised().round.max(self.max_round_seen) + 1;
        let ballot = Ballot::new(round, self.cfg.id);
        let from_slot = self.committed + 1;
        self.max_round_seen = round;
        self.leadership = None;
        self.state = State::Candidate(Candidate {
            ballot,
            from_slot,
            promises: BTreeMap::new(),
        });
        // Promise to ourselves first. Peers hear of the ballot only once that
        // promise is durable: a candidate that crashed after sending Prepare
        // must not come back and use the same ballot with other values.
        let id = self.cfg.id;
        if let Ok((change, votes)) = self.acceptor.prepare(ballot, from_slot) {
            if change.promise_raised {
                self.persist_promise();
            }
            self.send_after_persist(
                id,
                Message::Promise {
                    ballot,
                    accepted: votes,
                },
            );
        }
        for peer in self.peers() {
            self.send_after_persist(peer, Message::Prepare { ballot, from_slot });
        }
    }

    fn on_prepare(&mut self, from: NodeId, ballot: Ballot, from_slot: Slot) {
        // Leader stickiness: while we hear a live leader, a candidate is
        // ignored altogether, so a replica that was cut off cannot depose a
        // healthy leader by coming back with a higher ballot.
        if from != self.cfg.id && self.leader_is_alive() && self.leader() != Some(from) {
            return;
        }
        self.observe(ballot);
        match self.acceptor.prepare(ballot, from_slot) {
            Ok((change, votes)) => {
                if change.promise_raised {
                    self.persist_promise();
                    self.leadership = None;
                    self.reset_election_timer();
                }
                self.send_after_persist(
                    from,
                    Message::Promise {
                        ballot,
                        accepted: votes,
                    },
                );
            }
            Err(promised) => self.send(from, Message::Nack { promised }),
        }
    }

    fn on_promise(&mut self, from: NodeId, ballot: Ballot, accepted: Vec<Accepted>) {
        let majority = self.cfg.majority();
        let State::Candidate(c) = &mut self.state else {
            return;
        };
        if c.ballot != ballot {
            return;
        }
        c.promises.insert(from, accepted);
        if c.promises.len() >= majority {
            self.become_leader();
        }
    }

    fn become_leader(&mut self) {
        let State::Candidate(c) = std::mem::replace(&mut self.state, State::Follower) else {
            return;
        };
        let from_slot = c.from_slot.max(self.committed + 1);
        let recovered = recover(from_slot, c.promises.values().map(Vec::as_slice));
        let recovered_through = recovered.last().map_or(self.committed, |&(slot, _)| slot);
        let now = self.now;
        let progress = self
            .peers()
            .map(|p| {
                (
                    p,
                    Progress {
                        last_ack: now,
                        ..Progress::default()
                    },
                )
            })
            .collect();
        self.state = State::Leader(Leader {
            ballot: c.ballot,
            recovered_through,
            next_slot: recovered_through + 1,
            in_flight: BTreeMap::new(),
            queued: VecDeque::new(),
            progress,
            heartbeat_due: now,
            read_round: 0,
            unindexed_reads: Vec::new(),
            reads: VecDeque::new(),
        });
        self.leadership = Some(Leadership {
            id: self.cfg.id,
            ballot: c.ballot,
            commit: self.committed,
        });
        for (slot, value) in recovered {
            self.propose_at(slot, value);
        }
        self.broadcast_heartbeat();
    }

    /// Any ballot above the one we lead or campaign with ends that at once.
    fn observe(&mut self, ballot: Ballot) {
        self.max_round_seen = self.max_round_seen.max(ballot.round);
        let own = match &self.state {
            State::Leader(l) => l.ballot,
            State::Candidate(c) => c.ballot,
            State::Follower => return,
        };
        if ballot > own {
            self.step_down();
        }
    }

    /// Becomes a follower. As leader, hands back the commands that never got
    /// a slot and fails the reads it cannot serve any more.
    fn step_down(&mut self) {
        if let State::Leader(l) = std::mem::replace(&mut self.state, State::Follower) {
            self.ready.dropped.extend(l.queued);
            self.ready.abandoned_through = Some(l.next_slot - 1);
            self.ready.failed_reads.extend(l.unindexed_reads);
            self.ready
                .failed_reads
                .extend(l.reads.into_iter().map(|r| r.id));
            self.leadership = None;
        }
        self.reset_election_timer();
    }

    fn leader_is_alive(&self) -> bool {
        match self.state {
            State::Leader(_) => true,
            _ => {
                self.leadership.is_some()
                    && self.now < self.last_leader_contact + self.cfg.election_ticks
            }
        }
    }

    /// Accepts `from` as the leader of `ballot` and restarts the election timer.
    fn follow(&mut self, from: NodeId, ballot: Ballot) {
        if self.leadership.map(|l| l.ballot) != Some(ballot) {
            self.leadership = Some(Leadership {
                id: from,
                ballot,
                commit: 0,
            });
            self.catch_up_sent_at = None;
        }
        self.last_leader_contact = self.now;
        self.reset_election_timer();
    }

    fn reset_election_timer(&mut self) {
        let t = self.cfg.election_ticks;
        self.election_deadline = self.now + self.rng.range(t, 2 * t);
    }

    // ----- phase 2: the leader's side -------------------------------------

    /// Cuts the queued commands into slots while the window has room.
    fn fill_pipeline(&mut self) {
        loop {
            let State::Leader(l) = &mut self.state else {
                return;
            };
            if l.queued.is_empty() || l.in_flight.len() >= self.cfg.window {
                return;
            }
            let mut batch = Vec::new();
            let mut bytes = 0;
            while let Some(command) = l.queued.front() {
                if !batch.is_empty()
                    && (batch.len() >= self.cfg.max_batch
                        || bytes + command.len() > self.cfg.max_batch_bytes)
                {
                    break;
                }
                bytes += command.len();
                batch.extend(l.queued.pop_front());
            }
            let slot = l.next_slot;
            l.next_slot += 1;
            self.propose_at(slot, Value::Batch(batch));
        }
    }

    /// Proposes `value` for `slot` under the leader's ballot: our own accept
    /// goes to disk while the accepts go out to the followers.
    fn propose_at(&mut self, slot: Slot, value: Value) {
        let now = self.now;
        let commit = self.committed;
        let State::Leader(l) = &mut self.state else {
            return;
        };
        let ballot = l.ballot;
        l.in_flight.insert(
            slot,
            Proposal {
                value: value.clone(),
                acks: Vec::new(),
                chosen: false,
                sent_at: now,
            },
        );
        let id = self.cfg.id;
        match self.acceptor.accept(ballot, slot, &value) {
            Ok(change) => {
                if change.vote_changed {
                    self.persist_vote(slot, ballot, &value);
                }
                // Counted towards the majority only when it arrives back,
                // which the driver does after the vote is durable.
                self.send_after_persist(id, Message::Accepted { ballot, slot });
            }
            // Cannot happen while leading (any higher promise steps us down
            // first); if it did, we are no longer entitled to lead.
            Err(promised) => return self.observe(promised),
        }
        for peer in self.peers() {
            self.send(
                peer,
                Message::Accept {
                    ballot,
                    slot,
                    value: value.clone(),
                    commit,
                },
            );
        }
    }

    fn on_accepted(&mut self, from: NodeId, ballot: Ballot, slot: Slot) {
        let majority = self.cfg.majority();
        let now = self.now;
        let State::Leader(l) = &mut self.state else {
            return;
        };
        if l.ballot != ballot {
            return;
        }
        if let Some(p) = l.progress.get_mut(&from) {
            p.last_ack = now;
        }
        let Some(proposal) = l.in_flight.get_mut(&slot) else {
            return;
        };
        if proposal.chosen || proposal.acks.contains(&from) {
            return;
        }
        proposal.acks.push(from);
        // Rule: chosen once a majority accepted it under this ballot.
        if proposal.acks.len() >= majority {
            proposal.chosen = true;
            self.advance_commit();
        }
    }

    /// Rule: the commit index is the end of the contiguous chosen prefix.
    fn advance_commit(&mut self) {
        let State::Leader(l) = &mut self.state else {
            return;
        };
        while let Some(entry) = l.in_flight.first_entry() {
            if *entry.key() != self.committed + 1 || !entry.get().chosen {
                break;
            }
            let (slot, proposal) = entry.remove_entry();
            self.committed = slot;
            self.ready.chosen.push((slot, proposal.value));
        }
        if let Some(leadership) = &mut self.leadership {
            leadership.commit = self.committed;
        }
        self.index_reads_after_recovery();
    }

    fn resend_unanswered_accepts(&mut self) {
        let now = self.now;
        let commit = self.committed;
        let resend = self.cfg.resend_ticks;
        let peers: Vec<NodeId> = self.peers().collect();
        let State::Leader(l) = &mut self.state else {
            return;
        };
        let ballot = l.ballot;
        for (&slot, p) in l.in_flight.iter_mut() {
            if p.chosen || now - p.sent_at < resend {
                continue;
            }
            p.sent_at = now;
            for &peer in peers.iter().filter(|peer| !p.acks.contains(peer)) {
                self.ready.messages.push(Envelope {
                    to: peer,
                    msg: Message::Accept {
                        ballot,
                        slot,
                        value: p.value.clone(),
                        commit,
                    },
                });
            }
        }
    }

    fn broadcast_heartbeat(&mut self) {
        let commit = self.committed;
        let State::Leader(l) = &mut self.state else {
            return;
        };
        l.heartbeat_due = self.now + self.cfg.heartbeat_ticks;
        let (ballot, read_round) = (l.ballot, l.read_round);
        for peer in self.peers() {
            self.send(
                peer,
                Message::Heartbeat {
                    ballot,
                    commit,
                    read_round,
                },
            );
        }
    }

    fn on_catch_up_request(
        &mut self,
        from: NodeId,
        ballot: Ballot,
        from_slot: Slot,
        to_slot: Slot,
    ) {
        let State::Leader(l) = &self.state else {
            return;
        };
        if l.ballot != ballot {
            return;
        }
        // Only slots known chosen are sent: up to our commit index.
        let last = to_slot
            .min(self.committed)
            .min(from_slot.saturating_add(self.cfg.max_catch_up as u64 - 1));
        let entries: Vec<(Slot, Value)> = (from_slot.max(1)..=last)
            .map_while(|slot| self.acceptor.vote(slot).map(|(_, v)| (slot, v.clone())))
            .collect();
        let commit = self.committed;
        self.send(
            from,
            Message::CatchUp {
                ballot,
                entries,
                commit,
            },
        );
    }

    // ----- reads -----------------------------------------------------------

    fn recovered(&self) -> bool {
        match &self.state {
            State::Leader(l) => self.committed >= l.recovered_through,
            _ => false,
        }
    }

    /// Rule: a new leader indexes reads only after every recovered slot is
    /// chosen under its ballot; before that its commit index may be behind
    /// writes an earlier leader already acknowledged.
    fn index_reads_after_recovery(&mut self) {
        let recovered = self.recovered();
        let committed = self.committed;
        let State::Leader(l) = &mut self.state else {
            return;
        };
        if !recovered || l.unindexed_reads.is_empty() {
            return;
        }
        let round = l.read_round + 1;
        for id in l.unindexed_reads.drain(..) {
            l.reads.push_back(PendingRead {
                id,
                round,
                index: committed,
            });
        }
    }

    /// Starts a heartbeat round for reads that arrived since the last one.
    fn announce_read_round(&mut self) {
        let State::Leader(l) = &mut self.state else {
            return;
        };
        if l.reads.back().is_some_and(|r| r.round > l.read_round) {
            l.read_round += 1;
            self.broadcast_heartbeat();
        }
        self.confirm_reads();
    }

    /// Rule: a read is served once a majority (us included) acknowledged a
    /// heartbeat sent after it arrived: no higher ballot can have been chosen
    /// anything before that point.
    fn confirm_reads(&mut self) {
        let majority = self.cfg.majority();
        let State::Leader(l) = &mut self.state else {
            return;
        };
        while let Some(read) = l.reads.front() {
            let acks = 1 + l
                .progress
                .values()
                .filter(|p| p.read_round >= read.round)
                .count();
            if read.round > l.read_round || acks < majority {
                break;
            }
            self.ready.reads.push((read.id, read.index));
            l.reads.pop_front();
        }
    }

    fn on_heartbeat_ack(&mut self, from: NodeId, ballot: Ballot, read_round: u64, committed: Slot) {
        let now = self.now;
        let State::Leader(l) = &mut self.state else {
            return;
        };
        if l.ballot != ballot {
            return;
        }
        if let Some(p) = l.progress.get_mut(&from) {
            p.last_ack = now;
            p.read_round = p.read_round.max(read_round);
            p.committed = p.committed.max(committed);
        }
        self.confirm_reads();
    }

    // ----- the acceptor and learner side -----------------------------------

    fn on_accept(&mut self, from: NodeId, ballot: Ballot, slot: Slot, value: Value, commit: Slot) {
        self.observe(ballot);
        match self.acceptor.accept(ballot, slot, &value) {
            Ok(change) => {
                if change.promise_raised {
                    self.persist_promise();
                }
                if change.vote_changed {
                    self.persist_vote(slot, ballot, &value);
                }
                self.send_after_persist(from, Message::Accepted { ballot, slot });
                self.follow(from, ballot);
                self.learn_commit(ballot, commit);
            }
            Err(promised) => self.send(from, Message::Nack { promised }),
        }
    }

    fn on_heartbeat(&mut self, from: NodeId, ballot: Ballot, commit: Slot, read_round: u64) {
        self.observe(ballot);
        match self.acceptor.follow(ballot) {
            Ok(raised) => {
                if raised {
                    self.persist_promise();
                }
                self.follow(from, ballot);
                self.learn_commit(ballot, commit);
                let committed = self.committed;
                self.send_after_persist(
                    from,
                    Message::HeartbeatAck {
                        ballot,
                        read_round,
                        committed,
                    },
                );
            }
            Err(promised) => self.send(from, Message::Nack { promised }),
        }
    }

    fn on_catch_up(
        &mut self,
        from: NodeId,
        ballot: Ballot,
        entries: Vec<(Slot, Value)>,
        commit: Slot,
    ) {
        self.observe(ballot);
        match self.acceptor.follow(ballot) {
            Ok(raised) => {
                if raised {
                    self.persist_promise();
                }
                self.follow(from, ballot);
                for (slot, value) in entries {
                    if slot > self.committed && self.acceptor.learn(ballot, slot, &value) {
                        self.persist_vote(slot, ballot, &value);
                    }
                }
                self.catch_up_sent_at = None;
                self.learn_commit(ballot, commit);
            }
            Err(promised) => self.send(from, Message::Nack { promised }),
        }
    }

    /// Learns the commit index of the leader of `ballot`.
    ///
    /// Rule: a slot at or below the leader's commit index is known chosen
    /// here only if our vote for it is under the leader's current ballot (the
    /// leader proposed exactly one value per slot under it). A vote under an
    /// older ballot may not be the chosen value: we fetch the chosen one.
    fn learn_commit(&mut self, ballot: Ballot, commit: Slot) {
        let Some(leadership) = &mut self.leadership else {
            return;
        };
        if leadership.ballot != ballot || leadership.id == self.cfg.id {
            return;
        }
        leadership.commit = leadership.commit.max(commit);
        let leader_commit = leadership.commit;
        while self.committed < leader_commit {
            let slot = self.committed + 1;
            match self.acceptor.vote(slot) {
                Some((b, value)) if b == ballot => {
                    self.ready.chosen.push((slot, value.clone()));
                    self.committed = slot;
                }
                _ => break,
            }
        }
        self.request_catch_up();
    }

    /// Asks the leader for the chosen slots we miss, at most once per
    /// `catch_up_ticks`.
    fn request_catch_up(&mut self) {
        let Some(leadership) = self.leadership else {
            return;
        };
        if leadership.id == self.cfg.id || self.committed >= leadership.commit {
            return;
        }
        if self
            .catch_up_sent_at
            .is_some_and(|at| self.now < at + self.cfg.catch_up_ticks)
        {
            return;
        }
        self.catch_up_sent_at = Some(self.now);
        self.send(
            leadership.id,
            Message::CatchUpRequest {
                ballot: leadership.ballot,
                from_slot: self.committed + 1,
                to_slot: leadership.commit,
            },
        );
    }

    // ----- output helpers --------------------------------------------------

    fn not_leader(&self) -> NotLeader {
        NotLeader {
            leader: self.leader(),
        }
    }

    fn peers(&self) -> impl Iterator<Item = NodeId> + use<> {
        self.cfg.peers().collect::<Vec<_>>().into_iter()
    }

    fn send(&mut self, to: NodeId, msg: Message) {
        self.ready.messages.push(Envelope { to, msg });
    }

    fn send_after_persist(&mut self, to: NodeId, msg: Message) {
        self.ready.persisted_messages.push(Envelope { to, msg });
    }

    fn persist_promise(&mut self) {
        self.ready.persist.promised = Some(self.acceptor.promised());
    }

    fn persist_vote(&mut self, slot: Slot, ballot: Ballot, value: &Value) {
        self.ready.persist.entries.push(Accepted {
            slot,
            ballot,
            value: value.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    fn cmd(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn batch(items: &[&str]) -> Value {
        Value::Batch(items.iter().map(|s| cmd(s)).collect())
    }

    fn config(id: NodeId, n: u32) -> Config {
        let mut cfg = Config::new(id, (1..=n).collect());
        cfg.heartbeat_ticks = 2;
        cfg.election_ticks = 10;
        cfg.resend_ticks = 5;
        cfg.catch_up_ticks = 3;
        cfg
    }

    fn replica(id: NodeId, n: u32) -> Replica {
        Replica::new(config(id, n), Ballot::ZERO, Vec::new(), 0).unwrap()
    }

    /// A lossless, in-order network of replicas, enough to put one replica
    /// in a given state; the simulator does the faulty version.
    struct Net {
        nodes: BTreeMap<NodeId, Replica>,
        queue: VecDeque<(NodeId, Envelope)>,
        chosen: BTreeMap<NodeId, Vec<(Slot, Value)>>,
        reads: Vec<(ReadId, Slot)>,
    }

    impl Net {
        fn new(n: u32) -> Self {
            Net {
                nodes: (1..=n).map(|id| (id, replica(id, n))).collect(),
                queue: VecDeque::new(),
                chosen: BTreeMap::new(),
                reads: Vec::new(),
            }
        }

        fn node(&mut self, id: NodeId) -> &mut Replica {
            self.nodes.get_mut(&id).unwrap()
        }

        /// Takes a replica's Ready as a driver would (persisting is a no-op
        /// here: the core already holds the state in memory).
        fn flush(&mut self, id: NodeId) {
            let ready = self.node(id).take_ready();
            for e in ready.messages.into_iter().chain(ready.persisted_messages) {
                self.queue.push_back((id, e));
            }
            self.chosen.entry(id).or_default().extend(ready.chosen);
            self.reads.extend(ready.reads);
        }

        /// Delivers everything until quiet.
        fn run(&mut self) {
            let ids: Vec<_> = self.nodes.keys().copied().collect();
            for &id in &ids {
                self.flush(id);
            }
            while let Some((from, e)) = self.queue.pop_front() {
                self.node(e.to).step(from, e.msg);
                self.flush(e.to);
            }
        }

        fn elect(&mut self, id: NodeId) {
            while !self.node(id).is_leader() {
                self.node(id).tick();
                self.run();
            }
        }
    }

    fn only(ready: &Ready, to: NodeId) -> Vec<&Message> {
        ready
            .messages
            .iter()
            .chain(&ready.persisted_messages)
            .filter(|e| e.to == to)
            .map(|e| &e.msg)
            .collect()
    }

    #[test]
    fn a_silent_leader_is_replaced_by_election() {
        let mut net = Net::new(3);
        net.elect(1);
        assert_eq!(net.node(2).leader(), Some(1));
        assert_eq!(net.node(3).leader(), Some(1));
        assert_eq!(net.node(1).status().promised, net.node(2).status().promised);
    }

    #[test]
    fn a_candidate_sends_prepare_only_after_its_own_promise_is_durable() {
        let mut r = replica(1, 3);
        while r.status().role != Role::Candidate {
            r.tick();
        }
        let ready = r.take_ready();
        let ballot = r.status().promised;
        assert_eq!(ready.persist.promised, Some(ballot));
        assert!(
            ready.messages.is_empty(),
            "nothing may leave before the promise is on disk"
        );
        let prepares = ready
            .persisted_messages
            .iter()
            .filter(|e| matches!(e.msg, Message::Prepare { .. }))
            .count();
        assert_eq!(prepares, 2);
    }

    #[test]
    fn the_leader_counts_itself_only_once_its_accept_is_durable() {
        let mut net = Net::new(3);
        net.elect(1);
        let leader = net.node(1);
        leader.propose(cmd("x")).unwrap();
        let ready = leader.take_ready();
        let ballot = leader.status().promised;
        // Accepts to the followers go out at once, in parallel with our sync.
        assert_eq!(
            ready
                .messages
                .iter()
                .filter(|e| matches!(e.msg, Message::Accept { .. }))
                .count(),
            2
        );
        assert_eq!(ready.persist.entries.len(), 1);
        assert_eq!(
            only(&ready, 1),
            vec![&Message::Accepted { ballot, slot: 1 }]
        );
        // A follower's vote alone is not a majority of three.
        leader.step(2, Message::Accepted { ballot, slot: 1 });
        assert!(leader.take_ready().chosen.is_empty());
        // Our own, delivered back after the sync, completes it.
        leader.step(1, Message::Accepted { ballot, slot: 1 });
        assert_eq!(leader.take_ready().chosen, vec![(1, batch(&["x"]))]);
    }

    #[test]
    fn a_slot_is_chosen_on_a_majority_under_the_same_ballot() {
        let mut net = Net::new(5);
        net.elect(1);
        let leader = net.node(1);
        let ballot = leader.status().promised;
        leader.propose(cmd("x")).unwrap();
        leader.take_ready();
        leader.step(1, Message::Accepted { ballot, slot: 1 });
        leader.step(2, Message::Accepted { ballot, slot: 1 });
        // A vote under another ballot, and a repeated vote, do not count.
        leader.step(
            3,
            Message::Accepted {
                ballot: Ballot::new(ballot.round - 1, 3),
                slot: 1,
            },
        );
        leader.step(2, Message::Accepted { ballot, slot: 1 });
        assert!(leader.take_ready().chosen.is_empty());
        leader.step(4, Message::Accepted { ballot, slot: 1 });
        assert_eq!(leader.take_ready().chosen.len(), 1);
        assert_eq!(leader.committed(), 1);
    }

    #[test]
    fn the_commit_index_is_the_end_of_the_contiguous_chosen_prefix() {
        let mut net = Net::new(3);
        net.elect(1);
        let leader = net.node(1);
        leader.cfg.max_batch = 1;
        let ballot = leader.status().promised;
        for c in ["a", "b", "c"] {
            leader.propose(cmd(c)).unwrap();
        }
        leader.take_ready();
        for slot in [3, 2] {
            leader.step(1, Message::Accepted { ballot, slot });
            leader.step(2, Message::Accepted { ballot, slot });
        }
        assert!(leader.take_ready().chosen.is_empty());
        assert_eq!(leader.committed(), 0);
        leader.step(1, Message::Accepted { ballot, slot: 1 });
        leader.step(3, Message::Accepted { ballot, slot: 1 });
        let chosen: Vec<Slot> = leader.take_ready().chosen.iter().map(|(s, _)| *s).collect();
        assert_eq!(chosen, vec![1, 2, 3]);
        assert_eq!(leader.committed(), 3);
        // The next accept carries the commit index to the followers.
        leader.propose(cmd("d")).unwrap();
        let ready = leader.take_ready();
        assert!(only(&ready, 2).iter().any(|m| matches!(
            m,
            Message::Accept {
                slot: 4,
                commit: 3,
                ..
            }
        )));
    }

    #[test]
    fn commands_queued_together_share_a_slot_and_the_window_bounds_slots_in_flight() {
        let mut net = Net::new(3);
        net.elect(1);
        let leader = net.node(1);
        leader.cfg.window = 2;
        leader.cfg.max_batch = 3;
        let ballot = leader.status().promised;
        for i in 0..10 {
            leader.propose(cmd(&i.to_string())).unwrap();
        }
        let ready = leader.take_ready();
        let sizes: Vec<usize> = only(&ready, 2)
            .iter()
            .filter_map(|m| match m {
                Message::Accept { value, .. } => Some(value.len()),
                _ => None,
            })
            .collect();
        assert_eq!(sizes, vec![3, 3], "two slots of three; the window is full");
        assert_eq!(leader.status().queued, 4);
        leader.step(1, Message::Accepted { ballot, slot: 1 });
        leader.step(2, Message::Accepted { ballot, slot: 1 });
        let ready = leader.take_ready();
        assert!(
            only(&ready, 3)
                .iter()
                .any(|m| matches!(m, Message::Accept { slot: 3, value, .. } if value.len() == 3))
        );
    }

    #[test]
    fn a_higher_ballot_makes_the_leader_step_down_and_hand_back_its_queue() {
        let mut net = Net::new(3);
        net.elect(1);
        let leader = net.node(1);
        let ballot = leader.status().promised;
        leader.propose(cmd("queued")).unwrap();
        leader.read(7).unwrap();
        leader.step(
            3,
            Message::Nack {
                promised: Ballot::new(ballot.round + 1, 3),
            },
        );
        assert!(!leader.is_leader());
        assert_eq!(leader.propose(cmd("late")), Err(NotLeader { leader: None }));
        let ready = leader.take_ready();
        assert_eq!(ready.dropped, vec![cmd("queued")]);
        assert_eq!(ready.failed_reads, vec![7]);
    }

    #[test]
    fn a_stale_leaders_accepts_and_heartbeats_are_refused() {
        let mut f = replica(2, 3);
        let new = Ballot::new(5, 3);
        f.step(
            3,
            Message::Prepare {
                ballot: new,
                from_slot: 1,
            },
        );
        f.take_ready();
        let old = Ballot::new(4, 1);
        f.step(
            1,
            Message::Accept {
                ballot: old,
                slot: 1,
                value: batch(&["x"]),
                commit: 0,
            },
        );
        f.step(
            1,
            Message::Heartbeat {
                ballot: old,
                commit: 0,
                read_round: 0,
            },
        );
        let ready = f.take_ready();
        assert!(ready.persist.is_empty());
        assert_eq!(
            only(&ready, 1),
            vec![
                &Message::Nack { promised: new },
                &Message::Nack { promised: new }
            ]
        );
    }

    #[test]
    fn a_follower_learns_a_slot_chosen_only_if_it_voted_under_the_leaders_ballot() {
        let mut f = replica(2, 3);
        let old = Ballot::new(1, 1);
        let new = Ballot::new(2, 3);
        f.step(
            1,
            Message::Accept {
                ballot: old,
                slot: 1,
                value: batch(&["stale"]),
                commit: 0,
            },
        );
        f.step(
            3,
            Message::Accept {
                ballot: new,
                slot: 2,
                value: batch(&["b"]),
                commit: 0,
            },
        );
        f.take_ready();
        // The new leader says slots 1 and 2 are chosen. Our vote for 1 is
        // under the old ballot: it may not be the chosen value.
        f.step(
            3,
            Message::Heartbeat {
                ballot: new,
                commit: 2,
                read_round: 0,
            },
        );
        let ready = f.take_ready();
        assert!(ready.chosen.is_empty());
        assert!(only(&ready, 3).contains(&&Message::CatchUpRequest {
            ballot: new,
            from_slot: 1,
            to_slot: 2
        }));
        // The leader's answer carries the chosen value, which wins.
        f.step(
            3,
            Message::CatchUp {
                ballot: new,
                entries: vec![(1, batch(&["chosen"]))],
                commit: 2,
            },
        );
        let ready = f.take_ready();
        assert_eq!(
            ready.chosen,
            vec![(1, batch(&["chosen"])), (2, batch(&["b"]))]
        );
        assert_eq!(
            ready.persist.entries.len(),
            1,
            "the learned value is kept for later catch-ups"
        );
    }

    #[test]
    fn a_new_leader_re_proposes_recovered_slots_and_reads_wait_until_they_are_chosen() {
        let mut net = Net::new(3);
        // Replica 2 restarts holding votes from an earlier leader, never chosen.
        let old = Ballot::new(1, 3);
        let votes = vec![
            Accepted {
                slot: 1,
                ballot: old,
                value: batch(&["old"]),
            },
            Accepted {
                slot: 3,
                ballot: old,
                value: batch(&["older"]),
            },
        ];
        net.nodes
            .insert(2, Replica::new(config(2, 3), old, votes, 0).unwrap());
        net.nodes
            .insert(1, Replica::new(config(1, 3), old, Vec::new(), 0).unwrap());
        // Replica 1 campaigns; only replica 2 answers its prepare.
        while net.node(1).status().role != Role::Candidate {
            net.node(1).tick();
        }
        let ready = net.node(1).take_ready();
        let ballot = net.node(1).status().promised;
        net.node(1).step(
            1,
            Message::Promise {
                ballot,
                accepted: Vec::new(),
            },
        );
        let prep = ready
            .persisted_messages
            .iter()
            .find(|e| e.to == 2)
            .unwrap()
            .msg
            .clone();
        net.node(2).step(1, prep);
        let promise = net.node(2).take_ready().persisted_messages.remove(0).msg;
        net.node(1).step(2, promise);
        assert!(net.node(1).is_leader());
        net.node(1).read(42).unwrap();
        let ready = net.node(1).take_ready();
        let accepts: Vec<(Slot, Value)> = only(&ready, 3)
            .iter()
            .filter_map(|m| match m {
                Message::Accept {
                    slot,
                    value,
                    ballot: b,
                    ..
                } if *b == ballot => Some((*slot, value.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(
            accepts,
            vec![
                (1, batch(&["old"])),
                (2, Value::Noop),
                (3, batch(&["older"]))
            ]
        );
        assert!(ready.reads.is_empty());
        // Even a heartbeat round acknowledged by all does not serve the read
        // before the recovered slots are chosen under the new ballot.
        for (from, round) in [(2, 0), (3, 0)] {
            net.node(1).step(
                from,
                Message::HeartbeatAck {
                    ballot,
                    read_round: round,
                    committed: 0,
                },
            );
        }
        assert!(net.node(1).take_ready().reads.is_empty());
        for slot in 1..=3 {
            net.node(1).step(1, Message::Accepted { ballot, slot });
            net.node(1).step(3, Message::Accepted { ballot, slot });
        }
        let ready = net.node(1).take_ready();
        assert_eq!(ready.chosen.len(), 3);
        assert!(
            ready.reads.is_empty(),
            "indexed now, but needs its own heartbeat round"
        );
        net.node(1).step(
            3,
            Message::HeartbeatAck {
                ballot,
                read_round: 1,
                committed: 3,
            },
        );
        assert_eq!(net.node(1).take_ready().reads, vec![(42, 3)]);
    }

    #[test]
    fn a_read_is_served_after_a_majority_confirms_a_heartbeat_sent_after_it() {
        let mut net = Net::new(3);
        net.elect(1);
        net.node(1).propose(cmd("w")).unwrap();
        net.run();
        let ballot = net.node(1).status().promised;
        net.node(1).read(9).unwrap();
        let ready = net.node(1).take_ready();
        assert!(ready.reads.is_empty());
        let round = match only(&ready, 2)[0] {
            Message::Heartbeat { read_round, .. } => *read_round,
            other => panic!("expected a heartbeat, got {other:?}"),
        };
        // An ack of an earlier round says nothing about this read.
        net.node(1).step(
            2,
            Message::HeartbeatAck {
                ballot,
                read_round: round - 1,
                committed: 1,
            },
        );
        assert!(net.node(1).take_ready().reads.is_empty());
        net.node(1).step(
            2,
            Message::HeartbeatAck {
                ballot,
                read_round: round,
                committed: 1,
            },
        );
        assert_eq!(net.node(1).take_ready().reads, vec![(9, 1)]);
    }

    #[test]
    fn an_acceptor_that_hears_a_live_leader_ignores_candidates() {
        let mut net = Net::new(3);
        net.elect(1);
        let f = net.node(2);
        let promised = f.status().promised;
        f.step(
            3,
            Message::Prepare {
                ballot: Ballot::new(promised.round + 5, 3),
                from_slot: 1,
            },
        );
        let ready = f.take_ready();
        assert!(ready.persist.is_empty() && only(&ready, 3).is_empty());
        assert_eq!(f.status().promised, promised);
        // Once the leader has been silent for an election timeout, it answers.
        for _ in 0..10 {
            f.tick();
        }
        f.take_ready();
        f.step(
            3,
            Message::Prepare {
                ballot: Ballot::new(promised.round + 5, 3),
                from_slot: 1,
            },
        );
        assert!(matches!(
            only(&f.take_ready(), 3)[..],
            [Message::Promise { .. }]
        ));
    }

    #[test]
    fn unanswered_accepts_are_sent_again() {
        let mut net = Net::new(3);
        net.elect(1);
        let leader = net.node(1);
        leader.propose(cmd("x")).unwrap();
        leader.take_ready(); // the accepts are lost
        for _ in 0..leader.cfg.resend_ticks {
            leader.tick();
        }
        let ready = leader.take_ready();
        assert!(
            only(&ready, 2)
                .iter()
                .any(|m| matches!(m, Message::Accept { slot: 1, .. }))
        );
        assert!(
            only(&ready, 3)
                .iter()
                .any(|m| matches!(m, Message::Accept { slot: 1, .. }))
        );
    }

    #[test]
    fn a_leader_that_hears_no_majority_steps_down() {
        let mut net = Net::new(3);
        net.elect(1);
        let leader = net.node(1);
        for _ in 0..2 * leader.cfg.election_ticks {
            leader.tick();
            leader.take_ready();
        }
        assert!(!leader.is_leader());
    }

    #[test]
    fn a_lagging_follower_catches_up_from_the_leader() {
        let mut net = Net::new(3);
        net.elect(1);
        for c in ["a", "b", "c"] {
            net.node(1).propose(cmd(c)).unwrap();
            // Replica 3 misses everything said now.
            net.flush(1);
            net.queue.retain(|(_, e)| e.to != 3);
            net.run();
        }
        assert_eq!(net.node(3).committed(), 0);
        net.node(1).tick();
        net.node(1).tick();
        net.run();
        assert_eq!(net.node(3).committed(), 3);
        assert_eq!(net.chosen[&3], net.chosen[&1]);
    }

    #[test]
    fn a_single_replica_cluster_commits_and_reads_alone() {
        let mut net = Net::new(1);
        net.elect(1);
        net.node(1).propose(cmd("solo")).unwrap();
        net.node(1).read(1).unwrap();
        net.run();
        assert_eq!(net.chosen[&1], vec![(1, batch(&["solo"]))]);
        assert_eq!(net.reads, vec![(1, 0)]);
    }
}
