"""What the CPU benchmarks share: presets, FLOP counts, peak memory, GEMM peaks, the machine's
description, and worker processes that let tinytensor and PyTorch take turns.

Why worker processes: NumPy's OpenBLAS and PyTorch's OpenMP each keep a pool of threads that
spin for a while after every call. In one process the two pools fight over the same cores and
both slow down (PyTorch ran 2.5x slower next to a tinytensor model on the 2-core machine). So
each framework runs in a process of its own; the parent asks them for one step at a time, in
turn, so a busy machine slows them alike, and each process's peak memory is its own.

A worker is this same script started with `--_worker KIND`; it reads one JSON request per
line on stdin and answers with one JSON line on stdout (its prints go to stderr).
"""
import json
import os
import platform
import resource
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# the train presets (train/config.py): batch, block, n_embd, n_head, n_layer, dropout; vocab 65
PRESETS = {
    "small": dict(batch_size=12, block_size=64, n_embd=128, n_head=4, n_layer=4, dropout=0.0),
    "lecture": dict(batch_size=64, block_size=256, n_embd=384, n_head=6, n_layer=6, dropout=0.2),
}
VOCAB = 65  # tiny Shakespeare's characters
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def usable_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# ----------------------------------------------------------------- FLOPs
def matmul_params(cfg, vocab=VOCAB):
    """Weights that take part in a matmul: per block q/k/v (3C*C), projection (C*C), the
    feed-forward (8C*C); and lm_head (C*V). Embedding lookups do no arithmetic."""
    C = cfg["n_embd"]
    return cfg["n_layer"] * 12 * C * C + C * vocab


def train_flops(cfg, vocab=VOCAB):
    """FLOPs of one training step (forward + backward), counted as nanoGPT/PaLM count them:
    6 per matmul weight per token, plus 12 * n_layer * T * C per token for the attention
    scores and the weighted sum of values (the whole T x T square, masked half included)."""
    tokens = cfg["batch_size"] * cfg["block_size"]
    per_token = 6 * matmul_params(cfg, vocab) + 12 * cfg["n_layer"] * cfg["block_size"] * cfg["n_embd"]
    return tokens * per_token


def gemm_shapes(cfg):
    """(M, K, N) of the model's own big matmuls, and a large square one."""
    n, C = cfg["batch_size"] * cfg["block_size"], cfg["n_embd"]
    return [(n, C, 3 * C), (n, C, 4 * C), (n, 4 * C, C), (2048, 2048, 2048)]


def gemm_peak(matmul, make, shapes, seconds=0.5):
    """{"MxKxN": GFLOP/s} of matmul(a, b) for float32 a (M, K), b (K, N) made by make(shape),
    each the best of repeated runs for about `seconds`; and the best over shapes."""
    out = {}
    for M, K, N in shapes:
        a, b = make((M, K)), make((K, N))
        matmul(a, b)  # warm-up: first-touch of the result, BLAS buffers
        best, start = float("inf"), time.perf_counter()
        while time.perf_counter() - start < seconds or best == float("inf"):
            t0 = time.perf_counter()
            matmul(a, b)
            best = min(best, time.perf_counter() - t0)
        out[f"{M}x{K}x{N}"] = 2 * M * K * N / best / 1e9
    return out, max(out.values())


# ----------------------------------------------------------------- memory and machine
def memory_mb():
    """(current RSS, peak RSS) of this process in MB (VmRSS and VmHWM; ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
        return peak, peak


def memory():
    """A worker's "memory" answer: {"rss_mb": current RSS, "peak_mb": peak RSS} (memory_mb)."""
    rss, peak = memory_mb()
    return {"rss_mb": rss, "peak_mb": peak}


def python_calls(fn):
    """How many calls the interpreter makes while fn() runs - Python functions and the C
    functions they call (builtins, NumPy's, torch's) - as cProfile counts them: the bookkeeping a
    framework does in Python around the arithmetic. Profiling slows fn: never time this run."""
    import cProfile
    import pstats
    profile = cProfile.Profile()
    profile.runcall(fn)
    return pstats.Stats(profile).total_calls


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(threads, accelerators="auto", mkl="auto"):
    """One line describing where the numbers come from."""
    import numpy as np
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu_name()}, {usable_cores()} cores, {threads} thread(s) per framework; "
            f"Python {platform.python_version()}, NumPy {np.__version__}; "
            f"tinytensor's accelerators {use_accelerators(accelerators, mkl)}; "
            f"load average {load:.2f}")


