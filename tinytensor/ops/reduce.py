"""Reductions: sum, mean, amax/amin, and (below) the indexed reductions and sampling ops."""
import numpy as np

from ..tensor import Function
from ._common import _xp, cast, wrap_dims


class Sum(Function):
    def forward(self, x, axis=None, keepdims=False):
        self.shape, self.axis, self.keepdims = x.shape, axis, keepdims
        return x.sum(axis=axis, keepdims=keepdims)

    def backward(self, gy):
        xp = _xp(gy)
        if not self.keepdims and self.axis is not None:
            gy = xp.expand_dims(gy, self.axis)
        return xp.broadcast_to(gy, self.shape)


def sum(x, dim=None, keepdim=False, *, dtype=None):  # noqa: A001
    """Sum over dim (an int, a tuple of ints, or None: all); bool and integer tensors sum to
    int64, as in torch."""
    if dtype is not None:
        x = cast(x, dtype)
    elif x.dtype.kind in "biu":
        x = cast(x, np.int64)
    return Sum.apply(x, axis=wrap_dims(dim, x.ndim), keepdims=keepdim)


def mean(x, dim=None, keepdim=False, *, dtype=None):
    if dtype is not None:
        x = cast(x, dtype)
    if x.dtype.kind != "f":
        raise RuntimeError(f"mean(): could not infer output dtype. Input dtype must be floating "
                           f"point, got {x.dtype}: convert with .float() first")
    axes = wrap_dims(dim, x.ndim)
    n = x.size if axes is None else int(np.prod([x.shape[a] for a in axes]))
    return sum(x, dim, keepdim) / n


class Max(Function):
    """max (or min) over dims; the gradient is shared equally among tied extremes (torch.amax)."""

    def forward(self, x, axis=None, keepdims=False, lower=False):
        self.x, self.axis, self.keepdims = x, axis, keepdims
        if x.size == 0:
            raise IndexError(f"{'amin' if lower else 'amax'}(): expected a non-empty tensor "
                             f"to reduce, got shape {x.shape}")
        self.y = x.min(axis=axis, keepdims=True) if lower else x.max(axis=axis, keepdims=True)
        if keepdims:
            return self.y
        return self.y.reshape(()) if axis is None else self.y.squeeze(axis)

    def backward(self, gy):
        if not self.keepdims:
            gy = gy.reshape(self.y.shape)
        mask = (self.x == self.y)
        count = mask.sum(axis=self.axis, keepdims=True)
        return mask * (gy / count).astype(gy.dtype, copy=False)


def amax(x, dim=(), keepdim=False):
    """The largest values over dim (an int or a tuple; () or None: all); ties share the gradient."""
    axes = wrap_dims(None if dim == () else dim, x.ndim)
    return Max.apply(x, axis=axes, keepdims=keepdim)


def amin(x, dim=(), keepdim=False):
    axes = wrap_dims(None if dim == () else dim, x.ndim)
    return Max.apply(x, axis=axes, keepdims=keepdim, lower=True)


def max(x, dim=None, keepdim=False):  # noqa: A001 - replaced by the indexed reductions below
    return amax(x, () if dim is None else dim, keepdim)


def min(x, dim=None, keepdim=False):  # noqa: A001 - replaced by the indexed reductions below
    return amin(x, () if dim is None else dim, keepdim)


def _all_any(name):
    def reduce(x, dim=None, keepdim=False):
        axes = wrap_dims(dim, x.ndim)
        from ..tensor import Tensor
        return Tensor(getattr(_xp(x.data), name)(x.data.astype(bool), axis=axes, keepdims=keepdim))
    reduce.__name__ = name
    reduce.__doc__ = f"torch.{name}: a bool tensor, True where {name} of the elements over dim is."
    return reduce


all = _all_any("all")  # noqa: A001
any = _all_any("any")  # noqa: A001
