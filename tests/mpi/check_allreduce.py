"""allreduce_gradients against a NumPy mean, under mpirun -n 1, 2 or 4 (run by test_distributed.py).

    mpirun -n 2 python tests/mpi/check_allreduce.py [--bucket_mb MB]

The parameters (float32 and float64) are kept in two FlatParameters, one per dtype, each
handed to allreduce_gradients. Every rank can regenerate every other rank's gradients from the
seeds, so each rank checks its result against the mean computed with NumPy in float64. Some
gradients are None on some ranks (counted as zeros), one is None on every rank (must stay
None). The gradients are set by hand as separate arrays (copied into the flat buffers). Three
rounds: fresh gradients, gradients accumulated in place into the previous result
(p.grad += ...), and fresh gradients with another None pattern (the buffers are reused;
nothing stale may leak). Exits 0 and prints OK with the number of Allreduce calls of the
first round (counted, and for allreduce_gradients checked against distributed.chunks) on rank
0 only when every check passes on every rank.

--bucket_mb: the pieces' size; without it allreduce_gradients is called with its own default.

--reducer: the same through GradientReducer.finish() instead of allreduce_gradients.
--fake_gpu: the same with "GPU" arrays of the cupy stand-in in fake_gpu.py (3 pretend devices),
which takes the host-staging path (GradientReducer falls back to it); also checks each rank's
device, broadcast_parameters and allreduce_mean on those arrays.
"""
import argparse
import hashlib
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from tinytensor import Tensor, distributed as dist  # noqa: E402
from tinytensor.optim import FlatParameters  # noqa: E402
from tinytensor.reducer import GradientReducer  # noqa: E402

SHAPES = [((3, 4), np.float32), ((5,), np.float32), ((2, 3, 2), np.float64), ((7,), np.float32),
          ((4, 4), np.float32), ((1,), np.float32), ((6, 2), np.float64), ((300,), np.float32)]


def has_grad(i, r, round_):
    """Which parameter has a gradient on rank r in this round."""
    if round_ == 0:
        return i != 3 and not (i == 4 and r == 0) and not (i == 6 and r % 2 == 1)
    return i != 5 and not (i == 1 and r == 1)  # round 3: param 3 now has gradients, 5 has none


def grads_of(r, round_):
    rng = np.random.default_rng([round_, r])
    return [rng.standard_normal(s).astype(t) if has_grad(i, r, round_) else None
            for i, (s, t) in enumerate(SHAPES)]


def extras_of(r):
    rng = np.random.default_rng([1, r])
    return [rng.standard_normal(s).astype(t) for s, t in SHAPES]


def expected_mean(n, round_):
    """The mean over ranks in float64 (None counts as zeros); None where no rank has one."""
    out = []
    for i, (s, _) in enumerate(SHAPES):
        gs = [grads_of(r, round_)[i] for r in range(n)]
        present = [g for g in gs if g is not None]
        out.append(sum(g.astype(np.float64) for g in present) / n if present else None)
    return out


def check(params, want, what):
    for i, (p, w) in enumerate(zip(params, want)):
        if w is None:
            assert p.grad is None, f"{what}: param {i} should have no gradient, got {p.grad}"
            continue
        assert p.grad is not None, f"{what}: param {i} lost its gradient"
        assert p.grad.dtype == p.dtype and p.grad.shape == p.shape, f"{what}: param {i} dtype/shape"
        assert type(p.grad) is type(p.data), f"{what}: param {i}'s gradient moved device"
        tol = 1e-6 if p.dtype == np.float32 else 1e-12
        err = np.max(np.abs(p.grad - w))
        assert err <= tol * (1 + np.max(np.abs(w))), f"{what}: param {i} off by {err}"


def same_on_all_ranks(params, what):
    h = hashlib.sha256()
    for p in params:
        h.update(b"none" if p.grad is None else np.ascontiguousarray(p.grad).tobytes())
    hashes = dist._comm.allgather(h.hexdigest()) if dist.world_size() > 1 else [h.hexdigest()]
    assert len(set(hashes)) == 1, f"{what}: gradients differ between ranks"


