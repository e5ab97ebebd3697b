"""tinytensor.nn.init against torch.nn.init: fans and gains equal torch's own helpers, every
initialiser uses the bound or std torch uses (both sides spied on), samples have torch's
distribution (tolerances of 6 standard errors of the sample size), deterministic fills equal
torch's, the errors are torch's; and each fills in place, keeps dtype and device, returns its
argument, and is reproducible under tinytensor.manual_seed."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import tinytensor as tt
from tinytensor import backend, nn
from tinytensor.nn import init

SHAPES = [(3, 4), (5, 2), (1, 1), (4, 3, 2), (6, 3, 2, 5), (2, 7, 1, 3, 2), (0, 3), (3, 0, 2), (1, 9, 4)]
FEW_DIMS = [(), (3,), (0,)]


def ours_and_torch(shape, dtype=np.float64):
    """A zero tensor of shape in tinytensor and in torch."""
    return tt.tensor(np.zeros(shape, dtype=dtype)), torch.zeros(shape, dtype=getattr(torch, np.dtype(dtype).name))


# ---------------------------------------------------------------- fans and gains
@pytest.mark.parametrize("shape", SHAPES)
def test_fans_equal_torch(shape):
    ours, theirs = ours_and_torch(shape)
    assert init._calculate_fan_in_and_fan_out(ours) == torch.nn.init._calculate_fan_in_and_fan_out(theirs)
    for mode in ("fan_in", "fan_out", "FAN_IN", "Fan_Out"):
        assert init._calculate_correct_fan(ours, mode) == torch.nn.init._calculate_correct_fan(theirs, mode)


@pytest.mark.parametrize("shape", FEW_DIMS)
def test_fans_need_two_dimensions_as_torch(shape):
    ours, theirs = ours_and_torch(shape)
    with pytest.raises(ValueError, match="fewer than 2 dimensions"):
        torch.nn.init._calculate_fan_in_and_fan_out(theirs)
    with pytest.raises(ValueError, match=r"fewer than 2 dimensions \(shape"):
        init._calculate_fan_in_and_fan_out(ours)


GAINS = [("linear", None), ("conv1d", None), ("conv2d", None), ("conv3d", None),
         ("conv_transpose1d", None), ("conv_transpose2d", None), ("conv_transpose3d", None),
         ("sigmoid", None), ("tanh", None), ("relu", None), ("selu", None), ("leaky_relu", None),
         ("leaky_relu", 0.2), ("leaky_relu", 0), ("leaky_relu", 3), ("leaky_relu", -0.5),
         ("leaky_relu", math.sqrt(5)), ("relu", 0.5), ("tanh", "ignored"), ("linear", True)]


@pytest.mark.parametrize("nonlinearity,param", GAINS)
def test_gains_equal_torch(nonlinearity, param):
    ours, theirs = init.calculate_gain(nonlinearity, param), torch.nn.init.calculate_gain(nonlinearity, param)
    assert ours == theirs and type(ours) is type(theirs)


@pytest.mark.parametrize("nonlinearity,param,match", [
    ("foo", None, "Unsupported nonlinearity foo"), ("ReLU", None, "Unsupported nonlinearity ReLU"),
    (None, None, "Unsupported nonlinearity None"), ("leaky_relu", True, "negative_slope True not a valid"),
    ("leaky_relu", "0.1", "negative_slope 0.1 not a valid"), ("leaky_relu", np.ones(1), "not a valid number")])
def test_gain_errors_as_torch(nonlinearity, param, match):
    with pytest.raises(ValueError):
        torch.nn.init.calculate_gain(nonlinearity, param)
    with pytest.raises(ValueError, match=match):
        init.calculate_gain(nonlinearity, param)


# ---------------------------------------------------------------- the bound or std in use
RANDOM_INITS = [  # (function name, keyword arguments)
    ("uniform_", {}), ("uniform_", {"a": -0.3, "b": 0.7}), ("normal_", {}),
    ("normal_", {"mean": 1.5, "std": 0.02}), ("xavier_uniform_", {}), ("xavier_uniform_", {"gain": 2.5}),
    ("xavier_normal_", {}), ("xavier_normal_", {"gain": 5.0 / 3}), ("kaiming_uniform_", {}),
    ("kaiming_uniform_", {"a": math.sqrt(5)}), ("kaiming_uniform_", {"mode": "fan_out"}),
    ("kaiming_uniform_", {"nonlinearity": "relu"}), ("kaiming_uniform_", {"nonlinearity": "tanh"}),
    ("kaiming_uniform_", {"a": 0.1, "mode": "FAN_OUT", "nonlinearity": "leaky_relu"}),
    ("kaiming_normal_", {}), ("kaiming_normal_", {"a": 0.2}), ("kaiming_normal_", {"mode": "fan_out"}),
    ("kaiming_normal_", {"nonlinearity": "relu", "mode": "fan_out"}), ("kaiming_normal_", {"nonlinearity": "selu"}),
]
PARAM_SHAPES = [(3, 4), (7, 2), (4, 3, 2), (6, 3, 2, 5), (2, 7, 1, 3, 2)]


def torch_draw_parameters(name, shape, kwargs, monkeypatch):
    """('uniform', low, high) or ('normal', mean, std): what torch.nn.init.<name> asks of
    Tensor.uniform_ / Tensor.normal_ (spied on)."""
    calls = []
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "uniform_", lambda self, a=0.0, b=1.0, generator=None:
                  calls.append(("uniform", a, b)) or self)
        m.setattr(torch.Tensor, "normal_", lambda self, mean=0.0, std=1.0, generator=None:
                  calls.append(("normal", mean, std)) or self)
        getattr(torch.nn.init, name)(torch.zeros(shape, dtype=torch.float64), **kwargs)
    assert len(calls) == 1
    return calls[0]


def our_draw_parameters(name, shape, kwargs, monkeypatch):
    """The same for ours: what tinytensor.nn.init.<name> asks of _fill_uniform / _fill_normal."""
    calls = []
    with monkeypatch.context() as m:
        m.setattr(init, "_fill_uniform", lambda _name, t, low, high: calls.append(("uniform", low, high)) or t)
        m.setattr(init, "_fill_normal", lambda _name, t, mean, std: calls.append(("normal", mean, std)) or t)
        getattr(init, name)(tt.tensor(np.zeros(shape)), **kwargs)
    assert len(calls) == 1
    return calls[0]


@pytest.mark.parametrize("shape", PARAM_SHAPES)
@pytest.mark.parametrize("name,kwargs", RANDOM_INITS)
def test_bound_or_std_equals_torch(name, kwargs, shape, monkeypatch):
    kind, *ours = our_draw_parameters(name, shape, kwargs, monkeypatch)
    theirs_kind, *theirs = torch_draw_parameters(name, shape, kwargs, monkeypatch)
    assert kind == theirs_kind
    assert ours == pytest.approx(theirs, rel=1e-15, abs=0)


# ---------------------------------------------------------------- the samples
def check_moments(x, mean, var, m4=None, what=""):
    """Sample mean and variance of x within 6 standard errors of mean and var (the error of the
    variance from the fourth central moment m4, estimated from x unless given)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    n = x.size
    if m4 is None:
        m4 = np.mean((x - x.mean()) ** 4)
    assert abs(x.mean() - mean) <= 6 * math.sqrt(var / n) + 1e-12, what
    assert abs(x.var() - var) <= 6 * math.sqrt(max(m4 - var ** 2, 0.0) / n) + 1e-12, what


