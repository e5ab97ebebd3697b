"""The fused ops (tinytensor/fused.py, and with the accelerators on their versions in
tinytensor/kernels/) against the compositions they replace, against PyTorch, and with float64
central differences; then the GPT with its fused ops on and off, AdamW's flat buffers, the
thread splits and malloc tuning."""
import numpy as np
import pytest
import torch

import tinytensor as tt
import tinytensor.fused as fused
import tinytensor.nn.functional as F
from tinytensor import backend, kernels
from tinytensor.gradcheck import gradcheck
from tinytensor.kernels import attention, threads
from torch_helper import check, dtypes, randn

# every test here runs with the accelerators off and on (conftest)
pytestmark = pytest.mark.usefixtures("accelerators")

# float64 results agree to rounding; float32 ones to a few ulps of the largest value
TOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 2e-6}


def close(ours, ref, dtype, what):
    ours, ref = backend.to_numpy(ours), backend.to_numpy(ref)
    err = np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30)
    assert err <= TOL[np.dtype(dtype)], f"{what}: relative error {err:.3g}"


# ---------------------------------------------------------------- attention
def projected_attention(qkv, n_head, p=0.0):
    """fused.causal_attention of q, k, v split from one projection qkv (B, T, 3C), as
    gpt.model.CausalSelfAttention gives them: views of qkv, the heads side by side after."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = (a.view(B, T, n_head, C // n_head).transpose(1, 2)          # each (B, nh, T, hs)
               for a in qkv.split(C, dim=2))
    return fused.causal_attention(q, k, v, p).transpose(1, 2).reshape(B, T, C)   # (B, T, C)


def function_types(t):
    """The types of the Functions in t's graph."""
    seen, stack = set(), [t]
    while stack:
        t = stack.pop()
        if t._ctx is not None:
            seen.add(type(t._ctx))
            stack.extend(p for p in t._ctx.parents if p is not None)
    return seen


def composed_attention(qkv, n_head, p=0.0):
    """The composition fused.causal_attention replaces, step by step from ops.py primitives."""
    B, T, C3 = qkv.shape
    hs = C3 // (3 * n_head)
    q, k, v = qkv.reshape(B, T, 3, n_head, hs).permute(2, 0, 3, 1, 4)     # each (B, nh, T, hs)
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    att = (q @ k.transpose(-2, -1) * hs ** -0.5).masked_fill(future, float("-inf"))
    att = F.softmax(att, dim=-1)                                           # (B, nh, T, T)
    att = F.dropout(att, p) if p > 0 else att
    return (att @ v).transpose(1, 2).reshape(B, T, n_head * hs)           # (B, T, C)


def torch_attention(qkv, n_head):
    """The lecture's Head/MultiHeadAttention core in PyTorch, head by head."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    out = []
    for h in range(n_head):
        q, k, v = (qkv[..., i * C + h * hs:i * C + (h + 1) * hs] for i in range(3))
        wei = (q @ k.transpose(-2, -1) * hs ** -0.5).masked_fill(~mask, float("-inf"))
        out.append(torch.softmax(wei, dim=-1) @ v)
    return torch.cat(out, dim=-1)


# (B, T, n_head, head_size, chunk): chunk < T / 2 runs the chunked path, T % chunk != 0 too
SHAPES = [(2, 5, 2, 3, 64), (3, 9, 2, 4, 4), (1, 8, 1, 2, 2)]


def _compare_with_composed(monkeypatch, shape, dtype, p, device):
    B, T, nh, hs, chunk = shape
    monkeypatch.setattr(attention, "CHUNK", chunk)
    x = randn(B, T, 3 * nh * hs, seed=T).astype(dtype)
    w = randn(B, T, nh * hs, seed=1).astype(dtype)
    results = []
    for fn in (lambda t: projected_attention(t, nh, p), lambda t: composed_attention(t, nh, p)):
        tt.manual_seed(5)  # the same dropout mask for both
        t = tt.Tensor(backend.to_device(x, device), requires_grad=True)
        y = fn(t)
        y.backward(backend.to_device(w, device))
        results.append((y.numpy(), t.grad))
    (y1, g1), (y2, g2) = results
    close(y1, y2, dtype, "output")
    close(g1, g2, dtype, "qkv gradient")


@dtypes
@pytest.mark.parametrize("shape", SHAPES)
def test_attention_equals_composition(monkeypatch, shape, dtype, device):
    _compare_with_composed(monkeypatch, shape, dtype, 0.0, device)


@dtypes
@pytest.mark.parametrize("shape", SHAPES[1:])
def test_attention_with_dropout_equals_composition(monkeypatch, shape, dtype, device):
    _compare_with_composed(monkeypatch, shape, dtype, 0.3, device)


@dtypes
@pytest.mark.parametrize("chunk", [64, 3])
def test_attention_vs_torch(monkeypatch, chunk, dtype, device):
    monkeypatch.setattr(attention, "CHUNK", chunk)
    check("fused_attention", lambda t: projected_attention(t, 2), lambda t: torch_attention(t, 2),
          randn(2, 7, 3 * 2 * 4, seed=3), dtype=dtype, device=device)


def _scores_qkv(kind, B=2, T=6, nh=2, hs=4):
    """qkv whose attention scores are moderate, huge (exp would overflow) or all very negative
    (exp would underflow to 0 in every row): the last two need softmax's max shift."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((B, T, 3, nh, hs))
    if kind != "moderate":
        a = rng.standard_normal(hs)
        a *= 40.0 / np.linalg.norm(a)                          # |a|^2 / sqrt(hs) = 800
        x[:, :, 0] += a                                        # queries
        x[:, :, 1] += a if kind == "huge" else -a              # keys: scores +-800
    return x.reshape(B, T, 3 * nh * hs)


