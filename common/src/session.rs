//! The worker's side of the coordinator protocol: connect, join, then one
//! long-lived stream for all-reduces, step reports and control.
//!
//! [`Session::all_reduce`] sends a gradient chunk by chunk while already
//! collecting the reduced chunks coming back, so the coordinator's
//! pipelining pays off: the first averaged chunk can be decoded before the
//! last local chunk has left.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use tonic::service::interceptor::InterceptedService;

use crate::Config;
use crate::auth::{self, Bearer, Token};
use crate::config::{
    CONNECTION_WINDOW_BYTES, CoordinatorConfig, MAX_CHUNK_BYTES, MAX_FRAME_BYTES,
    STREAM_WINDOW_BYTES,
};
use crate::pb::coordinator_client::CoordinatorClient;
use crate::pb::rendezvous_client::RendezvousClient;
use crate::pb::{self, coordinator_message, worker_message};
use crate::tls::{self, TlsError};
use crate::untrusted::{shown, shown_message};
use crate::wire::{self, Chunking, WireError, WireFormat};

/// Messages a worker may have queued towards the coordinator.
const OUTBOUND_QUEUE: usize = 16;

/// How long a failing worker waits for the coordinator to take its reason.
pub const FAREWELL: Duration = Duration::from_secs(5);

/// What can end a worker's conversation with the coordinator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The address is not a valid URI.
    #[error(
        "invalid coordinator address `{address}`: {source} (expected e.g. http://10.0.0.5:50051)"
    )]
    Address {
        /// What was given.
        address: String,
        /// Why it was rejected.
        source: tonic::transport::Error,
    },
    /// Nothing answered at the address, or not in the same language.
    #[error(
        "cannot connect to the coordinator at {address}: {source}; is it running and reachable, \
         and do both sides agree on TLS (https:// with tls.ca set when it serves TLS)?"
    )]
    Connect {
        /// The address tried.
        address: String,
        /// The transport's reason.
        source: tonic::transport::Error,
    },
    /// The coordinator refused this worker at join (token, version, config).
    #[error("the coordinator refused this worker: {message}")]
    Refused {
        /// The status code: why, in one word.
        code: tonic::Code,
        /// The coordinator's message, escaped.
        message: String,
    },
    /// The coordinator answered a call with an error.
    #[error("the coordinator stream failed: {0}")]
    Stream(String),
    /// The connection broke underneath the stream.
    #[error(
        "lost the connection to the coordinator: it exited, was stopped, or did not answer \
         pings for coordinator.heartbeat_timeout_s ({0}); once it runs again, restart the \
         run to resume from the latest checkpoint"
    )]
    Disconnected(String),
    /// The coordinator stopped the run, and said why (escaped).
    #[error("the coordinator aborted the run: {0}")]
    Aborted(String),
    /// The coordinator sent something the protocol does not allow here.
    #[error("protocol violation from the coordinator: {0}")]
    Protocol(String),
    /// The coordinator went away without a word.
    #[error("the coordinator closed the session unexpectedly")]
    Closed,
    /// A reduced chunk did not decode.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The TLS settings cannot be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl SessionError {
    /// Whether running this worker again cannot help: the coordinator
    /// refused it for its token, protocol or configuration, or its TLS
    /// settings are unusable. A taken rank or a lost connection may clear.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Refused { code, .. } => matches!(
                code,
                tonic::Code::Unauthenticated
                    | tonic::Code::FailedPrecondition
                    | tonic::Code::InvalidArgument
                    | tonic::Code::PermissionDenied
            ),
            Self::Address { .. } | Self::Tls(_) => true,
            _ => false,
        }
    }
}

impl From<tonic::Status> for SessionError {
    /// Statuses the coordinator sent carry no source; those made from a
    /// transport error (connection reset, keepalive timeout) do.
    fn from(status: tonic::Status) -> Self {
        match std::error::Error::source(&status) {
            Some(cause) => Self::Disconnected(cause.to_string()),
            None => Self::Stream(shown_message(status.message())),
        }
    }
}

/// Scheme of a coordinator reached through a Unix domain socket.
pub const UNIX_SCHEME: &str = "unix://";

/// A channel that presents the token on every call.
pub type Authenticated = InterceptedService<Channel, Bearer>;

/// Both services of the coordinator, over one connection: the Session
/// must come over the connection that joined.
pub struct Clients {
    /// `Join`.
    pub rendezvous: RendezvousClient<Authenticated>,
    /// `Session`.
    pub coordinator: CoordinatorClient<Authenticated>,
}

