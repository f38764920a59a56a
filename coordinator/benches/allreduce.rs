//! All-reduce through the coordinator, next to a raw loopback socket pump
//! that moves the same bytes, measured like `shared/bench/gloo_allreduce.py`.
//!
//! `cargo bench -p coordinator --bench allreduce -- [--world 2,4,8] [--models 64] [--iters 10]`
//! `cargo bench -p coordinator --bench allreduce -- --compute-ms 10,40,160 [--world 1,2,4,8]`
//! `… -- --wire int8` measures only the wire formats named (default: f32,
//! bf16, int8); `powersgd4` (`powersgd4-bf16`) is PowerSGD at rank 4 with
//! its factors in f32 (bf16), in scaling runs only.
//! `… -- --compute-ms 10,40 --sync-every 1,8` adds post-local SGD rows.
//! `… -- --powersgd-cost 1,4,8` times PowerSGD's factor arithmetic alone.
//!
//! For each world size W and each model (its image size; ngf = ndf = 64)
//! this starts a coordinator and W worker *processes* (this executable
//! re-run as `client`) that do what training does, minus the compute: per
//! step all-reduce the discriminator's gradient, then the generator's (of
//! the model's real sizes: DCGAN-64 has 11.1 MB and 14.3 MB of f32), then
//! report. Each all-reduce's time is the maximum over ranks, the reported
//! figure the median over steps after one warm-up; "step" is D + G.
//! algbw = bytes/time, busbw = algbw·2(W−1)/W (nccl-tests), coordinator
//! throughput = 2·W·bytes/time, the bytes its sockets carry. The raw
//! ceiling runs the same star pattern with plain tokio sockets: each client
//! writes S bytes, the server reads them all, then writes S bytes back to
//! each client.
//!
//! With `--compute-ms C,…` it measures scaling instead: each client waits
//! C/2 ms before the D all-reduce and C/2 ms before the G all-reduce, the
//! time a GPU spends in the D and G backward passes, and the table gives
//! the whole step (wait, all-reduces, report) and the scaling efficiency
//! C / step time. The wait is a sleep, not a busy loop: a GPU step does
//! not occupy the host's cores, so on two cores the W clients and the
//! coordinator share them only for what they really do, moving and adding
//! bytes (on a cluster each worker would have cores of its own).
//!
//! `--sync-every H` (`train.sync_every`) times post-local SGD: each step
//! waits C ms, and only the last of each round of H all-reduces, the
//! networks' state (parameters and both Adam moments, 3× a gradient) in
//! f32. Its step time is the slowest rank's round, median over rounds,
//! divided by H (a round of one step is the plain step).

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::Config;
use common::client;
use common::protocol::pb;
use common::protocol::powersgd::{Layout, PowerSgd};
use common::protocol::wire::Net;
use common::protocol::wire::WireFormat;
use common::sampling::cadence::Cadence;
use common::security::auth::Token;
use coordinator::Mode;
use gancluster_tests::client::answer_checkpoint;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;

/// The coordinator's allocator, and the CUDA worker's: this process hosts
/// the coordinator and stands in for workers with a GPU step.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const TOKEN: &str = "bench";
const WARMUP: usize = 1;
/// An all-reduce mode as `--wire` names it: `f32`, `bf16` or `int8`
/// (`allreduce.wire`; under int8 the last step travels in f32, a
/// checkpoint follows it, which the medians hide), or `powersgdR[-bf16]`
/// (`allreduce.powersgd_rank = R`, factors in f32 or bf16).
#[derive(Debug, Clone)]
struct Wire {
    name: String,
    /// `allreduce.wire` as the configuration spells it.
    wire: String,
    format: WireFormat,
    rank: usize,
}

impl Wire {
    fn parse(name: &str) -> Self {
        let (wire, rank) = match name.strip_prefix("powersgd") {
            Some(rest) => {
                let (rank, wire) = rest.split_once('-').unwrap_or((rest, "f32"));
                (wire, rank.parse().expect("powersgd<rank>"))
            }
            None => (name, 0),
        };
        let format = serde_json::Value::String(wire.to_string());
        Self {
            name: name.to_string(),
            wire: wire.to_string(),
            format: serde_json::from_value(format).expect("a wire format: f32, bf16 or int8"),
            rank,
        }
    }

