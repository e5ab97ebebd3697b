"""Tensor, the Function base class and the reverse-mode engine.

A Tensor wraps an ndarray (numpy or cupy). Every differentiable operation is a Function
subclass (see ops.py) with `forward` on raw arrays and `backward` right below it. Calling
`Function.apply(*inputs)` runs forward and, when gradients are wanted, records the Function
as the output's creator. `Tensor.backward()` sorts the graph topologically (iteratively, so
deep graphs never hit the recursion limit), walks it in reverse, un-broadcasts each gradient
to its input's shape (the only place that happens) and accumulates it.

In-place writes are counted as torch counts them: every tensor has a version counter
(`x._version`), shared with its views and its detach(), that each in-place write bumps
(increment_version). A Function records its inputs' versions when it is applied, and backward
refuses, with torch's RuntimeError, to run a Function whose kept arrays were written in place
since (_check_versions); a count of all writes (_writes) lets it skip the check when nothing
was written since the Function was applied, as in a training step.
"""
import functools
import weakref

import numpy as np

from . import backend
from .dtypes import get_default_dtype, set_default_dtype  # noqa: F401 - re-exported

_grad_enabled = True
_writes = 0  # in-place writes so far, into any tensor (increment_version)


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
        _check_array_dtype(data)
        return data if dtype is None else data.astype(dtype, copy=False)
    if isinstance(data, np.generic) and not isinstance(data, (str, bytes)):
        _check_array_dtype(data)
        return np.asarray(data, dtype=dtype)
    try:
        arr = np.asarray(data)
    except ValueError:  # nested lists of different lengths
        arr = None
    if arr is None or arr.dtype.kind not in "biuf":
        _check_python_data(data)
        raise TypeError(f"tensor(): cannot make a tensor from {type(data).__name__} {data!r:.60}: "
                        f"tinytensor has no complex tensors; give real numbers or bools")
    kind = arr.dtype.kind
    if dtype is not None:
        return arr.astype(dtype, copy=False)
    if kind == "f":
        return arr.astype(get_default_dtype(), copy=False)
    if kind in "iu":
        return arr.astype(np.int64, copy=False)
    return arr


_TORCH_NUMPY_TYPES = ("float64, float32, float16, complex64, complex128, int64, int32, int16, "
                      "int8, uint64, uint32, uint16, uint8, and bool")


def _check_array_dtype(a):
    """TypeError, in torch's words, for an array (or NumPy scalar) of strings, objects, dates
    or records: torch.tensor takes arrays of numbers and bools only."""
    if a.dtype.kind not in "biufc":
        raise TypeError(f"can't convert np.ndarray of type numpy.{a.dtype.type.__name__}. The "
                        f"only supported types are: {_TORCH_NUMPY_TYPES}: convert the array to "
                        f"numbers first (text: encode it to token ids)")


def _check_python_data(data):
    """torch.tensor's errors for Python data that is not (nested) sequences of numbers and
    bools, in torch's order: a str where the shape has a dimension (ValueError), then the first
    element that is no number (TypeError for str and bytes, RuntimeError for anything else),
    then sequences of different lengths (ValueError) or a number beside a sequence (TypeError)."""
    sizes, x = [], data
    while isinstance(x, (list, tuple)) or isinstance(x, np.ndarray) and x.ndim:  # the shape,
        sizes.append(len(x))                                                   # as torch reads it
        if not len(x):
            break
        x = x[0]
        if isinstance(x, str):
            raise ValueError("too many dimensions 'str': tensor() takes numbers and bools, not "
                             "strings (text: encode it to token ids first)")
    floats = _check_elements(data)
    _check_lengths(data, sizes, 0, floats)


