#!/usr/bin/env python
"""Time distributed.allreduce_gradients against one raw MPI Allreduce of the same bytes.

    mpirun -n 2 python benchmarks/bench_allreduce.py [--repeats 30] [--presets small,lecture]

The parameters are those of gpt.model's GPT at the train presets' sizes (float32, vocab 65),
kept in AdamW's flat buffers (optimizer.flat): small 0.82M parameters in 50 tensors, lecture
10.8M in 72. A repeat's time is the slowest rank's; the table shows the median over repeats.
The variants take turns within each repeat, so a busy machine slows them all alike.

'raw' is MPI Allreduce(IN_PLACE) on one preallocated buffer of the same size: the floor that
allreduce_gradients(optimizer.flat) is measured against. The three "buckets"/"one buffer" rows
give each parameter a fresh gradient array (as backward leaves them, or set by hand), which
allreduce_gradients first copies into the flat buffer, then sums in pieces of 25 MB, one
piece, or 4 MB: the path training takes with --overlap 0. The last row has the gradients in
their views of the flat buffer already (as a GradientReducer's hooks leave them during
backward), so the buffer is divided and summed in place with no copies.

--steps N (default 10; 0 skips it) adds a second table: a training step's backward followed by
the gradient averaging, on each rank's share of the preset's global batch (small 12 rows,
lecture 64), timed N times (a lecture-preset backward takes seconds here: choose N to fit).
"backward alone" is the floor; "overlap off" is backward then allreduce_gradients (train.py's
--overlap 0); "overlap on" is backward with a GradientReducer summing 1 MB buckets during it
(reducer.OVERLAP_BUCKET_MB), then finish().
The gain can be at most the allreduce time, and only where a rank has spare cores for the
communication thread and its copies (not on a 2-core machine running 2 ranks).
"""
import argparse
import contextlib
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gpt.model import GPTConfig, build_model  # noqa: E402
import tinytensor  # noqa: E402
from tinytensor import distributed as dist  # noqa: E402
from tinytensor.optim import AdamW  # noqa: E402
from tinytensor.reducer import GradientReducer  # noqa: E402

PRESETS = {  # vocab, block_size, n_embd, n_head, n_layer, global batch (train presets)
    "small": (65, 64, 128, 4, 4, 12),
    "lecture": (65, 256, 384, 6, 6, 64),
}


def timed(rows, repeats, comm):
    """{label: median over repeats of the slowest rank's time in ms}. The variants take turns
    within each repeat, so a busy machine slows them all alike."""
    times = {label: [] for label, _ in rows}
    for i in range(repeats + 2):  # two warm-up rounds
        for label, fn in rows:
            comm.Barrier()
            t0 = time.perf_counter()
            fn(i)
            dt = comm.allreduce(time.perf_counter() - t0, op=dist.MPI.MAX)
            if i >= 2:
                times[label].append(dt * 1e3)
    return {label: float(np.median(t)) for label, t in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--presets", default="small,lecture")
    ap.add_argument("--steps", type=int, default=10, help="repeats of the backward + reduce "
                    "table (0: skip it)")
    args = ap.parse_args()
    for name in args.presets.split(","):
        if name not in PRESETS:
            sys.exit(f"unknown preset {name!r}: choose from {', '.join(PRESETS)}")

    tinytensor.malloc.keep_freed_memory()  # (its AdamW would do it too)
    dist.init()
    if not dist.launched_under_mpi() or dist.world_size() < 2:
        sys.exit("run under MPI with two or more ranks: mpirun -n 2 python benchmarks/bench_allreduce.py")
    comm, main_rank = dist._comm, dist.is_main()
    if main_rank:
        print(f"{dist.describe()}; median of {args.repeats} repeats, the slowest rank's time\n")
        print(f"{'preset':8s} {'params':>11s} {'MB':>6s} {'variant':38s} {'ms':>8s} "
              f"{'vs raw':>7s} {'GB/s':>6s}")

    rng = np.random.default_rng(dist.rank())
    for name in args.presets.split(","):
        vocab, block, n_embd, n_head, n_layer, _ = PRESETS[name]
        model = build_model("gpt", GPTConfig(vocab_size=vocab, block_size=block, n_embd=n_embd,
                                             n_head=n_head, n_layer=n_layer, dropout=0.0))
        params = list(model.parameters())
        opt = AdamW(params, lr=1e-3)  # keeps the parameters and gradients in opt.flat
        shapes = [p.shape for p in params]
        grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(2)]
        n = sum(int(np.prod(s)) for s in shapes)
        mb = n * 4 / 1e6
        flat = np.ones(n, np.float32)

        def raw(i):
            comm.Allreduce(dist.MPI.IN_PLACE, flat)

        rows = [("raw Allreduce (1 buffer)", raw)]
        for bucket_mb in (dist.DEFAULT_BUCKET_MB, 1e9, 4):
            label = "one buffer" if bucket_mb == 1e9 else f"{bucket_mb:g} MB buckets"

            def ours(i, bucket_mb=bucket_mb):
                for p, g in zip(params, grads[i % 2]):
                    p.grad = g  # fresh arrays set by hand: copied into the flat buffer
                dist.allreduce_gradients(opt.flat, bucket_mb=bucket_mb)
            rows.append((f"allreduce_gradients, {label}", ours))

        # the gradients in their views of the optimizer's flat buffer (optimizer.flat), as the
        # reducer's hooks leave them: allreduce_gradients sums that buffer in place, no copies
        views = list(zip(opt.flat.params, opt.flat.grad_views))
        for (p, v), g in zip(views, grads[0]):
            v[...] = g

        def flat_buffer(i):
            for p, v in views:
                p.grad = v  # as the reducer's hooks leave them
            dist.allreduce_gradients(opt.flat)
        rows.append(("allreduce_gradients, AdamW flat buffer", flat_buffer))
        results = timed(rows, args.repeats, comm)
        base = results[rows[0][0]]
        for label, ms in results.items():
            if main_rank:
                print(f"{name:8s} {n:11,d} {mb:6.1f} {label:38s} {ms:8.2f} {ms / base:6.2f}x "
                      f"{mb / ms:6.2f}")
    if args.steps > 0:
        backward_and_reduce(args.presets.split(","), args.steps, comm, main_rank)


