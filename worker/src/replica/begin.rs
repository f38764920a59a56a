//! Taking up the coordinator's start (`pb::Start`) as this replica's
//! [`Start`]: fresh weights, a checkpoint from the store, the replica it
//! holds, or one another member sent (checked against what its sender
//! claimed).

use anyhow::Context;
use bytes::Bytes;
use common::Config;
use common::DataCursor;
use common::protocol::pb;
use common::storage::checkpoint::{self as layout, Checkpoints, TrainingState};
use tokio::runtime::Runtime;
use tracing::info;

use super::joining::Held;
use crate::model::backend::TrainBackend;
use crate::train::checkpoint;
use crate::train::output;
use crate::train::replica_loop::{Replica, Start};
use crate::train::step::Trainer;

/// The replica another member sent is not the one the coordinator said to
/// expect: the sender is at fault, not this worker.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct RefusedReplica(String);

/// Where this generation starts, as the coordinator's `start` says, with
/// `state` (a replica another member sent) or the `held` one; a replica
/// that is not what its sender claimed is refused, which is the sender's
/// failure, not this worker's.
#[allow(clippy::too_many_arguments)]
pub(super) fn begin(
    cfg: &Config,
    runtime: &Runtime,
    checkpoints: &Checkpoints,
    start: &pb::Start,
    state: Option<Bytes>,
    held: Option<Held>,
    replica: Replica,
    generation: u64,
    trainer: &mut Trainer<TrainBackend>,
) -> anyhow::Result<Result<Start, RefusedReplica>> {
    anyhow::ensure!(
        start.batch_size > 0 && start.steps <= cfg.train.steps && start.first_step <= start.steps,
        "the coordinator sent an impossible start: steps {}..{} of {} with batches of {}",
        start.first_step,
        start.steps,
        cfg.train.steps,
        start.batch_size
    );
    let replica_start = |history: Vec<output::LossRow>| Start {
        first_step: start.first_step,
        cursor: DataCursor {
            epoch: start.epoch,
            position: start.position,
        },
        history,
        until: start.steps,
        batch: start.batch_size as usize,
        checkpoint_first: start.checkpoint,
        generation,
    };
    let history = || -> anyhow::Result<Vec<output::LossRow>> {
        match replica.rank {
            0 => output::read_history(
                &cfg.output.dir.join(common::storage::outputs::LOSSES_CSV),
                start.first_step,
            ),
            _ => Ok(Vec::new()),
        }
    };
    let source = pb::Source::try_from(start.source).unwrap_or(pb::Source::Unspecified);
    match source {
        pb::Source::Checkpoint => {
            let (state, history) = resume(runtime, checkpoints, start, trainer)?;
            Ok(Ok(Start {
                cursor: state.cursor,
                ..replica_start(history)
            }))
        }
        pb::Source::Keep => {
            let held =
                held.context("the coordinator said to keep a replica, but this worker holds none")?;
            anyhow::ensure!(
                held.step == start.first_step,
                "this worker holds step {} but the group starts at step {}",
                held.step,
                start.first_step
            );
            info!(
                step = held.step,
                "continuing from the replica this worker holds"
            );
            Ok(Ok(replica_start(history()?)))
        }
        pb::Source::Transfer => {
            let bundle =
                state.context("the coordinator said a replica was sent, but none arrived")?;
            let restored = match checkpoint::restore_replica(trainer, bundle) {
                Ok(restored) => restored,
                Err(e) => return Ok(Err(RefusedReplica(format!("{e:#}")))),
            };
            if restored.step != start.first_step {
                return Ok(Err(RefusedReplica(format!(
                    "it is at step {} but the group starts at step {}",
                    restored.step, start.first_step
                ))));
            }
            let checksum = trainer.checksum();
            if checksum != start.checksum {
                return Ok(Err(RefusedReplica(format!(
                    "its parameter checksum is {checksum:016x}, but its sender claimed {:016x}",
                    start.checksum
                ))));
            }
            info!(
                step = restored.step,
                "took over the replica another member sent"
            );
            Ok(Ok(replica_start(history()?)))
        }
        pb::Source::Fresh | pb::Source::Unspecified => {
            anyhow::ensure!(
                start.first_step == 0,
                "the coordinator said to start fresh at step {}",
                start.first_step
            );
            if held.is_some() {
                // The replicas could not be trusted and no checkpoint exists yet.
                *trainer =
                    Trainer::new(&cfg.model, &cfg.train, trainer.device()).for_rank(replica.rank);
            }
            Ok(Ok(Start {
                until: start.steps,
                batch: start.batch_size as usize,
                generation,
                ..Start::fresh(cfg)
            }))
        }
    }
}

/// Loads the checkpoint `start` names into `trainer`; returns its state
/// and loss history.
fn resume(
    runtime: &Runtime,
    checkpoints: &Checkpoints,
    start: &pb::Start,
    trainer: &mut Trainer<TrainBackend>,
) -> anyhow::Result<(TrainingState, Vec<output::LossRow>)> {
    let name = &start.resume_from;
    let step = layout::parse_name(name)
        .with_context(|| format!("the coordinator sent an invalid checkpoint name {name:?}"))?;
    let loaded = runtime
        .block_on(checkpoints.load(step))
        .with_context(|| format!("loading checkpoint {}", checkpoints.location(step)))?;
    let (state, history) = checkpoint::restore(trainer, &loaded)?;
    anyhow::ensure!(
        state.step == start.first_step,
        "checkpoint {name} is at step {} but the coordinator starts at step {}",
        state.step,
        start.first_step
    );
    info!(checkpoint = %name, step = state.step, epoch = state.cursor.epoch, "resumed from checkpoint");
    Ok((state, history))
}
