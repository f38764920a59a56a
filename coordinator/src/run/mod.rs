//! One coordinator run: lock it, serve, (maybe) launch, supervise every
//! generation, stop.

mod lifecycle;
mod outcome;
pub(crate) mod outputs;
pub mod resume;
mod supervise;

pub use outcome::{Outcome, Report};

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use common::Config;
use common::security::auth::Token;
use common::storage::checkpoint::{CheckpointError, Checkpoints};
use common::storage::lease::{FileLock, Lease};
use common::storage::store::Store;
use tokio::sync::mpsc;

use crate::CoordinatorError;
use crate::allreduce::schedule::Schedule;
use crate::generation::group::{Group, Settings};
use crate::generation::origin::{Knowledge, StoredStart};
use crate::generation::receipts::Receipts;
use crate::generation::rendezvous::Seats;
use crate::local::gpus::{self, GpuMap};
use crate::local::launcher::{self, Launcher};
use crate::net::server::{Listeners, Servers};
use crate::net::service::Current;
use crate::refusals::Refusals;
use crate::ui::display::Echo;
use lifecycle::{Lifecycle, RunFacts};
use resume::ResumePolicy;
use supervise::Supervision;

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

/// How a run is shown and launched, beyond its configuration.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// What reaches the terminal.
    pub echo: Echo,
    /// Local mode: rank 0 measures SWD against this many held-out images.
    pub eval_images: usize,
    /// Take the run's lease over from another coordinator.
    pub break_lease: bool,
    /// The health service the readiness probe asks, if one is served:
    /// SERVING from when workers can join until the servers stop.
    pub health: Option<common::process::observe::Health>,
}

/// Environment variable that hands the S3 secret to local workers, which
/// read everything else from the saved config (that never contains it).
const SECRET_ENV: &str = "GANCLUSTER__CHECKPOINT__S3__SECRET_ACCESS_KEY";

/// Events queued from handlers to the run loop.
const EVENT_QUEUE: usize = 1024;

/// Trains `cfg` with workers from `mode` until they all finish, the run
/// fails, or a stop is requested. Where training starts follows `policy`,
/// the run's checkpoints, and the replicas of workers that come back to a
/// restarted coordinator. `shutdown` resolving once checkpoints and stops
/// the group after the current step; resolving again interrupts at once.
/// Local workers connect through a Unix socket. When a member is lost the
/// group re-forms from the survivors' replicas (local mode starts a
/// replacement process), up to `coordinator.max_restarts` times. The
/// output folder is locked and the run leased in its store for the whole
/// run; `options.break_lease` takes over a lease another coordinator holds.
pub async fn run<S>(
    cfg: Config,
    mode: Mode,
    policy: ResumePolicy,
    options: &Options,
    shutdown: impl FnMut() -> S,
) -> Result<Report, CoordinatorError>
where
    S: Future<Output = ()>,
{
    let _folder = FileLock::output(&cfg.output.dir)?;
    let store = Store::open(&cfg.checkpoint).map_err(CheckpointError::from)?;
    store.check().await.map_err(CheckpointError::from)?;
    let ttl = Duration::from_secs(cfg.checkpoint.lease_s);
    let lease = Lease::acquire(&store, &cfg.checkpoint.run, ttl, options.break_lease).await?;
    let listeners = Listeners::bind(&cfg, matches!(mode, Mode::Local(_))).await?;
    let report = run_on(
        Launch {
            listeners,
            cfg,
            mode,
            policy,
            lease: Some(&lease),
            options: options.clone(),
        },
        shutdown,
    )
    .await;
    lease.release().await;
    report
}

/// What a run is started with, once its folder and lease are held.
pub struct Launch<'a> {
    /// Where it serves (tests and benchmarks bind port 0 first).
    pub listeners: Listeners,
    /// The run's configuration.
    pub cfg: Config,
    /// Where its workers come from.
    pub mode: Mode,
    /// How to treat the run's existing checkpoints.
    pub policy: ResumePolicy,
    /// The run's lease, if it holds one.
    pub lease: Option<&'a Lease>,
    /// Display and launch options.
    pub options: Options,
}

