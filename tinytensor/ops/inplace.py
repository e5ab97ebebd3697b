"""In-place ops, as torch's trailing-underscore methods: x.zero_(), x.fill_(v), x.copy_(src),
x.add_(y), x.sub_(y), x.mul_(y), x.div_(y), x.clamp_(lo, hi), x.masked_fill_(mask, v).

Each computes its result as the out-of-place op would, checks it fits x (torch's rules: the
result dtype must cast to x's dtype without changing category, and the broadcast shape must be
x's shape), writes it into x's array and returns x. Views share their array with the tensor
they view, so writing into a slice writes into the tensor, as in torch.

Autograd, as torch: in place on a leaf that requires grad is an error while gradients are
recorded (use `with no_grad():`, as optimizers and initialisers do). tinytensor records no
in-place ops in the graph, so in place on a tensor computed from one that requires grad, or
with an operand that requires grad, is refused with an error that names it. Each write counts
in x's version (x._version, shared with its views), so a backward that needs x's old values
raises torch's RuntimeError instead of using the new ones.
"""
import numpy as np

from .. import backend, dtypes
from ..tensor import Tensor, increment_version, is_grad_enabled
from ._common import result_type
from .elementwise import add, check_sub_operands, clamp, div, mul, sub
from .reduce import _torch_dtype_name
from .shape import masked_fill


def _check_autograd(x, name, *operands):
    if not is_grad_enabled():
        return
    if x.requires_grad and x.is_leaf:
        raise RuntimeError(f"a leaf Variable that requires grad is being used in an in-place "
                           f"operation ({name}): wrap it in `with torch.no_grad():` (as "
                           f"initialisers and optimizers do)")
    if x.requires_grad or any(isinstance(o, Tensor) and o.requires_grad for o in operands):
        raise NotImplementedError(f"{name} on a tensor in the autograd graph is not supported "
                                  f"(tinytensor records no in-place ops): write the out-of-place "
                                  f"form, e.g. y = y + 1 instead of y.add_(1)")


def _write(x, result, name):
    """x's array <- result (a Tensor), after torch's dtype and shape checks; returns x."""
    src, dst = result.dtype, x.dtype
    if (src.kind == "f" and dst.kind != "f") or (src.kind != "b" and dst.kind == "b"):
        raise RuntimeError(f"{name}: result type {_torch_dtype_name(src)} can't be cast to the "
                           f"desired output type {_torch_dtype_name(dst)}")
    if result.shape != x.shape:
        raise RuntimeError(f"{name}: output with shape {list(x.shape)} doesn't match the "
                           f"broadcast shape {list(result.shape)}")
    x.data[...] = result.data
    increment_version(x)
    return x


def _binary(fn, name):
    def op(self, other, *, alpha=None):
        _check_autograd(self, name, other)
        if fn is sub:
            check_sub_operands(self, other)
        if alpha is not None:
            if dtypes.scalar_dtype(alpha).kind == "f" and self.dtype.kind != "f":
                raise RuntimeError(f"{name}: for integral input tensors, argument alpha must "
                                   f"not be a floating point number")
            if alpha != 1:  # alpha takes the dtype of the result, as torch: True for bools
                alpha = bool(alpha) if result_type(self, other) == np.bool_ else alpha
                other = other * alpha
        return _write(self, fn(self, other), name)
    op.__name__ = name
    op.__doc__ = f"x.{name}(other, alpha=None): x <- x {name[:-1]} other in place, as torch."
    return op


add_ = _binary(add, "add_")
sub_ = _binary(sub, "sub_")
mul_ = _binary(mul, "mul_")
div_ = _binary(div, "div_")


def zero_(x):
    _check_autograd(x, "zero_")
    x.data[...] = 0
    increment_version(x)
    return x


def fill_(x, value):
    """Every element <- value (a number or a 0-d tensor), cast to x's dtype as torch."""
    _check_autograd(x, "fill_", value)
    if isinstance(value, Tensor):
        if value.ndim:
            raise RuntimeError(f"fill_ only supports 0-dimension value tensor but got tensor "
                               f"with {value.ndim} dimensions")
        value = value.item()
    x.data[...] = value
    increment_version(x)
    return x


def copy_(x, src):
    """x <- src, broadcast to x's shape and cast to x's dtype (any dtype), moved to x's
    device."""
    _check_autograd(x, "copy_", src)
    src = src.data if isinstance(src, Tensor) else np.asarray(src)
    try:
        shape = np.broadcast_shapes(x.shape, src.shape)
    except ValueError:
        shape = None
    if shape != x.shape:
        raise RuntimeError(f"copy_: the source of shape {list(src.shape)} does not broadcast to "
                           f"the destination's shape {list(x.shape)}")
    x.data[...] = backend.to_device(src, x.device)
    increment_version(x)
    return x


def clamp_(x, min=None, max=None):
    _check_autograd(x, "clamp_", min, max)
    return _write(x, clamp(x, min, max), "clamp_")


def masked_fill_(x, mask, value):
    _check_autograd(x, "masked_fill_", value)
    return _write(x, masked_fill(x, mask, value), "masked_fill_")


def requires_grad_(x, requires_grad=True):
    """Set requires_grad in place (leaves only, as torch); returns x."""
    if not x.is_leaf and not requires_grad:
        raise RuntimeError("you can only change requires_grad flags of leaf variables. If you "
                           "want to use a computed variable in a subgraph that doesn't require "
                           "differentiation use var_no_grad = var.detach().")
    if requires_grad and x.dtype.kind not in "fc":
        raise RuntimeError(f"only Tensors of floating point dtype can require gradients, got "
                           f"{x.dtype}")
    x.requires_grad = bool(requires_grad)
    return x


__all__ = ["add_", "sub_", "mul_", "div_", "zero_", "fill_", "copy_", "clamp_", "masked_fill_",
           "requires_grad_"]
