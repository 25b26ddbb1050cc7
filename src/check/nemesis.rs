//! The nemesis: which faults `paxoskv check` injects, when, and into whom.
//!
//! A run's faults are planned up front from the seed ([`plan`]): a warm-up,
//! then *episodes*, one after another with a quiet gap between them. An
//! episode injects one fault and heals it:
//!
//! - **kill**: SIGKILL one or more replicas (the leader among them half the
//!   time), restart them after a while;
//! - **pause**: SIGSTOP, then SIGCONT after a while (a process that stops
//!   answering without its connections closing: a long GC pause, a frozen
//!   VM);
//! - **partition**: cut a minority of replicas off from the others (every
//!   proxy across the cut blocked; see [`super::proxy`]), then heal;
//! - **rolling crash** (with `kill`): SIGKILL and restart every replica in
//!   turn, the leader first, one at a time, each down for a moment. With
//!   `partition` too, a follower is cut off first, so that the others move
//!   on without it, and only they are crashed, as soon as it is back: the
//!   case where votes that were never made durable would be lost (a
//!   majority that forgot them), which single kills rarely reach.
//!
//! The first episodes go through every enabled kind once, in an order drawn
//! from the seed, so that a short run sees each; later ones are drawn at
//! random. Which replica is hit is decided when the episode starts (the
//! plan says "the leader" or "a follower"; the leader is asked of the
//! cluster then).
//!
//! **The minority rule.** Never more than a minority of the replicas is
//! faulty at once (killed, paused, or on the cut-off side of a partition),
//! so that a majority can always make progress and a correct cluster keeps
//! serving. The plan never asks for more in one episode, episodes never
//! overlap, and the executor checks the rule before every fault as well
//! (a replica that exited on its own counts as faulty), skipping what would
//! break it.
//!
//! Every action is logged with its time since the start, for the report.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::paxos::rng::Rng;

/// The kinds of fault a run may inject (`--faults`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultSet {
    /// SIGKILL and restart replicas (and rolling crashes).
    pub kill: bool,
    /// SIGSTOP and SIGCONT replicas.
    pub pause: bool,
    /// Cut a minority of replicas off from the rest.
    pub partition: bool,
}

impl FaultSet {
    /// Every kind.
    pub const ALL: FaultSet = FaultSet {
        kill: true,
        pause: true,
        partition: true,
    };

    /// Parses `--faults`: `none`, or a comma-separated list of `kill`,
    /// `pause` and `partition`.
    pub fn parse(s: &str) -> Result<FaultSet, String> {
        let mut set = FaultSet::default();
        let s = s.trim();
        if s == "none" {
            return Ok(set);
        }
        for part in s.split(',').map(str::trim) {
            match part {
                "kill" => set.kill = true,
                "pause" => set.pause = true,
                "partition" => set.partition = true,
                other => {
                    return Err(format!(
                        "unknown fault {other:?}: give `none` or any of kill,pause,partition"
                    ));
                }
            }
        }
        Ok(set)
    }

    /// Whether no fault is enabled.
    pub fn is_empty(&self) -> bool {
        !(self.kill || self.pause || self.partition)
    }
}

impl fmt::Display for FaultSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = [
            (self.kill, "kill"),
            (self.pause, "pause"),
            (self.partition, "partition"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect();
        if names.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&names.join(","))
        }
    }
}

/// The durations a plan draws from: each pair is a range `lo..hi`.
#[derive(Clone, Debug)]
pub struct Timing {
    /// Before the first fault: the clients get going.
    pub warmup: Duration,
    /// The quiet gap after each episode.
    pub quiet: (Duration, Duration),
    /// How long a pause or a partition lasts.
    pub hold: (Duration, Duration),
    /// How long a killed replica stays down.
    pub down: (Duration, Duration),
    /// How long each replica stays down in a rolling crash.
    pub rolling_down: (Duration, Duration),
    /// In a rolling crash, the wait after a restart before the next kill.
    pub rolling_gap: Duration,
}

