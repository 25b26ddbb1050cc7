//! `paxoskv bench`: a load generator in the style of etcd's `benchmark`
//! tool, for paxoskv, for etcd (`--target etcd`: the same workload as etcd
//! v3 `KV/Put` and `KV/Range`), and for a gRPC server that does nothing
//! (the ceiling: [`serve_noop`], `paxoskv bench-server`).
//!
//! `clients` clients share `connections` gRPC channels, round-robin (the
//! channels themselves take the endpoints in turn). Client `c` of `n`
//! walks the keys from `c * keys / n` on, in order, so a run of `keys`
//! calls touches every key once before any twice. Against paxoskv, writes
//! are upserts with a request id (client id, sequence), as a careful
//! application sends them: each client that writes opens a session first.
//! Reads are linearizable `Get`s (etcd: `Range` with `serializable =
//! false`) of keys written before the run starts. Neither the sessions nor
//! those first writes are timed.
//!
//! Closed loop (the default): each client sends one call, waits for its
//! answer, and sends the next; latency is from send to answer.
//!
//! Open loop (`rate`): calls fall due on a fixed schedule, `rate` a second,
//! whatever the answers do. A call due is queued for the next idle client;
//! its latency is measured from the time it fell due, not from when a
//! client got round to sending it, so a stalled server shows as latency
//! (no coordinated omission). At most `clients` calls are in flight and at
//! most `clients` more wait in the queue, so memory stays bounded however
//! far behind the server falls; a call due when the queue is full is not
//! sent, and is counted as an error of its own kind, `UNSENT`.
//!
//! Errors are counted by gRPC status code (NOT_FOUND is a successful read);
//! a call that outlives its deadline on the client side counts as
//! `DEADLINE_EXCEEDED`, as one the server gives up on does.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::net::TcpListener;
use tokio::sync::{Mutex, mpsc};
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use crate::dial::Dialer;
use crate::pb;
use crate::pb::kv_store_client::KvStoreClient;
use crate::pb::kv_store_server::{KvStore, KvStoreServer};

/// etcd v3's KV API, client side, as far as the bench needs it
/// (proto/etcd/).
pub mod etcd {
    /// etcd's `mvccpb` package: the key-value record.
    pub mod mvccpb {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("mvccpb");
    }
    /// etcd's `etcdserverpb` package: `KV/Put` and `KV/Range`.
    pub mod etcdserverpb {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("etcdserverpb");
    }
}

use etcd::etcdserverpb::kv_client::KvClient as EtcdKvClient;

/// What each call does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Upserts (etcd: `Put`).
    Write,
    /// Linearizable reads (etcd: `Range`, serializable = false).
    Read,
    /// Writes and reads in turn, half each.
    Mixed,
}

impl Op {
    /// The name `--op` takes.
    pub fn name(self) -> &'static str {
        match self {
            Op::Write => "write",
            Op::Read => "read",
            Op::Mixed => "mixed",
        }
    }
}

/// Which API the calls speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// `paxoskv.v1.KvStore`.
    Paxoskv,
    /// etcd v3's `etcdserverpb.KV`.
    Etcd,
}

impl Target {
    /// The name `--target` takes.
    pub fn name(self) -> &'static str {
        match self {
            Target::Paxoskv => "paxoskv",
            Target::Etcd => "etcd",
        }
    }
}

/// What a run does.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Servers to spread the connections over, round-robin.
    pub endpoints: Vec<String>,
    /// Concurrent clients: each has one call in flight at most.
    pub clients: usize,
    /// gRPC connections the clients share, round-robin; 0 means one per
    /// client.
    pub connections: usize,
    /// How long to run (with `total`, whichever comes first; with neither,
    /// ten seconds).
    pub duration: Option<Duration>,
    /// How many calls to make in all (with `duration`, whichever comes
    /// first).
    pub total: Option<u64>,
    /// What each call does.
    pub op: Op,
    /// Distinct keys (`bench-<n>` for n below this).
    pub key_space: u32,
    /// Calls per second on a fixed schedule (open loop); `None` for a
    /// closed loop.
    pub rate: Option<f64>,
    /// The deadline of each call.
    pub timeout: Duration,
    /// Which API to call.
    pub target: Target,
    /// How to dial the endpoints: plaintext or TLS.
    pub dialer: Dialer,
    /// Draw a progress bar on stderr while the run lasts.
    pub progress: bool,
}

