"""Elementwise ops: arithmetic with torch's type promotion, activations, comparisons.

Binary ops take Tensors or Python scalars; their wrappers promote the operands to torch's
result dtype first (ops/_common.promote), so forward and backward see operands of one dtype.
Gradients may have a broadcast shape: the engine un-broadcasts them.
"""
import math
import numbers

import numpy as np

from .. import backend
from ..tensor import Function, Tensor
from ._common import _xp, cast, lift, promote, result_type, to_float


def _binary(fn, a, b, floating=False):
    """fn applied to a and b (Tensors or scalars, at least one a Tensor) after promotion."""
    if isinstance(a, Tensor) and a.dtype.kind == "f" and (
            type(b) in (int, float) or isinstance(b, Tensor) and b.dtype == a.dtype):
        return fn(a, b)  # the common cases, where promotion changes nothing
    if isinstance(b, Tensor) and b.dtype.kind == "f" and type(a) in (int, float):
        return fn(a, b)
    dt, (a, b) = promote(a, b, floating=floating)
    return fn(a, b)


def operator(fn, reverse=False):
    """The Tensor method of a binary operator: x + y is add(x, y), 2 + x (reverse) add(2, x);
    NotImplemented for an operand that is no number, array or Tensor (Python then raises)."""
    def op(self, other):
        other = lift(other, self)
        if other is NotImplemented:
            return NotImplemented
        return fn(other, self) if reverse else fn(self, other)
    return op


# ---------------------------------------------------------------- arithmetic
class Add(Function):
    def forward(self, a, b):
        return a + b

    def backward(self, gy):
        return gy, gy


def add(a, b):
    return _binary(Add.apply, a, b)


class Sub(Function):
    def forward(self, a, b):
        return a - b

    def backward(self, gy):
        return gy, (-gy if self.needs_grad[1] else None)


def check_sub_operands(a, b):
    """torch refuses a bool operand of `-` (tensor or Python bool), whatever the other is."""
    if any(isinstance(o, bool) or isinstance(o, Tensor) and o.dtype == np.bool_ for o in (a, b)):
        raise RuntimeError("Subtraction, the `-` operator, with a bool tensor is not supported: "
                           "use the `^` or `logical_xor()` operator instead")


def sub(a, b):
    check_sub_operands(a, b)
    return _binary(Sub.apply, a, b)


class Mul(Function):
    def forward(self, a, b):
        # each operand kept only for the other's gradient, as torch saves them
        self.a = a if self.needs_grad[1] else None
        self.b = b if self.needs_grad[0] else None
        return a * b

    def backward(self, gy):
        ga = gy * self.b if self.needs_grad[0] else None
        gb = gy * self.a if self.needs_grad[1] else None
        return ga, gb


def mul(a, b):
    return _binary(Mul.apply, a, b)


class Div(Function):
    def forward(self, a, b):
        self.a = a if self.needs_grad[1] else None  # only b's gradient reads a (as torch)
        self.b = b
        return a / b

    def backward(self, gy):
        ga = gy / self.b if self.needs_grad[0] else None
        gb = -gy * self.a / (self.b * self.b) if self.needs_grad[1] else None
        return ga, gb


def div(a, b):
    """True division: integer operands give the default float dtype, as in torch."""
    return _binary(Div.apply, a, b, floating=True)


class FloorDivide(Function):
    def forward(self, a, b):
        if _xp(a, b) is np and np.result_type(a, b).kind in "iub" and np.any(np.asarray(b) == 0):
            raise RuntimeError("ZeroDivisionError: integer floor division by zero")
        return a // b

    def backward(self, gy):
        raise RuntimeError("derivative for floor_divide is not implemented (as in torch): "
                           "detach() the operands of // before backward")


def floor_divide(a, b):
    return _binary(FloorDivide.apply, a, b)


