//! The gRPC services: thin handlers that convert, call the group's domain
//! objects and report what happened to the supervising run loop.
//!
//! Both services sit behind the token check ([`crate::net::auth`]); a Session
//! must also name a member that joined over the same connection, say Hello
//! within the handshake deadline, and then speak for its own rank only.
//! Whatever a member sends is checked against what the coordinator asked
//! for before it is believed, and a member that breaks the protocol is
//! named (rank and host), never another one.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::protocol::pb::coordinator_server::Coordinator;
use common::protocol::pb::rendezvous_server::Rendezvous as RendezvousApi;
use common::protocol::pb::{self, worker_message};
use common::security::auth::MEMBER;
use common::security::untrusted::{Untrusted, shown, shown_message};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::info;

use crate::CoordinatorError;
use crate::allreduce::SubmitError;
use crate::error::GroupFailure;
use crate::generation::events::Event;
use crate::generation::group::{Formed, Group};
use crate::generation::rendezvous::JoinError;
use crate::net::connections::ticket_of;
use crate::peers::OUTBOUND_QUEUE;

/// The generation the handlers serve; the supervision replaces it when
/// the group re-forms.
pub struct Current {
    group: Mutex<Arc<Group>>,
    replaced: watch::Sender<u64>,
    /// How long a worker that arrived at a generation formed without it
    /// waits for the next one.
    arrival_wait: Duration,
}

impl Current {
    /// Serves `group` first; a worker arriving at a generation formed
    /// without it waits at most `arrival_wait` for the next one.
    pub fn new(group: Arc<Group>, arrival_wait: Duration) -> Self {
        let generation = group.generation();
        Self {
            group: Mutex::new(group),
            replaced: watch::channel(generation).0,
            arrival_wait,
        }
    }

    /// The generation now.
    pub fn get(&self) -> Arc<Group> {
        self.group.lock().expect("current group lock").clone()
    }

    /// Serves `group` from now on.
    pub fn replace(&self, group: Arc<Group>) {
        let generation = group.generation();
        *self.group.lock().expect("current group lock") = group;
        self.replaced.send_replace(generation);
    }

    /// The generation after `generation`, once there is one (within the
    /// arrival wait).
    async fn after(&self, generation: u64) -> Option<Arc<Group>> {
        let mut replaced = self.replaced.subscribe();
        let newer = replaced.wait_for(|g| *g > generation);
        match tokio::time::timeout(self.arrival_wait, newer).await {
            Ok(Ok(_)) => Some(self.get()),
            _ => None,
        }
    }
}

/// `Join`, over the current generation.
#[derive(Clone)]
pub struct RendezvousService {
    current: Arc<Current>,
}

/// `Session`, over the current generation.
#[derive(Clone)]
pub struct SessionService {
    current: Arc<Current>,
}

impl RendezvousService {
    /// Serves `current`.
    pub fn new(current: Arc<Current>) -> Self {
        Self { current }
    }
}

impl SessionService {
    /// Serves `current`.
    pub fn new(current: Arc<Current>) -> Self {
        Self { current }
    }
}

#[tonic::async_trait]
impl RendezvousApi for RendezvousService {
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinReply>, Status> {
        let ticket = ticket_of(&request).ok_or_else(|| Status::internal("no connection info"))?;
        let request = request.into_inner();
        let host = shown(&request.host);
        let mut group = self.current.get();
        loop {
            match group.join(request.clone(), ticket.id).await {
                Ok(reply) => {
                    info!(rank = reply.rank, world = reply.world_size, generation = reply.generation,
                        %host, peer = %ticket.peer, "worker joined");
                    return Ok(Response::new(reply));
                }
                // Taken in at the group's next step boundary.
                Err(later @ JoinError::Later { .. }) => {
                    info!(%host, peer = %ticket.peer, "a worker arrived: the group re-forms to take it in");
                    group.send(Event::Arrival).await;
                    group = self
                        .current
                        .after(group.generation())
                        .await
                        .ok_or_else(|| {
                            Status::unavailable(format!(
                                "{later}, but the group did not re-form in time; join again"
                            ))
                        })?;
                }
                Err(refusal) => {
                    let reason = format!("join from host {host} refused: {refusal}");
                    group.refusals.record(&ticket.peer, &reason);
                    return Err(refusal.into());
                }
            }
        }
    }
}

