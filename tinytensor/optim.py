"""Optimisers (AdamW, SGD), gradient clipping and the learning-rate schedule (lr_schedule).

AdamW performs exactly torch.optim.AdamW's update (decoupled weight decay, bias-corrected
moments). Parameter groups work as in PyTorch: pass a list of dicts with "params" and any
per-group overrides, e.g. weight_decay=0.0 for 1-D parameters.

FlatParameters (at the end) keeps parameters and their gradients in two flat buffers:

    flat = FlatParameters(params)   # every p.data becomes a view into flat.data (values kept)
    flat.gather_grads()             # each p.grad copied into its view of flat.grad

AdamW builds one when it is constructed and keeps it as `optimizer.flat`, so that a step is one
update over a stretch of flat buffers per parameter group instead of one per parameter. The
training loop hands the same object to distributed.allreduce_gradients (or the reducer's
GradientReducer), which sums flat.grad over the ranks in a few large MPI calls and then points
each p.grad at its view of flat.grad (PyTorch's DDP with gradient_as_bucket_view alike).
Nothing finds these buffers behind the caller's back: whoever needs them is given them.
"""
import math
import warnings

import numpy as np

from . import backend, fused, malloc
from .tensor import Tensor, increment_version, tensor_type_name


class Optimizer:
    """The base of AdamW and SGD: parameter groups (a list of Tensors, or of dicts with "params"
    and per-group overrides of the defaults), checked as torch.optim checks them. Making one
    starts a training loop: it keeps freed memory for the next steps (malloc.training_starts)."""

    defaults = {}

    def __init__(self, params, **defaults):
        if isinstance(params, Tensor):
            raise TypeError(f"params argument given to the optimizer should be an iterable of "
                            f"Tensors or dicts, but got {_typename(params)}: pass [tensor] or "
                            f"model.parameters()")
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(params[0], dict):
            params = [{"params": params}]
        self.param_groups = []
        seen = set()
        for g in params:
            if not isinstance(g, dict):
                raise TypeError(f"param_group must be a dict, but got {type(g)}: give every "
                                f"group as a dict with 'params', or no group at all")
            g = dict(g)
            if isinstance(g["params"], Tensor):
                g["params"] = [g["params"]]
            elif isinstance(g["params"], set):
                raise TypeError("optimizer parameters need to be organized in ordered "
                                "collections, but the ordering of tensors in sets will change "
                                "between runs. Please use a list instead.")
            g["params"] = list(g["params"])
            for k, v in defaults.items():
                g.setdefault(k, v)
            for p in g["params"]:
                if not isinstance(p, Tensor):
                    raise TypeError(f"optimizer can only optimize Tensors, but one of the params "
                                    f"is {_typename(p)}: pass the model's parameters()")
                if not p.is_leaf:
                    raise ValueError("can't optimize a non-leaf Tensor: pass the leaf tensors "
                                     "(a model's parameters()), not results computed from them")
            ids = {id(p) for p in g["params"]}
            if len(ids) != len(g["params"]):
                warnings.warn("optimizer contains a parameter group with duplicate parameters; "
                              "in future, this will cause an error; see "
                              "github.com/pytorch/pytorch/issues/40967 for more information",
                              stacklevel=3)
            if ids & seen:
                raise ValueError("some parameters appear in more than one parameter group: give "
                                 "each parameter to one group only")
            seen |= ids
            self.param_groups.append(g)
        self.state = {}  # id(param) -> dict of state arrays
        malloc.training_starts()  # steps reuse the memory the step before freed

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
    """torch.optim.AdamW: decoupled weight decay and bias-corrected moments, the update rule of
    fused.adamw_update.

    The parameters live in flat buffers (flat.FlatParameters), built with the optimizer: each
    p.data becomes a view into `optimizer.flat.data`, and the moments exp_avg and exp_avg_sq
    are views of two buffers beside it. So a group whose parameters all have a gradient (and
    the same step count) is updated by one call over its stretch of the buffers; otherwise its
    parameters are updated one by one, those without a gradient skipped, as torch does. Hand
    `optimizer.flat` to distributed.allreduce_gradients or GradientReducer. Parameters of mixed
    dtypes or devices cannot share flat buffers: then `flat` is None and each parameter has
    moments of its own.

    Build the optimizer after moving or casting the model; should Module.to() or astype()
    replace p.data afterwards anyway, the next step builds new flat buffers from the new
    arrays, the moments carried over.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        _check_adamw(lr, betas, eps, weight_decay)
        super().__init__(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        for i, g in enumerate(self.param_groups):  # (torch checks only the defaults)
            _check_adamw(g["lr"], g["betas"], g["eps"], g["weight_decay"], i)
        self._build_flat()

    def _build_flat(self):
        """self.flat and the moment buffers self.moments (2, n) beside it, the state's moments
        moved in; flat None when the parameters cannot share one buffer."""
        params = [p for _, p in self._params()]
        try:
            self.flat = FlatParameters(params)
        except ValueError:  # mixed dtypes or devices, or a parameter twice
            self.flat = None
            return
        self.moments = backend.get_array_module(self.flat.data).zeros((2, self.flat.data.size),
                                                                      dtype=self.flat.data.dtype)
        for i, p in enumerate(params):
            st = self.state.get(id(p))
            if st is not None:
                self._adopt(st, i)

    def _adopt(self, st, i):
        """Make parameter i's moments in state st its views of self.moments (values copied)."""
        m, v = (self.flat.view(self.moments[k], i) for k in (0, 1))
        m[...], v[...] = st["exp_avg"], st["exp_avg_sq"]
        st["exp_avg"], st["exp_avg_sq"] = m, v

    def _state(self, p, i):
        """Parameter p's state (the i-th parameter), made at its first step."""
        st = self.state.get(id(p))
        if st is None:
            if self.flat is not None:
                m, v = (self.flat.view(self.moments[k], i) for k in (0, 1))
            else:
                m, v = (backend.get_array_module(p.data).zeros_like(p.data) for _ in (0, 1))
            st = self.state[id(p)] = {"step": 0, "exp_avg": m, "exp_avg_sq": v}
        return st

    def load_state_dict(self, sd):
        super().load_state_dict(sd)
        if self.flat is not None:
            for i, p in enumerate(self.flat.params):
                if id(p) in self.state:
                    self._adopt(self.state[id(p)], i)

    def step(self):
        """One AdamW update of every parameter that has a gradient."""
        if self.flat is not None and not self.flat.intact():
            self._build_flat()  # p.data was replaced (Module.to, astype)
        i = 0
        for group in self.param_groups:
            params = group["params"]
            hyper = (group["lr"], *group["betas"], group["eps"], group["weight_decay"])
            todo = [(p, self._state(p, k)) for k, p in enumerate(params, start=i)
                    if p.grad is not None]
            for _, st in todo:
                st["step"] += 1
            if self.flat is not None and len(todo) == len(params) \
                    and len({st["step"] for _, st in todo}) == 1:
                a, b = self.flat.span(i, i + len(params))  # the whole group: one update
                self.flat.gather_grads(i, i + len(params))
                fused.adamw_update(self.flat.data[a:b], self.flat.grad[a:b], self.moments[0, a:b],
                                   self.moments[1, a:b], todo[0][1]["step"], *hyper)
            else:
                for p, st in todo:
                    fused.adamw_update(p.data, p.grad, st["exp_avg"], st["exp_avg_sq"],
                                       st["step"], *hyper)
            for p, _ in todo:  # torch's step writes each parameter twice with weight decay
                increment_version(p, 2 if group["weight_decay"] else 1)
            i += len(params)