/// gRPC clients for the coordinator at `address` — `http://host:port`,
/// `https://host:port` (TLS as `cfg.tls` says), or `unix:///path/to/socket`
/// on the same machine (no TCP stack, fewer copies) — presenting `token`,
/// with message limits large enough for gradient chunks. The connection
/// pings the coordinator as `cfg.coordinator` says, so a coordinator that
/// stops answering (stopped, partitioned) fails the session instead of
/// leaving this worker waiting for a reduced gradient forever.
pub async fn connect(address: &str, cfg: &Config, token: &Token) -> Result<Clients, SessionError> {
    let invalid = |source| SessionError::Address {
        address: address.to_string(),
        source,
    };
    let unreachable = |source| SessionError::Connect {
        address: address.to_string(),
        source,
    };
    let channel = match address.strip_prefix(UNIX_SCHEME) {
        Some(path) => {
            let path = std::path::PathBuf::from(path);
            // The API wants a URI; the connector ignores it and dials the socket.
            let endpoint = tuned(Endpoint::from_static("http://localhost"), &cfg.coordinator);
            let connector = tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            });
            endpoint
                .connect_with_connector(connector)
                .await
                .map_err(unreachable)?
        }
        None => {
            let mut endpoint = tuned(
                Endpoint::from_shared(address.to_string()).map_err(invalid)?,
                &cfg.coordinator,
            );
            if let Some(tls) = tls::client(&cfg.tls, address)? {
                endpoint = endpoint.tls_config(tls).map_err(invalid)?;
            }
            endpoint
                .tcp_nodelay(true)
                .connect()
                .await
                .map_err(unreachable)?
        }
    };
    let bearer = Bearer(token.clone());
    Ok(Clients {
        rendezvous: RendezvousClient::with_interceptor(channel.clone(), bearer.clone()),
        coordinator: CoordinatorClient::with_interceptor(channel, bearer)
            .max_decoding_message_size(MAX_CHUNK_BYTES)
            .max_encoding_message_size(MAX_CHUNK_BYTES),
    })
}

/// Flow-control windows and frames sized for gradient streams, and HTTP/2
/// keepalive pings (answered by the coordinator's network stack, not its
/// training logic) every heartbeat interval, failing after the heartbeat timeout.
fn tuned(endpoint: Endpoint, liveness: &CoordinatorConfig) -> Endpoint {
    endpoint
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .http2_keep_alive_interval(Duration::from_secs(liveness.heartbeat_interval_s))
        .keep_alive_timeout(Duration::from_secs(liveness.heartbeat_timeout_s))
        .keep_alive_while_idle(true)
}

/// A join request for this build's protocol and `cfg`'s training settings.
pub fn join_request(
    cfg: &crate::Config,
    rank: Option<usize>,
    initial_checksum: u64,
    host: String,
) -> pb::JoinRequest {
    pb::JoinRequest {
        protocol_version: pb::PROTOCOL_VERSION,
        config_hash: cfg.training_hash(),
        requested_rank: rank.map_or(-1, |r| r as i32),
        initial_checksum,
        host,
    }
}

/// Joins the group; returns once every worker has joined.
pub async fn join(
    clients: &mut Clients,
    request: pb::JoinRequest,
) -> Result<pb::JoinReply, SessionError> {
    clients
        .rendezvous
        .join(request)
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| match std::error::Error::source(&status) {
            Some(cause) => SessionError::Disconnected(cause.to_string()),
            None => SessionError::Refused {
                code: status.code(),
                message: shown_message(status.message()),
            },
        })
}

/// Everything a worker does before its first step: connect to `address`,
/// join the group with `request`, and open the session with the
/// all-reduce and liveness settings of `cfg`.
pub async fn rendezvous(
    address: &str,
    token: &Token,
    request: pb::JoinRequest,
    cfg: &crate::Config,
) -> Result<(pb::JoinReply, Session, pb::Start), SessionError> {
    let mut clients = connect(address, cfg, token).await?;
    let joined = join(&mut clients, request).await?;
    let (session, start) = Session::open(
        &mut clients.coordinator,
        &joined,
        cfg.allreduce.wire,
        cfg.allreduce.chunk_bytes,
    )
    .await?;
    Ok((joined, session, start))
}

/// A reduced gradient as every replica receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct Reduced {
    /// The mean over all workers.
    pub mean: Vec<f32>,
    /// Some worker's contribution was not finite and the policy is to skip
    /// this optimizer step (`allreduce.nonfinite = skip`).
    pub skip: bool,
}

/// An open session: send chunks and reports, receive reduced chunks and
/// control; heartbeats go out in the background for as long as it lives.
pub struct Session {
    outbound: mpsc::Sender<pb::WorkerMessage>,
    inbound: tonic::Streaming<pb::CoordinatorMessage>,
    format: WireFormat,
    chunk_bytes: usize,
    control: Option<pb::Control>,
    step: Arc<AtomicU64>,
    heartbeat: Heartbeat,
}

