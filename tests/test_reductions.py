"""Reductions and sampling ops against PyTorch: max/min (with and without a dim), amax/amin,
argmax/argmin, topk, logsumexp, var/std, cumsum, gather; 0-d tensors, dims out of range and
every bad argument.

Each comparison runs in float64 (relative error <= 1e-10) and float32 (<= 1e-5) on every device.
Ops that return (values, indices) compare the values (and their gradient) through check() and
the int64 indices exactly.
"""
import math
import warnings

import numpy as np
import pytest
import torch

import tinytensor as tt
from tinytensor import backend
from tinytensor.gradcheck import gradcheck
from torch_helper import check, dtypes, randn

INF, NAN = math.inf, math.nan
ATOL, RTOL = 1e-7, 1e-6

TIES = np.array([[1.0, 3.0, 3.0, 0.5], [2.0, 2.0, 2.0, 2.0], [-1.0, 0.0, -1.0, 0.0]])
SCALAR = np.array(0.7)  # a 0-d input


def case(family, ours, theirs, *inputs):
    return pytest.param(family, ours, theirs, inputs, id=f"{family}-{len(CASES) + len(SELECTIONS)}")


CASES = []       # ops returning one Tensor: output and gradient through check()
SELECTIONS = []  # ops returning (values, indices)

# ---------------------------------------------------------------- max, min (full, or one dim)
for name in ("max", "min"):
    tfn = getattr(torch, name)
    CASES.append(case(name, lambda a, n=name: getattr(a, n)(), lambda a, f=tfn: f(a), randn(3, 4)))
    CASES.append(case(name, lambda a, n=name: getattr(a, n)(), lambda a, f=tfn: f(a), TIES))  # ties share
    CASES.append(case(name, lambda a, n=name: getattr(a, n)(), lambda a, f=tfn: f(a), SCALAR))
    for dim, keep in [(0, False), (1, False), (-1, True), (2, False), (-3, True)]:
        SELECTIONS.append(case(name, lambda a, n=name, d=dim, k=keep: getattr(a, n)(d, keepdim=k),
                               lambda a, f=tfn, d=dim, k=keep: f(a, d, keepdim=k), randn(2, 3, 4)))
    for dim in (0, 1, -1):  # ties: the first occurrence gets the index and the whole gradient
        SELECTIONS.append(case(name, lambda a, n=name, d=dim: getattr(a, n)(dim=d),
                               lambda a, f=tfn, d=dim: f(a, dim=d), TIES))
    for dim, keep in [(0, False), (-1, True)]:
        SELECTIONS.append(case(name, lambda a, n=name, d=dim, k=keep: getattr(a, n)(d, k),
                               lambda a, f=tfn, d=dim, k=keep: f(a, d, k), SCALAR))

# ---------------------------------------------------------------- amax, amin (tuples of dims, ties share)
for name in ("amax", "amin"):
    tfn = getattr(torch, name)
    for dim, keep in [((), False), ((), True), (0, False), ((0, 2), True), ([-1, 0], False), (-2, True)]:
        CASES.append(case(name, lambda a, n=name, d=dim, k=keep: getattr(a, n)(d, keepdim=k),
                          lambda a, f=tfn, d=dim, k=keep: f(a, d, keepdim=k), randn(2, 3, 4)))
    CASES.append(case(name, lambda a, n=name: getattr(a, n)(1), lambda a, f=tfn: f(a, 1), TIES))
    CASES.append(case(name, lambda a, n=name: getattr(a, n)(), lambda a, f=tfn: f(a), TIES))
    for dim in ((), 0, -1, (0,)):
        CASES.append(case(name, lambda a, n=name, d=dim: getattr(a, n)(d),
                          lambda a, f=tfn, d=dim: f(a, d), SCALAR))

# ---------------------------------------------------------------- topk (distinct values)
for k, dim, largest in [(2, -1, True), (2, 0, True), (1, 1, False), (4, 2, False), (0, -1, True),
                        (3, -2, False), (2, 2, True)]:
    SELECTIONS.append(case("topk", lambda a, k=k, d=dim, l=largest: a.topk(k, dim=d, largest=l),
                           lambda a, k=k, d=dim, l=largest: torch.topk(a, k, dim=d, largest=l),
                           randn(2, 3, 4)))
