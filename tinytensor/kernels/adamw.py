"""One AdamW step over arrays (a stretch of flat buffers, or one parameter's), in place,
exactly torch.optim.AdamW's update:

    p  = p * (1 - lr * weight_decay)                  (decoupled weight decay)
    m  = m + (1 - beta1) * (g - m)                    (torch's lerp)
    v  = v * beta2 + (1 - beta2) * g * g
    p  = p - lr / (1 - beta1**step) * m / (sqrt(v) / sqrt(1 - beta2**step) + eps)

p, g, m (exp_avg), v (exp_avg_sq) are arrays of one shape and dtype; `step` counts from 1
(the step being taken). This is AdamW's only copy of the update: optim.AdamW calls it on a
stretch of its flat buffers (a whole parameter group, whose parameters, gradients and moments
are views into them; groups with different hyperparameters are contiguous slices, one call
each), or on one parameter's own arrays when a group cannot take the flat path.

The kernel is one pass over memory: each element of p, m, v is read and written once and g
read once, where the composed array expression makes a dozen passes.

Each CuPy kernel sits beside its NumPy reference with the same signature; the unsuffixed
function dispatches on the array type.
"""
import math

import numpy as np

from .. import backend
from . import _cuda

SOURCE = r"""
// Grid-stride loop over the n elements of the flat buffers; the bias corrections are
// computed on the host in double precision, as torch does.
template <typename T>
__global__ void adamw_step(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m,
                           T* __restrict__ v, long long n, T decay, T one_minus_beta1, T beta2,
                           T one_minus_beta2, T step_size, T bias_correction2_sqrt, T eps) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const T gi = g[i];
        T mi = m[i];
        mi += one_minus_beta1 * (gi - mi);
        const T vi = v[i] * beta2 + one_minus_beta2 * gi * gi;
        const T denom = tt_sqrt(vi) / bias_correction2_sqrt + eps;
        p[i] = p[i] * decay - step_size * (mi / denom);
        m[i] = mi;
        v[i] = vi;
    }
}
"""

_STEP = "adamw_step"
FAMILY = _cuda.KernelFamily("adamw", SOURCE,
                            [_cuda.instantiate(_STEP, t) for t in ("float", "double")])


def _check(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
    for name, a in (("grad", g), ("exp_avg", m), ("exp_avg_sq", v)):
        if a.shape != p.shape or a.dtype != p.dtype:
            raise ValueError(f"adamw {name} must match the parameters' shape {p.shape} and dtype "
                             f"{p.dtype}, got {a.shape} {a.dtype}")
    if p.dtype.kind != "f":
        raise TypeError(f"adamw parameters must be floating point, got dtype {p.dtype}")
    if int(step) != step or step < 1:
        raise ValueError(f"adamw step counts from 1, got {step}")
    if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= beta1 < 1 and 0 <= beta2 < 1):
        raise ValueError(f"invalid AdamW hyperparameters: lr={lr}, betas=({beta1}, {beta2}), "
                         f"eps={eps}, weight_decay={weight_decay}")


def _hyper(lr, beta1, beta2, weight_decay, step):
    """The host-side scalars of one step, in double precision like torch."""
    lr, beta1, beta2 = float(lr), float(beta1), float(beta2)
    return dict(decay=1.0 - lr * float(weight_decay),
                one_minus_beta1=1.0 - beta1,
                one_minus_beta2=1.0 - beta2,
                step_size=lr / (1.0 - beta1 ** int(step)),
                bias_correction2_sqrt=math.sqrt(1.0 - beta2 ** int(step)))


# ------------------------------------------------------------------ NumPy reference
def adamw_step_ref(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """One in-place AdamW step on NumPy arrays (one temporary the size of p)."""
    _check(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step)
    h = _hyper(lr, beta1, beta2, weight_decay, step)
    if weight_decay != 0:
        p *= h["decay"]
    tmp = g - m
    tmp *= h["one_minus_beta1"]
    m += tmp                                      # m.lerp_(g, 1 - beta1)
    v *= float(beta2)
    np.multiply(g, h["one_minus_beta2"], out=tmp)
    tmp *= g
    v += tmp                                      # v.mul_(beta2).addcmul_(g, g, 1 - beta2)
    np.sqrt(v, out=tmp)
    tmp /= h["bias_correction2_sqrt"]
    tmp += float(eps)                             # denom
    np.divide(m, tmp, out=tmp)
    tmp *= h["step_size"]
    p -= tmp


# ------------------------------------------------------------------ CuPy kernel
def _step_cuda(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
    for name, a in (("params", p), ("exp_avg", m), ("exp_avg_sq", v)):
        if not a.flags.c_contiguous:
            raise ValueError(f"adamw updates {name} in place and needs it C-contiguous")
    g = _cuda.contiguous(g)
    if p.size == 0:
        return
    h = _hyper(lr, beta1, beta2, weight_decay, step)
    s = lambda x: _cuda.scalar(x, p.dtype)   # noqa: E731
    kernel = FAMILY.function(_cuda.instantiate(_STEP, _cuda.ctype(p.dtype)))
    grid, block = _cuda.flat_grid(p.size)
    kernel(grid, block, (p, g, m, v, np.int64(p.size), s(h["decay"]), s(h["one_minus_beta1"]),
                         s(beta2), s(h["one_minus_beta2"]), s(h["step_size"]),
                         s(h["bias_correction2_sqrt"]), s(eps)))


# ------------------------------------------------------------------ dispatch
def adamw_step(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """One in-place AdamW step: the CUDA kernel for cupy arrays, else the NumPy reference."""
    if backend.is_cuda(p):
        _check(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step)
        return _step_cuda(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step)
    return adamw_step_ref(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step)
