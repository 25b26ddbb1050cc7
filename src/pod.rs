//! A replica's configuration from its pod's identity, as a StatefulSet
//! gives it: no per-pod settings.
//!
//! A StatefulSet named `paxoskv` names its pods `paxoskv-0`, `paxoskv-1`,
//! ..., and its headless Service (here also `paxoskv`) gives each a stable
//! DNS name, `paxoskv-2.paxoskv.NAMESPACE.svc.cluster.local`. From the pod's
//! name, the number of replicas and that domain, every replica derives the
//! same thing `--id`, `--peers` and `--advertise-client` would say:
//!
//! - its id: the ordinal plus one (`paxoskv-2` is replica 3; ids start at
//!   1, ordinals at 0);
//! - `--peers`: `1=paxoskv-0.DOMAIN:PEER_PORT,2=paxoskv-1.DOMAIN:PEER_PORT,...`,
//!   the peer port being this replica's own (`--peer-listen`'s): every pod
//!   of a StatefulSet listens on the same one;
//! - its client address: `paxoskv-2.DOMAIN:CLIENT_PORT` (`--listen`'s port).
//!
//! The names are not resolved here: a peer's DNS record appears only once
//! its pod exists, and the transport dials (so resolves) lazily and keeps
//! retrying (see [`crate::transport`]).
//!
//! Sans-IO: pure functions of their arguments; `main.rs` reads the flags
//! and the environment.

use std::collections::BTreeMap;

use crate::paxos::NodeId;

/// The numbers of replicas a cluster made from a StatefulSet may have: odd
/// (an even number tolerates no more failures than one fewer), and small
/// (every write waits for a majority). Membership is fixed at creation.
pub const REPLICA_COUNTS: [u32; 4] = [1, 3, 5, 7];

/// A pod name split into its StatefulSet's name and its ordinal:
/// `paxoskv-2` is `("paxoskv", 2)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodName {
    /// The StatefulSet's name: the pod name without `-ORDINAL`.
    pub set: String,
    /// The pod's ordinal, from 0.
    pub ordinal: u32,
}

impl PodName {
    /// Splits `name` at its last `-`. Refused, saying what a StatefulSet's
    /// pod name looks like: a name without a numeric ordinal after a `-`,
    /// or with a leading zero (`paxoskv-02`, which no StatefulSet makes).
    pub fn parse(name: &str) -> Result<PodName, String> {
        let name = name.trim();
        let refuse = |why: &str| {
            Err(format!(
                "pod name {name:?} {why}: a StatefulSet names its pods NAME-0, NAME-1, ...; \
                 run in a StatefulSet, or set --pod-name (PAXOSKV_POD_NAME), or give --id and --peers instead of --peers-from-dns"
            ))
        };
        let Some((set, ordinal)) = name.rsplit_once('-') else {
            return refuse("has no ordinal");
        };
        if set.is_empty() {
            return refuse("has no StatefulSet name before its ordinal");
        }
        if ordinal.is_empty() || !ordinal.bytes().all(|b| b.is_ascii_digit()) {
            return refuse("has no ordinal");
        }
        if ordinal.len() > 1 && ordinal.starts_with('0') {
            return refuse("has an ordinal with a leading zero");
        }
        let Ok(ordinal) = ordinal.parse::<u32>() else {
            return refuse("has an ordinal out of range");
        };
        check_dns_label(set).map_err(|e| format!("pod name {name:?}: {e}"))?;
        Ok(PodName {
            set: set.to_string(),
            ordinal,
        })
    }

    /// The replica id this pod runs: its ordinal plus one.
    pub fn id(&self) -> NodeId {
        self.ordinal + 1
    }

    /// The name of the pod with ordinal `ordinal` of the same StatefulSet.
    pub fn sibling(&self, ordinal: u32) -> String {
        format!("{}-{ordinal}", self.set)
    }
}

/// `--peers-from-dns DOMAIN[:PORT]`: the domain under which each pod has
/// its name (`SERVICE.NAMESPACE.svc.cluster.local`, the headless Service's),
/// and optionally the peer port (by default `--peer-listen`'s).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerDomain {
    /// `SERVICE.NAMESPACE.svc.cluster.local`, lower case, without a
    /// trailing dot.
    pub domain: String,
    /// The peer port, if given.
    pub port: Option<u16>,
}

