//! The `worker` binary as a user runs it: real JPEG files on disk, real
//! processes, output checked on disk.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use gancluster_tests::{Finished, run};

const LIMIT: Duration = Duration::from_secs(120);

fn worker() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_worker"));
    cmd.env_remove("RUST_LOG");
    cmd
}

/// A CelebA-layout folder of `count` synthetic JPEGs.
fn celeba(count: usize) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    run(
        worker()
            .args(["synth", "--count", &count.to_string(), "--out"])
            .arg(root.path()),
        LIMIT,
    )
    .assert_success();
    root
}

/// Standalone training at a tiny config on `data`, writing to `out`.
fn train(data: &Path, out: &Path, steps: u32, extra: &[&str]) -> Finished {
    let mut cmd = worker();
    cmd.args(["train", "--standalone", "--steps", &steps.to_string()])
        .args(["--image-size", "16", "--ngf", "8", "--ndf", "8"])
        .args(["--batch-size", "8", "--data"])
        .arg(data)
        .arg("--out")
        .arg(out)
        .args(extra);
    run(&mut cmd, LIMIT)
}

fn loss_columns(csv: &Path) -> Vec<String> {
    std::fs::read_to_string(csv)
        .unwrap()
        .lines()
        .map(|l| l.rsplit_once(',').unwrap().0.to_string()) // drop images_per_s
        .collect()
}

#[test]
fn standalone_training_on_jpegs_writes_grid_losses_and_config() {
    let data = celeba(40);
    let out = tempfile::tempdir().unwrap();
    train(data.path(), out.path(), 3, &[]).assert_success();
    let grid = image::open(out.path().join("samples.png")).unwrap();
    assert_eq!(
        (grid.width(), grid.height()),
        (8 * 18 + 2, 8 * 18 + 2),
        "8×8 grid of 16 px images"
    );
    let losses = loss_columns(&out.path().join("losses.csv"));
    assert_eq!(losses.len(), 4, "header and one row per step: {losses:?}");
    let config = std::fs::read_to_string(out.path().join("config.toml")).unwrap();
    assert!(
        config.contains("image_size = 16") && config.contains("batch_size = 8"),
        "{config}"
    );
}

#[test]
fn same_seed_gives_identical_losses_across_processes() {
    let data = celeba(40);
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    train(data.path(), a.path(), 3, &["--seed", "9"]).assert_success();
    train(data.path(), b.path(), 3, &["--seed", "9"]).assert_success();
    let first = loss_columns(&a.path().join("losses.csv"));
    assert_eq!(first, loss_columns(&b.path().join("losses.csv")));
    let c = tempfile::tempdir().unwrap();
    train(data.path(), c.path(), 3, &["--seed", "10"]).assert_success();
    assert_ne!(first, loss_columns(&c.path().join("losses.csv")));
}

#[test]
fn a_corrupt_image_is_skipped_and_reported_with_its_path() {
    let data = celeba(40);
    let bad = data.path().join("img_align_celeba").join("000001.jpg");
    std::fs::write(&bad, b"\xff\xd8\xff\xe0 not really a jpeg").unwrap();
    let out = tempfile::tempdir().unwrap();
    let done = train(data.path(), out.path(), 5, &["--split", "all"]).assert_success();
    assert!(
        done.stderr.contains("skipping unreadable image") && done.stderr.contains("000001.jpg"),
        "{}",
        done.stderr
    );
    assert_eq!(
        done.stderr.matches("000001.jpg").count(),
        1,
        "reported once: {}",
        done.stderr
    );
    assert!(done.stderr.contains("skipped=1"), "{}", done.stderr);
}

#[test]
fn a_folder_without_images_is_an_error_naming_it() {
    let empty = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let done = train(empty.path(), out.path(), 3, &["--split", "all"]).assert_failure();
    assert!(
        done.stderr.contains("no images in")
            && done.stderr.contains(&empty.path().display().to_string()),
        "{}",
        done.stderr
    );
}

#[test]
fn a_mistyped_config_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("run.toml");
    std::fs::write(&file, "[train]\nstpes = 3\n").unwrap();
    let done = run(
        worker()
            .args(["train", "--standalone", "--print-config", "--config"])
            .arg(&file),
        LIMIT,
    )
    .assert_failure();
    assert!(done.stderr.contains("stpes"), "{}", done.stderr);
}

#[test]
fn print_config_shows_file_env_and_flag_layers() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("run.toml");
    std::fs::write(&file, "[train]\nsteps = 3\nseed = 5\n[model]\nngf = 32\n").unwrap();
    let done = run(
        worker()
            .args([
                "train",
                "--standalone",
                "--print-config",
                "--seed",
                "6",
                "--config",
            ])
            .arg(&file)
            .env("GANCLUSTER__MODEL__NGF", "24"),
        LIMIT,
    )
    .assert_success();
    for expected in ["steps = 3", "seed = 6", "ngf = 24"] {
        assert!(
            done.stdout.contains(expected),
            "{expected} missing from:\n{}",
            done.stdout
        );
    }
}

#[test]
fn swd_command_compares_two_folders() {
    let (a, b) = (celeba(12), celeba(12));
    let done = run(
        worker()
            .args(["swd", "--image-size", "32", "--count", "8"])
            .arg(a.path())
            .arg(b.path()),
        LIMIT,
    )
    .assert_success();
    assert!(
        done.stdout.contains("32px")
            && done.stdout.contains("16px")
            && done.stdout.contains("mean"),
        "{}",
        done.stdout
    );
}
