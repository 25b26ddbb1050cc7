//! `paxoskv check`: a Jepsen-style test of a local cluster, for users.
//!
//! - [`linearizability`]: the Wing–Gong/Lowe checker for key-value
//!   histories (the simulator uses it too);
//! - [`proxy`]: the TCP proxy that cuts a link;
//! - [`workload`]: the clients, retries with the same request id, and the
//!   history.

pub mod linearizability;
pub mod proxy;
pub mod workload;
