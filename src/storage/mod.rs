//! The one place that touches the disk: the acceptor's durable state (the
//! Paxos log) and the state machine, each in the store that suits it.
//!
//! # Layout
//!
//! A data directory holds:
//!
//! - `log/`: the Paxos log, an append-only [`crate::wal`] of the promise and
//!   the votes (see `acceptor_log.rs` for its records). Every
//!   [`Storage::persist`] is one group commit: one `pwrite` and one
//!   `fdatasync`, whatever it holds.
//! - `state/`: a sled 0.34.7 database with the state machine only: `kv`,
//!   the dedup `sessions`, the applied index and the digest of the state
//!   (see `state_machine.rs`), and a `seal` file. Applied in one
//!   transaction per batch, never fsynced on that path: a slot is applied
//!   only once it is durable in the log, so whatever sled loses in a crash
//!   is applied again from the log. Checked against its digest and seal on
//!   every open: a damaged state is [`StorageError::StateDamaged`].
//! - `state.install/`, `state.new/`, `state.old/`: a snapshot being
//!   installed, and the steps of its switch (see `snapshot.rs`).
//!
//! A directory written by paxoskv 0.1, one sled database holding
//! everything, is migrated on open (`upgrade.rs`).
//!
//! # Durability
//!
//! An acceptor must not answer a prepare or an accept before the promise or
//! vote it answers with would survive a power loss: [`Storage::persist`]
//! returns only after the log's `fdatasync`. [`Storage::flush`] makes the
//! state machine durable too (sled's flush, then an fsync of its files:
//! sled's own `flush` is only a `sync_file_range`, see `state_machine.rs`).

mod acceptor_log;
pub mod identity;
mod snapshot;
mod state_machine;
mod upgrade;

pub use snapshot::{CHUNK_BYTES, SnapshotChunk, SnapshotInstall, SnapshotMeta, SnapshotReader};
pub use state_machine::Digest;

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::kv::{self, SessionLimits};
use crate::paxos::{Accepted, Ballot, Membership, Persist, Slot, Value};
use crate::wal::WalError;

use acceptor_log::AcceptorLog;
use snapshot::StateSlot;
use state_machine::StateMachine;

/// The size of new log segments unless told otherwise.
pub const DEFAULT_SEGMENT_BYTES: u64 = acceptor_log::SEGMENT_BYTES;

/// The log's directory, inside the data directory.
const LOG_DIR: &str = "log";
/// The state machine's directory, inside the data directory.
const STATE_DIR: &str = "state";

