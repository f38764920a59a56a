//! The worker's side of the coordinator protocol: connect, join, then one
//! long-lived stream for all-reduces, step reports and control.
//!
//! [`Session::all_reduce`] sends a gradient chunk by chunk while already
//! collecting the reduced chunks coming back, so the coordinator's
//! pipelining pays off: the first averaged chunk can be decoded before the
//! last local chunk has left. A group of one sends the chunk headers
//! alone: its mean is its own gradient.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use tonic::service::interceptor::InterceptedService;

use super::spares::Spares;
use crate::Config;
use crate::config::CoordinatorConfig;
use crate::protocol::limits::{
    CONNECTION_WINDOW_BYTES, MAX_CHUNK_BYTES, MAX_FRAME_BYTES, MAX_STATE_BYTES,
    STREAM_WINDOW_BYTES, UNIX_SCHEME,
};
use crate::protocol::pb::coordinator_client::CoordinatorClient;
use crate::protocol::pb::rendezvous_client::RendezvousClient;
use crate::protocol::pb::{self, coordinator_message, worker_message};
use crate::protocol::powersgd::PowerSgd;
use crate::protocol::wire::{self, Chunking, WireError, WireFormat};
use crate::sampling::cadence::Cadence;
use crate::security::auth::{self, Bearer, Token};
use crate::security::tls::{self, TlsError};
use crate::security::untrusted::{shown, shown_message};

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
    /// The connection was not established in time (a stopped or
    /// overloaded coordinator accepts TCP but never answers).
    #[error(
        "the coordinator at {address} did not complete a connection within {seconds} s \
         (coordinator.heartbeat_timeout_s): it is stopped, overloaded or behind a broken network"
    )]
    ConnectTimeout {
        /// The address tried.
        address: String,
        /// The deadline.
        seconds: u64,
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
         pings for coordinator.heartbeat_timeout_s ({0})"
    )]
    Disconnected(String),
    /// The connection closed before the coordinator answered Join: it
    /// holds no free connection slot, or it stopped.
    #[error(
        "the coordinator closed the connection before answering Join ({0}): all its connection \
         slots may be taken (a client holding them all), or it stopped; trying again is safe"
    )]
    TurnedAway(String),
    /// The coordinator stopped the run, and said why (escaped).
    #[error("the coordinator aborted the run: {0}")]
    Aborted(String),
    /// The group re-forms: go back to the last completed step and join again.
    #[error("the group re-forms: {0}")]
    Regroup(String),
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

    /// Whether trying again later may succeed: the coordinator is gone
    /// (not answering, its stream broken) and may come back, or it could
    /// not take this worker in yet. A worker that holds its replica waits.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Disconnected(_)
            | Self::TurnedAway(_)
            | Self::Closed
            | Self::Connect { .. }
            | Self::ConnectTimeout { .. } => true,
            Self::Refused { code, .. } => *code == tonic::Code::Unavailable,
            _ => false,
        }
    }

    /// Whether nothing listens at the address yet (connection refused, no
    /// socket file, a name not resolving yet): a coordinator that is still starting, as a pod's
    /// usually is when its workers start. A wrong TLS setting or a
    /// stranger at the address is not this.
    pub fn is_not_listening(&self) -> bool {
        let Self::Connect { source, .. } = self else {
            return false;
        };
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(source);
        while let Some(e) = cause {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                // A name that does not resolve yet: a Service whose DNS record
                // appears with its pod (headless), or a container alias.
                // std's getaddrinfo error has no kind of its own, only this text.
                let unresolved = io
                    .to_string()
                    .starts_with("failed to lookup address information");
                return unresolved
                    || matches!(
                        io.kind(),
                        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                    );
            }
            cause = e.source();
        }
        false
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
    let limit = Duration::from_secs(cfg.coordinator.heartbeat_timeout_s);
    tokio::time::timeout(limit, open_channel(address, cfg, token))
        .await
        .unwrap_or_else(|_| {
            Err(SessionError::ConnectTimeout {
                address: address.to_string(),
                seconds: limit.as_secs(),
            })
        })
}

