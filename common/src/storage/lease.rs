//! One coordinator per run: a lock on the output folder and a lease on the
//! run in its store.
//!
//! Two coordinators writing the same run would interleave checkpoints and
//! loss rows and unlink each other's socket. The output folder is locked
//! with `flock` (released by the kernel when the process dies, however it
//! dies). The run is leased in its store: for a `file://` store, `flock` on
//! `<run>/lease`; for S3, an object `<run>/lease` created with a
//! conditional PUT (`If-None-Match: *`, atomic on AWS, MinIO and moto) and
//! renewed with `If-Match` every third of its time to live. A coordinator
//! that dies without releasing leaves a lease that expires after
//! `checkpoint.lease_s`; `--break-lease` takes it over at once. A holder
//! that finds its lease taken (or cannot renew it in time) stops at once,
//! without writing anything more.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::storage::store::{Conditional, Store, StoreError, Version};

/// Who holds a lock or a lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// Its host name.
    pub host: String,
    /// Its process id.
    pub pid: u32,
    /// When it took the lock, seconds since the epoch.
    pub since: u64,
    /// When the lease lapses unless renewed, seconds since the epoch (0 for
    /// a kernel lock, which needs no renewal).
    pub expires: u64,
    /// Tells this holder from an earlier one on the same host and pid.
    pub id: String,
}

impl Holder {
    /// This process, holding until `ttl` from now (`None`: a kernel lock).
    pub fn me(ttl: Option<Duration>) -> Self {
        let now = now();
        Self {
            host: hostname(),
            pid: std::process::id(),
            since: now,
            expires: ttl.map_or(0, |ttl| now + ttl.as_secs()),
            id: format!("{:016x}", rand::random::<u64>()),
        }
    }

    fn renewed(&self, ttl: Duration) -> Self {
        Self {
            expires: now() + ttl.as_secs(),
            ..self.clone()
        }
    }

    fn expired(&self) -> bool {
        self.expires != 0 && self.expires <= now()
    }

    fn json(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("a holder serialises"))
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at =
            |secs: u64| humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs));
        write!(
            f,
            "the coordinator with pid {} on host {}, since {}",
            self.pid,
            crate::security::untrusted::shown(&self.host),
            at(self.since)
        )?;
        if self.expires != 0 {
            write!(f, " (its lease runs until {})", at(self.expires))?;
        }
        Ok(())
    }
}

