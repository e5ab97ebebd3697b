"""The benchmark scripts run and compare like with like (one short run each, about 30 s).

These are not speed tests: no timing is asserted, only that each script finishes, reports
what it promises, and that what it compares is the same computation (the same model,
weights and batches give the same losses in tinytensor and PyTorch; the KV cache gives the
same tokens as recomputing and as the same decode written in NumPy, and greedy decoding the
same tokens as PyTorch's KV-cache model).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
MPIRUN = shutil.which("mpirun", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))


def run_json(script, *args, timeout=300):
    p = subprocess.run([sys.executable, str(BENCH / script), *args, "--json"], cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout)


def test_bench_step_compares_the_same_training_step():
    r = run_json("bench_step.py", "--preset", "small", "--iters", "2", "--warmup", "0",
                 "--block", "1", "--lead", "0", "--gap", "0")
    res = r["results"]
    assert set(res) == {"tinytensor", "torch", "torch-fused"}
    tt_losses = res["tinytensor"]["losses"]
    assert len(tt_losses) == 2
    for name in ("torch", "torch-fused"):
        # same weights and batches: the same losses step by step (float32)
        assert res[name]["losses"] == pytest.approx(tt_losses, rel=1e-5)
        assert res[name]["eval_loss"] == pytest.approx(res["tinytensor"]["eval_loss"], rel=1e-5)
    for name, m in res.items():
        assert m["ms_per_step"] > 0 and m["tokens_per_s"] > 0 and m["peak_mb"] > 0, name
        assert 0 < m["mfu"] < 1.5, name
        assert m["calls_per_step"] > 100, name   # a profiled step: at least one call per op
        assert m["tinytensor_ratio"] == pytest.approx(
            res["tinytensor"]["ms_per_step"] / m["ms_per_step"])
    assert r["peak_gflops"] > 0 and r["flops_per_step"] > 0


def test_bench_step_torch_compile_contender_trains_the_same_model():
    """The nanoGPT-style model under torch.compile: the same losses, compile time apart."""
    r = run_json("bench_step.py", "--preset", "small", "--iters", "1", "--warmup", "0",
                 "--block", "1", "--lead", "0", "--gap", "0", "--models", "tinytensor,torch-compile")
    res = r["results"]
    assert set(res) == {"tinytensor", "torch-compile"}
    assert res["torch-compile"]["losses"] == pytest.approx(res["tinytensor"]["losses"], rel=1e-5)
    assert res["torch-compile"]["eval_loss"] == pytest.approx(res["tinytensor"]["eval_loss"], rel=1e-5)
    assert res["torch-compile"]["compile_s"] > 0 and res["tinytensor"]["compile_s"] is None


def test_bench_ops_times_every_op():
    r = run_json("bench_ops.py", "--reps", "1", "--rounds", "1")
    assert len(r["ops"]) == 10
    for name, m in r["ops"].items():
        assert m["tinytensor"] > 0 and m["torch"] > 0, name
        assert m["ratio"] == pytest.approx(m["tinytensor"] / m["torch"]), name


def test_bench_generate_cache_gives_the_same_tokens():
    """The KV cache draws the same tokens as recomputing and as the same decode written in
    NumPy (the floor), and greedy decoding gives the same tokens in tinytensor and in the
    PyTorch KV-cache model with the same weights."""
    r = run_json("bench_generate.py", "--preset", "small", "--batch", "1,8", "--tokens", "8",
                 "--repeat", "1", "--gap", "0")
    batches = r["presets"]["small"]["batches"]
    assert set(batches) == {"1", "8"}
    for b, row in batches.items():
        assert row["batch"] == int(b) and row["tokens"] == 8 and row["checked_tokens"] == 8
        assert row["same_tokens"] is True, b
        assert row["same_tokens_as_torch"] is True, b
        assert row["cache_tokens_per_s"] > 0 and row["recompute_tokens_per_s"] > 0
        assert row["torch_tokens_per_s"] > 0
        assert row["tinytensor_over_torch"] == pytest.approx(
            row["cache_tokens_per_s"] / row["torch_tokens_per_s"])
        assert row["peak_mb"] > 0 and row["torch_peak_mb"] > 0
        assert row["same_tokens_as_numpy"] is True, b
        assert row["numpy_tokens_per_s"] > 0
        assert row["tinytensor_over_numpy"] == pytest.approx(
            row["cache_tokens_per_s"] / row["numpy_tokens_per_s"])
        calls = row["calls_per_position"]
        assert set(calls) == {"tinytensor", "torch", "numpy"}, b
        assert min(calls.values()) > 50, calls   # dozens of ops a position, a call each at least


def test_bench_generate_numpy_floor_is_the_models_decode():
    """bench_generate.py's NumPy floor computes what GPTLanguageModel.generate does: the same
    tokens from the same random stream, after a prompt of several tokens (which the floor runs
    one position at a time, generate in one forward). The weights are random with std 0.3, so
    every token's distribution is peaked: with the lecture's init (std 0.02) all tokens are
    about equally likely and a wrong floor would still draw the same ones."""
    import numpy as np

    import tinytensor as tt
    from gpt.model import GPTConfig, GPTLanguageModel
    sys.path.insert(0, str(BENCH))
    try:
        import bench_generate
    finally:
        sys.path.remove(str(BENCH))
    config = dict(block_size=16, n_embd=32, n_head=4, n_layer=2, dropout=0.0)
    tt.manual_seed(0)
    model = GPTLanguageModel(GPTConfig(vocab_size=65, **config))
    rng = np.random.default_rng(0)
    for p in model.parameters():
        p.data[...] = rng.normal(0.0, 0.3, p.shape)
    prompt = rng.integers(0, 65, (3, 4))
    ours = model.generate(prompt, 12, rng=np.random.default_rng(1))
    floor = bench_generate.numpy_kv_generate(model.state_dict(), config, prompt, 12,
                                             np.random.default_rng(1))
    assert floor.shape == (3, 16) and len(np.unique(floor[:, 4:])) > 5
    assert np.array_equal(floor, ours)


def test_bench_generate_refuses_more_tokens_than_the_torch_cache_holds():
    p = subprocess.run([sys.executable, str(BENCH / "bench_generate.py"), "--preset", "small",
                        "--tokens", "64"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "at most 63 (block_size - 1)" in p.stderr, p.stderr


def test_bench_loop_times_the_library_loop_against_train_py_on_the_same_steps():
    """A loop written with the library directly (benchmarks/library_loop.py) trains what
    train.py trains: the same losses step by step; and both are timed."""
    r = run_json("bench_loop.py", "--steps", "16", "--rounds", "1")
    (got,) = r["rounds"]
    assert set(got) == {"train", "loop", "loop-no-malloc"}
    assert len(got["train"]["losses"]) == 16
    for name in ("loop", "loop-no-malloc"):
        assert got[name]["losses"] == pytest.approx(got["train"]["losses"], rel=1e-5), name
        assert got[name]["faults_per_step"] >= 0
    for name, m in got.items():
        assert m["ms"] > 0, name
        assert r["ratio_to_train"][name] == pytest.approx(m["ms"] / got["train"]["ms"]), name


def test_bench_accumulation_times_train_py_at_each_k():
    p = subprocess.run([sys.executable, str(BENCH / "bench_accumulation.py"), "--preset", "gpt",
                        "--ks", "1,2", "--steps", "3", "--rounds", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    rows = [line.split() for line in p.stdout.splitlines()[2:]]
    assert [r[0] for r in rows] == ["1", "2"], p.stdout
    assert float(rows[0][2]) == 1.0 and all(float(r[1]) > 0 and float(r[3]) > 0 for r in rows)


@pytest.mark.skipif(MPIRUN is None, reason="mpirun not found: pip install -e '.[mpi]'")
def test_bench_allreduce_under_mpirun():
    p = subprocess.run([MPIRUN, "-n", "2", sys.executable, str(BENCH / "bench_allreduce.py"),
                        "--repeats", "2", "--presets", "small", "--steps", "1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    first, second = p.stdout.split("backward + gradient averaging")
    steps = [line.split() for line in second.splitlines() if line.startswith("small ")]
    assert [" ".join(r[2:-2]) for r in steps] == [
        "backward alone", "backward, allreduce_gradients (overlap off)",
        "backward + GradientReducer (on, 4 buckets)"], second
    assert all(float(r[-2]) > 0 for r in steps) and steps[1][-1] == "1.00x"
    rows = [line.split() for line in first.splitlines() if line.startswith("small ")]
    labels = [" ".join(r[3:-3]) for r in rows]
    assert labels == ["raw Allreduce (1 buffer)", "allreduce_gradients, 25 MB buckets",
                      "allreduce_gradients, one buffer", "allreduce_gradients, 4 MB buckets",
                      "allreduce_gradients, AdamW flat buffer"]
    assert all(float(r[-3]) > 0 for r in rows)
    assert rows[0][-2] == "1.00x"


def test_bench_allreduce_refuses_to_run_without_mpi():
    p = subprocess.run([sys.executable, str(BENCH / "bench_allreduce.py")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "mpirun -n 2" in p.stderr


def test_gpu_check_dry_run_runs_every_step_and_writes_everything(tmp_path):
    """benchmarks/gpu_check.py --dry-run: the GPU visit's steps on the cupy stand-in."""
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"),
                        "--dry-run", "--out", str(out)], capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    status = {r["step"]: r["status"] for r in summary["steps"]}
    mpi_ok = "skipped" if shutil.which("mpirun", path=os.path.dirname(sys.executable) + os.pathsep
                                       + os.environ.get("PATH", "")) is None else "ok"
    assert status == {"env": "ok", "ops": "ok", "train": "ok", "bench": "ok", "mpirun": mpi_ok}, p.stdout
    assert (out / "summary.txt").read_text() in p.stdout
    curves = json.loads((out / "3_train_losses.json").read_text())
    assert curves["step"] == list(range(10))
    assert max(abs(a - b) for a, b in zip(curves["tinytensor"], curves["torch"])) < 1e-5
    worst = json.loads((out / "2_worst_errors.json").read_text())
    assert "matmul" in worst and worst["matmul"]["float32"] <= 1e-5
    for name in ("1_env.json", "4_bench_fp32.json", "4_bench_tf32.json"):
        assert (out / name).exists(), name


