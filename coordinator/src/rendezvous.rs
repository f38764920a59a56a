//! Forming the group: who may join, which rank each member gets, the
//! barrier that releases everyone once the group is complete, and which
//! connection may open each member's session.
//!
//! A worker is refused with a message that says exactly what differs: the
//! protocol version, the training configuration, or its initial parameters
//! (every replica must start from the same weights, which the first
//! admitted joiner's checksum pins down). Refusals change nothing: a
//! refused join neither takes a rank nor pins the checksum, and a worker
//! that hangs up while waiting for the others gives its rank back, so its
//! restart can take it again.

use std::sync::Mutex;
use std::time::Duration;

use common::pb;
use common::untrusted::shown;
use tokio::sync::watch;
use tonic::Status;

/// Longest host name accepted at join (a DNS name's limit).
pub const MAX_HOST_BYTES: usize = 253;

/// Why a worker may not join.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JoinError {
    /// Different builds.
    #[error(
        "protocol version {worker} but the coordinator speaks {coordinator}: run the same gancluster release everywhere"
    )]
    Version {
        /// The worker's version.
        worker: u32,
        /// Ours.
        coordinator: u32,
    },
    /// Different training settings.
    #[error(
        "configuration hash {worker} but the coordinator's is {coordinator}: model, train, data and allreduce \
         settings must be identical on every worker"
    )]
    ConfigHash {
        /// The worker's hash, escaped.
        worker: String,
        /// Ours.
        coordinator: String,
    },
    /// Different initial weights.
    #[error(
        "initial parameter checksum {worker:016x} differs from the group's {group:016x}: all replicas must start identical"
    )]
    InitialChecksum {
        /// The worker's checksum.
        worker: u64,
        /// The group's.
        group: u64,
    },
    /// The requested rank is taken or out of range.
    #[error("rank {0} is taken or outside the group (ask for 0..world-1, or -1 for any)")]
    Rank(i32),
    /// Every rank is taken.
    #[error("the group already has all {0} workers")]
    Full(usize),
    /// The host field is too long to be a host name.
    #[error("the host name is {0} bytes long; at most {MAX_HOST_BYTES} are accepted")]
    Host(usize),
}

impl From<JoinError> for Status {
    fn from(err: JoinError) -> Self {
        let message = err.to_string();
        match err {
            JoinError::Full(_) | JoinError::Rank(_) => Status::resource_exhausted(message),
            JoinError::Host(_) => Status::invalid_argument(message),
            _ => Status::failed_precondition(message),
        }
    }
}

/// Why a session may not open.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionRefusal {
    /// No member has this id.
    #[error("unknown member: join first (the session must name the member id Join returned)")]
    Unknown,
    /// The member joined over another connection.
    #[error(
        "member {0} joined over another connection: open the session on the connection that joined"
    )]
    OtherConnection(usize),
}

#[derive(Debug, Clone)]
struct Member {
    id: String,
    host: String,
    connection: u64,
}

/// The group being formed (one generation).
pub struct Rendezvous {
    world: usize,
    config_hash: String,
    generation: u64,
    heartbeat_interval: Duration,
    state: Mutex<State>,
    formed: watch::Sender<bool>,
}

struct State {
    members: Vec<Option<Member>>,
    initial_checksum: Option<u64>,
    formed: bool,
}

impl Rendezvous {
    /// Generation `generation` (1, 2… as the group restarts) of a group of
    /// `world` workers that must present `config_hash`, told to send a
    /// heartbeat every `heartbeat_interval`.
    pub fn new(
        generation: u64,
        world: usize,
        config_hash: String,
        heartbeat_interval: Duration,
    ) -> Self {
        Self {
            world,
            config_hash,
            generation,
            heartbeat_interval,
            state: Mutex::new(State {
                members: vec![None; world],
                initial_checksum: None,
                formed: false,
            }),
            formed: watch::channel(false).0,
        }
    }

