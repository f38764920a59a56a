//! Checkpoints on a real S3 server over HTTP (s3s-fs with SigV4), with
//! real coordinator and worker processes: exact resume, refused
//! credentials, an outage during an upload, and a damaged object.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use gancluster_tests::s3::{BUCKET, Outage, S3Server, SECRET_KEY};
use gancluster_tests::{
    Finished, Running, children, run, terminate, tiny_coordinator, wait_for_steps,
};

const LIMIT: Duration = Duration::from_secs(300);

/// `coordinator --workers 2` training run `run` to `steps` steps with checkpoints in `server`.
fn coordinator(server: &S3Server, run_id: &str, steps: u64, every: u64, out: &Path) -> Command {
    coordinator_of(2, server, run_id, steps, every, out)
}

fn coordinator_of(
    workers: usize,
    server: &S3Server,
    run_id: &str,
    steps: u64,
    every: u64,
    out: &Path,
) -> Command {
    let mut cmd = tiny_coordinator(workers, steps, out);
    cmd.args(["--store", &format!("s3://{BUCKET}/runs"), "--run", run_id])
        .args(["--checkpoint-every", &every.to_string()])
        .envs(server.env());
    cmd
}

fn train(server: &S3Server, run_id: &str, steps: u64, every: u64, out: &Path) -> Finished {
    run(&mut coordinator(server, run_id, steps, every, out), LIMIT)
}

fn params(out: &Path) -> Vec<u8> {
    std::fs::read(out.join("params.f32")).unwrap()
}

fn latest(server: &S3Server, run_id: &str) -> String {
    std::fs::read_to_string(server.object_path(&format!("runs/{run_id}/latest"))).unwrap()
}

fn checkpoint_object(server: &S3Server, run_id: &str, step: u64, name: &str) -> std::path::PathBuf {
    server.object_path(&format!("runs/{run_id}/checkpoints/step-{step:09}/{name}"))
}

/// The outage the test meant: during step 4's upload, after step 2 was
/// committed (the server holds step 4's first PUT for that, as the
/// coordinator commits step 2 while rank 0 trains on).
fn assert_outage_began_once_step_2_was_committed(server: &S3Server) {
    let at_outage = server.latest_at_outage();
    assert_eq!(
        at_outage.as_deref(),
        Some("step-000000002"),
        "`latest` when step 4's upload and the outage began (step 2 was not committed within the hold limit)"
    );
}

/// Train 2K steps in one go; train K, stop, resume to 2K: bitwise equal.
#[test]
fn a_resumed_run_ends_bitwise_equal_to_an_uninterrupted_one() {
    let server = S3Server::start();
    let (whole, split) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    train(&server, "whole", 6, 0, whole.path()).assert_success();
    train(&server, "split", 3, 0, split.path()).assert_success();
    assert_eq!(latest(&server, "split"), "step-000000003");
    let resumed = train(&server, "split", 6, 0, split.path()).assert_success();
    resumed.assert_says(&["resuming", "step-000000003"]);
    assert_eq!(
        params(whole.path()),
        params(split.path()),
        "final parameters differ"
    );
    assert_eq!(latest(&server, "split"), "step-000000006");
    for object in [
        "manifest.json",
        "generator.mpk",
        "optimizer-d.mpk",
        "samples.png",
        "loss.png",
        "state.json",
    ] {
        assert!(
            checkpoint_object(&server, "split", 6, object).is_file(),
            "{object}"
        );
    }
    let losses = std::fs::read_to_string(split.path().join("losses.csv")).unwrap();
    assert_eq!(
        losses.lines().count(),
        7,
        "header + all 6 steps, history included:\n{losses}"
    );
    // Asked for nothing new, it does nothing, says so, and succeeds.
    let again = train(&server, "split", 6, 0, split.path()).assert_success();
    again.assert_says(&["already complete"]);
}

/// What a run left: its final parameters and rank 0's loss log.
struct Trained {
    params: Vec<u8>,
    losses: String,
}

/// Three runs checkpointing every `half` steps: with `mode`'s flags to
/// 2·`half` steps in one go, the same stopped at `half` and resumed, and
/// the default mode in one go. `check` sees every run of `mode`.
fn whole_split_and_default(mode: &[&str], half: u64, check: impl Fn(&Finished)) -> [Trained; 3] {
    let server = S3Server::start();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let in_mode = |run_id: &str, steps: u64, out: &Path| {
        let mut cmd = coordinator(&server, run_id, steps, half, out);
        cmd.args(mode);
        let done = run(&mut cmd, LIMIT).assert_success();
        check(&done);
        done
    };
    in_mode("whole", 2 * half, dirs[0].path());
    in_mode("split", half, dirs[1].path());
    in_mode("split", 2 * half, dirs[1].path())
        .assert_says(&["resuming", &format!("step-{half:09}")]);
    train(&server, "default", 2 * half, half, dirs[2].path()).assert_success();
    [0, 1, 2].map(|i| Trained {
        params: params(dirs[i].path()),
        losses: std::fs::read_to_string(dirs[i].path().join("losses.csv")).unwrap(),
    })
}