impl Default for Timing {
    /// Seconds-long faults (longer than the 1–2 s election timeout, so
    /// leaders change), sub-second rolling crashes (shorter than it, so the
    /// crashes land before a new leader re-replicates).
    fn default() -> Self {
        let ms = Duration::from_millis;
        Timing {
            warmup: ms(2000),
            quiet: (ms(1000), ms(2500)),
            hold: (ms(2000), ms(4500)),
            down: (ms(1000), ms(3500)),
            rolling_down: (ms(80), ms(200)),
            rolling_gap: ms(50),
        }
    }
}

/// One fault and its healing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Episode {
    /// SIGKILL `count` replicas (the leader among them if `leader`, else
    /// followers), and restart them after `down`.
    Kill {
        /// How many replicas.
        count: usize,
        /// Whether the leader is one of them.
        leader: bool,
        /// How long they stay down.
        down: Duration,
    },
    /// SIGSTOP `count` replicas, SIGCONT after `hold`.
    Pause {
        /// How many replicas.
        count: usize,
        /// Whether the leader is one of them.
        leader: bool,
        /// How long they stay stopped.
        hold: Duration,
    },
    /// Cut `count` replicas off from the others for `hold`.
    Partition {
        /// How many replicas on the cut-off side (a minority).
        count: usize,
        /// Whether the leader is on the cut-off side.
        leader: bool,
        /// How long the cut lasts.
        hold: Duration,
    },
    /// SIGKILL and restart every replica in turn, one at a time, each down
    /// for `down`, the leader first. With `cut`, a follower is first cut
    /// off for that long, and only the others are crashed, as soon as it is
    /// back.
    RollingCrash {
        /// How long each replica stays down.
        down: Duration,
        /// The wait after a restart before the next kill.
        gap: Duration,
        /// How long a follower is cut off first, if at all.
        cut: Option<Duration>,
    },
}

impl Episode {
    /// How many replicas it makes faulty at once, at most.
    pub fn width(&self) -> usize {
        match self {
            Episode::Kill { count, .. }
            | Episode::Pause { count, .. }
            | Episode::Partition { count, .. } => *count,
            Episode::RollingCrash { .. } => 1,
        }
    }

    /// How long it takes, in a cluster of `replicas`.
    pub fn length(&self, replicas: u32) -> Duration {
        match self {
            Episode::Kill { down, .. } => *down,
            Episode::Pause { hold, .. } | Episode::Partition { hold, .. } => *hold,
            Episode::RollingCrash { down, gap, cut } => {
                cut.unwrap_or_default() + (*down + *gap) * replicas
            }
        }
    }
}

/// An episode and when it starts, after the start of the run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// When it starts.
    pub at: Duration,
    /// What it does.
    pub episode: Episode,
}

/// The largest number of replicas that may be faulty at once.
pub fn minority(replicas: u32) -> usize {
    (replicas.saturating_sub(1) / 2) as usize
}