def _check_elements(x):
    """Raise for the first element of x that is no number or bool; whether there are floats."""
    if isinstance(x, (list, tuple)):
        return any([_check_elements(e) for e in x])
    if isinstance(x, (str, bytes)):
        name = type(x).__name__ if type(x).__module__ == "builtins" else \
            f"{type(x).__module__}.{type(x).__name__}"
        raise TypeError(f"new(): invalid data type '{name}': tensor() takes numbers and bools "
                        f"(text: encode it to token ids first)")
    if isinstance(x, (np.ndarray, np.generic, Tensor)):
        _check_array_dtype(x)
        return x.dtype.kind in "fc"
    if isinstance(x, (bool, int, float, complex)):
        return isinstance(x, (float, complex))
    raise RuntimeError(f"Could not infer dtype of {type(x).__name__}: tensor() takes numbers, "
                       f"bools and (nested) lists of them")


def _check_lengths(x, sizes, dim, floats):
    """ValueError or TypeError, as torch's, where x does not have the shape `sizes` from
    dimension dim on."""
    if dim == len(sizes):
        if isinstance(x, (list, tuple)):
            raise TypeError(f"must be real number, not {type(x).__name__}" if floats else
                            f"'{type(x).__name__}' object cannot be interpreted as an integer")
        return
    if not isinstance(x, (list, tuple, np.ndarray)):
        raise TypeError("not a sequence: nested lists need the same depth everywhere")
    if len(x) != sizes[dim]:
        raise ValueError(f"expected sequence of length {sizes[dim]} at dim {dim} (got {len(x)}): "
                         f"nested lists need the same length at each level")
    for e in x if isinstance(x, (list, tuple)) else ():
        _check_lengths(e, sizes, dim + 1, floats)


