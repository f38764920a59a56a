//! One coordinator run: serve, (maybe) launch, supervise, stop.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::Config;
use common::auth::Token;
use common::checkpoint::{CheckpointError, Checkpoints};
use common::lease::{FileLock, Lease};
use common::store::Store;
use tokio::sync::mpsc;

use crate::CoordinatorError;
use crate::launcher::Launcher;
use crate::refusals::Refusals;
use crate::resume::{self, ResumePolicy};
use crate::schedule::Schedule;
use crate::server::{Listeners, Servers};
use crate::service::Group;
use crate::supervise::Supervision;

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

/// Trains `cfg` with workers from `mode` until they all finish, the run
/// fails, or a stop is requested. Where training starts follows `policy`
/// and the run's checkpoints. `shutdown` resolving once checkpoints and
/// stops the group after the current step; resolving again interrupts at
/// once. Local workers connect through a Unix socket, and a local group
/// that fails through one of its workers is started again from the latest
/// checkpoint, up to `coordinator.max_restarts` times, as torchrun does,
/// unless a stop was asked for. (On Kubernetes the pods' restart policy
/// plays that part.) The output folder is locked and the run leased in its
/// store for the whole run; `break_lease` takes over a lease another
/// coordinator holds.
pub async fn run<S>(
    cfg: Config,
    mode: Mode,
    policy: ResumePolicy,
    break_lease: bool,
    mut shutdown: impl FnMut() -> S,
) -> Result<Outcome, CoordinatorError>
where
    S: Future<Output = ()>,
{
    let _folder = FileLock::output(&cfg.output.dir)?;
    let store = Store::open(&cfg.checkpoint).map_err(CheckpointError::from)?;
    store.check().await.map_err(CheckpointError::from)?;
    let ttl = Duration::from_secs(cfg.checkpoint.lease_s);
    let lease = Lease::acquire(&store, &cfg.checkpoint.run, ttl, break_lease).await?;
    let outcome = generations(cfg, mode, policy, &lease, &mut shutdown).await;
    lease.release().await;
    outcome
}

/// The generations of one run: the first, and the restarts local mode makes.
async fn generations<S>(
    cfg: Config,
    mode: Mode,
    policy: ResumePolicy,
    lease: &Lease,
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
            Some(lease),
            &mut watched_shutdown,
        )
        .await;
        match outcome {
            Err(CoordinatorError::Group(failure))
                if failure.restartable()
                    && generation <= u64::from(restarts)
                    && !stop_asked.load(Ordering::Relaxed) =>
            {
                tracing::warn!(
                    err = %failure,
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
    lease: Option<&Lease>,
    shutdown: impl FnMut() -> S,
) -> Result<Outcome, CoordinatorError>
where
    S: Future<Output = ()>,
{
    let workers = mode.workers();
    let secret = match &mode {
        Mode::Local(_) => format!("{:032x}", rand::random::<u128>()),
        Mode::External { token, .. } => token.clone(),
    };
    let token = Token::new(&secret)?;
    let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
    let schedule = Arc::new(Schedule::new(cfg.checkpoint.every, cfg.train.steps));
    let first_step = start.first_step;
    let start = common::pb::Start {
        first_step,
        steps: cfg.train.steps,
        resume_from: start.checkpoint.unwrap_or_default(),
    };
    let refusals = Arc::new(Refusals::default());
    let group = Arc::new(Group::new(
        &cfg,
        generation,
        workers,
        start,
        schedule.clone(),
        events_tx.clone(),
        refusals.clone(),
    ));
    let tcp_address = listeners
        .tcp
        .local_addr()
        .map_err(|source| CoordinatorError::Listen {
            address: cfg.coordinator.listen.clone(),
            source,
        })?;
    let (servers, local_address) = Servers::start(listeners, &cfg, group.clone(), token, refusals)?;
    tracing::info!(workers, generation, "waiting for the group to form");
    outputs::publish_address(&cfg, tcp_address)?;
    let launcher = match mode {
        Mode::Local(n) => {
            let config_path = outputs::save_config(&cfg)?;
            let s3_secret = cfg.checkpoint.s3.secret_access_key.expose();
            let secrets: Vec<(&str, &str)> = match s3_secret.is_empty() {
                true => vec![],
                false => vec![(SECRET_ENV, s3_secret)],
            };
            Some(Launcher::spawn(
                n,
                &local_address,
                &secret,
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
        lease,
    };
    let outcome = watch.supervise(events, shutdown).await;
    if let Err(err) = &outcome {
        group.peers.abort(err.to_string()).await;
    }
    group.peers.close_all();
    if let Some(launcher) = launcher {
        launcher.shutdown().await;
    }
    let served = servers.shutdown().await;
    let outcome = outcome?;
    served?;
    Ok(outcome)
}

/// Files the coordinator writes next to the run's outputs.
pub mod outputs {
    use std::path::PathBuf;

    use common::Config;

    use crate::CoordinatorError;

    /// Name of the file holding the bound address.
    pub const ADDRESS_FILE: &str = "coordinator.addr";

    /// Writes the bound address to [`ADDRESS_FILE`], so scripts and tests
    /// that bind port 0 can find the coordinator.
    pub fn publish_address(
        cfg: &Config,
        address: std::net::SocketAddr,
    ) -> Result<(), CoordinatorError> {
        write(cfg, ADDRESS_FILE, &address.to_string()).map(|_| ())
    }

    /// Saves the effective configuration where the local workers read it.
    pub fn save_config(cfg: &Config) -> Result<PathBuf, CoordinatorError> {
        let text = cfg.to_toml().map_err(|e| CoordinatorError::Output {
            path: cfg.output.dir.join("config.toml"),
            source: std::io::Error::other(e),
        })?;
        write(cfg, "config.toml", &text)
    }

    /// Writes `name` in the output folder atomically (a partial file renamed
    /// into place), so a process reading it never sees half of it.
    fn write(cfg: &Config, name: &str, contents: &str) -> Result<PathBuf, CoordinatorError> {
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
}
