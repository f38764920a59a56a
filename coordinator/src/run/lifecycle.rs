//! Watching a run from its first generation to its end.
//!
//! [`Lifecycle`] is the run's state machine. It takes events (from the
//! handlers, the local processes and the step clock) and says what happens
//! next, with no sockets involved, so the rules of how a generation forms,
//! trains, fails, re-forms and ends are unit tested here:
//!
//! ```text
//!   Forming ──formed──▶ Opening ──sessions open──▶ Training ──last step──▶ Finishing ──all finished──▶ end
//!      ▲                   │                          │                       │
//!      └──── Regroup ◀─────┴── a member lost, ────────┴── a worker arrived ───┘ (rank 0 lost before
//!                              hung or diverged                                 the last checkpoint)
//! ```
//!
//! A regroup starts the next generation: survivors keep their replicas,
//! lost places are refilled (local mode starts a new process; on a cluster
//! the pod restarts) or, after `coordinator.rejoin_timeout_s`, left empty
//! down to `coordinator.min_workers`. The async loop that feeds the
//! lifecycle and carries out what it decides is `supervise`.
//!
//! Three rules still live in that loop, not here, and are tested only
//! through real processes (the distributed, run_lock and checkpoints
//! areas of the integration tests): the join deadline (close the rendezvous with whoever
//! came, or fail with who was missing), the run's lease lost (fail at
//! once), and the operator's signal (checkpoint and stop after the current
//! step once the group formed; interrupt at once before that or on a
//! second signal).

use common::Config;
use common::storage::checkpoint::{self};
use tracing::warn;

use crate::error::{CoordinatorError, GroupFailure, Route};
use crate::generation::events::Event;
use crate::generation::group::Settings;
use crate::generation::origin::StoredStart;
use crate::generation::origin::{Held, Knowledge, Start, Verified};
use crate::generation::reports::StepSummary;

/// Where the current generation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for members (`join_timeout_s` for the first generation,
    /// `rejoin_timeout_s` after a regroup).
    Forming,
    /// Formed; waiting for every session (`handshake_timeout_s`) and for
    /// the replica members without one are sent (`step_timeout_s`).
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
    /// The run failed.
    Fail(CoordinatorError),
    /// The group re-forms as the next generation.
    Regroup(Regroup),
}

/// Why and how the group re-forms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Regroup {
    /// Ranks of the current generation that are gone.
    pub lost: Vec<usize>,
    /// Why, for the members and the log.
    pub reason: String,
    /// What kind of cause, for the membership record.
    pub cause: &'static str,
    /// Whether the members' replicas may be used.
    pub trust_replicas: bool,
    /// The replica sent was refused: its claim is not believed again.
    pub refuse_donor: bool,
}

/// What a run's generations all share, for [`Lifecycle::knowledge`].
#[derive(Debug, Clone, Copy)]
pub struct RunFacts {
    /// Its places (`--workers`).
    pub places: usize,
    /// `train.steps`.
    pub steps: u64,
    /// Whether a coordinator of this run came before this one.
    pub predecessor: bool,
}

impl RunFacts {
    /// The facts of a run of `settings` and `cfg`.
    pub fn of(settings: &Settings, cfg: &Config) -> Self {
        Self {
            places: settings.max,
            steps: cfg.train.steps,
            predecessor: settings.receipts.predecessor(),
        }
    }
}

/// The rules of a run, without I/O.
#[derive(Debug)]
pub struct Lifecycle {
    phase: Phase,
    generation: u64,
    world: usize,
    done: u64,
    last: Option<StepSummary>,
    throughput: (f64, u64),
    finished: Vec<bool>,
    committed: Option<u64>,
    failed_checkpoint: Option<(u64, String)>,
    restarts_left: u32,
    restarts: u64,
    retrained: u64,
    verified: Option<Verified>,
    arrival: bool,
    donor: Option<usize>,
    /// Steps this coordinator reduced whole, over every generation.
    reduced: u64,
    /// Steps this coordinator saw the group complete.
    trained: u64,
    /// Whether the current generation starts from a state the run
    /// provably reached.
    proven_start: bool,
    /// Ranks of the current generation that arrived in it.
    arrivals: Vec<usize>,
    /// The current generation formed to take in workers that asked to
    /// join (not to replace lost ones).
    grown: bool,
    /// Replicas whose transfer a member refused.
    refused: Vec<Held>,
}