/// The episodes of a run of `run_for` over `replicas` replicas, drawn from
/// `seed`: each starts after the previous one ended and a quiet gap, and
/// none starts after `run_for`. Empty with no faults, or with fewer than 3
/// replicas (where no replica can fail without stopping the cluster).
pub fn plan(
    seed: u64,
    replicas: u32,
    faults: FaultSet,
    run_for: Duration,
    t: &Timing,
) -> Vec<Step> {
    let max = minority(replicas);
    if faults.is_empty() || max == 0 {
        return Vec::new();
    }
    #[derive(Clone, Copy)]
    enum Kind {
        Kill,
        Pause,
        Partition,
        Rolling,
    }
    let mut kinds = Vec::new();
    if faults.kill {
        kinds.extend([Kind::Kill, Kind::Rolling]);
    }
    if faults.pause {
        kinds.push(Kind::Pause);
    }
    if faults.partition {
        kinds.push(Kind::Partition);
    }
    let mut rng = Rng::new(seed ^ 0x006e_656d_6573_6973);
    let draw = |rng: &mut Rng, (lo, hi): (Duration, Duration)| {
        let ms = rng.range(lo.as_millis() as u64, hi.as_millis() as u64);
        Duration::from_millis(ms)
    };
    // The first round: every kind once, in a seeded order (Fisher–Yates).
    let mut order = kinds.clone();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.range(0, i as u64 + 1) as usize);
    }
    let mut steps = Vec::new();
    let mut at = t.warmup;
    let mut n = 0;
    while at < run_for {
        let kind = match order.get(n) {
            Some(kind) => *kind,
            None => kinds[rng.range(0, kinds.len() as u64) as usize],
        };
        n += 1;
        let count = rng.range(1, max as u64 + 1) as usize;
        let leader = rng.range(0, 2) == 0;
        let episode = match kind {
            Kind::Kill => Episode::Kill {
                count,
                leader,
                down: draw(&mut rng, t.down),
            },
            Kind::Pause => Episode::Pause {
                count,
                leader,
                hold: draw(&mut rng, t.hold),
            },
            Kind::Partition => Episode::Partition {
                count,
                leader,
                hold: draw(&mut rng, t.hold),
            },
            Kind::Rolling => Episode::RollingCrash {
                down: draw(&mut rng, t.rolling_down),
                gap: t.rolling_gap,
                cut: faults.partition.then(|| draw(&mut rng, t.hold)),
            },
        };
        let next = at + episode.length(replicas) + draw(&mut rng, t.quiet);
        steps.push(Step { at, episode });
        at = next;
    }
    steps
}

/// What the nemesis injects faults into: the cluster under test (a fake in
/// the unit tests). Replicas are numbered `1..=replicas()`.
pub(crate) trait Target {
    /// How many replicas.
    fn replicas(&self) -> u32;
    /// SIGKILL replica `id` and wait until it is gone.
    async fn kill(&mut self, id: u32) -> Result<(), String>;
    /// Starts replica `id` again, on its data.
    async fn restart(&mut self, id: u32) -> Result<(), String>;
    /// SIGSTOP.
    fn pause(&mut self, id: u32) -> Result<(), String>;
    /// SIGCONT.
    fn resume(&mut self, id: u32) -> Result<(), String>;
    /// Cuts every link between `side` and the other replicas.
    fn cut(&mut self, side: &BTreeSet<u32>);
    /// Restores every link.
    fn heal_partition(&mut self);
    /// The replica that says it leads (the highest ballot if several do).
    async fn leader(&mut self) -> Option<u32>;
    /// Replicas whose process exited without being killed, with why,
    /// since the last call.
    fn exited(&mut self) -> Vec<(u32, String)>;
}

/// One thing the nemesis did, and when (since the start of the run).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultEvent {
    /// When it was done.
    pub at: Duration,
    /// What was done, for a person.
    pub what: String,
}

/// Which replicas are faulty now, by kind.
#[derive(Clone, Debug, Default)]
struct Faulty {
    killed: BTreeSet<u32>,
    paused: BTreeSet<u32>,
    cut: BTreeSet<u32>,
}

impl Faulty {
    fn all(&self) -> BTreeSet<u32> {
        let mut all = self.killed.clone();
        all.extend(&self.paused);
        all.extend(&self.cut);
        all
    }

    /// How many of `more` may become faulty without more than `max`
    /// replicas faulty at once.
    fn room(&self, more: &BTreeSet<u32>, max: usize) -> usize {
        let now = self.all();
        let new = more.difference(&now).count();
        new.min(max.saturating_sub(now.len()))
    }
}

/// Runs a plan against a [`Target`], keeping to the minority rule, and
/// heals what is left at the end.
pub(crate) struct Nemesis<'a, T: Target> {
    target: &'a mut T,
    faulty: Faulty,
    started: Instant,
    rng: Rng,
    log: Vec<FaultEvent>,
    /// The replicas cut off right now, for the clients, which send part of
    /// their reads there (where a replica serving stale reads would show).
    cut_off: watch::Sender<Vec<u32>>,
}

