//! Client traffic against a test cluster, in the background: the one load
//! generator the real-process tests share.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use paxoskv::pb;
use paxoskv::pb::kv_store_client::KvStoreClient;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::Code;

use super::{Cluster, channel};

/// What a [`Load`] sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Traffic {
    /// Distinct keys, inserted one after another through the aimed replicas
    /// in turn, each with a request id and retried with it until
    /// acknowledged (so a retry is applied at most once). Every
    /// acknowledged write is recorded in [`Acked`], for checking the disks
    /// afterwards.
    AckedInserts,
    /// Every method, from one task per aimed replica, with successes and
    /// the errors the contract promises (NotFound, AlreadyExists), so that
    /// every metric moves.
    EveryMethod,
}

/// What the load achieved.
#[derive(Default)]
pub struct Acked {
    /// Acknowledged writes of [`Traffic::AckedInserts`]: key -> value.
    pub values: BTreeMap<String, i32>,
    /// For each acknowledged write, when the attempt that succeeded was sent
    /// and when it was acknowledged.
    pub times: Vec<(Instant, Instant)>,
    /// Calls answered as the traffic expects: successes, and the errors
    /// [`Traffic::EveryMethod`] asks for.
    pub answered: u64,
}

/// Traffic running in the background until [`Load::finish`].
pub struct Load {
    acked: Arc<Mutex<Acked>>,
    answered: Arc<AtomicU64>,
    targets: watch::Sender<Vec<u32>>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    /// Starts `traffic` through every replica of `cluster`.
    pub fn start(cluster: &Cluster, traffic: Traffic) -> Load {
        let acked = Arc::new(Mutex::new(Acked::default()));
        let answered = Arc::new(AtomicU64::new(0));
        let (targets, targets_rx) = watch::channel(cluster.addrs.keys().copied().collect());
        let (stop, stop_rx) = watch::channel(false);
        let sink = Sink {
            acked: Arc::clone(&acked),
            answered: Arc::clone(&answered),
        };
        let tasks = match traffic {
            Traffic::AckedInserts => vec![tokio::spawn(acked_inserts(
                cluster.addrs.clone(),
                targets_rx,
                sink,
                stop_rx,
            ))],
            Traffic::EveryMethod => cluster
                .addrs
                .iter()
                .map(|(&id, addr)| {
                    tokio::spawn(every_method(
                        id,
                        addr.clone(),
                        targets_rx.clone(),
                        sink.clone(),
                        stop_rx.clone(),
                    ))
                })
                .collect(),
        };
        Load {
            acked,
            answered,
            targets,
            stop,
            tasks,
        }
    }

    /// Sends the traffic through `ids` only, from now on.
    pub fn aim(&self, ids: Vec<u32>) {
        self.targets.send_replace(ids);
    }

    /// How many writes have been acknowledged so far.
    pub fn acked(&self) -> usize {
        lock(&self.acked).values.len()
    }

    /// When the first write sent after `t` was acknowledged, if it was.
    pub fn first_ack_of_a_write_sent_after(&self, t: Instant) -> Option<Instant> {
        lock(&self.acked)
            .times
            .iter()
            .find(|(sent, _)| *sent > t)
            .map(|(_, ack)| *ack)
    }

    /// Stops the traffic and returns what it achieved. A task still waiting
    /// on a call after 10 s is abandoned; one that panicked fails the test.
    pub async fn finish(self) -> Acked {
        self.stop.send_replace(true);
        for mut task in self.tasks {
            match tokio::time::timeout(Duration::from_secs(10), &mut task).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("load task failed: {e}"),
                Err(_) => task.abort(),
            }
        }
        let mut acked = std::mem::take(&mut *lock(&self.acked));
        acked.answered = self.answered.load(Ordering::Relaxed);
        acked
    }
}

/// Where the load's tasks record what they achieved.
#[derive(Clone)]
struct Sink {
    acked: Arc<Mutex<Acked>>,
    answered: Arc<AtomicU64>,
}

fn lock(acked: &Mutex<Acked>) -> MutexGuard<'_, Acked> {
    // A task that panicked holding the lock fails the test in `finish`.
    acked.lock().unwrap_or_else(|e| e.into_inner())
}