/// Why a lock or lease could not be taken or kept.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LeaseError {
    /// Someone else holds it.
    #[error("{what} is in use by {holder}: {remedy}")]
    Held {
        /// The folder or run.
        what: String,
        /// Who holds it.
        holder: Holder,
        /// What to do.
        remedy: &'static str,
    },
    /// The lock file cannot be used.
    #[error("cannot lock {what} (lock file {path}): {source}")]
    Io {
        /// The folder or run.
        what: String,
        /// The lock file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The store failed while taking or reading the lease.
    #[error("the lease on the run: {0}")]
    Store(#[from] StoreError),
}

const FOLDER_REMEDY: &str =
    "wait for it to finish, stop it, or give this run another output folder (--out)";
const RUN_REMEDY: &str = "wait for it to finish or stop it; if it died, its lease expires after \
     checkpoint.lease_s, or start this coordinator with --break-lease to take the run over now";

/// An exclusive kernel lock on a file, holding the holder's description.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

impl FileLock {
    /// Locks `path` (created if missing) for this process, or says who holds it.
    pub fn acquire(path: &Path, what: &str, remedy: &'static str) -> Result<Self, LeaseError> {
        let io = |source| LeaseError::Io {
            what: what.to_string(),
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                file.read_to_string(&mut text).map_err(io)?;
                let holder = serde_json::from_str(&text).unwrap_or_else(|_| Holder {
                    host: "unknown".into(),
                    pid: 0,
                    since: 0,
                    expires: 0,
                    id: String::new(),
                });
                return Err(LeaseError::Held {
                    what: what.to_string(),
                    holder,
                    remedy,
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        file.write_all(&Holder::me(None).json()).map_err(io)?;
        file.flush().map_err(io)?;
        Ok(Self { _file: file })
    }

    /// Locks the output folder `dir`.
    pub fn output(dir: &Path) -> Result<Self, LeaseError> {
        let what = format!("the output folder {} (output.dir, --out)", dir.display());
        Self::acquire(&dir.join(".coordinator.lock"), &what, FOLDER_REMEDY)
    }
}

/// The lease on one run, kept for as long as this value lives.
pub struct Lease {
    _lock: Option<FileLock>,
    lost: watch::Receiver<Option<String>>,
    renewer: Option<JoinHandle<()>>,
    release: Option<(Store, String)>,
}

impl Lease {
    /// Takes run `run` of `store` for this process. A lease that expired
    /// (its holder died) is taken over, and so is a live one when `force`
    /// (`--break-lease`); either is logged with who held it.
    pub async fn acquire(
        store: &Store,
        run: &str,
        ttl: Duration,
        force: bool,
    ) -> Result<Self, LeaseError> {
        let key = format!("{run}/lease");
        let what = format!("run `{run}` in {store}");
        let (_tx, idle) = watch::channel(None);
        if let Some(folder) = store.local_folder() {
            let lock = FileLock::acquire(&folder.join(&key), &what, RUN_REMEDY)?;
            return Ok(Self {
                _lock: Some(lock),
                lost: idle,
                renewer: None,
                release: None,
            });
        }
        if !store.leases() {
            return Ok(Self {
                _lock: None,
                lost: idle,
                renewer: None,
                release: None,
            });
        }
        let me = Holder::me(Some(ttl));
        let version = match store.put_if(&key, me.json(), Conditional::Absent).await? {
            Ok(version) => version,
            Err(()) => match take_over(store, &key, &what, &me, force).await {
                // A coordinator replaced after it was killed (a pod on a lost
                // node) finds its predecessor's lease: wait, once and bounded,
                // for it to lapse. A live holder renews it and is still there.
                Err(LeaseError::Held { holder, .. }) if lapses_soon(&holder, ttl) => {
                    let wait = Duration::from_secs(holder.expires.saturating_sub(now()) + 1);
                    tracing::warn!(%holder, wait_s = wait.as_secs(),
                        "{what} is leased: waiting for the lease to lapse, in case its holder died \
                         (--break-lease takes it over at once)");
                    tokio::time::sleep(wait).await;
                    take_over(store, &key, &what, &me, force).await?
                }
                taken => taken?,
            },
        };
        let (lost_tx, lost) = watch::channel(None);
        let renewer = tokio::spawn(renew(store.clone(), key.clone(), me, version, ttl, lost_tx));
        Ok(Self {
            _lock: None,
            lost,
            renewer: Some(renewer),
            release: Some((store.clone(), key)),
        })
    }

    /// Resolves, with why, if the lease is lost; never while it is held.
    pub async fn lost(&self) -> String {
        let mut lost = self.lost.clone();
        let reason = lost
            .wait_for(Option::is_some)
            .await
            .map(|reason| reason.clone().unwrap_or_default());
        match reason {
            Ok(reason) => reason,
            // The renewer is gone without a word: the lease is held until released.
            Err(_) => std::future::pending().await,
        }
    }

    /// Whether the lease is still this process's.
    pub fn held(&self) -> bool {
        self.lost.borrow().is_none()
    }

    /// Gives the run back (deletes the lease object; the kernel drops locks).
    pub async fn release(mut self) {
        if let Some(renewer) = self.renewer.take() {
            renewer.abort();
        }
        if let Some((store, key)) = self.release.take()
            && self.held()
        {
            let _ = store.delete(&key).await;
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(renewer) = &self.renewer {
            renewer.abort();
        }
    }
}

/// The lease exists: take it over if it lapsed or `force`, else say who holds it.
async fn take_over(
    store: &Store,
    key: &str,
    what: &str,
    me: &Holder,
    force: bool,
) -> Result<Version, LeaseError> {
    let (bytes, version) = store.get_versioned(key).await?;
    let holder: Option<Holder> = serde_json::from_slice(&bytes).ok();
    let lapsed = holder.as_ref().is_none_or(Holder::expired);
    if !lapsed && !force {
        let holder = holder.expect("a live lease parsed");
        return Err(LeaseError::Held {
            what: what.to_string(),
            holder,
            remedy: RUN_REMEDY,
        });
    }
    let previous = holder.map_or_else(|| "an unreadable lease".into(), |h| h.to_string());
    match store
        .put_if(key, me.json(), Conditional::Matches(version))
        .await?
    {
        Ok(version) => {
            tracing::warn!(%previous, forced = force, "took over the lease on {what}");
            Ok(version)
        }
        // Someone else took it over between our read and our write.
        Err(()) => {
            let (bytes, _) = store.get_versioned(key).await?;
            let holder = serde_json::from_slice(&bytes).unwrap_or_else(|_| me.clone());
            Err(LeaseError::Held {
                what: what.to_string(),
                holder,
                remedy: RUN_REMEDY,
            })
        }
    }
}

/// Whether `holder`'s lease lapses within this coordinator's own `ttl`
/// unless renewed (a longer one is not waited for).
fn lapses_soon(holder: &Holder, ttl: Duration) -> bool {
    holder.expires != 0 && holder.expires <= now() + ttl.as_secs()
}

/// Renews the lease every third of `ttl`; reports its loss on `lost`.
async fn renew(
    store: Store,
    key: String,
    me: Holder,
    mut version: Version,
    ttl: Duration,
    lost: watch::Sender<Option<String>>,
) {
    let mut every = tokio::time::interval(ttl / 3);
    every.tick().await;
    let mut held_until = now() + ttl.as_secs();
    loop {
        every.tick().await;
        let renewed = me.renewed(ttl);
        match store
            .put_if(&key, renewed.json(), Conditional::Matches(version.clone()))
            .await
        {
            Ok(Ok(next)) => {
                version = next;
                held_until = renewed.expires;
            }
            Ok(Err(())) => {
                let _ = lost.send(Some(format!(
                    "another coordinator took over the lease on `{key}` (--break-lease, or it \
                     expired while this one could not renew it)"
                )));
                return;
            }
            Err(error) if now() >= held_until => {
                let _ = lost.send(Some(format!(
                    "the lease on `{key}` expired: it could not be renewed for \
                     checkpoint.lease_s ({error})"
                )));
                return;
            }
            Err(error) => tracing::warn!(%error, "could not renew the run's lease; retrying"),
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CheckpointConfig;

    #[test]
    fn a_locked_folder_names_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        let _held = FileLock::output(dir.path()).unwrap();
        let err = FileLock::output(dir.path()).unwrap_err().to_string();
        let me = std::process::id().to_string();
        assert!(
            err.contains(&format!("pid {me}")) && err.contains("--out"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_file_store_run_is_leased_once() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = CheckpointConfig {
            store: format!("file://{}", dir.path().display()),
            ..CheckpointConfig::default()
        };
        let store = Store::open(&cfg).unwrap();
        let held = Lease::acquire(&store, "r", Duration::from_secs(60), false)
            .await
            .unwrap();
        let err = Lease::acquire(&store, "r", Duration::from_secs(60), false)
            .await
            .err()
            .expect("a second lease");
        assert!(
            err.to_string().contains("run `r`") && err.to_string().contains("--break-lease"),
            "{err}"
        );
        drop(held);
        Lease::acquire(&store, "r", Duration::from_secs(60), false)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn an_object_lease_is_exclusive_expires_and_can_be_broken() {
        let cfg = CheckpointConfig {
            store: "memory://".into(),
            ..CheckpointConfig::default()
        };
        let store = Store::open(&cfg).unwrap();
        let ttl = Duration::from_secs(60);
        let first = Lease::acquire(&store, "r", ttl, false).await.unwrap();
        let refused = Lease::acquire(&store, "r", ttl, false)
            .await
            .err()
            .expect("held");
        assert!(refused.to_string().contains("is in use by"), "{refused}");
        let broken = Lease::acquire(&store, "r", ttl, true).await.unwrap();
        assert!(broken.held());
        // The first holder finds out at its next renewal.
        drop(first);
        let expired = Holder {
            expires: 1,
            ..Holder::me(Some(ttl))
        };
        store.put("s/lease", expired.json()).await.unwrap();
        Lease::acquire(&store, "s", ttl, false).await.unwrap();
    }
}
