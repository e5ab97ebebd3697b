"""Run an op in tinytensor and in PyTorch on the same inputs and compare (tinygrad/llm.c style).

    check("matmul", lambda a, b: a @ b, lambda a, b: a @ b, randn(3, 4), randn(4, 5), device=device)

compares the outputs and the gradients of L = sum(out * W) for a random W with respect to every
float input. Errors are max-norm relative errors, max|ours - torch| / max|torch|; the bound is
1e-10 in float64 and 1e-5 in float32. The worst error seen per op family and dtype is kept in
WORST (conftest.py prints it and writes it to /tmp/tt_worst_errors.json).
"""
import numpy as np
import pytest
import torch

import tinytensor as tt
from tinytensor import backend

TOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-5}
WORST = {}  # family -> {"float64": worst, "float32": worst}

# every op test runs in both precisions
dtypes = pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])

_TORCH_DTYPE = {np.dtype(np.float64): torch.float64, np.dtype(np.float32): torch.float32}


class Const:
    """Marks a float input that is passed to both sides without requiring a gradient."""

    def __init__(self, value):
        self.value = value


def randn(*shape, seed=None, low=None):
    """A float64 standard-normal array; with low, |values| >= low (away from kinks and poles)."""
    rng = np.random.default_rng(seed if seed is not None else hash(shape) % 2**32)
    x = rng.standard_normal(shape)
    if low is not None:
        x = np.sign(x) * (low + np.abs(x))
        x[x == 0] = low
    return x


def rel_err(ours, ref):
    """max|ours - ref| / max|ref| in float64 (the absolute error when ref is all zeros).

    Non-finite entries must sit at the same places with the same values; they are then left out.
    """
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, f"shape {ours.shape} != torch's {ref.shape}"
    fin = np.isfinite(ref)
    assert np.array_equal(fin, np.isfinite(ours)), "non-finite values at different places"
    assert np.array_equal(ours[~fin], ref[~fin], equal_nan=True), "different non-finite values"
    if not fin.any():
        return 0.0
    diff = np.max(np.abs(ours[fin] - ref[fin]))
    scale = np.max(np.abs(ref[fin]))
    return float(diff / scale) if scale > 0 else float(diff)


def record(family, dtype, err):
    """Keep the worst error per (family, dtype); returns err."""
    d = WORST.setdefault(family, {})
    key = np.dtype(dtype).name
    d[key] = max(d.get(key, 0.0), err)
    return err


def assert_close(family, dtype, ours, ref, what):
    err = record(family, dtype, rel_err(ours, ref))
    tol = TOL[np.dtype(dtype)]
    assert err <= tol, f"{family}: {what} relative error {err:.3e} > {tol:.0e} ({np.dtype(dtype).name})"
    return err


def _prepare(inputs, dtype, device):
    """(tinytensor args, torch args, index of each differentiable input)."""
    ours, theirs, wrt = [], [], []
    for i, x in enumerate(inputs):
        const = isinstance(x, Const)
        v = x.value if const else x
        if isinstance(v, np.ndarray) and v.dtype.kind == "f":
            v = v.astype(dtype)
            ours.append(tt.Tensor(backend.to_device(v.copy(), device), requires_grad=not const))
            theirs.append(torch.tensor(v, requires_grad=not const))
            if not const:
                wrt.append(i)
        elif isinstance(v, np.ndarray):  # integer indices, bool masks: constants on both sides
            ours.append(backend.to_device(v.copy(), device))
            theirs.append(torch.from_numpy(v.copy()))
        else:  # Python values
            ours.append(v)
            theirs.append(v)
    return ours, theirs, wrt


