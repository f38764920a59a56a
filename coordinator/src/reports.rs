//! Step reports: the proof that replicas stay identical, and what the
//! progress display shows.
//!
//! Every worker reports a checksum of its trainable parameters after each
//! step. Once all ranks reported a step, the checksums must agree; any
//! difference stops the run, since the replicas would otherwise silently
//! train different models.

use std::collections::BTreeMap;
use std::sync::Mutex;

use common::pb;

/// Replicas hold different parameters after a step.
#[derive(Debug, thiserror::Error)]
#[error(
    "replicas diverged after step {step}: parameter checksums per rank {checksums:016x?}; \
     every replica must apply the same averaged gradient, so this is a bug or a faulty machine: \
     restart from the last checkpoint"
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
    /// Images per second over all ranks.
    pub images_per_s: f64,
    /// The slowest rank's all-reduce wait.
    pub allreduce_ms: f64,
}

/// Collects reports until each step is complete.
pub struct Reports {
    world: usize,
    pending: Mutex<BTreeMap<u64, Vec<Option<pb::StepReport>>>>,
}

impl Reports {
    /// Reports of `world` ranks.
    pub fn new(world: usize) -> Self {
        Self {
            world,
            pending: Mutex::new(BTreeMap::new()),
        }
    }

    /// Records `rank`'s report; returns the step's summary once all ranks
    /// reported it, or the divergence their checksums show.
    pub fn add(
        &self,
        rank: usize,
        report: pb::StepReport,
    ) -> Option<Result<StepSummary, Divergence>> {
        let mut pending = self.pending.lock().expect("reports lock");
        let step = report.step;
        let slots = pending
            .entry(step)
            .or_insert_with(|| vec![None; self.world]);
        slots[rank] = Some(report);
        if slots.iter().any(Option::is_none) {
            return None;
        }
        let reports: Vec<pb::StepReport> = pending.remove(&step)?.into_iter().flatten().collect();
        Some(summarise(step, &reports))
    }
}

fn summarise(step: u64, reports: &[pb::StepReport]) -> Result<StepSummary, Divergence> {
    let checksums: Vec<u64> = reports.iter().map(|r| r.checksum).collect();
    if checksums.iter().any(|c| *c != checksums[0]) {
        return Err(Divergence { step, checksums });
    }
    let first = &reports[0];
    Ok(StepSummary {
        step,
        epoch: first.epoch,
        d_loss: first.d_loss,
        g_loss: first.g_loss,
        images_per_s: reports.iter().map(|r| r.images_per_s).sum(),
        allreduce_ms: reports.iter().map(|r| r.allreduce_ms).fold(0.0, f64::max),
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
        let reports = Reports::new(2);
        assert!(reports.add(1, report(0, 7)).is_none());
        let summary = reports.add(0, report(0, 7)).unwrap().unwrap();
        assert_eq!((summary.step, summary.images_per_s), (0, 20.0));
    }

    #[test]
    fn differing_checksums_are_a_divergence_naming_the_step() {
        let reports = Reports::new(3);
        reports.add(0, report(4, 1));
        reports.add(2, report(4, 1));
        let err = reports.add(1, report(4, 2)).unwrap().unwrap_err();
        assert_eq!(err.checksums, vec![1, 2, 1]);
        assert!(err.to_string().contains("after step 4"), "{err}");
    }
}
