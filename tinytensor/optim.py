"""Optimisers (AdamW, SGD), gradient clipping and the learning-rate schedule (lr_schedule).

AdamW performs exactly torch.optim.AdamW's update (decoupled weight decay, bias-corrected
moments). Parameter groups work as in PyTorch: pass a list of dicts with "params" and any
per-group overrides, e.g. weight_decay=0.0 for 1-D parameters.
"""
import math

import numpy as np

from . import backend, parallel
from .flat import FlatParameters
from .kernels.adamw import adamw_step
from .tensor import Tensor

# the flat AdamW update goes over threads from this many parameters on (parallel.rows): its
# dozen passes over four arrays make even the small preset's 0.8 M parameters worth it
# (single thread 5.0 ms, two threads 1.8 ms on the 2-core test machine)
ADAMW_MIN_ELEMENTS = 1 << 16


class Optimizer:
    defaults = {}

    def __init__(self, params, **defaults):
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(params[0], dict):
            params = [{"params": params}]
        self.param_groups = []
        for g in params:
            g = dict(g)
            g["params"] = list(g["params"])
            for k, v in defaults.items():
                g.setdefault(k, v)
            for p in g["params"]:
                if not isinstance(p, Tensor) or not p.requires_grad:
                    raise TypeError("optimizer params must be Tensors with requires_grad=True")
            self.param_groups.append(g)
        self.state = {}  # id(param) -> dict of state arrays

    def _params(self):
        for g in self.param_groups:
            for p in g["params"]:
                yield g, p

    def zero_grad(self, set_to_none=True):
        for _, p in self._params():
            if set_to_none or p.grad is None:
                p.grad = None
            else:
                p.grad[...] = 0

    # state_dict keyed by parameter position, as torch does
    def state_dict(self):
        index = {id(p): i for i, (_, p) in enumerate(self._params())}
        state = {}
        for pid, st in self.state.items():
            state[index[pid]] = {k: (backend.to_numpy(v).copy() if hasattr(v, "shape") else v)
                                 for k, v in st.items()}
        groups = []
        for g in self.param_groups:
            d = {k: v for k, v in g.items() if k != "params"}
            d["params"] = [index[id(p)] for p in g["params"]]
            groups.append(d)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd):
        groups = sd["param_groups"]
        if len(groups) != len(self.param_groups) or any(
                len(a["params"]) != len(b["params"]) for a, b in zip(groups, self.param_groups)):
            raise ValueError("optimizer state_dict does not match this optimizer's parameter groups")
        params = [p for _, p in self._params()]
        for g, saved in zip(self.param_groups, groups):
            for k, v in saved.items():
                if k != "params":
                    g[k] = tuple(v) if k == "betas" else v
        self.state = {}
        for i, st in sd["state"].items():
            p = params[int(i)]
            new = {}
            for k, v in st.items():
                if hasattr(v, "shape") and np.ndim(v) > 0:
                    if tuple(v.shape) != p.shape:
                        raise ValueError(f"optimizer state {k} for parameter {i} has shape "
                                         f"{tuple(v.shape)}, expected {p.shape}")
                    xp = backend.get_array_module(p.data)
                    v = xp.asarray(backend.to_device(np.asarray(v), p.device), dtype=p.dtype)
                elif hasattr(v, "shape"):
                    v = v.item()
                new[k] = v
            self.state[id(p)] = new


