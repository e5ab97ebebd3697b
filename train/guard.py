"""What stands between train.py / sample.py and their user: the out_dir lock, stop signals,
the memory check and the top-level error boundary.

    lock = OutDirLock(out_dir).acquire()         # one run per out_dir (LockError if taken)
    with StopSignals() as stop: ...              # SIGINT/SIGTERM: stop at the next step boundary
    check_memory(*estimate_memory(...))          # refuse a model that cannot fit (OutOfMemory)
    together(prepare, KNOWN)                     # under MPI: an error on one rank ends all, named
    sys.exit(boundary(body, KNOWN))              # every error becomes one `error:` line

Nothing here runs at import: each piece acts only when called.
"""
import contextlib
import datetime
import errno
import fcntl
import os
import resource
import signal
import socket
import sys
import time
import traceback

from tinytensor import distributed as dist

REPORT = "this is a bug in tinytensor-gpt: please report it with the command line and the lines above"


class LockError(RuntimeError):
    """Another run holds out_dir; the message names it (pid, host, since when)."""


class OutOfMemory(RuntimeError):
    """The model and its batch would not fit in this machine's memory (checked before allocating)."""


class RankError(RuntimeError):
    """An error that one or more ranks met while preparing (guard.together), raised on every
    rank alike; code is the exit status, rank the first rank that met it (None: all alike)."""

    def __init__(self, message, code, rank=None):
        super().__init__(message)
        self.code, self.rank = code, rank


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived where the run cannot stop at a step boundary (setup, or twice)."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ----- the out_dir lock ---------------------------------------------------------------------

class OutDirLock:
    """An exclusive fcntl.flock on out_dir/.train.lock, held while the run lives.

    The file says who holds it ("pid host since"). A run that died holds no lock (the kernel
    drops it with the process), so its stale file is simply taken over. release() removes the
    file; acquire() checks that the file it locked is still the one at the path, so a run that
    opened the file just before it was removed does not go on holding a lock nobody sees.
    """
    NAME = ".train.lock"

    def __init__(self, out_dir):
        self.path = os.path.join(out_dir, self.NAME)
        self.fd = None

    def acquire(self):
        folder = os.path.dirname(self.path) or "."
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise NotADirectoryError(errno.ENOTDIR, "--out_dir is a file, not a folder", folder)
        os.makedirs(folder, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise LockError(f"{os.path.dirname(self.path)} is in use by another train.py run "
                                f"({self._holder()}); wait for it to end, stop it, or pass another "
                                f"--out_dir") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # removed by its last holder between our open and flock: again
        since = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {since}\n".encode())
        self.fd = fd
        return self

    def _holder(self):
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                return f.read().strip() or "starting up"
        except OSError:
            return "unknown"

    def release(self):
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)  # closing drops the flock
        self.fd = None


# ----- SIGINT / SIGTERM ---------------------------------------------------------------------

