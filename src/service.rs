//! `paxoskv.v1.KvStore`, the client API, as served by every replica.
//!
//! A call is validated first: bad input never reaches the log. Then the local
//! node serves it if it leads; otherwise the call is forwarded to the leader
//! it knows, or waits (up to the call's deadline) until one is known.
//!
//! Forwarding travels on the peer port, never the client port: the call
//! joins the next batch on this replica's `paxoskv.v1.Paxos/Forward` stream
//! to the leader ([`crate::forwarder`]), with its remaining deadline and
//! hop count; the leader serves it by the same path as a client's own call
//! (`KvService::serve`), so its reply and status are exactly those its
//! KvStore would give. A client's own call has no hops: only replicas
//! forward, and only over the peer port.
//!
//! Retries inside one call are only made where they cannot apply a write
//! twice: when the command is known not to be in the log (not the leader;
//! leadership lost before a slot), or when the write carries a request id,
//! so the state machine deduplicates it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tonic::metadata::MetadataValue;
use tonic::{Code, Request, Response, Status};

use crate::certainty::{Attempts, Certainty};
use crate::directory::Directory;
use crate::forwarder::{self, Links};
use crate::kv::{Op, Reply};
use crate::metrics as m;
use crate::node::{NodeError, NodeHandle};
use crate::paxos::NodeId;
use crate::pb;
use crate::pb::forward_request::Call;
use crate::pb::forward_response::Reply as Answer;
use crate::transport::{ForwardAnswerStream, Forwarded};

/// Longest key accepted, in bytes (the state machine's rule).
pub const MAX_KEY_BYTES: usize = crate::kv::MAX_KEY_BYTES;

/// Deadline of a call that sets none.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(5);

/// The largest client request decoded: a key is at most 1,024 bytes, so
/// anything near this is not a request of this API.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;

/// Metadata key on every UNAVAILABLE status a replica gives on purpose; its
/// value is an [`Unavailable`] reason. An UNAVAILABLE without it came from
/// the network: the replica could not be reached.
pub const REASON: &str = "x-paxoskv-reason";
/// A call is forwarded at most this many times (leaders can change under it).
const MAX_HOPS: u32 = 3;

/// The KvStore service of one replica, which also answers the calls other
/// replicas forward to it (`Paxos/Forward`, on the peer port).
pub struct KvService {
    node: NodeHandle,
    directory: Arc<Directory>,
    /// A forwarding stream per leader forwarded to, on its peer address.
    links: Links,
    /// Forwarded calls being served here, and whether new ones are refused
    /// because the replica is stopping.
    forwarded_in: watch::Sender<Draining>,
}

/// See [`KvService::drain_forwarded`].
#[derive(Clone, Copy, Debug, Default)]
struct Draining {
    in_flight: usize,
    refusing: bool,
}

/// Marks one forwarded call in flight for as long as it lives, cancelled
/// calls included.
struct InFlight<'a>(&'a watch::Sender<Draining>);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|d| d.in_flight -= 1);
    }
}

impl KvService {
    /// Serves calls through `node`; `directory` gives every replica's peer
    /// address (where calls are forwarded) and client address (what a
    /// status naming the leader tells the client).
    pub fn new(node: NodeHandle, directory: Arc<Directory>) -> Self {
        KvService {
            node,
            links: Links::new(Arc::clone(&directory)),
            directory,
            forwarded_in: watch::Sender::new(Draining::default()),
        }
    }

    /// For a replica that is stopping: refuses every new forwarded call
    /// (UNAVAILABLE, shutting down, so the forwarding replica looks for
    /// another leader) and resolves once none is in flight.
    pub async fn drain_forwarded(&self) {
        self.forwarded_in.send_modify(|d| d.refusing = true);
        let mut state = self.forwarded_in.subscribe();
        let _ = state.wait_for(|d| d.in_flight == 0).await;
    }

