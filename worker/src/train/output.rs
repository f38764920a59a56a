//! What a run leaves for people: a sample grid and a loss log.

use std::fs::File;
use std::io::Cursor;
use std::path::Path;

use image::{ImageFormat, RgbImage};
use serde::{Deserialize, Serialize};

use crate::data::preprocess;
use crate::train::step::StepLosses;

/// Pixels between grid cells.
const GRID_GAP: u32 = 2;

/// Tiles `images` (CHW in [−1, 1], `size`×`size`) into a square grid, as PNG.
pub fn grid_png(images: &[f32], size: u32) -> image::ImageResult<Vec<u8>> {
    let mut png = Cursor::new(Vec::new());
    grid(images, size).write_to(&mut png, ImageFormat::Png)?;
    Ok(png.into_inner())
}

/// Width and height in pixels of the grid of `count` images of
/// `size`×`size`: as square as it gets, with a gap around every cell.
pub fn grid_size(count: usize, size: u32) -> (u32, u32) {
    let (cols, rows) = grid_cells(count);
    let cell = size + GRID_GAP;
    (cols * cell + GRID_GAP, rows * cell + GRID_GAP)
}

fn grid_cells(count: usize) -> (u32, u32) {
    let cols = ((count as f64).sqrt().ceil() as u32).max(1);
    (cols, (count as u32).div_ceil(cols))
}

fn grid(images: &[f32], size: u32) -> RgbImage {
    let plane = (3 * size * size) as usize;
    let count = images.len() / plane;
    let (cols, _) = grid_cells(count);
    let cell = size + GRID_GAP;
    let (width, height) = grid_size(count, size);
    let mut grid = RgbImage::from_pixel(width, height, image::Rgb([255; 3]));
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
    grid
}

/// One row of the loss log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossRow {
    /// Global step (0-based).
    pub step: u64,
    /// Its epoch.
    pub epoch: u64,
    /// Discriminator loss.
    pub d_loss: f32,
    /// Generator loss.
    pub g_loss: f32,
    /// Mean D(x).
    pub d_real: f32,
    /// Mean D(G(z)).
    pub d_fake: f32,
    /// Rank 0's throughput.
    pub images_per_s: f64,
}

impl LossRow {
    /// The row for step `step` of `epoch`.
    pub fn new(step: u64, epoch: u64, losses: &StepLosses, images_per_s: f64) -> Self {
        Self {
            step,
            epoch,
            d_loss: losses.d_loss,
            g_loss: losses.g_loss,
            d_real: losses.d_real,
            d_fake: losses.d_fake,
            images_per_s,
        }
    }
}

/// The whole loss history as CSV bytes (a checkpoint carries it, so a
/// resumed run's curves start at step 0).
pub fn history_csv(rows: &[LossRow]) -> csv::Result<Vec<u8>> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    for row in rows {
        writer.serialize(row)?;
    }
    writer
        .into_inner()
        .map_err(|e| csv::Error::from(e.into_error()))
}

/// Parses [`history_csv`] output.
pub fn parse_history(csv: &[u8]) -> csv::Result<Vec<LossRow>> {
    csv::Reader::from_reader(csv).deserialize().collect()
}

/// The rows of the loss log at `path` for steps before `before`: what a
/// replica that continues at that step (the group re-formed) carries on
/// from. A missing log (a replacement on a fresh disk) is an empty history;
/// the checkpoints keep the whole one.
pub fn read_history(path: &Path, before: u64) -> anyhow::Result<Vec<LossRow>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if before > 0 {
                tracing::warn!(path = %path.display(), before,
                    "no loss log to continue: losses.csv starts here (the checkpoints hold the earlier rows)");
            }
            return Ok(Vec::new());
        }
        Err(e) => return Err(anyhow::Error::new(e).context(format!("reading {}", path.display()))),
    };
    let mut rows =
        parse_history(&bytes).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    rows.retain(|r| r.step < before);
    Ok(rows)
}

/// Appends one CSV row per step, flushed so a crash keeps the history.
pub struct LossLog {
    writer: csv::Writer<File>,
}

impl LossLog {
    /// Creates (truncating) the CSV at `path`, starting with `history`.
    pub fn create(path: &Path, history: &[LossRow]) -> csv::Result<Self> {
        let mut log = Self {
            writer: csv::Writer::from_path(path)?,
        };
        for row in history {
            log.writer.serialize(row)?;
        }
        log.writer.flush()?;
        Ok(log)
    }

    /// Appends `row`.
    pub fn record(&mut self, row: &LossRow) -> csv::Result<()> {
        self.writer.serialize(row)?;
        self.writer.flush()?;
        Ok(())
    }
}
