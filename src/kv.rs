//! The replicated state machine: what a chosen log entry does to the store.
//!
//! Every replica applies the same [`Command`]s in the same log order, slot
//! by slot, through [`apply_slot`], so every replica reaches the same state
//! and computes the same [`Reply`]. That makes this module the contract of
//! the store: the five operations (`Get` is a read and never enters the
//! log; `Insert`, `Update`, `Upsert` and `Remove` are the writes here), and
//! the client sessions that make retries safe.
//!
//! The module is pure logic: no I/O, no clock, no randomness. Storage sits
//! behind the [`KvState`] trait, implemented in memory by [`MemState`] (for
//! the simulator and tests) and elsewhere over a persistent store. Anything
//! `apply_slot` does must be deterministic, or replicas would diverge.
//!
//! # Client sessions: exactly once, bounded
//!
//! As in Raft's client sessions (Ongaro's dissertation, §6.3):
//!
//! - A client that wants safe retries first opens a session
//!   ([`Op::OpenSession`], the `OpenSession` call). Its `client_id` is
//!   issued by the state machine: the position in the log of the command
//!   that opened it ([`client_id_at`]), so no two sessions ever share an id
//!   and no id is ever issued twice.
//! - It tags each write with that `client_id` and a `sequence` it increases
//!   per write (from 1). A retry may be proposed, and chosen, more than once
//!   (for example when a leader fails after choosing the first copy but
//!   before answering). The session holds the last applied sequence and its
//!   reply, so that a repeated write is applied once and every copy gets
//!   the first reply; an older one is [`Reply::Stale`].
//! - Sessions are bounded, by rules every replica applies at the same log
//!   position ([`SessionLimits`]): a session not used in the last
//!   `idle_slots` slots expires, and when opening one makes more than
//!   `max_sessions`, the least recently used (by the slot it was last used
//!   at, then by id) is evicted.
//! - A write naming a session that does not exist is refused,
//!   [`Reply::SessionExpired`], and changes nothing. Since ids are issued by
//!   the log, "no session" can only mean "expired" (or an id the store never
//!   issued): never "a new client", so a retry of an expired session's write
//!   is never applied a second time. Whether an earlier copy of it was
//!   applied is no longer known; the client must open a new session, and
//!   find out (read) before it writes again if it matters.
//!
//! `client_id == 0` means the write has no retry identity: applied every
//! time it is chosen.

use std::collections::BTreeMap;
use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};

use std::collections::BTreeSet;

use bytes::Bytes;
use prost::Message as _;

use crate::paxos::Slot;
use crate::pb;

/// Longest key accepted, in bytes. Keys are 1 to this many bytes of UTF-8.
pub const MAX_KEY_BYTES: usize = 1024;

/// A write operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// Adds the key with this value; fails if the key is present.
    Insert(i32),
    /// Sets an existing key to this value; fails if the key is absent.
    Update(i32),
    /// Sets the key to this value, whether or not it is present.
    Upsert(i32),
    /// Deletes the key; fails if the key is absent.
    Remove,
    /// Opens a client session and issues its `client_id` (the command's
    /// key is empty, and its `client_id` and `sequence` 0).
    OpenSession,
}

/// A write as it is stored in the log.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Command {
    /// Which proposal this is, so the replica that proposed it can hand the
    /// reply to the waiting call. Not used by the state machine itself.
    pub proposal_id: u64,
    /// Retry identity of the client; 0 means none (never deduplicated).
    pub client_id: u64,
    /// Per-client sequence number of this write; meaningful only when
    /// `client_id != 0`.
    pub sequence: u64,
    /// The key written.
    pub key: String,
    /// What to do to the key.
    pub op: Op,
}

impl Command {
    /// Encodes the command as a `paxoskv.v1.Command` protobuf message, the
    /// form it takes inside a log entry's batch.
    pub fn encode(&self) -> Bytes {
        Bytes::from(pb::Command::from(self).encode_to_vec())
    }

    /// Decodes a command from its protobuf encoding.
    ///
    /// Fails on bytes that are not a valid `paxoskv.v1.Command`, and on a
    /// message without an operation (which no replica ever writes, so it
    /// means corruption or a version mismatch rather than a no-op).
    pub fn decode(buf: &[u8]) -> Result<Command, DecodeError> {
        let msg = pb::Command::decode(buf).map_err(DecodeError::Protobuf)?;
        Command::try_from(msg)
    }

    /// Checks what the client API guarantees of every command it puts in
    /// the log: a write has a key of 1 to [`MAX_KEY_BYTES`] bytes, and a
    /// retry identity that is either absent (`client_id` and `sequence`
    /// both 0) or whole (both non-zero); an [`Op::OpenSession`] has neither
    /// key nor retry identity. The error says which part is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.op == Op::OpenSession {
            if !self.key.is_empty() || self.client_id != 0 || self.sequence != 0 {
                return Err("OpenSession carries no key, client_id or sequence".into());
            }
            return Ok(());
        }
        if self.key.is_empty() || self.key.len() > MAX_KEY_BYTES {
            return Err(format!(
                "key is {} bytes long; 1 to {MAX_KEY_BYTES} are allowed",
                self.key.len()
            ));
        }
        if (self.client_id == 0) != (self.sequence == 0) {
            return Err(format!(
                "client_id {} with sequence {}: both or neither must be 0",
                self.client_id, self.sequence
            ));
        }
        Ok(())
    }

    /// Whether `buf` is a command that may enter the log: it decodes, and
    /// [`validate`](Self::validate) passes. The consensus core refuses any
    /// peer message whose values hold anything else (see
    /// [`Replica::check_commands_with`](crate::paxos::Replica::check_commands_with)):
    /// a command that does not decode would stop every state machine at
    /// its slot, and one that is not valid could never have been proposed.
    pub fn may_enter_log(buf: &[u8]) -> bool {
        Command::decode(buf).is_ok_and(|c| c.validate().is_ok())
    }
}

