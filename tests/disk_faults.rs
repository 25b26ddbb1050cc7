//! Disks that fail, on real processes: a replica whose log sync fails (an
//! injected EIO) or whose disk fills up (a small tmpfs) stops voting and
//! serving, says so through its log, health and metrics, and loses no
//! acknowledged write; the others go on; restarted on a working disk, it
//! catches up.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::load::{Load, Traffic};
use common::{Cluster, channel, sample, verify_disks, wait_caught_up};
use paxoskv::pb;
use paxoskv::service::Unavailable;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const FAILED: &str = "paxoskv_storage_failed";

/// Waits until replica `id` reports its storage failed, up to `within`.
async fn wait_failed(cluster: &Cluster, id: u32, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let page = cluster.scrape(id).unwrap_or_default();
        if sample(&page, FAILED) == Some(1.0) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "replica {id} did not report a storage failure within {within:?}; log:\n{}",
            cluster.log(id)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a failed replica must show: it is still running; its log says why;
/// health says NOT_SERVING (the server and the KV service); calls get
/// UNAVAILABLE marked `storage-failed`; and the rest of the cluster keeps
/// acknowledging writes.
async fn check_failed(cluster: &mut Cluster, id: u32, load: &Load) {
    assert!(
        cluster.running(id),
        "replica {id} exited: it must stay up and say why"
    );
    assert!(
        cluster.log(id).contains("storage failed"),
        "no log line: {}",
        cluster.log(id)
    );
    let mut health = HealthClient::new(channel(&cluster.addrs[&id]));
    for service in ["", "paxoskv.v1.KvStore"] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health answers")
            .into_inner()
            .status;
        assert_eq!(
            status,
            ServingStatus::NotServing as i32,
            "health of {service:?}"
        );
    }
    let mut client = cluster.client(id).await;
    let err = client
        .get(pb::GetRequest { key: "k".into() })
        .await
        .expect_err("a failed replica serves nothing");
    assert_eq!(
        Unavailable::of(&err),
        Some(Unavailable::StorageFailed),
        "{err:?}"
    );
    assert!(err.message().contains("storage failed"), "{err:?}");
    let before = load.acked();
    let deadline = Instant::now() + Duration::from_secs(20);
    while load.acked() < before + 50 {
        assert!(
            Instant::now() < deadline,
            "the others stopped acknowledging writes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Restarts failed replica `id` on a working disk, lets it catch up, and
/// checks every acknowledged write is on every disk.
async fn recover(mut cluster: Cluster, id: u32, load: Load) {
    // Stopping a failed replica reports the failure.
    let status = cluster.terminate(id, Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| !s.success()),
        "a replica stopped after a storage failure must exit non-zero: {status:?}"
    );
    cluster.spawn(id);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let acked = load.finish().await;
    assert!(
        acked.values.len() > 100,
        "too few writes: {}",
        acked.values.len()
    );
    wait_caught_up(&cluster, &[1, 2, 3], Duration::from_secs(30)).await;
    verify_disks(&mut cluster, &acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_log_sync_fails_stops_serving_and_recovers_after_a_restart() {
    let mut cluster = Cluster::start("eio", 3);
    cluster.leader(Duration::from_secs(20)).await;
    // Replica 3 again, with every log sync after the 100th failing (EIO).
    cluster.kill(3);
    cluster.spawn_with(3, &["--fault-fail-syncs-after", "100"]);
    let load = Load::start(&cluster, Traffic::AckedInserts);
    load.aim(vec![1, 2]);
    wait_failed(&cluster, 3, Duration::from_secs(60)).await;
    check_failed(&mut cluster, 3, &load).await;
    recover(cluster, 3, load).await;
}

/// Mounts a tmpfs of `bytes` on `dir`; unmounts on drop.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, bytes: u64) -> SmallDisk {
        std::fs::create_dir_all(dir).expect("create mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs on {} failed (this test needs root): {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk(dir.to_path_buf())
    }

    /// Moves what the small disk holds onto the disk beneath, in place.
    fn move_to_big_disk(self) {
        let copy = self.0.with_extension("copy");
        let _ = std::fs::remove_dir_all(&copy);
        let out = Command::new("cp")
            .arg("-a")
            .arg(&self.0)
            .arg(&copy)
            .output()
            .expect("run cp");
        assert!(
            out.status.success(),
            "cp: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dir = self.0.clone();
        drop(self);
        std::fs::remove_dir_all(&dir).expect("remove mount point");
        std::fs::rename(&copy, &dir).expect("move data back");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_disk_fills_up_stops_serving_and_recovers_on_a_bigger_one() {
    let mut cluster = Cluster::start("full", 3);
    cluster.leader(Duration::from_secs(20)).await;
    // Replica 2 again, from an empty directory on a 4 MiB disk, with 1 MiB
    // log segments: it rejoins, and runs out of space within a few
    // thousand writes.
    cluster.kill(2);
    let dir = cluster.dir.join("data-2");
    std::fs::remove_dir_all(&dir).expect("remove replica 2's data");
    let disk = SmallDisk::mount(&dir, 4 << 20);
    cluster.spawn_with(2, &["--log-segment-bytes", "1048576"]);
    let load = Load::start(&cluster, Traffic::AckedInserts);
    load.aim(vec![1, 3]);
    wait_failed(&cluster, 2, Duration::from_secs(120)).await;
    assert!(
        cluster.log(2).contains("No space left on device"),
        "{}",
        cluster.log(2)
    );
    check_failed(&mut cluster, 2, &load).await;
    let status = cluster.terminate(2, Duration::from_secs(10));
    assert!(status.is_some(), "replica 2 did not stop on SIGTERM");
    disk.move_to_big_disk();
    cluster.spawn(2);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let acked = load.finish().await;
    wait_caught_up(&cluster, &[1, 2, 3], Duration::from_secs(30)).await;
    verify_disks(&mut cluster, &acked);
}

#[test]
fn a_data_directory_of_another_replica_or_cluster_is_refused_at_start() {
    let dir = std::env::temp_dir().join(format!("paxoskv-test-identity-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create test dir");
    std::fs::write(dir.join("identity"), "cluster=prod\nreplica=2\n").expect("write identity");
    let ports = common::free_ports(4);
    // Replica N: clients on ports[N-1], peers on ports[N+1].
    let peers = format!("1=127.0.0.1:{},2=127.0.0.1:{}", ports[2], ports[3]);
    for (id, cluster, says) in [
        ("1", "prod", "started as replica 1 of cluster \"prod\""),
        (
            "2",
            "staging",
            "started as replica 2 of cluster \"staging\"",
        ),
    ] {
        let n = id.parse::<usize>().expect("id");
        let listen = format!("127.0.0.1:{}", ports[n - 1]);
        let peer_listen = format!("127.0.0.1:{}", ports[n + 1]);
        let mut child = Command::new(common::binary())
            .args(["serve", "--id", id, "--listen", &listen, "--peers", &peers])
            .args(["--peer-listen", &peer_listen])
            .args(["--cluster-name", cluster, "--data-dir"])
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start paxoskv serve");
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("replica {id} of {cluster} started on replica 2 of prod's directory");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
            .expect("read stderr");
        assert!(!status.success());
        assert!(
            stderr.contains("belongs to replica 2 of cluster \"prod\""),
            "{stderr}"
        );
        assert!(stderr.contains(says), "{stderr}");
        assert!(
            !dir.join("log").exists(),
            "the refused start touched the directory"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
