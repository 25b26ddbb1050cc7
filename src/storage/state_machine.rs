//! The state machine in sled: `kv`, the dedup `sessions`, and the applied
//! index, in the data directory's `state/`.
//!
//! # Layout
//!
//! One sled 0.34.7 database with three trees:
//!
//! - `meta`: `applied` → the applied index (big-endian u64); absent means 0.
//! - `kv`: key (UTF-8 bytes) → value (`i32`, little-endian).
//! - `sessions`: client id (big-endian u64) → [`kv::Session::to_bytes`].
//!
//! # Durability
//!
//! [`StateMachine::apply`] writes one sled transaction per batch and never
//! syncs: a slot reaches it only once it is durable in the Paxos log, and
//! sled recovers a prefix of its transactions, so what a crash loses comes
//! back with a lower applied index and is applied again from the log.
//!
//! [`StateMachine::flush`] makes it durable, for a snapshot or a clean
//! shutdown. sled 0.34.7's `flush()` writes its buffers and then calls
//! `sync_file_range`, which is **not** an fsync: it flushes neither the
//! disk's volatile cache nor the file's size when sled grew the file. So
//! `flush` then calls `fdatasync` on sled's data file `db` through a handle
//! of our own (an fsync acts on the file, whatever descriptor it is called
//! on), and fsyncs any file that appeared in the directory or in `blobs/`
//! since the last flush (sled writes values too large for a quarter of a
//! segment to `blobs/<lsn>` and never fsyncs them), then the directory.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sled::Transactional;
use sled::transaction::{
    ConflictableTransactionError, TransactionalTree, UnabortableTransactionError,
};

use super::{StorageError, io_error, sync_dir, sync_what};
use crate::kv::{self, KvState};
use crate::paxos::{Slot, Value};

/// Key of the applied index in the `meta` tree.
pub(super) const APPLIED: &[u8] = b"applied";

/// The file sled 0.34.7 keeps its log-structured data in (`Config::path`).
pub(super) const SLED_DATA_FILE: &str = "db";
/// The directory sled 0.34.7 writes large values to, one file each.
const SLED_BLOB_DIR: &str = "blobs";

/// The replica's state machine.
pub(super) struct StateMachine {
    dir: PathBuf,
    db: sled::Db,
    pub(super) meta: sled::Tree,
    pub(super) kv: sled::Tree,
    pub(super) sessions: sled::Tree,
    /// Our own handle on sled's data file, to fsync it.
    data_file: File,
    /// Entries of the data and blob directories whose contents and
    /// directory entries are known durable. Held across the scan, so
    /// concurrent flushes do not race over it.
    pub(super) synced: Mutex<HashSet<PathBuf>>,
}

impl StateMachine {
    /// Opens (creating) the database in `dir`.
    pub(super) fn open(dir: &Path, cache_bytes: u64) -> Result<StateMachine, StorageError> {
        let created = !dir.exists();
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
        let sm = StateMachine {
            dir: dir.to_path_buf(),
            meta: db.open_tree("meta")?,
            kv: db.open_tree("kv")?,
            sessions: db.open_tree("sessions")?,
            db,
            data_file,
            synced: Mutex::new(HashSet::new()),
        };
        if created {
            sm.flush()?;
        }
        Ok(sm)
    }

    /// Copies the state machine of a paxoskv 0.1 database (same trees, same
    /// encodings) into this one, which must be new.
    pub(super) fn import(&self, old: &sled::Db) -> Result<(), StorageError> {
        for (name, to) in [("kv", &self.kv), ("sessions", &self.sessions)] {
            for item in old.open_tree(name)?.iter() {
                let (key, value) = item?;
                to.insert(key, value)?;
            }
        }
        if let Some(applied) = old.open_tree("meta")?.get(APPLIED)? {
            self.meta.insert(APPLIED, applied)?;
        }
        Ok(())
    }

    /// Writes everything to disk and fsyncs it (see the module doc).
    pub(super) fn flush(&self) -> Result<(), StorageError> {
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
    pub(super) fn apply(
        &self,
        entries: &[(Slot, Value)],
    ) -> Result<Vec<(u64, kv::Reply)>, StorageError> {
        // No fsync here, on purpose: see the module doc. `apply` is
        // deterministic, so slots applied again give the same replies.
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
    pub(super) fn get(&self, key: &str) -> Result<Option<i32>, StorageError> {
        match self.kv.get(key.as_bytes())? {
            Some(bytes) => decode_value(key, &bytes)
                .map(Some)
                .map_err(StorageError::Corrupt),
            None => Ok(None),
        }
    }

    /// Every key of the state machine with its value, in key order: for
    /// tests and tools that compare replicas' states. Reads the whole tree.
    pub(super) fn entries(&self) -> Result<BTreeMap<String, i32>, StorageError> {
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

    /// The applied index: the last slot applied to the state machine, 0 if
    /// none.
    pub(super) fn applied(&self) -> Result<Slot, StorageError> {
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
pub(super) fn is_lock_error(e: &sled::Error) -> bool {
    match e {
        sled::Error::Io(io) => {
            io.kind() == io::ErrorKind::WouldBlock
                || io.to_string().contains("could not acquire lock")
        }
        _ => false,
    }
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

/// A stored value of the `kv` tree; the error says what is wrong, naming
/// the tree and key.
fn decode_value(key: &str, bytes: &[u8]) -> Result<i32, String> {
    let raw: [u8; 4] = bytes
        .try_into()
        .map_err(|_| format!("tree kv, key {key:?}: {} bytes, expected 4", bytes.len()))?;
    Ok(i32::from_le_bytes(raw))
}
