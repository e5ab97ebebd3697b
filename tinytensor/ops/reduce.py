"""Reductions: sum, mean, amax/amin, max/min with indices, argmax/argmin, topk, logsumexp,
var/std, cumsum, gather."""
import builtins
import collections
import math
import numbers
import warnings

import numpy as np

from .. import backend, dtypes
from ..tensor import Function, Tensor
from ._common import _xp, cast, lift, wrap_dim, wrap_dims
from .elementwise import maximum, minimum
from .shape import reshape


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
        raise RuntimeError(f"mean(): could not infer output dtype. Input dtype must be either a "
                           f"floating point or complex dtype. Got: {_torch_dtype_name(x.dtype)} "
                           f"(convert with .float() first)")
    axes = wrap_dims(dim, x.ndim)
    n = x.data.size if axes is None else math.prod(x.shape[a] for a in axes)
    return sum(x, dim, keepdim) / n


class Amax(Function):
    """max over dims; the gradient is shared equally among tied maxima (torch.amax, and torch.max
    without a dim)."""

    def forward(self, x, axis=None, keepdims=False):
        self.x, self.axis, self.keepdims = x, axis, keepdims
        self.y = x.max(axis=axis, keepdims=True)
        return self.y if keepdims else _drop_axes(self.y, axis)

    def backward(self, gy):
        if not self.keepdims:
            gy = gy.reshape(self.y.shape)
        mask = (self.x == self.y)
        count = mask.sum(axis=self.axis, keepdims=True)
        return mask * (gy / count).astype(gy.dtype, copy=False)


def amax(x, dim=(), keepdim=False):
    """The largest values over dim (an int or a tuple; () or None: all); ties share the gradient."""
    axis = wrap_dims(dim, x.ndim)
    _check_reduced_nonempty(x, axis, "amax")
    return Amax.apply(x, axis=axis, keepdims=keepdim)


def _all_any(name):
    def reduce(x, dim=None, keepdim=False):
        axes = wrap_dims(dim, x.ndim)
        return Tensor(getattr(_xp(x.data), name)(x.data.astype(bool), axis=axes, keepdims=keepdim))
    reduce.__name__ = name
    reduce.__doc__ = f"torch.{name}: a bool tensor, True where {name} of the elements over dim is."
    return reduce


all = _all_any("all")  # noqa: A001
any = _all_any("any")  # noqa: A001


# ---------------------------------------------------------------- reductions and sampling (round 2)
# Selections (max/min with a dim, topk) compute their indices without a graph and read the values
# through Gather, so the gradient reaches the selected elements only. Dims are checked by
# _wrap_dim (one dim) and _norm_axis (several) above: torch's IndexError for a dim out of range.
_MaxResult = collections.namedtuple("max", ["values", "indices"])     # as torch.return_types.max
_MinResult = collections.namedtuple("min", ["values", "indices"])
_TopkResult = collections.namedtuple("topk", ["values", "indices"])

_TORCH_DTYPE_NAMES = {"bool": "Bool", "uint8": "Byte", "int8": "Char", "int16": "Short",
                      "int32": "Int", "int64": "Long", "uint16": "UInt16", "uint32": "UInt32",
                      "uint64": "UInt64"}


def _torch_dtype_name(dtype):
    """The name torch's error messages give a dtype (Long for int64)."""
    return _TORCH_DTYPE_NAMES.get(np.dtype(dtype).name, np.dtype(dtype).name)


def _check_reduced_nonempty(x, axis, name, no_dim_error=RuntimeError):
    """torch refuses max-like reductions over nothing: all dims of an empty tensor, or a dim of
    size 0."""
    if x.data.size:
        return
    if axis is None:
        raise no_dim_error(f"{name}(): Expected reduction dim to be specified for input.numel() == 0. "
                           f"Specify the reduction dim with the 'dim' argument.")
    for a in axis:
        if x.shape[a] == 0:
            raise IndexError(f"{name}(): Expected reduction dim {a} to have non-zero size.")


