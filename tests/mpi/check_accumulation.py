"""train.py's micro-batch loop (Run.forward_backward) sends nothing over MPI before the last
micro-batch, under mpirun -n 2 (run by test_train_mpi.py).

    mpirun -n 2 python tests/mpi/check_accumulation.py [--overlap 0|1]

Every MPI call of the gradient reduction goes through distributed._comm: it is wrapped here in
a proxy that counts the calls of each method. The model's forward records the count when each
micro-batch starts; with K = 4 micro-batches per step, the count must not move during the first
three (forward and backward alike), and after the step the reducer must have sent every bucket.
The gradients must equal those of one plain forward and backward of the rank's rows, averaged
over the ranks (allreduce_gradients). Prints OK on rank 0 when every check passes on every rank.
"""
import argparse
import os
import sys
from collections import Counter

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, ROOT)
import tinytensor as tt  # noqa: E402
from gpt.data import CharDataset  # noqa: E402
from gpt.model import build_model  # noqa: E402
from tinytensor import distributed as dist  # noqa: E402
from tinytensor.reducer import GradientReducer  # noqa: E402
from train.config import make_config  # noqa: E402
from train.train import Run, make_optimizer  # noqa: E402


K = 4


class CountingComm:
    """distributed._comm, counting every call of a method whose name has 'reduce', 'send',
    'bcast' or 'gather' in it."""

    def __init__(self, comm):
        self._comm, self.calls = comm, Counter()

    def __getattr__(self, name):
        attr = getattr(self._comm, name)
        if callable(attr) and any(w in name.lower() for w in ("reduce", "send", "bcast", "gather")):
            def counted(*args, **kwargs):
                self.calls[name] += 1
                return attr(*args, **kwargs)
            return counted
        return attr


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--overlap", type=int, default=1)
    args = ap.parse_args()
    dist.init()
    W = dist.world_size()
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50
    cfg = make_config("small", dict(n_embd=32, n_head=2, n_layer=2, block_size=16, batch_size=8 * W,
                                    dropout=0.0, gradient_accumulation_steps=K,
                                    overlap=bool(args.overlap), bucket_mb=0.01))
    dataset = CharDataset(text)
    tt.manual_seed(0)
    model = build_model("gpt", cfg.model_config(dataset.vocab_size))
    optimizer = make_optimizer(model, cfg)
    reducer = GradientReducer(optimizer.flat, cfg.bucket_mb, cfg.overlap)
    assert reducer.active == bool(args.overlap), reducer.describe()
    run = Run(cfg, dataset, model, optimizer, "cpu", None, None)

    comm = CountingComm(dist._comm)
    dist._comm = comm
    at_forward = []
    forward = model.forward

    def counting_forward(*a, **kw):
        at_forward.append(sum(comm.calls.values()))
        return forward(*a, **kw)
    model.forward = counting_forward
    try:
        for step in range(2):
            at_forward.clear()
            comm.calls.clear()
            run.forward_backward(step, reducer)
            assert len(at_forward) == K, at_forward
            # no call before the last micro-batch's forward, during any earlier forward or backward
            assert at_forward == [0] * K, f"step {step}: MPI calls before each forward {at_forward}"
            sent = sum(v for k, v in comm.calls.items() if "reduce" in k.lower())
            expected = len(reducer.buckets) if reducer.active else 1
            assert sent >= expected, f"step {step}: {dict(comm.calls)}"
            grads = [p.grad.copy() for p in model.parameters()]
            optimizer.step()
    finally:
        dist._comm = comm._comm
        model.forward = forward

    # the accumulated gradient of the last step against one plain pass over the rank's rows
    step = 1
    tt.manual_seed(0)
    plain = build_model("gpt", cfg.model_config(dataset.vocab_size))
    plain_opt = make_optimizer(plain, cfg)
    cfg1 = make_config("small", dict(cfg.to_dict(), gradient_accumulation_steps=1))
    plain_run = Run(cfg1, dataset, plain, plain_opt, "cpu", None, None)
    plain_reducer = GradientReducer(plain_opt.flat, cfg.bucket_mb, False)
    plain_run.forward_backward(0, plain_reducer)
    plain_opt.step()
    plain_run.forward_backward(step, plain_reducer)
    for (name, p), g in zip(plain.named_parameters(), grads):
        np.testing.assert_allclose(g, p.grad, rtol=2e-5, atol=2e-7, err_msg=name)
    if dist.is_main():
        print(f"OK: {W} ranks, K={K}, overlap={bool(args.overlap)}: no MPI call before the last "
              f"micro-batch; {dict(comm.calls)} in the last step")


if __name__ == "__main__":
    main()
