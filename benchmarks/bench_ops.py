#!/usr/bin/env python
"""Forward + backward of each op and layer of the GPT at its own shapes: tinytensor against
PyTorch, each in a worker process of its own (benchmarks/common.py), taking turns.

    python benchmarks/bench_ops.py                     # small preset shapes, about 30 s
    python benchmarks/bench_ops.py --preset lecture --reps 3
    python benchmarks/bench_ops.py --json

For every op: build the inputs once, then time `out = op(inputs); out.backward(g)` with a
fixed upstream gradient g (gradients reset in between, as zero_grad does), the median over
--rounds rounds of --reps calls each, the two frameworks alternating round by round. The ops:

    linear qkv       x (B, T, C) @ W (3C, C).T                the fused q/k/v projection
    linear+relu      relu(x @ W (4C, C).T + b)                the feed-forward's first layer
    linear fc2       h (B, T, 4C) @ W (C, 4C).T + b           its second layer
    attention        causal self-attention from qkv (B, T, 3C), all heads at once, with the
                     preset's attention dropout (PyTorch: nanoGPT's masked_fill + softmax)
    layer_norm       over C, with weight and bias
    dropout          the preset's p (1/2 when the preset has none) on (B, T, C)
    residual add     x + y on (B, T, C)
    embedding        token + position lookup, (V, C) and (T, C) tables, summed
    cross_entropy    logits (B*T, V) against targets
    adamw            one AdamW step over the whole model's parameters (tinytensor: flat
                     buffers; PyTorch: its default for-each-parameter loop on the CPU)
"""
import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402

OPS = ("linear qkv", "linear+relu", "linear fc2", "attention", "layer_norm", "dropout",
       "residual add", "embedding", "cross_entropy", "adamw")


def shapes(cfg):
    B, T, C = cfg["batch_size"], cfg["block_size"], cfg["n_embd"]
    return {"linear qkv": f"({B},{T},{C})->{3 * C}", "linear+relu": f"({B},{T},{C})->{4 * C}",
            "linear fc2": f"({B},{T},{4 * C})->{C}", "attention": f"({B},{T},{3 * C}) nh={cfg['n_head']}",
            "layer_norm": f"({B},{T},{C})", "dropout": f"({B},{T},{C})", "residual add": f"({B},{T},{C})",
            "embedding": f"({B},{T}) of ({common.VOCAB},{C})", "cross_entropy": f"({B * T},{common.VOCAB})",
            "adamw": "all parameters"}


def _timer(run, reset):
    def time_it(reps):
        ts = []
        for _ in range(reps):
            reset()
            t0 = time.perf_counter()
            run()
            ts.append(time.perf_counter() - t0)
        return 1e3 * common.median(ts)
    return time_it


def _forward_backward(fn, inputs, g):
    """(run, reset) for timing fn() and its backward from g; reset clears the inputs' grads
    (a tinytensor and a torch tensor alike)."""
    def run():
        fn().backward(g)

    def reset():
        for t in inputs:
            t.grad = None
    return run, reset


def _op_timing(make):
    """A worker's handlers: {"time": time_op}, where make(name) gives (run, reset), built and
    warmed up at an op's first timing."""
    built = {}

    def time_op(name, reps):
        if name not in built:
            built[name] = _timer(*make(name))
            built[name](1)  # warm-up
        return {"ms": built[name](reps)}
    return {"time": time_op}


