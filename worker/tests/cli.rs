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

/// A tiny PNG of 1,000,000 × 1 pixels passes the decoder's size limit but
/// would make a 64-pixel resize allocate gigabytes: it is refused from its
/// header and skipped like any unreadable image, and so is a JPEG cut short.
#[test]
fn extreme_shapes_and_truncated_jpegs_are_refused_before_allocation() {
    let data = celeba(40);
    let images = data.path().join("img_align_celeba");
    let strip = image::GrayImage::new(1_000_000, 1);
    strip.save(images.join("000001.png")).unwrap();
    let whole = std::fs::read(images.join("000002.jpg")).unwrap();
    std::fs::write(images.join("000002.jpg"), &whole[..whole.len() / 2]).unwrap();
    let out = tempfile::tempdir().unwrap();
    let done = train(data.path(), out.path(), 4, &["--split", "all"]);
    let done = done.assert_success();
    assert!(
        done.stderr.contains("000001.png") && done.stderr.contains("1000000×1 pixels: at most 4:1"),
        "{}",
        done.stderr
    );
    assert!(
        done.stderr.contains("000002.jpg") && done.stderr.contains("truncated JPEG"),
        "{}",
        done.stderr
    );
}

/// A partition file that names files the folder does not have says so,
/// instead of "no images in"; a UTF-8 byte-order mark does not hide the
/// first entry.
#[test]
fn partition_files_naming_missing_images_or_starting_with_a_bom_are_read_right() {
    let data = celeba(20);
    let partition = data.path().join("list_eval_partition.txt");
    std::fs::write(&partition, "nope-1.jpg 0\nnope-2.jpg 0\n").unwrap();
    let out = tempfile::tempdir().unwrap();
    let done = train(data.path(), out.path(), 1, &["--split", "train"]).assert_failure();
    assert!(
        done.stderr
            .contains("lists 2 images for data.split = train, but none of them is in")
            && done.stderr.contains("nope-"),
        "{}",
        done.stderr
    );
    // Exactly one batch of 8: losing the first name to the mark leaves too few.
    let names: Vec<String> = (1..=8).map(|i| format!("{i:06}.jpg 0")).collect();
    std::fs::write(&partition, format!("\u{feff}{}\n", names.join("\n"))).unwrap();
    train(data.path(), out.path(), 1, &["--split", "train"]).assert_success();
}

/// `--eval-images` against a split that is missing is refused before the
/// first step, not discovered after training.
#[test]
fn eval_images_against_a_missing_split_fail_before_training() {
    let data = celeba(20);
    std::fs::remove_file(data.path().join("list_eval_partition.txt")).unwrap();
    let out = tempfile::tempdir().unwrap();
    let done = train(
        data.path(),
        out.path(),
        50,
        &["--split", "all", "--eval-images", "8"],
    );
    let done = done.assert_failure();
    assert!(
        done.stderr
            .contains("checking the held-out split for --eval-images")
            && done.stderr.contains("list_eval_partition.txt"),
        "{}",
        done.stderr
    );
    let rows = std::fs::read_to_string(out.path().join("losses.csv")).unwrap_or_default();
    assert!(rows.lines().count() <= 1, "it trained first:\n{rows}");
}

/// `worker swd` skips an unreadable image as training does.
#[test]
fn swd_skips_unreadable_images() {
    let (a, b) = (celeba(12), celeba(12));
    std::fs::write(a.path().join("img_align_celeba/000003.jpg"), b"garbage").unwrap();
    let done = run(
        worker()
            .args(["swd", "--image-size", "16", "--count", "8"])
            .arg(a.path())
            .arg(b.path()),
        LIMIT,
    )
    .assert_success();
    assert!(
        done.stdout.contains("mean") && done.stderr.contains("000003.jpg"),
        "{}",
        done.stderr
    );
}

/// Checkpoint flags do nothing in standalone training: refused, not ignored.
/// The error is said once, and the exit status says running again will not
/// help (78, sysexits' EX_CONFIG).
#[test]
fn standalone_refuses_checkpoint_flags_once_with_the_config_status() {
    let data = celeba(20);
    let out = tempfile::tempdir().unwrap();
    let done = train(data.path(), out.path(), 2, &["--store", "s3://bucket/runs"]).assert_failure();
    assert_eq!(done.status.code(), Some(78), "{}", done.stderr);
    assert_eq!(
        done.stderr
            .matches("has no effect with --standalone")
            .count(),
        1,
        "{}",
        done.stderr
    );
}

/// Out-of-range flags are refused by the parser, before anything allocates.
#[test]
fn sizes_out_of_range_are_refused_at_the_flag() {
    for args in [
        vec!["swd", "--image-size", "65536", "a", "b"],
        vec!["synth", "--out", "x", "--count", "1000000000000"],
    ] {
        let done = run(worker().args(&args), LIMIT).assert_failure();
        assert!(done.stderr.contains("not in"), "{args:?}: {}", done.stderr);
    }
}
