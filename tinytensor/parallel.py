"""Split a large NumPy computation over rows and run the parts in threads, one core each.

NumPy's element-wise operations and reductions run on one core, and OpenBLAS runs each
small matrix product of a batched matmul on its own, paying to start and join its threads on
every one. A fused op that works on many independent rows (a batch, a set of attention
heads) can instead hand each thread a range of rows and let BLAS run single-threaded inside
each: NumPy releases the GIL in its loops, so the parts run on separate cores.

    parallel.for_ranges(n, fn)       # fn(start, stop) over ranges covering 0 .. n, concurrently
    parallel.rows(n, fn, size, xp)   # the same for large NumPy work, in cache-sized blocks
    parallel.add(a, b)               # a + b, large arrays split over threads

Threads: as many as the BLAS library is set to use (threadpoolctl limits, OMP_NUM_THREADS,
TT_THREADS_PER_RANK under MPI all apply), so this never uses more cores than a matmul would.
While the parts run, BLAS is held to one thread and restored afterwards. Without
threadpoolctl, with one BLAS thread, or for CuPy arrays (the GPU is already parallel), fn(0, n)
simply runs in the calling thread.
"""
import concurrent.futures
import threading

import numpy as np

# rows() splits work over threads from this many elements on: below it, handing work to a
# thread costs more than it saves (at the small GPT preset, arrays of 0.1-0.8 M elements,
# threads made a training step 5-10% slower)
MIN_ELEMENTS = 1 << 20
# row ranges of matrix ops start on multiples of this, so that BLAS's row blocks, and so the
# results, are the same for any number of threads
ROW_BLOCK = 64
# rows() hands a thread blocks of about this many elements per array: several passes over a
# block stay in the CPU's cache (512 KB of float32 of a 1 MB L2)
CACHE_ELEMENTS = 1 << 17

_blas = None          # threadpoolctl controllers of the loaded BLAS libraries, found once
_pool = None          # the worker threads (the calling thread runs the first part itself)
_pool_size = 0
_lock = threading.Lock()
_active = threading.local()  # set while a thread runs a part: nested calls run inline


def _controllers():
    global _blas
    if _blas is None:
        try:
            from threadpoolctl import ThreadpoolController
            _blas = [c for c in ThreadpoolController().lib_controllers if c.user_api == "blas"]
        except Exception:  # threadpoolctl missing or unable to inspect the process
            _blas = []
    return _blas


def threads():
    """How many threads for_ranges would use now: the BLAS library's thread count (1 without
    threadpoolctl)."""
    blas = _controllers()
    return max(1, blas[0].num_threads) if blas else 1


def _get_pool(n):
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size < n:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = concurrent.futures.ThreadPoolExecutor(max_workers=n,
                                                          thread_name_prefix="tt-parallel")
            _pool_size = n
        return _pool


def _run_part(fn, a, b):
    _active.on = True
    try:
        return fn(a, b)
    finally:
        _active.on = False


def for_ranges(n, fn, parts=None, align=1):
    """Call fn(start, stop) for contiguous ranges that cover 0 .. n, in parallel threads.

    parts: how many ranges (default: the BLAS thread count, at most n). Inner boundaries are
    multiples of align (BLAS kernels work on blocks of rows: boundaries on block edges give
    results independent of the number of threads). fn must only write to its own rows; it
    runs with BLAS single-threaded. Exceptions propagate to the caller after every part ends.
    """
    k = min(n // align, parts if parts is not None else threads())
    if k <= 1 or getattr(_active, "on", False):
        fn(0, n)
        return
    bounds = [0] + [(n * i // k) // align * align for i in range(1, k)] + [n]
    blas = _controllers()
    saved = [c.num_threads for c in blas]
    for c in blas:
        c.set_num_threads(1)
    try:
        pool = _get_pool(k - 1)
        futures = [pool.submit(_run_part, fn, a, b) for a, b in zip(bounds[1:-1], bounds[2:])]
        try:
            _run_part(fn, bounds[0], bounds[1])
        finally:
            done = [f.exception() for f in futures]  # wait for all before anyone reads results
        for e in done:
            if e is not None:
                raise e
    finally:
        for c, t in zip(blas, saved):
            c.set_num_threads(t)


def rows(n, fn, size, xp=np, align=1, block=None, min_size=None):
    """fn(a, b) over row ranges covering 0 .. n: through for_ranges when the arrays are NumPy
    arrays (xp is numpy) and the op touches at least min_size (default MIN_ELEMENTS) elements
    (size), else fn(0, n).

    block: for large work, each thread calls fn on ranges of this many rows (a multiple of
    align) one after the other, so that an op's several passes over a range hit the CPU's
    cache instead of memory.
    """
    if not (xp is np and size >= (MIN_ELEMENTS if min_size is None else min_size)):
        fn(0, n)
        return
    if block is not None and block < n:
        def blocked(a, b, fn=fn):
            for c in range(a, b, block):
                fn(c, min(c + block, b))
        for_ranges(n, blocked, align=align)
    else:
        for_ranges(n, fn, align=align)


def add(a, b):
    """a + b; for two large NumPy arrays of one shape and dtype, C-contiguous, computed in
    element ranges over threads (the same result: addition is element by element)."""
    if not (type(a) is np.ndarray and type(b) is np.ndarray and a.shape == b.shape
            and a.dtype == b.dtype and a.size >= MIN_ELEMENTS and threads() > 1
            and a.flags.c_contiguous and b.flags.c_contiguous):
        return a + b
    out = np.empty_like(a)
    fa, fb, fo = a.reshape(-1), b.reshape(-1), out.reshape(-1)
    for_ranges(fa.size, lambda r0, r1: np.add(fa[r0:r1], fb[r0:r1], out=fo[r0:r1]))
    return out


def block_rows(row_elements, align=1):
    """Rows per cache block (see rows()) for rows of row_elements elements: a multiple of align."""
    return max(align, CACHE_ELEMENTS // max(1, row_elements) // align * align)
