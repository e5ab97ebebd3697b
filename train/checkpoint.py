"""Checkpoints as plain .npz files: written atomically, read without pickle.

A checkpoint holds
    meta              a 0-d unicode array: JSON with the step, config, tokenizer, ...
    model/<name>      one array per model parameter (its state_dict)
    optim/<i>/<key>   AdamW state of parameter i (step, exp_avg, exp_avg_sq), when saved

`atomic_write` (every file train.py writes) writes a temporary `.NAME.XXXXXXXX.tmp` in the
same directory, flushes and fsyncs it, then os.replace()s it over the target: a crash at any
moment leaves either the old file or the new one, never a torn one; the temporary file is
removed on any exception (Ctrl-C included), and `remove_stale_temps` removes those a killed
run left. `load_npz` opens with allow_pickle=False and turns every way a file can be missing
or broken into one CheckpointError line; `unpack` and `load_metrics` check every field they read.
"""
import json
import os
import re
import tempfile
import zipfile

import numpy as np

FORMAT = "tinytensor-gpt checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A missing, unreadable or malformed checkpoint; the message is one line for the user."""


def atomic_write(path, write):
    """Call write(f) on a binary temporary file beside `path`, then put it in place atomically.

    An OSError (a full disk, a directory where the file should be) names `path`, not the
    temporary file, which never outlives the call.
    """
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                                   dir=folder)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(e, OSError) and e.filename != path:
            raise OSError(e.errno, f"cannot write it ({e.strerror or e})", path) from None
        raise
    _fsync_dir(folder)


def save_npz_atomic(path, arrays):
    """Write {name: array} to `path` as .npz so that `path` is never seen half-written."""
    atomic_write(path, lambda f: np.savez(f, **arrays))


# atomic_write's temporary files (and the names of older versions: metrics.jsonl.tmp, loss.png.tmp)
_TEMP = re.compile(r"^(\.(ckpt\.npz|best\.npz|metrics\.jsonl|loss\.png)\.[a-z0-9_]+\.tmp"
                   r"|(metrics\.jsonl|loss\.png)\.tmp)$")


def remove_stale_temps(folder):
    """Remove the temporary files a killed run left in `folder` (our own names only); returns
    their names. Call it only while holding the folder's lock: a live run's are not stale."""
    try:
        names = [n for n in os.listdir(folder) if _TEMP.match(n)]
    except FileNotFoundError:
        return []
    for name in names:
        try:
            os.unlink(os.path.join(folder, name))
        except FileNotFoundError:
            pass
    return names


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder):
    """Make the rename itself durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_npz(path):
    """{name: array} from an .npz file, read with allow_pickle=False; CheckpointError if unusable."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}  # reading every member also checks its CRC
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or not an .npz file ({reason}); "
                              f"delete it to start afresh") from None


# ----- model + optimizer <-> arrays ---------------------------------------------------------

def pack(meta, model_state, optimizer_state=None):
    """The arrays of a checkpoint: meta as JSON, model/<name>, optim/<i>/<key>."""
    meta = dict(meta, format=FORMAT, version=VERSION)
    arrays = {f"model/{name}": np.asarray(a) for name, a in model_state.items()}
    if optimizer_state is not None:
        for i, state in optimizer_state["state"].items():
            for key, value in state.items():
                arrays[f"optim/{i}/{key}"] = np.asarray(value)
        meta["optimizer"] = {"param_groups": optimizer_state["param_groups"]}
    arrays["meta"] = np.array(json.dumps(meta))
    return arrays


