//! What Kubernetes' gRPC probes see, on real processes, through grpcurl
//! (`$PAXOSKV_GRPCURL`, installed by scripts/test.sh):
//!
//! - a replica configured from a pod's name (`--peers-from-dns`) whose
//!   peers' names do not resolve (yet) starts, keeps running and keeps
//!   retrying, and is live (`""` SERVING) but not ready
//!   (`paxoskv.v1.KvStore` NOT_SERVING), on the plaintext health port and
//!   on its client port: a lone replica of a 3-replica cluster;
//! - the replicas of a formed cluster are ready;
//! - flags that cannot work with `--peers-from-dns` are refused at start.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Cluster, binary, free_ports, grpcurl};

/// What grpcurl says the health of `service` at `addr` is (`SERVING`,
/// `NOT_SERVING`), or its error.
fn health(addr: &str, service: &str) -> String {
    let out = Command::new(grpcurl())
        .args(["-plaintext", "-max-time", "3", "-d"])
        .arg(format!("{{\"service\":\"{service}\"}}"))
        .args([addr, "grpc.health.v1.Health/Check"])
        .output()
        .expect("run grpcurl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if text.contains("NOT_SERVING") {
        "NOT_SERVING".into()
    } else if text.contains("SERVING") {
        "SERVING".into()
    } else {
        text
    }
}

/// Waits up to `within` for `addr`'s health of `service` to be `want`.
fn wait_health(addr: &str, service: &str, want: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got = health(addr, service);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "health of {service:?} at {addr}: {got}, not {want} after {within:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_lone_replica_whose_peers_do_not_resolve_is_live_not_ready_and_keeps_trying() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ports = free_ports(3);
    let (client, peer, probes) = (
        format!("127.0.0.1:{}", ports[0]),
        format!("127.0.0.1:{}", ports[1]),
        format!("127.0.0.1:{}", ports[2]),
    );
    let log = dir.path().join("replica.log");
    let mut child = Killed(
        Command::new(binary())
            .args(["serve", "--listen", &client, "--peer-listen", &peer])
            .args(["--health-listen", &probes, "--advertise-client", &client])
            // Pod paxoskv-1 of 3 under a domain that never resolves: its peers
            // are paxoskv-0.nonexistent.invalid:PORT, ...
            .env("PAXOSKV_PEERS_FROM_DNS", "nonexistent.invalid")
            .env("PAXOSKV_POD_NAME", "paxoskv-1")
            .env("PAXOSKV_REPLICAS", "3")
            .env("PAXOSKV_DATA_DIR", dir.path().join("data"))
            .env("RUST_LOG", "info,paxoskv::transport=debug")
            .env("PAXOSKV_LOG_FORMAT", "json")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("start paxoskv serve"),
    );
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();

    wait_health(&probes, "", "SERVING", Duration::from_secs(10));
    // Long enough for several rounds of dialling (backoff from 50 ms).
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        child.0.try_wait().expect("wait").is_none(),
        "the replica exited:\n{}",
        read_log()
    );
    for addr in [&probes, &client] {
        assert_eq!(health(addr, ""), "SERVING", "live at {addr}");
        assert_eq!(
            health(addr, "paxoskv.v1.KvStore"),
            "NOT_SERVING",
            "not ready at {addr}"
        );
    }
    let text = read_log();
    for want in [
        "configuration from the pod's name",
        "\"replica\":2",
        "paxoskv-0.nonexistent.invalid",
        "paxoskv-2.nonexistent.invalid",
        "not ready",
    ] {
        assert!(text.contains(want), "log lacks {want:?}:\n{text}");
    }
    // Still dialling, not given up: the attempts go on.
    let attempts = |t: &str| t.matches("nonexistent.invalid").count();
    let before = attempts(&text);
    std::thread::sleep(Duration::from_secs(3));
    let after = attempts(&read_log());
    assert!(
        child.0.try_wait().expect("wait").is_none(),
        "the replica exited:\n{}",
        read_log()
    );
    assert!(
        after > before,
        "no new attempt to reach the peers in 3 s ({before} mentions, then {after}):\n{}",
        read_log()
    );
    drop(child);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_replicas_of_a_formed_cluster_are_ready() {
    let cluster = Cluster::start("probes-ready", 3);
    cluster.leader(Duration::from_secs(20)).await;
    for id in 1..=3 {
        let addr = cluster.addrs[&id].clone();
        tokio::task::spawn_blocking(move || {
            wait_health(
                &addr,
                "paxoskv.v1.KvStore",
                "SERVING",
                Duration::from_secs(15),
            );
            assert_eq!(health(&addr, ""), "SERVING");
        })
        .await
        .expect("health checks");
    }
}

#[test]
fn flags_that_cannot_work_with_peers_from_dns_are_refused_at_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let run = |args: &[&str], pod: Option<&str>| {
        let mut cmd = Command::new(binary());
        cmd.args([
            "serve",
            "--listen",
            "0.0.0.0:18081",
            "--peer-listen",
            "0.0.0.0:18181",
        ])
        .arg("--data-dir")
        .arg(&data)
        .args(args)
        .env_remove("HOSTNAME");
        if let Some(pod) = pod {
            cmd.env("PAXOSKV_POD_NAME", pod);
        }
        let out = cmd.output().expect("run paxoskv serve");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let dns = [
        "--peers-from-dns",
        "paxoskv.default.svc.cluster.local",
        "--replicas",
        "3",
    ];
    for (args, pod, want) in [
        (
            vec!["--peers", "1=127.0.0.1:18181"],
            Some("paxoskv-0"),
            "cannot be used with",
        ),
        (
            vec!["--id", "1"],
            Some("paxoskv-1"),
            "--id 1 disagrees with the pod's name: pod paxoskv-1 is replica 2",
        ),
        (
            vec![],
            Some("paxoskv"),
            "pod name \"paxoskv\" has no ordinal",
        ),
        (vec![], None, "--peers-from-dns needs the pod's name"),
        (
            vec![],
            Some("paxoskv-3"),
            "pod paxoskv-3 has ordinal 3, but --replicas is 3",
        ),
    ] {
        let mut all: Vec<&str> = dns.to_vec();
        all.extend(args.iter().copied());
        let (code, stderr) = run(&all, pod);
        assert_eq!(code, Some(2), "{all:?} {pod:?}: {stderr}");
        assert!(stderr.contains(want), "{all:?} {pod:?}: {stderr}");
    }
    // Without --peers-from-dns, PAXOSKV_REPLICAS and PAXOSKV_POD_NAME (in
    // the environment `paxoskv cluster` gives its children, say) are
    // ignored: this start gets as far as the check of --id against --peers.
    let out = Command::new(binary())
        .args(["serve", "--listen", "127.0.0.1:18081", "--peer-listen"])
        .args([
            "127.0.0.1:18181",
            "--id",
            "4",
            "--peers",
            "1=127.0.0.1:18181",
        ])
        .arg("--data-dir")
        .arg(&data)
        .env("PAXOSKV_REPLICAS", "5")
        .env("PAXOSKV_POD_NAME", "paxoskv")
        .output()
        .expect("run paxoskv serve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--id 4 is not among --peers (replicas 1)"),
        "{stderr}"
    );
    assert!(!data.exists(), "a refused start touched the data directory");
}

/// A child process killed when dropped, whatever the test's outcome.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
