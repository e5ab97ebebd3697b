"""Primitive operations: one Function subclass per op, forward and backward side by side,
the lowercase wrapper right below; composite ops are plain functions. By topic:

    elementwise.py    arithmetic with torch's type promotion, activations, comparisons
    linalg.py         matmul, einsum
    reduce.py         sum, mean, amax/amin, max/min with indices, var, std, logsumexp, ...
    shape.py          reshape, permute, indexing, masks, cat/stack/split, expand, repeat, tril
    normalization.py  softmax, log_softmax, nll_loss
    creation.py       zeros, ones, full, eye, arange, *_like, randn, rand, randint, multinomial

The fused ops (linear, linear_relu, layer_norm, cross-entropy, embedding, dropout, causal
attention) are in tinytensor.fused. forward/backward work on raw arrays; `xp` (numpy or cupy)
is taken from the inputs.
Gradients returned here may have a broadcast shape: the engine un-broadcasts them.
This module also attaches the Tensor operators and methods (the end of this file).
"""
import numpy as np

from .. import backend
from ..tensor import Tensor
from . import inplace
from ._common import Cast, _xp, cast, lift, promote, result_type, wrap_dim, wrap_dims  # noqa: F401
from .creation import *  # noqa: F401,F403
from .creation import arange, full, full_like, ones, ones_like, zeros, zeros_like  # noqa: F401
from .elementwise import *  # noqa: F401,F403
from .elementwise import (abs, add, clamp, cos, div, exp, floor_divide, isfinite, isinf, isnan,  # noqa: F401
                          leaky_relu, log, maximum, minimum, mul, neg, operator, pow, relu, rsqrt,
                          sigmoid, silu, sin, sqrt, sub, tanh)
from .inplace import *  # noqa: F401,F403
from .linalg import *  # noqa: F401,F403
from .linalg import einsum, matmul  # noqa: F401
from .normalization import *  # noqa: F401,F403
from .normalization import log_softmax, softmax  # noqa: F401
from .reduce import *  # noqa: F401,F403
from .reduce import (all, amax, amin, any, argmax, argmin, cumsum, gather, logsumexp, max,  # noqa: F401
                     mean, min, std, sum, topk, var)
from .shape import *  # noqa: F401,F403
from .shape import (chunk, contiguous, expand, expand_as, flatten, getitem, masked_fill, permute,  # noqa: F401
                    repeat, reshape, setitem, split, squeeze, transpose, tril, triu, unbind,
                    unflatten, unsqueeze, view, where)


# ---------------------------------------------------------------- Tensor operators
def _no_grad_op(ufunc, integral=None):
    """An elementwise op on the promoted operands with no gradient, as torch: comparisons
    (`tril == 0` gives a bool tensor) and, with integral naming the operator, the bitwise ops
    of bool and integer tensors (with a Tensor or a Python scalar: torch takes no lists; a
    Python int as _bitwise_int says; floats raise NotImplementedError, as torch). None or a
    str as the other operand: NotImplemented (so `t == None` is False, as in torch)."""
    from .elementwise import _check_broadcast

    def op(self, other):
        if integral and not isinstance(other, (Tensor, int, float, np.generic)):
            return NotImplemented
        other = lift(other, self)
        if other is NotImplemented:
            return NotImplemented
        dt, (a, b) = promote(self, other)
        if integral and dt.kind not in "biu":
            raise NotImplementedError(f"{integral} is only defined for bool and integer tensors, "
                                      f"got {dt}")
        if integral and type(b) is int:
            b = _bitwise_int(b, dt, self.dtype)
        if isinstance(b, Tensor):
            _check_broadcast(a.shape, b.shape)
            b = b.data
        return Tensor(getattr(_xp(a.data), ufunc)(a.data, b))
    return op


def _bitwise_int(v, dt, tensor_dtype):
    """A Python int operand of a bitwise op with result dtype dt (integer), as torch takes it:
    an int in [-2**63, 2**64) wraps into dt as two's complement (int8 & 300 is int8 & 44,
    uint8 & -1 is uint8 & 255); others raise OverflowError; with a bool tensor an int >= 2**63
    (a uint64 in torch) raises RuntimeError."""
    if v >= 2**64:
        raise OverflowError(f"int too big to convert: {v} is outside [-2**63, 2**64)")
    if v < -2**63:
        raise OverflowError(f"can't convert negative int to unsigned: {v} is outside "
                            f"[-2**63, 2**64)")
    if v >= 2**63 and tensor_dtype == np.bool_:
        raise RuntimeError(f"Promotion for uint64 types is not supported: a bool tensor with "
                           f"{v} (>= 2**63, a uint64 in torch)")
    bits = 8 * dt.itemsize
    v %= 2**bits
    return dt.type(v - 2**bits if dt.kind == "i" and v >= 2**(bits - 1) else v)


