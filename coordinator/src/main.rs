//! `coordinator`: forms the worker group, all-reduces gradients and
//! schedules checkpoints. Only its command line exists so far.

use clap::Parser;

/// gancluster coordinator (rendezvous and all-reduce arrive with the
/// distributed-training work; use `worker train --standalone` meanwhile).
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Number of workers to spawn locally (or wait for, with --external).
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Wait for workers started elsewhere (Kubernetes) instead of spawning them.
    #[arg(long)]
    external: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    anyhow::bail!(
        "distributed training ({} workers{}) is not implemented yet: use `worker train --standalone`",
        cli.workers,
        if cli.external { ", external" } else { "" }
    )
}
