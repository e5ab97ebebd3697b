"""Training configuration: the TrainConfig dataclass, its presets and its command line.

    python train/train.py --config small --max_iters 500 --dropout=0.1

`--config NAME` picks a preset (default: small); every field can then be overridden as
`--key value` or `--key=value`, converted to the field's type and checked. A bool field
also works as a bare flag (`--resume` means `--resume true`). The argparse parser is built
from the dataclass: one option per field, typed by the field, its help the field's comment,
its default the preset's value.
"""
import argparse
import dataclasses
import inspect
import json
import math
import re
from dataclasses import dataclass, fields
from gettext import gettext


class ConfigError(ValueError):
    """A bad command line or an invalid config value; the message is one line for the user."""


@dataclass
class TrainConfig:
    # ----- model
    model: str = "gpt"              # which lecture stage to build (gpt.model.MODELS): bigram ... gpt
    block_size: int = 64            # context length in characters (T)
    n_embd: int = 128               # embedding width (C); must be divisible by n_head
    n_head: int = 4                 # attention heads per block (nh); head size hs = n_embd // n_head
    n_layer: int = 4                # transformer blocks
    dropout: float = 0.0            # dropout probability in [0, 1) (attention, projections, MLP)
    fused: bool = True              # fused attention and linear+ReLU ops (False: the ops as the
                                    # lecture writes them; same result, slower)
    # ----- optimisation
    batch_size: int = 12            # sequences per optimizer step, the GLOBAL batch across all MPI
                                    # ranks and micro-batches (B)
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step (K): each rank runs K
                                    # forward/backward passes of batch_size / (K * ranks) rows
    max_iters: int = 2000           # total optimizer steps (may be raised when resuming)
    learning_rate: float = 1e-3     # peak AdamW learning rate
    lr_decay: str = "none"          # learning-rate schedule after warmup: none | cosine
    warmup_iters: int = 0           # linear warmup steps from ~0 to learning_rate (0 = none)
    lr_decay_iters: int = 0         # step at which cosine decay reaches min_lr (0 = max_iters)
    min_lr: float = 1e-4            # final learning rate of the cosine schedule
    weight_decay: float = 0.01      # AdamW decoupled weight decay, applied to 2-D weights only
    beta1: float = 0.9              # AdamW first-moment decay
    beta2: float = 0.999            # AdamW second-moment decay
    grad_clip: float = 0.0          # clip the global gradient norm to this value (0 = off)
    # ----- evaluation and logging
    eval_interval: int = 250        # evaluate, print, plot and checkpoint every this many steps
    eval_iters: int = 20            # batches per split in each evaluation (estimate_loss)
    log_interval: int = 10          # write a metrics.jsonl line (and a log line) every this many steps
    # ----- run
    seed: int = 1337                # the one seed of the run: init, batches, dropout all derive from it
    device: str = "auto"            # cpu | cuda | auto (cuda when a GPU is usable, else cpu)
    data: str = ""                  # UTF-8 text file to train on ("" = tiny Shakespeare)
    tokenizer: str = "char"         # char (the lecture's: one token per character) | bpe (byte-level
                                    # BPE learned from the text, --vocab_size tokens)
    vocab_size: int = 0             # --tokenizer bpe: the vocabulary's size, >= 256 (e.g. 512)
    out_dir: str = "out"            # where ckpt.npz, best.npz, metrics.jsonl and loss.png are written
    resume: bool = False            # continue from out_dir/ckpt.npz instead of starting afresh
    allow_data_change: bool = False  # --resume: continue although the text changed since the
                                    # checkpoint (its sha256 differs); applies to this resume only
    init_from: str = ""             # start a new run from the weights and tokenizer of this
                                    # checkpoint (a .npz, or a run's out_dir): fine-tuning
    # ----- speed (how the run computes, not what it trains)
    accelerators: str = "auto"      # the faster versions of the fused ops (tinytensor/kernels/):
                                    # on | off (the plain reference) | auto (CUDA kernels on a GPU;
                                    # compiled CPU loops and threads where numba is installed)
    mkl: str = "auto"               # the linear layers' products on the CPU by Intel MKL
                                    # (tinytensor/kernels/mkl.py): on | off (NumPy's BLAS) | auto
                                    # (MKL where the mkl wheel is installed and the CPU is Intel's)
    malloc_tuning: bool = True      # keep freed memory for reuse between steps (glibc; tinytensor.malloc)
    tf32: bool = False              # TF32 tensor-core float32 matmuls on a GPU (CuPy's CUPY_TF32)
    overlap: bool = True            # under mpirun: sum gradient buckets over the ranks during backward
    bucket_mb: float = 0.0          # under mpirun: MB per gradient bucket (0 = 1 with overlap, else 25)
    threads_per_rank: int = 0       # under mpirun: BLAS threads per rank (0 = cores / ranks per node)
    dist_backend: str = "mpi"       # under mpirun: how GPU gradients are summed: mpi (through host
                                    # memory) | nccl (GPU to GPU)
    collective_timeout: float = 600.0  # under mpirun: seconds a rank may wait for the others in one
                                    # collective before the job is ended (0 = never, else >= 1)

    def to_dict(self):
        return dataclasses.asdict(self)

    def to_json(self):
        return json.dumps(self.to_dict(), sort_keys=True)

    def model_config(self, vocab_size):
        """The gpt.model.GPTConfig of this run's model, for a vocabulary of vocab_size."""
        from gpt.model import GPTConfig
        return GPTConfig(vocab_size=vocab_size, block_size=self.block_size, n_embd=self.n_embd,
                         n_head=self.n_head, n_layer=self.n_layer, dropout=self.dropout,
                         fused=self.fused)

    def validate(self, model_names=None, world_size=1):
        """Raise ConfigError with a one-line message on the first invalid value (the model's
        fields as GPTConfig.validate checks them)."""
        try:
            self.model_config(vocab_size=1).validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        for name in ("batch_size", "gradient_accumulation_steps", "max_iters", "eval_interval",
                     "eval_iters", "log_interval"):
            value = getattr(self, name)
            if value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value}")
        for name in ("warmup_iters", "lr_decay_iters", "seed"):
            value = getattr(self, name)
            if value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value}")
        if self.seed > 2**64 - 1:
            raise ConfigError(f"seed must be in [0, 2**64 - 1] (64 bits, what tinytensor."
                              f"manual_seed and torch.manual_seed take), got {self.seed}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ConfigError(f"learning_rate must be a positive finite number, got {self.learning_rate}")
        for name in ("min_lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value}")
        if self.lr_decay not in ("none", "cosine"):
            raise ConfigError(f"lr_decay must be 'none' or 'cosine', got {self.lr_decay!r}")
        if self.lr_decay == "cosine" and self.min_lr > self.learning_rate:
            raise ConfigError(f"min_lr ({self.min_lr:g}) is above learning_rate "
                              f"({self.learning_rate:g}): the cosine decay would raise the rate; "
                              f"pass a --min_lr of at most {self.learning_rate:g}")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ConfigError(f"device must be 'cpu', 'cuda' or 'auto', got {self.device!r}")
        if self.accelerators not in ACCELERATORS:
            raise ConfigError(f"accelerators must be 'auto', 'on' or 'off', got {self.accelerators!r}")
        if self.mkl not in ACCELERATORS:
            raise ConfigError(f"mkl must be 'auto', 'on' or 'off', got {self.mkl!r}")
        if not (math.isfinite(self.bucket_mb) and 0 <= self.bucket_mb <= 1e6):
            raise ConfigError(f"bucket_mb must be a size in MB, 0 (the default) to 1e6, got "
                              f"{self.bucket_mb}")
        if not 0 <= self.threads_per_rank <= 4096:
            raise ConfigError(f"threads_per_rank must be 0 (automatic) to 4096, got "
                              f"{self.threads_per_rank}")
        if self.dist_backend not in ("mpi", "nccl"):
            raise ConfigError(f"dist_backend must be 'mpi' or 'nccl', got {self.dist_backend!r}")
        if not (self.collective_timeout == 0 or 1 <= self.collective_timeout < math.inf):
            raise ConfigError(f"collective_timeout must be 0 (never) or at least 1 second, got "
                              f"{self.collective_timeout}")
        if self.dist_backend == "nccl" and self.device == "cpu":
            raise ConfigError("dist_backend 'nccl' sums GPU gradients: it needs --device cuda "
                              "(or use --dist_backend mpi)")
        if self.tokenizer not in ("char", "bpe"):
            raise ConfigError(f"tokenizer must be 'char' or 'bpe', got {self.tokenizer!r}")
        if self.tokenizer == "char" and self.vocab_size != 0:
            raise ConfigError(f"vocab_size is for --tokenizer bpe (the char tokenizer's vocabulary "
                              f"is the text's characters), got --vocab_size {self.vocab_size}")
        if self.tokenizer == "bpe" and not 256 <= self.vocab_size <= 1 << 20:
            raise ConfigError(f"--tokenizer bpe needs a --vocab_size from 256 (the bytes) to "
                              f"{1 << 20}, e.g. --vocab_size 512; got {self.vocab_size}")
        if not self.out_dir:
            raise ConfigError("out_dir must not be empty")
        if model_names is not None and self.model not in model_names:
            raise ConfigError(f"unknown model {self.model!r}; choose one of: {', '.join(model_names)}")
        parts = world_size * self.gradient_accumulation_steps
        if self.batch_size % parts != 0:
            split = (f"the number of MPI ranks ({world_size})" if self.gradient_accumulation_steps == 1
                     else f"gradient_accumulation_steps x MPI ranks ({self.gradient_accumulation_steps}"
                          f" x {world_size} = {parts})")
            raise ConfigError(f"batch_size ({self.batch_size}) must be divisible by {split}: it is "
                              f"the global batch, split evenly into micro-batches")


# accelerators, mkl: tinytensor.kernels.use()'s and use_mkl()'s argument for each value of the field
ACCELERATORS = {"auto": None, "on": True, "off": False}

# Fields that fix the model's parameter shapes: a checkpoint can only be resumed with the same.
MODEL_SHAPE_FIELDS = ("model", "block_size", "n_embd", "n_head", "n_layer")
# Fields that fix the tokenizer (and so the vocabulary): the checkpoint's, when there is one.
TOKENIZER_FIELDS = ("tokenizer", "vocab_size")

# The lecture's small-scale settings for its stage-by-stage models (block 8, 32 channels).
_STAGE = dict(batch_size=32, block_size=8, n_embd=32, n_head=4, n_layer=3, dropout=0.0,
              learning_rate=1e-3, max_iters=5000, eval_interval=500, eval_iters=200, log_interval=100)

PRESETS = {
    # the default on a CPU: the lecture's GPT, scaled to train in minutes; the cosine decay to
    # min_lr gains ~0.07 val loss at step 2000 over the lecture's constant rate (--lr_decay none)
    "small": dict(model="gpt", batch_size=12, block_size=64, n_embd=128, n_head=4, n_layer=4,
                  dropout=0.0, learning_rate=1e-3, lr_decay="cosine", min_lr=1e-4, max_iters=2000,
                  eval_interval=250, eval_iters=20, log_interval=10),
    # the lecture's final hyperparameters (for a GPU)
    "lecture": dict(model="gpt", batch_size=64, block_size=256, n_embd=384, n_head=6, n_layer=6,
                    dropout=0.2, learning_rate=3e-4, max_iters=6000, eval_interval=500,
                    eval_iters=200, log_interval=10),
    # one per lecture stage, named after gpt.model.MODELS, each with the lecture's settings
    "bigram": dict(_STAGE, model="bigram", learning_rate=1e-2, max_iters=3000, eval_interval=300),
    "bigram_pos": dict(_STAGE, model="bigram_pos", learning_rate=1e-2, max_iters=3000,
                       eval_interval=300),
    "single_head": dict(_STAGE, model="single_head", n_head=1),
    "multi_head": dict(_STAGE, model="multi_head"),
    "ffwd": dict(_STAGE, model="ffwd"),
    "blocks": dict(_STAGE, model="blocks"),
    "layernorm": dict(_STAGE, model="layernorm"),
    "gpt": dict(_STAGE, model="gpt", dropout=0.2),
}
DEFAULT_PRESET = "small"

_TRUE, _FALSE = ("true", "1"), ("false", "0")


def field_types():
    return {f.name: f.type for f in fields(TrainConfig)}


def convert(name, text):
    """Convert the command-line string `text` to the type of field `name`."""
    kind = field_types()[name]
    if kind is bool:
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"--{name}: {text!r} is not a bool (expected true, false, 1 or 0)")
    if kind is int:
        try:
            return int(text.strip(), 10)
        except ValueError:
            raise ConfigError(f"--{name}: {text!r} is not an int (e.g. --{name} "
                              f"{getattr(TrainConfig(), name)})") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"--{name}: {text!r} is not a float (e.g. --{name} "
                              f"{getattr(TrainConfig(), name)})") from None
    return text


