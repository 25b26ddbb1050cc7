//! What goes into and comes out of the core: log values, the messages
//! replicas exchange, and [`Ready`], the batch of work the driver must do.

use bytes::Bytes;

use super::ballot::{Ballot, NodeId, Slot};

/// At most how many bytes the encoding (`src/wire.rs`, protobuf) adds around
/// each client command in a value: its field tag (1) and length prefix (at
/// most 10).
pub const COMMAND_OVERHEAD: usize = 16;

/// At most how many bytes the encoding adds around one log entry: a vote in
/// a `Promise` or a chosen value in a `CatchUp` or the value of an `Accept`.
/// The entry's tag and length prefix (11), its slot (11), its ballot (19),
/// and the wrappers of the value and of its batch (11 each): 63.
pub const ENTRY_OVERHEAD: usize = 64;

/// At most how many bytes the encoding adds around a message's entries:
/// the sender's id (6), the message's tag and length prefix (11), and its
/// own fields (a ballot and at most four other integers and a flag: under
/// 70).
pub const MESSAGE_OVERHEAD: usize = 128;

/// The value of one log slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    /// Fills a slot that phase 1 found empty; applies as nothing.
    Noop,
    /// Client commands, opaque to the core, applied in order.
    Batch(Vec<Bytes>),
}

impl Value {
    /// Number of client commands in the value.
    pub fn len(&self) -> usize {
        match self {
            Value::Noop => 0,
            Value::Batch(commands) => commands.len(),
        }
    }

    /// True for a no-op or an empty batch.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// At most how many bytes the value takes in a message, as one entry:
    /// its commands' bytes, [`COMMAND_OVERHEAD`] per command, and
    /// [`ENTRY_OVERHEAD`].
    pub fn size_bound(&self) -> usize {
        let commands = match self {
            Value::Noop => 0,
            Value::Batch(commands) => commands.iter().map(|c| c.len() + COMMAND_OVERHEAD).sum(),
        };
        ENTRY_OVERHEAD + commands
    }
}

/// An acceptor's vote: it accepted `value` for `slot` under `ballot`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// The slot voted on.
    pub slot: Slot,
    /// The ballot the vote was cast under.
    pub ballot: Ballot,
    /// The value voted for.
    pub value: Value,
}

/// A message between replicas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Before phase 1: "would you promise `ballot`, were I to ask?" Sent by
    /// a follower whose election timer fired; nobody persists or promises
    /// anything for it.
    PreVote { ballot: Ballot },
    /// The answer to a pre-vote for `ballot`: `granted` when the replica
    /// hears no live leader and has promised nothing as high. (When its
    /// promise is higher, it answers with a `Nack` instead.)
    PreVoteReply { ballot: Ballot, granted: bool },
    /// Phase 1a: "promise me `ballot` for every slot from `from_slot` on".
    /// `handed_off_by` is set by a candidate that campaigns because the
    /// leader of that ballot told it to (`TimeoutNow`): an acceptor still
    /// following that very leader answers it at once instead of ignoring it
    /// for leader stickiness. It changes nothing else: the promise is
    /// ordinary phase 1.
    Prepare {
        ballot: Ballot,
        from_slot: Slot,
        handed_off_by: Option<Ballot>,
    },
    /// Phase 1b: the promise, with every vote the acceptor holds at or after
    /// the prepare's `from_slot`. Sent in chunks, each under the byte cap:
    /// a chunk holds the votes for slots `from_slot..=to_slot`, and the last
    /// one has `to_slot: None` (every slot from `from_slot` on). A promise
    /// counts once chunks covering every slot from the prepare's `from_slot`
    /// on have arrived. `snapshot` is the acceptor's compacted index: every
    /// slot up to it is chosen, but its vote is gone, so none is reported
    /// there (every chunk carries it).
    Promise {
        ballot: Ballot,
        from_slot: Slot,
        to_slot: Option<Slot>,
        accepted: Vec<Accepted>,
        snapshot: Slot,
    },
    /// Refusal of a prepare, accept or heartbeat: the acceptor has promised
    /// the higher ballot `promised`.
    Nack { promised: Ballot },
    /// Phase 2a, one slot of the pipeline; `commit` is the leader's commit
    /// index (every slot up to it is chosen).
    Accept {
        ballot: Ballot,
        slot: Slot,
        value: Value,
        commit: Slot,
    },
    /// Phase 2b: the acceptor has durably accepted `slot` under `ballot`.
    Accepted { ballot: Ballot, slot: Slot },
    /// The leader is alive; carries its commit index and, for reads, a round
    /// number the followers echo back.
    Heartbeat {
        ballot: Ballot,
        commit: Slot,
        read_round: u64,
    },
    /// Answer to a heartbeat: the follower has promised nothing higher, and
    /// knows every slot up to `committed` chosen.
    HeartbeatAck {
        ballot: Ballot,
        read_round: u64,
        committed: Slot,
    },
    /// A follower asks the leader for chosen slots `from_slot..=to_slot`.
    /// A learner waiting to rejoin adds its incarnation's `nonce` (and asks
    /// even when it misses nothing): see `replica/membership.rs`.
    CatchUpRequest {
        ballot: Ballot,
        from_slot: Slot,
        to_slot: Slot,
        nonce: Option<u64>,
    },
    /// Chosen values for consecutive slots, from the leader. An answer to
    /// one request comes in pieces, each under the byte cap; `more` says
    /// another piece of it follows. Every piece echoes the request's
    /// `nonce` and says `proposed`, the highest slot the leader had
    /// proposed when it answered.
    CatchUp {
        ballot: Ballot,
        entries: Vec<(Slot, Value)>,
        commit: Slot,
        more: bool,
        nonce: Option<u64>,
        proposed: Slot,
    },
    /// "Slots up to `index` are compacted here: fetch my state machine
    /// snapshot." From the leader of `ballot` to a follower whose catch-up
    /// request starts at or below its compacted index; or from an acceptor
    /// to the leader of `ballot`, whose accept is for a slot it has
    /// compacted (it cannot vote there: the vote could not be reported).
    SnapshotAvailable { ballot: Ballot, index: Slot },
    /// Leadership hand-off: the leader of `ballot`, about to stop, tells the
    /// follower it picked to start phase 1 at once, as if its election
    /// timer had fired (Raft's `TimeoutNow`). Only a hint: the follower runs
    /// ordinary phase 1 with a ballot above every one it has seen, so a
    /// lost, duplicated or late one is harmless.
    TimeoutNow { ballot: Ballot },
    /// From a replica that started with an empty data directory: "do you
    /// hold any durable state?" `nonce` identifies its incarnation.
    Probe { nonce: u64 },
    /// The answer to a probe: `fresh` when the replica holds no durable
    /// state at all (nothing promised, voted, chosen or compacted) and is
    /// not a learner.
    ProbeReply { nonce: u64, fresh: bool },
}

