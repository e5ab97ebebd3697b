"""torch.cuda's questions, for code that asks them: `tinytensor.cuda.is_available()`.

The GPU itself is reached through CuPy (tinytensor.backend); this module only answers whether
one is usable, how many there are, and waits for queued GPU work.
"""
from . import backend


def is_available():
    """True when CuPy imports and sees a GPU (tensors can then live on 'cuda')."""
    return backend.cuda_available()


def device_count():
    """The number of visible GPUs (0 without CuPy or a GPU)."""
    return backend.device_count()


def _need_gpu(what):
    if not backend.cuda_available():
        raise RuntimeError(f"torch.cuda.{what}(): no GPU is usable (tinytensor reaches GPUs "
                           f"through CuPy: pip install cupy-cuda12x on a machine with an NVIDIA "
                           f"GPU); check torch.cuda.is_available() first")


def synchronize(device=None):
    """Wait until the GPU has finished the work queued so far (torch raises without a GPU,
    and so does this)."""
    _need_gpu("synchronize")
    backend.synchronize()


def current_device():
    _need_gpu("current_device")
    return 0


def manual_seed(seed):
    """Seed the GPU's random stream. tinytensor has one seed for all of its streams, so this
    is tinytensor.manual_seed (torch's manual_seed also seeds every GPU)."""
    from .random import manual_seed as seed_all
    seed_all(seed)


manual_seed_all = manual_seed
