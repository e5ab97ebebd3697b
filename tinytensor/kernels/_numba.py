"""The compiled CPU loops (Numba) of the accelerators of layer norm, cross-entropy, the bias (+ ReLU)
of the linear layers, the embedding's gradient, the causal softmax and AdamW. Imported at the
first dispatch to a compiled version (kernels.numba_loops()): importing tinytensor never imports numba.

Every loop works on C-contiguous 2-D arrays of rows, writes into arrays its caller made, and
releases the GIL (nogil), so that threads.rows can run row ranges of one call in threads.
Sums accumulate in the data's dtype, as PyTorch's CPU kernels do (float64 accumulators for
float32 data would halve the SIMD width). `fastmath` allows only reassociation, so
that LLVM vectorises those sums: no fused multiply-adds (they would leave rounding residue
where the NumPy path cancels exactly) and no assumptions about NaN or infinity.
Compiled code is cached on disk beside this file (numba's cache=True).
"""
import numpy as np
from numba import njit

_FAST = {"reassoc"}
# error_model="numpy": a float division by zero gives inf or NaN, as in the NumPy references,
# instead of raising ZeroDivisionError; without a check on every division, LLVM also
# vectorises loops that divide (AdamW's)
_JIT = dict(nogil=True, cache=True, error_model="numpy")


@njit(**_JIT)
def _consts(dtype, a, b):
    """0, 1, a and b as scalars of `dtype`: mixing a float32 with a Python float or an int
    makes float64 in Numba, which would halve the SIMD width of every loop it touches."""
    c = np.empty(4, dtype)
    c[0], c[1], c[2], c[3] = 0.0, 1.0, a, b
    return c[0], c[1], c[2], c[3]


@njit(fastmath=_FAST, **_JIT)
def layer_norm_forward(x, w, b, eps, y, mean, rstd):
    """y = (x - mean) * rstd * w + b per row of x (N, D); writes y (N, D), mean and rstd (N,)."""
    n, d = x.shape
    zero, one, inv_d, eps = _consts(x.dtype, 1.0 / d, eps)   # of x's dtype (no float64 math)
    for i in range(n):
        xr, yr = x[i], y[i]
        s = zero
        for j in range(d):
            s += xr[j]
        m = s * inv_d
        ss = zero
        for j in range(d):                      # two passes: no cancellation in the variance
            t = xr[j] - m
            ss += t * t
        r = one / np.sqrt(ss * inv_d + eps)
        mean[i] = m
        rstd[i] = r
        for j in range(d):
            yr[j] = (xr[j] - m) * r * w[j] + b[j]


@njit(fastmath=_FAST, **_JIT)
def layer_norm_backward(gy, x, w, mean, rstd, gx, gw, gb):
    """gx (N, D) of layer norm's input from gy (N, D); ADDS the rows' sums of gy * xhat and gy
    into gw and gb (D,) (float64 partial sums, exact enough over any number of rows; a caller
    splitting rows over threads gives each part its own pair)."""
    n, d = x.shape
    zero, _, inv_d, _ = _consts(x.dtype, 1.0 / d, 0.0)
    for i in range(n):
        xr, gyr = x[i], gy[i]
        m = mean[i]
        r = rstd[i]
        sg = zero                               # sum of g = gy * w
        sgx = zero                              # sum of g * xhat
        for j in range(d):
            xh = (xr[j] - m) * r
            g = gyr[j]
            gw[j] += g * xh
            gb[j] += g
            g = g * w[j]
            sg += g
            sgx += g * xh
        gxr = gx[i]
        sg *= inv_d
        sgx *= inv_d
        for j in range(d):
            gxr[j] = (gyr[j] * w[j] - sg - (xr[j] - m) * r * sgx) * r


@njit(**_JIT)
def cross_entropy_backward(p, t, ignore_index, scale, gx):
    """gx = scale[i] * (p - onehot(t)) per row, 0 for ignored rows; scale (N,)."""
    n, c = p.shape
    for i in range(n):
        ti = t[i]
        if ti == ignore_index:
            for j in range(c):
                gx[i, j] = 0.0
            continue
        si = scale[i]
        for j in range(c):
            gx[i, j] = p[i, j] * si
        gx[i, ti] -= si


@njit(**_JIT)
def add_rows(target, rows, values):
    """target[rows[i]] += values[i] for each i in order (repeats accumulate), target (n, D),
    rows (N,) already in [0, n), values (N, D)."""
    d = target.shape[1]
    for i in range(rows.size):
        r = rows[i]
        for j in range(d):
            target[r, j] += values[i, j]


@njit(**_JIT)
def bias_relu_(y, b):
    """y = relu(y + b) in place, y (N, D), b (D,) (a bias-free caller passes zeros). ReLU as
    torch: max(v, 0), so -inf gives 0 and a NaN stays NaN."""
    n, d = y.shape
    for i in range(n):
        yr = y[i]
        for j in range(d):
            v = yr[j] + b[j]
            yr[j] = 0 if v <= 0 else v


@njit(**_JIT)
def add_bias_(y, b):
    """y += b in place for every row of y (N, D)."""
    n, d = y.shape
    for i in range(n):
        yr = y[i]
        for j in range(d):
            yr[j] += b[j]


@njit(fastmath=_FAST, **_JIT)
def relu_backward(gy, y, g, gb):
    """g = gy * (y > 0) (N, D) from the ReLU's output y; ADDS g's column sums into gb (D,)
    (float64 partial sums, as layer_norm_backward's)."""
    n, d = y.shape
    for i in range(n):
        gyr, yr, gr = gy[i], y[i], g[i]
        for j in range(d):
            v = gyr[j] if yr[j] > 0 else gyr[j] * 0
            gr[j] = v
            gb[j] += v