impl BenchOptions {
    /// The connections the run opens.
    pub fn connection_count(&self) -> usize {
        if self.connections == 0 {
            self.clients
        } else {
            self.connections.min(self.clients)
        }
    }

    /// How long the run lasts at most: `duration`, else ten seconds unless
    /// `total` bounds it instead.
    pub fn time_limit(&self) -> Option<Duration> {
        match (self.duration, self.total) {
            (Some(d), _) => Some(d),
            (None, Some(_)) => None,
            (None, None) => Some(Duration::from_secs(10)),
        }
    }
}

/// The error kind of a call due in an open-loop run that could not even be
/// queued, because every client was busy and the queue was full.
pub const UNSENT: &str = "UNSENT";

/// What a run measured.
#[derive(Clone)]
pub struct Report {
    /// Calls answered OK (or NOT_FOUND, for reads).
    pub ok: u64,
    /// Calls that failed, `UNSENT` ones included.
    pub errors: u64,
    /// The failures by gRPC status code (`DEADLINE_EXCEEDED`, ...), and
    /// [`UNSENT`].
    pub errors_by_code: BTreeMap<String, u64>,
    /// The first error seen, if any.
    pub first_error: Option<String>,
    /// From the first call to the last answer.
    pub elapsed: Duration,
    /// Latencies of the successful calls, in microseconds.
    histogram: Histogram<u64>,
}

impl std::fmt::Debug for Report {
    // The histogram's own Debug prints every bucket: show its quantiles.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Report")
            .field("ok", &self.ok)
            .field("errors", &self.errors)
            .field("errors_by_code", &self.errors_by_code)
            .field("first_error", &self.first_error)
            .field("elapsed", &self.elapsed)
            .field("p50", &self.quantile(0.5))
            .field("max", &self.quantile(1.0))
            .finish()
    }
}

impl Report {
    fn empty() -> Report {
        Report {
            ok: 0,
            errors: 0,
            errors_by_code: BTreeMap::new(),
            first_error: None,
            elapsed: Duration::ZERO,
            histogram: new_histogram(),
        }
    }

    /// The `q` quantile (0..=1) of successful calls' latency (zero if none
    /// succeeded).
    pub fn quantile(&self, q: f64) -> Duration {
        if self.histogram.is_empty() {
            return Duration::ZERO;
        }
        let us = if q >= 1.0 {
            self.histogram.max()
        } else {
            self.histogram.value_at_quantile(q)
        };
        Duration::from_micros(us)
    }

    /// Successful calls per second.
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// One line: calls/s, errors, and p50/p90/p99/p99.9/max in µs.
    pub fn line(&self) -> String {
        let us = |d: Duration| d.as_micros();
        format!(
            "{:>9.0} ops/s {:>6} errors   p50 {:>6} µs  p90 {:>6} µs  p99 {:>6} µs  p99.9 {:>6} µs  max {:>7} µs",
            self.rate(),
            self.errors,
            us(self.quantile(0.5)),
            us(self.quantile(0.9)),
            us(self.quantile(0.99)),
            us(self.quantile(0.999)),
            us(self.quantile(1.0)),
        )
    }

