//! The follower's side of phase 2: accepting, following the leader's
//! heartbeats, learning which slots are chosen, and catching up on the ones
//! it missed.

use super::{Core, Replica};
use crate::paxos::ballot::{Ballot, NodeId, Slot};
use crate::paxos::message::{Message, Value};

impl Replica {
    pub(super) fn on_accept(
        &mut self,
        from: NodeId,
        ballot: Ballot,
        slot: Slot,
        value: Value,
        commit: Slot,
    ) {
        self.observe(ballot);
        let core = &mut self.core;
        match core.acceptor.accept(ballot, slot, &value) {
            Ok(change) => {
                if change.promise_raised {
                    core.persist_promise();
                }
                if change.vote_changed {
                    core.persist_vote(slot, ballot, &value);
                }
                core.send_after_persist(from, Message::Accepted { ballot, slot });
                self.follow(from, ballot);
                let core = &mut self.core;
                core.learn_commit(ballot, commit);
            }
            Err(promised) => core.send(from, Message::Nack { promised }),
        }
    }

    pub(super) fn on_heartbeat(
        &mut self,
        from: NodeId,
        ballot: Ballot,
        commit: Slot,
        read_round: u64,
    ) {
        if !self.hear_leader(from, ballot) {
            return;
        }
        let core = &mut self.core;
        core.learn_commit(ballot, commit);
        let committed = core.committed;
        core.send_after_persist(
            from,
            Message::HeartbeatAck {
                ballot,
                read_round,
                committed,
            },
        );
    }

    /// A leader's heartbeat or catch-up arrived: refused below our promise
    /// (the sender learns it, `Nack`); otherwise the promise rises to the
    /// leader's ballot (persisted) and we follow it. Returns whether we do.
    fn hear_leader(&mut self, from: NodeId, ballot: Ballot) -> bool {
        self.observe(ballot);
        let core = &mut self.core;
        match core.acceptor.follow(ballot) {
            Ok(raised) => {
                if raised {
                    core.persist_promise();
                }
                self.follow(from, ballot);
                true
            }
            Err(promised) => {
                core.send(from, Message::Nack { promised });
                false
            }
        }
    }

    pub(super) fn on_catch_up(
        &mut self,
        from: NodeId,
        ballot: Ballot,
        entries: Vec<(Slot, Value)>,
        commit: Slot,
        more: bool,
    ) {
        if !self.hear_leader(from, ballot) {
            return;
        }
        let core = &mut self.core;
        for (slot, value) in entries {
            // A vote under the leader's ballot is the value it proposed, so
            // it is the chosen one that it reports.
            debug_assert!(
                core.acceptor
                    .vote(slot)
                    .is_none_or(|(b, v)| b != ballot || *v == value),
                "leader {ballot} reports for slot {slot} a value other than it proposed"
            );
            if slot > core.committed && core.acceptor.learn(ballot, slot, &value) {
                core.persist_vote(slot, ballot, &value);
            }
        }
        // The whole answer is in: ask for more at once if need be.
        if !more {
            core.catch_up_sent_at = None;
        }
        core.learn_commit(ballot, commit);
    }
}

impl Core {
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
            let slot = self.first_unchosen();
            match self.acceptor.vote(slot) {
                Some((b, value)) if b == ballot => {
                    let value = value.clone();
                    self.choose(slot, value);
                }
                _ => break,
            }
        }
        self.request_catch_up();
    }

    /// Asks the leader for the chosen slots we miss, at most once per
    /// `catch_up_ticks`.
    pub(super) fn request_catch_up(&mut self) {
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
                from_slot: self.first_unchosen(),
                to_slot: leadership.commit,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paxos::testing::{Net, batch, cmd, only, replica};

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
        )
        .unwrap();
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
        )
        .unwrap();
        f.step(
            1,
            Message::Heartbeat {
                ballot: old,
                commit: 0,
                read_round: 0,
            },
        )
        .unwrap();
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
        )
        .unwrap();
        f.step(
            3,
            Message::Accept {
                ballot: new,
                slot: 2,
                value: batch(&["b"]),
                commit: 0,
            },
        )
        .unwrap();
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
        )
        .unwrap();
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
                more: false,
            },
        )
        .unwrap();
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
}
