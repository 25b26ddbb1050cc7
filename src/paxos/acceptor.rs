//! The acceptor's rules: what it promises, what it accepts, what it reports.
//!
//! This is the part of Paxos whose state must survive crashes: the promised
//! ballot and the votes. Every change returned here must be made durable by
//! the driver before the reply that depends on it is sent (see
//! [`Ready`](super::Ready)).

use std::collections::BTreeMap;

use super::ballot::{Ballot, Slot};
use super::message::{Accepted, Value};

/// The acceptor state of one replica: its promise, its votes, and how far
/// its log is compacted.
#[derive(Clone, Debug, Default)]
pub struct Acceptor {
    promised: Ballot,
    log: BTreeMap<Slot, (Ballot, Value)>,
    /// Every slot up to here is chosen and lives in the state machine's
    /// snapshot; the votes for them are gone. A promise reports it (as
    /// `Promise::snapshot`), so that no candidate mistakes a compacted slot
    /// for an empty one.
    compacted: Slot,
}

/// What a granted prepare or accept changed, so the caller knows what to
/// persist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change {
    /// The promised ballot rose and must be written.
    pub promise_raised: bool,
    /// The vote for the slot is new or different and must be written.
    pub vote_changed: bool,
}

impl Acceptor {
    /// An acceptor restored from durable state: its promise, its votes, and
    /// the index of the state machine's snapshot (0 if none). Votes at or
    /// below the snapshot are dropped: those slots are compacted.
    pub fn restore(
        promised: Ballot,
        votes: impl IntoIterator<Item = Accepted>,
        snapshot: Slot,
    ) -> Self {
        let log = votes
            .into_iter()
            .filter(|a| a.slot > snapshot)
            .map(|a| (a.slot, (a.ballot, a.value)))
            .collect();
        Acceptor {
            promised,
            log,
            compacted: snapshot,
        }
    }

    /// Every slot up to here is chosen, in the snapshot, and has no vote here.
    pub fn compacted(&self) -> Slot {
        self.compacted
    }

    /// Whether the acceptor holds no state at all: nothing promised, no
    /// vote, nothing compacted.
    pub fn is_blank(&self) -> bool {
        self.promised == Ballot::ZERO && self.log.is_empty() && self.compacted == 0
    }

    /// Rule: compaction forgets the votes of slots known chosen and kept in
    /// a durable snapshot, and from then on every promise reports the
    /// snapshot's index instead of them. The caller guarantees that every
    /// slot up to `through` is chosen and in a durable snapshot.
    pub fn compact(&mut self, through: Slot) {
        if through <= self.compacted {
            return;
        }
        self.log = self.log.split_off(&(through + 1));
        self.compacted = through;
    }

    /// Raises the promise to `ballot` if it is below; returns whether it
    /// rose (and must be written). Only ever makes the acceptor refuse more.
    pub fn raise(&mut self, ballot: Ballot) -> bool {
        let raised = ballot > self.promised;
        self.promised = self.promised.max(ballot);
        raised
    }

    /// The highest ballot promised (or accepted under).
    pub fn promised(&self) -> Ballot {
        self.promised
    }

    /// The vote held for `slot`, if any.
    pub fn vote(&self, slot: Slot) -> Option<(Ballot, &Value)> {
        self.log.get(&slot).map(|(b, v)| (*b, v))
    }

    /// The lowest slot holding a vote, if any.
    pub fn first_slot(&self) -> Option<Slot> {
        self.log.keys().next().copied()
    }

    /// The highest slot holding a vote (0 if none).
    pub fn last_slot(&self) -> Slot {
        self.log.keys().next_back().copied().unwrap_or(0)
    }

    /// Rule: a message under a ballot below the promise is refused; the
    /// sender learns the promise (a `Nack`). Equal is allowed: it is the
    /// promised proposer itself speaking again.
    pub fn check(&self, ballot: Ballot) -> Result<(), Ballot> {
        if ballot < self.promised {
            Err(self.promised)
        } else {
            Ok(())
        }
    }

    /// A leader's heartbeat or catch-up. Rule: refused below the promise, like
    /// an accept; at or above it, raises the promise to the leader's ballot,
    /// so that the acceptor refuses older leaders from then on. Returns
    /// whether the promise rose (and must be written).
    pub fn follow(&mut self, ballot: Ballot) -> Result<bool, Ballot> {
        self.check(ballot)?;
        let raised = ballot > self.promised;
        self.promised = ballot;
        Ok(raised)
    }

