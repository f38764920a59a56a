//! The health status Kubernetes' probes read says what a worker is doing:
//! alive but NOT_SERVING before it joined a group, SERVING while a member,
//! NOT_SERVING again once its coordinator is gone.

use std::time::Duration;

use gancluster_tests::probes::{ServingStatus, health};
use gancluster_tests::{Cluster, Running, free_port, wait_until};

const LIMIT: Duration = Duration::from_secs(120);
const TOKEN: &str = "health-test-token-0123456789";

#[test]
fn a_workers_readiness_follows_its_membership() {
    let cluster = Cluster::new(1, 100_000);
    let listen = format!("127.0.0.1:{}", free_port());
    let port = free_port();
    let service = common::process::observe::WORKER;
    // Killed when dropped, at the end of the test.
    let _worker = Running::spawn(
        cluster
            .worker(&format!("http://{listen}"), 0, TOKEN)
            .args(["--health-listen", &format!("127.0.0.1:{port}")])
            .env("GANCLUSTER__COORDINATOR__RECONNECT_TIMEOUT_S", "60"),
    );
    // No coordinator yet: alive, not ready.
    let status = wait_until(LIMIT, "the worker's health service", || {
        health("127.0.0.1", port, service)
    });
    assert_eq!(status, ServingStatus::NotServing);
    assert_eq!(health("127.0.0.1", port, ""), Some(ServingStatus::Serving));

    let coordinator = Running::spawn(&mut cluster.external_coordinator(TOKEN, &listen));
    wait_until(LIMIT, "the worker ready once it joined", || {
        (health("127.0.0.1", port, service) == Some(ServingStatus::Serving)).then_some(())
    });

    // Its coordinator killed: the worker waits for another, not ready.
    gancluster_tests::kill9(coordinator.id());
    coordinator.wait(LIMIT).assert_failure();
    wait_until(
        LIMIT,
        "the worker not ready without its coordinator",
        || (health("127.0.0.1", port, service) == Some(ServingStatus::NotServing)).then_some(()),
    );
    assert_eq!(health("127.0.0.1", port, ""), Some(ServingStatus::Serving));
}
