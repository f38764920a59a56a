//! `worker`: trains the DCGAN (standalone, or as one replica under a
//! coordinator), writes the synthetic CelebA-layout data set, and measures
//! SWD between image folders.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use common::process::cli::ConfigArgs;
use common::process::logging::{self, LogFormat};
use common::process::report;
use worker::data::{ImageSource, synthetic};
use worker::eval::swd;
use worker::replica;
use worker::tools::bench::{self, BenchArgs};
use worker::tools::check_backend::{Comparison, Trajectory};
use worker::train::standalone;

/// With a GPU the host's work is moving gradients, and mimalloc reuses freed
/// multi-megabyte buffers where glibc's allocator faults in fresh pages each
/// time; on the CPU backend glibc ran DCGAN-64's step ~5 % faster, so the
/// CPU build keeps it (docs/benchmark-log.md, "A leaner data path").
#[cfg(feature = "cuda")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    Train(Box<TrainArgs>),
    /// Copy a data set from S3 (e.g. CelebA uploaded to a bucket) into a
    /// folder, as the data Job does for the training pods' volume.
    FetchData(Box<FetchArgs>),
    /// Write the synthetic face data set to disk in CelebA's layout.
    Synth {
        /// Root folder; gets img_align_celeba/ and list_eval_partition.txt.
        #[arg(long)]
        out: PathBuf,
        /// Number of images.
        #[arg(long, default_value_t = 10_000, value_parser = bounded(1, 10_000_000))]
        count: usize,
        /// Generator seed.
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Time the training step on this build's backend; prints a RESULT line.
    Bench(BenchArgs),
    /// Train K steps standalone and print the loss trajectory and parameter
    /// checksum; with --against, compare with another build's run.
    CheckBackend(Box<CheckArgs>),
    /// Train a few steps and write the parity tapes for
    /// scripts/parity/dcgan_parity.py; with --against, compare with its tape.
    Parity(Box<ParityArgs>),
    /// Sliced Wasserstein Distance (ProGAN) between two image folders.
    Swd {
        /// First folder (e.g. generated images).
        a: PathBuf,
        /// Second folder (e.g. real images; a CelebA root uses all splits).
        b: PathBuf,
        /// Images are resized and center-cropped to this size first.
        #[arg(long, default_value_t = 64, value_parser = bounded(16, 1024))]
        image_size: usize,
        /// Images taken from each folder (the first N readable ones by name).
        #[arg(long, default_value_t = 1024, value_parser = bounded(1, 100_000))]
        count: usize,
        /// Seed of patch positions and projection directions.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("mode").required(true).args(["standalone", "coordinator"])))]
struct TrainArgs {
    /// Train in this process alone, without a coordinator.
    #[arg(long)]
    standalone: bool,
    /// Join the coordinator at this address (http://host:port).
    #[arg(long)]
    coordinator: Option<String>,
    /// The rank to ask the coordinator for (default: any free rank).
    #[arg(long, requires = "coordinator")]
    rank: Option<usize>,
    /// The coordinator's shared secret.
    #[arg(
        long,
        env = "GANCLUSTER_TOKEN",
        hide_env_values = true,
        default_value = ""
    )]
    token: String,
    /// After training, SWD against this many held-out images (0: skip).
    #[arg(long, default_value_t = 0, value_parser = bounded(0, 100_000))]
    eval_images: usize,
    /// Serve gRPC health (grpc.health.v1, plain text, no token) here for
    /// Kubernetes' grpc probes, e.g. 0.0.0.0:8081.
    #[arg(long, env = "GANCLUSTER_HEALTH_LISTEN", requires = "coordinator")]
    health_listen: Option<String>,
    /// Serve Prometheus metrics at /metrics here, e.g. 0.0.0.0:9090.
    #[arg(long, env = "GANCLUSTER_METRICS_LISTEN", requires = "coordinator")]
    metrics_listen: Option<String>,
    #[command(flatten)]
    config: ConfigArgs,
}

#[derive(Args)]
struct FetchArgs {
    /// Where the data set is: s3://bucket/prefix (reached with the
    /// configuration's checkpoint.s3 settings) or file://folder.
    #[arg(long, env = "GANCLUSTER_DATA_FROM")]
    from: String,
    /// The folder to fill (the volume the workers mount).
    #[arg(long)]
    to: PathBuf,
    #[command(flatten)]
    config: ConfigArgs,
}

#[derive(Args)]
struct ParityArgs {
    /// Folder for the `inputs` and `ours` tapes.
    #[arg(long)]
    tapes: PathBuf,
    /// Steps to train (the comparison looks at steps 1, 2 and 10).
    #[arg(long, default_value_t = 10, value_parser = clap::builder::RangedU64ValueParser::<u64>::new().range(10..=1000))]
    parity_steps: u64,
    /// Folder holding the reference `torch` tape: compare with it.
    #[arg(long)]
    against: Option<PathBuf>,
    #[command(flatten)]
    config: ConfigArgs,
}

#[derive(Args)]
struct CheckArgs {
    /// Output folder of another build's `check-backend` run with the same
    /// flags: compare with it and fail beyond the documented tolerance.
    #[arg(long)]
    against: Option<PathBuf>,
    #[command(flatten)]
    config: ConfigArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = cli.log_format;
    logging::init(format);
    common::security::tls::install_crypto();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            logging::failure(format, err.as_ref());
            let code = match replica::failure::is_permanent(&err) {
                true => report::CONFIG,
                false => report::FAILURE,
            };
            ExitCode::from(code)
        }
    }
}