class Tensor:
    """An n-dimensional array with reverse-mode automatic differentiation."""

    # _post_hooks: {id: hook} of register_post_accumulate_grad_hook; unset until one is registered
    # _version_counter: [the number of in-place writes], one list shared with the tensor's views
    __slots__ = ("data", "grad", "requires_grad", "_ctx", "_post_hooks", "_version_counter",
                 "__weakref__")
    __array_priority__ = 1000  # so ndarray + Tensor defers to Tensor.__radd__

    def __init__(self, data, requires_grad=False, dtype=None):
        self.data = _as_array(data, dtype)
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._ctx = None  # the Function that produced this tensor (None for leaves)
        self._version_counter = [0]
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

    def size(self, dim=None):
        """torch's size(): the shape, or the length of dimension dim (negative counts from
        the end)."""
        if dim is None:
            return self.data.shape
        if self.data.ndim == 0:
            raise IndexError(f"Dimension specified as {dim} but tensor has no dimensions")
        from .ops import wrap_dim
        return self.data.shape[wrap_dim(dim, self.data.ndim)]

    def numel(self):
        return self.data.size

    def dim(self):
        return self.data.ndim

    def element_size(self):
        """Bytes per element (itemsize), as torch."""
        return self.data.itemsize

    @property
    def itemsize(self):
        return self.data.itemsize

    @property
    def nbytes(self):
        return self.data.nbytes

    @property
    def device(self):
        return backend.device_obj(self.data)

    @property
    def _version(self):
        """How many times this tensor's data has been written in place (through it or through a
        view of the same data), as torch's x._version."""
        return self._version_counter[0]

    @property
    def is_leaf(self):
        return self._ctx is None

    @property
    def T(self):
        return self.permute(*reversed(range(self.ndim)))

    def __len__(self):
        if self.data.ndim == 0:
            raise TypeError("len() of a 0-d tensor")
        return len(self.data)

    def __format__(self, spec):
        """As torch: a 0-d tensor formats as its number (f"{loss:.4f}"); any other tensor
        only without a format spec (its str)."""
        if self.data.ndim == 0:
            return self.item().__format__(spec)
        return object.__format__(self, spec)

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        dev = ", device='cuda:0'" if backend.is_cuda(self.data) else ""
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
        """A new leaf tensor sharing this tensor's data (and its version counter, as torch),
        cut from the graph."""
        out = Tensor(self.data)
        out._version_counter = self._version_counter
        return out

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
        if getattr(self, "_post_hooks", None) is None:
            self._post_hooks = {}
        return _RemovableHandle(self._post_hooks, hook)

    def backward(self, grad=None):
        """Accumulate d(self)/d(leaf) into every leaf's .grad, then free the graph.

        grad defaults to 1 for a single-element tensor; otherwise pass an array (or Tensor)
        of this tensor's shape. The Functions run in reverse topological order, each once, with
        the gradients of all its outputs; a leaf's gradient is accumulated (and its hooks run)
        as soon as the last Function that uses it has run.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad: no input "
                               "has requires_grad=True, or it was computed under no_grad()")
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(f"backward() without a gradient needs a single-element tensor, "
                                   f"got shape {self.shape}: pass grad= of that shape")
            grad = backend.get_array_module(self.data).ones_like(self.data)
        else:
            grad = _as_array(grad, self.dtype)
            if grad.shape != self.shape:
                raise ValueError(f"backward(grad) shape {grad.shape} does not match tensor shape {self.shape}")
        if self._ctx is None:
            _accumulate(self, grad)
            return
        functions, uses = _graph(self._ctx)
        grads = {id(self): (self, grad)}  # tensor id -> (the tensor, its gradient so far)
        for fn in reversed(functions):
            if fn.writes != _writes:  # something was written in place since fn was applied
                _check_versions(fn)
            gys = [None if out is None else grads.pop(id(out), (None, None))[1]
                   for out in fn.outputs()]
            if any(g is not None for g in gys):
                in_grads = fn.backward(gys[0] if len(gys) == 1 else tuple(gys))
                if not isinstance(in_grads, tuple):
                    in_grads = (in_grads,)
            else:  # no gradient reached this Function
                in_grads = (None,) * len(fn.parents)
            for parent, g in zip(fn.parents, in_grads):
                if parent is None or not parent.requires_grad:
                    continue
                if g is not None:
                    g = _unbroadcast(g, parent.data)
                    if id(parent) in grads:
                        g = grads[id(parent)][1] + g
                    grads[id(parent)] = (parent, g)
                if parent._ctx is None:  # a leaf: final once its last user has run
                    uses[id(parent)] -= 1
                    if not uses[id(parent)] and id(parent) in grads:
                        _accumulate(parent, grads.pop(id(parent))[1])
            fn.release()


class _RemovableHandle:
    """What register_post_accumulate_grad_hook returns: .remove() unregisters the hook."""

    _next_id = 0

    def __init__(self, hooks, hook):
        _RemovableHandle._next_id += 1
        self.id, self._hooks = _RemovableHandle._next_id, hooks
        hooks[self.id] = hook

    def remove(self):
        self._hooks.pop(self.id, None)


def _graph(root):
    """The Functions that `root` depends on, each after the Functions that made its inputs
    (an iterative depth-first walk: deep graphs never hit the recursion limit), and for each
    leaf that requires grad, how many times those Functions take it as an input."""
    order, seen, uses = [], set(), {}
    stack = [(root, False)]
    while stack:
        fn, done = stack.pop()
        if done:
            order.append(fn)
            continue
        if id(fn) in seen:
            continue
        if fn.parents is None:
            raise RuntimeError("backward() through a graph that an earlier backward() already "
                               "freed: run the forward pass again (the graph is freed after "
                               "each backward)")
        seen.add(id(fn))
        stack.append((fn, True))
        for p in fn.parents:
            if p is None or not p.requires_grad:
                continue
            if p._ctx is None:
                uses[id(p)] = uses.get(id(p), 0) + 1
            elif id(p._ctx) not in seen:
                stack.append((p._ctx, False))
    return order, uses


def increment_version(tensor, n=1):
    """Count n in-place writes into tensor's data (torch.autograd.graph.increment_version): every
    in-place op, x[i] = v and an optimizer's update call it."""
    global _writes
    tensor._version_counter[0] += n
    _writes += n


