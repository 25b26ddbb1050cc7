//! Who is where: each replica's peer address and client address.
//!
//! A replica has two addresses, as an etcd member has its peer and client
//! URLs. Its **peer address** (its `--peers` entry) is where the other
//! replicas reach its `paxoskv.v1.Paxos` service: the Paxos streams,
//! snapshot transfers and forwarded client calls. Its **client address**
//! (`--advertise-client`) is where clients reach KvStore, Admin, health and
//! reflection. Every replica is configured with every peer address; client
//! addresses are learnt: each replica names its own in the metadata of every
//! Paxos stream it opens ([`CLIENT_ADDRESS`]), so a replica knows the client
//! address of every peer that has reached it since it started.
//!
//! Whatever tells a client where the leader is gives the leader's client
//! address, never its peer address: clients cannot, and should not, reach
//! the peer port.
//!
//! The directory also knows how this replica reaches the others and
//! introduces itself to them: the cluster's name and the [`Dialer`]
//! (plaintext or TLS), shared by the transport, snapshot fetches and
//! forwarded calls, so that all three say the same thing ([`Directory::introduce`]).

use std::collections::BTreeMap;
use std::sync::RwLock;

use tonic::metadata::{MetadataMap, MetadataValue};

use crate::dial::Dialer;
use crate::paxos::NodeId;

/// Metadata key of a Paxos `Stream` call: the dialling replica's id.
pub const REPLICA_ID: &str = "x-paxoskv-replica-id";

/// Metadata key of a Paxos `Stream` call: the dialling replica's client
/// address, in a form [`Dialer::normalize`] accepts.
pub const CLIENT_ADDRESS: &str = "x-paxoskv-client-address";

/// Metadata key of every call a replica makes on a peer port (`Stream`,
/// `Snapshot`, `Forward`): the name of the caller's cluster
/// (`--cluster-name`). A peer of another cluster is refused.
pub const CLUSTER: &str = "x-paxoskv-cluster";

/// The cluster name of a replica started without `--cluster-name`.
pub const DEFAULT_CLUSTER: &str = "paxoskv";

/// The addresses of every replica of the cluster, shared by the transport
/// (which learns client addresses), the client API and the Admin service.
#[derive(Debug)]
pub struct Directory {
    id: NodeId,
    peers: BTreeMap<NodeId, String>,
    clients: RwLock<BTreeMap<NodeId, String>>,
    cluster: String,
    dialer: Dialer,
}

impl Directory {
    /// The directory of replica `id`, whose own client address is
    /// `client_address`; `peers` maps every replica id (`id` included) to its
    /// peer address. Its cluster is [`DEFAULT_CLUSTER`] and it dials in
    /// plaintext, unless told otherwise ([`Directory::with_cluster`],
    /// [`Directory::with_dialer`]).
    pub fn new(id: NodeId, peers: BTreeMap<NodeId, String>, client_address: String) -> Self {
        Directory {
            id,
            peers,
            clients: RwLock::new(BTreeMap::from([(id, client_address)])),
            cluster: DEFAULT_CLUSTER.to_string(),
            dialer: Dialer::plain(),
        }
    }

    /// The same, for the cluster named `cluster`.
    pub fn with_cluster(mut self, cluster: impl Into<String>) -> Self {
        self.cluster = cluster.into();
        self
    }

    /// The same, dialling peers with `dialer`. A TLS dialer also means that
    /// this replica's peer port serves TLS and takes calls only from
    /// replica certificates (see [`crate::transport::PaxosService`]).
    pub fn with_dialer(mut self, dialer: Dialer) -> Self {
        self.dialer = dialer;
        self
    }

    /// This replica's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The cluster's name.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// How this replica dials its peers.
    pub fn dialer(&self) -> &Dialer {
        &self.dialer
    }

    /// Whether the replicas speak TLS, and so know each other by their
    /// certificates.
    pub fn tls(&self) -> bool {
        self.dialer.is_tls()
    }

    /// Adds to `meta` what every call this replica makes on a peer port
    /// says of it: its id ([`REPLICA_ID`]) and its cluster ([`CLUSTER`]).
    /// A cluster name that cannot be metadata (`paxoskv serve` refuses
    /// such names at start) is left out, and the peer will refuse the call.
    pub fn introduce(&self, meta: &mut MetadataMap) {
        meta.insert(REPLICA_ID, MetadataValue::from(self.id));
        if let Ok(cluster) = MetadataValue::try_from(self.cluster.as_str()) {
            meta.insert(CLUSTER, cluster);
        }
    }

    /// Every replica's peer address, this one's included.
    pub fn peers(&self) -> &BTreeMap<NodeId, String> {
        &self.peers
    }

    /// The peer address of replica `id`, if it is a member.
    pub fn peer_address(&self, id: NodeId) -> Option<&str> {
        self.peers.get(&id).map(String::as_str)
    }

    /// The client address replica `id` last advertised here, if any.
    pub fn client_address(&self, id: NodeId) -> Option<String> {
        self.clients
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }

    /// Records that replica `id` serves clients at `address`, as it said
    /// when its stream to this replica opened. Refused, changing nothing,
    /// if `id` is not another member or `address` does not parse; the error
    /// says which.
    pub fn learn(&self, id: NodeId, address: &str) -> Result<(), String> {
        if id == self.id {
            return Err(format!("replica {id} is this replica"));
        }
        if !self.peers.contains_key(&id) {
            return Err(format!("replica {id} is not a member"));
        }
        self.dialer
            .normalize(address)
            .map_err(|e| format!("client address of replica {id}: {e}"))?;
        let address = address.trim().to_string();
        let mut clients = self.clients.write().unwrap_or_else(|e| e.into_inner());
        if clients.get(&id) != Some(&address) {
            tracing::info!(peer = id, client_address = %address, "peer's client address");
            clients.insert(id, address);
        }
        Ok(())
    }

    /// Replica `id` for a person: `replica 2` and, when known, where its
    /// clients reach it.
    pub fn describe(&self, id: NodeId) -> String {
        match self.client_address(id) {
            Some(address) => format!("replica {id}, client address {address}"),
            None => format!("replica {id}, client address not known here"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn directory() -> Directory {
        let peers = (1..=3)
            .map(|id| (id, format!("127.0.0.1:{}", 8180 + id)))
            .collect();
        Directory::new(1, peers, "127.0.0.1:8081".into())
    }

    #[test]
    fn client_addresses_are_learnt_from_members_only_and_checked() {
        let d = directory();
        assert_eq!(d.client_address(1).as_deref(), Some("127.0.0.1:8081"));
        assert_eq!(d.client_address(2), None);
        assert_eq!(d.peer_address(2), Some("127.0.0.1:8182"));

        d.learn(2, " http://10.0.0.2:8082 ")
            .expect("a member's address");
        assert_eq!(d.client_address(2).as_deref(), Some("http://10.0.0.2:8082"));
        assert!(d.describe(2).contains("http://10.0.0.2:8082"));
        assert!(d.describe(3).contains("not known"));

        let err = d.learn(9, "127.0.0.1:8089").unwrap_err();
        assert!(err.contains("replica 9 is not a member"), "{err}");
        let err = d.learn(1, "127.0.0.1:9999").unwrap_err();
        assert!(err.contains("this replica"), "{err}");
        assert_eq!(d.client_address(1).as_deref(), Some("127.0.0.1:8081"));
        let err = d.learn(3, "https://127.0.0.1:8083").unwrap_err();
        assert!(err.contains("replica 3") && err.contains("https"), "{err}");
        assert_eq!(d.client_address(3), None);
    }
}
