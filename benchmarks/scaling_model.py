#!/usr/bin/env python
"""Predict the data-parallel step time for N ranks from measured single-rank numbers.

    python benchmarks/scaling_model.py                       # the presets, 8 .. 512 ranks
    python benchmarks/scaling_model.py --preset lecture --bandwidth 25,100,400 --latency 5
    python benchmarks/scaling_model.py --json

The model (docs/distributed.md explains it and where it stops holding):

    ring allreduce of S bytes over N ranks:  t_ar(N) = 2 (N - 1) / N * S / B + 2 (N - 1) * a
    weak scaling (each rank keeps the one-process batch, global batch N times larger):
        overlap off:  t(N) = t_fwd + t_bwd + t_ar(N) + t_opt
        overlap on:   t(N) = t_fwd + max(t_bwd, t_ar(N) + t_last) + t_opt
    strong scaling (one global batch split N ways, N <= batch size):
        the same with t_fwd and t_bwd divided by N

B is the network bandwidth per rank (Gbit/s), a the per-message latency, S the gradient bytes
(4 bytes per float32 parameter), t_last the allreduce of the last bucket that backward fills
(it cannot overlap: DDP's tail). With overlap the gradients are summed in buckets while
backward still runs, the way torch's DDP does (tinytensor.reducer.GradientReducer, train.py's
--overlap 1 with --bucket_mb 1 by default). The single-rank times default to this project's measurements on its 2-core
test machine; --measure times a few steps of gpt.model here instead, or pass your own with
--fwd-ms, --bwd-ms, --opt-ms.
"""
import argparse
import json
import os
import statistics
import sys
import time

# one process, 2 threads, measured with --measure 3 on the project's 2-core AMD EPYC VM while
# its shared host ran slow (about 2x the step times of README's table); --measure N times this
# machine instead
PRESETS = {
    #            parameters  batch  forward ms  backward ms  AdamW ms
    "small": dict(params=816_705, batch=12, fwd_ms=28.2, bwd_ms=47.4, opt_ms=5.4),
    "lecture": dict(params=10_788_929, batch=64, fwd_ms=4764.0, bwd_ms=8166.0, opt_ms=87.6),
}
RANKS = (1, 2, 8, 32, 128, 512)
MODEL_SHAPES = {"small": dict(block_size=64, n_embd=128, n_head=4, n_layer=4),
                "lecture": dict(block_size=256, n_embd=384, n_head=6, n_layer=6)}


def measure(preset, steps):
    """Median forward, backward and AdamW ms of `steps` training steps of gpt.model's GPT at
    the preset (dropout 0, random tokens, one process, every BLAS thread), after one untimed."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import numpy as np

    import tinytensor as tt
    from gpt.model import GPTConfig, GPTLanguageModel
    from tinytensor.optim import AdamW
    tt.manual_seed(0)
    model = GPTLanguageModel(GPTConfig(vocab_size=65, dropout=0.0, **MODEL_SHAPES[preset]))
    opt = AdamW(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    times = {"fwd_ms": [], "bwd_ms": [], "opt_ms": []}
    B, T = PRESETS[preset]["batch"], MODEL_SHAPES[preset]["block_size"]
    for i in range(steps + 1):
        d = rng.integers(0, 65, (B, T + 1))
        opt.zero_grad()
        t0 = time.perf_counter()
        _, loss = model(d[:, :-1].copy(), d[:, 1:].copy())
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        if i:
            for k, a, b in (("fwd_ms", t0, t1), ("bwd_ms", t1, t2), ("opt_ms", t2, t3)):
                times[k].append(1e3 * (b - a))
    return {k: statistics.median(v) for k, v in times.items()}


def allreduce_ms(nbytes, ranks, gbit_s, latency_us):
    """Ring allreduce (reduce-scatter then all-gather): 2 (N-1)/N of the bytes cross each
    rank's link, in 2 (N-1) messages (large messages: small ones would take a tree, log N)."""
    if ranks == 1:
        return 0.0
    bandwidth = gbit_s * 1e9 / 8                                   # bytes per second
    return 1e3 * (2 * (ranks - 1) / ranks * nbytes / bandwidth) + 2 * (ranks - 1) * latency_us / 1e3


def step_ms(p, ranks, gbit_s, latency_us, overlap, strong, bucket_mb=1.0):
    """Predicted ms per step for N ranks (see the module docstring)."""
    split = ranks if strong else 1
    fwd, bwd, opt = p["fwd_ms"] / split, p["bwd_ms"] / split, p["opt_ms"]
    nbytes = 4 * p["params"]
    comm = allreduce_ms(nbytes, ranks, gbit_s, latency_us)
    if not overlap:
        return fwd + bwd + comm + opt
    last = allreduce_ms(min(nbytes, bucket_mb * 2**20), ranks, gbit_s, latency_us)
    return fwd + max(bwd, comm - last) + last + opt


