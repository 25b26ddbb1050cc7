//! Snapshots of the state machine: read out consistently at an applied
//! index while `apply` goes on, and installed atomically in place of the
//! current state.
//!
//! # Reading: [`SnapshotReader`]
//!
//! sled 0.34 has no read snapshots, so a reader is made consistent with
//! pre-images. It starts, with no apply half-way through, by reading the
//! applied index A and the digest, and registering an empty pre-image map
//! per tree (`kv`, `sessions`) with a cursor "before every key". From then
//! on, every batch, before its transaction commits, records in each
//! reader's map, for each entry it changes whose key is past the reader's
//! cursor and not yet in the map, the entry's committed bytes ("absent" for
//! a new key). The reader iterates the tree in key order and, for each key
//! it reads, under the map's lock: moves the cursor to the key, and emits
//! the pre-image if the map has one (removing it; an absent pre-image means
//! the key was created after A, and is skipped), else the tree's value.
//! When the tree is done, it emits the pre-images left in the map: keys
//! deleted since A that the iteration never met.
//!
//! Why that is the state at A, key by key, for a key k:
//!
//! - The first change to k after A is recorded before it commits, with the
//!   bytes committed before it, which are k's bytes at A (one apply at a
//!   time, so they are committed bytes). Later changes find k in the map
//!   and leave it. So a pre-image, when there is one, is k's state at A.
//! - If the iteration reads k (at time R, then takes the lock at C > R):
//!   if k changed between A and R, that change committed before R, so it
//!   was recorded before R, while the cursor was below k (the cursor only
//!   reaches k at C): the map has k at C and the reader emits the
//!   pre-image. If k did not change before R, the tree's bytes are those
//!   at A, and a pre-image found at C is the same bytes. Either way: k at A.
//! - If the iteration never reads k: k was absent when the iteration went
//!   past it. If k existed at A, it was deleted before that, a change
//!   recorded while the cursor was below k; no later read consumed it, so
//!   it is emitted at the end. If k did not exist at A, its pre-image (if
//!   any) is "absent": nothing emitted. Right either way.
//! - Changes recorded while the cursor is at or past k are not recorded:
//!   the reader has already decided k, and the map stays small.
//!
//! The reader recomputes the digest of what it emitted and checks it
//! against A's at the end, so a bug here is an error, not a wrong snapshot.
//!
//! Readers are independent: several can run at once, each with its own
//! maps; `apply` takes each reader's lock once per batch, and a reader
//! takes it once per key, so neither waits for the other's whole run. A
//! map holds only keys changed during the read, and goes with the reader.
//!
//! # Installing: [`SnapshotInstall`]
//!
//! A snapshot is built in a new sled database `state.install/`, chunk by
//! chunk, while the old state keeps serving. Finishing it checks the
//! received entries against the sender's count and digest (a mismatch
//! removes `state.install/` and changes nothing), writes the applied index
//! and digest, flushes and fsyncs it and seals it (as
//! [`super::Storage::flush`] does), reads it all back against its digest,
//! and then switches, with the current state machine locked out
//! (applies and gets wait for the switch):
//!
//! 1. rename `state.install` → `state.new`, fsync the data directory:
//!    `state.new` exists only complete and durable;
//! 2. rename `state` → `state.old`, fsync;
//! 3. rename `state.new` → `state`, fsync; open it, swap it in;
//! 4. remove `state.old`, fsync.
//!
//! On open ([`recover`]), before `state/` is opened: `state.install` is an
//! install never finished, removed. `state.new` is complete: the switch is
//! rolled forward (steps 2 to 4, `state.old` first removed if an earlier
//! switch left it). `state.old` with `state` beside it is step 4 cut short,
//! removed. So a crash between any two steps opens either the complete old
//! state (before step 1) or the complete new one (from step 1 on), never a
//! mix: each rename is atomic and fsynced before the next step.

use std::collections::{BTreeMap, btree_map};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, Weak};

use tracing::{info, warn};

use super::state_machine::{
    APPLIED, DIGEST, Digest, StateMachine, TAG_KV, TAG_SESSION, damaged, decode_kv, decode_session,
    grouped, lock,
};
use super::{STATE_DIR, StorageError, remove_dir_if_present, rename, sync_dir};
use crate::kv;
use crate::paxos::Slot;

/// Where a snapshot is built before it is complete.
const INSTALL_DIR: &str = "state.install";
/// A complete, durable snapshot about to become `state/`.
const NEW_DIR: &str = "state.new";
/// The state replaced by a snapshot, until it is removed.
const OLD_DIR: &str = "state.old";

