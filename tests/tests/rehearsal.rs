//! The Kubernetes deployment rehearsed in real containers: the `cpu`
//! overlay rendered by kustomize (with the patches a user makes: a short
//! run, the S3 endpoint), its pods started as Docker containers from the
//! image `deploy/Containerfile` describes, as the kubelet would start them
//! (command, args, env from the ConfigMap and Secrets, the completion
//! index, a read-only root, no capabilities, the Service's name as a
//! network alias), against a real S3 server.
//!
//! It shows what a cluster would: the data Job fills the volume; the run
//! trains to completion and every pod exits 0; a worker container killed
//! mid-run is replaced (as the Indexed Job does) and its replacement
//! rejoins; the coordinator container killed mid-run is replaced and its
//! replacement takes the run over; health probes answer and /metrics
//! scrapes through the containers' ports.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::process::observe;
use common::storage::checkpoint;
use gancluster_tests::manifests::{self, Container, config_file, container, render};
use gancluster_tests::probes::{ServingStatus, get, health, metric};
use gancluster_tests::s3::{ACCESS_KEY, BUCKET, S3Server, SECRET_KEY};
use gancluster_tests::{run, wait_until, workspace_bin};
use serde_json::Value;

const STEPS: u64 = 300;
/// Building the image, starting containers, training: generous, bounded.
const LIMIT: Duration = Duration::from_secs(300);

/// Containers, network and volume of one rehearsal, removed when dropped
/// (also when the test fails).
struct Docker {
    /// Names every container, the network and the volume.
    prefix: String,
    volume: String,
    containers: std::cell::RefCell<Vec<String>>,
}

fn docker(args: &[&str]) -> String {
    let done = run(Command::new("docker").args(args), LIMIT);
    assert!(
        done.status.success(),
        "docker {args:?} failed:\n{}",
        done.stderr
    );
    done.stdout.trim().to_string()
}

impl Docker {
    fn new() -> Self {
        manifests::require("docker", "install Docker Engine and start it");
        let prefix = format!("gancluster-rehearsal-{}", std::process::id());
        let volume = format!("{prefix}-celeba");
        docker(&["network", "create", &prefix]);
        docker(&["volume", "create", &volume]);
        Self {
            prefix,
            volume,
            containers: Default::default(),
        }
    }

    /// The network's gateway: the host, as the containers see it.
    fn gateway(&self) -> String {
        docker(&[
            "network",
            "inspect",
            "-f",
            "{{(index .IPAM.Config 0).Gateway}}",
            &self.prefix,
        ])
    }

    /// Starts `c` as pod `name` of index `index`, the way the kubelet would.
    fn start(
        &self,
        name: &str,
        c: &Container,
        index: usize,
        alias: Option<&str>,
        files: &Path,
        objects: &[Value],
    ) -> String {
        let name = format!("{}-{name}", self.prefix);
        let env = c.environment(&secrets(), index);
        let argv = c.argv(&env);
        let mut args: Vec<String> = ["run", "-d", "--name", &name, "--network", &self.prefix]
            .map(String::from)
            .into();
        if let Some(alias) = alias {
            args.extend(["--network-alias".into(), alias.into()]);
        }
        let pod = &c.pod["securityContext"];
        args.extend([
            "--user".into(),
            format!("{}:{}", pod["runAsUser"], pod["runAsGroup"]),
        ]);
        let own = &c.raw["securityContext"];
        if own["readOnlyRootFilesystem"] == true {
            args.push("--read-only".into());
        }
        if own["allowPrivilegeEscalation"] == false {
            args.extend(["--security-opt".into(), "no-new-privileges".into()]);
        }
        if own["capabilities"]["drop"][0] == "ALL" {
            args.extend(["--cap-drop".into(), "ALL".into()]);
        }
        for (volume, path) in &c.mounts {
            let spec = c.volume(volume);
            if spec["emptyDir"].is_object() {
                args.extend(["--tmpfs".into(), format!("{path}:mode=1777")]);
            } else if spec["configMap"].is_object() {
                let folder = files.join(format!("{}-{volume}", c.job));
                std::fs::create_dir_all(&folder).unwrap();
                std::fs::write(
                    folder.join("run.toml"),
                    config_file(objects, c, volume, "run.toml"),
                )
                .unwrap();
                args.extend(["-v".into(), format!("{}:{path}:ro", folder.display())]);
            } else if spec["persistentVolumeClaim"]["claimName"] == "celeba" {
                let ro = if spec["persistentVolumeClaim"]["readOnly"] == true {
                    ":ro"
                } else {
                    ""
                };
                args.extend(["-v".into(), format!("{}:{path}{ro}", self.volume)]);
            } else {
                panic!(
                    "{}: volume {volume} is of a kind the rehearsal does not know",
                    c.job
                );
            }
        }
        for (key, value) in &env {
            args.extend(["-e".into(), format!("{key}={value}")]);
        }
        args.extend(["--entrypoint".into(), argv[0].clone(), c.image.clone()]);
        args.extend(argv[1..].iter().cloned());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        docker(&refs);
        self.containers.borrow_mut().push(name.clone());
        name
    }

