//! `worker check-backend`: does this build train like another one?
//!
//! A CUDA build and a CPU build of the same commit start from identical
//! weights (initialisation draws from the run's own seeded stream, not the
//! backend's), read identical batches and draw identical noise, so any
//! difference in their trajectories comes from the backends' arithmetic:
//! convolutions and reductions that accumulate in another order. Those
//! differences are round-off sized at first and grow slowly; a wrong
//! kernel shows up at once, far above them. The check trains K steps
//! standalone (the training code path, unchanged), then compares loss
//! trajectories and final parameters with the other build's output.
//!
//! Three numbers decide, calibrated between two CPU backends of the same
//! commit, flex and ndarray, whose kernels accumulate in different orders
//! (BENCHMARKS.md has the measurement, 32×32 nf16 batch 16):
//! - step 0's D loss, a forward pass before any update: pure arithmetic,
//!   flex vs ndarray equal to the last digit; [`FORWARD_TOLERANCE`] leaves
//!   room for TF32-style tensor-core rounding, not for a wrong kernel (which
//!   is off by far more at once);
//! - the worst relative loss difference over K = 10 steps: 3.7e-3 measured,
//!   [`LOSS_TOLERANCE`] 2e-2;
//! - the relative L2 distance of the final parameters: 1.65e-3 measured,
//!   [`PARAM_TOLERANCE`] 1e-2. Differences grow with the steps (Adam turns a
//!   near-zero gradient's sign flip into a full ±lr step: 1e-4 after one
//!   step, 4.6e-3 after 20), so the check runs 10 steps, not more.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::train::output::{self, LossRow};
use crate::train::replica_loop::PARAMS_F32;
use common::storage::outputs::LOSSES_CSV;

/// Largest relative difference of step 0's D loss: the same forward pass.
pub const FORWARD_TOLERANCE: f64 = 2e-3;

/// Largest relative difference of any step's D or G loss (relative to
/// max(|loss|, 1e-3)) that still counts as the same trajectory.
pub const LOSS_TOLERANCE: f64 = 2e-2;

/// Largest relative L2 distance ‖a − b‖ / ‖b‖ of the final parameters.
pub const PARAM_TOLERANCE: f64 = 1e-2;

/// One build's run, as `train --standalone` left it in its output folder.
#[derive(Debug)]
pub struct Trajectory {
    /// Where it was read from.
    pub dir: PathBuf,
    /// One row per step.
    pub losses: Vec<LossRow>,
    /// Final trainable parameters, G's then D's.
    pub params: Vec<f32>,
}

impl Trajectory {
    /// Reads `losses.csv` and `params.f32` from `dir`.
    pub fn read(dir: &Path) -> anyhow::Result<Self> {
        let csv = dir.join(LOSSES_CSV);
        let text = std::fs::read(&csv).with_context(|| format!("reading {}", csv.display()))?;
        let losses =
            output::parse_history(&text).with_context(|| format!("parsing {}", csv.display()))?;
        let raw = dir.join(PARAMS_F32);
        let bytes = std::fs::read(&raw).with_context(|| format!("reading {}", raw.display()))?;
        anyhow::ensure!(
            bytes.len().is_multiple_of(4),
            "{} holds {} bytes, not a whole number of f32 values",
            raw.display(),
            bytes.len()
        );
        let params = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok(Self {
            dir: dir.to_path_buf(),
            losses,
            params,
        })
    }

    /// xxh3 of the final parameters' bits: equal exactly when bitwise equal.
    pub fn checksum(&self) -> u64 {
        crate::model::params::checksum(&[&self.params])
    }

    /// One `TRAJECTORY` line per step and a `CHECK` line, for logs and diffs.
    pub fn lines(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .losses
            .iter()
            .map(|r| {
                format!(
                    "TRAJECTORY step={} d_loss={:.7} g_loss={:.7} d_real={:.6} d_fake={:.6}",
                    r.step, r.d_loss, r.g_loss, r.d_real, r.d_fake
                )
            })
            .collect();
        lines.push(format!(
            "CHECK backend={} steps={} params={} checksum={:016x}",
            crate::model::backend::NAME,
            self.losses.len(),
            self.params.len(),
            self.checksum()
        ));
        lines
    }
}

/// How far two trajectories are apart.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// Steps compared.
    pub steps: usize,
    /// Relative difference of step 0's D loss (before any update).
    pub forward: f64,
    /// Largest relative loss difference and the step it occurred at.
    pub worst_loss: (f64, u64),
    /// ‖a − b‖ / ‖b‖ over all final parameters.
    pub param_rel_l2: f64,
    /// Largest absolute parameter difference.
    pub param_max_abs: f64,
    /// Whether the final parameters are bitwise equal.
    pub bitwise: bool,
}