def _check_adamw(lr, betas, eps, weight_decay, group=None):
    """ValueError, in torch.optim.AdamW's words and order, for a learning rate, epsilon or
    weight decay that is negative or NaN, or betas outside [0, 1) or not floats; `group`, the
    index of a parameter group whose own values these are."""
    where = "" if group is None else f" in parameter group {group}"
    for ok, what, value, want in (
            (0.0 <= lr, "learning rate", lr, "a number >= 0"),
            (0.0 <= eps, "epsilon value", eps, "a number >= 0"),
            (0.0 <= betas[0] < 1.0, "beta parameter at index 0", betas[0], "a float in [0, 1)"),
            (0.0 <= betas[1] < 1.0, "beta parameter at index 1", betas[1], "a float in [0, 1)"),
            (0.0 <= weight_decay, "weight_decay value", weight_decay, "a number >= 0")):
        if not ok:
            raise ValueError(f"Invalid {what}: {value}{where}: give {want}")
    if not (isinstance(betas[0], float) and isinstance(betas[1], float)):
        raise ValueError(f"betas must be either both floats or both Tensors{where}, got "
                         f"{tuple(betas)!r}: write them as floats, e.g. (0.9, 0.999)")


def _typename(x):
    """What torch.typename calls x: torch.FloatTensor for a float32 tensor, float for 1.0,
    numpy.ndarray for an array."""
    if isinstance(x, Tensor):
        return tensor_type_name(x)
    t = type(x)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


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
            increment_version(p)


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