    /// Elements one worker sends per all-reducing step, both networks.
    fn elements(&self, cfg: &Config, cadence: Cadence) -> usize {
        let m = &cfg.model;
        match self.rank {
            0 => cadence.elements(0, m.discriminator_params() + m.generator_params()) as usize,
            rank => [m.discriminator_tensors(), m.generator_tensors()]
                .iter()
                .map(|t| Layout::new(t, rank))
                .map(|l| l.first_len() + l.second_len())
                .sum(),
        }
    }
}

/// Steps of a run timing `iters` steps in rounds of `sync_every`: one
/// warm-up round, then whole rounds.
fn total_steps(iters: usize, sync_every: usize) -> usize {
    WARMUP * sync_every + iters.div_ceil(sync_every) * sync_every
}

fn config(image_size: usize, steps: usize, wire: &str, store: &str, sync_every: usize) -> Config {
    let wire = Wire::parse(wire);
    // Rank 0 answers the last step's checkpoint with a stand-in in the
    // driver's store.
    let overrides = [
        ("train.steps", steps.to_string()),
        ("train.sync_every", sync_every.to_string()),
        ("allreduce.wire", wire.wire),
        ("allreduce.powersgd_rank", wire.rank.to_string()),
        ("checkpoint.every", "0".to_string()),
        ("model.image_size", image_size.to_string()),
        ("model.ngf", "64".to_string()),
        ("model.ndf", "64".to_string()),
    ];
    // `GANCLUSTER__*` variables apply (e.g. GANCLUSTER__ALLREDUCE__CHUNK_BYTES
    // to sweep the chunk size); the settings above win over them.
    let mut cfg = Config::load(None, &overrides).expect("bench config");
    cfg.checkpoint.store = store.to_string();
    cfg
}

/// The modes `--wire` names.
fn wires(args: &[String]) -> Vec<Wire> {
    let names: Vec<String> = list(args, "--wire", "f32,bf16,int8");
    names.iter().map(|name| Wire::parse(name)).collect()
}

fn list<T: std::str::FromStr>(args: &[String], flag: &str, default: &str) -> Vec<T> {
    let text = args
        .iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |s| s.as_str());
    text.split(',')
        .map(|v| v.parse().ok().expect("a number"))
        .collect()
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("client") => client(&args[2..]).await,
        Some("raw-client") => raw_client(&args[2..]).await,
        _ => drive(&args).await,
    }
}

async fn drive(args: &[String]) {
    let worlds: Vec<usize> = list(args, "--world", "2,4,8");
    let models: Vec<usize> = list(args, "--models", "64");
    let iters: usize = list(args, "--iters", "10")[0];
    let wires = wires(args);
    if args.iter().any(|a| a == "--powersgd-cost") {
        let ranks: Vec<usize> = list(args, "--powersgd-cost", "4");
        return powersgd_cost(&models, &ranks, iters);
    }
    if args.iter().any(|a| a == "--compute-ms") {
        let computes: Vec<f64> = list(args, "--compute-ms", "10,40,160");
        let syncs: Vec<usize> = list(args, "--sync-every", "1");
        return scaling(&worlds, &models, &computes, &syncs, iters, &wires).await;
    }
    assert!(
        wires.iter().all(|w| w.rank == 0),
        "PowerSGD's bytes are not a gradient's: time it with --compute-ms"
    );
    println!(
        "| path | W | gradient | MB (f32) | wire | median ms | algbw GB/s | busbw GB/s | coordinator GB/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for &world in &worlds {
        for &size in &models {
            let cfg = config(size, total_steps(iters, 1), "f32", "memory://", 1);
            let d = cfg.model.discriminator_params() as usize;
            let g = cfg.model.generator_params() as usize;
            for (what, elems) in [("D", d), ("G", g), ("D+G", d + g)] {
                let raw = raw_star(world, elems * 4, iters).await;
                row("raw tcp", world, what, elems, None, raw);
            }
            for (path, unix) in [("coordinator tcp", false), ("coordinator uds", true)] {
                for wire in &wires {
                    let (name, format) = (wire.name.as_str(), wire.format);
                    let [d_ms, g_ms, step_ms, _] =
                        through_coordinator(world, size, iters, name, unix, Timing::default())
                            .await;
                    row(path, world, "D", d, Some((name, format)), d_ms);
                    row(path, world, "G", g, Some((name, format)), g_ms);
                    row(path, world, "D+G", d + g, Some((name, format)), step_ms);
                }
            }
        }
    }
}