# ----------------------------------------------------------------- tinytensor
def tinytensor_ops(cfg):
    import numpy as np

    import tinytensor as tt
    import tinytensor.nn.functional as F
    from gpt.model import GPTConfig, GPTLanguageModel
    from tinytensor.optim import AdamW
    tt.malloc.keep_freed_memory()  # now: the ops run before any optimizer would do it
    B, T, C, nh = cfg["batch_size"], cfg["block_size"], cfg["n_embd"], cfg["n_head"]
    p_att = cfg["dropout"]
    p_drop = cfg["dropout"] or 0.5
    rng = np.random.default_rng(0)

    def arr(*shape, scale=1.0):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    def leaf(*shape, scale=1.0):
        return tt.Tensor(arr(*shape, scale=scale), requires_grad=True)

    def attention(qkv):  # as gpt.model.CausalSelfAttention: split, heads, SDPA, heads side by side
        q, k, v = qkv.split(C, dim=2)                                  # each (B, T, C)
        q, k, v = (a.view(B, T, nh, C // nh).transpose(1, 2) for a in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p_att, is_causal=True)
        return y.transpose(1, 2).contiguous().view(B, T, C)            # (B, T, C)

    def make(name):
        if name == "adamw":
            model = GPTLanguageModel(GPTConfig(vocab_size=common.VOCAB, **{k: cfg[k] for k in (
                "block_size", "n_embd", "n_head", "n_layer", "dropout")}))
            ps = list(model.parameters())
            opt = AdamW([{"params": [p for p in ps if p.ndim >= 2], "weight_decay": 0.01},
                         {"params": [p for p in ps if p.ndim < 2], "weight_decay": 0.0}], lr=1e-3)
            for p in opt.flat.params:
                p.grad = arr(*p.shape, scale=0.01)  # as backward leaves them
            return opt.step, (lambda: None)
        if name == "embedding":
            wte, wpe = leaf(common.VOCAB, C), leaf(T, C)
            idx = rng.integers(0, common.VOCAB, (B, T))
            pos = np.arange(T)
            fn = (lambda: F.embedding(idx, wte) + F.embedding(pos, wpe))  # as gpt.model
            inputs = [wte, wpe]
            g = arr(B, T, C)
        elif name == "cross_entropy":
            x, t = leaf(B * T, common.VOCAB), rng.integers(0, common.VOCAB, B * T)
            fn, inputs, g = (lambda: F.cross_entropy(x, t)), [x], None
        else:
            table = {
                "linear qkv": lambda: ([leaf(B, T, C), leaf(3 * C, C, scale=0.02)], 3 * C,
                                       lambda x, w: F.linear(x, w)),
                "linear+relu": lambda: ([leaf(B, T, C), leaf(4 * C, C, scale=0.02), leaf(4 * C, scale=0.02)],
                                        4 * C, F.linear_relu),
                "linear fc2": lambda: ([leaf(B, T, 4 * C), leaf(C, 4 * C, scale=0.02), leaf(C, scale=0.02)],
                                       C, F.linear),
                "attention": lambda: ([leaf(B, T, 3 * C)], C, attention),
                "layer_norm": lambda: ([leaf(B, T, C), leaf(C), leaf(C)], C,
                                       lambda x, w, b: F.layer_norm(x, C, w, b)),
                "dropout": lambda: ([leaf(B, T, C)], C, lambda x: F.dropout(x, p_drop)),
                "residual add": lambda: ([leaf(B, T, C), leaf(B, T, C)], C, lambda x, y: x + y),
            }
            inputs, width, op = table[name]()
            fn, g = (lambda: op(*inputs)), arr(B, T, width)
        return _forward_backward(fn, inputs, g)

    return _op_timing(make)


# ----------------------------------------------------------------- PyTorch
def torch_ops(cfg, threads):
    import numpy as np
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(threads)
    B, T, C, nh = cfg["batch_size"], cfg["block_size"], cfg["n_embd"], cfg["n_head"]
    hs = C // nh
    p_att = cfg["dropout"]
    p_drop = cfg["dropout"] or 0.5
    gen = torch.Generator().manual_seed(0)
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)

    def leaf(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).requires_grad_()

    def attention(qkv):
        q, k, v = qkv.view(B, T, 3, nh, hs).permute(2, 0, 3, 1, 4)          # each (B, nh, T, hs)
        att = ((q @ k.transpose(-2, -1)) * hs ** -0.5).masked_fill(future, float("-inf")).softmax(-1)
        att = F.dropout(att, p_att) if p_att else att
        return (att @ v).transpose(1, 2).reshape(B, T, C)

    def make(name):
        if name == "adamw":
            sys.path.insert(0, os.path.join(common.ROOT, "tests"))
            from torch_gpt_reference import GPTLanguageModel
            model = GPTLanguageModel(common.VOCAB, T, C, nh, cfg["n_layer"], cfg["dropout"])
            ps = list(model.parameters())
            opt = torch.optim.AdamW([{"params": [p for p in ps if p.ndim >= 2], "weight_decay": 0.01},
                                     {"params": [p for p in ps if p.ndim < 2], "weight_decay": 0.0}], lr=1e-3)
            for p in ps:
                p.grad = 0.01 * torch.randn(p.shape, generator=gen)
            return opt.step, (lambda: None)
        if name == "embedding":
            wte, wpe = leaf(common.VOCAB, C), leaf(T, C)
            idx = torch.from_numpy(np.random.default_rng(0).integers(0, common.VOCAB, (B, T)))
            pos = torch.arange(T)
            inputs, g = [wte, wpe], torch.randn(B, T, C)
            fn = (lambda: F.embedding(idx, wte) + F.embedding(pos, wpe))
        elif name == "cross_entropy":
            x = leaf(B * T, common.VOCAB)
            t = torch.from_numpy(np.random.default_rng(0).integers(0, common.VOCAB, B * T))
            inputs, fn, g = [x], (lambda: F.cross_entropy(x, t)), None
        else:
            table = {
                "linear qkv": lambda: ([leaf(B, T, C), leaf(3 * C, C, scale=0.02)], 3 * C, F.linear),
                "linear+relu": lambda: ([leaf(B, T, C), leaf(4 * C, C, scale=0.02), leaf(4 * C, scale=0.02)],
                                        4 * C, lambda x, w, b: torch.relu(F.linear(x, w, b))),
                "linear fc2": lambda: ([leaf(B, T, 4 * C), leaf(C, 4 * C, scale=0.02), leaf(C, scale=0.02)],
                                       C, F.linear),
                "attention": lambda: ([leaf(B, T, 3 * C)], C, attention),
                "layer_norm": lambda: ([leaf(B, T, C), leaf(C), leaf(C)], C,
                                       lambda x, w, b: F.layer_norm(x, (C,), w, b)),
                "dropout": lambda: ([leaf(B, T, C)], C, lambda x: F.dropout(x, p_drop)),
                "residual add": lambda: ([leaf(B, T, C), leaf(B, T, C)], C, lambda x, y: x + y),
            }
            inputs, width, op = table[name]()
            fn, g = (lambda: op(*inputs)), torch.randn(B, T, width, generator=gen)
        return _forward_backward(fn, inputs, g)

    return _op_timing(make)


# ----------------------------------------------------------------- the parent
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", choices=sorted(common.PRESETS))
    p.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of: " + ", ".join(OPS))
    p.add_argument("--reps", type=int, default=None, help="calls per round (default: small 20, lecture 2)")
    p.add_argument("--rounds", type=int, default=5, help="rounds per framework (the median is taken)")
    p.add_argument("--threads", type=int, default=common.usable_cores())
    p.add_argument("--json", action="store_true")
    p.add_argument("--accelerators", default="auto", choices=sorted(common.ACCELERATORS),
                   help="tinytensor's faster versions of the fused ops: auto, on or off")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in args.ops if o not in OPS]
    if bad:
        p.error(f"unknown op(s) {bad}: choose from {', '.join(OPS)}")
    if args.reps is None:
        args.reps = 2 if args.preset == "lecture" else 20
    if args.reps < 1 or args.rounds < 1 or args.threads < 1:
        p.error("--reps, --rounds and --threads must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    cfg = common.PRESETS[args.preset]
    if args._worker:
        if args._worker == "tinytensor":
            common.use_accelerators(args.accelerators)
        common.serve(tinytensor_ops(cfg) if args._worker == "tinytensor"
                     else torch_ops(cfg, args.threads))
        return
    extra = ["--preset", args.preset, "--threads", str(args.threads), "--accelerators",
             args.accelerators]
    script = os.path.abspath(__file__)
    workers = [common.Worker(script, kind, extra, args.threads) for kind in ("tinytensor", "torch")]
    rows = {}
    try:
        for op in args.ops:
            times = {wk.kind: [] for wk in workers}
            for r in range(args.rounds):
                for wk in (workers if r % 2 == 0 else workers[::-1]):
                    times[wk.kind].append(wk.ask(cmd="time", name=op, reps=args.reps)["ms"])
            rows[op] = {k: common.median(v) for k, v in times.items()}
            if not args.json:
                print(f"  {op:14s} tinytensor {rows[op]['tinytensor']:8.3f} ms   "
                      f"torch {rows[op]['torch']:8.3f} ms",
                      file=sys.stderr, flush=True)
    finally:
        for wk in workers:
            wk.close()
    res = {"preset": args.preset, "config": cfg, "machine": common.machine(args.threads, args.accelerators),
           "reps": args.reps, "rounds": args.rounds,
           "ops": {op: dict(r, shape=shapes(cfg)[op], ratio=r["tinytensor"] / r["torch"])
                   for op, r in rows.items()}}
    if args.json:
        print(json.dumps(res, indent=1))
        return
    print(f"machine: {res['machine']}")
    print(f"preset {args.preset}: forward + backward per call, median of {args.rounds} rounds of {args.reps}\n")
    print(f"{'op':14s} {'shape':28s} {'tinytensor ms':>14s} {'torch ms':>10s} {'tt/torch':>9s}")
    for op, r in res["ops"].items():
        print(f"{op:14s} {r['shape']:28s} {r['tinytensor']:14.3f} {r['torch']:10.3f} {r['ratio']:8.2f}x")


if __name__ == "__main__":
    main()
