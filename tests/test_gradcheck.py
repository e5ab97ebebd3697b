"""Float64 central-difference gradient checks (tinytensor.gradcheck) for every primitive Function.

test_every_primitive_is_gradchecked walks the graph of every case below and fails when a
Function subclass of tinytensor.ops, tinytensor.nn.functional or tinytensor.fused (the fused
ops) is not exercised by any case: a new primitive needs a line here (and one in test_ops.py
against PyTorch).
"""
import importlib
import inspect
import math

import numpy as np
import pytest

import tinytensor as tt
import tinytensor.nn.functional as F
from tinytensor import Function, ops
from tinytensor.gradcheck import gradcheck, numerical_grad
from torch_helper import randn

ATOL, RTOL = 1e-7, 1e-6  # central differences with eps=1e-6 are good to ~1e-9 here


try:
    fused = importlib.import_module("tinytensor.fused")
except ImportError:  # no fused ops in this version
    fused = None


def pos(*shape):
    return 0.5 + 2.0 * np.random.default_rng(3).random(shape)


def causal(t):
    return np.triu(np.ones((t, t), dtype=bool), k=1)


def _chunked_attention(qkv, n_head, chunk=2):
    """The chunked path (taken for T >= 2 chunks) with chunks of 2, so T = 5 takes it."""
    old, fused.ATTENTION_CHUNK = fused.ATTENTION_CHUNK, chunk
    try:
        return fused.causal_attention(qkv, n_head)
    finally:
        fused.ATTENTION_CHUNK = old


def _seeded(fn, *args):
    """fn(*args) with the dropout mask drawn from seed 0 on every call (the same mask each time)."""
    tt.manual_seed(0)
    return fn(*args)


