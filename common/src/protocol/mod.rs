//! The wire contract between worker and coordinator: the generated gRPC
//! messages and [`pb::PROTOCOL_VERSION`], how gradients travel ([`wire`]:
//! chunks of f32, bf16 or int8 with error feedback), PowerSGD's factors
//! ([`powersgd`]) and how a replica's state is packed ([`bundle`]).
//! Both sides derive every size and shape from here ([`limits`]) and the
//! configuration, never from what a peer claims.

pub mod bundle;
mod convert;
pub mod limits;
pub mod pb;
pub mod powersgd;
pub mod wire;
