//! Which peer messages a replica hears at all: every rule that refuses one,
//! in one place, each with its test below.
//!
//! [`Replica::step`] runs [`Replica::admit`] before anything else, and a
//! refused message changes nothing: no promise, no vote, no reply, no timer.
//! Each rule refuses only what no honest member sends, so a refusal is
//! always worth a (rate-limited) WARN: a bug, a corrupt message, another
//! version, or someone who is not a member writing to the Paxos port.
//!
//! | rule | refuses |
//! |---|---|
//! | [`Refused::FromSelf`] | a message claiming to come from this replica |
//! | [`Refused::NotMember`] | a sender not in the configuration |
//! | [`Refused::NotSendersBallot`] | a pre-vote, prepare, accept, heartbeat, catch-up, `TimeoutNow` or snapshot notice under a ballot that is not the sender's (a snapshot notice may also name ours) |
//! | [`Refused::NotOurBallot`] | an answer (pre-vote reply, promise, accepted, heartbeat ack, catch-up request) for a ballot that is not ours |
//! | [`Refused::BallotOutOfRange`] | a ballot of round 0, of round `u64::MAX`, or more than [`Ballot::MAX_ROUND_JUMP`] above the highest round seen |
//! | [`Refused::VoteAboveBallot`] | a promise reporting a vote under a ballot above the one promised (or of round 0) |
//! | [`Refused::SlotOutOfRange`] | a slot of 0 or `u64::MAX` where a slot is voted on, learned or compacted |
//! | [`Refused::BeyondWindow`] | an accept for a slot not above its own commit index, or more than [`Config::MAX_WINDOW`] above it |
//! | [`Refused::PromiseOutOfRange`] | a promise chunk with votes outside the slots it covers, or not in slot order |
//! | [`Refused::CatchUpOutOfRange`] | a catch-up with entries that are not consecutive and chosen (at or below its commit index), or that says fewer slots were proposed than committed |
//! | [`Refused::ConflictingValue`] | an accept or catch-up giving a slot another value under the very ballot this replica already voted for there |
//! | [`Refused::ReadRoundAhead`] | a heartbeat ack for a read round this leader has not announced |
//! | [`Refused::BadCommand`] | a value holding a client command the driver's check refuses (one the state machine could not apply) |
//!
//! # What these rules cannot catch
//!
//! Each rule checks a message against itself and against what this replica
//! knows. A sender that can claim a member's id and tells *consistent*
//! lies is not caught here: an accept under the current leader's ballot
//! with a false value, or a slot far ahead with a commit index just below
//! it, looks exactly like the leader's own. Keeping such senders out is
//! the transport's job: the peer port, mutual TLS with one certificate per
//! replica id, and every message's `from` held to its stream's replica
//! (`src/handshake.rs`). What the rules do guarantee is that no input, however
//! malformed, panics the core, wraps an integer, or makes a replica promise,
//! vote or learn something no honest member could have sent it.
//!
//! # The window rule
//!
//! A follower that lags, or was away, legitimately receives accepts far
//! beyond its own commit index, so the bound cannot come from its own
//! state. It comes from the message: a leader proposes slot `s` only while
//! `s <= commit + window` for its own commit index `commit` (recovered slots
//! too: see `leader.rs`), and every accept carries the leader's commit index
//! at the time it is sent, which never goes down. So an honest accept has
//! `commit < slot <= commit + window`. The bound used is
//! [`Config::MAX_WINDOW`], the largest window any replica may be configured
//! with, not this replica's own `window`: replicas configured differently
//! still hear each other.

use std::fmt;

use super::{Replica, State};
use crate::paxos::ballot::{Ballot, NodeId, Slot};
use crate::paxos::config::Config;
use crate::paxos::message::{Message, Value};