impl<'a, T: Target> Nemesis<'a, T> {
    /// A nemesis over `target`, whose times count from `started`.
    pub(crate) fn new(
        target: &'a mut T,
        seed: u64,
        started: Instant,
        cut_off: watch::Sender<Vec<u32>>,
    ) -> Self {
        Nemesis {
            target,
            faulty: Faulty::default(),
            started,
            rng: Rng::new(seed ^ 0x7461_7267_6574),
            log: Vec::new(),
            cut_off,
        }
    }

    /// Takes the log.
    pub(crate) fn into_log(self) -> Vec<FaultEvent> {
        self.log
    }

    fn note(&mut self, what: impl Into<String>) {
        self.log.push(FaultEvent {
            at: self.started.elapsed(),
            what: what.into(),
        });
    }

    fn max(&self) -> usize {
        minority(self.target.replicas())
    }

    /// Runs `plan` until it is done or `stop` turns true, whichever comes
    /// first. Faults in place when it stops stay: [`Nemesis::heal`] them.
    pub(crate) async fn run(&mut self, plan: &[Step], stop: &mut watch::Receiver<bool>) {
        for step in plan {
            if !self.sleep_until(self.started + step.at, stop).await {
                return;
            }
            if !self.episode(&step.episode, stop).await {
                return;
            }
        }
        // Nothing more planned: keep noticing replicas that exit on their
        // own until told to stop.
        let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
        self.sleep_until(far, stop).await;
    }

    /// Sleeps until `until`; false if told to stop first. Notes replicas
    /// that exited on their own meanwhile (they count as killed, and are
    /// restarted by [`Nemesis::heal`]).
    async fn sleep_until(&mut self, until: Instant, stop: &mut watch::Receiver<bool>) -> bool {
        loop {
            self.notice_exits();
            if *stop.borrow() {
                return false;
            }
            let now = Instant::now();
            if now >= until {
                return true;
            }
            let nap = (until - now).min(Duration::from_millis(100));
            tokio::select! {
                _ = tokio::time::sleep(nap) => {}
                _ = stop.changed() => {}
            }
        }
    }

    async fn sleep(&mut self, d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
        self.sleep_until(Instant::now() + d, stop).await
    }

    fn notice_exits(&mut self) {
        for (id, why) in self.target.exited() {
            if self.faulty.killed.insert(id) {
                self.note(format!(
                    "replica {id} EXITED ON ITS OWN ({why}); restarted when the faults heal"
                ));
            }
        }
    }

    /// Picks `count` healthy replicas, the leader first if `leader` (else
    /// never the leader, when there are enough others), then at random.
    fn choose(&mut self, count: usize, leader: bool, known: Option<u32>) -> Vec<u32> {
        let faulty = self.faulty.all();
        let mut healthy: Vec<u32> = (1..=self.target.replicas())
            .filter(|id| !faulty.contains(id))
            .collect();
        for i in (1..healthy.len()).rev() {
            healthy.swap(i, self.rng.range(0, i as u64 + 1) as usize);
        }
        if let Some(l) = known.filter(|l| healthy.contains(l)) {
            healthy.retain(|id| *id != l);
            if leader {
                healthy.insert(0, l);
            } else {
                healthy.push(l);
            }
        }
        healthy.truncate(count);
        healthy
    }

    /// Cuts the targets' count down to what the minority rule allows now,
    /// noting any cut; empty when nothing may be done.
    fn admit(&mut self, mut ids: Vec<u32>, what: &str) -> Vec<u32> {
        let set: BTreeSet<u32> = ids.iter().copied().collect();
        let room = self.faulty.room(&set, self.max());
        if room < ids.len() {
            self.note(format!(
                "{what}: only {room} of {} replicas may fail now (minority rule); {} skipped",
                ids.len(),
                ids.len() - room
            ));
            ids.truncate(room);
        }
        ids
    }

    fn describe(id: u32, leader: Option<u32>) -> String {
        if leader == Some(id) {
            format!("replica {id} (leader)")
        } else {
            format!("replica {id}")
        }
    }

