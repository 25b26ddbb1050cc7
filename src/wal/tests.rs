//! Tests of the log as a whole: what survives a reopen, a torn write, a
//! flipped bit, and a crash between the steps of rotation and purge.
//!
//! A crash is simulated by dropping the [`Wal`] and doing, by hand, only
//! the first steps of what it would have done; the page cache is not
//! dropped, so these test what each step leaves in the file system's
//! namespace and files, not the device's write ordering.

use std::path::{Path, PathBuf};

use super::record::frame_len;
use super::segment::{self, HEADER_LEN};
use super::*;

/// Small segments, so that a few records rotate.
fn opts() -> Options {
    Options {
        segment_bytes: 4096,
        preallocate: Preallocate::Zeros,
    }
}

/// A record whose bytes depend on `i` and are all nonzero, so that zeroing
/// any suffix of it changes it.
fn rec(index: u64, len: usize) -> Record {
    Record {
        index,
        payload: (0..len)
            .map(|j| (index as usize * 31 + j * 7) as u8 | 1)
            .collect(),
    }
}

fn seg_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(segment::name(seq))
}

fn open(dir: &Path) -> (Wal, Vec<Record>) {
    match Wal::open(dir, opts()) {
        Ok(v) => v,
        Err(e) => panic!("open {}: {e}", dir.display()),
    }
}

fn open_err(dir: &Path) -> WalError {
    match Wal::open(dir, opts()) {
        Ok((_, records)) => panic!("opened with {} records; expected an error", records.len()),
        Err(e) => e,
    }
}

/// Commits each record alone and returns them.
fn commit_each(wal: &mut Wal, records: &[Record]) {
    for r in records {
        wal.commit(std::slice::from_ref(r)).expect("commit");
    }
}

/// Offset in its segment of the `n`th record, when records of these
/// payload lengths fill segment 1 from the start.
fn offset_of(lens: &[usize], n: usize) -> usize {
    HEADER_LEN + lens[..n].iter().map(|l| frame_len(*l)).sum::<usize>()
}

fn patch(path: &Path, offset: usize, bytes: &[u8]) {
    let mut data = std::fs::read(path).expect("read segment");
    data[offset..offset + bytes.len()].copy_from_slice(bytes);
    std::fs::write(path, data).expect("write segment");
}

#[test]
fn round_trip_across_reopen() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("log");
    let first = vec![rec(0, 12), rec(1, 200), rec(2, 0), rec(3, 1)];
    {
        let (mut wal, records) = open(&dir);
        assert!(records.is_empty());
        wal.commit(&first[..1]).expect("commit");
        wal.commit(&first[1..]).expect("commit");
        wal.commit(&[]).expect("an empty commit is a no-op");
    }
    let (mut wal, records) = open(&dir);
    assert_eq!(records, first);
    wal.commit(&[rec(4, 33)]).expect("commit after reopen");
    drop(wal);
    let (_wal, records) = open(&dir);
    assert_eq!(records.len(), 5);
    assert_eq!(records[4], rec(4, 33));
}

#[test]
fn a_fresh_segment_scans_as_a_clean_end() {
    let tmp = tempfile::tempdir().expect("tempdir");
    drop(open(tmp.path()));
    let bytes = std::fs::read(seg_path(tmp.path(), 1)).expect("read");
    assert_eq!(bytes.len(), 4096, "preallocated to full size");
    assert!(bytes[HEADER_LEN..].iter().all(|b| *b == 0));
    assert!(matches!(
        scan(&bytes, true),
        Scanned::Clean { ref frames, end } if frames.is_empty() && end == HEADER_LEN
    ));
    // And after some records, the zeroed rest is still just the end.
    let (mut wal, _) = open(tmp.path());
    commit_each(&mut wal, &[rec(1, 10), rec(2, 20)]);
    drop(wal);
    let bytes = std::fs::read(seg_path(tmp.path(), 1)).expect("read");
    let end = offset_of(&[10, 20], 2);
    assert!(matches!(
        scan(&bytes, true),
        Scanned::Clean { ref frames, end: e } if frames.len() == 2 && e == end
    ));
}

