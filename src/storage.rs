//! The one place that touches the disk: the acceptor's durable state, the
//! replicated log and the state machine, in one sled database.
//!
//! # Layout
//!
//! One sled 0.34.7 database in the data directory, with four trees:
//!
//! - `meta`: `promised` → the promised ballot (round as big-endian u64, then
//!   node as big-endian u32; 12 bytes), and `applied` → the applied index
//!   (big-endian u64). Absent means [`Ballot::ZERO`] and 0.
//! - `log`: slot (big-endian u64, so keys sort in slot order) → the vote
//!   as an encoded `paxoskv.v1.AcceptedEntry` (slot, ballot, value).
//! - `kv`: key (UTF-8 bytes) → value (`i32`, little-endian).
//! - `sessions`: client id (big-endian u64) → [`kv::Session::to_bytes`].
//!
//! # Durability
//!
//! An acceptor must not answer a prepare or an accept before the promise or
//! vote it answers with would survive a power loss. sled 0.34.7's `flush()`
//! writes its buffers and then calls `sync_file_range`, which starts and
//! waits for write-back of those pages but is **not** an fsync: it does not
//! flush the disk's volatile cache, nor the file's metadata (its size, when
//! sled grows the file). sled's own `sync_all` runs only in its background
//! flusher, every 500 ms. So [`Storage::persist`] does, in order:
//!
//! 1. one sled transaction writing the promise and the votes (so after a
//!    crash a `Persist` is there whole or not at all);
//! 2. `flush()`, so sled's in-memory buffers are in the file;
//! 3. `fdatasync` of sled's data file `<dir>/db`, through a handle of our
//!    own: an fsync acts on the file, whichever descriptor it is called on,
//!    so this makes durable everything sled wrote there, ours included;
//! 4. fsync of any file that appeared in `<dir>` or `<dir>/blobs` since the
//!    last persist, then of the directory that holds it. sled writes a value
//!    (or a tree node) too large for a quarter of a 512 KiB segment to a
//!    separate file `blobs/<lsn>` and **never** fsyncs it, nor the
//!    directory; a big batch in a log entry can take that path. Listing two
//!    directories costs microseconds next to the fsync.
//!
//! sled's log is recovered as a prefix after a crash, so everything written
//! before the fsync is there afterwards; writes after it (for example an
//! [`Storage::apply`] not yet covered by a later persist's fsync) may be
//! lost, and are redone from the durable log.
//!
//! [`Storage::open`] also fsyncs the directory, its files, and (when it
//! created it) the directory's parent, so that the directory entries of
//! `db`, `conf` and `blobs` exist after a power loss.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use prost::Message as _;
use sled::Transactional;
use sled::transaction::{
    ConflictableTransactionError, TransactionError, TransactionalTree, UnabortableTransactionError,
};

use crate::kv::{self, KvState};
use crate::paxos::{Accepted, Ballot, Persist, Slot, Value};
use crate::pb;
use crate::wire;

/// Key of the promised ballot in the `meta` tree.
const PROMISED: &[u8] = b"promised";
/// Key of the applied index in the `meta` tree.
const APPLIED: &[u8] = b"applied";

/// The file sled 0.34.7 keeps its log-structured data in, inside the data
/// directory (`Config::db_path`). Everything but large values lives here.
const SLED_DATA_FILE: &str = "db";
/// The directory sled 0.34.7 writes large values to, one file each.
const SLED_BLOB_DIR: &str = "blobs";

/// Why a storage operation failed.
#[derive(Debug)]
pub enum StorageError {
    /// Another process (or another `Storage` in this one) holds the data
    /// directory's lock.
    InUse(PathBuf),
    /// A file system operation of our own failed: what we were doing, and
    /// the error.
    Io(String, io::Error),
    /// Stored bytes do not decode: the message names the tree and key.
    Corrupt(String),
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
            StorageError::OutOfOrder { applied, slot } => write!(
                f,
                "cannot apply slot {slot}: the applied index is {applied}, and slots apply in order"
            ),
            StorageError::Sled(e) => write!(f, "sled: {e}"),
        }
    }
}

impl std::error::Error for StorageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StorageError::Io(_, e) => Some(e),
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

impl From<TransactionError<StorageError>> for StorageError {
    fn from(e: TransactionError<StorageError>) -> Self {
        match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => StorageError::Sled(e),
        }
    }
}

/// What the core is restored from after a restart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Durable {
    /// The highest ballot promised; [`Ballot::ZERO`] if none.
    pub promised: Ballot,
    /// Every vote in the log, in slot order.
    pub votes: Vec<Accepted>,
    /// The last slot applied to the state machine; 0 if none.
    pub applied: Slot,
}

