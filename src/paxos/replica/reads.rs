//! Linearizable reads by ReadIndex: a read gets the leader's commit index as
//! it arrives, and is served once a majority has confirmed, by answering a
//! heartbeat sent after it, that the leader still leads.

use super::Core;
use super::leader::Leader;
use crate::paxos::ballot::{Ballot, NodeId, Slot};
use crate::paxos::message::ReadId;
use crate::paxos::quorum;

/// A read waiting for a quorum to confirm leadership in round `round`.
#[derive(Debug)]
pub(super) struct PendingRead {
    pub(super) id: ReadId,
    round: u64,
    index: Slot,
}

impl Leader {
    /// Takes read `id`: indexed now if recovery is over, else once it is.
    pub(super) fn read(&mut self, core: &Core, id: ReadId) {
        if self.recovered(core) {
            self.reads.push_back(PendingRead {
                id,
                round: self.read_round + 1,
                index: core.committed,
            });
        } else {
            self.unindexed_reads.push(id);
        }
    }

    fn recovered(&self, core: &Core) -> bool {
        core.committed >= self.recovered_through
    }

    /// Rule: a new leader indexes reads only after every recovered slot is
    /// chosen under its ballot; before that its commit index may be behind
    /// writes an earlier leader already acknowledged.
    pub(super) fn index_reads_after_recovery(&mut self, core: &Core) {
        if !self.recovered(core) || self.unindexed_reads.is_empty() {
            return;
        }
        let round = self.read_round + 1;
        for id in self.unindexed_reads.drain(..) {
            self.reads.push_back(PendingRead {
                id,
                round,
                index: core.committed,
            });
        }
    }

    /// Starts a heartbeat round for reads that arrived since the last one.
    pub(super) fn announce_read_round(&mut self, core: &mut Core) {
        if self.reads.back().is_some_and(|r| r.round > self.read_round) {
            self.read_round += 1;
            self.broadcast_heartbeat(core);
        }
        self.confirm_reads(core);
    }

    /// Rule: a read is served once a majority (us included) acknowledged a
    /// heartbeat sent after it arrived: no higher ballot can have been chosen
    /// anything before that point.
    fn confirm_reads(&mut self, core: &mut Core) {
        while let Some(read) = self.reads.front() {
            let confirmed = quorum::is_majority(&core.cfg.members, |m| {
                m == core.cfg.id
                    || self
                        .progress
                        .get(&m)
                        .is_some_and(|p| p.read_round >= read.round)
            });
            if read.round > self.read_round || !confirmed {
                break;
            }
            core.ready.reads.push((read.id, read.index));
            self.reads.pop_front();
        }
    }

    pub(super) fn on_heartbeat_ack(
        &mut self,
        core: &mut Core,
        from: NodeId,
        ballot: Ballot,
        read_round: u64,
        committed: Slot,
    ) {
        if self.ballot != ballot {
            return;
        }
        if let Some(p) = self.progress.get_mut(&from) {
            p.last_ack = core.now;
            p.read_round = p.read_round.max(read_round);
            p.committed = p.committed.max(committed);
        }
        self.confirm_reads(core);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paxos::message::{Accepted, Message, Value};
    use crate::paxos::testing::{Net, batch, campaign, cmd, config, only};
    use crate::paxos::{Replica, Restore};

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
        let restore = |votes| Restore {
            promised: old,
            votes,
            ..Restore::default()
        };
        net.nodes
            .insert(2, Replica::new(config(2, 3), restore(votes)).unwrap());
        net.nodes
            .insert(1, Replica::new(config(1, 3), restore(Vec::new())).unwrap());
        // Replica 1 campaigns; only replica 2 answers its prepare.
        campaign(net.node(1));
        let ready = net.node(1).take_ready();
        let ballot = net.node(1).status().promised;
        net.node(1).step_own(Message::Promise {
            ballot,
            from_slot: 1,
            to_slot: None,
            accepted: Vec::new(),
            snapshot: 0,
        });
        let prep = ready
            .persisted_messages
            .iter()
            .find(|e| e.to == 2)
            .unwrap()
            .msg
            .clone();
        net.node(2).step(1, prep).unwrap();
        let promise = net.node(2).take_ready().persisted_messages.remove(0).msg;
        net.node(1).step(2, promise).unwrap();
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
            net.node(1)
                .step(
                    from,
                    Message::HeartbeatAck {
                        ballot,
                        read_round: round,
                        committed: 0,
                    },
                )
                .unwrap();
        }
        assert!(net.node(1).take_ready().reads.is_empty());
        for slot in 1..=3 {
            net.node(1).step_own(Message::Accepted { ballot, slot });
            net.node(1)
                .step(3, Message::Accepted { ballot, slot })
                .unwrap();
        }
        let ready = net.node(1).take_ready();
        assert_eq!(ready.chosen.len(), 3);
        assert!(
            ready.reads.is_empty(),
            "indexed now, but needs its own heartbeat round"
        );
        net.node(1)
            .step(
                3,
                Message::HeartbeatAck {
                    ballot,
                    read_round: 1,
                    committed: 3,
                },
            )
            .unwrap();
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
        net.node(1)
            .step(
                2,
                Message::HeartbeatAck {
                    ballot,
                    read_round: round - 1,
                    committed: 1,
                },
            )
            .unwrap();
        assert!(net.node(1).take_ready().reads.is_empty());
        net.node(1)
            .step(
                2,
                Message::HeartbeatAck {
                    ballot,
                    read_round: round,
                    committed: 1,
                },
            )
            .unwrap();
        assert_eq!(net.node(1).take_ready().reads, vec![(9, 1)]);
    }
}