@dtypes
@pytest.mark.parametrize("kind", ["moderate", "huge", "very negative"])
def test_attention_softmax_shift_is_skipped_only_when_safe(kind, dtype, device):
    """On NumPy the accelerated attention's causal softmax skips the row-max shift when the
    scores are in a safe range (kernels.attention.NO_SHIFT_MAX); out of it the shift must
    happen, or exp overflows to inf or every row sums to 0 and the result is NaN."""
    x = _scores_qkv(kind)
    if kind != "moderate":
        assert x.dtype == np.float64
    # scores of +-800 carry float32 rounding of ~800 * 6e-8 into exp: reported apart
    family = "fused_attention" if kind == "moderate" else "fused_attention, scores +-800"
    check(family, lambda t: projected_attention(t, 2), lambda t: torch_attention(t, 2),
          x, dtype=dtype, device=device)


def test_attention_softmax_without_shift_equals_with_it(monkeypatch):
    """Forcing the shift everywhere in the NumPy softmax of the accelerated attention gives the
    same result to rounding."""
    kernels.use(True)
    monkeypatch.setattr(attention, "numba_loops", lambda: None)  # the NumPy softmax, float32
    x = tt.Tensor(_scores_qkv("moderate").astype(np.float32), requires_grad=True)
    y1 = projected_attention(x, 2)
    assert attention.ChunkedAttention in function_types(y1)
    monkeypatch.setattr(attention, "NO_SHIFT_MAX", -np.inf)  # the checks always fail
    y2 = projected_attention(x, 2)
    close(y1.numpy(), y2.numpy(), np.float32, "output")


@pytest.mark.parametrize("chunk", [64, 2])
def test_attention_gradcheck(monkeypatch, chunk, device):
    monkeypatch.setattr(attention, "CHUNK", chunk)
    gradcheck(lambda t: projected_attention(t, 2), randn(2, 5, 3 * 2 * 3, seed=4), device=device)


def test_attention_gradcheck_with_dropout(device):
    def fn(t):
        tt.manual_seed(11)  # the same keep-mask at every evaluation
        return projected_attention(t, 2, p=0.4)
    gradcheck(fn, randn(2, 6, 3 * 2 * 2, seed=6), device=device)


