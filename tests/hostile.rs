//! Hostile input, property-tested with proptest: arbitrary bytes decoded as
//! Paxos messages and as client requests, and arbitrary (decoded) Paxos
//! messages fed to replicas of a live cluster, between honest traffic.
//!
//! What must hold, whatever arrives:
//! - nothing panics: not the decoders, not the core, not the state machine;
//! - a refused message changes nothing: nothing to send or persist, the
//!   same status;
//! - per replica, the protocol's invariants: the promised ballot never
//!   goes down; a vote, once cast for a slot under a ballot, is never
//!   replaced by another value under that ballot; the commit index never
//!   goes down, and a slot handed out as chosen is handed out once, in
//!   order;
//! - whatever the client API lets into the log, every replica accepts from
//!   its peers: the service's validation is at least as strict as the
//!   core's check of the commands in a value.
//!
//! Numbers are drawn near the edges (0, 1, `u64::MAX`, `u64::MAX - 1`,
//! 2^32) and near the target replica's own ballot round and commit index,
//! so that messages get past the first checks and into the protocol.
//!
//! Cases that once failed are kept in `tests/hostile.proptest-regressions`
//! and run first, every time.
//!
//! Run it longer (the default here is 1,024 cases per property):
//!
//!     PROPTEST_CASES=100000 cargo test --release --test hostile

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;
use proptest::prelude::*;
use prost::Message as _;

use paxoskv::kv::{Command, Op};
use paxoskv::paxos::{
    Accepted, Ballot, Config, Envelope, Message, NodeId, Replica, Restore, Slot, Value,
};
use paxoskv::{pb, service, wire};

const MEMBERS: [NodeId; 3] = [1, 2, 3];

/// "Everything queued", bounded: a forged accept with a consistent (false)
/// commit index can leave a vote far ahead, which a later leader fills
/// with no-ops a window at a time, for as long as anyone delivers (see
/// `src/paxos/replica/admission.rs`, "What these rules cannot catch").
const ALL: usize = 2_000;

// ----- strategies -----------------------------------------------------------

/// A number: literal, or relative to a base known only when the message is
/// sent (the target's ballot round, or its commit index).
#[derive(Clone, Debug)]
enum Num {
    Lit(u64),
    Rel(i64),
}

impl Num {
    fn at(&self, base: u64) -> u64 {
        match *self {
            Num::Lit(x) => x,
            Num::Rel(d) => base.saturating_add_signed(d),
        }
    }
}

/// A slot or index: mostly near the target's commit index.
fn num() -> impl Strategy<Value = Num> {
    prop_oneof![
        4 => (-3i64..=8).prop_map(Num::Rel),
        1 => edge(),
    ]
}

/// A ballot round: mostly the target's own promised round (so that
/// messages impersonate the current leader), or just around it.
fn round() -> impl Strategy<Value = Num> {
    prop_oneof![
        4 => Just(Num::Rel(0)),
        2 => (-2i64..=3).prop_map(Num::Rel),
        1 => edge(),
    ]
}

/// A number at the edges, or anywhere.
fn edge() -> impl Strategy<Value = Num> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        Just(u64::MAX - 1),
        Just(1 << 32),
        Just((1 << 32) + 1),
        any::<u64>(),
    ]
    .prop_map(Num::Lit)
}

/// Whose id a ballot carries.
#[derive(Clone, Debug)]
enum Owner {
    Sender,
    Target,
    Id(NodeId),
}

fn owner() -> impl Strategy<Value = Owner> {
    prop_oneof![
        3 => Just(Owner::Sender),
        2 => Just(Owner::Target),
        1 => prop_oneof![Just(0), 1..=4u32, Just(u32::MAX)].prop_map(Owner::Id),
    ]
}

#[derive(Clone, Debug)]
struct BallotSpec {
    round: Num,
    owner: Owner,
}

fn ballot() -> impl Strategy<Value = BallotSpec> {
    (round(), owner()).prop_map(|(round, owner)| BallotSpec { round, owner })
}

