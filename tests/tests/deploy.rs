//! The Kubernetes manifests, checked offline: every overlay renders and
//! validates against the Kubernetes API schemas, and every flag, env name,
//! config key and port the pods use is one the binaries accept and serve.
//! A renamed flag or key fails here, not on a cluster.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::process::observe;
use gancluster_tests::manifests::{self, Container, Source, config_file, container, find, render};
use gancluster_tests::{run, workspace_bin};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(60);
const KUSTOMIZATIONS: [&str; 4] = ["base", "overlays/cpu", "overlays/gpu", "data"];

/// Kubernetes versions every rendered manifest must be valid for: the
/// oldest with `backoffLimitPerIndex` (beta), a recent one, and the newest
/// schema `kubernetes-validate` ships.
fn versions() -> Vec<String> {
    let newest = Command::new("python3")
        .args([
            "-c",
            "import kubernetes_validate.utils as u; print(u.latest_version())",
        ])
        .output()
        .expect("running python3");
    assert!(
        newest.status.success(),
        "asking kubernetes-validate for its newest schema"
    );
    let newest = String::from_utf8(newest.stdout).unwrap().trim().to_string();
    vec!["1.29.0".into(), "1.33.0".into(), newest]
}

#[test]
fn every_kustomization_validates_strictly_for_old_and_new_kubernetes() {
    manifests::require(
        "kubernetes-validate",
        "pip install kubernetes-validate==1.37.0 (.ci/run does)",
    );
    let dir = tempfile::tempdir().unwrap();
    let mut files = vec![manifests::deploy_dir().join("secrets.example.yaml")];
    for k in KUSTOMIZATIONS {
        let objects = render(&manifests::deploy_dir().join(k));
        let text: String = objects
            .iter()
            .map(|o| format!("---\n{}", serde_norway::to_string(o).unwrap()))
            .collect();
        let file = dir.path().join(format!("{}.yaml", k.replace('/', "-")));
        std::fs::write(&file, text).unwrap();
        files.push(file);
    }
    for version in versions() {
        let checked = run(
            Command::new("kubernetes-validate")
                .args(["--strict", "--quiet", "-k", &version])
                .args(&files),
            LIMIT,
        );
        assert!(
            checked.status.success(),
            "kubernetes-validate -k {version}:\n{}\n{}",
            checked.stdout,
            checked.stderr
        );
    }
}

/// The values the Secrets would hold.
fn secrets() -> BTreeMap<(String, String), String> {
    let text =
        std::fs::read_to_string(manifests::deploy_dir().join("secrets.example.yaml")).unwrap();
    let mut values = BTreeMap::new();
    for doc in serde_norway::Deserializer::from_str(&text) {
        let secret = <Value as serde::Deserialize>::deserialize(doc).unwrap();
        let name = secret["metadata"]["name"].as_str().unwrap().to_string();
        for (key, _) in secret["stringData"].as_object().unwrap() {
            values.insert(
                (name.clone(), key.clone()),
                format!("test-{key}-0123456789abcdef"),
            );
        }
    }
    values
}

/// Runs `c` as its pod would (command, args, env, the ConfigMap file at
/// its mount path) with `--print-config`, and returns the effective
/// configuration: the binary refuses an unknown flag, env key or config key.
fn effective_config(objects: &[Value], c: &Container, scratch: &Path) -> toml::Table {
    let env = c.environment(&secrets(), 0);
    let mut argv = c.argv(&env);
    if let Some(at) = c.mounts.get("config") {
        let file = scratch.join(format!("{}.toml", c.job));
        std::fs::write(&file, config_file(objects, c, "config", "run.toml")).unwrap();
        let mounted = format!("{at}/run.toml");
        for arg in &mut argv {
            if *arg == mounted {
                *arg = file.display().to_string();
            }
        }
    }
    let binary = Path::new(&argv[0]).file_name().unwrap().to_str().unwrap();
    let mut command = Command::new(workspace_bin(binary));
    command.args(&argv[1..]).arg("--print-config");
    for (key, _) in std::env::vars() {
        if key.starts_with("GANCLUSTER") || key.starts_with("AWS_") {
            command.env_remove(key);
        }
    }
    command.envs(env);
    let printed = run(&mut command, LIMIT);
    assert!(
        printed.status.success(),
        "{}: {argv:?} is refused by the binary:\n{}",
        c.job,
        printed.stderr
    );
    printed
        .stdout
        .parse()
        .unwrap_or_else(|e| panic!("{}: printed config: {e}", c.job))
}

fn port_of(address: &str) -> u16 {
    let port = address.rsplit(':').next().unwrap();
    port.trim_end_matches('/')
        .parse()
        .unwrap_or_else(|_| panic!("a port in {address}"))
}

fn probe(c: &Container, which: &str) -> (u16, String) {
    let grpc = &c.raw[which]["grpc"];
    assert!(grpc.is_object(), "{}: {which} is not a grpc probe", c.job);
    (
        grpc["port"].as_u64().unwrap() as u16,
        grpc["service"].as_str().unwrap_or("").to_string(),
    )
}

