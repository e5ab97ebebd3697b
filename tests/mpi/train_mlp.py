"""A small data-parallel training loop on tinytensor, under mpirun or alone (run by
test_distributed.py): the per-step losses must not depend on the number of ranks, and the
parameters must stay bitwise identical across ranks after every step.

    mpirun -n 2 python tests/mpi/train_mlp.py --out losses.json [--steps 12] [--accum]

Every rank draws the same global batch of 16 rows from a seeded stream and takes its own
slice; the model has a layer that is never used (its gradients stay None everywhere).
--accum: two micro-batches per step, their gradients accumulated in AdamW's flat buffer and
averaged over the ranks once, after the second. Rank 0 writes {"world", "losses",
"checked_steps"} to --out.
"""
import argparse
import hashlib
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import tinytensor as tt  # noqa: E402
import tinytensor.nn as nn  # noqa: E402
import tinytensor.nn.functional as F  # noqa: E402
from tinytensor import distributed as dist  # noqa: E402

GLOBAL_BATCH = 16


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(10, 32)
        self.ln = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 5)
        self.unused = nn.Linear(3, 3)  # never called: no gradient on any rank

    def forward(self, x):
        return self.fc2(self.ln(self.fc1(x).tanh()).relu())


def params_hash(model):
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.numpy().tobytes())
    return h.hexdigest()


def grads_hash(model):
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(b"-" if p.grad is None else np.ascontiguousarray(p.grad).tobytes())
    return h.hexdigest()


def all_ranks(value):
    return dist._comm.allgather(value) if dist.world_size() > 1 else [value]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--accum", action="store_true")
    args = ap.parse_args()
    dist.init()
    r, n = dist.rank(), dist.world_size()
    assert GLOBAL_BATCH % n == 0

    data = np.random.default_rng(0)
    X = data.standard_normal((256, 10)).astype(np.float32)
    Y = data.integers(0, 5, 256)
    tt.manual_seed(1 + r)  # different on purpose: broadcast fixes it
    model = MLP()
    dist.broadcast_parameters(model)
    assert len(set(all_ranks(params_hash(model)))) == 1, "ranks start from different weights"
    opt = tt.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.1)

    losses, checked = [], 0
    b = GLOBAL_BATCH // n
    for step in range(args.steps):
        idx = np.random.default_rng([7, step]).integers(0, len(X), GLOBAL_BATCH)
        x, y = X[idx[r * b:(r + 1) * b]], Y[idx[r * b:(r + 1) * b]]  # this rank's slice
        opt.zero_grad()
        if args.accum:
            half = b // 2
            loss_a = F.cross_entropy(model(x[:half]), y[:half]) * 0.5
            loss_a.backward()
            # nothing is exchanged before the allreduce: each rank still has its own gradients
            if n > 1:
                assert len(set(all_ranks(grads_hash(model)))) == n, "gradients exchanged early"
            loss_b = F.cross_entropy(model(x[half:]), y[half:]) * 0.5
            loss_b.backward()
            dist.allreduce_gradients(opt.flat)
            local = loss_a.item() + loss_b.item()
        else:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            dist.allreduce_gradients(opt.flat)
            local = loss.item()
        assert model.unused.weight.grad is None, "an unused parameter got a gradient"
        assert dist.all_true(np.isfinite(local))
        opt.step()
        losses.append(dist.allreduce_mean(local))
        hashes = all_ranks(params_hash(model))
        assert len(set(hashes)) == 1, f"step {step}: parameters differ between ranks"
        checked += 1
    if r == 0:
        with open(args.out, "w") as f:
            json.dump({"world": n, "losses": losses, "checked_steps": checked}, f)
        print(f"OK ranks={n} final loss {losses[-1]:.4f}", flush=True)


if __name__ == "__main__":
    main()
