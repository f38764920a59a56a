//! The DCGAN generator and discriminator (Radford et al., 2015).
//!
//! Layer counts follow the image size so the same code trains the 64×64
//! reference and the tiny 16×16 networks the tests use. Weights start from
//! N(0, 0.02) and BatchNorm scales from N(1, 0.02), as in the paper, drawn
//! from the caller's seeded stream rather than burn's process-wide RNG: the
//! initial weights then depend on the seed alone, on every backend, however
//! many models a process builds concurrently.

use burn::module::{Module, Param};
use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig};
use burn::tensor::activation::{leaky_relu, relu, tanh};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use common::config::ModelConfig;

use crate::model::norm::BatchNorm;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

const WEIGHT_STD: f32 = 0.02;
const LEAK: f64 = 0.2;

/// Maps noise z ~ N(0, I) to an image in [−1, 1].
#[derive(Module, Debug)]
pub struct Generator<B: Backend> {
    blocks: Vec<UpBlock<B>>,
    to_rgb: ConvTranspose2d<B>,
}

/// Scores an image: a logit, positive meaning "real".
#[derive(Module, Debug)]
pub struct Discriminator<B: Backend> {
    from_rgb: Conv2d<B>,
    blocks: Vec<DownBlock<B>>,
    to_logit: Conv2d<B>,
}

/// ConvTranspose → BatchNorm → ReLU.
#[derive(Module, Debug)]
struct UpBlock<B: Backend> {
    conv: ConvTranspose2d<B>,
    norm: BatchNorm<B>,
}

/// Conv → BatchNorm → LeakyReLU(0.2).
#[derive(Module, Debug)]
struct DownBlock<B: Backend> {
    conv: Conv2d<B>,
    norm: BatchNorm<B>,
}

/// One tensor of a network under the name PyTorch's reference
/// `nn.Sequential` gives it (`0.weight`, `1.running_var`…), so the parity
/// harness can load our weights into the reference modules and compare
/// what comes back tensor by tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Named {
    /// The `state_dict` key.
    pub name: String,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Values, row-major.
    pub values: Vec<f32>,
    /// Whether it is a trainable parameter (its gradient is in the flat
    /// gradient, in this order) rather than a running statistic.
    pub trainable: bool,
}

fn named<B: Backend, const D: usize>(name: String, tensor: Tensor<B, D>, trainable: bool) -> Named {
    Named {
        name,
        shape: tensor.dims().to_vec(),
        values: tensor
            .into_data()
            .convert::<f32>()
            .into_vec()
            .expect("a float tensor"),
        trainable,
    }
}

fn named_norm<B: Backend>(index: usize, norm: &BatchNorm<B>) -> [Named; 4] {
    [
        named(format!("{index}.weight"), norm.gamma.val(), true),
        named(format!("{index}.bias"), norm.beta.val(), true),
        named(format!("{index}.running_mean"), norm.running_mean(), false),
        named(format!("{index}.running_var"), norm.running_var(), false),
    ]
}

/// Stride-2 layers between 4×4 and the image: 64 → 4, 16 → 2.
fn depth(image_size: usize) -> usize {
    image_size.trailing_zeros() as usize - 2
}

/// Draws N(mean, 0.02) parameters of any shape from a seeded stream.
pub struct WeightInit<'a, B: Backend> {
    rng: &'a mut ChaCha8Rng,
    device: &'a B::Device,
}

impl<'a, B: Backend> WeightInit<'a, B> {
    /// Draws from `rng`, placing tensors on `device`.
    pub fn new(rng: &'a mut ChaCha8Rng, device: &'a B::Device) -> Self {
        Self { rng, device }
    }

    fn normal<const D: usize>(&mut self, dims: [usize; D], mean: f32) -> Param<Tensor<B, D>> {
        let dist = Normal::new(mean, WEIGHT_STD).expect("a positive standard deviation");
        let values: Vec<f32> = (0..dims.iter().product())
            .map(|_| dist.sample(self.rng))
            .collect();
        Param::from_tensor(Tensor::from_data(
            TensorData::new(values, dims),
            self.device,
        ))
    }

