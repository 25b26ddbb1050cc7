//! The cluster `paxoskv check` tests: child `paxoskv serve` processes on
//! 127.0.0.1, and a [`Proxy`] on every directed link between two of them.
//!
//! Each replica has a client port (`--listen`) and a peer port
//! (`--peer-listen`: Paxos streams, snapshots, forwarded calls). Replica
//! i's `--peers` entry for j is the proxy i → j, which forwards to j's peer
//! port (its own entry is its real peer address), so that a partition is a
//! matter of blocking proxies. Clients talk to the replicas' client ports,
//! never through a proxy: a replica cut off from its peers still gets
//! client calls.
//!
//! Every child is started with `kill_on_drop`: whatever happens to the
//! check (an error, a panic, Ctrl-C), dropping the [`LocalCluster`] kills
//! what it started. [`LocalCluster::stop`] is the orderly way (SIGTERM).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use tonic::Request;

use super::nemesis::Target;
use super::proxy::Proxy;
use crate::dial;
use crate::node::TestBug;
use crate::pb;
use crate::pb::admin_client::AdminClient;

/// A replica's two addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ports {
    /// Where it serves clients (`--listen`).
    pub client: SocketAddr,
    /// Where it serves the other replicas (`--peer-listen`).
    pub peer: SocketAddr,
}

/// A local cluster under test.
pub struct LocalCluster {
    exe: PathBuf,
    dir: PathBuf,
    /// Each replica's addresses.
    ports: BTreeMap<u32, Ports>,
    /// The proxy on each directed link (from, to).
    proxies: BTreeMap<(u32, u32), Proxy>,
    /// Running (or paused) replicas.
    children: BTreeMap<u32, Child>,
    test_bug: Option<TestBug>,
}

/// Everything replica `id` is started with: the one place a replica's
/// command line is built. `ports` are its own addresses; `peers` maps every
/// replica to the peer address this one dials it at (a proxy for the
/// others, its own peer address for itself).
fn replica_args(
    id: u32,
    ports: Ports,
    peers: &BTreeMap<u32, String>,
    data_dir: &Path,
    test_bug: Option<TestBug>,
) -> Vec<OsString> {
    let peers = peers
        .iter()
        .map(|(id, addr)| format!("{id}={addr}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut args: Vec<OsString> = vec![
        "serve".into(),
        "--id".into(),
        id.to_string().into(),
        "--listen".into(),
        ports.client.to_string().into(),
        "--peer-listen".into(),
        ports.peer.to_string().into(),
        "--peers".into(),
        peers.into(),
        "--data-dir".into(),
        data_dir.as_os_str().to_owned(),
        "--cluster-name".into(),
        "paxoskv-check".into(),
    ];
    if let Some(bug) = test_bug {
        args.push("--unsafe-test-bug".into());
        args.push(bug.name().into());
    }
    args
}

impl LocalCluster {
    /// Starts `ports.len()` replicas of `exe` (replica `id` on
    /// `ports[id]`, data in `dir/id`, log in `dir/replica-id.log`), with a
    /// proxy on every link. `held` keeps the replicas' ports while the
    /// proxies take theirs; it is dropped just before the replicas start.
    pub async fn start(
        exe: PathBuf,
        dir: PathBuf,
        ports: BTreeMap<u32, Ports>,
        held: Vec<std::net::TcpListener>,
        test_bug: Option<TestBug>,
    ) -> Result<LocalCluster, String> {
        let mut proxies = BTreeMap::new();
        for &from in ports.keys() {
            for (&to, to_ports) in &ports {
                if from != to {
                    let proxy = Proxy::start(to_ports.peer.to_string())
                        .await
                        .map_err(|e| format!("cannot start the proxy {from} -> {to}: {e}"))?;
                    proxies.insert((from, to), proxy);
                }
            }
        }
        drop(held);
        let mut cluster = LocalCluster {
            exe,
            dir,
            ports,
            proxies,
            children: BTreeMap::new(),
            test_bug,
        };
        for id in cluster.ports.keys().copied().collect::<Vec<_>>() {
            cluster.spawn(id)?;
        }
        Ok(cluster)
    }

    /// Replica `id`'s log file.
    pub fn log_path(&self, id: u32) -> PathBuf {
        self.dir.join(format!("replica-{id}.log"))
    }

    /// Each replica's client address.
    pub fn endpoints(&self) -> BTreeMap<u32, String> {
        self.ports
            .iter()
            .map(|(id, p)| (*id, p.client.to_string()))
            .collect()
    }

    fn spawn(&mut self, id: u32) -> Result<(), String> {
        let ports = *self
            .ports
            .get(&id)
            .ok_or_else(|| format!("no replica {id}"))?;
        let peers = self
            .ports
            .iter()
            .map(|(&to, to_ports)| match self.proxies.get(&(id, to)) {
                Some(proxy) => (to, proxy.addr().to_string()),
                None => (to, to_ports.peer.to_string()),
            })
            .collect();
        let data = self.dir.join(id.to_string());
        std::fs::create_dir_all(&data)
            .map_err(|e| format!("cannot create {}: {e}", data.display()))?;
        // Appended to: a restarted replica's log follows its earlier life's.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(id))
            .map_err(|e| format!("cannot open {}: {e}", self.log_path(id).display()))?;
        let mut command = Command::new(&self.exe);
        command
            .args(replica_args(id, ports, &peers, &data, self.test_bug))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        // Even if this process is SIGKILLed (no drop runs), its replicas
        // die with it rather than live on as orphans. Linux: the signal
        // comes when the thread that spawned the child exits, and tokio's
        // worker threads live as long as the runtime.
        #[cfg(target_os = "linux")]
        // SAFETY: between fork and exec, only prctl(2), which is
        // async-signal-safe, is called.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start replica {id}: {e}"))?;
        self.children.insert(id, child);
        Ok(())
    }

    fn signal(&self, id: u32, signal: libc::c_int) -> Result<(), String> {
        let pid = self
            .children
            .get(&id)
            .and_then(Child::id)
            .ok_or_else(|| format!("replica {id} is not running"))?;
        // SAFETY: kill(2) on our own child's pid with a valid signal.
        let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        Ok(())
    }

    /// Replica `id`'s own view (`Admin/Status`), within `timeout`.
    pub async fn status(&self, id: u32, timeout: Duration) -> Result<pb::StatusResponse, String> {
        let addr = self
            .ports
            .get(&id)
            .ok_or_else(|| format!("no replica {id}"))?
            .client;
        let channel = dial::endpoint(&addr.to_string())
            .map_err(|e| e.to_string())?
            .connect_timeout(timeout)
            .connect_lazy();
        let mut request = Request::new(pb::StatusRequest {});
        request.set_timeout(timeout);
        let mut admin = AdminClient::new(channel);
        match tokio::time::timeout(timeout, admin.status(request)).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
            Err(_) => Err(format!("no answer within {timeout:?}")),
        }
    }

    /// Every replica's status, asked at once.
    pub async fn statuses(
        &self,
        timeout: Duration,
    ) -> BTreeMap<u32, Result<pb::StatusResponse, String>> {
        let asks = self
            .ports
            .keys()
            .map(|&id| async move { (id, self.status(id, timeout).await) });
        let mut out = BTreeMap::new();
        for (id, status) in join_all(asks).await {
            out.insert(id, status);
        }
        out
    }

    /// Stops every replica: SIGCONT (a paused one could not act on the
    /// next signal), SIGTERM, then up to 10 s to exit before SIGKILL.
    /// Returns the replicas that did not exit cleanly, with why.
    pub async fn stop(&mut self) -> Vec<String> {
        for &id in self.children.keys() {
            let _ = self.signal(id, libc::SIGCONT);
            let _ = self.signal(id, libc::SIGTERM);
        }
        let mut problems = Vec::new();
        for (id, mut child) in std::mem::take(&mut self.children) {
            match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
                Ok(Ok(status)) if status.success() => {}
                Ok(Ok(status)) => problems.push(format!("replica {id} exited with {status}")),
                Ok(Err(e)) => problems.push(format!("replica {id}: {e}")),
                Err(_) => {
                    problems.push(format!("replica {id} did not stop within 10 s; killed"));
                    let _ = child.kill().await;
                }
            }
        }
        self.proxies.clear();
        problems
    }
}

