//! Local mode: start the worker processes, label their output, watch them.
//!
//! Like torchrun, the coordinator runs `N` copies of the `worker` binary
//! that sits next to its own executable, prefixes each line they print with
//! `[rank r]`, and turns a crashed worker into a run failure. Children are
//! killed when the launcher is dropped, so a failing coordinator leaves
//! nothing running.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};

use crate::CoordinatorError;
use crate::error::GroupFailure;
use crate::service::Event;

/// The running worker processes.
pub struct Launcher {
    stop: watch::Sender<bool>,
    watchers: Vec<tokio::task::JoinHandle<()>>,
}

/// The `worker` executable beside the running coordinator.
pub fn worker_binary() -> Result<PathBuf, CoordinatorError> {
    let me = std::env::current_exe().map_err(|e| CoordinatorError::Spawn { rank: 0, source: e })?;
    let path = me.with_file_name(format!("worker{}", std::env::consts::EXE_SUFFIX));
    if path.is_file() {
        Ok(path)
    } else {
        Err(CoordinatorError::WorkerBinary(path))
    }
}

impl Launcher {
    /// Starts `workers` processes training with `config` against the
    /// coordinator at `address`, with `secrets` in their environment (the
    /// config file never holds them); failures arrive on `events`.
    pub fn spawn(
        workers: usize,
        address: &str,
        token: &str,
        config: &Path,
        secrets: &[(&str, &str)],
        events: mpsc::Sender<Event>,
    ) -> Result<Self, CoordinatorError> {
        let binary = worker_binary()?;
        let (stop, _) = watch::channel(false);
        let mut watchers = Vec::with_capacity(workers);
        for rank in 0..workers {
            let mut child = Command::new(&binary)
                .args([
                    "train",
                    "--coordinator",
                    address,
                    "--rank",
                    &rank.to_string(),
                    "--config",
                ])
                .arg(config)
                .env("GANCLUSTER_TOKEN", token)
                .envs(secrets.iter().copied())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                // Their own process group: Ctrl-C on a terminal reaches only
                // the coordinator, which then checkpoints and stops the group.
                .process_group(0)
                .spawn()
                .map_err(|source| CoordinatorError::Spawn { rank, source })?;
            forward(child.stdout.take(), rank);
            forward(child.stderr.take(), rank);
            watchers.push(tokio::spawn(watch_child(
                child,
                rank,
                stop.subscribe(),
                events.clone(),
            )));
        }
        Ok(Self { stop, watchers })
    }

    /// Kills any worker still running and waits until all are reaped.
    pub async fn shutdown(self) {
        self.stop.send_replace(true);
        for watcher in self.watchers {
            let _ = watcher.await;
        }
    }
}

async fn watch_child(
    mut child: Child,
    rank: usize,
    mut stop: watch::Receiver<bool>,
    events: mpsc::Sender<Event>,
) {
    tokio::select! {
        status = child.wait() => match status {
            Ok(status) if status.success() => {}
            Ok(status) => {
                let _ = events.send(Event::Failed(GroupFailure::WorkerExited { rank, status: status.to_string() }.into())).await;
            }
            Err(e) => {
                let _ = events.send(Event::Failed(CoordinatorError::Spawn { rank, source: e })).await;
            }
        },
        _ = async { stop.wait_for(|stop| *stop).await.map(|_| ()) } => {
            let _ = child.kill().await;
        }
    }
}

/// Copies a child's output to our stderr, one `[rank r]`-prefixed line at a time.
fn forward(pipe: Option<impl AsyncRead + Unpin + Send + 'static>, rank: usize) {
    let Some(pipe) = pipe else { return };
    tokio::spawn(async move {
        let mut lines = BufReader::new(pipe).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            // Forwarding child output is the launcher's job, as torchrun's
            // `[rank0]:` prefixes are: write whole lines so ranks never interleave mid-line.
            let _ = writeln!(std::io::stderr().lock(), "[rank {rank}] {line}");
        }
    });
}
