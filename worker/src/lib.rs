//! The gancluster worker: the burn DCGAN, the CelebA data pipeline and the
//! training loop, run standalone or as one replica of a coordinator-driven
//! data-parallel group.

pub mod averaging;
pub mod backend;
pub mod bench;
pub mod check_backend;
pub mod checkpoint;
pub mod data;
pub mod distributed;
pub mod eval;
pub mod failure;
#[cfg(feature = "faults")]
pub mod faults;
pub mod fetch;
pub mod gan_step;
pub mod model;
pub mod norm;
pub mod output;
pub mod params;
pub mod parity;
pub mod plot;
pub mod replica_loop;
pub mod standalone;
pub mod swd;
pub mod telemetry;
