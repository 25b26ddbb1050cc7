//! Tests of damage detection, snapshot reading and snapshot install, on
//! real files.

use super::state_machine::StateMachine;
use super::state_machine::{APPLIED, Digest, SEAL_FILE, SLED_DATA_FILE, TAG_KV, entry_hash};
use super::tests::TempDir;
use super::*;
use crate::kv::{Command, Op};
use bytes::Bytes;
use std::sync::Arc;
use std::sync::atomic::Ordering;

const CACHE: u64 = 8 << 20;

fn open(dir: &Path) -> Storage {
    Storage::open(dir, CACHE).unwrap().0
}

fn cmd(client_id: u64, sequence: u64, key: &str, op: Op) -> Bytes {
    Command {
        proposal_id: 1,
        client_id,
        sequence,
        key: key.to_owned(),
        op,
    }
    .encode()
}

/// Keys and sessions, as stored.
type State = (BTreeMap<String, i32>, BTreeMap<u64, Vec<u8>>);

/// The whole state machine, read directly.
fn full_state(s: &Storage) -> State {
    let sm = s.state.current();
    let sessions = sm
        .sessions
        .iter()
        .map(|item| {
            let (k, v) = item.unwrap();
            (
                u64::from_be_bytes(k.as_ref().try_into().unwrap()),
                v.to_vec(),
            )
        })
        .collect();
    (s.entries().unwrap(), sessions)
}

/// Everything a reader yields, checking that no key comes twice.
fn read_all(r: SnapshotReader) -> State {
    let mut out = State::default();
    for chunk in r {
        let chunk = chunk.unwrap();
        for (k, v) in chunk.kv {
            assert!(out.0.insert(k.clone(), v).is_none(), "key {k:?} twice");
        }
        for (id, bytes) in chunk.sessions {
            assert!(out.1.insert(id, bytes).is_none(), "session {id} twice");
        }
    }
    out
}

/// The ids of the sessions in `s`; if it has none, 7 sessions opened in
/// the slot after the applied index.
fn sessions(s: &Storage) -> Vec<u64> {
    let ids: Vec<u64> = full_state(s).1.into_keys().collect();
    if !ids.is_empty() {
        return ids;
    }
    let slot = s.applied().unwrap() + 1;
    let open = (0..7).map(|_| cmd(0, 0, "", Op::OpenSession)).collect();
    s.apply(&[(slot, Value::Batch(open))])
        .unwrap()
        .into_iter()
        .map(|(_, reply)| match reply {
            kv::Reply::SessionOpened { client_id } => client_id,
            other => panic!("no session opened: {other:?}"),
        })
        .collect()
}

/// Applies `keys` upserts of `key{i}`, 10 per slot after the applied
/// index, from the `i % 7`th of 7 sessions (opened first, if there are
/// none) with sequence i + 1 (on a second call, the clients' writes are
/// stale: slots only).
fn fill(s: &Storage, keys: usize) {
    let clients = sessions(s);
    let mut slot = s.applied().unwrap();
    for start in (0..keys).step_by(10) {
        slot += 1;
        let batch = (start..(start + 10).min(keys))
            .map(|i| {
                let (client, sequence) = (clients[i % clients.len()], i as u64 + 1);
                cmd(
                    client,
                    sequence,
                    &format!("key{i:05}"),
                    Op::Upsert(i as i32),
                )
            })
            .collect();
        s.apply(&[(slot, Value::Batch(batch))]).unwrap();
    }
}

// ---------------------------------------------------------------------
// Part 1: the digest and damage detection.

#[test]
fn entry_hash_is_fixed() {
    // Stored on disk: these numbers must never change.
    assert_eq!(entry_hash(TAG_KV, b"", b""), 0xebdb_2a4c_2957_fac0);
    assert_eq!(
        entry_hash(TAG_KV, b"a", &1i32.to_le_bytes()),
        0x590a_b78e_622c_a7a3
    );
    let mut d = Digest::default();
    d.add(1, b"x", b"1");
    d.add(2, b"y", b"2");
    let mut e = Digest::default();
    e.add(2, b"y", b"2");
    e.add(1, b"x", b"1");
    assert_eq!(d, e, "order independent");
    e.remove(1, b"x", b"1");
    assert_eq!(e.entries, 1);
    assert_ne!(e, d);
}

