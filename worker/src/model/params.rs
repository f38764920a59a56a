//! Gradients as one flat `Vec<f32>` per network, and back.
//!
//! The all-reduce moves bytes, not tensors: every replica flattens its
//! gradients in the order burn's module visitor walks the trainable
//! parameters (BatchNorm running statistics are not trainable and are left
//! out), the coordinator averages them, and each replica turns the average
//! back into `GradientsParams` for its optimizer. The order is fixed by the
//! module's structure, so all replicas agree on it without negotiating.

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};

/// Number of trainable scalars in `module`: the length of its flat gradient.
pub fn trainable_len<B: AutodiffBackend, M: AutodiffModule<B>>(module: &M) -> usize {
    struct Count(usize);
    impl<B: AutodiffBackend> ModuleVisitor<B> for Count {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if param.val().is_require_grad() {
                self.0 += param.val().shape().num_elements();
            }
        }
    }
    let mut count = Count(0);
    module.visit(&mut count);
    count.0
}

/// Flattens `grads` of `module`'s trainable parameters in visitor order.
/// A parameter without a gradient contributes zeros, so the layout never
/// depends on which parameters the loss happened to reach.
pub fn flatten<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &GradientsParams,
) -> Vec<f32> {
    struct Flatten<'a> {
        grads: &'a GradientsParams,
        out: Vec<f32>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Flatten<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let value = param.val();
            if !value.is_require_grad() {
                return;
            }
            match self.grads.get::<B::InnerBackend, D>(param.id) {
                Some(grad) => self.out.extend(
                    grad.into_data()
                        .convert::<f32>()
                        .into_vec::<f32>()
                        .expect("gradient converted to f32"),
                ),
                None => self
                    .out
                    .resize(self.out.len() + value.shape().num_elements(), 0.0),
            }
        }
    }
    let mut visitor = Flatten {
        grads,
        out: Vec::with_capacity(trainable_len(module)),
    };
    module.visit(&mut visitor);
    visitor.out
}

/// Rebuilds `GradientsParams` for `module` from a flat gradient laid out as
/// [`flatten`] writes it.
///
/// # Panics
/// When `flat` does not have exactly [`trainable_len`] elements: replicas
/// disagreeing on the layout is a bug, and applying a misaligned gradient
/// would silently corrupt training.
pub fn unflatten<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    flat: &[f32],
) -> GradientsParams {
    struct Unflatten<'a> {
        flat: &'a [f32],
        grads: GradientsParams,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Unflatten<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let value = param.val();
            if !value.is_require_grad() {
                return;
            }
            let dims = value.dims();
            let (head, rest) = self.flat.split_at(value.shape().num_elements());
            self.flat = rest;
            let data = TensorData::new(head.to_vec(), dims);
            let grad = Tensor::<B::InnerBackend, D>::from_data(data, &value.device());
            self.grads.register::<B::InnerBackend, D>(param.id, grad);
        }
    }
    let expected = trainable_len(module);
    assert_eq!(
        flat.len(),
        expected,
        "flat gradient length does not match the module"
    );
    let mut visitor = Unflatten {
        flat,
        grads: GradientsParams::new(),
    };
    module.visit(&mut visitor);
    visitor.grads
}

/// The trainable parameters of `module` as one flat vector, in the same
/// order as its gradients.
pub fn flat_params<B: AutodiffBackend, M: AutodiffModule<B>>(module: &M) -> Vec<f32> {
    struct Collect(Vec<f32>);
    impl<B: AutodiffBackend> ModuleVisitor<B> for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let value = param.val();
            if value.is_require_grad() {
                let data = value.inner().into_data().convert::<f32>();
                self.0
                    .extend(data.into_vec::<f32>().expect("parameter converted to f32"));
            }
        }
    }
    let mut collect = Collect(Vec::with_capacity(trainable_len(module)));
    module.visit(&mut collect);
    collect.0
}

/// xxh3 over the little-endian bits of `parts`, in order.
pub fn checksum(parts: &[&[f32]]) -> u64 {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut bytes = Vec::with_capacity(4 * 4096);
    for chunk in parts.iter().flat_map(|p| p.chunks(4096)) {
        bytes.clear();
        chunk
            .iter()
            .for_each(|v| bytes.extend_from_slice(&v.to_le_bytes()));
        hasher.update(&bytes);
    }
    hasher.digest()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::backend::TrainBackend as B;
    use crate::model::dcgan::{Discriminator, WeightInit};
    use common::config::ModelConfig;

    /// The coordinator checks every gradient header against the counts the
    /// configuration computes without burn; they must be the models' own.
    #[test]
    fn the_configurations_shapes_are_the_flat_gradients_tensors() {
        use crate::model::dcgan::Generator;
        let device = Default::default();
        for (image_size, nz, ngf, ndf) in [(16, 8, 2, 3), (32, 100, 16, 8), (64, 100, 64, 64)] {
            let cfg = ModelConfig {
                image_size,
                nz,
                ngf,
                ndf,
            };
            let mut rng = rand::SeedableRng::seed_from_u64(0);
            let mut init = WeightInit::new(&mut rng, &device);
            let g = Generator::<B>::new(&cfg, &mut init);
            let d = Discriminator::<B>::new(&cfg, &mut init);
            assert_eq!(trainable_len(&g) as u64, cfg.generator_params(), "{cfg:?}");
            assert_eq!(
                trainable_len(&d) as u64,
                cfg.discriminator_params(),
                "{cfg:?}"
            );
            // PowerSGD views each tensor of the flat gradient by these shapes.
            let shapes = |named: Vec<crate::model::dcgan::Named>| -> Vec<Vec<usize>> {
                named
                    .into_iter()
                    .filter(|n| n.trainable)
                    .map(|n| n.shape)
                    .collect()
            };
            assert_eq!(shapes(g.named()), cfg.generator_tensors(), "{cfg:?}");
            assert_eq!(shapes(d.named()), cfg.discriminator_tensors(), "{cfg:?}");
        }
    }

    #[test]
    fn flatten_and_unflatten_are_inverse_and_skip_running_stats() {
        let device = Default::default();
        let cfg = ModelConfig {
            image_size: 16,
            nz: 4,
            ngf: 2,
            ndf: 2,
        };
        let mut rng = rand::SeedableRng::seed_from_u64(0);
        let d = Discriminator::<B>::new(&cfg, &mut WeightInit::new(&mut rng, &device));
        // conv 3→2, conv 2→4 (+BN γ, β of 4), conv 4→1; all k4.
        let expected = 3 * 2 * 16 + 2 * 4 * 16 + 2 * 4 + 4 * 16;
        assert_eq!(trainable_len(&d), expected);
        let flat: Vec<f32> = (0..expected).map(|i| i as f32 * 0.5 - 3.0).collect();
        let grads = unflatten(&d, &flat);
        assert_eq!(flatten(&d, &grads), flat);
    }
}
