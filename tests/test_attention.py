"""F.scaled_dot_product_attention against torch.nn.functional.scaled_dot_product_attention: the
fused causal path (tinytensor.fused.CausalAttention, and its accelerated chunked version in
tinytensor/kernels/attention.py; causal self-attention, and queries that are the last of the
keys, as in a generation step with a KV cache) and the composed one (masks, scales, shapes), dropout against
the same composition of tinytensor ops, torch's errors; float64 central differences for every
path. Every test runs with the accelerators off and on (conftest)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from torch.nn.attention import SDPBackend, sdpa_kernel

import tinytensor as tt
import tinytensor.fused as fused
import tinytensor.nn.functional as F
from tinytensor import backend, kernels
from tinytensor.gradcheck import gradcheck
from tinytensor.kernels import attention
from torch_helper import check, dtypes, randn

pytestmark = pytest.mark.usefixtures("accelerators")

FAMILY = "scaled_dot_product_attention"
INF = float("inf")
# fused and composed results agree to rounding: float64 to ~1e-16, float32 to a few ulps
TOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 2e-6}


def torch_sdpa(*args, **kw):
    """torch's scaled_dot_product_attention on its math backend: the exact composition (its
    fused CPU kernels, chosen by the machine, leave rounding residue, e.g. 3e-16 instead of 0
    for the gradient of a query that sees one key)."""
    with sdpa_kernel(SDPBackend.MATH):
        return TF.scaled_dot_product_attention(*args, **kw)


def sdpa(**kw):
    """tinytensor's and torch's scaled_dot_product_attention of (q, k, v[, attn_mask]) with kw."""
    def ours(q, k, v, *mask):
        return F.scaled_dot_product_attention(q, k, v, *mask, **kw)

    def theirs(q, k, v, *mask):
        return torch_sdpa(q, k, v, *mask, **kw)
    return ours, theirs


def qkv(q_shape, k_shape=None, v_shape=None, seed=0):
    """Standard-normal query, key and value of the given shapes (key and value: query's)."""
    k_shape = k_shape or q_shape
    v_shape = v_shape or k_shape
    shapes = (q_shape, k_shape, v_shape)
    return tuple(randn(*shape, seed=seed + i) for i, shape in enumerate(shapes))


def close(ours, ref, dtype, what):
    ours, ref = backend.to_numpy(ours), backend.to_numpy(ref)
    err = np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30)
    assert err <= TOL[np.dtype(dtype)], f"{what}: relative error {err:.3g}"


def run(fn, arrays, g, device, seed=None):
    """fn(*Tensors) and the gradients of sum(out * g) for the float arrays among arrays."""
    if seed is not None:
        tt.manual_seed(seed)
    ts = [tt.Tensor(backend.to_device(a, device), requires_grad=a.dtype.kind == "f")
          for a in arrays]
    y = fn(*ts)
    y.backward(backend.to_device(g, device))
    return [y.numpy()] + [backend.to_numpy(t.grad) for t in ts if t.requires_grad]


# ---------------------------------------------------------------- the fused causal path
# (B, nh, T, hs, chunk): chunk <= T / 2 takes the chunked path, T % chunk != 0 too
FUSED_SHAPES = [(2, 3, 1, 4, 64), (2, 2, 5, 3, 64), (3, 2, 9, 4, 4), (1, 2, 8, 2, 2),
                (1, 2, 130, 8, 64)]


