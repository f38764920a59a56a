//! The gancluster coordinator: forms the worker group, all-reduces their
//! gradients in rank order, checks that replicas stay identical, and (in
//! local mode) launches and supervises the worker processes.
//!
//! It never touches tensors: it moves and adds bytes, so it builds without
//! burn and stays small.
//!
//! # Layout
//!
//! - [`run`]: one run from start to end: where it resumes from, the pure
//!   lifecycle rules (when to re-form, when to give up) and the async
//!   driver that feeds them events.
//! - `generation`: one generation of the group: the rendezvous (who gets
//!   which place), where it starts from (claims, receipts, the store),
//!   the step reports that must agree.
//! - `allreduce`: the streaming, rank-ordered reduction of gradients and
//!   the checkpoint/stop schedule that travels with it.
//! - `net`: listeners, TLS, the token check, connection limits and the
//!   gRPC handlers.
//! - `local`: launching and watching worker processes (`--workers N`).
//! - `ui`: log lines, the progress display, the summary, Prometheus metrics.
//! - `error`: why a run stops, nested by who must act.
//! - `peers`: every member's outbound stream, with a deadline on each send
//!   (the reducer and the group write to it), and `refusals`: refused
//!   clients logged without letting them flood (the gates and the
//!   rendezvous refuse). Leaves, below every folder that uses them.

mod allreduce;
mod error;
mod generation;
mod local;
mod net;
mod peers;
mod refusals;
pub mod run;
mod ui;

pub use error::{CoordinatorError, GroupFailure};
pub use net::server::{Listeners, LocalSocket};
pub use run::resume::ResumePolicy;
pub use run::{Launch, Mode, Options, Outcome, Report, run, run_on};
pub use ui::display::{Echo, Screen, Verbosity, log_file, logs_dir};
pub use ui::summary::summary;
pub use ui::telemetry::describe as describe_metrics;