SELECTIONS.append(case("topk", lambda a: a.topk(3), lambda a: a.topk(3), 5 * randn(7)))
SELECTIONS.append(case("topk", lambda a: a.topk(4, 0, False, True), lambda a: a.topk(4, 0, False, True),
                       randn(6, 2)))
for k in (0, 1):  # a 0-d tensor: torch gives the element for k = 0 and 1
    SELECTIONS.append(case("topk", lambda a, k=k: a.topk(k), lambda a, k=k: a.topk(k), SCALAR))
SELECTIONS.append(case("topk", lambda a: a.topk(1, dim=0), lambda a: a.topk(1, dim=0), SCALAR))

# ---------------------------------------------------------------- logsumexp
for dim, keep in [(0, False), (1, False), (-1, True), ((0, 2), False), ([2, 1, 0], True), ((-1,), False)]:
    CASES.append(case("logsumexp", lambda a, d=dim, k=keep: a.logsumexp(d, keepdim=k),
                      lambda a, d=dim, k=keep: torch.logsumexp(a, d, keepdim=k), randn(2, 3, 4)))
CASES.append(case("logsumexp", lambda a: a.logsumexp(1), lambda a: a.logsumexp(1),
                  np.array([[1e4, 0.0, -1e4], [1e4, 1e4, 1e4 - 1], [-1e4, -1e4, -1e4]])))  # stable
CASES.append(case("logsumexp", lambda a: a.logsumexp(-1), lambda a: a.logsumexp(-1),
                  np.array([[-INF, 1.0, 2.0], [-INF, -INF, 0.5]])))  # -inf entries: finite rows
for dim in (0, -1, (), (0,)):
    CASES.append(case("logsumexp", lambda a, d=dim: a.logsumexp(d), lambda a, d=dim: a.logsumexp(d), SCALAR))

# ---------------------------------------------------------------- var, std
VAR_ARGS = [  # (args, kwargs) passed to both var and std
    ((), {}), ((0,), {}), ((1,), {"keepdim": True}), ((-1,), {"correction": 0}),
    (((0, 2),), {}), (([2, 0],), {"correction": 2, "keepdim": True}), ((None,), {"keepdim": True}),
    ((), {"correction": 1.5}), ((1, False), {}), ((0, True, True), {}), ((False,), {}), ((True,), {}),
    ((), {"dim": 2, "unbiased": False}), ((), {"dim": -2, "correction": 0, "keepdim": True}),
]
for name in ("var", "std"):
    for args, kw in VAR_ARGS:
        CASES.append(case(name, lambda a, n=name, p=args, q=kw: getattr(a, n)(*p, **q),
                          lambda a, n=name, p=args, q=kw: getattr(torch, n)(a, *p, **q), randn(2, 3, 4)))
    CASES.append(case(name, lambda a, n=name: getattr(a, n)(0, correction=0),       # 0-d, correction 0
                      lambda a, n=name: getattr(a, n)(0, correction=0), SCALAR))
    CASES.append(case(name, lambda a, n=name: getattr(a, n)(1), lambda a, n=name: getattr(a, n)(1),
                      np.array([[2.0, 2.0, 2.0], [1.0, -1.0, 3.0]])))               # a constant row
    CASES.append(case(name, lambda a, n=name: getattr(a, n)(1, correction=0),
                      lambda a, n=name: getattr(a, n)(1, correction=0), 1e3 + randn(3, 5)))  # offset

# ---------------------------------------------------------------- cumsum
for dim in (0, 1, 2, -1, -3):
    CASES.append(case("cumsum", lambda a, d=dim: a.cumsum(d), lambda a, d=dim: torch.cumsum(a, d),
                      randn(2, 3, 4)))
CASES.append(case("cumsum", lambda a: a.cumsum(dim=0), lambda a: a.cumsum(dim=0), randn(6)))
for dim in (0, -1):
    CASES.append(case("cumsum", lambda a, d=dim: a.cumsum(d), lambda a, d=dim: a.cumsum(d), SCALAR))

