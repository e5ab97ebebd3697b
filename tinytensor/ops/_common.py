"""What every op module shares: the array module of the inputs, torch's dimension checks and
type promotion, the Cast Function that promotion inserts into the graph, and the reduction of
per-row losses (nll_loss, cross_entropy)."""
import builtins
import numbers

import numpy as np

from .. import backend, dtypes
from ..tensor import Function, Tensor, _as_array


def _xp(*a):
    return backend.get_array_module(*a)


def wrap_dim(dim, ndim):
    """dim in [-n, n) as a non-negative index, as torch checks it (a 0-d tensor takes 0 and -1);
    IndexError naming the dim and the valid range otherwise."""
    n = ndim if ndim > 0 else 1
    if type(dim) is int and -n <= dim < n:  # the common case
        return dim % n
    if not isinstance(dim, numbers.Integral) or isinstance(dim, bool):
        raise TypeError(f"dim must be an int, got {type(dim).__name__} {dim!r}")
    if not -n <= dim < n:
        raise IndexError(f"Dimension out of range (expected to be in range of [{-n}, {n - 1}], "
                         f"but got {dim})")
    return dim % n


def wrap_dims(dim, ndim):
    """None, an int or a sequence of ints as a tuple of distinct non-negative dims, or None for
    all of them: dim None or (), and any valid dim of a 0-d tensor (0 or -1), as torch."""
    if dim is None:
        return None
    dims = tuple(dim) if isinstance(dim, (tuple, list)) else (dim,)
    out = tuple(wrap_dim(d, ndim) for d in dims)
    if len(set(out)) != len(out):
        raise RuntimeError(f"dim {dims} appears multiple times in the list of dims")
    return out if out and ndim else None


class Cast(Function):
    def forward(self, x, dtype):
        self.src = x.dtype
        return x.astype(dtype)

    def backward(self, gy):
        return gy.astype(self.src)


def cast(x, dtype):
    """x as dtype: itself when it has it, through Cast when it needs a gradient, else a copy."""
    dtype = np.dtype(dtype)
    if x.dtype == dtype:
        return x
    if x.requires_grad:
        if dtype.kind not in "fc":
            raise RuntimeError(f"cannot cast a tensor that requires grad to {dtype}: detach() it first")
        return Cast.apply(x, dtype=dtype)
    return Tensor(x.data.astype(dtype))


def lift(other, like):
    """The other operand of a binary op: a Tensor, a Python scalar (weakly typed, as torch's
    wrapped numbers: a float32 tensor plus 0.5 stays float32), or an array or list as a constant
    Tensor (a float array takes `like`'s float dtype). NotImplemented for anything else."""
    if isinstance(other, Tensor):
        return other
    if isinstance(other, np.generic) and other.dtype.kind in "biuf":
        return other.item()
    if isinstance(other, numbers.Real):  # bool, int, float (not complex)
        return other
    if not isinstance(other, (np.ndarray, list, tuple)) and not backend.is_cuda(other):
        return NotImplemented  # e.g. None or a str: Python raises a TypeError naming both types
    arr = _as_array(other)
    if arr.dtype.kind == "f" and like.dtype.kind == "f":
        arr = arr.astype(like.dtype, copy=False)
    return Tensor(backend.to_device(arr, like.device))


def _raw(x):
    return x.data if isinstance(x, Tensor) else x


def result_type(*operands):
    """torch.result_type of Tensors and Python scalars."""
    return dtypes.result_type(*(_raw(o) for o in operands))


def promote(*operands, floating=False):
    """The operands cast to torch's result dtype of them (Python scalars stay Python scalars:
    NumPy treats them as weakly typed, as torch does). With floating=True an integer or bool
    result becomes the default float dtype (true division, exp, sqrt...)."""
    dt = result_type(*operands)
    if floating and dt.kind != "f":
        dt = np.dtype(dtypes.get_default_dtype())
    return dt, [cast(o, dt) if isinstance(o, Tensor) else o for o in operands]


def to_float(x):
    """x itself when it is floating point, else x as the default float dtype (torch's unary
    float ops on integer input)."""
    if x.dtype.kind == "f":
        return x
    return Tensor(x.data.astype(dtypes.get_default_dtype()))


def as_tensor(x, like=None):
    """x as a Tensor (arrays and Python data as torch.tensor would make them), on like's device."""
    if isinstance(x, Tensor):
        return x
    t = Tensor(x)
    return t if like is None else t.to(like.device)


def check_matmul(a, b, what):
    if a.dtype != b.dtype:
        raise RuntimeError(f"{what}: expected both operands to have the same dtype, but got "
                           f"{a.dtype} and {b.dtype}: convert one with .to(dtype)")
    if a.ndim == 0 or b.ndim == 0:
        raise RuntimeError(f"{what}: both arguments need at least 1 dimension, got shapes "
                           f"{a.shape} and {b.shape}")


def reduce_rows(loss, reduction, count):
    """The (N,) row losses reduced: as they are ('none'), summed, or their mean over `count`
    counted rows (a host integer, or a device array on a GPU); a mean over no rows is nan, as
    in torch, without NumPy's 0 / 0 warning."""
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    if not isinstance(count, (int, np.integer)):
        return total / count.astype(total.dtype)
    return total / total.dtype.type(count) if count else _xp(total).full((), np.nan, total.dtype)


def mean_grad(gy, count):
    """The gradient of each counted row's loss from the gradient gy of their mean: gy / count
    (with no rows counted each row's gradient is 0 already, so the division is by 1: torch's
    gradient there is 0, not nan)."""
    if not isinstance(count, (int, np.integer)):
        return gy / _xp(gy).maximum(count, 1).astype(gy.dtype)
    return gy / gy.dtype.type(builtins.max(count, 1))
