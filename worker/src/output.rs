//! What a run leaves on disk for people: a sample grid and a loss log.

use std::fs::File;
use std::path::Path;

use image::RgbImage;

use crate::data::preprocess;
use crate::training::StepLosses;

/// Pixels between grid cells.
const GRID_GAP: u32 = 2;

/// Tiles `images` (CHW in [−1, 1], `size`×`size`) into a square grid PNG.
pub fn write_grid(path: &Path, images: &[f32], size: u32) -> image::ImageResult<()> {
    let plane = (3 * size * size) as usize;
    let count = images.len() / plane;
    let cols = (count as f64).sqrt().ceil() as u32;
    let rows = (count as u32).div_ceil(cols);
    let cell = size + GRID_GAP;
    let mut grid = RgbImage::from_pixel(
        cols * cell + GRID_GAP,
        rows * cell + GRID_GAP,
        image::Rgb([255; 3]),
    );
    for (i, chw) in images.chunks_exact(plane).enumerate() {
        let tile = preprocess::to_rgb(chw, size);
        let (x, y) = (i as u32 % cols, i as u32 / cols);
        image::imageops::replace(
            &mut grid,
            &tile,
            i64::from(GRID_GAP + x * cell),
            i64::from(GRID_GAP + y * cell),
        );
    }
    grid.save(path)
}

/// One row of the loss log.
#[derive(Debug, serde::Serialize)]
struct LossRow {
    step: u64,
    epoch: u64,
    d_loss: f32,
    g_loss: f32,
    d_real: f32,
    d_fake: f32,
    images_per_s: f64,
}

/// Appends one CSV row per step, flushed so a crash keeps the history.
pub struct LossLog {
    writer: csv::Writer<File>,
}

impl LossLog {
    /// Creates (truncating) the CSV at `path` with its header.
    pub fn create(path: &Path) -> csv::Result<Self> {
        Ok(Self {
            writer: csv::Writer::from_path(path)?,
        })
    }

    /// Records step `step` of `epoch`.
    pub fn record(
        &mut self,
        step: u64,
        epoch: u64,
        losses: &StepLosses,
        images_per_s: f64,
    ) -> csv::Result<()> {
        self.writer.serialize(LossRow {
            step,
            epoch,
            d_loss: losses.d_loss,
            g_loss: losses.g_loss,
            d_real: losses.d_real,
            d_fake: losses.d_fake,
            images_per_s,
        })?;
        self.writer.flush()?;
        Ok(())
    }
}
