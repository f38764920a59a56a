//! Where a generation's state comes from: the replicas its members hold,
//! or, when none can be trusted, a checkpoint (or fresh weights).
//!
//! Survivors of a lost member hold identical replicas (every completed step
//! is checked by its parameter checksum), so a re-formed group continues
//! from them and loses no step: members that hold the newest replica keep
//! it, the others receive it from one of them.
//!
//! What a member says it holds is a claim, never the truth. A claim is
//! believed only on evidence ([`credible`]):
//! 1. *proven*: its step and checksum are a state every rank agreed on, as
//!    this coordinator saw ([`Knowledge::verified`]) or as a receipt a
//!    member presents shows ([`crate::generation::receipts`]);
//! 2. *quorum*: newer than anything proven, held identically by a strict
//!    majority of the run's places, at most [`Knowledge::bound`] and short
//!    of the run's last step (so that members alone can never end a run);
//! 3. *reduced*: newer than anything proven, no further than the steps
//!    this coordinator itself reduced and broadcast whole, and only when no
//!    member holds the proven state (the members that applied that last
//!    step are then the only ones holding the group's state).
//!
//! Anything else is ignored: its holder is treated as holding nothing.
//! Steps "trained again" count only steps the run provably completed.
//! The rules are a pure function of what the members present and what the
//! coordinator itself has seen, so they are tested here without a network.

use common::DataCursor;
use common::protocol::pb;

/// Where a generation starts from the store alone, without replicas: the
/// newest checkpoint (or the one the operator named), or fresh weights.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredStart {
    /// First step to train.
    pub first_step: u64,
    /// Checkpoint to load, or `None` for fresh weights.
    pub checkpoint: Option<String>,
}

/// A replica a member says it holds: the state after `step` steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// Steps completed.
    pub step: u64,
    /// Checksum of its trainable parameters.
    pub checksum: u64,
    /// Where its next step reads the data.
    pub cursor: DataCursor,
}

impl Held {
    /// What a join request says, if it holds anything.
    pub fn from_wire(held: &pb::Held) -> Self {
        Self {
            step: held.step,
            checksum: held.checksum,
            cursor: DataCursor {
                epoch: held.epoch,
                position: held.position,
            },
        }
    }
}

/// The last state every rank reported with the same checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    /// Steps completed.
    pub step: u64,
    /// Their agreed checksum.
    pub checksum: u64,
}

/// What a member presents when it joins: the replica it says it holds,
/// and the newest receipt it was given, once checked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Claim {
    /// The replica it says it holds.
    pub held: Option<Held>,
    /// The state its receipt proves the group agreed on, if it presented
    /// one that verifies.
    pub proof: Option<Verified>,
}

/// What the coordinator knows when a generation forms, besides its members.
#[derive(Debug, Clone, Default)]
pub struct Knowledge {
    /// Where the run would start without replicas (the newest checkpoint,
    /// or fresh weights).
    pub fallback: StoredStart,
    /// The newest state the coordinator saw every rank agree on.
    pub verified: Option<Verified>,
    /// Steps the run had completed before this generation (0 when the
    /// coordinator just started).
    pub reached: u64,
    /// The newest checkpoint committed, if the coordinator knows of one.
    pub committed: Option<u64>,
    /// Whether members' replicas may be used at all (not after the group
    /// diverged, nor when the operator named a checkpoint or a fresh start).
    pub trust_replicas: bool,
    /// The run's places (`--workers`): a quorum is a strict majority of them.
    pub places: usize,
    /// The newest step a replica can be at: the steps this coordinator
    /// reduced once it has trained, `train.steps` when an earlier
    /// coordinator of the run may have trained further, else where the run
    /// starts (nothing newer can exist).
    pub bound: u64,
    /// Steps this coordinator reduced and broadcast whole.
    pub reduced: u64,
    /// `train.steps`: no claim short of proof may reach it.
    pub steps: u64,
    /// Replicas a member refused when they were sent to it: their
    /// holders are not believed again in this run.
    pub refused: Vec<Held>,
}

/// How a generation starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    /// The first step it trains.
    pub first_step: u64,
    /// Where that step reads the data, when the state is a replica.
    pub cursor: DataCursor,
    /// Each rank's source.
    pub sources: Vec<pb::Source>,
    /// The rank that sends its replica to the TRANSFER ranks.
    pub donor: Option<usize>,
    /// The checkpoint to load, when the source is CHECKPOINT.
    pub resume_from: Option<String>,
    /// Steps the run had completed that this generation trains again.
    pub retrained: u64,
    /// Whether the state it starts from is one the run provably reached:
    /// a state every rank agreed on, a checkpoint, or fresh weights (not a
    /// quorum's or a reduced step's replica).
    pub proven: bool,
}

