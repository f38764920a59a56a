//! One generation of the group: forming it, starting it from the right
//! state, and the training state its handlers share.
//!
//! A generation forms (every place taken, or closed at its deadline with
//! enough members), then settles where its state comes from
//! ([`crate::generation::origin`]). When some members hold no usable replica, one that
//! does sends it through the coordinator, chunk by checked chunk, before
//! anyone starts. A generation ends when the run does or when the group
//! re-forms: its members are told, and its streams close.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::Config;
use common::config::{ElasticBatch, NonFinite};
use common::protocol::limits::MAX_STATE_BYTES;
use common::protocol::pb::{self, coordinator_message};
use tokio::sync::{mpsc, watch};

use crate::CoordinatorError;
use crate::allreduce::schedule::Schedule;
use crate::allreduce::{Reducer, Shape, Waiting};
use crate::error::GroupFailure;
use crate::generation::events::{Event, Notice, Origin};
use crate::generation::origin::{self, Claim, Held, Knowledge, Start};
use crate::generation::receipts::Receipts;
use crate::generation::rendezvous::{JoinError, Rendezvous, Seats, Terms};
use crate::generation::reports::Reports;
use crate::peers::{NotReading, Peers};
use crate::refusals::Refusals;

/// What every generation of a run is set up with.
#[derive(Clone)]
pub struct Settings {
    shape: Shape,
    nonfinite: NonFinite,
    /// Silence after which a member is lost.
    pub heartbeat_timeout: Duration,
    /// Time a new session has to say Hello.
    pub handshake_timeout: Duration,
    chunk_bytes: usize,
    batch_size: usize,
    elastic: ElasticBatch,
    steps: u64,
    config_hash: String,
    run: String,
    heartbeat_interval: Duration,
    /// The workers the run was started with: every generation's places.
    pub max: usize,
    /// The fewest it continues with.
    pub min: usize,
    /// What gives and checks receipts.
    pub receipts: Arc<Receipts>,
}

impl Settings {
    /// The settings of `cfg` for a run of up to `max` workers, whose
    /// receipts `receipts` gives; the elastic batch policy must work for
    /// every group size allowed.
    pub fn of(cfg: &Config, max: usize, receipts: Arc<Receipts>) -> Result<Self, CoordinatorError> {
        let co = &cfg.coordinator;
        let min = match co.min_workers {
            0 => max,
            n => n.min(max),
        };
        for world in min..=max {
            cfg.train
                .elastic_batch
                .per_worker(cfg.train.batch_size, max, world)
                .map_err(CoordinatorError::Elastic)?;
        }
        Ok(Self {
            shape: Shape::of(cfg),
            nonfinite: cfg.allreduce.nonfinite,
            heartbeat_timeout: Duration::from_secs(co.heartbeat_timeout_s),
            handshake_timeout: Duration::from_secs(co.handshake_timeout_s),
            chunk_bytes: cfg.allreduce.chunk_bytes,
            batch_size: cfg.train.batch_size,
            elastic: cfg.train.elastic_batch,
            steps: cfg.train.steps,
            config_hash: cfg.training_hash(),
            run: cfg.checkpoint.run.clone(),
            heartbeat_interval: Duration::from_secs(co.heartbeat_interval_s),
            max,
            min,
            receipts,
        })
    }
}

/// State shared by the handlers of one generation.
pub struct Group {
    /// Who is in it.
    pub rendezvous: Rendezvous,
    settings: Settings,
    known: Knowledge,
    schedule: Arc<Schedule>,
    events: mpsc::Sender<Notice>,
    /// Refused connections, run-wide.
    pub refusals: Arc<Refusals>,
    formed: OnceLock<Formed>,
    formed_signal: watch::Sender<bool>,
}

/// A generation once its members are numbered and its start decided.
pub struct Formed {
    /// Members.
    pub world: usize,
    /// Their session streams.
    pub peers: Arc<Peers>,
    /// The all-reduce.
    pub reducer: Reducer,
    /// Step reports.
    pub reports: Reports,
    /// Where the state comes from.
    pub start: Start,
    /// The replica the donor claimed, when one is sent.
    pub donated: Option<Held>,
    starts: Vec<pb::Start>,
    transfer: Mutex<Option<Transfer>>,
}