/// Why a storage operation failed.
#[derive(Debug)]
pub enum StorageError {
    /// Another process (or another `Storage` in this one) holds the data
    /// directory's lock.
    InUse(PathBuf),
    /// A file system operation of our own failed: what we were doing, and
    /// the error.
    Io(String, io::Error),
    /// Stored bytes do not decode: the message names where they are.
    Corrupt(String),
    /// The Paxos log could not be opened or written (a damaged segment is
    /// named by file and offset).
    Log(WalError),
    /// [`Storage::apply`] was given a slot that does not follow the applied
    /// index: applying it would skip the slots in between.
    OutOfOrder {
        /// The applied index when the slot was offered.
        applied: Slot,
        /// The slot offered.
        slot: Slot,
    },
    /// sled itself failed.
    Sled(sled::Error),
    /// The state machine's database in `dir` is damaged (lost or changed
    /// entries, unreadable bytes, a digest or seal that does not match):
    /// refused rather than served.
    StateDamaged {
        /// The database's directory.
        dir: PathBuf,
        /// What was found wrong, naming the file where it can.
        reason: String,
    },
    /// The data directory belongs to another replica or cluster, or its
    /// identity file does not parse (see [`identity`]).
    Identity(String),
    /// A snapshot install was begun while another is in progress.
    InstallBusy,
    /// A snapshot is at or below the applied index; installing it would
    /// move the state machine back.
    SnapshotBehind {
        /// The applied index of the current state.
        applied: Slot,
        /// The snapshot's applied index.
        snapshot: Slot,
    },
    /// The chunks of a snapshot install do not add up to what its sender
    /// said; nothing was installed.
    SnapshotMismatch {
        /// What the chunks received add up to.
        received: SnapshotMeta,
        /// What the sender said the snapshot holds.
        expected: SnapshotMeta,
    },
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageError::InUse(dir) => write!(
                f,
                "data directory {} is already in use by another paxoskv process",
                dir.display()
            ),
            StorageError::Io(what, e) => write!(f, "{what}: {e}"),
            StorageError::Corrupt(what) => write!(f, "corrupt storage: {what}"),
            StorageError::Identity(what) => write!(f, "{what}"),
            StorageError::Log(e) => write!(f, "{e}"),
            StorageError::OutOfOrder { applied, slot } => write!(
                f,
                "cannot apply slot {slot}: the applied index is {applied}, and slots apply in order"
            ),
            StorageError::Sled(e) => write!(f, "sled: {e}"),
            StorageError::StateDamaged { dir, reason } => write!(
                f,
                "the state machine in {} is damaged, refusing to serve it: {reason}",
                dir.display()
            ),
            StorageError::InstallBusy => f.write_str("a snapshot install is already in progress"),
            StorageError::SnapshotBehind { applied, snapshot } => write!(
                f,
                "cannot install a snapshot at applied index {snapshot}: the state machine is already at {applied}"
            ),
            StorageError::SnapshotMismatch { received, expected } => write!(
                f,
                "snapshot not installed: the chunks received add up to {} at applied index {}, the sender said {} at {}",
                received.digest, received.applied, expected.digest, expected.applied
            ),
        }
    }
}

impl std::error::Error for StorageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StorageError::Io(_, e) => Some(e),
            StorageError::Log(e) => Some(e),
            StorageError::Sled(e) => Some(e),
            _ => None,
        }
    }
}

impl From<sled::Error> for StorageError {
    fn from(e: sled::Error) -> Self {
        StorageError::Sled(e)
    }
}

impl From<sled::transaction::TransactionError<StorageError>> for StorageError {
    fn from(e: sled::transaction::TransactionError<StorageError>) -> Self {
        match e {
            sled::transaction::TransactionError::Abort(e) => e,
            sled::transaction::TransactionError::Storage(e) => StorageError::Sled(e),
        }
    }
}

impl From<WalError> for StorageError {
    fn from(e: WalError) -> Self {
        match e {
            WalError::InUse(dir) => StorageError::InUse(dir),
            e => StorageError::Log(e),
        }
    }
}

/// What the core is restored from after a restart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Durable {
    /// The highest ballot promised; [`Ballot::ZERO`] if none.
    pub promised: Ballot,
    /// Every vote in the log above `compacted`, in slot order.
    pub votes: Vec<Accepted>,
    /// The last slot applied to the state machine; 0 if none.
    pub applied: Slot,
    /// The state machine was last made durable at this slot; 0 if never.
    pub snapshot: Slot,
    /// The log holds no vote at or below this slot (at most `snapshot`);
    /// 0 if nothing was ever deleted.
    pub compacted: Slot,
    /// Whether this replica votes, as last recorded; `None` when the data
    /// directory holds nothing at all (new, or wiped).
    pub membership: Option<Membership>,
}

/// What [`Storage::checkpoint`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// The state machine is durable at this slot (its applied index when
    /// the checkpoint started), recorded in the log as the snapshot.
    pub snapshot: Slot,
    /// The log keeps no vote at or below this slot now.
    pub compacted: Slot,
    /// Log segments deleted.
    pub segments_deleted: usize,
    /// Entries (keys and sessions) in the state machine.
    pub entries: u64,
}

/// The durable state of one replica. `Send + Sync`: share it with an `Arc`
/// and call it from blocking threads.
pub struct Storage {
    /// Single writer: persists from several threads queue here, each one
    /// group commit.
    log: Mutex<AcceptorLog>,
    /// Swapped by a snapshot install.
    state: StateSlot,
    /// When the state machine forgets client sessions: the same on every
    /// replica ([`SessionLimits::DEFAULT`] unless a test says otherwise).
    session_limits: SessionLimits,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Storage").finish_non_exhaustive()
    }
}

