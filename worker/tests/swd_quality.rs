//! Training must make the generator measurably better: a short run at a
//! tiny config lowers SWD against held-out synthetic faces clearly below
//! the untrained generator's. A compressed wire must not undo that: int8
//! and PowerSGD (rank 4), each with error feedback, reach an SWD within
//! 15 % of f32's at the same steps, and so does post-local SGD (`train.sync_every` = 4, two workers)
//! against the same two workers all-reducing every step.

use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use common::Config;
use common::protocol::powersgd::PowerSgd;
use common::protocol::wire::Net;
use common::protocol::wire::{self, WireFormat};
use worker::data::{BatchLoader, ImageSource};
use worker::eval::held_out::swd_against_held_out;
use worker::model::backend::{self, TrainBackend};
use worker::train::replica_loop::to_tensor;
use worker::train::step::{GradientReducer, LocalReducer, Trainer, Update};

const EVAL_IMAGES: usize = 256;
const STEPS: u64 = 400;
const SIZE: usize = 16;
const BATCH: usize = 32;

/// Mean SWD (× 1e3) of the untrained generator and after [`STEPS`] steps.
struct Trained {
    untrained: f64,
    trained: f64,
}

fn config() -> Config {
    let overrides = [
        ("model.image_size", SIZE.to_string()),
        ("model.ngf", "32".to_string()),
        ("model.ndf", "32".to_string()),
        ("train.batch_size", BATCH.to_string()),
        ("train.seed", "3".to_string()),
    ];
    Config::load_with_env(None, &overrides, Some(Default::default())).unwrap()
}

/// Replica `rank` of `world`'s batches of `batch` images.
fn loader(cfg: &Config, world: usize, rank: usize, batch: usize) -> BatchLoader {
    let source = ImageSource::open(&cfg.data, cfg.train.seed).unwrap();
    let sampler = common::ShardSampler::new(source.len(), world, rank, cfg.train.seed);
    BatchLoader::spawn(
        source,
        sampler,
        world,
        batch,
        SIZE as u32,
        0,
        Default::default(),
        2,
    )
    .unwrap()
}

fn train(reducer: &mut impl GradientReducer) -> Trained {
    let cfg = config();
    let device = backend::device().unwrap();
    let mut trainer = Trainer::<TrainBackend>::new(&cfg.model, &cfg.train, &device);
    let untrained = swd_against_held_out(&trainer, &cfg, EVAL_IMAGES).unwrap();
    let mut loader = loader(&cfg, 1, 0, BATCH);
    for step in 0..STEPS {
        let batch = loader.next_batch().unwrap();
        trainer
            .train_step(step, to_tensor(batch, SIZE, &device), reducer)
            .unwrap();
    }
    let trained = swd_against_held_out(&trainer, &cfg, EVAL_IMAGES).unwrap();
    Trained {
        untrained: untrained.mean,
        trained: trained.mean,
    }
}

/// The coordinator's mean, in process: each of `world` replica threads
/// hands in its vector and gets back the mean of all, computed as the
/// coordinator computes it (f32, rank order). A replica that fails, or one
/// that does not hand in within [`MEAN_LIMIT`], fails the others too
/// instead of leaving them waiting.
#[derive(Clone)]
struct InProcessMean {
    world: usize,
    parts: Arc<Mutex<Vec<Vec<f32>>>>,
    meeting: Arc<(Mutex<Meeting>, Condvar)>,
}

/// Where the replicas' threads meet.
#[derive(Default)]
struct Meeting {
    arrived: usize,
    round: u64,
    abandoned: bool,
}

const MEAN_LIMIT: Duration = Duration::from_secs(600);

impl InProcessMean {
    fn new(world: usize) -> Self {
        Self {
            world,
            parts: Arc::new(Mutex::new(vec![Vec::new(); world])),
            meeting: Arc::default(),
        }
    }

    /// Waits until every replica got here.
    fn meet(&self) {
        let (state, signal) = &*self.meeting;
        let mut s = state.lock().unwrap();
        let round = s.round;
        s.arrived += 1;
        if s.arrived == self.world {
            s.arrived = 0;
            s.round += 1;
            signal.notify_all();
            return;
        }
        let (s, waited) = signal
            .wait_timeout_while(s, MEAN_LIMIT, |s| s.round == round && !s.abandoned)
            .unwrap();
        assert!(!s.abandoned, "another replica failed");
        assert!(
            !waited.timed_out(),
            "a replica did not arrive within {MEAN_LIMIT:?}"
        );
    }

