//! One generation's session: a long-lived stream opened on the connection
//! that joined, which waits for the group to start (giving or taking a
//! replica meanwhile), then carries all-reduces ([`super::allreduce`]),
//! step reports and the coordinator's control until the worker finishes,
//! fails or the group re-forms.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use super::connect::Clients;
use super::error::SessionError;
use super::feedback::{Residuals, powersgd_of};
use super::inbound::{Proof, kind_name, next};
use super::outbound::{Heartbeat, Notifier, OUTBOUND_QUEUE, send};
use super::spares::Spares;
use super::transfer::{Donor, Received, pieces};
use crate::Config;
use crate::protocol::pb::{self, coordinator_message, worker_message};
use crate::protocol::powersgd::PowerSgd;
use crate::protocol::wire::WireFormat;
use crate::sampling::cadence::Cadence;
use crate::security::auth;
use crate::security::untrusted::{shown, shown_message};

/// How long a failing worker waits for the coordinator to take its reason.
pub const FAREWELL: Duration = Duration::from_secs(5);

/// A session once the group has started.
pub struct Opened {
    /// The session.
    pub session: Session,
    /// How training starts.
    pub start: pb::Start,
    /// The replica another member sent, when `start.source` is TRANSFER.
    pub state: Option<Bytes>,
}

/// An open session: send chunks and reports, receive reduced chunks and
/// control; heartbeats go out in the background for as long as it lives.
pub struct Session {
    pub(super) outbound: mpsc::Sender<pb::WorkerMessage>,
    pub(super) inbound: tonic::Streaming<pb::CoordinatorMessage>,
    pub(super) format: WireFormat,
    pub(super) chunk_bytes: usize,
    pub(super) control: Option<pb::Control>,
    /// The next step whose gradients travel exact (a checkpoint follows it).
    pub(super) exact: Option<u64>,
    /// The group has one member: only chunk headers travel, and every step
    /// is exact (the coordinator plans it so too).
    pub(super) alone: bool,
    /// This worker's residuals under error feedback, by network: what
    /// int8 rounded away from its gradients and owes the next step. They
    /// live with the session: a new generation starts without them, and
    /// they are zero after every exact step, so a checkpoint needs none.
    pub(super) residuals: Residuals,
    /// Vectors for the means (and int8's residuals) of the next
    /// all-reduces: what earlier ones freed (the gradients they encoded,
    /// the residuals they replaced).
    pub(super) spares: Spares,
    /// Under PowerSGD, its state per network (discriminator, generator):
    /// like int8's residuals, it lives with the session and is reset by
    /// every exact step.
    pub(super) powersgd: Option<[PowerSgd; 2]>,
    /// Where PowerSGD's warm-up ends (`train.sync_warmup`).
    pub(super) cadence: Cadence,
    pub(super) step: Arc<AtomicU64>,
    pub(super) heartbeat: Heartbeat,
    pub(super) proof: Proof,
}

impl Session {
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
        for chunk in pieces(bundle, self.chunk_bytes) {
            self.send(worker_message::Kind::State(chunk)).await?;
        }
        Ok(())
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
