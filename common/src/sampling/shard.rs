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
use serde::{Deserialize, Serialize};

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
        self.shard_from(epoch, 0)
    }

    /// This rank's share of `epoch` when the group starts reading it at
    /// permutation position `position` (a resumed run, possibly with another
    /// world size): positions `position + r, position + r + N, …`.
    pub fn shard_from(&self, epoch: u64, position: usize) -> Vec<usize> {
        let remaining = self.len.saturating_sub(position);
        epoch_permutation(self.len, self.seed, epoch)
            .into_iter()
            .skip(position + self.rank)
            .step_by(self.world)
            .take(remaining / self.world)
            .collect()
    }
}

/// Where the group stands in the data: the next step reads `epoch`'s
/// permutation from `position` on. Every step consumes `world × batch`
/// consecutive positions, so the cursor means the same thing for any world
/// size and a checkpoint can resume with a different number of workers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataCursor {
    /// The epoch being read.
    pub epoch: u64,
    /// Permutation positions of that epoch already consumed by all ranks.
    pub position: u64,
}

/// Which part of which shard every step reads, from a starting step and cursor.
#[derive(Debug, Clone, Copy)]
pub struct StepPlan {
    sampler: ShardSampler,
    batch: usize,
    origin_step: u64,
    origin: DataCursor,
    origin_steps: u64,
    steps_per_epoch: u64,
}

/// One step's data: read `shard_from(epoch, shard_position)` from `offset` on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepSlice {
    /// The epoch.
    pub epoch: u64,
    /// Where the group entered this epoch's permutation (0 unless resumed mid-epoch).
    pub shard_position: usize,
    /// Index of the step's first sample within this rank's shard.
    pub offset: usize,
}

impl StepPlan {
    /// Steps from `origin_step` on, reading from `origin`.
    pub fn new(sampler: ShardSampler, batch: usize, origin_step: u64, origin: DataCursor) -> Self {
        let batch = batch.max(1);
        let remaining = sampler.len.saturating_sub(origin.position as usize) / sampler.world;
        Self {
            sampler,
            batch,
            origin_step,
            origin,
            origin_steps: (remaining / batch) as u64,
            steps_per_epoch: sampler.steps_per_epoch(batch) as u64,
        }
    }

    /// Where `step` (at least the origin step) reads.
    pub fn locate(&self, step: u64) -> StepSlice {
        let k = step - self.origin_step;
        if k < self.origin_steps {
            return StepSlice {
                epoch: self.origin.epoch,
                shard_position: self.origin.position as usize,
                offset: k as usize * self.batch,
            };
        }
        let k = k - self.origin_steps;
        StepSlice {
            epoch: self.origin.epoch + 1 + k / self.steps_per_epoch.max(1),
            shard_position: 0,
            offset: (k % self.steps_per_epoch.max(1)) as usize * self.batch,
        }
    }

    /// The cursor once `step` has been trained: what a checkpoint saves.
    pub fn cursor_after(&self, step: u64) -> DataCursor {
        let slice = self.locate(step);
        let consumed = (slice.offset + self.batch) * self.sampler.world;
        DataCursor {
            epoch: slice.epoch,
            position: (slice.shard_position + consumed) as u64,
        }
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

    /// Resuming from a cursor with the same world size reads exactly the
    /// samples the uninterrupted run reads.
    #[test]
    fn a_plan_resumed_from_a_cursor_reads_what_the_original_reads() {
        let (len, world, batch) = (103, 2, 8);
        let sampler = |rank| ShardSampler::new(len, world, rank, 9);
        let samples = |plan: &StepPlan, rank, step| {
            let s = plan.locate(step);
            sampler(rank).shard_from(s.epoch, s.shard_position)[s.offset..s.offset + batch].to_vec()
        };
        let fresh = StepPlan::new(sampler(0), batch, 0, DataCursor::default());
        for stop in [1u64, 3, 6, 7, 13] {
            let cursor = fresh.cursor_after(stop - 1);
            let resumed = StepPlan::new(sampler(0), batch, stop, cursor);
            for step in stop..stop + 10 {
                for rank in 0..world {
                    assert_eq!(
                        samples(&fresh, rank, step),
                        samples(&resumed, rank, step),
                        "{step}"
                    );
                }
            }
        }
    }

    /// With another world size the resumed group finishes the epoch from the
    /// cursor without reading any sample twice.
    #[test]
    fn a_plan_resumed_with_another_world_size_continues_the_epoch() {
        let (len, batch) = (96, 4);
        let two = StepPlan::new(
            ShardSampler::new(len, 2, 0, 1),
            batch,
            0,
            DataCursor::default(),
        );
        let cursor = two.cursor_after(4); // 5 steps × 2 ranks × 4 = 40 positions
        assert_eq!(
            cursor,
            DataCursor {
                epoch: 0,
                position: 40
            }
        );
        let mut seen: HashSet<usize> = (0..2)
            .flat_map(|r| ShardSampler::new(len, 2, r, 1).shard(0)[..20].to_vec())
            .collect();
        let three: Vec<StepPlan> = (0..3)
            .map(|r| StepPlan::new(ShardSampler::new(len, 3, r, 1), batch, 5, cursor))
            .collect();
        for step in 5..9 {
            for (r, plan) in three.iter().enumerate() {
                let s = plan.locate(step);
                assert_eq!(s.epoch, 0);
                let shard = ShardSampler::new(len, 3, r, 1).shard_from(0, s.shard_position);
                for &i in &shard[s.offset..s.offset + batch] {
                    assert!(seen.insert(i), "sample {i} read twice");
                }
            }
        }
        assert_eq!(
            three[0].locate(9).epoch,
            1,
            "(96 - 40) / 3 / 4 = 4 steps left in epoch 0"
        );
    }

    #[test]
    fn steps_per_epoch_drops_the_last_partial_batch() {
        let s = ShardSampler::new(1000, 3, 2, 0);
        assert_eq!(s.per_rank(), 333);
        assert_eq!(s.steps_per_epoch(64), 5);
    }
}
