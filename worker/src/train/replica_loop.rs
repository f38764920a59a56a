//! The step loop every replica runs, standalone or distributed.
//!
//! The loop is the same in both modes; what differs is the [`StepSync`]:
//! standalone training applies its own gradients, a distributed replica
//! exchanges them with the coordinator (or, under post-local SGD, trains
//! alone and averages its state every `train.sync_every` steps), reports
//! each step and learns from it when to checkpoint or stop. Rank 0 writes
//! the run's artifacts and its checkpoints.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use burn::tensor::{Tensor, TensorData};
use bytes::Bytes;
use common::sampling::cadence::Cadence;
use common::storage::checkpoint::TrainingState;
use common::{Config, DataCursor, ShardSampler};
use tracing::info;

use crate::model::backend::{self, Device, TrainBackend};
use common::storage::outputs::{CONFIG_TOML, LOSS_PNG, LOSSES_CSV, SAMPLES_PNG};

use crate::data::{Batch, BatchLoader, ImageSource};
use crate::eval::held_out;
use crate::eval::swd::SwdReport;
use crate::train::checkpoint;
use crate::train::output::{self, LossLog, LossRow};
use crate::train::step::{GradientReducer, LocalReducer, StepLosses, Trainer};
use crate::train::tensorboard::{self, Board};

/// Final trainable parameters, G's then D's, as little-endian f32.
pub const PARAMS_F32: &str = "params.f32";

/// Images in the sample grid (8×8).
const GRID_IMAGES: usize = 64;

/// This process's place in the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replica {
    /// 0-based rank.
    pub rank: usize,
    /// Number of replicas.
    pub world: usize,
}

impl Replica {
    /// The only replica of a standalone run.
    pub const ALONE: Self = Self { rank: 0, world: 1 };
}

/// Where a replica's training begins and ends: step 0 with fresh
/// weights, or the step, data cursor and loss history of a restored
/// checkpoint or a replica, up to the step the group trains to.
#[derive(Debug, Clone)]
pub struct Start {
    /// The first step to train.
    pub first_step: u64,
    /// Where that step reads the data.
    pub cursor: DataCursor,
    /// Rank 0's loss history up to `first_step`.
    pub history: Vec<LossRow>,
    /// The step count the group trains to (`train.steps`, unless it stops
    /// earlier); equal to `first_step` when a group re-formed after its
    /// last step only to save its last checkpoint.
    pub until: u64,
    /// Images per step on this replica (`train.batch_size`, or its share
    /// of the global batch in a smaller group: `train.elastic_batch`).
    pub batch: usize,
    /// Rank 0 checkpoints the state it starts from before training (the
    /// member that was to write it was lost).
    pub checkpoint_first: bool,
    /// The group's generation (0 standalone), for TensorBoard.
    pub generation: u64,
}

impl Start {
    /// Step 0 with fresh weights, to the end of `cfg`'s run.
    pub fn fresh(cfg: &Config) -> Self {
        Self {
            first_step: 0,
            cursor: DataCursor::default(),
            history: Vec::new(),
            until: cfg.train.steps,
            batch: cfg.train.batch_size,
            checkpoint_first: false,
            generation: 0,
        }
    }
}

/// One finished step, as reported.
#[derive(Debug, Clone, Copy)]
pub struct StepRecord {
    /// Global step (0-based).
    pub step: u64,
    /// Its epoch.
    pub epoch: u64,
    /// This replica's losses.
    pub losses: StepLosses,
    /// This replica's throughput.
    pub images_per_s: f64,
    /// Milliseconds it waited for the step's all-reduces.
    pub allreduce_ms: f64,
}

/// What the group does once a step is trained, as the coordinator decided.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Directive {
    /// Rank 0 saves a checkpoint of the state after this step.
    pub checkpoint: bool,
    /// Every replica stops after this step.
    pub stop: bool,
}

/// How a replica exchanges gradients, reports steps and saves checkpoints.
pub trait StepSync: GradientReducer {
    /// Called before step `step`, which reads the data from `cursor`, with
    /// the state it starts from (a distributed replica keeps it, to go back
    /// to if the group re-forms during the step).
    fn before_step(&mut self, _step: u64, _cursor: DataCursor, _trainer: &Trainer<TrainBackend>) {}

