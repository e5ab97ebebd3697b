"""The fused ops on the CUDA path: each op whose accelerated version calls a kernel of
tinytensor.kernels (see the table in docs/gpu.md) against the same op on NumPy.

The fused ops run the CUDA versions (CUDALayerNorm, CUDACrossEntropy, CUDALinearReLU,
CUDAChunkedAttention, CUDAAdamW) for cupy float32/float64 arrays (kernels.accelerated, the
takes() of each version). Each op below runs on the CPU (NumPy) and on the device under test,
forward and backward, and the two must agree (float64 to 1e-10, float32 to 1e-5, relative to
the largest magnitude); on the device the op must have launched its kernels, and only them.
The attention's causal softmax runs in place (kernels/attention.py: causal_softmax_ and
causal_softmax_backward_), checked alone too. Devices as in test_kernels.py: 'emulated' is the
cupy stand-in of tests/fake_cupy.py (CuPy's rules on host/device mixing, NumPy underneath)
whose kernels run their CUDA source in tests/cuda_emulator.py (needs g++); 'cuda' is a GPU
(skipped without one).
"""
import numpy as np
import pytest

import tinytensor as tt
import tinytensor.nn.functional as F
from tinytensor import backend, kernels
from tinytensor.kernels import _cuda, attention
import fake_cupy
from test_kernels import DEVICES, DTYPES, Device, ce_inputs, check, rng_arrays


@pytest.fixture(params=DEVICES)
def op_device(request, monkeypatch):
    if request.param == "emulated":  # the strict stand-in (tests/fake_cupy.py), kernels emulated
        fake_cupy.install(monkeypatch=monkeypatch)
    return Device(request.param, backend.cp)


@pytest.fixture
def launched(monkeypatch):
    """The kernel instantiations launched (KernelFamily.function runs once per launch)."""
    names, function = [], _cuda.KernelFamily.function

    def spy(family, expression):
        names.append(expression.split("<")[0])
        return function(family, expression)
    monkeypatch.setattr(_cuda.KernelFamily, "function", spy)
    return names


def _run(fn, arrays, gy, put):
    """fn on Tensors of arrays (float ones require grad) put on a device, then backward(gy):
    the output array and the gradient of every float input."""
    ts = [tt.Tensor(put(a), requires_grad=a.dtype.kind == "f") for a in arrays]
    y = fn(*ts)
    y.backward(put(gy))
    return y.data, [t.grad for t in ts if t.requires_grad]


def _attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _attention_scaled(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)


def _ce(**kw):
    return lambda x, t: F.cross_entropy(x, t, **kw)


def _shapes(*shapes):
    return shapes


# name: (fn, input shapes, integer targets of N rows over C classes or None, the kernels it
# launches on the device: none for the cases the kernels do not cover)
OP_CASES = {
    "layer_norm": (lambda x, w, b: F.layer_norm(x, (40,), w, b), _shapes((5, 7, 40), (40,), (40,)),
                   None, {"layer_norm_fwd", "layer_norm_bwd_x", "layer_norm_bwd_wb"}),
    "layer_norm_2d": (lambda x, w, b: F.layer_norm(x, (3, 4), w, b),
                      _shapes((6, 3, 4), (3, 4), (3, 4)), None,
                      {"layer_norm_fwd", "layer_norm_bwd_x", "layer_norm_bwd_wb"}),
    "layer_norm_plain": (lambda x: F.layer_norm(x, 33), _shapes((4, 33)), None,
                         {"layer_norm_fwd", "layer_norm_bwd_x", "layer_norm_bwd_wb"}),
    "cross_entropy_mean": (_ce(), _shapes((21, 65)), (21, 65),
                           {"cross_entropy_fwd", "cross_entropy_bwd"}),
    "cross_entropy_sum": (_ce(reduction="sum"), _shapes((21, 65)), (21, 65),
                          {"cross_entropy_fwd", "cross_entropy_bwd"}),
    "cross_entropy_none": (_ce(reduction="none"), _shapes((21, 65)), (21, 65),
                           {"cross_entropy_fwd", "cross_entropy_bwd"}),
    "cross_entropy_smoothing": (_ce(label_smoothing=0.1), _shapes((9, 7)), (9, 7), set()),
    "attention": (_attention, _shapes((2, 3, 9, 4), (2, 3, 9, 4), (2, 3, 9, 4)), None,
                  {"causal_softmax_fwd", "causal_softmax_bwd"}),
    "attention_scaled": (_attention_scaled, _shapes((2, 3, 9, 4), (2, 3, 9, 4), (2, 3, 9, 4)),
                         None, {"causal_softmax_fwd", "causal_softmax_bwd"}),
    "linear_relu": (F.linear_relu, _shapes((2, 9, 50), (40, 50), (40,)), None,
                    {"bias_relu_dropout_fwd", "bias_relu_dropout_bwd"}),
    # CUDALinearReLU takes a bias only: without one the reference's array expressions run
    "linear_relu_nobias": (F.linear_relu, _shapes((9, 50), (40, 50)), None, set()),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(OP_CASES))
