//! Fault injection for tests, compiled only with the `faults` feature (the
//! test crate enables it; a release build contains none of this).
//!
//! `GANCLUSTER_FAULT=<kind>:<rank>:<step>` makes that rank misbehave at
//! that step: `diverge` nudges its discriminator after the step (the
//! coordinator's checksum comparison must catch it), `exit` exits abruptly
//! after the step (a worker dying mid-run), `hang` blocks its training
//! thread for good while its network runtime keeps heartbeating (a stuck
//! GPU), `nan` puts a NaN in its discriminator gradient of the step, `kill`
//! sends the process SIGKILL in the middle of the step (its discriminator
//! updated, its generator gradient on the way: `kill -9` at the worst
//! moment). The
//! fault wraps the training loop's seam ([`StepSync`]), so it fires where a
//! real fault would: during a reduce, or between steps. Faults fire in a
//! process's first generation only, so a group that re-forms runs clean.

use anyhow::Context;
use bytes::Bytes;
use common::DataCursor;

use crate::model::backend::TrainBackend;
use crate::model::params;
use crate::train::replica_loop::{Directive, StepRecord, StepSync};
use crate::train::step::{GradientReducer, Trainer, Update};
use common::protocol::wire::Net;

/// The variable that arms a fault.
pub const FAULT_ENV: &str = "GANCLUSTER_FAULT";

/// An injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Diverge(u64),
    Exit(u64),
    Hang(u64),
    Nan(u64),
    Kill(u64),
}

/// `inner` with this rank's armed fault, if any.
pub struct Faulty<'a, S> {
    inner: &'a mut S,
    fault: Option<Fault>,
}

impl<'a, S> Faulty<'a, S> {
    /// Wraps `inner` for `rank` in `generation`, reading [`FAULT_ENV`].
    pub fn wrap(inner: &'a mut S, rank: usize, generation: u64) -> anyhow::Result<Self> {
        Ok(Self {
            inner,
            fault: armed(rank, generation)?,
        })
    }
}

impl<S: GradientReducer> GradientReducer for Faulty<'_, S> {
    fn reduce(&mut self, step: u64, net: Net, mut grads: Vec<f32>) -> anyhow::Result<Update> {
        if self.fault == Some(Fault::Nan(step)) && net == Net::Discriminator {
            tracing::warn!(step, "{FAULT_ENV}: sending a NaN in this rank's gradient");
            grads[0] = f32::NAN;
        }
        if self.fault == Some(Fault::Kill(step)) && net == Net::Generator {
            tracing::warn!(step, "{FAULT_ENV}: SIGKILL in the middle of the step");
            // SAFETY: kill(2) on our own pid has no memory effects.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
        self.inner.reduce(step, net, grads)
    }
}

impl<S: StepSync> StepSync for Faulty<'_, S> {
    fn before_step(&mut self, step: u64, cursor: DataCursor, trainer: &Trainer<TrainBackend>) {
        self.inner.before_step(step, cursor, trainer);
    }

    fn after_step(
        &mut self,
        record: &StepRecord,
        trainer: &mut Trainer<TrainBackend>,
    ) -> anyhow::Result<Directive> {
        match self.fault {
            Some(Fault::Diverge(step)) if step == record.step => {
                tracing::warn!(step, "{FAULT_ENV}: perturbing this replica's discriminator");
                let nudge = vec![1e-3; params::trainable_len(trainer.discriminator())];
                trainer.apply_discriminator(&nudge);
            }
            Some(Fault::Exit(step)) if step == record.step => {
                tracing::warn!(step, "{FAULT_ENV}: exiting abruptly");
                std::process::exit(3);
            }
            Some(Fault::Hang(step)) if step == record.step => {
                tracing::warn!(step, "{FAULT_ENV}: blocking the training thread for good");
                loop {
                    std::thread::park();
                }
            }
            _ => {}
        }
        self.inner.after_step(record, trainer)
    }

    fn waited_ms(&self) -> f64 {
        self.inner.waited_ms()
    }

    fn average(&mut self, step: u64, trainer: &mut Trainer<TrainBackend>) -> anyhow::Result<()> {
        if self.fault == Some(Fault::Kill(step)) {
            tracing::warn!(step, "{FAULT_ENV}: SIGKILL before averaging");
            // SAFETY: kill(2) on our own pid has no memory effects.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
        self.inner.average(step, trainer)
    }

    fn checkpoint(&mut self, steps: u64, objects: Vec<(String, Bytes)>) -> anyhow::Result<()> {
        self.inner.checkpoint(steps, objects)
    }
}

/// This rank's fault in this `generation`, from [`FAULT_ENV`].
fn armed(rank: usize, generation: u64) -> anyhow::Result<Option<Fault>> {
    let Ok(value) = std::env::var(FAULT_ENV) else {
        return Ok(None);
    };
    let parse = || -> Option<(Fault, usize)> {
        let mut parts = value.split(':');
        let (kind, r, step) = (
            parts.next()?,
            parts.next()?.parse().ok()?,
            parts.next()?.parse().ok()?,
        );
        let fault = match kind {
            "diverge" => Fault::Diverge(step),
            "exit" => Fault::Exit(step),
            "hang" => Fault::Hang(step),
            "nan" => Fault::Nan(step),
            "kill" => Fault::Kill(step),
            _ => return None,
        };
        Some((fault, r))
    };
    let (fault, r) = parse().with_context(|| {
        format!("{FAULT_ENV}={value}: expected diverge|exit|hang|nan|kill:<rank>:<step>")
    })?;
    Ok((r == rank && generation == 1).then_some(fault))
}