impl Lifecycle {
    /// A run that may re-form `max_restarts` times after failures, whose
    /// first generation forms now.
    pub fn new(max_restarts: u32) -> Self {
        Self {
            phase: Phase::Forming,
            generation: 1,
            world: 0,
            done: 0,
            last: None,
            throughput: (0.0, 0),
            finished: Vec::new(),
            committed: None,
            failed_checkpoint: None,
            restarts_left: max_restarts,
            restarts: 0,
            retrained: 0,
            verified: None,
            arrival: false,
            donor: None,
            reduced: 0,
            trained: 0,
            proven_start: true,
            arrivals: Vec::new(),
            grown: false,
            refused: Vec::new(),
        }
    }

    /// Where the current generation is.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The current generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Steps completed (the group's, not one rank's).
    pub fn done(&self) -> u64 {
        self.done
    }

    /// The member sending its replica, while one is.
    pub fn donor(&self) -> Option<usize> {
        self.donor
    }

    /// The generation formed with `world` members, `arrivals` of them new
    /// to it, starting as `plan` says.
    pub fn formed(&mut self, world: usize, plan: &Start, arrivals: Vec<usize>) {
        self.phase = Phase::Opening;
        self.world = world;
        self.done = plan.first_step;
        self.retrained += plan.retrained;
        self.finished = vec![false; world];
        self.donor = None;
        self.proven_start = plan.proven;
        self.arrivals = arrivals;
    }

