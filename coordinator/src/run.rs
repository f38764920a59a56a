//! One coordinator run: serve, (maybe) launch, supervise, stop.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::Config;
use common::checkpoint::{self, Checkpoints};
use common::config::{
    CONNECTION_WINDOW_BYTES, MAX_CHUNK_BYTES, MAX_FRAME_BYTES, STREAM_WINDOW_BYTES,
};
use common::pb::coordinator_server::CoordinatorServer;
use common::session::UNIX_SCHEME;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::server::TcpIncoming;
use tracing::info;

use crate::CoordinatorError;
use crate::launcher::Launcher;
use crate::progress::Progress;
use crate::rendezvous::Rendezvous;
use crate::resume::{self, ResumePolicy};
use crate::schedule::Schedule;
use crate::service::{CoordinatorService, Event, Group};

/// Where the workers come from.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Spawn this many `worker` processes on this machine.
    Local(usize),
    /// Wait for this many workers started elsewhere, presenting `token`.
    External {
        /// Workers to wait for.
        workers: usize,
        /// Shared secret they must present.
        token: String,
    },
}

impl Mode {
    /// The size of the group.
    pub fn workers(&self) -> usize {
        match self {
            Self::Local(n) => *n,
            Self::External { workers, .. } => *workers,
        }
    }
}

/// How a run ended without error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// All `train.steps` steps are done and checkpointed.
    Finished {
        /// Steps done.
        steps: u64,
    },
    /// A stop request (SIGTERM) ended the run early, after a checkpoint.
    Stopped {
        /// Steps done.
        steps: u64,
    },
}

/// Environment variable that hands the S3 secret to local workers, which
/// read everything else from the saved config (that never contains it).
const SECRET_ENV: &str = "GANCLUSTER__CHECKPOINT__S3__SECRET_ACCESS_KEY";

/// Events queued from handlers to the run loop.
const EVENT_QUEUE: usize = 1024;

/// Where the coordinator serves gRPC.
pub struct Listeners {
    /// Always: `coordinator.listen`, for workers on other machines.
    pub tcp: TcpListener,
    /// Local mode: a Unix domain socket the local workers use instead,
    /// which skips the TCP stack.
    pub unix: Option<(UnixListener, PathBuf)>,
}

impl Listeners {
    /// Binds `coordinator.listen`, plus `<output.dir>/coordinator.sock` when `unix`.
    pub async fn bind(cfg: &Config, unix: bool) -> Result<Self, CoordinatorError> {
        let listen = &cfg.coordinator.listen;
        let tcp = TcpListener::bind(listen)
            .await
            .map_err(|source| CoordinatorError::Listen {
                address: listen.clone(),
                source,
            })?;
        let unix = match unix {
            true => Some(bind_unix(&cfg.output.dir.join(SOCKET_FILE))?),
            false => None,
        };
        Ok(Self { tcp, unix })
    }
}

/// The Unix socket's name inside the output folder.
pub const SOCKET_FILE: &str = "coordinator.sock";

/// Binds a Unix socket at `path`, replacing a stale one from an earlier run.
pub fn bind_unix(path: &Path) -> Result<(UnixListener, PathBuf), CoordinatorError> {
    let fail = |source| CoordinatorError::Listen {
        address: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        return Err(fail(e));
    }
    Ok((UnixListener::bind(path).map_err(fail)?, path.to_path_buf()))
}

