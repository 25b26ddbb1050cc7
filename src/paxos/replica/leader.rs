//! The leader: the phase 2 pipeline, counting accepts, advancing the commit
//! index, re-sending unanswered accepts, heartbeats, check-quorum, and
//! serving catch-up requests.
//!
//! Everything here is a method of [`Leader`], taking the rest of the replica
//! as `&mut Core`: only a leader has a `Leader`, so none of it can run in
//! another role.
//!
//! # Hand-off
//!
//! [`Replica::hand_off`](super::Replica::hand_off) makes the leader give its
//! leadership away before it stops (a rolling update: SIGTERM). It
//!
//! 1. picks as target the follower that has accepted the highest slot under
//!    its ballot (ties: the highest commit index reported, then the lowest
//!    id), among those heard within an election timeout: the one whose
//!    phase 1 has least to recover;
//! 2. stops giving slots: commands queued and not yet proposed are handed
//!    back at once (`Ready::dropped`, certainly not in the log, so the
//!    service sends them to the next leader), and from now on
//!    [`propose`](super::Replica::propose) and
//!    [`read`](super::Replica::read) answer `NotLeader { leader: None }`
//!    (wait for the next leader). Slots already in flight keep being
//!    re-sent, so they are chosen, or found by the next leader's phase 1;
//!    heartbeats go on, so the followers keep hearing a live leader;
//! 3. sends the target `TimeoutNow { ballot }` (see `election.rs`).
//!
//! The next leader's prepare (or any higher ballot) steps it down as usual.
//! If none comes within [`HAND_OFF_ELECTIONS`] election timeouts (the
//! target crashed, is cut off, or lost the election), the hand-off lapses
//! and the leader *resumes*: it takes commands again. A replica that is
//! stopping stops either way; one that is not (a hand-off asked for some
//! other reason) is better off leading than refusing every call. A late
//! `TimeoutNow` may then still start an election: a leader change, never a
//! safety matter.

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;

use super::reads::PendingRead;
use super::{Core, FollowerStatus, HandOffError};
use crate::paxos::ballot::{Ballot, NodeId, Slot};
use crate::paxos::message::{Envelope, Message, ReadId, Value};
use crate::paxos::quorum::{self, Votes};

/// A slot the leader proposed and has not yet committed.
#[derive(Debug)]
pub(super) struct Proposal {
    value: Value,
    acks: Votes,
    chosen: bool,
    sent_at: u64,
}

/// What the leader knows of one follower.
#[derive(Debug, Default)]
pub(super) struct Progress {
    pub(super) last_ack: u64,
    pub(super) read_round: u64,
    pub(super) committed: Slot,
    /// The highest slot it accepted under our ballot.
    pub(super) accepted: Slot,
}

/// A hand-off lapses, and the leader resumes, after this many election
/// timeouts without a higher ballot seen.
pub const HAND_OFF_ELECTIONS: u64 = 2;

/// A hand-off under way: `target` was told to campaign; until tick `until`.
#[derive(Clone, Copy, Debug)]
pub(super) struct HandOff {
    pub(super) target: NodeId,
    until: u64,
}

/// The state only a leader has.
#[derive(Debug)]
pub(super) struct Leader {
    pub(super) ballot: Ballot,
    /// The last slot recovered in phase 1; reads wait until it is committed.
    pub(super) recovered_through: Slot,
    /// The next recovered slot to propose (past `recovered_through` once
    /// every one is): recovered slots are proposed in order, as the window
    /// allows, before any new command.
    next_recovered: Slot,
    /// The values recovered in phase 1 for the slots from `next_recovered`
    /// on, not yet proposed; a slot of that range missing here gets a no-op.
    recovering: BTreeMap<Slot, Value>,
    next_slot: Slot,
    pub(super) in_flight: BTreeMap<Slot, Proposal>,
    pub(super) queued: VecDeque<Bytes>,
    pub(super) progress: BTreeMap<NodeId, Progress>,
    heartbeat_due: u64,
    /// The last read round announced to the followers.
    pub(super) read_round: u64,
    /// Reads that arrived before recovery finished: not yet given an index.
    pub(super) unindexed_reads: Vec<ReadId>,
    pub(super) reads: VecDeque<PendingRead>,
    /// A learner waits for a slot proposed after this one (see
    /// `on_catch_up_request`): a no-op goes there if no command does.
    owed_slot_after: Option<Slot>,
    /// Set while handing leadership off (see the module docs): no new
    /// slots, no new calls.
    pub(super) hand_off: Option<HandOff>,
}