/// A client command as it travels in a value: mostly ones the API makes,
/// sometimes bytes that are not a command at all.
fn command_bytes() -> impl Strategy<Value = Bytes> {
    let command = (
        "[a-c]{0,3}",
        prop_oneof![Just((0u64, 0u64)), (1..4u64, 1..4u64), (0..3u64, 0..3u64)],
        0..6u8,
        any::<i32>(),
    )
        .prop_map(|(key, (client_id, sequence), op, v)| {
            let op = match op {
                0 => Op::Insert(v),
                1 => Op::Update(v),
                2 => Op::Upsert(v),
                3 | 4 => Op::Remove,
                _ => Op::OpenSession,
            };
            Command {
                proposal_id: 0,
                client_id,
                sequence,
                key,
                op,
            }
            .encode()
        });
    prop_oneof![
        4 => command,
        1 => prop::collection::vec(any::<u8>(), 0..12).prop_map(Bytes::from),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        1 => Just(Value::Noop),
        3 => prop::collection::vec(command_bytes(), 0..3).prop_map(Value::Batch),
    ]
}

/// A Paxos message with its numbers still relative.
#[derive(Clone, Debug)]
enum MsgSpec {
    PreVote(BallotSpec),
    PreVoteReply(BallotSpec, bool),
    Prepare(BallotSpec, Num, Option<BallotSpec>),
    Promise {
        ballot: BallotSpec,
        from_slot: Num,
        to_slot: Option<Num>,
        accepted: Vec<(Num, BallotSpec, Value)>,
        snapshot: Num,
    },
    Nack(BallotSpec),
    Accept(BallotSpec, Num, Value, Num),
    Accepted(BallotSpec, Num),
    Heartbeat(BallotSpec, Num, Num),
    HeartbeatAck(BallotSpec, Num, Num),
    CatchUpRequest(BallotSpec, Num, Num, Option<u64>),
    CatchUp {
        ballot: BallotSpec,
        entries: Vec<(Num, Value)>,
        commit: Num,
        more: bool,
        nonce: Option<u64>,
        proposed: Num,
    },
    SnapshotAvailable(BallotSpec, Num),
    Probe(u64),
    ProbeReply(u64, bool),
    TimeoutNow(BallotSpec),
}

fn message() -> impl Strategy<Value = MsgSpec> {
    let nonce = prop::option::of(prop_oneof![Just(0u64), any::<u64>()]);
    prop_oneof![
        1 => ballot().prop_map(MsgSpec::PreVote),
        1 => (ballot(), any::<bool>()).prop_map(|(b, g)| MsgSpec::PreVoteReply(b, g)),
        1 => (ballot(), num(), prop::option::of(ballot()))
            .prop_map(|(b, s, h)| MsgSpec::Prepare(b, s, h)),
        1 => ballot().prop_map(MsgSpec::TimeoutNow),
        1 => (
            ballot(),
            num(),
            prop::option::of(num()),
            prop::collection::vec((num(), ballot(), value()), 0..4),
            num(),
        )
            .prop_map(|(ballot, from_slot, to_slot, accepted, snapshot)| {
                MsgSpec::Promise {
                    ballot,
                    from_slot,
                    to_slot,
                    accepted,
                    snapshot,
                }
            }),
        1 => ballot().prop_map(MsgSpec::Nack),
        3 => (ballot(), num(), value(), num()).prop_map(|(b, s, v, c)| MsgSpec::Accept(b, s, v, c)),
        1 => (ballot(), num()).prop_map(|(b, s)| MsgSpec::Accepted(b, s)),
        2 => (ballot(), num(), num()).prop_map(|(b, c, r)| MsgSpec::Heartbeat(b, c, r)),
        1 => (ballot(), num(), num()).prop_map(|(b, r, c)| MsgSpec::HeartbeatAck(b, r, c)),
        1 => (ballot(), num(), num(), nonce.clone())
            .prop_map(|(b, f, t, n)| MsgSpec::CatchUpRequest(b, f, t, n)),
        2 => (
            ballot(),
            prop::collection::vec((num(), value()), 0..4),
            num(),
            any::<bool>(),
            nonce,
            num(),
        )
            .prop_map(|(ballot, entries, commit, more, nonce, proposed)| {
                MsgSpec::CatchUp {
                    ballot,
                    entries,
                    commit,
                    more,
                    nonce,
                    proposed,
                }
            }),
        1 => (ballot(), num()).prop_map(|(b, i)| MsgSpec::SnapshotAvailable(b, i)),
        1 => any::<u64>().prop_map(MsgSpec::Probe),
        1 => (any::<u64>(), any::<bool>()).prop_map(|(n, f)| MsgSpec::ProbeReply(n, f)),
    ]
}

