//! `coordinator` and `worker` as separate processes on loopback: the group
//! trains as one big-batch trainer, replicas stay identical, and failures
//! stop the run with a message that names the culprit.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Config, ShardSampler};
use gancluster_tests::{
    Cluster, Finished, Frozen, Running, TINY, children, exited, free_port, read_f32, run,
    tiny_coordinator, wait_for_address, wait_for_steps, workspace_bin,
};
use worker::data::{BatchLoader, ImageSource};
use worker::model::backend::{self, TrainBackend};
use worker::train::replica_loop::{PARAMS_F32, to_tensor};
use worker::train::step::{Trainer, step_noise};

const LIMIT: Duration = Duration::from_secs(240);

fn coordinator(workers: usize, steps: u64, out: &Path) -> Command {
    let mut cmd = tiny_coordinator(workers, steps, out);
    cmd.arg("--store")
        .arg(format!("file://{}", out.join("store").display()))
        // A failure must end the run here, so the tests can see it; the
        // chaos tests (tests/chaos.rs) turn restarts back on.
        .env("GANCLUSTER__COORDINATOR__MAX_RESTARTS", "0");
    cmd
}

/// Two replicas through the coordinator must match one process that
/// computes both shards' gradients (each with its own BatchNorm batch
/// statistics and noise stream) and applies their average.
#[test]
fn two_workers_equal_a_single_process_applying_the_average_gradient() {
    const STEPS: u64 = 4;
    let out = tempfile::tempdir().unwrap();
    run(&mut coordinator(2, STEPS, out.path()), LIMIT).assert_success();
    let distributed = read_f32(&out.path().join(PARAMS_F32));

    let tiny: Vec<(&str, String)> = vec![
        ("model.image_size", "16".into()),
        ("model.ngf", "8".into()),
        ("model.ndf", "8".into()),
        ("train.batch_size", "8".into()),
    ];
    let cfg = Config::load_with_env(None, &tiny, Some(Default::default())).unwrap();
    let device = backend::device().unwrap();
    let mut trainer = Trainer::<TrainBackend>::new(&cfg.model, &cfg.train, &device);
    let source = ImageSource::open(&cfg.data, cfg.train.seed).unwrap();
    let mut shards: Vec<(BatchLoader, _)> = (0..2)
        .map(|rank| {
            let sampler = ShardSampler::new(source.len(), 2, rank, cfg.train.seed);
            let loader =
                BatchLoader::spawn(source.clone(), sampler, 2, 8, 16, 0, Default::default(), 1)
                    .unwrap();
            (loader, rank)
        })
        .collect();
    let mean = |a: Vec<f32>, b: Vec<f32>| -> Vec<f32> {
        a.iter().zip(&b).map(|(x, y)| (x + y) / 2.0).collect()
    };
    for step in 0..STEPS {
        let mut fakes = Vec::new();
        let mut d_grads = Vec::new();
        for (loader, rank) in &mut shards {
            let real = to_tensor(loader.next_batch().unwrap(), 16, &device);
            let z = step_noise(cfg.train.seed, *rank, step, 8, cfg.model.nz, &device);
            let fake = trainer.generate(z);
            d_grads.push(trainer.discriminator_step(real, fake.clone().detach()).0);
            fakes.push(fake);
        }
        trainer.apply_discriminator(&mean(d_grads.remove(0), d_grads.remove(0)));
        let mut g_grads: Vec<Vec<f32>> = fakes
            .into_iter()
            .map(|fake| trainer.generator_step(fake).0)
            .collect();
        trainer.apply_generator(&mean(g_grads.remove(0), g_grads.remove(0)));
    }
    let reference = trainer.flat_params();
    assert_eq!(distributed.len(), reference.len());
    let worst = distributed
        .iter()
        .zip(&reference)
        .map(|(d, r)| (d - r).abs() / r.abs().max(1e-3))
        .fold(0.0f32, f32::max);
    assert!(worst <= 1e-5, "largest relative difference {worst}");
}

#[test]
fn a_diverged_replica_stops_the_run_naming_the_step() {
    let out = tempfile::tempdir().unwrap();
    let done = run(
        coordinator(2, 8, out.path()).env("GANCLUSTER_FAULT", "diverge:1:3"),
        LIMIT,
    )
    .assert_failure();
    done.assert_says(&["replicas diverged after step 3"]);
}

