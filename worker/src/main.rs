//! `worker`: trains the DCGAN (standalone for now), writes the synthetic
//! CelebA-layout data set, and measures SWD between image folders.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use common::Config;
use common::logging::{self, LogFormat};
use worker::data::{ImageSource, preprocess, synthetic};
use worker::{standalone, swd};

#[derive(Parser)]
#[command(version, about = "gancluster worker: DCGAN training on burn")]
struct Cli {
    /// `human` lines or one `json` object per line.
    #[arg(long, global = true, default_value = "human")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train the DCGAN.
    Train(TrainArgs),
    /// Write the synthetic face data set to disk in CelebA's layout.
    Synth {
        /// Root folder; gets img_align_celeba/ and list_eval_partition.txt.
        #[arg(long)]
        out: PathBuf,
        /// Number of images.
        #[arg(long, default_value_t = 10_000)]
        count: usize,
        /// Generator seed.
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Sliced Wasserstein Distance (ProGAN) between two image folders.
    Swd {
        /// First folder (e.g. generated images).
        a: PathBuf,
        /// Second folder (e.g. real images; a CelebA root uses all splits).
        b: PathBuf,
        /// Images are resized and center-cropped to this size first.
        #[arg(long, default_value_t = 64)]
        image_size: usize,
        /// Images taken from each folder (the first N by name).
        #[arg(long, default_value_t = 1024)]
        count: usize,
        /// Seed of patch positions and projection directions.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

#[derive(Args)]
struct TrainArgs {
    /// Train in this process alone, without a coordinator.
    #[arg(long, required = true)]
    standalone: bool,
    /// TOML configuration file (see the README for every key).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// Training iterations [train.steps].
    #[arg(long)]
    steps: Option<u64>,
    /// `synthetic`, a CelebA root or a folder of images [data.source].
    #[arg(long)]
    data: Option<String>,
    /// train, val, test or all [data.split].
    #[arg(long)]
    split: Option<String>,
    /// Images per batch [train.batch_size].
    #[arg(long)]
    batch_size: Option<usize>,
    /// 16, 32, 64 or 128 [model.image_size].
    #[arg(long)]
    image_size: Option<usize>,
    /// Generator width [model.ngf].
    #[arg(long)]
    ngf: Option<usize>,
    /// Discriminator width [model.ndf].
    #[arg(long)]
    ndf: Option<usize>,
    /// Seed of weights, noise and data order [train.seed].
    #[arg(long)]
    seed: Option<u64>,
    /// Output folder [output.dir].
    #[arg(long)]
    out: Option<PathBuf>,
    /// After training, SWD against this many held-out images (0: skip).
    #[arg(long, default_value_t = 0)]
    eval_images: usize,
}

impl TrainArgs {
    fn overrides(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let mut set = |key, value: Option<String>| {
            if let Some(v) = value {
                out.push((key, v));
            }
        };
        set("train.steps", self.steps.map(|v| v.to_string()));
        set("data.source", self.data.clone());
        set("data.split", self.split.clone());
        set("train.batch_size", self.batch_size.map(|v| v.to_string()));
        set("model.image_size", self.image_size.map(|v| v.to_string()));
        set("model.ngf", self.ngf.map(|v| v.to_string()));
        set("model.ndf", self.ndf.map(|v| v.to_string()));
        set("train.seed", self.seed.map(|v| v.to_string()));
        set(
            "output.dir",
            self.out.as_ref().map(|p| p.display().to_string()),
        );
        out
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    match cli.command {
        Command::Train(args) => train(args),
        Command::Synth { out, count, seed } => {
            synthetic::write_celeba(&out, count, seed)
                .with_context(|| format!("writing the synthetic data set to {}", out.display()))?;
            tracing::info!(count, root = %out.display(), "wrote synthetic CelebA-layout data set");
            Ok(())
        }
        Command::Swd {
            a,
            b,
            image_size,
            count,
            seed,
        } => {
            let (a, b) = (
                folder_images(&a, image_size, count)?,
                folder_images(&b, image_size, count)?,
            );
            let report = swd::sliced_wasserstein(&a, &b, image_size, seed)?;
            println!("SWD x1e3: {report}");
            Ok(())
        }
    }
}

fn train(args: TrainArgs) -> anyhow::Result<()> {
    let cfg = Config::load(args.config.as_deref(), &args.overrides())?;
    if args.print_config {
        print!("{}", cfg.to_toml()?);
        return Ok(());
    }
    let summary = standalone::run(&cfg, args.eval_images)?;
    tracing::info!(
        d_loss = summary.last.d_loss,
        g_loss = summary.last.g_loss,
        images_per_s = format!("{:.1}", summary.images_per_s),
        skipped = summary.skipped,
        out = %summary.out_dir.display(),
        "training finished"
    );
    if let Some(swd) = summary.swd {
        tracing::info!(%swd, "SWD x1e3 against held-out images");
    }
    Ok(())
}

fn folder_images(dir: &std::path::Path, size: usize, count: usize) -> anyhow::Result<Vec<f32>> {
    let source = ImageSource::folder(dir, common::config::Split::All)?;
    let mut pixels = Vec::new();
    for i in 0..count.min(source.len()) {
        preprocess::append_chw(&source.load(i)?, size as u32, &mut pixels);
    }
    Ok(pixels)
}
