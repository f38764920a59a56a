//! One DCGAN training iteration, split where distributed training needs it.
//!
//! An iteration is a discriminator step on a real and a fake batch, then a
//! generator step with the non-saturating loss (fakes labelled real). Each
//! step computes its gradient as one flat vector, hands it to a
//! [`GradientReducer`] and applies whatever comes back: standalone training
//! uses [`LocalReducer`] (the gradient itself), distributed training plugs
//! the coordinator's all-reduce in at exactly that point.

use burn::module::AutodiffModule;
use burn::module::Module;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{Adam, AdamConfig, Optimizer};
use burn::record::{FullPrecisionSettings, NamedMpkBytesRecorder, Recorder};
use burn::tensor::activation::relu;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor, TensorData};
use common::config::{ModelConfig, NonFinite, TrainConfig};
use common::protocol::wire::Net;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::model::dcgan::{Discriminator, Generator, WeightInit};
use crate::model::params;
use crate::train::averaging::{self, AveragingError};

/// What every replica does with a network's gradient at a step.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// Apply this gradient (e.g. the mean over all workers) with Adam.
    Apply(Vec<f32>),
    /// Leave the network and its optimizer state as they are: the gradient
    /// was not finite and `allreduce.nonfinite` is `skip`.
    Skip,
}

/// Turns this replica's flat gradient into the update every replica applies.
pub trait GradientReducer {
    /// The update for `net` at `step`, e.g. the mean over all workers.
    fn reduce(&mut self, step: u64, net: Net, grads: Vec<f32>) -> anyhow::Result<Update>;
}

/// Single-process training: the local gradient is the global one, under
/// the same non-finite policy the coordinator applies to a group.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalReducer {
    nonfinite: NonFinite,
}

impl LocalReducer {
    /// A reducer that treats a NaN or Inf in a gradient as `policy` says.
    pub fn new(policy: NonFinite) -> Self {
        Self { nonfinite: policy }
    }
}

impl GradientReducer for LocalReducer {
    fn reduce(&mut self, step: u64, net: Net, grads: Vec<f32>) -> anyhow::Result<Update> {
        if grads.iter().all(|g| g.is_finite()) {
            return Ok(Update::Apply(grads));
        }
        match self.nonfinite {
            NonFinite::Halt => anyhow::bail!(
                "the {net:?} gradient of step {step} holds NaN or Inf (allreduce.nonfinite = halt): \
                 training has diverged; lower train.lr or resume from an earlier checkpoint"
            ),
            NonFinite::Skip => {
                tracing::warn!(
                    step,
                    ?net,
                    "skipping an optimizer step: its gradient holds NaN or Inf"
                );
                Ok(Update::Skip)
            }
        }
    }
}

/// Losses of one iteration, as the DCGAN reference reports them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepLosses {
    /// BCE of D on the real batch plus on the fake batch.
    pub d_loss: f32,
    /// Non-saturating generator loss: BCE of D(G(z)) against "real".
    pub g_loss: f32,
    /// Mean D(x) on real images (probability), ideally drifting towards 0.5.
    pub d_real: f32,
    /// Mean D(G(z)) before the D update.
    pub d_fake: f32,
}

type Opt<M, B> = OptimizerAdaptor<Adam, M, B>;

/// Both networks and their optimizers on one replica.
pub struct Trainer<B: AutodiffBackend> {
    generator: Generator<B>,
    discriminator: Discriminator<B>,
    opt_g: Opt<Generator<B>, B>,
    opt_d: Opt<Discriminator<B>, B>,
    lr: f64,
    nz: usize,
    seed: u64,
    rank: usize,
    device: B::Device,
}

/// A replica's state at one moment, kept in memory ([`Trainer::snapshot`]).
pub struct Snapshot<B: AutodiffBackend> {
    generator: Generator<B>,
    discriminator: Discriminator<B>,
    opt_g: Opt<Generator<B>, B>,
    opt_d: Opt<Discriminator<B>, B>,
}

/// The complete trainable state of a replica as bytes: what a checkpoint
/// stores and a resumed replica loads (burn's named MessagePack records,
/// full precision).
#[derive(Debug, Clone)]
pub struct TrainerRecords {
    /// G's parameters and BatchNorm running statistics.
    pub generator: Vec<u8>,
    /// D's parameters and BatchNorm running statistics.
    pub discriminator: Vec<u8>,
    /// G's Adam moments and step counts.
    pub optimizer_g: Vec<u8>,
    /// D's Adam moments and step counts.
    pub optimizer_d: Vec<u8>,
}