def _kept_shape(shape, axis):
    """The shape of a reduction over axis (None: all) with keepdim=True."""
    return tuple(1 if axis is None or i in axis else n for i, n in enumerate(shape))


def _drop_axes(y, axis):
    """y, reduced with kept dims, without them."""
    return y.reshape(()) if axis is None else y.squeeze(axis)


class Amin(Amax):
    """min over dims; ties share the gradient equally (torch.amin, and torch.min without a dim).
    backward is Amax's: the gradient goes to the elements equal to the result."""

    def forward(self, x, axis=None, keepdims=False):
        self.x, self.axis, self.keepdims = x, axis, keepdims
        self.y = x.min(axis=axis, keepdims=True)
        return self.y if keepdims else _drop_axes(self.y, axis)


def amin(x, dim=(), keepdim=False):
    axis = wrap_dims(dim, x.ndim)
    _check_reduced_nonempty(x, axis, "amin")
    return Amin.apply(x, axis=axis, keepdims=keepdim)


def _along(index, dim):
    """The advanced index that reads index's entries along dim: for dim=1 of a 3-d index,
    (i, index[i, j, k], k) at every (i, j, k)."""
    xp = _xp(index)
    return tuple(index if d == dim else xp.arange(n).reshape((n,) + (1,) * (index.ndim - d - 1))
                 for d, n in enumerate(index.shape))


class Gather(Function):
    """out[i][j][k] = x[i][index[i][j][k]][k] for dim=1 (torch.gather); a 0-d x or index counts as
    1-d. backward adds each output gradient back where it was read (repeated indices accumulate)."""

    def forward(self, x, index, dim=0):
        self.shape, self.ishape = x.shape, index.shape
        if index.size == 0:
            self.where = None
            return _xp(x).zeros(index.shape, dtype=x.dtype)
        self.where = _along(index.reshape(index.shape or (1,)), dim)
        return x.reshape(x.shape or (1,))[self.where].reshape(index.shape)

    def backward(self, gy):
        gx = _xp(gy).zeros(self.shape or (1,), dtype=gy.dtype)
        if self.where is not None:
            backend.scatter_add(gx, self.where, gy.reshape(self.ishape or (1,)))
        return gx.reshape(self.shape), None


def gather(x, dim, index):
    """torch.gather: index is an int32/int64 Tensor (or array) with x's number of dimensions and
    sizes no larger than x's except along dim; the output has index's shape."""
    idx = index.data if isinstance(index, Tensor) else index
    if not isinstance(idx, np.ndarray) and not backend.is_cuda(idx):
        raise TypeError(f"gather(): index must be an integer Tensor, got {type(index).__name__}")
    if idx.dtype not in (np.int32, np.int64):
        raise RuntimeError(f"gather(): Expected dtype int32/int64 for index, got {idx.dtype}")
    dim = wrap_dim(dim, x.ndim)
    idx = backend.to_device(idx, x.device)
    if idx.size:  # torch checks nothing more for an empty index
        if builtins.max(idx.ndim, 1) != builtins.max(x.ndim, 1):
            raise RuntimeError(f"Index tensor must have the same number of dimensions as input "
                               f"tensor: index has {idx.ndim}, input {x.ndim}")
        for d, (m, n) in enumerate(zip(idx.shape, x.shape)):
            if d != dim and m > n:
                raise RuntimeError(f"Size does not match at dimension {d} expected index "
                                   f"{list(idx.shape)} to be no larger than self {list(x.shape)} "
                                   f"apart from dimension {dim}")
        n = x.shape[dim] if x.ndim else 1
        bad = (idx < 0) | (idx >= n)
        if bad.any():
            raise RuntimeError(f"index {int(idx[bad].reshape(-1)[0])} is out of bounds for "
                               f"dimension {dim} with size {n}")
    return Gather.apply(x, idx, dim=dim)