impl Start {
    /// Whether the state comes from members' replicas.
    pub fn replicated(&self) -> bool {
        self.sources
            .iter()
            .any(|s| matches!(s, pb::Source::Keep | pb::Source::Transfer))
    }

    /// One word for logs and the membership record.
    pub fn describe(&self) -> &'static str {
        match (self.replicated(), self.donor, &self.resume_from) {
            (true, Some(_), _) => "replica (sent to new members)",
            (true, None, _) => "replica",
            (false, _, Some(_)) => "checkpoint",
            (false, _, None) => "fresh",
        }
    }
}

/// The plan for members presenting `claims` (indexed by rank), given `known`.
pub fn plan(claims: &[Claim], known: &Knowledge) -> Start {
    let proven = proven(claims, known);
    let reached = known
        .reached
        .max(proven.iter().map(|v| v.step).max().unwrap_or(0));
    let helds = match known.trust_replicas {
        true => credible(claims, known, &proven),
        false => vec![None; claims.len()],
    };
    match best_replica(&helds) {
        Some(best) if best.step >= known.fallback.first_step => {
            let sources: Vec<pb::Source> = helds
                .iter()
                .map(|h| match h {
                    Some(h) if *h == best => pb::Source::Keep,
                    _ => pb::Source::Transfer,
                })
                .collect();
            let donor = sources
                .contains(&pb::Source::Transfer)
                .then(|| sources.iter().position(|s| *s == pb::Source::Keep))
                .flatten();
            Start {
                first_step: best.step,
                cursor: best.cursor,
                sources,
                donor,
                resume_from: None,
                retrained: reached.saturating_sub(best.step),
                proven: proven.contains(&best.verified()),
            }
        }
        _ => {
            let fallback = &known.fallback;
            let source = match fallback.checkpoint {
                Some(_) => pb::Source::Checkpoint,
                None => pb::Source::Fresh,
            };
            Start {
                first_step: fallback.first_step,
                cursor: DataCursor::default(),
                sources: vec![source; claims.len()],
                donor: None,
                resume_from: fallback.checkpoint.clone(),
                retrained: reached.saturating_sub(fallback.first_step),
                proven: true,
            }
        }
    }
}

impl Held {
    fn verified(&self) -> Verified {
        Verified {
            step: self.step,
            checksum: self.checksum,
        }
    }
}

/// Every state the run provably reached that the coordinator knows of:
/// its own newest verified state and what the members' receipts prove.
fn proven(claims: &[Claim], known: &Knowledge) -> Vec<Verified> {
    let mut proven: Vec<Verified> = known
        .verified
        .into_iter()
        .chain(claims.iter().filter_map(|c| c.proof))
        .collect();
    proven.sort_by_key(|v| (v.step, v.checksum));
    proven.dedup();
    proven
}

/// The claims believed (the module's three rules), by rank; the rest are
/// treated as holding nothing.
fn credible(claims: &[Claim], known: &Knowledge, proven: &[Verified]) -> Vec<Option<Held>> {
    let newest_proven = proven.iter().map(|v| v.step).max();
    let beyond = |h: &Held| newest_proven.is_none_or(|p| h.step > p);
    let holders = |h: &Held| claims.iter().filter(|c| c.held == Some(*h)).count();
    let by_proof: Vec<Option<Held>> = claims
        .iter()
        .map(|c| c.held.filter(|h| proven.contains(&h.verified())))
        .collect();
    let holds_newest_proven = by_proof
        .iter()
        .flatten()
        .any(|h| Some(h.step) == newest_proven);
    claims
        .iter()
        .zip(&by_proof)
        .map(|(claim, by_proof)| {
            let h = claim.held.filter(|h| !known.refused.contains(h))?;
            let quorum = beyond(&h)
                && h.step <= known.bound
                && h.step < known.steps
                && 2 * holders(&h) > known.places;
            let reduced = beyond(&h) && h.step <= known.reduced && !holds_newest_proven;
            match by_proof.is_some() || quorum || reduced {
                true => Some(h),
                false => {
                    tracing::warn!(
                        step = h.step,
                        checksum = format_args!("{:016x}", h.checksum),
                        "a member claims a replica the coordinator has no evidence for: \
                         it is treated as holding none"
                    );
                    None
                }
            }
        })
        .collect()
}

