//! Every address form `--peers` and `--endpoint` accept works end to end,
//! and the forms they do not accept, and configurations that cannot work,
//! are refused at start, by name.
//!
//! A follower forwards a client's call to the leader by dialling the peer
//! address `--peers` gave for it, so a cluster must take writes through
//! *every* replica, not only the leader, whichever form the addresses are
//! written in. (Once, `http://` peers elected a leader and served writes
//! sent to it, while every write sent to a follower failed with `dns
//! error`: the follower dialled `http://http://...`.)

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Cluster, PeerForm, binary};
use paxoskv::pb;
use tonic::Code;

/// Each test here runs a whole cluster; on a 2-core machine they run one at
/// a time so that none starves another's replicas into elections.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs the `paxoskv` CLI with `args`, up to 30 s.
async fn cli(args: &[&str]) -> Output {
    let run = tokio::process::Command::new(binary())
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .unwrap_or_else(|_| panic!("paxoskv {args:?} did not finish within 30 s"))
        .unwrap_or_else(|e| panic!("run paxoskv {args:?}: {e}"))
}

/// Upserts `key` = `value` through replica `id`, retrying an UNAVAILABLE
/// answer (an election may be under way) for up to 10 s. If it never
/// succeeds, returns the first error and the last.
///
/// An upsert of a fixed value may be repeated harmlessly, so it carries no
/// request id. That matters: with one, a follower that cannot reach the
/// leader retries by itself until the deadline, and the caller sees only
/// "no quorum" instead of why.
async fn upsert_through(
    cluster: &Cluster,
    id: u32,
    key: &str,
    value: i32,
) -> Result<(), (tonic::Status, tonic::Status)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut first = None;
    loop {
        let mut request = tonic::Request::new(pb::UpsertRequest {
            key: key.to_string(),
            value: Some(value),
            request_id: None,
        });
        request.set_timeout(Duration::from_secs(3));
        let status = match cluster.client(id).await.upsert(request).await {
            Ok(_) => return Ok(()),
            Err(status) => status,
        };
        let retry = status.code() == Code::Unavailable && Instant::now() < deadline;
        let first = first.get_or_insert_with(|| status.clone()).clone();
        if !retry {
            return Err((first, status));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Starts a 3-replica cluster whose `--peers` are spelt as `form`, writes
/// through every replica (followers forward to the leader), and reads every
/// write back through every replica, with the gRPC client and the CLI.
async fn writes_through_every_replica(form: PeerForm) {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start_with(&format!("addresses-{form:?}"), 3, form);
    let leader = cluster.leader(Duration::from_secs(20)).await;

    for id in 1..=3 {
        let key = format!("through-{id}");
        if let Err((first, last)) = upsert_through(&cluster, id, &key, id as i32).await {
            panic!(
                "--peers {}: upsert through replica {id} (leader: {leader}) failed.\n\
                 first error: {:?}: {}\nlast error: {:?}: {}\n--- log of replica {id} ---\n{}",
                form.spell(&cluster.addrs[&id]),
                first.code(),
                first.message(),
                last.code(),
                last.message(),
                cluster.log(id)
            );
        }
    }

    for reader in 1..=3 {
        let mut client = cluster.client(reader).await;
        for id in 1..=3_i32 {
            let key = format!("through-{id}");
            let mut request = tonic::Request::new(pb::GetRequest { key: key.clone() });
            request.set_timeout(Duration::from_secs(5));
            let got = client
                .get(request)
                .await
                .unwrap_or_else(|s| panic!("get {key} through replica {reader}: {s}"));
            assert_eq!(got.into_inner().value, id, "{key} through {reader}");
        }
        // The CLI, given the replica's address spelt the same way.
        let endpoint = form.spell(&cluster.addrs[&reader]);
        let out = cli(&["get", "through-1", "--endpoint", &endpoint]).await;
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "1",
            "paxoskv get through-1 --endpoint {endpoint}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Every replica learns every other's client address when its stream
    // opens, and shows both addresses of each.
    for reader in 1..=3 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = cluster.status(reader).await.expect("Admin/Status");
            let shown: Vec<(u32, String, String)> = status
                .peers
                .iter()
                .map(|p| (p.id, p.client_address.clone(), p.peer_address.clone()))
                .collect();
            let want: Vec<(u32, String, String)> = (1..=3)
                .map(|id| {
                    let peer = form.spell(&cluster.peer_addrs[&id]);
                    (id, cluster.addrs[&id].clone(), peer)
                })
                .collect();
            if shown == want {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "replica {reader} shows {shown:?}, not {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // `paxoskv status` dials every replica's client address, and shows it
    // and the peer address (as `--peers` spelt it).
    let endpoint = form.spell(&cluster.addrs[&1]);
    let out = cli(&["status", "--endpoint", &endpoint]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "paxoskv status --endpoint {endpoint}: {}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for id in 1..=3 {
        let row = stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(&id.to_string()))
            .unwrap_or_else(|| panic!("no row for replica {id}:\n{stdout}"));
        let words: Vec<&str> = row.split_whitespace().collect();
        let peer = form.spell(&cluster.peer_addrs[&id]);
        assert!(
            words.get(1) == Some(&cluster.addrs[&id].as_str())
                && words.get(2) == Some(&peer.as_str())
                && words
                    .get(3)
                    .is_some_and(|r| ["leader", "follower"].contains(r)),
            "replica {id}'s row should show client {}, peer {peer} and its role:\n{stdout}",
            cluster.addrs[&id]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_host_port_peers_take_writes_through_every_replica() {
    writes_through_every_replica(PeerForm::Plain).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_peers_take_writes_through_every_replica() {
    writes_through_every_replica(PeerForm::Http).await;
}

/// Runs `paxoskv ARGS` (which should fail at once), killing it after 10 s.
fn run_briefly(args: &[&str]) -> Output {
    let mut child = Command::new(binary())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
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
    child.wait_with_output().expect("wait for paxoskv")
}

#[test]
fn bad_addresses_are_refused_at_start_by_name() {
    let dir = tempfile::Builder::new()
        .prefix("paxoskv-addresses-")
        .tempdir()
        .expect("temp dir");
    let data = dir.path().join("data");
    let data = data.to_string_lossy();
    for bad in [
        "https://127.0.0.1:7102",
        "ftp://127.0.0.1:7102",
        "127.0.0.1",
        "http://127.0.0.1:7102/kv",
        "127.0.0.1:notaport",
    ] {
        let peers = format!("1=127.0.0.1:7101,2={bad}");
        let out = run_briefly(&[
            "serve",
            "--id",
            "1",
            "--listen",
            "127.0.0.1:7001",
            "--peer-listen",
            "127.0.0.1:7101",
            "--peers",
            &peers,
            "--data-dir",
            &data,
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code() == Some(2) && stderr.contains(bad),
            "paxoskv serve --peers {peers} should exit 2 naming {bad}; got {} with:\n{stderr}",
            out.status
        );

        let out = run_briefly(&["get", "k", "--endpoint", bad]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code() == Some(2) && stderr.contains(bad),
            "paxoskv get --endpoint {bad} should exit 2 naming it; got {} with:\n{stderr}",
            out.status
        );
    }
}

/// `paxoskv serve` with these flags must exit 2 at once, saying every one
/// of `wanted`.
fn refused_at_start(flags: &[&str], wanted: &[&str]) {
    let dir = tempfile::Builder::new()
        .prefix("paxoskv-config-")
        .tempdir()
        .expect("temp dir");
    let data = dir.path().join("data");
    let mut args = vec!["serve", "--data-dir", data.to_str().expect("utf-8 path")];
    args.extend_from_slice(flags);
    let out = run_briefly(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(2) && wanted.iter().all(|w| stderr.contains(w)),
        "paxoskv {args:?} should exit 2 saying {wanted:?}; got {} with:\n{stderr}",
        out.status
    );
    assert!(
        !data.exists(),
        "a refused configuration must not touch the data directory"
    );
}

/// Replica 1 of three on 127.0.0.1: clients on 710N, peers on 720N; each
/// test changes one flag.
const PEERS: &str = "1=127.0.0.1:7201,2=127.0.0.1:7202,3=127.0.0.1:7203";

#[test]
fn a_configuration_that_cannot_work_is_refused_at_start_by_name() {
    let ok = [
        "--id",
        "1",
        "--listen",
        "127.0.0.1:7101",
        "--peer-listen",
        "127.0.0.1:7201",
        "--peers",
        PEERS,
    ];
    // `--flag value` in `ok` replaced by `value`, or removed if `None`.
    let with = |flag: &str, value: Option<&'static str>| -> Vec<&'static str> {
        let mut args: Vec<&'static str> = Vec::new();
        let mut it = ok.iter();
        while let Some(&f) = it.next() {
            let v = *it.next().expect("flag and value");
            if f == flag {
                if let Some(value) = value {
                    args.extend([f, value]);
                }
            } else {
                args.extend([f, v]);
            }
        }
        args
    };

    // --id not in --peers.
    refused_at_start(
        &with("--id", Some("4")),
        &["--id 4 is not among --peers (replicas 1, 2, 3)"],
    );
    // Two replicas, one peer address (however spelt).
    refused_at_start(
        &with(
            "--peers",
            Some("1=127.0.0.1:7201,2=127.0.0.1:7202,3=http://127.0.0.1:7202"),
        ),
        &["replicas 2 and 3 have the same peer address http://127.0.0.1:7202"],
    );
    // --listen equal to --peer-listen.
    refused_at_start(
        &with("--listen", Some("127.0.0.1:7201")),
        &["--listen 127.0.0.1:7201 and --peer-listen 127.0.0.1:7201 are the same address"],
    );
    // --peer-listen not where the others dial this replica: port, host.
    refused_at_start(
        &with("--peer-listen", Some("127.0.0.1:7209")),
        &[
            "--peer-listen 127.0.0.1:7209 does not match this replica's --peers entry 1=127.0.0.1:7201",
            "port 7209 is not 7201",
        ],
    );
    refused_at_start(
        &with("--peer-listen", Some("127.0.0.2:7201")),
        &["host 127.0.0.2 is not 127.0.0.1"],
    );
    // --peer-listen is required: without it there would be no peer port.
    refused_at_start(&with("--peer-listen", None), &["--peer-listen"]);
    // Listening on every address, with nothing to tell clients.
    refused_at_start(
        &with("--listen", Some("0.0.0.0:7101")),
        &[
            "--listen 0.0.0.0:7101 is an unspecified address",
            "--advertise-client",
        ],
    );
    // An advertised client address that does not parse, or is a peer port.
    let mut args = ok.to_vec();
    args.extend(["--advertise-client", "https://127.0.0.1:7101"]);
    refused_at_start(&args, &["--advertise-client", "https://127.0.0.1:7101"]);
    let mut args = ok.to_vec();
    args.extend(["--advertise-client", "127.0.0.1:7203"]);
    refused_at_start(
        &args,
        &["--advertise-client 127.0.0.1:7203 is replica 3's peer address"],
    );
    // A listen address that does not parse.
    refused_at_start(
        &with("--peer-listen", Some("localhost:7201")),
        &["--peer-listen", "localhost:7201"],
    );
}