def test_attention_dropout_drops_and_rescales():
    """With p > 0 some attention weights are zeroed and the rest scaled by 1 / (1 - p): with
    v = 1 every output is (kept weights' sum) / (1 - p), a row's sum being 1 without dropout."""
    B, T, nh, hs = 4, 32, 2, 1
    qkv = np.zeros((B, T, 3 * nh * hs), dtype=np.float32)
    qkv[..., 2 * nh * hs:] = 1.0                                  # v = 1: outputs sum the weights
    tt.manual_seed(0)
    y = projected_attention(tt.Tensor(qkv), nh, p=0.5).numpy()
    assert np.all((y >= 0) & (y <= 2.0 + 1e-5))
    assert 0.3 < np.mean(y[:, T // 2:]) / 1.0 < 1.7   # mean near 1: E[kept] / (1 - p) = 1
    assert not np.allclose(y, 1.0)                       # something was dropped
    y0 = projected_attention(tt.Tensor(qkv), nh, p=0.0).numpy()
    np.testing.assert_allclose(y0, 1.0, rtol=1e-6)


def test_keep_mask_is_F_dropout_mask():
    x = tt.Tensor(np.ones((5, 7), dtype=np.float32))
    tt.manual_seed(9)
    kept = F.dropout(x, 0.25).numpy() != 0
    tt.manual_seed(9)
    np.testing.assert_array_equal(fused.keep_mask((5, 7), 0.25), kept)


@pytest.mark.parametrize("n", [5, 1000, 100003])
@pytest.mark.parametrize("before", [0, 1, 2])
def test_parallel_dropout_draw_equals_one_draw(monkeypatch, n, before):
    """The keep-mask drawn in parallel parts (PCG64 jump-ahead) is bit for bit the single draw
    rng.random(n, float32) >= p, and leaves the stream where the single draw leaves it (also
    when the stream starts on a half-used 64-bit output: `before` odd)."""
    from tinytensor import random as tt_random
    from tinytensor.kernels import dropout
    monkeypatch.setattr(threads, "MIN_ELEMENTS", 0)
    monkeypatch.setattr(threads, "count", lambda: 3)
    runs = []
    for parallel_draw in (True, False):
        tt.manual_seed(42)
        tt_random.rng().random(before, dtype=np.float32)
        if parallel_draw:
            keep = dropout.keep_mask((n,), 0.3)
        else:
            keep = tt_random.rng().random(n, dtype=np.float32) >= 0.3
        runs.append((keep, tt_random.rng().random(5, dtype=np.float32)))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])   # the stream continues alike


@dtypes
def test_dropout_equals_composition(monkeypatch, dtype, device):
    """fused.dropout (F.dropout) equals x * (keep / (1 - p)) with the same keep-mask, forward
    and backward, also split over threads."""
    monkeypatch.setattr(threads, "MIN_ELEMENTS", 0)
    x = backend.to_device(randn(6, 5, 4, seed=3).astype(dtype), device)
    g = backend.to_device(randn(6, 5, 4, seed=4).astype(dtype), device)
    tt.manual_seed(2)
    t = tt.Tensor(x, requires_grad=True)
    y = F.dropout(t, 0.4)
    y.backward(g)
    tt.manual_seed(2)
    keep = fused.keep_mask(x.shape, 0.4, backend.get_array_module(x))
    mask = keep.astype(dtype) * (1.0 / 0.6)
    np.testing.assert_array_equal(y.numpy(), backend.to_numpy(x * mask))
    np.testing.assert_array_equal(backend.to_numpy(t.grad), backend.to_numpy(g * mask))
    assert 0 < keep.mean() < 1


def test_dropout_gradcheck(device):
    def fn(t):
        tt.manual_seed(8)  # the same mask at every evaluation
        return F.dropout(t, 0.3)
    gradcheck(fn, randn(4, 6, seed=5), device=device)


# ---------------------------------------------------------------- linear + relu
def _lin_inputs():
    x = randn(3, 4, 5, seed=8, low=0.05)
    return x, randn(6, 5, seed=9), randn(6, seed=10)


@dtypes
def test_linear_relu_vs_torch(dtype, device):
    check("fused_linear_relu", fused.linear_relu,
          lambda x, w, b: torch.relu(torch.nn.functional.linear(x, w, b)),
          *_lin_inputs(), dtype=dtype, device=device)


@dtypes
def test_linear_relu_equals_composition(dtype, device):
    x, w, b = (backend.to_device(a.astype(dtype), device) for a in _lin_inputs())
    g = backend.to_device(randn(3, 4, 6, seed=2).astype(dtype), device)
    results = []
    for fn in (fused.linear_relu, lambda x, w, b: F.relu(F.linear(x, w, b))):
        ts = [tt.Tensor(a, requires_grad=True) for a in (x, w, b)]
        y = fn(*ts)
        y.backward(g)
        results.append([y.data] + [t.grad for t in ts])
    for name, a, r in zip(("output", "x grad", "w grad", "b grad"), *results):
        close(a, r, dtype, name)


