"""The CUDA kernels of tinytensor.kernels and the references they are checked against.

1. The references against PyTorch (float64 to 1e-10, float32 to 1e-5, relative to the largest
   magnitude), against tinytensor's composed ops and, for each backward, against float64
   central differences: the reference classes of tinytensor.fused (LayerNorm, CrossEntropy,
   LinearReLU, CausalAttention, AdamWUpdate) called on arrays, and the attention's causal
   softmax on NumPy (kernels/attention.py: causal_softmax_ and causal_softmax_backward_).
2. Each CUDA kernel (the *_cuda launch functions of kernels/layernorm.py, cross_entropy.py,
   linear.py, attention.py and adamw.py) against the reference class of its op, or against
   PyTorch where the kernel computes what no reference class returns (the row means and
   log-sum-exps, the causal softmax alone, bias + ReLU + dropout), once per device of the
   `kernel_device` fixture: 'emulated' runs the real CUDA source on the CPU (see
   tests/cuda_emulator.py; needs g++), 'cuda' runs it on a GPU (skipped without one).
3. The CUDA sources compile with nvcc (where nvcc is installed), every instantiation.
"""
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

import tinytensor as tt
import tinytensor.nn.functional as F
from tinytensor import backend, fused, kernels as K
from tinytensor.kernels import adamw, attention, cross_entropy, layernorm, linear
import cuda_emulator as _emulator

TOL = {np.float64: 1e-10, np.float32: 1e-5}
DTYPES = [np.float64, np.float32]


def rel_err(a, b):
    """Largest absolute difference relative to the largest magnitude of the expected b."""
    a, b = np.asarray(backend.to_numpy(a), dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != expected {b.shape}"
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)) if b.size else 0.0


def check(name, got, want, dtype):
    err = rel_err(backend.to_numpy(got), backend.to_numpy(want))
    assert err <= TOL[dtype], f"{name}: relative error {err:.3g} > {TOL[dtype]:g}"


def rng_arrays(seed, dtype, *shapes):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def t64(a, dtype, grad=False):
    """A torch tensor of a with the torch dtype matching the numpy dtype."""
    tdtype = torch.float64 if dtype == np.float64 else torch.float32
    return torch.tensor(np.asarray(a), dtype=tdtype, requires_grad=grad)


def numeric_grad(f, x, gy, h=1e-6):
    """Central differences of sum(f(x) * gy) with respect to x (float64)."""
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        up = float((f(x) * gy).sum())
        x[i] = old - h
        down = float((f(x) * gy).sum())
        x[i] = old
        g[i] = (up - down) / (2 * h)
    return g


def assert_fd(name, analytic, numeric):
    err = np.abs(analytic - numeric).max() / max(np.abs(numeric).max(), 1e-12)
    assert err < 1e-6, f"{name}: finite-difference relative error {err:.3g}"


def reference(op, inputs, gy=None, **kwargs):
    """The reference class `op` of tinytensor.fused on arrays: (its output, and with gy its
    backward's gradients, one per input; inputs None or not floating point get none)."""
    f = op()
    f.needs_grad = [a is not None and a.dtype.kind == "f" for a in inputs]
    y = f.forward(*inputs, **kwargs)
    if gy is None:
        return y
    return y, f.backward(gy)


def ref_forward(op, **kwargs):
    """x -> the output of the reference op on inputs (x, *rest): for numeric_grad."""
    return lambda *inputs: reference(op, inputs, **kwargs)


# =========================================================== causal softmax (attention)
def torch_causal_softmax(s, gy, scale, dtype):
    """softmax(scale * s) over the last axis, query i of Tq seeing keys 0 .. Tk - Tq + i, and
    the gradient of s for the output gradient gy: PyTorch's."""
    st = t64(s, dtype, grad=True)
    Tq, Tk = s.shape[-2:]
    future = torch.triu(torch.ones(Tq, Tk, dtype=torch.bool), Tk - Tq + 1)
    y = torch.softmax((st * scale).masked_fill(future, float("-inf")), dim=-1)
    y.backward(t64(gy, dtype))
    return y.detach().numpy(), st.grad.numpy()


@pytest.fixture(params=["numpy", "compiled"])
def cpu_softmax(request, monkeypatch):
    """The CPU path of attention.causal_softmax_ / causal_softmax_backward_: NumPy, or the
    compiled loops (skipped without numba)."""
    if request.param == "numpy":
        monkeypatch.setattr(attention, "numba_loops", lambda: None)
    elif K.numba_loops() is None:
        pytest.skip("numba is not installed: the compiled CPU loops")
    return request.param


def cpu_causal_softmax(s, gy, scale):
    """(y, gs) of the attention's CPU causal softmax with the scale folded in as the CUDA
    kernel folds it: y = softmax(scale * s), gs = scale * y * (gy - sum(gy * y))."""
    y = attention.causal_softmax_(s * s.dtype.type(scale))
    gs = attention.causal_softmax_backward_(gy.copy(), y)
    gs *= gs.dtype.type(scale)
    return y, gs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 5, 5), (1, 2, 40, 40), (7, 7), (1, 1, 1, 1),
                                   (2, 3, 4, 9), (2, 3, 1, 6)])
def test_causal_softmax_on_the_cpu_matches_torch(cpu_softmax, dtype, shape):
    s, gy = rng_arrays(0, dtype, shape, shape)
    scale = 0.37
    y, gs = cpu_causal_softmax(s, gy, scale)
    y_t, gs_t = torch_causal_softmax(s, gy, scale, dtype)
    assert y.dtype == dtype and gs.dtype == dtype
    check("y", y, y_t, dtype)
    check("gs", gs, gs_t, dtype)
    Tq, Tk = shape[-2:]
    assert np.all(y[..., np.triu(np.ones((Tq, Tk), bool), Tk - Tq + 1)] == 0)