#[test]
fn a_torn_last_record_is_truncated_at_every_byte_offset() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let lens = [40, 100, 57];
    let records: Vec<Record> = lens
        .iter()
        .enumerate()
        .map(|(i, l)| rec(i as u64 + 1, *l))
        .collect();
    let source = tmp.path().join("source");
    {
        let (mut wal, _) = open(&source);
        commit_each(&mut wal, &records);
    }
    let whole = std::fs::read(seg_path(&source, 1)).expect("read");
    let last = offset_of(&lens, 2);
    let last_len = frame_len(lens[2]);
    // Every prefix of the last record's header and payload, from nothing
    // written to all but its last byte; the padding after it is zero anyway.
    for written in 0..(record::FRAME_HEADER + lens[2]) {
        let dir = tmp.path().join(format!("torn-{written}"));
        std::fs::create_dir(&dir).expect("mkdir");
        let mut torn = whole.clone();
        torn[last + written..last + last_len].fill(0);
        std::fs::write(seg_path(&dir, 1), &torn).expect("write");

        let (mut wal, got) = open(&dir);
        assert_eq!(got, records[..2], "torn after {written} bytes");
        let on_disk = std::fs::read(seg_path(&dir, 1)).expect("read");
        assert!(
            on_disk[last..].iter().all(|b| *b == 0),
            "torn after {written} bytes: the tail was not zeroed"
        );
        // The log goes on from where the torn record was.
        wal.commit(&[rec(9, 30)]).expect("commit after truncation");
        drop(wal);
        let (_wal, got) = open(&dir);
        assert_eq!(got.len(), 3, "torn after {written} bytes");
        assert_eq!(got[..2], records[..2]);
        assert_eq!(got[2], rec(9, 30));
    }
}

#[test]
fn a_torn_commit_with_a_hole_is_truncated_not_refused() {
    // A crash during a commit of several records may persist a later page
    // of it without an earlier one: the records after the hole do not start
    // a commit, so this is a torn write, not corruption.
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let (mut wal, _) = open(dir);
    wal.commit(&[rec(1, 20)]).expect("commit");
    wal.commit(&[rec(2, 20), rec(3, 20), rec(4, 20)])
        .expect("commit");
    drop(wal);
    let lens = [20, 20, 20, 20];
    let hole = offset_of(&lens, 2);
    patch(&seg_path(dir, 1), hole, &vec![0; frame_len(20)]);
    let (_wal, got) = open(dir);
    // The prefix before the hole survives, the record after it goes.
    assert_eq!(got, vec![rec(1, 20), rec(2, 20)]);
    let on_disk = std::fs::read(seg_path(dir, 1)).expect("read");
    assert!(on_disk[hole..].iter().all(|b| *b == 0));
}

#[test]
fn damage_in_the_last_commit_is_truncated_like_a_torn_write() {
    // No scan can tell a flipped bit in the last commit from a torn write;
    // the module doc says so. Pin the behaviour.
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let (mut wal, _) = open(dir);
    commit_each(&mut wal, &[rec(1, 20), rec(2, 20)]);
    drop(wal);
    let at = offset_of(&[20, 20], 1) + record::FRAME_HEADER + 3;
    patch(&seg_path(dir, 1), at, &[0xee]);
    let (_wal, got) = open(dir);
    assert_eq!(got, vec![rec(1, 20)]);
}