/// The connection [`connect`] makes, without its deadline.
async fn open_channel(address: &str, cfg: &Config, token: &Token) -> Result<Clients, SessionError> {
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

/// A join request for this build's protocol and `cfg`'s training settings,
/// presenting the replica this worker `held`, if any.
pub fn join_request(
    cfg: &crate::Config,
    rank: Option<usize>,
    initial_checksum: u64,
    host: String,
    held: Option<pb::Held>,
) -> pb::JoinRequest {
    pb::JoinRequest {
        protocol_version: pb::PROTOCOL_VERSION,
        config_hash: cfg.training_hash(),
        requested_rank: rank.map_or(-1, |r| r as i32),
        initial_checksum,
        host,
        held,
        proof: None,
        previous_member: String::new(),
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
            Some(cause) if closed_on_us(cause) => SessionError::TurnedAway(cause.to_string()),
            Some(cause) => SessionError::Disconnected(cause.to_string()),
            None => SessionError::Refused {
                code: status.code(),
                message: shown_message(status.message()),
            },
        })
}

/// Whether `cause` is the peer closing the connection under the request
/// (reset, broken pipe, end of stream), as a coordinator with no free
/// connection slot does on accept; not a TLS refusal or anything else
/// that trying again cannot mend.
fn closed_on_us(cause: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(cause);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionAborted
            );
        }
        cause = e.source();
    }
    false
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
    let opened = Session::open(&mut clients, &joined, cfg, &mut NoDonation).await?;
    Ok((joined, opened.session, opened.start))
}

/// What a member gives when the coordinator asks it for its replica.
pub trait Donor {
    /// The bundle of the replica after `step` steps ([`crate::protocol::bundle`]).
    fn state(&mut self, step: u64) -> Result<Bytes, SessionError>;
}

/// A member that holds nothing to give (a fresh worker, a test client).
pub struct NoDonation;

impl Donor for NoDonation {
    fn state(&mut self, step: u64) -> Result<Bytes, SessionError> {
        Err(SessionError::Protocol(format!(
            "the coordinator asked for the replica of step {step}, but this member holds none"
        )))
    }
}

/// A session once the group has started.
pub struct Opened {
    /// The session.
    pub session: Session,
    /// How training starts.
    pub start: pb::Start,
    /// The replica another member sent, when `start.source` is TRANSFER.
    pub state: Option<Bytes>,
}

/// A reduced gradient as every replica receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct Reduced {
    /// The mean over all workers; empty when skipped.
    pub mean: Vec<f32>,
    /// Some worker's contribution was not finite and the policy is to skip
    /// this optimizer step (`allreduce.nonfinite = skip`).
    pub skip: bool,
}

impl Reduced {
    /// A gradient every rank skips: nothing to apply.
    fn skipped() -> Self {
        Self {
            mean: Vec::new(),
            skip: true,
        }
    }
}

/// One all-reduce's payload: f32 goes out as the gradient's own memory
/// ([`wire::f32_in_place`]), anything else is encoded chunk by chunk (with
/// the residual carried into it under error feedback). A group of one
/// keeps its values: they are the mean.
enum Outgoing {
    InPlace(Bytes),
    Encoded(Vec<f32>),
    Kept(Vec<f32>),
}

impl Outgoing {
    fn new(values: Vec<f32>, format: WireFormat, carrying: bool, alone: bool) -> Self {
        match (alone, format == WireFormat::F32 && !carrying) {
            (true, _) => Self::Kept(values),
            (false, true) => Self::InPlace(wire::f32_in_place(values)),
            (false, false) => Self::Encoded(values),
        }
    }
}

