//! A linearizability checker for key-value histories.
//!
//! One checker, two users: the deterministic simulator
//! (`tests/simulation`) checks the histories of its simulated clients, and
//! `paxoskv check` ([`crate::check`]) those of real clients against real
//! processes. Times are whatever the recorder uses (ticks in the
//! simulator, microseconds since the start in `paxoskv check`).
//!
//! The algorithm is the one of Wing & Gong, improved by Lowe, as used by
//! Porcupine and Knossos: a depth-first search for a sequential order of the
//! operations (a *linearization*) that respects real time and that the
//! sequential model accepts, backtracking on a dead end, with a cache of the
//! (set of linearized operations, model state) pairs already explored, since
//! the rest of the search only depends on that pair.
//!
//! Keys are independent registers, so by P-compositionality (Horn & Kroening)
//! a history is linearizable iff each per-key sub-history is; checking them one
//! by one keeps the search space small.
//!
//! Real time: operation A must be linearized before B iff `A.ret < B.call`.
//! Equal times are treated as concurrent, which is the permissive choice: a
//! simulator that stamps a reply and a later request with the same tick cannot
//! tell which came first, so a violation is only reported when no reading of
//! equal times explains the history.
//!
//! An operation without output (the client never heard back) has return time
//! +infinity: it may be linearized anywhere after its call, with whatever
//! output the model produces, or not at all. Leaving it out is equivalent to
//! linearizing it last, since the state after the end of the history is not
//! observed.
//!
//! Such pending operations are what makes checking expensive, since each can
//! change the state at any later point. Three refinements, all exact (the
//! answer never changes, only the work): completed candidates are tried
//! before pending ones; among unused pending operations with the same input
//! only the earliest called is tried; and the cache keeps, per (completed
//! operations linearized, state), the minimal sets of pending operations
//! linearized, skipping a search state whose set contains one of them. A
//! unit test compares the result with a brute-force search on many small
//! random histories.
//!
//! Cost: the search is exponential in the worst case (the problem is
//! NP-complete), roughly in the number of operations on one key that are
//! concurrent at any moment, where a pending operation counts as concurrent
//! with everything after its call. A few hundred operations per key with
//! about ten clients and a few pending operations check in milliseconds;
//! dozens of pending writes over a handful of distinct values on one key can
//! take seconds or more. Distinct written values keep it cheap.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// An operation's input on one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Input {
    /// Read the key.
    Get,
    /// Create the key with this value; fails if it exists.
    Insert(i32),
    /// Overwrite an existing key; fails if it is absent.
    Update(i32),
    /// Create or overwrite the key.
    Upsert(i32),
    /// Delete an existing key; fails if it is absent.
    Remove,
}

/// What the client was told.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Output {
    /// Get: the value, or `None` for NOT_FOUND.
    Value(Option<i32>),
    /// Insert succeeded, or Upsert of an absent key.
    Inserted,
    /// Update succeeded, or Upsert of a present key.
    Updated {
        /// The value the key held before.
        previous: i32,
    },
    /// Remove succeeded.
    Removed {
        /// The value the key held before.
        previous: i32,
    },
    /// Insert of a present key.
    AlreadyExists,
    /// Update or Remove of an absent key.
    NotFound,
    /// Upsert of a present key, as the client API reports it (`inserted:
    /// false`): the key held a value, which the reply does not name. It
    /// agrees with the model's `Updated { previous }` for any `previous`.
    Replaced,
}

impl Output {
    /// Whether a client told `self` was told what the model says,
    /// `model` (which is never [`Output::Replaced`]).
    pub fn agrees(self, model: Output) -> bool {
        match (self, model) {
            (Output::Replaced, Output::Updated { .. }) => true,
            (observed, model) => observed == model,
        }
    }
}

