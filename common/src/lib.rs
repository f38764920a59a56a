//! Shared pieces of gancluster that do not need burn: configuration,
//! data-set sharding, the wire contract, the gradient codec and the
//! worker's client side of the coordinator protocol.
//!
//! The coordinator depends on this crate only, so it compiles fast and its
//! image stays small; anything touching tensors lives in `worker`.
#![deny(missing_docs)]

pub mod auth;
pub mod bundle;
pub mod cadence;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod lease;
pub mod logging;
pub mod observe;
pub mod pb;
pub mod powersgd;
pub mod report;
pub mod session;
pub mod shard;
pub mod store;
pub mod tls;
pub mod untrusted;
pub mod wire;

pub use config::{Config, ConfigError};
pub use shard::{DataCursor, ShardSampler, StepPlan};
