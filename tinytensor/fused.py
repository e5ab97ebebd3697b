"""Fused operations: what a short chain of primitive ops computes, in one Function each.

    linear(x, w, b)                         x @ w.T + b over all leading dimensions (F.linear)
    linear_relu(x, w, b)                    relu(linear(x, w, b)): the feed-forward's first layer
    layer_norm(x, w, b, nd, eps)            F.layer_norm
    cross_entropy(x, t, ...)                softmax cross-entropy of logits (N, C)
    embedding(w, idx)                       rows of a table (F.embedding)
    dropout(x, p)                           inverted dropout with a bool keep-mask (F.dropout)
    causal_attention(q, k, v, p, scale)     softmax(scale * q @ k^T, the future masked), its
                                            weights dropped, @ v (F.scaled_dot_product_attention);
                                            q may be the last few positions of k and v
    adamw_update(p, g, m, v, ...)           AdamW's update rule, in place (optim.AdamW)

Each is written here once, as plain array code on NumPy or CuPy arrays (xp): its reference,
which reads like the math and which tests/test_fused.py and the op tests check against
PyTorch, the composition it replaces and float64 central differences. Faster versions (CUDA
kernels, compiled CPU loops, work split over threads) live in tinytensor/kernels/: each op's
wrapper below asks kernels.accelerated() once which version to run on its arrays (run()).

Shapes: B batch, T time, C channels, nh heads of size hs, N rows, D normalised elements.
"""
import math

import numpy as np

from . import backend, kernels
from . import random as _random
from .ops._common import _xp, mean_grad, reduce_rows
from .tensor import Function, Tensor


def run(op, *inputs, **kwargs):
    """op (a reference class below) applied to inputs, in the version kernels.accelerated picks
    for their arrays: the one dispatch point of each fused op."""
    arrays = [x.data if isinstance(x, Tensor) else x for x in inputs]
    return kernels.accelerated(op, *arrays, **kwargs).apply(*inputs, **kwargs)


# ---------------------------------------------------------------- linear layers
class Linear(Function):
    """y = x @ w.T + b for x (..., in), w (out, in), b (out,) or None: one matrix product over
    all leading dimensions."""

    def forward(self, x, w, b=None):
        self.keep(x, w)
        y = x.reshape(-1, x.shape[-1]) @ w.T                        # (N, out)
        if b is not None:
            y += b
        return y.reshape(x.shape[:-1] + (w.shape[0],))              # (..., out)

    def backward(self, gy):
        g = gy.reshape(-1, gy.shape[-1])                            # (N, out)
        return self.input_grads(g, g.sum(axis=0) if self.wants(2) else None)

    def wants(self, i):
        """Whether input i (x, w, b) wants a gradient."""
        return self.needs_grad[i]

    def keep(self, x, w):
        """Keep what backward needs, as torch saves it: x only for w's gradient, w only for
        x's."""
        self.x_shape = x.shape
        self.x = x if self.wants(1) else None
        self.w = w if self.wants(0) else None

    def input_grads(self, g, gb):
        """(gx, gw, gb) from the gradient g (N, out) of the product x @ w.T."""
        x, w = self.x, self.w
        gx = (g @ w).reshape(self.x_shape) if self.wants(0) else None
        gw = g.T @ x.reshape(-1, x.shape[-1]) if self.wants(1) else None
        return gx, gw, gb


class LinearReLU(Linear):
    """relu(x @ w.T + b): the Linear and the ReLU (max(y, 0), as torch) in one op. Backward
    keeps the output, which the next layer keeps anyway, instead of a pre-activation."""

    def forward(self, x, w, b=None):
        self.y = super().forward(x, w, b)                           # (..., out)
        return _xp(x).maximum(self.y, 0, out=self.y)

    def backward(self, gy):
        g = (gy * (self.y > 0)).reshape(-1, gy.shape[-1])           # (N, out)
        return self.input_grads(g, g.sum(axis=0) if self.wants(2) else None)


def linear(x, weight, bias=None):
    return run(Linear, x, weight, bias)


def linear_relu(x, weight, bias=None):
    """relu(x @ weight.T + bias) in one op (the feed-forward's first Linear and its ReLU)."""
    return run(LinearReLU, x, weight, bias)


