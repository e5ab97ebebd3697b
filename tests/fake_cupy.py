"""A test-only stand-in for cupy that fails where CuPy fails, on a machine without a GPU.

`install()` points tinytensor.backend at it (and puts it in sys.modules as 'cupy', with
'cupyx'); tests do that through a fixture (conftest.py's `fake_cuda`, or TT_FAKE_CUPY=1 for
a whole pytest session), scripts through `python tests/fake_cupy.py SCRIPT ARGS...`. Nothing
installs it on import.

Device arrays are `ndarray`, a thin wrapper around a NumPy array (not a NumPy subclass, so
`isinstance(a, numpy.ndarray)` is False, as for cupy arrays). Where CuPy differs from NumPy
and code breaks on a real GPU, it behaves like CuPy:
- implicit conversion to host refuses: `np.asarray(a)`, `np.array(a)` raise cupy's
  TypeError; `float(a)`, `int(a)`, `bool(a)` work only for one element (and transfer);
- `.get()`, `asnumpy`, `.item()`, `.tolist()` (and float/int/bool of one element) are the
  ways back, and each is counted in `transfers` (with where it came from, `transfer_sites`);
- a host array (numpy.ndarray, 0-d included) in a device op raises TypeError, in ufuncs,
  operators, module functions, indexing and assignment alike (Python and NumPy scalars are
  fine, as in CuPy); only `asarray`/`array` take host arrays (host-to-device copies, counted);
- reductions and indexing give 0-d device arrays, never NumPy scalars, so `if a.max() > 0:`
  is a counted transfer here as it is a sync on the GPU;
- NumPy functions called on device arrays dispatch to this module (`__array_function__`,
  as CuPy does).
`random.default_rng`, `RawModule` (the kernels run in tests/cuda_emulator.py), streams,
`cuda.Device`, the memory pool, `cupyx.scatter_add` and `cupyx.scipy.special.erf` exist as
far as tinytensor uses them. Not modelled: asynchrony (every op completes at once), NCCL.
"""
import collections
import functools
import math
import os
import sys
import traceback
import types

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

_HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (os.path.dirname(_HERE), _HERE):  # this checkout's tinytensor, not an installed one
    if _path not in sys.path:
        sys.path.insert(0, _path)
import cuda_emulator as _emulator  # noqa: E402

IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. "
            "Please use `.get()` to construct a NumPy array explicitly.")

transfers = collections.Counter()        # device-to-host transfers by kind
uploads = collections.Counter()          # host-to-device copies (asarray/array of host data)
transfer_sites = collections.Counter()   # "file:line" of the caller outside this module


def reset_counts():
    transfers.clear()
    uploads.clear()
    transfer_sites.clear()


def total_transfers():
    return sum(transfers.values())


_PLUMBING = (__file__, os.path.join("tinytensor", "backend.py"),
             os.path.join("tinytensor", "tensor.py"))


def _count(kind):
    transfers[kind] += 1
    for frame in reversed(traceback.extract_stack(limit=16)[:-2]):  # the first caller not plumbing
        if not frame.filename.endswith(_PLUMBING):
            transfer_sites[f"{os.path.relpath(frame.filename)}:{frame.lineno} ({kind})"] += 1
            break


def _host_error(what):
    return TypeError(f"Unsupported type {what}: a host (numpy) array in a device operation; "
                     f"move it with cupy.asarray first")


def _unwrap(x):
    """Device arrays to their NumPy arrays (recursively in lists and tuples); a host array
    raises, as CuPy does."""
    if type(x) is ndarray:
        return x._a
    if isinstance(x, np.ndarray):
        raise _host_error(type(x))
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(i) for i in x)
    return x


def _index(key):
    """An index expression's arrays as NumPy arrays. CuPy copies host index arrays and lists
    to the device (each an upload, counted), so they are allowed here."""
    if isinstance(key, tuple):
        return tuple(_index(k) for k in key)
    if type(key) is ndarray:
        return key._a
    if isinstance(key, (np.ndarray, list)):
        uploads["index"] += 1
    return key


