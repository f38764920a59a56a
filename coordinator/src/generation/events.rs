//! What the supervision learns, and from whom.
//!
//! Handlers of a generation, the launcher's process watchers and the
//! Join handler all report to one queue. Each notice says where it comes
//! from, so news from a generation that has already been replaced (a
//! member of it hanging up, as every member of a re-formed group does) or
//! from a process that has been replaced is recognised as stale.

use crate::CoordinatorError;
use crate::generation::reports::StepSummary;

/// What happened.
#[derive(Debug)]
pub enum Event {
    /// The state for this generation is on its way from a member to the
    /// members without one.
    Transferring {
        /// The member sending it.
        donor: usize,
    },
    /// Every member has opened its session and has its state; training starts.
    SessionsOpen,
    /// Every rank reported this step and their parameters agree.
    StepDone(StepSummary),
    /// A rank completed all its steps.
    Finished {
        /// The rank.
        rank: usize,
    },
    /// A worker asked the group to checkpoint and stop (it got SIGTERM).
    StopRequested {
        /// The rank.
        rank: usize,
        /// Why, in its words, escaped.
        reason: String,
    },
    /// Rank 0 uploaded (or failed to upload) a checkpoint that was asked for.
    CheckpointWritten {
        /// Steps done at the checkpoint.
        step: u64,
        /// Why it failed, if it did (escaped).
        error: Option<String>,
    },
    /// A worker asked to join a generation that formed smaller than the
    /// run allows: the group re-forms to take it in.
    Arrival,
    /// Something failed: a member (the group may re-form without it) or
    /// the run.
    Failed(CoordinatorError),
}

/// Who a notice comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The handlers of generation `n`.
    Generation(u64),
    /// The local worker process started in `place` for the `life`-th time.
    Process {
        /// Its place (the `--rank` it was started with).
        place: usize,
        /// 0 for the first process, 1 for its first replacement…
        life: u64,
    },
}

/// An event and its origin.
#[derive(Debug)]
pub struct Notice {
    /// Who sent it.
    pub origin: Origin,
    /// What happened.
    pub event: Event,
}
