//! Running a child under a deadline: it is killed when its handle drops,
//! and its output is captured on threads, so a chatty child cannot block
//! on a full pipe and a hung one cannot outlive its test.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

use wait_timeout::ChildExt;

use crate::signals::terminate;

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
    /// Panics with the child's output unless it exited with status `code`.
    pub fn assert_code(self, code: u8) -> Self {
        assert_eq!(
            self.status.code(),
            Some(i32::from(code)),
            "child exited with {} instead of {code}:\n{}\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }

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