/// The newest replica that enough members agree on: among the newest the
/// one most members hold wins; a tie between different replicas of the
/// same step trusts none of them.
fn best_replica(helds: &[Option<Held>]) -> Option<Held> {
    let newest = helds.iter().flatten().map(|h| h.step).max()?;
    let mut votes: Vec<(Held, usize)> = Vec::new();
    for h in helds.iter().flatten().filter(|h| h.step == newest) {
        match votes.iter_mut().find(|(v, _)| v == h) {
            Some((_, n)) => *n += 1,
            None => votes.push((*h, 1)),
        }
    }
    votes.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    match votes.as_slice() {
        [(only, _)] => Some(*only),
        [(first, a), (_, b), ..] if a > b => Some(*first),
        _ => {
            tracing::warn!(
                step = newest,
                replicas = votes.len(),
                "members hold different replicas of the same step and none has a majority: \
                 falling back to the newest checkpoint"
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(step: u64, checksum: u64) -> Option<Held> {
        Some(Held {
            step,
            checksum,
            cursor: DataCursor {
                epoch: 0,
                position: step * 8,
            },
        })
    }

    /// Claims without receipts.
    fn claims(helds: &[Option<Held>]) -> Vec<Claim> {
        helds
            .iter()
            .map(|&held| Claim { held, proof: None })
            .collect()
    }

    fn agreed(step: u64, checksum: u64) -> Option<Verified> {
        Some(Verified { step, checksum })
    }

    /// A coordinator that trained this run up to `reached` (steps reduced
    /// as far), the group having agreed on `verified`, of `places` places.
    fn known(checkpoint: Option<u64>, verified: Option<Verified>, places: usize) -> Knowledge {
        let reached = verified.map_or(checkpoint.unwrap_or(0), |v| v.step);
        Knowledge {
            fallback: StoredStart {
                first_step: checkpoint.unwrap_or(0),
                checkpoint: checkpoint.map(common::storage::checkpoint::name),
            },
            verified,
            reached,
            committed: checkpoint,
            trust_replicas: true,
            places,
            bound: reached,
            reduced: reached,
            steps: 50,
            refused: Vec::new(),
        }
    }

    /// A coordinator started again on a run an earlier one trained: it has
    /// seen nothing itself.
    fn restarted(checkpoint: Option<u64>, places: usize) -> Knowledge {
        Knowledge {
            bound: 50,
            reduced: 0,
            reached: checkpoint.unwrap_or(0),
            ..known(checkpoint, None, places)
        }
    }

    #[test]
    fn survivors_keep_their_replica_and_a_replacement_receives_it() {
        let k = known(Some(5), agreed(7, 1), 3);
        let plan = plan(&claims(&[held(7, 1), None, held(7, 1)]), &k);
        assert_eq!(plan.first_step, 7);
        assert_eq!(
            plan.sources,
            [pb::Source::Keep, pb::Source::Transfer, pb::Source::Keep]
        );
        assert_eq!((plan.donor, plan.retrained), (Some(0), 0));
        assert_eq!(plan.cursor.position, 56);
        assert!(plan.proven);
    }

    /// Killed mid-broadcast, one member applied the last step and the other
    /// did not: the proven state wins, the step in flight is trained again
    /// by both and nothing the group completed is lost.
    #[test]
    fn members_one_step_apart_continue_from_the_proven_state() {
        let mut k = known(None, agreed(6, 9), 2);
        k.reduced = 7;
        let plan = plan(&claims(&[held(6, 9), held(7, 1)]), &k);
        assert_eq!(plan.first_step, 6);
        assert_eq!(plan.sources, [pb::Source::Keep, pb::Source::Transfer]);
        assert_eq!((plan.donor, plan.retrained), (Some(0), 0));
    }

    /// A member that applied the last step this coordinator reduced, when
    /// nobody holds the state before it (its peer died before reporting),
    /// holds the group's state.
    #[test]
    fn a_lone_holder_of_the_last_reduced_step_is_believed() {
        let mut k = known(None, agreed(6, 9), 2);
        k.reduced = 7;
        let plan = plan(&claims(&[None, held(7, 1)]), &k);
        assert_eq!(
            (plan.first_step, plan.donor, plan.proven),
            (7, Some(1), false)
        );
        let beyond = self::plan(&claims(&[None, held(8, 1)]), &k);
        assert_eq!(beyond.first_step, 0, "step 8 was never reduced: {beyond:?}");
    }

    #[test]
    fn without_replicas_the_checkpoint_is_the_fallback_and_retrained_steps_are_counted() {
        let mut k = known(Some(4), None, 2);
        k.reached = 9;
        let plan = plan(&claims(&[None, None]), &k);
        assert_eq!(plan.first_step, 4);
        assert_eq!(plan.sources, [pb::Source::Checkpoint; 2]);
        assert_eq!(plan.resume_from.as_deref(), Some("step-000000004"));
        assert_eq!(plan.retrained, 5);
        assert_eq!(
            self::plan(&claims(&[None]), &known(None, None, 1)).sources,
            [pb::Source::Fresh]
        );
    }

    #[test]
    fn a_checkpoint_newer_than_every_replica_wins() {
        let k = known(Some(5), agreed(3, 1), 2);
        let plan = plan(&claims(&[held(3, 1), held(3, 1)]), &k);
        assert_eq!(plan.first_step, 5);
        assert_eq!(plan.sources, [pb::Source::Checkpoint; 2]);
    }

    /// A member claiming the verified step with another checksum is not
    /// believed, however new its claim.
    #[test]
    fn a_replica_contradicting_the_verified_state_is_ignored() {
        let k = known(None, agreed(7, 1), 2);
        let plan = plan(&claims(&[held(7, 666), held(7, 1)]), &k);
        assert_eq!(plan.sources, [pb::Source::Transfer, pb::Source::Keep]);
    }

    /// After a restart the coordinator knows only what receipts prove and
    /// what a majority agrees on.
    #[test]
    fn after_a_restart_receipts_and_a_majority_are_believed() {
        let k = restarted(Some(5), 3);
        let majority = plan(&claims(&[held(7, 2), held(7, 1), held(7, 1)]), &k);
        assert_eq!(majority.sources[0], pb::Source::Transfer);
        assert_eq!((majority.first_step, majority.proven), (7, false));
        let tie = plan(&claims(&[held(7, 2), held(7, 1)]), &restarted(Some(5), 2));
        assert_eq!(tie.first_step, 5);
        assert_eq!(tie.sources, [pb::Source::Checkpoint; 2]);
        // One member applied step 8, the other did not; the receipt for
        // step 7 reached both before the reduced gradient of step 8.
        let mut apart = claims(&[held(7, 1), held(8, 3)]);
        apart[1].proof = agreed(7, 1);
        let apart = plan(&apart, &restarted(Some(5), 2));
        assert_eq!((apart.first_step, apart.retrained), (7, 0));
        assert_eq!(apart.sources, [pb::Source::Keep, pb::Source::Transfer]);
        assert!(apart.proven);
    }

    /// Probe 1 of the issue: a token holder claims the run's last step on
    /// an empty store; the honest member holds nothing.
    #[test]
    fn a_lone_claim_is_never_believed_and_members_alone_never_end_a_run() {
        let fresh = known(None, None, 2);
        let plan = plan(&claims(&[None, held(50, 1)]), &fresh);
        assert_eq!(
            (plan.first_step, plan.sources.clone()),
            (0, vec![pb::Source::Fresh; 2])
        );
        assert_eq!(plan.retrained, 0, "a claim is no step the run reached");
        // Mid-run, the same claim through a regroup after a lost member.
        let mid = known(None, agreed(10, 4), 2);
        let plan = self::plan(&claims(&[held(10, 4), held(3000, 1)]), &mid);
        assert_eq!((plan.first_step, plan.retrained), (10, 0));
        assert_eq!(plan.sources, [pb::Source::Keep, pb::Source::Transfer]);
        // After a restart a majority may add steps, but never the last one.
        let end = self::plan(&claims(&[held(50, 1), held(50, 1)]), &restarted(None, 2));
        assert_eq!(end.first_step, 0, "{end:?}");
        // A forged receipt is no proof: the rendezvous drops it before the
        // plan; a real one proves the end.
        let mut proven = claims(&[held(50, 1), None]);
        proven[0].proof = agreed(50, 1);
        let proven = self::plan(&proven, &restarted(None, 2));
        assert_eq!((proven.first_step, proven.proven), (50, true));
    }

    /// A replica a member refused (malformed, or not what its sender
    /// claimed) is not sent again: the group falls back.
    #[test]
    fn a_refused_replica_is_not_believed_again() {
        let mut k = known(Some(5), agreed(7, 1), 2);
        k.refused = vec![held(7, 1).unwrap()];
        let plan = plan(&claims(&[held(7, 1), None]), &k);
        assert_eq!(plan.sources, [pb::Source::Checkpoint; 2]);
    }

    #[test]
    fn untrusted_replicas_are_not_used() {
        let mut k = known(Some(5), agreed(7, 1), 2);
        k.trust_replicas = false;
        let plan = plan(&claims(&[held(7, 1), held(7, 1)]), &k);
        assert_eq!((plan.first_step, plan.retrained), (5, 2));
        assert_eq!(plan.describe(), "checkpoint");
    }
}