/// Default bound on a chunk's size.
pub const CHUNK_BYTES: usize = 1 << 20;
/// Bytes counted per entry on top of its key and value, for the bound.
const ENTRY_OVERHEAD: usize = 16;

/// What identifies a snapshot: the applied index it is the state at, and
/// the digest (entry count and sum) of that state. Sent before the chunks
/// and checked by [`super::Storage::finish_install`] after them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SnapshotMeta {
    /// The last slot applied to the state the snapshot holds.
    pub applied: Slot,
    /// The digest of that state.
    pub digest: Digest,
}

/// A part of a snapshot: `kv` entries and sessions (client id, the bytes of
/// [`kv::Session::to_bytes`]). Entries are in no particular order across
/// chunks; each key appears once in a whole snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotChunk {
    /// Keys and values.
    pub kv: Vec<(String, i32)>,
    /// Dedup sessions by client id, encoded.
    pub sessions: Vec<(u64, Vec<u8>)>,
}

impl SnapshotChunk {
    /// Whether the chunk holds nothing.
    pub fn is_empty(&self) -> bool {
        self.kv.is_empty() && self.sessions.is_empty()
    }
}

// ---------------------------------------------------------------------
// Pre-images, shared between `apply` and the readers.

/// One tree's pre-images for one reader.
#[derive(Default)]
struct Tracked {
    /// The last key the reader read from the tree; `None` before the first.
    cursor: Option<Vec<u8>>,
    /// The reader is done with this tree: nothing more to record.
    finished: bool,
    /// Key → its bytes at the reader's applied index (`None`: absent).
    pre: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl Tracked {
    fn record(&mut self, key: &[u8], before: Option<&[u8]>) {
        let passed = self.cursor.as_deref().is_some_and(|c| key <= c);
        if self.finished || passed {
            return;
        }
        // First change only: a later one would record bytes written after A.
        self.pre
            .entry(key.to_vec())
            .or_insert_with(|| before.map(<[u8]>::to_vec));
    }
}

/// One reader's pre-images, `kv` and `sessions`.
#[derive(Default)]
pub(super) struct PreImages {
    trees: [Tracked; 2],
}

impl PreImages {
    fn tree(&mut self, tag: u8) -> &mut Tracked {
        assert!(tag == TAG_KV || tag == TAG_SESSION, "tag {tag}");
        &mut self.trees[usize::from(tag - TAG_KV)]
    }
}

/// The readers in progress on one state machine.
#[derive(Default)]
pub(super) struct Readers(Mutex<Vec<Weak<Mutex<PreImages>>>>);

impl Readers {
    /// A new reader's pre-images; call with no apply half-way through.
    fn register(&self) -> Arc<Mutex<PreImages>> {
        let images = Arc::new(Mutex::new(PreImages::default()));
        let mut list = lock(&self.0);
        list.retain(|w| w.strong_count() > 0);
        list.push(Arc::downgrade(&images));
        images
    }

    /// Records, for every reader, the committed bytes of entries (tag,
    /// key, bytes or `None`) about to change. Call before the change
    /// commits.
    pub(super) fn record<'a>(
        &self,
        changes: impl Iterator<Item = (u8, &'a [u8], Option<&'a [u8]>)>,
    ) {
        let live: Vec<Arc<Mutex<PreImages>>> = {
            let mut list = lock(&self.0);
            list.retain(|w| w.strong_count() > 0);
            list.iter().filter_map(Weak::upgrade).collect()
        };
        if live.is_empty() {
            return;
        }
        let changes: Vec<_> = changes.collect();
        for images in live {
            let mut images = lock(&images);
            for &(tag, key, before) in &changes {
                images.tree(tag).record(key, before);
            }
        }
    }
}

// ---------------------------------------------------------------------
// Reading.

/// A stored entry: tag (`kv` or `sessions`), key, value.
type Entry = (u8, Vec<u8>, Vec<u8>);

enum Phase {
    /// Iterating a tree.
    Tree(u8, Box<sled::Iter>),
    /// Emitting a tree's pre-images the iteration never met.
    Leftovers(u8, btree_map::IntoIter<Vec<u8>, Option<Vec<u8>>>),
    Done,
}

