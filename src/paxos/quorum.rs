//! Majorities: the one place that counts votes.
//!
//! Every "a majority has ..." of the protocol goes through here — promises
//! (phase 1), accepts (a slot is chosen), heartbeat acknowledgements (a read
//! is confirmed), recent answers (check-quorum) — so there is one answer to
//! "what counts": each member of the configuration at most once, and no one
//! else.

use super::ballot::NodeId;

/// How many of `n` members make a majority.
pub fn majority(n: usize) -> usize {
    n / 2 + 1
}

/// True when a majority of `members` has `voted`.
///
/// It walks the members, not the votes, so a member counts once however
/// often it voted, and a vote from outside the configuration never counts.
pub fn is_majority(members: &[NodeId], voted: impl Fn(NodeId) -> bool) -> bool {
    members.iter().filter(|&&m| voted(m)).count() >= majority(members.len())
}

/// The members that voted for one thing: a slot's accepts, a candidate's
/// promises, a pre-candidate's grants.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Votes {
    // A handful of ids: a Vec beats a set at this size.
    voters: Vec<NodeId>,
}

impl Votes {
    /// No votes yet.
    pub fn new() -> Self {
        Votes::default()
    }

    /// Records `id`'s vote; false if it had already voted.
    pub fn insert(&mut self, id: NodeId) -> bool {
        if self.contains(id) {
            return false;
        }
        self.voters.push(id);
        true
    }

    /// Whether `id` has voted.
    pub fn contains(&self, id: NodeId) -> bool {
        self.voters.contains(&id)
    }

    /// Whether the votes make a majority of `members`.
    pub fn is_majority(&self, members: &[NodeId]) -> bool {
        is_majority(members, |m| self.contains(m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_majority_is_more_than_half() {
        assert_eq!(
            [1, 2, 3, 4, 5, 6].map(majority),
            [1, 2, 2, 3, 3, 4],
            "of 1, 2, 3, 4, 5, 6 members"
        );
    }

    #[test]
    fn each_member_counts_once_and_only_members_count() {
        let members = [1, 2, 3, 4, 5];
        let mut votes = Votes::new();
        assert!(votes.insert(1));
        assert!(!votes.insert(1), "a repeated vote is not a new one");
        assert!(votes.insert(9) && votes.insert(10), "recorded, but ...");
        assert!(!votes.is_majority(&members), "... outsiders do not count");
        assert!(votes.insert(2));
        assert!(!votes.is_majority(&members));
        assert!(votes.insert(5));
        assert!(votes.is_majority(&members));
        assert!(is_majority(&members, |m| m % 2 == 1));
        assert!(!is_majority(&members, |m| m % 2 == 0));
        assert!(
            is_majority(&[7], |m| m == 7),
            "one replica is its own majority"
        );
    }
}
