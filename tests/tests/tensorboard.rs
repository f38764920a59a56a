//! TensorBoard event files from real multi-process runs, read back with
//! TensorBoard's own reader (its `EventAccumulator`, from PyPI): tags,
//! steps, values equal to `losses.csv`, the sample grid as PNG, the
//! configuration as text; after a resume from an earlier checkpoint the
//! curves continue with no step twice; a torn file reads up to its last
//! whole record.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use gancluster_tests::python::tool_path;
use gancluster_tests::{run, tiny_coordinator};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(300);

/// The TensorBoard release the tests read with.
const TENSORBOARD: &str = "tensorboard==2.21.0";

/// The tiny model's grid: 8 × 8 cells of 16 pixels with 2-pixel gaps.
const GRID: u64 = 8 * (16 + 2) + 2;

const CURVES: [&str; 4] = [
    "loss/discriminator",
    "loss/generator",
    "discriminator/real",
    "discriminator/fake",
];

/// `coordinator --workers 2` training run `tb` to `steps` steps, logging
/// every `log_every` steps, checkpointing every `every` into `store`.
fn coordinator(steps: u64, every: u64, log_every: u64, out: &Path, store: &Path) -> Command {
    let mut cmd = tiny_coordinator(2, steps, out);
    cmd.args(["--run", "tb", "--checkpoint-every", &every.to_string()])
        .arg("--store")
        .arg(format!("file://{}", store.display()))
        .env("GANCLUSTER__TRAIN__LOG_EVERY", log_every.to_string());
    cmd
}

fn run_folder(out: &Path) -> PathBuf {
    out.join("tensorboard").join("tb")
}

/// What TensorBoard's reader finds in `folder`.
fn read(folder: &Path) -> Value {
    let tools = tool_path("tensorboard", "tensorboard", TENSORBOARD);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/read_tensorboard.py");
    let output = Command::new("python3")
        .arg(&script)
        .arg(folder)
        .env("PYTHONPATH", &tools)
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "TensorBoard's reader failed on {}:\n{}",
        folder.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("the reader prints JSON")
}

/// `(step, value)` of a scalar tag, in the order TensorBoard keeps them.
fn scalars(board: &Value, tag: &str) -> Vec<(u64, f64)> {
    let points = board["scalars"][tag]
        .as_array()
        .unwrap_or_else(|| panic!("no scalar {tag} in {}", board["scalars"]));
    points
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap()))
        .collect()
}

/// `losses.csv` by step: the columns of [`CURVES`].
fn losses(out: &Path) -> BTreeMap<u64, [f32; 4]> {
    let csv = std::fs::read_to_string(out.join("losses.csv")).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let at = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let columns = [at("d_loss"), at("g_loss"), at("d_real"), at("d_fake")];
    lines
        .map(|line| {
            let cells: Vec<&str> = line.split(',').collect();
            let step = cells[at("step")].parse().unwrap();
            (step, columns.map(|c| cells[c].parse::<f32>().unwrap()))
        })
        .collect()
}

/// Every curve has exactly `steps`, once each, with `losses.csv`'s values.
fn assert_curves_match_the_loss_log(board: &Value, out: &Path, steps: &[u64]) {
    let log = losses(out);
    for (i, tag) in CURVES.iter().enumerate() {
        let points = scalars(board, tag);
        let seen: Vec<u64> = points.iter().map(|p| p.0).collect();
        assert_eq!(seen, steps, "{tag}'s steps");
        for (step, value) in points {
            assert_eq!(
                value as f32, log[&step][i],
                "{tag} at step {step}: TensorBoard has {value}, losses.csv {}",
                log[&step][i]
            );
        }
    }
}

