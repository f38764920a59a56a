//! The worker's side of the coordinator protocol: connect, join, then one
//! long-lived stream for all-reduces, step reports and control; replica
//! transfer to and from the coordinator; heartbeats.

pub mod session;
mod spares;
