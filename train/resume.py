"""The config of a run: the command line's, or with --resume the checkpoint's updated by it.

    cfg, ckpt = resolve_config(preset, overrides)   # ckpt: None, or what resuming needs (and notes)
    cfg, init = resolve_init(cfg, overrides)        # --init_from: the weights to start from

A resume continues the checkpoint's run: its config, updated by the options the command line
names (a --config preset is not applied: the notes say which of its values differ), except the
fields that fix the model's shape and its tokenizer, which cannot change. The notes also list
each named option that changes the checkpoint's value.

--init_from starts a new run (its own out_dir, a fresh optimizer and schedule) from another
run's weights and tokenizer: the model's shape comes from that checkpoint, and a shape field
the command line names must agree with it.
"""
import os
from dataclasses import replace

from train.checkpoint import CheckpointError, load_checkpoint, load_tokenizer
from train.config import MODEL_SHAPE_FIELDS, PRESETS, TOKENIZER_FIELDS, ConfigError, config_from_dict, make_config


def resolve_config(preset, overrides):
    """The run's TrainConfig and, with --resume, the loaded checkpoint (meta, model state,
    optimizer state, tokenizer), every field of its meta checked."""
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
    # the saved config, updated by the options this command line names; a --config preset
    # names none of them (its values would silently change the run), so it is only reported
    cfg = replace(saved, **overrides)
    cfg = replace(cfg, resume=True, out_dir=make_config(preset, overrides).out_dir,
                  allow_data_change=overrides.get("allow_data_change", False))  # this resume only
    notes = [f"--resume: from the checkpoint: {', '.join(changes(saved, cfg, overrides))}"
             if changes(saved, cfg, overrides) else None]
    ignored = [k for k, v in (PRESETS[preset] if preset else {}).items()
               if k not in overrides and v != getattr(saved, k)]
    if ignored:
        notes.append(f"--resume: the checkpoint's {', '.join(f'{k} {getattr(saved, k)!r}' for k in ignored)} "
                     f"kept, not the {preset!r} preset's (name an option to change it)")
    changed = [f"{k}={getattr(saved, k)!r} -> {getattr(cfg, k)!r}"
               for k in MODEL_SHAPE_FIELDS + TOKENIZER_FIELDS if getattr(saved, k) != getattr(cfg, k)]
    if changed:
        raise ConfigError(f"--resume: the model in {path} has a different shape ({', '.join(changed)}); "
                          f"these cannot change on resume: use the checkpoint's values or another out_dir")
    if meta["step"] > cfg.max_iters:
        raise ConfigError(f"max_iters ({cfg.max_iters}) is below the checkpoint's step "
                          f"({meta['step']}); pass --max_iters {meta['step']} or more")
    return cfg, (meta, model_state, optim_state, tokenizer, [n for n in notes if n])


def changes(saved, cfg, overrides):
    """'name old -> new' for each option the command line names that differs from the
    checkpoint's (resume and out_dir, which say where the run is, aside)."""
    return [f"{k} {getattr(saved, k)!r} -> {getattr(cfg, k)!r}" for k in overrides
            if k not in ("resume", "out_dir") and getattr(saved, k) != getattr(cfg, k)]


def init_path(init_from):
    """The checkpoint file --init_from names: the file itself, or ckpt.npz in a run's out_dir."""
    return os.path.join(init_from, "ckpt.npz") if os.path.isdir(init_from) else init_from


def resolve_init(cfg, overrides):
    """With cfg.init_from: cfg with the model's shape of that checkpoint, and (model state,
    tokenizer, path) to start from; (cfg, None) without it."""
    if not cfg.init_from or cfg.resume:
        return cfg, None
    path = init_path(cfg.init_from)
    if os.path.abspath(path) == os.path.abspath(os.path.join(cfg.out_dir, "ckpt.npz")):
        raise ConfigError(f"--init_from {cfg.init_from} is this run's own checkpoint, which the new "
                          f"run would overwrite: give the new run another --out_dir (or continue "
                          f"that run with --resume)")
    meta, model_state, _ = load_checkpoint(path)
    try:
        saved = config_from_dict(meta["config"])
    except ConfigError as e:
        raise CheckpointError(f"{path}: unusable saved config ({e})") from None
    tokenizer = load_tokenizer(meta, path)
    fixed = MODEL_SHAPE_FIELDS + TOKENIZER_FIELDS
    changed = [f"{k} {overrides[k]!r} here, {getattr(saved, k)!r} in {path}"
               for k in fixed if k in overrides and overrides[k] != getattr(saved, k)]
    if changed:
        raise ConfigError(f"--init_from: the model in {path} has another shape or tokenizer "
                          f"({'; '.join(changed)}): leave these options out to take the checkpoint's")
    cfg = replace(cfg, **{k: getattr(saved, k) for k in fixed})
    return cfg, (model_state, tokenizer, path)
