//! The checkpoint layout and its invariants, on top of a [`Store`].
//!
//! ```text
//! <run>/checkpoints/step-NNNNNNNNN/<objects…>   written first, any order
//! <run>/checkpoints/step-NNNNNNNNN/manifest.json  written last: size + sha256 of each
//! <run>/latest                                   updated only after the manifest
//! ```
//!
//! A checkpoint without a manifest that verifies does not exist: readers
//! check every object's size and hash against it and skip (loudly) to the
//! previous checkpoint when one is damaged. What the objects mean is the
//! worker's business; this module only moves and verifies bytes, so the
//! coordinator can pick and commit checkpoints without knowing about tensors.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::sampling::shard::DataCursor;
use crate::storage::store::{Store, StoreError};

/// Written last; lists every other object with its size and hash.
pub const MANIFEST: &str = "manifest.json";
/// The [`TrainingState`] of the checkpoint, as JSON.
pub const STATE: &str = "state.json";
/// Names the newest committed checkpoint of a run.
pub const LATEST: &str = "latest";

/// `step-NNNNNNNNN`: zero-padded so names sort in step order.
pub fn name(step: u64) -> String {
    format!("step-{step:09}")
}

/// Parses a [`name`] back to its step.
pub fn parse_name(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?.parse().ok()
}

/// One object of a checkpoint, as the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// Object name inside the checkpoint folder.
    pub name: String,
    /// Bytes.
    pub size: u64,
    /// Lower-case hex SHA-256 of the bytes.
    pub sha256: String,
}

/// The list of a checkpoint's objects; its presence makes the checkpoint real.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Steps completed when the checkpoint was taken.
    pub step: u64,
    /// Every object but the manifest itself.
    pub objects: Vec<ManifestEntry>,
}

/// Where training stands at a checkpoint: enough, with the seed, to
/// continue bit for bit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingState {
    /// Steps completed; a resumed run starts at this step.
    pub step: u64,
    /// Where the next step reads the data.
    pub cursor: DataCursor,
    /// Workers that trained up to here.
    pub world: usize,
    /// [`crate::Config::training_hash`] of the run that wrote it.
    pub config_hash: String,
    /// [`crate::Config::resume_identity`] of the run that wrote it.
    pub identity: BTreeMap<String, String>,
    /// Rank 0's discriminator loss at the last step (NaN when unknown or
    /// not finite).
    #[serde(with = "loss")]
    pub d_loss: f32,
    /// Rank 0's generator loss at the last step (NaN likewise).
    #[serde(with = "loss")]
    pub g_loss: f32,
    /// Sliced Wasserstein distance to held-out images, when measured.
    pub swd: Option<f64>,
}

/// A loss as JSON, which has no NaN or infinity: those are `null`, read
/// back as NaN, so a checkpoint of a step whose loss was not finite (or of
/// a state no step produced) still loads.
mod loss {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &f32, s: S) -> Result<S::Ok, S::Error> {
        match value.is_finite() {
            true => s.serialize_f32(*value),
            false => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
        Ok(Option::<f32>::deserialize(d)?.unwrap_or(f32::NAN))
    }
}

/// Why a checkpoint cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No readable manifest: the checkpoint was never completed.
    #[error(
        "checkpoint {checkpoint}: no valid {MANIFEST} ({reason}); it was never completed or is damaged"
    )]
    Manifest {
        /// Checkpoint name.
        checkpoint: String,
        /// What went wrong reading it.
        reason: String,
    },
    /// An object does not match the manifest.
    #[error(
        "checkpoint {checkpoint}: object {object} is damaged: expected {expected_size} bytes with \
         sha256 {expected}, found {actual_size} bytes with sha256 {actual}"
    )]
    Corrupt {
        /// Checkpoint name.
        checkpoint: String,
        /// Object name.
        object: String,
        /// Hash in the manifest.
        expected: String,
        /// Hash of the stored bytes.
        actual: String,
        /// Size in the manifest.
        expected_size: u64,
        /// Size of the stored bytes.
        actual_size: u64,
    },
    /// The manifest does not list an object the reader needs.
    #[error(
        "checkpoint {checkpoint} has no object {object}; it was written by an incompatible version"
    )]
    Missing {
        /// Checkpoint name.
        checkpoint: String,
        /// Object name.
        object: String,
    },
    /// The manifest lists an object the store does not have.
    #[error(
        "checkpoint {checkpoint}: object {object} is listed in its manifest but not in the store"
    )]
    Absent {
        /// Checkpoint name.
        checkpoint: String,
        /// Object name.
        object: String,
    },
    /// `state.json` is unreadable.
    #[error("checkpoint {checkpoint}: {STATE} is unreadable: {reason}")]
    State {
        /// Checkpoint name.
        checkpoint: String,
        /// The parse error.
        reason: String,
    },
}