    /// Phase 1b. Rule: promise `ballot` only if nothing higher was promised;
    /// the promise covers every slot, including those not yet seen, and
    /// reports every vote at or after `from_slot` (those at or below
    /// [`compacted`](Self::compacted) are gone: the promise reports that
    /// index instead).
    pub fn prepare(
        &mut self,
        ballot: Ballot,
        from_slot: Slot,
    ) -> Result<(Change, Vec<Accepted>), Ballot> {
        self.check(ballot)?;
        let change = Change {
            promise_raised: ballot > self.promised,
            vote_changed: false,
        };
        self.promised = ballot;
        let votes = self
            .log
            .range(from_slot..)
            .map(|(&slot, (b, v))| Accepted {
                slot,
                ballot: *b,
                value: v.clone(),
            })
            .collect();
        Ok((change, votes))
    }

    /// Phase 2b. Rule: accept only at or above the promise; accepting raises
    /// the promise to the accept's ballot. The caller never asks for a
    /// compacted slot: it is chosen, and a vote there could not be reported.
    pub fn accept(&mut self, ballot: Ballot, slot: Slot, value: &Value) -> Result<Change, Ballot> {
        assert!(
            slot > self.compacted,
            "accept for slot {slot}, compacted through {}",
            self.compacted
        );
        self.check(ballot)?;
        let change = Change {
            promise_raised: ballot > self.promised,
            vote_changed: self.log.get(&slot) != Some(&(ballot, value.clone())),
        };
        self.promised = ballot;
        if change.vote_changed {
            self.log.insert(slot, (ballot, value.clone()));
        }
        Ok(change)
    }