@dtypes
@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("shape", FUSED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_causal_fused_vs_torch(monkeypatch, shape, scale, dtype, device):
    B, nh, T, hs, chunk = shape
    monkeypatch.setattr(attention, "CHUNK", chunk)
    check(FAMILY, *sdpa(is_causal=True, scale=scale), *qkv((B, nh, T, hs)), dtype=dtype,
          device=device)


def nanogpt_attention(sdpa_fn, x, n_head):
    """nanoGPT's CausalSelfAttention core on its q/k/v projection x (B, T, 3*C), written alike
    for both libraries: q, k, v are strided views of x."""
    B, T, C3 = x.shape
    C = C3 // 3
    q, k, v = x[..., :C], x[..., C:2 * C], x[..., 2 * C:]                  # each (B, T, C)
    q, k, v = (t.reshape(B, T, n_head, C // n_head).transpose(1, 2)     # each (B, nh, T, hs)
               for t in (q, k, v))
    y = sdpa_fn(q, k, v, is_causal=True)                                 # (B, nh, T, hs)
    return y.transpose(1, 2).reshape(B, T, C)                            # (B, T, C)


@dtypes
@pytest.mark.parametrize("chunk", [64, 3])
def test_causal_fused_on_views_of_a_projection_vs_torch(monkeypatch, chunk, dtype, device):
    monkeypatch.setattr(attention, "CHUNK", chunk)
    check(FAMILY, lambda x: nanogpt_attention(F.scaled_dot_product_attention, x, 2),
          lambda x: nanogpt_attention(torch_sdpa, x, 2),
          randn(2, 7, 3 * 2 * 4, seed=5), dtype=dtype, device=device)


@pytest.mark.parametrize("q_shape, k_shape, v_shape, kw, is_fused", [
    ((2, 3, 5, 4), None, None, dict(is_causal=True), True),
    ((2, 3, 5, 4), None, None, dict(is_causal=True, scale=0.2, dropout_p=0.3), True),
    ((2, 3, 5, 4), None, None, dict(), False),                            # not causal
    ((2, 3, 5, 4), None, None, dict(is_causal=True, dropout_p=1.0), False),   # all dropped
    ((2, 3, 4, 4), (2, 3, 5, 4), None, dict(is_causal=True), False),      # L != S
    ((2, 3, 5, 4), None, (2, 3, 5, 6), dict(is_causal=True), False),      # Ev != E
    ((2, 3, 5, 4), (1, 3, 5, 4), None, dict(is_causal=True), False),      # broadcast batch
    ((3, 5, 4), None, None, dict(is_causal=True), False),                 # 3-D
    ((2, 3, 1, 4), (2, 3, 5, 4), None, dict(), True),                     # one query, every key
    ((2, 3, 1, 4), (2, 3, 5, 4), None, dict(dropout_p=0.2, scale=0.4), True),
    ((2, 3, 1, 4), (2, 3, 5, 4), None, dict(is_causal=True), False),      # torch: sees key 0 only
    ((2, 3, 2, 4), (2, 3, 5, 4), None, dict(), False),                    # two queries, no mask
    ((2, 3, 1, 4), (2, 3, 5, 4), (2, 3, 5, 6), dict(), False),            # Ev != E
    ((2, 3, 1, 4), (1, 3, 5, 4), None, dict(), False),                    # broadcast batch
])
def test_fused_path_is_taken_where_it_applies(q_shape, k_shape, v_shape, kw, is_fused):
    """The fused op runs for causal self-attention of 4-D q, k, v of one shape and for one
    query against every key of k, v of one shape, else the composition (the output's creator
    says which)."""
    q, k, v = (tt.Tensor(a, requires_grad=True) for a in qkv(q_shape, k_shape, v_shape))
    y = F.scaled_dot_product_attention(q, k, v, **kw)
    assert isinstance(y._ctx, fused.CausalAttention) == is_fused


def test_fused_path_not_taken_with_a_mask():
    """One query with an attn_mask (even one keeping every key) composes ops."""
    q, k, v = (tt.Tensor(a, requires_grad=True) for a in qkv((2, 3, 1, 4), (2, 3, 5, 4)))
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=np.ones((1, 5), dtype=bool))
    assert not isinstance(y._ctx, fused.CausalAttention)


# (B, nh, Tq, Tk, hs, chunk): queries that are the last Tq of Tk positions
LAST_QUERIES = [(2, 3, 1, 1, 4, 64), (2, 3, 1, 7, 4, 64), (1, 2, 1, 130, 8, 64),
                (2, 2, 3, 7, 4, 64), (1, 2, 5, 9, 3, 2), (2, 1, 4, 4, 2, 2)]


@dtypes
@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("shape", LAST_QUERIES, ids=lambda s: "x".join(map(str, s)))
def test_last_queries_vs_torch(monkeypatch, shape, scale, dtype, device):
    """fused.causal_attention of queries that are the last Tq of Tk positions (a generation
    step with a KV cache) against torch given the mask that says so: query i sees keys
    0 .. Tk - Tq + i (chunked where chunk <= Tq / 2)."""
    B, nh, Tq, Tk, hs, chunk = shape
    monkeypatch.setattr(attention, "CHUNK", chunk)
    mask = np.tril(np.ones((Tq, Tk), dtype=bool), k=Tk - Tq)

    def ours(q, k, v):
        return fused.causal_attention(q, k, v, scale=scale)

    def theirs(q, k, v):
        return torch_sdpa(q, k, v, attn_mask=torch.from_numpy(mask), scale=scale)
    check(FAMILY, ours, theirs, *qkv((B, nh, Tq, hs), (B, nh, Tk, hs)), dtype=dtype, device=device)


@dtypes
@pytest.mark.parametrize("shape", [(2, 3, 1, 9, 4, 64), (1, 2, 5, 9, 3, 2)])
def test_last_queries_dropout_equals_composed_path(monkeypatch, shape, dtype, device):
    """Queries at the end of the keys with dropout: the fused op and the composition given
    the same mask as attn_mask draw the same keep-mask and agree, output and gradients."""
    B, nh, Tq, Tk, hs, chunk = shape
    monkeypatch.setattr(attention, "CHUNK", chunk)
    arrays = [a.astype(dtype) for a in qkv((B, nh, Tq, hs), (B, nh, Tk, hs), seed=Tk)]
    g = randn(B, nh, Tq, hs, seed=1).astype(dtype)
    mask = np.tril(np.ones((Tq, Tk), dtype=bool), k=Tk - Tq)
    fused_run = run(lambda q, k, v: fused.causal_attention(q, k, v, 0.3), arrays, g, device,
                    seed=5)
    composed_run = run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, mask, 0.3),
                       arrays, g, device, seed=5)
    names = ("output", "query grad", "key grad", "value grad")
    for name, a, r in zip(names, fused_run, composed_run):
        close(a, r, dtype, name)


