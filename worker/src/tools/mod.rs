//! The worker's subcommands beside training: `bench` (time the real step),
//! `check-backend` (does this build train like another), `parity` (our step
//! against PyTorch's, tensor by tensor) and `fetch-data` (a data set from
//! S3 into a folder).

pub mod bench;
pub mod check_backend;
pub mod fetch;
pub mod parity;