CASES = {
    "add": (lambda a, b: a + b, randn(3, 4), randn(4, seed=1)),
    "add_scalar": (lambda a: 2.0 + a, randn(3)),
    "sub": (lambda a, b: a - b, randn(3, 1), randn(1, 4, seed=1)),
    "rsub": (lambda a: 1.5 - a, randn(3)),
    "mul": (lambda a, b: a * b, randn(2, 3), randn(2, 3, seed=1)),
    "mul_self": (lambda a: a * a, randn(4)),
    "div": (lambda a, b: a / b, randn(2, 3), randn(3, seed=1, low=0.5)),
    "rdiv": (lambda a: 2.0 / a, randn(4, low=0.5)),
    "neg": (lambda a: -a, randn(3)),
    "pow2": (lambda a: a ** 2, randn(3, 2)),
    "pow3": (lambda a: a ** 3, randn(3, 2)),
    "pow_half": (lambda a: a ** 0.5, pos(5)),
    "pow_neg": (lambda a: a ** -1.5, pos(5)),
    "pow0": (lambda a: a ** 0, randn(3)),
    "rpow": (lambda a: 3.0 ** a, randn(3)),
    "exp": (lambda a: a.exp(), randn(3, 2)),
    "log": (lambda a: a.log(), pos(3, 2)),
    "tanh": (lambda a: a.tanh(), randn(3, 2)),
    "relu": (lambda a: a.relu(), randn(3, 4, low=0.1)),
    "gelu": (lambda a: F.gelu(a), 2 * randn(3, 4)),
    "gelu_tanh": (lambda a: F.gelu(a, approximate="tanh"), 2 * randn(3, 4)),
    "cast": (lambda a: a.astype(np.float64) * 2, randn(3)),
    "matmul_1d_1d": (lambda a, b: a @ b, randn(4), randn(4, seed=1)),
    "matmul_1d_2d": (lambda a, b: a @ b, randn(4), randn(4, 3, seed=1)),
    "matmul_2d_1d": (lambda a, b: a @ b, randn(3, 4), randn(4, seed=1)),
    "matmul_2d": (lambda a, b: a @ b, randn(3, 4), randn(4, 2, seed=1)),
    "matmul_batched": (lambda a, b: a @ b, randn(2, 3, 4), randn(2, 4, 2, seed=1)),
    "matmul_broadcast": (lambda a, b: a @ b, randn(2, 1, 2, 3), randn(3, 3, 2, seed=1)),
    "linear": (F.linear, randn(2, 3, 4), randn(5, 4, seed=1), randn(5, seed=2)),
    "linear_nobias": (F.linear, randn(3, 4), randn(2, 4, seed=1)),
    "linear_1d": (F.linear, randn(4), randn(2, 4, seed=1), randn(2, seed=2)),
    "sum_all": (lambda a: a.sum(), randn(2, 3)),
    "sum_dim": (lambda a: a.sum(dim=(0, 2)), randn(2, 3, 2)),
    "sum_keepdim": (lambda a: a.sum(dim=1, keepdim=True), randn(2, 3, 2)),
    "mean": (lambda a: a.mean(dim=-1), randn(2, 3)),
    "max_all": (lambda a: a.max(), randn(3, 4)),
    "max_dim": (lambda a: a.max(dim=1), randn(3, 4)),
    "max_keepdim": (lambda a: a.max(dim=(0, 2), keepdim=True), randn(2, 3, 2)),
    "reshape": (lambda a: a.reshape(3, 4) * a.view(-1, 3).reshape(3, 4), randn(2, 6)),
    "permute": (lambda a: a.permute(2, 0, 1) * 1.5, randn(2, 3, 2)),
    "transpose": (lambda a: a.transpose(0, 1) @ a, randn(3, 2)),
    "getitem_basic": (lambda a: a[1:, ::2] * a[0, 1], randn(3, 4)),
    "getitem_repeats": (lambda a, i: a[i], randn(4, 3), np.array([0, 2, 0, 0, 3])),
    "getitem_2d_index": (lambda a, i, j: a[i, j], randn(3, 4), np.array([[0, 0], [2, 1]]), np.array([1, 1])),
    "getitem_mixed": (lambda a: a[:, [1, 1, 3]], randn(2, 4)),
    "getitem_bool": (lambda a, m: a[m], randn(3, 4), randn(3, 4, seed=5) > 0),
    "masked_fill": (lambda a, m: a.masked_fill(m, 0.25), randn(2, 3, 3), causal(3)),
    "masked_fill_inf": (lambda a, m: F.softmax(a.masked_fill(tt.Tensor(m), -math.inf), -1),
                        randn(2, 4, 4), causal(4)),
    "where": (lambda c, a, b: tt.where(c, a, b), randn(3, 1) > 0, randn(3, 4), randn(4, seed=1)),
    "cat": (lambda a, b: tt.cat([a, b, a], dim=1), randn(2, 2), randn(2, 3, seed=1)),
    "stack": (lambda a, b: tt.stack([a, b], dim=-1), randn(2, 3), randn(2, 3, seed=1)),
    "softmax": (lambda a: F.softmax(a, dim=1), randn(2, 3, 2)),
    "log_softmax": (lambda a: F.log_softmax(a, dim=-1), randn(3, 4)),
    "cross_entropy_mean": (lambda a, t: F.cross_entropy(a, t), randn(4, 3), np.array([0, 2, 1, 2])),
    "cross_entropy_sum": (lambda a, t: F.cross_entropy(a, t, reduction="sum"), randn(4, 3),
                          np.array([0, 2, 1, 2])),
    "cross_entropy_none": (lambda a, t: F.cross_entropy(a, t, reduction="none"), randn(4, 3),
                           np.array([0, 2, 1, 2])),
    "cross_entropy_ignore": (lambda a, t: F.cross_entropy(a, t), randn(4, 3), np.array([0, -100, 1, -100])),
    "nll_loss": (lambda a, t: F.nll_loss(a, t), randn(4, 3), np.array([0, -100, 2, 2])),
    "layer_norm": (lambda x, w, b: F.layer_norm(x, 4, w, b), randn(2, 3, 4), randn(4, seed=1),
                   randn(4, seed=2)),
    "layer_norm_plain": (lambda x: F.layer_norm(x, (4,)), randn(3, 4)),
    "layer_norm_2d": (lambda x, w, b: F.layer_norm(x, (2, 3), w, b, eps=1e-3), randn(2, 2, 3),
                      randn(2, 3, seed=1), randn(2, 3, seed=2)),
    "causal_softmax": (lambda a: ops.causal_softmax(a, scale=0.7), randn(2, 4, 4)),
    "causal_softmax_tail": (lambda a: ops.causal_softmax(a, 0.5), randn(3, 2, 5)),  # last 2 of 5 positions
    "causal_softmax_step": (lambda a: ops.causal_softmax(a), randn(2, 1, 3)),       # one generation step
    **({} if fused is None else {
        "fused_causal_attention": (lambda qkv: fused.causal_attention(qkv, 2), randn(2, 3, 12)),
        "fused_causal_attention_chunked": (lambda qkv: _chunked_attention(qkv, 2), randn(1, 5, 6)),
        "fused_causal_attention_dropout": (lambda qkv: _seeded(fused.causal_attention, qkv, 1, 0.4),
                                           randn(2, 3, 6)),
        "fused_linear_relu": (fused.linear_relu, randn(2, 3, 4), randn(5, 4, seed=1), randn(5, seed=2)),
        "fused_linear_relu_nobias": (fused.linear_relu, randn(3, 4), randn(5, 4, seed=1)),
        "fused_dropout": (lambda x: _seeded(fused.dropout, x, 0.3), randn(3, 4)),
    }),
    "composite_mlp": (lambda x, w1, w2: F.cross_entropy(F.gelu(x @ w1).tanh() @ w2, np.array([1, 0, 2])),
                      randn(3, 4), randn(4, 5, seed=1), randn(5, 3, seed=2)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_gradcheck(name, device):
    fn, *inputs = CASES[name]
    gradcheck(fn, *inputs, atol=ATOL, rtol=RTOL, device=device)


def _functions_in(node, seen):
    stack = [node]
    while stack:
        t = stack.pop()
        if t._ctx is not None:
            seen.add(type(t._ctx))
            stack.extend(p for p in t._ctx.parents if p is not None)


def test_every_primitive_is_gradchecked():
    modules = [m for m in (ops, F, fused) if m is not None]
    primitives = {cls for mod in modules for _, cls in inspect.getmembers(mod, inspect.isclass)
                  if issubclass(cls, Function) and cls is not Function
                  and cls.__module__.startswith("tinytensor")}
    assert len(primitives) >= 27
    covered = set()
    for fn, *inputs in CASES.values():
        args = [tt.Tensor(x, requires_grad=True) if isinstance(x, np.ndarray) and x.dtype.kind == "f" else x
                for x in inputs]
        _functions_in(fn(*args), covered)
    missing = sorted(c.__name__ for c in primitives - covered)
    assert not missing, f"primitives without a gradient check: {missing}"


# ---------------------------------------------------------------- the utility itself
def test_gradcheck_catches_a_wrong_backward():
    class BadSquare(Function):
        def forward(self, x):
            self.x = x
            return x * x

        def backward(self, gy):
            return gy * self.x  # should be 2 * x

    with pytest.raises(AssertionError, match="input 0 at index"):
        gradcheck(lambda a: BadSquare.apply(a), randn(3))


def test_gradcheck_refuses_float32_and_needs_a_float_input():
    with pytest.raises(TypeError, match="float64"):
        gradcheck(lambda a: a * 2, randn(3).astype(np.float32))
    with pytest.raises(ValueError, match="at least one float64 input"):
        gradcheck(lambda i: tt.Tensor(np.ones(3))[i], np.array([0, 1]))


def test_numerical_grad_matches_a_known_derivative():
    x = np.array([0.3, -1.2, 2.0])
    (g,) = numerical_grad(lambda a: float(np.sum(np.sin(a))), [x], [0])
    np.testing.assert_allclose(g, np.cos(x), rtol=1e-9)
    np.testing.assert_array_equal(x, [0.3, -1.2, 2.0])  # restored after perturbation
