//! The clients of `paxoskv check`, and the history they record.
//!
//! Each client is a task that sends one call at a time, for the whole run,
//! each to a replica picked at random, with a deadline of its own
//! ([`WorkloadOptions::deadline`]): `Get`, `Insert`, `Update`, `Upsert` or
//! `Remove` on a small key space. Everything the clients learn becomes the
//! history the checker reads (`Operation`s with call and return times in
//! microseconds since the start of the run).
//!
//! - **Keys rotate.** There are `keys_per_generation` keys at a time, named
//!   `k{generation}-{i}`, and the generation moves on every `generation`:
//!   each key's sub-history stays small (a few seconds of traffic and the
//!   final reads), which keeps it decidable, while the same keys are hit
//!   often enough, by concurrent clients, for races to show.
//! - **Values are unique** (a counter): a read names the write it saw, so
//!   the checker's search stays narrow.
//! - **Definite answers are outputs.** `NOT_FOUND` and `ALREADY_EXISTS` are
//!   outputs of the model, like any reply.
//! - **A failed read is dropped**: it had no effect.
//! - **A write that fails may still have happened.** Every write carries a
//!   request id (the client's id and a sequence it increases per write). A
//!   write that ends `UNAVAILABLE`, at its deadline, or with the connection
//!   lost, is sent again with the same request id (the state machine's
//!   dedup table applies it once and answers every copy with the first
//!   reply), up to `max_attempts` times in all. If one of them gets a
//!   definite reply, the history holds ONE operation, from the first call
//!   to that reply ([`Write`]). If none does, the write is recorded
//!   pending (no output: it may take effect at any later time, or never),
//!   and the client carries on under a fresh client id, as Jepsen starts a
//!   new process after an indeterminate operation.
//! - **What the server says decides.** A failed write marked
//!   `NOT_PROPOSED` ([`Certainty::of`]: the replicas prove it is not in the
//!   log and never will be) had no effect, like one refused as
//!   `INVALID_ARGUMENT` or `FAILED_PRECONDITION`; any other failure
//!   (`OUTCOME_UNKNOWN`, a deadline, a lost connection, no marking) may
//!   have had one. The reason a replica gives with `UNAVAILABLE`
//!   (`x-paxoskv-reason`, [`Unavailable::of`]) says where to send the
//!   retry: a replica that was not reached, is shutting down or whose disk
//!   failed is avoided; one that answered "no leader" or "no quorum"
//!   speaks for the cluster, so the retry waits a little.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use super::linearizability::{Input, Operation, Output};
use crate::certainty::Certainty;
use crate::dial;
use crate::paxos::rng::Rng;
use crate::pb;
use crate::pb::kv_store_client::KvStoreClient;
use crate::service::Unavailable;

/// What the clients do.
#[derive(Clone, Debug)]
pub struct WorkloadOptions {
    /// Concurrent clients.
    pub clients: usize,
    /// Each replica's client address, by id.
    pub endpoints: BTreeMap<u32, String>,
    /// Keys in use at a time.
    pub keys_per_generation: u32,
    /// How long a generation of keys lasts.
    pub generation: Duration,
    /// Each call's deadline.
    pub deadline: Duration,
    /// Calls of one write in all (the first and its retries).
    pub max_attempts: u32,
    /// Picks the calls, keys and replicas.
    pub seed: u64,
}

/// How long a client sends no new call to a replica that just failed it
/// (retries go elsewhere anyway): as real clients do, so that a replica
/// that is down or cut off does not take a second of every client's time
/// per call while it lasts.
const AVOID_FAILED: Duration = Duration::from_millis(1000);

/// Client ids from this one on are the final reads' (one per replica).
pub const FINAL_READ_CLIENT: u64 = 1_000_000;

/// What one call told the client, as far as the history is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// A reply of the model (`NOT_FOUND` and `ALREADY_EXISTS` included):
    /// the operation took effect, or was observed, with this output.
    Definite(Output),
    /// Certainly no effect: a read that failed, a write refused before the
    /// log, or one the replicas say was never proposed (`NOT_PROPOSED`).
    NoEffect,
    /// The write may or may not have taken effect.
    Indeterminate,
}

