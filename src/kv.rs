//! The replicated state machine: what a chosen log entry does to the store.
//!
//! Every replica applies the same [`Command`]s in the same log order through
//! [`apply`], so every replica reaches the same state and computes the same
//! [`Reply`]. That makes this module the contract of the store: the five
//! operations (`Get` is a read and never enters the log; `Insert`, `Update`,
//! `Upsert` and `Remove` are the writes here) and the dedup table that makes
//! client retries safe.
//!
//! The module is pure logic: no I/O, no clock, no randomness. Storage sits
//! behind the [`KvState`] trait, implemented in memory by [`MemState`] (for
//! the simulator and tests) and elsewhere over a persistent store. Anything
//! `apply` does must be deterministic, or replicas would diverge.
//!
//! # Dedup
//!
//! A client that wants safe retries tags each write with a `client_id` and a
//! `sequence` it increases per write. A retry may be proposed, and chosen,
//! more than once (for example when a leader fails after choosing the first
//! copy but before answering). The state machine keeps one [`Session`] per
//! client id, holding the last applied sequence and its reply, so that a
//! repeated write is applied once and every copy gets the first reply.
//! `client_id == 0` means the write has no retry identity.

use std::collections::BTreeMap;
use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};

use bytes::Bytes;
use prost::Message as _;

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
    /// the log: a key of 1 to [`MAX_KEY_BYTES`] bytes, and a retry identity
    /// that is either absent (`client_id` and `sequence` both 0) or whole
    /// (both non-zero). The error says which part is wrong.
    pub fn validate(&self) -> Result<(), String> {
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

/// What applying a write produced: the state machine's answer, returned to
/// the client.
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
}

/// The dedup record kept per client id: the client's last applied write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Session {
    /// The sequence of the client's last applied write.
    pub sequence: u64,
    /// The reply that write produced, repeated to any retry of it.
    pub reply: Reply,
}

// Reply tags of the stored session layout. Never renumber: they are on disk.
const TAG_INSERTED: u8 = 0;
const TAG_UPDATED: u8 = 1;
const TAG_REMOVED: u8 = 2;
const TAG_ALREADY_EXISTS: u8 = 3;
const TAG_NOT_FOUND: u8 = 4;
const TAG_STALE: u8 = 5;

/// Bytes before the reply payload: the sequence (u64) and the reply tag (u8).
const SESSION_HEADER: usize = 9;

impl Session {
    /// Encodes the session for storage: the sequence as a little-endian
    /// u64, a reply tag byte, then the reply's payload if it has one
    /// (little-endian i32 `previous` or u64 `last`). 9, 13 or 17 bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(SESSION_HEADER + 8);
        out.extend_from_slice(&self.sequence.to_le_bytes());
        match self.reply {
            Reply::Inserted => out.push(TAG_INSERTED),
            Reply::Updated { previous } => {
                out.push(TAG_UPDATED);
                out.extend_from_slice(&previous.to_le_bytes());
            }
            Reply::Removed { previous } => {
                out.push(TAG_REMOVED);
                out.extend_from_slice(&previous.to_le_bytes());
            }
            Reply::AlreadyExists => out.push(TAG_ALREADY_EXISTS),
            Reply::NotFound => out.push(TAG_NOT_FOUND),
            Reply::Stale { last } => {
                out.push(TAG_STALE);
                out.extend_from_slice(&last.to_le_bytes());
            }
        }
        out
    }

    /// Decodes a session written by [`Session::to_bytes`]. Rejects, without
    /// panicking, input that is short, too long or has an unknown tag.
    pub fn from_bytes(buf: &[u8]) -> Result<Session, DecodeError> {
        let short = || DecodeError::SessionLength {
            expected: SESSION_HEADER,
            actual: buf.len(),
        };
        let (seq, rest) = buf.split_first_chunk::<8>().ok_or_else(short)?;
        let (&tag, payload) = rest.split_first().ok_or_else(short)?;
        let sequence = u64::from_le_bytes(*seq);
        // Exact lengths only: trailing bytes would mean a layout we do not know.
        let wrong_length = |payload_len: usize| DecodeError::SessionLength {
            expected: SESSION_HEADER + payload_len,
            actual: buf.len(),
        };
        let as_i32 = || -> Result<i32, DecodeError> {
            let bytes: [u8; 4] = payload.try_into().map_err(|_| wrong_length(4))?;
            Ok(i32::from_le_bytes(bytes))
        };
        let none = || -> Result<(), DecodeError> {
            if payload.is_empty() {
                Ok(())
            } else {
                Err(wrong_length(0))
            }
        };
        let reply = match tag {
            TAG_INSERTED => none().map(|()| Reply::Inserted)?,
            TAG_UPDATED => Reply::Updated {
                previous: as_i32()?,
            },
            TAG_REMOVED => Reply::Removed {
                previous: as_i32()?,
            },
            TAG_ALREADY_EXISTS => none().map(|()| Reply::AlreadyExists)?,
            TAG_NOT_FOUND => none().map(|()| Reply::NotFound)?,
            TAG_STALE => {
                let bytes: [u8; 8] = payload.try_into().map_err(|_| wrong_length(8))?;
                Reply::Stale {
                    last: u64::from_le_bytes(bytes),
                }
            }
            other => return Err(DecodeError::UnknownReplyTag(other)),
        };
        Ok(Session { sequence, reply })
    }
}