/// An open session: send chunks and reports, receive reduced chunks and
/// control; heartbeats go out in the background for as long as it lives.
pub struct Session {
    outbound: mpsc::Sender<pb::WorkerMessage>,
    inbound: tonic::Streaming<pb::CoordinatorMessage>,
    format: WireFormat,
    chunk_bytes: usize,
    control: Option<pb::Control>,
    /// The next step whose gradients travel exact (a checkpoint follows it).
    exact: Option<u64>,
    /// The group has one member: only chunk headers travel, and every step
    /// is exact (the coordinator plans it so too).
    alone: bool,
    /// This worker's residuals under error feedback, by network: what
    /// int8 rounded away from its gradients and owes the next step. They
    /// live with the session: a new generation starts without them, and
    /// they are zero after every exact step, so a checkpoint needs none.
    residuals: Residuals,
    /// Vectors for the means (and int8's residuals) of the next
    /// all-reduces: what earlier ones freed (the gradients they encoded,
    /// the residuals they replaced).
    spares: Spares,
    /// Under PowerSGD, its state per network (discriminator, generator):
    /// like int8's residuals, it lives with the session and is reset by
    /// every exact step.
    powersgd: Option<[PowerSgd; 2]>,
    /// Where PowerSGD's warm-up ends (`train.sync_warmup`).
    cadence: Cadence,
    step: Arc<AtomicU64>,
    heartbeat: Heartbeat,
    proof: Proof,
}

/// The newest receipt the coordinator gave this member: the proof, for a
/// later generation or a restarted coordinator, that every rank agreed on
/// a replica (`pb::Receipt`). It outlives the session it came on.
#[derive(Debug, Clone, Default)]
pub struct Proof(Arc<Mutex<Option<pb::Receipt>>>);

impl Proof {
    /// The newest receipt, if one came.
    pub fn latest(&self) -> Option<pb::Receipt> {
        self.0.lock().expect("proof lock").clone()
    }

    fn keep(&self, receipt: pb::Receipt) {
        *self.0.lock().expect("proof lock") = Some(receipt);
    }
}

impl Session {
    /// Opens the stream, introduces this member and waits for the start signal.
    /// Opens the session of `joined` on `clients` (the connection that
    /// joined), introduces this member and waits for the group to start:
    /// meanwhile it gives its replica when asked (`donor`) and collects one
    /// sent to it.
    pub async fn open(
        clients: &mut Clients,
        joined: &pb::JoinReply,
        cfg: &Config,
        donor: &mut (dyn Donor + Send),
    ) -> Result<Opened, SessionError> {
        let client = &mut clients.coordinator;
        let (format, chunk_bytes) = (cfg.allreduce.wire, cfg.allreduce.chunk_bytes);
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
        let inbound = match client.session(request).await {
            Ok(response) => response.into_inner(),
            // The generation this member joined has already been replaced.
            Err(status) if status.code() == tonic::Code::Aborted => {
                return Err(SessionError::Regroup(shown_message(status.message())));
            }
            Err(status) => return Err(status.into()),
        };
        let step = Arc::new(AtomicU64::new(0));
        let interval = Duration::from_millis(joined.heartbeat_interval_ms.into());
        let mut session = Self {
            heartbeat: Heartbeat::start(tx.clone(), interval, step.clone()),
            outbound: tx,
            inbound,
            format,
            chunk_bytes,
            control: None,
            exact: None,
            alone: joined.world_size == 1,
            residuals: Residuals::default(),
            spares: Spares::default(),
            powersgd: powersgd_of(cfg),
            cadence: Cadence::of(&cfg.train),
            step,
            proof: Proof::default(),
        };
        let mut received = Received::default();
        loop {
            match session.next().await? {
                coordinator_message::Kind::Start(start) => {
                    let state = received.finish(&start)?;
                    session.exact = start.exact_first.then_some(start.first_step);
                    return Ok(Opened {
                        session,
                        start,
                        state,
                    });
                }
                coordinator_message::Kind::SendState(ask) => {
                    let bundle = donor.state(ask.step)?;
                    session.send_state(bundle).await?;
                }
                coordinator_message::Kind::State(chunk) => received.add(chunk)?,
                other => {
                    return Err(SessionError::Protocol(format!(
                        "expected Start, got {}",
                        kind_name(&other)
                    )));
                }
            }
        }
    }

