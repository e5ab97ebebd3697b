#!/usr/bin/env python
"""A training loop written with the library directly, as a user would write it after README's
"tinytensor in brief": no train.py, no setting, no call that only train.py makes.

    python benchmarks/library_loop.py --preset small --steps 200      # one JSON line

It trains the preset's model on tiny Shakespeare as train.py does (the same model, AdamW with
weight decay on the 2-D weights, the preset's cosine learning rate, seed 1337, and batch i
drawn from np.random.default_rng([1337, 0, i]) as train.py draws it), so its losses are
train.py's, step for step. It prints one JSON line: the milliseconds and the loss of every
step, and the page faults per step after the first 10 (a step that allocates
fresh memory from the kernel pays for each page it touches). bench_loop.py times it against
train.py itself; --malloc off shows what the library's malloc tuning is worth.
"""
import argparse
import json
import os
import resource
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402

sys.path.insert(0, common.ROOT)

import tinytensor as tt  # noqa: E402
from gpt.data import CharDataset, load_text  # noqa: E402
from gpt.model import GPTConfig, GPTLanguageModel  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--preset", default="small", choices=sorted(common.PRESETS))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--data", default=None, help="a UTF-8 text (default: tiny Shakespeare)")
    p.add_argument("--malloc", default="auto", choices=("auto", "off"),
                   help="auto: as the library does (the optimizer keeps freed memory, "
                        "tinytensor.malloc); off: tinytensor.malloc.automatic = False, to see what "
                        "that is worth")
    args = p.parse_args(argv)
    if args.malloc == "off":
        tt.malloc.automatic = False
    cfg = common.PRESETS[args.preset]
    B, T = cfg["batch_size"], cfg["block_size"]

    data = CharDataset(load_text(args.data))
    tt.manual_seed(1337)
    model = GPTLanguageModel(GPTConfig(vocab_size=data.vocab_size, block_size=T,
                                       n_embd=cfg["n_embd"], n_head=cfg["n_head"],
                                       n_layer=cfg["n_layer"], dropout=cfg["dropout"]))
    params = list(model.parameters())
    opt = tt.optim.AdamW([{"params": [w for w in params if w.ndim >= 2], "weight_decay": 0.01},
                          {"params": [w for w in params if w.ndim < 2], "weight_decay": 0.0}],
                         lr=1e-3)
    times, losses, faults = [], [], None
    for step in range(args.steps):
        if step == 10:
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        lr = tt.optim.lr_schedule(step, 1e-3, 1e-4, 0, args.steps)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = data.get_batch("train", B, T, np.random.default_rng([1337, 0, step]))
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        times.append(1000.0 * (time.perf_counter() - t0))
    per_step = None
    if faults is not None:
        per_step = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / (args.steps - 10)
    print(json.dumps({"ms": times, "losses": losses, "faults_per_step": per_step}))


if __name__ == "__main__":
    main()
