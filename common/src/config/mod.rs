//! The one validated configuration every process runs from.
//!
//! Raw input comes from three layers, later ones winning: a TOML file, the
//! `GANCLUSTER__SECTION__KEY` environment variables, and CLI flags (passed
//! in as `section.key = value` overrides), with types kept
//! ([`load`](self::load)). The result is checked once, against a range for
//! every key ([`validate`](self::validate)), before anything runs, and every
//! error names the key that is wrong, so a typo never silently falls back to
//! a default.

mod load;
mod shapes;
mod validate;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use load::ENV_PREFIX;

/// Everything wrong with a configuration, each naming what to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The configuration file cannot be read.
    #[error("cannot read the configuration file {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The configuration file is not TOML.
    #[error("the configuration file {path} is not valid TOML: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A key that does not exist, or a value of the wrong type.
    #[error(
        "configuration key `{key}` (from {origin}): {message} \
         (every key is in docs/configuration.md)"
    )]
    Type {
        /// The dotted key, e.g. `train.steps`.
        key: String,
        /// The file, variable or flag that set it.
        origin: String,
        /// What is wrong.
        message: String,
    },
    /// A key holds a value training cannot use.
    #[error("configuration key `{key}` = {value}: {expected}")]
    Invalid {
        /// The dotted key, e.g. `model.image_size`.
        key: &'static str,
        /// The rejected value as written.
        value: String,
        /// What would be accepted.
        expected: String,
    },
    /// A flag that makes no sense where it was given.
    #[error("{flag}: {reason}")]
    Flag {
        /// The flag.
        flag: &'static str,
        /// Why it cannot be used here.
        reason: &'static str,
    },
    /// The effective configuration could not be rendered back to TOML.
    #[error("rendering the configuration as TOML: {0}")]
    Render(toml::ser::Error),
}

/// The complete, validated configuration of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Network shapes.
    pub model: ModelConfig,
    /// Optimisation and schedule.
    pub train: TrainConfig,
    /// Where images come from.
    pub data: DataConfig,
    /// Where artifacts go.
    pub output: OutputConfig,
    /// How the coordinator forms the group.
    pub coordinator: CoordinatorConfig,
    /// How gradients travel.
    pub allreduce: AllReduceConfig,
    /// Where and how often the run is saved.
    pub checkpoint: CheckpointConfig,
    /// Encryption and certificates between workers and the coordinator.
    pub tls: TlsConfig,
}

/// DCGAN shapes; defaults are the reference 64×64 network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Side of the square images, one of 16, 32, 64, 128; the number of
    /// up/down-sampling layers follows from it.
    pub image_size: usize,
    /// Length of the noise vector z.
    pub nz: usize,
    /// Generator feature maps in its last hidden layer.
    pub ngf: usize,
    /// Discriminator feature maps in its first layer.
    pub ndf: usize,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            image_size: 64,
            nz: 100,
            ngf: 64,
            ndf: 64,
        }
    }
}

/// Optimiser and schedule; defaults are the DCGAN paper's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Training iterations (one D step and one G step each).
    pub steps: u64,
    /// Images per batch on each worker.
    pub batch_size: usize,
    /// Adam learning rate for both networks.
    pub lr: f64,
    /// Adam β1.
    pub beta1: f64,
    /// Adam β2.
    pub beta2: f64,
    /// Seeds weights, noise and data order: same seed, same run.
    pub seed: u64,
    /// Log a line every this many steps.
    pub log_every: u64,
    /// What a group with fewer workers than it started with keeps
    /// constant (see [`ElasticBatch`]).
    pub elastic_batch: ElasticBatch,
    /// All-reduce every this many steps (post-local SGD: each replica
    /// trains alone in between, then all average their parameters and
    /// Adam moments); 1 all-reduces every step's gradients.
    pub sync_every: u64,
    /// Steps that all-reduce their whole gradients before post-local SGD's
    /// first local step (a multiple of `sync_every`) or PowerSGD's first
    /// compressed one.
    pub sync_warmup: u64,
}