def test_causal_softmax_on_the_cpu_matches_composed_tinytensor(cpu_softmax):
    s, gy = rng_arrays(1, np.float64, (2, 2, 9, 9), (2, 2, 9, 9))
    scale = 0.5
    st = tt.tensor(s, requires_grad=True)
    future = np.triu(np.ones((9, 9), bool), 1)
    y = (st * scale).masked_fill(future, float("-inf")).softmax(-1)
    y.backward(gy)
    y_cpu, gs_cpu = cpu_causal_softmax(s, gy, scale)
    check("y", y_cpu, y.numpy(), np.float64)
    check("gs", gs_cpu, st.grad, np.float64)


def test_causal_softmax_backward_finite_differences(monkeypatch):
    monkeypatch.setattr(attention, "numba_loops", lambda: None)
    s, gy = rng_arrays(2, np.float64, (1, 2, 4, 4), (1, 2, 4, 4))
    scale = 0.8
    analytic = cpu_causal_softmax(s, gy, scale)[1]
    numeric = numeric_grad(lambda a: attention.causal_softmax_(a * scale), s.copy(), gy)
    assert_fd("causal softmax", analytic, numeric)


def test_causal_softmax_on_the_cpu_writes_in_place(cpu_softmax):
    s, gy = rng_arrays(47, np.float64, (3, 5, 5), (3, 5, 5))
    y_t, gs_t = torch_causal_softmax(s, gy, 1.0, np.float64)
    assert attention.causal_softmax_(s) is s
    check("y in place", s, y_t, np.float64)
    assert attention.causal_softmax_backward_(gy, s) is gy
    check("gs in place", gy, gs_t, np.float64)


# =========================================================== causal attention
def torch_attention(q, k, v, gy, scale, dtype):
    qt, kt, vt = (t64(a, dtype, True) for a in (q, k, v))
    y = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale)
    y.backward(t64(gy, dtype))
    return y.detach().numpy(), [t.grad.numpy() for t in (qt, kt, vt)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,scale", [((2, 3, 9, 4), 0.5), ((1, 2, 40, 8), 8 ** -0.5),
                                         ((3, 1, 2, 5), 1.0)])
def test_causal_attention_ref_matches_torch(dtype, shape, scale):
    q, k, v, gy = rng_arrays(3, dtype, shape, shape, shape, shape)
    y, grads = reference(fused.CausalAttention, (q, k, v), gy, scale=scale)
    y_t, grads_t = torch_attention(q, k, v, gy, scale, dtype)
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    check("y", y, y_t, dtype)
    for name, g, g_t in zip("qkv", grads, grads_t):
        check(f"g{name}", g, g_t, dtype)


def test_causal_attention_ref_matches_composed_tinytensor():
    q, k, v, gy = rng_arrays(4, np.float64, *[(2, 2, 9, 3)] * 4)
    scale = 0.5
    qt, kt, vt = (tt.tensor(a, requires_grad=True) for a in (q, k, v))
    future = np.triu(np.ones((9, 9), bool), 1)
    att = (qt @ kt.transpose(-2, -1) * scale).masked_fill(future, float("-inf")).softmax(-1)
    yt = att @ vt
    yt.backward(gy)
    y, grads = reference(fused.CausalAttention, (q, k, v), gy, scale=scale)
    check("y", y, yt.numpy(), np.float64)
    for name, g, t in zip("qkv", grads, (qt, kt, vt)):
        check(f"g{name}", g, t.grad, np.float64)


@pytest.mark.parametrize("accelerators", [False, True])
def test_causal_attention_op_matches_ref_in_chunks(monkeypatch, accelerators):
    """F.scaled_dot_product_attention(is_causal=True) (the op: chunked queries, each chunk a
    (Tq, Tk) causal softmax with Tq < Tk, when accelerated) equals the reference on arrays."""
    monkeypatch.setattr(attention, "CHUNK", 3)
    K.use(accelerators)
    q, k, v, gy = rng_arrays(5, np.float32, *[(2, 2, 9, 4)] * 4)
    ts = [tt.tensor(a, requires_grad=True) for a in (q, k, v)]
    y = F.scaled_dot_product_attention(*ts, is_causal=True, scale=0.3)
    y.backward(gy)
    y_ref, grads = reference(fused.CausalAttention, (q, k, v), gy, scale=0.3)
    check("y", y.numpy(), y_ref, np.float32)
    for name, g, t in zip("qkv", grads, ts):
        check(f"g{name}", t.grad, g, np.float32)


def test_causal_attention_backward_finite_differences():
    q, k, v, gy = rng_arrays(6, np.float64, *[(1, 2, 4, 3)] * 4)
    _, (gq, gk, gv) = reference(fused.CausalAttention, (q, k, v), gy, scale=0.8)
    att = ref_forward(fused.CausalAttention, scale=0.8)
    assert_fd("gq", gq, numeric_grad(lambda a: att(a, k, v), q.copy(), gy))
    assert_fd("gk", gk, numeric_grad(lambda a: att(q, a, v), k.copy(), gy))
    assert_fd("gv", gv, numeric_grad(lambda a: att(q, k, a), v.copy(), gy))


