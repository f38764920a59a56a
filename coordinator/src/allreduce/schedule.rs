//! When the group checkpoints and stops: every `checkpoint.every` steps, at
//! the last step, and as soon as possible after a stop request (SIGTERM).
//!
//! The decision for a step is made once, when the first chunk of its
//! generator gradient is reduced, and travels to every worker ahead of that
//! chunk, so all replicas learn it during the same step and act on it
//! after that step.
//!
//! Under error feedback (int8 wire) the step before each checkpoint
//! travels exact, so no residual is left to save: the decision also says
//! whether the next step is such a step, and a stop request takes effect
//! one step later than otherwise, after a step announced as exact.

use std::sync::Mutex;

use common::protocol::pb;

/// The checkpoint and stop plan of one run.
pub struct Schedule {
    every: u64,
    steps: u64,
    /// Checkpoints follow exact steps, announced a step ahead.
    exact_before_checkpoints: bool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The generation whose decisions count (a stale one's chunks may
    /// still be reduced while its members regroup).
    generation: u64,
    stop_requested: bool,
    stop_after: Option<u64>,
    last_checkpoint: Option<u64>,
    /// Every checkpoint asked for.
    asked: std::collections::BTreeSet<u64>,
    /// Checkpoints asked for that rank 0 has not reported on yet.
    unanswered: std::collections::BTreeSet<u64>,
}

impl Schedule {
    /// A run of `steps` steps in total, checkpointing every `every` (0: never
    /// on a schedule, only at the end and on a stop request); with
    /// `exact_before_checkpoints`, every checkpoint follows a step whose
    /// gradients travel exact, announced a step ahead.
    pub fn new(every: u64, steps: u64, exact_before_checkpoints: bool) -> Self {
        Self {
            every,
            steps,
            exact_before_checkpoints,
            state: Mutex::default(),
        }
    }

    /// Whether the group checkpoints once `done` steps are done.
    fn due(&self, state: &State, done: u64) -> bool {
        done == self.steps
            || (self.every > 0 && done.is_multiple_of(self.every))
            || state.stop_after == Some(done)
    }

    /// Whether step `step`'s gradients travel exact (f32, carrying every
    /// residual and leaving none) because a checkpoint follows it. Stable
    /// from the decision for the step before (or the generation's start)
    /// until the step is reduced.
    pub fn exact(&self, step: u64) -> bool {
        let state = self.state.lock().expect("schedule lock");
        self.exact_locked(&state, step)
    }

    fn exact_locked(&self, state: &State, step: u64) -> bool {
        self.exact_before_checkpoints
            && step < self.final_locked(state)
            && self.due(state, step + 1)
    }

    /// Asks the group to checkpoint and stop at the next step boundary;
    /// false when a stop was already requested.
    pub fn request_stop(&self) -> bool {
        let mut state = self.state.lock().expect("schedule lock");
        !std::mem::replace(&mut state.stop_requested, true)
    }

    /// What generation `generation` does after step `step` (0-based), or
    /// `None` to carry on; always `None` for a generation already replaced,
    /// whose decisions the next one makes again.
    pub fn control(&self, generation: u64, step: u64) -> Option<pb::Control> {
        let done = step + 1;
        let mut state = self.state.lock().expect("schedule lock");
        if generation != state.generation {
            return None;
        }
        if state.stop_requested && state.stop_after.is_none() && done < self.steps {
            // Under error feedback the last step must have been exact: stop
            // here only if it was (a checkpoint was due anyway), else after
            // the next step, announced as exact now.
            let at = match !self.exact_before_checkpoints || self.due(&state, done) {
                true => done,
                false => done + 1,
            };
            if at < self.steps {
                state.stop_after = Some(at);
            }
        }
        let stop = state.stop_after == Some(done);
        let checkpoint = self.due(&state, done);
        let exact_next = self.exact_locked(&state, done);
        if checkpoint {
            state.last_checkpoint = Some(done);
            state.asked.insert(done);
            state.unanswered.insert(done);
        }
        (checkpoint || stop || exact_next).then_some(pb::Control {
            step,
            checkpoint,
            stop,
            exact_next,
        })
    }