#[test]
fn the_digest_follows_every_change_and_survives_reopen() {
    let dir = TempDir::new("digest");
    let s = open(&dir.0);
    fill(&s, 100);
    let slot = s.applied().unwrap() + 1;
    s.apply(&[(
        slot,
        Value::Batch(vec![
            cmd(0, 0, "key00001", Op::Remove),
            cmd(0, 0, "key00002", Op::Update(-2)),
            cmd(0, 0, "new", Op::Insert(5)),
            cmd(0, 0, "new", Op::Remove),
            cmd(0, 0, "new2", Op::Insert(6)),
        ]),
    )])
    .unwrap();
    let (kv, sessions) = full_state(&s);
    let mut expected = Digest::default();
    for (k, v) in &kv {
        expected.add(TAG_KV, k.as_bytes(), &v.to_le_bytes());
    }
    for (id, bytes) in &sessions {
        expected.add(2, &id.to_be_bytes(), bytes);
    }
    assert_eq!(s.state.current().digest().unwrap(), expected);
    assert_eq!(expected.entries as usize, kv.len() + sessions.len());
    drop(s);
    // Reopened without a flush (the seal says 0): the digest is checked.
    let s = open(&dir.0);
    assert_eq!(full_state(&s), (kv, sessions));
}

/// A data directory with 2,000 keys applied and flushed (a clean
/// shutdown), and its state.
fn damaged_setup(name: &str) -> (TempDir, State) {
    let dir = TempDir::new(name);
    let s = open(&dir.0);
    fill(&s, 2000);
    s.flush().unwrap();
    let state = full_state(&s);
    assert_eq!(state.0.len(), 2000);
    drop(s);
    (dir, state)
}

fn db_path(dir: &TempDir) -> PathBuf {
    dir.0.join(STATE_DIR).join(SLED_DATA_FILE)
}

/// The state machine's own verdict on a damaged directory: an error naming
/// the state directory, or `None` if it opens with the whole state (damage
/// sled never reads). Then, through `Storage::open`, the replica must start
/// as a non-voting learner with an empty state and the damaged one moved
/// aside, or, undamaged, with the whole state.
fn reopen_damaged(dir: &TempDir, state: &State) -> Option<String> {
    let state_dir = dir.0.join(STATE_DIR);
    let verdict = std::panic::catch_unwind(|| StateMachine::open(&state_dir, CACHE).map(drop));
    let err = match verdict {
        Err(_) => panic!("StateMachine::open panicked"),
        Ok(Err(e)) => {
            let msg = e.to_string();
            assert!(msg.contains(&state_dir.display().to_string()), "{msg}");
            Some(msg)
        }
        Ok(Ok(())) => None,
    };
    let (s, durable) = Storage::open(&dir.0, CACHE).expect("a damaged state is not fatal");
    if err.is_some() {
        assert_eq!(durable.membership, Some(crate::paxos::Membership::Learner));
        assert_eq!((durable.applied, durable.votes.len()), (0, 0));
        assert!(
            s.entries().unwrap().is_empty(),
            "a damaged state is never served"
        );
        assert!(dir.0.join("state.damaged").is_dir(), "kept aside");
        // It stays a learner across a restart, until a snapshot is installed.
        drop(s);
        let (_, again) = Storage::open(&dir.0, CACHE).unwrap();
        assert_eq!(again.membership, Some(crate::paxos::Membership::Learner));
    } else {
        assert_eq!(&full_state(&s), state, "opened with a different state");
    }
    err
}