/// The sample grid's steps; each image is a PNG of the grid's size.
fn grids(board: &Value) -> Vec<u64> {
    let images = board["images"]["samples"]
        .as_array()
        .unwrap_or_else(|| panic!("no sample grid in {}", board["images"]));
    images
        .iter()
        .map(|image| {
            let (step, width, height) = (
                image[0].as_u64().unwrap(),
                image[1].as_u64().unwrap(),
                image[2].as_u64().unwrap(),
            );
            let png = hex(image[3].as_str().unwrap());
            assert_eq!(
                &png[..8],
                b"\x89PNG\r\n\x1a\n",
                "step {step}'s image is not a PNG"
            );
            let ihdr = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().unwrap()) as u64;
            assert_eq!((ihdr(16), ihdr(20)), (GRID, GRID), "step {step}'s PNG size");
            assert_eq!((width, height), (GRID, GRID), "step {step}'s stated size");
            step
        })
        .collect()
}

fn hex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

fn event_files(folder: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(folder)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("tfevents"))
        .collect();
    files.sort();
    files
}

#[test]
fn a_two_worker_run_shows_its_curves_grids_and_configuration_in_tensorboard() {
    let (out, store) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    run(&mut coordinator(8, 4, 2, out.path(), store.path()), LIMIT).assert_success();
    let board = read(&run_folder(out.path()));
    // Every train.log_every = 2 steps: after steps 2, 4, 6, 8 (0-based 1, 3, 5, 7).
    assert_curves_match_the_loss_log(&board, out.path(), &[1, 3, 5, 7]);
    // The coordinator numbers generations from 1.
    for (tag, expected) in [("group/workers", 2.0), ("group/generation", 1.0)] {
        assert!(
            scalars(&board, tag).iter().all(|p| p.1 == expected),
            "{tag}: {:?}",
            scalars(&board, tag)
        );
    }
    for tag in ["speed/images_per_s", "speed/allreduce_wait_ms"] {
        assert!(
            scalars(&board, tag)
                .iter()
                .all(|p| p.1.is_finite() && p.1 > 0.0),
            "{tag}: {:?}",
            scalars(&board, tag)
        );
    }
    // At the checkpoint after 4 steps and at the end (its checkpoint and
    // the final grid are the same picture, shown once).
    assert_eq!(grids(&board), [3, 7]);
    let config = &board["text"]["config"][0];
    assert_eq!(
        config[0], 0,
        "the configuration is written at the first step"
    );
    assert!(
        config[1].as_str().unwrap().contains("batch_size = 8"),
        "{config}"
    );
}

#[test]
fn a_run_resumed_from_an_earlier_checkpoint_continues_its_curves_with_no_step_twice() {
    let (out, store) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    run(&mut coordinator(6, 3, 1, out.path(), store.path()), LIMIT).assert_success();
    let folder = run_folder(out.path());
    let first = read(&folder);
    assert_curves_match_the_loss_log(&first, out.path(), &[0, 1, 2, 3, 4, 5]);
    assert_eq!(grids(&first), [2, 5]);

    // A crash mid-record: TensorBoard reads the file up to its last whole
    // record (the final grid), and nothing of the torn one.
    let torn = tempfile::tempdir().unwrap();
    let [file] = &event_files(&folder)[..] else {
        panic!("one event file after one run: {:?}", event_files(&folder));
    };
    let bytes = std::fs::read(file).unwrap();
    std::fs::write(
        torn.path().join(file.file_name().unwrap()),
        &bytes[..bytes.len() - 7],
    )
    .unwrap();
    let torn = read(torn.path());
    assert_eq!(grids(&torn), [2], "the torn grid is left out");
    assert_eq!(
        scalars(&torn, CURVES[0]).len(),
        6,
        "every whole record is read"
    );

    // Back to the checkpoint after 3 steps, on to 8: steps 3..5 are trained
    // again, and TensorBoard shows each step once.
    let mut resume = coordinator(8, 3, 1, out.path(), store.path());
    resume.args(["--resume-from", "3"]);
    run(&mut resume, LIMIT).assert_success();
    assert_eq!(
        event_files(&folder).len(),
        2,
        "one event file per writing process"
    );
    let board = read(&folder);
    assert_curves_match_the_loss_log(&board, out.path(), &[0, 1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(grids(&board), [2, 5, 7]);
    let configs: Vec<u64> = board["text"]["config"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c[0].as_u64().unwrap())
        .collect();
    assert_eq!(
        configs,
        [0, 3],
        "each process writes the configuration it ran with"
    );
}
