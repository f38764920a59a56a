//! What a person at the coordinator's terminal sees, and what goes to files.
//!
//! On a terminal, one live progress display is the coordinator's view of
//! the whole group, and worker lines appear only when they matter
//! (warnings, errors, a worker's last words): four workers each printing a
//! step line every few steps would bury the display. Every line of every
//! rank still goes to `<output.dir>/logs/rank-N.log`, and the coordinator's
//! own to `logs/coordinator.log`. Without a terminal (CI, a pod's log) the
//! coordinator prints plain step lines and forwards every worker line, as
//! torchrun does. `-v` echoes every worker line on a terminal too, `-q`
//! only errors, `--echo-ranks` picks whose lines are echoed at all.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use indicatif::ProgressBar;
use tracing_subscriber::fmt::MakeWriter;

/// How much the coordinator shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Verbosity {
    /// Errors, warnings of the coordinator, the summary; no progress display.
    Quiet,
    /// The progress display and worker lines that matter.
    #[default]
    Normal,
    /// Every worker line as well.
    Verbose,
}

/// Which worker lines the coordinator echoes, given where it writes.
#[derive(Debug, Clone, Default)]
pub struct Echo {
    /// Stderr is a terminal showing a progress display.
    pub terminal: bool,
    /// How much to show.
    pub verbosity: Verbosity,
    /// Only these ranks' lines, when set.
    pub ranks: Option<Vec<usize>>,
}

impl Echo {
    /// Whether `line` of worker `rank` is echoed (it is logged to its file anyway).
    pub fn echoes(&self, rank: usize, line: &str) -> bool {
        if self
            .ranks
            .as_ref()
            .is_some_and(|ranks| !ranks.contains(&rank))
        {
            return false;
        }
        let level = level_of(line);
        match self.verbosity {
            Verbosity::Verbose => true,
            Verbosity::Quiet => level.is_none_or(|l| l == "ERROR"),
            Verbosity::Normal if self.terminal => level.is_none_or(|l| l == "WARN" || l == "ERROR"),
            Verbosity::Normal => true,
        }
    }

    /// Whether the live progress display is shown.
    pub fn shows_progress(&self) -> bool {
        self.terminal && self.verbosity != Verbosity::Quiet
    }
}

/// The level of a worker's log line (`2026-… INFO target: …`), or `None`
/// for anything else it prints (its final `Error:` report, a panic), which
/// always matters.
fn level_of(line: &str) -> Option<&str> {
    let level = line.split_whitespace().nth(1)?;
    ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"]
        .contains(&level)
        .then_some(level)
}

/// The progress display currently on the terminal, if any: every other
/// write to the terminal goes around it.
static BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// Shows `bar` until [`hide`]; lines written meanwhile appear above it.
pub fn show(bar: &ProgressBar) {
    *BAR.lock().expect("display lock") = Some(bar.clone());
}

/// Stops routing writes around the progress display.
pub fn hide() {
    *BAR.lock().expect("display lock") = None;
}

/// Writes `bytes` to stderr, above the progress display when one is shown.
pub fn write_stderr(bytes: &[u8]) -> io::Result<()> {
    let bar = BAR.lock().expect("display lock").clone();
    match bar {
        Some(bar) => bar.suspend(|| io::stderr().lock().write_all(bytes)),
        None => io::stderr().lock().write_all(bytes),
    }
}

/// A `tracing` writer that keeps log lines from tearing the progress display.
#[derive(Debug, Clone, Copy, Default)]
pub struct Screen;

impl Write for Screen {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        write_stderr(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

impl<'w> MakeWriter<'w> for Screen {
    type Writer = Screen;

    fn make_writer(&'w self) -> Screen {
        Screen
    }
}

/// `<output.dir>/logs/`.
pub fn logs_dir(output: &Path) -> PathBuf {
    output.join(common::storage::outputs::LOGS_DIR)
}

/// Opens (appending) the log file `name` in `<output.dir>/logs/`.
pub fn log_file(output: &Path, name: &str) -> io::Result<std::fs::File> {
    let dir = logs_dir(output);
    std::fs::create_dir_all(&dir)?;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    const STEP: &str =
        "2026-11-27T12:00:00Z  INFO worker::replica_loop: step step=10 d_loss=0.8566";
    const WARN: &str = "2026-11-27T12:00:00Z  WARN worker::data::loader: skipping unreadable image";
    const ERROR: &str = "Error: training failed";

    #[test]
    fn a_terminal_shows_what_matters_and_a_pipe_shows_everything() {
        let terminal = Echo {
            terminal: true,
            ..Echo::default()
        };
        assert!(!terminal.echoes(0, STEP) && terminal.echoes(0, WARN) && terminal.echoes(0, ERROR));
        let pipe = Echo::default();
        assert!(pipe.echoes(0, STEP) && pipe.echoes(3, WARN));
    }

    #[test]
    fn verbosity_and_rank_filters_apply() {
        let verbose = Echo {
            terminal: true,
            verbosity: Verbosity::Verbose,
            ranks: Some(vec![1]),
        };
        assert!(verbose.echoes(1, STEP) && !verbose.echoes(0, ERROR));
        let quiet = Echo {
            terminal: true,
            verbosity: Verbosity::Quiet,
            ranks: None,
        };
        assert!(!quiet.echoes(0, WARN) && quiet.echoes(0, ERROR));
        assert!(!quiet.shows_progress());
    }
}
