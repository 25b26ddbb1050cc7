//! Elections: the pre-vote, phase 1 (prepare and promise), becoming leader,
//! stepping down, the election timer, leader stickiness, and the
//! follower's side of a leadership hand-off (`TimeoutNow`).
//!
//! # Hand-off
//!
//! A leader about to stop ([`Replica::hand_off`], in `leader.rs`) tells
//! the follower it picked to campaign now. That follower skips the pre-vote
//! and starts phase 1 at once, with a ballot above every one it has seen,
//! and its `Prepare` names the ballot of the leader that handed off
//! (`handed_off_by`). Leader stickiness (an acceptor hearing a live leader
//! ignores candidates) would make the other acceptors, and the old leader
//! itself, ignore that prepare for an election timeout; an acceptor whose
//! live leader is the one named answers it at once instead. Nothing else
//! differs from an election: phase 1 is ordinary Paxos, so safety never
//! depends on the hand-off, and a lost, duplicated or late `TimeoutNow`
//! costs at most one election (see `on_timeout_now`).

use std::collections::BTreeMap;

use super::leader::Leader;
use super::{Core, Leadership, Replica, State};
use crate::paxos::ballot::{Ballot, NodeId, Slot};
use crate::paxos::message::{Accepted, Message};
use crate::paxos::quorum::{self, Votes};
use crate::paxos::recovery::recover;

/// A follower whose election timer fired, asking whether a majority would
/// promise `ballot` before it asks for real (Raft's PreVote). Nothing is
/// persisted and no promise is raised for it anywhere, so a replica cut off
/// from the others can time out again and again without ever coming back
/// with a ballot that deposes a healthy leader.
#[derive(Debug)]
pub(super) struct PreCandidate {
    ballot: Ballot,
    grants: Votes,
}

impl PreCandidate {
    pub(super) fn check_invariants(&self, core: &Core) {
        assert_eq!(
            self.ballot.node, core.cfg.id,
            "a pre-vote's ballot is its own"
        );
        assert!(
            self.grants.contains(core.cfg.id),
            "a pre-candidate grants itself"
        );
    }
}

/// A replica running phase 1 for `ballot`.
#[derive(Debug)]
pub(super) struct Candidate {
    pub(super) ballot: Ballot,
    from_slot: Slot,
    /// Each acceptor's promise, as the chunks of it received so far, by the
    /// first slot each covers.
    promises: BTreeMap<NodeId, BTreeMap<Slot, PromiseChunk>>,
}

/// Part of an acceptor's promise: its votes for `from..=to_slot` (the key
/// in [`Candidate::promises`] is `from`), or from `from` on when `to_slot`
/// is `None`.
#[derive(Debug)]
struct PromiseChunk {
    to_slot: Option<Slot>,
    accepted: Vec<Accepted>,
    /// The acceptor's compacted index.
    snapshot: Slot,
}

/// Whether `chunks` cover every slot from `from_slot` on, without a gap.
fn covers_from(chunks: &BTreeMap<Slot, PromiseChunk>, from_slot: Slot) -> bool {
    let mut next = from_slot;
    for (&first, chunk) in chunks {
        if first > next {
            return false;
        }
        match chunk.to_slot {
            None => return true,
            Some(to) => next = next.max(to.saturating_add(1)),
        }
    }
    false
}

impl Candidate {
    pub(super) fn check_invariants(&self, core: &Core) {
        assert_eq!(
            self.ballot.node, core.cfg.id,
            "a candidate's ballot is its own"
        );
        assert!(
            self.ballot <= core.acceptor.promised(),
            "a candidate promised its own ballot to itself"
        );
    }
}

impl Replica {
    /// The election timer fired: ask the others whether they would promise
    /// the ballot we would use, changing nothing anywhere.
    pub(super) fn start_pre_vote(&mut self) {
        self.step_down();
        let core = &mut self.core;
        // No leader was heard for an election timeout: stop naming it, or
        // calls keep being sent to a leader that may be dead, for as long
        // as the pre-votes cannot win (as etcd's raft drops its leader on
        // becoming a pre-candidate). A live leader's next message restores it.
        core.leadership = None;
        let Some(round) = Ballot::next_round(core.highest_round()) else {
            return;
        };
        let ballot = Ballot::new(round, core.cfg.id);
        let mut grants = Votes::new();
        grants.insert(core.cfg.id);
        for peer in core.peers() {
            core.send(peer, Message::PreVote { ballot });
        }
        let majority = grants.is_majority(&core.cfg.members);
        self.state = State::PreCandidate(PreCandidate { ballot, grants });
        if majority {
            self.start_election(None);
        }
    }

