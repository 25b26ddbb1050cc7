//! Both ends of `Paxos/Forward`, over gRPC.
//!
//! The follower's end, [`Links`]: a task per leader owns a
//! [`crate::forwarding::Link`] and one long-lived stream to that leader's peer
//! port. Calls submitted while a batch is on its way queue up and go
//! together in the next; answers come back as the leader finishes them,
//! in any order, and are matched to their callers by the link. When the
//! stream breaks, the link says of each open call whether it had been
//! sent, and its caller is told so ([`lost_status`]).
//!
//! The leader's end, [`serve_stream`]: the calls of one stream run
//! concurrently, each its own task so that a cancellation aborts exactly
//! one; answers that finish together go back in one message.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{AbortHandle, JoinSet};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{KeyAndValueRef, MetadataKey, MetadataMap, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Request, Status, Streaming};
use tracing::{debug, warn};

use crate::certainty::Certainty;
use crate::directory::Directory;
use crate::forwarding::{DEFAULT_LIMIT, Link, Lost};
use crate::metrics as m;
use crate::paxos::NodeId;
use crate::pb;
use crate::pb::paxos_client::PaxosClient;
use crate::transport::{ForwardAnswerStream, shutting_down};

/// How long opening a stream to the leader may take before the calls
/// waiting for it are told it failed.
const OPEN_TIMEOUT: Duration = Duration::from_secs(2);

/// Batches on their way to the leader, per stream: while these are
/// unsent, calls gather for the next one.
const BATCHES_AHEAD: usize = 4;

/// How often a link looks for callers that have gone.
const SWEEP: Duration = Duration::from_millis(100);

/// Calls one stream may have running on the leader at once; past it, a
/// call is refused (a follower's own link holds at most
/// [`DEFAULT_LIMIT`]).
const MAX_RUNNING_PER_STREAM: usize = 2 * DEFAULT_LIMIT;

/// What a forwarded call's caller gets: the leader's reply, or the status
/// its KvStore gave (or the link's, if the stream failed).
pub type Answer = Result<pb::ForwardResponse, Status>;

/// One call for a link task.
struct Submit {
    call: pb::ForwardedCall,
    reply: oneshot::Sender<Answer>,
}

/// The follower's forwarding links, one task and stream per leader,
/// started on first use.
pub struct Links {
    directory: Arc<Directory>,
    tasks: Mutex<BTreeMap<NodeId, mpsc::Sender<Submit>>>,
}

impl Links {
    /// Links to the replicas `directory` lists, dialled as it says.
    pub fn new(directory: Arc<Directory>) -> Self {
        Links {
            directory,
            tasks: Mutex::new(BTreeMap::new()),
        }
    }

    /// Forwards `call` to `leader`, with `left` of its deadline and its hop
    /// count, and waits (at most `left`) for the answer.
    pub async fn call(
        &self,
        leader: NodeId,
        call: pb::ForwardRequest,
        left: Duration,
        hops: u32,
    ) -> Answer {
        let (reply, answer) = oneshot::channel();
        let submit = Submit {
            call: pb::ForwardedCall {
                id: 0, // the link numbers it
                call: Some(call),
                timeout_micros: u64::try_from(left.as_micros()).unwrap_or(u64::MAX),
                hops,
            },
            reply,
        };
        self.task(leader)?.try_send(submit).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => full(leader, DEFAULT_LIMIT),
            mpsc::error::TrySendError::Closed(_) => {
                Certainty::NotProposed.mark(Status::unavailable(format!(
                    "the forwarding link to replica {leader} has stopped"
                )))
            }
        })?;
        match tokio::time::timeout(left, answer).await {
            Ok(Ok(answer)) => answer,
            // The task ended without answering: only when the service is
            // going away.
            Ok(Err(_)) => Err(Status::unavailable(format!(
                "the forwarding link to replica {leader} stopped with the call open"
            ))),
            // Dropping `answer` cancels the call: the link forgets it and
            // tells the leader.
            Err(_) => Err(Status::deadline_exceeded(format!(
                "replica {leader} (the leader) did not answer within the call's deadline"
            ))),
        }
    }

    /// The task for `leader`, started if there is none (or it ended).
    fn task(&self, leader: NodeId) -> Result<mpsc::Sender<Submit>, Status> {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = tasks.get(&leader).filter(|tx| !tx.is_closed()) {
            return Ok(tx.clone());
        }
        let addr = self
            .directory
            .peer_address(leader)
            .ok_or_else(|| Status::internal(format!("leader {leader} is not in the peer list")))?;
        // `paxoskv serve` refuses bad peer addresses at start; this is for
        // a server assembled some other way.
        let channel = self
            .directory
            .dialer()
            .endpoint(addr)
            .map_err(|e| Status::internal(format!("replica {leader}: {e}")))?
            .connect_lazy();
        // Room for every call the link holds, so that a full link, not a
        // full channel, is what refuses.
        let (tx, rx) = mpsc::channel(DEFAULT_LIMIT);
        tokio::spawn(run_link(
            leader,
            PaxosClient::new(channel),
            Arc::clone(&self.directory),
            rx,
        ));
        tasks.insert(leader, tx.clone());
        Ok(tx)
    }
}

