//! Local mode: start the worker processes, label their output, watch them.
//!
//! Like torchrun, the coordinator runs `N` copies of the `worker` binary
//! that sits next to its own executable, writes every line they print to
//! `<output.dir>/logs/rank-N.log`, echoes the ones that matter `[rank
//! r]`-prefixed ([`crate::ui::display`]), and reports a crashed worker to the
//! supervision, which may start a replacement in its place. Children are
//! killed when the launcher is dropped, so a failing coordinator leaves
//! nothing running.

use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::security::untrusted::shown_message;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::CoordinatorError;
use crate::error::GroupFailure;
use crate::generation::events::{Event, Notice, Origin};
use crate::local::gpus::GpuMap;
use crate::ui::display::{self, Echo};

/// The running worker processes, one per place.
pub struct Launcher {
    spec: Spec,
    binary: PathBuf,
    events: mpsc::Sender<Notice>,
    places: Vec<Place>,
}

/// The process running in one place, and how to stop it.
struct Place {
    life: u64,
    stop: watch::Sender<bool>,
    watcher: JoinHandle<()>,
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

/// What the local workers are started with.
pub struct Spec {
    /// How many.
    pub workers: usize,
    /// The coordinator's address for them (its Unix socket).
    pub address: String,
    /// The run's token.
    pub token: String,
    /// The effective configuration file they read.
    pub config: PathBuf,
    /// Environment variables holding secrets (never in the config file).
    pub secrets: Vec<(String, String)>,
    /// More `worker train` flags (e.g. `--eval-images N`).
    pub args: Vec<String>,
    /// The run's output folder: each rank logs to `logs/rank-N.log` in it.
    pub output: PathBuf,
    /// Which of their lines reach the coordinator's terminal.
    pub echo: Echo,
    /// Which GPU each local rank trains on.
    pub gpus: GpuMap,
}

/// Local workers' coordinator is their parent: if it dies they stop at
/// once rather than wait for one to come back.
const NO_RECONNECT: (&str, &str) = ("GANCLUSTER__COORDINATOR__RECONNECT_TIMEOUT_S", "0");

impl Launcher {
    /// Starts the workers `spec` describes; their failures arrive on `events`.
    pub fn spawn(spec: Spec, events: mpsc::Sender<Notice>) -> Result<Self, CoordinatorError> {
        let (gpus, workers) = (spec.gpus.gpus(), spec.workers);
        match gpus.is_empty() {
            true => tracing::info!(
                workers,
                "no GPU visible: local workers train on the CPU build's device"
            ),
            false if spec.gpus.shared_by(workers) => tracing::warn!(
                workers, gpus = %gpus.join(","),
                "fewer GPUs than local workers: they take the GPUs in turn, so some GPUs train \
                 several ranks (coordinator.gpus, --gpus to choose)"
            ),
            false => tracing::info!(workers, gpus = %gpus.join(","),
                "each local worker trains on its own GPU: local rank r on the r-th"),
        }
        let mut launcher = Self {
            binary: worker_binary()?,
            places: Vec::with_capacity(spec.workers),
            spec,
            events,
        };
        for place in 0..launcher.spec.workers {
            let started = launcher.start(place, 0)?;
            launcher.places.push(started);
        }
        Ok(launcher)
    }

    /// Stops the process in `place` (it may be hung or stopped, not dead)
    /// and starts a new one there.
    pub async fn replace(&mut self, place: usize) -> Result<(), CoordinatorError> {
        let life = self.places[place].life + 1;
        let started = self.start(place, life)?;
        let old = std::mem::replace(&mut self.places[place], started);
        old.stop.send_replace(true);
        let _ = old.watcher.await;
        Ok(())
    }

    /// Whether `life` is the process now running in `place`.
    pub fn is_current(&self, place: usize, life: u64) -> bool {
        self.places.get(place).is_some_and(|p| p.life == life)
    }

