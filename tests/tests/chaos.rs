//! Chaos: real processes killed with SIGKILL, frozen with SIGSTOP, and a
//! coordinator killed under its workers, at moments drawn from a seed (so
//! a failure replays). Every run must complete, record how many steps it
//! trained again (none while a replica survived), and end with parameters
//! bitwise equal to an uninterrupted run with the same membership history.
//!
//! Each run is bounded and every process is killed when its handle drops,
//! so a failing test leaves nothing behind.

use std::time::Duration;

use gancluster_tests::{
    Cluster, Frozen, Generation, Running, bitwise_equal, children, free_port, kill9, run,
    wait_for_steps, wait_until,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const LIMIT: Duration = Duration::from_secs(240);

/// Seeds for the random moments; a failure names its seed. For the
/// mid-step kill they draw (rank, step) = (0, 11) — the last step, while
/// rank 0 owes the final checkpoint —, (1, 3) and (1, 0).
const SEEDS: [u64; 3] = [11, 14, 15];

const TOKEN: &str = "chaos-token";

/// Heartbeats every second, a peer silent for 4 s is lost.
const QUICK_HEARTBEATS: [(&str, &str); 2] = [
    ("GANCLUSTER__COORDINATOR__HEARTBEAT_INTERVAL_S", "1"),
    ("GANCLUSTER__COORDINATOR__HEARTBEAT_TIMEOUT_S", "4"),
];

/// A local run of `workers` for `steps`, checkpointing every 4 steps, that
/// may re-form `restarts` times.
fn local(workers: usize, steps: u64, restarts: u32) -> Cluster {
    Cluster::new(workers, steps)
        .args(&["--checkpoint-every", "4"])
        .env(
            "GANCLUSTER__COORDINATOR__MAX_RESTARTS",
            &restarts.to_string(),
        )
}

/// The parameters of an uninterrupted local run.
fn uninterrupted(workers: usize, steps: u64) -> Vec<f32> {
    let whole = local(workers, steps, 0);
    run(&mut whole.coordinator(), LIMIT).assert_success();
    whole.params()
}

/// Asserts the run re-formed once after losing a member, from a replica,
/// training no step twice; returns the second generation.
fn replaced_without_loss(cluster: &Cluster, seed: u64) -> Generation {
    let members = cluster.membership();
    assert_eq!(members.len(), 2, "seed {seed}: {members:?}");
    let second = members[1].clone();
    assert_eq!(
        (
            second.workers,
            second.steps_retrained,
            second.cause.as_str()
        ),
        (2, 0, "member lost"),
        "seed {seed}: {members:?}"
    );
    assert!(
        second.state.starts_with("replica"),
        "seed {seed}: {members:?}"
    );
    second
}

/// `kill -9` of a worker in the middle of a step (its discriminator
/// updated, its generator gradient on the way), injected at a random step
/// of a random rank: the survivor's replica goes to a replacement and the
/// run ends as if nothing happened.
#[test]
fn sigkill_of_a_random_worker_mid_step_loses_no_step() {
    const STEPS: u64 = 12;
    let reference = uninterrupted(2, STEPS);
    for seed in SEEDS {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (rank, step) = (rng.random_range(0..2), rng.random_range(0..STEPS));
        let cluster = local(2, STEPS, 1).env("GANCLUSTER_FAULT", &format!("kill:{rank}:{step}"));
        let done = run(&mut cluster.coordinator(), LIMIT).assert_success();
        done.assert_says(&[
            &format!("the group re-forms generation=1 lost=[{rank}]"),
            "steps trained again: 0",
        ]);
        let second = replaced_without_loss(&cluster, seed);
        assert!(
            [step, step + 1].contains(&second.first_step),
            "seed {seed}: killed in step {step}, re-formed at {}",
            second.first_step
        );
        assert!(
            bitwise_equal(&reference, &cluster.params()),
            "seed {seed}: killed rank {rank} in step {step}; the final parameters differ"
        );
    }
}

/// Post-local SGD (`train.sync_every = 2`): a worker killed as the group
/// averages (step 5, the last of a round) is replaced, and both go back to
/// the start of the round, the only state replicas share: the survivor's
/// replica after step 4 travels, the round is trained again, and the run
/// ends bitwise equal to an uninterrupted one.
#[test]
fn sigkill_while_averaging_retrains_the_round_and_ends_bitwise_equal() {
    const STEPS: u64 = 12;
    let averaging = |cluster: Cluster| cluster.env("GANCLUSTER__TRAIN__SYNC_EVERY", "2");
    let whole = averaging(local(2, STEPS, 0));
    run(&mut whole.coordinator(), LIMIT).assert_success();
    let reference = whole.params();
    let cluster = averaging(local(2, STEPS, 1)).env("GANCLUSTER_FAULT", "kill:1:5");
    run(&mut cluster.coordinator(), LIMIT)
        .assert_success()
        .assert_says(&["the group re-forms generation=1 lost=[1]"]);
    let members = cluster.membership();
    assert_eq!(members.len(), 2, "{members:?}");
    let second = &members[1];
    assert_eq!(
        (second.workers, second.first_step, second.cause.as_str()),
        (2, 4, "member lost"),
        "{members:?}"
    );
    assert!(second.state.starts_with("replica"), "{members:?}");
    assert!(
        bitwise_equal(&reference, &cluster.params()),
        "killed rank 1 while averaging step 5; the final parameters differ"
    );
}

/// `kill -9` from outside, at a moment the test does not choose precisely
/// (after a random number of logged steps): the same guarantee.
#[test]
fn sigkill_from_outside_at_a_random_moment_loses_no_step() {
    const STEPS: u64 = 40;
    let reference = uninterrupted(2, STEPS);
    let mut rng = ChaCha8Rng::seed_from_u64(SEEDS[0]);
    let (rank, after) = (rng.random_range(0..2), rng.random_range(2..20));
    let cluster = local(2, STEPS, 1);
    let coordinator = Running::spawn(&mut cluster.coordinator());
    wait_for_steps(&cluster.out(), after);
    let workers = children(coordinator.id());
    assert_eq!(workers.len(), 2, "the coordinator's worker processes");
    kill9(workers[rank]);
    coordinator.wait(LIMIT).assert_success();
    replaced_without_loss(&cluster, SEEDS[0]);
    assert!(
        bitwise_equal(&reference, &cluster.params()),
        "killed rank {rank} after {after} steps; the final parameters differ"
    );
}

/// A worker frozen with SIGSTOP (alive, sockets open, silent) is found by
/// the heartbeat timeout, killed and replaced; the others' replicas carry
/// the run on.
#[test]
fn a_worker_frozen_with_sigstop_is_replaced_without_losing_a_step() {
    const STEPS: u64 = 40;
    let reference = uninterrupted(2, STEPS);
    let mut rng = ChaCha8Rng::seed_from_u64(SEEDS[1]);
    let (rank, after) = (rng.random_range(0..2), rng.random_range(2..20));
    let mut cluster = local(2, STEPS, 1);
    for (key, value) in QUICK_HEARTBEATS {
        cluster = cluster.env(key, value);
    }
    let coordinator = Running::spawn(&mut cluster.coordinator());
    wait_for_steps(&cluster.out(), after);
    let workers = children(coordinator.id());
    let _frozen = Frozen::stop(workers[rank]);
    coordinator.wait(LIMIT).assert_success();
    replaced_without_loss(&cluster, SEEDS[1]);
    assert!(
        bitwise_equal(&reference, &cluster.params()),
        "froze rank {rank} after {after} steps; the final parameters differ"
    );
}

/// Kubernetes-style: the coordinator is killed with SIGKILL under its
/// external workers. They keep their replicas and retry; the coordinator
/// started again (same command, same address) re-forms the group from
/// them, with no step trained twice and no manual step.
#[test]
fn a_coordinator_killed_under_external_workers_comes_back_to_their_replicas() {
    const STEPS: u64 = 40;
    let reference = uninterrupted(2, STEPS);
    let mut rng = ChaCha8Rng::seed_from_u64(SEEDS[2]);
    let after = rng.random_range(2..20);
    let cluster = local(2, STEPS, 1);
    let listen = format!("127.0.0.1:{}", free_port());
    let address = format!("http://{listen}");
    let first = Running::spawn(&mut cluster.external_coordinator(TOKEN, &listen));
    let workers: Vec<Running> = (0..2)
        .map(|rank| {
            Running::spawn(
                cluster
                    .worker(&address, rank, TOKEN)
                    .env("GANCLUSTER__COORDINATOR__RECONNECT_TIMEOUT_S", "60"),
            )
        })
        .collect();
    wait_for_steps(&cluster.out(), after);
    kill9(first.id());
    first.wait(LIMIT).assert_failure();
    let second = Running::spawn(&mut cluster.external_coordinator(TOKEN, &listen));
    second.wait(LIMIT).assert_success();
    for worker in workers {
        worker.wait(LIMIT).assert_success();
    }
    let members = cluster.membership();
    let restart = members.last().expect("the second coordinator's generation");
    assert_eq!(
        (restart.generation, restart.workers, restart.steps_retrained),
        (1, 2, 0),
        "{members:?}"
    );
    // Killed while the reduced gradient was half broadcast, one worker may
    // be a step ahead: its replica is then sent to the other, which is no
    // loss either (steps_retrained is 0 above).
    assert!(
        restart.first_step > 0 && restart.state.starts_with("replica"),
        "{members:?}"
    );
    assert!(
        bitwise_equal(&reference, &cluster.params()),
        "killed the coordinator after {after} steps; the final parameters differ"
    );
}

/// Elastic membership on a cluster: a worker that does not come back
/// within `rejoin_timeout_s` leaves the group smaller (down to
/// `min_workers`); when it returns, the group grows back at a step
/// boundary. The result equals the same membership history run as
/// checkpointed segments: 2 workers, then 1, then 2.
#[test]
fn the_group_shrinks_without_a_lost_worker_and_grows_when_it_returns() {
    // Long enough that the returning worker, started as soon as the group
    // shrank, arrives well before the end (a run of one tiny worker does
    // tens of steps a second).
    const STEPS: u64 = 400;
    let mut rng = ChaCha8Rng::seed_from_u64(SEEDS[0]);
    let (lost, after) = (rng.random_range(0..2), rng.random_range(2..12));
    // The handshake deadline is raised because this test once saw an
    // extra 2-worker generation (same first step, nothing retrained) under
    // the full suite's load, which fits a member that took longer than the
    // default 10 s to open its session after the group formed; unverified
    // (the assertion below prints the coordinator's reasons if it recurs).
    let cluster = local(2, STEPS, 2)
        .env("GANCLUSTER__COORDINATOR__MIN_WORKERS", "1")
        .env("GANCLUSTER__COORDINATOR__REJOIN_TIMEOUT_S", "2")
        .env("GANCLUSTER__COORDINATOR__HANDSHAKE_TIMEOUT_S", "60");
    let listen = format!("127.0.0.1:{}", free_port());
    let address = format!("http://{listen}");
    let coordinator = Running::spawn(&mut cluster.external_coordinator(TOKEN, &listen));
    let worker = |rank: usize| -> Running {
        Running::spawn(
            cluster
                .worker(&address, rank, TOKEN)
                .env("GANCLUSTER__COORDINATOR__RECONNECT_TIMEOUT_S", "60"),
        )
    };
    let mut workers: Vec<Running> = (0..2).map(worker).collect();
    wait_for_steps(&cluster.out(), after);
    kill9(workers[lost].id());
    let shrunk = wait_until(LIMIT, "the group never continued with one worker", || {
        let members = read_membership(&cluster);
        members.iter().find(|g| g.workers == 1).cloned()
    });
    // The smaller group trains a few steps before the worker returns.
    wait_for_steps(&cluster.out(), shrunk.first_step as usize + 3);
    workers[lost] = worker(lost);
    let finished = coordinator.wait(LIMIT).assert_success();
    for worker in workers {
        worker.wait(LIMIT).assert_success();
    }
    let members = cluster.membership();
    let history: Vec<(usize, u64, &str)> = members
        .iter()
        .map(|g| (g.workers, g.steps_retrained, g.cause.as_str()))
        .collect();
    // Why each generation ended, from the coordinator's log.
    let reasons: Vec<&str> = finished
        .stderr
        .lines()
        .filter(|l| l.contains("re-forms"))
        .collect();
    assert_eq!(
        history,
        [
            (2, 0, "start"),
            (1, 0, "member lost"),
            (2, 0, "member arrived")
        ],
        "{members:?}\n{}",
        reasons.join("\n")
    );
    let (k1, k2) = (members[1].first_step, members[2].first_step);
    assert!(0 < k1 && k1 < k2 && k2 < STEPS, "{members:?}");

    let segments = local(2, STEPS, 0);
    for (workers, until) in [(2, k1), (1, k2), (2, STEPS)] {
        run(&mut segments.coordinator_with(workers, until), LIMIT).assert_success();
    }
    assert!(
        bitwise_equal(&segments.params(), &cluster.params()),
        "2 workers to step {k1}, 1 to {k2}, 2 to {STEPS}: the elastic run differs from its \
         checkpointed segments"
    );
}

/// `membership.csv` while the run is going (it may not exist yet).
fn read_membership(cluster: &Cluster) -> Vec<Generation> {
    match cluster.out().join("membership.csv").is_file() {
        true => cluster.membership(),
        false => Vec::new(),
    }
}
