"""Bias + ReLU + (inverted) dropout in one pass, forward and backward.

    forward:  y  = relu(x + b) * keep / (1 - p)
    backward: gx = gy / (1 - p) where y > 0, else 0;   gb = sum of gx over leading axes

x, y, gy, gx have shape (..., C) and b, gb (C,). `u` says which elements dropout keeps:
None (no dropout: p must be 0), a bool keep-mask shaped like x, or uniform random numbers in
[0, 1) shaped like x, kept where u >= p (the rule tinytensor.nn.functional.dropout uses, so
the same random draws give the same mask). With p == 1 everything is dropped.

The backward needs only the output: y > 0 exactly where x + b > 0 and the element was kept,
so no mask is stored (y is kept anyway as the next layer's input). This fuses the first half
of the lecture's feed-forward block, Linear(C, 4C) -> ReLU, when the Linear runs without its
bias: fused.LinearReLU calls it on the GPU with p = 0 (the matmul is cuBLAS's). With p > 0 it
also covers a dropout placed right after the ReLU, which the lecture's model does not have.

Each CuPy kernel sits beside its NumPy reference with the same signature; the unsuffixed
functions dispatch on the array type.
"""
import numpy as np

from .. import backend
from . import _cuda

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


# ------------------------------------------------------------------ NumPy references
def bias_relu_dropout_forward_ref(x, b, p=0.0, u=None):
    """y = relu(x + b) * keep / (1 - p); u None, a bool keep-mask, or uniforms (keep u >= p)."""
    _check(x, b, p, u)
    y = x + b
    np.maximum(y, 0, out=y)
    if u is not None:
        y *= u if u.dtype == bool else (u >= float(p))
    scale = _scale(p)
    if scale != 1.0:
        y *= scale
    return y


def bias_relu_dropout_backward_ref(gy, y, p=0.0):
    """(gx, gb) from the output gradient gy and the forward output y."""
    _check_backward(gy, y)
    gx = gy * _scale(p)
    gx *= y > 0
    gb = gx.reshape(-1, gx.shape[-1]).sum(axis=0)   # (N, C) -> (C,)
    return gx, gb


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


# ------------------------------------------------------------------ dispatch
def bias_relu_dropout_forward(x, b, p=0.0, u=None):
    """y = dropout(relu(x + b)): the CUDA kernel for a cupy array, else the NumPy reference."""
    if backend.is_cuda(x):
        _check(x, b, p, u)
        return _forward_cuda(x, b, p, u)
    return bias_relu_dropout_forward_ref(x, b, p, u)


def bias_relu_dropout_backward(gy, y, p=0.0):
    """(gx, gb) on the device of y."""
    if backend.is_cuda(y):
        _check_backward(gy, y)
        return _backward_cuda(gy, y, p)
    return bias_relu_dropout_backward_ref(gy, y, p)
