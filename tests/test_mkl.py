"""Intel MKL's matrix product for the CPU linear layers (tinytensor/kernels/mkl.py): its
products against NumPy's for every transpose and layout, what it refuses, the setting
(kernels.use_mkl: auto on Intel CPUs only), its threads, and that nothing loads it at import.
Where MKL is not installed, the tests that need it skip (CI installs the `mkl` extra); the
linear layers through it are checked against their references in test_kernels_cpu.py and, on
an Intel CPU, by every GPT test."""
import os
import subprocess
import sys

import numpy as np
import pytest

from tinytensor import kernels
from tinytensor.kernels import linear, mkl, threads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = {np.float64: 1e-13, np.float32: 2e-6}     # relative to the row's scale: sums in another order


@pytest.fixture
def lib():
    if mkl.library() is None:
        pytest.skip(f"MKL: {mkl._why} (pip install -e \".[mkl]\")")
    before = kernels.use_mkl(True)
    yield mkl.library()
    kernels.use_mkl(before)


def rand(shape, dtype, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def layouts(a):
    """a (2-D) as a C-contiguous array, a transposed Fortran one, and rows of a wider array."""
    wide = np.zeros((a.shape[0], a.shape[1] + 5), a.dtype)
    wide[:, 2:2 + a.shape[1]] = a
    return {"C": np.ascontiguousarray(a), "F": np.asfortranarray(a), "strided": wide[:, 2:2 + a.shape[1]]}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (3, 5, 2), (70, 33, 9), (8, 128, 384)])
def test_product_equals_numpy(lib, dtype, ta, tb, m, k, n):
    a0 = rand((k, m) if ta else (m, k), dtype, 1)
    b0 = rand((n, k) if tb else (k, n), dtype, 2)
    ref = (a0.astype(np.float64).T if ta else a0.astype(np.float64)) @ \
        (b0.astype(np.float64).T if tb else b0.astype(np.float64))
    for la, a in layouts(a0).items():
        for lb, b in layouts(b0).items():
            assert mkl.takes(a, b)
            c = mkl.product(a, b, ta, tb)
            assert c.dtype == dtype and c.shape == (m, n) and c.flags.c_contiguous
            scale = np.abs(a0).max() * np.abs(b0).max() * k
            err = np.abs(c - ref).max() / scale
            assert err <= TOL[dtype], f"{la} x {lb}: relative error {err:.3g}"


def test_takes_refuses_what_it_cannot_multiply():
    x = np.ones((4, 3), np.float32)
    assert not mkl.takes(x.astype(np.int64), x.astype(np.int64))         # integers
    assert not mkl.takes(x, x.astype(np.float64))                        # mixed dtypes
    assert not mkl.takes(x.astype(np.float16), x.astype(np.float16))     # half
    assert not mkl.takes(np.ones((0, 3), np.float32), x)                 # empty
    assert not mkl.takes(x[:, ::2], x)                                   # no unit stride
    assert not mkl.takes(np.broadcast_to(np.ones(3, np.float32), (4, 3)), x)   # stride 0
    assert not mkl.takes(np.ones((2, 4, 3), np.float32), x)              # not 2-D
    assert not mkl.takes(x.tolist(), x)                                  # not an array


def test_matmul_falls_back_to_numpy_where_mkl_cannot(lib, monkeypatch):
    """linear.matmul multiplies with NumPy what MKL does not take (the same values)."""
    calls = []
    real = mkl.product
    monkeypatch.setattr(mkl, "product", lambda *a, **k: calls.append(1) or real(*a, **k))
    n = linear.MKL_MIN_ROWS
    a, b = rand((n, 6), np.float32, 3), rand((6, 4), np.float32, 4)
    # MKL sums in another order than NumPy's BLAS (on an AMD EPYC 32 of 2,048 entries differ
    # by more than 1e-6 relative, where terms cancel): both within rounding of the exact product
    exact = a.astype(np.float64) @ b.astype(np.float64)
    scale = np.abs(a).max() * np.abs(b).max() * a.shape[1]
    for c in (linear.matmul(a, b), a @ b):
        assert np.abs(c - exact).max() / scale <= TOL[np.float32]
    assert len(calls) == 1
    half = linear.matmul(a.astype(np.float16), b.astype(np.float16))
    assert half.dtype == np.float16 and len(calls) == 1
    np.testing.assert_array_equal(linear.matmul(a[:, ::2], b[::2]), a[:, ::2] @ b[::2])
    np.testing.assert_array_equal(linear.matmul(a[:n - 1], b), a[:n - 1] @ b)   # too few rows
    assert len(calls) == 1