/// The state machine's error on opening the directory's state.
fn state_error(dir: &TempDir) -> String {
    StateMachine::open(&dir.0.join(STATE_DIR), CACHE)
        .err()
        .map(|e| e.to_string())
        .expect("must refuse")
        .to_string()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn flip(path: &Path, at: usize, len: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    for b in &mut bytes[at..at + len] {
        *b ^= 0xa5;
    }
    std::fs::write(path, &bytes).unwrap();
}

#[test]
fn flipped_bytes_in_the_middle_of_db_are_damage() {
    for len in [64, 1] {
        let (dir, state) = damaged_setup("flip");
        let size = std::fs::metadata(db_path(&dir)).unwrap().len() as usize;
        flip(&db_path(&dir), size / 2, len);
        let err = reopen_damaged(&dir, &state);
        println!("{len} byte(s) flipped at {} of {size}: {err:?}", size / 2);
        assert!(err.is_some(), "{len} flipped bytes went unnoticed");
    }
}

#[test]
fn flipped_bytes_anywhere_in_db_never_open_a_different_state() {
    let (dir, state) = damaged_setup("flip-scan");
    let db = db_path(&dir);
    let pristine = std::fs::read(&db).unwrap();
    // Opening a damaged directory changes it (the state moved aside, the
    // log told it is a learner): each flip starts from a copy.
    let copy = TempDir::new("flip-scan-copy");
    copy_dir(&dir.0, &copy.0);
    let (mut caught, mut unnoticed) = (0, Vec::new());
    for at in (0..pristine.len()).step_by(pristine.len() / 40 + 1) {
        std::fs::remove_dir_all(&dir.0).unwrap();
        copy_dir(&copy.0, &dir.0);
        flip(&db, at, 1);
        match reopen_damaged(&dir, &state) {
            Some(_) => caught += 1,
            None => unnoticed.push(at),
        }
    }
    println!(
        "db of {} bytes: {caught} flips caught, unnoticed (whole state intact) at {unnoticed:?}",
        pristine.len()
    );
}

#[test]
fn a_truncated_or_emptied_db_is_damage() {
    for keep in [Some(2), None] {
        let (dir, state) = damaged_setup("truncate");
        let db = db_path(&dir);
        let size = std::fs::metadata(&db).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
        f.set_len(keep.map_or(0, |k| size / k)).unwrap();
        drop(f);
        let err = reopen_damaged(&dir, &state);
        println!(
            "db cut from {size} to {:?}: {err:?}",
            keep.map(|k| size / k)
        );
        assert!(err.is_some());
    }
}

#[test]
fn a_key_deleted_behind_the_digest_is_damage() {
    let (dir, state) = damaged_setup("delete");
    {
        let db = sled::Config::new()
            .path(dir.0.join(STATE_DIR))
            .open()
            .unwrap();
        db.open_tree("kv").unwrap().remove("key01000").unwrap();
        db.flush().unwrap();
    }
    let err = reopen_damaged(&dir, &state).expect("must refuse");
    println!("{err}");
    assert!(
        err.contains("digest mismatch: 2,006 entries found, 2,007 recorded"),
        "{err}"
    );
}

#[test]
fn a_changed_value_or_a_lost_seal_is_damage() {
    let (dir, state) = damaged_setup("changed");
    {
        let db = sled::Config::new()
            .path(dir.0.join(STATE_DIR))
            .open()
            .unwrap();
        db.open_tree("kv")
            .unwrap()
            .insert("key01000", &7i32.to_le_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let err = reopen_damaged(&dir, &state).expect("must refuse");
    assert!(
        err.contains("digest mismatch: 2,007 entries as recorded"),
        "{err}"
    );

    let (dir, state) = damaged_setup("seal");
    std::fs::remove_file(dir.0.join(STATE_DIR).join(SEAL_FILE)).unwrap();
    let err = reopen_damaged(&dir, &state).expect("must refuse");
    assert!(err.contains("seal is missing"), "{err}");
}

#[test]
fn a_state_older_than_its_seal_is_damage() {
    // What sled does with a damaged tail: recover an older, consistent
    // state. Here, an older state put back behind a newer seal.
    let (dir, _) = damaged_setup("older");
    let seal = dir.0.join(STATE_DIR).join(SEAL_FILE);
    let newer = std::fs::read(&seal).unwrap();
    {
        let s = open(&dir.0);
        fill(&s, 100);
        s.flush().unwrap();
    }
    std::fs::write(&seal, &newer).unwrap();
    // Now the seal is older than sled: fine.
    drop(open(&dir.0));
    // And the seal newer than sled: the state lost what was flushed.
    let mut newer_seal = newer.clone();
    newer_seal[..8].copy_from_slice(&1000u64.to_be_bytes());
    let body = newer_seal[..24].to_vec();
    newer_seal[24..].copy_from_slice(&crc32c::crc32c(&body).to_be_bytes());
    std::fs::write(&seal, &newer_seal).unwrap();
    let err = state_error(&dir);
    assert!(
        err.contains("sled lost data it had written to disk"),
        "{err}"
    );
}

/// Opening a state with a million keys, as a restart does: run with
/// `cargo test --lib storage::snapshot_tests::open_scan_of_a_million_keys
/// -- --ignored --nocapture` (the test profile is optimised).
#[test]
#[ignore = "a measurement, about a minute"]
fn open_scan_of_a_million_keys() {
    let dir = TempDir::new("million");
    let s = Storage::open(&dir.0, 64 << 20).unwrap().0;
    let mut slot = 0;
    for start in (0..1_000_000).step_by(1000) {
        slot += 1;
        let batch = (start..start + 1000)
            .map(|i| cmd(0, 0, &format!("user:{i:09}"), Op::Upsert(i)))
            .collect();
        s.apply(&[(slot, Value::Batch(batch))]).unwrap();
    }
    s.flush().unwrap();
    drop(s);
    let size = std::fs::metadata(dir.0.join(STATE_DIR).join(SLED_DATA_FILE))
        .unwrap()
        .len();
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let s = Storage::open(&dir.0, 64 << 20).unwrap().0;
        let open = started.elapsed();
        let sm = s.state.current();
        let scan = std::time::Instant::now();
        sm.verify().unwrap();
        println!(
            "1,000,000 keys, db {} MiB: Storage::open {open:?} (of which the verify scan alone, warm: {:?})",
            size >> 20,
            scan.elapsed()
        );
    }
}

// ---------------------------------------------------------------------
// Part 2: snapshot readers.

/// A small deterministic generator (xorshift64*), so a failing seed
/// replays exactly.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// A random batch for `slot`: upserts, removes, inserts of new keys,
/// updates, and session changes (writes through `clients`' sessions), over
/// a key space a little larger than what [`fill`] made.
fn random_batch(rng: &mut Rng, slot: Slot, clients: &[u64]) -> Value {
    let n = rng.below(6) + 1;
    Value::Batch(
        (0..n)
            .map(|_| {
                let key = format!("key{:05}", rng.below(260));
                let op = match rng.below(4) {
                    0 => Op::Remove,
                    1 => Op::Insert(rng.below(1000) as i32),
                    2 => Op::Update(rng.below(1000) as i32),
                    _ => Op::Upsert(rng.below(1000) as i32),
                };
                match rng.below(12) as usize {
                    0 => cmd(0, 0, &key, op),
                    c => {
                        let client = clients[(c - 1) % clients.len()];
                        cmd(client, slot * 10 + rng.below(10), &key, op)
                    }
                }
            })
            .collect(),
    )
}

#[test]
fn a_reader_yields_the_state_at_its_start_while_apply_goes_on() {
    let dir = TempDir::new("reader");
    let s = open(&dir.0);
    fill(&s, 200);
    let clients = sessions(&s);
    for seed in 1..=150u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let at_start = full_state(&s);
        let applied = s.applied().unwrap();
        let mut reader = s
            .snapshot_reader()
            .unwrap()
            .with_chunk_bytes(1 + rng.below(64) as usize);
        assert_eq!(reader.meta().applied, applied);
        assert_eq!(reader.meta().digest, s.state.current().digest().unwrap());
        let mut got = State::default();
        let mut slot = applied;
        // Between chunks, some batches on this very thread: were apply to
        // wait for the reader, this would deadlock.
        loop {
            for _ in 0..rng.below(3) {
                slot += 1;
                s.apply(&[(slot, random_batch(&mut rng, slot, &clients))])
                    .unwrap();
            }
            let Some(chunk) = reader.next_chunk().unwrap() else {
                break;
            };
            for (k, v) in chunk.kv {
                assert!(got.0.insert(k, v).is_none());
            }
            for (id, b) in chunk.sessions {
                assert!(got.1.insert(id, b).is_none());
            }
        }
        assert_eq!(got, at_start, "seed {seed}");
        assert!(
            slot > applied,
            "seed {seed}: nothing applied during the read"
        );
    }
}

#[test]
fn readers_run_concurrently_with_an_applying_thread() {
    let dir = TempDir::new("reader-threads");
    let s = Arc::new(open(&dir.0));
    fill(&s, 200);
    let clients = sessions(&s);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (s, stop) = (Arc::clone(&s), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut rng = Rng(42);
            let mut slot = s.applied().unwrap();
            while !stop.load(Ordering::Relaxed) {
                slot += 1;
                s.apply(&[(slot, random_batch(&mut rng, slot, &clients))])
                    .unwrap();
            }
            slot
        })
    };
    let mut checked = 0;
    while checked < 100 {
        // The state at A, copied with no apply between it and the
        // reader's start.
        let sm = Arc::clone(&s.state.current());
        let (reader, copy) = SnapshotReader::start_with(sm, || full_state(&s)).unwrap();
        let got = read_all(reader.with_chunk_bytes(100));
        assert_eq!(got, copy);
        checked += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let slots = writer.join().unwrap();
    assert!(
        slots > 100,
        "the writer ran during the reads: {slots} slots"
    );
}

