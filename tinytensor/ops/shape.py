"""Shape ops: views and copies that move elements without changing them, indexing, masks,
joining and splitting."""
import itertools
import math
import numbers

import numpy as np

from .. import backend
from ..tensor import Function, Tensor
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


class Reshape(Function):
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


class Permute(Function):
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


class Expand(Function):
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
def _unwrap_index(idx):
    if isinstance(idx, Tensor):
        return idx.data
    if isinstance(idx, tuple):  # lists become arrays, so repeated indices accumulate gradient
        return tuple(i.data if isinstance(i, Tensor) else np.asarray(i) if isinstance(i, list) else i
                     for i in idx)
    if isinstance(idx, list):
        return np.asarray(idx)
    return idx


def _is_array(i):
    return hasattr(i, "shape") and getattr(i, "ndim", 0) > 0


def _is_advanced(idx):
    return any(_is_array(i) for i in (idx if isinstance(idx, tuple) else (idx,)))


def _torch_order(idx):
    """torch applies integer indices first (each selects, dropping its dim) and array indices
    after, so x[1, :, idx] on (2, 5, 6) is (5, len(idx)); NumPy would put the index dim first.
    For an index that mixes both: the two steps, else None."""
    if not isinstance(idx, tuple):
        return None
    ints = [isinstance(i, numbers.Integral) and not isinstance(i, (bool, np.bool_)) for i in idx]
    if not any(ints) or not any(_is_array(i) for i in idx):
        return None
    first, second = [], []
    for i, is_int in zip(idx, ints):
        if is_int:
            first.append(i)
        elif i is None:
            first.append(None)
            second.append(slice(None))
        elif i is Ellipsis:
            first.append(i)
            second.append(i)
        elif _is_array(i):
            first.extend([slice(None)] * (i.ndim if i.dtype == np.bool_ else 1))
            second.append(i)
        else:
            first.append(i)
            second.append(slice(None))
    return tuple(first), tuple(second)


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
    steps = _torch_order(idx)
    if steps is not None:
        return GetItem.apply(GetItem.apply(x, idx=steps[0]), idx=steps[1])
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


class Split(Function):
    """x cut along `axis` into consecutive pieces of the given sizes (views): several outputs."""

    def forward(self, x, sizes, axis):
        self.shape, self.axis, self.sizes = x.shape, axis, sizes
        return tuple(_xp(x).split(x, list(itertools.accumulate(sizes))[:-1], axis=axis))

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
    """x[idx] = value in place, for tensors outside autograd (the lecture's `xbow[b, t] = ...`
    and `losses[k] = loss.item()`). Writing into a tensor that requires grad or was computed
    from one is refused, as torch refuses it for leaves (tinytensor has no in-place autograd)."""
    if x.requires_grad:
        raise RuntimeError("a tensor that requires grad cannot be assigned to in place: assign "
                           "under no_grad() to a detach()ed copy, or build a new tensor")
    if isinstance(value, Tensor):
        if value.requires_grad:
            raise NotImplementedError("assigning a tensor that requires grad into another tensor "
                                      "(in-place autograd) is not supported: use cat/stack/where")
        value = value.data
    idx = _unwrap_index(idx)
    if _torch_order(idx) is not None:
        raise NotImplementedError("assignment through an index that mixes ints and index arrays "
                                  "is not supported: index in two steps")
    x.data[idx] = backend.to_device(value, x.device) if hasattr(value, "shape") else value