    /// Runs one episode; false if told to stop meanwhile.
    async fn episode(&mut self, episode: &Episode, stop: &mut watch::Receiver<bool>) -> bool {
        match *episode {
            Episode::Kill {
                count,
                leader,
                down,
            } => {
                let known = self.target.leader().await;
                let ids = self.choose(count, leader, known);
                let ids = self.admit(ids, "kill");
                for &id in &ids {
                    self.kill(id, known).await;
                }
                if !self.sleep(down, stop).await {
                    return false;
                }
                for &id in &ids {
                    self.restart(id).await;
                }
            }
            Episode::Pause {
                count,
                leader,
                hold,
            } => {
                let known = self.target.leader().await;
                let ids = self.choose(count, leader, known);
                let ids = self.admit(ids, "pause");
                for &id in &ids {
                    match self.target.pause(id) {
                        Ok(()) => {
                            self.faulty.paused.insert(id);
                            self.note(format!("pause {} (SIGSTOP)", Self::describe(id, known)));
                        }
                        Err(e) => self.note(format!("pause replica {id} failed: {e}")),
                    }
                }
                if !self.sleep(hold, stop).await {
                    return false;
                }
                for &id in &ids {
                    self.resume(id);
                }
            }
            Episode::Partition {
                count,
                leader,
                hold,
            } => {
                let known = self.target.leader().await;
                let ids = self.choose(count, leader, known);
                let ids = self.admit(ids, "partition");
                if !ids.is_empty() {
                    let note = format!("partition: {}", self.side_text(&ids, known));
                    self.partition(&ids, note);
                    if !self.sleep(hold, stop).await {
                        return false;
                    }
                    self.heal_partition();
                }
            }
            Episode::RollingCrash { down, gap, cut } => {
                let known = self.target.leader().await;
                let mut behind = Vec::new();
                if let Some(hold) = cut {
                    let ids = self.choose(1, false, known);
                    let ids = self.admit(ids, "partition before a rolling crash");
                    if !ids.is_empty() {
                        let note = format!(
                            "partition before a rolling crash: {}",
                            self.side_text(&ids, known)
                        );
                        self.partition(&ids, note);
                        if !self.sleep(hold, stop).await {
                            return false;
                        }
                        self.heal_partition();
                        behind = ids;
                    }
                }
                // The leader first, then the others; after a partition only
                // the side that went on without the replica cut off, at
                // once, before that one has caught up.
                let mut order: Vec<u32> = known.into_iter().collect();
                order.extend(
                    (1..=self.target.replicas())
                        .filter(|id| Some(*id) != known && !behind.contains(id)),
                );
                self.note(format!(
                    "rolling crash: SIGKILL and restart replicas {order:?} one at a time, each down {} ms",
                    down.as_millis()
                ));
                for id in order {
                    if self.admit(vec![id], "rolling crash").is_empty() {
                        continue;
                    }
                    self.kill(id, known).await;
                    if !self.sleep(down, stop).await {
                        return false;
                    }
                    self.restart(id).await;
                    if !self.sleep(gap, stop).await {
                        return false;
                    }
                }
            }
        }
        true
    }

    fn side_text(&self, side: &[u32], leader: Option<u32>) -> String {
        let others: Vec<u32> = (1..=self.target.replicas())
            .filter(|id| !side.contains(id))
            .collect();
        let leader_note = match leader {
            Some(l) if side.contains(&l) => " (with the leader)",
            _ => "",
        };
        format!("replicas {side:?}{leader_note} cut off from {others:?}")
    }

    async fn kill(&mut self, id: u32, leader: Option<u32>) {
        match self.target.kill(id).await {
            Ok(()) => {
                self.faulty.killed.insert(id);
                self.note(format!("kill {} (SIGKILL)", Self::describe(id, leader)));
            }
            Err(e) => self.note(format!("kill replica {id} failed: {e}")),
        }
    }

    async fn restart(&mut self, id: u32) {
        match self.target.restart(id).await {
            Ok(()) => {
                self.faulty.killed.remove(&id);
                self.note(format!("restart replica {id}"));
            }
            // Left in `killed`: the heal at the end tries again.
            Err(e) => self.note(format!("restart replica {id} failed: {e}")),
        }
    }