/// A snapshot of the state machine as of the applied index at its start,
/// read in chunks while `apply` goes on (see the module doc). An iterator
/// of chunks of about [`CHUNK_BYTES`] each; after the last, the emitted
/// state has been checked against [`SnapshotReader::meta`].
pub struct SnapshotReader {
    sm: Arc<StateMachine>,
    meta: SnapshotMeta,
    images: Arc<Mutex<PreImages>>,
    phase: Phase,
    emitted: Digest,
    chunk_bytes: usize,
}

impl SnapshotReader {
    pub(super) fn start(sm: Arc<StateMachine>) -> Result<SnapshotReader, StorageError> {
        Ok(SnapshotReader::start_with(sm, || ())?.0)
    }

    /// Starts a reader, and runs `during` at the same state (tests copy it).
    pub(super) fn start_with<T>(
        sm: Arc<StateMachine>,
        during: impl FnOnce() -> T,
    ) -> Result<(SnapshotReader, T), StorageError> {
        let (meta, images, during) = sm.at_rest(|applied, digest| {
            let images = sm.readers.register();
            (SnapshotMeta { applied, digest }, images, during())
        })?;
        let phase = Phase::Tree(TAG_KV, Box::new(sm.kv.iter()));
        let reader = SnapshotReader {
            sm,
            meta,
            images,
            phase,
            emitted: Digest::default(),
            chunk_bytes: CHUNK_BYTES,
        };
        Ok((reader, during))
    }

    /// The applied index and digest of the state this reader yields.
    pub fn meta(&self) -> SnapshotMeta {
        self.meta
    }

    /// Bounds each chunk to about `bytes` (at least one entry per chunk).
    pub fn with_chunk_bytes(mut self, bytes: usize) -> SnapshotReader {
        assert!(bytes > 0);
        self.chunk_bytes = bytes;
        self
    }

    /// The next chunk; `None` once every entry was yielded and their digest
    /// matched. An error ends the snapshot.
    pub fn next_chunk(&mut self) -> Result<Option<SnapshotChunk>, StorageError> {
        let mut chunk = SnapshotChunk::default();
        let mut size = 0;
        while size < self.chunk_bytes {
            let Some((tag, key, value)) = self.next_entry()? else {
                break;
            };
            size += key.len() + value.len() + ENTRY_OVERHEAD;
            self.emitted.add(tag, &key, &value);
            if tag == TAG_KV {
                chunk
                    .kv
                    .push(decode_kv(&key, &value).map_err(StorageError::Corrupt)?);
            } else {
                let (id, _) = decode_session(&key, &value).map_err(StorageError::Corrupt)?;
                chunk.sessions.push((id, value));
            }
        }
        Ok((!chunk.is_empty()).then_some(chunk))
    }

    /// The next entry of the state at A: (tag, key, value).
    fn next_entry(&mut self) -> Result<Option<Entry>, StorageError> {
        loop {
            match &mut self.phase {
                Phase::Tree(tag, iter) => {
                    let tag = *tag;
                    match iter.next() {
                        Some(item) => {
                            let (key, value) = item.map_err(|e| {
                                damaged(self.sm.dir(), format!("sled cannot read it: {e}"))
                            })?;
                            // The tree read above happens before this lookup:
                            // see the module doc.
                            let mut images = lock(&self.images);
                            let tracked = images.tree(tag);
                            assert!(
                                tracked.cursor.as_deref().is_none_or(|c| c < &key[..]),
                                "sled iterated out of key order"
                            );
                            tracked.cursor = Some(key.to_vec());
                            match tracked.pre.remove(&key[..]) {
                                Some(Some(before)) => return Ok(Some((tag, key.to_vec(), before))),
                                Some(None) => continue,
                                None => return Ok(Some((tag, key.to_vec(), value.to_vec()))),
                            }
                        }
                        None => {
                            let mut images = lock(&self.images);
                            let tracked = images.tree(tag);
                            tracked.finished = true;
                            let left = std::mem::take(&mut tracked.pre);
                            self.phase = Phase::Leftovers(tag, left.into_iter());
                        }
                    }
                }
                Phase::Leftovers(tag, rest) => {
                    let tag = *tag;
                    match rest.next() {
                        Some((key, Some(before))) => return Ok(Some((tag, key, before))),
                        Some((_, None)) => {}
                        None if tag == TAG_KV => {
                            self.phase =
                                Phase::Tree(TAG_SESSION, Box::new(self.sm.sessions.iter()));
                        }
                        None => {
                            self.phase = Phase::Done;
                            if self.emitted != self.meta.digest {
                                return Err(damaged(
                                    self.sm.dir(),
                                    format!(
                                        "snapshot at applied index {}: read {}, but the state had {}",
                                        grouped(self.meta.applied),
                                        self.emitted,
                                        self.meta.digest
                                    ),
                                ));
                            }
                        }
                    }
                }
                Phase::Done => return Ok(None),
            }
        }
    }
}

