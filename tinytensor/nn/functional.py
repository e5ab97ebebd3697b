"""Functional forms of the layers: numerically stable softmax family, cross-entropy, nll_loss,
one_hot, layer_norm, dropout, activations, linear, embedding and scaled_dot_product_attention."""
import math
import numbers

import numpy as np

from .. import backend, fused
from ..ops import (LogSoftmax, NLLLoss, Softmax, gelu, leaky_relu, log_softmax,  # noqa: F401
                   relu, sigmoid, silu, softmax)
from ..ops._common import check_matmul
from ..tensor import Tensor, get_default_dtype

__all__ = ["softmax", "log_softmax", "cross_entropy", "nll_loss", "one_hot", "layer_norm", "dropout",
           "relu", "gelu", "sigmoid", "silu", "leaky_relu", "linear", "embedding", "tanh",
           "scaled_dot_product_attention", "linear_relu"]


def tanh(x):
    return x.tanh()


_REDUCTIONS = ("mean", "sum", "none")


def _check_loss_args(fn, reduction, **unsupported):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    for name, value in unsupported.items():
        if value is not None:
            fix = "pass weight=None" if name == "weight" else "use reduction='mean', 'sum' or 'none'"
            raise NotImplementedError(f"{fn}: {name}= is not supported (got {value!r}): {fix}")


def _check_logits(fn, x, what="logits"):
    if x.dtype.kind != "f":
        raise NotImplementedError(f"{fn} needs floating point {what}, got dtype {x.dtype}")
    if x.ndim == 0:
        raise ValueError(f"{fn} expects {what} of shape (C,), (N, C) or (N, C, d1, ...), got a "
                         f"0-d tensor")


def _target_array(target, like):
    """The target's array on like's device; Python data becomes an array (floats in the
    default dtype, as tt.tensor makes them)."""
    t = target.data if isinstance(target, Tensor) else target
    if not hasattr(t, "dtype"):
        t = np.asarray(t)
        if t.dtype.kind == "f":
            t = t.astype(np.int64 if t.size == 0 else get_default_dtype())  # [] holds no floats
    xp = backend.get_array_module(like.data)
    return xp.asarray(backend.to_device(t, like.device))


def _class_indices(fn, t, shape, ignore_index, probs_allowed):
    """Check integer class targets t for inputs of `shape` (C,), (N, C) or (N, C, d1, ...) as
    torch does (its error types); return them flattened to (rows,)."""
    expected = () if len(shape) == 1 else (shape[0],) + shape[2:]
    if t.shape != expected and not (len(shape) == 1 and t.shape == (1,)):
        also = f" or {shape} (class probabilities)" if probs_allowed else ""
        msg = (f"{fn} targets must have shape {expected} (class indices){also} for input of "
               f"shape {shape}, got {t.shape}")
        if len(shape) == 1 and t.ndim == 1:
            raise ValueError(f"{msg}: unbatched input takes one target")
        if len(shape) > 1 and (t.ndim == 0 or t.shape[0] != shape[0]):
            raise ValueError(f"{msg}: batch size {t.shape[0] if t.ndim else 0} != {shape[0]}")
        raise RuntimeError(msg)
    if t.dtype.kind not in "iu":
        also = f" (class probabilities need the input's shape {shape})" if probs_allowed else ""
        raise RuntimeError(f"{fn} class-index targets must be integers, got dtype {t.dtype}{also}")
    c = shape[0] if len(shape) == 1 else shape[1]
    bad = (t != ignore_index) & ((t < 0) | (t >= c))
    if t.size and bool(bad.any()):
        raise IndexError(f"{fn} target {int(t[bad][0])} is out of range: targets must be in "
                         f"[0, {c}) or equal ignore_index={ignore_index}")
    return t if t.ndim == 1 else t.reshape(-1)


def _classes_last(x):
    """(C,) -> (1, C); (N, C) as is; (N, C, d1, ...) -> (N * d1 * ..., C), a Tensor or an array."""
    if x.ndim == 1:
        return x.reshape(1, x.shape[0])
    if x.ndim == 2:
        return x
    c = x.shape[1]
    if isinstance(x, Tensor):
        return x.permute(0, *range(2, x.ndim), 1).reshape(-1, c)       # (N, d1, ..., C) -> (rows, C)
    return backend.get_array_module(x).moveaxis(x, 1, -1).reshape(-1, c)