impl Leader {
    /// A leader of `ballot` that recovered, in phase 1, `recovered` for the
    /// slots `first_recovered..=recovered_through` (a no-op for each slot
    /// of that range `recovered` does not hold), and has yet to propose
    /// them.
    pub(super) fn new(
        core: &Core,
        ballot: Ballot,
        first_recovered: Slot,
        recovered_through: Slot,
        recovered: BTreeMap<Slot, Value>,
    ) -> Leader {
        let now = core.now;
        let progress = core
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
        Leader {
            ballot,
            recovered_through,
            next_recovered: first_recovered,
            recovering: recovered,
            next_slot: recovered_through
                .checked_add(1)
                .expect("recovered slots are below u64::MAX"),
            in_flight: BTreeMap::new(),
            queued: VecDeque::new(),
            progress,
            heartbeat_due: now,
            read_round: 0,
            unindexed_reads: Vec::new(),
            reads: VecDeque::new(),
            owed_slot_after: None,
            hand_off: None,
        }
    }

    /// What holds of a leader between any two inputs.
    pub(super) fn check_invariants(&self, core: &Core) {
        assert_eq!(
            self.ballot.node, core.cfg.id,
            "a leader's ballot is its own"
        );
        assert!(
            self.ballot >= core.acceptor.promised(),
            "a higher promise steps a leader down before it is made"
        );
        assert!(
            core.leadership
                .is_some_and(|l| l.id == core.cfg.id && l.ballot == self.ballot),
            "a leader follows itself"
        );
        assert!(
            self.next_slot > core.committed,
            "next_slot is past the commit index"
        );
        assert!(
            self.in_flight
                .first_key_value()
                .is_none_or(|(&s, _)| s > core.committed)
                && self
                    .in_flight
                    .last_key_value()
                    .is_none_or(|(&s, _)| s < self.next_slot),
            "slots in flight lie between the commit index and next_slot"
        );
        assert!(
            self.in_flight
                .last_key_value()
                .is_none_or(|(&s, _)| self.in_window(core, s)),
            "no slot is proposed more than a window above the commit index"
        );
        assert!(
            self.recovery_done() || self.next_recovered > core.committed,
            "the recovered slots not yet proposed are above the commit index"
        );
        assert!(
            self.recovering
                .keys()
                .all(|&s| (self.next_recovered..=self.recovered_through).contains(&s)),
            "recovered values wait only for slots not yet proposed"
        );
        debug_assert!(
            self.in_flight.keys().all(|&slot| core
                .acceptor
                .vote(slot)
                .is_some_and(|(b, _)| b == self.ballot)),
            "our own acceptor voted for every slot we have in flight, under our ballot"
        );
    }

    /// What the leader knows of each follower, for [`Status`](super::Status).
    pub(super) fn followers(&self, now: u64) -> Vec<FollowerStatus> {
        self.progress
            .iter()
            .map(|(&id, p)| FollowerStatus {
                id,
                committed: p.committed,
                silent_ticks: now.saturating_sub(p.last_ack),
            })
            .collect()
    }

    /// Whether `slot` may be proposed now: it is at most `window` above the
    /// commit index. Every accept carries the commit index, which never
    /// goes down, so every accept for `slot` lies within the window above
    /// the commit index it carries: acceptors refuse any other (see
    /// `admission.rs`).
    fn in_window(&self, core: &Core, slot: Slot) -> bool {
        slot.saturating_sub(core.committed) <= core.cfg.window as u64
    }

    /// Whether every slot recovered in phase 1 has been proposed.
    fn recovery_done(&self) -> bool {
        self.next_recovered > self.recovered_through
    }

    /// Check-quorum: whether a majority (us included) answered within the
    /// last two election timeouts.
    pub(super) fn hears_a_majority(&self, core: &Core) -> bool {
        let window = 2 * core.cfg.election_ticks;
        quorum::is_majority(&core.cfg.members, |m| {
            m == core.cfg.id
                || self
                    .progress
                    .get(&m)
                    .is_some_and(|p| core.now - p.last_ack < window)
        })
    }

    /// A tick while leading: heartbeats when due, and re-sends; a
    /// hand-off that lapsed ends (the leader resumes).
    pub(super) fn tick(&mut self, core: &mut Core) {
        if self.hand_off.is_some_and(|h| core.now >= h.until) {
            self.hand_off = None;
        }
        if core.now >= self.heartbeat_due {
            self.broadcast_heartbeat(core);
        }
        self.resend_unanswered_accepts(core);
    }

    /// Starts handing leadership off (see the module docs) and returns the
    /// target. Asked again while handing off, picks a target anew and tells
    /// it again, with a fresh bound.
    ///
    /// Rule: the target is a follower heard within an election timeout
    /// (one silent longer is likely gone) with the highest slot accepted
    /// under our ballot, then the highest commit index it reported, then
    /// the lowest id.
    pub(super) fn hand_off(&mut self, core: &mut Core) -> Result<NodeId, HandOffError> {
        let now = core.now;
        let target = self
            .progress
            .iter()
            .filter(|(_, p)| now - p.last_ack < core.cfg.election_ticks)
            .max_by_key(|&(&id, p)| (p.accepted, p.committed, std::cmp::Reverse(id)))
            .map(|(&id, _)| id)
            .ok_or(HandOffError::NoTarget)?;
        self.hand_off = Some(HandOff {
            target,
            until: now + HAND_OFF_ELECTIONS * core.cfg.election_ticks,
        });
        // Not proposed: certainly not in the log. Their callers go to the
        // next leader.
        core.ready.dropped.extend(self.queued.drain(..));
        self.owed_slot_after = None;
        let ballot = self.ballot;
        core.send(target, Message::TimeoutNow { ballot });
        Ok(target)
    }