impl Iterator for SnapshotReader {
    type Item = Result<SnapshotChunk, StorageError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_chunk().transpose()
    }
}

// ---------------------------------------------------------------------
// The facade's state machine, swappable.

/// The current state machine of a [`super::Storage`], and what an install
/// needs to replace it.
pub(super) struct StateSlot {
    current: RwLock<Arc<StateMachine>>,
    data_dir: PathBuf,
    cache_bytes: u64,
    /// Set while a [`SnapshotInstall`] exists: one at a time.
    installing: Arc<AtomicBool>,
}

impl StateSlot {
    pub(super) fn new(data_dir: &Path, cache_bytes: u64, sm: StateMachine) -> StateSlot {
        StateSlot {
            current: RwLock::new(Arc::new(sm)),
            data_dir: data_dir.to_path_buf(),
            cache_bytes,
            installing: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The current state machine. An install's switch waits until the
    /// guard is dropped, so an `apply` made through it is never lost.
    pub(super) fn current(&self) -> RwLockReadGuard<'_, Arc<StateMachine>> {
        // Poisoned only by a panic in an apply, which leaves sled's
        // transaction uncommitted: the state machine is still sound.
        self.current.read().unwrap_or_else(|e| e.into_inner())
    }

    /// A reader of the current state (see [`SnapshotReader`]).
    pub(super) fn reader(&self) -> Result<SnapshotReader, StorageError> {
        SnapshotReader::start(Arc::clone(&self.current()))
    }

    /// Starts an install at `applied`; see [`SnapshotInstall`].
    pub(super) fn begin_install(&self, applied: Slot) -> Result<SnapshotInstall, StorageError> {
        if self
            .installing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(StorageError::InstallBusy);
        }
        // From here on, dropping `install` releases the flag.
        let mut install = SnapshotInstall {
            sm: None,
            meta: SnapshotMeta {
                applied,
                digest: Digest::default(),
            },
            installing: Arc::clone(&self.installing),
        };
        let current = self.current().applied()?;
        if current > applied {
            return Err(StorageError::SnapshotBehind {
                applied: current,
                snapshot: applied,
            });
        }
        for leftover in [INSTALL_DIR, NEW_DIR, OLD_DIR] {
            // No `state.new` can be left while this process runs: `recover`
            // ran at open, and a failed switch stops here rather than guess.
            if leftover == NEW_DIR && self.data_dir.join(NEW_DIR).exists() {
                return Err(StorageError::Corrupt(format!(
                    "{} exists: an earlier install's switch failed half-way; restart to finish it",
                    self.data_dir.join(NEW_DIR).display()
                )));
            }
            remove_dir_if_present(&self.data_dir.join(leftover))?;
        }
        let sm = StateMachine::open(&self.data_dir.join(INSTALL_DIR), self.cache_bytes)?;
        assert_eq!(sm.applied()?, 0, "a fresh database");
        install.sm = Some(sm);
        Ok(install)
    }

    /// Finishes `install`; with `stop_after` (tests), stops after that step
    /// of the switch, as a crash would.
    pub(super) fn finish_install(
        &self,
        mut install: SnapshotInstall,
        expected: SnapshotMeta,
        stop_after: Option<u8>,
    ) -> Result<(), StorageError> {
        let Some(sm) = install.sm.take() else {
            unreachable!("an install holds its database until it finishes");
        };
        let install_dir = self.data_dir.join(INSTALL_DIR);
        let discard = |sm: StateMachine, e: StorageError| {
            drop(sm);
            // Best effort: begin and open remove it too.
            let _ = remove_dir_if_present(&install_dir);
            Err(e)
        };
        if install.meta != expected {
            let e = StorageError::SnapshotMismatch {
                received: install.meta,
                expected,
            };
            return discard(sm, e);
        }
        sm.meta.insert(APPLIED, &expected.applied.to_be_bytes())?;
        sm.meta.insert(DIGEST, &expected.digest.to_bytes())?;
        sm.flush()?;
        drop(sm);
        // Read it all back, against its digest and seal, before it counts.
        let sm = StateMachine::open(&install_dir, self.cache_bytes)?;
        assert_eq!(sm.applied()?, expected.applied);
        drop(sm);

        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        let applied = current.applied()?;
        if applied > expected.applied {
            let _ = remove_dir_if_present(&install_dir);
            return Err(StorageError::SnapshotBehind {
                applied,
                snapshot: expected.applied,
            });
        }
        let dir = &self.data_dir;
        let steps: [(&str, &str); 3] = [
            (INSTALL_DIR, NEW_DIR),
            (STATE_DIR, OLD_DIR),
            (NEW_DIR, STATE_DIR),
        ];
        for (step, (from, to)) in (1..).zip(steps) {
            rename(dir, from, to)?;
            if stop_after == Some(step) {
                return Ok(());
            }
        }
        let new = StateMachine::open(&dir.join(STATE_DIR), self.cache_bytes)?;
        assert_eq!(new.applied()?, expected.applied);
        // The old state machine lives on in readers started before; its
        // files are unlinked but stay readable through its open handles.
        *current = Arc::new(new);
        drop(current);
        info!(
            applied = expected.applied,
            entries = expected.digest.entries,
            "installed a snapshot of the state machine"
        );
        if stop_after == Some(4) {
            return Ok(());
        }
        remove_dir_if_present(&dir.join(OLD_DIR))?;
        sync_dir(dir)
    }
}

