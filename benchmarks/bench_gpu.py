#!/usr/bin/env python
"""Time one training step of the lecture GPT: tinytensor against PyTorch, same GPU, same run.

    python benchmarks/bench_gpu.py                          # the lecture preset on cuda
    python benchmarks/bench_gpu.py --tf32                   # TF32 matmuls in both frameworks
    python benchmarks/bench_gpu.py --device cpu --preset tiny --iters 2   # a smoke test

Three models with the same weights take turns, round after round: tinytensor's GPT
(gpt.model, "gpt" stage), the lecture's PyTorch model (eager, one module per head:
tests/torch_gpt_reference.py), and a PyTorch model that computes all heads at once with
F.scaled_dot_product_attention (flash attention on the GPU) - the reference for what fused
attention buys. A step is forward + loss, zero_grad, backward, AdamW (lr 3e-4, torch's
defaults otherwise), dropout on, on batches of random tokens already on the device.

Before timing: a check that the three models give the same loss with dropout off, and warm-up
steps that compile every CuPy kernel and fill both memory pools. Each timed stretch is
bracketed by a device synchronize. The table shows the median ms/step over rounds and
tinytensor's ratio to each PyTorch model (< 1.0: tinytensor is faster).
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))   # the lecture's PyTorch model lives there

PRESETS = {  # batch_size, block_size, n_embd, n_head, n_layer, dropout
    "lecture": (64, 256, 384, 6, 6, 0.2),
    "small": (32, 64, 128, 4, 4, 0.2),
    "tiny": (4, 16, 32, 2, 2, 0.2),
}
VOCAB = 65   # tiny Shakespeare's characters


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--preset", default="lecture", choices=sorted(PRESETS))
    for name in ("batch_size", "block_size", "n_embd", "n_head", "n_layer"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help="overrides the preset")
    p.add_argument("--dropout", type=float, default=None, help="overrides the preset")
    p.add_argument("--iters", type=int, default=20, help="steps per timed stretch")
    p.add_argument("--rounds", type=int, default=5, help="timed stretches per model, interleaved")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    p.add_argument("--tf32", action="store_true",
                   help="TF32 tensor-core matmuls for float32 (tinytensor.environment.use_tf32, as "
                        "train.py --tf32, and torch's allow_tf32)")
    p.add_argument("--models", default="tinytensor,torch_eager,torch_sdpa",
                   help="comma-separated subset of tinytensor, torch_eager, torch_sdpa")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    preset = dict(zip(("batch_size", "block_size", "n_embd", "n_head", "n_layer", "dropout"),
                      PRESETS[args.preset]))
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.n_embd % args.n_head:
        p.error(f"--n-embd ({args.n_embd}) must be divisible by --n-head ({args.n_head})")
    for k in ("iters", "rounds"):
        if getattr(args, k) < 1:
            p.error(f"--{k} must be at least 1")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(args.models) - {"tinytensor", "torch_eager", "torch_sdpa"})
    if unknown or not args.models:
        p.error(f"--models: unknown {unknown}; choose from tinytensor, torch_eager, torch_sdpa")
    return args


# ---------------------------------------------------------------- PyTorch with fused attention
def build_torch_sdpa(torch, n_embd, n_head, n_layer, block_size, dropout):
    """The lecture's model with all heads in one (3C, C) qkv matrix and
    F.scaled_dot_product_attention; parameter names are gpt.model's, so its state_dict loads."""
    nn, F = torch.nn, torch.nn.functional

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)
            self.proj = nn.Linear(n_embd, n_embd)
            self.dropout = nn.Dropout(dropout)

        def forward(self, x):
            B, T, C = x.shape
            qkv = self.qkv(x).view(B, T, 3, n_head, C // n_head)   # (B, T, 3, nh, hs)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)                    # each (B, nh, T, hs)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=dropout if self.training else 0.0)
            y = y.transpose(1, 2).reshape(B, T, C)                  # (B, T, C): heads side by side
            return self.dropout(self.proj(y))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.sa = Attention()
            self.ffwd = nn.Module()
            self.ffwd.net = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.ReLU(),
                                          nn.Linear(4 * n_embd, n_embd), nn.Dropout(dropout))
            self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)

        def forward(self, x):
            x = x + self.sa(self.ln1(x))
            return x + self.ffwd.net(self.ln2(x))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.token_embedding_table = nn.Embedding(VOCAB, n_embd)
            self.position_embedding_table = nn.Embedding(block_size, n_embd)
            self.blocks = nn.ModuleList([Block() for _ in range(n_layer)])
            self.ln_f = nn.LayerNorm(n_embd)
            self.lm_head = nn.Linear(n_embd, VOCAB)

        def forward(self, idx, targets):
            B, T = idx.shape
            x = self.token_embedding_table(idx) + self.position_embedding_table.weight[:T]
            for block in self.blocks:
                x = block(x)                                        # (B, T, C)
            logits = self.lm_head(self.ln_f(x))                     # (B, T, V)
            return logits, F.cross_entropy(logits.view(B * T, -1), targets.view(B * T))

    return GPT()