/// What the numbers of a message are relative to.
#[derive(Clone, Copy)]
struct Bases {
    from: NodeId,
    to: NodeId,
    round: u64,
    slot: Slot,
}

impl BallotSpec {
    fn at(&self, b: Bases) -> Ballot {
        let node = match self.owner {
            Owner::Sender => b.from,
            Owner::Target => b.to,
            Owner::Id(id) => id,
        };
        Ballot::new(self.round.at(b.round), node)
    }
}

impl MsgSpec {
    fn at(&self, b: Bases) -> Message {
        let s = |n: &Num| n.at(b.slot);
        let r = |n: &Num| n.at(0);
        match self {
            MsgSpec::PreVote(x) => Message::PreVote { ballot: x.at(b) },
            MsgSpec::PreVoteReply(x, granted) => Message::PreVoteReply {
                ballot: x.at(b),
                granted: *granted,
            },
            MsgSpec::Prepare(x, from, handed_off_by) => Message::Prepare {
                ballot: x.at(b),
                from_slot: s(from),
                handed_off_by: handed_off_by.as_ref().map(|h| h.at(b)),
            },
            MsgSpec::TimeoutNow(x) => Message::TimeoutNow { ballot: x.at(b) },
            MsgSpec::Promise {
                ballot,
                from_slot,
                to_slot,
                accepted,
                snapshot,
            } => Message::Promise {
                ballot: ballot.at(b),
                from_slot: s(from_slot),
                to_slot: to_slot.as_ref().map(s),
                accepted: accepted
                    .iter()
                    .map(|(slot, ballot, value)| Accepted {
                        slot: s(slot),
                        ballot: ballot.at(b),
                        value: value.clone(),
                    })
                    .collect(),
                snapshot: s(snapshot),
            },
            MsgSpec::Nack(x) => Message::Nack { promised: x.at(b) },
            MsgSpec::Accept(x, slot, value, commit) => Message::Accept {
                ballot: x.at(b),
                slot: s(slot),
                value: value.clone(),
                commit: s(commit),
            },
            MsgSpec::Accepted(x, slot) => Message::Accepted {
                ballot: x.at(b),
                slot: s(slot),
            },
            MsgSpec::Heartbeat(x, commit, round) => Message::Heartbeat {
                ballot: x.at(b),
                commit: s(commit),
                read_round: r(round),
            },
            MsgSpec::HeartbeatAck(x, round, committed) => Message::HeartbeatAck {
                ballot: x.at(b),
                read_round: r(round),
                committed: s(committed),
            },
            MsgSpec::CatchUpRequest(x, from, to, nonce) => Message::CatchUpRequest {
                ballot: x.at(b),
                from_slot: s(from),
                to_slot: s(to),
                nonce: *nonce,
            },
            MsgSpec::CatchUp {
                ballot,
                entries,
                commit,
                more,
                nonce,
                proposed,
            } => Message::CatchUp {
                ballot: ballot.at(b),
                entries: entries
                    .iter()
                    .map(|(slot, v)| (s(slot), v.clone()))
                    .collect(),
                commit: s(commit),
                more: *more,
                nonce: *nonce,
                proposed: s(proposed),
            },
            MsgSpec::SnapshotAvailable(x, index) => Message::SnapshotAvailable {
                ballot: x.at(b),
                index: s(index),
            },
            MsgSpec::Probe(nonce) => Message::Probe { nonce: *nonce },
            MsgSpec::ProbeReply(nonce, fresh) => Message::ProbeReply {
                nonce: *nonce,
                fresh: *fresh,
            },
        }
    }
}