/// What stays constant when the group shrinks below the workers it was
/// started with (or grows back).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ElasticBatch {
    /// Each worker keeps `train.batch_size`: the global batch shrinks with
    /// the group (fewer images per optimizer step, the same learning rate),
    /// as Horovod elastic and torchrun do.
    #[default]
    PerWorker,
    /// The global batch stays `train.batch_size` × the workers the run was
    /// started with: each worker's batch grows as the group shrinks, so
    /// every optimizer step sees as many images as before (it must divide
    /// evenly for every group size the run allows).
    Global,
}

impl ElasticBatch {
    /// Each worker's batch in a group of `world` out of `workers`, or the
    /// reason there is none.
    pub fn per_worker(
        self,
        batch_size: usize,
        workers: usize,
        world: usize,
    ) -> Result<usize, String> {
        match self {
            Self::PerWorker => Ok(batch_size),
            Self::Global => {
                let global = batch_size * workers;
                match world > 0 && global.is_multiple_of(world) {
                    true => Ok(global / world),
                    false => Err(format!(
                        "the global batch of {global} ({workers} workers × train.batch_size \
                         {batch_size}) does not divide among {world} workers \
                         (train.elastic_batch = \"global\"): pick a batch size every allowed \
                         group size divides, or train.elastic_batch = \"per_worker\""
                    )),
                }
            }
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 1000,
            batch_size: 128,
            lr: 2e-4,
            beta1: 0.5,
            beta2: 0.999,
            seed: 42,
            log_every: 10,
            elastic_batch: ElasticBatch::PerWorker,
            sync_every: 1,
            sync_warmup: 0,
        }
    }
}

/// The data set partition to read, as in CelebA's `list_eval_partition.txt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Partition 0.
    Train,
    /// Partition 1.
    Val,
    /// Partition 2.
    Test,
    /// Every image, with or without a partition file.
    All,
}

/// Where training images come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// `synthetic` for the built-in face-like set, or a folder: a CelebA
    /// root holding `img_align_celeba/`, or any folder of JPEG/PNG files.
    pub source: String,
    /// Which partition to train on.
    pub split: Split,
    /// Images in the built-in synthetic set's training split.
    pub synthetic_size: usize,
    /// Batches decoded ahead of the one being trained on.
    pub prefetch: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            source: "synthetic".into(),
            split: Split::Train,
            synthetic_size: 20_000,
            prefetch: 2,
        }
    }
}

/// Where a run writes its artifacts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutputConfig {
    /// Folder for the sample grid, loss CSV and effective config.
    pub dir: PathBuf,
    /// Whether rank 0 writes TensorBoard event files under
    /// `<dir>/tensorboard/<checkpoint.run>/`.
    pub tensorboard: bool,
}

impl Default for OutputConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("runs/default"),
            tensorboard: true,
        }
    }
}