impl CheckpointError {
    /// Whether the checkpoint is verifiably not in the store (as opposed to
    /// the store not answering).
    pub fn is_absent(&self) -> bool {
        match self {
            Self::Store(e) => {
                e.is_not_found() || e.failure() == Some(crate::storage::store::Failure::NoBucket)
            }
            Self::Manifest { .. } | Self::Absent { .. } | Self::Corrupt { .. } => true,
            _ => false,
        }
    }
}

/// A verified checkpoint: every object matched its manifest entry.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The manifest it was verified against.
    pub manifest: Manifest,
    objects: HashMap<String, Bytes>,
}

impl Checkpoint {
    /// The checkpoint's name, `step-NNNNNNNNN`.
    pub fn name(&self) -> String {
        name(self.manifest.step)
    }

    /// The bytes of object `object`.
    pub fn object(&self, object: &str) -> Result<&Bytes, CheckpointError> {
        self.objects
            .get(object)
            .ok_or_else(|| CheckpointError::Missing {
                checkpoint: self.name(),
                object: object.to_string(),
            })
    }

    /// The parsed [`STATE`] object.
    pub fn state(&self) -> Result<TrainingState, CheckpointError> {
        serde_json::from_slice(self.object(STATE)?).map_err(|e| CheckpointError::State {
            checkpoint: self.name(),
            reason: e.to_string(),
        })
    }
}

/// One run's checkpoints in a store.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    store: Store,
    run: String,
}

impl Checkpoints {
    /// The checkpoints of run `run` in `store`.
    pub fn new(store: Store, run: &str) -> Self {
        Self {
            store,
            run: run.to_string(),
        }
    }

    /// The store they live in.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Uploads `objects` as checkpoint `step`, then its manifest. Only after
    /// this returns may the checkpoint be committed with [`Checkpoints::commit`].
    pub async fn write(
        &self,
        step: u64,
        objects: Vec<(String, Bytes)>,
    ) -> Result<Manifest, CheckpointError> {
        let folder = self.folder(step);
        let mut entries = Vec::with_capacity(objects.len());
        for (object, data) in objects {
            let digest = hash(data.clone()).await;
            entries.push(ManifestEntry {
                name: object.clone(),
                size: data.len() as u64,
                sha256: digest,
            });
            self.store.put(&format!("{folder}/{object}"), data).await?;
        }
        let manifest = Manifest {
            step,
            objects: entries,
        };
        let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serialises");
        self.store
            .put(&format!("{folder}/{MANIFEST}"), json.into())
            .await?;
        Ok(manifest)
    }

    /// Checks, without downloading it, that checkpoint `step` is complete:
    /// its manifest is there and every object it lists has the listed size.
    /// The coordinator does this before it moves `latest` on rank 0's word.
    pub async fn confirm(&self, step: u64) -> Result<(), CheckpointError> {
        let folder = self.folder(step);
        for entry in self.manifest(step).await?.objects {
            let size = match self.store.size(&format!("{folder}/{}", entry.name)).await {
                Ok(size) => size,
                Err(e) if e.is_not_found() => {
                    return Err(CheckpointError::Absent {
                        checkpoint: name(step),
                        object: entry.name,
                    });
                }
                Err(e) => return Err(e.into()),
            };
            if size != entry.size {
                return Err(CheckpointError::Corrupt {
                    checkpoint: name(step),
                    object: entry.name,
                    expected: entry.sha256,
                    actual: "(not read)".into(),
                    expected_size: entry.size,
                    actual_size: size,
                });
            }
        }
        Ok(())
    }

    /// The [`TrainingState`] of checkpoint `step`, verified against its
    /// manifest, without downloading the rest.
    pub async fn read_state(&self, step: u64) -> Result<TrainingState, CheckpointError> {
        let manifest = self.manifest(step).await?;
        let entry = manifest
            .objects
            .iter()
            .find(|e| e.name == STATE)
            .ok_or_else(|| CheckpointError::Missing {
                checkpoint: name(step),
                object: STATE.into(),
            })?;
        let data = self
            .store
            .get(&format!("{}/{STATE}", self.folder(step)))
            .await?;
        let actual = hash(data.clone()).await;
        if actual != entry.sha256 || data.len() as u64 != entry.size {
            return Err(CheckpointError::Corrupt {
                checkpoint: name(step),
                object: STATE.into(),
                expected: entry.sha256.clone(),
                actual,
                expected_size: entry.size,
                actual_size: data.len() as u64,
            });
        }
        serde_json::from_slice(&data).map_err(|e| CheckpointError::State {
            checkpoint: name(step),
            reason: e.to_string(),
        })
    }

