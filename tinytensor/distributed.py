"""Data-parallel training over MPI (mpi4py), imported only when used.

Run `mpirun -n 4 python train.py`: every rank holds a full copy of the model, draws the same
global batch and takes its own slice of it; after backward the gradients are averaged over the
ranks, so every rank takes the same optimizer step and the parameters stay identical.

    from tinytensor import distributed as dist
    dist.init()                             # first thing: MPI, fail-fast hooks, BLAS threads
    dist.broadcast_parameters(model)        # every rank starts from rank 0's weights
    dist.check_consistent(config, params)   # same config and weights everywhere, or a clear error
    optimizer = AdamW(model.parameters())   # keeps parameters and gradients in optimizer.flat
    reducer = dist.GradientReducer(optimizer.flat)  # sums gradient buckets during backward
    for step ...:
        loss.backward()                     # writes the gradients into optimizer.flat.grad
        reducer.finish()                    # p.grad = mean over ranks, in place
        optimizer.step()

(`dist.allreduce_gradients(optimizer.flat)` after backward does the same without overlap.)

Without mpirun nothing here touches MPI (mpi4py is not even imported): world_size() is 1 and
every collective is the identity, so a training script calls these unconditionally.

Fail-fast: after init() an uncaught exception on any rank prints its traceback and the line
"rank R: ErrorType: message" once, from that rank, and calls MPI Abort, which ends every rank
with a non-zero exit. A rank killed by a signal is noticed by mpirun (MPICH's hydra kills the
other ranks at once). Call init() before anything that can fail on one rank only, and end a
single rank with abort(message), never sys.exit(): MPI cannot tell that exit from a clean one,
and the other ranks would wait for it in their next collective.

Environment variables:
  TT_THREADS_PER_RANK  BLAS threads per rank (default: cores on the node // ranks on the node;
                       OMP_NUM_THREADS, OPENBLAS_NUM_THREADS or MKL_NUM_THREADS, when set, are
                       left to the BLAS library)
  TT_DIST_BACKEND      'mpi' (default) or 'nccl': how CuPy gradients are summed; 'mpi' copies them
                       through host memory (the MPI wheels on PyPI are not CUDA-aware)
  TT_BUCKET_MB         the gradients are summed in pieces of this many MB, one MPI Allreduce
                       each (default 1 for GradientReducer, 25 for allreduce_gradients and when
                       TT_OVERLAP=0, as PyTorch DDP's buckets)
  TT_OVERLAP           1 (default): GradientReducer sums buckets during backward; 0: after it
"""
import contextlib
import functools
import hashlib
import json
import os
import queue
import sys
import threading
import time
import traceback

import numpy as np

from . import backend
from .flat import FlatParameters

MPI = None            # the mpi4py.MPI module, once init() has imported it
_comm = None          # MPI.COMM_WORLD while running under MPI, else None
_local_rank = 0       # rank among the ranks on this node
_local_size = 1       # number of ranks on this node
_threads = None       # BLAS threads per rank that init() chose (None: left to the library)
_nccl_comm = None     # a cupy NcclCommunicator when TT_DIST_BACKEND=nccl
_aborting = False     # the excepthook runs once, even when threads fail together

DEFAULT_BUCKET_MB = 25         # allreduce_gradients: pieces as large as PyTorch DDP's buckets
DEFAULT_OVERLAP_BUCKET_MB = 1  # GradientReducer: small buckets, so that summing starts early


class DistributedError(RuntimeError):
    """An error that every rank raises alike (a bad setting, ranks that disagree): when it is
    not caught, rank 0 alone prints it."""


class RankMismatchError(DistributedError):
    """Ranks disagree on the config or the parameters (raised on every rank)."""


class SettingError(DistributedError):
    """A bad environment setting of this rank (TT_THREADS_PER_RANK, TT_DIST_BACKEND, ...): other
    ranks may not share it, so the rank that sees it reports it (see abort)."""


# ----- start-up ------------------------------------------------------------------------------

def launched_under_mpi():
    """True when this process was started by mpirun/mpiexec (checked from the environment,
    without importing mpi4py)."""
    keys = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")
    return any(k in os.environ for k in keys)


