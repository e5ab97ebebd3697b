"""Intel MKL's matrix product (cblas_?gemm through ctypes) for the linear layers on the CPU.

NumPy multiplies with the OpenBLAS it bundles. On an Intel CPU, MKL (the `mkl` wheel:
`pip install -e ".[mkl]"`) is faster at the GPT's shapes (Intel Xeon with AVX-512, 2 cores,
fp32, forward + both gradients of the small preset's four linear shapes: 2.77 against 3.25 ms;
the lecture preset's: 502 against 577 ms); on an AMD EPYC it was 1.2-2.1x slower. So by
default (use_mkl(None), "auto") the CPU versions of Linear and LinearReLU (kernels/linear.py)
multiply with MKL where it is installed and the CPU is Intel's, and with NumPy elsewhere; and
only products of linear.MKL_MIN_ROWS rows and more (a training step's): for generation's few
rows MKL's cost per call is larger than NumPy's.

    mkl.use_mkl(True)        # MKL's products on (an error where MKL is missing), False: off,
                             # None: auto (the default); returns the setting before
    mkl.enabled()            # whether the linear layers multiply with MKL now
    mkl.product(a, b, ta, tb)  # op(a) @ op(b), op transposing where ta / tb
    mkl.describe()           # one line for a log

MKL runs its own threads as many as NumPy's BLAS is set to use (threads.count();
MKL_NUM_THREADS, when set, is MKL's own), one inside a part of threads.for_ranges, as OpenBLAS
does there. They are Intel OpenMP's (the intel-openmp wheel that `mkl` requires), which sleep
1 ms after their work (BLOCKTIME_MS; KMP_BLOCKTIME, when set, is Intel OpenMP's own); but where
a GNU OpenMP is already in the process (`import torch` before the first linear layer), GNU
OpenMP's, as MKL's threads must use the OpenMP whose functions they find (_GNU_THREADS).
Nothing happens at import: the library loads at the first linear layer that would use it.
"""
import ctypes
import ctypes.util
import glob
import os
import sys

import numpy as np

from .. import environment
from . import threads as _threads

_mode = None       # True: on, False: off, None: auto (see above)
_lib = None        # the loaded libmkl_rt with its gemm signatures; False: could not be loaded
_why = ""          # why _lib is False
_intel = None      # whether the CPU is Intel's (read once)

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
# MKL_Set_Threading_Layer's values: Intel OpenMP (libiomp5), or GNU OpenMP where a libgomp is in
# the global symbol scope already (torch imported first): MKL's threads must use the OpenMP
# whose omp_* functions they find there, else each thread takes itself for thread 0 and the
# products come out wrong (seen: 117 of 200 wrong with Intel's layer after `import torch`)
_INTEL_THREADS, _GNU_THREADS = 0, 3
_layer = None         # the layer chosen when MKL loaded
# how long (ms) Intel OpenMP's threads wait for more work after a product before they sleep: its
# default, 200 ms, has them spin through the rest of a training step, on the cores that
# tinytensor's own threads need (attention, AdamW), while 0 wakes them for every product (small
# preset on an Intel Xeon: 34.4 ms a step at 1 ms, 37.7 at 200, 39.4 at 0)
BLOCKTIME_MS = 1


def use_mkl(flag):
    """MKL's products on (True), off (False) or auto (None, the default: on where MKL is
    installed and the CPU is Intel's); returns the setting before. True where MKL cannot be
    loaded is a RuntimeError naming what is missing."""
    global _mode
    if flag not in (True, False, None):
        raise ValueError(f"use_mkl() takes True, False or None (auto), got {flag!r}")
    if flag is True and library() is None:
        raise RuntimeError(f"MKL's products were asked for, but {_why}: "
                           f"pip install -e \".[mkl]\", or leave them off")
    before, _mode = _mode, flag
    return before


def enabled():
    """Whether the linear layers on the CPU multiply with MKL now."""
    if _mode is None:
        return intel_cpu() and library() is not None
    return _mode


def intel_cpu():
    """Whether this CPU is Intel's (the vendor in /proc/cpuinfo; False where it cannot be read)."""
    global _intel
    if _intel is None:
        try:
            with open("/proc/cpuinfo") as f:
                _intel = any(line.startswith("vendor_id") and "GenuineIntel" in line for line in f)
        except OSError:
            _intel = False
    return _intel


def _candidates():
    """Paths of libmkl_rt to try: the `mkl` wheel's (in the environment's lib/), then the
    system's."""
    found = sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so*")), reverse=True)
    system = ctypes.util.find_library("mkl_rt")
    return found + ([system] if system else [])


def _gnu_openmp_loaded():
    """Whether a GNU OpenMP runtime (libgomp) is already in the process's global symbol scope,
    as `import torch` puts one there."""
    return hasattr(ctypes.CDLL(None), "GOMP_parallel")


def _load_intel_openmp(mkl_path):
    """Load Intel OpenMP (libiomp5, the intel-openmp wheel that `mkl` requires), beside libmkl_rt
    or where the loader finds it, into the global symbol scope, and set its threads' blocktime
    (BLOCKTIME_MS, unless KMP_BLOCKTIME is set); raises OSError where it is missing."""
    mode = ctypes.RTLD_GLOBAL
    try:
        omp = ctypes.CDLL(os.path.join(os.path.dirname(mkl_path), "libiomp5.so"), mode=mode)
    except OSError:
        omp = ctypes.CDLL("libiomp5.so", mode=mode)
    if not environment.omp_blocktime_given():
        omp.kmp_set_blocktime(BLOCKTIME_MS)


