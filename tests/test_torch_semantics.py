"""torch's semantics where lecture code relies on them, and the ops of round 2, against PyTorch.

Most cases here are written once as `lambda m: ...` and run with m = tinytensor and m = torch:
the same source text gives the same values, dtypes, shapes and errors in both libraries, as it
does for a reader typing the lecture's torch code into tinytensor.
"""
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import tinytensor as tt
import tinytensor.nn.functional as F
from torch_helper import Const, check, dtypes, randn

INF = math.inf


def pos(*shape, seed=7):
    return 0.5 + 2.0 * np.random.default_rng(seed).random(shape)


def _dtype_name(x):
    return str(x.dtype).replace("torch.", "")


@pytest.fixture(params=[np.float32, np.float64], ids=["default-f32", "default-f64"])
def default_dtype(request):
    """Both libraries' default float dtype (what Python floats and lists of them become)."""
    tt.set_default_dtype(request.param)
    torch.set_default_dtype(getattr(torch, np.dtype(request.param).name))
    yield request.param
    tt.set_default_dtype(np.float32)
    torch.set_default_dtype(torch.float32)


def same_result(fn):
    """fn(tt) and fn(torch): equal values, shape and dtype (no gradients)."""
    ours, ref = fn(tt), fn(torch)
    assert isinstance(ours, tt.Tensor), f"tinytensor returned {type(ours).__name__}"
    assert _dtype_name(ours) == _dtype_name(ref), f"dtype {ours.dtype} != torch's {ref.dtype}"
    assert ours.shape == tuple(ref.shape), f"shape {ours.shape} != torch's {tuple(ref.shape)}"
    np.testing.assert_allclose(ours.numpy().astype(np.float64), ref.numpy().astype(np.float64),
                               rtol=1e-6, atol=0, equal_nan=True)


def same_error(fn, match=None):
    """fn(torch) raises; fn(tt) raises the same exception type (with `match` in its message)."""
    with pytest.raises(Exception) as theirs:
        fn(torch)
    with pytest.raises(theirs.type, match=match):
        fn(tt)


# ---------------------------------------------------------------- 1. comparisons
COMPARISONS = {
    "eq": lambda m: m.tril(m.ones(3, 3)) == 0,
    "ne": lambda m: m.tensor([1.0, 2.0, 3.0]) != m.tensor([1.0, 0.0, 3.0]),
    "eq_int_float": lambda m: m.tensor([1, 2]) == m.tensor([1.0, 2.5]),
    "eq_broadcast": lambda m: m.arange(3)[:, None] == m.arange(3),
    "lt_scalar": lambda m: m.tensor([1, 2, 3]) < 2.5,
    "ge_reflected": lambda m: 2 >= m.tensor([1.0, 2.0, 3.0]),
    "eq_0d": lambda m: m.tensor(2.0) == 2,
    "invert_mask": lambda m: ~(m.tril(m.ones(2, 3)) == 0),
    "and_or_xor": lambda m: ((m.arange(4) > 0) & (m.arange(4) < 3)) | (m.arange(4) == 3) ^ (m.arange(4) == 0),
    "isnan": lambda m: m.isnan(m.tensor([1.0, float("nan"), float("inf")])),
    "isinf": lambda m: m.isinf(m.tensor([1.0, float("nan"), -float("inf")])),
}


@pytest.mark.parametrize("name", list(COMPARISONS))
def test_comparisons_are_elementwise_bool_tensors(name, default_dtype):
    same_result(COMPARISONS[name])


def test_the_lecture_mask_masks_and_tensors_stay_hashable():
    T = 4
    tril = tt.tril(tt.ones(T, T))
    wei = tt.zeros((T, T)).masked_fill(tril == 0, float("-inf"))
    wei = F.softmax(wei, dim=-1)
    np.testing.assert_allclose(wei.numpy(), np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None],
                               rtol=1e-6)
    a, b = tt.tensor([1.0]), tt.tensor([1.0])
    assert len({a: 1, b: 2}) == 2 and a in {a} and b not in {a}   # hashed by identity, as torch
    assert (a == None) is False and (a != None) is True           # noqa: E711 - as torch
    assert (a == b).requires_grad is False
    with pytest.raises(RuntimeError, match="ambiguous"):
        bool(tt.tensor([1.0, 2.0]) == 1)                          # `if t == x:` on many elements