#[test]
fn a_flipped_bit_in_a_middle_record_is_refused_by_file_and_offset() {
    let lens = [30, 30, 30, 30, 30];
    let records: Vec<Record> = (1..=5).map(|i| rec(i, 30)).collect();
    // A bit in the payload, in the length, and in the CRC, of record 2.
    for (what, within) in [("payload", 20usize), ("length", 1), ("crc", 5)] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let (mut wal, _) = open(dir);
        commit_each(&mut wal, &records);
        drop(wal);
        let path = seg_path(dir, 1);
        let record_at = offset_of(&lens, 2);
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[record_at + within] ^= 0x04;
        std::fs::write(&path, &bytes).expect("write");

        match open_err(dir) {
            WalError::Corrupt {
                file,
                offset,
                ref reason,
            } => {
                assert_eq!(file, path, "{what}");
                assert_eq!(offset, record_at as u64, "{what}: {reason}");
                let message = open_err(dir).to_string();
                assert!(message.contains(&path.display().to_string()), "{message}");
                assert!(
                    message.contains(&format!("offset {record_at}")),
                    "{message}"
                );
            }
            other => panic!("{what}: expected Corrupt, got {other}"),
        }
        // A refused log is left as it was.
        assert_eq!(std::fs::read(&path).expect("read"), bytes, "{what}");
    }
}

#[test]
fn a_damaged_header_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    drop(open(dir));
    patch(&seg_path(dir, 1), 17, &[0x55]);
    assert!(matches!(open_err(dir), WalError::Corrupt { offset: 0, .. }));
}

#[test]
fn rotation_keeps_every_record_in_order() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let mut all = Vec::new();
    let (mut wal, _) = open(dir);
    let mut index = 0;
    // Commits of 1 to 40 records of up to 300 bytes, some larger than a
    // 4 KiB segment, so commits span segments.
    for group in 1..=40usize {
        let batch: Vec<Record> = (0..group)
            .map(|j| {
                index += 1;
                rec(index, (group * 13 + j * 29) % 300)
            })
            .collect();
        wal.commit(&batch).expect("commit");
        all.extend(batch);
    }
    let segments = wal.segment_count();
    assert!(segments > 10, "only {segments} segments");
    drop(wal);
    let (wal, got) = open(dir);
    assert_eq!(wal.segment_count(), segments);
    assert_eq!(got.len(), all.len());
    assert_eq!(got, all);
    for seq in 1..=segments as u64 {
        let len = std::fs::metadata(seg_path(dir, seq)).expect("stat").len();
        assert_eq!(len, 4096, "segment {seq} not preallocated");
    }
}

#[test]
fn a_record_of_the_largest_size_fits_and_a_larger_one_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let (mut wal, _) = open(dir);
    wal.commit(&[rec(1, 10)]).expect("commit");
    let max = opts().max_payload();
    assert!(matches!(
        wal.commit(&[rec(2, 5), rec(3, max + 1)]),
        Err(WalError::RecordTooLarge { len, max: m }) if len == max + 1 && m == max
    ));
    // Refused before writing anything; the log goes on.
    wal.commit(&[rec(4, max)])
        .expect("the largest record fits a segment");
    assert_eq!(wal.segment_count(), 2);
    drop(wal);
    let (_wal, got) = open(dir);
    assert_eq!(got, vec![rec(1, 10), rec(4, max)]);
}

/// A log with records in segments 1..=n, n >= 3. Returns the records.
fn log_of_segments(dir: &Path, at_least: usize) -> Vec<Record> {
    let (mut wal, _) = open(dir);
    let mut all = Vec::new();
    let mut index = 0;
    while wal.segment_count() < at_least {
        index += 1;
        let r = rec(index, 500);
        wal.commit(std::slice::from_ref(&r)).expect("commit");
        all.push(r);
    }
    all
}

