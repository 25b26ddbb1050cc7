//! What a replica tells its callers: the consensus core plus the bookkeeping
//! of client calls, sans I/O.
//!
//! [`Driver`] owns the [`Replica`] and every call waiting on it. The async
//! shell ([`crate::node`]) and the deterministic simulator
//! (`tests/simulation`) both run this very type, so the logic that decides
//! which caller gets which answer lives once and is what the simulator's
//! seeds check:
//!
//! - a write is proposed under a fresh proposal id and answered with the
//!   reply the state machine produced when the command's slot was applied
//!   here ([`Driver::applied`]), never with a guess;
//! - a read is answered once its ReadIndex barrier passed and the state
//!   machine has applied the read's index;
//! - a command handed back by a leader that stepped down before giving it a
//!   slot, and a read that lost its leader, are answered
//!   [`CallError::Retry`]: they are certainly not in the log;
//! - a write that had a slot when its leader stepped down is in doubt: it is
//!   answered with its reply if its slot turns out to hold it, with
//!   [`CallError::Retry`] once this replica has applied past every slot that
//!   leadership proposed without finding it, and with
//!   [`CallError::Unknown`] if that is not learned within
//!   [`Driver::doubt_ticks`] ticks;
//! - past [`Limits`] (writes or reads already waiting), a call is refused
//!   at once with [`CallError::Busy`], before anything is proposed;
//! - a write whose deadline passes while its command still waits for a slot
//!   is taken back from the core and answered [`CallError::Expired`]: it
//!   never costs a slot (one that already has a slot runs its course);
//! - a leader asked to [hand off](Driver::hand_off) hands back the writes
//!   queued without a slot (answered [`CallError::Retry`]: certainly not in
//!   the log) and refuses new calls with `NotLeader(None)` (wait for the
//!   next leader) until the hand-off ends; writes that have a slot run
//!   their course (answered, or in doubt once it steps down, as above);
//! - a snapshot install skips slots without applying them one by one here:
//!   a write whose slot it may have covered is answered
//!   [`CallError::Unknown`] (never `Retry`: it may be in the snapshot).
//!
//! The shell does what [`Work`] says, in order: send `messages`; make
//! `persist` durable; send `persisted_messages` (those to this replica go
//! back in through [`Driver::step_own`]); apply `chosen` to the state
//! machine and report the replies through [`Driver::applied`]; deliver every
//! [`Answer`]. Callers are opaque tokens (`W` for writes, `R` for reads): a
//! oneshot sender in the shell, a ticket in the simulator.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::kv::{Command, Reply};
use crate::paxos::{
    Envelope, HandOffError, Message, NodeId, Persist, ReadId, Ready, Refused, Replica, Slot,
    SnapshotFetch, Value,
};

/// Why a call could not be served here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallError {
    /// This replica does not lead; ask the one given, if known.
    NotLeader(Option<NodeId>),
    /// The call is certainly not in the log (it never got a slot, or its
    /// slot was chosen with another value): it may be retried as is.
    Retry,
    /// The write had a slot when its leader stepped down, and whether that
    /// slot chose it could not be learned here in time. It may or may not
    /// take effect; only a retry with the same request id is safe.
    Unknown,
    /// The replica is shutting down.
    Stopped,
    /// Refused before it was proposed: `limit` calls of its kind (`what`)
    /// already wait here, the most [`Limits`] allows.
    Busy {
        /// What is full.
        what: &'static str,
        /// Its bound.
        limit: usize,
    },
    /// The call's deadline passed before its command got a slot; it was
    /// taken back and never proposed.
    Expired,
}

impl CallError {
    /// Whether this answer proves the write it answers is not in the log
    /// and never will be: it was refused before it was proposed
    /// (`NotLeader`), or it never got a slot or its slot chose another
    /// value (`Retry`). `Unknown` and `Stopped` prove nothing: the write
    /// may have a slot. The service tells clients `NOT_PROPOSED` only when
    /// every attempt of a call ended in such an answer; the simulator
    /// checks that no write so answered is ever applied.
    pub fn proves_not_in_log(&self) -> bool {
        match self {
            CallError::NotLeader(_)
            | CallError::Retry
            | CallError::Busy { .. }
            | CallError::Expired => true,
            CallError::Unknown | CallError::Stopped => false,
        }
    }
}

/// An answer for one waiting caller.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer<W, R> {
    /// The outcome of a write.
    Write {
        /// Who asked.
        caller: W,
        /// The state machine's reply, or why there is none.
        result: Result<Reply, CallError>,
    },
    /// The outcome of a read. `Ok(key)` means: read `key` from the state
    /// machine as it is now (it has applied at least the read's index) and
    /// answer with that.
    Read {
        /// Who asked.
        caller: R,
        /// The key to serve, or why it cannot be served.
        result: Result<String, CallError>,
    },
}

/// What the shell must do after a batch of inputs, in field order.
#[derive(Debug)]
pub struct Work<W, R> {
    /// Messages that may go out at once.
    pub messages: Vec<Envelope>,
    /// State to make durable (one sync) before `persisted_messages` leave.
    pub persist: Persist,
    /// Messages that wait for `persist`; those to this replica go back in
    /// through [`Driver::step_own`].
    pub persisted_messages: Vec<Envelope>,
    /// Chosen slots, in order, to apply once `persist` is durable; report
    /// the state machine's replies through [`Driver::applied`].
    pub chosen: Vec<(Slot, Value)>,
    /// Callers to answer now.
    pub answers: Vec<Answer<W, R>>,
    /// Fetch this state machine snapshot and install it, then call
    /// [`Driver::snapshot_installed`]. Repeated, rate-limited, while still
    /// needed: ignore it while a fetch is running.
    pub fetch_snapshot: Option<SnapshotFetch>,
}

