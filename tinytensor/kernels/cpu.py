"""Compiled CPU kernels: an optional accelerator for the small memory-bound ops of a training
step, where NumPy makes several passes over the data and broadcasts slowly over short rows.

    family           functions                                   NumPy reference (same meaning)
    layer norm       layer_norm_forward / layer_norm_backward    kernels.layernorm ..._ref
    cross-entropy    cross_entropy_forward (float32) / _backward fused.CrossEntropy's NumPy path
    row scatter-add  add_rows                                    np.add.at on whole rows
    bias (+ ReLU)    add_bias_, bias_relu_, relu_backward         fused.LinearReLU, ops Linear
    causal softmax   causal_softmax_ (float32), _backward_        fused.causal_softmax_, ..._backward_

They run when Numba is installed (`pip install -e ".[fast]"`) and not switched off:

    enabled()        whether the ops use them now (the first call imports and loads numba)
    use(flag)        switch them on (True), off (False) or back to the default (None)
    TT_NUMBA=0       switches them off for a process (TT_NUMBA=1: on, an error without numba)

Each takes and returns what its NumPy reference does, on float32 or float64 C-contiguous
arrays (`takes(*arrays)`), and is compiled on first use (cached on disk: the first run of a
checkout compiles for a few seconds, later runs load). Results match the references up to
float rounding (sums run in another order; the float32 exp is within 2 ulp of NumPy's and gives
0 where NumPy gives subnormals below 1.2e-38), and do not depend on the number of threads:
large inputs are split over threads (parallel.rows) on fixed row blocks.
tests/test_kernels_cpu.py checks each against its reference, and the op tests run both paths.
"""
import os

import numpy as np

from .. import parallel

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
# rows per partial column sum (layer norm's weight and bias gradients, the bias gradient after
# a ReLU): a call's rows are summed in blocks of this many, the blocks' sums added in order,
# whatever the threads
ROW_BLOCK = 1024

_k = None        # the compiled kernels (module _numba_cpu), once loaded
_use = None      # True/False once decided; None: from TT_NUMBA and whether numba imports


def _load():
    global _k
    if _k is None:
        from . import _numba_cpu  # imports numba: only here, on first use
        _k = _numba_cpu
    return _k


def _default():
    setting = os.environ.get("TT_NUMBA", "").strip()
    if setting not in ("", "0", "1"):
        raise ValueError(f"TT_NUMBA={setting!r}: expected 0 (NumPy only) or 1 (compiled CPU "
                         f"kernels, needs numba), or leave it unset")
    if setting == "0":
        return False
    try:
        _load()
    except ImportError:
        if setting == "1":
            raise ImportError("TT_NUMBA=1 asks for the compiled CPU kernels, but numba is not "
                              "installed: pip install -e \".[fast]\" (or pip install numba)")
        return False
    return True


def enabled():
    """Whether the ops use the compiled CPU kernels now."""
    global _use
    if _use is None:
        _use = _default()
    return _use


def use(flag):
    """Switch the compiled CPU kernels on (True: ImportError without numba), off (False), or
    back to the default (None: TT_NUMBA, else on when numba imports; decided at the next
    enabled())."""
    global _use
    if flag is None:
        _use = None
    elif flag:
        try:
            _load()
        except ImportError:
            raise ImportError("the compiled CPU kernels need numba: pip install -e \".[fast]\" "
                              "(or pip install numba)") from None
        _use = True
    else:
        _use = False


def takes(*arrays):
    """True when the kernels are on and take these arrays: NumPy arrays of one float dtype,
    float32 or float64 (None entries skipped)."""
    if not enabled():
        return False
    given = [a for a in arrays if a is not None]
    dtype = given[0].dtype if given else None
    return bool(given) and dtype in _FLOATS and all(
        type(a) is np.ndarray and a.dtype == dtype for a in given)


def _c(a):
    return np.ascontiguousarray(a)


def _affine(p, fill, d, dtype):
    return np.full(d, fill, dtype=dtype) if p is None else _c(p)


# ------------------------------------------------------------------ layer norm
def layer_norm_forward(x, w, b, eps=1e-5):
    """(y, mean, rstd) of layer norm over the last axis of x (N, D); w, b (D,) or None."""
    k = _load()
    x = _c(x)
    n, d = x.shape
    y = np.empty_like(x)
    mean = np.empty(n, dtype=x.dtype)
    rstd = np.empty(n, dtype=x.dtype)
    w, b = _affine(w, 1, d, x.dtype), _affine(b, 0, d, x.dtype)
    parallel.rows(n, lambda r0, r1: k.layer_norm_forward(
        x[r0:r1], w, b, float(eps), y[r0:r1], mean[r0:r1], rstd[r0:r1]), x.size)
    return y, mean, rstd


def layer_norm_backward(gy, x, w, mean, rstd):
    """(gx, gw, gb) from the output gradient gy (N, D) and the forward's x, w, mean, rstd;
    gw and gb (D,) in x's dtype."""
    k = _load()
    x, gy = _c(x), _c(gy)
    w = _affine(w, 1, x.shape[1], x.dtype)
    gx = np.empty_like(x)
    gw, gb = _column_sums_by_block(x.shape, 2, lambda s, e, part: k.layer_norm_backward(
        gy[s:e], x[s:e], w, mean[s:e], rstd[s:e], gx[s:e], part[0], part[1]))
    return gx, gw.astype(x.dtype), gb.astype(x.dtype)