/// A record that cannot be turned into bytes or back.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct RecordError {
    what: &'static str,
    reason: String,
}

/// Named MessagePack at full precision: self-describing, and a malformed
/// record is an error rather than a panic (burn's bincode recorder unwraps).
type Mpk = NamedMpkBytesRecorder<FullPrecisionSettings>;

/// Turns a recorder failure while `what` into a [`RecordError`].
fn record_error(what: &'static str) -> impl Fn(burn::record::RecorderError) -> RecordError {
    move |e| RecordError {
        what,
        reason: e.to_string(),
    }
}

/// Streams of the seed's generator: initial weights, training noise, and
/// the fixed sample-grid noise.
const WEIGHT_STREAM: u64 = 0;
/// The fixed sample-grid noise.
const GRID_NOISE_STREAM: u64 = 1;
/// Training noise: rank r uses stream TRAIN_NOISE_STREAM + r.
const TRAIN_NOISE_STREAM: u64 = 2;
/// log2 of the ChaCha words reserved for one step's noise: step s of a
/// rank starts at word s << NOISE_WORDS_PER_STEP_LOG2, so the noise of any
/// step is a pure function of (seed, rank, step) and a resumed run needs no
/// saved generator state. 2^32 words cover any batch × nz that fits in memory.
const NOISE_WORDS_PER_STEP_LOG2: u32 = 32;

impl<B: AutodiffBackend> Trainer<B> {
    /// Fresh networks and optimizers, identical for every caller with the
    /// same seed, drawing rank 0's training noise.
    pub fn new(model: &ModelConfig, train: &TrainConfig, device: &B::Device) -> Self {
        let mut weights = ChaCha8Rng::seed_from_u64(train.seed);
        weights.set_stream(WEIGHT_STREAM);
        let mut init = WeightInit::new(&mut weights, device);
        let generator = Generator::new(model, &mut init);
        let discriminator = Discriminator::new(model, &mut init);
        let adam = || {
            AdamConfig::new()
                .with_beta_1(train.beta1 as f32)
                .with_beta_2(train.beta2 as f32)
                .with_epsilon(1e-8)
        };
        Self {
            generator,
            discriminator,
            opt_g: adam().init(),
            opt_d: adam().init(),
            lr: train.lr,
            nz: model.nz,
            seed: train.seed,
            rank: 0,
            device: device.clone(),
        }
    }

    /// Switches to replica `rank`'s noise stream, so replicas draw
    /// different fakes as DDP ranks do; weights are unaffected.
    pub fn for_rank(mut self, rank: usize) -> Self {
        self.rank = rank;
        self
    }

    /// Takes rank `rank`'s noise stream from now on (a re-formed group may
    /// number its members anew).
    pub fn set_rank(&mut self, rank: usize) {
        self.rank = rank;
    }

    /// The complete state now, to go back to if the step about to start is
    /// abandoned (the group re-forms mid-step). Tensors are immutable and
    /// shared, so this costs references, not copies, until training moves on.
    pub fn snapshot(&self) -> Snapshot<B> {
        Snapshot {
            generator: self.generator.detached(),
            discriminator: self.discriminator.detached(),
            opt_g: self.opt_g.clone(),
            opt_d: self.opt_d.clone(),
        }
    }

    /// Goes back to `snapshot`.
    pub fn restore(&mut self, snapshot: Snapshot<B>) {
        self.generator = snapshot.generator;
        self.discriminator = snapshot.discriminator;
        self.opt_g = snapshot.opt_g;
        self.opt_d = snapshot.opt_d;
    }

    /// Both networks and both optimizer states as bytes.
    pub fn records(&self) -> Result<TrainerRecords, RecordError> {
        let recorder = Mpk::default();
        Ok(TrainerRecords {
            generator: recorder
                .record(self.generator.clone().into_record(), ())
                .map_err(record_error("saving the generator"))?,
            discriminator: recorder
                .record(self.discriminator.clone().into_record(), ())
                .map_err(record_error("saving the discriminator"))?,
            optimizer_g: recorder
                .record(self.opt_g.to_record(), ())
                .map_err(record_error("saving the generator's optimizer"))?,
            optimizer_d: recorder
                .record(self.opt_d.to_record(), ())
                .map_err(record_error("saving the discriminator's optimizer"))?,
        })
    }