/// Why [`Replica::step`] refused a message. A refused message changes
/// nothing: no promise, no vote, no reply. Honest members never cause one,
/// so the driver may log each (rate-limited). See the module docs for the
/// rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The claimed sender is not a member of the configuration: only
    /// members vote, and only their messages are heard.
    NotMember(NodeId),
    /// The message claims to come from this replica itself. Its own
    /// messages come back through [`Replica::step_own`], never from the
    /// network.
    FromSelf,
    /// A pre-vote, prepare, accept, heartbeat, catch-up, `TimeoutNow` or
    /// snapshot notice speaks for `ballot`, which is not the sender's own (nor, for a
    /// snapshot notice, ours): a replica only proposes under ballots that
    /// carry its id.
    NotSendersBallot { from: NodeId, ballot: Ballot },
    /// An answer to one of our proposals (a pre-vote reply, promise,
    /// accepted, heartbeat ack or catch-up request) names `ballot`, which is
    /// not ours: every one of them answers a message we sent under our own.
    NotOurBallot { ballot: Ballot },
    /// The message's ballot round is 0 (no replica proposes under it), more
    /// than [`Ballot::MAX_ROUND_JUMP`] above `highest`, the highest round
    /// this replica has seen or promised, or `u64::MAX`, which leaves no
    /// round above it.
    BallotOutOfRange { ballot: Ballot, highest: u64 },
    /// A promise for `ballot` reports, for `slot`, a vote under `vote`,
    /// which is above `ballot` or of round 0: an acceptor never votes above
    /// its promise, and promises only above (or at) it.
    VoteAboveBallot {
        slot: Slot,
        vote: Ballot,
        ballot: Ballot,
    },
    /// A slot the message carries, to be voted on, learned or compacted, is
    /// 0 (slots start at 1) or `u64::MAX` (it leaves no slot after it).
    SlotOutOfRange { slot: Slot },
    /// An accept for `slot` carries the commit index `commit`, and `slot`
    /// is not above it, or more than [`Config::MAX_WINDOW`] above it.
    BeyondWindow { slot: Slot, commit: Slot },
    /// A chunk of a promise holds a vote outside the slots it says it
    /// covers, covers none, or lists its votes out of slot order.
    PromiseOutOfRange {
        from_slot: Slot,
        to_slot: Option<Slot>,
    },
    /// A catch-up holds `slot`, which is not the next after the entry
    /// before it, or not at or below the catch-up's commit index `commit`;
    /// or (with `slot` the highest proposed) says fewer slots were proposed
    /// than committed.
    CatchUpOutOfRange { slot: Slot, commit: Slot },
    /// An accept or catch-up under `ballot` gives `slot` a value other
    /// than the one this replica voted for there under that same ballot: a
    /// leader proposes one value per slot, so one of the two is not its.
    ConflictingValue { slot: Slot, ballot: Ballot },
    /// A heartbeat ack echoes read round `round`, above `announced`, the
    /// last one this leader announced.
    ReadRoundAhead { round: u64, announced: u64 },
    /// A value holds a client command that the driver's check (see
    /// [`Replica::check_commands_with`]) refuses; `slot` is where.
    BadCommand { slot: Slot },
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refused::NotMember(id) => write!(f, "sender {id} is not a member"),
            Refused::FromSelf => f.write_str("sender claims to be this replica"),
            Refused::NotSendersBallot { from, ballot } => {
                write!(f, "replica {from} speaks for ballot {ballot}, not its own")
            }
            Refused::NotOurBallot { ballot } => {
                write!(f, "an answer for ballot {ballot}, which is not ours")
            }
            Refused::BallotOutOfRange { ballot, highest } => write!(
                f,
                "ballot {ballot} is out of range: the highest round seen is {highest}"
            ),
            Refused::VoteAboveBallot { slot, vote, ballot } => write!(
                f,
                "a promise of ballot {ballot} reports a vote under {vote} for slot {slot}"
            ),
            Refused::SlotOutOfRange { slot } => write!(f, "slot {slot} is out of range"),
            Refused::BeyondWindow { slot, commit } => write!(
                f,
                "an accept for slot {slot} with commit index {commit} is outside the window \
                 of {} slots above it",
                Config::MAX_WINDOW
            ),
            Refused::PromiseOutOfRange { from_slot, to_slot } => write!(
                f,
                "a promise chunk for slots {from_slot}..={to_slot:?} holds other slots, \
                 or holds them out of order"
            ),
            Refused::CatchUpOutOfRange { slot, commit } => write!(
                f,
                "a catch-up with commit index {commit} holds slot {slot}, which is not \
                 the next chosen one"
            ),
            Refused::ConflictingValue { slot, ballot } => write!(
                f,
                "another value for slot {slot} under ballot {ballot}, for which this \
                 replica voted a different one"
            ),
            Refused::ReadRoundAhead { round, announced } => write!(
                f,
                "a heartbeat ack for read round {round}; the last one announced is {announced}"
            ),
            Refused::BadCommand { slot } => write!(
                f,
                "the value for slot {slot} holds a client command that does not decode \
                 or is not valid"
            ),
        }
    }
}

