//! Shared pieces of gancluster that do not need burn: configuration,
//! data-set sharding and the errors they report.
//!
//! The coordinator depends on this crate only, so it compiles fast and its
//! image stays small; anything touching tensors lives in `worker`.
#![deny(missing_docs)]

pub mod config;
pub mod logging;
pub mod shard;

pub use config::{Config, ConfigError};
pub use shard::ShardSampler;