type Caller = oneshot::Sender<Answer>;

/// The task of one link: takes calls, sends them in batches when the stream
/// has room, hands answers to their callers, and ends every open call when
/// the stream breaks. Ends when every [`Links`] sender is gone.
async fn run_link(
    leader: NodeId,
    client: PaxosClient<Channel>,
    directory: Arc<Directory>,
    mut inputs: mpsc::Receiver<Submit>,
) {
    let mut link: Link<Caller, pb::ForwardedCall> = Link::new(DEFAULT_LIMIT);
    // The open stream: where batches go, and where answers come from.
    let mut batches: Option<mpsc::Sender<pb::ForwardBatch>> = None;
    let mut answers: Option<Streaming<pb::ForwardAnswers>> = None;
    let mut sweep = tokio::time::interval(SWEEP);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if link.has_batch() && batches.is_none() {
            match open(leader, client.clone(), &directory).await {
                Ok((tx, rx)) => (batches, answers) = (Some(tx), Some(rx)),
                Err(status) => lose_all(&mut link, leader, &status),
            }
        }
        let ready_to_send = link.has_batch() && batches.is_some();
        // The stream failed, and why (handled once the select's futures,
        // which borrow it, are gone).
        let broke: Option<Status> = tokio::select! {
            input = inputs.recv() => {
                let Some(first) = input else { break };
                accept(&mut link, leader, first);
                // Everything that arrived meanwhile goes in the same batch.
                while let Ok(more) = inputs.try_recv() {
                    accept(&mut link, leader, more);
                }
                None
            }
            permit = reserve(&batches), if ready_to_send => match permit {
                Some(permit) => {
                    if let Some(batch) = link.take_batch() {
                        metrics::histogram!(m::FORWARD_BATCH).record(batch.calls.len() as f64);
                        permit.send(pb::ForwardBatch {
                            calls: batch
                                .calls
                                .into_iter()
                                .map(|(id, call)| pb::ForwardedCall { id, ..call })
                                .collect(),
                            cancelled: batch.cancelled,
                        });
                    }
                    None
                }
                None => Some(Status::unavailable("the stream closed")),
            },
            message = next_answers(&mut answers) => match message {
                Ok(message) => {
                    for answer in message.answers {
                        if let Some(caller) = link.answered(answer.id) {
                            let _ = caller.send(decode_answer(answer.result));
                        }
                    }
                    None
                }
                Err(status) => Some(status),
            },
            _ = sweep.tick() => {
                link.retain(|caller| !caller.is_closed());
                None
            }
        };
        if let Some(status) = broke {
            (batches, answers) = (None, None);
            lose_all(&mut link, leader, &status);
        }
    }
    // The service is gone; so are its callers.
    lose_all(
        &mut link,
        leader,
        &Status::unavailable("the replica is stopping"),
    );
}

