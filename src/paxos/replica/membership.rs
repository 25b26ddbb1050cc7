//! Who votes: a new cluster's bootstrap, and a replica that lost its disk
//! rejoining as a non-voting learner.
//!
//! An acceptor's promises and votes are what Paxos stands on. One that
//! comes back with an empty data directory has forgotten them: were it to
//! answer prepares and accepts at once, a value chosen with its vote could
//! be overwritten, or a candidate that counted its lost promise could be
//! undercut. So a replica is in one of three standings:
//!
//! - **Unknown** (volatile): it started with nothing at all on disk, either
//!   at the start of life or after a wipe, and cannot tell which. It does
//!   not vote, grant pre-votes, or campaign. Every election timeout it sends
//!   `Probe { nonce }` to every peer; every replica answers
//!   `ProbeReply { nonce, fresh }`, `fresh` when it has no durable state
//!   (nothing promised, voted, chosen or compacted) and is not a learner.
//!   Once every peer answered fresh it becomes a **Voter**; as soon as one
//!   answers not fresh, a **Learner**. Either is persisted.
//! - **Learner** (durable): follows the leader it hears, learns the commit
//!   index, catches up (and fetches snapshots), but never promises, votes,
//!   grants a pre-vote, acks a heartbeat (its ack must not confirm a leader
//!   for reads), campaigns, or sends a `Nack` (its promise means nothing).
//!   Its promise may rise as it follows leaders: that only makes it refuse
//!   more later.
//! - **Voter** (durable): the full protocol.
//!
//! The nonce is a random `u64` per incarnation, given by the driver, so that
//! answers to an earlier incarnation's probes and catch-up requests, still
//! in flight, do not count.
//!
//! # Why Unknown → Voter on all-fresh answers is safe
//!
//! A replica gets its first durable state only from a promise (its own as a
//! candidate, or one it gives), an accept, a leader's heartbeat, or a
//! catch-up, and every one of these starts with some candidate promising
//! itself durably before it sends anything. Promises never go away (short of
//! a wipe). So if this replica had any state that mattered to anyone else,
//! some other replica holds durable state now, and answers not fresh. If
//! every peer is fresh, no peer holds a promise or vote, so nothing was ever
//! chosen and no phase 1 can count a promise this replica may have lost:
//! only its own candidacies (with no value accepted anywhere) could be
//! forgotten, and their in-flight prepares carry no values. (A cluster of
//! one has no peer to ask: it becomes a voter at once; a single replica
//! that loses its disk has lost the data, and nothing can tell.)
//!
//! It cannot deadlock with PreVote: a replica gets durable state only after
//! a majority of voters granted some pre-vote, so whenever anyone holds
//! state a majority are (or were, and still are unless wiped) voters, and
//! they elect leaders without the unknown and learner ones; and a new
//! cluster whose replicas all start Unknown finds everyone fresh (an Unknown
//! replica answers fresh) and becomes all voters. Bootstrap needs every
//! member to answer, though: a new cluster with a member down stays Unknown
//! until it is up.
//!
//! # The rejoin rule, and why a learner never reneges on a lost promise
//!
//! After Chandra, Griesemer and Redstone, "Paxos Made Live" (the section on
//! disk corruption): a replica that lost its state waits, as a non-voting
//! member, for one complete instance started after its recovery began.
//! Here: the learner's `CatchUpRequest` carries its nonce; the leader's
//! `CatchUp` echoes it and adds `proposed`, the highest slot it had
//! proposed so far. The first piece whose nonce matches fixes
//! `rejoin_at = proposed + 1` and the leader's ballot `B`. (A leader
//! proposes a no-op after such a request unless a command takes the next
//! slot first, so that a cluster that is or goes idle has a slot to wait
//! for.) The learner rejoins once `rejoin_at` is
//! committed here *and* the leader of `B` itself reported a commit index at
//! or past it (in an `Accept`, `Heartbeat` or `CatchUp` under `B`): then
//! `rejoin_at` is chosen under `B`, a slot `B`'s leader first proposed after
//! it answered the learner, so after its recovery began. It raises its
//! promise to at least `B`, becomes a voter, persists both in one sync, and
//! only then does any reply that votes go out. A commit index learned from
//! any other leadership does not count: if the learner starts following
//! another ballot before then, it drops `rejoin_at` and asks again with its
//! nonce, and the new leader's first matching answer fixes a new slot and
//! ballot.
//!
//! The danger is a ballot `P` the replica promised before it lost its disk,
//! counted in the phase 1 of a candidate `X`, while after rejoining the
//! replica accepts under some `Q < P` and helps choose a value that `X`'s
//! phase 1 could not see.
//!
//! **Three replicas, no timing assumption** (the learner `L`, the others
//! `A` and `C`). `rejoin_at` was chosen under `B` while `L` was a learner,
//! so the majority that accepted `B`'s proposal for it is exactly `{A, C}`.
//! `B`'s leader proposed `rejoin_at` only after it answered `L`'s request,
//! which `L` sent after the loss: so both `A` and `C` accepted under `B` at
//! `rejoin_at` after the loss. Some `Y` of `A`, `C` promised `P` before
//! the loss: if `X` is `A` or `C`, `X` itself, which promised `P` to itself
//! before sending the prepare that `L` answered before the loss; if `X` is
//! `L`'s own earlier incarnation, its candidacy ended with the loss, so the
//! other member of its majority promised before. From then on `Y` refuses
//! ballots below `P`, and it accepted under `B` after the loss: so
//! `P <= B`. (A `P` above `B`, used by a leader that then proposed at
//! `rejoin_at` before the loss, is exactly what this rules out: `Y` would
//! have refused `B`'s accept.) Now take any `Q < P <= B`. `L` voted nothing
//! as a learner, and on rejoining raised its promise to at least `B`, in
//! the same sync as its membership: so it never accepts under `Q`, and
//! nothing that `X`'s phase 1 could not see is chosen with its vote.
//!
//! **Five replicas or more.** The majority that accepted `rejoin_at` need
//! not include every other replica, so a phase 1 that counted `L`'s lost
//! promise can be completed with replicas that never saw the rejoin slot.
//! What rules it out is time: a candidate abandons its candidacy after an
//! election timeout (a new election uses a new ballot, and promises for the
//! old one are ignored), so a prepare sent before the disk was lost cannot
//! complete a phase 1 long after. The rejoin takes at least a probe round,
//! a catch-up round trip and a commit; we rely on that outlasting any
//! candidacy started before the loss, that is, on bounded message delay
//! and an election timeout well below the time a wiped replica takes to
//! restart and rejoin. This is an assumption, not a proof: a network that
//! delays a prepare by longer than that breaks it.