# =========================================================== layer norm
def torch_layer_norm(x, w, b, gy, dtype, eps=1e-5):
    """PyTorch's (y, mean, rstd, gx, gw, gb) of layer norm over the last axis (gw, gb None
    without w, b); mean and rstd have shape x.shape[:-1]."""
    C = x.shape[-1]
    xt = t64(x, dtype, True)
    wt, bt = (None if a is None else t64(a, dtype, True) for a in (w, b))
    yt, mt, rt = torch.native_layer_norm(xt, (C,), wt, bt, eps)
    yt.backward(t64(gy, dtype))
    return (yt.detach().numpy(), mt.detach().reshape(x.shape[:-1]).numpy(),
            rt.detach().reshape(x.shape[:-1]).numpy(), xt.grad.numpy(),
            None if wt is None else wt.grad.numpy(), None if bt is None else bt.grad.numpy())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 8), (2, 3, 37), (1, 3)])
def test_layer_norm_ref_matches_torch(dtype, shape):
    C = shape[-1]
    x, w, b, gy = rng_arrays(3, dtype, shape, (C,), (C,), shape)
    x = x * 3 + 1.5                               # a non-zero mean and spread
    f = fused.LayerNorm()
    f.needs_grad = [True, True, True]
    y = f.forward(x, w, b, eps=1e-5)
    rstd = f.rstd.reshape(shape[:-1])             # kept for backward, (..., 1)
    gx, gw, gb = f.backward(gy)
    y_t, _, rstd_t, gx_t, gw_t, gb_t = torch_layer_norm(x, w, b, gy, dtype)
    for name, got, want in (("y", y, y_t), ("rstd", rstd, rstd_t), ("gx", gx, gx_t),
                            ("gw", gw, gw_t), ("gb", gb, gb_t)):
        assert got.dtype == dtype, name
        check(name, got, want, dtype)


def test_layer_norm_ref_without_affine_matches_torch():
    x, gy = rng_arrays(4, np.float64, (3, 6), (3, 6))
    y, (gx, gw, gb) = reference(fused.LayerNorm, (x, None, None), gy)
    assert gw is None and gb is None
    xt = t64(x, np.float64, True)
    yt = torch.nn.functional.layer_norm(xt, (6,))
    yt.backward(t64(gy, np.float64))
    check("y", y, yt.detach().numpy(), np.float64)
    check("gx", gx, xt.grad.numpy(), np.float64)


def test_layer_norm_ref_matches_composed_tinytensor():
    x, w, b, gy = rng_arrays(5, np.float64, (2, 5, 12), (12,), (12,), (2, 5, 12))
    xt, wt, bt = (tt.tensor(a, requires_grad=True) for a in (x, w, b))
    xc = xt - xt.mean(-1, keepdim=True)           # layer norm composed of primitive ops
    yt = xc / ((xc * xc).mean(-1, keepdim=True) + 1e-5).sqrt() * wt + bt
    yt.backward(gy)
    y, (gx, gw, gb) = reference(fused.LayerNorm, (x, w, b), gy, eps=1e-5)
    for name, got, want in (("y", y, yt), ("gx", gx, xt.grad), ("gw", gw, wt.grad),
                            ("gb", gb, bt.grad)):
        check(name, got, backend.to_numpy(want.data if isinstance(want, tt.Tensor) else want),
              np.float64)


def test_layer_norm_backward_finite_differences():
    x, w, b, gy = rng_arrays(6, np.float64, (3, 5), (5,), (5,), (3, 5))
    _, (gx, gw, gb) = reference(fused.LayerNorm, (x, w, b), gy)
    ln = ref_forward(fused.LayerNorm)
    assert_fd("gx", gx, numeric_grad(lambda a: ln(a, w, b), x.copy(), gy))
    assert_fd("gw", gw, numeric_grad(lambda a: ln(x, a, b), w.copy(), gy))
    assert_fd("gb", gb, numeric_grad(lambda a: ln(x, w, a), b.copy(), gy))


# =========================================================== cross-entropy
def ce_inputs(seed, dtype, N=12, C=65):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((N, C)) * 3).astype(dtype)
    targets = rng.integers(0, C, N)
    targets[1::4] = -100                          # ignored rows: 1, 5, 9, ...
    return logits, targets


def ce_ref(logits, targets, gy, reduction="none"):
    """The reference's (loss, gx) for the output gradient gy (a number for 'mean' and 'sum')."""
    loss, (gx, _) = reference(fused.CrossEntropy, (logits, targets),
                              np.asarray(gy, dtype=logits.dtype), reduction=reduction)
    return loss, gx


def torch_logsumexp(logits, dtype):
    return torch.logsumexp(t64(logits, dtype), 1).numpy()


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_ref_matches_torch(dtype):
    logits, targets = ce_inputs(7, dtype)
    gloss = np.random.default_rng(8).standard_normal(len(targets)).astype(dtype)
    loss, gx = ce_ref(logits, targets, gloss)

    xt = t64(logits, dtype, True)
    lt = torch.nn.functional.cross_entropy(xt, torch.tensor(targets), reduction="none",
                                           ignore_index=-100)
    lt.backward(t64(gloss, dtype))
    assert loss.dtype == dtype and gx.dtype == dtype
    check("loss", loss, lt.detach().numpy(), dtype)
    check("gx", gx, xt.grad.numpy(), dtype)
    assert loss[1] == 0 and np.all(gx[[1, 5]] == 0)


def test_cross_entropy_ref_mean_scale_matches_torch():
    logits, targets = ce_inputs(9, np.float32)
    count = np.count_nonzero(targets != -100)
    loss, _ = ce_ref(logits, targets, np.ones(len(targets)))
    mean, gx = ce_ref(logits, targets, 1.0, reduction="mean")
    xt = t64(logits, np.float32, True)
    lt = torch.nn.functional.cross_entropy(xt, torch.tensor(targets))
    lt.backward()
    check("mean loss", np.float32(loss.sum() / count), lt.detach().numpy(), np.float32)
    check("mean loss (reduction)", mean, lt.detach().numpy(), np.float32)
    check("gx", gx, xt.grad.numpy(), np.float32)


