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
    cargo bench -p worker --bench step -- 64 64 64 4
    cargo bench -p worker --bench step -- 32 16 64 10
    python3 ../shared/bench/dcgan_torch_step.py 64 64 4 2 cpu 64
    python3 ../shared/bench/dcgan_torch_step.py 32 16 10 2 cpu 64

# All-reduce through the coordinator vs a raw loopback socket pump, then PyTorch gloo.
bench-allreduce:
    cargo bench -p coordinator --bench allreduce -- --world 2,4,8 --sizes 1,11.1,14.3,25.4 --iters 10
    python3 ../shared/bench/gloo_allreduce.py --world 2,4,8 --sizes 1,11.1,14.3,25.4
    python3 ../shared/bench/gloo_allreduce.py --world 2,4,8 --sizes 1,11.1,14.3,25.4 --bf16

# Checkpoint write/read time (local S3 server and file://) and training stall
bench-checkpoint:
    cargo bench -p worker --bench checkpoint -- 5
