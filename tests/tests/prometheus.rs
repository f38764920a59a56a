//! The metrics as Prometheus sees them: a live scrape of a training run
//! passes `promtool check metrics`, and a real Prometheus server scraping
//! the run answers a PromQL query with the run's step.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use gancluster_tests::manifests::require;
use gancluster_tests::probes::{get, metric};
use gancluster_tests::{Cluster, Running, free_port, wait_until};

const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn a_live_scrape_passes_promtool_and_a_prometheus_server_queries_the_run() {
    require("promtool", "apt-get install prometheus (.ci/run does)");
    require("prometheus", "apt-get install prometheus (.ci/run does)");
    let metrics = free_port();
    let cluster = Cluster::new(2, 100_000);
    let coordinator = Running::spawn(
        cluster
            .coordinator()
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")]),
    );

    // Scraped once the group trains: every metric of a step is there.
    let scrape = wait_until(LIMIT, "a scrape showing step 3", || {
        let text = get("127.0.0.1", metrics, "/metrics")?;
        (metric(&text, "gancluster_step")? >= 3.0).then_some(text)
    });
    for name in [
        "gancluster_images_per_second",
        "gancluster_discriminator_loss",
        "gancluster_generator_loss",
        "gancluster_workers",
        "gancluster_generation",
        "gancluster_allreduce_seconds_count",
        "gancluster_steps_total",
    ] {
        assert!(
            metric(&scrape, name).is_some(),
            "{name} missing from:\n{scrape}"
        );
    }
    assert!(
        scrape.contains("gancluster_allreduce_bytes_total{direction=\"in\"}"),
        "{scrape}"
    );
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting promtool");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics:\n{}{}\n{scrape}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    // A Prometheus server scraping the run every second.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: gancluster\n    \
             static_configs:\n      - targets: ['127.0.0.1:{metrics}']\n"
        ),
    )
    .unwrap();
    let web = free_port();
    let server = Running::spawn(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{web}")),
    );
    let answer = wait_until(LIMIT, "Prometheus answering gancluster_step > 0", || {
        let body = get(
            "127.0.0.1",
            web,
            "/api/v1/query?query=gancluster_step%7Bjob%3D%22gancluster%22%7D",
        )?;
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        let step: f64 = json["data"]["result"][0]["value"][1]
            .as_str()?
            .parse()
            .ok()?;
        (step > 0.0).then_some(json)
    });
    assert_eq!(answer["status"], "success", "{answer}");
    drop(server);
    coordinator.terminate();
    coordinator
        .wait(LIMIT)
        .assert_code(common::process::report::STOPPED);
}
