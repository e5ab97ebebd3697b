"""Shape ops: views and copies that move elements without changing them, indexing, masks,
joining and splitting."""
import itertools
import math
import numbers
import warnings
from operator import index as _as_index

import numpy as np

from .. import backend
from ..tensor import Function, Tensor, ViewFunction, increment_version, is_grad_enabled
from ._common import _xp, as_tensor, promote, wrap_dim, wrap_dims


def _sizes(args, what):
    """A shape given as separate ints or as one tuple/list, as torch takes it."""
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = tuple(args[0])
    if set(map(type, args)) <= {int}:  # the common case, without the checks below
        return tuple(args)
    for n in args:
        if not isinstance(n, numbers.Integral) or isinstance(n, bool):
            raise TypeError(f"{what}: sizes must be ints, got {type(n).__name__} {n!r}")
    return tuple(int(n) for n in args)


class Reshape(ViewFunction):
    def forward(self, x, shape, view=False):
        self.shape = x.shape
        if view and type(x) is np.ndarray and not x.flags.c_contiguous:
            return _view_array(x, shape)
        return x.reshape(shape)

    def backward(self, gy):
        return gy.reshape(self.shape)


def reshape(x, *shape):
    return _reshape(x, _sizes(shape, "reshape"))


def _reshape(x, shape, view=False):
    """x as `shape` (ints, at most one -1), through Reshape; torch's error for a bad shape."""
    if -1 not in shape:
        ok = math.prod(shape) == x.data.size and min(shape, default=0) >= 0
    else:
        known = -math.prod(shape)  # the product of the other sizes
        ok = shape.count(-1) == 1 and min(shape) >= -1 and known > 0 and x.data.size % known == 0
    if not ok:
        raise RuntimeError(f"shape '{list(shape)}' is invalid for input of size {x.data.size}")
    return Reshape.apply(x, shape=shape, view=view)


def view(x, *shape):
    """reshape that never copies, as torch's view: an error where the elements of x are not
    laid out so that the new shape can share them (call .contiguous() first, or reshape)."""
    return _reshape(x, _sizes(shape, "view"), view=True)


def _view_array(a, shape):
    """a (a NumPy array, not C-contiguous) as `shape` sharing its elements, or torch's error."""
    try:
        return np.reshape(a, shape, copy=False)  # NumPy >= 2.1 raises where a copy would be needed
    except TypeError:  # an older NumPy: no copy= argument, and no check
        return a.reshape(shape)
    except ValueError:
        raise RuntimeError(f"view size is not compatible with input tensor's size and stride (at "
                           f"least one dimension spans across two contiguous subspaces): shape "
                           f"{a.shape} -> {list(shape)}. Use .reshape(...) instead") from None


class Contiguous(Function):
    def forward(self, x):
        return _xp(x).ascontiguousarray(x)

    def backward(self, gy):
        return gy


def contiguous(x):
    """x itself when its elements are laid out in row-major order, else a row-major copy."""
    return x if x.data.flags.c_contiguous else Contiguous.apply(x)


class Permute(ViewFunction):
    def forward(self, x, dims):
        self.dims = dims
        return x.transpose(dims)

    def backward(self, gy):
        inverse = [0] * len(self.dims)
        for i, d in enumerate(self.dims):
            inverse[d] = i
        return gy.transpose(inverse)


def permute(x, *dims):
    dims = _sizes(dims, "permute")
    if len(dims) != x.ndim:
        raise RuntimeError(f"permute(): the number of dims {len(dims)} does not match the tensor's "
                           f"{x.ndim} dimensions (shape {x.shape})")
    wrapped = tuple(wrap_dim(d, x.ndim) for d in dims) if x.ndim else ()
    if len(set(wrapped)) != len(wrapped):
        raise RuntimeError(f"permute(): duplicate dims are not allowed, got {dims}")
    return Permute.apply(x, dims=wrapped)


def transpose(x, dim0, dim1):
    n = x.data.ndim
    d0, d1 = wrap_dim(dim0, n), wrap_dim(dim1, n)
    dims = list(range(n))
    if n:
        dims[d0], dims[d1] = d1, d0
    return Permute.apply(x, dims=tuple(dims))


