//! One replica of a coordinator-driven group: `worker train --coordinator URL`.
//!
//! gRPC runs on a small tokio runtime; burn runs on this thread, outside
//! it, so tensor work never blocks the reactor that keeps the streams
//! flowing. Each gradient goes through the coordinator's all-reduce and
//! every step is reported with a parameter checksum. The coordinator says
//! where to start (fresh, a checkpoint, the replica this worker holds, or
//! one another member sends) and when to checkpoint or stop; rank 0
//! uploads checkpoints in the background.
//!
//! A replica outlives its group. Before every step it keeps a snapshot of
//! its state; when the group re-forms mid-step (a member was lost, one
//! joins, the coordinator came back) it goes back to that snapshot and
//! joins the next generation holding it, so no completed step is lost and
//! the interrupted one is trained again from the same state, bit for bit.
//! When the coordinator itself is gone, it keeps trying to reach it (with
//! backoff) for `coordinator.reconnect_timeout_s` before giving up.
//!
//! The rules (when to join again, how long to wait, when to give up) are
//! [`super::lifecycle`]'s; this file does what they say.

use std::time::Instant;

use anyhow::Context;
use common::Config;
use common::client::{Proof, Session, SessionError};
use common::process::observe::{self, Health};
use common::process::report;
use common::sampling::cadence::Cadence;
use common::security::auth::Token;
use common::storage::checkpoint::{self as layout, Checkpoints};
use common::storage::store::Store;
use tokio::runtime::Runtime;
use tracing::{info, warn};

use super::begin::begin;
use super::failure;
use super::joining::{Carried, Held, Joining};
use super::lifecycle::{Ended, JoinFailure, Lifecycle, Next, STORE_RECHECK, Stop};
use super::remote::Remote;
use super::stop_signal::StopForwarder;
use crate::model::backend::{self, TrainBackend};
use crate::train::checkpoint::Uploader;
use crate::train::replica_loop::{self, Replica, Start, Summary};
use crate::train::step::Trainer;

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

/// Where this worker answers Kubernetes' probes and Prometheus' scrapes.
#[derive(Debug, Clone, Default)]
pub struct Endpoints {
    /// `host:port` of the gRPC health service, if served.
    pub health: Option<String>,
    /// `host:port` of `/metrics`, if served.
    pub metrics: Option<String>,
}

/// Joins the group at `connection`, trains as the assigned rank through
/// every generation of the group, and returns once the coordinator has
/// acknowledged the end of the run.
pub fn run(
    cfg: &Config,
    connection: &Connection,
    endpoints: &Endpoints,
    eval_images: usize,
) -> anyhow::Result<Summary> {
    let device = backend::device()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("grpc")
        .enable_all()
        .build()
        .context("starting the gRPC runtime")?;
    let token = Token::new(&connection.token)?;
    if let Some(address) = &endpoints.metrics {
        let _inside = runtime.enter();
        observe::serve_metrics(address)?;
        crate::train::telemetry::describe();
    }
    let health = match &endpoints.health {
        Some(address) => Some(runtime.block_on(Health::serve(address, observe::WORKER))?),
        None => None,
    };
    let serving = |now: bool| {
        if let Some(health) = &health {
            runtime.block_on(health.set(now));
        }
    };
    let mut trainer = Trainer::<TrainBackend>::new(&cfg.model, &cfg.train, &device);
    let checkpoints = Checkpoints::new(Store::open(&cfg.checkpoint)?, &cfg.checkpoint.run);
    let mut uploader = Uploader::new(checkpoints.clone());
    let stop = StopForwarder::start(&runtime);
    let joining = Joining {
        cfg,
        connection,
        token: &token,
        initial: trainer.checksum(),
    };
    let mut life = Lifecycle::new(cfg);
    let mut carried = Carried::default();
    loop {
        let (joined, opened) = match runtime.block_on(joining.join(&trainer, &mut carried)) {
            Ok(joined) => joined,
            Err(err) => {
                let mut next = life.join_failed(JoinFailure::of(&err), Instant::now());
                if next == Next::LookInStore {
                    let complete = complete_in_store(&runtime, &checkpoints, cfg);
                    next = life.store_says(complete, Instant::now());
                }
                match next {
                    Next::Join => {
                        info!(error = %err, "joining the next generation");
                    }
                    Next::Retry(wait) => {
                        if life.joined_once() {
                            warn!(error = %err, "the coordinator cannot be reached; trying again");
                        } else if matches!(err, SessionError::TurnedAway(_)) {
                            warn!(error = %err, "trying to join again in a second");
                        }
                        // The timer must be made inside the runtime.
                        runtime.block_on(async { tokio::time::sleep(wait).await });
                    }
                    Next::LookInStore => unreachable!("the store was looked in"),
                    Next::Stop(Stop::Complete) => {
                        info!(run = %cfg.checkpoint.run, steps = cfg.train.steps,
                            "the run is already complete in the store and no coordinator answers: nothing to do");
                        return Ok(Summary::complete(cfg.train.steps));
                    }
                    Next::Stop(stop) => return Err(stopped(stop, anyhow::Error::new(err))),
                }
                continue;
            }
        };
        life.joined();
        let proof: Proof = opened.session.proof();
        serving(true);
        let replica = Replica {
            rank: joined.rank as usize,
            world: joined.world_size as usize,
        };
        info!(
            rank = replica.rank,
            world = replica.world,
            generation = joined.generation,
            first_step = opened.start.first_step,
            "joined"
        );
        trainer.set_rank(replica.rank);
        stop.watch(opened.session.notifier());
        let mut remote = Remote::new(
            &runtime,
            opened.session,
            &mut uploader,
            Cadence::of(&cfg.train),
        );
        let begun = begin(
            cfg,
            &runtime,
            &checkpoints,
            &opened.start,
            opened.state,
            carried.held,
            replica,
            joined.generation,
            &mut trainer,
        );
        let begun = match begun {
            Ok(Err(refused)) => {
                // The sender is at fault: say so, and join the next generation
                // from fresh weights (what was loaded may be anything).
                warn!(reason = %refused, "refusing the replica another member sent");
                let session = remote
                    .session
                    .take()
                    .expect("the session lives until the end");
                let answer = runtime.block_on(session.refuse_replica(refused.to_string()));
                serving(false);
                carried.receipt = proof.latest().or(carried.receipt.take());
                carried.held = None;
                trainer = Trainer::new(&cfg.model, &cfg.train, trainer.device());
                match life.generation_ended(Ended::of(&answer), Instant::now()) {
                    Next::Stop(stop) => {
                        let err = anyhow::Error::new(answer).context("after refusing a replica");
                        return Err(stopped(stop, err));
                    }
                    _ => continue,
                }
            }
            Ok(Ok(begin)) => Ok(begin),
            Err(err) => Err(err),
        };
        let trained = begun.and_then(|begin| {
            train(
                cfg,
                replica,
                joined.generation,
                &mut trainer,
                &mut remote,
                eval_images,
                begin,
            )
        });
        let session = remote
            .session
            .take()
            .expect("the session lives until the end");
        let snapshot = remote.snapshot.take();
        carried.receipt = proof.latest().or(carried.receipt.take());
        let (ended, err, session) = match trained {
            Ok(summary) => {
                uploader.wait(&runtime);
                match runtime.block_on(session.finish(summary.steps)) {
                    Ok(()) => return Ok(summary),
                    // The group re-forms after its last step (the member saving the
                    // last checkpoint was lost): this replica holds the end state.
                    Err(err) => {
                        carried.held = Some(Held {
                            step: summary.steps,
                            cursor: summary.cursor,
                        });
                        (Ended::of(&err), anyhow::Error::new(err), None)
                    }
                }
            }
            Err(err) => {
                if let Some((step, cursor, snapshot)) = snapshot {
                    trainer.restore(snapshot);
                    carried.held = Some(Held { step, cursor });
                }
                // The session's own failure, if that is what ended training;
                // anything else is this worker's, and the coordinator is told.
                match remote.ended {
                    Some(ended) => (ended, err, None),
                    None => (Ended::Failed, err, Some(session)),
                }
            }
        };
        serving(false);
        match life.generation_ended(ended, Instant::now()) {
            Next::Stop(stop) => {
                if let Some(session) = session {
                    fail(&runtime, session, &err);
                }
                return Err(stopped(stop, err));
            }
            _ => {
                info!(held = ?carried.held.map(|h| h.step), reason = %report::render(err.as_ref()),
                    "the group re-forms; joining again with this replica");
            }
        }
    }
}