def test_cross_entropy_ref_matches_composed_tinytensor():
    logits, targets = ce_inputs(10, np.float64)
    xt = tt.tensor(logits, requires_grad=True)
    lt = F.cross_entropy(xt, targets)
    lt.backward()
    loss, _ = ce_ref(logits, targets, np.ones(len(targets)))
    count = np.count_nonzero(targets != -100)
    check("loss", loss.sum() / count, lt.numpy(), np.float64)
    check("gx", ce_ref(logits, targets, np.full(len(targets), 1.0 / count))[1], xt.grad,
          np.float64)


def test_cross_entropy_backward_finite_differences():
    logits, targets = ce_inputs(11, np.float64, N=4, C=5)
    gloss = np.random.default_rng(12).standard_normal(4)
    _, gx = ce_ref(logits, targets, gloss)
    ce = ref_forward(fused.CrossEntropy, reduction="none")
    numeric = numeric_grad(lambda a: ce(a, targets), logits.copy(), gloss)
    assert_fd("gx", gx, numeric)


def test_cross_entropy_rejects_out_of_range_targets():
    """F.cross_entropy checks the targets (the kernel cannot raise: it flags them with NaN);
    the launch function checks the shapes before it launches."""
    logits, targets = ce_inputs(13, np.float32)
    targets[3] = 65
    with pytest.raises(IndexError, match="target 65 is out of range"):
        F.cross_entropy(tt.tensor(logits), targets)
    with pytest.raises(IndexError):
        ce_ref(logits, targets, np.ones(len(targets)))
    with pytest.raises(ValueError, match=r"targets must have shape \(12,\)"):
        cross_entropy.cross_entropy_forward_cuda(logits, targets[:5])


# =========================================================== AdamW
HYPER = [dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01),
         dict(lr=3e-2, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hp", HYPER)
def test_adamw_ref_matches_torch(dtype, hp):
    p0, *grads = rng_arrays(14, dtype, (257,), (257,), (257,), (257,), (257,))
    p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    pt = torch.nn.Parameter(t64(p0, dtype))
    opt = torch.optim.AdamW([pt], lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"],
                            weight_decay=hp["weight_decay"])
    for step, g in enumerate(grads, start=1):
        fused.AdamWUpdate.apply(p, g, m, v, step=step, **hp)
        pt.grad = t64(g, dtype)
        opt.step()
        st = opt.state[pt]
        check(f"p step {step}", p, pt.detach().numpy(), dtype)
        check(f"exp_avg step {step}", m, st["exp_avg"].numpy(), dtype)
        check(f"exp_avg_sq step {step}", v, st["exp_avg_sq"].numpy(), dtype)
    assert p.dtype == dtype


def test_adamw_ref_matches_tinytensor_optimizer():
    p0, *grads = rng_arrays(15, np.float32, (6, 5), (6, 5), (6, 5), (6, 5))
    param = tt.nn.Parameter(p0.copy())
    opt = tt.optim.AdamW([param], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    for step, g in enumerate(grads, start=1):
        param.grad = g.copy()
        opt.step()
        fused.AdamWUpdate.apply(p, g, m, v, step, 1e-2, 0.9, 0.99, 1e-8, 0.1)
    check("p", p, param.numpy(), np.float32)
    check("exp_avg", m, opt.state[id(param)]["exp_avg"], np.float32)


def test_adamw_rejects_bad_input():
    p = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="step counts from 1"):
        adamw.adamw_cuda(p, p.copy(), p.copy(), p.copy(), 0, 1e-3, 0.9, 0.999, 1e-8, 0.0)
    with pytest.raises(ValueError, match="grad must match"):
        adamw.adamw_cuda(p, np.zeros(3, np.float32), p.copy(), p.copy(), 1, 1e-3, 0.9, 0.999,
                         1e-8, 0)


# =========================================================== linear + ReLU (bias + ReLU + dropout)
def torch_bias_relu_dropout(x, b, keep, p, gy, dtype):
    """PyTorch's dropout(relu(x + b)) with the keep-mask `keep` (None: no dropout), scaled by
    1 / (1 - p), and 0 for p == 1 (everything dropped, as the kernel defines it); and the
    gradients of x and b."""
    xt, bt = t64(x, dtype, True), t64(b, dtype, True)
    y = torch.relu(xt + bt)
    if keep is not None:
        y = y * t64(keep, dtype) * (0.0 if p == 1 else 1 / (1 - p))
    y.backward(t64(gy, dtype))
    return y.detach().numpy(), xt.grad.numpy(), bt.grad.numpy()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_relu_ref_matches_torch(dtype, bias):
    x, w, b, gy = rng_arrays(16, dtype, (3, 4, 10), (7, 10), (7,), (3, 4, 7))
    b = b if bias else None
    y, grads = reference(fused.LinearReLU, (x, w, b), gy)
    xt, wt = t64(x, dtype, True), t64(w, dtype, True)
    bt = t64(b, dtype, True) if bias else None
    yt = torch.relu(torch.nn.functional.linear(xt, wt, bt))
    yt.backward(t64(gy, dtype))
    assert y.dtype == dtype and grads[0].dtype == dtype
    check("y", y, yt.detach().numpy(), dtype)
    for name, g, t in zip(("gx", "gw", "gb"), grads, (xt, wt, bt)):
        if t is None:
            assert g is None, name
        else:
            check(name, g, t.grad.numpy(), dtype)


def test_linear_relu_ref_matches_composed_tinytensor():
    x, w, b, gy = rng_arrays(18, np.float64, (5, 7), (6, 7), (6,), (5, 6))
    xt, wt, bt = (tt.tensor(a, requires_grad=True) for a in (x, w, b))
    yt = (xt @ wt.transpose(0, 1) + bt).relu()
    yt.backward(gy)
    y, (gx, gw, gb) = reference(fused.LinearReLU, (x, w, b), gy)
    check("y", y, yt.numpy(), np.float64)
    check("gx", gx, xt.grad, np.float64)
    check("gw", gw, wt.grad, np.float64)
    check("gb", gb, bt.grad, np.float64)


def test_linear_relu_backward_finite_differences():
    x, w, b, gy = rng_arrays(22, np.float64, (3, 4), (5, 4), (5,), (3, 5))
    pre = x @ w.T + b
    b[np.abs(pre).min(axis=0) < 1e-3] += 0.1      # keep clear of the kink at 0
    _, (gx, gw, gb) = reference(fused.LinearReLU, (x, w, b), gy)
    f = ref_forward(fused.LinearReLU)
    assert_fd("gx", gx, numeric_grad(lambda a: f(a, w, b), x.copy(), gy))
    assert_fd("gw", gw, numeric_grad(lambda a: f(x, a, b), w.copy(), gy))
    assert_fd("gb", gb, numeric_grad(lambda a: f(x, w, a), b.copy(), gy))


def test_bias_relu_dropout_rejects_bad_input():
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="needs u"):
        linear.bias_relu_dropout_forward_cuda(x, np.zeros(3, np.float32), 0.5)
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        linear.bias_relu_dropout_forward_cuda(x, np.zeros(4, np.float32))
    with pytest.raises(ValueError, match=r"probability must be in \[0, 1\]"):
        linear.bias_relu_dropout_forward_cuda(x, np.zeros(3, np.float32), 1.5,
                                              np.ones((2, 3), bool))


