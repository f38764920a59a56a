//! The DCGAN's tensor shapes derived from the model keys alone: the
//! coordinator, which has no burn, checks every gradient header against
//! them and PowerSGD lays its factors out by them.

use super::ModelConfig;

impl ModelConfig {
    /// Trainable scalars of the generator: the length of its flat gradient,
    /// which the coordinator checks every gradient header against (it has
    /// no burn to ask).
    pub fn generator_params(&self) -> u64 {
        count(&self.generator_tensors())
    }

    /// Trainable scalars of the discriminator (see [`ModelConfig::generator_params`]).
    pub fn discriminator_params(&self) -> u64 {
        count(&self.discriminator_tensors())
    }

    /// The generator's trainable tensors in flat-gradient order, as
    /// dimensions (PyTorch's `state_dict` order): PowerSGD compresses each
    /// weight as a matrix, which needs their shapes, not only their sum.
    /// Every layer is a bias-free 4×4 transposed convolution ([in, out, 4,
    /// 4]); each BatchNorm adds a scale and a shift per channel.
    pub fn generator_tensors(&self) -> Vec<Vec<usize>> {
        let mut channels = self.ngf << (self.depth() - 1);
        let mut all = vec![vec![self.nz, channels, 4, 4]];
        all.extend([vec![channels], vec![channels]]);
        for _ in 1..self.depth() {
            all.push(vec![channels, channels / 2, 4, 4]);
            channels /= 2;
            all.extend([vec![channels], vec![channels]]);
        }
        all.push(vec![channels, 3, 4, 4]);
        all
    }

    /// The discriminator's trainable tensors (see
    /// [`ModelConfig::generator_tensors`]); convolutions are [out, in, 4, 4].
    pub fn discriminator_tensors(&self) -> Vec<Vec<usize>> {
        let mut channels = self.ndf;
        let mut all = vec![vec![channels, 3, 4, 4]];
        for _ in 1..self.depth() {
            all.push(vec![channels * 2, channels, 4, 4]);
            channels *= 2;
            all.extend([vec![channels], vec![channels]]);
        }
        all.push(vec![1, channels, 4, 4]);
        all
    }

    /// Stride-2 layers between 4×4 and the image: 64 → 4, 16 → 2.
    fn depth(&self) -> usize {
        self.image_size.trailing_zeros() as usize - 2
    }
}

/// Scalars in `tensors`.
fn count(tensors: &[Vec<usize>]) -> u64 {
    tensors
        .iter()
        .map(|dims| dims.iter().product::<usize>() as u64)
        .sum()
}
