//! The core's types in protobuf form, for the network and the disk.
//!
//! The consensus core ([`crate::paxos`]) knows nothing of protobuf; the
//! transport sends [`pb::PeerMessage`]s and the storage keeps
//! [`pb::AcceptedEntry`]s. This module converts between the two, in both
//! directions, and is the only place that does.
//!
//! Converting to protobuf cannot fail. Converting back can: proto3 makes
//! every sub-message optional, so a peer running other code (or a corrupt
//! disk) can send a message without, say, its ballot. Such input is refused
//! with a [`WireError`] naming the missing field, never a panic and never a
//! silent default: a missing ballot read as `Ballot::ZERO` would be a vote or
//! promise nobody cast.

use std::fmt;

use bytes::Bytes;

use crate::paxos::{Accepted, Ballot, Message, NodeId, Slot, Value};
use crate::pb;
use crate::pb::peer_message::Kind;

/// Why a protobuf message does not convert into the core's types.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireError(String);

impl WireError {
    /// A required field, named by its path (e.g. `Accept.value`), is absent.
    fn missing(field: &str) -> Self {
        WireError(format!("{field} is missing"))
    }
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WireError {}

/// A ballot in protobuf form.
pub fn ballot_to_pb(b: Ballot) -> pb::Ballot {
    pb::Ballot {
        round: b.round,
        node: b.node,
    }
}

/// A ballot from protobuf; `field` names where it was read from, for the
/// error when it is absent.
pub fn ballot_from_pb(b: Option<pb::Ballot>, field: &str) -> Result<Ballot, WireError> {
    let b = b.ok_or_else(|| WireError::missing(field))?;
    Ok(Ballot::new(b.round, b.node))
}

/// A log value in protobuf form.
pub fn value_to_pb(v: &Value) -> pb::Value {
    let kind = match v {
        Value::Noop => pb::value::Kind::Noop(pb::Noop {}),
        Value::Batch(commands) => pb::value::Kind::Batch(pb::Batch {
            commands: commands.iter().map(|c| c.to_vec()).collect(),
        }),
    };
    pb::Value { kind: Some(kind) }
}

/// A log value from protobuf; `field` names where it was read from. Both the
/// value and its `kind` are required: a value that is neither a no-op nor a
/// batch is not something any replica writes.
pub fn value_from_pb(v: Option<pb::Value>, field: &str) -> Result<Value, WireError> {
    let v = v.ok_or_else(|| WireError::missing(field))?;
    match v.kind {
        Some(pb::value::Kind::Noop(pb::Noop {})) => Ok(Value::Noop),
        Some(pb::value::Kind::Batch(batch)) => Ok(Value::Batch(
            batch.commands.into_iter().map(Bytes::from).collect(),
        )),
        None => Err(WireError::missing(&format!("{field}.kind"))),
    }
}

/// A vote in protobuf form, as a promise carries it and the log stores it.
pub fn accepted_to_pb(a: &Accepted) -> pb::AcceptedEntry {
    pb::AcceptedEntry {
        slot: a.slot,
        ballot: Some(ballot_to_pb(a.ballot)),
        value: Some(value_to_pb(&a.value)),
    }
}

/// A vote from protobuf; its ballot and value are required.
pub fn accepted_from_pb(e: pb::AcceptedEntry) -> Result<Accepted, WireError> {
    accepted_at(e, "AcceptedEntry")
}

/// [`accepted_from_pb`], with errors naming the entry by `path` (e.g.
/// `Promise.accepted[3]`).
fn accepted_at(e: pb::AcceptedEntry, path: &str) -> Result<Accepted, WireError> {
    Ok(Accepted {
        slot: e.slot,
        ballot: ballot_from_pb(e.ballot, &format!("{path}.ballot"))?,
        value: value_from_pb(e.value, &format!("{path}.value"))?,
    })
}

/// A message from replica `from`, in the form it travels between replicas.
pub fn message_to_pb(from: NodeId, msg: &Message) -> pb::PeerMessage {
    let b = |ballot: &Ballot| Some(ballot_to_pb(*ballot));
    let kind = match msg {
        Message::PreVote { ballot } => Kind::PreVote(pb::PreVote { ballot: b(ballot) }),
        Message::PreVoteReply { ballot, granted } => Kind::PreVoteReply(pb::PreVoteReply {
            ballot: b(ballot),
            granted: *granted,
        }),
        Message::Prepare {
            ballot,
            from_slot,
            handed_off_by,
        } => Kind::Prepare(pb::Prepare {
            ballot: b(ballot),
            from_slot: *from_slot,
            handed_off_by: handed_off_by.as_ref().and_then(b),
        }),
        Message::TimeoutNow { ballot } => Kind::TimeoutNow(pb::TimeoutNow { ballot: b(ballot) }),
        Message::Promise {
            ballot,
            from_slot,
            to_slot,
            accepted,
            snapshot,
        } => Kind::Promise(pb::Promise {
            ballot: b(ballot),
            accepted: accepted.iter().map(accepted_to_pb).collect(),
            from_slot: *from_slot,
            to_slot: *to_slot,
            snapshot: *snapshot,
        }),
        Message::Nack { promised } => Kind::Nack(pb::Nack {
            promised: b(promised),
        }),
        Message::Accept {
            ballot,
            slot,
            value,
            commit,
        } => Kind::Accept(pb::Accept {
            ballot: b(ballot),
            slot: *slot,
            value: Some(value_to_pb(value)),
            commit: *commit,
        }),
        Message::Accepted { ballot, slot } => Kind::Accepted(pb::Accepted {
            ballot: b(ballot),
            slot: *slot,
        }),
        Message::Heartbeat {
            ballot,
            commit,
            read_round,
        } => Kind::Heartbeat(pb::Heartbeat {
            ballot: b(ballot),
            commit: *commit,
            read_round: *read_round,
        }),
        Message::HeartbeatAck {
            ballot,
            read_round,
            committed,
        } => Kind::HeartbeatAck(pb::HeartbeatAck {
            ballot: b(ballot),
            read_round: *read_round,
            committed: *committed,
        }),
        Message::CatchUpRequest {
            ballot,
            from_slot,
            to_slot,
            nonce,
        } => Kind::CatchUpRequest(pb::CatchUpRequest {
            ballot: b(ballot),
            from_slot: *from_slot,
            to_slot: *to_slot,
            nonce: *nonce,
        }),
        Message::CatchUp {
            ballot,
            entries,
            commit,
            more,
            nonce,
            proposed,
        } => Kind::CatchUp(pb::CatchUp {
            ballot: b(ballot),
            entries: entries
                .iter()
                .map(|(slot, value)| pb::ChosenEntry {
                    slot: *slot,
                    value: Some(value_to_pb(value)),
                })
                .collect(),
            commit: *commit,
            more: *more,
            nonce: *nonce,
            proposed: *proposed,
        }),
        Message::SnapshotAvailable { ballot, index } => {
            Kind::SnapshotAvailable(pb::SnapshotAvailable {
                ballot: b(ballot),
                index: *index,
            })
        }
        Message::Probe { nonce } => Kind::Probe(pb::Probe { nonce: *nonce }),
        Message::ProbeReply { nonce, fresh } => Kind::ProbeReply(pb::ProbeReply {
            nonce: *nonce,
            fresh: *fresh,
        }),
    };
    pb::PeerMessage {
        from,
        kind: Some(kind),
    }
}

/// A message received from another replica: the sender's id and the
/// message. Fails, naming the field, when a required part is absent.
pub fn message_from_pb(m: pb::PeerMessage) -> Result<(NodeId, Message), WireError> {
    let kind = m
        .kind
        .ok_or_else(|| WireError::missing("PeerMessage.kind"))?;
    let msg = match kind {
        Kind::PreVote(p) => Message::PreVote {
            ballot: ballot_from_pb(p.ballot, "PreVote.ballot")?,
        },
        Kind::PreVoteReply(r) => Message::PreVoteReply {
            ballot: ballot_from_pb(r.ballot, "PreVoteReply.ballot")?,
            granted: r.granted,
        },
        Kind::Prepare(p) => Message::Prepare {
            ballot: ballot_from_pb(p.ballot, "Prepare.ballot")?,
            from_slot: p.from_slot,
            handed_off_by: p
                .handed_off_by
                .map(|h| ballot_from_pb(Some(h), "Prepare.handed_off_by"))
                .transpose()?,
        },
        Kind::TimeoutNow(t) => Message::TimeoutNow {
            ballot: ballot_from_pb(t.ballot, "TimeoutNow.ballot")?,
        },
        Kind::Promise(p) => Message::Promise {
            ballot: ballot_from_pb(p.ballot, "Promise.ballot")?,
            from_slot: p.from_slot,
            to_slot: p.to_slot,
            accepted: p
                .accepted
                .into_iter()
                .enumerate()
                .map(|(i, e)| accepted_at(e, &format!("Promise.accepted[{i}]")))
                .collect::<Result<_, _>>()?,
            snapshot: p.snapshot,
        },
        Kind::Nack(n) => Message::Nack {
            promised: ballot_from_pb(n.promised, "Nack.promised")?,
        },
        Kind::Accept(a) => Message::Accept {
            ballot: ballot_from_pb(a.ballot, "Accept.ballot")?,
            slot: a.slot,
            value: value_from_pb(a.value, "Accept.value")?,
            commit: a.commit,
        },
        Kind::Accepted(a) => Message::Accepted {
            ballot: ballot_from_pb(a.ballot, "Accepted.ballot")?,
            slot: a.slot,
        },
        Kind::Heartbeat(h) => Message::Heartbeat {
            ballot: ballot_from_pb(h.ballot, "Heartbeat.ballot")?,
            commit: h.commit,
            read_round: h.read_round,
        },
        Kind::HeartbeatAck(h) => Message::HeartbeatAck {
            ballot: ballot_from_pb(h.ballot, "HeartbeatAck.ballot")?,
            read_round: h.read_round,
            committed: h.committed,
        },
        Kind::CatchUpRequest(r) => Message::CatchUpRequest {
            ballot: ballot_from_pb(r.ballot, "CatchUpRequest.ballot")?,
            from_slot: r.from_slot,
            to_slot: r.to_slot,
            nonce: r.nonce,
        },
        Kind::CatchUp(c) => Message::CatchUp {
            ballot: ballot_from_pb(c.ballot, "CatchUp.ballot")?,
            entries: c
                .entries
                .into_iter()
                .enumerate()
                .map(|(i, e)| -> Result<(Slot, Value), WireError> {
                    let value = value_from_pb(e.value, &format!("CatchUp.entries[{i}].value"))?;
                    Ok((e.slot, value))
                })
                .collect::<Result<_, _>>()?,
            commit: c.commit,
            more: c.more,
            nonce: c.nonce,
            proposed: c.proposed,
        },
        Kind::SnapshotAvailable(s) => Message::SnapshotAvailable {
            ballot: ballot_from_pb(s.ballot, "SnapshotAvailable.ballot")?,
            index: s.index,
        },
        Kind::Probe(p) => Message::Probe { nonce: p.nonce },
        Kind::ProbeReply(r) => Message::ProbeReply {
            nonce: r.nonce,
            fresh: r.fresh,
        },
    };
    Ok((m.from, msg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    fn batch(commands: &[&[u8]]) -> Value {
        Value::Batch(commands.iter().map(|c| Bytes::copy_from_slice(c)).collect())
    }

    /// One message of every variant, with non-default fields throughout.
    fn every_message() -> Vec<Message> {
        let b = Ballot::new(7, 3);
        vec![
            Message::PreVote { ballot: b },
            Message::PreVoteReply {
                ballot: b,
                granted: true,
            },
            Message::PreVoteReply {
                ballot: b,
                granted: false,
            },
            Message::Prepare {
                ballot: b,
                from_slot: 12,
                handed_off_by: None,
            },
            Message::Prepare {
                ballot: b,
                from_slot: 12,
                handed_off_by: Some(Ballot::new(6, 1)),
            },
            Message::TimeoutNow { ballot: b },
            Message::Promise {
                ballot: b,
                from_slot: 12,
                to_slot: Some(20),
                accepted: vec![
                    Accepted {
                        slot: 12,
                        ballot: Ballot::new(5, 1),
                        value: batch(&[b"a", b"", b"\xff\x00"]),
                    },
                    Accepted {
                        slot: 13,
                        ballot: Ballot::new(6, 2),
                        value: Value::Noop,
                    },
                ],
                snapshot: 11,
            },
            // The last chunk covers every slot from its from_slot on.
            Message::Promise {
                ballot: b,
                from_slot: 21,
                to_slot: None,
                accepted: vec![],
                snapshot: 0,
            },
            Message::Nack {
                promised: Ballot::new(u64::MAX, u32::MAX),
            },
            Message::Accept {
                ballot: b,
                slot: 40,
                value: batch(&[b"cmd"]),
                commit: 39,
            },
            Message::Accept {
                ballot: b,
                slot: 41,
                value: Value::Noop,
                commit: 0,
            },
            // An empty batch is a batch, not a no-op, and must stay one.
            Message::Accept {
                ballot: b,
                slot: 42,
                value: Value::Batch(vec![]),
                commit: 0,
            },
            Message::Accepted {
                ballot: b,
                slot: 40,
            },
            Message::Heartbeat {
                ballot: b,
                commit: 39,
                read_round: 8,
            },
            Message::HeartbeatAck {
                ballot: b,
                read_round: 8,
                committed: 30,
            },
            Message::CatchUpRequest {
                ballot: b,
                from_slot: 3,
                to_slot: 9,
                nonce: None,
            },
            // A nonce of 0 is a nonce, not none.
            Message::CatchUpRequest {
                ballot: b,
                from_slot: 10,
                to_slot: 9,
                nonce: Some(0),
            },
            Message::CatchUp {
                ballot: b,
                entries: vec![(3, Value::Noop), (4, batch(&[b"x", b"y"]))],
                commit: 9,
                more: true,
                nonce: Some(u64::MAX),
                proposed: 12,
            },
            Message::CatchUp {
                ballot: b,
                entries: vec![(5, Value::Noop)],
                commit: 9,
                more: false,
                nonce: None,
                proposed: 0,
            },
            Message::SnapshotAvailable {
                ballot: b,
                index: 1000,
            },
            Message::Probe { nonce: 42 },
            Message::ProbeReply {
                nonce: 42,
                fresh: true,
            },
            Message::ProbeReply {
                nonce: u64::MAX,
                fresh: false,
            },
        ]
    }

    #[test]
    fn every_message_round_trips_through_bytes() {
        for msg in every_message() {
            let pb = message_to_pb(4, &msg);
            // Through the encoding too, as the network carries it.
            let bytes = pb.encode_to_vec();
            let decoded = pb::PeerMessage::decode(bytes.as_slice()).unwrap();
            assert_eq!(message_from_pb(decoded), Ok((4, msg.clone())), "{msg:?}");
        }
    }

    #[test]
    fn the_cores_size_bound_is_never_below_the_encoded_size() {
        // The largest varints everywhere, and commands of every length class.
        let ballot = Ballot::new(u64::MAX - 1, u32::MAX);
        let slot = u64::MAX - 1;
        let value = Value::Batch(vec![
            Bytes::new(),
            Bytes::from(vec![7u8; 300]),
            Bytes::from(vec![1u8; 70_000]),
        ]);
        let vote = Accepted {
            slot,
            ballot,
            value: value.clone(),
        };
        let mut messages = every_message();
        messages.extend([
            Message::Promise {
                ballot,
                from_slot: slot,
                to_slot: Some(slot),
                accepted: vec![vote.clone(), vote],
                snapshot: slot,
            },
            Message::CatchUp {
                ballot,
                entries: vec![(slot, value.clone()), (slot, Value::Noop)],
                commit: slot,
                more: true,
                nonce: Some(u64::MAX),
                proposed: slot,
            },
            Message::CatchUpRequest {
                ballot,
                from_slot: slot,
                to_slot: slot,
                nonce: Some(u64::MAX),
            },
            Message::Accept {
                ballot,
                slot,
                value,
                commit: slot,
            },
        ]);
        for msg in messages {
            let len = message_to_pb(NodeId::MAX, &msg).encoded_len();
            assert!(
                len <= msg.size_bound(),
                "{len} > {}: {msg:?}",
                msg.size_bound()
            );
        }
    }

    #[test]
    fn the_default_message_cap_is_well_under_what_the_transport_accepts() {
        let cap = crate::paxos::Config::new(1, vec![1]).max_message_bytes;
        assert!(cap * 8 <= crate::transport::MAX_MESSAGE_SIZE);
    }

    #[test]
    fn accepted_entry_round_trips() {
        let a = Accepted {
            slot: u64::MAX,
            ballot: Ballot::new(2, 9),
            value: batch(&[b"one", b"two"]),
        };
        let bytes = accepted_to_pb(&a).encode_to_vec();
        let e = pb::AcceptedEntry::decode(bytes.as_slice()).unwrap();
        assert_eq!(accepted_from_pb(e), Ok(a));
    }

    fn err_of(m: pb::PeerMessage) -> String {
        message_from_pb(m).unwrap_err().to_string()
    }

    /// The message with its kind replaced by `f(kind)`.
    fn tamper(msg: &Message, f: impl FnOnce(&mut Kind)) -> pb::PeerMessage {
        let mut m = message_to_pb(1, msg);
        f(m.kind.as_mut().unwrap());
        m
    }

    #[test]
    fn missing_kind_is_named() {
        let m = pb::PeerMessage {
            from: 1,
            kind: None,
        };
        assert_eq!(err_of(m), "PeerMessage.kind is missing");
        // An empty buffer decodes to exactly that.
        let m = pb::PeerMessage::decode(&[][..]).unwrap();
        assert_eq!(err_of(m), "PeerMessage.kind is missing");
    }

    #[test]
    fn missing_ballot_is_named_for_every_variant() {
        // Probes carry no ballot.
        let with_ballot = every_message()
            .into_iter()
            .filter(|m| !matches!(m, Message::Probe { .. } | Message::ProbeReply { .. }));
        for msg in with_ballot {
            let m = tamper(&msg, |k| match k {
                Kind::PreVote(x) => x.ballot = None,
                Kind::PreVoteReply(x) => x.ballot = None,
                Kind::Prepare(x) => x.ballot = None,
                Kind::Promise(x) => x.ballot = None,
                Kind::Nack(x) => x.promised = None,
                Kind::Accept(x) => x.ballot = None,
                Kind::Accepted(x) => x.ballot = None,
                Kind::Heartbeat(x) => x.ballot = None,
                Kind::HeartbeatAck(x) => x.ballot = None,
                Kind::CatchUpRequest(x) => x.ballot = None,
                Kind::CatchUp(x) => x.ballot = None,
                Kind::SnapshotAvailable(x) => x.ballot = None,
                Kind::TimeoutNow(x) => x.ballot = None,
                Kind::Probe(_) | Kind::ProbeReply(_) => unreachable!("no ballot"),
            });
            let err = err_of(m);
            let expected = match msg {
                Message::PreVote { .. } => "PreVote.ballot",
                Message::PreVoteReply { .. } => "PreVoteReply.ballot",
                Message::Prepare { .. } => "Prepare.ballot",
                Message::Promise { .. } => "Promise.ballot",
                Message::Nack { .. } => "Nack.promised",
                Message::Accept { .. } => "Accept.ballot",
                Message::Accepted { .. } => "Accepted.ballot",
                Message::Heartbeat { .. } => "Heartbeat.ballot",
                Message::HeartbeatAck { .. } => "HeartbeatAck.ballot",
                Message::CatchUpRequest { .. } => "CatchUpRequest.ballot",
                Message::CatchUp { .. } => "CatchUp.ballot",
                Message::SnapshotAvailable { .. } => "SnapshotAvailable.ballot",
                Message::TimeoutNow { .. } => "TimeoutNow.ballot",
                Message::Probe { .. } | Message::ProbeReply { .. } => unreachable!("no ballot"),
            };
            assert_eq!(err, format!("{expected} is missing"), "{msg:?}");
        }
    }

    #[test]
    fn missing_value_and_value_kind_are_named() {
        let accept = Message::Accept {
            ballot: Ballot::new(1, 1),
            slot: 1,
            value: Value::Noop,
            commit: 0,
        };
        let m = tamper(&accept, |k| {
            if let Kind::Accept(a) = k {
                a.value = None;
            }
        });
        assert_eq!(err_of(m), "Accept.value is missing");
        let m = tamper(&accept, |k| {
            if let Kind::Accept(a) = k {
                a.value = Some(pb::Value { kind: None });
            }
        });
        assert_eq!(err_of(m), "Accept.value.kind is missing");
    }

    #[test]
    fn missing_parts_of_nested_entries_are_named_with_their_index() {
        let promise = &every_message()
            .into_iter()
            .find(|m| matches!(m, Message::Promise { accepted, .. } if accepted.len() == 2))
            .unwrap();
        let m = tamper(promise, |k| {
            if let Kind::Promise(p) = k {
                p.accepted[1].ballot = None;
            }
        });
        assert_eq!(err_of(m), "Promise.accepted[1].ballot is missing");
        let m = tamper(promise, |k| {
            if let Kind::Promise(p) = k {
                p.accepted[0].value = None;
            }
        });
        assert_eq!(err_of(m), "Promise.accepted[0].value is missing");

        let catch_up = every_message()
            .into_iter()
            .find(|m| matches!(m, Message::CatchUp { more: true, .. }))
            .unwrap();
        let m = tamper(&catch_up, |k| {
            if let Kind::CatchUp(c) = k {
                c.entries[1].value = Some(pb::Value::default());
            }
        });
        assert_eq!(err_of(m), "CatchUp.entries[1].value.kind is missing");

        let e = pb::AcceptedEntry {
            slot: 1,
            ballot: None,
            value: None,
        };
        let err = accepted_from_pb(e).unwrap_err();
        assert_eq!(err.to_string(), "AcceptedEntry.ballot is missing");
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // Whatever prost accepts, the conversion must refuse or accept
        // without panicking.
        for len in 0..64u8 {
            let junk: Vec<u8> = (0..len).map(|i| i.wrapping_mul(73) ^ len).collect();
            if let Ok(m) = pb::PeerMessage::decode(junk.as_slice()) {
                let _ = message_from_pb(m);
            }
        }
    }
}
