//! Commit throughput of the sans-IO core alone: the protocol's own ceiling,
//! next to `benches/commit.rs`, which measures the whole cluster.
//!
//! Three [`Driver`]s (the core plus the bookkeeping of waiting calls, the
//! very type `paxoskv serve` runs), with the shipped [`Config`] defaults,
//! on an in-memory network, in this one thread. A shell here does what
//! [`paxoskv::driver::Work`] says, with nothing in between: `persist` is
//! taken as durable at once (no disk), messages are handed over as values
//! (no encoding, no sockets), messages a replica sends itself go back
//! through [`Driver::step_own`], and chosen slots are applied to an
//! in-memory state machine ([`MemState`], through [`kv::apply_slot`], as
//! the simulator does) whose replies go back through
//! [`Driver::applied_through`]. Votes are compacted as the commit bench's
//! snapshot policy compacts them (every 10,000 slots, keeping 5,000).
//!
//! The network runs in rounds: every replica does all its work, then every
//! message sent is delivered, then again. Replica 1 is elected first; then
//! a closed loop keeps 1, 16, 256 or 1,024 upserts outstanding at it,
//! proposing a new one as soon as one is answered (a client with no latency
//! at all). No ticks pass while measuring, so no heartbeats or re-sends
//! (none are needed: nothing is lost). Reported as writes (elements) per
//! second.
//!
//! Run with `cargo bench --bench core`.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use paxoskv::driver::{Answer, Driver};
use paxoskv::kv::{self, Command, MemState, Op, Reply, SessionLimits};
use paxoskv::paxos::{Config, Envelope, NodeId, Replica, Restore, Slot, Value};

/// Writes outstanding at once.
const IN_FLIGHT: [usize; 4] = [1, 16, 256, 1024];
/// Distinct keys written.
const KEYS: u64 = 1000;
/// Replicas `1..=REPLICAS`.
const REPLICAS: u32 = 3;
/// The leader, elected before measuring.
const LEADER: NodeId = 1;
/// Compact the votes every this many applied slots...
const COMPACT_EVERY: Slot = 10_000;
/// ... keeping this many below the applied index.
const COMPACT_KEEP: Slot = 5_000;

/// One replica: its driver (callers are not told apart: only counted) and
/// its state machine.
struct Member {
    driver: Driver<(), ()>,
    machine: MemState,
    compacted: Slot,
}

/// Three replicas on a lossless in-memory network, and a closed-loop client
/// of the leader.
struct Cluster {
    /// Replica `id` at `id - 1`.
    members: Vec<Member>,
    /// Messages sent this round, with their sender, delivered at its end.
    in_transit: Vec<(NodeId, Envelope)>,
    /// How many writes the client keeps outstanding.
    in_flight: usize,
    /// Writes proposed and not yet answered.
    outstanding: usize,
    /// Writes proposed so far (to pick keys and values).
    proposed: u64,
    /// Writes answered with the state machine's reply.
    committed: u64,
}

impl Cluster {
    /// Three new replicas, replica 1 elected, nothing outstanding.
    fn elected() -> Cluster {
        let ids: Vec<NodeId> = (1..=REPLICAS).collect();
        let members = ids
            .iter()
            .map(|&id| {
                let cfg = Config::new(id, ids.clone());
                let replica = Replica::new(cfg, Restore::default()).expect("valid config");
                Member {
                    driver: Driver::new(replica, 0, u64::from(id) << 32),
                    machine: MemState::new(),
                    compacted: 0,
                }
            })
            .collect();
        let mut cluster = Cluster {
            members,
            in_transit: Vec::new(),
            in_flight: 0,
            outstanding: 0,
            proposed: 0,
            committed: 0,
        };
        // Only the leader-to-be ticks, so only it campaigns.
        let mut ticks = 0;
        while !cluster.member(LEADER).driver.replica().is_leader() {
            ticks += 1;
            assert!(ticks < 10_000, "replica {LEADER} was not elected");
            cluster.member(LEADER).driver.tick();
            cluster.settle();
        }
        cluster
    }

    fn member(&mut self, id: NodeId) -> &mut Member {
        &mut self.members[(id - 1) as usize]
    }

    /// Runs rounds until no message is sent.
    fn settle(&mut self) {
        while self.round() > 0 {}
    }

