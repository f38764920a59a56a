//! What the coordinator sends down a session, read one message at a time:
//! its verdicts (abort, regroup) become errors, the receipts that may come
//! at any time are kept aside, and everything else is handed to the caller.

use std::sync::{Arc, Mutex};

use tokio_stream::StreamExt;

use super::error::SessionError;
use crate::protocol::pb::{self, coordinator_message};
use crate::security::untrusted::shown_message;

/// The newest receipt the coordinator gave this member: the proof, for a
/// later generation or a restarted coordinator, that every rank agreed on
/// a replica (`pb::Receipt`). It outlives the session it came on.
#[derive(Debug, Clone, Default)]
pub struct Proof(Arc<Mutex<Option<pb::Receipt>>>);

impl Proof {
    /// The newest receipt, if one came.
    pub fn latest(&self) -> Option<pb::Receipt> {
        self.0.lock().expect("proof lock").clone()
    }

    pub(super) fn keep(&self, receipt: pb::Receipt) {
        *self.0.lock().expect("proof lock") = Some(receipt);
    }
}

/// A coordinator message's kind, for messages (without its payload).
pub(super) fn kind_name(kind: &coordinator_message::Kind) -> &'static str {
    match kind {
        coordinator_message::Kind::Start(_) => "Start",
        coordinator_message::Kind::Chunk(_) => "a reduced chunk",
        coordinator_message::Kind::Abort(_) => "Abort",
        coordinator_message::Kind::Control(_) => "Control",
        coordinator_message::Kind::Regroup(_) => "Regroup",
        coordinator_message::Kind::SendState(_) => "SendState",
        coordinator_message::Kind::State(_) => "a state chunk",
        coordinator_message::Kind::Receipt(_) => "a receipt",
    }
}

/// The next message that asks something of this member; receipts, which
/// can come at any time, are kept in `proof` on the way.
pub(super) async fn next(
    inbound: &mut tonic::Streaming<pb::CoordinatorMessage>,
    proof: &Proof,
) -> Result<coordinator_message::Kind, SessionError> {
    loop {
        match inbound.next().await {
            Some(Ok(pb::CoordinatorMessage {
                kind: Some(coordinator_message::Kind::Receipt(receipt)),
            })) => proof.keep(receipt),
            other => return classify(other),
        }
    }
}

/// A message read off the stream, or why there is none.
fn classify(
    message: Option<Result<pb::CoordinatorMessage, tonic::Status>>,
) -> Result<coordinator_message::Kind, SessionError> {
    match message {
        Some(Ok(pb::CoordinatorMessage {
            kind: Some(coordinator_message::Kind::Abort(abort)),
        })) => Err(SessionError::Aborted(shown_message(&abort.reason))),
        Some(Ok(pb::CoordinatorMessage {
            kind: Some(coordinator_message::Kind::Regroup(regroup)),
        })) => Err(SessionError::Regroup(shown_message(&regroup.reason))),
        Some(Ok(pb::CoordinatorMessage { kind: Some(kind) })) => Ok(kind),
        Some(Ok(pb::CoordinatorMessage { kind: None })) => {
            Err(SessionError::Protocol("empty message".into()))
        }
        Some(Err(status)) => Err(status.into()),
        None => Err(SessionError::Closed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(
        kind: coordinator_message::Kind,
    ) -> Option<Result<pb::CoordinatorMessage, tonic::Status>> {
        Some(Ok(pb::CoordinatorMessage { kind: Some(kind) }))
    }

    #[test]
    fn the_coordinator_s_verdicts_are_errors_with_its_words_escaped() {
        let abort = message(coordinator_message::Kind::Abort(pb::Abort {
            reason: "diverged\nINFO forged".into(),
        }));
        match classify(abort) {
            Err(SessionError::Aborted(reason)) => assert!(!reason.contains('\n'), "{reason}"),
            other => panic!("expected Aborted, got {other:?}"),
        }
        let regroup = message(coordinator_message::Kind::Regroup(pb::Regroup {
            reason: "rank 2 lost".into(),
        }));
        assert!(matches!(classify(regroup), Err(SessionError::Regroup(r)) if r.contains("rank 2")));
    }

    #[test]
    fn an_empty_message_is_a_violation_and_the_stream_s_end_is_closed() {
        let empty = Some(Ok(pb::CoordinatorMessage { kind: None }));
        assert!(matches!(classify(empty), Err(SessionError::Protocol(_))));
        assert!(matches!(classify(None), Err(SessionError::Closed)));
        let control = message(coordinator_message::Kind::Control(pb::Control::default()));
        assert!(matches!(
            classify(control),
            Ok(coordinator_message::Kind::Control(_))
        ));
    }

    #[test]
    fn a_proof_keeps_the_newest_receipt_for_every_holder() {
        let proof = Proof::default();
        let other = proof.clone();
        assert!(proof.latest().is_none());
        for step in [3, 5] {
            proof.keep(pb::Receipt {
                step,
                ..Default::default()
            });
        }
        assert_eq!(other.latest().map(|r| r.step), Some(5));
    }
}
