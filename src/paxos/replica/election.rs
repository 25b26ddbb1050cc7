//! Elections: phase 1 (prepare and promise), becoming leader, stepping down,
//! the election timer, and leader stickiness.

use std::collections::BTreeMap;

use super::leader::Leader;
use super::{Core, Leadership, Replica, State};
use crate::paxos::ballot::{Ballot, NodeId, Slot};
use crate::paxos::message::{Accepted, Message};
use crate::paxos::quorum;
use crate::paxos::recovery::recover;

/// A replica running phase 1 for `ballot`.
#[derive(Debug)]
pub(super) struct Candidate {
    pub(super) ballot: Ballot,
    from_slot: Slot,
    promises: BTreeMap<NodeId, Vec<Accepted>>,
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
    pub(super) fn start_election(&mut self) {
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
        core.send_after_persist(
            id,
            Message::Promise {
                ballot,
                accepted: votes,
            },
        );
        for peer in core.peers() {
            core.send_after_persist(peer, Message::Prepare { ballot, from_slot });
        }
    }

    pub(super) fn on_prepare(&mut self, from: NodeId, ballot: Ballot, from_slot: Slot) {
        // Leader stickiness: while we hear a live leader, a candidate is
        // ignored altogether, so a replica that was cut off cannot depose a
        // healthy leader by coming back with a higher ballot.
        if from != self.core.cfg.id && self.leader_is_alive() && self.leader() != Some(from) {
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
                }
                core.send_after_persist(
                    from,
                    Message::Promise {
                        ballot,
                        accepted: votes,
                    },
                );
            }
            Err(promised) => core.send(from, Message::Nack { promised }),
        }
    }

    pub(super) fn on_promise(&mut self, from: NodeId, ballot: Ballot, accepted: Vec<Accepted>) {
        let State::Candidate(c) = &mut self.state else {
            return;
        };
        if c.ballot != ballot {
            return;
        }
        c.promises.insert(from, accepted);
        if quorum::is_majority(&self.core.cfg.members, |m| c.promises.contains_key(&m)) {
            self.become_leader();
        }
    }

    fn become_leader(&mut self) {
        let State::Candidate(c) = std::mem::replace(&mut self.state, State::Follower) else {
            return;
        };
        let core = &mut self.core;
        let from_slot = c.from_slot.max(core.first_unchosen());
        let recovered = recover(from_slot, c.promises.values().map(Vec::as_slice));
        let recovered_through = recovered.last().map_or(core.committed, |&(slot, _)| slot);
        assert!(
            recovered.first().is_none_or(|&(slot, _)| slot == from_slot),
            "recovery re-proposes every slot from the first one not known chosen"
        );
        core.leadership = Some(Leadership {
            id: core.cfg.id,
            ballot: c.ballot,
            commit: core.committed,
        });
        let l = self
            .state
            .become_leader(Leader::new(core, c.ballot, recovered_through));
        for (slot, value) in recovered {
            l.propose_at(core, slot, value);
        }
        l.broadcast_heartbeat(core);
    }

    /// Any ballot above the one we lead or campaign with ends that at once.
    pub(super) fn observe(&mut self, ballot: Ballot) {
        self.core.max_round_seen = self.core.max_round_seen.max(ballot.round);
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

impl Core {
    /// Accepts `from` as the leader of `ballot` and restarts the election timer.
    pub(super) fn follow(&mut self, from: NodeId, ballot: Ballot) {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paxos::testing::{Net, cmd, config, only, replica};
    use crate::paxos::{NotLeader, Replica, Role};

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
    fn a_replica_with_no_round_left_stops_campaigning_instead_of_wrapping() {
        let last = Ballot::new(u64::MAX - 1, 2);
        let mut r = Replica::new(config(1, 3), last, Vec::new(), 0).unwrap();
        for _ in 0..100 {
            r.tick();
        }
        assert_eq!(r.status().role, Role::Follower);
        assert_eq!(r.status().promised, last);
        assert!(r.take_ready().is_empty());
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
            },
        )
        .unwrap();
        assert!(matches!(
            only(&f.take_ready(), 3)[..],
            [Message::Promise { .. }]
        ));
    }
}