# ---------------------------------------------------------------- gather
I34 = np.array([[0, 0, 3], [1, 2, 1], [3, 3, 3]])                 # repeated indices accumulate
for dim, idx in [(1, I34), (-1, I34), (0, np.array([[2, 0, 1, 1], [0, 0, 0, 2]])),
                 (0, np.array([[1], [1], [2], [0], [2]])),         # longer than x along dim
                 (1, np.zeros((2, 0), dtype=np.int64)),             # empty
                 (1, np.array([[3, 3, 3, 3, 3, 0]]))]:
    CASES.append(case("gather", lambda a, i, d=dim: a.gather(d, i), lambda a, i, d=dim: torch.gather(a, d, i),
                      randn(3, 4), idx))
CASES.append(case("gather", lambda a, i: tt.ops.gather(a, 1, tt.Tensor(i)),
                  lambda a, i: torch.gather(a, 1, i), randn(2, 3, 2), np.array([[[2, 0]], [[1, 1]]])))
CASES.append(case("gather", lambda a, i: a.gather(2, i), lambda a, i: a.gather(2, i), randn(2, 3, 2),
                  np.array([[[1, 0, 1]], [[0, 0, 0]]], dtype=np.int32)))       # int32 index
for idx in (np.array(0), np.array([0, 0, 0])):                                # 0-d x
    CASES.append(case("gather", lambda a, i: a.gather(0, i), lambda a, i: a.gather(0, i), SCALAR, idx))
CASES.append(case("gather", lambda a, i: a.gather(-1, i), lambda a, i: a.gather(-1, i), randn(4),
                  np.array(2)))                                              # 0-d index

# ---------------------------------------------------------------- sum and mean on 0-d tensors, dim=()
for name in ("sum", "mean"):
    for args in [(0,), (-1,), ((0,),), ((),), ((0,), True)]:
        CASES.append(case(name, lambda a, n=name, p=args: getattr(a, n)(*p),
                          lambda a, n=name, p=args: getattr(a, n)(*p), SCALAR))
    CASES.append(case(name, lambda a, n=name: getattr(a, n)(()), lambda a, n=name: getattr(a, n)(()),
                      randn(2, 3)))