    /// Rule: grant a pre-vote only when no live leader is heard (leader
    /// stickiness, as for prepares) and the ballot is above our promise.
    /// Nothing changes here either way. A replica that does not vote
    /// (unknown, learner) does not answer at all.
    pub(super) fn on_pre_vote(&mut self, from: NodeId, ballot: Ballot) {
        if !self.core.is_voter() {
            return;
        }
        let promised = self.core.acceptor.promised();
        if self.leader_is_alive() {
            let reply = Message::PreVoteReply {
                ballot,
                granted: false,
            };
            self.core.send(from, reply);
        } else if ballot <= promised {
            // Tell it the round to beat, as a prepare would learn.
            self.core.send(from, Message::Nack { promised });
        } else {
            let reply = Message::PreVoteReply {
                ballot,
                granted: true,
            };
            self.core.send(from, reply);
        }
    }

    /// Rule: only a majority of grants, ours included, starts phase 1.
    pub(super) fn on_pre_vote_reply(&mut self, from: NodeId, ballot: Ballot, granted: bool) {
        let State::PreCandidate(p) = &mut self.state else {
            return;
        };
        if p.ballot != ballot || !granted {
            return;
        }
        p.grants.insert(from);
        if p.grants.is_majority(&self.core.cfg.members) {
            self.start_election(None);
        }
    }

    /// Rule (hand-off): a `TimeoutNow` starts phase 1 at once only at a
    /// voting follower that still follows the leader of `ballot`, `from`
    /// (admission made sure `ballot` is `from`'s own), and has promised
    /// nothing above it. Anything else is stale and ignored: a duplicate
    /// after the election began (we are a candidate, or lead), one from a
    /// leadership that has since ended (we follow another ballot, or none),
    /// one overtaken by a higher promise. None of this matters for safety
    /// (phase 1 is ordinary Paxos, and the ballot is fresh); it only keeps a
    /// late hint from deposing a leader that is not handing off.
    pub(super) fn on_timeout_now(&mut self, from: NodeId, ballot: Ballot) {
        let core = &self.core;
        let follows = core
            .leadership
            .is_some_and(|l| l.id == from && l.ballot == ballot);
        if !matches!(self.state, State::Follower)
            || !core.is_voter()
            || !follows
            || core.acceptor.promised() != ballot
        {
            return;
        }
        self.core.handoff_elections += 1;
        self.start_election(Some(ballot));
    }

    /// Phase 1 for a ballot above every one seen, promised to ourselves
    /// first. `handed_off_by`: the ballot of the leader that handed off to
    /// us (`TimeoutNow`), carried on our prepares.
    pub(super) fn start_election(&mut self, handed_off_by: Option<Ballot>) {
        self.step_down();
        let core = &mut self.core;
        // No round left (which MAX_ROUND_JUMP makes unreachable): this
        // replica can no longer campaign, but still follows and votes.
        let Some(round) = Ballot::next_round(core.highest_round()) else {
            return;
        };
        core.elections += 1;
        let ballot = Ballot::new(round, core.cfg.id);
        let from_slot = core.first_unchosen();
        core.max_round_seen = round;
        core.leadership = None;
        self.state = State::Candidate(Candidate {
            ballot,
            from_slot,
            promises: BTreeMap::new(),
        });
        // Promise to ourselves first. Peers hear of the ballot only once that
        // promise is durable: a candidate that crashed after sending Prepare
        // must not come back and use the same ballot with other values.
        let core = &mut self.core;
        let id = core.cfg.id;
        // The round is above every one seen, our own promise included.
        let (change, votes) = core
            .acceptor
            .prepare(ballot, from_slot)
            .unwrap_or_else(|promised| panic!("own prepare {ballot} refused below {promised}"));
        assert!(change.promise_raised, "a new ballot raises our promise");
        core.persist_promise();
        let snapshot = core.acceptor.compacted();
        core.send_promise(id, ballot, from_slot, votes, snapshot);
        for peer in core.peers() {
            core.send_after_persist(
                peer,
                Message::Prepare {
                    ballot,
                    from_slot,
                    handed_off_by,
                },
            );
        }
    }

