#!/usr/bin/env python3
"""Resident memory of a local run over time: coordinator and each worker.

Usage: scripts/rss_watch.py STEPS IMAGE_SIZE NF [BIN_DIR]
Runs `coordinator --workers 2` (batch 8, checkpoint every 500 steps into a
temporary file store) and prints one line every 10 s. Linux only (/proc).
"""
import os
import subprocess
import sys
import tempfile
import time

steps, size, nf = sys.argv[1], sys.argv[2], sys.argv[3]
binaries = sys.argv[4] if len(sys.argv) > 4 else "target/release"
work = tempfile.mkdtemp(prefix="gancluster-rss-")
out = os.path.join(work, "out")
coordinator = subprocess.Popen(
    [f"{binaries}/coordinator", "--workers", "2", "--image-size", size, "--ngf", nf, "--ndf", nf,
     "--batch-size", "8", "--steps", steps, "--checkpoint-every", "500",
     "--store", f"file://{work}/store", "--run", "rss", "--out", out],
    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) // 1024
    except FileNotFoundError:
        return None


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as kids:
            return [int(c) for c in kids.read().split()]
    except FileNotFoundError:
        return []


started = time.time()
while coordinator.poll() is None:
    losses = os.path.join(out, "losses.csv")
    done = open(losses).read().count("\n") - 1 if os.path.exists(losses) else 0
    workers = [rss_mib(k) for k in children(coordinator.pid)]
    print(f"{time.time() - started:6.0f} s  step ~{done:5d}  coordinator {rss_mib(coordinator.pid)} MiB"
          f"  workers {workers} MiB", flush=True)
    time.sleep(10)
print("exit status", coordinator.returncode)