/// Trains `cfg` with workers from `mode` until they all finish, the run
/// fails, or a stop is requested. Where training starts follows `policy`
/// and the run's checkpoints. `shutdown` resolving once checkpoints and
/// stops the group after the current step; resolving again interrupts at
/// once. Local workers connect through a Unix socket, and a local group
/// that fails through one of its workers is started again from the latest
/// checkpoint, up to `coordinator.max_restarts` times, as torchrun does,
/// unless a stop was asked for. (On Kubernetes the pods' restart policy
/// plays that part.)
pub async fn run<S>(
    cfg: Config,
    mode: Mode,
    policy: ResumePolicy,
    mut shutdown: impl FnMut() -> S,
) -> Result<Outcome, CoordinatorError>
where
    S: Future<Output = ()>,
{
    let local = matches!(mode, Mode::Local(_));
    let restarts = if local {
        cfg.coordinator.max_restarts
    } else {
        0
    };
    // A group that fails after the operator asked to stop is not restarted.
    let stop_asked = AtomicBool::new(false);
    let mut watched_shutdown = || {
        let signal = shutdown();
        let stop_asked = &stop_asked;
        async move {
            signal.await;
            stop_asked.store(true, Ordering::Relaxed);
        }
    };
    let mut policy = policy;
    let mut generation = 1;
    loop {
        let plan = resume::plan(&cfg, &policy, mode.workers()).await?;
        let listeners = Listeners::bind(&cfg, local).await?;
        let outcome = run_on(
            listeners,
            cfg.clone(),
            mode.clone(),
            plan,
            generation,
            &mut watched_shutdown,
        )
        .await;
        match outcome {
            Err(err)
                if err.is_group_failure()
                    && generation <= u64::from(restarts)
                    && !stop_asked.load(Ordering::Relaxed) =>
            {
                tracing::warn!(
                    %err,
                    restart = generation,
                    of = restarts,
                    "the group failed; starting it again from the latest checkpoint"
                );
                // Whatever the first generation was told, the next one
                // continues from what the failed one saved.
                policy = ResumePolicy::Latest;
                generation += 1;
            }
            other => return other,
        }
    }
}

/// One generation of [`run`], on already bound listeners (tests and
/// benchmarks bind port 0 first) and an already planned start
/// ([`resume::plan`]); it does not restart.
pub async fn run_on<S>(
    listeners: Listeners,
    cfg: Config,
    mode: Mode,
    (checkpoints, start): (Checkpoints, resume::StartPoint),
    generation: u64,
    shutdown: impl FnMut() -> S,
) -> Result<Outcome, CoordinatorError>
where
    S: Future<Output = ()>,
{
    let workers = mode.workers();
    let token = match &mode {
        Mode::Local(_) => format!("{:032x}", rand::random::<u128>()),
        Mode::External { token, .. } => token.clone(),
    };
    let address = listeners
        .tcp
        .local_addr()
        .map_err(|source| CoordinatorError::Listen {
            address: cfg.coordinator.listen.clone(),
            source,
        })?;
    let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
    let beats = &cfg.coordinator;
    let rendezvous = Rendezvous::new(
        generation,
        workers,
        token.clone(),
        cfg.training_hash(),
        Duration::from_secs(beats.heartbeat_interval_s),
    );
    let schedule = Arc::new(Schedule::new(cfg.checkpoint.every, cfg.train.steps));
    let first_step = start.first_step;
    let start = common::pb::Start {
        first_step,
        steps: cfg.train.steps,
        resume_from: start.checkpoint.unwrap_or_default(),
    };
    let group = Arc::new(Group::new(
        rendezvous,
        workers,
        start,
        schedule.clone(),
        events_tx.clone(),
        Duration::from_secs(beats.heartbeat_timeout_s),
    ));
    let (stop_servers, servers_stopped) = watch::channel(false);
    let service = CoordinatorServer::new(CoordinatorService::new(group.clone()))
        .max_decoding_message_size(MAX_CHUNK_BYTES)
        .max_encoding_message_size(MAX_CHUNK_BYTES);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    // Set on each accepted socket: the builder's own nodelay applies only to
    // listeners it binds itself. Without it small chunks wait on Nagle.
    let tcp = TcpIncoming::from(listeners.tcp).with_nodelay(Some(true));
    let mut servers = vec![tokio::spawn(
        server_builder()
            .add_service(service.clone())
            .serve_with_incoming_shutdown(tcp, stopped(servers_stopped.clone())),
    )];
    info!(%address, workers, generation, "coordinator listening");
    publish_address(&cfg, address)?;
    let socket = listeners.unix.as_ref().map(|(_, path)| path.clone());
    let local_address = match listeners.unix {
        Some((unix, path)) => {
            let unix = UnixListenerStream::new(unix);
            servers.push(tokio::spawn(
                server_builder()
                    .add_service(service)
                    .serve_with_incoming_shutdown(unix, stopped(servers_stopped)),
            ));
            info!(socket = %path.display(), "local workers connect through a Unix socket");
            format!("{UNIX_SCHEME}{}", path.display())
        }
        None => format!("http://{address}"),
    };

    let launcher = match mode {
        Mode::Local(n) => {
            let config_path = save_config(&cfg)?;
            let secret = cfg.checkpoint.s3.secret_access_key.expose();
            let secrets: Vec<(&str, &str)> = match secret.is_empty() {
                true => vec![],
                false => vec![(SECRET_ENV, secret)],
            };
            Some(Launcher::spawn(
                n,
                &local_address,
                &token,
                &config_path,
                &secrets,
                events_tx,
            )?)
        }
        Mode::External { .. } => None,
    };
    let watch = Supervision {
        cfg: &cfg,
        group: &group,
        schedule: &schedule,
        checkpoints: &checkpoints,
        workers,
        first_step,
    };
    let outcome = watch.supervise(events, shutdown).await;
    if let Err(err) = &outcome {
        group.peers.abort(err.to_string()).await;
    }
    group.peers.close_all();
    if let Some(launcher) = launcher {
        launcher.shutdown().await;
    }
    stop_servers.send_replace(true);
    let mut served = Ok(());
    for server in servers {
        if let Ok(Err(e)) = server.await {
            served = Err(e);
        }
    }
    if let Some(path) = socket {
        // Nothing listens on it any more; a stale file would only confuse.
        let _ = std::fs::remove_file(path);
    }
    let outcome = outcome?;
    served?;
    Ok(outcome)
}