    /// Milliseconds the step in progress has waited for all-reduces so far
    /// (none when the replica reduces alone).
    fn waited_ms(&self) -> f64 {
        0.0
    }

    /// Called after every step with the updated trainer; says what to do next.
    fn after_step(
        &mut self,
        record: &StepRecord,
        trainer: &mut Trainer<TrainBackend>,
    ) -> anyhow::Result<Directive>;

    /// Post-local SGD (`train.sync_every` > 1): after step `step`, the
    /// last of its round, replaces both networks' parameters and Adam
    /// moments with the group's mean.
    fn average(&mut self, step: u64, trainer: &mut Trainer<TrainBackend>) -> anyhow::Result<()>;

    /// Saves `objects` as the checkpoint after `steps` steps (rank 0 only,
    /// and only when a [`Directive`] asked for it).
    fn checkpoint(&mut self, steps: u64, objects: Vec<(String, Bytes)>) -> anyhow::Result<()>;
}

impl StepSync for LocalReducer {
    fn after_step(
        &mut self,
        _: &StepRecord,
        _: &mut Trainer<TrainBackend>,
    ) -> anyhow::Result<Directive> {
        Ok(Directive::default())
    }

    /// The mean of one replica is itself.
    fn average(&mut self, _: u64, _: &mut Trainer<TrainBackend>) -> anyhow::Result<()> {
        Ok(())
    }

    fn checkpoint(&mut self, _: u64, _: Vec<(String, Bytes)>) -> anyhow::Result<()> {
        anyhow::bail!("standalone training keeps no checkpoints: run it under a coordinator")
    }
}

/// What a finished run reports.
#[derive(Debug)]
pub struct Summary {
    /// Steps completed in total (less than `train.steps` when stopped early).
    pub steps: u64,
    /// Where the next step would read the data.
    pub cursor: DataCursor,
    /// Losses of the last step this replica trained, if it trained one.
    pub last: Option<StepLosses>,
    /// Mean training throughput of this replica.
    pub images_per_s: f64,
    /// Images skipped as unreadable.
    pub skipped: usize,
    /// SWD against held-out images, when requested (rank 0 only).
    pub swd: Option<SwdReport>,
}

impl Summary {
    /// A run found complete before this replica trained anything.
    pub fn complete(steps: u64) -> Self {
        Self {
            steps,
            cursor: DataCursor::default(),
            last: None,
            images_per_s: 0.0,
            skipped: 0,
            swd: None,
        }
    }
}