    fn start(&self, place: usize, life: u64) -> Result<Place, CoordinatorError> {
        let spec = &self.spec;
        let log_name = format!("rank-{place}.log");
        let log = display::log_file(&spec.output, &log_name).map_err(|source| {
            CoordinatorError::Output {
                path: display::logs_dir(&spec.output).join(&log_name),
                source,
            }
        })?;
        let sink = Sink {
            rank: place,
            file: Arc::new(Mutex::new(log)),
            echo: spec.echo.clone(),
        };
        let mut child = Command::new(&self.binary)
            .args([
                "train",
                "--coordinator",
                &spec.address,
                "--rank",
                &place.to_string(),
                "--config",
            ])
            .arg(&spec.config)
            .args(&spec.args)
            .env("GANCLUSTER_TOKEN", &spec.token)
            .env(NO_RECONNECT.0, NO_RECONNECT.1)
            .envs(spec.gpus.env(place, spec.workers))
            .envs(spec.secrets.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // Their own process group: Ctrl-C on a terminal reaches only
            // the coordinator, which then checkpoints and stops the group.
            .process_group(0)
            .spawn()
            .map_err(|source| CoordinatorError::Spawn {
                rank: place,
                source,
            })?;
        let last_words = LastWords::default();
        let output = [
            forward(child.stdout.take(), sink.clone(), None),
            forward(child.stderr.take(), sink, Some(last_words.clone())),
        ];
        let (stop, stopped) = watch::channel(false);
        let watcher = tokio::spawn(watch_child(
            Watched {
                child,
                place,
                life,
                output,
                last_words,
            },
            stopped,
            self.events.clone(),
        ));
        Ok(Place {
            life,
            stop,
            watcher,
        })
    }

    /// Kills any worker still running and waits until all are reaped.
    pub async fn shutdown(self) {
        for place in &self.places {
            place.stop.send_replace(true);
        }
        for place in self.places {
            let _ = place.watcher.await;
        }
    }
}

/// How long a child's pipes may take to drain once it exited or was killed,
/// so its last lines (often the reason it failed) are not lost.
const DRAIN: Duration = Duration::from_secs(2);

/// The last `Error:` report a child printed, with its cause lines.
#[derive(Clone, Default)]
struct LastWords(Arc<Mutex<Option<String>>>);

impl LastWords {
    /// Keeps `line` if it starts an error report or continues one.
    fn hear(&self, line: &str) {
        let mut words = self.0.lock().expect("last words lock");
        if line.starts_with("Error: ") {
            *words = Some(line.to_string());
        } else if let Some(words) = words.as_mut()
            && line.starts_with("  caused by: ")
        {
            words.push(' ');
            words.push_str(line.trim_start());
        }
    }

    fn get(&self) -> Option<String> {
        self.0.lock().expect("last words lock").clone()
    }
}

/// A child and what it says.
struct Watched {
    child: Child,
    place: usize,
    life: u64,
    output: [Option<JoinHandle<()>>; 2],
    last_words: LastWords,
}

impl Watched {
    /// Waits (bounded) until everything the child wrote has been forwarded.
    async fn drained(&mut self) {
        for forwarder in self.output.iter_mut().filter_map(Option::take) {
            let _ = tokio::time::timeout(DRAIN, forwarder).await;
        }
    }
}

async fn watch_child(
    mut watched: Watched,
    mut stop: watch::Receiver<bool>,
    events: mpsc::Sender<Notice>,
) {
    let (rank, life) = (watched.place, watched.life);
    let origin = Origin::Process { place: rank, life };
    let notify = |event| Notice { origin, event };
    tokio::select! {
        status = watched.child.wait() => match status {
            // 75: the group stopped on request and this worker with it.
            Ok(status)
                if status.success()
                    || status.code() == Some(i32::from(common::process::report::STOPPED)) =>
            {
                watched.drained().await
            }
            Ok(status) => {
                watched.drained().await;
                let permanent = status.code() == Some(i32::from(common::process::report::CONFIG));
                let last_words = watched.last_words.get().map_or_else(
                    || format!("its log lines above are prefixed [rank {rank}]"),
                    |words| shown_message(&words),
                );
                let failure = GroupFailure::WorkerExited {
                    rank,
                    status: status.to_string(),
                    last_words,
                    permanent,
                };
                let _ = events.send(notify(Event::Failed(failure.into()))).await;
            }
            Err(e) => {
                let failure = CoordinatorError::Spawn { rank, source: e };
                let _ = events.send(notify(Event::Failed(failure))).await;
            }
        },
        _ = async { stop.wait_for(|stop| *stop).await.map(|_| ()) } => {
            let _ = watched.child.kill().await;
            watched.drained().await;
        }
    }
}

/// Where one rank's lines go: all to its log file, some to the terminal.
#[derive(Clone)]
struct Sink {
    rank: usize,
    file: Arc<Mutex<std::fs::File>>,
    echo: Echo,
}

impl Sink {
    fn line(&self, line: &str) {
        // A full disk must not stop training; the terminal still gets the line.
        let _ = writeln!(self.file.lock().expect("log file lock"), "{line}");
        if self.echo.echoes(self.rank, line) {
            // Whole lines, `[rank r]`-prefixed as torchrun's: ranks never
            // interleave mid-line, and the progress display stays below them.
            let _ = display::write_stderr(format!("[rank {}] {line}\n", self.rank).as_bytes());
        }
    }
}

/// Copies a child's output line by line into `sink`, remembering its last
/// error report when `last_words` is given.
fn forward(
    pipe: Option<impl AsyncRead + Unpin + Send + 'static>,
    sink: Sink,
    last_words: Option<LastWords>,
) -> Option<JoinHandle<()>> {
    let pipe = pipe?;
    Some(tokio::spawn(async move {
        let mut lines = BufReader::new(pipe).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(words) = &last_words {
                words.hear(&line);
            }
            sink.line(&line);
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_error_report_and_its_causes_are_kept() {
        let words = LastWords::default();
        for line in [
            "2026-11-27 INFO joined",
            "Error: an earlier one",
            "Error: training failed",
            "  caused by: no images in /data",
            "some trailing line",
        ] {
            words.hear(line);
        }
        assert_eq!(
            words.get().as_deref(),
            Some("Error: training failed caused by: no images in /data")
        );
    }
}