@pytest.mark.parametrize("shape", [(300, 400), (20, 30, 5, 5)])
@pytest.mark.parametrize("name,kwargs", RANDOM_INITS)
def test_samples_have_torchs_distribution(name, kwargs, shape, monkeypatch):
    kind, p, q = torch_draw_parameters(name, shape, kwargs, monkeypatch)
    tt.manual_seed(0)
    x = getattr(init, name)(tt.tensor(np.zeros(shape)), **kwargs).numpy()
    if kind == "uniform":               # U(p, q): mean (p+q)/2, variance w^2/12, m4 w^4/80
        w = q - p
        assert p <= x.min() and x.max() <= q
        assert x.max() - x.min() > 0.99 * w                            # fills the whole interval
        check_moments(x, (p + q) / 2, w ** 2 / 12, w ** 4 / 80, name)
    else:                               # N(p, q^2): m4 = 3 q^4
        check_moments(x, p, q ** 2, 3 * q ** 4, name)


def truncated_normal_moments(mean, std, a, b):
    """Mean and variance of N(mean, std^2) truncated to [a, b], from torch's normal cdf and pdf."""
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    al, be = torch.tensor((a - mean) / std, dtype=torch.float64), torch.tensor((b - mean) / std, dtype=torch.float64)
    z = normal.cdf(be) - normal.cdf(al)
    pa, pb = normal.log_prob(al).exp(), normal.log_prob(be).exp()
    m = mean + std * (pa - pb) / z
    v = std ** 2 * (1 + (al * pa - be * pb) / z - ((pa - pb) / z) ** 2)
    return m.item(), v.item()


