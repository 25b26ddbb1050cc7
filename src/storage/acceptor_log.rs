//! The acceptor's durable state as records in the write-ahead log.
//!
//! Each record's payload is one kind byte, then its body:
//!
//! - `1`, a promise: the ballot's 12 bytes (round, node; big-endian). The
//!   record's index is 0.
//! - `2`, a vote: an encoded `paxoskv.v1.AcceptedEntry` (slot, ballot,
//!   value). The record's index is the slot, so that
//!   [`crate::wal::Wal::purge_through`] can tell which segments hold only
//!   slots below a snapshot.
//! - `3`, a snapshot: the state machine was made durable at slot A, and
//!   the log keeps the votes above slot C <= A only (two u64s, big-endian:
//!   A, C). Index 0. The votes from C + 1 to A stay to serve followers a
//!   little behind from the log, rather than with a snapshot.
//! - `4`, the replica's membership: one byte, 1 for a voter, 2 for a
//!   learner (a replica rejoining after losing its disk). Index 0. A log
//!   with no membership record and nothing else is an empty data directory.
//!
//! Compaction appends the current promise and snapshot again, in one
//! commit, before deleting the oldest segments: records of index 0 never
//! keep a segment alive, so what is still needed must live in a newer one.
//!
//! Replay takes the last promise and, for each slot, the last vote: a later
//! record replaces an earlier one, as a later `Persist` does. The log's
//! CRCs catch damaged bytes; a record that passes them and still does not
//! decode is a bug or a file from another program, and is refused by name.

use std::collections::BTreeMap;
use std::path::Path;

use prost::Message as _;

use super::{StorageError, decode_ballot, encode_ballot};
use crate::paxos::{Accepted, Ballot, Membership, Persist, Slot};
use crate::pb;
use crate::wal::{Options, Record, Wal};
use crate::wire;

/// Kind byte of a promise record.
const PROMISE: u8 = 1;
/// Kind byte of a vote record.
const VOTE: u8 = 2;
/// Kind byte of a snapshot record.
const SNAPSHOT: u8 = 3;
/// Kind byte of a membership record.
const MEMBERSHIP: u8 = 4;

/// Size of each new log segment, by default. Small enough that the log of a replica that
/// snapshots every few thousand slots stays in a few segments, large
/// enough that rotations (each writes the new segment's zeros once) are
/// rare: about one per 50,000 group commits of one small vote.
pub(super) const SEGMENT_BYTES: u64 = 16 << 20;

/// What replaying the log found.
pub(super) struct Replayed {
    /// The last promise.
    pub(super) promised: Ballot,
    /// The last snapshot recorded; 0 if none.
    pub(super) snapshot: Slot,
    /// Votes at or below this slot were deleted; 0 if none.
    pub(super) compacted: Slot,
    /// The last membership recorded; `None` if none ever was.
    pub(super) membership: Option<Membership>,
    /// Per slot above `compacted`, the last vote.
    pub(super) votes: BTreeMap<Slot, Accepted>,
}

/// The open log and the counters the metrics read.
pub(super) struct AcceptorLog {
    wal: Wal,
    segment_bytes: u64,
    /// The promise and snapshot as last written, to write again before a
    /// compaction deletes the segments holding them.
    promised: Ballot,
    snapshot: Slot,
    compacted: Slot,
    membership: Option<Membership>,
    syncs: u64,
    bytes_written: u64,
    /// Reused between commits.
    records: Vec<Record>,
}

