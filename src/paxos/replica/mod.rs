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
//!    picks a ballot above every one it has seen and asks in a `PreVote`
//!    whether a majority, hearing no leader either, would promise it. Only
//!    then does it promise it to itself and send `Prepare(ballot, first
//!    slot it does not know chosen)`.
//! 2. With a majority of promises it re-proposes, under its ballot, the
//!    highest-ballot vote reported for every slot up to the highest reported
//!    one, and a no-op where none was reported ([`recover`]).
//! 3. It then streams one `Accept` per slot without waiting for earlier
//!    slots, up to `window` slots past its commit index (the recovered
//!    slots first, a window at a time); commands that arrive meanwhile
//!    wait and go together into the next slot. A slot is chosen on a majority
//!    of `Accepted` under the leader's ballot, the leader's own counted only
//!    once durable. The commit index (end of the contiguous chosen prefix)
//!    rides on every accept and heartbeat.
//! 4. It steps down the moment it sees a higher ballot, or when it has not
//!    heard from a majority for two election timeouts.
//! 5. Before it stops (SIGTERM), it may hand leadership off
//!    ([`Replica::hand_off`]): it stops giving slots and tells its most
//!    caught-up follower (`TimeoutNow`) to run step 1's phase 1 at once,
//!    without waiting for its timer or asking for pre-votes; see
//!    `leader.rs` and `election.rs`.
//!
//! One file per part:
//!
//! - this one: the [`Replica`], its public API, and the dispatch of inputs
//!   to the role that handles them;
//! - `admission.rs`: every rule by which a peer's message is refused
//!   before it reaches any of them ([`Refused`]);
//! - `election.rs`: pre-vote, prepare, promise, becoming leader, stepping
//!   down, the election timer and leader stickiness;
//! - `leader.rs`: the phase 2 pipeline, counting accepts, advancing the
//!   commit index, re-sends, heartbeats, check-quorum, serving catch-up;
//! - `reads.rs`: ReadIndex;
//! - `learner.rs`: the follower's side of phase 2, learning the commit index,
//!   and catching up.
//!
//! Leader-only code is written as methods of `Leader`, reached through
//! `Replica::leading`: the role is checked in one place, and an input meant
//! for a leader that reaches a follower is visibly dropped at the dispatch,
//! not silently in each helper.
//!
//! [`recover`]: super::recovery::recover

mod admission;
mod election;
mod leader;
mod learner;
mod membership;
mod reads;

use bytes::Bytes;

use super::acceptor::Acceptor;
use super::ballot::{Ballot, NodeId, Slot};
use super::config::Config;
use super::message::{
    Accepted, Envelope, Membership, Message, ReadId, Ready, SnapshotFetch, Value,
};
use super::rng::Rng;

pub use admission::Refused;
use election::{Candidate, PreCandidate};
use leader::Leader;
use membership::Standing;

/// The replica's part in the protocol right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Follows a leader (or waits for one), or asks in a pre-vote whether
    /// it could be elected: either way it has changed nothing anywhere.
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

/// Why [`Replica::hand_off`] could not start a hand-off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandOffError {
    /// This replica does not lead: there is nothing to hand off.
    NotLeader,
    /// No follower was heard within an election timeout (or there is none:
    /// a cluster of one): nobody to hand off to.
    NoTarget,
}

impl std::fmt::Display for HandOffError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandOffError::NotLeader => f.write_str("not the leader"),
            HandOffError::NoTarget => {
                f.write_str("no follower heard within an election timeout to hand off to")
            }
        }
    }
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
    /// The commit index of the leader it follows, as the leader last said
    /// (at least `committed`); `committed` when leading or following none.
    pub leader_commit: Slot,
    /// Every slot up to this one is compacted: in the state machine's
    /// snapshot, its votes gone.
    pub compacted: Slot,
    /// As leader: slots proposed and not yet committed.
    pub in_flight: usize,
    /// As leader: commands waiting for a slot.
    pub queued: usize,
    /// As leader: what it knows of each follower.
    pub followers: Vec<FollowerStatus>,
    /// Elections this replica has started since it was created.
    pub elections: u64,
    /// Of those, the ones started because a leader handed off to it.
    pub handoff_elections: u64,
    /// Whether it votes; `None` while it probes its peers after starting
    /// with an empty data directory (see `replica/membership.rs`).
    pub membership: Option<Membership>,
    /// As leader: the follower it is handing leadership off to, if it is.
    pub handing_off: Option<NodeId>,
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

