//! Single-process training: `worker train --standalone`.
//!
//! It is the distributed loop with a [`LocalReducer`] in place of the
//! all-reduce, so what works here works per replica there.

use common::Config;

use crate::backend::{self, TrainBackend};
use crate::training::{LocalReducer, Trainer};
use crate::training_loop::{self, Replica, Start, Summary};

/// Trains `cfg` alone and writes its artifacts; see [`training_loop::train`].
pub fn run(cfg: &Config, eval_images: usize) -> anyhow::Result<Summary> {
    let device = backend::device()?;
    let mut trainer = Trainer::<TrainBackend>::new(&cfg.model, &cfg.train, &device);
    training_loop::train(
        cfg,
        Replica::ALONE,
        &mut trainer,
        &mut LocalReducer::new(cfg.allreduce.nonfinite),
        eval_images,
        Start::default(),
    )
}
