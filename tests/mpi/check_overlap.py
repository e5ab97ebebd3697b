"""GradientReducer (gradients summed in buckets during backward) against allreduce_gradients,
under mpirun -n 2 or 3 (run by test_distributed.py).

    mpirun -n 2 python tests/mpi/check_overlap.py [--exact]

1. A GPT (gpt/model.py) built twice from one seed on every rank, each rank's slice of a batch:
   for several steps of AdamW, one copy reduces with allreduce_gradients, the other with a
   GradientReducer of small buckets (many of them, started from the hooks during backward);
   the gradients after each reduction must be equal (--exact: to the last bit, as for 2 ranks;
   else within float32 rounding), so must the parameters after every step, and the reducer's
   parameters must be bitwise identical on every rank.
2. Parameters without a gradient on one rank and on every rank, a gradient set by hand on a
   parameter backward does not reach, accumulation under no_sync(): the same p.grad (None or a
   view of flat.grad) and values as allreduce_gradients.
3. Misuse is a clear error on every rank: a gradient replaced after backward, a second
   backward before finish().
Prints OK on rank 0 when every check passes on every rank.
"""
import argparse
import hashlib
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import tinytensor as tt  # noqa: E402
import tinytensor.nn as nn  # noqa: E402
from tinytensor import distributed as dist  # noqa: E402
from tinytensor.reducer import GradientReducer  # noqa: E402
from gpt.model import GPTConfig, build_model  # noqa: E402

BUCKET_MB = 0.02  # 20 kB: many buckets even for this small GPT


def same(a, b, exact, what):
    if exact:
        assert np.array_equal(a, b), f"{what}: differs by up to {np.max(np.abs(a - b)):.3g}"
    else:
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-8, err_msg=what)


def same_on_all_ranks(arr, what):
    h = hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()
    assert len(set(dist.allgather(h))) == 1, f"{what}: differs between ranks"


def grads_of(flat):
    return [None if p.grad is None else ("view" if p.grad is v else "array", p.grad.copy())
            for p, v in zip(flat.params, flat.grad_views)]


def check_gpt(exact):
    cfg = GPTConfig(vocab_size=65, block_size=16, n_embd=32, n_head=4, n_layer=2, dropout=0.0)
    models, opts = [], []
    for _ in range(2):
        tt.manual_seed(0)
        models.append(build_model("gpt", cfg))
        opts.append(tt.optim.AdamW(models[-1].parameters(), lr=1e-2))
    reducer = GradientReducer(opts[1].flat, bucket_mb=BUCKET_MB, overlap=True)
    assert reducer.active and len(reducer.buckets) >= 5, len(reducer.buckets)
    spans = [opts[1].flat.span(i, j) for i, j in reducer.buckets]
    assert spans[0][1] == opts[1].flat.grad.size and spans[-1][0] == 0 and \
        all(a == b for (a, _), (_, b) in zip(spans, spans[1:])), f"buckets do not tile: {spans}"
    r, n = dist.rank(), dist.world_size()
    rng = np.random.default_rng(1)
    for step in range(3):
        x = rng.integers(0, 65, (6, 16))
        part = slice(r * len(x) // n, (r + 1) * len(x) // n)
        for k, (model, opt) in enumerate(zip(models, opts)):
            _, loss = model(x[part], x[part])
            opt.zero_grad()
            loss.backward()
            if k == 0:
                dist.allreduce_gradients(opt.flat, bucket_mb=BUCKET_MB)
            else:
                started = reducer._next
                reducer.finish()
                assert started >= 1, "no bucket was started during backward"
        same(opts[1].flat.grad, opts[0].flat.grad, exact, f"step {step}: flat.grad")
        assert np.array_equal(opts[1].flat.flags, opts[0].flat.flags), f"step {step}: flags"
        for opt in opts:  # each p.grad is its view of flat.grad
            assert all(p.grad is v for p, v in zip(opt.flat.params, opt.flat.grad_views)), \
                f"step {step}: gradients left the flat buffer"
        for opt in opts:
            opt.step()
        same(opts[1].flat.data, opts[0].flat.data, exact, f"step {step}: parameters")
        same_on_all_ranks(opts[1].flat.data, f"step {step}: the reducer's parameters")
    reducer.close()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 8)    # skipped on rank 0: no gradient there
        self.c = nn.Linear(8, 3)
        self.unused = nn.Linear(2, 2)  # never called: no gradient on any rank

    def forward(self, x, skip):
        h = self.a(x).tanh()
        return self.c(h if skip else self.b(h))


