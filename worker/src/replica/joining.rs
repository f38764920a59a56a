//! What a worker presents when it joins a generation, and the replica it
//! gives when the coordinator asks for it on behalf of a member that joins
//! without one.

use bytes::Bytes;
use common::Config;
use common::DataCursor;
use common::client::{self, Clients, Donor, Opened, Session, SessionError};
use common::protocol::pb;
use common::security::auth::Token;
use common::storage::checkpoint::TrainingState;

use super::Connection;
use super::stop_signal::hostname;
use crate::model::backend::TrainBackend;
use crate::train::checkpoint;
use crate::train::step::Trainer;

/// The replica this worker holds between generations.
#[derive(Debug, Clone, Copy)]
pub(super) struct Held {
    pub(super) step: u64,
    pub(super) cursor: DataCursor,
}

/// What this worker carries from one generation into the next: the replica
/// it holds, the newest receipt (the coordinator's proof of a state the
/// group agreed on) and the member id it had, which gets it its place back.
#[derive(Debug, Clone, Default)]
pub(super) struct Carried {
    pub(super) held: Option<Held>,
    pub(super) receipt: Option<pb::Receipt>,
    pub(super) previous_member: String,
}

/// What a worker presents when it joins a generation: always the rank it
/// was started with (its place, e.g. a pod's index), so a re-formed group
/// numbers its members in the same order.
pub(super) struct Joining<'a> {
    pub(super) cfg: &'a Config,
    pub(super) connection: &'a Connection,
    pub(super) token: &'a Token,
    pub(super) initial: u64,
}

impl Joining<'_> {
    /// Connects, joins and opens the session, giving this worker's replica
    /// if the coordinator asks for it. The member id it is given goes to
    /// `carried` as soon as it joins: a generation that re-forms before
    /// its session opens still counts this worker among its survivors.
    pub(super) async fn join(
        &self,
        trainer: &Trainer<TrainBackend>,
        carried: &mut Carried,
    ) -> Result<(pb::JoinReply, Opened), SessionError> {
        let held = carried.held.map(|h| pb::Held {
            step: h.step,
            checksum: trainer.checksum(),
            epoch: h.cursor.epoch,
            position: h.cursor.position,
            run: self.cfg.checkpoint.run.clone(),
        });
        let request = pb::JoinRequest {
            proof: carried.receipt.clone(),
            previous_member: carried.previous_member.clone(),
            ..client::join_request(
                self.cfg,
                self.connection.rank,
                self.initial,
                hostname(),
                held,
            )
        };
        let mut clients: Clients =
            client::connect(&self.connection.address, self.cfg, self.token).await?;
        let joined = client::join(&mut clients, request).await?;
        carried.previous_member.clone_from(&joined.member_id);
        let mut donor = ReplicaDonor {
            trainer,
            held: carried.held,
            cfg: self.cfg,
        };
        let opened = Session::open(&mut clients, &joined, self.cfg, &mut donor).await?;
        Ok((joined, opened))
    }
}

/// Gives the replica this worker holds to the coordinator, for a member
/// that joins without one.
struct ReplicaDonor<'a> {
    trainer: &'a Trainer<TrainBackend>,
    held: Option<Held>,
    cfg: &'a Config,
}

impl Donor for ReplicaDonor<'_> {
    fn state(&mut self, step: u64) -> Result<Bytes, SessionError> {
        let held = self.held.filter(|h| h.step == step).ok_or_else(|| {
            SessionError::Protocol(format!(
                "asked for the replica of step {step}, but this worker holds step {:?}",
                self.held.map(|h| h.step)
            ))
        })?;
        let state = TrainingState {
            step,
            cursor: held.cursor,
            world: 0,
            config_hash: self.cfg.training_hash(),
            identity: self.cfg.resume_identity(),
            d_loss: f32::NAN,
            g_loss: f32::NAN,
            swd: None,
        };
        checkpoint::replica_bundle(self.trainer, &state)
            .map_err(|e| SessionError::Protocol(format!("packing this replica: {e:#}")))
    }
}
