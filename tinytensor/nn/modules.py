"""Module (with parameter registration by attribute), Parameter, and the layers.

Names, shapes and default initialisation follow torch.nn so state dicts map one to one.
Layers are built from nn.functional and never define a backward of their own.
"""
import builtins
import math
import operator
from collections import OrderedDict
from collections.abc import Iterable, Mapping

import numpy as np

from .. import backend
from .. import random as _random
from ..tensor import Tensor, get_default_dtype, increment_version
from . import functional as F


class Parameter(Tensor):
    """A Tensor that a Module registers as a trainable parameter (torch.nn.Parameter; without
    data, an empty one of the default float dtype)."""

    __slots__ = ()

    def __init__(self, data=None, requires_grad=True):
        if data is None:
            data = np.empty(0, dtype=get_default_dtype())
        super().__init__(data, requires_grad=requires_grad)
        if isinstance(data, Tensor):  # a parameter of a tensor's data shares its version counter
            self._version_counter = data._version_counter

    def __repr__(self):
        return "Parameter(" + super().__repr__() + ")"


class Module:
    """Base class, as torch.nn.Module: Parameters, Modules and buffers assigned as attributes
    are registered in three dicts (_parameters, _modules, _buffers) and read back through
    __getattr__; names, traversal orders and state dicts follow torch."""

    def __init__(self):
        object.__setattr__(self, "training", True)
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_non_persistent", set())
        object.__setattr__(self, "_modules", OrderedDict())

    # ----- registration ---------------------------------------------------------------
    def __getattr__(self, name):
        """A registered parameter, buffer or submodule (Python asks here only when the usual
        lookup fails)."""
        d = self.__dict__
        for registry in ("_parameters", "_buffers", "_modules"):
            if registry in d and name in d[registry]:
                return d[registry][name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __setattr__(self, name, value):
        """As torch: a Parameter registers as a parameter and a Module as a submodule; a name
        registered already keeps its kind (None empties it, another type is a TypeError); any
        other value is a plain attribute."""
        if "_parameters" not in self.__dict__:
            if isinstance(value, (Parameter, Module)):
                raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__() "
                                   f"before assigning parameters or modules")
            object.__setattr__(self, name, value)
        elif isinstance(value, Parameter):
            self._forget(name, keep=self._parameters)
            self.register_parameter(name, value)
        elif name in self._parameters:
            self._set_registered(self._parameters, name, value, "parameter", "nn.Parameter")
        elif isinstance(value, Module):
            self._forget(name, keep=self._modules)
            self._modules[name] = value
        elif name in self._modules:
            self._set_registered(self._modules, name, value, "child module", "nn.Module")
        elif name in self._buffers:
            if value is not None and not isinstance(value, Tensor):
                raise TypeError(f"cannot assign {type(value).__name__} to buffer {name!r}: "
                                f"expected a Tensor or None")
            self._buffers[name] = value
        else:
            object.__setattr__(self, name, value)

    def _forget(self, name, keep):
        """Drop name from the instance dict and from every registry but `keep` (where it keeps
        its place, as torch)."""
        self.__dict__.pop(name, None)
        for registry in (self._parameters, self._buffers, self._modules):
            if registry is not keep:
                registry.pop(name, None)
        self._non_persistent.discard(name)

    @staticmethod
    def _set_registered(registry, name, value, kind, expected):
        if value is not None:
            raise TypeError(f"cannot assign '{type(value).__name__}' as {kind} '{name}' ({expected} "
                            f"or None expected)")
        registry[name] = None

    def __delattr__(self, name):
        if name in self._parameters:
            del self._parameters[name]
        elif name in self._buffers:
            del self._buffers[name]
            self._non_persistent.discard(name)
        elif name in self._modules:
            del self._modules[name]
        else:
            object.__delattr__(self, name)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(self._parameters) | set(self._buffers)
                      | set(self._modules))

    def _check_name(self, kind, name, registry):
        """torch's checks on the name of a new parameter, buffer or submodule."""
        if registry not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__() "
                               f"before registering a {kind}")
        if not isinstance(name, str):
            raise TypeError(f"{kind} name should be a string. Got {type(name).__name__}")
        if "." in name:
            raise KeyError(f"{kind} name can't contain \".\", got: {name}")
        if name == "":
            raise KeyError(f"{kind} name can't be empty string \"\"")
        if hasattr(self, name) and name not in self.__dict__[registry]:
            raise KeyError(f"attribute '{name}' already exists: pick another {kind} name")

    def register_parameter(self, name, param):
        """Register param (a Parameter, or None for an absent one) as `name`, as torch."""
        self._check_name("parameter", name, "_parameters")
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(f"cannot assign '{type(param).__name__}' object to parameter '{name}' "
                            f"(nn.Parameter or None required): wrap it in nn.Parameter")
        self._parameters[name] = param

    def add_module(self, name, module):
        """Register module (a Module, or None for an absent one) as the child `name`, as torch."""
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"{type(module).__name__} is not a Module subclass: add_module takes "
                            f"a Module or None")
        self._check_name("module", name, "_modules")
        self._modules[name] = module

    register_module = add_module

    def register_buffer(self, name, tensor, persistent=True):
        """A Tensor that belongs to the module but is not trained (the lecture's `tril` mask):
        moved by .to(), and in state_dict() unless persistent=False, as in torch."""
        self._check_name("buffer", name, "_buffers")
        if tensor is not None and not isinstance(tensor, Tensor):
            raise TypeError(f"register_buffer({name!r}) expects a Tensor or None, got "
                            f"{type(tensor).__name__}")
        self._buffers[name] = tensor
        if persistent:
            self._non_persistent.discard(name)
        else:
            self._non_persistent.add(name)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError(f"Module [{type(self).__name__}] is missing the required "
                                  f"\"forward\" function: define forward() in the subclass")

    # ----- traversal ------------------------------------------------------------------
    def named_children(self):
        """(name, child) pairs, a child registered under two names once (as torch)."""
        seen = set()
        for name, m in self._modules.items():
            if m is not None and id(m) not in seen:
                seen.add(id(m))
                yield name, m

    def children(self):
        for _, m in self.named_children():
            yield m

    def named_modules(self, memo=None, prefix="", remove_duplicate=True):
        """(dotted name, module) pairs, this module first, then each child's, depth first; a
        module reachable twice comes once unless remove_duplicate=False (as torch)."""
        memo = set() if memo is None else memo
        if self in memo:
            return
        if remove_duplicate:
            memo.add(self)
        yield prefix, self
        for name, m in self._modules.items():
            if m is not None:
                yield from m.named_modules(memo, f"{prefix}.{name}" if prefix else name,
                                           remove_duplicate)

    def modules(self):
        for _, m in self.named_modules():
            yield m

    def _named_members(self, registry, prefix, recurse, remove_duplicate):
        """(dotted name, tensor) over one registry of the module tree (of this module alone
        unless recurse), as torch: a shared tensor once, under its first name, unless
        remove_duplicate=False."""
        seen = set()
        modules = self.named_modules(prefix=prefix, remove_duplicate=remove_duplicate) \
            if recurse else [(prefix, self)]
        for mname, m in modules:
            for name, t in m.__dict__[registry].items():
                if t is None or id(t) in seen:
                    continue
                if remove_duplicate:
                    seen.add(id(t))
                yield (f"{mname}.{name}" if mname else name), t

    def named_parameters(self, prefix="", recurse=True, remove_duplicate=True):
        """(dotted name, Parameter) pairs in registration order; a shared (tied) parameter
        comes once, under its first name, unless remove_duplicate=False."""
        return self._named_members("_parameters", prefix, recurse, remove_duplicate)

    def parameters(self, recurse=True):
        for _, p in self.named_parameters(recurse=recurse):
            yield p

    def named_buffers(self, prefix="", recurse=True, remove_duplicate=True):
        return self._named_members("_buffers", prefix, recurse, remove_duplicate)

    def buffers(self, recurse=True):
        for _, b in self.named_buffers(recurse=recurse):
            yield b

    def get_submodule(self, target):
        """The module at the dotted path target ("" is this module); AttributeError as torch."""
        module = self
        for item in target.split(".") if target else []:
            module = _typed_attribute(module, item, Module, "nn.Module")
        return module

    def get_parameter(self, target):
        """The Parameter at the dotted path target; AttributeError as torch."""
        module_path, _, name = target.rpartition(".")
        return _typed_attribute(self.get_submodule(module_path), name, Parameter, "nn.Parameter")

    def num_parameters(self):
        return int(sum(p.data.size for p in self.parameters()))

    def apply(self, fn):
        """fn(module) for every module, as torch: each child's apply first (recursively), then
        fn(self); returns self."""
        for m in self.children():
            m.apply(fn)
        fn(self)
        return self

    # ----- state ----------------------------------------------------------------------
    def _named_state(self):
        """What state_dict holds, in torch's order: each module's parameters, then its
        persistent buffers, module by module (a shared one under each of its names)."""
        for mname, m in self.named_modules(remove_duplicate=False):
            pre = f"{mname}." if mname else ""
            for pname, p in m._parameters.items():
                if p is not None:
                    yield pre + pname, p
            for bname, b in m._buffers.items():
                if b is not None and bname not in m._non_persistent:
                    yield pre + bname, b

    def state_dict(self):
        """{dotted name: NumPy array copy} of every parameter and persistent buffer (host
        arrays, also from GPU). A shared (tied) parameter appears under each of its names, as
        in torch."""
        return OrderedDict((n, backend.to_numpy(t.data).copy()) for n, t in self._named_state())

    def load_state_dict(self, state_dict, strict=True):
        """Copy arrays into the existing parameters (cast to their dtype and device).

        Raises KeyError naming missing/unexpected keys (when strict) and ValueError on a
        shape mismatch; nothing is changed unless every check passes.
        """
        own = dict(self._named_state())
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if strict and (missing or unexpected):
            parts = []
            if missing:
                parts.append(f"missing keys {missing}")
            if unexpected:
                parts.append(f"unexpected keys {unexpected}")
            raise KeyError(f"load_state_dict for {type(self).__name__}: " + "; ".join(parts))
        for k, p in own.items():
            if k in state_dict:
                v = state_dict[k]
                shape = tuple(v.shape) if hasattr(v, "shape") else np.shape(v)
                if shape != p.shape:
                    raise ValueError(f"load_state_dict: shape mismatch for {k}: checkpoint has "
                                     f"{shape}, the model has {p.shape}")
        for k, p in own.items():
            if k in state_dict:
                xp = backend.get_array_module(p.data)
                v = state_dict[k]
                v = v.data if isinstance(v, Tensor) else v
                p.data[...] = xp.asarray(backend.to_device(np.asarray(v) if not hasattr(v, "dtype") else v,
                                                           p.device), dtype=p.dtype)
                increment_version(p)  # an in-place copy, as torch's copy_
        return missing, unexpected

    # ----- modes and devices ----------------------------------------------------------
    def train(self, mode=True):
        """Set training mode on this module and every submodule (eval() is train(False)), as
        torch: ValueError for a mode that is not a bool; returns self."""
        if not isinstance(mode, bool):
            raise ValueError(f"training mode is expected to be boolean, got {type(mode).__name__} "
                             f"{mode!r}: pass True or False")
        self.training = mode
        for m in self.children():
            m.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self, set_to_none=True):
        """Every parameter's gradient set to None (set_to_none=True) or zeroed in place."""
        for p in self.parameters():
            if set_to_none or p.grad is None:
                p.grad = None
            else:
                p.grad[...] = 0

    def requires_grad_(self, requires_grad=True):
        """Turn gradient recording for every parameter on or off (freezing); returns self."""
        if not isinstance(requires_grad, bool):
            raise TypeError(f"requires_grad_(): argument 'requires_grad' must be bool, not "
                            f"{type(requires_grad).__name__}")
        for p in self.parameters():
            p.requires_grad = requires_grad
        return self

    def _apply_to_arrays(self, fn):
        """Replace the array of every parameter, of its gradient and of every buffer by
        fn(array), keeping the Tensor objects (optimizers and tied weights keep holding them)."""
        for p in self.parameters():
            p.data = fn(p.data)
            if p.grad is not None:
                p.grad = fn(p.grad)
        for b in self.buffers():
            b.data = fn(b.data)
        return self

    def to(self, *args, **kwargs):
        """Move and/or cast the parameters, their gradients and the buffers in place, as torch's
        module.to: to(device), to(dtype), to(device, dtype), to(tensor) (its device and dtype),
        or the keywords device=, dtype=, non_blocking= (no effect). A dtype must be floating and
        casts the floating arrays only (integer buffers keep theirs). Returns self."""
        device, dtype = _parse_to(args, kwargs)

        def convert(a):
            if device is not None:
                a = backend.to_device(a, device)
            if dtype is not None and a.dtype.kind == "f" and a.dtype != dtype:
                a = a.astype(dtype)
            return a
        return self._apply_to_arrays(convert)

    def double(self):
        """Floating parameters and buffers to float64 (module.to(float64))."""
        return self.to(np.float64)

    def float(self):
        """Floating parameters and buffers to float32 (module.to(float32))."""
        return self.to(np.float32)

    def half(self):
        """Floating parameters and buffers to float16 (module.to(float16))."""
        return self.to(np.float16)

    def cpu(self):
        return self.to("cpu")

    def cuda(self, device=None):
        """Everything to the GPU: 'cuda', or the device given (an index i means 'cuda:i')."""
        if device is None:
            return self.to("cuda")
        return self.to(f"cuda:{device}" if isinstance(device, (int, np.integer)) else device)

    def astype(self, dtype):
        """Every parameter cast to dtype (integer ones too), its gradient dropped."""
        for p in self.parameters():
            p.data = p.data.astype(dtype)
            p.grad = None
        return self

    def extra_repr(self):
        return ""

    def __repr__(self):
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, m in self._modules.items():
            sub = repr(m).replace("\n", "\n  ")
            lines.append(f"  ({name}): {sub}")
        return lines[0] + ")" if len(lines) == 1 else "\n".join(lines) + "\n)"