/// The durable state of one replica. `Send + Sync`: share it with an `Arc`
/// and call it from blocking threads.
pub struct Storage {
    dir: PathBuf,
    db: sled::Db,
    meta: sled::Tree,
    log: sled::Tree,
    kv: sled::Tree,
    sessions: sled::Tree,
    /// Our own handle on sled's data file, to fsync it.
    data_file: File,
    /// Names of the entries of the data and blob directories whose contents
    /// and directory entries are known durable. Held across the scan, so
    /// concurrent persists do not race over it.
    synced: Mutex<HashSet<PathBuf>>,
    syncs: AtomicU64,
    bytes_written: AtomicU64,
}

impl Storage {
    /// Opens (creating) the data directory; `cache_bytes` sizes sled's cache
    /// (callers pass e.g. 64 MiB, not sled's 1 GiB default).
    ///
    /// Fails with [`StorageError::InUse`] if another process, or another
    /// `Storage` in this process, has the directory open.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Storage, StorageError> {
        let created = !dir.exists();
        std::fs::create_dir_all(dir)
            .map_err(|e| io_error(format!("creating data directory {}", dir.display()), e))?;
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .open()
            .map_err(|e| {
                if is_lock_error(&e) {
                    StorageError::InUse(dir.to_path_buf())
                } else {
                    StorageError::Sled(e)
                }
            })?;
        let data_path = dir.join(SLED_DATA_FILE);
        // Opened for writing only because some platforms refuse to fsync a
        // read-only handle; we never write through it. Not created: if sled
        // ever stops writing `db`, we must fail rather than sync nothing.
        let data_file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&data_path)
            .map_err(|e| io_error(format!("opening sled data file {}", data_path.display()), e))?;
        let storage = Storage {
            dir: dir.to_path_buf(),
            meta: db.open_tree("meta")?,
            log: db.open_tree("log")?,
            kv: db.open_tree("kv")?,
            sessions: db.open_tree("sessions")?,
            db,
            data_file,
            synced: Mutex::new(HashSet::new()),
            syncs: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
        };
        // Make the directory itself durable: sled creates `db`, `conf` and
        // `blobs` but syncs neither `conf` nor any directory.
        storage
            .data_file
            .sync_all()
            .map_err(|e| io_error(sync_what(&data_path), e))?;
        storage.sync_new_entries()?;
        // A directory we created is itself an entry in its parent.
        if created && let Some(parent) = dir.parent() {
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            sync_dir(parent)?;
        }
        Ok(storage)
    }

    /// What the core is restored from: the promise, every vote in the log,
    /// and the applied index.
    pub fn load(&self) -> Result<Durable, StorageError> {
        let promised = match self.meta.get(PROMISED)? {
            Some(bytes) => decode_ballot(&bytes)?,
            None => Ballot::ZERO,
        };
        let mut votes = Vec::new();
        for item in self.log.iter() {
            let (key, bytes) = item?;
            let slot = decode_slot_key(&key)?;
            let entry = pb::AcceptedEntry::decode(bytes.as_ref())
                .map_err(|e| corrupt_log(slot, &e.to_string()))?;
            let vote =
                wire::accepted_from_pb(entry).map_err(|e| corrupt_log(slot, &e.to_string()))?;
            if vote.slot != slot {
                return Err(corrupt_log(
                    slot,
                    &format!("entry is for slot {}", vote.slot),
                ));
            }
            votes.push(vote);
        }
        Ok(Durable {
            promised,
            votes,
            applied: self.applied()?,
        })
    }

    /// Makes a core [`Persist`] durable: writes the promise and the votes
    /// (later votes for a slot replace earlier ones), then flushes sled and
    /// fsyncs its files (see the module doc).
    ///
    /// One flush and one fsync per call, whatever its size: the caller
    /// batches (group commit). An empty `Persist` does nothing and counts no
    /// sync.
    pub fn persist(&self, p: &Persist) -> Result<(), StorageError> {
        if p.is_empty() {
            return Ok(());
        }
        // Encode outside the transaction: its closure may run more than once.
        let promised = p.promised.map(encode_ballot);
        let votes: Vec<([u8; 8], Vec<u8>)> = p
            .entries
            .iter()
            .map(|a| {
                (
                    a.slot.to_be_bytes(),
                    wire::accepted_to_pb(a).encode_to_vec(),
                )
            })
            .collect();
        let mut bytes = 0;
        if let Some(b) = &promised {
            bytes += PROMISED.len() + b.len();
        }
        bytes += votes.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();

        (&self.meta, &self.log).transaction(|(meta, log)| {
            if let Some(b) = &promised {
                meta.insert(PROMISED, b.as_slice())?;
            }
            for (key, value) in &votes {
                log.insert(key, value.as_slice())?;
            }
            Ok::<_, ConflictableTransactionError<StorageError>>(())
        })?;

        self.db.flush()?;
        self.data_file
            .sync_data()
            .map_err(|e| io_error(sync_what(&self.dir.join(SLED_DATA_FILE)), e))?;
        self.sync_new_entries()?;

        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.bytes_written
            .fetch_add(bytes as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Writes everything to disk and fsyncs it, state machine included; for a
    /// clean shutdown (a restart then replays nothing).
    pub fn flush(&self) -> Result<(), StorageError> {
        self.db.flush()?;
        self.data_file
            .sync_data()
            .map_err(|e| io_error(sync_what(&self.dir.join(SLED_DATA_FILE)), e))?;
        self.sync_new_entries()
    }

    /// Applies chosen slots in order, atomically with the applied index: one
    /// sled transaction over `kv`, `sessions` and `meta` per call, so a crash
    /// leaves either all of the call's slots applied or none.
    ///
    /// A slot at or below the stored applied index is skipped (never applied
    /// twice); a slot that is not the applied index + 1 is
    /// [`StorageError::OutOfOrder`] (never skipped), and nothing of the call
    /// is applied. Returns, for every client command applied, its
    /// `proposal_id` and the state machine's reply. A command that does not
    /// decode is [`StorageError::Corrupt`].
    pub fn apply(&self, entries: &[(Slot, Value)]) -> Result<Vec<(u64, kv::Reply)>, StorageError> {
        // No fsync here, on purpose: a slot is applied only once its value is
        // durable in the log (the core hands out chosen slots after the
        // persist that holds them). If a crash loses this transaction, the
        // applied index comes back lower, with the state that goes with it,
        // and the driver re-applies the same slots from the log; `apply` is
        // deterministic, so the replies are the same. The next persist's
        // fsync makes it durable anyway, as sled recovers a prefix.
        let replies =
            (&self.kv, &self.sessions, &self.meta).transaction(|(kv_tree, sessions, meta)| {
                let mut applied = decode_applied(meta.get(APPLIED)?.as_deref())
                    .map_err(ConflictableTransactionError::Abort)?;
                let start = applied;
                let mut state = TxState {
                    kv: kv_tree,
                    sessions,
                    failure: RefCell::new(None),
                };
                let mut replies = Vec::new();
                for (slot, value) in entries {
                    let slot = *slot;
                    if slot <= applied {
                        continue;
                    }
                    if slot != applied + 1 {
                        return Err(ConflictableTransactionError::Abort(
                            StorageError::OutOfOrder { applied, slot },
                        ));
                    }
                    if let Value::Batch(commands) = value {
                        for (i, bytes) in commands.iter().enumerate() {
                            let cmd = kv::Command::decode(bytes).map_err(|e| {
                                ConflictableTransactionError::Abort(StorageError::Corrupt(format!(
                                    "slot {slot}, command {i}: {e}"
                                )))
                            })?;
                            let reply = kv::apply(&mut state, &cmd);
                            // A failed read made `apply` see a wrong state: drop
                            // the whole transaction (or retry it on a conflict).
                            state.check()?;
                            replies.push((cmd.proposal_id, reply));
                        }
                    }
                    applied = slot;
                }
                if applied != start {
                    meta.insert(APPLIED, &applied.to_be_bytes())?;
                }
                Ok(replies)
            })?;
        Ok(replies)
    }

    /// The value of a key in the state machine.
    pub fn get(&self, key: &str) -> Result<Option<i32>, StorageError> {
        match self.kv.get(key.as_bytes())? {
            Some(bytes) => decode_value(key, &bytes)
                .map(Some)
                .map_err(StorageError::Corrupt),
            None => Ok(None),
        }
    }

    /// Every key of the state machine with its value, in key order: for
    /// tests and tools that compare replicas' states. Reads the whole tree.
    pub fn entries(&self) -> Result<BTreeMap<String, i32>, StorageError> {
        let mut out = BTreeMap::new();
        for item in self.kv.iter() {
            let (key, bytes) = item?;
            let key = String::from_utf8(key.to_vec()).map_err(|_| {
                StorageError::Corrupt(format!("tree kv, key {:02x?}: not UTF-8", key.as_ref()))
            })?;
            let value = decode_value(&key, &bytes).map_err(StorageError::Corrupt)?;
            out.insert(key, value);
        }
        Ok(out)
    }

    /// Number of fsyncs done so far by [`Storage::persist`] (one per
    /// non-empty call), for metrics and for tests that prove the sync
    /// precedes the reply.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// Total bytes (keys and values) written by [`Storage::persist`].
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written.load(Ordering::Relaxed)
    }

    /// The applied index: the last slot applied to the state machine, 0 if
    /// none.
    pub fn applied(&self) -> Result<Slot, StorageError> {
        decode_applied(self.meta.get(APPLIED)?.as_deref())
    }

    /// Fsyncs every file that appeared in the data or blob directory since
    /// the last call, then the directory holding it, so that a file sled
    /// created (a blob, `conf`, a snapshot) exists with its contents after a
    /// power loss. `db` itself is synced by the caller.
    fn sync_new_entries(&self) -> Result<(), StorageError> {
        // A poisoned lock only means another thread panicked mid-scan; the
        // set is still a sound under-approximation, so keep going.
        let mut synced = self.synced.lock().unwrap_or_else(|e| e.into_inner());
        let mut seen = HashSet::new();
        for dir in [self.dir.clone(), self.dir.join(SLED_BLOB_DIR)] {
            let listing = match std::fs::read_dir(&dir) {
                Ok(listing) => listing,
                // sled creates `blobs` at open; tolerate its absence anyway.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_error(format!("listing {}", dir.display()), e)),
            };
            let mut any_new = false;
            for entry in listing {
                let path = entry
                    .map_err(|e| io_error(format!("listing {}", dir.display()), e))?
                    .path();
                if path.file_name() == Some(SLED_DATA_FILE.as_ref()) && dir == self.dir {
                    continue;
                }
                if !synced.contains(&path) {
                    match File::open(&path) {
                        Ok(f) => f.sync_all().map_err(|e| io_error(sync_what(&path), e))?,
                        // Removed since the listing (sled collects old blobs
                        // and renames snapshots): nothing left to sync.
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(io_error(format!("opening {}", path.display()), e)),
                    }
                    any_new = true;
                }
                seen.insert(path);
            }
            if any_new {
                sync_dir(&dir)?;
            }
        }
        *synced = seen;
        Ok(())
    }
}