/// Under error feedback (`mode`) every checkpoint follows an exact step,
/// so a run resumed from one ends bitwise equal to one that never stopped
/// (and the coordinator's per-step checksums kept both workers' replicas
/// identical throughout); and the compression changed the result.
fn error_feedback_resumes_bitwise(mode: &[&str]) {
    let [whole, split, f32] = whole_split_and_default(mode, 3, |_| ()).map(|run| run.params);
    assert_eq!(
        whole, split,
        "a run with {mode:?} resumed at step 3 differs from the uninterrupted one"
    );
    assert_ne!(
        whole, f32,
        "{mode:?} trained exactly as f32: the compression was not applied"
    );
}

#[test]
fn an_int8_run_resumes_bitwise_from_its_checkpoints() {
    error_feedback_resumes_bitwise(&["--wire", "int8"]);
}

/// PowerSGD also restarts its warm-started Q at every exact step, as a
/// group resuming from the checkpoint that follows starts it.
#[test]
fn a_powersgd_run_resumes_bitwise_from_its_checkpoints() {
    error_feedback_resumes_bitwise(&["--powersgd-rank", "2"]);
}

/// Post-local SGD (`--sync-every 2`): two workers train apart and average
/// their parameters and Adam moments every second step. The coordinator
/// compares their checksums at each averaging step, so every run finishing
/// in one generation shows the averages made them identical; a run resumed
/// at its checkpoint ends bitwise equal to the uninterrupted one; and
/// training apart changed the result.
#[test]
fn a_post_local_sgd_run_averages_replicas_and_resumes_bitwise() {
    let [whole, split, every_step] =
        whole_split_and_default(&["--sync-every", "2"], 4, in_one_generation).map(|run| run.params);
    assert_eq!(
        whole, split,
        "a post-local SGD run resumed at step 4 differs from the uninterrupted one"
    );
    assert_ne!(
        whole, every_step,
        "training apart gave the result of all-reducing every step"
    );
}

/// Every checksum comparison passed: the group never re-formed.
fn in_one_generation(done: &Finished) {
    let text = format!("{}{}", done.stdout, done.stderr);
    assert!(
        text.contains("0 (1 generations"),
        "the group re-formed (a divergence?):\n{text}"
    );
}

