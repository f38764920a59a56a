//! Why a worker's conversation with the coordinator ended, sorted by what
//! the worker should do about it: give up for good, try again later, or
//! wait for a coordinator that is still starting.

use crate::protocol::wire::WireError;
use crate::security::tls::TlsError;
use crate::security::untrusted::shown_message;

/// What can end a worker's conversation with the coordinator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The address is not a valid URI.
    #[error(
        "invalid coordinator address `{address}`: {source} (expected e.g. http://10.0.0.5:50051)"
    )]
    Address {
        /// What was given.
        address: String,
        /// Why it was rejected.
        source: tonic::transport::Error,
    },
    /// Nothing answered at the address, or not in the same language.
    #[error(
        "cannot connect to the coordinator at {address}: {source}; is it running and reachable, \
         and do both sides agree on TLS (https:// with tls.ca set when it serves TLS)?"
    )]
    Connect {
        /// The address tried.
        address: String,
        /// The transport's reason.
        source: tonic::transport::Error,
    },
    /// The connection was not established in time (a stopped or
    /// overloaded coordinator accepts TCP but never answers).
    #[error(
        "the coordinator at {address} did not complete a connection within {seconds} s \
         (coordinator.heartbeat_timeout_s): it is stopped, overloaded or behind a broken network"
    )]
    ConnectTimeout {
        /// The address tried.
        address: String,
        /// The deadline.
        seconds: u64,
    },
    /// The coordinator refused this worker at join (token, version, config).
    #[error("the coordinator refused this worker: {message}")]
    Refused {
        /// The status code: why, in one word.
        code: tonic::Code,
        /// The coordinator's message, escaped.
        message: String,
    },
    /// The coordinator answered a call with an error.
    #[error("the coordinator stream failed: {0}")]
    Stream(String),
    /// The connection broke underneath the stream.
    #[error(
        "lost the connection to the coordinator: it exited, was stopped, or did not answer \
         pings for coordinator.heartbeat_timeout_s ({0})"
    )]
    Disconnected(String),
    /// The connection closed before the coordinator answered Join: it
    /// holds no free connection slot, or it stopped.
    #[error(
        "the coordinator closed the connection before answering Join ({0}): all its connection \
         slots may be taken (a client holding them all), or it stopped; trying again is safe"
    )]
    TurnedAway(String),
    /// The coordinator stopped the run, and said why (escaped).
    #[error("the coordinator aborted the run: {0}")]
    Aborted(String),
    /// The group re-forms: go back to the last completed step and join again.
    #[error("the group re-forms: {0}")]
    Regroup(String),
    /// The coordinator sent something the protocol does not allow here.
    #[error("protocol violation from the coordinator: {0}")]
    Protocol(String),
    /// The coordinator went away without a word.
    #[error("the coordinator closed the session unexpectedly")]
    Closed,
    /// A reduced chunk did not decode.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The TLS settings cannot be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl SessionError {
    /// Whether running this worker again cannot help: the coordinator
    /// refused it for its token, protocol or configuration, or its TLS
    /// settings are unusable. A taken rank or a lost connection may clear.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Refused { code, .. } => matches!(
                code,
                tonic::Code::Unauthenticated
                    | tonic::Code::FailedPrecondition
                    | tonic::Code::InvalidArgument
                    | tonic::Code::PermissionDenied
            ),
            Self::Address { .. } | Self::Tls(_) => true,
            _ => false,
        }
    }

    /// Whether trying again later may succeed: the coordinator is gone
    /// (not answering, its stream broken) and may come back, or it could
    /// not take this worker in yet. A worker that holds its replica waits.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Disconnected(_)
            | Self::TurnedAway(_)
            | Self::Closed
            | Self::Connect { .. }
            | Self::ConnectTimeout { .. } => true,
            Self::Refused { code, .. } => *code == tonic::Code::Unavailable,
            _ => false,
        }
    }

    /// Whether nothing listens at the address yet (connection refused, no
    /// socket file, a name not resolving yet): a coordinator that is still starting, as a pod's
    /// usually is when its workers start. A wrong TLS setting or a
    /// stranger at the address is not this.
    pub fn is_not_listening(&self) -> bool {
        let Self::Connect { source, .. } = self else {
            return false;
        };
        first_io(source).is_some_and(not_listening)
    }
}

