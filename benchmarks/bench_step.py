#!/usr/bin/env python
"""Time the GPT training step on the CPU: tinytensor against PyTorch eager, same weights,
same batches, taking turns.

    python benchmarks/bench_step.py --preset small            # about 30 s on 2 cores
    python benchmarks/bench_step.py --preset lecture --iters 3
    python benchmarks/bench_step.py --preset small --json     # one JSON object instead

A step is zero_grad, forward with the loss, backward and AdamW (lr 1e-3, weight decay 0.01
on the 2-D weights only, as train.py), on a batch of random tokens (batch i is the same for
every model). The models, each in a worker process of its own (benchmarks/common.py says
why), with the weights of one initialisation:

    tinytensor     gpt.model's GPTLanguageModel (fused q/k/v, fused attention, flat AdamW;
                   --accelerators: their faster versions, tinytensor/kernels/, auto|on|off;
                   --mkl: the linear layers multiplied by Intel MKL, auto|on|off)
    torch          the lecture's PyTorch model, one Linear per head and per q/k/v
                   (tests/torch_gpt_reference.py), the weights copied by gpt.interop
    torch-fused    the same model written as nanoGPT writes it: one q/k/v Linear, the heads
                   batched, torch's F.scaled_dot_product_attention(is_causal=True)
    torch-compile  torch-fused under torch.compile (default backend, inductor); compiling
                   happens in setup and its time is reported apart ("compile s"), not in ms/step

After --warmup untimed steps each, the models take turns: a turn is --lead untimed steps and
--block timed steps back to back (as in training), after --gap seconds of rest (so the previous
model's BLAS/OpenMP threads have stopped spinning); the order rotates from turn to turn. The
table shows the median ms/step and the fastest step (on a shared machine the best step is the
one least disturbed), the ratio of medians tinytensor / model (< 1: tinytensor is faster),
tokens/s, achieved GFLOP/s and MFU, and each process's peak memory (VmHWM), which includes
the framework itself. FLOPs per step are nanoGPT's count (common.train_flops). MFU is against
the best fp32 GEMM rate measured in the same run by either framework, at the model's own
matmul shapes and at 2048^3 (both rates are printed). "eval loss" is the loss of batch 0 with
dropout off before training: equal across models up to float32 rounding, so all three compute
the same function. "calls/step" counts the calls the interpreter makes in one more step, after
the timed ones and profiled (common.python_calls: Python functions and the C functions they
call): the per-op bookkeeping each framework does in Python around the arithmetic.

Threads: --threads (default: every usable core) for both frameworks, through OMP_NUM_THREADS,
OPENBLAS_NUM_THREADS and MKL_NUM_THREADS in the workers and torch.set_num_threads.
"""
import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402

MODELS = ("tinytensor", "torch", "torch-fused", "torch-compile")
DEFAULT_MODELS = ("tinytensor", "torch", "torch-fused")


def batch(cfg, seed, i):
    """The i-th batch (x, y) of random tokens, int64 (B, T): y is x shifted by one."""
    import numpy as np
    shape = (cfg["batch_size"], cfg["block_size"] + 1)
    d = np.random.default_rng([seed, i]).integers(0, common.VOCAB, shape)
    return np.ascontiguousarray(d[:, :-1]), np.ascontiguousarray(d[:, 1:])


# ----------------------------------------------------------------- workers
def tinytensor_worker(cfg, seed, lr, weights):
    import numpy as np

    import tinytensor as tt
    from gpt.interop import lecture_state_dict
    from gpt.model import GPTConfig, GPTLanguageModel
    from tinytensor.optim import AdamW
    w = {}

    def setup():
        tt.manual_seed(seed)
        model = GPTLanguageModel(GPTConfig(vocab_size=common.VOCAB, **{k: cfg[k] for k in (
            "block_size", "n_embd", "n_head", "n_layer", "dropout")}))
        arrays = {"ours/" + k: v for k, v in model.state_dict().items()}
        arrays.update({"lecture/" + k: v for k, v in lecture_state_dict(model).items()})
        np.savez(weights, **arrays)
        params = list(model.parameters())
        w["opt"] = AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.01},
                          {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=lr)
        model.eval()
        with tt.no_grad():
            _, loss = model(*batch(cfg, seed, 0))
        model.train()
        w["model"] = model
        return {"params": model.num_parameters(), "eval_loss": loss.item(),
                "rss_mb": common.memory_mb()[0]}

    def step(i):
        return common.timed_train_step(w["model"], w["opt"], *batch(cfg, seed, i))

    def steps(start, n):
        return {"steps": [step(i) for i in range(start, start + n)]}

    def calls(i):
        return {"calls": common.python_calls(lambda: step(i))}

    def gemm(shapes):
        from tinytensor.kernels.linear import matmul  # the linear layers' product: NumPy or MKL
        rng = np.random.default_rng(0)
        rates, best = common.gemm_peak(matmul, lambda s: rng.standard_normal(s, dtype=np.float32),
                                       [tuple(s) for s in shapes])
        return {"rates": rates, "best": best, "lib": common.blas_name()}

    return {"setup": setup, "steps": steps, "calls": calls, "gemm": gemm, "memory": common.memory}


