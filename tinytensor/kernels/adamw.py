"""AdamW's faster versions; the reference is tinytensor.fused.AdamWUpdate (torch.optim.AdamW's
update rule, in place, on a stretch of the optimizer's flat buffers or one parameter's arrays).

    CUDAAdamW      one CUDA kernel: each element of p, m, v read and written once, g read once,
                   where the reference's array expressions make a dozen passes over memory
    NumbaAdamW     NumPy buffers: the CUDA kernel's one pass as a compiled loop, the buffers
                   split over threads when they are large; bit-identical to the reference
    ThreadedAdamW  large NumPy buffers where numba is not installed: the reference's passes
                   over cache-sized blocks, the blocks split over threads
"""
import math

import numpy as np

from .. import fused
from . import _cuda, cuda_floats, numba_loops, numpy_floats, threads

# Buffers of at least this many elements are split over threads: the dozen passes over four
# arrays make threads worth it from far fewer elements than threads.MIN_ELEMENTS
MIN_ELEMENTS = 1 << 16

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


def adamw_cuda(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
    """One in-place AdamW step on cupy arrays (p, m, v C-contiguous)."""
    _check(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step)
    _step_cuda(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step)


class CUDAAdamW(fused.AdamWUpdate):
    device = "cuda"
    @staticmethod
    def takes(p, g, m, v, *hyper):
        return cuda_floats(p, g, m, v) and all(a.flags.c_contiguous for a in (p, m, v))

    @staticmethod
    def apply(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
        adamw_cuda(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay)


class NumbaAdamW(fused.AdamWUpdate):
    device = "cpu"
    @staticmethod
    def takes(p, g, m, v, *hyper):
        return (numpy_floats(p, g, m, v) and p.ndim == 1
                and all(a.flags.c_contiguous for a in (p, g, m, v)) and numba_loops() is not None)

    @staticmethod
    def apply(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
        h = _hyper(lr, beta1, beta2, weight_decay, step)
        s = p.dtype.type
        if weight_decay == 0:
            h["decay"] = 1.0                       # the reference skips the multiplication
        scalars = (s(h["decay"]), s(h["one_minus_beta1"]), s(beta2), s(h["one_minus_beta2"]),
                   s(h["bias_correction2_sqrt"]), s(eps), s(h["step_size"]))
        step_ = numba_loops().adamw_
        threads.rows(p.size, lambda a, b: step_(p[a:b], g[a:b], m[a:b], v[a:b], *scalars),
                     p.size, min_size=MIN_ELEMENTS)


class ThreadedAdamW(fused.AdamWUpdate):
    device = "cpu"
    @staticmethod
    def takes(p, g, m, v, *hyper):
        return numpy_floats(p, g, m, v) and p.ndim == 1 and p.size >= MIN_ELEMENTS \
            and threads.count() > 1

    @staticmethod
    def apply(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
        update = fused.AdamWUpdate.apply
        threads.rows(p.size, lambda a, b: update(p[a:b], g[a:b], m[a:b], v[a:b], step, lr, beta1,
                                                 beta2, eps, weight_decay),
                     p.size, block=threads.CACHE_ELEMENTS, min_size=MIN_ELEMENTS)


VERSIONS = {"AdamWUpdate": [CUDAAdamW, NumbaAdamW, ThreadedAdamW]}