# ---------------------------------------------------------------- 2. type promotion
PROMOTION = {
    "int_div_int": lambda m: m.tensor([1, 2, 3]) / 2,
    "int_truediv_int": lambda m: m.tensor([1, 2, 3]) / m.tensor([2, 2, 2]),
    "int_add_float": lambda m: m.tensor([1, 2, 3]) + 0.5,
    "int_pow_half": lambda m: m.tensor([1, 2, 3]) ** 0.5,
    "int_exp": lambda m: m.tensor([1, 2, 3]).exp(),
    "int_log": lambda m: m.log(m.tensor([1, 2, 3])),
    "int_sigmoid": lambda m: m.sigmoid(m.tensor([1, -2])),
    "float_pow_int": lambda m: 0.7 ** m.tensor([1, 2, 3]),
    "int_rpow_int": lambda m: 2 ** m.tensor([1, 2, 3]),
    "int_pow_int": lambda m: m.tensor([1, 2, 3]) ** 2,
    "int_add_int": lambda m: m.tensor([1, 2, 3]) + 7,
    "int_mul_int": lambda m: m.tensor([1, 2, 3]) * m.tensor([4, 5, 6]),
    "int_floordiv": lambda m: m.tensor([7, -7, 5]) // 2,
    "float_floordiv": lambda m: m.tensor([7.5, -7.5, 5.0]) // 2,
    "bool_add_int": lambda m: m.tensor([True, False]) + 2,
    "bool_mul_float": lambda m: m.tensor([True, False]) * 1.5,
    "bool_sum": lambda m: m.tensor([True, False, True]).sum(),
    "int_sum": lambda m: m.tensor([1, 2, 3]).sum(),
    "int32_add_int64": lambda m: m.tensor([1, 2], dtype=m.int32) + m.tensor([1, 2]),
    "int32_add_scalar": lambda m: m.tensor([1, 2], dtype=m.int32) + 3,
    "int64_add_float16": lambda m: m.tensor([1, 2]) + m.tensor([1.0, 2.0], dtype=m.float16),
    "f32_add_f64": lambda m: m.tensor([1.0, 2.0]) + m.tensor([1.0, 2.0], dtype=m.float64),
    "f32_add_f64_0d": lambda m: m.tensor([1.0, 2.0]) + m.tensor(3.0, dtype=m.float64),
    "int_add_f64_0d": lambda m: m.tensor([1, 2]) + m.tensor(3.0, dtype=m.float64),
    "f64_0d_add_f32_0d": lambda m: m.tensor(1.0, dtype=m.float64) + m.tensor(2.0),
    "int_maximum_float": lambda m: m.maximum(m.tensor([1, 5]), m.tensor([2.5, 0.5])),
    "int_clamp_float": lambda m: m.tensor([1, 2]).clamp(0.5, 1.5),
    "int_clamp_int": lambda m: m.tensor([1, 5, -3]).clamp(0, 2),
    "int_clamp_tensor_min": lambda m: m.tensor([1, 5, -3]).clamp(m.tensor([0, 0, 0])),
    "float_clamp_tensor_max": lambda m: m.tensor([1.0, 5.0, -3.0]).clamp(max=m.tensor([0.0, 2.0, 0.0])),
    "int_abs": lambda m: m.tensor([-1, 2]).abs(),
    "int_relu": lambda m: m.relu(m.tensor([-1, 2])),
    "int_where_float": lambda m: m.where(m.tensor([True, False]), m.tensor([1, 2]), 0.5),
    "cat_int_float": lambda m: m.cat([m.tensor([1, 2]), m.tensor([0.5])]),
    "cumsum_int": lambda m: m.cumsum(m.tensor([1, 2, 3]), 0),
    "arange_int": lambda m: m.arange(5),
    "arange_float": lambda m: m.arange(0, 1, 0.25),
    "full_int": lambda m: m.full((2, 2), 7),
    "full_float": lambda m: m.full((2, 2), 0.5),
    "full_bool": lambda m: m.full((2,), True),
    "tensor_ints": lambda m: m.tensor([[1, 2], [3, 4]]),
    "tensor_mixed": lambda m: m.tensor([1, 2.5]),
    "tensor_bools": lambda m: m.tensor([True, False]),
    "long_float": lambda m: m.tensor([1.7, -1.7]).long().float(),
}