/// One client operation as observed by the client.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Operation {
    /// The client that issued the operation (for reports only).
    pub client: u64,
    /// The key the operation is on.
    pub key: String,
    /// What the client asked for.
    pub input: Input,
    /// `None`: the client never heard back (crash, timeout, end of run); the
    /// operation may or may not have taken effect, with any output.
    pub output: Option<Output>,
    /// Logical time the client invoked the operation.
    pub call: u64,
    /// Logical time the client got its reply; ignored when `output` is `None`
    /// (treated as +infinity).
    pub ret: u64,
}

/// A key whose sub-history has no linearization.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The key at fault.
    pub key: String,
    /// The key's sub-history, sorted by call time; `message` refers to
    /// operations by their index in this list.
    pub ops: Vec<Operation>,
    /// What went wrong, including the longest linearizable prefix found.
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "linearizability violation on key {:?} ({} operations):",
            self.key,
            self.ops.len()
        )?;
        for (i, op) in self.ops.iter().enumerate() {
            write!(f, "  [{i}] client {} call {} ", op.client, op.call)?;
            match op.output {
                Some(output) => writeln!(f, "ret {}: {:?} -> {:?}", op.ret, op.input, output)?,
                None => writeln!(f, "ret never: {:?} -> (no reply)", op.input)?,
            }
        }
        write!(f, "{}", self.message)
    }
}

/// Checks that `history` is linearizable with respect to a map from keys to
/// `i32` values, all keys initially absent.
///
/// Keys are checked in sorted order; the first violating key is reported.
///
/// # Panics
///
/// If an operation with an output has `ret < call`, which no real execution
/// produces.
pub fn check(history: &[Operation]) -> Result<(), Violation> {
    let mut by_key: BTreeMap<&str, Vec<Operation>> = BTreeMap::new();
    for op in history {
        assert!(
            op.output.is_none() || op.call <= op.ret,
            "operation returns before it is called: {op:?}"
        );
        by_key.entry(&op.key).or_default().push(op.clone());
    }
    for (key, mut ops) in by_key {
        // The search relies on call order (see `Search::candidates`); a
        // stable sort keeps reports in the order the history gave.
        ops.sort_by_key(|op| op.call);
        check_key(key, ops)?;
    }
    Ok(())
}

/// Applies `input` to the register's `state`, returning the output and the
/// new state.
fn step(state: Option<i32>, input: Input) -> (Output, Option<i32>) {
    match (input, state) {
        (Input::Get, _) => (Output::Value(state), state),
        (Input::Insert(v), None) => (Output::Inserted, Some(v)),
        (Input::Insert(_), Some(_)) => (Output::AlreadyExists, state),
        (Input::Update(v), Some(p)) => (Output::Updated { previous: p }, Some(v)),
        (Input::Update(_), None) => (Output::NotFound, None),
        (Input::Upsert(v), None) => (Output::Inserted, Some(v)),
        (Input::Upsert(v), Some(p)) => (Output::Updated { previous: p }, Some(v)),
        (Input::Remove, Some(p)) => (Output::Removed { previous: p }, None),
        (Input::Remove, None) => (Output::NotFound, None),
    }
}

/// A fixed-size set of small indices.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Bitset(Vec<u64>);

impl Bitset {
    fn new(len: usize) -> Self {
        Bitset(vec![0; len.div_ceil(64)])
    }

    fn contains(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
    }

    fn insert(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }

    fn remove(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }

    /// Whether every element of `self` is in `other` (of the same size).
    fn is_subset(&self, other: &Bitset) -> bool {
        self.0.iter().zip(&other.0).all(|(a, b)| a & !b == 0)
    }

    /// The smallest index below `len` not in the set.
    fn first_absent(&self, len: usize) -> Option<usize> {
        self.0
            .iter()
            .enumerate()
            .find(|(_, w)| **w != u64::MAX)
            .map(|(i, w)| i * 64 + w.trailing_ones() as usize)
            .filter(|&i| i < len)
    }
}

