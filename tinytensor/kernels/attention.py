"""Causal attention's faster version; the reference is tinytensor.fused.CausalAttention.

    ChunkedAttention  NumPy or CuPy: the scale applied to q (hs wide, not T), only the diagonal
                      block masked, the softmax in place, 1 / (1 - p) applied to the (T, hs)
                      result; for T >= 2 * CHUNK the queries go in chunks, each against the
                      keys up to its own position only, so most of the masked future is never
                      computed; batches of MIN_SCORES scores and more split over threads;
                      backward keeps only the attention weights and a bool keep-mask

Its causal softmax, in place over the scores: a CUDA kernel on the GPU (one warp per row,
below), a compiled CPU loop (kernels/_numba.py) for float32 on the CPU, else NumPy.
Its layout: y (B, nh, T, hs) is a view of a contiguous (B, T, nh, hs) array, so the heads side
by side, y.transpose(1, 2).reshape(B, T, nh * hs), cost no copy; the gradients of q, k and v
are views of one (B, T, 3, nh, hs) array, laid out as a fused q/k/v projection's output, so
that the views back to (B, T, C) cost none either. Queries that are the last T of Tk > T
positions (generation with a KV cache) see past = Tk - T more keys in every chunk.

The CUDA causal softmax, with the scale folded in:

    forward:  y  = softmax(scale * s) over the last axis, future keys masked out
    backward: gs = scale * y * (gy - sum(gy * y, last axis))

s, y, gy, gs have shape (..., Tq, Tk) with Tq <= Tk: the Tq queries are the last Tq of Tk
positions, query i sees keys 0 .. Tk - Tq + i. Masked entries of y and gs are exactly 0. `out`
(optional, C-contiguous, of the result's shape and dtype) receives the result and may be the
input itself.
"""
import numpy as np

from .. import backend, fused
from . import _cuda, cuda_floats, dropout, numba_loops, numpy_floats, threads

# queries are processed in chunks of this many positions once T reaches 2 chunks
CHUNK = 64

SOURCE = r"""
// One warp per row of scores (..., Tq, Tk) laid end to end: row r is query i = r % Tq, which
// sees keys 0 .. Tk - Tq + i.
// y may be s (in place): each element is read, then written, by the same lane, after the
// row's max and sum are complete (the warp reductions synchronise the warp); hence no
// __restrict__ on s and y.
template <typename T>
__global__ void causal_softmax_fwd(const T* s, T* y, long long rows, int Tq, int Tk, T scale) {
    const long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;                       // the whole warp leaves together
    const int lane = threadIdx.x % 32;
    const int last = Tk - Tq + (int)(row % Tq);    // the last key this query sees
    const T* sr = s + row * Tk;
    T* yr = y + row * Tk;

    T m = tt_neg_inf(scale);
    for (int j = lane; j <= last; j += 32) m = tt_max(m, sr[j] * scale);
    m = warp_max(m);
    T sum = 0;
    for (int j = lane; j <= last; j += 32) sum += tt_exp(sr[j] * scale - m);
    sum = warp_sum(sum);
    for (int j = lane; j < Tk; j += 32)
        yr[j] = j <= last ? tt_exp(sr[j] * scale - m) / sum : T(0);
}

// gs may be gy (in place), as y may be s above.
template <typename T>
__global__ void causal_softmax_bwd(const T* __restrict__ y, const T* gy, T* gs,
                                   long long rows, int Tq, int Tk, T scale) {
    const long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    const int lane = threadIdx.x % 32;
    const int last = Tk - Tq + (int)(row % Tq);
    const T* yr = y + row * Tk;
    const T* gyr = gy + row * Tk;
    T* gsr = gs + row * Tk;

    T dot = 0;                                     // sum_j gy_j * y_j over the visible keys
    for (int j = lane; j <= last; j += 32) dot += gyr[j] * yr[j];
    dot = warp_sum(dot);
    for (int j = lane; j < Tk; j += 32)
        gsr[j] = j <= last ? yr[j] * (gyr[j] - dot) * scale : T(0);
}
"""

_FWD, _BWD = "causal_softmax_fwd", "causal_softmax_bwd"
FAMILY = _cuda.KernelFamily(
    "causal_softmax", SOURCE,
    [_cuda.instantiate(k, t) for k in (_FWD, _BWD) for t in ("float", "double")])


def _check_scores(s, what="scores"):
    if s.ndim < 2 or s.shape[-2] > s.shape[-1]:
        raise ValueError(f"causal softmax {what} must have shape (..., Tq, Tk) with Tq <= Tk, "
                         f"got {s.shape}")
    if s.dtype.kind != "f":
        raise TypeError(f"causal softmax {what} must be floating point, got dtype {s.dtype}")


