//! The `paxoskv` command: run a replica, a local cluster, or a client call.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;
use tracing_subscriber::EnvFilter;

use paxoskv::client::{self, Call};
use paxoskv::cluster::{self, ClusterOptions};
use paxoskv::dial::{self, Dialer};
use paxoskv::paxos::NodeId;
use paxoskv::server::{self, ServeOptions};
use paxoskv::tls::{TlsConfig, TlsFiles};

/// A replicated key-value store kept consistent by Multi-Paxos.
#[derive(Parser, Debug)]
#[command(name = "paxoskv", version)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "PAXOSKV_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Text,
    Json,
}

// Parsed once, at start: the size of `Serve` costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Runs one replica.
    Serve {
        /// This replica's id (one of the ids in --peers). With
        /// --peers-from-dns it comes from the pod's name, and if given must
        /// agree with it.
        #[arg(long, env = "PAXOSKV_ID", required_unless_present = "peers_from_dns")]
        id: Option<NodeId>,
        /// Where to serve clients: KvStore, Admin, health and reflection
        /// (no Paxos).
        #[arg(long, env = "PAXOSKV_LISTEN")]
        listen: SocketAddr,
        /// Where to serve the other replicas: paxoskv.v1.Paxos only (Paxos
        /// streams, snapshots, forwarded calls). Must match this replica's
        /// own --peers entry (its port, and its host unless this is 0.0.0.0
        /// or [::]). Keep it reachable by the replicas alone.
        #[arg(long, env = "PAXOSKV_PEER_LISTEN")]
        peer_listen: SocketAddr,
        /// Where clients reach this replica (HOST:PORT), as told to the
        /// other replicas and shown by `paxoskv status`. Defaults to
        /// --listen, which must then not be 0.0.0.0 or [::].
        #[arg(long, env = "PAXOSKV_ADVERTISE_CLIENT", value_parser = parse_endpoint)]
        advertise_client: Option<String>,
        /// Every replica's PEER address (where it serves --peer-listen),
        /// this one included: 1=HOST:PORT,2=HOST:PORT,... (each HOST:PORT
        /// or http://HOST:PORT).
        #[arg(long, env = "PAXOSKV_PEERS", value_parser = parse_peers, required_unless_present = "peers_from_dns", conflicts_with = "peers_from_dns")]
        peers: Option<BTreeMap<NodeId, String>>,
        /// Kubernetes: derive --id, --peers and --advertise-client from the
        /// pod's name, as a StatefulSet gives it: pod NAME-K is replica K+1,
        /// and replica J+1's peer address is NAME-J.DOMAIN:PORT (PORT
        /// defaults to --peer-listen's). DOMAIN is the headless Service's,
        /// SERVICE.NAMESPACE.svc.cluster.local. Names are resolved when
        /// dialled, and retried until they resolve.
        #[arg(long, env = "PAXOSKV_PEERS_FROM_DNS", value_name = "DOMAIN[:PORT]", value_parser = paxoskv::pod::PeerDomain::parse)]
        peers_from_dns: Option<paxoskv::pod::PeerDomain>,
        /// With --peers-from-dns: this pod's name (default: $HOSTNAME,
        /// which Kubernetes sets to it). Ignored without it.
        #[arg(long, env = "PAXOSKV_POD_NAME")]
        pod_name: Option<String>,
        /// With --peers-from-dns: how many replicas the cluster has (the
        /// StatefulSet's replicas: 3 or 5), fixed when it is created.
        /// Ignored without it (`paxoskv cluster`, whose children inherit
        /// its environment, reads the same variable).
        #[arg(long, env = "PAXOSKV_REPLICAS")]
        replicas: Option<u32>,
        /// Where this replica keeps its data.
        #[arg(long, env = "PAXOSKV_DATA_DIR")]
        data_dir: PathBuf,
        /// The consensus clock period, in milliseconds.
        #[arg(long, env = "PAXOSKV_TICK_MS", default_value_t = 10)]
        tick_ms: u64,
        /// sled's page cache, in MiB.
        #[arg(long, env = "PAXOSKV_CACHE_MB", default_value_t = 64)]
        cache_mb: u64,
        /// Size of each new Paxos log segment file, in bytes (a multiple of
        /// 8, from 4096 to 1 GiB). Segments are preallocated to this size.
        #[arg(long, env = "PAXOSKV_LOG_SEGMENT_BYTES", default_value_t = paxoskv::storage::DEFAULT_SEGMENT_BYTES)]
        log_segment_bytes: u64,
        /// Snapshot the state machine (make it durable, compact the log)
        /// every this many applied slots; 0 never.
        #[arg(long, env = "PAXOSKV_SNAPSHOT_EVERY", default_value_t = 10_000)]
        snapshot_every: u64,
        /// Slots kept in the log below each snapshot, so that a follower a
        /// little behind catches up from the log rather than by snapshot.
        #[arg(long, env = "PAXOSKV_LOG_KEEP", default_value_t = 5_000)]
        log_keep: u64,
        /// Writes that may wait on this replica (as leader: proposed and not
        /// yet answered); past it, RESOURCE_EXHAUSTED at once.
        #[arg(long, env = "PAXOSKV_MAX_WAITING_WRITES", default_value_t = paxoskv::driver::Limits::DEFAULT.max_writes as u64, value_parser = clap::value_parser!(u64).range(1..))]
        max_waiting_writes: u64,
        /// Linearizable reads that may wait on this replica; past it,
        /// RESOURCE_EXHAUSTED at once.
        #[arg(long, env = "PAXOSKV_MAX_WAITING_READS", default_value_t = paxoskv::driver::Limits::DEFAULT.max_reads as u64, value_parser = clap::value_parser!(u64).range(1..))]
        max_waiting_reads: u64,
        /// Serve Prometheus metrics at http://ADDR/metrics.
        #[arg(long, env = "PAXOSKV_METRICS_LISTEN")]
        metrics_listen: Option<SocketAddr>,
        /// Serve the client API as HTTP/JSON on ADDR, for curl: GET, POST,
        /// PUT, PATCH and DELETE /v1/kv/KEY, POST /v1/sessions. HTTPS with
        /// the client port's mutual TLS when the --tls-* flags are given.
        #[arg(long, env = "PAXOSKV_HTTP_LISTEN", value_name = "ADDR")]
        http_listen: Option<SocketAddr>,
        /// Serve the standard health service alone at ADDR, in plaintext
        /// even with TLS (for Kubernetes' gRPC probes, which present no
        /// certificate): "" is SERVING while the process serves,
        /// paxoskv.v1.KvStore while it is ready (a leader known, caught up).
        #[arg(long, env = "PAXOSKV_HEALTH_LISTEN")]
        health_listen: Option<SocketAddr>,
        /// The cluster's name, recorded in the data directory at first
        /// start and checked at every start: a directory of another
        /// cluster (or another replica) is refused. Letters, digits, '.',
        /// '_', '-'; give each cluster its own.
        #[arg(long, env = "PAXOSKV_CLUSTER_NAME", default_value = "paxoskv", value_parser = parse_cluster_name)]
        cluster_name: String,
        /// Tests only: after this many successful log syncs, every sync
        /// fails as if the disk returned EIO.
        #[arg(long, hide = true)]
        fault_fail_syncs_after: Option<u64>,
        /// Tests only: run a deliberate bug (forget-votes, ack-early,
        /// local-reads), to prove `paxoskv check` catches it. NOT SAFE.
        #[arg(long, hide = true, value_parser = paxoskv::node::TestBug::parse)]
        unsafe_test_bug: Option<paxoskv::node::TestBug>,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Runs a local cluster of `serve` processes on 127.0.0.1 until Ctrl-C.
    Cluster {
        /// How many replicas (at most 100).
        #[arg(long, env = "PAXOSKV_REPLICAS", default_value_t = 3)]
        replicas: u32,
        /// Replica N serves clients on 127.0.0.1:(BASE_PORT + N - 1), the
        /// other replicas on 127.0.0.1:(BASE_PORT + 100 + N - 1), and
        /// HTTP/JSON on 127.0.0.1:(BASE_PORT + 200 + N - 1).
        #[arg(long, env = "PAXOSKV_BASE_PORT", default_value_t = 8081)]
        base_port: u16,
        /// Replica N keeps its data in DATA_DIR/N.
        #[arg(long, env = "PAXOSKV_DATA_DIR", default_value = "data")]
        data_dir: PathBuf,
        /// Replica N serves metrics on 127.0.0.1:(METRICS_BASE_PORT + N); 0 turns them off.
        #[arg(long, env = "PAXOSKV_METRICS_BASE_PORT", default_value_t = 9090)]
        metrics_base_port: u16,
        /// Mutual TLS: make a throwaway CA and certificates under
        /// DATA_DIR/tls/ and start the replicas with them.
        #[arg(long)]
        tls: bool,
    },
    /// Makes a CA and, signed by it, a certificate and key for each
    /// replica (Common Name paxoskv-replica-N, server and client use) and
    /// one client certificate, valid for the given host names: ca.pem,
    /// replica-N.pem, replica-N-key.pem, client.pem, client-key.pem. The
    /// CA's key is not kept.
    Certs {
        /// Where to write the files (created if needed).
        #[arg(long)]
        out: PathBuf,
        /// How many replicas: ids 1 to N.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
        replicas: u32,
        /// The names and IP addresses the certificates are valid for
        /// (subject alternative names), comma-separated or repeated; a DNS
        /// name may be a wildcard (*.paxoskv.default.svc.cluster.local).
        #[arg(
            long = "host",
            value_delimiter = ',',
            default_value = "127.0.0.1,localhost"
        )]
        hosts: Vec<String>,
    },
    /// A load generator (in the style of etcd's `benchmark`): clients
    /// write, read or both, in a closed loop or at a fixed rate, against
    /// paxoskv or etcd; prints ops/s, errors by gRPC code and latency
    /// quantiles. With --ceiling, first the same clients against a gRPC
    /// server that does nothing, for comparison.
    Bench(BenchArgs),
    /// Serves a paxoskv.v1.KvStore that answers every call at once and does
    /// nothing, until SIGTERM or Ctrl-C: the ceiling of `paxoskv bench`,
    /// as a process of its own.
    BenchServer {
        /// Where to serve (port 0 for any; the address bound is printed).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// A Jepsen-style check: starts a local cluster of its own, runs
    /// concurrent clients while killing, pausing and partitioning its
    /// replicas, heals, and checks the history for linearizability. Exits
    /// 0 if VALID, 3 if NOT LINEARIZABLE, 4 if INCONCLUSIVE, 1 if it could
    /// not run.
    Check(paxoskv::check::CheckArgs),
    /// Prints every replica's role, ballot, indexes and lag; exits 6 if the
    /// cluster has no leader or no quorum.
    Status {
        #[command(flatten)]
        target: Target,
    },
    /// Shows one replica's acceptor, read-only: its promise and its vote
    /// for a slot.
    Acceptor {
        /// The slot whose vote to show.
        slot: u64,
        #[command(flatten)]
        target: Target,
    },
    /// Reads a key.
    Get {
        key: String,
        #[command(flatten)]
        target: Target,
    },
    /// Adds a key; fails if it exists.
    Insert {
        key: String,
        #[arg(allow_negative_numbers = true)]
        value: i32,
        #[command(flatten)]
        target: Target,
    },
    /// Changes a key; fails if it is absent.
    Update {
        key: String,
        #[arg(allow_negative_numbers = true)]
        value: i32,
        #[command(flatten)]
        target: Target,
    },
    /// Inserts or updates a key.
    Upsert {
        key: String,
        #[arg(allow_negative_numbers = true)]
        value: i32,
        #[command(flatten)]
        target: Target,
    },
    /// Deletes a key; fails if it is absent.
    Remove {
        key: String,
        #[command(flatten)]
        target: Target,
    },
}

