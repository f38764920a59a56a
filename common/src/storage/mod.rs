//! Everything that outlives a process: the object store behind one URL
//! ([`store`]: S3, a folder, memory), the checkpoint layout and its
//! invariants on top of it ([`checkpoint`]), the one-coordinator-per-run
//! lock and lease ([`lease`]), and the names of the files a run leaves in
//! its output folder ([`outputs`]).

pub mod checkpoint;
pub mod lease;
pub mod outputs;
pub mod store;
