//! The Kubernetes manifests as a test reads them: a kustomization rendered
//! with `kubectl kustomize`, and each Job's pod as the kubelet would start
//! it (command, args with `$(VAR)` expanded, env from literals, Secrets and
//! the completion index, ports, volumes).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The repository's `deploy/` folder.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .join("deploy")
}

/// `program` must be installed; the test fails saying how to get it.
pub fn require(program: &str, how: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "`{program}` is not installed, and this test needs it: {how}"
    );
}

/// Every object `kubectl kustomize dir` renders.
pub fn render(dir: &Path) -> Vec<Value> {
    require(
        "kubectl",
        "install Debian's kubernetes-client (.ci/run does) or kubectl 1.27+",
    );
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("running kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("YAML is UTF-8");
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| {
            <Value as serde::Deserialize>::deserialize(doc)
                .unwrap_or_else(|e| panic!("rendered YAML of {}: {e}", dir.display()))
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// The object of `kind` whose name is `name`.
pub fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} named {name} in the rendered manifests"))
}

/// What one env entry of a container takes its value from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `value:`.
    Literal(String),
    /// `valueFrom.secretKeyRef`.
    Secret {
        /// The Secret.
        name: String,
        /// Its key.
        key: String,
    },
    /// `valueFrom.fieldRef` (the completion index, in these manifests).
    Field(String),
}

/// A container of a Job's pod template.
#[derive(Debug, Clone)]
pub struct Container {
    /// The Job.
    pub job: String,
    /// The image, as rendered.
    pub image: String,
    /// `command`.
    pub command: Vec<String>,
    /// `args`, before `$(VAR)` expansion.
    pub args: Vec<String>,
    /// `env`, in order.
    pub env: Vec<(String, Source)>,
    /// Named container ports.
    pub ports: BTreeMap<String, u16>,
    /// Mount path of each volume, by volume name.
    pub mounts: BTreeMap<String, String>,
    /// The whole container object, for what the fields above leave out.
    pub raw: Value,
    /// The pod spec it belongs to.
    pub pod: Value,
}

/// The first container of Job `name`.
pub fn container(objects: &[Value], name: &str) -> Container {
    let job = find(objects, "Job", name);
    let pod = job["spec"]["template"]["spec"].clone();
    let c = pod["containers"][0].clone();
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|s| s.as_str().expect("a string").to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    let env = c["env"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    let name = e["name"].as_str().expect("env name").to_string();
                    let from = &e["valueFrom"];
                    let source = if let Some(v) = e["value"].as_str() {
                        Source::Literal(v.into())
                    } else if from["secretKeyRef"].is_object() {
                        Source::Secret {
                            name: from["secretKeyRef"]["name"].as_str().unwrap().into(),
                            key: from["secretKeyRef"]["key"].as_str().unwrap().into(),
                        }
                    } else {
                        Source::Field(from["fieldRef"]["fieldPath"].as_str().unwrap().into())
                    };
                    (name, source)
                })
                .collect()
        })
        .unwrap_or_default();
    let ports = c["ports"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    (
                        p["name"].as_str().expect("named port").to_string(),
                        p["containerPort"].as_u64().expect("port") as u16,
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let mounts = c["volumeMounts"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| {
                    (
                        m["name"].as_str().unwrap().to_string(),
                        m["mountPath"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    Container {
        job: name.into(),
        image: c["image"].as_str().expect("image").into(),
        command: strings(&c["command"]),
        args: strings(&c["args"]),
        env,
        ports,
        mounts,
        raw: c,
        pod,
    }
}

impl Container {
    /// The environment as the kubelet sets it: Secrets' values from
    /// `secrets` ((name, key) → value), the completion index as `index`.
    pub fn environment(
        &self,
        secrets: &BTreeMap<(String, String), String>,
        index: usize,
    ) -> Vec<(String, String)> {
        self.env
            .iter()
            .map(|(name, source)| {
                let value = match source {
                    Source::Literal(v) => v.clone(),
                    Source::Secret { name: s, key } => secrets
                        .get(&(s.clone(), key.clone()))
                        .unwrap_or_else(|| {
                            panic!("{}: no value for Secret {s} key {key}", self.job)
                        })
                        .clone(),
                    Source::Field(path) => {
                        assert!(
                            path.contains("job-completion-index"),
                            "{}: env {name} reads field {path}, which the rehearsal does not know",
                            self.job
                        );
                        index.to_string()
                    }
                };
                (name.clone(), value)
            })
            .collect()
    }

    /// `command` then `args`, with `$(VAR)` replaced from `env` as the
    /// kubelet does (an unknown variable stays as written).
    pub fn argv(&self, env: &[(String, String)]) -> Vec<String> {
        let expand = |arg: &String| {
            env.iter().fold(arg.clone(), |a, (name, value)| {
                a.replace(&format!("$({name})"), value)
            })
        };
        self.command.iter().chain(&self.args).map(expand).collect()
    }

    /// The value following flag `flag` in `args`.
    pub fn flag(&self, flag: &str) -> Option<&str> {
        let at = self.args.iter().position(|a| a == flag)?;
        self.args.get(at + 1).map(String::as_str)
    }

    /// The volume named `name` of the pod.
    pub fn volume(&self, name: &str) -> &Value {
        self.pod["volumes"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["name"] == name))
            .unwrap_or_else(|| panic!("{}: no volume {name}", self.job))
    }
}

/// The file `key` of the ConfigMap a container's volume `volume` mounts.
pub fn config_file(objects: &[Value], container: &Container, volume: &str, key: &str) -> String {
    let map = container.volume(volume)["configMap"]["name"]
        .as_str()
        .unwrap_or_else(|| panic!("{}: volume {volume} is not a ConfigMap", container.job));
    find(objects, "ConfigMap", map)["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("ConfigMap {map} has no key {key}"))
        .to_string()
}