/// Who a message claims to be from: mostly replica 1, the leader.
fn sender() -> impl Strategy<Value = NodeId> {
    prop_oneof![
        4 => Just(1),
        4 => 2..=3u32,
        1 => prop_oneof![Just(0), Just(4), Just(u32::MAX)],
    ]
}

/// One step of a run.
#[derive(Clone, Debug)]
enum Action {
    /// A message from anyone, claiming to be `from`, to replica `to`.
    Hostile {
        to: NodeId,
        from: NodeId,
        msg: MsgSpec,
    },
    /// Delivers this many honest messages, in order.
    Deliver(usize),
    Tick(NodeId),
    /// A client write proposed at a replica (refused unless it leads).
    Propose(NodeId, i32),
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        4 => (1..=3u32, sender(), message())
            .prop_map(|(to, from, msg)| Action::Hostile { to, from, msg }),
        3 => (1..8usize).prop_map(Action::Deliver),
        2 => (1..=3u32).prop_map(Action::Tick),
        1 => (1..=3u32, any::<i32>()).prop_map(|(id, v)| Action::Propose(id, v)),
    ]
}

// ----- a cluster whose every step is checked --------------------------------

/// What each replica has said so far, to hold it to its word.
#[derive(Default)]
struct Seen {
    promised: Ballot,
    committed: Slot,
    votes: BTreeMap<(Slot, Ballot), Value>,
    chosen: BTreeMap<Slot, Value>,
}

/// Three replicas on a lossless in-order network, each checked after every
/// input.
struct Cluster {
    replicas: BTreeMap<NodeId, Replica>,
    queue: VecDeque<(NodeId, Envelope)>,
    seen: BTreeMap<NodeId, Seen>,
}

fn config(id: NodeId) -> Config {
    let mut cfg = Config::new(id, MEMBERS.to_vec());
    cfg.heartbeat_ticks = 2;
    cfg.election_ticks = 10;
    cfg.resend_ticks = 5;
    cfg.catch_up_ticks = 3;
    cfg.window = 4;
    cfg
}

fn write(v: i32) -> Bytes {
    Command {
        proposal_id: 0,
        client_id: 0,
        sequence: 0,
        key: format!("k{}", v.rem_euclid(3)),
        op: Op::Upsert(v),
    }
    .encode()
}

impl Cluster {
    /// A cluster with replica 1 elected and a few writes chosen.
    fn new() -> Result<Cluster, TestCaseError> {
        let replicas = MEMBERS
            .iter()
            .map(|&id| {
                let mut r = Replica::new(config(id), Restore::default()).expect("replica");
                r.check_commands_with(Command::may_enter_log);
                (id, r)
            })
            .collect();
        let mut c = Cluster {
            replicas,
            queue: VecDeque::new(),
            seen: MEMBERS.iter().map(|&id| (id, Seen::default())).collect(),
        };
        for _ in 0..1000 {
            if c.replicas[&1].is_leader() {
                break;
            }
            c.tick(1)?;
            c.deliver(ALL)?;
        }
        prop_assert!(c.replicas[&1].is_leader());
        for v in 0..3 {
            c.propose(1, v)?;
        }
        c.deliver(ALL)?;
        Ok(c)
    }

    fn replica(&mut self, id: NodeId) -> &mut Replica {
        self.replicas.get_mut(&id).expect("member")
    }

