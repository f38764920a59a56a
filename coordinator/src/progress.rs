//! What a person watching the coordinator sees: a progress bar on a
//! terminal, periodic log lines otherwise.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

use crate::reports::StepSummary;

/// Shows completed steps.
pub struct Progress {
    bar: Option<ProgressBar>,
    log_every: u64,
}

impl Progress {
    /// A bar over `steps` (starting at `first_step` for a resumed run) when
    /// stderr is a terminal, log lines every `log_every` steps when it is not.
    pub fn new(steps: u64, log_every: u64, first_step: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(steps);
            bar.set_position(first_step);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} steps {msg} [{elapsed_precise}<{eta_precise}]",
                )
                .expect("valid progress template"),
            );
            bar
        });
        Self { bar, log_every }
    }

    /// Records one completed step.
    pub fn step(&self, s: &StepSummary) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(s.step + 1);
                bar.set_message(format!(
                    "epoch {} | {:.0} img/s | D {:.3} G {:.3} | all-reduce {:.0} ms",
                    s.epoch, s.images_per_s, s.d_loss, s.g_loss, s.allreduce_ms
                ));
            }
            None if (s.step + 1).is_multiple_of(self.log_every) => tracing::info!(
                step = s.step + 1,
                epoch = s.epoch,
                d_loss = s.d_loss,
                g_loss = s.g_loss,
                images_per_s = format!("{:.1}", s.images_per_s),
                allreduce_ms = format!("{:.1}", s.allreduce_ms),
                "step"
            ),
            None => {}
        }
    }

    /// Clears the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
