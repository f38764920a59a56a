//! Watching one generation from forming to its end.
//!
//! [`Lifecycle`] is the run's state machine: it takes events (from the
//! handlers, the clocks and the operator's signal) and says what happens
//! next, with no sockets involved, so every rule of how a run ends is unit
//! tested here. [`Supervision`] is the async loop that feeds it and carries
//! out what it decides (commit a checkpoint, conclude, fail).

use std::future::Future;
use std::time::Duration;

use common::Config;
use common::checkpoint::{self, Checkpoints};
use common::lease::Lease;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep};
use tracing::info;

use crate::display::Echo;
use crate::error::{CoordinatorError, GroupFailure};
use crate::progress::Progress;
use crate::reports::StepSummary;
use crate::run::{Outcome, Report};
use crate::schedule::Schedule;
use crate::service::{Event, Group};

/// Where a generation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for every rank to join (`coordinator.join_timeout_s`).
    Forming,
    /// Every rank joined; waiting for every session (`handshake_timeout_s`).
    Opening,
    /// Steps are being trained (`step_timeout_s` between steps).
    Training,
    /// The last step is done: waiting for every rank's Finished and the
    /// last checkpoint.
    Finishing,
}

/// What the loop does after an event.
#[derive(Debug)]
pub enum Next {
    /// Nothing more.
    Continue,
    /// Rank 0 wrote checkpoint `step`: move `latest` to it.
    Commit(u64),
    /// Every rank finished: decide the outcome.
    Conclude,
    /// The generation failed.
    Fail(CoordinatorError),
}

/// The rules of one generation, without I/O.
#[derive(Debug)]
pub struct Lifecycle {
    phase: Phase,
    done: u64,
    last: Option<StepSummary>,
    throughput: (f64, u64),
    finished: Vec<bool>,
    committed: Option<u64>,
    failed_checkpoint: Option<(u64, String)>,
}

impl Lifecycle {
    /// A generation of `workers` that starts training at `first_step`.
    pub fn new(workers: usize, first_step: u64) -> Self {
        Self {
            phase: Phase::Forming,
            done: first_step,
            last: None,
            throughput: (0.0, 0),
            finished: vec![false; workers],
            committed: None,
            failed_checkpoint: None,
        }
    }

    /// Where the generation is.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Steps completed (the group's, not one rank's).
    pub fn done(&self) -> u64 {
        self.done
    }

    /// Every rank joined.
    pub fn formed(&mut self) {
        if self.phase == Phase::Forming {
            self.phase = Phase::Opening;
        }
    }

    /// The next step given `event`; `final_step` is where the group stops.
    pub fn on(&mut self, event: Event, final_step: u64) -> Next {
        match event {
            Event::SessionsOpen => {
                self.phase = Phase::Training;
                Next::Continue
            }
            Event::StepDone(summary) => {
                self.done = summary.step + 1;
                self.throughput.0 += summary.images_per_s;
                self.throughput.1 += 1;
                self.last = Some(summary);
                if self.done >= final_step {
                    self.phase = Phase::Finishing;
                }
                Next::Continue
            }
            Event::CheckpointWritten { step, error: None } => Next::Commit(step),
            Event::CheckpointWritten {
                step,
                error: Some(reason),
            } => {
                self.checkpoint_failed(step, reason);
                Next::Continue
            }
            Event::StopRequested { .. } => Next::Continue,
            Event::Finished { rank } => {
                self.finished[rank] = true;
                if !self.finished.iter().all(|f| *f) {
                    return Next::Continue;
                }
                if self.done < final_step {
                    return Next::Fail(
                        GroupFailure::WorkerLost {
                            rank,
                            reason: format!(
                                "every worker said it finished, but the group completed only {} of \
                                 {final_step} steps",
                                self.done
                            ),
                        }
                        .into(),
                    );
                }
                Next::Conclude
            }
            Event::Failed(err) => Next::Fail(err),
        }
    }

    /// Checkpoint `step` is in the store and `latest` names it.
    pub fn checkpoint_committed(&mut self, step: u64) {
        self.committed = Some(step);
    }

