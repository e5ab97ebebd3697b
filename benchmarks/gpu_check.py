#!/usr/bin/env python
"""The whole GPU visit in one command: checks and measurements of the CUDA path, under 5 min.

    python benchmarks/gpu_check.py --out $OUT          # on a machine with a GPU (docs/gpu.md)
    python benchmarks/gpu_check.py --dry-run           # the same steps on the cupy stand-in

It needs nothing but the repository: no network (a GPU machine has none) and no data/ folder
(git-ignored, so absent unless carried). The steps that train (3 and 5) train on tiny
Shakespeare where data/tinyshakespeare/input.txt is there, else on a text generated over its
65 characters (the same model sizes); the first line printed says which, and how to bring the
corpus. Nothing downloads: train.py is always given --data.

Steps, each a subprocess with its own timeout (a failure or a hang costs that step only),
each writing its output to --out as it goes (NN_name.log, and .json where there are numbers):
  1 env     versions, nvidia-smi, tinytensor.cuda_available(), mpirun
  2 ops     a representative part of the op suite and the whole-model check on cuda (float32
            and float64; TT_DEVICES=cuda), the kernels and fused ops on the GPU; worst
            relative error against PyTorch per op family (worst_errors.json)
  3 train   --train-steps (300) steps of train.py --config lecture --device cuda, dropout 0,
            and the same steps of the lecture's PyTorch model (tests/torch_gpt_reference.py)
            from the same initial weights and batches, side by side (train_losses.json), run
            at the same time on the GPU (nothing is timed)
  4 bench   benchmarks/bench_gpu.py, lecture preset: tinytensor against the lecture's PyTorch
            model, fp32 then TF32 on both sides: ms/step, ratio, GPU memory
  5 mpirun  train.py on 2 ranks sharing the GPU (host staging) against 1 process, per step
summary.txt (the table printed at the end) and summary.json are rewritten after every step,
so a run cut short still leaves what it did. The exit status is 1 when a step failed.

--dry-run runs every step on the stand-in of tests/fake_cupy.py (no GPU; kernels off in the
scripts, small sizes, bench on the CPU): CI runs it so the visit cannot fail on a typo.
"""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
FAKE = os.path.join(ROOT, "tests", "fake_cupy.py")

OP_SUITE = ["tests/test_ops.py", "tests/test_losses.py", "tests/test_attention.py",
            "tests/test_optim.py", "tests/test_gpt_vs_torch.py", "tests/test_kernels.py",
            "tests/test_fused_cuda.py", "-k", "not emulated"]   # the GPU, not the CPU emulator
