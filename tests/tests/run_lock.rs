//! One coordinator per run: a second one with the same output folder, or
//! the same store and run id, is refused naming the holder; a dead
//! holder's lease can be broken; a holder whose lease is broken stops.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use gancluster_tests::moto::{BUCKET, Moto};
use gancluster_tests::signals::kill9;
use gancluster_tests::{Running, TINY, run, wait_until, workspace_bin};

const LIMIT: Duration = Duration::from_secs(60);

/// A coordinator waiting for 2 external workers (which never come), with
/// its output in `out` and its store at `store`.
fn waiting(out: &Path, store: &str) -> Command {
    let mut cmd = Command::new(workspace_bin("coordinator"));
    cmd.args([
        "--external",
        "--workers",
        "2",
        "--steps",
        "3",
        "--listen",
        "127.0.0.1:0",
    ])
    .args(TINY)
    .arg("--out")
    .arg(out)
    .args(["--store", store, "--run", "locked"])
    .env("GANCLUSTER_TOKEN", "lock-test-token")
    .env("GANCLUSTER__CHECKPOINT__LEASE_S", "3")
    .env_remove("RUST_LOG");
    cmd
}

/// A coordinator holding run `locked` of `store` on moto, serving, with
/// its output in `dir`/a.
fn s3_holder(moto: &Moto, dir: &Path, store: &str) -> Running {
    let first = Running::spawn(waiting(&dir.join("a"), store).envs(moto.env()));
    serving(&dir.join("a"));
    first
}

/// Blocks until the coordinator in `out` is serving (it holds its locks then).
fn serving(out: &Path) {
    let address = out.join("coordinator.addr");
    wait_until(LIMIT, "the first coordinator never started", || {
        address.exists().then_some(())
    });
}

#[test]
fn a_second_coordinator_on_the_same_output_folder_is_refused() {
    let out = tempfile::tempdir().unwrap();
    let first_store = format!("file://{}", out.path().join("a").display());
    let first = Running::spawn(&mut waiting(out.path(), &first_store));
    serving(out.path());
    let second_store = format!("file://{}", out.path().join("b").display());
    let done = run(&mut waiting(out.path(), &second_store), LIMIT).assert_failure();
    done.assert_says(&[
        "is in use by the coordinator with pid",
        &first.id().to_string(),
        "--out",
    ]);
}

#[test]
fn a_second_coordinator_on_the_same_folder_store_run_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file://{}", dir.path().join("store").display());
    let _first = Running::spawn(&mut waiting(&dir.path().join("a"), &store));
    serving(&dir.path().join("a"));
    let done = run(&mut waiting(&dir.path().join("b"), &store), LIMIT).assert_failure();
    done.assert_says(&[
        "run `locked`",
        "is in use by the coordinator with pid",
        "--break-lease",
    ]);
}

/// On S3 (moto, whose conditional PUT is atomic): the second coordinator is
/// refused naming the first; `--break-lease` takes the run over, and the
/// first finds out at its next renewal and stops without writing more.
#[test]
fn an_s3_run_is_leased_and_a_broken_lease_stops_its_holder() {
    let (moto, dir) = (Moto::start(), tempfile::tempdir().unwrap());
    let store = format!("s3://{BUCKET}/runs");
    let first = s3_holder(&moto, dir.path(), &store);
    let refused = run(
        waiting(&dir.path().join("b"), &store).envs(moto.env()),
        LIMIT,
    )
    .assert_failure();
    refused.assert_says(&[
        "run `locked` in s3://leases/runs",
        &format!("is in use by the coordinator with pid {}", first.id()),
        "--break-lease",
    ]);
    let breaker = Running::spawn(
        waiting(&dir.path().join("c"), &store)
            .envs(moto.env())
            .arg("--break-lease"),
    );
    let stopped = first.wait(LIMIT).assert_failure();
    stopped.assert_says(&[
        "stopped without writing anything more",
        "another coordinator took over the lease",
    ]);
    breaker.terminate();
    let took = breaker.wait(LIMIT);
    took.assert_says(&["took over the lease on run `locked`"]);
}

/// A coordinator killed with SIGKILL (a pod on a lost node) leaves its S3
/// lease behind; the one started in its place (the Job's next pod, no
/// --break-lease) waits for it to lapse and takes the run over.
#[test]
fn a_killed_holders_s3_lease_is_taken_over_once_it_lapses() {
    let (moto, dir) = (Moto::start(), tempfile::tempdir().unwrap());
    let store = format!("s3://{BUCKET}/runs");
    let first = s3_holder(&moto, dir.path(), &store);
    kill9(first.id());
    first.wait(LIMIT).assert_failure();
    let second = Running::spawn(waiting(&dir.path().join("b"), &store).envs(moto.env()));
    serving(&dir.path().join("b"));
    second.terminate();
    second.wait(LIMIT).assert_says(&[
        "waiting for the lease to lapse",
        "took over the lease on run `locked`",
    ]);
}
