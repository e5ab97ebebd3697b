"""Fused kernels: each a CuPy (CUDA) kernel beside a NumPy reference with the same signature.

    family              dispatching functions                          NumPy references
    causal softmax      causal_softmax_forward / _backward             ..._ref
    layer norm          layer_norm_forward / _backward                 ..._ref
    cross-entropy       cross_entropy_forward / _backward              ..._ref
    AdamW               adamw_step                                     adamw_step_ref
    bias+ReLU+dropout   bias_relu_dropout_forward / _backward          ..._ref

A dispatching function runs the CUDA kernel when its first array is a cupy array and the
NumPy reference otherwise; the references are written to serve CPU training too (in-place
updates, no float64 temporaries for float32 data). The kernels handle float32 and float64.

CUDA sources are compiled on first use (cupy caches the binaries on disk);
`compile_all()` compiles every kernel up front, e.g. before timing. Importing this package
never needs cupy. Without a GPU, tests/cuda_emulator.py runs the same CUDA source on the CPU
(one thread per CUDA thread), which is how tests/test_kernels.py checks the kernels there.
"""
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
    "compile_all", "families",
]


def families():
    """Every kernel family (name, CUDA source, template instantiations)."""
    return list(KernelFamily.registry)


def compile_all():
    """Compile every CUDA kernel now, outside any timed region (needs cupy and a GPU)."""
    for family in KernelFamily.registry:
        family.compile()