TINY = ["--n_embd", 16, "--n_head", 2, "--n_layer", 1, "--block_size", 8, "--batch_size", 4]
# on --dry-run a few cases only: tests/test_cuda_standin.py runs the op suite on the stand-in
DRY_OP_SUITE = ["tests/test_ops.py", "-k", "matmul or cross_entropy or layer_norm"]
CORPUS = os.path.join("data", "tinyshakespeare", "input.txt")   # git-ignored: carry ["data"]
# tiny Shakespeare's 65 characters: a generated text over them gives the lecture's model sizes
CORPUS_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def training_text(tmp):
    """(the --data file of the steps that train, the line saying so): the corpus where it is
    there, else a text generated into the folder tmp."""
    corpus = os.path.join(ROOT, CORPUS)
    if os.path.isfile(corpus):
        return corpus, f"data: tiny Shakespeare ({CORPUS}) for the train and mpirun steps"
    path = os.path.join(tmp, "generated.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write(generated_text())
    return path, (f"data: {CORPUS} is not here (git-ignored, and a GPU machine has no network to "
                  f"download it): the train and mpirun steps train on a text generated over its "
                  f"65 characters; for tiny Shakespeare put the file there and carry it "
                  f"(carry: [\"data\"])")


def generated_text(n_chars=300_000, seed=0):
    """n_chars of made-up text over CORPUS_CHARS, each of them at least once: mostly lowercase
    letters and spaces, some capitals, punctuation and newlines."""
    weights = [3 if ch == "\n" else 16 if ch == " " else 5 if ch.islower() else 0.5
               for ch in CORPUS_CHARS]
    rng = random.Random(seed)
    return CORPUS_CHARS + "".join(rng.choices(CORPUS_CHARS, weights, k=n_chars))


class Check:
    def __init__(self, args):
        self.args, self.out, self.rows = args, args.out, []
        self.data = None  # the text the steps that train train on (main: training_text)
        self.deadline = time.time() + args.budget
        os.makedirs(self.out, exist_ok=True)

    def path(self, name):
        return os.path.join(self.out, name)

    def env(self, **extra):
        env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        if self.args.dry_run:
            env.update(TT_FAKE_CUPY_KERNELS="off")
        return env

    def script(self, path, *args):
        """The command running a repository script on cuda (through the stand-in on --dry-run)."""
        cmd = [PY, os.path.join(ROOT, path), *map(str, args)]
        return [PY, FAKE] + cmd[1:] if self.args.dry_run else cmd

    def start(self, name, cmd, env=None):
        log = open(self.path(f"{name}.log"), "w")
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env=env or self.env(), text=True), log

    def wait(self, proc, log, timeout):
        """(returncode or 'timeout', the log's text)."""
        timeout = max(1.0, min(timeout, self.deadline - time.time()))
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = "timeout"
        log.close()
        with open(log.name) as f:
            return rc, f.read()

    def run(self, name, cmd, timeout, env=None):
        proc, log = self.start(name, cmd, env)
        return self.wait(proc, log, timeout)

    def record(self, step, status, seconds, result):
        self.rows.append({"step": step, "status": status, "seconds": round(seconds, 1),
                          "result": result})
        with open(self.path("summary.json"), "w") as f:
            json.dump({"dry_run": self.args.dry_run, "steps": self.rows}, f, indent=1)
        with open(self.path("summary.txt"), "w") as f:
            f.write(table(self.rows))
        print(f"[{step}] {status} in {seconds:.0f}s: {result}", flush=True)

    def step(self, name, fn, min_left=10):
        t0 = time.time()
        if self.deadline - t0 < min_left:
            return self.record(name, "skipped", 0, "no time left in --budget")
        try:
            status, result = fn()
        except Exception as e:  # a bug in this script must not lose the other steps
            status, result = "FAILED", f"{type(e).__name__}: {e}"
        self.record(name, status, time.time() - t0, result)


def table(rows):
    lines = [f"{'step':<8}{'status':<10}{'s':>6}  result"]
    lines += [f"{r['step']:<8}{r['status']:<10}{r['seconds']:>6.0f}  {r['result']}" for r in rows]
    return "\n".join(lines) + "\n"


def status_of(rc):
    return "ok" if rc == 0 else "timeout" if rc == "timeout" else "FAILED"


# ----- 1: the environment
ENV_PROBE = r"""
import json, platform, sys
info = {"python": sys.version.split()[0], "platform": platform.platform()}
for name in ("numpy", "torch", "cupy", "mpi4py"):
    try:
        info[name] = __import__(name).__version__
    except Exception as e:
        info[name] = f"missing ({type(e).__name__})"
import tinytensor
from tinytensor import backend
info["tinytensor.cuda_available"] = tinytensor.cuda_available()
try:
    import torch
    info["torch.cuda"] = torch.version.cuda
    info["torch.cuda.is_available"] = torch.cuda.is_available()
except Exception:
    pass
if backend.cuda_available():
    info["gpus"] = backend.device_count()
print(json.dumps(info))
"""


