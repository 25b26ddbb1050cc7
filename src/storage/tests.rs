//! Tests of the storage as a whole: the log and the state machine behind
//! one facade.

use super::*;
use crate::kv::{Command, Op, Reply};
use bytes::Bytes;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::state_machine::APPLIED;
use crate::pb;
use crate::wire;
use prost::Message as _;

const CACHE: u64 = 8 << 20;

/// A fresh directory under the system temp dir, removed on drop.
pub(super) struct TempDir(pub(super) PathBuf);

impl TempDir {
    pub(super) fn new(name: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("paxoskv-storage-{name}-{}-{n}", std::process::id()));
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
    Storage::open(&dir.0, CACHE).unwrap().0
}

fn load(dir: &TempDir) -> Durable {
    Storage::open(&dir.0, CACHE).unwrap().1
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
    let (_s, durable) = Storage::open(&dir.0, CACHE).unwrap();
    assert_eq!(
        durable,
        Durable {
            promised: Ballot::ZERO,
            votes: vec![],
            applied: 0,
            snapshot: 0,
            compacted: 0,
            membership: None,
        }
    );
    assert!(
        dir.0.join(STATE_DIR).join("db").is_file(),
        "sled keeps the state machine in `state/db`"
    );
    assert!(dir.0.join(LOG_DIR).is_dir(), "the log lives in `log/`");
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
    let d = load(&dir);
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
    drop(s);
    let loaded: Vec<Slot> = load(&dir).votes.iter().map(|v| v.slot).collect();
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
    assert_eq!(s.bytes_written(), 13, "a kind byte and the ballot");
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
fn large_keys_go_to_blob_files_which_flush_syncs() {
    let dir = TempDir::new("blob");
    let s = open(&dir);
    // Over a quarter of sled's 512 KiB segment: sled writes it to
    // `blobs/<lsn>`, a file it never fsyncs itself.
    let key = "k".repeat(300 * 1024);
    s.apply(&[(1, batch(vec![cmd(1, 0, 0, &key, Op::Upsert(7))]))])
        .unwrap();
    s.flush().unwrap();
    let blobs: Vec<PathBuf> = std::fs::read_dir(dir.0.join(STATE_DIR).join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(!blobs.is_empty(), "sled stored the large key as a blob");
    let sm = s.state.current();
    let synced = sm.synced.lock().unwrap();
    for blob in &blobs {
        assert!(synced.contains(blob), "{} not synced", blob.display());
    }
    drop(synced);
    drop(sm);
    drop(s);
    assert_eq!(open(&dir).get(&key).unwrap(), Some(7));
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
    drop(s);
    assert_eq!(load(&dir).applied, 4);
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
    let client = kv::client_id_at(1, 0).unwrap();
    let write = cmd(21, client, 1, "k", Op::Upsert(10));
    {
        let s = open(&dir);
        let opened = s
            .apply(&[(1, batch(vec![cmd(20, 0, 0, "", Op::OpenSession)]))])
            .unwrap();
        assert_eq!(
            opened,
            vec![(20, Reply::SessionOpened { client_id: client })]
        );
        assert_eq!(
            s.apply(&[(2, batch(vec![write.clone()]))]).unwrap(),
            vec![(21, Reply::Inserted)]
        );
        // Someone else changes the key after the original write.
        s.apply(&[(3, batch(vec![cmd(22, 0, 0, "k", Op::Update(20))]))])
            .unwrap();
    }
    let s = open(&dir);
    // The retry, chosen again in a later slot, proposed anew: first
    // reply, not applied again (which would answer Updated and set 10).
    let retry = cmd(23, client, 1, "k", Op::Upsert(10));
    assert_eq!(
        s.apply(&[(4, batch(vec![retry]))]).unwrap(),
        vec![(23, Reply::Inserted)]
    );
    assert_eq!(s.get("k").unwrap(), Some(20));
    assert_eq!(s.applied().unwrap(), 4);
    assert_eq!(s.entries().unwrap(), BTreeMap::from([("k".to_owned(), 20)]));
}

/// The state machine in sled and [`kv::MemState`] over one log, with
/// limits small enough that sessions expire and are evicted all the time,
/// applied a few slots per call (one transaction, in which a session may be
/// opened, used and evicted): the same replies, the same sessions byte for
/// byte; and the same again after a reopen, which rebuilds the index of
/// sessions by use from disk.
#[test]
fn sessions_expire_and_are_evicted_at_the_same_slots_as_in_memory_across_reopens() {
    use kv::KvState;
    let dir = TempDir::new("sessions");
    let limits = kv::SessionLimits {
        max_sessions: 4,
        idle_slots: 6,
    };
    let mut memory = kv::MemState::new();
    let mut issued: Vec<u64> = Vec::new();
    let mut sequence = 0;
    let mut expired = 0;
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut slot = 0;
    for round in 0..6 {
        let mut s = open(&dir);
        s.set_session_limits(limits);
        let mut pending = Vec::new();
        let mut expected_replies = Vec::new();
        for i in 0..40 {
            slot += 1;
            let mut commands = Vec::new();
            let many = if next(8) == 0 { 7 } else { 4 };
            for _ in 0..next(many) {
                sequence += 1;
                let command = match next(5) {
                    0 => Command {
                        proposal_id: sequence,
                        client_id: 0,
                        sequence: 0,
                        key: String::new(),
                        op: Op::OpenSession,
                    },
                    1 if !issued.is_empty() => Command {
                        proposal_id: sequence,
                        client_id: 0,
                        sequence: 0,
                        key: format!("k{}", next(5)),
                        op: Op::Upsert(sequence as i32),
                    },
                    _ if !issued.is_empty() => Command {
                        proposal_id: sequence,
                        client_id: issued[next(issued.len() as u64) as usize],
                        // Sometimes a retry (an older sequence).
                        sequence: sequence - next(2),
                        key: format!("k{}", next(5)),
                        op: Op::Upsert(sequence as i32),
                    },
                    _ => continue,
                };
                commands.push(command);
            }
            // Some slots are no-ops: sessions expire in them too.
            let value = if commands.is_empty() && next(2) == 0 {
                Value::Noop
            } else {
                batch(commands.iter().map(Command::encode).collect())
            };
            pending.push((slot, value));
            let expected = kv::apply_slot(&mut memory, &limits, slot, &commands);
            for (command, reply) in commands.iter().zip(expected) {
                expected_replies.push((command.proposal_id, reply));
                match reply {
                    Reply::SessionOpened { client_id } => issued.push(client_id),
                    Reply::SessionExpired => expired += 1,
                    _ => {}
                }
            }
            if i == 39 || next(4) == 0 {
                let replies = s.apply(&pending).unwrap();
                assert_eq!(replies, expected_replies, "round {round}, slot {slot}");
                pending.clear();
                expected_replies.clear();
            }
        }
        // Every session, byte for byte.
        let sm = s.state.current();
        let on_disk: BTreeMap<u64, Vec<u8>> = sm
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
        let in_memory: BTreeMap<u64, Vec<u8>> = issued
            .iter()
            .filter_map(|&id| memory.session(id).map(|s| (id, s.to_bytes())))
            .collect();
        assert_eq!(on_disk, in_memory, "round {round}");
        assert!(on_disk.len() <= 4);
        let keys: BTreeMap<String, i32> = (0..5)
            .filter_map(|i| memory.get(&format!("k{i}")).map(|v| (format!("k{i}"), v)))
            .collect();
        assert_eq!(s.entries().unwrap(), keys);
    }
    assert!(issued.len() > 20, "{} sessions opened", issued.len());
    assert!(expired > 20, "{expired} writes found their session expired");
}

#[test]
fn second_open_in_this_process_is_in_use() {
    let dir = TempDir::new("inuse");
    let first = open(&dir);
    let err = Storage::open(&dir.0, CACHE).expect_err("second open must fail");
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
    assert_eq!(load(&dir).promised, Ballot::new(1, 1));
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
    let dir = PathBuf::from(std::env::var_os(CHILD_DIR).expect("run by second_process_is_in_use"));
    match Storage::open(&dir, CACHE) {
        Err(e @ StorageError::InUse(_)) => println!("CHILD: {e}"),
        Err(e) => panic!("expected InUse, got {e:?}"),
        Ok(_) => panic!("the second process opened a directory in use"),
    }
}

#[test]
fn a_damaged_log_record_with_records_after_it_is_refused_naming_the_file() {
    let dir = TempDir::new("corrupt-log");
    {
        let s = open(&dir);
        for slot in 1..=3 {
            s.persist(&Persist {
                membership: None,
                promised: None,
                entries: vec![vote(slot, Ballot::new(1, 1), Value::Noop)],
            })
            .unwrap();
        }
    }
    let segment = std::fs::read_dir(dir.0.join(LOG_DIR))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "wal"))
        .expect("a segment");
    let mut bytes = std::fs::read(&segment).unwrap();
    // Inside the first record's payload (32-byte segment header, 24-byte
    // frame header): later commits follow it, so this is not a torn write.
    bytes[32 + 24 + 2] ^= 0x40;
    std::fs::write(&segment, &bytes).unwrap();
    let err = Storage::open(&dir.0, CACHE).expect_err("must refuse");
    assert!(matches!(err, StorageError::Log(_)), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&segment.display().to_string()), "{msg}");
    assert!(msg.contains("refusing to start"), "{msg}");
}