/// What a replica is restored from: its durable acceptor state, where its
/// state machine stands, and its membership. `Restore::default()` is a
/// voter with nothing yet: a member of a cluster whose membership is
/// settled.
#[derive(Clone, Debug)]
pub struct Restore {
    /// The highest ballot it promised.
    pub promised: Ballot,
    /// Its votes. Those at or below `snapshot` are compacted and dropped.
    pub votes: Vec<Accepted>,
    /// Its state machine has applied every slot up to this one (so they
    /// are chosen). At least `snapshot`.
    pub applied: Slot,
    /// The index of the state machine's durable snapshot, 0 if none: the
    /// log is compacted through here.
    pub snapshot: Slot,
    /// The durable membership; `None` when storage holds nothing at all
    /// (an empty data directory, new or wiped): the replica then starts
    /// Unknown and probes its peers.
    pub membership: Option<Membership>,
    /// A random number for this incarnation, different at every start:
    /// answers to an earlier incarnation's probes and catch-up requests
    /// must not count.
    pub nonce: u64,
}

impl Default for Restore {
    fn default() -> Self {
        Restore {
            promised: Ballot::ZERO,
            votes: Vec::new(),
            applied: 0,
            snapshot: 0,
            membership: Some(Membership::Voter),
            nonce: 0,
        }
    }
}

/// A snapshot fetch the replica needs, and when it last asked for it.
#[derive(Clone, Copy, Debug)]
struct PendingFetch {
    fetch: SnapshotFetch,
    /// Needed under this leadership (ours, when leading); forgotten when
    /// it ends: the next leader tells us again if need be.
    ballot: Ballot,
    sent_at: Option<u64>,
}

/// The role and the state only that role has.
// One per replica, never in a collection: the leader's variant being the
// largest costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum State {
    Follower,
    PreCandidate(PreCandidate),
    Candidate(Candidate),
    Leader(Leader),
}

/// A replica of the Multi-Paxos log, sans I/O.
#[derive(Debug)]
pub struct Replica {
    core: Core,
    state: State,
}

/// What a replica holds whatever its role: configuration, clock, acceptor,
/// what it knows chosen, whom it follows, and the output being gathered.
/// Kept apart from the role's own state so that a role's methods can take
/// both (`&mut Leader`, `&mut Core`) at once.
#[derive(Debug)]
struct Core {
    cfg: Config,
    rng: Rng,
    now: u64,
    acceptor: Acceptor,
    /// Every slot up to here is known chosen and has been handed out in
    /// `Ready::chosen`.
    committed: Slot,
    leadership: Option<Leadership>,
    last_leader_contact: u64,
    election_deadline: u64,
    max_round_seen: u64,
    catch_up_sent_at: Option<u64>,
    fetch: Option<PendingFetch>,
    standing: Standing,
    nonce: u64,
    elections: u64,
    /// Elections started on a `TimeoutNow` (a leader handed off to us).
    handoff_elections: u64,
    /// Whether a client command may be voted on or learned (see
    /// [`Replica::check_commands_with`]).
    command_check: fn(&[u8]) -> bool,
    ready: Ready,
}

impl Replica {
    /// A replica restored from `restore` (see [`Restore`]).
    pub fn new(cfg: Config, restore: Restore) -> Result<Self, String> {
        cfg.validate()?;
        let Restore {
            promised,
            votes,
            applied,
            snapshot,
            membership,
            nonce,
        } = restore;
        let blank = promised == Ballot::ZERO && votes.is_empty() && applied == 0;
        if membership.is_none() && !blank {
            return Err("a replica with durable state must have a membership".into());
        }
        if applied < snapshot {
            return Err(format!(
                "the state machine applied through {applied}, below its snapshot at {snapshot}"
            ));
        }
        if applied == u64::MAX {
            return Err("the applied index leaves no slot after it".into());
        }
        let mut replica = Replica {
            core: Core {
                rng: Rng::new(cfg.seed),
                cfg,
                now: 0,
                acceptor: Acceptor::restore(promised, votes, snapshot),
                committed: applied,
                leadership: None,
                last_leader_contact: 0,
                election_deadline: 0,
                max_round_seen: promised.round,
                catch_up_sent_at: None,
                fetch: None,
                standing: Standing::restore(membership),
                nonce,
                elections: 0,
                handoff_elections: 0,
                command_check: |_| true,
                ready: Ready::default(),
            },
            state: State::Follower,
        };
        replica.core.reset_election_timer();
        Ok(replica)
    }

