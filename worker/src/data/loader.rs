//! This rank's batches, decoded in parallel one step ahead of training.
//!
//! A background thread assembles batch `s + 1..s + prefetch` with rayon
//! while step `s` computes. The batch for a step depends only on
//! `(seed, epoch, step)`, the cursor the run started from and the set of
//! unreadable files, so a run is reproducible and resumes at any step. An unreadable image is
//! reported once, remembered, and replaced by the next image of the shard.

use std::collections::HashSet;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use common::{DataCursor, ShardSampler, StepPlan};
use rayon::prelude::*;

use super::{DataError, ImageSource, preprocess};

/// One training batch: `count` images, CHW, in [−1, 1].
#[derive(Debug, Clone)]
pub struct Batch {
    /// Global step this batch belongs to.
    pub step: u64,
    /// Epoch of that step.
    pub epoch: u64,
    /// Where the data stands once this step is trained (what a checkpoint saves).
    pub cursor_after: DataCursor,
    /// `count × 3 × size × size` floats.
    pub pixels: Vec<f32>,
    /// Images in the batch.
    pub count: usize,
    /// Images skipped as unreadable so far (including earlier batches).
    pub skipped: usize,
}

/// Hands out batches in step order from a prefetching background thread.
pub struct BatchLoader {
    batches: Receiver<Result<Batch, DataError>>,
    worker: Option<JoinHandle<()>>,
}

impl BatchLoader {
    /// Starts producing batches from `first_step` on, reading the data from
    /// `cursor` (the default cursor for a fresh run); fails at once when the
    /// shard cannot fill even one batch.
    #[allow(clippy::too_many_arguments)] // each is one independent knob of the pipeline
    pub fn spawn(
        source: ImageSource,
        sampler: ShardSampler,
        world: usize,
        batch_size: usize,
        image_size: u32,
        first_step: u64,
        cursor: DataCursor,
        prefetch: usize,
    ) -> Result<Self, DataError> {
        let steps_per_epoch = sampler.steps_per_epoch(batch_size) as u64;
        if steps_per_epoch == 0 {
            return Err(DataError::TooSmall {
                source_name: source.name(),
                images: source.len(),
                batch: batch_size,
                world,
            });
        }
        let mut assembler = Assembler {
            source,
            sampler,
            plan: StepPlan::new(sampler, batch_size, first_step, cursor),
            batch_size,
            image_size,
            shard: ((u64::MAX, 0), Vec::new()),
            unreadable: HashSet::new(),
        };
        let (tx, rx) = sync_channel(prefetch);
        let worker = std::thread::Builder::new()
            .name("batch-loader".into())
            .spawn(move || assembler.run(first_step, tx))
            .expect("spawning the batch loader thread");
        Ok(Self {
            batches: rx,
            worker: Some(worker),
        })
    }

    /// The next batch in step order.
    pub fn next_batch(&mut self) -> Result<Batch, DataError> {
        self.batches
            .recv()
            .expect("the batch loader thread stops only when the loader is dropped")
    }
}