#[test]
fn corrupt_meta_kv_and_sessions_are_reported() {
    let dir = TempDir::new("corrupt-other");
    let s = open(&dir);

    s.state.current().meta.insert(APPLIED, &[1][..]).unwrap();
    let err = s.applied().unwrap_err().to_string();
    assert!(err.contains("tree meta, key applied"), "{err}");
    assert!(s.apply(&[(1, Value::Noop)]).is_err());
    s.state.current().meta.remove(APPLIED).unwrap();

    // A stored value of the wrong width: get() and apply() both refuse,
    // and apply changes nothing.
    s.state.current().kv.insert("a", &[1, 2][..]).unwrap();
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
    s.state
        .current()
        .sessions
        .insert(9u64.to_be_bytes(), &[0u8; 3][..])
        .unwrap();
    let err = s
        .apply(&[(1, batch(vec![cmd(1, 9, 1, "b", Op::Upsert(3))]))])
        .unwrap_err();
    assert!(err.to_string().contains("tree sessions, client 9"), "{err}");
    assert_eq!(s.get("b").unwrap(), None);
    assert_eq!(s.applied().unwrap(), 0);
}

/// Writes a data directory the way paxoskv 0.1 did: one sled database at
/// its root, with the promise and votes in `meta` and `log`.
fn write_v1(dir: &Path, promised: Ballot, votes: &[Accepted], kv: &[(&str, i32)], applied: Slot) {
    let db = sled::Config::new().path(dir).open().unwrap();
    let meta = db.open_tree("meta").unwrap();
    meta.insert(b"promised", &encode_ballot(promised)[..])
        .unwrap();
    meta.insert(APPLIED, &applied.to_be_bytes()).unwrap();
    let log = db.open_tree("log").unwrap();
    for v in votes {
        log.insert(
            v.slot.to_be_bytes(),
            wire::accepted_to_pb(v).encode_to_vec(),
        )
        .unwrap();
    }
    let tree = db.open_tree("kv").unwrap();
    for (k, v) in kv {
        tree.insert(k.as_bytes(), &v.to_le_bytes()).unwrap();
    }
    db.flush().unwrap();
}

