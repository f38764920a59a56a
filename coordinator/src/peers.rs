//! The outbound half of every member's session stream.

use std::sync::Mutex;

use common::pb::{self, coordinator_message};
use tokio::sync::mpsc;
use tonic::Status;

/// Messages queued towards one worker before the sender waits.
pub const OUTBOUND_QUEUE: usize = 64;

/// How long an abort waits for a member's full queue before moving on.
pub const ABORT_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// A sender towards one worker's session stream.
pub type Outbound = mpsc::Sender<Result<pb::CoordinatorMessage, Status>>;

/// Per-rank senders; `None` until the member opens its session.
pub struct Peers {
    senders: Mutex<Vec<Option<Outbound>>>,
}

impl Peers {
    /// Room for `world` members.
    pub fn new(world: usize) -> Self {
        Self {
            senders: Mutex::new(vec![None; world]),
        }
    }

    /// Registers `rank`'s stream; returns true when this completes the group.
    /// A second session for the same rank replaces the first.
    pub fn register(&self, rank: usize, sender: Outbound) -> bool {
        let mut senders = self.senders.lock().expect("peers lock");
        senders[rank] = Some(sender);
        senders.iter().all(Option::is_some)
    }

    /// Sends `kind` to every connected member; one slow member delays the
    /// others only by its own queue, and a gone member is skipped.
    pub async fn broadcast(&self, kind: coordinator_message::Kind) {
        let message = pb::CoordinatorMessage { kind: Some(kind) };
        for sender in self.connected() {
            let _ = sender.send(Ok(message.clone())).await;
        }
    }

    /// Tells every member why the run is over. A member that is not reading
    /// (stopped, hung: often the reason for the abort) gets
    /// [`ABORT_GRACE`] to take the message, so it cannot hold the others up.
    pub async fn abort(&self, reason: String) {
        let message = pb::CoordinatorMessage {
            kind: Some(coordinator_message::Kind::Abort(pb::Abort { reason })),
        };
        for sender in self.connected() {
            let _ = sender.send_timeout(Ok(message.clone()), ABORT_GRACE).await;
        }
    }

    /// A snapshot of the open streams, so no lock is held across a send.
    fn connected(&self) -> Vec<Outbound> {
        self.senders
            .lock()
            .expect("peers lock")
            .iter()
            .flatten()
            .cloned()
            .collect()
    }

    /// Drops every sender, which ends every member's response stream.
    pub fn close_all(&self) {
        self.senders
            .lock()
            .expect("peers lock")
            .iter_mut()
            .for_each(|s| *s = None);
    }
}
