"""The compiled CPU kernels (tinytensor/kernels/cpu.py, Numba) against their NumPy references,
their switch (TT_NUMBA, cpu.use), their independence from the number of threads, and that
importing tinytensor never imports numba. The ops that call them are checked against PyTorch
on both paths by the op test modules (the cpu_kernels fixture)."""
import os
import subprocess
import sys

import numpy as np
import pytest

import tinytensor as tt
import tinytensor.nn.functional as F
from tinytensor import kernels, parallel
from tinytensor.kernels import cpu

numba = pytest.importorskip("numba", reason="the compiled CPU kernels need numba "
                                            "(pip install -e \".[fast]\")")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# float64 agrees to rounding; float32 to a few ulps of the row's scale (sums in another order)
TOL = {np.float64: 1e-12, np.float32: 3e-6}
DTYPES = [np.float32, np.float64]
SHAPES = [(1, 1), (3, 5), (37, 128), (2050, 33)]      # the last: more than one ROW_BLOCK


@pytest.fixture(autouse=True)
def _compiled():
    cpu.use(True)
    yield
    cpu.use(None)


def rand(shape, dtype, seed=0, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(dtype)


def close(ours, ref, dtype, what):
    assert ours.dtype == ref.dtype, f"{what}: dtype {ours.dtype}, expected {ref.dtype}"
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape}, expected {ref.shape}"
    err = np.max(np.abs(ours - ref) / (1 + np.abs(ref)), initial=0.0)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]:g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_equals_reference(shape, dtype, affine):
    n, d = shape
    x, gy = rand(shape, dtype, 1, scale=3.0) + 5, rand(shape, dtype, 2)   # an offset mean
    w, b = (rand(d, dtype, 3), rand(d, dtype, 4)) if affine else (None, None)
    ours = cpu.layer_norm_forward(x, w, b, 1e-5)
    ref = kernels.layer_norm_forward_ref(x, w, b, 1e-5)
    for a, r, what in zip(ours, ref, ("y", "mean", "rstd")):
        close(a, r, dtype, what)
    grads = cpu.layer_norm_backward(gy, x, w, ref[1], ref[2])
    ref_grads = kernels.layer_norm_backward_ref(gy, x, w, ref[1], ref[2])
    close(grads[0], ref_grads[0], dtype, "gx")
    # gw, gb sum over every row: each within float rounding of the exact (float64) column sums
    # of its terms, and no further from them than the reference (BLAS, in x's dtype) is
    xhat = (x.astype(np.float64) - ref[1][:, None]) * ref[2][:, None]
    for a, r, terms, what in ((grads[1], ref_grads[1], gy * xhat, "gw"),
                              (grads[2], ref_grads[2], gy.astype(np.float64), "gb")):
        exact, scale = terms.sum(axis=0), np.abs(terms).sum(axis=0)
        assert a.dtype == dtype and a.shape == (d,), what
        ours, theirs = np.abs(a - exact), np.abs(r - exact)
        bound = np.maximum(theirs, 4 * np.finfo(dtype).eps * scale)
        assert (ours <= bound).all(), f"{what}: error {ours.max():.3g} > {bound[ours.argmax()]:.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ignore", [False, True])
def test_cross_entropy_equals_numpy_path(dtype, ignore):
    """Loss and logits gradient of the op on the compiled kernel vs NumPy, with ignored rows,
    a -inf and a huge logit."""
    x = rand((40, 65), dtype, 5, scale=4.0)
    x[3, 7], x[4, 0] = -np.inf, 1e4
    t = np.random.default_rng(6).integers(0, 65, 40)
    t[3] = 7                                               # the target's logit is -inf: loss inf
    if ignore:
        t[::5] = -100
    results = {}
    for path in ("numpy", "compiled"):
        cpu.use(path == "compiled")
        for reduction in ("mean", "sum", "none"):
            xt = tt.Tensor(x, requires_grad=True)
            loss = F.cross_entropy(xt, t, reduction=reduction)
            g = np.linspace(0.5, 1.5, loss.data.size).astype(dtype).reshape(loss.shape)
            loss.backward(g)
            results[path, reduction] = (loss.numpy(), xt.grad)
    for reduction in ("mean", "sum", "none"):
        for a, r, what in zip(results["compiled", reduction], results["numpy", reduction],
                              ("loss", "grad")):
            np.testing.assert_array_equal(np.isfinite(a), np.isfinite(r), err_msg=what)
            fin = np.isfinite(r)
            close(np.where(fin, a, 0), np.where(fin, r, 0), dtype, f"{reduction} {what}")


