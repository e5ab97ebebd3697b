"""Fused operations for the GPT training step: a chain of primitives in one Function.

Each op here computes what a short composition of ops.py primitives computes, in one forward
and one backward, without the intermediate tensors, the copies that go with them and the
engine's per-op work. They exist because the profile of a training step said so (see
benchmarks/); tests/test_fused.py checks each against the composition it replaces, against
PyTorch and with float64 central differences.

    causal_attention(qkv, n_head, dropout_p)   the attention of a GPT block, from its fused
                                                q/k/v projection to the heads side by side
    linear_relu(x, weight, bias)               relu(x @ weight.T + bias), the feed-forward's
                                                first layer

Shapes: B batch, T time, C = nh * hs channels, nh heads of size hs.
"""
import numpy as np

from . import backend
from . import random as _random
from .tensor import Function

# queries are processed in chunks of this many positions once T reaches 2 chunks: a chunk
# attends only to the keys up to its last position, which skips most of the masked future
ATTENTION_CHUNK = 64


def _xp(*a):
    return backend.get_array_module(*a)


def dropout_keep(shape, p, xp=np):
    """A bool array of `shape`: True (keep) with probability 1 - p, from the library's stream.

    The draw F.dropout makes, so a fused op with dropout equals the composed one."""
    return _random.rng(xp).random(shape, dtype=np.float32) >= p


def _causal_softmax_(att, scale, start):
    """att (..., Tq, Tk) <- softmax(scale * att) over the last axis, in place, with key j
    masked out of query row i when j > start + i (row i sits at position start + i)."""
    xp = _xp(att)
    tq, tk = att.shape[-2:]
    att *= att.dtype.type(scale)
    if tk > start + 1:
        future = xp.triu(xp.ones((tq, tk), dtype=bool), k=start + 1)     # (Tq, Tk)
        att += xp.where(future, -xp.inf, 0.0).astype(att.dtype)           # -inf where j > start + i
    att -= att.max(axis=-1, keepdims=True)
    xp.exp(att, out=att)
    att /= att.sum(axis=-1, keepdims=True)
    return att


