//! `paxoskv check`: a Jepsen-style test of a local cluster, for users.
//!
//! - [`linearizability`]: the Wing–Gong/Lowe checker for key-value
//!   histories (the simulator uses it too).

pub mod linearizability;