#[test]
fn several_readers_at_different_indexes() {
    let dir = TempDir::new("readers");
    let s = open(&dir.0);
    fill(&s, 150);
    let clients = sessions(&s);
    let mut rng = Rng(7);
    let mut readers = Vec::new();
    let mut slot = s.applied().unwrap();
    for _ in 0..4 {
        readers.push((
            full_state(&s),
            s.snapshot_reader().unwrap().with_chunk_bytes(40),
        ));
        for _ in 0..5 {
            slot += 1;
            s.apply(&[(slot, random_batch(&mut rng, slot, &clients))])
                .unwrap();
        }
    }
    let mut got = vec![State::default(); readers.len()];
    let mut live = readers.len();
    while live > 0 {
        live = 0;
        for (i, (_, r)) in readers.iter_mut().enumerate() {
            if let Some(chunk) = r.next_chunk().unwrap() {
                live += 1;
                got[i].0.extend(chunk.kv);
                got[i].1.extend(chunk.sessions);
            }
            slot += 1;
            s.apply(&[(slot, random_batch(&mut rng, slot, &clients))])
                .unwrap();
        }
    }
    for ((expected, _), got) in readers.iter().zip(&got) {
        assert_eq!(got, expected);
    }
}

// ---------------------------------------------------------------------
// Part 3: install.

