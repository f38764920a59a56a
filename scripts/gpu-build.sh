#!/usr/bin/env bash
# Builds what the prepared GPU check carries to a lent GPU machine, which has
# no Rust toolchain and no registries: .gpu/ (ignored by git, under 64 MiB).
#
#   scripts/gpu-build.sh            # here, before asking for device time
#
# .gpu/bin/worker.xz       release worker with --features cuda (stripped, xz)
# .gpu/bin/coordinator.xz  release coordinator, beside the CUDA worker it launches
# .gpu/cpu/worker.xz       release CPU worker of the same commit (backend comparison)
# .gpu/dcgan_torch_step.py  PyTorch's anchor, from ../shared/bench/
# .gpu/gpu-check.sh     the check itself (scripts/gpu-check.sh)
#
# Time on this 2-core machine (2026-11-27): from a cold target/, the CUDA and
# CPU release builds together took 33.5 min (2013 s, with another build
# competing part of the time); with target/ warm, a rebuild after a change
# to our crates takes minutes. See scripts/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
GPU=.gpu
ANCHOR=../shared/bench/dcgan_torch_step.py
[ -f "$ANCHOR" ] || { echo "$ANCHOR is missing: the check needs PyTorch's anchor beside it" >&2; exit 1; }
started=$SECONDS

# cudarc dlopens the driver and NVRTC, resolving the API of the CUDA version it
# was built for; the lent machines run a CUDA 13.0 driver, and a newer API than
# the driver's may ask for entry points it lacks, so build for 13.0.
CUDARC_CUDA_VERSION=13000 cargo build --release -p worker --features cuda
rm -rf "$GPU"
mkdir -p "$GPU/bin" "$GPU/cpu"
cp target/release/worker "$GPU/bin/worker"
cargo build --release -p worker -p coordinator
cp target/release/worker "$GPU/cpu/worker"
cp target/release/coordinator "$GPU/bin/coordinator"
strip "$GPU/bin/worker" "$GPU/cpu/worker" "$GPU/bin/coordinator"
# Stripped, the three binaries are about 80 MiB, over what a run may carry:
# xz brings them to about a quarter; gpu-check.sh unpacks them on the device.
xz -9 -T0 "$GPU/bin/worker" "$GPU/cpu/worker" "$GPU/bin/coordinator"
cp "$ANCHOR" "$GPU/"
cp scripts/gpu-check.sh "$GPU/"

echo "built in $((SECONDS - started)) s:"
du -b "$GPU"/bin/* "$GPU"/cpu/* "$GPU"/*.py "$GPU"/*.sh | awk '{printf "  %-28s %6.1f MiB\n", $2, $1 / 1048576}'
total=$(du -sb "$GPU" | cut -f1)
awk -v t="$total" 'BEGIN {printf "  total %.1f MiB of the 64 MiB a run may carry\n", t / 1048576}' 
if ((total >= 64 * 1048576)); then
  echo "too large to carry: .gpu/ must stay under 64 MiB" >&2
  exit 1
fi
cat <<'EOF'

Then, in the session that has a device (status says can_start_another), one call:
  run(command="bash .gpu/gpu-check.sh", carry=[".gpu"], timeout_s=570)
(the script stops itself after 9 minutes, 5.5 of which the first CUDA
process may spend autotuning; a CUDA worker that fails outright fails each
step within seconds),
and give_back afterwards unless you rerun at once. Record table.md in BENCHMARKS.md.
EOF