def _check_versions(fn):
    """torch's check before running fn's backward: no array that fn kept for it (an input or
    an output, or a view of one) was written in place since fn was applied. RuntimeError, in
    torch's words, naming the tensor and its versions."""
    kept = list(zip([p for p in fn.parents if p is not None], fn.versions))
    if not isinstance(fn, ViewFunction):  # (a view keeps nothing of its outputs)
        kept += [(out, 0) for out in fn.outputs() if out is not None]  # outputs start at 0
    for t, version in kept:
        if t._version_counter[0] != version and _keeps(fn, t.data):
            made = t._ctx if isinstance(t._ctx, Function) else None
            made_by = "" if made is None else \
                f", which is output {[o is t for o in made.outputs()].index(True)} of " \
                f"{type(made).__name__},"
            raise RuntimeError(
                f"one of the variables needed for gradient computation has been modified by an "
                f"inplace operation: [{tensor_type_name(t)} {list(t.shape)}]{made_by} is at version {t._version}; expected version "
                f"{version} instead. Hint: the backward of {type(fn).__name__} reads it; write "
                f"into it after backward(), or into a copy")


def _keeps(fn, array):
    """Whether the Function fn keeps, among what its forward stored on it (one level into lists
    and tuples), `array` or an array sharing memory with it."""
    for v in fn.__dict__.values():
        for a in (v if isinstance(v, (list, tuple)) else (v,)):
            if a is array or (type(a) is type(array) and np.may_share_memory(a, array)):
                return True
    return False


def tensor_type_name(t):
    """The name torch gives the type of a tensor like t (x.type()): torch.FloatTensor for
    float32 on the CPU, torch.cuda.LongTensor for int64 on a GPU."""
    kind = "torch.cuda." if backend.is_cuda(t.data) else "torch."
    return kind + _TENSOR_TYPES.get(t.dtype.name, t.dtype.name)


# the names torch gives tensor types, by dtype
_TENSOR_TYPES = {"float32": "FloatTensor", "float64": "DoubleTensor", "float16": "HalfTensor",
                 "bfloat16": "BFloat16Tensor", "int64": "LongTensor", "int32": "IntTensor",
                 "int16": "ShortTensor", "int8": "CharTensor", "uint8": "ByteTensor",
                 "bool": "BoolTensor"}


def _accumulate(leaf, g):
    """leaf.grad += g (a copy of g the first time: g may be shared with other gradients), then
    the leaf's post-accumulate hooks."""
    if leaf.grad is None:
        leaf.grad = g.copy()
    else:
        leaf.grad += g
    if getattr(leaf, "_post_hooks", None):  # every consumer has run: .grad is final
        with no_grad():
            for hook in list(leaf._post_hooks.values()):  # a hook may remove itself
                hook(leaf)


def _unbroadcast(g, like):
    """The gradient g summed back down to the shape of the array `like`, in its dtype (an op
    on broadcast inputs, or a cast, gives a gradient of another shape or dtype)."""
    if g.shape != like.shape:
        extra = g.ndim - like.ndim
        if extra > 0:
            g = g.sum(axis=tuple(range(extra)))
        axes = tuple(i for i, n in enumerate(like.shape) if n == 1 and g.shape[i] != 1)
        if axes:
            g = g.sum(axis=axes, keepdims=True)
        g = g.reshape(like.shape)
    return g if g.dtype == like.dtype else g.astype(like.dtype)


