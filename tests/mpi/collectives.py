"""broadcast_parameters, allreduce_mean, all_true, check_consistent and BLAS threads, under
mpirun -n 2 or more (run by test_distributed.py).

    mpirun -n 2 python tests/mpi/collectives.py --threads EXPECTED [--threads_per_rank N]
        [--dist_backend mpi] [--configure]

--threads: the BLAS threads per rank init() must have set ('none': left to the library).
--threads_per_rank, --dist_backend: init()'s arguments; with --configure, init() is called
without them and then configure(threads_per_rank, dist_backend), as train.py does.
Exits 0 and prints OK on rank 0 only when every check passes on every rank.
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


def params_hash(model):
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.numpy().tobytes())
    return h.hexdigest()


def expect_mismatch(config, model, *needles):
    """check_consistent must raise on every rank, with every needle in the message."""
    try:
        dist.check_consistent(config, model)
    except dist.RankMismatchError as e:
        for needle in needles:
            assert needle in str(e), f"{needle!r} not in the message: {e}"
        return str(e)
    raise AssertionError(f"check_consistent did not notice a difference ({needles})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", required=True)
    ap.add_argument("--threads_per_rank", type=int, default=0)
    ap.add_argument("--dist_backend", default="mpi")
    ap.add_argument("--configure", action="store_true")
    args = ap.parse_args()
    if args.configure:
        dist.init()
        dist.configure(args.threads_per_rank, args.dist_backend)
    else:
        dist.init(args.threads_per_rank, args.dist_backend)
    r, n, last = dist.rank(), dist.world_size(), dist.world_size() - 1
    assert n >= 2, "run under mpirun -n 2 or more"
    assert dist.is_main() == (r == 0)
    comm = dist._comm

    # BLAS threads per rank, as the BLAS library itself reports them
    from threadpoolctl import threadpool_info
    blas = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    if args.threads == "none":
        assert dist._threads is None, f"threads were set to {dist._threads}, expected untouched"
    else:
        assert dist._threads == int(args.threads), f"{dist._threads} threads, expected {args.threads}"
        assert blas and all(t == int(args.threads) for t in blas), f"BLAS reports {blas} threads"

    # broadcast_parameters: every rank starts from its own seed, ends with rank 0's values
    tt.manual_seed(1000 + r)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.LayerNorm(7), nn.Linear(7, 3))
    before = comm.allgather(params_hash(model))
    assert len(set(before)) == n, "ranks should start different"
    expect_mismatch({"lr": 0.1}, model, "rank 1 has different parameter values", "0.weight")
    dist.broadcast_parameters(model)
    after = comm.allgather(params_hash(model))
    assert after == [before[0]] * n, "broadcast_parameters did not make every rank equal to rank 0"
    dist.check_consistent({"lr": 0.1, "n": [1, 2]}, model)  # equal: no error

    # check_consistent names the rank that differs, and what differs
    cfg = {"lr": 0.1, "batch_size": 8}
    if r == last:
        cfg["batch_size"] = 16
    expect_mismatch(cfg, model, f"rank {last} has a different config", "batch_size=16",
                    "rank 0: 8")
    if r == last:
        model[3].bias.data[0] += 1e-7  # one tiny change in one parameter
    msg = expect_mismatch({"lr": 0.1}, model, f"rank {last} has different parameter values",
                          "3.bias")
    assert all(f"rank {k} " not in msg for k in range(1, last)), f"names innocent ranks: {msg}"
    dist.broadcast_parameters(list(model.parameters()))  # a list of Tensors works too
    dist.check_consistent({"lr": 0.1}, model)

    # allreduce_mean: floats, float arrays and integer arrays
    got = dist.allreduce_mean(float(r))
    assert isinstance(got, float) and abs(got - (n - 1) / 2) < 1e-12, got
    arr = dist.allreduce_mean(np.array([r, 2 * r, 1], dtype=np.float32))
    assert arr.dtype == np.float32 and np.allclose(arr, [(n - 1) / 2, n - 1, 1]), arr
    ints = dist.allreduce_mean(np.array([r, 1]))
    assert np.allclose(ints, [(n - 1) / 2, 1]), ints

    # all_true: one False anywhere makes it False everywhere
    assert dist.all_true(True) is True
    assert dist.all_true(r != last) is False
    assert dist.all_true(np.isfinite(np.float32("nan")) if r == 0 else True) is False
    dist.barrier()
    if r == 0:
        print(f"OK ranks={n} {dist.describe()}", flush=True)


if __name__ == "__main__":
    main()