def test_fused_output_is_a_view_of_the_heads_side_by_side():
    """The accelerated attention's y (B, nh, T, hs) is a transposed view of a contiguous
    (B, T, nh, hs) array, and the gradients of q, k and v views of one (B, T, 3, nh, hs) array."""
    kernels.use(True)
    q, k, v = (tt.Tensor(a, requires_grad=True) for a in qkv((2, 3, 5, 4)))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert type(y._ctx) is attention.ChunkedAttention
    assert y.data.transpose(0, 2, 1, 3).flags.c_contiguous
    gq, gk, gv = y._ctx.backward(np.ones(y.shape))
    assert gq.base is not None and gq.base is gk.base is gv.base
    assert gq.base.shape == (2, 5, 3, 3, 4)                              # (B, T, 3, nh, hs)


# ---------------------------------------------------------------- the composed path
def _bool_mask(shape, seed, dead_row=None):
    """A random bool mask with every row's first key allowed, except row dead_row (all False)."""
    m = np.random.default_rng(seed).random(shape) > 0.4
    m[..., 0] = True
    if dead_row is not None:
        m[..., dead_row, :] = False
    return m


def _float_mask(shape, seed, dead_row=None):
    """A random float mask with some -inf (never a whole row, except row dead_row)."""
    m = randn(*shape, seed=seed)
    m[~_bool_mask(shape, seed + 1)] = -INF
    if dead_row is not None:
        m[..., dead_row, :] = -INF
    return m