    /// Runs rounds, keeping `in_flight` writes outstanding, until `count`
    /// more writes were answered.
    fn commit(&mut self, in_flight: usize, count: u64) {
        self.in_flight = in_flight;
        let target = self.committed + count;
        while self.committed < target {
            let before = self.committed;
            let delivered = self.round();
            assert!(
                self.committed > before || delivered > 0,
                "the cluster stalled with {} writes outstanding",
                self.outstanding
            );
        }
    }

    /// Every replica does what its driver asks, then every message sent
    /// is delivered. Returns how many were.
    fn round(&mut self) -> usize {
        for id in 1..=REPLICAS {
            self.work(id);
        }
        let in_transit = std::mem::take(&mut self.in_transit);
        let delivered = in_transit.len();
        for (from, e) in in_transit {
            self.member(e.to)
                .driver
                .step(from, e.msg)
                .expect("an honest peer's message is heard");
        }
        delivered
    }

    /// Does what replica `id`'s driver asks until it asks nothing more, as
    /// the shell does, with instant storage and an in-memory network.
    fn work(&mut self, id: NodeId) {
        loop {
            if id == LEADER {
                self.top_up();
            }
            let work = self.member(id).driver.take_ready();
            if work.is_empty() {
                return;
            }
            assert!(
                work.fetch_snapshot.is_none(),
                "no replica falls behind a lossless network"
            );
            // `persist` is durable at once, so what waited on it goes now.
            let mut own = Vec::new();
            for e in work.messages.into_iter().chain(work.persisted_messages) {
                if e.to == id {
                    own.push(e.msg);
                } else {
                    self.in_transit.push((id, e));
                }
            }
            self.answer(work.answers);
            if let Some(&(last, _)) = work.chosen.last() {
                let member = self.member(id);
                let replies = apply(&mut member.machine, &work.chosen);
                let answers = member.driver.applied_through(last, replies);
                if last >= member.compacted + COMPACT_EVERY {
                    member.compacted = last - COMPACT_KEEP;
                    member.driver.compact(member.compacted);
                }
                self.answer(answers);
            }
            let driver = &mut self.member(id).driver;
            for msg in own {
                driver.step_own(msg);
            }
        }
    }

    /// Proposes writes at the leader until `in_flight` are outstanding.
    fn top_up(&mut self) {
        while self.outstanding < self.in_flight {
            let n = self.proposed;
            self.proposed += 1;
            let command = Command {
                proposal_id: 0,
                client_id: 0,
                sequence: 0,
                key: format!("k{}", n % KEYS),
                op: Op::Upsert(n as i32),
            };
            self.member(LEADER)
                .driver
                .write(command, (), None)
                .expect("the leader takes writes");
            self.outstanding += 1;
        }
    }

    /// Counts the writes answered; any other answer is a bug here.
    fn answer(&mut self, answers: Vec<Answer<(), ()>>) {
        for answer in answers {
            match answer {
                Answer::Write {
                    result: Ok(Reply::Inserted | Reply::Updated { .. }),
                    ..
                } => {
                    self.outstanding -= 1;
                    self.committed += 1;
                }
                other => panic!("unexpected answer on a lossless network: {other:?}"),
            }
        }
    }
}

/// Applies chosen slots to `machine`; the replies by proposal id.
fn apply(machine: &mut MemState, chosen: &[(Slot, Value)]) -> Vec<(u64, Reply)> {
    let mut replies = Vec::new();
    for (slot, value) in chosen {
        let Value::Batch(commands) = value else {
            continue;
        };
        let commands: Vec<Command> = commands
            .iter()
            .map(|c| Command::decode(c).expect("our own encoding"))
            .collect();
        let slot_replies = kv::apply_slot(machine, &SessionLimits::DEFAULT, *slot, &commands);
        replies.extend(commands.iter().map(|c| c.proposal_id).zip(slot_replies));
    }
    replies
}

fn core(c: &mut Criterion) {
    let mut group = c.benchmark_group("core");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(5));
    for in_flight in IN_FLIGHT {
        let batch = (in_flight as u64 * 4).max(1024);
        group.throughput(Throughput::Elements(batch));
        let mut cluster = Cluster::elected();
        group.bench_with_input(
            BenchmarkId::new("pipelined_writes", in_flight),
            &in_flight,
            |b, &in_flight| {
                b.iter_custom(|iters| {
                    let started = Instant::now();
                    cluster.commit(in_flight, batch * iters);
                    started.elapsed()
                });
            },
        );
    }
    group.finish();
}

criterion_group!(benches, core);
criterion_main!(benches);
