"""Every op and functional against PyTorch: output and gradients of sum(out * W), one line each.

Each case runs in float64 (relative error <= 1e-10) and float32 (<= 1e-5) on every device.
"""
import importlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import tinytensor as tt
import tinytensor.nn.functional as F
from tinytensor import backend
from torch_helper import Const, check, dtypes, randn

# every test here runs with the accelerators off and on (conftest)
pytestmark = pytest.mark.usefixtures("accelerators")

INF = math.inf


def pos(*shape, seed=None):
    """Positive values in [0.5, 2.5) (for log, sqrt, negative powers)."""
    return 0.5 + 2.0 * np.random.default_rng(seed if seed is not None else 7).random(shape)


def ints(*shape, high, seed=1):
    return np.random.default_rng(seed).integers(0, high, size=shape)


def causal(t):
    return np.triu(np.ones((t, t), dtype=bool), k=1)  # True above the diagonal: masked


def same(family, fn, *inputs):
    """A case where the same code runs on tinytensor and torch tensors."""
    return pytest.param(family, fn, fn, inputs, id=f"{family}-{len(CASES)}")


def pair(family, ours, theirs, *inputs):
    return pytest.param(family, ours, theirs, inputs, id=f"{family}-{len(CASES)}")


CASES = []


def add(*params):
    CASES.extend(params)


# ---------------------------------------------------------------- arithmetic, broadcasting, scalars
for fam, op in [("add", lambda a, b: a + b), ("sub", lambda a, b: a - b), ("mul", lambda a, b: a * b)]:
    add(same(fam, op, randn(3, 4), randn(3, 4, seed=1)))
    add(same(fam, op, randn(2, 3, 4), randn(4, seed=1)))          # broadcast right
    add(same(fam, op, randn(3, 1), randn(1, 4, seed=1)))          # broadcast both
    add(same(fam, op, randn(3, 4), Const(randn(4, seed=1))))      # a constant operand
add(same("div", lambda a, b: a / b, randn(3, 4), randn(3, 4, seed=1, low=0.5)))
add(same("div", lambda a, b: a / b, randn(2, 1, 4), randn(3, 1, seed=1, low=0.5)))
for fam, fn in [("add", lambda a: a + 2.5), ("add", lambda a: 2.5 + a), ("add", lambda a: 3 + a),
                ("sub", lambda a: a - 2.5), ("sub", lambda a: 2.5 - a),
                ("mul", lambda a: a * 1.5), ("mul", lambda a: -2 * a),
                ("div", lambda a: a / 3.0), ("div", lambda a: 3.0 / a), ("neg", lambda a: -a),
                ("neg", lambda a: -(-a))]:
    add(same(fam, fn, randn(3, 4, low=0.5)))
add(same("add", lambda a: a + a, randn(3, 4)))                   # the same tensor twice
add(same("mul", lambda a: a * a * a, randn(3, 4)))
for fam, fn, x in [("pow", lambda a: a ** 2, randn(3, 4)), ("pow", lambda a: a ** 3, randn(3, 4)),
                   ("pow", lambda a: a ** 0.5, pos(3, 4)), ("pow", lambda a: a ** -1.5, pos(3, 4)),
                   ("pow", lambda a: a ** 1, randn(3, 4)), ("pow", lambda a: a ** 0, randn(3, 4)),
                   ("pow", lambda a: 2.0 ** a, randn(3, 4))]:
    add(same(fam, fn, x))

# ---------------------------------------------------------------- elementwise
add(same("exp", lambda a: a.exp(), randn(3, 4)))
add(pair("exp", tt.exp, torch.exp, randn(2, 3)))
add(same("log", lambda a: a.log(), pos(3, 4)))
add(pair("log", tt.log, torch.log, pos(5)))
add(same("tanh", lambda a: a.tanh(), randn(3, 4)))
add(pair("tanh", tt.tanh, torch.tanh, randn(2, 3, 2)))
add(same("relu", lambda a: a.relu(), randn(3, 4, low=0.1)))
add(same("sqrt", lambda a: a.sqrt(), pos(3, 4)))
add(pair("cast", lambda a: a.double(), lambda a: a.double(), randn(3, 4)))
add(pair("cast", lambda a: a.float() * 2, lambda a: a.float() * 2, randn(3, 4)))

