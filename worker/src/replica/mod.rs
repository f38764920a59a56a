//! One replica of a coordinator-driven group: the worker's lifecycle
//! (join, train, re-join after a regroup, finish), which failures are
//! permanent, and (with the `faults` feature, for tests) fault injection.

pub mod distributed;
pub mod failure;
#[cfg(feature = "faults")]
pub(crate) mod faults;
