//! The worker's integration tests, one binary with a module per area (as
//! the workspace's tests/ crate): burn links once, not three times. Run
//! one area with `cargo test -p worker --test integration parity::`.

/// The `worker` binary as a user runs it, on real JPEG files.
mod cli;
/// Our step against PyTorch's stored outputs, tensor by tensor.
mod parity;
/// Training lowers SWD, and compressed wires keep that.
mod swd_quality;
