//! Group commit of the Paxos log ([`paxoskv::wal`]) next to the floor it
//! sits on: a raw `pwrite` + `fdatasync` of the same bytes into a
//! preallocated file, in the same run, on the same disk.
//!
//! Run with `cargo bench --bench storage`. Files go under the target
//! directory (`CARGO_TARGET_TMPDIR`), which is on the project's disk, not
//! tmpfs. Each case is measured for both preallocation modes; a vote is a
//! 200-byte record, like one holding a small batch.
//!
//! The target (issue 9): one commit of one vote costs at most 1.5 times the
//! raw `fdatasync` of its bytes, p50. Criterion's median is in
//! `target/criterion/persist/<case>/<n>/new/estimates.json`.

use std::fs::{File, OpenOptions};
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use paxoskv::paxos::{Accepted, Ballot, Persist, Value};
use paxoskv::storage::Storage;
use paxoskv::wal::{Options, Preallocate, Record, Wal};

/// Payload bytes of one vote.
const VOTE_BYTES: usize = 200;
/// Bytes one vote takes in the log: a 16-byte frame header, the payload,
/// padding to 8.
const VOTE_FRAME_BYTES: usize = (16 + VOTE_BYTES).next_multiple_of(8);
/// Votes per group commit.
const GROUPS: [usize; 3] = [1, 16, 256];
/// Size of each log segment, and of the raw file.
const SEGMENT_BYTES: u64 = 64 << 20;

fn scratch() -> tempfile::TempDir {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(base).expect("create CARGO_TARGET_TMPDIR");
    tempfile::tempdir_in(base).expect("tempdir in CARGO_TARGET_TMPDIR")
}

fn mode_name(mode: Preallocate) -> &'static str {
    match mode {
        Preallocate::Zeros => "zeros",
        Preallocate::Fallocate => "fallocate",
    }
}

/// A file of `SEGMENT_BYTES`, preallocated as the log would, fsynced.
fn raw_file(dir: &Path, mode: Preallocate) -> File {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dir.join("raw"))
        .expect("create raw file");
    match mode {
        Preallocate::Zeros => {
            let zeros = vec![0u8; 1 << 20];
            for i in 0..SEGMENT_BYTES / (1 << 20) {
                file.write_all_at(&zeros, i << 20).expect("write zeros");
            }
        }
        Preallocate::Fallocate => allocate(&file).expect("fallocate raw file"),
    }
    file.sync_all().expect("fsync raw file");
    file
}

/// `fallocate(2)` of the whole file, as the log's `Preallocate::Fallocate`.
fn allocate(file: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate reads only its integer arguments; `file` is open.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, SEGMENT_BYTES as libc::off_t) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn persist(c: &mut Criterion) {
    let mut group = c.benchmark_group("persist");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    for mode in [Preallocate::Zeros, Preallocate::Fallocate] {
        for votes in GROUPS {
            group.throughput(Throughput::Bytes((votes * VOTE_FRAME_BYTES) as u64));

            // The floor: the same bytes, one pwrite, one fdatasync, into a
            // preallocated file, wrapping around at its end so it never grows.
            let dir = scratch();
            let file = raw_file(dir.path(), mode);
            let bytes = vec![0x5au8; votes * VOTE_FRAME_BYTES];
            let mut at = 0u64;
            group.bench_function(
                BenchmarkId::new(format!("raw_fdatasync_{}", mode_name(mode)), votes),
                |b| {
                    b.iter(|| {
                        if at + bytes.len() as u64 > SEGMENT_BYTES {
                            at = 0;
                        }
                        file.write_all_at(black_box(&bytes), at).expect("pwrite");
                        file.sync_data().expect("fdatasync");
                        at += bytes.len() as u64;
                    })
                },
            );
            drop(file);
            drop(dir);

            // The log: one commit of `votes` records. Rotation (creating and
            // preallocating a segment) happens inside commits and is
            // measured; purging old segments, to bound disk use, is not.
            let dir = scratch();
            let options = Options {
                segment_bytes: SEGMENT_BYTES,
                preallocate: mode,
            };
            let (mut wal, _) = Wal::open(&dir.path().join("log"), options).expect("open log");
            let mut slot = 0u64;
            let mut records: Vec<Record> = (0..votes)
                .map(|_| Record {
                    index: 0,
                    payload: vec![0xa5; VOTE_BYTES],
                })
                .collect();
            group.bench_function(
                BenchmarkId::new(format!("wal_commit_{}", mode_name(mode)), votes),
                |b| {
                    b.iter_custom(|iters| {
                        let mut spent = Duration::ZERO;
                        for _ in 0..iters {
                            for r in records.iter_mut() {
                                slot += 1;
                                r.index = slot;
                            }
                            let start = Instant::now();
                            wal.commit(black_box(&records)).expect("commit");
                            spent += start.elapsed();
                            if wal.segment_count() > 2 {
                                wal.purge_through(slot).expect("purge");
                            }
                        }
                        spent
                    })
                },
            );
        }
    }
    group.finish();
}

/// The whole path a replica takes: [`Storage::persist`] of real votes
/// (encoding, the log's framing, one commit), next to a raw `pwrite` +
/// `fdatasync` of as many bytes as the log writes for them.
fn storage_persist(c: &mut Criterion) {
    let mut group = c.benchmark_group("storage_persist");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    for votes in GROUPS {
        let dir = scratch();
        let (storage, _) = Storage::open(&dir.path().join("data"), 8 << 20).expect("open storage");
        let ballot = Ballot::new(1, 1);
        // One command of about VOTE_BYTES per vote, as a small batch would be.
        let value = Value::Batch(vec![Bytes::from(vec![0x61u8; VOTE_BYTES - 24])]);
        let mut slot = 0u64;
        let mut next = || {
            let entries = (0..votes)
                .map(|_| {
                    slot += 1;
                    Accepted {
                        slot,
                        ballot,
                        value: value.clone(),
                    }
                })
                .collect();
            Persist {
                membership: None,
                promised: None,
                entries,
            }
        };
        let before = storage.bytes_written();
        storage.persist(&next()).expect("persist");
        let payload = (storage.bytes_written() - before) as usize / votes;
        let frame = (16 + payload).next_multiple_of(8);
        group.throughput(Throughput::Bytes((votes * frame) as u64));

        let raw_dir = scratch();
        let file = raw_file(raw_dir.path(), Preallocate::Zeros);
        let bytes = vec![0x5au8; votes * frame];
        let mut at = 0u64;
        group.bench_function(BenchmarkId::new("raw_fdatasync", votes), |b| {
            b.iter(|| {
                if at + bytes.len() as u64 > SEGMENT_BYTES {
                    at = 0;
                }
                file.write_all_at(black_box(&bytes), at).expect("pwrite");
                file.sync_data().expect("fdatasync");
                at += bytes.len() as u64;
            })
        });
        group.bench_function(BenchmarkId::new("storage_persist", votes), |b| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    let p = next();
                    let start = Instant::now();
                    storage.persist(black_box(&p)).expect("persist");
                    spent += start.elapsed();
                }
                spent
            })
        });
    }
    group.finish();
}

criterion_group!(benches, persist, storage_persist);
criterion_main!(benches);
