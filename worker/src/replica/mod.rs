//! One replica of a coordinator-driven group (`worker train --coordinator
//! URL`): the worker's lifecycle across generations.
//!
//! - `lifecycle`: the rules, pure: phases (starting, member, orphaned),
//!   what each way a join or a generation can end leads to, timeouts;
//! - `driver`: [`run`], which does what the rules say (connect, train,
//!   wait, look in the store);
//! - `joining`: what a worker presents when it joins, and the replica it
//!   gives; `begin`: taking up the coordinator's start;
//! - `remote`: the coordinator-backed training seam (all-reduce, reports,
//!   checkpoints), which keeps why its session ended;
//! - `stop_signal`: SIGTERM forwarded as a stop request;
//! - [`failure`]: which failures a restart would meet again (the exit status);
//! - `faults` (feature `faults`, for tests): injected faults.

mod begin;
mod driver;
pub mod failure;
#[cfg(feature = "faults")]
mod faults;
mod joining;
mod lifecycle;
mod remote;
mod stop_signal;

pub use driver::{Connection, Endpoints, run};
