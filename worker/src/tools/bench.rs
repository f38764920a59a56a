//! `worker bench`: times the real training step on the compiled backend.
//!
//! It lives in the binary that trains (not in a `cargo bench` target) so
//! the stripped CUDA build carried to a lent GPU can time itself there,
//! where no Rust toolchain exists. The result is one `RESULT key=value …`
//! line that scripts parse and BENCHMARKS.md quotes, comparable with
//! `shared/bench/dcgan_torch_step.py`: one iteration is a D step on a real
//! and a fake batch and a G step, with the gradients flattened and applied
//! exactly as in training (the identity reducer stands in for the
//! all-reduce).

use std::fmt;
use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use common::config::{ModelConfig, TrainConfig};
use rand::{Rng, SeedableRng};

use crate::model::backend::{self, Inner, TrainBackend};
use crate::train::step::{LocalReducer, Trainer};

/// What to time.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Side of the square images [model.image_size].
    #[arg(long, default_value_t = 64)]
    pub image_size: usize,
    /// Generator width [model.ngf].
    #[arg(long, default_value_t = 64)]
    pub ngf: usize,
    /// Discriminator width [model.ndf].
    #[arg(long, default_value_t = 64)]
    pub ndf: usize,
    /// Images per iteration.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Timed iterations.
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Untimed iterations first (kernel compilation, autotuning, allocator warm-up).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
}

/// The measurement, printed as one machine-readable line.
#[derive(Debug, Clone)]
pub struct BenchResult {
    args: BenchArgs,
    device: String,
    threads: usize,
    median_s: f64,
    p90_s: f64,
    /// The first iteration: kernel compilation and autotuning included,
    /// what a user waits for before step 0 (short with a warm kernel cache).
    first_s: f64,
    peak_memory: Option<backend::Memory>,
}

impl BenchResult {
    /// Images per second at the median step time.
    pub fn images_per_s(&self) -> f64 {
        self.args.batch_size as f64 / self.median_s
    }
}

impl fmt::Display for BenchResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = &self.args;
        write!(
            f,
            "RESULT burn=0.21.0 backend={} device={:?} threads={} img={} ngf={} ndf={} batch={} \
             warmup={} iters={} median_step={:.4}s p90_step={:.4}s img_per_s={:.1} \
             first_step={:.3}s",
            backend::NAME,
            self.device,
            self.threads,
            a.image_size,
            a.ngf,
            a.ndf,
            a.batch_size,
            a.warmup,
            a.iters,
            self.median_s,
            self.p90_s,
            self.images_per_s(),
            self.first_s,
        )?;
        match &self.peak_memory {
            Some(memory) => write!(
                f,
                " peak_mem_mb={:.1} mem_kind={}",
                memory.mb(),
                memory.kind
            ),
            None => write!(f, " peak_mem_mb=unknown"),
        }
    }
}

/// Runs `args.warmup + args.iters` iterations on one fixed random batch,
/// printing each iteration's time on stdout, and returns the timing of the
/// last `args.iters`.
pub fn run(args: &BenchArgs) -> anyhow::Result<BenchResult> {
    anyhow::ensure!(args.iters > 0, "--iters must be at least 1");
    let model = ModelConfig {
        image_size: args.image_size,
        ngf: args.ngf,
        ndf: args.ndf,
        ..ModelConfig::default()
    };
    let train = TrainConfig {
        batch_size: args.batch_size,
        ..TrainConfig::default()
    };
    common::Config {
        model: model.clone(),
        train: train.clone(),
        ..Default::default()
    }
    .validate()?;
    let device = backend::device()?;
    let mut trainer = Trainer::<TrainBackend>::new(&model, &train, &device);
    let (size, batch) = (args.image_size, args.batch_size);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let pixels: Vec<f32> = (0..batch * 3 * size * size)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let real = Tensor::<TrainBackend, 4>::from_data(
        TensorData::new(pixels, [batch, 3, size, size]),
        &device,
    );
    let mut memory = backend::MemoryWatch::new(&device);
    let mut times = Vec::with_capacity(args.iters);
    let mut first_s = None;
    for it in 0..args.warmup + args.iters {
        let started = Instant::now();
        let losses = trainer.train_step(it as u64, real.clone(), &mut LocalReducer::default())?;
        Inner::sync(&device).map_err(|e| anyhow::anyhow!("synchronising the device: {e:?}"))?;
        let dt = started.elapsed().as_secs_f64();
        first_s.get_or_insert(dt);
        memory.sample();
        let phase = if it < args.warmup { "warmup" } else { "timed" };
        println!(
            "iter {it} {phase} {dt:.4}s D {:.4} G {:.4}",
            losses.d_loss, losses.g_loss
        );
        if it >= args.warmup {
            times.push(dt);
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(BenchResult {
        args: args.clone(),
        device: backend::device_name(),
        threads: rayon::current_num_threads(),
        median_s: percentile(&times, 0.5),
        p90_s: percentile(&times, 0.9),
        first_s: first_s.unwrap_or_default(),
        peak_memory: memory.peak(),
    })
}

/// The GPU libraries this process has mapped (driver, NVRTC, NCCL…), so a
/// check on a new machine says which copies were actually used: they are
/// loaded with `dlopen` at run time, so `ldd` cannot tell.
pub fn gpu_libraries() -> Vec<String> {
    const MARKERS: [&str; 6] = [
        "libcuda",
        "libnvrtc",
        "libnvidia",
        "libnccl",
        "libcudart",
        "libnvJit",
    ];
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut paths: Vec<String> = maps
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .filter(|path| {
            let name = path.rsplit('/').next().unwrap_or(path);
            MARKERS.iter().any(|m| name.starts_with(m))
        })
        .map(str::to_string)
        .collect();
    paths.sort();
    paths.dedup();
    paths
}

/// The `q` quantile of sorted `times` (nearest rank).
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let times: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&times, 0.5), 5.0);
        assert_eq!(percentile(&times, 0.9), 9.0);
        assert_eq!(percentile(&[3.0], 0.9), 3.0);
    }

    #[test]
    fn a_tiny_bench_prints_a_complete_result_line() {
        let args = BenchArgs {
            image_size: 16,
            ngf: 4,
            ndf: 4,
            batch_size: 2,
            iters: 2,
            warmup: 1,
        };
        let line = run(&args).unwrap().to_string();
        for field in [
            "RESULT ",
            "backend=",
            "device=",
            "img=16 ngf=4 ndf=4 batch=2",
            "warmup=1 iters=2",
            "median_step=",
            "p90_step=",
            "img_per_s=",
            "peak_mem_mb=",
        ] {
            assert!(line.contains(field), "{field} missing from {line}");
        }
    }
}
