"""The linear layers' faster versions; the references are tinytensor.fused.Linear and
fused.LinearReLU (y = x @ w.T + b, and relu of it).

    CUDALinearReLU   the bias, ReLU (and optionally dropout) in one CUDA kernel after cuBLAS's
                     product; backward the ReLU's gradient and the bias gradient in one kernel
    NumbaLinearReLU  the same two passes as compiled CPU loops, rows split over threads
    NumbaLinear      the bias added by a compiled loop (NumPy broadcasts slowly over short
                     rows); the bias gradient as BLAS's product of a vector of ones

On the CPU both multiply through matmul(): with Intel MKL where kernels/mkl.py says so (by
default where the `mkl` wheel is installed and the CPU is Intel's), else with NumPy. The
product of few rows (up to SMALL_ROWS: generation's one position per sequence) is NumPy's
(w @ x.T).T: OpenBLAS runs x @ w.T, whose second operand is transposed, 2-4x slower there (8
rows: 36 against 22 us at (128 -> 384), 231 against 123 us at (384 -> 1536)), and the slower
one from 64 rows on (product()). MKL multiplies only products of MKL_MIN_ROWS rows and more:
on an Intel Xeon, generation with MKL for every product ran at 0.8x the speed (one row: 10
against 3.3 us; MKL's OpenMP threads and OpenBLAS's then also take turns on the cores), and
with it from 256 rows on, recomputing the context of 8 sequences ran at 0.85x.

The CUDA kernel, bias + ReLU + inverted dropout in one pass:

    forward:  y  = relu(x + b) * keep / (1 - p)
    backward: gx = gy / (1 - p) where y > 0, else 0;   gb = sum of gx over leading axes

x, y, gy, gx have shape (..., C) and b, gb (C,). `u` says which elements dropout keeps: None
(no dropout: p must be 0), a bool keep-mask shaped like x, or uniform random numbers in [0, 1)
shaped like x, kept where u >= p (the rule of fused.keep_mask). With p == 1 everything is
dropped. The backward needs only the output: y > 0 exactly where x + b > 0 and the element was
kept, so no mask is stored. CUDALinearReLU runs it with p = 0.
"""
import numpy as np

from .. import backend, fused
from . import _cuda, cuda_floats, mkl, numba_loops, numpy_floats, threads

SOURCE = r"""
__device__ __forceinline__ bool tt_keep(bool keep, double) { return keep; }
__device__ __forceinline__ bool tt_keep(float u, double p) { return u >= (float)p; }
__device__ __forceinline__ bool tt_keep(double u, double p) { return u >= p; }

// Grid-stride loop over x (rows, C) flattened. U is the type of u (bool keep-mask or
// uniform floats); DROP false ignores u entirely (no dropout).
template <typename T, typename U, bool DROP>
__global__ void bias_relu_dropout_fwd(const T* __restrict__ x, const T* __restrict__ b,
                                      const U* __restrict__ u, T* __restrict__ y,
                                      long long n, int C, double p, T scale) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const T v = x[i] + b[i % C];
        const T r = v <= T(0) ? T(0) : v;          // relu; NaN stays NaN, as np.maximum(v, 0)
        const bool keep = DROP ? tt_keep(u[i], p) : true;
        y[i] = r * (keep ? scale : T(0));          // a dropped NaN stays NaN, as NaN * 0
    }
}

// gx = y > 0 ? gy * scale : 0, plus partial column sums of gx (the bias gradient): block
// (32, 8) covers a 32-column stripe of one chunk of rows and writes row blockIdx.y of
// partial (chunks, C).
template <typename T>
__global__ void bias_relu_dropout_bwd(const T* __restrict__ gy, const T* __restrict__ y,
                                      T* __restrict__ gx, T* __restrict__ partial,
                                      long long rows, int C, long long rows_per_chunk,
                                      T scale) {
    __shared__ T tile[8][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    const long long r0 = (long long)blockIdx.y * rows_per_chunk;
    const long long r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
    T acc = 0;
    if (c < C) {
        for (long long r = r0 + threadIdx.y; r < r1; r += 8) {
            const long long i = r * C + c;
            const T gi = y[i] > T(0) ? gy[i] * scale : T(0);
            gx[i] = gi;
            acc += gi;
        }
    }
    tile[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        for (int k = 1; k < 8; ++k) acc += tile[k][threadIdx.x];
        partial[(long long)blockIdx.y * C + c] = acc;
    }
}
"""

_FWD, _BWD = "bias_relu_dropout_fwd", "bias_relu_dropout_bwd"


def _fwd_name(t, u, drop):
    return _cuda.instantiate(_FWD, t, u, "true" if drop else "false")


