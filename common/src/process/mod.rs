//! What both binaries share as processes: their configuration flags
//! ([`cli`]), log setup ([`logging`]), how they end ([`report`]: one
//! message and an exit code a supervisor can act on) and what they serve
//! to monitoring ([`observe`]: health and Prometheus).

pub mod cli;
pub mod logging;
pub mod observe;
pub mod report;