/// `paxoskv bench`'s flags.
#[derive(clap::Args, Debug)]
struct BenchArgs {
    /// Servers to spread the connections over: HOST:PORT,HOST:PORT,...
    #[arg(
        long,
        env = "PAXOSKV_ENDPOINTS",
        value_delimiter = ',',
        default_value = "127.0.0.1:8081,127.0.0.1:8082,127.0.0.1:8083"
    )]
    endpoints: Vec<String>,
    /// Concurrent clients, each with at most one call in flight.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// gRPC connections the clients share, round-robin (the connections
    /// take the endpoints in turn). Default: one per client.
    #[arg(long)]
    connections: Option<usize>,
    /// How long to run: 10, 10s, 500ms, 2m (whichever of this and --total
    /// comes first). Default 10s, unless --total is given.
    #[arg(long, visible_alias = "seconds", value_parser = parse_duration)]
    duration: Option<Duration>,
    /// How many calls to make in all.
    #[arg(long, visible_alias = "max-calls")]
    total: Option<u64>,
    /// What the calls do: write (upserts; etcd: Put), read (linearizable
    /// Gets of keys written first; etcd: Range, not serializable) or mixed
    /// (the two in turn).
    #[arg(long, value_enum, default_value = "write")]
    op: BenchOp,
    /// Same as --op read.
    #[arg(long, hide = true, conflicts_with = "op")]
    reads: bool,
    /// Distinct keys written (or read): bench-0, bench-1, ...
    #[arg(long, visible_alias = "keys", default_value_t = 1000)]
    key_space: u32,
    /// Open loop: send this many calls a second on a fixed schedule,
    /// whatever the answers do, and measure each call's latency from when
    /// it was due. Calls due while every client is busy queue (up to
    /// --clients of them); past that they are not sent and count as
    /// UNSENT errors.
    #[arg(long)]
    rate: Option<f64>,
    /// Which API to call: paxoskv.v1.KvStore, or etcd v3's KV (Put and
    /// Range).
    #[arg(long, value_enum, default_value = "paxoskv")]
    target: BenchTarget,
    /// Measure a do-nothing gRPC server (in this process) with the same
    /// clients first.
    #[arg(long)]
    ceiling: bool,
    /// Each call's deadline, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// Print one JSON object (no progress bar), for scripts.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    tls: TlsArgs,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum BenchOp {
    Write,
    Read,
    Mixed,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum BenchTarget {
    Paxoskv,
    Etcd,
}