impl From<&Command> for pb::Command {
    fn from(cmd: &Command) -> Self {
        use pb::command::Op as P;
        let op = match cmd.op {
            Op::Insert(v) => P::Insert(v),
            Op::Update(v) => P::Update(v),
            Op::Upsert(v) => P::Upsert(v),
            Op::Remove => P::Remove(pb::Empty {}),
            Op::OpenSession => P::OpenSession(pb::Empty {}),
        };
        pb::Command {
            proposal_id: cmd.proposal_id,
            client_id: cmd.client_id,
            sequence: cmd.sequence,
            key: cmd.key.clone(),
            op: Some(op),
        }
    }
}

impl TryFrom<pb::Command> for Command {
    type Error = DecodeError;

    fn try_from(msg: pb::Command) -> Result<Self, Self::Error> {
        use pb::command::Op as P;
        let op = match msg.op {
            Some(P::Insert(v)) => Op::Insert(v),
            Some(P::Update(v)) => Op::Update(v),
            Some(P::Upsert(v)) => Op::Upsert(v),
            Some(P::Remove(pb::Empty {})) => Op::Remove,
            Some(P::OpenSession(pb::Empty {})) => Op::OpenSession,
            None => return Err(DecodeError::MissingOp),
        };
        Ok(Command {
            proposal_id: msg.proposal_id,
            client_id: msg.client_id,
            sequence: msg.sequence,
            key: msg.key,
            op,
        })
    }
}

/// Why bytes could not be decoded into a [`Command`] or a [`Session`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The bytes are not a valid protobuf `paxoskv.v1.Command`.
    Protobuf(prost::DecodeError),
    /// The command decoded but carries no operation.
    MissingOp,
    /// A stored session has the wrong length for its reply tag.
    SessionLength {
        /// The length the tag calls for (at least 9 if the tag is missing).
        expected: usize,
        /// The length found.
        actual: usize,
    },
    /// A stored session has a reply tag no version of this code writes.
    UnknownReplyTag(u8),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Protobuf(e) => write!(f, "invalid Command protobuf: {e}"),
            DecodeError::MissingOp => f.write_str("Command has no op"),
            DecodeError::SessionLength { expected, actual } => {
                write!(f, "stored session is {actual} bytes, expected {expected}")
            }
            DecodeError::UnknownReplyTag(tag) => {
                write!(f, "stored session has unknown reply tag {tag}")
            }
        }
    }
}

impl std::error::Error for DecodeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DecodeError::Protobuf(e) => Some(e),
            _ => None,
        }
    }
}

/// What applying a command produced: the state machine's answer, returned
/// to the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reply {
    /// An `Insert` succeeded, or an `Upsert` found the key absent.
    Inserted,
    /// An `Update` succeeded, or an `Upsert` found the key present.
    Updated {
        /// The value the key held before.
        previous: i32,
    },
    /// A `Remove` succeeded.
    Removed {
        /// The value the key held.
        previous: i32,
    },
    /// An `Insert` found the key present; nothing changed.
    AlreadyExists,
    /// An `Update` or `Remove` found the key absent; nothing changed.
    NotFound,
    /// The write's sequence is older than the client's last applied one, so
    /// it was not applied and its first reply is no longer known.
    Stale {
        /// The client's last applied sequence.
        last: u64,
    },
    /// An `OpenSession` opened the session `client_id`.
    SessionOpened {
        /// The id to put in the session's writes.
        client_id: u64,
    },
    /// The write names a session that does not exist: it expired (or was
    /// never opened). Nothing changed; an earlier copy of the write may or
    /// may not have been applied, which is no longer known.
    SessionExpired,
    /// An `OpenSession` found no id left to issue at its log position (more
    /// than 65,536 sessions opened in one slot, or a slot past 2^48);
    /// nothing changed, and opening again in a later slot works.
    SessionNotOpened,
}

/// The session record kept per client id: the client's last applied
/// command, and when the session was last used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Session {
    /// The sequence of the client's last applied write; 0 before its first.
    pub sequence: u64,
    /// The reply that write produced (before any write, the session's
    /// opening), repeated to any retry of it.
    pub reply: Reply,
    /// The last slot at which a command named the session (or opened it).
    /// A record written before sessions expired reads as 0.
    pub last_used: Slot,
}

/// When the state machine forgets sessions. Every replica must apply the
/// same limits, or their session tables, and then their replies to retried
/// writes, diverge: they are constants of the build, not flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionLimits {
    /// At most this many sessions are kept: opening one more evicts the
    /// least recently used. At least 1.
    pub max_sessions: u64,
    /// A session not used in the last this many slots expires.
    pub idle_slots: Slot,
}

impl SessionLimits {
    /// What `paxoskv serve` uses: 100,000 sessions (a few MiB), each kept
    /// until it has gone unused for 10,000,000 slots (hours, under heavy
    /// load; a slot is one batch of writes).
    pub const DEFAULT: SessionLimits = SessionLimits {
        max_sessions: 100_000,
        idle_slots: 10_000_000,
    };
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits::DEFAULT
    }
}

/// The `client_id` of the session opened by the `n`th [`Op::OpenSession`]
/// (from 0) of `slot`: `slot * 2^16 + n`, so it names its log position and
/// is never issued twice. `None` past 65,535 in one slot or from slot 2^48
/// on. Every issued id is at least 2^16 (slots start at 1).
pub fn client_id_at(slot: Slot, n: u64) -> Option<u64> {
    (n < 1 << 16 && slot < 1 << 48).then_some((slot << 16) | n)
}

// Reply tags of the stored session layout. Never renumber: they are on disk.
const TAG_INSERTED: u8 = 0;
const TAG_UPDATED: u8 = 1;
const TAG_REMOVED: u8 = 2;
const TAG_ALREADY_EXISTS: u8 = 3;
const TAG_NOT_FOUND: u8 = 4;
const TAG_STALE: u8 = 5;
const TAG_SESSION_OPENED: u8 = 6;
const TAG_SESSION_EXPIRED: u8 = 7;
const TAG_SESSION_NOT_OPENED: u8 = 8;
/// Set on the tag byte of a record that ends with `last_used` (every record
/// written since sessions expire; older ones lack it).
const HAS_LAST_USED: u8 = 0x80;