# ---------------------------------------------------------------- matmul (numpy.matmul semantics)
for sa, sb in [((4,), (4,)), ((4,), (4, 3)), ((3, 4), (4,)), ((3, 4), (4, 5)),
               ((2, 3, 4), (2, 4, 5)), ((2, 1, 3, 4), (5, 4, 2)), ((4,), (2, 4, 5)),
               ((2, 3, 4), (4,)), ((3, 4), (2, 4, 5)), ((2, 3, 4), (4, 5))]:
    add(same("matmul", lambda a, b: a @ b, randn(*sa), randn(*sb, seed=1)))
add(pair("matmul", tt.matmul, torch.matmul, randn(2, 3), randn(3, 2, seed=1)))
add(same("matmul", lambda a, b: a.matmul(b), randn(2, 3), Const(randn(3, 2, seed=1))))

# ---------------------------------------------------------------- reductions
for dim, keep in [(None, False), (None, True), (0, False), (-1, True), (1, False), ((0, 2), False),
                  ((0, 2), True), ((-1, 0, 1), False)]:
    add(same("sum", lambda a, d=dim, k=keep: a.sum(dim=d, keepdim=k), randn(2, 3, 4)))
    add(same("mean", lambda a, d=dim, k=keep: a.mean(dim=d, keepdim=k), randn(2, 3, 4)))
    add(pair("amax", lambda a, d=dim, k=keep: a.amax(dim=() if d is None else d, keepdim=k),
             lambda a, d=dim, k=keep: torch.amax(a, dim=() if d is None else d, keepdim=k),
             randn(2, 3, 4)))
add(same("sum", lambda a: a.sum(), randn(5)))
add(same("sum", lambda a: a.sum(1), randn(3, 4)))
add(same("mean", lambda a: a.mean(-1), randn(3, 4)))
add(pair("amax", lambda a: a.amax(0), lambda a: torch.amax(a, 0), randn(3, 4)))
ties = np.array([[1.0, 3.0, 3.0, 0.5], [2.0, 2.0, 2.0, 2.0], [-1.0, 0.0, -1.0, 0.0]])
add(pair("amax", lambda a: a.amax(dim=1), lambda a: torch.amax(a, 1), ties))   # ties share the gradient
add(pair("max", lambda a: a.max(), lambda a: a.max(), ties))
add(pair("amax", lambda a: a.amax(dim=0, keepdim=True), lambda a: torch.amax(a, 0, keepdim=True), ties))

# ---------------------------------------------------------------- shapes
add(same("reshape", lambda a: a.reshape(6, 4), randn(2, 3, 4)))
add(same("reshape", lambda a: a.reshape((4, -1)), randn(2, 3, 4)))
add(same("reshape", lambda a: a.reshape(-1), randn(2, 3, 4)))
add(same("reshape", lambda a: a.view(2, 12), randn(2, 3, 4)))
add(same("reshape", lambda a: a.view(-1, 3, 2), randn(2, 3, 4)))
add(same("reshape", lambda a: a.unsqueeze(1), randn(3, 4)))
add(same("reshape", lambda a: a.unsqueeze(-1), randn(3, 4)))
add(same("reshape", lambda a: a.squeeze(1), randn(3, 1, 4)))
add(same("reshape", lambda a: a.squeeze(), randn(1, 3, 1, 4)))
add(same("reshape", lambda a: a.flatten(1), randn(2, 3, 4)))
add(same("reshape", lambda a: a.flatten(), randn(2, 3, 4)))
add(same("transpose", lambda a: a.transpose(0, 1), randn(3, 4)))
add(same("transpose", lambda a: a.transpose(-1, -2), randn(2, 3, 4)))
add(same("transpose", lambda a: a.transpose(0, 2), randn(2, 3, 4)))
add(same("transpose", lambda a: a.T, randn(3, 4)))
add(same("permute", lambda a: a.permute(2, 0, 1), randn(2, 3, 4)))
add(same("permute", lambda a: a.permute((1, 2, 0)), randn(2, 3, 4)))
add(same("permute", lambda a: a.permute(0, -1, 1, 2), randn(2, 3, 4, 5)))
add(same("permute", lambda a: a.transpose(1, 2).reshape(2, -1), randn(2, 3, 4)))  # non-contiguous

