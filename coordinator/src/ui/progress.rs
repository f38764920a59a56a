//! The coordinator's view of a run while it trains: one live display on a
//! terminal, a plain line every `train.log_every` steps otherwise.
//!
//! Both say the same things, rounded to what a person reads: step and
//! epoch, images/s over the group, D and G loss, D(x) and D(G(z)), the
//! slowest rank's all-reduce wait, how many workers are alive, and the last
//! checkpoint committed.

use std::sync::Mutex;

use common::process::logging::significant;
use indicatif::{ProgressBar, ProgressStyle};

use crate::generation::reports::StepSummary;
use crate::ui::display::{self, Echo};

/// Shows completed steps.
pub struct Progress {
    bar: Option<ProgressBar>,
    log_every: u64,
    state: Mutex<State>,
}

struct State {
    workers: usize,
    alive: usize,
    checkpoint: Option<String>,
    last: Option<StepSummary>,
}

impl Progress {
    /// A display over `steps` steps of `workers` workers, starting at
    /// `first_step` (a resumed run): live when `echo` says there is a
    /// terminal to show it on, log lines every `log_every` steps otherwise.
    pub fn new(steps: u64, log_every: u64, first_step: u64, workers: usize, echo: &Echo) -> Self {
        let bar = echo.shows_progress().then(|| {
            let bar = ProgressBar::new(steps);
            bar.set_position(first_step);
            bar.set_style(
                ProgressStyle::with_template("{bar:20} {pos}/{len} {msg} {elapsed}<{eta}")
                    .expect("valid progress template"),
            );
            display::show(&bar);
            bar
        });
        Self {
            bar,
            log_every,
            state: Mutex::new(State {
                workers,
                alive: workers,
                checkpoint: None,
                last: None,
            }),
        }
    }

    /// Records one completed step.
    pub fn step(&self, s: &StepSummary) {
        let mut state = self.state.lock().expect("progress lock");
        state.last = Some(s.clone());
        match &self.bar {
            Some(bar) => {
                bar.set_position(s.step + 1);
                bar.set_message(state.line(s));
            }
            None if (s.step + 1).is_multiple_of(self.log_every) => tracing::info!(
                step = s.step + 1,
                epoch = s.epoch,
                d_loss = s.d_loss,
                g_loss = s.g_loss,
                d_real = s.d_real,
                d_fake = s.d_fake,
                images_per_s = s.images_per_s,
                allreduce_ms = s.allreduce_ms,
                workers = state.alive,
                checkpoint = state.checkpoint.as_deref().unwrap_or("none"),
                "step"
            ),
            None => {}
        }
    }

    /// A checkpoint was committed.
    pub fn checkpoint(&self, name: String) {
        let mut state = self.state.lock().expect("progress lock");
        state.checkpoint = Some(name);
        self.refresh(&state);
    }

    /// A generation of `world` workers formed, starting at `first_step`
    /// (behind the display only when it fell back to a checkpoint).
    pub fn formed(&self, first_step: u64, world: usize) {
        let mut state = self.state.lock().expect("progress lock");
        state.alive = world;
        if let Some(bar) = &self.bar {
            bar.set_position(first_step);
        }
        self.refresh(&state);
    }

    /// The group re-forms: no worker trains until the next generation forms.
    pub fn regrouped(&self) {
        let mut state = self.state.lock().expect("progress lock");
        state.alive = 0;
        self.refresh(&state);
    }

    fn refresh(&self, state: &State) {
        if let (Some(bar), Some(last)) = (&self.bar, &state.last) {
            bar.set_message(state.line(last));
        }
    }

    /// Takes the display off the terminal, leaving its last state there.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
            display::hide();
        }
    }
}

impl State {
    fn line(&self, s: &StepSummary) -> String {
        let checkpoint = self
            .checkpoint
            .as_deref()
            .and_then(common::storage::checkpoint::parse_name)
            .map_or_else(|| "none".to_string(), |step| step.to_string());
        format!(
            "ep {} | {} img/s | D {} G {} | D(x) {} D(G(z)) {} | allreduce {} ms | {}/{} workers | ckpt {checkpoint} |",
            s.epoch,
            significant(s.images_per_s),
            significant(f64::from(s.d_loss)),
            significant(f64::from(s.g_loss)),
            significant(f64::from(s.d_real)),
            significant(f64::from(s.d_fake)),
            significant(s.allreduce_ms),
            self.alive,
            self.workers,
        )
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if self.bar.is_some() {
            display::hide();
        }
    }
}
