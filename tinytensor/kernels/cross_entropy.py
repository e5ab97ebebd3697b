"""Softmax cross-entropy of logits against integer targets, forward and backward.

    forward:  lse_n  = log(sum_c exp(x_nc))                     (saved for the backward)
              loss_n = lse_n - x_n,t_n     (0 where t_n == ignore_index; computed as
                                            (max_n - x_n,t_n) + log(sum_c exp(x_nc - max_n)),
                                            exact where logits are large, as torch's)
    backward: gx_nc  = (softmax(x_n)_c - [c == t_n]) * scale_n   (0 where ignored)

logits x (N, C), targets t (N,) integers, loss and lse (N,). `scale` is the gradient of
each row's loss: a number (e.g. 1 / number of counted rows for a mean) or an (N,) array (the
incoming gradient of reduction='none'); on the GPU it may also be a 0-d device array, so a
mean's 1/count never has to visit the host. The backward recomputes the softmax from the
logits (row max and sum; exp(x - lse) would lose digits for large logits) instead of keeping
an (N, C) probability array alive between forward and backward; lse is checked, not read.

Targets outside [0, C) other than ignore_index raise in the NumPy reference; the CUDA
kernel cannot raise without a host round-trip, so it returns a NaN loss for such rows.

Each CuPy kernel sits beside its NumPy reference with the same signature; the unsuffixed
functions dispatch on the array type.
"""
import numpy as np

from .. import backend
from . import _cuda

SOURCE = r"""
// The max of a row of C logits and log(sum_j exp(x_j - max)), over the 32 lanes of a warp.
template <typename T>
__device__ __forceinline__ void row_max_log_sum(const T* xr, int C, int lane, T& m, T& log_s) {
    m = tt_neg_inf(T(0));
    for (int j = lane; j < C; j += 32) m = tt_max(m, xr[j]);
    m = warp_max(m);
    T s = 0;
    for (int j = lane; j < C; j += 32) s += tt_exp(xr[j] - m);
    log_s = tt_log(warp_sum(s));
}

// One warp per row of logits (N, C).
template <typename T>
__global__ void cross_entropy_fwd(const T* __restrict__ x, const long long* __restrict__ t,
                                  T* __restrict__ loss, T* __restrict__ lse,
                                  long long rows, int C, long long ignore_index) {
    const long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    const int lane = threadIdx.x % 32;
    const T* xr = x + row * C;

    T m, log_s;
    row_max_log_sum(xr, C, lane, m, log_s);
    const T l = m + log_s;
    if (lane == 0) {
        const long long target = t[row];
        lse[row] = l;
        if (target == ignore_index) loss[row] = T(0);
        else if (target < 0 || target >= C) loss[row] = tt_nan(l);
        else loss[row] = (m - xr[target]) + log_s;  // not l - x: l ~ m loses digits
    }
}

// One warp per row. scale_mode 0: every row's scale is `scale`; 1: scale_ptr[0] (a device
// scalar); 2: scale_ptr[row]. The row's max and sum are recomputed from x rather than taken
// from lse: exp(x - lse) loses digits when the logits are large (lse ~ x ~ 1e4 in float32
// has an ulp of 1e-3), exp((x - max) - log(sum)) does not. lse is not read.
template <typename T>
__global__ void cross_entropy_bwd(const T* __restrict__ x, const long long* __restrict__ t,
                                  const T* __restrict__ lse, T* __restrict__ gx,
                                  long long rows, int C, long long ignore_index,
                                  T scale, const T* __restrict__ scale_ptr, int scale_mode) {
    const long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    const int lane = threadIdx.x % 32;
    const T* xr = x + row * C;
    T* gr = gx + row * C;
    const long long target = t[row];
    if (target == ignore_index) {           // the whole warp leaves together
        for (int j = lane; j < C; j += 32) gr[j] = T(0);
        return;
    }
    T m, log_s;
    row_max_log_sum(xr, C, lane, m, log_s);
    const T sc = scale_mode == 0 ? scale : scale_ptr[scale_mode == 1 ? 0 : row];
    for (int j = lane; j < C; j += 32)
        gr[j] = (tt_exp((xr[j] - m) - log_s) - (j == target ? T(1) : T(0))) * sc;
}
"""

_FWD, _BWD = "cross_entropy_fwd", "cross_entropy_bwd"
FAMILY = _cuda.KernelFamily(
    "cross_entropy", SOURCE,
    [_cuda.instantiate(k, t) for k in (_FWD, _BWD) for t in ("float", "double")])


def _check(logits, targets):
    if logits.ndim != 2 or logits.shape[1] == 0:
        raise ValueError(f"cross_entropy logits must have shape (N, C) with C > 0, "
                         f"got {logits.shape}")
    if logits.dtype.kind != "f":
        raise TypeError(f"cross_entropy logits must be floating point, got dtype {logits.dtype}")
    if targets.shape != (logits.shape[0],):
        raise ValueError(f"cross_entropy targets must have shape ({logits.shape[0]},), "
                         f"got {targets.shape}")
    if targets.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy targets must be integers, got dtype {targets.dtype}")


def _check_lse(logits, lse):
    if lse.shape != (logits.shape[0],):
        raise ValueError(f"cross_entropy lse must have shape ({logits.shape[0]},), got {lse.shape}")