def field_help():
    """{field: comment} read from the comments in TrainConfig's source (for --help); a comment
    line indented deeper than the fields continues the comment above it."""
    try:
        source = inspect.getsource(TrainConfig)
    except (OSError, TypeError):
        return {}
    found = re.findall(r"^    (\w+): \w+ = .*?#\s*(.*(?:\n {5,}#.*)*)$", source, flags=re.M)
    return {name: re.sub(r"\s*\n\s*#\s*", " ", text) for name, text in found}


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError (one line) instead of printing usage and exiting."""

    def __init__(self):
        super().__init__(prog="train.py", add_help=False, allow_abbrev=False, exit_on_error=False)
        # only --names are options: a value may start with one dash (-3, -1e-3, -file.txt)
        self._negative_number_matcher = re.compile(r"^-(?!-)")

    def error(self, message):
        raise ConfigError(message)


class _Override(argparse.Action):
    """Store the value and note the field as given, in command-line order (the overrides)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        vars(namespace).setdefault("_given", {})[self.dest] = values


def _typed(name):
    """The argparse type of field `name`: convert() with its message kept for the error."""
    def to_value(text):
        try:
            return convert(name, text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return to_value


def _preset(text):
    if text not in PRESETS:
        raise argparse.ArgumentTypeError(f"unknown preset {text!r}; presets: {', '.join(PRESETS)}")
    return text


def build_parser(preset=None):
    """The command line: --config, then one --field per TrainConfig field, typed by the field,
    its help the field's comment and its default the preset's value (default: small)."""
    parser, helps, defaults = _Parser(), field_help(), make_config(preset)
    parser.add_argument("--config", type=_preset, choices=list(PRESETS), default=preset,
                        metavar="PRESET", help="the preset the options below start from")
    parser.fields = [
        parser.add_argument(f"--{f.name}", action=_Override, type=_typed(f.name),
                            default=getattr(defaults, f.name), metavar=f.type.__name__.upper(),
                            help=helps.get(f.name, ""),
                            # a bool also works as a bare flag: --resume means --resume true
                            **(dict(nargs="?", const=True) if f.type is bool else {}))
        for f in fields(TrainConfig)]
    return parser


def usage(preset=None):
    """The --help text; each option's default is its value in the preset (default: small)."""
    preset = preset or DEFAULT_PRESET
    lines = ["usage: train.py [--config PRESET] [--key value | --key=value ...]",
             f"presets: {', '.join(PRESETS)} (default {DEFAULT_PRESET})",
             f"options (defaults: the {preset!r} preset; `--config NAME --help` shows another's):"]
    for a in build_parser(preset).fields:
        lines.append(f"  {a.option_strings[0]} {a.metavar:5s} {a.help} [default {a.default!r}]")
    return "\n".join(lines)


def help_text(argv):
    """The --help text when argv asks for it (-h or --help), with the defaults of the preset
    it names (or the default one's), else None."""
    if not any(a in ("-h", "--help") for a in argv):
        return None
    try:
        preset = parse_args([a for a in argv if a not in ("-h", "--help")])[0]
    except ConfigError:
        preset = None  # the help is still wanted: show the default preset's
    return usage(preset)


def parse_args(argv):
    """Parse `[--config NAME] [--key value | --key=value ...]`.

    Returns (preset name or None, {field: value}) in command-line order; raises ConfigError.
    A bool field given as the last token or followed by another --option means true.
    """
    argv = list(argv)
    if "--" in argv:  # argparse's end of options; this command line has no positionals
        raise ConfigError("unexpected argument '--': options look like --key value")
    try:
        args, extras = build_parser().parse_known_args(argv)
    except argparse.ArgumentError as e:
        if e.argument_name and e.message == gettext("expected one argument"):  # argparse's own
            raise ConfigError(f"{e.argument_name} needs a value") from None
        raise ConfigError(e.message) from None
    if extras:
        token = extras[0]
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r}: options look like --key value")
        raise ConfigError(f"unknown option {token.partition('=')[0]}; valid options: --config, "
                          + ", ".join("--" + k for k in field_types()))
    return args.config, dict(vars(args).get("_given", {}))


