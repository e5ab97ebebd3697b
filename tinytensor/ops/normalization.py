"""The softmax family and normalisation, each fused into one numerically stable Function:
softmax, log_softmax, cross-entropy, layer_norm, and the causal attention softmax."""
import builtins
import warnings

import numpy as np

from .. import parallel
from ..tensor import Function
from ._common import _xp, wrap_dim
from .linalg import column_sums


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


def _softmax_dim(name, x, dim, dtype):
    if dim is None:  # torch's legacy implicit dim, with its warning
        warnings.warn(f"Implicit dimension choice for {name} has been deprecated. Change the call "
                      f"to include dim=X as an argument.", UserWarning, stacklevel=3)
        dim = 0 if x.ndim in (0, 1, 3) else 1
    if dtype is not None:
        x = x.astype(dtype)
    if x.dtype.kind != "f":
        raise NotImplementedError(f"{name} is not implemented for {x.dtype} tensors: convert "
                                  f"with .float() or pass dtype=")
    return x, wrap_dim(dim, x.ndim)


def softmax(x, dim=None, dtype=None):
    x, axis = _softmax_dim("softmax", x, dim, dtype)
    if x.ndim == 0:  # over its one element
        return Softmax.apply(x.reshape(1), axis=0).reshape(())
    return Softmax.apply(x, axis=axis)


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


def log_softmax(x, dim=None, dtype=None):
    x, axis = _softmax_dim("log_softmax", x, dim, dtype)
    if x.ndim == 0:
        return LogSoftmax.apply(x.reshape(1), axis=0).reshape(())
    return LogSoftmax.apply(x, axis=axis)


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
