//! Step reports: the proof that replicas stay identical, and what the
//! progress display shows.
//!
//! Every worker reports a checksum of its trainable parameters after each
//! step. Once all ranks reported a step that all-reduced, the checksums
//! must agree; any difference stops the run, since the replicas would
//! otherwise silently train different models. (Between the averaging
//! steps of post-local SGD replicas differ by design.)

use std::collections::BTreeMap;
use std::sync::Mutex;

use common::protocol::pb;
use common::sampling::cadence::Cadence;

/// Replicas hold different parameters after a step.
#[derive(Debug, thiserror::Error)]
#[error(
    "replicas diverged after step {step}: parameter checksums per rank {checksums:016x?}; \
     every replica must apply the same averaged gradient, so this is a bug or a faulty machine \
     (the group re-forms from the newest checkpoint)"
)]
pub struct Divergence {
    /// The step after which the checksums differ.
    pub step: u64,
    /// Checksum reported by each rank.
    pub checksums: Vec<u64>,
}

/// A step every rank has reported.
#[derive(Debug, Clone, PartialEq)]
pub struct StepSummary {
    /// The step (0-based).
    pub step: u64,
    /// Its epoch.
    pub epoch: u64,
    /// Rank 0's discriminator loss.
    pub d_loss: f32,
    /// Rank 0's generator loss.
    pub g_loss: f32,
    /// Rank 0's mean D(x) on real images.
    pub d_real: f32,
    /// Rank 0's mean D(G(z)) on fakes.
    pub d_fake: f32,
    /// Images per second over all ranks.
    pub images_per_s: f64,
    /// The slowest rank's all-reduce wait.
    pub allreduce_ms: f64,
    /// The parameter checksum every rank reported after the step, at steps
    /// that all-reduce (None after a local step).
    pub checksum: Option<u64>,
}

/// A report the coordinator cannot accept; its sender is at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// A report for a step whose gradients are not all reduced yet.
    #[error(
        "reported step {step} before its gradients were reduced (the group is at step {reduced})"
    )]
    Early {
        /// Step as sent.
        step: u64,
        /// Steps fully reduced.
        reduced: u64,
    },
    /// A second report for the same step, or one for a step already complete.
    #[error("reported step {0} twice")]
    Duplicate(u64),
}

/// Collects reports until each step is complete. Only steps before the
/// all-reduce the group waits for can be reported, so at most two rounds
/// of steps (two steps, without averaging) are ever pending, whatever a
/// member sends.
pub struct Reports {
    world: usize,
    cadence: Cadence,
    state: Mutex<State>,
}

struct State {
    pending: BTreeMap<u64, Vec<Option<pb::StepReport>>>,
    /// The first step not yet summarised.
    next: u64,
    /// The last step each rank reported.
    last: Vec<Option<u64>>,
}

impl Reports {
    /// Reports of `world` ranks, from `first_step` on, compared at the
    /// steps `cadence` all-reduces.
    pub fn new(world: usize, first_step: u64, cadence: Cadence) -> Self {
        Self {
            world,
            cadence,
            state: Mutex::new(State {
                pending: BTreeMap::new(),
                next: first_step,
                last: vec![None; world],
            }),
        }
    }

    /// Records `rank`'s report, given that steps before `reduced` have all
    /// their gradients reduced; returns the step's summary once all ranks
    /// reported it, or the divergence their checksums show.
    pub fn add(
        &self,
        rank: usize,
        report: pb::StepReport,
        reduced: u64,
    ) -> Result<Option<Result<StepSummary, Divergence>>, ReportError> {
        let mut state = self.state.lock().expect("reports lock");
        let step = report.step;
        if step >= reduced {
            return Err(ReportError::Early { step, reduced });
        }
        if step < state.next {
            return Err(ReportError::Duplicate(step));
        }
        let world = self.world;
        let slots = state
            .pending
            .entry(step)
            .or_insert_with(|| vec![None; world]);
        if slots[rank].is_some() {
            return Err(ReportError::Duplicate(step));
        }
        slots[rank] = Some(report);
        let complete = slots.iter().all(Option::is_some);
        state.last[rank] = Some(step);
        if !complete {
            return Ok(None);
        }
        let reports: Vec<pb::StepReport> = state
            .pending
            .remove(&step)
            .expect("slots present")
            .into_iter()
            .flatten()
            .collect();
        state.next = step + 1;
        Ok(Some(summarise(step, &reports, self.cadence.syncs(step))))
    }

