//! Which samples each rank reads ([`shard`]: DistributedSampler's order,
//! resumable from a cursor) and which steps talk to the group
//! ([`cadence`]: every step, or post-local SGD rounds).

pub mod cadence;
pub mod shard;