@dtypes
@pytest.mark.parametrize("family, ours, theirs, inputs", CASES)
def test_op_against_torch(family, ours, theirs, inputs, device, dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # var/std of one element: degrees of freedom 0
        check(family, ours, theirs, *inputs, dtype=dtype, device=device)


@dtypes
@pytest.mark.parametrize("family, ours, theirs, inputs", SELECTIONS)
def test_selection_against_torch(family, ours, theirs, inputs, device, dtype):
    """values (and their gradient) through check, indices exactly."""
    check(family, lambda *a: ours(*a).values, lambda *a: theirs(*a).values, *inputs,
          dtype=dtype, device=device)
    x = inputs[0].astype(dtype)
    got, ref = ours(tt.Tensor(x).to(device)), theirs(torch.from_numpy(x))
    assert type(got).__name__ == family and got._fields == ("values", "indices")
    assert got.indices.dtype == np.int64 and not got.indices.requires_grad
    assert got.indices.device.type == device
    np.testing.assert_array_equal(got.indices.numpy(), ref.indices.numpy())
    assert got.indices.shape == tuple(ref.indices.shape)
    values, indices = got  # unpacks like torch's
    assert values is got.values and indices is got.indices


# ---------------------------------------------------------------- argmax, argmin (int64, first occurrence)
ARG_CASES = [((), {}), ((0,), {}), ((1,), {}), ((-1,), {"keepdim": True}), ((), {"keepdim": True}),
             ((None, True), {}), ((), {"dim": 2})]


@pytest.mark.parametrize("name", ["argmax", "argmin"])
@pytest.mark.parametrize("x", [randn(2, 3, 4), TIES, SCALAR, np.array([1.0, NAN, 3.0, NAN]),
                               np.array([[4, 1, 4], [0, 0, -2]])], ids=["randn", "ties", "0d", "nan", "int"])
@dtypes
def test_argmax_argmin_against_torch(name, x, device, dtype):
    if x.dtype.kind == "f":
        x = x.astype(dtype)
    for args, kw in ARG_CASES:
        if x.ndim < 3 and kw.get("dim") == 2 or x.ndim < 2 and args[:1] == (1,):
            continue
        ours = getattr(tt.Tensor(x).to(device), name)(*args, **kw)
        ref = getattr(torch.from_numpy(x), name)(*args, **kw)
        assert ours.dtype == np.int64 and ours.shape == tuple(ref.shape), (args, kw)
        np.testing.assert_array_equal(ours.numpy(), ref.numpy())
        if x.dtype.kind == "f":  # check() takes float inputs as tensors (and records the family)
            check("argmax", lambda a: getattr(a, name)(*args, **kw), lambda a: getattr(a, name)(*args, **kw),
                  x, dtype=dtype, device=device, grad=False)


# ---------------------------------------------------------------- integer inputs
def test_integer_inputs_follow_torch_dtypes(device):
    x = np.array([[3, 7, 7], [-1, 0, -5]], dtype=np.int32)
    ours, ref = tt.Tensor(x).to(device), torch.from_numpy(x)
    for got, want in [(ours.max(1), ref.max(1)), (ours.min(0, True), ref.min(0, True)),
                      (ours.topk(2), ref.topk(2))]:
        assert got.values.dtype == np.int32 and got.indices.dtype == np.int64
        np.testing.assert_array_equal(got.values.numpy(), want.values.numpy())
        np.testing.assert_array_equal(got.indices.numpy(), want.indices.numpy())
    for got, want in [(ours.max(), ref.max()), (ours.amin(1), ref.amin(1)),
                      (ours.gather(1, np.array([[2], [0]])), ref.gather(1, torch.tensor([[2], [0]])))]:
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    for a, b in [(ours, ref), (tt.Tensor(x > 0).to(device), ref > 0),
                 (tt.Tensor(x.astype(np.uint8)).to(device), ref.byte())]:
        got = a.cumsum(1)                                                 # int and bool sum in int64
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got.numpy(), b.cumsum(1).numpy())
    lse = ours.logsumexp(1)                                               # default float dtype
    assert lse.dtype == np.float32
    np.testing.assert_allclose(lse.numpy(), ref.logsumexp(1).numpy(), rtol=1e-6)
    got = tt.Tensor(randn(3, 2)).cumsum(0, dtype=np.float32)             # cumsum's dtype= casts first
    assert got.dtype == np.float32
    got = tt.Tensor(np.array([1.5, 2.7])).cumsum(0, dtype=np.int64)
    assert got.dtype == np.int64 and got.tolist() == [1, 3]


# ---------------------------------------------------------------- topk: ties, NaN, sorted=False
@dtypes
def test_topk_ties_nan_and_unsorted(device, dtype):
    v = np.array([1.0, 3.0, 3.0, 2.0, 3.0, 1.0], dtype=dtype)
    x, ref = tt.Tensor(v, requires_grad=True).to(device), torch.from_numpy(v)
    for k, largest in [(2, True), (4, True), (3, False), (6, False)]:
        got, want = x.topk(k, largest=largest), ref.topk(k, largest=largest)
        np.testing.assert_array_equal(got.values.numpy(), want.values.numpy())
        # ties come in index order here; torch's order among ties is unspecified (e.g. [2, 4] for k=2)
        vals, idx = got.values.numpy(), got.indices.numpy()
        for a in np.unique(vals):
            assert list(idx[vals == a]) == sorted(idx[vals == a])
        np.testing.assert_array_equal(v[idx], vals)
    assert x.topk(2).indices.tolist() == [1, 2] and x.topk(3, largest=False).indices.tolist() == [0, 5, 3]
    x.topk(4).values.sum().backward()                                 # each selected position once
    np.testing.assert_array_equal(backend.to_numpy(x.grad), [0, 1, 1, 1, 1, 0])
    n = np.array([1.0, NAN, 3.0, -INF, INF], dtype=dtype)              # NaN above everything, as torch
    for k, largest in [(2, True), (3, False), (5, True), (5, False)]:
        got = tt.Tensor(n).to(device).topk(k, largest=largest)
        want = torch.from_numpy(n).topk(k, largest=largest)
        np.testing.assert_array_equal(got.values.numpy(), want.values.numpy())
        np.testing.assert_array_equal(got.indices.numpy(), want.indices.numpy())
    w = randn(3, 9).astype(dtype)                                      # sorted=False: torch's order is
    got = tt.Tensor(w).to(device).topk(4, dim=1, sorted=False)          # unspecified; ours is sorted
    want = torch.from_numpy(w).topk(4, dim=1, sorted=False)
    np.testing.assert_array_equal(np.sort(got.values.numpy(), 1), np.sort(want.values.numpy(), 1))
    np.testing.assert_array_equal(got.values.numpy(), torch.from_numpy(w).topk(4, dim=1).values.numpy())


