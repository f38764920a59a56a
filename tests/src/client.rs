//! A client that speaks the coordinator's protocol the way a broken or
//! hostile peer would: it can join, open a session and then send whatever
//! a test wants, including what a real worker never sends. Also a raw
//! HTTP/2 client for what gRPC clients cannot do (declare a huge body and
//! stall).

use std::time::Duration;

use bytes::Bytes;
use common::Config;
use common::client::{self, Clients, Session};
use common::protocol::pb::{self, coordinator_message, worker_message};
use common::security::auth::{self, Token};
use common::storage::checkpoint::{Checkpoints, STATE};
use common::storage::store::Store;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Connects to `address` presenting `token` (unchecked: tests send bad ones too).
pub async fn connect(address: &str, cfg: &Config, token: &str) -> Clients {
    let token = Token::new(token).expect("a token a header can carry");
    client::connect(address, cfg, &token)
        .await
        .unwrap_or_else(|e| panic!("connecting to {address}: {e}"))
}

/// A join request for `cfg`, asking for `rank` (-1: any).
pub fn join_request(cfg: &Config, rank: i32, checksum: u64, host: &str) -> pb::JoinRequest {
    pb::JoinRequest {
        protocol_version: pb::PROTOCOL_VERSION,
        config_hash: cfg.training_hash(),
        requested_rank: rank,
        initial_checksum: checksum,
        host: host.to_string(),
        held: None,
        proof: None,
        previous_member: String::new(),
    }
}

/// A member's open session with nothing between the test and the wire
/// but heartbeats (every 500 ms, as a live process sends them), so what a
/// test makes it do or not do is the only thing wrong with it.
pub struct RawSession {
    /// What the member sends.
    pub outbound: mpsc::Sender<pb::WorkerMessage>,
    /// What the coordinator sends.
    pub inbound: tonic::Streaming<pb::CoordinatorMessage>,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl Drop for RawSession {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

impl RawSession {
    /// Opens the session of `joined` on `clients` (which must be the
    /// connection that joined), says Hello and waits for Start.
    pub async fn open(
        clients: &mut Clients,
        joined: &pb::JoinReply,
    ) -> Result<Self, tonic::Status> {
        let (session, first) = Self::open_raw(clients, joined).await?;
        match first {
            Some(coordinator_message::Kind::Start(_)) => Ok(session),
            other => panic!("expected Start, got {other:?}"),
        }
    }

    /// Opens the session of `joined` on `clients`, says Hello and returns
    /// it with the coordinator's first message, whatever it is.
    pub async fn open_raw(
        clients: &mut Clients,
        joined: &pb::JoinReply,
    ) -> Result<(Self, Option<coordinator_message::Kind>), tonic::Status> {
        let (outbound, rx) = mpsc::channel(64);
        let hello = pb::Hello {
            member_id: joined.member_id.clone(),
            generation: joined.generation,
        };
        outbound
            .send(message(worker_message::Kind::Hello(hello)))
            .await
            .expect("queue open");
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        request
            .metadata_mut()
            .insert(auth::MEMBER, joined.member_id.parse().expect("ascii id"));
        let mut inbound = clients.coordinator.session(request).await?.into_inner();
        let beats = outbound.clone();
        let heartbeat = tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(500));
            let beat = || message(worker_message::Kind::Heartbeat(pb::Heartbeat::default()));
            loop {
                every.tick().await;
                if beats.send(beat()).await.is_err() {
                    break;
                }
            }
        });
        // Beating already: a member may wait long for its first message
        // (while another member's replica travels).
        let first = inbound.message().await?.and_then(|m| m.kind);
        let session = Self {
            outbound,
            inbound,
            heartbeat,
        };
        Ok((session, first))
    }

    /// Sends `kind` (whatever it is).
    pub async fn send(&self, kind: worker_message::Kind) {
        let _ = self.outbound.send(message(kind)).await;
    }

    /// The next message from the coordinator, or how the stream ended,
    /// within `limit`.
    pub async fn next(
        &mut self,
        limit: Duration,
    ) -> Result<Option<pb::CoordinatorMessage>, tonic::Status> {
        tokio::time::timeout(limit, self.inbound.message())
            .await
            .unwrap_or_else(|_| panic!("the coordinator said nothing within {limit:?}"))
    }
}

/// A worker message of `kind`.
pub fn message(kind: worker_message::Kind) -> pb::WorkerMessage {
    pb::WorkerMessage { kind: Some(kind) }
}

/// What a well-behaved rank 0 does when the coordinator asks for the
/// checkpoint after `step`: writes one (a tiny stand-in object; the
/// coordinator checks completeness, not meaning) and says so. Returns
/// whether it was asked.
pub async fn answer_checkpoint(session: &mut Session, cfg: &Config, step: u64) -> bool {
    let Some(control) = session.take_control(step) else {
        return false;
    };
    if !control.checkpoint {
        return false;
    }
    let store = Store::open(&cfg.checkpoint).expect("the test's store");
    let checkpoints = Checkpoints::new(store, &cfg.checkpoint.run);
    let objects = vec![(STATE.to_string(), Bytes::from_static(b"{}"))];
    checkpoints
        .write(step + 1, objects)
        .await
        .expect("writing the stand-in checkpoint");
    session
        .notifier()
        .checkpoint_written(step + 1, Ok(()))
        .await
        .expect("reporting the checkpoint");
    true
}

/// The start of a gRPC request on a fresh HTTP/2 connection to `address`
/// (`host:port`), without any authorization header, that declares a body
/// of `declared` bytes, sends a few, and stalls. Returns the response's
/// `grpc-status` (from headers or trailers) if one arrives within `limit`.
pub async fn stalled_request(
    address: &str,
    path: &str,
    declared: u32,
    limit: Duration,
) -> Option<String> {
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .expect("tcp connect");
    let (mut h2, connection) = h2::client::handshake(tcp).await.expect("http/2 handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{address}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let (response, mut body) = h2.send_request(request, false).expect("send request");
    // The gRPC frame header: not compressed, then the declared length.
    let mut start = vec![0u8];
    start.extend_from_slice(&declared.to_be_bytes());
    start.extend_from_slice(&[0u8; 1024]);
    let _ = body.send_data(start.into(), false);
    let answer = async {
        let response = response.await.ok()?;
        if let Some(status) = response.headers().get("grpc-status") {
            return status.to_str().ok().map(str::to_string);
        }
        let mut received = response.into_body();
        while received.data().await.is_some() {}
        let trailers = received.trailers().await.ok()??;
        trailers
            .get("grpc-status")?
            .to_str()
            .ok()
            .map(str::to_string)
    };
    tokio::time::timeout(limit, answer).await.ok().flatten()
}