B, H, L, S, E, EV = 2, 3, 4, 6, 5, 7
COMPOSED = {  # name: (q, k, v shapes, keyword arguments, attn_mask or None)
    "plain": ((B, H, L, E), (B, H, S, E), (B, H, S, EV), {}, None),
    "self": ((B, H, L, E), (B, H, L, E), (B, H, L, E), {}, None),
    "scale": ((B, H, L, E), (B, H, S, E), (B, H, S, EV), dict(scale=0.3), None),
    "causal_L<S": ((B, H, L, E), (B, H, S, E), (B, H, S, EV), dict(is_causal=True), None),
    "causal_L>S": ((B, H, S, E), (B, H, L, E), (B, H, L, EV), dict(is_causal=True), None),
    "causal_Ev": ((B, H, L, E), (B, H, L, E), (B, H, L, EV), dict(is_causal=True, scale=1.5), None),
    "3d_causal": ((B, L, E), (B, L, E), (B, L, E), dict(is_causal=True), None),
    "3d": ((B, L, E), (B, S, E), (B, S, EV), {}, None),
    "2d": ((L, E), (S, E), (S, EV), dict(is_causal=True), None),
    "broadcast_batch": ((B, H, L, E), (H, S, E), (1, H, S, EV), {}, None),
    "bool_mask_LS": ((B, H, L, E), (B, H, S, E), (B, H, S, EV), {}, _bool_mask((L, S), 1)),
    "bool_mask_1LS": ((B, H, L, E), (B, H, S, E), (B, H, S, EV), {}, _bool_mask((1, L, S), 2)),
    "bool_mask_B1LS": ((B, H, L, E), (B, H, S, E), (B, H, S, EV), {}, _bool_mask((B, 1, L, S), 3)),
    "bool_mask_full": ((B, H, L, E), (B, H, S, E), (B, H, S, EV), dict(scale=0.5),
                       _bool_mask((B, H, L, S), 4)),
    "bool_mask_row_L1": ((B, H, L, E), (B, H, S, E), (B, H, S, EV), {}, _bool_mask((1, S), 5)),
    "bool_mask_no_key": ((B, H, L, E), (B, H, S, E), (B, H, S, EV), {}, _bool_mask((L, S), 6, 1)),
    "float_mask_LS": ((B, H, L, E), (B, H, S, E), (B, H, S, EV), {}, _float_mask((L, S), 7)),
    "float_mask_B1LS": ((B, H, L, E), (B, H, S, E), (B, H, S, EV), {},
                        _float_mask((B, 1, L, S), 8)),
    "float_mask_no_key": ((B, H, L, E), (B, H, S, E), (B, H, S, EV), {}, _float_mask((L, S), 9, 2)),
    "3d_bool_mask": ((B, L, E), (B, S, E), (B, S, EV), {}, _bool_mask((B, L, S), 10, 0)),
    "no_keys": ((B, L, E), (B, 0, E), (B, 0, EV), {}, None),
    "no_queries": ((B, 0, E), (B, S, E), (B, S, EV), {}, None),
    "all_dropped": ((B, H, L, E), (B, H, L, E), (B, H, L, E), dict(is_causal=True, dropout_p=1.0),
                    None),
}


@dtypes
@pytest.mark.parametrize("name", list(COMPOSED))
def test_composed_vs_torch(name, dtype, device):
    """Output, and gradients of query, key, value and a float mask, against torch."""
    q_shape, k_shape, v_shape, kw, mask = COMPOSED[name]
    inputs = qkv(q_shape, k_shape, v_shape) + (() if mask is None else (mask,))
    check(FAMILY, *sdpa(**kw), *inputs, dtype=dtype, device=device)


def test_query_without_keys_gets_zeros_and_zero_gradients():
    """A query row that the mask leaves no key gets output 0 and no gradient (not NaN)."""
    q, k, v = (tt.Tensor(a, requires_grad=True) for a in qkv((2, 3, 4, 5), (2, 3, 6, 5)))
    mask = tt.Tensor(_bool_mask((4, 6), 0, dead_row=2))                  # a bool Tensor mask
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    y.sum().backward()
    assert np.all(y.numpy()[:, :, 2] == 0) and np.all(np.isfinite(y.numpy()))
    assert np.all(q.grad[:, :, 2] == 0) and np.all(np.isfinite(q.grad))
    assert np.all(np.isfinite(k.grad)) and np.all(np.isfinite(v.grad))


