//! The gancluster coordinator: forms the worker group, all-reduces their
//! gradients in rank order, checks that replicas stay identical, and (in
//! local mode) launches and supervises the worker processes.
//!
//! It never touches tensors: it moves and adds bytes, so it builds without
//! burn and stays small.

pub mod allreduce;
pub mod auth;
pub mod connections;
pub mod display;
pub mod error;
pub mod events;
pub mod group;
pub mod launcher;
pub mod origin;
pub mod peers;
pub mod progress;
pub mod receipts;
pub mod refusals;
pub mod rendezvous;
pub mod reports;
pub mod resume;
pub mod run;
pub mod schedule;
pub mod server;
pub mod service;
pub mod summary;
pub mod supervise;
pub mod telemetry;

pub use error::{CoordinatorError, GroupFailure};
pub use resume::ResumePolicy;
pub use run::{Launch, Mode, Options, Outcome, Report, run, run_on};
pub use server::Listeners;
