//! Receipts: the coordinator's proof, carried by the members, that every
//! rank agreed on a replica.
//!
//! A member's claim to hold the state after step s is only a claim. When
//! every rank reports the same checksum after a step, the coordinator
//! hands each member a receipt for (step, checksum): an HMAC-SHA256 tag
//! under the run's receipt key, which lives in the run's store and never
//! travels. The receipt reaches each member before the reduced gradient of
//! the next step (both go down its one ordered stream), so whenever a
//! member is ahead of a receipt, every member already holds it. A
//! coordinator started again under the same members reads the key back
//! and so can check, with no store write per step, what the group had
//! agreed on before it died.

use bytes::Bytes;
use common::protocol::pb;
use common::storage::checkpoint::Checkpoints;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tracing::info;

use crate::CoordinatorError;
use crate::generation::origin::Verified;

/// Where a run keeps its receipt key, under its prefix.
const KEY_OBJECT: &str = "receipt-key";

/// Bytes of a receipt key.
const KEY_BYTES: usize = 32;

/// What a tag covers, besides the run, step and checksum: a tag for
/// anything else must never verify as a receipt.
const DOMAIN: &[u8] = b"gancluster receipt v1";

/// The run's receipt key and what it says about the run's past.
pub struct Receipts {
    key: [u8; KEY_BYTES],
    run: String,
    predecessor: bool,
}

/// Never shows the key.
impl std::fmt::Debug for Receipts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receipts")
            .field("run", &self.run)
            .field("predecessor", &self.predecessor)
            .finish_non_exhaustive()
    }
}

impl Receipts {
    /// The key of `checkpoints`' run: kept when `keep` (the run goes on
    /// where it left off) and one is in the store, else a new one, written
    /// before any member can be given a receipt.
    pub async fn open(
        checkpoints: &Checkpoints,
        run: &str,
        keep: bool,
    ) -> Result<Self, CoordinatorError> {
        let object = format!("{run}/{KEY_OBJECT}");
        let store = checkpoints.store();
        if keep {
            match store.get(&object).await {
                Ok(bytes) if bytes.len() == KEY_BYTES => {
                    let mut key = [0; KEY_BYTES];
                    key.copy_from_slice(&bytes);
                    return Ok(Self {
                        key,
                        run: run.to_string(),
                        predecessor: true,
                    });
                }
                Ok(bytes) => {
                    return Err(CoordinatorError::ReceiptKey(format!(
                        "{store}/{object} holds {} bytes, not a {KEY_BYTES}-byte key: it was \
                         damaged or written by something else; delete it to start the run's \
                         receipts afresh (members' replicas are then believed only from this \
                         coordinator's own history)",
                        bytes.len()
                    )));
                }
                Err(e) if e.is_not_found() => {}
                Err(e) => {
                    return Err(CoordinatorError::ReceiptKey(format!(
                        "reading {store}/{object}: {e}"
                    )));
                }
            }
        }
        let key: [u8; KEY_BYTES] = rand::random();
        store
            .put(&object, Bytes::copy_from_slice(&key))
            .await
            .map_err(|e| CoordinatorError::ReceiptKey(format!("writing {store}/{object}: {e}")))?;
        info!(
            run,
            "a new receipt key: replicas held from before are not believed"
        );
        Ok(Self {
            key,
            run: run.to_string(),
            predecessor: false,
        })
    }

    /// Receipts under a key of this process alone.
    #[cfg(test)]
    pub fn ephemeral(run: &str) -> Self {
        Self {
            key: rand::random(),
            run: run.to_string(),
            predecessor: false,
        }
    }

    /// Whether a coordinator of this run came before this one: only then
    /// can members hold replicas it has no receipt for that are real.
    pub fn predecessor(&self) -> bool {
        self.predecessor
    }

    /// The receipt for the state every rank agreed on.
    pub fn issue(&self, agreed: Verified) -> pb::Receipt {
        pb::Receipt {
            step: agreed.step,
            checksum: agreed.checksum,
            tag: self.mac(agreed).finalize().into_bytes().to_vec().into(),
        }
    }

    /// What `receipt` proves, if a coordinator of this run issued it.
    pub fn verify(&self, receipt: &pb::Receipt) -> Option<Verified> {
        let agreed = Verified {
            step: receipt.step,
            checksum: receipt.checksum,
        };
        self.mac(agreed)
            .verify_slice(&receipt.tag)
            .is_ok()
            .then_some(agreed)
    }

    fn mac(&self, agreed: Verified) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(DOMAIN);
        mac.update(&(self.run.len() as u64).to_le_bytes());
        mac.update(self.run.as_bytes());
        mac.update(&agreed.step.to_le_bytes());
        mac.update(&agreed.checksum.to_le_bytes());
        mac
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGREED: Verified = Verified {
        step: 7,
        checksum: 0xfeed,
    };

    #[test]
    fn a_receipt_verifies_only_as_issued_and_only_under_its_key_and_run() {
        let receipts = Receipts::ephemeral("run");
        let receipt = receipts.issue(AGREED);
        assert_eq!(receipts.verify(&receipt), Some(AGREED));
        let forged = |f: fn(&mut pb::Receipt)| {
            let mut r = receipt.clone();
            f(&mut r);
            receipts.verify(&r)
        };
        assert_eq!(forged(|r| r.step = 8), None);
        assert_eq!(forged(|r| r.checksum = 1), None);
        assert_eq!(forged(|r| r.tag = Bytes::new()), None);
        assert_eq!(
            Receipts::ephemeral("run").verify(&receipt),
            None,
            "another key"
        );
        let other_run = Receipts {
            key: receipts.key,
            run: "other".into(),
            predecessor: false,
        };
        assert_eq!(other_run.verify(&receipt), None, "another run");
    }

    #[tokio::test]
    async fn the_key_survives_a_restart_unless_the_run_starts_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = common::Config::load_with_env(
            None,
            &[(
                "checkpoint.store",
                format!("file://{}", dir.path().display()),
            )],
            Some(Default::default()),
        )
        .unwrap();
        let store = common::storage::store::Store::open(&cfg.checkpoint).unwrap();
        let checkpoints = Checkpoints::new(store, "run");
        let first = Receipts::open(&checkpoints, "run", true).await.unwrap();
        assert!(!first.predecessor());
        let receipt = first.issue(AGREED);
        let again = Receipts::open(&checkpoints, "run", true).await.unwrap();
        assert!(again.predecessor());
        assert_eq!(again.verify(&receipt), Some(AGREED));
        let fresh = Receipts::open(&checkpoints, "run", false).await.unwrap();
        assert_eq!(
            fresh.verify(&receipt),
            None,
            "a fresh start makes a new key"
        );
    }
}