/// Rendezvous and serving.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// TCP address the gRPC service listens on; port 0 picks a free one.
    pub listen: String,
    /// Seconds to wait for all workers to join before giving up.
    pub join_timeout_s: u64,
    /// Seconds between a worker's heartbeats (the coordinator hands its
    /// value to every worker at join) and between a worker's HTTP/2 pings
    /// to the coordinator.
    pub heartbeat_interval_s: u64,
    /// Seconds of silence after which the coordinator declares a worker
    /// lost (hung, stopped, partitioned) and a worker declares the
    /// coordinator lost: a stream that stays open proves nothing.
    pub heartbeat_timeout_s: u64,
    /// Seconds the group may go without completing a step before the run
    /// fails: the only sign of a worker whose training thread hangs (a
    /// stuck GPU, a deadlock) while its process still heartbeats.
    pub step_timeout_s: u64,
    /// How often the group re-forms after a failure (a worker crashed, went
    /// silent, hung or diverged) before the run gives up, as torchrun's
    /// `--max-restarts`; local mode starts a replacement process each time.
    pub max_restarts: u32,
    /// The fewest workers the group continues with when one does not come
    /// back within `rejoin_timeout_s` (0: every worker, the group never
    /// shrinks). A returning or new worker grows it again.
    pub min_workers: usize,
    /// Seconds a re-forming group waits for a lost worker (or its
    /// replacement) before it continues with fewer, at least `min_workers`.
    pub rejoin_timeout_s: u64,
    /// Connections open at once; one more is closed as soon as it is
    /// accepted, so strangers cannot exhaust sockets or memory.
    pub max_connections: usize,
    /// Seconds a new connection has to present the token, and a new session
    /// to say Hello, before it is closed: a port scan, a stalled handshake or
    /// a client that never speaks holds nothing for long.
    pub handshake_timeout_s: u64,
    /// Seconds the coordinator waits, once the run is over, for members to
    /// hang up before it closes every connection itself and exits.
    pub shutdown_grace_s: u64,
    /// Seconds a worker that holds a replica keeps trying to reach a
    /// coordinator that went away (restarted, rescheduled) before it gives
    /// up; local workers, whose coordinator is their parent, use 0.
    pub reconnect_timeout_s: u64,
    /// GPUs local workers train on, as `CUDA_VISIBLE_DEVICES` names them
    /// (`0,1,2,3`, or GPU UUIDs), one per local rank in turn; empty: every
    /// GPU this process sees.
    pub gpus: String,
}

impl CoordinatorConfig {
    /// The GPUs of `gpus`, in order; none when it is empty.
    pub fn gpu_list(&self) -> Vec<String> {
        self.gpus
            .split(',')
            .map(str::trim)
            .filter(|g| !g.is_empty())
            .map(String::from)
            .collect()
    }
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:0".into(),
            join_timeout_s: 120,
            heartbeat_interval_s: 2,
            heartbeat_timeout_s: 30,
            step_timeout_s: 600,
            max_restarts: 3,
            min_workers: 0,
            rejoin_timeout_s: 60,
            max_connections: 64,
            handshake_timeout_s: 10,
            shutdown_grace_s: 5,
            reconnect_timeout_s: 300,
            gpus: String::new(),
        }
    }
}

/// The gradient all-reduce.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AllReduceConfig {
    /// Bytes per gradient chunk on the wire.
    pub chunk_bytes: usize,
    /// `f32` (exact), `bf16` (half the bytes, reduced in f32) or `int8`
    /// (a quarter, with error feedback; exact before each checkpoint).
    pub wire: crate::protocol::wire::WireFormat,
    /// PowerSGD rank: 0 sends gradients whole; r ≥ 1 sends each weight's
    /// gradient as two rank-r factors, in `wire`'s format, with error
    /// feedback (exact before each checkpoint).
    pub powersgd_rank: usize,
    /// What a gradient with NaN or ±Inf in it does to the run.
    pub nonfinite: NonFinite,
}

impl AllReduceConfig {
    /// Whether workers carry a residual from step to step (int8's rounding,
    /// PowerSGD's projection), so that the step before each checkpoint must
    /// travel exact to leave none behind.
    pub fn has_error_feedback(&self) -> bool {
        self.wire.carries_residual() || self.powersgd_rank > 0
    }
}

impl Default for AllReduceConfig {
    fn default() -> Self {
        Self {
            chunk_bytes: 4 << 20,
            wire: crate::protocol::wire::WireFormat::F32,
            powersgd_rank: 0,
            nonfinite: NonFinite::Halt,
        }
    }
}

/// The policy for a gradient holding NaN or ±Inf (an exploding loss, a
/// faulty device): averaged in, it would poison every replica at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NonFinite {
    /// Stop the run, naming the step, the network and the ranks that sent them.
    #[default]
    Halt,
    /// Skip that network's optimizer step on every rank (as a loss scaler
    /// does), count it, and go on.
    Skip,
}

