//! A cluster of real `paxoskv serve` processes on 127.0.0.1, for tests.
//!
//! Every process is killed when the [`Cluster`] is dropped, whatever the
//! test's outcome; data lives in a fresh directory under the system temp
//! dir, removed at the end.

#![allow(dead_code)] // each test binary uses its own part of this harness

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use paxoskv::pb;
use paxoskv::pb::kv_store_client::KvStoreClient;
use tonic::transport::Channel;

/// The `paxoskv` binary under test.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_paxoskv")
}

/// Ports free right now on 127.0.0.1 (bound, then released).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

/// A running test cluster.
pub struct Cluster {
    pub dir: PathBuf,
    pub addrs: BTreeMap<u32, String>,
    procs: BTreeMap<u32, Child>,
}

impl Cluster {
    /// Starts `n` replicas and waits until one leads.
    pub fn start(name: &str, n: u32) -> Cluster {
        let ports = free_ports(n as usize);
        let dir = std::env::temp_dir().join(format!("paxoskv-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create test dir");
        let addrs = (1..=n)
            .map(|id| (id, format!("127.0.0.1:{}", ports[id as usize - 1])))
            .collect();
        let mut cluster = Cluster {
            dir,
            addrs,
            procs: BTreeMap::new(),
        };
        for id in 1..=n {
            cluster.spawn(id);
        }
        cluster
    }

    fn peers_arg(&self) -> String {
        self.addrs
            .iter()
            .map(|(id, a)| format!("{id}={a}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts (or restarts) replica `id` on its address and data.
    pub fn spawn(&mut self, id: u32) {
        let log =
            std::fs::File::create(self.dir.join(format!("replica-{id}.log"))).expect("log file");
        let child = Command::new(binary())
            .arg("serve")
            .args([
                "--id",
                &id.to_string(),
                "--listen",
                &self.addrs[&id],
                "--peers",
                &self.peers_arg(),
            ])
            .arg("--data-dir")
            .arg(self.dir.join(format!("data-{id}")))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start paxoskv serve");
        self.procs.insert(id, child);
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub fn kill(&mut self, id: u32) {
        if let Some(mut child) = self.procs.remove(&id) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and the exit status once it has exited (within `within`).
    pub fn terminate(&mut self, id: u32, within: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.procs.remove(&id)?;
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// The replica's log so far (for failure messages).
    pub fn log(&self, id: u32) -> String {
        std::fs::read_to_string(self.dir.join(format!("replica-{id}.log"))).unwrap_or_default()
    }

    /// A client connected to replica `id`.
    pub async fn client(&self, id: u32) -> KvStoreClient<Channel> {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{}", self.addrs[&id]))
                .expect("endpoint")
                .connect_timeout(Duration::from_secs(1))
                .connect_lazy();
        KvStoreClient::new(channel)
    }

    /// Waits until replica `id` answers reads (so a leader exists and it can
    /// reach it), up to `within`.
    pub async fn wait_ready(&self, id: u32, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let mut c = self.client(id).await;
            let mut req = tonic::Request::new(pb::GetRequest {
                key: "__ready__".into(),
            });
            req.set_timeout(Duration::from_millis(500));
            match c.get(req).await {
                Ok(_) => return,
                Err(s) if s.code() == tonic::Code::NotFound => return,
                Err(s) if Instant::now() > deadline => {
                    panic!(
                        "replica {id} not ready after {within:?}: {s}\n--- log ---\n{}",
                        self.log(id)
                    )
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let ids: Vec<u32> = self.procs.keys().copied().collect();
        for id in ids {
            self.kill(id);
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