/// Where a retry should go, by what the failure said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Advice {
    /// Another replica: this one was not reached (killed, paused, cut off
    /// from the client), did not answer in time, is shutting down, or its
    /// disk failed.
    OtherReplica,
    /// The replica answered for the cluster (no leader, no quorum, the
    /// outcome not learned yet): wait a little; any replica will do.
    Wait,
}

/// Classifies one call's result for the history.
pub fn classify(input: Input, result: &Result<Output, Status>) -> (Attempt, Advice) {
    let status = match result {
        Ok(output) => return (Attempt::Definite(*output), Advice::Wait),
        Err(status) => status,
    };
    let definite = match (input, status.code()) {
        (Input::Get, Code::NotFound) => Some(Output::Value(None)),
        (Input::Update(_) | Input::Remove, Code::NotFound) => Some(Output::NotFound),
        (Input::Insert(_), Code::AlreadyExists) => Some(Output::AlreadyExists),
        _ => None,
    };
    if let Some(output) = definite {
        return (Attempt::Definite(output), Advice::Wait);
    }
    let advice = match Unavailable::of(status) {
        Some(Unavailable::NoLeader | Unavailable::NoQuorum | Unavailable::OutcomeUnknown) => {
            Advice::Wait
        }
        Some(Unavailable::ShuttingDown | Unavailable::StorageFailed) | None => Advice::OtherReplica,
    };
    let attempt = match (input, status.code()) {
        (Input::Get, _) => Attempt::NoEffect,
        // This attempt changed nothing: refused before the log, or by the
        // state machine (an expired session, a stale sequence). An earlier
        // attempt may still have had an effect; `Write::settle` keeps that.
        (_, Code::InvalidArgument | Code::FailedPrecondition) => Attempt::NoEffect,
        // The replicas say so, only when every attempt they made for the
        // call proves it absent from the log.
        _ if Certainty::of(status) == Some(Certainty::NotProposed) => Attempt::NoEffect,
        _ => Attempt::Indeterminate,
    };
    (attempt, advice)
}

/// One write, attempt by attempt (every attempt with the same request id),
/// becoming at most one operation of the history.
#[derive(Clone, Debug)]
pub struct Write {
    op: Operation,
    attempts: u32,
    max_attempts: u32,
    /// Some attempt may have taken effect.
    maybe: bool,
}

/// What to do after an attempt of a [`Write`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settled {
    /// Send it again, with the same request id.
    Retry,
    /// Done: record this operation (pending if its output is `None`), or
    /// nothing if the write certainly had no effect.
    Done(Option<Operation>),
}

impl Write {
    /// A write by `client` of `input` to `key`, first called at `call`.
    pub fn new(client: u64, key: String, input: Input, call: u64, max_attempts: u32) -> Write {
        Write {
            op: Operation {
                client,
                key,
                input,
                output: None,
                call,
                ret: call,
            },
            attempts: 0,
            max_attempts: max_attempts.max(1),
            maybe: false,
        }
    }

    /// Takes the outcome of the next attempt, which returned at `ret`.
    ///
    /// A definite reply is the write's one effect (the dedup table applies
    /// a request id once and answers every copy with the first reply), so
    /// the operation spans from the first call to this reply. Attempts that
    /// certainly had no effect only end the write if no earlier attempt may
    /// have had one. After `max_attempts` without a definite reply, the
    /// write is pending.
    pub fn settle(&mut self, attempt: Attempt, ret: u64) -> Settled {
        self.attempts += 1;
        match attempt {
            Attempt::Definite(output) => {
                self.op.output = Some(output);
                self.op.ret = ret.max(self.op.call);
                return Settled::Done(Some(self.op.clone()));
            }
            Attempt::NoEffect if !self.maybe => return Settled::Done(None),
            Attempt::NoEffect => {}
            Attempt::Indeterminate => self.maybe = true,
        }
        if self.attempts < self.max_attempts {
            Settled::Retry
        } else {
            Settled::Done(Some(self.op.clone()))
        }
    }

    /// How many attempts so far.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }
}