# ---------------------------------------------------------------- indexing
for fn in [lambda a: a[1], lambda a: a[-1], lambda a: a[1:3], lambda a: a[:, ::2], lambda a: a[1, 2],
           lambda a: a[..., -1], lambda a: a[None], lambda a: a[:, 1:3, None],
           lambda a: a[:, [1, 1, 0]], lambda a: a[[0, 0, 2], 1:], lambda a: a[[2, 0], [1, 1]]]:
    add(same("index", fn, randn(4, 5)))
add(same("index", lambda a, i: a[i], randn(4, 5), np.array([0, 2, 0, 3, 3, 0])))      # repeats
add(same("index", lambda a, i: a[i], randn(4, 5), np.array([[1, 1], [-1, 0]])))       # 2-D, negative
add(same("index", lambda a, i: a[:, i], randn(4, 5), np.array([4, 4, 4, 0])))
add(same("index", lambda a, i, j: a[i, j], randn(4, 5), np.array([0, 0, 3]), np.array([1, 1, 2])))
add(same("index", lambda a, i: a[1:, i, :], randn(3, 4, 2), np.array([3, 0, 3])))
add(same("index", lambda a, m: a[m], randn(4, 5), randn(4, 5, seed=3) > 0))          # bool mask
add(pair("index", lambda a, i: a[tt.Tensor(i)], lambda a, i: a[i], randn(4, 5), np.array([1, 1, 2])))

# ---------------------------------------------------------------- masked_fill
add(same("masked_fill", lambda a, m: a.masked_fill(m, 0.5), randn(3, 4), randn(3, 4, seed=3) > 0))
add(same("masked_fill", lambda a, m: a.masked_fill(m, -INF), randn(2, 4, 4), causal(4)))   # broadcast
add(same("masked_fill", lambda a, m: a.masked_fill(m, -1e9), randn(3, 4), randn(4, seed=3) > 0))
add(pair("masked_fill", lambda a, m: a.masked_fill(tt.Tensor(m), -INF),
         lambda a, m: a.masked_fill(m, -INF), randn(2, 3, 3), causal(3)))
add(pair("masked_fill", lambda a, m: F.softmax(a.masked_fill(m, -INF), dim=-1),   # the attention use
         lambda a, m: TF.softmax(a.masked_fill(m, -INF), dim=-1), randn(2, 5, 5), causal(5)))

# ---------------------------------------------------------------- cat, stack, where
add(pair("cat", lambda a, b: tt.cat([a, b], 0), lambda a, b: torch.cat([a, b], 0), randn(2, 3), randn(4, 3)))
add(pair("cat", lambda a, b, c: tt.cat([a, b, c], dim=1), lambda a, b, c: torch.cat([a, b, c], dim=1),
         randn(2, 1, 3), randn(2, 4, 3), randn(2, 2, 3)))
add(pair("cat", lambda a, b: tt.cat((a, b), dim=-1), lambda a, b: torch.cat((a, b), dim=-1),
         randn(2, 3), Const(randn(2, 2))))
add(pair("cat", lambda a: tt.cat([a, a * 2], 0), lambda a: torch.cat([a, a * 2], 0), randn(2, 3)))
for d in (0, 1, 2, -1):
    add(pair("stack", lambda a, b, d=d: tt.stack([a, b], d), lambda a, b, d=d: torch.stack([a, b], d),
             randn(2, 3), randn(2, 3, seed=1)))
add(pair("stack", lambda a, b, c: tt.stack([a, b, c]), lambda a, b, c: torch.stack([a, b, c]),
         randn(4), randn(4), Const(randn(4))))
add(pair("where", tt.where, torch.where, randn(3, 4) > 0, randn(3, 4), randn(3, 4, seed=1)))
add(pair("where", tt.where, torch.where, randn(3, 1) > 0, randn(3, 4), randn(4, seed=1)))   # broadcast
add(pair("where", lambda c, b: tt.where(c, 0.0, b), lambda c, b: torch.where(c, 0.0, b),
         randn(3, 4) > 0, randn(3, 4)))
