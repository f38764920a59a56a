//! What a DCGAN-64 checkpoint (parameters + both Adam states, ≈ 75 MB)
//! costs: the capture on the training thread (the only part that stalls
//! training; the upload runs in the background), the write (hashing,
//! upload and manifest) and the verified read, to a local S3 server
//! (s3s-fs over HTTP with SigV4) and to a `file://` store.
//!
//! `cargo bench -p worker --bench checkpoint -- [ITERS=5]`

use std::time::{Duration, Instant};

use burn::tensor::{Tensor, TensorData};
use common::config::{CheckpointConfig, ModelConfig, S3Config, TrainConfig};
use common::storage::checkpoint::{Checkpoints, TrainingState};
use common::storage::store::Store;
use gancluster_tests::s3::{ACCESS_KEY, BUCKET, S3Server, SECRET_KEY};
use worker::model::backend::{self, TrainBackend};
use worker::train::checkpoint;
use worker::train::output::LossRow;
use worker::train::step::{LocalReducer, Trainer};

fn main() -> anyhow::Result<()> {
    let iters: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .map_or(Ok(5), |a| a.parse())?;
    let device = backend::device()?;
    let model = ModelConfig::default();
    let train = TrainConfig {
        batch_size: 8,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::<TrainBackend>::new(&model, &train, &device);
    let pixels = vec![0.1f32; 8 * 3 * 64 * 64];
    let real = Tensor::from_data(TensorData::new(pixels, [8, 3, 64, 64]), &device);
    // One step, so both Adam states hold their moments.
    trainer.train_step(0, real, &mut LocalReducer::default())?;
    let history: Vec<LossRow> = (0..1000)
        .map(|step| LossRow {
            step,
            epoch: 0,
            d_loss: 1.0,
            g_loss: 2.0,
            d_real: 0.5,
            d_fake: 0.5,
            images_per_s: 100.0,
        })
        .collect();
    let state = TrainingState {
        step: 1,
        cursor: Default::default(),
        world: 1,
        config_hash: String::new(),
        identity: Default::default(),
        d_loss: 1.0,
        g_loss: 2.0,
        swd: None,
    };

    let mut capture = Vec::new();
    let mut objects = Vec::new();
    for _ in 0..iters {
        let started = Instant::now();
        objects = checkpoint::capture(&trainer, &state, &history, 64, 42)?;
        capture.push(started.elapsed());
    }
    let part = |f: &mut dyn FnMut()| {
        let samples: Vec<Duration> = (0..iters)
            .map(|_| {
                let started = Instant::now();
                f();
                started.elapsed()
            })
            .collect();
        median_ms(samples)
    };
    let records = part(&mut || drop(trainer.records().unwrap()));
    let grid = trainer.sample_pixels(64, 42)?;
    let sampling = part(&mut || drop(trainer.sample_pixels(64, 42).unwrap()));
    let png = part(&mut || drop(worker::train::output::grid_png(&grid, 64).unwrap()));
    let plot = part(&mut || drop(worker::train::plot::loss_png(&history).unwrap()));
    let bytes: usize = objects.iter().map(|(_, b)| b.len()).sum();
    println!(
        "checkpoint of DCGAN-64: {:.1} MB in {} objects",
        bytes as f64 / 1e6,
        objects.len()
    );
    println!(
        "capture on the training thread (stall): median {:.0} ms",
        median_ms(capture)
    );
    println!(
        "  of which: records {records:.0} ms, 64 samples {sampling:.0} ms, grid PNG {png:.0} ms, loss plot {plot:.0} ms"
    );

    let server = S3Server::start();
    let folder = tempfile::tempdir()?;
    let s3 = CheckpointConfig {
        store: format!("s3://{BUCKET}/bench"),
        s3: S3Config {
            endpoint: server.endpoint().to_string(),
            access_key_id: ACCESS_KEY.into(),
            secret_access_key: SECRET_KEY.to_string().into(),
            allow_http: true,
            ..S3Config::default()
        },
        ..CheckpointConfig::default()
    };
    let file = CheckpointConfig {
        store: format!("file://{}", folder.path().display()),
        ..CheckpointConfig::default()
    };
    let runtime = tokio::runtime::Runtime::new()?;
    println!(
        "| store | write (hash + upload + manifest) | verified read | MB/s write | MB/s read |"
    );
    println!("|---|---|---|---|---|");
    for (label, cfg) in [("local S3 (s3s-fs, HTTP, SigV4)", &s3), ("file://", &file)] {
        let checkpoints = Checkpoints::new(Store::open(cfg)?, "bench");
        let (mut writes, mut reads) = (Vec::new(), Vec::new());
        for step in 0..iters as u64 {
            let started = Instant::now();
            runtime.block_on(checkpoints.write(step, objects.clone()))?;
            writes.push(started.elapsed());
            let started = Instant::now();
            runtime.block_on(checkpoints.load(step))?;
            reads.push(started.elapsed());
        }
        let (w, r) = (median_ms(writes), median_ms(reads));
        let mbps = |ms: f64| bytes as f64 / 1e6 / (ms / 1e3);
        println!(
            "| {label} | {w:.0} ms | {r:.0} ms | {:.0} | {:.0} |",
            mbps(w),
            mbps(r)
        );
    }
    Ok(())
}

fn median_ms(mut samples: Vec<Duration>) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_secs_f64() * 1e3
}
