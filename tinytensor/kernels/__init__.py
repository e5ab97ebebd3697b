"""Accelerators: faster versions of the fused ops of tinytensor.fused, behind one seam.

Every fused op is written in tinytensor/fused.py as plain array code (NumPy or CuPy): its
reference. This package holds faster versions of them, one module per kernel family:

    module            accelerates               versions (the first that takes the arrays runs)
    layernorm.py      LayerNorm                 CUDA kernels; compiled CPU loops
    cross_entropy.py  CrossEntropy              CUDA kernels; compiled CPU loops (float32)
    linear.py         Linear, LinearReLU        CUDA bias+ReLU kernels; compiled CPU loops, the
                                                products by Intel MKL where it pays (mkl.py)
    embedding.py      Embedding                 a compiled CPU scatter-add of rows
    attention.py      CausalAttention           chunked queries over threads, with a CUDA or
                                                compiled CPU causal softmax
    dropout.py        Dropout                   the mask drawn and applied over threads
    adamw.py          AdamWUpdate               a CUDA kernel; a compiled CPU loop; cache
                                                blocks over threads

and what they share: threads.py (NumPy work split over threads), _numba.py (the compiled CPU
loops, needs numba: `pip install -e ".[fast]"`), _cuda.py (compiling CUDA sources with cupy)
and mkl.py (Intel MKL's matrix product through ctypes: `pip install -e ".[mkl]"`).

    op = kernels.accelerated(fused.LayerNorm, x, w, b)   # the one dispatch point of a fused op
    kernels.use(False)                                    # every op runs its reference
    kernels.use_mkl(False)                                # the linear layers' products by NumPy
    kernels.describe()                                    # one line for a log

accelerated(Op, *args) returns the first version of Op whose takes(*args) accepts the arrays
at hand, else Op itself. Each version is a subclass of its reference with the same inputs and
outputs, tested equal to it (tests/test_kernels*.py), and runs on one device ("cpu" or "cuda").

Which run: use(True) all of them, use(False) none, use(None) (the default, "auto") the CUDA
kernels on a GPU, and the CPU versions where numba is installed (the `fast` extra): a plain
install runs the reference, the library as written in fused.py. Nothing happens at import: a
family module, numba and the CUDA sources load at the first dispatch that needs them.
"""
import importlib

import numpy as np

from .. import backend

# the reference ops (by class name) and the module holding their faster versions
_FAMILIES = {"LayerNorm": "layernorm", "CrossEntropy": "cross_entropy", "Linear": "linear",
             "LinearReLU": "linear", "Embedding": "embedding", "CausalAttention": "attention",
             "Dropout": "dropout", "AdamWUpdate": "adamw"}
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))

_mode = None       # True: on, False: off, None: auto (see above)
_versions = {}     # reference name -> its versions, fastest first (loaded at the first dispatch)
_loops = None      # the module of compiled loops (_numba) once loaded; False: no numba


def use(flag):
    """Turn the accelerators on (True), off (False: every fused op runs its reference) or back
    to the default (None: auto); returns the setting before."""
    global _mode
    if flag not in (True, False, None):
        raise ValueError(f"kernels.use() takes True, False or None (auto), got {flag!r}")
    before, _mode = _mode, flag
    return before


def use_mkl(flag):
    """The CPU linear layers' matrix products by Intel MKL: on (True; an error where MKL is
    not installed), off (False: NumPy's BLAS), or auto (None, the default: MKL where the `mkl`
    wheel is installed and the CPU is Intel's); returns the setting before. See mkl.py."""
    from . import mkl
    return mkl.use_mkl(flag)


def enabled(device="cpu"):
    """Whether the accelerators of `device` ('cpu' or 'cuda') run now."""
    if _mode is None:
        return device == "cuda" or numba_loops() is not None
    return _mode


def accelerated(op, *args, **kwargs):
    """The version of the fused op `op` (a reference class of tinytensor.fused) to run on these
    arguments: the first of its faster versions that takes them, else op itself."""
    device = "cuda" if backend.is_cuda(args[0]) else "cpu"
    if not enabled(device):
        return op
    versions = _versions.get(op.__name__)
    if versions is None:
        module = importlib.import_module(f".{_FAMILIES[op.__name__]}", __name__)
        versions = _versions[op.__name__] = module.VERSIONS[op.__name__]
    for version in versions:
        if version.device == device and version.takes(*args, **kwargs):
            return version
    return op


def numba_loops():
    """The compiled CPU loops (module _numba), or None where numba is not installed. The first
    call imports numba and loads the loops (compiled once, then cached on disk)."""
    global _loops
    if _loops is None:
        try:
            _loops = importlib.import_module("._numba", __name__)
        except ImportError:
            _loops = False
    return _loops or None


def numpy_floats(*arrays):
    """True for NumPy arrays of one float dtype, float32 or float64 (None entries skipped):
    what the compiled CPU loops take."""
    dtype = None                   # one loop, no lists: every fused op asks on every call
    for a in arrays:
        if a is None:
            continue
        if type(a) is not np.ndarray or (dtype is not None and a.dtype != dtype):
            return False
        dtype = a.dtype
    return dtype is not None and dtype in _FLOATS


def cuda_floats(*arrays):
    """True for cupy arrays of float32 or float64 (None entries skipped): what the CUDA kernels
    take."""
    if backend.cp is None:
        return False
    given = [a for a in arrays if a is not None]
    return bool(given) and all(backend.is_cuda(a) and a.dtype in _FLOATS for a in given)


def describe(device="cpu"):
    """One line for a log: whether the fused ops of `device` run accelerated versions here."""
    setting = {None: "auto", True: "on", False: "off"}[_mode]
    if not enabled(device):
        why = "numba is not installed" if _mode is None else "turned off"
        return f"off ({setting}: {why}; every fused op runs its reference)"
    if device == "cuda":
        return f"on ({setting}): CUDA kernels"
    from . import threads
    loops = numba_loops()
    compiled = (f"compiled CPU loops (numba {__import__('numba').__version__})" if loops
                else "no compiled CPU loops (numba is not installed)")
    from . import mkl
    return (f"on ({setting}): {compiled}, work split over {threads.count()} thread(s); "
            f"linear layers multiplied by {mkl.describe()}")


def families():
    """Every CUDA kernel family (name, source, template instantiations)."""
    for name in sorted(set(_FAMILIES.values())):
        importlib.import_module(f".{name}", __name__)
    from ._cuda import KernelFamily
    return list(KernelFamily.registry)


def compile_all():
    """Compile every CUDA kernel now, outside any timed region (needs cupy and a GPU)."""
    for family in families():
        family.compile()