def _valid_targets(targets, C, ignore_index):
    """(valid rows mask, targets with ignored rows pointed at class 0), after a range check."""
    valid = targets != ignore_index
    bad = valid & ((targets < 0) | (targets >= C))
    if bad.any():
        t = int(targets[np.argmax(bad)])
        raise IndexError(f"cross_entropy target {t} is out of range for {C} classes "
                         f"(and is not ignore_index={ignore_index})")
    return valid, np.where(valid, targets, 0)


# ------------------------------------------------------------------ NumPy references
def cross_entropy_forward_ref(logits, targets, ignore_index=-100):
    """(loss (N,), lse (N,)): per-row negative log-likelihood and the log-sum-exp."""
    _check(logits, targets)
    N, C = logits.shape
    valid, t = _valid_targets(targets, C, ignore_index)
    m = logits.max(axis=1)                        # (N,)
    e = logits - m[:, None]                       # (N, C)
    np.exp(e, out=e)
    log_s = np.log(e.sum(axis=1))
    loss = (m - logits[np.arange(N), t]) + log_s  # not lse - x: lse ~ m loses digits
    lse = log_s + m
    loss[~valid] = 0
    return loss, lse


def cross_entropy_backward_ref(logits, targets, lse, scale, ignore_index=-100):
    """gx (N, C) = (softmax(logits) - onehot(targets)) * scale per row; ignored rows 0."""
    _check(logits, targets)
    _check_lse(logits, lse)
    N, C = logits.shape
    valid, t = _valid_targets(targets, C, ignore_index)
    row_scale = _row_scale(np.asarray(scale, dtype=logits.dtype), N)   # (N,)
    gx = logits - logits.max(axis=1, keepdims=True)   # (N, C); not logits - lse, which loses
    np.exp(gx, out=gx)                                # digits for large logits (as the kernel)
    gx /= gx.sum(axis=1, keepdims=True)
    gx[np.arange(N), t] -= 1
    gx *= np.where(valid, row_scale, 0)[:, None]
    return gx


def _row_scale(scale, N):
    if scale.ndim == 0:
        return np.broadcast_to(scale, (N,))
    if scale.shape != (N,):
        raise ValueError(f"cross_entropy scale must be a number or have shape ({N},), "
                         f"got {scale.shape}")
    return scale


# ------------------------------------------------------------------ CuPy kernels
def _forward_cuda(logits, targets, ignore_index):
    cp = backend.cp
    x = _cuda.contiguous(logits)
    t = _cuda.contiguous(targets, np.int64)
    N, C = x.shape
    loss = cp.empty(N, dtype=x.dtype)
    lse = cp.empty(N, dtype=x.dtype)
    if N:
        kernel = FAMILY.function(_cuda.instantiate(_FWD, _cuda.ctype(x.dtype)))
        grid, block = _cuda.row_grid(N)
        kernel(grid, block, (x, t, loss, lse, np.int64(N), np.int32(C), np.int64(ignore_index)))
    return loss, lse


def _backward_cuda(logits, targets, lse, scale, ignore_index):
    cp = backend.cp
    x = _cuda.contiguous(logits)
    t = _cuda.contiguous(targets, np.int64)
    lse = _cuda.contiguous(lse, x.dtype)
    N, C = x.shape
    gx = cp.empty_like(x)
    if backend.is_cuda(scale):
        scale_ptr = _cuda.contiguous(scale, x.dtype)
        if scale_ptr.ndim == 0 or scale_ptr.shape == (1,):
            mode = 1
        elif scale_ptr.shape == (N,):
            mode = 2
        else:
            raise ValueError(f"cross_entropy scale must be a number or have shape ({N},), "
                             f"got {scale_ptr.shape}")
        value = 0.0
    elif np.ndim(scale) == 0:
        scale_ptr, mode, value = lse, 0, float(scale)   # lse: any valid pointer, unread
    else:
        _row_scale(np.asarray(scale), N)              # raises on a wrong shape
        scale_ptr, mode, value = cp.asarray(scale, dtype=x.dtype), 2, 0.0
    if x.size:
        kernel = FAMILY.function(_cuda.instantiate(_BWD, _cuda.ctype(x.dtype)))
        grid, block = _cuda.row_grid(N)
        kernel(grid, block, (x, t, lse, gx, np.int64(N), np.int32(C),
                             np.int64(ignore_index), _cuda.scalar(value, x.dtype), scale_ptr,
                             np.int32(mode)))
    return gx


# ------------------------------------------------------------------ dispatch
def cross_entropy_forward(logits, targets, ignore_index=-100):
    """(loss (N,), lse (N,)): the CUDA kernel for cupy logits, else the NumPy reference."""
    if backend.is_cuda(logits):
        _check(logits, targets)
        return _forward_cuda(logits, targets, ignore_index)
    return cross_entropy_forward_ref(logits, targets, ignore_index)


def cross_entropy_backward(logits, targets, lse, scale, ignore_index=-100):
    """gx (N, C) on the device of the logits."""
    if backend.is_cuda(logits):
        _check(logits, targets)
        _check_lse(logits, lse)
        return _backward_cuda(logits, targets, lse, scale, ignore_index)
    return cross_entropy_backward_ref(logits, targets, lse, scale, ignore_index)