# --accelerators and --mkl of the benchmarks: tinytensor.kernels.use()'s and use_mkl()'s
# argument for each value
ACCELERATORS = {"auto": None, "on": True, "off": False}


def use_accelerators(setting, mkl="auto"):
    """Switch tinytensor's accelerators (kernels.use) and MKL's products (kernels.use_mkl) as
    `setting` and `mkl` ('auto', 'on', 'off') say; returns kernels.describe(): whether the fused
    ops run accelerated versions, and which."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from tinytensor import kernels
    kernels.use(ACCELERATORS[setting])
    kernels.use_mkl(ACCELERATORS[mkl])
    return kernels.describe()


def add_speed_options(p):
    """--accelerators and --mkl, as every benchmark that runs tinytensor takes them."""
    p.add_argument("--accelerators", default="auto", choices=sorted(ACCELERATORS),
                   help="tinytensor's faster versions of the fused ops (tinytensor/kernels/): auto "
                        "(on where numba is installed), on, or off (the plain reference)")
    p.add_argument("--mkl", default="auto", choices=sorted(ACCELERATORS),
                   help="the linear layers' products by Intel MKL (tinytensor/kernels/mkl.py): "
                        "auto (where the mkl wheel is installed and the CPU is Intel's), on, or "
                        "off (NumPy's BLAS)")


def blas_name():
    """The library that multiplies tinytensor's linear layers here, with its version."""
    from tinytensor.kernels import mkl
    if mkl.enabled():
        return f"mkl {mkl.version()}"
    try:
        from threadpoolctl import threadpool_info
        info = [i for i in threadpool_info() if i["user_api"] == "blas" and i["internal_api"] != "mkl"]
        return f"{info[0]['internal_api']} {info[0]['version']}" if info else "blas"
    except ImportError:
        return "blas"


# ----------------------------------------------------------------- worker processes
class Worker:
    """A child process running `script --_worker kind ...`, spoken to in JSON lines."""

    def __init__(self, script, kind, args, threads):
        env = dict(os.environ)
        for var in THREAD_VARS:  # read by OpenBLAS / OpenMP when the child imports them
            env[var] = str(threads)
        env.setdefault("PYTHONPATH", "")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.path.join(ROOT, "tests"),
                                                        env["PYTHONPATH"]) if p)
        self.kind = kind
        self.proc = subprocess.Popen([sys.executable, script, "--_worker", kind] + list(args),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                     text=True, bufsize=1)

    def ask(self, **request):
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(f"the {self.kind} worker exited (status {code}) while handling "
                               f"{request.get('cmd')!r}; its error is printed above")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"{self.kind} worker: {answer['error']}")
        return answer

    def close(self):
        if self.proc.poll() is None:
            try:
                self.ask(cmd="exit")
            except (RuntimeError, BrokenPipeError, OSError):
                pass
            self.proc.wait(timeout=30)


def serve(handlers):
    """The worker side: answer requests {"cmd": name, ...} with handlers[name](**rest)."""
    out = sys.stdout
    sys.stdout = sys.stderr  # prints from the libraries must not break the protocol
    for line in sys.stdin:
        request = json.loads(line)
        cmd = request.pop("cmd")
        if cmd == "exit":
            out.write(json.dumps({}) + "\n")
            out.flush()
            return
        try:
            answer = handlers[cmd](**request)
        except Exception as e:  # report it to the parent, which raises it with context
            import traceback
            traceback.print_exc()
            answer = {"error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(answer) + "\n")
        out.flush()


def timed_train_step(model, opt, x, y):
    """One training step (zero_grad, forward with the loss, backward, optimizer step) of a
    tinytensor or PyTorch model: {"ms": its wall time, "loss": the loss}. loss.item() waits for
    the step to finish."""
    t0 = time.perf_counter()
    opt.zero_grad()  # torch: set_to_none=True, its default
    _, loss = model(x, y)
    loss.backward()
    opt.step()
    value = loss.item()
    return {"ms": 1e3 * (time.perf_counter() - t0), "loss": value}


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])