def backward_and_reduce(presets, repeats, comm, main_rank):
    """The second table: backward + gradient averaging per training step, overlap off and on."""
    if main_rank:
        print(f"\nbackward + gradient averaging of a training step (median of {repeats}, the "
              f"slowest rank's time)\n")
        print(f"{'preset':8s} {'rows/rank':>9s} {'variant':44s} {'ms':>9s} {'vs off':>7s}")
    for name in presets:
        vocab, block, n_embd, n_head, n_layer, batch = PRESETS[name]
        model = build_model("gpt", GPTConfig(vocab_size=vocab, block_size=block, n_embd=n_embd,
                                             n_head=n_head, n_layer=n_layer, dropout=0.0))
        dist.broadcast_parameters(model)
        opt = AdamW(list(model.parameters()), lr=1e-3)
        rows_here = max(1, batch // dist.world_size())
        rng = np.random.default_rng(1)  # every rank its own rows of one global batch
        xs = [rng.integers(0, vocab, (batch, block))[dist.rank()::dist.world_size()][:rows_here]
              for _ in range(2)]
        on = GradientReducer(opt.flat, overlap=True)
        off = GradientReducer(opt.flat, overlap=False)  # allreduce_gradients
        quiet = on.no_sync  # `on`'s hooks stay out of the other variants' backward passes
        variants = [("backward alone", quiet, lambda: None),
                    ("backward, allreduce_gradients (overlap off)", quiet, off.finish),
                    (f"backward + GradientReducer (on, {len(on.buckets)} buckets)",
                     contextlib.nullcontext, on.finish)]
        times = {label: [] for label, _, _ in variants}
        for i in range(repeats + 1):  # one warm-up round
            for label, context, reduce in variants:
                x = xs[i % 2]
                _, loss = model(x, x)
                opt.zero_grad()
                comm.Barrier()
                t0 = time.perf_counter()
                with context():
                    loss.backward()
                reduce()
                dt = comm.allreduce(time.perf_counter() - t0, op=dist.MPI.MAX)
                if i >= 1:
                    times[label].append(dt * 1e3)
        on.close()
        med = {label: float(np.median(t)) for label, t in times.items()}
        base = med[variants[1][0]]
        for label, ms in med.items():
            if main_rank:
                print(f"{name:8s} {rows_here:9d} {label:44s} {ms:9.2f} {ms / base:6.2f}x")


if __name__ == "__main__":
    main()
