#!/usr/bin/env python
"""Gradient accumulation's cost: train.py's step time and peak memory at K micro-batches per
optimizer step against K=1, for the same global batch.

    python benchmarks/bench_accumulation.py                    # lecture preset, K = 1 and 4
    python benchmarks/bench_accumulation.py --preset small --ks 1,2,4 --steps 20

Each run is train.py itself in a process of its own (random weights, tiny Shakespeare, one
evaluation batch, no dropout so that every K computes the same thing): the step time is the
median of the `ms` of metrics.jsonl over the steps after the first, and the peak memory is
the process's maximum resident set (getrusage of a one-child wrapper). The runs take turns,
--rounds times, and the table shows the median over the rounds: the ratio to K=1 should be
close to 1 (the micro-batches' matmuls are smaller, but not small), and the memory lower.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train", "train.py")

# one child, so RUSAGE_CHILDREN's ru_maxrss (kB on Linux) is that child's peak
WRAPPER = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
           "print('maxrss_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
           "sys.exit(rc)")


def one_run(preset, k, steps, out_dir):
    cmd = [sys.executable, "-c", WRAPPER, sys.executable, TRAIN, "--config", preset,
           "--gradient_accumulation_steps", str(k), "--max_iters", str(steps), "--dropout", "0",
           "--eval_iters", "1", "--eval_interval", str(steps), "--log_interval", "1",
           "--out_dir", out_dir, "--device", "cpu"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"error: train.py with K={k} failed (exit {p.returncode}): "
                 f"{p.stderr.strip().splitlines()[-1:]}")
    maxrss = int(p.stdout.rsplit("maxrss_kb", 1)[1].split()[0])
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        ms = [r["ms"] for r in map(json.loads, f) if "ms" in r and r["step"] >= 1]
    return statistics.median(ms), maxrss / 1024


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="lecture")
    p.add_argument("--ks", default="1,4", help="comma-separated K values (the first is the baseline)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the first untimed)")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    results = {k: [] for k in ks}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for k in (ks if r % 2 == 0 else ks[::-1]):
                results[k].append(one_run(args.preset, k, args.steps, os.path.join(tmp, f"k{k}r{r}")))
    base = statistics.median(ms for ms, _ in results[ks[0]])
    print(f"preset {args.preset}, {args.steps} steps per run (the first untimed), {args.rounds} rounds")
    print(f"{'K':>3} {'ms/step':>10} {'vs K=' + str(ks[0]):>8} {'peak MB':>9}")
    for k in ks:
        ms = statistics.median(m for m, _ in results[k])
        mb = max(m for _, m in results[k])
        print(f"{k:>3} {ms:>10.1f} {ms / base:>8.3f} {mb:>9.0f}")


if __name__ == "__main__":
    main()
