//! Images/s of one DCGAN training iteration (D step on real + fake, then G
//! step), comparable line for line with `shared/bench/dcgan_torch_step.py`.
//!
//! `cargo bench -p worker --bench step -- [IMAGE_SIZE=64] [NF=64] [BATCH=64] [ITERS=6]`

use std::time::Instant;

use burn::tensor::{Tensor, TensorData};
use common::config::{ModelConfig, TrainConfig};
use rand::{Rng, SeedableRng};
use worker::backend::{self, TrainBackend};
use worker::training::{LocalReducer, Trainer};

const WARMUP: usize = 2;

fn main() -> anyhow::Result<()> {
    // cargo appends `--bench`; everything else is positional.
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let arg = |i: usize, default: usize| args.get(i).copied().unwrap_or(default);
    let (size, nf, batch, iters) = (arg(0, 64), arg(1, 64), arg(2, 64), arg(3, 6));

    let device = backend::device()?;
    let model = ModelConfig {
        image_size: size,
        nz: 100,
        ngf: nf,
        ndf: nf,
    };
    let train = TrainConfig {
        batch_size: batch,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::<TrainBackend>::new(&model, &train, &device);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let pixels: Vec<f32> = (0..batch * 3 * size * size)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let real = Tensor::<TrainBackend, 4>::from_data(
        TensorData::new(pixels, [batch, 3, size, size]),
        &device,
    );

    let mut times = Vec::with_capacity(iters);
    for it in 0..WARMUP + iters {
        let started = Instant::now();
        let losses = trainer.train_step(it as u64, real.clone(), &mut LocalReducer)?;
        let dt = started.elapsed().as_secs_f64();
        println!(
            "iter {it} {dt:.3}s D {:.4} G {:.4}",
            losses.d_loss, losses.g_loss
        );
        if it >= WARMUP {
            times.push(dt);
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "RESULT burn=0.21.0 backend={} img={size} nf={nf} batch={batch} threads={} warmup={WARMUP} median_step={median:.3}s img_per_s={:.1}",
        backend::NAME,
        rayon::current_num_threads(),
        batch as f64 / median
    );
    Ok(())
}