    /// The next step given `event` from generation `origin`; `final_step`
    /// is where the group stops. News from an earlier generation is stale.
    pub fn on(&mut self, origin: u64, event: Event, final_step: u64) -> Next {
        if origin != self.generation || self.phase == Phase::Forming {
            return Next::Continue;
        }
        match event {
            Event::Transferring { donor } => {
                self.donor = Some(donor);
                Next::Continue
            }
            Event::SessionsOpen => {
                self.donor = None;
                self.phase = match self.done >= final_step {
                    true => Phase::Finishing,
                    false => Phase::Training,
                };
                match std::mem::take(&mut self.arrival) {
                    true => self.arrived(),
                    false => Next::Continue,
                }
            }
            Event::StepDone(summary) => {
                self.done = summary.step + 1;
                self.trained += 1;
                // After a local step (post-local SGD) replicas differ: the
                // verified state stays at the last averaging step.
                if let Some(checksum) = summary.checksum {
                    self.verified = Some(Verified {
                        step: self.done,
                        checksum,
                    });
                }
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
            Event::Arrival => match self.phase {
                Phase::Training => self.arrived(),
                Phase::Opening => {
                    self.arrival = true;
                    Next::Continue
                }
                // The run is ending: the newcomer would train nothing.
                Phase::Forming | Phase::Finishing => Next::Continue,
            },
            Event::Finished { rank } => {
                self.finished[rank] = true;
                self.concluded(final_step)
            }
            Event::Failed(CoordinatorError::Group(failure)) => self.failed(failure, final_step),
            Event::Failed(err) => Next::Fail(err),
        }
    }

    /// A member failed the group (or a clock ran out on it).
    pub fn failed(&mut self, failure: GroupFailure, final_step: u64) -> Next {
        let refuse_donor = matches!(failure, GroupFailure::BadReplica { .. });
        let (lost, trust_replicas, cause) = match failure.route() {
            Route::Fatal => return Next::Fail(failure.into()),
            Route::Drop(lost) if lost.is_empty() => {
                ((0..self.world).collect(), true, "member lost")
            }
            Route::Drop(lost) if refuse_donor => (lost, true, "bad replica"),
            Route::Drop(lost) => (lost, true, "member lost"),
            Route::Restart => (Vec::new(), false, "replicas diverged"),
        };
        // Done with every step, a member other than the one writing the
        // last checkpoint has nothing left to do.
        if self.phase == Phase::Finishing && trust_replicas && !lost.contains(&0) {
            lost.iter().for_each(|&r| self.finished[r] = true);
            return self.concluded(final_step);
        }
        // A worker that asked to join and went away before its first step
        // costs the regroup it caused, never a restart of the run (a
        // replacement that fails, as a crash loop would, still does).
        let arrivals_only = self.grown
            && self.phase == Phase::Opening
            && !lost.is_empty()
            && lost.iter().all(|r| self.arrivals.contains(r));
        if arrivals_only {
            warn!(lost = ?lost, reason = %failure,
                "a worker that arrived in this generation went away before training: the group \
                 re-forms without it (no restart spent)");
        } else if !self.spend_restart() {
            return Next::Fail(failure.into());
        }
        Next::Regroup(Regroup {
            lost,
            reason: failure.to_string(),
            cause: if arrivals_only { "arrival lost" } else { cause },
            trust_replicas,
            refuse_donor,
        })
    }

    /// Takes one restart from the budget; false when none is left.
    pub fn spend_restart(&mut self) -> bool {
        if self.restarts_left == 0 {
            return false;
        }
        self.restarts_left -= 1;
        self.restarts += 1;
        true
    }

    fn arrived(&mut self) -> Next {
        Next::Regroup(Regroup {
            lost: Vec::new(),
            reason: "a worker arrived: the group grows at this step".into(),
            cause: "member arrived",
            trust_replicas: true,
            refuse_donor: false,
        })
    }

    fn concluded(&self, final_step: u64) -> Next {
        if !self.finished.iter().all(|f| *f) {
            return Next::Continue;
        }
        // Members alone never end a run: without a step this coordinator
        // saw completed, the end state must be one the run provably reached.
        if self.trained == 0 && !self.proven_start {
            return Next::Fail(
                GroupFailure::WorkerLost {
                    rank: 0,
                    reason: format!(
                        "every worker said it finished at step {}, but this coordinator saw no \
                         step trained and has no proof the run reached it",
                        self.done
                    ),
                }
                .into(),
            );
        }
        if self.done < final_step {
            return Next::Fail(
                GroupFailure::WorkerLost {
                    rank: 0,
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

    /// The ending generation reduced its all-reduces up to `reduced`
    /// steps, if it reduced any.
    pub fn reduced(&mut self, reduced: Option<u64>) {
        self.reduced = self.reduced.max(reduced.unwrap_or(0));
    }

    /// `donated` was the replica sent when a member refused it.
    pub fn refuse(&mut self, donated: Option<Held>) {
        self.refused.extend(donated);
    }

    /// The group re-forms (`cause`, as [`Regroup::cause`]): the next
    /// generation starts forming.
    pub fn regrouped(&mut self, cause: &str) {
        self.grown = cause == "member arrived";
        self.generation += 1;
        self.phase = Phase::Forming;
        self.arrival = false;
        self.donor = None;
    }

    /// What the next generation may start from: the members' replicas
    /// (when `trust_replicas`) or the newest checkpoint committed, else
    /// where the run started (`first`). `run` says how many places the run
    /// has, where it ends, and whether an earlier coordinator trained it.
    pub fn knowledge(
        &self,
        first: &StoredStart,
        trust_replicas: bool,
        run: &RunFacts,
    ) -> Knowledge {
        let fallback = match self.committed {
            Some(step) => StoredStart {
                first_step: step,
                checkpoint: Some(checkpoint::name(step)),
            },
            None => first.clone(),
        };
        Knowledge {
            fallback,
            verified: self.verified,
            reached: self.done,
            committed: self
                .committed
                .or(first.checkpoint.as_ref().map(|_| first.first_step)),
            trust_replicas,
            places: run.places,
            bound: match (self.reduced, run.predecessor) {
                (0, true) => run.steps,
                (0, false) => first.first_step,
                (reduced, _) => reduced,
            },
            reduced: self.reduced,
            steps: run.steps,
            refused: self.refused.clone(),
        }
    }

    /// Checkpoint `step` is in the store and `latest` names it.
    pub fn checkpoint_committed(&mut self, step: u64) {
        self.committed = Some(step);
    }

    /// Checkpoint `step` could not be written (or was not there once rank
    /// 0 said it was): `latest` keeps naming the previous one.
    pub fn checkpoint_failed(&mut self, step: u64, reason: String) {
        warn!(checkpoint = %checkpoint::name(step), %reason,
            "a checkpoint could not be saved; `latest` still names the previous one");
        self.failed_checkpoint = Some((step, reason));
    }

    /// The last step's summary.
    pub fn last(&self) -> Option<&StepSummary> {
        self.last.as_ref()
    }

    /// Mean group throughput over the steps trained.
    pub fn images_per_s(&self) -> f64 {
        let (sum, steps) = self.throughput;
        if steps == 0 { 0.0 } else { sum / steps as f64 }
    }

    /// The newest checkpoint committed in this run.
    pub fn committed(&self) -> Option<u64> {
        self.committed
    }

    /// Why a checkpoint failed, if one did.
    pub fn failed_checkpoint(&self) -> Option<&(u64, String)> {
        self.failed_checkpoint.as_ref()
    }

    /// Times the group re-formed after a failure.
    pub fn restarts(&self) -> u64 {
        self.restarts
    }

    /// Steps the run trained twice (0 while replicas survived).
    pub fn retrained(&self) -> u64 {
        self.retrained
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generation::reports::StepSummary;
    use common::protocol::pb;

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
            checksum: Some(77),
        })
    }

    fn plan(world: usize, first_step: u64) -> Start {
        Start {
            first_step,
            cursor: Default::default(),
            sources: vec![pb::Source::Fresh; world],
            donor: None,
            resume_from: None,
            retrained: 0,
            proven: true,
        }
    }

    const FACTS: RunFacts = RunFacts {
        places: 2,
        steps: 10,
        predecessor: false,
    };

    fn training(world: usize, restarts: u32) -> Lifecycle {
        let mut life = Lifecycle::new(restarts);
        life.formed(world, &plan(world, 0), vec![]);
        assert!(matches!(
            life.on(1, Event::SessionsOpen, 10),
            Next::Continue
        ));
        life
    }

    fn lost(rank: usize) -> Event {
        Event::Failed(
            GroupFailure::WorkerLost {
                rank,
                reason: "gone".into(),
            }
            .into(),
        )
    }

    #[test]
    fn a_generation_goes_from_forming_to_finishing_and_concludes_when_all_finished() {
        let mut life = Lifecycle::new(0);
        assert_eq!(life.phase(), Phase::Forming);
        life.formed(2, &plan(2, 0), vec![]);
        assert_eq!(life.phase(), Phase::Opening);
        assert!(matches!(life.on(1, Event::SessionsOpen, 2), Next::Continue));
        assert_eq!(life.phase(), Phase::Training);
        life.on(1, step(0), 2);
        life.on(1, step(1), 2);
        assert_eq!(life.phase(), Phase::Finishing);
        assert!(matches!(
            life.on(1, Event::Finished { rank: 1 }, 2),
            Next::Continue
        ));
        assert!(matches!(
            life.on(1, Event::Finished { rank: 0 }, 2),
            Next::Conclude
        ));
    }

    /// Finishing counts ranks, not messages, and needs every step done.
    #[test]
    fn finishing_before_the_last_step_fails_the_run() {
        let mut life = training(2, 0);
        assert!(matches!(
            life.on(1, Event::Finished { rank: 1 }, 50),
            Next::Continue
        ));
        assert!(matches!(
            life.on(1, Event::Finished { rank: 1 }, 50),
            Next::Continue
        ));
        match life.on(1, Event::Finished { rank: 0 }, 50) {
            Next::Fail(err) => assert!(err.to_string().contains("only 0 of 50 steps"), "{err}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn written_checkpoints_are_committed_and_failures_remembered() {
        let mut life = training(1, 0);
        let written = |step, error| Event::CheckpointWritten { step, error };
        assert!(matches!(life.on(1, written(4, None), 8), Next::Commit(4)));
        assert_eq!(life.committed(), None, "not before the store confirms it");
        life.checkpoint_committed(4);
        life.on(1, written(8, Some("disk full".into())), 8);
        assert_eq!(life.committed(), Some(4));
        assert_eq!(
            life.failed_checkpoint(),
            Some(&(8, "disk full".to_string()))
        );
    }

    /// A lost member re-forms the group without it while restarts remain;
    /// news from the old generation is stale afterwards.
    #[test]
    fn a_lost_member_regroups_within_the_restart_budget_and_old_news_is_ignored() {
        let mut life = training(3, 1);
        life.on(1, step(0), 10);
        match life.on(1, lost(2), 10) {
            Next::Regroup(r) => {
                assert_eq!(
                    (r.lost, r.trust_replicas, r.cause),
                    (vec![2], true, "member lost")
                );
            }
            other => panic!("{other:?}"),
        }
        life.regrouped("member lost");
        assert_eq!((life.generation(), life.phase()), (2, Phase::Forming));
        assert!(
            matches!(life.on(1, lost(0), 10), Next::Continue),
            "generation 1 is over"
        );
        life.formed(3, &plan(3, 1), vec![]);
        life.on(2, Event::SessionsOpen, 10);
        assert!(
            matches!(life.on(2, lost(1), 10), Next::Fail(_)),
            "no restart left"
        );
        assert_eq!(life.restarts(), 1);
    }

    #[test]
    fn the_next_generation_knows_the_verified_state_and_the_fallback() {
        let mut life = training(2, 1);
        life.on(1, step(0), 10);
        life.on(1, step(1), 10);
        let start = StoredStart::default();
        let known = life.knowledge(&start, true, &FACTS);
        assert_eq!(
            known.verified,
            Some(Verified {
                step: 2,
                checksum: 77
            })
        );
        assert_eq!((known.reached, known.fallback.first_step), (2, 0));
        life.checkpoint_committed(2);
        let known = life.knowledge(&start, false, &FACTS);
        assert_eq!(known.fallback.checkpoint.as_deref(), Some("step-000000002"));
        assert!(!known.trust_replicas);
    }

    /// Diverged replicas cannot be trusted: everyone restarts from the checkpoint.
    #[test]
    fn divergence_restarts_everyone_from_the_checkpoint() {
        let mut life = training(2, 1);
        let diverged = crate::generation::reports::Divergence {
            step: 3,
            checksums: vec![1, 2],
        };
        match life.on(1, Event::Failed(GroupFailure::from(diverged).into()), 10) {
            Next::Regroup(r) => assert!(r.lost.is_empty() && !r.trust_replicas),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_non_finite_gradient_under_halt_ends_the_run() {
        let mut life = training(2, 3);
        let nan = GroupFailure::NonFinite {
            step: 1,
            net: pb::Net::Generator,
            culprits: "rank 1".into(),
        };
        assert!(matches!(
            life.on(1, Event::Failed(nan.into()), 10),
            Next::Fail(_)
        ));
    }

    /// An arrival waits for training to begin, then grows the group; it
    /// costs no restart.
    #[test]
    fn an_arrival_grows_the_group_once_training_runs() {
        let mut life = Lifecycle::new(0);
        life.formed(1, &plan(1, 0), vec![]);
        assert!(matches!(life.on(1, Event::Arrival, 10), Next::Continue));
        match life.on(1, Event::SessionsOpen, 10) {
            Next::Regroup(r) => assert_eq!((r.lost.len(), r.cause), (0, "member arrived")),
            other => panic!("{other:?}"),
        }
        assert_eq!(life.restarts(), 0);
    }

    /// After the last step, a member other than rank 0 (which writes the
    /// last checkpoint) may go: the run still concludes without it.
    #[test]
    fn after_the_last_step_only_rank_0_is_needed() {
        let mut life = training(3, 0);
        life.on(1, step(9), 10);
        assert_eq!(life.phase(), Phase::Finishing);
        assert!(matches!(
            life.on(1, Event::Finished { rank: 0 }, 10),
            Next::Continue
        ));
        assert!(matches!(life.on(1, lost(2), 10), Next::Continue));
        assert!(matches!(
            life.on(1, Event::Finished { rank: 1 }, 10),
            Next::Conclude
        ));
        let mut life = training(2, 1);
        life.on(1, step(9), 10);
        assert!(matches!(life.on(1, lost(0), 10), Next::Regroup(_)));
    }

    #[test]
    fn a_stall_with_no_gradient_in_flight_drops_every_rank() {
        let mut life = training(2, 1);
        let stalled = GroupFailure::Stalled {
            seconds: 1,
            done: 0,
            waiting: String::new(),
            ranks: vec![],
        };
        match life.failed(stalled, 10) {
            Next::Regroup(r) => assert_eq!(r.lost, vec![0, 1]),
            other => panic!("{other:?}"),
        }
    }

    /// A group that formed at its last step from members' word alone (no
    /// proof the run reached it) never ends as a success; one whose end
    /// state the run provably reached does.
    #[test]
    fn members_alone_never_end_a_run_as_a_success() {
        let mut claimed = plan(2, 10);
        claimed.proven = false;
        let mut life = Lifecycle::new(0);
        life.formed(2, &claimed, vec![]);
        assert!(matches!(
            life.on(1, Event::SessionsOpen, 10),
            Next::Continue
        ));
        life.on(1, Event::Finished { rank: 0 }, 10);
        match life.on(1, Event::Finished { rank: 1 }, 10) {
            Next::Fail(err) => assert!(err.to_string().contains("no proof"), "{err}"),
            other => panic!("{other:?}"),
        }
        let mut life = Lifecycle::new(0);
        life.formed(2, &plan(2, 10), vec![]);
        life.on(1, Event::SessionsOpen, 10);
        life.on(1, Event::Finished { rank: 0 }, 10);
        assert!(matches!(
            life.on(1, Event::Finished { rank: 1 }, 10),
            Next::Conclude
        ));
    }

    /// A worker that asked to join and never opens its session costs the
    /// regroup, never a restart; a survivor that does the same, or a
    /// replacement for a lost member (a crash loop), spends one.
    #[test]
    fn a_lost_arrival_costs_no_restart() {
        let silent = |ranks: Vec<usize>| GroupFailure::NoSession {
            ranks,
            hosts: String::new(),
            seconds: 1,
        };
        let mut life = training(2, 0);
        life.on(1, Event::Arrival, 10);
        life.regrouped("member arrived");
        life.formed(3, &plan(3, 4), vec![2]);
        match life.failed(silent(vec![2]), 10) {
            Next::Regroup(r) => assert_eq!((r.lost, r.cause), (vec![2], "arrival lost")),
            other => panic!("{other:?}"),
        }
        assert_eq!(life.restarts(), 0);
        life.regrouped("arrival lost");
        life.formed(3, &plan(3, 4), vec![2]);
        assert!(
            matches!(life.failed(silent(vec![2]), 10), Next::Fail(_)),
            "only the generation that grew for it is free"
        );
        let mut life = training(2, 0);
        life.regrouped("member arrived");
        life.formed(3, &plan(3, 4), vec![2]);
        assert!(matches!(life.failed(silent(vec![0, 2]), 10), Next::Fail(_)));
    }

    /// What the next generation may believe: up to the steps this
    /// coordinator reduced once it trained; before that, nothing past the
    /// start unless an earlier coordinator trained the run.
    #[test]
    fn the_bound_on_claims_follows_what_the_coordinator_saw() {
        let start = StoredStart {
            first_step: 4,
            checkpoint: Some(checkpoint::name(4)),
        };
        let life = Lifecycle::new(0);
        assert_eq!(life.knowledge(&start, true, &FACTS).bound, 4);
        let restarted = RunFacts {
            predecessor: true,
            ..FACTS
        };
        assert_eq!(life.knowledge(&start, true, &restarted).bound, 10);
        let mut life = training(2, 1);
        life.reduced(Some(7));
        life.reduced(None);
        let known = life.knowledge(&start, true, &restarted);
        assert_eq!((known.bound, known.reduced), (7, 7));
    }
}