#[test]
fn a_worker_dying_mid_run_fails_the_run_naming_its_rank() {
    let out = tempfile::tempdir().unwrap();
    let done = run(
        coordinator(2, 20, out.path()).env("GANCLUSTER_FAULT", "exit:1:2"),
        LIMIT,
    )
    .assert_failure();
    done.assert_says(&["worker rank 1"]);
}

#[test]
fn four_local_workers_train_to_completion() {
    let out = tempfile::tempdir().unwrap();
    let done: Finished = run(&mut coordinator(4, 6, out.path()), LIMIT).assert_success();
    for rank in 0..4 {
        assert!(
            done.stderr.contains(&format!("[rank {rank}]")),
            "no output from rank {rank}:\n{}",
            done.stderr
        );
    }
    done.assert_says(&["training finished"]);
    let losses = std::fs::read_to_string(out.path().join("losses.csv")).unwrap();
    assert_eq!(losses.lines().count(), 7, "header + 6 steps from rank 0");
    assert!(out.path().join("samples.png").is_file());
}

#[test]
fn an_external_worker_with_the_wrong_token_is_refused() {
    let out = tempfile::tempdir().unwrap();
    let mut cmd = coordinator(1, 2, out.path());
    cmd.args(["--external", "--listen", "127.0.0.1:0"])
        .env("GANCLUSTER_TOKEN", "right");
    // The coordinator keeps waiting for a valid worker; it is killed when `_server` drops.
    let _server = Running::spawn(&mut cmd);
    let address = wait_for_address(out.path());
    let mut worker = Command::new(workspace_bin("worker"));
    worker
        .args(["train", "--coordinator", &address])
        .args(TINY)
        .env("GANCLUSTER_TOKEN", "wrong");
    let done = run(&mut worker, LIMIT).assert_failure();
    done.assert_says(&["wrong or missing token"]);
}

#[test]
fn a_group_that_never_forms_times_out_saying_who_is_missing() {
    let out = tempfile::tempdir().unwrap();
    let mut cmd = coordinator(2, 2, out.path());
    cmd.args(["--external"])
        .env("GANCLUSTER_TOKEN", "t")
        .env("GANCLUSTER__COORDINATOR__JOIN_TIMEOUT_S", "1");
    let done = run(&mut cmd, LIMIT).assert_failure();
    done.assert_says(&["only 0 of 2 workers joined", "missing ranks: [0, 1]"]);
}

/// A worker whose training thread hangs while its process still
/// heartbeats (a stuck GPU, a deadlock) is caught by the step timeout, and
/// the message names the rank the all-reduce is waiting for.
#[test]
fn a_hung_training_thread_is_caught_by_the_step_timeout() {
    let out = tempfile::tempdir().unwrap();
    let done = run(
        coordinator(2, 100_000, out.path())
            .env("GANCLUSTER_FAULT", "hang:1:2")
            .env("GANCLUSTER__COORDINATOR__STEP_TIMEOUT_S", "10"),
        LIMIT,
    )
    .assert_failure();
    done.assert_says(&[
        "no step completed for 10 s after 2 steps",
        "waits for rank(s) [1]",
    ]);
}

/// Heartbeats every second, a peer silent for 4 s is lost: fast enough for
/// a test, slow enough for a loaded two-core machine.
const QUICK_HEARTBEATS: [(&str, &str); 2] = [
    ("GANCLUSTER__COORDINATOR__HEARTBEAT_INTERVAL_S", "1"),
    ("GANCLUSTER__COORDINATOR__HEARTBEAT_TIMEOUT_S", "4"),
];

/// A worker that goes silent with its stream still open (frozen with
/// SIGSTOP, as a hung or partitioned one would be) is caught by the
/// heartbeat timeout: the run fails naming its rank instead of waiting
/// forever, and no worker process is left behind.
#[test]
fn a_silent_worker_is_caught_by_the_heartbeat_timeout() {
    let out = tempfile::tempdir().unwrap();
    let running = Running::spawn(coordinator(2, 100_000, out.path()).envs(QUICK_HEARTBEATS));
    wait_for_steps(out.path(), 2);
    let workers = children(running.id());
    assert_eq!(workers.len(), 2, "the coordinator's worker processes");
    let _frozen = Frozen::stop(workers[1]);
    let done = running.wait(LIMIT).assert_failure();
    done.assert_says(&["worker rank 1 was lost", "coordinator.heartbeat_timeout_s"]);
    for pid in workers {
        assert!(exited(pid), "worker {pid} outlived the coordinator");
    }
}

