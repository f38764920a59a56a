//! The prepared GPU check, rehearsed on this machine's CPU build at tiny
//! sizes (`scripts/gpu-check.sh --cpu`): the script a lent device runs must
//! be known to work before any device time is spent on it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use gancluster_tests::{run, workspace_bin};

#[test]
fn the_gpu_check_runs_end_to_end_on_the_cpu_build() {
    let bin = tempfile::tempdir().unwrap();
    // The layout gpu-build.sh makes in .gpu/, with this build's binaries.
    for (dir, name) in [("bin", "coordinator"), ("bin", "worker"), ("cpu", "worker")] {
        std::fs::create_dir_all(bin.path().join(dir)).unwrap();
        std::os::unix::fs::symlink(workspace_bin(name), bin.path().join(dir).join(name)).unwrap();
    }
    let out = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/gpu-check.sh");
    let done = run(
        Command::new("bash")
            .arg(script)
            .arg("--cpu")
            .env("OUT", out.path())
            .env("GPU_BIN", bin.path())
            .env_remove("GANCLUSTER_FAULT"),
        Duration::from_secs(300),
    )
    .assert_success();
    let table = std::fs::read_to_string(out.path().join("table.md")).unwrap();
    assert!(
        done.stdout.ends_with(&table),
        "the table is printed last:\n{}",
        done.stdout
    );
    for row in [
        "| step 16px nf8 batch 8: gancluster | ",
        "img/s",
        "| backend check (cpu vs CPU",
        "verdict=PASS",
        "bitwise=true",
        "| coordinator --workers 1 ",
        "| coordinator --workers 4 ",
        "all-reduce",
        "| standalone ",
    ] {
        assert!(
            table.contains(row),
            "{row} missing from the table:\n{table}"
        );
    }
    assert!(!table.contains("FAILED"), "{table}");
    let files: Vec<_> = std::fs::read_dir(out.path()).unwrap().collect();
    assert!(files.len() <= 8, "{} files under $OUT", files.len());
    for name in [
        "samples.png",
        "samples-workers4.png",
        "losses.csv",
        "gpu-check.log",
        "results.txt",
    ] {
        assert!(out.path().join(name).is_file(), "{name} missing");
    }
}