impl Storage {
    /// Opens (creating) the data directory and returns what is durable in
    /// it; `cache_bytes` sizes sled's cache (callers pass e.g. 64 MiB, not
    /// sled's 1 GiB default). A directory in paxoskv 0.1's layout is
    /// migrated first.
    ///
    /// Fails with [`StorageError::InUse`] if another process, or another
    /// `Storage` in this process, has the directory open; with
    /// [`StorageError::Log`] if the log is damaged other than by a torn
    /// last write (which is truncated, with a WARN).
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<(Storage, Durable), StorageError> {
        Storage::open_with(dir, cache_bytes, acceptor_log::SEGMENT_BYTES)
    }

    /// [`Storage::open`], with new log segments of `segment_bytes` (tests
    /// use small ones to see rotation and compaction).
    pub fn open_with(
        dir: &Path,
        cache_bytes: u64,
        segment_bytes: u64,
    ) -> Result<(Storage, Durable), StorageError> {
        create_data_dir(dir)?;
        // Either error names the data directory, whichever part was locked.
        let in_use = |e| match e {
            StorageError::InUse(_) => StorageError::InUse(dir.to_path_buf()),
            e => e,
        };
        upgrade::migrate_if_needed(dir, cache_bytes).map_err(in_use)?;
        // The log first: its lock keeps a second process out before sled
        // is touched.
        let (log, replayed) =
            AcceptorLog::open(&dir.join(LOG_DIR), segment_bytes).map_err(in_use)?;
        upgrade::remove_leftovers(dir)?;
        snapshot::recover(dir)?;
        let mut log = log;
        let state_dir = dir.join(STATE_DIR);
        let damage = match StateMachine::open(&state_dir, cache_bytes).map_err(in_use) {
            Ok(state) => match state.applied()? {
                // The log says the state was durable at `snapshot`, and
                // the log no longer holds what lies below it.
                applied if applied < replayed.snapshot => Err((
                    state,
                    format!(
                        "the state machine in {} has applied up to slot {applied}, but the \
                         log records a snapshot at {}: it lost what it had made durable",
                        state_dir.display(),
                        replayed.snapshot
                    ),
                )),
                _ => Ok(state),
            },
            Err(e @ StorageError::StateDamaged { .. }) => Err((
                StateMachine::open_fresh(&state_dir, cache_bytes, &e)?,
                e.to_string(),
            )),
            Err(e) => return Err(e),
        };
        let (state, durable) = match damage {
            Ok(state) => {
                let durable = Durable {
                    promised: replayed.promised,
                    votes: replayed.votes.into_values().collect(),
                    applied: state.applied()?,
                    snapshot: replayed.snapshot,
                    compacted: replayed.compacted,
                    membership: replayed.membership,
                };
                (state, durable)
            }
            Err((state, why)) => {
                // Treated as a wiped replica: it may have voted for values
                // it can no longer produce, and serving a smaller state is
                // silent data loss. So it neither serves nor votes until
                // it has a snapshot from its peers and has rejoined.
                tracing::error!(
                    data_dir = %dir.display(),
                    damage = %why,
                    "the state machine cannot be trusted; starting over as a non-voting learner, to recover it from the peers"
                );
                let state = if state.applied()? == 0 {
                    state
                } else {
                    drop(state);
                    StateMachine::open_fresh(
                        &state_dir,
                        cache_bytes,
                        &StorageError::Corrupt(why.clone()),
                    )?
                };
                log.persist(&Persist {
                    membership: Some(Membership::Learner),
                    ..Persist::default()
                })?;
                let durable = Durable {
                    promised: replayed.promised,
                    votes: Vec::new(),
                    applied: 0,
                    snapshot: 0,
                    compacted: 0,
                    membership: Some(Membership::Learner),
                };
                (state, durable)
            }
        };
        sync_dir(dir)?;
        let storage = Storage {
            log: Mutex::new(log),
            state: StateSlot::new(dir, cache_bytes, state),
            session_limits: SessionLimits::DEFAULT,
        };
        Ok((storage, durable))
    }

