//! Forming a generation: who may join, which rank each member gets, and
//! which connection may open each member's session.
//!
//! A worker is refused with a message that says exactly what differs: the
//! protocol version, the training configuration, its initial parameters
//! (every replica must start from the same weights, which the first
//! admitted joiner's checksum pins down) or the replica it holds.
//! Refusals change nothing: a refused join neither takes a place nor pins
//! the checksum, and a worker that hangs up while waiting for the others
//! gives its place back, so its restart can take it again.
//!
//! Survivors come first. A re-forming group keeps the places of the
//! previous generation's survivors for them (each proves it is one by the
//! member id it had, which only it was told) and the initial checksum the
//! run pinned: an arrival can neither take a survivor's place nor decide
//! what the survivors must match, and one whose checksum differs is
//! refused before it can make the group re-form.
//!
//! A generation forms when all `max` places are taken, or, when the
//! supervision closes it at its deadline, with the members it has (at
//! least `min_workers`). Members keep the order of the places they took
//! (a worker asking for rank r takes place r), numbered 0.. without gaps.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::protocol::pb;
use common::sampling::cadence::Cadence;
use common::security::untrusted::shown;
use tonic::Status;

use crate::generation::origin::{Claim, Held};
use crate::generation::receipts::Receipts;

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
    /// The replica it holds is of another run, past its end, or inside a
    /// round of post-local SGD (where replicas differ).
    #[error(
        "it holds {held}, but this coordinator trains run `{run}` to step {steps} in rounds of \
         {every} (train.sync_every; replicas agree only where a round starts): start the worker afresh"
    )]
    Held {
        /// What it holds, escaped.
        held: String,
        /// Our run.
        run: String,
        /// Our last step.
        steps: u64,
        /// Steps per round.
        every: u64,
    },
    /// The requested rank is taken or out of range.
    #[error("rank {0} is taken or outside the group (ask for 0..workers-1, or -1 for any)")]
    Rank(i32),
    /// The requested place is kept for a survivor of the last generation.
    #[error(
        "place {0} is kept for the member that held it in the last generation; ask for another \
         rank, or -1 for any"
    )]
    Kept(usize),
    /// Every place is taken.
    #[error("the group already has all {0} workers")]
    Full(usize),
    /// The generation formed smaller than it may grow: the worker joins the
    /// next one, which the group forms at its next step boundary.
    #[error("the group formed with {world} of up to {max} workers; join the next generation")]
    Later {
        /// Members.
        world: usize,
        /// Places.
        max: usize,
    },
    /// The host field is too long to be a host name.
    #[error("the host name is {0} bytes long; at most {MAX_HOST_BYTES} are accepted")]
    Host(usize),
}