#[test]
fn a_crash_at_each_step_of_rotation_leaves_a_log_that_opens() {
    for steps in 0..=3 {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let records = log_of_segments(dir, 2);
        let dir_file = File::open(dir).expect("open dir");
        // The steps of Wal::rotate, one at a time, as if the process died
        // after `steps` of them.
        if steps >= 1 {
            segment::create_tmp(dir, 3, 4096, Preallocate::Zeros).expect("create tmp");
        }
        if steps >= 2 {
            segment::publish(dir, 3).expect("rename");
        }
        if steps >= 3 {
            segment::sync_dir(&dir_file).expect("fsync dir");
        }
        let (mut wal, got) = open(dir);
        assert_eq!(got, records, "after {steps} steps");
        let expected_segments = if steps >= 2 { 3 } else { 2 };
        assert_eq!(
            wal.segment_count(),
            expected_segments,
            "after {steps} steps"
        );
        assert!(
            !dir.join(format!("{}.tmp", segment::name(3))).exists(),
            "after {steps} steps: the tmp file was not removed"
        );
        // The log goes on, and rotates again past whatever was left.
        let more: Vec<Record> = (100..120).map(|i| rec(i, 500)).collect();
        commit_each(&mut wal, &more);
        drop(wal);
        let (_wal, got) = open(dir);
        assert_eq!(got.len(), records.len() + more.len(), "after {steps} steps");
        assert_eq!(got[records.len()..], more);
    }
}

#[test]
fn a_half_written_tmp_segment_is_removed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let records = log_of_segments(dir, 2);
    // A crash in the middle of preallocation: a short file, no header.
    std::fs::write(dir.join(format!("{}.tmp", segment::name(3))), [0u8; 100]).expect("write");
    let (_wal, got) = open(dir);
    assert_eq!(got, records);
    assert!(!dir.join(format!("{}.tmp", segment::name(3))).exists());
}

#[test]
fn a_crash_at_each_step_of_purge_leaves_a_log_that_opens() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let source = tmp.path().join("source");
    let records = log_of_segments(&source, 5);
    // Which records each segment holds, from a reopen per segment count.
    let per_segment: Vec<Vec<Record>> = (1..=5u64)
        .map(|seq| {
            let dir = tmp.path().join(format!("one-{seq}"));
            std::fs::create_dir(&dir).expect("mkdir");
            std::fs::copy(seg_path(&source, seq), seg_path(&dir, seq)).expect("copy");
            open(&dir).1
        })
        .collect();
    assert_eq!(per_segment.concat(), records);
    // Purge deletes 1, fsyncs, deletes 2, fsyncs, ...: a crash after any
    // deletion leaves segments k+1..=5, and the fsync in between keeps a
    // later deletion from being durable before an earlier one.
    for deleted in 1..=4u64 {
        let dir = tmp.path().join(format!("purged-{deleted}"));
        std::fs::create_dir(&dir).expect("mkdir");
        for seq in deleted + 1..=5 {
            std::fs::copy(seg_path(&source, seq), seg_path(&dir, seq)).expect("copy");
        }
        let (mut wal, got) = open(&dir);
        assert_eq!(
            got,
            per_segment[deleted as usize..].concat(),
            "after deleting {deleted}"
        );
        assert_eq!(wal.segment_count(), 5 - deleted as usize);
        wal.commit(&[rec(999, 10)]).expect("commit");
    }
}

#[test]
fn purge_deletes_only_old_segments_at_or_below_the_index() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    // Segment 1: indexes 1 and 2; segment 2: index 100; segment 3: index 5
    // (a caller may re-append a low index); segment 4, active: index 0.
    let (mut wal, _) = open(dir);
    let big = opts().max_payload();
    wal.commit(&[rec(1, 100), rec(2, 100)]).expect("commit");
    wal.commit(&[rec(100, big)]).expect("commit");
    wal.commit(&[rec(5, big)]).expect("commit");
    wal.commit(&[rec(0, big)]).expect("commit");
    assert_eq!(wal.segment_count(), 4);
    assert_eq!(
        wal.purge_through(1).expect("purge"),
        0,
        "segment 1 holds index 2"
    );
    assert_eq!(wal.purge_through(2).expect("purge"), 1);
    assert!(!seg_path(dir, 1).exists());
    // Segment 3 (index 5) qualifies for 50, but segment 2 (index 100) does
    // not, and a gap is never made.
    assert_eq!(wal.purge_through(50).expect("purge"), 0);
    assert!(seg_path(dir, 3).exists());
    // Everything but the active segment, however high the index.
    assert_eq!(wal.purge_through(u64::MAX).expect("purge"), 2);
    assert_eq!(wal.segment_count(), 1);
    assert!(seg_path(dir, 4).exists());
    assert_eq!(wal.purge_through(u64::MAX).expect("purge"), 0);
    drop(wal);
    let (_wal, got) = open(dir);
    assert_eq!(got, vec![rec(0, big)]);
}