    /// Checkpoint `step` could not be written (or was not there once rank
    /// 0 said it was): `latest` keeps naming the previous one.
    pub fn checkpoint_failed(&mut self, step: u64, reason: String) {
        tracing::warn!(checkpoint = %checkpoint::name(step), %reason,
            "a checkpoint could not be saved; `latest` still names the previous one");
        self.failed_checkpoint = Some((step, reason));
    }

    /// The last step's summary.
    pub fn last(&self) -> Option<&StepSummary> {
        self.last.as_ref()
    }

    /// Mean group throughput over the steps this generation trained.
    pub fn images_per_s(&self) -> f64 {
        let (sum, steps) = self.throughput;
        if steps == 0 { 0.0 } else { sum / steps as f64 }
    }

    /// The newest checkpoint committed in this generation.
    pub fn committed(&self) -> Option<u64> {
        self.committed
    }

    /// Why a checkpoint failed, if one did.
    pub fn failed_checkpoint(&self) -> Option<&(u64, String)> {
        self.failed_checkpoint.as_ref()
    }
}

/// The async loop around a [`Lifecycle`].
pub struct Supervision<'a> {
    /// The run's configuration.
    pub cfg: &'a Config,
    /// The generation.
    pub group: &'a Group,
    /// Its checkpoint plan.
    pub schedule: &'a Schedule,
    /// Where checkpoints are committed.
    pub checkpoints: &'a Checkpoints,
    /// Group size.
    pub workers: usize,
    /// The step training starts at.
    pub first_step: u64,
    /// The run's lease, when the run holds one: losing it ends the run at
    /// once, without writing anything more.
    pub lease: Option<&'a Lease>,
    /// What reaches the terminal.
    pub echo: &'a Echo,
}

