//! Who may talk to the coordinator and how what they say is shown: the
//! shared token ([`auth`]), TLS and mutual TLS ([`tls`]), and peer text
//! made safe to log ([`untrusted`]).

pub mod auth;
pub mod tls;
pub mod untrusted;
