//! What Kubernetes and Prometheus ask a gancluster process: its gRPC
//! health status and its `/metrics` page, over plain sockets with bounded
//! waits.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

pub use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// `service`'s status from the gRPC health service at `ip:port`, or `None`
/// when it does not answer within 2 s.
pub fn health(ip: &str, port: u16, service: &str) -> Option<ServingStatus> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime for the health client");
    runtime.block_on(async {
        let call = async {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{ip}:{port}"))
                .ok()?
                .connect()
                .await
                .ok()?;
            let answer = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .ok()?;
            ServingStatus::try_from(answer.into_inner().status).ok()
        };
        tokio::time::timeout(Duration::from_secs(2), call)
            .await
            .ok()
            .flatten()
    })
}

/// The body of a 200 answer to `GET path` at `ip:port` (HTTP/1.1).
pub fn get(ip: &str, port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect((ip, port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// The value of unlabelled metric `name` in a `/metrics` page.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}