impl<W, R> Work<W, R> {
    /// True when there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
            && self.persist.is_empty()
            && self.persisted_messages.is_empty()
            && self.chosen.is_empty()
            && self.answers.is_empty()
            && self.fetch_snapshot.is_none()
    }
}

/// How many calls may wait on one replica at once. Past these, a call is
/// refused at once ([`CallError::Busy`]) rather than queued: a queue longer
/// than the replica can serve within a call's deadline only turns calls
/// into timeouts after they have cost their slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Writes proposed and not yet answered, queued or with a slot.
    pub max_writes: usize,
    /// Reads not yet answered.
    pub max_reads: usize,
}

impl Limits {
    /// 4,096 writes (a quarter to half a second of what a 3-replica
    /// cluster commits on a 2-core machine, see the README) and as many
    /// reads.
    pub const DEFAULT: Limits = Limits {
        max_writes: 4096,
        max_reads: 4096,
    };
}

/// A write waiting for its command's slot to be applied.
#[derive(Debug)]
struct PendingWrite<W> {
    caller: W,
    /// Set when the leader that gave the command a slot stepped down.
    doubt: Option<Doubt>,
    /// The tick at which its caller stops waiting, if it said.
    deadline: Option<u64>,
}

/// A write whose leader stepped down after giving it a slot.
#[derive(Clone, Copy, Debug)]
struct Doubt {
    /// Every slot that leadership proposed is at or below this one.
    through: Slot,
    /// The tick at which the write is answered [`CallError::Unknown`].
    give_up_at: u64,
    /// A snapshot was installed since: the write's slot may be in it,
    /// unseen, so not finding it applied proves nothing.
    unobservable: bool,
}

/// The consensus core and the calls waiting on it. See the module docs.
#[derive(Debug)]
pub struct Driver<W, R> {
    replica: Replica,
    /// The state machine has applied every slot up to this one.
    applied: Slot,
    now: u64,
    next_proposal: u64,
    next_read: ReadId,
    writes: HashMap<u64, PendingWrite<W>>,
    reads: HashMap<ReadId, (String, R)>,
    /// Reads whose barrier passed, by the index they wait for.
    reads_at: BTreeMap<Slot, Vec<ReadId>>,
    answers: Vec<Answer<W, R>>,
    limits: Limits,
}

impl<W, R> Driver<W, R> {
    /// A driver over `replica`, whose state machine has applied through
    /// `applied`. Proposal ids start after `first_proposal_id`, which must
    /// make them unique among every command this replica ever proposes
    /// (across restarts too), since the state machine's replies are matched
    /// to callers by it.
    ///
    /// The replica is told which client commands may enter the log
    /// ([`Command::may_enter_log`]): a peer message carrying any other is
    /// refused.
    pub fn new(mut replica: Replica, applied: Slot, first_proposal_id: u64) -> Self {
        replica.check_commands_with(Command::may_enter_log);
        Driver {
            replica,
            applied,
            now: 0,
            next_proposal: first_proposal_id,
            next_read: 1,
            writes: HashMap::new(),
            reads: HashMap::new(),
            reads_at: BTreeMap::new(),
            answers: Vec::new(),
            limits: Limits::DEFAULT,
        }
    }