impl Target for LocalCluster {
    fn replicas(&self) -> u32 {
        self.ports.len() as u32
    }

    async fn kill(&mut self, id: u32) -> Result<(), String> {
        let mut child = self
            .children
            .remove(&id)
            .ok_or_else(|| format!("replica {id} is not running"))?;
        // SIGKILL works on a stopped process too.
        child.kill().await.map_err(|e| e.to_string())
    }

    async fn restart(&mut self, id: u32) -> Result<(), String> {
        if self.children.contains_key(&id) {
            return Err(format!("replica {id} is running"));
        }
        self.spawn(id)
    }

    fn pause(&mut self, id: u32) -> Result<(), String> {
        self.signal(id, libc::SIGSTOP)
    }

    fn resume(&mut self, id: u32) -> Result<(), String> {
        self.signal(id, libc::SIGCONT)
    }

    fn cut(&mut self, side: &BTreeSet<u32>) {
        for ((from, to), proxy) in &self.proxies {
            if side.contains(from) != side.contains(to) {
                proxy.block();
            }
        }
    }

    fn heal_partition(&mut self) {
        for proxy in self.proxies.values() {
            proxy.unblock();
        }
    }

    async fn leader(&mut self) -> Option<u32> {
        let statuses = self.statuses(Duration::from_millis(500)).await;
        statuses
            .iter()
            .filter_map(|(id, s)| s.as_ref().ok().map(|s| (*id, s)))
            .filter(|(_, s)| s.role == "leader")
            .max_by_key(|(_, s)| (s.ballot_round, s.ballot_node))
            .map(|(id, _)| id)
    }

    fn exited(&mut self) -> Vec<(u32, String)> {
        let mut gone = Vec::new();
        for (&id, child) in self.children.iter_mut() {
            match child.try_wait() {
                Ok(None) => {}
                Ok(Some(status)) => gone.push((id, status.to_string())),
                Err(e) => gone.push((id, e.to_string())),
            }
        }
        for (id, _) in &gone {
            self.children.remove(id);
        }
        gone
    }
}

/// Awaits every future concurrently, in order.
async fn join_all<F: Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let futures: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut out = Vec::with_capacity(futures.len());
    // Polled together: each is driven while the others wait.
    let mut pending: Vec<_> = futures.into_iter().map(Some).collect();
    let mut results: Vec<Option<F::Output>> = (0..pending.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (slot, result) in pending.iter_mut().zip(results.iter_mut()) {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        *result = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => done = false,
                }
            }
        }
        if done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    out.extend(results.into_iter().flatten());
    out
}
