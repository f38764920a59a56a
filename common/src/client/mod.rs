//! The worker's side of the coordinator protocol, by job:
//!
//! - `connect`: one authenticated connection carrying both services;
//! - `join`: the join request, the call that waits for the group, and
//!   [`rendezvous`], the whole way to a first step;
//! - `session`: one generation's stream, from the start signal to finish,
//!   failure or regroup;
//! - `allreduce`: gradients out and means back on that stream (`spares`
//!   keeps their buffers); `feedback`: int8's residuals and PowerSGD's
//!   state, per network;
//! - `transfer`: a replica given to, or taken from, another member;
//! - `inbound`: the coordinator's messages read and classified, receipts
//!   kept as [`Proof`];
//! - `outbound`: the queue towards the coordinator, and what other tasks
//!   send on it (heartbeats, checkpoint notices, stop requests);
//! - `error`: [`SessionError`], sorted by what a worker should do next.

mod allreduce;
mod connect;
mod error;
mod feedback;
mod inbound;
mod join;
mod outbound;
mod session;
mod spares;
mod transfer;

pub use allreduce::Reduced;
pub use connect::{Authenticated, Clients, connect};
pub use error::SessionError;
pub use inbound::Proof;
pub use join::{join, join_request, rendezvous};
pub use outbound::Notifier;
pub use session::{FAREWELL, Opened, Session};
pub use transfer::{Donor, NoDonation};
