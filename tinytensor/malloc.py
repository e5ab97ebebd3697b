"""Keep freed memory in the process for reuse between training steps (glibc malloc tuning).

    opt = tinytensor.optim.AdamW(model.parameters())   # the first optimizer does it (automatic)
    tinytensor.malloc.automatic = False                 # before that: leave malloc alone
    tinytensor.malloc.keep_freed_memory()               # or do it yourself, at any time

A training step allocates and frees the same large temporaries (activations, gradients) every
step. By default glibc serves blocks above a threshold (128 KiB, rising to at most 32 MiB as
large blocks are freed) with mmap and hands them back to the kernel on free, and it trims the
heap's free top above twice that: the next step page-faults the memory in again and the kernel
zero-fills every page (at the small preset about 4,700 page faults a step, 18 MB, where nothing
raised the threshold first; at the lecture preset every activation is above 32 MiB and is
faulted in anew each step). Raising M_MMAP_THRESHOLD (to 2 GiB) and turning heap trimming off
(M_TRIM_THRESHOLD -1) keeps freed blocks in the heap, where the next step reuses them. The
process's peak memory is the same; it is just not returned between steps (it is returned at
exit).

Who does it: the constructor of every optimizer (optim.Optimizer) calls training_starts(),
which calls keep_freed_memory() once unless `automatic` is False, so a loop written with the
library directly runs as fast as train.py (benchmarks/bench_loop.py times both); train.py's
`--malloc_tuning false` sets `automatic = False`. It changes malloc for the whole process, so
importing tinytensor never does it, and a program that makes no optimizer keeps glibc's
defaults. It only touches glibc (Linux); elsewhere it does nothing.
"""
import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1   # mallopt parameter numbers, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 2 ** 31 - 1  # bytes (an int); blocks smaller than this come from the heap
# -1: never trim the heap (mallopt(3)). A finite value, even the largest int (2 GiB), is
# exceeded by the free top of the heap after a lecture-preset step (3.3 GB), and glibc then
# returns it all to the kernel, to be page-faulted in again at the next step
_NO_TRIM = -1

tuned = False             # whether keep_freed_memory() changed glibc's settings
automatic = True          # whether the first optimizer calls keep_freed_memory() (training_starts)


def keep_freed_memory():
    """Raise glibc's mmap and trim thresholds so freed blocks are reused, not unmapped.

    Returns True when the settings were changed, False where this is not glibc. Calling it
    again is harmless.
    """
    global tuned
    if tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    tuned = bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _NO_TRIM))
    return tuned


def training_starts():
    """What an optimizer's constructor calls: keep_freed_memory() when `automatic` is True (the
    default); returns whether glibc's settings are tuned now."""
    if automatic is not True and automatic is not False:
        raise TypeError(f"tinytensor.malloc.automatic must be True or False, got {automatic!r}")
    return keep_freed_memory() if automatic else tuned