    /// Sends `bundle` as StateChunks, each no larger than a gradient chunk.
    async fn send_state(&self, bundle: Bytes) -> Result<(), SessionError> {
        let size = self.chunk_bytes.max(1);
        let count = bundle.len().div_ceil(size).max(1);
        for index in 0..count {
            let piece = bundle
                .slice((index * size).min(bundle.len())..((index + 1) * size).min(bundle.len()));
            let chunk = pb::StateChunk {
                index: index as u32,
                count: count as u32,
                total_bytes: bundle.len() as u64,
                data: piece,
            };
            self.send(worker_message::Kind::State(chunk)).await?;
        }
        Ok(())
    }

    /// Sends this worker's gradient for (`step`, `net`) and returns the mean
    /// over all workers, as the coordinator computed it.
    ///
    /// Under error feedback (int8, PowerSGD) the residual carried from
    /// earlier steps is added before encoding, and what this step leaves
    /// out replaces it once the mean is applied (not when every rank skips
    /// it). A step the coordinator announced as exact travels whole in f32
    /// and leaves no residual (under PowerSGD, no warm start either).
    ///
    /// Takes the gradient by value: in f32 its memory is what goes out.
    pub async fn all_reduce(
        &mut self,
        step: u64,
        net: pb::Net,
        grads: Vec<f32>,
    ) -> Result<Reduced, SessionError> {
        self.step.store(step, Ordering::Relaxed);
        if self.alone {
            // Every step of a group of one is exact and its session started
            // with no residual and no PowerSGD state: nothing to carry.
            let (reduced, _) = self
                .exchange(step, net, 0, grads, WireFormat::F32, None)
                .await?;
            return Ok(reduced);
        }
        let exact = self.exact == Some(step);
        if self.powersgd.is_some() && !self.cadence.warming_up(step) {
            let slot = PowerSgdSlot::of(net);
            if !exact {
                return self.compressed(step, net, &grads, slot).await;
            }
            let whole = self.powersgd(slot).with_residual(&grads);
            let (reduced, _) = self
                .exchange(step, net, 0, whole, WireFormat::F32, None)
                .await?;
            self.powersgd(slot).reset();
            return Ok(reduced);
        }
        let format = match exact {
            true => WireFormat::F32,
            false => self.format,
        };
        let carried = self
            .format
            .carries_residual()
            .then(|| self.residuals.take(net, grads.len()));
        let result = self
            .exchange(step, net, 0, grads, format, carried.as_deref())
            .await;
        let (reduced, left) = match result {
            Ok(done) => done,
            Err(err) => {
                if let Some(carried) = carried {
                    self.residuals.put(net, carried);
                }
                return Err(err);
            }
        };
        // What this encoding left replaces the residual once the mean is
        // applied; after an exact step nothing is carried, skipped or not,
        // so the residual at a checkpoint is zero on every rank.
        if let (Some(carried), Some(left)) = (carried, left) {
            let (kept, spare) = match exact || !reduced.skip {
                true => (left, carried),
                false => (carried, left),
            };
            self.residuals.put(net, kept);
            self.spares.keep(spare);
        }
        Ok(reduced)
    }

    /// PowerSGD's two all-reduces of one network's gradient; a skipped
    /// one leaves the residual and the warm start as they were.
    async fn compressed(
        &mut self,
        step: u64,
        net: pb::Net,
        grads: &[f32],
        slot: PowerSgdSlot,
    ) -> Result<Reduced, SessionError> {
        let format = self.format;
        let (mut round, first) = self.powersgd(slot).first(grads);
        let (reduced, _) = self.exchange(step, net, 0, first, format, None).await?;
        if reduced.skip {
            return Ok(Reduced::skipped());
        }
        let second = self.powersgd(slot).second(&mut round, reduced.mean);
        let (reduced, _) = self.exchange(step, net, 1, second, format, None).await?;
        if reduced.skip {
            return Ok(Reduced::skipped());
        }
        let mean = self.powersgd(slot).finish(round, reduced.mean);
        Ok(Reduced { mean, skip: false })
    }

    fn powersgd(&mut self, slot: PowerSgdSlot) -> &mut PowerSgd {
        &mut self.powersgd.as_mut().expect("PowerSGD is on")[slot as usize]
    }

