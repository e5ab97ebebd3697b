"""Keep freed memory in the process for reuse: glibc malloc tuning, an explicit call.

    import tinytensor
    tinytensor.malloc.keep_freed_memory()   # train.py (unless --malloc_tuning false) does this

A training step allocates and frees the same large temporaries (activations, gradients) every
step. By default glibc serves blocks above a threshold (128 KiB, rising to at most 32 MiB)
with mmap and hands them back to the kernel on free, so the next step page-faults them in
again and the kernel zero-fills every page. Raising M_MMAP_THRESHOLD (to 2 GiB) and turning
heap trimming off (M_TRIM_THRESHOLD -1) keeps freed blocks in the heap, where the next step
reuses them (README.md's speed table has what it saves). The process's peak memory is the
same; it is just not returned between steps (it is returned at exit).

It changes malloc for the whole process, so importing tinytensor never does it: a program that
wants it calls keep_freed_memory() at its start. It only touches glibc (Linux); elsewhere it
does nothing.
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