impl From<JoinError> for Status {
    fn from(err: JoinError) -> Self {
        let message = err.to_string();
        match err {
            JoinError::Full(_) | JoinError::Rank(_) | JoinError::Kept(_) => {
                Status::resource_exhausted(message)
            }
            JoinError::Later { .. } => Status::unavailable(message),
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
    place: usize,
    claim: Claim,
    survivor: bool,
}

/// A worker admitted to a forming generation.
#[derive(Debug)]
pub struct Admitted {
    /// Its place (its rank once the group forms full).
    pub place: usize,
    /// Its member id.
    pub id: String,
    /// Its admission completed the group: what the members present, by rank.
    pub formed: Option<Vec<Claim>>,
}

/// What a re-forming generation keeps from the one before.
#[derive(Debug, Clone, Default)]
pub struct Seats {
    /// `(place, member id)` of each survivor.
    pub survivors: Vec<(usize, String)>,
    /// The initial parameter checksum the run's members share.
    pub initial_checksum: Option<u64>,
}

/// What a generation presents and requires.
#[derive(Debug, Clone)]
pub struct Terms {
    /// 1, 2… as the group re-forms.
    pub generation: u64,
    /// Places: the workers the run was started with.
    pub max: usize,
    /// The training settings' hash every member must present.
    pub config_hash: String,
    /// `checkpoint.run`: held replicas must belong to it.
    pub run: String,
    /// `train.steps`: no replica can be past it.
    pub steps: u64,
    /// `train.sync_every`: a replica is held only where a round starts.
    pub cadence: Cadence,
    /// How often members send heartbeats.
    pub heartbeat_interval: Duration,
    /// What checks the receipts members present.
    pub receipts: Arc<Receipts>,
    /// What this generation keeps from the one before.
    pub seats: Seats,
}

/// The membership of one generation.
pub struct Rendezvous {
    terms: Terms,
    state: Mutex<State>,
}

struct State {
    places: Vec<Option<Member>>,
    initial_checksum: Option<u64>,
    /// Members by rank, once formed.
    ranked: Option<Vec<Member>>,
}

impl Rendezvous {
    /// A generation as `terms` say.
    pub fn new(terms: Terms) -> Self {
        let places = vec![None; terms.max];
        let initial_checksum = terms.seats.initial_checksum;
        Self {
            terms,
            state: Mutex::new(State {
                places,
                initial_checksum,
                ranked: None,
            }),
        }
    }

    /// The generation this group is.
    pub fn generation(&self) -> u64 {
        self.terms.generation
    }

    /// Admits a worker that came over `connection`.
    pub fn admit(&self, request: pb::JoinRequest, connection: u64) -> Result<Admitted, JoinError> {
        if request.protocol_version != pb::PROTOCOL_VERSION {
            return Err(JoinError::Version {
                worker: request.protocol_version,
                coordinator: pb::PROTOCOL_VERSION,
            });
        }
        let terms = &self.terms;
        if request.config_hash != terms.config_hash {
            return Err(JoinError::ConfigHash {
                worker: shown(&request.config_hash),
                coordinator: terms.config_hash.clone(),
            });
        }
        if request.host.len() > MAX_HOST_BYTES {
            return Err(JoinError::Host(request.host.len()));
        }
        let held = match &request.held {
            Some(h)
                if h.run != terms.run
                    || h.step > terms.steps
                    || !terms.cadence.starts_round(h.step) =>
            {
                return Err(JoinError::Held {
                    held: format!("a replica of run {} at step {}", shown(&h.run), h.step),
                    run: terms.run.clone(),
                    steps: terms.steps,
                    every: terms.cadence.every(),
                });
            }
            Some(h) => Some(Held::from_wire(h)),
            None => None,
        };
        let proof = request.proof.as_ref().and_then(|receipt| {
            let proof = terms.receipts.verify(receipt);
            if proof.is_none() {
                tracing::warn!(host = %shown(&request.host), step = receipt.step,
                    "a joiner presented a receipt no coordinator of this run issued: it proves nothing");
            }
            proof
        });
        let mut state = self.state.lock().expect("rendezvous lock");
        // Pinned only by a worker that is admitted (a refused one must not
        // decide what the real workers have to match), and checked before
        // an arrival can make a formed group re-form.
        if let Some(group) = state.initial_checksum
            && group != request.initial_checksum
        {
            return Err(JoinError::InitialChecksum {
                worker: request.initial_checksum,
                group,
            });
        }
        if let Some(ranked) = &state.ranked {
            return Err(match ranked.len() < terms.max {
                true => JoinError::Later {
                    world: ranked.len(),
                    max: terms.max,
                },
                false => JoinError::Full(terms.max),
            });
        }
        let survivors = &terms.seats.survivors;
        let kept = |place: usize| survivors.iter().any(|(p, _)| *p == place);
        let survivor = survivors
            .iter()
            .find(|(_, id)| !request.previous_member.is_empty() && *id == request.previous_member)
            .map(|(place, _)| *place);
        let place = match (survivor, request.requested_rank) {
            (Some(place), _) if state.places[place].is_none() => place,
            (Some(place), _) => return Err(JoinError::Kept(place)),
            (None, -1) => (0..terms.max)
                .find(|&p| state.places[p].is_none() && !kept(p))
                .ok_or(JoinError::Full(terms.max))?,
            (None, r) if r >= 0 && (r as usize) < terms.max && kept(r as usize) => {
                return Err(JoinError::Kept(r as usize));
            }
            (None, r)
                if r >= 0 && (r as usize) < terms.max && state.places[r as usize].is_none() =>
            {
                r as usize
            }
            (None, r) => return Err(JoinError::Rank(r)),
        };
        state.initial_checksum = Some(request.initial_checksum);
        let id = format!(
            "g{}-p{place}-{:016x}",
            terms.generation,
            rand::random::<u64>()
        );
        state.places[place] = Some(Member {
            id: id.clone(),
            host: request.host,
            connection,
            place,
            claim: Claim { held, proof },
            survivor: survivor.is_some(),
        });
        let formed = state
            .places
            .iter()
            .all(Option::is_some)
            .then(|| Self::form(&mut state));
        Ok(Admitted { place, id, formed })
    }

    /// Forms the generation with the members it has, if there are at least
    /// `min`; otherwise returns how many there are.
    pub fn close(&self, min: usize) -> Result<Vec<Claim>, usize> {
        let mut state = self.state.lock().expect("rendezvous lock");
        let joined = state.places.iter().flatten().count();
        if state.ranked.is_some() || joined < min.max(1) {
            return Err(joined);
        }
        Ok(Self::form(&mut state))
    }

    /// Numbers the members by place; returns what they present, by rank.
    fn form(state: &mut State) -> Vec<Claim> {
        let ranked: Vec<Member> = state.places.iter().flatten().cloned().collect();
        let claims = ranked.iter().map(|m| m.claim).collect();
        state.ranked = Some(ranked);
        claims
    }

    /// What the next generation keeps of this one once `lost` (ranks) are
    /// gone: the survivors' places and the initial checksum.
    pub fn seats(&self, lost: &[usize]) -> Seats {
        let state = self.state.lock().expect("rendezvous lock");
        let survivors = state
            .ranked
            .iter()
            .flatten()
            .enumerate()
            .filter(|(rank, _)| !lost.contains(rank))
            .map(|(_, m)| (m.place, m.id.clone()))
            .collect();
        Seats {
            survivors,
            initial_checksum: state.initial_checksum,
        }
    }

    /// Ranks of the formed group that are not survivors of the last
    /// generation (in the first generation, none: everyone starts there).
    pub fn arrivals(&self) -> Vec<usize> {
        let state = self.state.lock().expect("rendezvous lock");
        match self.terms.generation {
            1 => Vec::new(),
            _ => state
                .ranked
                .iter()
                .flatten()
                .enumerate()
                .filter(|(_, m)| !m.survivor)
                .map(|(rank, _)| rank)
                .collect(),
        }
    }

    /// Gives `place` back if the group has not formed yet.
    pub fn release(&self, place: usize) {
        let mut state = self.state.lock().expect("rendezvous lock");
        if state.ranked.is_some() {
            return;
        }
        state.places[place] = None;
        if state.places.iter().all(Option::is_none) {
            state.initial_checksum = self.terms.seats.initial_checksum;
        }
    }

    /// What member `id` is told once the group formed.
    pub fn reply(&self, id: &str) -> Option<pb::JoinReply> {
        let state = self.state.lock().expect("rendezvous lock");
        let ranked = state.ranked.as_ref()?;
        let rank = ranked.iter().position(|m| m.id == id)?;
        Some(pb::JoinReply {
            rank: rank as u32,
            world_size: ranked.len() as u32,
            generation: self.terms.generation,
            member_id: id.to_string(),
            heartbeat_interval_ms: u32::try_from(self.terms.heartbeat_interval.as_millis())
                .unwrap_or(u32::MAX),
        })
    }

    /// The rank of the member `member_id`, if it joined over `connection`.
    pub fn session_rank(&self, member_id: &str, connection: u64) -> Result<usize, SessionRefusal> {
        let state = self.state.lock().expect("rendezvous lock");
        let ranked = state.ranked.as_ref().ok_or(SessionRefusal::Unknown)?;
        let rank = ranked
            .iter()
            .position(|m| m.id == member_id)
            .ok_or(SessionRefusal::Unknown)?;
        match ranked[rank].connection == connection {
            true => Ok(rank),
            false => Err(SessionRefusal::OtherConnection(rank)),
        }
    }

    /// The host `rank` joined from, escaped for messages about it.
    pub fn host_of(&self, rank: usize) -> String {
        let state = self.state.lock().expect("rendezvous lock");
        state
            .ranked
            .as_ref()
            .and_then(|r| r.get(rank))
            .map_or_else(|| "unknown host".into(), |m| shown(&m.host))
    }

    /// The rank of the member that took `place`, in the formed group.
    pub fn rank_at(&self, place: usize) -> Option<usize> {
        let state = self.state.lock().expect("rendezvous lock");
        state.ranked.as_ref()?.iter().position(|m| m.place == place)
    }

    /// The place of `rank`, in the formed group.
    pub fn place_of(&self, rank: usize) -> Option<usize> {
        let state = self.state.lock().expect("rendezvous lock");
        Some(state.ranked.as_ref()?.get(rank)?.place)
    }

    /// Whether the generation formed.
    pub fn is_formed(&self) -> bool {
        self.state.lock().expect("rendezvous lock").ranked.is_some()
    }

    /// `(joined hosts, escaped; free places)`, for a timeout message.
    pub fn who(&self) -> (Vec<String>, Vec<usize>) {
        let state = self.state.lock().expect("rendezvous lock");
        let hosts = state
            .places
            .iter()
            .flatten()
            .map(|m| shown(&m.host))
            .collect();
        let missing = state
            .places
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
            requested_rank: rank,
            initial_checksum: 5,
            host: format!("host{rank}"),
            held: None,
            proof: None,
            previous_member: String::new(),
        }
    }

    fn terms(generation: u64, max: usize, seats: Seats) -> Terms {
        Terms {
            generation,
            max,
            config_hash: "h".into(),
            run: "run".into(),
            steps: 100,
            cadence: Cadence::new(4, 0),
            heartbeat_interval: BEAT,
            receipts: Arc::new(Receipts::ephemeral("run")),
            seats,
        }
    }

    fn group(max: usize) -> Rendezvous {
        Rendezvous::new(terms(1, max, Seats::default()))
    }

    #[test]
    fn the_group_forms_when_complete_and_ranks_follow_places() {
        let group = group(2);
        let first = group.admit(request(1), 7).unwrap();
        assert!(first.formed.is_none());
        assert!(group.reply(&first.id).is_none(), "not before it forms");
        let second = group.admit(request(-1), 8).unwrap();
        assert_eq!(second.formed, Some(vec![Claim::default(); 2]));
        let (a, b) = (
            group.reply(&first.id).unwrap(),
            group.reply(&second.id).unwrap(),
        );
        assert_eq!((a.rank, b.rank, b.world_size), (1, 0, 2));
        assert_eq!(b.heartbeat_interval_ms, 2000);
        assert_eq!(group.session_rank(&first.id, 7).unwrap(), 1);
        assert!(matches!(
            group.session_rank(&first.id, 8),
            Err(SessionRefusal::OtherConnection(1))
        ));
        assert!(matches!(
            group.session_rank("g1-p9-x", 7),
            Err(SessionRefusal::Unknown)
        ));
        assert!(matches!(
            group.admit(request(-1), 9),
            Err(JoinError::Full(2))
        ));
    }

    /// Closed at its deadline, a generation forms with whoever joined,
    /// numbered without gaps in place order; a later worker is told to join
    /// the next generation.
    #[test]
    fn a_closed_group_forms_smaller_and_sends_newcomers_to_the_next_generation() {
        let group = group(3);
        assert_eq!(group.close(1).unwrap_err(), 0, "nobody joined");
        let late = group.admit(request(2), 1).unwrap();
        let early = group.admit(request(0), 2).unwrap();
        assert_eq!(group.close(3).unwrap_err(), 2, "fewer than min_workers");
        group.close(2).unwrap();
        assert_eq!(group.reply(&early.id).unwrap().rank, 0);
        let late = group.reply(&late.id).unwrap();
        assert_eq!((late.rank, late.world_size), (1, 2));
        assert_eq!((group.rank_at(2), group.place_of(1)), (Some(1), Some(2)));
        assert!(matches!(
            group.admit(request(1), 3),
            Err(JoinError::Later { world: 2, max: 3 })
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
        let holding = |run: &str, step: u64| {
            let mut r = request(-1);
            r.held = Some(pb::Held {
                run: run.into(),
                step,
                ..Default::default()
            });
            group.admit(r, 1).unwrap_err().to_string()
        };
        assert!(holding("other", 0).contains("a replica of run \"other\" at step 0"));
        assert!(holding("run", 101).contains("to step 100"), "past the end");
        assert!(
            holding("run", 6).contains("in rounds of 4"),
            "inside a round"
        );
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

    /// A worker that goes away while waiting gives its place back, so its
    /// restart can take it again.
    #[test]
    fn a_released_place_can_be_taken_again() {
        let group = group(2);
        let first = group.admit(request(1), 1).unwrap();
        assert_eq!(group.who().1, vec![0], "place 1 is held");
        group.release(first.place);
        assert_eq!(group.who().1, vec![0, 1], "place 1 is free again");
        let mut restarted = request(1);
        restarted.initial_checksum = 9;
        group.admit(restarted, 2).unwrap();
    }

    /// Probe 3a/3b of the issue: after a regroup, an arrival (without a
    /// rank, or with a survivor's) cannot take a survivor's place, and one
    /// with another initial checksum is refused before it can re-form the
    /// group; the survivors take their places back.
    #[test]
    fn survivors_take_their_places_back_before_any_arrival() {
        let first = group(3);
        let a = first.admit(request(0), 1).unwrap();
        let b = first.admit(request(1), 2).unwrap();
        assert_eq!(first.close(2).unwrap().len(), 2);
        let seats = first.seats(&[]);
        assert_eq!(seats.initial_checksum, Some(5));
        let second = Rendezvous::new(terms(2, 3, seats));
        let mut wrong = request(-1);
        wrong.initial_checksum = 666;
        assert!(matches!(
            second.admit(wrong, 3),
            Err(JoinError::InitialChecksum { group: 5, .. })
        ));
        assert!(matches!(
            second.admit(request(0), 3),
            Err(JoinError::Kept(0))
        ));
        let arrival = second.admit(request(-1), 3).unwrap();
        assert_eq!(arrival.place, 2, "the first place no survivor keeps");
        let mut back = request(-1);
        back.previous_member = b.id.clone();
        assert_eq!(second.admit(back, 4).unwrap().place, 1);
        let mut back = request(0);
        back.previous_member = a.id;
        let last = second.admit(back, 5).unwrap();
        assert_eq!(last.place, 0);
        assert!(last.formed.is_some());
        assert_eq!(second.arrivals(), vec![2]);
        assert!(
            group(1).arrivals().is_empty(),
            "the first generation has none"
        );
    }

    /// A forming group that already pinned the run's checksum refuses
    /// another even when no place is taken yet; a released place keeps it.
    #[test]
    fn the_pinned_checksum_outlives_released_places() {
        let seats = Seats {
            survivors: vec![],
            initial_checksum: Some(5),
        };
        let group = Rendezvous::new(terms(2, 2, seats));
        let joined = group.admit(request(0), 1).unwrap();
        group.release(joined.place);
        let mut wrong = request(1);
        wrong.initial_checksum = 6;
        assert!(group.admit(wrong, 2).is_err());
    }

    /// A receipt is checked at join: a forged one proves nothing.
    #[test]
    fn only_receipts_of_this_run_are_taken_as_proof() {
        let receipts = Arc::new(Receipts::ephemeral("run"));
        let group = Rendezvous::new(Terms {
            receipts: receipts.clone(),
            ..terms(2, 2, Seats::default())
        });
        let agreed = crate::generation::origin::Verified {
            step: 4,
            checksum: 9,
        };
        let mut honest = request(0);
        honest.proof = Some(receipts.issue(agreed));
        group.admit(honest, 1).unwrap();
        let mut forged = request(1);
        forged.proof = Some(pb::Receipt {
            step: 40,
            checksum: 1,
            tag: vec![0; 32].into(),
        });
        let claims = group.admit(forged, 2).unwrap().formed.unwrap();
        assert_eq!(claims[0].proof, Some(agreed));
        assert_eq!(claims[1].proof, None);
    }
}
