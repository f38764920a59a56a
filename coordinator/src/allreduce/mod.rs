//! The streaming all-reduce: chunk by chunk, in rank order, one gradient
//! at a time.
//!
//! Each worker streams its flat gradient in chunks. As soon as chunk `k`
//! has arrived from all `N` workers it is summed **in rank order** (so the
//! bits do not depend on who was faster), divided by `N`, and sent back to
//! everyone, while later chunks may still be in flight. Reduction runs on
//! tokio's blocking pool so it never stalls the reactor.
//!
//! Members are trusted to be workers, not to be correct. The group reduces
//! exactly one gradient at a time, in training order (step s's
//! discriminator, then its generator, then step s+1's discriminator…; or
//! only every `train.sync_every`-th step's, whose state is averaged; or,
//! under PowerSGD, each network's P factors, then its Q factors), and
//! its shape is known in advance from the model configuration: a chunk for
//! any other step or network, of another shape or format, with a payload
//! that does not match its header, or sent twice, is refused and blamed on
//! its sender. So memory holds at most one gradient's chunks per worker,
//! whatever a member sends. A mean that is not finite (NaN, Inf, overflow)
//! is handled as `allreduce.nonfinite` says, naming the ranks that sent it.
//!
//! The first reduced chunk of each step's generator gradient is preceded
//! by the [`Schedule`]'s decision for that step (checkpoint, stop), so every
//! worker receives it before it can finish the step.
//!
//! Under error feedback (int8) the coordinator carries a residual of the
//! mean per chunk, as each worker does of its gradient: what encoding the
//! mean rounded away is added to the next step's mean. A step the schedule
//! marks exact travels in f32 and empties it. It lives with the generation.
//!
//! A group of one sends chunk headers without data: its mean is its own
//! gradient, exact whatever the wire format, and the round trip of the
//! whole gradient through the coordinator took longer than a 10 ms GPU
//! step (BENCHMARKS.md). The headers still pace the steps, carry the
//! schedule's decisions back and say whether the gradient is finite.

mod errors;
mod reducer;
pub(crate) mod schedule;
mod shape;

pub(crate) use errors::SubmitError;
pub(crate) use reducer::{Reducer, Waiting};
pub(crate) use shape::Shape;
