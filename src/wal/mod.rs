//! The Paxos log on disk: an append-only, segmented write-ahead log of
//! CRC-framed records, with group commit and one `fdatasync` per commit.
//!
//! [`crate::storage`] keeps the promise and the votes in it. The log knows
//! nothing of Paxos: a record is opaque payload bytes plus an `index` the
//! caller gives it (the slot, or 0 for records such as the promise), used
//! only by [`Wal::purge_through`].
//!
//! # Own code, not a crate
//!
//! We weighed `okaywal` and TiKV's `raft-engine`. `okaywal` says of itself
//! that it is early in development, not for production, with an unstable
//! file format, and it recycles segments through its own checkpointing
//! callbacks rather than letting the caller say what may go. `raft-engine`
//! is production-grade, and its tail-corruption recovery mode is close to
//! our rule, but it is built for many Raft groups in one engine (memtables
//! per region, compression, background rewrite of old entries, protobuf
//! message types) with a dependency tree larger than this project's; none
//! of that serves one replica's single log. What we need (truncate a torn
//! tail, refuse anything else by file and offset) is a few hundred lines
//! over `pwrite` and `fdatasync`, where every durability step can be read
//! and tested, so we wrote it, after the layouts of etcd's `wal` (preallocated segments,
//! create under a temporary name then rename, fsync the directory) and
//! raft-engine's (sequence-numbered segment files, scan on open).
//!
//! # On disk
//!
//! A directory holding `LOCK` (an `flock` held while a [`Wal`] is open, so
//! two processes cannot write one log) and segments
//! `00000000000000000001.wal`, `...02.wal`, ..., each a 32-byte header (magic,
//! version, its own sequence number, CRC32C: see `segment.rs`) followed by
//! frames. A frame (see `record.rs`) is a u32 length, a CRC32C of the
//! length, index and payload, the u64 index, the payload, and zero padding
//! to 8 bytes. A length of 0 never starts a frame: it is what the
//! preallocated, unwritten rest of a segment reads as, and ends the log.
//! Bit 31 of the length marks the first record of each commit; the scan on
//! open uses it (below).
//!
//! # Writing: one call, one `fdatasync`
//!
//! [`Wal::commit`] writes every record given to it with one `pwrite` and
//! then calls `fdatasync` (`File::sync_data`) once. The records are durable
//! when, and only when, it returns `Ok`. There is deliberately no separate
//! `append` and `sync`: because each commit is synced before the next one
//! starts, at most one commit, the last, can be partly on disk after a
//! crash, which is what lets the scan tell a torn write from corruption.
//! A commit that does not fit the rest of the active segment fills it,
//! syncs it, rotates and goes on in the new segment (two syncs, rarely).
//!
//! After a failed write or sync the [`Wal`] refuses every further call
//! ([`WalError::Poisoned`]): after a failed `fsync` Linux may have dropped
//! the dirty pages and marked them clean, so a retry could report success
//! for data that is not on disk (PostgreSQL's "fsyncgate"). Reopen to
//! recover from what is on disk.
//!
//! # Why preallocate
//!
//! `fdatasync` skips metadata not needed to read the data back (mtime), but
//! it must flush the file size and block allocation whenever a write
//! changed them, and on ext4 or XFS that is a journal commit: a second
//! device write and cache flush on every sync of an appended file. A
//! segment is therefore created at its full size ([`Options::segment_bytes`])
//! before any record goes in, so appends write into blocks that already
//! exist in a file whose size does not change, and `fdatasync` is one data
//! write and one cache flush. [`Preallocate::Zeros`] (the default) writes
//! the zeros once at creation: with `fallocate` the blocks are allocated
//! but marked unwritten, and the first write to each converts it, again a
//! metadata change `fdatasync` has to journal. [`Preallocate::Fallocate`]
//! is there to compare (`benches/storage.rs`), and falls back to zeros
//! where the file system has no `fallocate`. Measured on the project's
//! ext4 disk, median of one commit: 16 votes of 200 bytes, 0.15 ms with
//! zeros and 0.24 ms with `fallocate`; 256 votes, 0.27 ms and 0.52 ms. The
//! price of zeros is a 64 MiB write inside the commit that rotates.
//!
//! # Files and the directory
//!
//! A new segment is written under `<seq>.wal.tmp` (header, full size),
//! fsynced, renamed to `<seq>.wal`, and then the directory is fsynced, so
//! that its name is durable before any record in it is acknowledged. A
//! crash between steps leaves a `.tmp` file (deleted on open) or an empty
//! new segment (used as it is). [`Wal::purge_through`] deletes segments
//! oldest first and fsyncs the directory after each deletion, so a crash at
//! any point leaves a contiguous run of segments. Opening a new log fsyncs
//! the directory, and the parent of a directory it created.
//!
//! # Opening: torn tail or corruption
//!
//! [`Wal::open`] reads every segment in sequence order and returns every
//! record, oldest first. Sequence numbers must be contiguous: a missing
//! segment between two present ones is refused ([`WalError::MissingSegment`]).
//! Within a segment, the scan reads frames until the bytes at some offset
//! are not a whole frame (length 0, a length that does not fit, or a CRC
//! that does not match). Then it searches the rest of the segment for whole
//! frames, at every 8-byte offset, and decides:
//!
//! - **Last segment, no later commit**: a torn tail, the remains of the
//!   last commit, whose `fdatasync` never returned. Any nonzero bytes from
//!   the offset on are zeroed (truncated) and synced, with a `WARN` naming
//!   file and offset; a clean run of zeros is just the end of the log. A
//!   whole frame after the damaged one is tolerated only if it does not
//!   start a commit: a crash during a commit that spans several pages can
//!   leave a later page of that commit on disk without an earlier one.
//! - **Last segment, a later commit starts after it**: that commit was
//!   written after this one was synced, so the damaged bytes were once
//!   durable: corruption, [`WalError::Corrupt`] naming file and offset, and
//!   the replica must not start. Nothing is changed on disk.
//! - **Any earlier segment**: it was synced before the next one was
//!   created, so anything but clean zeros to its end is corruption.
//!
//! So the log opens as a prefix of what was committed, every commit that
//! returned `Ok` included, except in one case no scan can tell apart from a
//! torn write: damage inside the very last commit, which is truncated like
//! a torn write (etcd and raft-engine's default recovery do the same).
//! Records of one commit are kept in order, so a caller that writes, say,
//! the promise before the votes it covers never sees the votes without it.
//!
//! # Purging
//!
//! [`Wal::purge_through`]`(i)` deletes whole segments, oldest first, other
//! than the active one, as long as every record in them has index `<= i`;
//! it stops at the first that does not qualify, so no gap appears. Records
//! of index 0 (a promise) qualify for any `i`: a caller that purges must
//! first re-append, in a commit, any state it still needs (the current
//! promise), so that it lives in a segment that stays.