# ---------------------------------------------------------------- layer norm
class LayerNorm(Function):
    """Layer normalisation over the last `nd` dimensions, then an optional scale w and shift b:

        y = (x - mean) / sqrt(var + eps) * w + b        (the biased variance, as torch)

    Backward, with xhat = (x - mean) * rstd and g = gy * w the gradient of xhat:
        gx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  gw = sum(gy * xhat),  gb = sum(gy)
    (means over the normalised dimensions, sums over the others).
    """

    def forward(self, x, w=None, b=None, nd=1, eps=1e-5):
        self.axes = tuple(range(x.ndim - nd, x.ndim))               # the normalised dimensions
        xc = x - x.mean(axis=self.axes, keepdims=True)              # centred
        self.rstd = 1 / _xp(x).sqrt((xc * xc).mean(axis=self.axes, keepdims=True) + float(eps))
        self.xhat, self.w = xc * self.rstd, w                       # normalised
        y = self.xhat if w is None else self.xhat * w
        return y if b is None else y + b

    def backward(self, gy):
        xhat, axes = self.xhat, self.axes
        lead = tuple(range(gy.ndim - len(axes)))                    # the other dimensions
        needs = self.needs_grad                                     # x, w, b
        gx = None
        if needs[0]:
            g = gy if self.w is None else gy * self.w
            gx = self.rstd * (g - g.mean(axis=axes, keepdims=True)
                              - xhat * (g * xhat).mean(axis=axes, keepdims=True))
        gw = (gy * xhat).sum(axis=lead) if needs[1] else None
        gb = gy.sum(axis=lead) if needs[2] else None
        return gx, gw, gb


def layer_norm(x, weight, bias, nd=1, eps=1e-5):
    return run(LayerNorm, x, weight, bias, nd=nd, eps=eps)