impl Drop for BatchLoader {
    fn drop(&mut self) {
        // Closing the channel makes the producer's next send fail, which ends it.
        let (_, closed) = sync_channel(0);
        drop(std::mem::replace(&mut self.batches, closed));
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

struct Assembler {
    source: ImageSource,
    sampler: ShardSampler,
    plan: StepPlan,
    batch_size: usize,
    image_size: u32,
    shard: ((u64, usize), Vec<usize>),
    unreadable: HashSet<usize>,
}

impl Assembler {
    fn run(&mut self, first_step: u64, tx: SyncSender<Result<Batch, DataError>>) {
        for step in first_step.. {
            let batch = self.batch(step);
            let failed = batch.is_err();
            if tx.send(batch).is_err() || failed {
                return;
            }
        }
    }

    fn batch(&mut self, step: u64) -> Result<Batch, DataError> {
        let slice = self.plan.locate(step);
        let (epoch, start) = (slice.epoch, slice.offset);
        let key = (epoch, slice.shard_position);
        if self.shard.0 != key {
            self.shard = (key, self.sampler.shard_from(epoch, slice.shard_position));
        }
        let shard_len = self.shard.1.len();
        let mut candidates = (0..shard_len).map(|k| self.shard.1[(start + k) % shard_len]);
        let per_image = 3 * (self.image_size * self.image_size) as usize;
        let mut pixels = Vec::with_capacity(self.batch_size * per_image);
        let mut count = 0;
        while count < self.batch_size {
            let wanted: Vec<usize> = candidates
                .by_ref()
                .filter(|i| !self.unreadable.contains(i))
                .take(self.batch_size - count)
                .collect();
            if wanted.is_empty() {
                return Err(DataError::NothingReadable {
                    source_name: self.source.name(),
                    unreadable: self.unreadable.len(),
                });
            }
            for (index, decoded) in wanted.iter().zip(self.decode(&wanted)) {
                match decoded {
                    Ok(chw) => {
                        pixels.extend(chw);
                        count += 1;
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "skipping unreadable image");
                        self.unreadable.insert(*index);
                    }
                }
            }
        }
        Ok(Batch {
            step,
            epoch,
            cursor_after: self.plan.cursor_after(step),
            pixels,
            count,
            skipped: self.unreadable.len(),
        })
    }

    fn decode(&self, indices: &[usize]) -> Vec<Result<Vec<f32>, DataError>> {
        indices
            .par_iter()
            .map(|&i| {
                let image = self.source.load(i)?;
                let mut chw = Vec::with_capacity(3 * (self.image_size * self.image_size) as usize);
                preprocess::append_chw(&image, self.image_size, &mut chw);
                Ok(chw)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synthetic;
    use common::config::Split;

    fn loader(source: ImageSource, batch: usize, first_step: u64) -> BatchLoader {
        let sampler = ShardSampler::new(source.len(), 1, 0, 5);
        let mut from_zero = BatchLoader::spawn(
            source.clone(),
            sampler,
            1,
            batch,
            16,
            0,
            DataCursor::default(),
            2,
        )
        .unwrap();
        let mut cursor = DataCursor::default();
        for _ in 0..first_step {
            cursor = from_zero.next_batch().unwrap().cursor_after;
        }
        BatchLoader::spawn(source, sampler, 1, batch, 16, first_step, cursor, 2).unwrap()
    }

    #[test]
    fn batches_depend_only_on_the_step() {
        let source = ImageSource::synthetic(1, Split::Train, 40);
        let mut from_zero = loader(source.clone(), 8, 0);
        let batches: Vec<Batch> = (0..7).map(|_| from_zero.next_batch().unwrap()).collect();
        assert_eq!(batches[6].epoch, 1, "5 steps per epoch");
        let mut from_six = loader(source, 8, 6);
        assert_eq!(from_six.next_batch().unwrap().pixels, batches[6].pixels);
        assert_ne!(batches[0].pixels, batches[1].pixels);
    }

    #[test]
    fn corrupt_files_are_skipped_once_and_counted() {
        let root = tempfile::tempdir().unwrap();
        synthetic::write_celeba(root.path(), 12, 3).unwrap();
        let images = root.path().join(crate::data::celeba::CELEBA_IMAGES);
        std::fs::write(images.join("000002.jpg"), b"\xff\xd8 truncated").unwrap();
        let source = ImageSource::folder(root.path(), Split::All).unwrap();
        let mut batches = loader(source, 4, 0);
        let skipped: Vec<usize> = (0..6)
            .map(|_| batches.next_batch().unwrap())
            .map(|b| b.skipped)
            .collect();
        assert_eq!(*skipped.last().unwrap(), 1);
        assert!(skipped.iter().all(|&s| s <= 1));
    }

    #[test]
    fn an_unreadable_data_set_is_an_error_naming_it() {
        let root = tempfile::tempdir().unwrap();
        for i in 0..4 {
            std::fs::write(root.path().join(format!("{i}.jpg")), b"garbage").unwrap();
        }
        let source = ImageSource::folder(root.path(), Split::All).unwrap();
        let err = loader(source, 2, 0).next_batch().unwrap_err().to_string();
        assert!(
            err.contains("not enough readable images")
                && err.contains(&root.path().display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn a_shard_smaller_than_a_batch_is_refused_up_front() {
        let source = ImageSource::synthetic(1, Split::Train, 10);
        let sampler = ShardSampler::new(10, 2, 0, 0);
        let err = BatchLoader::spawn(source, sampler, 2, 8, 16, 0, DataCursor::default(), 1)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("too few for one batch of 8 on each of 2 workers"),
            "{err}"
        );
    }
}
