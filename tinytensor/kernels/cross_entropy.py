"""Softmax cross-entropy's faster versions; the reference is tinytensor.fused.CrossEntropy.
Both take logits x (N, C) and integer class indices t (N,), without label smoothing:

    CUDACrossEntropy   CUDA kernels, one warp per row. Forward keeps the row log-sum-exp
                       lse (N,); backward recomputes the softmax from the logits (row max and
                       sum; exp(x - lse) would lose digits for large logits) instead of keeping
                       an (N, C) probability array between forward and backward. The mean's
                       1 / count stays on the device. A target outside [0, C) other than
                       ignore_index cannot raise without a host round-trip: its row's loss is
                       NaN (F.cross_entropy checks the targets before).
    NumbaCrossEntropy  compiled CPU loops, float32: max, shift, exp (vectorised), sum and log
                       in one pass per row; backward from the softmax kept by forward.

    forward:  loss_n = lse_n - x_n,t_n  (0 where t_n == ignore_index; computed as
              (max_n - x_n,t_n) + log(sum_c exp(x_nc - max_n)), exact for large logits)
    backward: gx_nc = (softmax(x_n)_c - [c == t_n]) * scale_n   (0 where ignored)
"""
import numpy as np

from .. import backend, fused
from ..ops._common import mean_grad, reduce_rows
from . import _cuda, cuda_floats, numba_loops, numpy_floats

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


def cross_entropy_forward_cuda(logits, targets, ignore_index=-100):
    """(loss (N,), lse (N,)) of cupy logits (N, C) against class indices targets (N,)."""
    _check(logits, targets)
    return _forward_cuda(logits, targets, ignore_index)


def cross_entropy_backward_cuda(logits, targets, lse, scale, ignore_index=-100):
    """gx (N, C) = (softmax(logits) - onehot(targets)) * scale per row; ignored rows 0. scale:
    a number, or an (N,) or 0-d array (host or device)."""
    _check(logits, targets)
    _check_lse(logits, lse)
    return _backward_cuda(logits, targets, lse, scale, ignore_index)


# ------------------------------------------------------------------ compiled CPU loops
def cross_entropy_forward_numba(x, t, ignore_index=-100):
    """(loss (N,), p (N, C), count) for float32 logits x (N, C) and class indices t (N,): the
    row losses (0 where t == ignore_index), the softmax and the number of rows counted."""
    x = np.ascontiguousarray(x)
    p = np.empty_like(x)
    loss = np.empty(x.shape[0], dtype=x.dtype)
    count = numba_loops().cross_entropy_f32(x, np.ascontiguousarray(t).astype(np.int64, copy=False),
                                            int(ignore_index), p, loss)
    if count < 0:
        raise IndexError(f"cross_entropy target out of range: class indices must be in "
                         f"[0, {x.shape[1]}) or ignore_index={ignore_index}")
    return loss, p, count


def cross_entropy_backward_numba(p, t, ignore_index, scale):
    """The gradient of the logits: scale * (p - onehot(t)) per row (scale (N,), or one value
    for every row), 0 in ignored rows."""
    scale = np.broadcast_to(np.asarray(scale, dtype=p.dtype).reshape(-1), (p.shape[0],))
    gx = np.empty_like(p)
    numba_loops().cross_entropy_backward(p, np.ascontiguousarray(t).astype(np.int64, copy=False),
                                         int(ignore_index), np.ascontiguousarray(scale), gx)
    return gx


# ------------------------------------------------------------------ the versions
def _class_indices(x, t, label_smoothing):
    """Whether the kernels take these arguments: class indices, no label smoothing, C > 0."""
    return t.ndim == 1 and not label_smoothing and x.ndim == 2 and x.shape[1] > 0


class CUDACrossEntropy(fused.CrossEntropy):
    device = "cuda"
    @staticmethod
    def takes(x, t, reduction="mean", ignore_index=-100, label_smoothing=0.0):
        return _class_indices(x, t, label_smoothing) and cuda_floats(x)

    def forward(self, x, t, reduction="mean", ignore_index=-100, label_smoothing=0.0):
        loss, lse = cross_entropy_forward_cuda(x, t, ignore_index)          # (N,), (N,)
        self.saved, self.reduction = (x, t, lse, ignore_index), reduction
        self.count = (t != ignore_index).sum()                               # on the device
        return reduce_rows(loss, reduction, self.count)

    def backward(self, gy):
        scale = mean_grad(gy, self.count) if self.reduction == "mean" else gy
        x, t, lse, ignore_index = self.saved
        return cross_entropy_backward_cuda(x, t, lse, scale, ignore_index), None


class NumbaCrossEntropy(fused.CrossEntropy):
    device = "cpu"
    @staticmethod
    def takes(x, t, reduction="mean", ignore_index=-100, label_smoothing=0.0):
        return (_class_indices(x, t, label_smoothing) and x.dtype == np.float32
                and numpy_floats(x) and numba_loops() is not None)

    def forward(self, x, t, reduction="mean", ignore_index=-100, label_smoothing=0.0):
        loss, self.p, self.count = cross_entropy_forward_numba(x, t, ignore_index)
        self.t, self.ignore_index, self.reduction = t, ignore_index, reduction
        return reduce_rows(loss, reduction, self.count)

    def backward(self, gy):
        scale = mean_grad(gy, self.count) if self.reduction == "mean" else gy
        return cross_entropy_backward_numba(self.p, self.t, self.ignore_index, scale), None


VERSIONS = {"CrossEntropy": [CUDACrossEntropy, NumbaCrossEntropy]}