def _typed_attribute(module, name, kind, what):
    """module.<name>, which must be a `kind`: AttributeError otherwise, as torch's
    get_submodule and get_parameter."""
    if not hasattr(module, name):
        raise AttributeError(f"{type(module).__name__} has no attribute `{name}`")
    value = getattr(module, name)
    if not isinstance(value, kind):
        raise AttributeError(f"`{name}` is not an {what}")
    return value


def _as_dtype(x):
    """x as a NumPy dtype when it names one (a dtype, a NumPy scalar type, or Python's float,
    int, bool as torch reads them), else None (a device)."""
    if isinstance(x, np.dtype):
        return x
    if isinstance(x, type) and (issubclass(x, np.generic) or x in (builtins.float, int, bool)):
        return np.dtype(x)
    return None


def _parse_to(args, kwargs):
    """(device, dtype) from Module.to's arguments, as torch parses them; None where not given."""
    usage = ("expected to(device), to(dtype), to(device, dtype), to(tensor), or the keywords "
             "device=, dtype=, non_blocking=")
    unknown = set(kwargs) - {"device", "dtype", "non_blocking"}
    if unknown:
        raise TypeError(f"to() got an unexpected keyword argument {sorted(unknown)[0]!r}: {usage}")
    args = list(args)
    if args and isinstance(args[-1], bool):  # non_blocking, positionally
        args.pop()
    device = dtype = None
    if len(args) == 1 and isinstance(args[0], Tensor):
        device, dtype = args[0].device, args[0].dtype
    elif len(args) == 1 and _as_dtype(args[0]) is not None:
        dtype = args[0]
    elif len(args) in (1, 2) and _as_dtype(args[0]) is None:
        device = args[0]
        dtype = args[1] if len(args) == 2 else None
    elif args:
        raise TypeError(f"to() received an invalid combination of arguments - got "
                        f"({', '.join(type(a).__name__ for a in args)}): {usage}")
    for name, given in (("device", device), ("dtype", dtype)):
        if given is not None and kwargs.get(name) is not None:
            raise TypeError(f"to() got multiple values for argument '{name}': {usage}")
    device = kwargs.get("device") if device is None else device
    dtype = kwargs.get("dtype") if dtype is None else dtype
    if dtype is not None:
        if _as_dtype(dtype) is None:
            raise TypeError(f"to() received an invalid dtype {dtype!r}: {usage}")
        dtype = _as_dtype(dtype)
        if dtype.kind != "f":
            raise TypeError(f"nn.Module.to only accepts floating point dtypes, but got desired "
                            f"dtype={dtype}: give a float dtype (float32, float64, ...)")
    return device, dtype


