//! Pipelined commit throughput of a 3-replica cluster in this one process:
//! the servers `paxoskv serve` runs (`paxoskv::server::serve`), real
//! storage in temporary directories under the target directory (every
//! vote `fdatasync`ed), real gRPC on 127.0.0.1, and a client holding 1, 16,
//! 256 and 1,024 writes in flight against the leader. Reported as writes
//! (elements) per second.
//!
//! Run with `cargo bench --bench commit`. The client shares the machine
//! with the three replicas, so on a small machine the figure is a floor,
//! and it moves with whatever else runs there: compare builds in one run.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use paxoskv::node::SnapshotPolicy;
use paxoskv::pb;
use paxoskv::pb::admin_client::AdminClient;
use paxoskv::pb::kv_store_client::KvStoreClient;
use paxoskv::server::{ServeOptions, serve};
use tokio::sync::watch;
use tonic::transport::Channel;

/// Writes in flight at once.
const IN_FLIGHT: [usize; 4] = [1, 16, 256, 1024];
/// Distinct keys written.
const KEYS: u64 = 1000;

/// A free port on 127.0.0.1, for a moment.
fn free_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address")
}

/// Three replicas serving in this process, stopped when dropped.
struct Cluster {
    clients: BTreeMap<u32, SocketAddr>,
    stop: watch::Sender<bool>,
    replicas: Vec<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start(runtime: &tokio::runtime::Runtime) -> Cluster {
        let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
        std::fs::create_dir_all(base).expect("create CARGO_TARGET_TMPDIR");
        let dir = tempfile::tempdir_in(base).expect("tempdir");
        let ids = [1u32, 2, 3];
        let clients: BTreeMap<u32, SocketAddr> = ids.iter().map(|&id| (id, free_port())).collect();
        let peer_addrs: BTreeMap<u32, SocketAddr> =
            ids.iter().map(|&id| (id, free_port())).collect();
        let peers: BTreeMap<u32, String> = peer_addrs
            .iter()
            .map(|(&id, addr)| (id, addr.to_string()))
            .collect();
        let (stop, stopped) = watch::channel(false);
        let mut replicas = Vec::new();
        for &id in &ids {
            let opts = ServeOptions {
                id,
                listen: clients[&id],
                peer_listen: peer_addrs[&id],
                advertise_client: None,
                peers: peers.clone(),
                data_dir: dir.path().join(format!("data-{id}")),
                tick: Duration::from_millis(10),
                cache_bytes: 64 << 20,
                log_segment_bytes: paxoskv::storage::DEFAULT_SEGMENT_BYTES,
                snapshots: SnapshotPolicy {
                    every: 10_000,
                    keep: 5_000,
                },
                drain: Duration::from_secs(1),
                limits: paxoskv::driver::Limits::DEFAULT,
                metrics_listen: None,
                http_listen: None,
                health_listen: None,
                cluster_name: "paxoskv".into(),
                fail_syncs_after: None,
                test_bug: None,
                tls: None,
            };
            let mut stopped = stopped.clone();
            replicas.push(runtime.spawn(async move {
                let shutdown = async move {
                    let _ = stopped.wait_for(|s| *s).await;
                };
                if let Err(e) = serve(opts, shutdown).await {
                    eprintln!("replica {id}: {e}");
                }
            }));
        }
        Cluster {
            clients,
            stop,
            replicas,
            _dir: dir,
        }
    }

    /// Stops the replicas and waits for them, before their directory goes.
    async fn stop(mut self) {
        let _ = self.stop.send(true);
        for replica in self.replicas.drain(..) {
            let _ = replica.await;
        }
    }

    /// The leader's client address, once there is one (within 30 s).
    async fn leader(&self) -> SocketAddr {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            for addr in self.clients.values() {
                let Ok(channel) = Channel::from_shared(format!("http://{addr}"))
                    .expect("uri")
                    .connect()
                    .await
                else {
                    continue;
                };
                if let Ok(status) = AdminClient::new(channel).status(pb::StatusRequest {}).await
                    && status.get_ref().role == "leader"
                {
                    return *addr;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no leader within 30 s");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// `count` upserts, `in_flight` at a time, over clients sharing one
/// connection each per 64 calls in flight (as separate client processes
/// would not share one).
async fn write(clients: &[KvStoreClient<Channel>], in_flight: usize, count: u64) {
    let per_task = count.div_ceil(in_flight as u64);
    let tasks: Vec<_> = (0..in_flight)
        .map(|t| {
            let mut client = clients[t % clients.len()].clone();
            tokio::spawn(async move {
                for i in 0..per_task {
                    let key = format!("k{}", (t as u64 * per_task + i) % KEYS);
                    let request = pb::UpsertRequest {
                        key,
                        value: Some(i as i32),
                        request_id: None,
                    };
                    client.upsert(request).await.expect("upsert");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("writer task");
    }
}

fn commit(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let cluster = Cluster::start(&runtime);
    let leader = runtime.block_on(cluster.leader());
    let clients: Vec<KvStoreClient<Channel>> = runtime.block_on(async {
        let mut clients = Vec::new();
        for _ in 0..16 {
            let channel = Channel::from_shared(format!("http://{leader}"))
                .expect("uri")
                .connect()
                .await
                .expect("connect to the leader");
            clients.push(KvStoreClient::new(channel));
        }
        clients
    });

    let mut group = c.benchmark_group("commit");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    for in_flight in IN_FLIGHT {
        let connections = in_flight.div_ceil(64).min(clients.len());
        let batch = (in_flight as u64 * 4).max(64);
        group.throughput(Throughput::Elements(batch));
        group.bench_with_input(
            BenchmarkId::new("pipelined_writes", in_flight),
            &in_flight,
            |b, &in_flight| {
                b.to_async(&runtime).iter_custom(|iters| {
                    let clients = &clients[..connections];
                    async move {
                        let started = Instant::now();
                        write(clients, in_flight, batch * iters).await;
                        started.elapsed()
                    }
                });
            },
        );
    }
    group.finish();
    drop(clients);
    runtime.block_on(cluster.stop());
    runtime.shutdown_timeout(Duration::from_secs(5));
}

criterion_group!(benches, commit);
criterion_main!(benches);