    /// Counts a forwarded call in, unless the replica is stopping.
    fn enter_forwarded(&self) -> Result<InFlight<'_>, Status> {
        let mut admitted = false;
        self.forwarded_in.send_if_modified(|d| {
            admitted = !d.refusing;
            if admitted {
                d.in_flight += 1;
            }
            admitted
        });
        if admitted {
            Ok(InFlight(&self.forwarded_in))
        } else {
            // Refused before anything was proposed.
            Err(Certainty::NotProposed
                .mark(Unavailable::ShuttingDown.status("replica is shutting down")))
        }
    }

    /// The tonic server for this service's client API, sharing `service`
    /// with the peer port's `Forward`.
    pub fn server(service: Arc<Self>) -> pb::kv_store_server::KvStoreServer<Self> {
        pb::kv_store_server::KvStoreServer::from_arc(service)
            .max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    /// Checks, counts and serves one client's call of method `M`.
    async fn handle<M: Method>(
        &self,
        request: Request<M>,
    ) -> Result<Response<M::Response>, Status> {
        observed(M::NAME, async {
            let meta = CallMeta::of_client(&request);
            let call = request.into_inner();
            let action = call.check()?;
            self.serve(meta, call, action).await.map(Response::new)
        })
        .await
    }

    /// Checks and serves one forwarded call of method `M`, not counted: it
    /// was counted, end to end, where the client sent it, so the sum over
    /// replicas is the clients' traffic. Checked again all the same: the
    /// leader trusts no one to have done it.
    async fn handle_forwarded<M: Method>(&self, meta: CallMeta, call: M) -> Result<Answer, Status> {
        let action = call.check()?;
        self.serve(meta, call, action).await.map(M::answer)
    }

    /// Sends `call` to `leader` on this replica's forwarding stream, with
    /// the time `left` and its hop count, and returns what the leader
    /// answered.
    async fn forward<M: Method>(
        &self,
        leader: NodeId,
        call: M,
        left: Duration,
        hops: u32,
    ) -> Result<M::Response, Status> {
        let request = pb::ForwardRequest {
            call: Some(call.into_call()),
        };
        let answer = self.links.call(leader, request, left, hops).await?;
        answer.reply.and_then(M::from_answer).ok_or_else(mismatch)
    }

    /// Serves one call of a forwarding stream, as the leader's KvStore
    /// would: counted in as in flight (refused once the replica is
    /// stopping), with the deadline and hop count it carries.
    async fn serve_forwarded(
        &self,
        call: pb::ForwardedCall,
    ) -> Result<pb::ForwardResponse, Status> {
        let _in_flight = self.enter_forwarded()?;
        let meta = CallMeta::of_forwarded(&call);
        let answer = match call.call.and_then(|c| c.call) {
            Some(Call::Get(call)) => self.handle_forwarded(meta, call).await,
            Some(Call::Insert(call)) => self.handle_forwarded(meta, call).await,
            Some(Call::Remove(call)) => self.handle_forwarded(meta, call).await,
            Some(Call::Update(call)) => self.handle_forwarded(meta, call).await,
            Some(Call::Upsert(call)) => self.handle_forwarded(meta, call).await,
            Some(Call::OpenSession(call)) => self.handle_forwarded(meta, call).await,
            None => Err(Status::invalid_argument(
                "call is required: one of get, insert, remove, update, upsert, open_session",
            )),
        }?;
        Ok(pb::ForwardResponse {
            reply: Some(answer),
        })
    }

    /// The status of a call that ran out of time, naming the leader (if
    /// any) by its client address.
    fn at_deadline(&self, leader: Option<NodeId>) -> Status {
        unavailable_at_deadline(leader.map(|l| self.directory.describe(l)))
    }

    /// Serves `call` here if this replica leads, else forwards it to the
    /// leader, retrying where that is safe, until done or the deadline. A
    /// write that fails says whether it surely did not happen
    /// ([`crate::certainty`]).
    async fn serve<M: Method>(
        &self,
        meta: CallMeta,
        call: M,
        action: Action,
    ) -> Result<M::Response, Status> {
        let mut attempts = Attempts::default();
        let result = self.attempt(meta, call, action, &mut attempts).await;
        match action {
            Action::Write(_) => result.map_err(|status| attempts.mark(status)),
            Action::Read => result,
        }
    }

    /// The loop of [`KvService::serve`], recording in `attempts` what each
    /// attempt of a write established.
    async fn attempt<M: Method>(
        &self,
        meta: CallMeta,
        call: M,
        action: Action,
        attempts: &mut Attempts,
    ) -> Result<M::Response, Status> {
        let mut node = self.node.clone();
        // A read may always be retried; a write only with a request id,
        // which the state machine deduplicates.
        let retry_safe = matches!(action, Action::Read) || call.request_id().is_some();
        let mut counted_wait = false;
        loop {
            let left = meta.deadline.saturating_duration_since(Instant::now());
            let local = run_locally(&node, &call, action, meta.deadline);
            let Ok(outcome) = tokio::time::timeout(left, local).await else {
                attempts.cut_off();
                return Err(self.at_deadline(node.leader()));
            };
            if let Err(e) = &outcome {
                attempts.answered(e);
            }
            match outcome {
                Ok(outcome) => return M::respond(call.key(), outcome),
                Err(NodeError::Stopped) => return Err(stopped(&node)),
                Err(NodeError::Retry) => tokio::time::sleep(Duration::from_millis(10)).await,
                // With a request id the state machine deduplicates: asking
                // again is safe, and learns the outcome.
                Err(NodeError::Unknown) if retry_safe => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(NodeError::Unknown) => return Err(outcome_unknown()),
                // Overloaded: failing now lets the client back off; waiting
                // would hold the call (and its memory) past its deadline.
                Err(NodeError::Busy { what, limit }) => {
                    metrics::counter!(m::REFUSED_BUSY, "what" => what).increment(1);
                    return Err(Status::resource_exhausted(format!(
                        "replica {} is overloaded: {limit} {what}, the most it takes; \
                         nothing was proposed, retry after a backoff",
                        node.id()
                    )));
                }
                Err(NodeError::Expired) => {
                    return Err(Status::deadline_exceeded(
                        "the call's deadline passed before its write got a slot: \
                         it was taken back, not proposed",
                    ));
                }
                Err(NodeError::NotLeader(Some(leader)))
                    if leader != node.id() && meta.hops < MAX_HOPS =>
                {
                    let left = meta.deadline.saturating_duration_since(Instant::now());
                    metrics::counter!(m::FORWARDED, "leader_known" => "true").increment(1);
                    let forwarded = self
                        .forward(leader, call.clone(), left, meta.hops + 1)
                        .await;
                    if let Err(status) = &forwarded {
                        attempts.forwarded(status);
                    }
                    match forwarded {
                        Ok(response) => return Ok(response),
                        // The leader may have died; look again shortly.
                        Err(status) if retry_safe && leader_may_be_gone(&status) => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(status) => return Err(status),
                    }
                }
                Err(NodeError::NotLeader(_)) => {
                    // No leader known (or forwarded too often): wait for news.
                    if !counted_wait {
                        metrics::counter!(m::FORWARDED, "leader_known" => "false").increment(1);
                        counted_wait = true;
                    }
                    let left = meta.deadline.saturating_duration_since(Instant::now());
                    let wait = left.min(Duration::from_millis(100));
                    let _ = tokio::time::timeout(wait, node.leader_changed()).await;
                }
            }
            if Instant::now() >= meta.deadline {
                return Err(self.at_deadline(node.leader()));
            }
        }
    }
}