add(pair("where", lambda c, a: tt.where(tt.Tensor(c), a, -a), lambda c, a: torch.where(c, a, -a),
         randn(3, 4) > 0, randn(3, 4)))

# ---------------------------------------------------------------- softmax family (fused)
for d in (-1, 0, 1):
    add(pair("softmax", lambda a, d=d: F.softmax(a, dim=d), lambda a, d=d: TF.softmax(a, dim=d),
             randn(2, 3, 4)))
    add(pair("log_softmax", lambda a, d=d: F.log_softmax(a, dim=d), lambda a, d=d: TF.log_softmax(a, dim=d),
             randn(2, 3, 4)))
add(pair("softmax", lambda a: a.softmax(-1), lambda a: a.softmax(-1), randn(3, 5) * 10))
add(pair("log_softmax", lambda a: a.log_softmax(-1), lambda a: a.log_softmax(-1), randn(3, 5) * 10))

targets = np.array([0, 4, 2, 2, 1, 3])
targets_ignored = np.array([0, -100, 2, -100, 1, 3])
for red in ("mean", "sum", "none"):
    add(pair("cross_entropy", lambda a, t, r=red: F.cross_entropy(a, t, reduction=r),
             lambda a, t, r=red: TF.cross_entropy(a, t, reduction=r), randn(6, 5), targets))
    add(pair("cross_entropy", lambda a, t, r=red: F.cross_entropy(a, t, reduction=r),
             lambda a, t, r=red: TF.cross_entropy(a, t, reduction=r), randn(6, 5), targets_ignored))
    add(pair("cross_entropy", lambda a, t, r=red: F.cross_entropy(a, t, reduction=r, ignore_index=2),
             lambda a, t, r=red: TF.cross_entropy(a, t, reduction=r, ignore_index=2), randn(6, 5), targets))
add(pair("cross_entropy", F.cross_entropy, TF.cross_entropy, randn(4, 3) * 20, np.array([2, 0, 1, 1])))
add(pair("cross_entropy", lambda a, t: F.cross_entropy(a.view(-1, 5), t.reshape(-1)),   # the GPT use
         lambda a, t: TF.cross_entropy(a.view(-1, 5), t.reshape(-1)), randn(2, 3, 5), ints(2, 3, high=5)))

# ---------------------------------------------------------------- layer_norm, linear, embedding, activations
add(pair("layer_norm", lambda x, w, b: F.layer_norm(x, (8,), w, b),
         lambda x, w, b: TF.layer_norm(x, (8,), w, b),
         randn(2, 3, 8), 1 + 0.1 * randn(8, seed=1), randn(8, seed=2)))
add(pair("layer_norm", lambda x: F.layer_norm(x, 8), lambda x: TF.layer_norm(x, (8,)), randn(4, 8)))
add(pair("layer_norm", lambda x, w: F.layer_norm(x, [8], w), lambda x, w: TF.layer_norm(x, [8], w),
         randn(4, 8), randn(8, seed=1)))
add(pair("layer_norm", lambda x, b: F.layer_norm(x, (8,), None, b),
         lambda x, b: TF.layer_norm(x, (8,), None, b), randn(4, 8), randn(8, seed=1)))
add(pair("layer_norm", lambda x, w, b: F.layer_norm(x, (3, 4), w, b, eps=1e-3),
         lambda x, w, b: TF.layer_norm(x, (3, 4), w, b, eps=1e-3), randn(2, 3, 4), randn(3, 4, seed=1),
         randn(3, 4, seed=2)))
add(pair("layer_norm", lambda x: F.layer_norm(x, (2, 3, 4)), lambda x: TF.layer_norm(x, (2, 3, 4)),
         3 + 5 * randn(2, 2, 3, 4)))
add(pair("linear", F.linear, TF.linear, randn(4, 3), randn(5, 3, seed=1), randn(5, seed=2)))
add(pair("linear", F.linear, TF.linear, randn(2, 4, 3), randn(5, 3, seed=1), randn(5, seed=2)))
add(pair("linear", F.linear, TF.linear, randn(3), randn(5, 3, seed=1), randn(5, seed=2)))
add(pair("linear", F.linear, TF.linear, randn(2, 4, 3), randn(5, 3, seed=1)))
add(pair("linear", lambda x, w: F.linear(x, w, None), lambda x, w: TF.linear(x, w, None),
         randn(4, 3), randn(2, 3)))