/// The other direction: a coordinator that stops answering (frozen) is
/// caught by the worker's keepalive pings; the worker keeps its replica and
/// tries to reach it again for `coordinator.reconnect_timeout_s`, then
/// exits saying so instead of waiting for a reduced gradient forever.
#[test]
fn a_worker_gives_up_on_a_silent_coordinator() {
    let out = tempfile::tempdir().unwrap();
    let mut cmd = coordinator(1, 100_000, out.path());
    cmd.args(["--external"])
        .env("GANCLUSTER_TOKEN", "t")
        .envs(QUICK_HEARTBEATS);
    let server = Running::spawn(&mut cmd);
    let address = wait_for_address(out.path());
    let mut worker = Command::new(workspace_bin("worker"));
    worker
        .args(["train", "--coordinator", &address, "--steps", "100000"])
        .args(TINY)
        .arg("--out")
        .arg(out.path())
        .env("GANCLUSTER_TOKEN", "t")
        .envs(QUICK_HEARTBEATS)
        .env("GANCLUSTER__COORDINATOR__RECONNECT_TIMEOUT_S", "3")
        .env_remove("RUST_LOG");
    let worker = Running::spawn(&mut worker);
    wait_for_steps(out.path(), 2);
    let _frozen = Frozen::stop(server.id());
    let done = worker.wait(LIMIT).assert_failure();
    done.assert_says(&[
        "gave up on the coordinator after 3 s without it (coordinator.reconnect_timeout_s)",
        "coordinator.heartbeat_timeout_s",
    ]);
}

/// A worker pod started again after its run completed (the Indexed Job
/// replacing one that failed after the end) finds no coordinator: it
/// looks in the store, sees the run complete, and exits 0 at once instead
/// of failing after `coordinator.join_timeout_s`.
#[test]
fn a_worker_started_after_its_run_completed_exits_cleanly() {
    let cluster = Cluster::new(2, 4);
    run(&mut cluster.coordinator(), LIMIT).assert_success();
    let nobody = format!("http://127.0.0.1:{}", free_port());
    let late = run(
        cluster
            .worker(&nobody, 1, "late-worker-token-0123456789")
            .env("GANCLUSTER__COORDINATOR__JOIN_TIMEOUT_S", "600"),
        LIMIT,
    )
    .assert_success();
    late.assert_says(&["the run is already complete in the store"]);
}

/// As torchrun does: local rank r is given one GPU (the r-th of `--gpus`,
/// in turn when there are fewer GPUs than workers) as
/// `CUDA_VISIBLE_DEVICES`, and its place as `LOCAL_RANK` and
/// `LOCAL_WORLD_SIZE`; each worker says what it was given, and the
/// coordinator says that GPUs are shared. (A CPU build: the variables are
/// what is checked.)
#[test]
fn local_workers_are_given_a_gpu_each_in_turn_and_their_place() {
    let out = tempfile::tempdir().unwrap();
    let mut cmd = coordinator(3, 1, out.path());
    cmd.args(["--gpus", "7,9"]);
    run(&mut cmd, LIMIT).assert_success();
    for (rank, gpu) in [(0, "7"), (1, "9"), (2, "7")] {
        let log =
            std::fs::read_to_string(out.path().join(format!("logs/rank-{rank}.log"))).unwrap();
        let line = log
            .lines()
            .find(|l| l.contains("training device"))
            .unwrap_or_else(|| panic!("rank {rank} never said its device:\n{log}"));
        for expected in [
            format!("cuda_visible_devices=Some(\"{gpu}\")"),
            format!("local_rank=Some(\"{rank}\")"),
            "local_world_size=Some(\"3\")".to_string(),
        ] {
            assert!(
                line.contains(&expected),
                "rank {rank}: {expected} missing in {line}"
            );
        }
    }
    let coordinator = std::fs::read_to_string(out.path().join("logs/coordinator.log")).unwrap();
    assert!(
        coordinator.contains("fewer GPUs than local workers"),
        "{coordinator}"
    );
}
