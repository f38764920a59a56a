//! What the multi-process tests know about gancluster: its binaries, the
//! tiny model they train, and [`Cluster`], a run in a temporary folder
//! with its own store, in the spirit of ripgrep's test `Dir`: build the
//! commands, run them, read what the run left behind.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::wait_until;

/// Flags for the tiny model (16×16, 8 feature maps, batch 8) the
/// multi-process tests train: seconds per run on two cores.
pub const TINY: [&str; 8] = [
    "--image-size",
    "16",
    "--ngf",
    "8",
    "--ndf",
    "8",
    "--batch-size",
    "8",
];

/// `coordinator --workers W --steps S` training the [`TINY`] model into
/// `out`, with no fault injected and the default log level, whatever the
/// test's own environment holds. Callers add the store and the rest.
pub fn tiny_coordinator(workers: usize, steps: u64, out: &Path) -> Command {
    let mut cmd = Command::new(workspace_bin("coordinator"));
    cmd.args([
        "--workers",
        &workers.to_string(),
        "--steps",
        &steps.to_string(),
    ])
    .args(TINY)
    .arg("--out")
    .arg(out)
    .env_remove("RUST_LOG")
    .env_remove("GANCLUSTER_FAULT");
    cmd
}

/// A binary of this workspace, built by the same `cargo test` invocation.
///
/// Test executables live in `target/<profile>/deps/`; the binaries one
/// level up. `cargo test --workspace` builds the `worker` and
/// `coordinator` binaries because their packages have integration tests.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/..");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo test --workspace` (it builds the binaries)",
        path.display()
    );
    path
}
/// Blocks until rank 0 has logged `steps` steps to `<out>/losses.csv`
/// (bounded): training is under way.
pub fn wait_for_steps(out: &Path, steps: usize) {
    let losses = out.join("losses.csv");
    wait_until(Duration::from_secs(120), "training never got going", || {
        let logged = std::fs::read_to_string(&losses).map_or(0, |t| t.lines().count());
        (logged > steps).then_some(())
    });
}

/// The coordinator at `out` publishes its bound address there; this waits
/// for it (bounded) and returns it as an `http://` URL.
pub fn wait_for_address(out: &Path) -> String {
    let path = out.join("coordinator.addr");
    let what = format!("coordinator never wrote {}", path.display());
    wait_until(Duration::from_secs(60), &what, || {
        let text = std::fs::read_to_string(&path).ok()?;
        (!text.is_empty()).then(|| format!("http://{}", text.trim()))
    })
}

/// A little-endian f32 file (`params.f32`).
pub fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect()
}

/// One generation of a run, as `membership.csv` records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// 1, 2…
    pub generation: u64,
    /// The step it started at.
    pub first_step: u64,
    /// Its members.
    pub workers: usize,
    /// Where its state came from (fresh, checkpoint, replica…).
    pub state: String,
    /// Steps it trained again.
    pub steps_retrained: u64,
    /// Why it formed.
    pub cause: String,
}

/// A run of the [`TINY`] model of `workers` workers for `steps` steps in a
/// temporary folder (removed when dropped): output in `out/`, checkpoints
/// in a file store in `store/`, restarts off unless a test turns them on.
pub struct Cluster {
    dir: tempfile::TempDir,
    workers: usize,
    steps: u64,
    args: Vec<String>,
    envs: Vec<(String, String)>,
}

impl Cluster {
    /// A run of `workers` workers for `steps` steps.
    pub fn new(workers: usize, steps: u64) -> Self {
        Self {
            dir: tempfile::tempdir().expect("temporary folder"),
            workers,
            steps,
            args: Vec::new(),
            envs: vec![("GANCLUSTER__COORDINATOR__MAX_RESTARTS".into(), "0".into())],
        }
    }

    /// Adds command-line flags to every command of the run.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Sets an environment variable (a configuration key, a fault) for
    /// every command of the run.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.retain(|(k, _)| k != key);
        self.envs.push((key.into(), value.into()));
        self
    }

    /// The run's output folder.
    pub fn out(&self) -> PathBuf {
        self.dir.path().join("out")
    }

    /// The run's checkpoint store, as a URL.
    pub fn store(&self) -> String {
        format!("file://{}", self.dir.path().join("store").display())
    }

    /// `coordinator --workers W` in local mode.
    pub fn coordinator(&self) -> Command {
        self.coordinator_with(self.workers, self.steps)
    }

    /// A local-mode coordinator for this run's folder and store with
    /// another worker count and step count: a segment of a run whose
    /// membership changes, resumed from the previous segment's checkpoint.
    pub fn coordinator_with(&self, workers: usize, steps: u64) -> Command {
        let mut cmd = tiny_coordinator(workers, steps, &self.out());
        cmd.arg("--store").arg(self.store()).args(&self.args);
        cmd.envs(self.envs.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// `coordinator --external` waiting for `W` workers presenting `token`
    /// on `listen`.
    pub fn external_coordinator(&self, token: &str, listen: &str) -> Command {
        let mut cmd = self.coordinator();
        cmd.args(["--external", "--listen", listen])
            .env("GANCLUSTER_TOKEN", token);
        cmd
    }

    /// A worker started elsewhere, taking place `rank`, for the external
    /// coordinator at `address`; it writes into the run's output folder.
    pub fn worker(&self, address: &str, rank: usize, token: &str) -> Command {
        let mut cmd = Command::new(workspace_bin("worker"));
        cmd.args([
            "train",
            "--coordinator",
            address,
            "--rank",
            &rank.to_string(),
        ])
        .args(["--steps", &self.steps.to_string()])
        .args(TINY)
        .arg("--out")
        .arg(self.out())
        .arg("--store")
        .arg(self.store())
        .args(&self.args)
        .env("GANCLUSTER_TOKEN", token)
        .env_remove("RUST_LOG")
        .env_remove("GANCLUSTER_FAULT");
        cmd.envs(self.envs.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// The final parameters rank 0 wrote.
    pub fn params(&self) -> Vec<f32> {
        read_f32(&self.out().join("params.f32"))
    }

    /// Every generation of the run, from `membership.csv`.
    pub fn membership(&self) -> Vec<Generation> {
        read_membership(&self.out())
    }
}

/// Every generation of the run whose output folder is `out`, from its
/// `membership.csv` (which must exist).
pub fn read_membership(out: &Path) -> Vec<Generation> {
    let path = out.join("membership.csv");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    // A row being appended right now is not one yet.
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .skip(1)
        .map(|line| {
            let f: Vec<&str> = line.split(',').collect();
            assert_eq!(f.len(), 6, "membership row {line:?}");
            Generation {
                generation: f[0].parse().expect("generation"),
                first_step: f[1].parse().expect("first_step"),
                workers: f[2].parse().expect("workers"),
                state: f[3].into(),
                steps_retrained: f[4].parse().expect("steps_retrained"),
                cause: f[5].into(),
            }
        })
        .collect()
}

/// A TCP port nothing listens on now, for a coordinator that must come
/// back on the same address after it was killed.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding a free port")
        .port()
}

/// Whether `a` and `b` hold the same bits, element for element.
pub fn bitwise_equal(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}
