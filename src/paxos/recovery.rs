//! Phase 1's conclusion: which value a new leader must propose for each slot.

use std::collections::BTreeMap;

use super::ballot::{Ballot, Slot};
use super::message::{Accepted, Value};

/// Given the votes reported by a majority of promises (all at or after
/// `from_slot`), the value to re-propose for each slot from `from_slot` up
/// to the highest reported one: the map holds the slots with a vote, and
/// every slot of that range it does not hold gets a no-op.
///
/// Rules: for a slot with votes, the value of the highest-ballot vote (any
/// value chosen earlier is that one); for a slot in the range with no vote,
/// a no-op (nothing can have been chosen there). Votes below `from_slot` are
/// ignored: the new leader already knows those slots chosen.
///
/// The no-ops are left implicit, not listed, so that recovering a range
/// with wide gaps costs memory for the votes only: the leader makes each
/// no-op when it proposes its slot (see `Leader::fill_pipeline`).
pub fn recover<'a>(
    from_slot: Slot,
    promises: impl IntoIterator<Item = &'a [Accepted]>,
) -> BTreeMap<Slot, Value> {
    let mut best: BTreeMap<Slot, (Ballot, &Value)> = BTreeMap::new();
    for votes in promises {
        for vote in votes.iter().filter(|vote| vote.slot >= from_slot) {
            let entry = best.entry(vote.slot).or_insert((vote.ballot, &vote.value));
            if vote.ballot > entry.0 {
                *entry = (vote.ballot, &vote.value);
            }
        }
    }
    best.into_iter()
        .map(|(slot, (_, value))| (slot, value.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn vote(slot: Slot, round: u64, s: &str) -> Accepted {
        Accepted {
            slot,
            ballot: Ballot::new(round, round as u32),
            value: Value::Batch(vec![Bytes::copy_from_slice(s.as_bytes())]),
        }
    }

    fn val(s: &str) -> Value {
        Value::Batch(vec![Bytes::copy_from_slice(s.as_bytes())])
    }

    /// What the leader proposes: every slot from `from_slot` to the last
    /// recovered one, a no-op where none was.
    fn recover<'a>(
        from_slot: Slot,
        promises: impl IntoIterator<Item = &'a [Accepted]>,
    ) -> Vec<(Slot, Value)> {
        let mut votes = super::recover(from_slot, promises);
        let Some(&last) = votes.keys().next_back() else {
            return Vec::new();
        };
        (from_slot..=last)
            .map(|slot| (slot, votes.remove(&slot).unwrap_or(Value::Noop)))
            .collect()
    }

    #[test]
    fn picks_the_value_of_the_highest_ballot_per_slot() {
        let a = vec![vote(1, 1, "a1"), vote(2, 3, "b3")];
        let b = vec![vote(1, 2, "a2"), vote(2, 1, "b1")];
        let got = recover(1, [a.as_slice(), b.as_slice()]);
        assert_eq!(got, vec![(1, val("a2")), (2, val("b3"))]);
    }

    #[test]
    fn fills_gaps_with_noops_up_to_the_highest_reported_slot() {
        let a = vec![vote(3, 1, "c")];
        let b = vec![vote(6, 1, "f")];
        let got = recover(2, [a.as_slice(), b.as_slice()]);
        let slots: Vec<_> = got.iter().map(|(s, _)| *s).collect();
        assert_eq!(slots, vec![2, 3, 4, 5, 6]);
        assert_eq!(got[0].1, Value::Noop);
        assert_eq!(got[1].1, val("c"));
        assert_eq!(got[2].1, Value::Noop);
        assert_eq!(got[3].1, Value::Noop);
        assert_eq!(got[4].1, val("f"));
    }

    #[test]
    fn nothing_reported_means_nothing_to_recover() {
        let empty: Vec<Accepted> = Vec::new();
        assert!(recover(5, [empty.as_slice(), empty.as_slice()]).is_empty());
        // Votes below from_slot are known chosen already and are not re-proposed.
        let old = vec![vote(4, 9, "x")];
        assert!(recover(5, [old.as_slice()]).is_empty());
    }

    #[test]
    fn the_no_ops_of_a_gap_are_not_listed() {
        // A vote far ahead (a forged or corrupt one, say) costs one entry,
        // not one per slot of the gap.
        let far = vec![vote(1, 1, "a"), vote(u64::MAX - 1, 1, "z")];
        let got = super::recover(1, [far.as_slice()]);
        assert_eq!(got.len(), 2);
        assert_eq!(
            got.keys().copied().collect::<Vec<_>>(),
            vec![1, u64::MAX - 1]
        );
    }
}