    /// The last step `rank` reported, if any.
    pub fn last_of(&self, rank: usize) -> Option<u64> {
        self.state.lock().expect("reports lock").last[rank]
    }
}

/// `reports` of `step`, whose checksums must agree when it `synced`.
fn summarise(
    step: u64,
    reports: &[pb::StepReport],
    synced: bool,
) -> Result<StepSummary, Divergence> {
    let checksums: Vec<u64> = reports.iter().map(|r| r.checksum).collect();
    if synced && checksums.iter().any(|c| *c != checksums[0]) {
        return Err(Divergence { step, checksums });
    }
    let first = &reports[0];
    Ok(StepSummary {
        step,
        epoch: first.epoch,
        d_loss: first.d_loss,
        g_loss: first.g_loss,
        d_real: first.d_real,
        d_fake: first.d_fake,
        images_per_s: reports.iter().map(|r| r.images_per_s).sum(),
        allreduce_ms: reports.iter().map(|r| r.allreduce_ms).fold(0.0, f64::max),
        checksum: synced.then_some(first.checksum),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(step: u64, checksum: u64) -> pb::StepReport {
        pb::StepReport {
            step,
            checksum,
            images_per_s: 10.0,
            allreduce_ms: step as f64,
            ..Default::default()
        }
    }

    #[test]
    fn a_step_completes_when_every_rank_reported() {
        let reports = Reports::new(2, 0, Cadence::new(1, 0));
        assert!(reports.add(1, report(0, 7), 1).unwrap().is_none());
        let summary = reports.add(0, report(0, 7), 1).unwrap().unwrap().unwrap();
        assert_eq!((summary.step, summary.images_per_s), (0, 20.0));
        assert_eq!(reports.last_of(1), Some(0));
    }

    #[test]
    fn differing_checksums_are_a_divergence_naming_the_step() {
        let reports = Reports::new(3, 4, Cadence::new(1, 0));
        reports.add(0, report(4, 1), 5).unwrap();
        reports.add(2, report(4, 1), 5).unwrap();
        let err = reports
            .add(1, report(4, 2), 5)
            .unwrap()
            .unwrap()
            .unwrap_err();
        assert_eq!(err.checksums, vec![1, 2, 1]);
        assert!(err.to_string().contains("after step 4"), "{err}");
    }

    /// Reports for steps not yet trained, or sent twice, are refused: a
    /// member cannot make the coordinator hold reports for arbitrary steps.
    #[test]
    fn early_and_repeated_reports_are_refused() {
        let reports = Reports::new(2, 0, Cadence::new(1, 0));
        let early = reports.add(0, report(9, 1), 1).unwrap_err();
        assert!(
            early
                .to_string()
                .contains("before its gradients were reduced"),
            "{early}"
        );
        reports.add(0, report(0, 1), 1).unwrap();
        assert!(matches!(
            reports.add(0, report(0, 1), 1),
            Err(ReportError::Duplicate(0))
        ));
        reports.add(1, report(0, 1), 1).unwrap();
        assert!(matches!(
            reports.add(1, report(0, 1), 1),
            Err(ReportError::Duplicate(0))
        ));
    }

    /// Under post-local SGD replicas differ between averaging steps, and
    /// only there; the checksums of a local step are not compared.
    #[test]
    fn only_averaging_steps_compare_checksums() {
        let reports = Reports::new(2, 0, Cadence::new(2, 0));
        reports.add(0, report(0, 1), 1).unwrap();
        let local = reports.add(1, report(0, 2), 1).unwrap().unwrap().unwrap();
        assert_eq!(local.checksum, None);
        reports.add(0, report(1, 5), 3).unwrap();
        let synced = reports.add(1, report(1, 5), 3).unwrap().unwrap().unwrap();
        assert_eq!(synced.checksum, Some(5));
        reports.add(0, report(2, 1), 3).unwrap();
        reports.add(0, report(3, 1), 5).unwrap();
        reports.add(1, report(2, 7), 3).unwrap().unwrap().unwrap();
        let err = reports
            .add(1, report(3, 2), 5)
            .unwrap()
            .unwrap()
            .unwrap_err();
        assert_eq!(err.step, 3);
    }
}