/// Where a client call goes.
#[derive(clap::Args, Debug)]
struct Target {
    /// Any replica's client address (its --listen, not its peer port):
    /// HOST:PORT or http://HOST:PORT.
    #[arg(long, env = "PAXOSKV_ENDPOINT", default_value = "127.0.0.1:8081", value_parser = parse_endpoint)]
    endpoint: String,
    /// The call's deadline, in milliseconds.
    #[arg(long, env = "PAXOSKV_TIMEOUT_MS", default_value_t = 5000)]
    timeout_ms: u64,
    #[command(flatten)]
    tls: TlsArgs,
}

/// Mutual TLS: all three flags, or none for plaintext.
#[derive(clap::Args, Debug, Clone)]
struct TlsArgs {
    /// This process's certificate (PEM), signed by --tls-ca. A replica's
    /// must have the Common Name paxoskv-replica-ID. Turns TLS on, with
    /// --tls-key and --tls-ca.
    #[arg(long, env = "PAXOSKV_TLS_CERT", value_name = "PEM")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "PAXOSKV_TLS_KEY", value_name = "PEM")]
    tls_key: Option<PathBuf>,
    /// The CA that signs every certificate of the cluster, clients' too
    /// (PEM).
    #[arg(long, env = "PAXOSKV_TLS_CA", value_name = "PEM")]
    tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The TLS configuration the flags give, loaded and checked; `None` for
    /// plaintext. Errors name the flag and file.
    fn load(&self) -> Result<Option<TlsConfig>, String> {
        let files = TlsFiles::from_flags(
            self.tls_cert.clone(),
            self.tls_key.clone(),
            self.tls_ca.clone(),
        )?;
        files.as_ref().map(TlsConfig::load).transpose()
    }