/// One key's sub-history prepared for the search.
///
/// Completed and pending operations are kept apart because they play
/// different roles: completed ones must all be linearized and bound when
/// others may be, pending ones are optional and never bound anything.
/// A *choice* numbers the candidates: `c < completed.len()` is
/// `completed[c]`, otherwise it is `pending[c - completed.len()]`.
struct Search {
    /// The sub-history, sorted by call time.
    ops: Vec<Operation>,
    /// Indices into `ops` of the completed operations, in call order.
    completed: Vec<usize>,
    /// Indices into `ops` of the pending operations, in call order.
    pending: Vec<usize>,
}

impl Search {
    fn op(&self, choice: usize) -> &Operation {
        match choice.checked_sub(self.completed.len()) {
            None => &self.ops[self.completed[choice]],
            Some(p) => &self.ops[self.pending[p]],
        }
    }

    /// The choices worth trying next from model state `state`, given the
    /// completed operations linearized (`done`) and the pending ones
    /// linearized (`used`), in the order to try them.
    fn candidates(&self, done: &Bitset, used: &Bitset, state: Option<i32>) -> Vec<usize> {
        let nc = self.completed.len();
        let Some(first) = done.first_absent(nc) else {
            return Vec::new();
        };
        // An operation may come next iff no unlinearized operation returned
        // strictly before it was called, i.e. iff its call is at most the
        // smallest return time among unlinearized completed operations
        // (pending ones never return). Ops are sorted by call and
        // ret >= call, so once an op is called after the minimum so far,
        // neither it nor any later op can lower it.
        let mut min_ret = u64::MAX;
        for c in first..nc {
            let op = self.op(c);
            if op.call > min_ret {
                break;
            }
            if !done.contains(c) {
                min_ret = min_ret.min(op.ret);
            }
        }
        // Completed candidates whose output the model agrees with come
        // first: pending ops are rarely needed, so trying them last finds a
        // linearization sooner.
        let mut out: Vec<usize> = (first..nc)
            .take_while(|&c| self.op(c).call <= min_ret)
            .filter(|&c| !done.contains(c))
            .filter(|&c| {
                let model = step(state, self.op(c).input).0;
                self.op(c).output.is_some_and(|o| o.agrees(model))
            })
            .collect();
        // Unused pending ops with the same input are interchangeable (the
        // earliest called is eligible whenever a later one is, and stays
        // so), so only the earliest is worth trying. A pending op that would
        // leave the state alone is pointless: leaving it out is always at
        // least as good.
        let mut inputs_seen = Vec::new();
        let eligible = (0..self.pending.len()).take_while(|&p| self.op(nc + p).call <= min_ret);
        for p in eligible.filter(|&p| !used.contains(p)) {
            let input = self.op(nc + p).input;
            if !inputs_seen.contains(&input) {
                inputs_seen.push(input);
                if step(state, input).1 != state {
                    out.push(nc + p);
                }
            }
        }
        out
    }
}

/// One level of the depth-first search.
struct Frame {
    /// The model state at this level.
    state: Option<i32>,
    /// The choices to try from here, in order.
    candidates: Vec<usize>,
    /// How many have been tried; the last one tried is the current choice.
    tried: usize,
}

