"""Layer normalisation over the last axis, forward and backward.

    forward:  mean = mean(x), rstd = 1 / sqrt(var(x) + eps)   (biased variance, like torch)
              y = (x - mean) * rstd * w + b
    backward: xhat = (x - mean) * rstd, g = gy * w
              gx = rstd * (g - mean(g) - xhat * mean(g * xhat))
              gw = sum(gy * xhat) and gb = sum(gy) over every leading axis

x, y, gy, gx have shape (..., C); w, b, gw, gb (C,); mean and rstd (...,) — what the
forward returns for the backward to use. w or b may be None (no affine scale or shift).

Each CuPy kernel sits beside its NumPy reference with the same signature; the unsuffixed
functions dispatch on the array type.
"""
import numpy as np

from .. import backend
from . import _cuda

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


# ------------------------------------------------------------------ NumPy references
def layer_norm_forward_ref(x, w, b, eps=1e-5):
    """(y, mean, rstd) of layer norm over the last axis; w, b (C,) or None."""
    _check(x, w, b)
    mean = x.mean(axis=-1)                        # (...,)
    y = x - mean[..., None]                       # (..., C) centred
    var = np.square(y).mean(axis=-1)
    rstd = 1.0 / np.sqrt(var + float(eps))        # (...,)
    y *= rstd[..., None]
    if w is not None:
        y *= w
    if b is not None:
        y += b
    return y, mean, rstd


def layer_norm_backward_ref(gy, x, w, mean, rstd):
    """(gx, gw, gb) from the output gradient gy and the forward's x, w, mean, rstd.

    gw and gb are returned also when the forward had no weight or bias (they are then the
    gradients an all-ones weight / all-zeros bias would get).
    """
    _check(x, w, None)
    _check_backward(gy, x, mean, rstd)
    lead = tuple(range(x.ndim - 1))
    xhat = x - mean[..., None]                    # (..., C)
    xhat *= rstd[..., None]
    gb = gy.sum(axis=lead)
    gyx = gy * xhat
    gw = gyx.sum(axis=lead)
    g = gy * w if w is not None else gy.copy()    # gradient of xhat
    if w is not None:
        gyx *= w                                  # now g * xhat
    gx = g
    gx -= g.mean(axis=-1, keepdims=True)
    gx -= xhat * gyx.mean(axis=-1, keepdims=True)
    gx *= rstd[..., None]
    return gx, gw, gb


# ------------------------------------------------------------------ CuPy kernels
def _affine(p, fill, C, dtype):
    cp = backend.cp
    if p is None:
        return cp.full((C,), fill, dtype=dtype)
    return _cuda.contiguous(p, dtype)


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
        kernel(grid, block, (x, _affine(w, 1, C, x.dtype), _affine(b, 0, C, x.dtype), y, mean,
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
        grid, block, (gy, x, _affine(w, 1, C, x.dtype), mean, rstd, gx, np.int64(rows),
                      np.int32(C)))
    per_chunk, chunks = _cuda.column_chunks(rows)
    pw = cp.empty((chunks, C), dtype=x.dtype)
    pb = cp.empty((chunks, C), dtype=x.dtype)
    FAMILY.function(_cuda.instantiate(_BWD_WB, ct))(
        ((C + 31) // 32, chunks), (32, _cuda.TILE_ROWS),
        (gy, x, mean, rstd, pw, pb, np.int64(rows), np.int32(C), np.int64(per_chunk)))
    return gx, pw.sum(axis=0), pb.sum(axis=0)


# ------------------------------------------------------------------ dispatch
def layer_norm_forward(x, w, b, eps=1e-5):
    """(y, mean, rstd): the CUDA kernel for a cupy array, else the NumPy reference."""
    if backend.is_cuda(x):
        _check(x, w, b)
        return _forward_cuda(x, w, b, eps)
    return layer_norm_forward_ref(x, w, b, eps)


def layer_norm_backward(gy, x, w, mean, rstd):
    """(gx, gw, gb) on the device of x."""
    if backend.is_cuda(x):
        _check(x, w, None)
        _check_backward(gy, x, mean, rstd)
        return _backward_cuda(gy, x, w, mean, rstd)
    return layer_norm_backward_ref(gy, x, w, mean, rstd)
