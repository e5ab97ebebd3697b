"""Fused operations: a chain of primitives in one Function, for the GPT training step.

Each op here computes what a short composition of tinytensor.ops primitives computes, in one
forward and one backward, without the intermediate tensors, the copies that go with them and
the engine's per-op work. They exist because the profile of a training step said so (see
benchmarks/); tests/test_fused.py checks each against the composition it replaces, against
PyTorch and with float64 central differences.

    dropout(x, p)                              inverted dropout with a bool mask (F.dropout)
    causal_softmax(x, scale)                   softmax(scale * x) of attention scores
                                                (..., Tq, Tk), the future masked
    causal_attention(qkv, n_head, dropout_p)   the attention of a GPT block, from its fused
                                                q/k/v projection to the heads side by side
    causal_sdpa(q, k, v, dropout_p, scale)      the same from q, k, v (B, nh, T, hs):
                                                F.scaled_dot_product_attention's fused path
    linear_relu(x, weight, bias)               relu(x @ weight.T + bias), the feed-forward's
                                                first layer
    LayerNorm                                  F.layer_norm
    CrossEntropy                               F.cross_entropy

The causal softmax has one implementation, causal_softmax_() and causal_softmax_backward_()
(in place), which both the standalone op and the attention's chunks call.

On NumPy, large inputs are split over threads by rows (parallel.py); the results do not depend
on it. On cupy float32/float64 arrays (kernels.handles) the ops run the CUDA kernels of
tinytensor.kernels where one fits: causal softmax (CausalSoftmax, CausalAttention), layer norm,
cross-entropy (integer targets, no label smoothing) and bias + ReLU (LinearReLU); the rest are
CuPy array expressions. docs/gpu.md has the table.

Shapes: B batch, T time, C = nh * hs channels, nh heads of size hs.
"""
import numpy as np

from . import backend, kernels, parallel
from .kernels import cpu
from . import random as _random
from .ops import column_sums
from .ops.normalization import _row_mean, _row_mean_grad
from .tensor import Function

# queries are processed in chunks of this many positions once T reaches 2 chunks: a chunk
# attends only to the keys up to its last position, which skips most of the masked future
ATTENTION_CHUNK = 64


def _xp(*a):
    return backend.get_array_module(*a)