@pytest.mark.parametrize("name", list(PROMOTION))
def test_type_promotion_as_torch(name, default_dtype):
    same_result(PROMOTION[name])


def test_integer_errors_as_torch():
    same_error(lambda m: m.tensor([2]) ** -1, "negative integer powers")
    same_error(lambda m: m.tensor([1, 2]).mean(), "floating point")
    same_error(lambda m: m.tensor([True]) - m.tensor([True]), "bool")
    same_error(lambda m: -m.tensor([True]), "bool")
    same_error(lambda m: m.relu(m.tensor([True])), "Boolean inputs not supported for relu")
    same_error(lambda m: m.tensor([5]) // 0, "ZeroDivisionError")
    same_error(lambda m: m.softmax(m.tensor([1, 2]), 0))
    same_error(lambda m: m.tensor([1.0, 2.0]) @ m.tensor([1.0, 2.0], dtype=m.float64), "dtype")


# ---------------------------------------------------------------- 3. 0-d tensors
ZERO_D = {
    "sum0": lambda a: a.sum(0), "sum-1": lambda a: a.sum(-1), "sum_keep": lambda a: a.sum(0, keepdim=True),
    "mean0": lambda a: a.mean(0), "amax": lambda a: a.amax(-1), "softmax": lambda a: a.softmax(-1),
    "log_softmax": lambda a: a.log_softmax(0), "squeeze0": lambda a: a.squeeze(0),
    "squeeze": lambda a: a.squeeze(), "flatten": lambda a: a.flatten(),
    "unsqueeze0": lambda a: a.unsqueeze(0), "unsqueeze-1": lambda a: a.unsqueeze(-1),
    "reshape": lambda a: a.reshape(1, 1), "view-1": lambda a: a.view(-1),
    "transpose": lambda a: a.transpose(0, -1), "expand": lambda a: a.expand(2, 3),
    "mul_vector": lambda a: a * torch.ones(3) if isinstance(a, torch.Tensor) else a * tt.ones(3).to(a.device),
    "pow": lambda a: a ** 2, "exp": lambda a: a.exp(), "sigmoid": lambda a: a.sigmoid(),
    "clamp": lambda a: a.clamp(max=0.1), "stack": lambda a: (torch if isinstance(a, torch.Tensor) else tt).stack([a, a]),
    "repeat": lambda a: a.repeat(2, 3), "logsumexp": lambda a: a.logsumexp(0),
    "cumsum": lambda a: a.cumsum(0), "std": lambda a: (a * torch.ones(3) if isinstance(a, torch.Tensor)
                                                       else a * tt.ones(3).to(a.device)).std(0, keepdim=True)[0],
}


@dtypes
@pytest.mark.parametrize("name", list(ZERO_D))
def test_zero_dim_tensors(name, dtype, device):
    check(f"0-d {name}", ZERO_D[name], ZERO_D[name], np.array(0.7), dtype=dtype, device=device)


def test_zero_dim_cat_and_conversions():
    same_error(lambda m: m.cat([m.tensor(1.0), m.tensor(2.0)]), "zero-dimensional")
    x = tt.tensor(2.5)
    assert float(x) == 2.5 and int(x) == 2 and x.item() == 2.5
    assert [10, 20, 30][tt.tensor(1)] == 20                       # an int tensor as an index
    with pytest.raises(RuntimeError, match="ambiguous"):
        float(tt.ones(2))


# ---------------------------------------------------------------- 4. dims out of range
DIM_ERRORS = {
    "squeeze": lambda m: m.ones(2, 3).squeeze(2),
    "unsqueeze": lambda m: m.ones(2, 3).unsqueeze(3),
    "stack": lambda m: m.stack([m.ones(2), m.ones(2)], dim=2),
    "cat": lambda m: m.cat([m.ones(2, 3), m.ones(2, 3)], dim=-3),
    "flatten": lambda m: m.ones(2, 3).flatten(0, 2),
    "sum": lambda m: m.ones(2, 3).sum(2),
    "sum_tuple": lambda m: m.ones(2, 3).sum((0, -3)),
    "mean": lambda m: m.ones(2, 3).mean(-3),
    "amax": lambda m: m.ones(2, 3).amax(5),
    "max": lambda m: m.ones(2, 3).max(2),
    "softmax": lambda m: m.ones(2, 3).softmax(2),
    "log_softmax": lambda m: m.ones(2, 3).log_softmax(-3),
    "transpose": lambda m: m.ones(2, 3).transpose(0, 2),
    "permute": lambda m: m.ones(2, 3).permute(0, 2),
    "sum_0d": lambda m: m.tensor(1.0).sum(1),
    "split": lambda m: m.ones(2, 3).split(1, dim=2),
    "unflatten": lambda m: m.ones(2, 6).unflatten(2, (2, 3)),
}


@pytest.mark.parametrize("name", list(DIM_ERRORS))
def test_dims_out_of_range_raise_index_error(name):
    same_error(DIM_ERRORS[name], r"out of range.*\[-?\d+, -?\d+\]")


def test_shape_errors_as_torch():
    same_error(lambda m: m.ones(2, 3).permute(0, 0), "duplicate")
    same_error(lambda m: m.ones(2, 3).permute(0, 1, 2))
    same_error(lambda m: m.ones(2, 3).reshape(4, 2), "invalid for input of size 6")
    same_error(lambda m: m.ones(2, 3).expand(2, 4), "must match the existing size")
    same_error(lambda m: m.ones(2, 3).expand(3))
    same_error(lambda m: m.ones(2, 3).repeat(2))
    same_error(lambda m: m.ones(3).tril(), "at least 2 dimensions")
    same_error(lambda m: m.ones(4).split([1, 2]), "sum exactly to 4")
    same_error(lambda m: m.ones(4).chunk(0), "greater than 0")
    same_error(lambda m: m.ones(2, 3).flatten(1, 0), "start_dim")
    same_error(lambda m: m.stack([m.ones(2, 3), m.ones(2, 4)]), "equal size")
    same_error(lambda m: m.cat([m.ones(2, 3), m.ones(3, 3)], dim=1), "must match")
    same_error(lambda m: m.ones(2, 3) @ m.ones(2, 3))
    same_error(lambda m: m.einsum("ij,jk->ik", m.ones(2, 3), m.ones(2, 3)))
    same_error(lambda m: m.ones(2, 3, 4).transpose(1, 2).view(2, 12), "view size is not compatible")


def test_view_after_contiguous_and_views_that_need_no_copy():
    same_result(lambda m: m.arange(24).reshape(2, 3, 4).transpose(1, 2).contiguous().view(2, 12))
    same_result(lambda m: m.arange(24).reshape(2, 3, 4).transpose(0, 1).view(3, 2, 2, 2))
    same_result(lambda m: m.arange(24).reshape(2, 3, 4)[:, 1].view(2, 2, 2))
    same_error(lambda m: m.arange(24).reshape(2, 3, 4)[:, 1].view(8), "view size")


# ---------------------------------------------------------------- 5. advanced indexing
INDEXING = [
    lambda a: a[1, :, [0, 2]],            # an int and a list apart: the int selects first (torch)
    lambda a: a[:, 1, [0, 2, 2]],
    lambda a: a[[0, 1], :, 3],
    lambda a: a[1, [0, 2], [1, 1]],
    lambda a: a[-1, ..., [5, 0]],
    lambda a: a[[1, 0], 2:4, 1],
    lambda a: a[1, None, :, [0, 1]],
    lambda a: a[:, [0, 2]][:, :, 1],
    lambda a: a[a > 0],
    lambda a: a[0][a[0] > 0],
]


@dtypes
@pytest.mark.parametrize("i", range(len(INDEXING)))
def test_advanced_indexing_places_dims_as_torch(i, dtype, device):
    check("index", INDEXING[i], INDEXING[i], randn(2, 5, 6), dtype=dtype, device=device)


# ---------------------------------------------------------------- 6. ** with tensor exponents
@dtypes
def test_pow_tensor_exponents(dtype, device):
    v = np.array([0.0, 0.5, 1.0, 2.0, 3.0, -1.0])
    check("pow", lambda b: 0 ** b, lambda b: 0 ** b, v, dtype=dtype, device=device)
    check("pow", lambda b: 0.0 ** b, lambda b: 0.0 ** b, v, dtype=dtype, device=device)
    check("pow", lambda b: (-2) ** b, lambda b: (-2) ** b, v, dtype=dtype, device=device)
    check("pow", lambda b: 0.7 ** b, lambda b: 0.7 ** b, v, dtype=dtype, device=device)
    check("pow", lambda a, b: a ** b, lambda a, b: a ** b, pos(3, 4), randn(4, seed=1),
          dtype=dtype, device=device)
    check("pow", lambda a, b: a ** b, lambda a, b: a ** b, np.array([0.0, 0.0, 2.0, -2.0]),
          np.array([0.0, 2.0, 0.0, 3.0]), dtype=dtype, device=device)
    check("pow", lambda a, b: a.pow(b), lambda a, b: a.pow(b), pos(2, 1, 3), randn(4, 1, seed=2),
          dtype=dtype, device=device)


# ---------------------------------------------------------------- new ops against torch
def same(family, fn, *inputs):
    return pytest.param(family, fn, fn, inputs, id=f"{family}-{len(OPS)}")


def pair(family, ours, theirs, *inputs):
    return pytest.param(family, ours, theirs, inputs, id=f"{family}-{len(OPS)}")


OPS = []
add = OPS.append
x34 = randn(3, 4, low=0.05)
add(same("sigmoid", lambda a: a.sigmoid(), 6 * randn(3, 4)))
add(pair("sigmoid", F.sigmoid, torch.sigmoid, np.array([-800.0, -30.0, 0.0, 30.0, 800.0])))
add(pair("silu", F.silu, TF.silu, 4 * randn(3, 4)))
add(same("abs", lambda a: a.abs(), x34))
add(same("abs", lambda a: abs(a), x34))
add(same("clamp", lambda a: a.clamp(-0.5, 0.7), randn(4, 5)))
add(same("clamp", lambda a: a.clamp(min=-0.2), randn(4, 5)))
add(same("clamp", lambda a: a.clip(max=0.3), randn(4, 5)))
add(same("clamp", lambda a: a.clamp(-1.0, 1.0), np.array([-1.0, 1.0, 0.5, 2.0])))  # ends included
add(same("clamp", lambda a, lo, hi: a.clamp(lo, hi), randn(3, 4), randn(4, seed=1) - 1,
         randn(3, 1, seed=2) + 1))
add(same("clamp", lambda a, lo, hi: a.clamp(lo, hi), np.array([0.0, 1.0, 2.0, 3.0]),
         np.array([1.5, 0.5, 2.5, 0.0]), np.array([2.0, 0.2, 3.0, 1.0])))   # crossed bounds
add(pair("maximum", tt.maximum, torch.maximum, randn(3, 4), randn(4, seed=1)))
add(pair("maximum", tt.maximum, torch.maximum, np.array([1.0, 2.0, 3.0]), np.array([1.0, 0.0, 3.0])))
add(same("maximum", lambda a, b: a.max(b), randn(3, 4), randn(3, 4, seed=1)))
add(pair("minimum", tt.minimum, torch.minimum, randn(3, 4), randn(3, 1, seed=1)))
add(pair("minimum", tt.minimum, torch.minimum, np.array([1.0, 2.0, 3.0]), np.array([1.0, 0.0, 3.0])))
add(same("rsqrt", lambda a: a.rsqrt(), pos(3, 4)))
add(same("sqrt", lambda a: a.sqrt(), np.array([0.0, 1.0, 4.0])))          # inf gradient at 0
add(same("sin", lambda a: a.sin(), 3 * randn(3, 4)))
add(same("cos", lambda a: a.cos(), 3 * randn(3, 4)))
add(pair("erf", tt.erf, torch.erf, 2 * randn(3, 4)))
add(pair("leaky_relu", F.leaky_relu, TF.leaky_relu, randn(3, 4, low=0.05)))
add(pair("leaky_relu", lambda a: F.leaky_relu(a, 0.2), lambda a: TF.leaky_relu(a, 0.2),
         np.array([-1.0, 0.0, 1.0])))
add(pair("floor_divide", lambda a, b: a // b, lambda a, b: a // b, Const(7 * randn(3, 4)),
         Const(randn(4, seed=1, low=0.5))))
add(same("floor_divide", lambda a: 5.0 // a, Const(randn(3, low=0.5))))
add(same("tril", lambda a: a.tril(), randn(3, 4)))
add(same("tril", lambda a: a.tril(-1), randn(2, 4, 4)))
add(pair("tril", lambda a: tt.tril(a, 2), lambda a: torch.tril(a, 2), randn(3, 5)))
add(same("triu", lambda a: a.triu(), randn(4, 3)))
add(pair("triu", lambda a: tt.triu(a, 1), lambda a: torch.triu(a, 1), randn(2, 3, 3)))
add(same("expand", lambda a: a.expand(2, 3, 4), randn(3, 1)))
add(same("expand", lambda a: a.expand(-1, 5), randn(3, 1)))
add(same("expand", lambda a, b: a.expand_as(b), randn(1, 4), Const(randn(3, 4))))
add(same("repeat", lambda a: a.repeat(2, 3), randn(2, 3)))
add(same("repeat", lambda a: a.repeat(2, 1, 3), randn(2, 3)))
add(same("split", lambda a: a.split(2, dim=1)[1], randn(3, 5)))
add(same("split", lambda a: a.split([1, 3], dim=-1)[1] * a.split([1, 3], dim=-1)[0], randn(3, 4)))
add(same("split", lambda a: a.split(2)[2], randn(5, 2)))
add(same("split", lambda a: a.chunk(3, dim=1)[1], randn(3, 7)))
add(same("split", lambda a: a.chunk(3)[0] + 1, randn(4, 3)))
add(same("split", lambda a: a.unbind(1)[2], randn(3, 4)))
add(same("contiguous", lambda a: a.transpose(0, 1).contiguous().view(-1), randn(3, 4)))
add(same("unflatten", lambda a: a.unflatten(1, (2, 3)), randn(4, 6)))
add(same("unflatten", lambda a: a.unflatten(-1, (-1, 2)), randn(4, 6)))
for eq, sa, sb in [("bhtd,bhsd->bhts", (2, 2, 3, 4), (2, 2, 5, 4)),   # attention scores
                   ("bhts,bhsd->bhtd", (2, 2, 3, 5), (2, 2, 5, 4)),   # weighted values
                   ("ij,jk->ik", (3, 4), (4, 2)), ("ij,jk", (3, 4), (4, 2)),
                   ("bij,bjk->bik", (2, 3, 4), (2, 4, 2)), ("i,j->ij", (3,), (4,)),
                   ("ij,ij->", (3, 4), (3, 4)), ("ij,jk->i", (3, 4), (4, 2)),
                   ("...ij,...jk->...ik", (2, 3, 4), (2, 4, 2)), ("btc,c->bt", (2, 3, 4), (4,))]:
    add(pair("einsum", lambda a, b, e=eq: tt.einsum(e, a, b), lambda a, b, e=eq: torch.einsum(e, a, b),
             randn(*sa), randn(*sb, seed=1)))
add(pair("einsum", lambda a: tt.einsum("ij->ji", a), lambda a: torch.einsum("ij->ji", a), randn(3, 4)))
add(pair("einsum", lambda a: tt.einsum("ijk->j", [a]), lambda a: torch.einsum("ijk->j", [a]), randn(2, 3, 4)))


@dtypes
@pytest.mark.parametrize("family, ours, theirs, inputs", OPS)
def test_new_op_against_torch(family, ours, theirs, inputs, device, dtype):
    check(family, ours, theirs, *inputs, dtype=dtype, device=device,
          grad=family != "floor_divide")


FACTORIES = {
    "zeros_like": lambda m: m.zeros_like(m.ones(2, 3)),
    "ones_like_int": lambda m: m.ones_like(m.arange(4)),
    "zeros_like_dtype": lambda m: m.zeros_like(m.ones(2), dtype=m.float64),
    "full": lambda m: m.full((2, 3), -1.5),
    "full_dtype": lambda m: m.full((2,), 3, dtype=m.float32),
    "eye": lambda m: m.eye(3),
    "eye_rect": lambda m: m.eye(2, 4),
    "arange_stop": lambda m: m.arange(6),
    "arange_start_stop_step": lambda m: m.arange(2, 11, 3),
    "arange_negative": lambda m: m.arange(5, 0, -2),
    "arange_float": lambda m: m.arange(0.0, 1.0, 0.3),
    "zeros": lambda m: m.zeros(2, 3),
    "ones_tuple": lambda m: m.ones((2, 3), dtype=m.float64),
    "one_hot_like_mask": lambda m: m.ones(3, 3).tril() == m.eye(3),
}


@pytest.mark.parametrize("name", list(FACTORIES))
def test_factories_as_torch(name, default_dtype):
    same_result(FACTORIES[name])


def test_random_factories_shapes_and_dtypes():
    tt.manual_seed(0)
    assert tt.randint(0, 10, (3, 4)).dtype == np.int64 and tt.randint(5, (2,)).shape == (2,)
    assert 0 <= int(tt.randint(3, 5, (100,)).amin()) and int(tt.randint(3, 5, (100,)).amax()) <= 4
    assert tt.rand(2, 3).dtype == np.float32
    probs = tt.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5]])
    s = tt.multinomial(probs, num_samples=4, replacement=True)
    assert s.shape == (2, 4) and s.dtype == np.int64
    assert (s[0] == 1).all() and not (s[1] == 1).any()
    assert sorted(tt.multinomial(tt.ones(5), 5).tolist()) == [0, 1, 2, 3, 4]  # no replacement
    same_error(lambda m: m.multinomial(m.ones(2), 3), "without replacement")