/// What a checked call asks of the log.
#[derive(Clone, Copy)]
enum Action {
    Read,
    Write(Op),
}

/// What the local node answered.
enum Outcome {
    Read(Option<i32>),
    Wrote(Reply),
}

/// Asks this replica's node to do `action` for `call`.
async fn run_locally<M: Method>(
    node: &NodeHandle,
    call: &M,
    action: Action,
    deadline: Instant,
) -> Result<Outcome, NodeError> {
    let key = call.key().to_string();
    match action {
        Action::Read => node.read(key).await.map(Outcome::Read),
        Action::Write(op) => {
            let (client_id, sequence) = call
                .request_id()
                .map_or((0, 0), |r| (r.client_id, r.sequence));
            node.write(key, op, client_id, sequence, Some(deadline))
                .await
                .map(Outcome::Wrote)
        }
    }
}

/// One KvStore method, by its request type: how the request is checked,
/// how the node's outcome becomes the response, and how call and response
/// travel in a `Paxos/Forward`. The flow around it (`KvService::serve`) is
/// the same for all.
trait Method: Clone + Send + Sync + 'static {
    type Response: Send;
    /// The gRPC method name, for metrics.
    const NAME: &'static str;
    fn key(&self) -> &str;
    fn request_id(&self) -> Option<pb::RequestId>;
    /// Checks the request against the contract (the error names the field)
    /// and says what it asks of the log.
    fn check(&self) -> Result<Action, Status>;
    /// The contract's response, or status, for what the node answered.
    fn respond(key: &str, outcome: Outcome) -> Result<Self::Response, Status>;
    /// The call as a `Paxos/Forward` carries it.
    fn into_call(self) -> Call;
    /// The response as a `Paxos/Forward` answers it.
    fn answer(response: Self::Response) -> Answer;
    /// The response in a `Paxos/Forward` answer, if of this method's kind.
    fn from_answer(answer: Answer) -> Option<Self::Response>;
}