# ---------------------------------------------------------------- infinities and degenerate sizes
def _both(fn, x, dtype, device):
    """fn on tinytensor and torch: (output, gradient of sum(out * W)) for each, as float64 arrays."""
    x = x.astype(dtype)
    a, b = tt.Tensor(x, requires_grad=True).to(device), torch.tensor(x, requires_grad=True)
    ya, yb = fn(a), fn(b)
    w = np.random.default_rng(0).standard_normal(ya.shape).astype(dtype)
    with np.errstate(invalid="ignore"):
        (ya * tt.Tensor(w).to(device)).sum().backward()
    (yb * torch.from_numpy(w)).sum().backward()
    assert ya.dtype == dtype and ya.shape == tuple(yb.shape)
    return (ya.numpy(), backend.to_numpy(a.grad)), (yb.detach().numpy(), b.grad.numpy())


@dtypes
def test_logsumexp_infinities_match_torch(device, dtype):
    """all -inf gives -inf, any +inf gives +inf; the gradient exp(x - y) is nan where torch's is."""
    x = np.array([[-INF, -INF], [INF, 1.0], [INF, INF], [-INF, 1.0], [1e30, 1e30], [NAN, 1.0]])
    (y, g), (y_ref, g_ref) = _both(lambda a: a.logsumexp(1), x, dtype, device)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6)      # nan and inf at the same places
    np.testing.assert_allclose(g, g_ref, rtol=1e-6)
    empty = tt.Tensor(np.zeros((0, 3), dtype=dtype)).to(device)
    np.testing.assert_array_equal(empty.logsumexp(0).numpy(), [-INF] * 3)   # a sum over nothing
    assert empty.logsumexp(1).shape == (0,)


@pytest.mark.parametrize("name", ["var", "std"])
@dtypes
def test_var_std_with_too_few_degrees_of_freedom(name, device, dtype):
    """N <= correction: torch divides by max(0, N - correction) (inf, or nan for 0/0), warns, and
    its gradient uses N - correction unclamped; the std gradient is 0 where std is 0."""
    x = np.array([[1.0, 2.0, 3.0], [3.0, 5.0, 3.0], [0.0, 1.0, 3.0]])
    for corr in (3, 4, 7.5):
        with pytest.warns(UserWarning, match="degrees of freedom is <= 0"):
            (y, g), (y_ref, g_ref) = _both(lambda a: getattr(a, name)(0, correction=corr), x, dtype, device)
        np.testing.assert_allclose(y, y_ref, rtol=1e-6)
        np.testing.assert_allclose(g, g_ref, rtol=1e-6)
    with pytest.warns(UserWarning, match="degrees of freedom"):
        one = getattr(tt.Tensor(np.array(2.0, dtype=dtype)).to(device), name)()  # one element, unbiased
    assert np.isnan(one.item())
    with pytest.warns(UserWarning, match="degrees of freedom"):
        e = getattr(tt.Tensor(np.zeros((0, 3), dtype=dtype)).to(device), name)(0)
    assert np.isnan(e.numpy()).all() and e.shape == (3,)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                    # no warning when N > correction
        getattr(tt.Tensor(x).to(device), name)(0, correction=2.5)


@pytest.mark.parametrize("name", ["var", "std"])
@dtypes
def test_var_std_over_dim_empty_tuple(name, device, dtype):
    """dim=() reduces every dim, as torch's forward does; torch's backward then divides by
    N - correction with N = 1 (inf gradients), so the gradient here is checked against dim=None."""
    check(name, lambda a: getattr(a, name)(()), lambda a: getattr(a, name)(()), randn(2, 3),
          dtype=dtype, device=device, grad=False)
    check(name, lambda a: getattr(a, name)(()), lambda a: getattr(a, name)(None), randn(2, 3),
          dtype=dtype, device=device)