    pub(super) fn on_prepare(
        &mut self,
        from: NodeId,
        ballot: Ballot,
        from_slot: Slot,
        handed_off_by: Option<Ballot>,
    ) {
        // Rule: only a voter promises (or refuses: a non-voter's promise
        // means nothing, so neither does its Nack).
        if !self.core.is_voter() {
            return;
        }
        // Leader stickiness: while we hear a live leader, a candidate is
        // ignored altogether, so a replica that was cut off cannot depose a
        // healthy leader by coming back with a higher ballot.
        //
        // Rule (hand-off): except for a prepare that names, as the leader
        // that handed off to its sender, the very leadership we follow (or
        // hold): that leader asked for this election.
        let handed_off = handed_off_by.is_some_and(|h| {
            self.core
                .leadership
                .is_some_and(|l| l.ballot == h && h.node == l.id)
        });
        if from != self.core.cfg.id
            && self.leader_is_alive()
            && self.leader() != Some(from)
            && !handed_off
        {
            return;
        }
        self.observe(ballot);
        let core = &mut self.core;
        match core.acceptor.prepare(ballot, from_slot) {
            Ok((change, votes)) => {
                if change.promise_raised {
                    core.persist_promise();
                    core.leadership = None;
                    core.reset_election_timer();
                    // We help this candidate now rather than compete.
                    if let State::PreCandidate(_) = self.state {
                        self.state = State::Follower;
                    }
                }
                let snapshot = core.acceptor.compacted();
                core.send_promise(from, ballot, from_slot, votes, snapshot);
            }
            Err(promised) => core.send(from, Message::Nack { promised }),
        }
    }

    /// A chunk of `from`'s promise of `ballot`, covering `first..=to_slot`.
    /// Rule: an acceptor's promise counts once its chunks cover every slot
    /// from the prepare's `from_slot` on; a lost chunk means this election
    /// times out, and the next one asks again.
    pub(super) fn on_promise(
        &mut self,
        from: NodeId,
        ballot: Ballot,
        first: Slot,
        to_slot: Option<Slot>,
        accepted: Vec<Accepted>,
        snapshot: Slot,
    ) {
        let State::Candidate(c) = &mut self.state else {
            return;
        };
        if c.ballot != ballot {
            return;
        }
        let chunk = PromiseChunk {
            to_slot,
            accepted,
            snapshot,
        };
        c.promises.entry(from).or_default().insert(first, chunk);
        let from_slot = c.from_slot;
        let promised = |m| {
            c.promises
                .get(&m)
                .is_some_and(|p| covers_from(p, from_slot))
        };
        if quorum::is_majority(&self.core.cfg.members, promised) {
            self.become_leader();
        }
    }

    /// Rule (phase 1 across a compacted prefix): with `S` the highest
    /// snapshot index among the promises counted (ours included), every
    /// slot up to `S` is chosen, though no vote says with what. Recovery
    /// starts above `S`: re-proposing there (a reported vote, or a no-op
    /// where the vote was compacted away) could overwrite a chosen value.
    /// When `S` is past our commit index we lead anyway and fetch the
    /// snapshot from a replica that reported it; the commit index (and with
    /// it every read) waits for its install, and so does every proposal
    /// more than a window above it.
    fn become_leader(&mut self) {
        let State::Candidate(c) = std::mem::replace(&mut self.state, State::Follower) else {
            return;
        };
        let core = &mut self.core;
        let counted: Vec<(NodeId, &BTreeMap<Slot, PromiseChunk>)> = c
            .promises
            .iter()
            .filter(|(_, chunks)| covers_from(chunks, c.from_slot))
            .map(|(&id, chunks)| (id, chunks))
            .collect();
        let (snapshot, reporter) = counted
            .iter()
            .flat_map(|&(id, chunks)| chunks.values().map(move |chunk| (chunk.snapshot, id)))
            .max_by_key(|&(snapshot, id)| (snapshot, std::cmp::Reverse(id)))
            .unwrap_or((0, core.cfg.id));
        let above_snapshot = snapshot
            .checked_add(1)
            .expect("a reported snapshot is below u64::MAX");
        let from_slot = c.from_slot.max(core.first_unchosen()).max(above_snapshot);
        let votes = counted
            .iter()
            .flat_map(|(_, chunks)| chunks.values().map(|chunk| chunk.accepted.as_slice()));
        let recovered = recover(from_slot, votes);
        assert!(
            recovered
                .first_key_value()
                .is_none_or(|(&slot, _)| slot >= from_slot && slot > snapshot),
            "nothing below the first slot not known chosen, or at or below a reported \
             snapshot, is re-proposed"
        );
        // Every slot from `from_slot` to the last vote is re-proposed (a
        // no-op where none was reported), paced by the window.
        let recovered_through = recovered
            .last_key_value()
            .map_or(core.committed.max(snapshot), |(&slot, _)| slot);
        core.leadership = Some(Leadership {
            id: core.cfg.id,
            ballot: c.ballot,
            commit: core.committed,
        });
        if snapshot > core.committed {
            core.need_snapshot(reporter, snapshot, c.ballot);
        }
        let l = self.state.become_leader(Leader::new(
            core,
            c.ballot,
            from_slot,
            recovered_through,
            recovered,
        ));
        l.broadcast_heartbeat(core);
    }