    /// Makes a core [`Persist`] durable: appends the promise and the votes
    /// to the log (a later vote for a slot replaces an earlier one) and
    /// syncs it once. An empty `Persist` does nothing and counts no sync.
    pub fn persist(&self, p: &Persist) -> Result<(), StorageError> {
        self.log().persist(p)
    }

    /// Makes the state machine durable at its applied index A, records "snapshot
    /// at A" in the log, then deletes the log segments that hold only votes
    /// at or below `A - keep`: the `keep` slots below A stay, to serve
    /// followers that are a little behind from the log rather than with a
    /// snapshot.
    ///
    /// Runs beside `persist` and `apply`: it holds the log only while it
    /// appends the record and deletes segments, never during sled's flush.
    pub fn checkpoint(&self, keep: Slot) -> Result<Checkpoint, StorageError> {
        // Read first, then flush: the flush makes durable at least what
        // was applied when it started, so A is durable once it returns.
        let state = Arc::clone(&self.state.current());
        let snapshot = state.applied()?;
        state.flush()?;
        let entries = state.digest()?.entries;
        let mut log = self.log();
        let segments_deleted = log.compact(snapshot, snapshot.saturating_sub(keep))?;
        Ok(Checkpoint {
            snapshot,
            compacted: log.compacted(),
            segments_deleted,
            entries,
        })
    }

    /// The last snapshot recorded in the log; 0 if none.
    pub fn snapshot_index(&self) -> Slot {
        self.log().snapshot()
    }

    /// Makes the state machine durable (sled's flush, then fsyncs), for a
    /// clean shutdown: a restart then replays nothing.
    pub fn flush(&self) -> Result<(), StorageError> {
        self.state.current().flush()
    }

    /// Makes the state machine forget client sessions by `limits` instead
    /// of [`SessionLimits::DEFAULT`], from the next apply on. Every replica
    /// must use the same limits: this is for tests that want sessions to
    /// expire soon.
    pub fn set_session_limits(&mut self, limits: SessionLimits) {
        self.session_limits = limits;
    }

    /// Applies chosen slots in order, atomically with the applied index;
    /// see `StateMachine::apply`.
    pub fn apply(&self, entries: &[(Slot, Value)]) -> Result<Vec<(u64, kv::Reply)>, StorageError> {
        self.state.current().apply(entries, &self.session_limits)
    }

    /// The value of a key in the state machine.
    pub fn get(&self, key: &str) -> Result<Option<i32>, StorageError> {
        self.state.current().get(key)
    }

    /// Every key of the state machine with its value, in key order: for
    /// tests and tools that compare replicas' states. Reads the whole tree.
    pub fn entries(&self) -> Result<BTreeMap<String, i32>, StorageError> {
        self.state.current().entries()
    }

    /// The applied index: the last slot applied to the state machine, 0 if
    /// none.
    pub fn applied(&self) -> Result<Slot, StorageError> {
        self.state.current().applied()
    }

    /// Number of log syncs done so far by [`Storage::persist`] (one per
    /// non-empty call), for metrics and for tests that prove the sync
    /// precedes the reply.
    pub fn syncs(&self) -> u64 {
        self.log().syncs()
    }

    /// Fault injection, for tests of a failing disk: after `n` more
    /// successful log syncs, every sync fails as if `fdatasync` returned
    /// EIO (see [`crate::wal::Wal::fail_syncs_after`]).
    pub fn fail_syncs_after(&self, n: u64) {
        self.log().fail_syncs_after(n);
    }

    /// Total payload bytes appended to the log by [`Storage::persist`].
    pub fn bytes_written(&self) -> u64 {
        self.log().bytes_written()
    }

    /// Segment files of the log, and the bytes they take on disk.
    pub fn log_size(&self) -> (usize, u64) {
        self.log().size()
    }

    /// A reader of the state machine as of its applied index now, which
    /// yields exactly that state in chunks while [`Storage::apply`] goes on
    /// (see [`SnapshotReader`]). Several may run at once.
    pub fn snapshot_reader(&self) -> Result<SnapshotReader, StorageError> {
        self.state.reader()
    }

