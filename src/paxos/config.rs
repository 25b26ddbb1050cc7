//! The core's configuration: membership, timing in ticks, pipeline sizes.

use super::ballot::NodeId;
use super::message::{COMMAND_OVERHEAD, ENTRY_OVERHEAD, MESSAGE_OVERHEAD};

/// How a replica runs the protocol. Times are in ticks of the driver's clock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// This replica.
    pub id: NodeId,
    /// Every replica of the cluster, this one included.
    pub members: Vec<NodeId>,
    /// A leader sends a heartbeat every this many ticks.
    pub heartbeat_ticks: u64,
    /// A follower that hears no leader for a random time in
    /// `election_ticks..2 * election_ticks` starts an election; an acceptor
    /// that heard its leader less than `election_ticks` ago ignores
    /// candidates (leader stickiness).
    pub election_ticks: u64,
    /// The leader re-sends an accept not yet answered after this many ticks.
    pub resend_ticks: u64,
    /// A follower repeats an unanswered catch-up request after this many ticks.
    pub catch_up_ticks: u64,
    /// How far past its commit index the leader proposes: slot `s` only
    /// while `s <= commit + window` (so at most this many slots are in
    /// flight). At most [`MAX_WINDOW`](Self::MAX_WINDOW).
    pub window: usize,
    /// Most client commands in one slot.
    pub max_batch: usize,
    /// A slot stops taking commands once it holds this many bytes.
    pub max_batch_bytes: usize,
    /// Most chosen entries in one answer to a catch-up request.
    pub max_catch_up: usize,
    /// Most bytes in one message, as [`Message::size_bound`] estimates
    /// them: a catch-up answer or a promise that would be larger goes in
    /// several messages. Keep it well under what the transport accepts
    /// (`transport::MAX_MESSAGE_SIZE`, 64 MiB); it must hold one full
    /// batch.
    ///
    /// [`Message::size_bound`]: super::Message::size_bound
    pub max_message_bytes: usize,
    /// Seed of the election-timeout randomness.
    pub seed: u64,
}

impl Config {
    /// The largest [`window`](Self::window) any replica may use. It is also
    /// the bound every acceptor holds accepts to: a slot at most this far
    /// above the commit index the accept carries (see
    /// `replica/admission.rs`). A protocol constant rather than this
    /// replica's own `window`, so that replicas configured with different
    /// windows still hear each other.
    pub const MAX_WINDOW: usize = 1024;

    /// Defaults for a cluster of `members`, tuned for a 10 ms tick: heartbeat
    /// every 100 ms, elections after 1 to 2 s of silence.
    pub fn new(id: NodeId, members: Vec<NodeId>) -> Self {
        Config {
            id,
            members,
            heartbeat_ticks: 10,
            election_ticks: 100,
            resend_ticks: 50,
            catch_up_ticks: 20,
            window: 64,
            max_batch: 1024,
            max_batch_bytes: 1 << 20,
            max_catch_up: 512,
            max_message_bytes: 4 << 20,
            seed: u64::from(id),
        }
    }

    /// Checks what the core relies on; says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if !self.members.contains(&self.id) {
            return Err(format!(
                "replica id {} is not among the members {:?}",
                self.id, self.members
            ));
        }
        let mut sorted = self.members.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != self.members.len() {
            return Err(format!("members {:?} has a duplicate id", self.members));
        }
        if self.heartbeat_ticks == 0 || self.election_ticks <= self.heartbeat_ticks {
            return Err("election_ticks must exceed heartbeat_ticks, which must be > 0".into());
        }
        if self.window == 0 || self.max_batch == 0 || self.max_catch_up == 0 {
            return Err("window, max_batch and max_catch_up must be > 0".into());
        }
        if self.window > Self::MAX_WINDOW {
            return Err(format!(
                "window ({}) must be at most {}: acceptors refuse accepts further ahead",
                self.window,
                Self::MAX_WINDOW
            ));
        }
        let full_batch = self.max_batch_bytes
            + self.max_batch * COMMAND_OVERHEAD
            + ENTRY_OVERHEAD
            + MESSAGE_OVERHEAD;
        if self.max_message_bytes < full_batch {
            return Err(format!(
                "max_message_bytes ({}) must hold a full batch: at least {full_batch} bytes \
                 for max_batch_bytes {} in up to {} commands",
                self.max_message_bytes, self.max_batch_bytes, self.max_batch
            ));
        }
        Ok(())
    }

    /// Bytes one message may give to its entries (the rest is for its own
    /// fields).
    pub fn entry_budget(&self) -> usize {
        self.max_message_bytes.saturating_sub(MESSAGE_OVERHEAD)
    }

    /// Every member but this replica.
    pub fn peers(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.members.iter().copied().filter(move |&m| m != self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid_and_the_message_cap_must_hold_a_full_batch() {
        let cfg = Config::new(1, vec![1, 2, 3]);
        assert_eq!(cfg.validate(), Ok(()));
        assert_eq!(cfg.max_message_bytes, 4 << 20);
        let mut small = cfg.clone();
        small.max_message_bytes = small.max_batch_bytes;
        let err = small.validate().unwrap_err();
        assert!(err.contains("max_message_bytes"), "{err}");
        small.max_batch_bytes = 1000;
        small.max_batch = 4;
        small.max_message_bytes = 1000 + 4 * COMMAND_OVERHEAD + ENTRY_OVERHEAD + MESSAGE_OVERHEAD;
        assert_eq!(small.validate(), Ok(()));
        small.max_message_bytes -= 1;
        assert!(small.validate().is_err());
        let mut wide = cfg.clone();
        wide.window = Config::MAX_WINDOW;
        assert_eq!(wide.validate(), Ok(()));
        wide.window += 1;
        assert!(wide.validate().unwrap_err().contains("window"));
    }
}