    /// Called as a replica thread ends: if it is panicking, the others stop waiting.
    fn leave(&self) {
        if std::thread::panicking() {
            let (state, signal) = &*self.meeting;
            if let Ok(mut s) = state.lock() {
                s.abandoned = true;
            }
            signal.notify_all();
        }
    }

    fn mean(&self, rank: usize, values: Vec<f32>) -> Vec<f32> {
        let len = values.len();
        self.parts.lock().unwrap()[rank] = values;
        self.meet();
        let parts: Vec<_> = self
            .parts
            .lock()
            .unwrap()
            .iter()
            .map(|p| wire::encode(p, WireFormat::F32))
            .collect();
        // Nobody hands in the next vector before everyone has read this one.
        self.meet();
        let mean = wire::mean(&parts, WireFormat::F32, self.world, None).unwrap();
        assert!(mean.finite, "the mean is not finite");
        let mut out = vec![0.0; len];
        wire::decode_into(&mean.bytes, WireFormat::F32, &mut out).unwrap();
        out
    }
}

/// Tells the other replicas when its thread panics.
struct Leaving(InProcessMean);

impl Drop for Leaving {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// A replica's all-reduce of every gradient through an [`InProcessMean`].
struct Member {
    rank: usize,
    group: InProcessMean,
}

impl GradientReducer for Member {
    fn reduce(&mut self, _step: u64, _net: Net, grads: Vec<f32>) -> anyhow::Result<Update> {
        Ok(Update::Apply(self.group.mean(self.rank, grads)))
    }
}

/// `world` replicas on threads, each with its share of the global batch,
/// its shard and its noise. With `every` = 1 they all-reduce every step's
/// gradients (what a group does by default); with more they train on their
/// own gradients and take the mean of their parameters and Adam moments at
/// the last step of every round (post-local SGD). Returns rank 0's SWD
/// after [`STEPS`] steps.
fn train_group(world: usize, every: u64) -> f64 {
    let group = InProcessMean::new(world);
    let replicas: Vec<_> = (0..world)
        .map(|rank| {
            let group = group.clone();
            std::thread::spawn(move || {
                let _leaving = Leaving(group.clone());
                let cfg = config();
                let device = backend::device().unwrap();
                let mut trainer =
                    Trainer::<TrainBackend>::new(&cfg.model, &cfg.train, &device).for_rank(rank);
                let mut loader = loader(&cfg, world, rank, BATCH / world);
                let mut member = Member { rank, group };
                for step in 0..STEPS {
                    let real = to_tensor(loader.next_batch().unwrap(), SIZE, &device);
                    if every == 1 {
                        trainer.train_step(step, real, &mut member).unwrap();
                        continue;
                    }
                    trainer
                        .train_step(step, real, &mut LocalReducer::default())
                        .unwrap();
                    if (step + 1).is_multiple_of(every) {
                        for net in [Net::Discriminator, Net::Generator] {
                            let state = trainer.averaging_state(net).unwrap();
                            let averaged = member.group.mean(rank, state);
                            trainer.load_averaged(net, &averaged).unwrap();
                        }
                    }
                }
                let swd = (rank == 0).then(|| {
                    swd_against_held_out(&trainer, &cfg, EVAL_IMAGES)
                        .unwrap()
                        .mean
                });
                (trainer.checksum(), swd)
            })
        })
        .collect();
    let ends: Vec<(u64, Option<f64>)> = replicas
        .into_iter()
        .map(|r| r.join().expect("a replica thread panicked"))
        .collect();
    assert!(
        ends.iter().all(|(c, _)| *c == ends[0].0),
        "replicas differ at the end"
    );
    ends[0].1.expect("rank 0 measured SWD")
}

/// The f32 run, trained once for both tests (the other waits for it).
fn f32_run() -> &'static Trained {
    static RUN: OnceLock<Trained> = OnceLock::new();
    RUN.get_or_init(|| train(&mut LocalReducer::default()))
}

#[test]
fn short_training_lowers_swd_against_held_out_faces() {
    let Trained { untrained, trained } = *f32_run();
    eprintln!("SWD untrained: {untrained}\nSWD after {STEPS} steps: {trained}");
    assert!(
        trained < 0.6 * untrained,
        "training did not lower SWD enough: {untrained} -> {trained}"
    );
}