def test_float32_mask_on_float64_inputs_as_torch():
    """torch also takes a float32 mask with float64 inputs (the result is float64)."""
    q, k, v = qkv((2, 3, 4, 5), (2, 3, 6, 5))
    mask = _float_mask((4, 6), 3).astype(np.float32)
    y = F.scaled_dot_product_attention(*(tt.Tensor(a) for a in (q, k, v)), attn_mask=mask)
    ref = TF.scaled_dot_product_attention(*(torch.from_numpy(a) for a in (q, k, v)),
                                          attn_mask=torch.from_numpy(mask))
    assert y.dtype == np.float64
    np.testing.assert_allclose(y.numpy(), ref.numpy(), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- dropout
def composed_sdpa(q, k, v, mask, p):
    """The composition scaled_dot_product_attention stands for, from tinytensor ops."""
    att = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5               # (..., L, S)
    att = F.softmax(att.masked_fill(~mask, -INF), dim=-1)
    return F.dropout(att, p) @ v                                         # (..., L, Ev)


@dtypes
@pytest.mark.parametrize("shapes", [((2, 3, 4, 5), (2, 3, 6, 5), (2, 3, 6, 7)),
                                    ((3, 6, 4), (3, 6, 4), (3, 6, 2))])
def test_dropout_equals_composed_ops(shapes, dtype, device):
    """With dropout (torch's random stream differs), the same keep-mask as F.dropout draws."""
    arrays = [a.astype(dtype) for a in qkv(*shapes)]
    mask = _bool_mask((shapes[0][-2], shapes[1][-2]), 0)
    g = randn(*shapes[0][:-1], shapes[2][-1], seed=9).astype(dtype)
    ours = run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, mask, 0.3), arrays, g,
               device, seed=4)
    ref = run(lambda q, k, v: composed_sdpa(q, k, v, mask, 0.3), arrays, g, device, seed=4)
    for name, a, r in zip(("output", "query grad", "key grad", "value grad"), ours, ref):
        close(a, r, dtype, name)
    no_dropout = run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, mask), arrays, g,
                     device)
    assert not np.allclose(ours[0], no_dropout[0])                      # something was dropped


@dtypes
@pytest.mark.parametrize("shape", [(2, 3, 5, 4, 64), (3, 2, 9, 4, 4), (1, 2, 8, 2, 2)])
def test_fused_dropout_equals_composed_path(monkeypatch, shape, dtype, device):
    """is_causal=True (the fused op) and the same causal mask given as attn_mask (the
    composition): the same output and gradients, dropout included (the same keep-mask)."""
    B, nh, T, hs, chunk = shape
    monkeypatch.setattr(attention, "CHUNK", chunk)
    arrays = [a.astype(dtype) for a in qkv((B, nh, T, hs), seed=T)]
    g = randn(B, nh, T, hs, seed=1).astype(dtype)
    causal = np.tril(np.ones((T, T), dtype=bool))
    fused_run = run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, None, 0.3, True),
                    arrays, g, device, seed=5)
    composed_run = run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal, 0.3),
                       arrays, g, device, seed=5)
    names = ("output", "query grad", "key grad", "value grad")
    for name, a, r in zip(names, fused_run, composed_run):
        close(a, r, dtype, name)


# ---------------------------------------------------------------- float64 central differences
def _seeded(fn):
    def seeded(*args):
        tt.manual_seed(0)  # the same dropout mask at every evaluation
        return fn(*args)
    return seeded


def _sdpa(**kw):
    return sdpa(**kw)[0]