/// What the clients recorded.
#[derive(Clone, Debug, Default)]
pub struct History {
    /// Every operation with an effect or an observation, completed or
    /// pending.
    pub ops: Vec<Operation>,
    /// Which replicas served each operation, by (client, call time), for
    /// the report.
    pub via: HashMap<(u64, u64), String>,
    /// Reads answered.
    pub reads_ok: u64,
    /// Writes answered (a definite reply, maybe after retries).
    pub writes_ok: u64,
    /// Writes answered only by a retry after an indeterminate attempt.
    pub writes_resolved_by_retry: u64,
    /// Reads that failed (dropped from the history).
    pub reads_failed: u64,
    /// Writes that certainly had no effect (dropped from the history).
    pub writes_failed: u64,
    /// Writes left pending (indeterminate after every attempt).
    pub writes_indeterminate: u64,
    /// Calls made in all, retries included.
    pub calls: u64,
}

impl History {
    fn absorb(&mut self, other: History) {
        self.ops.extend(other.ops);
        self.via.extend(other.via);
        self.reads_ok += other.reads_ok;
        self.writes_ok += other.writes_ok;
        self.writes_resolved_by_retry += other.writes_resolved_by_retry;
        self.reads_failed += other.reads_failed;
        self.writes_failed += other.writes_failed;
        self.writes_indeterminate += other.writes_indeterminate;
        self.calls += other.calls;
    }

    /// Every key a write was sent to.
    pub fn written_keys(&self) -> BTreeSet<String> {
        self.ops
            .iter()
            .filter(|op| op.input != Input::Get)
            .map(|op| op.key.clone())
            .collect()
    }
}

/// What the client tasks share.
struct Shared {
    opts: WorkloadOptions,
    started: Instant,
    clients: BTreeMap<u32, KvStoreClient<Channel>>,
    next_value: AtomicI32,
    next_client: AtomicU64,
}

impl Shared {
    fn now(&self) -> u64 {
        micros(self.started)
    }
}

fn micros(started: Instant) -> u64 {
    started.elapsed().as_micros() as u64
}

/// A client for each endpoint, connecting on first use (and again after a
/// replica restarts).
fn clients(
    endpoints: &BTreeMap<u32, String>,
) -> Result<BTreeMap<u32, KvStoreClient<Channel>>, String> {
    endpoints
        .iter()
        .map(|(id, addr)| {
            let channel = dial::endpoint(addr)
                .map_err(|e| format!("replica {id}: {e}"))?
                .connect_lazy();
            Ok((*id, KvStoreClient::new(channel)))
        })
        .collect()
}

/// Runs the clients from now until `stop` turns true; each then finishes
/// the call (and the retries) it is in. Times count from `started`.
/// `cut_off` names the replicas cut off by a partition right now: a
/// quarter of the reads go there while there are any (where a replica
/// that serves reads on its own would answer stale values).
pub async fn run(
    opts: WorkloadOptions,
    started: Instant,
    stop: watch::Receiver<bool>,
    cut_off: watch::Receiver<Vec<u32>>,
) -> Result<History, String> {
    if opts.endpoints.is_empty() || opts.keys_per_generation == 0 {
        return Err("the workload needs replicas and keys".into());
    }
    let shared = Arc::new(Shared {
        clients: clients(&opts.endpoints)?,
        started,
        next_value: AtomicI32::new(1),
        next_client: AtomicU64::new(1),
        opts,
    });
    let tasks: Vec<_> = (0..shared.opts.clients)
        .map(|i| {
            let shared = Arc::clone(&shared);
            let rng = Rng::new(shared.opts.seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9));
            tokio::spawn(client(shared, rng, stop.clone(), cut_off.clone()))
        })
        .collect();
    let mut history = History::default();
    for task in tasks {
        history.absorb(task.await.map_err(|e| format!("client task: {e}"))?);
    }
    Ok(history)
}