/// Post-local SGD after a warm-up (`--sync-warmup 4`): the first 4 steps
/// all-reduce their gradients, so they train exactly as the default does;
/// then rounds of 2 local steps begin. A run resumed at the end of the
/// warm-up ends bitwise equal to the uninterrupted one.
#[test]
fn a_post_local_sgd_warm_up_trains_as_every_step_then_rounds_begin() {
    let mode = ["--sync-every", "2", "--sync-warmup", "4"];
    let [whole, split, every_step] = whole_split_and_default(&mode, 4, in_one_generation);
    assert_eq!(
        whole.params, split.params,
        "a run resumed where its warm-up ends differs from the uninterrupted one"
    );
    // Rows of steps 0–3 without their timing (images_per_s, last).
    let warm_up = |run: &Trained| {
        let rows = run.losses.lines().skip(1).take(4);
        rows.map(|row| row.rsplit_once(',').unwrap().0.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        warm_up(&whole),
        warm_up(&every_step),
        "the warm-up did not train as all-reducing every step does"
    );
    assert_ne!(
        whole.params, every_step.params,
        "no local step was trained after the warm-up"
    );
}

/// Starts a long run `run_id` with `mode`'s flags, SIGTERMs it once it has
/// trained 3 steps, expects it to checkpoint and exit 75, then resumes it
/// for `more` steps from that checkpoint. Returns the step it stopped at.
fn stopped_by_sigterm_and_resumed(run_id: &str, mode: &[&str], more: u64) -> u64 {
    let server = S3Server::start();
    let out = tempfile::tempdir().unwrap();
    let mut cmd = coordinator(&server, run_id, 100_000, 0, out.path());
    cmd.args(mode);
    let running = Running::spawn(&mut cmd);
    wait_for_steps(out.path(), 3);
    running.terminate();
    running
        .wait(LIMIT)
        .assert_code(common::process::report::STOPPED)
        .assert_says(&["stop requested"]);
    let name = latest(&server, run_id);
    let step: u64 = name.trim_start_matches("step-").parse().unwrap();
    let mut resume = coordinator(&server, run_id, step + more, 0, out.path());
    resume.args(mode);
    run(&mut resume, LIMIT)
        .assert_success()
        .assert_says(&[name.as_str()]);
    assert_eq!(latest(&server, run_id), format!("step-{:09}", step + more));
    step
}

/// SIGTERM under post-local SGD: the stop waits for the end of the round
/// (replicas agree only after averaging), the group checkpoints there,
/// exits 75, and the run resumes from that checkpoint.
#[test]
fn a_post_local_sgd_run_stopped_by_sigterm_resumes_at_a_round() {
    let step = stopped_by_sigterm_and_resumed("term-local", &["--sync-every", "4"], 4);
    assert!(
        step > 0 && step.is_multiple_of(4),
        "stopped after step {step}, not at the end of a round"
    );
}

/// SIGTERM under int8: the stop waits for a step announced exact, then the
/// group checkpoints, exits 75, and the run resumes from there.
#[test]
fn an_int8_run_stopped_by_sigterm_resumes() {
    stopped_by_sigterm_and_resumed("term8", &["--wire", "int8"], 2);
}

/// SIGTERM under PowerSGD after a warm-up of whole gradients: as under
/// int8, the stop waits for a step announced exact.
#[test]
fn a_powersgd_run_stopped_by_sigterm_resumes() {
    let mode = ["--powersgd-rank", "2", "--sync-warmup", "2"];
    stopped_by_sigterm_and_resumed("term-psgd", &mode, 2);
}

/// A checkpoint of 2 workers resumes with 3: the rest of the epoch is
/// re-sharded from the data cursor and the run completes.
#[test]
fn a_checkpoint_resumes_with_another_worker_count() {
    let server = S3Server::start();
    let out = tempfile::tempdir().unwrap();
    train(&server, "reshard", 3, 0, out.path()).assert_success();
    let mut cmd = coordinator_of(3, &server, "reshard", 5, 0, out.path());
    let resumed = run(&mut cmd, LIMIT).assert_success();
    let log = &resumed.stderr;
    assert!(
        log.contains("resuming with a different worker count") && log.contains("position=48"),
        "3 steps × 2 workers × batch 8 = 48 positions consumed: {log}"
    );
    assert_eq!(latest(&server, "reshard"), "step-000000005");
}

#[test]
fn wrong_credentials_are_refused_naming_endpoint_and_bucket() {
    let server = S3Server::start();
    let out = tempfile::tempdir().unwrap();
    let mut cmd = coordinator(&server, "creds", 2, 0, out.path());
    cmd.env(
        "GANCLUSTER__CHECKPOINT__S3__SECRET_ACCESS_KEY",
        "not-the-secret",
    );
    let done = run(&mut cmd, LIMIT).assert_failure();
    let err = &done.stderr;
    assert!(
        err.contains(&format!("s3://{BUCKET}/runs at {}", server.endpoint())),
        "{err}"
    );
    assert!(err.contains("refused the credentials"), "{err}");
    assert!(
        !err.contains("not-the-secret") && !err.contains(SECRET_KEY),
        "a secret leaked: {err}"
    );
    assert!(
        !out.path().join("params.f32").exists(),
        "no training without a working store"
    );
}

/// The server goes down while a checkpoint is being uploaded: the upload
/// retries until it is back, training goes on, and `latest` only ever names
/// complete checkpoints.
#[test]
fn an_outage_during_an_upload_is_retried_and_latest_stays_valid() {
    let server = S3Server::start();
    let out = tempfile::tempdir().unwrap();
    server.arm_outage(Outage {
        needle: "checkpoints/step-000000004/".into(),
        duration: Duration::from_secs(2),
        after_latest: Some("step-000000002".into()),
    });
    let done = train(&server, "outage", 6, 2, out.path()).assert_success();
    let log = &done.stderr;
    assert!(
        server.refused() > 0,
        "the outage never refused a connection:\n{log}"
    );
    assert_outage_began_once_step_2_was_committed(&server);
    assert_eq!(latest(&server, "outage"), "step-000000006");
    for step in [2, 4, 6] {
        assert!(
            checkpoint_object(&server, "outage", step, "manifest.json").is_file(),
            "step {step}:\n{log}"
        );
    }
    // Every checkpoint verifies: resuming from the one written through the outage works.
    let out2 = tempfile::tempdir().unwrap();
    let mut cmd = coordinator(&server, "outage", 6, 0, out2.path());
    cmd.args(["--resume-from", "step-000000004"]);
    let resumed = run(&mut cmd, LIMIT).assert_success();
    resumed.assert_says(&["step-000000004"]);
}

/// An outage longer than the retries: the checkpoints written during it are
/// lost, never half-committed, and a run whose final checkpoint is lost
/// says so and which checkpoint a rerun resumes from.
#[test]
fn an_outage_beyond_the_retries_never_commits_a_partial_checkpoint() {
    let server = S3Server::start();
    let out = tempfile::tempdir().unwrap();
    server.arm_outage(Outage {
        needle: "checkpoints/step-000000004/".into(),
        duration: Duration::from_secs(30),
        after_latest: Some("step-000000002".into()),
    });
    let mut cmd = coordinator(&server, "lost", 6, 2, out.path());
    cmd.env("GANCLUSTER__CHECKPOINT__S3__MAX_RETRIES", "1");
    let done = run(&mut cmd, LIMIT).assert_failure();
    let log = &done.stderr;
    assert!(
        log.contains("training reached step 6 but its checkpoint could not be saved")
            && log.contains("the newest committed checkpoint is step-000000002"),
        "{log}"
    );
    assert_outage_began_once_step_2_was_committed(&server);
    assert_eq!(latest(&server, "lost"), "step-000000002");
    assert!(!checkpoint_object(&server, "lost", 4, "manifest.json").exists());
}

#[test]
fn a_flipped_byte_is_detected_and_the_previous_checkpoint_used() {
    let server = S3Server::start();
    let out = tempfile::tempdir().unwrap();
    train(&server, "flip", 4, 2, out.path()).assert_success();
    let damaged = checkpoint_object(&server, "flip", 4, "generator.mpk");
    let mut bytes = std::fs::read(&damaged).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&damaged, bytes).unwrap();

    let resumed = train(&server, "flip", 6, 2, out.path()).assert_success();
    let err = &resumed.stderr;
    assert!(
        err.contains("step-000000004") && err.contains("generator.mpk") && err.contains("expected"),
        "the damage is reported: {err}"
    );
    assert!(
        err.contains("resuming") && err.contains("flip/checkpoints/step-000000002 step=2"),
        "{err}"
    );
    let losses = std::fs::read_to_string(out.path().join("losses.csv")).unwrap();
    let steps: Vec<&str> = losses
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap())
        .collect();
    assert_eq!(
        steps,
        ["0", "1", "2", "3", "4", "5"],
        "resumed after step 2: {losses}"
    );
    assert_eq!(latest(&server, "flip"), "step-000000006");
}