    /// Any ballot above the one we lead or campaign with ends that at once.
    pub(super) fn observe(&mut self, ballot: Ballot) {
        self.core.max_round_seen = self.core.max_round_seen.max(ballot.round);
        let own = match &self.state {
            State::Leader(l) => l.ballot,
            State::Candidate(c) => c.ballot,
            State::PreCandidate(p) => p.ballot,
            State::Follower => return,
        };
        if ballot > own {
            self.step_down();
        }
    }

    /// Becomes a follower. As leader, hands back the commands that never got
    /// a slot and fails the reads it cannot serve any more.
    pub(super) fn step_down(&mut self) {
        if let State::Leader(l) = std::mem::replace(&mut self.state, State::Follower) {
            l.abandon(&mut self.core);
        }
        self.core.reset_election_timer();
    }

    pub(super) fn leader_is_alive(&self) -> bool {
        match self.state {
            State::Leader(_) => true,
            _ => {
                let core = &self.core;
                core.leadership.is_some()
                    && core.now < core.last_leader_contact + core.cfg.election_ticks
            }
        }
    }
}

impl State {
    /// Becomes the leader `l` and returns it.
    fn become_leader(&mut self, l: Leader) -> &mut Leader {
        *self = State::Leader(l);
        match self {
            State::Leader(l) => l,
            _ => unreachable!("just became leader"),
        }
    }
}

impl Replica {
    /// Follows `from`, the leader of `ballot`: a pre-candidate that hears a
    /// valid leader goes back to following it.
    pub(super) fn follow(&mut self, from: NodeId, ballot: Ballot) {
        if let State::PreCandidate(_) = self.state {
            self.state = State::Follower;
        }
        self.core.follow(from, ballot);
    }
}

impl Core {
    /// Sends `to` the promise of `ballot` with `votes` (every vote from
    /// `from_slot` on, in slot order), in chunks each within the byte cap
    /// (but never fewer than one vote per chunk), once it is durable.
    pub(super) fn send_promise(
        &mut self,
        to: NodeId,
        ballot: Ballot,
        from_slot: Slot,
        votes: Vec<Accepted>,
        snapshot: Slot,
    ) {
        let budget = self.cfg.entry_budget();
        let (mut first, mut chunk, mut bytes) = (from_slot, Vec::new(), 0);
        for vote in votes {
            debug_assert!(vote.slot >= first, "votes come in slot order");
            let size = vote.value.size_bound();
            if !chunk.is_empty() && bytes + size > budget {
                let to_slot = Some(vote.slot - 1);
                let accepted = std::mem::take(&mut chunk);
                let msg = Message::Promise {
                    ballot,
                    from_slot: first,
                    to_slot,
                    accepted,
                    snapshot,
                };
                self.send_after_persist(to, msg);
                (first, bytes) = (vote.slot, 0);
            }
            bytes += size;
            chunk.push(vote);
        }
        let msg = Message::Promise {
            ballot,
            from_slot: first,
            to_slot: None,
            accepted: chunk,
            snapshot,
        };
        self.send_after_persist(to, msg);
    }

