//! `coordinator`: trains with N local worker processes, or waits for N
//! external workers (Kubernetes), and all-reduces their gradients.

use anyhow::Context;
use clap::Parser;
use common::cli::ConfigArgs;
use common::logging::{self, LogFormat};
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
    /// `human` lines or one `json` object per line.
    #[arg(long, default_value = "human")]
    log_format: LogFormat,
    #[command(flatten)]
    config: ConfigArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    common::tls::install_crypto();
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
    coordinator::run(cfg, mode, policy, shutdown_signal)
        .await
        .context("training failed")?;
    Ok(())
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
