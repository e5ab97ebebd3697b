"""Hostile input, round 2 (train/guard.py and the readers in train/checkpoint.py): two runs on
one out_dir, SIGTERM/SIGINT, temporary files, damaged checkpoints and metrics, a model too big
for the machine, and the advice of the messages. train.py and sample.py run as subprocesses."""
import json
import os
import re
import resource
import select
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from test_train import TINY, TRAIN, assert_one_line_error, run_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "train", "sample.py")
OUTPUTS = ["best.npz", "ckpt.npz", "loss.png", "metrics.jsonl", "tokens"]
LONG = [*TINY, "--max_iters", 100000, "--eval_interval", 5, "--log_interval", 1]

from train import guard  # noqa: E402
from train.checkpoint import (atomic_write, load_checkpoint,  # noqa: E402
                              load_npz, save_npz_atomic)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text_file):
    """A 4-step run; tests copy its out_dir before damaging it."""
    out = tmp_path_factory.mktemp("run") / "out"
    p = run_train(*TINY, "--data", text_file, "--out_dir", out, "--max_iters", 4,
                  "--eval_interval", 2, "--log_interval", 1)
    assert p.returncode == 0, p.stderr
    return out


def copy_of(trained, tmp_path):
    import shutil
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    return out


def start(script, *args):
    return subprocess.Popen([sys.executable, script, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(proc, pattern, timeout=60):
    """Read proc's stdout until a line matches `pattern`; returns the lines read."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
        line = proc.stdout.readline() if ready else ""
        if not line:
            break
        lines.append(line)
        if re.search(pattern, line):
            return lines
    proc.kill()
    raise AssertionError(f"no line matching {pattern!r} in {lines[-5:]}: {proc.stderr.read()}")


def finish(proc, timeout=60):
    out, err = proc.communicate(timeout=timeout)
    assert "Traceback" not in err, err
    return out, err


# ----- 1. one run per out_dir ---------------------------------------------------------------

def test_a_second_run_on_the_same_out_dir_is_refused_and_a_dead_runs_lock_taken_over(
        tmp_path, text_file):
    out = tmp_path / "out"
    first = start(TRAIN, *LONG, "--data", text_file, "--out_dir", out)
    try:
        wait_for(first, r"^step 5: train loss")
        second = run_train(*TINY, "--data", text_file, "--out_dir", out, "--max_iters", 2)
        assert_one_line_error(second, 1, "in use by another train.py run", f"pid {first.pid} ",
                              socket.gethostname(), "since ", "--out_dir")
        resumed = run_train("--out_dir", out, "--resume", "--max_iters", 200000)
        assert_one_line_error(resumed, 1, "in use by another train.py run")
        # sample.py reads without the lock
        p = subprocess.run([sys.executable, SAMPLE, "--out_dir", str(out), "--max_new_tokens", "5"],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and len(p.stdout) == 7, p.stderr
    finally:
        first.send_signal(signal.SIGTERM)
    finish(first)
    assert first.returncode == 143
    assert sorted(os.listdir(out)) == OUTPUTS  # the lock file went with the run

    # a run killed outright leaves its lock file and temporary files: the next run takes over
    (out / ".train.lock").write_text("pid 999999 on elsewhere since 2020-01-01 00:00:00 UTC\n")
    stale = [".ckpt.npz.k3j_x9ab.tmp", ".best.npz.a1b2c3d4.tmp", "loss.png.tmp",
             ".metrics.jsonl.zz11yy22.tmp"]
    for name in stale + [".notes.tmp", "ckpt.npz.bak"]:  # the last two are not ours: kept
        (out / name).write_bytes(b"x" * 100)
    p = run_train(*TINY, "--data", text_file, "--out_dir", out, "--max_iters", 2)
    assert p.returncode == 0, p.stderr
    assert sorted(os.listdir(out)) == sorted(OUTPUTS + [".notes.tmp", "ckpt.npz.bak"])


def test_lock_is_exclusive_within_one_process_too(tmp_path):
    a = guard.OutDirLock(str(tmp_path / "o")).acquire()
    with pytest.raises(guard.LockError, match=rf"pid {os.getpid()} on "):
        guard.OutDirLock(str(tmp_path / "o")).acquire()
    a.release()
    assert not os.path.exists(a.path)
    guard.OutDirLock(str(tmp_path / "o")).acquire().release()
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="--out_dir is a file"):
        guard.OutDirLock(str(tmp_path / "file")).acquire()


# ----- 2. signals and temporary files -------------------------------------------------------

@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_at_a_step_boundary_with_a_checkpoint(tmp_path, text_file, sig, code):
    out = tmp_path / "out"
    proc = start(TRAIN, *LONG, "--data", text_file, "--out_dir", out)
    wait_for(proc, r"^iter 7:")
    proc.send_signal(sig)
    stdout, stderr = finish(proc)
    assert proc.returncode == code, stderr
    # a fast run may be in the evaluation at step 10 when the signal lands: a boundary too
    m = re.search(rf"^stopped by {signal.Signals(sig).name} (?:during the evaluation )?at step "
                  rf"(\d+): wrote .*ckpt\.npz; continue with --resume$", stdout, re.M)
    assert m, stdout[-500:]
    step = int(m[1])
    assert step >= 8 and load_checkpoint(out / "ckpt.npz")[0]["step"] == step
    assert sorted(os.listdir(out)) == OUTPUTS  # no temporary file, no lock file
    if sig == signal.SIGTERM:  # and the run goes on from there
        p = run_train("--out_dir", out, "--resume", "--max_iters", step + 2)
        assert p.returncode == 0, p.stderr
        assert f"resuming from {out / 'ckpt.npz'} at step {step}" in p.stdout


def test_an_interrupt_before_the_first_checkpoint_claims_none(monkeypatch, capsys):
    """Ctrl-C in setup (before the loop arms the stop): exit 130 and no word of an intact
    checkpoint; the handlers in place before main() are back afterwards."""
    import train.train as T

    def interrupted(argv, stop):
        assert signal.getsignal(signal.SIGTERM) == stop._handler
        raise guard.Interrupted(signal.SIGINT)
    monkeypatch.setattr(T, "run", interrupted)
    before = signal.getsignal(signal.SIGTERM)
    assert T.main(["--out_dir", "x"]) == 130
    err = capsys.readouterr().err
    assert err == "error: interrupted by SIGINT before this run wrote a checkpoint\n"
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_checkpoint_rank_0_writes_is_claimed_by_another_rank_once_the_ranks_met():
    """Under MPI rank 0 writes the checkpoints; another rank that must say where they stand
    (the collective timeout, a second signal) vouches for one only after the next per-step
    collective (stop.agree), else names both."""
    stop = guard.StopSignals()
    stop.writing = ("out/ckpt.npz", 6)
    assert stop.describe("x") == "x; out/ckpt.npz holds step 6 if rank 0 finished writing it, else none"
    stop.agree([0.0, 0.0])
    assert stop.describe("x") == "x; out/ckpt.npz (step 6) is intact: continue with --resume"
    stop.writing = ("out/ckpt.npz", 12)
    assert stop.describe("x") == ("x; out/ckpt.npz holds step 12 if rank 0 finished writing it, "
                                  "else step 6")


def test_only_a_bug_prints_a_traceback_and_asks_for_a_report(monkeypatch, capsys):
    import train.train as T
    for error, code, expected in ((ZeroDivisionError("oops"), 1, None),
                                  (MemoryError(), 1, "error: out of memory (MemoryError); use a "
                                   "smaller --n_embd, --n_layer, --batch_size or --block_size"),
                                  (PermissionError(13, "Permission denied", "out/loss.png"), 1,
                                   "error: out/loss.png: Permission denied")):
        def fails(argv, stop, error=error):
            raise error
        monkeypatch.setattr(T, "run", fails)
        assert T.main([]) == code
        err = capsys.readouterr().err
        if expected is None:
            assert err.startswith("Traceback") and "ZeroDivisionError: oops" in err
            assert err.splitlines()[-1] == "error: " + guard.REPORT
        else:
            assert err == expected + "\n"


def test_atomic_write_leaves_no_temporary_file_and_names_the_real_file(tmp_path):
    path = tmp_path / "ckpt.npz"
    path.write_bytes(b"old")

    def interrupted(f):
        f.write(b"half")
        raise KeyboardInterrupt

    def disk_full(f):
        raise OSError(28, "No space left on device")
    for write, error in ((interrupted, KeyboardInterrupt), (disk_full, OSError)):
        with pytest.raises(error) as e:
            atomic_write(path, write)
        assert os.listdir(tmp_path) == ["ckpt.npz"] and path.read_bytes() == b"old"
    assert e.value.filename == str(path) and "No space left on device" in str(e.value)
    folder = tmp_path / "best.npz"
    folder.mkdir()  # a directory where the file should be
    with pytest.raises(IsADirectoryError) as e:
        atomic_write(folder, lambda f: f.write(b"new"))
    assert e.value.filename == str(folder)
    assert sorted(os.listdir(tmp_path)) == ["best.npz", "ckpt.npz"]


def test_a_directory_in_place_of_the_checkpoint_is_named(tmp_path, text_file):
    out = tmp_path / "out"
    (out / "ckpt.npz").mkdir(parents=True)
    p = run_train(*TINY, "--data", text_file, "--out_dir", out, "--max_iters", 2)
    assert_one_line_error(p, 1, f"{out / 'ckpt.npz'}: cannot write it (Is a directory)")
    assert ".tmp" not in p.stderr and not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_sample_ends_quietly_on_ctrl_c_and_a_closed_pipe(trained):
    args = ["--out_dir", trained, "--max_new_tokens", 50, "--num_samples", 100000]
    proc = start(SAMPLE, *args)
    wait_for(proc, "^-{40}$")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err == "", err
    proc = start(SAMPLE, *args)  # as `sample.py | head -1`
    wait_for(proc, "^-{40}$")
    proc.stdout.close()
    proc.wait(timeout=60)
    err = proc.stderr.read()
    assert proc.returncode == 141 and err == "", err


# ----- 3. damaged checkpoints and metrics ---------------------------------------------------

def rewrite_meta(ckpt, change):
    arrays = load_npz(str(ckpt))
    meta = json.loads(str(arrays["meta"]))
    change(meta)
    save_npz_atomic(str(ckpt), {**arrays, "meta": np.array(json.dumps(meta))})


@pytest.mark.parametrize("change, needles", [
    (lambda m: m.update(tokenizer="{not json"), ["'tokenizer' is unusable", "not a tokenizer JSON"]),
    (lambda m: m.update(tokenizer=json.dumps({"type": "bpe", "merges": []})),
     ["'tokenizer' is unusable", "not a BPE tokenizer"]),
    (lambda m: m.update(tokenizer=json.dumps({"type": "char", "chars": "abc"})),
     ["'tokenizer' is unusable", "not a character tokenizer"]),
    (lambda m: m.update(tokenizer=5), ["'tokenizer' should be a JSON string, got 5"]),
    (lambda m: m.update(step="4"), ["'step' should be a non-negative integer", '"4"']),
    (lambda m: m.update(step=-1), ["'step' should be a non-negative integer", "-1"]),
    (lambda m: m.update(step=2.5), ["'step' should be a non-negative integer", "2.5"]),
    (lambda m: m["config"].pop("n_embd"), ["saved config lacks the fields ['n_embd']"]),
    (lambda m: m["config"].update(n_embd="16"), ["field n_embd should be a int", '"16"']),
    (lambda m: m["config"].update(n_layer=0), ["n_layer must be a positive integer"]),
    (lambda m: m.update(val_loss="low"), ["'val_loss' should be a number or null"]),
    (lambda m: m.update(optimizer=[1]), ["'optimizer' should be an object"]),
])
def test_resume_from_a_checkpoint_with_damaged_meta(tmp_path, trained, change, needles):
    out = copy_of(trained, tmp_path)
    rewrite_meta(out / "ckpt.npz", change)
    before = (out / "ckpt.npz").read_bytes(), (out / "metrics.jsonl").read_bytes()
    p = run_train("--out_dir", out, "--resume", "--max_iters", 8)
    assert_one_line_error(p, 1, str(out / "ckpt.npz"), *needles)
    assert ((out / "ckpt.npz").read_bytes(), (out / "metrics.jsonl").read_bytes()) == before
    if "lacks" in needles[0] or "tokenizer' is" in needles[0]:  # sample.py alike
        p = subprocess.run([sys.executable, SAMPLE, "--out_dir", str(out)], capture_output=True,
                           text=True, timeout=60)
        assert_one_line_error(p, 1, str(out / "ckpt.npz"))


@pytest.mark.parametrize("line, needle", [
    ("5", "should be an object with step"),
    ('{"loss": 1.0, "lr": 0.001}', "should be an object with step"),
    ('{"step": -3, "loss": 1.0}', "step (an integer >= 0)"),
    ('{"step": 1, "loss": "low"}', "loss"),
    ('{"step": 2, "train_loss": 1.0}', "val_loss"),
    ("{half a line", "is not JSON"),
])
def test_resume_with_a_damaged_metrics_line(tmp_path, trained, line, needle):
    out = copy_of(trained, tmp_path)
    path = out / "metrics.jsonl"
    rows = path.read_text().splitlines()
    rows.insert(2, line)
    path.write_text("\n".join(rows) + "\n")
    p = run_train("--out_dir", out, "--resume", "--max_iters", 8)
    assert_one_line_error(p, 1, f"{path} line 3", needle, "fix or delete that line")
    assert path.read_text() == "\n".join(rows) + "\n"


# ----- 4. memory ----------------------------------------------------------------------------

def test_a_model_too_big_for_the_machine_is_refused_before_allocating(tmp_path, text_file):
    t = time.perf_counter()
    p = run_train("--data", text_file, "--out_dir", tmp_path / "o", "--n_embd", 65536,
                  "--n_layer", 48, "--device", "cpu")
    vocab = len(set(open(text_file, encoding="utf-8").read()))
    params = guard.count_parameters(vocab, 64, 65536, 48)  # the real model's (tested below)
    assert_one_line_error(p, 1, "the model needs about", "TiB", f"{params:,} parameters x 4 bytes x 4",
                          "is available (MemAvailable)", "--n_embd")
    assert time.perf_counter() - t < 20
    assert not os.path.exists(tmp_path / "o" / "ckpt.npz")


def test_ulimit_v_is_the_limit_when_lower(tmp_path, text_file):
    limit = 2 << 30

    def ulimit():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # ~200 M parameters: 3.2 GB for weights, gradients and moments
    args = [TRAIN, "--data", text_file, "--out_dir", tmp_path / "o", "--n_embd", 2048,
            "--n_layer", 4, "--device", "cpu"]
    p = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                       timeout=60, preexec_fn=ulimit)
    assert_one_line_error(p, 1, "the model needs about", f"ulimit -v {limit >> 10} KiB")


def test_the_parameter_count_is_the_models():
    from gpt.model import GPTConfig, build_model
    for V, T, C, nh, L in ((65, 8, 16, 2, 1), (40, 32, 48, 4, 3)):
        model = build_model("gpt", GPTConfig(vocab_size=V, block_size=T, n_embd=C, n_head=nh,
                                             n_layer=L))
        assert guard.count_parameters(V, T, C, L) == model.num_parameters()
        needed, formula = guard.estimate_memory(V, T, C, nh, L, batch_size=4)
        assert needed > 16 * model.num_parameters() and f"{model.num_parameters():,}" in formula


# ----- 5. what the messages advise ----------------------------------------------------------

def test_divergence_advice_names_what_is_not_set_yet(tmp_path, text_file):
    common = [*TINY, "--data", text_file, "--max_iters", 4, "--eval_interval", 2]
    p = run_train(*common, "--out_dir", tmp_path / "a", "--learning_rate", "1e30",
                  "--grad_clip", "1.0")
    assert_one_line_error(p, 1, "non-finite", "--learning_rate (now 1e+30)",
                          "a lower --grad_clip (now 1)")
    assert "--grad_clip 1.0" not in p.stderr
    p = run_train(*common, "--out_dir", tmp_path / "b", "--learning_rate", "1e30")
    assert_one_line_error(p, 1, "non-finite", "or --grad_clip 1.0")


@pytest.mark.parametrize("rank", [0, 1])
def test_a_signal_before_training_is_said_once_under_mpi(monkeypatch, rank):
    """A stop signal before the loop reaches every rank (mpirun forwards it): rank 0 says it
    and ends the job at once; another rank first waits SIGNAL_GRACE_S (rank 0's abort ends it
    meanwhile), and speaks only if it is still alive - the signal was its own."""
    from tinytensor import distributed as dist
    events = []
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "is_main", lambda: rank == 0)
    monkeypatch.setattr(guard.time, "sleep", lambda s: events.append(("sleep", s)))
    monkeypatch.setattr(dist, "abort", lambda line, code: events.append(("abort", line, code)))

    def body():
        raise guard.Interrupted(signal.SIGTERM)
    assert guard.boundary(body, []) == 143
    said = ("abort", "error: interrupted by SIGTERM", 143)
    assert events == ([said] if rank == 0 else [("sleep", guard.SIGNAL_GRACE_S), said])
    assert guard.SIGNAL_GRACE_S > dist.ABORT_DRAIN_S


def sigterm_during_evaluation(cmd):
    """Run cmd (train.py, or mpirun of it), send it SIGTERM a second into the evaluation at
    step 0 (after the header's last line); (exit status, stdout, stderr, seconds it then took)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        for line in p.stdout:  # the header's last line: the evaluation at step 0 starts
            if line.startswith("model: "):
                break
        time.sleep(1.0)
        p.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        stdout, stderr = p.communicate(timeout=60)
        return p.returncode, stdout, stderr, time.monotonic() - t0
    finally:
        p.kill()


def test_a_stop_signal_during_a_long_evaluation_ends_it_between_batches(tmp_path, text_file):
    """SIGTERM while evaluating 20,000 batches (a minute or more): the run stops after the
    batch in hand with a checkpoint (exit 143, seconds later); the resume evaluates that step
    again, then trains on."""
    out = tmp_path / "o"
    code, stdout, stderr, waited = sigterm_during_evaluation(
        [sys.executable, TRAIN, *TINY, "--data", text_file, "--out_dir", str(out),
         "--max_iters", "4", "--eval_interval", "2", "--eval_iters", "20000"])
    assert code == 143, stderr
    assert waited < 5, waited
    assert f"stopped by SIGTERM during the evaluation at step 0: wrote {out}/ckpt.npz" in stdout
    meta = load_checkpoint(str(out / "ckpt.npz"))[0]
    assert meta["step"] == 0 and meta["val_loss"] is None
    r = run_train("--out_dir", out, "--resume", "--eval_iters", 2)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^step 0: train loss", r.stdout, re.M), r.stdout  # evaluated again
    assert re.search(r"^step 4: train loss", r.stdout, re.M)


def in_process(monkeypatch, capsys, argv):
    """train.main(argv) in this process: (exit status, stderr)."""
    from train import train as T
    code = T.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_a_full_disk_names_the_file_and_where_the_checkpoint_stands(tmp_path, text_file, monkeypatch, capsys):
    import errno
    from train import report

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()
    rows = []

    def fake_open(path, *args, **kwargs):
        f = open(path, *args, **kwargs)
        rows.append(path)
        return Full(f) if len(rows) > 6 else f  # the disk fills after six rows (steps 0-4, eval)
    monkeypatch.setattr(report, "open", fake_open, raising=False)
    out = tmp_path / "o"
    code, err = in_process(monkeypatch, capsys, [*TINY, "--data", text_file, "--out_dir", out,
                                                 "--max_iters", 20, "--eval_interval", 4,
                                                 "--log_interval", 1])
    assert code == 1
    assert err.strip() == (f"error: {out}/metrics.jsonl: cannot append to it (No space left on "
                           f"device); the last checkpoint {out}/ckpt.npz (step 4) is intact")


def test_out_of_memory_while_tokenizing_names_what_does_not_fit(tmp_path, text_file, monkeypatch, capsys):
    from gpt import token_files

    def no_memory(*args, **kwargs):
        raise MemoryError()
    monkeypatch.setattr(token_files, "encode_file", no_memory)
    code, err = in_process(monkeypatch, capsys, [*TINY, "--data", text_file, "--out_dir",
                                                 tmp_path / "o", "--max_iters", 2])
    assert code == 1
    assert err.strip().startswith(f"error: out of memory while tokenizing {text_file} into "
                                  f"{tmp_path / 'o'}/tokens (it is read in blocks of 16 MB)")
    assert "n_embd" not in err


def test_a_signal_is_acted_on_only_once_the_ranks_agree():
    """The handler records the signal; only agree() (after the collective every rank runs)
    makes it the run's: a signal that lands between the collective and the check must not
    stop one rank while the others go on to the next collective."""
    stop = guard.StopSignals()
    with stop, stop.armed_here():
        agreed = stop.agree([0.0, 0.0])       # the collective: nobody had asked yet
        os.kill(os.getpid(), signal.SIGTERM)  # arrives now, on this rank only
        time.sleep(0.01)
        assert not agreed and stop.signum is None and stop.asked == signal.SIGTERM
        assert stop.flags() == [1.0, 0.0]     # it rides along the next collective
        assert stop.agree([0.5, 0.0]) and stop.signum == signal.SIGTERM and stop.exit_code == 143
        with pytest.raises(guard.Interrupted):  # a second signal: at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
