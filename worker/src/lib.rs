//! The gancluster worker: the burn DCGAN, the CelebA data pipeline and the
//! training loop, run standalone or as one replica of a coordinator-driven
//! data-parallel group.
//!
//! # Layout
//!
//! - [`model`]: backend and device, the DCGAN networks, flat parameters.
//! - [`data`]: CelebA and the built-in synthetic faces, decoding, batches.
//! - [`train`]: one iteration, the step loop, checkpoints, outputs.
//! - [`replica`]: the worker's life in a distributed group.
//! - [`eval`]: SWD against held-out images.
//! - [`tools`]: `bench`, `check-backend`, `parity`, `fetch-data`.

pub mod data;
pub mod eval;
pub mod model;
pub mod replica;
pub mod tools;
pub mod train;