#[test]
fn a_missing_middle_segment_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    log_of_segments(dir, 4);
    std::fs::remove_file(seg_path(dir, 2)).expect("rm");
    match open_err(dir) {
        WalError::MissingSegment { file } => assert_eq!(file, seg_path(dir, 2)),
        other => panic!("expected MissingSegment, got {other}"),
    }
}

#[test]
fn damage_at_the_end_of_a_sealed_segment_is_refused() {
    // Only the last segment may end in a torn write: an earlier one was
    // synced before the next was created.
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let records = log_of_segments(dir, 3);
    let bytes = std::fs::read(seg_path(dir, 1)).expect("read");
    let Scanned::Clean { end, .. } = scan(&bytes, false) else {
        panic!("segment 1 should scan clean");
    };
    patch(&seg_path(dir, 1), end, &[1, 2, 3]);
    match open_err(dir) {
        WalError::Corrupt { file, offset, .. } => {
            assert_eq!(file, seg_path(dir, 1));
            assert_eq!(offset, end as u64);
        }
        other => panic!("expected Corrupt, got {other}"),
    }
    // And damage to the last whole record of a sealed segment, too.
    patch(&seg_path(dir, 1), end, &[0, 0, 0]);
    assert_eq!(open(dir).1, records);
    // (end - 6 is in the last record's payload, before its 4 bytes of padding.)
    patch(&seg_path(dir, 1), end - 6, &[0x80]);
    assert!(matches!(open_err(dir), WalError::Corrupt { .. }));
}

#[test]
fn a_second_open_of_the_same_directory_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (wal, _) = open(tmp.path());
    assert!(matches!(open_err(tmp.path()), WalError::InUse(_)));
    drop(wal);
    drop(open(tmp.path()));
}

#[test]
fn options_out_of_range_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for segment_bytes in [0, 4095, 4100, MAX_SEGMENT_BYTES + 8] {
        let options = Options {
            segment_bytes,
            preallocate: Preallocate::Zeros,
        };
        assert!(
            matches!(
                Wal::open(tmp.path(), options),
                Err(WalError::InvalidOptions(_))
            ),
            "{segment_bytes}"
        );
    }
}

#[test]
fn fallocate_segments_round_trip() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let options = Options {
        segment_bytes: 8192,
        preallocate: Preallocate::Fallocate,
    };
    let records: Vec<Record> = (1..=30).map(|i| rec(i, 700)).collect();
    {
        let (mut wal, _) = Wal::open(tmp.path(), options).expect("open");
        wal.commit(&records).expect("commit");
        assert!(wal.segment_count() > 2);
    }
    let (_wal, got) = Wal::open(tmp.path(), options).expect("reopen");
    assert_eq!(got, records);
}

#[test]
fn a_failed_sync_poisons_the_log_and_a_reopen_keeps_what_was_synced() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("log");
    let (mut wal, _) = open(&dir);
    wal.fail_syncs_after(2);
    commit_each(&mut wal, &[rec(1, 10), rec(2, 10)]);
    let e = wal.commit(&[rec(3, 10)]).expect_err("the third sync fails");
    assert!(
        matches!(&e, WalError::Io { what, .. } if what.contains("fdatasync")),
        "{e}"
    );
    // Never again: a retried fsync could report success for lost pages.
    assert!(matches!(wal.commit(&[rec(4, 10)]), Err(WalError::Poisoned)));
    drop(wal);
    let (_wal, records) = open(&dir);
    assert_eq!(&records[..2], &[rec(1, 10), rec(2, 10)]);
}