impl Group {
    /// Generation `generation` of a run set up with `settings`, keeping
    /// `seats` from the last one, starting from what `known` allows,
    /// checkpointing and stopping as `schedule` decides, reporting to
    /// `events`.
    pub fn new(
        generation: u64,
        seats: Seats,
        settings: Settings,
        known: Knowledge,
        schedule: Arc<Schedule>,
        events: mpsc::Sender<Notice>,
        refusals: Arc<Refusals>,
    ) -> Self {
        let rendezvous = Rendezvous::new(Terms {
            generation,
            max: settings.max,
            config_hash: settings.config_hash.clone(),
            run: settings.run.clone(),
            steps: settings.steps,
            cadence: settings.shape.cadence,
            heartbeat_interval: settings.heartbeat_interval,
            receipts: settings.receipts.clone(),
            seats,
        });
        Self {
            rendezvous,
            settings,
            known,
            schedule,
            events,
            refusals,
            formed: OnceLock::new(),
            formed_signal: watch::channel(false).0,
        }
    }

    /// Which generation this is.
    pub fn generation(&self) -> u64 {
        self.rendezvous.generation()
    }

    /// The run's settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Admits a worker that came over `connection` and waits until the
    /// generation forms. If the caller goes away first (the worker died or
    /// hung up), its place is given back.
    pub async fn join(
        &self,
        request: pb::JoinRequest,
        connection: u64,
    ) -> Result<pb::JoinReply, JoinError> {
        let admitted = self.rendezvous.admit(request, connection)?;
        let reservation = Reservation {
            rendezvous: &self.rendezvous,
            place: admitted.place,
        };
        if let Some(claims) = admitted.formed {
            self.settle(claims);
        }
        self.formed_signal().await;
        std::mem::forget(reservation);
        Ok(self
            .rendezvous
            .reply(&admitted.id)
            .expect("a member of a formed generation has a rank"))
    }

    /// Forms the generation with the members it has, at its deadline;
    /// `Err(joined)` when they are fewer than the run's minimum.
    pub fn close(&self) -> Result<(), usize> {
        match self.rendezvous.close(self.settings.min) {
            Ok(claims) => self.settle(claims),
            // The last member to join formed it in the meantime.
            Err(_) if self.rendezvous.is_formed() => {}
            Err(joined) => return Err(joined),
        }
        Ok(())
    }

    /// Numbers are given: decide where the state comes from and what each
    /// member is told at start.
    fn settle(&self, claims: Vec<Claim>) {
        let world = claims.len();
        let plan = origin::plan(&claims, &self.known);
        let donated = plan.donor.and_then(|donor| claims[donor].held);
        let checksum = donated.map_or(0, |held| held.checksum);
        let s = &self.settings;
        let batch = s
            .elastic
            .per_worker(s.batch_size, s.max, world)
            .expect("checked for every allowed group size when the run started");
        let owed =
            self.schedule
                .resume_at(self.generation(), plan.first_step, self.known.committed);
        let exact_first = self.schedule.exact(plan.first_step);
        let starts = plan
            .sources
            .iter()
            .map(|source| pb::Start {
                first_step: plan.first_step,
                steps: s.steps,
                resume_from: plan.resume_from.clone().unwrap_or_default(),
                source: *source as i32,
                epoch: plan.cursor.epoch,
                position: plan.cursor.position,
                batch_size: batch as u32,
                checkpoint: owed,
                exact_first,
                checksum,
            })
            .collect();
        let peers = Arc::new(Peers::new(world, s.heartbeat_timeout));
        let formed = Formed {
            world,
            reducer: Reducer::new(
                self.generation(),
                world,
                peers.clone(),
                self.schedule.clone(),
                s.shape,
                plan.first_step,
                s.nonfinite,
            ),
            reports: Reports::new(world, plan.first_step, s.shape.cadence),
            peers,
            start: plan,
            donated,
            starts,
            transfer: Mutex::new(None),
        };
        if self.formed.set(formed).is_ok() {
            self.formed_signal.send_replace(true);
        }
    }

    /// Resolves once the generation has formed.
    pub async fn formed_signal(&self) {
        let mut formed = self.formed_signal.subscribe();
        let _ = formed.wait_for(|done| *done).await;
    }

    /// The formed generation, if it has formed.
    pub fn formed(&self) -> Option<&Formed> {
        self.formed.get()
    }