def test_linear_relu_gradcheck(device):
    gradcheck(fused.linear_relu, *_lin_inputs(), device=device)
    gradcheck(lambda x, w: fused.linear_relu(x, w), *_lin_inputs()[:2], device=device)


# ---------------------------------------------------------------- the whole model
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_gpt_fused_equals_composed(monkeypatch, dropout, device):
    """A training step's loss and every parameter gradient are the same with the fused ops
    (GPTConfig.fused: SDPA's fused attention and linear+ReLU) on and off."""
    import gpt.model as gm
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 11, (3, 8)), rng.integers(0, 11, (3, 8))
    runs = []
    for on in (True, False):
        cfg = gm.GPTConfig(vocab_size=11, block_size=8, n_embd=12, n_head=3, n_layer=2,
                           dropout=dropout, fused=on)
        tt.manual_seed(0)
        model = gm.GPTLanguageModel(cfg).astype(np.float64).to(device)
        _, loss = model(x, y)
        loss.backward()
        runs.append((loss.item(), {n: p.grad for n, p in model.named_parameters()}))
    (l1, g1), (l2, g2) = runs
    assert abs(l1 - l2) <= 1e-12 * abs(l2)
    for name in g2:
        close(g1[name], g2[name], np.float64, name)


# ---------------------------------------------------------------- flat buffers and AdamW
def _mlp(seed=0, dtype=np.float64):
    import tinytensor.nn as nn
    tt.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.LayerNorm(7), nn.Linear(7, 3)).astype(dtype)


def _groups(model):
    ps = list(model.parameters())
    return [{"params": [p for p in ps if p.ndim >= 2], "weight_decay": 0.1},
            {"params": [p for p in ps if p.ndim < 2], "weight_decay": 0.0}]


def _batches(n, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((6, 5)), rng.integers(0, 3, 6)) for _ in range(n)]


def _train(model, opt, batches, skip=None):
    for i, (x, y) in enumerate(batches):
        opt.zero_grad()
        F.cross_entropy(model(tt.Tensor(x)), y).backward()
        if skip is not None and i % 2:
            skip.grad = None  # this parameter has no gradient every other step
        opt.step()


def test_flat_parameters_views_and_gathered_gradients():
    from tinytensor.optim import FlatParameters
    model = _mlp()
    before = [p.data.copy() for p in model.parameters()]
    flat = FlatParameters(model.parameters())
    for p, b, v in zip(model.parameters(), before, flat.data_views):
        assert p.data is v and np.array_equal(p.data, b)       # values kept, now views
    x = tt.Tensor(np.ones((2, 5)))
    model(x).sum().backward()
    flat.gather_grads()
    for p, v in zip(model.parameters(), flat.grad_views):
        assert p.grad is not v and np.array_equal(v, p.grad)   # copied in (torch's p.grad kept)
    first = flat.grad.copy()
    model(x).sum().backward()                                   # accumulates into p.grad
    flat.gather_grads()
    np.testing.assert_allclose(flat.grad, 2 * first)
    model.zero_grad()
    model(x).sum().backward()                                   # a fresh p.grad after zero_grad
    flat.gather_grads(0, 2)                                     # the first two parameters only
    np.testing.assert_allclose(flat.grad[:flat.offsets[2]], first[:flat.offsets[2]])
    np.testing.assert_allclose(flat.grad[flat.offsets[2]:], 2 * first[flat.offsets[2]:])
    assert flat.intact()
    next(model.parameters()).data = np.zeros((7, 5))
    assert not flat.intact()
    with pytest.raises(ValueError, match="one dtype"):
        FlatParameters([tt.Tensor(np.ones(2), requires_grad=True),
                        tt.Tensor(np.ones(2, np.float32), requires_grad=True)])
    with pytest.raises(ValueError, match="twice"):
        p = tt.Tensor(np.ones(2), requires_grad=True)
        FlatParameters([p, p])


