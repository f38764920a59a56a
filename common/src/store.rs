//! Object storage behind one URL: any S3-compatible bucket, a local
//! folder, or memory.
//!
//! Everything that survives a process goes through a [`Store`]: checkpoints,
//! and the `latest` pointer. The store is the only state the coordinator
//! keeps, so a restarted coordinator finds the run where it left it. Large
//! objects go up as multipart uploads, and S3 requests are retried with
//! exponential backoff by `object_store` itself. Error messages name the
//! store (bucket and endpoint) and the key, never a credential.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{BackoffConfig, ObjectStore, ObjectStoreExt, RetryConfig, WriteMultipart};

use crate::config::CheckpointConfig;

/// Objects larger than this go up as multipart uploads.
pub const MULTIPART_THRESHOLD: usize = 8 << 20;
/// Size of one multipart part (S3 wants at least 5 MiB except for the last).
const PART_BYTES: usize = 8 << 20;
/// Parts in flight at once during a multipart upload.
const PARTS_IN_FLIGHT: usize = 4;
/// Shortest wait before a retry. Every wait is at least this long, so
/// `max_retries` retries ride out an outage of at least `max_retries ×` it;
/// later waits grow (with jitter) up to [`MAX_BACKOFF`].
const INIT_BACKOFF: Duration = Duration::from_millis(500);
/// Longest wait between two retries.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A store operation that failed, naming the store and the key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// `checkpoint.store` cannot be opened as written.
    #[error("checkpoint.store = {url}: {reason}")]
    Url {
        /// The configured URL.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The store answered a request with an error (after retries).
    #[error("{operation} `{key}` in {store}: {message}{hint}")]
    Request {
        /// Bucket and endpoint, or folder.
        store: String,
        /// What we tried.
        operation: &'static str,
        /// The key, relative to the store's root.
        key: String,
        /// The store's error, with any credential scrubbed out.
        message: String,
        /// What to do about it, when we can tell.
        hint: &'static str,
        /// The object does not exist.
        not_found: bool,
    },
}

impl StoreError {
    /// Whether the failure was a missing object (rather than a broken store).
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            Self::Request {
                not_found: true,
                ..
            }
        )
    }
}

/// A bucket (or folder) plus a key prefix, shared cheaply between tasks.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    root: Path,
    description: String,
    secret: Option<String>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.description)
    }
}

impl fmt::Display for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.description)
    }
}