    /// Waits for container `name` to exit; its exit code.
    fn wait(&self, name: &str) -> i32 {
        docker(&["wait", name]).parse().expect("an exit code")
    }

    fn kill(&self, name: &str) {
        docker(&["kill", name]);
    }

    fn logs(&self, name: &str) -> String {
        let done = run(Command::new("docker").args(["logs", name]), LIMIT);
        format!("{}{}", done.stdout, done.stderr)
    }

    fn ip(&self, name: &str) -> String {
        docker(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            name,
        ])
    }

    /// Waits until container `name` says `service` is SERVING on its
    /// health `port`; fails at once, with its logs, if it exits first.
    fn serving(&self, name: &str, port: u16, service: &str) {
        let ip = self.ip(name);
        wait_until(LIMIT, &format!("{service} SERVING in {name}"), || {
            if health(&ip, port, service) == Some(ServingStatus::Serving) {
                return Some(());
            }
            self.alive(name);
            None
        });
    }

    /// Fails with its logs if container `name` has exited.
    fn alive(&self, name: &str) {
        let running = docker(&["inspect", "-f", "{{.State.Running}}", name]);
        assert!(running == "true", "{name} exited:\n{}", self.logs(name));
    }

    /// Waits until the coordinator `name` reports step `step` on its
    /// metrics `port`; the step it reported.
    fn step_reaches(&self, name: &str, port: u16, step: f64) -> f64 {
        let ip = self.ip(name);
        wait_until(LIMIT, &format!("gancluster_step reaching {step}"), || {
            let now = scrape(&ip, port).and_then(|t| metric(&t, "gancluster_step"));
            match now {
                Some(now) if now >= step => Some(now),
                _ => {
                    self.alive(name);
                    None
                }
            }
        })
    }

    /// What `fsGroup` does for the pods: the volume is theirs to write.
    fn start_root_chown(&self, image: &str) {
        docker(&[
            "run",
            "--rm",
            "--user",
            "0",
            "-v",
            &format!("{}:/data", self.volume),
            "--entrypoint",
            "/bin/chown",
            image,
            "10001:10001",
            "/data",
        ]);
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        let quiet = |args: &[&str]| {
            let _ = Command::new("docker").args(args).output();
        };
        for name in self.containers.borrow().iter() {
            quiet(&["rm", "-f", name]);
        }
        quiet(&["network", "rm", &self.prefix]);
        quiet(&["volume", "rm", "-f", &self.volume]);
    }
}

/// What the Secrets hold here: the S3 server's keys, a token.
fn secrets() -> BTreeMap<(String, String), String> {
    let pair = |s: &str, k: &str, v: &str| ((s.to_string(), k.to_string()), v.to_string());
    [
        pair(
            "gancluster-token",
            "token",
            "rehearsal-token-0123456789abcdef",
        ),
        pair("gancluster-s3", "access_key_id", ACCESS_KEY),
        pair("gancluster-s3", "secret_access_key", SECRET_KEY),
    ]
    .into()
}

