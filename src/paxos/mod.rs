//! The consensus core: Multi-Paxos with a stable leader, sans I/O.
//!
//! No tokio, sled or tonic here: the core is a deterministic state machine
//! driven by ticks, messages and client proposals, whose only output is a
//! [`Ready`] saying what to persist, what to send (and whether only after
//! persisting), and what is now chosen. Time is a tick count given in;
//! randomness comes from [`Config::seed`]. The node driver runs it over real
//! disks and sockets; the simulator in `tests/simulation` runs it over a
//! faulty simulated network and checks every step.
//!
//! Where the rules live, each next to its tests:
//!
//! - [`acceptor`]: what may be promised and accepted (phase 1b, phase 2b);
//! - [`recovery`]: which value a new leader re-proposes per slot;
//! - [`quorum`]: what counts as a majority, for every vote of the protocol;
//! - [`replica`]: one replica, split by role into
//!   - `replica/admission.rs`: which peer messages are heard at all (every
//!     [`Refused`] rule: non-members, ballots and slots out of range,
//!     accepts beyond the window, values no state machine can apply);
//!   - `replica/election.rs`: pre-vote, prepare, promise, becoming leader,
//!     stepping down, the election timer, leader stickiness;
//!   - `replica/leader.rs`: the pipelined phase 2, counting accepts, the
//!     commit index, re-sends, heartbeats, check-quorum, serving catch-up;
//!   - `replica/reads.rs`: ReadIndex;
//!   - `replica/learner.rs`: the follower's side of phase 2, its commit rule,
//!     and catching up;
//!   - `replica/membership.rs`: who votes: a new cluster's bootstrap, and a
//!     replica that lost its disk rejoining as a learner.
//!
//! `testing.rs` (tests only) holds the unit tests' lossless network.

pub mod acceptor;
pub mod ballot;
pub mod config;
pub mod message;
pub mod quorum;
pub mod recovery;
pub mod replica;
pub mod rng;
#[cfg(test)]
mod testing;

pub use ballot::{Ballot, NodeId, Slot};
pub use config::Config;
pub use message::{
    Accepted, Envelope, Membership, Message, Persist, ReadId, Ready, SnapshotFetch, Value,
};
pub use replica::{
    FollowerStatus, HandOffError, NotLeader, Refused, Replica, Restore, Role, Status,
};