/// What the run loop watches.
struct Supervision<'a> {
    cfg: &'a Config,
    group: &'a Group,
    schedule: &'a Schedule,
    checkpoints: &'a Checkpoints,
    workers: usize,
    first_step: u64,
}

impl Supervision<'_> {
    async fn supervise<S: Future<Output = ()>>(
        &self,
        mut events: mpsc::Receiver<Event>,
        mut shutdown: impl FnMut() -> S,
    ) -> Result<Outcome, CoordinatorError> {
        let (cfg, group, workers) = (self.cfg, self.group, self.workers);
        let join_timeout = Duration::from_secs(cfg.coordinator.join_timeout_s);
        let join_deadline = tokio::time::sleep(join_timeout);
        let step_timeout = Duration::from_secs(cfg.coordinator.step_timeout_s);
        let stall = tokio::time::sleep(step_timeout);
        let signal = shutdown();
        tokio::pin!(join_deadline, stall, signal);
        let mut done = self.first_step;
        let mut armed = false;
        let progress = Progress::new(cfg.train.steps, cfg.train.log_every, self.first_step);
        let mut finished = 0;
        let mut committed: Option<u64> = None;
        let mut failed_checkpoint: Option<(u64, String)> = None;
        loop {
            tokio::select! {
                event = events.recv() => match event.expect("the group holds a sender") {
                    Event::StepDone(summary) => {
                        progress.step(&summary);
                        done = summary.step + 1;
                        stall.as_mut().reset(tokio::time::Instant::now() + step_timeout);
                    }
                    Event::CheckpointWritten { step, error: None } => {
                        self.commit(step).await;
                        committed = Some(step);
                    }
                    Event::CheckpointWritten { step, error: Some(reason) } => {
                        tracing::warn!(checkpoint = %checkpoint::name(step), %reason,
                            "rank 0 could not write a checkpoint; `latest` still names the previous one");
                        failed_checkpoint = Some((step, reason));
                    }
                    Event::StopRequested { rank, reason } => {
                        if self.schedule.request_stop() {
                            info!(rank, %reason, "stop requested by a worker: the group checkpoints \
                                and stops after the current step");
                        }
                    }
                    Event::Finished { rank } => {
                        finished += 1;
                        info!(rank, "worker finished");
                        if finished == workers {
                            progress.finish();
                            return self.outcome(committed, failed_checkpoint).await;
                        }
                    }
                    Event::Failed(err) => return Err(err),
                },
                _ = &mut join_deadline, if !group.rendezvous.is_formed() => {
                    let (hosts, missing) = group.rendezvous.who();
                    return Err(CoordinatorError::JoinTimeout {
                        expected: workers,
                        joined: hosts.len(),
                        hosts: if hosts.is_empty() { "none".into() } else { hosts.join(", ") },
                        missing,
                        seconds: join_timeout.as_secs(),
                    });
                }
                () = group.rendezvous.formed(), if !armed => {
                    // The step clock starts when the group exists, not while it forms.
                    stall.as_mut().reset(tokio::time::Instant::now() + step_timeout);
                    armed = true;
                }
                _ = &mut stall, if armed && done < self.final_step() => {
                    let waiting = group.waiting().map_or_else(
                        || "no gradient is in flight, so every rank is between all-reduces".into(),
                        |w| w.to_string(),
                    );
                    return Err(CoordinatorError::Stalled {
                        seconds: step_timeout.as_secs(),
                        done,
                        waiting,
                    });
                }
                _ = &mut signal => {
                    if !group.rendezvous.is_formed() || !self.schedule.request_stop() {
                        return Err(CoordinatorError::Interrupted);
                    }
                    info!("stop requested: the group checkpoints and stops after the current step \
                        (signal again to stop at once, without a checkpoint)");
                    signal.set(shutdown());
                }
            }
        }
    }

    /// The step count the group trains to: `train.steps`, or where a stop
    /// request ends it. After it only uploads and goodbyes remain, which
    /// the store's own retry limits bound, not the step timeout.
    fn final_step(&self) -> u64 {
        self.schedule
            .stopped_after()
            .unwrap_or(self.cfg.train.steps)
    }

    /// Records a written checkpoint: `latest` moves to it, old ones go.
    async fn commit(&self, step: u64) {
        let location = self.checkpoints.location(step);
        match self
            .checkpoints
            .commit(step, self.cfg.checkpoint.keep)
            .await
        {
            Ok(removed) => info!(checkpoint = %location, ?removed, "checkpoint committed"),
            // The manifest is written, so a resume still finds it; only the pointer lags.
            Err(error) => {
                tracing::warn!(checkpoint = %location, %error, "could not update `latest`")
            }
        }
    }

    /// Success only when the last checkpoint asked for is in the store.
    async fn outcome(
        &self,
        committed: Option<u64>,
        failed: Option<(u64, String)>,
    ) -> Result<Outcome, CoordinatorError> {
        let wanted = self.schedule.last_checkpoint();
        if let Some(step) = wanted.filter(|w| Some(*w) != committed) {
            let reason = match failed {
                Some((s, reason)) if s == step => reason,
                _ => "rank 0 finished without reporting it".into(),
            };
            let newest = match committed {
                Some(step) => checkpoint::name(step),
                None => match self.checkpoints.latest().await {
                    Ok(latest) => latest.unwrap_or_else(|| "none".into()),
                    Err(e) => format!("unknown (reading `latest` failed: {e})"),
                },
            };
            return Err(CoordinatorError::FinalCheckpoint {
                step,
                reason,
                committed: newest,
            });
        }
        match self.schedule.stopped_after() {
            Some(steps) => {
                info!(
                    steps,
                    "stopped on request after checkpointing; run the same command to resume"
                );
                Ok(Outcome::Stopped { steps })
            }
            None => {
                info!(steps = self.cfg.train.steps, "training finished");
                Ok(Outcome::Finished {
                    steps: self.cfg.train.steps,
                })
            }
        }
    }
}

