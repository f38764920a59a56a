//! Images in, training batches out.
//!
//! [`source`] finds the images (a CelebA root, any image folder, or the
//! built-in synthetic faces), [`celeba`] knows CelebA's layout on disk,
//! [`preprocess`] turns one into the reference
//! 64×64 [−1, 1] tensor layout, [`synthetic`] draws the deterministic faces
//! and writes them to disk in the CelebA layout, and [`loader`] assembles
//! this rank's batches in parallel, one step ahead of training.

pub mod celeba;
pub mod loader;
pub mod preprocess;
pub mod source;
pub mod synthetic;

pub use loader::{Batch, BatchLoader};
pub use source::ImageSource;

use std::path::PathBuf;

/// What can go wrong between a folder on disk and a batch.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// The configured folder cannot be listed.
    #[error("cannot read data folder {path}: {source}")]
    Folder {
        /// The folder.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The folder holds no image files at all.
    #[error(
        "no images in {path}: expected a CelebA root holding img_align_celeba/*.jpg \
         or a folder of .jpg/.jpeg/.png files (or set data.source = \"synthetic\")"
    )]
    Empty {
        /// The folder that was searched.
        path: PathBuf,
    },
    /// The partition file is malformed.
    #[error("{path} line {line}: {message}")]
    Partition {
        /// The partition file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
    /// A split was requested but there is no partition file to define it.
    #[error(
        "data.split = {split} needs {path}, which does not exist: add CelebA's \
         list_eval_partition.txt or use --split all"
    )]
    NoPartition {
        /// Where the partition file was looked for.
        path: PathBuf,
        /// The requested split.
        split: String,
    },
    /// One image could not be read or decoded.
    #[error("cannot decode image {path}: {message}")]
    Image {
        /// The offending file.
        path: PathBuf,
        /// The decoder's reason.
        message: String,
    },
    /// Too few of this rank's images decode to fill a batch.
    #[error(
        "not enough readable images in {source_name} to fill a batch: {unreadable} of this \
         shard's images failed to decode (see the warnings above for each path)"
    )]
    NothingReadable {
        /// The data set.
        source_name: String,
        /// How many of the shard's files failed.
        unreadable: usize,
    },
    /// The partition file names images none of which is in the folder.
    #[error(
        "{partition} lists {listed} images for data.split = {split}, but none of them is in \
         {folder} (the first missing: {example:?}): point data.source at the CelebA root that \
         holds both, or use --split all"
    )]
    PartitionMismatch {
        /// The partition file.
        partition: PathBuf,
        /// The requested split.
        split: String,
        /// Images it lists for the split.
        listed: usize,
        /// The image folder searched.
        folder: PathBuf,
        /// One listed name that is missing.
        example: String,
    },
    /// The held-out split is too small for the SWD evaluation asked for.
    #[error(
        "--eval-images {wanted} needs that many held-out images, but {source_name} has {images}: \
         lower --eval-images or use a larger validation split"
    )]
    HeldOut {
        /// The held-out data set.
        source_name: String,
        /// Images in it.
        images: usize,
        /// Images asked for.
        wanted: usize,
    },
    /// The shard is too small for even one batch.
    #[error(
        "{source_name} has {images} images: too few for one batch of {batch} on each of \
         {world} workers; lower train.batch_size or use more images"
    )]
    TooSmall {
        /// The data set.
        source_name: String,
        /// Images in the split.
        images: usize,
        /// Per-worker batch size.
        batch: usize,
        /// Number of workers.
        world: usize,
    },
}