    /// This replica's id.
    pub fn id(&self) -> NodeId {
        self.core.cfg.id
    }

    /// Its configuration.
    pub fn config(&self) -> &Config {
        &self.core.cfg
    }

    /// From now on, refuses ([`Refused::BadCommand`]) any peer message
    /// whose values hold a client command for which `check` is false. The
    /// core treats commands as opaque bytes, so the driver, which knows
    /// what the state machine can apply, says which ones are acceptable. A
    /// command no replica can apply must never be voted on: once chosen, or
    /// recovered from a vote by a later leader, it would stop every
    /// replica's state machine at that slot for good. (Without a check,
    /// every command is taken.)
    pub fn check_commands_with(&mut self, check: fn(&[u8]) -> bool) {
        self.core.command_check = check;
    }

    /// True while leading.
    pub fn is_leader(&self) -> bool {
        matches!(self.state, State::Leader(_))
    }

    /// The leader this replica follows (itself when leading), if any.
    pub fn leader(&self) -> Option<NodeId> {
        self.core.leader()
    }

    /// Every slot up to this one is known chosen (and handed out).
    pub fn committed(&self) -> Slot {
        self.core.committed
    }

    /// The acceptor's state, to look at (`Admin/Acceptor`): its promise and
    /// its votes.
    pub fn acceptor(&self) -> &crate::paxos::acceptor::Acceptor {
        &self.core.acceptor
    }

    /// A snapshot of the replica's state.
    pub fn status(&self) -> Status {
        let (role, in_flight, queued, followers, handing_off) = match &self.state {
            State::Follower | State::PreCandidate(_) => (Role::Follower, 0, 0, Vec::new(), None),
            State::Candidate(_) => (Role::Candidate, 0, 0, Vec::new(), None),
            State::Leader(l) => (
                Role::Leader,
                l.in_flight.len(),
                l.queued.len(),
                l.followers(self.core.now),
                l.hand_off.map(|h| h.target),
            ),
        };
        Status {
            id: self.core.cfg.id,
            role,
            promised: self.core.acceptor.promised(),
            leader: self.leader(),
            committed: self.core.committed,
            leader_commit: self
                .core
                .leadership
                .map_or(self.core.committed, |l| l.commit.max(self.core.committed)),
            compacted: self.core.acceptor.compacted(),
            in_flight,
            queued,
            followers,
            elections: self.core.elections,
            handoff_elections: self.core.handoff_elections,
            membership: self.core.standing.membership(),
            handing_off,
        }
    }

    /// Queues a client command for the log. It gets a slot in
    /// [`take_ready`](Self::take_ready), batched with the others queued by
    /// then. Only the leader takes commands.
    pub fn propose(&mut self, command: Bytes) -> Result<(), NotLeader> {
        let not_leader = self.core.not_leader();
        let (l, _) = self.leading().ok_or(not_leader)?;
        // Handing off: wait for the next leader.
        if l.hand_off.is_some() {
            return Err(NotLeader { leader: None });
        }
        l.queued.push_back(command);
        Ok(())
    }

    /// Hands leadership off, before this replica stops: picks the most
    /// caught-up follower, tells it to start phase 1 at once
    /// (`TimeoutNow`), hands back the commands not yet given a slot
    /// (`Ready::dropped`), and takes no new command or read until the
    /// hand-off ends, for at most a few election timeouts (see `leader.rs`
    /// for the rules, and for what happens when the target never takes
    /// over). Returns the target. Calling it again while handing off picks
    /// and tells a target again.
    pub fn hand_off(&mut self) -> Result<NodeId, HandOffError> {
        let (l, core) = self.leading().ok_or(HandOffError::NotLeader)?;
        let target = l.hand_off(core)?;
        self.check_invariants();
        Ok(target)
    }

