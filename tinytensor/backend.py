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


def check_device(device):
    """Validate a device string; 'auto' picks cuda when available."""
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}: expected 'cpu', 'cuda' or 'auto'")
    if device == "cuda" and not cuda_available():
        raise RuntimeError(
            "device 'cuda' requested but no GPU is usable: install cupy for your CUDA "
            "version (pip install cupy-cuda12x or cupy-cuda13x) on a machine with an NVIDIA GPU")
    return device


def to_device(a, device):
    """Move an array to 'cpu' (numpy) or 'cuda' (cupy); no copy when already there."""
    device = check_device(device)
    if device == "cpu":
        return cp.asnumpy(a) if is_cuda(a) else a
    return a if is_cuda(a) else cp.asarray(a)


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


def current_stream_ptr():
    return cp.cuda.get_current_stream().ptr


def nccl():
    """cupy's NCCL bindings (cupy.cuda.nccl), or a clear error where they are missing."""
    try:
        from cupy.cuda import nccl as _nccl
        ok = _nccl.available
    except Exception:
        ok = False
    if not ok:
        raise RuntimeError("TT_DIST_BACKEND=nccl but this cupy has no NCCL (cupy.cuda.nccl.available "
                           "is False): pip install nvidia-nccl-cu12 (cu13 for CUDA 13), or unset "
                           "TT_DIST_BACKEND to sum GPU gradients through host memory over MPI")
    return _nccl


def nccl_dtype(dtype):
    """The NCCL data type constant for a float dtype."""
    n = nccl()
    return {"float16": n.NCCL_FLOAT16, "float32": n.NCCL_FLOAT32,
            "float64": n.NCCL_FLOAT64}[dtype.name]


def scatter_add(target, index, values):
    """target[index] += values, accumulating repeated indices (numpy.add.at semantics)."""
    if is_cuda(target):
        import cupyx
        cupyx.scatter_add(target, index, values)
    elif isinstance(index, np.ndarray) and index.dtype.kind in "iu" and index.size:
        _add_rows(target, index, values)  # e.g. an embedding's gradient: whole rows
    else:
        np.add.at(target, index, values)


def _add_rows(target, idx, values):
    """target[idx] += values for integer indices into axis 0, repeats accumulating (what
    np.add.at does, element by element): sort the indices, sum each run of equal ones with
    np.add.reduceat, add the sums once per distinct row. Many times faster for embeddings."""
    n = target.shape[0]
    rows = idx.reshape(-1)
    rows = np.where(rows < 0, rows + n, rows)                       # numpy's negative indices
    from .kernels import cpu
    if cpu.takes(target, values) and target.flags.c_contiguous:    # one compiled loop
        cpu.add_rows(target, rows, values)
        return
    vals = values.reshape(rows.size, -1)                            # (N, rest of a row)
    order = np.argsort(rows, kind="stable")
    rows = rows[order]
    starts = np.flatnonzero(np.concatenate(([True], rows[1:] != rows[:-1])))  # first of each run
    target.reshape(n, -1)[rows[starts]] += np.add.reduceat(vals[order], starts, axis=0)


def index_to_device(idx, device):
    """Move the array parts of an index expression to `device`."""
    def move(i):
        if isinstance(i, np.ndarray) or is_cuda(i):
            return to_device(i, device)
        return i
    return tuple(move(i) for i in idx) if isinstance(idx, tuple) else move(idx)


def tf32_enabled():
    """Whether cupy runs float32 matmuls on TF32 tensor cores (CUPY_TF32=1, read by cupy at
    its first float32 matmul, so set it before that — best before the process starts)."""
    import os
    try:
        return int(os.environ.get("CUPY_TF32", "0")) > 0
    except ValueError:
        return False


def memory_pool_bytes():
    """(bytes in use by live arrays, bytes the cupy pool holds from the driver); (0, 0) on CPU.

    The pool keeps freed blocks for reuse, so `held` stays at the high-water mark;
    `cupy.get_default_memory_pool().free_all_blocks()` returns the unused part to the driver."""
    if cp is None or not cuda_available():
        return 0, 0
    pool = cp.get_default_memory_pool()
    return pool.used_bytes(), pool.total_bytes()