/// Takes one call into the link, or refuses it at once if the link is full.
fn accept(link: &mut Link<Caller, pb::ForwardedCall>, leader: NodeId, submit: Submit) {
    if submit.reply.is_closed() {
        return; // its caller has gone already
    }
    if let Err(refused) = link.submit(submit.reply, submit.call) {
        let _ = refused.caller.send(Err(full(leader, refused.limit)));
    }
}

/// Room for one batch on the open stream; `None` if it has closed.
async fn reserve(
    batches: &Option<mpsc::Sender<pb::ForwardBatch>>,
) -> Option<mpsc::Permit<'_, pb::ForwardBatch>> {
    match batches {
        Some(tx) => tx.reserve().await.ok(),
        None => std::future::pending().await,
    }
}

/// The next message of answers on the open stream (never, without one); an
/// error once the stream has ended.
async fn next_answers(
    answers: &mut Option<Streaming<pb::ForwardAnswers>>,
) -> Result<pb::ForwardAnswers, Status> {
    match answers {
        Some(rx) => match rx.message().await {
            Ok(Some(answers)) => Ok(answers),
            Ok(None) => Err(Status::unavailable("the leader ended the stream")),
            Err(status) => Err(status),
        },
        None => std::future::pending().await,
    }
}

/// Opens a forwarding stream to `leader`'s peer port: where batches go,
/// and where answers come from.
async fn open(
    leader: NodeId,
    mut client: PaxosClient<Channel>,
    directory: &Directory,
) -> Result<
    (
        mpsc::Sender<pb::ForwardBatch>,
        Streaming<pb::ForwardAnswers>,
    ),
    Status,
> {
    let (batches, outgoing) = mpsc::channel(BATCHES_AHEAD);
    let mut request = Request::new(ReceiverStream::new(outgoing));
    // The leader's peer port admits only replicas of its cluster.
    directory.introduce(request.metadata_mut());
    let answers = match tokio::time::timeout(OPEN_TIMEOUT, client.forward(request)).await {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(status)) => return Err(status),
        Err(_) => {
            return Err(Status::unavailable(format!(
                "opening a forwarding stream to replica {leader} took over {OPEN_TIMEOUT:?}"
            )));
        }
    };
    debug!(leader, "forwarding stream open");
    Ok((batches, answers))
}

/// The stream to `leader` failed with `why`: every open call ends, told
/// whether it had been sent.
fn lose_all(link: &mut Link<Caller, pb::ForwardedCall>, leader: NodeId, why: &Status) {
    let lost = link.broken();
    if lost.is_empty() {
        return;
    }
    warn!(leader, calls = lost.len(), reason = %why.message(), "forwarding stream to the leader broke");
    for (caller, how) in lost {
        let label = match how {
            Lost::Unsent => "unsent",
            Lost::InFlight => "in_flight",
        };
        metrics::counter!(m::FORWARD_LOST, "lost" => label).increment(1);
        let _ = caller.send(Err(lost_status(leader, how, why)));
    }
}

/// What the caller of a call lost with its stream is told: `UNAVAILABLE`
/// with no reason of the leader's (so the service looks for the leader
/// again), certainly not proposed only if it was never sent.
pub fn lost_status(leader: NodeId, how: Lost, why: &Status) -> Status {
    match how {
        Lost::Unsent => Certainty::NotProposed.mark(Status::unavailable(format!(
            "the stream to replica {leader} (the leader) failed before the call was sent: {}",
            why.message()
        ))),
        Lost::InFlight => Status::unavailable(format!(
            "the stream to replica {leader} (the leader) broke while the call was in flight: {}",
            why.message()
        )),
    }
}

/// A forwarded call refused at once: `limit` calls already wait for the
/// leader on this replica's link.
fn full(leader: NodeId, limit: usize) -> Status {
    metrics::counter!(m::REFUSED_BUSY, "what" => "calls forwarded to the leader").increment(1);
    Certainty::NotProposed.mark(Status::resource_exhausted(format!(
        "{limit} calls already wait to be forwarded to replica {leader} (the leader), \
         the most a replica holds; nothing was proposed, retry after a backoff"
    )))
}