def t(x):
    if x.ndim > 2:
        raise RuntimeError(f"t() expects a tensor with <= 2 dimensions, but self is {x.ndim}D: "
                           f"use transpose(dim0, dim1) or mT")
    return transpose(x, 0, -1) if x.ndim == 2 else x


def unsqueeze(x, dim):
    d = wrap_dim(dim, x.ndim + 1)
    return Reshape.apply(x, shape=x.shape[:d] + (1,) + x.shape[d:])


def squeeze(x, dim=None):
    """Drop size-1 dims: all of them, or those of dim (an int or a tuple) that have size 1."""
    if dim is None:
        return Reshape.apply(x, shape=tuple(n for n in x.shape if n != 1))
    dims = wrap_dims(dim, x.ndim) or ()
    return Reshape.apply(x, shape=tuple(n for i, n in enumerate(x.shape)
                                        if not (i in dims and n == 1)))


def flatten(x, start_dim=0, end_dim=-1):
    if x.ndim == 0:
        wrap_dim(start_dim, 0), wrap_dim(end_dim, 0)
        return Reshape.apply(x, shape=(1,))
    s, e = wrap_dim(start_dim, x.ndim), wrap_dim(end_dim, x.ndim)
    if s > e:
        raise RuntimeError(f"flatten() has invalid args: start_dim ({start_dim}) cannot come after "
                           f"end_dim ({end_dim})")
    n = int(np.prod(x.shape[s:e + 1]))
    return Reshape.apply(x, shape=x.shape[:s] + (n,) + x.shape[e + 1:])


