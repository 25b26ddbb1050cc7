//! `paxoskv check`: a Jepsen-style test a user runs against a local cluster
//! of its own.
//!
//! It starts `--replicas` child `paxoskv serve` processes (this very
//! binary) on 127.0.0.1, with a fault-injecting TCP proxy on every link
//! between two of them, runs `--clients` concurrent clients doing random
//! `Get`/`Insert`/`Update`/`Upsert`/`Remove` on a small, rotating key space
//! for `--seconds`, while a nemesis kills (SIGKILL and restart), pauses
//! (SIGSTOP/SIGCONT) and partitions its replicas, never more than a
//! minority at once. Then it heals everything, waits for a leader and for
//! every replica to catch up, reads every key ever written through every
//! replica (so that an acknowledged write that was lost shows), stops the
//! cluster, and checks the whole history for linearizability, key by key.
//!
//! The verdict is VALID (exit 0) only if the history is linearizable and
//! the check was conclusive; NOT LINEARIZABLE (exit 3) with the failing
//! key's sub-history; INCONCLUSIVE (exit 4) with the reasons (too few
//! successful operations, final reads that failed, a cluster that never
//! settled, a replica that exited on its own, a checker out of time). A
//! violation found is always reported, whatever else went wrong: every
//! operation in the history was observed.
//!
//! `--break NAME` runs every replica with a deliberate bug
//! ([`crate::node::TestBug`]), to show that the check catches it.
//!
//! One idea per file:
//! - [`linearizability`]: the Wing–Gong/Lowe checker for key-value
//!   histories (the simulator uses it too);
//! - [`local`]: the cluster under test: child processes, and the one
//!   function that builds a replica's command line;
//! - [`proxy`]: the TCP proxy that cuts a link;
//! - [`nemesis`]: the fault schedule and the minority rule;
//! - [`workload`]: the clients, retries with the same request id, and the
//!   history.

pub mod linearizability;
pub mod local;
pub mod nemesis;
pub mod proxy;
pub mod workload;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::cluster;
use crate::node::TestBug;
use linearizability::{Operation, Output, Violation};
use local::{LocalCluster, Ports};
use nemesis::{FaultEvent, FaultSet, Nemesis, Timing};
use workload::{History, WorkloadOptions};

/// `paxoskv check`'s command line.
#[derive(clap::Args, Clone, Debug)]
pub struct CheckArgs {
    /// How long the clients and faults run.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Replicas in the cluster.
    #[arg(long, default_value_t = 3)]
    pub replicas: u32,
    /// Faults to inject: any of kill,pause,partition, or none.
    #[arg(long, default_value = "kill,pause,partition", value_parser = FaultSet::parse)]
    pub faults: FaultSet,
    /// Seed of the fault schedule and the clients' calls (default: from
    /// the clock; printed, to run the same plan again).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Where the replicas keep data and logs (must be empty or new;
    /// default: a new directory in the system's temp directory, removed
    /// after a VALID run).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Replica N serves clients on 127.0.0.1:(BASE_PORT + N - 1) and its
    /// peers on 127.0.0.1:(BASE_PORT + 100 + N - 1) (default: free ports).
    #[arg(long)]
    pub base_port: Option<u16>,
    /// Run every replica with a deliberate bug, to see the check catch it:
    /// forget-votes, ack-early or local-reads.
    #[arg(long = "break", value_parser = TestBug::parse)]
    pub break_bug: Option<TestBug>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

impl CheckArgs {
    /// The options these arguments ask for; without `--seed`, one drawn
    /// from the clock.
    pub fn options(&self) -> CheckOptions {
        let seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64 % 1_000_000)
        });
        CheckOptions {
            duration: Duration::from_secs(self.seconds),
            clients: self.clients,
            replicas: self.replicas,
            faults: self.faults,
            seed,
            data_dir: self.data_dir.clone(),
            base_port: self.base_port,
            test_bug: self.break_bug,
        }
    }
}

/// `paxoskv check` as the command line runs it: progress on stderr, the
/// report on stdout (JSON with `--json`); returns the exit code ([`exit`]).
/// If `interrupted` resolves first (Ctrl-C, SIGTERM), the run is dropped,
/// and with it every replica it started.
pub async fn command(args: CheckArgs, interrupted: impl Future<Output = ()>) -> u8 {
    let outcome = tokio::select! {
        outcome = run(args.options()) => outcome,
        () = interrupted => {
            eprintln!("paxoskv check: interrupted; every replica it started is stopped");
            return exit::INTERRUPTED;
        }
    };
    match outcome {
        Ok(report) => {
            if args.json {
                println!("{:#}", report.json());
            } else {
                print!("{}", report.text());
            }
            report.exit_code()
        }
        Err(e) => {
            eprintln!("error: {e}");
            exit::ERROR
        }
    }
}