    fn resume(&mut self, id: u32) {
        match self.target.resume(id) {
            Ok(()) => {
                self.faulty.paused.remove(&id);
                self.note(format!("resume replica {id} (SIGCONT)"));
            }
            Err(e) => self.note(format!("resume replica {id} failed: {e}")),
        }
    }

    fn partition(&mut self, side: &[u32], note: String) {
        let set: BTreeSet<u32> = side.iter().copied().collect();
        self.target.cut(&set);
        self.faulty.cut = set;
        self.cut_off.send_replace(side.to_vec());
        self.note(note);
    }

    fn heal_partition(&mut self) {
        self.target.heal_partition();
        self.faulty.cut.clear();
        self.cut_off.send_replace(Vec::new());
        self.note("heal partition");
    }

    /// Heals every fault in place: resumes paused replicas, restores every
    /// link, restarts killed replicas (and those that exited on their own).
    /// Returns whether every replica is healthy again.
    pub(crate) async fn heal(&mut self) -> bool {
        self.notice_exits();
        self.note("heal everything");
        for id in self.faulty.paused.clone() {
            self.resume(id);
        }
        if !self.faulty.cut.is_empty() {
            self.heal_partition();
        } else {
            // Cheap, and certain: no link stays cut whatever happened.
            self.target.heal_partition();
        }
        for id in self.faulty.killed.clone() {
            self.restart(id).await;
        }
        self.faulty.all().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_sets_parse_and_print() {
        assert_eq!(FaultSet::parse("none").unwrap(), FaultSet::default());
        assert_eq!(
            FaultSet::parse("kill,pause,partition").unwrap(),
            FaultSet::ALL
        );
        let kill = FaultSet::parse("kill").unwrap();
        assert!(kill.kill && !kill.pause && !kill.partition);
        assert_eq!(kill.to_string(), "kill");
        assert_eq!(FaultSet::ALL.to_string(), "kill,pause,partition");
        assert_eq!(FaultSet::default().to_string(), "none");
        assert!(
            FaultSet::parse("kill,explode")
                .unwrap_err()
                .contains("explode")
        );
        assert!(FaultSet::parse("").is_err());
    }

    #[test]
    fn minorities() {
        assert_eq!(minority(1), 0);
        assert_eq!(minority(2), 0);
        assert_eq!(minority(3), 1);
        assert_eq!(minority(4), 1);
        assert_eq!(minority(5), 2);
        assert_eq!(minority(7), 3);
    }

    #[test]
    fn plans_keep_to_a_minority_never_overlap_and_cover_every_kind_first() {
        let t = Timing::default();
        let run_for = Duration::from_secs(60);
        for n in [3, 4, 5, 7] {
            for seed in 0..200 {
                let plan = plan(seed, n, FaultSet::ALL, run_for, &t);
                assert!(plan.len() >= 4, "seed {seed}: {plan:?}");
                let mut free_at = Duration::ZERO;
                for step in &plan {
                    assert!(step.episode.width() >= 1);
                    assert!(step.episode.width() <= minority(n), "{step:?}");
                    assert!(step.at >= free_at, "episodes overlap: {plan:?}");
                    assert!(step.at < run_for);
                    free_at = step.at + step.episode.length(n);
                }
                // The first four episodes are the four kinds.
                let mut kinds: Vec<u8> = plan[..4]
                    .iter()
                    .map(|s| match s.episode {
                        Episode::Kill { .. } => 0,
                        Episode::Pause { .. } => 1,
                        Episode::Partition { .. } => 2,
                        Episode::RollingCrash { .. } => 3,
                    })
                    .collect();
                kinds.sort();
                assert_eq!(kinds, [0, 1, 2, 3], "seed {seed}");
                assert_eq!(plan, super::plan(seed, n, FaultSet::ALL, run_for, &t));
            }
        }
        // No faults, or no replica that may fail: nothing to do.
        assert!(plan(1, 3, FaultSet::default(), run_for, &t).is_empty());
        assert!(plan(1, 2, FaultSet::ALL, run_for, &t).is_empty());
        // Only what was asked for.
        let pause = FaultSet::parse("pause").unwrap();
        assert!(
            plan(1, 5, pause, run_for, &t)
                .iter()
                .all(|s| matches!(s.episode, Episode::Pause { .. }))
        );
    }

    /// A cluster that is only bookkeeping: it fails the test whenever more
    /// than a minority is faulty, and at random says a replica exited on
    /// its own, or a leader.
    struct Fake {
        n: u32,
        killed: BTreeSet<u32>,
        paused: BTreeSet<u32>,
        cut: BTreeSet<u32>,
        rng: Rng,
        /// Whether replicas exit on their own now and then.
        exits: bool,
        actions: usize,
        worst: usize,
    }

    impl Fake {
        fn check(&mut self) {
            let mut all = self.killed.clone();
            all.extend(&self.paused);
            all.extend(&self.cut);
            self.worst = self.worst.max(all.len());
            assert!(
                all.len() <= minority(self.n),
                "{} of {} replicas faulty: killed {:?} paused {:?} cut {:?}",
                all.len(),
                self.n,
                self.killed,
                self.paused,
                self.cut
            );
            self.actions += 1;
        }
    }

    impl Target for Fake {
        fn replicas(&self) -> u32 {
            self.n
        }
        async fn kill(&mut self, id: u32) -> Result<(), String> {
            assert!(!self.killed.contains(&id), "killed twice");
            self.killed.insert(id);
            self.check();
            Ok(())
        }
        async fn restart(&mut self, id: u32) -> Result<(), String> {
            assert!(self.killed.remove(&id), "restarted a live replica");
            self.check();
            Ok(())
        }
        fn pause(&mut self, id: u32) -> Result<(), String> {
            self.paused.insert(id);
            self.check();
            Ok(())
        }
        fn resume(&mut self, id: u32) -> Result<(), String> {
            self.paused.remove(&id);
            self.check();
            Ok(())
        }
        fn cut(&mut self, side: &BTreeSet<u32>) {
            self.cut = side.clone();
            self.check();
        }
        fn heal_partition(&mut self) {
            self.cut.clear();
        }
        async fn leader(&mut self) -> Option<u32> {
            let id = self.rng.range(0, u64::from(self.n) + 1) as u32;
            (id > 0).then_some(id)
        }
        fn exited(&mut self) -> Vec<(u32, String)> {
            // Now and then a healthy replica dies by itself.
            if !self.exits || self.rng.range(0, 40) != 0 {
                return Vec::new();
            }
            let id = self.rng.range(1, u64::from(self.n) + 1) as u32;
            let mut faulty = self.killed.clone();
            faulty.extend(&self.paused);
            faulty.extend(&self.cut);
            // Only where a majority stays: beyond that no nemesis can help.
            if faulty.contains(&id) || faulty.len() + 1 > minority(self.n) {
                return Vec::new();
            }
            self.killed.insert(id);
            vec![(id, "crashed".into())]
        }
    }

    /// Timings in milliseconds instead of seconds.
    fn fast() -> Timing {
        let ms = Duration::from_millis;
        Timing {
            warmup: ms(1),
            quiet: (ms(1), ms(3)),
            hold: (ms(1), ms(4)),
            down: (ms(1), ms(4)),
            rolling_down: (ms(1), ms(2)),
            rolling_gap: ms(1),
        }
    }

    #[tokio::test]
    async fn the_executor_never_lets_a_majority_fail_and_heals_everything() {
        for n in [3, 5] {
            for seed in 0..9 {
                let mut fake = Fake {
                    n,
                    killed: BTreeSet::new(),
                    paused: BTreeSet::new(),
                    cut: BTreeSet::new(),
                    rng: Rng::new(seed),
                    exits: seed % 3 == 0,
                    actions: 0,
                    worst: 0,
                };
                let plan = plan(seed, n, FaultSet::ALL, Duration::from_millis(150), &fast());
                let (cut_tx, cut_rx) = watch::channel(Vec::new());
                let (stop_tx, mut stop) = watch::channel(false);
                let mut nemesis = Nemesis::new(&mut fake, seed, Instant::now(), cut_tx);
                // The plan, then a little idling (exits keep coming).
                tokio::join!(nemesis.run(&plan, &mut stop), async {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    stop_tx.send_replace(true);
                });
                assert!(nemesis.heal().await, "seed {seed}: not everything healed");
                assert!(cut_rx.borrow().is_empty());
                let log = nemesis.into_log();
                assert!(log.windows(2).all(|w| w[0].at <= w[1].at));
                assert!(fake.killed.is_empty() && fake.paused.is_empty() && fake.cut.is_empty());
                if fake.exits {
                    // Faults skipped while a replica is down on its own
                    // are fine; breaking the rule (checked by the fake) is
                    // not.
                    continue;
                }
                assert!(log.iter().any(|e| e.what.starts_with("kill")), "{log:?}");
                assert!(log.iter().any(|e| e.what.starts_with("pause")), "{log:?}");
                assert!(
                    log.iter().any(|e| e.what.starts_with("partition")),
                    "{log:?}"
                );
                assert!(
                    log.iter().any(|e| e.what.starts_with("rolling crash")),
                    "{log:?}"
                );
                assert!(fake.actions > 5);
                assert!(fake.worst >= 1);
            }
        }
    }

    #[tokio::test]
    async fn a_replica_that_exited_on_its_own_leaves_no_room_for_a_kill() {
        // Three replicas, one of which died by itself: killing another
        // would leave no majority, so the kill is skipped.
        struct OneDead(Fake);
        impl Target for OneDead {
            fn replicas(&self) -> u32 {
                3
            }
            async fn kill(&mut self, id: u32) -> Result<(), String> {
                self.0.kill(id).await
            }
            async fn restart(&mut self, id: u32) -> Result<(), String> {
                self.0.restart(id).await
            }
            fn pause(&mut self, id: u32) -> Result<(), String> {
                self.0.pause(id)
            }
            fn resume(&mut self, id: u32) -> Result<(), String> {
                self.0.resume(id)
            }
            fn cut(&mut self, side: &BTreeSet<u32>) {
                self.0.cut(side)
            }
            fn heal_partition(&mut self) {
                self.0.heal_partition()
            }
            async fn leader(&mut self) -> Option<u32> {
                Some(1)
            }
            fn exited(&mut self) -> Vec<(u32, String)> {
                if self.0.killed.insert(2) {
                    vec![(2, "signal 6".into())]
                } else {
                    Vec::new()
                }
            }
        }
        let mut dead = OneDead(Fake {
            n: 3,
            killed: BTreeSet::new(),
            paused: BTreeSet::new(),
            cut: BTreeSet::new(),
            rng: Rng::new(1),
            exits: false,
            actions: 0,
            worst: 0,
        });
        let plan = [Step {
            at: Duration::ZERO,
            episode: Episode::Kill {
                count: 1,
                leader: true,
                down: Duration::from_millis(1),
            },
        }];
        let (cut_tx, _) = watch::channel(Vec::new());
        let (stop_tx, mut stop) = watch::channel(false);
        let mut nemesis = Nemesis::new(&mut dead, 1, Instant::now(), cut_tx);
        tokio::join!(nemesis.run(&plan, &mut stop), async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            stop_tx.send_replace(true);
        });
        assert!(nemesis.heal().await);
        let text: Vec<String> = nemesis.into_log().into_iter().map(|e| e.what).collect();
        assert!(text[0].contains("replica 2 EXITED ON ITS OWN"), "{text:?}");
        assert!(text.iter().any(|t| t.contains("minority rule")), "{text:?}");
        assert!(!text.iter().any(|t| t.starts_with("kill ")), "{text:?}");
        assert!(text.iter().any(|t| t == "restart replica 2"), "{text:?}");
        assert!(dead.0.killed.is_empty());
    }
}