impl Store {
    /// Opens `cfg.store`. Nothing is contacted yet: see [`Store::check`].
    pub fn open(cfg: &CheckpointConfig) -> Result<Self, StoreError> {
        let url = cfg.store.as_str();
        let bad = |reason: String| StoreError::Url {
            url: url.to_string(),
            reason,
        };
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("no bucket: write s3://bucket/prefix".into()));
            }
            let s3 = &cfg.s3;
            let mut builder = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_region(&s3.region)
                .with_allow_http(s3.allow_http)
                .with_virtual_hosted_style_request(!s3.path_style)
                .with_retry(RetryConfig {
                    backoff: BackoffConfig {
                        init_backoff: INIT_BACKOFF,
                        max_backoff: MAX_BACKOFF,
                        base: 2.0,
                    },
                    max_retries: s3.max_retries,
                    retry_timeout: Duration::from_secs(s3.retry_timeout_s),
                });
            if !s3.endpoint.is_empty() {
                builder = builder.with_endpoint(&s3.endpoint);
            }
            if !s3.access_key_id.is_empty() {
                builder = builder.with_access_key_id(&s3.access_key_id);
            }
            if !s3.secret_access_key.is_empty() {
                builder = builder.with_secret_access_key(s3.secret_access_key.expose());
            }
            // Whichever secret signs, it is scrubbed from every error message.
            let secret = match s3.secret_access_key.is_empty() {
                false => Some(s3.secret_access_key.expose().to_string()),
                true => std::env::var("AWS_SECRET_ACCESS_KEY").ok(),
            };
            let inner = builder.build().map_err(|e| bad(e.to_string()))?;
            let endpoint = match s3.endpoint.as_str() {
                "" => "AWS".to_string(),
                e => e.to_string(),
            };
            return Ok(Self {
                inner: Arc::new(inner),
                root: Path::from(prefix),
                description: format!("s3://{bucket}/{prefix} at {endpoint}"),
                secret: secret.filter(|s| !s.is_empty()),
            });
        }
        if let Some(folder) = url.strip_prefix("file://") {
            if folder.is_empty() {
                return Err(bad(
                    "no folder: write file:///abs/path or file://rel/path".into()
                ));
            }
            std::fs::create_dir_all(folder)
                .map_err(|e| bad(format!("creating folder {folder}: {e}")))?;
            let inner = LocalFileSystem::new_with_prefix(folder)
                .map_err(|e| bad(e.to_string()))?
                .with_automatic_cleanup(true);
            return Ok(Self {
                inner: Arc::new(inner),
                root: Path::default(),
                description: format!("folder {folder}"),
                secret: None,
            });
        }
        if url.starts_with("memory://") {
            return Ok(Self {
                inner: Arc::new(InMemory::new()),
                root: Path::default(),
                description: "memory store".into(),
                secret: None,
            });
        }
        Err(bad("expected s3://, file:// or memory://".into()))
    }

    /// Proves the store is reachable and the credentials work, so a
    /// misconfigured run fails before training rather than at its first
    /// checkpoint.
    pub async fn check(&self) -> Result<(), StoreError> {
        self.inner
            .list_with_delimiter(Some(&self.root))
            .await
            .map(|_| ())
            .map_err(|e| self.error("listing", "", e))
    }

    /// Writes `data` at `key`, as a multipart upload when it is large.
    /// Readers see the old object or the whole new one, never a part.
    pub async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        let path = self.path(key);
        let fail = |e| self.error("writing", key, e);
        if data.len() <= MULTIPART_THRESHOLD {
            return self
                .inner
                .put(&path, data.into())
                .await
                .map(|_| ())
                .map_err(fail);
        }
        let upload = self.inner.put_multipart(&path).await.map_err(fail)?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        for part in data.chunks(PART_BYTES) {
            if let Err(e) = writer.wait_for_capacity(PARTS_IN_FLIGHT).await {
                // Best effort: a dangling upload only costs storage until the bucket's lifecycle rule.
                let _ = writer.abort().await;
                return Err(fail(e));
            }
            writer.write(part);
        }
        writer.finish().await.map(|_| ()).map_err(fail)
    }

    /// Reads the whole object at `key`.
    pub async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let fail = |e| self.error("reading", key, e);
        let object = self.inner.get(&self.path(key)).await.map_err(fail)?;
        object.bytes().await.map_err(fail)
    }

    /// The size of the object at `key`, without reading it.
    pub async fn size(&self, key: &str) -> Result<u64, StoreError> {
        let meta = self
            .inner
            .head(&self.path(key))
            .await
            .map_err(|e| self.error("inspecting", key, e))?;
        Ok(meta.size)
    }

    /// The names of the "folders" directly under `prefix`.
    pub async fn folders(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let listing = self
            .inner
            .list_with_delimiter(Some(&self.path(prefix)))
            .await
            .map_err(|e| self.error("listing", prefix, e))?;
        Ok(listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect())
    }

    /// Deletes every object under `prefix`.
    pub async fn delete_all(&self, prefix: &str) -> Result<(), StoreError> {
        let fail = |e| self.error("deleting", prefix, e);
        let locations = self
            .inner
            .list(Some(&self.path(prefix)))
            .map_ok(|meta| meta.location)
            .boxed();
        self.inner
            .delete_stream(locations)
            .try_collect::<Vec<_>>()
            .await
            .map(|_| ())
            .map_err(fail)
    }

    fn path(&self, key: &str) -> Path {
        key.split('/')
            .filter(|part| !part.is_empty())
            .fold(self.root.clone(), |path, part| path.clone().join(part))
    }

    fn error(&self, operation: &'static str, key: &str, err: object_store::Error) -> StoreError {
        let not_found = matches!(err, object_store::Error::NotFound { .. });
        let mut message = err.to_string();
        if let Some(secret) = &self.secret {
            message = message.replace(secret.as_str(), "***");
        }
        let refused = [
            "403",
            "Forbidden",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
        ]
        .iter()
        .any(|needle| message.contains(needle));
        let hint = if refused {
            "; the server refused the credentials: check checkpoint.s3.access_key_id and \
             checkpoint.s3.secret_access_key (or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
        } else if message.contains("NoSuchBucket") {
            "; the bucket does not exist: create it or fix checkpoint.store"
        } else {
            ""
        };
        StoreError::Request {
            store: self.description.clone(),
            operation,
            key: key.to_string(),
            message,
            hint,
            not_found,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory() -> Store {
        let cfg = CheckpointConfig {
            store: "memory://".into(),
            ..CheckpointConfig::default()
        };
        Store::open(&cfg).unwrap()
    }

    #[tokio::test]
    async fn large_objects_round_trip_through_multipart() {
        let store = memory();
        let big: Bytes = (0..MULTIPART_THRESHOLD + 12345)
            .map(|i| (i % 251) as u8)
            .collect();
        store.put("run/a/big", big.clone()).await.unwrap();
        store
            .put("run/b/small", Bytes::from_static(b"x"))
            .await
            .unwrap();
        assert_eq!(store.get("run/a/big").await.unwrap(), big);
        let mut folders = store.folders("run").await.unwrap();
        folders.sort();
        assert_eq!(folders, ["a", "b"]);
        store.delete_all("run/a").await.unwrap();
        assert!(store.get("run/a/big").await.unwrap_err().is_not_found());
        assert_eq!(store.folders("run").await.unwrap(), ["b"]);
    }

    #[test]
    fn unknown_schemes_and_missing_buckets_are_named() {
        for (url, needle) in [("s3://", "no bucket"), ("gs://b", "expected s3://")] {
            let cfg = CheckpointConfig {
                store: url.into(),
                ..CheckpointConfig::default()
            };
            let err = Store::open(&cfg).unwrap_err().to_string();
            assert!(err.contains(url) && err.contains(needle), "{err}");
        }
    }

    #[tokio::test]
    async fn file_stores_create_their_folder() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("nested/store");
        let cfg = CheckpointConfig {
            store: format!("file://{}", folder.display()),
            ..CheckpointConfig::default()
        };
        let store = Store::open(&cfg).unwrap();
        store.check().await.unwrap();
        store.put("r/k", Bytes::from_static(b"v")).await.unwrap();
        assert_eq!(std::fs::read(folder.join("r/k")).unwrap(), b"v");
    }
}
