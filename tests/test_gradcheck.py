"""Float64 central-difference gradient checks (tinytensor.gradcheck) for every primitive Function.

test_every_primitive_is_gradchecked walks the graph of every case below and fails when a
Function subclass of tinytensor.ops (any of its modules), tinytensor.nn.functional or
tinytensor.fused (the fused ops) is not exercised by any case: a new primitive needs a line
here (and one in test_ops.py against PyTorch).
"""
import importlib
import inspect
import math
import pkgutil

import numpy as np
import pytest

import tinytensor as tt
import tinytensor.nn.functional as F
from tinytensor import Function, kernels, ops
from tinytensor.gradcheck import gradcheck, numerical_grad
from tinytensor.tensor import ViewFunction
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


def _attention(qkv, n_head, dropout_p=0.0):
    """fused.causal_attention of q, k, v split from one projection qkv (B, T, 3C), as
    gpt.model.CausalSelfAttention gives them, back to (B, T, C)."""
    B, T, C3 = qkv.shape
    q, k, v = (a.view(B, T, n_head, C3 // 3 // n_head).transpose(1, 2) for a in qkv.split(C3 // 3, dim=2))
    return fused.causal_attention(q, k, v, dropout_p).transpose(1, 2).reshape(B, T, C3 // 3)


def _chunked_attention(qkv, n_head, chunk=2):
    """The accelerated attention's chunked path (taken for T >= 2 chunks) with chunks of 2, so
    T = 5 takes it."""
    from tinytensor.kernels import attention
    old, attention.CHUNK = attention.CHUNK, chunk
    before = kernels.use(True)
    try:
        return _attention(qkv, n_head)
    finally:
        attention.CHUNK = old
        kernels.use(before)


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
    "amax_dim": (lambda a: a.amax(dim=1), randn(3, 4)),
    "amax_keepdim": (lambda a: a.amax(dim=(0, 2), keepdim=True), randn(2, 3, 2)),
    "amin": (lambda a: a.amin(dim=(0, 2)), randn(2, 3, 2)),
    "min_all": (lambda a: a.min(), randn(3, 4)),
    "max_with_dim": (lambda a: a.max(dim=1).values, randn(3, 4)),
    "min_with_dim_keepdim": (lambda a: a.min(0, keepdim=True).values, randn(3, 4)),
    "topk": (lambda a: a.topk(2, dim=0).values, randn(4, 3)),
    "gather": (lambda a, i: a.gather(1, i), randn(3, 4), np.array([[0, 0, 3], [1, 2, 1], [3, 3, 3]])),
    "logsumexp": (lambda a: a.logsumexp(dim=(0, 2)), randn(2, 3, 2)),
    "var": (lambda a: a.var(dim=1), randn(3, 4)),
    "var_correction0_keepdim": (lambda a: a.var(0, correction=0, keepdim=True), randn(3, 4)),
    "std": (lambda a: a.std(), randn(3, 4)),
    "std_dim": (lambda a: a.std(dim=(0, 1), correction=2), randn(2, 3, 2)),
    "cumsum": (lambda a: a.cumsum(dim=1), randn(2, 4, 3)),
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
    **({} if fused is None else {
        "fused_causal_attention": (lambda qkv: _attention(qkv, 2), randn(2, 3, 12)),
        "fused_causal_attention_chunked": (lambda qkv: _chunked_attention(qkv, 2), randn(1, 5, 6)),
        "fused_causal_attention_dropout": (lambda qkv: _seeded(_attention, qkv, 1, 0.4),
                                           randn(2, 3, 6)),
        # F.scaled_dot_product_attention: its fused path (q, k, v apart) and its composition
        "sdpa_fused_causal": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                              randn(2, 2, 3, 2), randn(2, 2, 3, 2, seed=1), randn(2, 2, 3, 2, seed=2)),
        "sdpa_bool_mask": (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, m),
                           randn(2, 3, 2), randn(2, 4, 2, seed=1), randn(2, 4, 3, seed=2),
                           np.array([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 0]], dtype=bool)),
        "fused_linear_relu": (fused.linear_relu, randn(2, 3, 4), randn(5, 4, seed=1), randn(5, seed=2)),
        "fused_linear_relu_nobias": (fused.linear_relu, randn(3, 4), randn(5, 4, seed=1)),
        "fused_dropout": (lambda x: _seeded(fused.dropout, x, 0.3), randn(3, 4)),
        "embedding": (lambda w: F.embedding(np.array([[0, 2, 2], [1, 0, 3]]), w), randn(4, 3)),
    }),
    # the ops a lecture reader reaches for
    "pow_tensor": (lambda a, b: a ** b, pos(3, 4), randn(4, seed=1)),
    "pow_scalar_base": (lambda b: 0.7 ** b, randn(3)),
    "pow_zero_base": (lambda b: 0.0 ** b, pos(4)),
    "pow_negative_base": (lambda b: (-2.0) ** b, np.array([2.0, 3.0, -1.0])),
    "sigmoid": (lambda a: a.sigmoid(), 4 * randn(3, 4)),
    "silu": (lambda a: F.silu(a), 4 * randn(3, 4)),
    "abs": (lambda a: a.abs(), randn(3, 4, low=0.1)),
    "clamp": (lambda a: a.clamp(-0.5, 0.7), randn(4, 5)),
    "clamp_min": (lambda a: a.clip(min=0.1), randn(4, 5)),
    "clamp_tensor": (lambda a, lo, hi: a.clamp(lo, hi), randn(3, 4), randn(4, seed=1) - 1,
                     randn(3, 1, seed=2) + 1),
    "maximum": (lambda a, b: tt.maximum(a, b), randn(3, 4), randn(4, seed=1)),
    "minimum": (lambda a, b: tt.minimum(a, b), randn(3, 4), randn(3, 1, seed=1)),
    "sqrt": (lambda a: a.sqrt(), pos(3, 2)),
    "rsqrt": (lambda a: a.rsqrt(), pos(3, 2)),
    "sin": (lambda a: a.sin(), randn(3, 2)),
    "cos": (lambda a: a.cos(), randn(3, 2)),
    "erf": (lambda a: tt.erf(a), randn(3, 2)),
    "leaky_relu": (lambda a: F.leaky_relu(a, 0.2), randn(3, 4, low=0.1)),
    "tril": (lambda a: a.tril(), randn(2, 3, 4)),
    "triu": (lambda a: tt.triu(a, 1), randn(4, 3)),
    "expand": (lambda a: a.expand(2, 3, 4) * tt.tensor(randn(2, 3, 4, seed=1)).to(a.device), randn(3, 1)),
    "repeat": (lambda a: a.repeat(2, 1, 3) * tt.tensor(randn(2, 2, 9, seed=1)).to(a.device), randn(2, 3)),
    "split": (lambda a: a.split(2, dim=1)[0] * 2 + a.split([1, 3], dim=1)[1].sum(1, keepdim=True),
              randn(3, 4)),
    "split_unused": (lambda a: a.chunk(3, dim=0)[1], randn(5, 2)),
    "einsum_attention": (lambda q, k: tt.einsum("bhtd,bhsd->bhts", q, k), randn(2, 2, 3, 4),
                         randn(2, 2, 3, 4, seed=1)),
    "einsum_reduce": (lambda a, b: tt.einsum("ij,jk->i", a, b), randn(3, 4), randn(4, 2, seed=1)),
    "einsum_ellipsis": (lambda a, b: tt.einsum("...ij,...jk", a, b), randn(2, 3, 4), randn(2, 4, 2, seed=1)),
    "amin_dim": (lambda a: a.amin(dim=1), randn(3, 4)),
    "contiguous": (lambda a: a.transpose(0, 1).contiguous().view(-1), randn(3, 4)),
    "composite_mlp": (lambda x, w1, w2: F.cross_entropy(F.gelu(x @ w1).tanh() @ w2, np.array([1, 0, 2])),
                      randn(3, 4), randn(4, 5, seed=1), randn(5, 3, seed=2)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_gradcheck(name, device, accelerators):
    fn, *inputs = CASES[name]
    gradcheck(fn, *inputs, atol=ATOL, rtol=RTOL, device=device)


def _functions_in(node, seen):
    stack = [node]
    while stack:
        t = stack.pop()
        if t._ctx is not None:
            seen.add(type(t._ctx))
            stack.extend(p for p in t._ctx.parents if p is not None)


NOT_DIFFERENTIABLE = {ops.FloorDivide}  # torch has no derivative for it either


def test_floor_divide_has_no_gradient_as_in_torch():
    x = tt.Tensor(randn(3), requires_grad=True)
    y = (x // 0.5).sum()
    with pytest.raises(RuntimeError, match="derivative for floor_divide is not implemented"):
        y.backward()


def _op_modules():
    """ops, F and fused, and every module of those that are packages (ops): a Function that
    a module defines and its package does not re-export is still found."""
    modules = [m for m in (ops, F, fused) if m is not None]
    for pkg in (ops, fused):
        if pkg is not None and hasattr(pkg, "__path__"):
            modules += [importlib.import_module(f"{pkg.__name__}.{info.name}")
                        for info in pkgutil.iter_modules(pkg.__path__)]
    return modules


def test_every_primitive_is_gradchecked():
    modules = _op_modules()
    primitives = {cls for mod in modules for _, cls in inspect.getmembers(mod, inspect.isclass)
                  if issubclass(cls, Function) and cls not in (Function, ViewFunction)
                  and cls.__module__.startswith("tinytensor")}
    assert len(primitives) >= 27
    covered = set()
    kernels.use(False)  # the references (the accelerated versions are tested equal to them)
    for fn, *inputs in CASES.values():
        args = [tt.Tensor(x, requires_grad=True) if isinstance(x, np.ndarray) and x.dtype.kind == "f" else x
                for x in inputs]
        _functions_in(fn(*args), covered)
    missing = sorted(c.__name__ for c in primitives - covered - NOT_DIFFERENTIABLE)
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
