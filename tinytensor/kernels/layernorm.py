"""Layer norm's faster versions; the reference is tinytensor.fused.LayerNorm.

    CUDALayerNorm    CUDA kernels: one warp per row; the weight and bias gradients summed
                     over chunks of rows, the chunks added in a fixed order
    NumbaLayerNorm   compiled CPU loops (kernels/_numba.py), rows split over threads

Both see x as a matrix (N, D) of N rows of D normalised elements and keep the rows' means and
reciprocal standard deviations (N,) for backward instead of the normalised input.
"""
import math

import numpy as np

from .. import backend, fused
from . import _cuda, cuda_floats, numba_loops, numpy_floats, threads

SOURCE = r"""
// One warp per row of x (rows, C).
template <typename T>
__global__ void layer_norm_fwd(const T* __restrict__ x, const T* __restrict__ w,
                               const T* __restrict__ b, T* __restrict__ y,
                               T* __restrict__ mean, T* __restrict__ rstd,
                               long long rows, int C, T eps) {
    const long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    const int lane = threadIdx.x % 32;
    const T* xr = x + row * C;
    T* yr = y + row * C;

    T s = 0;
    for (int j = lane; j < C; j += 32) s += xr[j];
    const T mu = warp_sum(s) / C;
    T ss = 0;                                      // two passes: no cancellation in var
    for (int j = lane; j < C; j += 32) { const T d = xr[j] - mu; ss += d * d; }
    const T r = T(1) / tt_sqrt(warp_sum(ss) / C + eps);
    for (int j = lane; j < C; j += 32) yr[j] = (xr[j] - mu) * r * w[j] + b[j];
    if (lane == 0) { mean[row] = mu; rstd[row] = r; }
}

// One warp per row: the input gradient.
template <typename T>
__global__ void layer_norm_bwd_x(const T* __restrict__ gy, const T* __restrict__ x,
                                 const T* __restrict__ w, const T* __restrict__ mean,
                                 const T* __restrict__ rstd, T* __restrict__ gx,
                                 long long rows, int C) {
    const long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    const int lane = threadIdx.x % 32;
    const T* xr = x + row * C;
    const T* gyr = gy + row * C;
    T* gxr = gx + row * C;
    const T mu = mean[row], r = rstd[row];

    T sg = 0, sgx = 0;                             // sum(g), sum(g * xhat)
    for (int j = lane; j < C; j += 32) {
        const T g = gyr[j] * w[j];
        sg += g;
        sgx += g * ((xr[j] - mu) * r);
    }
    sg = warp_sum(sg) / C;
    sgx = warp_sum(sgx) / C;
    for (int j = lane; j < C; j += 32) {
        const T g = gyr[j] * w[j];
        gxr[j] = (g - sg - (xr[j] - mu) * r * sgx) * r;
    }
}

// Partial column sums of gy * xhat and gy: block (32, 8) covers a 32-column stripe of one
// chunk of rows; row chunk blockIdx.y writes row blockIdx.y of pw and pb (chunks, C).
template <typename T>
__global__ void layer_norm_bwd_wb(const T* __restrict__ gy, const T* __restrict__ x,
                                  const T* __restrict__ mean, const T* __restrict__ rstd,
                                  T* __restrict__ pw, T* __restrict__ pb,
                                  long long rows, int C, long long rows_per_chunk) {
    __shared__ T tile_w[8][33];
    __shared__ T tile_b[8][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    const long long r0 = (long long)blockIdx.y * rows_per_chunk;
    const long long r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
    T aw = 0, ab = 0;
    if (c < C) {
        for (long long r = r0 + threadIdx.y; r < r1; r += 8) {
            const T g = gy[r * C + c];
            aw += g * ((x[r * C + c] - mean[r]) * rstd[r]);
            ab += g;
        }
    }
    tile_w[threadIdx.y][threadIdx.x] = aw;
    tile_b[threadIdx.y][threadIdx.x] = ab;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        for (int k = 1; k < 8; ++k) { aw += tile_w[k][threadIdx.x]; ab += tile_b[k][threadIdx.x]; }
        pw[(long long)blockIdx.y * C + c] = aw;
        pb[(long long)blockIdx.y * C + c] = ab;
    }
}
"""

