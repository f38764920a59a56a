//! `coordinator`: trains with N local worker processes, or waits for N
//! external workers (Kubernetes), and all-reduces their gradients.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use common::ConfigError;
use common::process::cli::ConfigArgs;
use common::process::logging::{self, LogFormat};
use common::process::observe;
use common::process::report;
use coordinator::{
    CoordinatorError, Echo, Mode, Options, Outcome, ResumePolicy, Screen, Verbosity, log_file,
    logs_dir,
};

/// mimalloc reuses freed multi-megabyte buffers (gradient chunks) where
/// glibc's allocator handed back fresh pages to fault in each time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    version,
    about = "gancluster coordinator: rendezvous and all-reduce for DCGAN workers"
)]
struct Cli {
    /// Workers to spawn on this machine (or to wait for, with --external).
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Wait for workers started elsewhere instead of spawning them.
    #[arg(long)]
    external: bool,
    /// Shared secret external workers must present.
    #[arg(long, env = "GANCLUSTER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Resume from this checkpoint (step-N or N) instead of the newest valid one.
    #[arg(long, conflicts_with = "fresh")]
    resume_from: Option<String>,
    /// Start over instead of resuming; refused if the run has checkpoints, unless --force.
    #[arg(long)]
    fresh: bool,
    /// With --fresh: delete the run's existing checkpoints.
    #[arg(long, requires = "fresh")]
    force: bool,
    /// Take the run's lease over even if another coordinator holds it (it
    /// died and its lease has not expired yet). The other one stops at its
    /// next renewal.
    #[arg(long)]
    break_lease: bool,
    /// `human` lines or one `json` object per line.
    #[arg(long, default_value = "human")]
    log_format: LogFormat,
    /// Echo every worker line on the terminal too (they always go to
    /// <output.dir>/logs/rank-N.log).
    #[arg(short, long, conflicts_with = "quiet")]
    verbose: bool,
    /// Only errors and the final summary: no progress display, no worker
    /// lines but errors.
    #[arg(short, long)]
    quiet: bool,
    /// Echo only these ranks' lines (comma-separated), e.g. --echo-ranks 0.
    #[arg(long, value_delimiter = ',')]
    echo_ranks: Option<Vec<usize>>,
    /// Local mode: rank 0 measures SWD against this many held-out images
    /// at each checkpoint and at the end (0: not measured).
    #[arg(long, default_value_t = 0, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=100_000))]
    eval_images: usize,
    /// Serve gRPC health (grpc.health.v1, plain text, no token) here for
    /// Kubernetes' grpc probes, e.g. 0.0.0.0:8081.
    #[arg(long, env = "GANCLUSTER_HEALTH_LISTEN")]
    health_listen: Option<String>,
    /// Serve Prometheus metrics at /metrics here, e.g. 0.0.0.0:9090.
    #[arg(long, env = "GANCLUSTER_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    #[command(flatten)]
    config: ConfigArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = cli.log_format;
    common::security::tls::install_crypto();
    match train(cli).await {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            logging::failure(format, err.as_ref());
            ExitCode::from(exit_code(&err))
        }
    }
}

/// [`report::CONFIG`] for what running again cannot fix, [`report::FAILURE`] otherwise.
fn exit_code(err: &anyhow::Error) -> u8 {
    let permanent = report::caused_by::<ConfigError>(err.as_ref())
        || err.chain().any(|cause| {
            cause
                .downcast_ref::<CoordinatorError>()
                .is_some_and(CoordinatorError::is_permanent)
                || cause
                    .downcast_ref::<observe::ObserveError>()
                    .is_some_and(observe::ObserveError::is_permanent)
        });
    if permanent {
        report::CONFIG
    } else {
        report::FAILURE
    }
}

/// Trains; the exit status of a run that ended without error.
async fn train(cli: Cli) -> anyhow::Result<u8> {
    let started = Instant::now();
    let cfg = cli.config.load()?;
    if cli.config.print_config {
        print!("{}", cfg.to_toml()?);
        return Ok(report::SUCCESS);
    }
    let verbosity = match (cli.verbose, cli.quiet) {
        (true, _) => Verbosity::Verbose,
        (_, true) => Verbosity::Quiet,
        _ => Verbosity::Normal,
    };
    let echo = Echo {
        terminal: cli.log_format == LogFormat::Human && std::io::stderr().is_terminal(),
        verbosity,
        ranks: cli.echo_ranks,
    };
    let default_level = if verbosity == Verbosity::Quiet {
        "warn"
    } else {
        "info"
    };
    let log = log_file(&cfg.output.dir, "coordinator.log").with_context(|| {
        format!(
            "creating {} (output.dir, --out)",
            logs_dir(&cfg.output.dir).display()
        )
    })?;
    logging::init_with(cli.log_format, default_level, Screen, Some(log));
    tracing::info!(
        logs = %logs_dir(&cfg.output.dir).display(),
        "every line of the coordinator and of each rank is in logs/coordinator.log and logs/rank-N.log"
    );
    anyhow::ensure!(cli.workers > 0, "--workers must be at least 1");
    let mode = if cli.external {
        let token = cli.token.ok_or(CoordinatorError::MissingToken)?;
        // Refused before anything binds: an empty token must never mean "open".
        common::security::auth::Token::new(&token).map_err(CoordinatorError::from)?;
        Mode::External {
            workers: cli.workers,
            token,
        }
    } else {
        Mode::Local(cli.workers)
    };
    let policy = match (cli.resume_from, cli.fresh) {
        (Some(name), _) => ResumePolicy::From(name),
        (None, true) => ResumePolicy::Fresh { force: cli.force },
        (None, false) => ResumePolicy::Latest,
    };
    if let Some(address) = &cli.metrics_listen {
        observe::serve_metrics(address)?;
        coordinator::describe_metrics();
    }
    let health = match &cli.health_listen {
        Some(address) => Some(observe::Health::serve(address, observe::COORDINATOR).await?),
        None => None,
    };
    let options = Options {
        echo,
        eval_images: cli.eval_images,
        break_lease: cli.break_lease,
        health,
    };
    match coordinator::run(cfg.clone(), mode, policy, &options, shutdown_signal).await {
        Ok(report) => {
            let text = coordinator::summary(&report, &cfg, started.elapsed());
            match cli.log_format {
                LogFormat::Human => eprintln!("{text}"),
                LogFormat::Json => tracing::info!(summary = %text, "summary"),
            }
            Ok(match report.outcome {
                Outcome::Finished { .. } => report::SUCCESS,
                Outcome::Stopped { .. } => report::STOPPED,
            })
        }
        // Nothing was asked that is not already done: a Job restarted
        // after success must stay successful.
        Err(done @ CoordinatorError::AlreadyDone { .. }) => {
            tracing::info!("{done}");
            Ok(report::SUCCESS)
        }
        Err(err) => Err(err).context("training failed"),
    }
}

/// Ctrl-C or SIGTERM (Kubernetes eviction).
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