impl AcceptorLog {
    /// Opens the log in `dir` (creating it) and replays it: the promise
    /// and, per slot, the last vote.
    pub(super) fn open(
        dir: &Path,
        segment_bytes: u64,
    ) -> Result<(AcceptorLog, Replayed), StorageError> {
        let options = Options {
            segment_bytes,
            ..Options::default()
        };
        let (wal, records) = Wal::open(dir, options)?;
        let mut promised = Ballot::ZERO;
        let (mut snapshot, mut compacted) = (0, 0);
        let mut membership = None;
        let mut votes = BTreeMap::new();
        for (n, record) in records.iter().enumerate() {
            match decode(record).map_err(|why| {
                StorageError::Corrupt(format!("log {}, record {n}: {why}", dir.display()))
            })? {
                Decoded::Promise(b) => promised = b,
                Decoded::Vote(v) => {
                    votes.insert(v.slot, v);
                }
                Decoded::Membership(m) => membership = Some(m),
                Decoded::Snapshot { at, through } => {
                    snapshot = snapshot.max(at);
                    compacted = compacted.max(through);
                }
            }
        }
        // Votes at or below the compaction point may outlive it in a
        // segment that also holds later slots; the core no longer keeps
        // them, so neither does the replay.
        let votes = votes.split_off(&(compacted + 1));
        let log = AcceptorLog {
            wal,
            segment_bytes,
            promised,
            snapshot,
            compacted,
            membership,
            syncs: 0,
            bytes_written: 0,
            records: Vec::new(),
        };
        Ok((
            log,
            Replayed {
                promised,
                snapshot,
                compacted,
                membership,
                votes,
            },
        ))
    }

    /// Appends a core [`Persist`] and syncs it: one commit.
    pub(super) fn persist(&mut self, p: &Persist) -> Result<(), StorageError> {
        if p.is_empty() {
            return Ok(());
        }
        self.records.clear();
        // Membership, then the promise, then the votes: a crash keeps a
        // prefix of a commit's records, so a vote is never durable without
        // the promise and membership it implies.
        if let Some(m) = p.membership {
            self.records.push(membership_record(m));
        }
        if let Some(b) = p.promised {
            self.records.push(promise_record(b));
        }
        self.records.extend(p.entries.iter().map(vote_record));
        let bytes: usize = self.records.iter().map(|r| r.payload.len()).sum();
        let result = self.wal.commit(&self.records);
        self.records.clear();
        result?;
        if let Some(b) = p.promised {
            self.promised = b;
        }
        if p.membership.is_some() {
            self.membership = p.membership;
        }
        self.syncs += 1;
        self.bytes_written += bytes as u64;
        Ok(())
    }

    /// Records that the state machine is durable at `snapshot`, then
    /// deletes the oldest segments that hold no vote above `through`.
    /// Returns how many were deleted.
    ///
    /// The caller must have made the state machine durable at `snapshot`
    /// or later first: after this, the votes at or below it may be gone.
    pub(super) fn compact(&mut self, snapshot: Slot, through: Slot) -> Result<usize, StorageError> {
        assert!(through <= snapshot, "compacting past the snapshot");
        let snapshot = snapshot.max(self.snapshot);
        let through = through.max(self.compacted);
        let mut records = vec![snapshot_record(snapshot, through)];
        if self.promised != Ballot::ZERO {
            records.push(promise_record(self.promised));
        }
        if let Some(m) = self.membership {
            records.push(membership_record(m));
        }
        self.wal.commit(&records)?;
        self.snapshot = snapshot;
        self.compacted = through;
        Ok(self.wal.purge_through(through)?)
    }

    /// See [`Wal::fail_syncs_after`].
    pub(super) fn fail_syncs_after(&mut self, n: u64) {
        self.wal.fail_syncs_after(n);
    }

    /// The last snapshot recorded.
    pub(super) fn snapshot(&self) -> Slot {
        self.snapshot
    }

    /// No vote at or below this slot is kept.
    pub(super) fn compacted(&self) -> Slot {
        self.compacted
    }

    pub(super) fn syncs(&self) -> u64 {
        self.syncs
    }

    pub(super) fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    /// Segment files, and the bytes they take (segments are preallocated
    /// to their full size).
    pub(super) fn size(&self) -> (usize, u64) {
        let n = self.wal.segment_count();
        (n, n as u64 * self.segment_bytes)
    }
}

/// A record's meaning.
#[derive(Debug, PartialEq)]
enum Decoded {
    Promise(Ballot),
    Vote(Accepted),
    Snapshot { at: Slot, through: Slot },
    Membership(Membership),
}

fn membership_record(m: Membership) -> Record {
    let byte = match m {
        Membership::Voter => 1,
        Membership::Learner => 2,
    };
    Record {
        index: 0,
        payload: vec![MEMBERSHIP, byte],
    }
}

fn snapshot_record(at: Slot, through: Slot) -> Record {
    let mut payload = Vec::with_capacity(17);
    payload.push(SNAPSHOT);
    payload.extend_from_slice(&at.to_be_bytes());
    payload.extend_from_slice(&through.to_be_bytes());
    Record { index: 0, payload }
}