/// Searches for a linearization of one key's operations, sorted by call time.
///
/// The search is iterative (an explicit stack of frames) so that long
/// histories cannot overflow the thread's stack.
fn check_key(key: &str, ops: Vec<Operation>) -> Result<(), Violation> {
    let (completed, pending) = (0..ops.len()).partition(|&i| ops[i].output.is_some());
    let search = Search {
        ops,
        completed,
        pending,
    };
    let nc = search.completed.len();

    // Completed and pending operations linearized so far.
    let mut done = Bitset::new(nc);
    let mut used = Bitset::new(search.pending.len());
    let mut done_count = 0;
    let mut frames = vec![Frame {
        state: None,
        candidates: search.candidates(&done, &used, None),
        tried: 0,
    }];
    // Search states already explored: for each (completed ops linearized,
    // model state), the minimal sets of pending ops linearized. The rest of
    // the search depends only on these three, and a state whose pending set
    // contains an explored one is no better: the extra pending ops, had they
    // stayed unused, could be linearized at the same points (they never
    // bound anything), or left out.
    let mut seen: HashMap<(Bitset, Option<i32>), Vec<Bitset>> = HashMap::new();
    // The longest partial linearization found, for the report.
    let mut longest: (Vec<usize>, Option<i32>) = (Vec::new(), None);

    loop {
        if done_count == nc {
            return Ok(());
        }
        let depth = frames.len() - 1;
        let frame = &mut frames[depth];
        let Some(&c) = frame.candidates.get(frame.tried) else {
            // Dead end: undo the parent's choice so it tries its next one,
            // or give up when there is no parent.
            frames.pop();
            let Some(parent) = frames.last() else {
                return Err(violation(key, &search, longest));
            };
            let last = parent.candidates[parent.tried - 1];
            if last < nc {
                done.remove(last);
                done_count -= 1;
            } else {
                used.remove(last - nc);
            }
            continue;
        };
        frame.tried += 1;
        let next = step(frame.state, search.op(c).input).1;
        if c < nc {
            done.insert(c);
        } else {
            used.insert(c - nc);
        }
        let explored = seen.entry((done.clone(), next)).or_default();
        if explored.iter().any(|p| p.is_subset(&used)) {
            // Explored before, from another order or with fewer pending ops.
            if c < nc {
                done.remove(c);
            } else {
                used.remove(c - nc);
            }
            continue;
        }
        // Sets that contain the new one no longer need keeping.
        explored.retain(|p| !used.is_subset(p));
        explored.push(used.clone());
        if c < nc {
            done_count += 1;
        }
        frames.push(Frame {
            state: next,
            candidates: search.candidates(&done, &used, next),
            tried: 0,
        });
        if frames.len() - 1 > longest.0.len() {
            let path = frames[..=depth]
                .iter()
                .map(|f| f.candidates[f.tried - 1])
                .collect();
            longest = (path, next);
        }
    }
}