/// A source replica with some state, and its snapshot.
fn source(dir: &TempDir, keys: usize) -> (Storage, State, SnapshotMeta, Vec<SnapshotChunk>) {
    let s = open(&dir.0);
    fill(&s, keys);
    let state = full_state(&s);
    let reader = s.snapshot_reader().unwrap().with_chunk_bytes(500);
    let meta = reader.meta();
    let chunks = reader.collect::<Result<Vec<_>, _>>().unwrap();
    (s, state, meta, chunks)
}

#[test]
fn an_install_replaces_the_state_and_apply_continues_after_it() {
    let (src_dir, dst_dir) = (TempDir::new("src"), TempDir::new("dst"));
    let (_src, state, meta, chunks) = source(&src_dir, 500);
    let dst = open(&dst_dir.0);
    fill(&dst, 30);
    let old = full_state(&dst);
    let mut install = dst.begin_install(meta.applied).unwrap();
    assert!(matches!(
        dst.begin_install(meta.applied),
        Err(StorageError::InstallBusy)
    ));
    for (i, chunk) in chunks.iter().enumerate() {
        install.add_chunk(chunk).unwrap();
        // The old state keeps serving, writes included.
        if i == 1 {
            let slot = dst.applied().unwrap() + 1;
            dst.apply(&[(slot, Value::Batch(vec![cmd(0, 0, "during", Op::Insert(1))]))])
                .unwrap();
            assert_eq!(dst.get("during").unwrap(), Some(1));
        }
    }
    // A reader of the old state, started before the switch, finishes it.
    let old_reader = dst.snapshot_reader().unwrap().with_chunk_bytes(100);
    let mut old = old;
    old.0.insert("during".into(), 1);
    dst.finish_install(install, meta).unwrap();
    assert_eq!(read_all(old_reader), old);
    assert_eq!(full_state(&dst), state);
    assert_eq!(dst.applied().unwrap(), meta.applied);
    assert_eq!(dst.state.current().digest().unwrap(), meta.digest);
    // Slots up to A are skipped; A + 1 applies.
    let a = meta.applied;
    dst.apply(&[(a, Value::Batch(vec![cmd(0, 0, "x", Op::Insert(1))]))])
        .unwrap();
    assert_eq!(dst.get("x").unwrap(), None);
    dst.apply(&[(a + 1, Value::Batch(vec![cmd(0, 0, "x", Op::Insert(2))]))])
        .unwrap();
    assert_eq!(dst.get("x").unwrap(), Some(2));
    let after = full_state(&dst);
    drop(dst);
    let (dst, durable) = Storage::open(&dst_dir.0, CACHE).unwrap();
    assert_eq!(durable.applied, a + 1);
    assert_eq!(full_state(&dst), after);
    let names: Vec<_> = std::fs::read_dir(&dst_dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.starts_with("state.")), "{names:?}");
}