/// The state machine's view of an open apply transaction.
///
/// [`KvState`] cannot fail, but a read inside a sled transaction can (a
/// conflict, an I/O error, corrupt bytes). The first failure is kept here,
/// later calls do nothing, and [`TxState::check`] turns it into the
/// transaction's error after each command, so nothing computed from a failed
/// read is ever committed.
struct TxState<'a> {
    kv: &'a TransactionalTree,
    sessions: &'a TransactionalTree,
    failure: RefCell<Option<TxFailure>>,
}

enum TxFailure {
    Sled(UnabortableTransactionError),
    Corrupt(String),
}

impl TxState<'_> {
    fn fail(&self, failure: TxFailure) {
        self.failure.borrow_mut().get_or_insert(failure);
    }

    fn failed(&self) -> bool {
        self.failure.borrow().is_some()
    }

    /// The first failure, as the transaction's error: a conflict makes sled
    /// run the transaction again, anything else aborts it.
    fn check(&self) -> Result<(), ConflictableTransactionError<StorageError>> {
        match self.failure.borrow_mut().take() {
            None => Ok(()),
            Some(TxFailure::Sled(e)) => Err(e.into()),
            Some(TxFailure::Corrupt(what)) => Err(ConflictableTransactionError::Abort(
                StorageError::Corrupt(what),
            )),
        }
    }
}