def _wrap(x):
    """NumPy results as device arrays (NumPy scalars as 0-d arrays, as CuPy returns them)."""
    if isinstance(x, np.ndarray):
        return ndarray(x)
    if isinstance(x, np.generic):
        return ndarray(np.asarray(x))
    if isinstance(x, tuple):
        return tuple(_wrap(i) for i in x)
    if isinstance(x, list):
        return [_wrap(i) for i in x]
    return x


def _on_device(fn):
    """fn (a NumPy callable) taking and returning device arrays."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        return _wrap(fn(*_unwrap(args), **{k: _unwrap(v) for k, v in kwargs.items()}))
    return call


class ndarray(NDArrayOperatorsMixin):
    """A device array: a NumPy array behind CuPy's rules (see the module docstring)."""

    __slots__ = ("_a",)
    __hash__ = None

    def __init__(self, a):
        assert type(a) is np.ndarray, type(a)
        self._a = a

    # ----- the ways back to the host, each counted
    def get(self, stream=None, order="C", out=None, blocking=True):
        _count("get")
        if out is None:
            return np.array(self._a, order=order)
        if type(out) is not np.ndarray:
            raise TypeError("get(out=) needs a numpy.ndarray")
        out[...] = self._a
        return out

    def set(self, arr, stream=None):
        if type(arr) is not np.ndarray or arr.shape != self.shape:
            raise ValueError("set() needs a numpy.ndarray of the same shape")
        uploads["set"] += 1
        self._a[...] = arr

    def item(self, *args):
        _count("item")
        return self._a.item(*args)

    def tolist(self):
        _count("tolist")
        return self._a.tolist()

    def _scalar(self, kind, convert):
        if self._a.size != 1:
            raise TypeError("only length-1 arrays can be converted to Python scalars")
        _count(kind)
        return convert(self._a.reshape(()).item())

    def __float__(self):
        return self._scalar("float()", float)

    def __int__(self):
        return self._scalar("int()", int)

    def __bool__(self):
        if self._a.size != 1:
            raise ValueError("The truth value of an array with more than one element is ambiguous.")
        return self._scalar("bool()", bool)

    def __index__(self):
        if self._a.dtype.kind not in "iub" or self._a.ndim:
            raise TypeError("only integer scalar arrays can be converted to a scalar index")
        return self._scalar("index", int)

    def __array__(self, dtype=None, copy=None):
        raise TypeError(IMPLICIT)

    def __repr__(self):
        _count("repr")
        return repr(self._a).replace("array(", "device_array(", 1)

    __str__ = __repr__

    # ----- NumPy protocols: device arrays only
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = tuple(_unwrap(o) for o in out)
        result = getattr(ufunc, method)(*_unwrap(inputs), **kwargs)
        if method == "at":
            return None
        if out is not None:  # the device arrays the caller passed
            return out[0] if len(out) == 1 else out
        return _wrap(result)

    def __array_function__(self, func, types_, args, kwargs):
        own = getattr(_module, func.__name__, None)
        if own is None:
            return NotImplemented
        return own(*args, **kwargs)

    # ----- the array API, on the wrapped array
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: ndarray(self._a.T))
    mT = property(lambda self: ndarray(self._a.mT))
    real = property(lambda self: ndarray(self._a.real))
    base = property(lambda self: None if self._a.base is None else _Base(self._a.base))

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (ndarray(np.asarray(self._a[i])) for i in range(len(self._a)))

    def __getitem__(self, key):
        return _wrap(self._a[_index(key)])

    def __setitem__(self, key, value):
        if isinstance(value, (list, tuple)):
            raise TypeError(f"Unsupported type {type(value)}")  # cupy's fill() takes no lists
        self._a[_index(key)] = _unwrap(value)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        attr = getattr(self._a, name)
        return _on_device(attr) if callable(attr) else attr

    def __copy__(self):
        return ndarray(self._a.copy())

    def __deepcopy__(self, memo):
        return ndarray(self._a.copy())

    def __reduce__(self):
        raise TypeError("pickling a device array would copy it to the host implicitly")


class _Base:
    """`.base` of a view: only its identity matters to tinytensor (no data access)."""

    def __init__(self, a):
        self._a = a

    def __eq__(self, other):
        return isinstance(other, (_Base, ndarray)) and other._a is self._a


