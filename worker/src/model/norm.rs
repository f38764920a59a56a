//! Batch normalisation exactly as PyTorch's `BatchNorm2d` does it.
//!
//! The parity harness (`worker parity`, BENCHMARKS.md) found burn 0.21's
//! `BatchNorm` off from PyTorch's in its running statistics, which are
//! what a generator samples with in inference mode (`valid()`, PyTorch's
//! `eval()`), in two ways:
//! - it reads them with `RunningState::value()`, which returns the value
//!   as of the last forward pass in training mode, not after it: sampling
//!   and the saved statistics missed the last update of every step;
//! - it keeps the biased batch variance, PyTorch the unbiased one,
//!   `var · n / (n − 1)` (0.8 % for 8 images of 4×4).
//!
//! This module is burn's computation with both fixed; its record has the
//! same four fields.

use burn::module::{Module, Param, RunningState};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

/// PyTorch's momentum: the running statistics move 10 % towards each batch's.
const MOMENTUM: f64 = 0.1;
/// PyTorch's epsilon.
const EPSILON: f64 = 1e-5;

/// Batch normalisation over `[batch, channels, height, width]`.
#[derive(Module, Debug)]
pub struct BatchNorm<B: Backend> {
    /// The learnable scale γ.
    pub gamma: Param<Tensor<B, 1>>,
    /// The learnable shift β.
    pub beta: Param<Tensor<B, 1>>,
    /// The running mean, for inference.
    pub running_mean: RunningState<Tensor<B, 1>>,
    /// The running (unbiased) variance, for inference.
    pub running_var: RunningState<Tensor<B, 1>>,
}

impl<B: Backend> BatchNorm<B> {
    /// γ and β as given; running mean 0 and variance 1, as PyTorch starts.
    pub fn new(gamma: Param<Tensor<B, 1>>, beta: Param<Tensor<B, 1>>, device: &B::Device) -> Self {
        let channels = gamma.val().dims()[0];
        Self {
            gamma,
            beta,
            running_mean: RunningState::new(Tensor::zeros([channels], device)),
            running_var: RunningState::new(Tensor::ones([channels], device)),
        }
    }

    /// Normalises with the batch's statistics (and updates the running
    /// ones) while training under autodiff, with the running ones otherwise.
    pub fn forward(&self, input: Tensor<B, 4>) -> Tensor<B, 4> {
        let device = input.device();
        if !B::ad_enabled(&device) {
            let (mean, var) = (self.running_mean(), self.running_var());
            return self.normalise(input, mean.to_device(&device), var.to_device(&device));
        }
        let [batch, channels, height, width] = input.dims();
        let n = batch * height * width;
        let per_channel = |t: Tensor<B, 4>| -> Tensor<B, 1> {
            t.swap_dims(0, 1)
                .reshape([channels, n])
                .mean_dim(1)
                .reshape([channels])
        };
        let mean = per_channel(input.clone()); // [channels]
        let centred = input.clone() - mean.clone().reshape([1, channels, 1, 1]);
        let var = per_channel(centred.square()); // [channels], biased: what normalises
        let unbiased = var.clone().detach() * (n as f64 / (n as f64 - 1.0).max(1.0));
        let running_mean = self.running_mean.value_sync().to_device(&device) * (1.0 - MOMENTUM)
            + mean.clone().detach() * MOMENTUM;
        let running_var = self.running_var.value_sync().to_device(&device) * (1.0 - MOMENTUM)
            + unbiased * MOMENTUM;
        self.running_mean.update(running_mean.detach());
        self.running_var.update(running_var.detach());
        self.normalise(input, mean, var)
    }

    /// A copy whose running statistics are its own (burn shares a
    /// `RunningState` between clones), for a snapshot that later updates
    /// must not touch.
    pub fn detached(&self) -> Self {
        Self {
            gamma: self.gamma.clone(),
            beta: self.beta.clone(),
            running_mean: RunningState::new(self.running_mean()),
            running_var: RunningState::new(self.running_var()),
        }
    }

    /// The running mean, including the last update.
    pub fn running_mean(&self) -> Tensor<B, 1> {
        self.running_mean.value_sync()
    }

    /// The running (unbiased) variance, including the last update.
    pub fn running_var(&self) -> Tensor<B, 1> {
        self.running_var.value_sync()
    }

    fn normalise(&self, x: Tensor<B, 4>, mean: Tensor<B, 1>, var: Tensor<B, 1>) -> Tensor<B, 4> {
        let channels = mean.dims()[0];
        let shape = [1, channels, 1, 1];
        let std = (var + EPSILON).sqrt().reshape(shape);
        let x = (x - mean.reshape(shape)) / std;
        x * self.gamma.val().reshape(shape) + self.beta.val().reshape(shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::backend::TrainBackend as B;
    use burn::tensor::TensorData;

    #[test]
    fn the_running_variance_is_the_unbiased_one_as_in_pytorch() {
        let device = Default::default();
        let norm = BatchNorm::<B>::new(
            Param::from_tensor(Tensor::ones([1], &device)),
            Param::from_tensor(Tensor::zeros([1], &device)),
            &device,
        );
        // One channel, values 0, 1, 2, 3: mean 1.5, biased var 1.25, unbiased 5/3.
        let x = Tensor::<B, 4>::from_data(
            TensorData::new(vec![0.0f32, 1.0, 2.0, 3.0], [4, 1, 1, 1]),
            &device,
        );
        let y: Vec<f32> = norm.forward(x).into_data().into_vec().unwrap();
        assert!(
            (y[0] + 1.5 / 1.25f32.sqrt()).abs() < 1e-3,
            "normalised with the biased var: {y:?}"
        );
        let var: Vec<f32> = norm.running_var().into_data().into_vec().unwrap();
        let mean: Vec<f32> = norm.running_mean().into_data().into_vec().unwrap();
        assert!((var[0] - (0.9 + 0.1 * 5.0 / 3.0)).abs() < 1e-6, "{var:?}");
        assert!((mean[0] - 0.15).abs() < 1e-6, "{mean:?}");
    }
}
