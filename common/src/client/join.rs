//! Joining the group: the request that introduces this worker, the call
//! that waits for the group to form, and the whole way to a first step.

use super::connect::{Clients, connect};
use super::error::{SessionError, first_io};
use super::session::Session;
use super::transfer::NoDonation;
use crate::protocol::pb;
use crate::security::auth::Token;
use crate::security::untrusted::shown_message;

/// A join request for this build's protocol and `cfg`'s training settings,
/// presenting the replica this worker `held`, if any.
pub fn join_request(
    cfg: &crate::Config,
    rank: Option<usize>,
    initial_checksum: u64,
    host: String,
    held: Option<pb::Held>,
) -> pb::JoinRequest {
    pb::JoinRequest {
        protocol_version: pb::PROTOCOL_VERSION,
        config_hash: cfg.training_hash(),
        requested_rank: rank.map_or(-1, |r| r as i32),
        initial_checksum,
        host,
        held,
        proof: None,
        previous_member: String::new(),
    }
}

/// Joins the group; returns once every worker has joined.
pub async fn join(
    clients: &mut Clients,
    request: pb::JoinRequest,
) -> Result<pb::JoinReply, SessionError> {
    clients
        .rendezvous
        .join(request)
        .await
        .map(tonic::Response::into_inner)
        .map_err(join_failed)
}

/// What a failed Join means: the coordinator's refusal (a status it sent,
/// escaped), no free slot for this connection, or a lost connection.
fn join_failed(status: tonic::Status) -> SessionError {
    match std::error::Error::source(&status) {
        Some(cause) if closed_on_us(cause) => SessionError::TurnedAway(cause.to_string()),
        Some(cause) => SessionError::Disconnected(cause.to_string()),
        None => SessionError::Refused {
            code: status.code(),
            message: shown_message(status.message()),
        },
    }
}

/// Whether `cause` is the peer closing the connection under the request
/// (reset, broken pipe, end of stream), as a coordinator with no free
/// connection slot does on accept; not a TLS refusal or anything else
/// that trying again cannot mend.
fn closed_on_us(cause: &(dyn std::error::Error + 'static)) -> bool {
    first_io(cause).is_some_and(|io| {
        matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::ConnectionAborted
        )
    })
}

/// Everything a worker does before its first step: connect to `address`,
/// join the group with `request`, and open the session with the
/// all-reduce and liveness settings of `cfg`.
pub async fn rendezvous(
    address: &str,
    token: &Token,
    request: pb::JoinRequest,
    cfg: &crate::Config,
) -> Result<(pb::JoinReply, Session, pb::Start), SessionError> {
    let mut clients = connect(address, cfg, token).await?;
    let joined = join(&mut clients, request).await?;
    let opened = Session::open(&mut clients, &joined, cfg, &mut NoDonation).await?;
    Ok((joined, opened.session, opened.start))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Error, ErrorKind};

    #[test]
    fn a_join_request_speaks_this_build_s_protocol_and_asks_for_a_rank_only_when_given_one() {
        let cfg = crate::Config::default();
        let any = join_request(&cfg, None, 7, "host".into(), None);
        assert_eq!(any.protocol_version, pb::PROTOCOL_VERSION);
        assert_eq!(any.config_hash, cfg.training_hash());
        assert_eq!((any.requested_rank, any.initial_checksum), (-1, 7));
        assert!(any.proof.is_none() && any.previous_member.is_empty());
        assert_eq!(
            join_request(&cfg, Some(3), 7, "h".into(), None).requested_rank,
            3
        );
    }

    #[test]
    fn a_refused_join_keeps_its_code_and_escapes_the_coordinator_s_words() {
        let status = tonic::Status::failed_precondition("config hash\nforged line");
        match join_failed(status) {
            SessionError::Refused { code, message } => {
                assert_eq!(code, tonic::Code::FailedPrecondition);
                assert!(!message.contains('\n'), "{message}");
            }
            other => panic!("expected Refused, got {other:?}"),
        }
    }

    #[test]
    fn a_connection_closed_under_the_join_is_turned_away_and_other_failures_are_lost() {
        let failed =
            |kind: ErrorKind| join_failed(tonic::Status::from_error(Box::new(Error::from(kind))));
        for closed in [
            ErrorKind::ConnectionReset,
            ErrorKind::BrokenPipe,
            ErrorKind::UnexpectedEof,
            ErrorKind::ConnectionAborted,
        ] {
            assert!(
                matches!(failed(closed), SessionError::TurnedAway(_)),
                "{closed:?}"
            );
        }
        assert!(matches!(
            failed(ErrorKind::TimedOut),
            SessionError::Disconnected(_)
        ));
    }
}