    /// The errors by code on one line (`DEADLINE_EXCEEDED 12, UNAVAILABLE
    /// 3`), or `None` if there were none.
    pub fn errors_line(&self) -> Option<String> {
        (!self.errors_by_code.is_empty()).then(|| {
            self.errors_by_code
                .iter()
                .map(|(code, n)| format!("{code} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        })
    }

    /// The report as one JSON object, with what was run.
    pub fn to_json(&self, opts: &BenchOptions) -> serde_json::Value {
        let us = |q: f64| self.quantile(q).as_micros() as u64;
        serde_json::json!({
            "target": opts.target.name(),
            "op": opts.op.name(),
            "endpoints": opts.endpoints,
            "clients": opts.clients,
            "connections": opts.connection_count(),
            "rate": opts.rate,
            "key_space": opts.key_space,
            "timeout_ms": opts.timeout.as_millis() as u64,
            "ok": self.ok,
            "errors": self.errors,
            "errors_by_code": self.errors_by_code,
            "first_error": self.first_error,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "ops_per_s": self.rate(),
            "latency_us": {
                "mean": if self.histogram.is_empty() { 0.0 } else { self.histogram.mean() },
                "p50": us(0.5),
                "p90": us(0.9),
                "p99": us(0.99),
                "p99_9": us(0.999),
                "max": us(1.0),
            },
        })
    }

    fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        for (code, n) in other.errors {
            self.errors += n;
            *self.errors_by_code.entry(code.to_string()).or_default() += n;
        }
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.histogram.add(&other.histogram);
    }
}

/// 1 µs to an hour, three significant digits: a few tens of KiB.
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// The canonical name of a gRPC status code, as the gRPC spec spells it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// One client's share of the results.
struct Tally {
    ok: u64,
    errors: BTreeMap<&'static str, u64>,
    first_error: Option<String>,
    histogram: Histogram<u64>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            ok: 0,
            errors: BTreeMap::new(),
            first_error: None,
            histogram: new_histogram(),
        }
    }
}

/// Counts shared with the progress bar while the run lasts.
#[derive(Default)]
struct Live {
    /// Calls begun (closed loop) or scheduled (open loop): what `total`
    /// bounds.
    issued: AtomicU64,
    ok: AtomicU64,
    errors: AtomicU64,
}

/// A stub for whichever API the run calls.
#[derive(Clone)]
enum Stub {
    Paxoskv(KvStoreClient<Channel>),
    Etcd(EtcdKvClient<Channel>),
}

/// One client: its stub, session, and where it is in its walk of the keys.
struct Client {
    stub: Stub,
    /// This client's first key.
    first_key: u64,
    /// The session's client id (paxoskv writers; 0 otherwise).
    client_id: u64,
    /// The last request id's sequence.
    sequence: u64,
    /// Calls made so far.
    calls: u64,
}

impl Client {
    /// Makes the next call of the workload; `Ok` for success.
    async fn next_call(&mut self, opts: &BenchOptions) -> Result<(), Status> {
        let key = ((self.first_key + self.calls) % u64::from(opts.key_space)) as u32;
        let write = match opts.op {
            Op::Write => true,
            Op::Read => false,
            Op::Mixed => self.calls.is_multiple_of(2),
        };
        self.calls += 1;
        let call = async {
            if write {
                self.sequence += 1;
                let id = (self.client_id != 0).then_some((self.client_id, self.sequence));
                put(&mut self.stub, key, self.sequence as i32, id, opts.timeout).await
            } else {
                get(&mut self.stub, key, opts.timeout).await
            }
        };
        // The deadline is the client's too: the server may not answer at
        // all (tonic sends the deadline along but does not enforce it).
        match tokio::time::timeout(opts.timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no answer within {:?} (client side)",
                opts.timeout
            ))),
        }
    }
}

