//! The configuration flags both binaries accept, so `worker` and
//! `coordinator` spell every override the same way.

use std::path::PathBuf;

use clap::Args;

use crate::config::{Config, ConfigError};

/// `--config FILE` plus one flag per commonly overridden key.
#[derive(Debug, Clone, Default, Args)]
pub struct ConfigArgs {
    /// TOML configuration file (docs/configuration.md has every key).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Training iterations [train.steps].
    #[arg(long)]
    pub steps: Option<u64>,
    /// `synthetic`, a CelebA root or a folder of images [data.source].
    #[arg(long)]
    pub data: Option<String>,
    /// train, val, test or all [data.split].
    #[arg(long)]
    pub split: Option<String>,
    /// Images per batch on each worker [train.batch_size].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// 16, 32, 64 or 128 [model.image_size].
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Generator width [model.ngf].
    #[arg(long)]
    pub ngf: Option<usize>,
    /// Discriminator width [model.ndf].
    #[arg(long)]
    pub ndf: Option<usize>,
    /// Seed of weights, noise and data order [train.seed].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Output folder [output.dir].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Gradient wire format, f32, bf16 or int8 [allreduce.wire].
    #[arg(long)]
    pub wire: Option<String>,
    /// Send each weight's gradient as two factors of this rank, 0 for
    /// whole (PowerSGD) [allreduce.powersgd_rank].
    #[arg(long)]
    pub powersgd_rank: Option<usize>,
    /// All-reduce every this many steps, averaging parameters and Adam
    /// moments in between rounds of local steps [train.sync_every].
    #[arg(long)]
    pub sync_every: Option<u64>,
    /// Steps that all-reduce whole gradients before post-local SGD's local
    /// steps or PowerSGD's compression begin [train.sync_warmup].
    #[arg(long)]
    pub sync_warmup: Option<u64>,
    /// Coordinator listen address [coordinator.listen].
    #[arg(long)]
    pub listen: Option<String>,
    /// GPUs for local workers, one per rank in turn, e.g. 0,1,2,3
    /// [coordinator.gpus].
    #[arg(long)]
    pub gpus: Option<String>,
    /// Checkpoint store URL: s3://bucket/prefix, file://path [checkpoint.store].
    #[arg(long)]
    pub store: Option<String>,
    /// Run id; a run with checkpoints resumes [checkpoint.run].
    #[arg(long)]
    pub run: Option<String>,
    /// Steps between checkpoints, 0 for only at the end [checkpoint.every].
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Times a failed local group starts again from its latest checkpoint
    /// [coordinator.max_restarts].
    #[arg(long)]
    pub max_restarts: Option<u32>,
}

impl ConfigArgs {
    /// Loads defaults ← file ← environment ← these flags.
    pub fn load(&self) -> Result<Config, ConfigError> {
        Config::load(self.config.as_deref(), &self.overrides())
    }

    fn overrides(&self) -> Vec<(&'static str, String)> {
        let text = |v: &Option<String>| v.clone();
        let num = |v: Option<u64>| v.map(|v| v.to_string());
        let size = |v: Option<usize>| v.map(|v| v.to_string());
        [
            ("train.steps", num(self.steps)),
            ("data.source", text(&self.data)),
            ("data.split", text(&self.split)),
            ("train.batch_size", size(self.batch_size)),
            ("model.image_size", size(self.image_size)),
            ("model.ngf", size(self.ngf)),
            ("model.ndf", size(self.ndf)),
            ("train.seed", num(self.seed)),
            (
                "output.dir",
                self.out.as_ref().map(|p| p.display().to_string()),
            ),
            ("allreduce.wire", text(&self.wire)),
            ("allreduce.powersgd_rank", size(self.powersgd_rank)),
            ("train.sync_every", num(self.sync_every)),
            ("train.sync_warmup", num(self.sync_warmup)),
            ("coordinator.listen", text(&self.listen)),
            ("coordinator.gpus", text(&self.gpus)),
            ("checkpoint.store", text(&self.store)),
            ("checkpoint.run", text(&self.run)),
            ("checkpoint.every", num(self.checkpoint_every)),
            (
                "coordinator.max_restarts",
                self.max_restarts.map(|v| v.to_string()),
            ),
        ]
        .into_iter()
        .filter_map(|(key, value)| value.map(|v| (key, v)))
        .collect()
    }
}
