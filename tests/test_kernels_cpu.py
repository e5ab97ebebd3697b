"""The accelerated CPU versions of the fused ops (tinytensor/kernels/: compiled Numba loops,
work split over threads) against their references in tinytensor.fused, the switch
(kernels.use, the dispatch), their independence from the number of threads, and that importing
tinytensor never imports numba. The ops are checked against PyTorch with the accelerators off
and on by the op test modules (the `accelerators` fixture)."""
import os
import subprocess
import sys

import numpy as np
import pytest

import tinytensor as tt
import tinytensor.nn.functional as F
from tinytensor import fused, kernels
from tinytensor.kernels import adamw, attention, cross_entropy, embedding, layernorm, linear, threads

numba = pytest.importorskip("numba", reason="the compiled CPU loops need numba "
                                            "(pip install -e \".[fast]\")")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# float64 agrees to rounding; float32 to a few ulps of the row's scale (sums in another order)
TOL = {np.float64: 1e-12, np.float32: 3e-6}
DTYPES = [np.float32, np.float64]
SHAPES = [(1, 1), (3, 5), (37, 128), (2050, 33)]      # the last: more than one SUM_BLOCK


@pytest.fixture(autouse=True)
def _accelerated():
    kernels.use(True)
    yield
    kernels.use(None)


def rand(shape, dtype, seed=0, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(dtype)


def close(ours, ref, dtype, what):
    assert ours.dtype == ref.dtype, f"{what}: dtype {ours.dtype}, expected {ref.dtype}"
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape}, expected {ref.shape}"
    err = np.max(np.abs(ours - ref) / (1 + np.abs(ref)), initial=0.0)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]:g}"


def forward_backward(op, inputs, gy, **kwargs):
    """A Function class's forward on arrays, and its input gradients for output gradient gy."""
    f = op()
    f.needs_grad = [x is not None for x in inputs]
    y = f.forward(*inputs, **kwargs)
    return y, f.backward(gy)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_equals_reference(shape, dtype, affine):
    n, d = shape
    x, gy = rand(shape, dtype, 1, scale=3.0) + 5, rand(shape, dtype, 2)   # an offset mean
    w, b = (rand(d, dtype, 3), rand(d, dtype, 4)) if affine else (None, None)
    y, mean, rstd = layernorm.layer_norm_forward_numba(x, w, b, 1e-5)
    x64 = x.astype(np.float64)                              # mean and rstd against float64 sums
    var = ((x64 - x64.mean(axis=1, keepdims=True)) ** 2).mean(axis=1)
    close(mean, x64.mean(axis=1).astype(dtype), dtype, "mean")
    close(rstd, (1 / np.sqrt(var + 1e-5)).astype(dtype), dtype, "rstd")
    y_ref, grads_ref = forward_backward(fused.LayerNorm, (x, w, b), gy)
    close(y, y_ref, dtype, "y")
    grads = layernorm.layer_norm_backward_numba(gy, x, w, mean, rstd)
    close(grads[0], grads_ref[0], dtype, "gx")
    y_op, grads_op = forward_backward(layernorm.NumbaLayerNorm, (x, w, b), gy)   # the version
    np.testing.assert_array_equal(y_op, y)
    for a, r in zip(grads_op, grads):
        if a is not None:
            np.testing.assert_array_equal(a, r)
    # gw, gb sum over every row: each within float rounding of the exact (float64) column sums
    # of its terms, and no further from them than the reference's sums (NumPy, in x's dtype)
    ref = fused.LayerNorm()
    ref.forward(x, w, b)
    xhat = (x64 - mean[:, None]) * rstd[:, None]
    for a, r, terms, what in ((grads[1], (gy * ref.xhat).sum(axis=0), gy * xhat, "gw"),
                              (grads[2], gy.sum(axis=0), gy.astype(np.float64), "gb")):
        exact, scale = terms.sum(axis=0), np.abs(terms).sum(axis=0)
        assert a.dtype == dtype and a.shape == (d,), what
        ours, theirs = np.abs(a - exact), np.abs(r - exact)
        bound = np.maximum(theirs, 4 * np.finfo(dtype).eps * scale)
        assert (ours <= bound).all(), f"{what}: error {ours.max():.3g} > {bound[ours.argmax()]:.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ignore", [False, True])
