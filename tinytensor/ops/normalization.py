"""The softmax family, each a numerically stable Function: softmax, log_softmax, and the
negative log-likelihood of log-probabilities (nll_loss). The fused cross-entropy is in
tinytensor.fused."""
import warnings

from ..tensor import Function
from ._common import _xp, mean_grad, reduce_rows, wrap_dim


class Softmax(Function):
    def forward(self, x, axis=-1):
        xp = _xp(x)
        self.axis = axis
        y = x - x.max(axis=axis, keepdims=True)
        xp.exp(y, out=y)
        y /= y.sum(axis=axis, keepdims=True)
        self.y = y
        return y

    def backward(self, gy):
        y = self.y
        gx = gy * y
        gx -= y * gx.sum(axis=self.axis, keepdims=True)
        return gx


def _softmax_dim(name, x, dim, dtype):
    if dim is None:  # torch's legacy implicit dim, with its warning
        warnings.warn(f"Implicit dimension choice for {name} has been deprecated. Change the call "
                      f"to include dim=X as an argument.", UserWarning, stacklevel=3)
        dim = 0 if x.ndim in (0, 1, 3) else 1
    if dtype is not None:
        x = x.astype(dtype)
    if x.dtype.kind != "f":
        raise NotImplementedError(f"{name} is not implemented for {x.dtype} tensors: convert "
                                  f"with .float() or pass dtype=")
    return x, wrap_dim(dim, x.ndim)


def softmax(x, dim=None, dtype=None):
    x, axis = _softmax_dim("softmax", x, dim, dtype)
    if x.ndim == 0:  # over its one element
        return Softmax.apply(x.reshape(1), axis=0).reshape(())
    return Softmax.apply(x, axis=axis)


class LogSoftmax(Function):
    def forward(self, x, axis=-1):
        xp = _xp(x)
        self.axis = axis
        y = x - x.max(axis=axis, keepdims=True)
        y -= xp.log(xp.exp(y).sum(axis=axis, keepdims=True))
        self.y = y
        return y

    def backward(self, gy):
        xp = _xp(gy)
        return gy - xp.exp(self.y) * gy.sum(axis=self.axis, keepdims=True)


def log_softmax(x, dim=None, dtype=None):
    x, axis = _softmax_dim("log_softmax", x, dim, dtype)
    if x.ndim == 0:
        return LogSoftmax.apply(x.reshape(1), axis=0).reshape(())
    return LogSoftmax.apply(x, axis=axis)


class NLLLoss(Function):
    """Negative log-likelihood -x[i, t_i] of integer targets t (N,) under log-probabilities
    x (N, C); rows whose target is ignore_index count neither in the loss nor in the mean."""

    def forward(self, x, t, reduction="mean", ignore_index=-100):
        xp = _xp(x)
        n, c = x.shape
        valid = t != ignore_index
        tt = xp.where(valid, t, 0)
        rows = xp.arange(n)
        picked = x[rows, tt] if c else xp.zeros(n, dtype=x.dtype)      # (N,)
        loss = xp.where(valid, -picked, 0)                               # (N,)
        self.shape, self.tt, self.rows, self.valid, self.reduction = x.shape, tt, rows, valid, reduction
        self.count = valid.sum()
        return reduce_rows(loss, reduction, self.count)

    def backward(self, gy):
        xp = _xp(gy)
        if self.reduction == "mean":
            gy = mean_grad(gy, self.count)
        gx = xp.zeros(self.shape, dtype=gy.dtype)
        if self.shape[1]:
            gx[self.rows, self.tt] = xp.where(self.valid, -gy, gy.dtype.type(0))  # one per row
        return gx, None