def test_empty_inputs():
    e = tt.Tensor(np.zeros((0, 3)))
    for got, want in [(e.max(1), torch.zeros(0, 3).max(1)),
                      (e.topk(0, dim=0), torch.zeros(0, 3).topk(0, dim=0))]:
        assert got.values.shape == tuple(want.values.shape) and got.indices.shape == tuple(want.indices.shape)
    assert e.amax(1).shape == (0,) and e.argmin(1).shape == (0,) and e.cumsum(0).shape == (0, 3)
    assert e.gather(0, np.zeros((0, 3), dtype=np.int64)).shape == (0, 3)
    assert tt.Tensor(randn(3, 4)).gather(1, np.zeros((5, 0, 2), dtype=np.int64)).shape == (5, 0, 2)


# ---------------------------------------------------------------- float64 gradient checks
GRADCHECKS = {
    "max_dim": (lambda a: a.max(1).values, randn(3, 4)),
    "max_keepdim": (lambda a: a.max(-1, keepdim=True).values * a.max(), randn(2, 3, 4)),
    "max_0d": (lambda a: a.max(0).values * 2.0, SCALAR),
    "min_dim": (lambda a: a.min(0).values, randn(3, 4)),
    "min_all": (lambda a: a.min(), randn(3, 4)),
    "amin": (lambda a: a.amin((0, 2), keepdim=True), randn(2, 3, 4)),
    "topk": (lambda a: a.topk(3, dim=1).values, randn(2, 5, 3)),
    "topk_smallest": (lambda a: a.topk(2, dim=0, largest=False).values, randn(4, 3)),
    "topk_0d": (lambda a: a.topk(1).values * 3.0, SCALAR),
    "logsumexp": (lambda a: a.logsumexp(1), randn(3, 4)),
    "logsumexp_dims": (lambda a: a.logsumexp((0, 2), keepdim=True), randn(2, 3, 4)),
    "logsumexp_large": (lambda a: a.logsumexp(-1), 50 * randn(3, 4)),
    "logsumexp_0d": (lambda a: a.logsumexp(0), SCALAR),
    "var": (lambda a: a.var(), randn(3, 4)),
    "var_dim": (lambda a: a.var(1, keepdim=True), randn(3, 4)),
    "var_correction": (lambda a: a.var((0, 2), correction=0), randn(2, 3, 4)),
    "var_unbiased": (lambda a: a.var(0, False), randn(3, 4)),
    "std": (lambda a: a.std(0), randn(3, 4)),
    "std_correction": (lambda a: a.std(-1, correction=2.5), randn(3, 6)),
    "std_all": (lambda a: a.std(None, keepdim=True), randn(2, 5)),
    "cumsum": (lambda a: a.cumsum(0), randn(4, 3)),
    "cumsum_last": (lambda a: a.cumsum(-1), randn(2, 3, 5)),
    "cumsum_0d": (lambda a: a.cumsum(0), SCALAR),
    "gather": (lambda a, i: a.gather(1, i), randn(3, 4), I34),
    "gather_dim0": (lambda a, i: a.gather(0, i), randn(3, 2), np.array([[2, 1], [2, 2], [0, 1], [2, 1]])),
    "gather_0d": (lambda a, i: a.gather(0, i), SCALAR, np.array([0, 0])),
    "sum_0d": (lambda a: a.sum(0) * a.mean(-1), SCALAR),
}


@pytest.mark.parametrize("name", list(GRADCHECKS))
def test_gradcheck(name, device):
    fn, *inputs = GRADCHECKS[name]
    gradcheck(fn, *inputs, atol=ATOL, rtol=RTOL, device=device)


