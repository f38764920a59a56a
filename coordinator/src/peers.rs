//! The outbound half of every member's session stream.
//!
//! Every send has a deadline: a member that stops reading (a frozen
//! process, a client that never polls its stream) fills its queue, and the
//! coordinator then names it instead of waiting on it forever and letting
//! the whole group stall behind it.

use std::sync::Mutex;
use std::time::Duration;

use common::protocol::pb::{self, coordinator_message};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::SendTimeoutError;
use tonic::Status;

/// Messages queued towards one worker before the sender waits.
pub const OUTBOUND_QUEUE: usize = 64;

/// How long an abort waits, in all, for members to take the message.
pub const ABORT_GRACE: Duration = Duration::from_secs(1);

/// A sender towards one worker's session stream.
pub type Outbound = mpsc::Sender<Result<pb::CoordinatorMessage, Status>>;

/// A member's queue stayed full for the whole deadline.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "worker rank {rank} stopped reading its session stream: its queue of {OUTBOUND_QUEUE} messages \
     stayed full for {seconds} s (coordinator.heartbeat_timeout_s); its process is stuck or its \
     network is congested"
)]
pub struct NotReading {
    /// The member.
    pub rank: usize,
    /// How long it was given.
    pub seconds: u64,
}

/// A second session for a rank that has one.
#[derive(Debug, Clone, thiserror::Error)]
#[error("rank {0} already has a session; a member opens exactly one")]
pub struct AlreadyOpen(pub usize);

/// Per-rank senders; `None` until the member opens its session.
pub struct Peers {
    senders: Mutex<Vec<Option<Outbound>>>,
    read_deadline: Duration,
}

impl Peers {
    /// Room for `world` members, each given `read_deadline` to take a message.
    pub fn new(world: usize, read_deadline: Duration) -> Self {
        Self {
            senders: Mutex::new(vec![None; world]),
            read_deadline,
        }
    }

    /// Registers `rank`'s stream; returns true when this completes the group.
    pub fn register(&self, rank: usize, sender: Outbound) -> Result<bool, AlreadyOpen> {
        let mut senders = self.senders.lock().expect("peers lock");
        if senders[rank].is_some() {
            return Err(AlreadyOpen(rank));
        }
        senders[rank] = Some(sender);
        Ok(senders.iter().all(Option::is_some))
    }

    /// Ranks without a session.
    pub fn missing(&self) -> Vec<usize> {
        let senders = self.senders.lock().expect("peers lock");
        (0..senders.len())
            .filter(|&r| senders[r].is_none())
            .collect()
    }

    /// Sends `kind` to every connected member; a gone member is skipped
    /// (its own handler reports it), one that does not take the message
    /// within the read deadline is named.
    pub async fn broadcast(&self, kind: coordinator_message::Kind) -> Result<(), NotReading> {
        let message = pb::CoordinatorMessage { kind: Some(kind) };
        for (rank, sender) in self.connected() {
            match sender
                .send_timeout(Ok(message.clone()), self.read_deadline)
                .await
            {
                Err(SendTimeoutError::Timeout(_)) => {
                    return Err(NotReading {
                        rank,
                        seconds: self.read_deadline.as_secs(),
                    });
                }
                Ok(()) | Err(SendTimeoutError::Closed(_)) => {}
            }
        }
        Ok(())
    }

    /// Sends `kind` to `rank` alone (its start, a replica in transit); a
    /// gone member is skipped, as in [`Peers::broadcast`].
    pub async fn send(
        &self,
        rank: usize,
        kind: coordinator_message::Kind,
    ) -> Result<(), NotReading> {
        let sender = self.senders.lock().expect("peers lock")[rank].clone();
        let Some(sender) = sender else {
            return Ok(());
        };
        let message = pb::CoordinatorMessage { kind: Some(kind) };
        match sender.send_timeout(Ok(message), self.read_deadline).await {
            Err(SendTimeoutError::Timeout(_)) => Err(NotReading {
                rank,
                seconds: self.read_deadline.as_secs(),
            }),
            Ok(()) | Err(SendTimeoutError::Closed(_)) => Ok(()),
        }
    }

    /// Tells every member why the run is over, all at once.
    pub async fn abort(&self, reason: String) {
        self.tell_all(coordinator_message::Kind::Abort(pb::Abort { reason }))
            .await;
    }

    /// Tells every member the group re-forms, then ends their streams.
    pub async fn regroup(&self, reason: String) {
        self.tell_all(coordinator_message::Kind::Regroup(pb::Regroup { reason }))
            .await;
        self.close_all();
    }

    /// Sends `kind` to every member at once. A member that is not reading
    /// (often the reason for the message) cannot hold the others up: it
    /// takes at most [`ABORT_GRACE`] in all.
    async fn tell_all(&self, kind: coordinator_message::Kind) {
        let message = pb::CoordinatorMessage { kind: Some(kind) };
        let sends = self.connected().into_iter().map(|(_, sender)| {
            let message = message.clone();
            async move { sender.send_timeout(Ok(message), ABORT_GRACE).await }
        });
        let _ = futures::future::join_all(sends).await;
    }

    /// A snapshot of the open streams, so no lock is held across a send.
    fn connected(&self) -> Vec<(usize, Outbound)> {
        self.senders
            .lock()
            .expect("peers lock")
            .iter()
            .enumerate()
            .filter_map(|(rank, s)| s.clone().map(|s| (rank, s)))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_member_that_does_not_read_is_named_after_the_deadline() {
        let peers = Peers::new(2, Duration::from_millis(50));
        let (reading, mut inbox) = mpsc::channel(OUTBOUND_QUEUE);
        let (stuck, _never_read) = mpsc::channel(1);
        peers.register(0, reading).unwrap();
        assert!(peers.register(1, stuck).unwrap(), "the group is complete");
        let abort = || coordinator_message::Kind::Abort(pb::Abort::default());
        peers.broadcast(abort()).await.unwrap();
        let err = peers.broadcast(abort()).await.unwrap_err();
        assert_eq!(err.rank, 1);
        assert!(inbox.recv().await.is_some());
    }

    #[test]
    fn a_second_session_for_a_rank_is_refused() {
        let peers = Peers::new(2, Duration::from_secs(1));
        peers.register(1, mpsc::channel(1).0).unwrap();
        assert_eq!(peers.missing(), vec![0]);
        assert!(peers.register(1, mpsc::channel(1).0).is_err());
    }
}
