//! Error feedback, per network: what int8 rounded away from this worker's
//! gradients and owes the next step, and PowerSGD's state. It lives with
//! the session: a new generation starts without it, and every exact step
//! leaves none, so a checkpoint needs none.

use crate::Config;
use crate::protocol::powersgd::PowerSgd;
use crate::protocol::wire::Net;

/// Which network's PowerSGD state.
#[derive(Debug, Clone, Copy)]
pub(super) enum PowerSgdSlot {
    Discriminator = 0,
    Generator = 1,
}

impl PowerSgdSlot {
    pub(super) fn of(net: Net) -> Self {
        match net {
            Net::Discriminator => Self::Discriminator,
            Net::Generator => Self::Generator,
        }
    }
}

/// Fresh PowerSGD states for both networks, when `allreduce.powersgd_rank` asks.
pub(super) fn powersgd_of(cfg: &Config) -> Option<[PowerSgd; 2]> {
    let rank = cfg.allreduce.powersgd_rank;
    (rank > 0).then(|| PowerSgd::per_network(&cfg.model, rank))
}

/// A worker's error-feedback residuals, one per network (empty before the
/// first step). Taken out for an all-reduce and put back after it, so the
/// gradients' worth of floats is never copied.
#[derive(Default)]
pub(super) struct Residuals {
    discriminator: Vec<f32>,
    generator: Vec<f32>,
}

impl Residuals {
    fn slot(&mut self, net: Net) -> &mut Vec<f32> {
        match net {
            Net::Discriminator => &mut self.discriminator,
            Net::Generator => &mut self.generator,
        }
    }

    /// `net`'s residual (zeros before the first step), until [`Self::put`].
    pub(super) fn take(&mut self, net: Net, elems: usize) -> Vec<f32> {
        let residual = std::mem::take(self.slot(net));
        match residual.len() == elems {
            true => residual,
            false => vec![0.0; elems],
        }
    }

    pub(super) fn put(&mut self, net: Net, residual: Vec<f32>) {
        *self.slot(net) = residual;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn residuals_are_per_network_and_zero_when_none_of_that_length_is_kept() {
        let mut residuals = Residuals::default();
        assert_eq!(residuals.take(Net::Generator, 3), vec![0.0; 3]);
        residuals.put(Net::Generator, vec![0.5; 3]);
        residuals.put(Net::Discriminator, vec![0.25; 2]);
        assert_eq!(residuals.take(Net::Generator, 3), vec![0.5; 3]);
        assert_eq!(residuals.take(Net::Discriminator, 4), vec![0.0; 4]);
        assert_eq!(
            residuals.take(Net::Generator, 3),
            vec![0.0; 3],
            "taken once"
        );
    }

    #[test]
    fn powersgd_state_exists_only_when_a_rank_is_set() {
        let mut cfg = Config::default();
        cfg.allreduce.powersgd_rank = 0;
        assert!(powersgd_of(&cfg).is_none());
        cfg.allreduce.powersgd_rank = 2;
        assert!(powersgd_of(&cfg).is_some());
        assert_eq!(PowerSgdSlot::of(Net::Generator) as usize, 1);
        assert_eq!(PowerSgdSlot::of(Net::Discriminator) as usize, 0);
    }
}
