# Everyday commands. `just --list` shows them.

# Train standalone on the built-in synthetic faces (CPU).
train *ARGS:
    cargo run --release -p worker -- train --standalone {{ARGS}}

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
