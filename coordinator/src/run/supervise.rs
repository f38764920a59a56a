//! The async loop that feeds the run's [`Lifecycle`] its events (handlers,
//! local processes, clocks, the operator's signal) and carries out what it
//! decides: start the next generation, launch or stop processes, record it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use common::Config;
use common::storage::checkpoint::{self, Checkpoints};
use common::storage::lease::Lease;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep};
use tracing::{info, warn};

use crate::allreduce::schedule::Schedule;
use crate::error::{CoordinatorError, GroupFailure};
use crate::generation::events::{Event, Notice, Origin};
use crate::generation::group::{Group, Settings};
use crate::generation::origin::StoredStart;
use crate::local::launcher::Launcher;
use crate::net::service::Current;
use crate::refusals::Refusals;
use crate::run::outcome::{Outcome, Report};
use crate::run::outputs::Membership;
use crate::ui::display::Echo;
use crate::ui::progress::Progress;
use crate::ui::telemetry;

use super::lifecycle::{Lifecycle, Next, Phase, Regroup, RunFacts};

/// Everything a run's supervision works with.
pub struct Supervision<'a> {
    /// The run's configuration.
    pub cfg: &'a Config,
    /// Its generations' settings.
    pub settings: Settings,
    /// Its checkpoint plan.
    pub schedule: Arc<Schedule>,
    /// Where checkpoints are committed.
    pub checkpoints: &'a Checkpoints,
    /// Where the run starts when no replica is trusted.
    pub start: StoredStart,
    /// The generation the servers serve.
    pub current: Arc<Current>,
    /// Local mode's processes.
    pub launcher: Option<Launcher>,
    /// The run's lease, when the run holds one: losing it ends the run at
    /// once, without writing anything more.
    pub lease: Option<&'a Lease>,
    /// What reaches the terminal.
    pub echo: &'a Echo,
    /// Where new generations report.
    pub events: mpsc::Sender<Notice>,
    /// Refused connections, run-wide.
    pub refusals: Arc<Refusals>,
    /// The record of every generation.
    pub membership: Membership,
}

