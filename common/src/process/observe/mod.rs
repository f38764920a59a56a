//! What Kubernetes and Prometheus see of a process: the gRPC health
//! service its probes call, and the `/metrics` page Prometheus scrapes.
//!
//! Both listen on ports of their own, in plain text and without the token:
//! the kubelet's `grpc` probe can neither present a token nor speak TLS,
//! and neither answer says anything about the run beyond a status and
//! numbers. Both are opt-in (`--health-listen`, `--metrics-listen`).
//!
//! Being open to anyone who can reach them, both ports are bounded the
//! same way ([`Bounds`]): without bounds, connections that never speak
//! would pile up until the process runs out of file descriptors, and the
//! token-protected port with it.

mod counted;
mod health;
mod metrics;

use std::net::SocketAddr;
use std::time::Duration;

pub use health::Health;
pub use metrics::serve_metrics;

/// The health service name the coordinator's readiness probe asks for:
/// SERVING while it accepts workers.
pub const COORDINATOR: &str = "gancluster.Coordinator";
/// The health service name a worker's readiness probe asks for: SERVING
/// while it is a member of a group, NOT_SERVING before it joined and while
/// it has lost its coordinator. The empty name (liveness) is SERVING as
/// long as the process answers.
pub const WORKER: &str = "gancluster.Worker";

/// What an observation port holds at most. A kubelet opens one connection
/// per probe and Prometheus one per scrape (or keeps one alive between
/// scrapes and opens another once it is closed); both are done within
/// their timeouts.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    /// Open at once; a connection beyond is closed on accept.
    connections: usize,
    /// Asked to close (HTTP/2 GOAWAY, HTTP/1 `Connection: close` on the
    /// request in flight) this long after it opened...
    age: Duration,
    /// ...and closed this much later, whatever it is doing.
    grace: Duration,
}

/// Why the health or metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    /// The address is not `host:port`.
    #[error("{flag} {address:?} is not an address like 0.0.0.0:8080: {source}")]
    Address {
        /// The flag that named it.
        flag: &'static str,
        /// What it said.
        address: String,
        /// Why it does not parse.
        source: std::net::AddrParseError,
    },
    /// Nothing could listen there.
    #[error("cannot listen on {address} ({flag}): {source}; choose a free port")]
    Bind {
        /// The flag that named it.
        flag: &'static str,
        /// Where.
        address: SocketAddr,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// The Prometheus recorder could not be installed.
    #[error("installing the Prometheus recorder for {address} (--metrics-listen): {source}")]
    Metrics {
        /// Where it would have been served.
        address: SocketAddr,
        /// The exporter's reason.
        source: metrics_exporter_prometheus::BuildError,
    },
}

impl ObserveError {
    /// Whether starting again with the same flags meets it again (a port
    /// taken by another process may be free next time).
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::Address { .. })
    }
}

fn parse(flag: &'static str, address: &str) -> Result<SocketAddr, ObserveError> {
    address.parse().map_err(|source| ObserveError::Address {
        flag,
        address: address.into(),
        source,
    })
}

#[cfg(test)]
mod testing {
    use std::time::Duration;

    use tokio::io::AsyncReadExt;
    use tokio::net::TcpStream;

    /// Long enough for loopback, short against the bounds' point.
    pub const DEADLINE: Duration = Duration::from_secs(3);

    /// Bytes `stream` receives before the server closes it (bounded).
    pub async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
        let mut received = Vec::new();
        let mut buffer = [0u8; 1024];
        loop {
            match tokio::time::timeout(DEADLINE, stream.read(&mut buffer)).await {
                Err(_) => panic!("the server kept the connection open for {DEADLINE:?}"),
                Ok(Ok(0) | Err(_)) => return received,
                Ok(Ok(n)) => received.extend_from_slice(&buffer[..n]),
            }
        }
    }
}
