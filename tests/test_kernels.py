"""The fused kernels of tinytensor.kernels.

1. Each NumPy reference against PyTorch (float64 to 1e-10, float32 to 1e-5, relative to the
   largest magnitude) and against tinytensor's composed ops; each backward also against float64
   central differences.
2. Each CUDA kernel against its NumPy reference through the dispatching functions, once per
   device of the `kernel_device` fixture: 'emulated' runs the real CUDA source on the CPU (see
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
from tinytensor import backend, kernels as K
import cuda_emulator as _emulator
from tinytensor.fused import causal_softmax

TOL = {np.float64: 1e-10, np.float32: 1e-5}
DTYPES = [np.float64, np.float32]


def rel_err(a, b):
    """Largest absolute difference relative to the largest magnitude of the expected b."""
    a, b = np.asarray(backend.to_numpy(a), dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != expected {b.shape}"
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)) if b.size else 0.0


def check(name, got, want, dtype):
    err = rel_err(backend.to_numpy(got), want)
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


# =========================================================== causal softmax
def torch_causal_softmax(s, gy, scale, dtype):
    st = t64(s, dtype, grad=True)
    Tq, Tk = s.shape[-2:]
    future = torch.triu(torch.ones(Tq, Tk, dtype=torch.bool), Tk - Tq + 1)
    y = torch.softmax((st * scale).masked_fill(future, float("-inf")), dim=-1)
    y.backward(t64(gy, dtype))
    return y.detach().numpy(), st.grad.numpy()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 5, 5), (1, 2, 40, 40), (7, 7), (1, 1, 1, 1),
                                   (2, 3, 4, 9), (2, 3, 1, 6)])
def test_causal_softmax_ref_matches_torch(dtype, shape):
    s, gy = rng_arrays(0, dtype, shape, shape)
    scale = 0.37
    y = K.causal_softmax_forward_ref(s, scale)
    gs = K.causal_softmax_backward_ref(y, gy, scale)
    y_t, gs_t = torch_causal_softmax(s, gy, scale, dtype)
    assert y.dtype == dtype and gs.dtype == dtype
    check("y", y, y_t, dtype)
    check("gs", gs, gs_t, dtype)
    Tq, Tk = shape[-2:]
    assert np.all(y[..., np.triu(np.ones((Tq, Tk), bool), Tk - Tq + 1)] == 0)


def test_causal_softmax_ref_matches_composed_tinytensor():
    s, gy = rng_arrays(1, np.float64, (2, 2, 9, 9), (2, 2, 9, 9))
    scale = 0.5
    st = tt.tensor(s, requires_grad=True)
    future = np.triu(np.ones((9, 9), bool), 1)
    y = (st * scale).masked_fill(future, float("-inf")).softmax(-1)
    y.backward(gy)
    y_ref = K.causal_softmax_forward_ref(s, scale)
    check("y", y_ref, y.numpy(), np.float64)
    check("gs", K.causal_softmax_backward_ref(y_ref, gy, scale), st.grad, np.float64)


@pytest.mark.parametrize("shape", [(2, 2, 9, 9), (2, 2, 3, 9)])
def test_causal_softmax_ref_matches_tinytensor_causal_softmax_op(shape):
    s, gy = rng_arrays(1, np.float32, shape, shape)
    st = tt.tensor(s, requires_grad=True)
    y = causal_softmax(st, 0.3)
    y.backward(gy)
    y_ref = K.causal_softmax_forward_ref(s, 0.3)
    check("y", y_ref, y.numpy(), np.float32)
    check("gs", K.causal_softmax_backward_ref(y_ref, gy, 0.3), st.grad, np.float32)


def test_causal_softmax_backward_finite_differences():
    s, gy = rng_arrays(2, np.float64, (1, 2, 4, 4), (1, 2, 4, 4))
    scale = 0.8
    analytic = K.causal_softmax_backward_ref(K.causal_softmax_forward_ref(s, scale), gy, scale)
    numeric = numeric_grad(lambda a: K.causal_softmax_forward_ref(a, scale), s.copy(), gy)
    assert_fd("causal softmax", analytic, numeric)


# =========================================================== layer norm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 8), (2, 3, 37), (1, 3)])
def test_layer_norm_ref_matches_torch(dtype, shape):
    C = shape[-1]
    x, w, b, gy = rng_arrays(3, dtype, shape, (C,), (C,), shape)
    x = x * 3 + 1.5                               # a non-zero mean and spread
    y, mean, rstd = K.layer_norm_forward_ref(x, w, b, 1e-5)
    gx, gw, gb = K.layer_norm_backward_ref(gy, x, w, mean, rstd)

    xt, wt, bt = t64(x, dtype, True), t64(w, dtype, True), t64(b, dtype, True)
    yt, mt, rt = torch.native_layer_norm(xt, (C,), wt, bt, 1e-5)
    yt.backward(t64(gy, dtype))
    for name, got, want in (("y", y, yt), ("mean", mean, mt.reshape(shape[:-1])),
                            ("rstd", rstd, rt.reshape(shape[:-1])), ("gx", gx, xt.grad),
                            ("gw", gw, wt.grad), ("gb", gb, bt.grad)):
        assert got.dtype == dtype, name
        check(name, got, want.detach().numpy(), dtype)


def test_layer_norm_ref_without_affine_matches_torch():
    x, gy = rng_arrays(4, np.float64, (3, 6), (3, 6))
    y, mean, rstd = K.layer_norm_forward_ref(x, None, None)
    gx, _, _ = K.layer_norm_backward_ref(gy, x, None, mean, rstd)
    xt = t64(x, np.float64, True)
    yt = torch.nn.functional.layer_norm(xt, (6,))
    yt.backward(t64(gy, np.float64))
    check("y", y, yt.detach().numpy(), np.float64)
    check("gx", gx, xt.grad.numpy(), np.float64)


def test_layer_norm_ref_matches_composed_tinytensor():
    x, w, b, gy = rng_arrays(5, np.float64, (2, 5, 12), (12,), (12,), (2, 5, 12))
    xt, wt, bt = (tt.tensor(a, requires_grad=True) for a in (x, w, b))
    yt = F.layer_norm(xt, 12, wt, bt, eps=1e-5)
    yt.backward(gy)
    y, mean, rstd = K.layer_norm_forward_ref(x, w, b, 1e-5)
    gx, gw, gb = K.layer_norm_backward_ref(gy, x, w, mean, rstd)
    for name, got, want in (("y", y, yt), ("gx", gx, xt.grad), ("gw", gw, wt.grad),
                            ("gb", gb, bt.grad)):
        check(name, got, backend.to_numpy(want.data if isinstance(want, tt.Tensor) else want),
              np.float64)


def test_layer_norm_backward_finite_differences():
    x, w, b, gy = rng_arrays(6, np.float64, (3, 5), (5,), (5,), (3, 5))
    _, mean, rstd = K.layer_norm_forward_ref(x, w, b)
    gx, gw, gb = K.layer_norm_backward_ref(gy, x, w, mean, rstd)
    assert_fd("gx", gx, numeric_grad(lambda a: K.layer_norm_forward_ref(a, w, b)[0], x.copy(), gy))
    assert_fd("gw", gw, numeric_grad(lambda a: K.layer_norm_forward_ref(x, a, b)[0], w.copy(), gy))
    assert_fd("gb", gb, numeric_grad(lambda a: K.layer_norm_forward_ref(x, w, a)[0], b.copy(), gy))


# =========================================================== cross-entropy
def ce_inputs(seed, dtype, N=12, C=65):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((N, C)) * 3).astype(dtype)
    targets = rng.integers(0, C, N)
    targets[1::4] = -100                          # ignored rows: 1, 5, 9, ...
    return logits, targets


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_ref_matches_torch(dtype):
    logits, targets = ce_inputs(7, dtype)
    gloss = np.random.default_rng(8).standard_normal(len(targets)).astype(dtype)
    loss, lse = K.cross_entropy_forward_ref(logits, targets)
    gx = K.cross_entropy_backward_ref(logits, targets, lse, gloss)

    xt = t64(logits, dtype, True)
    lt = torch.nn.functional.cross_entropy(xt, torch.tensor(targets), reduction="none",
                                           ignore_index=-100)
    lt.backward(t64(gloss, dtype))
    assert loss.dtype == dtype and gx.dtype == dtype
    check("loss", loss, lt.detach().numpy(), dtype)
    check("lse", lse, torch.logsumexp(xt, 1).detach().numpy(), dtype)
    check("gx", gx, xt.grad.numpy(), dtype)
    assert loss[1] == 0 and np.all(gx[[1, 5]] == 0)


def test_cross_entropy_ref_mean_scale_matches_torch():
    logits, targets = ce_inputs(9, np.float32)
    loss, lse = K.cross_entropy_forward_ref(logits, targets)
    count = np.count_nonzero(targets != -100)
    gx = K.cross_entropy_backward_ref(logits, targets, lse, 1.0 / count)
    xt = t64(logits, np.float32, True)
    lt = torch.nn.functional.cross_entropy(xt, torch.tensor(targets))
    lt.backward()
    check("mean loss", np.float32(loss.sum() / count), lt.detach().numpy(), np.float32)
    check("gx", gx, xt.grad.numpy(), np.float32)


def test_cross_entropy_ref_matches_composed_tinytensor():
    logits, targets = ce_inputs(10, np.float64)
    xt = tt.tensor(logits, requires_grad=True)
    lt = F.cross_entropy(xt, targets)
    lt.backward()
    loss, lse = K.cross_entropy_forward_ref(logits, targets)
    count = np.count_nonzero(targets != -100)
    check("loss", loss.sum() / count, lt.numpy(), np.float64)
    check("gx", K.cross_entropy_backward_ref(logits, targets, lse, 1.0 / count), xt.grad,
          np.float64)


def test_cross_entropy_backward_finite_differences():
    logits, targets = ce_inputs(11, np.float64, N=4, C=5)
    gloss = np.random.default_rng(12).standard_normal(4)
    _, lse = K.cross_entropy_forward_ref(logits, targets)
    gx = K.cross_entropy_backward_ref(logits, targets, lse, gloss)
    numeric = numeric_grad(lambda a: K.cross_entropy_forward_ref(a, targets)[0], logits.copy(),
                           gloss)
    assert_fd("gx", gx, numeric)


def test_cross_entropy_ref_rejects_out_of_range_targets():
    logits, targets = ce_inputs(13, np.float32)
    targets[3] = 65
    with pytest.raises(IndexError, match="target 65 is out of range for 65 classes"):
        K.cross_entropy_forward_ref(logits, targets)
    with pytest.raises(ValueError, match=r"targets must have shape \(12,\)"):
        K.cross_entropy_forward(logits, targets[:5])


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
        K.adamw_step_ref(p, g, m, v, step=step, **hp)
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
        K.adamw_step_ref(p, g, m, v, 1e-2, 0.9, 0.99, 1e-8, 0.1, step)
    check("p", p, param.numpy(), np.float32)
    check("exp_avg", m, opt.state[id(param)]["exp_avg"], np.float32)


def test_adamw_rejects_bad_input():
    p = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="step counts from 1"):
        K.adamw_step(p, p.copy(), p.copy(), p.copy(), 1e-3, 0.9, 0.999, 1e-8, 0.0, 0)
    with pytest.raises(ValueError, match="grad must match"):
        K.adamw_step(p, np.zeros(3, np.float32), p.copy(), p.copy(), 1e-3, 0.9, 0.999, 1e-8, 0, 1)


# =========================================================== bias + ReLU + dropout
def torch_bias_relu_dropout(x, b, keep, p, gy, dtype):
    xt, bt = t64(x, dtype, True), t64(b, dtype, True)
    y = torch.relu(xt + bt)
    if keep is not None:
        y = y * t64(keep, dtype) / (1 - p)
    y.backward(t64(gy, dtype))
    return y.detach().numpy(), xt.grad.numpy(), bt.grad.numpy()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p,u_kind", [(0.0, "none"), (0.2, "mask"), (0.2, "uniform"),
                                      (0.0, "uniform")])
def test_bias_relu_dropout_ref_matches_torch(dtype, p, u_kind):
    x, b, gy = rng_arrays(16, dtype, (3, 4, 10), (10,), (3, 4, 10))
    uniform = np.random.default_rng(17).random(x.shape, dtype=np.float32)
    keep = None if u_kind == "none" else uniform >= p
    u = {"none": None, "mask": keep, "uniform": uniform}[u_kind]
    y = K.bias_relu_dropout_forward_ref(x, b, p, u)
    gx, gb = K.bias_relu_dropout_backward_ref(gy, y, p)
    y_t, gx_t, gb_t = torch_bias_relu_dropout(x, b, keep, p, gy, dtype)
    assert y.dtype == dtype and gx.dtype == dtype
    check("y", y, y_t, dtype)
    check("gx", gx, gx_t, dtype)
    check("gb", gb, gb_t, dtype)


def test_bias_relu_dropout_ref_matches_composed_tinytensor():
    x, b, gy = rng_arrays(18, np.float64, (5, 7), (7,), (5, 7))
    p = 0.3
    uniform = np.random.default_rng(19).random(x.shape, dtype=np.float32)
    xt, bt = tt.tensor(x, requires_grad=True), tt.tensor(b, requires_grad=True)
    yt = (xt + bt).relu() * tt.tensor((uniform >= p) / (1 - p))
    yt.backward(gy)
    y = K.bias_relu_dropout_forward_ref(x, b, p, uniform)
    gx, gb = K.bias_relu_dropout_backward_ref(gy, y, p)
    check("y", y, yt.numpy(), np.float64)
    check("gx", gx, xt.grad, np.float64)
    check("gb", gb, bt.grad, np.float64)


def test_bias_relu_dropout_p_one_drops_everything():
    x, b, gy = rng_arrays(20, np.float32, (4, 6), (6,), (4, 6))
    u = np.random.default_rng(21).random(x.shape, dtype=np.float32)
    y = K.bias_relu_dropout_forward_ref(x, b, 1.0, u)
    gx, gb = K.bias_relu_dropout_backward_ref(gy, y, 1.0)
    assert not y.any() and not gx.any() and not gb.any()


def test_bias_relu_dropout_backward_finite_differences():
    x, b, gy = rng_arrays(22, np.float64, (3, 4), (4,), (3, 4))
    x[np.abs(x + b) < 1e-3] += 0.1                # keep clear of the kink at 0
    keep = np.random.default_rng(23).random(x.shape) >= 0.25
    y = K.bias_relu_dropout_forward_ref(x, b, 0.25, keep)
    gx, gb = K.bias_relu_dropout_backward_ref(gy, y, 0.25)
    assert_fd("gx", gx, numeric_grad(lambda a: K.bias_relu_dropout_forward_ref(a, b, 0.25, keep),
                                     x.copy(), gy))
    assert_fd("gb", gb, numeric_grad(lambda a: K.bias_relu_dropout_forward_ref(x, a, 0.25, keep),
                                     b.copy(), gy))


def test_bias_relu_dropout_rejects_bad_input():
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="needs u"):
        K.bias_relu_dropout_forward(x, np.zeros(3, np.float32), 0.5)
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        K.bias_relu_dropout_forward(x, np.zeros(4, np.float32))
    with pytest.raises(ValueError, match=r"probability must be in \[0, 1\]"):
        K.bias_relu_dropout_forward(x, np.zeros(3, np.float32), 1.5, np.ones((2, 3), bool))


# =========================================================== shared input checks
def test_references_reject_bad_shapes_with_clear_errors():
    with pytest.raises(ValueError, match=r"shape \(\.\.\., Tq, Tk\) with Tq <= Tk"):
        K.causal_softmax_forward(np.zeros((2, 4, 3), np.float32), 1.0)
    with pytest.raises(ValueError, match=r"weight must have shape \(4,\)"):
        K.layer_norm_forward(np.zeros((2, 4), np.float32), np.ones(5, np.float32), None)
    with pytest.raises(TypeError, match="floating point"):
        K.layer_norm_forward(np.zeros((2, 4), np.int64), None, None)


def test_float32_references_stay_float32():
    x, w, b, gy = rng_arrays(24, np.float32, (3, 8), (8,), (8,), (3, 8))
    s = K.causal_softmax_forward(np.float32(2) * np.ones((1, 1, 4, 4), np.float32), np.float64(0.5))
    assert s.dtype == np.float32
    outs = K.layer_norm_forward(x, w, b, np.float64(1e-5))
    assert all(o.dtype == np.float32 for o in outs)
    assert all(o.dtype == np.float32 for o in K.layer_norm_backward(gy, x, w, *outs[1:]))


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
def test_causal_softmax_kernel_matches_ref(kernel_device, dtype, shape):
    put, on_device = kernel_device.put, kernel_device.is_device_array
    s, gy = rng_arrays(30, dtype, shape, shape)
    y = K.causal_softmax_forward(put(s), 0.25)
    gs = K.causal_softmax_backward(y, put(gy), 0.25)
    assert on_device(y) and on_device(gs) and y.dtype == dtype
    y_ref = K.causal_softmax_forward_ref(s, 0.25)
    check("y", y, y_ref, dtype)
    check("gs", gs, K.causal_softmax_backward_ref(y_ref, gy, 0.25), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 7, 40), (3, 384), (9, 1)])
def test_layer_norm_kernel_matches_ref(kernel_device, dtype, shape):
    put, on_device = kernel_device.put, kernel_device.is_device_array
    C = shape[-1]
    x, w, b, gy = rng_arrays(31, dtype, shape, (C,), (C,), shape)
    x = x * 2 - 1
    out = K.layer_norm_forward(put(x), put(w), put(b), 1e-5)
    ref = K.layer_norm_forward_ref(x, w, b, 1e-5)
    for name, got, want in zip(("y", "mean", "rstd"), out, ref):
        assert on_device(got) and got.dtype == dtype, name
        check(name, got, want, dtype)
    grads = K.layer_norm_backward(put(gy), put(x), put(w), out[1], out[2])
    for name, got, want in zip(("gx", "gw", "gb"), grads,
                               K.layer_norm_backward_ref(gy, x, w, ref[1], ref[2])):
        assert on_device(got), name
        check(name, got, want, dtype)


def test_layer_norm_kernel_without_affine_matches_ref(kernel_device):
    put = kernel_device.put
    x, gy = rng_arrays(32, np.float32, (4, 33), (4, 33))
    y, mean, rstd = K.layer_norm_forward(put(x), None, None)
    y_ref, mean_ref, rstd_ref = K.layer_norm_forward_ref(x, None, None)
    check("y", y, y_ref, np.float32)
    gx = K.layer_norm_backward(put(gy), put(x), None, mean, rstd)[0]
    check("gx", gx, K.layer_norm_backward_ref(gy, x, None, mean_ref, rstd_ref)[0], np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_kernel_matches_ref(kernel_device, dtype):
    put, on_device = kernel_device.put, kernel_device.is_device_array
    logits, targets = ce_inputs(33, dtype, N=21, C=65)
    lg, tg = put(logits), put(targets)
    loss, lse = K.cross_entropy_forward(lg, tg)
    loss_ref, lse_ref = K.cross_entropy_forward_ref(logits, targets)
    assert on_device(loss) and loss.dtype == dtype
    check("loss", loss, loss_ref, dtype)
    check("lse", lse, lse_ref, dtype)
    gloss = np.random.default_rng(34).standard_normal(21).astype(dtype)
    count = np.count_nonzero(targets != -100)
    for what, scale, scale_ref in (
            ("python number", 1.0 / count, 1.0 / count),
            ("device scalar", put(np.asarray(1.0 / count, dtype)), 1.0 / count),
            ("device rows", put(gloss), gloss),
            ("host rows", gloss, gloss)):
        gx = K.cross_entropy_backward(lg, tg, lse, scale)
        assert on_device(gx), what
        check(f"gx ({what})", gx, K.cross_entropy_backward_ref(logits, targets, lse_ref, scale_ref),
              dtype)


def test_cross_entropy_kernel_flags_out_of_range_targets_with_nan(kernel_device):
    put = kernel_device.put
    logits, targets = ce_inputs(35, np.float32, N=5, C=7)
    targets[2] = 7
    loss, _ = K.cross_entropy_forward(put(logits), put(targets))
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
        assert K.adamw_step(P, put(g), M, V, step=step, **hp) is None
        K.adamw_step_ref(p, g, m, v, step=step, **hp)
    for name, got, want in (("p", P, p), ("exp_avg", M, m), ("exp_avg_sq", V, v)):
        check(name, got, want, dtype)


def test_adamw_kernel_updates_views_of_a_flat_buffer(kernel_device):
    put = kernel_device.put
    flat = put(np.ones(10, np.float32))
    zeros = put(np.zeros(10, np.float32))
    g = put(np.full(10, 0.5, np.float32))
    K.adamw_step(flat[2:6], g[2:6], zeros[2:6], zeros.copy()[2:6], 0.1, 0.9, 0.999, 1e-8, 0.0, 1)
    out = backend.to_numpy(flat)
    assert np.all(out[:2] == 1) and np.all(out[6:] == 1) and np.all(out[2:6] < 1)
    with pytest.raises(ValueError, match="C-contiguous"):
        K.adamw_step(flat[::2], g[::2], zeros[::2], zeros[::2], 0.1, 0.9, 0.999, 1e-8, 0.0, 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p,u_kind", [(0.0, "none"), (0.3, "mask"), (0.3, "uniform"),
                                      (1.0, "uniform")])
def test_bias_relu_dropout_kernel_matches_ref(kernel_device, dtype, p, u_kind):
    put, on_device = kernel_device.put, kernel_device.is_device_array
    x, b, gy = rng_arrays(37, dtype, (2, 9, 50), (50,), (2, 9, 50))
    uniform = np.random.default_rng(38).random(x.shape, dtype=np.float32)
    u = {"none": None, "mask": uniform >= p, "uniform": uniform}[u_kind]
    y = K.bias_relu_dropout_forward(put(x), put(b), p,
                                    None if u is None else put(u))
    y_ref = K.bias_relu_dropout_forward_ref(x, b, p, u)
    assert on_device(y) and y.dtype == dtype
    check("y", y, y_ref, dtype)          # all zeros for p = 1: any non-zero fails
    gx, gb = K.bias_relu_dropout_backward(put(gy), y, p)
    gx_ref, gb_ref = K.bias_relu_dropout_backward_ref(gy, y_ref, p)
    check("gx", gx, gx_ref, dtype)
    check("gb", gb, gb_ref, dtype)


def test_lecture_sized_kernels_match_ref(gpu):
    """The shapes of the lecture preset (B=64 would only add rows; B=4 keeps this quick)."""
    B, nh, T, C, V = 4, 6, 256, 384, 65
    s, gy = rng_arrays(40, np.float32, (B, nh, T, T), (B, nh, T, T))
    y = K.causal_softmax_forward(gpu.put(s), C ** -0.5)
    y_ref = K.causal_softmax_forward_ref(s, C ** -0.5)
    check("softmax y", y, y_ref, np.float32)
    check("softmax gs", K.causal_softmax_backward(y, gpu.put(gy), C ** -0.5),
          K.causal_softmax_backward_ref(y_ref, gy, C ** -0.5), np.float32)
    x, w, b, gx = rng_arrays(41, np.float32, (B, T, C), (C,), (C,), (B, T, C))
    out = K.layer_norm_forward(gpu.put(x), gpu.put(w), gpu.put(b))
    ref = K.layer_norm_forward_ref(x, w, b)
    check("layer_norm y", out[0], ref[0], np.float32)
    for name, got, want in zip(("gx", "gw", "gb"),
                               K.layer_norm_backward(gpu.put(gx), gpu.put(x), gpu.put(w), *out[1:]),
                               K.layer_norm_backward_ref(gx, x, w, *ref[1:])):
        check(f"layer_norm {name}", got, want, np.float32)
    logits, targets = ce_inputs(42, np.float32, N=B * T, C=V)
    loss, lse = K.cross_entropy_forward(gpu.put(logits), gpu.put(targets))
    check("ce loss", loss, K.cross_entropy_forward_ref(logits, targets)[0], np.float32)
    h, bias, gh = rng_arrays(43, np.float32, (B, T, 4 * C), (4 * C,), (B, T, 4 * C))
    u = np.random.default_rng(44).random(h.shape, dtype=np.float32)
    yh = K.bias_relu_dropout_forward(gpu.put(h), gpu.put(bias), 0.2, gpu.put(u))
    check("brd y", yh, K.bias_relu_dropout_forward_ref(h, bias, 0.2, u), np.float32)
    gb = K.bias_relu_dropout_backward(gpu.put(gh), yh, 0.2)[1]
    check("brd gb", gb, K.bias_relu_dropout_backward_ref(
        gh, K.bias_relu_dropout_forward_ref(h, bias, 0.2, u), 0.2)[1], np.float32)
    p, g = rng_arrays(45, np.float32, (10_788_929,), (10_788_929,))   # the lecture model's size
    P, M, Vv = gpu.put(p), gpu.cp.zeros_like(gpu.put(p)), gpu.cp.zeros_like(gpu.put(p))
    K.adamw_step(P, gpu.put(g), M, Vv, 3e-4, 0.9, 0.999, 1e-8, 0.01, 1)
    m, v = np.zeros_like(p), np.zeros_like(p)
    K.adamw_step_ref(p, g, m, v, 3e-4, 0.9, 0.999, 1e-8, 0.01, 1)
    check("adamw p", P, p, np.float32)


def test_causal_softmax_kernel_writes_in_place(kernel_device):
    """out= may be the input itself (the attention's softmax runs in place); a wrong out is an
    error."""
    put = kernel_device.put
    s, gy = rng_arrays(46, np.float32, (2, 3, 4, 9), (2, 3, 4, 9))
    y_ref = K.causal_softmax_forward_ref(s, 0.5)
    gs_ref = K.causal_softmax_backward_ref(y_ref, gy, 0.5)
    buf, g = put(s), put(gy)
    assert K.causal_softmax_forward(buf, 0.5, out=buf) is buf
    check("y in place", buf, y_ref, np.float32)
    assert K.causal_softmax_backward(buf, g, 0.5, out=g) is g
    check("gs in place", g, gs_ref, np.float32)
    with pytest.raises(ValueError, match="out= must be a C-contiguous"):
        K.causal_softmax_forward(buf, 0.5, out=put(np.zeros((2, 3, 4, 8), np.float32)))


def test_causal_softmax_ref_writes_in_place():
    s, gy = rng_arrays(47, np.float64, (3, 5, 5), (3, 5, 5))
    y_ref = K.causal_softmax_forward_ref(s, 0.7)
    gs_ref = K.causal_softmax_backward_ref(y_ref, gy, 0.7)
    assert K.causal_softmax_forward_ref(s, 0.7, out=s) is s
    check("y in place", s, y_ref, np.float64)
    assert K.causal_softmax_backward_ref(s, gy, 0.7, out=gy) is gy
    check("gs in place", gy, gs_ref, np.float64)


def test_bias_relu_dropout_kernel_keeps_nan_and_inf_as_the_ref(kernel_device):
    """relu(NaN) is NaN and a dropped NaN or inf is NaN (NaN * 0), as in NumPy and torch."""
    x = np.array([[np.nan, -np.inf, np.inf, -1.0, 2.0, np.nan]], np.float32)
    b = np.zeros(6, np.float32)
    keep = np.array([[True, True, True, True, True, False]])
    for p, u in ((0.0, None), (0.5, keep)):
        y = backend.to_numpy(K.bias_relu_dropout_forward(
            kernel_device.put(x), kernel_device.put(b), p,
            None if u is None else kernel_device.put(u)))
        np.testing.assert_array_equal(y, K.bias_relu_dropout_forward_ref(x, b, p, u))


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
