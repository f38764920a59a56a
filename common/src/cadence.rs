//! Which steps talk to the group (`train.sync_every`).
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
//! Worker and coordinator both derive what travels at which step from
//! this one type, so they cannot disagree on it.

/// The rhythm of a run's all-reduces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cadence {
    every: u64,
}

/// Per trainable parameter, what an averaging step carries: the parameter
/// and Adam's first and second moments.
const STATE_PER_PARAM: u64 = 3;

impl Cadence {
    /// All-reduce at the last step of every `every` (1: every step's
    /// gradients; 0 is taken as 1).
    pub fn new(every: u64) -> Self {
        Self {
            every: every.max(1),
        }
    }

    /// Steps per round.
    pub fn every(self) -> u64 {
        self.every
    }

    /// Whether replicas train alone between all-reduces and average their
    /// state, rather than all-reducing every step's gradients.
    pub fn averages(self) -> bool {
        self.every > 1
    }

    /// Whether step `step` (0-based) all-reduces: the last of its round.
    pub fn syncs(self, step: u64) -> bool {
        (step + 1).is_multiple_of(self.every)
    }

    /// Whether step `step` starts a round: the state before it is the same
    /// on every replica.
    pub fn starts_round(self, step: u64) -> bool {
        step.is_multiple_of(self.every)
    }

    /// The first step at or after `step` that all-reduces.
    pub fn next_sync(self, step: u64) -> u64 {
        step + (self.every - 1 - step % self.every)
    }

    /// Elements one network's all-reduce carries for a network of
    /// `params` trainable parameters: its gradient, or its state when
    /// averaging.
    pub fn elements(self, params: u64) -> u64 {
        match self.averages() {
            true => STATE_PER_PARAM * params,
            false => params,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_step_syncs_its_gradients_by_default() {
        let c = Cadence::new(1);
        assert!(!c.averages());
        assert!((0..5).all(|s| c.syncs(s) && c.starts_round(s) && c.next_sync(s) == s));
        assert_eq!(c.elements(10), 10);
        assert_eq!(Cadence::new(0), c);
    }

    #[test]
    fn rounds_of_four_sync_at_their_last_step_and_carry_the_state() {
        let c = Cadence::new(4);
        assert!(c.averages());
        let syncs: Vec<u64> = (0..12).filter(|&s| c.syncs(s)).collect();
        assert_eq!(syncs, [3, 7, 11]);
        let starts: Vec<u64> = (0..12).filter(|&s| c.starts_round(s)).collect();
        assert_eq!(starts, [0, 4, 8]);
        assert_eq!(
            [0, 3, 4, 5, 7, 8].map(|s| c.next_sync(s)),
            [3, 3, 7, 7, 7, 11]
        );
        assert_eq!(c.elements(10), 30);
    }
}
