//! One replica of a coordinator-driven group: `worker train --coordinator URL`.
//!
//! gRPC runs on a small tokio runtime; burn runs on this thread, outside
//! it, so tensor work never blocks the reactor that keeps the streams
//! flowing. Each gradient goes through the coordinator's all-reduce and
//! every step is reported with a parameter checksum. The coordinator says
//! where to start (fresh or from a checkpoint) and when to checkpoint or
//! stop; rank 0 uploads checkpoints in the background.

use std::time::Instant;

use anyhow::Context;
use bytes::Bytes;
use common::Config;
use common::auth::Token;
use common::checkpoint::{self as layout, Checkpoints};
use common::pb;
use common::report;
use common::session::{self, Session, SessionError};
use common::store::Store;
use tokio::runtime::Runtime;
use tracing::info;

use crate::backend::{self, TrainBackend};
use crate::checkpoint::{self, Uploader};
use crate::failure;
use crate::params;
use crate::training::{GradientReducer, Net, Trainer, Update};
use crate::training_loop::{self, Directive, Replica, Start, StepRecord, StepSync, Summary};

/// Fault injection for tests: `GANCLUSTER_FAULT=<kind>:<rank>:<step>`
/// makes that rank, after that step, nudge its discriminator (`diverge`,
/// which the coordinator's checksum comparison must catch), exit abruptly
/// (`exit`, a worker dying mid-run) or block its training thread forever
/// while its network runtime keeps heartbeating (`hang`, a stuck GPU); or,
/// during that step, send a NaN in its discriminator gradient (`nan`).
/// Faults fire in the group's first generation only, so a group the
/// coordinator restarts runs clean.
pub const FAULT_ENV: &str = "GANCLUSTER_FAULT";

/// An injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Diverge(u64),
    Exit(u64),
    Hang(u64),
    Nan(u64),
}

/// How to reach and authenticate with the coordinator.
#[derive(Debug, Clone)]
pub struct Connection {
    /// `http://host:port`.
    pub address: String,
    /// The coordinator's shared secret.
    pub token: String,
    /// The rank to ask for, if any.
    pub rank: Option<usize>,
}

/// Joins the group at `connection`, trains as the assigned rank, and
/// returns once the coordinator has acknowledged the end of the run.
pub fn run(cfg: &Config, connection: &Connection, eval_images: usize) -> anyhow::Result<Summary> {
    let device = backend::device()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("grpc")
        .enable_all()
        .build()
        .context("starting the gRPC runtime")?;
    let token = Token::new(&connection.token)?;
    let trainer = Trainer::<TrainBackend>::new(&cfg.model, &cfg.train, &device);
    let request = session::join_request(cfg, connection.rank, trainer.checksum(), hostname());
    let (joined, session, start) = runtime.block_on(session::rendezvous(
        &connection.address,
        &token,
        request,
        cfg,
    ))?;
    let replica = Replica {
        rank: joined.rank as usize,
        world: joined.world_size as usize,
    };
    info!(
        rank = replica.rank,
        world = replica.world,
        generation = joined.generation,
        steps = start.steps,
        "joined"
    );
    let mut trainer = trainer.for_rank(replica.rank);
    let on_sigterm = runtime.spawn(forward_sigterm(session.notifier()));
    let mut remote = Remote {
        runtime: &runtime,
        session: Some(session),
        waited_ms: 0.0,
        fault: None,
        uploader: None,
    };
    let trained = train_replica(
        cfg,
        &runtime,
        &start,
        replica,
        joined.generation,
        &mut trainer,
        &mut remote,
        eval_images,
    );
    on_sigterm.abort();
    let session = remote
        .session
        .take()
        .expect("the session lives until the end");
    match trained {
        Ok(summary) => {
            runtime.block_on(session.finish(summary.steps))?;
            Ok(summary)
        }
        Err(err) => {
            // The coordinator ends the group with this worker's own words;
            // when it already ended it (or the connection is gone), there
            // is nobody to tell.
            if !report::caused_by::<SessionError>(err.as_ref()) {
                let reason = report::render(err.as_ref());
                let permanent = failure::is_permanent(&err);
                runtime.block_on(session.fail(reason, permanent));
            }
            Err(err)
        }
    }
}

/// Everything a replica does between joining and saying it finished.
#[allow(clippy::too_many_arguments)]
fn train_replica(
    cfg: &Config,
    runtime: &Runtime,
    start: &pb::Start,
    replica: Replica,
    generation: u64,
    trainer: &mut Trainer<TrainBackend>,
    remote: &mut Remote<'_>,
    eval_images: usize,
) -> anyhow::Result<Summary> {
    let checkpoints = Checkpoints::new(Store::open(&cfg.checkpoint)?, &cfg.checkpoint.run);
    let begin = resume(runtime, &checkpoints, start, trainer)?;
    remote.fault = fault(replica.rank, generation)?;
    remote.uploader = Some(Uploader::new(checkpoints));
    let summary = training_loop::train(cfg, replica, trainer, remote, eval_images, begin)?;
    // The last checkpoint must be in the store (and reported) before this
    // worker says it is done; no other task may hold the stream open then.
    if let Some(uploader) = remote.uploader.as_mut() {
        uploader.wait(runtime);
    }
    Ok(summary)
}