/// One client's loop.
async fn client(
    shared: Arc<Shared>,
    mut rng: Rng,
    stop: watch::Receiver<bool>,
    cut_off: watch::Receiver<Vec<u32>>,
) -> History {
    let opts = &shared.opts;
    let ids: Vec<u32> = opts.endpoints.keys().copied().collect();
    let mut history = History::default();
    // The history's name for this client process, and the session the
    // store issued it (opened before its first write, and again after a
    // write whose outcome it could not learn, when it acts as a new
    // process).
    let mut client_id = shared.next_client.fetch_add(1, Ordering::Relaxed);
    let mut session: Option<u64> = None;
    let mut sequence = 0u64;
    // Replicas that failed a call lately, and until when to avoid them.
    let mut avoid: BTreeMap<u32, Instant> = BTreeMap::new();
    let pick = |rng: &mut Rng, avoid: &BTreeMap<u32, Instant>| {
        let now = Instant::now();
        let fine: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|id| avoid.get(id).is_none_or(|until| *until <= now))
            .collect();
        let from = if fine.is_empty() { &ids } else { &fine };
        from[rng.range(0, from.len() as u64) as usize]
    };
    while !*stop.borrow() {
        let generation = shared.started.elapsed().as_millis() / opts.generation.as_millis().max(1);
        let key = format!(
            "k{generation}-{}",
            rng.range(0, u64::from(opts.keys_per_generation))
        );
        let value = || shared.next_value.fetch_add(1, Ordering::Relaxed);
        let input = match rng.range(0, 100) {
            0..35 => Input::Get,
            35..50 => Input::Insert(value()),
            50..70 => Input::Update(value()),
            70..85 => Input::Upsert(value()),
            _ => Input::Remove,
        };
        if input == Input::Get {
            let cut = cut_off.borrow().clone();
            let replica = if !cut.is_empty() && rng.range(0, 4) == 0 {
                cut[rng.range(0, cut.len() as u64) as usize]
            } else {
                pick(&mut rng, &avoid)
            };
            let call = shared.now();
            let result = send(&shared, replica, &key, input, None).await;
            let ret = shared.now();
            history.calls += 1;
            match classify(input, &result) {
                (Attempt::Definite(output), _) => {
                    history.reads_ok += 1;
                    history
                        .via
                        .insert((client_id, call), format!("via replica {replica}"));
                    history.ops.push(Operation {
                        client: client_id,
                        key,
                        input,
                        output: Some(output),
                        call,
                        ret,
                    });
                }
                _ => {
                    history.reads_failed += 1;
                    avoid.insert(replica, Instant::now() + AVOID_FAILED);
                }
            }
            continue;
        }
        let session_id = match session {
            Some(id) => id,
            None => {
                let replica = pick(&mut rng, &avoid);
                history.calls += 1;
                match open_session(&shared, replica).await {
                    Ok(id) => {
                        session = Some(id);
                        sequence = 0;
                        id
                    }
                    Err(_) => {
                        // No leader or no quorum through this replica:
                        // try again (another one) shortly.
                        avoid.insert(replica, Instant::now() + AVOID_FAILED);
                        tokio::time::sleep(Duration::from_millis(50 + rng.range(0, 50))).await;
                        continue;
                    }
                }
            }
        };
        sequence += 1;
        let request_id = (session_id, sequence);
        let mut replica = pick(&mut rng, &avoid);
        let mut via = Vec::new();
        let call = shared.now();
        let mut write = Write::new(client_id, key.clone(), input, call, opts.max_attempts);
        let mut unsure = false;
        let settled = loop {
            via.push(replica.to_string());
            let result = send(&shared, replica, &key, input, Some(request_id)).await;
            let ret = shared.now();
            history.calls += 1;
            let (attempt, advice) = classify(input, &result);
            unsure |= attempt == Attempt::Indeterminate;
            if !matches!(attempt, Attempt::Definite(_)) {
                avoid.insert(replica, Instant::now() + AVOID_FAILED);
            }
            match write.settle(attempt, ret) {
                Settled::Retry => {}
                Settled::Done(op) => break op,
            }
            if advice == Advice::OtherReplica && ids.len() > 1 {
                let others: Vec<u32> = ids.iter().copied().filter(|id| *id != replica).collect();
                replica = others[rng.range(0, others.len() as u64) as usize];
            } else {
                replica = ids[rng.range(0, ids.len() as u64) as usize];
            }
            // Growing, jittered: give an election (1–2 s) time to finish.
            let base = 100 * u64::from(write.attempts());
            tokio::time::sleep(Duration::from_millis(base + rng.range(0, 100))).await;
        };
        let tries = if via.len() > 1 {
            format!("via replicas {} (same request id)", via.join(", "))
        } else {
            format!("via replica {}", via[0])
        };
        match settled {
            None => history.writes_failed += 1,
            Some(op) => {
                if op.output.is_some() {
                    history.writes_ok += 1;
                    if unsure {
                        history.writes_resolved_by_retry += 1;
                    }
                } else {
                    history.writes_indeterminate += 1;
                    // A new process: this client's last write may still
                    // take effect at any time.
                    client_id = shared.next_client.fetch_add(1, Ordering::Relaxed);
                    session = None;
                }
                history.via.insert((op.client, op.call), tries);
                history.ops.push(op);
            }
        }
    }
    history
}