/// What the loop does once the lifecycle decided.
enum Acted {
    Goes,
    /// The next generation forms; the cause is recorded with it.
    Regrouped(&'static str),
    Ended(Report),
}

impl Supervision<'_> {
    /// Runs until the run ends, feeding `events`, the clocks and
    /// `shutdown` to the lifecycle.
    pub async fn supervise<S: Future<Output = ()>>(
        &mut self,
        mut events: mpsc::Receiver<Notice>,
        mut shutdown: impl FnMut() -> S,
    ) -> Result<Report, CoordinatorError> {
        let co = &self.cfg.coordinator;
        let join_timeout = Duration::from_secs(co.join_timeout_s);
        let rejoin_timeout = Duration::from_secs(co.rejoin_timeout_s);
        let handshake = Duration::from_secs(co.handshake_timeout_s);
        let step_timeout = Duration::from_secs(co.step_timeout_s);
        let deadline = sleep(join_timeout);
        let clock = sleep(step_timeout);
        let signal = shutdown();
        let lease = self.lease;
        let lease_lost = async {
            match lease {
                Some(lease) => lease.lost().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline, clock, signal, lease_lost);
        let mut life = Lifecycle::new(co.max_restarts);
        let mut skipped = 0;
        // What a user waits for before step 0: workers starting, joining,
        // loading, and (on a GPU with a cold kernel cache) tuning.
        let began = Instant::now();
        let mut first_step = None;
        let mut why = "start";
        let progress = Progress::new(
            self.cfg.train.steps,
            self.cfg.train.log_every,
            self.start.first_step,
            self.settings.max,
            self.echo,
        );
        loop {
            let group = self.current.get();
            let phase = life.phase();
            let next = tokio::select! {
                // The group's formation comes before any news of it: its
                // first members may open their sessions (and send events)
                // before this loop has seen it form.
                biased;
                () = group.formed_signal(), if phase == Phase::Forming => {
                    let formed = group.formed().expect("signalled once formed");
                    life.formed(formed.world, &formed.start, group.rendezvous.arrivals());
                    self.membership.record(life.generation(), formed.world, &formed.start, why);
                    info!(generation = life.generation(), workers = formed.world,
                        first_step = formed.start.first_step, state = formed.start.describe(),
                        steps_retrained = formed.start.retrained, "the group formed");
                    progress.formed(formed.start.first_step, formed.world);
                    telemetry::formed(life.generation(), formed.world);
                    // Every member must open its session soon after the group forms.
                    clock.as_mut().reset(Instant::now() + handshake);
                    continue;
                }
                notice = events.recv() => {
                    let notice = notice.expect("the run holds a sender");
                    let Some((origin, event)) = self.attribute(notice, &group, &mut life).await? else {
                        continue;
                    };
                    if origin == life.generation() {
                        match &event {
                            Event::StepDone(summary) => {
                                first_step.get_or_insert_with(|| began.elapsed());
                                progress.step(summary);
                                telemetry::step(summary);
                                clock.as_mut().reset(Instant::now() + step_timeout);
                            }
                            Event::SessionsOpen | Event::Transferring { .. } => {
                                clock.as_mut().reset(Instant::now() + step_timeout);
                            }
                            Event::StopRequested { rank, reason } if self.schedule.request_stop() => {
                                info!(rank, %reason, "stop requested by a worker: the group checkpoints \
                                    and stops after the current step");
                            }
                            _ => {}
                        }
                    }
                    life.on(origin, event, self.schedule.final_step())
                }
                _ = &mut deadline, if phase == Phase::Forming => {
                    // An elapsed timer stays ready: the next regroup sets it again.
                    deadline.as_mut().reset(Instant::now() + join_timeout.max(rejoin_timeout));
                    if let Err(joined) = group.close() {
                        let (hosts, missing) = group.rendezvous.who();
                        let waited = match life.generation() {
                            1 => join_timeout,
                            _ => rejoin_timeout,
                        };
                        return Err(CoordinatorError::JoinTimeout {
                            expected: self.settings.min,
                            joined,
                            hosts: if hosts.is_empty() { "none".into() } else { hosts.join(", ") },
                            missing,
                            seconds: waited.as_secs(),
                        });
                    }
                    continue;
                }
                _ = &mut clock, if matches!(phase, Phase::Opening | Phase::Training) => {
                    let failure = self.overdue(&life, &group, handshake, step_timeout);
                    life.failed(failure, self.schedule.final_step())
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
                    continue;
                }
            };
            match self
                .act(next, &mut life, &group, &progress, &mut skipped, first_step)
                .await?
            {
                Acted::Goes => {}
                Acted::Regrouped(cause) => {
                    why = cause;
                    deadline.as_mut().reset(Instant::now() + rejoin_timeout);
                }
                Acted::Ended(report) => return Ok(report),
            }
        }
    }

    /// Carries out the lifecycle's decision.
    async fn act(
        &mut self,
        next: Next,
        life: &mut Lifecycle,
        group: &Group,
        progress: &Progress,
        skipped: &mut u64,
        first_step: Option<Duration>,
    ) -> Result<Acted, CoordinatorError> {
        match next {
            Next::Continue => Ok(Acted::Goes),
            Next::Commit(step) => {
                match self.commit(step).await {
                    Ok(()) => {
                        life.checkpoint_committed(step);
                        progress.checkpoint(checkpoint::name(step));
                        telemetry::checkpoint(step);
                    }
                    Err(reason) => life.checkpoint_failed(step, reason),
                }
                Ok(Acted::Goes)
            }
            Next::Conclude => {
                progress.finish();
                *skipped += group.skipped();
                Ok(Acted::Ended(
                    self.outcome(life, *skipped, first_step).await?,
                ))
            }
            Next::Fail(err) => Err(err),
            Next::Regroup(regroup) => {
                *skipped += group.skipped();
                let cause = regroup.cause;
                self.regroup(regroup, life, group).await?;
                progress.regrouped();
                telemetry::regrouped();
                Ok(Acted::Regrouped(cause))
            }
        }
    }

    /// Opens the next generation, then tells the old one (its members
    /// rejoin at once, and must find the new one) and refills lost places
    /// (local mode).
    async fn regroup(
        &mut self,
        regroup: Regroup,
        life: &mut Lifecycle,
        old: &Group,
    ) -> Result<(), CoordinatorError> {
        warn!(generation = life.generation(), lost = ?regroup.lost, reason = %regroup.reason,
            "the group re-forms");
        life.reduced(old.formed().and_then(|f| f.reducer.progress()));
        if regroup.refuse_donor {
            life.refuse(old.formed().and_then(|f| f.donated));
        }
        life.regrouped(regroup.cause);
        let facts = RunFacts::of(&self.settings, self.cfg);
        let known = life.knowledge(&self.start, regroup.trust_replicas, &facts);
        self.current.replace(Arc::new(Group::new(
            life.generation(),
            old.seats(&regroup.lost),
            self.settings.clone(),
            known,
            self.schedule.clone(),
            self.events.clone(),
            self.refusals.clone(),
        )));
        old.regroup(regroup.reason.clone()).await;
        if let Some(launcher) = &mut self.launcher {
            for &rank in &regroup.lost {
                if let Some(place) = old.rendezvous.place_of(rank) {
                    info!(place, "starting a replacement worker");
                    launcher.replace(place).await?;
                }
            }
        }
        Ok(())
    }

    /// Which generation `notice` is about, and what it says; `None` when
    /// it is stale, or handled here (a local process that died before it
    /// was a member is replaced).
    async fn attribute(
        &mut self,
        notice: Notice,
        group: &Group,
        life: &mut Lifecycle,
    ) -> Result<Option<(u64, Event)>, CoordinatorError> {
        let (place, process_life) = match notice.origin {
            Origin::Generation(generation) => return Ok(Some((generation, notice.event))),
            Origin::Process { place, life } => (place, life),
        };
        let Some(launcher) = self.launcher.as_mut() else {
            return Ok(None);
        };
        if !launcher.is_current(place, process_life) {
            return Ok(None);
        }
        let rank = group.formed().and_then(|_| group.rendezvous.rank_at(place));
        let event = match (notice.event, rank) {
            (Event::Failed(CoordinatorError::Group(failure)), Some(rank)) => {
                Event::Failed(failure.of_rank(rank).into())
            }
            (event, Some(_)) => event,
            // Not a member yet: it is replaced, within the budget.
            (Event::Failed(err), None) => {
                if !life.spend_restart() {
                    return Err(err);
                }
                warn!(place, %err, "a worker died before it joined; starting a replacement");
                launcher.replace(place).await?;
                return Ok(None);
            }
            (_, None) => return Ok(None),
        };
        Ok(Some((group.generation(), event)))
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
                            common::security::untrusted::shown(&name)
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

    /// What the clock ran out on: sessions that never opened, a replica
    /// that never arrived, or a step that never completed.
    fn overdue(
        &self,
        life: &Lifecycle,
        group: &Group,
        handshake: Duration,
        step_timeout: Duration,
    ) -> GroupFailure {
        let world = group.formed().map_or(0, |f| f.world);
        if life.phase() == Phase::Opening {
            if let Some(donor) = life.donor() {
                return GroupFailure::WorkerLost {
                    rank: donor,
                    reason: format!(
                        "it did not send its replica within {} s (coordinator.step_timeout_s)",
                        step_timeout.as_secs()
                    ),
                };
            }
            let ranks = group.formed().map_or_else(Vec::new, |f| f.peers.missing());
            let hosts: Vec<String> = ranks.iter().map(|&r| group.rendezvous.host_of(r)).collect();
            return GroupFailure::NoSession {
                ranks,
                hosts: hosts.join(", "),
                seconds: handshake.as_secs(),
            };
        }
        let waiting = group.waiting();
        let ranks = waiting
            .as_ref()
            .map_or_else(|| (0..world).collect(), |w| w.ranks.clone());
        GroupFailure::Stalled {
            seconds: step_timeout.as_secs(),
            done: life.done(),
            waiting: waiting.map_or_else(
                || "no gradient is in flight, so every rank is between all-reduces".into(),
                |w| w.to_string(),
            ),
            ranks,
        }
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
            Err(error) => warn!(checkpoint = %location, %error, "could not update `latest`"),
        }
        Ok(())
    }

    /// Success only when the last checkpoint asked for is in the store.
    async fn outcome(
        &self,
        life: &Lifecycle,
        skipped: u64,
        first_step: Option<Duration>,
    ) -> Result<Report, CoordinatorError> {
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
        if skipped > 0 {
            warn!(
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
                    warn!(%error, "could not read the final checkpoint's state for the summary");
                    None
                }
            },
            None => None,
        };
        Ok(Report {
            outcome,
            images_per_s: life.images_per_s(),
            last: life.last().cloned(),
            restarts: life.restarts(),
            generations: life.generation(),
            retrained: life.retrained(),
            skipped,
            checkpoint: committed.map(|step| self.checkpoints.location(step)),
            swd,
            first_step,
        })
    }
}