    /// Takes back the queued commands `withdrawn` picks, and returns them:
    /// the callers they were for have gone, or their deadline passed.
    ///
    /// Rule: only a command still queued can be withdrawn. It never had a
    /// slot, so no acceptor holds it and it can never be chosen; a command
    /// already proposed is out of reach (its slot may be chosen), and stays.
    pub fn withdraw(&mut self, mut withdrawn: impl FnMut(&Bytes) -> bool) -> Vec<Bytes> {
        let Some((l, _)) = self.leading() else {
            return Vec::new();
        };
        let mut taken = Vec::new();
        l.queued.retain(|command| {
            let take = withdrawn(command);
            if take {
                taken.push(command.clone());
            }
            !take
        });
        taken
    }

    /// Orders a linearizable read (ReadIndex). Once a majority has confirmed
    /// this replica is still leader after the read arrived, `Ready::reads`
    /// yields `(id, index)`: answer the read from the state machine once it
    /// has applied `index`. A new leader gives reads an index only once every
    /// slot it recovered is chosen under its own ballot.
    pub fn read(&mut self, id: ReadId) -> Result<(), NotLeader> {
        let not_leader = self.core.not_leader();
        let (l, core) = self.leading().ok_or(not_leader)?;
        if l.hand_off.is_some() {
            return Err(NotLeader { leader: None });
        }
        l.read(core, id);
        Ok(())
    }

    /// The driver's state machine is durable at or past `through`: the votes
    /// up to it may go. Promises report `through` from now on instead.
    /// Precondition: `through` is at most the commit index.
    pub fn compact(&mut self, through: Slot) {
        assert!(
            through <= self.core.committed,
            "compacting through {through}, past the commit index {}",
            self.core.committed
        );
        self.core.acceptor.compact(through);
        self.check_invariants();
    }

    /// The driver installed a state machine snapshot at `index` (fetched
    /// as [`Ready::fetch_snapshot`] asked). Ignored unless past the commit
    /// index. Every slot up to `index` is then known chosen, without being
    /// handed out in `Ready::chosen` (the state machine has them already),
    /// and compacted. A follower catches up from `index + 1`; a leader drops
    /// the slots it had in flight up to `index` (chosen, and in the
    /// snapshot: their commands are handed back as
    /// [`Ready::unknown_outcome`]) and commits on through those above that
    /// are chosen.
    pub fn snapshot_installed(&mut self, index: Slot) {
        let core = &mut self.core;
        if index <= core.committed {
            return;
        }
        assert!(index < u64::MAX, "snapshot index {index} leaves no slot");
        core.committed = index;
        core.acceptor.compact(index);
        core.catch_up_sent_at = None;
        if let Some((l, core)) = self.leading() {
            l.snapshot_installed(core, index);
        } else if let Some(leadership) = self.core.leadership {
            self.core.learn_commit(leadership.ballot, leadership.commit);
        }
        self.core.settle();
        self.check_invariants();
    }

    /// Advances the clock by one tick: elections, heartbeats, re-sends.
    pub fn tick(&mut self) {
        self.core.now += 1;
        if let Some((l, core)) = self.leading() {
            // Check quorum: a leader cut off from a majority steps down, so
            // its clients go elsewhere and it stops ignoring candidates.
            if l.hears_a_majority(core) {
                l.tick(core);
            } else {
                self.step_down();
            }
        } else if self.core.now >= self.core.election_deadline {
            match self.core.standing {
                Standing::Voter => self.start_pre_vote(),
                Standing::Unknown { .. } => self.core.probe(),
                // A learner never campaigns; it stops naming a leader it
                // no longer hears, as a pre-candidate does.
                Standing::Learner { .. } => {
                    self.core.leadership = None;
                    self.core.reset_election_timer();
                }
            }
        } else {
            self.core.request_catch_up();
        }
        self.core.request_snapshot();
        self.check_invariants();
    }

    /// Handles a message from another replica, `from`. Refuses it, changing
    /// nothing, unless `from` is a member other than this replica and the
    /// message is one it may send (see [`Refused`]).
    pub fn step(&mut self, from: NodeId, msg: Message) -> Result<(), Refused> {
        self.admit(from, &msg)?;
        self.dispatch(from, msg);
        self.core.settle();
        self.check_invariants();
        Ok(())
    }

