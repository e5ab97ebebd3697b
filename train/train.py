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
import contextlib
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path[0] != ROOT:  # run from any directory, installed or not; first, also when
    sys.path.insert(0, ROOT)  # PYTHONPATH has it: else `train` is train/train.py, not the package

import numpy as np  # noqa: E402

import tinytensor as tt  # noqa: E402
from gpt.data import DataError, data_path  # noqa: E402
from gpt.model import MODELS, build_model  # noqa: E402
from gpt.token_files import BLOCK_BYTES, TokenDataset, TokenizerSpec, build_token_files  # noqa: E402
from tinytensor import backend, environment, kernels  # noqa: E402
from tinytensor import distributed as dist  # noqa: E402
from tinytensor.optim import AdamW, clip_grad_norm_, lr_schedule  # noqa: E402
from tinytensor.reducer import GradientReducer  # noqa: E402
from train import guard  # noqa: E402
from train.checkpoint import CheckpointError, remove_stale_temps, run_meta, save_checkpoint  # noqa: E402
from train.config import ACCELERATORS, ConfigError, help_text, make_config, parse_args  # noqa: E402
from train.report import Report  # noqa: E402
from train.resume import resolve_config, resolve_init  # noqa: E402

# Ids of the independent random streams; each step's generator is derived from (seed, id, step).
TRAIN_STREAM, EVAL_STREAM, DROPOUT_STREAM = 0, 1, 2


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message is one line for the user."""


def main(argv=None):
    """Train as the command line says; every error becomes one `error:` line (guard.boundary)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    stop = guard.StopSignals()

    def body():
        with stop:  # SIGINT/SIGTERM handled until run() returns, then as before
            dist.init()  # first: from here an error on one rank ends every rank
            return run(argv, stop)
    return guard.boundary(body, KNOWN_ERRORS, EVERY_RANK, stop.describe)


def run(argv, stop):
    if help_text(argv) is not None:  # -h or --help: the options and their defaults
        if dist.is_main():
            print(help_text(argv))
        return 0
    preset, overrides = guard.together(lambda: parse_args(argv), KNOWN_ERRORS)  # one rank's alike
    lock = guard.OutDirLock(make_config(preset, overrides).out_dir)
    try:
        # an error on any rank while preparing ends every rank, named with its rank; each
        # together() is also where the ranks wait for rank 0 (which writes the token files)
        cfg, ckpt, init, device = guard.together(
            lambda: prepare_config(preset, overrides, lock), KNOWN_ERRORS)
        dist.watch(cfg.collective_timeout, stop.describe)  # a rank waiting longer ends the job
        dist.progress("the start-up, while rank 0 writes the token files")
        guard.together(lambda: prepare_tokens(cfg, ckpt, init) if dist.is_main() else None,
                       KNOWN_ERRORS)
        dist.progress("the start-up")
        dataset, model, optimizer = guard.together(
            lambda: prepare_model(cfg, ckpt, init, device), KNOWN_ERRORS)
        guard.together(lambda: configure(cfg), KNOWN_ERRORS)  # BLAS threads, GPU backend
        return train(cfg, ckpt, dataset, model, optimizer, device, stop)
    finally:
        lock.release()


def prepare(preset, overrides, lock):
    """The three steps of run()'s preparation in one process: (cfg, ckpt, dataset, model,
    optimizer, device)."""
    cfg, ckpt, init, device = prepare_config(preset, overrides, lock)
    prepare_tokens(cfg, ckpt, init)
    return (cfg, ckpt, *prepare_model(cfg, ckpt, init, device)[:3], device)


def prepare_config(preset, overrides, lock):
    """The config (with --resume, the checkpoint's; with --init_from, its model's shape), the
    settings it names and the out_dir lock (rank 0)."""
    cfg, ckpt = resolve_config(preset, overrides)
    cfg, init = resolve_init(cfg, overrides)  # --init_from: another run's weights and tokenizer
    cfg.validate(model_names=list(MODELS), world_size=dist.world_size())
    try:
        device = backend.check_device(cfg.device)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(str(e)) from None
    if cfg.dist_backend == "nccl" and dist.world_size() > 1 and device != "cuda":
        raise ConfigError(f"dist_backend 'nccl' sums gradients GPU to GPU, but this rank's device "
                          f"is {device} (--device {cfg.device}): use --dist_backend mpi, or "
                          f"--device cuda with CuPy and a GPU on every rank")
    if cfg.data:
        data_path(cfg.data)  # on every rank: each must see the text it was told of (rank 0 reads it)
    kernels.use(ACCELERATORS[cfg.accelerators])
    try:
        kernels.use_mkl(ACCELERATORS[cfg.mkl])
    except RuntimeError as e:
        raise ConfigError(f"--mkl {cfg.mkl}: {e}") from None
    environment.use_tf32(cfg.tf32)
    if dist.is_main():
        lock.acquire()  # held until run() ends
        remove_stale_temps(cfg.out_dir)
    return cfg, ckpt, init, device