def _invert(self):
    if self.dtype.kind not in "biu":
        raise TypeError(f"~ (bitwise_not) is only defined for bool and integer tensors, got {self.dtype}")
    return Tensor(~self.data)


def allclose(a, b, rtol=1e-05, atol=1e-08, equal_nan=False):
    """torch.allclose: True when |a - b| <= atol + rtol * |b| everywhere (a Python bool)."""
    a, b = (x.data if isinstance(x, Tensor) else x for x in (a, b))
    return bool(_xp(a).allclose(a, b, rtol=rtol, atol=atol, equal_nan=equal_nan))


def _to(self, *args, **kwargs):
    """x.to(device), x.to(dtype) or x.to(device, dtype), as torch."""
    device = kwargs.pop("device", None)
    dtype = kwargs.pop("dtype", None)
    if kwargs:
        raise TypeError(f"to() got unexpected arguments {sorted(kwargs)}")
    for a in args:
        if isinstance(a, (str, backend.device)):
            device = a
        else:
            dtype = a
    out = self
    if device is not None:
        out = _to_device(out, device)
    if dtype is not None:
        out = cast(out, dtype)
    return out


for _name, _fn in (("add", add), ("sub", sub), ("mul", mul), ("truediv", div),
                   ("floordiv", floor_divide), ("pow", pow), ("matmul", matmul)):
    setattr(Tensor, f"__{_name}__", operator(_fn))                  # x + y
    setattr(Tensor, f"__r{_name}__", operator(_fn, reverse=True))   # 2 + x
Tensor.__neg__ = neg
Tensor.__abs__ = abs
Tensor.__getitem__ = getitem
Tensor.__setitem__ = setitem
Tensor.__lt__ = _no_grad_op("less")
Tensor.__le__ = _no_grad_op("less_equal")
Tensor.__gt__ = _no_grad_op("greater")
Tensor.__ge__ = _no_grad_op("greater_equal")
Tensor.__eq__ = _no_grad_op("equal")
Tensor.__ne__ = _no_grad_op("not_equal")
Tensor.__hash__ = object.__hash__  # by identity, as torch: tensors stay usable as dict keys
Tensor.__and__ = Tensor.__rand__ = _no_grad_op("bitwise_and", "&")
Tensor.__or__ = Tensor.__ror__ = _no_grad_op("bitwise_or", "|")
Tensor.__xor__ = Tensor.__rxor__ = _no_grad_op("bitwise_xor", "^")
Tensor.__invert__ = _invert
Tensor.logical_not = globals()["logical_not"]
for _name in ("logical_and", "logical_or", "logical_xor"):  # torch's logical ops: bool results
    setattr(Tensor, _name, globals()[_name])

for _name in ["sum", "mean", "amax", "amin", "all", "any", "exp", "log", "tanh", "relu", "sqrt",
              "rsqrt", "sigmoid", "abs", "sin", "cos", "clamp", "maximum", "minimum", "isnan",
              "isinf", "isfinite", "reshape", "view", "permute", "transpose", "masked_fill",
              "unsqueeze", "squeeze", "flatten", "unflatten", "expand", "expand_as", "repeat",
              "split", "chunk", "unbind", "tril", "triu", "softmax", "log_softmax", "matmul",
              "pow", "add", "sub", "mul", "div", "floor_divide", "neg", "t", "contiguous", "max", "min",
              "argmax", "argmin", "topk", "logsumexp", "var", "std", "cumsum", "gather"]:
    setattr(Tensor, _name, globals()[_name])
Tensor.clip = clamp
for _name in inplace.__all__:  # x.add_(y), x.zero_(), ... (ops/inplace.py)
    setattr(Tensor, _name, getattr(inplace, _name))
_to_device = Tensor.to  # tensor.py's: devices only
Tensor.to = _to
Tensor.long = lambda self: cast(self, np.int64)
Tensor.int = lambda self: cast(self, np.int32)
Tensor.bool = lambda self: cast(self, np.bool_)
Tensor.float = lambda self: cast(self, np.float32)
Tensor.double = lambda self: cast(self, np.float64)
Tensor.type_as = lambda self, other: cast(self, other.dtype)
Tensor.is_floating_point = lambda self: self.dtype.kind == "f"
Tensor.mT = property(lambda self: transpose(self, -2, -1))