impl std::error::Error for Refused {}

/// Whether `slot` may be voted on, learned or compacted: slots run from 1
/// to `u64::MAX - 1`, so that `slot + 1` never overflows anywhere.
fn slot_in_range(slot: Slot) -> bool {
    slot != 0 && slot != u64::MAX
}

impl Replica {
    /// Whether a message claimed to be from `from` may be heard at all: the
    /// rules of the module docs, in the order of its table.
    pub(super) fn admit(&self, from: NodeId, msg: &Message) -> Result<(), Refused> {
        let id = self.core.cfg.id;
        if from == id {
            return Err(Refused::FromSelf);
        }
        if !self.core.cfg.members.contains(&from) {
            return Err(Refused::NotMember(from));
        }
        match msg {
            Message::PreVote { ballot }
            | Message::Prepare { ballot, .. }
            | Message::Accept { ballot, .. }
            | Message::Heartbeat { ballot, .. }
            | Message::CatchUp { ballot, .. }
            | Message::TimeoutNow { ballot }
                if ballot.node != from =>
            {
                return Err(Refused::NotSendersBallot {
                    from,
                    ballot: *ballot,
                });
            }
            // From the leader of `ballot`, or from an acceptor to us, its
            // leader.
            Message::SnapshotAvailable { ballot, .. }
                if ballot.node != from && ballot.node != id =>
            {
                return Err(Refused::NotSendersBallot {
                    from,
                    ballot: *ballot,
                });
            }
            Message::PreVoteReply { ballot, .. }
            | Message::Promise { ballot, .. }
            | Message::Accepted { ballot, .. }
            | Message::HeartbeatAck { ballot, .. }
            | Message::CatchUpRequest { ballot, .. }
                if ballot.node != id =>
            {
                return Err(Refused::NotOurBallot { ballot: *ballot });
            }
            _ => {}
        }
        let highest = self.core.highest_round();
        if let Some(ballot) = msg.ballot()
            && !ballot.in_range(highest)
        {
            return Err(Refused::BallotOutOfRange { ballot, highest });
        }
        if let Message::Promise {
            ballot, accepted, ..
        } = msg
            && let Some(a) = accepted
                .iter()
                .find(|a| a.ballot > *ballot || a.ballot.round == 0)
        {
            return Err(Refused::VoteAboveBallot {
                slot: a.slot,
                vote: a.ballot,
                ballot: *ballot,
            });
        }
        if let Some(slot) = bad_slot(msg) {
            return Err(Refused::SlotOutOfRange { slot });
        }
        if let Message::Accept { slot, commit, .. } = msg
            && (slot <= commit || slot - commit > Config::MAX_WINDOW as u64)
        {
            return Err(Refused::BeyondWindow {
                slot: *slot,
                commit: *commit,
            });
        }
        if let Message::Promise {
            from_slot,
            to_slot,
            accepted,
            ..
        } = msg
        {
            let last = to_slot.unwrap_or(Slot::MAX);
            let in_order = accepted.windows(2).all(|w| w[0].slot < w[1].slot);
            let inside = accepted
                .iter()
                .all(|a| (*from_slot..=last).contains(&a.slot));
            if last < *from_slot || !in_order || !inside {
                return Err(Refused::PromiseOutOfRange {
                    from_slot: *from_slot,
                    to_slot: *to_slot,
                });
            }
        }
        if let Message::CatchUp {
            entries,
            commit,
            proposed,
            ..
        } = msg
        {
            let commit = *commit;
            let mut previous: Option<Slot> = None;
            for &(slot, _) in entries {
                if slot > commit || previous.is_some_and(|p| p.checked_add(1) != Some(slot)) {
                    return Err(Refused::CatchUpOutOfRange { slot, commit });
                }
                previous = Some(slot);
            }
            if *proposed < commit {
                return Err(Refused::CatchUpOutOfRange {
                    slot: *proposed,
                    commit,
                });
            }
        }
        if let Some(slot) = self.conflicting_value(msg) {
            return Err(Refused::ConflictingValue {
                slot,
                ballot: msg.ballot().unwrap_or_default(),
            });
        }
        if let (
            Message::HeartbeatAck {
                ballot, read_round, ..
            },
            State::Leader(l),
        ) = (msg, &self.state)
            && l.ballot == *ballot
            && *read_round > l.read_round
        {
            return Err(Refused::ReadRoundAhead {
                round: *read_round,
                announced: l.read_round,
            });
        }
        if let Some(slot) = self.bad_command(msg) {
            return Err(Refused::BadCommand { slot });
        }
        Ok(())
    }

