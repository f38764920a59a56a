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

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use common::client::session::{self, Clients, Donor, Notifier, Proof, Session, SessionError};
use common::process::observe::{self, Health};
use common::process::report;
use common::protocol::pb;
use common::sampling::cadence::Cadence;
use common::security::auth::Token;
use common::storage::checkpoint::{self as layout, Checkpoints, TrainingState};
use common::storage::store::Store;
use common::{Config, DataCursor};
use tokio::runtime::Runtime;
use tracing::{info, warn};

use crate::model::backend::{self, TrainBackend};
use crate::replica::failure;
use crate::train::checkpoint::{self, Uploader};
use crate::train::output;
use crate::train::replica_loop::{self, Directive, Replica, Start, StepRecord, StepSync, Summary};
use crate::train::step::{GradientReducer, Net, Snapshot, Trainer, Update};

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

/// The replica this worker holds between generations.
#[derive(Debug, Clone, Copy)]
struct Held {
    step: u64,
    cursor: DataCursor,
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
    let initial = trainer.checksum();
    let checkpoints = Checkpoints::new(Store::open(&cfg.checkpoint)?, &cfg.checkpoint.run);
    let mut uploader = Uploader::new(checkpoints.clone());
    let stop = StopForwarder::start(&runtime);
    let mut held: Option<Held> = None;
    // What this worker presents besides its replica: the newest receipt
    // (the coordinator's proof of a state the group agreed on) and the
    // member id it had, which gets it its place back in the next generation.
    let mut receipt: Option<pb::Receipt> = None;
    let mut previous_member = String::new();
    // Set once this worker has been in a group: only then does it wait for
    // a coordinator that went away (one that never answered is an error).
    let mut lost_since: Option<Instant> = None;
    let mut joined_once = false;
    let mut first_try: Option<Instant> = None;
    let mut store_checked: Option<Instant> = None;
    loop {
        let joining = Joining {
            cfg,
            connection,
            token: &token,
            initial,
            held,
            receipt: receipt.clone(),
            previous_member: previous_member.clone(),
        };
        let (joined, opened) = match runtime.block_on(joining.join(&trainer, &mut previous_member))
        {
            Ok(joined) => joined,
            // The group re-formed again before this generation started.
            Err(SessionError::Regroup(reason)) => {
                info!(reason = %reason, "the group re-forms again; joining the next generation");
                continue;
            }
            Err(err) if joined_once && err.is_transient() => {
                if !keeps_waiting(cfg, &mut lost_since) {
                    return Err(gave_up(cfg, err.into()));
                }
                warn!(error = %err, "the coordinator cannot be reached; trying again");
                let wait = backoff(lost_since);
                // The timer must be made inside the runtime.
                runtime.block_on(async { tokio::time::sleep(wait).await });
                continue;
            }
            // The coordinator is not up yet (pods start in any order), or
            // turned this worker away before it could join (no free slot).
            Err(err)
                if !joined_once
                    && (err.is_not_listening() || matches!(err, SessionError::TurnedAway(_))) =>
            {
                let turned_away = matches!(err, SessionError::TurnedAway(_));
                if turned_away {
                    warn!(error = %err, "trying to join again in a second");
                }
                let since = *first_try.get_or_insert_with(Instant::now);
                // A pod started again after the run completed (its coordinator
                // said so and exited) must not wait for one: the store tells.
                if store_checked.is_none_or(|at: Instant| at.elapsed() >= STORE_RECHECK) {
                    store_checked = Some(Instant::now());
                    if complete_in_store(&runtime, &checkpoints, cfg) {
                        info!(run = %cfg.checkpoint.run, steps = cfg.train.steps,
                            "the run is already complete in the store and no coordinator answers: nothing to do");
                        return Ok(Summary::complete(cfg.train.steps));
                    }
                }
                if since.elapsed() >= Duration::from_secs(cfg.coordinator.join_timeout_s) {
                    return Err(anyhow::Error::new(err).context(format!(
                        "the coordinator did not come up within {} s (coordinator.join_timeout_s)",
                        cfg.coordinator.join_timeout_s
                    )));
                }
                let wait = if turned_away {
                    TURNED_AWAY_RETRY
                } else {
                    NOT_UP_RETRY
                };
                runtime.block_on(async { tokio::time::sleep(wait).await });
                continue;
            }
            Err(err) => return Err(err.into()),
        };
        lost_since = None;
        joined_once = true;
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
        let mut remote = Remote {
            runtime: &runtime,
            session: Some(opened.session),
            waited_ms: 0.0,
            uploader: &mut uploader,
            snapshot: None,
            cadence: Cadence::of(&cfg.train),
        };
        let begun = begin(
            cfg,
            &runtime,
            &checkpoints,
            &opened.start,
            opened.state,
            held,
            replica,
            &mut trainer,
        );
        if let Err(err) = &begun
            && let Some(refused) = err.downcast_ref::<RefusedReplica>()
        {
            // The sender is at fault: say so, and join the next generation
            // from fresh weights (what was loaded may be anything).
            warn!(reason = %refused, "refusing the replica another member sent");
            let session = remote
                .session
                .take()
                .expect("the session lives until the end");
            let answer = runtime.block_on(session.refuse_replica(refused.to_string()));
            serving(false);
            receipt = proof.latest().or(receipt);
            held = None;
            trainer = Trainer::new(&cfg.model, &cfg.train, trainer.device());
            match answer {
                SessionError::Regroup(_) => continue,
                other if other.is_transient() && keeps_waiting(cfg, &mut lost_since) => continue,
                other => return Err(anyhow::Error::new(other).context("after refusing a replica")),
            }
        }
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
        receipt = proof.latest().or(receipt);
        let (err, session) = match trained {
            Ok(summary) => {
                uploader.wait(&runtime);
                match runtime.block_on(session.finish(summary.steps)) {
                    Ok(()) => return Ok(summary),
                    // The group re-forms after its last step (the member saving the
                    // last checkpoint was lost): this replica holds the end state.
                    Err(err) => {
                        held = Some(Held {
                            step: summary.steps,
                            cursor: summary.cursor,
                        });
                        (anyhow::Error::new(err), None)
                    }
                }
            }
            Err(err) => {
                if let Some((step, cursor, snapshot)) = snapshot {
                    trainer.restore(snapshot);
                    held = Some(Held { step, cursor });
                }
                (err, Some(session))
            }
        };
        serving(false);
        match regrouping(&err) {
            Some(lost) if !lost || keeps_waiting(cfg, &mut lost_since) => {
                info!(held = ?held.map(|h| h.step), reason = %report::render(err.as_ref()),
                    "the group re-forms; joining again with this replica");
            }
            Some(_) => return Err(gave_up(cfg, err)),
            None => {
                if let Some(session) = session {
                    fail(&runtime, session, &err);
                }
                return Err(err);
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

/// `Some(coordinator_lost)` when `err` means the group re-forms (the
/// coordinator said so, or is gone and may come back), `None` when this
/// worker cannot go on.
fn regrouping(err: &anyhow::Error) -> Option<bool> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err.as_ref());
    while let Some(e) = cause {
        match e.downcast_ref::<SessionError>() {
            Some(SessionError::Regroup(_)) => return Some(false),
            Some(s) if s.is_transient() => return Some(true),
            _ => cause = e.source(),
        }
    }
    None
}

/// Whether to keep waiting for a coordinator that is gone (first noticed
/// at `since`, now if not yet): within `coordinator.reconnect_timeout_s`.
fn keeps_waiting(cfg: &Config, since: &mut Option<Instant>) -> bool {
    let first = *since.get_or_insert_with(Instant::now);
    first.elapsed() < Duration::from_secs(cfg.coordinator.reconnect_timeout_s)
}

/// `err`, the last of the attempts to reach a coordinator that went away.
fn gave_up(cfg: &Config, err: anyhow::Error) -> anyhow::Error {
    err.context(format!(
        "gave up on the coordinator after {} s without it (coordinator.reconnect_timeout_s)",
        cfg.coordinator.reconnect_timeout_s
    ))
}

/// How often a worker that finds no coordinator looks whether the run is
/// already complete.
const STORE_RECHECK: Duration = Duration::from_secs(5);

/// Whether the run's latest checkpoint is its last step; a store that does
/// not answer within [`STORE_RECHECK`] says nothing (joining goes on).
fn complete_in_store(runtime: &Runtime, checkpoints: &Checkpoints, cfg: &Config) -> bool {
    let latest =
        runtime.block_on(async { tokio::time::timeout(STORE_RECHECK, checkpoints.latest()).await });
    matches!(latest, Ok(Ok(Some(name))) if layout::parse_name(&name) == Some(cfg.train.steps))
}

/// Waits between attempts to reach a coordinator that is still starting.
const NOT_UP_RETRY: Duration = Duration::from_millis(200);

/// Waits between attempts to join a coordinator that turned this worker
/// away (every connection slot taken).
const TURNED_AWAY_RETRY: Duration = Duration::from_secs(1);

/// Waits between attempts to reach a lost coordinator: 0.5 s, doubling to 10 s.
fn backoff(since: Option<Instant>) -> Duration {
    let waited = since.map_or(Duration::ZERO, |s| s.elapsed());
    Duration::from_millis(500)
        .max(waited / 4)
        .min(Duration::from_secs(10))
}

/// Tells the coordinator why this worker stops, unless it already knows
/// (it ended the group, or the connection is gone).
fn fail(runtime: &Runtime, session: Session, err: &anyhow::Error) {
    if !report::caused_by::<SessionError>(err.as_ref()) {
        let reason = report::render(err.as_ref());
        let permanent = failure::is_permanent(err);
        runtime.block_on(session.fail(reason, permanent));
    }
}

/// What a worker presents when it joins a generation: always the rank it
/// was started with (its place, e.g. a pod's index), so a re-formed group
/// numbers its members in the same order.
struct Joining<'a> {
    cfg: &'a Config,
    connection: &'a Connection,
    token: &'a Token,
    initial: u64,
    held: Option<Held>,
    receipt: Option<pb::Receipt>,
    previous_member: String,
}

impl Joining<'_> {
    /// Connects, joins and opens the session, giving this worker's replica
    /// if the coordinator asks for it. The member id it is given goes to
    /// `joined_as` as soon as it joins: a generation that re-forms before
    /// its session opens still counts this worker among its survivors.
    async fn join(
        &self,
        trainer: &Trainer<TrainBackend>,
        joined_as: &mut String,
    ) -> Result<(pb::JoinReply, session::Opened), SessionError> {
        let held = self.held.map(|h| pb::Held {
            step: h.step,
            checksum: trainer.checksum(),
            epoch: h.cursor.epoch,
            position: h.cursor.position,
            run: self.cfg.checkpoint.run.clone(),
        });
        let request = pb::JoinRequest {
            proof: self.receipt.clone(),
            previous_member: self.previous_member.clone(),
            ..session::join_request(
                self.cfg,
                self.connection.rank,
                self.initial,
                hostname(),
                held,
            )
        };
        let mut clients: Clients =
            session::connect(&self.connection.address, self.cfg, self.token).await?;
        let joined = session::join(&mut clients, request).await?;
        joined_as.clone_from(&joined.member_id);
        let mut donor = ReplicaDonor {
            trainer,
            held: self.held,
            cfg: self.cfg,
        };
        let opened = Session::open(&mut clients, &joined, self.cfg, &mut donor).await?;
        Ok((joined, opened))
    }
}