class _Ufunc:
    """A NumPy ufunc on device arrays only (cupy.add, cupy.maximum, ...)."""

    def __init__(self, uf):
        self._uf = uf
        self.__name__ = uf.__name__

    def __call__(self, *args, **kwargs):
        _unwrap(args)   # a host array raises
        return self._uf(*args, **kwargs)

    def __getattr__(self, name):
        method = getattr(self._uf, name)
        if not callable(method):
            return method

        def call(*args, **kwargs):
            _unwrap(args)
            return getattr(self._uf, name)(*args, **kwargs)
        return call


# ----- the module's functions

def asarray(a, dtype=None, order=None):
    if type(a) is ndarray:
        return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
    if isinstance(a, np.ndarray):
        uploads["asarray"] += 1
    return ndarray(np.array(a, dtype=dtype, order=order or "K"))


def array(a, dtype=None, copy=True, order="K", ndmin=0):
    if type(a) is ndarray:
        return ndarray(np.array(a._a, dtype=dtype, copy=copy, order=order, ndmin=ndmin))
    if isinstance(a, np.ndarray):
        uploads["array"] += 1
    return ndarray(np.array(a, dtype=dtype, order=order, ndmin=ndmin))


def asnumpy(a, stream=None, order="C", out=None, blocking=True):
    if type(a) is ndarray:
        return a.get(order=order, out=out)
    return np.asarray(a, order=order)


def ascontiguousarray(a, dtype=None):
    if type(a) is not ndarray:
        raise _host_error(type(a))
    return ndarray(np.ascontiguousarray(a._a, dtype=dtype))


def get_array_module(*args):
    return _module if any(type(a) is ndarray for a in args) else np


def _numpy_name(name):
    """NumPy's `name` on device arrays (PEP 562 module __getattr__ for names not set here)."""
    obj = getattr(np, name)
    if isinstance(obj, np.ufunc):
        return _Ufunc(obj)
    if isinstance(obj, type) or not callable(obj):
        return obj
    return _on_device(obj)


class _Generator:
    """cupy.random.Generator: draws on the host with NumPy's, returns device arrays."""

    def __init__(self, seed):
        self._g = np.random.default_rng(seed)

    def __getattr__(self, name):
        return _on_device(getattr(self._g, name))


def _random_module():
    r = types.ModuleType("fake_cupy.random")
    r.default_rng = _Generator
    state = {"g": np.random.default_rng(0)}
    r.seed = lambda s=None: state.update(g=np.random.default_rng(s))
    for name in ("random", "standard_normal", "normal", "uniform", "integers", "randint",
                 "permutation", "choice"):
        r.__dict__[name] = (lambda n: lambda *a, **k: _on_device(getattr(
            state["g"], "integers" if n == "randint" else n))(*a, **k))(name)
    return r


class _Stream:
    ptr = 0
    null = None

    def __init__(self, non_blocking=False, null=False):
        pass

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def use(self):
        return self


class _Device:
    current = 0

    def __init__(self, index=None):
        self.id = _Device.current if index is None else index
        if not 0 <= self.id < _module._n_devices:
            raise ValueError(f"no device {self.id}")

    def use(self):
        _Device.current = self.id

    def synchronize(self):
        pass

    def __enter__(self):
        self._prev = _Device.current
        self.use()
        return self

    def __exit__(self, *exc):
        _Device.current = self._prev
        return False


class _MemoryPool:
    def used_bytes(self):
        return 0

    def total_bytes(self):
        return 0

    def free_all_blocks(self):
        pass

    def set_limit(self, size=None, fraction=None):
        pass


class _RawModule:
    """cupy.RawModule: the kernels' CUDA source, run by tests/cuda_emulator.py."""

    def __init__(self, code, options=(), name_expressions=()):
        self._m = _emulator._RawModule(code, options, name_expressions)

    def get_function(self, expression):
        kernel = self._m.get_function(expression)

        def launch(grid, block, args, shared_mem=0):
            for n, a in enumerate(args):
                if isinstance(a, np.ndarray):
                    raise _host_error(f"{type(a)} (kernel {expression} argument {n})")
            kernel(grid, block, [a._a.view(_emulator.FakeCudaArray) if type(a) is ndarray
                                 else a for a in args], shared_mem)
        return launch


def _erf(x):
    return _wrap(np.vectorize(math.erf, otypes=[x.dtype])(_unwrap(x)))


