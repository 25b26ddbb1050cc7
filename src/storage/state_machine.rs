//! The state machine in sled: `kv`, the dedup `sessions`, and the applied
//! index, in the data directory's `state/`.
//!
//! # Layout
//!
//! One sled 0.34.7 database with three trees:
//!
//! - `meta`: `applied` → the applied index (big-endian u64); absent means 0.
//!   `digest` → the [`Digest`] of `kv` and `sessions`: entry count, then
//!   sum (big-endian u64s); absent means empty.
//! - `kv`: key (UTF-8 bytes) → value (`i32`, little-endian).
//! - `sessions`: client id (big-endian u64) → [`kv::Session::to_bytes`].
//!
//! Sessions expire and are evicted by the slot they were last used at
//! ([`kv::apply_slot`]), so the state machine keeps them indexed by use:
//! in memory (a [`SessionIndex`]), built from `sessions` on open, and
//! changed with every committed batch. sled's transactions cannot scan a
//! tree, so the index cannot live in one.
//!
//! Beside sled's files, `seal` (written by [`StateMachine::flush`]) holds the
//! applied index and digest that the flush made durable, with a CRC.
//!
//! # Damage detection
//!
//! sled 0.34.7 checks a CRC per message but, on open, takes a damaged
//! message for a torn write and silently recovers only the log before it:
//! flipped or truncated bytes in `db` open as a smaller, self-consistent
//! state. Two checks make that an error ([`StorageError::StateDamaged`])
//! instead of a smaller state served:
//!
//! 1. The digest, kept in `meta` in the same transaction as every batch it
//!    describes: on open every entry is read, decoded and hashed, and the
//!    count and sum must equal the recorded ones. This catches entries lost
//!    or changed behind sled's back, or unreadable.
//! 2. The seal: sled may lose what was never flushed (the Paxos log applies
//!    it again), but never what a flush made durable. An applied index
//!    below the sealed one means sled lost durable data; equal to it, the
//!    digest must be the sealed one.
//!
//! What neither catches: damage to bytes sled never reads again (free
//! space, a superseded version of a page), which is harmless; and, after a
//! crash, loss of a tail that was never flushed, which is not damage.
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
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::File;
use std::io::{self, Write as _};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use sled::Transactional;
use sled::transaction::{
    ConflictableTransactionError, TransactionalTree, UnabortableTransactionError,
};

use super::snapshot::Readers;
use super::{StorageError, io_error, remove_dir_if_present, sync_dir, sync_what};
use crate::kv::{self, KvState, SessionIndex, SessionLimits};
use crate::paxos::{Slot, Value};

/// Key of the applied index in the `meta` tree.
pub(super) const APPLIED: &[u8] = b"applied";
/// Key of the state's [`Digest`] in the `meta` tree.
pub(super) const DIGEST: &[u8] = b"digest";
/// The seal file, beside sled's files (see the module doc).
pub(super) const SEAL_FILE: &str = "seal";
/// Where a new seal is written before it is renamed over `seal`.
const SEAL_TMP: &str = "seal.tmp";
/// Tag of a `kv` entry in [`entry_hash`].
pub(super) const TAG_KV: u8 = 1;
/// Tag of a `sessions` entry in [`entry_hash`].
pub(super) const TAG_SESSION: u8 = 2;

/// An order-independent digest of a set of entries: how many, and the
/// wrapping sum of their `entry_hash`es. Adding and removing an entry are
/// each O(1), so the digest of the state machine is kept in step with every
/// batch, and any two ways of building the same state give the same digest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Digest {
    /// The number of entries (`kv` keys plus sessions).
    pub entries: u64,
    /// The wrapping sum of the entries' hashes.
    pub sum: u64,
}

impl Digest {
    /// Adds an entry of the `kv` (tag 1) or `sessions` (tag 2) tree, as
    /// stored: key bytes and value bytes.
    pub(super) fn add(&mut self, tag: u8, key: &[u8], value: &[u8]) {
        self.entries += 1;
        self.sum = self.sum.wrapping_add(entry_hash(tag, key, value));
    }

    /// Removes an entry added before with the same bytes.
    pub(super) fn remove(&mut self, tag: u8, key: &[u8], value: &[u8]) {
        assert!(self.entries > 0, "removing an entry from an empty digest");
        self.entries -= 1;
        self.sum = self.sum.wrapping_sub(entry_hash(tag, key, value));
    }