// ---------------------------------------------------------------------
// Installing.

/// A snapshot being installed: built in a new database beside the current
/// state, which keeps serving. Add every chunk, then hand it to
/// [`super::Storage::finish_install`]. Dropped unfinished, it leaves only
/// `state.install/`, removed by the next install or open.
pub struct SnapshotInstall {
    sm: Option<StateMachine>,
    /// The applied index, and the digest of what was added so far.
    meta: SnapshotMeta,
    installing: Arc<AtomicBool>,
}

impl SnapshotInstall {
    /// The applied index the snapshot is at.
    pub fn applied(&self) -> Slot {
        self.meta.applied
    }

    /// Adds a chunk's entries. A session that does not decode is
    /// [`StorageError::Corrupt`]; a key sent twice keeps its last value.
    pub fn add_chunk(&mut self, chunk: &SnapshotChunk) -> Result<(), StorageError> {
        let Some(sm) = &self.sm else {
            unreachable!("an install holds its database until it finishes");
        };
        let digest = &mut self.meta.digest;
        for (key, value) in &chunk.kv {
            let value = value.to_le_bytes();
            if let Some(old) = sm.kv.insert(key.as_bytes(), &value)? {
                digest.remove(TAG_KV, key.as_bytes(), &old);
            }
            digest.add(TAG_KV, key.as_bytes(), &value);
        }
        for (id, bytes) in &chunk.sessions {
            kv::Session::from_bytes(bytes).map_err(|e| {
                StorageError::Corrupt(format!(
                    "snapshot at applied index {}, session of client {id}: {e}",
                    self.meta.applied
                ))
            })?;
            let key = id.to_be_bytes();
            if let Some(old) = sm.sessions.insert(key, bytes.as_slice())? {
                digest.remove(TAG_SESSION, &key, &old);
            }
            digest.add(TAG_SESSION, &key, bytes);
        }
        Ok(())
    }
}

impl Drop for SnapshotInstall {
    fn drop(&mut self) {
        // Close the database before another install may remove its files.
        self.sm = None;
        self.installing.store(false, Ordering::Release);
    }
}

/// Completes or undoes what an install's switch left in `data_dir` (see
/// the module doc). Call before opening `state/`, with the directory's lock
/// held.
pub(super) fn recover(data_dir: &Path) -> Result<(), StorageError> {
    let exists = |name: &str| data_dir.join(name).exists();
    if exists(INSTALL_DIR) {
        info!("removing an unfinished snapshot install");
        remove_dir_if_present(&data_dir.join(INSTALL_DIR))?;
    }
    if exists(NEW_DIR) {
        warn!("finishing the switch to an installed snapshot cut short by a crash");
        if exists(STATE_DIR) {
            remove_dir_if_present(&data_dir.join(OLD_DIR))?;
            rename(data_dir, STATE_DIR, OLD_DIR)?;
        }
        rename(data_dir, NEW_DIR, STATE_DIR)?;
    }
    if exists(OLD_DIR) {
        if exists(STATE_DIR) {
            remove_dir_if_present(&data_dir.join(OLD_DIR))?;
        } else {
            // No step of ours leaves this: keep the complete old state.
            warn!("found state.old without state; restoring it");
            rename(data_dir, OLD_DIR, STATE_DIR)?;
        }
    }
    sync_dir(data_dir)
}
