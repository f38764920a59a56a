//! Shared pieces of gancluster that do not need burn: configuration, the
//! wire contract, the worker's client side of the protocol, storage and
//! checkpoints, data-set sampling and process plumbing.
//!
//! The coordinator depends on this crate only, so it compiles fast and its
//! image stays small; anything touching tensors lives in `worker`.
//!
//! # Layout
//!
//! - [`config`]: the schema (`gancluster.toml`, `GANCLUSTER__…` variables,
//!   flags), its loading and its validation.
//! - [`protocol`]: the gRPC messages, the protocol version and every limit
//!   a peer is held to, the gradient codec, PowerSGD, replica bundles.
//! - [`security`]: the token, TLS, peer text made safe to print.
//! - [`client`]: the worker's session with the coordinator.
//! - [`storage`]: the object store, the checkpoint layout, the run's lease,
//!   the output folder's file names.
//! - [`sampling`]: which samples each rank reads, which steps synchronise.
//! - [`process`]: flags, logging, exit codes, health and metrics.
//! - [`tensorboard`]: event files TensorBoard reads, written while training.
#![deny(missing_docs)]

pub mod client;
pub mod config;
pub mod process;
pub mod protocol;
pub mod sampling;
pub mod security;
pub mod storage;
pub mod tensorboard;

pub use config::{Config, ConfigError};
pub use sampling::shard::{DataCursor, ShardSampler, StepPlan};
