//! Single-process training: the loop `worker train --standalone` runs.
//!
//! It is the distributed loop with a [`LocalReducer`] in place of the
//! all-reduce, so what works here works per replica there.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use burn::tensor::{Tensor, TensorData};
use common::{Config, ShardSampler};
use tracing::info;

use crate::backend::{self, Device, TrainBackend};
use crate::data::{Batch, BatchLoader, ImageSource};
use crate::eval;
use crate::output::{self, LossLog};
use crate::swd::SwdReport;
use crate::training::{LocalReducer, StepLosses, Trainer};

/// File names inside the output folder.
pub const SAMPLES_PNG: &str = "samples.png";
/// Per-step losses.
pub const LOSSES_CSV: &str = "losses.csv";
/// The effective configuration the run used.
pub const CONFIG_TOML: &str = "config.toml";

/// Images in the sample grid (8×8).
const GRID_IMAGES: usize = 64;

/// What a finished run reports.
#[derive(Debug)]
pub struct Summary {
    /// Losses of the last step.
    pub last: StepLosses,
    /// Mean training throughput over all steps.
    pub images_per_s: f64,
    /// Images skipped as unreadable.
    pub skipped: usize,
    /// SWD against held-out images, when requested.
    pub swd: Option<SwdReport>,
    /// Where the artifacts are.
    pub out_dir: PathBuf,
}

/// Trains `cfg.train.steps` iterations and writes the sample grid, the loss
/// CSV and the effective config to `cfg.output.dir`; then, when
/// `eval_images > 0`, measures SWD against that many held-out images.
pub fn run(cfg: &Config, eval_images: usize) -> anyhow::Result<Summary> {
    let device = backend::device()?;
    let out = &cfg.output.dir;
    std::fs::create_dir_all(out)
        .with_context(|| format!("creating output folder {}", out.display()))?;
    std::fs::write(out.join(CONFIG_TOML), cfg.to_toml()?).context("saving the effective config")?;

    let source = ImageSource::open(&cfg.data, cfg.train.seed)?;
    info!(data = %source.name(), images = source.len(), backend = backend::NAME, "starting standalone training");
    let sampler = ShardSampler::new(source.len(), 1, 0, cfg.train.seed);
    let size = cfg.model.image_size;
    let batch = cfg.train.batch_size;
    let mut loader =
        BatchLoader::spawn(source, sampler, 1, batch, size as u32, 0, cfg.data.prefetch)?;
    let mut trainer = Trainer::<TrainBackend>::new(&cfg.model, &cfg.train, &device);
    let log_path = out.join(LOSSES_CSV);
    let mut log =
        LossLog::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;

    let started = Instant::now();
    let mut last = None;
    let mut skipped = 0;
    for _ in 0..cfg.train.steps {
        let step_started = Instant::now();
        let batch = loader.next_batch()?;
        let (step, epoch, count) = (batch.step, batch.epoch, batch.count);
        skipped = batch.skipped;
        let losses = trainer.train_step(to_tensor(batch, size, &device), &mut LocalReducer)?;
        let images_per_s = count as f64 / step_started.elapsed().as_secs_f64();
        log.record(step, epoch, &losses, images_per_s)?;
        if (step + 1) % cfg.train.log_every == 0 {
            info!(
                step = step + 1,
                epoch,
                d_loss = losses.d_loss,
                g_loss = losses.g_loss,
                d_real = losses.d_real,
                d_fake = losses.d_fake,
                images_per_s = format!("{images_per_s:.1}"),
                "step"
            );
        }
        last = Some(losses);
    }
    let images_per_s = (cfg.train.steps as usize * batch) as f64 / started.elapsed().as_secs_f64();
    drop(loader);

    let grid = trainer
        .sample(GRID_IMAGES, cfg.train.seed)
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("reading the sample grid back: {e:?}"))?;
    let grid_path = out.join(SAMPLES_PNG);
    output::write_grid(&grid_path, &grid, size as u32)
        .with_context(|| format!("writing {}", grid_path.display()))?;
    let swd = (eval_images > 0)
        .then(|| eval::swd_against_held_out(&trainer, cfg, eval_images))
        .transpose()?;
    if skipped > 0 {
        tracing::warn!(
            skipped,
            "images were skipped as unreadable (each path was logged once)"
        );
    }
    Ok(Summary {
        last: last.expect("train.steps is validated to be positive"),
        images_per_s,
        skipped,
        swd,
        out_dir: out.clone(),
    })
}

/// A loader batch as a `[count, 3, size, size]` tensor on `device`.
pub fn to_tensor(batch: Batch, size: usize, device: &Device) -> Tensor<TrainBackend, 4> {
    let data = TensorData::new(batch.pixels, [batch.count, 3, size, size]);
    Tensor::from_data(data, device)
}
