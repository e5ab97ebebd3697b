"""train.py under mpirun: N ranks train the same model as one process, resume works with a
different number of ranks, and a failure on any rank ends the job (issue: data parallel)."""
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "train" / "train.py"
MPIRUN = shutil.which("mpirun", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))

pytestmark = pytest.mark.skipif(MPIRUN is None, reason="mpirun not found: pip install -e '.[mpi]'")

TINY = ["--n_embd", "16", "--n_head", "2", "--n_layer", "1", "--block_size", "8",
        "--batch_size", "4", "--eval_interval", "6", "--eval_iters", "2", "--log_interval", "1",
        "--dropout", "0", "--lr_decay", "cosine", "--lr_decay_iters", "12"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    src = ROOT / "data" / "tinyshakespeare" / "input.txt"
    text = src.read_text(encoding="utf-8")[:20000] if src.exists() else (
        "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 400)
    p = tmp_path_factory.mktemp("data") / "t.txt"
    p.write_text(text, encoding="utf-8")
    return p


def run(nranks, out_dir, text_file, *extra, timeout=240, env=()):
    cmd = [sys.executable, str(TRAIN), "--data", str(text_file), "--out_dir", str(out_dir), *TINY, *extra]
    if nranks > 1:
        cmd = [MPIRUN, "-n", str(nranks)] + cmd
    env = dict(os.environ, PYTHONUNBUFFERED="1", **dict(env))
    env.pop("OMP_NUM_THREADS", None)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def losses(out_dir):
    rows = [json.loads(line) for line in open(Path(out_dir) / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def single(tmp_path_factory, text_file):
    out = tmp_path_factory.mktemp("single")
    r = run(1, out, text_file, "--max_iters", "12")
    assert r.returncode == 0, r.stderr
    return losses(out)


@pytest.mark.parametrize("nranks", [2, 4])
def test_ranks_match_one_process(nranks, single, tmp_path, text_file):
    r = run(nranks, tmp_path, text_file, "--max_iters", "12")
    assert r.returncode == 0, r.stderr
    got = losses(tmp_path)
    assert sorted(got) == sorted(single) and len(got) >= 12
    worst = max(abs(got[s] - single[s]) for s in single)
    print(f"{nranks} ranks vs 1 process: worst per-step loss difference {worst:.2e}")
    assert worst <= 1e-4
    # rank 0 alone writes and prints: one final line, one checkpoint
    assert r.stdout.count("step 12: train loss") == 1
    assert (tmp_path / "ckpt.npz").exists()


@pytest.mark.parametrize("resume_ranks", [1, 4])
def test_resume_two_rank_checkpoint_with_other_rank_counts(resume_ranks, single, tmp_path, text_file):
    r = run(2, tmp_path, text_file, "--max_iters", "6")
    assert r.returncode == 0, r.stderr
    r = run(resume_ranks, tmp_path, text_file, "--max_iters", "12", "--resume")
    assert r.returncode == 0, r.stderr
    got = losses(tmp_path)
    assert sorted(got) == sorted(single)
    assert max(abs(got[s] - single[s]) for s in single) <= 1e-4


def test_overlapped_gradient_reduction_trains_bitwise_as_the_plain_one(tmp_path, text_file):
    """--overlap 1 (buckets summed during backward) and --overlap 0 (allreduce_gradients
    after it): with 2 ranks the same per-step losses and final weights to the last bit (a sum
    of two numbers does not depend on how the buffer is cut), and a resumed run as well.
    1 kB buckets (--bucket_mb 0.001): many of them, even for this tiny model."""
    def weights(out):
        with np.load(out / "ckpt.npz", allow_pickle=False) as z:
            return {k: z[k] for k in z.files if k != "meta"}
    runs = {}
    for name, overlap, extra in [("on", "1", []), ("off", "0", []), ("resumed", "1", ["6"])]:
        out = tmp_path / name
        settings = ["--bucket_mb", "0.001", "--overlap", overlap]
        for max_iters, resume in ([(x, []) for x in extra] + [("12", ["--resume"] if extra else [])]):
            r = run(2, out, text_file, "--max_iters", max_iters, *resume, *settings)
            assert r.returncode == 0, r.stderr[-3000:]
            said = "during backward, in " if overlap == "1" else "after backward, in pieces of "
            assert f"gradients: summed over the ranks {said}" in r.stdout, r.stdout[:3000]
            line = next(x for x in r.stdout.splitlines() if x.startswith("gradients: "))
            assert "0.001 MB" in line, line
        with np.load(out / "ckpt.npz", allow_pickle=False) as z:  # the settings are saved
            saved = json.loads(str(z["meta"]))["config"]
        assert (saved["bucket_mb"], saved["overlap"]) == (0.001, overlap == "1"), saved
        runs[name] = (losses(out), weights(out))
    (on, w_on), (off, w_off), (resumed, w_resumed) = runs["on"], runs["off"], runs["resumed"]
    assert len(on) >= 12 and on == off == resumed, (on, off, resumed)
    for k in w_on:
        assert np.array_equal(w_on[k], w_off[k]) and np.array_equal(w_on[k], w_resumed[k]), k


def test_batch_not_divisible_by_ranks_is_a_clear_error(tmp_path, text_file):
    r = run(4, tmp_path, text_file, "--max_iters", "2", "--batch_size", "6")
    assert r.returncode != 0
    assert "batch_size" in r.stderr and "Traceback" not in r.stderr


def test_non_finite_loss_stops_every_rank_and_keeps_checkpoint(tmp_path, text_file):
    r = run(2, tmp_path, text_file, "--max_iters", "6")
    assert r.returncode == 0, r.stderr
    before = (tmp_path / "ckpt.npz").read_bytes()
    r = run(2, tmp_path, text_file, "--max_iters", "12", "--resume", "--learning_rate", "1e30")
    assert r.returncode != 0
    assert "non-finite" in (r.stderr + r.stdout).lower()
    assert (tmp_path / "ckpt.npz").read_bytes() == before


def test_a_file_error_on_rank_0_ends_every_rank(tmp_path, text_file):
    """rank 0 alone writes out_dir: its OSError goes through dist.abort, so the other rank is
    not left waiting in its next collective."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    r = run(2, blocker, text_file, "--max_iters", "4", timeout=120)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    lines = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "rank 0: error: " in lines[0] and str(blocker) in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def run_mpmd(out_dir, text_file, rank1_args=(), rank1_env=(), *extra, timeout=120):
    """Two ranks, rank 1 with its own extra arguments and environment (mpirun's MPMD form).
    Run in its own process group, all of it killed when it outlives the timeout (a rank left
    waiting in a collective would spin on, so the test fails with what it said by then)."""
    cmd = [sys.executable, str(TRAIN), "--data", str(text_file), "--out_dir", str(out_dir), *TINY,
           "--max_iters", "4", *extra]
    env_args = [a for k, v in rank1_env for a in ("-env", k, v)]
    from test_distributed import run as run_in_group
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    argv = [MPIRUN, "-n", "1", *cmd, ":", "-n", "1", *env_args, *cmd, *rank1_args]
    code, out, err, _ = run_in_group(argv, env=env, timeout=timeout)
    return subprocess.CompletedProcess(argv, code, out, err)


def error_lines(r):
    assert "Traceback" not in r.stderr, r.stderr
    return [line for line in r.stderr.splitlines() if "error:" in line]


def test_ranks_that_disagree_are_named_before_the_first_broadcast(tmp_path, text_file):
    other = tmp_path / "other.txt"
    other.write_text(text_file.read_text(encoding="utf-8") + "@", encoding="utf-8")
    # the run-time settings are config fields, compared with the rest of the config
    cases = [(("--bucket_mb", "5"), ["rank 1 has --bucket_mb=5.0 (rank 0: 0.0)"]),
             (("--overlap", "0"), ["--overlap=False (rank 0: True)"]),
             (("--threads_per_rank", "1"), ["--threads_per_rank=1 (rank 0: 0)"]),
             # (rank 0 tokenizes the text once into out_dir/tokens; every rank reads those)
             (("--data", str(other)), [f"--data='{other}'"]),
             (("--n_embd", "32"), ["--n_embd=32 (rank 0: 16)"])]
    for args, needles in cases:
        r = run_mpmd(tmp_path / "o", text_file, args)
        lines = error_lines(r)
        assert r.returncode == 1 and len(lines) == 1, r.stderr[-2000:]
        assert lines[0].startswith("error: rank 1 has ") and "same environment" in lines[0]
        for needle in needles:
            assert needle in lines[0], lines[0]
        assert not (tmp_path / "o" / "ckpt.npz").exists()


def test_an_error_on_one_rank_reaches_the_user_from_that_rank(tmp_path, text_file):
    # a bad run-time setting on one rank: a config error (exit 2), said once, by that rank
    r = run_mpmd(tmp_path / "o", text_file, ("--threads_per_rank", "-1"))
    assert r.returncode == 2 and error_lines(r) == [
        "rank 1: error: threads_per_rank must be 0 (automatic) to 4096, got -1"], r.stderr
    r = run_mpmd(tmp_path / "o", text_file, ("--bucket_mb", "-1"))
    assert r.returncode == 2 and error_lines(r) == [
        "rank 1: error: bucket_mb must be a size in MB, 0 (the default) to 1e6, got -1.0"], r.stderr
    (tmp_path / "missing").mkdir()
    r = run_mpmd(tmp_path / "o", text_file, ("--data", str(tmp_path / "missing" / "t.txt")))
    lines = error_lines(r)
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("rank 1: error: "), r.stderr
    assert "t.txt" in lines[0]


def test_a_bad_command_line_on_one_rank_reaches_the_user_from_that_rank(tmp_path, text_file):
    """A value that does not parse (--overlap maybe, a bool) on rank 1 alone: one line, named,
    as for a value that parses but is out of range (above)."""
    r = run_mpmd(tmp_path / "o", text_file, ("--overlap", "maybe"), timeout=30)
    assert r.returncode == 2 and error_lines(r) == [
        "rank 1: error: --overlap: 'maybe' is not a bool (expected true, false, 1 or 0)"], r.stderr


def test_a_bad_setting_on_every_rank_is_one_line_from_rank_0(tmp_path, text_file):
    """A bad run-time setting on every rank (the same command line): one config error line,
    said once (by rank 0), no traceback."""
    r = run(2, tmp_path, text_file, "--max_iters", "2", "--dist_backend", "gloo", timeout=60)
    assert r.returncode == 2 and error_lines(r) == [
        "error: dist_backend must be 'mpi' or 'nccl', got 'gloo'"], r.stderr
    assert not (tmp_path / "ckpt.npz").exists()


def test_a_signal_to_one_rank_stops_every_rank_with_a_checkpoint(tmp_path, text_file):
    cmd = [MPIRUN, "-n", "2", sys.executable, str(TRAIN), "--data", str(text_file), "--out_dir",
           str(tmp_path), *TINY, "--max_iters", "100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        for line in proc.stdout:
            if line.startswith("step 6: train loss"):
                break
        rank1 = [pid for pid in os.listdir("/proc") if pid.isdigit() and _is_rank(pid, str(tmp_path), 1)]
        assert len(rank1) == 1
        os.kill(int(rank1[0]), signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143 and "Traceback" not in err, err[-2000:]
    step = int(re.search(r"^stopped by SIGTERM at step (\d+): wrote", out, re.M)[1])
    meta = json.loads(str(np.load(tmp_path / "ckpt.npz", allow_pickle=False)["meta"]))
    assert meta["step"] == step >= 7
    assert sorted(os.listdir(tmp_path)) == ["best.npz", "ckpt.npz", "loss.png", "metrics.jsonl", "tokens"]


def _is_rank(pid, out_dir, rank):
    """Process `pid` is train.py's rank `rank` writing to out_dir."""
    try:
        cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    except OSError:
        return False
    return (out_dir.encode() in cmdline and str(TRAIN).encode() in cmdline
            and f"PMI_RANK={rank}".encode() in environ)


# ----- ranks that stop answering: the collective timeout (tinytensor/watchdog.py) ---------------

class Job:
    """mpirun -n 2 train.py in its own session, stopped at `step N: train loss` of rank 0's
    output; every process of it is ended when the test ends (a stopped one too)."""

    def __init__(self, out_dir, text_file, *extra, until="step 6: train loss"):
        cmd = [MPIRUN, "-n", "2", sys.executable, str(TRAIN), "--data", str(text_file),
               "--out_dir", str(out_dir), *TINY, "--max_iters", "100000", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                                     start_new_session=True)
        self.pids = []
        for line in self.proc.stdout:
            if line.startswith("config:") and not self.pids:  # the ranks run by now
                self.pids = [int(next(p for p in os.listdir("/proc")
                                      if p.isdigit() and _is_rank(p, str(out_dir), r)))
                             for r in (0, 1)]
            if line.startswith(until):
                break

    def finish(self, timeout=60):
        """(exit status, stdout, stderr, seconds it took)."""
        start = time.monotonic()
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err, time.monotonic() - start

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for pid in self.pids:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.communicate()


def the_error_line(err):
    lines = [x for x in err.splitlines() if "error:" in x]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def saved_step(out_dir):
    return json.loads(str(np.load(Path(out_dir) / "ckpt.npz", allow_pickle=False)["meta"]))["step"]


@pytest.mark.parametrize("silent", [1, 0])
def test_a_stopped_rank_ends_the_job_after_the_collective_timeout(silent, tmp_path, text_file):
    """kill -STOP of one rank: the other waits --collective_timeout 3 s in its next collective,
    then ends the job with one line naming the stopped rank, and says where the checkpoint
    stands, checked against the file (rank 1 cannot know whether rank 0, stopped, finished
    writing the one it was writing: it names both)."""
    with Job(tmp_path, text_file, "--collective_timeout", "3") as job:
        os.kill(job.pids[silent], signal.SIGSTOP)
        code, out, err, seconds = job.finish()
    line, other = the_error_line(err), 1 - silent
    m = re.fullmatch(rf"error: rank {other} waited [34] s for the other ranks in "
                     rf"(the gradient allreduce|an allreduce) in step (\d+): rank {silent} has not "
                     rf"run for \d+ s \(its process is stopped\); ending the job \(collective "
                     rf"timeout 3 s\); (\S+) (\(step (\d+)\) is intact: continue with --resume|"
                     rf"holds step (\d+) if rank 0 finished writing it, else step (\d+))", line)
    assert code == 1 and m and seconds < 30, (code, seconds, line)
    assert m[3] == str(tmp_path / "ckpt.npz")
    assert saved_step(tmp_path) in ({int(m[5])} if m[5] else {int(m[6]), int(m[7])}), line


def test_a_signal_ends_a_job_that_waits_for_a_stopped_rank(tmp_path, text_file):
    """kill -STOP of rank 1, then SIGTERM to mpirun (the default 600 s timeout): rank 0, stuck
    in a collective, cannot reach the step boundary where it would stop; the job ends within
    seconds, exit 143, one line, the checkpoint named (checked against the file)."""
    with Job(tmp_path, text_file) as job:
        os.kill(job.pids[1], signal.SIGSTOP)
        time.sleep(4)  # rank 0 waits for rank 1, which has not run for more than 3 s
        os.kill(job.proc.pid, signal.SIGTERM)
        code, out, err, seconds = job.finish()
    line = the_error_line(err)
    m = re.fullmatch(r"error: interrupted by SIGTERM while rank 0 waited for the other ranks in "
                     r"(the gradient allreduce|an allreduce) in step (\d+): rank 1 has not run for "
                     r"\d+ s \(its process is stopped\); (\S+) \(step (\d+)\) is intact: "
                     r"continue with --resume", line)
    assert code == 143 and m and seconds < 10, (code, seconds, line)
    assert m[3] == str(tmp_path / "ckpt.npz") and int(m[4]) == saved_step(tmp_path)
    assert "stopped by SIGTERM" not in out


def test_a_run_longer_than_the_collective_timeout_is_not_ended(tmp_path, text_file):
    """--collective_timeout 2 on a run of 120 steps and 21 evaluations, which takes longer
    than that: the ranks keep meeting, so nothing ends it."""
    start = time.monotonic()
    r = run(2, tmp_path, text_file, "--max_iters", "120", "--collective_timeout", "2")
    assert r.returncode == 0 and "error:" not in r.stderr, r.stderr[-2000:]
    assert time.monotonic() - start > 2 and saved_step(tmp_path) == 120


def test_a_killed_rank_is_never_reported_as_a_clean_stop(tmp_path, text_file):
    """kill -9 of rank 1 at moments spread over the steps, ten times. mpirun ends the job: it
    kills the other rank at once (exit 9, its BAD TERMINATION banner on stdout), or rank 0 says
    first that rank 1 died (exit 1), or, when rank 0 was reading rank 1's memory at that moment
    (MPICH's single-copy transfer), MPICH ends rank 0 itself: its own "Fatal error ...
    process_vm_readv failed (errno 3)" and exit 143 (0x80 | MPI_ERR_OTHER), which no code of
    this project runs; see docs/distributed.md. Never the clean stop: no "stopped by" line, and
    143 only with MPICH's words."""
    for i in range(10):
        with Job(tmp_path / str(i), text_file) as job:
            time.sleep(0.05 * i)
            os.kill(job.pids[1], signal.SIGKILL)
            code, out, err, seconds = job.finish()
        said = [x for x in err.splitlines() if "error:" in x]
        assert code in (1, 9, 143) and seconds < 30, (i, code, err[-2000:])
        assert "stopped by" not in out and "Traceback" not in err, (i, out[-2000:], err[-2000:])
        assert said == [] or len(said) == 1 and said[0].startswith("error: rank 1 died"), said
        if code == 9:
            assert "KILLED BY SIGNAL: 9" in out or "Killed (signal 9)" in out, out[-2000:]
        if code == 143:
            assert "process_vm_readv failed (errno 3)" in err and not said, err[-2000:]


# ----- gradient accumulation: the number of processes and micro-batches never changes the run --

def weights(out):
    with np.load(Path(out) / "ckpt.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files if k != "meta"}


@pytest.mark.parametrize("dropout", ["0", "0.2"])
def test_accumulation_and_ranks_train_the_same_model(dropout, tmp_path, text_file):
    """K=4 micro-batches in one process, K=1 on 4 ranks and K=2 on 2 ranks: the same per-step
    losses and final weights, to float32 rounding (the sums run in another order). With
    dropout too: a micro-batch's masks come from its place in the global batch, so the same
    rows get the same masks whenever K x ranks is the same."""
    runs = {}
    for k, n in [(4, 1), (1, 4), (2, 2)]:
        out = tmp_path / f"k{k}n{n}"
        r = run(n, out, text_file, "--max_iters", "12", "--batch_size", "8", "--dropout", dropout,
                "--grad_clip", "0.05",
                "--gradient_accumulation_steps", str(k))
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"batch: 8 rows per optimizer step = {k} micro-batch(es) x {n} rank(s) x 2 rows" \
            in r.stdout, r.stdout[:3000]
        runs[(k, n)] = (losses(out), weights(out))
    (ref_losses, ref_w) = runs[(4, 1)]
    assert len(ref_losses) >= 12
    for key, (got_losses, got_w) in runs.items():
        assert sorted(got_losses) == sorted(ref_losses), key
        worst = max(abs(got_losses[s] - ref_losses[s]) for s in ref_losses)
        assert worst <= 2e-6 * max(ref_losses.values()), (key, worst)
        for name in ref_w:
            np.testing.assert_allclose(got_w[name], ref_w[name], rtol=1e-5, atol=1e-6,
                                       err_msg=f"{key} {name}")


@pytest.mark.parametrize("overlap", ["0", "1"])
def test_accumulating_micro_batches_send_nothing_before_the_last(overlap):
    """Counted MPI calls around train.py's micro-batch loop (tests/mpi/check_accumulation.py):
    none during the first K-1 micro-batches, with and without the overlapped reducer."""
    p = subprocess.run([MPIRUN, "-n", "2", sys.executable,
                        str(ROOT / "tests" / "mpi" / "check_accumulation.py"), "--overlap", overlap],
                       capture_output=True, text=True, timeout=240,
                       env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert p.returncode == 0 and "OK" in p.stdout, (p.stdout[-3000:], p.stderr[-3000:])
    assert "no MPI call before the last micro-batch" in p.stdout


# ----- settings that go wrong under mpirun, signals during start-up: one line, once ----------

def test_settings_that_fail_under_mpirun_are_one_line_naming_the_setting(tmp_path, text_file):
    """The NCCL backend without a GPU: on every rank, one line from rank 0 (exit 2); on one
    rank, one line named with that rank. Never a traceback or "this is a bug"."""
    r = run(2, tmp_path / "a", text_file, "--max_iters", "2", "--dist_backend", "nccl", "--device", "auto")
    assert r.returncode == 2, r.stderr[-2000:]
    assert error_lines(r) == ["error: dist_backend 'nccl' sums gradients GPU to GPU, but this "
                              "rank's device is cpu (--device auto): use --dist_backend mpi, or "
                              "--device cuda with CuPy and a GPU on every rank"], r.stderr[-2000:]
    r = run_mpmd(tmp_path / "b", text_file, ("--dist_backend", "nccl"))
    assert r.returncode == 2 and len(error_lines(r)) == 1, r.stderr[-2000:]
    assert error_lines(r)[0].startswith("rank 1: error: dist_backend 'nccl' sums gradients")
    assert "this is a bug" not in r.stderr


def test_a_signal_during_start_up_is_one_line(tmp_path):
    """SIGTERM to mpirun while rank 0 tokenizes the text (the other rank waits for it in a
    collective): one `error:` line, exit 143, no temporary file left."""
    big = tmp_path / "big.txt"
    line = "First Citizen: before we proceed any further, hear me speak. 0123456789\n"
    big.write_text(line * 1_000_000, encoding="utf-8")  # 72 MB: seconds of tokenizing
    out = tmp_path / "o"
    cmd = [MPIRUN, "-n", "2", sys.executable, str(TRAIN), "--data", str(big), "--out_dir", str(out),
           *TINY, "--max_iters", "4"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        for _ in range(600):  # until rank 0 has started writing the token files
            if (out / "tokens").is_dir() and any(n.endswith(".tmp") for n in os.listdir(out / "tokens")):
                break
            time.sleep(0.05)
        else:
            raise AssertionError("rank 0 never started tokenizing")
        p.send_signal(signal.SIGTERM)
        stdout, stderr = p.communicate(timeout=60)
    finally:
        p.kill()
    r = subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr)
    assert r.returncode == 143, stderr[-2000:]
    assert error_lines(r) == ["rank 0: error: interrupted by SIGTERM before this run wrote a "
                              "checkpoint"], stderr[-2000:]
    assert not [n for n in os.listdir(out / "tokens") if n.endswith(".tmp")]


def test_a_signal_during_a_long_evaluation_stops_every_rank_between_batches(tmp_path, text_file):
    """SIGTERM to mpirun while 2 ranks evaluate 20,000 batches: every rank stops after the
    round in hand, rank 0 writes the checkpoint and says so once (exit 143, seconds later)."""
    from test_guard import sigterm_during_evaluation
    out = tmp_path / "o"
    code, stdout, stderr, waited = sigterm_during_evaluation(
        [MPIRUN, "-n", "2", sys.executable, str(TRAIN), "--data", str(text_file), "--out_dir",
         str(out), *TINY, "--max_iters", "4", "--eval_interval", "2", "--eval_iters", "20000"])
    assert code == 143, stderr[-2000:]
    assert waited < 8, waited
    assert stdout.count("stopped by SIGTERM during the evaluation at step 0") == 1, stdout[-2000:]
    assert "error:" not in stderr, stderr[-2000:]
    assert (out / "ckpt.npz").exists()
