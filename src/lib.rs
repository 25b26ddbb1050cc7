//! paxoskv: a replicated key-value store kept consistent by Multi-Paxos with
//! a stable leader.
//!
//! Layers, each importing only those below it:
//!
//! - [`server`], [`cluster`], [`client`]: what the `paxoskv` command runs —
//!   one replica, a local cluster of them, a client call;
//! - [`http`]: the client API as HTTP/JSON (`--http-listen`), each request
//!   made through the gRPC service's own methods;
//! - [`pod`]: `--id`, `--peers` and the client address derived from a
//!   Kubernetes pod's name (`--peers-from-dns`), sans-IO;
//! - [`readiness`]: when a replica is ready to serve KV calls (a leader, and
//!   caught up within a bound), as the health service tells Kubernetes;
//! - [`service`], [`admin`]: the client API (`paxoskv.v1.KvStore`) and the
//!   operator's view (`paxoskv.v1.Admin`) over gRPC;
//! - [`forwarder`]: client calls a follower forwards to the leader, in
//!   batches on one stream per leader (`Paxos/Forward`), both ends;
//! - [`metrics`]: every metric's name, and the Prometheus exporter;
//! - [`node`]: the async shell that owns the driver, the storage and the
//!   transport, and does the I/O the driver asks for;
//! - [`driver`]: the core plus the bookkeeping of client calls, sans I/O:
//!   which caller gets which answer (the simulator runs it too);
//! - [`forwarding`]: a follower's forwarding link, sans I/O: batches, and
//!   what each caller is told when the stream breaks (the simulator runs
//!   it too);
//! - [`transport`]: Paxos messages between replicas over long-lived gRPC
//!   streams, one per peer, with reconnects;
//! - [`transfer`]: state machine snapshots from one replica to another
//!   (`Paxos/Snapshot`), for a replica behind the others' compacted logs;
//! - [`handshake`]: who is calling on the peer port (metadata, and the
//!   certificate with TLS), and whether to let them;
//! - [`directory`]: every replica's peer address (`--peers`) and client
//!   address (advertised when its Paxos stream opens), its cluster, and how
//!   to dial them;
//! - [`dial`]: the one way to make a channel to a replica, from any address
//!   form `--peers` and `--endpoint` accept, plaintext or TLS;
//! - [`tls`]: certificates (files, who they name) and throwaway ones for
//!   `paxoskv cluster --tls`;
//! - [`storage`]: the one place that touches the disk: the acceptor's
//!   promise and votes in the Paxos log, each persist one group commit
//!   with one fdatasync, and the state machine in sled, applied atomically
//!   with its applied index;
//! - [`wal`]: the Paxos log's own append-only segment files (CRC-framed
//!   records, group commit with one fdatasync);
//! - [`mod@bench`]: `paxoskv bench`, a load generator (closed or open loop,
//!   against paxoskv or etcd) and a no-op server for the ceiling;
//! - [`check`]: `paxoskv check`, a Jepsen-style run against a local
//!   cluster of its own (faults, concurrent clients, a linearizability
//!   check); its checker is the simulator's too;
//! - [`wire`]: the core's types in protobuf form, for the network and the disk;
//! - [`kv`]: the state machine (the five operations and the dedup table);
//! - [`paxos`]: the consensus core, sans-IO and deterministic;
//! - [`pb`]: the generated protobuf and gRPC types.

pub mod admin;
pub mod bench;
pub mod certainty;
pub mod check;
pub mod client;
pub mod cluster;
pub mod codec;
pub mod dial;
pub mod directory;
pub mod driver;
pub mod forwarder;
pub mod forwarding;
pub mod handshake;
pub mod http;
pub mod kv;
pub mod listener;
pub mod metrics;
pub mod node;
pub mod paxos;
pub mod pod;
pub mod readiness;
pub mod server;
pub mod service;
pub mod storage;
pub mod tls;
pub mod transfer;
pub mod transport;
pub mod wal;
pub mod wire;

/// Generated protobuf messages and gRPC stubs for `paxoskv.v1`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("paxoskv.v1");

    /// The encoded descriptor set of every paxoskv proto, for reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("paxoskv_descriptor");

    /// The encoded descriptor set of the client-facing protos only
    /// (`KvStore`, `Admin`), for the client port's reflection.
    pub const CLIENT_FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("paxoskv_client_descriptor");
}
