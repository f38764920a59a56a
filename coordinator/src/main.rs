//! `coordinator`: trains with N local worker processes, or waits for N
//! external workers (Kubernetes), and all-reduces their gradients.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use common::ConfigError;
use common::cli::ConfigArgs;
use common::logging::{self, LogFormat};
use common::report;
use coordinator::{CoordinatorError, Mode, ResumePolicy};

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
    #[command(flatten)]
    config: ConfigArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = cli.log_format;
    logging::init(format);
    common::tls::install_crypto();
    match train(cli).await {
        Ok(()) => ExitCode::from(report::SUCCESS),
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
        });
    if permanent {
        report::CONFIG
    } else {
        report::FAILURE
    }
}

async fn train(cli: Cli) -> anyhow::Result<()> {
    let cfg = cli.config.load()?;
    if cli.config.print_config {
        print!("{}", cfg.to_toml()?);
        return Ok(());
    }
    anyhow::ensure!(cli.workers > 0, "--workers must be at least 1");
    let mode = if cli.external {
        let token = cli.token.ok_or(CoordinatorError::MissingToken)?;
        // Refused before anything binds: an empty token must never mean "open".
        common::auth::Token::new(&token).map_err(CoordinatorError::from)?;
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
    match coordinator::run(cfg, mode, policy, cli.break_lease, shutdown_signal).await {
        // Nothing was asked that is not already done: a Job restarted
        // after success must stay successful.
        Err(done @ CoordinatorError::AlreadyDone { .. }) => {
            tracing::info!("{done}");
            Ok(())
        }
        outcome => outcome.map(|_| ()).context("training failed"),
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