class AdamW(Optimizer):
    """torch.optim.AdamW, with every parameter kept in flat buffers (flat.py) from the start.

    Building it makes each p.data a view into `optimizer.flat.data` (the values are kept) and
    has backward write each gradient into its view of `optimizer.flat.grad`; hand
    `optimizer.flat` to distributed.allreduce_gradients. Parameters of mixed dtypes or devices
    (or one parameter in two groups) cannot share flat buffers: then `flat` is None and every
    step takes the per-parameter path. Both paths call the same kernels.adamw_step.

    Build the optimizer after moving or casting the model. Should Module.to() or astype()
    replace p.data afterwards anyway, `flat` notices (FlatParameters.intact() is False) and
    builds new buffers from the new arrays, carrying the moments over, so the update stays exact.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid AdamW hyperparameters: lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        super().__init__(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        self._flat = self._build_flat()

    @property
    def flat(self):
        """The FlatParameters holding every parameter (in param_groups order), or None."""
        return self._flat_buffers()

    def _build_flat(self):
        """FlatParameters of all parameters and flat moment buffers beside them; None when the
        parameters cannot share one buffer (mixed dtypes or devices, a parameter twice)."""
        params = [p for _, p in self._params()]
        try:
            flat = FlatParameters(params)
        except ValueError:
            return None
        self._m = backend.get_array_module(flat.data).zeros_like(flat.data)  # exp_avg of all
        self._v = self._m.copy()                                             # exp_avg_sq of all
        spans = list(zip(params, flat.offsets, flat.offsets[1:]))
        self._m_views = [self._m[a:b].reshape(p.shape) for p, a, b in spans]
        self._v_views = [self._v[a:b].reshape(p.shape) for p, a, b in spans]
        return flat

    def _flat_buffers(self):
        """self._flat, rebuilt first when some p.data was replaced since it was built."""
        if self._flat is not None and not self._flat.intact():
            self._flat.release()
            self._flat = self._build_flat()
        return self._flat

    def step(self):
        """One AdamW update of every parameter that has a gradient.

        A group whose parameters all have gradients is updated by one kernels.adamw_step call
        over its stretch of the flat buffers. A group in which some parameter has no gradient,
        moments at different step counts (a partly loaded state), or parameters without flat
        buffers take the per-parameter path: the same function on each parameter's arrays.
        """
        flat = self._flat_buffers()
        start = 0
        for g in self.param_groups:
            n = len(g["params"])
            if flat is None or not self._flat_step(g, flat, start, start + n):
                self._step_each(g)
            start += n

    def _flat_step(self, g, flat, i, j):
        """Update parameters i .. j-1 (group g) with one flat kernel; False if it cannot."""
        params = g["params"]
        if any(p.grad is None for p in params):
            return False
        a, b = flat.span(i, j)
        steps = set()
        for k, p in enumerate(params, start=i):  # the moments are views of the flat ones
            m, v = self._m_views[k], self._v_views[k]
            st = self.state.get(id(p))
            if st is None:
                m[...] = 0
                v[...] = 0
                st = self.state[id(p)] = {"step": 0, "exp_avg": m, "exp_avg_sq": v}
            elif st["exp_avg"] is not m or st["exp_avg_sq"] is not v:
                m[...] = st["exp_avg"]  # loaded or per-parameter state: move it in
                v[...] = st["exp_avg_sq"]
                st["exp_avg"], st["exp_avg_sq"] = m, v
            steps.add(st["step"])
            if p.grad is not flat.grad_views[k]:  # e.g. a gradient set by hand: copy it in
                flat.grad_views[k][...] = p.grad
        if len(steps) != 1:
            return False
        (b1, b2), t = g["betas"], steps.pop() + 1
        P, G, M, V = flat.data[a:b], flat.grad[a:b], self._m[a:b], self._v[a:b]

        def update(r0, r1):  # element-wise: large buffers are split over threads
            adamw_step(P[r0:r1], G[r0:r1], M[r0:r1], V[r0:r1], g["lr"], b1, b2, g["eps"],
                       g["weight_decay"], t)
        parallel.rows(b - a, update, b - a, backend.get_array_module(P), min_size=ADAMW_MIN_ELEMENTS)
        for p in params:
            self.state[id(p)]["step"] = t
        return True

    def _step_each(self, g):
        """The per-parameter update of group g (parameters without a gradient are skipped)."""
        b1, b2 = g["betas"]
        for p in g["params"]:
            if p.grad is None:
                continue
            st = self.state.get(id(p))
            if st is None:
                xp = backend.get_array_module(p.data)
                st = self.state[id(p)] = {"step": 0, "exp_avg": xp.zeros_like(p.data),
                                          "exp_avg_sq": xp.zeros_like(p.data)}
            st["step"] += 1
            adamw_step(p.data, p.grad, st["exp_avg"], st["exp_avg_sq"], g["lr"], b1, b2,
                       g["eps"], g["weight_decay"], st["step"])


class SGD(Optimizer):
    """torch.optim.SGD's update. With weight decay wd, momentum m and dampening d, each step
    g = grad + wd * p; buf = g at the first step, then buf = m * buf + (1 - d) * g; the step
    direction is buf, or g + m * buf with nesterov; p -= lr * direction."""

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False):
        if lr < 0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov)

    def step(self):
        for g, p in self._params():
            if p.grad is None:
                continue
            d = p.grad
            if g["weight_decay"]:
                d = d + g["weight_decay"] * p.data
            m = g["momentum"]
            if m:
                st = self.state.setdefault(id(p), {})
                buf = st.get("momentum_buffer")
                if buf is None:
                    buf = st["momentum_buffer"] = d.copy()
                else:
                    buf *= m
                    buf += d if g["dampening"] == 0 else (1 - g["dampening"]) * d
                d = d + m * buf if g["nesterov"] else buf
            p.data -= g["lr"] * d


def clip_grad_norm_(params, max_norm, error_if_nonfinite=False):
    """Scale gradients in place so their global L2 norm is at most max_norm.

    Returns the total norm before clipping as a 0-d Tensor (no host sync on the GPU).
    """
    if isinstance(params, Tensor):
        params = [params]
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return Tensor(np.zeros((), dtype=np.float32))
    xp = backend.get_array_module(grads[0])
    total = xp.sqrt(sum(xp.vdot(g.ravel(), g.ravel()).real for g in grads))
    if error_if_nonfinite and not bool(xp.isfinite(total)):
        raise RuntimeError(f"the total gradient norm is non-finite ({float(total)})")
    coef = xp.minimum(max_norm / (total + 1e-6), 1.0)
    for g in grads:
        g *= coef.astype(g.dtype)
    return Tensor(xp.asarray(total))


def lr_schedule(step, lr, min_lr, warmup_iters, decay_iters, decay="cosine"):
    """The learning rate at optimizer step `step` (0-based): a linear warmup over warmup_iters
    steps (lr * (step + 1) / (warmup_iters + 1)), then lr itself (decay="none") or a cosine
    decay from lr to min_lr at decay_iters, min_lr from there on (decay="cosine")."""
    if warmup_iters > 0 and step < warmup_iters:
        return lr * (step + 1) / (warmup_iters + 1)
    if decay == "none":
        return lr
    if decay != "cosine":
        raise ValueError(f"lr_schedule: decay={decay!r}, expected 'cosine' or 'none'")
    if step >= decay_iters:
        return min_lr
    ratio = (step - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)