/// What a check does.
#[derive(Clone, Debug)]
pub struct CheckOptions {
    /// How long the clients and the nemesis run.
    pub duration: Duration,
    /// Concurrent clients.
    pub clients: usize,
    /// How many replicas.
    pub replicas: u32,
    /// Which faults to inject.
    pub faults: FaultSet,
    /// Draws the fault schedule and the clients' calls. Timing still
    /// varies from run to run: the same seed makes the same plan, not the
    /// same history.
    pub seed: u64,
    /// Where the replicas keep their data and logs (`DIR/N`,
    /// `DIR/replica-N.log`); a new directory under the system's temporary
    /// directory if unset (removed after a VALID run).
    pub data_dir: Option<PathBuf>,
    /// Replica N serves clients on 127.0.0.1:(base_port + N - 1) and its
    /// peers on 127.0.0.1:(base_port + 100 + N - 1), as `paxoskv cluster`;
    /// free ports if unset. The proxies always take free ports.
    pub base_port: Option<u16>,
    /// A deliberate bug for every replica (`--break`), to prove the check
    /// catches it.
    pub test_bug: Option<TestBug>,
}

/// Exit codes of `paxoskv check`.
pub mod exit {
    /// VALID: linearizable, and the check was conclusive.
    pub const VALID: u8 = 0;
    /// The check could not run (bad options, a directory in use, replicas
    /// that never came up).
    pub const ERROR: u8 = 1;
    /// NOT LINEARIZABLE: the history has no linearization.
    pub const VIOLATION: u8 = 3;
    /// INCONCLUSIVE: no violation found, but the check proves too little.
    pub const INCONCLUSIVE: u8 = 4;
    /// Interrupted (Ctrl-C or SIGTERM); every replica was stopped.
    pub const INTERRUPTED: u8 = 130;
}

/// Fewer successful operations than this make a run inconclusive.
pub const MIN_OK_OPERATIONS: u64 = 200;

/// Fewer successful writes than this make a run inconclusive, however many
/// reads succeeded: reads of values no write set prove nothing.
pub const MIN_OK_WRITES: u64 = 50;

/// Each client call's deadline.
const CALL_DEADLINE: Duration = Duration::from_secs(1);
/// Calls of one write in all (the first and its retries).
const WRITE_ATTEMPTS: u32 = 6;
/// Keys in use at a time, and how long they are used.
const KEYS_PER_GENERATION: u32 = 8;
const GENERATION: Duration = Duration::from_secs(4);
/// The throughput report's bucket.
const BUCKET: Duration = Duration::from_secs(5);
/// How long the cluster may take to come up, and to settle after healing.
const READY_WITHIN: Duration = Duration::from_secs(30);
const SETTLE_WITHIN: Duration = Duration::from_secs(30);
/// Settling is given up sooner if no replica's applied index moves for this
/// long (a replica that can never catch up: nothing to wait for).
const SETTLE_STALLED: Duration = Duration::from_secs(10);
/// How long the checker may take.
const CHECK_BUDGET: Duration = Duration::from_secs(120);

/// The outcome.
#[derive(Clone, Debug)]
pub enum Verdict {
    /// Linearizable, and conclusive.
    Valid,
    /// A key's sub-history has no linearization.
    NotLinearizable(Box<Failure>),
    /// No violation found, for these reasons not conclusive.
    Inconclusive(Vec<String>),
}

/// A key without linearization, shown as its history stood at the
/// earliest time it already had none.
#[derive(Clone, Debug)]
pub struct Failure {
    /// The checker's report on the key's history up to `cut`: the operations
    /// called by then, those answered later as pending (as they stood
    /// then). Since linearizability holds of a history only if it holds of
    /// every such prefix, this is a violation in its own right.
    pub violation: Violation,
    /// The time (µs since the start) of the answer that left no
    /// linearization.
    pub cut: u64,
    /// The key's whole sub-history.
    pub full: Vec<Operation>,
}

impl Failure {
    /// Finds the earliest answer after which `violation`'s key already has
    /// no linearization (a binary search over the answers' times: a history
    /// whose prefix has none has none either).
    pub fn shrink(violation: Violation) -> Failure {
        let full = violation.ops.clone();
        let mut times: Vec<u64> = full
            .iter()
            .filter(|op| op.output.is_some())
            .map(|op| op.ret)
            .collect();
        times.sort_unstable();
        times.dedup();
        // Invariant: the prefix at times[hi] fails (the whole history does).
        let (mut lo, mut hi) = (0, times.len().saturating_sub(1));
        let mut best = None;
        while lo <= hi && !times.is_empty() {
            let mid = (lo + hi) / 2;
            match linearizability::check(&prefix(&full, times[mid])) {
                Err(v) => {
                    best = Some((v, times[mid]));
                    if mid == 0 {
                        break;
                    }
                    hi = mid - 1;
                }
                Ok(()) => lo = mid + 1,
            }
        }
        match best {
            Some((violation, cut)) => Failure {
                violation,
                cut,
                full,
            },
            // Not found by the search (it always is): the whole history.
            None => Failure {
                cut: times.last().copied().unwrap_or(0),
                violation,
                full,
            },
        }
    }
}

