"""The softmax family and normalisation, each fused into one numerically stable Function:
softmax, log_softmax, cross-entropy, layer_norm, and the causal attention softmax."""
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


class CrossEntropy(Function):
    """Softmax cross-entropy of logits (N, C) against integer targets (N,), fused."""

    def forward(self, x, t, reduction="mean", ignore_index=-100):
        xp = _xp(x)
        n = x.shape[0]
        valid = t != ignore_index
        tt = xp.where(valid, t, 0)
        z = x - x.max(axis=1, keepdims=True)            # (N, C)
        e = xp.exp(z)
        s = e.sum(axis=1, keepdims=True)                # (N, 1)
        rows = xp.arange(n)
        nll = (xp.log(s[:, 0]) - z[rows, tt]) * valid   # (N,)
        self.p, self.tt, self.rows, self.valid, self.reduction = e / s, tt, rows, valid, reduction
        if reduction == "none":
            return nll
        if reduction == "sum":
            return nll.sum()
        self.count = valid.sum()
        return nll.sum() / self.count.astype(x.dtype)

    def backward(self, gy):
        gx = self.p
        gx[self.rows, self.tt] -= 1
        gx *= self.valid[:, None]
        if self.reduction == "none":
            gx *= gy[:, None]
        elif self.reduction == "sum":
            gx *= gy
        else:
            gx *= gy / self.count.astype(gx.dtype)
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
