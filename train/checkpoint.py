"""Checkpoints as plain .npz files: written atomically, read without pickle.

A checkpoint holds
    meta              a 0-d unicode array: JSON with the step, config, tokenizer, ...
    model/<name>      one array per model parameter (its state_dict)
    optim/<i>/<key>   AdamW state of parameter i (step, exp_avg, exp_avg_sq), when saved

`save_npz_atomic` writes a temporary file in the same directory, flushes and fsyncs it,
then os.replace()s it over the target: a crash at any moment leaves either the old file
or the new one, never a torn one. `load_npz` opens with allow_pickle=False and turns
every way a file can be missing or broken into one CheckpointError line.
"""
import json
import os
import tempfile
import zipfile

import numpy as np

FORMAT = "tinytensor-gpt checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A missing, unreadable or malformed checkpoint; the message is one line for the user."""


def save_npz_atomic(path, arrays):
    """Write {name: array} to `path` as .npz so that `path` is never seen half-written."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


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
    for key in ("step", "config", "tokenizer"):
        if key not in meta:
            raise CheckpointError(f"{path}: 'meta' lacks the {key!r} entry")
    model_state = {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")}
    if not model_state:
        raise CheckpointError(f"{path} holds no model parameters")
    optimizer_state = None
    if "optimizer" in meta:
        state = {}
        for k, v in arrays.items():
            if k.startswith("optim/"):
                _, i, key = k.split("/", 2)
                state.setdefault(int(i), {})[key] = v
        optimizer_state = {"state": state, "param_groups": meta["optimizer"]["param_groups"]}
    return meta, model_state, optimizer_state


def save_checkpoint(path, meta, model, optimizer=None):
    """Atomically save the model's parameters (and the optimizer's state) with `meta`."""
    save_npz_atomic(path, pack(meta, model.state_dict(),
                               optimizer.state_dict() if optimizer is not None else None))


def load_checkpoint(path):
    """(meta, model_state, optimizer_state or None) from `path`; CheckpointError if unusable."""
    return unpack(load_npz(path), path)
