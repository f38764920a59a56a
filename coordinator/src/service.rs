//! The gRPC service: thin handlers that convert, call the group's domain
//! objects and report what happened to the supervising run loop.

use std::sync::Arc;
use std::time::Duration;

use common::pb::coordinator_server::Coordinator;
use common::pb::{self, coordinator_message, worker_message};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::instrument;

use crate::CoordinatorError;
use crate::allreduce::{Reducer, Waiting};
use crate::peers::{OUTBOUND_QUEUE, Peers};
use crate::rendezvous::Rendezvous;
use crate::reports::{Reports, StepSummary};
use crate::schedule::Schedule;

/// What the handlers tell the run loop.
#[derive(Debug)]
pub enum Event {
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
        /// Why, in its words.
        reason: String,
    },
    /// Rank 0 uploaded (or failed to upload) a checkpoint.
    CheckpointWritten {
        /// Steps done at the checkpoint.
        step: u64,
        /// Why it failed, if it did.
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
    events: mpsc::Sender<Event>,
    start: pb::Start,
    heartbeat_timeout: Duration,
}

impl Group {
    /// A group of `world` workers told to train as `start` says, checkpointing
    /// and stopping as `schedule` decides; a member silent for
    /// `heartbeat_timeout` is lost.
    pub fn new(
        rendezvous: Rendezvous,
        world: usize,
        start: pb::Start,
        schedule: Arc<Schedule>,
        events: mpsc::Sender<Event>,
        heartbeat_timeout: Duration,
    ) -> Self {
        let peers = Arc::new(Peers::new(world));
        Self {
            rendezvous,
            reducer: Reducer::new(world, peers.clone(), schedule),
            peers,
            reports: Reports::new(world),
            events,
            start,
            heartbeat_timeout,
        }
    }

    /// What the all-reduce is waiting for, to name the ranks holding up a stalled step.
    pub fn waiting(&self) -> Option<Waiting> {
        self.reducer.waiting()
    }
}

/// The tonic service over a shared [`Group`].
#[derive(Clone)]
pub struct CoordinatorService {
    group: Arc<Group>,
}

impl CoordinatorService {
    /// Serves `group`.
    pub fn new(group: Arc<Group>) -> Self {
        Self { group }
    }
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    #[instrument(skip_all, fields(host = %request.get_ref().host, rank = request.get_ref().requested_rank))]
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinReply>, Status> {
        match self.group.rendezvous.join(request.into_inner()).await {
            Ok(reply) => {
                tracing::info!(rank = reply.rank, world = reply.world_size, "worker joined");
                Ok(Response::new(reply))
            }
            Err(refusal) => {
                tracing::warn!(%refusal, "refused a worker");
                Err(refusal.into())
            }
        }
    }

    type SessionStream = ReceiverStream<Result<pb::CoordinatorMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await? {
            Some(pb::WorkerMessage {
                kind: Some(worker_message::Kind::Hello(hello)),
            }) => hello,
            _ => return Err(Status::invalid_argument("a session must start with Hello")),
        };
        let rank = self
            .group
            .rendezvous
            .rank_of(&hello.member_id)
            .ok_or_else(|| {
                Status::permission_denied(format!("unknown member {}: join first", hello.member_id))
            })?;
        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        if self.group.peers.register(rank, tx) {
            let start = self.group.start.clone();
            self.group
                .peers
                .broadcast(coordinator_message::Kind::Start(start))
                .await;
        }
        tokio::spawn(serve_member(self.group.clone(), rank, inbound));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Reads one member's stream until it finishes, fails or falls silent for
/// longer than the heartbeat timeout.
async fn serve_member(group: Arc<Group>, rank: usize, mut inbound: Streaming<pb::WorkerMessage>) {
    let mut finished = false;
    let mut step = group.start.first_step;
    let outcome = loop {
        let message = match tokio::time::timeout(group.heartbeat_timeout, inbound.message()).await {
            Ok(Ok(Some(message))) => message,
            Ok(Ok(None)) if finished => break None,
            Ok(Ok(None)) => break Some(lost(rank, "its stream closed")),
            Ok(Err(status)) => {
                let reason = format!(
                    "its connection broke ({}): the process died or its network failed",
                    status.message()
                );
                break Some(lost(rank, &reason));
            }
            Err(_) => break Some(silent(&group, rank, step)),
        };
        match message.kind {
            Some(worker_message::Kind::Heartbeat(beat)) => step = beat.step,
            Some(worker_message::Kind::Chunk(chunk)) => {
                if let Err(err) = group.reducer.submit(rank, chunk).await {
                    break Some(CoordinatorError::Protocol {
                        rank,
                        message: err.to_string(),
                    });
                }
            }
            Some(worker_message::Kind::Report(report)) => match group.reports.add(rank, report) {
                Some(Ok(summary)) => send(&group, Event::StepDone(summary)).await,
                Some(Err(divergence)) => break Some(divergence.into()),
                None => {}
            },
            Some(worker_message::Kind::CheckpointWritten(written)) => {
                let error = (!written.ok).then_some(written.error);
                send(
                    &group,
                    Event::CheckpointWritten {
                        step: written.step,
                        error,
                    },
                )
                .await;
            }
            Some(worker_message::Kind::StopRequest(request)) => {
                let reason = request.reason;
                send(&group, Event::StopRequested { rank, reason }).await;
            }
            Some(worker_message::Kind::Finished(_)) => {
                finished = true;
                send(&group, Event::Finished { rank }).await;
            }
            _ => {
                break Some(CoordinatorError::Protocol {
                    rank,
                    message: "unexpected message".into(),
                });
            }
        }
    };
    if let Some(err) = outcome {
        send(&group, Event::Failed(err)).await;
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
    CoordinatorError::WorkerLost {
        rank,
        reason: reason.to_string(),
    }
}

async fn send(group: &Group, event: Event) {
    // The run loop outlives every handler; if it is gone the run is over anyway.
    let _ = group.events.send(event).await;
}