/// A gRPC server with flow-control windows sized for gradient streams.
fn server_builder() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
}

/// Name of the file holding the bound address, next to the run's outputs.
pub const ADDRESS_FILE: &str = "coordinator.addr";

/// Writes the bound address to [`ADDRESS_FILE`], so scripts and tests
/// that bind port 0 can find the coordinator.
fn publish_address(cfg: &Config, address: std::net::SocketAddr) -> Result<(), CoordinatorError> {
    write_output(cfg, ADDRESS_FILE, &address.to_string()).map(|_| ())
}

/// Saves the effective configuration where the local workers read it.
fn save_config(cfg: &Config) -> Result<PathBuf, CoordinatorError> {
    let text = cfg.to_toml().map_err(|e| CoordinatorError::Output {
        path: cfg.output.dir.join("config.toml"),
        source: std::io::Error::other(e),
    })?;
    write_output(cfg, "config.toml", &text)
}

/// Writes `name` in the output folder atomically (a partial file renamed
/// into place), so a process reading it never sees half of it.
fn write_output(cfg: &Config, name: &str, contents: &str) -> Result<PathBuf, CoordinatorError> {
    let dir = &cfg.output.dir;
    let path = dir.join(name);
    let partial = dir.join(format!("{name}.partial"));
    let io = |source| CoordinatorError::Output {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    std::fs::write(&partial, contents).map_err(io)?;
    std::fs::rename(&partial, &path).map_err(io)?;
    Ok(path)
}
