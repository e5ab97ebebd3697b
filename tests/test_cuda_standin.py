"""The CUDA path end to end on the cupy stand-in (tests/fake_cupy.py), without a GPU.

- the stand-in itself refuses what CuPy refuses and counts every way back to the host;
- a training step of the GPT on device 'cuda' runs the fused kernels (emulated) and matches
  the same step on NumPy, with at most MAX_SYNCS_PER_STEP (3) device-to-host transfers;
- a representative part of the op suite and the whole-model check against PyTorch run on
  'cuda' (a pytest subprocess with TT_FAKE_CUPY=1 TT_DEVICES=cuda);
- train/train.py --device cuda (eval, checkpoint, --resume), train/sample.py and generation
  with the KV cache, and mpirun -n 2 through the GPU staging path, as subprocesses through
  `python tests/fake_cupy.py SCRIPT` (kernels off there: the emulator takes seconds a step).
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import fake_cupy
import tinytensor as tt
from tinytensor import backend
from tinytensor.kernels import _cuda

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE = os.path.join(ROOT, "tests", "fake_cupy.py")
MPIRUN = shutil.which("mpirun", path=os.path.dirname(sys.executable) + os.pathsep
                      + os.environ.get("PATH", ""))

# Per training step on the GPU: the loss read for logging and the index range checks of the
# token embedding and of the cross-entropy targets (see docs/gpu.md).
MAX_SYNCS_PER_STEP = 3


# ----- the stand-in behaves like CuPy where CuPy differs from NumPy ------------------------

def test_implicit_conversion_to_host_is_refused(fake_cuda):
    a = fake_cuda.asarray(np.arange(6.0).reshape(2, 3))
    for convert in (np.asarray, np.array, lambda x: float(x), lambda x: bool(x)):
        with pytest.raises((TypeError, ValueError)):
            convert(a)
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
        np.asarray(a)
    assert not isinstance(a, np.ndarray)
    assert fake_cupy.total_transfers() == 0


def test_host_arrays_in_device_ops_raise(fake_cuda):
    a, h = fake_cuda.asarray(np.ones(3)), np.ones(3)
    for op in (lambda: a + h, lambda: h * a, lambda: fake_cuda.maximum(a, h),
               lambda: fake_cuda.concatenate([a, h]), lambda: fake_cuda.where(a > 0, h, a),
               lambda: a.__setitem__(slice(None), h), lambda: fake_cuda.add(h, h)):
        with pytest.raises(TypeError, match="Unsupported type"):
            op()
    a[...] = 2.0                        # Python and NumPy scalars are fine
    assert (a * np.float32(2)).sum().item() == 12.0


def test_every_way_back_is_counted_and_reductions_stay_on_the_device(fake_cuda):
    a = fake_cuda.asarray(np.arange(4.0))
    m = a.max()
    assert isinstance(m, fake_cuda.ndarray) and m.shape == ()   # not a NumPy scalar
    assert isinstance(np.sum(a), fake_cuda.ndarray)             # NumPy functions dispatch
    assert fake_cupy.total_transfers() == 0
    a.get(), fake_cuda.asnumpy(a), m.item(), float(m), bool(m > 1), a.tolist()
    assert fake_cupy.transfers == {"get": 2, "item": 1, "float()": 1, "bool()": 1, "tolist": 1}


def test_tensors_move_to_cuda_and_back(fake_cuda):
    x = tt.tensor(np.arange(6.0).reshape(2, 3)).to("cuda")
    assert x.device.type == "cuda" and backend.is_cuda(x.data)
    y = (x * 2).sum(1)
    assert y.device.type == "cuda"
    np.testing.assert_array_equal(y.numpy(), [6.0, 24.0])
    assert fake_cupy.transfers["get"] == 1


# ----- one training step on the device: the fused kernels, NumPy's result, few syncs --------

def _step_inputs(dtype):
    from gpt import GPTConfig, GPTLanguageModel
    tt.set_default_dtype(dtype)
    tt.manual_seed(0)
    model = GPTLanguageModel(GPTConfig(vocab_size=11, block_size=8, n_embd=16, n_head=2,
                                       n_layer=1, dropout=0.0))
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 11, (2, 8)), rng.integers(0, 11, (2, 8))
    return model, x, y


def _train_steps(model, x, y, device, steps):
    from tinytensor.optim import AdamW, clip_grad_norm_
    model.to(device)
    opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x, y = backend.to_device(x, device), backend.to_device(y, device)
    losses = []
    for _ in range(steps):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        clip_grad_norm_(list(model.parameters()), 1.0)
        losses.append(loss.item())      # the one read a training loop needs (logging)
        opt.step()
    return losses, {n: backend.to_numpy(p.data) for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_training_step_on_cuda_runs_the_kernels_matches_numpy_and_syncs_little(
        fake_cuda, monkeypatch, dtype):
    launched, function = [], _cuda.KernelFamily.function

    def spy(family, expression):
        launched.append(expression.split("<")[0])
        return function(family, expression)
    monkeypatch.setattr(_cuda.KernelFamily, "function", spy)
    model, x, y = _step_inputs(dtype)
    ref_losses, ref_params = _train_steps(model, x, y, "cpu", 2)
    assert not launched
    model, x, y = _step_inputs(dtype)
    model.to("cuda")
    fake_cupy.reset_counts()
    losses, params = _train_steps(model, x, y, "cuda", 2)
    syncs = fake_cupy.total_transfers() - len(params)          # less the final read-back
    print(f"\ndevice-to-host transfers per training step ({np.dtype(dtype).name}): "
          f"{syncs / 2:g}; where: {dict(fake_cupy.transfer_sites)}")
    # every kernel family: layer_norm, cross_entropy, causal_softmax, bias_relu_dropout, adamw
    families = {"layer_norm_fwd", "layer_norm_bwd_x", "layer_norm_bwd_wb", "cross_entropy_fwd",
                "cross_entropy_bwd", "causal_softmax_fwd", "causal_softmax_bwd",
                "bias_relu_dropout_fwd", "bias_relu_dropout_bwd", "adamw_step"}
    assert families <= set(launched), launched
    tol = 1e-9 if dtype == np.float64 else 1e-4     # test_gpt_vs_torch.py's whole-model bounds
    np.testing.assert_allclose(losses, ref_losses, rtol=tol)
    for name, p in params.items():
        scale = np.abs(ref_params[name]).max()
        assert np.abs(p - ref_params[name]).max() <= tol * scale, name
    assert syncs <= 2 * MAX_SYNCS_PER_STEP, dict(fake_cupy.transfer_sites)


# ----- the op suite and the whole-model check on 'cuda' --------------------------------------

# A representative part of the op suite (every family of test_ops.py, the losses, the
# optimizers) and the whole-model check; about 1.5 min. The rest of the suite runs the same way
# with TT_FAKE_CUPY=1 TT_DEVICES=cuda (1882 tests, about 7 min, most of it the emulated kernels; it
# passes).
OP_SUITE = ["tests/test_ops.py", "tests/test_losses.py", "tests/test_optim.py",
            "tests/test_gpt_vs_torch.py::test_logits_loss_and_every_gradient_match_torch"]


def test_op_suite_and_whole_model_check_on_cuda():
    env = dict(os.environ, TT_FAKE_CUPY="1", TT_DEVICES="cuda")
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *OP_SUITE],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    tail = p.stdout[-3000:]
    assert p.returncode == 0, tail
    assert " passed" in tail and "skipped" not in tail.split("=")[-2], tail


# ----- the scripts on --device cuda -------------------------------------------------------

TINY = ["--n_embd", "16", "--n_head", "2", "--n_layer", "1", "--block_size", "8",
        "--batch_size", "4", "--eval_iters", "2", "--eval_interval", "10", "--log_interval", "1",
        "--dropout", "0", "--lr_decay_iters", "30"]  # the schedule of 30 steps, also when resumed


def run_script(script, *args, report=None, mpi=0, timeout=300):
    env = dict(os.environ, TT_FAKE_CUPY_KERNELS="off", PYTHONUNBUFFERED="1")
    env.pop("OMP_NUM_THREADS", None)
    if report:
        env["TT_FAKE_CUPY_REPORT"] = str(report)
    cmd = [sys.executable, FAKE, os.path.join(ROOT, script), *map(str, args)]
    if mpi:
        cmd = [MPIRUN, "-n", str(mpi)] + cmd
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory, text_file):
    out = str(tmp_path_factory.mktemp("cpu") / "out")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train", "train.py"), *TINY,
                        "--device", "cpu", "--data", text_file, "--out_dir", out,
                        "--max_iters", "30"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return out


def test_train_resume_and_sample_on_cuda(tmp_path, text_file, cpu_run):
    out, report = str(tmp_path / "out"), tmp_path / "transfers.json"
    run_script("train/train.py", *TINY, "--device", "cuda", "--data", text_file,
               "--out_dir", out, "--max_iters", "20", report=report)
    counts = json.loads(report.read_text())
    reads = sum(counts["transfers"].values())
    # 20 steps (MAX_SYNCS_PER_STEP each), 3 evals of 2 + 2 batches (3 reads each), and the
    # checkpoints' read-backs (parameters and AdamW moments; 3 writes)
    assert reads <= 20 * MAX_SYNCS_PER_STEP + 3 * 4 * 3 + 3 * 2 * 40, counts
    assert os.path.exists(os.path.join(out, "ckpt.npz"))
    run_script("train/train.py", *TINY, "--device", "cuda", "--data", text_file,
               "--out_dir", out, "--max_iters", "30", "--resume")
    got, want = losses(out), losses(cpu_run)
    assert sorted(got) == sorted(want) == list(range(30))
    np.testing.assert_allclose([got[s] for s in range(30)], [want[s] for s in range(30)],
                               rtol=1e-5)       # float32: the same arithmetic, CPU and 'cuda'
    s = run_script("train/sample.py", "--out_dir", out, "--device", "cuda",
                   "--max_new_tokens", "40", "--seed", "3")
    c = subprocess.run([sys.executable, os.path.join(ROOT, "train", "sample.py"), "--out_dir", out,
                        "--device", "cpu", "--max_new_tokens", "40",
                        "--seed", "3"], capture_output=True, text=True, timeout=120)
    assert c.returncode == 0, c.stderr
    assert s.stdout == c.stdout and len(s.stdout.strip()) >= 40


def test_generate_with_the_kv_cache_on_cuda(fake_cuda):
    model, x, _ = _step_inputs(np.float32)
    model.eval()
    want = model.generate(x[:, :3], 6, rng=np.random.default_rng(5), use_cache=False)
    model.to("cuda")
    got = model.generate(backend.to_device(x[:, :3], "cuda"), 6, rng=np.random.default_rng(5),
                         use_cache=True)
    np.testing.assert_array_equal(backend.to_numpy(got), want)


@pytest.mark.skipif(MPIRUN is None, reason="mpirun not found: pip install -e '.[mpi]'")
def test_mpirun_two_ranks_on_cuda_through_host_staging(tmp_path, text_file, cpu_run):
    out, report = str(tmp_path / "out"), tmp_path / "transfers.json"
    run_script("train/train.py", *TINY, "--device", "cuda", "--data", text_file,
               "--out_dir", out, "--max_iters", "30", mpi=2, report=report)
    for rank in (0, 1):  # each rank staged its gradients through host memory once per step
        sites = json.loads((tmp_path / f"transfers.json.{rank}").read_text())["sites"]
        staged = [n for k, n in sites.items() if k.startswith("tinytensor/distributed.py")
                  and k.endswith("(get)")]
        assert 30 in staged, sites  # (the others: the parameter checks at start and checkpoints)
    got, want = losses(out), losses(cpu_run)
    assert sorted(got) == sorted(want)
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(got)],
                               rtol=1e-5)