/// One worker's all-reduce under `allreduce.wire = int8`, in process: the
/// worker encodes its gradient plus its residual, the coordinator's mean of
/// that one part adds its own residual and is encoded again, with the same
/// codec and the same element order (chunks hold whole blocks) as a real
/// group of one, minus the sockets.
#[derive(Default)]
struct Int8GroupOfOne {
    worker: [Vec<f32>; 2],
    coordinator: [Vec<f32>; 2],
}

impl GradientReducer for Int8GroupOfOne {
    fn reduce(&mut self, _step: u64, net: Net, grads: Vec<f32>) -> anyhow::Result<Update> {
        let i = match net {
            Net::Discriminator => 0,
            Net::Generator => 1,
        };
        for carried in [&mut self.worker[i], &mut self.coordinator[i]] {
            carried.resize(grads.len(), 0.0);
        }
        let mut left = vec![0.0; grads.len()];
        let part = wire::encode_carrying(&grads, &self.worker[i], &mut left, WireFormat::Int8);
        self.worker[i] = left;
        let mean = wire::mean(&[part], WireFormat::Int8, 1, Some(&self.coordinator[i]))?;
        anyhow::ensure!(mean.finite, "the int8 mean is not finite");
        self.coordinator[i] = mean.residual.expect("a residual was carried in");
        let mut update = vec![0.0; grads.len()];
        wire::decode_into(&mean.bytes, WireFormat::Int8, &mut update)?;
        Ok(Update::Apply(update))
    }
}

#[test]
fn int8_with_error_feedback_reaches_the_swd_of_f32() {
    let int8 = train(&mut Int8GroupOfOne::default()).trained;
    let f32 = f32_run().trained;
    eprintln!("SWD after {STEPS} steps: f32 {f32}, int8 with error feedback {int8}");
    assert!(
        int8 <= 1.15 * f32,
        "int8 with error feedback ends at SWD {int8}, more than 15 % above f32's {f32}"
    );
}

/// One worker's PowerSGD (`allreduce.powersgd_rank`) as a real group of
/// one does it: the means of its two all-reduces are its own factors.
struct PowerSgdGroupOfOne {
    states: [PowerSgd; 2],
}

impl PowerSgdGroupOfOne {
    fn new(rank: usize) -> Self {
        Self {
            states: PowerSgd::per_network(&config().model, rank),
        }
    }
}

impl GradientReducer for PowerSgdGroupOfOne {
    fn reduce(&mut self, _step: u64, net: Net, grads: Vec<f32>) -> anyhow::Result<Update> {
        let state = match net {
            Net::Discriminator => &mut self.states[0],
            Net::Generator => &mut self.states[1],
        };
        let (mut round, first) = state.first(&grads);
        let second = state.second(&mut round, first);
        let update = state.finish(round, second);
        anyhow::ensure!(
            update.iter().all(|u| u.is_finite()),
            "the PowerSGD update is not finite"
        );
        Ok(Update::Apply(update))
    }
}

#[test]
fn powersgd_with_error_feedback_reaches_the_swd_of_f32() {
    let powersgd = train(&mut PowerSgdGroupOfOne::new(4)).trained;
    let f32 = f32_run().trained;
    eprintln!("SWD after {STEPS} steps: f32 {f32}, PowerSGD rank 4 {powersgd}");
    assert!(
        powersgd <= 1.15 * f32,
        "PowerSGD (rank 4) ends at SWD {powersgd}, more than 15 % above f32's {f32}"
    );
}

/// `train.sync_every = 4` with two workers against the same two workers
/// all-reducing every step's gradients: same shards, noise, global batch
/// (16 images each) and steps.
#[test]
fn post_local_sgd_reaches_the_swd_of_an_every_step_all_reduce() {
    let every_step = train_group(2, 1);
    let apart = train_group(2, 4);
    eprintln!(
        "SWD after {STEPS} steps, 2 workers: gradients all-reduced every step {every_step}, \
         averaging every 4 steps {apart}"
    );
    assert!(
        apart <= 1.15 * every_step,
        "post-local SGD (H = 4, W = 2) ends at SWD {apart}, more than 15 % above the \
         every-step all-reduce's {every_step}"
    );
}