def _loss_shape(shape):
    """The shape of reduction='none' losses for an input of `shape`: () or (N, d1, ...)."""
    return () if len(shape) == 1 else (shape[0],) + tuple(shape[2:])


def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                  reduction="mean", label_smoothing=0.0):
    """torch.nn.functional.cross_entropy: softmax cross-entropy of logits against class targets.

    input: logits (C,), (N, C) or (N, C, d1, ...) with the classes in dimension 1 (the lecture
    reshapes (B, T, C) logits to (B*T, C); passed as they are, torch reads them as N=B, C=T).
    target: integer class indices of shape (), (N,) or (N, d1, ...) -- entries equal to
    ignore_index count neither in the loss nor in the mean -- or class probabilities of the
    input's shape (a mean is then over the N * d1 * ... rows). label_smoothing eps in [0, 1]
    mixes the targets with the uniform distribution: (1 - eps) * target + eps / C.
    reduction: 'mean', 'sum' or 'none' (losses of shape () or (N, d1, ...)).
    weight, size_average and reduce are not supported (NotImplementedError).
    """
    _check_loss_args("cross_entropy", reduction, weight=weight, size_average=size_average,
                     reduce=reduce)
    _check_logits("cross_entropy", input)
    eps = float(label_smoothing)
    if eps > 1.0:
        raise RuntimeError(f"cross_entropy label_smoothing must be between 0.0 and 1.0, got {eps}")
    eps = max(eps, 0.0)  # torch ignores a negative label_smoothing
    t = _target_array(target, input)
    x = input
    if t.shape == x.shape:  # class probabilities
        if t.dtype.kind != "f":
            raise RuntimeError(f"cross_entropy targets of the input's shape {x.shape} are class "
                               f"probabilities and must be floating point, got dtype {t.dtype}; "
                               f"class indices have shape {_loss_shape(x.shape)}")
        if ignore_index >= 0:
            raise RuntimeError(f"cross_entropy ignore_index={ignore_index} is not supported for "
                               f"class-probability (float) targets")
        if isinstance(target, Tensor) and target.requires_grad:
            t = target
        elif isinstance(target, Tensor) and np.may_share_memory(t, target.data):
            t = target.detach()  # its version counter: backward sees a write into target
        dtype = np.result_type(x.dtype, t.dtype)         # as torch promotes input * target
        if x.dtype != dtype:
            x = x.astype(dtype)
        if t.dtype != dtype:
            t = t.astype(dtype)
        loss = fused.cross_entropy(_classes_last(x), _classes_last(t), reduction=reduction,
                                   label_smoothing=eps)
    else:
        t = _class_indices("cross_entropy", t, x.shape, ignore_index, probs_allowed=True)
        if isinstance(target, Tensor) and np.may_share_memory(t, target.data):
            # the targets as a Tensor sharing target's version counter (so backward sees a
            # write into target): target itself where it is (rows,) already
            t = target if t is target.data else target.detach().reshape(-1)
        loss = fused.cross_entropy(_classes_last(x), t, reduction=reduction,
                                   ignore_index=ignore_index, label_smoothing=eps)
    if reduction == "none" and x.ndim != 2:
        loss = loss.reshape(_loss_shape(x.shape))
    return loss


def nll_loss(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
             reduction="mean"):
    """torch.nn.functional.nll_loss: -input[i, target[i]] of log-probabilities input (C,), (N, C)
    or (N, C, d1, ...) (classes in dimension 1) and integer targets (), (N,) or (N, d1, ...).

    Targets equal to ignore_index count neither in the loss nor in the mean.
    weight, size_average and reduce are not supported (NotImplementedError).
    """
    _check_loss_args("nll_loss", reduction, weight=weight, size_average=size_average, reduce=reduce)
    _check_logits("nll_loss", input, "log-probabilities")
    t = _class_indices("nll_loss", _target_array(target, input), input.shape, ignore_index,
                       probs_allowed=False)
    loss = NLLLoss.apply(_classes_last(input), t, reduction=reduction, ignore_index=ignore_index)
    if reduction == "none" and input.ndim != 2:
        loss = loss.reshape(_loss_shape(input.shape))
    return loss


