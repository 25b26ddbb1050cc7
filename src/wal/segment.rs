//! Segment files: their names, their header, and the steps that create one
//! so that a crash between any two of them leaves a log that opens.
//!
//! A segment is `<seq>.wal`, `seq` a u64 in 20 decimal digits (so names sort
//! as numbers do), starting at 1 and rising by one per rotation. Its first
//! [`HEADER_LEN`] bytes are:
//!
//! ```text
//! offset  size  field
//!      0     8  magic "PXKVWAL\0"
//!      8     4  format version, u32 LE (1)
//!     12     4  zero
//!     16     8  seq, u64 LE (must match the name)
//!     24     4  CRC32C of bytes 0..24
//!     28     4  zero
//! ```
//!
//! then frames (see `record.rs`) from offset 32 to the end of the file.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::Preallocate;

/// Bytes before the first frame.
pub(super) const HEADER_LEN: usize = 32;
const MAGIC: &[u8; 8] = b"PXKVWAL\0";
const VERSION: u32 = 1;
const SUFFIX: &str = ".wal";
const TMP_SUFFIX: &str = ".wal.tmp";
/// Zeros written per call when preallocating by writing.
const ZERO_CHUNK: usize = 1 << 20;

/// The file name of segment `seq`.
pub(super) fn name(seq: u64) -> String {
    format!("{seq:020}{SUFFIX}")
}

fn tmp_name(seq: u64) -> String {
    format!("{seq:020}{TMP_SUFFIX}")
}

/// What a directory entry is to the log.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Entry {
    Segment(u64),
    /// A segment whose creation did not finish: never published, so it
    /// holds no record, and is deleted on open.
    Tmp,
    Other,
}

/// Classifies a file name. Only the exact form [`name`] makes is a segment,
/// so `1.wal` or `+0000000000000000001.wal` are not taken for one.
pub(super) fn classify(file_name: &str) -> Entry {
    if file_name.ends_with(TMP_SUFFIX) {
        return Entry::Tmp;
    }
    let Some(digits) = file_name.strip_suffix(SUFFIX) else {
        return Entry::Other;
    };
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Entry::Other;
    }
    match digits.parse::<u64>() {
        Ok(seq) if seq > 0 => Entry::Segment(seq),
        _ => Entry::Other,
    }
}

/// The header of segment `seq`.
pub(super) fn header(seq: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32c::crc32c(&h[0..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Checks the header at the start of a segment's bytes; the reason it is
/// wrong, if it is.
pub(super) fn check_header(seg: &[u8], seq: u64) -> Result<(), String> {
    let Some(h) = seg.get(0..HEADER_LEN) else {
        return Err(format!(
            "the file is {} bytes long, shorter than a segment header",
            seg.len()
        ));
    };
    if &h[0..8] != MAGIC {
        return Err("not a paxoskv log segment (bad magic)".to_string());
    }
    let crc = u32::from_le_bytes([h[24], h[25], h[26], h[27]]);
    if crc32c::crc32c(&h[0..24]) != crc {
        return Err("segment header checksum mismatch".to_string());
    }
    let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if version != VERSION {
        return Err(format!(
            "segment format version {version}; this build reads {VERSION}"
        ));
    }
    let mut seq_bytes = [0u8; 8];
    seq_bytes.copy_from_slice(&h[16..24]);
    let found = u64::from_le_bytes(seq_bytes);
    if found != seq {
        return Err(format!("header says segment {found}, the name says {seq}"));
    }
    Ok(())
}

/// Rotation step 1: writes segment `seq` under a temporary name, header
/// and preallocated space, and fsyncs it, so that once it has its real name
/// its header and size are durable. Returns the open file and its path.
///
/// A crash after this step leaves a `.wal.tmp` file, which open deletes.
pub(super) fn create_tmp(
    dir: &Path,
    seq: u64,
    capacity: u64,
    how: Preallocate,
) -> io::Result<(File, PathBuf)> {
    let path = dir.join(tmp_name(seq));
    // `create_new`: a tmp file of the same name is a leftover open failed
    // to delete, or another writer; either way not ours to overwrite.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    preallocate(&file, capacity, how)?;
    file.write_all_at(&header(seq), 0)?;
    file.sync_all()?;
    Ok((file, path))
}

/// Rotation step 2: gives the segment its real name. Not durable until the
/// directory is fsynced (step 3, [`sync_dir`]); a crash in between leaves
/// either name, and both open.
pub(super) fn publish(dir: &Path, seq: u64) -> io::Result<PathBuf> {
    let to = dir.join(name(seq));
    std::fs::rename(dir.join(tmp_name(seq)), &to)?;
    Ok(to)
}

/// Makes the directory's entries (files created, renamed, deleted) durable.
pub(super) fn sync_dir(dir: &File) -> io::Result<()> {
    dir.sync_all()
}

/// Makes `file` `len` bytes long with every block allocated, so writes
/// inside it never change its size or allocation (see the module doc of
/// `wal` for why that matters to `fdatasync`).
pub(super) fn preallocate(file: &File, len: u64, how: Preallocate) -> io::Result<()> {
    if how == Preallocate::Fallocate {
        let len_off = libc::off_t::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "segment too large"))?;
        // SAFETY: fallocate only reads its integer arguments; the
        // descriptor is open for writing for the duration of the call.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len_off) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        // File systems without fallocate (tmpfs on old kernels, some
        // network file systems) get zeros written instead.
        if !matches!(
            err.raw_os_error(),
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
        ) {
            return Err(err);
        }
    }
    let zeros = vec![0u8; ZERO_CHUNK];
    let mut at = 0u64;
    while at < len {
        // Bounded by ZERO_CHUNK, so the cast cannot truncate.
        let n = (len - at).min(ZERO_CHUNK as u64) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_as_numbers_and_only_they_are_segments() {
        assert_eq!(name(1), "00000000000000000001.wal");
        assert!(name(9) < name(10));
        assert_eq!(classify(&name(7)), Entry::Segment(7));
        assert_eq!(classify(&name(u64::MAX)), Entry::Segment(u64::MAX));
        assert_eq!(classify(&tmp_name(7)), Entry::Tmp);
        assert_eq!(classify("1.wal"), Entry::Other);
        assert_eq!(classify("0000000000000000000a.wal"), Entry::Other);
        assert_eq!(classify(&name(0)), Entry::Other);
        assert_eq!(classify("LOCK"), Entry::Other);
    }

    #[test]
    fn header_round_trip_and_damage() {
        let h = header(5);
        assert_eq!(check_header(&h, 5), Ok(()));
        assert!(check_header(&h, 6).is_err());
        assert!(check_header(&h[..10], 5).is_err());
        for byte in 0..28 {
            let mut bad = h;
            bad[byte] ^= 0x10;
            assert!(check_header(&bad, 5).is_err(), "byte {byte}");
        }
    }
}