def test_fused_op_on_the_device_runs_its_kernels_and_equals_numpy(op_device, launched, name, dtype):
    fn, shapes, targets, kernels = OP_CASES[name]
    arrays = rng_arrays(48, dtype, *shapes)
    if targets is not None:
        logits, t = ce_inputs(49, dtype, *targets)
        arrays = [logits, t]
    out_shape = np.shape(fn(*[tt.Tensor(a) for a in arrays]).data)
    gy = np.random.default_rng(50).standard_normal(out_shape).astype(dtype)
    y_ref, grads_ref = _run(fn, arrays, gy, lambda a: a)
    assert not launched                                # NumPy arrays: no kernel
    y, grads = _run(fn, arrays, gy, op_device.put)
    assert op_device.is_device_array(y) and y.dtype == dtype
    check(f"{name} output", y, y_ref, dtype)
    for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
        assert op_device.is_device_array(g), f"gradient {i} is not on the device"
        check(f"{name} gradient {i}", g, g_ref, dtype)
    assert set(launched) == kernels


def test_chunked_attention_runs_the_softmax_kernel_per_chunk(op_device, launched, monkeypatch):
    """T = 9 in chunks of 2 queries: 5 chunks, each a (Tq, Tk) = (2, e) causal softmax."""
    q, k, v, gy = rng_arrays(51, np.float64, *[(2, 2, 9, 3)] * 4)
    y_ref, grads_ref = _run(_attention, [q, k, v], gy, lambda a: a)
    monkeypatch.setattr(attention, "CHUNK", 2)
    y, grads = _run(_attention, [q, k, v], gy, op_device.put)
    check("y", y, y_ref, np.float64)
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        check(f"g{name}", g, g_ref, np.float64)
    assert launched.count("causal_softmax_fwd") == 5 and launched.count("causal_softmax_bwd") == 5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 9, 9), (2, 3, 4, 9)])
def test_causal_softmax_in_place_on_the_device_runs_its_kernels_and_equals_numpy(
        op_device, launched, monkeypatch, dtype, shape):
    """attention.causal_softmax_ and causal_softmax_backward_ (the chunked attention's softmax,
    in place; Tq < Tk is a chunk after the first) on the device against the same on NumPy."""
    s, gy = rng_arrays(52, dtype, shape, shape)
    monkeypatch.setattr(attention, "numba_loops", lambda: None)    # NumPy's own path
    y_ref = attention.causal_softmax_(s.copy())
    gs_ref = attention.causal_softmax_backward_(gy.copy(), y_ref)
    assert not launched                                # NumPy arrays: no kernel
    y = op_device.put(s)
    assert attention.causal_softmax_(y) is y
    gs = op_device.put(gy)
    assert attention.causal_softmax_backward_(gs, y) is gs
    assert op_device.is_device_array(y) and y.dtype == dtype
    check("causal softmax output", y, y_ref, dtype)
    assert op_device.is_device_array(gs)
    check("causal softmax gradient", gs, gs_ref, dtype)
    assert set(launched) == {"causal_softmax_fwd", "causal_softmax_bwd"}


def test_adamw_on_the_device_runs_its_kernel_and_equals_numpy(op_device, launched):
    """optim.AdamW's update (fused.adamw_update: CUDAAdamW on the device) over a few steps."""
    p0, *grads = rng_arrays(53, np.float32, (6, 5), (6, 5), (6, 5))

    def steps(put):
        param = tt.nn.Parameter(put(p0.copy()))
        opt = tt.optim.AdamW([param], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
        for g in grads:
            param.grad = put(g.copy())
            opt.step()
        return param.data, opt.state[id(param)]

    p_ref, st_ref = steps(lambda a: a)
    assert not launched
    p, st = steps(op_device.put)
    assert op_device.is_device_array(p)
    check("p", p, p_ref, np.float32)
    check("exp_avg", st["exp_avg"], st_ref["exp_avg"], np.float32)
    check("exp_avg_sq", st["exp_avg_sq"], st_ref["exp_avg_sq"], np.float32)
    assert set(launched) == {"adamw_step"}


def test_no_kernel_runs_with_the_accelerators_off(op_device, launched):
    """kernels.use(False): the references' array expressions on the device, no kernel."""
    kernels.use(False)
    fn, shapes, _, _ = OP_CASES["layer_norm"]
    arrays = rng_arrays(54, np.float32, *shapes)
    gy = np.random.default_rng(55).standard_normal(shapes[0]).astype(np.float32)
    y_ref, grads_ref = _run(fn, arrays, gy, lambda a: a)
    y, grads = _run(fn, arrays, gy, op_device.put)
    assert op_device.is_device_array(y)
    check("y", y, y_ref, np.float32)
    for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
        check(f"gradient {i}", g, g_ref, np.float32)
    assert not launched