    /// Handles a message this replica addressed to itself in a [`Ready`]
    /// (a candidate's own `Promise`, a leader's own `Accepted`), which the
    /// driver delivers once the `persist` it depends on is durable.
    pub fn step_own(&mut self, msg: Message) {
        debug_assert!(
            matches!(msg, Message::Promise { .. } | Message::Accepted { .. }),
            "the core sends itself only promises and accepts: {msg:?}"
        );
        self.dispatch(self.core.cfg.id, msg);
        self.core.settle();
        self.check_invariants();
    }

    /// Hands a message to the code for its kind (and for the role).
    fn dispatch(&mut self, from: NodeId, msg: Message) {
        match msg {
            Message::PreVote { ballot } => self.on_pre_vote(from, ballot),
            Message::PreVoteReply { ballot, granted } => {
                self.on_pre_vote_reply(from, ballot, granted)
            }
            Message::Prepare {
                ballot,
                from_slot,
                handed_off_by,
            } => self.on_prepare(from, ballot, from_slot, handed_off_by),
            Message::TimeoutNow { ballot } => self.on_timeout_now(from, ballot),
            Message::Promise {
                ballot,
                from_slot,
                to_slot,
                accepted,
                snapshot,
            } => self.on_promise(from, ballot, from_slot, to_slot, accepted, snapshot),
            Message::Nack { promised } => self.observe(promised),
            Message::Accept {
                ballot,
                slot,
                value,
                commit,
            } => self.on_accept(from, ballot, slot, value, commit),
            Message::Accepted { ballot, slot } => {
                if let Some((l, core)) = self.leading() {
                    l.on_accepted(core, from, ballot, slot);
                }
            }
            Message::Heartbeat {
                ballot,
                commit,
                read_round,
            } => self.on_heartbeat(from, ballot, commit, read_round),
            Message::HeartbeatAck {
                ballot,
                read_round,
                committed,
            } => {
                if let Some((l, core)) = self.leading() {
                    l.on_heartbeat_ack(core, from, ballot, read_round, committed);
                }
            }
            Message::CatchUpRequest {
                ballot,
                from_slot,
                to_slot,
                nonce,
            } => {
                if let Some((l, core)) = self.leading() {
                    l.on_catch_up_request(core, from, ballot, from_slot, to_slot, nonce);
                }
            }
            Message::CatchUp {
                ballot,
                entries,
                commit,
                more,
                nonce,
                proposed,
            } => self.on_catch_up(from, ballot, entries, commit, more, nonce, proposed),
            Message::SnapshotAvailable { ballot, index } => {
                self.on_snapshot_available(from, ballot, index)
            }
            Message::Probe { nonce } => self.core.on_probe(from, nonce),
            Message::ProbeReply { nonce, fresh } => self.core.on_probe_reply(from, nonce, fresh),
        }
    }

    /// Gives queued commands their slots, announces pending read rounds, and
    /// returns everything the driver must now do.
    pub fn take_ready(&mut self) -> Ready {
        if let Some((l, core)) = self.leading() {
            l.fill_pipeline(core);
            l.announce_read_round(core);
        }
        self.check_invariants();
        let ready = std::mem::take(&mut self.core.ready);
        // The chosen slots run on from the last ones handed out, up to the
        // commit index: a driver applying them never passes it.
        if let Some(&(last, _)) = ready.chosen.last() {
            assert_eq!(last, self.core.committed, "chosen ends at the commit index");
        }
        debug_assert!(
            ready.chosen.windows(2).all(|w| w[1].0 == w[0].0 + 1),
            "chosen slots are consecutive"
        );
        ready
    }

    /// What holds between any two inputs, whatever the role.
    fn check_invariants(&self) {
        let core = &self.core;
        assert!(
            core.max_round_seen >= core.acceptor.promised().round,
            "the highest round seen includes our own promise"
        );
        assert!(
            core.acceptor.compacted() <= core.committed,
            "only slots known chosen are compacted"
        );
        assert!(
            core.acceptor
                .first_slot()
                .is_none_or(|s| s > core.acceptor.compacted()),
            "no vote is kept at or below the compacted index"
        );
        assert!(
            core.fetch.is_none_or(|f| f.fetch.min_index > core.committed
                && core.leadership.is_some_and(|l| l.ballot == f.ballot)),
            "a snapshot fetch is pending only while needed, under its leadership"
        );
        self.check_membership_invariants();
        match &self.state {
            State::Follower => {}
            State::PreCandidate(p) => p.check_invariants(core),
            State::Candidate(c) => c.check_invariants(core),
            State::Leader(l) => l.check_invariants(core),
        }
    }