impl PeerDomain {
    /// Parses `DOMAIN` or `DOMAIN:PORT`. Refused, naming the flag: an empty
    /// domain, a label that is not a DNS label, a port that is not 1 to
    /// 65535, or a scheme (`http://`), which belongs to no DNS name.
    pub fn parse(s: &str) -> Result<PeerDomain, String> {
        let given = s.trim();
        let flag = |why: String| format!("--peers-from-dns {given:?}: {why}");
        if given.contains("://") {
            return Err(flag(
                "give a DNS domain (SERVICE.NAMESPACE.svc.cluster.local[:PORT]), no scheme".into(),
            ));
        }
        let (domain, port) = match given.rsplit_once(':') {
            Some((domain, port)) => {
                let port = port
                    .parse::<u16>()
                    .ok()
                    .filter(|&p| p != 0)
                    .ok_or_else(|| flag(format!("{port:?} is not a port from 1 to 65535")))?;
                (domain, Some(port))
            }
            None => (given, None),
        };
        let domain = domain
            .strip_suffix('.')
            .unwrap_or(domain)
            .to_ascii_lowercase();
        if domain.is_empty() {
            return Err(flag(
                "no domain; expected SERVICE.NAMESPACE.svc.cluster.local[:PORT]".into(),
            ));
        }
        for label in domain.split('.') {
            check_dns_label(label).map_err(flag)?;
        }
        Ok(PeerDomain { domain, port })
    }
}

/// What a pod's identity gives: what `--id`, `--peers` and
/// `--advertise-client` would otherwise say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Derived {
    /// This replica's id.
    pub id: NodeId,
    /// Every replica's peer address, this one's included, as `--peers`.
    pub peers: BTreeMap<NodeId, String>,
    /// This replica's stable client address, as `--advertise-client`.
    pub client_address: String,
}