#[tonic::async_trait]
impl Coordinator for SessionService {
    type SessionStream = ReceiverStream<Result<pb::CoordinatorMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let group = self.current.get();
        let ticket = ticket_of(&request).ok_or_else(|| Status::internal("no connection info"))?;
        let member = request
            .metadata()
            .get(MEMBER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        if let Some(old) = earlier_generation(&member, group.generation()) {
            return Err(Status::aborted(format!(
                "generation {old} is over, the group re-forms as generation {}: join again",
                group.generation()
            )));
        }
        let rank = group
            .rendezvous
            .session_rank(&member, ticket.id)
            .map_err(|refusal| {
                let reason = format!("session for member {} refused: {refusal}", shown(&member));
                group.refusals.record(&ticket.peer, &reason);
                Status::permission_denied(refusal.to_string())
            })?;
        let formed = group.formed().expect("members have ranks only once formed");
        let mut inbound = request.into_inner();
        let handshake = group.settings().handshake_timeout;
        let hello = match tokio::time::timeout(handshake, inbound.message()).await {
            Ok(Ok(Some(pb::WorkerMessage {
                kind: Some(worker_message::Kind::Hello(hello)),
            }))) => hello,
            Err(_) => {
                return Err(Status::deadline_exceeded(
                    "no Hello within coordinator.handshake_timeout_s",
                ));
            }
            _ => return Err(Status::invalid_argument("a session must start with Hello")),
        };
        if hello.member_id != member || hello.generation != group.generation() {
            return Err(Status::invalid_argument(format!(
                "Hello names member {} of generation {}, but the session is for this connection's \
                 member of generation {}",
                shown(&hello.member_id),
                hello.generation,
                group.generation()
            )));
        }
        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        let complete = formed
            .peers
            .register(rank, tx)
            .map_err(|e| Status::already_exists(e.to_string()))?;
        tokio::spawn(serve_member(group.clone(), rank, inbound));
        if complete {
            tokio::spawn(async move { group.begin().await });
        }
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// The generation a member id (`g<N>-p<place>-<random>`) names, when it is
/// older than `current`.
fn earlier_generation(member: &str, current: u64) -> Option<u64> {
    let generation: u64 = member.strip_prefix('g')?.split('-').next()?.parse().ok()?;
    (generation < current).then_some(generation)
}

/// Reads one member's stream until it finishes, fails or falls silent for
/// longer than the heartbeat timeout.
async fn serve_member(group: Arc<Group>, rank: usize, mut inbound: Streaming<pb::WorkerMessage>) {
    let formed = group
        .formed()
        .expect("sessions open only in a formed generation");
    let mut member = Member {
        rank,
        step: formed.start.first_step,
        finished: false,
    };
    let heartbeat_timeout = group.settings().heartbeat_timeout;
    let failure = loop {
        let message = match tokio::time::timeout(heartbeat_timeout, inbound.message()).await {
            Ok(Ok(Some(message))) => message,
            Ok(Ok(None)) if member.finished => break None,
            Ok(Ok(None)) => break Some(lost(rank, "its stream closed before it finished")),
            Ok(Err(status)) => break Some(broken(&group, rank, &status)),
            Err(_) => break Some(silent(&group, rank, member.step)),
        };
        if let Err(failure) = member.handle(&group, formed, message).await {
            break Some(failure);
        }
    };
    if let Some(failure) = failure {
        group.send(Event::Failed(failure)).await;
    }
}

/// What the coordinator knows of one member while serving its stream.
struct Member {
    rank: usize,
    /// The step it last said it is on.
    step: u64,
    finished: bool,
}

impl Member {
    async fn handle(
        &mut self,
        group: &Group,
        formed: &Formed,
        message: pb::WorkerMessage,
    ) -> Result<(), CoordinatorError> {
        let rank = self.rank;
        let Some(kind) = message.kind else {
            return Err(group.protocol(rank, "sent an empty message"));
        };
        if self.finished {
            return Err(group.protocol(rank, format!("sent {} after Finished", name(&kind))));
        }
        match kind {
            worker_message::Kind::Heartbeat(beat) => self.step = beat.step,
            worker_message::Kind::Chunk(chunk) => {
                self.step = chunk.step;
                formed
                    .reducer
                    .submit(rank, chunk)
                    .await
                    .map_err(|e| submit_failure(group, rank, e))?;
            }
            worker_message::Kind::Report(report) => {
                let reduced = formed.reducer.steps_reduced();
                match formed.reports.add(rank, report, reduced) {
                    Err(e) => return Err(group.protocol(rank, e.to_string())),
                    Ok(Some(Ok(summary))) => {
                        // Before this handler reads on: every member has its
                        // receipt queued ahead of the next reduced gradient.
                        if let Some(checksum) = summary.checksum {
                            group.receipt(summary.step + 1, checksum).await?;
                        }
                        group.send(Event::StepDone(summary)).await
                    }
                    Ok(Some(Err(divergence))) => return Err(GroupFailure::from(divergence).into()),
                    Ok(None) => {}
                }
            }
            worker_message::Kind::CheckpointWritten(written) => {
                if rank != 0 || !group.schedule().answer(written.step) {
                    return Err(group.protocol(
                        rank,
                        format!(
                            "reported checkpoint step {} written, which the coordinator did not \
                             ask it for (only rank 0 writes checkpoints, when told to)",
                            written.step
                        ),
                    ));
                }
                let error = (!written.ok).then(|| shown_message(&written.error));
                let step = written.step;
                group.send(Event::CheckpointWritten { step, error }).await;
            }
            worker_message::Kind::StopRequest(request) => {
                let reason = shown_message(&request.reason);
                group.send(Event::StopRequested { rank, reason }).await;
            }
            worker_message::Kind::Finished(finished) => {
                let last = group.schedule().final_step();
                let reported = formed.reports.last_of(rank);
                let trained = last > formed.start.first_step;
                if finished.steps != last || (trained && reported != Some(last - 1)) {
                    return Err(group.protocol(
                        rank,
                        format!(
                            "said it finished after {} steps, but the group trains to step {last} \
                             and its last report was for step {reported:?}",
                            finished.steps
                        ),
                    ));
                }
                self.finished = true;
                group.send(Event::Finished { rank }).await;
            }
            worker_message::Kind::State(chunk) => group.state_chunk(rank, chunk).await?,
            worker_message::Kind::ReplicaRefused(refused) => {
                return Err(group.replica_refused(rank, &refused.reason));
            }
            worker_message::Kind::Hello(_) => {
                return Err(group.protocol(rank, "sent Hello twice"));
            }
            worker_message::Kind::Failure(failure) => {
                return Err(GroupFailure::WorkerFailed {
                    rank,
                    host: group.rendezvous.host_of(rank),
                    reason: shown_message(&failure.reason),
                    permanent: failure.permanent,
                }
                .into());
            }
        }
        Ok(())
    }
}

fn name(kind: &worker_message::Kind) -> &'static str {
    match kind {
        worker_message::Kind::Hello(_) => "Hello",
        worker_message::Kind::Chunk(_) => "a gradient chunk",
        worker_message::Kind::Report(_) => "a step report",
        worker_message::Kind::Finished(_) => "Finished",
        worker_message::Kind::CheckpointWritten(_) => "CheckpointWritten",
        worker_message::Kind::StopRequest(_) => "a stop request",
        worker_message::Kind::Heartbeat(_) => "a heartbeat",
        worker_message::Kind::Failure(_) => "a failure",
        worker_message::Kind::State(_) => "a replica chunk",
        worker_message::Kind::ReplicaRefused(_) => "a refusal of a replica",
    }
}

/// Blames a rejected chunk where the fault lies: its sender, a member that
/// stopped reading, or the ranks that sent NaN/Inf.
fn submit_failure(group: &Group, rank: usize, err: SubmitError) -> CoordinatorError {
    match err {
        SubmitError::Chunk(e) => group.protocol(rank, e.to_string()),
        SubmitError::NotReading(stuck) => lost(stuck.rank, &stuck.to_string()),
        SubmitError::NonFinite {
            step,
            net,
            culprits,
        } => GroupFailure::NonFinite {
            step,
            net,
            culprits,
        }
        .into(),
    }
}

/// A member's stream failed. A status the coordinator's own decoder made
/// (a message over the size limit, bytes that are not a message) is the
/// member breaking the protocol; one carrying a transport error is a
/// broken connection.
fn broken(group: &Group, rank: usize, status: &Status) -> CoordinatorError {
    let local = std::error::Error::source(status).is_none();
    match status.code() {
        Code::OutOfRange | Code::ResourceExhausted | Code::Internal | Code::InvalidArgument
            if local =>
        {
            group.protocol(
                rank,
                format!(
                    "sent a message the coordinator cannot accept: {}",
                    Untrusted::message(status.message())
                ),
            )
        }
        _ => lost(
            rank,
            &format!(
                "its connection broke ({}): the process died or its network failed",
                Untrusted::message(status.message())
            ),
        ),
    }
}

/// A member that sent nothing, not even a heartbeat, for the whole timeout.
fn silent(group: &Group, rank: usize, step: u64) -> CoordinatorError {
    let seconds = group.settings().heartbeat_timeout.as_secs();
    let host = group.rendezvous.host_of(rank);
    lost(
        rank,
        &format!(
            "no message or heartbeat from {host} for {seconds} s while at step {step} \
             (coordinator.heartbeat_timeout_s): the process is hung, stopped or cut off \
             from the coordinator"
        ),
    )
}

fn lost(rank: usize, reason: &str) -> CoordinatorError {
    GroupFailure::WorkerLost {
        rank,
        reason: reason.to_string(),
    }
    .into()
}
