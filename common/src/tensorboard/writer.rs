//! One event file per writing process.
//!
//! Every process that writes (rank 0 of each generation, a standalone
//! worker, a process resumed from a checkpoint) opens a file of its own in
//! the run's folder and starts it with a restart marker at the step it
//! trains first. TensorBoard reads a folder's files in name order (their
//! names begin with the time) and drops, at a marker, what earlier files
//! hold for that step and later: a run that went back to a checkpoint or
//! a replica continues the same curves, and no step shows two values.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;

use super::event::{
    DT_STRING, Dim, Event, Image, Kind, PluginData, RGB, SESSION_START, SessionLog, Summary,
    SummaryMetadata, TensorProto, TensorShape, Value, What,
};
use super::record;

/// Why an event file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum TensorBoardError {
    /// The folder or the file could not be made.
    #[error(
        "cannot create the TensorBoard event file {}: {source} (set output.tensorboard = false \
         to train without one)",
        path.display()
    )]
    Create {
        /// The file.
        path: PathBuf,
        /// The system's reason.
        source: std::io::Error,
    },
    /// A record could not be written (a full disk, a lost volume).
    #[error(
        "cannot write to the TensorBoard event file {}: {source} (set output.tensorboard = false \
         to train without one)",
        path.display()
    )]
    Write {
        /// The file.
        path: PathBuf,
        /// The system's reason.
        source: std::io::Error,
    },
}

/// Appends events to one event file.
#[derive(Debug)]
pub struct EventWriter {
    file: File,
    path: PathBuf,
}

impl EventWriter {
    /// A new event file in `dir` (made if missing), starting with its
    /// version and a restart marker at `first_step`, the first step this
    /// process writes.
    pub fn create(dir: &Path, first_step: u64) -> Result<Self, TensorBoardError> {
        let path = dir.join(file_name());
        let created = std::fs::create_dir_all(dir)
            .and_then(|()| File::options().create_new(true).append(true).open(&path));
        let file = created.map_err(|source| TensorBoardError::Create {
            path: path.clone(),
            source,
        })?;
        let mut writer = Self { file, path };
        writer.write(0, What::FileVersion("brain.Event:2".into()))?;
        writer.write(
            first_step,
            What::SessionLog(SessionLog {
                status: SESSION_START,
            }),
        )?;
        Ok(writer)
    }

    /// The file written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Scalars of `step`, by tag.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f32)]) -> Result<(), TensorBoardError> {
        let value = values
            .iter()
            .map(|&(tag, v)| Value {
                tag: tag.into(),
                metadata: None,
                kind: Some(Kind::SimpleValue(v)),
            })
            .collect();
        self.write(step, What::Summary(Summary { value }))
    }

    /// A PNG image of `width` × `height` RGB pixels at `step`.
    pub fn png(
        &mut self,
        step: u64,
        tag: &str,
        png: Vec<u8>,
        (width, height): (u32, u32),
    ) -> Result<(), TensorBoardError> {
        let image = Image {
            height: height as i32,
            width: width as i32,
            colorspace: RGB,
            encoded_image_string: png,
        };
        self.summary(step, tag, None, Kind::Image(image))
    }

    /// `text` (Markdown) at `step`, for TensorBoard's Text tab.
    pub fn text(&mut self, step: u64, tag: &str, text: &str) -> Result<(), TensorBoardError> {
        let tensor = TensorProto {
            dtype: DT_STRING,
            tensor_shape: Some(TensorShape {
                dim: vec![Dim { size: 1 }],
            }),
            string_val: vec![text.as_bytes().to_vec()],
        };
        let text_plugin = SummaryMetadata {
            plugin_data: Some(PluginData {
                plugin_name: "text".into(),
                content: Vec::new(),
            }),
        };
        self.summary(step, tag, Some(text_plugin), Kind::Tensor(tensor))
    }

    fn summary(
        &mut self,
        step: u64,
        tag: &str,
        metadata: Option<SummaryMetadata>,
        kind: Kind,
    ) -> Result<(), TensorBoardError> {
        let value = vec![Value {
            tag: tag.into(),
            metadata,
            kind: Some(kind),
        }];
        self.write(step, What::Summary(Summary { value }))
    }

    /// Writes one event as one whole record, straight to the file: a
    /// process that dies leaves every earlier record readable.
    fn write(&mut self, step: u64, what: What) -> Result<(), TensorBoardError> {
        let wall_time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let event = Event {
            wall_time,
            step: step as i64,
            what: Some(what),
        };
        self.file
            .write_all(&record::frame(&event.encode_to_vec()))
            .map_err(|source| TensorBoardError::Write {
                path: self.path.clone(),
                source,
            })
    }
}

/// TensorBoard's naming, `events.out.tfevents.<seconds>.<host>.<pid>.<n>`:
/// readers find files by `tfevents` and read them in name order, which the
/// leading time makes the order they were written in.
fn file_name() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static OPENED: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let host: String = std::env::var("HOSTNAME")
        .unwrap_or_else(|_| "localhost".into())
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        .take(64)
        .collect();
    let n = OPENED.fetch_add(1, Ordering::Relaxed);
    format!(
        "events.out.tfevents.{now:010}.{host}.{}.{n}",
        std::process::id()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensorboard::record::whole_records;

    fn events(path: &Path) -> Vec<Event> {
        let bytes = std::fs::read(path).unwrap();
        whole_records(&bytes)
            .into_iter()
            .map(|r| Event::decode(r).expect("an Event"))
            .collect()
    }

    #[test]
    fn a_file_starts_with_its_version_and_a_restart_marker_then_holds_what_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = EventWriter::create(&dir.path().join("run"), 40).unwrap();
        writer
            .scalars(40, &[("loss/discriminator", 1.25), ("loss/generator", 0.5)])
            .unwrap();
        writer
            .png(41, "samples", vec![0x89, b'P'], (10, 12))
            .unwrap();
        writer.text(40, "config", "seed = 1").unwrap();
        let name = writer
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        let events = events(writer.path());
        assert_eq!(events.len(), 5);
        assert_eq!(
            events[0].what,
            Some(What::FileVersion("brain.Event:2".into()))
        );
        assert_eq!(
            (events[1].step, &events[1].what),
            (40, &Some(What::SessionLog(SessionLog { status: 1 })))
        );
        let Some(What::Summary(scalars)) = &events[2].what else {
            panic!("a summary, got {:?}", events[2]);
        };
        assert_eq!(scalars.value[1].tag, "loss/generator");
        assert_eq!(scalars.value[1].kind, Some(Kind::SimpleValue(0.5)));
        let Some(What::Summary(image)) = &events[3].what else {
            panic!("an image, got {:?}", events[3]);
        };
        assert!(matches!(&image.value[0].kind,
            Some(Kind::Image(i)) if (i.width, i.height, i.colorspace) == (10, 12, 3)));
        assert_eq!(events[3].step, 41);
    }

    #[test]
    fn two_writers_in_one_folder_never_share_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let a = EventWriter::create(dir.path(), 0).unwrap();
        let b = EventWriter::create(dir.path(), 0).unwrap();
        assert_ne!(a.path(), b.path());
    }

    #[test]
    fn a_folder_that_cannot_be_made_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("a-file");
        std::fs::write(&blocker, b"").unwrap();
        let err = EventWriter::create(&blocker.join("run"), 0).unwrap_err();
        assert!(err.to_string().contains("a-file"), "{err}");
        assert!(err.to_string().contains("output.tensorboard"), "{err}");
    }
}
