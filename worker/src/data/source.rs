//! Where a data set's images are: a CelebA root, any image folder, or the
//! built-in synthetic faces.

use std::fs;
use std::path::{Path, PathBuf};

use common::config::{DataConfig, Split};
use image::DynamicImage;

use super::DataError;
use super::celeba::{self, CELEBA_HEIGHT, CELEBA_IMAGES, CELEBA_PARTITION, CELEBA_WIDTH};
use super::synthetic;

/// An indexable, deterministic list of images.
#[derive(Debug, Clone)]
pub enum ImageSource {
    /// Image files on disk, sorted by name.
    Files {
        /// The folder the user named, for messages.
        root: PathBuf,
        /// The selected files.
        paths: Vec<PathBuf>,
    },
    /// Synthetic faces `offset..offset + len` of the generator seeded by `seed`.
    Synthetic {
        /// Generator seed.
        seed: u64,
        /// First face index; splits use disjoint ranges.
        offset: u64,
        /// Number of faces.
        len: usize,
    },
}

/// Synthetic splits never overlap: each starts this many faces after the previous.
const SYNTHETIC_SPLIT_STRIDE: u64 = 1 << 40;

impl ImageSource {
    /// Resolves the configured source and split. `seed` seeds synthetic faces.
    pub fn open(cfg: &DataConfig, seed: u64) -> Result<Self, DataError> {
        if cfg.source == "synthetic" {
            return Ok(Self::synthetic(seed, cfg.split, cfg.synthetic_size));
        }
        Self::folder(Path::new(&cfg.source), cfg.split)
    }

    /// The synthetic split `split` with `train_len` training faces; val and
    /// test hold a tenth of that each, like CelebA's proportions.
    pub fn synthetic(seed: u64, split: Split, train_len: usize) -> Self {
        let held_out = (train_len / 10).max(1);
        let (offset, len) = match split {
            Split::Train | Split::All => (0, train_len),
            Split::Val => (SYNTHETIC_SPLIT_STRIDE, held_out),
            Split::Test => (2 * SYNTHETIC_SPLIT_STRIDE, held_out),
        };
        Self::Synthetic { seed, offset, len }
    }

    /// A CelebA root (with `img_align_celeba/`) or a plain folder of images.
    pub fn folder(root: &Path, split: Split) -> Result<Self, DataError> {
        let celeba = root.join(CELEBA_IMAGES);
        let images_dir = if celeba.is_dir() {
            celeba
        } else {
            root.to_path_buf()
        };
        let mut paths = list_images(&images_dir)?;
        let partition = root.join(CELEBA_PARTITION);
        if split != Split::All {
            if !partition.is_file() {
                return Err(DataError::NoPartition {
                    path: partition,
                    split: format!("{split:?}").to_lowercase(),
                });
            }
            let keep = celeba::read_partition(&partition, split)?;
            paths.retain(|p| {
                p.file_name()
                    .is_some_and(|n| keep.contains(&n.to_string_lossy().into_owned()))
            });
            if paths.len() < keep.len() {
                let example = keep
                    .iter()
                    .find(|name| !images_dir.join(name).is_file())
                    .cloned()
                    .unwrap_or_default();
                if paths.is_empty() {
                    return Err(DataError::PartitionMismatch {
                        partition,
                        split: format!("{split:?}").to_lowercase(),
                        listed: keep.len(),
                        folder: images_dir,
                        example,
                    });
                }
                tracing::warn!(
                    partition = %partition.display(),
                    listed = keep.len(),
                    found = paths.len(),
                    example = %common::security::untrusted::shown(&example),
                    "the partition file lists images that are not in the folder; training on those found"
                );
            }
        }
        if paths.is_empty() {
            return Err(DataError::Empty {
                path: root.to_path_buf(),
            });
        }
        Ok(Self::Files {
            root: root.to_path_buf(),
            paths,
        })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        match self {
            Self::Files { paths, .. } => paths.len(),
            Self::Synthetic { len, .. } => *len,
        }
    }

    /// Whether there are no images (never true for an opened source).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A short description for messages and logs.
    pub fn name(&self) -> String {
        match self {
            Self::Files { root, .. } => root.display().to_string(),
            Self::Synthetic { seed, .. } => format!("the synthetic data set (seed {seed})"),
        }
    }

    /// The first `count` readable images (or all, if fewer), preprocessed
    /// as for training: CHW floats in [−1, 1], `size`×`size`. An image that
    /// does not decode is reported and skipped, as training does.
    pub fn first_pixels(&self, count: usize, size: u32) -> Result<Vec<f32>, DataError> {
        let plane = 3 * (size * size) as usize;
        let mut pixels = Vec::with_capacity(count.min(self.len()) * plane);
        let mut unreadable = 0;
        for index in 0..self.len() {
            if pixels.len() == count * plane {
                break;
            }
            match self.load(index) {
                Ok(image) => super::preprocess::append_chw(&image, size, &mut pixels),
                Err(error) => {
                    unreadable += 1;
                    tracing::warn!(%error, "skipping an unreadable image");
                }
            }
        }
        if pixels.is_empty() && unreadable > 0 {
            return Err(DataError::NothingReadable {
                source_name: self.name(),
                unreadable,
            });
        }
        Ok(pixels)
    }