@njit(**_JIT)
def adamw_(p, g, m, v, decay, one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt,
           eps, step_size):
    """One AdamW step in place on 1-D p, g, m, v, each element read and written once; the
    scalars are of the arrays' dtype, and the operations those of the reference's array
    expressions in the same order (no fastmath: no fused multiply-adds), so the bits match."""
    for i in range(p.size):
        gi = g[i]
        mi = m[i]
        mi = mi + (gi - mi) * one_minus_beta1
        vi = v[i] * beta2
        vi = vi + gi * one_minus_beta2 * gi
        denom = np.sqrt(vi) / bias_correction2_sqrt + eps
        p[i] = p[i] * decay - mi / denom * step_size
        m[i] = mi
        v[i] = vi


# ------------------------------------------------------------------ float32 exp, vectorised
# Softmax and cross-entropy spend most of their time in exp, and Numba's scalar libm call does
# not vectorise. exp_neg_ below is Cephes' expf (range reduction by Cody-Waite, a degree-6
# polynomial, 2^k put into the exponent bits), which LLVM vectorises; within 2 ulp of NumPy's.
_LN2_HI, _LN2_LO, _LOG2E = np.float32(0.693359375), np.float32(-2.12194440e-4), np.float32(1.44269504)
_EXP_MIN = np.float32(-87.33)          # below it exp underflows to subnormals: 0 here
_P0, _P1, _P2 = np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3)
_P3, _P4, _P5 = np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1)


@njit(**_JIT)
def exp_neg_(z, k):
    """z <- exp(z) in place for float32 z (n,) of values <= 0 (scores minus their row's max),
    k an int32 scratch (n,). exp(-inf) and anything below -87.33 give 0 (NumPy gives
    subnormals < 1.2e-38 there), NaN stays NaN."""
    n = z.size
    for j in range(n):
        v = z[j]
        small = v < _EXP_MIN
        v = max(v, _EXP_MIN) if v == v else v
        kf = np.floor(v * _LOG2E + np.float32(0.5))
        r = v - kf * _LN2_HI - kf * _LN2_LO
        p = ((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5
        p = p * r * r + r + np.float32(1)
        k[j] = np.int32(0) if small or kf != kf else np.int32(kf)
        z[j] = np.float32(0) if small else p
    bits = z.view(np.int32)
    for j in range(n):
        bits[j] += k[j] << 23          # p in [0.7, 1.5) times 2^k, k in [-126, 0]


@njit(fastmath=_FAST, **_JIT)
def causal_softmax_f32_(att, tq, tk):
    """att (rows, Tk) float32, the rows being (..., Tq) query rows of Tq-row blocks <- their
    causal softmax in place: query row i of a block sees keys 0 .. Tk - Tq + i; the rest
    become 0. The row max comes first, so nothing overflows; a NaN (or +inf) among a row's
    visible scores makes the whole row NaN, as the NumPy path and torch do."""
    rows = att.shape[0]
    k = np.empty(tk, np.int32)                 # exp_neg_'s scratch
    for r in range(rows):
        a = att[r]
        last = tk - tq + r % tq              # the last visible key
        m = a[0]
        for j in range(1, last + 1):
            m = a[j] if a[j] > m else m
        for j in range(last + 1):
            a[j] = a[j] - m
        exp_neg_(a[:last + 1], k)
        s = np.float32(0)
        for j in range(last + 1):
            s += a[j]
        inv = np.float32(1) / s
        for j in range(last + 1):
            a[j] *= inv
        for j in range(last + 1, tk):
            a[j] = 0 * inv                     # 0, or NaN in a NaN row (as NumPy and torch)


@njit(fastmath=_FAST, **_JIT)
def causal_softmax_backward_(g, y):
    """g <- y * (g - sum(g * y)) per row of g, y (rows, Tk), the NumPy path's formula over the
    whole row (masked weights are 0, so their gradient is too)."""
    rows, tk = g.shape
    zero = _consts(g.dtype, 0.0, 0.0)[0]
    for r in range(rows):
        gr, yr = g[r], y[r]
        s = zero
        for j in range(tk):
            s += gr[j] * yr[j]
        for j in range(tk):
            gr[j] = yr[j] * (gr[j] - s)


@njit(fastmath=_FAST, **_JIT)
def cross_entropy_f32(x, t, ignore_index, p, loss):
    """Softmax cross-entropy of float32 logits x (N, C) against class indices t (N,), one pass
    per row: max, shift, exp (exp_neg_), sum, then p (N, C) the softmax and loss (N,)
    log sum exp(x) - x[t], 0 where t is ignore_index. Returns the number of rows counted, or
    -1 at the first target outside [0, C) that is not ignore_index."""
    n, c = x.shape
    k = np.empty(c, np.int32)
    count = 0
    for i in range(n):
        ti = t[i]
        if ti != ignore_index and (ti < 0 or ti >= c):
            return -1
        xr, pr = x[i], p[i]
        m = xr[0]
        for j in range(1, c):
            m = xr[j] if xr[j] > m else m      # NaN never wins here, but makes the row NaN below
        for j in range(c):
            pr[j] = xr[j] - m
        exp_neg_(pr, k)
        s = np.float32(0)
        for j in range(c):
            s += pr[j]
        inv = np.float32(1) / s
        for j in range(c):
            pr[j] *= inv
        if ti == ignore_index:
            loss[i] = 0
        else:
            loss[i] = np.log(s) - (xr[ti] - m)
            count += 1
    return count