/// A kustomization over `base` (a folder of deploy/) adding `env` to the
/// named Jobs' containers: the patch a user writes for their cluster.
fn overlay(dir: &Path, base: &str, jobs: &[(&str, &str)], env: &[(&str, String)]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let entries: String = env
        .iter()
        .map(|(k, v)| format!("            - name: {k}\n              value: \"{v}\"\n"))
        .collect();
    let patches: String = jobs
        .iter()
        .map(|(job, container)| {
            format!(
                "  - patch: |-\n      apiVersion: batch/v1\n      kind: Job\n      metadata:\n        name: {job}\n      spec:\n        template:\n          spec:\n            containers:\n              - name: {container}\n                env:\n{}",
                entries
                    .lines()
                    .map(|l| format!("    {l}\n"))
                    .collect::<String>()
            )
        })
        .collect();
    // kustomize takes only relative paths to other kustomizations.
    let up = "../".repeat(dir.components().count() - 1);
    let target = manifests::deploy_dir().join(base);
    let text = format!(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {up}{}\npatches:\n{patches}",
        target
            .strip_prefix("/")
            .expect("an absolute path")
            .display()
    );
    std::fs::write(dir.join("kustomization.yaml"), text).unwrap();
    dir.to_path_buf()
}

/// Builds the image the manifests name from this build's binaries.
fn build_image(image: &str) {
    manifests::require("docker", "install Docker Engine and start it");
    let binaries = workspace_bin("worker").parent().unwrap().to_path_buf();
    let script = manifests::deploy_dir().join("image.sh");
    let built = run(
        Command::new(&script).args([
            "--local-base",
            "--binaries",
            binaries.to_str().unwrap(),
            "--tag",
            image,
        ]),
        LIMIT,
    );
    assert!(
        built.status.success(),
        "deploy/image.sh failed (it needs docker, and debootstrap for --local-base):\n{}\n{}",
        built.stdout,
        built.stderr
    );
}

/// The text of `http://ip:port/metrics`.
fn scrape(ip: &str, port: u16) -> Option<String> {
    get(ip, port, "/metrics")
}