impl Session {
    /// Opens the stream, introduces this member and waits for the start signal.
    pub async fn open(
        client: &mut CoordinatorClient<Authenticated>,
        joined: &pb::JoinReply,
        format: WireFormat,
        chunk_bytes: usize,
    ) -> Result<(Self, pb::Start), SessionError> {
        if joined.heartbeat_interval_ms == 0 {
            return Err(SessionError::Protocol(
                "the coordinator asked for heartbeats every 0 ms".into(),
            ));
        }
        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        let hello = pb::Hello {
            member_id: joined.member_id.clone(),
            generation: joined.generation,
        };
        send(&tx, worker_message::Kind::Hello(hello)).await?;
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        let member = joined.member_id.parse().map_err(|_| {
            SessionError::Protocol(format!(
                "member id {} is not a header value",
                shown(&joined.member_id)
            ))
        })?;
        request.metadata_mut().insert(auth::MEMBER, member);
        let inbound = client.session(request).await?.into_inner();
        let step = Arc::new(AtomicU64::new(0));
        let interval = Duration::from_millis(joined.heartbeat_interval_ms.into());
        let mut session = Self {
            heartbeat: Heartbeat::start(tx.clone(), interval, step.clone()),
            outbound: tx,
            inbound,
            format,
            chunk_bytes,
            control: None,
            step,
        };
        match session.next().await? {
            coordinator_message::Kind::Start(start) => Ok((session, start)),
            other => Err(SessionError::Protocol(format!(
                "expected Start, got {other:?}"
            ))),
        }
    }

    /// Sends this worker's gradient for (`step`, `net`) and returns the mean
    /// over all workers, as the coordinator computed it.
    pub async fn all_reduce(
        &mut self,
        step: u64,
        net: pb::Net,
        grads: &[f32],
    ) -> Result<Reduced, SessionError> {
        self.step.store(step, Ordering::Relaxed);
        let chunking = Chunking::new(grads.len(), self.chunk_bytes, self.format);
        let (format, outbound) = (self.format, &self.outbound);
        let header = |index: usize| pb::GradChunk {
            step,
            net: net as i32,
            index: index as u32,
            count: chunking.count() as u32,
            total_elems: grads.len() as u64,
            format: wire_format(format) as i32,
            data: Default::default(),
            skip: false,
        };
        let send = async {
            for index in 0..chunking.count() {
                let chunk = pb::GradChunk {
                    data: wire::encode(&grads[chunking.range(index)], format),
                    ..header(index)
                };
                send(outbound, worker_message::Kind::Chunk(chunk)).await?;
            }
            Ok::<_, SessionError>(())
        };
        let (inbound, control) = (&mut self.inbound, &mut self.control);
        let receive = async {
            let mut mean = vec![0.0f32; grads.len()];
            let mut skip = false;
            let mut seen = vec![false; chunking.count()];
            let mut received = 0;
            while received < chunking.count() {
                let chunk = match next(inbound).await? {
                    coordinator_message::Kind::Chunk(chunk) => chunk,
                    coordinator_message::Kind::Control(c) => {
                        *control = Some(c);
                        continue;
                    }
                    other => {
                        return Err(SessionError::Protocol(format!(
                            "expected a reduced chunk, got {other:?}"
                        )));
                    }
                };
                let index = chunk.index as usize;
                if chunk.step != step
                    || chunk.net != net as i32
                    || index >= seen.len()
                    || seen[index]
                {
                    return Err(SessionError::Protocol(format!(
                        "unexpected reduced chunk {index} of step {} net {} while reducing step {step} {net:?}",
                        chunk.step, chunk.net
                    )));
                }
                seen[index] = true;
                received += 1;
                skip |= chunk.skip;
                wire::decode_into(&chunk.data, format, &mut mean[chunking.range(index)])?;
            }
            Ok(Reduced { mean, skip })
        };
        let (sent, mean) = tokio::join!(send, receive);
        sent?;
        mean
    }

    /// The coordinator's decision for `step` (checkpoint, stop), if it sent
    /// one; it arrives during the step's all-reduce.
    pub fn take_control(&mut self, step: u64) -> Option<pb::Control> {
        self.control.take_if(|c| c.step == step)
    }

    /// A handle that can report checkpoint uploads from another task while
    /// the session keeps training.
    pub fn notifier(&self) -> Notifier {
        Notifier(self.outbound.clone())
    }

    /// Reports a finished step (losses, speed, parameter checksum).
    pub async fn report(&self, report: pb::StepReport) -> Result<(), SessionError> {
        self.send(worker_message::Kind::Report(report)).await
    }