# ---------------------------------------------------------------- cross-entropy
class CrossEntropy(Function):
    """Softmax cross-entropy of logits x (N, C), against either targets:

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
        return reduce_rows(loss, reduction, self.count)

    def backward(self, gy):
        c, eps = self.p.shape[1], self.eps
        scale = (gy[:, None] if self.reduction == "none" else gy if self.reduction == "sum"
                 else mean_grad(gy, self.count))              # each row's loss gradient
        gx = self.p                                         # softmax p, reused
        if self.probs:  # d/dx = p * sum_c q_c - q;  d/dt = -(1 - eps) * log p
            gx *= self.q.sum(axis=1, keepdims=True)
            gx -= self.q
            gx *= scale
            gt = self.logp * (-scale * gy.dtype.type(1 - eps)) if self.needs_grad[1] else None
            return gx, gt
        if c:  # d/dx = p - (1 - eps) * onehot(t) - eps / C
            gx[self.rows, self.tt] -= 1 - eps if eps else 1
            if eps:
                gx -= gx.dtype.type(eps / c)
        gx *= self.valid[:, None]
        gx *= scale
        return gx, None


def cross_entropy(x, t, reduction="mean", ignore_index=-100, label_smoothing=0.0):
    return run(CrossEntropy, x, t, reduction=reduction, ignore_index=ignore_index,
               label_smoothing=label_smoothing)


# ---------------------------------------------------------------- embedding
class Embedding(Function):
    """The rows of a table w (n, C) that integer indices idx (any shape) pick: w[idx] (..., C).
    Backward adds each row's gradient into its row of the table's (repeated indices add up)."""

    def forward(self, w, idx):
        self.shape, self.idx = w.shape, idx
        return w[idx]

    def backward(self, gy):
        gw = _xp(gy).zeros(self.shape, dtype=gy.dtype)
        backend.scatter_add(gw, self.idx, gy)
        return gw, None


def embedding(weight, idx):
    return run(Embedding, weight, idx)


# ---------------------------------------------------------------- dropout
def keep_mask(shape, p, xp=np):
    """A bool array of `shape`, True (keep) with probability 1 - p, from the library's random
    stream: rng.random(shape, float32) >= p, the one draw of every dropout here."""
    return _random.rng(xp).random(shape, dtype=np.float32) >= p


class Dropout(Function):
    """Inverted dropout: x * keep / (1 - p), with a bool keep-mask (keep_mask)."""

    def forward(self, x, p):
        self.keep, self.scale = keep_mask(x.shape, p, _xp(x)), x.dtype.type(1 / (1 - p))
        return x * self.keep * self.scale

    def backward(self, gy):
        return gy * self.keep * self.scale


def dropout(x, p):
    """Inverted dropout of the Tensor x with probability p (0 < p < 1), in one op."""
    return run(Dropout, x, float(p))


# ---------------------------------------------------------------- causal attention
class CausalAttention(Function):
    """Causal attention of every head: q (B, nh, Tq, hs) against k, v (B, nh, Tk, hs), Tq <= Tk,
    to y (B, nh, Tq, hs),

        att = softmax(scale * q @ k^T)    each query seeing the keys up to its own position
        y = dropout(att, p) @ v           the weights dropped as F.dropout drops them

    in one op. The queries are the last Tq of the Tk positions, so query i sees keys
    0 .. Tk - Tq + i: Tq = Tk is a sequence attending to itself; Tq < Tk are new positions after
    Tk - Tq earlier ones (generation with a KV cache: one query, Tq = 1, sees every key). It
    equals the composition F.scaled_dot_product_attention runs without the fused path, with
    is_causal=True (Tq = Tk) or with no mask (Tq = 1); the mask, the scaled scores and the
    dropped weights are not kept.
    """

    def forward(self, q, k, v, p=0.0, scale=1.0):
        xp = _xp(q)
        Tq, Tk = q.shape[-2], k.shape[-2]
        att = (q @ xp.swapaxes(k, -1, -2)) * q.dtype.type(scale)   # (B, nh, Tq, Tk) scores
        future = xp.triu(xp.ones((Tq, Tk), dtype=bool), k=Tk - Tq + 1)  # keys after the query
        att = xp.where(future, att.dtype.type(-np.inf), att)
        att = xp.exp(att - att.max(axis=-1, keepdims=True))
        att /= att.sum(axis=-1, keepdims=True)                     # softmax over the keys
        self.q, self.k, self.v, self.att = q, k, v, att
        self.keep = keep_mask(att.shape, p, xp) if p > 0 else None
        self.p, self.scale = p, q.dtype.type(scale)
        return self.dropped(att) @ v                               # (B, nh, Tq, hs)

    def dropped(self, a):
        """a (B, nh, Tq, Tk) with the dropout of the weights applied (a itself without dropout)."""
        return a if self.keep is None else a * self.keep * a.dtype.type(1 / (1 - self.p))

    def backward(self, gy):
        xp, att, q, k = _xp(gy), self.att, self.q, self.k
        gv = xp.swapaxes(self.dropped(att), -1, -2) @ gy           # (B, nh, Tk, hs)
        ga = self.dropped(gy @ xp.swapaxes(self.v, -1, -2))        # (B, nh, Tq, Tk) d(weights)
        gs = att * (ga - (ga * att).sum(axis=-1, keepdims=True)) * self.scale  # d(scores)
        return gs @ k, xp.swapaxes(gs, -1, -2) @ q, gv


def causal_attention(q, k, v, dropout_p=0.0, scale=None):
    """Causal attention of q (B, nh, Tq, hs) against k, v (B, nh, Tk, hs), Tq <= Tk, the
    queries being the last Tq positions, in one op (F.scaled_dot_product_attention's fused
    path); scale defaults to hs ** -0.5."""
    if not (q.ndim == 4 and k.shape == v.shape and k.ndim == 4 and q.shape[:2] == k.shape[:2]
            and q.shape[3] == k.shape[3] and q.shape[2] <= k.shape[2]):
        raise ValueError(f"causal_attention needs q (B, nh, Tq, hs) and k, v of one shape "
                         f"(B, nh, Tk, hs) with Tq <= Tk, got {q.shape}, {k.shape}, {v.shape}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {dropout_p}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return run(CausalAttention, q, k, v, p=float(dropout_p), scale=scale)


# ---------------------------------------------------------------- AdamW
class AdamWUpdate:
    """One step of torch.optim.AdamW's update rule, in place, on arrays of one shape and dtype:
    p (parameters), g (their gradient), m and v (the moments exp_avg, exp_avg_sq); `step`
    counts from 1 (the step being taken).

        p = p * (1 - lr * weight_decay)                      (decoupled weight decay)
        m = m + (1 - beta1) * (g - m)                        (torch's lerp)
        v = v * beta2 + (1 - beta2) * g * g
        p = p - lr / (1 - beta1**step) * m / (sqrt(v) / sqrt(1 - beta2**step) + eps)

    Not a Function: nothing here is differentiated. optim.AdamW calls adamw_update.
    """

    @staticmethod
    def apply(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
        xp = _xp(p)
        if weight_decay != 0:
            p *= 1 - lr * weight_decay
        m += (g - m) * (1 - beta1)
        v *= beta2
        v += g * (1 - beta2) * g
        denom = xp.sqrt(v) / math.sqrt(1 - beta2 ** step) + eps
        p -= m / denom * (lr / (1 - beta1 ** step))


def adamw_update(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
    run(AdamWUpdate, p, g, m, v, step, lr, beta1, beta2, eps, weight_decay)
