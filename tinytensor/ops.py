"""Primitive operations: one Function subclass per op, forward and backward side by side,
the lowercase wrapper right below. Composite ops (sub-graphs of primitives) come last, then
the Tensor methods and operators are attached.

forward/backward work on raw arrays; `xp` (numpy or cupy) is taken from the inputs.
Gradients returned here may have a broadcast shape: the engine un-broadcasts them.
"""
import builtins
import math
import numbers

import numpy as np

from . import backend, parallel
from .tensor import Function, Tensor, _as_array


def _xp(*a):
    return backend.get_array_module(*a)


def _lift(other, like):
    """The other operand of a binary op: a Tensor, or a Python scalar (weakly typed, so a
    float32 tensor stays float32), or an array wrapped as a constant Tensor."""
    if isinstance(other, Tensor):
        return other
    if isinstance(other, np.generic):
        other = other.item()
    if isinstance(other, numbers.Number):
        return other
    if not isinstance(other, (np.ndarray, list, tuple)) and not backend.is_cuda(other):
        return NotImplemented  # e.g. None or a str: Python raises a TypeError naming both types
    xp = _xp(like.data)
    dtype = like.dtype if like.dtype.kind in "fc" else None
    return Tensor(xp.asarray(other, dtype=dtype))


# ---------------------------------------------------------------- elementwise, binary
class Add(Function):
    def forward(self, a, b):
        return parallel.add(a, b)  # a + b, large arrays split over threads

    def backward(self, gy):
        return gy, gy


def add(a, b):
    return Add.apply(a, b)


class Sub(Function):
    def forward(self, a, b):
        return a - b

    def backward(self, gy):
        return gy, (-gy if self.needs_grad[1] else None)


def sub(a, b):
    return Sub.apply(a, b)


