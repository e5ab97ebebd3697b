#!/usr/bin/env python3
"""Generate text from a checkpoint written by train/train.py.

    python train/sample.py --out_dir out --start "ROMEO:" --max_new_tokens 300 --top_k 40 --top_p 0.9

Loads out_dir/ckpt.npz (or best.npz with --best: the weights with the lowest val loss),
rebuilds the model from the config saved in it and prints --num_samples samples.
Without --start the sample starts from token 0, as in the lecture (a newline with a BPE
tokenizer).
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path[0] != ROOT:  # run from any directory, installed or not; first, also when
    sys.path.insert(0, ROOT)  # PYTHONPATH has it: else `train` is train/train.py, not the package

import numpy as np  # noqa: E402

import tinytensor as tt  # noqa: E402
from gpt.tokenizer import CharTokenizer  # noqa: E402
from tinytensor import backend  # noqa: E402
from train import guard  # noqa: E402
from train.checkpoint import CheckpointError, load_checkpoint, load_tokenizer  # noqa: E402
from train.config import ConfigError, config_from_dict  # noqa: E402


class UsageError(ValueError):
    """A bad command line; the message is one line for the user."""


MAX_NEW_TOKENS = 1_000_000  # per sample: generate() keeps them all and returns at the end


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage + message
        raise UsageError(message)


def parse_args(argv):
    p = _Parser(description="Generate text from a train/train.py checkpoint.")
    p.add_argument("--out_dir", default="out", help="folder holding ckpt.npz / best.npz (default: out)")
    p.add_argument("--best", action="store_true", help="use best.npz (lowest val loss) instead of ckpt.npz")
    p.add_argument("--start", default=None, help="the prompt (default: token 0, as in the lecture)")
    p.add_argument("--max_new_tokens", type=int, default=500,
                   help=f"characters to generate per sample, 0 to {MAX_NEW_TOKENS:,}")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="> 0; lower is more conservative (a tiny one picks the likeliest)")
    p.add_argument("--top_k", type=int, default=0,
                   help="sample among the k likeliest (0, or more than the vocabulary: all)")
    p.add_argument("--top_p", type=float, default=1.0,
                   help="sample among the likeliest tokens whose probability reaches p, in (0, 1] "
                        "(1 = all; applied after --temperature and --top_k)")
    p.add_argument("--seed", type=int, default=1337,
                   help="random seed of the sampling, 0 to 2**64 - 1")
    p.add_argument("--num_samples", type=int, default=1, help="how many samples to print")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    a = p.parse_args(argv)
    if not 0 <= a.max_new_tokens <= MAX_NEW_TOKENS:
        raise UsageError(f"--max_new_tokens must be 0 to {MAX_NEW_TOKENS:,} (a sample is kept in "
                         f"memory and printed when complete), got {a.max_new_tokens}")
    if not (a.temperature > 0 and np.isfinite(a.temperature)):
        raise UsageError(f"--temperature must be a positive number, got {a.temperature}")
    if a.top_k < 0:
        raise UsageError(f"--top_k must be >= 0 (0 = no limit), got {a.top_k}")
    if not 0.0 < a.top_p <= 1.0:  # NaN fails too
        raise UsageError(f"--top_p must be in (0, 1] (1 = no limit), got {a.top_p}")
    if a.num_samples < 1:
        raise UsageError(f"--num_samples must be >= 1, got {a.num_samples}")
    if not 0 <= a.seed <= 2**64 - 1:
        raise UsageError(f"--seed must be in [0, 2**64 - 1] (64 bits, what tinytensor.manual_seed "
                         f"and torch.manual_seed take), got {a.seed}")
    return a


def load_model(path, device="cpu"):
    """(model in eval mode, tokenizer, meta) from a checkpoint; CheckpointError if unusable."""
    from gpt.model import GPTConfig, build_model

    meta, model_state, _ = load_checkpoint(path)
    tokenizer = load_tokenizer(meta, path)
    try:
        cfg = config_from_dict(meta["config"])
        gconf = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=cfg.block_size, n_embd=cfg.n_embd,
                          n_head=cfg.n_head, n_layer=cfg.n_layer, dropout=0.0)
        model = build_model(cfg.model, gconf)
        model.load_state_dict(model_state)
    except (ConfigError, KeyError, ValueError, TypeError) as e:
        msg = str(e.args[0]) if e.args else type(e).__name__
        raise CheckpointError(f"{path} does not hold a usable model: {msg}") from None
    model.to(device)
    model.eval()
    return model, tokenizer, meta


def main(argv=None):
    """sample() inside guard.boundary: a bad command line exits 2, an unusable checkpoint (or
    another file or memory error) 1, each with one `error:` line; Ctrl-C (130) and a closed
    output pipe (141, `sample.py | head`) end quietly."""
    argv = sys.argv[1:] if argv is None else list(argv)
    known = [(UsageError, 2), ((CheckpointError, OSError, MemoryError), 1)]
    return guard.boundary(lambda: sample(argv), known, stopped=lambda why: None)


def sample(argv):
    """Print the samples the command line asks for; reads out_dir without taking its lock."""
    args = parse_args(argv)
    try:
        device = backend.check_device(args.device)
    except (ValueError, RuntimeError) as e:
        raise UsageError(str(e)) from None
    path = os.path.join(args.out_dir, "best.npz" if args.best else "ckpt.npz")
    model, tokenizer, meta = load_model(path, device)
    if args.start and isinstance(tokenizer, CharTokenizer):
        unknown = sorted(set(args.start) - set(tokenizer.chars))
        if unknown:
            raise UsageError(f"--start has characters outside the checkpoint's vocabulary: "
                             f"{', '.join(map(repr, unknown))}")
        prompt = tokenizer.encode(args.start)
    elif args.start:  # BPE: any text has its bytes
        prompt = tokenizer.encode(args.start, disallowed_special=())
    else:  # token 0, as in the lecture ('\n' in tiny Shakespeare); BPE: a newline's token
        prompt = [0] if isinstance(tokenizer, CharTokenizer) else tokenizer.encode("\n")

    tt.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    idx = np.array([prompt], dtype=np.int64)  # (1, T)
    for i in range(args.num_samples):
        out = model.generate(idx, args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k or None, rng=rng, top_p=args.top_p)
        if i:
            print("-" * 40)
        print(tokenizer.decode(backend.to_numpy(out)[0].tolist()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
