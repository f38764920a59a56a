//! Quality measurement of a generator against held-out real images.

use anyhow::Context;
use burn::tensor::backend::AutodiffBackend;
use common::config::{Config, Split};

use crate::data::{DataError, ImageSource};
use crate::eval::swd::{SwdReport, sliced_wasserstein};
use crate::train::step::Trainer;

/// Seed of the patch positions and projection directions, fixed so that
/// two evaluations of one run are comparable (`worker swd --seed 22340`
/// measures another trainer's images the same way).
pub const SWD_SEED: u64 = 0x5744;
/// Seed of the evaluation noise, distinct from the sample grid's.
const EVAL_NOISE_SEED: u64 = 0xE7A1;

/// SWD between `count` generated images and `count` images of the data
/// set's validation split (the synthetic set's or CelebA's partition 1).
pub fn swd_against_held_out<B: AutodiffBackend>(
    trainer: &Trainer<B>,
    cfg: &Config,
    count: usize,
) -> anyhow::Result<SwdReport> {
    let size = cfg.model.image_size;
    let real = held_out_images(cfg, count)?;
    let fake = quantized(trainer.sample_pixels(count, EVAL_NOISE_SEED)?);
    sliced_wasserstein(&fake, &real, size, SWD_SEED).context("computing SWD")
}

/// Generated pixels as the 8-bit images a user saves (and another trainer's
/// PNGs are): real images went through 8 bits too, so both sides of the
/// distance are measured alike.
fn quantized(pixels: Vec<f32>) -> Vec<f32> {
    pixels
        .into_iter()
        .map(|v| ((v + 1.0) * 127.5).round().clamp(0.0, 255.0) / 127.5 - 1.0)
        .collect()
}

/// The first `count` validation images, preprocessed as for training.
pub fn held_out_images(cfg: &Config, count: usize) -> anyhow::Result<Vec<f32>> {
    let source = held_out(cfg, count)?;
    Ok(source.first_pixels(count, cfg.model.image_size as u32)?)
}

/// The held-out split, checked to hold at least `count` images. Training
/// calls this before step 0, so a missing or small split is found before
/// hours of training, not after.
pub fn held_out(cfg: &Config, count: usize) -> Result<ImageSource, DataError> {
    let mut data = cfg.data.clone();
    data.split = Split::Val;
    if data.source == "synthetic" {
        data.synthetic_size = data.synthetic_size.max(count * 10);
    }
    let source = ImageSource::open(&data, cfg.train.seed)?;
    if source.len() < count {
        return Err(DataError::HeldOut {
            source_name: source.name(),
            images: source.len(),
            wanted: count,
        });
    }
    Ok(source)
}
