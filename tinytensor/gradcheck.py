"""Gradient checking by float64 central differences (the DeZero-style check, shipped).

    from tinytensor.gradcheck import gradcheck
    gradcheck(lambda x, w: (x @ w).tanh(), np.random.randn(3, 4), np.random.randn(4, 2))

`gradcheck` reduces the output to a scalar with a fixed random weighting, L = sum(f(...) * W),
so every output element matters, then compares the gradients `backward()` puts on each float
input with (L(x + eps) - L(x - eps)) / (2 eps), one element at a time. It works on the host in
float64 only: in float32 the rounding error of a finite difference swamps the comparison.
"""
import numpy as np

from . import backend
from .tensor import Tensor, no_grad


def _host_float64(x, name):
    arr = backend.to_numpy(x.data if isinstance(x, Tensor) else x)
    if arr.dtype != np.float64:
        raise TypeError(f"gradcheck needs float64 inputs ({name} is {arr.dtype}): finite "
                        f"differences in lower precision are dominated by rounding error")
    return arr


def _is_float(x):
    data = x.data if isinstance(x, Tensor) else x
    return hasattr(data, "dtype") and data.dtype.kind == "f"


def numerical_grad(loss_fn, arrays, wrt, eps=1e-6):
    """Central differences of the scalar loss_fn(*arrays) w.r.t. arrays[i] for i in wrt.

    arrays are float64 NumPy arrays; they are perturbed in place and restored.
    """
    grads = []
    for i in wrt:
        x = arrays[i]
        g = np.zeros_like(x)
        flat, gflat = x.reshape(-1), g.reshape(-1)      # views: writes reach x and g
        for k in range(flat.size):
            orig = flat[k]
            flat[k] = orig + eps
            up = loss_fn(*arrays)
            flat[k] = orig - eps
            down = loss_fn(*arrays)
            flat[k] = orig
            gflat[k] = (up - down) / (2 * eps)
        grads.append(g)
    return grads


def gradcheck(fn, *inputs, eps=1e-6, atol=1e-6, rtol=1e-5, seed=0, device="cpu"):
    """Check fn's analytic gradients against central differences; return the worst error.

    fn: a function of Tensors returning a Tensor. inputs: float64 arrays (or Tensors), each
    differentiated; any other input (integer indices, bool masks, Python values) is passed
    through unchanged. Raises AssertionError naming the input and the largest mismatch when
    |analytic - numeric| > atol + rtol * |numeric| anywhere. Returns the largest
    |analytic - numeric| / max(1, |numeric|) over all inputs.
    """
    arrays = [(_host_float64(x, f"input {i}").copy() if _is_float(x) else x)
              for i, x in enumerate(inputs)]
    wrt = [i for i, x in enumerate(inputs) if _is_float(x)]
    if not wrt:
        raise ValueError("gradcheck needs at least one float64 input to differentiate")

    def to_tensors(arrs, requires_grad):
        return [Tensor(backend.to_device(a, device), requires_grad=requires_grad)
                if i in wrt else a for i, a in enumerate(arrs)]

    with no_grad():
        out = fn(*to_tensors(arrays, False))
    weights = np.random.default_rng(seed).standard_normal(out.shape)

    def loss(*arrs):
        with no_grad():
            y = fn(*to_tensors(arrs, False))
        return float(np.sum(backend.to_numpy(y.data) * weights))

    # analytic: backward of sum(f * W) is backward(grad=W)
    ts = to_tensors(arrays, True)
    y = fn(*ts)
    y.backward(backend.to_device(weights, device))
    analytic = [backend.to_numpy(ts[i].grad) if ts[i].grad is not None else np.zeros_like(arrays[i])
                for i in wrt]
    numeric = numerical_grad(loss, arrays, wrt, eps)

    worst = 0.0
    for i, a, n in zip(wrt, analytic, numeric):
        if a.shape != n.shape:
            raise AssertionError(f"gradcheck: gradient of input {i} has shape {a.shape}, "
                                 f"expected {n.shape}")
        diff = np.abs(a - n)
        bad = diff > atol + rtol * np.abs(n)
        if bad.any():
            k = np.unravel_index(np.argmax(diff - rtol * np.abs(n)), diff.shape)
            raise AssertionError(f"gradcheck: input {i} at index {tuple(int(j) for j in k)}: "
                                 f"analytic {a[k]!r} vs numeric {n[k]!r} "
                                 f"({int(bad.sum())} of {bad.size} elements differ)")
        if diff.size:
            worst = max(worst, float(np.max(diff / np.maximum(1.0, np.abs(n)))))
    return worst
