//! The few lines a person reads when a run ends: what was trained, how
//! fast, how it ended, and where everything is.

use std::fmt::Write;
use std::path::Path;
use std::time::Duration;

use common::Config;
use common::process::logging::significant;

use common::storage::outputs;

use crate::run::{Outcome, Report};
use crate::ui::display;

/// The summary of `report` for a run of `cfg` that took `wall`.
pub fn summary(report: &Report, cfg: &Config, wall: Duration) -> String {
    let out = &cfg.output.dir;
    let mut text = match report.outcome {
        Outcome::Finished { steps } => format!(
            "training finished: {steps} steps in {}, {} img/s",
            human(wall),
            significant(report.images_per_s)
        ),
        Outcome::Stopped { steps } => format!(
            "training stopped on request after {steps} of {} steps in {} (checkpointed: run the \
             same command to resume), {} img/s",
            cfg.train.steps,
            human(wall),
            significant(report.images_per_s)
        ),
    };
    let mut row = |label: &str, value: String| {
        let _ = write!(text, "\n  {label:<11}{value}");
    };
    if let Some(s) = &report.last {
        row(
            "losses",
            format!(
                "D {}  G {}  D(x) {}  D(G(z)) {}",
                significant(f64::from(s.d_loss)),
                significant(f64::from(s.g_loss)),
                significant(f64::from(s.d_real)),
                significant(f64::from(s.d_fake))
            ),
        );
    }
    if let Some(first) = report.first_step {
        row(
            "first step",
            format!("after {} (start, join, load, kernel tuning)", human(first)),
        );
    }
    if let Some(swd) = report.swd {
        row(
            "SWD ×1e3",
            format!("{} (against held-out images)", significant(swd)),
        );
    }
    row(
        "restarts",
        format!(
            "{} ({} generations, steps trained again: {}, steps skipped for NaN/Inf: {})",
            report.restarts, report.generations, report.retrained, report.skipped
        ),
    );
    row("samples", file(out, outputs::SAMPLES_PNG));
    row(
        "loss log",
        format!(
            "{}, {}",
            file(out, outputs::LOSSES_CSV),
            file(out, outputs::LOSS_PNG)
        ),
    );
    if cfg.output.tensorboard {
        let board = out.join(outputs::TENSORBOARD_DIR);
        row(
            "curves",
            format!("tensorboard --logdir {}", board.display()),
        );
    }
    row(
        "checkpoint",
        report.checkpoint.clone().unwrap_or_else(|| "none".into()),
    );
    row("logs", format!("{}/", display::logs_dir(out).display()));
    row("members", file(out, outputs::MEMBERSHIP_CSV));
    text
}

fn file(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

/// `1h02m03s`, `3m44s`, `12.3s`.
fn human(wall: Duration) -> String {
    let secs = wall.as_secs();
    match secs {
        0..60 => format!("{:.1}s", wall.as_secs_f64()),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m{:02}s", secs / 3600, secs / 60 % 60, secs % 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generation::reports::StepSummary;

    #[test]
    fn the_summary_says_what_how_fast_and_where() {
        let report = Report {
            outcome: Outcome::Finished { steps: 300 },
            images_per_s: 1283.456,
            last: Some(StepSummary {
                step: 299,
                epoch: 2,
                d_loss: 0.8565906,
                g_loss: 1.2345678,
                d_real: 0.52,
                d_fake: 0.31,
                images_per_s: 1200.0,
                allreduce_ms: 3.0,
                checksum: Some(0),
            }),
            restarts: 1,
            generations: 2,
            retrained: 0,
            skipped: 0,
            checkpoint: Some("folder runs/default/checkpoints/step-000000300".into()),
            swd: Some(123.456),
            first_step: Some(Duration::from_millis(4200)),
        };
        let text = summary(&report, &Config::default(), Duration::from_secs(224));
        for expected in [
            "training finished: 300 steps in 3m44s, 1283 img/s",
            "D 0.8566  G 1.235",
            "SWD ×1e3   123.5",
            "first step after 4.2s",
            "restarts   1 (2 generations, steps trained again: 0",
            "runs/default/samples.png",
            "runs/default/loss.png",
            "step-000000300",
            "runs/default/logs/",
            "tensorboard --logdir runs/default/tensorboard",
        ] {
            assert!(text.contains(expected), "{expected} missing:\n{text}");
        }
    }
}