/// The `Forward`-related parts of [`Method`] for a request type, its
/// response type and their variant in the `Forward` oneofs: the same three
/// lines for every method.
macro_rules! forwarded_as {
    ($variant:ident) => {
        fn into_call(self) -> Call {
            Call::$variant(self)
        }
        fn answer(response: Self::Response) -> Answer {
            Answer::$variant(response)
        }
        fn from_answer(answer: Answer) -> Option<Self::Response> {
            match answer {
                Answer::$variant(response) => Some(response),
                _ => None,
            }
        }
    };
}

impl Method for pb::GetRequest {
    type Response = pb::GetResponse;
    const NAME: &'static str = "Get";
    fn key(&self) -> &str {
        &self.key
    }
    fn request_id(&self) -> Option<pb::RequestId> {
        None
    }
    fn check(&self) -> Result<Action, Status> {
        validate_key(&self.key)?;
        Ok(Action::Read)
    }
    fn respond(key: &str, outcome: Outcome) -> Result<Self::Response, Status> {
        match outcome {
            Outcome::Read(Some(value)) => Ok(pb::GetResponse { value }),
            Outcome::Read(None) => Err(Status::not_found(format!("key {key:?} not found"))),
            Outcome::Wrote(_) => Err(mismatch()),
        }
    }
    forwarded_as!(Get);
}

/// Checks what every write carries, and makes its action.
fn check_write(
    key: &str,
    request_id: &Option<pb::RequestId>,
    op: Result<Op, Status>,
) -> Result<Action, Status> {
    validate_key(key)?;
    let op = op?;
    validate_request_id(request_id)?;
    Ok(Action::Write(op))
}

impl Method for pb::OpenSessionRequest {
    type Response = pb::OpenSessionResponse;
    const NAME: &'static str = "OpenSession";
    fn key(&self) -> &str {
        ""
    }
    fn request_id(&self) -> Option<pb::RequestId> {
        None
    }
    fn check(&self) -> Result<Action, Status> {
        Ok(Action::Write(Op::OpenSession))
    }
    fn respond(key: &str, outcome: Outcome) -> Result<Self::Response, Status> {
        match wrote(outcome)? {
            Reply::SessionOpened { client_id } => Ok(pb::OpenSessionResponse { client_id }),
            other => Err(reply_status(key, other)),
        }
    }
    forwarded_as!(OpenSession);
}

/// The state machine's reply to a write.
fn wrote(outcome: Outcome) -> Result<Reply, Status> {
    match outcome {
        Outcome::Wrote(reply) => Ok(reply),
        Outcome::Read(_) => Err(mismatch()),
    }
}

impl Method for pb::InsertRequest {
    type Response = pb::InsertResponse;
    const NAME: &'static str = "Insert";
    fn key(&self) -> &str {
        &self.key
    }
    fn request_id(&self) -> Option<pb::RequestId> {
        self.request_id
    }
    fn check(&self) -> Result<Action, Status> {
        let op = validate_value(self.value).map(Op::Insert);
        check_write(&self.key, &self.request_id, op)
    }
    fn respond(key: &str, outcome: Outcome) -> Result<Self::Response, Status> {
        match wrote(outcome)? {
            Reply::Inserted => Ok(pb::InsertResponse {}),
            other => Err(reply_status(key, other)),
        }
    }
    forwarded_as!(Insert);
}

impl Method for pb::RemoveRequest {
    type Response = pb::RemoveResponse;
    const NAME: &'static str = "Remove";
    fn key(&self) -> &str {
        &self.key
    }
    fn request_id(&self) -> Option<pb::RequestId> {
        self.request_id
    }
    fn check(&self) -> Result<Action, Status> {
        check_write(&self.key, &self.request_id, Ok(Op::Remove))
    }
    fn respond(key: &str, outcome: Outcome) -> Result<Self::Response, Status> {
        match wrote(outcome)? {
            Reply::Removed { previous } => Ok(pb::RemoveResponse { previous }),
            other => Err(reply_status(key, other)),
        }
    }
    forwarded_as!(Remove);
}

