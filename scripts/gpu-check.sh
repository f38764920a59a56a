#!/usr/bin/env bash
# The prepared GPU check: one call on a lent GPU machine, bounded to 9 minutes.
#
#   OUT=/some/empty/folder .gpu/gpu-check.sh          # on the device, from the carried .gpu/
#   OUT=/tmp/x scripts/gpu-check.sh --cpu             # rehearsal here (CPU build, tiny sizes)
#
# Binaries come from the folder this script sits in (scripts/gpu-build.sh puts
# it in .gpu/ with them) or from GPU_BIN: GPU_BIN/bin/{coordinator,worker} (the
# worker under test, CUDA on the device) and GPU_BIN/cpu/worker (the CPU build
# of the same commit, for the backend comparison), each possibly xz-compressed
# (name.xz), as gpu-build.sh ships them. GPU_BIN/dcgan_torch_step.py is
# PyTorch's anchor.
#
# Writes at most 8 files under $OUT and prints a short table last:
#   gpu-check.log        every command and its output
#   results.txt          the RESULT/COMPARE lines and the parsed run figures
#   env.txt              nvidia-smi, driver, CUDA, the libraries the worker loaded
#   table.md             the table printed last
#   samples.png          standalone training's sample grid
#   losses.csv           its losses
#   samples-workers4.png the grid of the --workers 4 run
#   autotune-cache.tar.xz cubecl's autotune results (CUDA), for the record
#
# CUDA: cubecl autotunes every new kernel shape in the first process that
# meets it (2026-11-27, H200: each matmul shape about 28-40 s, a DCGAN-64
# step's shapes more than 150 s in all, even at CUBECL_AUTOTUNE_LEVEL
# minimal). The results persist in target/autotune under the working
# folder, so the check uses one step shape (64 px, nf 64, batch 64)
# everywhere but the backend comparison, gives the first process room to
# tune, and every later one reuses it.
set -uo pipefail

MODE=cuda
case "${1:-}" in
  --cpu) MODE=cpu ;;
  "") ;;
  *) echo "usage: OUT=dir $0 [--cpu]" >&2; exit 2 ;;
esac
: "${OUT:?set OUT to the folder for results}"
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=${GPU_BIN:-$HERE}
START=$SECONDS
BUDGET=${GPU_CHECK_BUDGET_S:-540}
export CUBECL_AUTOTUNE_LEVEL=${CUBECL_AUTOTUNE_LEVEL:-minimal}
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
LOG=$OUT/gpu-check.log
RESULTS=$OUT/results.txt
TABLE=$OUT/table.md
: >"$LOG"; : >"$RESULTS"
export RUST_LOG=info

# Unpacks name.xz into $WORK (xz, or Python's lzma where xz is missing).
RUN=$BIN
if [ -e "$BIN/bin/worker.xz" ]; then
  RUN=$WORK/unpacked
  mkdir -p "$RUN/bin" "$RUN/cpu"
  for f in bin/coordinator bin/worker cpu/worker; do
    if command -v xz >/dev/null; then
      xz -dc "$BIN/$f.xz" >"$RUN/$f"
    else
      python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer)' \
        "$BIN/$f.xz" >"$RUN/$f"
    fi || { echo "cannot unpack $BIN/$f.xz" >&2; exit 2; }
    chmod +x "$RUN/$f"
  done
fi
COORDINATOR=$RUN/bin/coordinator
WORKER=$RUN/bin/worker
CPU_WORKER=$RUN/cpu/worker
for f in "$COORDINATOR" "$WORKER" "$CPU_WORKER"; do
  [ -x "$f" ] || { echo "missing $f: run scripts/gpu-build.sh first (or set GPU_BIN)" >&2; exit 2; }
done

if [ "$MODE" = cuda ]; then
  # The reference sizes: DCGAN-64 at batch 64 and 128, and a run long enough for faces.
  # One step shape for all but the backend check: autotuning happens once.
  BENCH=("64 64 64"); BENCH_ITERS=20; BENCH_WARMUP=5; LOG_EVERY=5; TUNE_S=330
  CHECK=(--image-size 32 --ngf 16 --ndf 16 --batch-size 16 --steps 10)
  GROUP=(--image-size 64 --ngf 64 --ndf 64 --batch-size 64 --steps 200)
  SOLO=(--image-size 64 --ngf 64 --ndf 64 --batch-size 64 --steps 500)
