"""Functional forms of the layers: numerically stable softmax family, cross-entropy,
layer_norm, dropout, activations, linear and embedding."""
import numbers

import numpy as np

from .. import backend, fused
from ..ops import (CrossEntropy, LayerNorm, Linear, Softmax, LogSoftmax, gelu, getitem,  # noqa: F401
                   leaky_relu, linear, log_softmax, relu, sigmoid, silu, softmax)
from ..tensor import Tensor

__all__ = ["sigmoid", "silu", "leaky_relu", "softmax", "log_softmax", "cross_entropy", "layer_norm", "dropout", "relu", "gelu",
           "linear", "embedding", "tanh"]


def tanh(x):
    return x.tanh()


def cross_entropy(logits, targets, reduction="mean", ignore_index=-100):
    """Mean (or 'sum' / 'none') negative log-likelihood of integer targets under softmax(logits).

    logits: (N, C) Tensor; targets: (N,) integer array or Tensor. Targets equal to
    ignore_index contribute nothing (and are not counted in the mean).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    t = targets.data if isinstance(targets, Tensor) else targets
    xp = backend.get_array_module(logits.data)
    t = xp.asarray(backend.to_device(t, logits.device) if not isinstance(t, numbers.Number) else t)
    if logits.ndim != 2:
        raise ValueError(f"cross_entropy expects logits of shape (N, C), got {logits.shape}: "
                         f"reshape with logits.view(-1, C)")
    if t.shape != (logits.shape[0],):
        raise ValueError(f"cross_entropy targets must have shape ({logits.shape[0]},), got {t.shape}")
    if t.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy targets must be integers, got dtype {t.dtype}")
    c = logits.shape[1]
    bad = (t != ignore_index) & ((t < 0) | (t >= c))
    if t.size and bool(bad.any()):
        raise IndexError(f"cross_entropy target {int(t[bad][0])} is out of range: targets must be in "
                         f"[0, {c}) or equal ignore_index={ignore_index}")
    return CrossEntropy.apply(logits, t, reduction=reduction, ignore_index=ignore_index)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    if isinstance(normalized_shape, numbers.Integral):
        normalized_shape = (normalized_shape,)
    normalized_shape = tuple(normalized_shape)
    nd = len(normalized_shape)
    if tuple(x.shape[x.ndim - nd:]) != normalized_shape:
        raise ValueError(f"layer_norm: input shape {x.shape} does not end with normalized_shape "
                         f"{normalized_shape}")
    return LayerNorm.apply(x, weight, bias, nd=nd, eps=eps)


def dropout(x, p=0.5, training=True):
    """Inverted dropout: zero each element with probability p, scale the rest by 1/(1-p)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return x
    xp = backend.get_array_module(x.data)
    if p == 1.0:
        return x * xp.zeros(x.shape, dtype=x.dtype)
    return fused.dropout(x, p)  # x * keep / (1 - p), keep drawn as rng.random(shape) >= p


def embedding(idx, weight):
    """Rows of weight (num_embeddings, dim) picked by integer indices of any shape."""
    i = idx.data if isinstance(idx, Tensor) else idx
    xp = backend.get_array_module(weight.data)
    i = xp.asarray(backend.to_device(np.asarray(i) if not hasattr(i, "dtype") else i, weight.device))
    if i.dtype.kind not in "iu":
        raise TypeError(f"embedding indices must be integers, got dtype {i.dtype}")
    n = weight.shape[0]
    if i.size and (int(i.min()) < 0 or int(i.max()) >= n):
        raise IndexError(f"embedding index out of range: indices must be in [0, {n}), "
                         f"got min {int(i.min())}, max {int(i.max())}")
    return getitem(weight, i)