    /// Every member has opened its session: ask for the replica that must
    /// travel, or start everyone.
    pub async fn begin(&self) {
        let formed = self
            .formed()
            .expect("sessions open only in a formed generation");
        let plan = &formed.start;
        let Some(donor) = plan.donor else {
            return self.start(formed).await;
        };
        let receivers = (0..formed.world)
            .filter(|&r| plan.sources[r] == pb::Source::Transfer)
            .collect();
        *formed.transfer.lock().expect("transfer lock") = Some(Transfer {
            donor,
            receivers,
            next: 0,
            received: 0,
            total: 0,
            chunk_bytes: self.settings.chunk_bytes,
        });
        self.send(Event::Transferring { donor }).await;
        let ask = coordinator_message::Kind::SendState(pb::SendState {
            step: plan.first_step,
        });
        if let Err(stuck) = formed.peers.send(donor, ask).await {
            self.send(Event::Failed(not_reading(stuck))).await;
        }
    }

    /// A piece of the replica from `rank`: checked, passed on to every
    /// member without one, and once it is complete, everyone starts.
    pub async fn state_chunk(
        &self,
        rank: usize,
        chunk: pb::StateChunk,
    ) -> Result<(), CoordinatorError> {
        let formed = self
            .formed()
            .expect("sessions open only in a formed generation");
        let (receivers, complete) = {
            let mut transfer = formed.transfer.lock().expect("transfer lock");
            let Some(t) = transfer.as_mut().filter(|t| t.donor == rank) else {
                return Err(self.protocol(rank, "sent a replica nobody asked it for"));
            };
            let complete = t.accept(&chunk).map_err(|e| self.protocol(rank, e))?;
            let receivers = t.receivers.clone();
            if complete {
                *transfer = None;
            }
            (receivers, complete)
        };
        for receiver in receivers {
            let piece = coordinator_message::Kind::State(chunk.clone());
            formed
                .peers
                .send(receiver, piece)
                .await
                .map_err(not_reading)?;
        }
        if complete {
            self.start(formed).await;
        }
        Ok(())
    }

    async fn start(&self, formed: &Formed) {
        for (rank, start) in formed.starts.iter().enumerate() {
            let start = coordinator_message::Kind::Start(start.clone());
            if let Err(stuck) = formed.peers.send(rank, start).await {
                return self.send(Event::Failed(not_reading(stuck))).await;
            }
        }
        self.send(Event::SessionsOpen).await;
    }

    /// Gives every member the receipt for the state after `step` steps, on
    /// which every rank agreed with `checksum`.
    pub async fn receipt(&self, step: u64, checksum: u64) -> Result<(), CoordinatorError> {
        let formed = self
            .formed()
            .expect("sessions open only in a formed generation");
        let receipt = self
            .settings
            .receipts
            .issue(origin::Verified { step, checksum });
        formed
            .peers
            .broadcast(coordinator_message::Kind::Receipt(receipt))
            .await
            .map_err(not_reading)
    }

    /// `rank` refused the replica it was sent: the donor is at fault if it
    /// was sent one, else `rank` breaks the protocol.
    pub fn replica_refused(&self, rank: usize, reason: &str) -> CoordinatorError {
        let formed = self
            .formed()
            .expect("sessions open only in a formed generation");
        let plan = &formed.start;
        match plan.donor {
            Some(donor) if plan.sources[rank] == pb::Source::Transfer => GroupFailure::BadReplica {
                donor,
                host: self.rendezvous.host_of(donor),
                receiver: rank,
                reason: common::security::untrusted::shown_message(reason),
            }
            .into(),
            _ => self.protocol(rank, "refused a replica it was not sent"),
        }
    }

    /// What the next generation keeps of this one once `lost` are gone.
    pub fn seats(&self, lost: &[usize]) -> Seats {
        self.rendezvous.seats(lost)
    }

    /// Tells every member that the group re-forms, and closes their streams.
    pub async fn regroup(&self, reason: String) {
        if let Some(formed) = self.formed() {
            formed.peers.regroup(reason).await;
        }
    }

    /// Tells every member the run is over, and closes their streams.
    pub async fn end(&self, abort: Option<String>) {
        if let Some(formed) = self.formed() {
            if let Some(reason) = abort {
                formed.peers.abort(reason).await;
            }
            formed.peers.close_all();
        }
    }

    /// What the all-reduce is waiting for, to name the ranks holding up a stalled step.
    pub fn waiting(&self) -> Option<Waiting> {
        self.formed()?.reducer.waiting()
    }

    /// Gradient updates every rank skipped because they were not finite.
    pub fn skipped(&self) -> u64 {
        self.formed().map_or(0, |f| f.reducer.skipped())
    }