fn promise_record(b: Ballot) -> Record {
    let mut payload = Vec::with_capacity(13);
    payload.push(PROMISE);
    payload.extend_from_slice(&encode_ballot(b));
    Record { index: 0, payload }
}

fn vote_record(v: &Accepted) -> Record {
    let entry = wire::accepted_to_pb(v);
    let mut payload = Vec::with_capacity(1 + entry.encoded_len());
    payload.push(VOTE);
    entry
        .encode(&mut payload)
        .expect("a Vec grows to hold any message");
    Record {
        index: v.slot,
        payload,
    }
}

fn decode(record: &Record) -> Result<Decoded, String> {
    let Some((&kind, body)) = record.payload.split_first() else {
        return Err("empty record".into());
    };
    match kind {
        PROMISE => decode_ballot(body, "promise")
            .map(Decoded::Promise)
            .map_err(|e| e.to_string()),
        VOTE => {
            let entry = pb::AcceptedEntry::decode(body)
                .map_err(|e| format!("vote does not decode: {e}"))?;
            let vote = wire::accepted_from_pb(entry).map_err(|e| format!("vote: {e}"))?;
            if vote.slot != record.index {
                return Err(format!(
                    "vote for slot {} filed under index {}",
                    vote.slot, record.index
                ));
            }
            Ok(Decoded::Vote(vote))
        }
        SNAPSHOT => {
            let (at, through) = body
                .split_first_chunk::<8>()
                .and_then(|(at, rest)| Some((*at, <[u8; 8]>::try_from(rest).ok()?)))
                .ok_or_else(|| format!("snapshot: {} bytes, expected 16", body.len()))?;
            let (at, through) = (u64::from_be_bytes(at), u64::from_be_bytes(through));
            if through > at {
                return Err(format!("snapshot at {at} compacted through {through}"));
            }
            Ok(Decoded::Snapshot { at, through })
        }
        MEMBERSHIP => match body {
            [1] => Ok(Decoded::Membership(Membership::Voter)),
            [2] => Ok(Decoded::Membership(Membership::Learner)),
            _ => Err(format!("membership: {body:02x?}, expected 01 or 02")),
        },
        other => Err(format!("unknown record kind {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paxos::Value;
    use bytes::Bytes;

    #[test]
    fn records_round_trip_and_foreign_bytes_are_refused_by_name() {
        let b = Ballot::new(7, 2);
        assert_eq!(decode(&promise_record(b)), Ok(Decoded::Promise(b)));
        let v = Accepted {
            slot: 9,
            ballot: b,
            value: Value::Batch(vec![Bytes::from_static(b"x")]),
        };
        assert_eq!(decode(&vote_record(&v)), Ok(Decoded::Vote(v.clone())));
        assert_eq!(
            decode(&snapshot_record(77, 70)),
            Ok(Decoded::Snapshot {
                at: 77,
                through: 70
            })
        );
        for m in [Membership::Voter, Membership::Learner] {
            assert_eq!(decode(&membership_record(m)), Ok(Decoded::Membership(m)));
        }
        let bad = Record {
            index: 0,
            payload: vec![MEMBERSHIP, 3],
        };
        assert!(decode(&bad).unwrap_err().contains("membership: [03]"));
        assert!(
            decode(&snapshot_record(7, 8))
                .unwrap_err()
                .contains("compacted through 8")
        );

        let mut misfiled = vote_record(&v);
        misfiled.index = 8;
        assert!(
            decode(&misfiled)
                .unwrap_err()
                .contains("filed under index 8")
        );
        let unknown = Record {
            index: 0,
            payload: vec![99],
        };
        assert!(
            decode(&unknown)
                .unwrap_err()
                .contains("unknown record kind 99")
        );
        let short = Record {
            index: 0,
            payload: vec![PROMISE, 1, 2],
        };
        assert!(decode(&short).unwrap_err().contains("promise: 2 bytes"));
        let garbage = Record {
            index: 9,
            payload: vec![VOTE, 0x0a, 0xff, 0x01],
        };
        assert!(decode(&garbage).unwrap_err().contains("does not decode"));
    }
}