/// One call to `replica`, bounded by the deadline on this side too (a
/// paused replica never answers, and a deadline only in the request's
/// header would wait for it).
async fn send(
    shared: &Shared,
    replica: u32,
    key: &str,
    input: Input,
    request_id: Option<(u64, u64)>,
) -> Result<Output, Status> {
    let Some(client) = shared.clients.get(&replica) else {
        return Err(Status::internal(format!("no replica {replica}")));
    };
    let deadline = shared.opts.deadline;
    let call = call(client.clone(), key.to_string(), input, request_id, deadline);
    match tokio::time::timeout(deadline + Duration::from_millis(100), call).await {
        Ok(result) => result,
        Err(_) => Err(Status::deadline_exceeded(format!(
            "replica {replica} did not answer within {deadline:?}"
        ))),
    }
}

/// Opens a session through `replica`, bounded by the deadline as [`send`]
/// is.
async fn open_session(shared: &Shared, replica: u32) -> Result<u64, Status> {
    let Some(client) = shared.clients.get(&replica) else {
        return Err(Status::internal(format!("no replica {replica}")));
    };
    let deadline = shared.opts.deadline;
    let mut request = Request::new(pb::OpenSessionRequest {});
    request.set_timeout(deadline);
    let mut client = client.clone();
    match tokio::time::timeout(
        deadline + Duration::from_millis(100),
        client.open_session(request),
    )
    .await
    {
        Ok(result) => Ok(result?.into_inner().client_id),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "replica {replica} did not answer within {deadline:?}"
        ))),
    }
}

/// Makes one KvStore call and turns its response into the model's output.
async fn call(
    mut client: KvStoreClient<Channel>,
    key: String,
    input: Input,
    request_id: Option<(u64, u64)>,
    deadline: Duration,
) -> Result<Output, Status> {
    fn request<T>(message: T, deadline: Duration) -> Request<T> {
        let mut request = Request::new(message);
        request.set_timeout(deadline);
        request
    }
    let request_id = request_id.map(|(client_id, sequence)| pb::RequestId {
        client_id,
        sequence,
    });
    Ok(match input {
        Input::Get => {
            let response = client
                .get(request(pb::GetRequest { key }, deadline))
                .await?;
            Output::Value(Some(response.into_inner().value))
        }
        Input::Insert(value) => {
            let message = pb::InsertRequest {
                key,
                value: Some(value),
                request_id,
            };
            client.insert(request(message, deadline)).await?;
            Output::Inserted
        }
        Input::Update(value) => {
            let message = pb::UpdateRequest {
                key,
                value: Some(value),
                request_id,
            };
            let previous = client
                .update(request(message, deadline))
                .await?
                .into_inner()
                .previous;
            Output::Updated { previous }
        }
        Input::Upsert(value) => {
            let message = pb::UpsertRequest {
                key,
                value: Some(value),
                request_id,
            };
            let inserted = client
                .upsert(request(message, deadline))
                .await?
                .into_inner()
                .inserted;
            // The API does not say what an upsert replaced.
            if inserted {
                Output::Inserted
            } else {
                Output::Replaced
            }
        }
        Input::Remove => {
            let message = pb::RemoveRequest { key, request_id };
            let previous = client
                .remove(request(message, deadline))
                .await?
                .into_inner()
                .previous;
            Output::Removed { previous }
        }
    })
}