add(pair("embedding", F.embedding, TF.embedding, np.array([[1, 6, 1], [0, 1, 6]]), randn(7, 4)))
add(pair("embedding", F.embedding, TF.embedding, np.array([3, 3, 3, 0]), randn(5, 2)))
add(pair("relu", F.relu, TF.relu, randn(3, 4, low=0.1)))
add(pair("gelu", F.gelu, TF.gelu, 3 * randn(3, 4)))
add(pair("gelu", lambda x: F.gelu(x, approximate="tanh"), lambda x: TF.gelu(x, approximate="tanh"),
         3 * randn(3, 4)))
add(pair("gelu", lambda x: F.gelu(x), lambda x: TF.gelu(x), np.array(0.7)))                   # 0-d
add(pair("tanh", F.tanh, torch.tanh, randn(3, 4)))
add(pair("dropout", lambda x: F.dropout(x, 0.5, training=False), lambda x: TF.dropout(x, 0.5, training=False),
         randn(3, 4)))
add(pair("dropout", lambda x: F.dropout(x, 0.0), lambda x: TF.dropout(x, 0.0), randn(3, 4)))



def torch_causal_softmax(a, scale):
    tq, tk = a.shape[-2:]
    future = torch.triu(torch.ones(tq, tk, dtype=torch.bool), diagonal=tk - tq + 1)
    return TF.softmax((a * scale).masked_fill(future, -INF), dim=-1)



# ---------------------------------------------------------------- fused ops (tinytensor/fused.py)
try:
    fused = importlib.import_module("tinytensor.fused")
except ImportError:  # no fused ops in this version
    fused = None