/// Trains steps `start.first_step..start.until` on this replica's shard,
/// or until a [`Directive`] stops it. Rank 0 writes the sample grid,
/// loss CSV, effective config and final parameters to `cfg.output.dir`,
/// saves checkpoints when told to, and measures SWD against `eval_images`
/// held-out images (at checkpoints and at the end) when that is not zero.
pub fn train(
    cfg: &Config,
    replica: Replica,
    trainer: &mut Trainer<TrainBackend>,
    sync: &mut impl StepSync,
    eval_images: usize,
    start: Start,
) -> anyhow::Result<Summary> {
    anyhow::ensure!(
        start.first_step < start.until || (start.first_step > 0 && start.first_step == start.until),
        "nothing to train: the run is at step {} and trains to step {}",
        start.first_step,
        start.until
    );
    let cadence = Cadence::of(&cfg.train);
    anyhow::ensure!(
        cadence.starts_round(start.first_step),
        "step {} does not start a round of train.sync_every = {} steps: replicas agree, and \
         training can resume, only where a round starts",
        start.first_step,
        cadence.every()
    );
    let out = &cfg.output.dir;
    let writes = replica.rank == 0;
    let mut history = start.history;
    let mut log = if writes {
        Some(prepare_output(cfg, out, &history)?)
    } else {
        None
    };
    let mut board = match writes {
        true => Board::open(cfg, start.first_step)?,
        false => None,
    };
    let source = ImageSource::open(&cfg.data, cfg.train.seed)?;
    if writes && eval_images > 0 {
        held_out::held_out(cfg, eval_images)
            .context("checking the held-out split for --eval-images")?;
    }
    info!(data = %source.name(), images = source.len(), backend = backend::NAME, rank = replica.rank,
        world = replica.world, first_step = start.first_step, "starting training");
    let sampler = ShardSampler::new(source.len(), replica.world, replica.rank, cfg.train.seed);
    let (size, batch) = (cfg.model.image_size, start.batch);
    let mut loader = BatchLoader::spawn(
        source,
        sampler,
        replica.world,
        batch,
        size as u32,
        start.first_step,
        start.cursor,
        cfg.data.prefetch,
    )?;

    let started = Instant::now();
    let (mut last, mut skipped, mut done) = (None, 0, start.first_step);
    let mut cursor = start.cursor;
    let mut swd = None;
    if start.checkpoint_first && writes {
        let (d_loss, g_loss) = history
            .last()
            .map_or((f32::NAN, f32::NAN), |r| (r.d_loss, r.g_loss));
        let state = training_state(cfg, replica, done, cursor, (d_loss, g_loss), None);
        info!(
            step = done,
            "saving the checkpoint the lost member was to write"
        );
        let objects = checkpoint::capture(trainer, &state, &history, size, cfg.train.seed)?;
        sync.checkpoint(done, objects)?;
    }
    for _ in start.first_step..start.until {
        let step_started = Instant::now();
        let batch = loader.next_batch()?;
        metrics::histogram!("gancluster_worker_data_wait_seconds")
            .record(step_started.elapsed().as_secs_f64());
        sync.before_step(batch.step, cursor, trainer);
        let (step, epoch, count) = (batch.step, batch.epoch, batch.count);
        cursor = batch.cursor_after;
        skipped = batch.skipped;
        let real = to_tensor(batch, size, trainer.device());
        let losses = match cadence.shares_gradients(step) {
            true => trainer.train_step(step, real, sync)?,
            false => {
                let mut alone = LocalReducer::new(cfg.allreduce.nonfinite);
                let losses = trainer.train_step(step, real, &mut alone)?;
                if cadence.syncs(step) {
                    sync.average(step, trainer)?;
                }
                losses
            }
        };
        let record = StepRecord {
            step,
            epoch,
            losses,
            images_per_s: count as f64 / step_started.elapsed().as_secs_f64(),
            allreduce_ms: sync.waited_ms(),
        };
        let directive = sync.after_step(&record, trainer)?;
        done = step + 1;
        metrics::histogram!("gancluster_worker_step_seconds")
            .record(step_started.elapsed().as_secs_f64());
        metrics::gauge!("gancluster_worker_step").set(step as f64);
        last = Some(losses);
        if let Some(log) = log.as_mut() {
            let row = LossRow::new(step, epoch, &losses, record.images_per_s);
            log.record(&row)?;
            if let Some(board) = board.as_mut()
                && (done.is_multiple_of(cfg.train.log_every) || done == start.until)
            {
                let group = tensorboard::Group {
                    allreduce_ms: record.allreduce_ms,
                    workers: replica.world,
                    generation: start.generation,
                };
                board.step(&row, group)?;
            }
            history.push(row);
        }
        if done.is_multiple_of(cfg.train.log_every) {
            info!(
                step = done,
                epoch,
                d_loss = losses.d_loss,
                g_loss = losses.g_loss,
                d_real = losses.d_real,
                d_fake = losses.d_fake,
                images_per_s = record.images_per_s,
                "step"
            );
        }
        if directive.checkpoint && writes {
            swd = (eval_images > 0)
                .then(|| held_out::swd_against_held_out(trainer, cfg, eval_images))
                .transpose()?
                .map(|report| (done, report));
            let losses = (losses.d_loss, losses.g_loss);
            let mean = swd.as_ref().map(|(_, report)| report.mean);
            let state = training_state(cfg, replica, done, cursor, losses, mean);
            let objects = checkpoint::capture(trainer, &state, &history, size, cfg.train.seed)?;
            if let Some(board) = board.as_mut() {
                let grid = objects.iter().find(|(name, _)| name == SAMPLES_PNG);
                if let Some((_, png)) = grid {
                    board.samples(step, png.to_vec(), grid_size(size))?;
                }
                if let Some(mean) = mean {
                    board.swd(step, mean)?;
                }
            }
            sync.checkpoint(done, objects)?;
        }
        if directive.stop {
            info!(step = done, "stopping early, as the coordinator asked");
            break;
        }
    }
    let trained = (done - start.first_step) as usize;
    let images_per_s = (trained * batch) as f64 / started.elapsed().as_secs_f64();
    drop(loader);
    if skipped > 0 {
        tracing::warn!(
            skipped,
            "images were skipped as unreadable (each path was logged once)"
        );
    }
    let swd = if writes {
        let grid = write_results(trainer, out, size, cfg.train.seed, &history)?;
        let swd = match swd {
            Some((step, report)) if step == done => Some(report),
            _ => {
                let report = (eval_images > 0)
                    .then(|| held_out::swd_against_held_out(trainer, cfg, eval_images))
                    .transpose()?;
                if let (Some(board), Some(report)) = (board.as_mut(), &report) {
                    board.swd(done - 1, report.mean)?;
                }
                report
            }
        };
        if let Some(board) = board.as_mut() {
            board.samples(done - 1, grid, grid_size(size))?;
        }
        swd
    } else {
        None
    };
    Ok(Summary {
        steps: done,
        cursor,
        last,
        images_per_s,
        skipped,
        swd,
    })
}

