"""Functional forms of the layers: numerically stable softmax family, cross-entropy,
layer_norm, dropout, activations, linear, embedding and scaled_dot_product_attention."""
import math
import numbers

import numpy as np

from .. import backend, fused
from ..ops import (CrossEntropy, LayerNorm, Linear, Softmax, LogSoftmax, gelu, getitem,  # noqa: F401
                   leaky_relu, linear, log_softmax, relu, sigmoid, silu, softmax)
from ..tensor import Tensor

__all__ = ["softmax", "log_softmax", "cross_entropy", "layer_norm", "dropout", "relu", "gelu",
           "sigmoid", "silu", "leaky_relu", "linear", "embedding", "tanh",
           "scaled_dot_product_attention", "linear_relu"]


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


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 *, scale=None, enable_gqa=False):
    """Attention as torch.nn.functional.scaled_dot_product_attention: softmax(query @ key^T *
    scale + mask) @ value, the weights dropped with probability dropout_p.

    query (..., L, E), key (..., S, E), value (..., S, Ev) -> (..., L, Ev); the leading
    dimensions broadcast. attn_mask, broadcastable to (..., L, S): bool (True: the key takes
    part) or float (added to the scores). is_causal: query i sees keys 0..i (the top-left
    lower triangle of (L, S)); not together with attn_mask. scale: 1 / sqrt(E) by default.
    dropout_p in (0, 1] drops attention weights as F.dropout does, whenever it is given (there
    is no training flag; pass 0.0 to evaluate). A query with no key left by the mask gets
    all-zero weights (its output is 0), as in torch.

    Causal self-attention of 4-D query, key and value of one shape (B, nh, T, hs) without a
    mask runs as one fused op (tinytensor.fused.causal_sdpa); everything else composes ops.
    enable_gqa=True (grouped-query attention) is not supported.
    """
    _check_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    L, S, E = query.shape[-2], key.shape[-2], query.shape[-1]
    scale = (1.0 / math.sqrt(E) if E else math.inf) if scale is None else float(scale)
    p = float(dropout_p)
    if is_causal and query.ndim == 4 and query.shape == key.shape == value.shape and p < 1.0:
        return fused.causal_sdpa(query, key, value, p, scale)           # (B, nh, T, hs)
    att = (query @ key.transpose(-2, -1)) * scale                       # (..., L, S) scores
    if is_causal:
        att = att.masked_fill(~np.tril(np.ones((L, S), dtype=bool)), -math.inf)  # the future
    elif attn_mask is not None:
        att = _apply_attention_mask(att, attn_mask)
    if S > 0:  # no keys (S == 0): the weights (..., L, 0) are empty and the output is 0
        att = softmax(att, dim=-1) if attn_mask is None else _softmax_no_key_zero(att)
        att = dropout(att, p) if p > 0 else att
    return att @ value                                                  # (..., L, Ev)


def _apply_attention_mask(att, attn_mask):
    """att with a bool mask's False entries set to -inf, or a float mask added."""
    m = attn_mask.data if isinstance(attn_mask, Tensor) else attn_mask
    if m.dtype == bool:
        return att.masked_fill(~m, -math.inf)                # masked_fill moves m to att's device
    if not isinstance(attn_mask, Tensor):
        attn_mask = Tensor(backend.to_device(m, att.device))
    if attn_mask.dtype != att.dtype:  # a float32 mask on float64 scores (torch allows it)
        attn_mask = attn_mask.astype(att.dtype)
    return att + attn_mask


def _softmax_no_key_zero(att):
    """softmax over the last axis, with rows that are all -inf (no key left) all zero instead of
    NaN, forward and backward (torch's safe softmax)."""
    xp = backend.get_array_module(att.data)
    dead = xp.isneginf(att.data).all(axis=-1, keepdims=True)          # (..., L, 1)
    if not bool(dead.any()):
        return softmax(att, dim=-1)
    return softmax(att.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)


def _check_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """torch's argument checks for scaled_dot_product_attention, with torch's error types."""
    name = "scaled_dot_product_attention"
    for arg, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: {arg} must be a Tensor, got {type(t).__name__}")
    if not isinstance(is_causal, (bool, np.bool_)):
        raise TypeError(f"{name}: is_causal must be a bool, got {type(is_causal).__name__}")
    if not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"{name}: dropout_p must be a float, got {type(dropout_p).__name__}")
    if scale is not None and not isinstance(scale, numbers.Real):
        raise TypeError(f"{name}: scale must be a float or None, got {type(scale).__name__}")
    if enable_gqa:
        raise NotImplementedError(f"{name}: enable_gqa=True (grouped-query attention) is not "
                                  f"supported; repeat key and value to query's number of heads")
    if min(query.ndim, key.ndim, value.ndim) < 2:
        raise RuntimeError(f"{name}: query, key and value must be at least 2-D, got query.dim "
                           f"{query.ndim}, key.dim {key.ndim}, value.dim {value.ndim}")
    if not query.dtype == key.dtype == value.dtype:
        raise RuntimeError(f"Expected query, key, and value to have the same dtype, but got "
                           f"query.dtype: {query.dtype}, key.dtype: {key.dtype} and value.dtype: "
                           f"{value.dtype} instead")
    if query.dtype.kind != "f":
        raise RuntimeError(f"{name} needs floating-point query, key and value, got {query.dtype}")
    if query.shape[-1] != key.shape[-1] or key.shape[-2] != value.shape[-2]:
        raise RuntimeError(f"{name} needs query (..., L, E), key (..., S, E) and value "
                           f"(..., S, Ev), got {query.shape}, {key.shape} and {value.shape}")
    try:
        batch = np.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    except ValueError:
        raise RuntimeError(f"{name}: the leading (batch) dimensions of query {query.shape}, key "
                           f"{key.shape} and value {value.shape} do not broadcast") from None
    if not 0.0 <= dropout_p <= 1.0:  # as torch's flash path (its math path ignores p < 0)
        raise RuntimeError(f"dropout probability has to be between 0 and 1, but got {dropout_p}")
    if attn_mask is None:
        return
    if is_causal:
        raise RuntimeError(f"{name}: Explicit attn_mask should not be set when is_causal=True: "
                           f"pass the mask or is_causal, not both")
    m = attn_mask.data if isinstance(attn_mask, Tensor) else attn_mask
    if not (isinstance(m, np.ndarray) or backend.is_cuda(m)):
        raise TypeError(f"{name}: attn_mask must be a Tensor or an array, got {type(m).__name__}")
    scores = tuple(batch) + (query.shape[-2], key.shape[-2])            # (..., L, S)
    if m.ndim < 2:
        raise IndexError(f"{name}: attn_mask must have at least 2 dimensions (..., L, S) "
                         f"broadcastable to {scores}, got shape {m.shape}")
    if m.dtype != bool and m.dtype not in (np.float32, query.dtype):
        raise RuntimeError(f"Expected attn_mask dtype to be bool or float or to match query "
                           f"dtype, but got attn_mask.dtype: {m.dtype} and query.dtype: "
                           f"{query.dtype} instead")
    try:
        ok = np.broadcast_shapes(m.shape, scores) == scores
    except ValueError:
        ok = False
    if not ok:
        raise RuntimeError(f"{name}: attn_mask of shape {m.shape} does not broadcast to the "
                           f"scores' shape {scores} (..., L, S)")


def linear_relu(x, weight, bias=None):
    """relu(linear(x, weight, bias)) as one fused op (tinytensor.fused.linear_relu; torch has no
    such function): the feed-forward's first layer without the (..., out) pre-activation copy."""
    return fused.linear_relu(x, weight, bias)