class Function:
    """One differentiable primitive: subclass, define forward(*arrays) and backward(gy).

    forward receives raw arrays (Tensor inputs unwrapped) plus keyword arguments and
    returns an array; it may store what backward needs on self. backward receives the
    output gradient and returns one gradient (or None) per positional input.
    `self.needs_grad[i]` says whether input i wants a gradient; it is set before forward runs, so
    that forward keeps only what backward will need (as torch saves an operand of a product only
    for the other operand's gradient): backward refuses to run when an array it keeps was
    written in place since (see _check_versions). Under no_grad every entry is False, so
    forward keeps nothing (as torch saves nothing there).

    A Function with several outputs (split) returns a tuple of arrays from forward and gets a
    tuple of their gradients in backward (None for an output that got none); apply returns a
    tuple of Tensors. Integer and bool outputs (indices) never require gradients.
    """

    # versions: the Tensor inputs' versions when the Function was applied; writes: _writes then
    __slots__ = ("parents", "needs_grad", "_outputs", "versions", "writes", "__dict__")
    view = False  # True for a ViewFunction

    @classmethod
    def apply(cls, *inputs, **kwargs):
        ctx = cls()
        if _grad_enabled:
            parents = [x if isinstance(x, Tensor) else None for x in inputs]
            ctx.needs_grad = [p is not None and p.requires_grad for p in parents]
        else:  # no_grad records nothing: no input wants a gradient, so forward keeps nothing
            ctx.needs_grad = [False] * len(inputs)
        out = ctx.forward(*[x.data if isinstance(x, Tensor) else x for x in inputs], **kwargs)
        record = any(ctx.needs_grad)  # the grad mode as forward began (all False under no_grad)
        results = tuple(_output(o, record and o.dtype.kind in "fc", ctx) for o in out) \
            if isinstance(out, tuple) else _output(out, record, ctx)
        if record:
            ctx.parents = parents
            # weak references: the graph links outputs to their Function, not back
            ctx._outputs = [weakref.ref(r) for r in (results if isinstance(out, tuple) else (results,))]
            ctx.versions = [p._version_counter[0] for p in parents if p is not None]
            ctx.writes = _writes
        if cls.view:
            _share_version_counter(inputs[0], results)
        return results

    def forward(self, *arrays, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, gy):  # pragma: no cover - abstract
        raise NotImplementedError

    def outputs(self):
        """The output Tensors still alive (None for one that is gone)."""
        return [ref() for ref in self._outputs]

    def release(self):
        """Once backward has run: the outputs no longer point here, and the links to the inputs
        and the saved arrays go."""
        for out in self.outputs():
            if out is not None:
                out._ctx = _RELEASED
        self.parents = None
        self.__dict__.clear()


class ViewFunction(Function):
    """A Function whose outputs may be views of its first input's array (reshape, permute,
    expand, basic indexing, split): an output that is one shares the input's version counter,
    as torch's views share their base's, so a write through either counts for both."""

    view = True


def _share_version_counter(x, results):
    """Each of results (a Tensor or a tuple of them) that is a view of x's array gets x's
    version counter."""
    for r in (results if type(results) is tuple else (results,)):
        if type(r.data) is np.ndarray:  # a NumPy view's base is the array owning the memory
            base = r.data.base
            is_view = base is not None and (base is x.data or base is x.data.base)
        else:
            is_view = bool(np.may_share_memory(r.data, x.data))  # cupy's, through NumPy's dispatch
        if is_view:
            r._version_counter = x._version_counter


class _Released:
    """What a tensor's _ctx becomes when backward has freed the Function that made it: a graph
    through it cannot be walked again (_graph raises)."""

    parents = None


_RELEASED = _Released()


def _output(out, record, ctx):
    """A Tensor for the array `out` that `ctx` made (recorded in the graph when `record`)."""
    if isinstance(out, np.generic):  # a NumPy scalar (full reduction): .data stays an ndarray
        out = np.asarray(out)
    result = Tensor.__new__(Tensor)
    result.data = out
    result.grad = None
    result.requires_grad = record
    result._ctx = ctx if record else None
    result._version_counter = [0]
    return result


def tensor(data, requires_grad=False, dtype=None):
    """Create a Tensor (like torch.tensor)."""
    return Tensor(data, requires_grad=requires_grad, dtype=dtype)