class Neg(Function):
    def forward(self, x):
        if x.dtype == np.bool_:
            raise RuntimeError("Negation, the `-` operator, on a bool tensor is not supported: "
                               "to invert a mask use the `~` operator")
        return -x

    def backward(self, gy):
        return -gy


def neg(x):
    return Neg.apply(x)


class Pow(Function):
    """a ** b: a tensor to a scalar or tensor power, or a scalar to a tensor power, with the
    gradients torch defines (0 for the base where the exponent is 0; 0 for the exponent where
    the base is 0 and the exponent >= 0)."""

    def forward(self, a, b):
        self.a, self.b = a, b
        if np.result_type(a, b).kind in "iu" and bool(_xp(a, b).any(_xp(a, b).asarray(b) < 0)):
            raise RuntimeError("Integers to negative integer powers are not allowed.")
        with np.errstate(divide="ignore", invalid="ignore"):
            self.y = a ** b
        return self.y

    def backward(self, gy):
        xp, a, b = _xp(gy), self.a, self.b
        ga = gb = None
        with np.errstate(divide="ignore", invalid="ignore"):
            if self.needs_grad[0]:
                if isinstance(b, numbers.Number):
                    ga = xp.zeros_like(gy) if b == 0 else gy * (b * a ** (b - 1))
                else:
                    ga = gy * xp.where(b == 0, 0, b * a ** (b - 1)).astype(gy.dtype, copy=False)
            if self.needs_grad[1]:
                d = self.y * xp.log(a)
                gb = gy * xp.where((a == 0) & (b >= 0), 0, d).astype(gy.dtype, copy=False)
        return ga, gb


def pow(a, b):  # noqa: A001 - mirrors torch.pow
    b = lift(b, a) if isinstance(a, Tensor) else b
    if b is NotImplemented:
        raise TypeError(f"unsupported exponent of type {type(b).__name__} for pow")
    return _binary(Pow.apply, a, b)


class Maximum(Function):
    """max(a, b) elementwise; at ties each operand gets half the gradient (as torch)."""

    def forward(self, a, b, lower=False):
        xp = _xp(a, b)
        self.a, self.b, self.lower = a, b, lower
        return xp.minimum(a, b) if lower else xp.maximum(a, b)

    def backward(self, gy):
        a, b = self.a, self.b
        wins = (a < b) if self.lower else (a > b)
        wa = wins + 0.5 * (a == b)                    # 1 where a is taken, 1/2 at ties
        ga = gy * wa.astype(gy.dtype, copy=False) if self.needs_grad[0] else None
        gb = gy * (1 - wa).astype(gy.dtype, copy=False) if self.needs_grad[1] else None
        return ga, gb


def maximum(a, b):
    return _binary(lambda x, y: Maximum.apply(x, y), a, b)


def minimum(a, b):
    return _binary(lambda x, y: Maximum.apply(x, y, lower=True), a, b)


# ---------------------------------------------------------------- unary, float
class Exp(Function):
    def forward(self, x):
        self.y = _xp(x).exp(x)
        return self.y

    def backward(self, gy):
        return gy * self.y


def exp(x):
    return Exp.apply(to_float(x))


class Log(Function):
    def forward(self, x):
        self.x = x
        with np.errstate(divide="ignore", invalid="ignore"):
            return _xp(x).log(x)

    def backward(self, gy):
        return gy / self.x


def log(x):
    return Log.apply(to_float(x))


class Tanh(Function):
    def forward(self, x):
        self.y = _xp(x).tanh(x)
        return self.y

    def backward(self, gy):
        return gy * (1 - self.y * self.y)


def tanh(x):
    return Tanh.apply(to_float(x))


class Sigmoid(Function):
    def forward(self, x):
        xp = _xp(x)
        e = xp.exp(-xp.abs(x))                         # in (0, 1]: no overflow either side
        self.y = xp.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)
        return self.y

    def backward(self, gy):
        return gy * (self.y * (1 - self.y))