def one_hot(tensor, num_classes=-1):
    """torch.nn.functional.one_hot: int64 of shape tensor.shape + (num_classes,), 1 at each
    class index; num_classes=-1 takes the largest index + 1."""
    i = tensor.data if isinstance(tensor, Tensor) else tensor
    if not hasattr(i, "dtype"):
        i = np.asarray(i)
        if i.size == 0:  # an empty list holds no floats
            i = i.astype(np.int64)
    if i.dtype.kind not in "iu":
        raise TypeError(f"one_hot needs integer class indices, got dtype {i.dtype}")
    xp = backend.get_array_module(i)
    if i.size == 0:
        if num_classes <= 0:
            raise RuntimeError(f"one_hot cannot infer the number of classes of an empty tensor "
                               f"(shape {i.shape}): pass num_classes > 0")
        return Tensor(xp.zeros(i.shape + (num_classes,), dtype=np.int64))
    lo, hi = int(i.min()), int(i.max())
    if lo < 0:
        raise RuntimeError(f"one_hot class values must be non-negative, got {lo}")
    if num_classes == -1:
        num_classes = hi + 1
    elif hi >= num_classes:
        raise RuntimeError(f"one_hot class values must be smaller than num_classes={num_classes}, "
                           f"got {hi}")
    return Tensor((i[..., None] == xp.arange(num_classes)).astype(np.int64))  # (..., num_classes)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    if isinstance(normalized_shape, numbers.Integral):
        normalized_shape = (normalized_shape,)
    normalized_shape = tuple(normalized_shape)
    nd = len(normalized_shape)
    if tuple(x.shape[x.ndim - nd:]) != normalized_shape:
        raise ValueError(f"layer_norm: input shape {x.shape} does not end with normalized_shape "
                         f"{normalized_shape}")
    return fused.layer_norm(x, weight, bias, nd=nd, eps=eps)


def dropout(x, p=0.5, training=True):
    """Inverted dropout: zero each element with probability p, scale the rest by 1/(1-p)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return x * backend.get_array_module(x.data).zeros(x.shape, dtype=x.dtype)
    return fused.dropout(x, p)  # x * keep / (1 - p), keep drawn as rng.random(shape) >= p


def embedding(idx, weight):
    """Rows of weight (num_embeddings, dim) picked by integer indices of any shape."""
    i = idx.data if isinstance(idx, Tensor) else idx
    i = i if hasattr(i, "dtype") else np.asarray(i)
    if i.dtype.kind not in "iu":
        raise TypeError(f"embedding indices must be integers, got dtype {i.dtype}")
    n = weight.shape[0]
    if i.size and bool(((i < 0) | (i >= n)).any()):  # where i is: on a GPU one read, not two
        raise IndexError(f"embedding index out of range: indices must be in [0, {n}), "
                         f"got min {int(i.min())}, max {int(i.max())}")
    i = backend.to_device(i, weight.device)
    # the index Tensor itself where it is already there, so that backward sees a write into it
    return fused.embedding(weight, idx if isinstance(idx, Tensor) and idx.data is i else i)


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

    Two cases run as one fused op (tinytensor.fused.causal_attention), for 4-D query (B, nh,
    L, hs) and key and value of one shape (B, nh, S, hs): causal self-attention (is_causal,
    L = S) and one query against every key (L = 1, no mask: a generation step with a KV
    cache); everything else composes ops. enable_gqa=True (grouped-query attention) is not
    supported.
    """
    _check_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    L, S, E = query.shape[-2], key.shape[-2], query.shape[-1]
    scale = (1.0 / math.sqrt(E) if E else math.inf) if scale is None else float(scale)
    p = float(dropout_p)
    if (L == S if is_causal else L == 1 and S > 0 and attn_mask is None) and p < 1.0 \
            and query.ndim == 4 and key.shape == value.shape == query.shape[:2] + (S, E):
        return fused.causal_attention(query, key, value, p, scale)      # (B, nh, L, hs)
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
        batch = query.shape[:-2] if query.shape[:-2] == key.shape[:-2] == value.shape[:-2] else \
            np.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
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


def linear(x, weight, bias=None):
    """x @ weight.T + bias over the last dimension of x (weight (out, in)), as torch's F.linear."""
    check_matmul(x, weight, "linear")
    if weight.ndim != 2 or x.shape[-1] != weight.shape[1]:
        raise RuntimeError(f"linear: input of shape {x.shape} and weight of shape {weight.shape} "
                           f"cannot be multiplied: expected weight (out_features, {x.shape[-1]})")
    return fused.linear(x, weight, bias)


def linear_relu(x, weight, bias=None):
    """relu(linear(x, weight, bias)) as one fused op (tinytensor.fused.linear_relu; torch has no
    such function): the feed-forward's first layer without the (..., out) pre-activation copy."""
    return fused.linear_relu(x, weight, bias)
