//! gancluster's integration tests: real binaries, real sockets, real files,
//! every child under a deadline. One binary, a module per area (ripgrep's
//! layout), so the heavy dependencies link once. Run one area with
//! `cargo test -p gancluster-tests --test integration hostile::`.

/// A user's mistakes: bad data, odd flags, missing keys.
mod bad_input;
/// Processes killed, frozen and cut off mid-training.
mod chaos;
/// Checkpoints on a real S3 server: exact resume, corruption, outages.
mod checkpoints;
/// The Kubernetes manifests, rendered and validated offline.
mod deploy;
/// What a person sees on the terminal.
mod display;
/// Coordinator and workers as separate processes on loopback.
mod distributed;
/// The prepared GPU check, rehearsed on the CPU build.
mod gpu_rehearsal;
/// The health service the probes read.
mod health;
/// Strangers and broken peers against a real coordinator.
mod hostile;
/// The metrics as a real Prometheus scrapes them.
mod prometheus;
/// The deployment rehearsed in real containers.
mod rehearsal;
/// One coordinator per run.
mod run_lock;
/// Event files read back by TensorBoard itself.
mod tensorboard;