# ---------------------------------------------------------------- bad input: torch's error types
DIM_OPS = {  # name: call with a dim
    "sum": lambda a, d: a.sum(d), "mean": lambda a, d: a.mean(d), "max": lambda a, d: a.max(d),
    "min": lambda a, d: a.min(d), "amax": lambda a, d: a.amax(d), "amin": lambda a, d: a.amin((0, d)),
    "argmax": lambda a, d: a.argmax(d), "argmin": lambda a, d: a.argmin(d, keepdim=True),
    "topk": lambda a, d: a.topk(1, dim=d), "logsumexp": lambda a, d: a.logsumexp(d),
    "var": lambda a, d: a.var(d), "std": lambda a, d: a.std(dim=(d,), correction=0),
    "cumsum": lambda a, d: a.cumsum(d), "gather": lambda a, d: a.gather(d, np.zeros((1, 1), dtype=np.int64)),
}


@pytest.mark.parametrize("name", list(DIM_OPS))
def test_dim_out_of_range(name):
    fn = DIM_OPS[name]
    x = tt.Tensor(randn(2, 3))
    for d in (2, -3):
        with pytest.raises(IndexError, match=rf"Dimension out of range \(expected to be in range of "
                                             rf"\[-2, 1\], but got {d}\)"):
            fn(x, d)
        with pytest.raises(IndexError, match=r"Dimension out of range"):  # torch raises the same
            fn(torch.from_numpy(randn(2, 3)), d) if name != "gather" else \
                torch.gather(torch.zeros(2, 3), d, torch.zeros(1, 1, dtype=torch.long))
    s = tt.Tensor(SCALAR)
    if name not in ("amin", "gather"):
        for d in (1, -2):
            with pytest.raises(IndexError, match=rf"range of \[-1, 0\], but got {d}\)"):
                fn(s, d)
    with pytest.raises(TypeError, match="dim must be an int"):
        fn(x, 1.0)