/// Bytes before the reply payload: the sequence (u64) and the reply tag (u8).
const SESSION_HEADER: usize = 9;

impl Session {
    /// Encodes the session for storage: the sequence as a little-endian
    /// u64, a reply tag byte (with `HAS_LAST_USED` set), the reply's
    /// payload if it has one (little-endian i32 `previous`, or u64 `last` or
    /// `client_id`), then `last_used` as a little-endian u64. 17, 21 or 25
    /// bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(SESSION_HEADER + 16);
        out.extend_from_slice(&self.sequence.to_le_bytes());
        let (tag, payload): (u8, &[u8]) = match &self.reply {
            Reply::Inserted => (TAG_INSERTED, &[]),
            Reply::Updated { previous } => (TAG_UPDATED, &previous.to_le_bytes()),
            Reply::Removed { previous } => (TAG_REMOVED, &previous.to_le_bytes()),
            Reply::AlreadyExists => (TAG_ALREADY_EXISTS, &[]),
            Reply::NotFound => (TAG_NOT_FOUND, &[]),
            Reply::Stale { last } => (TAG_STALE, &last.to_le_bytes()),
            Reply::SessionOpened { client_id } => (TAG_SESSION_OPENED, &client_id.to_le_bytes()),
            Reply::SessionExpired => (TAG_SESSION_EXPIRED, &[]),
            Reply::SessionNotOpened => (TAG_SESSION_NOT_OPENED, &[]),
        };
        out.push(tag | HAS_LAST_USED);
        out.extend_from_slice(payload);
        out.extend_from_slice(&self.last_used.to_le_bytes());
        out
    }

    /// Decodes a session written by [`Session::to_bytes`], or by a version
    /// before sessions expired (no `last_used`: it reads as 0). Rejects,
    /// without panicking, input that is short, too long or has an unknown
    /// tag.
    pub fn from_bytes(buf: &[u8]) -> Result<Session, DecodeError> {
        let short = || DecodeError::SessionLength {
            expected: SESSION_HEADER,
            actual: buf.len(),
        };
        let (seq, rest) = buf.split_first_chunk::<8>().ok_or_else(short)?;
        let (&tag, rest) = rest.split_first().ok_or_else(short)?;
        let sequence = u64::from_le_bytes(*seq);
        let (payload, last_used) = if tag & HAS_LAST_USED != 0 {
            let (payload, last) =
                rest.split_last_chunk::<8>()
                    .ok_or(DecodeError::SessionLength {
                        expected: SESSION_HEADER + 8,
                        actual: buf.len(),
                    })?;
            (payload, u64::from_le_bytes(*last))
        } else {
            (rest, 0)
        };
        let trailer = if tag & HAS_LAST_USED != 0 { 8 } else { 0 };
        // Exact lengths only: other bytes would mean a layout we do not know.
        let wrong_length = |payload_len: usize| DecodeError::SessionLength {
            expected: SESSION_HEADER + payload_len + trailer,
            actual: buf.len(),
        };
        let as_i32 = || -> Result<i32, DecodeError> {
            let bytes: [u8; 4] = payload.try_into().map_err(|_| wrong_length(4))?;
            Ok(i32::from_le_bytes(bytes))
        };
        let as_u64 = || -> Result<u64, DecodeError> {
            let bytes: [u8; 8] = payload.try_into().map_err(|_| wrong_length(8))?;
            Ok(u64::from_le_bytes(bytes))
        };
        let none = |reply: Reply| -> Result<Reply, DecodeError> {
            if payload.is_empty() {
                Ok(reply)
            } else {
                Err(wrong_length(0))
            }
        };
        let reply = match tag & !HAS_LAST_USED {
            TAG_INSERTED => none(Reply::Inserted)?,
            TAG_UPDATED => Reply::Updated {
                previous: as_i32()?,
            },
            TAG_REMOVED => Reply::Removed {
                previous: as_i32()?,
            },
            TAG_ALREADY_EXISTS => none(Reply::AlreadyExists)?,
            TAG_NOT_FOUND => none(Reply::NotFound)?,
            TAG_STALE => Reply::Stale { last: as_u64()? },
            TAG_SESSION_OPENED => Reply::SessionOpened {
                client_id: as_u64()?,
            },
            TAG_SESSION_EXPIRED => none(Reply::SessionExpired)?,
            TAG_SESSION_NOT_OPENED => none(Reply::SessionNotOpened)?,
            _ => return Err(DecodeError::UnknownReplyTag(tag)),
        };
        Ok(Session {
            sequence,
            reply,
            last_used,
        })
    }
}

/// Where the state lives: the key-value map and the session table.
///
/// Implemented in memory by [`MemState`] and over a persistent store
/// elsewhere. Implementations must be plain maps: [`apply_slot`] relies on
/// a `get` seeing the last `put`/`delete` of the same key, and on
/// [`oldest_session`](KvState::oldest_session) and
/// [`session_count`](KvState::session_count) reflecting every change made
/// so far.
pub trait KvState {
    /// The value of `key`, if present.
    fn get(&self, key: &str) -> Option<i32>;
    /// Sets `key` to `value`, adding it if absent.
    fn put(&mut self, key: &str, value: i32);
    /// Deletes `key`, if present.
    fn delete(&mut self, key: &str);
    /// The session of `client_id`, if it has one.
    fn session(&self, client_id: u64) -> Option<Session>;
    /// Replaces (or adds) the session of `client_id`.
    fn set_session(&mut self, client_id: u64, session: Session);
    /// Deletes the session of `client_id`, if any.
    fn remove_session(&mut self, client_id: u64);
    /// The least recently used session, as `(last_used, client_id)`: the
    /// smallest such pair.
    fn oldest_session(&self) -> Option<(Slot, u64)>;
    /// How many sessions there are.
    fn session_count(&self) -> u64;
}