impl Method for pb::UpdateRequest {
    type Response = pb::UpdateResponse;
    const NAME: &'static str = "Update";
    fn key(&self) -> &str {
        &self.key
    }
    fn request_id(&self) -> Option<pb::RequestId> {
        self.request_id
    }
    fn check(&self) -> Result<Action, Status> {
        let op = validate_value(self.value).map(Op::Update);
        check_write(&self.key, &self.request_id, op)
    }
    fn respond(key: &str, outcome: Outcome) -> Result<Self::Response, Status> {
        match wrote(outcome)? {
            Reply::Updated { previous } => Ok(pb::UpdateResponse { previous }),
            other => Err(reply_status(key, other)),
        }
    }
    forwarded_as!(Update);
}

impl Method for pb::UpsertRequest {
    type Response = pb::UpsertResponse;
    const NAME: &'static str = "Upsert";
    fn key(&self) -> &str {
        &self.key
    }
    fn request_id(&self) -> Option<pb::RequestId> {
        self.request_id
    }
    fn check(&self) -> Result<Action, Status> {
        let op = validate_value(self.value).map(Op::Upsert);
        check_write(&self.key, &self.request_id, op)
    }
    fn respond(key: &str, outcome: Outcome) -> Result<Self::Response, Status> {
        match wrote(outcome)? {
            Reply::Inserted => Ok(pb::UpsertResponse { inserted: true }),
            Reply::Updated { .. } => Ok(pb::UpsertResponse { inserted: false }),
            other => Err(reply_status(key, other)),
        }
    }
    forwarded_as!(Upsert);
}

/// What a call carries besides its message.
#[derive(Clone, Copy, Debug)]
struct CallMeta {
    deadline: Instant,
    /// Times the call has been forwarded to get here.
    hops: u32,
}

impl CallMeta {
    /// A client's own call, on the client port: its deadline, and no hops
    /// whatever headers it sent (a client cannot spend the hop budget).
    fn of_client<T>(request: &Request<T>) -> Self {
        CallMeta {
            deadline: deadline_of(request),
            hops: 0,
        }
    }

    /// A call another replica forwarded (`Paxos/Forward`): its deadline,
    /// and its hop count, at least one (it has been forwarded).
    fn of_forwarded(call: &pb::ForwardedCall) -> Self {
        CallMeta {
            deadline: Instant::now() + answer_within(Duration::from_micros(call.timeout_micros)),
            hops: call.hops.max(1),
        }
    }
}

/// When a call must be answered here: its `grpc-timeout` (or
/// [`DEFAULT_DEADLINE`]) less a margin.
fn deadline_of<T>(request: &Request<T>) -> Instant {
    let timeout = request
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .unwrap_or(DEFAULT_DEADLINE);
    Instant::now() + answer_within(timeout)
}

/// How long a call may take here: its deadline less a margin, so that a call
/// that cannot finish gets this replica's reason (and a forwarding follower
/// gets the leader's) before the caller's own timer fires and hides it.
fn answer_within(timeout: Duration) -> Duration {
    let margin = (timeout / 10).min(Duration::from_millis(250));
    timeout - margin
}

/// Parses gRPC's `grpc-timeout` header: digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Why a replica itself answered UNAVAILABLE. It travels in the status's
/// metadata under [`REASON`], so that a forwarding replica (or any client)
/// tells "the leader answered UNAVAILABLE on purpose" from "the leader could
/// not be reached" without reading the message, which is for people.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unavailable {
    /// No leader was known within the call's deadline.
    NoLeader,
    /// The leader could not get a quorum to confirm the call in time.
    NoQuorum,
    /// The replica is stopping and takes no more calls.
    ShuttingDown,
    /// The leader changed while the write was in flight, and whether its
    /// slot chose it could not be learned in time.
    OutcomeUnknown,
    /// A write or sync to the replica's disk failed: it serves nothing
    /// until restarted (ask another replica).
    StorageFailed,
}

impl Unavailable {
    const ALL: [Unavailable; 5] = [
        Unavailable::NoLeader,
        Unavailable::NoQuorum,
        Unavailable::ShuttingDown,
        Unavailable::OutcomeUnknown,
        Unavailable::StorageFailed,
    ];

