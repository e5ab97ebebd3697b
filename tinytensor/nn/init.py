"""Parameter initialisation, as torch.nn.init: each function fills a tensor in place and
returns it.

    nn.init.normal_(module.weight, mean=0.0, std=0.02)
    nn.init.zeros_(module.bias)

The values are written into `tensor.data` (so a Parameter that requires grad is filled without
entering a graph, as torch's no_grad() does), keep the tensor's dtype and device, and are drawn
from tinytensor's own random streams (tinytensor.manual_seed makes them reproducible). The fans,
gains, bounds and standard deviations are torch's. torch's `generator=` keyword is taken: None
draws from the library's stream; a generator object is not supported.

Only the package's attributes are imported (`from .. import backend`), so the module also works
when it is imported under another package name (torch aliased to tinytensor).
"""
import math
import warnings

from .. import backend
from .. import random as _random
from ..tensor import increment_version

_LINEAR_GAINS = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                 "conv_transpose3d", "sigmoid")


def calculate_gain(nonlinearity, param=None):
    """torch.nn.init.calculate_gain: 1 for linear, conv* and sigmoid, 5/3 for tanh, sqrt(2) for
    relu, sqrt(2 / (1 + slope**2)) for leaky_relu (slope `param`, default 0.01), 3/4 for selu."""
    if nonlinearity in _LINEAR_GAINS:
        return 1
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        if param is None:
            slope = 0.01
        elif isinstance(param, (int, float)) and not isinstance(param, bool):
            slope = param
        else:
            raise ValueError(f"negative_slope {param} not a valid number: calculate_gain('leaky_relu', "
                             f"param) takes an int or float slope")
        return math.sqrt(2.0 / (1 + slope ** 2))
    if nonlinearity == "selu":
        return 3.0 / 4
    raise ValueError(f"Unsupported nonlinearity {nonlinearity}: expected one of "
                     f"{list(_LINEAR_GAINS) + ['tanh', 'relu', 'leaky_relu', 'selu']}")


def _calculate_fan_in_and_fan_out(tensor):
    """(fan_in, fan_out) as torch: size(1) and size(0), each times the receptive field (the
    product of the sizes beyond the first two); ValueError for fewer than 2 dimensions."""
    shape = tensor.shape
    if len(shape) < 2:
        raise ValueError(f"Fan in and fan out can not be computed for tensor with fewer than 2 "
                         f"dimensions (shape {tuple(shape)}): give a weight of 2 or more dimensions")
    receptive_field = math.prod(shape[2:])
    return shape[1] * receptive_field, shape[0] * receptive_field


def _calculate_correct_fan(tensor, mode):
    """fan_in or fan_out, chosen by mode (in any letter case, as torch)."""
    mode = mode.lower()
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"Mode {mode} not supported, please use one of ['fan_in', 'fan_out']")
    fan_in, fan_out = _calculate_fan_in_and_fan_out(tensor)
    return fan_in if mode == "fan_in" else fan_out


def _check_generator(name, generator):
    if generator is not None:
        raise NotImplementedError(f"nn.init.{name}(generator=...) is not supported: tinytensor draws "
                                  f"from its own random streams; pass generator=None and seed them "
                                  f"with tinytensor.manual_seed")


def _generator_for(name, tensor):
    """The random stream for the tensor's device; NotImplementedError for a tensor that is not
    floating point (torch's random fills have no integer kernels)."""
    if tensor.data.dtype.kind != "f":
        raise NotImplementedError(f"nn.init.{name} fills floating point tensors, got dtype "
                                  f"{tensor.data.dtype}: cast the tensor to a float dtype first")
    return _random.rng(backend.get_array_module(tensor.data))


def _fill_uniform(name, tensor, low, high):
    """tensor.data <- U[low, high) draws, as torch's Tensor.uniform_(low, high)."""
    gen = _generator_for(name, tensor)
    if low > high:
        raise RuntimeError(f"{name} expects a range [from, to) with from <= to, but found "
                           f"from={low} > to={high}: swap the bounds")
    tensor.data[...] = low + (high - low) * gen.random(tensor.data.shape)
    increment_version(tensor)
    return tensor


def _fill_normal(name, tensor, mean, std):
    """tensor.data <- N(mean, std**2) draws, as torch's Tensor.normal_(mean, std)."""
    gen = _generator_for(name, tensor)
    if std < 0:
        raise RuntimeError(f"normal expects std >= 0.0, but found std {std}: give a "
                           f"non-negative standard deviation")
    tensor.data[...] = mean + std * gen.standard_normal(tensor.data.shape)
    increment_version(tensor)
    return tensor


def uniform_(tensor, a=0.0, b=1.0, generator=None):
    """Fill with draws from U(a, b) (torch.nn.init.uniform_)."""
    _check_generator("uniform_", generator)
    return _fill_uniform("uniform_", tensor, a, b)


def normal_(tensor, mean=0.0, std=1.0, generator=None):
    """Fill with draws from N(mean, std**2) (torch.nn.init.normal_)."""
    _check_generator("normal_", generator)
    return _fill_normal("normal_", tensor, mean, std)