    /// The 16 bytes stored in `meta`: entries, then sum, big-endian.
    pub(super) fn to_bytes(self) -> [u8; 16] {
        let mut out = [0; 16];
        out[..8].copy_from_slice(&self.entries.to_be_bytes());
        out[8..].copy_from_slice(&self.sum.to_be_bytes());
        out
    }

    /// A digest from its 16 bytes; `None` if there are not 16.
    pub(super) fn from_bytes(bytes: &[u8]) -> Option<Digest> {
        let (entries, sum) = bytes.split_first_chunk::<8>()?;
        let sum: [u8; 8] = sum.try_into().ok()?;
        Some(Digest {
            entries: u64::from_be_bytes(*entries),
            sum: u64::from_be_bytes(sum),
        })
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} entries, sum {:016x}",
            grouped(self.entries),
            self.sum
        )
    }
}

/// The hash of one stored entry: 64-bit FNV-1a over the tag byte, the key's
/// length (u32, little-endian), the key and the value, finished with
/// MurmurHash3's `fmix64` so that the sum of many hashes is well mixed.
/// Both are fixed arithmetic, the same on every platform and Rust version
/// (unlike `DefaultHasher`): the digest is stored on disk and compared
/// between replicas. Never change it without a migration.
pub(super) fn entry_hash(tag: u8, key: &[u8], value: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let key_len = u32::try_from(key.len()).unwrap_or(u32::MAX);
    let mut h = OFFSET;
    for byte in std::iter::once(tag)
        .chain(key_len.to_le_bytes())
        .chain(key.iter().copied())
        .chain(value.iter().copied())
    {
        h ^= u64::from(byte);
        h = h.wrapping_mul(PRIME);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// `n` with a comma every three digits, for messages people read.
pub(super) fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

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
    /// Held by each `apply` from its first read to its commit, and by
    /// whoever must see the applied index and digest of a state no apply
    /// is half-way through (a snapshot's start, a flush's seal).
    apply_lock: Mutex<()>,
    /// Snapshot readers in progress, told of each key a batch changes
    /// before it is changed.
    pub(super) readers: Readers,
    /// Held across a flush, so that two flushes do not write the seal at
    /// once.
    flush_lock: Mutex<()>,
    /// The sessions of `sessions` by use (see the module doc). Changed only
    /// by `apply`, under `apply_lock`, after its transaction committed.
    by_use: Mutex<SessionIndex>,
}

impl StateMachine {
    /// Opens (creating) the database in `dir`, and checks it against its
    /// digest and seal (see the module doc): a damaged one is
    /// [`StorageError::StateDamaged`], never opened.
    pub(super) fn open(dir: &Path, cache_bytes: u64) -> Result<StateMachine, StorageError> {
        let created = !dir.exists();
        let db = open_sled(dir, cache_bytes)?;
        let data_path = dir.join(SLED_DATA_FILE);
        // Opened for writing only because some platforms refuse to fsync a
        // read-only handle; we never write through it. Not created: if sled
        // ever stops writing `db`, we must fail rather than sync nothing.
        let data_file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&data_path)
            .map_err(|e| io_error(format!("opening sled data file {}", data_path.display()), e))?;
        let open_tree = |name: &str| {
            db.open_tree(name)
                .map_err(|e| damaged(dir, format!("sled cannot open tree {name}: {e}")))
        };
        let sm = StateMachine {
            dir: dir.to_path_buf(),
            meta: open_tree("meta")?,
            kv: open_tree("kv")?,
            sessions: open_tree("sessions")?,
            db,
            data_file,
            synced: Mutex::new(HashSet::new()),
            apply_lock: Mutex::new(()),
            readers: Readers::default(),
            flush_lock: Mutex::new(()),
            by_use: Mutex::new(SessionIndex::default()),
        };
        if created {
            sm.flush()?;
        }
        // sled panics on some damage instead of failing; that is damage too.
        catch_unwind(AssertUnwindSafe(|| sm.verify())).unwrap_or_else(|panic| {
            Err(damaged(
                dir,
                format!("sled panicked reading it: {}", panic_message(&*panic)),
            ))
        })?;
        *lock(&sm.by_use) = sm.index_sessions()?;
        Ok(sm)
    }

    /// The directory of the database.
    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every session of `sessions`, indexed by use. Run after `verify`,
    /// which has decoded every one already.
    fn index_sessions(&self) -> Result<SessionIndex, StorageError> {
        let mut index = SessionIndex::default();
        for item in self.sessions.iter() {
            let (key, value) = item?;
            let (id, session) = decode_session(&key, &value).map_err(StorageError::Corrupt)?;
            index.update(id, None, Some(&session));
        }
        Ok(index)
    }

    /// Copies the state machine of a paxoskv 0.1 database (same trees, same
    /// encodings) into this one, which must be new, with its digest.
    pub(super) fn import(&self, old: &sled::Db) -> Result<(), StorageError> {
        assert!(self.kv.is_empty() && self.sessions.is_empty());
        let mut digest = Digest::default();
        for (name, tag, to) in [
            ("kv", TAG_KV, &self.kv),
            ("sessions", TAG_SESSION, &self.sessions),
        ] {
            for item in old.open_tree(name)?.iter() {
                let (key, value) = item?;
                digest.add(tag, &key, &value);
                to.insert(key, value)?;
            }
        }
        if let Some(applied) = old.open_tree("meta")?.get(APPLIED)? {
            self.meta.insert(APPLIED, applied)?;
        }
        self.meta.insert(DIGEST, &digest.to_bytes())?;
        Ok(())
    }

    /// Moves a damaged database in `dir` aside to `<dir>.damaged` (replacing
    /// any earlier one: one is kept, for a person to look at) and opens a
    /// new, empty one in its place. `why` is logged with it.
    pub(super) fn open_fresh(
        dir: &Path,
        cache_bytes: u64,
        why: &StorageError,
    ) -> Result<StateMachine, StorageError> {
        let aside = dir.with_extension("damaged");
        remove_dir_if_present(&aside)?;
        std::fs::rename(dir, &aside).map_err(|e| {
            io_error(
                format!("moving {} aside to {}", dir.display(), aside.display()),
                e,
            )
        })?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
        tracing::warn!(
            damaged = %aside.display(),
            reason = %why,
            "moved the damaged state machine aside; starting from an empty one"
        );
        StateMachine::open(dir, cache_bytes)
    }

    /// Writes everything to disk and fsyncs it (see the module doc), then
    /// seals the applied index and digest it made durable.
    pub(super) fn flush(&self) -> Result<(), StorageError> {
        let _flushing = lock(&self.flush_lock);
        // Read before sled's flush, so the flush covers what is sealed.
        let (applied, digest) = {
            let _no_apply = lock(&self.apply_lock);
            (self.applied()?, self.digest()?)
        };
        self.db.flush()?;
        self.data_file
            .sync_data()
            .map_err(|e| io_error(sync_what(&self.dir.join(SLED_DATA_FILE)), e))?;
        self.sync_new_entries()?;
        write_seal(&self.dir, applied, digest)
    }

    /// The applied index and the digest of the state, read with no apply
    /// half-way through, while `then` runs with the same guarantee (a new
    /// snapshot reader registers itself there).
    pub(super) fn at_rest<T>(
        &self,
        then: impl FnOnce(Slot, Digest) -> T,
    ) -> Result<T, StorageError> {
        let _no_apply = lock(&self.apply_lock);
        Ok(then(self.applied()?, self.digest()?))
    }

    /// The digest recorded in `meta`; empty if none is.
    pub(super) fn digest(&self) -> Result<Digest, StorageError> {
        decode_digest(self.meta.get(DIGEST)?.as_deref())
    }

    /// Applies chosen slots in order ([`kv::apply_slot`] under `limits`,
    /// no-ops included, so sessions expire at the same slot everywhere),
    /// atomically with the applied index: one sled transaction over `kv`,
    /// `sessions` and `meta` per call, so a crash leaves either all of the
    /// call's slots applied or none. The digest is updated in the same
    /// transaction, and snapshot readers are told of each key changed before
    /// the change is committed.
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
        limits: &SessionLimits,
    ) -> Result<Vec<(u64, kv::Reply)>, StorageError> {
        // One apply at a time: the "before" bytes read in the transaction
        // are then the committed ones, which snapshot readers rely on, and
        // the session index is the committed one.
        let _applying = lock(&self.apply_lock);
        let mut by_use = lock(&self.by_use);
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
                    changes: RefCell::new(BTreeMap::new()),
                    by_use: &by_use,
                    index_changes: IndexChanges::default(),
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
                    let commands = match value {
                        Value::Noop => Vec::new(),
                        Value::Batch(commands) => commands
                            .iter()
                            .enumerate()
                            .map(|(i, bytes)| {
                                kv::Command::decode(bytes).map_err(|e| {
                                    ConflictableTransactionError::Abort(StorageError::Corrupt(
                                        format!("slot {slot}, command {i}: {e}"),
                                    ))
                                })
                            })
                            .collect::<Result<_, _>>()?,
                    };
                    let slot_replies = kv::apply_slot(&mut state, limits, slot, &commands);
                    // A failed read made `apply_slot` see a wrong state: drop
                    // the whole transaction (or retry it on a conflict).
                    state.check()?;
                    replies.extend(commands.iter().map(|c| c.proposal_id).zip(slot_replies));
                    applied = slot;
                }
                if applied == start {
                    return Ok((replies, IndexChanges::default()));
                }
                meta.insert(APPLIED, &applied.to_be_bytes())?;
                let changes = state.changes.into_inner();
                let mut changed = false;
                let mut digest = decode_digest(meta.get(DIGEST)?.as_deref())
                    .map_err(ConflictableTransactionError::Abort)?;
                for ((tag, key), change) in &changes {
                    if change.before == change.after {
                        continue;
                    }
                    changed = true;
                    if let Some(before) = &change.before {
                        digest.remove(*tag, key, before);
                    }
                    if let Some(after) = &change.after {
                        digest.add(*tag, key, after);
                    }
                }
                // Written with every applied index, even when no entry
                // changed (a batch of no-ops): a state with an applied index
                // and no digest is one whose digest was lost.
                meta.insert(DIGEST, &digest.to_bytes())?;
                if changed {
                    // Before the commit makes any change visible: see
                    // `snapshot.rs` for why this order makes readers exact.
                    // A retried or failed transaction records the same
                    // committed bytes again, which readers ignore.
                    self.readers.record(
                        changes
                            .iter()
                            .filter(|(_, c)| c.before != c.after)
                            .map(|((tag, key), c)| (*tag, key.as_slice(), c.before.as_deref())),
                    );
                }
                Ok((replies, state.index_changes))
            })?;
        // Committed: the index follows.
        let (replies, index_changes) = replies;
        index_changes.commit(&mut by_use);
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
            let (key, value) = decode_kv(&key, &bytes).map_err(StorageError::Corrupt)?;
            out.insert(key, value);
        }
        Ok(out)
    }

    /// The applied index: the last slot applied to the state machine, 0 if
    /// none.
    pub(super) fn applied(&self) -> Result<Slot, StorageError> {
        decode_applied(self.meta.get(APPLIED)?.as_deref())
    }

    /// Reads every entry, and checks the count and digest of what is there
    /// against the recorded digest, and the applied index and digest
    /// against the seal (see the module doc).
    pub(super) fn verify(&self) -> Result<(), StorageError> {
        let dir = &self.dir;
        let sled_err = |e: sled::Error| damaged(dir, format!("sled cannot read it: {e}"));
        let mut found = Digest::default();
        for item in self.kv.iter() {
            let (key, value) = item.map_err(sled_err)?;
            decode_kv(&key, &value).map_err(|what| damaged(dir, what))?;
            found.add(TAG_KV, &key, &value);
        }
        for item in self.sessions.iter() {
            let (key, value) = item.map_err(sled_err)?;
            decode_session(&key, &value).map_err(|what| damaged(dir, what))?;
            found.add(TAG_SESSION, &key, &value);
        }
        let meta_err = |e: StorageError| damaged(dir, e.to_string());
        let applied = decode_applied(self.meta.get(APPLIED).map_err(sled_err)?.as_deref())
            .map_err(meta_err)?;
        let recorded = self.meta.get(DIGEST).map_err(sled_err)?;
        let recorded = match recorded {
            Some(bytes) => decode_digest(Some(&bytes)).map_err(meta_err)?,
            None if found == Digest::default() && applied == 0 => Digest::default(),
            None => {
                return Err(damaged(
                    dir,
                    format!(
                        "no digest recorded, yet {} entries found at applied index {} \
                         (written by a paxoskv without digests, or the digest was lost)",
                        grouped(found.entries),
                        grouped(applied)
                    ),
                ));
            }
        };
        if found != recorded {
            let reason = if found.entries != recorded.entries {
                format!(
                    "digest mismatch: {} entries found, {} recorded",
                    grouped(found.entries),
                    grouped(recorded.entries)
                )
            } else {
                format!(
                    "digest mismatch: {} entries as recorded, but their sum is {:016x}, {:016x} recorded",
                    grouped(found.entries),
                    found.sum,
                    recorded.sum
                )
            };
            return Err(damaged(dir, reason));
        }
        let seal_path = dir.join(SEAL_FILE);
        match read_seal(&seal_path)? {
            None if applied == 0 && found == Digest::default() => {}
            None => {
                return Err(damaged(
                    dir,
                    format!(
                        "{} is missing, yet the state is at applied index {} with {} entries",
                        seal_path.display(),
                        grouped(applied),
                        grouped(found.entries)
                    ),
                ));
            }
            Some((sealed, _)) if applied < sealed => {
                return Err(damaged(
                    dir,
                    format!(
                        "sled recovered applied index {}, but a flush made {} durable ({}): \
                         sled lost data it had written to disk",
                        grouped(applied),
                        grouped(sealed),
                        seal_path.display()
                    ),
                ));
            }
            Some((sealed, digest)) if applied == sealed && digest != found => {
                return Err(damaged(
                    dir,
                    format!(
                        "at applied index {}, {} found, but {} sealed ({})",
                        grouped(applied),
                        found,
                        digest,
                        seal_path.display()
                    ),
                ));
            }
            Some(_) => {}
        }
        Ok(())
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
///
/// Every entry the transaction reads or writes is kept in `changes` with
/// its committed bytes and its bytes now, from which the digest is updated
/// and snapshot readers are told what changed.
struct TxState<'a> {
    kv: &'a TransactionalTree,
    sessions: &'a TransactionalTree,
    failure: RefCell<Option<TxFailure>>,
    changes: RefCell<BTreeMap<(u8, Vec<u8>), Change>>,
    /// The committed session index, and what the transaction changed in
    /// it so far: the index as the transaction sees it is both.
    by_use: &'a SessionIndex,
    index_changes: IndexChanges,
}