def test_adamw_builds_its_flat_buffers_when_constructed():
    """Right after AdamW(...) every p.data is a view into optimizer.flat (values kept); a step
    gathers the gradients into flat.grad and keeps the same buffers."""
    model = _mlp()
    before = [p.data.copy() for p in model.parameters()]
    opt = tt.optim.AdamW(_groups(model), lr=0.05)
    flat = opt.flat
    assert flat is not None and flat.intact()
    order = [p for g in opt.param_groups for p in g["params"]]
    assert [id(p) for p in flat.params] == [id(p) for p in order]
    for p, v in zip(flat.params, flat.data_views):
        assert p.data is v and np.shares_memory(p.data, flat.data)
    for p, b in zip(model.parameters(), before):
        np.testing.assert_array_equal(p.data, b)
    F.cross_entropy(model(tt.Tensor(_batches(1)[0][0])), _batches(1)[0][1]).backward()
    opt.step()
    for p, v in zip(flat.params, flat.grad_views):
        np.testing.assert_array_equal(v, p.grad)                # the step's gradients, gathered
    assert opt.flat is flat and flat.intact()
    assert np.shares_memory(opt.state[id(order[0])]["exp_avg"], opt.moments)  # flat moments


def test_adamw_rebuilds_its_flat_buffers_when_data_is_replaced():
    """Module.astype/to after building the optimizer replace p.data: the next step builds new
    buffers holding the new arrays, and the moments move along."""
    model = _mlp()
    opt = tt.optim.AdamW(model.parameters(), lr=0.05)
    _train(model, opt, _batches(1))
    old = opt.flat
    exp_avg = [opt.state[id(p)]["exp_avg"].copy() for p in model.parameters()]
    for p in model.parameters():
        p.data = p.data.copy()
    assert not old.intact()
    _train(model, opt, _batches(1, seed=1))
    flat = opt.flat
    assert flat is not old and flat.intact()
    assert all(p.data is v for p, v in zip(flat.params, flat.data_views))
    for p, m in zip(model.parameters(), exp_avg):
        assert np.shares_memory(opt.state[id(p)]["exp_avg"], opt.moments)
        assert not np.array_equal(opt.state[id(p)]["exp_avg"], m)  # the moments went on


@pytest.mark.parametrize("skip_one", [False, True])
def test_adamw_flat_step_equals_per_parameter_step(monkeypatch, skip_one):
    """The flat path (one kernel per group) and the per-parameter path give bitwise the same
    parameters and optimizer state, also when a parameter lacks a gradient on some steps."""
    results = []
    for flat in (True, False):
        model = _mlp()
        opt = tt.optim.AdamW(_groups(model), lr=0.05)
        if not flat:
            opt.flat = None  # every parameter updated on its own, with moments of its own
        skip = list(model.parameters())[1] if skip_one else None
        _train(model, opt, _batches(6), skip=skip)
        results.append(([p.data.copy() for p in model.parameters()], opt.state_dict()))
    (p1, s1), (p2, s2) = results
    for a, b in zip(p1, p2):
        np.testing.assert_array_equal(a, b)
    for i in s2["state"]:
        assert s1["state"][i]["step"] == s2["state"][i]["step"]
        np.testing.assert_array_equal(s1["state"][i]["exp_avg_sq"], s2["state"][i]["exp_avg_sq"])


def test_adamw_flat_resume_and_replaced_data():
    """Loading a state dict and replacing p.data (as Module.to does) both keep the update exact."""
    first, then = _batches(3), _batches(3, seed=1)
    ref = _mlp()
    opt = tt.optim.AdamW(_groups(ref), lr=0.05)
    _train(ref, opt, first)
    saved_params = {k: v.copy() for k, v in ref.state_dict().items()}
    saved_opt = opt.state_dict()
    _train(ref, opt, then)

    model = _mlp(seed=5)
    model.load_state_dict(saved_params)
    opt2 = tt.optim.AdamW(_groups(model), lr=0.05)
    opt2.load_state_dict(saved_opt)
    _train(model, opt2, then[:1])
    for p in model.parameters():  # what Module.to() and astype() do: new arrays
        p.data = p.data.copy()
    _train(model, opt2, then[1:])
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_adamw_mixed_dtypes_takes_the_per_parameter_path():
    a = tt.Tensor(np.ones(3), requires_grad=True)
    b = tt.Tensor(np.ones(2, np.float32), requires_grad=True)
    opt = tt.optim.AdamW([a, b], lr=0.1, weight_decay=0.0)
    (a.sum() + b.sum()).backward()
    opt.step()
    assert opt.flat is None
    np.testing.assert_allclose(a.data, 0.9)  # Adam's first step moves by lr * sign(grad)
    np.testing.assert_allclose(b.data, 0.9, rtol=1e-6)


