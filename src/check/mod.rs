//! `paxoskv check`: a Jepsen-style test of a local cluster, for users.
//!
//! - [`linearizability`]: the Wing–Gong/Lowe checker for key-value
//!   histories (the simulator uses it too);
//! - [`proxy`]: the TCP proxy that cuts a link.

pub mod linearizability;
pub mod proxy;