    /// Says this worker completed all its steps, then waits for the
    /// coordinator to close the stream, so nothing queued is lost.
    pub async fn finish(mut self, steps: u64) -> Result<(), SessionError> {
        self.send(worker_message::Kind::Finished(pb::Finished { steps }))
            .await?;
        // Its sender must go too, or the stream would never end.
        drop(self.heartbeat);
        drop(self.outbound);
        match self.inbound.next().await {
            None => Ok(()),
            Some(Ok(pb::CoordinatorMessage {
                kind: Some(coordinator_message::Kind::Abort(a)),
            })) => Err(SessionError::Aborted(shown_message(&a.reason))),
            Some(Ok(other)) => Err(SessionError::Protocol(format!(
                "unexpected message after finishing: {other:?}"
            ))),
            Some(Err(status)) => Err(status.into()),
        }
    }

    /// Tells the coordinator this worker cannot go on and why, then waits
    /// (at most [`FAREWELL`]) for it to end the session, so the message is
    /// delivered before the process exits.
    pub async fn fail(mut self, reason: String, permanent: bool) {
        let failure = pb::Failure { reason, permanent };
        if self
            .send(worker_message::Kind::Failure(failure))
            .await
            .is_err()
        {
            return;
        }
        drop(self.heartbeat);
        drop(self.outbound);
        let _ = tokio::time::timeout(FAREWELL, async {
            while let Some(Ok(_)) = self.inbound.next().await {}
        })
        .await;
    }

    async fn send(&self, kind: worker_message::Kind) -> Result<(), SessionError> {
        send(&self.outbound, kind).await
    }

    async fn next(&mut self) -> Result<coordinator_message::Kind, SessionError> {
        next(&mut self.inbound).await
    }
}

async fn next(
    inbound: &mut tonic::Streaming<pb::CoordinatorMessage>,
) -> Result<coordinator_message::Kind, SessionError> {
    match inbound.next().await {
        Some(Ok(pb::CoordinatorMessage {
            kind: Some(coordinator_message::Kind::Abort(abort)),
        })) => Err(SessionError::Aborted(shown_message(&abort.reason))),
        Some(Ok(pb::CoordinatorMessage { kind: Some(kind) })) => Ok(kind),
        Some(Ok(pb::CoordinatorMessage { kind: None })) => {
            Err(SessionError::Protocol("empty message".into()))
        }
        Some(Err(status)) => Err(status.into()),
        None => Err(SessionError::Closed),
    }
}

/// Sends [`pb::CheckpointWritten`] or [`pb::StopRequest`] on a session from a background task.
/// Drop it before [`Session::finish`]: the stream ends when the last handle goes.
#[derive(Clone)]
pub struct Notifier(mpsc::Sender<pb::WorkerMessage>);

impl Notifier {
    /// Tells the coordinator whether checkpoint `step` is in the store.
    pub async fn checkpoint_written(
        &self,
        step: u64,
        outcome: Result<(), String>,
    ) -> Result<(), SessionError> {
        let written = pb::CheckpointWritten {
            step,
            ok: outcome.is_ok(),
            error: outcome.err().unwrap_or_default(),
        };
        send(&self.0, worker_message::Kind::CheckpointWritten(written)).await
    }

    /// Asks the coordinator to checkpoint and stop the group after the current step.
    pub async fn request_stop(&self, reason: String) -> Result<(), SessionError> {
        send(
            &self.0,
            worker_message::Kind::StopRequest(pb::StopRequest { reason }),
        )
        .await
    }
}

/// The background task that sends [`pb::Heartbeat`]s; stopped when dropped.
struct Heartbeat(tokio::task::JoinHandle<()>);

impl Heartbeat {
    /// Sends a heartbeat naming the current `step` every `interval` until
    /// the stream closes. Runs on the network runtime, so a long training
    /// step on the worker's own thread does not silence it.
    fn start(
        outbound: mpsc::Sender<pb::WorkerMessage>,
        interval: Duration,
        step: Arc<AtomicU64>,
    ) -> Self {
        Self(tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let beat = pb::Heartbeat {
                    step: step.load(Ordering::Relaxed),
                };
                if send(&outbound, worker_message::Kind::Heartbeat(beat))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }))
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Queues `kind` towards the coordinator; a closed queue means the session is over.
async fn send(
    outbound: &mpsc::Sender<pb::WorkerMessage>,
    kind: worker_message::Kind,
) -> Result<(), SessionError> {
    outbound
        .send(pb::WorkerMessage { kind: Some(kind) })
        .await
        .map_err(|_| SessionError::Closed)
}

/// The protobuf enum for a wire format.
pub fn wire_format(format: WireFormat) -> pb::WireFormat {
    match format {
        WireFormat::F32 => pb::WireFormat::F32,
        WireFormat::Bf16 => pb::WireFormat::Bf16,
    }
}
