"""tinytensor.distributed: single-process identity (no MPI at all), and under mpirun: gradient
averaging, broadcast, consistency checks, equal training for 1, 2 and 4 ranks, fail-fast.

The MPI cases run the scripts in tests/mpi/ with mpirun -n K (more ranks than cores is fine:
MPICH's hydra allows it; Open MPI gets --oversubscribe). Every run has a timeout, after which
the whole process group is killed and the test fails with the output so far.
"""
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import time
import types
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

import tinytensor as tt
import tinytensor.nn as nn
import tinytensor.nn.functional as F
from tinytensor import distributed as dist
from tinytensor.optim import FlatParameters
from tinytensor.reducer import OVERLAP_BUCKET_MB, GradientReducer

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "mpi"
MPI_ENV_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "MPI_LOCALNRANKS", "HYDRA_")
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def clean_env(**extra):
    """This environment without MPI launcher or thread variables, plus extra."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(MPI_ENV_PREFIXES) and k not in THREAD_VARS}
    env.update(extra)
    return env


@lru_cache(maxsize=None)
def mpirun():
    """The mpirun next to this Python (the mpich wheel's), else the one on PATH."""
    here = Path(sys.executable).parent / "mpirun"
    exe = str(here) if here.exists() else None
    if exe is None:
        import shutil
        exe = shutil.which("mpirun") or shutil.which("mpiexec")
    if exe is None:
        pytest.fail('mpirun not found: install the MPI extra with pip install -e ".[mpi]"')
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
    oversubscribe = ["--oversubscribe"] if "Open MPI" in version or "OpenRTE" in version else []
    return (exe, *oversubscribe)


def run(cmd, env=None, timeout=120):
    """Run cmd in its own process group; returns (returncode, stdout, stderr, seconds)."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or clean_env(), cwd=ROOT, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(map(str, cmd))} did not finish in {timeout} s\n"
                    f"stdout:\n{out}\nstderr:\n{err}")
    return proc.returncode, out, err, time.monotonic() - start


def run_mpi(n, script, *args, env=None, timeout=120):
    return run([*mpirun(), "-n", str(n), sys.executable, str(SCRIPTS / script), *map(str, args)],
               env=env, timeout=timeout)


def expect_ok(result, what):
    rc, out, err, _ = result
    assert rc == 0 and "OK" in out, f"{what} failed (exit {rc})\nstdout:\n{out}\nstderr:\n{err}"
    return out


# ----- one process: no MPI at all ------------------------------------------------------------

SINGLE_PROCESS = r"""
import sys
import numpy as np
import tinytensor as tt, tinytensor.nn as nn
from tinytensor import distributed as dist
assert not dist.launched_under_mpi()
dist.init()
model = nn.Linear(3, 2)
opt = tt.optim.AdamW(model.parameters())
model(tt.tensor(np.ones((4, 3), np.float32))).sum().backward()
dist.broadcast_parameters(model)
dist.allreduce_gradients(opt.flat)
opt.step()
dist.check_consistent({"a": 1}, model)
dist.barrier()
values = (dist.rank(), dist.world_size(), dist.is_main(), dist.allreduce_mean(2.5),
          dist.all_true(True), dist.all_true(False))
assert values == (0, 1, True, 2.5, True, False), values
print("mpi4py imported" if "mpi4py" in sys.modules else "OK no mpi4py")
"""


def test_single_process_never_imports_mpi4py():
    rc, out, err, _ = run([sys.executable, "-c", SINGLE_PROCESS], timeout=120)
    assert rc == 0 and out.strip() == "OK no mpi4py", f"exit {rc}\n{out}\n{err}"


def test_single_process_collectives_are_identity():
    tt.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    before = [p.numpy().copy() for p in model.parameters()]
    flat = FlatParameters(model.parameters())
    F.cross_entropy(model(tt.tensor(np.ones((3, 4), np.float32))), np.array([0, 1, 1])).backward()
    params = list(model.parameters())
    params[0].grad = None
    grads = [p.grad for p in params]
    dist.allreduce_gradients(flat)
    assert all(p.grad is g for p, g in zip(params, grads))  # untouched, not even copied
    dist.broadcast_parameters(model)
    assert all(np.array_equal(b, p.numpy()) for b, p in zip(before, model.parameters()))
    arr = np.array([1.0, 2.0])
    assert dist.allreduce_mean(arr) is arr and dist.allreduce_mean(0.5) == 0.5
    assert dist.all_true(1) is True and dist.all_true(0) is False
    dist.check_consistent({"lr": 0.1}, params)
    assert (dist.rank(), dist.world_size(), dist.is_main()) == (0, 1, True)


def test_accumulated_micro_batches_in_the_flat_buffer_match_plain_backward():
    """Gradient accumulation as train_mlp.py --accum does it: two half-batch backwards add up in
    each p.grad (an array of its own), which the optimizer's flat gradient buffer gathers and
    which is then reduced once."""
    tt.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    x, y = tt.tensor(np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)), \
        np.array([0, 1] * 4)
    F.cross_entropy(model(x), y).backward()
    plain = [p.grad.copy() for p in model.parameters()]
    model.zero_grad()

    opt = tt.optim.AdamW(model.parameters())
    (F.cross_entropy(model(x[:4]), y[:4]) * 0.5).backward()  # accumulate two halves, 1/2 each
    (F.cross_entropy(model(x[4:]), y[4:]) * 0.5).backward()
    assert not any(p.grad is v for p, v in zip(opt.flat.params, opt.flat.grad_views))
    opt.flat.gather_grads()  # what allreduce_gradients does first under MPI
    for p, v in zip(opt.flat.params, opt.flat.grad_views):
        np.testing.assert_array_equal(v, p.grad)
    dist.allreduce_gradients(opt.flat)
    for g, p, v in zip(plain, model.parameters(), opt.flat.grad_views):
        np.testing.assert_allclose(p.grad, g, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(v, g, rtol=1e-5, atol=1e-6)


def test_allreduce_gradients_takes_the_flat_buffers():
    model = nn.Linear(3, 2)
    with pytest.raises(TypeError, match="FlatParameters that hold the gradients.*got list"):
        dist.allreduce_gradients(list(model.parameters()))


def test_allreduce_reduces_the_optimizers_flat_buffer_from_step_0(monkeypatch):
    """One mechanism from the first step on: with two pretend ranks (the other one holding the
    same gradients), every step's allreduce copies backward's gradients (arrays of their own)
    into the optimizer's flat gradient buffer, sums that buffer in place and leaves each p.grad
    its view of it, at step 0 as at later steps."""
    tt.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    opt = tt.optim.AdamW(model.parameters(), lr=1e-2)
    flat = opt.flat
    reduced = []

    def sum_over_two_ranks(fp, bucket_mb):
        reduced.append(fp)
        fp.grad_and_flags *= 2  # the other rank's gradients are the same

    def in_place():
        return [p.grad is v for p, v in zip(flat.params, flat.grad_views)]

    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "sum_over_ranks", sum_over_two_ranks)
    x, y = tt.tensor(np.ones((3, 4), np.float32)), np.array([0, 1, 1])
    for step in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        assert not any(in_place()), f"step {step}: backward wrote into the flat buffer"
        local = np.concatenate([p.grad.ravel() for p in flat.params])
        dist.allreduce_gradients(opt.flat)
        assert reduced[-1] is flat, f"step {step}: another buffer was reduced"
        assert all(in_place()), f"step {step}: the gradients are not views of the flat buffer"
        np.testing.assert_array_equal(flat.grad, local)  # the mean of two equal ranks
        opt.step()
        assert opt.flat is flat
    assert len(reduced) == 3


def test_gradient_chunks_cover_the_buffer():
    assert inspect.signature(dist.allreduce_gradients).parameters["bucket_mb"].default \
        == dist.DEFAULT_BUCKET_MB == 25
    assert dist.chunks(10, 4, dist.DEFAULT_BUCKET_MB) == [(0, 10)]  # 25 MB: one call
    assert dist.chunks(10, 4, bucket_mb=16e-6) == [(0, 4), (4, 8), (8, 10)]
    assert dist.chunks(5, 4, 8e-6) == [(0, 2), (2, 4), (4, 5)]
    for bad in ("big", 0, -1.0, float("nan"), float("inf"), None):
        with pytest.raises(ValueError, match=rf"^bucket_mb must be a size in MB > 0, got "
                                             rf"{re.escape(repr(bad))}$"):
            dist.chunks(5, 4, bad)


def test_overlap_setting_and_its_bucket_size():
    """GradientReducer's arguments: overlap on (default) sums 1 MB buckets, off 25 MB pieces
    (allreduce_gradients'), a bucket_mb given wins, a bad one is an error at once; train.py's
    --overlap and --bucket_mb (0: that default) are checked as config values, one line each."""
    from train.config import ConfigError, make_config, parse_args
    model = nn.Linear(3, 2)
    flat = tt.optim.AdamW(model.parameters()).flat
    assert OVERLAP_BUCKET_MB == 1
    assert GradientReducer(flat).overlap is True and GradientReducer(flat).bucket_mb == 1
    assert GradientReducer(flat, overlap=False).bucket_mb == dist.DEFAULT_BUCKET_MB == 25
    assert GradientReducer(flat, bucket_mb=0.5, overlap=False).bucket_mb == 0.5
    with pytest.raises(ValueError, match=r"^bucket_mb must be a size in MB > 0, got 'big'$"):
        GradientReducer(flat, bucket_mb="big")
    assert parse_args(["--overlap", "0", "--bucket_mb", "2"])[1] == {"overlap": False,
                                                                      "bucket_mb": 2.0}
    with pytest.raises(ConfigError, match=r"^--overlap: 'maybe' is not a bool \(expected true, "
                                          r"false, 1 or 0\)$"):
        parse_args(["--overlap", "maybe"])
    with pytest.raises(ConfigError, match=r"^bucket_mb must be a size in MB, 0 \(the default\) "
                                          r"to 1e6, got -1.0$"):
        make_config(None, parse_args(["--bucket_mb", "-1"])[1]).validate()


def test_accelerators_are_a_setting_every_rank_shares(monkeypatch):
    """The accelerated kernels round differently from the references: the ranks' fingerprint
    (train.py's, compared by check_same) holds --accelerators and what they run here, so a rank
    that differs is named; a bad value is a one-line config error."""
    from tinytensor import kernels
    from train.config import ConfigError, make_config, parse_args
    from train.train import fingerprint
    model = nn.Linear(3, 2)
    data = types.SimpleNamespace(fingerprint=lambda: {"text sha256": "0" * 64, "tokens": [9, 1]})
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    before = kernels.use(False)
    try:
        off = fingerprint(make_config(None, {"accelerators": "off"}), data, model, "cpu")
        kernels.use(True)
        on = fingerprint(make_config(None, {"accelerators": "on"}), data, model, "cpu")
    finally:
        kernels.use(before)
    compiled = kernels.numba_loops() is not None                   # numba installed
    assert off["--accelerators"] == "off" and off["accelerated"] == [False, compiled]
    assert on["accelerated"] == [True, compiled]
    monkeypatch.setattr(dist, "allgather", lambda values: [off, values])  # rank 1 has them on
    with pytest.raises(dist.RankMismatchError,
                       match=r"^rank 1 has --accelerators='on' \(rank 0: 'off'\), accelerated="):
        dist.check_same(on)
    dist.check_same(off)  # the same on both: no error
    with pytest.raises(ConfigError, match=r"^accelerators must be 'auto', 'on' or 'off', got "
                                          r"'2'$"):
        make_config(None, parse_args(["--accelerators", "2"])[1]).validate()


def test_gradient_reducer_in_one_process_adds_no_hooks_and_changes_nothing():
    tt.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = tt.optim.AdamW(model.parameters())
    reducer = GradientReducer(opt.flat, overlap=True)
    assert not reducer.active and "one process" in reducer.describe()
    assert all(getattr(p, "_post_hooks", None) is None for p in model.parameters())
    model(tt.tensor(np.ones((4, 3), np.float32))).sum().backward()
    before = [p.grad.copy() for p in model.parameters()]
    reducer.finish()
    assert all(np.array_equal(p.grad, g) for p, g in zip(model.parameters(), before))
    with pytest.raises(TypeError, match="GradientReducer takes the FlatParameters"):
        GradientReducer(list(model.parameters()))


def test_launched_under_mpi_reads_the_launcher_environment(monkeypatch):
    for k in list(os.environ):
        if k.startswith(MPI_ENV_PREFIXES):
            monkeypatch.delenv(k)
    assert not dist.launched_under_mpi()
    monkeypatch.setenv("PMI_RANK", "0")
    assert dist.launched_under_mpi()


def test_bad_threads_per_rank_is_a_clear_error():
    """configure()'s (and init()'s) arguments are checked before anything is set; train.py's
    --threads_per_rank and --dist_backend are config values, each a one-line error."""
    from train.config import ConfigError, make_config, parse_args
    for bad in ("many", -1, 2.0, True, None):
        with pytest.raises(ValueError, match=rf"^threads_per_rank must be an int >= 0 \(0: "
                                             rf"automatic\), got {re.escape(repr(bad))}$"):
            dist.configure(threads_per_rank=bad)
    with pytest.raises(ValueError, match=r"^distributed backend 'gloo': expected 'mpi' or 'nccl'$"):
        dist.init(backend_name="gloo")
    dist.configure(threads_per_rank=2, backend_name="nccl")  # one process: checked, nothing set
    assert dist._threads is None and dist._nccl_comm is None
    with pytest.raises(ConfigError, match=r"^--threads_per_rank: 'many' is not an int"):
        parse_args(["--threads_per_rank", "many"])
    for argv, line in [(["--threads_per_rank", "-1"],
                        "threads_per_rank must be 0 (automatic) to 4096, got -1"),
                       (["--dist_backend", "gloo"],
                        "dist_backend must be 'mpi' or 'nccl', got 'gloo'")]:
        with pytest.raises(ConfigError, match=rf"^{re.escape(line)}$"):
            make_config(None, parse_args(argv)[1]).validate()


# ----- under mpirun ----------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 4])
def test_allreduce_gradients_is_the_mean_over_ranks(n):
    # 50-byte pieces: many Allreduce calls per flat buffer; None gradients on some ranks and on all
    out = expect_ok(run_mpi(n, "check_allreduce.py", "--bucket_mb", "5e-5"), f"{n} ranks")
    if n > 1:
        calls = int(out.split("calls=")[1].split()[0])
        assert calls >= 7, f"expected many small Allreduce calls, got {calls}"


def test_allreduce_gradients_default_bucket_size():
    out = expect_ok(run_mpi(2, "check_allreduce.py"), "2 ranks, 25 MB pieces")
    assert "calls=2" in out  # one per flat buffer (one float32, one float64)


@pytest.mark.parametrize("n", [2, 3])
def test_overlapped_reducer_equals_allreduce_gradients(n):
    """GradientReducer (buckets summed during backward) against allreduce_gradients on a GPT's
    steps, missing gradients and misuse (tests/mpi/check_overlap.py): bitwise for 2 ranks."""
    expect_ok(run_mpi(n, "check_overlap.py", *(["--exact"] if n == 2 else [])), f"{n} ranks")


@pytest.mark.parametrize("how", [[], ["--reducer"]])
def test_gpu_arrays_are_staged_through_host_memory(how):
    # a cupy stand-in with 3 pretend GPUs (tests/mpi/fake_gpu.py): 4 ranks use GPUs 0, 1, 2, 0;
    # MPI must only read gradients after the stream is synchronized; GradientReducer takes the
    # same path
    out = expect_ok(run_mpi(4, "check_allreduce.py", "--bucket_mb", "5e-5", "--fake_gpu", *how),
                    "fake GPU, 4 ranks")
    assert "fake GPU" in out


def test_reducer_finish_alone_is_allreduce_gradients():
    """GradientReducer.finish() with no backward (gradients set by hand, accumulated in place,
    None on some ranks or all, two dtypes): the same checks as allreduce_gradients."""
    expect_ok(run_mpi(3, "check_allreduce.py", "--bucket_mb", "5e-5", "--reducer"), "3 ranks")


def test_collectives_broadcast_consistency_and_threads():
    cores = len(os.sched_getaffinity(0))
    expect_ok(run_mpi(2, "collectives.py", "--threads", max(1, cores // 2)), "default threads")
    # as train.py does it: init(), then configure() with the config's --threads_per_rank
    expect_ok(run_mpi(3, "collectives.py", "--threads", 3, "--threads_per_rank", 3, "--configure"),
              "configure(threads_per_rank=3)")
    expect_ok(run_mpi(2, "collectives.py", "--threads", "none", env=clean_env(OMP_NUM_THREADS="1")),
              "OMP_NUM_THREADS=1")
    # a count given explicitly wins over the user's BLAS thread variable
    expect_ok(run_mpi(2, "collectives.py", "--threads", 2, "--threads_per_rank", 2,
                      env=clean_env(OMP_NUM_THREADS="1")), "init(threads_per_rank=2)")


def test_one_two_and_four_ranks_train_the_same_model(tmp_path):
    """Same per-step losses (1e-4) for 1 process, 2 and 4 ranks, and 2 ranks accumulating two
    micro-batches per step before one allreduce; the scripts check the parameters are bitwise
    identical across ranks after every step."""
    steps = 12
    runs = {"1 process": run([sys.executable, str(SCRIPTS / "train_mlp.py"),
                              "--out", tmp_path / "1.json", "--steps", str(steps)])}
    runs["1 process"] = (*runs["1 process"][:3], tmp_path / "1.json")
    for name, n, extra in [("2 ranks", 2, []), ("4 ranks", 4, []),
                           ("2 ranks, accumulating micro-batches", 2, ["--accum"])]:
        out = tmp_path / f"{name}.json"
        runs[name] = (*run_mpi(n, "train_mlp.py", "--out", out, "--steps", steps, *extra)[:3], out)
    losses = {}
    for name, (rc, out, err, path) in runs.items():
        assert rc == 0, f"{name} failed (exit {rc})\n{out}\n{err}"
        result = json.loads(Path(path).read_text())
        assert result["checked_steps"] == steps and len(result["losses"]) == steps
        losses[name] = np.array(result["losses"])
    ref = losses.pop("1 process")
    assert ref[-1] < ref[0] - 0.05, f"the model did not train: {ref}"
    for name, got in losses.items():
        worst = np.max(np.abs(got - ref))
        assert worst <= 1e-4, f"{name}: per-step losses differ from one process by up to {worst:.2e}"


# ----- fail-fast -------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, line, rc", [
    ("raise", "rank 1: ValueError: boom on purpose", 1),
    ("thread", "rank 1: RuntimeError: boom in a thread", 1),
    ("abort", "rank 1: stopping on purpose", 3),
    ("mismatch", "error: rank 1 has a different config: lr=0.2 (rank 0: 0.1)", 1),
])
def test_an_error_on_one_rank_ends_every_rank_and_is_printed_once(mode, line, rc):
    code, out, err, seconds = run_mpi(3, "fail.py", mode, timeout=60)
    assert code == rc, f"exit {code}, expected {rc}\n{out}\n{err}"
    assert seconds < 30, f"took {seconds:.0f} s"
    assert err.count(line) == 1, f"expected {line!r} once in stderr:\n{err}"
    assert "unreachable" not in out
    if mode in ("raise", "thread"):
        assert err.count("Traceback") == 1, err


def test_a_killed_rank_ends_the_job_within_60_seconds():
    code, out, err, seconds = run_mpi(3, "fail.py", "kill", timeout=90)
    assert code != 0, f"exit 0 after a rank was killed\n{out}\n{err}"
    assert seconds < 60, f"took {seconds:.0f} s"
    assert "unreachable" not in out


# ----- the collective timeout (tinytensor/watchdog.py; tests/mpi/watchdog.py) -------------------

def test_only_waiting_for_the_other_ranks_is_timed():
    """Every rank sleeps 2.5 s (as a long step) between collectives, with a 1 s timeout."""
    expect_ok(run_mpi(3, "watchdog.py", "slow", timeout=60), "2.5 s between collectives")


@pytest.mark.parametrize("mode, line", [
    # rank 2 sleeps: ranks 0 and 1 both time out; one line, from rank 0
    ("late", r"error: rank 0 waited [12] s for the other ranks in a barrier in the test: rank 2 "
             r"runs but has not got there \(it is in the test\); ending the job \(collective "
             r"timeout 1 s\)"),
    # a rank that ends (or is killed) while the others wait for it: the job ends at once
    ("exit", r"error: rank 2 has exited while rank 0 waited for it in a barrier in the test"),
    ("died", r"error: rank 2 died \(its process is gone\) while rank 0 waited for it in a "
             r"barrier in the test"),
])
def test_a_rank_that_keeps_the_others_waiting_ends_the_job_named_once(mode, line):
    code, out, err, seconds = run_mpi(3, "watchdog.py", mode, timeout=90)
    said = [x for x in err.splitlines() if "error:" in x]
    assert code == 1 and len(said) == 1 and re.fullmatch(line, said[0]), (code, err)
    assert seconds < 30 and "unreachable" not in out and "Traceback" not in err


@pytest.mark.parametrize("how", [[], ["--configure"]])
def test_bad_init_argument_ends_every_rank_named_by_each_rank_that_has_it(how):
    """The settings are arguments now (train.py checks its config's values first: one line,
    see test_train_mpi.py): a bad argument to init() or configure() under mpirun is a bug of
    the calling script, so the rank that has it gives its traceback and one line naming it,
    and every rank ends; here both have it, and the first to abort may end the other before
    it speaks."""
    code, out, err, seconds = run_mpi(2, "collectives.py", "--threads", "1", "--dist_backend",
                                      "gloo", *how, timeout=60)
    line = "ValueError: distributed backend 'gloo': expected 'mpi' or 'nccl'"
    said = [x for x in err.splitlines() if x.endswith(line) and x.startswith("rank ")]
    assert code != 0 and 1 <= len(said) <= 2 and seconds < 30, err
    assert all(re.fullmatch(rf"rank [01]: {re.escape(line)}", x) for x in said), said
    assert err.count("Traceback") == len(said), err
    assert "OK" not in out