def _check_out(out, like, what):
    if out is None:
        return
    if out.shape != like.shape or out.dtype != like.dtype or not out.flags.c_contiguous:
        raise ValueError(f"causal softmax out= must be a C-contiguous {like.dtype} array of the "
                         f"{what}'s shape {like.shape}, got {out.dtype} {out.shape} "
                         f"(contiguous: {out.flags.c_contiguous})")


def _launch(name, inputs, scale, out):
    """Kernel `name` over the rows of the cupy arrays inputs (..., Tq, Tk), into out (a new
    array when None): forward (s) -> y, or backward (y, gy) -> gs."""
    y = backend.cp.empty_like(inputs[0]) if out is None else out
    Tq, Tk = inputs[0].shape[-2:]
    rows = inputs[0].size // Tk if Tk else 0
    if rows:
        kernel = FAMILY.function(_cuda.instantiate(name, _cuda.ctype(y.dtype)))
        grid, block = _cuda.row_grid(rows)
        kernel(grid, block, (*inputs, y, np.int64(rows), np.int32(Tq), np.int32(Tk),
                             _cuda.scalar(scale, y.dtype)))
    return y


def _forward_cuda(s, scale, out=None):
    return _launch(_FWD, [_cuda.contiguous(s)], scale, out)


def _backward_cuda(y, gy, scale, out=None):
    y = _cuda.contiguous(y)
    return _launch(_BWD, [y, _cuda.contiguous(gy, y.dtype)], scale, out)


def causal_softmax_forward_cuda(s, scale, out=None):
    """The causal softmax of the cupy scores s (..., Tq, Tk), into out when given (maybe s)."""
    _check_scores(s)
    _check_out(out, s, "scores")
    return _forward_cuda(s, scale, out)


def causal_softmax_backward_cuda(y, gy, scale, out=None):
    """The gradient of the scores from the output y and its gradient gy (cupy), into out when
    given (maybe gy)."""
    _check_scores(y, "output")
    if gy.shape != y.shape:
        raise ValueError(f"causal softmax gradient shape {gy.shape} != output shape {y.shape}")
    _check_out(out, y, "output")
    return _backward_cuda(y, gy, scale, out)


# ------------------------------------------------------------------ the softmax on the CPU
# softmax is shift-invariant, and the usual shift by each row's max only guards exp against
# overflow and the row sum against underflow. Computing a row max over short rows costs NumPy
# more than the exp itself, so on NumPy the shift is skipped when two cheap checks prove it
# unneeded: no score above NO_SHIFT_MAX (exp(60) ~ 1e26: no overflow, even summed over
# 10**12 keys) and no query's own score (its diagonal key, never masked, a lower bound on its row
# max) below -NO_SHIFT_MAX (so each row sum is at least exp(-60) ~ 1e-26, a normal float).
# Without the shift nothing is lost: exp(x) / sum(exp(x)) rounds as exp(x - m) / sum(exp(x - m)).
NO_SHIFT_MAX = 60.0
_future_masks = {}  # (Tq, dtype) -> (Tq, Tq) additive mask: -inf above the diagonal, else 0


def _future_mask(tq, dtype, xp):
    key = (tq, np.dtype(dtype).str, xp.__name__)
    mask = _future_masks.get(key)
    if mask is None:
        future = xp.triu(xp.ones((tq, tq), dtype=bool), k=1)
        mask = _future_masks[key] = xp.where(future, -xp.inf, 0.0).astype(dtype)
    return mask


def _shift_unneeded(att):
    """True when softmax may skip the row-max shift (see NO_SHIFT_MAX): on NumPy only
    (on a GPU the check would stop the step for a device-to-host copy), float32/float64 only
    (exp(60) overflows float16). NaN scores fail the check."""
    if type(att) is not np.ndarray or att.dtype not in (np.float32, np.float64):
        return False
    tq, tk = att.shape[-2:]
    own = np.diagonal(att[..., tk - tq:], axis1=-2, axis2=-1)         # (..., Tq) own-key scores
    return bool(att.max() <= NO_SHIFT_MAX and own.min() >= -NO_SHIFT_MAX)