/// The body of [`run`], without the folder lock and the lease.
pub async fn run_on<S>(
    launch: Launch<'_>,
    shutdown: impl FnMut() -> S,
) -> Result<Report, CoordinatorError>
where
    S: Future<Output = ()>,
{
    let Launch {
        listeners,
        cfg,
        mode,
        policy,
        lease,
        options,
    } = launch;
    let workers = mode.workers();
    let (checkpoints, start): (Checkpoints, StoredStart) =
        resume::from_store(&cfg, &policy, workers).await?;
    // The operator's explicit choice of a start wins over replicas.
    let trust_replicas = policy == ResumePolicy::Latest;
    let receipts = Receipts::open(&checkpoints, &cfg.checkpoint.run, trust_replicas).await?;
    let settings = Settings::of(&cfg, workers, Arc::new(receipts))?;
    let secret = match &mode {
        Mode::Local(_) => format!("{:032x}", rand::random::<u128>()),
        Mode::External { token, .. } => token.clone(),
    };
    let token = Token::new(&secret)?;
    let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
    let schedule = Arc::new(Schedule::new(
        cfg.checkpoint.every,
        cfg.train.steps,
        cfg.allreduce.has_error_feedback(),
    ));
    let refusals = Arc::new(Refusals::default());
    let first = Group::new(
        1,
        Seats::default(),
        settings.clone(),
        Knowledge {
            reached: start.first_step,
            ..Lifecycle::new(0).knowledge(&start, trust_replicas, &RunFacts::of(&settings, &cfg))
        },
        schedule.clone(),
        events_tx.clone(),
        refusals.clone(),
    );
    let arrival_wait = Duration::from_secs(cfg.coordinator.join_timeout_s);
    let current = Arc::new(Current::new(Arc::new(first), arrival_wait));
    let tcp_address = listeners
        .tcp
        .local_addr()
        .map_err(|source| CoordinatorError::Listen {
            address: cfg.coordinator.listen.clone(),
            source,
        })?;
    let (servers, local_address) =
        Servers::start(listeners, &cfg, current.clone(), token, refusals.clone())?;
    if let Some(health) = &options.health {
        health.set(true).await;
    }
    tracing::info!(
        workers,
        min_workers = settings.min,
        "waiting for the group to form"
    );
    outputs::publish_address(&cfg, tcp_address)?;
    let launcher = match mode {
        Mode::Local(n) => Some(Launcher::spawn(
            local_spec(&cfg, n, local_address, secret, &options)?,
            events_tx.clone(),
        )?),
        Mode::External { .. } => None,
    };
    let mut watch = Supervision {
        cfg: &cfg,
        settings,
        schedule,
        checkpoints: &checkpoints,
        start,
        current: current.clone(),
        launcher,
        lease,
        echo: &options.echo,
        events: events_tx,
        refusals,
        membership: outputs::Membership::open(&cfg, matches!(policy, ResumePolicy::Fresh { .. }))?,
    };
    let outcome = watch.supervise(events, shutdown).await;
    current
        .get()
        .end(outcome.as_ref().err().map(ToString::to_string))
        .await;
    if let Some(launcher) = watch.launcher.take() {
        launcher.shutdown().await;
    }
    if let Some(health) = &options.health {
        health.set(false).await;
    }
    let served = servers.shutdown().await;
    let outcome = outcome?;
    served?;
    Ok(outcome)
}

/// How local mode starts its `n` workers.
fn local_spec(
    cfg: &Config,
    n: usize,
    address: String,
    token: String,
    options: &Options,
) -> Result<launcher::Spec, CoordinatorError> {
    let config = outputs::save_config(cfg)?;
    let s3_secret = cfg.checkpoint.s3.secret_access_key.expose();
    let secrets = match s3_secret.is_empty() {
        true => vec![],
        false => vec![(SECRET_ENV.to_string(), s3_secret.to_string())],
    };
    let args = match options.eval_images {
        0 => vec![],
        n => vec!["--eval-images".to_string(), n.to_string()],
    };
    Ok(launcher::Spec {
        workers: n,
        address,
        token,
        config,
        secrets,
        args,
        output: cfg.output.dir.clone(),
        echo: options.echo.clone(),
        gpus: GpuMap::choose(cfg.coordinator.gpu_list(), gpus::visible),
    })
}