mod record;
mod segment;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use record::{FRAME_HEADER, Parsed};
use segment::HEADER_LEN;

/// Smallest [`Options::segment_bytes`] accepted.
pub const MIN_SEGMENT_BYTES: u64 = 4096;
/// Largest [`Options::segment_bytes`] accepted: record lengths are 31 bits.
pub const MAX_SEGMENT_BYTES: u64 = 1 << 30;
/// The name of the lock file in the log directory.
const LOCK_FILE: &str = "LOCK";

/// How a new segment's space is reserved before records go in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preallocate {
    /// Write zeros over the whole segment at creation. Costs one write of
    /// the segment per rotation; every later `fdatasync` flushes data only.
    Zeros,
    /// `fallocate(2)`: allocates without writing, so creation is cheap, but
    /// each first write to a block converts an unwritten extent, which
    /// `fdatasync` must journal. Falls back to [`Preallocate::Zeros`] where
    /// the file system does not support it.
    Fallocate,
}

/// How a [`Wal`] lays out new segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Size of each new segment, header included; a multiple of 8 between
    /// [`MIN_SEGMENT_BYTES`] and [`MAX_SEGMENT_BYTES`]. It also bounds one
    /// record: its frame must fit in an empty segment. Segments already on
    /// disk keep the size they were made with.
    pub segment_bytes: u64,
    /// How new segments are preallocated.
    pub preallocate: Preallocate,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            segment_bytes: 64 << 20,
            preallocate: Preallocate::Zeros,
        }
    }
}

impl Options {
    fn validate(&self) -> Result<(), WalError> {
        let n = self.segment_bytes;
        if !(MIN_SEGMENT_BYTES..=MAX_SEGMENT_BYTES).contains(&n)
            || !n.is_multiple_of(record::ALIGN as u64)
        {
            return Err(WalError::InvalidOptions(format!(
                "segment_bytes is {n}; it must be a multiple of {} from {MIN_SEGMENT_BYTES} to {MAX_SEGMENT_BYTES}",
                record::ALIGN
            )));
        }
        Ok(())
    }