#[test]
fn an_install_that_does_not_add_up_changes_nothing() {
    let (src_dir, dst_dir) = (TempDir::new("src-bad"), TempDir::new("dst-bad"));
    let (_src, _, meta, chunks) = source(&src_dir, 300);
    assert!(chunks.len() > 2);
    let dst = open(&dst_dir.0);
    fill(&dst, 20);
    let old = full_state(&dst);
    let old_applied = dst.applied().unwrap();
    let mut install = dst.begin_install(meta.applied).unwrap();
    for chunk in &chunks[1..] {
        install.add_chunk(chunk).unwrap();
    }
    let err = dst.finish_install(install, meta).unwrap_err();
    assert!(
        matches!(err, StorageError::SnapshotMismatch { .. }),
        "{err}"
    );
    println!("{err}");
    assert_eq!(full_state(&dst), old);
    assert_eq!(dst.applied().unwrap(), old_applied);
    assert!(!dst_dir.0.join("state.install").exists());
    // A snapshot behind the state is refused.
    let err = dst.begin_install(1).err().expect("behind");
    assert!(matches!(err, StorageError::SnapshotBehind { .. }), "{err}");
}

#[test]
fn an_abandoned_install_leaves_nothing_that_matters() {
    let (src_dir, dst_dir) = (TempDir::new("src-ab"), TempDir::new("dst-ab"));
    let (_src, state, meta, chunks) = source(&src_dir, 200);
    let dst = open(&dst_dir.0);
    let mut install = dst.begin_install(meta.applied).unwrap();
    install.add_chunk(&chunks[0]).unwrap();
    drop(install);
    assert!(dst_dir.0.join("state.install").exists());
    // The next begin cleans up and works.
    let mut install = dst.begin_install(meta.applied).unwrap();
    install.add_chunk(&chunks[0]).unwrap();
    drop(install);
    drop(dst);
    let (dst, durable) = Storage::open(&dst_dir.0, CACHE).unwrap();
    assert!(!dst_dir.0.join("state.install").exists(), "removed on open");
    assert_eq!(durable.applied, 0);
    assert_eq!(full_state(&dst), State::default());
    let mut install = dst.begin_install(meta.applied).unwrap();
    for c in &chunks {
        install.add_chunk(c).unwrap();
    }
    dst.finish_install(install, meta).unwrap();
    assert_eq!(full_state(&dst), state);
}

#[test]
fn a_crash_at_any_step_of_the_switch_opens_the_old_or_the_new_state() {
    let src_dir = TempDir::new("src-crash");
    let (_src, new_state, meta, chunks) = source(&src_dir, 400);
    // A crash while the install is built: see the test below.
    for stop in 1..=4u8 {
        let dst_dir = TempDir::new("dst-crash");
        let dst = open(&dst_dir.0);
        fill(&dst, 40);
        dst.flush().unwrap();
        let mut install = dst.begin_install(meta.applied).unwrap();
        for c in &chunks {
            install.add_chunk(c).unwrap();
        }
        dst.state.finish_install(install, meta, Some(stop)).unwrap();
        // Dropped without going on: what a crash after the step leaves.
        drop(dst);
        let (dst, durable) = Storage::open(&dst_dir.0, CACHE).unwrap();
        // From step 1 on, `state.new` is complete: rolled forward.
        assert_eq!(full_state(&dst), new_state, "stop after step {stop}");
        assert_eq!(durable.applied, meta.applied, "stop after step {stop}");
        for leftover in ["state.install", "state.new", "state.old"] {
            assert!(
                !dst_dir.0.join(leftover).exists(),
                "stop {stop}: {leftover}"
            );
        }
    }
}

#[test]
fn a_crash_while_an_install_is_built_opens_the_old_state() {
    let (src_dir, dst_dir) = (TempDir::new("src-c0"), TempDir::new("dst-c0"));
    let (_src, _, meta, chunks) = source(&src_dir, 200);
    let old_state;
    {
        let dst = open(&dst_dir.0);
        fill(&dst, 40);
        old_state = full_state(&dst);
        let mut install = dst.begin_install(meta.applied).unwrap();
        install.add_chunk(&chunks[0]).unwrap();
        // A finished, durable install dir that was never renamed: still
        // only `state.install`, so not complete by the rules.
        std::mem::forget(install);
    }
    let dst = open(&dst_dir.0);
    assert_eq!(full_state(&dst), old_state);
    assert!(!dst_dir.0.join("state.install").exists());
}

#[test]
fn storage_stays_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Storage>();
    fn send<T: Send>() {}
    send::<SnapshotReader>();
    send::<SnapshotInstall>();
    let _ = APPLIED;
}
