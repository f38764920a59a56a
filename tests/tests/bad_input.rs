//! The coordinator against a user's mistakes: a worker's data error, odd
//! output paths, a misconfigured store, a mistyped configuration file, a
//! run that is already done. Each failure says what is wrong and the exit
//! status tells a supervisor whether running again can help.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use gancluster_tests::s3::{BUCKET, S3Server};
use gancluster_tests::{Running, run, tiny_coordinator, wait_for_steps};

const LIMIT: Duration = Duration::from_secs(120);

fn local(workers: usize, steps: u64, out: &Path) -> Command {
    let mut cmd = tiny_coordinator(workers, steps, out);
    cmd.arg("--store")
        .arg(format!("file://{}", out.join("store").display()));
    cmd
}

/// A worker that cannot read its data tells the coordinator why over its
/// session: the run ends at once (no restart can fix it) with the worker's
/// own message and rank, and the configuration status 78.
#[test]
fn a_workers_data_error_ends_the_run_in_its_own_words_without_restarts() {
    let out = tempfile::tempdir().unwrap();
    let faces = out.path().join("faces");
    run(
        Command::new(gancluster_tests::workspace_bin("worker"))
            .args(["synth", "--count", "30", "--out"])
            .arg(&faces),
        LIMIT,
    )
    .assert_success();
    std::fs::remove_file(faces.join("list_eval_partition.txt")).unwrap();
    let done = run(
        local(2, 5, out.path())
            .arg("--data")
            .arg(&faces)
            .args(["--split", "val"]),
        LIMIT,
    )
    .assert_failure();
    assert_eq!(done.status.code(), Some(78), "{}", done.stderr);
    done.assert_says(&[
        "failed: \"data.split = val needs",
        "list_eval_partition.txt",
    ]);
    assert!(done.stderr.contains("worker rank 0") || done.stderr.contains("worker rank 1"));
    assert!(
        !done.stderr.contains("starting it again"),
        "restarted:\n{}",
        done.stderr
    );
}

/// An output folder too long for a Unix socket path still trains (the
/// socket goes to a short private folder), and an output path that cannot
/// be a folder is named as output.dir, not blamed on coordinator.listen.
#[test]
fn long_and_impossible_output_paths_are_handled_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let long = dir
        .path()
        .join("a-very-long-folder-name-for-a-run".repeat(4));
    assert!(long.as_os_str().len() > 120);
    run(&mut local(1, 2, &long), LIMIT).assert_success();
    let file = dir.path().join("not-a-folder");
    std::fs::write(&file, "x").unwrap();
    let done = run(&mut local(1, 2, &file.join("out")), LIMIT).assert_failure();
    assert!(
        done.stderr.contains("output folder") || done.stderr.contains("output.dir"),
        "{}",
        done.stderr
    );
    assert!(
        !done.stderr.contains("coordinator.listen"),
        "{}",
        done.stderr
    );
}

/// A store on a closed port fails in seconds saying "connection refused"
/// (it used to retry for minutes); https:// to a plain-HTTP server says TLS.
#[test]
fn a_misconfigured_store_fails_fast_and_says_why() {
    let out = tempfile::tempdir().unwrap();
    let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let plain_port = plain.local_addr().unwrap().port();
    let closed_port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    // Something that accepts and speaks no TLS, like a plain-HTTP server.
    std::thread::spawn(move || {
        for stream in plain.incoming() {
            let Ok(mut stream) = stream else { break };
            let _ = std::io::Write::write_all(&mut stream, b"HTTP/1.1 400 Bad Request\r\n\r\n");
        }
    });
    for (endpoint, allow_http, says) in [
        (
            format!("http://127.0.0.1:{closed_port}"),
            "true",
            "connection refused",
        ),
        (
            format!("https://127.0.0.1:{plain_port}"),
            "false",
            "TLS handshake failed",
        ),
    ] {
        let done = run(
            tiny_coordinator(1, 3, out.path())
                .args(["--store", "s3://bucket/runs"])
                .env("GANCLUSTER__CHECKPOINT__S3__ENDPOINT", &endpoint)
                .env("GANCLUSTER__CHECKPOINT__S3__ALLOW_HTTP", allow_http)
                .env("GANCLUSTER__CHECKPOINT__S3__ACCESS_KEY_ID", "key")
                .env(
                    "GANCLUSTER__CHECKPOINT__S3__SECRET_ACCESS_KEY",
                    "secret-key-value",
                ),
            Duration::from_secs(60),
        )
        .assert_failure();
        done.assert_says(&[says, &endpoint]);
    }
}

/// When the bucket vanishes mid-run, the final message does not send the
/// user to a checkpoint that no longer exists.
#[test]
fn a_vanished_bucket_is_not_named_as_where_to_resume() {
    let server = S3Server::start();
    let out = tempfile::tempdir().unwrap();
    let running = Running::spawn(
        tiny_coordinator(1, 100_000, out.path())
            .args([
                "--store",
                &format!("s3://{BUCKET}/runs"),
                "--checkpoint-every",
                "2",
            ])
            .env("GANCLUSTER__COORDINATOR__MAX_RESTARTS", "0")
            .env("GANCLUSTER__CHECKPOINT__S3__MAX_RETRIES", "1")
            .envs(server.env()),
    );
    wait_for_steps(out.path(), 5);
    // The bucket goes (moved away in one step, while the server may be
    // writing into it), and a file takes its place so nothing can be written.
    let bucket = server.object_path("");
    let bucket = Path::new(bucket.to_str().unwrap().trim_end_matches('/'));
    std::fs::rename(bucket, bucket.with_extension("deleted")).unwrap();
    std::fs::write(bucket, "gone").unwrap();
    running.terminate();
    let done = running.wait(LIMIT).assert_failure();
    done.assert_says(&[
        "could not be saved",
        "the newest committed checkpoint is none that can still be read",
    ]);
}

/// A value of the wrong type in the file is an error naming the key and
/// the file (not rounded), with the configuration exit status.
#[test]
fn a_mistyped_value_in_the_file_names_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("run.toml");
    std::fs::write(&file, "[train]\nsteps = 1.5\n").unwrap();
    let done = run(
        Command::new(gancluster_tests::workspace_bin("coordinator"))
            .arg("--config")
            .arg(&file),
        LIMIT,
    )
    .assert_failure();
    assert_eq!(done.status.code(), Some(78), "{}", done.stderr);
    done.assert_says(&[
        "`train.steps`",
        &file.display().to_string(),
        "invalid type: floating point",
    ]);
}

/// Starting a run that is already complete does nothing, says so, and
/// succeeds: a Kubernetes Job restarted after success stays successful.
#[test]
fn rerunning_a_finished_run_succeeds_and_says_it_is_complete() {
    let out = tempfile::tempdir().unwrap();
    run(&mut local(1, 2, out.path()), LIMIT).assert_success();
    let again = run(&mut local(1, 2, out.path()), LIMIT).assert_success();
    again.assert_says(&["the run is already complete"]);
}