    /// The largest payload one record may carry.
    pub fn max_payload(&self) -> usize {
        // segment_bytes is at most 1 GiB (validated), so this fits a usize.
        self.segment_bytes as usize - HEADER_LEN - FRAME_HEADER
    }
}

/// One record of the log: what the caller stored, as it stored it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The caller's index (e.g. the slot; 0 for records that have none).
    /// Only [`Wal::purge_through`] looks at it.
    pub index: u64,
    /// The caller's bytes, opaque to the log.
    pub payload: Vec<u8>,
}

/// Why the log could not be opened or written.
#[derive(Debug)]
pub enum WalError {
    /// The [`Options`] are out of range; the message says which.
    InvalidOptions(String),
    /// Another [`Wal`], in this process or another, has the directory open.
    InUse(PathBuf),
    /// A file system call failed: what we were doing, on which path.
    Io {
        /// What was being done, naming the path.
        what: String,
        /// The error the call returned.
        source: io::Error,
    },
    /// Bytes that were once durable are damaged. The replica must not
    /// start from this log: its votes may have counted towards a choice.
    Corrupt {
        /// The segment file.
        file: PathBuf,
        /// Offset in the file where the damage starts.
        offset: u64,
        /// What is wrong there.
        reason: String,
    },
    /// A segment between the first and the last is missing.
    MissingSegment {
        /// The path the missing segment would have.
        file: PathBuf,
    },
    /// A record's payload is larger than a segment can hold.
    RecordTooLarge {
        /// The payload's length.
        len: usize,
        /// The largest payload allowed ([`Options::max_payload`]).
        max: usize,
    },
    /// An earlier write or sync failed; what is on disk is unknown. Reopen.
    Poisoned,
}

impl fmt::Display for WalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalError::InvalidOptions(why) => write!(f, "invalid log options: {why}"),
            WalError::InUse(dir) => write!(
                f,
                "log directory {} is already in use by another paxoskv log",
                dir.display()
            ),
            WalError::Io { what, source } => write!(f, "{what}: {source}"),
            WalError::Corrupt {
                file,
                offset,
                reason,
            } => write!(
                f,
                "corrupt log segment {} at offset {offset}: {reason}; refusing to start",
                file.display()
            ),
            WalError::MissingSegment { file } => write!(
                f,
                "log segment {} is missing, with segments before and after it; refusing to start",
                file.display()
            ),
            WalError::RecordTooLarge { len, max } => {
                write!(f, "log record of {len} bytes; at most {max} fit a segment")
            }
            WalError::Poisoned => write!(
                f,
                "an earlier write or sync of the log failed; reopen the log"
            ),
        }
    }
}

impl std::error::Error for WalError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            WalError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn io_err(what: impl FnOnce() -> String) -> impl FnOnce(io::Error) -> WalError {
    move |source| WalError::Io {
        what: what(),
        source,
    }
}

/// A segment before the active one: immutable, kept until purged.
#[derive(Debug)]
struct Sealed {
    seq: u64,
    path: PathBuf,
    /// Highest record index in it; 0 if it has no records.
    max_index: u64,
}

/// The segment commits write to.
#[derive(Debug)]
struct Active {
    seq: u64,
    path: PathBuf,
    file: File,
    /// Where the next frame goes; everything before it is synced.
    offset: u64,
    /// The file's preallocated size.
    capacity: u64,
    max_index: u64,
}

/// An open log. Single writer: every method takes `&mut self`; callers that
/// gather records from many tasks hand them to the one owner, which commits
/// what arrived together.
#[derive(Debug)]
pub struct Wal {
    dir: PathBuf,
    /// The directory, open, to fsync it after creating or deleting files.
    dir_file: File,
    /// Holds the `flock` for as long as the log is open.
    _lock: File,
    options: Options,
    /// Oldest first; sequence numbers contiguous and below `active.seq`.
    sealed: VecDeque<Sealed>,
    active: Active,
    /// Frames of the commit being written, reused between commits.
    buf: Vec<u8>,
    poisoned: bool,
    /// Fault injection: syncs left before every sync fails (see
    /// [`Wal::fail_syncs_after`]).
    syncs_before_failing: Option<u64>,
}