/// The replica another member sent is not the one the coordinator said to
/// expect: the sender is at fault, not this worker.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct RefusedReplica(String);

/// Gives the replica this worker holds to the coordinator, for a member
/// that joins without one.
struct ReplicaDonor<'a> {
    trainer: &'a Trainer<TrainBackend>,
    held: Option<Held>,
    cfg: &'a Config,
}

impl Donor for ReplicaDonor<'_> {
    fn state(&mut self, step: u64) -> Result<Bytes, SessionError> {
        let held = self.held.filter(|h| h.step == step).ok_or_else(|| {
            SessionError::Protocol(format!(
                "asked for the replica of step {step}, but this worker holds step {:?}",
                self.held.map(|h| h.step)
            ))
        })?;
        let state = TrainingState {
            step,
            cursor: held.cursor,
            world: 0,
            config_hash: self.cfg.training_hash(),
            identity: self.cfg.resume_identity(),
            d_loss: f32::NAN,
            g_loss: f32::NAN,
            swd: None,
        };
        checkpoint::replica_bundle(self.trainer, &state)
            .map_err(|e| SessionError::Protocol(format!("packing this replica: {e:#}")))
    }
}

/// Where this generation starts, as the coordinator's `start` says, with
/// `state` (a replica another member sent) or the `held` one.
#[allow(clippy::too_many_arguments)]
fn begin(
    cfg: &Config,
    runtime: &Runtime,
    checkpoints: &Checkpoints,
    start: &pb::Start,
    state: Option<Bytes>,
    held: Option<Held>,
    replica: Replica,
    trainer: &mut Trainer<TrainBackend>,
) -> anyhow::Result<Start> {
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
            Ok(Start {
                cursor: state.cursor,
                ..replica_start(history)
            })
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
            Ok(replica_start(history()?))
        }
        pb::Source::Transfer => {
            let bundle =
                state.context("the coordinator said a replica was sent, but none arrived")?;
            let restored = checkpoint::restore_replica(trainer, bundle)
                .map_err(|e| RefusedReplica(format!("{e:#}")))?;
            if restored.step != start.first_step {
                return Err(RefusedReplica(format!(
                    "it is at step {} but the group starts at step {}",
                    restored.step, start.first_step
                ))
                .into());
            }
            let checksum = trainer.checksum();
            if checksum != start.checksum {
                return Err(RefusedReplica(format!(
                    "its parameter checksum is {checksum:016x}, but its sender claimed {:016x}",
                    start.checksum
                ))
                .into());
            }
            info!(
                step = restored.step,
                "took over the replica another member sent"
            );
            Ok(replica_start(history()?))
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
            Ok(Start {
                until: start.steps,
                batch: start.batch_size as usize,
                ..Start::fresh(cfg)
            })
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

/// Asks the coordinator to checkpoint and stop the group on SIGTERM
/// (eviction, node drain), through whichever session is current.
struct StopForwarder {
    current: Arc<Mutex<Option<Notifier>>>,
}

impl StopForwarder {
    fn start(runtime: &Runtime) -> Self {
        let current: Arc<Mutex<Option<Notifier>>> = Arc::default();
        let watched = current.clone();
        runtime.spawn(async move {
            let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                warn!("cannot watch for SIGTERM; an eviction will lose this worker mid-step");
                return;
            };
            // Later SIGTERMs are ignored: Kubernetes follows with SIGKILL.
            if term.recv().await.is_some() {
                warn!("SIGTERM: asking the coordinator to checkpoint and stop the group");
                let notifier = watched.lock().expect("stop lock").clone();
                if let Some(notifier) = notifier {
                    // A closed session means the run is already over.
                    let _ = notifier
                        .request_stop(format!("SIGTERM on {}", hostname()))
                        .await;
                }
            }
        });
        Self { current }
    }

    /// Forwards through `notifier` from now on.
    fn watch(&self, notifier: Notifier) {
        *self.current.lock().expect("stop lock") = Some(notifier);
    }
}

