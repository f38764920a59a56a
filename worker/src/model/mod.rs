//! The networks and what the rest of the worker needs to move them: the
//! burn backend and device ([`backend`]), the DCGAN generator and
//! discriminator ([`dcgan`]), PyTorch-exact batch norm, and parameters and
//! gradients as flat vectors (what the all-reduce carries).

pub mod backend;
pub(crate) mod dcgan;
pub(crate) mod norm;
pub(crate) mod params;
