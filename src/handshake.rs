//! Who is calling on the peer port, and whether to let them.
//!
//! Every call a replica makes on a peer port — a Paxos `Stream`, a
//! `Snapshot` fetch, a `Forward`ed client call — says who makes it, in its
//! metadata ([`Directory::introduce`]): the replica's id
//! ([`REPLICA_ID`]) and its cluster's name ([`CLUSTER`]); a `Stream` also
//! gives the replica's client address ([`CLIENT_ADDRESS`]). The peer port
//! checks them with a [`Gate`] before anything else, in this order:
//!
//! 1. With TLS on, the caller's certificate (already verified against the
//!    CA by the TLS handshake) must name a replica of this cluster's
//!    configuration in its Common Name, `paxoskv-replica-N` (see
//!    [`crate::tls`]); a client certificate, or one naming a replica that
//!    is not a member, is refused with `PERMISSION_DENIED`.
//! 2. The metadata must be well formed (`INVALID_ARGUMENT`), and name the
//!    replica.
//! 3. With TLS on, the replica id the metadata gives must be the one the
//!    certificate names (`PERMISSION_DENIED`): a replica cannot speak for
//!    another.
//! 4. The cluster must be this one (`FAILED_PRECONDITION`, "replica 2
//!    belongs to cluster X, this is cluster Y"), as etcd refuses a member
//!    of another cluster ID: two clusters whose peer addresses got mixed up
//!    must not exchange votes.
//! 5. The replica must be another member (`INVALID_ARGUMENT`), and its
//!    client address must parse.
//!
//! A refusal is logged here at WARN, at most once per [`WARN_EVERY`] for
//! each kind of refusal (a refused peer retries every second); the caller
//! sees the status, and a replica's transport shows it as the reason the
//! peer is unreachable.
//!
//! Once a `Stream` is admitted, every message on it must say it comes from
//! the replica the stream was opened by ([`Gate::sent_by`]): one that names
//! another sender is dropped before it reaches the node, with TLS off too
//! (where the id is only a claim, but a claim made once per stream rather
//! than per message).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use tokio::time::Instant;
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};
use tracing::warn;

use crate::directory::{CLIENT_ADDRESS, CLUSTER, Directory, REPLICA_ID};
use crate::paxos::NodeId;
use crate::tls::{self, Holder};

/// A WARN of one kind at most this often.
pub const WARN_EVERY: Duration = Duration::from_secs(5);

/// The calls of the peer port, for messages and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerCall {
    /// `Paxos/Stream`.
    Stream,
    /// `Paxos/Snapshot`.
    Snapshot,
    /// `Paxos/Forward`.
    Forward,
}

impl PeerCall {
    fn name(self) -> &'static str {
        match self {
            PeerCall::Stream => "Paxos/Stream",
            PeerCall::Snapshot => "Paxos/Snapshot",
            PeerCall::Forward => "Paxos/Forward",
        }
    }
}

/// Who passed the gate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The calling replica (its certificate's, with TLS on).
    pub id: NodeId,
}

/// The peer port's checks (see the module), with their rate-limited log.
#[derive(Debug)]
pub struct Gate {
    directory: Arc<Directory>,
    warned: RateLimit,
    /// Who each certificate seen names, by its DER bytes: every forwarded
    /// client call is checked, and parsing the certificate each time would
    /// cost more than looking it up. Bounded by [`HOLDERS_CACHED`].
    holders: Mutex<HashMap<Vec<u8>, Result<Holder, String>>>,
}

/// Certificates whose holder the gate remembers; the cache is emptied when
/// it is full (a cluster has a handful of replica certificates).
const HOLDERS_CACHED: usize = 64;

impl Gate {
    /// A gate for the replica `directory` describes: its id, its members,
    /// its cluster, and whether it speaks TLS.
    pub fn new(directory: Arc<Directory>) -> Gate {
        Gate {
            directory,
            warned: RateLimit::new(WARN_EVERY),
            holders: Mutex::new(HashMap::new()),
        }
    }

    /// The directory the gate checks against.
    pub fn directory(&self) -> &Arc<Directory> {
        &self.directory
    }

