"""Run the CUDA kernels on the CPU: a testing aid for machines without a GPU.

`fake_cupy()` returns a stand-in for the cupy module whose arrays are NumPy arrays of a
marker subclass and whose `RawModule` compiles the kernels' real CUDA source with g++ and
runs it with one OS thread per CUDA thread: `__syncthreads()` is a barrier over the block,
`__shfl_xor_sync` exchanges values through a barrier over the warp, blocks run one after
another. Put it in `backend.cp` and the dispatching functions take their CUDA path end to
end — argument marshalling, launch shapes, indexing, reductions — checked against the NumPy
references without a GPU. `fake_cupy(numpy_fallback=True)` also answers every other cupy
name with NumPy's, so the fused ops' CuPy branches run whole (kernels emulated, array
expressions in NumPy) and can be checked against their NumPy branches.

Stricter than a GPU in two ways, to catch bugs a GPU would hide: every kernel argument must
have exactly the C++ parameter's type (a float64 scalar for a `float` parameter is an error,
not silent garbage) and arrays must be C-contiguous; a warp shuffle with a lane that has
already returned is reported. Not emulated: floating-point details of GPU math functions,
memory-ordering races between blocks (blocks never run concurrently here), speed.

Needs g++ with C++20 (<barrier>). Compiled libraries are cached in the temp directory.
"""
import ctypes
import functools
import hashlib
import os
import subprocess
import sys
import tempfile
import types

import numpy as np

from tinytensor.kernels import _cuda

PRELUDE = r"""
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static   // blocks run one at a time, so one copy serves every block

struct tt_dim3 { unsigned x = 1, y = 1, z = 1; };
static thread_local tt_dim3 threadIdx, blockIdx;
static tt_dim3 blockDim, gridDim;

struct tt_warp {
    std::unique_ptr<std::barrier<>> bar;
    int size = 32;
    std::atomic<int> exited{0};
    alignas(8) unsigned char slot[32][8];
};
static thread_local tt_warp* tt_my_warp;
static thread_local int tt_lane;
static thread_local std::barrier<>* tt_block_barrier;
static std::atomic<int> tt_error{0};

inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline double __longlong_as_double(long long i) { double d; std::memcpy(&d, &i, 8); return d; }

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int offset) {
    static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
    tt_warp& w = *tt_my_warp;
    std::memcpy(w.slot[tt_lane], &v, sizeof(T));
    w.bar->arrive_and_wait();
    if (mask != 0xffffffffu || w.size != 32 || w.exited.load() != 0) tt_error = 1;
    T r;
    std::memcpy(&r, w.slot[(tt_lane ^ offset) & 31], sizeof(T));
    w.bar->arrive_and_wait();
    return r;
}

inline void __syncthreads() { tt_block_barrier->arrive_and_wait(); }

template <typename... A, std::size_t... I>
void tt_invoke(void (*k)(A...), void** args, std::index_sequence<I...>) {
    k(*static_cast<std::remove_cv_t<A>*>(args[I])...);
}

template <typename... A>
int tt_launch(void (*k)(A...), unsigned gx, unsigned gy, unsigned bx, unsigned by, void** args) {
    tt_error = 0;
    gridDim = {gx, gy, 1};
    blockDim = {bx, by, 1};
    const int n = int(bx * by);
    for (unsigned j = 0; j < gy; ++j) {
        for (unsigned i = 0; i < gx; ++i) {
            std::barrier<> block_barrier(n);
            std::vector<std::unique_ptr<tt_warp>> warps;
            for (int w = 0; w * 32 < n; ++w) {
                auto warp = std::make_unique<tt_warp>();
                warp->size = std::min(32, n - 32 * w);
                warp->bar = std::make_unique<std::barrier<>>(warp->size);
                warps.push_back(std::move(warp));
            }
            std::vector<std::thread> threads;
            for (int t = 0; t < n; ++t) {
                threads.emplace_back([&, t] {
                    threadIdx = {unsigned(t) % bx, unsigned(t) / bx, 0};
                    blockIdx = {i, j, 0};
                    tt_my_warp = warps[t / 32].get();
                    tt_lane = t % 32;
                    tt_block_barrier = &block_barrier;
                    tt_invoke(k, args, std::index_sequence_for<A...>{});
                    tt_my_warp->exited.fetch_add(1);
                    tt_my_warp->bar->arrive_and_drop();
                    block_barrier.arrive_and_drop();
                });
            }
            for (auto& th : threads) th.join();
        }
    }
    return tt_error.load();
}

// The parameter types as Itanium-mangled names ("PKf" = const float*), comma-separated.
template <typename... A>
const char* tt_signature(void (*)(A...)) {
    static const std::string s = [] {
        std::string r;
        ((r += typeid(A).name(), r += ','), ...);
        return r;
    }();
    return s.c_str();
}
"""