    /// Stepping down: hands back the commands that never got a slot, fails
    /// the reads it cannot serve any more, and says how far the slots whose
    /// outcome it leaves unknown reach.
    pub(super) fn abandon(self, core: &mut Core) {
        if let Some((&last, _)) = self.in_flight.last_key_value() {
            assert!(last < self.next_slot, "slots in flight were proposed");
            let through = &mut core.ready.abandoned_through;
            *through = (*through).max(Some(last));
        }
        core.ready.dropped.extend(self.queued);
        core.ready.failed_reads.extend(self.unindexed_reads);
        core.ready
            .failed_reads
            .extend(self.reads.into_iter().map(|r| r.id));
        core.leadership = None;
    }

    /// Proposes the slots recovered in phase 1, then cuts the queued
    /// commands into slots, while the window has room.
    ///
    /// Rule: the window bounds every proposal, recovered ones included: a
    /// slot is proposed only while it is at most `window` above the commit
    /// index. A leader that recovered far more slots than that (it lagged)
    /// proposes them a window at a time, as they are chosen; a leader still
    /// waiting for a snapshot to move its commit index up proposes nothing
    /// beyond it meanwhile.
    pub(super) fn fill_pipeline(&mut self, core: &mut Core) {
        // Rule (hand-off): no new slot while handing off.
        if self.hand_off.is_some() {
            return;
        }
        while !self.recovery_done() && self.in_window(core, self.next_recovered) {
            let slot = self.next_recovered;
            // Below `recovered_through`, itself below u64::MAX.
            self.next_recovered = slot + 1;
            let value = self.recovering.remove(&slot).unwrap_or(Value::Noop);
            self.propose_at(core, slot, value);
        }
        while !self.queued.is_empty() && self.in_window(core, self.next_slot) {
            let mut batch = Vec::new();
            let mut bytes = 0;
            while let Some(command) = self.queued.front() {
                if !batch.is_empty()
                    && (batch.len() >= core.cfg.max_batch
                        || bytes + command.len() > core.cfg.max_batch_bytes)
                {
                    break;
                }
                bytes += command.len();
                batch.extend(self.queued.pop_front());
            }
            let slot = self.next_slot;
            self.next_slot = slot.checked_add(1).expect("slot numbers ran out");
            self.propose_at(core, slot, Value::Batch(batch));
        }
        // A learner waits for a slot after `after`; no command took one.
        if let Some(after) = self.owed_slot_after {
            if self.next_slot - 1 > after {
                self.owed_slot_after = None;
            } else if self.in_window(core, self.next_slot) {
                self.owed_slot_after = None;
                let slot = self.next_slot;
                self.next_slot = slot.checked_add(1).expect("slot numbers ran out");
                self.propose_at(core, slot, Value::Noop);
            }
        }
    }

