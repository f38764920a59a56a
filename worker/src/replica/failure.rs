//! Which failures running again cannot fix.
//!
//! A worker that stops because its data folder is missing, its
//! configuration is wrong or the coordinator refused its settings would meet
//! the same failure after a restart; one that lost its connection might not.
//! The coordinator (over the session) and a supervisor (through the exit
//! status) are told which it is, so neither restarts a worker in a loop.

use common::ConfigError;
use common::client::SessionError;
use common::process::observe::ObserveError;
use common::process::report::caused_by;
use common::security::auth::TokenError;
use common::security::tls::TlsError;
use common::storage::store::StoreError;

use crate::data::DataError;
use crate::tools::fetch::FetchError;

/// Whether `error` is one a restart would meet again.
pub fn is_permanent(error: &anyhow::Error) -> bool {
    let error = error.as_ref();
    caused_by::<ConfigError>(error)
        || caused_by::<DataError>(error)
        || caused_by::<TokenError>(error)
        || caused_by::<TlsError>(error)
        || find::<SessionError>(error).is_some_and(SessionError::is_permanent)
        || find::<StoreError>(error).is_some_and(StoreError::is_permanent)
        || find::<ObserveError>(error).is_some_and(ObserveError::is_permanent)
        || find::<FetchError>(error).is_some_and(FetchError::is_permanent)
}

/// The first error of type `T` in `error`'s chain.
fn find<'a, T: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn data_and_refusals_are_permanent_and_lost_connections_are_not() {
        let missing = anyhow::Error::new(DataError::Empty {
            path: PathBuf::from("/data"),
        })
        .context("training failed");
        assert!(is_permanent(&missing));
        let refused = anyhow::Error::new(SessionError::Refused {
            code: tonic::Code::FailedPrecondition,
            message: "configuration hash".into(),
        });
        assert!(is_permanent(&refused));
        let taken = anyhow::Error::new(SessionError::Refused {
            code: tonic::Code::ResourceExhausted,
            message: "rank 1 is taken".into(),
        });
        assert!(!is_permanent(&taken));
        assert!(!is_permanent(&anyhow::Error::new(SessionError::Closed)));
    }
}