/// Where the state lives: the key-value map and the session table.
///
/// Implemented in memory by [`MemState`] and over a persistent store
/// elsewhere. Implementations must be plain maps: [`apply`] relies on a `get`
/// seeing the last `put`/`delete` of the same key.
pub trait KvState {
    /// The value of `key`, if present.
    fn get(&self, key: &str) -> Option<i32>;
    /// Sets `key` to `value`, adding it if absent.
    fn put(&mut self, key: &str, value: i32);
    /// Deletes `key`, if present.
    fn delete(&mut self, key: &str);
    /// The session of `client_id`, if it has one.
    fn session(&self, client_id: u64) -> Option<Session>;
    /// Replaces the session of `client_id`.
    fn set_session(&mut self, client_id: u64, session: Session);
}

/// Applies one command to `state` and returns its reply, deduplicating
/// retries by `(client_id, sequence)`.
///
/// - `client_id == 0`: the write is always applied and no session is touched.
/// - The client's session has this very sequence: the write is a retry of the
///   last applied one; its stored reply is returned and nothing is applied.
/// - The session has a later sequence: the write is [`Reply::Stale`] and is
///   not applied (its reply has been overwritten, so applying it now would
///   reorder it after a later write of the same client).
/// - Otherwise (no session, or an earlier sequence): the write is applied and
///   its sequence and reply become the client's session.
pub fn apply(state: &mut impl KvState, cmd: &Command) -> Reply {
    if cmd.client_id == 0 {
        return execute(state, &cmd.key, cmd.op);
    }
    if let Some(session) = state.session(cmd.client_id) {
        if cmd.sequence == session.sequence {
            return session.reply;
        }
        if cmd.sequence < session.sequence {
            return Reply::Stale {
                last: session.sequence,
            };
        }
    }
    let reply = execute(state, &cmd.key, cmd.op);
    state.set_session(
        cmd.client_id,
        Session {
            sequence: cmd.sequence,
            reply,
        },
    );
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
        self.sessions.insert(client_id, session);
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

    #[test]
    fn insert_new_then_existing() {
        let mut s = MemState::new();
        assert_eq!(apply(&mut s, &anon("a", Op::Insert(1))), Reply::Inserted);
        assert_eq!(s.get("a"), Some(1));
        assert_eq!(
            apply(&mut s, &anon("a", Op::Insert(2))),
            Reply::AlreadyExists
        );
        assert_eq!(s.get("a"), Some(1), "a failed insert changes nothing");
    }

    #[test]
    fn update_present_and_absent() {
        let mut s = MemState::new();
        assert_eq!(apply(&mut s, &anon("a", Op::Update(5))), Reply::NotFound);
        assert_eq!(s.get("a"), None, "update does not create the key");
        apply(&mut s, &anon("a", Op::Insert(1)));
        assert_eq!(
            apply(&mut s, &anon("a", Op::Update(5))),
            Reply::Updated { previous: 1 }
        );
        assert_eq!(s.get("a"), Some(5));
    }

    #[test]
    fn upsert_absent_then_present() {
        let mut s = MemState::new();
        assert_eq!(apply(&mut s, &anon("a", Op::Upsert(3))), Reply::Inserted);
        assert_eq!(s.get("a"), Some(3));
        assert_eq!(
            apply(&mut s, &anon("a", Op::Upsert(-4))),
            Reply::Updated { previous: 3 }
        );
        assert_eq!(s.get("a"), Some(-4));
    }

    #[test]
    fn remove_present_and_absent() {
        let mut s = MemState::new();
        assert_eq!(apply(&mut s, &anon("a", Op::Remove)), Reply::NotFound);
        apply(&mut s, &anon("a", Op::Insert(9)));
        assert_eq!(
            apply(&mut s, &anon("a", Op::Remove)),
            Reply::Removed { previous: 9 }
        );
        assert_eq!(s.get("a"), None);
        assert!(s.is_empty());
        assert_eq!(apply(&mut s, &anon("a", Op::Remove)), Reply::NotFound);
    }

    #[test]
    fn retry_is_applied_once_with_first_reply() {
        let mut s = MemState::new();
        let first = from_client(1, 1, "a", Op::Upsert(10));
        assert_eq!(apply(&mut s, &first), Reply::Inserted);
        // Another client changes the key between the original and the retry.
        apply(&mut s, &anon("a", Op::Update(20)));
        let before = s.clone();
        // The retry is answered with the first reply, not re-applied (which
        // would answer Updated { previous: 20 } and set the key back to 10).
        assert_eq!(apply(&mut s, &first), Reply::Inserted);
        assert_eq!(s.get("a"), Some(20));
        assert_eq!(s, before, "a retry changes nothing");
        // A retry with another proposal id is still the same write.
        let again = Command {
            proposal_id: 99,
            ..first.clone()
        };
        assert_eq!(apply(&mut s, &again), Reply::Inserted);
        assert_eq!(s, before);
    }

    #[test]
    fn retry_of_failed_write_repeats_failure() {
        let mut s = MemState::new();
        let remove = from_client(1, 1, "a", Op::Remove);
        assert_eq!(apply(&mut s, &remove), Reply::NotFound);
        apply(&mut s, &anon("a", Op::Insert(1)));
        assert_eq!(apply(&mut s, &remove), Reply::NotFound);
        assert_eq!(s.get("a"), Some(1));
    }

    #[test]
    fn stale_sequence_is_refused_and_changes_nothing() {
        let mut s = MemState::new();
        apply(&mut s, &from_client(1, 5, "a", Op::Insert(1)));
        let before = s.clone();
        assert_eq!(
            apply(&mut s, &from_client(1, 4, "a", Op::Update(2))),
            Reply::Stale { last: 5 }
        );
        assert_eq!(s, before, "neither the key nor the session changed");
        assert_eq!(
            s.session(1),
            Some(Session {
                sequence: 5,
                reply: Reply::Inserted
            })
        );
    }

    #[test]
    fn later_sequence_is_applied_and_recorded() {
        let mut s = MemState::new();
        apply(&mut s, &from_client(1, 1, "a", Op::Insert(1)));
        // Sequences need not be contiguous: a gap is applied normally.
        assert_eq!(
            apply(&mut s, &from_client(1, 3, "a", Op::Update(2))),
            Reply::Updated { previous: 1 }
        );
        assert_eq!(
            s.session(1),
            Some(Session {
                sequence: 3,
                reply: Reply::Updated { previous: 1 }
            })
        );
    }

    #[test]
    fn sessions_are_per_client() {
        let mut s = MemState::new();
        assert_eq!(
            apply(&mut s, &from_client(1, 1, "a", Op::Insert(1))),
            Reply::Inserted
        );
        // Same sequence, other client: a different write, applied.
        assert_eq!(
            apply(&mut s, &from_client(2, 1, "a", Op::Insert(2))),
            Reply::AlreadyExists
        );
        assert_eq!(s.session(1).map(|x| x.reply), Some(Reply::Inserted));
        assert_eq!(s.session(2).map(|x| x.reply), Some(Reply::AlreadyExists));
    }

    #[test]
    fn client_zero_never_dedups() {
        let mut s = MemState::new();
        let cmd = anon("a", Op::Upsert(1));
        assert_eq!(apply(&mut s, &cmd), Reply::Inserted);
        // The same (0, 0) again is a new write, not a retry.
        assert_eq!(apply(&mut s, &cmd), Reply::Updated { previous: 1 });
        assert_eq!(s.session(0), None, "client 0 has no session");
    }

    #[test]
    fn digest_tracks_state() {
        let mut a = MemState::new();
        let mut b = MemState::new();
        assert_eq!(a.digest(), b.digest());
        apply(&mut a, &from_client(1, 1, "x", Op::Insert(1)));
        assert_ne!(a.digest(), b.digest());
        apply(&mut b, &from_client(1, 1, "x", Op::Insert(1)));
        assert_eq!(a, b);
        assert_eq!(a.digest(), b.digest());
        assert_eq!(a.len(), 1);
        // Same keys and values, different sessions: different digests.
        let mut c = MemState::new();
        apply(&mut c, &anon("x", Op::Insert(1)));
        assert_ne!(a.digest(), c.digest());
    }

    #[test]
    fn command_round_trip_every_op() {
        for op in [
            Op::Insert(1),
            Op::Update(-2),
            Op::Upsert(i32::MAX),
            Op::Upsert(0),
            Op::Remove,
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
        let valid = from_client(1, 1, "k", Op::Insert(1));
        assert_eq!(valid.validate(), Ok(()));
        assert!(Command::may_enter_log(&valid.encode()));
        assert!(Command::may_enter_log(
            &anon(&"k".repeat(MAX_KEY_BYTES), Op::Remove).encode()
        ));
        let invalid = [
            anon("", Op::Remove),
            anon(&"k".repeat(MAX_KEY_BYTES + 1), Op::Remove),
            from_client(1, 0, "k", Op::Remove),
            from_client(0, 1, "k", Op::Remove),
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

    fn every_reply() -> [Reply; 8] {
        [
            Reply::Inserted,
            Reply::Updated { previous: -1 },
            Reply::Updated { previous: i32::MIN },
            Reply::Removed { previous: 7 },
            Reply::AlreadyExists,
            Reply::NotFound,
            Reply::Stale { last: 0 },
            Reply::Stale { last: u64::MAX },
        ]
    }

    #[test]
    fn session_bytes_round_trip() {
        for reply in every_reply() {
            let session = Session {
                sequence: 0x0102_0304_0506_0708,
                reply,
            };
            let bytes = session.to_bytes();
            assert_eq!(&bytes[..8], &0x0102_0304_0506_0708u64.to_le_bytes());
            assert_eq!(Session::from_bytes(&bytes), Ok(session));
        }
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
        bad_tag.push(200);
        assert_eq!(
            Session::from_bytes(&bad_tag),
            Err(DecodeError::UnknownReplyTag(200))
        );
        for reply in every_reply() {
            let bytes = Session { sequence: 1, reply }.to_bytes();
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
        for len in 0..20u8 {
            let junk: Vec<u8> = (0..len).map(|i| i.wrapping_mul(37) ^ len).collect();
            let _ = Session::from_bytes(&junk);
        }
    }
}