def test_cross_entropy_equals_reference(dtype, ignore):
    """Loss and logits gradient of F.cross_entropy, accelerated vs the reference, with ignored
    rows, a -inf and a huge logit (float64 has no compiled version: both run the reference)."""
    x = rand((40, 65), dtype, 5, scale=4.0)
    x[3, 7], x[4, 0] = -np.inf, 1e4
    t = np.random.default_rng(6).integers(0, 65, 40)
    t[3] = 7                                               # the target's logit is -inf: loss inf
    if ignore:
        t[::5] = -100
    results = {}
    for path in ("reference", "accelerated"):
        kernels.use(path == "accelerated")
        for reduction in ("mean", "sum", "none"):
            xt = tt.Tensor(x, requires_grad=True)
            loss = F.cross_entropy(xt, t, reduction=reduction)
            assert (type(loss._ctx) is cross_entropy.NumbaCrossEntropy) == (
                path == "accelerated" and dtype == np.float32)
            g = np.linspace(0.5, 1.5, loss.data.size).astype(dtype).reshape(loss.shape)
            loss.backward(g)
            results[path, reduction] = (loss.numpy(), xt.grad)
    for reduction in ("mean", "sum", "none"):
        for a, r, what in zip(results["accelerated", reduction], results["reference", reduction],
                              ("loss", "grad")):
            np.testing.assert_array_equal(np.isfinite(a), np.isfinite(r), err_msg=what)
            fin = np.isfinite(r)
            close(np.where(fin, a, 0), np.where(fin, r, 0), dtype, f"{reduction} {what}")