    /// The value under [`REASON`].
    pub fn as_str(self) -> &'static str {
        match self {
            Unavailable::NoLeader => "no-leader",
            Unavailable::NoQuorum => "no-quorum",
            Unavailable::ShuttingDown => "shutting-down",
            Unavailable::OutcomeUnknown => "outcome-unknown",
            Unavailable::StorageFailed => "storage-failed",
        }
    }

    /// An UNAVAILABLE status with `message`, marked with this reason.
    pub fn status(self, message: impl Into<String>) -> Status {
        let mut status = Status::unavailable(message);
        status
            .metadata_mut()
            .insert(REASON, MetadataValue::from_static(self.as_str()));
        status
    }

    /// The reason a replica marked `status` with, if it is an UNAVAILABLE
    /// that a replica gave on purpose.
    pub fn of(status: &Status) -> Option<Unavailable> {
        if status.code() != Code::Unavailable {
            return None;
        }
        let value = status.metadata().get(REASON)?.to_str().ok()?;
        Unavailable::ALL.into_iter().find(|r| r.as_str() == value)
    }
}

/// Why a node answered [`NodeError::Stopped`]: it is shutting down, or its
/// storage failed.
pub fn stopped(node: &NodeHandle) -> Status {
    match node.failure() {
        Some(why) => Unavailable::StorageFailed.status(format!(
            "replica {}'s storage failed ({why}); it serves nothing until restarted: ask another replica",
            node.id()
        )),
        None => Unavailable::ShuttingDown.status("replica is shutting down"),
    }
}

/// Whether a forwarded call's failure means the leader may be gone, so that
/// looking for the leader again is worth it: it could not be reached (an
/// UNAVAILABLE no replica marked), or it is shutting down or failed. A leader that
/// answered "no leader" or "no quorum" did so at the call's deadline; there
/// is no time left to try again.
fn leader_may_be_gone(status: &Status) -> bool {
    status.code() == Code::Unavailable
        && matches!(
            Unavailable::of(status),
            None | Some(Unavailable::ShuttingDown | Unavailable::StorageFailed)
        )
}

/// The status of a call that ran out of time; `leader` describes the
/// leader known, by its client address ([`Directory::describe`]).
fn unavailable_at_deadline(leader: Option<String>) -> Status {
    match leader {
        None => Unavailable::NoLeader
            .status("no leader: no quorum elected one within the call's deadline"),
        Some(l) => Unavailable::NoQuorum.status(format!(
            "no quorum confirmed the call within its deadline (leader is {l}); a write may or may not have taken effect, retry it with the same request_id"
        )),
    }
}

/// A write without a request id whose leader stepped down while its slot
/// was undecided, and whose outcome this replica could not learn in time.
fn outcome_unknown() -> Status {
    Unavailable::OutcomeUnknown.status(
        "the leader changed while the write was in flight and its outcome could not be learned; it may or may not have taken effect (send a request_id to make retries safe)",
    )
}

// ----- validation -----------------------------------------------------------