    /// The leader's state and the rest of the replica, when leading: the one
    /// place where leader-only code checks the role.
    fn leading(&mut self) -> Option<(&mut Leader, &mut Core)> {
        match &mut self.state {
            State::Leader(l) => Some((l, &mut self.core)),
            _ => None,
        }
    }
}

impl Core {
    /// The highest round this replica has seen or promised.
    fn highest_round(&self) -> u64 {
        self.max_round_seen.max(self.acceptor.promised().round)
    }

    /// The first slot not known chosen. Every slot voted on or learned is
    /// below `u64::MAX` (see [`Refused::SlotOutOfRange`]), so there is one.
    fn first_unchosen(&self) -> Slot {
        self.committed
            .checked_add(1)
            .expect("the commit index is below u64::MAX")
    }

    /// The leader this replica follows (itself when leading), if any.
    fn leader(&self) -> Option<NodeId> {
        self.leadership.map(|l| l.id)
    }

    fn not_leader(&self) -> NotLeader {
        NotLeader {
            leader: self.leader(),
        }
    }

    /// Hands out `slot`, the next one, as chosen with `value`: the commit
    /// index moves up by one.
    fn choose(&mut self, slot: Slot, value: Value) {
        assert_eq!(
            Some(slot),
            self.committed.checked_add(1),
            "the commit index only moves up, one slot at a time"
        );
        self.committed = slot;
        self.ready.chosen.push((slot, value));
    }

    fn reset_election_timer(&mut self) {
        let t = self.cfg.election_ticks;
        self.election_deadline = self.now + self.rng.range(t, 2 * t);
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

    /// A snapshot through at least `min_index` is needed from `from`, under
    /// the leadership of `ballot`: asks the driver for it (rate-limited).
    fn need_snapshot(&mut self, from: NodeId, min_index: Slot, ballot: Ballot) {
        if min_index <= self.committed {
            return;
        }
        let same = self.fetch.is_some_and(|p| {
            p.ballot == ballot && p.fetch.from == from && p.fetch.min_index >= min_index
        });
        if !same {
            self.fetch = Some(PendingFetch {
                fetch: SnapshotFetch { from, min_index },
                ballot,
                sent_at: None,
            });
        }
        self.request_snapshot();
    }

    /// Asks the driver for the pending snapshot fetch, at most once per
    /// `catch_up_ticks`: the driver ignores a fetch while one runs, but one
    /// that failed must be asked for again.
    fn request_snapshot(&mut self) {
        self.settle();
        let Some(p) = &mut self.fetch else {
            return;
        };
        if p.sent_at
            .is_some_and(|at| self.now < at + self.cfg.catch_up_ticks)
        {
            return;
        }
        p.sent_at = Some(self.now);
        self.ready.fetch_snapshot = Some(p.fetch);
    }

    /// After an input: a learner rejoins if due; a pending snapshot fetch
    /// no longer needed (the commit index reached it, or its leadership
    /// ended) is forgotten.
    fn settle(&mut self) {
        self.rejoin_if_due();
        if let Some(p) = self.fetch {
            let current = self.leadership.is_some_and(|l| l.ballot == p.ballot);
            if !current || self.committed >= p.fetch.min_index {
                self.fetch = None;
            }
        }
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
    use crate::paxos::testing::{Net, cmd, replica};

    #[test]
    fn an_accepted_claiming_to_be_the_leaders_own_does_not_count() {
        let mut net = Net::new(3);
        net.elect(1);
        let leader = net.node(1);
        let ballot = leader.status().promised;
        leader.propose(cmd("x")).unwrap();
        leader.take_ready();
        // Before our own vote is durable, someone claims to be us.
        let accepted = Message::Accepted { ballot, slot: 1 };
        assert_eq!(leader.step(1, accepted.clone()), Err(Refused::FromSelf));
        leader.step(2, accepted.clone()).unwrap();
        assert!(leader.take_ready().chosen.is_empty());
        // Our own, handed back by the driver after the sync, does.
        leader.step_own(accepted);
        assert_eq!(leader.take_ready().chosen.len(), 1);
    }

    #[test]
    #[should_panic(expected = "past the commit index")]
    fn compacting_past_the_commit_index_is_a_bug() {
        replica(1, 3).compact(1);
    }
}