use super::{Core, Replica, State};
use crate::paxos::ballot::{Ballot, NodeId, Slot};
use crate::paxos::message::{Membership, Message};
use crate::paxos::quorum::Votes;

/// A replica's standing: see the module docs.
#[derive(Clone, Debug)]
pub(super) enum Standing {
    /// Started with an empty data directory; probing.
    Unknown {
        /// Peers that answered this incarnation's probes fresh.
        fresh: Votes,
    },
    /// Lost its disk (or may have); learning until it may rejoin.
    Learner {
        /// Fixed by the first catch-up answering this incarnation.
        rejoin: Option<Rejoin>,
    },
    Voter,
}

/// When a learner may vote again.
#[derive(Clone, Copy, Debug)]
pub(super) struct Rejoin {
    /// The first slot proposed after its recovery began.
    pub(super) at: Slot,
    /// The ballot of the leader that said so.
    pub(super) ballot: Ballot,
}

impl Standing {
    /// The standing a replica starts in: `None` is an empty data directory.
    pub(super) fn restore(membership: Option<Membership>) -> Standing {
        match membership {
            None => Standing::Unknown {
                fresh: Votes::new(),
            },
            Some(Membership::Learner) => Standing::Learner { rejoin: None },
            Some(Membership::Voter) => Standing::Voter,
        }
    }

    /// The durable membership (`None` while Unknown).
    pub(super) fn membership(&self) -> Option<Membership> {
        match self {
            Standing::Unknown { .. } => None,
            Standing::Learner { .. } => Some(Membership::Learner),
            Standing::Voter => Some(Membership::Voter),
        }
    }
}

impl Core {
    /// Whether this replica promises and votes.
    pub(super) fn is_voter(&self) -> bool {
        matches!(self.standing, Standing::Voter)
    }

    /// A learner that has not yet been told its rejoin slot.
    pub(super) fn awaits_rejoin_slot(&self) -> bool {
        matches!(self.standing, Standing::Learner { rejoin: None })
    }

