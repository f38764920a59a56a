//! Support for tests that run gancluster's real binaries.
//!
//! Every child runs under a deadline and is killed when its handle drops,
//! so a hung or failing test never leaves processes behind. Output is
//! captured on threads, so a chatty child cannot block on a full pipe.

pub mod certs;
pub mod client;
pub mod moto;
pub mod pty;
pub mod s3;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

use wait_timeout::ChildExt;

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

/// What a finished child left behind.
#[derive(Debug)]
pub struct Finished {
    /// Its exit status.
    pub status: ExitStatus,
    /// Everything it wrote to stdout.
    pub stdout: String,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

impl Finished {
    /// Panics with the child's output unless it exited with status 0.
    pub fn assert_success(self) -> Self {
        assert!(
            self.status.success(),
            "child failed ({}):\n{}\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }

    /// Panics with the child's stderr unless it contains every one of
    /// `phrases`: the messages a user would read.
    pub fn assert_says(&self, phrases: &[&str]) -> &Self {
        let missing: Vec<&str> = phrases
            .iter()
            .copied()
            .filter(|p| !self.stderr.contains(p))
            .collect();
        assert!(
            missing.is_empty(),
            "stderr lacks {missing:?}:\n{}",
            self.stderr
        );
        self
    }

    /// Panics with the child's output unless it failed.
    pub fn assert_failure(self) -> Self {
        assert!(
            !self.status.success(),
            "child unexpectedly succeeded:\n{}\n{}",
            self.stdout,
            self.stderr
        );
        self
    }
}

/// A running child that is killed and reaped when dropped.
pub struct Running {
    child: Child,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
}

impl Running {
    /// Starts `command` with captured stdout and stderr.
    pub fn spawn(command: &mut Command) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {command:?}: {e}"));
        let stdout = child.stdout.take().map(drain);
        let stderr = child.stderr.take().map(drain);
        Self {
            child,
            stdout,
            stderr,
        }
    }

    /// Waits at most `limit` for the child to exit; on timeout it is killed
    /// and the test fails with what it printed so far.
    pub fn wait(mut self, limit: Duration) -> Finished {
        let status = self.child.wait_timeout(limit).expect("waiting for child");
        let Some(status) = status else {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let (out, err) = self.output();
            panic!("child did not finish within {limit:?}:\n{out}\n{err}");
        };
        let (stdout, stderr) = self.output();
        Finished {
            status,
            stdout,
            stderr,
        }
    }

    /// Sends SIGTERM, as Kubernetes does on eviction.
    pub fn terminate(&self) {
        terminate(self.child.id());
    }

    /// The child's process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    fn output(&mut self) -> (String, String) {
        let join = |h: Option<JoinHandle<String>>| {
            h.map(|h| h.join().unwrap_or_default()).unwrap_or_default()
        };
        (join(self.stdout.take()), join(self.stderr.take()))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls `probe` every 20 ms until it yields a value; panics naming `what`
/// after `limit`. For conditions another process makes true (a file it
/// writes), where there is nothing to wait on directly.
pub fn wait_until<T>(limit: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
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

/// Sends SIGTERM to process `pid`.
pub fn terminate(pid: u32) {
    signal(pid, libc::SIGTERM).unwrap_or_else(|e| panic!("SIGTERM to {pid}: {e}"));
}

/// A process frozen with SIGSTOP: alive, its sockets open, silent — what a
/// hung or partitioned peer looks like. It is continued when the guard
/// drops, so a failing test leaves nothing frozen behind.
pub struct Frozen(u32);

impl Frozen {
    /// Freezes `pid`.
    pub fn stop(pid: u32) -> Self {
        signal(pid, libc::SIGSTOP).unwrap_or_else(|e| panic!("SIGSTOP to {pid}: {e}"));
        Self(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // Already gone is fine: whoever killed it did the cleanup.
        let _ = signal(self.0, libc::SIGCONT);
    }
}

/// Whether process `pid` has exited (gone, or a zombie nobody reaped yet).
pub fn exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        // The state follows the parenthesised command name, which may hold spaces.
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X'))
    })
}

fn signal(pid: u32, signal: libc::c_int) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    // SAFETY: kill(2) with a valid signal number has no memory-safety preconditions.
    match unsafe { libc::kill(pid, signal) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// The child processes of `pid` (Linux: from /proc), oldest first.
pub fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .collect()
}

fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    })
}

/// Runs `command` to completion within `limit`.
pub fn run(command: &mut Command, limit: Duration) -> Finished {
    Running::spawn(command).wait(limit)
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
