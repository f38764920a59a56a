#!/usr/bin/env bash
# Sample quality over seeds: gancluster against PyTorch's reference trainer
# (../shared/bench/dcgan_torch_train.py), same data, settings and measure.
#
#   scripts/parity/swd_seeds.sh WORKER OUT STEPS SEED...
#
# Data: the synthetic face set (`worker synth --count 22000`), train split,
# 32×32, ngf = ndf = 32, batch 128, Adam 2e-4/0.5/0.999, one process on CPU.
# Measure: SWD ×1e3 (ProGAN) of 1024 generated images, 8-bit as saved,
# against the first 1024 validation images, with one fixed seed (22340) for
# patches and projections: gancluster's --eval-images computes it in
# process; PyTorch's PNGs go through `worker swd` with the same seed and the
# same 1024 real images. Appends `steps,seed,trainer,swd,seconds` rows to
# OUT/results.csv.
set -euo pipefail
worker=$1 out=$2 steps=$3
shift 3
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
reference=$here/../../../shared/bench/dcgan_torch_train.py
[ -f "$reference" ] || { echo "missing $reference (PyTorch's reference trainer)" >&2; exit 2; }
data=$out/faces
[ -f "$data/list_eval_partition.txt" ] || "$worker" synth --out "$data" --count 22000
val=$out/val1024
if [ ! -d "$val" ]; then
  mkdir -p "$val"
  awk '$2 == 1 {print $1}' "$data/list_eval_partition.txt" | sort | head -n 1024 |
    while read -r name; do cp "$data/img_align_celeba/$name" "$val/"; done
fi
flags=(--image-size 32 --ngf 32 --ndf 32 --batch-size 128 --steps "$steps")
for seed in "$@"; do
  run=$out/ours-$steps-$seed
  started=$SECONDS
  "$worker" train --standalone --data "$data" --split train "${flags[@]}" --seed "$seed" \
    --eval-images 1024 --out "$run" 2>"$run.log"
  swd=$(grep -o 'SWD x1e3 against held-out images swd=.*mean [0-9.]*' "$run.log" | grep -o 'mean [0-9.]*$' | cut -d' ' -f2)
  echo "$steps,$seed,gancluster,$swd,$((SECONDS - started))" >>"$out/results.csv"
  run=$out/torch-$steps-$seed
  started=$SECONDS
  python3 "$reference" "$data" train 32 32 128 "$steps" "$run" "$seed" >"$run.log" 2>&1
  swd=$("$worker" swd "$run/gen" "$val" --image-size 32 --count 1024 --seed 22340 | grep -o 'mean [0-9.]*$' | cut -d' ' -f2)
  echo "$steps,$seed,pytorch,$swd,$((SECONDS - started))" >>"$out/results.csv"
  tail -n 2 "$out/results.csv"
done