def table(preset, bandwidths, latency_us, strong, bucket_mb):
    p = PRESETS[preset]
    rows = []
    # strong scaling: the batch's rows split evenly, so only rank counts that divide it
    ranks_list = [n for n in (1, 2, 4, 8, 16, 32, 64) if p["batch"] % n == 0] if strong else RANKS
    for gbit in bandwidths:
        for ranks in ranks_list:
            off = step_ms(p, ranks, gbit, latency_us, False, strong)
            on = step_ms(p, ranks, gbit, latency_us, True, strong, bucket_mb)
            one = step_ms(p, 1, gbit, latency_us, False, strong)
            # weak scaling: N times the tokens per step; strong: the same tokens
            work = ranks if not strong else 1
            rows.append({"gbit_s": gbit, "ranks": ranks, "allreduce_ms": allreduce_ms(
                4 * p["params"], ranks, gbit, latency_us), "step_ms_overlap_off": off,
                "step_ms_overlap_on": on, "speedup_off": work * one / off, "speedup_on": work * one / on})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--preset", default="small,lecture", help="comma-separated: small, lecture")
    ap.add_argument("--bandwidth", default="25,100", help="Gbit/s per rank, comma-separated")
    ap.add_argument("--latency", type=float, default=5.0, help="us per message (default %(default)s)")
    ap.add_argument("--bucket-mb", type=float, default=1.0,
                    help="with overlap, the size of the last bucket, whose sum cannot hide behind "
                         "backward (default %(default)s MB, DDP's first bucket)")
    ap.add_argument("--strong", action="store_true",
                    help="split one global batch over the ranks (default: each rank keeps the batch)")
    for name in ("fwd", "bwd", "opt"):
        ap.add_argument(f"--{name}-ms", type=float, default=None,
                        help=f"measured one-process {name} time in ms (default: the preset's)")
    ap.add_argument("--measure", type=int, default=0, metavar="STEPS",
                    help="time STEPS training steps of each preset here first (default: use the "
                         "stored measurements)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    presets = [s.strip() for s in args.preset.split(",") if s.strip()]
    bad = [s for s in presets if s not in PRESETS]
    if bad or not presets:
        ap.error(f"--preset: choose from {', '.join(PRESETS)}, got {args.preset!r}")
    try:
        bandwidths = [float(b) for b in args.bandwidth.split(",")]
    except ValueError:
        ap.error(f"--bandwidth takes Gbit/s numbers separated by commas, got {args.bandwidth!r}")
    if min(bandwidths) <= 0 or args.latency < 0 or args.bucket_mb <= 0:
        ap.error("--bandwidth and --bucket-mb must be > 0 and --latency >= 0")
    if args.measure < 0:
        ap.error(f"--measure takes a number of steps >= 0, got {args.measure}")
    for p in presets if args.measure else ():
        PRESETS[p].update(measure(p, args.measure))
    for name in ("fwd", "bwd", "opt"):
        value = getattr(args, f"{name}_ms")
        if value is not None:
            if value < 0:
                ap.error(f"--{name}-ms must be >= 0, got {value}")
            for p in presets:
                PRESETS[p][f"{name}_ms"] = value
    out = {p: table(p, bandwidths, args.latency, args.strong, args.bucket_mb) for p in presets}
    if args.json:
        print(json.dumps(out, indent=1))
        return
    kind = "strong (one global batch split over the ranks)" if args.strong else \
        "weak (each rank keeps the one-process batch)"
    print(f"scaling: {kind}; latency {args.latency:g} us per message")
    for p, rows in out.items():
        q = PRESETS[p]
        print(f"\n{p}: {q['params'] / 1e6:.2f}M parameters, {4 * q['params'] / 2**20:.1f} MiB of "
              f"gradients per step; one process: forward {q['fwd_ms']:.1f} ms, backward "
              f"{q['bwd_ms']:.1f} ms, AdamW {q['opt_ms']:.1f} ms")
        print(f"{'Gbit/s':>7s} {'ranks':>6s} {'allreduce ms':>13s} {'step ms (off)':>14s} "
              f"{'step ms (on)':>13s} {'speedup off':>12s} {'speedup on':>11s}")
        for r in rows:
            print(f"{r['gbit_s']:7g} {r['ranks']:6d} {r['allreduce_ms']:13.2f} "
                  f"{r['step_ms_overlap_off']:14.1f} {r['step_ms_overlap_on']:13.1f} "
                  f"{r['speedup_off']:11.1f}x {r['speedup_on']:10.1f}x")


if __name__ == "__main__":
    main()