#[test]
fn the_cpu_overlay_runs_in_containers_survives_kills_and_finishes() {
    let pods = Docker::new();
    let scratch = tempfile::tempdir().unwrap();
    let gateway = pods.gateway();
    let s3 = S3Server::start_on(&gateway);

    // The data set, uploaded to the bucket as a user would.
    let synth = scratch.path().join("celeba");
    let made = run(
        Command::new(workspace_bin("worker"))
            .args(["synth", "--count", "64", "--out"])
            .arg(&synth),
        LIMIT,
    );
    assert!(made.status.success(), "worker synth: {}", made.stderr);
    upload(&s3, &synth, "celeba");

    let endpoint = s3.endpoint().to_string();
    let s3_env = vec![
        ("GANCLUSTER__CHECKPOINT__S3__ENDPOINT", endpoint.clone()),
        ("GANCLUSTER__CHECKPOINT__S3__ALLOW_HTTP", "true".into()),
    ];
    let data_dir = overlay(
        &scratch.path().join("data"),
        "data",
        &[("gancluster-data", "fetch")],
        &[
            s3_env.clone(),
            vec![("GANCLUSTER_DATA_FROM", format!("s3://{BUCKET}/celeba"))],
        ]
        .concat(),
    );
    let mut run_env = s3_env;
    run_env.extend([
        (
            "GANCLUSTER__CHECKPOINT__STORE",
            format!("s3://{BUCKET}/rehearsal"),
        ),
        ("GANCLUSTER__CHECKPOINT__EVERY", "20".into()),
        ("GANCLUSTER__TRAIN__STEPS", STEPS.to_string()),
        ("GANCLUSTER__TRAIN__BATCH_SIZE", "8".into()),
        ("GANCLUSTER__MODEL__IMAGE_SIZE", "16".into()),
        ("GANCLUSTER__MODEL__NGF", "8".into()),
        ("GANCLUSTER__MODEL__NDF", "8".into()),
    ]);
    let train_dir = overlay(
        &scratch.path().join("train"),
        "overlays/cpu",
        &[
            ("gancluster-coordinator", "coordinator"),
            ("gancluster-workers", "worker"),
        ],
        &run_env,
    );
    let data = render(&data_dir);
    let objects = render(&train_dir);
    let fetch = container(&data, "gancluster-data");
    let coordinator = container(&objects, "gancluster-coordinator");
    let workers = container(&objects, "gancluster-workers");
    build_image(&coordinator.image);
    let files = scratch.path().join("mounts");

    // fsGroup: the volume belongs to the pods' group.
    pods.start_root_chown(&fetch.image);
    let fetched = pods.start("data", &fetch, 0, None, &files, &data);
    assert_eq!(
        pods.wait(&fetched),
        0,
        "the data Job:\n{}",
        pods.logs(&fetched)
    );

    let alias = "gancluster-coordinator";
    let coord = pods.start(
        "coordinator",
        &coordinator,
        0,
        Some(alias),
        &files,
        &objects,
    );
    let w0 = pods.start("worker-0", &workers, 0, None, &files, &objects);
    let w1 = pods.start("worker-1", &workers, 1, None, &files, &objects);
    let health_port = coordinator.ports["health"];
    let metrics_port = coordinator.ports["metrics"];
    let coord_ip = pods.ip(&coord);
    pods.serving(&coord, health_port, observe::COORDINATOR);
    for w in [&w0, &w1] {
        pods.serving(w, workers.ports["health"], observe::WORKER);
        assert!(
            scrape(&pods.ip(w), workers.ports["metrics"]).is_some(),
            "{w} /metrics"
        );
    }

    // A worker pod killed mid-run; the Job starts another with its index.
    pods.step_reaches(&coord, metrics_port, 5.0);
    pods.kill(&w1);
    let w1b = pods.start("worker-1-again", &workers, 1, None, &files, &objects);
    pods.serving(&w1b, workers.ports["health"], observe::WORKER);
    let regrouped = wait_until(LIMIT, "the coordinator counting the regroup", || {
        let text = scrape(&coord_ip, metrics_port)?;
        (metric(&text, "gancluster_regroups_total")? >= 1.0).then_some(text)
    });
    let before = metric(&regrouped, "gancluster_step").unwrap_or(0.0);

    // The coordinator pod killed mid-run, after a checkpoint; the Job
    // starts another, which takes the run over and re-forms the group.
    let at = pods.step_reaches(&coord, metrics_port, before + 25.0);
    assert!(
        at < (STEPS - 1) as f64,
        "the run ended before the coordinator could be killed"
    );
    pods.kill(&coord);
    let coord_b = pods.start(
        "coordinator-again",
        &coordinator,
        0,
        Some(alias),
        &files,
        &objects,
    );

    for name in [&coord_b, &w0, &w1b] {
        assert_eq!(
            pods.wait(name),
            0,
            "{name} did not finish:\n{}",
            pods.logs(name)
        );
    }
    let logs = pods.logs(&coord_b);
    assert!(logs.contains("took over the lease"), "{logs}");
    let formed = logs
        .lines()
        .find(|l| l.contains("the group formed"))
        .unwrap_or_else(|| panic!("no group formed:\n{logs}"));
    assert!(formed.contains("\"steps_retrained\":0"), "{formed}");
    let latest = std::fs::read_to_string(s3.object_path("rehearsal/dcgan-32-cpu/latest"))
        .expect("the run's latest checkpoint");
    assert_eq!(
        latest.trim(),
        checkpoint::name(STEPS),
        "the last checkpoint is the run's end"
    );
    assert!(
        pods.logs(&w1b).contains("joined"),
        "the replacement worker joined the group"
    );
}

/// Uploads every file under `folder` to `prefix` of the server's bucket
/// through the S3 API.
fn upload(s3: &S3Server, folder: &Path, prefix: &str) {
    let mut cfg = common::Config::default().checkpoint;
    cfg.store = format!("s3://{BUCKET}/{prefix}");
    cfg.s3.endpoint = s3.endpoint().into();
    cfg.s3.allow_http = true;
    cfg.s3.access_key_id = ACCESS_KEY.into();
    cfg.s3.secret_access_key = SECRET_KEY.to_string().into();
    let store = common::storage::store::Store::open(&cfg).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut stack = vec![folder.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let key = path
                .strip_prefix(folder)
                .unwrap()
                .to_str()
                .unwrap()
                .to_string();
            let body = bytes::Bytes::from(std::fs::read(&path).unwrap());
            runtime.block_on(store.put(&key, body)).unwrap();
        }
    }
}