// ----- the leader's end ------------------------------------------------------

/// Serves the calls replica `from` sends on `calls`: each runs `serve` in a
/// task of its own; a cancelled one is aborted; answers that finish
/// together go back in one message. Ends once `calls` has ended and every
/// call has been answered, when `calls` fails (the forwarding replica is
/// gone, and its callers with it), or on `shutdown`.
pub fn serve_stream<F, Fut>(
    from: NodeId,
    mut calls: Streaming<pb::ForwardBatch>,
    shutdown: Option<watch::Receiver<bool>>,
    serve: F,
) -> ForwardAnswerStream
where
    F: Fn(pb::ForwardedCall) -> Fut + Send + 'static,
    Fut: Future<Output = Answer> + Send + 'static,
{
    let (answers, outgoing) = mpsc::channel(BATCHES_AHEAD);
    tokio::spawn(async move {
        let mut running: JoinSet<(u64, Answer)> = JoinSet::new();
        let mut by_id: HashMap<u64, AbortHandle> = HashMap::new();
        let stop = shutting_down(shutdown);
        tokio::pin!(stop);
        // Whether the forwarding replica may still send calls.
        let mut sending = true;
        loop {
            if !sending && running.is_empty() {
                break;
            }
            tokio::select! {
                () = &mut stop => break,
                batch = calls.message(), if sending => {
                    let batch = match batch {
                        Ok(Some(batch)) => batch,
                        // No more calls; those running still get answers.
                        Ok(None) => {
                            sending = false;
                            continue;
                        }
                        Err(status) => {
                            debug!(peer = from, %status, "forwarding stream ended");
                            break;
                        }
                    };
                    for id in batch.cancelled {
                        if let Some(task) = by_id.remove(&id) {
                            task.abort();
                        }
                    }
                    let mut refused = Vec::new();
                    for call in batch.calls {
                        let id = call.id;
                        if by_id.contains_key(&id) {
                            // Answering would reach the first call's caller.
                            debug!(peer = from, id, "a second call with a running call's id: ignored");
                        } else if by_id.len() >= MAX_RUNNING_PER_STREAM {
                            refused.push(encode_answer(id, Err(Certainty::NotProposed.mark(
                                Status::resource_exhausted(format!(
                                    "{MAX_RUNNING_PER_STREAM} forwarded calls of replica {from} already run on the leader, the most one stream may have; nothing was proposed"
                                )),
                            ))));
                        } else {
                            let work = serve(call);
                            let task = running.spawn(async move { (id, work.await) });
                            by_id.insert(id, task);
                        }
                    }
                    if !refused.is_empty()
                        && answers.send(Ok(pb::ForwardAnswers { answers: refused })).await.is_err()
                    {
                        break;
                    }
                }
                Some(done) = running.join_next(), if !running.is_empty() => {
                    let mut ready = Vec::new();
                    let mut finished = Some(done);
                    while let Some(done) = finished {
                        match done {
                            Ok((id, answer)) => {
                                by_id.remove(&id);
                                ready.push(encode_answer(id, answer));
                            }
                            // Aborted (cancelled): nobody waits for it.
                            Err(e) if e.is_cancelled() => {}
                            Err(e) => warn!(peer = from, error = %e, "a forwarded call's task failed"),
                        }
                        finished = running.try_join_next();
                    }
                    if !ready.is_empty()
                        && answers.send(Ok(pb::ForwardAnswers { answers: ready })).await.is_err()
                    {
                        break;
                    }
                }
            }
        }
        // Whatever still runs has lost its caller.
        running.abort_all();
    });
    ReceiverStream::new(outgoing)
}

// ----- statuses on the wire --------------------------------------------------