    fn batch_norm(&mut self, channels: usize) -> BatchNorm<B> {
        let gamma = self.normal([channels], 1.0);
        let beta = Param::from_tensor(Tensor::zeros([channels], self.device));
        BatchNorm::new(gamma, beta, self.device)
    }

    fn conv_t(&mut self, [cin, cout]: [usize; 2], stride: usize, pad: usize) -> ConvTranspose2d<B> {
        let mut layer = ConvTranspose2dConfig::new([cin, cout], [4, 4])
            .with_stride([stride, stride])
            .with_padding([pad, pad])
            .with_bias(false)
            .init(self.device);
        layer.weight = self.normal([cin, cout, 4, 4], 0.0);
        layer
    }

    fn conv(&mut self, [cin, cout]: [usize; 2], stride: usize, pad: usize) -> Conv2d<B> {
        let mut layer = Conv2dConfig::new([cin, cout], [4, 4])
            .with_stride([stride, stride])
            .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
            .with_bias(false)
            .init(self.device);
        layer.weight = self.normal([cout, cin, 4, 4], 0.0);
        layer
    }
}

impl<B: Backend> Generator<B> {
    /// A freshly initialised generator.
    pub fn new(cfg: &ModelConfig, init: &mut WeightInit<B>) -> Self {
        let n = depth(cfg.image_size);
        let mut channels = cfg.ngf << (n - 1);
        // The first block turns z into a 4×4 map (k4 s1 p0), the rest double the size.
        let mut blocks = vec![UpBlock {
            conv: init.conv_t([cfg.nz, channels], 1, 0),
            norm: init.batch_norm(channels),
        }];
        for _ in 1..n {
            blocks.push(UpBlock {
                conv: init.conv_t([channels, channels / 2], 2, 1),
                norm: init.batch_norm(channels / 2),
            });
            channels /= 2;
        }
        let to_rgb = init.conv_t([channels, 3], 2, 1);
        Self { blocks, to_rgb }
    }

    /// A copy that later training does not change (see [`BatchNorm::detached`]).
    pub fn detached(&self) -> Self {
        let mut copy = self.clone();
        for block in &mut copy.blocks {
            block.norm = block.norm.detached();
        }
        copy
    }

    /// Every tensor in PyTorch's `state_dict` order and names: each block is
    /// ConvTranspose (3i), BatchNorm (3i+1), ReLU; then the last ConvTranspose.
    pub fn named(&self) -> Vec<Named> {
        let mut all = Vec::new();
        for (i, block) in self.blocks.iter().enumerate() {
            all.push(named(
                format!("{}.weight", 3 * i),
                block.conv.weight.val(),
                true,
            ));
            all.extend(named_norm(3 * i + 1, &block.norm));
        }
        let last = 3 * self.blocks.len();
        all.push(named(
            format!("{last}.weight"),
            self.to_rgb.weight.val(),
            true,
        ));
        all
    }

    /// `z`: [batch, nz] → images [batch, 3, size, size] in [−1, 1].
    pub fn forward(&self, z: Tensor<B, 2>) -> Tensor<B, 4> {
        let [batch, nz] = z.dims();
        let mut x = z.reshape([batch, nz, 1, 1]); // [batch, nz, 1, 1]
        for block in &self.blocks {
            x = relu(block.norm.forward(block.conv.forward(x))); // [batch, c, 4·2^i, 4·2^i]
        }
        tanh(self.to_rgb.forward(x)) // [batch, 3, size, size]
    }
}

impl<B: Backend> Discriminator<B> {
    /// A freshly initialised discriminator.
    pub fn new(cfg: &ModelConfig, init: &mut WeightInit<B>) -> Self {
        let n = depth(cfg.image_size);
        let from_rgb = init.conv([3, cfg.ndf], 2, 1);
        let mut channels = cfg.ndf;
        let mut blocks = Vec::with_capacity(n - 1);
        for _ in 1..n {
            blocks.push(DownBlock {
                conv: init.conv([channels, channels * 2], 2, 1),
                norm: init.batch_norm(channels * 2),
            });
            channels *= 2;
        }
        let to_logit = init.conv([channels, 1], 1, 0);
        Self {
            from_rgb,
            blocks,
            to_logit,
        }
    }

