//! Which sample indices each rank reads, epoch by epoch.
//!
//! Semantics follow PyTorch's `DistributedSampler` with `drop_last=True`
//! followed by a `DataLoader(drop_last=True)`: every epoch has one
//! permutation of the whole data set derived from `(seed, epoch)`, rank `r`
//! of `N` takes positions `r, r+N, r+2N, …`, and every rank runs exactly
//! the same number of steps. Users moving from DDP get the data order they
//! expect, and a run is reproducible from the seed alone.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

/// Deterministic per-epoch sharding of `len` samples over `world` ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardSampler {
    len: usize,
    world: usize,
    rank: usize,
    seed: u64,
}

impl ShardSampler {
    /// A sampler for `rank` out of `world` ranks over `len` samples.
    ///
    /// # Panics
    /// When `world` is zero or `rank >= world`: both are programming errors
    /// that rendezvous rules out before any sampler exists.
    pub fn new(len: usize, world: usize, rank: usize, seed: u64) -> Self {
        assert!(
            world > 0 && rank < world,
            "rank {rank} out of world {world}"
        );
        Self {
            len,
            world,
            rank,
            seed,
        }
    }

    /// Samples each rank sees per epoch; the tail that does not divide
    /// evenly by the world size is dropped so all ranks stay in step.
    pub fn per_rank(&self) -> usize {
        self.len / self.world
    }

    /// Full batches each rank runs per epoch (`drop_last` semantics).
    pub fn steps_per_epoch(&self, batch_size: usize) -> usize {
        self.per_rank() / batch_size.max(1)
    }

    /// This rank's sample indices for `epoch`, in the order it reads them.
    pub fn shard(&self, epoch: u64) -> Vec<usize> {
        epoch_permutation(self.len, self.seed, epoch)
            .into_iter()
            .skip(self.rank)
            .step_by(self.world)
            .take(self.per_rank())
            .collect()
    }
}

/// The permutation every rank agrees on for one epoch.
fn epoch_permutation(len: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch);
    order.shuffle(&mut rng);
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn shards_are_disjoint_equal_and_cover_the_kept_samples() {
        let (len, world) = (103, 4);
        let shards: Vec<Vec<usize>> = (0..world)
            .map(|r| ShardSampler::new(len, world, r, 7).shard(3))
            .collect();
        let mut seen = HashSet::new();
        for shard in &shards {
            assert_eq!(shard.len(), 25);
            for &i in shard {
                assert!(i < len);
                assert!(seen.insert(i), "index {i} appears on two ranks");
            }
        }
        assert_eq!(seen.len(), 100);
    }

    #[test]
    fn rank_r_takes_every_nth_position_of_the_epoch_permutation() {
        let perm = epoch_permutation(50, 11, 2);
        let shard = ShardSampler::new(50, 3, 1, 11).shard(2);
        let expected: Vec<usize> = perm.iter().copied().skip(1).step_by(3).take(16).collect();
        assert_eq!(shard, expected);
    }

    #[test]
    fn order_depends_on_seed_and_epoch_only() {
        let a = ShardSampler::new(1000, 2, 0, 5);
        assert_eq!(a.shard(0), ShardSampler::new(1000, 2, 0, 5).shard(0));
        assert_ne!(a.shard(0), a.shard(1));
        assert_ne!(a.shard(0), ShardSampler::new(1000, 2, 0, 6).shard(0));
    }

    #[test]
    fn steps_per_epoch_drops_the_last_partial_batch() {
        let s = ShardSampler::new(1000, 3, 2, 0);
        assert_eq!(s.per_rank(), 333);
        assert_eq!(s.steps_per_epoch(64), 5);
    }
}