def test_setting(monkeypatch):
    """auto: MKL where it loads and the CPU is Intel's; on without MKL: an error naming the fix;
    off: NumPy's BLAS; a bad value: ValueError."""
    before = kernels.use_mkl(None)
    try:
        with pytest.raises(ValueError, match=r"use_mkl\(\) takes True, False or None \(auto\), got 'yes'"):
            kernels.use_mkl("yes")
        monkeypatch.setattr(mkl, "_intel", False)                 # an AMD CPU, say
        real_library = mkl.library
        monkeypatch.setattr(mkl, "library", lambda: pytest.fail("auto loaded MKL on a non-Intel CPU"))
        assert not mkl.enabled()
        assert mkl.describe() == "NumPy's BLAS (mkl auto: not an Intel CPU)"
        monkeypatch.setattr(mkl, "library", real_library)
        kernels.use_mkl(False)
        assert not mkl.enabled() and mkl.describe() == "NumPy's BLAS (mkl off)"
        monkeypatch.setattr(mkl, "_lib", False)                   # as if MKL were not installed
        monkeypatch.setattr(mkl, "_why", "the mkl package is not installed (no libmkl_rt found)")
        monkeypatch.setattr(mkl, "_intel", True)
        kernels.use_mkl(None)
        assert not mkl.enabled()
        assert mkl.describe() == ("NumPy's BLAS (mkl auto: the mkl package is not installed "
                                  "(no libmkl_rt found))")
        with pytest.raises(RuntimeError, match=r"MKL's products were asked for, but the mkl "
                                               r"package is not installed .*pip install -e "
                                               r"\"\.\[mkl\]\""):
            kernels.use_mkl(True)
        assert mkl._mode is None                                  # the failed call changed nothing
    finally:
        kernels.use_mkl(before)


def test_auto_on_an_intel_cpu(lib, monkeypatch):
    kernels.use_mkl(None)
    monkeypatch.setattr(mkl, "_intel", True)
    assert mkl.enabled()
    assert mkl.describe().startswith(f"MKL {mkl.version()} (mkl auto; ")
    before = kernels.use(True)
    try:
        assert kernels.describe().endswith(f"; linear layers multiplied by {mkl.describe()}")
    finally:
        kernels.use(before)


def test_threads_follow_numpys_blas_and_are_held_in_tinytensors_threads(lib):
    """MKL runs as many threads as NumPy's BLAS; inside a for_ranges part, one."""
    counts = {c.internal_api: c.num_threads for c in threads._controllers()}
    assert counts.get("mkl") == threads.count(), counts
    if threads.count() < 2:
        pytest.skip("one BLAS thread: for_ranges does not split")
    seen, real = [], lib.cblas_sgemm

    def gemm(*args):                       # MKL's thread count while it multiplies
        seen.append(lib.MKL_Get_Max_Threads())
        return real(*args)

    x = np.ones((4, 4), np.float32)
    lib.cblas_sgemm = gemm
    try:
        mkl.product(x, x)
        threads.for_ranges(2, lambda a, b: mkl.product(x, x))
        mkl.product(x, x)
    finally:
        lib.cblas_sgemm = real
    n = threads.count()
    assert seen == [n, 1, 1, n], seen