class Mul(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a * b

    def backward(self, gy):
        ga = gy * self.b if self.needs_grad[0] else None
        gb = gy * self.a if self.needs_grad[1] else None
        return ga, gb


def mul(a, b):
    return Mul.apply(a, b)


class Div(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a / b

    def backward(self, gy):
        ga = gy / self.b if self.needs_grad[0] else None
        gb = -gy * self.a / (self.b * self.b) if self.needs_grad[1] else None
        return ga, gb


def div(a, b):
    return Div.apply(a, b)


# ---------------------------------------------------------------- elementwise, unary
class Neg(Function):
    def forward(self, x):
        return -x

    def backward(self, gy):
        return -gy


def neg(x):
    return Neg.apply(x)


class Pow(Function):
    """x ** c for a scalar exponent c."""

    def forward(self, x, c):
        self.x, self.c = x, c
        return x ** c

    def backward(self, gy):
        c = self.c
        if c == 0:  # x ** 0 is constant (also at x = 0, where c * x ** -1 would be nan)
            return _xp(gy).zeros_like(gy), None
        return gy * (c * self.x ** (c - 1)), None


def pow(x, c):  # noqa: A001 - mirrors torch.pow
    if isinstance(c, Tensor) or not isinstance(c, numbers.Number):
        raise TypeError(f"pow supports a scalar exponent only, got {type(c).__name__}")
    return Pow.apply(x, c)


class Exp(Function):
    def forward(self, x):
        self.y = _xp(x).exp(x)
        return self.y

    def backward(self, gy):
        return gy * self.y


def exp(x):
    return Exp.apply(x)


class Log(Function):
    def forward(self, x):
        self.x = x
        return _xp(x).log(x)

    def backward(self, gy):
        return gy / self.x


def log(x):
    return Log.apply(x)


class Tanh(Function):
    def forward(self, x):
        self.y = _xp(x).tanh(x)
        return self.y

    def backward(self, gy):
        return gy * (1 - self.y * self.y)


def tanh(x):
    return Tanh.apply(x)


class ReLU(Function):
    def forward(self, x):
        self.mask = x > 0
        return x * self.mask

    def backward(self, gy):
        return gy * self.mask


def relu(x):
    return ReLU.apply(x)


class GELU(Function):
    """GELU, exact (erf, torch's default) or with approximate='tanh'."""

    def forward(self, x, approximate="none"):
        xp = _xp(x)
        self.x, self.approximate = x, approximate
        if approximate == "tanh":
            k = math.sqrt(2.0 / math.pi)
            self.t = xp.tanh(k * (x + 0.044715 * x ** 3))
            return 0.5 * x * (1 + self.t)
        self.cdf = 0.5 * (1 + backend_erf(x / math.sqrt(2.0)))
        return x * self.cdf

    def backward(self, gy):
        xp, x = _xp(self.x), self.x
        if self.approximate == "tanh":
            k = math.sqrt(2.0 / math.pi)
            t = self.t
            d = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * k * (1 + 3 * 0.044715 * x * x)
            return gy * d
        pdf = xp.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        return gy * (self.cdf + x * pdf)


def backend_erf(x):
    """erf on numpy or cupy arrays, exact to double precision."""
    if backend.is_cuda(x):
        import cupyx.scipy.special as cs  # only reached with cupy present
        return cs.erf(x)
    try:
        from scipy.special import erf
        return erf(x).astype(x.dtype, copy=False)
    except ImportError:
        return np.asarray(np.frompyfunc(math.erf, 1, 1)(x), dtype=x.dtype)  # 0-d gives a float


def gelu(x, approximate="none"):
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu approximate must be 'none' or 'tanh', got {approximate!r}")
    return GELU.apply(x, approximate=approximate)


class Cast(Function):
    def forward(self, x, dtype):
        self.src = x.dtype
        return x.astype(dtype)

    def backward(self, gy):
        return gy.astype(self.src)


# ---------------------------------------------------------------- matmul
class MatMul(Function):
    """a @ b with numpy.matmul semantics (1-D operands, broadcast batch dimensions)."""

    def forward(self, a, b):
        self.a, self.b = a, b
        return a @ b

    def backward(self, gy):
        xp = _xp(gy)
        a, b = self.a, self.b
        a2 = a[None, :] if a.ndim == 1 else a           # (.., m, k)
        b2 = b[:, None] if b.ndim == 1 else b           # (.., k, n)
        g2 = gy
        if b.ndim == 1:                                 # b's axis first: gy may be 0-d
            g2 = xp.expand_dims(g2, -1)
        if a.ndim == 1:
            g2 = xp.expand_dims(g2, -2)                 # (.., m, n)
        ga = gb = None
        if self.needs_grad[0]:
            ga = g2 @ xp.swapaxes(b2, -1, -2)           # (.., m, k)
            if a.ndim == 1:
                ga = ga.reshape(ga.shape[:-2] + (ga.shape[-1],))
            ga = _sum_to_ndim(ga, a.ndim, keep=2 if a.ndim > 1 else 1)
        if self.needs_grad[1]:
            gb = xp.swapaxes(a2, -1, -2) @ g2           # (.., k, n)
            if b.ndim == 1:
                gb = gb[..., 0]
            gb = _sum_to_ndim(gb, b.ndim, keep=2 if b.ndim > 1 else 1)
        return ga, gb


def _sum_to_ndim(g, ndim, keep):
    """Sum leading batch dims that a lower-rank operand was broadcast over."""
    if g.ndim > ndim:
        g = g.sum(axis=tuple(range(g.ndim - ndim)))
    return g


def matmul(a, b):
    return MatMul.apply(a, b)


class Linear(Function):
    """y = x @ W.T + b, x (..., in), W (out, in): one GEMM over all leading dimensions."""

    def forward(self, x, w, b=None):
        self.x, self.w = x, w
        x2 = x.reshape(-1, x.shape[-1])                 # (N, in)
        y = x2 @ w.T                                    # (N, out)
        if b is not None:
            add_rows_(y, b)
        return y.reshape(x.shape[:-1] + (w.shape[0],))

    def backward(self, gy):
        x, w = self.x, self.w
        g2 = gy.reshape(-1, gy.shape[-1])               # (N, out)
        gx = (g2 @ w).reshape(x.shape) if self.needs_grad[0] else None
        gw = g2.T @ x.reshape(-1, x.shape[-1]) if self.needs_grad[1] else None
        gb = column_sums(g2) if len(self.needs_grad) > 2 and self.needs_grad[2] else None
        return gx, gw, gb


def add_rows_(y, b):
    """y += b for y (N, out) and b (out,), in place; large y in row ranges over threads."""
    xp = _xp(y)
    parallel.rows(len(y), lambda r0, r1: xp.add(y[r0:r1], b, out=y[r0:r1]), y.size, xp)


def column_sums(g):
    """g.sum(axis=0) of a matrix g (N, out) as ones @ g: BLAS's matrix-vector product is
    several times faster than NumPy's reduction at these shapes."""
    return _xp(g).ones(g.shape[0], dtype=g.dtype) @ g


def linear(x, weight, bias=None):
    if bias is None:
        return Linear.apply(x, weight)
    return Linear.apply(x, weight, bias)


# ---------------------------------------------------------------- reductions
def _norm_axis(axis, ndim):
    if axis is None:
        return None
    axes = (axis,) if isinstance(axis, numbers.Integral) else tuple(axis)
    out = []
    for a in axes:
        if not -ndim <= a < builtins.max(ndim, 1):
            raise IndexError(f"dim {a} is out of range for a tensor with {ndim} dimensions")
        out.append(a % builtins.max(ndim, 1))
    return tuple(out)


class Sum(Function):
    def forward(self, x, axis=None, keepdims=False):
        self.shape, self.axis, self.keepdims = x.shape, axis, keepdims
        return x.sum(axis=axis, keepdims=keepdims)

    def backward(self, gy):
        xp = _xp(gy)
        if not self.keepdims and self.axis is not None:
            gy = xp.expand_dims(gy, self.axis)
        return xp.broadcast_to(gy, self.shape)


def sum(x, dim=None, keepdim=False):  # noqa: A001
    return Sum.apply(x, axis=_norm_axis(dim, x.ndim), keepdims=keepdim)


class Max(Function):
    """max over dims; the gradient is shared equally among tied maxima (like torch.amax)."""

    def forward(self, x, axis=None, keepdims=False):
        self.x, self.axis, self.keepdims = x, axis, keepdims
        self.y = x.max(axis=axis, keepdims=True)
        return self.y if keepdims else (self.y.reshape(()) if axis is None else self.y.squeeze(axis))

    def backward(self, gy):
        xp = _xp(gy)
        if not self.keepdims:
            gy = gy.reshape(self.y.shape)
        mask = (self.x == self.y)
        count = mask.sum(axis=self.axis, keepdims=True)
        return mask * (gy / count).astype(gy.dtype, copy=False)


def max(x, dim=None, keepdim=False):  # noqa: A001
    return Max.apply(x, axis=_norm_axis(dim, x.ndim), keepdims=keepdim)


# ---------------------------------------------------------------- shape
class Reshape(Function):
    def forward(self, x, shape):
        self.shape = x.shape
        return x.reshape(shape)

    def backward(self, gy):
        return gy.reshape(self.shape)


def reshape(x, *shape):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return Reshape.apply(x, shape=shape)


class Permute(Function):
    def forward(self, x, dims):
        self.dims = dims
        return x.transpose(dims)

    def backward(self, gy):
        return gy.transpose(np.argsort(self.dims))


def permute(x, *dims):
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    if sorted(d % x.ndim for d in dims) != list(range(x.ndim)):
        raise ValueError(f"permute dims {dims} are not a permutation of {x.ndim} dimensions")
    return Permute.apply(x, dims=tuple(d % x.ndim for d in dims))


def transpose(x, dim0, dim1):
    dim0, dim1 = _norm_axis((dim0, dim1), x.ndim)
    dims = list(range(x.ndim))
    dims[dim0], dims[dim1] = dims[dim1], dims[dim0]
    return Permute.apply(x, dims=tuple(dims))


def _unwrap_index(idx):
    if isinstance(idx, Tensor):
        return idx.data
    if isinstance(idx, tuple):  # lists become arrays, so repeated indices accumulate gradient
        return tuple(i.data if isinstance(i, Tensor) else np.asarray(i) if isinstance(i, list) else i
                     for i in idx)
    if isinstance(idx, list):
        return np.asarray(idx)
    return idx


def _is_advanced(idx):
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(hasattr(i, "shape") and getattr(i, "ndim", 0) > 0 for i in items)


class GetItem(Function):
    """x[idx] with slices, ints and integer/bool arrays; repeated indices accumulate."""

    def forward(self, x, idx):
        self.shape, self.dtype, self.idx = x.shape, x.dtype, idx
        return x[idx]

    def backward(self, gy):
        xp = _xp(gy)
        gx = xp.zeros(self.shape, dtype=gy.dtype)
        if _is_advanced(self.idx):
            backend.scatter_add(gx, self.idx, gy)
        else:
            gx[self.idx] = gy
        return gx


def getitem(x, idx):
    idx = _unwrap_index(idx)
    if backend.is_cuda(x.data):
        idx = backend.index_to_device(idx, "cuda")
    return GetItem.apply(x, idx=idx)


class MaskedFill(Function):
    def forward(self, x, mask, value):
        self.mask = mask
        xp = _xp(x)
        return xp.where(mask, xp.asarray(value, dtype=x.dtype), x)

    def backward(self, gy):
        xp = _xp(gy)
        return xp.where(self.mask, xp.zeros((), dtype=gy.dtype), gy)


def masked_fill(x, mask, value):
    mask = mask.data if isinstance(mask, Tensor) else mask
    xp = _xp(x.data)
    mask = xp.asarray(mask)
    if mask.dtype != bool:
        raise TypeError(f"masked_fill needs a bool mask, got dtype {mask.dtype}")
    try:
        ok = np.broadcast_shapes(mask.shape, x.shape) == x.shape
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"masked_fill mask of shape {mask.shape} does not broadcast to {x.shape}")
    return MaskedFill.apply(x, mask, value=value)


class Where(Function):
    def forward(self, cond, a, b):
        self.cond = cond
        return _xp(a, b).where(cond, a, b)

    def backward(self, gy):
        xp = _xp(gy)
        z = xp.zeros((), dtype=gy.dtype)
        return None, xp.where(self.cond, gy, z), xp.where(self.cond, z, gy)


def where(cond, a, b):
    cond = cond.data if isinstance(cond, Tensor) else cond
    return Where.apply(cond, a, b)


class Cat(Function):
    def forward(self, *xs, axis=0):
        self.axis = axis
        self.sizes = [x.shape[axis] for x in xs]
        return _xp(*xs).concatenate(xs, axis=axis)

    def backward(self, gy):
        xp = _xp(gy)
        splits = np.cumsum(self.sizes)[:-1].tolist()
        return tuple(xp.split(gy, splits, axis=self.axis))


def cat(tensors, dim=0):
    tensors = list(tensors)
    if not tensors:
        raise ValueError("cat needs at least one tensor")
    tensors = [t if isinstance(t, Tensor) else Tensor(t) for t in tensors]
    return Cat.apply(*tensors, axis=dim % tensors[0].ndim)


class Stack(Function):
    def forward(self, *xs, axis=0):
        self.axis = axis
        return _xp(*xs).stack(xs, axis=axis)

    def backward(self, gy):
        xp = _xp(gy)
        return tuple(xp.moveaxis(gy, self.axis, 0))


def stack(tensors, dim=0):
    tensors = [t if isinstance(t, Tensor) else Tensor(t) for t in tensors]
    if not tensors:
        raise ValueError("stack needs at least one tensor")
    return Stack.apply(*tensors, axis=dim % (tensors[0].ndim + 1))


# ---------------------------------------------------------------- fused, numerically stable
class Softmax(Function):
    def forward(self, x, axis=-1):
        xp = _xp(x)
        self.axis = axis
        y = x - x.max(axis=axis, keepdims=True)
        xp.exp(y, out=y)
        y /= y.sum(axis=axis, keepdims=True)
        self.y = y
        return y

    def backward(self, gy):
        y = self.y
        gx = gy * y
        gx -= y * gx.sum(axis=self.axis, keepdims=True)
        return gx


def softmax(x, dim=-1):
    return Softmax.apply(x, axis=dim)


class LogSoftmax(Function):
    def forward(self, x, axis=-1):
        xp = _xp(x)
        self.axis = axis
        y = x - x.max(axis=axis, keepdims=True)
        y -= xp.log(xp.exp(y).sum(axis=axis, keepdims=True))
        self.y = y
        return y

    def backward(self, gy):
        xp = _xp(gy)
        return gy - xp.exp(self.y) * gy.sum(axis=self.axis, keepdims=True)


def log_softmax(x, dim=-1):
    return LogSoftmax.apply(x, axis=dim)


def _row_mean(xp, total, count):
    """total / count (the rows counted): a mean over no rows is nan, as in torch, without
    NumPy's 0 / 0 warning. count is a host integer, or a device array (cupy)."""
    if isinstance(count, (int, np.integer)):
        return total / total.dtype.type(count) if count else xp.full((), xp.nan, dtype=total.dtype)
    return total / count.astype(total.dtype)


def _row_mean_grad(gy, count):
    """The mean's gradient gy / count; with no rows counted each row's gradient is 0 already,
    so the division is by 1 (torch's gradient there is 0, not nan)."""
    if isinstance(count, (int, np.integer)):
        return gy / gy.dtype.type(builtins.max(count, 1))
    return gy / _xp(gy).maximum(count, 1).astype(gy.dtype)


class CrossEntropy(Function):
    """Softmax cross-entropy of logits x (N, C), fused, against either targets:

    integer class indices t (N,): rows whose target is ignore_index count neither in the loss
    nor in the mean's denominator; with label smoothing eps a row's loss is
    (1 - eps) * nll + eps * mean over classes of -log p (torch's formula);
    class probabilities t (N, C): loss = -sum_c q_c log p_c with q = (1 - eps) * t + eps / C;
    the mean is over the N rows, and t gets a gradient too.

    reduction 'none' gives the (N,) row losses. A mean over no rows is nan, as in torch, and
    its gradient is zero.
    """

    def forward(self, x, t, reduction="mean", ignore_index=-100, label_smoothing=0.0):
        xp = _xp(x)
        n, c = x.shape
        eps = label_smoothing
        self.reduction, self.eps, self.probs = reduction, eps, t.ndim == 2
        if x.size:
            z = x - x.max(axis=1, keepdims=True)            # (N, C)
            e = xp.exp(z)
            s = e.sum(axis=1, keepdims=True)                # (N, 1)
            e /= s
            lse = xp.log(s[:, 0])                           # (N,): log sum exp(z)
        else:  # no rows or no classes: every row loss is 0 (and a mean is nan)
            z = e = x.copy()
            lse = xp.zeros(n, dtype=x.dtype)
        self.p = e                                          # (N, C) softmax
        if self.probs:                                      # class probabilities (N, C)
            q = t * x.dtype.type(1 - eps) + x.dtype.type(eps / c) if eps and c else t
            logp = z - lse[:, None]                         # (N, C)
            loss = -(q * logp).sum(axis=1)                  # (N,)
            self.q, self.logp, self.count = q, logp, n if x.size else 0
        else:                                               # class indices (N,)
            valid = t != ignore_index
            tt = xp.where(valid, t, 0)
            rows = xp.arange(n)
            loss = lse - z[rows, tt] if c else lse          # (N,): -log p of the target
            if eps and c:  # -sum_c log p_c = C * lse - sum_c z_c
                loss = loss * x.dtype.type(1 - eps) + (c * lse - z.sum(axis=1)) * x.dtype.type(eps / c)
            loss = xp.where(valid, loss, 0)                 # an ignored row is 0 even for -inf logits
            self.tt, self.rows, self.valid, self.count = tt, rows, valid, valid.sum()
        if reduction == "none":
            return loss
        if reduction == "sum":
            return loss.sum()
        return _row_mean(xp, loss.sum(), self.count)

    def backward(self, gy):
        c, eps = self.p.shape[1], self.eps
        if self.reduction == "none":
            scale = gy[:, None]                             # (N, 1)
        elif self.reduction == "sum":
            scale = gy
        else:
            scale = _row_mean_grad(gy, self.count)
        gx = self.p                                         # softmax p, reused
        gt = None
        if self.probs:  # d/dx = p * sum_c q_c - q;  d/dt = -(1 - eps) * log p
            gx *= self.q.sum(axis=1, keepdims=True)
            gx -= self.q
            gx *= scale
            if self.needs_grad[1]:
                gt = self.logp * (-scale * gy.dtype.type(1 - eps))
            return gx, gt
        if c:  # d/dx = p - (1 - eps) * onehot(t) - eps / C
            gx[self.rows, self.tt] -= 1 - eps if eps else 1
            if eps:
                gx -= gx.dtype.type(eps / c)
        gx *= self.valid[:, None]
        gx *= scale
        return gx, None


class NLLLoss(Function):
    """Negative log-likelihood -x[i, t_i] of integer targets t (N,) under log-probabilities
    x (N, C); rows whose target is ignore_index count neither in the loss nor in the mean."""

    def forward(self, x, t, reduction="mean", ignore_index=-100):
        xp = _xp(x)
        n, c = x.shape
        valid = t != ignore_index
        tt = xp.where(valid, t, 0)
        rows = xp.arange(n)
        picked = x[rows, tt] if c else xp.zeros(n, dtype=x.dtype)      # (N,)
        loss = xp.where(valid, -picked, 0)                               # (N,)
        self.shape, self.tt, self.rows, self.valid, self.reduction = x.shape, tt, rows, valid, reduction
        self.count = valid.sum()
        if reduction == "none":
            return loss
        if reduction == "sum":
            return loss.sum()
        return _row_mean(xp, loss.sum(), self.count)

    def backward(self, gy):
        xp = _xp(gy)
        if self.reduction == "mean":
            gy = _row_mean_grad(gy, self.count)
        gx = xp.zeros(self.shape, dtype=gy.dtype)
        if self.shape[1]:
            gx[self.rows, self.tt] = xp.where(self.valid, -gy, gy.dtype.type(0))  # one per row
        return gx, None


class LayerNorm(Function):
    """Layer normalisation over the last `nd` dimensions, with optional affine weight/bias.

    Works on x as a matrix (N, D) of N rows of D normalised elements. Row means are
    matrix-vector products with a (D,) vector of 1/D, and column sums (the weight and bias
    gradients) products with a vector of ones: BLAS does these several times faster than
    NumPy's reductions over rows of a few hundred elements.
    """

    def forward(self, x, w=None, b=None, nd=1, eps=1e-5):
        xp = _xp(x)
        d = int(np.prod(x.shape[x.ndim - nd:]))
        x2 = x.reshape(-1, d)                                       # (N, D)
        n = x2.shape[0]
        avg = xp.full(d, 1.0 / d, dtype=x.dtype)                    # (D,): r @ avg is r's mean
        wv = None if w is None else w.reshape(d)
        bv = None if b is None else b.reshape(d)
        xhat, y = xp.empty_like(x2), xp.empty_like(x2)              # (N, D)
        rstd = xp.empty(n, dtype=x.dtype)                           # (N,)

        def rows(r0, r1):  # rows r0..r1-1 (large inputs: in parallel threads)
            xh = xhat[r0:r1]
            xp.subtract(x2[r0:r1], (x2[r0:r1] @ avg)[:, None], out=xh)         # centred
            rstd[r0:r1] = 1.0 / xp.sqrt((xh * xh) @ avg + eps)
            xh *= rstd[r0:r1, None]                                            # normalised
            if wv is not None:
                xp.multiply(xh, wv, out=y[r0:r1])
            else:
                y[r0:r1] = xh
            if bv is not None:
                y[r0:r1] += bv

        parallel.rows(n, rows, x2.size, xp, align=parallel.ROW_BLOCK,
                      block=parallel.block_rows(d, parallel.ROW_BLOCK))
        self.xhat, self.rstd, self.avg, self.wv, self.shape, self.nd = xhat, rstd, avg, wv, x.shape, nd
        return y.reshape(x.shape)

    def backward(self, gy):
        xp = _xp(gy)
        xhat, rstd, avg, wv = self.xhat, self.rstd, self.avg, self.wv
        n, d = xhat.shape
        param_shape = self.shape[len(self.shape) - self.nd:]        # the weight's and bias's
        needs = self.needs_grad + [False] * (3 - len(self.needs_grad))
        g2 = gy.reshape(n, d)                                       # (N, D)
        gyx = xp.empty_like(g2)                                     # gy * xhat
        gx = xp.empty_like(g2) if needs[0] else None

        def rows(r0, r1):
            xp.multiply(g2[r0:r1], xhat[r0:r1], out=gyx[r0:r1])
            if gx is None:
                return
            g = gx[r0:r1]                                           # becomes the input gradient
            if wv is not None:                                      # g: the gradient of xhat
                xp.multiply(g2[r0:r1], wv, out=g)
                gx_hat = gyx[r0:r1] * wv                            # g * xhat
            else:
                g[...] = g2[r0:r1]
                gx_hat = gyx[r0:r1].copy()
            g -= (g @ avg)[:, None]
            xp.multiply(xhat[r0:r1], (gx_hat @ avg)[:, None], out=gx_hat)
            g -= gx_hat
            g *= rstd[r0:r1, None]

        parallel.rows(n, rows, g2.size, xp, align=parallel.ROW_BLOCK,
                      block=parallel.block_rows(d, parallel.ROW_BLOCK))
        gw = column_sums(gyx).reshape(param_shape) if needs[1] else None
        gb = column_sums(g2).reshape(param_shape) if needs[2] else None
        return (None if gx is None else gx.reshape(self.shape)), gw, gb


# ---------------------------------------------------------------- composites (no backward)
def mean(x, dim=None, keepdim=False):
    axes = _norm_axis(dim, x.ndim)
    n = x.size if axes is None else int(np.prod([x.shape[a] for a in axes]))
    return sum(x, dim, keepdim) / n


def unsqueeze(x, dim):
    dim = dim % (x.ndim + 1)
    return reshape(x, x.shape[:dim] + (1,) + x.shape[dim:])


def squeeze(x, dim=None):
    if dim is None:
        return reshape(x, tuple(n for n in x.shape if n != 1))
    dim = dim % x.ndim
    if x.shape[dim] != 1:
        return x
    return reshape(x, x.shape[:dim] + x.shape[dim + 1:])


def flatten(x, start_dim=0, end_dim=-1):
    s, e = start_dim % x.ndim, end_dim % x.ndim
    n = int(np.prod(x.shape[s:e + 1]))
    return reshape(x, x.shape[:s] + (n,) + x.shape[e + 1:])


def sqrt(x):
    return x ** 0.5


def _view(x, *shape):
    return reshape(x, *shape)


# ---------------------------------------------------------------- Tensor methods/operators
def _binary(fn, reverse=False):
    def op(self, other):
        other = _lift(other, self)
        if other is NotImplemented:
            return NotImplemented
        return fn(other, self) if reverse else fn(self, other)
    return op


def _compare(name):
    def op(self, other):
        other = other.data if isinstance(other, Tensor) else other
        return Tensor(getattr(self.data, name)(other))
    return op


Tensor.__add__ = _binary(add)
Tensor.__radd__ = _binary(add, reverse=True)
Tensor.__sub__ = _binary(sub)
Tensor.__rsub__ = _binary(sub, reverse=True)
Tensor.__mul__ = _binary(mul)
Tensor.__rmul__ = _binary(mul, reverse=True)
Tensor.__truediv__ = _binary(div)
Tensor.__rtruediv__ = _binary(div, reverse=True)
Tensor.__matmul__ = _binary(matmul)
Tensor.__rmatmul__ = _binary(matmul, reverse=True)
Tensor.__neg__ = neg
Tensor.__pow__ = pow
Tensor.__rpow__ = lambda self, base: exp(self * math.log(base))
Tensor.__getitem__ = getitem
Tensor.__lt__ = _compare("__lt__")
Tensor.__le__ = _compare("__le__")
Tensor.__gt__ = _compare("__gt__")
Tensor.__ge__ = _compare("__ge__")
Tensor.__hash__ = object.__hash__
Tensor.sum = sum
Tensor.mean = mean
Tensor.max = max
Tensor.exp = exp
Tensor.log = log
Tensor.tanh = tanh
Tensor.relu = relu
Tensor.sqrt = sqrt
Tensor.reshape = reshape
Tensor.view = _view
Tensor.permute = permute
Tensor.transpose = transpose
Tensor.masked_fill = masked_fill
Tensor.unsqueeze = unsqueeze
Tensor.squeeze = squeeze
Tensor.flatten = flatten
Tensor.softmax = softmax
Tensor.log_softmax = log_softmax
Tensor.matmul = matmul


# ---------------------------------------------------------------- fused attention softmax
class CausalSoftmax(Function):
    """Attention weights: softmax(scale * x) over the last axis with the future masked out.

    x holds scores (..., Tq, Tk) of the last Tq of Tk positions: query i sits at position
    Tk - Tq + i and sees keys 0 .. Tk - Tq + i (Tq == Tk in training; Tq == 1 in a cached
    generation step, which sees every key). Equal to the composition
    softmax((scale * x).masked_fill(future, -inf)) in one op: masked entries get weight 0 and
    zero gradient, and no mask or scaled copy is kept for backward.
    """

    def forward(self, x, scale=1.0):
        xp = _xp(x)
        tq, tk = x.shape[-2:]
        self.scale = scale
        y = x * x.dtype.type(scale)
        if tq > 1:
            future = xp.triu(xp.ones((tq, tk), dtype=bool), k=tk - tq + 1)   # (Tq, Tk)
            y += xp.where(future, -xp.inf, 0.0).astype(x.dtype)                # -inf above the diagonal
        y -= y.max(axis=-1, keepdims=True)
        xp.exp(y, out=y)
        y /= y.sum(axis=-1, keepdims=True)
        self.y = y
        return y

    def backward(self, gy):
        xp, y = _xp(gy), self.y
        gx = gy * y
        s = gx.sum(axis=-1, keepdims=True)              # (..., Tq, 1)
        xp.subtract(gy, s, out=gx)                      # gx = y * (gy - sum(gy * y)) * scale
        gx *= y
        gx *= gx.dtype.type(self.scale)
        return gx


def causal_softmax(x, scale=1.0):
    """softmax(scale * x, dim=-1) of attention scores x (..., Tq, Tk), future keys masked."""
    if x.ndim < 2 or x.shape[-2] > x.shape[-1]:
        raise ValueError(f"causal_softmax needs scores of shape (..., Tq, Tk) with Tq <= Tk, "
                         f"got {x.shape}")
    return CausalSoftmax.apply(x, scale=float(scale))