def unpack(arrays, path="checkpoint"):
    """(meta, model_state, optimizer_state or None) from pack()'s arrays; CheckpointError if malformed."""
    if "meta" not in arrays:
        raise CheckpointError(f"{path} is not a tinytensor-gpt checkpoint (no 'meta' entry)")
    try:
        meta = json.loads(str(arrays["meta"]))
    except ValueError:
        raise CheckpointError(f"{path}: the 'meta' entry is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a tinytensor-gpt checkpoint (format {meta.get('format')!r})"
                              if isinstance(meta, dict) else f"{path}: malformed 'meta' entry")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {meta.get('version')}, "
                              f"this code reads version {VERSION}")
    check_meta(meta, path)
    model_state = {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")}
    if not model_state:
        raise CheckpointError(f"{path} holds no model parameters")
    optimizer_state = None
    if "optimizer" in meta:
        state = {}
        for k, v in arrays.items():
            if k.startswith("optim/"):
                _, i, key = (k.split("/", 2) + ["", ""])[:3]
                if not (i.isdigit() and key):
                    raise CheckpointError(f"{path}: malformed optimizer entry {k!r} "
                                          f"(expected optim/<index>/<name>)")
                state.setdefault(int(i), {})[key] = v
        optimizer_state = {"state": state, "param_groups": meta["optimizer"]["param_groups"]}
    return meta, model_state, optimizer_state


def check_meta(meta, path):
    """CheckpointError naming `path` and the entry unless meta's entries have their types:
    step a non-negative int, config an object, tokenizer a string, losses numbers or null,
    optimizer an object with a list of param_groups."""
    def bad(key, expected):
        what = (f"the meta entry {key!r} should be {expected}, got {json.dumps(meta[key])[:60]}"
                if key in meta else f"'meta' lacks the {key!r} entry ({expected})")
        raise CheckpointError(f"{path}: {what}; the file is damaged: delete it or use another "
                              f"checkpoint")
    step = meta.get("step")
    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
        bad("step", "a non-negative integer")
    if not isinstance(meta.get("config"), dict):
        bad("config", "an object of config fields")
    if not isinstance(meta.get("tokenizer"), str):
        bad("tokenizer", "a JSON string")
    for key in ("train_loss", "val_loss", "best_val_loss"):
        value = meta.get(key)
        if value is not None and not _is_number(value):
            bad(key, "a number or null")
    if "optimizer" in meta and not (isinstance(meta["optimizer"], dict) and isinstance(
            meta["optimizer"].get("param_groups"), list) and all(
            isinstance(g, dict) for g in meta["optimizer"]["param_groups"])):
        bad("optimizer", "an object with a list of param_groups")
    data = meta.get("data")
    if data is not None and not (isinstance(data, dict) and isinstance(data.get("sha256"), str)
                                 and isinstance(data.get("size"), int)):
        bad("data", "an object with the text's sha256 and size")


def load_tokenizer(meta, path):
    """The tokenizer (a CharTokenizer or a BPETokenizer, by its JSON's "type") of a checked meta
    (see check_meta); CheckpointError naming `path`."""
    from gpt.tokenizer import tokenizer_from_json
    try:
        return tokenizer_from_json(meta["tokenizer"])
    except ValueError as e:
        raise CheckpointError(f"{path}: the meta entry 'tokenizer' is unusable ({e}); the file "
                              f"is damaged: delete it or use another checkpoint") from None


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def load_metrics(path, keep_before):
    """The rows of metrics.jsonl a resume at step `keep_before` keeps: train rows of earlier
    steps, eval rows up to it. Every row is checked (an object with a non-negative int step and
    numeric losses); CheckpointError names the file and line. A last line cut short by a kill
    is dropped."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        where = f"{path} line {i + 1}"
        try:
            row = json.loads(line)
        except ValueError:
            if i == last:
                continue  # a line cut short by a kill
            raise CheckpointError(f"{where} is not JSON; fix or delete that line") from None
        kind = "eval" if isinstance(row, dict) and ("val_loss" in row or "train_loss" in row) \
            else "train"
        need = ("train_loss", "val_loss") if kind == "eval" else ("loss",)
        step = row.get("step") if isinstance(row, dict) else None
        if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0
                and all(_is_number(row.get(k)) for k in need)):
            expected = ", ".join(("step (an integer >= 0)",) + need)
            raise CheckpointError(f"{where} should be an object with {expected}, got "
                                  f"{line.strip()[:60]}; fix or delete that line")
        if (kind == "eval" and step <= keep_before) or (kind == "train" and step < keep_before):
            rows.append(row)
    return rows


def run_meta(cfg, tokenizer, step, best_val, world_size, losses=None, data=None):
    """The meta entry of a checkpoint train.py writes at `step`: the config, the tokenizer, the
    losses of the evaluation at that step ({"train": .., "val": ..}; None when a signal stopped
    the run before it), how the run's random streams continue and (data) the fingerprint of the
    text it trains on: {"path", "size", "sha256"}."""
    losses = losses or {"train": None, "val": None}
    return {"step": step, "config": cfg.to_dict(), "tokenizer": tokenizer.to_json(),
            **({"data": data} if data is not None else {}),
            "train_loss": losses["train"], "val_loss": losses["val"],
            "best_val_loss": best_val, "world_size": world_size,
            "rng": {"seed": cfg.seed, "next_step": step,
                    "streams": "train batch (seed, 0, step); eval batch k of split s "
                               "(seed, 1, step, s, k); dropout (seed, 2, step, g), g the "
                               "micro-batch's place in the global batch"}}


def save_checkpoint(path, meta, model, optimizer=None):
    """Atomically save the model's parameters (and the optimizer's state) with `meta`."""
    save_npz_atomic(path, pack(meta, model.state_dict(),
                               optimizer.state_dict() if optimizer is not None else None))


def load_checkpoint(path):
    """(meta, model_state, optimizer_state or None) from `path`; CheckpointError if unusable."""
    return unpack(load_npz(path), path)
