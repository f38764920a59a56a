//! Why a chunk is refused, each blamed on its sender.

use common::protocol::pb::{self};
use common::protocol::wire::{WireError, WireFormat};

use crate::peers::NotReading;

/// A worker sent a chunk the reducer cannot accept. The sender is at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChunkError {
    /// Not the wire format of this step.
    #[error(
        "sent a chunk of step {step} in wire format {got}, but that step travels as {expected:?} \
         (allreduce.wire, or f32 for the step before a checkpoint under int8)"
    )]
    Format {
        /// The step.
        step: u64,
        /// The format field as sent.
        got: i32,
        /// The format of this step.
        expected: WireFormat,
    },
    /// A chunk of another gradient than the one being reduced.
    #[error(
        "sent a chunk of the {net:?} gradient of step {step}{phase} while the group reduces \
         the {expected_net:?} gradient of step {expected_step}{expected_phase}"
    )]
    Unexpected {
        /// Step as sent.
        step: u64,
        /// Network as sent.
        net: pb::Net,
        /// The pass as sent.
        phase: Pass,
        /// The step being reduced.
        expected_step: u64,
        /// The network being reduced.
        expected_net: pb::Net,
        /// The phase being reduced.
        expected_phase: Pass,
    },
    /// A gradient for a step the run does not train.
    #[error("sent a gradient for step {step}, but the group trains steps before {last} only")]
    PastTheEnd {
        /// Step as sent.
        step: u64,
        /// The step count the group trains to.
        last: u64,
    },
    /// The header disagrees with the model's gradient.
    #[error(
        "declared the {net:?} gradient as {total} elements in {count} chunks, but it has \
         {expected_total} elements in {expected_count} chunks (model and allreduce settings)"
    )]
    Shape {
        /// Which network.
        net: pb::Net,
        /// Elements as declared.
        total: u64,
        /// Chunks as declared.
        count: u32,
        /// The model's element count.
        expected_total: usize,
        /// The chunk count that follows.
        expected_count: usize,
    },
    /// An index outside the gradient.
    #[error("sent chunk {index} of a gradient of {count} chunks")]
    Index {
        /// Index as sent.
        index: u32,
        /// Chunks in the gradient.
        count: usize,
    },
    /// The payload does not match the header.
    #[error("chunk {index} of step {step}: {source}")]
    Length {
        /// Chunk index.
        index: u32,
        /// Step.
        step: u64,
        /// Sizes.
        source: WireError,
    },
    /// A group of one sent gradient bytes, which it never needs to.
    #[error(
        "sent {bytes} bytes in chunk {index} of step {step}, but a group of one sends chunk \
         headers only (its mean is its own gradient): is the worker of another version?"
    )]
    Alone {
        /// Chunk index.
        index: u32,
        /// Step.
        step: u64,
        /// Bytes sent.
        bytes: usize,
    },
    /// Same rank sent the same chunk twice.
    #[error("sent chunk {index} of step {step} twice")]
    Duplicate {
        /// Chunk index.
        index: u32,
        /// Step.
        step: u64,
    },
}

/// Which of a network's all-reduces in a step a chunk belongs to, as a
/// message names it: nothing for the gradient (or PowerSGD's first). The
/// wire field is `phase`; the name `Phase` belongs to the run's lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pass(pub u32);

impl std::fmt::Display for Pass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            0 => Ok(()),
            1 => f.write_str(" (PowerSGD's Q factors)"),
            n => write!(f, " (all-reduce {n}, which no mode has)"),
        }
    }
}

/// Why a chunk could not be reduced.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The sender broke the protocol.
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    /// A member did not take the reduced chunk.
    #[error(transparent)]
    NotReading(#[from] NotReading),
    /// The mean is not finite and the policy is to halt.
    #[error("the {net:?} gradient of step {step} is not finite: {culprits}")]
    NonFinite {
        /// The step.
        step: u64,
        /// The network.
        net: pb::Net,
        /// Who sent NaN/Inf.
        culprits: String,
    },
}