def _uniform(shape, bound):
    return _random.rng().uniform(-bound, bound, size=shape).astype(get_default_dtype())


def _initialised(*params):
    """Count the initialisation of a layer's parameters as the one in-place write it is in
    torch (reset_parameters fills them in place): they start at version 1, as there."""
    for p in params:
        if p is not None:
            increment_version(p)


class Linear(Module):
    """y = x @ weight.T + bias; weight (out_features, in_features), PyTorch's init."""

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        _check_positive(in_features=in_features, out_features=out_features)
        self.in_features, self.out_features = in_features, out_features
        bound = 1.0 / math.sqrt(in_features)
        self.weight = Parameter(_uniform((out_features, in_features), bound))
        self.bias = Parameter(_uniform((out_features,), bound)) if bias else None
        _initialised(self.weight, self.bias)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Embedding(Module):
    """A lookup table (num_embeddings, embedding_dim), initialised N(0, 1) like PyTorch."""

    def __init__(self, num_embeddings, embedding_dim):
        super().__init__()
        _check_positive(num_embeddings=num_embeddings, embedding_dim=embedding_dim)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = Parameter(_random.rng().standard_normal((num_embeddings, embedding_dim))
                                .astype(get_default_dtype()))
        _initialised(self.weight)

    def forward(self, idx):
        return F.embedding(idx, self.weight)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}"