def _column_sums_by_block(shape, count, kernel):
    """Run kernel(s, e, part) over blocks of ROW_BLOCK rows s..e-1 of an (N, D) problem, large
    ones over threads (ranges start on block edges), each block adding `count` column sums
    into its own float64 part (count, D); returns the blocks' sums added in order (count, D):
    the same bits for any number of threads."""
    n, d = shape
    parts = np.zeros((max(1, -(-n // ROW_BLOCK)), count, d))

    def run(r0, r1):
        for s in range(r0, r1, ROW_BLOCK):
            kernel(s, min(s + ROW_BLOCK, r1), parts[s // ROW_BLOCK])

    parallel.rows(n, run, n * d, align=ROW_BLOCK)
    return parts[0] if len(parts) == 1 else parts.sum(axis=0)


# ------------------------------------------------------------------ cross-entropy
def cross_entropy_forward(x, t, ignore_index=-100):
    """(loss (N,), p (N, C), count) for float32 logits x (N, C) and class indices t (N,): the
    row losses (0 where t == ignore_index), the softmax and the number of rows counted; max,
    shift, exp (vectorised), sums and log in one pass per row."""
    k = _load()
    if x.dtype != np.float32:
        raise TypeError(f"the compiled cross-entropy takes float32 logits, got {x.dtype}")
    x = _c(x)
    t = _c(t).astype(np.int64, copy=False)
    p = np.empty_like(x)
    loss = np.empty(x.shape[0], dtype=x.dtype)
    count = k.cross_entropy_f32(x, t, int(ignore_index), p, loss)
    if count < 0:
        raise IndexError(f"cross_entropy target out of range: class indices must be in "
                         f"[0, {x.shape[1]}) or ignore_index={ignore_index}")
    return loss, p, count


def cross_entropy_backward(p, t, ignore_index, scale):
    """The gradient of the logits: scale * (p - onehot(t)) per row (scale (N,), or one value
    for every row), 0 in ignored rows."""
    k = _load()
    scale = np.broadcast_to(np.asarray(scale, dtype=p.dtype).reshape(-1), (p.shape[0],))
    gx = np.empty_like(p)
    k.cross_entropy_backward(p, _c(t).astype(np.int64, copy=False), int(ignore_index),
                             _c(scale), gx)
    return gx


# ------------------------------------------------------------------ scatter-add of rows
def add_rows(target, rows, values):
    """target[rows[i]] += values[i] over axis 0, in order (repeated rows accumulate); rows
    already in [0, len(target)); target C-contiguous (it is written in place)."""
    k = _load()
    n = target.shape[0]
    k.add_rows(target.reshape(n, -1), _c(rows).reshape(-1).astype(np.int64, copy=False),
               _c(values).reshape(rows.size, -1))


# ------------------------------------------------------------------ bias and ReLU
def add_bias_(y, b):
    """y += b over the rows of y (N, D), in place (y C-contiguous)."""
    k = _load()
    parallel.rows(len(y), lambda r0, r1: k.add_bias_(y[r0:r1], _c(b)), y.size)


def bias_relu_(y, b):
    """y = relu(y + b) over the rows of y (N, D), in place; b (D,) or None."""
    k = _load()
    b = _affine(b, 0, y.shape[1], y.dtype)
    parallel.rows(len(y), lambda r0, r1: k.bias_relu_(y[r0:r1], b), y.size)


def relu_backward(gy, y, need_bias=True):
    """(g, gb): g = gy * (y > 0) for the ReLU's output y (N, D), and g's column sums (D,)
    (None when not need_bias)."""
    k = _load()
    gy, y = _c(gy), _c(y)
    g = np.empty_like(y)
    (gb,) = _column_sums_by_block(y.shape, 1, lambda s, e, part: k.relu_backward(
        gy[s:e], y[s:e], g[s:e], part[0]))
    return g, (gb.astype(y.dtype) if need_bias else None)


# ------------------------------------------------------------------ causal softmax
def causal_softmax_(att):
    """att (..., Tq, Tk) float32, C-contiguous <- its causal softmax over the last axis, in
    place (fused.causal_softmax_'s meaning: query row i sees keys 0 .. Tk - Tq + i)."""
    k = _load()
    tq, tk = att.shape[-2:]
    rows = att.reshape(-1, tk)
    parallel.rows(len(rows), lambda r0, r1: k.causal_softmax_f32_(rows[r0:r1], tq, tk),
                  att.size, align=tq)
    return att


def causal_softmax_backward_(g, y):
    """g <- y * (g - sum(g * y, last axis)) in place (g, y of one shape and dtype, C-contiguous)."""
    k = _load()
    tk = g.shape[-1]
    g2, y2 = g.reshape(-1, tk), y.reshape(-1, tk)
    parallel.rows(len(g2), lambda r0, r1: k.causal_softmax_backward_(g2[r0:r1], y2[r0:r1]), g.size)
    return g
