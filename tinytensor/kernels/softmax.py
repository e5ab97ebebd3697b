"""Causal-masked softmax over attention scores, forward and backward, with the scale folded in.

    forward:  y  = softmax(scale * s) over the last axis, future keys masked out
    backward: gs = scale * y * (gy - sum(gy * y, last axis))

s, y, gy, gs have shape (..., Tq, Tk) with Tq <= Tk — (B, nh, T, T) in training. The Tq
queries are the last Tq of Tk positions: query i sits at position Tk - Tq + i and sees keys
0 .. Tk - Tq + i (with Tq == 1, a cached generation step, it sees every key). The masked
entries of y are exactly 0 and so are those of gs. This replaces the composed
`(q @ k.T * scale).masked_fill(future, -inf).softmax(-1)` of the lecture's attention with
one kernel each way (the contract of tinytensor.fused.CausalSoftmax: fused.causal_softmax_
and fused.causal_softmax_backward_ call these on the GPU, for the standalone op and inside
the attention).

`out` (optional, C-contiguous, of the result's shape and dtype) receives the result and may
be the input itself (s, or gy): the attention computes its softmax in place, without a copy.

Each CuPy kernel sits beside its NumPy reference with the same signature; the unsuffixed
functions dispatch on the array type.
"""
import functools

import numpy as np

from .. import backend
from . import _cuda

SOURCE = r"""
// One warp per row of scores (..., Tq, Tk) laid end to end: row r is query i = r % Tq, which
// sees keys 0 .. Tk - Tq + i.
// y may be s (in place): each element is read, then written, by the same lane, after the
// row's max and sum are complete (the warp reductions synchronise the warp); hence no
// __restrict__ on s and y.
template <typename T>
__global__ void causal_softmax_fwd(const T* s, T* y, long long rows, int Tq, int Tk, T scale) {
    const long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;                       // the whole warp leaves together
    const int lane = threadIdx.x % 32;
    const int last = Tk - Tq + (int)(row % Tq);    // the last key this query sees
    const T* sr = s + row * Tk;
    T* yr = y + row * Tk;

    T m = tt_neg_inf(scale);
    for (int j = lane; j <= last; j += 32) m = tt_max(m, sr[j] * scale);
    m = warp_max(m);
    T sum = 0;
    for (int j = lane; j <= last; j += 32) sum += tt_exp(sr[j] * scale - m);
    sum = warp_sum(sum);
    for (int j = lane; j < Tk; j += 32)
        yr[j] = j <= last ? tt_exp(sr[j] * scale - m) / sum : T(0);
}

// gs may be gy (in place), as y may be s above.
template <typename T>
__global__ void causal_softmax_bwd(const T* __restrict__ y, const T* gy, T* gs,
                                   long long rows, int Tq, int Tk, T scale) {
    const long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    const int lane = threadIdx.x % 32;
    const int last = Tk - Tq + (int)(row % Tq);
    const T* yr = y + row * Tk;
    const T* gyr = gy + row * Tk;
    T* gsr = gs + row * Tk;

    T dot = 0;                                     // sum_j gy_j * y_j over the visible keys
    for (int j = lane; j <= last; j += 32) dot += gyr[j] * yr[j];
    dot = warp_sum(dot);
    for (int j = lane; j < Tk; j += 32)
        gsr[j] = j <= last ? yr[j] * (gyr[j] - dot) * scale : T(0);
}
"""

_FWD, _BWD = "causal_softmax_fwd", "causal_softmax_bwd"
FAMILY = _cuda.KernelFamily(
    "causal_softmax", SOURCE,
    [_cuda.instantiate(k, t) for k in (_FWD, _BWD) for t in ("float", "double")])


def _check_scores(s, what="scores"):
    if s.ndim < 2 or s.shape[-2] > s.shape[-1]:
        raise ValueError(f"causal softmax {what} must have shape (..., Tq, Tk) with Tq <= Tk, "
                         f"got {s.shape}")
    if s.dtype.kind != "f":
        raise TypeError(f"causal softmax {what} must be floating point, got dtype {s.dtype}")