    /// The first slot to which an accept or catch-up gives another value
    /// than our vote there under the same ballot.
    fn conflicting_value(&self, msg: &Message) -> Option<Slot> {
        let conflicts = |ballot: Ballot, slot: Slot, value: &Value| {
            self.core
                .acceptor
                .vote(slot)
                .is_some_and(|(b, v)| b == ballot && v != value)
        };
        match msg {
            Message::Accept {
                ballot,
                slot,
                value,
                ..
            } => Some(*slot).filter(|&s| conflicts(*ballot, s, value)),
            Message::CatchUp {
                ballot, entries, ..
            } => entries
                .iter()
                .find(|(s, v)| conflicts(*ballot, *s, v))
                .map(|(s, _)| *s),
            _ => None,
        }
    }

    /// The slot of the first value in `msg` holding a client command the
    /// driver's check refuses.
    fn bad_command(&self, msg: &Message) -> Option<Slot> {
        let ok = self.core.command_check;
        let bad = |value: &Value| match value {
            Value::Noop => false,
            Value::Batch(commands) => commands.iter().any(|c| !ok(c)),
        };
        match msg {
            Message::Accept { slot, value, .. } => Some(*slot).filter(|_| bad(value)),
            Message::Promise { accepted, .. } => {
                accepted.iter().find(|a| bad(&a.value)).map(|a| a.slot)
            }
            Message::CatchUp { entries, .. } => {
                entries.iter().find(|(_, v)| bad(v)).map(|(s, _)| *s)
            }
            _ => None,
        }
    }
}