def env_step(c):
    def fn():
        probe = c.path("env_probe.py")
        with open(probe, "w") as f:
            f.write(ENV_PROBE)
        rc, text = c.run("1_env", c.script(probe), 30)
        info = json.loads(text.strip().splitlines()[-1]) if rc == 0 else {}
        smi = shutil.which("nvidia-smi")
        if smi:
            p = subprocess.run([smi], capture_output=True, text=True, timeout=20)
            with open(c.path("1_nvidia-smi.txt"), "w") as f:
                f.write(p.stdout + p.stderr)
            gpu = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total",
                                  "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=20).stdout.strip()
            info["gpu"] = gpu
        info["nvidia-smi"] = smi or "missing"
        info["mpirun"] = mpirun() or "missing"
        with open(c.path("1_env.json"), "w") as f:
            json.dump(info, f, indent=1)
        ok = rc == 0 and info.get("tinytensor.cuda_available") is True
        return ("ok" if ok else "FAILED"), ", ".join(
            f"{k} {info.get(k)}" for k in ("gpu", "python", "numpy", "torch", "torch.cuda", "cupy",
                                            "mpi4py", "tinytensor.cuda_available", "mpirun"))
    return fn


def mpirun():
    return shutil.which("mpirun",
                        path=os.path.dirname(PY) + os.pathsep + os.environ.get("PATH", ""))


# ----- 2: the op suite on cuda
def ops_step(c):
    def fn():
        worst_path = c.path("2_worst_errors.json")
        env = c.env(TT_DEVICES="cuda", TT_WORST_ERRORS=worst_path)
        if c.args.dry_run:
            env["TT_FAKE_CUPY"] = "1"
        suite = DRY_OP_SUITE if c.args.dry_run else OP_SUITE
        rc, text = c.run("2_ops", [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", *suite],
                         c.args.ops_timeout, env)
        counts = next((line for line in reversed(text.splitlines()) if " in " in line
                       and ("passed" in line or "failed" in line)), "no pytest summary")
        worst = {}
        if os.path.exists(worst_path):
            with open(worst_path) as f:
                for per_dtype in json.load(f).values():
                    for dt, err in per_dtype.items():
                        worst[dt] = max(worst.get(dt, 0.0), err)
        errs = ", ".join(f"worst {k} {v:.1e}" for k, v in sorted(worst.items()))
        return status_of(rc), f"{counts.strip('= ')}; {errs or 'no errors recorded'}"
    return fn


# ----- 3: train.py against the lecture's PyTorch model, the same steps
def train_step(c):
    def fn():
        a = c.args
        out = c.path("3_train_out")
        common = ["--config", "lecture", "--dropout", "0", "--max_iters", a.train_steps,
                  "--eval_interval", a.train_steps, "--eval_iters", 2, "--log_interval", 1,
                  "--out_dir", out, "--data", c.data]
        if a.dry_run:
            common += TINY
        t0 = time.time()
        tt_proc = c.start("3_train_tinytensor", c.script("train/train.py", *common,
                                                         "--device", "cuda"))
        torch_cmd = [PY, os.path.abspath(__file__), "--_torch_train", c.path("3_torch_losses.json"),
                     "--", *map(str, common), "--device", "cpu" if a.dry_run else "cuda"]
        torch_proc = c.start("3_train_torch", torch_cmd)
        rc_tt, _ = c.wait(*tt_proc, a.train_timeout)
        rc_torch, _ = c.wait(*torch_proc, a.train_timeout - (time.time() - t0))
        if rc_tt != 0 or rc_torch != 0:
            status = "timeout" if "timeout" in (rc_tt, rc_torch) else "FAILED"
            return status, f"tinytensor {rc_tt}, torch {rc_torch} (see 3_train_*.log)"
        with open(os.path.join(out, "metrics.jsonl")) as f:
            ours = {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}
        with open(c.path("3_torch_losses.json")) as f:
            theirs = {int(k): v for k, v in json.load(f).items()}
        steps = sorted(set(ours) & set(theirs))
        with open(c.path("3_train_losses.json"), "w") as f:
            json.dump({"step": steps, "tinytensor": [ours[s] for s in steps],
                       "torch": [theirs[s] for s in steps]}, f)
        diff = [abs(ours[s] - theirs[s]) for s in steps]
        first10 = max(diff[:10])
        last = steps[-1]
        plot(c, steps, ours, theirs)
        ok = len(steps) == a.train_steps and first10 <= 1e-3
        return ("ok" if ok else "FAILED"), (
            f"{len(steps)} steps; loss at step {last}: tinytensor {ours[last]:.4f}, torch "
            f"{theirs[last]:.4f}; max |diff| steps 0-9 {first10:.1e}, all {max(diff):.1e}")
    return fn


def plot(c, steps, ours, theirs):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [ours[s] for s in steps], label="tinytensor (cuda)")
    ax.plot(steps, [theirs[s] for s in steps], label="PyTorch lecture model", linestyle="--")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.savefig(c.path("3_train_losses.png"), dpi=100)
    plt.close(fig)


