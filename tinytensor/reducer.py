"""GradientReducer: distributed.allreduce_gradients overlapped with backward, as PyTorch's DDP.

    reducer = GradientReducer(optimizer.flat, overlap=True)   # once, after broadcast_parameters
    loss.backward()      # each bucket of gradients is summed over the ranks once it is ready
    reducer.finish()     # the rest; then the state allreduce_gradients(optimizer.flat) leaves
"""
import contextlib
import functools
import queue
import threading

import numpy as np

from . import backend
from . import distributed as dist

# GradientReducer's default bucket size with overlap: small buckets, so that summing starts early
OVERLAP_BUCKET_MB = 1


class GradientReducer:
    """allreduce_gradients overlapped with backward, as PyTorch's DDP does it: the gradients are
    summed over the ranks in buckets while backward is still computing the earlier layers'.

    The parameters of `flat` are grouped, from the last one back (backward finishes the last
    layer first), into buckets of about bucket_mb MB (default 1 MB), each a
    contiguous stretch of flat.grad. A post-accumulate-grad hook on every parameter counts the
    gradients that are final; when a bucket has them all, it is divided by the number of ranks
    and summed over the ranks in place. Buckets start in the same order on every rank (a ready
    bucket waits for the ones before it), since MPI matches collectives by order. finish(), after
    backward, starts the buckets still waiting (a parameter without a gradient counts as zeros),
    waits for all and sums the "has a gradient" flags: as with allreduce_gradients, each p.grad
    is then its view of flat.grad, or None when no rank had one. A gradient set by hand before
    backward, or between backward and finish() on a parameter backward did not reach, is copied
    in; one replaced after backward computed it (its bucket may be on the wire) is an error.

    Why small buckets: DDP's 25 MB would put the small preset's 3.3 MB of gradients in one
    bucket, which can start only when backward has ended. 1 MB gives a few buckets per model
    (4 for the small preset, about one per transformer block; 19 for the lecture preset) at a cost
    of one message latency each (microseconds).

    How the sums progress while NumPy computes: MPICH moves a nonblocking MPI_Iallreduce along
    only inside MPI calls, so polling it from the hooks would progress it only between
    backward's operations. Instead one background thread per reducer takes the ready buckets
    from a queue and runs a blocking Allreduce for each (mpi4py asks for MPI_THREAD_MULTIPLE;
    NumPy and mpi4py release the GIL, so the thread's sums run beside backward's kernels). Only
    that thread calls MPI until finish() has waited for it, which finish() does before it
    returns, so the rest of the training loop (the loss and stop-flag allreduce) never meets it.

    Accumulating micro-batches: run the backward of every micro-batch but the last under
    `with reducer.no_sync():` (as DDP), or a gradient would be summed before it is complete.

    No overlap (finish() simply calls allreduce_gradients, and no hooks are registered): with
    overlap=False, for gradients on a GPU (host staging or NCCL), and when MPI does not allow
    calls from a second thread. In one process nothing happens.
    """

    def __init__(self, flat, bucket_mb=None, overlap=True):
        dist.check_flat(flat, "GradientReducer")
        if overlap not in (True, False):
            raise ValueError(f"GradientReducer: overlap must be True or False, got {overlap!r}")
        self.flat, self.overlap = flat, bool(overlap)
        if bucket_mb is None:
            bucket_mb = OVERLAP_BUCKET_MB if self.overlap else dist.DEFAULT_BUCKET_MB
        dist.chunks(1, 1, bucket_mb)  # a bad size is an error now, not at the first step
        self.bucket_mb = bucket_mb
        self.active = (self.overlap and dist.world_size() > 1 and not backend.is_cuda(flat.grad)
                       and dist.MPI.Query_thread() >= dist.MPI.THREAD_SERIALIZED)
        self._handles = []
        self._sync = True  # False inside no_sync()
        if not self.active:
            return
        limit = max(1, int(self.bucket_mb * 1e6) // flat.grad.itemsize)
        self.buckets, j = [], len(flat)  # [(i, j)]: parameters i .. j-1, the last ones first
        for i in reversed(range(len(flat))):
            if flat.offsets[j] - flat.offsets[i] >= limit or i == 0:
                self.buckets.append((i, j))
                j = i
        self._bucket_of = [k for k, (i, j) in enumerate(self.buckets) for _ in range(i, j)][::-1]
        self._reset()
        self._queue, self._error = queue.Queue(), None
        self._thread = threading.Thread(target=self._work, name="GradientReducer", daemon=True)
        self._thread.start()
        for i, p in enumerate(flat.params):
            self._handles.append(p.register_post_accumulate_grad_hook(
                functools.partial(self._grad_ready, i)))

    def describe(self):
        """One line for the log: how the gradients are summed."""
        if self.active:
            return (f"summed over the ranks during backward, in {len(self.buckets)} buckets of "
                    f"about {self.bucket_mb:g} MB")
        why = ("overlap off" if not self.overlap else "one process" if dist.world_size() == 1 else
               "gradients on a GPU" if backend.is_cuda(self.flat.grad) else
               "MPI allows no second thread")
        return f"summed over the ranks after backward, in pieces of {self.bucket_mb:g} MB ({why})"

    def _reset(self):
        self._ready = [False] * len(self.flat)       # parameter i's gradient is final
        self._missing = [j - i for i, j in self.buckets]  # gradients each bucket still waits for
        self._next = 0                               # the next bucket to start

    def _grad_ready(self, i, p):
        """The hook of parameter i: its gradient is final (the engine calls it in backward)."""
        if not self._sync:
            return
        if self._ready[i]:
            raise RuntimeError("GradientReducer: a second backward() before finish(); when "
                               "accumulating micro-batches, run all but the last under "
                               "`with reducer.no_sync():`")
        view = self.flat.grad_views[i]
        if p.grad is not view:  # set by hand before backward, then accumulated: copy it in
            view[...] = p.grad
            p.grad = view
        self._ready[i] = True
        self._missing[self._bucket_of[i]] -= 1
        while self._next < len(self.buckets) and not self._missing[self._next]:
            self._start_next()

    def _start_next(self):
        self._queue.put(self.flat.span(*self.buckets[self._next]))
        self._next += 1

    def _work(self):
        """The communication thread: divide and sum each bucket it is given, in order."""
        n = dist.world_size()
        while True:
            span = self._queue.get()
            try:
                if span is None:
                    return
                if self._error is None:  # after a failure: only drain the queue
                    part = self.flat.grad[span[0]:span[1]]
                    np.divide(part, n, out=part)  # the sum over ranks is then the mean
                    dist._comm.Allreduce(dist.MPI.IN_PLACE, part)
            except BaseException as e:  # raised again by finish(), in the training loop
                self._error = e
            finally:
                self._queue.task_done()

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside only accumulate gradients (no summing), as DDP's no_sync()."""
        before, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = before

    def finish(self):
        """Start the buckets still waiting, wait until every bucket is summed, and leave the
        state allreduce_gradients would: each p.grad the mean over ranks in its view of
        flat.grad, or None when no rank had a gradient."""
        if not self.active:
            dist.allreduce_gradients(self.flat, self.bucket_mb)
            return
        flat = self.flat
        if not flat.intact():
            raise RuntimeError("GradientReducer: the parameters' data was replaced (Module.to, "
                               "astype) after the reducer was built; build a new one from "
                               "optimizer.flat")
        with dist._waiting("the gradient allreduce"):  # timed by the watchdog from here
            self._finish(flat)

    def _finish(self, flat):
        try:
            present = np.ones(len(flat), dtype=flat.flags.dtype)
            for i, (p, view) in enumerate(zip(flat.params, flat.grad_views)):
                if self._ready[i]:
                    if p.grad is not view:
                        raise RuntimeError(f"GradientReducer: the gradient of parameter {i} "
                                           f"{p.shape} was replaced after backward computed it, "
                                           f"while it was being summed; set gradients by hand "
                                           f"before backward (or use allreduce_gradients)")
                elif p.grad is None:  # counts as zeros
                    view[...] = 0
                    present[i] = 0
                elif p.grad.shape != p.shape:
                    raise ValueError(f"gradient of shape {p.grad.shape} for a parameter of "
                                     f"shape {p.shape}")
                elif p.grad is not view:  # e.g. set by hand: copy it in
                    view[...] = p.grad
            flat.flags[...] = present
            while self._next < len(self.buckets):
                self._start_next()
        finally:  # never leave the thread in MPI when returning (nor raising)
            self._queue.join()
            self._reset()
        if self._error is not None:
            raise self._error
        dist._comm.Allreduce(dist.MPI.IN_PLACE, flat.flags)
        for p, view, ok in zip(flat.params, flat.grad_views, flat.flags > 0):
            p.grad = view if ok else None

    def close(self):
        """Remove the hooks and end the communication thread."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.active:
            self.active = False
            self._queue.put(None)
