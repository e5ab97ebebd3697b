#!/usr/bin/env python3
"""Train a character-level GPT (or any lecture stage) on a text file.

    python train/train.py                                  # the small preset on tiny Shakespeare
    python train/train.py --config lecture --device cuda   # the lecture's model, on a GPU
    python train/train.py --max_iters 4000 --resume        # continue from out/ckpt.npz
    mpirun -n 2 train/train.py                             # data parallel (batch_size is global)

Writes to out_dir: metrics.jsonl, ckpt.npz (latest, for --resume), best.npz (best val loss)
and loss.png. The run depends only on the seed and the config: training batches, evaluation
batches and dropout each draw from their own stream, derived from (seed, stream, step), so
evaluating more often or resuming from a checkpoint never changes the training losses.
"""
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path[0] != ROOT:  # run from any directory, installed or not; first, also when
    sys.path.insert(0, ROOT)  # PYTHONPATH has it: else `train` is train/train.py, not the package

import numpy as np  # noqa: E402

import tinytensor as tt  # noqa: E402
from tinytensor import backend  # noqa: E402
from tinytensor import distributed as dist  # noqa: E402
from tinytensor.kernels import cpu as cpu_kernels  # noqa: E402
from tinytensor.optim import AdamW, clip_grad_norm_, lr_schedule  # noqa: E402
from train import guard  # noqa: E402
from train.checkpoint import (CheckpointError, atomic_write, load_checkpoint,  # noqa: E402
                              load_metrics, load_tokenizer, remove_stale_temps, save_checkpoint)
from gpt.data import DataError  # noqa: E402
from train.config import (MODEL_SHAPE_FIELDS, PRESETS, ConfigError, TrainConfig,  # noqa: E402
                          config_from_dict, format_config, make_config, parse_args, usage)

# Ids of the independent random streams; each step's generator is derived from (seed, id, step).
TRAIN_STREAM, EVAL_STREAM, DROPOUT_STREAM = 0, 1, 2


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message is one line for the user."""


# ----- random streams ---------------------------------------------------------------------

def stream(seed, *key):
    """A NumPy Generator determined by (seed, *key) alone, e.g. stream(seed, TRAIN_STREAM, step)."""
    return np.random.default_rng([seed, *key])


def seed_dropout(seed, step, rank):
    """Reseed tinytensor's stream (dropout masks) for this step and rank."""
    state = np.random.SeedSequence([seed, DROPOUT_STREAM, step, rank]).generate_state(1, np.uint64)
    tt.manual_seed(int(state[0]))


# ----- pieces of the loop -------------------------------------------------------------------

def get_lr(step, cfg):
    """The learning rate for optimizer step `step` (0-based): the config's optim.lr_schedule."""
    return lr_schedule(step, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters,
                       cfg.lr_decay_iters or cfg.max_iters, decay=cfg.lr_decay)


def make_optimizer(model, cfg):
    """AdamW with weight decay on the 2-D weights (matmuls, embeddings) only, as nanoGPT."""
    params = list(model.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))


def local_slice(x, global_batch):
    """This rank's rows of a global batch: every rank draws the same batch, takes its part."""
    b = global_batch // dist.world_size()
    r = dist.rank()
    return x[r * b:(r + 1) * b]


def estimate_loss(model, dataset, cfg, step, device):
    """The lecture's estimate_loss(): mean loss over eval_iters batches per split, in eval mode.

    Batch k of split s comes from stream (seed, EVAL_STREAM, step, s, k), so the estimate
    never consumes training randomness; under MPI rank r evaluates batches r, r+W, ...
    and the sums are averaged over ranks.
    """
    model.eval()
    out = {}
    with tt.no_grad():
        for split_id, split in enumerate(("train", "val")):
            total, count = 0.0, 0
            for k in range(dist.rank(), cfg.eval_iters, dist.world_size()):
                x, y = dataset.get_batch(split, cfg.batch_size, cfg.block_size,
                                         stream(cfg.seed, EVAL_STREAM, step, split_id, k))
                _, loss = model(backend.to_device(x, device), backend.to_device(y, device))
                total += loss.item()
                count += 1
            # mean over ranks of [sum, count] -> their ratio is the mean over all batches
            s, n = np.asarray(dist.allreduce_mean(np.array([total, count], dtype=np.float64)))
            out[split] = float(s / n)
    model.train()
    return out


