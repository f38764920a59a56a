//! The gRPC health service Kubernetes' probes call.

use std::time::Duration;

use tokio::net::TcpListener;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use super::counted::counted;
use super::{Bounds, ObserveError, parse};

/// Health probes are one small request each; more than this on one
/// connection is not a kubelet.
const STREAMS_PER_CONNECTION: u32 = 4;
/// A probe that has not finished by then is cut.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The health port's bounds: a connection that answers keepalive pings
/// forever is asked to go after one probe's time.
const BOUNDS: Bounds = Bounds {
    connections: 16,
    age: REQUEST_TIMEOUT,
    grace: Duration::from_secs(1),
};

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

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::io::AsyncReadExt;
    use tokio::net::TcpStream;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    use super::*;
    use crate::process::observe::WORKER;
    use crate::process::observe::testing::{DEADLINE, read_until_closed};

    async fn start(bounds: Bounds) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        Health::serve_on(listener, WORKER, bounds).await;
        address
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
        assert_eq!(
            read_until_closed(&mut beyond).await.len(),
            0,
            "closed unanswered"
        );
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
            !read_until_closed(&mut silent).await.is_empty(),
            "the preface, then the close"
        );
    }
}