/// Checkpoints: where they go, how often, how many stay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointConfig {
    /// `s3://bucket/prefix`, `file:///abs/path` or `file://relative/path`,
    /// or `memory://` (tests only: gone when the process exits).
    pub store: String,
    /// Run id: checkpoints live under `<store>/<run>/`; starting a run
    /// whose id has checkpoints resumes it.
    pub run: String,
    /// Checkpoint after every this many steps; 0 only at the end and on SIGTERM.
    pub every: u64,
    /// Checkpoints kept; older ones are deleted after each commit.
    pub keep: usize,
    /// Seconds a coordinator's lease on the run lasts unless renewed (it
    /// renews every third of it): how long a run whose coordinator died
    /// stays locked for another one.
    pub lease_s: u64,
    /// S3 connection settings (ignored by other stores).
    pub s3: S3Config,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            store: "file://runs".into(),
            run: "default".into(),
            every: 500,
            keep: 3,
            lease_s: 60,
            s3: S3Config::default(),
        }
    }
}

/// TLS on the coordinator's TCP listener. The coordinator serves TLS when
/// `server_cert` and `server_key` are set, and also requires client
/// certificates signed by `client_ca` when that is set (mutual TLS). A
/// worker dialling an `https://` address verifies the coordinator against
/// `ca` and presents `client_cert`/`client_key` when set. One file serves
/// both sides, so the keys say whose they are. Local workers connect
/// through a Unix socket in the output folder and need none of it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Coordinator: its certificate chain, PEM.
    pub server_cert: Option<PathBuf>,
    /// Coordinator: the private key of `server_cert`, PEM.
    pub server_key: Option<PathBuf>,
    /// Coordinator: the CA a worker's client certificate must chain to
    /// (mutual TLS); unset, no client certificate is asked for.
    pub client_ca: Option<PathBuf>,
    /// Worker: the CA the coordinator's certificate must chain to.
    pub ca: Option<PathBuf>,
    /// Worker: its certificate for mutual TLS, PEM.
    pub client_cert: Option<PathBuf>,
    /// Worker: the private key of `client_cert`, PEM.
    pub client_key: Option<PathBuf>,
    /// Worker: the name the coordinator's certificate must carry, when it is
    /// not the host of the address dialled.
    pub server_name: Option<String>,
}

impl TlsConfig {
    /// Whether the coordinator serves TLS.
    pub fn serves(&self) -> bool {
        self.server_cert.is_some()
    }
}

/// How to reach an S3-compatible endpoint. Empty credentials fall back to
/// the standard `AWS_*` environment variables.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Config {
    /// `http(s)://host:port` of a non-AWS server (MinIO, Ceph, s3s…); empty for AWS.
    pub endpoint: String,
    /// Signing region.
    pub region: String,
    /// Access key id; empty: `AWS_ACCESS_KEY_ID`.
    pub access_key_id: String,
    /// Secret key; empty: `AWS_SECRET_ACCESS_KEY`. Never written back out
    /// (not to `--print-config`, not to a run's `config.toml`, not to logs).
    #[serde(skip_serializing)]
    pub secret_access_key: Secret,
    /// Allow plain `http://` endpoints.
    pub allow_http: bool,
    /// Path-style requests (`endpoint/bucket/key`), which most
    /// S3-compatible servers need; false for virtual-hosted style.
    pub path_style: bool,
    /// Retries of a failed request, each after a wait of at least 0.5 s
    /// growing exponentially (with jitter) to at most 30 s.
    pub max_retries: usize,
    /// Give up retrying one request after this many seconds.
    pub retry_timeout_s: u64,
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            region: "us-east-1".into(),
            access_key_id: String::new(),
            secret_access_key: Secret::default(),
            allow_http: false,
            path_style: true,
            max_retries: 15,
            retry_timeout_s: 180,
        }
    }
}

/// A credential: usable, but shown as `***` by `Debug` so it cannot leak
/// into logs or error messages by accident.
#[derive(Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The credential itself, for the one place that signs requests.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether no credential was configured.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "***" })
    }
}

impl Config {
    /// A hash of everything that must be equal on every replica (model,
    /// training, data and all-reduce settings; not where outputs go or how
    /// the coordinator listens). Workers with another hash are refused.
    pub fn training_hash(&self) -> String {
        let relevant = (&self.model, &self.train, &self.data, &self.allreduce);
        let text = serde_json::to_string(&relevant).expect("config serialises");
        format!("{:016x}", xxhash_rust::xxh3::xxh3_64(text.as_bytes()))
    }