# =========================================================== shared input checks
def test_kernels_reject_bad_shapes_with_clear_errors():
    """The launch functions check their arguments before anything reaches the device."""
    with pytest.raises(ValueError, match=r"shape \(\.\.\., Tq, Tk\) with Tq <= Tk"):
        attention.causal_softmax_forward_cuda(np.zeros((2, 4, 3), np.float32), 1.0)
    with pytest.raises(ValueError, match=r"weight must have shape \(4,\)"):
        layernorm.layer_norm_forward_cuda(np.zeros((2, 4), np.float32), np.ones(5, np.float32),
                                          None)
    with pytest.raises(TypeError, match="floating point"):
        layernorm.layer_norm_forward_cuda(np.zeros((2, 4), np.int64), None, None)


def test_float32_references_stay_float32():
    """NumPy float64 scalars (a scale, an epsilon) do not promote float32 arrays (NEP 50 makes
    NumPy scalars strong): the attention's reference and its CPU softmax, layer norm's
    reference."""
    q, k, v, gy = rng_arrays(24, np.float32, *[(1, 1, 4, 3)] * 4)
    y, grads = reference(fused.CausalAttention, (q, k, v), gy, scale=np.float64(0.5))
    assert y.dtype == np.float32 and all(g.dtype == np.float32 for g in grads)
    s = np.float32(2) * np.ones((1, 1, 4, 4), np.float32)
    assert attention.causal_softmax_(s).dtype == np.float32
    x, w, b, gy = rng_arrays(24, np.float32, (3, 8), (8,), (8,), (3, 8))
    y, grads = reference(fused.LayerNorm, (x, w, b), gy, eps=np.float64(1e-5))
    assert y.dtype == np.float32, y.dtype
    assert all(g.dtype == np.float32 for g in grads), [g.dtype for g in grads]


def test_float32_kernels_stay_float32(kernel_device):
    put = kernel_device.put
    x, w, b, gy = rng_arrays(24, np.float32, (3, 8), (8,), (8,), (3, 8))
    s = attention.causal_softmax_forward_cuda(put(np.float32(2) * np.ones((1, 1, 4, 4), np.float32)),
                                              np.float64(0.5))
    assert s.dtype == np.float32
    outs = layernorm.layer_norm_forward_cuda(put(x), put(w), put(b), np.float64(1e-5))
    assert all(o.dtype == np.float32 for o in outs)
    assert all(o.dtype == np.float32
               for o in layernorm.layer_norm_backward_cuda(put(gy), put(x), put(w), *outs[1:]))


def test_importing_kernels_needs_no_cupy_and_compiling_says_why():
    if backend.cp is None:
        with pytest.raises(RuntimeError, match="the CUDA kernels need cupy"):
            K.compile_all()
    else:
        K.compile_all()
    assert {f.name for f in K.families()} == {"causal_softmax", "layer_norm", "cross_entropy",
                                              "adamw", "bias_relu_dropout"}


# =========================================================== CUDA kernels vs references
class Device:
    """How a test puts arrays on the device under test and reads them back."""

    def __init__(self, name, cp):
        self.name, self.cp = name, cp

    def put(self, a):
        return self.cp.asarray(a)

    def is_device_array(self, a):
        return isinstance(a, self.cp.ndarray)


DEVICES = [
    pytest.param("emulated", marks=pytest.mark.skipif(not _emulator.available(),
                                                      reason="the CUDA emulator needs g++")),
    pytest.param("cuda", marks=pytest.mark.skipif(not backend.cuda_available(),
                                                  reason="no GPU")),
]


