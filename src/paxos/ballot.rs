//! Ballots: the totally ordered proposal numbers of Paxos.

use std::fmt;

/// Identifies a replica. Ids are chosen by the operator and must be unique.
pub type NodeId = u32;

/// A log position. Slots start at 1; 0 means "none".
pub type Slot = u64;

/// A ballot `(round, node)`, ordered by round, then by node.
///
/// Each replica only ever leads with ballots that carry its own id, so two
/// replicas never use the same ballot: that is what makes "the value proposed
/// under ballot b for slot s" well defined.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ballot {
    /// Increases with every election; compared first.
    pub round: u64,
    /// The replica that owns this ballot; breaks ties between rounds.
    pub node: NodeId,
}

impl Ballot {
    /// The ballot below every real one: nothing promised, nothing accepted.
    pub const ZERO: Ballot = Ballot { round: 0, node: 0 };

    /// How far above the highest round a replica has seen (or promised) the
    /// round of a ballot it receives may be.
    ///
    /// Honest rounds grow by one per election, and an election takes at
    /// least an election timeout (a second or more), so even a replica that
    /// slept through every election since the cluster began is behind by
    /// far less than 2^32 rounds: that is over a century of one election a
    /// second. A larger jump is a bug, a corrupt message or an attack, and
    /// taking it could carry rounds to `u64::MAX`, after which no replica
    /// could ever pick a higher ballot and the cluster could never elect a
    /// leader again.
    pub const MAX_ROUND_JUMP: u64 = 1 << 32;

    /// A ballot of `round` owned by `node`.
    pub fn new(round: u64, node: NodeId) -> Self {
        Ballot { round, node }
    }

    /// Whether a replica that has seen rounds up to `highest` may take this
    /// ballot from a peer: its round is at least 1 (rounds start there; 0
    /// is [`ZERO`](Self::ZERO)'s), at most
    /// [`MAX_ROUND_JUMP`](Self::MAX_ROUND_JUMP) above `highest`, and leaves
    /// room for a higher one.
    pub fn in_range(self, highest: u64) -> bool {
        self.round >= 1
            && self.round < u64::MAX
            && self.round <= highest.saturating_add(Self::MAX_ROUND_JUMP)
    }

    /// The round after `highest` for a new ballot, unless none is left.
    pub fn next_round(highest: u64) -> Option<u64> {
        highest.checked_add(1).filter(|&round| round < u64::MAX)
    }
}

impl fmt::Display for Ballot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.round, self.node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ballots_order_by_round_then_node() {
        assert!(Ballot::new(1, 9) < Ballot::new(2, 1));
        assert!(Ballot::new(2, 1) < Ballot::new(2, 3));
        assert!(Ballot::ZERO < Ballot::new(0, 1));
        assert_eq!(Ballot::new(4, 2).to_string(), "4.2");
    }

    #[test]
    fn a_round_is_in_range_up_to_the_jump_and_below_the_last() {
        let jump = Ballot::MAX_ROUND_JUMP;
        assert!(Ballot::new(jump + 7, 1).in_range(7));
        assert!(!Ballot::new(jump + 8, 1).in_range(7));
        assert!(Ballot::new(u64::MAX - 1, 1).in_range(u64::MAX - 2));
        assert!(!Ballot::new(u64::MAX, 1).in_range(u64::MAX - 1));
        assert!(!Ballot::new(0, 1).in_range(0));
        assert!(Ballot::new(1, 1).in_range(0));
        assert_eq!(Ballot::next_round(4), Some(5));
        assert_eq!(Ballot::next_round(u64::MAX - 2), Some(u64::MAX - 1));
        assert_eq!(Ballot::next_round(u64::MAX - 1), None);
        assert_eq!(Ballot::next_round(u64::MAX), None);
    }
}
