//! Migration of a data directory from paxoskv 0.1's layout: one sled
//! database at the directory's root holding the promise (`meta`), the votes
//! (`log`), the state machine (`kv`, `sessions`, `meta`'s `applied`).
//!
//! The migration builds the new layout beside the old one and switches
//! with renames, so a crash at any step leaves either the old directory, to
//! be migrated again from the start, or a complete new one:
//!
//! 1. the state machine is copied into a new sled database `state.tmp/`,
//!    made durable;
//! 2. the promise and the votes are written to a new log `log.tmp/`, synced;
//! 3. `state.tmp` is renamed to `state`, the directory fsynced; then
//!    `log.tmp` to `log`, fsynced. A `log/` is what says the migration is
//!    complete;
//! 4. sled's old files (`db`, `conf`, `blobs/`, `snap.*`) are deleted.
//!
//! On open, a directory with `log/` only has leftovers of step 4 deleted
//! (once the new log's lock is held);
//! one with the old `db` and no `log/` is migrated from step 1, anything an
//! earlier attempt left removed first.

use std::path::Path;

use prost::Message as _;
use tracing::warn;

use super::acceptor_log::{AcceptorLog, SEGMENT_BYTES};
use super::state_machine::{SLED_DATA_FILE, StateMachine};
use super::{
    LOG_DIR, STATE_DIR, StorageError, decode_ballot, io_error, remove_dir_if_present, rename,
    sync_dir,
};
use crate::paxos::{Ballot, Membership, Persist};
use crate::pb;
use crate::wire;

/// Where the new log is built before it is renamed into place.
const LOG_TMP: &str = "log.tmp";
/// Where the new state machine is built before it is renamed into place.
const STATE_TMP: &str = "state.tmp";

/// Migrates `dir` if it is in paxoskv 0.1's layout, and removes what a
/// completed migration left behind. Does nothing to any other directory.
///
/// Holds the old database's lock throughout, so a second process trying
/// the same fails with [`StorageError::InUse`] and touches nothing.
pub(super) fn migrate_if_needed(dir: &Path, cache_bytes: u64) -> Result<(), StorageError> {
    if dir.join(LOG_DIR).exists() || !dir.join(SLED_DATA_FILE).exists() {
        return Ok(());
    }
    let old = sled::Config::new()
        .path(dir)
        .cache_capacity(cache_bytes)
        .open()
        .map_err(|e| {
            if super::state_machine::is_lock_error(&e) {
                StorageError::InUse(dir.to_path_buf())
            } else {
                StorageError::Sled(e)
            }
        })?;
    warn!(
        data_dir = %dir.display(),
        "data directory is in paxoskv 0.1's layout (one sled database); migrating it to a Paxos log and a state machine"
    );
    for leftover in [LOG_TMP, STATE_TMP, STATE_DIR] {
        remove_dir_if_present(&dir.join(leftover))?;
    }
    let (promised, votes) = read_acceptor(&old)?;
    {
        let state = StateMachine::open(&dir.join(STATE_TMP), cache_bytes)?;
        state.import(&old)?;
        state.flush()?;
    }
    {
        let (mut log, _) = AcceptorLog::open(&dir.join(LOG_TMP), SEGMENT_BYTES)?;
        let vote_count = votes.len();
        // A 0.1 replica voted: it stays a voter.
        log.persist(&Persist {
            membership: Some(Membership::Voter),
            promised: (promised != Ballot::ZERO).then_some(promised),
            entries: votes,
        })?;
        warn!(%promised, votes = vote_count, "migrated the promise and the votes");
    }
    drop(old);
    rename(dir, STATE_TMP, STATE_DIR)?;
    rename(dir, LOG_TMP, LOG_DIR)?;
    remove_old_files(dir)
}

/// The promise and every vote of a 0.1 database, refusing damaged entries
/// by tree and key.
fn read_acceptor(old: &sled::Db) -> Result<(Ballot, Vec<crate::paxos::Accepted>), StorageError> {
    let meta = old.open_tree("meta")?;
    let promised = match meta.get(b"promised")? {
        Some(bytes) => decode_ballot(&bytes, "0.1 database, tree meta, key promised")?,
        None => Ballot::ZERO,
    };
    let mut votes = Vec::new();
    for item in old.open_tree("log")?.iter() {
        let (key, bytes) = item?;
        let corrupt = |what: String| {
            StorageError::Corrupt(format!("0.1 database, tree log, key {key:02x?}: {what}"))
        };
        let slot = <[u8; 8]>::try_from(key.as_ref())
            .map(u64::from_be_bytes)
            .map_err(|_| corrupt(format!("{} bytes, expected 8", key.len())))?;
        let entry =
            pb::AcceptedEntry::decode(bytes.as_ref()).map_err(|e| corrupt(e.to_string()))?;
        let vote = wire::accepted_from_pb(entry).map_err(|e| corrupt(e.to_string()))?;
        if vote.slot != slot {
            return Err(corrupt(format!("entry is for slot {}", vote.slot)));
        }
        votes.push(vote);
    }
    Ok((promised, votes))
}

/// Deletes what a completed migration may have left of sled 0.1's files;
/// called with the new log's lock held.
pub(super) fn remove_leftovers(dir: &Path) -> Result<(), StorageError> {
    if dir.join(SLED_DATA_FILE).exists() {
        remove_old_files(dir)?;
    }
    Ok(())
}

/// Deletes sled 0.1's files from the root of `dir`.
fn remove_old_files(dir: &Path) -> Result<(), StorageError> {
    let listing =
        std::fs::read_dir(dir).map_err(|e| io_error(format!("listing {}", dir.display()), e))?;
    for entry in listing {
        let entry = entry.map_err(|e| io_error(format!("listing {}", dir.display()), e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let path = entry.path();
        if name == "blobs" {
            remove_dir_if_present(&path)?;
        } else if name == SLED_DATA_FILE || name == "conf" || name.starts_with("snap.") {
            std::fs::remove_file(&path)
                .map_err(|e| io_error(format!("removing {}", path.display()), e))?;
        }
    }
    sync_dir(dir)
}