def attention_of_projection(qkv, n_head):
    """tinytensor.fused.causal_attention of the q, k and v split from one projection qkv
    (B, T, 3C), as gpt.model.CausalSelfAttention gives them: views, the heads side by side."""
    B, T, C3 = qkv.shape
    q, k, v = (a.view(B, T, n_head, C3 // 3 // n_head).transpose(1, 2)     # each (B, nh, T, hs)
               for a in qkv.split(C3 // 3, dim=2))
    return fused.causal_attention(q, k, v).transpose(1, 2).reshape(B, T, C3 // 3)   # (B, T, C)


def torch_attention(qkv, n_head):
    """The composition tinytensor.fused.causal_attention replaces, in torch."""
    B, T, C3 = qkv.shape
    hs = C3 // (3 * n_head)
    q, k, v = qkv.reshape(B, T, 3, n_head, hs).permute(2, 0, 3, 1, 4)    # each (B, nh, T, hs)
    att = torch_causal_softmax(q @ k.transpose(-2, -1), hs ** -0.5)      # (B, nh, T, T)
    return (att @ v).transpose(1, 2).reshape(B, T, C3 // 3)              # (B, T, C)


if fused is not None:
    for shape, nh in [((2, 5, 12), 2), ((1, 130, 24), 4)]:   # T = 130 >= 2 chunks: the chunked path
        add(pair("fused_attention", lambda qkv, nh=nh: attention_of_projection(qkv, nh),
                 lambda qkv, nh=nh: torch_attention(qkv, nh), randn(*shape)))
    add(pair("fused_linear_relu", fused.linear_relu, lambda x, w, b: TF.relu(TF.linear(x, w, b)),
             randn(2, 3, 4), randn(5, 4, seed=1), randn(5, seed=2)))
    add(pair("fused_linear_relu", fused.linear_relu, lambda x, w: TF.relu(TF.linear(x, w)),
             randn(3, 4), randn(5, 4, seed=1)))

# ---------------------------------------------------------------- compositions (the engine with many ops)
add(pair("composite",
         lambda x, w, b: F.cross_entropy(F.gelu(F.linear(x, w, b)).tanh() @ w[:, :4], np.array([0, 3, 1])),
         lambda x, w, b: TF.cross_entropy(TF.gelu(TF.linear(x, w, b)).tanh() @ w[:, :4],
                                          torch.tensor([0, 3, 1])),
         randn(3, 6), randn(6, 6, seed=1), randn(6, seed=2)))
add(pair("composite",  # attention: scores, causal mask, softmax
         lambda q, k: F.softmax((q @ k.transpose(-2, -1) * 0.5).masked_fill(causal(4), -INF),
                                -1).sum(1).log(),
         lambda q, k: TF.softmax((q @ k.transpose(-2, -1) * 0.5).masked_fill(torch.from_numpy(causal(4)),
                                                                             -INF), -1).sum(1).log(),
         randn(2, 4, 3), randn(2, 4, 3, seed=1)))


@dtypes
@pytest.mark.parametrize("family, ours, theirs, inputs", CASES)
def test_op_against_torch(family, ours, theirs, inputs, device, dtype):
    check(family, ours, theirs, *inputs, dtype=dtype, device=device)


# ---------------------------------------------------------------- ndarray and Tensor operands
@dtypes
def test_ndarray_operands_take_the_tensor_dtype(device, dtype):
    c = randn(3, 4, seed=5).astype(dtype)
    check("add", lambda a: tt.Tensor(c).to(device) + a, lambda a: torch.from_numpy(c) + a, randn(3, 4),
          dtype=dtype, device=device)
    if device == "cpu":  # an ndarray on the left defers to Tensor's reflected operators
        check("mul", lambda a: c * a, lambda a: torch.from_numpy(c) * a, randn(3, 4), dtype=dtype)
        check("sub", lambda a: c - a, lambda a: torch.from_numpy(c) - a, randn(3, 4), dtype=dtype)
        check("matmul", lambda a: c @ a, lambda a: torch.from_numpy(c) @ a, randn(4, 2), dtype=dtype)


# ---------------------------------------------------------------- dropout in training mode
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_training_statistics_and_gradient(device, p):
    tt.manual_seed(0)
    x = tt.Tensor(np.full((200, 500), 2.0), requires_grad=True).to(device)
    y = F.dropout(x, p, training=True)
    out = y.numpy()
    kept = out != 0
    n = kept.size
    # the drop rate is p within 5 standard deviations of a binomial proportion
    assert abs((1 - kept.mean()) - p) < 5 * math.sqrt(p * (1 - p) / n)
    np.testing.assert_allclose(out[kept], 2.0 / (1 - p), rtol=1e-15)   # survivors scaled by 1/(1-p)
    # rows and columns are not all dropped together: the mask is elementwise
    assert 0 < kept.mean(axis=1).min() and kept.mean(axis=1).max() < 1
    w = np.random.default_rng(0).standard_normal(x.shape)
    (y * tt.Tensor(w).to(device)).sum().backward()
    np.testing.assert_allclose(backend.to_numpy(x.grad), w * kept / (1 - p), rtol=1e-15)  # mask * scale
    assert not np.array_equal(F.dropout(x, p).numpy() != 0, kept)                  # a fresh mask
    assert F.dropout(x.astype(np.float32), p).dtype == np.float32


def test_dropout_eval_is_identity_and_edges(device):
    x = tt.Tensor(randn(3, 4), requires_grad=True).to(device)
    assert F.dropout(x, 0.7, training=False) is x
    assert F.dropout(x, 0.0, training=True) is x
    y = F.dropout(x, 1.0)
    assert np.all(y.numpy() == 0)
    y.sum().backward()
    assert np.all(tt.Tensor(x.grad).numpy() == 0)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="dropout probability"):
            F.dropout(x, bad)


# ---------------------------------------------------------------- numerical stability
@dtypes
def test_softmax_family_is_stable_for_huge_logits(device, dtype):
    x = np.array([[1e4, 0.0, -1e4], [1e4, 1e4, 1e4 - 1], [-1e4, -1e4, -1e4]])
    t = np.array([0, 2, 1])
    for fam, ours, theirs in [("softmax", F.softmax, TF.softmax),
                              ("log_softmax", F.log_softmax, TF.log_softmax)]:
        out = ours(tt.Tensor(x.astype(dtype)).to(device), -1).numpy()
        assert np.all(np.isfinite(out)), f"{fam} of 1e4 logits is not finite: {out}"
        check(fam, lambda a, f=ours: f(a, -1), lambda a, f=theirs: f(a, -1), x, dtype=dtype, device=device)
    for red in ("mean", "sum", "none"):
        loss = F.cross_entropy(tt.Tensor(x.astype(dtype), requires_grad=True).to(device), t, reduction=red)
        assert np.all(np.isfinite(loss.numpy()))
        check("cross_entropy", lambda a, tg, r=red: F.cross_entropy(a, tg, reduction=r),
              lambda a, tg, r=red: TF.cross_entropy(a, tg, reduction=r), x, t, dtype=dtype, device=device)


# ---------------------------------------------------------------- bad input gets a clear error
def test_bad_input_errors():
    x = tt.Tensor(randn(3, 4), requires_grad=True)
    with pytest.raises(ValueError, match="does not broadcast"):
        x.masked_fill(np.ones(3, dtype=bool), 0.0)
    with pytest.raises(ValueError, match="does not broadcast"):
        x.masked_fill(np.ones((2, 3, 4), dtype=bool), 0.0)     # would enlarge x (torch refuses too)
    with pytest.raises(TypeError, match="bool mask"):
        x.masked_fill(np.ones((3, 4)), 0.0)
    with pytest.raises(ValueError, match="targets must have shape"):
        F.cross_entropy(x, np.array([0, 1]))
    with pytest.raises(RuntimeError, match=r"targets must have shape \(3, 2\)"):   # (N, C, d1): torch's
        F.cross_entropy(x.reshape(3, 2, 2), np.array([0, 1, 1]))         # class dim 1, targets (N, d1)
    with pytest.raises(RuntimeError, match="integers"):                  # torch: a RuntimeError too
        F.cross_entropy(x, np.array([0.0, 1.0, 1.0]))
    with pytest.raises(IndexError, match="out of range"):
        F.cross_entropy(x, np.array([0, 4, 1]))
    with pytest.raises(IndexError, match="out of range"):
        F.cross_entropy(x, np.array([0, -1, 1]))
    with pytest.raises(ValueError, match="reduction"):
        F.cross_entropy(x, np.array([0, 1, 1]), reduction="avg")
    with pytest.raises(IndexError, match="out of range"):
        F.embedding(np.array([0, 5]), x)
    with pytest.raises(TypeError, match="integers"):
        F.embedding(np.array([0.0]), x)
    with pytest.raises(ValueError, match="normalized_shape"):
        F.layer_norm(x, (3,))
    with pytest.raises(ValueError, match="approximate"):
        F.gelu(x, approximate="fast")
    with pytest.raises(IndexError, match="out of range"):
        x.sum(dim=2)
    with pytest.raises(RuntimeError, match="duplicate dims"):
        x.permute(0, 0)
    with pytest.raises(TypeError, match="exponent"):
        tt.ops.pow(x, "2")
    with pytest.raises(TypeError, match="unsupported operand"):
        x + None                                               # not silently nan
    with pytest.raises(IndexError, match="out of range"):
        x.transpose(0, 2)


@pytest.mark.parametrize("target_shape, idx", [
    ((7, 3), [0, 6, -1, 2, 2, 0, -7]),           # repeats and negative indices, rows of 3
    ((5,), [4, 4, 1, -2]),                      # a 1-D target: single elements
    ((6, 2, 2), [[1, 5], [1, 1]]),              # a 2-D index array, rows of shape (2, 2)
])
def test_scatter_add_equals_numpy_add_at(target_shape, idx):
    """backend.scatter_add's NumPy fast path for integer index arrays (sorted runs summed by
    add.reduceat) gives what np.add.at gives."""
    rng = np.random.default_rng(0)
    idx = np.asarray(idx)
    target = rng.standard_normal(target_shape)
    values = rng.standard_normal(idx.shape + target_shape[1:])
    expected = target.copy()
    np.add.at(expected, idx, values)
    backend.scatter_add(target, idx, values)
    np.testing.assert_allclose(target, expected, rtol=1e-15, atol=1e-15)
