//! `paxoskv bench`: closed-loop clients against a cluster, and the same
//! clients against a gRPC server that does nothing, for the ceiling.
//!
//! Each client sends one call, waits for its answer, and sends the next,
//! for the whole run, over a channel of its own. Client `c` of `n` writes
//! keys from `c * keys / n` on, in order, so a run of `keys` writes fills
//! every key. Writes are upserts with a
//! request id (client id, sequence), as a careful application would send
//! them: each writing client opens a session first (not timed); reads are `Get`s of keys the run wrote first. Latency is measured
//! per call, from send to answer; errors (any status other than OK and
//! NOT_FOUND) are counted, not timed.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use crate::dial::Dialer;
use crate::pb;
use crate::pb::kv_store_client::KvStoreClient;
use crate::pb::kv_store_server::{KvStore, KvStoreServer};

/// What a run does.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Replicas to spread the clients over, round-robin.
    pub endpoints: Vec<String>,
    /// Concurrent clients.
    pub clients: usize,
    /// How long to run.
    pub duration: Duration,
    /// Distinct keys (each client writes `bench-<n>` for n below this).
    pub keys: u32,
    /// `Get`s instead of upserts.
    pub reads: bool,
    /// The deadline of each call.
    pub timeout: Duration,
    /// Stop after this many calls in all, if sooner than `duration`.
    pub max_calls: Option<u64>,
    /// How to dial the endpoints: plaintext or TLS.
    pub dialer: Dialer,
}

/// What a run measured.
#[derive(Clone, Debug)]
pub struct Report {
    /// Calls answered OK (or NOT_FOUND, for reads).
    pub ok: u64,
    /// Calls that failed.
    pub errors: u64,
    /// The first error seen, if any.
    pub first_error: Option<String>,
    /// How long the run took.
    pub elapsed: Duration,
    /// Latencies of the successful calls, sorted.
    latencies: Vec<Duration>,
}

impl Report {
    /// The `q` quantile (0..=1) of successful calls' latency.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.latencies.len() - 1) as f64 * q).round() as usize;
        self.latencies[i]
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
}

/// Runs the clients against `opts.endpoints` and reports.
pub async fn run(opts: &BenchOptions) -> Result<Report, String> {
    if opts.endpoints.is_empty() || opts.clients == 0 || opts.keys == 0 {
        return Err("bench needs at least one endpoint, one client and one key".into());
    }
    if opts.reads {
        // Reads of keys that exist: write each once first.
        let mut client = KvStoreClient::new(channel(&opts.dialer, &opts.endpoints[0])?);
        for n in 0..opts.keys {
            upsert(&mut client, n, n as i32, None, opts.timeout)
                .await
                .map_err(|e| format!("writing the keys to read: {e}"))?;
        }
    }
    let started = Instant::now();
    let until = started + opts.duration;
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let max_calls = opts.max_calls.unwrap_or(u64::MAX);
    let mut tasks = Vec::new();
    for c in 0..opts.clients {
        let endpoint = opts.endpoints[c % opts.endpoints.len()].clone();
        let opts = opts.clone();
        let calls = std::sync::Arc::clone(&calls);
        tasks.push(tokio::spawn(async move {
            let mut client = KvStoreClient::new(channel(&opts.dialer, &endpoint)?);
            // The store issues each writer its client id.
            let client_id = if opts.reads {
                0
            } else {
                open_session(&mut client, opts.timeout)
                    .await
                    .map_err(|e| format!("opening a session: {e}"))?
            };
            let (mut ok, mut errors, mut first_error) = (0u64, 0u64, None);
            let mut latencies = Vec::new();
            let mut sequence = 0u64;
            while Instant::now() < until
                && calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < max_calls
            {
                sequence += 1;
                // Each client walks its own share of the keys, so that
                // together they write every key once before any twice.
                let share = u64::from(opts.keys) * c as u64 / opts.clients as u64;
                let key = ((share + sequence - 1) % u64::from(opts.keys)) as u32;
                let sent = Instant::now();
                let result = if opts.reads {
                    get(&mut client, key, opts.timeout).await
                } else {
                    let id = Some((client_id, sequence));
                    upsert(&mut client, key, sequence as i32, id, opts.timeout).await
                };
                match result {
                    Ok(()) => {
                        ok += 1;
                        latencies.push(sent.elapsed());
                    }
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert(e.to_string());
                    }
                }
            }
            Ok::<_, String>((ok, errors, first_error, latencies))
        }));
    }
    let mut report = Report {
        ok: 0,
        errors: 0,
        first_error: None,
        elapsed: Duration::ZERO,
        latencies: Vec::new(),
    };
    for task in tasks {
        let (ok, errors, first_error, latencies) =
            task.await.map_err(|e| format!("client task: {e}"))??;
        report.ok += ok;
        report.errors += errors;
        if report.first_error.is_none() {
            report.first_error = first_error;
        }
        report.latencies.extend(latencies);
    }
    report.elapsed = started.elapsed();
    report.latencies.sort_unstable();
    Ok(report)
}

/// Serves a `KvStore` that answers every call at once, doing nothing, on
/// an ephemeral loopback port: the ceiling the client and gRPC allow.
pub async fn serve_noop() -> Result<SocketAddr, String> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("binding the no-op server: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("no-op server address: {e}"))?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(KvStoreServer::new(Noop))
            .serve_with_incoming(crate::listener::incoming(
                listener,
                crate::listener::Limits::CLIENTS,
                "no-op",
            )),
    );
    Ok(addr)
}

fn channel(dialer: &Dialer, endpoint: &str) -> Result<tonic::transport::Channel, String> {
    Ok(dialer
        .endpoint(endpoint)
        .map_err(|e| e.to_string())?
        .connect_lazy())
}

async fn open_session(
    client: &mut KvStoreClient<tonic::transport::Channel>,
    timeout: Duration,
) -> Result<u64, Status> {
    let mut request = Request::new(pb::OpenSessionRequest {});
    request.set_timeout(timeout);
    let response = client.open_session(request).await?;
    Ok(response.into_inner().client_id)
}

async fn upsert(
    client: &mut KvStoreClient<tonic::transport::Channel>,
    key: u32,
    value: i32,
    id: Option<(u64, u64)>,
    timeout: Duration,
) -> Result<(), Status> {
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

async fn get(
    client: &mut KvStoreClient<tonic::transport::Channel>,
    key: u32,
    timeout: Duration,
) -> Result<(), Status> {
    let mut request = Request::new(pb::GetRequest {
        key: format!("bench-{key}"),
    });
    request.set_timeout(timeout);
    match client.get(request).await {
        Ok(_) => Ok(()),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
        Err(s) => Err(s),
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
