//! The all-reduce over real gRPC on loopback: whatever order chunks arrive
//! in, every worker gets exactly the rank-ordered sum divided by N.

use std::time::Duration;

use common::Config;
use common::auth::Token;
use common::pb::{self, Net};
use common::session;
use common::wire::{self, WireFormat};
use coordinator::Mode;
use gancluster_tests::client::answer_checkpoint;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::net::TcpListener;

const TOKEN: &str = "test-token";
const LIMIT: Duration = Duration::from_secs(60);
const STEPS: u64 = 3;
/// 100 f32 elements or 200 bf16 elements per chunk: the tiny model's
/// gradients (540 and 748 elements) span several chunks, the last partial.
const CHUNK_BYTES: usize = 400;

fn config(format: WireFormat) -> Config {
    let mut cfg = Config::load_with_env(
        None,
        &[
            ("train.steps", STEPS.to_string()),
            ("checkpoint.every", "0".to_string()),
            ("model.image_size", "16".to_string()),
            ("model.nz", "8".to_string()),
            ("model.ngf", "2".to_string()),
            ("model.ndf", "3".to_string()),
        ],
        Some(Default::default()),
    )
    .unwrap();
    cfg.allreduce.chunk_bytes = CHUNK_BYTES;
    cfg.allreduce.wire = format;
    cfg
}

/// What the wire does to one worker's values (nothing for f32).
fn on_the_wire(values: &[f32], format: WireFormat) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    wire::decode_into(&wire::encode(values, format), format, &mut out).unwrap();
    out
}

/// Σ in rank order, then / N, then the wire's encoding of the result.
fn reference(grads: &[Vec<f32>], format: WireFormat) -> Vec<f32> {
    let mut acc = on_the_wire(&grads[0], format);
    for g in &grads[1..] {
        acc.iter_mut()
            .zip(on_the_wire(g, format))
            .for_each(|(a, v)| *a += v);
    }
    acc.iter_mut().for_each(|a| *a /= grads.len() as f32);
    on_the_wire(&acc, format)
}

/// One rank's gradients: per step, the discriminator's then the generator's.
type Gradients = Vec<[Vec<f32>; 2]>;

async fn worker(
    address: String,
    cfg: Config,
    rank: usize,
    grads: Gradients,
    seed: u64,
) -> Gradients {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let token = Token::new(TOKEN).unwrap();
    let request = session::join_request(&cfg, Some(rank), 7, format!("test worker {rank}"), None);
    let (_, mut session, _) = session::rendezvous(&address, &token, request, &cfg)
        .await
        .unwrap();
    let mut results = Vec::new();
    for (step, [d, g]) in grads.iter().enumerate() {
        let step = step as u64;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..30))).await;
        let d = session
            .all_reduce(step, Net::Discriminator, d)
            .await
            .unwrap();
        let g = session.all_reduce(step, Net::Generator, g).await.unwrap();
        assert!(!d.skip && !g.skip);
        if rank == 0 {
            answer_checkpoint(&mut session, &cfg, step).await;
        }
        results.push([d.mean, g.mean]);
        let report = pb::StepReport {
            step,
            checksum: 1,
            ..Default::default()
        };
        session.report(report).await.unwrap();
    }
    session.finish(STEPS).await.unwrap();
    results
}

async fn check(world: usize, format: WireFormat) {
    let out = tempfile::tempdir().unwrap();
    let mut cfg = config(format);
    cfg.output.dir = out.path().to_path_buf();
    cfg.checkpoint.store = format!("file://{}", out.path().join("store").display());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let mode = Mode::External {
        workers: world,
        token: TOKEN.into(),
    };
    let listeners = coordinator::Listeners {
        tcp: listener,
        unix: None,
    };
    let server = tokio::spawn(coordinator::run_on(
        coordinator::Launch {
            listeners,
            cfg: cfg.clone(),
            mode,
            policy: coordinator::ResumePolicy::Latest,
            lease: None,
            options: coordinator::Options::default(),
        },
        std::future::pending,
    ));

    let sizes = [
        cfg.model.discriminator_params() as usize,
        cfg.model.generator_params() as usize,
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(world as u64);
    let grads: Vec<Gradients> = (0..world)
        .map(|_| {
            (0..STEPS)
                .map(|_| {
                    sizes.map(|n| {
                        (0..n)
                            .map(|_| rng.random_range(-1e3..1e3f32) * rng.random::<f32>())
                            .collect()
                    })
                })
                .collect()
        })
        .collect();
    // Start the workers in reverse rank order so arrival order differs from rank order.
    let handles: Vec<_> = (0..world)
        .rev()
        .map(|rank| {
            tokio::spawn(worker(
                address.clone(),
                cfg.clone(),
                rank,
                grads[rank].clone(),
                100 + rank as u64,
            ))
        })
        .collect();
    let mut results = Vec::new();
    for handle in handles {
        results.push(
            tokio::time::timeout(LIMIT, handle)
                .await
                .expect("worker timed out")
                .unwrap(),
        );
    }
    tokio::time::timeout(LIMIT, server)
        .await
        .expect("coordinator did not finish")
        .unwrap()
        .unwrap();

    for step in 0..STEPS as usize {
        for net in 0..2 {
            let per_rank: Vec<Vec<f32>> = grads.iter().map(|g| g[step][net].clone()).collect();
            let expected: Vec<u32> = reference(&per_rank, format)
                .iter()
                .map(|v| v.to_bits())
                .collect();
            for result in &results {
                let got: Vec<u32> = result[step][net].iter().map(|v| v.to_bits()).collect();
                assert!(
                    got == expected,
                    "world {world} {format:?}: step {step} net {net} ({} elements) differs",
                    sizes[net]
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f32_mean_is_bitwise_the_rank_ordered_reference() {
    for world in 1..=4 {
        check(world, WireFormat::F32).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bf16_mean_is_reduced_in_f32_and_identical_everywhere() {
    check(3, WireFormat::Bf16).await;
}