def test_importing_tinytensor_does_not_load_mkl():
    """MKL loads at the first linear layer that would use it, never at import or model build."""
    code = ("import sys, tinytensor, gpt.model; from gpt.model import GPTConfig, GPTLanguageModel; "
            "GPTLanguageModel(GPTConfig(vocab_size=5, block_size=4, n_embd=8, n_head=2, n_layer=1)); "
            "maps = open('/proc/self/maps').read(); "
            "assert 'libmkl' not in maps, 'MKL loaded'; "
            "assert 'tinytensor.kernels.mkl' not in sys.modules; print('ok')")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


@pytest.mark.parametrize("env, want", [({}, mkl.BLOCKTIME_MS), ({"KMP_BLOCKTIME": "7"}, 7)])
def test_intel_openmp_threads_sleep_soon_unless_the_user_says(env, want):
    """MKL's Intel OpenMP threads wait BLOCKTIME_MS after their work, not its default 200 ms
    (they would spin on the cores tinytensor's threads need); a KMP_BLOCKTIME given is kept."""
    if mkl.library() is None:
        pytest.skip(f"MKL: {mkl._why}")
    code = ("import ctypes, os; from tinytensor.kernels import mkl; lib = mkl.library(); "
            "omp = ctypes.CDLL(os.path.join(os.path.dirname(mkl._candidates()[0]), 'libiomp5.so')); "
            "print(omp.kmp_get_blocktime())")
    environ = {k: v for k, v in os.environ.items() if k != "KMP_BLOCKTIME"}
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=dict(environ, PYTHONPATH=ROOT, **env))
    assert p.returncode == 0 and p.stdout.split() == [str(want)], p.stderr


@pytest.mark.parametrize("m, k, n", [(768, 128, 384), (512, 512, 128), (8, 128, 384)])
def test_products_do_not_depend_on_where_the_arrays_lie(lib, m, k, n):
    """The same operands at 16 different offsets in memory give the same bits (numpy's
    allocations differ from run to run; a resumed run must repeat the uninterrupted one)."""
    x, w, g = rand((m, k), np.float32, 5), rand((n, k), np.float32, 6), rand((m, n), np.float32, 7)

    def placed(a, offset):
        buf = np.empty(a.size + 16, a.dtype)
        out = buf[offset:offset + a.size].reshape(a.shape)
        out[...] = a
        return out

    want = [mkl.product(x, w, tb=True), mkl.product(g, w), mkl.product(g, x, ta=True)]
    for off in range(1, 16):
        xs, ws, gs = placed(x, off), placed(w, (7 * off) % 16), placed(g, (3 * off) % 16)
        got = [mkl.product(xs, ws, tb=True), mkl.product(gs, ws), mkl.product(gs, xs, ta=True)]
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("order, layer", [("torch first", "GNU"), ("torch after", "Intel")])
def test_products_right_with_torch_imported_before_or_after(order, layer):
    """torch puts GNU OpenMP in the global symbol scope: MKL loaded after it runs on GNU
    OpenMP (on Intel's its threads found libgomp's omp_* and more than half the products came
    out wrong); loaded before it, on Intel OpenMP, which torch then shares. Both multiply right,
    over 2 threads, and so does torch."""
    if mkl.library() is None:
        pytest.skip(f"MKL: {mkl._why}")
    code = f"""
import numpy as np
{'import torch' if order == 'torch first' else ''}
from tinytensor.kernels import mkl
mkl.use_mkl(True)
mkl.library().MKL_Set_Num_Threads(2)
g = np.random.default_rng(7).standard_normal((768, 384)).astype(np.float32)
x = np.random.default_rng(5).standard_normal((768, 128)).astype(np.float32)
ref = g.T.astype(np.float64) @ x.astype(np.float64)
mkl.product(g, x, ta=True)
import torch
torch.set_num_threads(2)
bad = sum(float(np.abs(mkl.product(g, x, ta=True) - ref).max()) > 1e-3 for _ in range(50))
tg, tx = torch.from_numpy(g), torch.from_numpy(x)
tbad = sum(float(np.abs((tg.T @ tx).numpy() - ref).max()) > 1e-3 for _ in range(20))
print(mkl.describe(), bad, tbad)
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == 0, p.stderr
    assert f"({'mkl on'}; {layer} OpenMP threads) 0 0" in p.stdout, p.stdout