def configure(cfg):
    """This rank's BLAS threads and GPU gradient backend (dist.configure); what fails (NCCL
    without a usable GPU, say) is a one-line ConfigError naming the setting."""
    try:
        dist.configure(cfg.threads_per_rank, cfg.dist_backend)
    except (ValueError, RuntimeError, ImportError) as e:
        raise ConfigError(f"--threads_per_rank {cfg.threads_per_rank}, --dist_backend "
                          f"{cfg.dist_backend}: {e}") from None


def token_folder(cfg):
    return os.path.join(cfg.out_dir, "tokens")


def prepare_tokens(cfg, ckpt, init):
    """(Rank 0) the text's token files in out_dir/tokens, made once and reused while the text
    and the tokenizer stay the same (gpt/token_files.py): the tokenizer of the checkpoint when
    resuming or with --init_from, else the one --tokenizer names, built from the text."""
    path = data_path(cfg.data or None)
    given, source = ((ckpt[3], os.path.join(cfg.out_dir, "ckpt.npz")) if ckpt else
                     (init[1], init[2]) if init else (None, None))
    spec = TokenizerSpec(cfg.tokenizer, cfg.vocab_size, given)
    try:
        build_token_files(path, token_folder(cfg), spec)
    except MemoryError:  # name what does not fit: the model is not made yet
        raise DataError(f"out of memory while tokenizing {path} into {token_folder(cfg)} (it is "
                        f"read in blocks of {BLOCK_BYTES >> 20} MB): free memory, or split "
                        f"lines longer than that") from None
    except DataError as e:
        if given is None or "not in the vocabulary" not in str(e):
            raise
        raise DataError(f"{cfg.data or path} does not fit the vocabulary of {source}: {e}") from None


def prepare_model(cfg, ckpt, init, device):
    """The data (the token files), the model and the optimizer, restored from the checkpoint
    when resuming, or the model from --init_from's."""
    # the optimizer keeps freed memory for the next steps (tt.malloc), made after tokenizing:
    # its large blocks would stay in the heap
    tt.malloc.automatic = cfg.malloc_tuning
    dataset = TokenDataset(token_folder(cfg))
    dataset.check_block_size(cfg.block_size)
    if ckpt:
        check_same_data(cfg, ckpt[0].get("data"), dataset.source)
    # ----- model, its memory checked against the machine's before it is made
    gconf = cfg.model_config(dataset.tokenizer.vocab_size)
    guard.check_memory(*guard.estimate_memory(
        gconf.vocab_size, cfg.block_size, cfg.n_embd, cfg.n_head, cfg.n_layer,
        cfg.batch_size // (dist.world_size() * cfg.gradient_accumulation_steps), device),
        ranks_here=dist.local_size())
    tt.manual_seed(cfg.seed)  # parameter initialisation
    model = build_model(cfg.model, gconf)
    model.to(device)
    if init:
        try:
            model.load_state_dict(init[0])
        except (KeyError, ValueError, IndexError, TypeError) as e:
            msg = str(e.args[0]) if e.args else type(e).__name__
            raise CheckpointError(f"--init_from {init[2]} does not match the model: {msg}") from None
    # ----- optimizer: AdamW, weight decay on the 2-D weights (matmuls, embeddings) only
    optimizer = make_optimizer(model, cfg)
    if ckpt:
        try:
            model.load_state_dict(ckpt[1])
            optimizer.load_state_dict(ckpt[2])
        except (KeyError, ValueError, IndexError, TypeError) as e:
            msg = str(e.args[0]) if e.args else type(e).__name__
            raise CheckpointError(f"{cfg.out_dir}/ckpt.npz does not match the model: {msg}") from None
    return dataset, model, optimizer


def check_same_data(cfg, then, now):
    """A resume continues on the text the checkpoint was trained on: DataError when its sha256
    differs from the checkpoint's, unless --allow_data_change (checkpoints that predate the
    fingerprint are not checked)."""
    if then is None or then["sha256"] == now["sha256"] or cfg.allow_data_change:
        return
    raise DataError(f"{cfg.data or now['path']} is not the text {cfg.out_dir}/ckpt.npz was trained "
                    f"on (sha256 {now['sha256'][:12]}..., {now['size']:,} bytes; the checkpoint's: "
                    f"{then['sha256'][:12]}..., {then['size']:,} bytes): restore that text, or pass "
                    f"--allow_data_change to continue on this one")


def make_optimizer(model, cfg):
    """AdamW with weight decay on the 2-D weights (matmuls, embeddings) only, as nanoGPT."""
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))