FAMILY = _cuda.KernelFamily(
    "bias_relu_dropout", SOURCE,
    [_fwd_name(t, t, False) for t in ("float", "double")]
    + [_fwd_name(t, u, True) for t in ("float", "double") for u in ("bool", "float", "double")]
    + [_cuda.instantiate(_BWD, t) for t in ("float", "double")])

_U_CTYPES = {np.dtype(bool): "bool", np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


def _scale(p):
    """1 / (1 - p), and 0 for p == 1 (every element dropped)."""
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    return 0.0 if p == 1.0 else 1.0 / (1.0 - p)


def _check(x, b, p, u):
    if x.ndim < 1 or x.dtype.kind != "f":
        raise ValueError(f"bias_relu_dropout input must be a floating-point (..., C) array, "
                         f"got shape {x.shape} dtype {x.dtype}")
    if tuple(b.shape) != (x.shape[-1],):
        raise ValueError(f"bias_relu_dropout bias must have shape ({x.shape[-1]},), "
                         f"got {tuple(b.shape)}")
    _scale(p)
    if u is None:
        if p != 0:
            raise ValueError(f"bias_relu_dropout with p={p} needs u (a keep-mask or uniform "
                             f"random numbers shaped like x)")
    elif u.shape != x.shape or np.dtype(u.dtype) not in _U_CTYPES:
        raise ValueError(f"bias_relu_dropout u must be a bool or float array of shape {x.shape}, "
                         f"got {u.shape} {u.dtype}")


def _check_backward(gy, y):
    if gy.shape != y.shape:
        raise ValueError(f"bias_relu_dropout gradient shape {gy.shape} != output shape {y.shape}")


# ------------------------------------------------------------------ CuPy kernels
def _forward_cuda(x, b, p, u):
    cp = backend.cp
    x = _cuda.contiguous(x)
    b = _cuda.contiguous(b, x.dtype)
    y = cp.empty_like(x)
    if x.size == 0:
        return y
    t = _cuda.ctype(x.dtype)
    if u is None:
        name, u = _fwd_name(t, t, False), x          # u is not read
    else:
        u = _cuda.contiguous(u)
        name = _fwd_name(t, _U_CTYPES[np.dtype(u.dtype)], True)
    grid, block = _cuda.flat_grid(x.size)
    FAMILY.function(name)(grid, block, (x, b, u, y, np.int64(x.size), np.int32(x.shape[-1]),
                                        np.float64(p), _cuda.scalar(_scale(p), x.dtype)))
    return y


def _backward_cuda(gy, y, p):
    cp = backend.cp
    y = _cuda.contiguous(y)
    gy = _cuda.contiguous(gy, y.dtype)
    C = y.shape[-1]
    rows = y.size // C if C else 0
    gx = cp.empty_like(y)
    if rows == 0:
        return gx, cp.zeros(C, dtype=y.dtype)
    per_chunk, chunks = _cuda.column_chunks(rows)
    partial = cp.empty((chunks, C), dtype=y.dtype)
    FAMILY.function(_cuda.instantiate(_BWD, _cuda.ctype(y.dtype)))(
        ((C + 31) // 32, chunks), (32, _cuda.TILE_ROWS),
        (gy, y, gx, partial, np.int64(rows), np.int32(C), np.int64(per_chunk),
         _cuda.scalar(_scale(p), y.dtype)))
    return gx, partial.sum(axis=0)


def bias_relu_dropout_forward_cuda(x, b, p=0.0, u=None):
    """y = dropout(relu(x + b)) of the cupy array x (..., C)."""
    _check(x, b, p, u)
    return _forward_cuda(x, b, p, u)


def bias_relu_dropout_backward_cuda(gy, y, p=0.0):
    """(gx, gb) from the output gradient gy and the forward output y (cupy)."""
    _check_backward(gy, y)
    return _backward_cuda(gy, y, p)


# ------------------------------------------------------------------ compiled CPU loops
def bias_relu_numba(y, b):
    """y = relu(y + b) over the rows of y (N, D), in place; b (D,) or None."""
    loops = numba_loops()
    b = np.zeros(y.shape[1], y.dtype) if b is None else np.ascontiguousarray(b)
    threads.rows(len(y), lambda r0, r1: loops.bias_relu_(y[r0:r1], b), y.size)
    return y


def relu_backward_numba(gy, y, need_bias=True):
    """(g, gb): g = gy * (y > 0) for the ReLU's output y (N, D), and g's column sums (D,)
    (None unless need_bias)."""
    loops = numba_loops()
    gy, y = np.ascontiguousarray(gy), np.ascontiguousarray(y)
    g = np.empty_like(y)
    (gb,) = threads.column_sums_by_block(y.shape, 1, lambda s, e, part: loops.relu_backward(
        gy[s:e], y[s:e], g[s:e], part[0]))
    return g, (gb.astype(y.dtype) if need_bias else None)


def add_bias_numba(y, b):
    """y += b over the rows of y (N, D), in place (y C-contiguous)."""
    loops = numba_loops()
    b = np.ascontiguousarray(b)
    threads.rows(len(y), lambda r0, r1: loops.add_bias_(y[r0:r1], b), y.size)


# ------------------------------------------------------------------ the versions
SMALL_ROWS = 32  # product() turns the product around up to this many rows
# matmul() hands MKL products of this many rows (its first operand's) and more: a training
# step's (the small preset's 768, the lecture's 16,384), where it pays; generation's (1 to
# batch x block) stay NumPy's, as MKL made them slower there (see the top of this module)
MKL_MIN_ROWS = 512


def matmul(a, b, ta=False, tb=False):
    """op(a) @ op(b), op(x) being x.T where ta (tb), else x: by MKL where mkl.enabled(), a has
    MKL_MIN_ROWS rows or more and MKL takes the arrays, else by NumPy (or CuPy)."""
    if type(a) is np.ndarray and len(a) >= MKL_MIN_ROWS and mkl.enabled() and mkl.takes(a, b):
        return mkl.product(a, b, ta, tb)
    return (a.T if ta else a) @ (b.T if tb else b)


def product(x2, w):
    """x2 @ w.T for x2 (N, in) and w (out, in), a C-contiguous (N, out) array; for NumPy arrays
    of at most SMALL_ROWS rows computed by NumPy as (w @ x2.T).T (see the top of this module;
    MKL, faster from 64 rows, is slower there: waking its threads costs more than the product),
    else by matmul()."""
    if type(x2) is np.ndarray and len(x2) <= SMALL_ROWS:
        return np.ascontiguousarray((w @ x2.T).T)
    return matmul(x2, w, tb=True)


class _Products:
    """The gradients' two products by matmul() (the forward one is product())."""

    def input_grads(self, g, gb):
        x, w = self.x, self.w
        gx = matmul(g, w).reshape(self.x_shape) if self.wants(0) else None
        gw = matmul(g, x.reshape(-1, x.shape[-1]), ta=True) if self.wants(1) else None
        return gx, gw, gb


class _BiasReLU(_Products, fused.LinearReLU):
    """fused.LinearReLU with the bias and ReLU by bias_relu(y (N, out), b) -> y and their
    gradient by relu_grad(gy, y, need_bias) -> (g, gb)."""

    def forward(self, x, w, b=None):
        self.keep(x, w)
        self.y = self.bias_relu(product(x.reshape(-1, x.shape[-1]), w), b)   # (N, out)
        return self.y.reshape(x.shape[:-1] + (w.shape[0],))            # (..., out)

    def backward(self, gy):
        g, gb = self.relu_grad(gy.reshape(self.y.shape), self.y, self.wants(2))
        return self.input_grads(g, gb if self.wants(2) else None)


class CUDALinearReLU(_BiasReLU):
    device = "cuda"
    bias_relu = staticmethod(bias_relu_dropout_forward_cuda)
    relu_grad = staticmethod(lambda gy, y, need_bias: bias_relu_dropout_backward_cuda(gy, y))

    @staticmethod
    def takes(x, w, b=None):
        return b is not None and cuda_floats(x, w, b)


class NumbaLinearReLU(_BiasReLU):
    device = "cpu"
    bias_relu = staticmethod(bias_relu_numba)
    relu_grad = staticmethod(relu_backward_numba)

    @staticmethod
    def takes(x, w, b=None):
        return numpy_floats(x, w, b) and numba_loops() is not None


class NumbaLinear(_Products, fused.Linear):
    device = "cpu"
    @staticmethod
    def takes(x, w, b=None):
        return numpy_floats(x, w, b) and numba_loops() is not None

    def forward(self, x, w, b=None):
        self.keep(x, w)
        y = product(x.reshape(-1, x.shape[-1]), w)                       # (N, out)
        if b is not None:
            add_bias_numba(y, b)
        return y.reshape(x.shape[:-1] + (w.shape[0],))                   # (..., out)

    def backward(self, gy):
        g = gy.reshape(-1, gy.shape[-1])                                 # (N, out)
        gb = np.ones(len(g), dtype=g.dtype) @ g if self.wants(2) else None   # column sums
        return self.input_grads(g, gb)


VERSIONS = {"LinearReLU": [CUDALinearReLU, NumbaLinearReLU], "Linear": [NumbaLinear]}