    /// Replaces networks and optimizer states with `records` (from
    /// [`Trainer::records`] of a trainer with the same model configuration).
    pub fn load_records(&mut self, records: TrainerRecords) -> Result<(), RecordError> {
        let recorder = Mpk::default();
        let device = &self.device;
        let generator = recorder
            .load(records.generator, device)
            .map_err(record_error("loading the generator"))?;
        let discriminator = recorder
            .load(records.discriminator, device)
            .map_err(record_error("loading the discriminator"))?;
        let opt_g = recorder
            .load(records.optimizer_g, device)
            .map_err(record_error("loading the generator's optimizer"))?;
        let opt_d = recorder
            .load(records.optimizer_d, device)
            .map_err(record_error("loading the discriminator's optimizer"))?;
        self.generator = self.generator.clone().load_record(generator);
        self.discriminator = self.discriminator.clone().load_record(discriminator);
        self.opt_g = self.opt_g.clone().load_record(opt_g);
        self.opt_d = self.opt_d.clone().load_record(opt_d);
        Ok(())
    }

    /// Iteration `step` on `real` images [batch, 3, size, size].
    pub fn train_step(
        &mut self,
        step: u64,
        real: Tensor<B, 4>,
        reducer: &mut impl GradientReducer,
    ) -> anyhow::Result<StepLosses> {
        let [batch, _, _, _] = real.dims();
        let z = step_noise(self.seed, self.rank, step, batch, self.nz, &self.device); // [batch, nz]
        let fake = self.generate(z); // [batch, 3, size, size], tracked for the G step

        let (d_grads, d_out) = self.discriminator_step(real, fake.clone().detach());
        if let Update::Apply(d_grads) = reducer.reduce(step, Net::Discriminator, d_grads)? {
            self.apply_discriminator(&d_grads);
        }

        let (g_grads, g_loss) = self.generator_step(fake);
        if let Update::Apply(g_grads) = reducer.reduce(step, Net::Generator, g_grads)? {
            self.apply_generator(&g_grads);
        }

        Ok(StepLosses { g_loss, ..d_out })
    }

    /// D's flat gradient for BCE(D(real), 1) + BCE(D(fake), 0). Real and
    /// fake pass through separately, each with its own BatchNorm statistics,
    /// as in the reference implementation.
    pub fn discriminator_step(
        &self,
        real: Tensor<B, 4>,
        fake: Tensor<B, 4>,
    ) -> (Vec<f32>, StepLosses) {
        let real_logits = self.discriminator.forward(real); // [batch]
        let fake_logits = self.discriminator.forward(fake); // [batch]
        let d_real = mean_probability(&real_logits);
        let d_fake = mean_probability(&fake_logits);
        let loss = bce_with_logits(real_logits, 1.0) + bce_with_logits(fake_logits, 0.0);
        let d_loss = scalar(&loss);
        let grads = burn::optim::GradientsParams::from_grads(loss.backward(), &self.discriminator);
        let losses = StepLosses {
            d_loss,
            g_loss: f32::NAN,
            d_real,
            d_fake,
        };
        (params::flatten(&self.discriminator, &grads), losses)
    }

    /// G's flat gradient for the non-saturating loss BCE(D(G(z)), 1),
    /// through the already updated discriminator.
    pub fn generator_step(&self, fake: Tensor<B, 4>) -> (Vec<f32>, f32) {
        let loss = bce_with_logits(self.discriminator.forward(fake), 1.0);
        let g_loss = scalar(&loss);
        let grads = burn::optim::GradientsParams::from_grads(loss.backward(), &self.generator);
        (params::flatten(&self.generator, &grads), g_loss)
    }

    /// Applies a flat D gradient (local or averaged) with Adam.
    pub fn apply_discriminator(&mut self, flat: &[f32]) {
        let grads = params::unflatten(&self.discriminator, flat);
        self.discriminator = self.opt_d.step(self.lr, self.discriminator.clone(), grads);
    }

    /// Applies a flat G gradient (local or averaged) with Adam.
    pub fn apply_generator(&mut self, flat: &[f32]) {
        let grads = params::unflatten(&self.generator, flat);
        self.generator = self.opt_g.step(self.lr, self.generator.clone(), grads);
    }

