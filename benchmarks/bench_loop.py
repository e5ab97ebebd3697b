#!/usr/bin/env python
"""The library used directly against train.py: the same model, batch and optimizer, each run in
a process of its own, taking turns.

    python benchmarks/bench_loop.py                  # small preset, 4 rounds of 150 steps, ~3 min
    python benchmarks/bench_loop.py --variants train,loop,loop-no-malloc --rounds 3
    python benchmarks/bench_loop.py --json

A user who writes a training loop with tinytensor (benchmarks/library_loop.py, as README's
"tinytensor in brief": model, AdamW, get_batch, backward, step; nothing else) should get
train.py's speed: no speed may depend on a call only train.py makes. Both train the same model
on the same batches, so their losses agree step by step (the JSON has them). Variants:

    train            train/train.py itself on tiny Shakespeare (--log_interval 1: the time of
                     every step from metrics.jsonl; one evaluation of one batch at each end)
    loop             benchmarks/library_loop.py
    loop-no-malloc   the same with tinytensor.malloc.automatic = False (glibc's defaults): what
                     the library's own malloc tuning is worth

Each round runs every variant once, in an order that rotates from round to round, so a machine
that changes speed over minutes (shared hosts do) slows them alike. A variant's time is the
median ms/step of its run after the first 10 steps; the table shows each round and the median
over rounds of the ratio variant / train (< 1.05 is the target for loop).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402

VARIANTS = ("train", "loop", "loop-no-malloc")
SKIP = 10  # first steps not counted: compiling, filling caches and malloc's free lists


def run_variant(variant, preset, steps, tmp):
    """{"ms": median ms/step after SKIP, "losses": every step's, "faults_per_step": ... or
    None} of one run."""
    env = dict(os.environ, PYTHONPATH=common.ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if variant == "train":
        out_dir = os.path.join(tmp, "out")
        cmd = [sys.executable, os.path.join(common.ROOT, "train", "train.py"), "--config", preset,
               "--max_iters", str(steps), "--log_interval", "1", "--eval_interval", str(steps),
               "--eval_iters", "1", "--out_dir", out_dir]
        subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        steps = [r for r in rows if "ms" in r]
        for name in os.listdir(out_dir):  # the next run starts afresh (the token files stay)
            if name != "tokens":
                os.remove(os.path.join(out_dir, name))
        return {"ms": statistics.median(r["ms"] for r in steps[SKIP:]),
                "losses": [r["loss"] for r in steps], "faults_per_step": None}
    cmd = [sys.executable, os.path.join(HERE, "library_loop.py"), "--preset", preset,
           "--steps", str(steps), "--malloc", "off" if variant == "loop-no-malloc" else "auto"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    got = json.loads(out.strip().splitlines()[-1])
    return {"ms": statistics.median(got["ms"][SKIP:]), "losses": got["losses"],
            "faults_per_step": got["faults_per_step"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", choices=sorted(common.PRESETS))
    p.add_argument("--steps", type=int, default=150, help="steps per run (default %(default)s)")
    p.add_argument("--rounds", type=int, default=4, help="runs of each variant (default %(default)s)")
    p.add_argument("--variants", default="train,loop,loop-no-malloc",
                   help=f"comma-separated, from {', '.join(VARIANTS)}, train first (default %(default)s)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or variants[0] != "train" or any(v not in VARIANTS for v in variants):
        p.error(f"--variants must start with train and name only {', '.join(VARIANTS)}; got "
                f"{args.variants!r}")
    if args.steps <= SKIP + 5 or args.rounds < 1:
        p.error(f"--steps must be above {SKIP + 5} and --rounds at least 1")
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            k = r % len(variants)
            got = {v: run_variant(v, args.preset, args.steps, tmp) for v in variants[k:] + variants[:k]}
            rounds.append(got)
            if not args.json:
                print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                    f"{v} {got[v]['ms']:.1f} ms" for v in variants), file=sys.stderr, flush=True)
    res = {"machine": common.machine(common.usable_cores()), "preset": args.preset,
           "steps": args.steps, "rounds": rounds, "ratio_to_train": {
               v: statistics.median(g[v]["ms"] / g["train"]["ms"] for g in rounds) for v in variants}}
    if args.json:
        print(json.dumps(res, indent=1))
        return
    print(f"machine: {res['machine']}")
    print(f"preset {args.preset}: median ms/step of {args.steps}-step runs after {SKIP}, "
          f"{args.rounds} round(s), each variant in its own process\n")
    print(f"{'variant':16s} " + " ".join(f"{'round ' + str(i + 1):>9s}" for i in range(len(rounds)))
          + f" {'/ train':>8s} {'faults/step':>12s}")
    for v in variants:
        faults = [g[v]["faults_per_step"] for g in rounds if g[v]["faults_per_step"] is not None]
        print(f"{v:16s} " + " ".join(f"{g[v]['ms']:9.1f}" for g in rounds)
              + f" {res['ratio_to_train'][v]:7.3f}x"
              + (f" {statistics.median(faults):12.0f}" if faults else f" {'-':>12s}"))


if __name__ == "__main__":
    main()