# ---------------------------------------------------------------- threads and malloc
def test_for_ranges_covers_restores_and_raises():
    seen = []
    out = np.zeros(10)

    def fill(a, b):
        seen.append((a, b))
        out[a:b] = np.arange(a, b)
        threads.for_ranges(3, lambda c, d: None)  # nested: runs inline
    before = threads.count()
    threads.for_ranges(10, fill, parts=3)
    assert sorted(seen) == [(0, 3), (3, 6), (6, 10)]
    np.testing.assert_array_equal(out, np.arange(10))
    assert threads.count() == before                    # BLAS threads restored
    seen.clear()
    threads.for_ranges(200, lambda a, b: seen.append((a, b)), parts=3, align=64)
    assert sorted(seen) == [(0, 64), (64, 128), (128, 200)]   # inner bounds on multiples of 64

    def boom(a, b):
        if a > 0:
            raise KeyError("part failed")
    with pytest.raises(KeyError, match="part failed"):
        threads.for_ranges(4, boom, parts=2)
    assert threads.count() == before


_QUIET_BLAS = """
import os, sys, numpy as np
from tinytensor.kernels import threads
lib = [c for c in threads._controllers() if c.internal_api == "openblas"][0].dynlib
before = lib.openblas_thread_timeout()
threads.for_ranges(4, lambda a, b: None, parts=1)      # no split: BLAS left alone
unsplit = (threads._quiet, lib.openblas_thread_timeout())
threads.for_ranges(4, lambda a, b: None, parts=2)
a = np.random.default_rng(0).standard_normal((300, 300))
print(before, *unsplit, threads._quiet, lib.openblas_thread_timeout(), threads.count(),
      os.environ.get("OPENBLAS_THREAD_TIMEOUT"), bool(np.allclose(a @ a, np.einsum("ij,jk", a, a))))
"""


@pytest.mark.parametrize("env", [None, "12"])
def test_first_thread_split_lets_openblas_threads_sleep(env):
    """The first for_ranges that splits work sets OpenBLAS's thread timeout to its smallest
    (its idle threads would spin on the cores our threads need), once, leaving the environment
    and BLAS's thread count as they were, products still right; a timeout the environment
    sets is left alone. In a fresh process (the setting lasts for the process)."""
    import subprocess
    import sys
    from threadpoolctl import threadpool_info
    if not any(i["internal_api"] == "openblas" for i in threadpool_info()):
        pytest.skip("NumPy's BLAS is not OpenBLAS here")
    env_vars = dict(__import__("os").environ, OPENBLAS_NUM_THREADS="2")
    env_vars.pop("OPENBLAS_THREAD_TIMEOUT", None)
    if env is not None:
        env_vars["OPENBLAS_THREAD_TIMEOUT"] = env
    out = subprocess.run([sys.executable, "-c", _QUIET_BLAS], capture_output=True, text=True,
                         env=env_vars, check=True).stdout.split()
    if env is None:
        assert out == ["0", "None", "0", "True", str(threads.BLAS_THREAD_TIMEOUT), "2", "None", "True"]
    else:
        assert out == [env, "None", env, "False", env, "2", env, "True"]


def test_attention_in_parallel_parts_equals_serial(monkeypatch):
    """The accelerated attention's batch split over threads (threads.for_ranges) gives the
    serial result exactly."""
    kernels.use(True)
    x = randn(4, 9, 3 * 2 * 4, seed=12).astype(np.float32)
    g = randn(4, 9, 2 * 4, seed=13).astype(np.float32)
    monkeypatch.setattr(attention, "CHUNK", 4)
    outs = []
    for threshold, cache in ((0, 1 << 17), (1 << 60, 1 << 17), (0, 1)):  # 1: one batch row per block
        monkeypatch.setattr(threads, "MIN_ELEMENTS", threshold)
        monkeypatch.setattr(attention, "MIN_SCORES", threshold)
        monkeypatch.setattr(threads, "count", lambda: 2)
        monkeypatch.setattr(threads, "CACHE_ELEMENTS", cache)
        tt.manual_seed(3)
        t = tt.Tensor(x, requires_grad=True)
        y = projected_attention(t, 2, 0.25)
        assert attention.ChunkedAttention in function_types(y)
        y.backward(g)
        outs.append((y.numpy(), t.grad))
    for other in outs[1:]:
        np.testing.assert_array_equal(other[0], outs[0][0])
        np.testing.assert_array_equal(other[1], outs[0][1])


