//! The coordinator-backed [`StepSync`]: gradients and averaging states go
//! through the session's all-reduce, every step is reported with its
//! checksum, the coordinator's decisions (checkpoint, stop) come back, and
//! rank 0's checkpoints upload in the background. Before each round it
//! keeps the state to go back to if the group re-forms mid-step.
//!
//! When a session call fails, why is kept as an [`Ended`]: the driver
//! learns why the generation ended from it, not by searching the error
//! that the training loop returns.

use std::time::Instant;

use bytes::Bytes;
use common::DataCursor;
use common::client::{Reduced, Session, SessionError};
use common::protocol::pb;
use common::protocol::wire::Net;
use common::sampling::cadence::Cadence;
use tokio::runtime::Runtime;
use tracing::warn;

use super::lifecycle::Ended;
use crate::model::backend::TrainBackend;
use crate::train::checkpoint::Uploader;
use crate::train::replica_loop::{Directive, StepRecord, StepSync};
use crate::train::step::{GradientReducer, Snapshot, Trainer, Update};

/// The coordinator-backed [`StepSync`].
pub(super) struct Remote<'a> {
    pub(super) runtime: &'a Runtime,
    pub(super) session: Option<Session>,
    pub(super) waited_ms: f64,
    pub(super) uploader: &'a mut Uploader,
    /// The state before the step in progress (or its round, under
    /// post-local SGD), its step and data cursor.
    pub(super) snapshot: Option<(u64, DataCursor, Snapshot<TrainBackend>)>,
    /// Where rounds start (`train.sync_every`).
    pub(super) cadence: Cadence,
    /// Why the session failed, once it has.
    pub(super) ended: Option<Ended>,
}

impl<'a> Remote<'a> {
    /// Trains over `session` in the generation it was opened for.
    pub(super) fn new(
        runtime: &'a Runtime,
        session: Session,
        uploader: &'a mut Uploader,
        cadence: Cadence,
    ) -> Self {
        Self {
            runtime,
            session: Some(session),
            waited_ms: 0.0,
            uploader,
            snapshot: None,
            cadence,
            ended: None,
        }
    }

    fn session(&mut self) -> &mut Session {
        self.session
            .as_mut()
            .expect("the session lives until the end")
    }

    /// `result` of a session call; a failure is kept as why the
    /// generation ended before it goes up the training loop.
    fn noted<T>(&mut self, result: Result<T, SessionError>) -> Result<T, SessionError> {
        if let Err(err) = &result {
            self.ended = Some(Ended::of(err));
        }
        result
    }

    /// One all-reduce of `values` for (`step`, `net`), timed.
    fn all_reduce(
        &mut self,
        step: u64,
        net: Net,
        values: Vec<f32>,
    ) -> Result<Reduced, SessionError> {
        let started = Instant::now();
        let runtime = self.runtime;
        let reduced = runtime.block_on(self.session().all_reduce(step, net, values));
        self.waited_ms += started.elapsed().as_secs_f64() * 1e3;
        self.noted(reduced)
    }
}

impl GradientReducer for Remote<'_> {
    fn reduce(&mut self, step: u64, net: Net, grads: Vec<f32>) -> anyhow::Result<Update> {
        let reduced = self.all_reduce(step, net, grads)?;
        if reduced.skip {
            warn!(
                step,
                ?net,
                "skipping this optimizer step on every rank: a rank's \
                gradient held NaN or Inf (allreduce.nonfinite = skip)"
            );
            return Ok(Update::Skip);
        }
        Ok(Update::Apply(reduced.mean))
    }
}

impl StepSync for Remote<'_> {
    /// Keeps the state to go back to: before this step, or under post-local
    /// SGD before this round (replicas agree only there).
    fn before_step(&mut self, step: u64, cursor: DataCursor, trainer: &Trainer<TrainBackend>) {
        if self.cadence.starts_round(step) {
            self.snapshot = Some((step, cursor, trainer.snapshot()));
        }
    }

    fn waited_ms(&self) -> f64 {
        self.waited_ms
    }

    fn average(&mut self, step: u64, trainer: &mut Trainer<TrainBackend>) -> anyhow::Result<()> {
        for net in [Net::Discriminator, Net::Generator] {
            let state = trainer.averaging_state(net)?;
            let averaged = self.all_reduce(step, net, state)?;
            // Averaging needs the halt policy (config validation), so a
            // non-finite state ends the run at the coordinator instead.
            anyhow::ensure!(
                !averaged.skip,
                "the coordinator skipped averaging step {step}: a non-finite state cannot be skipped"
            );
            trainer.load_averaged(net, &averaged.mean)?;
        }
        Ok(())
    }

    fn after_step(
        &mut self,
        record: &StepRecord,
        trainer: &mut Trainer<TrainBackend>,
    ) -> anyhow::Result<Directive> {
        self.waited_ms = 0.0;
        let checksum = trainer.checksum();
        let report = pb::StepReport {
            step: record.step,
            epoch: record.epoch,
            d_loss: record.losses.d_loss,
            g_loss: record.losses.g_loss,
            d_real: record.losses.d_real,
            d_fake: record.losses.d_fake,
            images_per_s: record.images_per_s,
            checksum,
            allreduce_ms: record.allreduce_ms,
        };
        let runtime = self.runtime;
        let reported = runtime.block_on(self.session().report(report));
        self.noted(reported)?;
        let control = self.session().take_control(record.step);
        Ok(control.map_or_else(Directive::default, |c| Directive {
            checkpoint: c.checkpoint,
            stop: c.stop,
        }))
    }

    fn checkpoint(&mut self, steps: u64, objects: Vec<(String, Bytes)>) -> anyhow::Result<()> {
        let notifier = self.session().notifier();
        let runtime = self.runtime;
        self.uploader
            .start(runtime, steps, objects, move |step, outcome| async move {
                // A closed session means the run is over; the coordinator reports why.
                let _ = notifier.checkpoint_written(step, outcome).await;
            });
        Ok(())
    }
}