def check(family, tt_fn, torch_fn, *inputs, dtype=np.float64, device="cpu", grad=True, seed=0,
          positive_w=False):
    """Compare tt_fn and torch_fn on the same inputs: output, then gradients of sum(out * W).

    Float arrays become differentiable inputs (wrap in Const to opt out); other arrays and
    Python values are passed as they are. W is standard normal, or uniform in [0.5, 1.5) with
    positive_w (with positive inputs, gradients summed over broadcast or reduced dimensions
    then cannot cancel: a sum that cancels to ~0 has an unbounded relative error in float32 in
    either library). Returns the worst relative error.
    """
    dtype = np.dtype(dtype)
    ours, theirs, wrt = _prepare(inputs, dtype, device)
    out = tt_fn(*ours)
    ref = torch_fn(*theirs)
    assert isinstance(out, tt.Tensor), f"{family}: tinytensor returned {type(out).__name__}"
    assert out.device.type == device, f"{family}: output on {out.device}, inputs on {device}"
    assert out.shape == tuple(ref.shape), f"{family}: shape {out.shape} != torch's {tuple(ref.shape)}"
    if ref.dtype in (torch.float32, torch.float64):
        assert out.dtype == np.dtype(str(ref.dtype).replace("torch.", "")), \
            f"{family}: dtype {out.dtype} != torch's {ref.dtype}"
    worst = assert_close(family, dtype, out.numpy(), ref.detach().numpy(), "output")
    if not grad or not wrt:
        return worst

    rng = np.random.default_rng(seed)
    w = (rng.uniform(0.5, 1.5, out.shape) if positive_w else rng.standard_normal(out.shape)).astype(dtype)
    with np.errstate(invalid="ignore"):  # a -inf output (masked_fill) makes the loss value nan
        (out * tt.Tensor(backend.to_device(w, device))).sum().backward()
    (ref * torch.from_numpy(w)).sum().backward()
    for i in wrt:
        g_ref = theirs[i].grad
        g = ours[i].grad
        assert g is not None or g_ref is None, f"{family}: input {i} got no gradient"
        if g_ref is None:
            g_ref = torch.zeros(theirs[i].shape, dtype=theirs[i].dtype)
        if g is None:
            g = np.zeros(ours[i].shape, dtype=dtype)
        assert backend.device_of(g) == device, f"{family}: gradient of input {i} not on {device}"
        assert g.dtype == dtype, f"{family}: gradient of input {i} has dtype {g.dtype}, not {dtype}"
        worst = max(worst, assert_close(family, dtype, backend.to_numpy(g), g_ref.numpy(),
                                        f"gradient of input {i}"))
    return worst


def copy_module(tt_module, torch_module):
    """Copy torch_module's parameters into tt_module through load_state_dict (names must match)."""
    sd = {k: v.detach().numpy().copy() for k, v in torch_module.state_dict().items()}
    tt_module.load_state_dict(sd)


def check_module(family, tt_module, torch_module, x, dtype=np.float64, device="cpu", seed=0):
    """A layer against its torch.nn twin with copied weights: output, input gradient and every
    named parameter gradient of sum(out * W). x: a float input (differentiated) or integer indices."""
    dtype = np.dtype(dtype)
    torch_module = torch_module.to(_TORCH_DTYPE[dtype])
    with torch.no_grad():  # move off the default init (LayerNorm's ones/zeros) so the copy matters
        gen = torch.Generator().manual_seed(seed)
        for p in torch_module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    tt_module.astype(dtype)
    copy_module(tt_module, torch_module)
    tt_module.to(device)
    ours, theirs, wrt = _prepare([x], dtype, device)
    out, ref = tt_module(ours[0]), torch_module(theirs[0])
    assert out.shape == tuple(ref.shape), f"{family}: shape {out.shape} != torch's {tuple(ref.shape)}"
    assert out.dtype == dtype, f"{family}: output dtype {out.dtype}, expected {dtype}"
    worst = assert_close(family, dtype, out.numpy(), ref.detach().numpy(), "output")
    w = np.random.default_rng(seed).standard_normal(out.shape).astype(dtype)
    (out * tt.Tensor(backend.to_device(w, device))).sum().backward()
    (ref * torch.from_numpy(w)).sum().backward()
    if wrt:
        worst = max(worst, assert_close(family, dtype, backend.to_numpy(ours[0].grad),
                                        theirs[0].grad.numpy(), "input gradient"))
    theirs_p = dict(torch_module.named_parameters())
    ours_p = dict(tt_module.named_parameters())
    assert sorted(ours_p) == sorted(theirs_p), f"{family}: parameters {sorted(ours_p)} != {sorted(theirs_p)}"
    for name, p in ours_p.items():
        assert p.grad is not None, f"{family}: {name} got no gradient"
        worst = max(worst, assert_close(family, dtype, backend.to_numpy(p.grad),
                                        theirs_p[name].grad.numpy(), f"gradient of {name}"))
    return worst
