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
use object_store::ClientOptions;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    BackoffConfig, ObjectStore, ObjectStoreExt, PutMode, PutOptions, RetryConfig, UpdateVersion,
    WriteMultipart,
};

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
/// How long the start-up check waits for the store, without retrying.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

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
    #[error("{operation} `{key}` in {store}: {kind}: {message}")]
    Request {
        /// Bucket and endpoint, or folder.
        store: String,
        /// What we tried.
        operation: &'static str,
        /// The key, relative to the store's root.
        key: String,
        /// The store's error and its causes, with any credential scrubbed out.
        message: String,
        /// What kind of failure it is, and what to do about it.
        kind: Failure,
    },
    /// A listing holds more objects than the caller takes.
    #[error(
        "{store} holds more than {limit} objects under `{prefix}`: point at the data set's own folder"
    )]
    TooMany {
        /// Bucket and endpoint, or folder.
        store: String,
        /// What was listed.
        prefix: String,
        /// The most the caller takes.
        limit: usize,
    },
}

/// What kind of failure a store request met, read off the error and its
/// causes, so the message says what to fix and a start-up check knows
/// which failures waiting cannot cure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Failure {
    /// The object does not exist.
    #[error("not found")]
    NotFound,
    /// The server refused the credentials.
    #[error(
        "the server refused the credentials: check checkpoint.s3.access_key_id and \
         checkpoint.s3.secret_access_key (or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
    )]
    Credentials,
    /// The bucket does not exist.
    #[error("the bucket does not exist: create it or fix checkpoint.store")]
    NoBucket,
    /// Nothing listens at the endpoint.
    #[error(
        "connection refused: nothing listens at checkpoint.s3.endpoint's host and port \
         (is the server running, and is the port right?)"
    )]
    Refused,
    /// The endpoint's host name does not resolve.
    #[error("the endpoint's host name does not resolve: check checkpoint.s3.endpoint")]
    Dns,
    /// TLS failed: a plain-HTTP server dialled with https://, or an untrusted certificate.
    #[error(
        "the TLS handshake failed: if the server speaks plain HTTP, write http:// in \
         checkpoint.s3.endpoint and set checkpoint.s3.allow_http = true; otherwise its \
         certificate is not trusted by this machine"
    )]
    Tls,
    /// The endpoint did not answer in time.
    #[error("the endpoint did not answer in time")]
    Timeout,
    /// Anything else.
    #[error("request failed")]
    Other,
}

impl Failure {
    /// Reads the kind of failure off an error and the text of its causes.
    fn of(err: &object_store::Error, text: &str) -> Self {
        let has = |needles: &[&str]| needles.iter().any(|n| text.contains(n));
        // Connection failures first: their text holds the URL, whose port
        // may well contain "403".
        if matches!(err, object_store::Error::NotFound { .. }) {
            Self::NotFound
        } else if has(&["Connection refused", "ConnectionRefused"]) {
            Self::Refused
        } else if has(&[
            "dns error",
            "failed to lookup address",
            "Name or service not known",
        ]) {
            Self::Dns
        } else if has(&[
            "InvalidContentType",
            "CorruptMessage",
            "InvalidCertificate",
            "tls handshake",
        ]) {
            Self::Tls
        } else if has(&["timed out", "deadline has elapsed"]) {
            Self::Timeout
        } else if has(&["NoSuchBucket"]) {
            Self::NoBucket
        } else if has(&[
            "403 Forbidden",
            "AccessDenied",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
        ]) {
            Self::Credentials
        } else {
            Self::Other
        }
    }

    /// Whether waiting or retrying cannot cure it: wrong credentials, a
    /// missing bucket, an unknown host, a TLS mismatch.
    pub fn is_permanent(self) -> bool {
        matches!(
            self,
            Self::Credentials | Self::NoBucket | Self::Dns | Self::Tls
        )
    }
}

impl StoreError {
    /// Whether the failure was a missing object (rather than a broken store).
    pub fn is_not_found(&self) -> bool {
        self.failure() == Some(Failure::NotFound)
    }

    /// The kind of a failed request.
    pub fn failure(&self) -> Option<Failure> {
        match self {
            Self::Request { kind, .. } => Some(*kind),
            Self::Url { .. } | Self::TooMany { .. } => None,
        }
    }

    /// Whether running again cannot get past it.
    pub fn is_permanent(&self) -> bool {
        self.failure().is_none_or(Failure::is_permanent)
    }
}

/// A bucket (or folder) plus a key prefix, shared cheaply between tasks.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    /// The same store without retries, for the start-up check: a
    /// misconfiguration must fail in seconds, not after minutes of backoff.
    probe: Arc<dyn ObjectStore>,
    root: Path,
    description: String,
    secret: Option<String>,
    /// The folder of a `file://` store.
    folder: Option<std::path::PathBuf>,
}

/// The version of an object a conditional write must find.
#[derive(Debug, Clone)]
pub struct Version(UpdateVersion);

