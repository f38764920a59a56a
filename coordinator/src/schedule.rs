//! When the group checkpoints and stops: every `checkpoint.every` steps, at
//! the last step, and as soon as possible after a stop request (SIGTERM).
//!
//! The decision for a step is made once, when the first chunk of its
//! generator gradient is reduced, and travels to every worker ahead of that
//! chunk, so all replicas learn it during the same step and act on it
//! after that step.

use std::sync::Mutex;

use common::pb;

/// The checkpoint and stop plan of one run.
pub struct Schedule {
    every: u64,
    steps: u64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
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
    /// on a schedule, only at the end and on a stop request).
    pub fn new(every: u64, steps: u64) -> Self {
        Self {
            every,
            steps,
            state: Mutex::default(),
        }
    }

    /// Asks the group to checkpoint and stop at the next step boundary;
    /// false when a stop was already requested.
    pub fn request_stop(&self) -> bool {
        let mut state = self.state.lock().expect("schedule lock");
        !std::mem::replace(&mut state.stop_requested, true)
    }

    /// What the group does after step `step` (0-based), or `None` to carry on.
    pub fn control(&self, step: u64) -> Option<pb::Control> {
        let done = step + 1;
        let mut state = self.state.lock().expect("schedule lock");
        let stop = state.stop_requested && done < self.steps;
        let checkpoint =
            stop || done == self.steps || (self.every > 0 && done.is_multiple_of(self.every));
        if stop {
            state.stop_after.get_or_insert(done);
        }
        if checkpoint {
            state.last_checkpoint = Some(done);
            state.asked.insert(done);
            state.unanswered.insert(done);
        }
        (checkpoint || stop).then_some(pb::Control {
            step,
            checkpoint,
            stop,
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
        self.stopped_after().unwrap_or(self.steps)
    }

    /// Whether step `step` (0-based) is one the group trains.
    pub fn trains(&self, step: u64) -> bool {
        step < self.final_step()
    }

    /// A new generation starts at `first_step`. Decisions made for later
    /// steps were the old group's and are made again; checkpoints asked of
    /// it and not reported on are forgotten (its rank 0 may be gone).
    /// Returns whether the new rank 0 must checkpoint `first_step` before
    /// training: it was asked for, and `committed` is not it.
    pub fn resume_at(&self, first_step: u64, committed: Option<u64>) -> bool {
        let mut state = self.state.lock().expect("schedule lock");
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

    fn decisions(schedule: &Schedule, steps: std::ops::Range<u64>) -> Vec<(u64, bool, bool)> {
        steps
            .filter_map(|s| schedule.control(s))
            .map(|c| (c.step, c.checkpoint, c.stop))
            .collect()
    }

    #[test]
    fn checkpoints_every_k_steps_and_at_the_end() {
        let schedule = Schedule::new(4, 10);
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
        let schedule = Schedule::new(4, 10);
        assert!(!schedule.answer(4), "not asked for yet");
        decisions(&schedule, 0..4);
        assert!(!schedule.answer(3) && schedule.answer(4));
        assert!(!schedule.answer(4), "answered already");
    }

    #[test]
    fn a_stop_request_checkpoints_and_stops_at_the_next_step() {
        let schedule = Schedule::new(0, 10);
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
        let schedule = Schedule::new(2, 10);
        decisions(&schedule, 0..6);
        assert!(schedule.answer(2));
        schedule.request_stop();
        decisions(&schedule, 6..8);
        assert_eq!(schedule.stopped_after(), Some(7));
        assert!(
            schedule.resume_at(6, Some(4)),
            "6 was asked for, 4 is committed"
        );
        assert_eq!(
            (schedule.last_checkpoint(), schedule.stopped_after()),
            (Some(6), None)
        );
        assert!(schedule.answer(6) && !schedule.answer(4));
        assert!(!schedule.resume_at(6, Some(6)), "6 is committed");
        assert!(!schedule.resume_at(5, None), "5 was never asked for");
        assert_eq!(decisions(&schedule, 5..6), [(5, true, true)]);
    }
}
