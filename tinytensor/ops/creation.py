"""Tensor factories, as torch's: zeros, ones, full, eye, arange, the *_like forms, and random
ones (randn, rand, randint, multinomial) drawn from the library's stream (tt.manual_seed)."""
import numbers

import numpy as np

from .. import backend, dtypes
from .. import random as _random
from ..tensor import Tensor
from .shape import _sizes


def _make(arr, device="cpu", requires_grad=False):
    return Tensor(backend.to_device(arr, device), requires_grad=requires_grad)


def _float_dtype(dtype):
    return np.dtype(dtype or dtypes.get_default_dtype())


def _check_shape(shape, what):
    shape = _sizes(shape, what)
    if any(n < 0 for n in shape):
        raise RuntimeError(f"{what}: trying to create a tensor with negative dimension: {list(shape)}")
    return shape


def zeros(*size, dtype=None, device="cpu", requires_grad=False):
    return _make(np.zeros(_check_shape(size, "zeros"), _float_dtype(dtype)), device, requires_grad)


def ones(*size, dtype=None, device="cpu", requires_grad=False):
    return _make(np.ones(_check_shape(size, "ones"), _float_dtype(dtype)), device, requires_grad)


def full(size, fill_value, *, dtype=None, device="cpu", requires_grad=False):
    """A tensor of `size` filled with fill_value; its dtype as torch infers it from the value
    (bool, int64 or the default float) unless given."""
    if isinstance(fill_value, Tensor):
        fill_value = fill_value.item()
    dtype = np.dtype(dtype) if dtype is not None else dtypes.scalar_dtype(fill_value)
    return _make(np.full(_check_shape((size,), "full"), fill_value, dtype), device, requires_grad)


def eye(n, m=None, *, dtype=None, device="cpu", requires_grad=False):
    m = n if m is None else m
    for v, name in ((n, "n"), (m, "m")):
        if not isinstance(v, numbers.Integral) or v < 0:
            raise RuntimeError(f"eye: {name} must be a non-negative int, got {v!r}")
    return _make(np.eye(n, m, dtype=_float_dtype(dtype)), device, requires_grad)


def arange(start, end=None, step=1, *, dtype=None, device="cpu", requires_grad=False):
    """Values start, start + step, ... below end; int64 when all of them are integers, else the
    default float dtype (as torch)."""
    if end is None:
        start, end = 0, start
    vals = [v.item() if isinstance(v, (Tensor, np.generic)) else v for v in (start, end, step)]
    if step == 0:
        raise RuntimeError("arange: step must be nonzero")
    if (end - start) * step < 0 and end != start:
        raise RuntimeError(f"arange: upper bound and larger bound inconsistent with step sign "
                           f"(start={start}, end={end}, step={step})")
    if dtype is None:
        dtype = np.int64 if all(isinstance(v, numbers.Integral) for v in vals) \
            else dtypes.get_default_dtype()
    return _make(np.arange(*vals, dtype=dtype), device, requires_grad)


def _like(x, dtype):
    return np.dtype(dtype) if dtype is not None else x.dtype


def zeros_like(x, *, dtype=None, device=None, requires_grad=False):
    return _make(np.zeros(x.shape, _like(x, dtype)), device or x.device, requires_grad)


def ones_like(x, *, dtype=None, device=None, requires_grad=False):
    return _make(np.ones(x.shape, _like(x, dtype)), device or x.device, requires_grad)


def full_like(x, fill_value, *, dtype=None, device=None, requires_grad=False):
    return _make(np.full(x.shape, fill_value, _like(x, dtype)), device or x.device, requires_grad)


def randn(*size, dtype=None, device="cpu", requires_grad=False):
    shape = _check_shape(size, "randn")
    arr = _random.rng().standard_normal(shape).astype(_float_dtype(dtype))
    return _make(arr, device, requires_grad)


def rand(*size, dtype=None, device="cpu", requires_grad=False):
    shape = _check_shape(size, "rand")
    return _make(_random.rng().random(shape).astype(_float_dtype(dtype)), device, requires_grad)


def randint(low, high=None, size=None, *, dtype=None, device="cpu"):
    """torch.randint(low=0, high, size): int64 values in [low, high)."""
    if size is None and isinstance(high, (tuple, list)):  # randint(high, size)
        low, high, size = 0, low, high
    if high is None:
        low, high = 0, low
    if size is None:
        raise TypeError("randint() missing the required argument 'size' (a tuple)")
    if low >= high:
        raise RuntimeError(f"random_ expects 'from' to be less than 'to', but got from={low} >= to={high}")
    shape = _check_shape((size,), "randint")
    arr = _random.rng().integers(low, high, size=shape).astype(dtype or np.int64)
    return _make(arr, device)


def multinomial(probs, num_samples, replacement=False):
    """torch.multinomial: num_samples category indices per row of probs (1-D or 2-D, weights
    that need not sum to 1), int64. Drawn from the library's stream, so the draws differ from
    torch's for the same seed."""
    p = backend.to_numpy(probs.data if isinstance(probs, Tensor) else np.asarray(probs))
    if p.ndim not in (1, 2):
        raise RuntimeError(f"multinomial: prob_dist must be 1 or 2 dim, got shape {p.shape}")
    p2 = np.atleast_2d(p).astype(np.float64)
    if not np.all(np.isfinite(p2)) or np.any(p2 < 0):
        raise RuntimeError("multinomial: probability tensor contains either `inf`, `nan` or element < 0")
    sums = p2.sum(axis=1, keepdims=True)
    if np.any(sums <= 0):
        raise RuntimeError("multinomial: invalid multinomial distribution (sum of probabilities <= 0)")
    if not replacement and num_samples > p2.shape[1]:
        raise RuntimeError(f"multinomial: cannot sample n_sample={num_samples} > "
                           f"prob_dist.size(-1)={p2.shape[1]} samples without replacement")
    gen = _random.rng()
    rows = [gen.choice(p2.shape[1], size=num_samples, replace=replacement, p=row / s)
            for row, s in zip(p2, sums[:, 0])]
    out = np.array(rows, dtype=np.int64).reshape(p2.shape[0], num_samples)
    return _make(out if p.ndim == 2 else out[0], probs.device if isinstance(probs, Tensor) else "cpu")