def library():
    """libmkl_rt, loaded once and set up (threading layer, threads), or None where it is not
    installed (see _why)."""
    global _lib, _why, _layer
    if _lib is None:
        _lib, _why = False, "the mkl package is not installed (no libmkl_rt found)"
        for path in _candidates():
            layer = _GNU_THREADS if _gnu_openmp_loaded() else _INTEL_THREADS
            try:
                lib = ctypes.CDLL(path)
                if layer == _INTEL_THREADS:
                    _load_intel_openmp(path)
            except OSError as e:
                _why = f"MKL or Intel OpenMP could not be loaded ({e})"
                continue
            if lib.MKL_Set_Threading_Layer(layer) < 0:
                _why = "MKL refused its threading layer"
                continue
            _layer = layer
            _declare(lib)
            _lib = lib
            _match_threads(lib)
            break
    return _lib or None


def _declare(lib):
    for name, real in (("cblas_sgemm", ctypes.c_float), ("cblas_dgemm", ctypes.c_double)):
        f = getattr(lib, name)
        i, p = ctypes.c_int, ctypes.c_void_p
        f.argtypes = [i, i, i, i, i, i, real, p, i, p, i, real, p, i]
        f.restype = None
    lib.MKL_Get_Version_String.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _match_threads(lib):
    """MKL gets as many threads as NumPy's BLAS has (unless MKL_NUM_THREADS says), and
    kernels/threads.py finds its controller from now on (to hold it to one thread while
    tinytensor's threads run)."""
    if environment.blas_threads_given() != "MKL_NUM_THREADS":
        lib.MKL_Set_Num_Threads(_threads.count())
    _threads.forget_blas()


def version():
    """MKL's version, e.g. '2026.2' (from its version line), or None where it is not loaded."""
    lib = library()
    if lib is None:
        return None
    buf = ctypes.create_string_buffer(256)
    lib.MKL_Get_Version_String(buf, len(buf))
    line = buf.value.decode(errors="replace")
    return line.split("Version ", 1)[1].split()[0].split("-")[0] if "Version " in line else line.strip()


def describe():
    """One line for a log: which library multiplies the linear layers on the CPU, and why."""
    setting = {None: "auto", True: "on", False: "off"}[_mode]
    if enabled():
        threads = "Intel" if _layer == _INTEL_THREADS else "GNU"
        return f"MKL {version()} (mkl {setting}; {threads} OpenMP threads)"
    if _mode is False:
        why = ""
    elif _mode is None and not intel_cpu():   # auto on another CPU: MKL is not even loaded
        why = ": not an Intel CPU"
    else:
        why = f": {_why}"
    return f"NumPy's BLAS (mkl {setting}{why})"


def _operand(a, transposed):
    """(cblas transpose flag, leading dimension) for the 2-D array a used as op(a), or None
    when neither of its dimensions has unit stride."""
    rows, cols = a.shape
    if any(s % a.itemsize for s in a.strides):
        return None
    s0, s1 = (s // a.itemsize for s in a.strides)
    if s1 == 1 and s0 >= max(1, cols):                  # rows laid out one after another
        return (_TRANS if transposed else _NO_TRANS), s0
    if s0 == 1 and s1 >= max(1, rows):                  # a transposed row-major array
        return (_NO_TRANS if transposed else _TRANS), s1
    return None


_INT_MAX = 2**31 - 1  # MKL's LP64 interface counts in 32-bit ints


def takes(a, b):
    """Whether product() can multiply these: 2-D NumPy arrays of one dtype, float32 or float64,
    each with a unit stride, none empty, sizes that MKL's 32-bit ints hold."""
    if not (type(a) is np.ndarray and type(b) is np.ndarray and a.ndim == 2 and b.ndim == 2
            and a.dtype == b.dtype and a.dtype in (np.float32, np.float64)
            and a.size > 0 and b.size > 0):
        return False
    ops = _operand(a, False), _operand(b, False)
    return None not in ops and max(max(a.shape), max(b.shape), ops[0][1], ops[1][1]) <= _INT_MAX


def product(a, b, ta=False, tb=False):
    """op(a) @ op(b) as a new C-contiguous array, op(x) being x.T where ta (tb), else x; a and
    b as takes() accepts them."""
    lib = library()
    (fa, lda), (fb, ldb) = _operand(a, ta), _operand(b, tb)
    m, k = a.shape[::-1] if ta else a.shape
    n = b.shape[0] if tb else b.shape[1]
    c = np.empty((m, n), dtype=a.dtype)
    gemm = lib.cblas_sgemm if a.dtype == np.float32 else lib.cblas_dgemm
    # inside a part of threads.for_ranges: one thread (threadpoolctl's setting reaches only the
    # thread that made it, MKL's setting being per thread)
    before = lib.MKL_Set_Num_Threads_Local(1) if _threads.in_part() else None
    try:
        gemm(_ROW_MAJOR, fa, fb, m, n, k, 1.0, a.ctypes.data, lda, b.ctypes.data, ldb, 0.0,
             c.ctypes.data, n)
    finally:
        if before is not None:
            lib.MKL_Set_Num_Threads_Local(before)
    return c
