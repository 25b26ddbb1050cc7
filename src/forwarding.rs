//! A follower's forwarding link to the leader: the client calls it cannot
//! serve travel to the leader in batches over one long-lived stream, and
//! come back matched to their callers.
//!
//! Sans-IO, like the driver: the service runs a [`Link`] over a gRPC
//! stream (`paxoskv.v1.Paxos/Forwarding`), the simulator over its network.
//! Both ask it the one thing a client's answer depends on when the stream
//! breaks: whether each open call had been sent ([`Lost::InFlight`]: the
//! leader may have put it in the log) or not ([`Lost::Unsent`]: it
//! certainly is not there).
//!
//! The link also keeps one caller's cancellation from touching another's
//! call: a caller that goes away is forgotten here and, if its call was
//! sent, named in the next batch so the leader stops working on it; the
//! stream and every other call on it carry on.

use std::collections::{HashMap, VecDeque};

/// Calls in one batch at most: a batch is one gRPC message, and a key is at
/// most 1 KiB, so this keeps a batch far below the peer port's message
/// bound.
pub const MAX_BATCH: usize = 512;

/// Calls a link holds at most, queued and sent together, before it
/// refuses more (as the driver's [`crate::driver::Limits`] do).
pub const DEFAULT_LIMIT: usize = 4096;

/// How an open call ended when its link broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lost {
    /// It never left this replica: it is not in the log.
    Unsent,
    /// It was sent: the leader may have proposed it.
    InFlight,
}

impl Lost {
    /// Whether this proves the call is not in the log (see
    /// [`crate::driver::CallError::proves_not_in_log`]).
    pub fn proves_not_in_log(self) -> bool {
        self == Lost::Unsent
    }
}

/// A call refused because the link is full: `limit` calls already wait on
/// it. Its caller comes back, to be told.
#[derive(Debug, PartialEq, Eq)]
pub struct Full<C> {
    /// The link's bound.
    pub limit: usize,
    /// Who asked.
    pub caller: C,
}

/// What goes to the leader in one message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch<R> {
    /// New calls, by id, in the order they were submitted.
    pub calls: Vec<(u64, R)>,
    /// Calls sent before whose callers have gone: the leader may drop them.
    pub cancelled: Vec<u64>,
}

/// One open call.
struct Open<C> {
    caller: C,
    sent: bool,
}

/// The forwarding link to one leader. `C` is whoever waits for an answer,
/// `R` the call as it travels.
pub struct Link<C, R> {
    next_id: u64,
    limit: usize,
    /// Every open call, queued or sent, by id.
    open: HashMap<u64, Open<C>>,
    /// Calls not yet sent, oldest first. Ids no longer in `open` (their
    /// callers went away) are skipped when a batch is taken.
    queued: VecDeque<(u64, R)>,
    /// Sent calls whose callers went away, for the next batch.
    cancelled: Vec<u64>,
    /// Open calls not yet sent (the live entries of `queued`).
    unsent: usize,
}

impl<C, R> Link<C, R> {
    /// An empty link holding at most `limit` calls.
    pub fn new(limit: usize) -> Self {
        assert!(limit > 0, "a link must take at least one call");
        Link {
            next_id: 1,
            limit,
            open: HashMap::new(),
            queued: VecDeque::new(),
            cancelled: Vec::new(),
            unsent: 0,
        }
    }

    /// Open calls, queued and sent.
    pub fn len(&self) -> usize {
        self.open.len()
    }

    /// No call is open.
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// Whether a batch is ready to go.
    pub fn has_batch(&self) -> bool {
        self.unsent > 0 || !self.cancelled.is_empty()
    }

