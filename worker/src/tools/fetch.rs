//! `worker fetch-data`: copies a data set (CelebA as uploaded to a bucket)
//! from S3 into a folder, the volume the training pods then read.
//!
//! Kubernetes has no standard way to put 200 000 files on a volume; a
//! one-off Job running this does, with the same image, the same S3
//! settings and the same credentials as the checkpoints. It can be run
//! again after a failure: files already there with the right size are
//! kept. What the bucket lists is untrusted: keys that would leave the
//! target folder, objects larger than any image, and listings longer than
//! any data set are refused.

use std::path::{Component, Path, PathBuf};

use common::Config;
use common::storage::store::{Store, StoreError};
use futures::{StreamExt, TryStreamExt};

/// More objects than CelebA's 202 599 images and its few text files by far.
pub const MAX_OBJECTS: usize = 2_000_000;
/// Larger than any face image or partition file.
pub const MAX_OBJECT_BYTES: u64 = 64 << 20;
/// Downloads in flight at once.
const CONCURRENT: usize = 32;

/// Why the data set could not be copied.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A key that is not a plain relative path.
    #[error("{store} lists `{key}`, which is not a plain relative file name: refusing to write it")]
    Key {
        /// The store.
        store: String,
        /// The key as listed (escaped when shown).
        key: String,
    },
    /// An object far larger than any image.
    #[error(
        "{store} lists `{key}` at {size} bytes, over the {MAX_OBJECT_BYTES}-byte limit for one file"
    )]
    TooLarge {
        /// The store.
        store: String,
        /// The key.
        key: String,
        /// Its listed size.
        size: u64,
    },
    /// Nothing under the prefix.
    #[error(
        "{store} holds nothing: check --from (s3://bucket/prefix) and that the data set was uploaded there"
    )]
    Empty {
        /// The store.
        store: String,
    },
    /// The object's body is not the size the listing said.
    #[error("{store} sent {got} bytes for `{key}`, whose listing said {size}: fetch again")]
    Short {
        /// The store.
        store: String,
        /// The key.
        key: String,
        /// Listed size.
        size: u64,
        /// Bytes received.
        got: usize,
    },
    /// Writing to the target folder failed.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl FetchError {
    /// Whether fetching again meets it again.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Store(e) => e.is_permanent(),
            Self::Key { .. } | Self::TooLarge { .. } | Self::Empty { .. } => true,
            Self::Short { .. } | Self::Write { .. } => false,
        }
    }
}

/// What a fetch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fetched {
    /// Files downloaded now.
    pub downloaded: usize,
    /// Files that were already there, of the right size.
    pub kept: usize,
    /// Bytes downloaded now.
    pub bytes: u64,
}

/// Copies every object under `from` (`s3://bucket/prefix`, reached with
/// `cfg.checkpoint.s3`'s settings, or `file://`) into `to`.
pub async fn fetch(cfg: &Config, from: &str, to: &Path) -> Result<Fetched, FetchError> {
    let mut source = cfg.checkpoint.clone();
    source.store = from.to_string();
    let store = Store::open(&source)?;
    let objects = store.objects("", MAX_OBJECTS).await?;
    if objects.is_empty() {
        return Err(FetchError::Empty {
            store: store.to_string(),
        });
    }
    let mut wanted = Vec::new();
    let mut fetched = Fetched::default();
    for (key, size) in objects {
        let named = |key: &str| (store.to_string(), key.escape_debug().to_string());
        let Some(relative) = plain(&key) else {
            let (store, key) = named(&key);
            return Err(FetchError::Key { store, key });
        };
        if size > MAX_OBJECT_BYTES {
            let (store, key) = named(&key);
            return Err(FetchError::TooLarge { store, key, size });
        }
        let path = to.join(relative);
        match std::fs::metadata(&path) {
            Ok(meta) if meta.len() == size => fetched.kept += 1,
            _ => wanted.push((key, size, path)),
        }
    }
    tracing::info!(source = %store, to = %to.display(), download = wanted.len(), kept = fetched.kept,
        "fetching the data set");
    let counts: Vec<u64> = futures::stream::iter(wanted)
        .map(|(key, size, path)| {
            let store = store.clone();
            async move { download(&store, &key, size, &path).await.map(|()| size) }
        })
        .buffer_unordered(CONCURRENT)
        .try_collect()
        .await?;
    fetched.downloaded = counts.len();
    fetched.bytes = counts.iter().sum();
    Ok(fetched)
}

/// `key` as a relative path of normal components, or `None`.
fn plain(key: &str) -> Option<PathBuf> {
    let path = Path::new(key);
    let normal = path.components().all(|c| matches!(c, Component::Normal(_)));
    (normal && !key.is_empty() && !key.contains('\\')).then(|| path.to_path_buf())
}

/// Writes `key` to `path` through a temporary file beside it, so a file
/// of the right size is always a whole one.
async fn download(store: &Store, key: &str, size: u64, path: &Path) -> Result<(), FetchError> {
    let body = store.get(key).await?;
    if body.len() as u64 != size {
        return Err(FetchError::Short {
            store: store.to_string(),
            key: key.escape_debug().to_string(),
            size,
            got: body.len(),
        });
    }
    let write = move |path: &Path| {
        let fail = |source| FetchError::Write {
            path: path.to_path_buf(),
            source,
        };
        if let Some(folder) = path.parent() {
            std::fs::create_dir_all(folder).map_err(fail)?;
        }
        // Unique among fetchers sharing the volume (pods all have pid 1).
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let partial = path.with_extension(format!("partial-{}-{nanos}", rand::random::<u64>()));
        std::fs::write(&partial, &body).map_err(fail)?;
        std::fs::rename(&partial, path).map_err(fail)
    };
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || write(&path))
        .await
        .expect("a file write does not panic")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_relative_keys_become_paths() {
        assert_eq!(
            plain("img_align_celeba/000001.jpg"),
            Some(PathBuf::from("img_align_celeba/000001.jpg"))
        );
        for bad in ["", "../etc/passwd", "a/../../b", "/abs", "./x", "a\\b"] {
            assert_eq!(plain(bad), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn a_folder_is_copied_then_kept_on_a_second_run() {
        let from = tempfile::tempdir().unwrap();
        let to = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(from.path().join("img")).unwrap();
        std::fs::write(from.path().join("img/1.jpg"), b"one").unwrap();
        std::fs::write(from.path().join("list.txt"), b"1.jpg 0\n").unwrap();
        let url = format!("file://{}", from.path().display());
        let cfg = Config::default();
        let first = fetch(&cfg, &url, to.path()).await.unwrap();
        assert_eq!((first.downloaded, first.kept, first.bytes), (2, 0, 11));
        assert_eq!(std::fs::read(to.path().join("img/1.jpg")).unwrap(), b"one");
        let again = fetch(&cfg, &url, to.path()).await.unwrap();
        assert_eq!((again.downloaded, again.kept), (0, 2));
    }
}
