//! Single-process training: `worker train --standalone`.
//!
//! It is the distributed loop with a [`LocalReducer`] in place of the
//! all-reduce, so what works here works per replica there.

use common::process::cli::ConfigArgs;
use common::{Config, ConfigError};

use crate::model::backend::{self, TrainBackend};
use crate::train::replica_loop::{self, Replica, Start, Summary};
use crate::train::step::{LocalReducer, Trainer};

/// Standalone training keeps no checkpoints and has no coordinator to
/// restart: a checkpoint or restart flag would be silently ignored, so it
/// is refused. (The same keys in a shared configuration file are fine: they
/// serve the coordinator.)
pub fn refuse_checkpoint_flags(args: &ConfigArgs) -> Result<(), ConfigError> {
    let given = [
        ("--store", args.store.is_some()),
        ("--run", args.run.is_some()),
        ("--checkpoint-every", args.checkpoint_every.is_some()),
        ("--max-restarts", args.max_restarts.is_some()),
    ];
    match given.iter().find(|(_, set)| *set) {
        None => Ok(()),
        Some((flag, _)) => Err(ConfigError::Flag {
            flag,
            reason: "has no effect with --standalone, which keeps no checkpoints and has no \
                     coordinator to restart it: run `coordinator --workers 1` with the same flags",
        }),
    }
}

/// Trains `cfg` alone and writes its artifacts; see [`replica_loop::train`].
pub fn run(cfg: &Config, eval_images: usize) -> anyhow::Result<Summary> {
    let device = backend::device()?;
    let mut trainer = Trainer::<TrainBackend>::new(&cfg.model, &cfg.train, &device);
    replica_loop::train(
        cfg,
        Replica::ALONE,
        &mut trainer,
        &mut LocalReducer::new(cfg.allreduce.nonfinite),
        eval_images,
        Start::fresh(cfg),
    )
}