    /// Begins installing a snapshot at applied index `applied`, in a new
    /// database beside the current state, which keeps serving. One install
    /// at a time ([`StorageError::InstallBusy`]); a snapshot below the
    /// applied index is [`StorageError::SnapshotBehind`].
    pub fn begin_install(&self, applied: Slot) -> Result<SnapshotInstall, StorageError> {
        self.state.begin_install(applied)
    }

    /// Finishes an install: checks that its chunks add up to `expected`
    /// ([`StorageError::SnapshotMismatch`] otherwise, and nothing changes),
    /// makes it durable, and switches to it atomically. Then
    /// [`Storage::applied`] is `expected.applied`, and [`Storage::apply`]
    /// skips slots up to it. A crash at any point leaves, on the next
    /// open, the complete old state or the complete new one.
    pub fn finish_install(
        &self,
        install: SnapshotInstall,
        expected: SnapshotMeta,
    ) -> Result<(), StorageError> {
        let at = expected.applied;
        self.state.finish_install(install, expected, None)?;
        // The new state is sealed durable at `at`: the log's votes up to it
        // are stale now, and a restart must know the snapshot.
        self.log().compact(at, at)?;
        Ok(())
    }

    fn log(&self) -> std::sync::MutexGuard<'_, AcceptorLog> {
        // A panic while holding the lock can only come from a bug in the
        // log, which poisons itself on any failed write; keep going.
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn io_error(what: String, e: io::Error) -> StorageError {
    StorageError::Io(what, e)
}

fn sync_what(path: &Path) -> String {
    format!("fsync of {}", path.display())
}

/// Renames `dir/from` to `dir/to` and makes the rename durable.
fn rename(dir: &Path, from: &str, to: &str) -> Result<(), StorageError> {
    let (from, to) = (dir.join(from), dir.join(to));
    std::fs::rename(&from, &to).map_err(|e| {
        io_error(
            format!("renaming {} to {}", from.display(), to.display()),
            e,
        )
    })?;
    sync_dir(dir)
}

/// Removes a directory and everything in it; nothing there is fine.
fn remove_dir_if_present(path: &Path) -> Result<(), StorageError> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error(format!("removing {}", path.display()), e)),
    }
}

/// Creates the data directory `dir` if it does not exist, durably (its
/// parent is synced).
fn create_data_dir(dir: &Path) -> Result<(), StorageError> {
    if dir.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| io_error(format!("creating data directory {}", dir.display()), e))?;
    match dir.parent() {
        Some(parent) if parent.as_os_str().is_empty() => sync_dir(Path::new(".")),
        Some(parent) => sync_dir(parent),
        None => Ok(()),
    }
}

/// Fsyncs a directory, making the entries created in it durable.
fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    let d = std::fs::File::open(dir)
        .map_err(|e| io_error(format!("opening directory {}", dir.display()), e))?;
    d.sync_all().map_err(|e| io_error(sync_what(dir), e))
}

/// The 12 bytes of a ballot on disk: round, then node, big-endian.
fn encode_ballot(b: Ballot) -> [u8; 12] {
    let mut out = [0; 12];
    out[..8].copy_from_slice(&b.round.to_be_bytes());
    out[8..].copy_from_slice(&b.node.to_be_bytes());
    out
}

/// A ballot from its 12 bytes; `where_` names them in the error.
fn decode_ballot(bytes: &[u8], where_: &str) -> Result<Ballot, StorageError> {
    let (round, node) = bytes
        .split_first_chunk::<8>()
        .and_then(|(round, rest)| Some((round, <[u8; 4]>::try_from(rest).ok()?)))
        .ok_or_else(|| {
            StorageError::Corrupt(format!("{where_}: {} bytes, expected 12", bytes.len()))
        })?;
    Ok(Ballot::new(
        u64::from_be_bytes(*round),
        u32::from_be_bytes(node),
    ))
}

#[cfg(test)]
mod snapshot_tests;
#[cfg(test)]
mod tests;