impl KvState for TxState<'_> {
    fn get(&self, key: &str) -> Option<i32> {
        if self.failed() {
            return None;
        }
        match self.kv.get(key.as_bytes()) {
            Ok(Some(bytes)) => match decode_value(key, &bytes) {
                Ok(v) => Some(v),
                Err(what) => {
                    self.fail(TxFailure::Corrupt(what));
                    None
                }
            },
            Ok(None) => None,
            Err(e) => {
                self.fail(TxFailure::Sled(e));
                None
            }
        }
    }

    fn put(&mut self, key: &str, value: i32) {
        if self.failed() {
            return;
        }
        if let Err(e) = self.kv.insert(key.as_bytes(), &value.to_le_bytes()) {
            self.fail(TxFailure::Sled(e));
        }
    }

    fn delete(&mut self, key: &str) {
        if self.failed() {
            return;
        }
        if let Err(e) = self.kv.remove(key.as_bytes()) {
            self.fail(TxFailure::Sled(e));
        }
    }

    fn session(&self, client_id: u64) -> Option<kv::Session> {
        if self.failed() {
            return None;
        }
        match self.sessions.get(client_id.to_be_bytes()) {
            Ok(Some(bytes)) => match kv::Session::from_bytes(&bytes) {
                Ok(s) => Some(s),
                Err(e) => {
                    self.fail(TxFailure::Corrupt(format!(
                        "tree sessions, client {client_id}: {e}"
                    )));
                    None
                }
            },
            Ok(None) => None,
            Err(e) => {
                self.fail(TxFailure::Sled(e));
                None
            }
        }
    }

    fn set_session(&mut self, client_id: u64, session: kv::Session) {
        if self.failed() {
            return;
        }
        if let Err(e) = self
            .sessions
            .insert(&client_id.to_be_bytes(), session.to_bytes())
        {
            self.fail(TxFailure::Sled(e));
        }
    }
}

/// Whether sled failed to open because another handle holds the directory's
/// lock. sled 0.34.7 takes `flock(LOCK_EX | LOCK_NB)` on `db` and, when that
/// fails with `EWOULDBLOCK`, reports an `io::Error` of kind `Other` whose
/// message starts "could not acquire lock on". Match that, and the raw kind
/// in case a later patch release passes the error through.
fn is_lock_error(e: &sled::Error) -> bool {
    match e {
        sled::Error::Io(io) => {
            io.kind() == io::ErrorKind::WouldBlock
                || io.to_string().contains("could not acquire lock")
        }
        _ => false,
    }
}

