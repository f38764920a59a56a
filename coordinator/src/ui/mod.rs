//! What people and monitoring see of a run: the log and progress line
//! ([`display`], [`progress`]), the closing lines ([`summary`]) and the
//! Prometheus metrics ([`telemetry`]).

pub(crate) mod display;
pub(crate) mod progress;
pub(crate) mod summary;
pub(crate) mod telemetry;