class CountingComm:
    """dist._comm, counting its Allreduce calls."""

    def __init__(self, comm):
        self.comm, self.allreduces = comm, 0

    def Allreduce(self, *args, **kwargs):
        self.allreduces += 1
        return self.comm.Allreduce(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.comm, name)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bucket_mb", type=float, default=None)
    ap.add_argument("--fake_gpu", action="store_true")
    ap.add_argument("--reducer", action="store_true", help="reduce with GradientReducer.finish()")
    args = ap.parse_args()
    on_device = lambda a: a  # noqa: E731
    if args.fake_gpu:
        import fake_gpu
        cp = fake_gpu.install(n_devices=3)
        on_device = cp.asarray  # noqa: E731
    dist.init()
    r, n = dist.rank(), dist.world_size()
    params = [Tensor(on_device(np.full(s, r, t)), requires_grad=True) for s, t in SHAPES]
    flats = [FlatParameters([p for p in params if p.dtype == t]) for t in (np.float32, np.float64)]

    reducers = [GradientReducer(f, bucket_mb=args.bucket_mb, overlap=True) for f in flats]
    if args.reducer and n > 1:  # no backward here: finish() itself starts every bucket
        assert all(red.active != args.fake_gpu for red in reducers), "GPU gradients: no overlap"

    # no --bucket_mb: allreduce_gradients' own default (DEFAULT_BUCKET_MB)
    bucket = {} if args.bucket_mb is None else {"bucket_mb": args.bucket_mb}

    def allreduce():
        for flat, reducer in zip(flats, reducers):
            if args.reducer:
                reducer.finish()
            else:
                dist.allreduce_gradients(flat, **bucket)
    if args.fake_gpu:
        assert fake_gpu.FakeCupy.device == dist._local_rank % 3, "wrong GPU for this rank"
        dist.broadcast_parameters(params)
        assert all(p.device.type == "cuda" and np.all(p.data == 0) for p in params), "broadcast"
        assert all(type(f.grad) is fake_gpu.FakeGpuArray for f in flats), "flat buffers on the GPU"
        mean = dist.allreduce_mean(on_device(np.array([r, 1.0])))
        assert isinstance(mean, fake_gpu.FakeGpuArray) and np.allclose(mean, [(n - 1) / 2, 1])

    for p, g in zip(params, grads_of(r, 0)):
        p.grad = None if g is None else on_device(g)
    counter = dist._comm = CountingComm(dist._comm)  # the Allreduce calls of one round
    allreduce()
    calls = counter.allreduces
    want = expected_mean(n, 0)
    check(params, want, "round 1")
    same_on_all_ranks(params, "round 1")

    # round 2: accumulate into the result in place (p.grad is a view of a flat buffer when n > 1)
    for p, e in zip(params, extras_of(r)):
        if p.grad is not None:
            p.grad += e
    allreduce()
    want = [None if w is None else w + sum(extras_of(k)[i].astype(np.float64) for k in range(n)) / n
            for i, w in enumerate(want)]
    check(params, want, "round 2 (accumulated in place)")
    same_on_all_ranks(params, "round 2")

    for p, g in zip(params, grads_of(r, 2)):
        p.grad = None if g is None else on_device(g)
    allreduce()
    check(params, expected_mean(n, 2), "round 3 (another None pattern)")
    same_on_all_ranks(params, "round 3")

    want_calls = sum(len(dist.chunks(f.grad_and_flags.size, f.grad_and_flags.itemsize,
                                     args.bucket_mb or dist.DEFAULT_BUCKET_MB))
                     for f in flats) if n > 1 else 0
    if not args.reducer:  # allreduce_gradients: one Allreduce per piece of each flat buffer
        assert calls == want_calls, f"{calls} Allreduce calls, expected {want_calls}"
    if r == 0:
        print(f"OK ranks={n} calls={calls}{' fake GPU' if args.fake_gpu else ''}", flush=True)


if __name__ == "__main__":
    main()