/// Applies the commands of `slot`, in order, to `state`, and returns their
/// replies. Before them, the sessions idle for more than
/// `limits.idle_slots` slots expire: call it for every slot, no-ops
/// included, in order, so that every replica forgets each session at the
/// same slot.
///
/// Per command:
/// - [`Op::OpenSession`]: opens a session with the id
///   [`client_id_at`]`(slot, n)` for the `n`th one of the slot, and evicts
///   the least recently used sessions beyond `limits.max_sessions`.
/// - `client_id == 0`: the write is always applied; no session is touched.
/// - No session for `client_id`: [`Reply::SessionExpired`]; nothing changes.
/// - The session has this very sequence: the write is a retry of the last
///   applied one; its stored reply is returned and nothing is applied.
/// - The session has a later sequence: [`Reply::Stale`], not applied (its
///   reply has been overwritten, so applying it now would reorder it after
///   a later write of the same client).
/// - Otherwise (an earlier sequence): the write is applied and its sequence
///   and reply become the session's.
///
/// Any command naming an existing session marks it used at `slot`.
pub fn apply_slot(
    state: &mut impl KvState,
    limits: &SessionLimits,
    slot: Slot,
    commands: &[Command],
) -> Vec<Reply> {
    let mut slot = SlotApplier::new(state, limits, slot);
    commands.iter().map(|cmd| slot.apply(cmd)).collect()
}

/// [`apply_slot`] one command at a time, for callers that look at the
/// state between commands (the simulator's oracles).
pub struct SlotApplier<'a, S: KvState> {
    state: &'a mut S,
    limits: SessionLimits,
    slot: Slot,
    /// Sessions opened in this slot so far.
    opened: u64,
}

impl<'a, S: KvState> SlotApplier<'a, S> {
    /// Begins `slot`: the sessions idle for too long expire.
    pub fn new(state: &'a mut S, limits: &SessionLimits, slot: Slot) -> Self {
        expire_idle(state, limits, slot);
        SlotApplier {
            state,
            limits: *limits,
            slot,
            opened: 0,
        }
    }

    /// Applies the slot's next command; its reply.
    pub fn apply(&mut self, cmd: &Command) -> Reply {
        if cmd.op == Op::OpenSession {
            let n = self.opened;
            self.opened += 1;
            open_session(self.state, &self.limits, self.slot, n)
        } else {
            apply_write(self.state, self.slot, cmd)
        }
    }

    /// The state, as the commands so far left it.
    pub fn state(&mut self) -> &mut S {
        self.state
    }
}

/// Rule: a session last used more than `idle_slots` slots before `slot`
/// expires.
fn expire_idle(state: &mut impl KvState, limits: &SessionLimits, slot: Slot) {
    let horizon = slot.saturating_sub(limits.idle_slots);
    while let Some((last_used, client_id)) = state.oldest_session() {
        if last_used >= horizon {
            break;
        }
        state.remove_session(client_id);
    }
}

/// Rule: a new session beyond `max_sessions` evicts the least recently
/// used ones (never itself: it was used last).
fn open_session(state: &mut impl KvState, limits: &SessionLimits, slot: Slot, n: u64) -> Reply {
    let Some(client_id) = client_id_at(slot, n) else {
        return Reply::SessionNotOpened;
    };
    let reply = Reply::SessionOpened { client_id };
    let session = Session {
        sequence: 0,
        reply,
        last_used: slot,
    };
    state.set_session(client_id, session);
    while state.session_count() > limits.max_sessions.max(1) {
        let Some((_, oldest)) = state.oldest_session() else {
            break;
        };
        state.remove_session(oldest);
    }
    reply
}

fn apply_write(state: &mut impl KvState, slot: Slot, cmd: &Command) -> Reply {
    if cmd.client_id == 0 {
        return execute(state, &cmd.key, cmd.op);
    }
    let Some(mut session) = state.session(cmd.client_id) else {
        return Reply::SessionExpired;
    };
    session.last_used = slot;
    let reply = if cmd.sequence == session.sequence {
        session.reply
    } else if cmd.sequence < session.sequence {
        Reply::Stale {
            last: session.sequence,
        }
    } else {
        let reply = execute(state, &cmd.key, cmd.op);
        session.sequence = cmd.sequence;
        session.reply = reply;
        reply
    };
    state.set_session(cmd.client_id, session);
    reply
}

/// Performs one operation, without dedup.
fn execute(state: &mut impl KvState, key: &str, op: Op) -> Reply {
    let current = state.get(key);
    match (op, current) {
        (Op::Insert(_), Some(_)) => Reply::AlreadyExists,
        (Op::Insert(value), None) | (Op::Upsert(value), None) => {
            state.put(key, value);
            Reply::Inserted
        }
        (Op::Update(value), Some(previous)) | (Op::Upsert(value), Some(previous)) => {
            state.put(key, value);
            Reply::Updated { previous }
        }
        (Op::Update(_), None) | (Op::Remove, None) => Reply::NotFound,
        (Op::Remove, Some(previous)) => {
            state.delete(key);
            Reply::Removed { previous }
        }
        // Never reached (`apply_slot` opens sessions itself); a no-op if it
        // were.
        (Op::OpenSession, _) => Reply::SessionNotOpened,
    }
}

/// The index of sessions by use: `(last_used, client_id)` pairs, whose
/// first is the least recently used session. [`MemState`] keeps one, and
/// so does the state machine in sled (in memory, rebuilt on open).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionIndex(BTreeSet<(Slot, u64)>);