def run_net(use_reducer, accum=False, by_hand=False):
    """Gradients after reduction (allreduce_gradients, or a reducer of tiny buckets)."""
    tt.manual_seed(0)
    net = Net()
    opt = tt.optim.AdamW(net.parameters())
    reducer = GradientReducer(opt.flat, bucket_mb=1e-4, overlap=True) if use_reducer else None
    opt.flat.grad[...] = 7.0  # stale values, as a previous step leaves them after zero_grad()
    r = dist.rank()
    rng = np.random.default_rng([2, r])
    xs = [tt.Tensor(rng.standard_normal((4, 6)).astype(np.float32)) for _ in range(2 if accum else 1)]
    for k, x in enumerate(xs):
        loss = net(x, skip=(r == 0)).sum()
        if reducer is not None and k < len(xs) - 1:
            with reducer.no_sync():
                loss.backward()
        else:
            loss.backward()
    if by_hand:  # a parameter backward does not reach, given a gradient as a separate array
        net.unused.weight.grad = np.full((2, 2), float(r + 1), np.float32)
    if reducer is None:
        dist.allreduce_gradients(opt.flat)
    else:
        reducer.finish()
        reducer.close()
    return grads_of(opt.flat)


def check_missing_gradients():
    for kw in ({}, {"accum": True}, {"by_hand": True}):
        ref, got = run_net(False, **kw), run_net(True, **kw)
        for i, (a, b) in enumerate(zip(ref, got)):
            assert (a is None) == (b is None), f"{kw}: param {i}: {a} vs {b}"
            if a is not None:
                assert a[0] == b[0] == "view", f"{kw}: param {i} {a[0]} {b[0]}"
                assert np.array_equal(a[1], b[1]), f"{kw}: param {i} differs"
        names = [n for n, _ in Net().named_parameters()]
        nones = {names[i] for i, a in enumerate(got) if a is None}
        want = {"unused.bias"} if kw.get("by_hand") else {"unused.weight", "unused.bias"}
        assert nones == want, f"{kw}: no gradient for {nones}"


def expect_error(fn, match):
    try:
        fn()
    except RuntimeError as e:
        assert match in str(e), str(e)
        return
    raise AssertionError(f"no error ({match})")


def check_misuse():
    tt.manual_seed(0)
    net = Net()
    opt = tt.optim.AdamW(net.parameters())
    reducer = GradientReducer(opt.flat, bucket_mb=1e-4, overlap=True)
    x = tt.Tensor(np.ones((4, 6), np.float32))
    net(x, skip=False).sum().backward()
    net.c.bias.grad = np.zeros(3, np.float32)  # replaced after backward computed it
    expect_error(reducer.finish, "was replaced after backward computed it")
    opt.zero_grad()
    net(x, skip=False).sum().backward()
    expect_error(lambda: net(x, skip=False).sum().backward(), "a second backward() before finish()")
    reducer.finish()  # what the first backward started is still summed on every rank
    reducer.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--exact", action="store_true")
    args = ap.parse_args()
    dist.init()
    assert dist.world_size() > 1, "run under mpirun -n 2 or more"
    check_gpt(args.exact)
    check_missing_gradients()
    check_misuse()
    if dist.rank() == 0:
        print(f"OK ranks={dist.world_size()} overlapped reducer", flush=True)


if __name__ == "__main__":
    main()