_FWD, _BWD_X, _BWD_WB = "layer_norm_fwd", "layer_norm_bwd_x", "layer_norm_bwd_wb"
FAMILY = _cuda.KernelFamily(
    "layer_norm", SOURCE,
    [_cuda.instantiate(k, t) for k in (_FWD, _BWD_X, _BWD_WB) for t in ("float", "double")])


def _check(x, w, b):
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"layer_norm input must have shape (..., C) with C > 0, got {x.shape}")
    if x.dtype.kind != "f":
        raise TypeError(f"layer_norm input must be floating point, got dtype {x.dtype}")
    C = x.shape[-1]
    for name, p in (("weight", w), ("bias", b)):
        if p is not None and tuple(p.shape) != (C,):
            raise ValueError(f"layer_norm {name} must have shape ({C},), got {tuple(p.shape)}")


def _check_backward(gy, x, mean, rstd):
    if gy.shape != x.shape:
        raise ValueError(f"layer_norm gradient shape {gy.shape} != input shape {x.shape}")
    for name, a in (("mean", mean), ("rstd", rstd)):
        if a.shape != x.shape[:-1]:
            raise ValueError(f"layer_norm {name} must have shape {x.shape[:-1]}, got {a.shape}")


def _forward_cuda(x, w, b, eps):
    cp = backend.cp
    x = _cuda.contiguous(x)
    C = x.shape[-1]
    rows = x.size // C
    y = cp.empty_like(x)
    mean = cp.empty(x.shape[:-1], dtype=x.dtype)
    rstd = cp.empty(x.shape[:-1], dtype=x.dtype)
    if rows:
        kernel = FAMILY.function(_cuda.instantiate(_FWD, _cuda.ctype(x.dtype)))
        grid, block = _cuda.row_grid(rows)
        kernel(grid, block, (x, _filled(w, 1, C, x), _filled(b, 0, C, x), y, mean,
                             rstd, np.int64(rows), np.int32(C), _cuda.scalar(eps, x.dtype)))
    return y, mean, rstd