TRUNC = [(0.0, 1.0, -2.0, 2.0), (0.0, 0.02, -0.04, 0.04), (2.0, 1.0, -1.0, 5.0),        # normal draws
         (1.0, 1.0, -0.5, 0.5), (0.0, 1.0, 1.0, 3.0), (0.0, 1.0, -0.1, 0.1), (0.3, 2.0, 0.0, 0.5)]  # uniform proposals


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("mean,std,a,b", TRUNC)
def test_trunc_normal_within_bounds_with_torchs_moments(mean, std, a, b, dtype):
    tt.manual_seed(1)
    t = tt.tensor(np.zeros((200, 250), dtype=dtype))
    x = init.trunc_normal_(t, mean=mean, std=std, a=a, b=b).numpy()
    assert x.dtype == dtype
    assert dtype(a) <= x.min() and x.max() <= dtype(b)              # the bounds in the tensor's dtype
    m, v = truncated_normal_moments(mean, std, a, b)
    check_moments(x, m, v, what="theory")
    torch.manual_seed(1)
    ref = torch.nn.init.trunc_normal_(torch.zeros(200, 250, dtype=torch.float64), mean, std, a, b).numpy()
    se = math.sqrt(x.var() / x.size + ref.var() / ref.size)         # two samples: same mean
    assert abs(x.mean() - ref.mean()) <= 6 * se


def test_trunc_normal_warns_as_torch_when_the_mean_is_far():
    for fn, t in ((torch.nn.init.trunc_normal_, torch.zeros(50)), (init.trunc_normal_, tt.zeros(50))):
        with pytest.warns(UserWarning, match="mean is more than 2 std from"):
            x = fn(t, mean=10.0)
        assert (x.numpy() >= -2).all() and (x.numpy() <= 2).all()


# ---------------------------------------------------------------- in place, dtype, device, seeding
ALL_RANDOM = sorted({name for name, _ in RANDOM_INITS} | {"trunc_normal_"})


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ALL_RANDOM + ["zeros_", "ones_", "eye_", "constant_"])
def test_fills_in_place_keeping_dtype_and_device(name, dtype, device):
    p = nn.Parameter(backend.to_device(np.full((6, 5), 7.0, dtype=dtype), device))
    data = p.data
    args = (0.25,) if name == "constant_" else ()
    out = getattr(init, name)(p, *args)
    assert out is p and p.data is data                      # the same tensor, filled in place
    assert p.dtype == dtype and p.device.type == device
    assert p.requires_grad and p.is_leaf and p.grad is None   # no graph, as under torch's no_grad
    assert not np.any(p.numpy() == 7.0)


@pytest.mark.parametrize("name", ALL_RANDOM)
def test_reproducible_under_manual_seed(name):
    def draw(seed):
        tt.manual_seed(seed)
        return getattr(init, name)(tt.zeros(8, 9)).numpy().copy()

    np.testing.assert_array_equal(draw(5), draw(5))
    assert not np.array_equal(draw(5), draw(6))


@pytest.mark.parametrize("name", ALL_RANDOM)
def test_generator_none_is_taken_a_generator_object_is_not(name):
    assert getattr(init, name)(tt.zeros(3, 4), generator=None).shape == (3, 4)
    with pytest.raises(NotImplementedError, match=r"generator=\.\.\.\) is not supported.*manual_seed"):
        getattr(init, name)(tt.zeros(3, 4), generator=torch.Generator())


# ---------------------------------------------------------------- deterministic fills equal torch
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.int64])
@pytest.mark.parametrize("name,args,shape", [
    ("zeros_", (), (3, 4)), ("ones_", (), (2, 3, 2)), ("constant_", (2.7,), (5,)), ("constant_", (-3,), (2, 2)),
    ("constant_", ("tensor", 1.5), (4, 1)), ("eye_", (), (3, 3)), ("eye_", (), (2, 5)), ("eye_", (), (5, 2)),
    ("zeros_", (), ()), ("ones_", (), (0, 3))])
def test_deterministic_fills_equal_torch(name, args, shape, dtype):
    ours, theirs = ours_and_torch(shape, dtype)
    ours.data[...] = 9
    theirs.fill_(9)
    if args and args[0] == "tensor":
        ours_args, torch_args = (tt.tensor(args[1]),), (torch.tensor(args[1]),)
    else:
        ours_args = torch_args = args
    getattr(init, name)(ours, *ours_args)
    ref = getattr(torch.nn.init, name)(theirs, *torch_args)
    assert ours.numpy().dtype == dtype
    np.testing.assert_array_equal(ours.numpy(), ref.numpy())