/// Everything a replica does in one generation, between its start and
/// saying it finished.
fn train(
    cfg: &Config,
    replica: Replica,
    generation: u64,
    trainer: &mut Trainer<TrainBackend>,
    remote: &mut Remote<'_>,
    eval_images: usize,
    begin: Start,
) -> anyhow::Result<Summary> {
    #[cfg(feature = "faults")]
    {
        let mut faulty = crate::replica::faults::Faulty::wrap(remote, replica.rank, generation)?;
        replica_loop::train(cfg, replica, trainer, &mut faulty, eval_images, begin)
    }
    #[cfg(not(feature = "faults"))]
    {
        let _ = generation;
        // A test that arms a fault in a build without them must not pass
        // for a fault that never fired.
        if std::env::var_os("GANCLUSTER_FAULT").is_some() {
            anyhow::bail!(
                "GANCLUSTER_FAULT is set, but this worker was built without fault injection: \
                 build it with `--features faults` (cargo test --workspace does) or unset it"
            );
        }
        replica_loop::train(cfg, replica, trainer, remote, eval_images, begin)
    }
}

/// `err`, said with why this worker stops trying.
fn stopped(stop: Stop, err: anyhow::Error) -> anyhow::Error {
    match stop {
        Stop::GaveUp { seconds } => err.context(format!(
            "gave up on the coordinator after {seconds} s without it (coordinator.reconnect_timeout_s)"
        )),
        Stop::NeverCameUp { seconds } => err.context(format!(
            "the coordinator did not come up within {seconds} s (coordinator.join_timeout_s)"
        )),
        Stop::Failed | Stop::Complete => err,
    }
}

/// Whether the run's latest checkpoint is its last step; a store that does
/// not answer within [`STORE_RECHECK`] says nothing (joining goes on).
fn complete_in_store(runtime: &Runtime, checkpoints: &Checkpoints, cfg: &Config) -> bool {
    let latest =
        runtime.block_on(async { tokio::time::timeout(STORE_RECHECK, checkpoints.latest()).await });
    matches!(latest, Ok(Ok(Some(name))) if layout::parse_name(&name) == Some(cfg.train.steps))
}

/// Tells the coordinator why this worker stops (it does not know: the
/// session itself did not fail), and whether running again could help.
fn fail(runtime: &Runtime, session: Session, err: &anyhow::Error) {
    let reason = report::render(err.as_ref());
    let permanent = failure::is_permanent(err);
    runtime.block_on(session.fail(reason, permanent));
}
