//! Mutual TLS and who a peer is, on real processes.
//!
//! - A 3-replica cluster with mutual TLS (certificates made here with
//!   rcgen) takes writes through every replica (followers forward over
//!   TLS), sends a snapshot to a follower that lost its data (over TLS),
//!   serves the CLI and real grpcurl that present a client
//!   certificate, and refuses grpcurl without one, or in plaintext, on
//!   both ports. On the peer port it refuses a certificate of another CA,
//!   a client certificate, and a replica's certificate speaking for another
//!   replica; the cluster's state is unchanged by what they sent, while
//!   the same message from the replica it names is heard.
//! - Without TLS: a Paxos message whose sender is not the stream's replica
//!   is dropped; a replica started with another `--cluster-name` is
//!   refused by its peers, and both sides log why.
//! - `paxoskv cluster --tls` makes its certificates and prints grpcurl
//!   lines that work; TLS flags that cannot work are refused at start.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Cluster, ClusterTls, PeerForm, grpcurl};
use paxoskv::pb;
use paxoskv::pb::paxos_client::PaxosClient;
use paxoskv::tls::TlsFiles;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A CA made here, that signs certificates into its directory.
struct TestCa {
    name: String,
    dir: PathBuf,
    cert: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    fn new(dir: &Path, name: &str) -> TestCa {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        let path = dir.join(format!("{name}.pem"));
        std::fs::write(&path, cert.pem()).expect("write the CA");
        TestCa {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            cert: path,
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate with Common Name `cn`, for 127.0.0.1 and localhost,
    /// good for servers and clients.
    fn sign(&self, cn: &str) -> TlsFiles {
        let sans = vec!["127.0.0.1".to_string(), "localhost".to_string()];
        let mut params = CertificateParams::new(sans).expect("names");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let stem = self.dir.join(format!("{}-{cn}", self.name));
        let cert_path = stem.with_extension("pem");
        let key_path = PathBuf::from(format!("{}-key.pem", stem.display()));
        std::fs::write(&cert_path, cert.pem()).expect("write the certificate");
        std::fs::write(&key_path, key.serialize_pem()).expect("write the key");
        TlsFiles {
            cert: cert_path,
            key: key_path,
            ca: self.cert.clone(),
        }
    }
}

/// What one grpcurl run printed.
#[derive(Debug)]
struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn grpcurl_run(args: &[&str]) -> Out {
    let mut all = vec!["-max-time", "10", "-connect-timeout", "3"];
    all.extend_from_slice(args);
    let out = Command::new(grpcurl())
        .args(&all)
        .output()
        .expect("run grpcurl");
    Out {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// grpcurl's flags to present `who` and trust its CA.
fn grpcurl_tls(who: &TlsFiles) -> Vec<String> {
    vec![
        "-cacert".into(),
        who.ca.display().to_string(),
        "-cert".into(),
        who.cert.display().to_string(),
        "-key".into(),
        who.key.display().to_string(),
    ]
}

/// grpcurl with the repository's protos (the peer port serves no
/// reflection).
fn protos() -> Vec<String> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/proto");
    [
        "-import-path",
        dir,
        "-proto",
        "paxoskv/v1/replica.proto",
        "-proto",
        "paxoskv/v1/kv.proto",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn args(parts: &[&[String]], rest: &[&str]) -> Vec<String> {
    let mut all: Vec<String> = parts.iter().flat_map(|p| p.iter().cloned()).collect();
    all.extend(rest.iter().map(|s| s.to_string()));
    all
}

fn grpcurl_with(all: &[String]) -> Out {
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    grpcurl_run(&refs)
}

/// A TLS connection to `addr` presenting `who`'s certificate and trusting
/// `server_ca`, made by hand (not through paxoskv, which would refuse a
/// certificate that its CA did not sign).
async fn connect_as(addr: &str, who: &TlsFiles, server_ca: &Path) -> Result<Channel, String> {
    let read = |p: &Path| std::fs::read(p).expect("read a PEM file");
    let tls = ClientTlsConfig::new()
        .identity(Identity::from_pem(read(&who.cert), read(&who.key)))
        .ca_certificate(Certificate::from_pem(read(server_ca)));
    Endpoint::from_shared(format!("https://{addr}"))
        .expect("uri")
        .tls_config(tls)
        .expect("TLS configuration")
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

/// A Prepare claiming to come from `from`, with a ballot far above the
/// cluster's.
fn prepare(from: u32, round: u64) -> pb::PeerMessage {
    pb::PeerMessage {
        from,
        kind: Some(pb::peer_message::Kind::Prepare(pb::Prepare {
            ballot: Some(pb::Ballot { round, node: from }),
            from_slot: 1,
            handed_off_by: None,
        })),
    }
}

/// Opens a Paxos stream on `channel` that says it is replica `declared` of
/// cluster `paxoskv`, sends `msg`, and keeps it open a moment so that it
/// is read; the status if the stream is refused.
async fn speak(channel: Channel, declared: u32, msg: pb::PeerMessage) -> Result<(), tonic::Status> {
    let mut client = PaxosClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(msg).await.expect("queue the message");
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request.set_timeout(Duration::from_secs(5));
    let meta = request.metadata_mut();
    meta.insert("x-paxoskv-replica-id", declared.into());
    meta.insert("x-paxoskv-cluster", "paxoskv".parse().expect("ascii"));
    let call = client.stream(request).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(call);
    drop(tx);
    Ok(())
}

/// Waits up to `within` for `cond` on replica `id`'s log; panics with the
/// log if it never holds.
fn wait_log(cluster: &Cluster, id: u32, within: Duration, what: &str, cond: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + within;
    loop {
        let log = strip_ansi(&cluster.log(id));
        if cond(&log) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "replica {id}'s log never showed {what}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `text` without ANSI colour sequences (ESC [ ... m), which the log
/// writer puts around field names.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Waits (up to 5 s) until replica `id` has promised a ballot of at
/// least round `round`.
async fn wait_promised(cluster: &Cluster, id: u32, round: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = cluster.status(id).await.expect("status");
        if now.ballot_round >= round {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "replica {id} never promised {what}: {now:?}\n{}",
            cluster.log(id)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mutual_tls_cluster_serves_certified_clients_and_replicas_only() {
    let certs = tempfile::tempdir().expect("temp dir");
    let ca = TestCa::new(certs.path(), "cluster-ca");
    let tls = ClusterTls {
        replicas: (1..=3)
            .map(|id| (id, ca.sign(&format!("paxoskv-replica-{id}"))))
            .collect(),
        client: ca.sign("paxoskv-client"),
    };
    // https:// in --peers: valid with TLS on. Frequent snapshots, so that
    // a replica that lost its data is sent one (over TLS).
    let mut cluster = Cluster::start_tls(
        "tls",
        3,
        PeerForm::Https,
        tls.clone(),
        &["--snapshot-every", "40", "--log-keep", "10"],
    );
    for id in 1..=3 {
        cluster.wait_ready(id, Duration::from_secs(20)).await;
    }

    // Writes through every replica: the followers forward to the leader's
    // peer port, over TLS.
    for id in 1..=3 {
        let mut client = cluster.client(id).await;
        let mut request = tonic::Request::new(pb::UpsertRequest {
            key: format!("via-{id}"),
            value: Some(id as i32),
            request_id: None,
        });
        request.set_timeout(Duration::from_secs(5));
        client
            .upsert(request)
            .await
            .unwrap_or_else(|s| panic!("upsert through replica {id}: {s}\n{}", cluster.log(id)));
    }
    for id in 1..=3 {
        let mut client = cluster.client(id).await;
        for key in 1..=3 {
            let got = client
                .get(pb::GetRequest {
                    key: format!("via-{key}"),
                })
                .await
                .unwrap_or_else(|s| panic!("get via-{key} from replica {id}: {s}"))
                .into_inner()
                .value;
            assert_eq!(got, key, "replica {id}, key via-{key}");
        }
    }

    // The CLI, over https://, with the client certificate.
    let cli = Command::new(common::binary())
        .args(["get", "via-2", "--endpoint"])
        .arg(format!("https://{}", cluster.addrs[&3]))
        .arg("--tls-cert")
        .arg(&tls.client.cert)
        .arg("--tls-key")
        .arg(&tls.client.key)
        .arg("--tls-ca")
        .arg(&tls.client.ca)
        .output()
        .expect("run paxoskv get");
    assert!(
        cli.status.success() && String::from_utf8_lossy(&cli.stdout).trim() == "2",
        "paxoskv get over TLS: {cli:?}"
    );
    // And without a certificate: refused.
    let cli = Command::new(common::binary())
        .args(["get", "via-2", "--timeout-ms", "2000", "--endpoint"])
        .arg(&cluster.addrs[&3])
        .output()
        .expect("run paxoskv get");
    assert!(!cli.status.success(), "plaintext CLI got in: {cli:?}");

    // grpcurl with the client certificate, on every replica.
    let client_tls = grpcurl_tls(&tls.client);
    for id in 1..=3 {
        let addr = cluster.addrs[&id].as_str();
        let list = grpcurl_with(&args(&[&client_tls], &[addr, "list"]));
        assert!(
            list.ok && list.stdout.contains("paxoskv.v1.KvStore"),
            "{list:?}"
        );
        let body = format!(r#"{{"key":"grpcurl-{id}","value":{id}}}"#);
        let upsert = grpcurl_with(&args(
            &[&client_tls],
            &["-d", &body, addr, "paxoskv.v1.KvStore/Upsert"],
        ));
        assert!(
            upsert.ok && upsert.stdout.contains("inserted"),
            "{upsert:?}"
        );
        let get = grpcurl_with(&args(
            &[&client_tls],
            &["-d", r#"{"key":"via-1"}"#, addr, "paxoskv.v1.KvStore/Get"],
        ));
        assert!(get.ok && get.stdout.contains(r#""value": 1"#), "{get:?}");
    }

    // No client certificate, or no TLS at all: refused on both ports, for
    // calls that succeed with the right certificates (above, and the
    // Forward below).
    let ca_only = vec!["-cacert".to_string(), tls.client.ca.display().to_string()];
    let plaintext = vec!["-plaintext".to_string()];
    let as_replica_two = [
        "-H",
        "x-paxoskv-replica-id: 2",
        "-H",
        "x-paxoskv-cluster: paxoskv",
        "-d",
        r#"{"calls":[{"id":1,"timeout_micros":5000000,"call":{"get":{"key":"via-3"}}}]}"#,
    ];
    for id in 1..=3 {
        let client_port = cluster.addrs[&id].as_str();
        let mut peer_call = as_replica_two.to_vec();
        peer_call.extend([cluster.peer_addrs[&id].as_str(), "paxoskv.v1.Paxos/Forward"]);
        for (how, flags) in [
            ("without a client certificate", &ca_only),
            ("in plaintext", &plaintext),
        ] {
            let list = grpcurl_with(&args(&[flags], &[client_port, "list"]));
            assert!(!list.ok, "client port {client_port} {how}: {list:?}");
            let forward = grpcurl_with(&args(&[flags, &protos()], &peer_call));
            assert!(!forward.ok, "peer port of replica {id} {how}: {forward:?}");
        }
    }
    // With the client certificate, the peer port is still closed: a
    // client's certificate names no replica.
    for method in ["Forward", "Snapshot"] {
        let body = if method == "Forward" {
            r#"{"calls":[{"id":1,"call":{"get":{"key":"via-1"}}}]}"#
        } else {
            r#"{"from":2}"#
        };
        let out = grpcurl_with(&args(
            &[&client_tls, &protos()],
            &[
                "-H",
                "x-paxoskv-replica-id: 2",
                "-H",
                "x-paxoskv-cluster: paxoskv",
                "-d",
                body,
                &cluster.peer_addrs[&1],
                &format!("paxoskv.v1.Paxos/{method}"),
            ],
        ));
        assert!(
            !out.ok
                && out.stderr.contains("Code: PermissionDenied")
                && out.stderr.contains("paxoskv-client"),
            "{method} with a client certificate: {out:?}"
        );
    }
    // A replica's certificate there is heard, as its own calls are.
    let replica_two = grpcurl_tls(&tls.replicas[&2]);
    for id in [1, 3] {
        let mut peer_call = as_replica_two.to_vec();
        peer_call.extend([cluster.peer_addrs[&id].as_str(), "paxoskv.v1.Paxos/Forward"]);
        let forward = grpcurl_with(&args(&[&replica_two, &protos()], &peer_call));
        assert!(
            forward.ok && forward.stdout.contains(r#""value": 3"#),
            "replica 2's certificate on replica {id}'s peer port: {forward:?}"
        );
    }

    // A follower loses its data while the others write on and compact
    // past it: it rejoins by fetching a snapshot, over TLS.
    let leader = cluster.leader(Duration::from_secs(10)).await;
    let wiped = (1..=3).find(|&id| id != leader).expect("a follower");
    cluster.kill(wiped);
    std::fs::remove_dir_all(cluster.dir.join(format!("data-{wiped}"))).expect("delete its data");
    let mut client = cluster.client(leader).await;
    for n in 0..120 {
        let mut request = tonic::Request::new(pb::UpsertRequest {
            key: format!("bulk-{n}"),
            value: Some(n),
            request_id: None,
        });
        request.set_timeout(Duration::from_secs(5));
        client
            .upsert(request)
            .await
            .unwrap_or_else(|s| panic!("write {n} through the leader: {s}"));
    }
    cluster.spawn(wiped);
    wait_log(
        &cluster,
        wiped,
        Duration::from_secs(30),
        "its rejoin by snapshot",
        |log| log.contains("fetching a snapshot") && log.contains("voting again"),
    );
    let installed = cluster
        .scrape(wiped)
        .ok()
        .and_then(|page| common::sample(&page, "paxoskv_snapshots_installed_total"));
    assert!(
        installed >= Some(1.0),
        "replica {wiped} installed {installed:?} snapshots"
    );
    let got = cluster
        .client(wiped)
        .await
        .get(pb::GetRequest {
            key: "bulk-119".into(),
        })
        .await
        .expect("a read through the rejoined replica")
        .into_inner()
        .value;
    assert_eq!(got, 119);

    // Strangers on the peer port of a follower, each sending a Prepare
    // that would depose the leader.
    let leader = cluster.leader(Duration::from_secs(10)).await;
    let target = (1..=3).find(|&id| id != leader).expect("a follower");
    let third = (1..=3)
        .find(|&id| id != leader && id != target)
        .expect("another follower");
    let peer_port = cluster.peer_addrs[&target].clone();
    let before = cluster.status(target).await.expect("status");
    let forged = before.ballot_round + 1000;

    // A certificate of another CA, naming the leader: the handshake fails.
    let other_ca = TestCa::new(certs.path(), "other-ca");
    let impostor = other_ca.sign(&format!("paxoskv-replica-{leader}"));
    let refused = match connect_as(&peer_port, &impostor, &ca.cert).await {
        Err(e) => e,
        Ok(channel) => match speak(channel, leader, prepare(leader, forged)).await {
            Err(status) => format!("{status:?}"),
            Ok(()) => panic!("a certificate of another CA opened a Paxos stream"),
        },
    };
    assert!(!refused.is_empty());
    // Nor can it read through the client port.
    let read = match connect_as(&cluster.addrs[&target], &impostor, &ca.cert).await {
        Err(e) => Err(e),
        Ok(channel) => pb::kv_store_client::KvStoreClient::new(channel)
            .get(pb::GetRequest {
                key: "via-1".into(),
            })
            .await
            .map_err(|s| format!("{s:?}")),
    };
    assert!(
        read.is_err(),
        "a certificate of another CA read through the client port: {read:?}"
    );

    // The right CA, but a client's certificate.
    let channel = connect_as(&peer_port, &tls.client, &ca.cert)
        .await
        .expect("a client certificate passes the handshake");
    let status = speak(channel.clone(), leader, prepare(leader, forged))
        .await
        .expect_err("a client certificate cannot open a Paxos stream");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("CN \"paxoskv-client\"")
            && status.message().contains("not a replica's"),
        "{status:?}"
    );
    let mut paxos = PaxosClient::new(channel);
    let snapshot = paxos
        .snapshot(pb::SnapshotRequest {
            from: leader,
            min_index: 0,
        })
        .await
        .expect_err("a client certificate cannot fetch a snapshot");
    assert_eq!(snapshot.code(), Code::PermissionDenied, "{snapshot:?}");

    // A replica's certificate, speaking for another replica.
    let channel = connect_as(&peer_port, &tls.replicas[&third], &ca.cert)
        .await
        .expect("a replica certificate passes the handshake");
    let status = speak(channel.clone(), leader, prepare(leader, forged))
        .await
        .expect_err("a replica's certificate cannot speak for another replica");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains(&format!(
            "says replica {leader}, but the client certificate is replica {third}'s (CN paxoskv-replica-{third})"
        )),
        "{status:?}"
    );

    // Nothing they sent reached the acceptor.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = cluster.status(target).await.expect("status");
    assert!(
        after.ballot_round < forged,
        "replica {target} promised a ballot a stranger sent: {after:?}"
    );
    assert_eq!(after.leader, leader, "{after:?}");
    wait_log(
        &cluster,
        target,
        Duration::from_secs(5),
        "the refusal",
        |log| log.contains("refused a call on the peer port") && log.contains("PermissionDenied"),
    );

    // The same Prepare, on a stream opened with the leader's own
    // certificate, is promised: the refusals above are what stopped it.
    // (A follower that hears its leader ignores another follower's
    // Prepare, so only the leader's name makes it do harm.)
    let channel = connect_as(&peer_port, &tls.replicas[&leader], &ca.cert)
        .await
        .expect("the leader's certificate passes the handshake");
    speak(channel, leader, prepare(leader, forged))
        .await
        .unwrap_or_else(|s| panic!("a stream with the leader's own certificate: {s:?}"));
    wait_promised(&cluster, target, forged, "the leader's own Prepare").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paxos_message_with_a_forged_sender_is_dropped() {
    let cluster = Cluster::start("forged-from", 3);
    cluster.wait_ready(1, Duration::from_secs(15)).await;
    let leader = cluster.leader(Duration::from_secs(10)).await;
    let target = (1..=3).find(|&id| id != leader).expect("a follower");
    let third = (1..=3)
        .find(|&id| id != leader && id != target)
        .expect("another follower");
    let before = cluster.status(target).await.expect("status");
    let forged = before.ballot_round + 1000;
    let channel = common::channel(&cluster.peer_addrs[&target]);

    // A stream that says it is replica `third`, carrying a Prepare that
    // says it is the leader's.
    speak(channel.clone(), third, prepare(leader, forged))
        .await
        .expect("a member's stream opens");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = cluster.status(target).await.expect("status");
    assert!(
        after.ballot_round < forged,
        "replica {target} promised a Prepare whose sender was forged: {after:?}"
    );
    assert_eq!(after.leader, leader, "{after:?}");
    wait_log(
        &cluster,
        target,
        Duration::from_secs(5),
        "the drop",
        |log| {
            log.contains(
                "dropped a Paxos message whose sender is not the replica whose stream carries it",
            ) && log.contains(&format!("stream_of={third}"))
                && log.contains(&format!("from={leader}"))
        },
    );

    // The same Prepare on a stream that says it is the leader's is
    // promised: only the stream's declared replica differed. (Without TLS
    // that declaration is a claim anyone on the peer port can make: the
    // README's Ports section says why the port must be closed, or TLS on.)
    speak(channel, leader, prepare(leader, forged))
        .await
        .expect("a member's stream opens");
    wait_promised(
        &cluster,
        target,
        forged,
        "the Prepare on the leader's stream",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_of_another_cluster_is_refused_by_its_peers() {
    // A new cluster starts only once every replica has answered that it
    // is new; so start all three, then replace replica 3 (a fresh data
    // directory) with one of cluster "staging".
    let mut cluster = Cluster::start("other-cluster", 3);
    cluster.wait_ready(1, Duration::from_secs(20)).await;
    cluster.kill(3);
    std::fs::remove_dir_all(cluster.dir.join("data-3")).expect("remove replica 3's data");
    std::fs::rename(
        cluster.dir.join("replica-3.log"),
        cluster.dir.join("replica-3.old.log"),
    )
    .expect("keep the first log apart");
    cluster.spawn_with(3, &["--cluster-name", "staging"]);

    // Replicas 1 and 2 are a quorum, and take writes (once one of them
    // leads: replica 3 may have been the leader).
    cluster.wait_ready(2, Duration::from_secs(20)).await;
    let mut client = cluster.client(2).await;
    client
        .upsert(pb::UpsertRequest {
            key: "k".into(),
            value: Some(1),
            request_id: None,
        })
        .await
        .expect("a write with two of three");

    // Both of them refuse replica 3, naming both clusters...
    let refusal = "replica 3 belongs to cluster \\\"staging\\\", this is cluster \\\"paxoskv\\\"";
    for id in [1, 2] {
        wait_log(&cluster, id, Duration::from_secs(10), refusal, |log| {
            log.contains("refused a call on the peer port") && log.contains(refusal)
        });
    }
    // ...and replica 3 says why its peers are unreachable (after its
    // start-up grace of 5 s).
    wait_log(
        &cluster,
        3,
        Duration::from_secs(20),
        "why its peers are unreachable",
        |log| {
            log.contains("peer unreachable")
                && log.contains("FailedPrecondition")
                && log.contains(refusal)
        },
    );
    // It holds none of the cluster's state.
    let three = cluster.status(3).await.expect("replica 3's status");
    assert_eq!(three.applied, 0, "{three:?}");
    assert_ne!(three.role, "leader", "{three:?}");
}

/// `paxoskv` with `args`, for at most 10 s; its exit code and stderr.
fn run_briefly(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(common::binary())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start paxoskv");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let out = child.wait_with_output().expect("wait for paxoskv");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn tls_flags_that_cannot_work_are_refused_at_start_by_name() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = TestCa::new(dir.path(), "ca");
    let one = ca.sign("paxoskv-replica-1");
    let client = ca.sign("paxoskv-client");
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not PEM\n").expect("write");
    let data = dir.path().join("data");
    let path = |p: &Path| p.display().to_string();
    let serve = |tls: &[&str]| {
        let mut all = vec![
            "serve",
            "--id",
            "1",
            "--listen",
            "127.0.0.1:7301",
            "--peer-listen",
            "127.0.0.1:7401",
            "--peers",
            "1=127.0.0.1:7401,2=https://127.0.0.1:7402",
            "--data-dir",
            data.to_str().expect("utf-8"),
        ];
        all.extend_from_slice(tls);
        run_briefly(&all)
    };
    let (cert, key, ca_file, junk_file) =
        (path(&one.cert), path(&one.key), path(&one.ca), path(&junk));
    let client_cert = path(&client.cert);
    let client_key = path(&client.key);
    for (tls, wanted) in [
        (
            vec!["--tls-cert", cert.as_str()],
            vec!["go together", "missing: --tls-key, --tls-ca"],
        ),
        (
            vec![
                "--tls-cert",
                cert.as_str(),
                "--tls-key",
                key.as_str(),
                "--tls-ca",
                junk_file.as_str(),
            ],
            vec!["--tls-ca", junk_file.as_str(), "no PEM certificate"],
        ),
        (
            vec![
                "--tls-cert",
                cert.as_str(),
                "--tls-key",
                junk_file.as_str(),
                "--tls-ca",
                ca_file.as_str(),
            ],
            vec!["--tls-key", junk_file.as_str()],
        ),
        (
            vec![
                "--tls-cert",
                client_cert.as_str(),
                "--tls-key",
                client_key.as_str(),
                "--tls-ca",
                ca_file.as_str(),
            ],
            vec!["names CN \"paxoskv-client\", but this is replica 1"],
        ),
        // https:// in --peers without TLS.
        (vec![], vec!["https://127.0.0.1:7402", "https needs TLS"]),
    ] {
        let (code, stderr) = serve(&tls);
        assert!(
            code == Some(2) && wanted.iter().all(|w| stderr.contains(w)),
            "serve {tls:?} should exit 2 saying {wanted:?}; got {code:?}: {stderr}"
        );
    }
    assert!(
        !data.exists(),
        "a refused start must not touch the data directory"
    );
}

/// Six ports from `base` (clients base..base+2, peers base+100..base+102)
/// free right now.
fn cluster_ports_free(base: u16) -> bool {
    (0..3).all(|i| {
        [base + i, base + 100 + i, base + 200 + i]
            .iter()
            .all(|&p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
    })
}

#[test]
fn paxoskv_cluster_tls_prints_grpcurl_lines_that_work() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    // `paxoskv cluster` takes a base port, not free ones: find six free.
    let base = (0..50u32)
        .map(|i| 20_000 + ((std::process::id() * 7 + i * 97) % 4_000) as u16 * 10)
        .find(|&b| cluster_ports_free(b))
        .expect("free ports for the cluster");
    let mut child = Command::new(common::binary())
        .args([
            "cluster",
            "--tls",
            "--metrics-base-port",
            "0",
            "--base-port",
        ])
        .arg(base.to_string())
        .arg("--data-dir")
        .arg(&data)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start paxoskv cluster");
    // Its banner is printed once the replicas are started.
    let stdout = child.stdout.take().expect("stdout");
    let lines = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .take_while(|l| !l.starts_with("Ctrl-C"))
            .collect::<Vec<_>>()
    });
    let _stop = StopOnDrop(child);
    let banner = lines.join().expect("banner");
    let list = banner
        .iter()
        .find(|l| l.trim_start().starts_with("grpcurl ") && l.trim_end().ends_with(" list"))
        .unwrap_or_else(|| panic!("no grpcurl list line in {banner:#?}"))
        .clone();
    let get = banner
        .iter()
        .find(|l| l.contains("paxoskv.v1.KvStore/Get"))
        .unwrap_or_else(|| panic!("no grpcurl Get line in {banner:#?}"))
        .clone();
    for want in ["-cacert", "-cert", "-key", "/tls/ca.pem", "/tls/client.pem"] {
        assert!(list.contains(want), "{list} should use {want}");
    }
    assert!(data.join("tls/replica-3.pem").exists(), "{banner:#?}");

    // Run the printed line (its words, with our grpcurl), until the
    // cluster answers.
    let words: Vec<&str> = list.split_whitespace().skip(1).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let out = loop {
        let out = grpcurl_run(&words);
        if out.ok || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(
        out.ok && out.stdout.contains("paxoskv.v1.KvStore"),
        "{list}: {out:?}"
    );
    // The Get line is well formed: it reaches the replica (NotFound, as
    // nothing was written), over TLS.
    let words: Vec<String> = shell_words(&get);
    let refs: Vec<&str> = words.iter().skip(1).map(String::as_str).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let out = loop {
        let out = grpcurl_run(&refs);
        if out.stderr.contains("Code: NotFound") || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(out.stderr.contains("Code: NotFound"), "{get}: {out:?}");

    // So is its curl GET line: HTTPS with the client certificate, and a
    // JSON NOT_FOUND from the replica.
    let curl_get = banner
        .iter()
        .find(|l| l.trim_start().starts_with("curl ") && l.trim_end().ends_with("/v1/kv/apple"))
        .unwrap_or_else(|| panic!("no curl GET line in {banner:#?}"))
        .clone();
    for want in ["--cacert", "--cert", "--key", "https://"] {
        assert!(curl_get.contains(want), "{curl_get} should use {want}");
    }
    let words = shell_words(&curl_get);
    let out = Command::new(common::curl())
        .args(&words[1..])
        .output()
        .expect("run curl");
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && body.contains(r#""code":"NOT_FOUND""#),
        "{curl_get}: {body} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Stops `paxoskv cluster` (SIGTERM: it stops its replicas) however the
/// test ends.
struct StopOnDrop(std::process::Child);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Splits a printed command line into words, honouring single quotes (the
/// JSON bodies).
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in line.trim().chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    words.push(std::mem::take(&mut word));
                    any = false;
                }
            }
            c => {
                word.push(c);
                any = true;
            }
        }
    }
    if any {
        words.push(word);
    }
    words
}
