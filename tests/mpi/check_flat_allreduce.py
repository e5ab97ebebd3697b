"""allreduce_gradients on parameters kept in an optim.FlatParameters (as AdamW keeps them), under
mpirun -n 1, 2 or 4 (run by test_fused.py).

    mpirun -n 2 python tests/mpi/check_flat_allreduce.py [--bucket_mb MB]

The flat buffer itself is summed in place: checked against a NumPy mean (None gradients count
as zeros and one parameter has none on any rank), with gradients already in their views of
the buffer (as a reduction leaves them), accumulated in place, and set by hand as separate
arrays (copied in). Then a small model trained with AdamW for a few steps on each rank's half
of a batch must equal the whole batch in one process, and every step, the first included,
must copy backward's gradients (arrays of their own) into the optimizer's flat gradient
buffer, reduce it in place and leave each p.grad its view of it. Prints OK on rank 0 when
every check passes on every rank.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import tinytensor as tt  # noqa: E402
import tinytensor.nn as nn  # noqa: E402
import tinytensor.nn.functional as F  # noqa: E402
from tinytensor import Tensor, distributed as dist  # noqa: E402
from tinytensor.optim import FlatParameters  # noqa: E402

SHAPES = [(3, 4), (5,), (2, 3, 2), (7,), (300,)]


def grads_of(r, round_):
    """Rank r's gradients in this round: param 3 never has one, param 1 only on odd ranks."""
    rng = np.random.default_rng([round_, r])
    return [None if i == 3 or (i == 1 and r % 2 == 0) else rng.standard_normal(s).astype(np.float32)
            for i, s in enumerate(SHAPES)]


def expected(n, round_, extra=0.0):
    out = []
    for i, _ in enumerate(SHAPES):
        gs = [g[i] for g in (grads_of(r, round_) for r in range(n)) if g[i] is not None]
        out.append(sum(g.astype(np.float64) + extra for g in gs) / n if gs else None)
    return out


def check(params, flat, want, what):
    for i, (p, w) in enumerate(zip(params, want)):
        if w is None:
            assert p.grad is None, f"{what}: param {i} should have no gradient"
            continue
        if dist.world_size() > 1:  # one process: allreduce_gradients leaves p.grad alone
            assert p.grad is flat.grad_views[i], f"{what}: param {i}'s gradient left the flat buffer"
        err = np.max(np.abs(p.grad - w))
        assert err <= 1e-6 * (1 + np.max(np.abs(w))), f"{what}: param {i} off by {err}"


def in_place(flat):
    """For each parameter: whether its p.grad is its view of flat.grad."""
    return [p.grad is v for p, v in zip(flat.params, flat.grad_views)]


def train(data, rank, ranks, lr=0.05):
    """A small MLP trained with AdamW on the batches in data; rank `rank` of `ranks` takes its
    share of every batch and the gradients are averaged over the ranks in AdamW's flat buffer,
    built with the optimizer: the same buffer, reduced in place, at every step from the first."""
    tt.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = tt.optim.AdamW(model.parameters(), lr=lr)
    flat = opt.flat
    assert flat is not None and all(p.data is v for p, v in zip(flat.params, flat.data_views))
    for step, (x, y) in enumerate(data):
        part = slice(rank * len(x) // ranks, (rank + 1) * len(x) // ranks)
        opt.zero_grad()
        F.cross_entropy(model(Tensor(x[part])), y[part]).backward()
        # backward makes each p.grad an array of its own (torch's semantics), outside the buffer
        assert not any(in_place(flat)), f"step {step}: backward wrote into the flat buffer"
        if ranks > 1:
            before = np.concatenate([p.grad.ravel() for p in flat.params])  # this rank's own
            dist.allreduce_gradients(opt.flat)
            assert all(in_place(flat)), f"step {step}: the gradients are not in the flat buffer"
            assert not np.array_equal(before, flat.grad), f"step {step}: flat.grad not reduced"
        opt.step()
        assert opt.flat is flat
    return np.concatenate([p.data.ravel() for p in model.parameters()])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bucket_mb", type=float, default=dist.DEFAULT_BUCKET_MB)
    args = ap.parse_args()
    dist.init()
    r, n = dist.rank(), dist.world_size()
    params = [Tensor(np.zeros(s, np.float32), requires_grad=True) for s in SHAPES]
    flat = FlatParameters(params)

    for p, g, view in zip(params, grads_of(r, 0), flat.grad_views):  # in their views already
        if g is None:
            p.grad = None
        else:
            view[...] = g
            p.grad = view
    dist.allreduce_gradients(flat, bucket_mb=args.bucket_mb)
    check(params, flat, expected(n, 0), "round 1")

    for p in params:  # accumulate into the result in place
        if p.grad is not None:
            p.grad += 1.0
    dist.allreduce_gradients(flat, bucket_mb=args.bucket_mb)
    want = [None if w is None else w + 1.0 for w in expected(n, 0)]
    check(params, flat, want, "round 2 (accumulated in place)")

    for p, g in zip(params, grads_of(r, 2)):  # separate arrays, set by hand
        p.grad = g
    dist.allreduce_gradients(flat, bucket_mb=args.bucket_mb)
    check(params, flat, expected(n, 2), "round 3 (arrays set by hand)")

    rng = np.random.default_rng(7)
    data = [(rng.standard_normal((8, 4)).astype(np.float32), rng.integers(0, 3, 8)) for _ in range(4)]
    ours = train(data, r, n)
    everyone = dist._comm.allgather(ours) if n > 1 else [ours]
    assert all(np.array_equal(w, everyone[0]) for w in everyone), "ranks' parameters differ"
    alone = train(data, 0, 1)  # the whole batch in one process
    err = np.max(np.abs(ours - alone))
    assert err <= 1e-5, f"{n} ranks and one process trained different models (off by {err})"
    if r == 0:
        print(f"OK ranks={n} flat allreduce", flush=True)


if __name__ == "__main__":
    main()