    /// Proposes `value` for `slot` under the leader's ballot: our own accept
    /// goes to disk while the accepts go out to the followers.
    pub(super) fn propose_at(&mut self, core: &mut Core, slot: Slot, value: Value) {
        assert!(
            slot > core.committed && slot < self.next_slot,
            "slot {slot} proposed outside the pipeline ({}, {})",
            core.committed,
            self.next_slot
        );
        let ballot = self.ballot;
        let earlier = self.in_flight.insert(
            slot,
            Proposal {
                value: value.clone(),
                acks: Votes::new(),
                chosen: false,
                sent_at: core.now,
            },
        );
        // The heart of Paxos: one value per slot under one ballot.
        assert!(
            earlier.is_none(),
            "slot {slot} proposed twice under {ballot}"
        );
        // Our own acceptor cannot refuse: any higher promise steps a leader
        // down before it is made (see `Replica::observe`).
        let change = core
            .acceptor
            .accept(ballot, slot, &value)
            .unwrap_or_else(|promised| {
                panic!("leader {ballot} refused by its own acceptor, which promised {promised}")
            });
        if change.vote_changed {
            core.persist_vote(slot, ballot, &value);
        }
        // Counted towards the majority only when it arrives back, which the
        // driver does after the vote is durable.
        core.send_after_persist(core.cfg.id, Message::Accepted { ballot, slot });
        let commit = core.committed;
        for peer in core.peers() {
            core.send(
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

    pub(super) fn on_accepted(
        &mut self,
        core: &mut Core,
        from: NodeId,
        ballot: Ballot,
        slot: Slot,
    ) {
        if self.ballot != ballot {
            return;
        }
        if let Some(p) = self.progress.get_mut(&from) {
            p.last_ack = core.now;
            p.accepted = p.accepted.max(slot);
        }
        let Some(proposal) = self.in_flight.get_mut(&slot) else {
            return;
        };
        if proposal.chosen || !proposal.acks.insert(from) {
            return;
        }
        // Rule: chosen once a majority accepted it under this ballot.
        if proposal.acks.is_majority(&core.cfg.members) {
            proposal.chosen = true;
            self.advance_commit(core);
        }
    }

    /// Rule: the commit index is the end of the contiguous chosen prefix.
    fn advance_commit(&mut self, core: &mut Core) {
        while let Some(entry) = self.in_flight.first_entry() {
            if *entry.key() != core.first_unchosen() || !entry.get().chosen {
                break;
            }
            let (slot, proposal) = entry.remove_entry();
            core.choose(slot, proposal.value);
        }
        if let Some(leadership) = &mut core.leadership {
            leadership.commit = core.committed;
        }
        self.index_reads_after_recovery(core);
    }

    /// The driver installed a snapshot at `index`, now the commit index.
    /// Slots in flight up to it are chosen and in the snapshot: they are
    /// dropped, and the commands in them handed back with an unknown
    /// outcome (the snapshot may hold them or another value); so are the
    /// recovered values not yet proposed there. Proposals go
    /// on above it, and the commit index runs on through the slots in
    /// flight already chosen.
    pub(super) fn snapshot_installed(&mut self, core: &mut Core, index: Slot) {
        debug_assert_eq!(core.committed, index, "the core moved the commit index");
        let above = self.in_flight.split_off(&(index + 1));
        let covered = std::mem::replace(&mut self.in_flight, above);
        let above = self.recovering.split_off(&(index + 1));
        let recovered = std::mem::replace(&mut self.recovering, above);
        for value in covered
            .into_values()
            .map(|p| p.value)
            .chain(recovered.into_values())
        {
            if let Value::Batch(commands) = value {
                core.ready.unknown_outcome.extend(commands);
            }
        }
        self.next_recovered = self.next_recovered.max(index + 1);
        self.next_slot = self.next_slot.max(index + 1);
        self.advance_commit(core);
    }

    fn resend_unanswered_accepts(&mut self, core: &mut Core) {
        let now = core.now;
        let commit = core.committed;
        let resend = core.cfg.resend_ticks;
        let peers: Vec<NodeId> = core.peers().collect();
        let ballot = self.ballot;
        for (&slot, p) in self.in_flight.iter_mut() {
            if p.chosen || now - p.sent_at < resend {
                continue;
            }
            p.sent_at = now;
            for &peer in peers.iter().filter(|&&peer| !p.acks.contains(peer)) {
                core.ready.messages.push(Envelope {
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

    pub(super) fn broadcast_heartbeat(&mut self, core: &mut Core) {
        self.heartbeat_due = core.now + core.cfg.heartbeat_ticks;
        let (ballot, read_round, commit) = (self.ballot, self.read_round, core.committed);
        for peer in core.peers() {
            core.send(
                peer,
                Message::Heartbeat {
                    ballot,
                    commit,
                    read_round,
                },
            );
        }
    }

    /// Serves a follower's request for chosen slots `from_slot..=to_slot`.
    ///
    /// Rule: slots at or below our compacted index have no vote here any
    /// more; a follower that needs one is told to fetch our snapshot
    /// (`SnapshotAvailable`) instead, and asks again from past it.
    ///
    /// Rule (a learner rejoining): every piece echoes the request's `nonce`
    /// and says the highest slot proposed so far; if nothing is in flight or
    /// queued, a no-op is proposed right after answering, so that a slot
    /// proposed after the learner's recovery began gets chosen even in an
    /// idle cluster. With slots in flight, a no-op is owed: proposed once
    /// the window has room, unless a command took a slot after them first
    /// (else a cluster that goes idle never proposes the learner's slot).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_catch_up_request(
        &mut self,
        core: &mut Core,
        from: NodeId,
        ballot: Ballot,
        from_slot: Slot,
        to_slot: Slot,
        nonce: Option<u64>,
    ) {
        if self.ballot != ballot {
            return;
        }
        let compacted = core.acceptor.compacted();
        if from_slot <= compacted {
            let index = compacted;
            core.send(from, Message::SnapshotAvailable { ballot, index });
            return;
        }
        // Only slots known chosen are sent: up to our commit index.
        let last = to_slot
            .min(core.committed)
            .min(from_slot.saturating_add(core.cfg.max_catch_up as u64 - 1));
        let entries = (from_slot.max(1)..=last)
            .map_while(|slot| core.acceptor.vote(slot).map(|(_, v)| (slot, v.clone())));
        // In pieces each within the byte cap, but never empty: a value alone
        // always fits (Config::validate).
        let (budget, commit) = (core.cfg.entry_budget(), core.committed);
        let mut pieces = vec![Vec::new()];
        let mut bytes = 0;
        for (slot, value) in entries {
            let size = value.size_bound();
            let piece = pieces.last_mut().expect("at least one piece");
            if !piece.is_empty() && bytes + size > budget {
                pieces.push(Vec::new());
                bytes = 0;
            }
            bytes += size;
            pieces
                .last_mut()
                .expect("at least one piece")
                .push((slot, value));
        }
        let count = pieces.len();
        let proposed = self.next_slot - 1;
        for (i, entries) in pieces.into_iter().enumerate() {
            let more = i + 1 < count;
            core.send(
                from,
                Message::CatchUp {
                    ballot,
                    entries,
                    commit,
                    more,
                    nonce,
                    proposed,
                },
            );
        }
        if nonce.is_some()
            && self.in_flight.is_empty()
            && self.queued.is_empty()
            && self.recovery_done()
            && self.in_window(core, self.next_slot)
        {
            let slot = self.next_slot;
            self.next_slot = slot.checked_add(1).expect("slot numbers ran out");
            self.propose_at(core, slot, Value::Noop);
        } else if nonce.is_some() {
            self.owed_slot_after = self.owed_slot_after.max(Some(proposed));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paxos::testing::{Net, batch, campaign, cmd, only, small_messages};
    use crate::paxos::{HandOffError, NotLeader, Role};

    /// The messages of `ready` (sent at once) to `to`.
    fn sent_to(ready: &crate::paxos::Ready, to: NodeId) -> Vec<&Message> {
        ready
            .messages
            .iter()
            .filter(|e| e.to == to)
            .map(|e| &e.msg)
            .collect()
    }

    #[test]
    fn a_hand_off_picks_the_follower_that_accepted_the_highest_slot_and_tells_it_alone() {
        let mut net = Net::new(3);
        net.elect(1);
        let ballot = net.node(1).status().promised;
        // Replica 3 misses slot 1: replica 2 is the more caught up.
        net.cut.insert(3);
        net.node(1).propose(cmd("x")).unwrap();
        net.run();
        net.cut.clear();
        let leader = net.node(1);
        assert_eq!(leader.hand_off(), Ok(2));
        assert_eq!(leader.status().handing_off, Some(2));
        let ready = leader.take_ready();
        assert_eq!(sent_to(&ready, 2), vec![&Message::TimeoutNow { ballot }]);
        assert!(sent_to(&ready, 3).is_empty());
    }

    #[test]
    fn a_leader_handing_off_gives_no_new_slot_and_hands_back_what_it_queued() {
        let mut net = Net::new(3);
        net.elect(1);
        let leader = net.node(1);
        leader.propose(cmd("queued")).unwrap();
        leader.hand_off().unwrap();
        let ready = leader.take_ready();
        assert_eq!(
            ready.dropped,
            vec![cmd("queued")],
            "certainly not in the log"
        );
        assert!(ready.persist.entries.is_empty(), "no slot given");
        let none = Err(NotLeader { leader: None });
        assert_eq!(
            leader.propose(cmd("late")),
            none,
            "wait for the next leader"
        );
        assert_eq!(leader.read(9), none);
        assert!(leader.is_leader(), "still leading until a higher ballot");
    }

    #[test]
    fn a_hand_off_elects_the_target_at_once_under_a_higher_ballot_keeping_every_chosen_slot() {
        let mut net = Net::new(3);
        net.elect(1);
        let old = net.node(1).status().promised;
        for c in ["a", "b", "c"] {
            net.node(1).propose(cmd(c)).unwrap();
        }
        net.run();
        let target = net.node(1).hand_off().unwrap();
        // No tick: neither the old leader nor the third replica waits out
        // an election timeout before promising the target.
        net.run();
        assert!(net.node(target).is_leader());
        let new = net.node(target).status().promised;
        assert!(new > old);
        for id in 1..=3 {
            assert_eq!(net.node(id).status().promised, new, "replica {id}");
        }
        assert!(!net.node(1).is_leader());
        assert_eq!(net.chosen[&target][0], (1, batch(&["a", "b", "c"])));
        net.node(target).propose(cmd("d")).unwrap();
        net.run();
        for _ in 0..net.node(target).config().heartbeat_ticks {
            net.tick_all();
        }
        assert_eq!(net.node(1).leader(), Some(target));
        assert_eq!(net.node(1).committed(), 2);
    }

    #[test]
    fn a_hand_off_whose_target_never_takes_over_lapses_and_the_leader_resumes() {
        let mut net = Net::new(3);
        net.elect(1);
        let ballot = net.node(1).status().promised;
        let target = net.node(1).hand_off().unwrap();
        // The TimeoutNow is lost: the target is cut off.
        net.cut.insert(target);
        net.run();
        let ticks = HAND_OFF_ELECTIONS * net.node(1).config().election_ticks;
        for _ in 0..ticks - 1 {
            net.tick_all();
        }
        assert_eq!(net.node(1).status().handing_off, Some(target));
        assert!(net.node(1).propose(cmd("x")).is_err());
        net.tick_all();
        let leader = net.node(1);
        assert!(leader.is_leader());
        assert_eq!(leader.status().promised, ballot, "the same leadership");
        assert_eq!(leader.status().handing_off, None);
        leader.propose(cmd("x")).unwrap();
        net.run();
        assert_eq!(net.node(1).committed(), 1);
    }

    #[test]
    fn a_hand_off_needs_a_leader_and_a_follower_heard_within_an_election_timeout() {
        let mut net = Net::new(3);
        net.elect(1);
        assert_eq!(net.node(2).hand_off(), Err(HandOffError::NotLeader));
        net.cut.extend([2, 3]);
        for _ in 0..net.node(1).config().election_ticks {
            net.tick_all();
        }
        assert_eq!(net.node(1).status().role, Role::Leader);
        assert_eq!(net.node(1).hand_off(), Err(HandOffError::NoTarget));
        assert_eq!(net.node(1).status().handing_off, None);
    }

    #[test]
    fn a_learner_asking_while_slots_are_in_flight_gets_a_slot_proposed_after_them_even_when_idle() {
        let mut net = Net::new(3);
        net.elect(1);
        let ballot = net.node(1).status().promised;
        net.node(1).propose(cmd("a")).unwrap();
        // Slot 1 is in flight when a learner's request (with its nonce)
        // arrives: it must wait for a slot proposed after 1.
        net.flush(1);
        let request = Message::CatchUpRequest {
            ballot,
            from_slot: 1,
            to_slot: 0,
            nonce: Some(9),
        };
        net.node(1).step(3, request).unwrap();
        net.run();
        let proposed = net.delivered.iter().find_map(|(from, to, m)| match m {
            Message::CatchUp {
                nonce: Some(9),
                proposed,
                ..
            } if (*from, *to) == (1, 3) => Some(*proposed),
            _ => None,
        });
        assert_eq!(proposed, Some(1));
        // No client writes any more, yet slot 2 is proposed and chosen.
        for _ in 0..5 {
            net.tick_all();
        }
        assert_eq!(net.node(1).committed(), 2);
        assert_eq!(net.chosen[&1][1], (2, Value::Noop));
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
        leader
            .step(2, Message::Accepted { ballot, slot: 1 })
            .unwrap();
        assert!(leader.take_ready().chosen.is_empty());
        // Our own, delivered back after the sync, completes it.
        leader.step_own(Message::Accepted { ballot, slot: 1 });
        assert_eq!(leader.take_ready().chosen, vec![(1, batch(&["x"]))]);
    }

    #[test]
    fn a_slot_is_chosen_on_a_majority_under_the_same_ballot() {
        let mut net = Net::new(5);
        // Leading at round 5, after an older leadership of its own.
        net.restore(1, Ballot::new(4, 1), vec![]);
        net.elect(1);
        let leader = net.node(1);
        let ballot = leader.status().promised;
        leader.propose(cmd("x")).unwrap();
        leader.take_ready();
        leader.step_own(Message::Accepted { ballot, slot: 1 });
        leader
            .step(2, Message::Accepted { ballot, slot: 1 })
            .unwrap();
        // A vote under another (our own older) ballot, and a repeated
        // vote, do not count.
        leader
            .step(
                3,
                Message::Accepted {
                    ballot: Ballot::new(ballot.round - 1, 1),
                    slot: 1,
                },
            )
            .unwrap();
        leader
            .step(2, Message::Accepted { ballot, slot: 1 })
            .unwrap();
        assert!(leader.take_ready().chosen.is_empty());
        leader
            .step(4, Message::Accepted { ballot, slot: 1 })
            .unwrap();
        assert_eq!(leader.take_ready().chosen.len(), 1);
        assert_eq!(leader.committed(), 1);
    }

    #[test]
    fn the_commit_index_is_the_end_of_the_contiguous_chosen_prefix() {
        let mut net = Net::new(3);
        net.elect(1);
        let leader = net.node(1);
        leader.core.cfg.max_batch = 1;
        let ballot = leader.status().promised;
        for c in ["a", "b", "c"] {
            leader.propose(cmd(c)).unwrap();
        }
        leader.take_ready();
        for slot in [3, 2] {
            leader.step_own(Message::Accepted { ballot, slot });
            leader.step(2, Message::Accepted { ballot, slot }).unwrap();
        }
        assert!(leader.take_ready().chosen.is_empty());
        assert_eq!(leader.committed(), 0);
        leader.step_own(Message::Accepted { ballot, slot: 1 });
        leader
            .step(3, Message::Accepted { ballot, slot: 1 })
            .unwrap();
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
        leader.core.cfg.window = 2;
        leader.core.cfg.max_batch = 3;
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
        leader.step_own(Message::Accepted { ballot, slot: 1 });
        leader
            .step(2, Message::Accepted { ballot, slot: 1 })
            .unwrap();
        let ready = leader.take_ready();
        assert!(
            only(&ready, 3)
                .iter()
                .any(|m| matches!(m, Message::Accept { slot: 3, value, .. } if value.len() == 3))
        );
    }

    #[test]
    fn only_a_command_still_queued_can_be_withdrawn_and_it_never_gets_a_slot() {
        let mut net = Net::new(3);
        net.elect(1);
        let leader = net.node(1);
        leader.core.cfg.window = 1;
        leader.core.cfg.max_batch = 2;
        for c in ["a", "b", "c", "d"] {
            leader.propose(cmd(c)).unwrap();
        }
        // "a" and "b" take slot 1, which fills the window; "c", "d" wait.
        leader.take_ready();
        let withdrawn = leader.withdraw(|c| c == &cmd("a") || c == &cmd("c"));
        assert_eq!(withdrawn, vec![cmd("c")], "a has a slot: out of reach");
        assert_eq!(leader.status().queued, 1);
        net.run();
        for _ in 0..5 {
            net.tick_all();
        }
        let chosen: Vec<&Value> = net.chosen[&1].iter().map(|(_, v)| v).collect();
        assert_eq!(chosen, vec![&batch(&["a", "b"]), &batch(&["d"])]);
    }

    /// Replica 2's votes: `slots` under an older ballot of replica 3.
    fn old_votes(slots: impl IntoIterator<Item = Slot>) -> Vec<crate::paxos::Accepted> {
        slots
            .into_iter()
            .map(|slot| crate::paxos::Accepted {
                slot,
                ballot: Ballot::new(1, 3),
                value: batch(&[&slot.to_string()]),
            })
            .collect()
    }

    #[test]
    fn a_new_leader_proposes_what_it_recovered_a_window_at_a_time() {
        let mut net = Net::with_config(3, |cfg| cfg.window = 2);
        net.restore(2, Ballot::new(1, 3), old_votes(1..=7));
        net.elect(1);
        net.run();
        // Every accept lay within the window above the commit index it
        // carried, recovered slots included.
        let accepts: Vec<(Slot, Slot)> = net
            .delivered
            .iter()
            .filter_map(|(_, _, m)| match m {
                Message::Accept { slot, commit, .. } => Some((*slot, *commit)),
                _ => None,
            })
            .collect();
        assert!(!accepts.is_empty());
        assert!(
            accepts
                .iter()
                .all(|&(slot, commit)| commit < slot && slot - commit <= 2),
            "{accepts:?}"
        );
        let chosen: Vec<Slot> = net.chosen[&1].iter().map(|(s, _)| *s).collect();
        assert_eq!(chosen, (1..=7).collect::<Vec<_>>());
        assert_eq!(net.chosen[&1][6].1, batch(&["7"]));
    }

    #[test]
    fn a_vote_far_ahead_costs_a_new_leader_one_window_not_the_gap() {
        let far = 1 << 40;
        let mut net = Net::new(3);
        net.restore(2, Ballot::new(1, 3), old_votes([1, far]));
        net.restore(1, Ballot::new(1, 3), vec![]);
        // Replica 1 campaigns; only its own promise and replica 2's are
        // delivered, and nothing after.
        campaign(net.node(1));
        let ready = net.node(1).take_ready();
        for e in ready.persisted_messages {
            match e.to {
                1 => net.node(1).step_own(e.msg),
                2 => {
                    net.node(2).step(1, e.msg).unwrap();
                    for reply in net.node(2).take_ready().persisted_messages {
                        net.node(1).step(2, reply.msg).unwrap();
                    }
                }
                _ => {}
            }
        }
        let leader = net.node(1);
        assert!(leader.is_leader());
        leader.take_ready();
        // It recovered through `far`, but holds one window in flight.
        assert_eq!(leader.status().in_flight, leader.config().window);
        assert_eq!(leader.read(1), Ok(()));
        assert!(leader.take_ready().reads.is_empty(), "recovery is not over");
    }

    #[test]
    fn unanswered_accepts_are_sent_again() {
        let mut net = Net::new(3);
        net.elect(1);
        let leader = net.node(1);
        leader.propose(cmd("x")).unwrap();
        leader.take_ready(); // the accepts are lost
        for _ in 0..leader.core.cfg.resend_ticks {
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
        for _ in 0..2 * leader.core.cfg.election_ticks {
            leader.tick();
            leader.take_ready();
        }
        assert!(!leader.is_leader());
    }

    #[test]
    fn a_catch_up_larger_than_the_cap_goes_in_pieces_each_under_it() {
        let mut net = Net::with_config(3, small_messages);
        net.elect(1);
        net.cut.insert(3);
        for i in 1..=12u8 {
            net.node(1).propose(Bytes::from(vec![i; 900])).unwrap();
            net.run();
        }
        assert_eq!(net.node(1).committed(), 12);
        assert_eq!(net.node(3).committed(), 0);
        net.cut.clear();
        net.delivered.clear();
        net.node(1).tick();
        net.node(1).tick();
        net.run();
        // 12 values of 980 bytes (as estimated) make 11,760 bytes: over the
        // 3,000-byte cap, so they go two by two.
        let pieces: Vec<(usize, Vec<Slot>)> = net
            .delivered
            .iter()
            .filter_map(|(_, to, m)| match m {
                Message::CatchUp { entries, .. } if *to == 3 => {
                    Some((m.size_bound(), entries.iter().map(|e| e.0).collect()))
                }
                _ => None,
            })
            .collect();
        assert_eq!(pieces.len(), 6, "{pieces:?}");
        assert!(
            pieces
                .iter()
                .all(|(size, slots)| *size <= 3000 && !slots.is_empty())
        );
        let slots: Vec<Slot> = pieces.iter().flat_map(|p| p.1.clone()).collect();
        assert_eq!(slots, (1..=12).collect::<Vec<_>>());
        // The follower caught up through them.
        assert_eq!(net.node(3).committed(), 12);
        assert_eq!(net.chosen[&3], net.chosen[&1]);
    }

    #[test]
    fn the_pieces_of_a_catch_up_say_whether_more_follow() {
        let mut net = Net::with_config(3, small_messages);
        net.elect(1);
        net.cut.insert(3);
        net.node(1).propose(Bytes::from(vec![1; 1000])).unwrap();
        net.run();
        net.node(1).propose(Bytes::from(vec![2; 1000])).unwrap();
        net.node(1).propose(Bytes::from(vec![3; 1000])).unwrap();
        net.run();
        let leader = net.node(1);
        let ballot = leader.status().promised;
        leader
            .step(
                3,
                Message::CatchUpRequest {
                    ballot,
                    from_slot: 1,
                    to_slot: 3,
                    nonce: None,
                },
            )
            .unwrap();
        let pieces: Vec<(Vec<Slot>, bool)> = only(&leader.take_ready(), 3)
            .into_iter()
            .filter_map(|m| match m {
                Message::CatchUp { entries, more, .. } => {
                    Some((entries.iter().map(|e| e.0).collect(), *more))
                }
                _ => None,
            })
            .collect();
        assert_eq!(pieces, vec![(vec![1, 2], true), (vec![3], false)]);
    }

    #[test]
    fn a_leader_stepping_down_with_slots_in_flight_says_how_far_they_reach() {
        let mut net = Net::with_config(3, |cfg| cfg.max_batch = 1);
        net.elect(1);
        let leader = net.node(1);
        let ballot = leader.status().promised;
        for c in ["a", "b", "c"] {
            leader.propose(cmd(c)).unwrap();
        }
        leader.take_ready();
        leader.step_own(Message::Accepted { ballot, slot: 1 });
        leader
            .step(2, Message::Accepted { ballot, slot: 1 })
            .unwrap();
        let ready = leader.take_ready();
        assert_eq!(ready.chosen.len(), 1);
        assert_eq!(ready.abandoned_through, None, "still leading");
        leader.propose(cmd("d")).unwrap();
        let higher = Ballot::new(ballot.round + 1, 3);
        leader.step(3, Message::Nack { promised: higher }).unwrap();
        let ready = leader.take_ready();
        // Slots 2 and 3 may or may not be chosen yet; "d" never got a slot.
        assert_eq!(ready.abandoned_through, Some(3));
        assert_eq!(ready.dropped, vec![cmd("d")]);
        // A leader with nothing in flight leaves nothing unknown behind.
        let mut net = Net::new(3);
        net.elect(1);
        let higher = Ballot::new(net.node(1).status().promised.round + 1, 3);
        let leader = net.node(1);
        leader.step(3, Message::Nack { promised: higher }).unwrap();
        assert!(!leader.is_leader());
        assert_eq!(leader.take_ready().abandoned_through, None);
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

    #[test]
    fn a_leader_told_its_slots_are_compacted_fetches_and_drops_what_the_snapshot_covers() {
        let mut net = Net::with_config(3, |cfg| cfg.max_batch = 1);
        net.elect(1);
        let leader = net.node(1);
        let ballot = leader.status().promised;
        leader.propose(cmd("a")).unwrap();
        leader.propose(cmd("b")).unwrap();
        leader.take_ready();
        for slot in [1, 2] {
            leader.step_own(Message::Accepted { ballot, slot });
        }
        // Replica 2 had slot 1 chosen (from a snapshot) and compacted it.
        leader
            .step(2, Message::SnapshotAvailable { ballot, index: 1 })
            .unwrap();
        let ready = leader.take_ready();
        assert_eq!(
            ready.fetch_snapshot,
            Some(crate::paxos::SnapshotFetch {
                from: 2,
                min_index: 1
            })
        );
        leader.snapshot_installed(1);
        let ready = leader.take_ready();
        assert_eq!(ready.unknown_outcome, vec![cmd("a")]);
        assert!(ready.chosen.is_empty());
        assert_eq!(leader.committed(), 1);
        assert_eq!(leader.status().in_flight, 1);
        leader
            .step(2, Message::Accepted { ballot, slot: 2 })
            .unwrap();
        assert_eq!(leader.take_ready().chosen, vec![(2, batch(&["b"]))]);
        // A snapshot past everything proposed moves the pipeline past it.
        leader.snapshot_installed(10);
        leader.propose(cmd("c")).unwrap();
        let ready = leader.take_ready();
        assert!(
            only(&ready, 2)
                .iter()
                .any(|m| matches!(m, Message::Accept { slot: 11, .. }))
        );
    }
}