def _backward_cuda(gy, x, w, mean, rstd):
    cp = backend.cp
    x = _cuda.contiguous(x)
    gy, mean, rstd = (_cuda.contiguous(a, x.dtype) for a in (gy, mean, rstd))
    C = x.shape[-1]
    rows = x.size // C
    ct = _cuda.ctype(x.dtype)
    gx = cp.empty_like(x)
    if rows == 0:
        return gx, cp.zeros(C, x.dtype), cp.zeros(C, x.dtype)
    grid, block = _cuda.row_grid(rows)
    FAMILY.function(_cuda.instantiate(_BWD_X, ct))(
        grid, block, (gy, x, _filled(w, 1, C, x), mean, rstd, gx, np.int64(rows),
                      np.int32(C)))
    per_chunk, chunks = _cuda.column_chunks(rows)
    pw = cp.empty((chunks, C), dtype=x.dtype)
    pb = cp.empty((chunks, C), dtype=x.dtype)
    FAMILY.function(_cuda.instantiate(_BWD_WB, ct))(
        ((C + 31) // 32, chunks), (32, _cuda.TILE_ROWS),
        (gy, x, mean, rstd, pw, pb, np.int64(rows), np.int32(C), np.int64(per_chunk)))
    return gx, pw.sum(axis=0), pb.sum(axis=0)


def layer_norm_forward_cuda(x, w, b, eps=1e-5):
    """(y, mean, rstd) of layer norm over the last axis of the cupy array x (..., C)."""
    _check(x, w, b)
    return _forward_cuda(x, w, b, eps)


def layer_norm_backward_cuda(gy, x, w, mean, rstd):
    """(gx, gw, gb) from the output gradient gy and the forward's x, w, mean, rstd (cupy)."""
    _check(x, w, None)
    _check_backward(gy, x, mean, rstd)
    return _backward_cuda(gy, x, w, mean, rstd)


# ------------------------------------------------------------------ compiled CPU loops
def layer_norm_forward_numba(x, w, b, eps=1e-5):
    """(y, mean, rstd) of layer norm over the last axis of x (N, D); w, b (D,) or None."""
    loops = numba_loops()
    x = np.ascontiguousarray(x)
    n, d = x.shape
    y = np.empty_like(x)
    mean = np.empty(n, dtype=x.dtype)
    rstd = np.empty(n, dtype=x.dtype)
    w, b = _filled(w, 1, d, x), _filled(b, 0, d, x)
    threads.rows(n, lambda r0, r1: loops.layer_norm_forward(
        x[r0:r1], w, b, float(eps), y[r0:r1], mean[r0:r1], rstd[r0:r1]), x.size)
    return y, mean, rstd


def layer_norm_backward_numba(gy, x, w, mean, rstd):
    """(gx, gw, gb) from the output gradient gy (N, D) and the forward's x, w, mean, rstd;
    gw and gb (D,) in x's dtype, summed in float64."""
    loops = numba_loops()
    x, gy = np.ascontiguousarray(x), np.ascontiguousarray(gy)
    w = _filled(w, 1, x.shape[1], x)
    gx = np.empty_like(x)
    gw, gb = threads.column_sums_by_block(x.shape, 2, lambda s, e, part: loops.layer_norm_backward(
        gy[s:e], x[s:e], w, mean[s:e], rstd[s:e], gx[s:e], part[0], part[1]))
    return gx, gw.astype(x.dtype), gb.astype(x.dtype)


def _filled(p, fill, d, like):
    """The weight or bias p as a C-contiguous array of like's dtype on like's device, or (d,) of
    `fill` when it is absent (the kernels always scale and shift)."""
    xp = backend.get_array_module(like)
    return xp.full(d, fill, dtype=like.dtype) if p is None else xp.ascontiguousarray(p, dtype=like.dtype)


# ------------------------------------------------------------------ the versions
class _RowsLayerNorm(fused.LayerNorm):
    """fused.LayerNorm by a pair of kernels over rows: forward_rows(x (N, D), w, b, eps) ->
    (y, mean, rstd) and backward_rows(gy, x, w, mean, rstd) -> (gx, gw, gb), for the arrays
    that arrays_ok(x, w, b) accepts."""

    @classmethod
    def takes(cls, x, w=None, b=None, nd=1, eps=1e-5):
        return x.size > 0 and cls.arrays_ok(x, w, b)

    def forward(self, x, w=None, b=None, nd=1, eps=1e-5):
        d = math.prod(x.shape[x.ndim - nd:])
        self.shape, self.param_shape = x.shape, x.shape[x.ndim - nd:]
        self.x2, self.wv = x.reshape(-1, d), None if w is None else w.reshape(d)   # (N, D), (D,)
        y, self.mean, self.rstd = self.forward_rows(self.x2, self.wv,
                                                    None if b is None else b.reshape(d), eps)
        return y.reshape(x.shape)

    def backward(self, gy):
        gx, gw, gb = self.backward_rows(gy.reshape(self.x2.shape), self.x2, self.wv, self.mean,
                                        self.rstd)
        needs = self.needs_grad
        return (gx.reshape(self.shape) if needs[0] else None,
                gw.reshape(self.param_shape) if needs[1] else None,
                gb.reshape(self.param_shape) if needs[2] else None)


class CUDALayerNorm(_RowsLayerNorm):
    device = "cuda"
    arrays_ok = staticmethod(cuda_floats)
    forward_rows = staticmethod(layer_norm_forward_cuda)
    backward_rows = staticmethod(layer_norm_backward_cuda)


class NumbaLayerNorm(_RowsLayerNorm):
    device = "cpu"
    arrays_ok = staticmethod(lambda *a: numpy_floats(*a) and numba_loops() is not None)
    forward_rows = staticmethod(layer_norm_forward_numba)
    backward_rows = staticmethod(layer_norm_backward_numba)


VERSIONS = {"LayerNorm": [CUDALayerNorm, NumbaLayerNorm]}
