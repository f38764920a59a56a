//! Training must make the generator measurably better: a short run at a
//! tiny config lowers SWD against held-out synthetic faces clearly below
//! the untrained generator's.

use common::Config;
use worker::backend::{self, TrainBackend};
use worker::data::{BatchLoader, ImageSource};
use worker::eval::swd_against_held_out;
use worker::gan_step::{LocalReducer, Trainer};
use worker::replica_loop::to_tensor;

const EVAL_IMAGES: usize = 256;
const STEPS: u64 = 400;
const SIZE: usize = 16;
const BATCH: usize = 32;

#[test]
fn short_training_lowers_swd_against_held_out_faces() {
    let overrides = [
        ("model.image_size", SIZE.to_string()),
        ("model.ngf", "32".to_string()),
        ("model.ndf", "32".to_string()),
        ("train.batch_size", BATCH.to_string()),
        ("train.seed", "3".to_string()),
    ];
    let cfg = Config::load_with_env(None, &overrides, Some(Default::default())).unwrap();
    let device = backend::device().unwrap();
    let mut trainer = Trainer::<TrainBackend>::new(&cfg.model, &cfg.train, &device);
    let untrained = swd_against_held_out(&trainer, &cfg, EVAL_IMAGES).unwrap();

    let source = ImageSource::open(&cfg.data, cfg.train.seed).unwrap();
    let sampler = common::ShardSampler::new(source.len(), 1, 0, cfg.train.seed);
    let mut loader = BatchLoader::spawn(
        source,
        sampler,
        1,
        BATCH,
        SIZE as u32,
        0,
        Default::default(),
        2,
    )
    .unwrap();
    for step in 0..STEPS {
        let batch = loader.next_batch().unwrap();
        trainer
            .train_step(
                step,
                to_tensor(batch, SIZE, &device),
                &mut LocalReducer::default(),
            )
            .unwrap();
    }
    let trained = swd_against_held_out(&trainer, &cfg, EVAL_IMAGES).unwrap();
    eprintln!("SWD untrained: {untrained}\nSWD after {STEPS} steps: {trained}");
    assert!(
        trained.mean < 0.6 * untrained.mean,
        "training did not lower SWD enough: {} -> {}",
        untrained.mean,
        trained.mean
    );
}
