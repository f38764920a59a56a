//! The all-reduce over real gRPC on loopback: whatever order chunks arrive
//! in, every worker gets exactly the rank-ordered sum divided by N (under
//! int8, with each side's carried residual, as the reference computes it).
//! A group of one gets its own gradient back, bit for bit, in every format:
//! nothing travels, so nothing is rounded.

use std::time::Duration;

use common::Config;
use common::client;
use common::protocol::pb;
use common::protocol::wire::Net;
use common::protocol::wire::{self, WireFormat};
use common::security::auth::Token;
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

/// What every rank must receive, per step and network.
fn expected(grads: &[Gradients], format: WireFormat) -> Gradients {
    if grads.len() == 1 {
        return grads[0].clone();
    }
    if format == WireFormat::Int8 {
        return int8_reference(grads);
    }
    (0..STEPS as usize)
        .map(|step| {
            [0, 1].map(|net| {
                let per_rank: Vec<Vec<f32>> = grads.iter().map(|g| g[step][net].clone()).collect();
                reference(&per_rank, format)
            })
        })
        .collect()
}

/// int8 with error feedback, element by element: each rank adds what it
/// carried and keeps what its encoding dropped, the coordinator does the
/// same with the mean, and the last step (a checkpoint follows it)
/// travels in f32 and leaves nothing carried.
fn int8_reference(grads: &[Gradients]) -> Gradients {
    let world = grads.len();
    let zeros = |net: usize| vec![0.0f32; grads[0][0][net].len()];
    let mut carried: Vec<[Vec<f32>; 2]> = (0..world).map(|_| [zeros(0), zeros(1)]).collect();
    let mut carried_mean = [zeros(0), zeros(1)];
    let mut out = Vec::new();
    for step in 0..STEPS as usize {
        let format = match step as u64 == STEPS - 1 {
            true => WireFormat::F32,
            false => WireFormat::Int8,
        };
        out.push([0, 1].map(|net| {
            let mut sum: Option<Vec<f32>> = None;
            for (rank_grads, rank_carried) in grads.iter().zip(carried.iter_mut()) {
                let mut left = zeros(net);
                let bytes = wire::encode_carrying(
                    &rank_grads[step][net],
                    &rank_carried[net],
                    &mut left,
                    format,
                );
                rank_carried[net] = left;
                let mut sent = zeros(net);
                wire::decode_into(&bytes, format, &mut sent).unwrap();
                match sum.as_mut() {
                    None => sum = Some(sent),
                    Some(sum) => sum.iter_mut().zip(&sent).for_each(|(a, v)| *a += v),
                }
            }
            let mean: Vec<f32> = sum
                .unwrap()
                .iter()
                .zip(&carried_mean[net])
                .map(|(s, c)| s / world as f32 + c)
                .collect();
            let mut received = zeros(net);
            wire::decode_into(&wire::encode(&mean, format), format, &mut received).unwrap();
            carried_mean[net] = match format {
                WireFormat::F32 => zeros(net),
                _ => mean.iter().zip(&received).map(|(m, r)| m - r).collect(),
            };
            received
        }));
    }
    out
}

async fn worker(
    address: String,
    cfg: Config,
    rank: usize,
    grads: Gradients,
    seed: u64,
) -> Gradients {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let token = Token::new(TOKEN).unwrap();
    let request = client::join_request(&cfg, Some(rank), 7, format!("test worker {rank}"), None);
    let (_, mut session, _) = client::rendezvous(&address, &token, request, &cfg)
        .await
        .unwrap();
    let mut results = Vec::new();
    for (step, [d, g]) in grads.iter().enumerate() {
        let step = step as u64;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..30))).await;
        let d = session
            .all_reduce(step, Net::Discriminator, d.clone())
            .await
            .unwrap();
        let g = session
            .all_reduce(step, Net::Generator, g.clone())
            .await
            .unwrap();
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

    let expected = expected(&grads, format);
    for step in 0..STEPS as usize {
        for net in 0..2 {
            let expected: Vec<u32> = expected[step][net].iter().map(|v| v.to_bits()).collect();
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
    for world in [1, 3] {
        check(world, WireFormat::Bf16).await;
    }
}

/// Error feedback on both sides, replicas identical, and the last step
/// exact: what a checkpoint after it needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn int8_mean_carries_every_residual_and_is_identical_everywhere() {
    for world in [1, 3] {
        check(world, WireFormat::Int8).await;
    }
}
