//! What Kubernetes and Prometheus see of a process: the gRPC health
//! service its probes call, and the `/metrics` page Prometheus scrapes.
//!
//! Both listen on ports of their own, in plain text and without the token:
//! the kubelet's `grpc` probe can neither present a token nor speak TLS,
//! and neither answer says anything about the run beyond a status and
//! numbers. Both are opt-in (`--health-listen`, `--metrics-listen`).

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// The health service name the coordinator's readiness probe asks for:
/// SERVING while it accepts workers.
pub const COORDINATOR: &str = "gancluster.Coordinator";
/// The health service name a worker's readiness probe asks for: SERVING
/// while it is a member of a group, NOT_SERVING before it joined and while
/// it has lost its coordinator. The empty name (liveness) is SERVING as
/// long as the process answers.
pub const WORKER: &str = "gancluster.Worker";

/// Health probes are one small request each; more than this on one
/// connection is not a kubelet.
const STREAMS_PER_CONNECTION: u32 = 4;
/// A probe that has not finished by then is cut.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Histogram buckets of every `*_seconds` metric: from a fast GPU step
/// (milliseconds) to a slow checkpoint upload (minutes).
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

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
    /// The Prometheus exporter refused to start.
    #[error("starting the Prometheus exporter on {address} (--metrics-listen): {source}")]
    Metrics {
        /// Where.
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

/// A running gRPC health service and the one status this process changes.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    service: &'static str,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("service", &self.service)
            .finish()
    }
}

impl Health {
    /// Serves `grpc.health.v1.Health` on `address` (inside a tokio
    /// runtime) until the process exits; `service` starts NOT_SERVING.
    pub async fn serve(address: &str, service: &'static str) -> Result<Self, ObserveError> {
        const FLAG: &str = "--health-listen";
        let address = parse(FLAG, address)?;
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|source| ObserveError::Bind {
                flag: FLAG,
                address,
                source,
            })?;
        let (reporter, server) = tonic_health::server::health_reporter();
        reporter
            .set_service_status(service, ServingStatus::NotServing)
            .await;
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let serving = tonic::transport::Server::builder()
            .max_concurrent_streams(STREAMS_PER_CONNECTION)
            .timeout(REQUEST_TIMEOUT)
            .http2_keepalive_interval(Some(REQUEST_TIMEOUT))
            .http2_keepalive_timeout(Some(REQUEST_TIMEOUT))
            .add_service(server)
            .serve_with_incoming(incoming);
        tokio::spawn(async move {
            // The probes then fail, and Kubernetes restarts the pod: say why.
            if let Err(error) = serving.await {
                tracing::error!(%address, %error, "the gRPC health service stopped");
            }
        });
        tracing::info!(%address, service, "gRPC health service listening");
        Ok(Self { reporter, service })
    }

    /// Says whether this process does its job now.
    pub async fn set(&self, serving: bool) {
        let status = match serving {
            true => ServingStatus::Serving,
            false => ServingStatus::NotServing,
        };
        self.reporter.set_service_status(self.service, status).await;
    }
}

/// Installs the process-wide Prometheus recorder and serves `/metrics` on
/// `address` (inside a tokio runtime). Without it, every metric the code
/// records is a no-op.
pub fn serve_metrics(address: &str) -> Result<(), ObserveError> {
    const FLAG: &str = "--metrics-listen";
    let address = parse(FLAG, address)?;
    // Bound first, so a taken port is named as such rather than as an
    // exporter error.
    std::net::TcpListener::bind(address).map_err(|source| ObserveError::Bind {
        flag: FLAG,
        address,
        source,
    })?;
    PrometheusBuilder::new()
        .with_http_listener(address)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .and_then(|b| b.install())
        .map_err(|source| ObserveError::Metrics { address, source })?;
    tracing::info!(%address, "Prometheus metrics at /metrics");
    Ok(())
}