fn io_error(what: String, e: io::Error) -> StorageError {
    StorageError::Io(what, e)
}

fn sync_what(path: &Path) -> String {
    format!("fsync of {}", path.display())
}

/// Fsyncs a directory, making the entries created in it durable.
fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    // Opening a directory as a file works on Unix only; elsewhere there is
    // no directory fsync to do.
    #[cfg(unix)]
    {
        let d = File::open(dir)
            .map_err(|e| io_error(format!("opening directory {}", dir.display()), e))?;
        d.sync_all().map_err(|e| io_error(sync_what(dir), e))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

fn encode_ballot(b: Ballot) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    out.extend_from_slice(&b.round.to_be_bytes());
    out.extend_from_slice(&b.node.to_be_bytes());
    out
}

fn decode_ballot(bytes: &[u8]) -> Result<Ballot, StorageError> {
    let (round, node) = bytes
        .split_first_chunk::<8>()
        .and_then(|(round, rest)| Some((round, <[u8; 4]>::try_from(rest).ok()?)))
        .ok_or_else(|| {
            StorageError::Corrupt(format!(
                "tree meta, key promised: {} bytes, expected 12",
                bytes.len()
            ))
        })?;
    Ok(Ballot::new(
        u64::from_be_bytes(*round),
        u32::from_be_bytes(node),
    ))
}

fn decode_applied(bytes: Option<&[u8]>) -> Result<Slot, StorageError> {
    let Some(bytes) = bytes else { return Ok(0) };
    let raw: [u8; 8] = bytes.try_into().map_err(|_| {
        StorageError::Corrupt(format!(
            "tree meta, key applied: {} bytes, expected 8",
            bytes.len()
        ))
    })?;
    Ok(u64::from_be_bytes(raw))
}

fn decode_slot_key(key: &[u8]) -> Result<Slot, StorageError> {
    let raw: [u8; 8] = key.try_into().map_err(|_| {
        StorageError::Corrupt(format!(
            "tree log, key {key:02x?}: {} bytes, expected 8",
            key.len()
        ))
    })?;
    Ok(u64::from_be_bytes(raw))
}

fn corrupt_log(slot: Slot, what: &str) -> StorageError {
    StorageError::Corrupt(format!("tree log, slot {slot}: {what}"))
}