def test_softmax_implicit_dim_warns_as_torch():
    x = randn(2, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = F.softmax(tt.tensor(x))
    assert any("Implicit dimension" in str(w.message) for w in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = TF.softmax(torch.from_numpy(x))
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=1e-12)


def test_to_and_dtype_methods():
    x = tt.tensor([1.5, -2.5])
    assert x.to(tt.float64).dtype == np.float64 and x.to("cpu") is x
    assert x.long().dtype == np.int64 and x.int().dtype == np.int32 and x.bool().dtype == np.bool_
    assert x.type_as(tt.tensor([1])).dtype == np.int64
    assert tt.tensor([1, 2]).is_floating_point() is False and x.dim() == 1 and x.numel() == 2
    with pytest.raises(RuntimeError, match="Could not infer dtype of NoneType"):
        tt.tensor(None)
    with pytest.raises(TypeError, match="invalid data type 'str'"):
        tt.tensor("abc")


# what torch.tensor refuses at creation: (data, the start of torch's message)
NOT_NUMBERS = [
    (lambda: np.array(["a"]), "can't convert np.ndarray of type numpy.str_. The only supported"),
    (lambda: np.array([b"a"]), "can't convert np.ndarray of type numpy.bytes_"),
    (lambda: np.array("a"), "can't convert np.ndarray of type numpy.str_"),
    (lambda: np.array([], dtype="U1"), "can't convert np.ndarray of type numpy.str_"),
    (lambda: np.array([1, 2], dtype=object), "can't convert np.ndarray of type numpy.object_"),
    (lambda: np.array(["a", 1], dtype=object), "can't convert np.ndarray of type numpy.object_"),
    (lambda: np.array(["2020-01-01"], dtype="datetime64[D]"),
     "can't convert np.ndarray of type numpy.datetime64"),
    (lambda: np.array([1], dtype="timedelta64[s]"),
     "can't convert np.ndarray of type numpy.timedelta64"),
    (lambda: np.zeros(2, dtype=[("a", "f4")]), "can't convert np.ndarray of type numpy.void"),
    (lambda: np.datetime64("2020-01-01"), "can't convert np.ndarray of type numpy.datetime64"),
    (lambda: "a", "new(): invalid data type 'str'"),
    (lambda: b"ab", "new(): invalid data type 'bytes'"),
    (lambda: np.str_("a"), "new(): invalid data type 'numpy.str_'"),
    (lambda: ["a"], "too many dimensions 'str'"),
    (lambda: [["a", "b"]], "too many dimensions 'str'"),
    (lambda: ("a",), "too many dimensions 'str'"),
    (lambda: ["a", None], "too many dimensions 'str'"),
    (lambda: [np.array(["a"])], "too many dimensions 'str'"),
    (lambda: [1, "a"], "new(): invalid data type 'str'"),
    (lambda: [[1, 2], [3, "a"]], "new(): invalid data type 'str'"),
    (lambda: [[1, 2], ["a"]], "new(): invalid data type 'str'"),
    (lambda: [b"a"], "new(): invalid data type 'bytes'"),
    (lambda: [np.array([1]), np.array(["a"])], "can't convert np.ndarray of type numpy.str_"),
    (lambda: None, "Could not infer dtype of NoneType"),
    (lambda: [1, None], "Could not infer dtype of NoneType"),
    (lambda: [[1, 2], [None]], "Could not infer dtype of NoneType"),
    (lambda: {1: 2}, "Could not infer dtype of dict"),
    (lambda: {1, 2}, "Could not infer dtype of set"),
    (lambda: object(), "Could not infer dtype of object"),
    (lambda: [[1, 2], [3]], "expected sequence of length 2 at dim 1 (got 1)"),
    (lambda: [[[1]], [[1, 2]]], "expected sequence of length 1 at dim 2 (got 2)"),
    (lambda: [np.array([1, 2]), np.array([1])], "expected sequence of length 2 at dim 1"),
    (lambda: [[1.5], 2.5], "not a sequence"),
    (lambda: [1.5, [2.5]], "must be real number, not list"),
    (lambda: [True, [1]], "'list' object cannot be interpreted as an integer"),
]


@pytest.mark.filterwarnings("ignore:Creating a tensor from a list of numpy.ndarrays")  # torch's
@pytest.mark.parametrize("i", range(len(NOT_NUMBERS)))
def test_tensor_refuses_what_torch_refuses_at_creation(i):
    """Strings, objects, dates, None, ragged lists: torch.tensor's exception type and words,
    in one line, at creation (not at the first op)."""
    make, words = NOT_NUMBERS[i]
    with pytest.raises(Exception) as theirs:
        torch.tensor(make())
    assert str(theirs.value).startswith(words), str(theirs.value)
    with pytest.raises(theirs.type) as ours:
        tt.tensor(make())
    assert str(ours.value).startswith(words) and "\n" not in str(ours.value), str(ours.value)


@pytest.mark.parametrize("seed", [0, -1, -2**63, 2**63, 2**64 - 1, True, 7.9])
def test_manual_seed_takes_what_torch_takes(seed):
    """torch.manual_seed maps a negative seed to seed + 2**64: two seeds that torch treats as one
    give one stream here too."""
    torch.manual_seed(seed)
    tt.manual_seed(seed)
    a = tt.nn.Linear(3, 4).weight.numpy().copy()
    tt.manual_seed(torch.initial_seed())  # torch's view of the same seed, in [0, 2**64)
    np.testing.assert_array_equal(tt.nn.Linear(3, 4).weight.numpy(), a)


@pytest.mark.parametrize("seed", [2**64, -2**63 - 1, 10**30])
def test_manual_seed_out_of_range_is_torchs_error(seed):
    with pytest.raises(ValueError, match="Overflow when unpacking long") as ours:
        tt.manual_seed(seed)
    with pytest.raises(ValueError, match="Overflow when unpacking long"):
        torch.manual_seed(seed)
    assert str(seed) in str(ours.value)


def test_shape_errors_name_both_shapes_and_dims_their_range():
    with pytest.raises(RuntimeError, match=r"\(2, 3\) and \(4, 5\) cannot be multiplied"):
        tt.tensor(np.ones((2, 3))) @ tt.tensor(np.ones((4, 5)))
    with pytest.raises(RuntimeError, match=r"input of shape \(2, 3\) and weight of shape \(5, 4\)"):
        tt.nn.Linear(4, 5)(tt.tensor(np.ones((2, 3), dtype=np.float32)))
    for op in (lambda x: F.softmax(x, dim=3), lambda x: F.log_softmax(x, dim=-3),
               lambda x: x.sum(dim=2), lambda x: x.transpose(0, 5)):
        with pytest.raises(IndexError, match=r"Dimension out of range \(expected to be in range "
                                             r"of \[-2, 1\]"):
            op(tt.tensor(np.ones((2, 3))))