GRADCHECKS = {  # name: (fn, inputs, kernels.attention.CHUNK)
    "fused": (_sdpa(is_causal=True), qkv((2, 2, 5, 3)), 64),
    "fused_chunked": (_sdpa(is_causal=True), qkv((1, 2, 5, 3)), 2),
    "fused_scale": (_sdpa(is_causal=True, scale=0.7), qkv((2, 1, 4, 3)), 64),
    "fused_dropout": (_seeded(_sdpa(is_causal=True, dropout_p=0.4)), qkv((2, 2, 4, 2)), 64),
    "fused_dropout_chunked": (_seeded(_sdpa(is_causal=True, dropout_p=0.4)), qkv((1, 2, 5, 2)), 2),
    "fused_one_query": (_sdpa(scale=0.6), qkv((2, 2, 1, 3), (2, 2, 5, 3)), 64),
    "fused_one_query_dropout": (_seeded(_sdpa(dropout_p=0.4)), qkv((2, 2, 1, 3), (2, 2, 4, 3)), 64),
    "fused_last_queries_chunked": (_seeded(lambda q, k, v: fused.causal_attention(q, k, v, 0.3)),
                                   qkv((1, 2, 5, 3), (1, 2, 7, 3)), 2),
    "plain": (_sdpa(), qkv((2, 2, 3, 4), (2, 2, 5, 4), (2, 2, 5, 3)), 64),
    "causal_L<S": (_sdpa(is_causal=True), qkv((1, 2, 3, 4), (1, 2, 5, 4), (1, 2, 5, 3)), 64),
    "causal_L>S": (_sdpa(is_causal=True, scale=0.4), qkv((2, 5, 3), (2, 3, 3), (2, 3, 2)), 64),
    "2d": (_sdpa(), qkv((3, 4), (5, 4), (5, 2)), 64),
    "broadcast_batch": (_sdpa(), qkv((2, 2, 3, 4), (2, 5, 4), (1, 2, 5, 3)), 64),
    "bool_mask": (_sdpa(), qkv((2, 2, 4, 3), (2, 2, 5, 3)) + (_bool_mask((4, 5), 1, 2),), 64),
    "float_mask": (_sdpa(), qkv((2, 2, 4, 3), (2, 2, 5, 3)) + (_float_mask((2, 1, 4, 5), 2, 1),),
                   64),
    "dropout_mask": (_seeded(_sdpa(dropout_p=0.3)), qkv((2, 4, 3), (2, 5, 3))
                     + (_bool_mask((4, 5), 3),), 64),
}


@pytest.mark.parametrize("name", list(GRADCHECKS))
def test_gradcheck(monkeypatch, name, device):
    fn, inputs, chunk = GRADCHECKS[name]
    monkeypatch.setattr(attention, "CHUNK", chunk)
    gradcheck(fn, *inputs, atol=1e-7, rtol=1e-6, device=device)


# ---------------------------------------------------------------- errors, as torch's
class Raw:
    """An argument passed as it is to both libraries (not made a tensor)."""

    def __init__(self, value):
        self.value = value


def f32(*shape, dtype=np.float32):
    return np.ones(shape, dtype=dtype)


