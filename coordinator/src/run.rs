//! One coordinator run: lock it, serve, (maybe) launch, supervise, restart
//! local groups that fail, stop.

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
use crate::display::Echo;
use crate::launcher::{self, Launcher};
use crate::refusals::Refusals;
use crate::reports::StepSummary;
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

/// What a run that ended well reports: the summary a person reads.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// How it ended.
    pub outcome: Outcome,
    /// Group throughput over the last generation's steps (mean img/s).
    pub images_per_s: f64,
    /// The last step's summary.
    pub last: Option<StepSummary>,
    /// Times the group was started again.
    pub restarts: u64,
    /// Optimizer steps skipped for non-finite gradients.
    pub skipped: u64,
    /// The final checkpoint, once the store confirmed it.
    pub checkpoint: Option<String>,
    /// SWD of the final checkpoint, when rank 0 measured it.
    pub swd: Option<f64>,
}

/// How a run is shown and launched, beyond its configuration.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// What reaches the terminal.
    pub echo: Echo,
    /// Local mode: rank 0 measures SWD against this many held-out images.
    pub eval_images: usize,
    /// Take the run's lease over from another coordinator.
    pub break_lease: bool,
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
/// store for the whole run; `options.break_lease` takes over a lease
/// another coordinator holds.
pub async fn run<S>(
    cfg: Config,
    mode: Mode,
    policy: ResumePolicy,
    options: &Options,
    mut shutdown: impl FnMut() -> S,
) -> Result<Report, CoordinatorError>
where
    S: Future<Output = ()>,
{
    let _folder = FileLock::output(&cfg.output.dir)?;
    let store = Store::open(&cfg.checkpoint).map_err(CheckpointError::from)?;
    store.check().await.map_err(CheckpointError::from)?;
    let ttl = Duration::from_secs(cfg.checkpoint.lease_s);
    let lease = Lease::acquire(&store, &cfg.checkpoint.run, ttl, options.break_lease).await?;
    let report = generations(cfg, mode, policy, &lease, options, &mut shutdown).await;
    lease.release().await;
    report
}

/// The generations of one run: the first, and the restarts local mode makes.
async fn generations<S>(
    cfg: Config,
    mode: Mode,
    policy: ResumePolicy,
    lease: &Lease,
    options: &Options,
    mut shutdown: impl FnMut() -> S,
) -> Result<Report, CoordinatorError>
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
            Generation {
                listeners,
                cfg: cfg.clone(),
                mode: mode.clone(),
                plan,
                number: generation,
                lease: Some(lease),
                options: options.clone(),
            },
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
            other => {
                return other.map(|report| Report {
                    restarts: generation - 1,
                    ..report
                });
            }
        }
    }
}

/// What one generation is started with.
pub struct Generation<'a> {
    /// Where it serves (tests and benchmarks bind port 0 first).
    pub listeners: Listeners,
    /// The run's configuration.
    pub cfg: Config,
    /// Where its workers come from.
    pub mode: Mode,
    /// Where it starts ([`resume::plan`]).
    pub plan: (Checkpoints, resume::StartPoint),
    /// 1, 2… as the group restarts.
    pub number: u64,
    /// The run's lease, if it holds one.
    pub lease: Option<&'a Lease>,
    /// Display and launch options.
    pub options: Options,
}

/// One generation of [`run`]; it does not restart.
pub async fn run_on<S>(
    generation: Generation<'_>,
    shutdown: impl FnMut() -> S,
) -> Result<Report, CoordinatorError>
where
    S: Future<Output = ()>,
{
    let Generation {
        listeners,
        cfg,
        mode,
        plan: (checkpoints, start),
        number: generation,
        lease,
        options,
    } = generation;
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
            let args = match options.eval_images {
                0 => vec![],
                n => vec!["--eval-images".to_string(), n.to_string()],
            };
            let spec = launcher::Spec {
                workers: n,
                address: &local_address,
                token: &secret,
                config: &config_path,
                secrets: &secrets,
                args: &args,
                output: &cfg.output.dir,
                echo: &options.echo,
            };
            Some(Launcher::spawn(&spec, events_tx)?)
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
        echo: &options.echo,
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