/// Changes to a [`SessionIndex`] not yet committed: pairs removed from it
/// and pairs added, disjoint.
#[derive(Default)]
struct IndexChanges {
    removed: BTreeSet<(Slot, u64)>,
    added: BTreeSet<(Slot, u64)>,
}

impl IndexChanges {
    /// Records that `client_id`'s session went from `before` to `after`,
    /// over `index` as committed.
    fn update(
        &mut self,
        index: &SessionIndex,
        client_id: u64,
        before: Option<&kv::Session>,
        after: Option<&kv::Session>,
    ) {
        if let Some(s) = before {
            let key = (s.last_used, client_id);
            if !self.added.remove(&key) && index.contains(&key) {
                self.removed.insert(key);
            }
        }
        if let Some(s) = after {
            let key = (s.last_used, client_id);
            if !self.removed.remove(&key) {
                self.added.insert(key);
            }
        }
    }

    /// The least recently used session of `index` with these changes.
    fn oldest(&self, index: &SessionIndex) -> Option<(Slot, u64)> {
        let committed = index.oldest_except(&self.removed);
        match (committed, self.added.first().copied()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// How many sessions `index` holds with these changes.
    fn count(&self, index: &SessionIndex) -> u64 {
        index.len() - self.removed.len() as u64 + self.added.len() as u64
    }

    /// Makes the changes in `index`, once their transaction committed.
    fn commit(self, index: &mut SessionIndex) {
        for key in self.removed {
            index.set(key, false);
        }
        for key in self.added {
            index.set(key, true);
        }
    }
}

/// One entry touched by a transaction.
struct Change {
    /// Its bytes when the transaction first read it (committed ones).
    before: Option<Vec<u8>>,
    /// Its bytes as the transaction leaves them.
    after: Option<Vec<u8>>,
}

enum TxFailure {
    Sled(UnabortableTransactionError),
    Corrupt(String),
}

type TxResult<T> = Result<T, UnabortableTransactionError>;

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

    fn tree(&self, tag: u8) -> &TransactionalTree {
        if tag == TAG_KV {
            self.kv
        } else {
            self.sessions
        }
    }

    /// The entry's bytes as the transaction sees them; the first read of
    /// an entry records its committed bytes.
    fn current(&self, tag: u8, key: &[u8]) -> TxResult<Option<Vec<u8>>> {
        if let Some(change) = self.changes.borrow().get(&(tag, key.to_vec())) {
            return Ok(change.after.clone());
        }
        let before = self.tree(tag).get(key)?.map(|v| v.to_vec());
        self.changes.borrow_mut().insert(
            (tag, key.to_vec()),
            Change {
                before: before.clone(),
                after: before.clone(),
            },
        );
        Ok(before)
    }

    /// Writes (or, with `None`, deletes) the entry.
    fn set(&self, tag: u8, key: &[u8], value: Option<Vec<u8>>) -> TxResult<()> {
        self.current(tag, key)?;
        match &value {
            Some(bytes) => self.tree(tag).insert(key.to_vec(), bytes.clone())?,
            None => self.tree(tag).remove(key.to_vec())?,
        };
        if let Some(change) = self.changes.borrow_mut().get_mut(&(tag, key.to_vec())) {
            change.after = value;
        }
        Ok(())
    }

    fn write(&self, tag: u8, key: &[u8], value: Option<Vec<u8>>) {
        if self.failed() {
            return;
        }
        if let Err(e) = self.set(tag, key, value) {
            self.fail(TxFailure::Sled(e));
        }
    }
}

impl KvState for TxState<'_> {
    fn get(&self, key: &str) -> Option<i32> {
        if self.failed() {
            return None;
        }
        match self.current(TAG_KV, key.as_bytes()) {
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
        self.write(TAG_KV, key.as_bytes(), Some(value.to_le_bytes().to_vec()));
    }

    fn delete(&mut self, key: &str) {
        self.write(TAG_KV, key.as_bytes(), None);
    }

    fn session(&self, client_id: u64) -> Option<kv::Session> {
        if self.failed() {
            return None;
        }
        match self.current(TAG_SESSION, &client_id.to_be_bytes()) {
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
        let before = self.session(client_id);
        self.write(
            TAG_SESSION,
            &client_id.to_be_bytes(),
            Some(session.to_bytes()),
        );
        if !self.failed() {
            self.index_changes
                .update(self.by_use, client_id, before.as_ref(), Some(&session));
        }
    }

    fn remove_session(&mut self, client_id: u64) {
        let before = self.session(client_id);
        self.write(TAG_SESSION, &client_id.to_be_bytes(), None);
        if !self.failed() {
            self.index_changes
                .update(self.by_use, client_id, before.as_ref(), None);
        }
    }

    fn oldest_session(&self) -> Option<(Slot, u64)> {
        // After a failure, nothing: callers loop until there is no session
        // to drop, and the transaction is dropped anyway.
        if self.failed() {
            return None;
        }
        self.index_changes.oldest(self.by_use)
    }

    fn session_count(&self) -> u64 {
        self.index_changes.count(self.by_use)
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

pub(super) fn decode_applied(bytes: Option<&[u8]>) -> Result<Slot, StorageError> {
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
pub(super) fn decode_value(key: &str, bytes: &[u8]) -> Result<i32, String> {
    let raw: [u8; 4] = bytes
        .try_into()
        .map_err(|_| format!("tree kv, key {key:?}: {} bytes, expected 4", bytes.len()))?;
    Ok(i32::from_le_bytes(raw))
}

/// The digest stored in `meta`; empty if absent.
pub(super) fn decode_digest(bytes: Option<&[u8]>) -> Result<Digest, StorageError> {
    let Some(bytes) = bytes else {
        return Ok(Digest::default());
    };
    Digest::from_bytes(bytes).ok_or_else(|| {
        StorageError::Corrupt(format!(
            "tree meta, key digest: {} bytes, expected 16",
            bytes.len()
        ))
    })
}

/// A stored entry of the `kv` tree; the error names the tree and key.
pub(super) fn decode_kv(key: &[u8], value: &[u8]) -> Result<(String, i32), String> {
    let key = String::from_utf8(key.to_vec())
        .map_err(|_| format!("tree kv, key {key:02x?}: not UTF-8"))?;
    let value = decode_value(&key, value)?;
    Ok((key, value))
}

/// A stored entry of the `sessions` tree; the error names the tree and key.
pub(super) fn decode_session(key: &[u8], value: &[u8]) -> Result<(u64, kv::Session), String> {
    let id = <[u8; 8]>::try_from(key)
        .map(u64::from_be_bytes)
        .map_err(|_| {
            format!(
                "tree sessions, key {key:02x?}: {} bytes, expected 8",
                key.len()
            )
        })?;
    let session =
        kv::Session::from_bytes(value).map_err(|e| format!("tree sessions, client {id}: {e}"))?;
    Ok((id, session))
}

/// [`StorageError::StateDamaged`] for the database in `dir`.
pub(super) fn damaged(dir: &Path, reason: String) -> StorageError {
    StorageError::StateDamaged {
        dir: dir.to_path_buf(),
        reason,
    }
}

/// Opens sled in `dir`. A held lock is [`StorageError::InUse`]; an I/O
/// error names the directory; anything else sled reports, or a panic in
/// sled, is [`StorageError::StateDamaged`].
pub(super) fn open_sled(dir: &Path, cache_bytes: u64) -> Result<sled::Db, StorageError> {
    let opened = catch_unwind(|| {
        sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .open()
    });
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) if is_lock_error(&e) => Err(StorageError::InUse(dir.to_path_buf())),
        Ok(Err(sled::Error::Io(e))) => Err(io_error(
            format!("opening sled database {}", dir.display()),
            e,
        )),
        Ok(Err(e)) => Err(damaged(dir, format!("sled cannot open it: {e}"))),
        Err(panic) => Err(damaged(
            dir,
            format!("sled panicked opening it: {}", panic_message(&*panic)),
        )),
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    }
}

/// Locks a mutex that guards no data of its own (or data still sound
/// after a panic elsewhere), ignoring poisoning.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Bytes of the seal: applied index, digest entries, digest sum
/// (big-endian u64s), then the CRC-32C of those 24 bytes (big-endian).
const SEAL_BYTES: usize = 28;

/// Durably replaces `dir`'s seal: written aside, fsynced, renamed over the
/// old one, directory fsynced.
pub(super) fn write_seal(dir: &Path, applied: Slot, digest: Digest) -> Result<(), StorageError> {
    let mut bytes = Vec::with_capacity(SEAL_BYTES);
    bytes.extend_from_slice(&applied.to_be_bytes());
    bytes.extend_from_slice(&digest.to_bytes());
    bytes.extend_from_slice(&crc32c::crc32c(&bytes).to_be_bytes());
    assert_eq!(bytes.len(), SEAL_BYTES);
    let (tmp, path) = (dir.join(SEAL_TMP), dir.join(SEAL_FILE));
    let mut f =
        File::create(&tmp).map_err(|e| io_error(format!("creating {}", tmp.display()), e))?;
    f.write_all(&bytes)
        .map_err(|e| io_error(format!("writing {}", tmp.display()), e))?;
    f.sync_all().map_err(|e| io_error(sync_what(&tmp), e))?;
    std::fs::rename(&tmp, &path).map_err(|e| {
        io_error(
            format!("renaming {} to {}", tmp.display(), path.display()),
            e,
        )
    })?;
    sync_dir(dir)
}

/// The sealed applied index and digest; `None` if there is no seal.
fn read_seal(path: &Path) -> Result<Option<(Slot, Digest)>, StorageError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(format!("reading {}", path.display()), e)),
    };
    let bad = |what: &str| StorageError::StateDamaged {
        dir: path.parent().unwrap_or(path).to_path_buf(),
        reason: format!("{}: {what}", path.display()),
    };
    if bytes.len() != SEAL_BYTES {
        return Err(bad(&format!(
            "{} bytes, expected {SEAL_BYTES}",
            bytes.len()
        )));
    }
    let (body, crc) = bytes.split_at(24);
    if crc32c::crc32c(body).to_be_bytes() != crc {
        return Err(bad("CRC mismatch"));
    }
    let (applied, digest) = body.split_at(8);
    let applied = u64::from_be_bytes(applied.try_into().map_err(|_| bad("short"))?);
    let digest = Digest::from_bytes(digest).ok_or_else(|| bad("short"))?;
    Ok(Some((applied, digest)))
}