impl Supervision<'_> {
    /// Runs until the generation ends, feeding `events`, the clocks and
    /// `shutdown` to the lifecycle.
    pub async fn supervise<S: Future<Output = ()>>(
        &self,
        mut events: mpsc::Receiver<Event>,
        mut shutdown: impl FnMut() -> S,
    ) -> Result<Report, CoordinatorError> {
        let (cfg, group, workers) = (self.cfg, self.group, self.workers);
        let co = &cfg.coordinator;
        let join_timeout = Duration::from_secs(co.join_timeout_s);
        let handshake = Duration::from_secs(co.handshake_timeout_s);
        let step_timeout = Duration::from_secs(co.step_timeout_s);
        let join_deadline = sleep(join_timeout);
        let clock = sleep(step_timeout);
        let signal = shutdown();
        let lease_lost = async {
            match self.lease {
                Some(lease) => lease.lost().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(join_deadline, clock, signal, lease_lost);
        let mut life = Lifecycle::new(workers, self.first_step);
        let progress = Progress::new(
            cfg.train.steps,
            cfg.train.log_every,
            self.first_step,
            workers,
            self.echo,
        );
        loop {
            let phase = life.phase();
            tokio::select! {
                event = events.recv() => {
                    let event = event.expect("the group holds a sender");
                    match &event {
                        Event::StepDone(summary) => {
                            progress.step(summary);
                            clock.as_mut().reset(Instant::now() + step_timeout);
                        }
                        Event::SessionsOpen => clock.as_mut().reset(Instant::now() + step_timeout),
                        Event::StopRequested { rank, reason } if self.schedule.request_stop() => {
                            info!(rank, %reason, "stop requested by a worker: the group checkpoints \
                                and stops after the current step");
                        }
                        _ => {}
                    }
                    match life.on(event, self.schedule.final_step()) {
                        Next::Continue => {}
                        Next::Commit(step) => match self.commit(step).await {
                            Ok(()) => {
                                life.checkpoint_committed(step);
                                progress.checkpoint(checkpoint::name(step));
                            }
                            Err(reason) => life.checkpoint_failed(step, reason),
                        },
                        Next::Conclude => {
                            progress.finish();
                            return self.outcome(&life).await;
                        }
                        Next::Fail(err) => return Err(err),
                    }
                }
                _ = &mut join_deadline, if phase == Phase::Forming => {
                    let (hosts, missing) = group.rendezvous.who();
                    return Err(CoordinatorError::JoinTimeout {
                        expected: workers,
                        joined: hosts.len(),
                        hosts: if hosts.is_empty() { "none".into() } else { hosts.join(", ") },
                        missing,
                        seconds: join_timeout.as_secs(),
                    });
                }
                () = group.rendezvous.formed(), if phase == Phase::Forming => {
                    life.formed();
                    // Every member must open its session soon after the group forms.
                    clock.as_mut().reset(Instant::now() + handshake);
                }
                _ = &mut clock, if matches!(phase, Phase::Opening | Phase::Training) => {
                    return Err(self.overdue(&life, handshake, step_timeout));
                }
                reason = &mut lease_lost => {
                    return Err(CoordinatorError::LeaseLost(reason));
                }
                _ = &mut signal => {
                    if !group.rendezvous.is_formed() || !self.schedule.request_stop() {
                        return Err(CoordinatorError::Interrupted);
                    }
                    info!("stop requested: the group checkpoints and stops after the current step \
                        (signal again to stop at once, without a checkpoint)");
                    signal.set(shutdown());
                }
            }
        }
    }

    /// The checkpoint a rerun would resume from, named only once the store
    /// confirms it is still there (the store itself may be what failed).
    async fn newest_readable(&self, committed: Option<u64>) -> String {
        let step = match committed {
            Some(step) => step,
            None => match self.checkpoints.latest().await {
                Ok(Some(name)) => match checkpoint::parse_name(&name) {
                    Some(step) => step,
                    None => {
                        return format!(
                            "unknown (`latest` holds {})",
                            common::untrusted::shown(&name)
                        );
                    }
                },
                Ok(None) => return "none".into(),
                Err(e) => return format!("unknown (reading `latest` failed: {e})"),
            },
        };
        let name = checkpoint::name(step);
        match self.checkpoints.confirm(step).await {
            Ok(()) => name,
            Err(e) if e.is_absent() => format!("none that can still be read ({name} is gone: {e})"),
            // Unreachable is not gone: name it, and say it could not be checked.
            Err(e) => format!("{name} (not confirmed now: {e})"),
        }
    }

    /// What the clock ran out on: sessions that never opened, or a step
    /// that never completed.
    fn overdue(
        &self,
        life: &Lifecycle,
        handshake: Duration,
        step_timeout: Duration,
    ) -> CoordinatorError {
        let group = self.group;
        if life.phase() == Phase::Opening {
            return GroupFailure::NoSession {
                ranks: group.peers.missing(),
                seconds: handshake.as_secs(),
            }
            .into();
        }
        let waiting = group.waiting().map_or_else(
            || "no gradient is in flight, so every rank is between all-reduces".into(),
            |w| w.to_string(),
        );
        GroupFailure::Stalled {
            seconds: step_timeout.as_secs(),
            done: life.done(),
            waiting,
        }
        .into()
    }

    /// Records a checkpoint rank 0 says it wrote, once the store confirms
    /// it is complete: `latest` moves to it, old ones go.
    async fn commit(&self, step: u64) -> Result<(), String> {
        let location = self.checkpoints.location(step);
        self.checkpoints.confirm(step).await.map_err(|e| {
            format!("rank 0 reported it written, but the store does not hold it complete: {e}")
        })?;
        match self
            .checkpoints
            .commit(step, self.cfg.checkpoint.keep)
            .await
        {
            Ok(removed) => info!(checkpoint = %location, ?removed, "checkpoint committed"),
            // The manifest is written, so a resume still finds it; only the pointer lags.
            Err(error) => {
                tracing::warn!(checkpoint = %location, %error, "could not update `latest`")
            }
        }
        Ok(())
    }

    /// Success only when the last checkpoint asked for is in the store.
    async fn outcome(&self, life: &Lifecycle) -> Result<Report, CoordinatorError> {
        let committed = life.committed();
        let wanted = self.schedule.last_checkpoint();
        if let Some(step) = wanted.filter(|w| Some(*w) != committed) {
            let reason = match life.failed_checkpoint() {
                Some((s, reason)) if *s == step => reason.clone(),
                _ => "rank 0 finished without reporting it".into(),
            };
            let newest = self.newest_readable(committed).await;
            return Err(CoordinatorError::FinalCheckpoint {
                step,
                reason,
                committed: newest,
            });
        }
        let skipped = self.group.skipped();
        if skipped > 0 {
            tracing::warn!(
                skipped,
                "optimizer steps were skipped for non-finite gradients"
            );
        }
        let outcome = match self.schedule.stopped_after() {
            Some(steps) => {
                info!(
                    steps,
                    "stopped on request after checkpointing; run the same command to resume"
                );
                Outcome::Stopped { steps }
            }
            None => {
                info!(steps = self.cfg.train.steps, "training finished");
                Outcome::Finished {
                    steps: self.cfg.train.steps,
                }
            }
        };
        let swd = match committed {
            Some(step) => match self.checkpoints.read_state(step).await {
                Ok(state) => state.swd,
                Err(error) => {
                    tracing::warn!(%error, "could not read the final checkpoint's state for the summary");
                    None
                }
            },
            None => None,
        };
        Ok(Report {
            outcome,
            images_per_s: life.images_per_s(),
            last: life.last().cloned(),
            restarts: 0,
            skipped,
            checkpoint: committed.map(|step| self.checkpoints.location(step)),
            swd,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reports::StepSummary;

    fn step(step: u64) -> Event {
        Event::StepDone(StepSummary {
            step,
            epoch: 0,
            d_loss: 1.0,
            g_loss: 1.0,
            d_real: 0.5,
            d_fake: 0.5,
            images_per_s: 1.0,
            allreduce_ms: 1.0,
        })
    }

    #[test]
    fn a_generation_goes_from_forming_to_finishing_and_concludes_when_all_finished() {
        let mut life = Lifecycle::new(2, 0);
        assert_eq!(life.phase(), Phase::Forming);
        life.formed();
        assert_eq!(life.phase(), Phase::Opening);
        assert!(matches!(life.on(Event::SessionsOpen, 2), Next::Continue));
        assert_eq!(life.phase(), Phase::Training);
        life.on(step(0), 2);
        life.on(step(1), 2);
        assert_eq!(life.phase(), Phase::Finishing);
        assert!(matches!(
            life.on(Event::Finished { rank: 1 }, 2),
            Next::Continue
        ));
        assert!(matches!(
            life.on(Event::Finished { rank: 0 }, 2),
            Next::Conclude
        ));
    }

    /// Finishing counts ranks, not messages, and needs every step done.
    #[test]
    fn finishing_before_the_last_step_fails_the_generation() {
        let mut life = Lifecycle::new(2, 0);
        life.on(Event::SessionsOpen, 50);
        assert!(matches!(
            life.on(Event::Finished { rank: 1 }, 50),
            Next::Continue
        ));
        assert!(matches!(
            life.on(Event::Finished { rank: 1 }, 50),
            Next::Continue
        ));
        match life.on(Event::Finished { rank: 0 }, 50) {
            Next::Fail(err) => assert!(err.to_string().contains("only 0 of 50 steps"), "{err}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn written_checkpoints_are_committed_and_failures_remembered() {
        let mut life = Lifecycle::new(1, 0);
        assert!(matches!(
            life.on(
                Event::CheckpointWritten {
                    step: 4,
                    error: None
                },
                8
            ),
            Next::Commit(4)
        ));
        assert_eq!(life.committed(), None, "not before the store confirms it");
        life.checkpoint_committed(4);
        life.on(
            Event::CheckpointWritten {
                step: 8,
                error: Some("disk full".into()),
            },
            8,
        );
        assert_eq!(life.committed(), Some(4));
        assert_eq!(
            life.failed_checkpoint(),
            Some(&(8, "disk full".to_string()))
        );
    }
}
