"""train/checkpoint.py: round trip of model + AdamW state, atomic writes, corrupt files."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import tinytensor as tt  # noqa: E402
import tinytensor.nn as nn  # noqa: E402
from train import checkpoint as ck  # noqa: E402
from train.checkpoint import CheckpointError  # noqa: E402

META = {"step": 3, "config": {"n_layer": 1}, "tokenizer": json.dumps({"chars": ["a", "b"]})}


def small_model(seed):
    tt.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))


def train_steps(model, opt, n, seed=0):
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(n):
        x = tt.tensor(rng.standard_normal((5, 4)).astype(np.float32))
        y = rng.integers(0, 3, 5)
        loss = tt.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_round_trip_restores_model_and_adamw_exactly(tmp_path):
    model = small_model(0)
    opt = tt.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    train_steps(model, opt, 3)
    path = tmp_path / "ckpt.npz"
    ck.save_checkpoint(path, META, model, opt)

    meta, model_state, optim_state = ck.load_checkpoint(path)
    assert meta["step"] == 3 and meta["config"] == {"n_layer": 1} and meta["format"] == ck.FORMAT
    clone = small_model(1)  # different initial weights
    clone_opt = tt.optim.AdamW(clone.parameters(), lr=1e-2, weight_decay=0.1)
    clone.load_state_dict(model_state)
    clone_opt.load_state_dict(optim_state)
    for (n, a), (_, b) in zip(model.state_dict().items(), clone.state_dict().items()):
        np.testing.assert_array_equal(a, b, err_msg=n)
    # the next steps match bit for bit: moments and step counts came back too
    assert train_steps(clone, clone_opt, 4, seed=1) == train_steps(model, opt, 4, seed=1)


def test_saved_file_is_plain_arrays_without_pickle(tmp_path):
    model = small_model(0)
    opt = tt.optim.AdamW(model.parameters())
    train_steps(model, opt, 1)
    path = tmp_path / "c.npz"
    ck.save_checkpoint(path, META, model, opt)
    with np.load(path, allow_pickle=False) as z:
        assert z["meta"].dtype.kind == "U" and z["meta"].shape == ()
        assert {k for k in z.files if k.startswith("model/")} == {f"model/{n}" for n in model.state_dict()}
        assert all(z[k].dtype != object for k in z.files)
    assert os.listdir(tmp_path) == ["c.npz"]  # no temporary file left


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "flipped_byte", "directory"])
def test_corrupt_files_give_one_line_errors(tmp_path, damage):
    model = small_model(0)
    path = tmp_path / "ckpt.npz"
    ck.save_checkpoint(path, META, model)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[:-100])
    elif damage == "garbage":
        path.write_bytes(b"not a zip file at all" * 10)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "flipped_byte":  # inside the largest array's data: its CRC-32 no longer matches
        b = bytearray(data)
        w = model.state_dict()["0.weight"].tobytes()
        at = data.index(w) + len(w) // 2
        b[at] ^= 0xFF
        path.write_bytes(bytes(b))
    else:
        path.unlink()
        path.mkdir()
    with pytest.raises(CheckpointError) as e:
        ck.load_checkpoint(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("arrays, needle", [
    ({"x": np.zeros(3)}, "no 'meta' entry"),
    ({"meta": np.array("{not json")}, "not valid JSON"),
    ({"meta": np.array(json.dumps({"format": "other"}))}, "not a tinytensor-gpt checkpoint"),
    ({"meta": np.array(json.dumps({"format": ck.FORMAT, "version": 99}))}, "version 99"),
    ({"meta": np.array(json.dumps({"format": ck.FORMAT, "version": ck.VERSION, "step": 1,
                                   "config": {}}))}, "lacks the 'tokenizer'"),
    ({"meta": np.array(json.dumps({**META, "format": ck.FORMAT, "version": ck.VERSION}))},
     "no model parameters"),
])
def test_malformed_checkpoints(tmp_path, arrays, needle):
    path = tmp_path / "c.npz"
    np.savez(path, **arrays)
    with pytest.raises(CheckpointError, match=needle):
        ck.load_checkpoint(path)


def test_pickled_object_arrays_are_refused(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, meta=np.array(json.dumps({**META, "format": ck.FORMAT, "version": 1})),
             **{"model/w": np.array([{"evil": 1}], dtype=object)})
    with pytest.raises(CheckpointError, match="corrupt"):
        ck.load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        ck.load_checkpoint(tmp_path / "nope.npz")


def test_failed_write_leaves_the_previous_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    ck.save_npz_atomic(path, {"a": np.arange(10)})
    before = path.read_bytes()

    def disk_full(file, **arrays):
        file.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck.np, "savez", disk_full)
    with pytest.raises(OSError, match="No space"):
        ck.save_npz_atomic(path, {"a": np.arange(20)})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.npz"]


# A process killed at any point of a save: the old checkpoint must still load. Each case
# replaces one step of the save with os._exit (no cleanup, no exception handlers run).
CRASH = textwrap.dedent("""
    import os, sys
    import numpy as np
    sys.path.insert(0, {root!r})
    from train import checkpoint as ck
    path = {path!r}
    where = {where!r}
    real_savez = np.savez
    def savez_then_die(f, **arrays):      # half of the zip written, then killed
        real_savez(f, **arrays)
        f.flush()
        f.truncate(f.tell() // 2)
        os._exit(9)
    if where == "mid-write":
        ck.np.savez = savez_then_die
    elif where == "before-fsync":
        ck.os.fsync = lambda fd: os._exit(9)
    elif where == "before-rename":
        ck.os.replace = lambda a, b: os._exit(9)
    ck.save_npz_atomic(path, {{"meta": np.array("new"), "w": np.ones(100000)}})
    os._exit(0)
""")


@pytest.mark.parametrize("where", ["mid-write", "before-fsync", "before-rename", "none"])
def test_killed_during_save_keeps_the_previous_checkpoint(tmp_path, where):
    path = str(tmp_path / "ckpt.npz")
    ck.save_npz_atomic(path, {"meta": np.array("old"), "w": np.zeros(100000)})
    p = subprocess.run([sys.executable, "-c", CRASH.format(root=ROOT, path=path, where=where)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == (0 if where == "none" else 9), p.stderr
    arrays = ck.load_npz(path)  # never torn: either the old file or the new one
    if where == "none":
        assert str(arrays["meta"]) == "new" and arrays["w"].sum() == 100000
    else:
        assert str(arrays["meta"]) == "old" and arrays["w"].sum() == 0