def _norm_cdf(x):
    return (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0


def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0, generator=None):
    """Fill with draws from N(mean, std**2) truncated to [a, b]: every value lies in [a, b].

    As torch: when [a, b] holds more than 30% of the normal's mass, normal draws outside it are
    redrawn until none is left; otherwise uniform proposals on [a, b] are accepted with
    probability pdf(x) / pdf(mode). A warning when mean is more than 2 std outside [a, b].
    """
    _check_generator("trunc_normal_", generator)
    if mean < a - 2 * std or mean > b + 2 * std:
        warnings.warn("mean is more than 2 std from [a, b] in nn.init.trunc_normal_. "
                      "The distribution of values may be incorrect.", stacklevel=2)
    gen = _generator_for("trunc_normal_", tensor)
    if a > b:
        raise RuntimeError(f"trunc_normal_ expects a <= b, but found a={a} > b={b}: swap the bounds")
    xp, shape = backend.get_array_module(tensor.data), tensor.data.shape
    if _norm_cdf((b - mean) / std) - _norm_cdf((a - mean) / std) > 0.3:
        def draw():
            return mean + std * gen.standard_normal(shape)

        def accepted(x):
            return (x >= a) & (x <= b)
    else:
        peak = (max(a, min(mean, b)) - mean) / std          # the mode of the truncated density

        def draw():
            return a + (b - a) * gen.random(shape)

        def accepted(x):
            return xp.log(gen.random(shape)) <= 0.5 * (peak ** 2 - ((x - mean) / std) ** 2)
    out = draw()
    pending = ~accepted(out)
    while pending.any():
        x = draw()
        out = xp.where(pending, x, out)
        pending &= ~accepted(x)
    tensor.data[...] = out
    increment_version(tensor)
    return tensor


def constant_(tensor, val):
    """Fill with val (a number or a one-element tensor), cast to the tensor's dtype as torch's
    fill_ does (2.7 into an integer tensor gives 2)."""
    tensor.data[...] = val.item() if hasattr(val, "item") else val
    increment_version(tensor)
    return tensor


def ones_(tensor):
    """Fill with ones (torch.nn.init.ones_)."""
    return constant_(tensor, 1)


def zeros_(tensor):
    """Fill with zeros (torch.nn.init.zeros_)."""
    return constant_(tensor, 0)


def eye_(tensor):
    """Fill a 2-D tensor with the identity matrix (ones on the diagonal of a rectangular one);
    ValueError for another number of dimensions, as torch."""
    if tensor.data.ndim != 2:
        raise ValueError(f"Only tensors with 2 dimensions are supported, got shape "
                         f"{tuple(tensor.data.shape)}: eye_ fills a matrix")
    xp = backend.get_array_module(tensor.data)
    tensor.data[...] = xp.eye(*tensor.data.shape)
    increment_version(tensor)
    return tensor


def _xavier_std(tensor, gain):
    fan_in, fan_out = _calculate_fan_in_and_fan_out(tensor)
    return gain * math.sqrt(2.0 / float(fan_in + fan_out))


def xavier_uniform_(tensor, gain=1.0, generator=None):
    """Glorot uniform: U(-bound, bound) with bound = gain * sqrt(6 / (fan_in + fan_out))."""
    _check_generator("xavier_uniform_", generator)
    bound = math.sqrt(3.0) * _xavier_std(tensor, gain)
    return _fill_uniform("xavier_uniform_", tensor, -bound, bound)


def xavier_normal_(tensor, gain=1.0, generator=None):
    """Glorot normal: N(0, std**2) with std = gain * sqrt(2 / (fan_in + fan_out))."""
    _check_generator("xavier_normal_", generator)
    return _fill_normal("xavier_normal_", tensor, 0.0, _xavier_std(tensor, gain))


def _kaiming(name, tensor, a, mode, nonlinearity, generator):
    """He initialisation with std = gain / sqrt(fan): U(-sqrt(3) std, sqrt(3) std) for
    kaiming_uniform_, N(0, std**2) for kaiming_normal_; a tensor with no elements is left as it
    is, with torch's warning."""
    _check_generator(name, generator)
    if 0 in tensor.data.shape:
        warnings.warn("Initializing zero-element tensors is a no-op", stacklevel=3)
        return tensor
    std = calculate_gain(nonlinearity, a) / math.sqrt(_calculate_correct_fan(tensor, mode))
    if name == "kaiming_uniform_":
        bound = math.sqrt(3.0) * std
        return _fill_uniform(name, tensor, -bound, bound)
    return _fill_normal(name, tensor, 0.0, std)


def kaiming_uniform_(tensor, a=0, mode="fan_in", nonlinearity="leaky_relu", generator=None):
    """He uniform: U(-bound, bound) with bound = gain * sqrt(3 / fan), gain from
    calculate_gain(nonlinearity, a) and fan_in or fan_out by mode."""
    return _kaiming("kaiming_uniform_", tensor, a, mode, nonlinearity, generator)


def kaiming_normal_(tensor, a=0, mode="fan_in", nonlinearity="leaky_relu", generator=None):
    """He normal: N(0, std**2) with std = gain / sqrt(fan), gain from
    calculate_gain(nonlinearity, a) and fan_in or fan_out by mode."""
    return _kaiming("kaiming_normal_", tensor, a, mode, nonlinearity, generator)