class LayerNorm(Module):
    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True):
        super().__init__()
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        self.normalized_shape, self.eps = tuple(normalized_shape), eps
        dt = get_default_dtype()
        self.weight = Parameter(np.ones(self.normalized_shape, dtype=dt)) if elementwise_affine else None
        self.bias = Parameter(np.zeros(self.normalized_shape, dtype=dt)) if elementwise_affine and bias else None
        _initialised(self.weight, self.bias)

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}"


class Dropout(Module):
    def __init__(self, p=0.5):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x):
        return F.dropout(x, self.p, self.training)

    def extra_repr(self):
        return f"p={self.p}"


class ReLU(Module):
    def forward(self, x):
        return F.relu(x)


class GELU(Module):
    def __init__(self, approximate="none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x):
        return F.gelu(x, self.approximate)


class Tanh(Module):
    def forward(self, x):
        return x.tanh()


class Identity(Module):
    """Returns its input unchanged; takes and ignores any constructor arguments (as torch)."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def forward(self, input):
        return input


class _ModuleSequence(Module):
    """What Sequential and ModuleList share: children in order, indexed by position
    (negative positions count from the end), numbered "0", "1", ... as they are appended."""

    def _key_at(self, idx):
        """The name of the child at position idx; IndexError outside the sequence."""
        n = len(self._modules)
        idx = operator.index(idx)
        if not -n <= idx < n:
            raise IndexError(f"index {idx} is out of range")
        return list(self._modules)[idx % n]

    def __setitem__(self, idx, module):
        setattr(self, self._key_at(idx), module)

    def __delitem__(self, idx):
        """Remove the child(ren) at idx (a position or a slice), then renumber as torch."""
        keys = list(self._modules)[idx] if isinstance(idx, slice) else [self._key_at(idx)]
        for key in keys:
            delattr(self, key)
        self._modules = OrderedDict((str(i), m) for i, m in enumerate(self._modules.values()))

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def append(self, module):
        self.add_module(str(len(self)), module)
        return self

    def pop(self, idx):
        module = self[idx]
        del self[idx]
        return module

    def _insert(self, index, module):
        """Put module at position index (0 .. len), the later children moving up one."""
        if not isinstance(module, Module):
            raise TypeError(f"{type(module).__name__} is not a Module subclass: insert takes a Module")
        for i in range(len(self._modules), index, -1):
            self._modules[str(i)] = self._modules[str(i - 1)]
        self._modules[str(index)] = module


class Sequential(_ModuleSequence):
    """Children named "0", "1", ... (or the keys of one OrderedDict argument); called in order."""

    def __init__(self, *args):
        super().__init__()
        if len(args) == 1 and isinstance(args[0], OrderedDict):
            for key, module in args[0].items():
                self.add_module(key, module)
        else:
            for i, module in enumerate(args):
                self.add_module(str(i), module)

    def __getitem__(self, idx):
        """The child at a position, or a Sequential of the children in a slice (their names
        kept), as torch."""
        if isinstance(idx, slice):
            return type(self)(OrderedDict(list(self._modules.items())[idx]))
        return self._modules[self._key_at(idx)]

    def insert(self, index, module):
        """Insert module before position index (-len .. len, as torch); returns self."""
        n = len(self._modules)
        if not -n <= index <= n:
            raise IndexError(f"Index out of range: {index} (a Sequential of {n} takes -{n} .. {n})")
        self._insert(index + n if index < 0 else index, module)
        return self

    def extend(self, modules):
        for module in modules:
            self.append(module)
        return self

    def forward(self, x):
        for m in self._modules.values():
            x = m(x)
        return x


class ModuleList(_ModuleSequence):
    """A list of modules registered as children "0", "1", ... (torch.nn.ModuleList)."""

    def __init__(self, modules=None):
        super().__init__()
        if modules is not None:
            self.extend(modules)

    def __getitem__(self, idx):
        """The child at a position, or a ModuleList of the children in a slice."""
        if isinstance(idx, slice):
            return type(self)(list(self._modules.values())[idx])
        return self._modules[self._key_at(idx)]

    def __iadd__(self, modules):
        return self.extend(modules)

    def insert(self, index, module):
        """Insert module before position index (0 .. len: torch's ModuleList.insert has no
        meaning for a negative one)."""
        n = len(self._modules)
        if not 0 <= index <= n:
            raise IndexError(f"ModuleList.insert index {index} is out of range 0 .. {n}: give a "
                             f"non-negative position")
        self._insert(index, module)

    def extend(self, modules):
        if not isinstance(modules, Iterable):
            raise TypeError(f"ModuleList.extend should be called with an iterable, but got "
                            f"{type(modules).__name__}")
        for module in modules:
            self.append(module)
        return self


def _key_value_pairs(owner, values, ordered):
    """(key, value) pairs for owner.update(values), as torch: a mapping of the `ordered` types
    in its order, any other mapping sorted by key, else an iterable of (key, value) pairs."""
    if not isinstance(values, Iterable):
        raise TypeError(f"{owner}.update should be called with an iterable of key/value pairs, "
                        f"but got {type(values).__name__}")
    if isinstance(values, ordered):
        return list(values.items())
    if isinstance(values, Mapping):
        return sorted(values.items())
    pairs = []
    for j, pair in enumerate(values):
        if not isinstance(pair, Iterable):
            raise TypeError(f"{owner} update sequence element #{j} should be Iterable; is "
                            f"{type(pair).__name__}")
        if len(pair) != 2:
            raise ValueError(f"{owner} update sequence element #{j} has length {len(pair)}; "
                             f"2 is required")
        pairs.append((pair[0], pair[1]))
    return pairs


class _KeyedContainer(Module):
    """The dict protocol that ModuleDict and ParameterDict share, over the keys of
    self._entries() (a dict keyed by the entries' names, in order)."""

    def __len__(self):
        return len(self._entries())

    def __iter__(self):
        return iter(self._entries())

    def __contains__(self, key):
        return key in self._entries()

    def keys(self):
        return self._entries().keys()

    def pop(self, key):
        value = self[key]
        del self[key]
        return value

    def clear(self):
        for key in list(self._entries()):
            del self[key]


class ModuleDict(_KeyedContainer):
    """Modules by name, as a dict (torch.nn.ModuleDict): registered as children, so their
    parameters are named `key.name`; keys keep their insertion order."""

    def __init__(self, modules=None):
        super().__init__()
        if modules is not None:
            self.update(modules)

    def __getitem__(self, key):
        return self._modules[key]

    def __setitem__(self, key, module):
        self.add_module(key, module)

    def __delitem__(self, key):
        del self._modules[key]

    def _entries(self):
        return self._modules

    def items(self):
        return self._modules.items()

    def values(self):
        return self._modules.values()

    def update(self, modules):
        """Add (or replace) modules from a mapping (in its order) or an iterable of
        (key, module) pairs."""
        for key, module in _key_value_pairs("ModuleDict", modules, (Mapping, ModuleDict)):
            self[key] = module



def _as_parameter(value):
    """A plain Tensor put into a ParameterList or ParameterDict becomes a Parameter (as torch);
    other values are stored as they are."""
    if isinstance(value, Tensor) and not isinstance(value, Parameter):
        return Parameter(value)
    return value


class ParameterList(Module):
    """A list of parameters named "0", "1", ... (torch.nn.ParameterList); a plain Tensor
    appended becomes a Parameter."""

    def __init__(self, values=None):
        super().__init__()
        self._size = 0
        if values is not None:
            self.extend(values)

    def _key_at(self, idx):
        idx = operator.index(idx)
        if not -self._size <= idx < self._size:
            raise IndexError(f"index {idx} is out of range")
        return str(idx % self._size)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return type(self)([self[i] for i in range(*idx.indices(len(self)))])
        return getattr(self, self._key_at(idx))

    def __setitem__(self, idx, value):
        setattr(self, self._key_at(idx), _as_parameter(value))

    def __len__(self):
        return self._size

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __iadd__(self, values):
        return self.extend(values)

    def append(self, value):
        self._size += 1
        self[self._size - 1] = value
        return self

    def extend(self, values):
        if not isinstance(values, Iterable) or isinstance(values, Tensor):
            raise TypeError(f"ParameterList.extend should be called with an iterable, but got "
                            f"{type(values).__name__}")
        for value in values:
            self.append(value)
        return self

    def __call__(self, *args, **kwargs):
        raise RuntimeError("ParameterList should not be called.")


class ParameterDict(_KeyedContainer):
    """Parameters by (string) name, as a dict (torch.nn.ParameterDict); a plain Tensor stored
    becomes a Parameter."""

    def __init__(self, parameters=None):
        super().__init__()
        self._keys = {}
        if parameters is not None:
            self.update(parameters)

    @staticmethod
    def _check_key(key):
        if not isinstance(key, str):
            raise TypeError(f"Index given to ParameterDict cannot be used as a key as it is not a "
                            f"string (type is '{type(key).__name__}'): use string keys")
        return key

    def __getitem__(self, key):
        return getattr(self, self._check_key(key))

    def __setitem__(self, key, value):
        setattr(self, self._check_key(key), _as_parameter(value))
        self._keys[key] = None

    def __delitem__(self, key):
        del self._keys[key]
        delattr(self, key)

    def _entries(self):
        return self._keys

    def items(self):
        return ((k, self[k]) for k in self._keys)

    def values(self):
        return (self[k] for k in self._keys)

    def get(self, key, default=None):
        return self[key] if key in self else default

    def update(self, parameters):
        """Add (or replace) entries from an OrderedDict or ParameterDict (in order), another
        mapping (sorted by key, as torch) or an iterable of (key, value) pairs."""
        for key, value in _key_value_pairs("ParameterDict", parameters, (OrderedDict, ParameterDict)):
            self[key] = value

    def __call__(self, *args, **kwargs):
        raise RuntimeError("ParameterDict should not be called.")


def _check_positive(**sizes):
    for k, v in sizes.items():
        if not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"{k} must be a positive integer, got {v!r}")