    /// The dialer the flags give, and `endpoints` checked against it (an
    /// `https://` endpoint needs TLS, an `http://` one plaintext).
    fn dialer(&self, endpoints: &[String]) -> Result<Dialer, String> {
        let dialer = Dialer::for_config(self.load()?.as_ref());
        for endpoint in endpoints {
            dialer.normalize(endpoint).map_err(|e| e.to_string())?;
        }
        Ok(dialer)
    }
}

/// Where a replica stands in its cluster, as the flags say it: `--id`,
/// `--peers` and `--advertise-client`, or `--peers-from-dns` and the pod's
/// name (see [`paxoskv::pod`]).
struct Placement {
    id: Option<NodeId>,
    peers: Option<BTreeMap<NodeId, String>>,
    peers_from_dns: Option<paxoskv::pod::PeerDomain>,
    pod_name: Option<String>,
    replicas: Option<u32>,
    advertise_client: Option<String>,
}

/// `--id`, `--peers` and `--advertise-client`, as resolved.
type Placed = (NodeId, BTreeMap<NodeId, String>, Option<String>);

impl Placement {
    /// The id, `--peers` and `--advertise-client` to run with. Errors name
    /// the flag (clap has already refused `--peers` with
    /// `--peers-from-dns`, and either of them missing).
    fn resolve(self, listen: SocketAddr, peer_listen: SocketAddr) -> Result<Placed, String> {
        use paxoskv::pod::{self, PodName};
        let Some(dns) = self.peers_from_dns else {
            let id = self.id.ok_or("--id is required")?;
            let peers = self.peers.ok_or("--peers is required")?;
            return Ok((id, peers, self.advertise_client));
        };
        let name = self
            .pod_name
            .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
            .ok_or(
                "--peers-from-dns needs the pod's name: --pod-name or PAXOSKV_POD_NAME (or HOSTNAME, which Kubernetes sets)",
            )?;
        let replicas = self.replicas.ok_or(
            "--peers-from-dns needs --replicas N (PAXOSKV_REPLICAS): the StatefulSet's replicas",
        )?;
        let pod = PodName::parse(&name)?;
        let derived = pod::derive(&pod, replicas, &dns, peer_listen.port(), listen.port())?;
        pod::check_id(self.id, &derived, &pod)?;
        info!(
            pod = %name,
            replica = derived.id,
            peers = %derived.peers.iter().map(|(id, a)| format!("{id}={a}")).collect::<Vec<_>>().join(","),
            client_address = %self.advertise_client.as_deref().unwrap_or(&derived.client_address),
            "configuration from the pod's name (--peers-from-dns)"
        );
        Ok((
            derived.id,
            derived.peers,
            Some(self.advertise_client.unwrap_or(derived.client_address)),
        ))
    }
}