else
  BENCH=("16 8 8"); BENCH_ITERS=3; BENCH_WARMUP=1; LOG_EVERY=1; TUNE_S=150
  CHECK=(--image-size 16 --ngf 8 --ndf 8 --batch-size 8 --steps 4)
  GROUP=(--image-size 16 --ngf 8 --ndf 8 --batch-size 8 --steps 8)
  SOLO=(--image-size 16 --ngf 8 --ndf 8 --batch-size 8 --steps 10)
fi

ROWS=()
row() { ROWS+=("| $1 | $2 |"); }
say() { printf '%s\n' "$*" | tee -a "$LOG"; }

# step NAME SECONDS CMD...: runs CMD with its output in the log, bounded by
# SECONDS and by what is left of the budget; returns CMD's status (124: timed out).
step() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - (SECONDS - START) - 10))
  ((limit > left)) && limit=$left
  if ((limit <= 0)); then say "== $name: skipped, the ${BUDGET} s budget is spent"; return 124; fi
  say "== $name (at most ${limit} s): $*"
  timeout --kill-after=5 "$limit" "$@" >>"$LOG" 2>&1
  local status=$?
  say "== $name: exit $status after $((SECONDS - START)) s in all"
  return $status
}

# The first line of the log after position $1 that starts with $2.
last_line() { tail -n "+$1" "$LOG" | grep -a "^$2" | tail -n 1; }
field() { sed -n "s/.*[ ]$2=\([^ ]*\).*/\1/p" <<<"$1" | tr -d '"s'; }