# ---------------------------------------------------------------- errors as torch
ERRORS = [  # (function, shape, dtype, kwargs, error type, part of our message)
    ("xavier_uniform_", (3,), np.float64, {}, ValueError, "fewer than 2 dimensions"),
    ("xavier_normal_", (), np.float64, {}, ValueError, "fewer than 2 dimensions"),
    ("kaiming_uniform_", (3,), np.float64, {}, ValueError, "fewer than 2 dimensions"),
    ("kaiming_normal_", (4,), np.float32, {"mode": "fan_out"}, ValueError, "fewer than 2 dimensions"),
    ("kaiming_uniform_", (3, 4), np.float64, {"mode": "fanin"}, ValueError, "Mode fanin not supported"),
    ("kaiming_normal_", (3, 4), np.float64, {"mode": "in"}, ValueError, "Mode in not supported"),
    ("kaiming_uniform_", (3, 4), np.float64, {"nonlinearity": "foo"}, ValueError, "Unsupported nonlinearity foo"),
    ("kaiming_normal_", (3, 4), np.float64, {"a": True}, ValueError, "negative_slope True not a valid number"),
    ("eye_", (3,), np.float64, {}, ValueError, "Only tensors with 2 dimensions"),
    ("eye_", (2, 2, 2), np.float64, {}, ValueError, "Only tensors with 2 dimensions"),
    ("normal_", (3,), np.float64, {"std": -1.0}, RuntimeError, "normal expects std >= 0.0"),
    ("uniform_", (3,), np.float64, {"a": 2.0, "b": 1.0}, RuntimeError, "found from=2.0 > to=1.0"),
    ("trunc_normal_", (3,), np.float64, {"a": 2.0, "b": -2.0}, RuntimeError, "expects a <= b"),
    ("trunc_normal_", (3,), np.float64, {"std": 0.0}, ZeroDivisionError, "division by zero"),
    ("xavier_uniform_", (0, 0), np.float64, {}, ZeroDivisionError, "division by zero"),
    ("normal_", (3,), np.int64, {}, NotImplementedError, "fills floating point tensors, got dtype int64"),
    ("uniform_", (3,), np.int64, {}, NotImplementedError, "fills floating point tensors, got dtype int64"),
    ("trunc_normal_", (3,), np.int64, {}, NotImplementedError, "fills floating point tensors"),
    ("kaiming_uniform_", (2, 3), np.int64, {}, NotImplementedError, "fills floating point tensors"),
    ("xavier_normal_", (2, 3), np.int32, {}, NotImplementedError, "got dtype int32"),
]


@pytest.mark.parametrize("name,shape,dtype,kwargs,error,match", ERRORS)
def test_errors_as_torch(name, shape, dtype, kwargs, error, match):
    ours, theirs = ours_and_torch(shape, dtype)
    with pytest.raises(error):
        getattr(torch.nn.init, name)(theirs, **kwargs)
    with pytest.raises(error, match=match):
        getattr(init, name)(ours, **kwargs)


@pytest.mark.parametrize("name", ["kaiming_uniform_", "kaiming_normal_"])
@pytest.mark.parametrize("shape", [(0,), (0, 3), (4, 0, 2)])
def test_kaiming_of_no_elements_warns_and_returns_as_torch(name, shape):
    ours, theirs = ours_and_torch(shape)
    with pytest.warns(UserWarning, match="zero-element tensors is a no-op"):
        assert getattr(torch.nn.init, name)(theirs) is theirs
    with pytest.warns(UserWarning, match="zero-element tensors is a no-op"):
        assert getattr(init, name)(ours) is ours


# ---------------------------------------------------------------- torch aliased to tinytensor
ALIASED = """
import sys
import tinytensor, tinytensor.nn, tinytensor.nn.functional, tinytensor.optim
sys.modules.update({"torch": tinytensor, "torch.nn": tinytensor.nn,
                    "torch.nn.functional": tinytensor.nn.functional, "torch.optim": tinytensor.optim})
import torch
import torch.nn as nn
from torch.nn import init
lin = nn.Linear(64, 48)
torch.manual_seed(3)
w = torch.nn.init.normal_(lin.weight, mean=0.0, std=0.02)
first = w.numpy().copy()
torch.nn.init.zeros_(lin.bias)
import torch.nn.init
torch.manual_seed(3)
torch.nn.init.normal_(lin.weight, mean=0.0, std=0.02)
assert w is lin.weight and (lin.weight.numpy() == first).all() and (lin.bias.numpy() == 0).all()
torch.manual_seed(3)
init.normal_(lin.weight, mean=0.0, std=0.02)
assert (lin.weight.numpy() == first).all()
print(repr(float(first.std())))
"""


def test_under_torch_aliases():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    out = subprocess.run([sys.executable, "-c", ALIASED], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    n = 64 * 48
    assert abs(float(out.stdout) - 0.02) <= 6 * 0.02 / math.sqrt(2 * n)