/// Health and metrics flags listen on the container ports the probes and
/// scrape annotations name, with the service names the binaries serve.
fn check_observability(c: &Container, readiness: &str) {
    let health = port_of(c.flag("--health-listen").expect("--health-listen"));
    let metrics = port_of(c.flag("--metrics-listen").expect("--metrics-listen"));
    assert_eq!(
        c.ports.get("health"),
        Some(&health),
        "{}: health port",
        c.job
    );
    assert_eq!(
        c.ports.get("metrics"),
        Some(&metrics),
        "{}: metrics port",
        c.job
    );
    assert_eq!(
        probe(c, "readinessProbe"),
        (health, readiness.into()),
        "{}",
        c.job
    );
    assert_eq!(
        probe(c, "livenessProbe"),
        (health, String::new()),
        "{}",
        c.job
    );
}

#[test]
fn the_pods_flags_env_keys_and_ports_are_ones_the_binaries_accept() {
    let scratch = tempfile::tempdir().unwrap();
    for overlay in ["base", "overlays/cpu", "overlays/gpu"] {
        let objects = render(&manifests::deploy_dir().join(overlay));
        let coordinator = container(&objects, "gancluster-coordinator");
        let workers = container(&objects, "gancluster-workers");
        let cfg = effective_config(&objects, &coordinator, scratch.path());
        let worker_cfg = effective_config(&objects, &workers, scratch.path());
        assert_eq!(
            cfg, worker_cfg,
            "{overlay}: every pod must read the same configuration"
        );

        // The coordinator listens on its `grpc` port, which the Service
        // fronts, and the workers dial the Service by name and port.
        let listen = cfg["coordinator"]["listen"].as_str().unwrap();
        assert_eq!(
            coordinator.ports.get("grpc"),
            Some(&port_of(listen)),
            "{overlay}"
        );
        let service = find(&objects, "Service", "gancluster-coordinator");
        let port = &service["spec"]["ports"][0];
        assert_eq!(port["targetPort"], "grpc", "{overlay}");
        let dialed = workers.flag("--coordinator").unwrap();
        assert_eq!(
            dialed,
            format!("http://gancluster-coordinator:{}", port["port"]),
            "{overlay}: the workers' --coordinator"
        );

        // The GPU overlay's workers run the CUDA image on a GPU each; the
        // coordinator (no burn) and every CPU pod the CPU image.
        let gpu = overlay == "overlays/gpu";
        let worker_tag = if gpu { ":cuda" } else { ":cpu" };
        assert!(
            workers.image.ends_with(worker_tag),
            "{overlay}: workers run {}",
            workers.image
        );
        assert!(
            coordinator.image.ends_with(":cpu"),
            "{overlay}: the coordinator runs {}",
            coordinator.image
        );
        assert_eq!(
            workers.raw["resources"]["limits"]["nvidia.com/gpu"].as_str() == Some("1"),
            gpu,
            "{overlay}: GPU limit {}",
            workers.raw["resources"]
        );

        // As many worker pods as the coordinator waits for, each its rank.
        let job = &find(&objects, "Job", "gancluster-workers")["spec"];
        let expected: u64 = coordinator.flag("--workers").unwrap().parse().unwrap();
        assert_eq!(job["completions"].as_u64(), Some(expected), "{overlay}");
        assert_eq!(job["parallelism"].as_u64(), Some(expected), "{overlay}");
        assert_eq!(job["completionMode"], "Indexed", "{overlay}");
        assert_eq!(
            workers.flag("--rank"),
            Some("$(JOB_COMPLETION_INDEX)"),
            "{overlay}"
        );
        assert!(
            workers
                .env
                .iter()
                .any(|(n, s)| n == "JOB_COMPLETION_INDEX" && matches!(s, Source::Field(_))),
            "{overlay}: the rank comes from the completion index"
        );

        // The configuration error exit code fails the Job instead of looping.
        for name in ["gancluster-coordinator", "gancluster-workers"] {
            let rules = &find(&objects, "Job", name)["spec"]["podFailurePolicy"]["rules"];
            assert_eq!(rules[0]["action"], "FailJob", "{overlay} {name}");
            assert_eq!(
                rules[0]["onExitCodes"]["values"][0].as_u64(),
                Some(u64::from(common::process::report::CONFIG)),
                "{overlay} {name}: the exit code of a configuration error"
            );
        }

        check_observability(&coordinator, observe::COORDINATOR);
        check_observability(&workers, observe::WORKER);
        for c in [&coordinator, &workers] {
            let annotations =
                &find(&objects, "Job", &c.job)["spec"]["template"]["metadata"]["annotations"];
            assert_eq!(
                annotations["prometheus.io/scrape"], "true",
                "{overlay} {}",
                c.job
            );
            assert_eq!(
                annotations["prometheus.io/port"]
                    .as_str()
                    .map(|p| p.parse::<u16>().unwrap()),
                Some(c.ports["metrics"]),
                "{overlay} {}: the scrape port",
                c.job
            );
        }

        // The data the workers read is where the data Job puts it.
        let data = cfg["data"]["source"].as_str().unwrap();
        assert!(
            data.starts_with(&workers.mounts["data"]),
            "{overlay}: data.source {data}"
        );
    }
    let objects = render(&manifests::deploy_dir().join("data"));
    let fetch = container(&objects, "gancluster-data");
    effective_config(&objects, &fetch, scratch.path());
    let to = fetch.flag("--to").unwrap();
    assert!(
        to.starts_with(&fetch.mounts["data"]),
        "the data Job fills its volume"
    );
}
