//! The gRPC services: thin handlers that convert, call the group's domain
//! objects and report what happened to the supervising run loop.
//!
//! Both services sit behind the token check ([`crate::auth`]); a Session
//! must also name a member that joined over the same connection, say Hello
//! within the handshake deadline, and then speak for its own rank only.
//! Whatever a member sends is checked against what the coordinator asked
//! for before it is believed, and a member that breaks the protocol is
//! named (rank and host), never another one.

use std::sync::Arc;
use std::time::Duration;

use common::Config;
use common::auth::MEMBER;
use common::pb::coordinator_server::Coordinator;
use common::pb::rendezvous_server::Rendezvous as RendezvousApi;
use common::pb::{self, coordinator_message, worker_message};
use common::untrusted::{Untrusted, shown, shown_message};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::info;

use crate::CoordinatorError;
use crate::allreduce::{Reducer, Shape, SubmitError, Waiting};
use crate::connections::ticket_of;
use crate::error::GroupFailure;
use crate::peers::{OUTBOUND_QUEUE, Peers};
use crate::refusals::Refusals;
use crate::rendezvous::Rendezvous;
use crate::reports::{Reports, StepSummary};
use crate::schedule::Schedule;

/// What the handlers tell the run loop.
#[derive(Debug)]
pub enum Event {
    /// Every member has opened its session; training starts.
    SessionsOpen,
    /// Every rank reported this step and their parameters agree.
    StepDone(StepSummary),
    /// A rank completed all its steps.
    Finished {
        /// The rank.
        rank: usize,
    },
    /// A worker asked the group to checkpoint and stop (it got SIGTERM).
    StopRequested {
        /// The rank.
        rank: usize,
        /// Why, in its words, escaped.
        reason: String,
    },
    /// Rank 0 uploaded (or failed to upload) a checkpoint that was asked for.
    CheckpointWritten {
        /// Steps done at the checkpoint.
        step: u64,
        /// Why it failed, if it did (escaped).
        error: Option<String>,
    },
    /// The run cannot go on.
    Failed(CoordinatorError),
}

/// State shared by all handlers of one generation.
pub struct Group {
    /// Who is in the group.
    pub rendezvous: Rendezvous,
    /// Their session streams.
    pub peers: Arc<Peers>,
    reducer: Reducer,
    reports: Reports,
    schedule: Arc<Schedule>,
    events: mpsc::Sender<Event>,
    refusals: Arc<Refusals>,
    start: pb::Start,
    heartbeat_timeout: Duration,
    handshake_timeout: Duration,
}

impl Group {
    /// Generation `generation` of a group of `world` workers training `cfg`
    /// as `start` says, checkpointing and stopping as `schedule` decides.
    pub fn new(
        cfg: &Config,
        generation: u64,
        world: usize,
        start: pb::Start,
        schedule: Arc<Schedule>,
        events: mpsc::Sender<Event>,
        refusals: Arc<Refusals>,
    ) -> Self {
        let co = &cfg.coordinator;
        let heartbeat_timeout = Duration::from_secs(co.heartbeat_timeout_s);
        let peers = Arc::new(Peers::new(world, heartbeat_timeout));
        let rendezvous = Rendezvous::new(
            generation,
            world,
            cfg.training_hash(),
            Duration::from_secs(co.heartbeat_interval_s),
        );
        Self {
            rendezvous,
            reducer: Reducer::new(
                world,
                peers.clone(),
                schedule.clone(),
                Shape::of(cfg),
                start.first_step,
                cfg.allreduce.nonfinite,
            ),
            peers,
            reports: Reports::new(world, start.first_step),
            schedule,
            events,
            refusals,
            start,
            heartbeat_timeout,
            handshake_timeout: Duration::from_secs(co.handshake_timeout_s),
        }
    }

    /// What the all-reduce is waiting for, to name the ranks holding up a stalled step.
    pub fn waiting(&self) -> Option<Waiting> {
        self.reducer.waiting()
    }

    /// Gradient updates every rank skipped because they were not finite.
    pub fn skipped(&self) -> u64 {
        self.reducer.skipped()
    }

    fn protocol(&self, rank: usize, message: impl Into<String>) -> CoordinatorError {
        GroupFailure::Protocol {
            rank,
            host: self.rendezvous.host_of(rank),
            message: message.into(),
        }
        .into()
    }
}

/// `Join`, over a shared [`Group`].
#[derive(Clone)]
pub struct RendezvousService {
    group: Arc<Group>,
}

/// `Session`, over a shared [`Group`].
#[derive(Clone)]
pub struct SessionService {
    group: Arc<Group>,
}

impl RendezvousService {
    /// Serves `group`.
    pub fn new(group: Arc<Group>) -> Self {
        Self { group }
    }
}