# ---------------------------------------------------------------- the three contenders
def build_models(args):
    """{name: (step function, loss function, synchronize)} for the models asked for."""
    import torch

    import tinytensor as tt
    from gpt.interop import lecture_state_dict
    from gpt.model import GPTConfig, build_model
    from tinytensor import backend

    tt.manual_seed(0)
    config = GPTConfig(vocab_size=VOCAB, block_size=args.block_size, n_embd=args.n_embd,
                       n_head=args.n_head, n_layer=args.n_layer, dropout=args.dropout)
    model = build_model("gpt", config)            # initialised on the CPU, then moved
    weights = model.state_dict()                  # {gpt.model name: ndarray}, on the host
    model.to(args.device)
    opt = tt.optim.AdamW(model.parameters(), lr=3e-4)

    rng = np.random.default_rng(0)
    shape = (args.batch_size, args.block_size)
    host_batches = [(rng.integers(0, VOCAB, shape), rng.integers(0, VOCAB, shape))
                    for _ in range(4)]
    tt_batches = [tuple(backend.to_device(a, args.device) for a in b) for b in host_batches]
    tdev = torch.device(args.device)
    torch_batches = [tuple(torch.from_numpy(a).to(tdev) for a in b) for b in host_batches]

    def tt_step(i):
        x, y = tt_batches[i % len(tt_batches)]
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def tt_loss():
        model.eval()
        with tt.no_grad():
            loss = model(*tt_batches[0])[1].item()
        model.train()
        return loss

    models = {"tinytensor": (tt_step, tt_loss, backend.synchronize)}

    def torch_entry(net):
        net = net.to(tdev)
        topt = torch.optim.AdamW(net.parameters(), lr=3e-4)

        def step(i):
            x, y = torch_batches[i % len(torch_batches)]
            _, loss = net(x, y)
            topt.zero_grad(set_to_none=True)
            loss.backward()
            topt.step()

        def loss():
            net.eval()
            with torch.no_grad():
                value = net(*torch_batches[0])[1].item()
            net.train()
            return value

        sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
        return step, loss, sync

    if "torch_eager" in args.models:
        from torch_gpt_reference import GPTLanguageModel
        eager = GPTLanguageModel(VOCAB, args.block_size, args.n_embd, args.n_head, args.n_layer,
                                 args.dropout)
        lecture = lecture_state_dict(model)       # per-head names, as the lecture's model has
        eager.load_state_dict({k: torch.from_numpy(v) for k, v in lecture.items()})
        models["torch_eager"] = torch_entry(eager)
    if "torch_sdpa" in args.models:
        sdpa = build_torch_sdpa(torch, args.n_embd, args.n_head, args.n_layer, args.block_size,
                                args.dropout)
        sdpa.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
        models["torch_sdpa"] = torch_entry(sdpa)
    return {name: models[name] for name in args.models}


def time_models(models, iters, rounds, warmup):
    """{name: [ms per step, one per round]}; models take turns, the order rotating each round."""
    for step, _, sync in models.values():
        for i in range(warmup):
            step(i)
        sync()
    times = {name: [] for name in models}
    names = list(models)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            step, _, sync = models[name]
            sync()
            t0 = time.perf_counter()
            for i in range(iters):
                step(i)
            sync()
            times[name].append((time.perf_counter() - t0) * 1000 / iters)
    return times


def main(argv=None):
    args = parse_args(argv)
    import torch

    import tinytensor
    from tinytensor import backend, environment, kernels
    environment.use_tf32(args.tf32)        # as train.py --tf32: before the first float32 matmul
    tinytensor.malloc.keep_freed_memory()  # as train.py does (--malloc_tuning, its default)
    try:
        backend.check_device(args.device)
    except (ValueError, RuntimeError) as e:
        sys.exit(f"bench_gpu: {e}")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("bench_gpu: this torch has no CUDA: install a CUDA build of torch to compare")
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
        kernels.compile_all()                     # outside every timed region
    print(f"device {args.device}, preset {args.preset}: B={args.batch_size} T={args.block_size} "
          f"C={args.n_embd} nh={args.n_head} layers={args.n_layer} dropout={args.dropout}, "
          f"tf32={'on' if args.tf32 else 'off'}; {args.rounds} rounds x {args.iters} steps, "
          f"{args.warmup} warm-up steps")

    models = build_models(args)
    losses = {name: loss() for name, (_, loss, _) in models.items()}
    print("loss at init, dropout off: " + ", ".join(f"{k} {v:.6f}" for k, v in losses.items()))
    ref = next(iter(losses.values()))
    tol = 1e-2 if args.tf32 else 1e-4
    if any(abs(v - ref) > tol * abs(ref) for v in losses.values()):
        sys.exit(f"bench_gpu: the models disagree at init by more than {tol:g} relative: "
                 f"they do not hold the same weights")

    times = time_models(models, args.iters, args.rounds, args.warmup)
    median = {k: statistics.median(v) for k, v in times.items()}
    print(f"{'model':<14}{'ms/step (median)':>18}{'min':>10}{'max':>10}")
    for k, v in times.items():
        print(f"{k:<14}{median[k]:>18.2f}{min(v):>10.2f}{max(v):>10.2f}")
    ratios = {f"tinytensor/{k}": median["tinytensor"] / median[k]
              for k in median if k != "tinytensor" and "tinytensor" in median}
    for k, v in ratios.items():
        print(f"ratio {k}: {v:.3f}")
    memory = {}
    if args.device == "cuda":
        used, held = backend.memory_pool_bytes()
        memory = {"cupy_pool_used_MiB": used / 2**20, "cupy_pool_held_MiB": held / 2**20,
                  "torch_max_allocated_MiB": torch.cuda.max_memory_allocated() / 2**20}
        print("memory: " + ", ".join(f"{k} {v:.0f}" for k, v in memory.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "json"},
                       "ms_per_step": times, "median_ms": median, "ratios": ratios,
                       "loss_at_init": losses, "memory": memory}, f, indent=1)
    return median


if __name__ == "__main__":
    main()