/// Checks a key against the contract; the error names the field.
pub fn validate_key(key: &str) -> Result<(), Status> {
    if key.is_empty() {
        return Err(Status::invalid_argument("key must not be empty"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(Status::invalid_argument(format!(
            "key is {} bytes long; at most {MAX_KEY_BYTES} are allowed",
            key.len()
        )));
    }
    Ok(())
}

fn validate_value(value: Option<i32>) -> Result<i32, Status> {
    value.ok_or_else(|| Status::invalid_argument("value is required"))
}

/// Checks a write's request id against the contract; the error names the
/// field.
pub fn validate_request_id(id: &Option<pb::RequestId>) -> Result<(), Status> {
    match id {
        Some(r) if r.client_id == 0 => Err(Status::invalid_argument(
            "request_id.client_id must not be 0",
        )),
        Some(r) if r.sequence == 0 => Err(Status::invalid_argument(
            "request_id.sequence must be at least 1",
        )),
        _ => Ok(()),
    }
}

/// Turns a reply of the state machine into the contract's status, or the
/// given success.
fn reply_status(key: &str, reply: Reply) -> Status {
    match reply {
        Reply::AlreadyExists => Status::already_exists(format!("key {key:?} already exists")),
        Reply::NotFound => Status::not_found(format!("key {key:?} not found")),
        Reply::Stale { last } => Status::failed_precondition(format!(
            "request_id.sequence is older than {last}, the last one applied for this client_id"
        )),
        Reply::SessionExpired => Status::failed_precondition(
            "the session of request_id.client_id has expired (or was never opened): this \
             write was not applied, but an earlier attempt of it may have been; open a new \
             session (OpenSession) and use its client_id, with sequences from 1",
        ),
        Reply::SessionNotOpened => {
            Status::aborted("no session could be opened in this log slot; try again")
        }
        other => Status::internal(format!("unexpected reply {other:?}")),
    }
}

/// The answer of the wrong shape for a call: a bug, not a user error.
fn mismatch() -> Status {
    Status::internal("internal error: answer does not match the call")
}

/// Counts a client's call by method and status code, and times it.
async fn observed<T>(
    method: &'static str,
    call: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    let started = Instant::now();
    let result = call.await;
    let code = match &result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    };
    metrics::counter!(m::REQUESTS, "method" => method, "code" => format!("{code:?}")).increment(1);
    metrics::histogram!(m::REQUEST_DURATION, "method" => method)
        .record(started.elapsed().as_secs_f64());
    result
}

#[tonic::async_trait]
impl pb::kv_store_server::KvStore for KvService {
    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        self.handle(request).await
    }

    async fn insert(
        &self,
        request: Request<pb::InsertRequest>,
    ) -> Result<Response<pb::InsertResponse>, Status> {
        self.handle(request).await
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveRequest>,
    ) -> Result<Response<pb::RemoveResponse>, Status> {
        self.handle(request).await
    }

    async fn update(
        &self,
        request: Request<pb::UpdateRequest>,
    ) -> Result<Response<pb::UpdateResponse>, Status> {
        self.handle(request).await
    }

    async fn upsert(
        &self,
        request: Request<pb::UpsertRequest>,
    ) -> Result<Response<pb::UpsertResponse>, Status> {
        self.handle(request).await
    }

    async fn open_session(
        &self,
        request: Request<pb::OpenSessionRequest>,
    ) -> Result<Response<pb::OpenSessionResponse>, Status> {
        self.handle(request).await
    }
}

