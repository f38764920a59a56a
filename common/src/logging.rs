//! Process-wide `tracing` setup shared by both binaries.
//!
//! Humans get compact lines (coloured only on a terminal), log collectors get one JSON object
//! per line; `RUST_LOG` filters either way (default `info`).

use std::io::IsTerminal;
use std::str::FromStr;

use tracing_subscriber::EnvFilter;

/// How log lines are rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Readable lines for a terminal.
    #[default]
    Human,
    /// One JSON object per line, for Kubernetes log pipelines.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "human" => Ok(Self::Human),
            "json" => Ok(Self::Json),
            other => Err(format!(
                "unknown log format `{other}`: use `human` or `json`"
            )),
        }
    }
}

/// Installs the global subscriber, writing to stderr so stdout stays free
/// for command output such as `--print-config`.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.compact().init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Says why the process is about to fail, once: a plain `Error:` line
/// (causes the message already says are left out) for people, an `ERROR`
/// event for log collectors.
pub fn failure(format: LogFormat, error: &(dyn std::error::Error + 'static)) {
    let message = crate::report::render(error);
    match format {
        LogFormat::Human => eprintln!("Error: {message}"),
        LogFormat::Json => tracing::error!(error = %message, "failed"),
    }
}