    /// The generation this group is.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Admits a worker that came over `connection` and waits until the
    /// group is complete. If the caller goes away first (the worker died
    /// or hung up), the rank is given back.
    pub async fn join(
        &self,
        request: pb::JoinRequest,
        connection: u64,
    ) -> Result<pb::JoinReply, JoinError> {
        let (rank, member_id) = self.admit(request, connection)?;
        let reservation = Reservation {
            rendezvous: self,
            rank,
        };
        self.formed().await;
        std::mem::forget(reservation);
        Ok(pb::JoinReply {
            rank: rank as u32,
            world_size: self.world as u32,
            generation: self.generation,
            member_id,
            heartbeat_interval_ms: u32::try_from(self.heartbeat_interval.as_millis())
                .unwrap_or(u32::MAX),
        })
    }

    fn admit(
        &self,
        request: pb::JoinRequest,
        connection: u64,
    ) -> Result<(usize, String), JoinError> {
        if request.protocol_version != pb::PROTOCOL_VERSION {
            return Err(JoinError::Version {
                worker: request.protocol_version,
                coordinator: pb::PROTOCOL_VERSION,
            });
        }
        if request.config_hash != self.config_hash {
            return Err(JoinError::ConfigHash {
                worker: shown(&request.config_hash),
                coordinator: self.config_hash.clone(),
            });
        }
        if request.host.len() > MAX_HOST_BYTES {
            return Err(JoinError::Host(request.host.len()));
        }
        let mut state = self.state.lock().expect("rendezvous lock");
        let rank = match request.requested_rank {
            -1 => state
                .members
                .iter()
                .position(Option::is_none)
                .ok_or(JoinError::Full(self.world))?,
            r if r >= 0 && (r as usize) < self.world && state.members[r as usize].is_none() => {
                r as usize
            }
            r => return Err(JoinError::Rank(r)),
        };
        // Pinned only by a worker that is admitted: a refused one must not
        // decide what the real workers have to match.
        if let Some(group) = state.initial_checksum
            && group != request.initial_checksum
        {
            return Err(JoinError::InitialChecksum {
                worker: request.initial_checksum,
                group,
            });
        }
        state.initial_checksum = Some(request.initial_checksum);
        let id = format!(
            "g{}-r{rank}-{:016x}",
            self.generation,
            rand::random::<u64>()
        );
        state.members[rank] = Some(Member {
            id: id.clone(),
            host: request.host,
            connection,
        });
        if state.members.iter().all(Option::is_some) {
            state.formed = true;
            self.formed.send_replace(true);
        }
        Ok((rank, id))
    }

    /// Gives `rank` back if the group has not formed yet.
    fn release(&self, rank: usize) {
        let mut state = self.state.lock().expect("rendezvous lock");
        if state.formed {
            return;
        }
        state.members[rank] = None;
        if state.members.iter().all(Option::is_none) {
            state.initial_checksum = None;
        }
    }

    /// The rank of the member `member_id`, if it joined over `connection`.
    pub fn session_rank(&self, member_id: &str, connection: u64) -> Result<usize, SessionRefusal> {
        let state = self.state.lock().expect("rendezvous lock");
        let rank = state
            .members
            .iter()
            .position(|m| m.as_ref().is_some_and(|m| m.id == member_id))
            .ok_or(SessionRefusal::Unknown)?;
        match state.members[rank].as_ref() {
            Some(m) if m.connection == connection => Ok(rank),
            _ => Err(SessionRefusal::OtherConnection(rank)),
        }
    }

    /// The host `rank` joined from, escaped for messages about it.
    pub fn host_of(&self, rank: usize) -> String {
        let state = self.state.lock().expect("rendezvous lock");
        state.members[rank]
            .as_ref()
            .map_or_else(|| "unknown host".into(), |m| shown(&m.host))
    }

    /// Resolves once every rank has joined.
    pub async fn formed(&self) {
        let mut formed = self.formed.subscribe();
        let _ = formed.wait_for(|done| *done).await;
    }

    /// Whether every rank has joined.
    pub fn is_formed(&self) -> bool {
        *self.formed.borrow()
    }