/// [`Traffic::AckedInserts`]: one writer, through the aimed replicas in turn.
async fn acked_inserts(
    addrs: BTreeMap<u32, String>,
    targets: watch::Receiver<Vec<u32>>,
    sink: Sink,
    mut stop: watch::Receiver<bool>,
) {
    let mut turn = 0usize;
    // The store issues the client id: open a session, through the aimed
    // replicas in turn, until one answers.
    let client_id = loop {
        if *stop.borrow() {
            return;
        }
        let live = targets.borrow().clone();
        turn += 1;
        let id = live[turn % live.len()];
        let channel = paxoskv::dial::endpoint(&addrs[&id])
            .expect("endpoint")
            .connect_timeout(Duration::from_millis(300))
            .connect_lazy();
        let mut req = tonic::Request::new(pb::OpenSessionRequest {});
        req.set_timeout(Duration::from_secs(2));
        match KvStoreClient::new(channel).open_session(req).await {
            Ok(response) => break response.into_inner().client_id,
            Err(_) => {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    };
    let mut seq = 0u64;
    while !*stop.borrow() {
        seq += 1;
        let key = format!("key-{seq:06}");
        let value = seq as i32;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if *stop.borrow() || Instant::now() > deadline {
                break;
            }
            let live = targets.borrow().clone();
            turn += 1;
            let id = live[turn % live.len()];
            // A fresh channel with a short connect timeout per attempt, so
            // that a killed replica costs an attempt, not the whole load.
            let channel = paxoskv::dial::endpoint(&addrs[&id])
                .expect("endpoint")
                .connect_timeout(Duration::from_millis(300))
                .connect_lazy();
            let mut client = KvStoreClient::new(channel);
            let mut req = tonic::Request::new(pb::InsertRequest {
                key: key.clone(),
                value: Some(value),
                request_id: Some(pb::RequestId {
                    client_id,
                    sequence: seq,
                }),
            });
            req.set_timeout(Duration::from_secs(2));
            let sent = Instant::now();
            match client.insert(req).await {
                Ok(_) => {
                    let mut a = lock(&sink.acked);
                    a.values.insert(key.clone(), value);
                    a.times.push((sent, Instant::now()));
                    sink.answered.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(_) => {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                        _ = stop.changed() => {}
                    }
                }
            }
        }
    }
}

/// [`Traffic::EveryMethod`]: every method through replica `id`, while it is
/// aimed at.
async fn every_method(
    id: u32,
    addr: String,
    targets: watch::Receiver<Vec<u32>>,
    sink: Sink,
    stop: watch::Receiver<bool>,
) {
    let mut c = KvStoreClient::new(channel(&addr));
    let mut i: i32 = 0;
    while !*stop.borrow() {
        if !targets.borrow().contains(&id) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let key = format!("obs-{id}-{}", i % 20);
        let missing = format!("obs-missing-{id}-{i}");
        fn req<T>(m: T) -> tonic::Request<T> {
            let mut r = tonic::Request::new(m);
            r.set_timeout(Duration::from_secs(2));
            r
        }
        let results = [
            c.upsert(req(pb::UpsertRequest {
                key: key.clone(),
                value: Some(i),
                request_id: None,
            }))
            .await
            .map(drop),
            c.get(req(pb::GetRequest { key: key.clone() }))
                .await
                .map(drop),
            // NotFound
            c.get(req(pb::GetRequest { key: missing })).await.map(drop),
            // AlreadyExists
            c.insert(req(pb::InsertRequest {
                key: key.clone(),
                value: Some(i),
                request_id: None,
            }))
            .await
            .map(drop),
            c.update(req(pb::UpdateRequest {
                key: key.clone(),
                value: Some(i + 1),
                request_id: None,
            }))
            .await
            .map(drop),
            c.remove(req(pb::RemoveRequest {
                key: key.clone(),
                request_id: None,
            }))
            .await
            .map(drop),
            // NotFound
            c.remove(req(pb::RemoveRequest {
                key,
                request_id: None,
            }))
            .await
            .map(drop),
        ];
        let n = results
            .iter()
            .filter(|r| match r {
                Ok(()) => true,
                Err(s) => matches!(s.code(), Code::NotFound | Code::AlreadyExists),
            })
            .count();
        sink.answered.fetch_add(n as u64, Ordering::Relaxed);
        i = i.wrapping_add(1);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