/// Step time and scaling efficiency with a compute wait of each of
/// `computes` ms per step, through the coordinator over TCP.
async fn scaling(
    worlds: &[usize],
    models: &[usize],
    computes: &[f64],
    syncs: &[usize],
    iters: usize,
    wires: &[Wire],
) {
    println!(
        "| model | C ms | W | sync_every | wire | step ms | efficiency C/step | coordinator MB/step |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for &size in models {
        let cfg = config(size, total_steps(iters, 1), "f32", "memory://", 1);
        for &compute in computes {
            for &world in worlds {
                for &sync_every in syncs {
                    // No warm-up here: every round carries what step 0's does.
                    let cadence = Cadence::new(sync_every as u64, 0);
                    // Averaging travels whole in f32 only (config validation).
                    let averages = !cadence.shares_gradients(0);
                    let wires = wires
                        .iter()
                        .filter(|w| !averages || (w.format, w.rank) == (WireFormat::F32, 0));
                    for wire in wires {
                        let step = Timing {
                            compute_ms: compute,
                            sync_every,
                        };
                        let name = wire.name.as_str();
                        let [.., step_ms] =
                            through_coordinator(world, size, iters, name, false, step).await;
                        // In and out of the coordinator, every member, per step;
                        // a group of one sends headers only.
                        let sent = match world {
                            1 => 0,
                            _ => wire.format.encoded_len(wire.elements(&cfg, cadence)),
                        };
                        let mb = 2.0 * world as f64 * sent as f64 / sync_every as f64 / 1e6;
                        println!(
                            "| DCGAN-{size} | {compute} | {world} | {sync_every} | {name} | {step_ms:.1} | {:.2} | {mb:.1} |",
                            compute / step_ms
                        );
                    }
                }
            }
        }
    }
}

/// One worker's PowerSGD arithmetic per step (both networks, both
/// factors, the update and the residual; a group of one, so no sockets),
/// on one core: what each worker's CPU adds to a step at `ranks`.
fn powersgd_cost(models: &[usize], ranks: &[usize], iters: usize) {
    use rand::{Rng, SeedableRng};
    println!("| model | rank | factor arithmetic ms per step (median) |");
    println!("|---|---|---|");
    for &size in models {
        let cfg = config(size, 1, "f32", "memory://", 1);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let grads = [
            cfg.model.discriminator_params(),
            cfg.model.generator_params(),
        ]
        .map(|len| -> Vec<f32> { (0..len).map(|_| rng.random_range(-1e-3..1e-3)).collect() });
        for &rank in ranks {
            let mut states = PowerSgd::per_network(&cfg.model, rank);
            let times = (0..WARMUP + iters).map(|_| {
                let started = Instant::now();
                for (state, grads) in states.iter_mut().zip(&grads) {
                    let (mut round, first) = state.first(grads);
                    let second = state.second(&mut round, first);
                    std::hint::black_box(state.finish(round, second));
                }
                started.elapsed().as_secs_f64() * 1e3
            });
            let ms = median(times.skip(WARMUP).collect());
            println!("| DCGAN-{size} | {rank} | {ms:.1} |");
        }
    }
}

/// What a client does besides all-reducing.
#[derive(Debug, Clone, Copy)]
struct Timing {
    /// The stand-in for a GPU step's backward passes, split between D and G.
    compute_ms: f64,
    /// Steps per round (`train.sync_every`).
    sync_every: usize,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            compute_ms: 0.0,
            sync_every: 1,
        }
    }
}