def causal_softmax_(att):
    """att (..., Tq, Tk) <- its causal softmax over the last axis, in place, and returned:
    query row i sees keys 0 .. Tk - Tq + i, masked weights are exactly 0. Any scale must be in
    att already."""
    if att.size == 0:
        return att
    tq, tk = att.shape[-2:]
    if backend.is_cuda(att) and att.flags.c_contiguous:               # the CUDA kernel
        return causal_softmax_forward_cuda(att, 1.0, out=att)
    if att.dtype == np.float32 and numpy_floats(att) and att.flags.c_contiguous \
            and numba_loops() is not None:                             # a compiled loop
        rows = att.reshape(-1, tk)
        threads.rows(len(rows), lambda r0, r1: numba_loops().causal_softmax_f32_(
            rows[r0:r1], tq, tk), att.size, align=tq)
        return att
    xp = backend.get_array_module(att)
    if tq > 1:  # the future lies in the last Tq columns, above their diagonal
        att[..., tk - tq:] += _future_mask(tq, att.dtype, xp)
    if not _shift_unneeded(att):
        att -= att.max(axis=-1, keepdims=True)
    xp.exp(att, out=att)
    att /= (att @ xp.ones(tk, dtype=att.dtype))[..., None]             # row sums by BLAS
    return att


def causal_softmax_backward_(g, y):
    """g <- y * (g - sum(g * y, last axis)), in place, and returned: the gradient of the
    scores from the gradient g of the weights y = causal_softmax_(scores) (masked entries 0)."""
    if g.size == 0:
        return g
    if backend.is_cuda(y) and g.dtype == y.dtype and g.flags.c_contiguous:   # the CUDA kernel
        return causal_softmax_backward_cuda(y, g, 1.0, out=g)
    if numpy_floats(g, y) and g.flags.c_contiguous and y.flags.c_contiguous \
            and numba_loops() is not None:                             # a compiled loop
        tk = g.shape[-1]
        g2, y2 = g.reshape(-1, tk), y.reshape(-1, tk)
        threads.rows(len(g2), lambda r0, r1: numba_loops().causal_softmax_backward_(
            g2[r0:r1], y2[r0:r1]), g.size)
        return g
    if backend.is_cuda(g):
        g -= (g * y).sum(axis=-1, keepdims=True)
    else:  # the rows' sum(g * y) without the (g * y) temporary
        g -= np.einsum("...i,...i->...", g, y)[..., None]
    g *= y
    return g