    /// Takes replica `id`'s work, checking it against what it said before.
    fn settle(&mut self, id: NodeId) -> Result<(), TestCaseError> {
        let r = self.replicas.get_mut(&id).expect("member");
        let ready = r.take_ready();
        let status = r.status();
        let seen = self.seen.get_mut(&id).expect("member");
        prop_assert!(
            status.promised >= seen.promised,
            "replica {id}'s promise went down from {} to {}",
            seen.promised,
            status.promised
        );
        seen.promised = status.promised;
        for vote in &ready.persist.entries {
            let earlier = seen
                .votes
                .insert((vote.slot, vote.ballot), vote.value.clone());
            prop_assert!(
                earlier.as_ref().is_none_or(|v| *v == vote.value),
                "replica {id} changed its vote for slot {} under {}",
                vote.slot,
                vote.ballot
            );
        }
        for (slot, value) in &ready.chosen {
            prop_assert_eq!(
                *slot,
                seen.committed + 1,
                "replica {} chose out of order",
                id
            );
            prop_assert!(seen.chosen.insert(*slot, value.clone()).is_none());
            seen.committed = *slot;
        }
        prop_assert!(status.committed >= seen.committed);
        seen.committed = status.committed;
        for e in ready.messages.into_iter().chain(ready.persisted_messages) {
            self.queue.push_back((id, e));
        }
        Ok(())
    }

    /// Hands `msg` to replica `to` as if from `from`: either it is heard
    /// (and its work checked), or it is refused and changes nothing.
    fn step(&mut self, to: NodeId, from: NodeId, msg: Message) -> Result<(), TestCaseError> {
        let r = self.replica(to);
        let before = r.status();
        match r.step(from, msg.clone()) {
            Ok(()) => self.settle(to),
            Err(refused) => {
                let ready = r.take_ready();
                prop_assert!(
                    ready.is_empty(),
                    "refused ({refused}) yet did something: {msg:?}"
                );
                prop_assert_eq!(
                    r.status(),
                    before,
                    "refused ({}) yet changed: {:?}",
                    refused,
                    msg
                );
                Ok(())
            }
        }
    }

    /// Delivers up to `n` queued messages.
    fn deliver(&mut self, n: usize) -> Result<(), TestCaseError> {
        for _ in 0..n {
            let Some((from, e)) = self.queue.pop_front() else {
                return Ok(());
            };
            if from == e.to {
                self.replica(from).step_own(e.msg);
                self.settle(from)?;
            } else {
                // An honest message may be refused after hostile ones
                // (say, another value under the ballot a forged accept
                // used): it must change nothing then, as any refusal.
                self.step(e.to, from, e.msg)?;
            }
        }
        Ok(())
    }

    fn tick(&mut self, id: NodeId) -> Result<(), TestCaseError> {
        self.replica(id).tick();
        self.settle(id)
    }

    fn propose(&mut self, id: NodeId, v: i32) -> Result<(), TestCaseError> {
        let _ = self.replica(id).propose(write(v));
        self.settle(id)
    }

    fn bases(&self, from: NodeId, to: NodeId) -> Bases {
        let status = self.replicas[&to].status();
        Bases {
            from,
            to,
            round: status.promised.round,
            slot: status.committed,
        }
    }

    fn run(&mut self, action: &Action) -> Result<(), TestCaseError> {
        match action {
            Action::Hostile { to, from, msg } => {
                let msg = msg.at(self.bases(*from, *to));
                self.step(*to, *from, msg)
            }
            Action::Deliver(n) => self.deliver(*n),
            Action::Tick(id) => self.tick(*id),
            Action::Propose(id, v) => self.propose(*id, *v),
        }
    }
}

// ----- the properties -------------------------------------------------------

/// 1,024 cases per property unless `PROPTEST_CASES` says otherwise (a
/// second or two each, with the test profile's optimisation).
fn cases() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    ProptestConfig::with_cases(cases)
}

