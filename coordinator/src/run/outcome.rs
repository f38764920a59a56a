//! How a run that ended well reports: a leaf, so the driver, the
//! lifecycle rules and the summary all use it without importing each other.

use crate::generation::reports::StepSummary;

/// How a run ended without error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// All `train.steps` steps are done and checkpointed.
    Finished {
        /// Steps done.
        steps: u64,
    },
    /// A stop request (SIGTERM) ended the run early, after a checkpoint.
    Stopped {
        /// Steps done.
        steps: u64,
    },
}

/// What a run that ended well reports: the summary a person reads.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// How it ended.
    pub outcome: Outcome,
    /// Mean group throughput over the steps trained (img/s).
    pub images_per_s: f64,
    /// The last step's summary.
    pub last: Option<StepSummary>,
    /// Times the group re-formed after a failure.
    pub restarts: u64,
    /// Generations the run went through (1 when nothing happened).
    pub generations: u64,
    /// Steps trained twice because no replica survived (0 when one did).
    pub retrained: u64,
    /// Optimizer steps skipped for non-finite gradients.
    pub skipped: u64,
    /// The final checkpoint, once the store confirmed it.
    pub checkpoint: Option<String>,
    /// SWD of the final checkpoint, when rank 0 measured it.
    pub swd: Option<f64>,
    /// From the start of supervision (workers launched or awaited) to the
    /// first step the group completed, if it trained one.
    pub first_step: Option<std::time::Duration>,
}