# ------------------------------------------------------------------ the version
class ChunkedAttention(fused.CausalAttention):
    """fused.CausalAttention in chunks of queries over threads (see the top of this module)."""
    device = "cpu"

    @staticmethod
    def takes(q, k, v, p=0.0, scale=1.0):
        return numpy_floats(q, k, v)

    def forward(self, q, k, v, p=0.0, scale=1.0):
        xp = backend.get_array_module(q)
        B, nh, T, hs = q.shape
        Tk = k.shape[2]
        self.past = past = Tk - T                                   # positions before the queries
        dtype = q.dtype
        self.q, self.k, self.v = q, k, v
        self.scale, self.rescale = dtype.type(scale), dtype.type(1.0 / (1.0 - p))
        self.keep = _keep_mask((B, nh, T, Tk), p, xp) if p > 0 else None   # (B, nh, T, Tk)
        chunk = CHUNK if T >= 2 * CHUNK else T
        # chunk (s, e): queries s..e-1, which see keys 0..past+e-1
        self.chunks = [(s, min(s + chunk, T)) for s in range(0, T, chunk)]
        self.att = [xp.empty((B, nh, e - s, past + e), dtype=dtype) for s, e in self.chunks]
        y = xp.empty((B, T, nh, hs), dtype=dtype)                   # (B, T, nh, hs)
        y_heads = y.transpose(0, 2, 1, 3)                           # (B, nh, T, hs) view of y

        def rows(b0, b1):  # batch rows b0..b1-1, all chunks
            q_s = q[b0:b1] * self.scale                             # (b, nh, T, hs) scaled queries
            for (s, e), att in zip(self.chunks, self.att):
                a = att[b0:b1]                                      # (b, nh, c, past+e) scores
                _matmul_into(q_s[:, :, s:e], k[b0:b1, :, :past + e].transpose(0, 1, 3, 2), a)
                causal_softmax_(a)                                  # attention weights
                out = y_heads[b0:b1, :, s:e]                        # (b, nh, c, hs)
                _matmul_into(self._kept(a, b0, b1, s, e), v[b0:b1, :, :past + e], out)
                if self.keep is not None:
                    out *= self.rescale

        _batch_rows(B, rows, nh * T * Tk, xp)
        return y_heads

    def _kept(self, att, b0, b1, s, e):
        """att * keep for batch rows b0..b1, chunk s..e (a new array; not yet scaled by
        1 / (1 - p)), or att itself without dropout."""
        return att if self.keep is None else att * self.keep[b0:b1, :, s:e, :self.past + e]

    def backward(self, g):
        """The gradients of q, k and v for the output gradient g (B, nh, T, hs), any strides:
        (B, nh, T, hs) views of one (B, T, 3, nh, hs) array, the layout of the fused
        projection's output, where q, k and v have one shape; else views of a (B, T, nh, hs)
        and a (B, Tk, 2, nh, hs) array."""
        xp = backend.get_array_module(g)
        q, k, v, past = self.q, self.k, self.v, self.past
        B, nh, T, hs = q.shape
        Tk = T + past
        if past == 0:
            gqkv = xp.empty((B, T, 3, nh, hs), dtype=g.dtype)       # (B, T, 3, nh, hs)
            gq, gk, gv = (gqkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # (B, nh, T, hs)
        else:
            gq = xp.empty((B, T, nh, hs), dtype=g.dtype).transpose(0, 2, 1, 3)   # (B, nh, T, hs)
            gkv = xp.empty((B, Tk, 2, nh, hs), dtype=g.dtype)       # (B, Tk, 2, nh, hs)
            gk, gv = (gkv[:, :, i].transpose(0, 2, 1, 3) for i in range(2))  # (B, nh, Tk, hs)

        def rows(b0, b1):
            q_s = q[b0:b1] * self.scale                             # (b, nh, T, hs) scaled queries
            # the last chunk sees every key: it writes gk and gv, the earlier ones add to them
            for (s, e), att in reversed(list(zip(self.chunks, self.att))):
                att = att[b0:b1]                                    # (b, nh, c, past+e)
                seen = past + e                                     # keys this chunk sees
                gc = g[b0:b1, :, s:e]                               # (b, nh, c, hs)
                if self.keep is not None:
                    gc = gc * self.rescale                          # d(kept weights @ v)
                kept_t = self._kept(att, b0, b1, s, e).transpose(0, 1, 3, 2)   # (b, nh, seen, c)
                if e == T:
                    _matmul_into(kept_t, gc, gv[b0:b1])
                else:
                    gv[b0:b1, :, :seen] += kept_t @ gc
                del kept_t
                ga = gc @ v[b0:b1, :, :seen].transpose(0, 1, 3, 2)  # (b, nh, c, seen) d(weights)
                if self.keep is not None:
                    ga *= self.keep[b0:b1, :, s:e, :seen]
                causal_softmax_backward_(ga, att)                   # d(scaled scores)
                gq_c = gq[b0:b1, :, s:e]                            # (b, nh, c, hs)
                _matmul_into(ga, k[b0:b1, :, :seen], gq_c)
                gq_c *= self.scale
                if e == T:
                    _matmul_into(ga.transpose(0, 1, 3, 2), q_s[:, :, s:e], gk[b0:b1])
                else:
                    gk[b0:b1, :, :seen] += ga.transpose(0, 1, 3, 2) @ q_s[:, :, s:e]

        _batch_rows(B, rows, nh * T * Tk, xp)
        return gq, gk, gv


def _keep_mask(shape, p, xp):
    """fused.keep_mask's draw: split over threads on NumPy (kernels/dropout.py)."""
    return dropout.keep_mask(shape, p) if xp is np else fused.keep_mask(shape, p, xp)


# attention splits its batch rows over threads from this many scores on (threads.MIN_ELEMENTS
# is for passes over memory; attention's small matmuls and softmax gain from far fewer: the
# small preset's 196,608 scores a layer, 0.95x the step in-process with BLAS's threads asleep)
MIN_SCORES = 1 << 16


def _batch_rows(B, fn, per_row, xp):
    """fn(b0, b1) over the batch rows, split over threads for NumPy work of MIN_SCORES scores
    and more."""
    if xp is np:
        threads.rows(B, fn, B * per_row, block=threads.block_rows(per_row), min_size=MIN_SCORES)
    else:
        fn(0, B)


def _matmul_into(a, b, out):
    """out[...] = a @ b, written in place by NumPy's matmul (out may be a strided view)."""
    if type(a) is np.ndarray:
        np.matmul(a, b, out=out)
    else:
        out[...] = a @ b


class CUDAChunkedAttention(ChunkedAttention):
    """ChunkedAttention on the GPU, with the CUDA causal softmax."""
    device = "cuda"

    @staticmethod
    def takes(q, k, v, p=0.0, scale=1.0):
        return cuda_floats(q, k, v)


VERSIONS = {"CausalAttention": [CUDAChunkedAttention, ChunkedAttention]}