impl Message {
    /// The ballot the message speaks for (for `Nack`, the promised one);
    /// none for probes.
    pub fn ballot(&self) -> Option<Ballot> {
        let ballot = match self {
            Message::PreVote { ballot }
            | Message::PreVoteReply { ballot, .. }
            | Message::Prepare { ballot, .. }
            | Message::Promise { ballot, .. }
            | Message::Accept { ballot, .. }
            | Message::Accepted { ballot, .. }
            | Message::Heartbeat { ballot, .. }
            | Message::HeartbeatAck { ballot, .. }
            | Message::CatchUpRequest { ballot, .. }
            | Message::CatchUp { ballot, .. }
            | Message::SnapshotAvailable { ballot, .. }
            | Message::TimeoutNow { ballot } => *ballot,
            Message::Nack { promised } => *promised,
            Message::Probe { .. } | Message::ProbeReply { .. } => return None,
        };
        Some(ballot)
    }

    /// At most how many bytes the message takes encoded: its entries'
    /// [`Value::size_bound`]s and [`MESSAGE_OVERHEAD`].
    pub fn size_bound(&self) -> usize {
        let entries = match self {
            Message::Promise { accepted, .. } => {
                accepted.iter().map(|a| a.value.size_bound()).sum()
            }
            Message::Accept { value, .. } => value.size_bound(),
            Message::CatchUp { entries, .. } => entries.iter().map(|(_, v)| v.size_bound()).sum(),
            _ => 0,
        };
        MESSAGE_OVERHEAD + entries
    }
}

/// A message and its destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// The replica to deliver to; may be the sender itself.
    pub to: NodeId,
    /// What to deliver.
    pub msg: Message,
}

/// Identifies a linearizable read the driver asked the core to order.
pub type ReadId = u64;

/// Where and from what index a state machine snapshot must be fetched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotFetch {
    /// The replica to fetch it from.
    pub from: NodeId,
    /// The snapshot must cover at least every slot up to this one; a later
    /// one does as well.
    pub min_index: Slot,
}

/// Whether a replica votes: durable, kept with the acceptor state. A
/// replica that starts with an empty data directory has neither until its
/// probes settle which (see `replica/membership.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Membership {
    /// Promises and votes.
    Voter,
    /// Lost its durable state (or may have): follows and learns, never
    /// promises or votes, until it may rejoin as a voter.
    Learner,
}

/// Acceptor state to make durable.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Persist {
    /// The replica's membership, when it changed. Written in the same sync
    /// as the rest, before any message that depends on it.
    pub membership: Option<Membership>,
    /// A new promised ballot, if it rose.
    pub promised: Option<Ballot>,
    /// Votes (and chosen values learned by catch-up) to write, in order; a
    /// later entry for the same slot replaces an earlier one.
    pub entries: Vec<Accepted>,
}