def _select(x, dim, keepdim, name):
    """(values, indices) of max/min over one dim: the first extreme element's index (as torch),
    and its value read through Gather so that only it gets the gradient."""
    if isinstance(dim, (tuple, list)):
        raise TypeError(f"{name}(): dim must be one int, got {dim!r}: for several dims use "
                        f"a{name}(x, dim={tuple(dim)!r})")
    d = wrap_dim(dim, x.ndim)
    if x.ndim == 0:
        idx = _xp(x.data).zeros((), dtype=np.int64)
        return Gather.apply(x, idx, dim=0), Tensor(idx)
    _check_reduced_nonempty(x, (d,), name)
    pick = x.data.argmax if name == "max" else x.data.argmin
    idx = pick(axis=d, keepdims=True).astype(np.int64, copy=False)    # x's shape, 1 along d
    values = Gather.apply(x, idx, dim=d)
    if not keepdim:
        values, idx = reshape(values, idx.shape[:d] + idx.shape[d + 1:]), idx.squeeze(d)
    return values, Tensor(idx)


def _extreme(x, dim, keepdim, name):
    """max or min: elementwise against a tensor `dim`, the whole tensor's, or along one dim."""
    if isinstance(dim, (Tensor, np.ndarray)) or backend.is_cuda(dim):
        return (maximum if name == "max" else minimum)(x, lift(dim, x))
    if dim is None and keepdim:
        raise TypeError(f"{name}(): keepdim=True needs a dim: {name}(x, dim, keepdim=True)")
    if dim is None:
        _check_reduced_nonempty(x, None, name)
        return (Amax if name == "max" else Amin).apply(x, axis=None, keepdims=False)
    return (_MaxResult if name == "max" else _MinResult)(*_select(x, dim, keepdim, name))


def max(x, dim=None, keepdim=False):  # noqa: A001 - mirrors torch.max
    """Without dim: the largest element (0-d; tied maxima share the gradient). With an int dim:
    (values, indices) along it; the gradient goes to the first maximum's index only. With a
    Tensor in place of dim: the elementwise maximum (torch.max(input, other))."""
    return _extreme(x, dim, keepdim, "max")


def min(x, dim=None, keepdim=False):  # noqa: A001 - mirrors torch.min
    """Like max, for the smallest element."""
    return _extreme(x, dim, keepdim, "min")


def _arg(x, dim, keepdim, name):
    """argmax/argmin: int64 indices of the first extreme element; dim None: of the flattened x."""
    if x.dtype == np.bool_:
        raise RuntimeError(f"{name}(): does not support bool input")
    xp = _xp(x.data)
    if dim is None:
        _check_reduced_nonempty(x, None, name, no_dim_error=IndexError)
        i = getattr(x.data.reshape(-1), name)()
        return Tensor(xp.asarray(i, dtype=np.int64).reshape((1,) * x.ndim if keepdim else ()))
    d = wrap_dim(dim, x.ndim)
    if x.ndim == 0:
        return Tensor(xp.zeros((), dtype=np.int64))
    _check_reduced_nonempty(x, (d,), name)
    return Tensor(getattr(x.data, name)(axis=d, keepdims=keepdim).astype(np.int64, copy=False))


def argmax(x, dim=None, keepdim=False):
    return _arg(x, dim, keepdim, "argmax")


def argmin(x, dim=None, keepdim=False):
    return _arg(x, dim, keepdim, "argmin")