_OPTIMIZER_TUNES = """
import sys, tinytensor as tt, tinytensor.malloc as m
imported = m.tuned
w = tt.zeros(3, requires_grad=True)
model_made = m.tuned                          # tensors and models leave it alone
if sys.argv[1] == "off":
    m.automatic = False
tt.optim.{opt}([w], lr=0.1)
print(imported, model_made, m.tuned)
"""


@pytest.mark.parametrize("opt", ["AdamW", "SGD"])
@pytest.mark.parametrize("setting", ["default", "off"])
def test_malloc_is_tuned_by_the_first_optimizer_not_by_import(opt, setting):
    """import tinytensor leaves malloc alone (in a fresh process); the first optimizer tunes it
    (a loop written with the library is as fast as train.py), unless malloc.automatic is False
    (train.py's --malloc_tuning false: tests/test_train.py)."""
    import platform
    import subprocess
    import sys
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    out = subprocess.run([sys.executable, "-c", _OPTIMIZER_TUNES.replace("{opt}", opt), setting],
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", str(glibc and setting == "default")]


def test_malloc_keep_freed_memory_tunes_it_at_any_time():
    import platform
    import subprocess
    import sys
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    code = ("import tinytensor, tinytensor.malloc as m; m.automatic = False; before = m.tuned; "
            "print(before, m.keep_freed_memory(), m.tuned)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", str(glibc), str(glibc)]


def test_malloc_automatic_must_be_a_bool(monkeypatch):
    import tinytensor as tt
    import tinytensor.malloc as m
    monkeypatch.setattr(m, "automatic", "no")
    with pytest.raises(TypeError, match="malloc.automatic must be True or False, got 'no'"):
        tt.optim.AdamW([tt.zeros(2, requires_grad=True)])


_REUSE_SCRIPT = """
import resource, numpy as np, tinytensor.malloc as m, tinytensor

m.keep_freed_memory()
def step():  # 3 GB in 100 MB temporaries, as a lecture-preset step's activations
    arrays = [np.ones(25_000_000, np.float32) for _ in range(30)]
    del arrays
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
print(m.tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc malloc only")
def test_malloc_tuning_reuses_more_than_2gb_of_temporaries():
    """A second 'step' of 3 GB of freed-and-reallocated temporaries page-faults nothing: the
    heap is never trimmed (a trim threshold of even 2 GiB returned it all every step)."""
    import platform
    import subprocess
    import sys
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc malloc only")
    out = subprocess.run([sys.executable, "-c", _REUSE_SCRIPT], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == "True"
    faults = int(out[1])
    assert faults < 1_000, f"{faults} page faults (~{faults * 4 // 1024} MB) re-allocating 3 GB"


@pytest.mark.parametrize("n", [2, 4])
def test_allreduce_sums_adamw_flat_buffer_in_place(n):
    """Under mpirun: allreduce_gradients on flat-buffer parameters (tests/mpi/check_flat_allreduce.py)."""
    from test_distributed import expect_ok, run_mpi
    expect_ok(run_mpi(n, "check_flat_allreduce.py", "--bucket_mb", "5e-4"), f"{n} ranks")


@pytest.mark.parametrize("shape", [(7, 33, 16), (3000, 5)])
def test_layer_norm_threads_equal_serial(monkeypatch, shape):
    """F.layer_norm with the accelerators on, its rows over 1, 2 or 3 threads: bit for bit the
    serial result (row ranges start on SUM_BLOCK boundaries; tests/test_kernels_cpu.py checks
    the loops themselves)."""
    rng = np.random.default_rng(0)
    x, g = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    w, b = (rng.standard_normal(shape[-1]).astype(np.float32) for _ in range(2))
    outs = []
    for threshold, parts in ((1 << 60, 1), (0, 2), (0, 3)):
        monkeypatch.setattr(threads, "MIN_ELEMENTS", threshold)
        monkeypatch.setattr(threads, "count", lambda parts=parts: parts)
        ts = [tt.Tensor(a, requires_grad=True) for a in (x, w, b)]
        y = F.layer_norm(ts[0], shape[-1], ts[1], ts[2])
        y.backward(g)
        outs.append([y.numpy()] + [t.grad for t in ts])
    for other in outs[1:]:
        for a, ref in zip(other, outs[0]):
            np.testing.assert_array_equal(a, ref)