impl SessionIndex {
    /// Records that `client_id`'s session went from `before` (if it existed)
    /// to `after` (if it still does).
    pub fn update(&mut self, client_id: u64, before: Option<&Session>, after: Option<&Session>) {
        if let Some(s) = before {
            self.0.remove(&(s.last_used, client_id));
        }
        if let Some(s) = after {
            self.0.insert((s.last_used, client_id));
        }
    }

    /// The least recently used session, as `(last_used, client_id)`.
    pub fn oldest(&self) -> Option<(Slot, u64)> {
        self.0.first().copied()
    }

    /// The first `(last_used, client_id)` not in `skip`: the oldest once
    /// those are gone.
    pub fn oldest_except(&self, skip: &BTreeSet<(Slot, u64)>) -> Option<(Slot, u64)> {
        self.0.iter().find(|k| !skip.contains(k)).copied()
    }

    /// Whether the index holds this pair.
    pub fn contains(&self, key: &(Slot, u64)) -> bool {
        self.0.contains(key)
    }

    /// Adds or removes a pair directly.
    pub fn set(&mut self, key: (Slot, u64), present: bool) {
        if present {
            self.0.insert(key);
        } else {
            self.0.remove(&key);
        }
    }

    /// How many sessions it indexes.
    pub fn len(&self) -> u64 {
        self.0.len() as u64
    }

    /// Whether it indexes none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// In-memory [`KvState`], used by the simulator and tests.
///
/// Backed by `BTreeMap`s, so iteration, equality and [`MemState::digest`] are
/// deterministic: two replicas that applied the same log compare equal.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemState {
    data: BTreeMap<String, i32>,
    sessions: BTreeMap<u64, Session>,
    by_use: SessionIndex,
}

impl MemState {
    /// An empty state.
    pub fn new() -> Self {
        Self::default()
    }

    /// A hash of every key, value and session, for cheap comparison of
    /// replicas. Deterministic within one build (std's `DefaultHasher` with
    /// its fixed keys); not stable across Rust versions, so never persist it.
    pub fn digest(&self) -> u64 {
        let mut hasher = DefaultHasher::new();
        self.data.hash(&mut hasher);
        self.sessions.hash(&mut hasher);
        hasher.finish()
    }

    /// The number of keys.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether there are no keys (sessions are not counted).
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

impl KvState for MemState {
    fn get(&self, key: &str) -> Option<i32> {
        self.data.get(key).copied()
    }

    fn put(&mut self, key: &str, value: i32) {
        self.data.insert(key.to_owned(), value);
    }

    fn delete(&mut self, key: &str) {
        self.data.remove(key);
    }

    fn session(&self, client_id: u64) -> Option<Session> {
        self.sessions.get(&client_id).copied()
    }

    fn set_session(&mut self, client_id: u64, session: Session) {
        let before = self.sessions.insert(client_id, session);
        self.by_use
            .update(client_id, before.as_ref(), Some(&session));
    }

    fn remove_session(&mut self, client_id: u64) {
        let before = self.sessions.remove(&client_id);
        self.by_use.update(client_id, before.as_ref(), None);
    }

    fn oldest_session(&self) -> Option<(Slot, u64)> {
        self.by_use.oldest()
    }