#[test]
fn a_v1_directory_is_migrated_and_its_old_files_removed() {
    let dir = TempDir::new("v1");
    let b = Ballot::new(4, 2);
    let votes = vec![
        vote(1, b, batch(vec![cmd(1, 0, 0, "a", Op::Upsert(1))])),
        vote(2, b, Value::Noop),
    ];
    write_v1(&dir.0, b, &votes, &[("a", 1), ("z", -5)], 1);
    let (s, durable) = Storage::open(&dir.0, CACHE).unwrap();
    assert_eq!(
        durable,
        Durable {
            promised: b,
            votes: votes.clone(),
            applied: 1,
            snapshot: 0,
            compacted: 0,
            membership: Some(Membership::Voter),
        }
    );
    assert_eq!(s.get("z").unwrap(), Some(-5));
    let mut names: Vec<String> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![LOG_DIR, STATE_DIR],
        "only the new layout is left"
    );
    drop(s);
    // And it stays migrated.
    assert_eq!(load(&dir).votes, votes);
}

#[test]
fn a_migration_cut_short_is_done_again_from_the_start() {
    let dir = TempDir::new("v1-again");
    let b = Ballot::new(3, 1);
    let votes = vec![vote(1, b, Value::Noop)];
    write_v1(&dir.0, b, &votes, &[("k", 9)], 0);
    // What a crash after step 1 of an earlier attempt leaves: a half-built
    // state machine (here, with a key the old one lacks) and a log.tmp.
    std::fs::create_dir_all(dir.0.join("state.tmp")).unwrap();
    std::fs::write(dir.0.join("state.tmp").join("junk"), b"x").unwrap();
    std::fs::create_dir_all(dir.0.join("log.tmp")).unwrap();
    let (s, durable) = Storage::open(&dir.0, CACHE).unwrap();
    assert_eq!((durable.promised, durable.votes), (b, votes));
    assert_eq!(s.entries().unwrap(), BTreeMap::from([("k".to_owned(), 9)]));
    assert!(!dir.0.join("state.tmp").exists() && !dir.0.join("log.tmp").exists());
}