# what a fresh checkout lacks: the git-ignored folders and files (.gitignore)
UNTRACKED = shutil.ignore_patterns("data", ".git", "__pycache__", "*.pyc", "*.egg-info", ".venv*",
                                   "out*", ".pytest_cache", ".hypothesis", "build", "dist",
                                   "*.npz", "*.png", ".wheels")
NO_NETWORK = {name: "http://127.0.0.1:9" for name in ("http_proxy", "https_proxy", "HTTP_PROXY",
                                                     "HTTPS_PROXY", "all_proxy", "ALL_PROXY")}


def test_gpu_check_dry_run_needs_no_data_folder_and_no_network(tmp_path):
    """A GPU machine has no network and no data/ (git-ignored) unless carried: gpu_check says
    so in its first line, and its steps that train run on a generated text (no download)."""
    repo = tmp_path / "checkout"
    shutil.copytree(ROOT, repo, ignore=UNTRACKED)
    assert not (repo / "data").exists()
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "no_proxy", "NO_PROXY")}
    env.update(NO_NETWORK, PYTHONPATH=str(repo))
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(out),
                        "--steps", "train,mpirun"], cwd=repo, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    first = p.stdout.splitlines()[0]
    assert first.startswith("data: data/tinyshakespeare/input.txt is not here") and \
        'carry: ["data"]' in first, first
    status = {r["step"]: r["status"] for r in json.loads((out / "summary.json").read_text())["steps"]}
    assert status == {"train": "ok", "mpirun": "ok" if MPIRUN else "skipped"}, p.stdout
    logs = "".join(f.read_text() for f in out.glob("*.log"))
    assert "--data" in logs and "download" not in logs
    assert not (repo / "data").exists()
    curves = json.loads((out / "3_train_losses.json").read_text())
    assert max(abs(a - b) for a, b in zip(curves["tinytensor"], curves["torch"])) < 1e-5


def test_gpu_check_generated_text_has_the_corpus_characters():
    sys.path.insert(0, str(BENCH))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(BENCH))
    text = gpu_check.generated_text()
    assert set(text) == set(gpu_check.CORPUS_CHARS) and len(gpu_check.CORPUS_CHARS) == 65
    assert text == gpu_check.generated_text() and len(text) > 100_000
