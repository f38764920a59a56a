//! Which steps talk to the group (`train.sync_every`, `train.sync_warmup`).
//!
//! At the default of 1 every step all-reduces its gradients, as DDP does.
//! With H > 1 a replica trains H steps on its own gradients (post-local
//! SGD) and only the last step of each round of H all-reduces: not a
//! gradient but the replica's whole optimizer state per network, its
//! parameters and both Adam moments, whose mean every replica then takes.
//! Replicas are identical only at those steps, so checksums are compared,
//! checkpoints taken and stops made there, and a replica that must go back
//! goes back to the start of its round.
//!
//! Local steps may begin only after a warm-up of steps that all-reduce
//! their gradients (Lin et al.'s post-local SGD): at W = 4, local steps
//! from the start cost this GAN 27–40 % of its SWD, and a warm-up took
//! that loss away (BENCHMARKS.md). Each warm-up step is a round of its own.
//! PowerSGD (`allreduce.powersgd_rank`) waits for the same warm-up before
//! it compresses, for the same reason.
//!
//! Worker and coordinator both derive what travels at which step from
//! this one type, so they cannot disagree on it.

use crate::config::TrainConfig;

/// The rhythm of a run's all-reduces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cadence {
    every: u64,
    warmup: u64,
}

/// Per trainable parameter, what an averaging step carries: the parameter
/// and Adam's first and second moments.
const STATE_PER_PARAM: u64 = 3;

impl Cadence {
    /// All-reduce at the last step of every `every` (1: every step's
    /// gradients; 0 is taken as 1) once the first `warmup` steps, which
    /// all-reduce their gradients, are done. Configuration validation
    /// keeps `warmup` a multiple of `every`, so rounds stay aligned to it.
    pub fn new(every: u64, warmup: u64) -> Self {
        Self {
            every: every.max(1),
            warmup,
        }
    }

    /// The cadence `train` configures.
    pub fn of(train: &TrainConfig) -> Self {
        Self::new(train.sync_every, train.sync_warmup)
    }

    /// Steps per round after the warm-up.
    pub fn every(self) -> u64 {
        self.every
    }

    /// Whether step `step` (0-based) all-reduces its gradients, as every
    /// step of the default cadence and of the warm-up does, rather than
    /// training alone and maybe averaging state.
    pub fn shares_gradients(self, step: u64) -> bool {
        self.every == 1 || step < self.warmup
    }

    /// Whether step `step` is one of the warm-up's: its gradients travel
    /// whole, before post-local SGD's rounds or PowerSGD's compression
    /// begin (PyTorch's `start_localSGD_iter`, `start_powerSGD_iter`).
    pub fn warming_up(self, step: u64) -> bool {
        step < self.warmup
    }

    /// Whether step `step` all-reduces: the last of its round.
    pub fn syncs(self, step: u64) -> bool {
        self.shares_gradients(step) || (step + 1).is_multiple_of(self.every)
    }

    /// Whether step `step` starts a round: the state before it is the same
    /// on every replica.
    pub fn starts_round(self, step: u64) -> bool {
        self.shares_gradients(step) || step.is_multiple_of(self.every)
    }

    /// The first step at or after `step` that all-reduces.
    pub fn next_sync(self, step: u64) -> u64 {
        match self.shares_gradients(step) {
            true => step,
            false => step + (self.every - 1 - step % self.every),
        }
    }

    /// Elements one network's all-reduce at step `step` carries for a
    /// network of `params` trainable parameters: its gradient, or its
    /// state when averaging.
    pub fn elements(self, step: u64, params: u64) -> u64 {
        match self.shares_gradients(step) {
            true => params,
            false => STATE_PER_PARAM * params,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_step_syncs_its_gradients_by_default() {
        let c = Cadence::new(1, 0);
        assert!((0..5).all(|s| c.shares_gradients(s)
            && c.syncs(s)
            && c.starts_round(s)
            && c.next_sync(s) == s
            && c.elements(s, 10) == 10));
        assert_eq!(Cadence::new(0, 0), c);
    }

    #[test]
    fn rounds_of_four_sync_at_their_last_step_and_carry_the_state() {
        let c = Cadence::new(4, 0);
        assert!((0..12).all(|s| !c.shares_gradients(s)));
        let syncs: Vec<u64> = (0..12).filter(|&s| c.syncs(s)).collect();
        assert_eq!(syncs, [3, 7, 11]);
        let starts: Vec<u64> = (0..12).filter(|&s| c.starts_round(s)).collect();
        assert_eq!(starts, [0, 4, 8]);
        assert_eq!(
            [0, 3, 4, 5, 7, 8].map(|s| c.next_sync(s)),
            [3, 3, 7, 7, 7, 11]
        );
        assert_eq!(c.elements(5, 10), 30);
    }

    #[test]
    fn a_warm_up_shares_gradients_every_step_then_rounds_begin() {
        let c = Cadence::new(4, 8);
        let shares: Vec<u64> = (0..16).filter(|&s| c.shares_gradients(s)).collect();
        assert_eq!(shares, [0, 1, 2, 3, 4, 5, 6, 7]);
        let syncs: Vec<u64> = (0..16).filter(|&s| c.syncs(s)).collect();
        assert_eq!(syncs, [0, 1, 2, 3, 4, 5, 6, 7, 11, 15]);
        let starts: Vec<u64> = (0..16).filter(|&s| c.starts_round(s)).collect();
        assert_eq!(starts, [0, 1, 2, 3, 4, 5, 6, 7, 8, 12]);
        assert_eq!(
            [6, 7, 8, 11, 12].map(|s| c.next_sync(s)),
            [6, 7, 11, 11, 15]
        );
        assert_eq!([7, 8].map(|s| c.elements(s, 10)), [10, 30]);
    }
}
