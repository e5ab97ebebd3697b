"""Split large NumPy work over threads, one core each, and set how many threads BLAS uses.

NumPy's element-wise operations and reductions run on one core, and OpenBLAS runs each small
matrix product of a batched matmul on its own, paying to start and join its threads on every
one. An accelerator that works on many independent rows (a batch, attention heads, a stretch
of a flat buffer) can instead hand each thread a range of rows and let BLAS run
single-threaded inside each: NumPy, and the compiled loops (nogil), release the GIL, so the
parts run on separate cores.

    threads.for_ranges(n, fn)        # fn(start, stop) over ranges covering 0 .. n, concurrently
    threads.rows(n, fn, size)        # the same for NumPy work of `size` elements, when large
    threads.column_sums_by_block(...)  # column sums over threads, the same bits for any count
    threads.limit_blas(n)            # BLAS (and so for_ranges) uses n threads from now on

Threads: as many as the BLAS library is set to use, so this never uses more cores than a
matmul would. While the parts run, BLAS is held to one thread and restored afterwards.
Without threadpoolctl, or with one BLAS thread, fn(0, n) simply runs in the calling thread.

BLAS's idle threads: OpenBLAS's worker threads busy-wait for about 0.1 s (2^28 cycles) after
every product before they sleep, so in a training step, where a matmul comes every few
milliseconds, they never sleep, and a thread of ours shares its core with a spinning one: our
parts then gain nothing (measured on a 2-core AMD EPYC: AdamW over 2 threads 3.34 ms in the
step against 2.13 ms with BLAS's threads asleep). So the first for_ranges that splits work
asks OpenBLAS to let its threads sleep at once after their work (quiet_blas(): its
OPENBLAS_THREAD_TIMEOUT setting, read again at run time, unless the environment sets it).
Waking them costs each threaded product a little; the step gains (small preset 0.94x, lecture
0.88x, in-process A/B). A program that never runs tinytensor's threads keeps BLAS as it was.
"""
import concurrent.futures
import os
import threading

import numpy as np

from .. import environment

# rows() splits work over threads from this many elements on: below it, handing work to a
# thread costs more than it saves
MIN_ELEMENTS = 1 << 20
# rows() hands a thread blocks of about this many elements per array, so that several passes
# over a block stay in the CPU's cache
CACHE_ELEMENTS = 1 << 17
# column_sums_by_block sums this many rows per partial sum
SUM_BLOCK = 1024

_blas = None          # threadpoolctl controllers of the loaded BLAS libraries, found once
_pool = None          # the worker threads (the calling thread runs the first part itself)
_pool_size = 0
_lock = threading.Lock()
_active = threading.local()  # set while a thread runs a part: nested calls run inline
# OpenBLAS's thread timeout that quiet_blas() sets: its threads busy-wait 2^4 cycles (its
# smallest setting) after their work, then sleep
BLAS_THREAD_TIMEOUT = 4
_quiet = None         # quiet_blas() has run: whether it changed OpenBLAS


def _controllers():
    global _blas
    if _blas is None:
        try:
            from threadpoolctl import ThreadpoolController
            _blas = [c for c in ThreadpoolController().lib_controllers if c.user_api == "blas"]
        except Exception:  # threadpoolctl missing or unable to inspect the process
            _blas = []
    return _blas


def forget_blas():
    """Look for the loaded BLAS libraries again at the next call (kernels/mkl.py loads one)."""
    global _blas
    _blas = None


def count():
    """How many threads for_ranges uses now: the BLAS library's thread count (1 without
    threadpoolctl)."""
    blas = _controllers()
    return max(1, blas[0].num_threads) if blas else 1


def usable_cores():
    """The CPU cores this process may run on."""
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)


