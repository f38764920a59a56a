//! TensorBoard event files, written as TensorBoard's own reader expects
//! them, so a run can be watched with `tensorboard --logdir runs` while it
//! trains and compared with other runs afterwards.
//!
//! - `record`: the framing of one record (length, data, each with a masked
//!   CRC-32C), written whole so a crash leaves every earlier record readable;
//! - `event`: the `Event` and `Summary` protobufs, as tensorflow's
//!   `event.proto` and `summary.proto` number their fields;
//! - `writer`: [`EventWriter`], one event file per writing process, with
//!   scalars, PNG images, text and the restart marker that lets a resumed
//!   run continue its curves.

mod event;
mod record;
mod writer;

pub use writer::{EventWriter, TensorBoardError};
