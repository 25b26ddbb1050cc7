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

    /// A ballot of `round` owned by `node`.
    pub fn new(round: u64, node: NodeId) -> Self {
        Ballot { round, node }
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
}
