//! The streaming all-reduce: chunk by chunk, in rank order.
//!
//! Each worker streams its flat gradient in chunks. As soon as chunk `k`
//! has arrived from all `N` workers it is summed **in rank order** (so the
//! bits do not depend on who was faster), divided by `N`, and sent back to
//! everyone, while later chunks may still be in flight. Reduction runs on
//! tokio's blocking pool so it never stalls the reactor; memory holds at
//! most one gradient's chunks per worker, because a worker cannot start the
//! next gradient before it has the mean of the current one.
//!
//! The first reduced chunk of each step's generator gradient is preceded
//! by the [`Schedule`]'s decision for that step (checkpoint, stop), so every
//! worker receives it before it can finish the step.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::pb::{self, coordinator_message};
use common::wire::{self, WireError, WireFormat};

use crate::peers::Peers;
use crate::schedule::Schedule;

/// Identifies one chunk of one gradient.
type Key = (u64, i32, u32);

/// Contributions to one chunk so far.
struct Slot {
    header: pb::GradChunk,
    parts: Vec<Option<Bytes>>,
    arrived: usize,
}

/// A worker sent a chunk the reducer cannot accept.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// The format field is not one we know.
    #[error("unknown wire format {0}")]
    Format(i32),
    /// Same rank sent the same chunk twice.
    #[error("chunk {index} of step {step} sent twice")]
    Duplicate {
        /// Chunk index.
        index: u32,
        /// Step.
        step: u64,
    },
    /// Ranks disagree on the gradient's shape or encoding.
    #[error(
        "chunk {index} of step {step} disagrees with rank 0's header (count, length or format)"
    )]
    Mismatch {
        /// Chunk index.
        index: u32,
        /// Step.
        step: u64,
    },
    /// The payload does not match the header.
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// Collects chunks from all ranks and broadcasts each mean as it completes.
pub struct Reducer {
    world: usize,
    peers: Arc<Peers>,
    schedule: Arc<Schedule>,
    pending: Mutex<HashMap<Key, Slot>>,
}

impl Reducer {
    /// A reducer for `world` ranks answering through `peers`, announcing
    /// `schedule`'s decisions.
    pub fn new(world: usize, peers: Arc<Peers>, schedule: Arc<Schedule>) -> Self {
        Self {
            world,
            peers,
            schedule,
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// Accepts `rank`'s contribution; when it completes the chunk, reduces
    /// and broadcasts it before returning.
    pub async fn submit(&self, rank: usize, mut chunk: pb::GradChunk) -> Result<(), ChunkError> {
        let format = format_of(chunk.format)?;
        let data = std::mem::take(&mut chunk.data);
        let complete = {
            let mut pending = self.pending.lock().expect("reducer lock");
            let key = (chunk.step, chunk.net, chunk.index);
            let slot = pending.entry(key).or_insert_with(|| Slot {
                header: chunk.clone(),
                parts: vec![None; self.world],
                arrived: 0,
            });
            let h = &slot.header;
            if (h.count, h.total_elems, h.format) != (chunk.count, chunk.total_elems, chunk.format)
            {
                return Err(ChunkError::Mismatch {
                    index: chunk.index,
                    step: chunk.step,
                });
            }
            if slot.parts[rank].replace(data).is_some() {
                return Err(ChunkError::Duplicate {
                    index: chunk.index,
                    step: chunk.step,
                });
            }
            slot.arrived += 1;
            (slot.arrived == self.world).then(|| pending.remove(&key).expect("slot present"))
        };
        let Some(slot) = complete else { return Ok(()) };
        let parts: Vec<Bytes> = slot
            .parts
            .into_iter()
            .map(|p| p.expect("all ranks arrived"))
            .collect();
        let world = self.world;
        let mean = tokio::task::spawn_blocking(move || wire::mean(&parts, format, world))
            .await
            .expect("reduction task panicked")?;
        let reduced = pb::GradChunk {
            data: mean,
            ..slot.header
        };
        if reduced.net == pb::Net::Generator as i32
            && reduced.index == 0
            && let Some(control) = self.schedule.control(reduced.step)
        {
            self.peers
                .broadcast(coordinator_message::Kind::Control(control))
                .await;
        }
        self.peers
            .broadcast(coordinator_message::Kind::Chunk(reduced))
            .await;
        Ok(())
    }

    /// What the all-reduce is waiting for, if a chunk is in flight.
    pub fn waiting(&self) -> Option<Waiting> {
        let pending = self.pending.lock().expect("reducer lock");
        let (&(step, net, index), slot) = pending.iter().min_by_key(|(key, _)| **key)?;
        Some(Waiting {
            step,
            net: pb::Net::try_from(net).unwrap_or(pb::Net::Unspecified),
            index,
            ranks: (0..self.world)
                .filter(|&r| slot.parts[r].is_none())
                .collect(),
        })
    }
}

/// The oldest gradient chunk still being collected: which step and net it
/// belongs to and which ranks have not sent it yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    /// Step of the chunk.
    pub step: u64,
    /// Which network's gradient.
    pub net: pb::Net,
    /// Chunk index.
    pub index: u32,
    /// Ranks whose contribution is missing.
    pub ranks: Vec<usize>,
}

impl std::fmt::Display for Waiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the all-reduce waits for rank(s) {:?} to send chunk {} of the {:?} gradient of step {}",
            self.ranks, self.index, self.net, self.step
        )
    }
}

fn format_of(value: i32) -> Result<WireFormat, ChunkError> {
    match pb::WireFormat::try_from(value) {
        Ok(pb::WireFormat::F32) => Ok(WireFormat::F32),
        Ok(pb::WireFormat::Bf16) => Ok(WireFormat::Bf16),
        _ => Err(ChunkError::Format(value)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(step: u64, net: pb::Net, index: u32) -> pb::GradChunk {
        pb::GradChunk {
            step,
            net: net as i32,
            index,
            count: 2,
            total_elems: 2,
            format: pb::WireFormat::F32 as i32,
            data: wire::encode(&[1.0], WireFormat::F32),
        }
    }

    #[tokio::test]
    async fn waiting_names_the_oldest_chunk_and_who_has_not_sent_it() {
        let reducer = Reducer::new(3, Arc::new(Peers::new(3)), Arc::new(Schedule::new(0, 10)));
        assert_eq!(reducer.waiting(), None);
        reducer
            .submit(2, chunk(4, pb::Net::Generator, 0))
            .await
            .unwrap();
        reducer
            .submit(0, chunk(4, pb::Net::Discriminator, 1))
            .await
            .unwrap();
        reducer
            .submit(2, chunk(4, pb::Net::Discriminator, 1))
            .await
            .unwrap();
        let waiting = reducer.waiting().unwrap();
        assert_eq!(
            (waiting.step, waiting.net, waiting.index, waiting.ranks),
            (4, pb::Net::Discriminator, 1, vec![1])
        );
    }
}
