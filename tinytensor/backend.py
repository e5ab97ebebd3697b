"""Array backends: NumPy on the CPU, CuPy on an NVIDIA GPU.

This is the only module that imports cupy. Importing it never fails where cupy is
absent (or present but without a usable GPU): `cuda_available()` then returns False
and asking for 'cuda' raises a clear error.
"""
import numpy as np

try:  # pragma: no cover - exercised only where cupy is installed
    import cupy as cp
except Exception:  # ImportError, or a broken CUDA install
    cp = None

_cuda_ok = None


def cuda_available():
    """True when cupy imports and at least one GPU is visible."""
    global _cuda_ok
    if _cuda_ok is None:
        _cuda_ok = False
        if cp is not None:
            try:
                _cuda_ok = cp.cuda.runtime.getDeviceCount() > 0
            except Exception:
                _cuda_ok = False
    return _cuda_ok


def get_array_module(*arrays):
    """numpy or cupy, whichever the arrays live in (numpy for Python scalars)."""
    if cp is not None:
        for a in arrays:
            if isinstance(a, cp.ndarray):
                return cp
    return np


def is_cuda(a):
    return cp is not None and isinstance(a, cp.ndarray)


def device_of(a):
    return "cuda" if is_cuda(a) else "cpu"


class device:
    """torch.device: where a tensor lives, a type ('cpu' or 'cuda') and an optional index.

    device('cuda'), device('cuda:0') and device('cuda', 0) as in torch; str() gives 'cpu' or
    'cuda:0', and two devices are equal when type and index are (a device never equals a
    string, as in torch). Everything that takes a device takes one of these or its string.
    """

    __slots__ = ("type", "index")

    def __init__(self, type, index=None):
        if isinstance(type, device):
            type, index = type.type, type.index if index is None else index
        if not isinstance(type, str):
            raise TypeError(f"device() expects a string such as 'cpu' or 'cuda:0', got "
                            f"{type.__class__.__name__}")
        name, _, num = type.partition(":")
        if name not in ("cpu", "cuda"):
            raise RuntimeError(f"unknown device type {name!r} in {type!r}: expected 'cpu' or "
                               f"'cuda', optionally with an index ('cuda:0')")
        if num:
            if index is not None:
                raise RuntimeError(f"device(): {type!r} already names an index, do not pass "
                                   f"index={index!r} too")
            if not num.isdigit():
                raise RuntimeError(f"invalid device string {type!r}: the index after ':' must "
                                   f"be a non-negative integer")
            index = int(num)
        if index is not None and (not isinstance(index, int) or isinstance(index, bool)
                                  or index < 0):
            raise RuntimeError(f"device index must be a non-negative int, got {index!r}")
        object.__setattr__(self, "type", name)
        object.__setattr__(self, "index", index)

    def __setattr__(self, name, value):
        raise AttributeError("device objects are immutable")

    def __eq__(self, other):
        if not isinstance(other, device):
            return NotImplemented
        return (self.type, self.index) == (other.type, other.index)

    def __hash__(self):
        return hash((self.type, self.index))

    def __str__(self):
        return self.type if self.index is None else f"{self.type}:{self.index}"

    def __repr__(self):
        index = "" if self.index is None else f", index={self.index}"
        return f"device(type='{self.type}'{index})"


def device_name(d):
    """'cpu' or 'cuda' for a device or its string (index 0 is the only GPU tinytensor uses)."""
    if not isinstance(d, device):
        d = device(d)
    if d.type == "cuda" and d.index not in (None, 0):
        raise NotImplementedError(f"device {str(d)!r}: tinytensor uses one GPU per process, "
                                  f"'cuda' or 'cuda:0' (under mpirun each rank gets its own)")
    return d.type


def check_device(device):
    """Validate a device (a string or a device object); 'auto' picks cuda when available."""
    if device != "auto":
        try:
            device = device_name(device)
        except NotImplementedError:
            raise
        except RuntimeError:
            raise ValueError(f"unknown device {device!r}: expected 'cpu', 'cuda' (or 'cuda:0') "
                             f"or 'auto'") from None
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device == "cuda" and not cuda_available():
        raise RuntimeError(
            "device 'cuda' requested but no GPU is usable: install cupy for your CUDA "
            "version (pip install cupy-cuda12x or cupy-cuda13x) on a machine with an NVIDIA GPU")
    return device