def torch_worker(cfg, seed, lr, weights, kind, threads):
    import numpy as np
    import torch
    torch.set_num_threads(threads)
    w = {}

    def setup():
        torch.manual_seed(seed)
        arrays = np.load(weights)
        prefix = "lecture/" if kind == "torch" else "ours/"
        sd = {k[len(prefix):]: torch.from_numpy(arrays[k])
              for k in arrays.files if k.startswith(prefix)}
        if kind != "torch":
            model = fused_torch_model(cfg)
        else:
            from torch_gpt_reference import GPTLanguageModel
            model = GPTLanguageModel(common.VOCAB, cfg["block_size"], cfg["n_embd"], cfg["n_head"],
                                     cfg["n_layer"], cfg["dropout"])
        model.load_state_dict(sd)
        params = list(model.parameters())
        w["opt"] = torch.optim.AdamW(
            [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.01},
             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=lr)
        compile_s = None
        if kind == "torch-compile":
            t0 = time.perf_counter()
            model = torch.compile(model)
            x, y = (torch.from_numpy(a) for a in batch(cfg, seed, 0))
            model(x, y)[1].backward()  # compiles the training graphs (forward and backward)
            for p in params:
                p.grad = None
            with torch.no_grad():     # and the evaluation graph
                model.eval()
                model(x, y)
                model.train()
            compile_s = time.perf_counter() - t0
        model.eval()
        with torch.no_grad():
            _, loss = model(*(torch.from_numpy(a) for a in batch(cfg, seed, 0)))
        model.train()
        w["model"] = model
        return {"params": sum(p.numel() for p in params), "eval_loss": loss.item(),
                "rss_mb": common.memory_mb()[0], "compile_s": compile_s}

    def step(i):
        x, y = (torch.from_numpy(a) for a in batch(cfg, seed, i))
        return common.timed_train_step(w["model"], w["opt"], x, y)

    def steps(start, n):
        return {"steps": [step(i) for i in range(start, start + n)]}

    def calls(i):
        return {"calls": common.python_calls(lambda: step(i))}

    def gemm(shapes):
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            rates, best = common.gemm_peak(torch.mm, lambda s: torch.randn(*s, generator=gen),
                                           [tuple(s) for s in shapes])
        return {"rates": rates, "best": best, "lib": f"torch {torch.__version__}"}

    return {"setup": setup, "steps": steps, "calls": calls, "gemm": gemm, "memory": common.memory}


