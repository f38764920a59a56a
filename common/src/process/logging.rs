//! Process-wide `tracing` setup shared by both binaries.
//!
//! Humans get compact lines (coloured only on a terminal) whose numbers are
//! rounded to what a person reads (4 significant digits: `d_loss=0.8566`,
//! not `0.8565906286239624`); log collectors get one JSON object per line
//! at full precision. `RUST_LOG` filters either way (default `info`).

use std::fmt;
use std::io::IsTerminal;
use std::str::FromStr;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FormatFields, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

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
    init_with(format, "info", std::io::stderr, None);
}

/// Installs the global subscriber writing to `writer` (a terminal that may
/// hold a progress bar) at `default_level` unless `RUST_LOG` says
/// otherwise, and also, when given, every line to `file` as plain text.
pub fn init_with<W>(format: LogFormat, default_level: &str, writer: W, file: Option<std::fs::File>)
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let ansi = std::io::stderr().is_terminal();
    let screen = match format {
        LogFormat::Human => tracing_subscriber::fmt::layer()
            .compact()
            .fmt_fields(Rounded)
            .with_ansi(ansi)
            .with_writer(writer)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(writer)
            .boxed(),
    };
    let file = file.map(|file| {
        tracing_subscriber::fmt::layer()
            .compact()
            .fmt_fields(Rounded)
            .with_ansi(false)
            .with_writer(std::sync::Mutex::new(file))
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(screen)
        .with(file)
        .init();
}

/// Says why the process is about to fail, once: a plain `Error:` line
/// (causes the message already says are left out) for people, an `ERROR`
/// event for log collectors.
pub fn failure(format: LogFormat, error: &(dyn std::error::Error + 'static)) {
    // The configuration, which says where logs go, may be what failed.
    if !tracing::dispatcher::has_been_set() {
        init(format);
    }
    let message = crate::process::report::render(error);
    match format {
        LogFormat::Human => eprintln!("Error: {message}"),
        LogFormat::Json => tracing::error!(error = %message, "failed"),
    }
}

/// `value` with 4 significant digits, as people read losses.
pub fn significant(value: f64) -> String {
    if value == 0.0 || !value.is_finite() {
        return format!("{value}");
    }
    let magnitude = value.abs().log10().floor() as i32;
    let decimals = (3 - magnitude).clamp(0, 12) as usize;
    if !(-4..6).contains(&magnitude) {
        return format!("{value:.3e}");
    }
    format!("{value:.decimals$}")
}

/// Fields as the compact format writes them, with floating-point values
/// rounded by [`significant`].
struct Rounded;

impl<'w> FormatFields<'w> for Rounded {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = RoundingVisitor {
            writer: &mut writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct RoundingVisitor<'a, 'w> {
    writer: &'a mut Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl RoundingVisitor<'_, '_> {
    fn write(&mut self, field: &Field, value: fmt::Arguments<'_>) {
        if self.result.is_err() {
            return;
        }
        let separator = if std::mem::take(&mut self.first) {
            ""
        } else {
            " "
        };
        self.result = match field.name() {
            "message" => write!(self.writer, "{separator}{value}"),
            name => write!(self.writer, "{separator}{name}={value}"),
        };
    }
}

impl Visit for RoundingVisitor<'_, '_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.write(field, format_args!("{}", significant(value)));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.write(field, format_args!("{value}")),
            _ => self.write(field, format_args!("{value:?}")),
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.write(field, format_args!("{value:?}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn losses_are_shown_with_four_significant_digits() {
        assert_eq!(significant(0.8565906286239624), "0.8566");
        assert_eq!(significant(4.321987), "4.322");
        assert_eq!(significant(12.3456), "12.35");
        assert_eq!(significant(1523.4), "1523");
        assert_eq!(significant(0.0123456), "0.01235");
        assert_eq!(significant(3.2e-7), "3.200e-7");
        assert_eq!(significant(0.0), "0");
        assert_eq!(significant(f64::NAN), "NaN");
    }
}
