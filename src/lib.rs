//! paxoskv: a replicated key-value store kept consistent by Multi-Paxos with
//! a stable leader.
//!
//! Layers, each importing only those below it:
//!
//! - [`kv`]: the state machine (the five operations and the dedup table);
//! - [`paxos`]: the consensus core, sans-IO and deterministic;
//! - [`pb`]: the generated protobuf and gRPC types.

pub mod kv;
pub mod paxos;

/// Generated protobuf messages and gRPC stubs for `paxoskv.v1`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("paxoskv.v1");

    /// The encoded descriptor set of every paxoskv proto, for reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("paxoskv_descriptor");
}