def topk(x, k, dim=-1, largest=True, sorted=True):  # noqa: A002 - torch's argument name
    """(values, indices) of the k largest (or smallest) entries along dim, largest first (smallest
    first with largest=False); the gradient goes to the selected entries. NaN counts as larger
    than everything, as in torch. Ties come in index order (torch's order among ties is
    unspecified), and sorted=False returns the same sorted order (torch: unspecified)."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"topk(): k must be an int, got {type(k).__name__}")
    if x.dtype == np.bool_:
        raise RuntimeError("topk(): does not support bool tensors")
    d = wrap_dim(dim, x.ndim)
    n = x.shape[d] if x.ndim else 1
    if not 0 <= k <= n:
        raise RuntimeError(f"selected index k out of range: k={k} for dim {d} of size {n}")
    xp = _xp(x.data)
    if x.ndim == 0:  # torch returns the element for k = 0 or 1
        idx = xp.zeros((), dtype=np.int64)
        return _TopkResult(Gather.apply(x, idx, dim=0), Tensor(idx))
    if largest:  # a stable sort of x reversed, read backwards: descending, ties in index order
        order = (n - 1) - xp.flip(xp.argsort(xp.flip(x.data, d), axis=d, kind="stable"), d)
    else:
        order = xp.argsort(x.data, axis=d, kind="stable")
    idx = order[(slice(None),) * d + (slice(0, k),)].astype(np.int64, copy=False)
    return _TopkResult(Gather.apply(x, idx, dim=d), Tensor(idx))


class LogSumExp(Function):
    """log(sum(exp(x))) over dims, shifted by the max; an infinite max shifts by 0 as in torch,
    so all -inf gives -inf and any +inf gives +inf. backward: gy * exp(x - y) (the softmax)."""

    def forward(self, x, axis=None, keepdims=False):
        xp = _xp(x)
        kept = _kept_shape(x.shape, axis)
        if x.size and 0 not in kept:
            m = x.max(axis=axis, keepdims=True)
            m = xp.where(xp.isinf(m), xp.zeros((), dtype=x.dtype), m)
        else:  # a sum over nothing: log(0) = -inf, as torch
            m = xp.zeros(kept, dtype=x.dtype)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            y = xp.log(xp.exp(x - m).sum(axis=axis, keepdims=True)) + m
        self.x, self.y = x, y
        return y if keepdims else _drop_axes(y, axis)

    def backward(self, gy):
        xp = _xp(gy)
        with np.errstate(invalid="ignore", over="ignore"):
            return gy.reshape(self.y.shape) * xp.exp(self.x - self.y)


def logsumexp(x, dim, keepdim=False):
    """log(sum(exp(x), dim)), stable; dim (an int or a tuple of ints) is required, as in torch.
    Integer input is computed in the default float dtype."""
    if dim is None:
        raise TypeError("logsumexp(): dim is required (an int or a tuple of ints), as in torch")
    if isinstance(dim, (tuple, list)) and not dim and x.ndim:
        raise RuntimeError("logsumexp(): dim=() is refused (torch raises too): name the dims to "
                           "reduce, e.g. dim=tuple(range(x.ndim))")
    if x.dtype.kind not in "fc":
        x = x.astype(dtypes.get_default_dtype())
    return LogSumExp.apply(x, axis=wrap_dims(dim, x.ndim), keepdims=keepdim)


def _moments(x, axis, correction):
    """(x - mean, N - correction, sum((x - mean)**2) / max(0, N - correction)) over axis, dims
    kept: inf (or nan for 0/0) where N <= correction, as torch."""
    n = x.size if axis is None else int(np.prod([x.shape[a] for a in axis]))
    dof = n - correction
    with np.errstate(divide="ignore", invalid="ignore"):
        d = x - x.sum(axis=axis, keepdims=True) / n
        return d, dof, (d * d).sum(axis=axis, keepdims=True) / builtins.max(0, dof)


def _var_scale(dof):
    """2 / (N - correction), unclamped as in torch's backward (inf for 0)."""
    return math.inf if dof == 0 else 2.0 / dof


class Var(Function):
    """Variance with a correction (1: unbiased). backward: 2 (x - mean) / (N - correction) * gy."""

    def forward(self, x, axis=None, keepdims=False, correction=1):
        self.d, self.dof, y = _moments(x, axis, correction)
        self.kept = y.shape
        return y if keepdims else _drop_axes(y, axis)

    def backward(self, gy):
        with np.errstate(invalid="ignore"):
            return gy.reshape(self.kept) * self.d * _var_scale(self.dof)