def init(force=False):
    """Start MPI when launched under mpirun (or when force=True); a no-op in a single process.

    Under MPI this also installs the fail-fast exception hooks, sets the BLAS threads per rank,
    and on a GPU machine makes local rank r use GPU r % n_gpus. Calling it again does nothing.
    """
    global MPI, _comm, _local_rank, _local_size, _threads, _nccl_comm
    if _comm is not None or not (force or launched_under_mpi()):
        return
    try:
        from mpi4py import MPI as _MPI
    except ImportError:
        raise ImportError("this process was started by mpirun but mpi4py is not installed: "
                          "pip install -e \".[mpi]\" (or see the README for a cluster's own MPI)") \
            from None
    MPI = _MPI
    _comm = MPI.COMM_WORLD
    _install_fail_fast()
    node = _comm.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks sharing this node's memory
    _local_rank, _local_size = node.Get_rank(), node.Get_size()
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        list(range(os.cpu_count() or 1))
    bound = len(set(map(tuple, node.allgather(cores)))) > 1  # the launcher gave each rank its own
    node.Free()
    _threads = _set_blas_threads(len(cores) if bound else max(1, len(cores) // _local_size))
    if backend.cuda_available():
        backend.use_device(_local_rank % backend.device_count())
    choice = os.environ.get("TT_DIST_BACKEND", "mpi").strip().lower()
    if choice not in ("mpi", "nccl"):
        raise SettingError(f"TT_DIST_BACKEND={choice!r}: expected 'mpi' or 'nccl'")
    if choice == "nccl" and world_size() > 1:
        _nccl_comm = _make_nccl_comm()


def rank():
    """This process's rank, 0 .. world_size() - 1 (0 without MPI)."""
    _ensure_init()
    return _comm.Get_rank() if _comm is not None else 0


def world_size():
    """The number of ranks (1 without MPI)."""
    _ensure_init()
    return _comm.Get_size() if _comm is not None else 1


def local_size():
    """The number of ranks on this node (they share its memory)."""
    _ensure_init()
    return _local_size


def is_main():
    """True on rank 0, the rank that prints, logs and writes checkpoints."""
    return rank() == 0


def describe():
    """One line for the log: ranks, ranks on this node and BLAS threads per rank."""
    threads = "left to the BLAS library" if _threads is None else str(_threads)
    return (f"{world_size()} rank(s), {_local_size} on this node, "
            f"BLAS threads per rank: {threads}")


def _ensure_init():
    if _comm is None and launched_under_mpi():
        init()


def _set_blas_threads(default):
    """Limit the BLAS threads of this rank to TT_THREADS_PER_RANK, else to `default` (cores on the
    node // ranks on the node, or the cores the launcher bound this rank to).

    Returns the number set, or None when OMP/OPENBLAS/MKL_NUM_THREADS leave it to the library.
    """
    wanted = os.environ.get("TT_THREADS_PER_RANK", "").strip()
    if wanted:
        if not wanted.isdigit() or int(wanted) < 1:
            raise SettingError(f"TT_THREADS_PER_RANK={wanted!r}: expected a positive integer")
        n = int(wanted)
    elif any(os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                            "MKL_NUM_THREADS")):
        return None
    else:
        n = default
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        if rank() == 0:
            print(f"warning: threadpoolctl is not installed, so each rank may start one BLAS "
                  f"thread per core: pip install threadpoolctl, or set OMP_NUM_THREADS={n}",
                  file=sys.stderr, flush=True)
        return None
    threadpool_limits(limits=n, user_api="blas")
    return n


def _make_nccl_comm():
    """An NCCL communicator over all ranks (one GPU per rank); the unique id travels over MPI."""
    if not backend.cuda_available():
        raise RuntimeError("TT_DIST_BACKEND=nccl needs CuPy and a GPU on every rank; "
                           "unset it to use MPI")
    nccl = backend.nccl()
    uid = nccl.get_unique_id() if rank() == 0 else None
    uid = _comm.bcast(uid, root=0)
    return nccl.NcclCommunicator(world_size(), uid, rank())


# ----- fail-fast -----------------------------------------------------------------------------

def _install_fail_fast():
    """Route uncaught exceptions (main thread and other threads) to _fail, which aborts all ranks."""
    sys.excepthook = _fail

    def thread_hook(args):
        if args.exc_type is not SystemExit:  # SystemExit just ends a thread, as by default
            _fail(args.exc_type, args.exc_value, args.exc_traceback)
    threading.excepthook = thread_hook


def _fail(exc_type, exc, tb):
    """Print the error once and end every rank through MPI Abort."""
    global _aborting
    if _aborting:  # a second failure (another thread) while aborting: stay quiet
        return
    _aborting = True
    r = _comm.Get_rank()
    same_everywhere = (issubclass(exc_type, (DistributedError, KeyboardInterrupt))
                       and not issubclass(exc_type, SettingError))
    if issubclass(exc_type, SettingError):  # a bad setting, maybe of this rank only: no bug
        _say(f"rank {r}: error: {exc}")
    elif not same_everywhere:
        _say("".join(traceback.format_exception(exc_type, exc, tb))
             + f"rank {r}: {exc_type.__name__}: {exc}")
    elif r == 0:  # raised on every rank: rank 0 alone says it
        _say(f"error: {exc}" if str(exc) else f"error: {exc_type.__name__}")
    else:
        time.sleep(10)  # give rank 0 time to print; its Abort ends this rank first
    _end_all(1)


def abort(message, code=1):
    """Print `message` once (from this rank) and end every rank with exit status `code`.

    Use it instead of sys.exit() for an error that only this rank sees: under mpirun a rank that
    exits on its own leaves the others waiting in their next collective.
    """
    if _comm is None:
        print(message, file=sys.stderr, flush=True)
        sys.exit(code)
    _say(f"rank {_comm.Get_rank()}: {message}")
    _end_all(code)


# seconds between the last words of a failing rank and MPI Abort: mpirun forwards a rank's
# output through a pipe it reads in its own time, and once Abort reaches it, what it has not
# read yet is lost (on a busy machine, the last lines of the error)
ABORT_DRAIN_S = 1.0


def _say(text):
    """text and a newline to stderr in one write, flushed."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _end_all(code):
    """MPI Abort, which ends every rank, once mpirun has had time to forward what this rank
    printed. MPICH's Abort can return before mpirun has killed this process, so leave at once
    either way (never run on into the next collective)."""
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(ABORT_DRAIN_S)
    if not MPI.Is_finalized():
        _comm.Abort(code)
    os._exit(code)


# ----- collectives ---------------------------------------------------------------------------

def barrier():
    """Wait until every rank gets here."""
    if world_size() > 1:
        _comm.Barrier()


def _param_list(params):
    """A Module's parameters, or a list of Tensors as given."""
    return list(params.parameters()) if hasattr(params, "parameters") else list(params)


def allgather(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank (small picklable objects); [obj] alone."""
    if world_size() == 1:
        return [obj]
    return _comm.allgather(obj)


def check_same(values):
    """Raise RankMismatchError (on every rank) naming each rank and field whose value differs
    from rank 0's. values: {field: small JSON-able value}, e.g. the config, the data's size and
    sha256, settings such as TT_BUCKET_MB. Call it before the first broadcast: ranks that
    disagree there fail inside MPI with a message that names neither."""
    everyone = allgather(values)
    problems = [f"rank {r} has " + ", ".join(diff[:5])
                for r, diff in enumerate((_field_diffs(everyone[0], theirs) for theirs in everyone[1:]),
                                         start=1) if diff]
    if problems:
        raise RankMismatchError("; ".join(problems) + "; every rank must run the same command "
                                "on the same data with the same environment")


def _field_diffs(ours, theirs):
    """'key=theirs (rank 0: ours)' for each key whose value differs between two dicts."""
    keys = sorted(set(ours) | set(theirs), key=str)
    return [f"{k}={theirs.get(k, '<missing>')!r} (rank 0: {ours.get(k, '<missing>')!r})"
            for k in keys if theirs.get(k, "<missing>") != ours.get(k, "<missing>")]


def broadcast_parameters(model, root=0):
    """Copy rank root's parameter values into every rank's parameters (in place)."""
    if world_size() == 1:
        return
    for p in _param_list(model):
        host = np.ascontiguousarray(backend.to_numpy(p.data))  # the array itself on the CPU
        _comm.Bcast(host, root=root)
        if host is not p.data:  # a GPU array or a non-contiguous one: copy back
            p.data[...] = backend.to_device(host, p.device)


def allreduce_mean(value):
    """Mean over ranks of a float (returns a float) or an array (returns an array, same device)."""
    if world_size() == 1:
        return value
    if isinstance(value, np.ndarray) or backend.is_cuda(value):
        host = backend.to_numpy(value)
        dtype = host.dtype if host.dtype.kind in "fc" else np.float64
        out = np.empty(host.shape, dtype=dtype)
        _comm.Allreduce(np.ascontiguousarray(host, dtype=dtype), out)
        out /= world_size()
        return backend.to_device(out, "cuda") if backend.is_cuda(value) else out
    buf = np.array([float(value)], dtype=np.float64)
    _comm.Allreduce(MPI.IN_PLACE, buf)
    return float(buf[0] / world_size())


def all_true(flag):
    """Logical AND of a bool over ranks: every rank gets the same answer (e.g. 'all losses are
    finite'), so all ranks stop together."""
    if world_size() == 1:
        return bool(flag)
    buf = np.array([1 if flag else 0], dtype=np.int32)
    _comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.MIN)
    return bool(buf[0])


# ----- consistency check ---------------------------------------------------------------------

def _named(params):
    if hasattr(params, "named_parameters"):
        return list(params.named_parameters())
    return [(f"parameter {i} {tuple(p.shape)}", p) for i, p in enumerate(params)]


def check_consistent(config, params):
    """Raise RankMismatchError (on every rank) naming each rank whose config or parameters
    differ from rank 0's. config: a JSON-able dict; params: a Module or a list of Tensors.

    Ranks compare a hash of the config's JSON and a checksum of each parameter's bytes.
    """
    if world_size() == 1:
        return
    cfg_json = json.dumps(config, sort_keys=True, default=str)
    mine = {"config": hashlib.sha256(cfg_json.encode()).hexdigest(),
            "params": [(name, tuple(p.shape), hashlib.sha256(
                np.ascontiguousarray(backend.to_numpy(p.data)).tobytes()).hexdigest())
                for name, p in _named(params)]}
    everyone = _comm.allgather(mine)
    configs = _comm.allgather(cfg_json) if any(
        e["config"] != everyone[0]["config"] for e in everyone) else None
    problems = []
    for r, theirs in enumerate(everyone[1:], start=1):
        if theirs["config"] != everyone[0]["config"]:
            detail = ", ".join(_field_diffs(json.loads(configs[0]), json.loads(configs[r]))[:5])
            problems.append(f"rank {r} has a different config: {detail}")
        elif len(theirs["params"]) != len(everyone[0]["params"]):
            problems.append(f"rank {r} has {len(theirs['params'])} parameters, rank 0 has "
                            f"{len(everyone[0]['params'])}")
        else:
            diff = [n0 for (n0, s0, h0), (_, s1, h1) in zip(everyone[0]["params"], theirs["params"])
                    if (s0, h0) != (s1, h1)]
            if diff:
                more = f" and {len(diff) - 1} more" if len(diff) > 1 else ""
                problems.append(f"rank {r} has different parameter values than rank 0: "
                                f"{diff[0]}{more}")
    if problems:
        raise RankMismatchError("; ".join(problems) + " (every rank must run the same script, "
                                "config and seed; call broadcast_parameters(model) first)")


# ----- gradient averaging --------------------------------------------------------------------

def _bucket_mb(bucket_mb, default=DEFAULT_BUCKET_MB):
    """bucket_mb, or TT_BUCKET_MB, or the default."""
    if bucket_mb is None:
        setting = os.environ.get("TT_BUCKET_MB", str(default))
        try:
            bucket_mb = float(setting)
        except ValueError:
            bucket_mb = -1.0
        if not (bucket_mb > 0 and np.isfinite(bucket_mb)):
            raise SettingError(f"TT_BUCKET_MB={setting!r}: expected a size in MB > 0, "
                               f"e.g. 25")
    return bucket_mb


def _overlap():
    """TT_OVERLAP: True (the default, "1") or False ("0")."""
    setting = os.environ.get("TT_OVERLAP", "1")
    if setting.strip() not in ("0", "1"):
        raise SettingError(f"TT_OVERLAP={setting!r}: expected 0 or 1")
    return setting.strip() == "1"


def settings():
    """The environment settings every rank must share ({name: value}; SettingError if one is
    malformed): compare them with check_same before the first collective that depends on them."""
    overlap = _overlap()
    default = DEFAULT_OVERLAP_BUCKET_MB if overlap else DEFAULT_BUCKET_MB
    from .kernels import cpu
    try:  # the compiled CPU kernels round differently: every rank takes the same path
        compiled = int(cpu.enabled())
    except (ValueError, ImportError) as e:
        raise SettingError(str(e)) from None
    return {"TT_BUCKET_MB": _bucket_mb(None, default),
            "TT_DIST_BACKEND": os.environ.get("TT_DIST_BACKEND", "mpi").strip().lower(),
            "TT_OVERLAP": int(overlap), "TT_NUMBA": compiled}


def _chunks(size, itemsize, bucket_mb=None):
    """[(start, stop)]: a buffer of `size` elements cut into pieces of about bucket_mb MB,
    one MPI Allreduce each."""
    step = max(1, int(_bucket_mb(bucket_mb) * 1e6) // itemsize)
    return [(a, min(a + step, size)) for a in range(0, size, step)]


def allreduce_gradients(flat, bucket_mb=None):
    """Average the gradients held in `flat` over the ranks, in place.

    flat: a flat.FlatParameters holding the same parameters on every rank; the training loop
    hands over its optimizer's (`dist.allreduce_gradients(optimizer.flat)`), whose gradient
    buffer backward has just written. A gradient set by hand as a separate array is copied in
    first. flat.grad is divided by the number of ranks and summed over them in pieces of about
    bucket_mb MB (default 25, or TT_BUCKET_MB), one in-place Allreduce each; afterwards each
    p.grad is its view of flat.grad. A parameter whose grad is None counts as zeros; it stays
    None only when it is None on every rank. In one process nothing happens.
    """
    _check_flat(flat, "allreduce_gradients")
    if world_size() == 1:
        return
    for p, view in zip(flat.params, flat.grad_views):
        if p.grad is None:
            view[...] = 0
        elif p.grad.shape != p.shape:
            raise ValueError(f"gradient of shape {p.grad.shape} for a parameter of shape {p.shape}")
        elif p.grad is not view:  # e.g. set by hand: copy it in
            view[...] = p.grad
    present = np.array([p.grad is not None for p in flat.params], dtype=flat.flags.dtype)
    flat.flags[...] = backend.to_device(present, backend.device_of(flat.flags))
    xp = backend.get_array_module(flat.grad)
    xp.divide(flat.grad, world_size(), out=flat.grad)  # the sum over ranks is then the mean
    staged = _sum_over_ranks(flat, _bucket_mb(bucket_mb))
    # the summed flags: on a GPU staged through the host they are there already (no transfer)
    present = (staged[flat.grad.size:] if staged is not None else backend.to_numpy(flat.flags)) > 0
    for p, view, ok in zip(flat.params, flat.grad_views, present):
        p.grad = view if ok else None


def _check_flat(flat, who):
    if not isinstance(flat, FlatParameters):
        raise TypeError(f"{who} takes the FlatParameters that hold the gradients "
                        f"(optimizer.flat, or tinytensor.flat.FlatParameters(params)), got "
                        f"{type(flat).__name__}; AdamW has none when its parameters mix dtypes "
                        f"or devices")


def _sum_over_ranks(flat, bucket_mb):
    """flat.grad_and_flags <- its sum over all ranks, in place, one Allreduce per chunk.
    Returns the host copy it summed when the buffer is on a GPU staged through the host."""
    buf = flat.grad_and_flags
    chunks = _chunks(buf.size, buf.itemsize, bucket_mb)
    if not backend.is_cuda(buf):
        for a, b in chunks:
            _comm.Allreduce(MPI.IN_PLACE, buf[a:b])
    elif _nccl_comm is not None:  # GPU to GPU
        for a, b in chunks:
            part = buf[a:b]
            _nccl_comm.allReduce(part.data.ptr, part.data.ptr, part.size,
                                 backend.nccl_dtype(buf.dtype), backend.nccl().NCCL_SUM,
                                 backend.current_stream_ptr())
    else:  # stage through host memory: the PyPI MPI wheels cannot read GPU memory
        if flat.host_staging is None:
            flat.host_staging = np.empty(buf.shape, dtype=buf.dtype)
        host = flat.host_staging
        backend.synchronize()  # the gradients are written before MPI reads the copy
        buf.get(out=host)
        for a, b in chunks:
            _comm.Allreduce(MPI.IN_PLACE, host[a:b])
        buf.set(host)
        return host


class GradientReducer:
    """allreduce_gradients overlapped with backward, as PyTorch's DDP does it: the gradients are
    summed over the ranks in buckets while backward is still computing the earlier layers'.

        reducer = dist.GradientReducer(optimizer.flat)  # once, after broadcast_parameters
        loss.backward()      # each bucket is summed as soon as all its gradients are ready
        reducer.finish()     # the rest; then the state allreduce_gradients(optimizer.flat) leaves

    The parameters of `flat` are grouped, from the last one back (backward finishes the last
    layer first), into buckets of about bucket_mb MB (default 1, or TT_BUCKET_MB), each a
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
    TT_OVERLAP=0 (or overlap=False), for gradients on a GPU (host staging or NCCL, as today),
    and when MPI does not allow calls from a second thread. In one process nothing happens.
    """

    def __init__(self, flat, bucket_mb=None, overlap=None):
        _check_flat(flat, "GradientReducer")
        self.flat = flat
        self.overlap = _overlap() if overlap is None else bool(overlap)
        self.bucket_mb = _bucket_mb(bucket_mb, DEFAULT_OVERLAP_BUCKET_MB if self.overlap
                                    else DEFAULT_BUCKET_MB)
        self.active = (self.overlap and world_size() > 1 and not backend.is_cuda(flat.grad)
                       and MPI.Query_thread() >= MPI.THREAD_SERIALIZED)
        self._handles = []
        if not self.active:
            return
        limit = max(1, int(self.bucket_mb * 1e6) // flat.grad.itemsize)
        self.buckets, j = [], len(flat)  # [(i, j)]: parameters i .. j-1, the last ones first
        for i in reversed(range(len(flat))):
            if flat.offsets[j] - flat.offsets[i] >= limit or i == 0:
                self.buckets.append((i, j))
                j = i
        self._bucket_of = [k for k, (i, j) in enumerate(self.buckets) for _ in range(i, j)][::-1]
        self._sync = True
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
        why = ("TT_OVERLAP=0" if not self.overlap else "one process" if world_size() == 1 else
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
        n = world_size()
        while True:
            span = self._queue.get()
            try:
                if span is None:
                    return
                if self._error is None:  # after a failure: only drain the queue
                    part = self.flat.grad[span[0]:span[1]]
                    np.divide(part, n, out=part)  # the sum over ranks is then the mean
                    _comm.Allreduce(MPI.IN_PLACE, part)
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
            allreduce_gradients(self.flat, self.bucket_mb)
            return
        flat = self.flat
        if not flat.intact():
            raise RuntimeError("GradientReducer: the parameters' data was replaced (Module.to, "
                               "astype) after the reducer was built; build a new one from "
                               "optimizer.flat")
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
        _comm.Allreduce(MPI.IN_PLACE, flat.flags)
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