/// Runs the workload against `opts.endpoints` and reports.
pub async fn run(opts: &BenchOptions) -> Result<Report, String> {
    if opts.endpoints.is_empty() || opts.clients == 0 || opts.key_space == 0 {
        return Err("bench needs at least one endpoint, one client and one key".into());
    }
    if let Some(rate) = opts.rate
        && !(rate.is_finite() && rate > 0.0)
    {
        return Err(format!(
            "--rate must be a positive number of calls a second, not {rate}"
        ));
    }
    let channels = (0..opts.connection_count())
        .map(|i| {
            let endpoint = &opts.endpoints[i % opts.endpoints.len()];
            channel(&opts.dialer, endpoint, opts.timeout)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let clients = set_up(opts, &channels).await?;

    let live = Arc::new(Live::default());
    let started = Instant::now();
    let deadline = opts.time_limit().map(|d| started + d);
    let total = opts.total.unwrap_or(u64::MAX);
    let progress = opts
        .progress
        .then(|| tokio::spawn(show_progress(Arc::clone(&live), opts.clone(), started)));

    // Open loop: the schedule feeds a bounded queue that idle clients take
    // from.
    let (queue, scheduler) = match opts.rate {
        None => (None, None),
        Some(rate) => {
            let (tx, rx) = mpsc::channel::<Instant>(opts.clients);
            let live = Arc::clone(&live);
            let scheduler = tokio::spawn(schedule(tx, rate, started, deadline, total, live));
            (Some(Arc::new(Mutex::new(rx))), Some(scheduler))
        }
    };

    let mut tasks = Vec::with_capacity(clients.len());
    for mut client in clients {
        let opts = opts.clone();
        let live = Arc::clone(&live);
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::new();
            loop {
                let due = match &queue {
                    Some(queue) => match queue.lock().await.recv().await {
                        Some(due) => due,
                        None => break,
                    },
                    None => {
                        let now = Instant::now();
                        if deadline.is_some_and(|d| now >= d)
                            || live.issued.fetch_add(1, Ordering::Relaxed) >= total
                        {
                            break;
                        }
                        now
                    }
                };
                match client.next_call(&opts).await {
                    Ok(()) => {
                        let us = due.elapsed().as_micros() as u64;
                        tally.histogram.saturating_record(us.max(1));
                        tally.ok += 1;
                        live.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(status) => {
                        *tally.errors.entry(code_name(status.code())).or_default() += 1;
                        tally.first_error.get_or_insert_with(|| {
                            format!("{}: {}", code_name(status.code()), status.message())
                        });
                        live.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            tally
        }));
    }

    let mut report = Report::empty();
    if let Some(scheduler) = scheduler {
        let unsent = scheduler
            .await
            .map_err(|e| format!("open-loop scheduler: {e}"))?;
        if unsent > 0 {
            report.errors += unsent;
            report.errors_by_code.insert(UNSENT.to_string(), unsent);
            report.first_error.get_or_insert_with(|| {
                format!(
                    "{UNSENT}: a call fell due with all {} clients busy and {} calls queued",
                    opts.clients, opts.clients
                )
            });
        }
    }
    for task in tasks {
        report.merge(task.await.map_err(|e| format!("client task: {e}"))?);
    }
    report.elapsed = started.elapsed();
    if let Some(progress) = progress {
        progress.abort();
        // The bar is cleared when its task is dropped; wait for that, so
        // that what the caller prints next is not drawn over.
        let _ = progress.await;
    }
    Ok(report)
}

/// The deadline of a set-up call: at least 5 s, whatever the run's own
/// (set-up is not measured, and a run with short deadlines must still get
/// its sessions open).
fn setup_timeout(opts: &BenchOptions) -> Duration {
    opts.timeout.max(Duration::from_secs(5))
}

/// Opens every client's session (paxoskv, when it writes) and writes the
/// keys the run reads (each client its share), concurrently. Not timed.
async fn set_up(opts: &BenchOptions, channels: &[Channel]) -> Result<Vec<Client>, String> {
    let n = opts.clients as u64;
    let keys = u64::from(opts.key_space);
    let mut setups = tokio::task::JoinSet::new();
    for c in 0..n {
        let channel = channels[c as usize % channels.len()].clone();
        let opts = opts.clone();
        setups.spawn(async move {
            let stub = match opts.target {
                Target::Paxoskv => Stub::Paxoskv(KvStoreClient::new(channel)),
                Target::Etcd => Stub::Etcd(EtcdKvClient::new(channel)),
            };
            let writes = opts.op != Op::Read;
            let client_id = match &stub {
                Stub::Paxoskv(kv) if writes => {
                    retry(|| open_session(kv.clone(), setup_timeout(&opts)))
                        .await
                        .map_err(|e| format!("opening a session: {e}"))?
                }
                _ => 0,
            };
            if opts.op != Op::Write {
                // Reads of keys that exist.
                for key in (c * keys / n)..((c + 1) * keys / n) {
                    retry(|| {
                        let mut stub = stub.clone();
                        let timeout = setup_timeout(&opts);
                        async move { put(&mut stub, key as u32, key as i32, None, timeout).await }
                    })
                    .await
                    .map_err(|e| format!("writing the keys to read: {e}"))?;
                }
            }
            Ok::<_, String>(Client {
                stub,
                first_key: c * keys / n,
                client_id,
                sequence: 0,
                calls: 0,
            })
        });
    }
    let mut clients = Vec::with_capacity(opts.clients);
    while let Some(setup) = setups.join_next().await {
        clients.push(setup.map_err(|e| format!("client set-up: {e}"))??);
    }
    Ok(clients)
}

/// The open loop's clock: queues call after call at `rate` a second from
/// `started` until `deadline` or `total` calls, and returns how many could
/// not be queued.
async fn schedule(
    queue: mpsc::Sender<Instant>,
    rate: f64,
    started: Instant,
    deadline: Option<Instant>,
    total: u64,
    live: Arc<Live>,
) -> u64 {
    let due = |i: u64| started + Duration::from_secs_f64(i as f64 / rate);
    let mut unsent = 0;
    let mut i = 0u64;
    'run: loop {
        tokio::time::sleep_until(due(i).into()).await;
        // The timer is coarser than the schedule at high rates: queue
        // every call due by now, each stamped with its own due time.
        let now = Instant::now();
        while due(i) <= now {
            if i >= total || deadline.is_some_and(|d| due(i) >= d) {
                break 'run;
            }
            if queue.try_send(due(i)).is_err() {
                unsent += 1;
                live.errors.fetch_add(1, Ordering::Relaxed);
            }
            i += 1;
            live.issued.store(i, Ordering::Relaxed);
        }
    }
    unsent
}

/// Draws the progress bar until aborted: elapsed against the duration (or
/// calls against the total), with ops/s and errors so far.
async fn show_progress(live: Arc<Live>, opts: BenchOptions, started: Instant) {
    let (bar, by_time) = match opts.time_limit() {
        Some(limit) => (ProgressBar::new(limit.as_millis() as u64), true),
        None => (ProgressBar::new(opts.total.unwrap_or(0)), false),
    };
    bar.set_draw_target(ProgressDrawTarget::stderr());
    let template = if by_time {
        "{prefix} [{bar:30}] {elapsed}/{duration} {msg}"
    } else {
        "{prefix} [{bar:30}] {pos}/{len} calls {msg}"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(format!(
        "{} {} x{}",
        opts.target.name(),
        opts.op.name(),
        opts.clients
    ));
    // Cleared when this task is aborted and the bar dropped.
    let bar = ClearOnDrop(bar);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tick.tick().await;
        let elapsed = started.elapsed();
        let ok = live.ok.load(Ordering::Relaxed);
        let errors = live.errors.load(Ordering::Relaxed);
        if by_time {
            bar.0.set_position(elapsed.as_millis() as u64);
        } else {
            bar.0.set_position(
                live.issued
                    .load(Ordering::Relaxed)
                    .min(opts.total.unwrap_or(0)),
            );
        }
        bar.0.set_message(format!(
            "{:.0} ops/s, {errors} errors",
            ok as f64 / elapsed.as_secs_f64().max(1e-3)
        ));
    }
}

struct ClearOnDrop(ProgressBar);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

/// Serves a `KvStore` that answers every call at once, doing nothing, on
/// `addr` (port 0 for any): the ceiling the client and gRPC allow. Returns
/// the address bound and the server's task.
pub async fn serve_noop(
    addr: SocketAddr,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), String> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("binding the no-op server to {addr}: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("no-op server address: {e}"))?;
    let server = tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(KvStoreServer::new(Noop))
            .serve_with_incoming(crate::listener::incoming(
                listener,
                crate::listener::Limits::CLIENTS,
                "no-op",
            ))
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the no-op server stopped");
        }
    });
    Ok((addr, server))
}

