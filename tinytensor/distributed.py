"""Data-parallel training over MPI (mpi4py), imported only when used.

Under `mpirun -n 4 python train.py` every rank holds a full copy of the model, draws the same
global batch and takes its own slice of it; after backward the gradients are averaged over the
ranks, so every rank takes the same optimizer step and the parameters stay identical:

    dist.init()                                 # first: MPI, fail-fast, BLAS threads per rank
    dist.broadcast_parameters(model)            # every rank starts from rank 0's weights
    dist.check_consistent(config, model)        # same config and weights, or a clear error
    loss.backward()
    dist.allreduce_gradients(optimizer.flat)    # p.grad = mean over ranks, in place

tinytensor.reducer.GradientReducer does the last while backward runs (PyTorch DDP's overlap).
Without mpirun nothing here touches MPI: world_size() is 1 and every collective is the identity.

The collective timeout (tinytensor/watchdog.py): with more than one rank, init() starts a
watchdog thread that ends the job when this rank has waited too long in a collective, or waits
for a rank that died or stopped; every collective below tells it that this rank waits:

    dist.watch(timeout=600, describe=None)      # seconds (0: never); describe(why): the line
    dist.progress("step 12")                    # where the program is, named in that line

Fail-fast: after init() an uncaught exception on any rank prints its traceback and the line
"rank R: ErrorType: message" once, from that rank, and ends every rank through abort(). End
one rank with abort(message), never sys.exit(): the other ranks would wait for it until the
watchdog ends the job.
"""
import contextlib
import hashlib
import json
import os
import sys
import threading
import time
import traceback

import numpy as np

from . import backend, environment
from .kernels import threads
from .optim import FlatParameters
from .watchdog import DEFAULT_TIMEOUT, Watchdog, check_timeout

MPI = None            # the mpi4py.MPI module, once init() has imported it
_comm = None          # MPI.COMM_WORLD while running under MPI, else None
_node = None          # the ranks on this node (sharing its memory), under MPI
_local_rank = 0       # rank among the ranks on this node
_local_size = 1       # number of ranks on this node
_threads = None       # BLAS threads per rank configure() set (None: left to the library)
_nccl_comm = None     # a cupy NcclCommunicator with the backend 'nccl'
_watchdog = None      # this rank's Watchdog, under MPI with more than one rank
_aborting = threading.Lock()  # held by the first thread that ends the job (_end runs once)

BACKENDS = ("mpi", "nccl")  # how GPU gradients are summed: through host memory, or GPU to GPU
DEFAULT_BUCKET_MB = 25      # allreduce_gradients: pieces as large as PyTorch DDP's buckets
# seconds between a failing rank's last words and MPI Abort, which loses what mpirun has not
# yet forwarded of its output
ABORT_DRAIN_S = 1.0
launched_under_mpi = environment.launched_under_mpi  # True under mpirun/mpiexec


class DistributedError(RuntimeError):
    """An error every rank raises alike (ranks that disagree); uncaught, rank 0 alone says it."""


class RankMismatchError(DistributedError):
    """Ranks disagree on the config or the parameters (raised on every rank)."""


# ----- start-up ------------------------------------------------------------------------------

def init(threads_per_rank=0, backend_name="mpi", force=False):
    """Start MPI when launched under mpirun (or force=True), then configure(threads_per_rank,
    backend_name); a no-op in a single process. Starting installs the fail-fast hooks, starts
    the watchdog (more than one rank: the collective timeout, 600 s until watch() says
    otherwise) and makes local rank r use GPU r % n_gpus; later calls only configure."""
    global MPI, _comm, _node, _local_rank, _local_size, _watchdog
    if _comm is None and (force or environment.launched_under_mpi()):
        try:
            from mpi4py import MPI as _MPI
        except ImportError:
            raise ImportError("this process was started by mpirun but mpi4py is not installed: "
                              "pip install -e \".[mpi]\" (or see the README for a cluster's own "
                              "MPI)") from None
        MPI, _comm = _MPI, _MPI.COMM_WORLD
        sys.excepthook = _fail
        threading.excepthook = lambda a: a.exc_type is SystemExit or _fail(
            a.exc_type, a.exc_value, a.exc_traceback)
        _node = _comm.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks sharing this node's memory
        _local_rank, _local_size = _node.Get_rank(), _node.Get_size()
        if _comm.Get_size() > 1:
            _watchdog = Watchdog(_comm, _node, _end, DEFAULT_TIMEOUT).start()
        if backend.cuda_available():
            backend.use_device(_local_rank % backend.device_count())
    configure(threads_per_rank, backend_name)