def test_bad_arguments():
    x = tt.Tensor(randn(3, 4), requires_grad=True)
    ints = tt.Tensor(np.array([[1, 2], [3, 4]]))
    # max/min
    np.testing.assert_array_equal(x.max(x * 0).numpy(), tt.maximum(x, x * 0).numpy())  # torch.maximum
    np.testing.assert_array_equal(tt.ops.min(x, np.zeros((3, 4))).numpy(), x.clamp(max=0).numpy())
    with pytest.raises(TypeError, match=r"one int.*amax\(x, dim=\(0, 1\)\)"):
        x.max(dim=(0, 1))
    with pytest.raises(TypeError, match="keepdim=True needs a dim"):
        x.min(keepdim=True)
    with pytest.raises(TypeError, match="dim must be an int, got bool"):
        x.max(True)
    # reductions over nothing
    e = tt.Tensor(np.zeros((0, 3)))
    unspecified = "Expected reduction dim to be specified"
    for fn, err, msg in [(lambda: e.max(), RuntimeError, r"max\(\): " + unspecified),
                         (lambda: e.amin(), RuntimeError, r"amin\(\): " + unspecified),
                         (lambda: e.argmax(), IndexError, r"argmax\(\): " + unspecified),
                         (lambda: e.min(0), IndexError, r"min\(\): Expected reduction dim 0"),
                         (lambda: e.amax((1, 0)), IndexError, r"amax\(\): Expected reduction dim 0"),
                         (lambda: e.argmin(0), IndexError, r"argmin\(\): Expected reduction dim 0"),
                         (lambda: e.topk(1, dim=0), RuntimeError, "selected index k out of range")]:
        with pytest.raises(err, match=msg):
            fn()
    # repeated dims
    for fn in (lambda: x.sum((0, 0)), lambda: x.amax((1, -1)), lambda: x.var((0, -2)),
               lambda: x.logsumexp([1, 1]), lambda: tt.Tensor(SCALAR).sum((0, -1))):
        with pytest.raises(RuntimeError, match="appears multiple times in the list of dims"):
            fn()
    # argmax/topk of bool, topk's k
    b = tt.Tensor(np.array([True, False]))
    with pytest.raises(RuntimeError, match=r"argmax\(\): does not support bool"):
        b.argmax()
    with pytest.raises(RuntimeError, match=r"argmin\(\): does not support bool"):
        b.argmin(0)
    with pytest.raises(RuntimeError, match="topk.*bool"):
        b.topk(1)
    for k in (5, -1):
        with pytest.raises(RuntimeError, match="selected index k out of range"):
            x.topk(k)
    with pytest.raises(RuntimeError, match="selected index k out of range"):
        x.topk(4, dim=0)
    with pytest.raises(RuntimeError, match="selected index k out of range"):
        tt.Tensor(SCALAR).topk(2)
    with pytest.raises(TypeError, match="k must be an int"):
        x.topk(1.5)
    # logsumexp
    with pytest.raises(TypeError, match="dim is required"):
        x.logsumexp(None)
    with pytest.raises(TypeError):
        tt.ops.logsumexp(x)
    with pytest.raises(RuntimeError, match=r"dim=\(\) is refused"):
        x.logsumexp(())
    # var/std
    for name in ("var", "std"):
        fn = getattr(ints, name)
        with pytest.raises(RuntimeError, match="std and var only support floating point and complex dtypes"):
            fn()
        with pytest.raises(TypeError, match="unbiased or correction, not both"):
            getattr(x, name)(0, unbiased=True, correction=1)
        with pytest.raises(TypeError, match="unbiased must be a bool"):
            getattr(x, name)(0, 1)
        with pytest.raises(TypeError, match="correction must be a number"):
            getattr(x, name)(0, correction="1")
        with pytest.raises(TypeError, match="dim must be an int"):
            getattr(x, name)(1.0)
    # mean of integers
    with pytest.raises(RuntimeError, match=r"mean\(\): could not infer output dtype.*Got: Long"):
        ints.mean()
    with pytest.raises(RuntimeError, match="Got: Bool"):
        b.mean(0)
    # cumsum
    with pytest.raises(TypeError):
        tt.ops.cumsum(x)                                       # dim is required
    with pytest.raises(TypeError, match="dim must be an int, got bool"):
        x.cumsum(True)
    # gather
    for idx, msg in [
        (np.array([[4]]), "index 4 is out of bounds for dimension 1 with size 4"),
        (np.array([[0, -1]]), "index -1 is out of bounds for dimension 1 with size 4"),
        (np.array([0, 1]), "Index tensor must have the same number of dimensions as input tensor"),
        (np.zeros((4, 1), dtype=np.int64), r"Size does not match at dimension 0 expected index \[4, 1\] "
                                           r"to be no larger than self \[3, 4\] apart from dimension 1"),
        (np.zeros((3, 2)), r"Expected dtype int32/int64 for index"),
        (np.zeros((3, 2), dtype=bool), r"Expected dtype int32/int64 for index"),
        (np.zeros((3, 2), dtype=np.int16), r"Expected dtype int32/int64 for index"),
    ]:
        with pytest.raises(RuntimeError, match=msg):
            x.gather(1, idx)
        with pytest.raises(RuntimeError):                      # torch refuses these too
            torch.gather(torch.zeros(3, 4), 1, torch.from_numpy(idx))
    with pytest.raises(RuntimeError, match="index 1 is out of bounds for dimension 0 with size 1"):
        tt.Tensor(SCALAR).gather(0, np.array(1))
    with pytest.raises(TypeError, match="index must be an integer Tensor"):
        x.gather(1, [[0]])


def test_functions_and_methods_agree():
    x = tt.Tensor(randn(3, 4))
    ops = tt.ops
    assert ops.max(x, 1).indices.tolist() == x.max(1).indices.tolist() == x.argmax(1).tolist()
    assert ops.min(x, 0).indices.tolist() == x.argmin(0).tolist()
    assert x.max(np.int64(1)).indices.tolist() == x.argmax(np.int64(-1)).tolist()   # NumPy ints as dims
    assert ops.topk(x, 1).indices[:, 0].tolist() == x.argmax(-1).tolist()
    np.testing.assert_array_equal(ops.amax(x, 1).numpy(), x.max(1).values.numpy())
    np.testing.assert_array_equal(ops.amin(x, (0, 1)).numpy(), x.min().numpy())
    np.testing.assert_allclose(ops.std(x, 0).numpy() ** 2, ops.var(x, 0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(x.cumsum(1).numpy()[:, -1], x.sum(1).numpy(), rtol=1e-12)