def test_cross_entropy_bad_target_and_nan():
    t = np.array([0, 1, 2, 0])
    assert not cross_entropy.NumbaCrossEntropy.takes(rand((4, 3), np.float64), t)  # float32 only
    assert not cross_entropy.NumbaCrossEntropy.takes(rand((4, 3), np.float32), t,
                                                     label_smoothing=0.1)
    assert cross_entropy.NumbaCrossEntropy.takes(rand((4, 3), np.float32), t)
    x = rand((4, 3), np.float32)
    with pytest.raises(IndexError, match=r"target out of range.*\[0, 3\)"):
        cross_entropy.cross_entropy_forward_numba(x, np.array([0, 1, 3, 0]), -100)
    x[1, 2] = np.nan
    loss, p, count = cross_entropy.cross_entropy_forward_numba(x, t, -100)
    assert count == 4 and np.isnan(loss[1]) and np.isnan(p[1]).all() and np.isfinite(loss[[0, 2, 3]]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rows_equals_add_at(dtype):
    target = rand((7, 3, 4), dtype, 7)
    rows = np.random.default_rng(8).integers(0, 7, 50)     # repeats accumulate
    values = rand((50, 3, 4), dtype, 9)
    ref = target.copy()
    np.add.at(ref, rows, values)
    kernels.numba_loops().add_rows(target.reshape(7, -1), rows, values.reshape(50, -1))
    close(target, ref, dtype, "add_rows")
    w, idx = rand((7, 4), dtype, 10), np.random.default_rng(11).integers(0, 7, (5, 6))
    gy = rand((5, 6, 4), dtype, 12)
    y, (gw, _) = forward_backward(embedding.NumbaEmbedding, (w, idx), gy)
    y_ref, (gw_ref, _) = forward_backward(fused.Embedding, (w, idx), gy)
    np.testing.assert_array_equal(y, y_ref)
    close(gw, gw_ref, dtype, "embedding gradient")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_bias_relu_equals_numpy(shape, dtype):
    y, b, gy = rand(shape, dtype, 10), rand(shape[1], dtype, 11), rand(shape, dtype, 12)
    ref = y + b
    ref *= ref > 0
    ours = y.copy()
    linear.bias_relu_numba(ours, b)
    np.testing.assert_array_equal(ours, ref)
    ours = y.copy()
    linear.add_bias_numba(ours, b)
    np.testing.assert_array_equal(ours, y + b)
    g, gb = linear.relu_backward_numba(gy, ref)
    np.testing.assert_array_equal(g, gy * (ref > 0))
    terms = g.astype(np.float64)                            # gb: within rounding of the exact sums
    assert gb.dtype == dtype
    err, scale = np.abs(gb - terms.sum(axis=0)), np.abs(terms).sum(axis=0)
    assert (err <= shape[0] * np.finfo(dtype).eps * scale).all(), f"bias gradient: error {err.max():.3g}"


@pytest.mark.parametrize("op, version", [(fused.Linear, linear.NumbaLinear),
                                         (fused.LinearReLU, linear.NumbaLinearReLU)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 10, linear.SMALL_ROWS, linear.SMALL_ROWS + 1, 60,
                                  linear.MKL_MIN_ROWS])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("products", ["numpy", "mkl"])
def test_linear_versions_equal_reference(op, version, bias, rows, dtype, products):
    """Few rows (product() turns the product around) and many; the products by NumPy and, from
    MKL_MIN_ROWS rows on, by MKL (kernels/mkl.py, skipped where it is not installed), each
    checked to have run."""
    from tinytensor.kernels import mkl
    if products == "mkl" and mkl.library() is None:
        pytest.skip(f"MKL: {mkl._why}")
    before = kernels.use_mkl(products == "mkl")
    calls = []
    real = mkl.product
    try:
        mkl.product = lambda *a, **k: calls.append(1) or real(*a, **k)
        x, w, b = rand((rows, 1, 7), dtype, 13), rand((6, 7), dtype, 14), rand(6, dtype, 15)
        gy = rand((rows, 1, 6), dtype, 16)
        inputs = (x, w, b if bias else None)
        y, grads = forward_backward(version, inputs, gy)
    finally:
        mkl.product = real
        kernels.use_mkl(before)
    # forward and both gradients, from MKL_MIN_ROWS rows on
    assert len(calls) == (3 if products == "mkl" and rows >= linear.MKL_MIN_ROWS else 0)
    # against the reference in float64, within the rounding bound of a sum of k products,
    # k * eps * sum |a_i b_i| (Higham), the sums |a_i b_i| being the reference on |inputs|
    wide = [None if a is None else a.astype(np.float64) for a in inputs]
    y_ref, grads_ref = forward_backward(op, wide, gy.astype(np.float64))
    y_abs, grads_abs = forward_backward(fused.Linear, [None if a is None else np.abs(a) for a in wide],
                                        np.abs(gy.astype(np.float64)))
    eps = np.finfo(dtype).eps
    terms = [7 + 1, 6, rows, rows]                  # y (+ bias), gx, gw, gb: the sums' lengths
    for k, what, a, r, bound in zip(terms, ("y", "gx", "gw", "gb"), (y, *grads),
                                    (y_ref, *grads_ref), (y_abs, *grads_abs)):
        assert (a is None) == (r is None), what
        if a is not None:
            assert a.dtype == dtype and a.shape == r.shape, what
            err = np.abs(a - r) - (k + 1) * eps * bound
            assert (err <= 0).all(), f"{what}: beyond the rounding bound by {err.max():.3g}"
    assert y.flags.c_contiguous


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("version, n", [(adamw.NumbaAdamW, 1), (adamw.NumbaAdamW, 1000),
                                        (adamw.NumbaAdamW, adamw.MIN_ELEMENTS + 7),  # threads
                                        (adamw.ThreadedAdamW, adamw.MIN_ELEMENTS + 7)])
@pytest.mark.filterwarnings("ignore:invalid value encountered")    # the NaN and inf gradients
def test_adamw_versions_equal_reference_bit_for_bit(version, n, dtype, monkeypatch):
    """Three steps with and without weight decay, gradients including 0, inf and NaN: the
    accelerated updates make the reference's roundings, so parameters and moments are equal."""
    for weight_decay in (0.0, 0.1):
        g = rand(n, dtype, 1, scale=1e-2)
        g[:3] = [0, np.inf, np.nan][:n]
        ours = [rand(n, dtype, 2), np.zeros(n, dtype), np.zeros(n, dtype)]
        ref = [a.copy() for a in ours]
        for step in (1, 2, 3):
            hyper = (step, 1e-3, 0.9, 0.95, 1e-8, weight_decay)
            monkeypatch.setattr(threads, "count", lambda: 2)     # ThreadedAdamW's condition
            assert version.takes(ours[0], g, *ours[1:], *hyper)
            version.apply(ours[0], g, ours[1], ours[2], *hyper)
            fused.AdamWUpdate.apply(ref[0], g, ref[1], ref[2], *hyper)
            for a, b, what in zip(ours, ref, ("params", "exp_avg", "exp_avg_sq")):
                np.testing.assert_array_equal(a, b, err_msg=f"{what} after step {step}")
    assert kernels.accelerated(fused.AdamWUpdate, ours[0], g, *ours[1:], *hyper) is (
        adamw.NumbaAdamW)


def test_results_do_not_depend_on_threads(monkeypatch):
    """Row ranges over threads start on SUM_BLOCK boundaries and the blocks' sums are added in
    order: bit for bit the serial result for 1, 2 and 3 threads."""
    n, d = 3 * threads.SUM_BLOCK + 17, 24
    x, gy, w, b = rand((n, d), np.float32, 1), rand((n, d), np.float32, 2), \
        rand(d, np.float32, 3), rand(d, np.float32, 4)
    outs = []
    for threshold, parts in ((1 << 60, 1), (0, 2), (0, 3)):
        monkeypatch.setattr(threads, "MIN_ELEMENTS", threshold)
        monkeypatch.setattr(threads, "count", lambda parts=parts: parts)
        y, mean, rstd = layernorm.layer_norm_forward_numba(x, w, b)
        out = [y, mean, rstd, *layernorm.layer_norm_backward_numba(gy, x, w, mean, rstd)]
        out += list(linear.relu_backward_numba(gy, np.maximum(x, 0)))
        outs.append(out)
    for other in outs[1:]:
        for a, ref in zip(other, outs[0]):
            np.testing.assert_array_equal(a, ref)


def test_takes_only_numpy_floats_of_one_dtype():
    f32, f64 = np.zeros(3, np.float32), np.zeros(3, np.float64)
    assert kernels.numpy_floats(f32, None, f32) and kernels.numpy_floats(f64)
    assert not kernels.numpy_floats(f32, f64) and not kernels.numpy_floats(np.zeros(3, np.int64))
    assert not kernels.numpy_floats() and not kernels.numpy_floats(None, None)  # None == float64 in NumPy
    assert not kernels.numpy_floats(f32, [0.0]) and not kernels.numpy_floats(np.zeros(3, np.float16))
    assert not kernels.numpy_floats(f32, f32.astype(np.float16), f32)
    x = np.ones((2, 4), np.float32)
    assert kernels.accelerated(fused.LayerNorm, x, None, None) is layernorm.NumbaLayerNorm
    assert kernels.accelerated(fused.LayerNorm, x.astype(np.float16), None, None) is fused.LayerNorm
    kernels.use(False)
    assert not kernels.enabled() and kernels.accelerated(fused.LayerNorm, x, None, None) is fused.LayerNorm


def test_switch_settings(monkeypatch):
    x = np.ones((2, 4), np.float32)
    kernels.use(None)                                      # auto: on where numba is installed
    assert kernels.enabled("cpu") and kernels.enabled("cuda")
    assert kernels.accelerated(fused.LayerNorm, x, None, None) is layernorm.NumbaLayerNorm
    assert kernels.describe().startswith("on (auto): compiled CPU loops (numba ")
    with pytest.raises(ValueError, match=r"takes True, False or None \(auto\), got 'yes'"):
        kernels.use("yes")
    monkeypatch.setattr(kernels, "_loops", False)          # as if numba were not installed
    assert not kernels.enabled("cpu") and kernels.enabled("cuda")
    assert kernels.accelerated(fused.LayerNorm, x, None, None) is fused.LayerNorm
    assert kernels.describe() == ("off (auto: numba is not installed; every fused op runs its "
                                  "reference)")
    kernels.use(True)                                      # on: the thread splits, no compiled loops
    assert kernels.accelerated(fused.LayerNorm, x, None, None) is fused.LayerNorm
    big = np.ones(threads.MIN_ELEMENTS, np.float32)
    assert kernels.accelerated(fused.Dropout, big, 0.5).__name__ == (
        "ThreadedDropout" if threads.count() > 1 else "Dropout")
    kernels.use(False)
    assert kernels.describe() == "off (off: turned off; every fused op runs its reference)"


def test_importing_tinytensor_does_not_import_numba():
    code = ("import sys, tinytensor, tinytensor.nn.functional, gpt.model; "
            "assert 'numba' not in sys.modules, 'numba imported'; "
            "assert 'tinytensor.kernels.layernorm' not in sys.modules, 'a kernel family loaded'; "
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_gpt_step_accelerated_equals_reference():
    """A small GPT's loss and every gradient, accelerated vs the reference: equal to float32
    rounding (the paths differ only in summation order)."""
    from gpt.model import GPTConfig, GPTLanguageModel
    idx = np.random.default_rng(0).integers(0, 11, (3, 8))
    out = {}
    for path in ("reference", "accelerated"):
        kernels.use(path == "accelerated")
        tt.manual_seed(0)
        model = GPTLanguageModel(GPTConfig(vocab_size=11, block_size=8, n_embd=16, n_head=2,
                                           n_layer=2, dropout=0.0))
        _, loss = model(idx, np.roll(idx, -1, axis=1))
        loss.backward()
        out[path] = [loss.numpy()] + [p.grad for p in model.parameters()]
    for i, (a, r) in enumerate(zip(out["accelerated"], out["reference"])):
        err = np.max(np.abs(a - r)) / max(np.max(np.abs(r)), 1e-30)
        assert err <= 1e-5, f"tensor {i}: relative error {err:.3g}"


def test_exp_neg_within_two_ulp_of_numpy():
    from tinytensor.kernels import _numba
    z = -np.abs(np.random.default_rng(13).standard_normal(20000) * 20).astype(np.float32)
    z[:6] = [-np.inf, np.nan, 0.0, -0.0, -100.0, -87.3]
    ref = np.exp(z)
    ours = z.copy()
    _numba.exp_neg_(ours, np.empty(z.size, np.int32))
    normal = ref >= np.finfo(np.float32).tiny
    ulps = np.abs(ours[normal].view(np.int32) - ref[normal].view(np.int32))
    assert ulps.max() <= 2, f"{ulps.max()} ulp from np.exp"
    assert (ours[~normal & ~np.isnan(z)] == 0).all()      # underflow and exp(-inf): exactly 0
    assert np.isnan(ours[1]) and ours[2] == ours[3] == 1


@pytest.mark.parametrize("shape", [(2, 3, 5, 5), (4, 1, 7), (3, 4, 9), (2, 64, 64)])
def test_causal_softmax_compiled_equals_numpy(monkeypatch, shape):
    """The attention's in-place causal softmax and its backward: the compiled float32 loops vs
    NumPy's (Tq == Tk, Tq < Tk, Tq == 1), masked weights exactly 0, a NaN score makes its row NaN."""
    x = rand(shape, np.float32, 14, scale=3.0)
    g = rand(shape, np.float32, 15)
    x[(0,) * (len(shape) - 1) + (0,)] = np.nan             # row 0 sees key 0: NaN row
    out = {}
    for path in ("numpy", "compiled"):
        monkeypatch.setattr(attention, "numba_loops",
                            kernels.numba_loops if path == "compiled" else lambda: None)
        y = attention.causal_softmax_(x.copy())
        out[path] = y, attention.causal_softmax_backward_(g.copy(), y)
    tq, tk = shape[-2:]
    future = np.triu(np.ones((tq, tk), bool), tk - tq + 1)
    for a, r, what in zip(out["compiled"], out["numpy"], ("weights", "gradient")):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(r), err_msg=what)
        assert (np.nan_to_num(a)[..., future] == 0).all(), f"{what}: masked entries not 0"
        close(np.nan_to_num(a), np.nan_to_num(r), np.float32, what)


@pytest.mark.parametrize("path", ["reference", "accelerated"])
def test_relu_of_infinities_and_nan_as_torch(path):
    """relu(-inf) is 0, relu(nan) nan, relu(-1) +0 as in torch, and the gradient 0 wherever
    the output is not > 0: F.relu, and the compiled bias + ReLU loop."""
    import torch
    kernels.use(path == "accelerated")
    v = np.array([[-np.inf, -1.0, 0.0, 2.0, np.inf, np.nan]], np.float32)
    want = torch.relu(torch.from_numpy(v)).numpy()
    x = tt.Tensor(v, requires_grad=True)
    y = F.relu(x)
    np.testing.assert_array_equal(y.numpy(), want)
    assert not np.signbit(y.numpy()).any(), "relu of a negative must be +0"
    y.backward(np.ones_like(v))
    np.testing.assert_array_equal(x.grad, [[0, 0, 0, 1, 1, 0]])
    if path == "accelerated":
        y = v.copy()
        linear.bias_relu_numba(y, None)
        np.testing.assert_array_equal(y, want)


@pytest.mark.parametrize("path", ["reference", "accelerated"])
@pytest.mark.filterwarnings("ignore:divide by zero", "ignore:invalid value encountered")
def test_division_by_zero_gives_nan_as_torch(path):
    """With eps=0 the compiled loops divide by zero: layer norm of a constant row (1 / sqrt(0))
    and AdamW's first step on a zero gradient (0 / 0). They give NaN as torch and the
    references do (NumPy's error model), not Python's ZeroDivisionError."""
    import torch
    kernels.use(path == "accelerated")
    x = np.ones((3, 8), np.float32)
    x[1] = np.arange(8)                                    # one row that is not constant
    want = torch.nn.functional.layer_norm(torch.from_numpy(x), (8,), eps=0.0).numpy()
    xt = tt.Tensor(x, requires_grad=True)
    y = F.layer_norm(xt, (8,), eps=0.0)
    assert (type(y._ctx) is layernorm.NumbaLayerNorm) == (path == "accelerated")
    np.testing.assert_array_equal(np.isnan(y.numpy()), np.isnan(want))
    np.testing.assert_allclose(y.numpy()[1], want[1], rtol=1e-5, atol=1e-6)
    y.backward(np.ones_like(x))
    assert np.isnan(xt.grad[[0, 2]]).all() and np.isfinite(xt.grad[1]).all()

    p0 = rand((4, 3), np.float32, 1)
    ours, theirs = tt.nn.Parameter(tt.Tensor(p0.copy())), torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt_ours = tt.optim.AdamW([ours], lr=1e-3, eps=0.0)
    opt_theirs = torch.optim.AdamW([theirs], lr=1e-3, eps=0.0)
    ours.grad, theirs.grad = np.zeros_like(p0), torch.zeros(4, 3)
    opt_ours.step()
    opt_theirs.step()
    assert np.isnan(theirs.detach().numpy()).all()
    np.testing.assert_array_equal(np.isnan(ours.numpy()), np.isnan(theirs.detach().numpy()))