def test_cross_entropy_bad_target_and_nan():
    with pytest.raises(TypeError, match="float32"):
        cpu.cross_entropy_forward(rand((4, 3), np.float64), np.array([0, 1, 2, 0]), -100)
    x = rand((4, 3), np.float32)
    with pytest.raises(IndexError, match=r"target out of range.*\[0, 3\)"):
        cpu.cross_entropy_forward(x, np.array([0, 1, 3, 0]), -100)
    x[1, 2] = np.nan
    loss, p, count = cpu.cross_entropy_forward(x, np.array([0, 1, 2, 0]), -100)
    assert count == 4 and np.isnan(loss[1]) and np.isnan(p[1]).all() and np.isfinite(loss[[0, 2, 3]]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rows_equals_add_at(dtype):
    target = rand((7, 3, 4), dtype, 7)
    rows = np.random.default_rng(8).integers(0, 7, 50)     # repeats accumulate
    values = rand((50, 3, 4), dtype, 9)
    ref = target.copy()
    np.add.at(ref, rows, values)
    cpu.add_rows(target, rows, values)
    close(target, ref, dtype, "add_rows")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_bias_relu_equals_numpy(shape, dtype):
    y, b, gy = rand(shape, dtype, 10), rand(shape[1], dtype, 11), rand(shape, dtype, 12)
    ref = y + b
    ref *= ref > 0
    ours = y.copy()
    cpu.bias_relu_(ours, b)
    np.testing.assert_array_equal(ours, ref)
    ours = y.copy()
    cpu.add_bias_(ours, b)
    np.testing.assert_array_equal(ours, y + b)
    g, gb = cpu.relu_backward(gy, ref)
    np.testing.assert_array_equal(g, gy * (ref > 0))
    terms = g.astype(np.float64)                            # gb: within rounding of the exact sums
    assert gb.dtype == dtype
    err, scale = np.abs(gb - terms.sum(axis=0)), np.abs(terms).sum(axis=0)
    assert (err <= shape[0] * np.finfo(dtype).eps * scale).all(), f"bias gradient: error {err.max():.3g}"


def test_results_do_not_depend_on_threads(monkeypatch):
    """Row ranges over threads start on ROW_BLOCK boundaries and the blocks' sums are added in
    order: bit for bit the serial result for 1, 2 and 3 threads."""
    n, d = 3 * cpu.ROW_BLOCK + 17, 24
    x, gy, w, b = rand((n, d), np.float32, 1), rand((n, d), np.float32, 2), \
        rand(d, np.float32, 3), rand(d, np.float32, 4)
    outs = []
    for threshold, parts in ((1 << 60, 1), (0, 2), (0, 3)):
        monkeypatch.setattr(parallel, "MIN_ELEMENTS", threshold)
        monkeypatch.setattr(parallel, "threads", lambda parts=parts: parts)
        y, mean, rstd = cpu.layer_norm_forward(x, w, b)
        out = [y, mean, rstd, *cpu.layer_norm_backward(gy, x, w, mean, rstd)]
        out += list(cpu.relu_backward(gy, np.maximum(x, 0)))
        outs.append(out)
    for other in outs[1:]:
        for a, ref in zip(other, outs[0]):
            np.testing.assert_array_equal(a, ref)


def test_takes_only_numpy_floats_of_one_dtype():
    f32, f64 = np.zeros(3, np.float32), np.zeros(3, np.float64)
    assert cpu.takes(f32, None, f32) and cpu.takes(f64)
    assert not cpu.takes(f32, f64) and not cpu.takes(np.zeros(3, np.int64)) and not cpu.takes()
    cpu.use(False)
    assert not cpu.enabled() and not cpu.takes(f32)


def test_switch_settings(monkeypatch):
    cpu.use(None)
    monkeypatch.setenv("TT_NUMBA", "0")
    assert not cpu.enabled()
    cpu.use(None)
    monkeypatch.setenv("TT_NUMBA", "yes")
    with pytest.raises(ValueError, match=r"TT_NUMBA='yes': expected 0 .* or 1"):
        cpu.enabled()
    cpu.use(None)
    monkeypatch.setenv("TT_NUMBA", "1")
    assert cpu.enabled()

    def missing():
        raise ImportError("No module named 'numba'")
    monkeypatch.setattr(cpu, "_k", None)
    monkeypatch.setattr(cpu, "_load", missing)
    cpu.use(None)
    with pytest.raises(ImportError, match=r"TT_NUMBA=1 .* numba is not installed: pip install"):
        cpu.enabled()
    monkeypatch.delenv("TT_NUMBA")
    cpu.use(None)
    assert not cpu.enabled()                               # no numba: NumPy, silently
    with pytest.raises(ImportError, match="need numba"):
        cpu.use(True)


def test_importing_tinytensor_does_not_import_numba():
    code = ("import sys, tinytensor, tinytensor.nn.functional, gpt.model; "
            "assert 'numba' not in sys.modules, 'numba imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_gpt_step_compiled_equals_numpy():
    """A small GPT's loss and every gradient, compiled kernels vs NumPy alone: equal to float32
    rounding (the paths differ only in summation order)."""
    from gpt.model import GPTConfig, GPTLanguageModel
    idx = np.random.default_rng(0).integers(0, 11, (3, 8))
    out = {}
    for path in ("numpy", "compiled"):
        cpu.use(path == "compiled")
        tt.manual_seed(0)
        model = GPTLanguageModel(GPTConfig(vocab_size=11, block_size=8, n_embd=16, n_head=2,
                                           n_layer=2, dropout=0.0))
        _, loss = model(idx, np.roll(idx, -1, axis=1))
        loss.backward()
        out[path] = [loss.numpy()] + [p.grad for p in model.parameters()]
    for i, (a, r) in enumerate(zip(out["compiled"], out["numpy"])):
        err = np.max(np.abs(a - r)) / max(np.max(np.abs(r)), 1e-30)
        assert err <= 1e-5, f"tensor {i}: relative error {err:.3g}"


def test_exp_neg_within_two_ulp_of_numpy():
    from tinytensor.kernels import _numba_cpu
    z = -np.abs(np.random.default_rng(13).standard_normal(20000) * 20).astype(np.float32)
    z[:6] = [-np.inf, np.nan, 0.0, -0.0, -100.0, -87.3]
    ref = np.exp(z)
    ours = z.copy()
    _numba_cpu.exp_neg_(ours, np.empty(z.size, np.int32))
    normal = ref >= np.finfo(np.float32).tiny
    ulps = np.abs(ours[normal].view(np.int32) - ref[normal].view(np.int32))
    assert ulps.max() <= 2, f"{ulps.max()} ulp from np.exp"
    assert (ours[~normal & ~np.isnan(z)] == 0).all()      # underflow and exp(-inf): exactly 0
    assert np.isnan(ours[1]) and ours[2] == ours[3] == 1


@pytest.mark.parametrize("shape", [(2, 3, 5, 5), (4, 1, 7), (3, 4, 9), (2, 64, 64)])
def test_causal_softmax_equals_numpy_path(shape):
    """fused.causal_softmax_ and its backward: the compiled float32 kernels vs NumPy's
    (Tq == Tk, Tq < Tk, Tq == 1), masked weights exactly 0, a NaN score makes its row NaN."""
    from tinytensor import fused
    x = rand(shape, np.float32, 14, scale=3.0)
    g = rand(shape, np.float32, 15)
    x[(0,) * (len(shape) - 1) + (0,)] = np.nan             # row 0 sees key 0: NaN row
    out = {}
    for path in ("numpy", "compiled"):
        cpu.use(path == "compiled")
        y = fused.causal_softmax_(x.copy())
        out[path] = y, fused.causal_softmax_backward_(g.copy(), y)
    tq, tk = shape[-2:]
    future = np.triu(np.ones((tq, tk), bool), tk - tq + 1)
    for a, r, what in zip(out["compiled"], out["numpy"], ("weights", "gradient")):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(r), err_msg=what)
        assert (np.nan_to_num(a)[..., future] == 0).all(), f"{what}: masked entries not 0"
        close(np.nan_to_num(a), np.nan_to_num(r), np.float32, what)


@pytest.mark.parametrize("path", ["numpy", "compiled"])
def test_relu_of_infinities_and_nan_as_torch(path):
    """relu(-inf) is 0, relu(nan) nan, relu(-1) +0 as in torch, and the gradient 0 wherever
    the output is not > 0: F.relu, and the fused bias + ReLU kernel."""
    import torch
    cpu.use(path == "compiled")
    v = np.array([[-np.inf, -1.0, 0.0, 2.0, np.inf, np.nan]], np.float32)
    want = torch.relu(torch.from_numpy(v)).numpy()
    x = tt.Tensor(v, requires_grad=True)
    y = F.relu(x)
    np.testing.assert_array_equal(y.numpy(), want)
    assert not np.signbit(y.numpy()).any(), "relu of a negative must be +0"
    y.backward(np.ones_like(v))
    np.testing.assert_array_equal(x.grad, [[0, 0, 0, 1, 1, 0]])
    if path == "compiled":
        y = v.copy()
        cpu.bias_relu_(y, None)
        np.testing.assert_array_equal(y, want)
