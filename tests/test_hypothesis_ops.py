"""Property tests against PyTorch over generated shapes (hypothesis, 100+ examples each).

Shapes, dims and indices come from hypothesis; array values from a NumPy generator seeded by
a drawn integer. Every example compares outputs and gradients through torch_helper.check.

float64 examples use signed data. float32 examples use positive data and positive gradient
weights W: a float32 sum whose terms cancel to nearly zero (a gradient reduced over broadcast
dimensions, a sum over dims) has an unbounded relative error in both libraries (hypothesis
finds such cases, e.g. 1.07e-5 for d(a / b)/da with a 0-d `a` broadcast over 16 elements),
and the 1e-5 bound is about the ops, not about the conditioning of a random example.
"""
import os

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, mutually_broadcastable_shapes

import tinytensor.nn.functional as F
from torch_helper import check

# 100 examples per test (TT_HYPOTHESIS_EXAMPLES=5000 for a deeper search). The device fixture is
# session-scoped; the state-restoring one needs no per-example reset.
SETTINGS = settings(max_examples=max(100, int(os.environ.get("TT_HYPOTHESIS_EXAMPLES", 100))), deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
seeds = st.integers(0, 2**32 - 1)
dtypes = st.sampled_from([np.float64, np.float32])

def values(rng, shape, dtype):
    """Standard normal in float64; uniform in [0.5, 1.5) in float32 (see above). Always an
    ndarray, also for shape ()."""
    if dtype == np.float32:
        return np.asarray(rng.uniform(0.5, 1.5, shape))
    return np.asarray(rng.standard_normal(shape))


BINARY = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
          "div": lambda a, b: a / b}


@SETTINGS
@given(shapes=mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=4, max_side=4),
       op=st.sampled_from(sorted(BINARY)), seed=seeds, dtype=dtypes, swap=st.booleans())
def test_binary_ops_broadcast(shapes, op, seed, dtype, swap, device):
    rng = np.random.default_rng(seed)
    a, b = (values(rng, s, dtype) for s in shapes.input_shapes)
    if op == "div":
        b = np.asarray(np.sign(b) * (0.5 + np.abs(b)))      # keep away from division by ~0
    kw = dict(dtype=dtype, device=device, positive_w=dtype == np.float32)
    if swap:  # a Python scalar on either side
        check(op, lambda x: BINARY[op](x, 1.7), lambda x: BINARY[op](x, 1.7), b, **kw)
        check(op, lambda x: BINARY[op](-0.6, x), lambda x: BINARY[op](-0.6, x), b, **kw)
    check(op, BINARY[op], BINARY[op], a, b, **kw)


@SETTINGS
@given(shapes=mutually_broadcastable_shapes(signature="(m?,n),(n,p?)->(m?,p?)", max_dims=3, max_side=4),
       seed=seeds, dtype=dtypes)
def test_matmul_signature_shapes(shapes, seed, dtype, device):
    rng = np.random.default_rng(seed)
    a, b = (values(rng, s, dtype) for s in shapes.input_shapes)
    check("matmul", lambda x, y: x @ y, lambda x, y: x @ y, a, b, dtype=dtype, device=device,
          positive_w=dtype == np.float32)


@st.composite
def reductions(draw):
    shape = draw(array_shapes(min_dims=1, max_dims=4, max_side=4))
    nd = len(shape)
    dims = draw(st.none() | st.lists(st.integers(0, nd - 1), min_size=1, max_size=nd, unique=True))
    if dims is not None:
        negate = draw(st.lists(st.booleans(), min_size=len(dims), max_size=len(dims)))
        dims = [d - nd if neg else d for d, neg in zip(dims, negate)]      # negative dims too
        if len(dims) == 1 and draw(st.booleans()):
            dims = dims[0]                                                  # a plain int
    return shape, (tuple(dims) if isinstance(dims, list) else dims), draw(st.booleans())


@SETTINGS
@given(case=reductions(), op=st.sampled_from(["sum", "mean", "amax"]), seed=seeds, dtype=dtypes)
def test_reductions_over_random_dims(case, op, seed, dtype, device):
    shape, dim, keepdim = case
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    x = (rng.permutation(n) + rng.random(n) * 0.5).reshape(shape) / n       # distinct: no ties in amax
    if dtype == np.float64:
        x -= 0.5                                                            # signed (see above)
    ours = lambda a: getattr(a, op)(dim=dim, keepdim=keepdim)  # noqa: E731
    if op == "amax":
        theirs = lambda a: torch.amax(a, dim=() if dim is None else dim, keepdim=keepdim)  # noqa: E731
    else:
        theirs = lambda a: getattr(a, op)(dim=dim, keepdim=keepdim)  # noqa: E731
    check(op, ours, theirs, x, dtype=dtype, device=device, positive_w=dtype == np.float32)


@st.composite
def index_cases(draw):
    shape = draw(array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=5))
    axis = draw(st.integers(0, len(shape) - 1))
    n = shape[axis]
    idx_shape = draw(array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=6))
    values = draw(st.lists(st.integers(-n, n - 1), min_size=int(np.prod(idx_shape)),
                           max_size=int(np.prod(idx_shape))))
    two = len(shape) >= 2 and axis == 0 and draw(st.booleans())             # x[i, j] with two arrays
    second = None
    if two:
        m = shape[1]
        second = np.array(draw(st.lists(st.integers(-m, m - 1), min_size=1, max_size=1)) * idx_shape[-1])
    return shape, axis, np.array(values, dtype=np.int64).reshape(idx_shape), second


@SETTINGS
@given(case=index_cases(), seed=seeds, dtype=dtypes)
def test_indexing_with_integer_arrays(case, seed, dtype, device):
    shape, axis, idx, second = case
    x = values(np.random.default_rng(seed), shape, dtype)
    kw = dict(dtype=dtype, device=device, positive_w=dtype == np.float32)
    if second is not None:
        fn = lambda a, i, j: a[i, j]  # noqa: E731 - broadcast index arrays (repeats accumulate)
        check("index", fn, fn, x, idx, second, **kw)
        return
    lead = (slice(None),) * axis
    fn = lambda a, i: a[lead + (i,)]  # noqa: E731
    check("index", fn, fn, x, idx, **kw)


@SETTINGS
@given(shape=array_shapes(min_dims=1, max_dims=3, max_side=5), seed=seeds, dtype=dtypes,
       data=st.data())
def test_softmax_family_over_random_dims(shape, seed, dtype, data, device):
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    # saturated float32 softmax gradients are ill-conditioned: y*(g - sum(g*y)) with y ~ 1 leaves
    # the float32 rounding of y (relative 6e-8) as a relative error of 6e-8 / (1 - y) in both
    # libraries; so float32 draws use unit logits, float64 draws saturated ones
    scale = 3.0 if dtype == np.float64 else 1.0
    x = scale * np.random.default_rng(seed).standard_normal(shape)
    check("softmax", lambda a: F.softmax(a, dim), lambda a: torch.softmax(a, dim), x,
          dtype=dtype, device=device)
    check("log_softmax", lambda a: F.log_softmax(a, dim), lambda a: torch.log_softmax(a, dim), x,
          dtype=dtype, device=device)