def _scatter_add(a, slices, value):
    np.add.at(_unwrap(a), _unwrap(slices), _unwrap(value))


def _make_module(n_devices):
    m = types.ModuleType("cupy")
    m.__file__ = __file__
    m._n_devices = n_devices
    m.__version__ = "stand-in (tests/fake_cupy.py)"
    for name in ("ndarray", "asarray", "array", "asnumpy", "ascontiguousarray",
                 "get_array_module"):
        setattr(m, name, globals()[name])
    m.random = _random_module()
    m.RawModule = _RawModule
    m.get_default_memory_pool = m.get_default_pinned_memory_pool = _MemoryPool
    cuda = types.SimpleNamespace(
        Device=_Device, Stream=_Stream, get_current_stream=_Stream,
        runtime=types.SimpleNamespace(getDeviceCount=lambda: n_devices,
                                      deviceSynchronize=lambda: None))
    m.cuda = cuda
    m.__getattr__ = _numpy_name
    return m


_module = None


def install(n_devices=1, monkeypatch=None, kernels=True):
    """Make tinytensor (and `import cupy`) use the stand-in; returns the module.

    With a pytest monkeypatch everything is undone at the test's end. kernels=False turns the
    CUDA versions of the fused ops off (tinytensor.kernels.enabled('cuda') says no, whatever
    kernels.use() is set to; the CPU versions stay as kernels.use() says), so the fused ops on
    'cuda' run their references' CuPy array expressions instead of the emulated kernels (one
    OS thread per CUDA thread: seconds per training step of even a tiny model); end-to-end
    script runs use that, the kernel tests do not."""
    global _module
    from tinytensor import backend, random
    import tinytensor.kernels
    _module = _make_module(n_devices)
    cupyx = types.ModuleType("cupyx")
    cupyx.scatter_add = _scatter_add
    special = types.ModuleType("cupyx.scipy.special")
    special.erf = _erf
    cupyx.scipy = types.ModuleType("cupyx.scipy")
    cupyx.scipy.special = special
    modules = {"cupy": _module, "cupyx": cupyx, "cupyx.scipy": cupyx.scipy,
               "cupyx.scipy.special": special}
    setattr_ = monkeypatch.setattr if monkeypatch else setattr
    if monkeypatch:
        for k, v in modules.items():
            monkeypatch.setitem(sys.modules, k, v)
    else:
        sys.modules.update(modules)
    setattr_(backend, "cp", _module)
    setattr_(backend, "_cuda_ok", True)
    setattr_(random, "_cuda_rng", None)
    if not kernels:
        enabled, describe = tinytensor.kernels.enabled, tinytensor.kernels.describe
        setattr_(tinytensor.kernels, "enabled",
                 lambda device="cpu": device != "cuda" and enabled(device))
        setattr_(tinytensor.kernels, "describe", lambda device="cpu": describe(device)
                 if device != "cuda" else "off (the cupy stand-in of tests/fake_cupy.py without "
                 "its emulated kernels: every fused op on 'cuda' runs its reference)")
    reset_counts()
    return _module


def main(argv):
    """python tests/fake_cupy.py SCRIPT ARGS...: run SCRIPT as __main__ with the stand-in.
    TT_FAKE_CUPY_REPORT=path writes the transfer counts there as JSON at exit (path.RANK under
    mpirun);
    TT_FAKE_CUPY_KERNELS=off: install(kernels=False); TT_FAKE_CUPY_DEVICES=n pretend GPUs."""
    import atexit
    import json
    import runpy
    install(int(os.environ.get("TT_FAKE_CUPY_DEVICES", "1")),
            kernels=os.environ.get("TT_FAKE_CUPY_KERNELS", "emulate") != "off")
    report = os.environ.get("TT_FAKE_CUPY_REPORT")
    rank = os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK"))
    if report and rank is not None:  # under mpirun: one report per rank, path.RANK
        report = f"{report}.{rank}"
    if report:
        atexit.register(lambda: json.dump({"transfers": dict(transfers), "uploads": dict(uploads),
                                           "sites": dict(transfer_sites.most_common(20))},
                                          open(report, "w"), indent=1))
    script = argv[0]
    sys.argv = list(argv)
    sys.path[:0] = [os.path.dirname(_HERE), os.path.dirname(os.path.abspath(script))]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
