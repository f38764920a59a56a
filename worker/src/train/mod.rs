//! Training a replica: one DCGAN iteration with the seam where gradients
//! are reduced ([`step`]: `GradientReducer`), the step loop every replica
//! runs standalone or distributed ([`replica_loop`]: `StepSync`), post-local
//! SGD's state averaging, checkpoints, and what a run leaves for people
//! (loss log, curves, sample grid), for TensorBoard and for Prometheus.

pub(crate) mod averaging;
pub mod checkpoint;
pub mod output;
pub mod plot;
pub mod replica_loop;
pub mod standalone;
pub mod step;
pub(crate) mod telemetry;
mod tensorboard;