/// What a checkpoint of this run after `step` steps records besides the
/// weights.
fn training_state(
    cfg: &Config,
    replica: Replica,
    step: u64,
    cursor: DataCursor,
    (d_loss, g_loss): (f32, f32),
    swd: Option<f64>,
) -> TrainingState {
    TrainingState {
        step,
        cursor,
        world: replica.world,
        config_hash: cfg.training_hash(),
        identity: cfg.resume_identity(),
        d_loss,
        g_loss,
        swd,
    }
}

fn prepare_output(cfg: &Config, out: &Path, history: &[LossRow]) -> anyhow::Result<LossLog> {
    std::fs::create_dir_all(out)
        .with_context(|| format!("creating output folder {}", out.display()))?;
    std::fs::write(out.join(CONFIG_TOML), cfg.to_toml()?).context("saving the effective config")?;
    let path = out.join(LOSSES_CSV);
    LossLog::create(&path, history).with_context(|| format!("creating {}", path.display()))
}

/// Writes the final loss curves, sample grid and parameters; returns the
/// grid as PNG.
fn write_results(
    trainer: &Trainer<TrainBackend>,
    out: &Path,
    size: usize,
    seed: u64,
    history: &[LossRow],
) -> anyhow::Result<Vec<u8>> {
    let plot_path = out.join(LOSS_PNG);
    std::fs::write(&plot_path, crate::train::plot::loss_png(history)?)
        .with_context(|| format!("writing {}", plot_path.display()))?;
    let grid = trainer.sample_pixels(GRID_IMAGES, seed)?;
    let grid_path = out.join(SAMPLES_PNG);
    let png = output::grid_png(&grid, size as u32).context("encoding the sample grid")?;
    std::fs::write(&grid_path, &png).with_context(|| format!("writing {}", grid_path.display()))?;
    let params: Vec<u8> = trainer
        .flat_params()
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let params_path: PathBuf = out.join(PARAMS_F32);
    std::fs::write(&params_path, params)
        .with_context(|| format!("writing {}", params_path.display()))?;
    Ok(png)
}

/// The sample grid's size in pixels.
fn grid_size(image_size: usize) -> (u32, u32) {
    output::grid_size(GRID_IMAGES, image_size as u32)
}

/// A loader batch as a `[count, 3, size, size]` tensor on `device`.
pub fn to_tensor(batch: Batch, size: usize, device: &Device) -> Tensor<TrainBackend, 4> {
    let data = TensorData::new(batch.pixels, [batch.count, 3, size, size]);
    Tensor::from_data(data, device)
}