class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (schedulers, `timeout`) as a request to stop.

    While armed (the training loop), the first signal only records itself: the loop finishes
    its step, writes the checkpoint and ends with 128 + signum. Unarmed (setup), or at a second
    signal, it raises Interrupted at once, as Ctrl-C does by default; the finally blocks
    (temporary files, the lock) still run.
    """

    def __init__(self):
        self.asked = None      # the signal this rank received (set by the handler)
        self.signum = None     # the signal every rank agreed to stop for (set by agree())
        self.armed = False
        self.saved = None      # (path, step) of the last checkpoint written or resumed from
        self.writing = None    # (path, step) another rank (0) writes: saved after the next agree()
        self._before = {}

    def __enter__(self):
        """Handle SIGINT and SIGTERM until __exit__, which restores the handlers found."""
        for s in (signal.SIGINT, signal.SIGTERM):
            self._before[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, handler in self._before.items():
            signal.signal(s, handler)
        self._before = {}

    @contextlib.contextmanager
    def armed_here(self):
        """Within: the first signal asks to stop at the next step boundary."""
        self.armed = True
        try:
            yield
        finally:
            self.armed = False

    def _handler(self, signum, frame):
        if not self.armed or self.asked is not None:
            raise Interrupted(signum)
        self.asked = signum  # acted on once the ranks agree (agree()), never on one rank alone

    def flags(self):
        """[SIGTERM asked, SIGINT asked] as floats, to ride along the per-step collective."""
        return [float(self.asked == signal.SIGTERM), float(self.asked == signal.SIGINT)]

    def agree(self, flags):
        """flags averaged over the ranks: True (and the signal set) when any rank was asked.
        The ranks met here, so a checkpoint rank 0 was writing before is written."""
        if self.writing is not None:
            self.saved, self.writing = self.writing, None
        term, intr = flags  # the same on every rank: a signal that came after the collective
        if term > 0:        # is seen at the next one, by every rank alike
            self.signum = signal.SIGTERM
        elif intr > 0:
            self.signum = signal.SIGINT
        return self.signum is not None

    def describe(self, why):
        """The error line for a run that a signal or a closed pipe ended: `why`, and where the
        last checkpoint stands (on a rank other than 0, while rank 0 may still be writing one,
        both that one and the one before)."""
        if self.writing is not None:
            path, step = self.writing
            before = f"step {self.saved[1]}" if self.saved is not None else "none"
            return (f"{why}; {path} holds step {step} if rank 0 finished writing it, else "
                    f"{before}")
        if self.saved is None:
            return f"{why} before this run wrote a checkpoint"
        path, step = self.saved
        return f"{why}; {path} (step {step}) is intact: continue with --resume"

    @property
    def name(self):
        return signal.Signals(self.signum).name

    @property
    def exit_code(self):
        return 128 + int(self.signum)


# ----- memory -------------------------------------------------------------------------------

FLOAT_BYTES = 4  # float32 everywhere


def count_parameters(vocab_size, block_size, n_embd, n_layer):
    """The parameters of gpt.model's GPT (an upper bound for the earlier lecture stages):
    token and position embeddings, per block 12*C^2 + 10*C (qkv without bias, proj, the MLP's
    two Linears, two LayerNorms), the final LayerNorm and the lm_head."""
    V, T, C = vocab_size, block_size, n_embd
    return V * C + T * C + n_layer * (12 * C * C + 10 * C) + 2 * C + C * V + V


def estimate_memory(vocab_size, block_size, n_embd, n_head, n_layer, batch_size, device="cpu"):
    """(bytes, formula) this process needs to train the model, a documented estimate:

        weights + gradients + AdamW's two moments     4 * P floats
        activations kept for backward, per block      B*T*(34*C + 5*nh*T) floats
        logits, their softmax and gradient            3 * B*T*V floats

    (the per-block term is Korthikanti et al.'s 34*s*b*h + 5*a*s^2*b, counted in floats).
    On a GPU only the weights are made on the host first: 1 * P floats of host memory.
    """
    P = count_parameters(vocab_size, block_size, n_embd, n_layer)
    B, T, C, V = batch_size, block_size, n_embd, vocab_size
    if device == "cuda":
        return P * FLOAT_BYTES, f"{P:,} parameters x 4 bytes, made on the host before the GPU"
    acts = n_layer * B * T * (34 * C + 5 * n_head * T) + 3 * B * T * V
    total = (4 * P + acts) * FLOAT_BYTES
    return total, (f"{P:,} parameters x 4 bytes x 4 (weights, gradients, AdamW moments) + "
                   f"{format_bytes(acts * FLOAT_BYTES)} of activations for batch {B} x block {T}")


def available_memory():
    """(bytes, where from): /proc/meminfo's MemAvailable, lowered to what RLIMIT_AS (ulimit -v)
    still allows this process; (None, ...) when neither is known."""
    found = _proc_bytes("/proc/meminfo", "MemAvailable")
    source = "MemAvailable" if found is not None else "unknown"
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        left = soft - (_proc_bytes("/proc/self/status", "VmSize") or 0)
        if found is None or left < found:
            found, source = max(left, 0), f"ulimit -v {soft // 1024} KiB, less what is in use"
    return found, source


def _proc_bytes(path, key):
    """The `key: N kB` line of a /proc file, in bytes (None where there is none)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(needed, formula, ranks_here=1):
    """Raise OutOfMemory when `ranks_here` processes needing `needed` bytes each cannot fit."""
    have, source = available_memory()
    if have is None or needed * ranks_here <= have:
        return
    each = f" per rank x {ranks_here} ranks on this node" if ranks_here > 1 else ""
    raise OutOfMemory(f"the model needs about {format_bytes(needed)}{each} ({formula}) but "
                      f"{format_bytes(have)} is available ({source}); use a smaller --n_embd, "
                      f"--n_layer, --batch_size or --block_size")


def format_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


# ----- the error boundary -------------------------------------------------------------------

def together(body, known):
    """body() on every rank; when it raised one of `known` ([(classes, exit status)]) on any
    rank, every rank raises the same RankError, which names the first rank that failed (unless
    every rank failed alike). Use it around what may fail on some ranks only (reading files,
    the lock, memory), before the ranks' first collective."""
    if dist.world_size() == 1:
        return body()
    result, failure = None, None
    try:
        result = body()
    except Exception as e:
        code = exit_code(e, known)
        if code is None:
            raise  # a bug: its traceback ends every rank (boundary)
        failure = (describe(e), code)
    failures = dist.allgather(failure)
    failed = [(r, f) for r, f in enumerate(failures) if f is not None]
    if failed:
        r, (message, code) = failed[0]
        alike = len(failed) == len(failures) and len({f for _, f in failed}) == 1
        raise RankError(message, code, None if alike else r)
    return result


def exit_code(e, known):
    """The exit status `known` gives e's class, or None."""
    for classes, code in known:
        if isinstance(e, classes):
            return getattr(e, "code", code) if isinstance(e, RankError) else code
    return None


# seconds a rank other than 0 waits before reporting a signal itself (rank 0 usually has it too)
SIGNAL_GRACE_S = 3 * dist.ABORT_DRAIN_S


def boundary(body, known, every_rank=(), stopped=None):
    """Run body() and return its exit status; every exception becomes one `error:` line.

    known: [(exception classes, exit status)], for the errors bad input or the environment can
    raise. every_rank: those of them that every rank raises alike (under MPI rank 0 alone prints
    them and each rank returns); any other error ends every rank from the rank that saw it,
    through dist.abort. stopped(why) gives the line for an Interrupted / KeyboardInterrupt
    (exit 128 + signum) and for a closed output pipe (141), or None to end quietly. Anything
    else is a bug: its traceback and a request to report it.
    """
    stopped = stopped or (lambda why: why)
    try:
        return body()
    except BrokenPipeError:
        _quiet_stdout()
        return _fail(stopped("stopped: the output pipe was closed"), 128 + signal.SIGPIPE,
                     every_rank=False)
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        if dist.world_size() > 1 and not dist.is_main():
            # mpirun forwards a signal to every rank: rank 0 says it once and ends the job;
            # this rank speaks only if rank 0 has not ended it by then (the signal was its own)
            time.sleep(SIGNAL_GRACE_S)
        return _fail(stopped(f"interrupted by {signal.Signals(signum).name}"), 128 + signum,
                     every_rank=False)
    except Exception as e:
        code = exit_code(e, known)
        if code is not None:
            rank = getattr(e, "rank", None) if isinstance(e, RankError) else None
            return _fail(describe(e), code, every_rank=isinstance(e, tuple(every_rank)), rank=rank)
        if dist.MPI is not None and isinstance(e, dist.MPI.Exception):
            return _fail(f"MPI: {e}; check that every rank runs the same command and "
                         f"environment", 1, every_rank=False)
        sys.stderr.write(traceback.format_exc())
        return _fail(REPORT, 1, every_rank=False)


def describe(e):
    """One line for an error: an OSError names its file, a MemoryError says what to do."""
    if isinstance(e, OSError) and e.filename:
        return f"{e.filename}: {e.strerror or e}"
    if isinstance(e, MemoryError):
        return (f"out of memory ({type(e).__name__}{': ' + str(e) if str(e) else ''}); use a "
                f"smaller --n_embd, --n_layer, --batch_size or --block_size")
    return str(e) or type(e).__name__


def _fail(message, code, every_rank=True, rank=None):
    """Print `error: message` (unless None) and return code; see boundary() for every_rank.
    rank: the rank the error came from, named first as dist.abort names it."""
    line = None if message is None else "error: " + " ".join(str(message).split("\n"))
    if not every_rank and dist.world_size() > 1:
        dist.abort(line or "", code)
    if line and (dist.world_size() == 1 or dist.is_main()):
        print(line if rank is None else f"rank {rank}: {line}", file=sys.stderr, flush=True)
    return code


def _quiet_stdout():
    """After a broken pipe: point stdout at /dev/null so the flush at exit stays silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