def configure(threads_per_rank=0, backend_name="mpi"):
    """Under MPI, set this rank's BLAS threads (threads_per_rank; 0: the node's cores shared
    among its ranks, or the cores the launcher bound the rank to, unless the user set a BLAS
    thread variable) and how GPU gradients are summed: backend_name 'mpi' (through host
    memory) or 'nccl' (GPU to GPU)."""
    global _threads, _nccl_comm
    if backend_name not in BACKENDS:
        raise ValueError(f"distributed backend {backend_name!r}: expected 'mpi' or 'nccl'")
    if isinstance(threads_per_rank, bool) or not isinstance(threads_per_rank, int) \
            or threads_per_rank < 0:
        raise ValueError(f"threads_per_rank must be an int >= 0 (0: automatic), got "
                         f"{threads_per_rank!r}")
    if _comm is None:
        return
    cores = sorted(threads.usable_cores())
    with _waiting("an allgather"):
        bound = len(set(map(tuple, _node.allgather(cores)))) > 1  # the launcher bound each rank
    if threads_per_rank or not environment.blas_threads_given():
        n = threads_per_rank or (len(cores) if bound else max(1, len(cores) // _local_size))
        _threads = n if threads.limit_blas(n) else None
    if backend_name == "nccl" and _nccl_comm is None and world_size() > 1:
        with _waiting("the set-up of NCCL"):
            _nccl_comm = backend.nccl_communicator(_comm)


def watch(timeout=DEFAULT_TIMEOUT, describe=None):
    """The collective timeout: the job ends when this rank has waited `timeout` seconds for
    the others in one collective (0: never; else at least 1). describe(why), when given, makes
    the line the job ends with (e.g. adding where the last checkpoint stands). Without MPI, or
    with one rank, it only checks the value."""
    timeout = check_timeout(timeout)
    if _watchdog is not None:
        _watchdog.timeout, _watchdog.describe = timeout, describe


def progress(where):
    """Tell the watchdog where the program is ("step 12", "the evaluation of step 250"): a
    rank that waits too long names it. One assignment: cheap enough for every step."""
    if _watchdog is not None:
        _watchdog.where = where


def _waiting(what):
    """`with _waiting("an allreduce"):` this rank waits for the others (the watchdog times it)."""
    return _watchdog.waiting(what) if _watchdog is not None else contextlib.nullcontext()


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


def is_main():  # rank 0 prints, logs and writes the checkpoints
    return rank() == 0


def describe():
    """One line for the log: ranks, ranks on this node and BLAS threads per rank."""
    blas = "left to the BLAS library" if _threads is None else str(_threads)
    return f"{world_size()} rank(s), {_local_size} on this node, BLAS threads per rank: {blas}"


def _ensure_init():  # under mpirun, collectives start MPI if the program did not
    if _comm is None and environment.launched_under_mpi():
        init()


# ----- fail-fast -----------------------------------------------------------------------------

def _fail(exc_type, exc, tb):
    """The exception hook under MPI: the error, once, then every rank ends."""
    if not issubclass(exc_type, (DistributedError, KeyboardInterrupt)):
        _end("".join(traceback.format_exception(exc_type, exc, tb))
             + f"rank {_comm.Get_rank()}: {exc_type.__name__}: {exc}", 1)
    elif _comm.Get_rank() == 0:  # raised on every rank alike: rank 0 says it
        _end(f"error: {exc}" if str(exc) else f"error: {exc_type.__name__}", 1)
    else:
        _end(None, 1)


def abort(message, code=1):
    """Print `message` once, from this rank ("rank R: message"), and end every rank with exit
    status `code`. In one process: print it and exit."""
    if _comm is None:
        print(message, file=sys.stderr, flush=True)
        sys.exit(code)
    _end(f"rank {_comm.Get_rank()}: {message}", code)


def _end(text, code):
    """Write text (None: wait for a rank that has something to say to end the job first),
    then MPI Abort, which ends every rank, once mpirun has had time to forward the text."""
    if not _aborting.acquire(blocking=False):  # a second failure (another thread): stay quiet
        return
    if text is None:
        time.sleep(10)
    else:
        sys.stderr.write(text + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(ABORT_DRAIN_S)
    if not MPI.Is_finalized():
        _comm.Abort(code)
    os._exit(code)  # MPICH's Abort can return before mpirun has killed this process


# ----- collectives ---------------------------------------------------------------------------

def barrier():  # every rank waits here for the others
    if world_size() > 1:
        with _waiting("a barrier"):
            _comm.Barrier()


def allgather(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank (small picklable objects); [obj] alone."""
    if world_size() == 1:
        return [obj]
    with _waiting("an allgather"):
        return _comm.allgather(obj)


def broadcast_parameters(model, root=0):
    """Copy rank root's parameter values into every rank's parameters (in place)."""
    if world_size() == 1:
        return
    params = model.parameters() if hasattr(model, "parameters") else model
    with _waiting("the broadcast of the parameters"):
        for p in params:
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
        with _waiting("an allreduce"):
            _comm.Allreduce(np.ascontiguousarray(host, dtype=dtype), out)
        out /= world_size()
        return backend.to_device(out, backend.device_of(value))
    buf = np.array([float(value)], dtype=np.float64)
    with _waiting("an allreduce"):
        _comm.Allreduce(MPI.IN_PLACE, buf)
    return float(buf[0] / world_size())


def all_true(flag):
    """Logical AND of a bool over ranks: every rank gets the same answer (e.g. 'all losses are
    finite'), so all ranks stop together."""
    if world_size() == 1:
        return bool(flag)
    buf = np.array([1 if flag else 0], dtype=np.int32)
    with _waiting("an allreduce"):
        _comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.MIN)
    return bool(buf[0])


# ----- consistency checks --------------------------------------------------------------------

def check_same(values):
    """Raise RankMismatchError (on every rank) naming each rank and field whose value differs
    from rank 0's. values: {field: small JSON-able value}, e.g. the config and the data's size
    and sha256. Call it before the first broadcast: ranks that disagree there fail inside MPI
    with a message that names neither."""
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


def check_consistent(config, params):
    """Raise RankMismatchError (on every rank) naming each rank whose config or parameters
    differ from rank 0's. config: a JSON-able dict; params: a Module or a list of Tensors.
    Ranks compare the config and a sha256 of each parameter's bytes."""
    if world_size() == 1:
        return
    named = (list(params.named_parameters()) if hasattr(params, "named_parameters") else
             [(f"parameter {i} {tuple(p.shape)}", p) for i, p in enumerate(params)])
    mine = {"config": json.loads(json.dumps(config, sort_keys=True, default=str)),
            "params": [(name, tuple(p.shape), hashlib.sha256(
                np.ascontiguousarray(backend.to_numpy(p.data)).tobytes()).hexdigest())
                for name, p in named]}
    with _waiting("the consistency check"):
        everyone = _comm.allgather(mine)
    problems = []
    for r, theirs in enumerate(everyone[1:], start=1):
        ours = everyone[0]
        if theirs["config"] != ours["config"]:
            detail = ", ".join(_field_diffs(ours["config"], theirs["config"])[:5])
            problems.append(f"rank {r} has a different config: {detail}")
        elif len(theirs["params"]) != len(ours["params"]):
            problems.append(f"rank {r} has {len(theirs['params'])} parameters, rank 0 has "
                            f"{len(ours['params'])}")
        else:
            diff = [n0 for (n0, s0, h0), (_, s1, h1) in zip(ours["params"], theirs["params"])
                    if (s0, h0) != (s1, h1)]
            if diff:
                more = f" and {len(diff) - 1} more" if len(diff) > 1 else ""
                problems.append(f"rank {r} has different parameter values than rank 0: "
                                f"{diff[0]}{more}")
    if problems:
        raise RankMismatchError("; ".join(problems) + " (every rank must run the same script, "
                                "config and seed; call broadcast_parameters(model) first)")


# ----- gradient averaging --------------------------------------------------------------------

def allreduce_gradients(flat, bucket_mb=DEFAULT_BUCKET_MB):
    """Average the gradients of flat's parameters (an optim.FlatParameters, the optimizer's)
    over the ranks: copied into flat.grad, divided by the number of ranks and summed over them
    in pieces of about bucket_mb MB; then each p.grad is its view of flat.grad. A missing grad
    counts as zeros, and stays None only when it is None on every rank. One process: nothing."""
    check_flat(flat, "allreduce_gradients")
    if world_size() == 1:
        return
    present = np.array([p.grad is not None for p in flat.params], dtype=flat.flags.dtype)
    for p, view in zip(flat.params, flat.grad_views):
        if p.grad is None:
            view[...] = 0
        elif p.grad.shape != p.shape:
            raise ValueError(f"gradient of shape {p.grad.shape} for a parameter of shape {p.shape}")
    flat.gather_grads()
    flat.flags[...] = backend.to_device(present, backend.device_of(flat.flags))
    backend.get_array_module(flat.grad).divide(flat.grad, world_size(), out=flat.grad)
    with _waiting("the gradient allreduce"):
        staged = sum_over_ranks(flat, bucket_mb)
    # the summed flags: on a GPU staged through the host they are there already (no transfer)
    present = (staged[flat.grad.size:] if staged is not None else backend.to_numpy(flat.flags)) > 0
    for p, view, ok in zip(flat.params, flat.grad_views, present):
        p.grad = view if ok else None


def check_flat(flat, who):
    if not isinstance(flat, FlatParameters):
        raise TypeError(f"{who} takes the FlatParameters that hold the gradients "
                        f"(optimizer.flat, or tinytensor.optim.FlatParameters(params)), got "
                        f"{type(flat).__name__}; AdamW has none when its parameters mix dtypes "
                        f"or devices")


def chunks(size, itemsize, bucket_mb):
    """[(start, stop)]: a buffer of `size` elements cut into pieces of about bucket_mb MB."""
    if not (isinstance(bucket_mb, (int, float)) and 0 < bucket_mb < float("inf")):
        raise ValueError(f"bucket_mb must be a size in MB > 0, got {bucket_mb!r}")
    step = max(1, int(bucket_mb * 1e6) // itemsize)
    return [(a, min(a + step, size)) for a in range(0, size, step)]


def sum_over_ranks(flat, bucket_mb):
    """flat.grad_and_flags <- its sum over the ranks, one Allreduce per chunk; on a GPU over
    NCCL, or through host memory (PyPI's MPI cannot read GPU memory): then returns that copy."""
    buf = flat.grad_and_flags
    pieces = chunks(buf.size, buf.itemsize, bucket_mb)
    if not backend.is_cuda(buf):
        for a, b in pieces:
            _comm.Allreduce(MPI.IN_PLACE, buf[a:b])
    elif _nccl_comm is not None:
        for a, b in pieces:
            backend.nccl_sum_(_nccl_comm, buf[a:b])
    else:
        if flat.host_staging is None:
            flat.host_staging = np.empty(buf.shape, dtype=buf.dtype)
        host = flat.host_staging
        backend.synchronize()  # the gradients are written before MPI reads the copy
        buf.get(out=host)
        for a, b in pieces:
            _comm.Allreduce(MPI.IN_PLACE, host[a:b])
        buf.set(host)
        return host