/// The coordinator-backed [`StepSync`].
struct Remote<'a> {
    runtime: &'a Runtime,
    session: Option<Session>,
    waited_ms: f64,
    uploader: &'a mut Uploader,
    /// The state before the step in progress (or its round, under
    /// post-local SGD), its step and data cursor.
    snapshot: Option<(u64, DataCursor, Snapshot<TrainBackend>)>,
    /// Where rounds start (`train.sync_every`).
    cadence: Cadence,
}

impl Remote<'_> {
    fn session(&mut self) -> &mut Session {
        self.session
            .as_mut()
            .expect("the session lives until the end")
    }
}

impl GradientReducer for Remote<'_> {
    fn reduce(&mut self, step: u64, net: Net, grads: Vec<f32>) -> anyhow::Result<Update> {
        let wire_net = match net {
            Net::Discriminator => pb::Net::Discriminator,
            Net::Generator => pb::Net::Generator,
        };
        let started = Instant::now();
        let runtime = self.runtime;
        let reduced = runtime.block_on(self.session().all_reduce(step, wire_net, grads))?;
        self.waited_ms += started.elapsed().as_secs_f64() * 1e3;
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

    fn average(&mut self, step: u64, trainer: &mut Trainer<TrainBackend>) -> anyhow::Result<()> {
        for (net, wire_net) in [
            (Net::Discriminator, pb::Net::Discriminator),
            (Net::Generator, pb::Net::Generator),
        ] {
            let state = trainer.averaging_state(net)?;
            let started = Instant::now();
            let runtime = self.runtime;
            let averaged = runtime.block_on(self.session().all_reduce(step, wire_net, state))?;
            self.waited_ms += started.elapsed().as_secs_f64() * 1e3;
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
            .start(runtime, steps, objects, move |step, outcome| async move {
                // A closed session means the run is over; the coordinator reports why.
                let _ = notifier.checkpoint_written(step, outcome).await;
            });
        Ok(())
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME").unwrap_or_else(|_| format!("pid {}", std::process::id()))
}
