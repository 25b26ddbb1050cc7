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
        // Rule: a non-voter never votes; a learner still follows the leader
        // and learns its commit index from the accept.
        if !self.core.is_voter() {
            if self.hear_leader(from, ballot) {
                self.core.learn_commit(ballot, commit);
            }
            return;
        }
        let core = &mut self.core;
        if slot <= core.acceptor.compacted() {
            self.on_accept_compacted(from, ballot, commit);
            return;
        }
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
        // Rule: a learner does not ack: its ack would count towards
        // confirming a leader for reads, and towards check-quorum.
        if !core.is_voter() {
            return;
        }
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

    /// Rule: an accept for a slot we have compacted gets no vote (one we
    /// could not report in a promise) and no `Accepted` (counting it without
    /// a vote could make a stale leader think its value chosen there). The
    /// slot is chosen and in our snapshot: we tell the leader so, and it may
    /// fetch the snapshot if it needs it. The accept still speaks for a
    /// leader at or above our promise, which we follow.
    fn on_accept_compacted(&mut self, from: NodeId, ballot: Ballot, commit: Slot) {
        if !self.hear_leader(from, ballot) {
            return;
        }
        let core = &mut self.core;
        let index = core.acceptor.compacted();
        core.send(from, Message::SnapshotAvailable { ballot, index });
        core.learn_commit(ballot, commit);
    }

    /// Rule: told that slots it needs are compacted at `from` (at or
    /// below `index`), a replica fetches `from`'s snapshot if it is still
    /// in the leadership of `ballot`: as a follower of it, when `from` is
    /// its leader; as its leader, from any acceptor.
    pub(super) fn on_snapshot_available(&mut self, from: NodeId, ballot: Ballot, index: Slot) {
        let core = &mut self.core;
        let Some(leadership) = core.leadership else {
            return;
        };
        if leadership.ballot != ballot || (leadership.id != core.cfg.id && leadership.id != from) {
            return;
        }
        core.need_snapshot(from, index, ballot);
    }

    /// A leader's heartbeat or catch-up arrived: refused below our promise
    /// (the sender learns it, `Nack`, unless we do not vote); otherwise the
    /// promise rises to the leader's ballot (persisted) and we follow it.
    /// Returns whether we do. An unknown replica follows no one: it must
    /// not write anything before it knows its membership.
    fn hear_leader(&mut self, from: NodeId, ballot: Ballot) -> bool {
        self.observe(ballot);
        let core = &mut self.core;
        if core.standing.membership().is_none() {
            return false;
        }
        match core.acceptor.follow(ballot) {
            Ok(raised) => {
                if raised {
                    core.persist_promise();
                }
                self.follow(from, ballot);
                true
            }
            Err(promised) => {
                if core.is_voter() {
                    core.send(from, Message::Nack { promised });
                }
                false
            }
        }
    }

    // The arguments are the message's fields, as for every other handler.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_catch_up(
        &mut self,
        from: NodeId,
        ballot: Ballot,
        entries: Vec<(Slot, Value)>,
        commit: Slot,
        more: bool,
        nonce: Option<u64>,
        proposed: Slot,
    ) {
        if !self.hear_leader(from, ballot) {
            return;
        }
        let core = &mut self.core;
        core.note_rejoin_slot(ballot, nonce, proposed);
        for (slot, value) in entries {
            // A vote under the leader's ballot is the value it proposed, so
            // it is the chosen one that it reports (a catch-up saying
            // otherwise was refused: `Refused::ConflictingValue`).
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
    pub(super) fn learn_commit(&mut self, ballot: Ballot, commit: Slot) {
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
    /// `catch_up_ticks`. A learner that has not yet been told its rejoin
    /// slot asks even when it misses nothing, with its nonce.
    pub(super) fn request_catch_up(&mut self) {
        let Some(leadership) = self.leadership else {
            return;
        };
        let rejoining = self.awaits_rejoin_slot();
        if leadership.id == self.cfg.id || (self.committed >= leadership.commit && !rejoining) {
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
                nonce: rejoining.then_some(self.nonce),
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paxos::SnapshotFetch;
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
                handed_off_by: None,
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
            to_slot: 2,
            nonce: None,
        }));
        // The leader's answer carries the chosen value, which wins.
        f.step(
            3,
            Message::CatchUp {
                ballot: new,
                entries: vec![(1, batch(&["chosen"]))],
                commit: 2,
                more: false,
                nonce: None,
                proposed: 2,
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

    /// Leader 1 committed slots 1 to 5 while replica 3 was cut off, and
    /// compacted through 3.
    fn follower_behind_a_compacted_leader() -> Net {
        let mut net = Net::new(3);
        net.elect(1);
        net.cut.insert(3);
        for c in ["a", "b", "c", "d", "e"] {
            net.node(1).propose(cmd(c)).unwrap();
            net.run();
        }
        assert_eq!(net.node(1).committed(), 5);
        net.node(1).compact(3);
        net.cut.clear();
        net
    }

    #[test]
    fn a_follower_asking_for_compacted_slots_fetches_a_snapshot_and_catches_up_past_it() {
        let mut net = follower_behind_a_compacted_leader();
        net.node(1).tick();
        net.node(1).tick();
        net.run();
        let told = net.delivered.iter().any(|(from, to, m)| {
            (*from, *to) == (1, 3) && matches!(m, Message::SnapshotAvailable { index: 3, .. })
        });
        assert!(told, "the leader says where the slots went");
        let fetch = SnapshotFetch {
            from: 1,
            min_index: 3,
        };
        assert_eq!(net.fetches, vec![(3, fetch)]);
        assert_eq!(net.node(3).committed(), 0);
        net.node(3).snapshot_installed(3);
        net.run();
        assert_eq!(net.node(3).committed(), 5);
        assert_eq!(net.node(3).status().compacted, 3);
        // Slots 1 to 3 came in the snapshot, not as chosen values.
        assert_eq!(net.chosen[&3], net.chosen[&1][3..].to_vec());
    }

    #[test]
    fn a_follower_asks_for_a_snapshot_again_at_most_once_per_catch_up_interval() {
        let mut net = follower_behind_a_compacted_leader();
        let every = net.node(3).config().catch_up_ticks;
        for _ in 0..3 * every {
            net.tick_all();
        }
        let asked: Vec<_> = net.fetches.iter().filter(|(id, _)| *id == 3).collect();
        assert!(
            (3..=4).contains(&asked.len()),
            "{} fetches in {} ticks",
            asked.len(),
            3 * every
        );
    }

    #[test]
    fn installing_a_snapshot_at_or_below_the_commit_index_is_ignored() {
        let mut net = Net::new(3);
        net.elect(1);
        net.node(1).propose(cmd("a")).unwrap();
        net.run();
        net.node(1).propose(cmd("b")).unwrap();
        net.run();
        net.tick_all();
        net.tick_all();
        let f = net.node(2);
        assert_eq!(f.committed(), 2);
        f.snapshot_installed(2);
        f.snapshot_installed(1);
        assert_eq!(f.status().compacted, 0);
        assert_eq!(f.committed(), 2);
        assert!(f.take_ready().is_empty());
    }

    #[test]
    fn an_accept_for_a_compacted_slot_gets_no_vote_and_points_the_leader_at_the_snapshot() {
        let mut f = replica(2, 3);
        let ballot = Ballot::new(1, 1);
        let accept = |slot, commit| Message::Accept {
            ballot,
            slot,
            value: batch(&["x"]),
            commit,
        };
        f.step(1, accept(1, 0)).unwrap();
        f.step(1, accept(2, 1)).unwrap();
        let heartbeat = Message::Heartbeat {
            ballot,
            commit: 2,
            read_round: 0,
        };
        f.step(1, heartbeat).unwrap();
        f.take_ready();
        assert_eq!(f.committed(), 2);
        f.compact(2);
        // The leader, not knowing, sends slot 2 again.
        f.step(1, accept(2, 1)).unwrap();
        let ready = f.take_ready();
        assert!(ready.persist.is_empty());
        assert_eq!(
            only(&ready, 1),
            vec![&Message::SnapshotAvailable { ballot, index: 2 }]
        );
    }
}
