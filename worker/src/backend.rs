//! Which burn backend the worker computes on, chosen by cargo features.
//!
//! `cuda` wins when enabled; otherwise the pure-Rust CPU backend picked by
//! measurement (see BENCHMARKS.md) is used. Training always runs under
//! `Autodiff`; sampling and evaluation use the inner backend.

use burn::backend::Autodiff;

#[cfg(feature = "cuda")]
mod selected {
    /// NVIDIA GPUs through CubeCL.
    pub type Inner = burn::backend::Cuda;
    /// The backend's name in logs and benchmark lines.
    pub const NAME: &str = "cuda";
}

#[cfg(all(not(feature = "cuda"), feature = "flex"))]
mod selected {
    /// burn's pure-Rust SIMD + rayon CPU backend.
    pub type Inner = burn::backend::Flex;
    /// The backend's name in logs and benchmark lines.
    pub const NAME: &str = "flex";
}

#[cfg(all(not(feature = "cuda"), not(feature = "flex"), feature = "candle"))]
mod selected {
    /// Candle's CPU backend.
    pub type Inner = burn::backend::Candle;
    /// The backend's name in logs and benchmark lines.
    pub const NAME: &str = "candle";
}

#[cfg(all(
    not(feature = "cuda"),
    not(feature = "flex"),
    not(feature = "candle"),
    feature = "ndarray"
))]
mod selected {
    /// ndarray's CPU backend.
    pub type Inner = burn::backend::NdArray;
    /// The backend's name in logs and benchmark lines.
    pub const NAME: &str = "ndarray";
}

#[cfg(not(any(
    feature = "cuda",
    feature = "flex",
    feature = "candle",
    feature = "ndarray"
)))]
compile_error!("enable one backend feature: flex (default), candle, ndarray or cuda");

pub use selected::{Inner, NAME};

/// The backend training runs on.
pub type TrainBackend = Autodiff<Inner>;

/// The device of the selected backend.
pub type Device = burn::tensor::Device<Inner>;

/// The device to train on, after checking it can actually be used.
///
/// burn's CUDA runtime panics on a background thread when `libcuda` is
/// missing; checking first turns that into an error a user can act on.
pub fn device() -> anyhow::Result<Device> {
    #[cfg(feature = "cuda")]
    cuda_driver_present()?;
    Ok(Device::default())
}

#[cfg(feature = "cuda")]
fn cuda_driver_present() -> anyhow::Result<()> {
    const NAMES: [&str; 2] = ["libcuda.so.1", "libcuda.so"];
    for name in NAMES {
        // SAFETY: loading the NVIDIA driver library runs only its own
        // initialisers; the handle is dropped right away.
        if unsafe { libloading::Library::new(name) }.is_ok() {
            return Ok(());
        }
    }
    anyhow::bail!(
        "this worker was built with the `cuda` feature but the NVIDIA driver library \
         (libcuda.so.1) cannot be loaded: run it on a machine with an NVIDIA GPU and driver, \
         or use a CPU build (without `--features cuda`)"
    )
}
