"""Fused kernels: each a CuPy (CUDA) kernel beside a NumPy reference with the same signature.

    family              dispatching functions                          NumPy references
    causal softmax      causal_softmax_forward / _backward             ..._ref
    layer norm          layer_norm_forward / _backward                 ..._ref
    cross-entropy       cross_entropy_forward / _backward              ..._ref
    AdamW               adamw_step                                     adamw_step_ref
    bias+ReLU+dropout   bias_relu_dropout_forward / _backward          ..._ref

A dispatching function runs the CUDA kernel when its first array is a cupy array and the
NumPy reference otherwise; the references are written to serve CPU training too (in-place
updates, no float64 temporaries for float32 data). The kernels handle float32 and float64:
`handles(*arrays)` says whether they take given arrays, which is how the ops choose them.

Who calls them on the GPU (docs/gpu.md has the table): fused.CausalSoftmax and
fused.CausalAttention (causal softmax), fused.LayerNorm (layer norm), fused.CrossEntropy
(cross-entropy), fused.LinearReLU (bias + ReLU, no dropout), optim.AdamW (AdamW).

On the CPU, kernels/cpu.py holds the compiled (Numba) counterparts of the small memory-bound
ops, an optional accelerator used when numba is installed (`pip install -e ".[fast]"`); it is
imported by the ops that use it, and imports numba only on first use.

CUDA sources are compiled on first use (cupy caches the binaries on disk);
`compile_all()` compiles every kernel up front, e.g. before timing. Importing this package
never needs cupy. Without a GPU, tests/cuda_emulator.py runs the same CUDA source on the CPU
(one thread per CUDA thread), which is how tests/test_kernels.py checks the kernels there.
"""
import numpy as np

from .. import backend
from ._cuda import KernelFamily
from .adamw import adamw_step, adamw_step_ref
from .bias_relu_dropout import (bias_relu_dropout_backward, bias_relu_dropout_backward_ref,
                                bias_relu_dropout_forward, bias_relu_dropout_forward_ref)
from .cross_entropy import (cross_entropy_backward, cross_entropy_backward_ref,
                            cross_entropy_forward, cross_entropy_forward_ref)
from .layernorm import (layer_norm_backward, layer_norm_backward_ref, layer_norm_forward,
                        layer_norm_forward_ref)
from .softmax import (causal_softmax_backward, causal_softmax_backward_ref,
                      causal_softmax_forward, causal_softmax_forward_ref)

__all__ = [
    "causal_softmax_forward", "causal_softmax_backward",
    "causal_softmax_forward_ref", "causal_softmax_backward_ref",
    "layer_norm_forward", "layer_norm_backward",
    "layer_norm_forward_ref", "layer_norm_backward_ref",
    "cross_entropy_forward", "cross_entropy_backward",
    "cross_entropy_forward_ref", "cross_entropy_backward_ref",
    "adamw_step", "adamw_step_ref",
    "bias_relu_dropout_forward", "bias_relu_dropout_backward",
    "bias_relu_dropout_forward_ref", "bias_relu_dropout_backward_ref",
    "compile_all", "families", "handles",
]


def handles(*arrays):
    """True when the CUDA kernels take these arrays: each a cupy array of float32 or float64
    (None entries, absent optional arguments, are skipped). False on NumPy."""
    if backend.cp is None:  # no cupy: nothing is a cupy array (the CPU's fast answer)
        return False
    given = [a for a in arrays if a is not None]
    return bool(given) and all(backend.is_cuda(a) and a.dtype in (np.float32, np.float64)
                               for a in given)


def families():
    """Every kernel family (name, CUDA source, template instantiations)."""
    return list(KernelFamily.registry)


def compile_all():
    """Compile every CUDA kernel now, outside any timed region (needs cupy and a GPU)."""
    for family in KernelFamily.registry:
        family.compile()
