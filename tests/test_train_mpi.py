"""train.py under mpirun: N ranks train the same model as one process, resume works with a
different number of ranks, and a failure on any rank ends the job (issue: data parallel)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

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


def run(nranks, out_dir, text_file, *extra, timeout=240):
    cmd = [sys.executable, str(TRAIN), "--data", str(text_file), "--out_dir", str(out_dir), *TINY, *extra]
    if nranks > 1:
        cmd = [MPIRUN, "-n", str(nranks)] + cmd
    env = dict(os.environ, PYTHONUNBUFFERED="1")
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
