#!/usr/bin/env python3
"""Time to recover from each fault docs/operations.md's reliability table lists.

    scripts/recovery/measure.py BIN_DIR [REPEATS]

BIN_DIR holds `coordinator` and `worker` built with fault injection (the
`faults` feature: `cargo build --workspace --all-targets` or `cargo test
--workspace` turn it on). Each scenario trains the tests' tiny model
(16x16, ngf = ndf = 8, batch 8) with 2 workers for 60 steps, a log line
per step, checkpoints every 10 steps, heartbeats every second (lost after
3 s) and a 3 s step timeout, injects one fault at step 30 and reads the
logs: when the fault happened (the worker's own fault line, or when this
script acted), when the coordinator noticed (`the group
re-forms`), when the next generation formed, and when its first step
completed. Steps trained again come from `membership.csv`. Prints one
Markdown row per scenario (median over REPEATS, default 3).
"""

import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

BIN = Path(sys.argv[1]).resolve()
REPEATS = int(sys.argv[2]) if len(sys.argv) > 2 else 3
STEPS = 60
FAULT_STEP = 30
TINY = ["--image-size", "16", "--ngf", "8", "--ndf", "8", "--batch-size", "8"]
QUICK = {
    "GANCLUSTER__TRAIN__LOG_EVERY": "1",
    "GANCLUSTER__COORDINATOR__HEARTBEAT_INTERVAL_S": "1",
    "GANCLUSTER__COORDINATOR__HEARTBEAT_TIMEOUT_S": "3",
    "GANCLUSTER__COORDINATOR__STEP_TIMEOUT_S": "3",
    "GANCLUSTER__COORDINATOR__MAX_RESTARTS": "3",
    "RUST_LOG": "info",
}
STAMP = re.compile(r"^(?:\[rank \d+\] )?(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z")
LIMIT = 120


def stamp(line):
    m = STAMP.match(line)
    if not m:
        return None
    whole, frac = m.group(1).split(".")
    t = datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    return t.timestamp() + float("0." + frac)


def first(lines, pattern, after=0.0):
    for line in lines:
        t = stamp(line)
        if t is not None and t >= after and re.search(pattern, line):
            return t
    raise RuntimeError(f"no line matching {pattern!r} after {after}")


def wait_for(predicate, what):
    deadline = time.time() + LIMIT
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise RuntimeError(f"timed out waiting for {what}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Run:
    """One scenario's folder, store and processes."""

    def __init__(self, env):
        self.dir = Path(tempfile.mkdtemp(prefix="recovery-"))
        self.out = self.dir / "out"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("GANCLUSTER")}
        self.env.update(QUICK)
        self.env.update(env)
        self.procs = []

    def common(self):
        return ["--steps", str(STEPS), *TINY, "--out", str(self.out),
                "--store", f"file://{self.dir / 'store'}", "--checkpoint-every", "10"]

    def spawn(self, args, log):
        p = subprocess.Popen(args, env=self.env, stdout=subprocess.DEVNULL,
                             stderr=open(self.dir / log, "w"))
        self.procs.append(p)
        return p

    def coordinator(self, extra=()):
        return self.spawn([str(BIN / "coordinator"), "--workers", "2", *self.common(), *extra],
                          f"coordinator-{len(self.procs)}.log")

    def worker(self, address, rank):
        return self.spawn([str(BIN / "worker"), "train", "--coordinator", address, "--rank",
                           str(rank), *self.common()], f"worker-{rank}-{len(self.procs)}.log")

    def steps_done(self):
        try:
            return len((self.out / "losses.csv").read_text().splitlines()) - 1
        except OSError:
            return 0

    def lines(self, who="coordinator"):
        return (self.out / "logs" / f"{who}.log").read_text().splitlines()

    def membership(self):
        rows = (self.out / "membership.csv").read_text().splitlines()[1:]
        return [r.split(",") for r in rows]

    def finish(self, main):
        if main.wait(timeout=LIMIT) != 0:
            raise RuntimeError(f"the run failed: see {self.dir}")
        for p in self.procs:
            p.wait(timeout=LIMIT)

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(self.dir)


def timings(run, fault_at, generation=2):
    lines = run.lines()
    detected = first(lines, r"the group re-forms", fault_at)
    formed = first(lines, rf"the group formed generation={generation} ", detected)
    stepped = first(lines, r"coordinator::progress: step ", formed)
    retrained = sum(int(row[4]) for row in run.membership())
    return detected - fault_at, formed - fault_at, stepped - fault_at, retrained


