//! Durability, in process: a write is acknowledged only after the vote that
//! holds it has been fsynced, and it is still there when the data directory
//! is opened again.

use std::sync::Arc;
use std::time::Duration;

use paxoskv::kv::{Command, Op, Reply};
use paxoskv::node::Node;
use paxoskv::paxos::{Config, Replica, Restore, Value};
use paxoskv::storage::Storage;
use paxoskv::transport::Transport;
use tokio::sync::{mpsc, watch};

#[tokio::test]
async fn a_write_is_acknowledged_only_after_its_vote_is_synced() {
    let dir = std::env::temp_dir().join(format!("paxoskv-durability-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let storage = Arc::new(Storage::open(&dir, 8 << 20).expect("open storage").0);
    let mut cfg = Config::new(1, vec![1]);
    cfg.election_ticks = 2;
    cfg.heartbeat_ticks = 1;
    let replica = Replica::new(cfg, Restore::default()).expect("replica");
    let (_peer_tx, peer_rx) = mpsc::channel(16);
    let transport = Transport::start(1, Default::default());
    let (node, handle) = Node::new(
        replica,
        Arc::clone(&storage),
        transport,
        peer_rx,
        Duration::from_millis(1),
        paxoskv::node::SnapshotPolicy { every: 0, keep: 0 },
    )
    .expect("start the node");
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(node.run(stopped));

    let mut reply = Err(paxoskv::node::NodeError::Retry);
    for _ in 0..500 {
        let syncs_before = storage.syncs();
        reply = handle
            .write("durable".into(), Op::Insert(7), 0, 0, None)
            .await;
        if reply.is_ok() {
            // The reply came back: by then the vote carrying the command has
            // been through at least one sync (the election's promise is an
            // earlier one), and it is in the durable log.
            assert!(
                storage.syncs() > syncs_before,
                "write acknowledged without a sync"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await; // not leader yet
    }
    assert_eq!(reply, Ok(Reply::Inserted));
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    drop(handle);
    drop(storage);

    // Reopened, the log holds the vote that carried it, and the state
    // machine has it.
    let (storage, durable) = Storage::open(&dir, 8 << 20).expect("reopen storage");
    let logged = durable.votes.iter().any(|v| match &v.value {
        Value::Batch(commands) => commands
            .iter()
            .any(|c| Command::decode(c).is_ok_and(|c| c.key == "durable" && c.op == Op::Insert(7))),
        Value::Noop => false,
    });
    assert!(
        logged,
        "acknowledged write is not in the log: {:?}",
        durable.votes
    );
    assert_eq!(storage.get("durable").unwrap(), Some(7));
    drop(storage);
    let _ = std::fs::remove_dir_all(&dir);
}