/// SIGTERM (eviction): the group checkpoints after the current step and the
/// coordinator exits saying the run is not done (75); the same command then
/// resumes from there.
#[test]
fn sigterm_checkpoints_stops_cleanly_and_the_run_resumes() {
    let server = S3Server::start();
    let out = tempfile::tempdir().unwrap();
    let running = Running::spawn(&mut coordinator(&server, "term", 100_000, 0, out.path()));
    wait_for_steps(out.path(), 3);
    running.terminate();
    // Not done: exit 75, so that a Job starts the pod again.
    let done = running
        .wait(LIMIT)
        .assert_code(common::process::report::STOPPED);
    done.assert_says(&["stop requested"]);
    let name = latest(&server, "term");
    let step: u64 = name.trim_start_matches("step-").parse().unwrap();
    assert!((3..100_000).contains(&step), "stopped at {name}");
    assert!(checkpoint_object(&server, "term", step, "manifest.json").is_file());

    let resumed = train(&server, "term", step + 2, 0, out.path()).assert_success();
    resumed.assert_says(&[name.as_str()]);
    assert_eq!(latest(&server, "term"), format!("step-{:09}", step + 2));
}

/// A worker's SIGTERM (its pod evicted): it asks the coordinator, and the
/// whole group checkpoints after the current step and stops cleanly.
#[test]
fn a_worker_sigterm_checkpoints_and_stops_the_group() {
    let server = S3Server::start();
    let out = tempfile::tempdir().unwrap();
    let running = Running::spawn(&mut coordinator(&server, "evict", 100_000, 0, out.path()));
    wait_for_steps(out.path(), 3);
    let workers = children(running.id());
    assert_eq!(workers.len(), 2, "the coordinator's worker processes");
    terminate(workers[1]);
    let done = running
        .wait(LIMIT)
        .assert_code(common::process::report::STOPPED);
    done.assert_says(&["stop requested by a worker", "SIGTERM on"]);
    let name = latest(&server, "evict");
    let step: u64 = name.trim_start_matches("step-").parse().unwrap();
    assert!((3..100_000).contains(&step), "stopped at {name}");
    assert!(checkpoint_object(&server, "evict", step, "manifest.json").is_file());
}