impl Persist {
    /// True when there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.membership.is_none() && self.promised.is_none() && self.entries.is_empty()
    }

    /// Adds `later`, a persist asked for after this one, so that one sync
    /// writes both: its membership and promise replace ours (each only
    /// moves forward), its entries follow ours (a later entry for a slot
    /// replaces an earlier one).
    pub fn absorb(&mut self, later: Persist) {
        if later.membership.is_some() {
            self.membership = later.membership;
        }
        if let Some(promised) = later.promised {
            debug_assert!(self.promised.is_none_or(|p| p <= promised));
            self.promised = Some(promised);
        }
        self.entries.extend(later.entries);
    }
}

/// Everything the core asks the driver to do after a batch of inputs.
///
/// The driver must, in this order: send `messages` (they depend on nothing
/// unwritten); make `persist` durable (one sync for all of it: group commit);
/// then send `persisted_messages`, which include replies promising or
/// accepting what `persist` holds, and messages to this replica itself (feed
/// those back into the core). `chosen` may be applied once `persist` is
/// durable.
///
/// Syncs may be pipelined: the driver may take more inputs and more
/// `Ready`s while a sync runs, and send their `messages` at once, as long
/// as syncs complete in the order they were asked for and each `Ready`'s
/// `persisted_messages` and `chosen` wait for its own sync *and every
/// earlier one* (a reply may vouch for state an earlier `Ready` asked to
/// write). `messages` never vouch for unwritten state, whichever `Ready`
/// asked for it. The simulator drives the core this way.
#[derive(Debug, Default)]
pub struct Ready {
    /// Messages that may go out at once, before or while `persist` syncs.
    pub messages: Vec<Envelope>,
    /// State to make durable before any of `persisted_messages` is sent.
    pub persist: Persist,
    /// Messages that may go out only once `persist` is durable.
    pub persisted_messages: Vec<Envelope>,
    /// Newly chosen slots, consecutive and in order, to apply.
    pub chosen: Vec<(Slot, Value)>,
    /// Reads whose barrier passed: serve each once the applied index reaches
    /// its slot.
    pub reads: Vec<(ReadId, Slot)>,
    /// Reads that can no longer be served here (leadership was lost).
    pub failed_reads: Vec<ReadId>,
    /// Client commands that were queued but never given a slot, because
    /// leadership was lost. They are certainly not in the log.
    pub dropped: Vec<Bytes>,
    /// Set when a leader steps down with slots still in flight: the highest
    /// slot it proposed. Each write it had given a slot (up to here) now has
    /// an unknown outcome: a later leader may find it chosen, or put another
    /// value (or a no-op) in its slot. A write stays in the slot it was
    /// given, so once the driver has applied every slot up to here, a write
    /// it has not seen applied is certainly not in the log, and its caller
    /// can be answered (retry).
    pub abandoned_through: Option<Slot>,
    /// Fetch a state machine snapshot, install it, then call
    /// [`Replica::snapshot_installed`](super::Replica::snapshot_installed):
    /// slots this replica needs are compacted where they are known. Repeated
    /// (at most once per `catch_up_ticks`) while still needed; a driver
    /// already fetching may ignore the repeat.
    pub fetch_snapshot: Option<SnapshotFetch>,
    /// Client commands that this leader had given slots, which an installed
    /// snapshot then covered before they were seen chosen here. Each may or
    /// may not be in the snapshot (the slot may hold another value): their
    /// outcome cannot be learned here.
    pub unknown_outcome: Vec<Bytes>,
}

impl Ready {
    /// True when there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
            && self.persist.is_empty()
            && self.persisted_messages.is_empty()
            && self.chosen.is_empty()
            && self.reads.is_empty()
            && self.failed_reads.is_empty()
            && self.dropped.is_empty()
            && self.abandoned_through.is_none()
            && self.fetch_snapshot.is_none()
            && self.unknown_outcome.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vote(slot: Slot, round: u64) -> Accepted {
        Accepted {
            slot,
            ballot: Ballot::new(round, 1),
            value: Value::Noop,
        }
    }

    #[test]
    fn absorbing_a_later_persist_keeps_its_promise_and_appends_its_votes() {
        let mut first = Persist {
            membership: None,
            promised: Some(Ballot::new(2, 1)),
            entries: vec![vote(1, 2), vote(2, 2)],
        };
        first.absorb(Persist {
            membership: Some(Membership::Voter),
            promised: Some(Ballot::new(3, 2)),
            entries: vec![vote(2, 3)],
        });
        assert_eq!(first.membership, Some(Membership::Voter));
        assert_eq!(first.promised, Some(Ballot::new(3, 2)));
        // The later vote for slot 2 comes last, so it is the one that stays.
        assert_eq!(first.entries, vec![vote(1, 2), vote(2, 2), vote(2, 3)]);

        // Nothing later keeps what was there.
        let before = first.clone();
        first.absorb(Persist::default());
        assert_eq!(first, before);
    }
}