    /// The manifest of checkpoint `step`, which must describe that step.
    async fn manifest(&self, step: u64) -> Result<Manifest, CheckpointError> {
        let checkpoint = name(step);
        let invalid = |reason: String| CheckpointError::Manifest {
            checkpoint: checkpoint.clone(),
            reason,
        };
        let raw = match self
            .store
            .get(&format!("{}/{MANIFEST}", self.folder(step)))
            .await
        {
            Ok(raw) => raw,
            Err(e) if e.is_not_found() => return Err(invalid("missing".into())),
            Err(e) => return Err(e.into()),
        };
        let manifest: Manifest =
            serde_json::from_slice(&raw).map_err(|e| invalid(e.to_string()))?;
        if manifest.step != step {
            return Err(invalid(format!("it describes step {}", manifest.step)));
        }
        Ok(manifest)
    }

    /// Points `latest` at checkpoint `step` and deletes all but the newest
    /// `keep` checkpoints up to it. Returns the deleted steps.
    pub async fn commit(&self, step: u64, keep: usize) -> Result<Vec<u64>, CheckpointError> {
        self.store
            .put(&format!("{}/{LATEST}", self.run), name(step).into())
            .await?;
        let older: Vec<u64> = self
            .steps()
            .await?
            .into_iter()
            .filter(|s| *s <= step)
            .collect();
        let doomed = older[..older.len().saturating_sub(keep)].to_vec();
        for old in &doomed {
            self.store.delete_all(&self.folder(*old)).await?;
        }
        Ok(doomed)
    }

    /// The checkpoint `latest` names, if any.
    pub async fn latest(&self) -> Result<Option<String>, CheckpointError> {
        match self.store.get(&format!("{}/{LATEST}", self.run)).await {
            Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).trim().to_string())),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Steps of every checkpoint folder, complete or not, oldest first.
    pub async fn steps(&self) -> Result<Vec<u64>, CheckpointError> {
        let mut steps: Vec<u64> = self
            .store
            .folders(&format!("{}/checkpoints", self.run))
            .await?
            .iter()
            .filter_map(|folder| parse_name(folder))
            .collect();
        steps.sort_unstable();
        Ok(steps)
    }

    /// Reads checkpoint `step` and verifies every object against its manifest.
    pub async fn load(&self, step: u64) -> Result<Checkpoint, CheckpointError> {
        let (folder, checkpoint) = (self.folder(step), name(step));
        let manifest = self.manifest(step).await?;
        let mut objects = HashMap::with_capacity(manifest.objects.len());
        for entry in &manifest.objects {
            let data = self.store.get(&format!("{folder}/{}", entry.name)).await?;
            let actual = hash(data.clone()).await;
            if actual != entry.sha256 || data.len() as u64 != entry.size {
                return Err(CheckpointError::Corrupt {
                    checkpoint,
                    object: entry.name.clone(),
                    expected: entry.sha256.clone(),
                    actual,
                    expected_size: entry.size,
                    actual_size: data.len() as u64,
                });
            }
            objects.insert(entry.name.clone(), data);
        }
        Ok(Checkpoint { manifest, objects })
    }

    /// The newest checkpoint that verifies, plus the reasons each newer one
    /// was rejected (so the caller can report them).
    pub async fn newest_valid(
        &self,
    ) -> Result<(Option<Checkpoint>, Vec<CheckpointError>), CheckpointError> {
        let mut rejected = Vec::new();
        for step in self.steps().await?.into_iter().rev() {
            match self.load(step).await {
                Ok(checkpoint) => return Ok((Some(checkpoint), rejected)),
                Err(CheckpointError::Store(e)) if !e.is_not_found() => return Err(e.into()),
                Err(e) => rejected.push(e),
            }
        }
        Ok((None, rejected))
    }

    /// Deletes checkpoint `step`.
    pub async fn remove(&self, step: u64) -> Result<(), CheckpointError> {
        self.store.delete_all(&self.folder(step)).await?;
        Ok(())
    }

    /// Deletes every checkpoint of the run and its `latest` pointer.
    pub async fn remove_all(&self) -> Result<(), CheckpointError> {
        self.store.delete_all(&self.run).await?;
        Ok(())
    }

    /// Where checkpoint `step` lives, for messages.
    pub fn location(&self, step: u64) -> String {
        format!("{}/{}", self.store, self.folder(step))
    }

    fn folder(&self, step: u64) -> String {
        format!("{}/checkpoints/{}", self.run, name(step))
    }
}

