//! Code generated from `proto/gancluster.proto`: the coordinator service
//! and its messages. Conversions to domain types live next to the code
//! that uses them.
#![allow(missing_docs)]

tonic::include_proto!("gancluster.v1");

/// Bumped on any incompatible change to the wire contract; a worker of
/// another version is refused at join.
pub const PROTOCOL_VERSION: u32 = 6;