    /// The step count of the last checkpoint asked for.
    pub fn last_checkpoint(&self) -> Option<u64> {
        self.state.lock().expect("schedule lock").last_checkpoint
    }

    /// Steps done when the group was told to stop early, if it was.
    pub fn stopped_after(&self) -> Option<u64> {
        self.state.lock().expect("schedule lock").stop_after
    }

    /// The step count the group trains to: `train.steps`, or where a stop
    /// request ends it.
    pub fn final_step(&self) -> u64 {
        self.final_locked(&self.state.lock().expect("schedule lock"))
    }

    fn final_locked(&self, state: &State) -> u64 {
        state.stop_after.unwrap_or(self.steps)
    }

    /// Whether step `step` (0-based) is one the group trains.
    pub fn trains(&self, step: u64) -> bool {
        step < self.final_step()
    }

    /// Generation `generation` starts at `first_step`. Decisions made for
    /// later steps were the old group's and are made again; checkpoints
    /// asked of it and not reported on are forgotten (its rank 0 may be
    /// gone). Returns whether the new rank 0 must checkpoint `first_step`
    /// before training: it was asked for, and `committed` is not it.
    pub fn resume_at(&self, generation: u64, first_step: u64, committed: Option<u64>) -> bool {
        let mut state = self.state.lock().expect("schedule lock");
        state.generation = generation;
        state.unanswered.clear();
        state.asked.retain(|&s| s <= first_step);
        state.last_checkpoint = state.asked.last().copied();
        if state.stop_after.is_some_and(|s| s > first_step) {
            state.stop_after = None;
        }
        let owed = state.asked.contains(&first_step) && committed != Some(first_step);
        if owed {
            state.unanswered.insert(first_step);
        }
        owed
    }

