"""What train.py tells its user (on rank 0): the log lines or a progress bar, metrics.jsonl
and loss.png.

    report = Report(cfg, start, resumed)   # metrics.jsonl (kept up to the checkpoint on resume)
    report.header(...)                     # the run's config, data, model, accelerators
    report.say(line)                       # a line of the log (above the bar on a terminal)
    report.step(step, loss, lr)            # the bar; every log_interval a metrics row and a line
    report.evaluation(step, losses)        # a metrics row of the evaluation's losses
    report.plot()                          # loss.png
    report.close()

On other ranks (main=False) only the step timing runs: nothing is printed or written.
"""
import json
import os
import sys
import time

from tinytensor import backend, kernels
from tinytensor import distributed as dist
from train.checkpoint import atomic_write, load_metrics
from train.config import format_config


class Report:
    def __init__(self, cfg, start, resumed, main=True):
        self.cfg, self.main, self.start = cfg, main, start
        self.path = os.path.join(cfg.out_dir, "metrics.jsonl")
        self.train, self.evals = [], []  # (step, loss), (step, train_loss, val_loss)
        self.bar = None
        self.restart_clock()
        if not main:
            return
        # on resume keep what the checkpoint covers: train rows before its step, eval rows up to it
        kept = load_metrics(self.path, start) if resumed else []
        for row in kept:
            self._remember(row)
        atomic_write(self.path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))
        if sys.stdout.isatty():  # a tqdm bar on a terminal; plain log lines otherwise
            from tqdm import tqdm
            sized = _terminal_columns() > 0  # a bare pty reports 0 x 0: tqdm would draw nothing
            self.bar = tqdm(total=cfg.max_iters, initial=start, unit="step", file=sys.stdout,
                            dynamic_ncols=sized, ncols=None if sized else 100,
                            nrows=None if sized else 24)

    def restart_clock(self):
        """Time the next steps from now (evaluations and checkpoints are not step time)."""
        self.t_log, self.steps_since_log = time.perf_counter(), 0

    def header(self, dataset, model, device, reducer, ckpt_path, resumed, notes=()):
        """The run's config, data, model, accelerators and (under mpirun) gradient reduction."""
        cfg = self.cfg
        self.say("config:\n" + format_config(cfg))
        self.say(f"data: {cfg.data or 'tiny Shakespeare'}: {len(dataset):,} tokens "
                 f"({len(dataset.train):,} train, {len(dataset.val):,} val), "
                 f"vocab {dataset.tokenizer.vocab_size}")
        self.say(f"model: {cfg.model}, {model.num_parameters():,} parameters, device {device}, "
                 f"{dist.world_size()} process(es); accelerators {kernels.describe(device)}")
        K, W = cfg.gradient_accumulation_steps, dist.world_size()
        if K > 1 or W > 1:
            self.say(f"batch: {cfg.batch_size} rows per optimizer step = {K} micro-batch(es) x "
                     f"{W} rank(s) x {cfg.batch_size // (K * W)} rows")
        if W > 1:
            self.say(f"gradients: {reducer.describe()}")
        if resumed:
            self.say(f"resuming from {ckpt_path} at step {self.start}")
            for note in notes:
                self.say(note)
        elif cfg.init_from:
            self.say(f"starting from the weights and tokenizer of {cfg.init_from} (--init_from), "
                     f"with a fresh optimizer and schedule")
        elif os.path.exists(ckpt_path):
            self.say(f"note: starting afresh; {ckpt_path} will be overwritten at the first "
                     f"evaluation (pass --resume to continue it)")

    def say(self, line):
        """A line of the log, above the progress bar when there is one."""
        if self.main:
            (self.bar.write if self.bar is not None else print)(line)
            sys.stdout.flush()

    def step(self, step, loss, lr):
        """Advance the bar; every log_interval steps (and at the last) a metrics row and a log
        line (or the bar's postfix) with the mean time per step since the last one."""
        cfg = self.cfg
        self.steps_since_log += 1
        if self.bar is not None:
            self.bar.update(1)
        if not (step % cfg.log_interval == 0 or step + 1 == cfg.max_iters):
            return
        backend.synchronize()
        ms = 1000.0 * (time.perf_counter() - self.t_log) / self.steps_since_log
        tokens_per_s = cfg.batch_size * cfg.block_size / (ms / 1000.0)
        self.restart_clock()
        if not self.main:
            return
        self._write({"step": step, "loss": loss, "lr": lr, "ms": ms, "tokens_per_s": tokens_per_s})
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
        else:
            eta = (cfg.max_iters - step - 1) * ms / 1000.0
            print(f"iter {step}: loss {loss:.4f}, lr {lr:.2e}, {ms:.1f} ms/step, "
                  f"{tokens_per_s:,.0f} tokens/s, eta {format_eta(eta)}", flush=True)

    def evaluation(self, step, losses):
        """A metrics row of an evaluation's losses {"train": .., "val": ..}."""
        if self.main:
            self._write({"step": step, "train_loss": losses["train"], "val_loss": losses["val"]})

    def plot(self):
        """loss.png: the train losses (per log line) and the evaluations."""
        if self.main:
            plot_losses(self.train, self.evals, os.path.join(self.cfg.out_dir, "loss.png"))

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _write(self, row):
        """Append a row to metrics.jsonl (one JSON object per line) and to the plot's history."""
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:  # name the file (a write's error has no name)
            raise OSError(e.errno, f"cannot append to it ({e.strerror or e})", self.path) from None
        self._remember(row)

    def _remember(self, row):
        if "val_loss" in row:
            self.evals.append((row["step"], row["train_loss"], row["val_loss"]))
        else:
            self.train.append((row["step"], row["loss"]))


def plot_losses(train, evals, path):
    """The train losses (per log line) and the evaluations' estimates to a PNG, replaced
    atomically."""
    import logging
    logging.getLogger("matplotlib").setLevel(logging.ERROR)  # no one-time font-cache notice on stderr
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        s, loss = zip(*train)
        ax.plot(s, loss, color="0.75", linewidth=0.8, label="train (batch)")
    if evals:
        s, tr, va = zip(*evals)
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


def _terminal_columns():
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns
    except (OSError, ValueError):
        return 0


def format_eta(seconds):
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