    /// Accepts `from` as the leader of `ballot` and restarts the election timer.
    pub(super) fn follow(&mut self, from: NodeId, ballot: Ballot) {
        if self.leadership.map(|l| l.ballot) != Some(ballot) {
            self.forget_rejoin_slot_of_another_leadership(ballot);
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paxos::Value;
    use crate::paxos::testing::{Net, campaign, cmd, config, only, replica, small_messages};
    use crate::paxos::{NotLeader, Replica, Restore, Role};
    use bytes::Bytes;

    /// The prepares in `ready` (sent once its persist is durable).
    fn prepares(ready: &crate::paxos::Ready) -> Vec<&Message> {
        ready
            .persisted_messages
            .iter()
            .map(|e| &e.msg)
            .filter(|m| matches!(m, Message::Prepare { .. }))
            .collect()
    }

    #[test]
    fn a_timeout_now_from_the_leader_followed_starts_phase_1_at_once_naming_that_leader() {
        let mut net = Net::new(3);
        net.elect(1);
        let ballot = net.node(1).status().promised;
        let f = net.node(2);
        f.step(1, Message::TimeoutNow { ballot }).unwrap();
        assert_eq!(f.status().role, Role::Candidate, "no pre-vote first");
        let ready = f.take_ready();
        let new = ready
            .persist
            .promised
            .expect("promises its own ballot first");
        assert!(new > ballot && new.node == 2);
        let from_slot = 1;
        let prepare = Message::Prepare {
            ballot: new,
            from_slot,
            handed_off_by: Some(ballot),
        };
        assert_eq!(prepares(&ready), vec![&prepare, &prepare]);
    }

    #[test]
    fn a_duplicate_late_or_overtaken_timeout_now_is_ignored() {
        let mut net = Net::new(3);
        net.elect(1);
        let first = net.node(1).status().promised;
        let timeout_now = Message::TimeoutNow { ballot: first };
        // Duplicate: already campaigning.
        net.node(2).step(1, timeout_now.clone()).unwrap();
        net.node(2).step(1, timeout_now.clone()).unwrap();
        assert_eq!(net.node(2).status().elections, 1);
        net.run();
        assert!(net.node(2).is_leader());
        // Late: replica 3 now follows 2 under a higher ballot.
        net.tick_all();
        assert_eq!(net.node(3).leader(), Some(2));
        net.node(3).step(1, timeout_now.clone()).unwrap();
        assert_eq!(net.node(3).status().role, Role::Follower);
        assert!(prepares(&net.node(3).take_ready()).is_empty());
        // Overtaken: replica 3 still names 1 as leader but promised more.
        let mut net = Net::new(3);
        net.elect(1);
        let f = net.node(3);
        let higher = Ballot::new(first.round + 1, 2);
        for _ in 0..f.config().election_ticks {
            f.tick();
        }
        f.take_ready();
        let prepare = Message::Prepare {
            ballot: higher,
            from_slot: 1,
            handed_off_by: None,
        };
        f.step(2, prepare).unwrap();
        f.take_ready();
        f.step(1, timeout_now).unwrap();
        assert_eq!(f.status().elections, 0);
        assert!(prepares(&f.take_ready()).is_empty());
    }

    #[test]
    fn a_prepare_handed_off_by_the_leader_followed_is_answered_despite_stickiness_no_other() {
        let mut net = Net::new(3);
        net.elect(1);
        let ballot = net.node(1).status().promised;
        let prepare = |round, handed_off_by| Message::Prepare {
            ballot: Ballot::new(round, 3),
            from_slot: 1,
            handed_off_by,
        };
        // Handed off by another (made-up) leadership: stickiness holds.
        let f = net.node(2);
        let other = Ballot::new(ballot.round, 3);
        f.step(3, prepare(ballot.round + 1, Some(other))).unwrap();
        assert!(only(&f.take_ready(), 3).is_empty());
        assert_eq!(f.status().promised, ballot);
        // Handed off by the leader it follows: answered at once.
        f.step(3, prepare(ballot.round + 2, Some(ballot))).unwrap();
        assert!(matches!(
            only(&f.take_ready(), 3)[..],
            [Message::Promise { .. }]
        ));
        // The leader itself steps down for it too.
        let leader = net.node(1);
        leader
            .step(3, prepare(ballot.round + 3, Some(ballot)))
            .unwrap();
        assert!(!leader.is_leader());
        assert!(matches!(
            only(&leader.take_ready(), 3)[..],
            [Message::Promise { .. }]
        ));
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
    fn a_replica_whose_election_timer_fires_forgets_its_leader_even_if_it_cannot_win() {
        let mut net = Net::new(3);
        net.elect(1);
        // The leader and replica 3 are gone: replica 2's pre-votes go
        // unanswered, so it never starts phase 1. It must still stop naming
        // the dead leader, or its clients are sent there forever.
        let f = net.node(2);
        assert_eq!(f.leader(), Some(1));
        for _ in 0..2 * f.config().election_ticks {
            f.tick();
            f.take_ready();
        }
        assert_eq!(f.status().elections, 0, "no majority, no phase 1");
        assert_eq!(f.leader(), None);
        assert_eq!(
            f.propose(cmd("x")),
            Err(NotLeader { leader: None }),
            "callers are told no leader is known"
        );
    }

    #[test]
    fn a_candidate_sends_prepare_only_after_its_own_promise_is_durable() {
        let mut r = replica(1, 3);
        campaign(&mut r);
        assert_eq!(r.status().role, Role::Candidate);
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
    fn a_replica_with_no_round_left_stops_campaigning_instead_of_wrapping() {
        let last = Ballot::new(u64::MAX - 1, 2);
        let restore = Restore {
            promised: last,
            ..Restore::default()
        };
        let mut r = Replica::new(config(1, 3), restore).unwrap();
        for _ in 0..100 {
            r.tick();
        }
        assert_eq!(r.status().role, Role::Follower);
        assert_eq!(r.status().promised, last);
        assert!(r.take_ready().is_empty());
    }

    /// What replica 1 recovers, as a new leader, from replica 2, which holds
    /// large votes of earlier leaders, with messages capped at `cap` bytes;
    /// and the estimated sizes of the promise messages 2 sent.
    fn recover_large_votes(cap: usize) -> (Vec<(Slot, Value)>, Vec<usize>) {
        let mut net = Net::with_config(3, |cfg| {
            small_messages(cfg);
            cfg.max_message_bytes = cap;
        });
        let vote = |slot: Slot, ballot: Ballot, fill: u8| Accepted {
            slot,
            ballot,
            value: Value::Batch(vec![Bytes::from(vec![fill; 900])]),
        };
        let (older, newer) = (Ballot::new(1, 3), Ballot::new(2, 3));
        let votes = [1, 2, 5, 6, 9].map(|s| vote(s, older, s as u8)).to_vec();
        net.restore(2, newer, [votes, vec![vote(3, newer, 33)]].concat());
        net.elect(1);
        net.run();
        let promises = net
            .delivered
            .iter()
            .filter(|(from, to, m)| (*from, *to) == (2, 1) && matches!(m, Message::Promise { .. }))
            .map(|(_, _, m)| m.size_bound())
            .collect();
        (net.chosen[&1].clone(), promises)
    }

    #[test]
    fn a_promise_larger_than_the_cap_goes_in_chunks_and_recovers_the_same_values() {
        let (unsplit, sizes) = recover_large_votes(1 << 20);
        assert_eq!(sizes.len(), 1, "one promise of 6 votes");
        let (split, sizes) = recover_large_votes(3000);
        assert_eq!(sizes.len(), 3, "6 votes of 980 bytes, two by two");
        assert!(sizes.iter().all(|&size| size <= 3000), "{sizes:?}");
        assert_eq!(split, unsplit);
        let slots: Vec<Slot> = split.iter().map(|(s, _)| *s).collect();
        assert_eq!(slots, (1..=9).collect::<Vec<_>>());
        assert_eq!(split[2].1, Value::Batch(vec![Bytes::from(vec![33; 900])]));
        assert_eq!(split[3].1, Value::Noop, "a gap is filled with a no-op");
    }

    #[test]
    fn a_promise_counts_only_once_its_chunks_cover_every_slot_from_the_prepares_on() {
        let mut r = replica(1, 3);
        campaign(&mut r);
        assert_eq!(r.status().role, Role::Candidate);
        let ballot = r.status().promised;
        for e in r.take_ready().persisted_messages {
            if e.to == 1 {
                r.step_own(e.msg);
            }
        }
        let chunk = |from_slot, to_slot| Message::Promise {
            ballot,
            from_slot,
            to_slot,
            accepted: Vec::new(),
            snapshot: 0,
        };
        r.step(2, chunk(1, Some(4))).unwrap();
        r.step(2, chunk(7, None)).unwrap();
        assert_eq!(
            r.status().role,
            Role::Candidate,
            "slots 5 and 6 are missing"
        );
        r.step(2, chunk(5, Some(6))).unwrap();
        assert!(r.is_leader());
    }

    fn vote(slot: Slot, ballot: Ballot, s: &str) -> Accepted {
        Accepted {
            slot,
            ballot,
            value: crate::paxos::testing::batch(&[s]),
        }
    }

    #[test]
    fn a_promise_reports_the_compacted_index_and_no_vote_at_or_below_it() {
        let old = Ballot::new(1, 1);
        let restore = Restore {
            promised: old,
            votes: vec![vote(4, old, "four"), vote(5, old, "five")],
            applied: 4,
            snapshot: 4,
            ..Restore::default()
        };
        let mut r = Replica::new(config(2, 3), restore).unwrap();
        let ballot = Ballot::new(2, 3);
        r.step(
            3,
            Message::Prepare {
                ballot,
                from_slot: 1,
                handed_off_by: None,
            },
        )
        .unwrap();
        let ready = r.take_ready();
        assert_eq!(
            only(&ready, 3),
            vec![&Message::Promise {
                ballot,
                from_slot: 1,
                to_slot: None,
                accepted: vec![vote(5, old, "five")],
                snapshot: 4,
            }]
        );
    }

    /// Replica 1 (commit index 0, a stale vote for slot 3) is elected with
    /// the promise of replica 2, which compacted through slot 5 and voted
    /// for slot 6; replica 3 is cut off.
    fn leader_behind_a_snapshot() -> Net {
        let old = Ballot::new(1, 3);
        let mut net = Net::new(3);
        let r2 = Restore {
            promised: old,
            votes: vec![vote(4, old, "stale4"), vote(6, old, "six")],
            applied: 5,
            snapshot: 5,
            ..Restore::default()
        };
        net.nodes.insert(2, Replica::new(config(2, 3), r2).unwrap());
        let r1 = Restore {
            promised: old,
            votes: vec![vote(3, old, "stale3")],
            ..Restore::default()
        };
        net.nodes.insert(1, Replica::new(config(1, 3), r1).unwrap());
        net.cut.insert(3);
        net.elect(1);
        net
    }

    #[test]
    fn a_new_leader_never_re_proposes_at_or_below_a_reported_snapshot() {
        let net = leader_behind_a_snapshot();
        let ballot = net.nodes[&1].status().promised;
        let accepts: Vec<(Slot, Value)> = net
            .delivered
            .iter()
            .filter_map(|(_, _, m)| match m {
                Message::Accept { slot, value, .. } => Some((*slot, value.clone())),
                _ => None,
            })
            .collect();
        // Slots 1 to 5 are chosen (replica 2 compacted them): neither the
        // stale votes for 3 and 4 nor no-ops go there.
        assert_eq!(
            accepts,
            vec![(6, crate::paxos::testing::batch(&["six"]))],
            "under {ballot}"
        );
        assert!(net.nodes[&1].is_leader());
    }

    #[test]
    fn a_leader_behind_a_reported_snapshot_fetches_it_and_commits_only_once_it_is_installed() {
        let mut net = leader_behind_a_snapshot();
        assert_eq!(
            net.fetches,
            vec![(
                1,
                crate::paxos::SnapshotFetch {
                    from: 2,
                    min_index: 5
                }
            )]
        );
        // Slot 6 has a majority under our ballot, but slots 1 to 5 are
        // known only to the snapshot: no commit, no read.
        net.node(1).read(7).unwrap();
        net.run();
        assert_eq!(net.node(1).committed(), 0);
        assert!(net.reads.is_empty());
        assert!(net.chosen.get(&1).is_none_or(Vec::is_empty));
        // Asked again, rate-limited, while still needed.
        for _ in 0..net.node(1).config().catch_up_ticks {
            net.tick_all();
        }
        assert_eq!(net.fetches.len(), 2);
        // Installed: the commit index runs on through slot 6, which alone
        // is handed out; the read is served.
        net.node(1).snapshot_installed(5);
        net.run();
        assert_eq!(net.node(1).committed(), 6);
        assert_eq!(net.node(1).status().compacted, 5);
        assert_eq!(
            net.chosen[&1],
            vec![(6, crate::paxos::testing::batch(&["six"]))]
        );
        net.tick_all();
        assert_eq!(net.reads, vec![(7, 6)]);
        // No more fetches once it is installed.
        let fetches = net.fetches.len();
        for _ in 0..3 * net.node(1).config().catch_up_ticks {
            net.tick_all();
        }
        assert_eq!(net.fetches.len(), fetches);
    }

    #[test]
    fn a_replica_cut_off_for_long_neither_raises_its_promise_nor_deposes_the_leader() {
        let mut net = Net::new(3);
        net.elect(1);
        let ballot = net.node(1).status().promised;
        net.cut.insert(3);
        // Ten of the longest election timeouts.
        for _ in 0..10 * 2 * net.node(3).config().election_ticks {
            net.tick_all();
        }
        assert_eq!(net.node(3).status().promised, ballot);
        assert!(net.node(3).take_ready().persist.is_empty());
        net.cut.clear();
        for _ in 0..2 * net.node(3).config().election_ticks {
            net.tick_all();
        }
        assert!(net.node(1).is_leader());
        for id in 1..=3 {
            assert_eq!(net.node(id).leader(), Some(1), "replica {id}");
            assert_eq!(net.node(id).status().promised, ballot, "replica {id}");
        }
    }

    #[test]
    fn a_pre_vote_is_granted_only_without_a_live_leader_and_above_the_promise_and_changes_nothing()
    {
        let mut net = Net::new(3);
        // Leading at round 5, so that there are rounds below the promise.
        net.restore(1, Ballot::new(4, 1), vec![]);
        net.elect(1);
        let promised = net.node(2).status().promised;
        let f = net.node(2);
        let above = Ballot::new(promised.round + 1, 3);
        let pre_vote = |ballot| Message::PreVote { ballot };
        let reply = |granted| Message::PreVoteReply {
            ballot: above,
            granted,
        };
        // Its leader is alive: refused.
        f.step(3, pre_vote(above)).unwrap();
        assert_eq!(only(&f.take_ready(), 3), vec![&reply(false)]);
        // Once the leader has been silent for an election timeout: granted,
        // but nothing is promised, persisted, or forgotten.
        for _ in 0..f.config().election_ticks {
            f.tick();
        }
        f.take_ready();
        f.step(3, pre_vote(above)).unwrap();
        let ready = f.take_ready();
        assert_eq!(only(&ready, 3), vec![&reply(true)]);
        assert!(ready.persist.is_empty());
        assert_eq!(f.status().promised, promised);
        assert_eq!(f.leader(), Some(1));
        // Not above the promise: the pre-candidate learns what to beat.
        f.step(3, pre_vote(Ballot::new(promised.round - 1, 3)))
            .unwrap();
        assert_eq!(only(&f.take_ready(), 3), vec![&Message::Nack { promised }]);
    }

    #[test]
    fn a_pre_candidate_that_hears_the_leader_goes_back_to_following() {
        let mut net = Net::new(3);
        net.elect(1);
        net.cut.insert(3);
        while !matches!(net.node(3).state, State::PreCandidate(_)) {
            net.tick_all();
        }
        net.cut.clear();
        net.node(1).tick();
        net.node(1).tick();
        net.run();
        assert!(matches!(net.node(3).state, State::Follower));
        assert_eq!(net.node(3).leader(), Some(1));
    }

    #[test]
    fn a_real_election_still_happens_when_the_leader_is_gone() {
        let mut net = Net::new(3);
        net.elect(1);
        let old = net.node(1).status().promised;
        net.cut.insert(1);
        for _ in 0..10 * 2 * net.node(2).config().election_ticks {
            net.tick_all();
        }
        let leader = net.node(2).leader().expect("a new leader");
        assert!(leader == 2 || leader == 3);
        assert_eq!(net.node(3).leader(), Some(leader));
        assert!(net.node(leader).status().promised > old);
    }

    #[test]
    fn a_higher_ballot_makes_the_leader_step_down_and_hand_back_its_queue() {
        let mut net = Net::new(3);
        net.elect(1);
        let leader = net.node(1);
        let ballot = leader.status().promised;
        leader.propose(cmd("queued")).unwrap();
        leader.read(7).unwrap();
        leader
            .step(
                3,
                Message::Nack {
                    promised: Ballot::new(ballot.round + 1, 3),
                },
            )
            .unwrap();
        assert!(!leader.is_leader());
        assert_eq!(leader.propose(cmd("late")), Err(NotLeader { leader: None }));
        let ready = leader.take_ready();
        assert_eq!(ready.dropped, vec![cmd("queued")]);
        assert_eq!(ready.failed_reads, vec![7]);
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
                handed_off_by: None,
            },
        )
        .unwrap();
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
                handed_off_by: None,
            },
        )
        .unwrap();
        assert!(matches!(
            only(&f.take_ready(), 3)[..],
            [Message::Promise { .. }]
        ));
    }
}
