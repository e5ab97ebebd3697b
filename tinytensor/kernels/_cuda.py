"""What every CuPy kernel family shares: the CUDA header, lazy compilation, launch shapes.

A family is one CUDA source (a few templated `__global__` kernels) plus the list of template
instantiations it needs. Families are declared at module level in each kernel module, but
nothing touches cupy until a kernel is first called: `KernelFamily.function` compiles the
source (once per process, through cupy's on-disk cache afterwards) on first use. That is what
lets `import tinytensor.kernels` work where cupy is absent.

Only tinytensor/backend.py imports cupy; the kernels reach it as `backend.cp`.
"""
import numpy as np

from .. import backend

# Included at the top of every family's source: per-type math (so templates need no
# <cmath>, which NVRTC does not have) and warp-wide reductions over 32 lanes.
HEADER = r"""
__device__ __forceinline__ float tt_exp(float x) { return expf(x); }
__device__ __forceinline__ double tt_exp(double x) { return exp(x); }
__device__ __forceinline__ float tt_log(float x) { return logf(x); }
__device__ __forceinline__ double tt_log(double x) { return log(x); }
__device__ __forceinline__ float tt_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double tt_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float tt_neg_inf(float) { return __int_as_float(0xff800000); }
__device__ __forceinline__ double tt_neg_inf(double) {
    return __longlong_as_double(0xfff0000000000000LL);
}
__device__ __forceinline__ float tt_nan(float) { return __int_as_float(0x7fffffff); }
__device__ __forceinline__ double tt_nan(double) {
    return __longlong_as_double(0x7fffffffffffffffLL);
}

template <typename T>
__device__ __forceinline__ T tt_max(T a, T b) { return a > b ? a : b; }

// Sum / max over the 32 lanes of a warp; every lane gets the result.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
    for (int offset = 16; offset > 0; offset >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
    for (int offset = 16; offset > 0; offset >>= 1)
        v = tt_max(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}
"""

# The C++ type of each array dtype the kernels accept.
_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}

WARP = 32
ROW_THREADS = 256                    # threads per block for one-warp-per-row kernels
ROWS_PER_BLOCK = ROW_THREADS // WARP  # rows handled by one such block
FLAT_BLOCK = 256                     # threads per block for grid-stride elementwise kernels
MAX_FLAT_GRID = 65535                # grid-stride loops cover anything beyond this
TILE_ROWS = 8                        # blockDim.y of the column-reduction kernels (blockDim.x = 32)


def ctype(dtype):
    """'float' or 'double' for a float32/float64 dtype; a clear error for anything else."""
    dtype = np.dtype(dtype)
    if dtype not in _CTYPES:
        raise TypeError(f"the CUDA kernels support float32 and float64 arrays, got {dtype}")
    return _CTYPES[dtype]


def instantiate(name, *template_args):
    """The name expression of one template instantiation, e.g. 'layer_norm_fwd<float>'.

    The same string is used to compile (name_expressions) and to look the kernel up, so
    build both with this function.
    """
    return f"{name}<{', '.join(template_args)}>"


class KernelFamily:
    """One CUDA source and the instantiations it needs, compiled lazily on first use."""

    registry = []   # every family declared, in import order (for compile_all and tests)

    def __init__(self, name, source, name_expressions):
        self.name = name
        self.body = source                  # the family's own kernels
        self.source = HEADER + source       # what is compiled
        self.name_expressions = list(name_expressions)
        self._module = None
        self._module_cp = None              # the cupy module (or a test's stand-in) it is for
        KernelFamily.registry.append(self)

    def function(self, expression):
        """The compiled kernel for one name expression (compiles the family on first call)."""
        if expression not in self.name_expressions:
            raise KeyError(f"kernel family {self.name!r} has no instantiation {expression!r}")
        cp = _require_cupy()
        if self._module is None or self._module_cp is not cp:  # compiled for this cupy
            self._module = cp.RawModule(code=self.source, options=("-std=c++17",),
                                        name_expressions=self.name_expressions)
            self._module_cp = cp
        return self._module.get_function(expression)

    def compile(self):
        """Compile every instantiation now (keeps compilation out of timed regions)."""
        for expression in self.name_expressions:
            self.function(expression)


def _require_cupy():
    if backend.cp is None:
        raise RuntimeError("the CUDA kernels need cupy: pip install cupy-cuda12x (or "
                           "cupy-cuda13x for CUDA 13 drivers) on a machine with an NVIDIA GPU")
    return backend.cp


def scalar(value, dtype):
    """A Python number as the NumPy scalar type the kernel parameter expects."""
    return np.dtype(dtype).type(value)


def row_grid(rows):
    """(grid, block) for one warp per row."""
    return ((rows + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK,), (ROW_THREADS,)


def flat_grid(n):
    """(grid, block) for a grid-stride loop over n elements."""
    blocks = max(1, min((n + FLAT_BLOCK - 1) // FLAT_BLOCK, MAX_FLAT_GRID))
    return (blocks,), (FLAT_BLOCK,)


def column_chunks(rows, target_chunks=128):
    """Rows per chunk and chunk count for the column-reduction kernels.

    Each block sums a 32-column stripe over one chunk of rows into a (chunks, C) buffer of
    partial sums; summing that buffer over its first axis gives the column sums, in the
    same order every run (no atomics, so results are deterministic).
    """
    per_chunk = max(TILE_ROWS, -(-rows // target_chunks))
    return per_chunk, max(1, -(-rows // per_chunk))


def contiguous(a, dtype=None):
    """A C-contiguous cupy array (no copy when `a` already is one of that dtype)."""
    return backend.cp.ascontiguousarray(a, dtype=dtype)