def make_config(preset=None, overrides=None):
    """The preset's config (default: small) with the overrides applied (unvalidated)."""
    values = dict(PRESETS[preset or DEFAULT_PRESET])
    values.update(overrides or {})
    return TrainConfig(**values)


# Fields added after checkpoints were first written: a saved config without one gets its default.
# Every other field must be there: a default would silently change the run (n_embd 128 -> 32).
LATER_FIELDS = ("fused", "accelerators", "mkl", "malloc_tuning", "tf32", "overlap", "bucket_mb",
                "threads_per_rank", "dist_backend", "gradient_accumulation_steps", "init_from",
                "tokenizer", "vocab_size", "allow_data_change", "collective_timeout")


def config_from_dict(d):
    """A TrainConfig from a saved dict (e.g. a checkpoint's): every field present (except
    LATER_FIELDS) and of its type, no unknown ones; ConfigError otherwise."""
    if not isinstance(d, dict):
        raise ConfigError(f"the saved config is not an object of fields: {str(d)[:60]}")
    types = field_types()
    unknown = sorted(set(d) - set(types))
    if unknown:
        raise ConfigError(f"saved config has unknown fields {unknown}")
    missing = [k for k in types if k not in d and k not in LATER_FIELDS]
    if missing:
        raise ConfigError(f"saved config lacks the fields {missing}")
    for name, value in d.items():
        kind = types[name]
        ok = (isinstance(value, bool) if kind is bool else
              isinstance(value, kind) and not isinstance(value, bool) if kind in (int, str) else
              isinstance(value, (int, float)) and not isinstance(value, bool))
        if not ok:
            raise ConfigError(f"saved config field {name} should be a {kind.__name__}, got "
                              f"{json.dumps(value)[:40]}")
    return TrainConfig(**d)


def format_config(cfg):
    """The full config, one `name = value` per line."""
    width = max(len(f.name) for f in fields(TrainConfig))
    return "\n".join(f"  {f.name:<{width}} = {getattr(cfg, f.name)!r}" for f in fields(TrainConfig))