def sigmoid(x):
    return Sigmoid.apply(to_float(x))


class SiLU(Function):
    """x * sigmoid(x)."""

    def forward(self, x):
        xp = _xp(x)
        e = xp.exp(-xp.abs(x))
        self.x = x
        self.s = xp.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)
        return x * self.s

    def backward(self, gy):
        s = self.s
        return gy * (s * (1 + self.x * (1 - s)))


def silu(x):
    return SiLU.apply(to_float(x))


class Sqrt(Function):
    def forward(self, x):
        with np.errstate(invalid="ignore"):
            self.y = _xp(x).sqrt(x)
        return self.y

    def backward(self, gy):
        with np.errstate(divide="ignore"):
            return gy / (2 * self.y)


def sqrt(x):
    return Sqrt.apply(to_float(x))


class Rsqrt(Function):
    def forward(self, x):
        with np.errstate(divide="ignore", invalid="ignore"):
            self.y = 1 / _xp(x).sqrt(x)
        return self.y

    def backward(self, gy):
        return gy * (-0.5 * self.y ** 3)


def rsqrt(x):
    return Rsqrt.apply(to_float(x))


class Sin(Function):
    def forward(self, x):
        self.x = x
        return _xp(x).sin(x)

    def backward(self, gy):
        return gy * _xp(gy).cos(self.x)


def sin(x):
    return Sin.apply(to_float(x))


class Cos(Function):
    def forward(self, x):
        self.x = x
        return _xp(x).cos(x)

    def backward(self, gy):
        return gy * -_xp(gy).sin(self.x)


def cos(x):
    return Cos.apply(to_float(x))


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


class Erf(Function):
    def forward(self, x):
        self.x = x
        return backend_erf(x)

    def backward(self, gy):
        return gy * (2 / math.sqrt(math.pi) * _xp(gy).exp(-self.x * self.x))


def erf(x):
    return Erf.apply(to_float(x))


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


def gelu(x, approximate="none"):
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu approximate must be 'none' or 'tanh', got {approximate!r}")
    return GELU.apply(to_float(x), approximate=approximate)


# ---------------------------------------------------------------- unary, any dtype
class ReLU(Function):
    def forward(self, x):  # max(x, 0) as torch: relu(-inf) is 0 (x * (x > 0) would be NaN)
        self.mask = x > 0
        return _xp(x).maximum(x, x.dtype.type(0))         # NaN stays NaN

    def backward(self, gy):
        return gy * self.mask


def relu(x):
    if x.dtype == np.bool_:
        raise RuntimeError("Boolean inputs not supported for relu")
    return ReLU.apply(x)


class LeakyReLU(Function):
    def forward(self, x, negative_slope=0.01):
        self.mask, self.slope = x > 0, negative_slope
        return _xp(x).where(self.mask, x, x * x.dtype.type(negative_slope))

    def backward(self, gy):
        return _xp(gy).where(self.mask, gy, gy * gy.dtype.type(self.slope))


def leaky_relu(x, negative_slope=0.01):
    return LeakyReLU.apply(to_float(x), negative_slope=float(negative_slope))


class Abs(Function):
    def forward(self, x):
        self.x = x
        return _xp(x).abs(x)

    def backward(self, gy):
        return gy * _xp(gy).sign(self.x)


def abs(x):  # noqa: A001 - mirrors torch.abs
    return Abs.apply(x)


class Clamp(Function):
    """min(max(x, lo), hi) with scalar bounds (None: unbounded). x gets the gradient where it
    lies within [lo, hi], ends included, as in torch."""

    def forward(self, x, lo=None, hi=None):
        xp = _xp(x)
        keep = xp.ones(x.shape, dtype=bool)
        y = x
        if lo is not None:
            keep &= x >= lo
            y = xp.maximum(y, lo)
        if hi is not None:
            keep &= x <= hi
            y = xp.minimum(y, hi)
        self.keep = keep
        return y.astype(x.dtype, copy=False)

    def backward(self, gy):
        return gy * self.keep