/// On SIGTERM (eviction, node drain) asks the coordinator to checkpoint and
/// stop the group after the current step; this worker then finishes
/// normally when told to stop. Later SIGTERMs are ignored (Kubernetes
/// follows with SIGKILL once the grace period is over).
async fn forward_sigterm(notifier: session::Notifier) {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        tracing::warn!("cannot watch for SIGTERM; an eviction will lose this worker mid-step");
        return;
    };
    if term.recv().await.is_some() {
        tracing::warn!("SIGTERM: asking the coordinator to checkpoint and stop the group");
        let reason = format!("SIGTERM on {}", hostname());
        // A closed session means the run is already over.
        let _ = notifier.request_stop(reason).await;
    }
}

/// Loads the checkpoint `start` names, if any, into `trainer`.
fn resume(
    runtime: &Runtime,
    checkpoints: &Checkpoints,
    start: &pb::Start,
    trainer: &mut Trainer<TrainBackend>,
) -> anyhow::Result<Start> {
    if start.resume_from.is_empty() {
        return Ok(Start::default());
    }
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
    Ok(Start {
        first_step: state.step,
        cursor: state.cursor,
        history,
    })
}

/// The coordinator-backed [`StepSync`].
struct Remote<'a> {
    runtime: &'a Runtime,
    session: Option<Session>,
    waited_ms: f64,
    fault: Option<Fault>,
    uploader: Option<Uploader>,
}

impl Remote<'_> {
    fn session(&mut self) -> &mut Session {
        self.session
            .as_mut()
            .expect("the session lives until the end")
    }
}

impl GradientReducer for Remote<'_> {
    fn reduce(&mut self, step: u64, net: Net, mut grads: Vec<f32>) -> anyhow::Result<Update> {
        let wire_net = match net {
            Net::Discriminator => pb::Net::Discriminator,
            Net::Generator => pb::Net::Generator,
        };
        if self.fault == Some(Fault::Nan(step)) && net == Net::Discriminator {
            tracing::warn!(step, "{FAULT_ENV}: sending a NaN in this rank's gradient");
            grads[0] = f32::NAN;
        }
        let started = Instant::now();
        let runtime = self.runtime;
        let reduced = runtime.block_on(self.session().all_reduce(step, wire_net, &grads))?;
        self.waited_ms += started.elapsed().as_secs_f64() * 1e3;
        if reduced.skip {
            tracing::warn!(
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
    fn after_step(
        &mut self,
        record: &StepRecord,
        trainer: &mut Trainer<TrainBackend>,
    ) -> anyhow::Result<Directive> {
        match self.fault {
            Some(Fault::Diverge(step)) if step == record.step => {
                tracing::warn!(step, "{FAULT_ENV}: perturbing this replica's discriminator");
                let nudge = vec![1e-3; params::trainable_len(trainer.discriminator())];
                trainer.apply_discriminator(&nudge);
            }
            Some(Fault::Exit(step)) if step == record.step => {
                tracing::warn!(step, "{FAULT_ENV}: exiting abruptly");
                std::process::exit(3);
            }
            Some(Fault::Hang(step)) if step == record.step => {
                tracing::warn!(step, "{FAULT_ENV}: blocking the training thread for good");
                loop {
                    std::thread::park();
                }
            }
            _ => {}
        }
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
            allreduce_ms: std::mem::take(&mut self.waited_ms),
        };
        let runtime = self.runtime;
        runtime.block_on(self.session().report(report))?;
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
            .as_mut()
            .expect("an uploader exists once training started")
            .start(runtime, steps, objects, move |step, outcome| async move {
                // A closed session means the run is over; the coordinator reports why.
                let _ = notifier.checkpoint_written(step, outcome).await;
            });
        Ok(())
    }
}

/// This rank's injected fault in this `generation`, from [`FAULT_ENV`].
fn fault(rank: usize, generation: u64) -> anyhow::Result<Option<Fault>> {
    let Ok(value) = std::env::var(FAULT_ENV) else {
        return Ok(None);
    };
    let parse = || -> Option<(Fault, usize)> {
        let mut parts = value.split(':');
        let (kind, r, step) = (
            parts.next()?,
            parts.next()?.parse().ok()?,
            parts.next()?.parse().ok()?,
        );
        let fault = match kind {
            "diverge" => Fault::Diverge(step),
            "exit" => Fault::Exit(step),
            "hang" => Fault::Hang(step),
            "nan" => Fault::Nan(step),
            _ => return None,
        };
        Some((fault, r))
    };
    let (fault, r) = parse().with_context(|| {
        format!("{FAULT_ENV}={value}: expected diverge|exit|hang|nan:<rank>:<step>")
    })?;
    Ok((r == rank && generation == 1).then_some(fault))
}

fn hostname() -> String {
    std::env::var("HOSTNAME").unwrap_or_else(|_| format!("pid {}", std::process::id()))
}