    /// `net`'s parameters and Adam moments as one flat vector, for
    /// post-local SGD's averaging step ([`averaging`]).
    pub fn averaging_state(&self, net: Net) -> Result<Vec<f32>, AveragingError> {
        match net {
            Net::Discriminator => averaging::state(&self.discriminator, &self.opt_d),
            Net::Generator => averaging::state(&self.generator, &self.opt_g),
        }
    }

    /// Takes `averaged` (the group's mean of [`Trainer::averaging_state`])
    /// as `net`'s parameters and Adam moments; on error nothing changes.
    pub fn load_averaged(&mut self, net: Net, averaged: &[f32]) -> Result<(), AveragingError> {
        match net {
            Net::Discriminator => {
                let mut opt = self.opt_d.clone();
                self.discriminator =
                    averaging::load(self.discriminator.clone(), &mut opt, averaged)?;
                self.opt_d = opt;
            }
            Net::Generator => {
                let mut opt = self.opt_g.clone();
                self.generator = averaging::load(self.generator.clone(), &mut opt, averaged)?;
                self.opt_g = opt;
            }
        }
        Ok(())
    }

    /// G(z) in training mode, tracked for a later generator step.
    pub fn generate(&self, z: Tensor<B, 2>) -> Tensor<B, 4> {
        self.generator.forward(z)
    }

    /// A checksum of every trainable parameter of both networks: equal on
    /// two replicas exactly when their parameters are bitwise equal.
    pub fn checksum(&self) -> u64 {
        params::checksum(&[
            &params::flat_params(&self.generator),
            &params::flat_params(&self.discriminator),
        ])
    }

    /// All trainable parameters, G's then D's, in visitor order.
    pub fn flat_params(&self) -> Vec<f32> {
        let mut all = params::flat_params(&self.generator);
        all.extend(params::flat_params(&self.discriminator));
        all
    }

    /// `count` images [count, 3, size, size] from the generator in inference
    /// mode (BatchNorm running statistics), from noise seeded by `seed` so a
    /// sample grid shows the same faces as training progresses.
    pub fn sample(&self, count: usize, seed: u64) -> Tensor<B::InnerBackend, 4> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(GRID_NOISE_STREAM);
        let z = noise_tensor(&mut rng, count, self.nz, &self.device);
        self.generator.valid().forward(z)
    }

    /// [`Trainer::sample`] read back as CHW floats.
    pub fn sample_pixels(&self, count: usize, seed: u64) -> anyhow::Result<Vec<f32>> {
        self.sample(count, seed)
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| anyhow::anyhow!("reading generated images back: {e:?}"))
    }

    /// The device both networks live on.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// The discriminator, e.g. to size a flat gradient for it.
    pub fn discriminator(&self) -> &Discriminator<B> {
        &self.discriminator
    }

    /// The generator.
    pub fn generator(&self) -> &Generator<B> {
        &self.generator
    }
}

/// The `batch` noise vectors [batch, nz] replica `rank` trains step `step`
/// on: its own ChaCha stream, at a word offset fixed by the step.
pub fn step_noise<B: Backend>(
    seed: u64,
    rank: usize,
    step: u64,
    batch: usize,
    nz: usize,
    device: &B::Device,
) -> Tensor<B, 2> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(TRAIN_NOISE_STREAM + rank as u64);
    rng.set_word_pos(u128::from(step) << NOISE_WORDS_PER_STEP_LOG2);
    noise_tensor(&mut rng, batch, nz, device)
}

/// `batch` noise vectors [batch, nz] drawn from `rng`.
fn noise_tensor<B: Backend>(
    rng: &mut ChaCha8Rng,
    batch: usize,
    nz: usize,
    device: &B::Device,
) -> Tensor<B, 2> {
    let values: Vec<f32> = (0..batch * nz)
        .map(|_| StandardNormal.sample(rng))
        .collect();
    Tensor::from_data(TensorData::new(values, [batch, nz]), device)
}

/// Mean binary cross-entropy of `logits` against a constant `target`, in the
/// overflow-free form max(x, 0) − x·y + log(1 + e^−|x|).
fn bce_with_logits<B: Backend>(logits: Tensor<B, 1>, target: f32) -> Tensor<B, 1> {
    let softplus_tail = logits.clone().abs().neg().exp().log1p();
    (relu(logits.clone()) - logits * target + softplus_tail).mean()
}

fn mean_probability<B: Backend>(logits: &Tensor<B, 1>) -> f32 {
    scalar(&burn::tensor::activation::sigmoid(logits.clone()).mean())
}

