"""The compiled CPU kernels themselves (Numba). Imported only by kernels/cpu.py, and only when
a kernel is first used: importing tinytensor never imports numba.

Every kernel works on C-contiguous 2-D arrays of rows, writes into arrays its caller made, and
releases the GIL (nogil), so that parallel.rows can run row ranges of one call in threads.
Sums accumulate in the data's dtype, as PyTorch's CPU kernels do (float64 accumulators for
float32 data halve the SIMD width: 2x slower here). `fastmath` allows only reassociation, so
that LLVM vectorises those sums: no fused multiply-adds (they would leave rounding residue
where the NumPy path cancels exactly) and no assumptions about NaN or infinity.
Compiled code is cached on disk beside this file (numba's cache=True).
"""
import numpy as np
from numba import njit

_FAST = {"reassoc"}


@njit(nogil=True, cache=True)
def _consts(dtype, a, b):
    """0, 1, a and b as scalars of `dtype`: mixing a float32 with a Python float or an int
    makes float64 in Numba, which would halve the SIMD width of every loop it touches."""
    c = np.empty(4, dtype)
    c[0], c[1], c[2], c[3] = 0.0, 1.0, a, b
    return c[0], c[1], c[2], c[3]


@njit(nogil=True, cache=True, fastmath=_FAST)
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


@njit(nogil=True, cache=True, fastmath=_FAST)
def layer_norm_backward(gy, x, w, mean, rstd, gx, gw, gb):
    """gx (N, D) of layer norm's input from gy (N, D); ADDS the rows' sums of gy * xhat and gy
    into gw and gb (D,) (float64 partial sums, exact enough over any number of rows; a caller
    splitting rows over threads gives each part its own pair). gx may be None (only the
    weight and bias gradients wanted)."""
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
        if gx is not None:
            gxr = gx[i]
            sg *= inv_d
            sgx *= inv_d
            for j in range(d):
                gxr[j] = (gyr[j] * w[j] - sg - (xr[j] - m) * r * sgx) * r


@njit(nogil=True, cache=True)
def row_max_shift(x, t, ignore_index, z, mx):
    """z = x - max(x) per row of logits x (N, C) into z, the maxima into mx (N,) (NaN wins,
    as in np.max). Returns -1 at the first target t (N,) outside [0, C) that is not
    ignore_index, else 0. The exp of z is NumPy's: its SIMD exp is several times faster than
    the scalar one Numba compiles."""
    n, c = x.shape
    for i in range(n):
        ti = t[i]
        if ti != ignore_index and (ti < 0 or ti >= c):
            return -1
        xr = x[i]
        m = xr[0]
        for j in range(1, c):
            if xr[j] > m or xr[j] != xr[j]:
                m = xr[j]
        mx[i] = m
        zr = z[i]
        for j in range(c):
            zr[j] = xr[j] - m
    return 0


@njit(nogil=True, cache=True, fastmath=_FAST)
def softmax_nll(z, e, t, ignore_index, loss):
    """From z = x - max(x) (N, C) and e = exp(z): e becomes the softmax (rows divided by their
    sums) and loss (N,) log sum exp(z) - z[t] (= log sum exp(x) - x[t]), 0 where t is
    ignore_index. Returns the number of rows counted."""
    n, c = z.shape
    count = 0
    for i in range(n):
        er = e[i]
        s = er[0] - er[0]
        for j in range(c):
            s += er[j]
        inv = 1 / s
        for j in range(c):
            er[j] = er[j] * inv
        ti = t[i]
        if ti == ignore_index:
            loss[i] = 0
        else:
            loss[i] = np.log(s) - z[i, ti]
            count += 1
    return count


@njit(nogil=True, cache=True)
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


@njit(nogil=True, cache=True)
def add_rows(target, rows, values):
    """target[rows[i]] += values[i] for each i in order (repeats accumulate), target (n, D),
    rows (N,) already in [0, n), values (N, D)."""
    d = target.shape[1]
    for i in range(rows.size):
        r = rows[i]
        for j in range(d):
            target[r, j] += values[i, j]


@njit(nogil=True, cache=True)
def bias_relu_(y, b):
    """y = relu(y + b) in place, y (N, D), b (D,) (a bias-free caller passes zeros). ReLU as
    the NumPy path writes it, v * (v > 0): a NaN stays NaN."""
    n, d = y.shape
    for i in range(n):
        yr = y[i]
        for j in range(d):
            v = yr[j] + b[j]
            yr[j] = v if v > 0 else v * 0


@njit(nogil=True, cache=True)
def add_bias_(y, b):
    """y += b in place for every row of y (N, D)."""
    n, d = y.shape
    for i in range(n):
        yr = y[i]
        for j in range(d):
            yr[j] += b[j]


@njit(nogil=True, cache=True, fastmath=_FAST)
def relu_backward(gy, y, g, gb):
    """g = gy * (y > 0) (N, D) from the ReLU's output y; ADDS g's column sums into gb (D,)."""
    n, d = y.shape
    for i in range(n):
        gyr, yr, gr = gy[i], y[i], g[i]
        for j in range(d):
            v = gyr[j] if yr[j] > 0 else gyr[j] * 0
            gr[j] = v
            gb[j] += v