    /// Rule: a replica is fresh when it holds no durable state at all and is
    /// not a learner. (A voter that has promised and voted nothing is fresh:
    /// it has nothing to lose.) In-memory state counts, so a promise still
    /// syncing already makes it not fresh.
    pub(super) fn is_fresh(&self) -> bool {
        self.acceptor.is_blank()
            && self.committed == 0
            && !matches!(self.standing, Standing::Learner { .. })
    }

    fn become_member(&mut self, membership: Membership) {
        self.standing = Standing::restore(Some(membership));
        self.ready.persist.membership = Some(membership);
        self.reset_election_timer();
    }

    /// Unknown, on an election timeout: asks every peer whether it holds
    /// any state.
    pub(super) fn probe(&mut self) {
        self.reset_election_timer();
        let nonce = self.nonce;
        for peer in self.peers() {
            self.send(peer, Message::Probe { nonce });
        }
        self.settle_unknown();
    }

    /// Every replica answers a probe, whatever its standing.
    pub(super) fn on_probe(&mut self, from: NodeId, nonce: u64) {
        let fresh = self.is_fresh();
        self.send(from, Message::ProbeReply { nonce, fresh });
    }

    /// Rule: only answers to this incarnation's probes count; one peer not
    /// fresh makes us a learner, every peer fresh a voter.
    pub(super) fn on_probe_reply(&mut self, from: NodeId, nonce: u64, fresh: bool) {
        if nonce != self.nonce {
            return;
        }
        let Standing::Unknown { fresh: answered } = &mut self.standing else {
            return;
        };
        if !fresh {
            self.become_member(Membership::Learner);
            return;
        }
        answered.insert(from);
        self.settle_unknown();
    }

    /// Unknown with every peer answered fresh (or none to ask): a voter.
    fn settle_unknown(&mut self) {
        if let Standing::Unknown { fresh } = &self.standing
            && self.cfg.peers().all(|p| fresh.contains(p))
        {
            self.become_member(Membership::Voter);
        }
    }

    /// Rule: the first catch-up piece from the leader of `ballot` that
    /// echoes this incarnation's nonce fixes the rejoin slot, the first one
    /// proposed after our recovery began. A piece answering an earlier
    /// incarnation (another nonce) fixes nothing.
    pub(super) fn note_rejoin_slot(&mut self, ballot: Ballot, nonce: Option<u64>, proposed: Slot) {
        if nonce != Some(self.nonce) || !self.awaits_rejoin_slot() {
            return;
        }
        let at = proposed
            .checked_add(1)
            .expect("a proposed slot is below u64::MAX");
        self.standing = Standing::Learner {
            rejoin: Some(Rejoin { at, ballot }),
        };
    }

    /// Rule: a learner that starts following another leadership than the
    /// one that fixed its rejoin slot forgets that slot, and has the new
    /// leader fix one (its next catch-up request carries the nonce again).
    /// Only the leader of the ballot that fixed the slot may say it chosen.
    pub(super) fn forget_rejoin_slot_of_another_leadership(&mut self, ballot: Ballot) {
        if let Standing::Learner { rejoin: Some(r) } = self.standing
            && r.ballot != ballot
        {
            self.standing = Standing::Learner { rejoin: None };
        }
    }

    /// Rule: a learner whose rejoin slot is committed here, and which the
    /// leader of the ballot that fixed it reported committed (so it is
    /// chosen under that ballot), raises its promise to at least that
    /// ballot and becomes a voter, both persisted in one sync before
    /// anything it votes goes out. A commit index learned from any other
    /// leadership does not count: that slot was dropped on following it.
    pub(super) fn rejoin_if_due(&mut self) {
        let Standing::Learner { rejoin: Some(r) } = self.standing else {
            return;
        };
        let chosen_under_b = self
            .leadership
            .is_some_and(|l| l.ballot == r.ballot && l.commit >= r.at);
        if self.committed < r.at || !chosen_under_b {
            return;
        }
        if self.acceptor.raise(r.ballot) {
            self.persist_promise();
        }
        self.max_round_seen = self.max_round_seen.max(r.ballot.round);
        self.become_member(Membership::Voter);
    }
}