/// `ops` as they stood at time `t`: those called by then, and those
/// answered after `t` as pending.
fn prefix(ops: &[Operation], t: u64) -> Vec<Operation> {
    ops.iter()
        .filter(|op| op.call <= t)
        .map(|op| {
            let mut op = op.clone();
            if op.ret > t {
                op.output = None;
            }
            op
        })
        .collect()
}

/// Everything a check found, for the report.
#[derive(Clone, Debug)]
pub struct Report {
    /// What was run.
    pub options: CheckOptions,
    /// The replicas' data and logs.
    pub dir: PathBuf,
    /// Whether `dir` is left on disk.
    pub dir_kept: bool,
    /// What the nemesis did, and when.
    pub faults: Vec<FaultEvent>,
    /// Successful client operations per 5 s of the run.
    pub throughput: Vec<u64>,
    /// The clients' counts (the final reads not included).
    pub clients: Counts,
    /// Final reads answered, and asked.
    pub final_reads: (u64, u64),
    /// Operations in the history checked, and keys.
    pub checked: (usize, usize),
    /// How long the checker took.
    pub check_time: Duration,
    /// How long the clients ran.
    pub run_time: Duration,
    /// Things worth knowing that do not change the verdict.
    pub notes: Vec<String>,
    /// The verdict.
    pub verdict: Verdict,
    /// Which replicas served each operation, by (client, call time).
    via: HashMap<(u64, u64), String>,
}

/// The clients' operation counts.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    /// Reads answered.
    pub reads_ok: u64,
    /// Writes answered.
    pub writes_ok: u64,
    /// Writes answered only after a retry of an indeterminate attempt.
    pub resolved_by_retry: u64,
    /// Reads that failed (no effect; not in the history).
    pub reads_failed: u64,
    /// Writes that certainly failed (not in the history).
    pub writes_failed: u64,
    /// Writes never answered: pending in the history.
    pub indeterminate: u64,
    /// Calls made, retries included.
    pub calls: u64,
}

impl Counts {
    fn of(h: &History) -> Counts {
        Counts {
            reads_ok: h.reads_ok,
            writes_ok: h.writes_ok,
            resolved_by_retry: h.writes_resolved_by_retry,
            reads_failed: h.reads_failed,
            writes_failed: h.writes_failed,
            indeterminate: h.writes_indeterminate,
            calls: h.calls,
        }
    }

    /// Operations answered.
    pub fn ok(&self) -> u64 {
        self.reads_ok + self.writes_ok
    }
}

/// Where the run keeps its files, and whether it made the directory.
fn data_dir(opts: &CheckOptions) -> Result<(PathBuf, bool), String> {
    match &opts.data_dir {
        Some(dir) => {
            let in_use = std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some());
            if in_use {
                return Err(format!(
                    "{} is not empty: a check starts a new cluster; give it an empty or new directory",
                    dir.display()
                ));
            }
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            Ok((dir.clone(), false))
        }
        None => {
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            let dir =
                std::env::temp_dir().join(format!("paxoskv-check-{}-{stamp}", std::process::id()));
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            Ok((dir, true))
        }
    }
}