/// What a conditional write requires of the object it replaces.
#[derive(Debug, Clone)]
pub enum Conditional {
    /// There is none yet.
    Absent,
    /// It is still this version.
    Matches(Version),
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
            if s3.endpoint.starts_with("http://") && !s3.allow_http {
                return Err(bad(format!(
                    "checkpoint.s3.endpoint {} is plain http:// but checkpoint.s3.allow_http is \
                     false: set it to true for a plain-HTTP server, or use https://",
                    s3.endpoint
                )));
            }
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
            let probe = builder
                .clone()
                .with_retry(RetryConfig {
                    max_retries: 0,
                    retry_timeout: PROBE_TIMEOUT,
                    ..RetryConfig::default()
                })
                .with_client_options(
                    ClientOptions::new()
                        .with_allow_http(s3.allow_http)
                        .with_connect_timeout(PROBE_TIMEOUT)
                        .with_timeout(PROBE_TIMEOUT),
                )
                .build()
                .map_err(|e| bad(crate::process::report::render(&e)))?;
            let inner = builder
                .build()
                .map_err(|e| bad(crate::process::report::render(&e)))?;
            let endpoint = match s3.endpoint.as_str() {
                "" => "AWS".to_string(),
                e => e.to_string(),
            };
            return Ok(Self {
                inner: Arc::new(inner),
                probe: Arc::new(probe),
                root: Path::from(prefix),
                description: format!("s3://{bucket}/{prefix} at {endpoint}"),
                secret: secret.filter(|s| !s.is_empty()),
                folder: None,
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
            let inner: Arc<dyn ObjectStore> = Arc::new(
                LocalFileSystem::new_with_prefix(folder)
                    .map_err(|e| bad(e.to_string()))?
                    .with_automatic_cleanup(true),
            );
            return Ok(Self {
                probe: inner.clone(),
                inner,
                root: Path::default(),
                description: format!("folder {folder}"),
                secret: None,
                folder: Some(folder.into()),
            });
        }
        if url.starts_with("memory://") {
            let inner: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
            return Ok(Self {
                probe: inner.clone(),
                inner,
                root: Path::default(),
                description: "memory store".into(),
                secret: None,
                folder: None,
            });
        }
        Err(bad("expected s3://, file:// or memory://".into()))
    }

    /// Proves the store is reachable and the credentials work, so a
    /// misconfigured run fails before training rather than at its first
    /// checkpoint.
    pub async fn check(&self) -> Result<(), StoreError> {
        self.probe
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

    /// The folder of a `file://` store, where locks are the kernel's.
    pub fn local_folder(&self) -> Option<&std::path::Path> {
        self.folder.as_deref()
    }

    /// Whether leases are kept as objects written with conditional PUTs
    /// (S3 and memory stores; a folder is locked by the kernel instead).
    pub fn leases(&self) -> bool {
        self.folder.is_none()
    }

    /// Writes `data` at `key` only if the object is as `condition` says:
    /// `Ok(Err(()))` when it is not (another writer got there first).
    pub async fn put_if(
        &self,
        key: &str,
        data: Bytes,
        condition: Conditional,
    ) -> Result<Result<Version, ()>, StoreError> {
        let mode = match condition {
            Conditional::Absent => PutMode::Create,
            Conditional::Matches(Version(version)) => PutMode::Update(version),
        };
        let options = PutOptions {
            mode,
            ..PutOptions::default()
        };
        match self
            .inner
            .put_opts(&self.path(key), data.into(), options)
            .await
        {
            Ok(result) => Ok(Ok(Version(UpdateVersion {
                e_tag: result.e_tag,
                version: result.version,
            }))),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => Ok(Err(())),
            Err(e) => Err(self.error("conditionally writing", key, e)),
        }
    }

    /// Reads the object at `key` and the version a conditional write can name.
    pub async fn get_versioned(&self, key: &str) -> Result<(Bytes, Version), StoreError> {
        let fail = |e| self.error("reading", key, e);
        let object = self.inner.get(&self.path(key)).await.map_err(fail)?;
        let version = Version(UpdateVersion {
            e_tag: object.meta.e_tag.clone(),
            version: object.meta.version.clone(),
        });
        Ok((object.bytes().await.map_err(fail)?, version))
    }

    /// Deletes the object at `key`.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.inner
            .delete(&self.path(key))
            .await
            .map_err(|e| self.error("deleting", key, e))
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

    /// Every object under `prefix`: its key below `prefix` and its size, at
    /// most `limit` of them (a listing is a peer's answer: bounded).
    pub async fn objects(
        &self,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let base = self.path(prefix);
        let skip = base.parts().count();
        let mut listing = self.inner.list(Some(&base));
        let mut found = Vec::new();
        while let Some(meta) = listing
            .try_next()
            .await
            .map_err(|e| self.error("listing", prefix, e))?
        {
            if found.len() == limit {
                return Err(StoreError::TooMany {
                    store: self.description.clone(),
                    prefix: prefix.to_string(),
                    limit,
                });
            }
            let key: Vec<String> = meta
                .location
                .parts()
                .skip(skip)
                .map(|p| p.as_ref().to_string())
                .collect();
            found.push((key.join("/"), meta.size));
        }
        Ok(found)
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
        // The kind is often only in a cause (an io::Error three levels down).
        let mut message = crate::process::report::render(&err).replace("\n  caused by: ", ": ");
        if let Some(secret) = &self.secret {
            message = message.replace(secret.as_str(), "***");
        }
        StoreError::Request {
            store: self.description.clone(),
            operation,
            key: key.to_string(),
            kind: Failure::of(&err, &message),
            message,
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
