//! What goes towards the coordinator: one bounded queue per session, fed
//! by the session itself and, while the worker trains, by other tasks:
//! heartbeats naming the step, checkpoint uploads and stop requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;

use super::error::SessionError;
use crate::protocol::pb::{self, worker_message};

/// Messages a worker may have queued towards the coordinator.
pub(super) const OUTBOUND_QUEUE: usize = 16;

/// Sends [`pb::CheckpointWritten`] or [`pb::StopRequest`] on a session from a background task.
/// Drop it before [`super::Session::finish`]: the stream ends when the last handle goes.
#[derive(Clone)]
pub struct Notifier(pub(super) mpsc::Sender<pb::WorkerMessage>);

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
pub(super) struct Heartbeat(tokio::task::JoinHandle<()>);

impl Heartbeat {
    /// Sends a heartbeat naming the current `step` every `interval` until
    /// the stream closes. Runs on the network runtime, so a long training
    /// step on the worker's own thread does not silence it.
    pub(super) fn start(
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
pub(super) async fn send(
    outbound: &mpsc::Sender<pb::WorkerMessage>,
    kind: worker_message::Kind,
) -> Result<(), SessionError> {
    outbound
        .send(pb::WorkerMessage { kind: Some(kind) })
        .await
        .map_err(|_| SessionError::Closed)
}