def to_device(a, device):
    """Move an array to 'cpu' (numpy) or 'cuda' (cupy); no copy when already there. device
    is a string or a device object."""
    if not isinstance(device, str):  # a device object, as a tensor's .device gives
        device = device_name(device)
    elif device not in ("cpu", "cuda"):
        device = check_device(device)
    if device != device_of(a):
        device = check_device(device)
        if device == "cpu" and is_cuda(a):
            return cp.asnumpy(a)
        if device == "cuda" and not is_cuda(a):
            return cp.asarray(a)
    return a


_DEVICES = {"cpu": device("cpu"), "cuda": device("cuda", 0)}


def device_obj(a):
    """The device object of an array, as a tensor's .device gives it (cuda:0 for a GPU)."""
    return _DEVICES[device_of(a)]


def to_numpy(a):
    return cp.asnumpy(a) if is_cuda(a) else np.asarray(a)


def synchronize():
    """Wait for queued GPU work (a no-op on the CPU)."""
    if cp is not None and cuda_available():
        cp.cuda.get_current_stream().synchronize()


# ----- for tinytensor.distributed: one GPU per rank, optional NCCL ---------------------------

def device_count():
    """Number of visible GPUs (0 without cupy or a GPU)."""
    return cp.cuda.runtime.getDeviceCount() if cuda_available() else 0


def use_device(index):
    """Make GPU `index` this process's current device."""
    cp.cuda.Device(index).use()


def nccl():
    """cupy's NCCL bindings (cupy.cuda.nccl), or a clear error where they are missing."""
    try:
        from cupy.cuda import nccl as _nccl
        ok = _nccl.available
    except Exception:
        ok = False
    if not ok:
        raise RuntimeError("the distributed backend 'nccl' needs cupy's NCCL, and "
                           "cupy.cuda.nccl.available is False: pip install nvidia-nccl-cu12 (cu13 "
                           "for CUDA 13), or use the backend 'mpi' (GPU gradients summed through "
                           "host memory)")
    return _nccl


def nccl_communicator(comm):
    """An NCCL communicator over the ranks of the MPI communicator comm (one GPU each); its
    unique id travels over MPI."""
    if not cuda_available():
        raise RuntimeError("the distributed backend 'nccl' needs CuPy and a GPU on every rank; "
                           "use the backend 'mpi'")
    n = nccl()
    uid = comm.bcast(n.get_unique_id() if comm.Get_rank() == 0 else None, root=0)
    return n.NcclCommunicator(comm.Get_size(), uid, comm.Get_rank())


def nccl_sum_(communicator, a):
    """a <- its sum over the ranks of an NCCL communicator, in place (a float cupy array)."""
    n = nccl()
    kind = {"float16": n.NCCL_FLOAT16, "float32": n.NCCL_FLOAT32, "float64": n.NCCL_FLOAT64}
    communicator.allReduce(a.data.ptr, a.data.ptr, a.size, kind[a.dtype.name], n.NCCL_SUM,
                           cp.cuda.get_current_stream().ptr)


def scatter_add(target, index, values):
    """target[index] += values in place, repeated indices accumulating (numpy.add.at)."""
    if is_cuda(target):
        import cupyx
        cupyx.scatter_add(target, index, values)
    else:
        np.add.at(target, index, values)


def index_to_device(idx, device):
    """Move the array parts of an index expression to `device`."""
    def move(i):
        if isinstance(i, np.ndarray) or is_cuda(i):
            return to_device(i, device)
        return i
    return tuple(move(i) for i in idx) if isinstance(idx, tuple) else move(idx)


def memory_pool_bytes():
    """(bytes in use by live arrays, bytes the cupy pool holds from the driver); (0, 0) on CPU.

    The pool keeps freed blocks for reuse, so `held` stays at the high-water mark;
    `cupy.get_default_memory_pool().free_all_blocks()` returns the unused part to the driver."""
    if cp is None or not cuda_available():
        return 0, 0
    pool = cp.get_default_memory_pool()
    return pool.used_bytes(), pool.total_bytes()