@pytest.fixture(params=DEVICES)
def kernel_device(request, monkeypatch):
    if request.param == "emulated":
        monkeypatch.setattr(backend, "cp", _emulator.fake_cupy())
    return Device(request.param, backend.cp)


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.skipif(
    not backend.cuda_available(), reason="no GPU"))])
def gpu(request):
    return Device("cuda", backend.cp)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 37, 37), (1, 1, 70, 70), (3, 1, 1), (2, 5, 40),
                                   (2, 1, 65)])
def test_causal_softmax_kernel_matches_torch(kernel_device, dtype, shape):
    put, on_device = kernel_device.put, kernel_device.is_device_array
    s, gy = rng_arrays(30, dtype, shape, shape)
    y = attention.causal_softmax_forward_cuda(put(s), 0.25)
    gs = attention.causal_softmax_backward_cuda(y, put(gy), 0.25)
    assert on_device(y) and on_device(gs) and y.dtype == dtype
    y_t, gs_t = torch_causal_softmax(s, gy, 0.25, dtype)
    check("y", y, y_t, dtype)
    check("gs", gs, gs_t, dtype)
    Tq, Tk = shape[-2:]
    assert np.all(backend.to_numpy(y)[..., np.triu(np.ones((Tq, Tk), bool), Tk - Tq + 1)] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 7, 40), (3, 384), (9, 1)])
def test_layer_norm_kernel_matches_ref(kernel_device, dtype, shape):
    put, on_device = kernel_device.put, kernel_device.is_device_array
    C = shape[-1]
    x, w, b, gy = rng_arrays(31, dtype, shape, (C,), (C,), shape)
    x = x * 2 - 1
    out = layernorm.layer_norm_forward_cuda(put(x), put(w), put(b), 1e-5)
    y_ref, grads_ref = reference(fused.LayerNorm, (x, w, b), gy, eps=1e-5)
    _, mean_t, rstd_t, *_ = torch_layer_norm(x, w, b, gy, dtype)
    for name, got, want in zip(("y", "mean", "rstd"), out, (y_ref, mean_t, rstd_t)):
        assert on_device(got) and got.dtype == dtype, name
        check(name, got, want, dtype)
    grads = layernorm.layer_norm_backward_cuda(put(gy), put(x), put(w), out[1], out[2])
    for name, got, want in zip(("gx", "gw", "gb"), grads, grads_ref):
        assert on_device(got), name
        check(name, got, want, dtype)


def test_layer_norm_kernel_without_affine_matches_ref(kernel_device):
    put = kernel_device.put
    x, gy = rng_arrays(32, np.float32, (4, 33), (4, 33))
    y, mean, rstd = layernorm.layer_norm_forward_cuda(put(x), None, None)
    y_ref, (gx_ref, _, _) = reference(fused.LayerNorm, (x, None, None), gy)
    check("y", y, y_ref, np.float32)
    gx = layernorm.layer_norm_backward_cuda(put(gy), put(x), None, mean, rstd)[0]
    check("gx", gx, gx_ref, np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_kernel_matches_ref(kernel_device, dtype):
    put, on_device = kernel_device.put, kernel_device.is_device_array
    logits, targets = ce_inputs(33, dtype, N=21, C=65)
    lg, tg = put(logits), put(targets)
    loss, lse = cross_entropy.cross_entropy_forward_cuda(lg, tg)
    gloss = np.random.default_rng(34).standard_normal(21).astype(dtype)
    loss_ref, _ = ce_ref(logits, targets, gloss)
    assert on_device(loss) and loss.dtype == dtype
    check("loss", loss, loss_ref, dtype)
    check("lse", lse, torch_logsumexp(logits, dtype), dtype)
    count = np.count_nonzero(targets != -100)
    mean_gx_ref = ce_ref(logits, targets, 1.0, reduction="mean")[1]   # each row 1 / count
    for what, scale, gx_ref in (
            ("python number", 1.0 / count, mean_gx_ref),
            ("device scalar", put(np.asarray(1.0 / count, dtype)), mean_gx_ref),
            ("device rows", put(gloss), ce_ref(logits, targets, gloss)[1]),
            ("host rows", gloss, ce_ref(logits, targets, gloss)[1])):
        gx = cross_entropy.cross_entropy_backward_cuda(lg, tg, lse, scale)
        assert on_device(gx), what
        check(f"gx ({what})", gx, gx_ref, dtype)


def test_cross_entropy_kernel_flags_out_of_range_targets_with_nan(kernel_device):
    put = kernel_device.put
    logits, targets = ce_inputs(35, np.float32, N=5, C=7)
    targets[2] = 7
    loss, _ = cross_entropy.cross_entropy_forward_cuda(put(logits), put(targets))
    loss = backend.to_numpy(loss)
    assert np.isnan(loss[2]) and np.isfinite(np.delete(loss, 2)).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hp", HYPER)
def test_adamw_kernel_matches_ref(kernel_device, dtype, hp):
    put = kernel_device.put
    p0, *grads = rng_arrays(36, dtype, (1000,), (1000,), (1000,), (1000,))
    p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    P, M, V = put(p0), put(m), put(v)
    for step, g in enumerate(grads, start=1):
        assert adamw.adamw_cuda(P, put(g), M, V, step=step, **hp) is None
        fused.AdamWUpdate.apply(p, g, m, v, step=step, **hp)
    for name, got, want in (("p", P, p), ("exp_avg", M, m), ("exp_avg_sq", V, v)):
        check(name, got, want, dtype)


def test_adamw_kernel_updates_views_of_a_flat_buffer(kernel_device):
    put = kernel_device.put
    flat = put(np.ones(10, np.float32))
    zeros = put(np.zeros(10, np.float32))
    g = put(np.full(10, 0.5, np.float32))
    adamw.adamw_cuda(flat[2:6], g[2:6], zeros[2:6], zeros.copy()[2:6], 1, 0.1, 0.9, 0.999, 1e-8,
                     0.0)
    out = backend.to_numpy(flat)
    assert np.all(out[:2] == 1) and np.all(out[6:] == 1) and np.all(out[2:6] < 1)
    with pytest.raises(ValueError, match="C-contiguous"):
        adamw.adamw_cuda(flat[::2], g[::2], zeros[::2], zeros[::2], 1, 0.1, 0.9, 0.999, 1e-8, 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p,u_kind", [(0.0, "none"), (0.3, "mask"), (0.3, "uniform"),
                                      (1.0, "uniform")])