fn scalar<B: Backend>(t: &Tensor<B, 1>) -> f32 {
    t.clone().into_scalar().elem::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::backend::{Inner, TrainBackend as B};
    use burn::tensor::ElementConversion;

    fn tiny() -> (ModelConfig, TrainConfig) {
        let model = ModelConfig {
            image_size: 16,
            nz: 8,
            ngf: 4,
            ndf: 4,
        };
        let train = TrainConfig {
            batch_size: 4,
            ..TrainConfig::default()
        };
        (model, train)
    }

    fn real_batch(device: &burn::tensor::Device<B>) -> Tensor<B, 4> {
        let values: Vec<f32> = (0..4 * 3 * 16 * 16)
            .map(|i| ((i % 17) as f32 / 8.0) - 1.0)
            .collect();
        Tensor::from_data(TensorData::new(values, [4, 3, 16, 16]), device)
    }

    #[test]
    fn bce_matches_the_closed_form() {
        let device = Default::default();
        let logits = Tensor::<Inner, 1>::from_floats([2.0, -1.0, 0.0], &device);
        let ones = bce_with_logits(logits.clone(), 1.0)
            .into_scalar()
            .elem::<f32>();
        let zeros = bce_with_logits(logits, 0.0).into_scalar().elem::<f32>();
        let sp = |x: f32| (1.0 + x.exp()).ln();
        assert!((ones - (sp(-2.0) + sp(1.0) + sp(0.0)) / 3.0).abs() < 1e-6);
        assert!((zeros - (sp(2.0) + sp(-1.0) + sp(0.0)) / 3.0).abs() < 1e-6);
    }

    #[test]
    fn same_seed_gives_bitwise_identical_steps() {
        let device = Default::default();
        let (model, train) = tiny();
        let run = || {
            let mut t = Trainer::<B>::new(&model, &train, &device);
            (0..3)
                .map(|step| {
                    t.train_step(step, real_batch(&device), &mut LocalReducer::default())
                        .unwrap()
                })
                .map(|l| (l.d_loss.to_bits(), l.g_loss.to_bits()))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    /// A trainer loaded from another's records continues exactly as the
    /// original would: parameters, BatchNorm statistics and Adam state all
    /// travel.
    #[test]
    fn records_carry_the_complete_training_state() {
        let device = Default::default();
        let (model, train) = tiny();
        let mut original = Trainer::<B>::new(&model, &train, &device);
        for step in 0..2 {
            original
                .train_step(step, real_batch(&device), &mut LocalReducer::default())
                .unwrap();
        }
        let other_seed = TrainConfig {
            seed: 7,
            ..train.clone()
        };
        let mut restored = Trainer::<B>::new(&model, &other_seed, &device);
        restored.load_records(original.records().unwrap()).unwrap();
        let restored = Trainer {
            seed: train.seed,
            ..restored
        };
        let mut original = original;
        let mut restored = restored;
        for step in 2..4 {
            let a = original
                .train_step(step, real_batch(&device), &mut LocalReducer::default())
                .unwrap();
            let b = restored
                .train_step(step, real_batch(&device), &mut LocalReducer::default())
                .unwrap();
            assert_eq!(a.d_loss.to_bits(), b.d_loss.to_bits());
        }
        assert_eq!(original.checksum(), restored.checksum());
        let pixels = |t: &Trainer<B>| t.sample_pixels(4, 1).unwrap();
        assert_eq!(
            pixels(&original),
            pixels(&restored),
            "BatchNorm running statistics"
        );
    }

    /// Going back to a snapshot undoes a step exactly, BatchNorm running
    /// statistics included: redoing it then gives the same bits.
    #[test]
    fn a_restored_snapshot_redoes_a_step_bit_for_bit() {
        let device = Default::default();
        let (model, train) = tiny();
        let mut t = Trainer::<B>::new(&model, &train, &device);
        t.train_step(0, real_batch(&device), &mut LocalReducer::default())
            .unwrap();
        let before = t.snapshot();
        let first = t
            .train_step(1, real_batch(&device), &mut LocalReducer::default())
            .unwrap();
        let (checksum, pixels) = (t.checksum(), t.sample_pixels(4, 1).unwrap());
        t.restore(before);
        let again = t
            .train_step(1, real_batch(&device), &mut LocalReducer::default())
            .unwrap();
        assert_eq!(first.d_loss.to_bits(), again.d_loss.to_bits());
        assert_eq!(t.checksum(), checksum);
        assert_eq!(t.sample_pixels(4, 1).unwrap(), pixels, "running statistics");
    }

    /// Post-local SGD's averaging: two replicas that trained apart load
    /// the mean of their states and are then the same replica, parameters
    /// and Adam moments alike (the next step on the same data and noise
    /// gives the same bits); a state of the wrong length changes nothing.
    #[test]
    fn replicas_that_load_their_averaged_state_train_on_identically() {
        let device = Default::default();
        let (model, train) = tiny();
        let mut a = Trainer::<B>::new(&model, &train, &device);
        let mut b = Trainer::<B>::new(&model, &train, &device).for_rank(1);
        assert!(matches!(
            a.averaging_state(Net::Generator),
            Err(AveragingError::NoState(_))
        ));
        for step in 0..2 {
            for t in [&mut a, &mut b] {
                t.train_step(step, real_batch(&device), &mut LocalReducer::default())
                    .unwrap();
            }
        }
        assert_ne!(a.checksum(), b.checksum());
        for net in [Net::Discriminator, Net::Generator] {
            let (sa, sb) = (
                a.averaging_state(net).unwrap(),
                b.averaging_state(net).unwrap(),
            );
            let len = match net {
                Net::Discriminator => params::trainable_len(a.discriminator()),
                Net::Generator => params::trainable_len(a.generator()),
            };
            assert_eq!(sa.len(), 3 * len);
            assert_ne!(sa[2 * len..], sb[2 * len..], "second moments differ before");
            let mean: Vec<f32> = sa.iter().zip(&sb).map(|(x, y)| (x + y) / 2.0).collect();
            let before = a.checksum();
            assert!(matches!(
                a.load_averaged(net, &mean[1..]),
                Err(AveragingError::Length { .. })
            ));
            assert_eq!(a.checksum(), before, "a refused state changes nothing");
            a.load_averaged(net, &mean).unwrap();
            b.load_averaged(net, &mean).unwrap();
            assert_eq!(a.averaging_state(net).unwrap(), mean, "loaded as averaged");
        }
        assert_eq!(a.checksum(), b.checksum());
        b.set_rank(0);
        let next = |t: &mut Trainer<B>| {
            let l = t
                .train_step(2, real_batch(&device), &mut LocalReducer::default())
                .unwrap();
            (l.d_loss.to_bits(), l.g_loss.to_bits(), t.checksum())
        };
        assert_eq!(next(&mut a), next(&mut b));
    }

    #[test]
    fn garbage_records_are_an_error_not_a_panic() {
        let device = Default::default();
        let (model, train) = tiny();
        let mut t = Trainer::<B>::new(&model, &train, &device);
        let mut records = t.records().unwrap();
        records.optimizer_d = b"not a record".to_vec();
        let err = t.load_records(records).unwrap_err().to_string();
        assert!(err.contains("discriminator's optimizer"), "{err}");
    }

    /// Applying an externally supplied gradient is what the all-reduce does:
    /// a reducer that doubles the gradient must change the trajectory, and
    /// one that returns it unchanged must not.
    #[test]
    fn reducer_output_is_what_gets_applied() {
        struct Scale(f32);
        impl GradientReducer for Scale {
            fn reduce(&mut self, _: u64, _: Net, g: Vec<f32>) -> anyhow::Result<Update> {
                Ok(Update::Apply(g.into_iter().map(|x| x * self.0).collect()))
            }
        }
        let device = Default::default();
        let (model, train) = tiny();
        let losses_with = |reducer: &mut dyn FnMut() -> Scale| {
            let mut t = Trainer::<B>::new(&model, &train, &device);
            let mut r = reducer();
            t.train_step(0, real_batch(&device), &mut r).unwrap();
            t.train_step(0, real_batch(&device), &mut r).unwrap().d_loss
        };
        let local = {
            let mut t = Trainer::<B>::new(&model, &train, &device);
            t.train_step(0, real_batch(&device), &mut LocalReducer::default())
                .unwrap();
            t.train_step(0, real_batch(&device), &mut LocalReducer::default())
                .unwrap()
                .d_loss
        };
        assert_eq!(losses_with(&mut || Scale(1.0)).to_bits(), local.to_bits());
        assert_ne!(losses_with(&mut || Scale(0.0)).to_bits(), local.to_bits());
    }
}