    /// The same driver with `limits` on the calls waiting.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.set_limits(limits);
        self
    }

    /// Sets the limits on the calls waiting, from the next call on.
    pub fn set_limits(&mut self, limits: Limits) {
        assert!(
            limits.max_writes > 0 && limits.max_reads > 0,
            "limits {limits:?} would refuse every call"
        );
        self.limits = limits;
    }

    /// The clock, in ticks: what a call's deadline is counted in.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// The core, to look at.
    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    /// The state machine has applied every slot up to this one.
    pub fn applied(&self) -> Slot {
        self.applied
    }

    /// How long, in ticks, a write in doubt waits to learn its outcome here
    /// before it is answered [`CallError::Unknown`]: three election
    /// timeouts, time for a new leader to be elected and to tell us.
    pub fn doubt_ticks(&self) -> u64 {
        3 * self.replica.config().election_ticks
    }

    /// How many writes and reads are waiting.
    pub fn waiting(&self) -> (usize, usize) {
        (self.writes.len(), self.reads.len())
    }

    /// The state machine is durable at or past `through` (at most the
    /// applied index): the core may drop the votes up to it.
    pub fn compact(&mut self, through: Slot) {
        assert!(
            through <= self.applied,
            "compacting through {through}, past the applied index {}",
            self.applied
        );
        self.replica.compact(through);
    }

    /// The shell installed a state machine snapshot at `index` (as
    /// [`Work::fetch_snapshot`] asked): the state machine has applied every
    /// slot up to it. Ignored unless past the commit index (install none
    /// below it). Writes in doubt may have had their slot in it, so they
    /// can no longer be answered `Retry`. If chosen slots handed out were
    /// not applied yet, the install skips them, and with them the replies
    /// of the writes they hold: every write waiting is then answered
    /// `Unknown` (it may be one of them; slots are not tracked per write).
    pub fn snapshot_installed(&mut self, index: Slot) {
        let committed = self.replica.committed();
        if index <= committed {
            return;
        }
        let skipped = self.applied < committed;
        self.replica.snapshot_installed(index);
        self.applied = index;
        let now = self.now;
        for w in self.writes.values_mut() {
            if let Some(d) = &mut w.doubt {
                d.unobservable = true;
            } else if skipped {
                w.doubt = Some(Doubt {
                    through: committed,
                    give_up_at: now,
                    unobservable: true,
                });
            }
        }
        self.resolve_doubts();
        self.serve_reads();
    }

    /// Advances the clock: the core's timers, writes in doubt too long, and
    /// writes whose deadline passed before they got a slot.
    pub fn tick(&mut self) {
        self.now += 1;
        self.replica.tick();
        let now = self.now;
        let mut gave_up = Vec::new();
        let mut late = HashSet::new();
        for (&id, w) in &self.writes {
            if w.doubt.is_some_and(|d| now >= d.give_up_at) {
                gave_up.push(id);
            } else if w.deadline.is_some_and(|d| now >= d) {
                late.insert(id);
            }
        }
        for id in gave_up {
            self.answer_write(id, Err(CallError::Unknown));
        }
        // Those still queued are taken back; those with a slot stay.
        for id in self.withdraw(&late) {
            self.answer_write(id, Err(CallError::Expired));
        }
    }

    /// Takes back from the core the queued commands of the writes in `ids`
    /// (see [`Replica::withdraw`]), and returns their proposal ids.
    fn withdraw(&mut self, ids: &HashSet<u64>) -> Vec<u64> {
        if ids.is_empty() {
            return Vec::new();
        }
        // Our own encoding: a command that does not decode has no waiter.
        let proposal = |c: &[u8]| Command::decode(c).ok().map(|c| c.proposal_id);
        self.replica
            .withdraw(|c| proposal(c).is_some_and(|id| ids.contains(&id)))
            .iter()
            .filter_map(|c| proposal(c))
            .collect()
    }

    /// A message from peer `from`; refused (with no effect) when it is not
    /// one an honest member could send.
    pub fn step(&mut self, from: NodeId, msg: Message) -> Result<(), Refused> {
        self.replica.step(from, msg)
    }

    /// Hands leadership off before stopping ([`Replica::hand_off`]): the
    /// most caught-up follower is told to campaign at once; the writes
    /// queued here without a slot are answered [`CallError::Retry`] in the
    /// next [`Work`]; new calls are refused `NotLeader(None)` until the
    /// hand-off ends. Returns the follower picked.
    pub fn hand_off(&mut self) -> Result<NodeId, HandOffError> {
        self.replica.hand_off()
    }

    /// A message this replica's core addressed to itself, delivered once the
    /// sync it waited for is done.
    pub fn step_own(&mut self, msg: Message) {
        self.replica.step_own(msg);
    }

    /// Proposes a write for `caller`, who waits until tick `deadline` (if
    /// given). `command.proposal_id` is assigned here; the id is returned
    /// when the core took the command (else `caller` is answered with
    /// [`CallError::NotLeader`], [`CallError::Busy`] or
    /// [`CallError::Expired`], and nothing was proposed).
    pub fn write(&mut self, mut command: Command, caller: W, deadline: Option<u64>) -> Option<u64> {
        let refused = if self.writes.len() >= self.limits.max_writes {
            Some(CallError::Busy {
                what: "writes waiting",
                limit: self.limits.max_writes,
            })
        } else if deadline.is_some_and(|d| self.now >= d) {
            Some(CallError::Expired)
        } else {
            None
        };
        if let Some(error) = refused {
            self.answers.push(Answer::Write {
                caller,
                result: Err(error),
            });
            return None;
        }
        self.next_proposal = self.next_proposal.wrapping_add(1);
        command.proposal_id = self.next_proposal;
        match self.replica.propose(command.encode()) {
            Ok(()) => {
                let pending = PendingWrite {
                    caller,
                    doubt: None,
                    deadline,
                };
                let old = self.writes.insert(command.proposal_id, pending);
                assert!(old.is_none(), "proposal id {} reused", command.proposal_id);
                Some(command.proposal_id)
            }
            Err(e) => {
                self.answers.push(Answer::Write {
                    caller,
                    result: Err(CallError::NotLeader(e.leader)),
                });
                None
            }
        }
    }

    /// A linearizable read of `key` for `caller`.
    pub fn read(&mut self, key: String, caller: R) {
        if self.reads.len() >= self.limits.max_reads {
            self.answers.push(Answer::Read {
                caller,
                result: Err(CallError::Busy {
                    what: "reads waiting",
                    limit: self.limits.max_reads,
                }),
            });
            return;
        }
        let id = self.next_read;
        self.next_read += 1;
        match self.replica.read(id) {
            Ok(()) => {
                self.reads.insert(id, (key, caller));
            }
            Err(e) => self.answers.push(Answer::Read {
                caller,
                result: Err(CallError::NotLeader(e.leader)),
            }),
        }
    }

    /// Collects what the core asks for, and the answers due now.
    pub fn take_ready(&mut self) -> Work<W, R> {
        let Ready {
            messages,
            persist,
            persisted_messages,
            chosen,
            reads,
            failed_reads,
            dropped,
            abandoned_through,
            fetch_snapshot,
            unknown_outcome,
        } = self.replica.take_ready();
        for read in failed_reads {
            self.fail_read(read, CallError::Retry);
        }
        for command in dropped {
            // Our own encoding; a command that does not decode has no
            // waiter here to answer.
            if let Ok(command) = Command::decode(&command) {
                self.answer_write(command.proposal_id, Err(CallError::Retry));
            }
        }
        for command in unknown_outcome {
            if let Ok(command) = Command::decode(&command) {
                self.answer_write(command.proposal_id, Err(CallError::Unknown));
            }
        }
        if let Some(through) = abandoned_through {
            self.doubt_writes(through);
        }
        for (read, index) in reads {
            self.reads_at.entry(index).or_default().push(read);
        }
        self.serve_reads();
        Work {
            messages,
            persist,
            persisted_messages,
            chosen,
            answers: std::mem::take(&mut self.answers),
            fetch_snapshot,
        }
    }

    /// The state machine applied every slot through `through`, and these are
    /// its replies by proposal id. Returns the callers to answer.
    pub fn applied_through(
        &mut self,
        through: Slot,
        replies: impl IntoIterator<Item = (u64, Reply)>,
    ) -> Vec<Answer<W, R>> {
        assert!(
            through >= self.applied,
            "applied index went back from {} to {through}",
            self.applied
        );
        assert!(
            through <= self.replica.committed(),
            "applied {through} beyond the commit index {}",
            self.replica.committed()
        );
        self.applied = through;
        for (proposal_id, reply) in replies {
            self.answer_write(proposal_id, Ok(reply));
        }
        self.resolve_doubts();
        self.serve_reads();
        std::mem::take(&mut self.answers)
    }

    /// Forgets callers that went away, keeping those for which `keep_write`
    /// / `keep_read` say true. The commands of writes forgotten that still
    /// wait for a slot are taken back: nobody waits for them.
    pub fn retain_callers(
        &mut self,
        keep_write: impl Fn(&W) -> bool,
        keep_read: impl Fn(&R) -> bool,
    ) {
        let mut gone = HashSet::new();
        self.writes.retain(|&id, w| {
            let keep = keep_write(&w.caller);
            if !keep {
                gone.insert(id);
            }
            keep
        });
        self.withdraw(&gone);
        self.reads.retain(|_, (_, r)| keep_read(r));
    }

    /// Answers every waiting caller [`CallError::Stopped`]: the replica is
    /// going away.
    pub fn stop(&mut self) -> Vec<Answer<W, R>> {
        let writes: Vec<u64> = self.writes.keys().copied().collect();
        for id in writes {
            self.answer_write(id, Err(CallError::Stopped));
        }
        let reads: Vec<ReadId> = self.reads.keys().copied().collect();
        for id in reads {
            self.fail_read(id, CallError::Stopped);
        }
        self.reads_at.clear();
        std::mem::take(&mut self.answers)
    }

    /// Every write waiting when a leadership that proposed through `through`
    /// ended is in doubt. (Writes queued but never given a slot were handed
    /// back as `dropped` and answered already.)
    fn doubt_writes(&mut self, through: Slot) {
        let doubt = Doubt {
            through,
            give_up_at: self.now + self.doubt_ticks(),
            unobservable: false,
        };
        for w in self.writes.values_mut() {
            w.doubt.get_or_insert(doubt);
        }
        // Nothing left to learn if we applied through it already.
        self.resolve_doubts();
    }

    /// A write in doubt whose slots are all applied here without it was not
    /// chosen: certainly not in the log (`Retry`), unless a snapshot may
    /// have skipped its slot (`Unknown`).
    fn resolve_doubts(&mut self) {
        let applied = self.applied;
        let resolved: Vec<(u64, bool)> = self
            .writes
            .iter()
            .filter_map(|(&id, w)| {
                w.doubt
                    .filter(|d| d.through <= applied)
                    .map(|d| (id, d.unobservable))
            })
            .collect();
        for (id, unobservable) in resolved {
            let error = if unobservable {
                CallError::Unknown
            } else {
                CallError::Retry
            };
            self.answer_write(id, Err(error));
        }
    }

    fn answer_write(&mut self, proposal_id: u64, result: Result<Reply, CallError>) {
        if let Some(w) = self.writes.remove(&proposal_id) {
            self.answers.push(Answer::Write {
                caller: w.caller,
                result,
            });
        }
    }

    fn fail_read(&mut self, read: ReadId, error: CallError) {
        if let Some((_, caller)) = self.reads.remove(&read) {
            self.answers.push(Answer::Read {
                caller,
                result: Err(error),
            });
        }
    }

    /// Reads whose index the state machine has reached are served now.
    fn serve_reads(&mut self) {
        while let Some(entry) = self.reads_at.first_entry() {
            if *entry.key() > self.applied {
                break;
            }
            for read in entry.remove() {
                if let Some((key, caller)) = self.reads.remove(&read) {
                    self.answers.push(Answer::Read {
                        caller,
                        result: Ok(key),
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, VecDeque};

    use super::*;
    use crate::kv::{self, KvState, MemState, Op};
    use crate::paxos::{Ballot, Config, Restore};

    type Answers = Vec<Answer<&'static str, &'static str>>;
    type ReadAnswer = (&'static str, Result<Option<i32>, CallError>);
    type WriteAnswer = (&'static str, Result<Reply, CallError>);

    /// Drivers on a lossless network (but for the isolated ones), each with
    /// an in-memory state machine; persisting is instant.
    struct Cluster {
        drivers: BTreeMap<NodeId, Driver<&'static str, &'static str>>,
        machines: BTreeMap<NodeId, MemState>,
        queue: VecDeque<(NodeId, Envelope)>,
        isolated: BTreeSet<NodeId>,
        /// Every answer given, by replica, with reads already served.
        answers: BTreeMap<NodeId, Vec<ReadAnswer>>,
        writes: BTreeMap<NodeId, Vec<WriteAnswer>>,
        /// A replica whose chosen slots wait in `unapplied`, not applied.
        lagging: Option<NodeId>,
        unapplied: Vec<(Slot, Value)>,
    }

    impl Cluster {
        fn new(n: u32) -> Self {
            Cluster::with(n, 64, Limits::DEFAULT)
        }

        /// `n` replicas with pipeline `window` and call `limits`.
        fn with(n: u32, window: usize, limits: Limits) -> Self {
            let members: Vec<NodeId> = (1..=n).collect();
            let drivers = members
                .iter()
                .map(|&id| {
                    let mut cfg = Config::new(id, members.clone());
                    cfg.heartbeat_ticks = 2;
                    cfg.election_ticks = 10;
                    cfg.window = window;
                    let replica = Replica::new(cfg, Restore::default()).unwrap();
                    let driver = Driver::new(replica, 0, u64::from(id) << 32);
                    (id, driver.with_limits(limits))
                })
                .collect();
            Cluster {
                drivers,
                machines: members.iter().map(|&id| (id, MemState::new())).collect(),
                queue: VecDeque::new(),
                isolated: BTreeSet::new(),
                answers: BTreeMap::new(),
                writes: BTreeMap::new(),
                lagging: None,
                unapplied: Vec::new(),
            }
        }

        fn d(&mut self, id: NodeId) -> &mut Driver<&'static str, &'static str> {
            self.drivers.get_mut(&id).unwrap()
        }

        fn deliver(&mut self, id: NodeId, answers: Answers) {
            for answer in answers {
                match answer {
                    Answer::Write { caller, result } => {
                        self.writes.entry(id).or_default().push((caller, result))
                    }
                    Answer::Read { caller, result } => {
                        let result = result.map(|key| self.machines[&id].get(&key));
                        self.answers.entry(id).or_default().push((caller, result));
                    }
                }
            }
        }

        /// Does one replica's work as a shell would.
        fn flush(&mut self, id: NodeId) {
            loop {
                let work = self.d(id).take_ready();
                if work.is_empty() {
                    return;
                }
                for e in work.messages.into_iter().chain(work.persisted_messages) {
                    if e.to == id {
                        self.d(id).step_own(e.msg);
                    } else if !self.isolated.contains(&id) && !self.isolated.contains(&e.to) {
                        self.queue.push_back((id, e));
                    }
                }
                self.deliver(id, work.answers);
                if self.lagging == Some(id) {
                    self.unapplied.extend(work.chosen);
                } else if let Some(&(last, _)) = work.chosen.last() {
                    let replies = self.apply(id, &work.chosen);
                    let answers = self.d(id).applied_through(last, replies);
                    self.deliver(id, answers);
                }
            }
        }

        fn apply(&mut self, id: NodeId, chosen: &[(Slot, Value)]) -> Vec<(u64, Reply)> {
            let machine = self.machines.get_mut(&id).unwrap();
            let mut replies = Vec::new();
            for (slot, value) in chosen {
                let commands: Vec<Command> = match value {
                    Value::Noop => Vec::new(),
                    Value::Batch(commands) => commands
                        .iter()
                        .map(|c| Command::decode(c).unwrap())
                        .collect(),
                };
                let limits = kv::SessionLimits::DEFAULT;
                let slot_replies = kv::apply_slot(machine, &limits, *slot, &commands);
                replies.extend(commands.iter().map(|c| c.proposal_id).zip(slot_replies));
            }
            replies
        }

        /// Applies what the lagging replica held back.
        fn catch_up_lagging(&mut self) -> (Slot, Vec<(u64, Reply)>) {
            let id = self.lagging.take().unwrap();
            let chosen = std::mem::take(&mut self.unapplied);
            (chosen.last().unwrap().0, self.apply(id, &chosen))
        }

        fn run(&mut self) {
            let ids: Vec<NodeId> = self.drivers.keys().copied().collect();
            for &id in &ids {
                self.flush(id);
            }
            while let Some((from, e)) = self.queue.pop_front() {
                self.d(e.to).step(from, e.msg).unwrap();
                self.flush(e.to);
            }
        }

        /// Ticks only the replicas of `among` until one of them leads.
        fn elect(&mut self, among: &[NodeId]) -> NodeId {
            for _ in 0..10_000 {
                if let Some(&l) = among.iter().find(|&&id| self.d(id).replica().is_leader()) {
                    return l;
                }
                for &id in among {
                    self.d(id).tick();
                }
                self.run();
            }
            panic!("no leader among {among:?}");
        }

        fn write(&mut self, id: NodeId, key: &str, op: Op, caller: &'static str) -> Option<u64> {
            self.write_until(id, key, op, caller, None)
        }

        /// A write whose caller waits until tick `deadline`.
        fn write_until(
            &mut self,
            id: NodeId,
            key: &str,
            op: Op,
            caller: &'static str,
            deadline: Option<u64>,
        ) -> Option<u64> {
            let command = Command {
                proposal_id: 0,
                client_id: 0,
                sequence: 0,
                key: key.into(),
                op,
            };
            self.d(id).write(command, caller, deadline)
        }

        /// Ticks every replica `n` times, delivering what each tick sends.
        fn tick_all(&mut self, n: usize) {
            for _ in 0..n {
                let ids: Vec<NodeId> = self.drivers.keys().copied().collect();
                for id in ids {
                    self.d(id).tick();
                }
                self.run();
            }
        }

        fn written(&self, id: NodeId) -> &[WriteAnswer] {
            self.writes.get(&id).map_or(&[], Vec::as_slice)
        }
    }

    #[test]
    fn a_leader_handing_off_answers_its_queued_writes_retry_refuses_new_calls_and_lets_slotted_ones_finish()
     {
        // A window of one slot: while slot 1 is in flight, the next write
        // waits in the queue.
        let mut c = Cluster::with(3, 1, Limits::DEFAULT);
        let l = c.elect(&[1, 2, 3]);
        c.write(l, "slotted", Op::Insert(1), "slotted");
        c.flush(l);
        c.write(l, "queued", Op::Insert(2), "queued");
        let target = c.d(l).hand_off().unwrap();
        assert_ne!(target, l);
        assert_eq!(c.write(l, "late", Op::Insert(3), "late"), None);
        c.d(l).read("slotted".into(), "read");
        c.run();
        let mut written = c.written(l).to_vec();
        written.sort_by_key(|(caller, _)| *caller);
        assert_eq!(
            written,
            [
                ("late", Err(CallError::NotLeader(None))),
                ("queued", Err(CallError::Retry)),
                ("slotted", Ok(Reply::Inserted)),
            ]
        );
        assert_eq!(c.answers[&l], [("read", Err(CallError::NotLeader(None)))]);
        // The target leads (no election timeout waited), with slot 1.
        c.tick_all(2);
        assert!(c.d(target).replica().is_leader());
        assert_eq!(c.machines[&target].get("slotted"), Some(1));
        assert_eq!(c.machines[&target].get("queued"), None);
    }

    #[test]
    fn past_its_limits_a_replica_refuses_calls_at_once_and_proposes_nothing() {
        let limits = Limits {
            max_writes: 2,
            max_reads: 1,
        };
        let mut c = Cluster::with(3, 64, limits);
        let l = c.elect(&[1, 2, 3]);
        // The followers are cut off: nothing commits, so calls pile up.
        c.isolated
            .extend([1, 2, 3].into_iter().filter(|&id| id != l));
        assert!(c.write(l, "a", Op::Insert(1), "a").is_some());
        assert!(c.write(l, "b", Op::Insert(2), "b").is_some());
        assert_eq!(c.write(l, "c", Op::Insert(3), "c"), None);
        c.d(l).read("a".into(), "r1");
        c.d(l).read("a".into(), "r2");
        c.run();
        let busy = |what, limit| CallError::Busy { what, limit };
        assert_eq!(c.written(l), [("c", Err(busy("writes waiting", 2)))]);
        assert_eq!(c.answers[&l], [("r2", Err(busy("reads waiting", 1)))]);
        assert!(busy("writes waiting", 2).proves_not_in_log());
        // Healed: what was taken commits; what was refused never does.
        c.isolated.clear();
        c.tick_all(100);
        assert_eq!(c.machines[&l].get("a"), Some(1));
        assert_eq!(c.machines[&l].get("b"), Some(2));
        assert_eq!(c.machines[&l].get("c"), None);
        assert_eq!(c.d(l).waiting(), (0, 0));
    }

    #[test]
    fn a_write_whose_deadline_passes_before_it_gets_a_slot_is_taken_back_and_never_applied() {
        // A window of one slot: while slot 1 waits for the cut-off
        // followers, later writes wait in the queue.
        let mut c = Cluster::with(3, 1, Limits::DEFAULT);
        let l = c.elect(&[1, 2, 3]);
        c.isolated
            .extend([1, 2, 3].into_iter().filter(|&id| id != l));
        let now = c.d(l).now();
        c.write_until(l, "slotted", Op::Insert(1), "slotted", Some(now + 2));
        c.run();
        c.write_until(l, "queued", Op::Insert(2), "queued", Some(now + 2));
        c.write_until(l, "patient", Op::Insert(3), "patient", None);
        // Already late when it arrives: refused at once.
        assert_eq!(
            c.write_until(l, "late", Op::Insert(4), "late", Some(now)),
            None
        );
        c.run();
        assert_eq!(c.written(l), [("late", Err(CallError::Expired))]);
        c.tick_all(2);
        // "queued" is taken back; "slotted" has a slot and runs its course.
        assert_eq!(
            c.written(l),
            [
                ("late", Err(CallError::Expired)),
                ("queued", Err(CallError::Expired))
            ]
        );
        c.isolated.clear();
        c.tick_all(100);
        assert_eq!(c.machines[&l].get("slotted"), Some(1));
        assert_eq!(c.machines[&l].get("patient"), Some(3));
        assert_eq!(c.machines[&l].get("queued"), None);
        assert_eq!(c.machines[&l].get("late"), None);
    }

    #[test]
    fn a_write_whose_caller_went_away_before_it_got_a_slot_is_taken_back() {
        let mut c = Cluster::with(3, 1, Limits::DEFAULT);
        let l = c.elect(&[1, 2, 3]);
        c.isolated
            .extend([1, 2, 3].into_iter().filter(|&id| id != l));
        c.write(l, "slotted", Op::Insert(1), "slotted");
        c.run();
        c.write(l, "gone", Op::Insert(2), "gone");
        c.write(l, "waiting", Op::Insert(3), "waiting");
        c.run();
        c.d(l)
            .retain_callers(|&w| w != "gone" && w != "slotted", |_| true);
        c.isolated.clear();
        c.tick_all(100);
        assert_eq!(c.machines[&l].get("slotted"), Some(1));
        assert_eq!(c.machines[&l].get("waiting"), Some(3));
        assert_eq!(c.machines[&l].get("gone"), None);
        assert_eq!(c.written(l), [("waiting", Ok(Reply::Inserted))]);
    }

    #[test]
    fn a_peer_message_carrying_a_command_the_state_machine_cannot_apply_is_refused() {
        let mut c = Cluster::new(3);
        let ballot = Ballot::new(1, 1);
        let accept = |command: &[u8]| Message::Accept {
            ballot,
            slot: 1,
            value: Value::Batch(vec![bytes::Bytes::copy_from_slice(command)]),
            commit: 0,
        };
        let refused = Err(Refused::BadCommand { slot: 1 });
        // Not a Command at all, and a Command the client API never makes.
        assert_eq!(c.d(2).step(1, accept(&[0x0a, 0xff, 0x01])), refused);
        let empty_key = Command {
            proposal_id: 1,
            client_id: 0,
            sequence: 0,
            key: String::new(),
            op: Op::Remove,
        };
        assert_eq!(c.d(2).step(1, accept(&empty_key.encode())), refused);
        assert!(c.d(2).take_ready().is_empty());
        let valid = Command {
            key: "k".into(),
            ..empty_key
        };
        assert_eq!(c.d(2).step(1, accept(&valid.encode())), Ok(()));
    }

    #[test]
    fn each_writer_gets_the_reply_of_its_own_command() {
        let mut c = Cluster::new(3);
        let l = c.elect(&[1]);
        c.write(l, "k", Op::Insert(1), "first");
        c.write(l, "k", Op::Insert(2), "second");
        c.write(l, "k", Op::Update(3), "third");
        c.run();
        assert_eq!(
            c.written(l),
            &[
                ("first", Ok(Reply::Inserted)),
                ("second", Ok(Reply::AlreadyExists)),
                ("third", Ok(Reply::Updated { previous: 1 })),
            ]
        );
        // Followers applied the same commands but have no caller for them.
        assert!(c.written(2).is_empty() && c.written(3).is_empty());
        assert_eq!(c.d(2).waiting(), (0, 0));
    }

    #[test]
    fn a_non_leader_answers_at_once_with_the_leader_it_knows() {
        let mut c = Cluster::new(3);
        let l = c.elect(&[1]);
        assert_eq!(c.write(2, "k", Op::Upsert(1), "w"), None);
        c.d(2).read("k".into(), "r");
        c.run();
        assert_eq!(c.written(2), &[("w", Err(CallError::NotLeader(Some(l))))]);
        assert_eq!(
            c.answers[&2],
            vec![("r", Err(CallError::NotLeader(Some(l))))]
        );
    }

    #[test]
    fn a_read_is_served_only_once_the_state_machine_reached_its_index() {
        let mut c = Cluster::new(3);
        let l = c.elect(&[1]);
        // The leader learns its write chosen but its state machine lags.
        c.lagging = Some(l);
        c.write(l, "k", Op::Insert(7), "w");
        c.run();
        assert_eq!(c.d(l).replica().committed(), 1);
        assert_eq!(c.d(l).applied(), 0);
        c.d(l).read("k".into(), "r");
        c.run();
        assert!(
            !c.answers.contains_key(&l),
            "confirmed by a quorum, but index 1 is not applied"
        );
        let (last, replies) = c.catch_up_lagging();
        let answers = c.d(l).applied_through(last, replies);
        c.deliver(l, answers);
        assert_eq!(c.written(l), &[("w", Ok(Reply::Inserted))]);
        assert_eq!(c.answers[&l], vec![("r", Ok(Some(7)))]);
    }

    /// Leader 1 gives a write a slot, is cut off before anyone accepts it,
    /// and learns of a new leader only after the slot was chosen otherwise.
    fn deposed_with_a_write_in_its_slot() -> Cluster {
        let mut c = Cluster::new(3);
        assert_eq!(c.elect(&[1]), 1);
        c.isolated.insert(1);
        c.write(1, "k", Op::Insert(1), "lost");
        c.run();
        assert!(c.written(1).is_empty());
        let new = c.elect(&[2, 3]);
        c.write(new, "k", Op::Insert(2), "winner");
        c.run();
        assert_eq!(c.written(new), &[("winner", Ok(Reply::Inserted))]);
        c
    }

    #[test]
    fn a_deposed_leaders_write_is_answered_retry_once_its_slot_is_learned_without_it() {
        let mut c = deposed_with_a_write_in_its_slot();
        c.isolated.clear();
        for _ in 0..30 {
            let ids: Vec<NodeId> = (2..=3).collect();
            for id in ids {
                c.d(id).tick();
            }
            c.run();
        }
        assert!(!c.d(1).replica().is_leader());
        assert_eq!(c.d(1).applied(), c.d(2).applied());
        assert_eq!(c.written(1), &[("lost", Err(CallError::Retry))]);
        assert_eq!(c.machines[&1].get("k"), Some(2));
    }

    #[test]
    fn a_deposed_leaders_write_is_answered_unknown_when_its_outcome_cannot_be_learned() {
        let mut c = deposed_with_a_write_in_its_slot();
        // Still cut off: it steps down on its own (no quorum heard)...
        while c.d(1).replica().is_leader() {
            c.d(1).tick();
            c.flush(1);
        }
        assert!(c.written(1).is_empty(), "in doubt, not yet given up");
        // ...and cannot learn the slot, so after a while says so.
        for _ in 0..c.d(1).doubt_ticks() {
            c.d(1).tick();
            c.flush(1);
        }
        assert_eq!(c.written(1), &[("lost", Err(CallError::Unknown))]);
    }

    #[test]
    fn writes_whose_slots_a_snapshot_may_cover_are_answered_unknown_never_retry() {
        // A leader's write in flight when it installs a snapshot over it.
        let mut c = Cluster::new(3);
        let l = c.elect(&[1]);
        c.isolated.insert(l);
        c.write(l, "k", Op::Insert(1), "in flight");
        c.flush(l);
        c.d(l).snapshot_installed(1);
        c.flush(l);
        assert_eq!(c.written(l), &[("in flight", Err(CallError::Unknown))]);
        assert_eq!(c.d(l).applied(), 1);
        // A deposed leader's write in doubt, when a snapshot skips past it.
        let mut c = deposed_with_a_write_in_its_slot();
        while c.d(1).replica().is_leader() {
            c.d(1).tick();
            c.flush(1);
        }
        assert!(c.written(1).is_empty());
        c.d(1).snapshot_installed(1);
        c.flush(1);
        assert_eq!(c.written(1), &[("lost", Err(CallError::Unknown))]);
    }

    #[test]
    fn writes_chosen_but_not_yet_applied_when_a_snapshot_skips_them_are_answered_unknown() {
        // A leader's write is chosen, but its state machine lags; then a
        // snapshot past it is installed (the chosen slot is skipped here).
        let mut c = Cluster::new(3);
        let l = c.elect(&[1]);
        c.lagging = Some(l);
        c.write(l, "k", Op::Insert(1), "chosen");
        c.run();
        assert_eq!((c.d(l).replica().committed(), c.d(l).applied()), (1, 0));
        c.d(l).snapshot_installed(2);
        c.flush(l);
        assert_eq!(c.written(l), &[("chosen", Err(CallError::Unknown))]);
        // The same after the leader stepped down with nothing in flight.
        let mut c = Cluster::new(3);
        let l = c.elect(&[1]);
        c.lagging = Some(l);
        c.write(l, "k", Op::Insert(1), "chosen");
        c.run();
        let ballot = c.d(l).replica().status().promised;
        let nack = Message::Nack {
            promised: Ballot::new(ballot.round + 1, 3),
        };
        c.d(l).step(3, nack).unwrap();
        c.flush(l);
        assert!(!c.d(l).replica().is_leader());
        assert!(c.written(l).is_empty());
        c.d(l).snapshot_installed(2);
        c.flush(l);
        assert_eq!(c.written(l), &[("chosen", Err(CallError::Unknown))]);
    }

    #[test]
    fn commands_never_given_a_slot_and_reads_of_a_lost_leadership_are_answered_retry() {
        let mut c = Cluster::new(3);
        let l = c.elect(&[1]);
        c.write(l, "k", Op::Insert(1), "queued");
        c.d(l).read("k".into(), "r");
        let ballot = c.d(l).replica().status().promised;
        c.d(l)
            .step(
                3,
                Message::Nack {
                    promised: Ballot::new(ballot.round + 1, 3),
                },
            )
            .unwrap();
        c.flush(l);
        assert_eq!(c.written(l), &[("queued", Err(CallError::Retry))]);
        assert_eq!(c.answers[&l], vec![("r", Err(CallError::Retry))]);
        assert_eq!(c.d(l).waiting(), (0, 0));
    }

    #[test]
    fn stopping_answers_everyone_waiting() {
        let mut c = Cluster::new(3);
        let l = c.elect(&[1]);
        c.isolated.insert(l);
        c.write(l, "k", Op::Insert(1), "w");
        c.d(l).read("k".into(), "r");
        c.flush(l);
        let answers = c.d(l).stop();
        assert_eq!(
            answers,
            vec![
                Answer::Write {
                    caller: "w",
                    result: Err(CallError::Stopped)
                },
                Answer::Read {
                    caller: "r",
                    result: Err(CallError::Stopped)
                },
            ]
        );
    }
}