def train(cfg, ckpt, dataset, model, optimizer, device, stop):
    """Every rank the same, the header, then the loop; returns the exit status."""
    start = ckpt[0]["step"] if ckpt else 0
    best_val = ckpt[0].get("best_val_loss") if ckpt else None
    dist.check_same(fingerprint(cfg, dataset, model, device))  # before the first broadcast
    dist.broadcast_parameters(model)
    dist.check_consistent(cfg.to_dict(), list(model.parameters()))
    reducer = GradientReducer(optimizer.flat, cfg.bucket_mb or None, cfg.overlap)
    run = Run(cfg, dataset, model, optimizer, device, best_val, start if ckpt else None)
    if ckpt and ckpt[0].get("val_loss") is not None:
        run.last_evaluated = start  # else (a signal stopped it before) evaluate it now
    stop.saved = (run.ckpt_path, start) if ckpt else None
    run.report = report = Report(cfg, start, ckpt is not None, dist.is_main())
    report.header(dataset, model, device, reducer, run.ckpt_path, ckpt is not None,
                  ckpt[4] if ckpt else ())
    if start == cfg.max_iters:
        report.say(f"nothing to do: the checkpoint is already at step {start}; raise "
                   f"--max_iters to go on")
        return 0
    model.train()
    # non-finite values are caught by the loss checks, not by NumPy's warnings
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"), stop.armed_here():
        try:
            for step in range(start, cfg.max_iters):
                if step % cfg.eval_interval == 0 and step != run.last_evaluated:
                    if not run.evaluate(step, stop):  # a signal came during the evaluation
                        return run.stopped(step, stop, "during the evaluation at")
                dist.progress(f"step {step}")  # named by the watchdog if the ranks stop meeting
                # one optimizer step on the global batch of `step`: this rank's rows
                lr = get_lr(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss = run.forward_backward(step, reducer)  # p.grad: the global batch's mean
                if cfg.grad_clip > 0:
                    clip_grad_norm_(list(model.parameters()), cfg.grad_clip)
                # the mean loss over the ranks, and whether a signal asked any rank to stop
                step_loss, *asked = dist.allreduce_mean(np.array([loss, *stop.flags()]))
                stop.agree(asked)
                if not math.isfinite(step_loss):
                    raise TrainingError(run.nonfinite(step, "training loss"))
                optimizer.step()
                report.step(step, float(step_loss), lr)
                if stop.signum is not None:  # every rank knows it (the collective above)
                    return run.stopped(step + 1, stop, "at")
            if not run.evaluate(cfg.max_iters, stop):
                return run.stopped(cfg.max_iters, stop, "during the evaluation at")
        except OSError as e:  # a file that cannot be written (a full disk): say where things stand
            raise OSError(e.errno, f"{e.strerror or e}; {run.where()}", e.filename) from None
        finally:
            report.close()
    report.say(f"done: {cfg.max_iters} steps; best val loss {run.best_val:.4f}; wrote "
               f"{run.ckpt_path}, {run.best_path}, {report.path}, "
               f"{os.path.join(cfg.out_dir, 'loss.png')}")
    return 0


class Run:
    """What the loop's helpers share: batches, evaluations and checkpoints."""

    def __init__(self, cfg, dataset, model, optimizer, device, best_val, last_saved):
        self.cfg, self.dataset, self.model, self.optimizer, self.device = (
            cfg, dataset, model, optimizer, device)
        self.best_val = math.inf if best_val is None else best_val
        self.last_saved = last_saved  # the step of the last checkpoint (None: none yet)
        self.last_evaluated = None    # the step of the last evaluation
        self.ckpt_path = os.path.join(cfg.out_dir, "ckpt.npz")
        self.best_path = os.path.join(cfg.out_dir, "best.npz")
        self.report = None

    def forward_backward(self, step, reducer):
        """The forward and backward passes of optimizer step `step` on this rank's part of the
        global batch; returns this rank's mean loss, and leaves in each p.grad the gradient of
        the mean loss over the whole global batch (summed over the ranks by the reducer).

        Every rank draws the same global batch of batch_size rows and cuts it into K * W
        micro-batches (K = gradient_accumulation_steps, W ranks): rank r runs micro-batches
        r*K, ..., r*K + K-1, one forward and backward each. Each loss is divided by K, so the
        gradients add up to the mean over the rank's rows; the reducer then averages over the
        ranks. It sums only after the last micro-batch: the K-1 before run under no_sync().
        Dropout draws from a stream of (seed, step, micro-batch), so the same rows get the same
        masks whatever K and W are, as long as K * W is the same."""
        cfg, K = self.cfg, self.cfg.gradient_accumulation_steps
        x, y = self.dataset.get_batch("train", cfg.batch_size, cfg.block_size,
                                      stream(cfg.seed, TRAIN_STREAM, step))
        m = cfg.batch_size // (K * dist.world_size())  # rows per micro-batch
        self.optimizer.zero_grad()
        total = 0.0
        for k in range(K):
            g = dist.rank() * K + k  # the micro-batch's place in the global batch
            rows = slice(g * m, (g + 1) * m)
            seed_dropout(cfg.seed, step, g)
            with reducer.no_sync() if k < K - 1 else contextlib.nullcontext():
                _, loss = self.model(backend.to_device(x[rows], self.device),
                                     backend.to_device(y[rows], self.device))
                (loss / K).backward()  # the reducer sums gradient buckets meanwhile (last k)
            total += loss.item()
        reducer.finish()  # the rest: each p.grad is now the mean over the ranks
        return total / K

    def evaluate(self, step, stop):
        """The lecture's estimate_loss() on both splits in eval mode, then (rank 0) its line,
        best.npz when the val loss improved, ckpt.npz and loss.png. Batch k of split s comes
        from stream (seed, EVAL_STREAM, step, s, k), so evaluating never consumes training
        randomness; under MPI rank r evaluates batches r, r+W, ..., averaged over the ranks.
        With gradient accumulation a batch goes through the model in K pieces (the mean of
        their losses), so evaluating needs no more memory than a training micro-batch would.
        Returns False, having evaluated only part, when a signal asked to stop: every round of
        W batches ends with the ranks agreeing on that (a long evaluation would otherwise
        outlast a scheduler's grace period)."""
        cfg, losses = self.cfg, {}
        dist.progress(f"the evaluation of step {step}")
        piece = cfg.batch_size // cfg.gradient_accumulation_steps
        W = dist.world_size()
        self.last_evaluated = step
        self.model.eval()
        try:
            with tt.no_grad():
                for split_id, split in enumerate(("train", "val")):
                    total, count = 0.0, 0
                    for first in range(0, cfg.eval_iters, W):  # a round: batch first + r on rank r
                        k = first + dist.rank()
                        if k < cfg.eval_iters:
                            x, y = self.dataset.get_batch(split, cfg.batch_size, cfg.block_size,
                                                          stream(cfg.seed, EVAL_STREAM, step, split_id, k))
                            for i in range(0, cfg.batch_size, piece):
                                _, loss = self.model(backend.to_device(x[i:i + piece], self.device),
                                                     backend.to_device(y[i:i + piece], self.device))
                                total, count = total + loss.item(), count + 1
                        stop.agree(dist.allreduce_mean(np.array(stop.flags())))
                        if stop.signum is not None:
                            self.last_evaluated = None
                            return False
                    s, n = dist.allreduce_mean(np.array([total, count], dtype=np.float64))
                    losses[split] = float(s / n)  # the ratio of the means: the mean over all batches
        finally:
            self.model.train()
        self.report.say(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        if not (math.isfinite(losses["train"]) and math.isfinite(losses["val"])):
            raise TrainingError(self.nonfinite(step, "evaluation loss"))
        self.report.evaluation(step, losses)
        if dist.is_main() and losses["val"] < self.best_val:
            self.best_val = losses["val"]
            save_checkpoint(self.best_path, self.meta(step, losses), self.model)
        self.save(step, stop, losses)
        self.report.plot()
        self.report.restart_clock()  # not step time
        return True

    def stopped(self, step, stop, when):
        """After a stop signal that every rank agreed on: ckpt.npz at `step`, the line that says
        so, and the exit status (130 for SIGINT, 143 for SIGTERM)."""
        self.save(step, stop)
        self.report.say(f"stopped by {stop.name} {when} step {step}: wrote {self.ckpt_path}; "
                        f"continue with --resume")
        return stop.exit_code

    def where(self):
        """Where the last checkpoint stands, for an error line."""
        if self.last_saved is None:
            return "no checkpoint was written"
        return f"the last checkpoint {self.ckpt_path} (step {self.last_saved}) is intact"

    def save(self, step, stop, losses=None):
        """ckpt.npz at `step` (rank 0), with the optimizer's state; losses None when a signal
        stopped the run (no time to evaluate)."""
        if dist.is_main():
            save_checkpoint(self.ckpt_path, self.meta(step, losses), self.model, self.optimizer)
            stop.saved = (self.ckpt_path, step)
        else:  # rank 0 writes it: certainly written once the ranks have met again (stop.agree)
            stop.writing = (self.ckpt_path, step)
        self.last_saved = step

    def meta(self, step, losses=None):
        src = self.dataset.source
        return run_meta(self.cfg, self.dataset.tokenizer, step, self.best_val, dist.world_size(),
                        losses, {k: src[k] for k in ("path", "size", "sha256")})

    def nonfinite(self, step, what):
        kept = (f"the last good checkpoint {self.ckpt_path} (step {self.last_saved}) is kept"
                if self.last_saved is not None else "no checkpoint was written")
        clip = (f"a lower --grad_clip (now {self.cfg.grad_clip:g})" if self.cfg.grad_clip > 0
                else "--grad_clip 1.0")
        return (f"non-finite {what} at step {step}: training stopped; {kept}; "
                f"try a lower --learning_rate (now {self.cfg.learning_rate:g}) or {clip}")


def get_lr(step, cfg):
    """The learning rate for optimizer step `step` (0-based): the config's optim.lr_schedule."""
    return lr_schedule(step, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters,
                       cfg.lr_decay_iters or cfg.max_iters, decay=cfg.lr_decay)


def stream(seed, *key):
    """A NumPy Generator determined by (seed, *key) alone, e.g. stream(seed, TRAIN_STREAM, step)."""
    return np.random.default_rng([seed, *key])


def seed_dropout(seed, step, micro):
    """Reseed tinytensor's stream (dropout masks) for this step and micro-batch (the rank, when
    there is one micro-batch per rank)."""
    state = np.random.SeedSequence([seed, DROPOUT_STREAM, step, micro]).generate_state(1, np.uint64)
    tt.manual_seed(int(state[0]))


def fingerprint(cfg, dataset, model, device):
    """What every rank must agree on before the first broadcast (dist.check_same): the config
    (run-time settings included), the data (its size, sha256 and vocabulary), the parameters'
    dtype and the device. Empty in one process."""
    if dist.world_size() == 1:
        return {}
    values = {f"--{k}": v for k, v in cfg.to_dict().items()}
    values.update({"data": dataset.fingerprint(),
                   "dtype": str(next(iter(model.parameters())).dtype), "device": device,
                   "accelerated": [kernels.enabled(device), kernels.numba_loops() is not None]})
    return values


# The errors bad input or the environment can raise, with their exit status; and those of them
# every rank raises alike (guard.boundary prints them once, from rank 0).
KNOWN_ERRORS = [(ConfigError, 2),
                ((DataError, CheckpointError, TrainingError, guard.LockError, guard.OutOfMemory,
                  guard.RankError, dist.DistributedError, OSError, MemoryError), 1)]
EVERY_RANK = (ConfigError, TrainingError, guard.RankError, dist.RankMismatchError)


if __name__ == "__main__":
    sys.exit(main())
