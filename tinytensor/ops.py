"""Primitive operations: one Function subclass per op, forward and backward side by side,
the lowercase wrapper right below. Composite ops (sub-graphs of primitives) come last, then
the Tensor methods and operators are attached.

forward/backward work on raw arrays; `xp` (numpy or cupy) is taken from the inputs.
Gradients returned here may have a broadcast shape: the engine un-broadcasts them.
"""
import builtins
import collections
import math
import numbers
import warnings

import numpy as np

from . import backend, parallel
from .tensor import Function, Tensor, _as_array


def _xp(*a):
    return backend.get_array_module(*a)


def _lift(other, like):
    """The other operand of a binary op: a Tensor, or a Python scalar (weakly typed, so a
    float32 tensor stays float32), or an array wrapped as a constant Tensor."""
    if isinstance(other, Tensor):
        return other
    if isinstance(other, np.generic):
        other = other.item()
    if isinstance(other, numbers.Number):
        return other
    if not isinstance(other, (np.ndarray, list, tuple)) and not backend.is_cuda(other):
        return NotImplemented  # e.g. None or a str: Python raises a TypeError naming both types
    xp = _xp(like.data)
    dtype = like.dtype if like.dtype.kind in "fc" else None
    return Tensor(xp.asarray(other, dtype=dtype))


# ---------------------------------------------------------------- elementwise, binary
class Add(Function):
    def forward(self, a, b):
        return parallel.add(a, b)  # a + b, large arrays split over threads

    def backward(self, gy):
        return gy, gy


def add(a, b):
    return Add.apply(a, b)


class Sub(Function):
    def forward(self, a, b):
        return a - b

    def backward(self, gy):
        return gy, (-gy if self.needs_grad[1] else None)


def sub(a, b):
    return Sub.apply(a, b)


