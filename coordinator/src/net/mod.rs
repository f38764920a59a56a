//! The coordinator on the network: listeners, the gRPC handlers and who
//! may use them.
//!
//! [`server`] binds TCP (optionally TLS) and the local Unix socket;
//! [`connections`] bounds how many connections a stranger may hold and
//! for how long; [`auth`] checks the token before any handler runs;
//! [`service`] is the thin gRPC layer over the generation's domain
//! objects; [`peers`] is every member's outbound stream with a deadline
//! on each send; [`refusals`] logs refusals without letting them flood.

pub(crate) mod auth;
pub(crate) mod connections;
pub(crate) mod peers;
pub(crate) mod refusals;
pub(crate) mod server;
pub(crate) mod service;