impl SessionService {
    /// Serves `group`.
    pub fn new(group: Arc<Group>) -> Self {
        Self { group }
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
        match self.group.rendezvous.join(request, ticket.id).await {
            Ok(reply) => {
                info!(rank = reply.rank, world = reply.world_size, %host, peer = %ticket.peer, "worker joined");
                Ok(Response::new(reply))
            }
            Err(refusal) => {
                let reason = format!("join from host {host} refused: {refusal}");
                self.group.refusals.record(&ticket.peer, &reason);
                Err(refusal.into())
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
        let group = &self.group;
        let ticket = ticket_of(&request).ok_or_else(|| Status::internal("no connection info"))?;
        let member = request
            .metadata()
            .get(MEMBER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let rank = group
            .rendezvous
            .session_rank(&member, ticket.id)
            .map_err(|refusal| {
                let reason = format!("session for member {} refused: {refusal}", shown(&member));
                group.refusals.record(&ticket.peer, &reason);
                Status::permission_denied(refusal.to_string())
            })?;
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(group.handshake_timeout, inbound.message()).await {
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
        if hello.member_id != member || hello.generation != group.rendezvous.generation() {
            return Err(Status::invalid_argument(format!(
                "Hello names member {} of generation {}, but the session is for this connection's \
                 member of generation {}",
                shown(&hello.member_id),
                hello.generation,
                group.rendezvous.generation()
            )));
        }
        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        let complete = group
            .peers
            .register(rank, tx)
            .map_err(|e| Status::already_exists(e.to_string()))?;
        tokio::spawn(serve_member(self.group.clone(), rank, inbound));
        if complete {
            let start = coordinator_message::Kind::Start(group.start.clone());
            match group.peers.broadcast(start).await {
                Ok(()) => send(group, Event::SessionsOpen).await,
                Err(stuck) => {
                    let reason = stuck.to_string();
                    send(group, Event::Failed(lost(stuck.rank, &reason))).await;
                }
            }
        }
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Reads one member's stream until it finishes, fails or falls silent for
/// longer than the heartbeat timeout.
async fn serve_member(group: Arc<Group>, rank: usize, mut inbound: Streaming<pb::WorkerMessage>) {
    let mut member = Member {
        rank,
        step: group.start.first_step,
        finished: false,
    };
    let failure = loop {
        let message = match tokio::time::timeout(group.heartbeat_timeout, inbound.message()).await {
            Ok(Ok(Some(message))) => message,
            Ok(Ok(None)) if member.finished => break None,
            Ok(Ok(None)) => break Some(lost(rank, "its stream closed before it finished")),
            Ok(Err(status)) => break Some(broken(&group, rank, &status)),
            Err(_) => break Some(silent(&group, rank, member.step)),
        };
        if let Err(failure) = member.handle(&group, message).await {
            break Some(failure);
        }
    };
    if let Some(failure) = failure {
        send(&group, Event::Failed(failure)).await;
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
                group
                    .reducer
                    .submit(rank, chunk)
                    .await
                    .map_err(|e| submit_failure(group, rank, e))?;
            }
            worker_message::Kind::Report(report) => {
                let reduced = group.reducer.steps_reduced();
                match group.reports.add(rank, report, reduced) {
                    Err(e) => return Err(group.protocol(rank, e.to_string())),
                    Ok(Some(Ok(summary))) => send(group, Event::StepDone(summary)).await,
                    Ok(Some(Err(divergence))) => return Err(GroupFailure::from(divergence).into()),
                    Ok(None) => {}
                }
            }
            worker_message::Kind::CheckpointWritten(written) => {
                if rank != 0 || !group.schedule.answer(written.step) {
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
                send(group, Event::CheckpointWritten { step, error }).await;
            }
            worker_message::Kind::StopRequest(request) => {
                let reason = shown_message(&request.reason);
                send(group, Event::StopRequested { rank, reason }).await;
            }
            worker_message::Kind::Finished(finished) => {
                let last = group.schedule.final_step();
                let reported = group.reports.last_of(rank);
                if finished.steps != last || reported != Some(last - 1) {
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
                send(group, Event::Finished { rank }).await;
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
    let seconds = group.heartbeat_timeout.as_secs();
    let host = group.rendezvous.host_of(rank);
    lost(
        rank,
        &format!(
            "no message or heartbeat from {host} for {seconds} s while at step {step} \
             (coordinator.heartbeat_timeout_s): the process is hung, stopped or cut off \
             from the coordinator; restart the run to resume from the latest checkpoint"
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

async fn send(group: &Group, event: Event) {
    // The run loop outlives every handler; if it is gone the run is over anyway.
    let _ = group.events.send(event).await;
}
