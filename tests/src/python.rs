//! Python tools the tests run (moto's S3 server, TensorBoard's reader),
//! pinned, and installed from PyPI into `target/test-tools/<name>` by the
//! first test that needs one when `python3` cannot import it already, so
//! `cargo test --workspace` needs no manual step beyond a `python3` with pip.

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// A folder on `PYTHONPATH` from which `python3` imports `module`,
/// installing `requirement` there first when it cannot; panics saying
/// what is missing when that fails.
pub fn tool_path(name: &str, module: &str, requirement: &str) -> PathBuf {
    let bin = crate::workspace_bin("coordinator");
    let target = bin
        .parent()
        .and_then(std::path::Path::parent)
        .expect("target/<profile>/");
    let dir = target.join("test-tools").join(name);
    let importable = || {
        Command::new("python3")
            .args(["-c", &format!("import {module}")])
            .env("PYTHONPATH", &dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !importable() {
        let installed = Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--target",
            ])
            .arg(&dir)
            .arg(requirement)
            .status();
        assert!(
            installed.is_ok_and(|s| s.success()) && importable(),
            "{name} is needed and could not be installed: needs python3 with pip and PyPI \
             (`python3 -m pip install --target {} '{requirement}'`)",
            dir.display()
        );
    }
    dir
}