/// The first slot in `msg` that is out of range where it must be a slot
/// (see [`slot_in_range`]). A commit, snapshot or proposed index may be 0
/// (nothing yet) but, like a slot, must leave room for the next one.
fn bad_slot(msg: &Message) -> Option<Slot> {
    let slot = |s: &Slot| Some(*s).filter(|&s| !slot_in_range(s));
    let index = |s: &Slot| Some(*s).filter(|&s| s == u64::MAX);
    match msg {
        Message::Prepare { from_slot, .. } => slot(from_slot),
        Message::Accept {
            slot: s, commit, ..
        } => slot(s).or(index(commit)),
        Message::Promise {
            from_slot,
            accepted,
            snapshot,
            ..
        } => slot(from_slot)
            .or_else(|| accepted.iter().find_map(|a| slot(&a.slot)))
            .or(index(snapshot)),
        Message::Heartbeat { commit, .. }
        | Message::HeartbeatAck {
            committed: commit, ..
        } => index(commit),
        Message::CatchUp {
            entries,
            commit,
            proposed,
            ..
        } => entries
            .iter()
            .find_map(|(s, _)| slot(s))
            .or(index(commit))
            .or(index(proposed)),
        Message::SnapshotAvailable { index: i, .. } => index(i),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paxos::message::Accepted;
    use crate::paxos::testing::{Net, batch, cmd, replica};

    /// Asserts `r` refuses `msg` from `from` with `refused`, and that the
    /// refusal changed nothing: nothing to send or persist, same status.
    fn refuses(r: &mut Replica, from: NodeId, msg: Message, refused: Refused) {
        let before = r.status();
        assert_eq!(r.step(from, msg.clone()), Err(refused), "{msg:?}");
        assert!(r.take_ready().is_empty(), "a refusal does nothing: {msg:?}");
        assert_eq!(r.status(), before, "a refusal changes nothing: {msg:?}");
        assert!(!refused.to_string().is_empty());
    }

    fn accept(ballot: Ballot, slot: Slot, commit: Slot) -> Message {
        Message::Accept {
            ballot,
            slot,
            value: Value::Noop,
            commit,
        }
    }

    #[test]
    fn only_members_other_than_this_replica_are_heard() {
        let mut r = replica(2, 3);
        let outsider = Message::Prepare {
            ballot: Ballot::new(5, 9),
            from_slot: 1,
            handed_off_by: None,
        };
        refuses(&mut r, 9, outsider, Refused::NotMember(9));
        let impostor = Message::Prepare {
            ballot: Ballot::new(6, 2),
            from_slot: 1,
            handed_off_by: None,
        };
        refuses(&mut r, 2, impostor, Refused::FromSelf);
    }

    #[test]
    fn a_member_cannot_speak_for_another_members_ballot() {
        let mut r = replica(2, 3);
        let b = Ballot::new(5, 3);
        let refused = Refused::NotSendersBallot { from: 1, ballot: b };
        refuses(&mut r, 1, accept(b, 1, 0), refused);
        let heartbeat = Message::Heartbeat {
            ballot: b,
            commit: 0,
            read_round: 0,
        };
        refuses(&mut r, 1, heartbeat, refused);
        // A TimeoutNow comes from the leader of its ballot only.
        refuses(&mut r, 1, Message::TimeoutNow { ballot: b }, refused);
        // A snapshot notice names the sender's ballot or ours, nobody else's.
        let notice = Message::SnapshotAvailable {
            ballot: b,
            index: 4,
        };
        refuses(&mut r, 1, notice, refused);
        assert_eq!(r.leader(), None);
    }

    #[test]
    fn an_answer_for_a_ballot_that_is_not_ours_is_refused() {
        let mut net = Net::new(3);
        net.elect(1);
        let leader = net.node(1);
        let theirs = Ballot::new(1, 3);
        for msg in [
            Message::Accepted {
                ballot: theirs,
                slot: 1,
            },
            Message::HeartbeatAck {
                ballot: theirs,
                read_round: 0,
                committed: 0,
            },
            Message::CatchUpRequest {
                ballot: theirs,
                from_slot: 1,
                to_slot: 1,
                nonce: None,
            },
            Message::PreVoteReply {
                ballot: theirs,
                granted: true,
            },
            Message::Promise {
                ballot: theirs,
                from_slot: 1,
                to_slot: None,
                accepted: vec![],
                snapshot: 0,
            },
        ] {
            refuses(leader, 2, msg, Refused::NotOurBallot { ballot: theirs });
        }
        assert!(leader.is_leader());
    }

    #[test]
    fn a_ballot_with_the_last_round_is_refused_and_the_replica_can_still_be_elected() {
        let mut net = Net::new(3);
        let last = Ballot::new(u64::MAX, 3);
        let prepare = Message::Prepare {
            ballot: last,
            from_slot: 1,
            handed_off_by: None,
        };
        let refused = Refused::BallotOutOfRange {
            ballot: last,
            highest: 0,
        };
        refuses(net.node(2), 3, prepare, refused);
        refuses(net.node(2), 1, Message::Nack { promised: last }, refused);
        assert_eq!(net.node(2).status().promised, Ballot::ZERO);
        net.elect(2);
        assert_eq!(net.node(3).leader(), Some(2));
    }

    #[test]
    fn a_round_may_jump_up_to_the_bound_above_the_highest_seen_and_no_further() {
        let jump = Ballot::MAX_ROUND_JUMP;
        let mut r = replica(2, 3);
        let prepare = |round| Message::Prepare {
            ballot: Ballot::new(round, 3),
            from_slot: 1,
            handed_off_by: None,
        };
        let too_far = Refused::BallotOutOfRange {
            ballot: Ballot::new(jump + 1, 3),
            highest: 0,
        };
        refuses(&mut r, 3, prepare(jump + 1), too_far);
        // Round 0 is below every ballot anyone proposes under.
        let zero = Refused::BallotOutOfRange {
            ballot: Ballot::new(0, 3),
            highest: 0,
        };
        refuses(&mut r, 3, prepare(0), zero);
        // An honest gap, however large, is below the bound.
        r.step(3, prepare(jump)).unwrap();
        assert_eq!(r.status().promised, Ballot::new(jump, 3));
        // The bound is measured from the highest round seen.
        r.step(3, prepare(2 * jump)).unwrap();
        assert_eq!(r.status().promised, Ballot::new(2 * jump, 3));
    }

    #[test]
    fn a_promise_cannot_report_a_vote_above_the_ballot_it_promises() {
        let mut r = replica(1, 3);
        let ballot = Ballot::new(3, 1);
        let promise = |vote: Ballot| Message::Promise {
            ballot,
            from_slot: 1,
            to_slot: None,
            accepted: vec![Accepted {
                slot: 2,
                ballot: vote,
                value: Value::Noop,
            }],
            snapshot: 0,
        };
        for vote in [
            Ballot::new(3, 2),
            Ballot::new(u64::MAX - 1, 2),
            Ballot::new(0, 2),
        ] {
            let refused = Refused::VoteAboveBallot {
                slot: 2,
                vote,
                ballot,
            };
            refuses(&mut r, 2, promise(vote), refused);
        }
        // At or below it is what acceptors report.
        r.step(2, promise(Ballot::new(3, 1))).unwrap();
        r.step(2, promise(Ballot::new(2, 3))).unwrap();
    }

    #[test]
    fn slots_that_leave_no_room_after_them_are_refused() {
        let mut r = replica(2, 3);
        let b = Ballot::new(1, 1);
        for slot in [0, u64::MAX] {
            let refused = Refused::SlotOutOfRange { slot };
            refuses(&mut r, 1, accept(b, slot, 0), refused);
            let catch_up = Message::CatchUp {
                ballot: b,
                entries: vec![(1, Value::Noop), (slot, Value::Noop)],
                commit: 1,
                more: false,
                nonce: None,
                proposed: 1,
            };
            refuses(&mut r, 1, catch_up, refused);
            let prepare = Message::Prepare {
                ballot: Ballot::new(2, 3),
                from_slot: slot,
                handed_off_by: None,
            };
            refuses(&mut r, 3, prepare, refused);
        }
        // An index may be 0, but not the last slot either.
        let last = Refused::SlotOutOfRange { slot: u64::MAX };
        let heartbeat = Message::Heartbeat {
            ballot: b,
            commit: u64::MAX,
            read_round: 0,
        };
        refuses(&mut r, 1, heartbeat, last);
        let notice = Message::SnapshotAvailable {
            ballot: b,
            index: u64::MAX,
        };
        refuses(&mut r, 1, notice, last);
    }

    #[test]
    fn an_accept_must_lie_within_the_window_above_its_own_commit_index() {
        let mut r = replica(2, 3);
        let b = Ballot::new(1, 1);
        let window = Config::MAX_WINDOW as u64;
        // Far beyond the follower's own commit index (0) is fine: it lags.
        r.step(1, accept(b, 1000 + window, 1000)).unwrap();
        r.take_ready();
        for (slot, commit) in [
            (1001 + window, 1000),
            (1000, 1000),
            (999, 1000),
            (1 << 60, 0),
        ] {
            refuses(
                &mut r,
                1,
                accept(b, slot, commit),
                Refused::BeyondWindow { slot, commit },
            );
        }
    }

    #[test]
    fn a_promise_chunk_holding_votes_outside_its_range_or_out_of_order_is_refused() {
        let mut r = replica(1, 3);
        let vote = |slot| Accepted {
            slot,
            ballot: Ballot::new(1, 2),
            value: Value::Noop,
        };
        let chunk = |to_slot, accepted| Message::Promise {
            ballot: Ballot::new(2, 1),
            from_slot: 1,
            to_slot,
            accepted,
            snapshot: 0,
        };
        let refused = |to_slot| Refused::PromiseOutOfRange {
            from_slot: 1,
            to_slot,
        };
        refuses(&mut r, 2, chunk(Some(8), vec![vote(9)]), refused(Some(8)));
        refuses(&mut r, 2, chunk(Some(0), vec![]), refused(Some(0)));
        refuses(
            &mut r,
            2,
            chunk(None, vec![vote(3), vote(2)]),
            refused(None),
        );
        refuses(
            &mut r,
            2,
            chunk(None, vec![vote(3), vote(3)]),
            refused(None),
        );
    }

    #[test]
    fn a_catch_up_holds_only_consecutive_chosen_slots() {
        let mut r = replica(2, 3);
        let catch_up = |entries: &[Slot], commit, proposed| Message::CatchUp {
            ballot: Ballot::new(1, 1),
            entries: entries.iter().map(|&s| (s, Value::Noop)).collect(),
            commit,
            more: false,
            nonce: None,
            proposed,
        };
        let refused = |slot, commit| Refused::CatchUpOutOfRange { slot, commit };
        refuses(&mut r, 1, catch_up(&[1, 2, 3], 2, 5), refused(3, 2));
        refuses(&mut r, 1, catch_up(&[1, 3], 3, 5), refused(3, 3));
        refuses(&mut r, 1, catch_up(&[2, 1], 3, 5), refused(1, 3));
        refuses(&mut r, 1, catch_up(&[1], 3, 2), refused(2, 3));
        r.step(1, catch_up(&[1, 2], 3, 3)).unwrap();
        assert_eq!(r.committed(), 2);
    }

    #[test]
    fn another_value_under_the_ballot_already_voted_for_is_refused() {
        let mut r = replica(2, 3);
        let b = Ballot::new(1, 1);
        let accept = |value| Message::Accept {
            ballot: b,
            slot: 1,
            value,
            commit: 0,
        };
        r.step(1, accept(batch(&["x"]))).unwrap();
        r.take_ready();
        let refused = Refused::ConflictingValue { slot: 1, ballot: b };
        refuses(&mut r, 1, accept(batch(&["y"])), refused);
        let catch_up = Message::CatchUp {
            ballot: b,
            entries: vec![(1, batch(&["y"]))],
            commit: 1,
            more: false,
            nonce: None,
            proposed: 1,
        };
        refuses(&mut r, 1, catch_up, refused);
        // The same value again (a re-send) is heard; so is another value
        // under a higher ballot (a new leader's).
        r.step(1, accept(batch(&["x"]))).unwrap();
        let newer = Message::Accept {
            ballot: Ballot::new(2, 3),
            slot: 1,
            value: batch(&["y"]),
            commit: 0,
        };
        r.step(3, newer).unwrap();
        assert_eq!(r.take_ready().persist.entries.len(), 1);
    }

    #[test]
    fn a_heartbeat_ack_for_a_read_round_not_yet_announced_is_refused() {
        let mut net = Net::new(3);
        net.elect(1);
        let leader = net.node(1);
        let ballot = leader.status().promised;
        leader.read(1).unwrap();
        leader.take_ready();
        let ack = |read_round| Message::HeartbeatAck {
            ballot,
            read_round,
            committed: 0,
        };
        // Round 1 was announced for the read; round 2 was not.
        refuses(
            leader,
            2,
            ack(2),
            Refused::ReadRoundAhead {
                round: 2,
                announced: 1,
            },
        );
        refuses(
            leader,
            2,
            ack(u64::MAX - 1),
            Refused::ReadRoundAhead {
                round: u64::MAX - 1,
                announced: 1,
            },
        );
        leader.step(2, ack(1)).unwrap();
        assert_eq!(leader.take_ready().reads, vec![(1, 0)]);
    }

    #[test]
    fn a_value_holding_a_command_the_check_refuses_is_refused_wherever_it_travels() {
        let mut r = replica(2, 3);
        r.check_commands_with(|c| c != b"bad");
        let b = Ballot::new(1, 1);
        let value = batch(&["good", "bad"]);
        let bad_accept = Message::Accept {
            ballot: b,
            slot: 3,
            value: value.clone(),
            commit: 2,
        };
        refuses(&mut r, 1, bad_accept, Refused::BadCommand { slot: 3 });
        let catch_up = Message::CatchUp {
            ballot: b,
            entries: vec![(1, batch(&["good"])), (2, value.clone())],
            commit: 2,
            more: false,
            nonce: None,
            proposed: 2,
        };
        refuses(&mut r, 1, catch_up, Refused::BadCommand { slot: 2 });
        let promise = Message::Promise {
            ballot: Ballot::new(1, 2),
            from_slot: 1,
            to_slot: None,
            accepted: vec![Accepted {
                slot: 4,
                ballot: b,
                value,
            }],
            snapshot: 0,
        };
        refuses(&mut r, 3, promise, Refused::BadCommand { slot: 4 });
        // Commands the check takes are voted on as ever.
        r.step(
            1,
            Message::Accept {
                ballot: b,
                slot: 1,
                value: Value::Batch(vec![cmd("good")]),
                commit: 0,
            },
        )
        .unwrap();
        assert_eq!(r.take_ready().persist.entries.len(), 1);
    }
}