/// Reads every key of `keys` through every replica (each read tried up to
/// `attempts` times), as operations of the history: after the faults are
/// healed, this is what shows a write that was acknowledged and then lost.
/// Returns the reads and, for each (key, replica) never read, why.
pub async fn final_reads(
    endpoints: &BTreeMap<u32, String>,
    keys: &BTreeSet<String>,
    started: Instant,
    deadline: Duration,
    attempts: u32,
) -> Result<(History, Vec<String>), String> {
    let clients = clients(endpoints)?;
    let shared = Arc::new(Shared {
        opts: WorkloadOptions {
            clients: 0,
            endpoints: endpoints.clone(),
            keys_per_generation: 1,
            generation: Duration::from_secs(1),
            deadline,
            max_attempts: attempts,
            seed: 0,
        },
        started,
        clients,
        next_value: AtomicI32::new(0),
        next_client: AtomicU64::new(0),
    });
    // One task per replica, reading the keys in order.
    let tasks: Vec<_> = endpoints
        .keys()
        .map(|&replica| {
            let shared = Arc::clone(&shared);
            let keys = keys.clone();
            tokio::spawn(async move {
                let client = FINAL_READ_CLIENT + u64::from(replica);
                let mut history = History::default();
                let mut failures = Vec::new();
                for key in keys {
                    let mut last = None;
                    for _ in 0..attempts.max(1) {
                        let call = shared.now();
                        let result = send(&shared, replica, &key, Input::Get, None).await;
                        let ret = shared.now();
                        history.calls += 1;
                        match classify(Input::Get, &result) {
                            (Attempt::Definite(output), _) => {
                                history.reads_ok += 1;
                                history.via.insert(
                                    (client, call),
                                    format!("final read via replica {replica}"),
                                );
                                history.ops.push(Operation {
                                    client,
                                    key: key.clone(),
                                    input: Input::Get,
                                    output: Some(output),
                                    call,
                                    ret,
                                });
                                last = None;
                                break;
                            }
                            _ => {
                                history.reads_failed += 1;
                                last = result.err();
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                        }
                    }
                    if let Some(status) = last {
                        failures.push(format!(
                            "{key} via replica {replica}: {:?}: {}",
                            status.code(),
                            status.message()
                        ));
                    }
                }
                (history, failures)
            })
        })
        .collect();
    let mut history = History::default();
    let mut failures = Vec::new();
    for task in tasks {
        let (h, f) = task.await.map_err(|e| format!("final read task: {e}"))?;
        history.absorb(h);
        failures.extend(f);
    }
    Ok((history, failures))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::MetadataValue;

    fn marked(reason: Unavailable) -> Status {
        reason.status("said so")
    }

    #[test]
    fn answers_are_outputs_failed_reads_have_no_effect_and_failed_writes_may_have() {
        let ok = Ok(Output::Inserted);
        assert_eq!(
            classify(Input::Insert(1), &ok).0,
            Attempt::Definite(Output::Inserted)
        );
        // NOT_FOUND and ALREADY_EXISTS are outputs of the model.
        let nf = Err(Status::not_found("k"));
        assert_eq!(
            classify(Input::Get, &nf).0,
            Attempt::Definite(Output::Value(None))
        );
        assert_eq!(
            classify(Input::Update(1), &nf).0,
            Attempt::Definite(Output::NotFound)
        );
        assert_eq!(
            classify(Input::Remove, &nf).0,
            Attempt::Definite(Output::NotFound)
        );
        let exists = Err(Status::already_exists("k"));
        assert_eq!(
            classify(Input::Insert(1), &exists).0,
            Attempt::Definite(Output::AlreadyExists)
        );
        // A failed read: no effect, whatever the reason.
        for status in [
            marked(Unavailable::NoQuorum),
            Status::unavailable("connection refused"),
            Status::deadline_exceeded("slow"),
        ] {
            assert_eq!(classify(Input::Get, &Err(status)).0, Attempt::NoEffect);
        }
        // A write refused before the log: no effect.
        let bad = Err(Status::invalid_argument("key must not be empty"));
        assert_eq!(classify(Input::Upsert(1), &bad).0, Attempt::NoEffect);
        // One the replicas say never reached the log: no effect either, and
        // the reason still says where to retry.
        let not_proposed = Certainty::NotProposed.mark(marked(Unavailable::NoLeader));
        assert_eq!(
            classify(Input::Upsert(1), &Err(not_proposed)),
            (Attempt::NoEffect, Advice::Wait)
        );
        let unknown = Certainty::OutcomeUnknown.mark(marked(Unavailable::NoQuorum));
        assert_eq!(
            classify(Input::Upsert(1), &Err(unknown)),
            (Attempt::Indeterminate, Advice::Wait)
        );
        // Any other failed write may have happened.
        for (status, advice) in [
            (marked(Unavailable::NoLeader), Advice::Wait),
            (marked(Unavailable::NoQuorum), Advice::Wait),
            (marked(Unavailable::OutcomeUnknown), Advice::Wait),
            (marked(Unavailable::ShuttingDown), Advice::OtherReplica),
            (marked(Unavailable::StorageFailed), Advice::OtherReplica),
            (
                Status::unavailable("tcp connect error"),
                Advice::OtherReplica,
            ),
            (Status::deadline_exceeded("late"), Advice::OtherReplica),
            (Status::unknown("h2 protocol error"), Advice::OtherReplica),
        ] {
            let (attempt, got) = classify(Input::Remove, &Err(status.clone()));
            assert_eq!(attempt, Attempt::Indeterminate, "{status:?}");
            assert_eq!(got, advice, "{status:?}");
        }
        // A reason on a status that is not UNAVAILABLE is no reason.
        let mut odd = Status::internal("boom");
        odd.metadata_mut().insert(
            crate::service::REASON,
            MetadataValue::from_static("no-quorum"),
        );
        assert_eq!(
            classify(Input::Remove, &Err(odd)),
            (Attempt::Indeterminate, Advice::OtherReplica)
        );
    }

    fn write() -> Write {
        Write::new(7, "k0-1".into(), Input::Update(5), 100, 3)
    }

    #[test]
    fn a_write_answered_at_once_is_one_operation() {
        let mut w = write();
        let done = w.settle(Attempt::Definite(Output::NotFound), 150);
        let Settled::Done(Some(op)) = done else {
            panic!("{done:?}")
        };
        assert_eq!(
            (op.call, op.ret, op.output),
            (100, 150, Some(Output::NotFound))
        );
        assert_eq!((op.client, op.key.as_str()), (7, "k0-1"));
    }

    #[test]
    fn retries_merge_into_one_operation_from_the_first_call_to_the_answer() {
        let mut w = write();
        assert_eq!(w.settle(Attempt::Indeterminate, 1100), Settled::Retry);
        assert_eq!(w.settle(Attempt::Indeterminate, 2300), Settled::Retry);
        let done = w.settle(Attempt::Definite(Output::Updated { previous: 3 }), 2500);
        let Settled::Done(Some(op)) = done else {
            panic!("{done:?}")
        };
        assert_eq!(op.call, 100, "the operation starts at the first call");
        assert_eq!(op.ret, 2500, "and ends at the answer");
        assert_eq!(op.output, Some(Output::Updated { previous: 3 }));
        assert_eq!(w.attempts(), 3);
    }

    #[test]
    fn a_write_never_answered_is_pending() {
        let mut w = write();
        assert_eq!(w.settle(Attempt::Indeterminate, 1100), Settled::Retry);
        // A retry refused before the log proves nothing about the first.
        assert_eq!(w.settle(Attempt::NoEffect, 1200), Settled::Retry);
        let done = w.settle(Attempt::Indeterminate, 2300);
        let Settled::Done(Some(op)) = done else {
            panic!("{done:?}")
        };
        assert_eq!(
            op.output, None,
            "pending: may take effect any time after its call"
        );
        assert_eq!(op.call, 100);
    }

    #[test]
    fn a_write_that_certainly_failed_is_not_in_the_history() {
        let mut w = write();
        assert_eq!(w.settle(Attempt::NoEffect, 120), Settled::Done(None));
    }

    #[test]
    fn one_attempt_allowed_means_pending_at_once() {
        let mut w = Write::new(1, "k".into(), Input::Remove, 5, 0);
        assert!(matches!(
            w.settle(Attempt::Indeterminate, 9),
            Settled::Done(Some(Operation { output: None, .. }))
        ));
    }
}