/// What scanning one segment found.
#[derive(Debug)]
enum Scanned {
    /// Every frame is whole; the log ends at `end` (zeros, or the file end).
    Clean {
        frames: Vec<record::Frame>,
        end: usize,
    },
    /// The last segment's last commit is torn: bytes `end..dirty_end` are
    /// its remains and must be zeroed.
    Torn {
        frames: Vec<record::Frame>,
        end: usize,
        dirty_end: usize,
        reason: &'static str,
    },
    /// Damage where only a torn write is allowed to be.
    Corrupt { offset: usize, reason: String },
}

/// Scans one segment's bytes (header already checked). `last` says whether
/// it is the last segment, the only place a torn write may be.
fn scan(seg: &[u8], last: bool) -> Scanned {
    let mut frames = Vec::new();
    let mut offset = HEADER_LEN;
    let reason = loop {
        if offset >= seg.len() {
            return Scanned::Clean {
                frames,
                end: offset,
            };
        }
        match record::parse(seg, offset) {
            Parsed::Frame(frame) => {
                offset += frame.len;
                frames.push(frame);
            }
            Parsed::Empty => break "unwritten gap",
            Parsed::Bad(reason) => break reason,
        }
    };
    let after = record::find_after(seg, offset);
    let later = if last {
        // Only a frame that starts a commit proves the damaged one was synced.
        after.iter().find(|f| f.starts_commit)
    } else {
        after.first()
    };
    if let Some(later) = later {
        return Scanned::Corrupt {
            offset,
            reason: format!(
                "{reason}, with a whole record at offset {} after it",
                later.offset
            ),
        };
    }
    match seg[offset..].iter().rposition(|b| *b != 0) {
        None => Scanned::Clean {
            frames,
            end: offset,
        },
        Some(last_nonzero) if last => Scanned::Torn {
            frames,
            end: offset,
            dirty_end: offset + last_nonzero + 1,
            reason,
        },
        Some(_) => Scanned::Corrupt {
            offset,
            reason: format!("{reason} in a segment that is not the last"),
        },
    }
}

impl Wal {
    /// Opens the log in `dir`, creating the directory and a first segment if
    /// there are none, and returns every record in it, oldest first.
    ///
    /// A torn write at the tail of the last segment is truncated, with a
    /// `WARN`. Damage anywhere else fails with [`WalError::Corrupt`] naming
    /// the file and offset, a gap in the segment sequence with
    /// [`WalError::MissingSegment`]; nothing on disk is changed then.
    pub fn open(dir: &Path, options: Options) -> Result<(Wal, Vec<Record>), WalError> {
        options.validate()?;
        let created = !dir.exists();
        std::fs::create_dir_all(dir).map_err(io_err(|| {
            format!("creating log directory {}", dir.display())
        }))?;
        if created {
            sync_parent(dir)?;
        }
        let dir_file = File::open(dir).map_err(io_err(|| {
            format!("opening log directory {}", dir.display())
        }))?;
        let lock = lock(dir)?;

        let mut seqs = Vec::new();
        let mut tmps = Vec::new();
        let entries = std::fs::read_dir(dir).map_err(io_err(|| {
            format!("listing log directory {}", dir.display())
        }))?;
        for entry in entries {
            let entry = entry.map_err(io_err(|| {
                format!("listing log directory {}", dir.display())
            }))?;
            // A name that is not UTF-8 is not one we made.
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            match segment::classify(&name) {
                segment::Entry::Segment(seq) => seqs.push(seq),
                segment::Entry::Tmp => tmps.push(entry.path()),
                segment::Entry::Other => {}
            }
        }
        seqs.sort_unstable();
        if let Some(w) = seqs.windows(2).find(|w| w[1] != w[0] + 1) {
            return Err(WalError::MissingSegment {
                file: dir.join(segment::name(w[0] + 1)),
            });
        }
        // Checked before deleting anything, so a refused log is left as it was.
        let mut sealed = VecDeque::new();
        let mut records = Vec::new();
        let mut last = None;
        for (i, &seq) in seqs.iter().enumerate() {
            let is_last = i + 1 == seqs.len();
            let path = dir.join(segment::name(seq));
            let (file, bytes) = read_segment(&path, is_last)?;
            segment::check_header(&bytes, seq).map_err(|reason| WalError::Corrupt {
                file: path.clone(),
                offset: 0,
                reason,
            })?;
            let (frames, end) = match scan(&bytes, is_last) {
                Scanned::Clean { frames, end } => (frames, end),
                Scanned::Corrupt { offset, reason } => {
                    return Err(WalError::Corrupt {
                        file: path,
                        offset: offset as u64,
                        reason,
                    });
                }
                Scanned::Torn {
                    frames,
                    end,
                    dirty_end,
                    reason,
                } => {
                    tracing::warn!(
                        file = %path.display(),
                        offset = end,
                        bytes = dirty_end - end,
                        reason,
                        "truncating a torn write at the tail of the log"
                    );
                    let zeros = vec![0u8; dirty_end - end];
                    file.write_all_at(&zeros, end as u64)
                        .and_then(|()| file.sync_data())
                        .map_err(io_err(|| {
                            format!("truncating the torn tail of {}", path.display())
                        }))?;
                    (frames, end)
                }
            };
            let max_index = frames.iter().map(|f| f.index).max().unwrap_or(0);
            records.extend(frames.into_iter().map(|f| Record {
                index: f.index,
                payload: bytes[f.payload].to_vec(),
            }));
            if is_last {
                last = Some(Active {
                    seq,
                    path,
                    file,
                    offset: end as u64,
                    capacity: bytes.len() as u64,
                    max_index,
                });
            } else {
                sealed.push_back(Sealed {
                    seq,
                    path,
                    max_index,
                });
            }
        }
        for tmp in &tmps {
            std::fs::remove_file(tmp).map_err(io_err(|| format!("removing {}", tmp.display())))?;
        }
        let active = match last {
            Some(active) => active,
            None => new_segment(dir, &dir_file, 1, &options)?,
        };
        // Covers the tmp files removed, the lock file and a first segment.
        segment::sync_dir(&dir_file).map_err(io_err(|| {
            format!("fsyncing log directory {}", dir.display())
        }))?;
        let wal = Wal {
            dir: dir.to_path_buf(),
            dir_file,
            _lock: lock,
            options,
            sealed,
            active,
            buf: Vec::new(),
            poisoned: false,
            syncs_before_failing: None,
        };
        wal.check_invariants();
        Ok((wal, records))
    }