/// One call's answer as the stream carries it.
fn encode_answer(id: u64, answer: Answer) -> pb::ForwardAnswer {
    use pb::forward_answer::Result as R;
    pb::ForwardAnswer {
        id,
        result: Some(match answer {
            Ok(reply) => R::Reply(reply),
            Err(status) => R::Status(encode_status(&status)),
        }),
    }
}

/// A call's answer from the stream.
fn decode_answer(result: Option<pb::forward_answer::Result>) -> Answer {
    use pb::forward_answer::Result as R;
    match result {
        Some(R::Reply(reply)) => Ok(reply),
        Some(R::Status(status)) => Err(decode_status(status)),
        None => Err(Status::internal(
            "the leader's answer to a forwarded call held neither a reply nor a status",
        )),
    }
}

/// A status with its code, message, details (the certainty) and ASCII
/// metadata (the reason), as a forwarding stream carries it.
pub fn encode_status(status: &Status) -> pb::CallStatus {
    let metadata = status
        .metadata()
        .iter()
        .filter_map(|entry| match entry {
            KeyAndValueRef::Ascii(key, value) => Some(pb::StatusMetadata {
                key: key.as_str().to_string(),
                value: value.to_str().ok()?.to_string(),
            }),
            KeyAndValueRef::Binary(..) => None,
        })
        .collect();
    pb::CallStatus {
        code: status.code() as i32,
        message: status.message().to_string(),
        details: status.details().to_vec(),
        metadata,
    }
}

/// The status [`encode_status`] encoded. Metadata that is not valid gRPC
/// ASCII metadata is dropped; an unknown code becomes `UNKNOWN`.
pub fn decode_status(status: pb::CallStatus) -> Status {
    let mut metadata = MetadataMap::new();
    for entry in status.metadata {
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(entry.key.as_bytes()),
            MetadataValue::try_from(entry.value.as_str()),
        ) {
            metadata.insert(key, value);
        }
    }
    Status::with_details_and_metadata(
        Code::from_i32(status.code),
        status.message,
        status.details.into(),
        metadata,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::{REASON, Unavailable};

    #[test]
    fn a_status_crosses_the_stream_with_its_certainty_and_reason() {
        let sent = Certainty::NotProposed.mark(Unavailable::NoLeader.status("no leader"));
        let got = decode_status(encode_status(&sent));
        assert_eq!(got.code(), Code::Unavailable);
        assert_eq!(got.message(), "no leader");
        assert_eq!(Certainty::of(&got), Some(Certainty::NotProposed));
        assert_eq!(Unavailable::of(&got), Some(Unavailable::NoLeader));
        assert!(got.metadata().get(REASON).is_some());
        let plain = decode_status(encode_status(&Status::not_found("key \"k\" not found")));
        assert_eq!(plain.code(), Code::NotFound);
        assert_eq!(Certainty::of(&plain), None);
    }

    #[test]
    fn a_damaged_status_decodes_to_something_safe() {
        let got = decode_status(pb::CallStatus {
            code: 999,
            message: "m".into(),
            details: vec![0xff, 0x00],
            metadata: vec![pb::StatusMetadata {
                key: "bad key\n".into(),
                value: "v".into(),
            }],
        });
        assert_eq!(got.code(), Code::Unknown);
        assert_eq!(Certainty::of(&got), None, "garbage details prove nothing");
        assert!(got.metadata().is_empty());
    }

    #[test]
    fn a_lost_call_is_certain_only_if_it_was_never_sent() {
        let why = Status::unavailable("connection reset");
        let unsent = lost_status(2, Lost::Unsent, &why);
        let in_flight = lost_status(2, Lost::InFlight, &why);
        assert_eq!(Certainty::of(&unsent), Some(Certainty::NotProposed));
        assert_eq!(Certainty::of(&in_flight), None);
        for status in [unsent, in_flight] {
            assert_eq!(status.code(), Code::Unavailable);
            // No reason of the leader's: the service looks for it again.
            assert_eq!(Unavailable::of(&status), None);
            assert!(status.message().contains("connection reset"));
        }
    }
}