impl Comparison {
    /// Compares `a` (this build) with `b` (the reference build).
    pub fn of(a: &Trajectory, b: &Trajectory) -> anyhow::Result<Self> {
        anyhow::ensure!(
            a.losses.len() == b.losses.len() && a.params.len() == b.params.len(),
            "{} ({} steps, {} parameters) and {} ({} steps, {} parameters) are not the same \
             training: run both with the same flags",
            a.dir.display(),
            a.losses.len(),
            a.params.len(),
            b.dir.display(),
            b.losses.len(),
            b.params.len()
        );
        let relative = |x: f32, y: f32| f64::from((x - y).abs()) / f64::from(y.abs().max(1e-3));
        let worst_loss = a
            .losses
            .iter()
            .zip(&b.losses)
            .map(|(x, y)| {
                let worst = relative(x.d_loss, y.d_loss).max(relative(x.g_loss, y.g_loss));
                (worst, y.step)
            })
            .fold(
                (0.0, 0),
                |best, next| if next.0 > best.0 { next } else { best },
            );
        let (mut diff, mut norm, mut max_abs) = (0.0f64, 0.0f64, 0.0f64);
        for (x, y) in a.params.iter().zip(&b.params) {
            let d = f64::from(x - y);
            diff += d * d;
            norm += f64::from(*y) * f64::from(*y);
            max_abs = max_abs.max(d.abs());
        }
        let forward = match (a.losses.first(), b.losses.first()) {
            (Some(x), Some(y)) => relative(x.d_loss, y.d_loss),
            _ => 0.0,
        };
        Ok(Self {
            steps: a.losses.len(),
            forward,
            worst_loss,
            param_rel_l2: diff.sqrt() / norm.sqrt().max(f64::MIN_POSITIVE),
            param_max_abs: max_abs,
            bitwise: a.checksum() == b.checksum(),
        })
    }

    /// Whether every difference is within its tolerance.
    pub fn passes(&self) -> bool {
        self.forward <= FORWARD_TOLERANCE
            && self.worst_loss.0 <= LOSS_TOLERANCE
            && self.param_rel_l2 <= PARAM_TOLERANCE
    }
}

impl std::fmt::Display for Comparison {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "COMPARE steps={} forward_rel={:.3e} worst_loss_rel={:.3e} at_step={} \
             param_rel_l2={:.3e} param_max_abs={:.3e} bitwise={} \
             tolerance_forward={FORWARD_TOLERANCE:.0e} tolerance_loss={LOSS_TOLERANCE:.0e} \
             tolerance_param={PARAM_TOLERANCE:.0e} verdict={}",
            self.steps,
            self.forward,
            self.worst_loss.0,
            self.worst_loss.1,
            self.param_rel_l2,
            self.param_max_abs,
            self.bitwise,
            if self.passes() { "PASS" } else { "FAIL" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trajectory(d_losses: &[f32], params: &[f32]) -> Trajectory {
        Trajectory {
            dir: PathBuf::from("x"),
            losses: d_losses
                .iter()
                .enumerate()
                .map(|(step, &d_loss)| LossRow {
                    step: step as u64,
                    epoch: 0,
                    d_loss,
                    g_loss: 1.0,
                    d_real: 0.5,
                    d_fake: 0.5,
                    images_per_s: 1.0,
                })
                .collect(),
            params: params.to_vec(),
        }
    }

    #[test]
    fn identical_runs_compare_bitwise_equal() {
        let a = trajectory(&[1.0, 0.9], &[0.1, -0.2]);
        let c = Comparison::of(&a, &trajectory(&[1.0, 0.9], &[0.1, -0.2])).unwrap();
        assert!(c.bitwise && c.passes() && c.param_rel_l2 == 0.0, "{c}");
    }

    #[test]
    fn round_off_passes_and_a_wrong_kernel_fails_naming_the_step() {
        let reference = trajectory(&[1.0, 0.9, 0.8], &[0.1, -0.2, 0.3]);
        let close = trajectory(&[1.0, 0.9000001, 0.8000002], &[0.1, -0.2000001, 0.3]);
        assert!(Comparison::of(&close, &reference).unwrap().passes());
        let wrong = trajectory(&[1.0, 0.9, 0.5], &[0.1, -0.2, 0.3]);
        let c = Comparison::of(&wrong, &reference).unwrap();
        assert!(!c.passes() && c.worst_loss.1 == 2, "{c}");
        assert!(c.to_string().contains("verdict=FAIL"), "{c}");
    }

    #[test]
    fn a_wrong_forward_pass_fails_at_step_0() {
        let reference = trajectory(&[1.0, 0.9], &[0.1, -0.2]);
        let c = Comparison::of(&trajectory(&[1.01, 0.9], &[0.1, -0.2]), &reference).unwrap();
        assert!(!c.passes() && c.forward > FORWARD_TOLERANCE, "{c}");
    }

    #[test]
    fn runs_of_different_length_are_refused() {
        let err = Comparison::of(
            &trajectory(&[1.0], &[0.1]),
            &trajectory(&[1.0, 2.0], &[0.1]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("same flags"), "{err}");
    }
}