class FlatParameters:
    """params (distinct Tensors of one float dtype on one device) viewed into flat buffers.

    The views last while nothing replaces p.data; Module.to() and astype() do, and intact()
    then says False (AdamW then builds new buffers)."""

    def __init__(self, params):
        params = list(params)
        if not params:
            raise ValueError("FlatParameters needs at least one parameter")
        if len({id(p) for p in params}) != len(params):
            raise ValueError("FlatParameters got the same parameter twice")
        first = params[0]
        for p in params:
            if p.dtype != first.dtype or p.device != first.device or p.dtype.kind != "f":
                raise ValueError(f"FlatParameters needs float parameters of one dtype on one device, "
                                 f"got {p.dtype} on {p.device} and {first.dtype} on {first.device}")
        xp = backend.get_array_module(first.data)
        self.params = params
        # parameter i lives in [offsets[i], offsets[i + 1]) of the flat buffers
        self.offsets = np.cumsum([0] + [p.data.size for p in params]).tolist()
        n = self.offsets[-1]
        self.data = xp.empty(n, dtype=first.dtype)
        # the gradients, then one flag per parameter ("has a gradient"): an allreduce sums both
        self.grad_and_flags = xp.zeros(n + len(params), dtype=first.dtype)
        self.grad, self.flags = self.grad_and_flags[:n], self.grad_and_flags[n:]
        self.host_staging = None  # host copy of grad_and_flags, for GPU buffers summed over MPI
        self.data_views = [self.view(self.data, i) for i in range(len(params))]
        self.grad_views = [self.view(self.grad, i) for i in range(len(params))]
        for p, view in zip(params, self.data_views):
            view[...] = p.data
            p.data = view

    def __len__(self):
        return len(self.params)

    def span(self, i, j):
        """(start, stop): the stretch of the flat buffers holding parameters i .. j-1."""
        return self.offsets[i], self.offsets[j]

    def view(self, buffer, i):
        """Parameter i's part of a flat buffer (data, grad, or one like them), in its shape."""
        return buffer[self.offsets[i]:self.offsets[i + 1]].reshape(self.params[i].shape)

    def intact(self):
        """True while every parameter's .data is still its view of self.data."""
        return all(p.data is v for p, v in zip(self.params, self.data_views))

    def gather_grads(self, i=0, j=None):
        """Copy the gradients of parameters i .. j-1 into their views of self.grad (those
        already there stay); a parameter without a gradient keeps what its view holds."""
        j = len(self.params) if j is None else j
        for p, view in zip(self.params[i:j], self.grad_views[i:j]):
            if p.grad is not None and p.grad is not view:
                view[...] = p.grad