    /// A copy that later training does not change (see [`BatchNorm::detached`]).
    pub fn detached(&self) -> Self {
        let mut copy = self.clone();
        for block in &mut copy.blocks {
            block.norm = block.norm.detached();
        }
        copy
    }

    /// Every tensor in PyTorch's `state_dict` order and names: Conv (0),
    /// LeakyReLU, each block Conv (2+3j), BatchNorm (3+3j), LeakyReLU; then
    /// the last Conv.
    pub fn named(&self) -> Vec<Named> {
        let mut all = vec![named("0.weight".into(), self.from_rgb.weight.val(), true)];
        for (j, block) in self.blocks.iter().enumerate() {
            all.push(named(
                format!("{}.weight", 2 + 3 * j),
                block.conv.weight.val(),
                true,
            ));
            all.extend(named_norm(3 + 3 * j, &block.norm));
        }
        let last = 2 + 3 * self.blocks.len();
        all.push(named(
            format!("{last}.weight"),
            self.to_logit.weight.val(),
            true,
        ));
        all
    }

    /// Images [batch, 3, size, size] → logits [batch].
    pub fn forward(&self, images: Tensor<B, 4>) -> Tensor<B, 1> {
        let mut x = leaky_relu(self.from_rgb.forward(images), LEAK); // [batch, ndf, size/2, size/2]
        for block in &self.blocks {
            x = leaky_relu(block.norm.forward(block.conv.forward(x)), LEAK); // [batch, c·2, h/2, w/2]
        }
        let logits = self.to_logit.forward(x); // [batch, 1, 1, 1]
        let [batch, _, _, _] = logits.dims();
        logits.reshape([batch])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::backend::Inner as B;
    use burn::module::Module;
    use rand::SeedableRng;

    fn rng() -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(0)
    }

    fn cfg(image_size: usize) -> ModelConfig {
        ModelConfig {
            image_size,
            nz: 100,
            ngf: 64,
            ndf: 64,
        }
    }

    #[test]
    fn reference_network_has_the_published_parameter_counts() {
        let device = Default::default();
        let mut rng = rng();
        let mut init = WeightInit::new(&mut rng, &device);
        let g = Generator::<B>::new(&cfg(64), &mut init);
        let d = Discriminator::<B>::new(&cfg(64), &mut init);
        // BatchNorm running statistics are counted by burn as parameters too:
        // subtract them to compare with PyTorch's `parameters()`.
        let g_bn = 2 * (512 + 256 + 128 + 64);
        let d_bn = 2 * (128 + 256 + 512);
        assert_eq!(g.num_params() - g_bn, 3_576_704);
        assert_eq!(d.num_params() - d_bn, 2_765_568);
    }

    #[test]
    fn weights_follow_the_dcgan_initialisation() {
        let device = Default::default();
        let mut rng = rng();
        let g = Generator::<B>::new(&cfg(64), &mut WeightInit::new(&mut rng, &device));
        let w: Vec<f32> = g.blocks[1]
            .conv
            .weight
            .val()
            .into_data()
            .into_vec()
            .unwrap();
        let mean = w.iter().sum::<f32>() / w.len() as f32;
        let std = (w.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / w.len() as f32).sqrt();
        assert!(
            mean.abs() < 1e-3 && (std - 0.02).abs() < 1e-3,
            "mean {mean} std {std}"
        );
        let gamma: Vec<f32> = g.blocks[1].norm.gamma.val().into_data().into_vec().unwrap();
        let gamma_mean = gamma.iter().sum::<f32>() / gamma.len() as f32;
        assert!((gamma_mean - 1.0).abs() < 0.01, "gamma mean {gamma_mean}");
    }

    #[test]
    fn shapes_follow_the_image_size() {
        let device = Default::default();
        for size in [16, 32, 64] {
            let small = ModelConfig {
                image_size: size,
                nz: 8,
                ngf: 4,
                ndf: 4,
            };
            let mut rng = rng();
            let mut init = WeightInit::new(&mut rng, &device);
            let g = Generator::<B>::new(&small, &mut init);
            let d = Discriminator::<B>::new(&small, &mut init);
            let images = g.forward(Tensor::zeros([2, 8], &device));
            assert_eq!(images.dims(), [2, 3, size, size]);
            assert_eq!(d.forward(images).dims(), [2]);
        }
    }
}