# Itanium type codes of the kernels' scalar and element types.
_TYPE_CODES = {"f": np.float32, "d": np.float64, "x": np.int64, "i": np.int32, "b": np.bool_}
_CTYPES = {np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double,
           np.dtype(np.int64): ctypes.c_longlong, np.dtype(np.int32): ctypes.c_int,
           np.dtype(np.bool_): ctypes.c_bool}


def _parse_signature(sig):
    """[(is_pointer, dtype)] from a tt_signature string."""
    out = []
    for item in sig.rstrip(",").split(","):
        pointer = item.startswith("P")
        code = item.lstrip("PK")
        if code not in _TYPE_CODES:
            raise TypeError(f"the emulator does not know the C++ type code {item!r}")
        out.append((pointer, np.dtype(_TYPE_CODES[code])))
    return out


def _build(families):
    """Compile every family into one shared library; returns (library, {expression: index})."""
    parts = [PRELUDE, _cuda.HEADER]
    index = {}
    for family in families:
        parts.append(family.body)
    for family in families:
        for expression in family.name_expressions:
            k = len(index)
            index[expression] = k
            parts.append(
                f'extern "C" int tt_launch_{k}(unsigned gx, unsigned gy, unsigned bx, unsigned by,'
                f' void** args) {{ return tt_launch(&{expression}, gx, gy, bx, by, args); }}\n'
                f'extern "C" const char* tt_signature_{k}() {{\n'
                f'    return tt_signature(&{expression}); }}\n')
    source = "\n".join(parts)
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    lib_path = os.path.join(tempfile.gettempdir(), f"tinytensor-cuda-emulator-{digest}.so")
    if not os.path.exists(lib_path):
        src_path = f"{lib_path[:-3]}.{os.getpid()}.cpp"   # per process: pytest-xdist workers
        with open(src_path, "w") as f:
            f.write(source)
        tmp = f"{lib_path}.{os.getpid()}"
        cmd = ["g++", "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", src_path, "-o", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"compiling the CUDA kernels for the CPU emulator failed:\n"
                               f"{result.stderr[-4000:]}")
        os.replace(tmp, lib_path)
        os.remove(src_path)
    return ctypes.CDLL(lib_path), index


class EmulatedKernel:
    """One kernel instantiation, launched like cupy's RawKernel: kernel(grid, block, args)."""

    def __init__(self, lib, k, expression):
        self.expression = expression
        self._launch = getattr(lib, f"tt_launch_{k}")
        self._launch.restype = ctypes.c_int
        self._launch.argtypes = [ctypes.c_uint] * 4 + [ctypes.POINTER(ctypes.c_void_p)]
        sig = getattr(lib, f"tt_signature_{k}")
        sig.restype = ctypes.c_char_p
        self.params = _parse_signature(sig().decode())

    def __call__(self, grid, block, args, shared_mem=0):
        grid, block = tuple(grid) + (1, 1), tuple(block) + (1, 1)
        if grid[2] != 1 or block[2] != 1:
            raise ValueError("the emulator supports 1-D and 2-D grids and blocks only")
        if len(args) != len(self.params):
            raise TypeError(f"{self.expression} takes {len(self.params)} arguments, "
                            f"got {len(args)}")
        holders = []
        for n, (arg, (pointer, dtype)) in enumerate(zip(args, self.params)):
            if pointer:
                if not isinstance(arg, FakeCudaArray):
                    raise TypeError(f"{self.expression} argument {n}: expected a device array "
                                    f"of {dtype}, got {type(arg).__name__}")
                if arg.dtype != dtype or not arg.flags.c_contiguous:
                    raise TypeError(f"{self.expression} argument {n}: expected a C-contiguous "
                                    f"{dtype} array, got {arg.dtype} (contiguous: "
                                    f"{arg.flags.c_contiguous})")
                holders.append(ctypes.c_void_p(arg.ctypes.data))
            else:
                if not isinstance(arg, np.generic) or arg.dtype != dtype:
                    raise TypeError(f"{self.expression} argument {n}: expected a numpy {dtype} "
                                    f"scalar, got {type(arg).__name__} {getattr(arg, 'dtype', '')}")
                holders.append(_CTYPES[dtype](arg.item()))
        argv = (ctypes.c_void_p * max(1, len(holders)))(
            *[ctypes.cast(ctypes.pointer(h), ctypes.c_void_p) for h in holders])
        status = self._launch(grid[0], grid[1], block[0], block[1], argv)
        if status:
            raise RuntimeError(f"{self.expression}: a warp shuffle ran with inactive lanes")