    /// The settings a checkpoint must share with the run resuming from it,
    /// as dotted keys: the model, the optimiser, the seed, the batch and
    /// the data set. Step count, worker count, logging, wire format and
    /// where things go may change between a checkpoint and its resumption.
    pub fn resume_identity(&self) -> std::collections::BTreeMap<String, String> {
        let (m, t, d) = (&self.model, &self.train, &self.data);
        [
            ("model.image_size", m.image_size.to_string()),
            ("model.nz", m.nz.to_string()),
            ("model.ngf", m.ngf.to_string()),
            ("model.ndf", m.ndf.to_string()),
            ("train.batch_size", t.batch_size.to_string()),
            ("train.lr", t.lr.to_string()),
            ("train.beta1", t.beta1.to_string()),
            ("train.beta2", t.beta2.to_string()),
            ("train.seed", t.seed.to_string()),
            ("data.source", d.source.clone()),
            ("data.split", format!("{:?}", d.split).to_lowercase()),
            ("data.synthetic_size", d.synthetic_size.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

#[cfg(test)]
mod documented;

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn env(pairs: &[(&str, &str)]) -> Option<std::collections::HashMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn toml_file(text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        file.write_all(text.as_bytes()).unwrap();
        file
    }

    #[test]
    fn defaults_are_the_dcgan_reference() {
        let c = Config::load_with_env(None, &[], env(&[])).unwrap();
        assert_eq!((c.model.image_size, c.model.nz, c.model.ngf), (64, 100, 64));
        assert_eq!(
            (c.train.batch_size, c.train.lr, c.train.beta1),
            (128, 2e-4, 0.5)
        );
    }

    #[test]
    fn file_then_env_then_flags_win_in_that_order() {
        let file = toml_file("[train]\nsteps = 5\nseed = 1\nbatch_size = 8\n");
        let c = Config::load_with_env(
            Some(file.path()),
            &[("train.seed", "3".into())],
            env(&[
                ("GANCLUSTER__TRAIN__STEPS", "7"),
                ("GANCLUSTER__TRAIN__SEED", "2"),
            ]),
        )
        .unwrap();
        assert_eq!((c.train.steps, c.train.seed, c.train.batch_size), (7, 3, 8));
    }

    #[test]
    fn unknown_key_in_file_is_named() {
        let file = toml_file("[train]\nlearning_rate = 0.1\n");
        let err = Config::load_with_env(Some(file.path()), &[], env(&[])).unwrap_err();
        assert!(err.to_string().contains("learning_rate"), "{err}");
    }

    #[test]
    fn unknown_env_key_is_named() {
        let err =
            Config::load_with_env(None, &[], env(&[("GANCLUSTER__MODEL__NGFF", "3")])).unwrap_err();
        assert!(err.to_string().contains("ngff"), "{err}");
    }

    #[test]
    fn mistyped_value_names_the_key() {
        let file = toml_file("[model]\nngf = \"many\"\n");
        let err = Config::load_with_env(Some(file.path()), &[], env(&[])).unwrap_err();
        assert!(err.to_string().contains("model.ngf"), "{err}");
    }

    #[test]
    fn invalid_value_names_key_and_expectation() {
        let err = Config::load_with_env(None, &[("model.image_size", "48".into())], env(&[]))
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("model.image_size") && text.contains("16, 32, 64, 128"),
            "{text}"
        );
    }

    /// Post-local SGD needs its rounds to end where the run ends and where
    /// it checkpoints, f32 averaging and the halt policy; each refusal
    /// names the key and why.
    #[test]
    fn sync_every_refuses_what_would_leave_replicas_apart() {
        let load = |extra: &[(&str, &str)]| {
            let mut overrides = vec![
                ("train.sync_every".to_string(), "4".to_string()),
                ("train.steps".to_string(), "40".to_string()),
                ("checkpoint.every".to_string(), "8".to_string()),
            ];
            overrides.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            let overrides: Vec<(&str, String)> = overrides
                .iter()
                .map(|(k, v)| (k.as_str(), v.clone()))
                .collect();
            Config::load_with_env(None, &overrides, env(&[])).map_err(|e| e.to_string())
        };
        assert_eq!(load(&[]).unwrap().train.sync_every, 4);
        assert_eq!(
            load(&[("train.sync_warmup", "8")])
                .unwrap()
                .train
                .sync_warmup,
            8
        );
        let refused = [
            (("train.sync_warmup", "6"), "multiple of train.sync_every"),
            (("train.sync_warmup", "44"), "up to train.steps (40)"),
            (("train.steps", "42"), "multiple of train.sync_every"),
            (("checkpoint.every", "6"), "multiple of train.sync_every"),
            (("allreduce.wire", "int8"), "averaged"),
            (("allreduce.nonfinite", "skip"), "halt"),
            (("train.sync_every", "0"), "from 1 to 10000"),
        ];
        for ((key, value), why) in refused {
            let err = load(&[(key, value)]).unwrap_err();
            assert!(
                err.contains(key) && err.contains(why),
                "{key} = {value}: {err}"
            );
        }
        let every_step =
            Config::load_with_env(None, &[("train.sync_warmup", "8".into())], env(&[]))
                .unwrap_err()
                .to_string();
        assert!(
            every_step.contains("train.sync_warmup") && every_step.contains("already"),
            "{every_step}"
        );
    }

    #[test]
    fn powersgd_takes_a_rank_and_refuses_what_would_compress_twice() {
        let load = |pairs: &[(&str, &str)]| {
            let overrides: Vec<(&str, String)> =
                pairs.iter().map(|(k, v)| (*k, v.to_string())).collect();
            Config::load_with_env(None, &overrides, env(&[])).map_err(|e| e.to_string())
        };
        let cfg = load(&[("allreduce.powersgd_rank", "4"), ("allreduce.wire", "bf16")]).unwrap();
        assert_eq!(cfg.allreduce.powersgd_rank, 4);
        let warmed = [
            ("allreduce.powersgd_rank", "4"),
            ("train.steps", "40"),
            ("train.sync_warmup", "12"),
        ];
        assert_eq!(
            load(&warmed).unwrap().train.sync_warmup,
            12,
            "any step count"
        );
        let refused = [
            (
                vec![("allreduce.powersgd_rank", "65")],
                "allreduce.powersgd_rank",
            ),
            (
                vec![("allreduce.powersgd_rank", "4"), ("allreduce.wire", "int8")],
                "allreduce.wire",
            ),
            (
                vec![
                    ("allreduce.powersgd_rank", "4"),
                    ("train.sync_every", "4"),
                    ("train.steps", "40"),
                ],
                "train.sync_every",
            ),
            (
                vec![
                    ("allreduce.powersgd_rank", "4"),
                    ("train.steps", "40"),
                    ("train.sync_warmup", "41"),
                ],
                "train.sync_warmup",
            ),
        ];
        for (pairs, key) in refused {
            let err = load(&pairs).unwrap_err();
            assert!(err.contains(key), "{pairs:?}: {err}");
        }
    }

    #[test]
    fn training_hash_ignores_output_but_not_training_settings() {
        let base = Config::load_with_env(None, &[], env(&[])).unwrap();
        let elsewhere =
            Config::load_with_env(None, &[("output.dir", "/tmp/x".into())], env(&[])).unwrap();
        let other_lr =
            Config::load_with_env(None, &[("train.lr", "0.001".into())], env(&[])).unwrap();
        assert_eq!(base.training_hash(), elsewhere.training_hash());
        assert_ne!(base.training_hash(), other_lr.training_hash());
    }

    #[test]
    fn secrets_are_neither_rendered_nor_debug_printed() {
        let c = Config::load_with_env(
            None,
            &[],
            env(&[("GANCLUSTER__CHECKPOINT__S3__SECRET_ACCESS_KEY", "hunter2")]),
        )
        .unwrap();
        assert_eq!(c.checkpoint.s3.secret_access_key.expose(), "hunter2");
        assert!(!c.to_toml().unwrap().contains("hunter2"));
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn a_store_url_of_unknown_scheme_is_named() {
        let err = Config::load_with_env(None, &[("checkpoint.store", "ftp://x".into())], env(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("checkpoint.store") && err.contains("s3://"),
            "{err}"
        );
    }

    #[test]
    fn a_heartbeat_timeout_shorter_than_two_intervals_is_refused() {
        let err = Config::load_with_env(
            None,
            &[],
            env(&[
                ("GANCLUSTER__COORDINATOR__HEARTBEAT_INTERVAL_S", "5"),
                ("GANCLUSTER__COORDINATOR__HEARTBEAT_TIMEOUT_S", "9"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("coordinator.heartbeat_timeout_s") && err.contains("twice"),
            "{err}"
        );
    }

    /// Types are kept: nothing is rounded, truncated or read as a boolean.
    #[test]
    fn values_of_the_wrong_type_are_refused_not_coerced() {
        for (text, key) in [
            ("[train]\nsteps = 1.5\n", "train.steps"),
            ("[model]\nimage_size = 32.4\n", "model.image_size"),
            ("[model]\nimage_size = true\n", "model.image_size"),
            (
                "[checkpoint.s3]\nallow_http = \"yes\"\n",
                "checkpoint.s3.allow_http",
            ),
            (
                "[checkpoint.s3]\nallow_http = 1\n",
                "checkpoint.s3.allow_http",
            ),
        ] {
            let file = toml_file(text);
            let err = Config::load_with_env(Some(file.path()), &[], env(&[]))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("`{key}`")) && err.contains("invalid type"),
                "{text}: {err}"
            );
        }
        for (variable, value) in [
            ("GANCLUSTER__TRAIN__STEPS", "1.5"),
            ("GANCLUSTER__CHECKPOINT__S3__ALLOW_HTTP", "yes"),
            ("GANCLUSTER__CHECKPOINT__S3__ALLOW_HTTP", "1"),
        ] {
            let err = Config::load_with_env(None, &[], env(&[(variable, value)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("from {variable}")), "{err}");
        }
        let digits =
            Config::load_with_env(None, &[], env(&[("GANCLUSTER__CHECKPOINT__RUN", "2024")]));
        assert_eq!(
            digits.unwrap().checkpoint.run,
            "2024",
            "a text key keeps digits as text"
        );
    }

    /// Every size has a bound, checked at load time.
    #[test]
    fn out_of_range_values_are_refused_naming_the_range() {
        for (key, value, says) in [
            ("allreduce.chunk_bytes", "0", "from 1024"),
            ("data.prefetch", "1000000000000", "from 1 to 64"),
            ("data.synthetic_size", "1000000000000", "from 1 to 10000000"),
            ("coordinator.join_timeout_s", "0", "from 1 to 86400"),
            ("checkpoint.run", "..", "not starting with `.`"),
            ("train.batch_size", "0", "from 1 to 65536"),
            (
                "checkpoint.s3.endpoint",
                "http://minio:9000",
                "plain http://",
            ),
        ] {
            let err = Config::load_with_env(None, &[(key, value.into())], env(&[]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{key} = {value}: {err}");
        }
    }

    #[test]
    fn a_file_that_is_not_toml_is_located() {
        let file = toml_file("[train\nsteps = 3\n");
        let err = Config::load_with_env(Some(file.path()), &[], env(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("is not valid TOML") && err.contains("line 1"),
            "{err}"
        );
    }

    #[test]
    fn toml_round_trips() {
        let c = Config::load_with_env(None, &[("data.split", "all".into())], env(&[])).unwrap();
        let file = toml_file(&c.to_toml().unwrap());
        assert_eq!(
            Config::load_with_env(Some(file.path()), &[], env(&[])).unwrap(),
            c
        );
    }
}
