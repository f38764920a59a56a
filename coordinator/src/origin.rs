//! Where a generation's state comes from: the replicas its members hold,
//! or, when none can be trusted, a checkpoint (or fresh weights).
//!
//! Survivors of a lost member hold identical replicas (every completed step
//! is checked by its parameter checksum), so a re-formed group continues
//! from them and loses no step: members that hold the newest replica keep
//! it, the others receive it from one of them. The rules are a pure
//! function of what the members say they hold and what the coordinator
//! itself has seen, so they are tested here without a network.

use common::{DataCursor, pb};

use crate::resume::StartPoint;

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

/// What the coordinator knows when a generation forms, besides its members.
#[derive(Debug, Clone, Default)]
pub struct Knowledge {
    /// Where the run would start without replicas (the newest checkpoint,
    /// or fresh weights).
    pub fallback: StartPoint,
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
}

/// How a generation starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
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
}

impl Plan {
    /// Whether the state comes from members' replicas.
    pub fn from_replicas(&self) -> bool {
        self.sources
            .iter()
            .any(|s| matches!(s, pb::Source::Keep | pb::Source::Transfer))
    }

    /// One word for logs and the membership record.
    pub fn describe(&self) -> &'static str {
        match (self.from_replicas(), self.donor, &self.resume_from) {
            (true, Some(_), _) => "replica (sent to new members)",
            (true, None, _) => "replica",
            (false, _, Some(_)) => "checkpoint",
            (false, _, None) => "fresh",
        }
    }
}

/// The plan for members holding `helds` (indexed by rank), given `known`.
pub fn plan(helds: &[Option<Held>], known: &Knowledge) -> Plan {
    let newest = helds.iter().flatten().map(|h| h.step).max().unwrap_or(0);
    let reached = known.reached.max(newest);
    let best = known
        .trust_replicas
        .then(|| best_replica(helds, known.verified))
        .flatten();
    match best {
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
            Plan {
                first_step: best.step,
                cursor: best.cursor,
                sources,
                donor,
                resume_from: None,
                retrained: reached.saturating_sub(best.step),
            }
        }
        _ => {
            let fallback = &known.fallback;
            let source = match fallback.checkpoint {
                Some(_) => pb::Source::Checkpoint,
                None => pb::Source::Fresh,
            };
            Plan {
                first_step: fallback.first_step,
                cursor: DataCursor::default(),
                sources: vec![source; helds.len()],
                donor: None,
                resume_from: fallback.checkpoint.clone(),
                retrained: reached.saturating_sub(fallback.first_step),
            }
        }
    }
}

/// The newest replica that enough members agree on: replicas contradicting
/// what the coordinator verified are ignored, and among the newest the one
/// most members hold wins; a tie between different replicas of the same
/// step trusts none of them.
fn best_replica(helds: &[Option<Held>], verified: Option<Verified>) -> Option<Held> {
    let credible: Vec<Held> = helds
        .iter()
        .flatten()
        .copied()
        .filter(|h| verified.is_none_or(|v| v.step != h.step || v.checksum == h.checksum))
        .collect();
    let newest = credible.iter().map(|h| h.step).max()?;
    let mut votes: Vec<(Held, usize)> = Vec::new();
    for h in credible.iter().filter(|h| h.step == newest) {
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

    fn known(checkpoint: Option<u64>) -> Knowledge {
        Knowledge {
            fallback: StartPoint {
                first_step: checkpoint.unwrap_or(0),
                checkpoint: checkpoint.map(common::checkpoint::name),
            },
            verified: None,
            reached: 0,
            committed: checkpoint,
            trust_replicas: true,
        }
    }

    #[test]
    fn survivors_keep_their_replica_and_a_replacement_receives_it() {
        let plan = plan(&[held(7, 1), None, held(7, 1)], &known(Some(5)));
        assert_eq!(plan.first_step, 7);
        assert_eq!(
            plan.sources,
            [pb::Source::Keep, pb::Source::Transfer, pb::Source::Keep]
        );
        assert_eq!((plan.donor, plan.retrained), (Some(0), 0));
        assert_eq!(plan.cursor.position, 56);
    }

    /// A member that saw the last reduce of a step before the regroup holds
    /// one step more than one that did not: the newer one is complete.
    #[test]
    fn the_newest_replica_wins_and_older_ones_are_replaced() {
        let plan = plan(&[held(6, 9), held(7, 1)], &known(None));
        assert_eq!(plan.first_step, 7);
        assert_eq!(plan.sources, [pb::Source::Transfer, pb::Source::Keep]);
        assert_eq!(plan.donor, Some(1));
    }

    #[test]
    fn without_replicas_the_checkpoint_is_the_fallback_and_retrained_steps_are_counted() {
        let mut k = known(Some(4));
        k.reached = 9;
        let plan = plan(&[None, None], &k);
        assert_eq!(plan.first_step, 4);
        assert_eq!(plan.sources, [pb::Source::Checkpoint; 2]);
        assert_eq!(plan.resume_from.as_deref(), Some("step-000000004"));
        assert_eq!(plan.retrained, 5);
        assert_eq!(
            self::plan(&[None], &known(None)).sources,
            [pb::Source::Fresh]
        );
    }

    #[test]
    fn a_checkpoint_newer_than_every_replica_wins() {
        let plan = plan(&[held(3, 1), held(3, 1)], &known(Some(5)));
        assert_eq!(plan.first_step, 5);
        assert_eq!(plan.sources, [pb::Source::Checkpoint; 2]);
    }

    /// A member claiming the verified step with another checksum is not
    /// believed, however new its claim.
    #[test]
    fn a_replica_contradicting_the_verified_state_is_ignored() {
        let mut k = known(None);
        k.verified = Some(Verified {
            step: 7,
            checksum: 1,
        });
        let plan = plan(&[held(7, 666), held(7, 1)], &k);
        assert_eq!(plan.sources, [pb::Source::Transfer, pb::Source::Keep]);
    }

    #[test]
    fn the_majority_replica_wins_and_a_tie_trusts_none() {
        let plan = plan(&[held(7, 2), held(7, 1), held(7, 1)], &known(Some(5)));
        assert_eq!(plan.sources[0], pb::Source::Transfer);
        assert_eq!(plan.first_step, 7);
        let tie = self::plan(&[held(7, 2), held(7, 1)], &known(Some(5)));
        assert_eq!(tie.first_step, 5);
        assert_eq!(tie.sources, [pb::Source::Checkpoint; 2]);
    }

    #[test]
    fn untrusted_replicas_are_not_used() {
        let mut k = known(Some(5));
        k.trust_replicas = false;
        let plan = plan(&[held(7, 1), held(7, 1)], &k);
        assert_eq!((plan.first_step, plan.retrained), (5, 2));
        assert_eq!(plan.describe(), "checkpoint");
    }
}