    /// Records a value the leader of `ballot` reported chosen (catch-up) as a
    /// vote under that ballot. Safe although no accept was received: a leader
    /// only reports a slot chosen at a ballot at or below its own, and every
    /// proposal above the choosing ballot carries the chosen value, so no
    /// phase 1 can be misled by it. Returns whether anything changed.
    pub fn learn(&mut self, ballot: Ballot, slot: Slot, value: &Value) -> bool {
        assert!(slot > self.compacted, "learning compacted slot {slot}");
        if self.log.get(&slot) == Some(&(ballot, value.clone())) {
            return false;
        }
        self.log.insert(slot, (ballot, value.clone()));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn b(round: u64, node: u32) -> Ballot {
        Ballot::new(round, node)
    }

    fn v(s: &str) -> Value {
        Value::Batch(vec![Bytes::copy_from_slice(s.as_bytes())])
    }

    #[test]
    fn promises_only_a_ballot_at_least_as_high_as_its_promise() {
        let mut a = Acceptor::default();
        let (change, _) = a.prepare(b(2, 1), 1).unwrap();
        assert!(change.promise_raised);
        assert_eq!(a.prepare(b(1, 3), 1).unwrap_err(), b(2, 1));
        assert_eq!(a.prepare(b(2, 0), 1).unwrap_err(), b(2, 1));
        // The same candidate asking again gets the same promise, nothing new to write.
        let (change, _) = a.prepare(b(2, 1), 1).unwrap();
        assert!(!change.promise_raised);
        assert!(a.prepare(b(3, 0), 1).unwrap().0.promise_raised);
        assert_eq!(a.promised(), b(3, 0));
    }

    #[test]
    fn promise_reports_every_vote_at_or_after_from_slot() {
        let mut a = Acceptor::default();
        a.accept(b(1, 1), 3, &v("x")).unwrap();
        a.accept(b(1, 1), 5, &v("y")).unwrap();
        a.accept(b(1, 1), 9, &Value::Noop).unwrap();
        let (_, votes) = a.prepare(b(2, 2), 5).unwrap();
        let got: Vec<_> = votes
            .iter()
            .map(|x| (x.slot, x.ballot, x.value.clone()))
            .collect();
        assert_eq!(got, vec![(5, b(1, 1), v("y")), (9, b(1, 1), Value::Noop)]);
    }

    #[test]
    fn accepts_only_at_or_above_the_promise() {
        let mut a = Acceptor::default();
        a.prepare(b(5, 1), 1).unwrap();
        assert_eq!(a.accept(b(4, 9), 1, &v("old")).unwrap_err(), b(5, 1));
        assert_eq!(a.vote(1), None);
        let change = a.accept(b(5, 1), 1, &v("new")).unwrap();
        assert!(change.vote_changed && !change.promise_raised);
        assert_eq!(a.vote(1), Some((b(5, 1), &v("new"))));
    }

    #[test]
    fn a_promise_covers_slots_the_acceptor_has_not_seen_yet() {
        let mut a = Acceptor::default();
        a.accept(b(1, 1), 1, &v("a")).unwrap();
        a.prepare(b(2, 2), 1).unwrap();
        // Slot 1000 was never mentioned, yet the old ballot is refused there too.
        assert_eq!(a.accept(b(1, 1), 1000, &v("late")).unwrap_err(), b(2, 2));
        assert_eq!(a.vote(1000), None);
    }

    #[test]
    fn accepting_a_higher_ballot_raises_the_promise() {
        let mut a = Acceptor::default();
        let change = a.accept(b(3, 1), 7, &v("x")).unwrap();
        assert!(change.promise_raised);
        assert_eq!(a.promised(), b(3, 1));
        assert!(a.prepare(b(2, 2), 1).is_err());
    }

    #[test]
    fn a_higher_ballot_replaces_the_vote_and_a_repeat_writes_nothing() {
        let mut a = Acceptor::default();
        a.accept(b(1, 1), 2, &v("a")).unwrap();
        assert!(!a.accept(b(1, 1), 2, &v("a")).unwrap().vote_changed);
        assert!(a.accept(b(2, 2), 2, &v("b")).unwrap().vote_changed);
        assert_eq!(a.vote(2), Some((b(2, 2), &v("b"))));
        assert_eq!(a.last_slot(), 2);
    }

    #[test]
    fn following_a_leader_raises_the_promise_and_old_leaders_are_refused() {
        let mut a = Acceptor::default();
        assert_eq!(a.follow(b(2, 2)), Ok(true));
        assert_eq!(a.follow(b(2, 2)), Ok(false));
        assert_eq!(a.follow(b(1, 1)), Err(b(2, 2)));
        assert_eq!(a.accept(b(1, 1), 1, &v("x")).unwrap_err(), b(2, 2));
    }

    #[test]
    fn restore_brings_back_promise_and_votes() {
        let votes = vec![Accepted {
            slot: 4,
            ballot: b(2, 1),
            value: v("z"),
        }];
        let a = Acceptor::restore(b(3, 2), votes, 0);
        assert_eq!(a.promised(), b(3, 2));
        assert_eq!(a.vote(4), Some((b(2, 1), &v("z"))));
        assert!(a.check(b(3, 1)).is_err());
    }

    #[test]
    fn compacting_drops_the_votes_through_the_index_and_a_promise_reports_only_those_above() {
        let mut a = Acceptor::default();
        for slot in 1..=5 {
            a.accept(b(1, 1), slot, &v("x")).unwrap();
        }
        a.compact(3);
        assert_eq!(a.compacted(), 3);
        assert_eq!(a.vote(3), None);
        assert_eq!(a.vote(4), Some((b(1, 1), &v("x"))));
        // A prepare from below the snapshot gets only the votes above it.
        let (_, votes) = a.prepare(b(2, 2), 1).unwrap();
        let slots: Vec<Slot> = votes.iter().map(|x| x.slot).collect();
        assert_eq!(slots, vec![4, 5]);
        // Compaction never goes back.
        a.compact(2);
        assert_eq!(a.compacted(), 3);
        assert!(!a.is_blank());
    }

    #[test]
    fn restoring_from_a_snapshot_drops_the_votes_it_covers() {
        let vote = |slot| Accepted {
            slot,
            ballot: b(1, 1),
            value: v("y"),
        };
        let a = Acceptor::restore(b(1, 1), [vote(2), vote(3)], 2);
        assert_eq!(a.compacted(), 2);
        assert_eq!(a.vote(2), None);
        assert_eq!(a.last_slot(), 3);
        assert!(Acceptor::restore(Ballot::ZERO, [], 0).is_blank());
    }
}