/// A stored value of the `kv` tree; the error says what is wrong, naming
/// the tree and key.
fn decode_value(key: &str, bytes: &[u8]) -> Result<i32, String> {
    let raw: [u8; 4] = bytes
        .try_into()
        .map_err(|_| format!("tree kv, key {key:?}: {} bytes, expected 4", bytes.len()))?;
    Ok(i32::from_le_bytes(raw))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{Command, Op, Reply};
    use bytes::Bytes;
    use std::sync::atomic::AtomicUsize;

    const CACHE: u64 = 8 << 20;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir()
                .join(format!("paxoskv-storage-{name}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn open(dir: &TempDir) -> Storage {
        Storage::open(&dir.0, CACHE).unwrap()
    }

    fn vote(slot: Slot, ballot: Ballot, value: Value) -> Accepted {
        Accepted {
            slot,
            ballot,
            value,
        }
    }

    fn cmd(proposal_id: u64, client_id: u64, sequence: u64, key: &str, op: Op) -> Bytes {
        Command {
            proposal_id,
            client_id,
            sequence,
            key: key.to_owned(),
            op,
        }
        .encode()
    }

    fn batch(commands: Vec<Bytes>) -> Value {
        Value::Batch(commands)
    }

    #[test]
    fn storage_and_errors_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Storage>();
        send_sync::<StorageError>();
    }

    #[test]
    fn fresh_directory_loads_empty() {
        let dir = TempDir::new("fresh");
        let s = open(&dir);
        assert_eq!(
            s.load().unwrap(),
            Durable {
                promised: Ballot::ZERO,
                votes: vec![],
                applied: 0
            }
        );
        assert!(
            dir.0.join(SLED_DATA_FILE).is_file(),
            "sled keeps its data in `db`"
        );
    }

    #[test]
    fn persist_and_load_round_trip_across_reopen() {
        let dir = TempDir::new("persist");
        let b1 = Ballot::new(1, 1);
        let b2 = Ballot::new(2, 3);
        {
            let s = open(&dir);
            s.persist(&Persist {
                membership: None,
                promised: Some(b1),
                entries: vec![
                    vote(1, b1, batch(vec![Bytes::from_static(b"x")])),
                    vote(2, b1, Value::Noop),
                ],
            })
            .unwrap();
            // A higher ballot promised, and slot 2 voted again under it:
            // the later vote replaces the earlier one.
            s.persist(&Persist {
                membership: None,
                promised: Some(b2),
                entries: vec![
                    vote(2, b2, batch(vec![Bytes::from_static(b"y"), Bytes::new()])),
                    vote(3, b2, Value::Batch(vec![])),
                ],
            })
            .unwrap();
            // Within one persist, a later entry for a slot wins too.
            s.persist(&Persist {
                membership: None,
                promised: None,
                entries: vec![
                    vote(4, b2, Value::Noop),
                    vote(4, b2, batch(vec![Bytes::from_static(b"z")])),
                ],
            })
            .unwrap();
        }
        let s = open(&dir);
        let d = s.load().unwrap();
        assert_eq!(d.promised, b2);
        assert_eq!(
            d.votes,
            vec![
                vote(1, b1, batch(vec![Bytes::from_static(b"x")])),
                vote(2, b2, batch(vec![Bytes::from_static(b"y"), Bytes::new()])),
                vote(3, b2, Value::Batch(vec![])),
                vote(4, b2, batch(vec![Bytes::from_static(b"z")])),
            ]
        );
        assert_eq!(d.applied, 0);
    }

    #[test]
    fn votes_load_in_slot_order_past_byte_boundaries() {
        // Big-endian keys sort numerically; little-endian ones would put
        // slot 256 before slot 2.
        let dir = TempDir::new("order");
        let s = open(&dir);
        let b = Ballot::new(1, 1);
        let slots = [300u64, 2, 256, 1, 1 << 40];
        s.persist(&Persist {
            membership: None,
            promised: None,
            entries: slots.iter().map(|&n| vote(n, b, Value::Noop)).collect(),
        })
        .unwrap();
        let loaded: Vec<Slot> = s.load().unwrap().votes.iter().map(|v| v.slot).collect();
        assert_eq!(loaded, vec![1, 2, 256, 300, 1 << 40]);
    }

    #[test]
    fn syncs_count_non_empty_persists_only() {
        let dir = TempDir::new("syncs");
        let s = open(&dir);
        assert_eq!((s.syncs(), s.bytes_written()), (0, 0));
        s.persist(&Persist::default()).unwrap();
        assert_eq!(
            (s.syncs(), s.bytes_written()),
            (0, 0),
            "empty persist does nothing"
        );
        s.persist(&Persist {
            membership: None,
            promised: Some(Ballot::new(1, 1)),
            entries: vec![],
        })
        .unwrap();
        assert_eq!(s.syncs(), 1);
        assert_eq!(s.bytes_written(), (PROMISED.len() + 12) as u64);
        let before = s.bytes_written();
        s.persist(&Persist {
            membership: None,
            promised: None,
            entries: (1..=50)
                .map(|n| vote(n, Ballot::new(1, 1), Value::Noop))
                .collect(),
        })
        .unwrap();
        assert_eq!(s.syncs(), 2, "one sync for a whole batch of votes");
        assert!(s.bytes_written() > before + 50 * 8);
    }

    #[test]
    fn large_values_go_to_blob_files_which_are_synced() {
        let dir = TempDir::new("blob");
        let s = open(&dir);
        // Over a quarter of sled's 512 KiB segment: sled writes it to
        // `blobs/<lsn>`, a file it never fsyncs itself.
        let big = Value::Batch(vec![Bytes::from(vec![7u8; 300 * 1024])]);
        let v = vote(1, Ballot::new(1, 1), big);
        s.persist(&Persist {
            membership: None,
            promised: None,
            entries: vec![v.clone()],
        })
        .unwrap();
        let blobs: Vec<PathBuf> = std::fs::read_dir(dir.0.join(SLED_BLOB_DIR))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(!blobs.is_empty(), "sled stored the large vote as a blob");
        let synced = s.synced.lock().unwrap();
        for blob in &blobs {
            assert!(synced.contains(blob), "{} not synced", blob.display());
        }
        drop(synced);
        drop(s);
        assert_eq!(open(&dir).load().unwrap().votes, vec![v]);
    }

    #[test]
    fn apply_is_atomic_with_the_applied_index_and_never_twice() {
        let dir = TempDir::new("apply");
        let s = open(&dir);
        let slot1 = (
            1,
            batch(vec![
                cmd(11, 0, 0, "a", Op::Upsert(1)),
                cmd(12, 0, 0, "a", Op::Upsert(2)),
            ]),
        );
        assert_eq!(
            s.apply(std::slice::from_ref(&slot1)).unwrap(),
            vec![(11, Reply::Inserted), (12, Reply::Updated { previous: 1 })]
        );
        assert_eq!(s.applied().unwrap(), 1);
        assert_eq!(s.get("a").unwrap(), Some(2));

        // The same slot again (client 0 never dedups, so re-applying it
        // would change the value): skipped, nothing replied, nothing changed.
        assert_eq!(s.apply(&[slot1]).unwrap(), vec![]);
        assert_eq!(s.get("a").unwrap(), Some(2));
        assert_eq!(s.applied().unwrap(), 1);

        // A gap is an error, and leaves everything as it was.
        let err = s
            .apply(&[(3, batch(vec![cmd(13, 0, 0, "a", Op::Remove)]))])
            .unwrap_err();
        assert!(
            matches!(
                err,
                StorageError::OutOfOrder {
                    applied: 1,
                    slot: 3
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("cannot apply slot 3"), "{err}");
        assert_eq!(s.get("a").unwrap(), Some(2));

        // All of a call or nothing: slot 2 is fine but slot 4 is a gap, so
        // slot 2 is not applied either.
        let slot2 = (2, batch(vec![cmd(14, 0, 0, "b", Op::Insert(5))]));
        let err = s.apply(&[slot2.clone(), (4, Value::Noop)]).unwrap_err();
        assert!(
            matches!(
                err,
                StorageError::OutOfOrder {
                    applied: 2,
                    slot: 4
                }
            ),
            "{err}"
        );
        assert_eq!(s.get("b").unwrap(), None);
        assert_eq!(s.applied().unwrap(), 1);

        // Skipped, applied, no-op, applied: one call.
        let slot3 = (3, Value::Noop);
        let slot4 = (4, batch(vec![cmd(15, 0, 0, "b", Op::Remove)]));
        assert_eq!(
            s.apply(&[(1, Value::Noop), slot2, slot3, slot4]).unwrap(),
            vec![(14, Reply::Inserted), (15, Reply::Removed { previous: 5 })]
        );
        assert_eq!(s.applied().unwrap(), 4);
        assert_eq!(s.get("b").unwrap(), None);
        assert_eq!(s.load().unwrap().applied, 4);
    }

    #[test]
    fn undecodable_command_is_corrupt_and_applies_nothing() {
        let dir = TempDir::new("badcmd");
        let s = open(&dir);
        let good = cmd(1, 0, 0, "a", Op::Insert(1));
        let err = s
            .apply(&[(
                1,
                batch(vec![good, Bytes::from_static(&[0x0a, 0xff, 0x01])]),
            )])
            .unwrap_err();
        assert!(matches!(err, StorageError::Corrupt(_)), "{err}");
        assert!(err.to_string().contains("slot 1, command 1"), "{err}");
        assert_eq!(s.get("a").unwrap(), None);
        assert_eq!(s.applied().unwrap(), 0);
    }

    #[test]
    fn dedup_survives_reopen() {
        let dir = TempDir::new("dedup");
        let write = cmd(21, 7, 1, "k", Op::Upsert(10));
        {
            let s = open(&dir);
            assert_eq!(
                s.apply(&[(1, batch(vec![write.clone()]))]).unwrap(),
                vec![(21, Reply::Inserted)]
            );
            // Someone else changes the key after the original write.
            s.apply(&[(2, batch(vec![cmd(22, 0, 0, "k", Op::Update(20))]))])
                .unwrap();
        }
        let s = open(&dir);
        // The retry, chosen again in a later slot, proposed anew: first
        // reply, not applied again (which would answer Updated and set 10).
        let retry = cmd(23, 7, 1, "k", Op::Upsert(10));
        assert_eq!(
            s.apply(&[(3, batch(vec![retry]))]).unwrap(),
            vec![(23, Reply::Inserted)]
        );
        assert_eq!(s.get("k").unwrap(), Some(20));
        assert_eq!(s.applied().unwrap(), 3);
        assert_eq!(s.entries().unwrap(), BTreeMap::from([("k".to_owned(), 20)]));
    }

    #[test]
    fn second_open_in_this_process_is_in_use() {
        let dir = TempDir::new("inuse");
        let first = open(&dir);
        let err = Storage::open(&dir.0, CACHE)
            .err()
            .expect("second open must fail");
        assert!(
            matches!(&err, StorageError::InUse(d) if *d == dir.0),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("already in use"), "{msg}");
        assert!(msg.contains(&dir.0.display().to_string()), "{msg}");
        // The first handle is unharmed, and once it is gone the directory
        // opens again.
        first
            .persist(&Persist {
                membership: None,
                promised: Some(Ballot::new(1, 1)),
                entries: vec![],
            })
            .unwrap();
        drop(first);
        assert_eq!(open(&dir).load().unwrap().promised, Ballot::new(1, 1));
    }

    /// Env var through which [`second_process_is_in_use`] hands its
    /// directory to the child test.
    const CHILD_DIR: &str = "PAXOSKV_STORAGE_TEST_CHILD_DIR";

    #[test]
    fn second_process_is_in_use() {
        let dir = TempDir::new("inuse-proc");
        let _first = open(&dir);
        // Run this test binary again, as another process, on the child test
        // below, which tries to open the same directory.
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "storage::tests::child_opens_dir",
                "--ignored",
                "--nocapture",
            ])
            .env(CHILD_DIR, &dir.0)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "child failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("CHILD: data directory"), "{stdout}");
        assert!(
            stdout.contains("is already in use by another paxoskv process"),
            "{stdout}"
        );
    }

    /// Run only by [`second_process_is_in_use`], in a separate process.
    #[test]
    #[ignore = "run by second_process_is_in_use in a child process"]
    fn child_opens_dir() {
        let dir =
            PathBuf::from(std::env::var_os(CHILD_DIR).expect("run by second_process_is_in_use"));
        match Storage::open(&dir, CACHE) {
            Err(e @ StorageError::InUse(_)) => println!("CHILD: {e}"),
            Err(e) => panic!("expected InUse, got {e:?}"),
            Ok(_) => panic!("the second process opened a directory in use"),
        }
    }

    #[test]
    fn corrupt_log_entry_is_reported_not_panicked() {
        let dir = TempDir::new("corrupt-log");
        let s = open(&dir);
        s.persist(&Persist {
            membership: None,
            promised: None,
            entries: vec![vote(1, Ballot::new(1, 1), Value::Noop)],
        })
        .unwrap();

        // Bytes that are not a protobuf message.
        s.log
            .insert(5u64.to_be_bytes(), &[0x0a, 0xff, 0x01][..])
            .unwrap();
        let err = s.load().unwrap_err();
        assert!(matches!(err, StorageError::Corrupt(_)), "{err:?}");
        assert!(err.to_string().contains("tree log, slot 5"), "{err}");

        // A valid message without its ballot.
        let no_ballot = pb::AcceptedEntry {
            slot: 5,
            ballot: None,
            value: Some(wire::value_to_pb(&Value::Noop)),
        };
        s.log
            .insert(5u64.to_be_bytes(), no_ballot.encode_to_vec())
            .unwrap();
        let err = s.load().unwrap_err().to_string();
        assert!(
            err.contains("tree log, slot 5") && err.contains("ballot is missing"),
            "{err}"
        );

        // An entry filed under the wrong slot.
        let wrong = wire::accepted_to_pb(&vote(6, Ballot::new(1, 1), Value::Noop));
        s.log
            .insert(5u64.to_be_bytes(), wrong.encode_to_vec())
            .unwrap();
        let err = s.load().unwrap_err().to_string();
        assert!(err.contains("entry is for slot 6"), "{err}");

        // A key that is not a slot.
        s.log.remove(5u64.to_be_bytes()).unwrap();
        s.log
            .insert(
                b"abc",
                wire::accepted_to_pb(&vote(1, Ballot::new(1, 1), Value::Noop)).encode_to_vec(),
            )
            .unwrap();
        let err = s.load().unwrap_err().to_string();
        assert!(
            err.contains("tree log") && err.contains("3 bytes, expected 8"),
            "{err}"
        );
    }

    #[test]
    fn corrupt_meta_kv_and_sessions_are_reported() {
        let dir = TempDir::new("corrupt-other");
        let s = open(&dir);

        s.meta.insert(PROMISED, &[1, 2, 3][..]).unwrap();
        let err = s.load().unwrap_err().to_string();
        assert!(err.contains("tree meta, key promised"), "{err}");
        s.meta.remove(PROMISED).unwrap();

        s.meta.insert(APPLIED, &[1][..]).unwrap();
        let err = s.applied().unwrap_err().to_string();
        assert!(err.contains("tree meta, key applied"), "{err}");
        assert!(s.apply(&[(1, Value::Noop)]).is_err());
        s.meta.remove(APPLIED).unwrap();

        // A stored value of the wrong width: get() and apply() both refuse,
        // and apply changes nothing.
        s.kv.insert("a", &[1, 2][..]).unwrap();
        let err = s.get("a").unwrap_err().to_string();
        assert!(err.contains("tree kv, key \"a\""), "{err}");
        let err = s.entries().unwrap_err().to_string();
        assert!(err.contains("tree kv, key \"a\""), "{err}");
        let err = s
            .apply(&[(1, batch(vec![cmd(1, 0, 0, "a", Op::Upsert(3))]))])
            .unwrap_err();
        assert!(matches!(err, StorageError::Corrupt(_)), "{err:?}");
        assert!(err.to_string().contains("tree kv, key \"a\""), "{err}");
        assert_eq!(s.applied().unwrap(), 0);

        // A corrupt session.
        s.sessions
            .insert(9u64.to_be_bytes(), &[0u8; 3][..])
            .unwrap();
        let err = s
            .apply(&[(1, batch(vec![cmd(1, 9, 1, "b", Op::Upsert(3))]))])
            .unwrap_err();
        assert!(err.to_string().contains("tree sessions, client 9"), "{err}");
        assert_eq!(s.get("b").unwrap(), None);
        assert_eq!(s.applied().unwrap(), 0);
    }
}