fn parse_peers(s: &str) -> Result<BTreeMap<NodeId, String>, String> {
    let mut peers = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} is not ID=HOST:PORT"))?;
        let id: NodeId = id
            .trim()
            .parse()
            .map_err(|_| format!("{id:?} in {part:?} is not a replica id"))?;
        if addr.trim().is_empty() {
            return Err(format!("replica {id} has an empty address"));
        }
        // Refused here, at start, rather than when the replica first dials
        // (whether the scheme suits TLS or plaintext is checked once the
        // --tls-* flags are known).
        dial::check_form(addr).map_err(|e| format!("replica {id}: {e}"))?;
        if peers.insert(id, addr.trim().to_string()).is_some() {
            return Err(format!("replica {id} is listed twice"));
        }
    }
    if peers.is_empty() {
        return Err("no peers given".into());
    }
    Ok(peers)
}

/// A duration: seconds (`10`, `0.5`), or a number with `ms`, `s` or `m`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let number: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (10, 10s, 500ms, 2m)"))?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "s" => number,
        "m" => number * 60.0,
        _ => return Err(format!("{s:?}: the unit must be ms, s or m")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{s:?}: {e}"))
}

fn parse_cluster_name(s: &str) -> Result<String, String> {
    paxoskv::storage::identity::check_cluster_name(s)?;
    Ok(s.to_string())
}