def unflatten(x, dim, sizes):
    """Dim `dim` of x as the dims `sizes` (one of them may be -1), as torch.unflatten."""
    d = wrap_dim(dim, x.ndim)
    sizes = _sizes((sizes,), "unflatten")
    n = x.shape[d] if x.ndim else 1
    known = int(np.prod([s for s in sizes if s != -1]))
    if not sizes or sizes.count(-1) > 1 or (-1 not in sizes and known != n) or \
            (-1 in sizes and (known == 0 or n % known)):
        raise RuntimeError(f"unflatten: sizes {list(sizes)} do not multiply to the size {n} of "
                           f"dim {dim} (shape {x.shape})")
    sizes = tuple(n // known if s == -1 else s for s in sizes)
    return Reshape.apply(x, shape=x.shape[:d] + sizes + x.shape[d + 1:])


class Expand(ViewFunction):
    """A broadcast view of x; the engine sums the gradient back to x's shape."""

    def forward(self, x, shape):
        return _xp(x).broadcast_to(x, shape)

    def backward(self, gy):
        return gy


def expand(x, *sizes):
    sizes = _sizes(sizes, "expand")
    if len(sizes) < x.ndim:
        raise RuntimeError(f"expand: the number of sizes provided ({len(sizes)}) must be greater "
                           f"or equal to the number of dimensions in the tensor ({x.ndim})")
    lead = len(sizes) - x.ndim
    shape = []
    for i, n in enumerate(sizes):
        have = x.shape[i - lead] if i >= lead else None
        if n == -1:
            if have is None:
                raise RuntimeError(f"expand: -1 is not allowed in a leading, non-existing dimension "
                                   f"({i}); sizes {list(sizes)}")
            n = have
        elif have is not None and have != 1 and have != n:
            raise RuntimeError(f"The expanded size of the tensor ({n}) must match the existing size "
                               f"({have}) at non-singleton dimension {i}.  Target sizes: "
                               f"{list(sizes)}.  Tensor sizes: {list(x.shape)}")
        shape.append(n)
    return Expand.apply(x, shape=tuple(shape))


def expand_as(x, other):
    return expand(x, other.shape)


class Repeat(Function):
    def forward(self, x, reps):
        shape = (1,) * (len(reps) - x.ndim) + x.shape
        self.shape, self.x_shape, self.reps = shape, x.shape, reps
        return _xp(x).tile(x.reshape(shape), reps)

    def backward(self, gy):
        inter = [n for r, s in zip(self.reps, self.shape) for n in (r, s)]  # (r0, s0, r1, s1, ..)
        g = gy.reshape(inter).sum(axis=tuple(range(0, len(inter), 2)))
        return g.reshape(self.x_shape)


def repeat(x, *sizes):
    sizes = _sizes(sizes, "repeat")
    if len(sizes) < x.ndim:
        raise RuntimeError(f"repeat: the number of repeat dims ({len(sizes)}) can not be smaller "
                           f"than the number of dimensions of the tensor ({x.ndim})")
    if any(n < 0 for n in sizes):
        raise RuntimeError(f"repeat: repeats must be non-negative, got {list(sizes)}")
    return Repeat.apply(x, reps=sizes)


class Tri(Function):
    """The lower (tril) or upper (triu) triangle of the last two dims; the rest set to 0."""

    def forward(self, x, diagonal=0, upper=False):
        xp = _xp(x)
        self.diagonal, self.upper = diagonal, upper
        return xp.triu(x, diagonal) if upper else xp.tril(x, diagonal)

    def backward(self, gy):
        xp = _xp(gy)
        return xp.triu(gy, self.diagonal) if self.upper else xp.tril(gy, self.diagonal)


def _tri(x, diagonal, upper):
    name = "triu" if upper else "tril"
    if x.ndim < 2:
        raise RuntimeError(f"{name}: input tensor must have at least 2 dimensions, got shape {x.shape}")
    if not isinstance(diagonal, numbers.Integral):
        raise TypeError(f"{name}: diagonal must be an int, got {type(diagonal).__name__}")
    return Tri.apply(x, diagonal=int(diagonal), upper=upper)


def tril(x, diagonal=0):
    return _tri(x, diagonal, upper=False)


def triu(x, diagonal=0):
    return _tri(x, diagonal, upper=True)


# ---------------------------------------------------------------- indexing
# torch reads x[idx] in two steps: first the ints, slices, None and ... (an int selects and drops
# its dim, a bool adds a dim of size 1 or 0), then the index arrays and masks on what is left,
# their dims placed as NumPy places them: where the arrays stand when they are adjacent, else in
# front. So x[1, :, [2, 1]] on (2, 3, 4) is (3, 2), where NumPy's one step gives (2, 3).
_VALID = ("only integers, slices (`:`), ellipsis (`...`), None, bools, long, int, byte or bool "
          "tensors and (nested) lists of numbers are valid indices")


def _unwrap_index(idx):
    """The items of an index (see _item): a tuple has one per entry, and so has a list holding
    a sequence, slice, tensor, None or ... (torch still reads such a list as a tuple, with a
    deprecation warning); anything else is one item."""
    if isinstance(idx, tuple):
        items = idx
    elif isinstance(idx, list) and len(idx) < 32 and any(
            isinstance(i, (list, tuple, slice, Tensor, np.ndarray)) or i is None or i is Ellipsis
            for i in idx):
        warnings.warn("Using a non-tuple sequence for multidimensional indexing is deprecated "
                      "(in torch too): use x[tuple(seq)] instead of x[seq]", UserWarning,
                      stacklevel=3)
        items = tuple(idx)
    else:
        items = (idx,)
    items = tuple(_item(i) for i in items)
    if sum(i is Ellipsis for i in items) > 1:
        raise IndexError("an index can only have a single ellipsis ('...'), got "
                         f"{sum(i is Ellipsis for i in items)}")
    return items


def _item(i):
    """One item of an index as torch takes it: an int (or a 0-d integer tensor) selects; a bool
    (or a 0-d bool tensor) adds a dim; a slice (step > 0), None or ...; anything else is an
    index array: a tensor (see _tensor_index) or Python data (see _data_index)."""
    if i is None or i is Ellipsis or isinstance(i, bool):
        return i
    if isinstance(i, slice):
        step = 1 if i.step is None else _as_index(i.step)
        if step <= 0:
            raise ValueError("slice step cannot be zero" if step == 0 else
                             f"step must be greater than zero: torch has no negative slice steps "
                             f"(got {step})")
        return i
    if isinstance(i, numbers.Integral):  # Python and NumPy ints (not numpy.bool_, as in torch)
        return int(i)
    if isinstance(i, Tensor) or backend.is_cuda(i):
        return _tensor_index(i.data if isinstance(i, Tensor) else i)
    if isinstance(i, (list, tuple, np.ndarray)):
        return _data_index(i)
    error = TypeError if isinstance(i, str) else IndexError
    raise error(f"{_VALID} (got {type(i).__name__})")


def _tensor_index(a):
    """A tensor's array as an index item, as torch: 0-d integer -> an int, 0-d bool -> a bool;
    else int32/int64 -> int64 indices, bool -> a mask (uint8: a mask too, deprecated)."""
    if a.dtype == np.uint8:
        warnings.warn("indexing with dtype uint8 is deprecated (in torch too): use a bool tensor",
                      UserWarning, stacklevel=6)
        a = a.astype(np.bool_)
    if a.dtype == np.bool_:
        return bool(a) if a.ndim == 0 else a
    if a.dtype.kind in "iu" and (a.ndim == 0 or a.dtype in (np.int32, np.int64)):
        return int(a) if a.ndim == 0 else a.astype(np.int64, copy=False)
    raise IndexError(f"tensors used as indices must be long, int, byte or bool tensors, got "
                     f"dtype {a.dtype}")


def _data_index(d):
    """A list, tuple (nested, tensors inside taken as their values) or NumPy array as an index
    item, as torch: bools -> a mask, numbers -> int64 indices (floats truncated toward zero);
    a 0-d NumPy array is a bool or an int."""
    if isinstance(d, np.ndarray) and d.dtype == np.uint8:
        return _tensor_index(d)
    a = np.asarray(_plain(d))
    if a.dtype == np.bool_:
        return bool(a) if a.ndim == 0 else a
    if a.dtype.kind in "iuf":
        return int(a) if a.ndim == 0 else a.astype(np.int64)
    error = TypeError if a.dtype.kind in "US" else IndexError
    raise error(f"{_VALID} (got a {type(d).__name__} of {a.dtype})")


def _plain(d):
    """Nested lists and tuples with the tensors and device arrays in them as Python values."""
    if isinstance(d, Tensor):
        return d.tolist()
    if backend.is_cuda(d):
        return backend.to_numpy(d).tolist()
    if isinstance(d, (list, tuple)):
        return [_plain(e) for e in d]
    return d


def _is_array(i):
    return hasattr(i, "shape") and getattr(i, "ndim", 0) > 0


def _is_advanced(idx):
    return any(_is_array(i) for i in (idx if isinstance(idx, tuple) else (idx,)))


def _torch_order(items, ndim):
    """torch's two steps for the items of an index into a tensor of ndim dims: the basic index
    (ints, slices, None, ...; an index array's dims kept whole; a bool as a new dim) and, where
    there are index arrays or bools, the advanced index of its result: slice(None), ... or an
    array per item left; else None."""
    specified = sum(i.ndim if _is_mask(i) else 1 for i in items
                    if i is not None and i is not Ellipsis and not isinstance(i, bool))
    if specified > ndim:
        raise IndexError(f"too many indices for tensor of dimension {ndim} ({specified} indexed)")
    basic, advanced = [], []
    for i in items:
        if isinstance(i, bool):  # as torch: the index [0] (True) or [] (False) of a new dim
            basic.append(None)
            advanced.append(np.zeros(int(i), dtype=np.int64))
        elif _is_array(i):
            basic.extend([slice(None)] * (i.ndim if _is_mask(i) else 1))
            advanced.append(i)
        else:
            basic.append(i)
            if not isinstance(i, int):  # an int's dim is gone after the first step
                advanced.append(Ellipsis if i is Ellipsis else slice(None))
    return tuple(basic), (advanced if _is_advanced(tuple(advanced)) else None)


def _is_mask(i):
    return _is_array(i) and i.dtype == np.bool_


def _advanced(items, shape, device):
    """The advanced step (see _torch_order) for an array of `shape`, checked as torch checks it,
    as NumPy reads it: slice(None)s and int64 arrays on `device`, the masks as the indices of
    their True elements, negative indices wrapped. IndexError for a mask of the wrong shape, an
    index out of range, or index arrays that do not broadcast together."""
    rest = len(shape) - sum(i.ndim if _is_mask(i) else 1 for i in items if i is not Ellipsis)
    out = []
    for pos, i in enumerate(items):
        d = len(out)  # the dim this item starts at
        if i is Ellipsis:
            out.extend([slice(None)] * rest)
        elif isinstance(i, slice):
            out.append(i)
        elif _is_mask(i):
            if i.shape != shape[d:d + i.ndim]:
                raise IndexError(f"The shape of the mask {list(i.shape)} at index {pos} does not "
                                 f"match the shape of the indexed tensor {list(shape)} at index {d}")
            i = backend.to_device(i, device)
            out.extend(_xp(i).nonzero(i))
        else:
            out.append(_in_range(backend.to_device(i, device), shape[d], d))
    arrays = [i for i in out if not isinstance(i, slice)]
    try:
        np.broadcast_shapes(*(a.shape for a in arrays))
    except ValueError:
        raise IndexError(f"shape mismatch: indexing tensors could not be broadcast together with "
                         f"shapes {', '.join(str(list(a.shape)) for a in arrays)}") from None
    return tuple(out)


def _in_range(i, n, dim):
    """The index array i into a dim of size n, negative entries wrapped; IndexError (as torch)
    for an entry outside [-n, n)."""
    xp = _xp(i)
    bad = (i < -n) | (i >= n)
    if i.size and bool(bad.any()):
        raise IndexError(f"index {int(i[bad][0])} is out of bounds for dimension {dim} with "
                         f"size {n}")
    return xp.where(i < 0, i + n, i)


def _indexed_shape(shape, index):
    """The shape of a[index], a of `shape` and index of slice(None)s and int arrays: the arrays'
    broadcast shape where they stand when they are adjacent, else in front, then the dims left."""
    at = [d for d, i in enumerate(index) if not isinstance(i, slice)]
    together = np.broadcast_shapes(*(index[d].shape for d in at))
    rest = tuple(n for d, n in enumerate(shape) if d not in at)
    first = at[0] if at == list(range(at[0], at[-1] + 1)) else 0
    return rest[:first] + together + rest[first:]


def _whole(i):
    """True for an item that keeps every dim as it is (`:` or ...)."""
    return i is Ellipsis or (isinstance(i, slice) and i.start is None and i.stop is None
                             and i.step is None)


class GetItem(ViewFunction):
    """x[idx] for an index that NumPy and torch read alike: ints, slices, None and ... (a view),
    or slices and int64 arrays (a gather: the gradients of repeated indices accumulate)."""

    def forward(self, x, idx):
        self.shape, self.idx = x.shape, idx
        y = x[idx]
        if isinstance(y, np.generic):  # an int for every dim: a 0-d view, as torch's x[i]
            y = x[idx + (Ellipsis,)]
        return y

    def backward(self, gy):
        xp = _xp(gy)
        gx = xp.zeros(self.shape, dtype=gy.dtype)
        if _is_advanced(self.idx):
            backend.scatter_add(gx, self.idx, gy)
        else:
            gx[self.idx] = gy
        return gx


def _plain_basic(idx, ndim):
    """idx as a tuple where it holds only ints, slices without a step and None, at most ndim
    ints and slices (x[:, :, a:b], the common case, which NumPy reads as torch does); else None
    (the general path, _unwrap_index and _torch_order, reads it)."""
    items = idx if type(idx) is tuple else (idx,)
    n = 0
    for i in items:
        kind = type(i)
        if (kind is slice and i.step is None) or kind is int:
            n += 1
        elif i is not None:
            return None
    return items if n <= ndim else None


def _read_index(idx, ndim):
    """torch's (basic, advanced) steps for an index into a tensor of ndim dims (_torch_order),
    a plain index going straight through (_plain_basic)."""
    basic = _plain_basic(idx, ndim)
    return (basic, None) if basic is not None else _torch_order(_unwrap_index(idx), ndim)


def getitem(x, idx):
    """x[idx] as torch reads it (see above): ints, slices (step > 0), None, ..., bools, and
    index arrays (tensors, lists, tuples, nested lists, NumPy arrays; bool ones are masks of the
    dims they cover), negative indices counting from the end; an out-of-range index raises
    IndexError."""
    basic, advanced = _read_index(idx, x.ndim)
    if advanced is None:
        return GetItem.apply(x, idx=basic)
    if not all(_whole(i) for i in basic):
        x = GetItem.apply(x, idx=basic)
    return GetItem.apply(x, idx=_advanced(advanced, x.shape, x.device))


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
        raise TypeError(f"masked_fill needs a bool mask (e.g. tril == 0), got dtype {mask.dtype}")
    if isinstance(value, Tensor):
        if value.ndim:
            raise RuntimeError(f"masked_fill only supports a 0-dimensional value tensor, but got "
                               f"one with {value.ndim} dimensions")
        value = value.item()
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


def where(cond, a=None, b=None):
    if a is None or b is None:
        raise NotImplementedError("where(condition) with one argument (nonzero) is not supported: "
                                  "pass where(condition, a, b)")
    cond = cond.data if isinstance(cond, Tensor) else cond
    if not (isinstance(cond, np.ndarray) or backend.is_cuda(cond)):
        cond = np.asarray(cond)  # Python values (on cupy np.asarray of a device array raises)
    if cond.dtype != bool:
        raise TypeError(f"where expects a bool condition, got dtype {cond.dtype}")
    like = a if isinstance(a, Tensor) else b if isinstance(b, Tensor) else None
    if like is None:
        a = Tensor(a)
        like = a
    a, b = (x if isinstance(x, Tensor) or isinstance(x, numbers.Number) else as_tensor(x, like)
            for x in (a, b))
    dt, (a, b) = promote(a, b)
    return Where.apply(backend.to_device(cond, like.device), a, b)


# ---------------------------------------------------------------- joining and splitting
class Cat(Function):
    def forward(self, *xs, axis=0):
        self.axis = axis
        self.sizes = [x.shape[axis] for x in xs]
        return _xp(*xs).concatenate(xs, axis=axis)

    def backward(self, gy):
        xp = _xp(gy)
        splits = np.cumsum(self.sizes)[:-1].tolist()
        return tuple(xp.split(gy, splits, axis=self.axis))


def _tensors(tensors, what):
    if isinstance(tensors, Tensor):
        raise TypeError(f"{what} expects a sequence of Tensors, got a single Tensor: "
                        f"wrap it in a list")
    tensors = [as_tensor(t) for t in tensors]
    if not tensors:
        raise ValueError(f"{what} expects a non-empty list of Tensors")
    dt, tensors = promote(*tensors)
    return tensors


def cat(tensors, dim=0):
    tensors = _tensors(tensors, "cat")
    for i, t in enumerate(tensors):
        if t.ndim == 0:
            raise RuntimeError(f"zero-dimensional tensor (at position {i}) cannot be concatenated: "
                               f"use stack, or unsqueeze it first")
    d = wrap_dim(dim, tensors[0].ndim)
    ref = tensors[0].shape
    for i, t in enumerate(tensors[1:], 1):
        if t.ndim != len(ref) or any(a != b for j, (a, b) in enumerate(zip(t.shape, ref)) if j != d):
            raise RuntimeError(f"Sizes of tensors must match except in dimension {d}: tensor 0 has "
                               f"shape {ref}, tensor {i} has shape {t.shape}")
    return Cat.apply(*tensors, axis=d)


concat = cat


class Stack(Function):
    def forward(self, *xs, axis=0):
        self.axis = axis
        return _xp(*xs).stack(xs, axis=axis)

    def backward(self, gy):
        xp = _xp(gy)
        return tuple(xp.moveaxis(gy, self.axis, 0))


def stack(tensors, dim=0):
    tensors = _tensors(tensors, "stack")
    for i, t in enumerate(tensors[1:], 1):
        if t.shape != tensors[0].shape:
            raise RuntimeError(f"stack expects each tensor to be equal size, but got "
                               f"{list(tensors[0].shape)} at entry 0 and {list(t.shape)} at entry {i}")
    return Stack.apply(*tensors, axis=wrap_dim(dim, tensors[0].ndim + 1))


class Split(ViewFunction):
    """x cut along `axis` into consecutive pieces of the given sizes (views): several outputs."""

    def forward(self, x, sizes, axis):
        self.shape, self.axis, self.sizes = x.shape, axis, sizes
        lead = (slice(None),) * axis                               # the dims before axis, whole
        ends = list(itertools.accumulate(sizes))
        return tuple(x[lead + (slice(e - n, e),)] for n, e in zip(sizes, ends))

    def backward(self, gys):
        xp = next(_xp(g) for g in gys if g is not None)
        dtype = next(g.dtype for g in gys if g is not None)
        parts = []
        for g, n in zip(gys, self.sizes):
            if g is None:  # a piece that got no gradient: zeros
                shape = list(self.shape)
                shape[self.axis] = n
                g = xp.zeros(shape, dtype=dtype)
            parts.append(g)
        return xp.concatenate(parts, axis=self.axis)


def split(x, split_size_or_sections, dim=0):
    """torch.split: pieces of split_size_or_sections elements along dim (the last one smaller),
    or of the sizes in a list (which must add up to the dim's size)."""
    if x.ndim == 0:
        raise RuntimeError("split expects at least a 1-dimensional tensor")
    d = wrap_dim(dim, x.ndim)
    n = x.shape[d]
    s = split_size_or_sections
    if isinstance(s, numbers.Integral):
        if s < 0 or (s == 0 and n):
            raise RuntimeError(f"split expects split_size to be positive, got {s}")
        sizes = [s] * (n // s) + ([n % s] if n % s else []) if s else [0]
    else:
        sizes = [int(v) for v in s]
        if any(v < 0 for v in sizes) or np.sum(sizes) != n:
            raise RuntimeError(f"split_with_sizes expects split_sizes to sum exactly to {n} "
                               f"(input tensor's size at dimension {d}), but got split_sizes={sizes}")
    return Split.apply(x, sizes=sizes, axis=d)


def chunk(x, chunks, dim=0):
    """torch.chunk: at most `chunks` pieces of ceil(size / chunks) elements (maybe fewer pieces)."""
    if not isinstance(chunks, numbers.Integral) or chunks <= 0:
        raise RuntimeError(f"chunk expects `chunks` to be greater than 0, got: {chunks}")
    if x.ndim == 0:
        raise RuntimeError("chunk expects at least a 1-dimensional tensor")
    n = x.shape[wrap_dim(dim, x.ndim)]
    return split(x, max(-(-n // chunks), 1) if n else 1, dim)


def unbind(x, dim=0):
    d = wrap_dim(dim, x.ndim)
    return tuple(squeeze(p, d) for p in split(x, 1, d))


def setitem(x, idx, value):
    """x[idx] = value in place, as torch: idx as x[idx] reads it; value a Python scalar
    (converted to x's dtype as torch converts it, see _scalar_value) or a tensor that, with its
    leading size-1 dims dropped, broadcasts to x[idx]'s shape. A tensor value is cast to x's
    dtype where idx has no index arrays; with them its dtype must be x's (torch's index_put_),
    unless idx has one mask and nothing else and the value one element (then it is a scalar).

    Outside autograd only (tinytensor has no in-place autograd): writing into a tensor that
    requires grad is refused, as torch refuses it for leaves, except under no_grad() into a leaf
    (a Parameter's initialisation); a value that requires grad is refused unless under no_grad().
    The write counts in x's version (x._version), as every in-place write."""
    _check_assignable(x, value)
    basic, advanced = _read_index(idx, x.ndim)
    if advanced is None:
        x.data[basic] = _assigned(value, x, x.data[basic].shape)
        increment_version(x)
        return
    target = x.data[basic]  # the basic step keeps a dim for each array or bool: a view
    index = _advanced(advanced, target.shape, x.device)
    shape = _indexed_shape(target.shape, index)
    if isinstance(value, Tensor) and value.data.size == 1 and not backend.is_cuda(value.data) and \
            [_is_mask(i) for i in advanced if _is_array(i)] == [True]:
        value = value.item()  # torch fills through one mask with a one-element value's item()
    elif isinstance(value, Tensor) and value.dtype != x.dtype:
        raise RuntimeError(f"Index put requires the source and destination dtypes match, got "
                           f"{x.dtype} for the destination and {value.dtype} for the source: "
                           f"convert the value with .to({x.dtype})")
    target[index] = _assigned(value, x, shape)
    increment_version(x)


def _check_assignable(x, value):
    if x.requires_grad and is_grad_enabled():
        raise RuntimeError("a tensor that requires grad cannot be assigned to in place: assign "
                           "under no_grad() to a detach()ed copy, or build a new tensor")
    if x.requires_grad and not x.is_leaf:
        raise RuntimeError("a tensor computed from one that requires grad cannot be assigned to "
                           "in place, under no_grad() too (its graph would see the new values): "
                           "assign to a detach()ed copy, or build a new tensor")
    if isinstance(value, Tensor) and value.requires_grad and is_grad_enabled():
        raise NotImplementedError("assigning a tensor that requires grad into another tensor "
                                  "(in-place autograd) is not supported: use cat/stack/where")


def _assigned(value, x, shape):
    """What x[idx] = value writes where x[idx] has `shape`: a scalar of x's dtype, or the value
    tensor's array on x's device in x's dtype, its leading size-1 dims dropped (as torch)."""
    if not isinstance(value, Tensor):
        return _scalar_value(value, x.dtype)
    a = value.data
    lead = next((d for d, n in enumerate(a.shape) if n != 1), a.ndim)
    a = a.reshape(a.shape[lead:])
    if a.ndim > len(shape) or any(m not in (1, n) for m, n in zip(a.shape[::-1], shape[::-1])):
        raise RuntimeError(f"shape mismatch: value tensor of shape {list(value.shape)} cannot be "
                           f"broadcast to indexing result of shape {list(shape)}")
    return backend.to_device(a, x.device).astype(x.dtype, copy=False)


def _scalar_value(v, dtype):
    """A Python or NumPy scalar as a value of dtype, as torch converts it for x[idx] = v: an int
    outside int64 raises ValueError; a value outside an integer dtype (or float32; not float16,
    that rounds to inf) raises RuntimeError, but negative ints wrap into unsigned dtypes as
    two's complement (uint8: -1 is 255, -256 is refused); floats into integers truncate toward
    zero; bool is v != 0 (NaN too)."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, complex):
        raise RuntimeError(f"value cannot be converted to type {dtype} without overflow: "
                           f"tinytensor has no complex tensors (got {v})")
    if not isinstance(v, numbers.Real):
        raise TypeError(f"can't assign a {type(v).__name__} to a tensor: assign a number or a "
                        f"Tensor (tinytensor.tensor(...) makes one from lists and arrays)")
    if isinstance(v, int) and not -2**63 <= v < 2**63:
        raise ValueError(f"Overflow when unpacking long long: {v} is outside the int64 range")
    if dtype.kind == "b":
        return np.bool_(v != 0)
    if dtype.kind == "f":
        fits = dtype != np.float32 or not math.isfinite(v) or abs(v) <= float(np.finfo(np.float32).max)
    elif isinstance(v, float):
        fits = math.isfinite(v) and np.iinfo(dtype).min <= v <= np.iinfo(dtype).max
    else:
        fits = v <= np.iinfo(dtype).max and (v >= np.iinfo(dtype).min or -v <= np.iinfo(dtype).max)
    if not fits:
        raise RuntimeError(f"value cannot be converted to type {dtype} without overflow: {v}")
    if dtype.kind in "iu":  # truncated toward zero; negative ints wrap into unsigned dtypes
        v = int(v) % 2 ** (8 * dtype.itemsize) if dtype.kind == "u" else int(v)
    with np.errstate(over="ignore"):
        return dtype.type(v)
