"""The library's random streams: parameter initialisation and dropout draw from here.

`manual_seed(n)` reseeds every stream, so a seeded program is reproducible.
"""
import numpy as np

from . import backend

_rng = np.random.default_rng(0)
_cuda_rng = None
_seed = 0


def manual_seed(seed):
    """Seed every random stream the library draws from (initialisation, dropout).

    Takes what torch.manual_seed takes: any int in [-2**63, 2**64) (a negative one means
    seed + 2**64, as in torch); outside that range ValueError, torch's "Overflow when
    unpacking long long".
    """
    global _rng, _cuda_rng, _seed
    seed = int(seed)
    if not -2**63 <= seed < 2**64:
        raise ValueError(f"Overflow when unpacking long long: the seed must be in "
                         f"[-2**63, 2**64), got {seed}")
    _seed = seed % 2**64
    _rng = np.random.default_rng(_seed)
    _cuda_rng = None  # re-created lazily from the same seed


def rng(xp=np):
    """The generator for arrays of module xp (numpy.random.Generator or cupy's)."""
    global _cuda_rng
    if xp is np:
        return _rng
    if _cuda_rng is None:
        _cuda_rng = backend.cp.random.default_rng(_seed)
    return _cuda_rng
