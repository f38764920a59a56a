# Everyday commands. `just --list` shows them.

# Train with 4 local workers on the built-in synthetic faces (CPU).
train *ARGS:
    cargo build --release -p worker -p coordinator
    target/release/coordinator --workers 4 {{ARGS}}

# Everything CI runs.
test:
    cargo test --workspace

# Lints as CI enforces them.
lint:
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings

# The CUDA backend must keep compiling even on machines without a GPU.
check-cuda:
    cargo check -p worker --features cuda

# Images/s of one DCGAN iteration on the CPU backend next to PyTorch's CPU anchor.
bench-step:
    cargo build --release -p worker
    target/release/worker bench --image-size 64 --ngf 64 --ndf 64 --batch-size 64 --iters 4 --warmup 2
    target/release/worker bench --image-size 32 --ngf 16 --ndf 16 --batch-size 64 --iters 10 --warmup 2
    python3 ../shared/bench/dcgan_torch_step.py 64 64 4 2 cpu 64
    python3 ../shared/bench/dcgan_torch_step.py 32 16 10 2 cpu 64

# All-reduce through the coordinator vs a raw loopback socket pump, then PyTorch gloo.
bench-allreduce:
    cargo bench -p coordinator --bench allreduce -- --world 2,4,8 --models 64 --iters 10
    python3 ../shared/bench/gloo_allreduce.py --world 2,4,8 --sizes 11.1,14.3,25.4
    python3 ../shared/bench/gloo_allreduce.py --world 2,4,8 --sizes 11.1,14.3,25.4 --bf16

# Checkpoint write/read time (local S3 server and file://) and training stall
bench-checkpoint:
    cargo bench -p worker --bench checkpoint -- 5

# What a lent GPU machine runs: build .gpu/ here (CUDA + CPU release builds).
gpu-build:
    scripts/gpu-build.sh

# The GPU check rehearsed on this machine's CPU build at tiny sizes.
gpu-rehearse:
    cargo build --release -p worker -p coordinator
    rm -rf target/gpu-rehearsal && mkdir -p target/gpu-rehearsal/bin target/gpu-rehearsal/cpu
    cp target/release/worker target/release/coordinator target/gpu-rehearsal/bin/
    cp target/release/worker target/gpu-rehearsal/cpu/
    xz -1 -T0 target/gpu-rehearsal/bin/* target/gpu-rehearsal/cpu/*
    OUT=target/gpu-rehearsal/out GPU_BIN=target/gpu-rehearsal scripts/gpu-check.sh --cpu

# The CPU image from a release build (add --local-base where no registry can be reached).
image *ARGS:
    cargo build --release -p worker -p coordinator
    deploy/image.sh {{ARGS}}

# Validate the manifests and rehearse the cpu overlay in Docker containers.
rehearse:
    cargo test -p gancluster-tests --test integration -- deploy:: rehearsal::

# Scaling with a fixed compute wait per step standing in for a GPU step (C ms), W = 1..8.
bench-scaling:
    cargo bench -p coordinator --bench allreduce -- --compute-ms 10,40,160 --world 1,2,4,8 --models 64 --iters 10

# The same with post-local SGD (train.sync_every = H): one averaging step per round of H.
bench-sync-every:
    cargo bench -p coordinator --bench allreduce -- --compute-ms 10,40 --world 1,4 --models 64 --iters 64 --sync-every 1,8,32,64 --wire f32
