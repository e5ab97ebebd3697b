"""tinytensor: a small reverse-mode autograd library on NumPy (CPU) and CuPy (GPU)."""
from . import ops as _ops  # attaches the Tensor operators and methods
from .backend import cuda_available
from .ops import cat, exp, log, matmul, stack, tanh, where
from .random import manual_seed
from .tensor import (Function, Tensor, get_default_dtype, is_grad_enabled, no_grad,
                     set_default_dtype, tensor)
from . import nn, optim  # noqa: E402
from .malloc import keep_freed_memory as _keep_freed_memory

_keep_freed_memory()  # glibc keeps freed temporaries for reuse instead of re-faulting them

__version__ = "0.1.0"

__all__ = ["Tensor", "tensor", "Function", "no_grad", "is_grad_enabled", "set_default_dtype",
           "get_default_dtype", "manual_seed", "cat", "stack", "where", "exp", "log", "tanh",
           "matmul", "cuda_available", "nn", "optim", "zeros", "ones", "randn", "arange"]


def _factory(fill):
    def make(*shape, requires_grad=False, dtype=None, device="cpu"):
        import numpy as np
        from . import backend
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        arr = fill(shape, np.dtype(dtype or get_default_dtype()))
        return Tensor(backend.to_device(arr, device), requires_grad=requires_grad)
    return make


def _randn(shape, dtype):
    from . import random
    return random.rng().standard_normal(shape).astype(dtype)


import numpy as _np  # noqa: E402

zeros = _factory(lambda s, d: _np.zeros(s, d))
ones = _factory(lambda s, d: _np.ones(s, d))
randn = _factory(_randn)


def arange(*args, dtype=None):
    return Tensor(_np.arange(*args, dtype=dtype))
