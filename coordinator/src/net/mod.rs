//! The coordinator on the network: listeners, the gRPC handlers and who
//! may use them.
//!
//! [`server`] binds TCP (optionally TLS) and the local Unix socket;
//! [`connections`] bounds how many connections a stranger may hold and
//! for how long; [`auth`] checks the token before any handler runs;
//! [`service`] is the thin gRPC layer over the generation's domain
//! objects. Refusals are logged through [`crate::refusals`].

pub(crate) mod auth;
pub(crate) mod connections;
pub(crate) mod server;
pub(crate) mod service;
