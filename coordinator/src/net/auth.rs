//! The token check in front of both services.
//!
//! It runs on a request's headers, before tonic reads a byte of its body:
//! an unauthenticated caller gets UNAUTHENTICATED at once and cannot make
//! the coordinator buffer anything. A request that passes marks its
//! connection authenticated, which lifts the connection's handshake
//! deadline ([`crate::net::connections`]).

use std::sync::Arc;

use common::security::auth::Token;
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::net::connections::ticket_of;
use crate::refusals::Refusals;

/// Admits requests carrying the token.
#[derive(Clone)]
pub struct Authenticator {
    token: Token,
    refusals: Arc<Refusals>,
}

impl Authenticator {
    /// Checks for `token`, logging refusals through `refusals`.
    pub fn new(token: Token, refusals: Arc<Refusals>) -> Self {
        Self { token, refusals }
    }
}

impl Interceptor for Authenticator {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let ticket = ticket_of(&request);
        if self.token.admits(&request) {
            if let Some(ticket) = ticket {
                ticket.authenticate();
            }
            return Ok(request);
        }
        let peer = ticket.map_or_else(|| "unknown peer".into(), |t| t.peer.clone());
        self.refusals.record(&peer, "wrong or missing token");
        Err(Status::unauthenticated(
            "wrong or missing token: give every worker the coordinator's GANCLUSTER_TOKEN",
        ))
    }
}