def test_bias_relu_dropout_kernel_matches_torch(kernel_device, dtype, p, u_kind):
    put, on_device = kernel_device.put, kernel_device.is_device_array
    x, b, gy = rng_arrays(37, dtype, (2, 9, 50), (50,), (2, 9, 50))
    uniform = np.random.default_rng(38).random(x.shape, dtype=np.float32)
    keep = None if u_kind == "none" else uniform >= p
    u = {"none": None, "mask": keep, "uniform": uniform}[u_kind]
    y = linear.bias_relu_dropout_forward_cuda(put(x), put(b), p, None if u is None else put(u))
    y_t, gx_t, gb_t = torch_bias_relu_dropout(x, b, keep, p, gy, dtype)
    assert on_device(y) and y.dtype == dtype
    check("y", y, y_t, dtype)          # all zeros for p = 1: any non-zero fails
    gx, gb = linear.bias_relu_dropout_backward_cuda(put(gy), y, p)
    assert on_device(gx) and on_device(gb)
    check("gx", gx, gx_t, dtype)
    check("gb", gb, gb_t, dtype)


def test_bias_relu_dropout_kernel_p_one_drops_everything(kernel_device):
    put = kernel_device.put
    x, b, gy = rng_arrays(20, np.float32, (4, 6), (6,), (4, 6))
    u = np.random.default_rng(21).random(x.shape, dtype=np.float32)
    y = linear.bias_relu_dropout_forward_cuda(put(x), put(b), 1.0, put(u))
    gx, gb = linear.bias_relu_dropout_backward_cuda(put(gy), y, 1.0)
    y, gx, gb = (backend.to_numpy(a) for a in (y, gx, gb))
    assert not y.any() and not gx.any() and not gb.any()


def test_bias_relu_dropout_kernel_matches_composed_tinytensor(kernel_device):
    put = kernel_device.put
    x, b, gy = rng_arrays(18, np.float64, (5, 7), (7,), (5, 7))
    p = 0.3
    uniform = np.random.default_rng(19).random(x.shape, dtype=np.float32)
    xt, bt = tt.tensor(x, requires_grad=True), tt.tensor(b, requires_grad=True)
    yt = (xt + bt).relu() * tt.tensor((uniform >= p) / (1 - p))
    yt.backward(gy)
    y = linear.bias_relu_dropout_forward_cuda(put(x), put(b), p, put(uniform))
    gx, gb = linear.bias_relu_dropout_backward_cuda(put(gy), y, p)
    check("y", y, yt.numpy(), np.float64)
    check("gx", gx, xt.grad, np.float64)
    check("gb", gb, bt.grad, np.float64)


def test_linear_relu_version_on_the_device_matches_ref(kernel_device):
    """kernels/linear.py's CUDALinearReLU (the product, then the bias + ReLU kernel, p = 0)
    on arrays, against the reference class."""
    put = kernel_device.put
    x, w, b, gy = rng_arrays(39, np.float64, (2, 9, 50), (40, 50), (40,), (2, 9, 40))
    y_ref, grads_ref = reference(fused.LinearReLU, (x, w, b), gy)
    y, grads = reference(linear.CUDALinearReLU, (put(x), put(w), put(b)), put(gy))
    check("y", y, y_ref, np.float64)
    for name, g, g_ref in zip(("gx", "gw", "gb"), grads, grads_ref):
        check(name, g, g_ref, np.float64)