# 1. The machine and the libraries the CUDA worker loads.
{
  echo "mode: $MODE   date: $(date -u +%FT%TZ)   host: $(hostname)"
  if [ "$MODE" = cuda ]; then
    nvidia-smi || echo "nvidia-smi failed"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  fi
} >"$OUT/env.txt" 2>&1
NVRTC="not needed (--cpu)"
if [ "$MODE" = cuda ]; then
  # cudarc dlopens libnvrtc.so / libnvrtc.so.13 / .so.12 …: find a toolkit's or
  # a PyTorch wheel's copy and put its folder on the search path.
  dirs=$( { ldconfig -p 2>/dev/null | awk '/libnvrtc\.so/ {print $NF}'
            ls -d /usr/local/cuda*/lib64/libnvrtc.so* /usr/local/cuda*/targets/*/lib/libnvrtc.so* 2>/dev/null
            python3 - <<'PY' 2>/dev/null
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
for root in roots:
    for path in glob.glob(os.path.join(root, "nvidia", "**", "libnvrtc.so*"), recursive=True):
        print(path)
PY
          } | xargs -r -n1 dirname | awk '!seen[$0]++')
  for d in $dirs; do LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; done
  export LD_LIBRARY_PATH
  echo "NVRTC candidates (searched in this order): ${dirs:-none found}" >>"$OUT/env.txt"
fi

# 2. The step, beside PyTorch's on the same device.
for sizes in "${BENCH[@]}"; do
  read -r img nf batch <<<"$sizes"
  mark=$(($(wc -l <"$LOG") + 1))
  if step "worker bench ${img}px nf$nf batch $batch (autotunes first)" "$TUNE_S" "$WORKER" bench --image-size "$img" \
      --ngf "$nf" --ndf "$nf" --batch-size "$batch" --iters "$BENCH_ITERS" --warmup "$BENCH_WARMUP"; then
    result=$(last_line "$mark" RESULT); libs=$(last_line "$mark" LIBS)
    echo "$result" >>"$RESULTS"
    [ -n "$libs" ] && echo "$libs" >>"$OUT/env.txt" && NVRTC=$(tr ' ' '\n' <<<"$libs" | grep nvrtc || echo "none mapped")
    ours="$(field "$result" median_step) s/iter, $(field "$result" img_per_s) img/s, peak $(field "$result" peak_mem_mb) MiB"
  else
    ours="FAILED (exit $?, see gpu-check.log)"
  fi
  anchor="not run in --cpu rehearsal"
  if [ "$MODE" = cuda ]; then
    mark=$(($(wc -l <"$LOG") + 1))
    if step "PyTorch ${img}px nf$nf batch $batch" 120 python3 "$BIN/dcgan_torch_step.py" "$img" "$nf" 20 16 cuda "$batch"; then
      result=$(last_line "$mark" RESULT); echo "$result" >>"$RESULTS"
      anchor="$(field "$result" median_step) s/iter, $(field "$result" img_per_s) img/s"
    else
      anchor="FAILED (exit $?)"
    fi
  fi
  row "step ${img}px nf$nf batch $batch: gancluster" "$ours"
  row "step ${img}px nf$nf batch $batch: PyTorch eager" "$anchor"
done
row "NVRTC the worker loaded" "$NVRTC"

# 3. Backend comparison: this build against the CPU build, same seed and steps.
mark=$(($(wc -l <"$LOG") + 1))
if step "check-backend (CPU build)" 120 "$CPU_WORKER" check-backend --out "$WORK/check-reference" "${CHECK[@]}" &&
   step "check-backend ($MODE build, against the CPU build)" 120 "$WORKER" check-backend \
     --out "$WORK/check-under-test" --against "$WORK/check-reference" "${CHECK[@]}"; then
  compare=$(last_line "$mark" COMPARE)
else
  compare=$(last_line "$mark" COMPARE); compare=${compare:-"FAILED (see gpu-check.log)"}
fi
echo "$compare" >>"$RESULTS"
row "backend check ($MODE vs CPU, ${CHECK[*]})" "$(sed 's/^COMPARE //' <<<"$compare")"

# 4. The group on one device: --workers 1 and --workers 4 (four processes sharing it).
group_figures() { # log-from-line workers: mean img/s and all-reduce share of logged steps
  tail -n "+$1" "$LOG" | python3 -c '
import json, sys
world, batch = int(sys.argv[1]), int(sys.argv[2])
rows = []
for line in sys.stdin:
    if not line.startswith("{"): continue
    try: f = json.loads(line)["fields"]
    except Exception: continue
    if f.get("message") == "step": rows.append((float(f["images_per_s"]), float(f["allreduce_ms"])))
rows = rows[len(rows) // 5:]  # the first fifth warms up
if not rows: print("no step lines"); sys.exit()
ips = sum(r[0] for r in rows) / len(rows); ar = sum(r[1] for r in rows) / len(rows)
step_ms = world * batch / ips * 1000
print(f"{ips:.1f} img/s, step {step_ms:.1f} ms, all-reduce {ar:.1f} ms ({100 * ar / step_ms:.0f} % of a step)")
' "$2" "$3"; }
batch=${GROUP[7]}
for workers in 1 4; do
  mark=$(($(wc -l <"$LOG") + 1))
  out=$WORK/group$workers
  if step "coordinator --workers $workers" 150 env GANCLUSTER__TRAIN__LOG_EVERY=$LOG_EVERY \
      "$COORDINATOR" --workers "$workers" "${GROUP[@]}" \
      --out "$out" --store "file://$WORK/store$workers" --log-format json \
      --checkpoint-every 0 --max-restarts 0; then
    figures=$(group_figures "$mark" "$workers" "$batch")
  else
    figures="FAILED (exit $?, see gpu-check.log)"
  fi
  echo "workers=$workers $figures" >>"$RESULTS"
  row "coordinator --workers $workers (${GROUP[*]})" "$figures"
done
cp "$WORK/group4/samples.png" "$OUT/samples-workers4.png" 2>/dev/null

# 5. Standalone training long enough for a grid of faces.
if step "standalone training" 200 "$WORKER" train --standalone "${SOLO[@]}" --out "$WORK/solo"; then
  cp "$WORK/solo/samples.png" "$OUT/samples.png"; cp "$WORK/solo/losses.csv" "$OUT/losses.csv"
  last=$(tail -n 1 "$WORK/solo/losses.csv")
  row "standalone ${SOLO[*]}" "done: last row $last; samples.png"
else
  row "standalone ${SOLO[*]}" "FAILED (exit $?, see gpu-check.log)"
fi

# cubecl's autotune results, next to the figures they produced.
[ -d target/autotune ] && tar -C target -cJf "$OUT/autotune-cache.tar.xz" autotune 2>>"$LOG"

{
  echo "## gancluster GPU check ($MODE), $(date -u +%F), $(head -n 1 "$OUT/env.txt")"
  echo "CUBECL_AUTOTUNE_LEVEL=$CUBECL_AUTOTUNE_LEVEL"
  [ "$MODE" = cuda ] && echo "device: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)"
  echo
  echo "| check | result |"
  echo "|---|---|"
  printf '%s\n' "${ROWS[@]}"
  echo
  echo "total $((SECONDS - START)) s"
} >"$TABLE"
cat "$TABLE"
! grep -q "FAILED\|skipped" "$TABLE"