def limit_blas(n):
    """Let BLAS (and so for_ranges) use n threads from now on. Returns False when
    threadpoolctl is missing (nothing changed)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return False
    threadpool_limits(limits=n, user_api="blas")
    return True


def quiet_blas():
    """Let OpenBLAS's idle threads sleep as soon as their work ends (see the top of this
    module), once; returns whether OpenBLAS's setting was changed (False where BLAS is not a
    threaded OpenBLAS with the run-time entry points, where threadpoolctl is missing, or where
    the environment sets OPENBLAS_THREAD_TIMEOUT itself). Its thread pool is shut down, to be
    started again with the new setting by the next threaded product: call it only while no
    other thread runs BLAS (for_ranges calls it before it starts its parts)."""
    global _quiet
    if _quiet is not None:
        return _quiet
    _quiet = False
    if environment.blas_thread_timeout_given():
        return _quiet
    for c in _controllers():
        lib = getattr(c, "dynlib", None)
        read_env = getattr(lib, "openblas_read_env", None) if c.internal_api == "openblas" else None
        shutdown = getattr(lib, "blas_thread_shutdown_", None) if read_env else None
        if shutdown is None:
            continue
        # OpenBLAS reads its settings again, the timeout with this value; the environment stays
        environment.with_blas_thread_timeout(BLAS_THREAD_TIMEOUT, read_env)
        shutdown()       # its threads restart, with the new timeout, at the next product
        _quiet = True
    return _quiet


def _get_pool(n):
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size < n:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = concurrent.futures.ThreadPoolExecutor(max_workers=n,
                                                          thread_name_prefix="tt-threads")
            _pool_size = n
        return _pool


def in_part():
    """Whether the calling thread runs a part of for_ranges now."""
    return getattr(_active, "on", False)


def _run_part(fn, a, b):
    _active.on = True
    try:
        return fn(a, b)
    finally:
        _active.on = False


def for_ranges(n, fn, parts=None, align=1):
    """Call fn(start, stop) for contiguous ranges that cover 0 .. n, in parallel threads.

    parts: how many ranges (default: count(), at most n). Inner boundaries are multiples of
    align (BLAS kernels and the compiled loops work on blocks of rows: boundaries on block
    edges give results independent of the number of threads). fn must only write to its own
    rows; it runs with BLAS single-threaded. Exceptions propagate to the caller after every
    part ends.
    """
    k = min(n // align, parts if parts is not None else count())
    if k <= 1 or in_part():
        fn(0, n)
        return
    bounds = [0] + [(n * i // k) // align * align for i in range(1, k)] + [n]
    quiet_blas()  # once: BLAS's idle threads must not spin on the cores the parts need
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


def rows(n, fn, size, align=1, block=None, min_size=MIN_ELEMENTS):
    """fn(a, b) over row ranges covering 0 .. n: through for_ranges when the work touches at
    least min_size elements (size), else fn(0, n) in this thread.

    block: each thread calls fn on ranges of this many rows (a multiple of align) one after
    the other, so that an op's several passes over a range hit the CPU's cache, not memory.
    """
    if size < min_size:
        fn(0, n)
    elif block is not None and block < n:
        def blocked(a, b):
            for c in range(a, b, block):
                fn(c, min(c + block, b))
        for_ranges(n, blocked, align=align)
    else:
        for_ranges(n, fn, align=align)


def block_rows(row_elements, align=1):
    """Rows per cache block (see rows()) for rows of row_elements elements: a multiple of align."""
    return max(align, CACHE_ELEMENTS // max(1, row_elements) // align * align)


def column_sums_by_block(shape, count, kernel):
    """Column sums of an (N, D) problem whose bits do not depend on the number of threads:
    kernel(s, e, part) adds `count` column sums of rows s..e-1 into its float64 part (count, D),
    for blocks of SUM_BLOCK rows (large problems over threads, ranges starting on block edges);
    returns the blocks' parts added in order, (count, D)."""
    n, d = shape
    parts = np.zeros((max(1, -(-n // SUM_BLOCK)), count, d))

    def run(r0, r1):
        for s in range(r0, r1, SUM_BLOCK):
            kernel(s, min(s + SUM_BLOCK, r1), parts[s // SUM_BLOCK])

    rows(n, run, n * d, align=SUM_BLOCK)
    return parts[0] if len(parts) == 1 else parts.sum(axis=0)
