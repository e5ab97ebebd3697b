"""Products: matmul and einsum (F.linear is a fused op: tinytensor.fused.Linear)."""
import numpy as np

from ..tensor import Function
from ._common import _xp, as_tensor, check_matmul


class MatMul(Function):
    """a @ b with numpy.matmul semantics (1-D operands, broadcast batch dimensions)."""

    def forward(self, a, b):
        # each operand kept only for the other's gradient, as torch saves them
        self.a = a if self.needs_grad[1] else None
        self.b = b if self.needs_grad[0] else None
        self.ndims = a.ndim, b.ndim
        return a @ b

    def backward(self, gy):
        xp = _xp(gy)
        a_ndim, b_ndim = self.ndims
        g2 = gy
        if b_ndim == 1:                                 # b's axis first: gy may be 0-d
            g2 = xp.expand_dims(g2, -1)
        if a_ndim == 1:
            g2 = xp.expand_dims(g2, -2)                 # (.., m, n)
        ga = gb = None
        if self.needs_grad[0]:
            b2 = self.b[:, None] if b_ndim == 1 else self.b     # (.., k, n)
            ga = g2 @ xp.swapaxes(b2, -1, -2)           # (.., m, k)
            if a_ndim == 1:
                ga = ga.reshape(ga.shape[:-2] + (ga.shape[-1],))
            ga = _sum_to_ndim(ga, a_ndim)
        if self.needs_grad[1]:
            a2 = self.a[None, :] if a_ndim == 1 else self.a     # (.., m, k)
            gb = xp.swapaxes(a2, -1, -2) @ g2           # (.., k, n)
            if b_ndim == 1:
                gb = gb[..., 0]
            gb = _sum_to_ndim(gb, b_ndim)
        return ga, gb


def _sum_to_ndim(g, ndim):
    """Sum leading batch dims that a lower-rank operand was broadcast over."""
    if g.ndim > ndim:
        g = g.sum(axis=tuple(range(g.ndim - ndim)))
    return g


def matmul(a, b):
    a, b = as_tensor(a), as_tensor(b)
    check_matmul(a, b, "matmul")
    k_a = a.shape[-1]
    k_b = b.shape[0] if b.ndim == 1 else b.shape[-2]
    batch_ok = True
    try:
        np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except ValueError:
        batch_ok = False
    if k_a != k_b or not batch_ok:
        raise RuntimeError(f"matmul: shapes {a.shape} and {b.shape} cannot be multiplied "
                           f"({k_a} != {k_b} in the contracted dimension, or batch dimensions "
                           f"that do not broadcast)")
    return MatMul.apply(a, b)


# ---------------------------------------------------------------- einsum
_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _parse_einsum(equation, shapes):
    """Explicit subscripts: one letter string per operand and the output's, '...' replaced by
    letters (the same dims of every operand must then have equal sizes)."""
    eq = equation.replace(" ", "")
    lhs, arrow, out = eq.partition("->")
    subs = lhs.split(",")
    if len(subs) != len(shapes):
        raise ValueError(f"einsum(): {len(subs)} operands in the equation {equation!r} but "
                         f"{len(shapes)} tensors given")
    used = set(c for c in eq if c.isalpha())
    free = [c for c in _LETTERS if c not in used]
    n_ell = max([len(s) - len(sub.replace("...", "")) for sub, s in zip(subs, shapes)
                 if "..." in sub] or [0])
    ell = "".join(free[:n_ell])
    sizes = {}
    new_subs = []
    for sub, shape in zip(subs, shapes):
        if any(not (c.isalpha() or c == ".") for c in sub):
            raise ValueError(f"einsum(): invalid subscript {sub!r} in {equation!r}: use letters a-z, A-Z")
        if "..." in sub:
            k = len(shape) - len(sub.replace("...", ""))
            sub = sub.replace("...", ell[n_ell - k:] if k else "")
        if len(sub) != len(shape):
            raise ValueError(f"einsum(): subscript {sub!r} has {len(sub)} letters for an operand "
                             f"with {len(shape)} dimensions {shape}")
        if len(set(sub)) != len(sub):
            raise NotImplementedError(f"einsum(): a letter repeated within one operand ({sub!r}: a "
                                      f"diagonal or trace) is not supported")
        for c, n in zip(sub, shape):
            if sizes.setdefault(c, n) != n:
                raise RuntimeError(f"einsum(): subscript {c} has size {n} for an operand which does "
                                   f"not broadcast with previously seen size {sizes[c]} (sizes must "
                                   f"be equal: broadcasting is not supported)")
        new_subs.append(sub)
    if arrow:
        out = out.replace("...", ell)
        if len(set(out)) != len(out) or any(c not in sizes for c in out):
            raise ValueError(f"einsum(): output subscripts {out!r} must be distinct letters that "
                             f"appear in the inputs")
    else:  # implicit: ellipsis dims, then the letters seen once, in alphabetical order
        counts = "".join(new_subs)
        out = ell + "".join(sorted((c for c in set(counts) if counts.count(c) == 1 and c not in ell),
                                   key=_LETTERS.index))
    return new_subs, out, sizes


class Einsum(Function):
    """Sums of products over the letters of subscripts (no letter repeated in one operand).
    The gradient of operand i is the einsum of the output gradient with the other operands into
    i's subscripts; letters only operand i has (summed away) are broadcast back."""

    def forward(self, *ops, subs, out, sizes):
        self.ops, self.subs, self.out, self.sizes = ops, subs, out, sizes
        return _einsum(f"{','.join(subs)}->{out}", *ops)

    def backward(self, gy):
        xp = _xp(gy)
        grads = []
        for i, sub in enumerate(self.subs):
            if not self.needs_grad[i]:
                grads.append(None)
                continue
            others = [s for j, s in enumerate(self.subs) if j != i]
            reach = set(self.out).union(*others)
            kept = "".join(c for c in sub if c in reach)
            ops = [gy] + [o for j, o in enumerate(self.ops) if j != i]
            g = _einsum(f"{','.join([self.out] + others)}->{kept}", *ops)
            if kept != sub:  # letters only this operand had: its gradient is constant along them
                g = g.reshape([self.sizes[c] if c in kept else 1 for c in sub])
                g = xp.broadcast_to(g, [self.sizes[c] for c in sub])
            grads.append(g)
        return tuple(grads)


def _einsum(eq, *ops):
    xp = _xp(*ops)
    return xp.einsum(eq, *ops, optimize=True) if xp is np else xp.einsum(eq, *ops)


def einsum(equation, *operands):
    """torch.einsum(equation, *operands) (operands also as one list)."""
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    if not isinstance(equation, str):
        raise TypeError(f"einsum(): the equation must be a str, got {type(equation).__name__}")
    operands = [as_tensor(o) for o in operands]
    if not operands:
        raise ValueError("einsum(): must provide at least one operand")
    for o in operands[1:]:
        if o.dtype != operands[0].dtype:
            raise RuntimeError(f"einsum(): expected operands of one dtype, got {operands[0].dtype} "
                               f"and {o.dtype}")
    subs, out, sizes = _parse_einsum(equation, [o.shape for o in operands])
    return Einsum.apply(*operands, subs=subs, out=out, sizes=sizes)