# ----- files in out_dir ---------------------------------------------------------------------

class Metrics:
    """metrics.jsonl (append, one JSON object per line) plus the in-memory history for the plot."""

    def __init__(self, path, resume_step=None):
        self.path = path
        self.train, self.evals = [], []  # (step, loss), (step, train_loss, val_loss)
        # on resume keep what the checkpoint covers: train rows before its step, eval rows up to it
        kept = [] if resume_step is None else load_metrics(path, resume_step)
        for row in kept:
            if "val_loss" in row:
                self.evals.append((row["step"], row["train_loss"], row["val_loss"]))
            else:
                self.train.append((row["step"], row["loss"]))
        atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))

    def write(self, row):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if "val_loss" in row:
            self.evals.append((row["step"], row["train_loss"], row["val_loss"]))
        else:
            self.train.append((row["step"], row["loss"]))


def plot_losses(metrics, path):
    """Train (per log line) and eval curves to a PNG, replaced atomically."""
    import logging
    logging.getLogger("matplotlib").setLevel(logging.ERROR)  # no one-time font-cache notice on stderr
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if metrics.train:
        s, loss = zip(*metrics.train)
        ax.plot(s, loss, color="0.75", linewidth=0.8, label="train (batch)")
    if metrics.evals:
        s, tr, va = zip(*metrics.evals)
        ax.plot(s, tr, "o-", label="train (estimate)")
        ax.plot(s, va, "o-", label="val (estimate)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)


# ----- setup ----------------------------------------------------------------------------

def resolve_config(preset, overrides):
    """The run's TrainConfig and, with --resume, the loaded checkpoint (meta, model, optim,
    tokenizer), every field of its meta checked."""
    cfg = make_config(preset, overrides)
    if not cfg.resume:
        return cfg, None
    path = os.path.join(cfg.out_dir, "ckpt.npz")
    if not os.path.exists(path):
        raise CheckpointError(f"--resume: no checkpoint at {path}; check --out_dir, or leave out "
                              f"--resume to start afresh")
    meta, model_state, optim_state = load_checkpoint(path)
    if optim_state is None:
        raise CheckpointError(f"{path} holds no optimizer state, so it cannot be resumed")
    try:
        saved = config_from_dict(meta["config"])
        saved.validate()
    except ConfigError as e:
        raise CheckpointError(f"{path}: unusable saved config ({e}); the file is damaged: "
                              f"delete it or use another out_dir") from None
    tokenizer = load_tokenizer(meta, path)
    # the saved config, updated by what this command line names explicitly
    explicit = dict(PRESETS[preset]) if preset else {}
    explicit.update(overrides)
    cfg = replace(saved, **explicit)
    cfg = replace(cfg, resume=True, out_dir=make_config(preset, overrides).out_dir)
    changed = [f"{k}={getattr(saved, k)!r} -> {getattr(cfg, k)!r}" for k in MODEL_SHAPE_FIELDS
               if getattr(saved, k) != getattr(cfg, k)]
    if changed:
        raise ConfigError(f"--resume: the model in {path} has a different shape ({', '.join(changed)}); "
                          f"these cannot change on resume: use the checkpoint's values or another out_dir")
    return cfg, (meta, model_state, optim_state, tokenizer)


def prepare(preset, overrides, lock):
    """What every rank does before the ranks compare notes: the config (and checkpoint), then
    on rank 0 the out_dir lock and the removal of a killed run's temporary files, then build()
    and the fingerprint of what it built."""
    from gpt.model import MODELS
    cfg, ckpt = resolve_config(preset, overrides)
    cfg.validate(model_names=list(MODELS), world_size=dist.world_size())
    if dist.is_main():
        lock.acquire()  # held until run() ends
        remove_stale_temps(cfg.out_dir)
    built = build(cfg, ckpt)
    return cfg, ckpt, built + (fingerprint(cfg, *built),)


def build(cfg, ckpt):
    """Data, tokenizer, model (on its device) and optimizer, restored from ckpt when resuming;
    the model's memory is checked against the machine's before it is made."""
    from gpt.data import CharDataset, load_text
    from gpt.model import GPTConfig, build_model

    try:
        device = backend.check_device(cfg.device)
        cpu_kernels.enabled()  # TT_NUMBA: a bad value or a missing numba is a config error
    except (ValueError, RuntimeError, ImportError) as e:
        raise ConfigError(str(e)) from None

    text = load_text(cfg.data or None)
    tokenizer = ckpt[3] if ckpt else None
    try:
        dataset = CharDataset(text, tokenizer)
    except DataError:
        raise
    except ValueError as e:  # characters outside the checkpoint's vocabulary
        raise DataError(f"{cfg.data or 'the dataset'} does not fit the checkpoint's vocabulary: "
                        f"{e}") from None
    dataset.check_block_size(cfg.block_size)

    gconf = GPTConfig(vocab_size=dataset.tokenizer.vocab_size, block_size=cfg.block_size,
                      n_embd=cfg.n_embd, n_head=cfg.n_head, n_layer=cfg.n_layer, dropout=cfg.dropout,
                      fused=cfg.fused)
    try:
        gconf.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    guard.check_memory(*guard.estimate_memory(
        gconf.vocab_size, cfg.block_size, cfg.n_embd, cfg.n_head, cfg.n_layer,
        cfg.batch_size // dist.world_size(), device), ranks_here=dist.local_size())
    tt.manual_seed(cfg.seed)  # parameter initialisation
    model = build_model(cfg.model, gconf)
    model.to(device)
    optimizer = make_optimizer(model, cfg)
    if ckpt:
        meta, model_state, optim_state, _ = ckpt
        try:
            model.load_state_dict(model_state)
            optimizer.load_state_dict(optim_state)
        except (KeyError, ValueError, IndexError, TypeError) as e:
            msg = str(e.args[0]) if e.args else type(e).__name__
            raise CheckpointError(f"{cfg.out_dir}/ckpt.npz does not match the model: {msg}") from None
    return dataset, model, optimizer, device


def fingerprint(cfg, dataset, model, optimizer, device):
    """What every rank must agree on before the first broadcast (dist.check_same): the config,
    the data (its size, sha256 and vocabulary), the parameters' dtype, the device and the
    environment settings of tinytensor.distributed. Empty in one process."""
    if dist.world_size() == 1:
        return {}
    values = {f"--{k}": v for k, v in cfg.to_dict().items()}
    values.update({"data size": int(dataset.data.size),
                   "data sha256": hashlib.sha256(dataset.data.tobytes()).hexdigest(),
                   "vocab": dataset.tokenizer.vocab_size,
                   "dtype": str(next(iter(model.parameters())).dtype), "device": device})
    values.update(dist.settings())
    return values


# ----- the run ----------------------------------------------------------------------------
#
# run() reads top to bottom: resolve_config -> setup -> train (train_step, log_step and, every
# eval_interval steps, evaluate, which writes the checkpoints) -> the closing line. What the
# steps share lives in one RunState.

@dataclass
class RunState:
    """What a training run holds between its steps (made by setup())."""
    cfg: TrainConfig
    dataset: object                   # gpt.data.CharDataset
    model: object                     # the GPT (tinytensor.nn.Module), on `device`
    optimizer: AdamW
    device: str
    start: int                        # the first step to take (the checkpoint's step on resume)
    best_val: float                   # the best validation loss so far (inf: none yet)
    last_saved: Optional[int]         # the step of the last checkpoint (None: none written yet)
    main: bool                        # rank 0: prints, logs and writes the files
    stop: guard.StopSignals           # SIGINT/SIGTERM: a request to stop at a step boundary
    reducer: dist.GradientReducer     # averages optimizer.flat's gradients over the ranks
    metrics: Optional[Metrics] = None  # metrics.jsonl and the loss history (rank 0 only)
    bar: object = None                # the tqdm progress bar on a terminal (rank 0), else None
    t_log: float = 0.0                # time.perf_counter() at the last train log line
    steps_since_log: int = 0          # optimizer steps since then

    @property
    def ckpt_path(self):
        return os.path.join(self.cfg.out_dir, "ckpt.npz")

    @property
    def best_path(self):
        return os.path.join(self.cfg.out_dir, "best.npz")


def setup(cfg, ckpt, built, stop):
    """Check that every rank built the same (prepare()'s fingerprint), make every rank start
    from rank 0's weights, print the run's header and open metrics.jsonl (rank 0)."""
    dataset, model, optimizer, device, values = built
    start = ckpt[0]["step"] if ckpt else 0
    best_val = ckpt[0].get("best_val_loss", math.inf) if ckpt else math.inf
    if start > cfg.max_iters:
        raise ConfigError(f"max_iters ({cfg.max_iters}) is below the checkpoint's step ({start}); "
                          f"pass --max_iters {start} or more")
    dist.check_same(values)
    dist.broadcast_parameters(model)
    dist.check_consistent(cfg.to_dict(), list(model.parameters()))
    state = RunState(cfg=cfg, dataset=dataset, model=model, optimizer=optimizer, device=device,
                     start=start, best_val=math.inf if best_val is None else best_val,
                     last_saved=start if ckpt else None, main=dist.is_main(), stop=stop,
                     reducer=dist.GradientReducer(optimizer.flat))
    stop.saved = (state.ckpt_path, start) if ckpt else None
    if state.main:
        print("config:\n" + format_config(cfg), flush=True)
        print(f"data: {cfg.data or 'tiny Shakespeare'}: {len(dataset.data):,} tokens "
              f"({len(dataset.train):,} train, {len(dataset.val):,} val), "
              f"vocab {dataset.tokenizer.vocab_size}")
        print(f"model: {cfg.model}, {model.num_parameters():,} parameters, device {device}, "
              f"{dist.world_size()} process(es)"
              + (f", compiled CPU kernels {'on' if cpu_kernels.enabled() else 'off'}"
                 if device == "cpu" else ""))
        if dist.world_size() > 1:
            print(f"gradients: {state.reducer.describe()}")
        if ckpt:
            print(f"resuming from {state.ckpt_path} at step {start}")
        elif os.path.exists(state.ckpt_path):
            print(f"note: starting afresh; {state.ckpt_path} will be overwritten at the first "
                  f"evaluation (pass --resume to continue it)")
        state.metrics = Metrics(os.path.join(cfg.out_dir, "metrics.jsonl"), start if ckpt else None)
    return state


def train_step(state, step):
    """One optimizer step on the global batch of `step`: this rank's rows forward and backward,
    gradients averaged over the ranks, clipped, AdamW. Returns (the loss averaged over the
    ranks, the learning rate used); state.stop learns whether any rank was asked to stop."""
    cfg, model, optimizer = state.cfg, state.model, state.optimizer
    lr = get_lr(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    x, y = state.dataset.get_batch("train", cfg.batch_size, cfg.block_size,
                                   stream(cfg.seed, TRAIN_STREAM, step))
    x = backend.to_device(local_slice(x, cfg.batch_size), state.device)
    y = backend.to_device(local_slice(y, cfg.batch_size), state.device)
    seed_dropout(cfg.seed, step, dist.rank())
    _, loss = model(x, y)
    optimizer.zero_grad()
    loss.backward()           # into the optimizer's flat gradient buffer; under mpirun its
    state.reducer.finish()    # buckets are averaged over the ranks meanwhile, finish() the rest
    if cfg.grad_clip > 0:
        clip_grad_norm_(list(model.parameters()), cfg.grad_clip)
    # the mean over ranks is non-finite when any rank's loss is, and a stop asked on any rank
    # shows in the mean of the stop flags: every rank stops alike
    step_loss, *asked = dist.allreduce_mean(np.array([loss.item(), *state.stop.flags()]))
    step_loss = float(step_loss)
    state.stop.agree(asked)
    if not math.isfinite(step_loss):
        raise TrainingError(nonfinite_message(state, step, "training loss"))
    optimizer.step()
    return step_loss, lr


def evaluate(state, step):
    """estimate_loss on both splits; rank 0 logs it and writes the checkpoints and the plot."""
    losses = estimate_loss(state.model, state.dataset, state.cfg, step, state.device)
    if state.main:
        say(state, f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
    if not (math.isfinite(losses["train"]) and math.isfinite(losses["val"])):
        raise TrainingError(nonfinite_message(state, step, "evaluation loss"))
    if state.main:
        state.metrics.write({"step": step, "train_loss": losses["train"], "val_loss": losses["val"]})
        save_checkpoints(state, step, losses)
        plot_losses(state.metrics, os.path.join(state.cfg.out_dir, "loss.png"))
    state.last_saved = step
    state.stop.saved = (state.ckpt_path, step)


def save_checkpoints(state, step, losses):
    """best.npz when the validation loss improved, then ckpt.npz (with the optimizer)."""
    if losses["val"] < state.best_val:
        state.best_val = losses["val"]
        save_checkpoint(state.best_path, checkpoint_meta(state, step, losses), state.model)
    save_checkpoint(state.ckpt_path, checkpoint_meta(state, step, losses), state.model,
                    state.optimizer)


def stop_early(state, step):
    """A signal asked some rank to stop and every rank has finished step - 1: rank 0 saves
    ckpt.npz (no evaluation: no time to lose) and says so. Returns the exit status."""
    if state.main:
        save_checkpoint(state.ckpt_path, checkpoint_meta(state, step), state.model, state.optimizer)
        say(state, f"stopped by {state.stop.name} at step {step}: wrote {state.ckpt_path}; "
                   f"continue with --resume")
    state.last_saved = step
    state.stop.saved = (state.ckpt_path, step)
    return state.stop.exit_code


def checkpoint_meta(state, step, losses=None):
    cfg = state.cfg
    losses = losses or {"train": None, "val": None}  # None: saved when stopped by a signal
    return {"step": step, "config": cfg.to_dict(), "tokenizer": state.dataset.tokenizer.to_json(),
            "train_loss": losses["train"], "val_loss": losses["val"],
            "best_val_loss": state.best_val, "world_size": dist.world_size(),
            "rng": {"seed": cfg.seed, "next_step": step,
                    "streams": "train batch (seed, 0, step); eval batch k of split s "
                               "(seed, 1, step, s, k); dropout (seed, 2, step, rank)"}}


def nonfinite_message(state, step, what):
    kept = (f"the last good checkpoint {state.ckpt_path} (step {state.last_saved}) is kept"
            if state.last_saved is not None else "no checkpoint was written")
    clip = (f"a lower --grad_clip (now {state.cfg.grad_clip:g})" if state.cfg.grad_clip > 0
            else "--grad_clip 1.0")
    return (f"non-finite {what} at step {step}: training stopped; {kept}; "
            f"try a lower --learning_rate (now {state.cfg.learning_rate:g}) or {clip}")


def log_step(state, step, step_loss, lr):
    """Advance the progress bar; every log_interval steps (and at the last) a metrics row and a
    log line (or the bar's postfix) with the mean time per step since the last one."""
    cfg = state.cfg
    state.steps_since_log += 1
    if state.bar is not None:
        state.bar.update(1)
    if not (step % cfg.log_interval == 0 or step + 1 == cfg.max_iters):
        return
    backend.synchronize()
    now = time.perf_counter()
    ms = 1000.0 * (now - state.t_log) / state.steps_since_log
    tokens_per_s = cfg.batch_size * cfg.block_size / (ms / 1000.0)
    state.t_log, state.steps_since_log = now, 0
    if not state.main:
        return
    state.metrics.write({"step": step, "loss": step_loss, "lr": lr, "ms": ms,
                         "tokens_per_s": tokens_per_s})
    if state.bar is not None:
        state.bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
    else:
        eta = (cfg.max_iters - step - 1) * ms / 1000.0
        print(f"iter {step}: loss {step_loss:.4f}, lr {lr:.2e}, {ms:.1f} ms/step, "
              f"{tokens_per_s:,.0f} tokens/s, eta {format_eta(eta)}", flush=True)


def say(state, line):
    """A line of the log, above the progress bar when there is one."""
    (state.bar.write if state.bar is not None else print)(line)
    sys.stdout.flush()


def progress_bar(state):
    """A tqdm bar on rank 0 when stdout is a terminal, else None."""
    if not (state.main and sys.stdout.isatty()):
        return None
    from tqdm import tqdm
    sized = terminal_columns() > 0  # a bare pty reports 0 x 0: tqdm would draw nothing
    return tqdm(total=state.cfg.max_iters, initial=state.start, unit="step", file=sys.stdout,
                dynamic_ncols=sized, ncols=None if sized else 100, nrows=None if sized else 24)


def train(state):
    """The loop: evaluate every eval_interval steps (not twice at a step just checkpointed),
    a train_step and its log each step, and a last evaluation at max_iters. SIGINT/SIGTERM
    end it at the next step boundary, with a checkpoint. Returns the exit status."""
    cfg = state.cfg
    state.model.train()
    state.t_log, state.steps_since_log = time.perf_counter(), 0
    # non-finite values are caught by the loss checks, not by NumPy's warnings
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"), state.stop.armed_here():
        for step in range(state.start, cfg.max_iters):
            if step % cfg.eval_interval == 0 and step != state.last_saved:
                evaluate(state, step)
                state.t_log, state.steps_since_log = time.perf_counter(), 0  # not step time
            step_loss, lr = train_step(state, step)
            log_step(state, step, step_loss, lr)
            if state.stop.signum is not None:  # every rank knows it (train_step's collective)
                return stop_early(state, step + 1)
        evaluate(state, cfg.max_iters)
    return 0


def run(argv, stop):
    if any(a in ("-h", "--help") for a in argv):
        if dist.is_main():
            try:
                preset = parse_args([a for a in argv if a not in ("-h", "--help")])[0]
            except ConfigError:
                preset = None  # the help is still wanted: show the default preset's
            print(usage(preset))
        return 0
    tt.malloc.keep_freed_memory()  # reuse freed temporaries (TT_MALLOC_TUNING=0: leave malloc be)
    preset, overrides = parse_args(argv)
    lock = guard.OutDirLock(make_config(preset, overrides).out_dir)
    try:
        # an error on any rank while preparing ends every rank, named with its rank
        cfg, ckpt, built = guard.together(lambda: prepare(preset, overrides, lock), KNOWN_ERRORS)
        state = setup(cfg, ckpt, built, stop)
        if state.start == cfg.max_iters:
            if state.main:
                print(f"nothing to do: the checkpoint is already at step {state.start}; "
                      f"raise --max_iters to go on")
            return 0
        state.bar = progress_bar(state)
        try:
            code = train(state)
        finally:
            if state.bar is not None:
                state.bar.close()
    finally:
        lock.release()
    if state.main and code == 0:
        print(f"done: {cfg.max_iters} steps; best val loss {state.best_val:.4f}; wrote "
              f"{state.ckpt_path}, {state.best_path}, "
              f"{os.path.join(cfg.out_dir, 'metrics.jsonl')}, "
              f"{os.path.join(cfg.out_dir, 'loss.png')}")
    return code


def terminal_columns():
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns
    except (OSError, ValueError):
        return 0


def format_eta(seconds):
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


# The errors bad input or the environment can raise, with their exit status; and those of them
# every rank raises alike (guard.boundary prints them once, from rank 0).
KNOWN_ERRORS = [(ConfigError, 2),
                ((DataError, CheckpointError, TrainingError, guard.LockError, guard.OutOfMemory,
                  guard.RankError, dist.DistributedError, OSError, MemoryError), 1)]
EVERY_RANK = (ConfigError, TrainingError, guard.RankError, dist.RankMismatchError)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    stop = guard.StopSignals()

    def stopped(why):
        if stop.saved is None:
            return f"{why} before this run wrote a checkpoint"
        path, step = stop.saved
        return f"{why}; {path} (step {step}) is intact: continue with --resume"

    def body():
        with stop:  # SIGINT/SIGTERM handled until run() returns, then as before
            dist.init()
            return run(argv, stop)
    return guard.boundary(body, KNOWN_ERRORS, EVERY_RANK, stopped)


if __name__ == "__main__":
    sys.exit(main())
