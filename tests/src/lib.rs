//! Support for tests that run gancluster's real binaries: a process
//! harness ([`process`]), signals ([`signals`]) and what the tests know
//! about gancluster itself ([`cluster`]).
//!
//! Every child runs under a deadline and is killed when its handle drops,
//! so a hung or failing test never leaves processes behind.

pub mod certs;
pub mod client;
pub mod cluster;
pub mod manifests;
pub mod moto;
pub mod probes;
pub mod process;
pub mod pty;
pub mod python;
pub mod s3;
pub mod signals;

pub use cluster::{
    Cluster, Generation, TINY, bitwise_equal, free_port, read_f32, read_membership,
    tiny_coordinator, wait_for_address, wait_for_steps, workspace_bin,
};
pub use process::{Finished, Running, run, wait_until};
pub use signals::{Frozen, children, exited, kill9, terminate};