/// The replicas' client and peer addresses, and listeners holding those
/// ports until the proxies have taken theirs (drop them just before the
/// replicas start).
///
/// With `--base-port`, as `paxoskv cluster` lays them out ([`cluster::addresses`]).
/// Without, free ports drawn below the kernel's ephemeral range: a port
/// from that range, free while its replica is killed, could be taken by
/// any outgoing connection (a proxy dials hundreds), and the replica could
/// not restart on it.
fn addresses(
    opts: &CheckOptions,
) -> Result<(BTreeMap<u32, Ports>, Vec<std::net::TcpListener>), String> {
    let ids = 1..=opts.replicas;
    if let Some(base) = opts.base_port {
        let addrs = ids
            .map(|id| {
                let (client, peer) = cluster::addresses(base, id)?;
                let parse = |a: String| {
                    a.parse::<SocketAddr>()
                        .map_err(|e| format!("replica {id}: {a}: {e}"))
                };
                Ok((
                    id,
                    Ports {
                        client: parse(client)?,
                        peer: parse(peer)?,
                    },
                ))
            })
            .collect::<Result<_, String>>()?;
        return Ok((addrs, Vec::new()));
    }
    let ephemeral_from = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (lo, hi) = (10_000u16, ephemeral_from.max(10_001));
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut rng = crate::paxos::rng::Rng::new(stamp ^ u64::from(std::process::id()));
    let mut held = Vec::new();
    let mut free = |id: u32| -> Result<SocketAddr, String> {
        let mut tries = 0;
        let listener = loop {
            tries += 1;
            let port = rng.range(u64::from(lo), u64::from(hi)) as u16;
            match std::net::TcpListener::bind(("127.0.0.1", port)) {
                Ok(l) => break l,
                Err(_) if tries < 200 => continue,
                Err(e) => return Err(format!("no free port for replica {id}: {e}")),
            }
        };
        let addr = listener
            .local_addr()
            .map_err(|e| format!("no free port for replica {id}: {e}"))?;
        held.push(listener);
        Ok(addr)
    };
    let mut addrs = BTreeMap::new();
    for id in ids {
        let ports = Ports {
            client: free(id)?,
            peer: free(id)?,
        };
        addrs.insert(id, ports);
    }
    Ok((addrs, held))
}

/// Runs a check and reports. `Err` means it could not run at all.
///
/// Progress goes to stderr as it happens; the report is for the caller to
/// print.
pub async fn run(opts: CheckOptions) -> Result<Report, String> {
    if opts.replicas == 0 || opts.clients == 0 || opts.duration.is_zero() {
        return Err("--replicas, --clients and --seconds must be at least 1".into());
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let (dir, made_dir) = data_dir(&opts)?;
    let (listen, held) = addresses(&opts)?;
    if let Some(bug) = opts.test_bug {
        eprintln!(
            "paxoskv check: WARNING: every replica runs the deliberate bug {:?} (--break): expect a violation",
            bug.name()
        );
    }
    eprintln!(
        "paxoskv check: starting {} replicas (data and logs in {})",
        opts.replicas,
        dir.display()
    );
    let mut cluster = LocalCluster::start(exe, dir.clone(), listen, held, opts.test_bug).await?;
    wait_ready(&cluster).await.map_err(|e| {
        format!(
            "the cluster did not come up within {READY_WITHIN:?}: {e} (replica logs in {})",
            dir.display()
        )
    })?;
    eprintln!(
        "paxoskv check: running {} clients for {} s, faults {}, seed {}",
        opts.clients,
        opts.duration.as_secs(),
        opts.faults,
        opts.seed
    );

    // The run: clients and nemesis together, until the time is up.
    let started = Instant::now();
    let (stop_clients, clients_stop) = watch::channel(false);
    let (cut_tx, cut_rx) = watch::channel(Vec::new());
    let workload = tokio::spawn(workload::run(
        WorkloadOptions {
            clients: opts.clients,
            endpoints: cluster.endpoints(),
            keys_per_generation: KEYS_PER_GENERATION,
            generation: GENERATION,
            deadline: CALL_DEADLINE,
            max_attempts: WRITE_ATTEMPTS,
            seed: opts.seed,
        },
        started,
        clients_stop,
        cut_rx,
    ));
    let plan = nemesis::plan(
        opts.seed,
        opts.replicas,
        opts.faults,
        opts.duration,
        &Timing::default(),
    );
    let mut nemesis = Nemesis::new(&mut cluster, opts.seed, started, cut_tx);
    let (stop_nemesis, mut nemesis_stop) = watch::channel(false);
    tokio::join!(nemesis.run(&plan, &mut nemesis_stop), async {
        tokio::time::sleep_until(started + opts.duration).await;
        stop_nemesis.send_replace(true);
    });
    // Healed before the clients stop, so that writes still being retried
    // can learn their outcome rather than end pending.
    let healed = nemesis.heal().await;
    let faults = nemesis.into_log();
    stop_clients.send_replace(true);
    eprintln!("paxoskv check: faults healed; waiting for the clients' last calls");
    let history = workload
        .await
        .map_err(|e| format!("the clients failed: {e}"))??;
    let run_time = started.elapsed();

    let mut inconclusive = Vec::new();
    let mut notes = Vec::new();
    if !healed {
        inconclusive.push("not every fault could be healed (see the fault schedule)".into());
    }
    for e in &faults {
        if e.what.contains("EXITED ON ITS OWN") {
            inconclusive.push(format!(
                "at {:.2} s {} — a crash of its own, not a fault injected (see its log)",
                e.at.as_secs_f64(),
                e.what
            ));
        }
    }
    eprintln!("paxoskv check: waiting for a leader and for every replica to catch up");
    if let Err(e) = wait_settled(&cluster).await {
        inconclusive.push(format!(
            "the cluster did not settle within {SETTLE_WITHIN:?} after the faults were healed: {e}"
        ));
    }
    let keys = history.written_keys();
    eprintln!(
        "paxoskv check: reading {} keys through each of {} replicas",
        keys.len(),
        opts.replicas
    );
    let (finals, final_failures) = workload::final_reads(
        &cluster.endpoints(),
        &keys,
        started,
        Duration::from_secs(2),
        5,
    )
    .await?;
    let asked = keys.len() as u64 * u64::from(opts.replicas);
    if !final_failures.is_empty() {
        inconclusive.push(format!(
            "{} of {asked} final reads failed, e.g. {}",
            final_failures.len(),
            final_failures[0]
        ));
    }
    for problem in cluster.stop().await {
        notes.push(format!("at the end: {problem}"));
    }
    drop(cluster);

    let counts = Counts::of(&history);
    if counts.ok() < MIN_OK_OPERATIONS {
        inconclusive.push(format!(
            "only {} operations succeeded; at least {MIN_OK_OPERATIONS} are needed to say much",
            counts.ok()
        ));
    }
    if counts.writes_ok < MIN_OK_WRITES {
        inconclusive.push(format!(
            "only {} writes succeeded; at least {MIN_OK_WRITES} are needed to say much",
            counts.writes_ok
        ));
    }
    let throughput = throughput(&history.ops, run_time);
    let mut via = history.via;
    via.extend(finals.via);
    let mut ops = history.ops;
    let final_ok = finals.reads_ok;
    ops.extend(finals.ops);
    let key_count = ops.iter().map(|op| &op.key).collect::<BTreeSet<_>>().len();
    let checked = (ops.len(), key_count);

    eprintln!(
        "paxoskv check: checking {} operations on {key_count} keys",
        ops.len()
    );
    let checking = Instant::now();
    let result = check_within(ops, CHECK_BUDGET).await;
    let check_time = checking.elapsed();
    let verdict = match result {
        Some(Err(violation)) => Verdict::NotLinearizable(Box::new(Failure::shrink(violation))),
        Some(Ok(())) if inconclusive.is_empty() => Verdict::Valid,
        Some(Ok(())) => Verdict::Inconclusive(inconclusive),
        None => {
            inconclusive.push(format!(
                "the checker did not finish within {CHECK_BUDGET:?}"
            ));
            Verdict::Inconclusive(inconclusive)
        }
    };
    let dir_kept = !(made_dir && matches!(verdict, Verdict::Valid));
    if !dir_kept {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(Report {
        options: opts,
        dir,
        dir_kept,
        faults,
        throughput,
        clients: counts,
        final_reads: (final_ok, asked),
        checked,
        check_time,
        run_time,
        notes,
        verdict,
        via,
    })
}

/// Runs the checker on a thread of its own, for at most `budget` (the
/// search is exponential in the worst case). `None` if it ran out of time;
/// the thread is then left to finish on its own.
async fn check_within(ops: Vec<Operation>, budget: Duration) -> Option<Result<(), Violation>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(linearizability::check(&ops));
    });
    tokio::time::timeout(budget, rx).await.ok()?.ok()
}

