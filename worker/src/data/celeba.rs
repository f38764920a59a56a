//! CelebA's layout on disk, which the data set reader and the synthetic
//! set's writer share: the image folder, the crop size, and the partition
//! file that says which image belongs to which split.

use std::collections::HashSet;
use std::fs;
use std::path::Path;

use common::config::Split;

use super::DataError;

/// CelebA's image folder inside its root.
pub const CELEBA_IMAGES: &str = "img_align_celeba";
/// CelebA's split file inside its root: `<name> <0|1|2>` per line.
pub const CELEBA_PARTITION: &str = "list_eval_partition.txt";
/// Width of an aligned CelebA crop.
pub const CELEBA_WIDTH: u32 = 178;
/// Height of an aligned CelebA crop.
pub const CELEBA_HEIGHT: u32 = 218;

/// The names the partition file at `path` puts in `split`.
pub fn read_partition(path: &Path, split: Split) -> Result<HashSet<String>, DataError> {
    let wanted = match split {
        Split::Train => "0",
        Split::Val => "1",
        Split::Test => "2",
        Split::All => unreachable!("`all` needs no partition file"),
    };
    let text = fs::read_to_string(path).map_err(|source| DataError::Folder {
        path: path.to_path_buf(),
        source,
    })?;
    let mut keep = HashSet::new();
    // A UTF-8 byte-order mark (editors on Windows) is not part of the first name.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let bad = |message: &str| DataError::Partition {
            path: path.to_path_buf(),
            line: n + 1,
            message: message.to_string(),
        };
        let mut fields = line.split_whitespace();
        let (Some(name), Some(part), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(bad("expected `<image name> <0|1|2>`"));
        };
        if !matches!(part, "0" | "1" | "2") {
            return Err(bad("the partition must be 0 (train), 1 (val) or 2 (test)"));
        }
        if part == wanted {
            keep.insert(name.to_string());
        }
    }
    Ok(keep)
}