def torch_train(out_json, argv):
    """The lecture's PyTorch model through the steps train.py takes with these arguments:
    the same initial weights (train.py's model, through gpt.interop), batches, learning-rate
    schedule, AdamW groups and gradient clipping."""
    sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
    import torch

    import tinytensor as tt
    from gpt.data import CharDataset, load_text
    from gpt.interop import lecture_state_dict
    from gpt.model import build_model
    from torch_gpt_reference import GPTLanguageModel
    from train import train as T
    from train.config import parse_args
    from train.resume import resolve_config
    # the pieces train.prepare makes (not prepare itself: train.py runs meanwhile on the same
    # out_dir, whose lock and temporary files are its own), the model on the CPU
    cfg, _ = resolve_config(*parse_args(argv))
    dataset = CharDataset(load_text(cfg.data or None))
    tt.manual_seed(cfg.seed)                # parameter initialisation, as train.prepare
    model = build_model(cfg.model, cfg.model_config(dataset.tokenizer.vocab_size))
    device = torch.device(argv[argv.index("--device") + 1] if "--device" in argv else "cpu")
    net = GPTLanguageModel(dataset.tokenizer.vocab_size, cfg.block_size, cfg.n_embd, cfg.n_head,
                           cfg.n_layer, cfg.dropout)
    net.load_state_dict({k: torch.from_numpy(v.copy())
                         for k, v in lecture_state_dict(model).items()})
    net.to(device).train()
    params = list(net.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2],
                              "weight_decay": cfg.weight_decay},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                            lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))
    losses = {}
    for step in range(cfg.max_iters):
        for g in opt.param_groups:
            g["lr"] = T.get_lr(step, cfg)
        x, y = dataset.get_batch("train", cfg.batch_size, cfg.block_size,
                                 T.stream(cfg.seed, T.TRAIN_STREAM, step))
        _, loss = net(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))
        opt.zero_grad()
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        losses[step] = loss.item()
        opt.step()
    with open(out_json, "w") as f:
        json.dump(losses, f)


# ----- 4: bench_gpu.py, fp32 and TF32
def bench_step(c):
    def fn():
        results = []
        status = "ok"
        for tf32 in (False, True):
            name = "4_bench_" + ("tf32" if tf32 else "fp32")
            cmd = [PY, os.path.join(ROOT, "benchmarks", "bench_gpu.py"),
                   "--json", c.path(name + ".json"), "--models", "tinytensor,torch_eager"] + (["--tf32"] if tf32 else [])
            cmd += (["--device", "cpu", "--preset", "tiny", "--iters", "1", "--rounds", "1",
                     "--warmup", "1"] if c.args.dry_run else
                    ["--preset", "lecture", "--iters", "5", "--rounds", "3", "--warmup", "2"])
            rc, _ = c.run(name, cmd, c.args.bench_timeout)
            if rc != 0:
                status = status_of(rc)
                results.append(f"{'tf32' if tf32 else 'fp32'} {rc}")
                continue
            with open(c.path(name + ".json")) as f:
                r = json.load(f)
            m, mem = r["median_ms"], r.get("memory", {})
            ratio = r["ratios"]["tinytensor/torch_eager"]
            results.append(f"{'tf32' if tf32 else 'fp32'}: tt {m['tinytensor']:.1f} ms, torch "
                           f"{m['torch_eager']:.1f} ms, ratio {ratio:.2f}"
                           + (f", cupy pool {mem['cupy_pool_held_MiB']:.0f} MiB, torch "
                              f"{mem['torch_max_allocated_MiB']:.0f} MiB" if mem else ""))
        return status, "; ".join(results)
    return fn