/// Checks `--endpoint` with the same rules every dial uses, so a bad
/// address is refused before any call, by name (its scheme against the
/// --tls-* flags later).
fn parse_endpoint(s: &str) -> Result<String, String> {
    dial::check_form(s).map_err(|e| e.to_string())?;
    Ok(s.trim().to_string())
}

fn init_logs(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> ExitCode {
    let call = match cli.command {
        Command::Serve {
            id,
            listen,
            peer_listen,
            advertise_client,
            peers,
            peers_from_dns,
            pod_name,
            replicas,
            data_dir,
            tick_ms,
            cache_mb,
            log_segment_bytes,
            snapshot_every,
            log_keep,
            max_waiting_writes,
            max_waiting_reads,
            metrics_listen,
            http_listen,
            health_listen,
            cluster_name,
            fault_fail_syncs_after,
            unsafe_test_bug,
            tls,
        } => {
            init_logs(cli.log_format);
            let placement = Placement {
                id,
                peers,
                peers_from_dns,
                pod_name,
                replicas,
                advertise_client,
            };
            let (id, peers, advertise_client) = match placement.resolve(listen, peer_listen) {
                Ok(resolved) => resolved,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            // Files that do not load are a usage error too: exit 2.
            let tls = match tls.load() {
                Ok(tls) => tls,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let opts = ServeOptions {
                id,
                listen,
                peer_listen,
                advertise_client,
                peers,
                data_dir,
                tick: Duration::from_millis(tick_ms.max(1)),
                cache_bytes: cache_mb * 1024 * 1024,
                log_segment_bytes,
                snapshots: paxoskv::node::SnapshotPolicy {
                    every: snapshot_every,
                    keep: log_keep,
                },
                drain: Duration::from_secs(5),
                limits: paxoskv::driver::Limits {
                    max_writes: usize::try_from(max_waiting_writes).unwrap_or(usize::MAX),
                    max_reads: usize::try_from(max_waiting_reads).unwrap_or(usize::MAX),
                },
                metrics_listen,
                http_listen,
                health_listen,
                cluster_name,
                fail_syncs_after: fault_fail_syncs_after,
                test_bug: unsafe_test_bug,
                tls,
            };
            // A configuration that cannot work is a usage error, like a
            // flag clap refuses: exit 2, naming it.
            if let Err(e) = opts.check() {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
            let shutdown = match shutdown_signal() {
                Ok(shutdown) => shutdown,
                Err(e) => return report(Err(e)),
            };
            return report(server::serve(opts, shutdown).await);
        }
        Command::Cluster {
            replicas,
            base_port,
            data_dir,
            metrics_base_port,
            tls,
        } => {
            init_logs(cli.log_format);
            let opts = ClusterOptions {
                replicas,
                base_port,
                data_dir,
                metrics_base_port: (metrics_base_port != 0).then_some(metrics_base_port),
                tls,
            };
            let shutdown = match shutdown_signal() {
                Ok(shutdown) => shutdown,
                Err(e) => return report(Err(e)),
            };
            return report(cluster::run(opts, shutdown).await);
        }
        Command::Certs {
            out,
            replicas,
            hosts,
        } => {
            let ids: Vec<NodeId> = (1..=replicas).collect();
            let hosts: Vec<&str> = hosts.iter().map(|h| h.trim()).collect();
            return match paxoskv::tls::generate(&out, &ids, &hosts) {
                Ok(made) => {
                    println!(
                        "wrote {} (CA), replica-1..{replicas}.pem with their keys, client.pem and client-key.pem under {}, for {}",
                        made.ca.display(),
                        out.display(),
                        hosts.join(", ")
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Bench(args) => return bench(args).await,
        Command::BenchServer { listen } => {
            init_logs(cli.log_format);
            let shutdown = match shutdown_signal() {
                Ok(shutdown) => shutdown,
                Err(e) => return report(Err(e)),
            };
            let (addr, server) = match paxoskv::bench::serve_noop(listen).await {
                Ok(served) => served,
                Err(e) => return report(Err(e.into())),
            };
            println!("no-op KvStore listening on {addr}");
            shutdown.await;
            server.abort();
            return ExitCode::SUCCESS;
        }
        Command::Check(args) => {
            let interrupted = match shutdown_signal() {
                Ok(signal) => signal,
                Err(e) => return report(Err(e)),
            };
            return ExitCode::from(paxoskv::check::command(args, interrupted).await);
        }
        Command::Status { target } => {
            let timeout = Duration::from_millis(target.timeout_ms);
            let dialer = match target.tls.dialer(std::slice::from_ref(&target.endpoint)) {
                Ok(dialer) => dialer,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            return match client::cluster_status(&dialer, &target.endpoint, timeout).await {
                Ok((table, None)) => {
                    print!("{table}");
                    ExitCode::SUCCESS
                }
                Ok((table, Some(problem))) => {
                    print!("{table}");
                    eprintln!("error: {problem}");
                    ExitCode::from(client::exit::UNAVAILABLE as u8)
                }
                Err(status) => {
                    eprintln!("error: {:?}: {}", status.code(), status.message());
                    ExitCode::from(client::exit_code(&status) as u8)
                }
            };
        }
        Command::Acceptor { slot, target } => {
            let timeout = Duration::from_millis(target.timeout_ms);
            let dialer = match target.tls.dialer(std::slice::from_ref(&target.endpoint)) {
                Ok(dialer) => dialer,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            return match client::acceptor(&dialer, &target.endpoint, slot, timeout).await {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(status) => {
                    eprintln!("error: {:?}: {}", status.code(), status.message());
                    ExitCode::from(client::exit_code(&status) as u8)
                }
            };
        }
        Command::Get { key, target } => (Call::Get { key }, target),
        Command::Insert { key, value, target } => (Call::Insert { key, value }, target),
        Command::Update { key, value, target } => (Call::Update { key, value }, target),
        Command::Upsert { key, value, target } => (Call::Upsert { key, value }, target),
        Command::Remove { key, target } => (Call::Remove { key }, target),
    };
    let (call, target) = call;
    let dialer = match target.tls.dialer(std::slice::from_ref(&target.endpoint)) {
        Ok(dialer) => dialer,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match client::run(
        &dialer,
        &target.endpoint,
        Duration::from_millis(target.timeout_ms),
        call,
    )
    .await
    {
        Ok(out) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(status) => {
            eprintln!("error: {:?}: {}", status.code(), status.message());
            ExitCode::from(client::exit_code(&status) as u8)
        }
    }
}

/// `paxoskv bench`: runs the workload (after the ceiling, with
/// --ceiling) and prints the report, or one JSON object with --json.
async fn bench(args: BenchArgs) -> ExitCode {
    use paxoskv::bench::{self, BenchOptions, Op, Target};
    let dialer = match args.tls.dialer(&args.endpoints) {
        Ok(dialer) => dialer,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let op = match (args.reads, args.op) {
        (true, _) | (false, BenchOp::Read) => Op::Read,
        (false, BenchOp::Write) => Op::Write,
        (false, BenchOp::Mixed) => Op::Mixed,
    };
    let target = match args.target {
        BenchTarget::Paxoskv => Target::Paxoskv,
        BenchTarget::Etcd => Target::Etcd,
    };
    if args.ceiling && target == Target::Etcd {
        eprintln!("error: --ceiling measures a no-op paxoskv server; leave out --target etcd");
        return ExitCode::from(2);
    }
    let mut opts = BenchOptions {
        endpoints: args.endpoints,
        clients: args.clients,
        connections: args.connections.unwrap_or(0),
        duration: args.duration,
        total: args.total,
        op,
        key_space: args.key_space,
        rate: args.rate,
        timeout: Duration::from_millis(args.timeout_ms),
        target,
        dialer,
        progress: !args.json && std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let what = format!(
        "{} clients on {} connections, {}{}",
        opts.clients,
        opts.connection_count(),
        op.name(),
        opts.rate
            .map_or(String::new(), |r| format!(", open loop at {r}/s"))
    );
    let mut floor = None;
    if args.ceiling {
        let (addr, server) = match bench::serve_noop(([127, 0, 0, 1], 0).into()).await {
            Ok(served) => served,
            Err(e) => return report(Err(e.into())),
        };
        // The no-op server is plaintext, TLS or not: the ceiling leaves out
        // the cost of TLS.
        let cluster = std::mem::replace(&mut opts.endpoints, vec![addr.to_string()]);
        let dialer = std::mem::replace(&mut opts.dialer, Dialer::plain());
        let plaintext = if dialer.is_tls() { " (plaintext)" } else { "" };
        let result = bench::run(&opts).await;
        server.abort();
        match result {
            Ok(r) => {
                if !args.json {
                    print_report(&format!("no-op server{plaintext}, {what}"), &r);
                }
                floor = Some((r.clone(), r.to_json(&opts)));
            }
            Err(e) => return report(Err(e.into())),
        }
        opts.endpoints = cluster;
        opts.dialer = dialer;
    }
    let r = match bench::run(&opts).await {
        Ok(r) => r,
        Err(e) => return report(Err(e.into())),
    };
    if args.json {
        let mut json = r.to_json(&opts);
        if let (Some((_, ceiling)), Some(object)) = (floor, json.as_object_mut()) {
            object.insert("ceiling".into(), ceiling);
        }
        println!("{json}");
        return ExitCode::SUCCESS;
    }
    print_report(&format!("{}, {what}", target.name()), &r);
    if let Some((f, _)) = floor {
        println!(
            "ratio to the no-op server: p50 {:.2}x, throughput {:.2}x",
            r.quantile(0.5).as_secs_f64() / f.quantile(0.5).as_secs_f64().max(1e-9),
            r.rate() / f.rate().max(1e-9)
        );
    }
    ExitCode::SUCCESS
}

/// A bench report for people: the errors by code and the first error, if
/// any, then one line of figures (last, so `| tail -1` picks it).
fn print_report(label: &str, r: &paxoskv::bench::Report) {
    if let Some(errors) = r.errors_line() {
        println!("errors by code: {errors}");
    }
    if let Some(e) = &r.first_error {
        println!("first error: {e}");
    }
    println!("{label}: {}", r.line());
}

/// The one place `serve` and `cluster` learn they must stop: a future that
/// resolves on the first SIGTERM or SIGINT, logging which. The handlers are
/// installed at once, before the replica (or cluster) starts, so a signal
/// that arrives during start-up is not lost: it stops the process cleanly as
/// soon as it is up, instead of killing it the default way.
fn shutdown_signal() -> Result<impl Future<Output = ()> + Send + 'static, BoxError> {
    let installing = |e| format!("cannot install the SIGTERM/SIGINT handlers: {e}");
    let mut term = signal(SignalKind::terminate()).map_err(installing)?;
    let mut int = signal(SignalKind::interrupt()).map_err(installing)?;
    Ok(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        info!(signal = name, "signal received");
    })
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn report(result: Result<(), BoxError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