    /// Queues `request` for the leader on behalf of `caller`, and returns
    /// its id; refused, before anything is sent, if the link is full.
    pub fn submit(&mut self, caller: C, request: R) -> Result<u64, Full<C>> {
        if self.open.len() >= self.limit {
            return Err(Full {
                limit: self.limit,
                caller,
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        self.open.insert(
            id,
            Open {
                caller,
                sent: false,
            },
        );
        self.queued.push_back((id, request));
        self.unsent += 1;
        Ok(id)
    }

    /// The caller of call `id` went away: forget it, and if the call was
    /// sent, tell the leader in the next batch. Returns whether it was
    /// open.
    pub fn cancel(&mut self, id: u64) -> bool {
        match self.open.remove(&id) {
            Some(call) => {
                if call.sent {
                    self.cancelled.push(id);
                } else {
                    self.unsent -= 1;
                }
                true
            }
            None => false,
        }
    }

    /// Cancels every open call whose caller `keep` says has gone.
    pub fn retain(&mut self, keep: impl Fn(&C) -> bool) {
        let gone: Vec<u64> = self
            .open
            .iter()
            .filter(|(_, call)| !keep(&call.caller))
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.cancel(id);
        }
    }

    /// The next message for the leader (at most [`MAX_BATCH`] calls, every
    /// cancellation), if there is anything to say; its calls count as sent
    /// from now on.
    pub fn take_batch(&mut self) -> Option<Batch<R>> {
        let mut calls = Vec::new();
        while calls.len() < MAX_BATCH {
            let Some((id, request)) = self.queued.pop_front() else {
                break;
            };
            if let Some(call) = self.open.get_mut(&id) {
                debug_assert!(!call.sent, "a queued call was sent already");
                call.sent = true;
                self.unsent -= 1;
                calls.push((id, request));
            }
        }
        let cancelled = std::mem::take(&mut self.cancelled);
        debug_assert!(
            self.unsent == 0 || calls.len() == MAX_BATCH,
            "calls left behind in a batch with room"
        );
        if calls.is_empty() && cancelled.is_empty() {
            return None;
        }
        Some(Batch { calls, cancelled })
    }

    /// The leader answered call `id`: its caller, if it still waits. An
    /// answer for a call that was never sent, or answered already, is
    /// ignored (it comes from the network).
    pub fn answered(&mut self, id: u64) -> Option<C> {
        match self.open.get(&id) {
            Some(call) if call.sent => self.open.remove(&id).map(|call| call.caller),
            _ => None,
        }
    }

    /// The stream broke: every open call ends, each with whether it had
    /// been sent. The link is empty afterwards, ready for a new stream.
    pub fn broken(&mut self) -> Vec<(C, Lost)> {
        self.queued.clear();
        self.cancelled.clear();
        self.unsent = 0;
        let mut lost: Vec<(u64, C, Lost)> = self
            .open
            .drain()
            .map(|(id, call)| {
                let how = if call.sent {
                    Lost::InFlight
                } else {
                    Lost::Unsent
                };
                (id, call.caller, how)
            })
            .collect();
        // In submission order: deterministic, for the simulator.
        lost.sort_by_key(|&(id, _, _)| id);
        debug_assert!(self.is_empty() && !self.has_batch());
        lost.into_iter().map(|(_, c, how)| (c, how)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_go_in_batches_in_order_and_answers_find_their_callers() {
        let mut link = Link::new(10);
        let a = link.submit("a", 1).unwrap();
        let b = link.submit("b", 2).unwrap();
        assert!(link.has_batch());
        let batch = link.take_batch().unwrap();
        assert_eq!(batch.calls, vec![(a, 1), (b, 2)]);
        assert!(batch.cancelled.is_empty());
        assert!(link.take_batch().is_none(), "nothing new to send");
        assert_eq!(link.answered(b), Some("b"));
        assert_eq!(link.answered(b), None, "answered once");
        assert_eq!(link.answered(a), Some("a"));
        assert!(link.is_empty());
    }

    #[test]
    fn a_batch_holds_at_most_max_batch_calls() {
        let mut link = Link::new(MAX_BATCH + 1);
        for i in 0..=MAX_BATCH {
            link.submit(i, i).unwrap();
        }
        assert_eq!(link.take_batch().unwrap().calls.len(), MAX_BATCH);
        assert_eq!(link.take_batch().unwrap().calls.len(), 1);
    }

    #[test]
    fn a_full_link_refuses_before_sending_anything() {
        let mut link = Link::new(2);
        link.submit("a", 1).unwrap();
        link.submit("b", 2).unwrap();
        assert_eq!(
            link.submit("c", 3),
            Err(Full {
                limit: 2,
                caller: "c"
            })
        );
        let batch = link.take_batch().unwrap();
        assert_eq!(batch.calls.len(), 2, "the refused call is not queued");
        // Answers make room again.
        link.answered(batch.calls[0].0);
        assert!(link.submit("c", 3).is_ok());
    }

    #[test]
    fn an_unsent_call_of_a_gone_caller_is_never_sent_nor_named() {
        let mut link = Link::new(10);
        let a = link.submit("a", 1).unwrap();
        let b = link.submit("b", 2).unwrap();
        assert!(link.cancel(a));
        let batch = link.take_batch().unwrap();
        assert_eq!(batch.calls, vec![(b, 2)]);
        assert!(batch.cancelled.is_empty(), "the leader never heard of it");
        assert!(!link.cancel(a), "cancelled once");
    }

    #[test]
    fn a_sent_call_of_a_gone_caller_is_named_to_the_leader_and_others_carry_on() {
        let mut link = Link::new(10);
        let a = link.submit("a", 1).unwrap();
        let b = link.submit("b", 2).unwrap();
        link.take_batch().unwrap();
        link.retain(|&c| c != "a");
        let batch = link.take_batch().unwrap();
        assert!(batch.calls.is_empty());
        assert_eq!(batch.cancelled, vec![a]);
        assert_eq!(link.answered(a), None, "its late answer finds nobody");
        assert_eq!(link.answered(b), Some("b"), "the other call is untouched");
    }

    #[test]
    fn a_broken_link_says_which_calls_were_sent() {
        let mut link = Link::new(10);
        let a = link.submit("a", 1).unwrap();
        link.take_batch().unwrap();
        link.submit("b", 2).unwrap();
        let gone = link.submit("c", 3).unwrap();
        link.cancel(gone);
        assert_eq!(
            link.broken(),
            vec![("a", Lost::InFlight), ("b", Lost::Unsent)]
        );
        assert!(Lost::Unsent.proves_not_in_log() && !Lost::InFlight.proves_not_in_log());
        // Nothing from the old stream survives into the new one.
        assert!(link.take_batch().is_none());
        assert_eq!(link.answered(a), None);
        let c = link.submit("d", 4).unwrap();
        assert!(c > a, "ids are never reused");
    }

    #[test]
    fn an_answer_for_a_call_never_sent_is_ignored() {
        let mut link = Link::new(10);
        let a = link.submit("a", 1).unwrap();
        assert_eq!(link.answered(a), None, "not sent yet: a forged answer");
        assert_eq!(link.answered(999), None);
        assert_eq!(link.take_batch().unwrap().calls, vec![(a, 1)]);
    }
}