Q, K, V = f32(2, 3, 4, 5), f32(2, 3, 6, 5), f32(2, 3, 6, 7)
MASK = np.ones((4, 6), dtype=bool)
ERRORS = [  # (id, (q, k, v[, mask]), keywords, error, message)
    ("1-D", (f32(5), f32(5), f32(5)), {}, RuntimeError, "at least 2-D"),
    ("key dtype", (Q, K.astype(np.float64), V), {}, RuntimeError,
     "same dtype.*query.dtype: float32, key.dtype: float64"),
    ("value dtype", (Q, K, V.astype(np.float64)), {}, RuntimeError, "value.dtype: float64"),
    ("integers", (Q.astype(np.int64), K.astype(np.int64), V.astype(np.int64)), {}, RuntimeError,
     "floating-point"),
    ("E", (f32(2, 4, 5), f32(2, 6, 4), f32(2, 6, 7)), {}, RuntimeError, r"key \(\.\.\., S, E\)"),
    ("S", (f32(2, 4, 5), f32(2, 6, 5), f32(2, 5, 7)), {}, RuntimeError, r"value \(\.\.\., S, Ev\)"),
    ("batch", (f32(2, 4, 5), f32(3, 6, 5), f32(3, 6, 7)), {}, RuntimeError, "do not broadcast"),
    ("heads without gqa", (f32(2, 6, 4, 5), K, V), {}, RuntimeError, "do not broadcast"),
    ("mask and causal", (Q, K, V, MASK), dict(is_causal=True), RuntimeError,
     "should not be set when is_causal"),
    ("mask 1-D", (Q, K, V, np.ones(6, dtype=bool)), {}, IndexError, "at least 2 dimensions"),
    ("mask 0-D", (Q, K, V, np.array(True)), {}, IndexError, "at least 2 dimensions"),
    ("mask int", (Q, K, V, np.ones((4, 6), dtype=np.int64)), {}, RuntimeError, "attn_mask dtype"),
    ("mask float64 on float32", (Q, K, V, np.zeros((4, 6))), {}, RuntimeError,
     "attn_mask.dtype: float64 and query.dtype: float32"),
    ("mask shape", (Q, K, V, np.ones((5, 6), dtype=bool)), {}, RuntimeError, "does not broadcast"),
    ("mask widens the batch", (Q[:1], K[:1], V[:1], np.ones((2, 1, 4, 6), dtype=bool)), {},
     RuntimeError, "does not broadcast"),
    ("mask list", (Q, K, V, Raw([[True] * 6] * 4)), {}, TypeError, "attn_mask must be a Tensor"),
    ("dropout above 1", (Q, K, V), dict(dropout_p=1.5), RuntimeError, "between 0 and 1"),
    ("dropout negative", (Q, Q, Q), dict(dropout_p=-0.1), RuntimeError, "between 0 and 1"),
    ("dropout None", (Q, K, V), dict(dropout_p=None), TypeError, "dropout_p must be a float"),
    ("is_causal int", (Q, K, V), dict(is_causal=1), TypeError, "is_causal must be a bool"),
    ("scale str", (Q, K, V), dict(scale="a"), TypeError, "scale must be a float"),
    ("query array", (Raw(Q), K, V), {}, TypeError, "query must be a Tensor"),
]


@pytest.mark.parametrize("args, kw, error, match", [e[1:] for e in ERRORS],
                         ids=[e[0] for e in ERRORS])
def test_errors_as_torch(args, kw, error, match):
    """Each bad argument raises torch's error type, with a message that says what was wrong."""
    ours = [a.value if isinstance(a, Raw) else tt.Tensor(a) for a in args]
    theirs = [a.value if isinstance(a, Raw) else torch.from_numpy(a) for a in args]
    with pytest.raises(error, match=match):
        F.scaled_dot_product_attention(*ours, **kw)
    with pytest.raises(error):
        TF.scaled_dot_product_attention(*theirs, **kw)


def test_unsupported_grouped_query_attention():
    """enable_gqa=True, which torch supports, is refused (also where it would change nothing)."""
    q, k, v = (tt.Tensor(a) for a in (Q, K, V))
    with pytest.raises(NotImplementedError, match="enable_gqa=True"):
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    with pytest.raises(TypeError):  # scale and enable_gqa are keyword-only, as in torch
        F.scaled_dot_product_attention(q, k, v, None, 0.0, False, 0.5)


def test_fused_op_bad_input():
    q = tt.Tensor(f32(2, 3, 4, 5))
    for k_shape, v_shape in [((2, 3, 3, 5), (2, 3, 3, 5)),     # more queries than keys
                             ((2, 3, 6, 4), (2, 3, 6, 4)),     # another head size
                             ((2, 3, 6, 5), (2, 3, 7, 5)),     # key and value differ
                             ((1, 3, 6, 5), (1, 3, 6, 5))]:    # another batch
        with pytest.raises(ValueError, match="Tq <= Tk"):
            fused.causal_attention(q, tt.Tensor(f32(*k_shape)), tt.Tensor(f32(*v_shape)))
    with pytest.raises(ValueError, match="dropout probability"):
        fused.causal_attention(q, q, q, dropout_p=1.0)