    /// One all-reduce: sends `values` of (`step`, `net`, `phase`) in
    /// `format` and collects the mean. With `carried` (int8's residual),
    /// it is added before encoding, and what the encoding rounded away
    /// comes back beside the mean.
    ///
    /// Alone, the values are the mean and only the headers travel, each
    /// saying whether its chunk is finite, so the coordinator's pacing,
    /// decisions and non-finite policy stay the same.
    async fn exchange(
        &mut self,
        step: u64,
        net: pb::Net,
        phase: u32,
        values: Vec<f32>,
        format: WireFormat,
        carried: Option<&[f32]>,
    ) -> Result<(Reduced, Option<Vec<f32>>), SessionError> {
        // Chunked by the run's format whatever this step's: the coordinator
        // knows the chunking before it knows whether the step is exact.
        let len = values.len();
        let chunking = Chunking::new(len, self.chunk_bytes, self.format);
        let mut left = carried.map(|_| self.spares.take(len));
        let alone = self.alone;
        let outgoing = Outgoing::new(values, format, carried.is_some(), alone);
        let outbound = &self.outbound;
        let header = |index: usize| pb::GradChunk {
            step,
            net: net as i32,
            index: index as u32,
            count: chunking.count() as u32,
            total_elems: len as u64,
            format: pb::WireFormat::from(format) as i32,
            data: Default::default(),
            skip: false,
            phase,
            not_finite: false,
        };
        let send = async {
            for index in 0..chunking.count() {
                let range = chunking.range(index);
                let mut not_finite = false;
                let data = match (&outgoing, carried, left.as_mut()) {
                    (Outgoing::Kept(values), ..) => {
                        // Folded, not short-circuited, so it vectorises.
                        not_finite = !values[range].iter().fold(true, |ok, v| ok & v.is_finite());
                        Bytes::new()
                    }
                    (Outgoing::InPlace(bytes), ..) => bytes.slice(range.start * 4..range.end * 4),
                    (Outgoing::Encoded(values), Some(carried), Some(left)) => {
                        wire::encode_carrying(
                            &values[range.clone()],
                            &carried[range.clone()],
                            &mut left[range],
                            format,
                        )
                    }
                    (Outgoing::Encoded(values), ..) => wire::encode(&values[range], format),
                };
                let chunk = pb::GradChunk {
                    data,
                    not_finite,
                    ..header(index)
                };
                send(outbound, worker_message::Kind::Chunk(chunk)).await?;
            }
            Ok::<_, SessionError>(())
        };
        let mut mean = match alone {
            true => Vec::new(),
            false => self.spares.take(len),
        };
        let (inbound, control, announced) = (&mut self.inbound, &mut self.control, &mut self.exact);
        let proof = &self.proof;
        let receive = async {
            let mut skip = false;
            let mut seen = vec![false; chunking.count()];
            let mut received = 0;
            while received < chunking.count() {
                let chunk = match next(inbound, proof).await? {
                    coordinator_message::Kind::Chunk(chunk) => chunk,
                    coordinator_message::Kind::Control(c) => {
                        if c.exact_next {
                            *announced = Some(c.step + 1);
                        }
                        *control = Some(c);
                        continue;
                    }
                    other => {
                        return Err(SessionError::Protocol(format!(
                            "expected a reduced chunk, got {}",
                            kind_name(&other)
                        )));
                    }
                };
                let index = chunk.index as usize;
                if (chunk.step, chunk.net, chunk.phase) != (step, net as i32, phase)
                    || index >= seen.len()
                    || seen[index]
                {
                    return Err(SessionError::Protocol(format!(
                        "unexpected reduced chunk {index} of step {} net {} phase {} while \
                         reducing phase {phase} of step {step} {net:?}",
                        chunk.step, chunk.net, chunk.phase
                    )));
                }
                seen[index] = true;
                received += 1;
                skip |= chunk.skip;
                match alone {
                    true if !chunk.data.is_empty() => {
                        return Err(SessionError::Protocol(format!(
                            "reduced chunk {index} of step {step} carries {} bytes, but a group \
                             of one receives headers only",
                            chunk.data.len()
                        )));
                    }
                    true => {}
                    false => {
                        wire::decode_into(&chunk.data, format, &mut mean[chunking.range(index)])?
                    }
                }
            }
            Ok(skip)
        };
        let (sent, skip) = tokio::join!(send, receive);
        // The coordinator's last word (a regroup, an abort) explains a send
        // that failed because it closed the stream.
        let skip = skip?;
        sent?;
        match outgoing {
            Outgoing::Kept(values) => mean = values,
            Outgoing::Encoded(values) => self.spares.keep(values),
            // Its memory went out as the chunks, which the transport frees.
            Outgoing::InPlace(_) => {}
        }
        Ok((Reduced { mean, skip }, left))
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
    pub async fn report(&mut self, report: pb::StepReport) -> Result<(), SessionError> {
        match self.send(worker_message::Kind::Report(report)).await {
            Err(SessionError::Closed) => Err(self.why_closed().await),
            other => other,
        }
    }

    /// Why the coordinator closed the stream: its last message (a regroup,
    /// an abort) if one is waiting, read within [`FAREWELL`].
    async fn why_closed(&mut self) -> SessionError {
        match tokio::time::timeout(FAREWELL, self.next()).await {
            Ok(Err(reason)) => reason,
            Ok(Ok(kind)) => SessionError::Protocol(format!(
                "the coordinator closed the session after sending {}",
                kind_name(&kind)
            )),
            Err(_) => SessionError::Closed,
        }
    }

    /// Says this worker completed all its steps, then waits for the
    /// coordinator to close the stream, so nothing queued is lost. The
    /// group may still re-form (the member saving the last checkpoint was
    /// lost): that is [`SessionError::Regroup`].
    pub async fn finish(mut self, steps: u64) -> Result<(), SessionError> {
        self.send(worker_message::Kind::Finished(pb::Finished { steps }))
            .await?;
        // Its sender must go too, or the stream would never end.
        drop(self.heartbeat);
        drop(self.outbound);
        match next(&mut self.inbound, &self.proof).await {
            Err(SessionError::Closed) => Ok(()),
            Err(err) => Err(err),
            Ok(other) => Err(SessionError::Protocol(format!(
                "unexpected message after finishing: {}",
                kind_name(&other)
            ))),
        }
    }

    /// Tells the coordinator the replica it was sent is not the one it was
    /// told to expect (its sender is at fault), then waits, as
    /// [`Session::why_closed`] does, for the group to re-form without that
    /// sender.
    pub async fn refuse_replica(mut self, reason: String) -> SessionError {
        let refused = worker_message::Kind::ReplicaRefused(pb::ReplicaRefused { reason });
        match self.send(refused).await {
            Err(err) => err,
            Ok(()) => self.why_closed().await,
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
        next(&mut self.inbound, &self.proof).await
    }

    /// The receipts this session is given, now and after it ends.
    pub fn proof(&self) -> Proof {
        self.proof.clone()
    }
}

/// A replica arriving in StateChunks before Start.
#[derive(Default)]
struct Received {
    chunks: Vec<Bytes>,
    total: u64,
}

impl Received {
    fn add(&mut self, chunk: pb::StateChunk) -> Result<(), SessionError> {
        let bad = |what: String| {
            Err(SessionError::Protocol(format!(
                "state chunk {}: {what}",
                chunk.index
            )))
        };
        if chunk.total_bytes > MAX_STATE_BYTES {
            return bad(format!(
                "a state of {} bytes is more than {MAX_STATE_BYTES}",
                chunk.total_bytes
            ));
        }
        if chunk.index as usize != self.chunks.len()
            || (self.total != 0 && self.total != chunk.total_bytes)
        {
            return bad("out of order or of another state".into());
        }
        let held: u64 = self.chunks.iter().map(|c| c.len() as u64).sum();
        if held + chunk.data.len() as u64 > chunk.total_bytes {
            return bad("more bytes than the state's size".into());
        }
        self.total = chunk.total_bytes;
        self.chunks.push(chunk.data);
        Ok(())
    }

    /// The whole state when `start` says one was sent, else nothing.
    fn finish(self, start: &pb::Start) -> Result<Option<Bytes>, SessionError> {
        if start.source != pb::Source::Transfer as i32 {
            return Ok(None);
        }
        let mut whole = bytes::BytesMut::with_capacity(self.total as usize);
        self.chunks.iter().for_each(|c| whole.extend_from_slice(c));
        if self.total == 0 || whole.len() as u64 != self.total {
            return Err(SessionError::Protocol(format!(
                "told to start from a transferred state, but {} of {} bytes arrived",
                whole.len(),
                self.total
            )));
        }
        Ok(Some(whole.freeze()))
    }
}

/// A coordinator message's kind, for messages (without its payload).
fn kind_name(kind: &coordinator_message::Kind) -> &'static str {
    match kind {
        coordinator_message::Kind::Start(_) => "Start",
        coordinator_message::Kind::Chunk(_) => "a reduced chunk",
        coordinator_message::Kind::Abort(_) => "Abort",
        coordinator_message::Kind::Control(_) => "Control",
        coordinator_message::Kind::Regroup(_) => "Regroup",
        coordinator_message::Kind::SendState(_) => "SendState",
        coordinator_message::Kind::State(_) => "a state chunk",
        coordinator_message::Kind::Receipt(_) => "a receipt",
    }
}

/// The next message that asks something of this member; receipts, which
/// can come at any time, are kept in `proof` on the way.
async fn next(
    inbound: &mut tonic::Streaming<pb::CoordinatorMessage>,
    proof: &Proof,
) -> Result<coordinator_message::Kind, SessionError> {
    loop {
        match inbound.next().await {
            Some(Ok(pb::CoordinatorMessage {
                kind: Some(coordinator_message::Kind::Receipt(receipt)),
            })) => proof.keep(receipt),
            other => return classify(other),
        }
    }
}

fn classify(
    message: Option<Result<pb::CoordinatorMessage, tonic::Status>>,
) -> Result<coordinator_message::Kind, SessionError> {
    match message {
        Some(Ok(pb::CoordinatorMessage {
            kind: Some(coordinator_message::Kind::Abort(abort)),
        })) => Err(SessionError::Aborted(shown_message(&abort.reason))),
        Some(Ok(pb::CoordinatorMessage {
            kind: Some(coordinator_message::Kind::Regroup(regroup)),
        })) => Err(SessionError::Regroup(shown_message(&regroup.reason))),
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

/// Which network's PowerSGD state.
#[derive(Debug, Clone, Copy)]
enum PowerSgdSlot {
    Discriminator = 0,
    Generator = 1,
}

impl PowerSgdSlot {
    fn of(net: pb::Net) -> Self {
        match net {
            pb::Net::Generator => Self::Generator,
            _ => Self::Discriminator,
        }
    }
}

/// Fresh PowerSGD states for both networks, when `allreduce.powersgd_rank` asks.
fn powersgd_of(cfg: &Config) -> Option<[PowerSgd; 2]> {
    let rank = cfg.allreduce.powersgd_rank;
    (rank > 0).then(|| PowerSgd::per_network(&cfg.model, rank))
}

/// A worker's error-feedback residuals, one per network (empty before the
/// first step). Taken out for an all-reduce and put back after it, so the
/// gradients' worth of floats is never copied.
#[derive(Default)]
struct Residuals {
    discriminator: Vec<f32>,
    generator: Vec<f32>,
}

impl Residuals {
    fn slot(&mut self, net: pb::Net) -> &mut Vec<f32> {
        match net {
            pb::Net::Generator => &mut self.generator,
            _ => &mut self.discriminator,
        }
    }

    /// `net`'s residual (zeros before the first step), until [`Self::put`].
    fn take(&mut self, net: pb::Net, elems: usize) -> Vec<f32> {
        let residual = std::mem::take(self.slot(net));
        match residual.len() == elems {
            true => residual,
            false => vec![0.0; elems],
        }
    }

    fn put(&mut self, net: pb::Net, residual: Vec<f32>) {
        *self.slot(net) = residual;
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