impl Replica {
    /// What holds of the standing between any two inputs.
    pub(super) fn check_membership_invariants(&self) {
        let core = &self.core;
        if !core.is_voter() {
            assert!(
                matches!(self.state, State::Follower),
                "only voters campaign or lead"
            );
        }
        if let Standing::Unknown { .. } = core.standing {
            assert!(
                core.acceptor.is_blank() && core.committed == 0,
                "an unknown replica holds no state"
            );
            assert!(
                core.leadership.is_none(),
                "an unknown replica follows no one"
            );
        }
        if let Standing::Learner { rejoin: Some(r) } = core.standing {
            assert!(r.at > 0, "the rejoin slot is a slot");
            assert!(
                core.leadership.is_none_or(|l| l.ballot == r.ballot),
                "a rejoin slot is kept only under the leadership that fixed it"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paxos::message::Value;
    use crate::paxos::testing::{Net, batch, cmd, config, only};
    use crate::paxos::{NotLeader, Restore};

    fn restored(id: NodeId, membership: Option<Membership>, nonce: u64) -> Replica {
        let restore = Restore {
            membership,
            nonce,
            ..Restore::default()
        };
        Replica::new(config(id, 3), restore).unwrap()
    }

    /// Whether any message in `msgs` is a vote of some kind: a promise, an
    /// accept, a refusal, a heartbeat ack or a pre-vote answer.
    fn votes(msgs: &[&Message]) -> bool {
        msgs.iter().any(|m| {
            matches!(
                m,
                Message::Promise { .. }
                    | Message::Accepted { .. }
                    | Message::Nack { .. }
                    | Message::HeartbeatAck { .. }
                    | Message::PreVoteReply { .. }
                    | Message::PreVote { .. }
                    | Message::Prepare { .. }
            )
        })
    }

    #[test]
    fn unknown_replicas_of_a_new_cluster_all_become_voters_and_elect_a_leader() {
        let mut net = Net::new(3);
        for id in 1..=3 {
            let restore = Restore {
                membership: None,
                nonce: 100 + u64::from(id),
                ..Restore::default()
            };
            net.replace(id, restore);
        }
        let mut leader = None;
        for _ in 0..1000 {
            net.tick_all();
            leader = (1..=3).find(|&id| net.nodes[&id].is_leader());
            if leader.is_some() {
                break;
            }
        }
        let leader = leader.expect("a leader is elected");
        for id in 1..=3 {
            assert_eq!(net.node(id).status().membership, Some(Membership::Voter));
        }
        let mut persisted = net.memberships.clone();
        persisted.sort_by_key(|&(id, _)| id);
        assert_eq!(
            persisted,
            (1..=3)
                .map(|id| (id, Membership::Voter))
                .collect::<Vec<_>>()
        );
        net.node(leader).propose(cmd("x")).unwrap();
        net.run();
        assert_eq!(net.node(leader).committed(), 1);
    }

    #[test]
    fn only_replies_to_this_incarnations_probes_count() {
        let mut r = restored(1, None, 5);
        let reply = |nonce, fresh| Message::ProbeReply { nonce, fresh };
        r.step(2, reply(4, false)).unwrap();
        assert!(r.take_ready().persist.is_empty());
        r.step(2, reply(5, true)).unwrap();
        r.step(3, reply(4, true)).unwrap();
        assert_eq!(
            r.status().membership,
            None,
            "3 answered another incarnation"
        );
        assert!(r.take_ready().persist.is_empty());
        r.step(3, reply(5, true)).unwrap();
        assert_eq!(r.status().membership, Some(Membership::Voter));
        assert_eq!(r.take_ready().persist.membership, Some(Membership::Voter));
    }

    #[test]
    fn an_unknown_replica_becomes_a_learner_as_soon_as_one_peer_holds_state() {
        let mut r = restored(1, None, 5);
        r.step(
            2,
            Message::ProbeReply {
                nonce: 5,
                fresh: true,
            },
        )
        .unwrap();
        r.step(
            3,
            Message::ProbeReply {
                nonce: 5,
                fresh: false,
            },
        )
        .unwrap();
        assert_eq!(r.status().membership, Some(Membership::Learner));
        assert_eq!(r.take_ready().persist.membership, Some(Membership::Learner));
    }

    #[test]
    fn an_unknown_replica_probes_every_peer_each_election_timeout() {
        let mut r = restored(1, None, 5);
        let mut probes = 0;
        for _ in 0..4 * r.config().election_ticks {
            r.tick();
            let ready = r.take_ready();
            probes += ready
                .messages
                .iter()
                .filter(|e| e.msg == Message::Probe { nonce: 5 })
                .count();
        }
        // Timeouts are drawn in election_ticks..2 * election_ticks.
        assert!((4..=8).contains(&probes), "{probes} probes");
    }

    #[test]
    fn a_probe_is_answered_fresh_only_by_a_replica_with_no_state_that_is_not_a_learner() {
        let probe = Message::Probe { nonce: 9 };
        let fresh = |r: &mut Replica| {
            r.step(2, probe.clone()).unwrap();
            match only(&r.take_ready(), 2)[..] {
                [Message::ProbeReply { nonce: 9, fresh }] => *fresh,
                ref other => panic!("expected one probe reply, got {other:?}"),
            }
        };
        assert!(fresh(&mut restored(1, Some(Membership::Voter), 1)));
        assert!(fresh(&mut restored(1, None, 1)));
        assert!(!fresh(&mut restored(1, Some(Membership::Learner), 1)));
        // A promise, even one still syncing, is state.
        let mut voter = restored(1, Some(Membership::Voter), 1);
        let ballot = crate::paxos::Ballot::new(1, 3);
        voter
            .step(
                3,
                Message::Prepare {
                    ballot,
                    from_slot: 1,
                    handed_off_by: None,
                },
            )
            .unwrap();
        voter.take_ready();
        assert!(!fresh(&mut voter));
    }

    #[test]
    fn non_voters_never_promise_vote_refuse_ack_or_campaign() {
        let b = Ballot::new(3, 1);
        for membership in [None, Some(Membership::Learner)] {
            let mut r = restored(3, membership, 7);
            for _ in 0..5 * r.config().election_ticks {
                r.tick();
                let ready = r.take_ready();
                assert!(!votes(&only(&ready, 1)) && !votes(&only(&ready, 2)));
            }
            assert_eq!(r.status().elections, 0);
            let inputs = [
                (
                    2,
                    Message::PreVote {
                        ballot: Ballot::new(4, 2),
                    },
                ),
                (
                    2,
                    Message::Prepare {
                        ballot: Ballot::new(4, 2),
                        from_slot: 1,
                        handed_off_by: None,
                    },
                ),
                (
                    1,
                    Message::Heartbeat {
                        ballot: b,
                        commit: 0,
                        read_round: 1,
                    },
                ),
                (
                    1,
                    Message::Accept {
                        ballot: b,
                        slot: 1,
                        value: batch(&["x"]),
                        commit: 0,
                    },
                ),
                // Below the promise the heartbeat raised: no Nack either.
                (
                    2,
                    Message::Accept {
                        ballot: Ballot::new(2, 2),
                        slot: 1,
                        value: batch(&["y"]),
                        commit: 0,
                    },
                ),
            ];
            for (from, msg) in inputs {
                r.step(from, msg).unwrap();
                let ready = r.take_ready();
                assert!(
                    !votes(&only(&ready, 1)) && !votes(&only(&ready, 2)),
                    "{membership:?}: {ready:?}"
                );
                assert!(ready.persist.entries.is_empty(), "no vote is written");
            }
            assert_eq!(r.status().membership, membership);
            // Calls fail as on any follower, naming the leader it follows
            // (an unknown replica follows no one).
            let leader = membership.map(|_| 1);
            assert_eq!(r.propose(cmd("w")), Err(NotLeader { leader }));
            assert_eq!(r.read(1), Err(NotLeader { leader }));
        }
    }

    #[test]
    fn a_learner_votes_only_once_its_rejoin_slot_is_committed_and_persists_that_first() {
        let b = Ballot::new(4, 1);
        let mut r = restored(3, Some(Membership::Learner), 5);
        let heartbeat = |commit| Message::Heartbeat {
            ballot: b,
            commit,
            read_round: 0,
        };
        let catch_up = |entries: Vec<(Slot, Value)>, commit, nonce, proposed| Message::CatchUp {
            ballot: b,
            entries,
            commit,
            more: false,
            nonce,
            proposed,
        };
        r.step(1, heartbeat(2)).unwrap();
        let ready = r.take_ready();
        assert_eq!(
            only(&ready, 1),
            vec![&Message::CatchUpRequest {
                ballot: b,
                from_slot: 1,
                to_slot: 2,
                nonce: Some(5),
            }],
            "it asks with its nonce, and does not ack"
        );
        // The leader had proposed through slot 3: slot 4 is the rejoin slot.
        let entries = vec![(1, batch(&["a"])), (2, batch(&["b"]))];
        r.step(1, catch_up(entries, 2, Some(5), 3)).unwrap();
        r.step(1, heartbeat(4)).unwrap();
        let ready = r.take_ready();
        assert!(only(&ready, 1).contains(&&Message::CatchUpRequest {
            ballot: b,
            from_slot: 3,
            to_slot: 4,
            nonce: None,
        }));
        r.step(1, catch_up(vec![(3, batch(&["c"]))], 4, None, 4))
            .unwrap();
        assert_eq!(r.committed(), 3);
        assert_eq!(r.status().membership, Some(Membership::Learner));
        assert!(r.take_ready().persist.membership.is_none());
        // Slot 4 learned: it rejoins, and its next vote leaves only after
        // the membership (and promise) are on disk.
        r.step(1, catch_up(vec![(4, Value::Noop)], 4, None, 4))
            .unwrap();
        r.step(
            1,
            Message::Accept {
                ballot: b,
                slot: 5,
                value: batch(&["e"]),
                commit: 4,
            },
        )
        .unwrap();
        assert_eq!(r.status().membership, Some(Membership::Voter));
        assert!(r.status().promised >= b);
        let ready = r.take_ready();
        assert_eq!(ready.persist.membership, Some(Membership::Voter));
        assert!(
            ready
                .persisted_messages
                .iter()
                .any(|e| e.msg == Message::Accepted { ballot: b, slot: 5 })
        );
        assert!(!votes(
            &ready.messages.iter().map(|e| &e.msg).collect::<Vec<_>>()
        ));
    }

    #[test]
    fn a_learner_rejoins_only_on_a_commit_from_the_leadership_that_fixed_its_rejoin_slot() {
        let (b, b2) = (Ballot::new(4, 1), Ballot::new(5, 2));
        let mut r = restored(3, Some(Membership::Learner), 5);
        let catch_up =
            |ballot, entries: Vec<(Slot, Value)>, commit, nonce, proposed| Message::CatchUp {
                ballot,
                entries,
                commit,
                more: false,
                nonce,
                proposed,
            };
        let heartbeat = |ballot, commit| Message::Heartbeat {
            ballot,
            commit,
            read_round: 0,
        };
        let asks_with_nonce = |r: &mut Replica, leader: NodeId, ballot: Ballot| {
            let ready = r.take_ready();
            only(&ready, leader).iter().any(|m| {
                matches!(m, Message::CatchUpRequest { ballot: asked, nonce: Some(5), .. }
                    if *asked == ballot)
            })
        };
        let entries = |through: Slot| -> Vec<(Slot, Value)> {
            (1..=through)
                .map(|s| (s, batch(&[&s.to_string()])))
                .collect()
        };
        // The leader of b had proposed through slot 3: slot 4 is the rejoin
        // slot, to be chosen under b.
        r.step(1, heartbeat(b, 2)).unwrap();
        assert!(asks_with_nonce(&mut r, 1, b));
        r.step(1, catch_up(b, entries(2), 2, Some(5), 3)).unwrap();
        assert_eq!(r.committed(), 2);
        r.take_ready();
        // A higher-ballot leader takes over and reports slots past 4
        // committed: the learner follows it, learns them, but that commit
        // does not show slot 4 chosen under b. It must not vote yet, and
        // asks the new leader with its nonce again.
        r.step(2, heartbeat(b2, 5)).unwrap();
        assert!(asks_with_nonce(&mut r, 2, b2));
        r.step(2, catch_up(b2, entries(5), 5, None, 5)).unwrap();
        assert_eq!(r.committed(), 5);
        assert_eq!(r.status().membership, Some(Membership::Learner));
        let ready = r.take_ready();
        assert!(ready.persist.membership.is_none());
        assert!(!votes(&only(&ready, 2)));
        // The new leader's nonce-matching answer: it had proposed through
        // slot 6, so slot 7 is the new rejoin slot, under b2.
        r.step(2, catch_up(b2, entries(6), 6, Some(5), 6)).unwrap();
        assert_eq!(r.committed(), 6);
        assert_eq!(r.status().membership, Some(Membership::Learner));
        r.step(
            2,
            Message::Accept {
                ballot: b2,
                slot: 7,
                value: batch(&["7"]),
                commit: 6,
            },
        )
        .unwrap();
        let ready = r.take_ready();
        assert!(
            !votes(&only(&ready, 2)),
            "a learner does not vote: {ready:?}"
        );
        assert_eq!(r.status().membership, Some(Membership::Learner));
        // b2's leader reports slot 7 committed, and the learner learns it.
        r.step(2, heartbeat(b2, 7)).unwrap();
        assert_eq!(r.status().membership, Some(Membership::Learner));
        r.take_ready();
        r.step(2, catch_up(b2, vec![(7, batch(&["7"]))], 7, None, 7))
            .unwrap();
        assert_eq!(r.committed(), 7);
        assert_eq!(r.status().membership, Some(Membership::Voter));
        assert!(r.status().promised >= b2);
        assert_eq!(r.take_ready().persist.membership, Some(Membership::Voter));
    }

    #[test]
    fn a_late_catch_up_for_another_incarnation_does_not_fix_the_rejoin_slot() {
        let b = Ballot::new(4, 1);
        let mut r = restored(3, Some(Membership::Learner), 5);
        r.step(
            1,
            Message::Heartbeat {
                ballot: b,
                commit: 1,
                read_round: 0,
            },
        )
        .unwrap();
        // An answer to the previous incarnation's request (nonce 4), which
        // would make slot 2 the rejoin slot.
        let late = Message::CatchUp {
            ballot: b,
            entries: vec![(1, batch(&["a"]))],
            commit: 1,
            more: false,
            nonce: Some(4),
            proposed: 1,
        };
        r.step(1, late).unwrap();
        assert_eq!(r.committed(), 1);
        // Slot 2 is chosen next: had the late answer fixed it as the rejoin
        // slot, the learner would vote now.
        let next = Message::CatchUp {
            ballot: b,
            entries: vec![(2, batch(&["b"]))],
            commit: 2,
            more: false,
            nonce: None,
            proposed: 2,
        };
        r.step(1, next).unwrap();
        assert_eq!(r.committed(), 2);
        assert_eq!(r.status().membership, Some(Membership::Learner));
        r.take_ready();
        // It keeps asking with its own nonce.
        for _ in 0..r.config().catch_up_ticks {
            r.tick();
        }
        let ready = r.take_ready();
        assert!(
            only(&ready, 1)
                .iter()
                .any(|m| matches!(m, Message::CatchUpRequest { nonce: Some(5), .. }))
        );
    }

    #[test]
    fn a_wiped_replica_rejoins_as_a_learner_and_votes_only_after_a_slot_proposed_since() {
        let mut net = Net::new(3);
        net.elect(1);
        for c in ["a", "b", "c"] {
            net.node(1).propose(cmd(c)).unwrap();
            net.run();
        }
        assert_eq!(net.node(1).committed(), 3);
        // Replica 3 loses its disk and restarts with nothing.
        let wiped = Restore {
            membership: None,
            nonce: 77,
            ..Restore::default()
        };
        net.replace(3, wiped);
        net.chosen.remove(&3);
        net.delivered.clear();
        for _ in 0..1000 {
            net.tick_all();
            if net.node(3).status().membership == Some(Membership::Voter) {
                break;
            }
        }
        assert_eq!(
            net.memberships,
            vec![(3, Membership::Learner), (3, Membership::Voter)]
        );
        // The leader, idle, had proposed through slot 3 when it answered,
        // and proposed a no-op in slot 4 for the learner to wait for.
        let proposed = net.delivered.iter().find_map(|(_, to, m)| match m {
            Message::CatchUp {
                nonce: Some(77),
                proposed,
                ..
            } if *to == 3 => Some(*proposed),
            _ => None,
        });
        assert_eq!(proposed, Some(3));
        assert!(net.node(3).committed() >= 4);
        assert_eq!(net.chosen[&3][..4], net.chosen[&1][..4]);
        // As a learner it cast no vote: the no-op in slot 4 was chosen
        // without it.
        let voted_early = net.delivered.iter().any(|(from, _, m)| {
            *from == 3 && matches!(m, Message::Accepted { slot, .. } if *slot <= 4)
        });
        assert!(!voted_early);
        // Now it votes.
        net.node(1).propose(cmd("d")).unwrap();
        net.run();
        let voted = net
            .delivered
            .iter()
            .any(|(from, _, m)| *from == 3 && matches!(m, Message::Accepted { slot: 5, .. }));
        assert!(voted);
    }
}