# ----- 5: mpirun -n 2 on the one GPU against one process
def mpi_step(c):
    def fn():
        runner = mpirun()
        if runner is None:
            return "skipped", "mpirun not found (docs/gpu.md: carry the MPICH wheel)"
        small = (TINY if c.args.dry_run else ["--n_embd", 64, "--n_head", 2, "--n_layer", 2,
                                              "--block_size", 32, "--batch_size", 8])
        n_steps = 6 if c.args.dry_run else 20
        small += ["--max_iters", n_steps, "--eval_interval", n_steps, "--eval_iters", 2,
                  "--log_interval", 1, "--dropout", 0, "--device", "cuda", "--data", c.data]
        losses = {}
        for n in (1, 2):
            out = c.path(f"5_mpi_{n}_out")
            cmd = c.script("train/train.py", *small, "--out_dir", out)
            env = c.env(CUPY_GPU_MEMORY_LIMIT="45%")
            env.pop("OMP_NUM_THREADS", None)
            rc, _ = c.run(f"5_mpi_{n}", ([runner, "-n", "2"] if n == 2 else []) + cmd,
                          c.args.mpi_timeout, env)
            if rc != 0:
                return status_of(rc), f"{n} process(es): {rc} (see 5_mpi_{n}.log)"
            with open(os.path.join(out, "metrics.jsonl")) as f:
                losses[n] = {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}
        steps = sorted(losses[1])
        worst = max(abs(losses[1][s] - losses[2].get(s, float("inf"))) for s in steps)
        with open(c.path("5_mpi_losses.json"), "w") as f:
            json.dump({"step": steps, "1": [losses[1][s] for s in steps],
                       "2": [losses[2].get(s) for s in steps]}, f)
        return ("ok" if worst <= 1e-4 else "FAILED"), \
            f"{len(steps)} steps, worst |loss(2 ranks) - loss(1)| {worst:.1e}"
    return fn


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or None,
                   help="folder for every result (created; default $OUT, else a new temporary "
                        "folder)")
    p.add_argument("--dry-run", action="store_true", help="the cupy stand-in, small sizes")
    p.add_argument("--budget", type=float, default=280, help="seconds for all steps together")
    p.add_argument("--train-steps", type=int, default=None, help="step 3 (default 300; dry 10)")
    p.add_argument("--ops-timeout", type=float, default=75)
    p.add_argument("--train-timeout", type=float, default=100)
    p.add_argument("--bench-timeout", type=float, default=40)
    p.add_argument("--mpi-timeout", type=float, default=30)
    p.add_argument("--steps", default="env,ops,train,bench,mpirun", help="which steps, in order")
    args = p.parse_args(argv)
    if args.train_steps is None:
        args.train_steps = 10 if args.dry_run else 300
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_torch_train":
        return torch_train(argv[1], argv[3:])
    args = parse_args(argv)
    args.out = args.out or tempfile.mkdtemp(prefix="gpu_check_")
    c = Check(args)
    steps = {"env": env_step, "ops": ops_step, "train": train_step, "bench": bench_step,
             "mpirun": mpi_step}
    with tempfile.TemporaryDirectory(prefix="gpu_check_data_") as tmp:
        c.data, line = training_text(tmp)
        print(line, flush=True)
        for name in args.steps.split(","):
            c.step(name, steps[name](c))
    print("\n" + table(c.rows) + f"\n(everything is in {args.out})")
    return 1 if any(r["status"] in ("FAILED", "timeout") for r in c.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