#[test]
fn a_damaged_v1_vote_stops_the_migration_by_name_and_changes_nothing() {
    let dir = TempDir::new("v1-bad");
    write_v1(&dir.0, Ballot::new(1, 1), &[], &[], 0);
    {
        let db = sled::Config::new().path(&dir.0).open().unwrap();
        let bad = pb::AcceptedEntry {
            slot: 5,
            ballot: None,
            value: Some(wire::value_to_pb(&Value::Noop)),
        };
        db.open_tree("log")
            .unwrap()
            .insert(5u64.to_be_bytes(), bad.encode_to_vec())
            .unwrap();
        db.flush().unwrap();
    }
    let err = Storage::open(&dir.0, CACHE).expect_err("must refuse");
    let msg = err.to_string();
    assert!(
        msg.contains("0.1 database, tree log") && msg.contains("ballot"),
        "{msg}"
    );
    assert!(!dir.0.join(LOG_DIR).exists(), "no half-migrated directory");
    assert!(dir.0.join("db").exists(), "the old database is untouched");
}

#[test]
fn a_checkpoint_records_the_snapshot_and_deletes_only_segments_below_what_is_kept() {
    let dir = TempDir::new("checkpoint");
    const SEGMENT: u64 = 16 << 10;
    let open = || Storage::open_with(&dir.0, CACHE, SEGMENT).unwrap();
    let b = Ballot::new(2, 1);
    let noop = |slot| vote(slot, b, Value::Noop);
    let (s, _) = open();
    s.persist(&Persist {
        membership: None,
        promised: Some(b),
        entries: vec![],
    })
    .unwrap();
    // Enough votes, one commit each, for several segments.
    for slot in 1..=3000 {
        s.persist(&Persist {
            membership: None,
            promised: None,
            entries: vec![noop(slot)],
        })
        .unwrap();
        s.apply(&[(slot, Value::Noop)]).unwrap();
    }
    let (before, _) = s.log_size();
    assert!(before >= 4, "{before} segments");
    let done = s.checkpoint(1000).unwrap();
    assert_eq!(done.snapshot, 3000);
    assert!(done.segments_deleted > 0);
    let (after, bytes) = s.log_size();
    assert_eq!(after, before - done.segments_deleted);
    assert_eq!(bytes, after as u64 * SEGMENT);
    drop(s);
    let (s, d) = open();
    // The promise survived the deletion of the segment that first held it;
    // the votes kept below the snapshot come back, none at or below 2000.
    assert_eq!(
        (d.promised, d.snapshot, d.compacted, d.applied),
        (b, 3000, 2000, 3000)
    );
    let slots: Vec<Slot> = d.votes.iter().map(|v| v.slot).collect();
    assert_eq!(slots, (2001..=3000).collect::<Vec<_>>());
    assert_eq!(s.snapshot_index(), 3000);
    // Votes above the snapshot come back, even from segments shared with
    // older ones.
    s.persist(&Persist {
        membership: None,
        promised: None,
        entries: vec![noop(3001)],
    })
    .unwrap();
    drop(s);
    assert_eq!(open().1.votes.last(), Some(&noop(3001)));
}

#[test]
fn a_checkpoint_keeps_the_slots_followers_may_still_need() {
    let dir = TempDir::new("checkpoint-keep");
    const SEGMENT: u64 = 16 << 10;
    let (s, _) = Storage::open_with(&dir.0, CACHE, SEGMENT).unwrap();
    let b = Ballot::new(1, 1);
    for slot in 1..=3000 {
        s.persist(&Persist {
            membership: None,
            promised: None,
            entries: vec![vote(slot, b, Value::Noop)],
        })
        .unwrap();
    }
    // Applied only to 2000: the snapshot is there, and 1500 slots are kept
    // below it, so every vote from 501 on must still be there.
    for slot in 1..=2000 {
        s.apply(&[(slot, Value::Noop)]).unwrap();
    }
    assert_eq!(s.checkpoint(1500).unwrap().snapshot, 2000);
    drop(s);
    let (_, d) = Storage::open_with(&dir.0, CACHE, SEGMENT).unwrap();
    assert_eq!((d.snapshot, d.compacted), (2000, 500));
    let slots: Vec<Slot> = d.votes.iter().map(|v| v.slot).collect();
    assert_eq!(slots, (501..=3000).collect::<Vec<_>>());
}