/// The configuration of pod `pod` of a cluster of `replicas` replicas whose
/// pods are named under `dns`, listening for peers on `peer_port` and for
/// clients on `client_port`. Refused, naming the flag: a replica count not
/// in [`REPLICA_COUNTS`], a pod whose ordinal is not below it, or a peer
/// port in `dns` other than `peer_port` (the others would dial a port
/// nobody listens on).
pub fn derive(
    pod: &PodName,
    replicas: u32,
    dns: &PeerDomain,
    peer_port: u16,
    client_port: u16,
) -> Result<Derived, String> {
    if !REPLICA_COUNTS.contains(&replicas) {
        return Err(format!(
            "--replicas {replicas}: a cluster has {} replicas (3 or 5 in production), fixed when it is created",
            REPLICA_COUNTS
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if pod.ordinal >= replicas {
        return Err(format!(
            "pod {} has ordinal {}, but --replicas is {replicas} (pods {} to {}): \
             membership is fixed when the cluster is created; scale the StatefulSet back to {replicas}",
            pod.sibling(pod.ordinal),
            pod.ordinal,
            pod.sibling(0),
            pod.sibling(replicas - 1),
        ));
    }
    if let Some(port) = dns.port
        && port != peer_port
    {
        return Err(format!(
            "--peers-from-dns {}:{port} names peer port {port}, but --peer-listen is on port {peer_port}: \
             every replica listens for its peers on the port the others dial",
            dns.domain
        ));
    }
    let name = |ordinal: u32| format!("{}.{}", pod.sibling(ordinal), dns.domain);
    Ok(Derived {
        id: pod.id(),
        peers: (0..replicas)
            .map(|ordinal| (ordinal + 1, format!("{}:{peer_port}", name(ordinal))))
            .collect(),
        client_address: format!("{}:{client_port}", name(pod.ordinal)),
    })
}

/// Refuses an `--id` given beside `--peers-from-dns` that is not the one
/// the pod's name gives.
pub fn check_id(given: Option<NodeId>, derived: &Derived, pod: &PodName) -> Result<(), String> {
    match given {
        Some(id) if id != derived.id => Err(format!(
            "--id {id} disagrees with the pod's name: pod {} is replica {} (its ordinal {} plus one); \
             leave out --id (PAXOSKV_ID) with --peers-from-dns",
            pod.sibling(pod.ordinal),
            derived.id,
            pod.ordinal
        )),
        _ => Ok(()),
    }
}

/// Whether `label` is a DNS label as Kubernetes names go (RFC 1123): 1 to
/// 63 lower-case letters, digits and `-`, starting and ending with a letter
/// or digit.
fn check_dns_label(label: &str) -> Result<(), String> {
    let ok = !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{label:?} is not a DNS label (1 to 63 of a-z, 0-9 and '-', not starting or ending with '-')"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOMAIN: &str = "paxoskv.NS.svc.cluster.local";

    fn dns(s: &str) -> PeerDomain {
        PeerDomain::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn paxoskv_2_is_replica_3_with_every_peers_stable_name() {
        let pod = PodName::parse("paxoskv-2").expect("a StatefulSet pod name");
        assert_eq!(
            pod,
            PodName {
                set: "paxoskv".into(),
                ordinal: 2
            }
        );
        let derived = derive(&pod, 3, &dns(DOMAIN), 8080, 8081).expect("derives");
        assert_eq!(derived.id, 3);
        assert_eq!(
            derived.peers,
            BTreeMap::from([
                (1, "paxoskv-0.paxoskv.ns.svc.cluster.local:8080".to_string()),
                (2, "paxoskv-1.paxoskv.ns.svc.cluster.local:8080".to_string()),
                (3, "paxoskv-2.paxoskv.ns.svc.cluster.local:8080".to_string()),
            ])
        );
        assert_eq!(
            derived.client_address,
            "paxoskv-2.paxoskv.ns.svc.cluster.local:8081"
        );
        // What --peers would be: every address is one dial accepts.
        for addr in derived.peers.values() {
            crate::dial::check_form(addr).expect("a dialable form");
        }
    }

    #[test]
    fn every_pod_of_the_set_derives_the_same_peers_and_its_own_id() {
        let domain = dns("db.prod.svc.cluster.local.:7000");
        let all: Vec<Derived> = (0..5)
            .map(|i| {
                let pod = PodName::parse(&format!("kv-store-{i}")).unwrap();
                derive(&pod, 5, &domain, 7000, 7001).unwrap()
            })
            .collect();
        for (i, d) in all.iter().enumerate() {
            assert_eq!(d.id, i as u32 + 1);
            assert_eq!(d.peers, all[0].peers);
            assert_eq!(
                d.peers[&d.id],
                format!("kv-store-{i}.db.prod.svc.cluster.local:7000")
            );
        }
    }

    #[test]
    fn a_name_without_an_ordinal_is_refused_with_a_clear_message() {
        for (name, want) in [
            ("paxoskv", "has no ordinal"),
            ("paxoskv-", "has no ordinal"),
            ("paxoskv-abc", "has no ordinal"),
            ("paxoskv-7f9c8d-x2p4q", "has no ordinal"),
            ("-3", "no StatefulSet name"),
            ("paxoskv-02", "leading zero"),
            ("paxoskv-99999999999", "out of range"),
            ("", "has no ordinal"),
        ] {
            let err = PodName::parse(name).expect_err(name);
            assert!(err.contains(want), "{name:?}: {err}");
            assert!(
                err.contains(&format!("{:?}", name.trim())) && err.contains("NAME-0, NAME-1"),
                "{name:?}: {err} should name it and say what is expected"
            );
            assert!(err.contains("--pod-name"), "{err}");
        }
        let err = PodName::parse("Paxos_KV-1").expect_err("not a DNS label");
        assert!(err.contains("not a DNS label"), "{err}");
    }

    #[test]
    fn a_pod_beyond_the_replica_count_or_a_count_that_cannot_work_is_refused() {
        let pod = PodName::parse("paxoskv-3").unwrap();
        let err = derive(&pod, 3, &dns(DOMAIN), 8080, 8081).expect_err("ordinal 3 of 3");
        assert!(
            err.contains(
                "pod paxoskv-3 has ordinal 3, but --replicas is 3 (pods paxoskv-0 to paxoskv-2)"
            ),
            "{err}"
        );
        for n in [0, 2, 4, 9] {
            let pod = PodName::parse("paxoskv-0").unwrap();
            let err = derive(&pod, n, &dns(DOMAIN), 8080, 8081).expect_err("even or too many");
            assert!(err.contains(&format!("--replicas {n}")), "{err}");
        }
    }

    #[test]
    fn the_domain_is_checked_and_its_port_must_be_the_peer_port() {
        assert_eq!(
            dns("paxoskv.default.svc.cluster.local"),
            PeerDomain {
                domain: "paxoskv.default.svc.cluster.local".into(),
                port: None
            }
        );
        assert_eq!(dns("paxoskv.default:8181").port, Some(8181));
        for (bad, want) in [
            ("", "no domain"),
            (":8181", "no domain"),
            ("http://paxoskv.default:8181", "no scheme"),
            ("paxoskv..default", "not a DNS label"),
            ("paxoskv_svc.default", "not a DNS label"),
            ("paxoskv.default:0", "not a port"),
            ("paxoskv.default:http", "not a port"),
        ] {
            let err = PeerDomain::parse(bad).expect_err(bad);
            assert!(
                err.starts_with("--peers-from-dns") && err.contains(want),
                "{bad:?}: {err}"
            );
        }
        let pod = PodName::parse("paxoskv-0").unwrap();
        let err = derive(&pod, 3, &dns("paxoskv.default:9999"), 8181, 8081).expect_err("ports");
        assert!(
            err.contains("names peer port 9999, but --peer-listen is on port 8181"),
            "{err}"
        );
        derive(&pod, 3, &dns("paxoskv.default:8181"), 8181, 8081).expect("the same port");
    }

    #[test]
    fn an_id_that_disagrees_with_the_pod_name_is_refused() {
        let pod = PodName::parse("paxoskv-1").unwrap();
        let derived = derive(&pod, 3, &dns(DOMAIN), 8080, 8081).unwrap();
        check_id(None, &derived, &pod).expect("no --id");
        check_id(Some(2), &derived, &pod).expect("the same id");
        let err = check_id(Some(1), &derived, &pod).expect_err("another id");
        assert!(
            err.contains("--id 1 disagrees with the pod's name: pod paxoskv-1 is replica 2"),
            "{err}"
        );
    }
}
