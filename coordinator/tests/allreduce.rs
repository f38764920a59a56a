//! The all-reduce over real gRPC on loopback: whatever order chunks arrive
//! in, every worker gets exactly the rank-ordered sum divided by N.

use std::time::Duration;

use common::Config;
use common::pb::Net;
use common::session;
use common::wire::{self, WireFormat};
use coordinator::Mode;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::net::TcpListener;

const TOKEN: &str = "test-token";
const LIMIT: Duration = Duration::from_secs(60);

/// Gradient lengths: below, at and above the chunk size, and not multiples of it.
const SIZES: [usize; 4] = [1, 1000, 4097, 25_001];
/// 4096 f32 elements or 8192 bf16 elements per chunk.
const CHUNK_BYTES: usize = 16_384;

fn config(format: WireFormat) -> Config {
    let mut cfg = Config::load_with_env(
        None,
        &[
            ("train.steps", SIZES.len().to_string()),
            ("checkpoint.store", "memory://".to_string()),
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

async fn worker(
    address: String,
    cfg: Config,
    rank: usize,
    grads: Vec<Vec<f32>>,
    seed: u64,
) -> Vec<Vec<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let request = session::join_request(&cfg, TOKEN, Some(rank), 7, format!("test worker {rank}"));
    let (_, mut session, _) = session::rendezvous(&address, request, &cfg).await.unwrap();
    let mut results = Vec::new();
    for (step, g) in grads.iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..30))).await;
        results.push(
            session
                .all_reduce(step as u64, Net::Discriminator, g)
                .await
                .unwrap(),
        );
    }
    session.finish(grads.len() as u64).await.unwrap();
    results
}

async fn check(world: usize, format: WireFormat) {
    let out = tempfile::tempdir().unwrap();
    let mut cfg = config(format);
    cfg.output.dir = out.path().to_path_buf();
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
    let plan = coordinator::resume::plan(&cfg, &coordinator::ResumePolicy::Latest, world)
        .await
        .unwrap();
    let server = tokio::spawn(coordinator::run_on(
        listeners,
        cfg.clone(),
        mode,
        plan,
        1,
        std::future::pending,
    ));

    let mut rng = ChaCha8Rng::seed_from_u64(world as u64);
    let grads: Vec<Vec<Vec<f32>>> = (0..world)
        .map(|_| {
            SIZES
                .iter()
                .map(|&n| {
                    (0..n)
                        .map(|_| rng.random_range(-1e3..1e3f32) * rng.random::<f32>())
                        .collect()
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

    for (step, _) in SIZES.iter().enumerate() {
        let per_rank: Vec<Vec<f32>> = grads.iter().map(|g| g[step].clone()).collect();
        let expected: Vec<u32> = reference(&per_rank, format)
            .iter()
            .map(|v| v.to_bits())
            .collect();
        for result in &results {
            let got: Vec<u32> = result[step].iter().map(|v| v.to_bits()).collect();
            assert!(
                got == expected,
                "world {world} {format:?}: step {step} ({} elements) differs",
                SIZES[step]
            );
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