/// Builds the report for a key without linearization, given the longest
/// partial linearization found (as choices) and the state it leads to.
fn violation(key: &str, search: &Search, longest: (Vec<usize>, Option<i32>)) -> Violation {
    let (prefix, state) = longest;
    let nc = search.completed.len();
    let prefix: Vec<String> = prefix
        .iter()
        .map(|&c| match c.checked_sub(nc) {
            None => format!("[{}]", search.completed[c]),
            Some(p) => format!("[{}]", search.pending[p]),
        })
        .collect();
    let message = format!(
        "no linearization exists: the search got furthest with the order \
         ({}), leaving the key at {state:?}, and could not extend it",
        prefix.join(" ")
    );
    Violation {
        key: key.to_string(),
        ops: search.ops.clone(),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A completed operation on key "k".
    fn op(client: u64, call: u64, ret: u64, input: Input, output: Output) -> Operation {
        Operation {
            client,
            key: "k".to_string(),
            input,
            output: Some(output),
            call,
            ret,
        }
    }

    /// An operation on key "k" whose client never heard back.
    fn pending(client: u64, call: u64, input: Input) -> Operation {
        Operation {
            client,
            key: "k".to_string(),
            input,
            output: None,
            call,
            ret: 0,
        }
    }

    fn on(key: &str, mut op: Operation) -> Operation {
        op.key = key.to_string();
        op
    }

    fn get(v: Option<i32>) -> Output {
        Output::Value(v)
    }

    #[test]
    fn empty_history_is_linearizable() {
        assert_eq!(check(&[]), Ok(()));
    }

    #[test]
    fn sequential_valid_history() {
        use Input::*;
        let h = [
            op(1, 0, 1, Get, get(None)),
            op(1, 2, 3, Insert(1), Output::Inserted),
            op(2, 4, 5, Insert(2), Output::AlreadyExists),
            op(2, 6, 7, Update(3), Output::Updated { previous: 1 }),
            op(1, 8, 9, Upsert(4), Output::Updated { previous: 3 }),
            op(1, 10, 11, Get, get(Some(4))),
            op(3, 12, 13, Remove, Output::Removed { previous: 4 }),
            op(3, 14, 15, Remove, Output::NotFound),
            op(1, 16, 17, Update(5), Output::NotFound),
            op(2, 18, 19, Upsert(6), Output::Inserted),
            op(3, 20, 21, Get, get(Some(6))),
        ];
        assert_eq!(check(&h), Ok(()));
    }

    #[test]
    fn stale_read_after_completed_write_is_rejected() {
        let h = [
            op(1, 0, 1, Input::Upsert(1), Output::Inserted),
            op(1, 2, 3, Input::Upsert(2), Output::Updated { previous: 1 }),
            op(2, 4, 5, Input::Get, get(Some(1))),
        ];
        let v = check(&h).unwrap_err();
        assert_eq!(v.key, "k");
        assert!(v.to_string().contains("no linearization exists"), "{v}");
    }

    #[test]
    fn equal_times_are_concurrent() {
        // The read is called at the tick the write returns, so it may still
        // be ordered before the write.
        let h = [
            op(1, 0, 5, Input::Upsert(1), Output::Inserted),
            op(2, 5, 6, Input::Get, get(None)),
        ];
        assert_eq!(check(&h), Ok(()));
        // One tick later it may not.
        let h = [
            op(1, 0, 5, Input::Upsert(1), Output::Inserted),
            op(2, 6, 7, Input::Get, get(None)),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn concurrent_writes_and_reads_consistent_with_one_order() {
        // Writes of 1 and 2 overlap; the readers agree that 2 came last,
        // and one of them saw 1 in between.
        let h = [
            op(1, 0, 10, Input::Upsert(1), Output::Updated { previous: 2 }),
            op(2, 0, 10, Input::Upsert(2), Output::Inserted),
            op(3, 1, 2, Input::Get, get(Some(2))),
            op(3, 3, 12, Input::Get, get(Some(1))),
            op(4, 11, 12, Input::Get, get(Some(1))),
            op(4, 13, 14, Input::Get, get(Some(1))),
        ];
        assert_eq!(check(&h), Ok(()));
    }

    #[test]
    fn readers_agreeing_on_order_of_concurrent_writes_are_accepted() {
        let h = [
            op(1, 0, 100, Input::Upsert(1), Output::Inserted),
            op(2, 0, 100, Input::Upsert(2), Output::Updated { previous: 1 }),
            op(3, 10, 20, Input::Get, get(Some(1))),
            op(3, 30, 40, Input::Get, get(Some(2))),
            op(4, 50, 60, Input::Get, get(Some(2))),
        ];
        assert_eq!(check(&h), Ok(()));
    }

    #[test]
    fn readers_seeing_concurrent_writes_in_contradictory_orders_are_rejected() {
        // Reader 3 sees 1 then 2, so write 1 precedes write 2; reader 4, which
        // runs after reader 3, sees 2 then 1. Each write happens once.
        // Upsert outputs are left pending so only the reads constrain order.
        let h = [
            pending(1, 0, Input::Upsert(1)),
            pending(2, 0, Input::Upsert(2)),
            op(3, 10, 20, Input::Get, get(Some(1))),
            op(3, 30, 40, Input::Get, get(Some(2))),
            op(4, 50, 60, Input::Get, get(Some(2))),
            op(4, 70, 80, Input::Get, get(Some(1))),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn two_successful_inserts_without_remove_are_rejected() {
        let h = [
            op(1, 0, 1, Input::Insert(1), Output::Inserted),
            op(2, 2, 3, Input::Insert(2), Output::Inserted),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn concurrent_inserts_one_wins() {
        let h = [
            op(1, 0, 10, Input::Insert(1), Output::AlreadyExists),
            op(2, 1, 9, Input::Insert(2), Output::Inserted),
            op(3, 11, 12, Input::Get, get(Some(2))),
        ];
        assert_eq!(check(&h), Ok(()));
    }

    #[test]
    fn pending_write_observed_later_is_accepted() {
        let h = [
            op(1, 0, 1, Input::Insert(1), Output::Inserted),
            pending(2, 2, Input::Update(7)),
            op(3, 50, 51, Input::Get, get(Some(7))),
            op(3, 52, 53, Input::Remove, Output::Removed { previous: 7 }),
        ];
        assert_eq!(check(&h), Ok(()));
    }

    #[test]
    fn pending_write_never_observed_is_accepted() {
        let h = [
            op(1, 0, 1, Input::Insert(1), Output::Inserted),
            pending(2, 2, Input::Update(7)),
            op(3, 50, 51, Input::Get, get(Some(1))),
            op(3, 52, 53, Input::Get, get(Some(1))),
        ];
        assert_eq!(check(&h), Ok(()));
    }

    #[test]
    fn pending_write_cannot_take_effect_before_its_call() {
        let h = [
            op(1, 0, 1, Input::Get, get(Some(7))),
            pending(2, 2, Input::Upsert(7)),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn read_of_unwritten_value_is_rejected() {
        let h = [
            op(1, 0, 10, Input::Upsert(1), Output::Inserted),
            op(2, 0, 10, Input::Get, get(Some(3))),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn wrong_previous_in_updated_is_rejected() {
        let h = [
            op(1, 0, 1, Input::Insert(1), Output::Inserted),
            op(1, 2, 3, Input::Update(2), Output::Updated { previous: 5 }),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn an_upsert_that_replaced_agrees_with_any_previous_value_but_not_with_absence() {
        let h = [
            op(1, 0, 1, Input::Insert(1), Output::Inserted),
            op(2, 2, 3, Input::Upsert(2), Output::Replaced),
            op(1, 4, 5, Input::Get, get(Some(2))),
        ];
        assert_eq!(check(&h), Ok(()));
        // Nothing was there to replace.
        let h = [
            op(1, 0, 1, Input::Get, get(None)),
            op(2, 2, 3, Input::Upsert(2), Output::Replaced),
        ];
        assert!(check(&h).is_err());
        assert!(Output::Replaced.agrees(Output::Updated { previous: 9 }));
        assert!(!Output::Replaced.agrees(Output::Inserted));
        assert!(!Output::Updated { previous: 1 }.agrees(Output::Updated { previous: 2 }));
    }

    #[test]
    fn keys_are_checked_independently() {
        // Each key alone is fine in "a"; "b" reads a value only "a" holds.
        let h = [
            on("a", op(1, 0, 1, Input::Insert(1), Output::Inserted)),
            on("b", op(2, 0, 1, Input::Insert(2), Output::Inserted)),
            on("a", op(1, 2, 3, Input::Get, get(Some(1)))),
            on("b", op(2, 2, 3, Input::Get, get(Some(1)))),
        ];
        let v = check(&h).unwrap_err();
        assert_eq!(v.key, "b");
        assert_eq!(v.ops.len(), 2);
        assert!(v.ops.iter().all(|op| op.key == "b"));
        let text = v.to_string();
        assert!(text.contains("key \"b\""), "{text}");
        assert!(text.contains("no linearization exists"), "{text}");
    }

    /// SplitMix64: a small deterministic PRNG, enough for test generation.
    struct Rng(u64);

    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        /// Uniform-ish in `lo..=hi`.
        fn range(&mut self, lo: u64, hi: u64) -> u64 {
            lo + self.next_u64() % (hi - lo + 1)
        }
    }

    /// Generates a linearizable history: each op takes effect atomically at
    /// its own linearization point (multiples of 10, in generation order) on
    /// a model map, and its interval is stretched randomly around that point
    /// without overlapping its client's neighbouring ops. About one op in
    /// `pending_one_in` is left pending, and then its client stops; a pending
    /// op may or may not have taken effect.
    fn random_history(
        seed: u64,
        clients: usize,
        keys: usize,
        len: usize,
        pending_one_in: u64,
    ) -> Vec<Operation> {
        let mut rng = Rng(seed);
        let mut model: BTreeMap<String, Option<i32>> = BTreeMap::new();
        // Per client slot: its ops (as indices into `history`), plus the
        // client id currently in that slot (replaced when one stops).
        let mut slots: Vec<(u64, Vec<usize>)> = (0..clients as u64).map(|c| (c, vec![])).collect();
        let mut next_client = clients as u64;
        let mut history: Vec<Operation> = Vec::new();
        for n in 0..len {
            let lp = 10 * (n as u64 + 1);
            let slot = rng.range(0, clients as u64 - 1) as usize;
            let key = format!("k{}", rng.range(0, keys as u64 - 1));
            // Few values, so that they repeat and reads are ambiguous.
            let v = rng.range(0, 4) as i32;
            let input = match rng.range(0, 5) {
                0 | 1 => Input::Get,
                2 => Input::Insert(v),
                3 => Input::Update(v),
                4 => Input::Upsert(v),
                _ => Input::Remove,
            };
            let state = model.entry(key.clone()).or_default();
            let is_pending = rng.range(1, pending_one_in) == 1;
            let takes_effect = !is_pending || rng.range(0, 1) == 0;
            let (output, next) = step(*state, input);
            if takes_effect {
                *state = next;
            }
            history.push(Operation {
                client: slots[slot].0,
                key,
                input,
                output: (!is_pending).then_some(output),
                // [lp, lp] for now; `stretch` widens it around lp.
                call: lp,
                ret: lp,
            });
            slots[slot].1.push(n);
            if is_pending {
                // The client is gone; a fresh one takes its slot.
                let (_, ops) = std::mem::replace(&mut slots[slot], (next_client, vec![]));
                next_client += 1;
                stretch(&mut rng, &mut history, &ops);
            }
        }
        for (_, ops) in &slots {
            stretch(&mut rng, &mut history, ops);
        }
        history
    }

    /// Widens the intervals of one client's consecutive ops, each of which
    /// starts as [lp, lp], keeping them inside the gaps between neighbours so
    /// the client never has two ops outstanding.
    fn stretch(rng: &mut Rng, history: &mut [Operation], ops: &[usize]) {
        let mut prev_ret = 0;
        for (k, &i) in ops.iter().enumerate() {
            let lp = history[i].call;
            let next_lp = ops.get(k + 1).map(|&j| history[j].call);
            history[i].call = rng.range(prev_ret + 1, lp);
            let ret = match next_lp {
                Some(next) => rng.range(lp, next - 1),
                None => rng.range(lp, lp + 100),
            };
            history[i].ret = ret;
            prev_ret = ret;
        }
    }

    #[test]
    fn random_linearizable_histories_are_accepted() {
        for seed in 0..200 {
            let h = random_history(seed, 6, 3, 300, 20);
            if let Err(v) = check(&h) {
                panic!("seed {seed}: {v}");
            }
        }
    }

    #[test]
    fn random_single_key_high_concurrency_histories_are_accepted() {
        for seed in 0..50 {
            let h = random_history(1000 + seed, 10, 1, 400, 100);
            if let Err(v) = check(&h) {
                panic!("seed {seed}: {v}");
            }
        }
    }

    /// Replaces the output of one completed Get, picked by `seed`, with a
    /// value never written (generated values are 0..=4); returns its key.
    fn corrupt_a_read(h: &mut [Operation], seed: u64) -> String {
        let gets: Vec<usize> = (0..h.len())
            .filter(|&i| h[i].input == Input::Get && h[i].output.is_some())
            .collect();
        let mut rng = Rng(seed ^ 0xdead_beef);
        let i = gets[rng.range(0, gets.len() as u64 - 1) as usize];
        h[i].output = Some(Output::Value(Some(99)));
        h[i].key.clone()
    }

    #[test]
    fn random_histories_with_a_corrupted_read_are_rejected() {
        for seed in 0..200 {
            let mut h = random_history(seed, 6, 3, 300, 20);
            let key = corrupt_a_read(&mut h, seed);
            let v = check(&h).expect_err("corrupted history accepted");
            assert_eq!(v.key, key, "seed {seed}");
        }
    }

    #[test]
    fn random_single_key_histories_with_a_corrupted_read_are_rejected() {
        for seed in 0..50 {
            let mut h = random_history(1000 + seed, 10, 1, 400, 100);
            corrupt_a_read(&mut h, seed);
            assert!(
                check(&h).is_err(),
                "seed {seed}: corrupted history accepted"
            );
        }
    }

    /// Reference checker: tries every order of every subset of pending ops
    /// on the whole history with a map model, without pruning, memo or
    /// partitioning by key. Exponential; tiny histories only.
    fn brute_force(
        h: &[Operation],
        linearized: &mut [bool],
        model: &mut BTreeMap<String, Option<i32>>,
    ) -> bool {
        let all_done = (0..h.len()).all(|i| linearized[i] || h[i].output.is_none());
        if all_done {
            return true;
        }
        for i in 0..h.len() {
            // Not yet linearized, and no other such op returned before i's call.
            let blocked = (0..h.len())
                .any(|j| !linearized[j] && h[j].output.is_some() && h[j].ret < h[i].call);
            if linearized[i] || blocked {
                continue;
            }
            let before = model.get(&h[i].key).copied().flatten();
            let (output, next) = step(before, h[i].input);
            if h[i].output.is_some_and(|o| !o.agrees(output)) {
                continue;
            }
            linearized[i] = true;
            model.insert(h[i].key.clone(), next);
            let found = brute_force(h, linearized, model);
            model.insert(h[i].key.clone(), before);
            linearized[i] = false;
            if found {
                return true;
            }
        }
        false
    }

    /// A tiny random history with plausible but arbitrary outputs, so that
    /// about half are linearizable.
    fn tiny_random_history(rng: &mut Rng) -> Vec<Operation> {
        let n = rng.range(1, 7);
        let value = |rng: &mut Rng| rng.range(0, 2) as i32;
        (0..n)
            .map(|i| {
                let v = value(rng);
                let (input, output) = match rng.range(0, 4) {
                    0 => (
                        Input::Get,
                        [Output::Value(None), Output::Value(Some(value(rng)))],
                    ),
                    1 => (Input::Insert(v), [Output::Inserted, Output::AlreadyExists]),
                    2 => {
                        let previous = value(rng);
                        (
                            Input::Update(v),
                            [Output::Updated { previous }, Output::NotFound],
                        )
                    }
                    3 => {
                        let previous = value(rng);
                        // As the simulator sees it, or as a real client.
                        let updated = if rng.range(0, 1) == 0 {
                            Output::Updated { previous }
                        } else {
                            Output::Replaced
                        };
                        (Input::Upsert(v), [Output::Inserted, updated])
                    }
                    _ => {
                        let previous = value(rng);
                        (
                            Input::Remove,
                            [Output::Removed { previous }, Output::NotFound],
                        )
                    }
                };
                let output = output[rng.range(0, 1) as usize];
                let call = rng.range(0, 10);
                Operation {
                    client: i,
                    key: ["a", "b"][rng.range(0, 1) as usize].to_string(),
                    input,
                    output: (rng.range(0, 4) != 0).then_some(output),
                    call,
                    ret: call + rng.range(0, 5),
                }
            })
            .collect()
    }

    #[test]
    fn agrees_with_brute_force_on_tiny_random_histories() {
        let mut rng = Rng(7);
        let (mut accepted, mut rejected) = (0, 0);
        for case in 0..20_000 {
            let h = tiny_random_history(&mut rng);
            let expected = brute_force(&h, &mut vec![false; h.len()], &mut BTreeMap::new());
            let got = check(&h);
            assert_eq!(got.is_ok(), expected, "case {case}: {h:#?}\n{got:?}");
            if expected {
                accepted += 1;
            } else {
                rejected += 1;
            }
        }
        // Both outcomes must be well represented for the comparison to mean much.
        assert!(
            accepted > 2_000 && rejected > 2_000,
            "{accepted} accepted, {rejected} rejected"
        );
    }
}