# ---------------------------------------------------------------- dropout
def dropout_keep(shape, p, xp=np):
    """A bool array of `shape`: True (keep) with probability 1 - p, from the library's stream.

    Exactly the draw `rng.random(shape, dtype=float32) >= p` (F.dropout's), so fused ops
    with dropout equal the composed ones; large draws are split over threads (_parallel_uniform).
    """
    gen = _random.rng(xp)
    n = int(np.prod(shape))
    if xp is not np or n < parallel.MIN_ELEMENTS or parallel.threads() < 2 \
            or not isinstance(gen.bit_generator, np.random.PCG64):
        return gen.random(shape, dtype=np.float32) >= p
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

    parallel.for_ranges(m, part)
    bitgen.state = state
    bitgen.advance(m // 2)
    if m % 2:                          # the last element took the low half of one more output
        high = int(bitgen.random_raw()) >> 32
        st = bitgen.state
        st["has_uint32"], st["uinteger"] = 1, high
        bitgen.state = st


class Dropout(Function):
    """Inverted dropout: x * keep / (1 - p) with keep drawn by dropout_keep. Equal to the
    composition x * (keep.astype(dtype) / (1 - p)), but keeps a bool mask, not a float one."""

    def forward(self, x, p):
        xp = _xp(x)
        self.keep, self.scale = dropout_keep(x.shape, p, xp), x.dtype.type(1.0 / (1.0 - p))
        return self._masked(x)

    def backward(self, gy):
        return self._masked(gy)

    def _masked(self, a):
        """a * keep * scale, over row ranges in parallel when large."""
        if a.ndim == 0:
            return a * self.keep * self.scale
        xp = _xp(a)
        out = xp.empty_like(a)

        def rows(r0, r1):
            xp.multiply(a[r0:r1], self.keep[r0:r1], out=out[r0:r1])
            out[r0:r1] *= self.scale
        parallel.rows(len(a), rows, a.size, xp, block=parallel.block_rows(a[0].size))
        return out


def dropout(x, p):
    """Inverted dropout of the Tensor x with probability p (0 < p < 1), in one op."""
    return Dropout.apply(x, p=float(p))


# ---------------------------------------------------------------- causal softmax and attention
# softmax is shift-invariant, and the usual shift by each row's max only guards exp against
# overflow and the row sum against underflow. Computing a row max over short rows costs NumPy
# more than the exp itself, so on NumPy the shift is skipped when two cheap checks prove it
# unneeded: no score above SOFTMAX_NO_SHIFT_MAX (exp(60) ~ 1e26: no overflow, even summed over
# 10**12 keys) and no query's own score (its diagonal key, never masked, a lower bound on its row
# max) below -SOFTMAX_NO_SHIFT_MAX (so each row sum is at least exp(-60) ~ 1e-26, a normal float).
# Without the shift nothing is lost: exp(x) / sum(exp(x)) rounds as exp(x - m) / sum(exp(x - m)).
SOFTMAX_NO_SHIFT_MAX = 60.0
_future_masks = {}  # (Tq, dtype) -> (Tq, Tq) additive mask: -inf above the diagonal, else 0


def _future_mask(tq, dtype, xp):
    key = (tq, np.dtype(dtype).str, xp.__name__)
    mask = _future_masks.get(key)
    if mask is None:
        future = xp.triu(xp.ones((tq, tq), dtype=bool), k=1)
        mask = _future_masks[key] = xp.where(future, -xp.inf, 0.0).astype(dtype)
    return mask


def causal_softmax_(att):
    """att (..., Tq, Tk) <- its causal softmax over the last axis, in place, and returned.

    The Tq query rows are the last Tq of Tk positions: row i sits at position Tk - Tq + i and
    sees the keys up to it (Tq == Tk in training, Tq == 1 in a cached generation step).
    Masked weights are exactly 0. Any scale must already be in att.
    """
    if att.size == 0:
        return att
    if kernels.handles(att) and att.flags.c_contiguous:  # CuPy: the CUDA kernel, over att
        return kernels.causal_softmax_forward(att, 1.0, out=att)
    if att.dtype == np.float32 and cpu.takes(att) and att.flags.c_contiguous:  # compiled
        return cpu.causal_softmax_(att)
    xp = _xp(att)
    tq, tk = att.shape[-2:]
    if tq > 1:  # the future lies in the last Tq columns, above their diagonal
        att[..., tk - tq:] += _future_mask(tq, att.dtype, xp)
    if not _shift_unneeded(att):
        att -= att.max(axis=-1, keepdims=True)
    xp.exp(att, out=att)
    att /= (att @ xp.ones(tk, dtype=att.dtype))[..., None]            # row sums by BLAS
    return att


def causal_softmax_backward_(g, y):
    """g <- y * (g - sum(g * y, last axis)), in place, and returned: the gradient of the
    scores from the gradient g of the weights y = causal_softmax_(scores). Masked entries
    get 0."""
    if g.size == 0:
        return g
    if kernels.handles(y) and g.dtype == y.dtype and g.flags.c_contiguous:  # the kernel, over g
        return kernels.causal_softmax_backward(y, g, 1.0, out=g)
    if cpu.takes(g, y) and g.flags.c_contiguous and y.flags.c_contiguous:  # compiled, one pass
        return cpu.causal_softmax_backward_(g, y)
    g -= _rowdot(g, y)
    g *= y
    return g


def _shift_unneeded(att):
    """True when softmax may skip the row-max shift (see SOFTMAX_NO_SHIFT_MAX): on NumPy only
    (on a GPU the check would stop the step for a device-to-host copy), float32/float64 only
    (exp(60) overflows float16). NaN scores fail the check."""
    if _xp(att) is not np or att.dtype not in (np.float32, np.float64):
        return False
    tq, tk = att.shape[-2:]
    own = np.diagonal(att[..., tk - tq:], axis1=-2, axis2=-1)         # (..., Tq) own-key scores
    return bool(att.max() <= SOFTMAX_NO_SHIFT_MAX and own.min() >= -SOFTMAX_NO_SHIFT_MAX)


class CausalSoftmax(Function):
    """Attention weights: softmax(scale * x) over the last axis with the future masked out.

    x holds scores (..., Tq, Tk) of the last Tq of Tk positions: query i sits at position
    Tk - Tq + i and sees keys 0 .. Tk - Tq + i (Tq == Tk in training; Tq == 1 in a cached
    generation step, which sees every key). Equal to the composition
    softmax((scale * x).masked_fill(future, -inf)) in one op: masked entries get weight 0 and
    zero gradient, and no mask or scaled copy is kept for backward. It runs the same
    causal_softmax_() and causal_softmax_backward_() as CausalAttention.
    """

    def forward(self, x, scale=1.0):
        self.scale = x.dtype.type(scale)
        self.y = causal_softmax_(x * self.scale)                    # a new array, then in place
        return self.y

    def backward(self, gy):
        return causal_softmax_backward_(gy * self.scale, self.y)


def causal_softmax(x, scale=1.0):
    """softmax(scale * x, dim=-1) of attention scores x (..., Tq, Tk), future keys masked."""
    if x.ndim < 2 or x.shape[-2] > x.shape[-1]:
        raise ValueError(f"causal_softmax needs scores of shape (..., Tq, Tk) with Tq <= Tk, "
                         f"got {x.shape}")
    return CausalSoftmax.apply(x, scale=float(scale))


class CausalAttention(Function):
    """Causal attention of every head: q, k, v (B, nh, T, hs), any strides (typically views
    of the fused q/k/v projection), to y (B, nh, T, hs). Equal (up to rounding) to

        att = causal_softmax(q @ k.transpose(-2, -1), scale)   # (B, nh, T, T), scale hs ** -0.5
        att = dropout(att, p)
        y = att @ v                                              # (B, nh, T, hs)

    with the dropout keep-mask drawn as F.dropout draws it. The work on the (T, T) scores is
    what costs; so the scale goes onto q (hs wide, not T), 1 / (1 - p) onto the (T, hs) result,
    only the diagonal block is masked, and backward keeps only the attention weights and a
    bool keep-mask. For T >= 2 * ATTENTION_CHUNK the queries go in chunks, each against the
    keys up to its own position only: most of the masked future is never computed. Large
    batches are split over threads.

    y is a (B, nh, T, hs) view of a contiguous (B, T, nh, hs) array, so the heads side by side,
    y.transpose(1, 2).reshape(B, T, nh * hs), cost no copy. The gradients gq, gk, gv are views
    of one (B, T, 3, nh, hs) array, laid out as the fused projection's output.
    """

    def forward(self, q, k, v, p=0.0, scale=None):
        xp = _xp(q)
        B, nh, T, hs = q.shape
        dtype = q.dtype
        self.q, self.k, self.v = q, k, v
        self.scale = dtype.type(hs ** -0.5 if scale is None else scale)
        self.rescale = dtype.type(1.0 / (1.0 - p))
        self.keep = dropout_keep((B, nh, T, T), p, xp) if p > 0 else None   # (B, nh, T, T)
        chunk = ATTENTION_CHUNK if T >= 2 * ATTENTION_CHUNK else T
        # chunk (s, e): queries s..e-1, which see keys 0..e-1
        self.chunks = [(s, min(s + chunk, T)) for s in range(0, T, chunk)]
        self.att = [xp.empty((B, nh, e - s, e), dtype=dtype) for s, e in self.chunks]
        y = xp.empty((B, T, nh, hs), dtype=dtype)                   # (B, T, nh, hs)
        y_heads = y.transpose(0, 2, 1, 3)                           # (B, nh, T, hs) view of y

        def rows(b0, b1):  # batch rows b0..b1-1, all chunks
            q_s = q[b0:b1] * self.scale                             # (b, nh, T, hs) scaled queries
            for (s, e), att in zip(self.chunks, self.att):
                a = att[b0:b1]                                      # (b, nh, c, e) scores
                _matmul_into(q_s[:, :, s:e], k[b0:b1, :, :e].transpose(0, 1, 3, 2), a)
                causal_softmax_(a)                                  # attention weights
                out = y_heads[b0:b1, :, s:e]                        # (b, nh, c, hs)
                _matmul_into(self._kept(a, b0, b1, s, e), v[b0:b1, :, :e], out)
                if self.keep is not None:
                    out *= self.rescale

        parallel.rows(B, rows, B * nh * T * T, xp, block=parallel.block_rows(nh * T * T))
        return y_heads

    def _kept(self, att, b0, b1, s, e):
        """att * keep for batch rows b0..b1, chunk s..e (a new array; not yet scaled by
        1 / (1 - p)), or att itself without dropout."""
        return att if self.keep is None else att * self.keep[b0:b1, :, s:e, :e]

    def backward(self, gy):
        gqkv = self._gradients(gy)                                  # (B, T, 3, nh, hs)
        return tuple(gqkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # gq, gk, gv

    def _gradients(self, g):
        """The gradients of q, k and v for the output gradient g (B, nh, T, hs), any strides,
        in one (B, T, 3, nh, hs) array: the layout of the fused projection's output."""
        xp = _xp(g)
        q, k, v = self.q, self.k, self.v
        B, nh, T, hs = q.shape
        gqkv = xp.empty((B, T, 3, nh, hs), dtype=g.dtype)           # (B, T, 3, nh, hs)
        gq, gk, gv = (gqkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # (B, nh, T, hs) views

        def rows(b0, b1):
            q_s = q[b0:b1] * self.scale                             # (b, nh, T, hs) scaled queries
            # the last chunk sees every key: it writes gk and gv, the earlier ones add to them
            for (s, e), att in reversed(list(zip(self.chunks, self.att))):
                att = att[b0:b1]                                    # (b, nh, c, e)
                gc = g[b0:b1, :, s:e]                               # (b, nh, c, hs)
                if self.keep is not None:
                    gc = gc * self.rescale                          # d(kept weights @ v)
                kept_t = self._kept(att, b0, b1, s, e).transpose(0, 1, 3, 2)   # (b, nh, e, c)
                if e == T:
                    _matmul_into(kept_t, gc, gv[b0:b1])
                else:
                    gv[b0:b1, :, :e] += kept_t @ gc
                del kept_t
                ga = gc @ v[b0:b1, :, :e].transpose(0, 1, 3, 2)     # (b, nh, c, e) d(weights)
                if self.keep is not None:
                    ga *= self.keep[b0:b1, :, s:e, :e]
                causal_softmax_backward_(ga, att)                   # d(scaled scores)
                gq_c = gq[b0:b1, :, s:e]                            # (b, nh, c, hs)
                _matmul_into(ga, k[b0:b1, :, :e], gq_c)
                gq_c *= self.scale
                if e == T:
                    _matmul_into(ga.transpose(0, 1, 3, 2), q_s[:, :, s:e], gk[b0:b1])
                else:
                    gk[b0:b1, :, :e] += ga.transpose(0, 1, 3, 2) @ q_s[:, :, s:e]

        parallel.rows(B, rows, B * nh * T * T, xp, block=parallel.block_rows(nh * T * T))
        return gqkv


def _matmul_into(a, b, out):
    """out[...] = a @ b, written in place by NumPy's matmul (out may be a strided view)."""
    if _xp(a) is np:
        np.matmul(a, b, out=out)
    else:
        out[...] = a @ b


def _rowdot(a, b):
    """sum(a * b, axis=-1, keepdims=True) without the (a * b) temporary."""
    if _xp(a) is np:
        return np.einsum("...i,...i->...", a, b)[..., None]
    return (a * b).sum(axis=-1, keepdims=True)


def causal_attention(qkv, n_head, dropout_p=0.0):
    """Causal self-attention of every head from the fused projection qkv (B, T, 3*C) to the
    heads' outputs side by side (B, T, C), as gpt.model.CausalSelfAttention computes it: split
    into q, k, v views, causal_sdpa, heads side by side (no copies: split's backward joins the
    three gradients, which CausalAttention lays out in one buffer); dropout_p > 0 drops
    attention weights (training)."""
    if qkv.ndim != 3 or qkv.shape[-1] % (3 * n_head):
        raise ValueError(f"causal_attention needs qkv of shape (B, T, 3 * n_head * head_size), "
                         f"got {qkv.shape} with n_head={n_head}")
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = (a.view(B, T, n_head, C // n_head).transpose(1, 2)   # each (B, nh, T, hs)
               for a in qkv.split(C, dim=2))
    y = causal_sdpa(q, k, v, dropout_p)                             # (B, nh, T, hs)
    return y.transpose(1, 2).reshape(B, T, C)                       # (B, T, C)


def causal_sdpa(q, k, v, dropout_p=0.0, scale=None):
    """Causal attention of q, k, v (B, nh, T, hs) in one op (F.scaled_dot_product_attention's
    fused path): softmax(scale * q @ k^T, future masked), dropped with probability
    dropout_p (0 <= dropout_p < 1), @ v. scale defaults to hs ** -0.5."""
    if not (q.ndim == 4 and q.shape == k.shape == v.shape):
        raise ValueError(f"causal_sdpa needs q, k, v of one shape (B, nh, T, hs), got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {dropout_p}")
    return CausalAttention.apply(q, k, v, p=float(dropout_p),
                                 scale=None if scale is None else float(scale))


# ---------------------------------------------------------------- linear + relu, layer norm
class LinearReLU(Function):
    """relu(x @ w.T + b) for x (..., in), w (out, in), b (out,) or None: the Linear and the
    ReLU in one op. Backward keeps the output (which the next layer keeps anyway) instead of
    a pre-activation and a mask. On CuPy float32/float64 arrays the bias and ReLU (forward)
    and the ReLU's gradient with the bias gradient (backward) are one CUDA kernel each
    (tinytensor.kernels.bias_relu_dropout, without dropout)."""

    def forward(self, x, w, b=None):
        xp = _xp(x)
        y = x.reshape(-1, x.shape[-1]) @ w.T                        # (N, out)
        if b is not None and kernels.handles(y, b):                 # CuPy: one CUDA kernel
            y = kernels.bias_relu_dropout_forward(y, b)             # relu(y + b)
        elif cpu.takes(y, b):                                       # one compiled pass
            cpu.bias_relu_(y, b)
        else:
            def rows(r0, r1):  # bias and relu (max(y, 0), as ReLU), large y over threads
                yr = y[r0:r1]
                if b is not None:
                    yr += b
                xp.maximum(yr, yr.dtype.type(0), out=yr)
            parallel.rows(len(y), rows, y.size, xp, block=parallel.block_rows(y.shape[1]))
        self.x, self.w, self.y = x, w, y
        return y.reshape(x.shape[:-1] + (w.shape[0],))              # (..., out)

    def backward(self, gy):
        xp = _xp(gy)
        x, w, y = self.x, self.w, self.y
        gy2 = gy.reshape(y.shape)                                   # (N, out)
        gb = None
        if kernels.handles(y, gy2):  # CuPy: gy * (y > 0) and its column sums in one kernel
            g, gb = kernels.bias_relu_dropout_backward(gy2, y)
        elif cpu.takes(y, gy2):      # the same in one compiled pass
            g, gb = cpu.relu_backward(gy2, y, need_bias=len(self.needs_grad) > 2)
        else:
            g = xp.empty_like(gy2)
            parallel.rows(len(g), lambda r0, r1: xp.multiply(gy2[r0:r1], y[r0:r1] > 0,
                                                             out=g[r0:r1]), g.size, xp)
        gx = (g @ w).reshape(x.shape) if self.needs_grad[0] else None
        gw = g.T @ x.reshape(-1, x.shape[-1]) if self.needs_grad[1] else None
        if len(self.needs_grad) > 2 and self.needs_grad[2]:
            gb = column_sums(g) if gb is None else gb
        else:
            gb = None
        return gx, gw, gb


def linear_relu(x, weight, bias=None):
    """relu(x @ weight.T + bias) in one op (the feed-forward's first Linear and its ReLU)."""
    if bias is None:
        return LinearReLU.apply(x, weight)
    return LinearReLU.apply(x, weight, bias)


class LayerNorm(Function):
    """Layer normalisation over the last `nd` dimensions, with optional affine weight/bias.

    Works on x as a matrix (N, D) of N rows of D normalised elements. Row means are
    matrix-vector products with a (D,) vector of 1/D, and column sums (the weight and bias
    gradients) products with a vector of ones: BLAS does these several times faster than
    NumPy's reductions over rows of a few hundred elements. On CuPy float32/float64 arrays
    forward and backward are the CUDA kernels of tinytensor.kernels.layernorm.
    """

    def forward(self, x, w=None, b=None, nd=1, eps=1e-5):
        xp = _xp(x)
        d = int(np.prod(x.shape[x.ndim - nd:]))
        x2 = x.reshape(-1, d)                                       # (N, D)
        n = x2.shape[0]
        wv = None if w is None else w.reshape(d)
        bv = None if b is None else b.reshape(d)
        self.wv, self.shape, self.nd, self.kernel = wv, x.shape, nd, None
        for family, takes in ((kernels, kernels.handles), (cpu, cpu.takes)):
            if d and takes(x2, wv, bv):               # CuPy: the CUDA kernel; NumPy: compiled
                y, mean, rstd = family.layer_norm_forward(x2, wv, bv, eps)
                self.kernel = family.layer_norm_backward, x2, mean, rstd    # for backward
                return y.reshape(x.shape)
        avg = xp.full(d, 1.0 / d, dtype=x.dtype)                    # (D,): r @ avg is r's mean
        xhat, y = xp.empty_like(x2), xp.empty_like(x2)              # (N, D)
        rstd = xp.empty(n, dtype=x.dtype)                           # (N,)

        def rows(r0, r1):  # rows r0..r1-1 (large inputs: in parallel threads)
            xh = xhat[r0:r1]
            xp.subtract(x2[r0:r1], (x2[r0:r1] @ avg)[:, None], out=xh)         # centred
            rstd[r0:r1] = 1.0 / xp.sqrt((xh * xh) @ avg + eps)
            xh *= rstd[r0:r1, None]                                            # normalised
            if wv is not None:
                xp.multiply(xh, wv, out=y[r0:r1])
            else:
                y[r0:r1] = xh
            if bv is not None:
                y[r0:r1] += bv

        parallel.rows(n, rows, x2.size, xp, align=parallel.ROW_BLOCK,
                      block=parallel.block_rows(d, parallel.ROW_BLOCK))
        self.xhat, self.rstd, self.avg = xhat, rstd, avg
        return y.reshape(x.shape)

    def backward(self, gy):
        xp = _xp(gy)
        param_shape = self.shape[len(self.shape) - self.nd:]        # the weight's and bias's
        needs = self.needs_grad + [False] * (3 - len(self.needs_grad))
        if self.kernel is not None:                                 # the CUDA or CPU kernels
            backward, x2, mean, rstd = self.kernel
            gx, gw, gb = backward(gy.reshape(x2.shape), x2, self.wv, mean, rstd)
            return (gx.reshape(self.shape) if needs[0] else None,
                    gw.reshape(param_shape) if needs[1] else None,
                    gb.reshape(param_shape) if needs[2] else None)
        xhat, rstd, avg, wv = self.xhat, self.rstd, self.avg, self.wv
        n, d = xhat.shape
        g2 = gy.reshape(n, d)                                       # (N, D)
        gyx = xp.empty_like(g2)                                     # gy * xhat
        gx = xp.empty_like(g2) if needs[0] else None

        def rows(r0, r1):
            xp.multiply(g2[r0:r1], xhat[r0:r1], out=gyx[r0:r1])
            if gx is None:
                return
            g = gx[r0:r1]                                           # becomes the input gradient
            if wv is not None:                                      # g: the gradient of xhat
                xp.multiply(g2[r0:r1], wv, out=g)
                gx_hat = gyx[r0:r1] * wv                            # g * xhat
            else:
                g[...] = g2[r0:r1]
                gx_hat = gyx[r0:r1].copy()
            g -= (g @ avg)[:, None]
            xp.multiply(xhat[r0:r1], (gx_hat @ avg)[:, None], out=gx_hat)
            g -= gx_hat
            g *= rstd[r0:r1, None]

        parallel.rows(n, rows, g2.size, xp, align=parallel.ROW_BLOCK,
                      block=parallel.block_rows(d, parallel.ROW_BLOCK))
        gw = column_sums(gyx).reshape(param_shape) if needs[1] else None
        gb = column_sums(g2).reshape(param_shape) if needs[2] else None
        return (None if gx is None else gx.reshape(self.shape)), gw, gb


# ---------------------------------------------------------------- cross-entropy
class CrossEntropy(Function):
    """Softmax cross-entropy of logits x (N, C), fused, against either targets:

    integer class indices t (N,): rows whose target is ignore_index count neither in the loss
    nor in the mean's denominator; with label smoothing eps a row's loss is
    (1 - eps) * nll + eps * mean over classes of -log p (torch's formula);
    class probabilities t (N, C): loss = -sum_c q_c log p_c with q = (1 - eps) * t + eps / C;
    the mean is over the N rows, and t gets a gradient too.

    reduction 'none' gives the (N,) row losses. A mean over no rows is nan, as in torch, and
    its gradient is zero.
    """

    def forward(self, x, t, reduction="mean", ignore_index=-100, label_smoothing=0.0):
        xp = _xp(x)
        n, c = x.shape
        eps = label_smoothing
        self.reduction, self.eps, self.probs, self.kernel = reduction, eps, t.ndim == 2, None
        if not self.probs and not eps and c and kernels.handles(x):   # CuPy: the CUDA kernel
            loss, lse = kernels.cross_entropy_forward(x, t, ignore_index)     # (N,), (N,)
            self.kernel = "cuda", (x, t, lse, ignore_index)  # backward recomputes p from lse
            self.count = (t != ignore_index).sum()
            return _reduce(xp, loss, reduction, self.count)
        if not self.probs and not eps and c and x.dtype == np.float32 and cpu.takes(x):
            loss, self.p, self.count = cpu.cross_entropy_forward(x, t, ignore_index)  # compiled
            self.kernel = "cpu", (t, ignore_index)          # backward from the softmax p
            return _reduce(xp, loss, reduction, self.count)
        if x.size:
            z = x - x.max(axis=1, keepdims=True)            # (N, C)
            e = xp.exp(z)
            s = e.sum(axis=1, keepdims=True)                # (N, 1)
            e /= s
            lse = xp.log(s[:, 0])                           # (N,): log sum exp(z)
        else:  # no rows or no classes: every row loss is 0 (and a mean is nan)
            z = e = x.copy()
            lse = xp.zeros(n, dtype=x.dtype)
        self.p = e                                          # (N, C) softmax
        if self.probs:                                      # class probabilities (N, C)
            q = t * x.dtype.type(1 - eps) + x.dtype.type(eps / c) if eps and c else t
            logp = z - lse[:, None]                         # (N, C)
            loss = -(q * logp).sum(axis=1)                  # (N,)
            self.q, self.logp, self.count = q, logp, n if x.size else 0
        else:                                               # class indices (N,)
            valid = t != ignore_index
            tt = xp.where(valid, t, 0)
            rows = xp.arange(n)
            loss = lse - z[rows, tt] if c else lse          # (N,): -log p of the target
            if eps and c:  # -sum_c log p_c = C * lse - sum_c z_c
                loss = loss * x.dtype.type(1 - eps) + (c * lse - z.sum(axis=1)) * x.dtype.type(eps / c)
            loss = xp.where(valid, loss, 0)                 # an ignored row is 0 even for -inf logits
            self.tt, self.rows, self.valid, self.count = tt, rows, valid, valid.sum()
        return _reduce(xp, loss, reduction, self.count)

    def backward(self, gy):
        if self.kernel is not None:                         # the CUDA or CPU kernel
            scale = _row_mean_grad(gy, self.count) if self.reduction == "mean" else gy
            where, saved = self.kernel
            if where == "cpu":
                t, ignore_index = saved
                return cpu.cross_entropy_backward(self.p, t, ignore_index, scale), None
            x, t, lse, ignore_index = saved
            return kernels.cross_entropy_backward(x, t, lse, scale, ignore_index), None
        c, eps = self.p.shape[1], self.eps
        if self.reduction == "none":
            scale = gy[:, None]                             # (N, 1)
        elif self.reduction == "sum":
            scale = gy
        else:
            scale = _row_mean_grad(gy, self.count)
        gx = self.p                                         # softmax p, reused
        gt = None
        if self.probs:  # d/dx = p * sum_c q_c - q;  d/dt = -(1 - eps) * log p
            gx *= self.q.sum(axis=1, keepdims=True)
            gx -= self.q
            gx *= scale
            if self.needs_grad[1]:
                gt = self.logp * (-scale * gy.dtype.type(1 - eps))
            return gx, gt
        if c:  # d/dx = p - (1 - eps) * onehot(t) - eps / C
            gx[self.rows, self.tt] -= 1 - eps if eps else 1
            if eps:
                gx -= gx.dtype.type(eps / c)
        gx *= self.valid[:, None]
        gx *= scale
        return gx, None


def _reduce(xp, loss, reduction, count):
    """The (N,) row losses reduced: as they are ('none'), summed, or their mean over count rows."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return _row_mean(xp, loss.sum(), count)