@functools.lru_cache(maxsize=16)
def _future(Tq, Tk):
    """(Tq, Tk) bool mask of the keys each query must not see."""
    return np.triu(np.ones((Tq, Tk), dtype=bool), k=Tk - Tq + 1)


# ------------------------------------------------------------------ NumPy references
def _check_out(out, like, what):
    if out is None:
        return
    if out.shape != like.shape or out.dtype != like.dtype or not out.flags.c_contiguous:
        raise ValueError(f"causal softmax out= must be a C-contiguous {like.dtype} array of the "
                         f"{what}'s shape {like.shape}, got {out.dtype} {out.shape} "
                         f"(contiguous: {out.flags.c_contiguous})")


def causal_softmax_forward_ref(s, scale, out=None):
    """y = softmax(scale * s) over the last axis with future keys masked; s (..., Tq, Tk).
    Written into out when given (which may be s)."""
    _check_scores(s)
    _check_out(out, s, "scores")
    z = s * float(scale) if out is None else np.multiply(s, s.dtype.type(scale), out=out)
    np.copyto(z, -np.inf, where=_future(*s.shape[-2:]))
    z -= z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def causal_softmax_backward_ref(y, gy, scale, out=None):
    """gs = scale * y * (gy - sum(gy * y)); y is the forward output, gy its gradient.
    Written into out when given (which may be gy)."""
    _check_scores(y, "output")
    if gy.shape != y.shape:
        raise ValueError(f"causal softmax gradient shape {gy.shape} != output shape {y.shape}")
    _check_out(out, y, "output")
    dot = (gy * y).sum(axis=-1, keepdims=True)    # (..., T, 1)
    gs = gy - dot if out is None else np.subtract(gy, dot, out=out)
    gs *= y
    gs *= float(scale)
    return gs


# ------------------------------------------------------------------ CuPy kernels
def _forward_cuda(s, scale, out=None):
    s = _cuda.contiguous(s)
    y = backend.cp.empty_like(s) if out is None else out
    Tq, Tk = s.shape[-2:]
    rows = s.size // Tk if Tk else 0
    if rows:
        kernel = FAMILY.function(_cuda.instantiate(_FWD, _cuda.ctype(s.dtype)))
        grid, block = _cuda.row_grid(rows)
        kernel(grid, block, (s, y, np.int64(rows), np.int32(Tq), np.int32(Tk),
                             _cuda.scalar(scale, s.dtype)))
    return y


def _backward_cuda(y, gy, scale, out=None):
    y, gy = _cuda.contiguous(y), _cuda.contiguous(gy, y.dtype)
    gs = backend.cp.empty_like(y) if out is None else out
    Tq, Tk = y.shape[-2:]
    rows = y.size // Tk if Tk else 0
    if rows:
        kernel = FAMILY.function(_cuda.instantiate(_BWD, _cuda.ctype(y.dtype)))
        grid, block = _cuda.row_grid(rows)
        kernel(grid, block, (y, gy, gs, np.int64(rows), np.int32(Tq), np.int32(Tk),
                             _cuda.scalar(scale, y.dtype)))
    return gs


# ------------------------------------------------------------------ dispatch
def causal_softmax_forward(s, scale, out=None):
    """The causal softmax of s (..., Tq, Tk): the CUDA kernel for a cupy array, else NumPy.
    Written into out when given (which may be s itself)."""
    if backend.is_cuda(s):
        _check_scores(s)
        _check_out(out, s, "scores")
        return _forward_cuda(s, scale, out)
    return causal_softmax_forward_ref(s, scale, out)


def causal_softmax_backward(y, gy, scale, out=None):
    """Gradient of the scores from the output y and its gradient gy (same device as y).
    Written into out when given (which may be gy itself)."""
    if backend.is_cuda(y):
        _check_scores(y, "output")
        if gy.shape != y.shape:
            raise ValueError(f"causal softmax gradient shape {gy.shape} != output shape {y.shape}")
        _check_out(out, y, "output")
        return _backward_cuda(y, gy, scale, out)
    return causal_softmax_backward_ref(y, gy, scale, out)