impl Forwarded for KvService {
    fn forwarded(
        self: Arc<Self>,
        from: NodeId,
        calls: tonic::Streaming<pb::ForwardBatch>,
        shutdown: Option<watch::Receiver<bool>>,
    ) -> ForwardAnswerStream {
        forwarder::serve_stream(from, calls, shutdown, move |call| {
            let service = Arc::clone(&self);
            async move { service.serve_forwarded(call).await }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked_against_the_contract() {
        assert!(validate_key("k").is_ok());
        assert!(validate_key(&"x".repeat(1024)).is_ok());
        let empty = validate_key("").unwrap_err();
        assert_eq!(empty.code(), Code::InvalidArgument);
        assert!(empty.message().contains("key"));
        let long = validate_key(&"x".repeat(1025)).unwrap_err();
        assert_eq!(long.code(), Code::InvalidArgument);
        assert!(long.message().contains("1025"));
    }

    #[test]
    fn a_missing_value_and_a_zero_request_id_are_refused_by_name() {
        assert_eq!(
            validate_value(None).unwrap_err().message(),
            "value is required"
        );
        let id = Some(pb::RequestId {
            client_id: 0,
            sequence: 1,
        });
        assert!(
            validate_request_id(&id)
                .unwrap_err()
                .message()
                .contains("client_id")
        );
        let id = Some(pb::RequestId {
            client_id: 3,
            sequence: 0,
        });
        assert!(
            validate_request_id(&id)
                .unwrap_err()
                .message()
                .contains("sequence")
        );
    }

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("10x"), None);
    }

    /// `status` as a client receives it: through the HTTP/2 headers.
    fn over_the_wire(status: &Status) -> Status {
        let mut headers = tonic::codegen::http::HeaderMap::new();
        status.add_header(&mut headers).expect("encode status");
        Status::from_header_map(&headers).expect("decode status")
    }

    #[test]
    fn a_replicas_own_unavailable_is_marked_and_survives_the_wire() {
        for (status, want) in [
            (unavailable_at_deadline(None), Unavailable::NoLeader),
            (
                unavailable_at_deadline(Some("replica 2".into())),
                Unavailable::NoQuorum,
            ),
            (
                Unavailable::ShuttingDown.status("replica is shutting down"),
                Unavailable::ShuttingDown,
            ),
        ] {
            assert_eq!(status.code(), Code::Unavailable);
            let received = over_the_wire(&status);
            assert_eq!(Unavailable::of(&received), Some(want), "{status:?}");
            assert_eq!(
                received
                    .metadata()
                    .get(REASON)
                    .and_then(|v| v.to_str().ok()),
                Some(want.as_str())
            );
        }
    }

    #[test]
    fn unreachable_is_told_from_answered_by_the_marker_not_the_message() {
        // Not reached: whatever the message says, even if it reads like ours.
        for message in [
            "dns error",
            "tcp connect error",
            "no route to host",
            "no leader",
        ] {
            let status = over_the_wire(&Status::unavailable(message));
            assert_eq!(Unavailable::of(&status), None, "{message}");
            assert!(leader_may_be_gone(&status), "{message}");
        }
        // Answered on purpose: whatever the message says.
        for reason in [
            Unavailable::NoLeader,
            Unavailable::NoQuorum,
            Unavailable::OutcomeUnknown,
        ] {
            let status = over_the_wire(&reason.status("the leader gave up"));
            assert!(!leader_may_be_gone(&status), "{reason:?}");
        }
        // A leader that is stopping: look for the next one.
        let stopping = over_the_wire(&Unavailable::ShuttingDown.status("bye"));
        assert!(leader_may_be_gone(&stopping));
        // Only UNAVAILABLE counts, marked or not; an unknown reason is no
        // reason.
        assert!(!leader_may_be_gone(&Status::not_found("no such key")));
        let mut odd = Status::internal("boom");
        odd.metadata_mut()
            .insert(REASON, MetadataValue::from_static("no-quorum"));
        assert_eq!(Unavailable::of(&odd), None);
        let mut unknown = Status::unavailable("?");
        unknown
            .metadata_mut()
            .insert(REASON, MetadataValue::from_static("some-future-reason"));
        assert_eq!(Unavailable::of(&unknown), None);
    }

    #[test]
    fn only_a_forwarded_call_counts_hops() {
        let mut request = Request::new(pb::GetRequest { key: "k".into() });
        request.set_timeout(Duration::from_secs(2));
        // A client's own call has spent no hops, whatever it sends.
        assert_eq!(CallMeta::of_client(&request).hops, 0);
        let call = pb::ForwardedCall {
            id: 1,
            call: None,
            timeout_micros: 2_000_000,
            hops: 2,
        };
        assert_eq!(CallMeta::of_forwarded(&call).hops, 2);
        // A forwarded call has been forwarded once at least.
        let bare = pb::ForwardedCall {
            hops: 0,
            ..call.clone()
        };
        assert_eq!(CallMeta::of_forwarded(&bare).hops, 1);
        // The deadline travels, less the margin.
        let left = CallMeta::of_forwarded(&call)
            .deadline
            .saturating_duration_since(Instant::now());
        assert!(left <= Duration::from_millis(1800) && left > Duration::from_millis(1500));
    }

    #[test]
    fn a_forward_carries_each_call_and_answer_of_its_own_kind() {
        let insert = pb::InsertRequest {
            key: "k".into(),
            value: Some(3),
            request_id: None,
        };
        assert!(matches!(insert.clone().into_call(), Call::Insert(c) if c == insert));
        let answer = pb::InsertRequest::answer(pb::InsertResponse {});
        assert_eq!(
            pb::InsertRequest::from_answer(answer),
            Some(pb::InsertResponse {})
        );
        // An answer of another kind is no answer: the caller reports a
        // mismatch rather than a wrong reply.
        assert_eq!(pb::UpsertRequest::from_answer(answer), None);
        let got = pb::GetRequest::from_answer(pb::RemoveRequest::answer(pb::RemoveResponse {
            previous: 1,
        }));
        assert_eq!(got, None);
    }

    #[test]
    fn a_call_is_answered_before_its_callers_deadline() {
        assert_eq!(
            answer_within(Duration::from_secs(2)),
            Duration::from_millis(1800)
        );
        assert_eq!(
            answer_within(Duration::from_secs(30)),
            Duration::from_millis(29_750)
        );
        assert_eq!(answer_within(Duration::ZERO), Duration::ZERO);
    }
}