/// SHA-256 as lower-case hex, off the async reactor (75 MB takes a while).
async fn hash(data: Bytes) -> String {
    tokio::task::spawn_blocking(move || hex::encode(Sha256::digest(&data)))
        .await
        .expect("hashing does not panic")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CheckpointConfig;

    fn checkpoints() -> Checkpoints {
        let cfg = CheckpointConfig {
            store: "memory://".into(),
            ..CheckpointConfig::default()
        };
        Checkpoints::new(Store::open(&cfg).unwrap(), "run")
    }

    fn objects(tag: &str) -> Vec<(String, Bytes)> {
        vec![
            ("a.bin".into(), Bytes::from(format!("alpha {tag}"))),
            ("b.bin".into(), Bytes::from(vec![7u8; 1000])),
        ]
    }

    /// JSON has no NaN: a state whose losses are not finite still round-trips.
    #[test]
    fn a_state_with_non_finite_losses_round_trips() {
        let state = TrainingState {
            step: 3,
            cursor: DataCursor::default(),
            world: 2,
            config_hash: "h".into(),
            identity: BTreeMap::new(),
            d_loss: f32::NAN,
            g_loss: 0.5,
            swd: None,
        };
        let json = serde_json::to_string(&state).unwrap();
        assert!(json.contains("\"d_loss\":null"), "{json}");
        let back: TrainingState = serde_json::from_str(&json).unwrap();
        assert!(back.d_loss.is_nan());
        assert_eq!((back.g_loss, back.step), (0.5, 3));
    }

    #[tokio::test]
    async fn written_checkpoints_verify_and_commit_moves_latest() {
        let c = checkpoints();
        c.write(4, objects("4")).await.unwrap();
        assert_eq!(c.latest().await.unwrap(), None, "not committed yet");
        c.commit(4, 3).await.unwrap();
        assert_eq!(c.latest().await.unwrap().as_deref(), Some("step-000000004"));
        let loaded = c.load(4).await.unwrap();
        assert_eq!(loaded.object("a.bin").unwrap().as_ref(), b"alpha 4");
        assert!(matches!(
            loaded.object("nope").unwrap_err(),
            CheckpointError::Missing { .. }
        ));
    }

    #[tokio::test]
    async fn a_checkpoint_without_manifest_does_not_exist() {
        let c = checkpoints();
        c.write(2, objects("2")).await.unwrap();
        c.store
            .put(
                "run/checkpoints/step-000000006/a.bin",
                Bytes::from_static(b"half"),
            )
            .await
            .unwrap();
        let (found, rejected) = c.newest_valid().await.unwrap();
        assert_eq!(found.unwrap().manifest.step, 2);
        assert!(
            rejected[0]
                .to_string()
                .contains("step-000000006: no valid manifest.json")
        );
    }

    #[tokio::test]
    async fn a_damaged_object_names_itself_and_the_older_checkpoint_is_used() {
        let c = checkpoints();
        c.write(2, objects("2")).await.unwrap();
        c.write(4, objects("4")).await.unwrap();
        let mut damaged = vec![7u8; 1000];
        damaged[500] ^= 1;
        c.store
            .put("run/checkpoints/step-000000004/b.bin", damaged.into())
            .await
            .unwrap();
        let (found, rejected) = c.newest_valid().await.unwrap();
        assert_eq!(found.unwrap().manifest.step, 2);
        let text = rejected[0].to_string();
        assert!(
            text.contains("step-000000004") && text.contains("b.bin") && text.contains("expected"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn retention_keeps_the_newest() {
        let c = checkpoints();
        for step in [1, 2, 3, 4] {
            c.write(step, objects("x")).await.unwrap();
            c.commit(step, 2).await.unwrap();
        }
        assert_eq!(c.steps().await.unwrap(), [3, 4]);
        c.remove_all().await.unwrap();
        assert!(c.steps().await.unwrap().is_empty());
        assert_eq!(c.latest().await.unwrap(), None);
    }
}
