//! How a binary ends: the one message that explains a failure, and an
//! exit code a supervisor can act on.
//!
//! Error types often say their cause in their own message and also expose
//! it as their `source`; printing the chain naively says everything twice
//! ("checkpoint store: bucket missing / Caused by: bucket missing"). The
//! report keeps a cause only when the messages above do not already say it.

use std::error::Error;

/// Exit status of a run that did what was asked (including "already complete").
pub const SUCCESS: u8 = 0;
/// Exit status of a failure that running again may get past (a lost
/// worker, a network outage): supervisors restart it.
pub const FAILURE: u8 = 1;
/// Exit status of a run that stopped on request (SIGTERM: an eviction, a
/// node drain, Ctrl-C) after checkpointing, before its last step
/// (sysexits' EX_TEMPFAIL): not done, so a Job starts the pod again and the
/// run resumes from that checkpoint; by hand, run the same command.
pub const STOPPED: u8 = 75;
/// Exit status of a failure that running again cannot fix (sysexits'
/// EX_CONFIG: configuration, data, credentials): Kubernetes fails the Job
/// instead of restarting the pod (see deploy/).
pub const CONFIG: u8 = 78;

/// `error` and those of its causes that add something, one per line.
pub fn render(error: &(dyn Error + 'static)) -> String {
    let mut said = error.to_string();
    let mut cause = error.source();
    while let Some(next) = cause {
        let text = next.to_string();
        if !said.contains(&text) {
            said.push_str("\n  caused by: ");
            said.push_str(&text);
        }
        cause = next.source();
    }
    said
}

/// Whether `error` or any of its causes is of type `T`.
pub fn caused_by<T: Error + 'static>(error: &(dyn Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.is::<T>() {
            return true;
        }
        current = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("checkpoint store: {0}")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("bucket `runs` does not exist")]
    struct Inner;

    #[derive(Debug, thiserror::Error)]
    #[error("training failed")]
    struct Top(#[source] Outer);

    #[test]
    fn a_cause_already_said_is_not_said_again() {
        let text = render(&Top(Outer(Inner)));
        assert_eq!(
            text,
            "training failed\n  caused by: checkpoint store: bucket `runs` does not exist"
        );
        assert_eq!(text.matches("does not exist").count(), 1);
    }

    #[test]
    fn causes_are_found_by_type() {
        assert!(caused_by::<Inner>(&Top(Outer(Inner))));
        assert!(!caused_by::<std::io::Error>(&Top(Outer(Inner))));
    }
}