class FakeCudaArray(np.ndarray):
    """A NumPy array that the fake cupy module reports as a device array."""


def _dev(a):
    return a.view(FakeCudaArray)


def _asarray(a, dtype=None):
    if isinstance(a, FakeCudaArray):
        return _dev(np.asarray(a, dtype=dtype))   # already on the "device": no copy
    return _dev(np.array(a, dtype=dtype))          # host data: a copy, like cupy.asarray


_LIBRARY = {}


def _library():
    """One library of every family: kernels.families() imports each family's module first (they
    load at their first dispatch, so the registry alone may not hold them all yet)."""
    if "lib" not in _LIBRARY:
        from tinytensor import kernels
        _LIBRARY["lib"] = _build(kernels.families())
    return _LIBRARY["lib"]


class _RawModule:
    def __init__(self, code, options=(), name_expressions=()):
        families = [f for f in _cuda.KernelFamily.registry if f.source == code]
        if not families:
            raise ValueError("the emulator runs only the kernel families of tinytensor.kernels")
        self._names = list(name_expressions)

    def get_function(self, expression):
        if expression not in self._names:
            raise KeyError(f"{expression!r} was not among the module's name_expressions")
        lib, index = _library()
        return EmulatedKernel(lib, index[expression], expression)


def fake_cupy(numpy_fallback=False):
    """A module with the small part of cupy's API the kernels use, on emulated kernels.

    numpy_fallback=True: any other name is NumPy's, returning device arrays, so that whole
    ops (tinytensor's CuPy branches: array expressions around the kernel calls) run on the
    "device" too. Leave it off to check that the kernels' own code needs nothing more.
    """
    m = types.ModuleType("fake_cupy")
    m.ndarray = FakeCudaArray
    m.RawModule = _RawModule
    m.asarray = _asarray
    m.ascontiguousarray = lambda a, dtype=None: _dev(np.ascontiguousarray(a, dtype=dtype))
    m.asnumpy = lambda a: np.array(a).view(np.ndarray)
    m.empty = lambda shape, dtype=float: _dev(np.empty(shape, dtype))
    m.empty_like = lambda a: _dev(np.empty_like(a))
    m.zeros = lambda shape, dtype=float: _dev(np.zeros(shape, dtype))
    m.full = lambda shape, value, dtype=None: _dev(np.full(shape, value, dtype))
    if numpy_fallback:
        m.__getattr__ = _numpy_on_device  # module __getattr__ (PEP 562): names not set above
    return m


def _numpy_on_device(name):
    """NumPy's `name` for the fake module: functions return their arrays as device arrays
    (ufuncs already keep the device-array subclass of their inputs); the rest as it is."""
    obj = getattr(np, name)
    if isinstance(obj, (np.ufunc, type)) or not callable(obj):
        return obj

    @functools.wraps(obj)
    def on_device(*args, **kwargs):
        out = obj(*args, **kwargs)
        return _dev(out) if type(out) is np.ndarray else out
    return on_device


def available():
    """True where g++ can build the emulator (Linux/macOS with a C++20 g++)."""
    if sys.platform.startswith("win"):
        return False
    try:
        return subprocess.run(["g++", "--version"], capture_output=True).returncode == 0
    except OSError:
        return False