/// One table row; `wire` is None for the raw pump, which moves f32 bytes.
fn row(
    path: &str,
    world: usize,
    what: &str,
    elems: usize,
    wire: Option<(&str, WireFormat)>,
    ms: f64,
) {
    let (wire, format) = wire.unwrap_or(("-", WireFormat::F32));
    let bytes = format.encoded_len(elems);
    let algbw = bytes as f64 / (ms / 1e3) / 1e9;
    let busbw = algbw * 2.0 * (world as f64 - 1.0) / world as f64;
    let through = 2.0 * world as f64 * bytes as f64 / (ms / 1e3) / 1e9;
    let mb = elems as f64 * 4.0 / 1e6;
    println!(
        "| {path} | {world} | {what} | {mb:.1} | {wire} | {ms:.1} | {algbw:.2} | {busbw:.2} | {through:.2} |"
    );
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Median over iterations of the slowest rank's time, in ms, from line
/// `line` of each client's output.
fn slowest_per_iteration(outputs: &[String]) -> f64 {
    slowest_on_line(outputs, 0)
}

fn slowest_on_line(outputs: &[String], line: usize) -> f64 {
    slowest_per_round(outputs, line, 1)
}

/// Median over rounds of `every` iterations of the slowest rank's round,
/// per iteration, from line `line` of each client's output.
fn slowest_per_round(outputs: &[String], line: usize, every: usize) -> f64 {
    let per_rank: Vec<Vec<f64>> = outputs
        .iter()
        .map(|o| {
            o.lines()
                .nth(line)
                .expect("client timing line")
                .split_whitespace()
                .map(|v| v.parse().expect("client timing"))
                .collect()
        })
        .collect();
    let rounds = per_rank[0].len() / every;
    let round = |r: &Vec<f64>, i: usize| r[i * every..(i + 1) * every].iter().sum::<f64>();
    median(
        (0..rounds)
            .map(|i| per_rank.iter().map(|r| round(r, i)).fold(0.0, f64::max))
            .collect(),
    ) / every as f64
}

async fn spawn_clients(world: usize, args: impl Fn(usize) -> Vec<String>) -> Vec<String> {
    let exe = std::env::current_exe().expect("bench executable");
    let children: Vec<_> = (0..world)
        .map(|rank| {
            Command::new(&exe)
                .args(args(rank))
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .expect("client process")
        })
        .collect();
    let mut outputs = Vec::new();
    for child in children {
        let out = tokio::time::timeout(Duration::from_secs(600), child.wait_with_output())
            .await
            .expect("client timed out")
            .expect("client output");
        assert!(out.status.success(), "client failed");
        outputs.push(String::from_utf8(out.stdout).expect("utf-8"));
    }
    outputs
}

/// Median ms of the D all-reduce, the G all-reduce, both, and the whole
/// step (with its compute wait), slowest rank per step.
async fn through_coordinator(
    world: usize,
    image_size: usize,
    iters: usize,
    format: &str,
    unix: bool,
    timing: Timing,
) -> [f64; 4] {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let mut address = format!("http://{}", listener.local_addr().expect("address"));
    let socket_dir = tempfile::tempdir().expect("socket folder");
    let store = format!("file://{}", socket_dir.path().join("store").display());
    let steps = total_steps(iters, timing.sync_every);
    let mut cfg = config(image_size, steps, format, &store, timing.sync_every);
    cfg.output.dir = socket_dir.path().to_path_buf();
    let unix = unix.then(|| {
        let bound = coordinator::LocalSocket::bind(socket_dir.path()).expect("unix socket");
        address = format!("unix://{}", bound.path.display());
        bound
    });
    let listeners = coordinator::Listeners {
        tcp: listener,
        unix,
    };
    let mode = Mode::External {
        workers: world,
        token: TOKEN.into(),
    };
    let server = tokio::spawn(coordinator::run_on(
        coordinator::Launch {
            listeners,
            cfg,
            mode,
            policy: coordinator::ResumePolicy::Latest,
            lease: None,
            options: coordinator::Options::default(),
        },
        std::future::pending,
    ));
    let outputs = spawn_clients(world, |rank| {
        [
            "client",
            &address,
            &rank.to_string(),
            &image_size.to_string(),
            &iters.to_string(),
            format,
            &store,
            &timing.compute_ms.to_string(),
            &timing.sync_every.to_string(),
        ]
        .map(String::from)
        .to_vec()
    })
    .await;
    server
        .await
        .expect("coordinator task")
        .expect("coordinator run");
    let [d, g, both] = [0, 1, 2].map(|line| slowest_on_line(&outputs, line));
    [
        d,
        g,
        both,
        slowest_per_round(&outputs, 3, timing.sync_every),
    ]
}

async fn client(args: &[String]) {
    let (address, rank, image_size, iters, format, store) = (
        &args[0],
        args[1].parse::<usize>().unwrap(),
        args[2].parse().unwrap(),
        args[3].parse().unwrap(),
        &args[4],
        &args[5],
    );
    let compute_ms: f64 = args[6].parse().unwrap();
    let sync_every: usize = args[7].parse().unwrap();
    let cadence = Cadence::new(sync_every as u64, 0);
    // Each backward pass's share of the step: D's, then G's.
    let backward = Duration::from_secs_f64(compute_ms / 2.0 / 1e3);
    let steps = total_steps(iters, sync_every);
    let cfg = config(image_size, steps, format, store, sync_every);
    let token = Token::new(TOKEN).expect("token");
    let request = client::join_request(&cfg, Some(rank), 0, "bench".into(), None);
    let (joined, mut session, _) = client::rendezvous(address, &token, request, &cfg)
        .await
        .expect("join");
    let gradient = |elems: u64| -> (Vec<f32>, Vec<f32>) {
        let mine = (0..elems)
            .map(|i| (rank as f32 + 1.0) + (i % 7) as f32)
            .collect();
        let mean = (0..elems)
            .map(|i| (joined.world_size as f32 + 1.0) / 2.0 + (i % 7) as f32)
            .collect();
        (mine, mean)
    };
    // No warm-up: every all-reduce carries what step 0's round does.
    let (d, d_mean) = gradient(cadence.elements(0, cfg.model.discriminator_params()));
    let (g, g_mean) = gradient(cadence.elements(0, cfg.model.generator_params()));
    // f32 and bf16 carry these small integers exactly; int8 within a few of
    // its steps (its rounding and the residuals carried into the next step);
    // PowerSGD's rank-4 projection of them only approximately.
    let exact = cfg.allreduce.wire != WireFormat::Int8;
    let compressed = cfg.allreduce.powersgd_rank > 0;
    let close = |got: &[f32], want: &[f32]| {
        let step = want.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
        match (compressed, exact) {
            (true, _) => got.len() == want.len() && got.iter().all(|g| g.is_finite()),
            (false, true) => got == want,
            (false, false) => got
                .iter()
                .zip(want)
                .all(|(g, w)| (g - w).abs() <= 3.0 * step),
        }
    };
    let mut times: [Vec<String>; 4] = Default::default();
    let warm = (WARMUP * sync_every) as u64;
    for step in 0..steps as u64 {
        let step_started = Instant::now();
        let syncs = cadence.syncs(step);
        // Each network's backward pass, then its all-reduce (if this step has one).
        let mut net_ms = [0.0; 2];
        for ((net, mine, want), ms) in [
            (Net::Discriminator, &d, &d_mean),
            (Net::Generator, &g, &g_mean),
        ]
        .into_iter()
        .zip(&mut net_ms)
        {
            gpu_pass(backward).await;
            // A worker's gradient is a fresh vector each step (flattened
            // out of the backward pass): the all-reduce takes it by value.
            let grads = syncs.then(|| mine.clone());
            let started = Instant::now();
            let reduced = match grads {
                Some(grads) => Some(
                    session
                        .all_reduce(step, net, grads)
                        .await
                        .unwrap_or_else(|e| panic!("{net:?} all-reduce: {e}")),
                ),
                None => None,
            };
            *ms = started.elapsed().as_secs_f64() * 1e3;
            // Checked outside the all-reduce's time, as gloo_allreduce.py
            // does; still inside the step's.
            if let Some(reduced) = reduced {
                assert!(
                    close(&reduced.mean, want),
                    "rank {rank}: wrong {net:?} mean"
                );
            }
        }
        let [d_ms, g_ms] = net_ms;
        if rank == 0 {
            answer_checkpoint(&mut session, &cfg, step).await;
        }
        let report = pb::StepReport {
            step,
            checksum: 1,
            ..Default::default()
        };
        session.report(report).await.expect("report");
        let whole_ms = step_started.elapsed().as_secs_f64() * 1e3;
        if step >= warm {
            let all_reduces = [d_ms, g_ms, d_ms + g_ms].map(|ms| syncs.then_some(ms));
            let columns = all_reduces.into_iter().chain([Some(whole_ms)]);
            for (column, ms) in times.iter_mut().zip(columns) {
                column.extend(ms.map(|ms| ms.to_string()));
            }
        }
    }
    session.finish(cfg.train.steps).await.expect("finish");
    for column in times {
        println!("{}", column.join(" "));
    }
}

/// Takes `time` as a GPU pass would, without the host's cores: on a
/// blocking thread with the OS's sleep, since tokio's timer wakes on its
/// next millisecond tick or later (1–2 ms late per wait, a tenth of a 10 ms
/// step at two waits per step).
async fn gpu_pass(time: Duration) {
    tokio::task::spawn_blocking(move || std::thread::sleep(time))
        .await
        .expect("the compute stand-in's thread");
}

async fn raw_star(world: usize, bytes: usize, iters: usize) -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address").to_string();
    let server = tokio::spawn(async move {
        // One task per peer; barriers separate "everyone sent" from "send back".
        let gathered = std::sync::Arc::new(tokio::sync::Barrier::new(world));
        let mut tasks = Vec::new();
        for _ in 0..world {
            let (mut socket, _) = listener.accept().await.expect("accept");
            socket.set_nodelay(true).expect("nodelay");
            let gathered = gathered.clone();
            tasks.push(tokio::spawn(async move {
                let mut buffer = vec![0u8; bytes];
                for _ in 0..iters + WARMUP {
                    let mut go = [0u8; 1];
                    socket.read_exact(&mut go).await.expect("barrier");
                    gathered.wait().await;
                    socket.write_all(&go).await.expect("release");
                    socket.read_exact(&mut buffer).await.expect("read");
                    gathered.wait().await;
                    socket.write_all(&buffer).await.expect("write");
                }
            }));
        }
        for task in tasks {
            task.await.expect("peer task");
        }
    });
    let outputs = spawn_clients(world, |_| {
        [
            "raw-client",
            &address,
            &bytes.to_string(),
            &iters.to_string(),
        ]
        .map(String::from)
        .to_vec()
    })
    .await;
    server.await.expect("raw server");
    slowest_per_iteration(&outputs)
}

async fn raw_client(args: &[String]) {
    let (address, bytes, iters): (&String, usize, usize) =
        (&args[0], args[1].parse().unwrap(), args[2].parse().unwrap());
    let mut socket = TcpStream::connect(address).await.expect("connect");
    socket.set_nodelay(true).expect("nodelay");
    let payload = vec![7u8; bytes];
    let mut incoming = vec![0u8; bytes];
    let mut times = Vec::new();
    for i in 0..iters + WARMUP {
        socket.write_all(&[1]).await.expect("barrier");
        socket.read_exact(&mut [0u8; 1]).await.expect("release");
        let started = Instant::now();
        let (mut reader, mut writer) = socket.split();
        let (w, r) = tokio::join!(writer.write_all(&payload), reader.read_exact(&mut incoming));
        w.expect("write");
        r.expect("read");
        let ms = started.elapsed().as_secs_f64() * 1e3;
        if i >= WARMUP {
            times.push(ms.to_string());
        }
    }
    println!("{}", times.join(" "));
}