def test_lecture_sized_kernels_match_ref(gpu):
    """The shapes of the lecture preset (B=64 would only add rows; B=4 keeps this quick)."""
    B, nh, T, C, V = 4, 6, 256, 384, 65
    s, gy = rng_arrays(40, np.float32, (B, nh, T, T), (B, nh, T, T))
    y = attention.causal_softmax_forward_cuda(gpu.put(s), C ** -0.5)
    y_t, gs_t = torch_causal_softmax(s, gy, C ** -0.5, np.float32)
    check("softmax y", y, y_t, np.float32)
    check("softmax gs", attention.causal_softmax_backward_cuda(y, gpu.put(gy), C ** -0.5), gs_t,
          np.float32)
    x, w, b, gx = rng_arrays(41, np.float32, (B, T, C), (C,), (C,), (B, T, C))
    out = layernorm.layer_norm_forward_cuda(gpu.put(x), gpu.put(w), gpu.put(b))
    y_ref, grads_ref = reference(fused.LayerNorm, (x, w, b), gx)
    check("layer_norm y", out[0], y_ref, np.float32)
    for name, got, want in zip(("gx", "gw", "gb"),
                               layernorm.layer_norm_backward_cuda(gpu.put(gx), gpu.put(x),
                                                                  gpu.put(w), *out[1:]),
                               grads_ref):
        check(f"layer_norm {name}", got, want, np.float32)
    logits, targets = ce_inputs(42, np.float32, N=B * T, C=V)
    loss, lse = cross_entropy.cross_entropy_forward_cuda(gpu.put(logits), gpu.put(targets))
    check("ce loss", loss, ce_ref(logits, targets, np.ones(B * T))[0], np.float32)
    h, bias, gh = rng_arrays(43, np.float32, (B, T, 4 * C), (4 * C,), (B, T, 4 * C))
    u = np.random.default_rng(44).random(h.shape, dtype=np.float32)
    yh = linear.bias_relu_dropout_forward_cuda(gpu.put(h), gpu.put(bias), 0.2, gpu.put(u))
    y_t, _, gb_t = torch_bias_relu_dropout(h, bias, u >= 0.2, 0.2, gh, np.float32)
    check("brd y", yh, y_t, np.float32)
    gb = linear.bias_relu_dropout_backward_cuda(gpu.put(gh), yh, 0.2)[1]
    check("brd gb", gb, gb_t, np.float32)
    p, g = rng_arrays(45, np.float32, (10_788_929,), (10_788_929,))   # the lecture model's size
    P, M, Vv = gpu.put(p), gpu.cp.zeros_like(gpu.put(p)), gpu.cp.zeros_like(gpu.put(p))
    adamw.adamw_cuda(P, gpu.put(g), M, Vv, 1, 3e-4, 0.9, 0.999, 1e-8, 0.01)
    m, v = np.zeros_like(p), np.zeros_like(p)
    fused.AdamWUpdate.apply(p, g, m, v, 1, 3e-4, 0.9, 0.999, 1e-8, 0.01)
    check("adamw p", P, p, np.float32)


def test_causal_softmax_kernel_writes_in_place(kernel_device):
    """out= may be the input itself (the attention's softmax runs in place); a wrong out is an
    error. attention.causal_softmax_ / causal_softmax_backward_ run the kernel in place on the
    device."""
    put = kernel_device.put
    s, gy = rng_arrays(46, np.float32, (2, 3, 4, 9), (2, 3, 4, 9))
    y_t, gs_t = torch_causal_softmax(s, gy, 0.5, np.float32)
    buf, g = put(s), put(gy)
    assert attention.causal_softmax_forward_cuda(buf, 0.5, out=buf) is buf
    check("y in place", buf, y_t, np.float32)
    assert attention.causal_softmax_backward_cuda(buf, g, 0.5, out=g) is g
    check("gs in place", g, gs_t, np.float32)
    with pytest.raises(ValueError, match="out= must be a C-contiguous"):
        attention.causal_softmax_forward_cuda(buf, 0.5, out=put(np.zeros((2, 3, 4, 8), np.float32)))
    y_t, gs_t = torch_causal_softmax(s, gy, 1.0, np.float32)
    buf, g = put(s), put(gy)
    assert attention.causal_softmax_(buf) is buf
    check("causal_softmax_ in place", buf, y_t, np.float32)
    assert attention.causal_softmax_backward_(g, buf) is g
    check("causal_softmax_backward_ in place", g, gs_t, np.float32)


def test_bias_relu_dropout_kernel_keeps_nan_and_inf_as_torch(kernel_device):
    """relu(NaN) is NaN and a dropped NaN or inf is NaN (NaN * 0), as in NumPy and torch."""
    x = np.array([[np.nan, -np.inf, np.inf, -1.0, 2.0, np.nan]], np.float32)
    b = np.zeros(6, np.float32)
    keep = np.array([[True, True, True, True, True, False]])
    for p, u in ((0.0, None), (0.5, keep)):
        y = backend.to_numpy(linear.bias_relu_dropout_forward_cuda(
            kernel_device.put(x), kernel_device.put(b), p,
            None if u is None else kernel_device.put(u)))
        want = torch.relu(torch.from_numpy(x + b))
        if u is not None:
            want = want * torch.from_numpy(u) * (1 / (1 - p))
        np.testing.assert_array_equal(y, want.numpy())


# =========================================================== the CUDA sources compile
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_sources_compile_with_nvcc(tmp_path):
    """Every instantiation of every family compiles for sm_90 (H100); counts the PTX entries."""
    from tinytensor.kernels import _cuda
    parts, names = [_cuda.HEADER], []
    for family in K.families():
        parts.append(family.body)
        names += family.name_expressions
    parts.append("void tt_instantiate_all() {\n"
                 + "".join(f"    (void)&{n};\n" for n in names) + "}\n")
    src = tmp_path / "kernels.cu"
    src.write_text("\n".join(parts))
    result = subprocess.run(["nvcc", "-std=c++17", "-arch=sm_90", "-ptx", str(src),
                             "-o", str(tmp_path / "kernels.ptx")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    ptx = (tmp_path / "kernels.ptx").read_text()
    assert len(re.findall(r"^\.visible \.entry", ptx, flags=re.M)) == len(names)


# =========================================================== the GPU benchmark's CPU parts
def test_bench_gpu_runs_on_cpu_with_tiny_sizes():
    """Argument parsing, the three models with one set of weights (the script exits if their
    losses at init differ), the interleaved timing loop: everything but the GPU."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_gpu.py")
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    median = bench.main(["--device", "cpu", "--preset", "tiny", "--n-layer", "1", "--iters", "1",
                         "--rounds", "1", "--warmup", "0"])
    assert set(median) == {"tinytensor", "torch_eager", "torch_sdpa"}
    assert all(v > 0 for v in median.values())
    with pytest.raises(SystemExit):
        bench.parse_args(["--n-embd", "30", "--n-head", "4"])