    /// `(joined hosts, escaped; missing ranks)`, for a timeout message.
    pub fn who(&self) -> (Vec<String>, Vec<usize>) {
        let state = self.state.lock().expect("rendezvous lock");
        let hosts = state
            .members
            .iter()
            .flatten()
            .map(|m| shown(&m.host))
            .collect();
        let missing = state
            .members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.is_none())
            .map(|(r, _)| r)
            .collect();
        (hosts, missing)
    }
}

/// A rank held for a worker waiting in Join; dropped early (the worker
/// went away), it gives the rank back.
struct Reservation<'a> {
    rendezvous: &'a Rendezvous,
    rank: usize,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.rendezvous.release(self.rank);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const BEAT: Duration = Duration::from_secs(2);

    fn request(rank: i32) -> pb::JoinRequest {
        pb::JoinRequest {
            protocol_version: pb::PROTOCOL_VERSION,
            config_hash: "h".into(),
            requested_rank: rank,
            initial_checksum: 5,
            host: format!("host{rank}"),
        }
    }

    fn group(world: usize) -> Arc<Rendezvous> {
        Arc::new(Rendezvous::new(1, world, "h".into(), BEAT))
    }

    #[tokio::test]
    async fn the_group_is_released_when_complete() {
        let group = group(2);
        let first = tokio::spawn({
            let group = group.clone();
            async move { group.join(request(1), 7).await }
        });
        let second = group.join(request(-1), 8).await.unwrap();
        let first = first.await.unwrap().unwrap();
        assert_eq!((first.rank, second.rank, second.world_size), (1, 0, 2));
        assert_eq!(second.heartbeat_interval_ms, 2000);
        assert_eq!(group.session_rank(&first.member_id, 7).unwrap(), 1);
        assert!(matches!(
            group.session_rank(&first.member_id, 8),
            Err(SessionRefusal::OtherConnection(1))
        ));
        assert!(matches!(
            group.session_rank("g1-r9-x", 7),
            Err(SessionRefusal::Unknown)
        ));
    }

    #[test]
    fn refusals_say_what_differs() {
        let group = group(2);
        let wrong = |f: fn(&mut pb::JoinRequest)| {
            let mut r = request(-1);
            f(&mut r);
            group.admit(r, 1).unwrap_err().to_string()
        };
        assert!(wrong(|r| r.protocol_version = 99).contains("protocol version 99"));
        assert!(wrong(|r| r.config_hash = "other".into()).contains("configuration hash \"other\""));
        assert!(wrong(|r| r.requested_rank = -5).contains("rank -5 is taken or outside"));
        assert!(wrong(|r| r.host = "h".repeat(300)).contains("300 bytes"));
        group.admit(request(0), 1).unwrap();
        assert!(wrong(|r| r.initial_checksum = 6).contains("initial parameter checksum"));
        assert!(wrong(|r| r.requested_rank = 0).contains("rank 0 is taken"));
        let (hosts, missing) = group.who();
        assert_eq!((hosts, missing), (vec!["\"host0\"".to_string()], vec![1]));
    }

    /// A join refused for its rank must not pin the checksum the real
    /// workers then have to match.
    #[test]
    fn a_refused_join_does_not_pin_the_initial_checksum() {
        let group = group(2);
        let mut intruder = request(7);
        intruder.initial_checksum = 666;
        assert!(group.admit(intruder, 1).is_err());
        group.admit(request(0), 2).unwrap();
        group.admit(request(1), 3).unwrap();
        assert!(group.is_formed());
    }

    /// A worker that dies while waiting for the others gives its rank back,
    /// so its restart can join as the same rank.
    #[tokio::test]
    async fn a_joiner_that_goes_away_gives_its_rank_back() {
        let group = group(2);
        let mut waiting = Box::pin(group.join(request(1), 1));
        assert!(
            futures::poll!(&mut waiting).is_pending(),
            "the group is not complete"
        );
        assert_eq!(group.who().1, vec![0], "rank 1 is held");
        drop(waiting);
        assert_eq!(group.who().1, vec![0, 1], "rank 1 is free again");
        let mut restarted = request(1);
        restarted.initial_checksum = 9;
        group.admit(restarted, 2).unwrap();
    }
}