impl From<tonic::Status> for SessionError {
    /// Statuses the coordinator sent carry no source; those made from a
    /// transport error (connection reset, keepalive timeout) do.
    fn from(status: tonic::Status) -> Self {
        match std::error::Error::source(&status) {
            Some(cause) => Self::Disconnected(cause.to_string()),
            None => Self::Stream(shown_message(status.message())),
        }
    }
}

/// The first I/O error in `cause`'s chain: what the operating system said
/// about the connection, under whatever the transport wrapped it in.
pub(super) fn first_io<'a>(
    cause: &'a (dyn std::error::Error + 'static),
) -> Option<&'a std::io::Error> {
    let mut cause = Some(cause);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        cause = e.source();
    }
    None
}

/// Whether `io` says nothing listens at the address (yet).
fn not_listening(io: &std::io::Error) -> bool {
    // A name that does not resolve yet: a Service whose DNS record
    // appears with its pod (headless), or a container alias.
    // std's getaddrinfo error has no kind of its own, only this text.
    let unresolved = io
        .to_string()
        .starts_with("failed to lookup address information");
    unresolved
        || matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Error, ErrorKind};

    fn refused(code: tonic::Code) -> SessionError {
        SessionError::Refused {
            code,
            message: "why".into(),
        }
    }

    #[test]
    fn a_refusal_for_who_the_worker_is_is_permanent_and_a_busy_one_is_not() {
        for code in [
            tonic::Code::Unauthenticated,
            tonic::Code::FailedPrecondition,
            tonic::Code::InvalidArgument,
            tonic::Code::PermissionDenied,
        ] {
            assert!(refused(code).is_permanent(), "{code:?}");
            assert!(!refused(code).is_transient(), "{code:?}");
        }
        assert!(!refused(tonic::Code::ResourceExhausted).is_permanent());
        assert!(refused(tonic::Code::Unavailable).is_transient());
    }

    #[test]
    fn a_lost_coordinator_is_transient_and_a_regroup_or_abort_neither() {
        for lost in [
            SessionError::Closed,
            SessionError::Disconnected("reset".into()),
            SessionError::TurnedAway("eof".into()),
            SessionError::ConnectTimeout {
                address: "http://x".into(),
                seconds: 1,
            },
        ] {
            assert!(lost.is_transient(), "{lost}");
            assert!(!lost.is_permanent(), "{lost}");
        }
        for decided in [
            SessionError::Regroup("a member left".into()),
            SessionError::Aborted("diverged".into()),
            SessionError::Protocol("bad chunk".into()),
        ] {
            assert!(!decided.is_transient(), "{decided}");
            assert!(!decided.is_permanent(), "{decided}");
        }
    }

    #[test]
    fn a_status_the_coordinator_sent_is_escaped_and_a_transport_failure_is_a_disconnect() {
        let sent = tonic::Status::internal("bad\nline\u{1b}[31m");
        match SessionError::from(sent) {
            SessionError::Stream(message) => {
                assert!(
                    !message.contains('\n') && !message.contains('\u{1b}'),
                    "{message}"
                );
            }
            other => panic!("expected Stream, got {other:?}"),
        }
        let broken = tonic::Status::from_error(Box::new(Error::from(ErrorKind::ConnectionReset)));
        assert!(matches!(
            SessionError::from(broken),
            SessionError::Disconnected(_)
        ));
    }

    #[test]
    fn the_first_io_error_is_found_under_wrappers_and_says_whether_anything_listens() {
        #[derive(Debug, thiserror::Error)]
        #[error("wrapped")]
        struct Wrapped(#[source] Error);
        let refused = Wrapped(Error::from(ErrorKind::ConnectionRefused));
        let io = first_io(&refused).expect("an io error under the wrapper");
        assert_eq!(io.kind(), ErrorKind::ConnectionRefused);
        assert!(not_listening(io));
        assert!(not_listening(&Error::from(ErrorKind::NotFound)));
        assert!(not_listening(&Error::other(
            "failed to lookup address information: Name or service not known"
        )));
        assert!(!not_listening(&Error::from(ErrorKind::PermissionDenied)));
        assert!(first_io(&SessionError::Closed).is_none());
    }
}
