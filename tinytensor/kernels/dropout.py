"""Dropout's faster version; the reference is tinytensor.fused.Dropout.

    ThreadedDropout  large NumPy inputs: the keep-mask drawn in parallel parts (keep_mask) and
                     applied over threads in cache-sized blocks

keep_mask draws exactly fused.keep_mask's draw, rng.random(shape, float32) >= p, so a threaded
dropout (and the threaded attention, which uses it too) drops the elements the reference drops.
"""
import numpy as np

from .. import fused
from .. import random as _random
from . import threads


def keep_mask(shape, p):
    """fused.keep_mask(shape, p) for NumPy, the draw split over threads when large."""
    gen = _random.rng()
    n = int(np.prod(shape))
    if n < threads.MIN_ELEMENTS or threads.count() < 2 \
            or not isinstance(gen.bit_generator, np.random.PCG64):
        return fused.keep_mask(shape, p)
    keep = np.empty(n, dtype=bool)
    _parallel_uniform(gen, n, lambda a, b, u: np.greater_equal(u, p, out=keep[a:b]))
    return keep.reshape(shape)


def _parallel_uniform(gen, n, use):
    """Draw gen.random(n, dtype=float32) in parallel parts; use(a, b, u) gets elements a..b-1.

    PCG64 makes one 64-bit output per step and float32 draws take its halves in turn (low,
    then high), so element i comes from output i // 2: a copy of the generator advanced by
    a // 2 steps draws elements a.. exactly as the single draw would (a even). Afterwards gen
    is left where the single draw leaves it, half-used output included.
    """
    bitgen = gen.bit_generator
    state = bitgen.state
    start = 0
    if state["has_uint32"]:  # the first element is the high half of an output already made
        use(0, 1, gen.random(1, dtype=np.float32))
        state, start = bitgen.state, 1

    m = n - start                      # elements drawn from `state` on

    def part(a, b):                    # elements start + a .. start + b - 1, a made even
        a, b = 2 * (a // 2), (2 * (b // 2) if b < m else m)
        if a < b:
            g = np.random.PCG64()
            g.state = state
            g.advance(a // 2)
            use(start + a, start + b, np.random.Generator(g).random(b - a, dtype=np.float32))

    threads.for_ranges(m, part)
    bitgen.state = state
    bitgen.advance(m // 2)
    if m % 2:                          # the last element took the low half of one more output
        high = int(bitgen.random_raw()) >> 32
        st = bitgen.state
        st["has_uint32"], st["uinteger"] = 1, high
        bitgen.state = st


class ThreadedDropout(fused.Dropout):
    device = "cpu"
    @staticmethod
    def takes(x, p):
        return type(x) is np.ndarray and x.ndim > 0 and x.size >= threads.MIN_ELEMENTS \
            and threads.count() > 1

    def forward(self, x, p):
        self.keep, self.scale = keep_mask(x.shape, p), x.dtype.type(1 / (1 - p))
        return self.masked(x)

    def backward(self, gy):
        return self.masked(gy)

    def masked(self, a):
        """a * keep * scale, in blocks of rows over threads."""
        out = np.empty_like(a)

        def rows(r0, r1):
            np.multiply(a[r0:r1], self.keep[r0:r1], out=out[r0:r1])
            out[r0:r1] *= self.scale
        threads.rows(len(a), rows, a.size, block=threads.block_rows(a[0].size))
        return out


VERSIONS = {"Dropout": [ThreadedDropout]}