class ClampTensor(Function):
    """min(max(x, lo), hi) with tensor bounds; each gets the gradient where it is the result."""

    def forward(self, x, lo, hi):
        xp = _xp(x, lo, hi)
        m = xp.maximum(x, lo)
        self.x_in = (x >= lo) & (x <= hi)
        self.lo_in = (lo > x) & (lo <= hi)
        self.hi_in = hi < m
        return xp.minimum(m, hi)

    def backward(self, gy):
        return gy * self.x_in, gy * self.lo_in, gy * self.hi_in


def clamp(x, min=None, max=None):  # noqa: A002 - torch's argument names
    if min is None and max is None:
        raise RuntimeError("clamp: at least one of 'min' or 'max' must not be None")
    if isinstance(min, Tensor) or isinstance(max, Tensor):
        bounds = [None if b is None else lift(b, x) for b in (min, max)]
        dt, promoted = promote(x, *(b for b in bounds if b is not None))
        x, rest = promoted[0], iter(promoted[1:])

        def bound(b, end):  # a missing bound: the dtype's extreme, so it never binds
            if b is not None:
                return next(rest)
            v = (-np.inf, np.inf)[end] if dt.kind == "f" else (np.iinfo(dt).min, np.iinfo(dt).max)[end]
            return Tensor(np.full((), v, dtype=dt)).to(x.device)
        lo, hi = bound(bounds[0], 0), bound(bounds[1], 1)
        return ClampTensor.apply(x, lo, hi)
    dt = result_type(x, *(b for b in (min, max) if b is not None))
    return Clamp.apply(cast(x, dt), lo=min, hi=max)


clip = clamp


def isnan(x):
    return Tensor(_xp(x.data).isnan(x.data))


def isinf(x):
    return Tensor(_xp(x.data).isinf(x.data))


def isfinite(x):
    return Tensor(_xp(x.data).isfinite(x.data))


# ---------------------------------------------------------------- logical (bool, no gradient)
def _check_broadcast(a, b):
    """torch's error where shapes a and b do not broadcast: RuntimeError naming the sizes and
    the dim (counted in the broadcast result) where they first differ from the right."""
    for d in range(1, min(len(a), len(b)) + 1):
        if a[-d] != b[-d] and a[-d] != 1 and b[-d] != 1:
            raise RuntimeError(f"The size of tensor a ({a[-d]}) must match the size of tensor b "
                               f"({b[-d]}) at non-singleton dimension {max(len(a), len(b)) - d}")


def _logical(name, a, b):
    """xp.<name>(a, b) for two tensors (of any dtypes, broadcast) as a bool tensor."""
    for t, arg, pos in ((a, "input", 1), (b, "other", 2)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}(): argument '{arg}' (position {pos}) must be Tensor, not "
                            f"{type(t).__name__}")
    _check_broadcast(a.shape, b.shape)
    return Tensor(getattr(_xp(a.data, b.data), name)(a.data, b.data))


def logical_not(x):
    """torch.logical_not: a bool tensor, True where x is zero (any dtype; NaN is nonzero)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"logical_not(): argument 'input' (position 1) must be Tensor, not "
                        f"{type(x).__name__}")
    return Tensor(_xp(x.data).logical_not(x.data))


def logical_and(a, b):
    """torch.logical_and: a bool tensor, True where a and b are both nonzero (any dtypes; NaN
    is nonzero), broadcast; both must be tensors."""
    return _logical("logical_and", a, b)


def logical_or(a, b):
    """torch.logical_or: a bool tensor, True where a or b is nonzero (as logical_and)."""
    return _logical("logical_or", a, b)


def logical_xor(a, b):
    """torch.logical_xor: a bool tensor, True where exactly one of a and b is nonzero (as
    logical_and)."""
    return _logical("logical_xor", a, b)
