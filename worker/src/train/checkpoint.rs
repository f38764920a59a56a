//! What a checkpoint holds for a replica, and writing it without stalling
//! training.
//!
//! Rank 0 captures the state on the training thread (it must be the state
//! after exactly this step) and hands the bytes to an [`Uploader`], which
//! hashes and uploads them on the gRPC runtime while training goes on. One
//! upload at a time: a new checkpoint first waits for the previous one.

use anyhow::Context;
use bytes::Bytes;
use common::storage::checkpoint::{self, Checkpoint, Checkpoints, STATE, TrainingState};
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

use crate::model::backend::TrainBackend;
use crate::train::output::{self, LossRow};
use crate::train::plot;
use crate::train::step::{Trainer, TrainerRecords};

/// G's parameters and BatchNorm statistics (rank 0's).
pub const GENERATOR: &str = "generator.mpk";
/// D's parameters and BatchNorm statistics (rank 0's).
pub const DISCRIMINATOR: &str = "discriminator.mpk";
/// G's Adam state.
pub const OPTIMIZER_G: &str = "optimizer-g.mpk";
/// D's Adam state.
pub const OPTIMIZER_D: &str = "optimizer-d.mpk";
// A checkpoint also holds the run's loss history, curves and sample grid,
// under the names they have in the output folder.
use common::storage::outputs::{LOSS_PNG, LOSSES_CSV, SAMPLES_PNG};

/// Images in the checkpoint's sample grid.
const GRID_IMAGES: usize = 64;

/// Everything a checkpoint stores, captured now from `trainer`.
pub fn capture(
    trainer: &Trainer<TrainBackend>,
    state: &TrainingState,
    history: &[LossRow],
    image_size: usize,
    seed: u64,
) -> anyhow::Result<Vec<(String, Bytes)>> {
    let records = trainer.records()?;
    let grid = trainer.sample_pixels(GRID_IMAGES, seed)?;
    let samples = output::grid_png(&grid, image_size as u32).context("encoding the sample grid")?;
    let losses = output::history_csv(history).context("encoding the loss history")?;
    let state = serde_json::to_vec_pretty(state).context("encoding the training state")?;
    Ok(vec![
        (GENERATOR.into(), records.generator.into()),
        (DISCRIMINATOR.into(), records.discriminator.into()),
        (OPTIMIZER_G.into(), records.optimizer_g.into()),
        (OPTIMIZER_D.into(), records.optimizer_d.into()),
        (SAMPLES_PNG.into(), samples.into()),
        (LOSS_PNG.into(), plot::loss_png(history)?.into()),
        (LOSSES_CSV.into(), losses.into()),
        (STATE.into(), state.into()),
    ])
}

/// Loads `checkpoint` into `trainer`; returns its training state and loss history.
pub fn restore(
    trainer: &mut Trainer<TrainBackend>,
    checkpoint: &Checkpoint,
) -> anyhow::Result<(TrainingState, Vec<LossRow>)> {
    let records = records(|name| Ok(checkpoint.object(name)?.to_vec()))?;
    trainer
        .load_records(records)
        .with_context(|| format!("restoring checkpoint {}", checkpoint.name()))?;
    let history = output::parse_history(checkpoint.object(LOSSES_CSV)?)
        .with_context(|| format!("reading {LOSSES_CSV} of checkpoint {}", checkpoint.name()))?;
    Ok((checkpoint.state()?, history))
}

/// A replica as it travels to a member that joins without one: the
/// networks, both optimizers and the training state, bundled (no sample
/// grid, loss history or plot: those are rank 0's artifacts).
pub fn replica_bundle(
    trainer: &Trainer<TrainBackend>,
    state: &TrainingState,
) -> anyhow::Result<Bytes> {
    let records = trainer.records()?;
    let state = serde_json::to_vec(state).context("encoding the training state")?;
    Ok(common::protocol::bundle::encode(&[
        (GENERATOR.into(), records.generator.into()),
        (DISCRIMINATOR.into(), records.discriminator.into()),
        (OPTIMIZER_G.into(), records.optimizer_g.into()),
        (OPTIMIZER_D.into(), records.optimizer_d.into()),
        (STATE.into(), state.into()),
    ]))
}

/// Loads a bundle made by [`replica_bundle`] into `trainer`; returns its state.
pub fn restore_replica(
    trainer: &mut Trainer<TrainBackend>,
    bundle: Bytes,
) -> anyhow::Result<TrainingState> {
    let objects = common::protocol::bundle::decode(bundle)?;
    let object = |name: &str| -> anyhow::Result<Vec<u8>> {
        objects
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, b)| b.to_vec())
            .with_context(|| format!("the replica sent to this worker has no {name}"))
    };
    trainer
        .load_records(records(object)?)
        .context("loading the replica sent to this worker")?;
    serde_json::from_slice(&object(STATE)?).context("reading the replica's training state")
}

/// Uploads checkpoints in the background, one at a time.
pub struct Uploader {
    checkpoints: Checkpoints,
    in_flight: Option<(u64, JoinHandle<()>)>,
}

impl Uploader {
    /// Uploads into `checkpoints`.
    pub fn new(checkpoints: Checkpoints) -> Self {
        Self {
            checkpoints,
            in_flight: None,
        }
    }

    /// Waits for the previous upload, then starts uploading `objects` as
    /// checkpoint `step` on `runtime`; `done` learns how it went.
    pub fn start<F, Fut>(
        &mut self,
        runtime: &Runtime,
        step: u64,
        objects: Vec<(String, Bytes)>,
        done: F,
    ) where
        F: FnOnce(u64, Result<(), String>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        self.wait(runtime);
        let checkpoints = self.checkpoints.clone();
        let task = runtime.spawn(async move {
            let started = std::time::Instant::now();
            let outcome = checkpoints
                .write(step, objects)
                .await
                .map(|manifest| {
                    let bytes: u64 = manifest.objects.iter().map(|o| o.size).sum();
                    metrics::histogram!("gancluster_worker_checkpoint_upload_seconds")
                        .record(started.elapsed().as_secs_f64());
                    tracing::info!(
                        checkpoint = %checkpoints.location(step),
                        bytes,
                        seconds = format!("{:.2}", started.elapsed().as_secs_f64()),
                        "checkpoint uploaded"
                    );
                })
                .map_err(|e| e.to_string());
            if let Err(error) = &outcome {
                tracing::warn!(checkpoint = %checkpoint::name(step), %error, "checkpoint upload failed; training goes on");
            }
            done(step, outcome).await;
        });
        self.in_flight = Some((step, task));
    }

    /// Blocks until the upload in flight, if any, has finished (its outcome
    /// is already logged and reported to the coordinator).
    pub fn wait(&mut self, runtime: &Runtime) {
        if let Some((step, task)) = self.in_flight.take()
            && let Err(e) = runtime.block_on(task)
        {
            tracing::warn!(checkpoint = %checkpoint::name(step), error = %e, "the upload task failed");
        }
    }
}

/// The trainer's records, each read by `object` from where it is kept.
fn records(object: impl Fn(&str) -> anyhow::Result<Vec<u8>>) -> anyhow::Result<TrainerRecords> {
    Ok(TrainerRecords {
        generator: object(GENERATOR)?,
        discriminator: object(DISCRIMINATOR)?,
        optimizer_g: object(OPTIMIZER_G)?,
        optimizer_d: object(OPTIMIZER_D)?,
    })
}