    /// Decodes image `index`.
    pub fn load(&self, index: usize) -> Result<DynamicImage, DataError> {
        match self {
            Self::Files { paths, .. } => decode(&paths[index]),
            Self::Synthetic { seed, offset, .. } => Ok(DynamicImage::ImageRgb8(synthetic::face(
                *seed,
                offset + index as u64,
                CELEBA_WIDTH,
                CELEBA_HEIGHT,
            ))),
        }
    }
}

/// Longest side of an image accepted for decoding.
pub const MAX_SIDE: u32 = 16_384;
/// Most elongated image accepted: longer side at most this many times the
/// shorter (CelebA's crops are 1.22:1). Resizing the shorter side of a
/// 1,000,000×1 strip to 64 would allocate gigabytes; it is refused from
/// its header, before anything is decoded or allocated.
pub const MAX_ASPECT: u32 = 4;
/// Memory one image may take while decoding.
const MAX_DECODE_BYTES: u64 = 256 << 20;

fn decode(path: &Path) -> Result<DynamicImage, DataError> {
    let fail = |message: String| DataError::Image {
        path: path.to_path_buf(),
        message,
    };
    let bytes = fs::read(path).map_err(|e| fail(e.to_string()))?;
    let mut reader = image::ImageReader::new(std::io::Cursor::new(&bytes))
        .with_guessed_format()
        .map_err(|e| fail(e.to_string()))?;
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    let format = reader.format();
    let decoder = reader.into_decoder().map_err(|e| fail(e.to_string()))?;
    let (width, height) = image::ImageDecoder::dimensions(&decoder);
    let (short, long) = (width.min(height), width.max(height));
    if short == 0 || u64::from(long) > u64::from(MAX_ASPECT) * u64::from(short) {
        return Err(fail(format!(
            "{width}×{height} pixels: at most {MAX_ASPECT}:1 between the sides is accepted \
             (this is not a photo the crop to a square could use)"
        )));
    }
    if long > MAX_SIDE {
        return Err(fail(format!(
            "{width}×{height} pixels: at most {MAX_SIDE} on a side is accepted"
        )));
    }
    if format == Some(image::ImageFormat::Jpeg) && !ends_with_jpeg_eoi(&bytes) {
        return Err(fail(
            "truncated JPEG: the file ends before its end-of-image marker".into(),
        ));
    }
    DynamicImage::from_decoder(decoder).map_err(|e| fail(e.to_string()))
}

/// Whether a JPEG file ends with its end-of-image marker (FF D9), allowing
/// a little trailing padding. A JPEG cut short still decodes, as an image
/// whose lower part is grey: training on it would be training on garbage.
fn ends_with_jpeg_eoi(bytes: &[u8]) -> bool {
    let tail = &bytes[bytes.len().saturating_sub(32)..];
    tail.windows(2).any(|w| w == [0xFF, 0xD9])
}

fn list_images(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let folder_error = |source| DataError::Folder {
        path: dir.to_path_buf(),
        source,
    };
    let mut paths = Vec::new();
    for entry in fs::read_dir(dir).map_err(folder_error)? {
        let path = entry.map_err(folder_error)?.path();
        let is_image = path
            .extension()
            .map(|e| e.to_string_lossy().to_lowercase())
            .is_some_and(|e| matches!(e.as_str(), "jpg" | "jpeg" | "png"));
        if is_image && path.is_file() {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn celeba_root(names: &[&str], partition: Option<&str>) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let images = root.path().join(CELEBA_IMAGES);
        fs::create_dir(&images).unwrap();
        for name in names {
            fs::write(images.join(name), b"not decoded by listing").unwrap();
        }
        if let Some(text) = partition {
            fs::write(root.path().join(CELEBA_PARTITION), text).unwrap();
        }
        root
    }

    #[test]
    fn partition_selects_the_split() {
        let root = celeba_root(
            &["1.jpg", "2.jpg", "3.jpg"],
            Some("1.jpg 0\n2.jpg 1\n3.jpg 0\n"),
        );
        let train = ImageSource::folder(root.path(), Split::Train).unwrap();
        assert_eq!(train.len(), 2);
        assert_eq!(
            ImageSource::folder(root.path(), Split::Val).unwrap().len(),
            1
        );
        assert_eq!(
            ImageSource::folder(root.path(), Split::All).unwrap().len(),
            3
        );
    }

    #[test]
    fn split_without_partition_file_names_the_file() {
        let root = celeba_root(&["1.jpg"], None);
        let err = ImageSource::folder(root.path(), Split::Test)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(CELEBA_PARTITION) && err.contains("--split all"),
            "{err}"
        );
    }

    #[test]
    fn malformed_partition_line_is_located() {
        let root = celeba_root(&["1.jpg"], Some("1.jpg 0\n1.jpg 7\n"));
        let err = ImageSource::folder(root.path(), Split::Train)
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn empty_folder_says_what_was_expected() {
        let root = tempfile::tempdir().unwrap();
        fs::write(root.path().join("notes.txt"), "x").unwrap();
        let err = ImageSource::folder(root.path(), Split::All)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no images in") && err.contains("img_align_celeba"),
            "{err}"
        );
    }

    #[test]
    fn synthetic_splits_are_disjoint() {
        let train = ImageSource::synthetic(1, Split::Train, 100);
        let val = ImageSource::synthetic(1, Split::Val, 100);
        assert_eq!((train.len(), val.len()), (100, 10));
        assert_ne!(
            train.load(0).unwrap().to_rgb8(),
            val.load(0).unwrap().to_rgb8()
        );
    }
}