    fn session_count(&self) -> u64 {
        self.sessions.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A command without retry identity.
    fn anon(key: &str, op: Op) -> Command {
        Command {
            proposal_id: 0,
            client_id: 0,
            sequence: 0,
            key: key.to_owned(),
            op,
        }
    }

    /// A command from client `client_id` with sequence `sequence`.
    fn from_client(client_id: u64, sequence: u64, key: &str, op: Op) -> Command {
        Command {
            proposal_id: 7,
            client_id,
            sequence,
            key: key.to_owned(),
            op,
        }
    }

    fn open() -> Command {
        anon("", Op::OpenSession)
    }

    /// A state machine that applies one command per slot, from slot 1.
    struct Machine {
        state: MemState,
        limits: SessionLimits,
        slot: Slot,
    }

    impl Machine {
        fn new() -> Self {
            Machine::with(SessionLimits::DEFAULT)
        }

        fn with(limits: SessionLimits) -> Self {
            Machine {
                state: MemState::new(),
                limits,
                slot: 0,
            }
        }

        /// Applies `commands` as the next slot.
        fn slot(&mut self, commands: &[Command]) -> Vec<Reply> {
            self.slot += 1;
            apply_slot(&mut self.state, &self.limits, self.slot, commands)
        }

        fn apply(&mut self, cmd: &Command) -> Reply {
            self.slot(std::slice::from_ref(cmd))[0]
        }

        /// Opens a session; its id.
        fn open(&mut self) -> u64 {
            match self.apply(&open()) {
                Reply::SessionOpened { client_id } => client_id,
                other => panic!("no session opened: {other:?}"),
            }
        }

        /// Applies `n` slots of no-ops.
        fn idle(&mut self, n: u64) {
            for _ in 0..n {
                self.slot(&[]);
            }
        }

        fn get(&self, key: &str) -> Option<i32> {
            self.state.get(key)
        }
    }

    #[test]
    fn insert_new_then_existing() {
        let mut m = Machine::new();
        assert_eq!(m.apply(&anon("a", Op::Insert(1))), Reply::Inserted);
        assert_eq!(m.get("a"), Some(1));
        assert_eq!(m.apply(&anon("a", Op::Insert(2))), Reply::AlreadyExists);
        assert_eq!(m.get("a"), Some(1), "a failed insert changes nothing");
    }

    #[test]
    fn update_present_and_absent() {
        let mut m = Machine::new();
        assert_eq!(m.apply(&anon("a", Op::Update(5))), Reply::NotFound);
        assert_eq!(m.get("a"), None, "update does not create the key");
        m.apply(&anon("a", Op::Insert(1)));
        assert_eq!(
            m.apply(&anon("a", Op::Update(5))),
            Reply::Updated { previous: 1 }
        );
        assert_eq!(m.get("a"), Some(5));
    }

    #[test]
    fn upsert_absent_then_present() {
        let mut m = Machine::new();
        assert_eq!(m.apply(&anon("a", Op::Upsert(3))), Reply::Inserted);
        assert_eq!(m.get("a"), Some(3));
        assert_eq!(
            m.apply(&anon("a", Op::Upsert(-4))),
            Reply::Updated { previous: 3 }
        );
        assert_eq!(m.get("a"), Some(-4));
    }

    #[test]
    fn remove_present_and_absent() {
        let mut m = Machine::new();
        assert_eq!(m.apply(&anon("a", Op::Remove)), Reply::NotFound);
        m.apply(&anon("a", Op::Insert(9)));
        assert_eq!(
            m.apply(&anon("a", Op::Remove)),
            Reply::Removed { previous: 9 }
        );
        assert_eq!(m.get("a"), None);
        assert!(m.state.is_empty());
        assert_eq!(m.apply(&anon("a", Op::Remove)), Reply::NotFound);
    }

    #[test]
    fn sessions_get_ids_from_their_log_position_never_issued_twice() {
        let mut m = Machine::new();
        m.idle(4);
        // Two in slot 5, one in slot 6, with a write between them.
        let replies = m.slot(&[open(), anon("k", Op::Upsert(1)), open()]);
        let first = client_id_at(5, 0).unwrap();
        let second = client_id_at(5, 1).unwrap();
        assert_eq!(
            replies,
            vec![
                Reply::SessionOpened { client_id: first },
                Reply::Inserted,
                Reply::SessionOpened { client_id: second }
            ]
        );
        assert_eq!((first, second), ((5 << 16), (5 << 16) + 1));
        assert_eq!(m.open(), 6 << 16);
        assert_eq!(m.state.session_count(), 3);
        // The edges of the id space.
        assert_eq!(client_id_at(1, 0), Some(1 << 16));
        assert_eq!(client_id_at(1, (1 << 16) - 1), Some((2 << 16) - 1));
        assert_eq!(client_id_at(1, 1 << 16), None);
        assert_eq!(client_id_at((1 << 48) - 1, 0), Some(u64::MAX - 0xffff));
        assert_eq!(client_id_at(1 << 48, 0), None);
        let mut far = Machine::new();
        far.slot = (1 << 48) - 1;
        assert_eq!(far.apply(&open()), Reply::SessionNotOpened);
        assert_eq!(far.state.session_count(), 0);
    }

    #[test]
    fn retry_is_applied_once_with_first_reply() {
        let mut m = Machine::new();
        let c = m.open();
        let first = from_client(c, 1, "a", Op::Upsert(10));
        assert_eq!(m.apply(&first), Reply::Inserted);
        // Another client changes the key between the original and the retry.
        m.apply(&anon("a", Op::Update(20)));
        // The retry is answered with the first reply, not re-applied (which
        // would answer Updated { previous: 20 } and set the key back to 10).
        assert_eq!(m.apply(&first), Reply::Inserted);
        assert_eq!(m.get("a"), Some(20));
        // A retry with another proposal id is still the same write.
        let again = Command {
            proposal_id: 99,
            ..first.clone()
        };
        assert_eq!(m.apply(&again), Reply::Inserted);
        assert_eq!(m.get("a"), Some(20));
        let session = m.state.session(c).unwrap();
        assert_eq!((session.sequence, session.reply), (1, Reply::Inserted));
        assert_eq!(session.last_used, m.slot, "a retry keeps its session alive");
    }

    #[test]
    fn retry_of_failed_write_repeats_failure() {
        let mut m = Machine::new();
        let c = m.open();
        let remove = from_client(c, 1, "a", Op::Remove);
        assert_eq!(m.apply(&remove), Reply::NotFound);
        m.apply(&anon("a", Op::Insert(1)));
        assert_eq!(m.apply(&remove), Reply::NotFound);
        assert_eq!(m.get("a"), Some(1));
    }

    #[test]
    fn stale_sequence_is_refused_and_changes_nothing_but_the_sessions_use() {
        let mut m = Machine::new();
        let c = m.open();
        m.apply(&from_client(c, 5, "a", Op::Insert(1)));
        assert_eq!(
            m.apply(&from_client(c, 4, "a", Op::Update(2))),
            Reply::Stale { last: 5 }
        );
        assert_eq!(m.get("a"), Some(1));
        assert_eq!(
            m.state.session(c),
            Some(Session {
                sequence: 5,
                reply: Reply::Inserted,
                last_used: m.slot,
            })
        );
    }

    #[test]
    fn later_sequence_is_applied_and_recorded() {
        let mut m = Machine::new();
        let c = m.open();
        m.apply(&from_client(c, 1, "a", Op::Insert(1)));
        // Sequences need not be contiguous: a gap is applied normally.
        assert_eq!(
            m.apply(&from_client(c, 3, "a", Op::Update(2))),
            Reply::Updated { previous: 1 }
        );
        assert_eq!(
            m.state.session(c),
            Some(Session {
                sequence: 3,
                reply: Reply::Updated { previous: 1 },
                last_used: m.slot,
            })
        );
    }

    #[test]
    fn sessions_are_per_client() {
        let mut m = Machine::new();
        let (c1, c2) = (m.open(), m.open());
        assert_eq!(
            m.apply(&from_client(c1, 1, "a", Op::Insert(1))),
            Reply::Inserted
        );
        // Same sequence, other client: a different write, applied.
        assert_eq!(
            m.apply(&from_client(c2, 1, "a", Op::Insert(2))),
            Reply::AlreadyExists
        );
        assert_eq!(m.state.session(c1).map(|x| x.reply), Some(Reply::Inserted));
        assert_eq!(
            m.state.session(c2).map(|x| x.reply),
            Some(Reply::AlreadyExists)
        );
    }

    #[test]
    fn client_zero_never_dedups() {
        let mut m = Machine::new();
        let cmd = anon("a", Op::Upsert(1));
        assert_eq!(m.apply(&cmd), Reply::Inserted);
        // The same (0, 0) again is a new write, not a retry.
        assert_eq!(m.apply(&cmd), Reply::Updated { previous: 1 });
        assert_eq!(m.state.session(0), None, "client 0 has no session");
    }

    #[test]
    fn a_write_naming_no_open_session_is_refused_and_changes_nothing() {
        let mut m = Machine::new();
        m.open();
        let before = m.state.clone();
        // An id the store never issued (chosen by a client, as before
        // sessions were opened), and one it will issue later.
        for c in [7, 0xC0FFEE, client_id_at(1000, 0).unwrap()] {
            assert_eq!(
                m.apply(&from_client(c, 1, "a", Op::Insert(1))),
                Reply::SessionExpired
            );
        }
        assert_eq!(m.state, before);
    }

    #[test]
    fn an_idle_session_expires_and_a_retry_of_its_write_is_refused_not_applied_again() {
        let limits = SessionLimits {
            max_sessions: 10,
            idle_slots: 5,
        };
        let mut m = Machine::with(limits);
        let c = m.open();
        let write = from_client(c, 1, "a", Op::Upsert(1));
        assert_eq!(m.apply(&write), Reply::Inserted);
        let used = m.slot;
        // Someone else changes the key.
        m.apply(&anon("a", Op::Upsert(2)));
        // Unused for 5 slots: still there, and a retry is answered from it.
        m.idle(used + 5 - m.slot - 1);
        assert_eq!(m.apply(&write), Reply::Inserted, "slot {}", m.slot);
        let used = m.slot;
        m.idle(5);
        assert!(m.state.session(c).is_some(), "used 5 slots ago: kept");
        // One slot more and it is gone, whatever the slot holds.
        m.idle(1);
        assert_eq!(m.slot, used + 6);
        assert_eq!(m.state.session(c), None);
        let before = m.state.clone();
        assert_eq!(m.apply(&write), Reply::SessionExpired);
        assert_eq!(m.get("a"), Some(2), "the retry was not applied again");
        assert_eq!(m.state, before);
        // Nor is a new write of that session, nor an older one.
        let next = from_client(c, 2, "b", Op::Insert(3));
        assert_eq!(m.apply(&next), Reply::SessionExpired);
        assert_eq!(m.get("b"), None);
    }

    #[test]
    fn opening_a_session_beyond_the_maximum_evicts_the_least_recently_used() {
        let limits = SessionLimits {
            max_sessions: 2,
            idle_slots: 1000,
        };
        let mut m = Machine::with(limits);
        let (a, b) = (m.open(), m.open());
        // `a` is used after `b` was opened: `b` is the least recently used.
        m.apply(&from_client(a, 1, "k", Op::Upsert(1)));
        let c = m.open();
        assert_eq!(m.state.session_count(), 2);
        assert!(m.state.session(a).is_some() && m.state.session(c).is_some());
        assert_eq!(m.state.session(b), None);
        assert_eq!(
            m.apply(&from_client(b, 1, "k", Op::Upsert(2))),
            Reply::SessionExpired
        );
        // Used in the same slot: the lower id goes first.
        let replies = m.slot(&[open(), open()]);
        let ids: Vec<u64> = replies
            .iter()
            .map(|r| match r {
                Reply::SessionOpened { client_id } => *client_id,
                other => panic!("{other:?}"),
            })
            .collect();
        assert!(m.state.session(a).is_none() && m.state.session(c).is_none());
        assert!(ids.iter().all(|&id| m.state.session(id).is_some()));
        // A limit of 0 is taken as 1: the session just opened stays.
        let mut one = Machine::with(SessionLimits {
            max_sessions: 0,
            idle_slots: 10,
        });
        let only = one.open();
        assert!(one.state.session(only).is_some());
    }

    #[test]
    fn replicas_applying_the_same_log_agree_on_every_session() {
        let limits = SessionLimits {
            max_sessions: 3,
            idle_slots: 4,
        };
        // Log index `i` is slot `i + 1`: the sessions opened at index `i`
        // are `(i + 1) << 16` and the one after.
        let log: Vec<Vec<Command>> = (0..40u64)
            .map(|i| match i % 5 {
                0 => vec![open(), open()],
                1 => vec![from_client(i << 16, 1, "k", Op::Upsert(i as i32))],
                2 => vec![],
                3 => vec![from_client(((i - 2) << 16) + 1, 1, "j", Op::Upsert(1))],
                // The previous round's first session, unused for 8 slots.
                _ => vec![
                    anon("k", Op::Remove),
                    from_client(i.saturating_sub(8).max(1) << 16, 2, "k", Op::Upsert(0)),
                ],
            })
            .collect();
        let run = || {
            let mut m = Machine::with(limits);
            let replies: Vec<Vec<Reply>> = log.iter().map(|c| m.slot(c)).collect();
            (m.state, replies)
        };
        let (a, replies_a) = run();
        let (b, replies_b) = run();
        assert_eq!(a, b);
        assert_eq!(a.digest(), b.digest());
        assert_eq!(replies_a, replies_b);
        assert!(a.session_count() <= 3);
        assert!(
            replies_a
                .iter()
                .flatten()
                .any(|r| *r == Reply::SessionExpired),
            "the log exercises expiry"
        );
    }

    #[test]
    fn digest_tracks_state() {
        let mut a = Machine::new();
        let mut b = Machine::new();
        assert_eq!(a.state.digest(), b.state.digest());
        let c = a.open();
        a.apply(&from_client(c, 1, "x", Op::Insert(1)));
        assert_ne!(a.state.digest(), b.state.digest());
        assert_eq!(b.open(), c);
        b.apply(&from_client(c, 1, "x", Op::Insert(1)));
        assert_eq!(a.state, b.state);
        assert_eq!(a.state.digest(), b.state.digest());
        assert_eq!(a.state.len(), 1);
        // Same keys and values, different sessions: different digests.
        let mut d = Machine::new();
        d.apply(&anon("x", Op::Insert(1)));
        assert_ne!(a.state.digest(), d.state.digest());
    }

    #[test]
    fn command_round_trip_every_op() {
        for op in [
            Op::Insert(1),
            Op::Update(-2),
            Op::Upsert(i32::MAX),
            Op::Upsert(0),
            Op::Remove,
            Op::OpenSession,
        ] {
            let cmd = Command {
                proposal_id: u64::MAX,
                client_id: 42,
                sequence: 1 << 40,
                key: "k\u{e9}y".to_owned(),
                op,
            };
            assert_eq!(Command::decode(&cmd.encode()), Ok(cmd));
        }
    }

    #[test]
    fn decode_garbage_fails() {
        // Field 1 is fixed64, but the tag claims a length-delimited field
        // running far past the end of the input.
        let err = Command::decode(&[0x0a, 0xff, 0x01]).unwrap_err();
        assert!(matches!(err, DecodeError::Protobuf(_)), "{err:?}");
        assert!(
            err.to_string().contains("invalid Command protobuf"),
            "{err}"
        );
    }

    #[test]
    fn only_valid_commands_may_enter_the_log() {
        let valid = [
            from_client(1 << 16, 1, "k", Op::Insert(1)),
            anon(&"k".repeat(MAX_KEY_BYTES), Op::Remove),
            open(),
        ];
        for cmd in valid {
            assert_eq!(cmd.validate(), Ok(()), "{cmd:?}");
            assert!(Command::may_enter_log(&cmd.encode()), "{cmd:?}");
        }
        let invalid = [
            anon("", Op::Remove),
            anon(&"k".repeat(MAX_KEY_BYTES + 1), Op::Remove),
            from_client(1, 0, "k", Op::Remove),
            from_client(0, 1, "k", Op::Remove),
            anon("k", Op::OpenSession),
            from_client(1, 1, "", Op::OpenSession),
        ];
        for cmd in invalid {
            assert!(cmd.validate().is_err(), "{cmd:?}");
            assert!(!Command::may_enter_log(&cmd.encode()), "{cmd:?}");
        }
        assert!(!Command::may_enter_log(&[0x0a, 0xff, 0x01]));
        assert!(!Command::may_enter_log(&[]));
    }

    #[test]
    fn decode_without_op_fails() {
        let msg = pb::Command {
            proposal_id: 1,
            client_id: 2,
            sequence: 3,
            key: "a".to_owned(),
            op: None,
        };
        let err = Command::decode(&msg.encode_to_vec()).unwrap_err();
        assert_eq!(err, DecodeError::MissingOp);
        assert_eq!(err.to_string(), "Command has no op");
        // An empty buffer is a valid, empty message: also no op.
        assert_eq!(Command::decode(&[]), Err(DecodeError::MissingOp));
    }

    fn every_reply() -> [Reply; 12] {
        [
            Reply::Inserted,
            Reply::Updated { previous: -1 },
            Reply::Updated { previous: i32::MIN },
            Reply::Removed { previous: 7 },
            Reply::AlreadyExists,
            Reply::NotFound,
            Reply::Stale { last: 0 },
            Reply::Stale { last: u64::MAX },
            Reply::SessionOpened { client_id: 1 << 16 },
            Reply::SessionOpened {
                client_id: u64::MAX,
            },
            Reply::SessionExpired,
            Reply::SessionNotOpened,
        ]
    }

    #[test]
    fn session_bytes_round_trip() {
        for reply in every_reply() {
            for last_used in [0, 1, u64::MAX] {
                let session = Session {
                    sequence: 0x0102_0304_0506_0708,
                    reply,
                    last_used,
                };
                let bytes = session.to_bytes();
                assert_eq!(&bytes[..8], &0x0102_0304_0506_0708u64.to_le_bytes());
                assert_eq!(&bytes[bytes.len() - 8..], &last_used.to_le_bytes());
                assert_eq!(Session::from_bytes(&bytes), Ok(session));
            }
        }
    }

    #[test]
    fn sessions_written_before_they_expired_still_decode_and_expire_first() {
        // The layout without `last_used`: sequence, tag, payload.
        let mut old = 9u64.to_le_bytes().to_vec();
        old.push(TAG_UPDATED);
        old.extend_from_slice(&(-3i32).to_le_bytes());
        let session = Session::from_bytes(&old).unwrap();
        assert_eq!(
            session,
            Session {
                sequence: 9,
                reply: Reply::Updated { previous: -3 },
                last_used: 0
            }
        );
        let mut m = Machine::with(SessionLimits {
            max_sessions: 2,
            idle_slots: 1000,
        });
        m.state.set_session(77, session);
        m.open();
        m.open();
        assert_eq!(m.state.session(77), None, "least recently used of all");
    }

    #[test]
    fn session_garbage_rejected() {
        assert_eq!(
            Session::from_bytes(&[]),
            Err(DecodeError::SessionLength {
                expected: 9,
                actual: 0
            })
        );
        assert!(Session::from_bytes(&[0; 8]).is_err());
        let mut bad_tag = vec![0; 8];
        bad_tag.push(100);
        assert_eq!(
            Session::from_bytes(&bad_tag),
            Err(DecodeError::UnknownReplyTag(100))
        );
        for reply in every_reply() {
            let bytes = Session {
                sequence: 1,
                reply,
                last_used: 3,
            }
            .to_bytes();
            // Every truncation and one trailing byte must be rejected.
            for len in 0..bytes.len() {
                assert!(Session::from_bytes(&bytes[..len]).is_err(), "{reply:?}");
            }
            let mut long = bytes.clone();
            long.push(0);
            let err = Session::from_bytes(&long).unwrap_err();
            assert!(err.to_string().contains("expected"), "{err}");
        }
        // Arbitrary bytes never panic.
        for len in 0..40u8 {
            let junk: Vec<u8> = (0..len).map(|i| i.wrapping_mul(37) ^ len).collect();
            let _ = Session::from_bytes(&junk);
        }
    }
}