    /// Takes rank 0's report on checkpoint `step`: true when that
    /// checkpoint was asked for and not reported on before, so a member
    /// cannot commit a checkpoint nobody asked for, or one twice.
    pub fn answer(&self, step: u64) -> bool {
        self.state
            .lock()
            .expect("schedule lock")
            .unanswered
            .remove(&step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The generation the schedule decides for now.
    fn generation(schedule: &Schedule) -> u64 {
        schedule.state.lock().unwrap().generation
    }

    /// (step, checkpoint, stop, exact_next) of each decision for `steps`.
    fn announced(schedule: &Schedule, steps: std::ops::Range<u64>) -> Vec<(u64, bool, bool, bool)> {
        steps
            .filter_map(|s| schedule.control(generation(schedule), s))
            .map(|c| (c.step, c.checkpoint, c.stop, c.exact_next))
            .collect()
    }

    /// The same without exact_next, which only error feedback sets.
    fn decisions(schedule: &Schedule, steps: std::ops::Range<u64>) -> Vec<(u64, bool, bool)> {
        announced(schedule, steps)
            .into_iter()
            .map(|(step, checkpoint, stop, _)| (step, checkpoint, stop))
            .collect()
    }

    #[test]
    fn checkpoints_every_k_steps_and_at_the_end() {
        let schedule = Schedule::new(4, 10, false);
        assert_eq!(
            decisions(&schedule, 0..10),
            [(3, true, false), (7, true, false), (9, true, false)]
        );
        assert_eq!(schedule.last_checkpoint(), Some(10));
        assert_eq!(schedule.stopped_after(), None);
        assert!(schedule.trains(9) && !schedule.trains(10));
    }

    #[test]
    fn only_checkpoints_asked_for_can_be_answered_and_only_once() {
        let schedule = Schedule::new(4, 10, false);
        assert!(!schedule.answer(4), "not asked for yet");
        decisions(&schedule, 0..4);
        assert!(!schedule.answer(3) && schedule.answer(4));
        assert!(!schedule.answer(4), "answered already");
    }

    #[test]
    fn a_stop_request_checkpoints_and_stops_at_the_next_step() {
        let schedule = Schedule::new(0, 10, false);
        assert_eq!(decisions(&schedule, 0..3), []);
        assert!(schedule.request_stop());
        assert!(!schedule.request_stop(), "only the first request counts");
        assert_eq!(decisions(&schedule, 3..4), [(3, true, true)]);
        assert_eq!(schedule.stopped_after(), Some(4));
        assert_eq!(schedule.last_checkpoint(), Some(4));
        assert!(schedule.trains(3) && !schedule.trains(4));
    }

    /// A group that re-forms at step 6 redoes the decisions from there: a
    /// checkpoint asked for at 8 is void, the stop decided after it is made
    /// again, and the checkpoint of step 6 itself is owed when it was never
    /// committed.
    #[test]
    fn a_new_generation_forgets_the_old_groups_later_decisions() {
        let schedule = Schedule::new(2, 10, false);
        decisions(&schedule, 0..6);
        assert!(schedule.answer(2));
        schedule.request_stop();
        decisions(&schedule, 6..8);
        assert_eq!(schedule.stopped_after(), Some(7));
        assert!(
            schedule.resume_at(2, 6, Some(4)),
            "6 was asked for, 4 is committed"
        );
        assert_eq!(
            (schedule.last_checkpoint(), schedule.stopped_after()),
            (Some(6), None)
        );
        assert!(schedule.answer(6) && !schedule.answer(4));
        assert!(!schedule.resume_at(3, 6, Some(6)), "6 is committed");
        assert!(!schedule.resume_at(4, 5, None), "5 was never asked for");
        assert_eq!(decisions(&schedule, 5..6), [(5, true, true)]);
    }

    /// Under error feedback each checkpoint follows a step announced exact
    /// one step ahead, so every worker knows before it encodes that step.
    #[test]
    fn with_error_feedback_the_step_before_each_checkpoint_is_announced_exact() {
        let schedule = Schedule::new(4, 10, true);
        assert_eq!(
            announced(&schedule, 0..10),
            [
                (2, false, false, true),
                (3, true, false, false),
                (6, false, false, true),
                (7, true, false, false),
                (8, false, false, true),
                (9, true, false, false)
            ]
        );
        let exact: Vec<u64> = (0..10).filter(|&s| schedule.exact(s)).collect();
        assert_eq!(exact, [3, 7, 9]);
        assert!(!Schedule::new(4, 10, false).exact(3), "f32 never needs it");
    }

    /// A stop needs an exact last step: it comes one step later, unless
    /// the step just done was exact anyway.
    #[test]
    fn with_error_feedback_a_stop_waits_for_an_exact_step() {
        let schedule = Schedule::new(0, 10, true);
        assert_eq!(announced(&schedule, 0..2), []);
        assert!(schedule.request_stop());
        assert_eq!(announced(&schedule, 2..3), [(2, false, false, true)]);
        assert!(schedule.exact(3) && schedule.trains(3) && !schedule.trains(4));
        assert_eq!(announced(&schedule, 3..4), [(3, true, true, false)]);
        assert_eq!(schedule.stopped_after(), Some(4));

        let scheduled = Schedule::new(4, 10, true);
        announced(&scheduled, 0..3);
        scheduled.request_stop();
        assert_eq!(
            announced(&scheduled, 3..4),
            [(3, true, true, false)],
            "step 3 was exact for the checkpoint at 4: stop there"
        );
    }

    /// A replaced generation's last chunks may still be reduced while its
    /// members regroup: its decisions must not change the new one's.
    #[test]
    fn a_replaced_generation_decides_nothing() {
        let schedule = Schedule::new(0, 10, true);
        schedule.resume_at(1, 0, None);
        schedule.resume_at(2, 3, None);
        schedule.request_stop();
        assert_eq!(schedule.control(1, 3), None, "generation 1 was replaced");
        assert!(!schedule.exact(3) && schedule.trains(9));
        assert_eq!(announced(&schedule, 3..4), [(3, false, false, true)]);
    }
}