    /// Appends `records`, in order, as one commit, and returns once they are
    /// durable: one `pwrite` and one `fdatasync` (two of each if the commit
    /// crosses into a new segment). An empty slice does nothing.
    ///
    /// Fails with [`WalError::RecordTooLarge`] before writing anything if a
    /// payload exceeds [`Options::max_payload`]. Any I/O failure poisons the
    /// log (see [`WalError::Poisoned`]).
    pub fn commit(&mut self, records: &[Record]) -> Result<(), WalError> {
        if self.poisoned {
            return Err(WalError::Poisoned);
        }
        let max = self.options.max_payload();
        if let Some(r) = records.iter().find(|r| r.payload.len() > max) {
            return Err(WalError::RecordTooLarge {
                len: r.payload.len(),
                max,
            });
        }
        let result = self.write_commit(records);
        if result.is_err() {
            self.poisoned = true;
        }
        self.check_invariants();
        result
    }

    fn write_commit(&mut self, records: &[Record]) -> Result<(), WalError> {
        assert!(self.buf.is_empty());
        for (i, r) in records.iter().enumerate() {
            let len = record::frame_len(r.payload.len()) as u64;
            if self.active.offset + self.buf.len() as u64 + len > self.active.capacity {
                self.write_buf()?;
                self.rotate()?;
                // A new segment holds any payload up to max_payload.
                assert!(self.active.offset + len <= self.active.capacity);
            }
            record::encode(&mut self.buf, r.index, &r.payload, i == 0);
            self.active.max_index = self.active.max_index.max(r.index);
        }
        self.write_buf()
    }

    /// Writes the frames in `buf` at the end of the active segment and syncs.
    fn write_buf(&mut self) -> Result<(), WalError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let active = &mut self.active;
        assert!(active.offset + self.buf.len() as u64 <= active.capacity);
        active
            .file
            .write_all_at(&self.buf, active.offset)
            .map_err(io_err(|| format!("writing to {}", active.path.display())))?;
        let synced = match &mut self.syncs_before_failing {
            Some(0) => Err(io::Error::other("injected fault: fdatasync failed (EIO)")),
            Some(left) => {
                *left -= 1;
                active.file.sync_data()
            }
            None => active.file.sync_data(),
        };
        synced.map_err(io_err(|| format!("fdatasync of {}", active.path.display())))?;
        active.offset += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// Fault injection, for tests of what a replica does when its disk
    /// fails: after `n` more successful syncs, every sync of a commit fails
    /// (its records were written, as when a real `fdatasync` reports EIO)
    /// and poisons the log.
    pub fn fail_syncs_after(&mut self, n: u64) {
        self.syncs_before_failing = Some(n);
    }