class Mul(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a * b

    def backward(self, gy):
        ga = gy * self.b if self.needs_grad[0] else None
        gb = gy * self.a if self.needs_grad[1] else None
        return ga, gb


def mul(a, b):
    return Mul.apply(a, b)


class Div(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a / b

    def backward(self, gy):
        ga = gy / self.b if self.needs_grad[0] else None
        gb = -gy * self.a / (self.b * self.b) if self.needs_grad[1] else None
        return ga, gb


def div(a, b):
    return Div.apply(a, b)


# ---------------------------------------------------------------- elementwise, unary
class Neg(Function):
    def forward(self, x):
        return -x

    def backward(self, gy):
        return -gy


def neg(x):
    return Neg.apply(x)


class Pow(Function):
    """x ** c for a scalar exponent c."""

    def forward(self, x, c):
        self.x, self.c = x, c
        return x ** c

    def backward(self, gy):
        c = self.c
        if c == 0:  # x ** 0 is constant (also at x = 0, where c * x ** -1 would be nan)
            return _xp(gy).zeros_like(gy), None
        return gy * (c * self.x ** (c - 1)), None


def pow(x, c):  # noqa: A001 - mirrors torch.pow
    if isinstance(c, Tensor) or not isinstance(c, numbers.Number):
        raise TypeError(f"pow supports a scalar exponent only, got {type(c).__name__}")
    return Pow.apply(x, c)


class Exp(Function):
    def forward(self, x):
        self.y = _xp(x).exp(x)
        return self.y

    def backward(self, gy):
        return gy * self.y


def exp(x):
    return Exp.apply(x)


class Log(Function):
    def forward(self, x):
        self.x = x
        return _xp(x).log(x)

    def backward(self, gy):
        return gy / self.x


def log(x):
    return Log.apply(x)


class Tanh(Function):
    def forward(self, x):
        self.y = _xp(x).tanh(x)
        return self.y

    def backward(self, gy):
        return gy * (1 - self.y * self.y)


def tanh(x):
    return Tanh.apply(x)


class ReLU(Function):
    def forward(self, x):
        self.mask = x > 0
        return x * self.mask

    def backward(self, gy):
        return gy * self.mask


def relu(x):
    return ReLU.apply(x)


class GELU(Function):
    """GELU, exact (erf, torch's default) or with approximate='tanh'."""

    def forward(self, x, approximate="none"):
        xp = _xp(x)
        self.x, self.approximate = x, approximate
        if approximate == "tanh":
            k = math.sqrt(2.0 / math.pi)
            self.t = xp.tanh(k * (x + 0.044715 * x ** 3))
            return 0.5 * x * (1 + self.t)
        self.cdf = 0.5 * (1 + backend_erf(x / math.sqrt(2.0)))
        return x * self.cdf

    def backward(self, gy):
        xp, x = _xp(self.x), self.x
        if self.approximate == "tanh":
            k = math.sqrt(2.0 / math.pi)
            t = self.t
            d = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * k * (1 + 3 * 0.044715 * x * x)
            return gy * d
        pdf = xp.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        return gy * (self.cdf + x * pdf)


def backend_erf(x):
    """erf on numpy or cupy arrays, exact to double precision."""
    if backend.is_cuda(x):
        import cupyx.scipy.special as cs  # only reached with cupy present
        return cs.erf(x)
    try:
        from scipy.special import erf
        return erf(x).astype(x.dtype, copy=False)
    except ImportError:
        return np.asarray(np.frompyfunc(math.erf, 1, 1)(x), dtype=x.dtype)  # 0-d gives a float


def gelu(x, approximate="none"):
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu approximate must be 'none' or 'tanh', got {approximate!r}")
    return GELU.apply(x, approximate=approximate)


class Cast(Function):
    def forward(self, x, dtype):
        self.src = x.dtype
        return x.astype(dtype)

    def backward(self, gy):
        return gy.astype(self.src)


# ---------------------------------------------------------------- matmul
class MatMul(Function):
    """a @ b with numpy.matmul semantics (1-D operands, broadcast batch dimensions)."""

    def forward(self, a, b):
        self.a, self.b = a, b
        return a @ b

    def backward(self, gy):
        xp = _xp(gy)
        a, b = self.a, self.b
        a2 = a[None, :] if a.ndim == 1 else a           # (.., m, k)
        b2 = b[:, None] if b.ndim == 1 else b           # (.., k, n)
        g2 = gy
        if b.ndim == 1:                                 # b's axis first: gy may be 0-d
            g2 = xp.expand_dims(g2, -1)
        if a.ndim == 1:
            g2 = xp.expand_dims(g2, -2)                 # (.., m, n)
        ga = gb = None
        if self.needs_grad[0]:
            ga = g2 @ xp.swapaxes(b2, -1, -2)           # (.., m, k)
            if a.ndim == 1:
                ga = ga.reshape(ga.shape[:-2] + (ga.shape[-1],))
            ga = _sum_to_ndim(ga, a.ndim, keep=2 if a.ndim > 1 else 1)
        if self.needs_grad[1]:
            gb = xp.swapaxes(a2, -1, -2) @ g2           # (.., k, n)
            if b.ndim == 1:
                gb = gb[..., 0]
            gb = _sum_to_ndim(gb, b.ndim, keep=2 if b.ndim > 1 else 1)
        return ga, gb


def _sum_to_ndim(g, ndim, keep):
    """Sum leading batch dims that a lower-rank operand was broadcast over."""
    if g.ndim > ndim:
        g = g.sum(axis=tuple(range(g.ndim - ndim)))
    return g


def matmul(a, b):
    return MatMul.apply(a, b)


class Linear(Function):
    """y = x @ W.T + b, x (..., in), W (out, in): one GEMM over all leading dimensions."""

    def forward(self, x, w, b=None):
        self.x, self.w = x, w
        x2 = x.reshape(-1, x.shape[-1])                 # (N, in)
        y = x2 @ w.T                                    # (N, out)
        if b is not None:
            add_rows_(y, b)
        return y.reshape(x.shape[:-1] + (w.shape[0],))

    def backward(self, gy):
        x, w = self.x, self.w
        g2 = gy.reshape(-1, gy.shape[-1])               # (N, out)
        gx = (g2 @ w).reshape(x.shape) if self.needs_grad[0] else None
        gw = g2.T @ x.reshape(-1, x.shape[-1]) if self.needs_grad[1] else None
        gb = column_sums(g2) if len(self.needs_grad) > 2 and self.needs_grad[2] else None
        return gx, gw, gb


def add_rows_(y, b):
    """y += b for y (N, out) and b (out,), in place; large y in row ranges over threads."""
    xp = _xp(y)
    parallel.rows(len(y), lambda r0, r1: xp.add(y[r0:r1], b, out=y[r0:r1]), y.size, xp)


def column_sums(g):
    """g.sum(axis=0) of a matrix g (N, out) as ones @ g: BLAS's matrix-vector product is
    several times faster than NumPy's reduction at these shapes."""
    return _xp(g).ones(g.shape[0], dtype=g.dtype) @ g


def linear(x, weight, bias=None):
    if bias is None:
        return Linear.apply(x, weight)
    return Linear.apply(x, weight, bias)


# ---------------------------------------------------------------- reductions
def _wrap_dim(d, ndim):
    """One dim in [-ndim, ndim) as a non-negative int; a 0-d tensor takes 0 and -1 (as torch)."""
    if isinstance(d, bool) or not isinstance(d, numbers.Integral):
        raise TypeError(f"dim must be an int, got {type(d).__name__} {d!r}")
    n = builtins.max(ndim, 1)
    if not -n <= d < n:
        raise IndexError(f"Dimension out of range (expected to be in range of [{-n}, {n - 1}], "
                         f"but got {d})")
    return int(d) % n


def _norm_axis(axis, ndim):
    """Reduction dims (an int or a tuple/list of ints) as a tuple of non-negative axes, or None
    for all of them: dim None or (), and any dim of a 0-d tensor, reduce everything (as torch)."""
    if axis is None:
        return None
    axes = tuple(_wrap_dim(a, ndim) for a in (axis if isinstance(axis, (tuple, list)) else (axis,)))
    for i, a in enumerate(axes):
        if a in axes[:i]:
            raise RuntimeError(f"dim {a} appears multiple times in the list of dims")
    return axes if axes and ndim else None


class Sum(Function):
    def forward(self, x, axis=None, keepdims=False):
        self.shape, self.axis, self.keepdims = x.shape, axis, keepdims
        return x.sum(axis=axis, keepdims=keepdims)

    def backward(self, gy):
        xp = _xp(gy)
        if not self.keepdims and self.axis is not None:
            gy = xp.expand_dims(gy, self.axis)
        return xp.broadcast_to(gy, self.shape)


def sum(x, dim=None, keepdim=False):  # noqa: A001
    return Sum.apply(x, axis=_norm_axis(dim, x.ndim), keepdims=keepdim)


class Amax(Function):
    """max over dims; the gradient is shared equally among tied maxima (torch.amax, and torch.max
    without a dim)."""

    def forward(self, x, axis=None, keepdims=False):
        self.x, self.axis, self.keepdims = x, axis, keepdims
        self.y = x.max(axis=axis, keepdims=True)
        return self.y if keepdims else (self.y.reshape(()) if axis is None else self.y.squeeze(axis))

    def backward(self, gy):
        xp = _xp(gy)
        if not self.keepdims:
            gy = gy.reshape(self.y.shape)
        mask = (self.x == self.y)
        count = mask.sum(axis=self.axis, keepdims=True)
        return mask * (gy / count).astype(gy.dtype, copy=False)


def amax(x, dim=(), keepdim=False):
    axis = _norm_axis(dim, x.ndim)
    _check_reduced_nonempty(x, axis, "amax")
    return Amax.apply(x, axis=axis, keepdims=keepdim)


# ---------------------------------------------------------------- shape
class Reshape(Function):
    def forward(self, x, shape):
        self.shape = x.shape
        return x.reshape(shape)

    def backward(self, gy):
        return gy.reshape(self.shape)


def reshape(x, *shape):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return Reshape.apply(x, shape=shape)


class Permute(Function):
    def forward(self, x, dims):
        self.dims = dims
        return x.transpose(dims)

    def backward(self, gy):
        return gy.transpose(np.argsort(self.dims))


def permute(x, *dims):
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    if sorted(d % x.ndim for d in dims) != list(range(x.ndim)):
        raise ValueError(f"permute dims {dims} are not a permutation of {x.ndim} dimensions")
    return Permute.apply(x, dims=tuple(d % x.ndim for d in dims))


def transpose(x, dim0, dim1):
    dim0, dim1 = _wrap_dim(dim0, x.ndim), _wrap_dim(dim1, x.ndim)
    dims = list(range(x.ndim))
    dims[dim0], dims[dim1] = dims[dim1], dims[dim0]
    return Permute.apply(x, dims=tuple(dims))


def _unwrap_index(idx):
    if isinstance(idx, Tensor):
        return idx.data
    if isinstance(idx, tuple):  # lists become arrays, so repeated indices accumulate gradient
        return tuple(i.data if isinstance(i, Tensor) else np.asarray(i) if isinstance(i, list) else i
                     for i in idx)
    if isinstance(idx, list):
        return np.asarray(idx)
    return idx


def _is_advanced(idx):
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(hasattr(i, "shape") and getattr(i, "ndim", 0) > 0 for i in items)


class GetItem(Function):
    """x[idx] with slices, ints and integer/bool arrays; repeated indices accumulate."""

    def forward(self, x, idx):
        self.shape, self.dtype, self.idx = x.shape, x.dtype, idx
        return x[idx]

    def backward(self, gy):
        xp = _xp(gy)
        gx = xp.zeros(self.shape, dtype=gy.dtype)
        if _is_advanced(self.idx):
            backend.scatter_add(gx, self.idx, gy)
        else:
            gx[self.idx] = gy
        return gx


def getitem(x, idx):
    idx = _unwrap_index(idx)
    if backend.is_cuda(x.data):
        idx = backend.index_to_device(idx, "cuda")
    return GetItem.apply(x, idx=idx)


class MaskedFill(Function):
    def forward(self, x, mask, value):
        self.mask = mask
        xp = _xp(x)
        return xp.where(mask, xp.asarray(value, dtype=x.dtype), x)

    def backward(self, gy):
        xp = _xp(gy)
        return xp.where(self.mask, xp.zeros((), dtype=gy.dtype), gy)


def masked_fill(x, mask, value):
    mask = mask.data if isinstance(mask, Tensor) else mask
    xp = _xp(x.data)
    mask = xp.asarray(mask)
    if mask.dtype != bool:
        raise TypeError(f"masked_fill needs a bool mask, got dtype {mask.dtype}")
    try:
        ok = np.broadcast_shapes(mask.shape, x.shape) == x.shape
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"masked_fill mask of shape {mask.shape} does not broadcast to {x.shape}")
    return MaskedFill.apply(x, mask, value=value)


class Where(Function):
    def forward(self, cond, a, b):
        self.cond = cond
        return _xp(a, b).where(cond, a, b)

    def backward(self, gy):
        xp = _xp(gy)
        z = xp.zeros((), dtype=gy.dtype)
        return None, xp.where(self.cond, gy, z), xp.where(self.cond, z, gy)


def where(cond, a, b):
    cond = cond.data if isinstance(cond, Tensor) else cond
    return Where.apply(cond, a, b)


class Cat(Function):
    def forward(self, *xs, axis=0):
        self.axis = axis
        self.sizes = [x.shape[axis] for x in xs]
        return _xp(*xs).concatenate(xs, axis=axis)

    def backward(self, gy):
        xp = _xp(gy)
        splits = np.cumsum(self.sizes)[:-1].tolist()
        return tuple(xp.split(gy, splits, axis=self.axis))


def cat(tensors, dim=0):
    tensors = list(tensors)
    if not tensors:
        raise ValueError("cat needs at least one tensor")
    tensors = [t if isinstance(t, Tensor) else Tensor(t) for t in tensors]
    return Cat.apply(*tensors, axis=dim % tensors[0].ndim)


class Stack(Function):
    def forward(self, *xs, axis=0):
        self.axis = axis
        return _xp(*xs).stack(xs, axis=axis)

    def backward(self, gy):
        xp = _xp(gy)
        return tuple(xp.moveaxis(gy, self.axis, 0))


def stack(tensors, dim=0):
    tensors = [t if isinstance(t, Tensor) else Tensor(t) for t in tensors]
    if not tensors:
        raise ValueError("stack needs at least one tensor")
    return Stack.apply(*tensors, axis=dim % (tensors[0].ndim + 1))


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
    if x.size:
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
    axis = _norm_axis(dim, x.ndim)
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
    dim = _wrap_dim(dim, x.ndim)
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
    d = _wrap_dim(dim, x.ndim)
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


def _no_elementwise(name, dim, keepdim):
    if isinstance(dim, (Tensor, np.ndarray)) or backend.is_cuda(dim):
        raise NotImplementedError(f"{name}(input, other), the elementwise {name}imum of two tensors "
                                  f"(torch.{name}imum), is not supported yet")
    if dim is None and keepdim:
        raise TypeError(f"{name}(): keepdim=True needs a dim: {name}(x, dim, keepdim=True)")


def max(x, dim=None, keepdim=False):  # noqa: A001 - mirrors torch.max
    """Without dim: the largest element (0-d; tied maxima share the gradient). With an int dim:
    (values, indices) along it; the gradient goes to the first maximum's index only."""
    _no_elementwise("max", dim, keepdim)
    if dim is None:
        _check_reduced_nonempty(x, None, "max")
        return Amax.apply(x, axis=None, keepdims=False)
    return _MaxResult(*_select(x, dim, keepdim, "max"))


def min(x, dim=None, keepdim=False):  # noqa: A001 - mirrors torch.min
    """Like max, for the smallest element."""
    _no_elementwise("min", dim, keepdim)
    if dim is None:
        _check_reduced_nonempty(x, None, "min")
        return Amin.apply(x, axis=None, keepdims=False)
    return _MinResult(*_select(x, dim, keepdim, "min"))


def _arg(x, dim, keepdim, name):
    """argmax/argmin: int64 indices of the first extreme element; dim None: of the flattened x."""
    if x.dtype == np.bool_:
        raise RuntimeError(f"{name}(): does not support bool input")
    xp = _xp(x.data)
    if dim is None:
        _check_reduced_nonempty(x, None, name, no_dim_error=IndexError)
        i = getattr(x.data.reshape(-1), name)()
        return Tensor(xp.asarray(i, dtype=np.int64).reshape((1,) * x.ndim if keepdim else ()))
    d = _wrap_dim(dim, x.ndim)
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
    d = _wrap_dim(dim, x.ndim)
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
        from .tensor import get_default_dtype
        x = x.astype(get_default_dtype())
    return LogSumExp.apply(x, axis=_norm_axis(dim, x.ndim), keepdims=keepdim)


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
    axis = _norm_axis(dim, x.ndim)
    n = x.size if axis is None else int(np.prod([x.shape[a] for a in axis]))
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
    d = _wrap_dim(dim, x.ndim)
    if dtype is not None:
        x = x.astype(dtype)
    elif x.dtype.kind in "biu":
        x = x.astype(np.int64)
    if x.ndim == 0:
        return reshape(CumSum.apply(reshape(x, (1,)), axis=0), ())
    return CumSum.apply(x, axis=d)


# ---------------------------------------------------------------- fused, numerically stable
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


def softmax(x, dim=-1):
    return Softmax.apply(x, axis=dim)


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


def log_softmax(x, dim=-1):
    return LogSoftmax.apply(x, axis=dim)


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


# ---------------------------------------------------------------- composites (no backward)
def mean(x, dim=None, keepdim=False):
    if x.dtype.kind not in "fc":
        raise RuntimeError(f"mean(): could not infer output dtype. Input dtype must be either a "
                           f"floating point or complex dtype. Got: {_torch_dtype_name(x.dtype)}")
    axes = _norm_axis(dim, x.ndim)
    n = x.size if axes is None else int(np.prod([x.shape[a] for a in axes]))
    return sum(x, dim, keepdim) / n


def unsqueeze(x, dim):
    dim = dim % (x.ndim + 1)
    return reshape(x, x.shape[:dim] + (1,) + x.shape[dim:])


def squeeze(x, dim=None):
    if dim is None:
        return reshape(x, tuple(n for n in x.shape if n != 1))
    dim = dim % x.ndim
    if x.shape[dim] != 1:
        return x
    return reshape(x, x.shape[:dim] + x.shape[dim + 1:])


def flatten(x, start_dim=0, end_dim=-1):
    s, e = start_dim % x.ndim, end_dim % x.ndim
    n = int(np.prod(x.shape[s:e + 1]))
    return reshape(x, x.shape[:s] + (n,) + x.shape[e + 1:])


def sqrt(x):
    return x ** 0.5


def _view(x, *shape):
    return reshape(x, *shape)


# ---------------------------------------------------------------- Tensor methods/operators
def _binary(fn, reverse=False):
    def op(self, other):
        other = _lift(other, self)
        if other is NotImplemented:
            return NotImplemented
        return fn(other, self) if reverse else fn(self, other)
    return op


def _compare(name):
    def op(self, other):
        other = other.data if isinstance(other, Tensor) else other
        return Tensor(getattr(self.data, name)(other))
    return op


Tensor.__add__ = _binary(add)
Tensor.__radd__ = _binary(add, reverse=True)
Tensor.__sub__ = _binary(sub)
Tensor.__rsub__ = _binary(sub, reverse=True)
Tensor.__mul__ = _binary(mul)
Tensor.__rmul__ = _binary(mul, reverse=True)
Tensor.__truediv__ = _binary(div)
Tensor.__rtruediv__ = _binary(div, reverse=True)
Tensor.__matmul__ = _binary(matmul)
Tensor.__rmatmul__ = _binary(matmul, reverse=True)
Tensor.__neg__ = neg
Tensor.__pow__ = pow
Tensor.__rpow__ = lambda self, base: exp(self * math.log(base))
Tensor.__getitem__ = getitem
Tensor.__lt__ = _compare("__lt__")
Tensor.__le__ = _compare("__le__")
Tensor.__gt__ = _compare("__gt__")
Tensor.__ge__ = _compare("__ge__")
Tensor.__hash__ = object.__hash__
Tensor.sum = sum
Tensor.mean = mean
Tensor.max = max
Tensor.min = min
Tensor.amax = amax
Tensor.amin = amin
Tensor.argmax = argmax
Tensor.argmin = argmin
Tensor.topk = topk
Tensor.logsumexp = logsumexp
Tensor.var = var
Tensor.std = std
Tensor.cumsum = cumsum
Tensor.gather = gather
Tensor.exp = exp
Tensor.log = log
Tensor.tanh = tanh
Tensor.relu = relu
Tensor.sqrt = sqrt
Tensor.reshape = reshape
Tensor.view = _view
Tensor.permute = permute
Tensor.transpose = transpose
Tensor.masked_fill = masked_fill
Tensor.unsqueeze = unsqueeze
Tensor.squeeze = squeeze
Tensor.flatten = flatten
Tensor.softmax = softmax
Tensor.log_softmax = log_softmax
Tensor.matmul = matmul


# ---------------------------------------------------------------- fused attention softmax
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