/// A channel to `endpoint` that connects on first use. Its connect timeout
/// is the calls' deadline: hundreds of clients connecting at once on a busy
/// machine can take longer than the dialer's usual second.
fn channel(dialer: &Dialer, endpoint: &str, timeout: Duration) -> Result<Channel, String> {
    Ok(dialer
        .endpoint(endpoint)
        .map_err(|e| e.to_string())?
        .connect_timeout(timeout)
        .connect_lazy())
}

/// Retries a set-up call (not timed) while it fails for want of a leader or
/// of capacity (UNAVAILABLE, RESOURCE_EXHAUSTED, a deadline or a connect
/// timeout), up to twenty tries: a cluster just started may still be
/// electing a leader, and a thousand clients setting up at once can
/// overload it, which is what some runs are for.
async fn retry<T, F, Fut>(mut call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let transient = |code| {
        matches!(
            code,
            Code::Unavailable | Code::ResourceExhausted | Code::DeadlineExceeded | Code::Cancelled
        )
    };
    let mut tries = 1;
    loop {
        match call().await {
            Err(s) if transient(s.code()) && tries < 20 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            result => return result,
        }
    }
}

async fn open_session(
    mut client: KvStoreClient<Channel>,
    timeout: Duration,
) -> Result<u64, Status> {
    let mut request = Request::new(pb::OpenSessionRequest {});
    request.set_timeout(timeout);
    let response = client.open_session(request).await?;
    Ok(response.into_inner().client_id)
}

