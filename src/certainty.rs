//! Whether a failed write surely did not happen: `NOT_PROPOSED` against
//! `OUTCOME_UNKNOWN`, in the status details of every `UNAVAILABLE` a write
//! gets.
//!
//! A client whose write failed must otherwise assume it may have taken
//! effect, and retry blind. Many failures are certain, though: the write
//! was refused before any leader proposed it (no leader known, a follower
//! that could not reach one, a leader that stepped down before giving it a
//! slot). Like etcd's "no leader" against "request timed out", paxoskv
//! tells the two apart, machine-readably: a `google.rpc.ErrorInfo` with
//! domain [`DOMAIN`] and reason [`Certainty::reason`], set to
//! `NOT_PROPOSED` only when every attempt the replicas made for the call
//! ended in an answer that proves it is not in the log
//! ([`CallError::proves_not_in_log`], which the simulator checks).

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::driver::CallError;

/// The `ErrorInfo` domain of paxoskv's reasons.
pub const DOMAIN: &str = "paxoskv.v1";

/// What is known of a failed write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Certainty {
    /// It is not in the log and never will be: retrying it, with or without
    /// its request id, cannot apply it twice.
    NotProposed,
    /// It may or may not take effect; only a retry with the same request
    /// id is safe.
    OutcomeUnknown,
}

impl Certainty {
    /// The `ErrorInfo` reason.
    pub fn reason(self) -> &'static str {
        match self {
            Certainty::NotProposed => "NOT_PROPOSED",
            Certainty::OutcomeUnknown => "OUTCOME_UNKNOWN",
        }
    }

    /// The certainty `status` carries, if any.
    pub fn of(status: &Status) -> Option<Certainty> {
        let info = status.get_details_error_info()?;
        if info.domain != DOMAIN {
            return None;
        }
        [Certainty::NotProposed, Certainty::OutcomeUnknown]
            .into_iter()
            .find(|c| c.reason() == info.reason)
    }

    /// `status` with this certainty in its details (replacing any), its
    /// code, message and metadata kept.
    pub fn mark(self, status: Status) -> Status {
        let details = ErrorDetails::with_error_info(self.reason(), DOMAIN, []);
        Status::with_error_details_and_metadata(
            status.code(),
            status.message(),
            details,
            status.metadata().clone(),
        )
    }
}

/// What the attempts of one write have established: whether any of them
/// may have put it in the log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Attempts {
    maybe_in_log: bool,
}

impl Attempts {
    /// This replica's node answered an attempt with `error`.
    pub fn answered(&mut self, error: &CallError) {
        if !error.proves_not_in_log() {
            self.maybe_in_log = true;
        }
    }

    /// An attempt forwarded to the leader failed with `status`: certain
    /// only if the leader said so.
    pub fn forwarded(&mut self, status: &Status) {
        if Certainty::of(status) != Some(Certainty::NotProposed) {
            self.maybe_in_log = true;
        }
    }

    /// An attempt was handed over (to the node, or to the leader) and the
    /// call's deadline came before its answer.
    pub fn cut_off(&mut self) {
        self.maybe_in_log = true;
    }

    /// What the attempts so far establish.
    pub fn certainty(&self) -> Certainty {
        if self.maybe_in_log {
            Certainty::OutcomeUnknown
        } else {
            Certainty::NotProposed
        }
    }

    /// A write's failure `status`, marked with what the attempts establish
    /// if it is one whose outcome a client could wonder about
    /// (`UNAVAILABLE`, `DEADLINE_EXCEEDED`, `RESOURCE_EXHAUSTED`); other
    /// statuses are answers.
    pub fn mark(&self, status: Status) -> Status {
        match status.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted => {
                self.certainty().mark(status)
            }
            _ => status,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_answers_that_prove_absence_keep_a_write_not_proposed() {
        let mut a = Attempts::default();
        assert_eq!(a.certainty(), Certainty::NotProposed);
        a.answered(&CallError::NotLeader(None));
        a.answered(&CallError::Retry);
        a.forwarded(&Certainty::NotProposed.mark(Status::unavailable("no leader")));
        assert_eq!(a.certainty(), Certainty::NotProposed);
        for unsure in [
            {
                let mut a = a;
                a.answered(&CallError::Unknown);
                a
            },
            {
                let mut a = a;
                a.answered(&CallError::Stopped);
                a
            },
            {
                let mut a = a;
                // The leader could not be reached, or said nothing.
                a.forwarded(&Status::unavailable("transport error"));
                a
            },
            {
                let mut a = a;
                a.forwarded(&Certainty::OutcomeUnknown.mark(Status::unavailable("x")));
                a
            },
            {
                let mut a = a;
                a.cut_off();
                a
            },
        ] {
            assert_eq!(unsure.certainty(), Certainty::OutcomeUnknown);
            // Later certain answers do not undo it.
            let mut later = unsure;
            later.answered(&CallError::Retry);
            assert_eq!(later.certainty(), Certainty::OutcomeUnknown);
        }
    }

    #[test]
    fn the_mark_travels_in_the_details_and_keeps_the_rest() {
        let mut status = Status::unavailable("no quorum");
        status
            .metadata_mut()
            .insert("x-paxoskv-reason", "no-quorum".parse().unwrap());
        let marked = Certainty::NotProposed.mark(status);
        assert_eq!(marked.code(), Code::Unavailable);
        assert_eq!(marked.message(), "no quorum");
        assert_eq!(
            marked.metadata().get("x-paxoskv-reason").unwrap(),
            "no-quorum"
        );
        assert_eq!(Certainty::of(&marked), Some(Certainty::NotProposed));
        let remarked = Certainty::OutcomeUnknown.mark(marked);
        assert_eq!(Certainty::of(&remarked), Some(Certainty::OutcomeUnknown));
        assert_eq!(Certainty::of(&Status::unavailable("plain")), None);
        // Answers are not marked.
        let not_found = Attempts::default().mark(Status::not_found("k"));
        assert_eq!(Certainty::of(&not_found), None);
    }
}