/// Runs the command; the exit status of one that ended without error.
fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Train(args) => train(*args),
        Command::Synth { out, count, seed } => {
            synthetic::write_celeba(&out, count, seed)
                .with_context(|| format!("writing the synthetic data set to {}", out.display()))?;
            tracing::info!(count, root = %out.display(), "wrote synthetic CelebA-layout data set");
            Ok(report::SUCCESS)
        }
        Command::Bench(args) => {
            let result = bench::run(&args)?;
            let libraries = bench::gpu_libraries();
            println!(
                "LIBS {}",
                if libraries.is_empty() {
                    "none".into()
                } else {
                    libraries.join(" ")
                }
            );
            println!("{result}");
            Ok(report::SUCCESS)
        }
        Command::FetchData(args) => fetch_data(*args).map(|()| report::SUCCESS),
        Command::CheckBackend(args) => check_backend(*args).map(|()| report::SUCCESS),
        Command::Parity(args) => parity(*args).map(|()| report::SUCCESS),
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
            Ok(report::SUCCESS)
        }
    }
}

/// A whole number from `low` to `high`, checked as the flag is parsed.
fn bounded(low: u64, high: u64) -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(low..=high)
}

/// Trains; [`report::STOPPED`] when the group stopped on request before
/// its last step (a Job then starts this pod again).
fn train(args: TrainArgs) -> anyhow::Result<u8> {
    let cfg = args.config.load()?;
    if args.config.print_config {
        print!("{}", cfg.to_toml()?);
        return Ok(report::SUCCESS);
    }
    let summary = match args.coordinator {
        None => {
            standalone::refuse_checkpoint_flags(&args.config)?;
            standalone::run(&cfg, args.eval_images)?
        }
        Some(address) => {
            let connection = replica::Connection {
                address,
                token: args.token,
                rank: args.rank,
            };
            let endpoints = replica::Endpoints {
                health: args.health_listen,
                metrics: args.metrics_listen,
            };
            replica::run(&cfg, &connection, &endpoints, args.eval_images)?
        }
    };
    let (d_loss, g_loss) = summary
        .last
        .map_or((f32::NAN, f32::NAN), |l| (l.d_loss, l.g_loss));
    tracing::info!(
        d_loss,
        g_loss,
        images_per_s = summary.images_per_s,
        skipped = summary.skipped,
        out = %cfg.output.dir.display(),
        "training finished"
    );
    if let Some(swd) = summary.swd {
        tracing::info!(%swd, "SWD x1e3 against held-out images");
    }
    if summary.steps < cfg.train.steps {
        tracing::info!(
            steps = summary.steps,
            of = cfg.train.steps,
            "stopped on request before the last step (checkpointed)"
        );
        return Ok(report::STOPPED);
    }
    Ok(report::SUCCESS)
}

fn fetch_data(args: FetchArgs) -> anyhow::Result<()> {
    let cfg = args.config.load()?;
    if args.config.print_config {
        print!("{}", cfg.to_toml()?);
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the download runtime")?;
    let fetched = runtime
        .block_on(worker::tools::fetch::fetch(&cfg, &args.from, &args.to))
        .with_context(|| format!("fetching {} into {}", args.from, args.to.display()))?;
    tracing::info!(
        downloaded = fetched.downloaded,
        kept = fetched.kept,
        bytes = fetched.bytes,
        to = %args.to.display(),
        "the data set is in place"
    );
    Ok(())
}

fn parity(args: ParityArgs) -> anyhow::Result<()> {
    let cfg = args.config.load()?;
    let (inputs, ours) = worker::tools::parity::record(&cfg, args.parity_steps)?;
    inputs.write(&args.tapes, "inputs")?;
    ours.write(&args.tapes, "ours")?;
    let Some(reference) = args.against else {
        println!(
            "wrote {0}/inputs and {0}/ours: now run scripts/parity/dcgan_parity.py {0}",
            args.tapes.display()
        );
        return Ok(());
    };
    let differences = worker::tools::parity::compare(
        &ours,
        &worker::tools::parity::Tape::read(&reference, "torch")?,
    )?;
    let mut failed = 0;
    for d in &differences {
        let verdict = if d.passes() { "ok" } else { "DIFFERS" };
        failed += usize::from(!d.passes());
        println!(
            "{:<32} rel {:>9.2e}  max {:>9.2e}  tol {:>7.0e}  {verdict}",
            d.name, d.relative, d.max_abs, d.tolerance
        );
    }
    anyhow::ensure!(
        failed == 0,
        "{failed} tensors differ from the reference beyond their tolerance"
    );
    Ok(())
}

fn check_backend(args: CheckArgs) -> anyhow::Result<()> {
    let cfg = args.config.load()?;
    standalone::run(&cfg, 0)?;
    let mine = Trajectory::read(&cfg.output.dir)?;
    for line in mine.lines() {
        println!("{line}");
    }
    let Some(other) = args.against else {
        return Ok(());
    };
    let comparison = Comparison::of(&mine, &Trajectory::read(&other)?)?;
    println!("{comparison}");
    anyhow::ensure!(
        comparison.passes(),
        "this build's training differs from {}'s beyond the tolerance",
        other.display()
    );
    Ok(())
}

fn folder_images(dir: &std::path::Path, size: usize, count: usize) -> anyhow::Result<Vec<f32>> {
    let source = ImageSource::folder(dir, common::config::Split::All)?;
    Ok(source.first_pixels(count, size as u32)?)
}