def fused_torch_model(cfg):
    """The lecture's GPT in PyTorch with tinytensor's parameter names and layout, written as
    nanoGPT writes it: one q/k/v Linear per block, split into the heads, all heads in torch's
    F.scaled_dot_product_attention (its fused kernels where it has them)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Attention(nn.Module):
        def __init__(self, C, nh, T, p):
            super().__init__()
            self.nh = nh
            self.qkv = nn.Linear(C, 3 * C, bias=False)
            self.proj = nn.Linear(C, C)
            self.dropout = nn.Dropout(p)
            self.p = p

        def forward(self, x):
            B, T, C = x.shape
            q, k, v = self.qkv(x).split(C, dim=2)                                 # each (B, T, C)
            q, k, v = (a.view(B, T, self.nh, C // self.nh).transpose(1, 2)        # (B, nh, T, hs)
                       for a in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0,
                                               is_causal=True)                    # (B, nh, T, hs)
            y = y.transpose(1, 2).contiguous().view(B, T, C)                      # (B, T, C)
            return self.dropout(self.proj(y))

    class FeedForward(nn.Module):
        def __init__(self, C, p):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(C, 4 * C), nn.ReLU(), nn.Linear(4 * C, C), nn.Dropout(p))

        def forward(self, x):
            return self.net(x)

    class Block(nn.Module):
        def __init__(self, C, nh, T, p):
            super().__init__()
            self.sa, self.ffwd = Attention(C, nh, T, p), FeedForward(C, p)
            self.ln1, self.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)

        def forward(self, x):
            x = x + self.sa(self.ln1(x))
            return x + self.ffwd(self.ln2(x))

    class GPT(nn.Module):
        def __init__(self, V, T, C, nh, L, p):
            super().__init__()
            self.token_embedding_table = nn.Embedding(V, C)
            self.position_embedding_table = nn.Embedding(T, C)
            self.blocks = nn.Sequential(*[Block(C, nh, T, p) for _ in range(L)])
            self.ln_f, self.lm_head = nn.LayerNorm(C), nn.Linear(C, V)

        def forward(self, idx, targets):
            B, T = idx.shape
            x = self.token_embedding_table(idx) + self.position_embedding_table(torch.arange(T))
            logits = self.lm_head(self.ln_f(self.blocks(x)))                       # (B, T, V)
            return logits, F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T))

    return GPT(common.VOCAB, cfg["block_size"], cfg["n_embd"], cfg["n_head"], cfg["n_layer"],
               cfg["dropout"])


# ----------------------------------------------------------------- the parent
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", choices=sorted(common.PRESETS))
    p.add_argument("--iters", type=int, default=None, help="timed steps per model (default: small 30, lecture 3)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps per model first (default: small 5, lecture 1)")
    p.add_argument("--block", type=int, default=None,
                   help="timed steps per turn, back to back as in training (default: small 5, lecture 1)")
    p.add_argument("--lead", type=int, default=None,
                   help="untimed steps that start each turn (default: small 1, lecture 0)")
    p.add_argument("--threads", type=int, default=common.usable_cores(),
                   help="threads per framework (default: the usable cores, %(default)s here)")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help=f"comma-separated, from {', '.join(MODELS)} (default %(default)s; "
                        f"torch-compile adds about a minute of compiling on a CPU)")
    p.add_argument("--gap", type=float, default=0.3,
                   help="seconds of rest before each step (default %(default)s): BLAS and OpenMP "
                        "threads spin for a while after their work, and would slow the next model")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    common.add_speed_options(p)
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_weights", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad or not models or models[0] != "tinytensor":
        p.error(f"--models must start with tinytensor and name only {', '.join(MODELS)}; "
                f"got {args.models!r}")
    if args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    args.models = models
    long = args.preset == "lecture"
    for name, small, lecture in (("iters", 30, 3), ("warmup", 5, 1), ("block", 5, 1), ("lead", 1, 0)):
        if getattr(args, name) is None:
            setattr(args, name, lecture if long else small)
    if args.iters < 1 or args.block < 1 or args.warmup < 0 or args.lead < 0 or args.gap < 0:
        p.error("--iters and --block must be >= 1; --warmup, --lead and --gap >= 0")
    return args


def run(args):
    cfg = common.PRESETS[args.preset]
    script = os.path.abspath(__file__)
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "weights.npz")
        extra = ["--preset", args.preset, "--seed", str(args.seed), "--lr", str(args.lr),
                 "--threads", str(args.threads), "--_weights", weights,
                 "--accelerators", args.accelerators, "--mkl", args.mkl]
        workers = [common.Worker(script, m, extra, args.threads) for m in args.models]
        try:
            setups = {}
            for wk in workers:  # tinytensor first: it writes the weights the others load
                log(f"setting up {wk.kind} ...")
                setups[wk.kind] = wk.ask(cmd="setup")
            times = {wk.kind: [] for wk in workers}
            losses = {wk.kind: [] for wk in workers}
            for wk in workers:  # warm-up: fills malloc's free lists, BLAS buffers, caches
                got = wk.ask(cmd="steps", start=0, n=args.warmup)["steps"]
                losses[wk.kind] += [a["loss"] for a in got]
            turns = -(-args.iters // args.block)
            step = args.warmup
            for r in range(turns):
                k = r % len(workers)
                n = min(args.block, args.iters - r * args.block)
                for wk in workers[k:] + workers[:k]:  # the order rotates turn by turn
                    time.sleep(args.gap)  # the previous worker's idle threads stop spinning
                    got = wk.ask(cmd="steps", start=step, n=args.lead + n)["steps"]
                    losses[wk.kind] += [a["loss"] for a in got]
                    times[wk.kind] += [a["ms"] for a in got[args.lead:]]
                step += args.lead + n
                log(f"turn {r + 1}/{turns}: " + ", ".join(
                    f"{kind} {common.median(ts[-n:]):.1f} ms" for kind, ts in times.items()))
            memory = {wk.kind: wk.ask(cmd="memory") for wk in workers}
            # one more step each, profiled (untimed, after the timed ones): Python-level calls
            calls = {wk.kind: wk.ask(cmd="calls", i=step)["calls"] for wk in workers}
            shapes = common.gemm_shapes(cfg)
            log("measuring the fp32 GEMM peak ...")
            gemm = {"tinytensor": workers[0].ask(cmd="gemm", shapes=shapes)}
            torch_workers = [wk for wk in workers if wk.kind != "tinytensor"]
            if torch_workers:
                gemm["torch"] = torch_workers[0].ask(cmd="gemm", shapes=shapes)
        finally:
            for wk in workers:
                wk.close()
    return summarize(args, cfg, setups, times, losses, memory, gemm, calls)


def summarize(args, cfg, setups, times, losses, memory, gemm, calls):
    flops = common.train_flops(cfg)
    peak = max(g["best"] for g in gemm.values())
    tokens = cfg["batch_size"] * cfg["block_size"]
    tt_ms = common.median(times["tinytensor"])
    results = {}
    for kind, ts in times.items():
        ms = common.median(ts)
        results[kind] = {
            "ms_per_step": ms, "ms_all": ts, "tinytensor_ratio": tt_ms / ms,
            "tokens_per_s": tokens / (ms / 1e3), "gflops": flops / (ms / 1e3) / 1e9,
            "mfu": flops / (ms / 1e3) / (peak * 1e9),
            "peak_mb": memory[kind]["peak_mb"], "setup_rss_mb": setups[kind]["rss_mb"],
            "eval_loss": setups[kind]["eval_loss"], "params": setups[kind]["params"],
            "compile_s": setups[kind].get("compile_s"), "calls_per_step": calls[kind],
            "losses": losses[kind],
        }
    return {"preset": args.preset, "config": dict(cfg, vocab_size=common.VOCAB),
            "machine": common.machine(args.threads, args.accelerators, args.mkl),
            "threads": args.threads, "accelerators": args.accelerators, "mkl": args.mkl,
            "iters": args.iters, "warmup": args.warmup, "block": args.block, "lead": args.lead,
            "gap_s": args.gap, "flops_per_step": flops,
            "gemm_gflops": {k: {"best": g["best"], "lib": g["lib"], "shapes": g["rates"]}
                            for k, g in gemm.items()},
            "peak_gflops": peak, "results": results}


def print_table(res):
    cfg = res["config"]
    print(f"machine: {res['machine']}")
    print(f"preset {res['preset']}: batch {cfg['batch_size']}, block {cfg['block_size']}, n_embd "
          f"{cfg['n_embd']}, n_head {cfg['n_head']}, n_layer {cfg['n_layer']}, dropout "
          f"{cfg['dropout']}; {res['results']['tinytensor']['params'] / 1e6:.2f}M parameters, "
          f"{res['flops_per_step'] / 1e9:.2f} GFLOP/step; median of {res['iters']} steps "
          f"after {res['warmup']} warm-up")
    rates = ", ".join(f"{k} ({g['lib']}) {g['best']:.0f}" for k, g in res["gemm_gflops"].items())
    print(f"fp32 GEMM peak, GFLOP/s: {rates}; MFU below is against {res['peak_gflops']:.0f}\n")
    print(f"{'model':12s} {'ms/step':>9s} {'best ms':>9s} {'tt/model':>9s} {'tokens/s':>9s} "
          f"{'GFLOP/s':>8s} {'MFU':>5s} {'peak MB':>8s} {'eval loss':>10s} {'calls/step':>11s}")
    for kind, r in res["results"].items():
        print(f"{kind:12s} {r['ms_per_step']:9.1f} {min(r['ms_all']):9.1f} {r['tinytensor_ratio']:8.2f}x "
              f"{r['tokens_per_s']:9,.0f} {r['gflops']:8.1f} {r['mfu']:5.0%} {r['peak_mb']:8.0f} "
              f"{r['eval_loss']:10.5f} {r['calls_per_step']:11,d}")
    names = {"torch": "the lecture's model, eager", "torch-fused": "nanoGPT-style model, eager",
             "torch-compile": "nanoGPT-style model, torch.compile"}
    print()
    for kind, r in res["results"].items():
        if kind in names:
            extra = f" (compiling took {r['compile_s']:.0f} s, not counted)" if r.get("compile_s") else ""
            print(f"ratio tinytensor / torch ({names[kind]}): {r['tinytensor_ratio']:.2f}{extra}")


def worker_main(args):
    cfg = common.PRESETS[args.preset]
    if args._worker == "tinytensor":
        common.use_accelerators(args.accelerators, args.mkl)
        handlers = tinytensor_worker(cfg, args.seed, args.lr, args._weights)
    else:
        handlers = torch_worker(cfg, args.seed, args.lr, args._weights, args._worker,
                                args.threads)
    common.serve(handlers)


def main(argv=None):
    args = parse_args(argv)
    if args._worker:
        return worker_main(args)
    res = run(args)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print_table(res)


if __name__ == "__main__":
    main()