/// Writes `value` to key `key`: an upsert with the request id `id`, or an
/// etcd `Put` (which has none) of the value's decimal form.
async fn put(
    stub: &mut Stub,
    key: u32,
    value: i32,
    id: Option<(u64, u64)>,
    timeout: Duration,
) -> Result<(), Status> {
    match stub {
        Stub::Paxoskv(client) => {
            let mut request = Request::new(pb::UpsertRequest {
                key: format!("bench-{key}"),
                value: Some(value),
                request_id: id.map(|(client_id, sequence)| pb::RequestId {
                    client_id,
                    sequence,
                }),
            });
            request.set_timeout(timeout);
            client.upsert(request).await.map(|_| ())
        }
        Stub::Etcd(client) => {
            let mut request = Request::new(etcd::etcdserverpb::PutRequest {
                key: format!("bench-{key}").into_bytes(),
                value: value.to_string().into_bytes(),
                ..Default::default()
            });
            request.set_timeout(timeout);
            client.put(request).await.map(|_| ())
        }
    }
}

/// Reads key `key`, linearizably; a key that is absent is a successful
/// read.
async fn get(stub: &mut Stub, key: u32, timeout: Duration) -> Result<(), Status> {
    match stub {
        Stub::Paxoskv(client) => {
            let mut request = Request::new(pb::GetRequest {
                key: format!("bench-{key}"),
            });
            request.set_timeout(timeout);
            match client.get(request).await {
                Ok(_) => Ok(()),
                Err(s) if s.code() == Code::NotFound => Ok(()),
                Err(s) => Err(s),
            }
        }
        Stub::Etcd(client) => {
            let mut request = Request::new(etcd::etcdserverpb::RangeRequest {
                key: format!("bench-{key}").into_bytes(),
                // Linearizable, through the leader, as paxoskv's reads.
                serializable: false,
                ..Default::default()
            });
            request.set_timeout(timeout);
            client.range(request).await.map(|_| ())
        }
    }
}

/// The do-nothing server of [`serve_noop`].
struct Noop;

