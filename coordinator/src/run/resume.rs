//! Where a run starts: fresh, or from the newest checkpoint that verifies.
//!
//! The coordinator keeps no state of its own: everything it needs to
//! continue a run is in the store. It verifies the checkpoint (every
//! object against the manifest), checks that it belongs to the same
//! training (model, optimiser, seed, batch, data) and tells the workers
//! which checkpoint to load and which step comes next.

use common::Config;
use common::storage::checkpoint::{self, Checkpoint, CheckpointError, Checkpoints};
use common::storage::store::Store;
use tracing::{info, warn};

use crate::CoordinatorError;
use crate::generation::origin::StoredStart;

/// How the operator wants an existing run treated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ResumePolicy {
    /// Resume from the newest valid checkpoint if there is one, else start fresh.
    #[default]
    Latest,
    /// Resume from this checkpoint (`step-N`, or just `N`).
    From(String),
    /// Start fresh; refuse if the run has checkpoints unless `force`, which deletes them.
    Fresh {
        /// Delete existing checkpoints of the run.
        force: bool,
    },
}

/// Opens the run's checkpoints, proves the store is reachable with the
/// configured credentials, and decides where training starts.
pub async fn from_store(
    cfg: &Config,
    policy: &ResumePolicy,
    world: usize,
) -> Result<(Checkpoints, StoredStart), CoordinatorError> {
    let store = Store::open(&cfg.checkpoint).map_err(CheckpointError::from)?;
    store.check().await.map_err(CheckpointError::from)?;
    let run = &cfg.checkpoint.run;
    let checkpoints = Checkpoints::new(store, run);
    let fresh = StoredStart {
        first_step: 0,
        checkpoint: None,
    };
    let chosen: Option<Checkpoint> = match policy {
        ResumePolicy::Fresh { force } => {
            let existing = checkpoints.steps().await?;
            if !existing.is_empty() {
                if !force {
                    return Err(CoordinatorError::RunExists {
                        run: run.clone(),
                        store: checkpoints.store().to_string(),
                        checkpoints: existing.len(),
                    });
                }
                warn!(%run, checkpoints = existing.len(), "--fresh --force: deleting the run's checkpoints");
                checkpoints.remove_all().await?;
            }
            None
        }
        ResumePolicy::From(name) => {
            let step = parse_step(name).ok_or_else(|| CoordinatorError::ResumeFrom {
                name: name.clone(),
                reason: "expected step-N or N".into(),
            })?;
            let loaded =
                checkpoints
                    .load(step)
                    .await
                    .map_err(|e| CoordinatorError::ResumeFrom {
                        name: name.clone(),
                        reason: e.to_string(),
                    })?;
            Some(loaded)
        }
        ResumePolicy::Latest => {
            let (found, rejected) = checkpoints.newest_valid().await?;
            for reason in &rejected {
                warn!(%reason, "skipping a checkpoint that does not verify");
            }
            found
        }
    };
    let Some(chosen) = chosen else {
        info!(%run, store = %checkpoints.store(), "starting a fresh run");
        return Ok((checkpoints, fresh));
    };
    let state = chosen.state()?;
    let differences = differences(&state.identity, &cfg.resume_identity());
    if !differences.is_empty() {
        return Err(CoordinatorError::DifferentRun {
            checkpoint: checkpoints.location(state.step),
            differences: differences.join("; "),
        });
    }
    if state.step >= cfg.train.steps {
        return Err(CoordinatorError::AlreadyDone {
            checkpoint: chosen.name(),
            step: state.step,
            steps: cfg.train.steps,
        });
    }
    // Newer checkpoints are damaged or belong to a branch the operator
    // abandoned with --resume-from; left in place, a later resume could pick
    // them over the checkpoints this run is about to write.
    for newer in checkpoints.steps().await? {
        if newer > state.step {
            warn!(checkpoint = %checkpoints.location(newer), "deleting a checkpoint newer than the one resumed from");
            checkpoints.remove(newer).await?;
        }
    }
    if state.world != world {
        info!(
            checkpoint_workers = state.world,
            workers = world,
            epoch = state.cursor.epoch,
            position = state.cursor.position,
            "resuming with a different worker count: the rest of the epoch is re-sharded from the data cursor"
        );
    }
    info!(checkpoint = %checkpoints.location(state.step), step = state.step, "resuming");
    Ok((
        checkpoints,
        StoredStart {
            first_step: state.step,
            checkpoint: Some(chosen.name()),
        },
    ))
}

fn parse_step(name: &str) -> Option<u64> {
    checkpoint::parse_name(name).or_else(|| name.parse().ok())
}

/// `key: checkpoint X, now Y` for every setting that differs.
fn differences(
    saved: &std::collections::BTreeMap<String, String>,
    now: &std::collections::BTreeMap<String, String>,
) -> Vec<String> {
    now.iter()
        .filter_map(|(key, value)| {
            let before = saved.get(key).map_or("(unset)", String::as_str);
            (before != value)
                .then(|| format!("{key}: checkpoint has {before}, this run has {value}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use common::storage::checkpoint::{STATE, TrainingState};

    fn cfg(store: &str) -> Config {
        Config::load_with_env(
            None,
            &[
                ("checkpoint.store", store.into()),
                ("train.steps", "10".into()),
            ],
            Some(Default::default()),
        )
        .unwrap()
    }

    async fn save(checkpoints: &Checkpoints, cfg: &Config, step: u64) {
        let state = TrainingState {
            step,
            cursor: Default::default(),
            world: 2,
            config_hash: cfg.training_hash(),
            identity: cfg.resume_identity(),
            d_loss: 1.0,
            g_loss: 1.0,
            swd: None,
        };
        let json = Bytes::from(serde_json::to_vec(&state).unwrap());
        checkpoints
            .write(step, vec![(STATE.into(), json)])
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn resumes_from_the_newest_and_refuses_fresh_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg(&format!("file://{}", dir.path().display()));
        let (checkpoints, start) = from_store(&cfg, &ResumePolicy::Latest, 2).await.unwrap();
        assert_eq!(
            start,
            StoredStart {
                first_step: 0,
                checkpoint: None
            }
        );
        save(&checkpoints, &cfg, 3).await;
        save(&checkpoints, &cfg, 6).await;
        let (_, start) = from_store(&cfg, &ResumePolicy::Latest, 3).await.unwrap();
        assert_eq!(start.checkpoint.as_deref(), Some("step-000000006"));
        let (_, start) = from_store(&cfg, &ResumePolicy::From("3".into()), 2)
            .await
            .unwrap();
        assert_eq!(start.first_step, 3);
        assert_eq!(
            checkpoints.steps().await.unwrap(),
            [3],
            "the abandoned step 6 is gone"
        );
        let err = from_store(&cfg, &ResumePolicy::Fresh { force: false }, 2)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
        let (_, start) = from_store(&cfg, &ResumePolicy::Fresh { force: true }, 2)
            .await
            .unwrap();
        assert_eq!(start.checkpoint, None);
        assert!(checkpoints.steps().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_checkpoint_of_another_training_is_refused_naming_the_keys() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().display());
        let (checkpoints, _) = from_store(&cfg(&url), &ResumePolicy::Latest, 1)
            .await
            .unwrap();
        save(&checkpoints, &cfg(&url), 2).await;
        let mut other = cfg(&url);
        other.train.lr = 1e-3;
        let err = from_store(&other, &ResumePolicy::Latest, 1)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("train.lr: checkpoint has 0.0002, this run has 0.001"),
            "{err}"
        );
    }
}