    /// The checkpoint and stop plan.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// `rank` broke the protocol: `message` says how.
    pub fn protocol(&self, rank: usize, message: impl Into<String>) -> CoordinatorError {
        GroupFailure::Protocol {
            rank,
            host: self.rendezvous.host_of(rank),
            message: message.into(),
        }
        .into()
    }

    /// Reports `event` to the supervision as this generation's.
    pub async fn send(&self, event: Event) {
        let notice = Notice {
            origin: Origin::Generation(self.generation()),
            event,
        };
        // The supervision outlives every handler; if it is gone the run is over anyway.
        let _ = self.events.send(notice).await;
    }
}

/// A member that stopped reading while it was being sent its start or state.
fn not_reading(stuck: NotReading) -> CoordinatorError {
    GroupFailure::WorkerLost {
        rank: stuck.rank,
        reason: stuck.to_string(),
    }
    .into()
}

/// A replica in transit from `donor` to `receivers`.
struct Transfer {
    donor: usize,
    receivers: Vec<usize>,
    next: u32,
    received: u64,
    total: u64,
    chunk_bytes: usize,
}

impl Transfer {
    /// Checks the next chunk against what came before (order, size, the
    /// whole's size and split); true when it completes the replica.
    fn accept(&mut self, chunk: &pb::StateChunk) -> Result<bool, String> {
        if chunk.index != self.next {
            return Err(format!(
                "sent replica chunk {} where chunk {} was due",
                chunk.index, self.next
            ));
        }
        if self.next == 0 {
            if chunk.total_bytes == 0 || chunk.total_bytes > MAX_STATE_BYTES {
                return Err(format!(
                    "announced a replica of {} bytes (1 to {MAX_STATE_BYTES} are accepted)",
                    chunk.total_bytes
                ));
            }
            self.total = chunk.total_bytes;
        }
        let count = self.total.div_ceil(self.chunk_bytes as u64);
        let expected = (self.total - self.received).min(self.chunk_bytes as u64);
        if chunk.total_bytes != self.total
            || u64::from(chunk.count) != count
            || chunk.data.len() as u64 != expected
        {
            return Err(format!(
                "sent replica chunk {} of {} with {} of {} bytes; expected {count} chunks of \
                 allreduce.chunk_bytes ({}) making {} bytes",
                chunk.index,
                chunk.count,
                chunk.data.len(),
                chunk.total_bytes,
                self.chunk_bytes,
                self.total
            ));
        }
        self.received += expected;
        self.next += 1;
        Ok(self.received == self.total)
    }
}

/// A place held for a worker waiting in Join; dropped early (the worker
/// went away), it gives the place back.
struct Reservation<'a> {
    rendezvous: &'a Rendezvous,
    place: usize,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.rendezvous.release(self.place);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(index: u32, count: u32, total: u64, len: usize) -> pb::StateChunk {
        pb::StateChunk {
            index,
            count,
            total_bytes: total,
            data: vec![0u8; len].into(),
        }
    }

    fn transfer() -> Transfer {
        Transfer {
            donor: 0,
            receivers: vec![1],
            next: 0,
            received: 0,
            total: 0,
            chunk_bytes: 4,
        }
    }

    #[test]
    fn a_replica_arrives_in_order_and_whole() {
        let mut t = transfer();
        assert_eq!(t.accept(&chunk(0, 3, 10, 4)), Ok(false));
        assert_eq!(t.accept(&chunk(1, 3, 10, 4)), Ok(false));
        assert_eq!(t.accept(&chunk(2, 3, 10, 2)), Ok(true));
    }

    #[test]
    fn a_replica_out_of_order_oversized_or_misshapen_is_refused() {
        let err = |chunks: &[pb::StateChunk]| {
            let mut t = transfer();
            chunks
                .iter()
                .map(|c| t.accept(c))
                .find_map(Result::err)
                .unwrap()
        };
        assert!(err(&[chunk(1, 3, 10, 4)]).contains("chunk 0 was due"));
        assert!(err(&[chunk(0, 1, MAX_STATE_BYTES + 1, 4)]).contains("bytes (1 to"));
        assert!(err(&[chunk(0, 1, 0, 0)]).contains("replica of 0 bytes"));
        assert!(err(&[chunk(0, 3, 10, 4), chunk(1, 3, 11, 4)]).contains("expected 3 chunks"));
        assert!(err(&[chunk(0, 3, 10, 3)]).contains("with 3 of 10 bytes"));
    }
}