class CausalAttention(Function):
    """Multi-head causal self-attention from the output of the fused q/k/v projection.

    qkv (B, T, 3*C): every head's queries (head h in columns h*hs:(h+1)*hs), then the keys,
    then the values. Returns (B, T, C), the heads' outputs side by side. Equal to

        q, k, v = qkv.reshape(B, T, 3, nh, hs).permute(2, 0, 3, 1, 4)   # each (B, nh, T, hs)
        att = causal_softmax(q @ k.transpose(-2, -1), scale=hs ** -0.5)  # (B, nh, T, T)
        att = dropout(att, p)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)

    with the dropout keep-mask drawn as F.dropout draws it. Backward keeps only the attention
    weights and a bool keep-mask, and writes the q/k/v gradients into one (B, T, 3*C) array.
    For T >= 2 * ATTENTION_CHUNK the queries go in chunks, each against the keys up to its
    own position only: the masked future (nearly half of the scores) is never computed.
    """

    def forward(self, qkv, n_head, p=0.0):
        xp = _xp(qkv)
        B, T, C3 = qkv.shape
        nh, hs = n_head, C3 // (3 * n_head)
        qkv5 = qkv.reshape(B, T, 3, nh, hs)                         # (B, T, 3, nh, hs)
        q, k, v = (qkv5[:, :, i].transpose(0, 2, 1, 3) for i in range(3))   # each (B, nh, T, hs)
        self.q, self.k, self.v, self.p, self.scale = q, k, v, p, hs ** -0.5
        self.keep = dropout_keep((B, nh, T, T), p, xp) if p > 0 else None   # (B, nh, T, T)
        chunk = ATTENTION_CHUNK if T >= 2 * ATTENTION_CHUNK else T
        self.chunks = [(s, min(s + chunk, T)) for s in range(0, T, chunk)]
        self.att = []                                               # per chunk (B, nh, c, e)
        y = xp.empty((B, T, nh, hs), dtype=qkv.dtype)               # (B, T, nh, hs)
        for s, e in self.chunks:
            att = q[:, :, s:e] @ k[:, :, :e].transpose(0, 1, 3, 2)  # (B, nh, c, e) scores
            _causal_softmax_(att, self.scale, s)
            self.att.append(att)
            y[:, s:e] = (self._dropped(att, s, e) @ v[:, :, :e]).transpose(0, 2, 1, 3)
        return y.reshape(B, T, nh * hs)                             # (B, T, C): heads side by side

    def _dropped(self, att, s, e):
        """The chunk's attention weights after dropout (a new array), or att itself."""
        if self.keep is None:
            return att
        d = att * self.keep[:, :, s:e, :e]
        d *= d.dtype.type(1.0 / (1.0 - self.p))
        return d

    def backward(self, gy):
        xp = _xp(gy)
        q, k, v = self.q, self.k, self.v
        B, nh, T, hs = q.shape
        g = gy.reshape(B, T, nh, hs).transpose(0, 2, 1, 3)          # (B, nh, T, hs)
        gq = xp.empty((B, nh, T, hs), dtype=gy.dtype)
        gk = xp.zeros((B, nh, T, hs), dtype=gy.dtype)
        gv = xp.zeros((B, nh, T, hs), dtype=gy.dtype)
        rescale = 1.0 if self.keep is None else 1.0 / (1.0 - self.p)
        for (s, e), att in zip(self.chunks, self.att):
            gc = g[:, :, s:e]                                       # (B, nh, c, hs)
            gv[:, :, :e] += self._dropped(att, s, e).transpose(0, 1, 3, 2) @ gc
            ga = gc @ v[:, :, :e].transpose(0, 1, 3, 2)             # (B, nh, c, e) d(dropped att)
            if self.keep is not None:
                ga *= self.keep[:, :, s:e, :e]                      # the 1/(1-p) goes in below
            dot = (ga * att).sum(axis=-1, keepdims=True)            # (B, nh, c, 1)
            ga -= dot
            ga *= att
            ga *= ga.dtype.type(self.scale * rescale)               # d(scores)
            gq[:, :, s:e] = ga @ k[:, :, :e]
            gk[:, :, :e] += ga.transpose(0, 1, 3, 2) @ q[:, :, s:e]
        gqkv = xp.empty((B, T, 3, nh, hs), dtype=gy.dtype)          # (B, T, 3, nh, hs)
        for i, gi in enumerate((gq, gk, gv)):
            gqkv[:, :, i] = gi.transpose(0, 2, 1, 3)                # (B, T, nh, hs)
        return gqkv.reshape(B, T, 3 * nh * hs)                      # (B, T, 3*C)


def causal_attention(qkv, n_head, dropout_p=0.0):
    """Causal self-attention of every head from the fused projection qkv (B, T, 3*C) to the
    heads' outputs side by side (B, T, C); dropout_p > 0 drops attention weights (training)."""
    if qkv.ndim != 3 or qkv.shape[-1] % (3 * n_head):
        raise ValueError(f"causal_attention needs qkv of shape (B, T, 3 * n_head * head_size), "
                         f"got {qkv.shape} with n_head={n_head}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {dropout_p}")
    return CausalAttention.apply(qkv, n_head=int(n_head), p=float(dropout_p))


class LinearReLU(Function):
    """relu(x @ w.T + b) for x (..., in), w (out, in), b (out,) or None: the Linear and the
    ReLU in one op. Backward keeps the output (which the next layer keeps anyway) instead of
    a pre-activation and a mask."""

    def forward(self, x, w, b=None):
        y = x.reshape(-1, x.shape[-1]) @ w.T                        # (N, out)
        if b is not None:
            y += b
        y *= y > 0                                                  # relu (as ReLU: x * (x > 0))
        self.x, self.w, self.y = x, w, y
        return y.reshape(x.shape[:-1] + (w.shape[0],))              # (..., out)

    def backward(self, gy):
        x, w = self.x, self.w
        g = gy.reshape(self.y.shape) * (self.y > 0)                 # (N, out)
        gx = (g @ w).reshape(x.shape) if self.needs_grad[0] else None
        gw = g.T @ x.reshape(-1, x.shape[-1]) if self.needs_grad[1] else None
        gb = g.sum(axis=0) if len(self.needs_grad) > 2 and self.needs_grad[2] else None
        return gx, gw, gb


def linear_relu(x, weight, bias=None):
    """relu(x @ weight.T + bias) in one op (the feed-forward's first Linear and its ReLU)."""
    if bias is None:
        return LinearReLU.apply(x, weight)
    return LinearReLU.apply(x, weight, bias)
