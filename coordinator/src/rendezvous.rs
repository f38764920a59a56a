//! Forming the group: who may join, which rank each member gets, and the
//! barrier that releases everyone once the group is complete.
//!
//! A worker is refused with a message that says exactly what differs: the
//! token, the protocol version, the training configuration, or its initial
//! parameters (every replica must start from the same weights, which the
//! first joiner's checksum pins down).

use std::sync::Mutex;
use std::time::Duration;

use common::pb;
use tokio::sync::watch;
use tonic::Status;

/// Why a worker may not join.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JoinError {
    /// The shared secret does not match.
    #[error("wrong token: give every worker the coordinator's GANCLUSTER_TOKEN")]
    WrongToken,
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
        /// The worker's hash.
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
    #[error("rank {0} is taken or outside the group")]
    Rank(i32),
    /// Every rank is taken.
    #[error("the group already has all {0} workers")]
    Full(usize),
}

impl From<JoinError> for Status {
    fn from(err: JoinError) -> Self {
        let message = err.to_string();
        match err {
            JoinError::WrongToken => Status::unauthenticated(message),
            JoinError::Full(_) | JoinError::Rank(_) => Status::resource_exhausted(message),
            _ => Status::failed_precondition(message),
        }
    }
}

#[derive(Debug, Clone)]
struct Member {
    id: String,
    host: String,
}

/// The group being formed (one generation).
pub struct Rendezvous {
    world: usize,
    token: String,
    config_hash: String,
    generation: u64,
    heartbeat_interval: Duration,
    state: Mutex<State>,
    formed: watch::Sender<bool>,
}

struct State {
    members: Vec<Option<Member>>,
    initial_checksum: Option<u64>,
}

impl Rendezvous {
    /// Generation `generation` (1, 2… as the group restarts) of a group of
    /// `world` workers that must present `token` and `config_hash`, told to
    /// send a heartbeat every `heartbeat_interval`.
    pub fn new(
        generation: u64,
        world: usize,
        token: String,
        config_hash: String,
        heartbeat_interval: Duration,
    ) -> Self {
        Self {
            world,
            token,
            config_hash,
            generation,
            heartbeat_interval,
            state: Mutex::new(State {
                members: vec![None; world],
                initial_checksum: None,
            }),
            formed: watch::channel(false).0,
        }
    }

    /// Admits a worker and waits until the group is complete.
    pub async fn join(&self, request: pb::JoinRequest) -> Result<pb::JoinReply, JoinError> {
        let (rank, member_id) = self.admit(request)?;
        self.formed().await;
        Ok(pb::JoinReply {
            rank: rank as u32,
            world_size: self.world as u32,
            generation: self.generation,
            member_id,
            heartbeat_interval_ms: u32::try_from(self.heartbeat_interval.as_millis())
                .unwrap_or(u32::MAX),
        })
    }

    fn admit(&self, request: pb::JoinRequest) -> Result<(usize, String), JoinError> {
        if request.token != self.token {
            return Err(JoinError::WrongToken);
        }
        if request.protocol_version != pb::PROTOCOL_VERSION {
            return Err(JoinError::Version {
                worker: request.protocol_version,
                coordinator: pb::PROTOCOL_VERSION,
            });
        }
        if request.config_hash != self.config_hash {
            return Err(JoinError::ConfigHash {
                worker: request.config_hash,
                coordinator: self.config_hash.clone(),
            });
        }
        let mut state = self.state.lock().expect("rendezvous lock");
        let group = *state
            .initial_checksum
            .get_or_insert(request.initial_checksum);
        if group != request.initial_checksum {
            return Err(JoinError::InitialChecksum {
                worker: request.initial_checksum,
                group,
            });
        }
        let rank = match request.requested_rank {
            r if r < 0 => state
                .members
                .iter()
                .position(Option::is_none)
                .ok_or(JoinError::Full(self.world))?,
            r if (r as usize) < self.world && state.members[r as usize].is_none() => r as usize,
            r => return Err(JoinError::Rank(r)),
        };
        let id = format!(
            "g{}-r{rank}-{:016x}",
            self.generation,
            rand::random::<u64>()
        );
        state.members[rank] = Some(Member {
            id: id.clone(),
            host: request.host,
        });
        if state.members.iter().all(Option::is_some) {
            self.formed.send_replace(true);
        }
        Ok((rank, id))
    }

    /// The rank of the member that joined with `member_id`.
    pub fn rank_of(&self, member_id: &str) -> Option<usize> {
        let state = self.state.lock().expect("rendezvous lock");
        state
            .members
            .iter()
            .position(|m| m.as_ref().is_some_and(|m| m.id == member_id))
    }

    /// The host `rank` joined from, for messages about it.
    pub fn host_of(&self, rank: usize) -> String {
        let state = self.state.lock().expect("rendezvous lock");
        state.members[rank]
            .as_ref()
            .map_or_else(|| "unknown host".into(), |m| m.host.clone())
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

    /// `(joined hosts, missing ranks)`, for a timeout message.
    pub fn who(&self) -> (Vec<String>, Vec<usize>) {
        let state = self.state.lock().expect("rendezvous lock");
        let hosts = state
            .members
            .iter()
            .flatten()
            .map(|m| m.host.clone())
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

#[cfg(test)]
mod tests {
    use super::*;

    const BEAT: Duration = Duration::from_secs(2);

    fn request(rank: i32) -> pb::JoinRequest {
        pb::JoinRequest {
            protocol_version: pb::PROTOCOL_VERSION,
            config_hash: "h".into(),
            token: "t".into(),
            requested_rank: rank,
            initial_checksum: 5,
            host: format!("host{rank}"),
        }
    }

    #[tokio::test]
    async fn the_group_is_released_when_complete() {
        let group = std::sync::Arc::new(Rendezvous::new(1, 2, "t".into(), "h".into(), BEAT));
        let first = tokio::spawn({
            let group = group.clone();
            async move { group.join(request(1)).await }
        });
        let second = group.join(request(-1)).await.unwrap();
        let first = first.await.unwrap().unwrap();
        assert_eq!((first.rank, second.rank, second.world_size), (1, 0, 2));
        assert_eq!(second.heartbeat_interval_ms, 2000);
        assert_eq!(group.rank_of(&first.member_id), Some(1));
    }

    #[test]
    fn refusals_say_what_differs() {
        let group = Rendezvous::new(1, 2, "t".into(), "h".into(), BEAT);
        let wrong = |f: fn(&mut pb::JoinRequest)| {
            let mut r = request(-1);
            f(&mut r);
            group.admit(r).unwrap_err().to_string()
        };
        assert!(wrong(|r| r.token = "x".into()).contains("wrong token"));
        assert!(wrong(|r| r.protocol_version = 99).contains("protocol version 99"));
        assert!(wrong(|r| r.config_hash = "other".into()).contains("configuration hash other"));
        group.admit(request(0)).unwrap();
        assert!(wrong(|r| r.initial_checksum = 6).contains("initial parameter checksum"));
        assert!(wrong(|r| r.requested_rank = 0).contains("rank 0 is taken"));
        let (hosts, missing) = group.who();
        assert_eq!((hosts, missing), (vec!["host0".to_string()], vec![1]));
    }
}