#[tonic::async_trait]
impl KvStore for Noop {
    async fn get(&self, _: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        Ok(Response::new(pb::GetResponse { value: 0 }))
    }
    async fn insert(
        &self,
        _: Request<pb::InsertRequest>,
    ) -> Result<Response<pb::InsertResponse>, Status> {
        Ok(Response::new(pb::InsertResponse {}))
    }
    async fn remove(
        &self,
        _: Request<pb::RemoveRequest>,
    ) -> Result<Response<pb::RemoveResponse>, Status> {
        Ok(Response::new(pb::RemoveResponse { previous: 0 }))
    }
    async fn update(
        &self,
        _: Request<pb::UpdateRequest>,
    ) -> Result<Response<pb::UpdateResponse>, Status> {
        Ok(Response::new(pb::UpdateResponse { previous: 0 }))
    }
    async fn upsert(
        &self,
        _: Request<pb::UpsertRequest>,
    ) -> Result<Response<pb::UpsertResponse>, Status> {
        Ok(Response::new(pb::UpsertResponse { inserted: true }))
    }
    async fn open_session(
        &self,
        _: Request<pb::OpenSessionRequest>,
    ) -> Result<Response<pb::OpenSessionResponse>, Status> {
        Ok(Response::new(pb::OpenSessionResponse {
            client_id: 1 << 16,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(addr: SocketAddr) -> BenchOptions {
        BenchOptions {
            endpoints: vec![addr.to_string()],
            clients: 4,
            connections: 2,
            duration: Some(Duration::from_millis(300)),
            total: None,
            op: Op::Write,
            key_space: 100,
            rate: None,
            timeout: Duration::from_secs(5),
            target: Target::Paxoskv,
            dialer: Dialer::plain(),
            progress: false,
        }
    }

    #[tokio::test]
    async fn a_closed_loop_against_the_noop_server_stops_at_the_total() {
        let (addr, server) = serve_noop("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let mut o = opts(addr);
        o.duration = None;
        o.total = Some(500);
        o.op = Op::Mixed;
        let report = run(&o).await.unwrap();
        assert_eq!((report.ok, report.errors), (500, 0), "{report:?}");
        assert!(report.quantile(0.5) > Duration::ZERO);
        assert!(report.quantile(0.5) <= report.quantile(1.0));
        server.abort();
    }

    #[tokio::test]
    async fn an_open_loop_sends_on_schedule() {
        let (addr, server) = serve_noop("127.0.0.1:0".parse().unwrap()).await.unwrap();
        // 200 calls a second for 0.5 s: 100 calls fall due. On a busy
        // machine a few may find the (4-call) queue full, but every one is
        // either answered or counted UNSENT.
        let mut o = opts(addr);
        o.rate = Some(200.0);
        o.duration = Some(Duration::from_millis(500));
        let report = run(&o).await.unwrap();
        let unsent = report.errors_by_code.get(UNSENT).copied().unwrap_or(0);
        assert_eq!(report.ok + unsent, 100, "{report:?}");
        assert_eq!(report.errors, unsent, "{report:?}");
        assert!(report.ok >= 50, "{report:?}");
        server.abort();
    }

    #[tokio::test]
    async fn reads_whose_keys_cannot_be_written_fail_at_set_up() {
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead_addr = dead.local_addr().unwrap();
        drop(dead);
        let mut o = opts(dead_addr);
        o.op = Op::Read;
        o.key_space = 1;
        o.timeout = Duration::from_millis(500);
        let err = run(&o).await.unwrap_err();
        assert!(err.contains("writing the keys to read"), "{err}");
    }

    #[tokio::test]
    async fn an_open_loop_past_what_the_clients_can_carry_counts_unsent_calls() {
        // A server that never answers a write: every call hangs until its
        // deadline (0.3 s), so of the 500 calls due at 1,000 a second for
        // 0.5 s with 2 clients, 2 are in flight, 2 wait in the queue, and
        // most of the rest find the queue full: UNSENT.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(KvStoreServer::new(Stall))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let mut o = opts(addr);
        o.clients = 2;
        o.rate = Some(1000.0);
        o.duration = Some(Duration::from_millis(500));
        o.timeout = Duration::from_millis(300);
        let report = run(&o).await.unwrap();
        assert_eq!(report.ok, 0, "{report:?}");
        let unsent = report.errors_by_code.get(UNSENT).copied().unwrap_or(0);
        // Past its deadline a call fails on the client side
        // (DEADLINE_EXCEEDED) or the server gives up first (tonic's server
        // answers CANCELLED), whichever is quicker.
        let late = ["DEADLINE_EXCEEDED", "CANCELLED"]
            .iter()
            .filter_map(|code| report.errors_by_code.get(*code))
            .sum::<u64>();
        assert!(unsent >= 400, "{report:?}");
        assert!(late >= 2, "{report:?}");
        assert_eq!(report.errors, unsent + late, "{report:?}");
        server.abort();
    }

    /// Opens sessions, then never answers a write.
    struct Stall;

    #[tonic::async_trait]
    impl KvStore for Stall {
        async fn get(
            &self,
            r: Request<pb::GetRequest>,
        ) -> Result<Response<pb::GetResponse>, Status> {
            Noop.get(r).await
        }
        async fn insert(
            &self,
            r: Request<pb::InsertRequest>,
        ) -> Result<Response<pb::InsertResponse>, Status> {
            Noop.insert(r).await
        }
        async fn remove(
            &self,
            r: Request<pb::RemoveRequest>,
        ) -> Result<Response<pb::RemoveResponse>, Status> {
            Noop.remove(r).await
        }
        async fn update(
            &self,
            r: Request<pb::UpdateRequest>,
        ) -> Result<Response<pb::UpdateResponse>, Status> {
            Noop.update(r).await
        }
        async fn upsert(
            &self,
            _: Request<pb::UpsertRequest>,
        ) -> Result<Response<pb::UpsertResponse>, Status> {
            std::future::pending().await
        }
        async fn open_session(
            &self,
            r: Request<pb::OpenSessionRequest>,
        ) -> Result<Response<pb::OpenSessionResponse>, Status> {
            Noop.open_session(r).await
        }
    }
}