class Std(Function):
    """Standard deviation, sqrt(var). backward: Var's of gy / (2 std), taken as 0 where std is 0
    (torch's choice: the derivative of sqrt at 0 is infinite)."""

    def forward(self, x, axis=None, keepdims=False, correction=1):
        xp = _xp(x)
        self.d, self.dof, y = _moments(x, axis, correction)
        self.y = xp.sqrt(y)
        return self.y if keepdims else _drop_axes(self.y, axis)

    def backward(self, gy):
        xp, y = _xp(gy), self.y
        with np.errstate(divide="ignore", invalid="ignore"):
            gv = xp.where(y == 0, xp.zeros((), dtype=gy.dtype), gy.reshape(y.shape) / (2 * y))
            return gv * self.d * _var_scale(self.dof)


def _var_std(fn, name, x, dim, unbiased, keepdim, correction):
    """torch's overloads: (dim, unbiased, keepdim), (unbiased), (dim, *, correction, keepdim)."""
    if isinstance(dim, bool):                       # x.var(False): the unbiased overload
        if unbiased is not None:
            raise TypeError(f"{name}(): dim must be an int or a tuple of ints, got bool")
        dim, unbiased = None, dim
    if unbiased is not None:
        if correction is not None:
            raise TypeError(f"{name}(): pass unbiased or correction, not both")
        if not isinstance(unbiased, bool):
            raise TypeError(f"{name}(): unbiased must be a bool, got {type(unbiased).__name__}")
        correction = 1 if unbiased else 0
    elif correction is None:
        correction = 1
    elif not isinstance(correction, numbers.Real):
        raise TypeError(f"{name}(): correction must be a number, got {type(correction).__name__}")
    if x.dtype.kind not in "fc":
        raise RuntimeError(f"std and var only support floating point and complex dtypes, "
                           f"got {x.dtype}: convert first, e.g. x.double()")
    axis = wrap_dims(dim, x.ndim)
    n = x.data.size if axis is None else int(np.prod([x.shape[a] for a in axis]))
    if n - correction <= 0:
        warnings.warn(f"{name}(): degrees of freedom is <= 0. Correction should be strictly less "
                      f"than the reduction factor (input numel divided by output numel).",
                      UserWarning, stacklevel=3)
    return fn.apply(x, axis=axis, keepdims=keepdim, correction=correction)


def var(x, dim=None, unbiased=None, keepdim=False, *, correction=None):
    """Variance over dim (an int, a tuple of ints, or None: all), dividing by N - correction
    (default 1; unbiased=False means correction=0)."""
    return _var_std(Var, "var", x, dim, unbiased, keepdim, correction)


def std(x, dim=None, unbiased=None, keepdim=False, *, correction=None):
    """Standard deviation: the square root of var with the same arguments."""
    return _var_std(Std, "std", x, dim, unbiased, keepdim, correction)


class CumSum(Function):
    """Running sum along an axis. backward: the running sum of gy from the other end."""

    def forward(self, x, axis=0):
        self.axis = axis
        return _xp(x).cumsum(x, axis=axis)

    def backward(self, gy):
        xp, a = _xp(gy), self.axis
        return xp.flip(xp.cumsum(xp.flip(gy, a), axis=a), a)


def cumsum(x, dim, *, dtype=None):
    """Running sum along dim; integer and bool input sums in int64 (as torch), dtype= casts first."""
    d = wrap_dim(dim, x.ndim)
    if dtype is not None:
        x = x.astype(dtype)
    elif x.dtype.kind in "biu":
        x = x.astype(np.int64)
    if x.ndim == 0:
        return reshape(CumSum.apply(reshape(x, (1,)), axis=0), ())
    return CumSum.apply(x, axis=d)