    /// Checks a `call` with metadata `meta`, made over a connection whose
    /// client presented `certs` (none without TLS), from `remote`. A
    /// `Stream`'s client address is recorded in the directory once the
    /// call is admitted. The refusal is logged (rate-limited) and returned.
    pub fn admit(
        &self,
        call: PeerCall,
        meta: &MetadataMap,
        certs: Option<&[CertificateDer<'_>]>,
        remote: &str,
    ) -> Result<Caller, Status> {
        let result = self.check(call, meta, certs);
        if let Err(status) = &result {
            let kind = match status.code() {
                Code::PermissionDenied | Code::Unauthenticated => "identity",
                Code::FailedPrecondition => "cluster",
                _ => "malformed",
            };
            if let Some(held_back) = self.warned.allow(kind) {
                warn!(
                    call = call.name(),
                    %remote,
                    code = ?status.code(),
                    reason = status.message(),
                    held_back,
                    "refused a call on the peer port"
                );
            }
        }
        result
    }

    fn check(
        &self,
        call: PeerCall,
        meta: &MetadataMap,
        certs: Option<&[CertificateDer<'_>]>,
    ) -> Result<Caller, Status> {
        let d = &self.directory;
        let certified = if d.tls() {
            Some(self.certified(certs)?)
        } else {
            None
        };

        let text = |key: &str| -> Result<Option<String>, Status> {
            meta.get(key)
                .map(|v| {
                    v.to_str().map(str::to_owned).map_err(|_| {
                        Status::invalid_argument(format!("{key} is not printable ASCII"))
                    })
                })
                .transpose()
        };
        let address = text(CLIENT_ADDRESS)?;
        let Some(id) = text(REPLICA_ID)? else {
            let also = if address.is_some() {
                format!(" ({CLIENT_ADDRESS} was given without it)")
            } else {
                String::new()
            };
            return Err(Status::invalid_argument(format!(
                "{} without {REPLICA_ID}: a replica names itself on every call{also}",
                call.name()
            )));
        };
        let id = id.trim().parse::<NodeId>().map_err(|_| {
            Status::invalid_argument(format!("{REPLICA_ID} {id:?} is not a replica id"))
        })?;

        if let Some(holder) = certified
            && holder != id
        {
            return Err(Status::permission_denied(format!(
                "{REPLICA_ID} says replica {id}, but the client certificate is replica {holder}'s (CN {}): a replica speaks only for itself",
                tls::replica_common_name(holder)
            )));
        }

        match text(CLUSTER)? {
            Some(cluster) if cluster == d.cluster() => {}
            Some(cluster) => {
                return Err(Status::failed_precondition(format!(
                    "replica {id} belongs to cluster {cluster:?}, this is cluster {:?} (replica {}): check --cluster-name and --peers",
                    d.cluster(),
                    d.id()
                )));
            }
            None => {
                return Err(Status::failed_precondition(format!(
                    "replica {id} did not say its cluster ({CLUSTER}); this is cluster {:?}",
                    d.cluster()
                )));
            }
        }

        if id == d.id() {
            return Err(Status::invalid_argument(format!(
                "{REPLICA_ID}: replica {id} is this replica"
            )));
        }
        if d.peer_address(id).is_none() {
            return Err(Status::invalid_argument(format!(
                "{REPLICA_ID}: replica {id} is not a member (replicas {})",
                members(d)
            )));
        }
        if call == PeerCall::Stream
            && let Some(address) = address
        {
            d.learn(id, &address)
                .map_err(|e| Status::invalid_argument(format!("{CLIENT_ADDRESS}: {e}")))?;
        }
        Ok(Caller { id })
    }

    /// The member, other than this replica, that the client certificate
    /// names.
    fn certified(&self, certs: Option<&[CertificateDer<'_>]>) -> Result<NodeId, Status> {
        let d = &self.directory;
        // The handshake requires a certificate; this is for a server
        // assembled without that requirement.
        let Some(leaf) = certs.and_then(<[_]>::first) else {
            return Err(Status::unauthenticated(
                "no client certificate: the peer port takes calls only from replicas' certificates (CN paxoskv-replica-N)",
            ));
        };
        match self.holder(leaf) {
            Err(e) => Err(Status::permission_denied(format!(
                "the client certificate: {e}"
            ))),
            Ok(holder @ Holder::Other(_)) => Err(Status::permission_denied(format!(
                "the client certificate ({holder}) is not a replica's: the peer port takes calls only from replica certificates (CN {}N)",
                tls::REPLICA_CN_PREFIX
            ))),
            Ok(Holder::Replica(n)) if d.peer_address(n).is_none() => {
                Err(Status::permission_denied(format!(
                    "the client certificate names replica {n} (CN {}), which is not a member of this cluster (replicas {})",
                    tls::replica_common_name(n),
                    members(d)
                )))
            }
            Ok(Holder::Replica(n)) if n == d.id() => Err(Status::permission_denied(format!(
                "the client certificate is this replica's own (CN {})",
                tls::replica_common_name(n)
            ))),
            Ok(Holder::Replica(n)) => Ok(n),
        }
    }

    /// Who `cert` names, parsed once per certificate.
    fn holder(&self, cert: &CertificateDer<'_>) -> Result<Holder, String> {
        let mut holders = self.holders.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(known) = holders.get(cert.as_ref()) {
            return known.clone();
        }
        let holder = tls::holder(cert);
        if holders.len() >= HOLDERS_CACHED {
            holders.clear();
        }
        holders.insert(cert.to_vec(), holder.clone());
        holder
    }

    /// Whether a message that says it is `from` may be taken from the
    /// stream `caller` opened: only if they are the same replica. A
    /// message that is not is logged (rate-limited) from `remote`, and is
    /// to be dropped.
    pub fn sent_by(&self, caller: &Caller, from: NodeId, remote: &str) -> bool {
        if from == caller.id {
            return true;
        }
        if let Some(held_back) = self.warned.allow("forged") {
            warn!(
                %remote,
                stream_of = caller.id,
                from,
                held_back,
                "dropped a Paxos message whose sender is not the replica whose stream carries it"
            );
        }
        false
    }
}

/// The member ids, for a message.
fn members(d: &Directory) -> String {
    d.peers()
        .keys()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// At most one event of each kind per period.
#[derive(Debug)]
struct RateLimit {
    period: Duration,
    /// Per kind: when the last one was let through, and how many were held
    /// back since.
    last: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl RateLimit {
    fn new(period: Duration) -> RateLimit {
        RateLimit {
            period,
            last: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(held back since the last one)` if an event of `kind` may be
    /// logged now; `None` (and counted) if not.
    fn allow(&self, kind: &'static str) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match last.get_mut(kind) {
            Some((at, held)) if now.duration_since(*at) < self.period => {
                *held += 1;
                None
            }
            Some((at, held)) => {
                *at = now;
                Some(std::mem::take(held))
            }
            None => {
                last.insert(kind, (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::dial::Dialer;
    use crate::tls::{TlsConfig, generate};

    fn peers() -> BTreeMap<NodeId, String> {
        (1..=3)
            .map(|id| (id, format!("127.0.0.1:{}", 8180 + id)))
            .collect()
    }

    /// Replica 1 of cluster "prod", plaintext.
    fn plain_gate() -> Gate {
        let d = Directory::new(1, peers(), "127.0.0.1:8081".into()).with_cluster("prod");
        Gate::new(Arc::new(d))
    }

    fn meta(pairs: &[(&'static str, &str)]) -> MetadataMap {
        let mut meta = MetadataMap::new();
        for (k, v) in pairs {
            meta.insert(*k, v.parse().expect("ascii"));
        }
        meta
    }

    fn refused(result: Result<Caller, Status>, code: Code, wanted: &[&str]) {
        let status = result.expect_err("refused");
        assert_eq!(status.code(), code, "{status:?}");
        for want in wanted {
            assert!(
                status.message().contains(want),
                "{status:?} should say {want:?}"
            );
        }
    }

    #[test]
    fn a_member_of_this_cluster_is_admitted_and_its_address_learnt() {
        let gate = plain_gate();
        let ok = meta(&[
            (REPLICA_ID, "2"),
            (CLUSTER, "prod"),
            (CLIENT_ADDRESS, "127.0.0.1:8082"),
        ]);
        let caller = gate
            .admit(PeerCall::Stream, &ok, None, "test")
            .expect("admitted");
        assert_eq!(caller, Caller { id: 2 });
        assert_eq!(
            gate.directory().client_address(2).as_deref(),
            Some("127.0.0.1:8082")
        );
        // Only a stream's address is recorded.
        let three = meta(&[
            (REPLICA_ID, "3"),
            (CLUSTER, "prod"),
            (CLIENT_ADDRESS, "127.0.0.1:8083"),
        ]);
        gate.admit(PeerCall::Forward, &three, None, "test")
            .expect("admitted");
        assert_eq!(gate.directory().client_address(3), None);
    }

    #[test]
    fn another_cluster_is_refused_naming_both() {
        let gate = plain_gate();
        for call in [PeerCall::Stream, PeerCall::Snapshot, PeerCall::Forward] {
            refused(
                gate.admit(
                    call,
                    &meta(&[(REPLICA_ID, "2"), (CLUSTER, "staging")]),
                    None,
                    "test",
                ),
                Code::FailedPrecondition,
                &["replica 2 belongs to cluster \"staging\", this is cluster \"prod\""],
            );
            refused(
                gate.admit(call, &meta(&[(REPLICA_ID, "2")]), None, "test"),
                Code::FailedPrecondition,
                &["replica 2 did not say its cluster", CLUSTER],
            );
        }
    }

    #[test]
    fn metadata_must_name_another_member() {
        let gate = plain_gate();
        for (pairs, want) in [
            (vec![(CLUSTER, "prod")], "without x-paxoskv-replica-id"),
            (
                vec![(CLUSTER, "prod"), (CLIENT_ADDRESS, "127.0.0.1:1")],
                "was given without it",
            ),
            (
                vec![(REPLICA_ID, "two"), (CLUSTER, "prod")],
                "is not a replica id",
            ),
            (
                vec![(REPLICA_ID, "7"), (CLUSTER, "prod")],
                "replica 7 is not a member (replicas 1, 2, 3)",
            ),
            (
                vec![(REPLICA_ID, "1"), (CLUSTER, "prod")],
                "is this replica",
            ),
            (
                vec![
                    (REPLICA_ID, "2"),
                    (CLUSTER, "prod"),
                    (CLIENT_ADDRESS, "ftp://x:1"),
                ],
                "unsupported scheme",
            ),
        ] {
            refused(
                gate.admit(PeerCall::Stream, &meta(&pairs), None, "test"),
                Code::InvalidArgument,
                &[want],
            );
        }
    }

    #[test]
    fn a_message_from_another_sender_is_refused() {
        let gate = plain_gate();
        let caller = Caller { id: 2 };
        assert!(gate.sent_by(&caller, 2, "test"));
        assert!(!gate.sent_by(&caller, 3, "test"));
        assert!(!gate.sent_by(&caller, 1, "test"));
    }

    #[test]
    fn with_tls_the_certificate_decides_who_is_calling() {
        let dir = tempfile::tempdir().expect("temp dir");
        let made = generate(dir.path(), &[1, 2, 3, 9], &["127.0.0.1"]).expect("made");
        let own = TlsConfig::load(&made.replicas[&1]).expect("load");
        let d = Directory::new(1, peers(), "127.0.0.1:8081".into())
            .with_cluster("prod")
            .with_dialer(Dialer::tls(&own));
        let gate = Gate::new(Arc::new(d));
        let der = |files: &tls::TlsFiles| {
            let pem = std::fs::read(&files.cert).expect("read");
            rustls_pki_types::pem::PemObject::from_pem_slice(&pem).expect("pem")
        };
        let two: CertificateDer<'static> = der(&made.replicas[&2]);
        let three = der(&made.replicas[&3]);
        let nine = der(&made.replicas[&9]);
        let one = der(&made.replicas[&1]);
        let client = der(&made.client);
        let as_two = meta(&[(REPLICA_ID, "2"), (CLUSTER, "prod")]);

        let caller = gate
            .admit(
                PeerCall::Stream,
                &as_two,
                Some(std::slice::from_ref(&two)),
                "test",
            )
            .expect("replica 2 with its own certificate");
        assert_eq!(caller.id, 2);

        // Replica 3's certificate, claiming to be replica 2.
        refused(
            gate.admit(
                PeerCall::Stream,
                &as_two,
                Some(std::slice::from_ref(&three)),
                "test",
            ),
            Code::PermissionDenied,
            &["says replica 2", "replica 3's (CN paxoskv-replica-3)"],
        );
        // A client certificate, whatever the metadata says.
        for call in [PeerCall::Stream, PeerCall::Snapshot, PeerCall::Forward] {
            refused(
                gate.admit(call, &as_two, Some(std::slice::from_ref(&client)), "test"),
                Code::PermissionDenied,
                &["CN \"paxoskv-client\"", "is not a replica's"],
            );
        }
        refused(
            gate.admit(
                PeerCall::Stream,
                &meta(&[(REPLICA_ID, "9"), (CLUSTER, "prod")]),
                Some(std::slice::from_ref(&nine)),
                "test",
            ),
            Code::PermissionDenied,
            &["names replica 9", "not a member", "(replicas 1, 2, 3)"],
        );
        refused(
            gate.admit(
                PeerCall::Stream,
                &meta(&[(REPLICA_ID, "1"), (CLUSTER, "prod")]),
                Some(std::slice::from_ref(&one)),
                "test",
            ),
            Code::PermissionDenied,
            &["this replica's own"],
        );
        refused(
            gate.admit(PeerCall::Stream, &as_two, None, "test"),
            Code::Unauthenticated,
            &["no client certificate"],
        );
        refused(
            gate.admit(PeerCall::Stream, &as_two, Some(&[]), "test"),
            Code::Unauthenticated,
            &["no client certificate"],
        );
    }

    #[test]
    fn the_rate_limit_lets_one_through_per_period_and_counts_the_rest() {
        let limit = RateLimit::new(Duration::from_secs(3600));
        assert_eq!(limit.allow("a"), Some(0));
        assert_eq!(limit.allow("a"), None);
        assert_eq!(limit.allow("a"), None);
        assert_eq!(limit.allow("b"), Some(0), "kinds are limited apart");
        let limit = RateLimit::new(Duration::ZERO);
        assert_eq!(limit.allow("a"), Some(0));
        assert_eq!(limit.allow("a"), Some(0));
    }
}
