//! What Kubernetes and Prometheus see of a process: the gRPC health
//! service its probes call, and the `/metrics` page Prometheus scrapes.
//!
//! Both listen on ports of their own, in plain text and without the token:
//! the kubelet's `grpc` probe can neither present a token nor speak TLS,
//! and neither answer says anything about the run beyond a status and
//! numbers. Both are opt-in (`--health-listen`, `--metrics-listen`).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::{Connected, TcpConnectInfo};
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

/// What the health port holds at most. It is open to anyone who can reach
/// it, so without bounds connections that never speak, or that answer
/// keepalive pings forever, would pile up until the process runs out of
/// file descriptors, and the token-protected port with it. A kubelet opens
/// one connection per probe and is done within its probe timeout.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    /// Open at once; a connection beyond is closed on accept.
    connections: usize,
    /// Asked to close (HTTP/2 GOAWAY) this long after it opened...
    age: Duration,
    /// ...and closed this much later, whatever it is doing.
    grace: Duration,
}

const BOUNDS: Bounds = Bounds {
    connections: 16,
    age: REQUEST_TIMEOUT,
    grace: Duration::from_secs(1),
};

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
        let listener = TcpListener::bind(address)
            .await
            .map_err(|source| ObserveError::Bind {
                flag: FLAG,
                address,
                source,
            })?;
        let health = Self::serve_on(listener, service, BOUNDS).await;
        tracing::info!(%address, service, "gRPC health service listening");
        Ok(health)
    }

    async fn serve_on(listener: TcpListener, service: &'static str, bounds: Bounds) -> Self {
        let address = listener.local_addr().ok();
        let (reporter, server) = tonic_health::server::health_reporter();
        reporter
            .set_service_status(service, ServingStatus::NotServing)
            .await;
        let serving = tonic::transport::Server::builder()
            .max_concurrent_streams(STREAMS_PER_CONNECTION)
            .timeout(REQUEST_TIMEOUT)
            .http2_keepalive_interval(Some(REQUEST_TIMEOUT))
            .http2_keepalive_timeout(Some(REQUEST_TIMEOUT))
            .max_connection_age(bounds.age)
            .max_connection_age_grace(bounds.grace)
            .add_service(server)
            .serve_with_incoming(counted(listener, bounds.connections));
        tokio::spawn(async move {
            // The probes then fail, and Kubernetes restarts the pod: say why.
            if let Err(error) = serving.await {
                tracing::error!(?address, %error, "the gRPC health service stopped");
            }
        });
        Self { reporter, service }
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

/// Accepted connections, at most `limit` open at once: one beyond is
/// closed as soon as it is accepted (its peer reads end of stream).
fn counted(listener: TcpListener, limit: usize) -> impl Stream<Item = io::Result<Counted>> {
    let slots = Arc::new(Semaphore::new(limit));
    futures::stream::unfold((listener, slots), |(listener, slots)| async move {
        loop {
            let accepted = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => return Some((Err(error), (listener, slots))),
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                continue;
            };
            // Probes are small request/response exchanges.
            let _ = accepted.set_nodelay(true);
            let counted = Counted {
                stream: accepted,
                _slot: slot,
            };
            return Some((Ok(counted), (listener, slots)));
        }
    })
}

/// A connection holding one of the health port's slots until it closes.
struct Counted {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl Connected for Counted {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
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

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    use super::*;

    /// Long enough for loopback, short against the bounds' point.
    const DEADLINE: Duration = Duration::from_secs(3);

    async fn start(bounds: Bounds) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        Health::serve_on(listener, WORKER, bounds).await;
        address
    }

    /// Bytes `stream` receives before the server closes it (bounded).
    async fn read_until_closed(stream: &mut TcpStream) -> usize {
        let mut received = 0;
        let mut buffer = [0u8; 1024];
        loop {
            match tokio::time::timeout(DEADLINE, stream.read(&mut buffer)).await {
                Err(_) => panic!("the server kept the connection open for {DEADLINE:?}"),
                Ok(Ok(0) | Err(_)) => return received,
                Ok(Ok(n)) => received += n,
            }
        }
    }

    /// A probe's answer; none while the server turns connections away.
    async fn status(address: SocketAddr) -> Option<i32> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .ok()?
            .connect_timeout(DEADLINE)
            .timeout(DEADLINE)
            .connect()
            .await
            .ok()?;
        let request = HealthCheckRequest {
            service: WORKER.into(),
        };
        let answer = HealthClient::new(channel).check(request).await.ok()?;
        Some(answer.into_inner().status)
    }

    #[tokio::test]
    async fn a_connection_beyond_the_bound_is_closed_and_a_freed_slot_serves_again() {
        let bounds = Bounds {
            connections: 2,
            age: Duration::from_secs(600),
            grace: Duration::from_secs(1),
        };
        let address = start(bounds).await;
        let mut holders = Vec::new();
        for _ in 0..bounds.connections {
            let mut silent = TcpStream::connect(address).await.unwrap();
            // The server's HTTP/2 preface: this one holds a slot.
            let mut preface = [0u8; 9];
            tokio::time::timeout(DEADLINE, silent.read_exact(&mut preface))
                .await
                .expect("a held connection hears the server's preface")
                .unwrap();
            holders.push(silent);
        }
        let mut beyond = TcpStream::connect(address).await.unwrap();
        assert_eq!(read_until_closed(&mut beyond).await, 0, "closed unanswered");
        holders.pop();
        let serving = tokio::time::timeout(DEADLINE, async {
            loop {
                // The slot is free once the server has seen the close.
                if let Some(status) = status(address).await {
                    return status;
                }
            }
        })
        .await
        .expect("a probe is served once a slot is free");
        assert_eq!(serving, ServingStatus::NotServing as i32);
    }

    #[tokio::test]
    async fn a_connection_that_never_speaks_is_closed_after_its_age() {
        let address = start(Bounds {
            connections: 4,
            age: Duration::from_millis(200),
            grace: Duration::from_millis(200),
        })
        .await;
        let mut silent = TcpStream::connect(address).await.unwrap();
        assert!(
            read_until_closed(&mut silent).await > 0,
            "the preface, then the close"
        );
    }
}
