"""Tensor, the Function base class and the reverse-mode engine.

A Tensor wraps an ndarray (numpy or cupy). Every differentiable operation is a Function
subclass (see ops.py) with `forward` on raw arrays and `backward` right below it. Calling
`Function.apply(*inputs)` runs forward and, when gradients are wanted, records the Function
as the output's creator. `Tensor.backward()` sorts the graph topologically (iteratively, so
deep graphs never hit the recursion limit), walks it in reverse, un-broadcasts each gradient
to its input's shape (the only place that happens) and accumulates it.
"""
import functools

import numpy as np

from . import backend, parallel
from .dtypes import get_default_dtype, set_default_dtype  # noqa: F401 - re-exported

_grad_enabled = True


def is_grad_enabled():
    return _grad_enabled


class no_grad:
    """Context manager (and decorator, `@no_grad()` or `@no_grad`) that turns graph recording off."""

    def __new__(cls, fn=None):
        if fn is not None:  # used as a bare decorator: @no_grad
            return cls()(fn)
        return super().__new__(cls)

    def __enter__(self):
        global _grad_enabled
        self._prev = _grad_enabled
        _grad_enabled = False

    def __exit__(self, *exc):
        global _grad_enabled
        _grad_enabled = self._prev
        return False

    def __call__(self, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with no_grad():
                return fn(*args, **kwargs)
        return wrapper


def _as_array(data, dtype=None):
    """Turn data into an ndarray, as torch.tensor does: an array keeps its dtype (unless dtype
    is given); Python data gets bool, int64 or the default float dtype from its values."""
    if isinstance(data, Tensor):
        data = data.data
    if isinstance(data, np.ndarray) or backend.is_cuda(data):
        return data if dtype is None else data.astype(dtype, copy=False)
    if isinstance(data, np.generic):
        return np.asarray(data, dtype=dtype)
    arr = np.asarray(data)
    kind = arr.dtype.kind
    if kind not in "biuf":
        raise TypeError(f"tensor(): cannot make a tensor from {type(data).__name__} {data!r:.60}: "
                        f"expected numbers, bools, (nested) lists of them or an array")
    if dtype is not None:
        return arr.astype(dtype, copy=False)
    if kind == "f":
        return arr.astype(get_default_dtype(), copy=False)
    if kind in "iu":
        return arr.astype(np.int64, copy=False)
    return arr


class Tensor:
    """An n-dimensional array with reverse-mode automatic differentiation."""

    # _grad_view: where backward() writes this leaf's first gradient (flat.FlatParameters sets
    # it to a view of a flat gradient buffer); unset, a copy of the gradient is made.
    # _post_hooks: {id: hook} of register_post_accumulate_grad_hook; unset until one is registered
    __slots__ = ("data", "grad", "requires_grad", "_ctx", "_grad_view", "_post_hooks",
                 "__weakref__")
    __array_priority__ = 1000  # so ndarray + Tensor defers to Tensor.__radd__

    def __init__(self, data, requires_grad=False, dtype=None):
        self.data = _as_array(data, dtype)
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._ctx = None  # the Function that produced this tensor (None for leaves)
        if self.requires_grad and self.data.dtype.kind not in "fc":
            raise TypeError(f"only floating point tensors can require gradients, got {self.data.dtype}")

    # ----- properties -----------------------------------------------------------------
    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def size(self):
        return self.data.size

    @property
    def device(self):
        return backend.device_of(self.data)

    @property
    def is_leaf(self):
        return self._ctx is None

    @property
    def T(self):
        return self.permute(*reversed(range(self.ndim)))

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        dev = ", device='cuda'" if self.device == "cuda" else ""
        body = np.array2string(backend.to_numpy(self.data), separator=", ", prefix="tensor(")
        return f"tensor({body}{dev}{grad})"

    # ----- conversion -----------------------------------------------------------------
    def numpy(self):
        """The data as a NumPy array on the host (a copy when it lives on the GPU)."""
        return backend.to_numpy(self.data)

    def item(self):
        if self.data.size != 1:
            raise ValueError(f"item() needs a tensor with one element, this one has shape {self.shape}")
        return self.data.reshape(()).item()

    def tolist(self):
        return self.numpy().tolist()

    def _one_value(self, what):
        if self.data.size != 1:
            raise RuntimeError(f"{what} of a tensor with {self.data.size} elements (shape "
                               f"{self.shape}) is ambiguous: only a single-element tensor converts")
        return self.data.reshape(()).item()

    def __bool__(self):  # as torch: `if t:` needs a single element (use .any() or .all())
        return bool(self._one_value("the truth value"))

    def __float__(self):
        return float(self._one_value("float()"))

    def __int__(self):
        return int(self._one_value("int()"))

    def __index__(self):
        if self.dtype.kind not in "iu":
            raise TypeError(f"only integer tensors of a single element can be converted to an "
                            f"index, got dtype {self.dtype}")
        return int(self._one_value("an index"))

    def detach(self):
        """A new leaf tensor sharing this tensor's data, cut from the graph."""
        return Tensor(self.data)

    def to(self, device):
        """This tensor on `device` ('cpu' or 'cuda'): itself when already there, else a copy."""
        data = backend.to_device(self.data, device)
        if data is self.data:
            return self
        out = Tensor(data, requires_grad=self.requires_grad)
        return out

    def cpu(self):
        return self.to("cpu")

    def cuda(self):
        return self.to("cuda")

    def astype(self, dtype):
        from .ops import Cast
        return Cast.apply(self, dtype=np.dtype(dtype))


    # ----- the engine -----------------------------------------------------------------
    def register_post_accumulate_grad_hook(self, hook):
        """Call hook(self) during backward() right after this leaf's .grad has been accumulated
        (its gradient for that backward is then final), as torch. Returns a handle whose
        .remove() unregisters it. Only leaves that require grad; hooks run under no_grad()."""
        if not self.requires_grad:
            raise RuntimeError("cannot register a hook on a tensor that doesn't require gradient")
        if self._ctx is not None:
            raise RuntimeError("post accumulate grad hooks cannot be registered on non-leaf "
                               "tensors")
        hooks = getattr(self, "_post_hooks", None)
        if hooks is None:
            hooks = self._post_hooks = {}
        return _RemovableHandle(hooks, hook)

    def backward(self, grad=None):
        """Accumulate d(self)/d(leaf) into every leaf's .grad, then free the graph.

        grad defaults to 1 for a single-element tensor; otherwise pass an array (or Tensor)
        of this tensor's shape.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad: no input "
                               "has requires_grad=True, or it was computed under no_grad()")
        xp = backend.get_array_module(self.data)
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(f"backward() without a gradient needs a single-element tensor, "
                                   f"got shape {self.shape}: pass grad= of that shape")
            grad = xp.ones_like(self.data)
        else:
            grad = _as_array(grad, self.dtype)
            if grad.shape != self.shape:
                raise ValueError(f"backward(grad) shape {grad.shape} does not match tensor shape {self.shape}")

        order, multi, hooked = _topo_order(self)
        grads = {id(self): grad}
        for t in reversed(order):
            g = grads.pop(id(t), None)
            ctx = t._ctx
            if ctx is None:  # a leaf: accumulate
                if g is not None:
                    _accumulate(t, g)
                continue
            if multi and id(ctx) in multi:  # one output of several: backward runs once, after the last
                waiting = multi[id(ctx)]
                waiting[ctx.outputs.index(id(t))] = g
                t._ctx = _RELEASED
                waiting.count -= 1
                if waiting.count:
                    continue
                g = tuple(waiting) if any(w is not None for w in waiting) else None
            if g is not None:
                in_grads = ctx.backward(g)  # _RELEASED raises: this graph was freed already
                if not isinstance(in_grads, tuple):
                    in_grads = (in_grads,)
                for parent, pg in zip(ctx.parents, in_grads):
                    if parent is None or not parent.requires_grad:
                        continue
                    key = id(parent)
                    if pg is not None:
                        data = parent.data
                        if pg.shape != data.shape:
                            pg = _unbroadcast(pg, data.shape)
                        if pg.dtype is not data.dtype and pg.dtype != data.dtype:
                            pg = pg.astype(data.dtype)  # e.g. through a cast: grads keep their input's dtype
                        prev = grads.get(key)
                        grads[key] = pg if prev is None else parallel.add(prev, pg)
                    if hooked and key in hooked:  # a leaf with hooks: accumulate after its last
                        hooked[key] -= 1          # consumer, not at its place in `order`
                        if not hooked[key] and key in grads:
                            _accumulate(parent, grads.pop(key))
            if ctx is not _RELEASED:  # free the graph as we go: saved arrays and links go
                t._ctx = _RELEASED
                ctx.parents = None
                ctx.release()


class _RemovableHandle:
    """What register_post_accumulate_grad_hook returns: .remove() unregisters the hook."""

    _next_id = 0

    def __init__(self, hooks, hook):
        _RemovableHandle._next_id += 1
        self.id, self._hooks = _RemovableHandle._next_id, hooks
        hooks[self.id] = hook

    def remove(self):
        self._hooks.pop(self.id, None)


class _Released:
    """Stands in for the Function of a tensor whose graph backward() has freed."""

    parents = ()
    outputs = None

    def backward(self, gy):
        raise RuntimeError("backward() through a graph that an earlier backward() already freed: "
                           "run the forward pass again (the graph is freed after each backward)")

    def release(self):
        pass


_RELEASED = _Released()


class _Waiting(list):
    """The gradients of a several-output Function's outputs, gathered until the last comes."""

    count = 0


def _accumulate(leaf, g):
    """leaf.grad += g (a copy of g the first time), then the leaf's post-accumulate hooks."""
    if leaf.grad is None:  # a copy: g may be shared with other inputs' gradients
        leaf.grad = _first_grad(leaf, g)
    else:
        leaf.grad += g
    if getattr(leaf, "_post_hooks", None):  # every consumer has run: .grad is final
        with no_grad():
            for hook in list(leaf._post_hooks.values()):  # a hook may remove itself
                hook(leaf)


def _topo_order(root):
    """Tensors reachable from root, parents before children (iterative DFS); for each Function
    with several outputs among them, a _Waiting list (by id of the Function); and for each leaf
    with post-accumulate hooks, its number of consumers (by id of the leaf).

    A DFS puts the leaves (the parameters) near the end of the walk back, so backward()
    accumulates a leaf with hooks as soon as its last consumer has run instead, at once in the
    walk: gradient-ready hooks fire from the last layer back while backward goes on (the sum
    and hence .grad are the same, bit for bit)."""
    order, visited, multi, hooked = [], set(), {}, {}
    stack = [(root, False)]
    push, pop, seen, append = stack.append, stack.pop, visited.add, order.append
    while stack:
        t, done = pop()
        if done:
            append(t)
            continue
        key = id(t)
        if key in visited:
            continue
        seen(key)
        push((t, True))
        ctx = t._ctx
        if ctx is not None:
            first = True  # the first output of this Function reached: count its inputs once
            if ctx.outputs is not None:
                waiting = multi.get(id(ctx))
                if waiting is None:
                    waiting = multi[id(ctx)] = _Waiting([None] * len(ctx.outputs))
                else:
                    first = False
                waiting.count += 1
            for p in ctx.parents:
                if p is not None and p.requires_grad:
                    if first and p._ctx is None and getattr(p, "_post_hooks", None):
                        hooked[id(p)] = hooked.get(id(p), 0) + 1
                    if id(p) not in visited:
                        push((p, False))
    return order, multi, hooked


def _first_grad(leaf, g):
    """A copy of g for a leaf's .grad: written into the leaf's _grad_view (a view of a flat
    gradient buffer, see flat.py) when it has a matching one, else a new array."""
    view = getattr(leaf, "_grad_view", None)
    if view is not None and view.shape == g.shape and view.dtype == leaf.dtype \
            and type(view) is type(g):
        view[...] = g
        return view
    return g.astype(leaf.dtype, copy=True)


def _unbroadcast(g, shape):
    """Sum a broadcast gradient back down to `shape`."""
    extra = g.ndim - len(shape)
    if extra > 0:
        g = g.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g.reshape(shape)


class Function:
    """One differentiable primitive: subclass, define forward(*arrays) and backward(gy).

    forward receives raw arrays (Tensor inputs unwrapped) plus keyword arguments and
    returns an array; it may store what backward needs on self. backward receives the
    output gradient and returns one gradient (or None) per positional input.
    `self.needs_grad[i]` says whether input i wants a gradient.

    A Function with several outputs (split) returns a tuple of arrays from forward and gets a
    tuple of their gradients in backward (None for an output that got none); apply returns a
    tuple of Tensors. Integer and bool outputs (indices) never require gradients.
    """

    __slots__ = ("parents", "needs_grad", "__dict__")
    outputs = None  # ids of the output Tensors, for a Function with several

    @classmethod
    def apply(cls, *inputs, **kwargs):
        ctx = cls()
        parents, arrays, record = [], [], False
        for x in inputs:  # one pass: the Tensors' arrays, and whether any wants a gradient
            if isinstance(x, Tensor):
                parents.append(x)
                arrays.append(x.data)
                record = record or x.requires_grad
            else:
                parents.append(None)
                arrays.append(x)
        out = ctx.forward(*arrays, **kwargs)
        record = record and _grad_enabled
        if record:
            ctx.parents = parents
            ctx.needs_grad = [p is not None and p.requires_grad for p in parents]
        if isinstance(out, tuple):
            results = tuple(_output(o, record and o.dtype.kind in "fc", ctx) for o in out)
            if record:
                ctx.outputs = [id(r) for r in results]
            return results
        return _output(out, record, ctx)

    def forward(self, *arrays, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, gy):  # pragma: no cover - abstract
        raise NotImplementedError

    def release(self):
        """Drop saved arrays once backward has run."""
        self.__dict__.clear()


def _output(out, record, ctx):
    """A Tensor for the array `out` that `ctx` made (recorded in the graph when `record`)."""
    if isinstance(out, np.generic):  # a NumPy scalar (full reduction): .data stays an ndarray
        out = np.asarray(out)
    result = Tensor.__new__(Tensor)
    result.data = out
    result.grad = None
    result.requires_grad = record
    result._ctx = ctx if record else None
    return result


def tensor(data, requires_grad=False, dtype=None):
    """Create a Tensor (like torch.tensor)."""
    return Tensor(data, requires_grad=requires_grad, dtype=dtype)