def injected(kind, extra_env=None):
    def scenario():
        run = Run({"GANCLUSTER_FAULT": f"{kind}:1:{FAULT_STEP}", **(extra_env or {})})
        try:
            run.finish(run.coordinator())
            fault_at = first(run.lines("rank-1"), r"GANCLUSTER_FAULT")
            return timings(run, fault_at)
        finally:
            run.close()
    return scenario


def sigstop():
    run = Run({})
    try:
        main = run.coordinator()
        wait_for(lambda: run.steps_done() >= FAULT_STEP, "step 30")
        worker = next(int(p) for p in Path(f"/proc/{main.pid}/task/{main.pid}/children")
                      .read_text().split())
        fault_at = time.time()
        os.kill(worker, signal.SIGSTOP)
        run.finish(main)
        return timings(run, fault_at)
    finally:
        run.close()


def external(env=None):
    port = free_port()
    run = Run({"GANCLUSTER_TOKEN": "recovery", "GANCLUSTER__COORDINATOR__RECONNECT_TIMEOUT_S": "60",
               **(env or {})})
    listen = f"127.0.0.1:{port}"
    return run, listen, f"http://{listen}"


def coordinator_killed():
    run, listen, address = external()
    try:
        first_one = run.coordinator(["--external", "--listen", listen])
        wait_for(lambda: (run.out / "coordinator.addr").exists(), "the coordinator")
        workers = [run.worker(address, r) for r in range(2)]
        wait_for(lambda: run.steps_done() >= FAULT_STEP, "step 30")
        fault_at = time.time()
        first_one.kill()
        first_one.wait()
        second = run.coordinator(["--external", "--listen", listen])
        run.finish(second)
        for w in workers:
            w.wait(timeout=LIMIT)
        lines = run.lines()
        formed = first(lines, r"the group formed generation=1 ", fault_at)
        stepped = first(lines, r"coordinator::progress: step ", formed)
        retrained = sum(int(row[4]) for row in run.membership())
        # Noticed by the workers, which hold the replicas.
        noticed = min(first((run.dir / f"worker-{r}-{r + 1}.log").read_text().splitlines(),
                            r"joining again with this replica", fault_at) for r in range(2))
        return noticed - fault_at, formed - fault_at, stepped - fault_at, retrained
    finally:
        run.close()


def shrink_and_grow(which):
    run, listen, address = external({"GANCLUSTER__COORDINATOR__MIN_WORKERS": "1",
                                      "GANCLUSTER__COORDINATOR__REJOIN_TIMEOUT_S": "5"})
    try:
        main = run.coordinator(["--external", "--listen", listen])
        wait_for(lambda: (run.out / "coordinator.addr").exists(), "the coordinator")
        workers = [run.worker(address, r) for r in range(2)]
        wait_for(lambda: run.steps_done() >= FAULT_STEP // 2, "step 15")
        fault_at = time.time()
        workers[1].kill()
        wait_for(lambda: (run.out / "membership.csv").exists()
                 and any(r[2] == "1" for r in run.membership()), "the smaller group")
        wait_for(lambda: run.steps_done() >= FAULT_STEP, "step 30")
        arrived_at = time.time()
        run.worker(address, 1)
        run.finish(main)
        if which == "shrink":
            return timings(run, fault_at)
        lines = run.lines()
        formed = first(lines, r"the group formed generation=3 ", arrived_at)
        stepped = first(lines, r"coordinator::progress: step ", formed)
        detected = first(lines, r"the group re-forms", arrived_at)
        return detected - arrived_at, formed - arrived_at, stepped - arrived_at, 0
    finally:
        run.close()


SCENARIOS = [
    ("worker killed (SIGKILL mid-step, local)", injected("kill")),
    ("worker exits (crash, local)", injected("exit")),
    ("worker frozen (SIGSTOP, local)", sigstop),
    ("training thread hangs, heartbeats go on (local)", injected("hang")),
    ("replicas diverge (checksums differ, local)", injected("diverge")),
    ("coordinator killed (SIGKILL, external; restarted at once)", coordinator_killed),
    ("worker gone for good (external, min_workers 1, rejoin 5 s)", lambda: shrink_and_grow("shrink")),
    ("worker arrives (external, group grows)", lambda: shrink_and_grow("grow")),
]

print("| fault | noticed after | next generation formed after | first step after | steps trained again |")
print("|---|---|---|---|---|")
for name, scenario in SCENARIOS:
    results = [scenario() for _ in range(REPEATS)]
    med = [statistics.median(r[i] for r in results) for i in range(3)]
    retrained = sorted({r[3] for r in results})
    shown = [f"{t * 1000:.0f} ms" if t < 1 else f"{t:.2f} s" for t in med]
    print(f"| {name} | {' | '.join(shown)} | {', '.join(map(str, retrained))} |", flush=True)