/// Successful client operations per [`BUCKET`] of the run, by return time.
fn throughput(ops: &[Operation], run_time: Duration) -> Vec<u64> {
    let bucket_us = BUCKET.as_micros() as u64;
    let buckets = (run_time.as_micros() as u64).div_ceil(bucket_us).max(1);
    let mut out = vec![0; buckets as usize];
    for op in ops.iter().filter(|op| op.output.is_some()) {
        let b = (op.ret / bucket_us).min(buckets - 1);
        out[b as usize] += 1;
    }
    out
}

/// Waits until every replica answers, one leader is known and every
/// replica follows it.
async fn wait_ready(cluster: &LocalCluster) -> Result<(), String> {
    let deadline = Instant::now() + READY_WITHIN;
    loop {
        let statuses = cluster.statuses(Duration::from_millis(500)).await;
        let why = match leader_of(&statuses) {
            Ok(leader) => {
                let lagging: Vec<u32> = statuses
                    .iter()
                    .filter(|(_, s)| s.as_ref().is_ok_and(|s| s.leader != leader))
                    .map(|(id, _)| *id)
                    .collect();
                if lagging.is_empty() {
                    return Ok(());
                }
                format!("replicas {lagging:?} do not follow the leader {leader} yet")
            }
            Err(why) => why,
        };
        if Instant::now() > deadline {
            return Err(why);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The leader, if every replica answers and one leads.
fn leader_of(
    statuses: &BTreeMap<u32, Result<crate::pb::StatusResponse, String>>,
) -> Result<u32, String> {
    if let Some((id, Err(e))) = statuses.iter().find(|(_, s)| s.is_err()) {
        return Err(format!("replica {id} does not answer: {e}"));
    }
    statuses
        .iter()
        .filter_map(|(id, s)| s.as_ref().ok().map(|s| (*id, s)))
        .filter(|(_, s)| s.role == "leader")
        .max_by_key(|(_, s)| (s.ballot_round, s.ballot_node))
        .map(|(id, _)| id)
        .ok_or_else(|| "no leader".to_string())
}

/// Waits until one leader is known and every replica has applied all it
/// committed, the same twice in a row (the clients have stopped, so the
/// log stands still).
async fn wait_settled(cluster: &LocalCluster) -> Result<(), String> {
    let deadline = Instant::now() + SETTLE_WITHIN;
    let mut last = None;
    let mut applied = Vec::new();
    let mut progress = Instant::now();
    loop {
        let statuses = cluster.statuses(Duration::from_millis(500)).await;
        let why = match leader_of(&statuses) {
            Ok(leader) => {
                let views: Vec<(u32, u32, String, u64, u64)> = statuses
                    .iter()
                    .filter_map(|(id, s)| s.as_ref().ok().map(|s| (*id, s)))
                    .map(|(id, s)| (id, s.leader, s.role.clone(), s.committed, s.applied))
                    .collect();
                let committed = views.iter().map(|v| v.3).max().unwrap_or(0);
                let now_applied: Vec<u64> = views.iter().map(|v| v.4).collect();
                if now_applied != applied {
                    applied = now_applied;
                    progress = Instant::now();
                }
                let settled = views
                    .iter()
                    .all(|(_, l, _, _, applied)| *l == leader && *applied == committed);
                if settled && last.as_ref() == Some(&views) {
                    return Ok(());
                }
                let text = views
                    .iter()
                    .map(|(id, l, role, c, a)| {
                        format!("replica {id}: {role}, leader {l}, committed {c}, applied {a}")
                    })
                    .collect::<Vec<_>>()
                    .join("; ");
                last = Some(views);
                text
            }
            Err(why) => {
                last = None;
                why
            }
        };
        if Instant::now() > deadline {
            return Err(why);
        }
        if progress.elapsed() > SETTLE_STALLED {
            return Err(format!(
                "no replica applied anything for {SETTLE_STALLED:?}: {why}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

impl Report {
    /// The exit code for this verdict.
    pub fn exit_code(&self) -> u8 {
        match self.verdict {
            Verdict::Valid => exit::VALID,
            Verdict::NotLinearizable(_) => exit::VIOLATION,
            Verdict::Inconclusive(_) => exit::INCONCLUSIVE,
        }
    }

    fn header(&self) -> String {
        let o = &self.options;
        let bug = o
            .test_bug
            .map(|b| format!(", DELIBERATE BUG {}", b.name()))
            .unwrap_or_default();
        format!(
            "paxoskv check: {} replicas, {} clients, {} s, faults {}, seed {}{bug}",
            o.replicas,
            o.clients,
            o.duration.as_secs(),
            o.faults,
            o.seed
        )
    }

    /// The report for a person.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{}", self.header());
        let _ = writeln!(
            out,
            "replica data and logs: {}{}",
            self.dir.display(),
            if self.dir_kept { "" } else { " (removed)" }
        );
        let _ = writeln!(out, "\nFaults (seconds since the start):");
        if self.faults.is_empty() {
            let _ = writeln!(out, "  none");
        }
        for e in &self.faults {
            let _ = writeln!(out, "  {:>7.2}  {}", e.at.as_secs_f64(), e.what);
        }
        let _ = writeln!(out, "\nThroughput (successful operations per 5 s):");
        let top = self.throughput.iter().copied().max().unwrap_or(0).max(1);
        let secs = BUCKET.as_secs();
        for (i, n) in self.throughput.iter().enumerate() {
            let from = i as u64 * secs;
            let bar = "#".repeat(((n * 40).div_ceil(top)) as usize);
            let _ = writeln!(out, "  {:>4}-{:<4}s {n:>7}  {bar}", from, from + secs);
        }
        let c = &self.clients;
        let _ = writeln!(
            out,
            "\nOperations: {:>7} ok: {} reads, {} writes ({} of them answered on a retry with the same request id)\n\
             {:>19} failed with no effect, not in the history: {} reads, {} writes\n\
             {:>19} indeterminate: writes never answered, in the history as pending\n\
             {:>19} calls in all, retries included",
            c.ok(),
            c.reads_ok,
            c.writes_ok,
            c.resolved_by_retry,
            c.reads_failed + c.writes_failed,
            c.reads_failed,
            c.writes_failed,
            c.indeterminate,
            c.calls
        );
        let _ = writeln!(
            out,
            "Final reads: {} of {} answered (every key written, through every replica)",
            self.final_reads.0, self.final_reads.1
        );
        let _ = writeln!(
            out,
            "Checker: {} operations on {} keys in {:.2} s",
            self.checked.0,
            self.checked.1,
            self.check_time.as_secs_f64()
        );
        for note in &self.notes {
            let _ = writeln!(out, "Note: {note}");
        }
        let _ = writeln!(out);
        match &self.verdict {
            Verdict::Valid => {
                let _ = writeln!(out, "VALID: the history is linearizable");
            }
            Verdict::NotLinearizable(f) => {
                let v = &f.violation;
                let _ = writeln!(
                    out,
                    "NOT LINEARIZABLE: key {:?} has no linearization.\n\
                     It already had none at {:.3} s. Below, its history as it stood then: the {} \
                     operations called by then,\nthose answered later shown pending (times in µs \
                     since the start). This is the smallest failing sub-history\nthis checker \
                     reports; the key's whole sub-history has {} operations.",
                    v.key,
                    f.cut as f64 / 1e6,
                    v.ops.len(),
                    f.full.len()
                );
                out += &self.sub_history(f);
                let _ = writeln!(out, "{}", v.message);
            }
            Verdict::Inconclusive(reasons) => {
                let _ = writeln!(out, "INCONCLUSIVE: no violation found, but:");
                for r in reasons {
                    let _ = writeln!(out, "  - {r}");
                }
            }
        }
        out
    }

    fn sub_history(&self, f: &Failure) -> String {
        let mut out = String::new();
        for (i, op) in f.violation.ops.iter().enumerate() {
            let via = self
                .via
                .get(&(op.client, op.call))
                .map(|s| format!("  ({s})"))
                .unwrap_or_default();
            let later = f
                .full
                .iter()
                .find(|o| o.client == op.client && o.call == op.call)
                .and_then(|o| o.output.map(|out| (o.ret, out)));
            let outcome = match (op.output, later) {
                (Some(output), _) => {
                    format!("ret {:>10}: {:?} -> {}", op.ret, op.input, show(output))
                }
                (None, Some((ret, output))) => format!(
                    "ret    pending: {:?} -> (answered later, at {ret}: {})",
                    op.input,
                    show(output)
                ),
                (None, None) => format!("ret      never: {:?} -> (no answer: pending)", op.input),
            };
            let _ = writeln!(
                out,
                "  [{i}] client {:>7} call {:>10} {outcome}{via}",
                op.client, op.call
            );
        }
        out
    }

    /// The report as JSON.
    pub fn json(&self) -> serde_json::Value {
        use serde_json::json;
        let o = &self.options;
        let (verdict, details) = match &self.verdict {
            Verdict::Valid => ("valid", json!(null)),
            Verdict::NotLinearizable(f) => (
                "not-linearizable",
                json!({
                    "key": f.violation.key,
                    "message": f.violation.message,
                    "cut_us": f.cut,
                    "whole_sub_history_ops": f.full.len(),
                    "ops": f.violation.ops.iter().map(|op| json!({
                        "client": op.client,
                        "input": format!("{:?}", op.input),
                        "output": op.output.map(show),
                        "call_us": op.call,
                        "ret_us": op.output.map(|_| op.ret),
                        "via": self.via.get(&(op.client, op.call)),
                    })).collect::<Vec<_>>(),
                }),
            ),
            Verdict::Inconclusive(reasons) => ("inconclusive", json!(reasons)),
        };
        let c = &self.clients;
        json!({
            "verdict": verdict,
            "details": details,
            "exit_code": self.exit_code(),
            "options": {
                "seconds": o.duration.as_secs(),
                "clients": o.clients,
                "replicas": o.replicas,
                "faults": o.faults.to_string(),
                "seed": o.seed,
                "break": o.test_bug.map(|b| b.name()),
            },
            "dir": self.dir.display().to_string(),
            "dir_kept": self.dir_kept,
            "faults": self.faults.iter().map(|e| json!({
                "at_s": e.at.as_secs_f64(),
                "what": e.what,
            })).collect::<Vec<_>>(),
            "throughput_per_5s": self.throughput,
            "operations": {
                "reads_ok": c.reads_ok,
                "writes_ok": c.writes_ok,
                "writes_answered_on_retry": c.resolved_by_retry,
                "reads_failed": c.reads_failed,
                "writes_failed": c.writes_failed,
                "indeterminate": c.indeterminate,
                "calls": c.calls,
            },
            "final_reads": {"answered": self.final_reads.0, "asked": self.final_reads.1},
            "checker": {
                "operations": self.checked.0,
                "keys": self.checked.1,
                "seconds": self.check_time.as_secs_f64(),
            },
            "notes": self.notes,
        })
    }
}

/// An output as a person reads it.
fn show(output: Output) -> String {
    match output {
        Output::Value(Some(v)) => format!("{v}"),
        Output::Value(None) => "NOT_FOUND".into(),
        Output::Inserted => "inserted".into(),
        Output::Updated { previous } => format!("updated (was {previous})"),
        Output::Removed { previous } => format!("removed (was {previous})"),
        Output::AlreadyExists => "ALREADY_EXISTS".into(),
        Output::NotFound => "NOT_FOUND".into(),
        Output::Replaced => "updated (upsert)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use linearizability::Input;

    fn op(call: u64, ret: u64, output: Option<Output>) -> Operation {
        Operation {
            client: 1,
            key: "k0-0".into(),
            input: Input::Get,
            output,
            call,
            ret,
        }
    }

    #[test]
    fn throughput_counts_answered_operations_by_return_time() {
        let s = 1_000_000;
        let ops = [
            op(0, s, Some(Output::Value(None))),
            op(0, 4 * s, Some(Output::Value(None))),
            op(0, 6 * s, Some(Output::Value(Some(1)))),
            // Pending: never answered, not counted.
            op(0, 7 * s, None),
            // Past the end (a late answer): the last bucket.
            op(0, 30 * s, Some(Output::Value(None))),
        ];
        assert_eq!(throughput(&ops, Duration::from_secs(12)), vec![2, 1, 1]);
        assert_eq!(throughput(&[], Duration::ZERO), vec![0]);
    }

    #[test]
    fn a_violation_is_shown_as_the_history_stood_when_it_first_had_none() {
        let at = |client, call, ret, input, output| Operation {
            client,
            key: "k".into(),
            input,
            output: Some(output),
            call,
            ret,
        };
        let ops = vec![
            at(1, 0, 10, Input::Insert(1), Output::Inserted),
            at(2, 20, 30, Input::Get, Output::Value(Some(1))),
            // Stale: the write of 1 returned before this read was called.
            at(3, 40, 50, Input::Get, Output::Value(None)),
            // Called before the stale read returned, answered after.
            at(4, 45, 90, Input::Upsert(2), Output::Replaced),
            at(2, 60, 70, Input::Get, Output::Value(Some(1))),
            at(1, 100, 110, Input::Remove, Output::Removed { previous: 2 }),
        ];
        let v = linearizability::check(&ops).unwrap_err();
        assert_eq!(v.ops.len(), 6);
        let f = Failure::shrink(v);
        assert_eq!(f.cut, 50, "the stale read's answer");
        assert_eq!(f.full.len(), 6);
        let shown = &f.violation.ops;
        assert_eq!(shown.len(), 4, "{shown:?}");
        // The upsert was answered after the cut: pending, as it stood then.
        assert_eq!(shown[3].input, Input::Upsert(2));
        assert_eq!(shown[3].output, None);
        assert!(linearizability::check(&prefix(&ops, 49)).is_ok());
    }

    #[test]
    fn a_given_data_dir_must_be_empty() {
        let dir = std::env::temp_dir().join(format!("paxoskv-check-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut opts = CheckOptions {
            duration: Duration::from_secs(1),
            clients: 1,
            replicas: 3,
            faults: FaultSet::default(),
            seed: 1,
            data_dir: Some(dir.clone()),
            base_port: Some(65534),
            test_bug: None,
        };
        assert_eq!(data_dir(&opts).unwrap(), (dir.clone(), false));
        std::fs::write(dir.join("old"), b"x").unwrap();
        assert!(data_dir(&opts).unwrap_err().contains("not empty"));
        let _ = std::fs::remove_dir_all(&dir);
        // Ports past 65535 are refused by name.
        assert!(addresses(&opts).unwrap_err().contains("replica 1"));
        opts.base_port = Some(8081);
        let (laid_out, _) = addresses(&opts).unwrap();
        assert_eq!(laid_out[&3].client.to_string(), "127.0.0.1:8083");
        assert_eq!(laid_out[&3].peer.to_string(), "127.0.0.1:8183");
        opts.base_port = None;
        let (free, held) = addresses(&opts).unwrap();
        assert_eq!(free.len(), 3);
        assert_eq!(held.len(), 6);
        let all: BTreeSet<SocketAddr> = free.values().flat_map(|p| [p.client, p.peer]).collect();
        assert_eq!(all.len(), 6);
        // Outside the ephemeral range, where connections take their ports.
        assert!(all.iter().all(|a| (10_000..32_768).contains(&a.port())));
    }
}