proptest! {
    #![proptest_config(cases())]

    /// Arbitrary bytes as a peer message: prost either refuses them or
    /// gives a message that the wire layer converts (and that converts back
    /// to the same) or refuses naming the field; a replica given what
    /// converts never panics, and changes nothing if it refuses it.
    #[test]
    fn arbitrary_bytes_as_a_peer_message(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let Ok(decoded) = pb::PeerMessage::decode(bytes.as_slice()) else {
            return Ok(());
        };
        let Ok((from, msg)) = wire::message_from_pb(decoded) else {
            return Ok(());
        };
        let again = pb::PeerMessage::decode(wire::message_to_pb(from, &msg).encode_to_vec().as_slice())
            .expect("our own encoding decodes");
        prop_assert_eq!(wire::message_from_pb(again), Ok((from, msg.clone())));
        let mut c = Cluster::new()?;
        for to in MEMBERS {
            c.step(to, from, msg.clone())?;
        }
        c.deliver(ALL)?;
    }

    /// A well-formed message, encoded, then damaged (bytes flipped, or cut
    /// short), decoded, and given to every replica.
    #[test]
    fn damaged_encodings_of_real_messages(
        msg in message(),
        from in sender(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        cut in prop::option::of(any::<prop::sample::Index>()),
    ) {
        let msg = msg.at(Bases { from, to: 1, round: 1, slot: 0 });
        let mut bytes = wire::message_to_pb(from, &msg).encode_to_vec();
        for (at, xor) in flips {
            if !bytes.is_empty() {
                let i = at.index(bytes.len());
                bytes[i] ^= xor;
            }
        }
        if let Some(at) = cut {
            bytes.truncate(at.index(bytes.len() + 1));
        }
        let Ok(decoded) = pb::PeerMessage::decode(bytes.as_slice()) else {
            return Ok(());
        };
        let Ok((from, msg)) = wire::message_from_pb(decoded) else {
            return Ok(());
        };
        let mut c = Cluster::new()?;
        for to in MEMBERS {
            c.step(to, from, msg.clone())?;
        }
        c.deliver(ALL)?;
    }

    /// Arbitrary messages, with numbers near each target's own, between
    /// honest traffic: every replica keeps its word throughout.
    #[test]
    fn arbitrary_messages_between_honest_traffic(actions in prop::collection::vec(action(), 1..48)) {
        let mut c = Cluster::new()?;
        for action in &actions {
            c.run(action)?;
        }
        // Then only honest traffic: it must still check out.
        for _ in 0..30 {
            for id in MEMBERS {
                c.tick(id)?;
            }
            c.deliver(ALL)?;
        }
    }

    /// Arbitrary bytes as each client request: whatever the service's
    /// validation lets through makes a command every replica accepts from
    /// its peers (else a valid write could never be chosen); and arbitrary
    /// bytes as a log command never panic the decoder.
    #[test]
    fn arbitrary_bytes_as_client_requests(bytes in prop::collection::vec(any::<u8>(), 0..128)) {
        let _ = Command::decode(&bytes).map(|c| c.validate());
        let mut requests: Vec<(String, Option<Option<i32>>, Option<pb::RequestId>)> = Vec::new();
        if let Ok(r) = pb::GetRequest::decode(bytes.as_slice()) {
            prop_assert_eq!(service::validate_key(&r.key).is_ok(), !r.key.is_empty() && r.key.len() <= service::MAX_KEY_BYTES);
        }
        if let Ok(r) = pb::InsertRequest::decode(bytes.as_slice()) {
            requests.push((r.key, Some(r.value), r.request_id));
        }
        if let Ok(r) = pb::UpdateRequest::decode(bytes.as_slice()) {
            requests.push((r.key, Some(r.value), r.request_id));
        }
        if let Ok(r) = pb::UpsertRequest::decode(bytes.as_slice()) {
            requests.push((r.key, Some(r.value), r.request_id));
        }
        if let Ok(r) = pb::RemoveRequest::decode(bytes.as_slice()) {
            requests.push((r.key, None, r.request_id));
        }
        for (key, value, request_id) in requests {
            let accepted = service::validate_key(&key).is_ok()
                && value.is_none_or(|v| v.is_some())
                && service::validate_request_id(&request_id).is_ok();
            if !accepted {
                continue;
            }
            let (client_id, sequence) = request_id.map_or((0, 0), |r| (r.client_id, r.sequence));
            let command = Command {
                proposal_id: 7,
                client_id,
                sequence,
                key,
                op: Op::Upsert(value.flatten().unwrap_or(0)),
            };
            prop_assert!(Command::may_enter_log(&command.encode()), "{:?}", command);
        }
    }
}