    /// Seals the active segment (already synced) and starts the next.
    fn rotate(&mut self) -> Result<(), WalError> {
        assert!(self.buf.is_empty(), "rotating with unwritten frames");
        let next = new_segment(
            &self.dir,
            &self.dir_file,
            self.active.seq + 1,
            &self.options,
        )?;
        let old = std::mem::replace(&mut self.active, next);
        self.sealed.push_back(Sealed {
            seq: old.seq,
            path: old.path,
            max_index: old.max_index,
        });
        Ok(())
    }

    /// Deletes the oldest segments, other than the active one, while every
    /// record in them has an index `<= index`, each deletion made durable
    /// before the next. Returns how many were deleted.
    ///
    /// Re-append (commit) first anything still needed that lives in them,
    /// such as the current promise (index 0 counts as `<=` everything).
    pub fn purge_through(&mut self, index: u64) -> Result<usize, WalError> {
        if self.poisoned {
            return Err(WalError::Poisoned);
        }
        let mut deleted = 0;
        while let Some(oldest) = self.sealed.front() {
            if oldest.max_index > index {
                break;
            }
            // A failed removal changes nothing; a failed directory fsync
            // leaves the deletion's durability unknown, so it poisons.
            std::fs::remove_file(&oldest.path)
                .map_err(io_err(|| format!("deleting {}", oldest.path.display())))?;
            if let Err(e) = segment::sync_dir(&self.dir_file) {
                self.poisoned = true;
                return Err(io_err(|| {
                    format!("fsyncing log directory {}", self.dir.display())
                })(e));
            }
            self.sealed.pop_front();
            deleted += 1;
        }
        self.check_invariants();
        Ok(deleted)
    }

    /// The log's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How many segment files the log has, the active one included.
    pub fn segment_count(&self) -> usize {
        self.sealed.len() + 1
    }

    fn check_invariants(&self) {
        let a = &self.active;
        assert!(a.offset >= HEADER_LEN as u64 && a.offset <= a.capacity);
        assert!(a.offset.is_multiple_of(record::ALIGN as u64) || a.offset == a.capacity);
        assert!(self.buf.is_empty() || self.poisoned);
        let mut next = a.seq;
        for s in self.sealed.iter().rev() {
            assert_eq!(s.seq + 1, next, "segments not contiguous");
            next = s.seq;
        }
    }
}

/// Creates, preallocates, names and makes durable segment `seq`.
fn new_segment(
    dir: &Path,
    dir_file: &File,
    seq: u64,
    options: &Options,
) -> Result<Active, WalError> {
    let (file, tmp) = segment::create_tmp(dir, seq, options.segment_bytes, options.preallocate)
        .map_err(io_err(|| {
            format!("creating log segment {seq} in {}", dir.display())
        }))?;
    let path =
        segment::publish(dir, seq).map_err(io_err(|| format!("renaming {}", tmp.display())))?;
    segment::sync_dir(dir_file).map_err(io_err(|| {
        format!("fsyncing log directory {}", dir.display())
    }))?;
    Ok(Active {
        seq,
        path,
        file,
        offset: HEADER_LEN as u64,
        capacity: options.segment_bytes,
        max_index: 0,
    })
}

/// Reads a whole segment; the last one is kept open for writing.
fn read_segment(path: &Path, writable: bool) -> Result<(File, Vec<u8>), WalError> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .map_err(io_err(|| format!("opening {}", path.display())))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(io_err(|| format!("reading {}", path.display())))?;
    Ok((file, bytes))
}

/// Takes the log directory's lock, or says who holds it.
fn lock(dir: &Path) -> Result<File, WalError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err(|| format!("opening {}", path.display())))?;
    // SAFETY: flock only reads its integer arguments; the descriptor stays
    // open for as long as the returned File, which holds the lock.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(WalError::InUse(dir.to_path_buf()));
        }
        return Err(WalError::Io {
            what: format!("locking {}", path.display()),
            source: err,
        });
    }
    Ok(file)
}

/// Fsyncs the parent of a directory we just created, so its entry is durable.
fn sync_parent(dir: &Path) -> Result<(), WalError> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|f| f.sync_all())
        .map_err(io_err(|| {
            format!("fsyncing directory {}", parent.display())
        }))
}
