"""train/train.py end to end (subprocess runs of tiny configs) and train/config.py parsing."""
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tinytensor import backend  # noqa: E402
from train import config as C  # noqa: E402
from train.checkpoint import load_checkpoint  # noqa: E402

TRAIN = os.path.join(ROOT, "train", "train.py")
TINY = ["--n_embd", "16", "--n_head", "2", "--n_layer", "1", "--block_size", "8",
        "--batch_size", "4", "--eval_iters", "2", "--device", "cpu"]
EVAL_LINE = re.compile(r"^step (\d+): train loss (\d+\.\d{4}), val loss (\d+\.\d{4})$", re.M)


def make_text(n_words=1500, seed=0):
    words = ("the king shall speak to thee and I will not go where thy good lord hath "
             "bid me stay but now is the winter of our discontent").split()
    rng = np.random.default_rng(seed)
    lines = [" ".join(rng.choice(words, size=8)).capitalize() + "." for _ in range(n_words // 8)]
    return "\n".join(lines) + "\n"


def run_train(*args, cwd=None):
    p = subprocess.run([sys.executable, TRAIN, *map(str, args)], capture_output=True, text=True,
                       cwd=cwd, timeout=300)
    assert "Traceback" not in p.stderr, p.stderr
    return p


def assert_one_line_error(p, code, *needles):
    assert p.returncode == code, (p.returncode, p.stdout[-2000:], p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def train_losses(out_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(out_dir) if "loss" in r]


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text_file):
    """One tiny 20-step run with dropout on; tests copy its out_dir before changing it."""
    out = str(tmp_path_factory.mktemp("run") / "out")
    p = run_train(*TINY, "--data", text_file, "--out_dir", out, "--max_iters", 20,
                  "--eval_interval", 10, "--log_interval", 1, "--dropout", 0.1)
    assert p.returncode == 0, p.stderr
    return out, p


# ----- a normal run -----------------------------------------------------------------------

def test_outputs_written_and_well_formed(trained):
    out, p = trained
    # the full config is printed at the start
    for f in C.field_types():
        assert re.search(rf"^\s+{f}\s+= ", p.stdout, re.M), f"config field {f} not printed"
    # the lecture's eval line at steps 0, 10 and 20
    assert [int(m[0]) for m in EVAL_LINE.findall(p.stdout)] == [0, 10, 20]

    rows = read_metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in train_rows] == list(range(20))
    for r in train_rows:
        assert set(r) == {"step", "loss", "lr", "ms", "tokens_per_s"}
        assert math.isfinite(r["loss"]) and r["ms"] > 0 and r["tokens_per_s"] > 0
    # the small preset's schedule: cosine from 1e-3 at step 0 towards 1e-4 at max_iters (20)
    lrs = [r["lr"] for r in train_rows]
    assert lrs[0] == pytest.approx(1e-3) and lrs[10] == pytest.approx(5.5e-4)
    assert all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] > 1e-4
    assert [r["step"] for r in eval_rows] == [0, 10, 20]
    for r in eval_rows:
        assert set(r) == {"step", "train_loss", "val_loss"}
    # the printed eval line matches what was logged
    printed = [(float(a), float(b)) for _, a, b in EVAL_LINE.findall(p.stdout)]
    assert printed == [(round(r["train_loss"], 4), round(r["val_loss"], 4)) for r in eval_rows]
    # the tiny model learns something in 20 steps on this repetitive text
    assert eval_rows[-1]["train_loss"] < eval_rows[0]["train_loss"]

    # ckpt.npz: plain arrays (no pickle), model + AdamW state + meta
    with np.load(os.path.join(out, "ckpt.npz"), allow_pickle=False) as z:
        names = set(z.files)
        assert all(z[k].dtype != object for k in z.files)
    assert "meta" in names and any(k.startswith("optim/") for k in names)
    meta, model_state, optim_state = load_checkpoint(os.path.join(out, "ckpt.npz"))
    assert meta["step"] == 20
    assert meta["config"]["max_iters"] == 20 and meta["config"]["dropout"] == 0.1
    assert json.loads(meta["tokenizer"])  # the vocabulary, as JSON
    assert meta["val_loss"] == pytest.approx(eval_rows[-1]["val_loss"])
    assert len(model_state) > 3 and all(a.dtype == np.float32 for a in model_state.values())
    assert all(st["step"] == 20 for st in optim_state["state"].values())
    # best.npz: the weights with the lowest val loss seen
    best, _, best_optim = load_checkpoint(os.path.join(out, "best.npz"))
    assert best_optim is None
    assert best["val_loss"] == pytest.approx(min(r["val_loss"] for r in eval_rows))
    with open(os.path.join(out, "loss.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # no temporary files left behind
    assert sorted(os.listdir(out)) == ["best.npz", "ckpt.npz", "loss.png", "metrics.jsonl", "tokens"]
    assert sorted(os.listdir(os.path.join(out, "tokens"))) == ["manifest.json", "train.bin", "val.bin"]


def test_train_py_is_an_executable_script():
    assert os.access(TRAIN, os.X_OK)
    with open(TRAIN, encoding="utf-8") as f:
        assert f.readline().strip() == "#!/usr/bin/env python3"


def test_runs_from_another_directory_and_plain_log_lines(tmp_path, text_file):
    p = run_train(*TINY, "--data", text_file, "--out_dir", "rel_out", "--max_iters", 4,
                  "--eval_interval", 4, "--log_interval", 2, "--model", "bigram", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "rel_out" / "ckpt.npz").exists()
    # not a terminal: plain log lines every log_interval (and at the last step)
    assert re.findall(r"^iter (\d+): loss \d+\.\d{4}", p.stdout, re.M) == ["0", "2", "3"]


def test_progress_bar_on_a_terminal(tmp_path, text_file):
    import pty
    master, slave = pty.openpty()
    args = [*TINY, "--data", text_file, "--out_dir", tmp_path / "o", "--max_iters", 6,
            "--eval_interval", 6]
    proc = subprocess.Popen([sys.executable, TRAIN, *map(str, args)],
                            stdout=slave, stderr=subprocess.PIPE, cwd=tmp_path)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=120)
    os.close(master)
    out = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0
    assert "step/s" in out or "s/step" in out      # tqdm's rate
    assert "tok_s=" in out and "loss=" in out       # our postfix
    assert "step 6: train loss" in out              # eval lines still printed
    assert not re.search(r"^iter \d+:", out, re.M)  # no plain log lines on a terminal


# ----- determinism and resume ---------------------------------------------------------------

def test_resume_is_exact_with_dropout(tmp_path, trained, text_file):
    full, _ = trained  # 20 uninterrupted steps, dropout 0.1
    half = str(tmp_path / "half")
    # the same cosine schedule as the 20-step run: it decays over lr_decay_iters, not max_iters
    common = [*TINY, "--data", text_file, "--out_dir", half, "--eval_interval", 10,
              "--log_interval", 1, "--dropout", 0.1, "--lr_decay_iters", 20]
    assert run_train(*common, "--max_iters", 10).returncode == 0
    # as if killed after logging past the checkpoint: those lines are dropped on resume
    with open(os.path.join(half, "metrics.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": 11, "loss": 9.9, "lr": 1e-3, "ms": 1.0, "tokens_per_s": 1.0}))
        f.write('\n{"step": 12, "lo')
    # resume with only the changed option: the rest comes from the checkpoint
    p = run_train("--out_dir", half, "--max_iters", 20, "--resume")
    assert p.returncode == 0, p.stderr
    assert "resuming from" in p.stdout
    a, b = train_losses(full), train_losses(half)
    assert [s for s, _ in b] == list(range(20))
    assert b == a  # bitwise: same batches, same dropout masks, same AdamW state
    evals = lambda d: [(r["step"], r["val_loss"]) for r in read_metrics(d) if "val_loss" in r]  # noqa: E731
    assert evals(half) == evals(full)
    assert load_checkpoint(os.path.join(half, "ckpt.npz"))[0]["step"] == 20


def test_resume_is_exact_with_mkl(tmp_path, text_file):
    """With the linear layers on MKL (--mkl on; a batch of 64 x 8 = 512 rows, where MKL takes
    the products), stopped at step 4 and resumed: the losses of an uninterrupted run, bitwise."""
    from tinytensor.kernels import mkl
    if mkl.library() is None:
        pytest.skip(f"MKL: {mkl._why} (pip install -e \".[mkl]\")")
    common = [*TINY, "--batch_size", 64, "--data", text_file, "--eval_interval", 4,
              "--log_interval", 1, "--dropout", 0.1, "--lr_decay_iters", 8, "--mkl", "on",
              "--accelerators", "on"]
    full, half = str(tmp_path / "full"), str(tmp_path / "half")
    p = run_train(*common, "--out_dir", full, "--max_iters", 8)
    assert p.returncode == 0, p.stderr
    assert "linear layers multiplied by MKL" in p.stdout
    assert run_train(*common, "--out_dir", half, "--max_iters", 4).returncode == 0
    p = run_train("--out_dir", half, "--max_iters", 8, "--resume")
    assert p.returncode == 0, p.stderr
    assert [s for s, _ in train_losses(half)] == list(range(8))
    assert train_losses(half) == train_losses(full)


def test_accumulating_run_resumes_exactly_and_matches_one_micro_batch(tmp_path, text_file):
    """--gradient_accumulation_steps 4 with dropout: stopped at step 6 and resumed, the same
    losses and weights to the last bit as without the stop; and, with dropout 0, the same
    model to float32 rounding as K=1 (the same global batch, in one piece)."""
    def go(out, k, max_iters, *extra):
        p = run_train(*TINY, "--batch_size", 8, "--data", text_file, "--out_dir", out,
                      "--max_iters", max_iters, "--eval_interval", 6, "--log_interval", 1,
                      "--lr_decay_iters", 12, "--gradient_accumulation_steps", k, *extra)
        assert p.returncode == 0, p.stderr
        return p

    def weights(out):
        with np.load(os.path.join(out, "ckpt.npz"), allow_pickle=False) as z:
            return {k: z[k] for k in z.files if k != "meta"}
    full, half = str(tmp_path / "full"), str(tmp_path / "half")
    go(full, 4, 12, "--dropout", 0.1)
    go(half, 4, 6, "--dropout", 0.1)
    p = run_train("--out_dir", half, "--max_iters", 12, "--resume")
    assert p.returncode == 0 and "4 micro-batch(es)" in p.stdout, p.stderr
    assert train_losses(half) == train_losses(full)
    w_full, w_half = weights(full), weights(half)
    assert all(np.array_equal(w_full[k], w_half[k]) for k in w_full)
    # K=4 against K=1, dropout off: the mean gradient of the same 8 rows
    k4, k1 = str(tmp_path / "k4"), str(tmp_path / "k1")
    go(k4, 4, 12, "--dropout", 0)
    go(k1, 1, 12, "--dropout", 0)
    (s4, l4), (s1, l1) = zip(*train_losses(k4)), zip(*train_losses(k1))
    assert s4 == s1 and len(s4) == 12
    np.testing.assert_allclose(l4, l1, rtol=2e-6)
    w4, w1 = weights(k4), weights(k1)
    for k in w1:
        np.testing.assert_allclose(w4[k], w1[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_batch_not_divisible_into_micro_batches_is_a_usage_error(tmp_path, text_file):
    p = run_train(*TINY, "--data", text_file, "--out_dir", tmp_path, "--max_iters", 2,
                  "--gradient_accumulation_steps", 3)
    assert_one_line_error(p, 2, "batch_size (4) must be divisible by gradient_accumulation_steps")
    p = run_train(*TINY, "--data", text_file, "--out_dir", tmp_path, "--max_iters", 2,
                  "--gradient_accumulation_steps", 0)
    assert_one_line_error(p, 2, "gradient_accumulation_steps must be a positive integer")


def test_init_from_fine_tunes_another_runs_weights(tmp_path, trained):
    """--init_from: a new run in its own out_dir from another run's weights and tokenizer, with
    a fresh optimizer and schedule; the model's shape comes from the checkpoint."""
    src = os.path.join(trained[0], "ckpt.npz")
    before = sha256(src)
    new_text = tmp_path / "new.txt"
    new_text.write_text(make_text(400, seed=5), encoding="utf-8")  # the same characters
    out = str(tmp_path / "ft")
    # no shape options: n_embd 16 and n_layer 1 come from the checkpoint, not the small preset
    p = run_train("--data", new_text, "--out_dir", out, "--init_from", trained[0], "--max_iters", 4,
                  "--eval_interval", 2, "--eval_iters", 2, "--batch_size", 4, "--device", "cpu")
    assert p.returncode == 0, p.stderr
    assert f"starting from the weights and tokenizer of {trained[0]}" in p.stdout
    first = [float(m.group(2)) for m in EVAL_LINE.finditer(p.stdout)][0]
    fresh = [float(m.group(2)) for m in EVAL_LINE.finditer(trained[1].stdout)][0]
    assert first < fresh - 0.1, (first, fresh)  # it starts where the other run ended
    meta = load_checkpoint(os.path.join(out, "ckpt.npz"))[0]
    assert meta["step"] == 4 and meta["config"]["n_embd"] == 16 and meta["config"]["n_layer"] == 1
    assert meta["config"]["init_from"] == trained[0]
    assert sha256(src) == before  # the source run is untouched
    s = subprocess.run([sys.executable, os.path.join(ROOT, "train", "sample.py"), "--out_dir", out,
                        "--max_new_tokens", "20", "--start", "The"], capture_output=True, text=True)
    assert s.returncode == 0 and s.stdout.startswith("The"), s.stderr
    # a shape option that differs from the checkpoint's, a text with characters outside its
    # vocabulary, the run's own checkpoint: each a one-line error
    p = run_train("--data", new_text, "--out_dir", tmp_path / "x", "--init_from", src,
                  "--n_embd", 32, "--max_iters", 2)
    assert_one_line_error(p, 2, "--init_from", "n_embd 32 here, 16 in " + src)
    odd = tmp_path / "odd.txt"
    odd.write_text(make_text(400) + "Ça été ½ naïve ☃\n", encoding="utf-8")
    p = run_train("--data", odd, "--out_dir", tmp_path / "y", "--init_from", src, "--max_iters", 2)
    assert_one_line_error(p, 1, str(odd), f"does not fit the vocabulary of {src}", "'é'")
    assert not os.path.exists(tmp_path / "y" / "ckpt.npz")
    p = run_train("--out_dir", trained[0], "--init_from", trained[0], "--max_iters", 2)
    assert_one_line_error(p, 2, "is this run's own checkpoint")
    assert sha256(src) == before


def test_bpe_tokenizer_trains_samples_and_resumes(tmp_path, text_file):
    """--tokenizer bpe --vocab_size N: merges learned from the text, saved in the token files'
    manifest and the checkpoint; sample.py and --resume use them; a resume is bit-exact."""
    from gpt.tokenizer import BPETokenizer
    from train.checkpoint import load_tokenizer
    common = [*TINY, "--data", text_file, "--tokenizer", "bpe", "--vocab_size", 300,
              "--eval_interval", 4, "--log_interval", 1, "--lr_decay_iters", 8]
    full, half = str(tmp_path / "full"), str(tmp_path / "half")
    p = run_train(*common, "--out_dir", full, "--max_iters", 8)
    assert p.returncode == 0, p.stderr
    assert "vocab 300" in p.stdout and re.search(r"tokens: .* -> [\d,]+ tokens in ", p.stdout)
    meta = load_checkpoint(os.path.join(full, "ckpt.npz"))[0]
    tok = load_tokenizer(meta, "ckpt")
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == 300
    assert tok == BPETokenizer.train(open(text_file, encoding="utf-8").read(), 300, progress=False)
    assert run_train(*common, "--out_dir", half, "--max_iters", 4).returncode == 0
    p = run_train("--out_dir", half, "--max_iters", 8, "--resume")
    assert p.returncode == 0 and "tokens: " not in p.stdout, p.stdout  # the files are reused
    assert train_losses(half) == train_losses(full)
    s = subprocess.run([sys.executable, os.path.join(ROOT, "train", "sample.py"), "--out_dir", full,
                        "--max_new_tokens", "20", "--start", "The king ☃"],
                       capture_output=True, text=True)
    assert s.returncode == 0 and s.stdout.startswith("The king ☃"), s.stderr
    # the tokenizer cannot change on resume; vocab_size is BPE's
    p = run_train("--out_dir", full, "--max_iters", 10, "--resume", "--tokenizer", "char",
                  "--vocab_size", 0)
    assert_one_line_error(p, 2, "tokenizer='bpe' -> 'char'", "cannot change on resume")
    p = run_train(*TINY, "--data", text_file, "--out_dir", tmp_path / "x", "--tokenizer", "bpe")
    assert_one_line_error(p, 2, "--tokenizer bpe needs a --vocab_size from 256")
    p = run_train(*TINY, "--data", text_file, "--out_dir", tmp_path / "x", "--vocab_size", 300)
    assert_one_line_error(p, 2, "vocab_size is for --tokenizer bpe")
    p = run_train(*TINY, "--data", text_file, "--out_dir", tmp_path / "x", "--tokenizer", "word")
    assert_one_line_error(p, 2, "tokenizer must be 'char' or 'bpe'")
    p = run_train(*TINY, "--data", text_file, "--tokenizer", "bpe", "--vocab_size", 100000,
                  "--out_dir", tmp_path / "y", "--max_iters", 2)
    assert_one_line_error(p, 1, text_file)


def test_eval_interval_does_not_change_training(tmp_path, trained, text_file):
    full, _ = trained
    other = str(tmp_path / "o")
    p = run_train(*TINY, "--data", text_file, "--out_dir", other, "--max_iters", 20,
                  "--eval_interval", 3, "--log_interval", 1, "--dropout", 0.1)
    assert p.returncode == 0, p.stderr
    assert train_losses(other) == train_losses(full)


def test_different_seed_changes_training(tmp_path, trained, text_file):
    full, _ = trained
    other = str(tmp_path / "o")
    p = run_train(*TINY, "--data", text_file, "--out_dir", other, "--max_iters", 3,
                  "--eval_interval", 10, "--log_interval", 1, "--dropout", 0.1, "--seed", 7)
    assert p.returncode == 0, p.stderr
    assert train_losses(other)[0] != train_losses(full)[0]


def copy_run(trained, tmp_path):
    out = str(tmp_path / "copy")
    shutil.copytree(trained[0], out)
    return out


def test_resume_keeps_the_checkpoints_config_and_says_what_changes(tmp_path, trained):
    """A --config preset on resume does not replace the checkpoint's values (the notes name
    those that differ); named options change it and are listed; the run continues exactly as
    a plain resume."""
    plain, preset = copy_run(trained, tmp_path / "a"), copy_run(trained, tmp_path / "b")
    p = run_train("--out_dir", plain, "--resume", "--max_iters", 24)
    assert p.returncode == 0, p.stderr
    assert "--resume: from the checkpoint: max_iters 20 -> 24" in p.stdout
    q = run_train("--config", "small", "--out_dir", preset, "--resume", "--max_iters", 24)
    assert q.returncode == 0, q.stderr
    note = next(line for line in q.stdout.splitlines() if "preset's" in line)
    for kept in ("batch_size 4", "eval_iters 2", "n_embd 16", "block_size 8"):
        assert kept in note, note
    assert "kept, not the 'small' preset's" in note
    assert train_losses(preset) == train_losses(plain)
    meta = load_checkpoint(os.path.join(preset, "ckpt.npz"))[0]
    assert (meta["config"]["batch_size"], meta["config"]["eval_iters"]) == (4, 2)
    r = run_train("--out_dir", preset, "--resume", "--max_iters", 26, "--learning_rate", 5e-4,
                  "--eval_iters", 3)
    assert r.returncode == 0, r.stderr
    assert ("--resume: from the checkpoint: max_iters 24 -> 26, learning_rate 0.001 -> 0.0005, "
            "eval_iters 2 -> 3") in r.stdout


def test_resume_on_changed_data_is_refused_unless_asked(tmp_path, trained, text_file):
    out = copy_run(trained, tmp_path)
    before = sha256(os.path.join(out, "ckpt.npz"))
    meta = load_checkpoint(os.path.join(out, "ckpt.npz"))[0]
    assert meta["data"]["sha256"] == sha256(text_file) and meta["data"]["size"] == os.path.getsize(text_file)
    original = open(text_file, encoding="utf-8").read()
    changed = tmp_path / "changed.txt"
    changed.write_text(original[::-1], encoding="utf-8")  # the same characters and size
    p = run_train("--out_dir", out, "--resume", "--max_iters", 22, "--data", changed)
    assert_one_line_error(p, 1, f"{changed} is not the text {out}/ckpt.npz was trained on",
                          "--allow_data_change")
    assert sha256(os.path.join(out, "ckpt.npz")) == before
    p = run_train("--out_dir", out, "--resume", "--max_iters", 22, "--data", changed,
                  "--allow_data_change")
    assert p.returncode == 0, p.stderr
    meta = load_checkpoint(os.path.join(out, "ckpt.npz"))[0]
    assert meta["data"]["sha256"] == sha256(changed)
    assert meta["config"]["allow_data_change"] is True
    p = run_train("--out_dir", out, "--resume", "--max_iters", 24)  # now its text: no flag needed
    assert p.returncode == 0, p.stderr
    assert load_checkpoint(os.path.join(out, "ckpt.npz"))[0]["config"]["allow_data_change"] is False
    p = run_train("--out_dir", out, "--resume", "--max_iters", 26, "--data", text_file)
    assert_one_line_error(p, 1, "is not the text")


def test_resume_on_a_text_with_new_characters_names_file_checkpoint_and_a_few(tmp_path, trained, text_file):
    out = copy_run(trained, tmp_path)
    odd = tmp_path / "odd.txt"
    odd.write_text(open(text_file, encoding="utf-8").read() + "".join(map(chr, range(0x4E00, 0x9FA5))),
                   encoding="utf-8")
    p = run_train("--out_dir", out, "--resume", "--max_iters", 22, "--data", odd)
    assert_one_line_error(p, 1, f"{odd} does not fit the vocabulary of {out}/ckpt.npz",
                          "20901 distinct characters not in the vocabulary: '一', '丁',", ", ...")
    assert len(p.stderr) < 400, p.stderr


def test_resume_with_changed_model_shape_is_an_error(tmp_path, trained):
    out = copy_run(trained, tmp_path)
    before = sha256(os.path.join(out, "ckpt.npz"))
    p = run_train("--out_dir", out, "--resume", "--n_layer", 2, "--max_iters", 30)
    assert_one_line_error(p, 2, "n_layer=1 -> 2", "cannot change on resume")
    assert sha256(os.path.join(out, "ckpt.npz")) == before


def test_resume_with_fused_off_and_from_a_checkpoint_without_fused(tmp_path, trained):
    """fused changes how the ops run, not the parameters: a fused run resumes unfused, and a
    checkpoint saved before the field existed resumes with its default (True)."""
    from train.checkpoint import load_npz, save_npz_atomic
    out = copy_run(trained, tmp_path)
    assert load_checkpoint(os.path.join(out, "ckpt.npz"))[0]["config"]["fused"] is True
    p = run_train("--out_dir", out, "--resume", "--max_iters", 22, "--fused", "false")
    assert p.returncode == 0, p.stderr
    assert re.search(r"^\s+fused\s+= False$", p.stdout, re.M)
    assert load_checkpoint(os.path.join(out, "ckpt.npz"))[0]["config"]["fused"] is False

    ckpt = os.path.join(out, "ckpt.npz")
    arrays = load_npz(ckpt)
    meta = json.loads(str(arrays["meta"]))
    del meta["config"]["fused"]  # as an older checkpoint wrote it
    save_npz_atomic(ckpt, {**arrays, "meta": np.array(json.dumps(meta))})
    p = run_train("--out_dir", out, "--resume", "--max_iters", 24)
    assert p.returncode == 0, p.stderr
    assert re.search(r"^\s+fused\s+= True$", p.stdout, re.M)
    meta = load_checkpoint(ckpt)[0]
    assert meta["step"] == 24 and meta["config"]["fused"] is True


def test_a_saved_config_without_collective_timeout_gets_the_default():
    """collective_timeout came later: a checkpoint written before it resumes with 600 s."""
    saved = C.make_config().to_dict()
    del saved["collective_timeout"]
    assert C.config_from_dict(saved).collective_timeout == 600.0


def test_resume_already_finished_does_nothing(tmp_path, trained):
    out = copy_run(trained, tmp_path)
    before = sha256(os.path.join(out, "ckpt.npz"))
    p = run_train("--out_dir", out, "--resume")
    assert p.returncode == 0 and "nothing to do" in p.stdout
    assert sha256(os.path.join(out, "ckpt.npz")) == before
    p = run_train("--out_dir", out, "--resume", "--max_iters", 5)
    assert_one_line_error(p, 2, "max_iters (5) is below the checkpoint's step (20)")


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, trained):
    out = copy_run(trained, tmp_path)
    ckpt = os.path.join(out, "ckpt.npz")
    before = sha256(ckpt)
    # a learning rate of 1e30 blows the weights up at the first update after the resume
    p = run_train("--out_dir", out, "--resume", "--max_iters", 40, "--learning_rate", "1e30")
    assert_one_line_error(p, 1, "non-finite", "step 21", "(step 20) is kept")
    assert sha256(ckpt) == before
    assert load_checkpoint(ckpt)[0]["step"] == 20
    # and it resumes fine afterwards with a sane learning rate
    p = run_train("--out_dir", out, "--resume", "--max_iters", 22)
    assert p.returncode == 0, p.stderr


def test_nonfinite_loss_in_a_fresh_run(tmp_path, text_file):
    out = str(tmp_path / "o")
    p = run_train(*TINY, "--data", text_file, "--out_dir", out, "--max_iters", 20,
                  "--eval_interval", 10, "--learning_rate", "1e30")
    assert_one_line_error(p, 1, "non-finite training loss", "(step 0) is kept")
    meta, model_state, _ = load_checkpoint(os.path.join(out, "ckpt.npz"))
    assert meta["step"] == 0
    assert all(np.isfinite(a).all() for a in model_state.values())


# ----- bad input --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.txt").write_bytes(b"")
    (d / "short.txt").write_text("to be or not to be\n", encoding="utf-8")  # < block_size + 1 per split
    (d / "latin1.txt").write_bytes(("caf\u00e9 " * 200).encode("latin-1"))
    return d


@pytest.mark.parametrize("name, needle", [
    ("missing.txt", "missing.txt"),
    ("empty.txt", "empty"),
    ("short.txt", "block_size"),
    ("latin1.txt", "UTF-8"),
])
def test_bad_data_file(tmp_path, bad_files, name, needle):
    p = run_train(*TINY, "--data", bad_files / name, "--out_dir", tmp_path / "o", "--max_iters", 2)
    assert_one_line_error(p, 1, needle)
    assert not (tmp_path / "o" / "ckpt.npz").exists()


@pytest.mark.parametrize("args, needles", [
    (["--n_embd", "30", "--n_head", "4"], ["n_embd (30)", "n_head (4)"]),
    (["--n_layer", "0"], ["n_layer", "positive", "0"]),
    (["--block_size", "-8"], ["block_size", "-8"]),
    (["--batch_size", "0"], ["batch_size"]),
    (["--max_iters", "0"], ["max_iters"]),
    (["--eval_iters", "0"], ["eval_iters"]),
    (["--dropout", "1.5"], ["dropout", "1.5"]),
    (["--learning_rate", "-1"], ["learning_rate"]),
    (["--lr_decay", "linear"], ["lr_decay", "'linear'"]),
    (["--model", "transformer"], ["unknown model 'transformer'", "gpt"]),
    (["--bogus", "1"], ["unknown option --bogus", "--n_embd", "--resume"]),
    (["--n_embd=big"], ["--n_embd", "'big'", "int"]),
    (["--dropout", "lots"], ["--dropout", "'lots'", "float"]),
    (["--resume", "maybe"], ["--resume", "'maybe'", "bool"]),
    (["--config", "huge"], ["unknown preset 'huge'", "small", "lecture"]),
    (["positional"], ["unexpected argument 'positional'"]),
    (["--max_iters"], ["--max_iters needs a value"]),
    (["--learning_rate", "1e-4", "--min_lr", "1e-3"],
     ["min_lr (0.001) is above learning_rate (0.0001)", "--min_lr of at most 0.0001"]),
    (["--seed", str(2**64)], ["seed must be in [0, 2**64 - 1] (64 bits, what "
                              "tinytensor.manual_seed and torch.manual_seed take), got "
                              "18446744073709551616"]),
    (["--seed", str(10**30)], ["seed must be in [0, 2**64 - 1]", str(10**30)]),
    (["--n_head", str(10**20)], ["n_embd (16) must be divisible by n_head (1000"]),
    (["--beta2", "0.99999999999999999"], ["beta2 must be in [0, 1), got 1.0"]),
])
def test_bad_config_is_a_one_line_error(tmp_path, text_file, args, needles):
    p = run_train(*TINY, "--data", text_file, "--out_dir", tmp_path / "o", *args)
    assert_one_line_error(p, 2, *needles)
    assert not (tmp_path / "o").exists() or not os.listdir(tmp_path / "o")


def test_mkl_on_without_mkl_is_one_error_line(tmp_path, text_file, monkeypatch, capsys):
    """--mkl on where MKL cannot be loaded: exit 2 and one line naming the option and the fix
    (in this process, MKL made to look missing); nothing written."""
    from tinytensor import kernels
    from tinytensor.kernels import mkl
    from train import train as T
    monkeypatch.setattr(mkl, "_lib", False)
    monkeypatch.setattr(mkl, "_why", "the mkl package is not installed (no libmkl_rt found)")
    before = kernels.use_mkl(None)
    try:
        code = T.main([*map(str, TINY), "--data", text_file, "--out_dir", str(tmp_path / "o"),
                       "--max_iters", "1", "--mkl", "on"])
    finally:
        kernels.use_mkl(before)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.strip() == ("error: --mkl on: MKL's products were asked for, but the mkl package "
                           "is not installed (no libmkl_rt found): pip install -e \".[mkl]\", "
                           "or leave them off")
    assert not (tmp_path / "o" / "ckpt.npz").exists()


def test_numbers_at_the_ends_of_their_ranges_work(tmp_path, text_file):
    """The largest seed, intervals and schedule lengths far beyond max_iters, a vanishing
    dropout and a huge clipping norm: a run of 2 steps (these used to end with a traceback)."""
    p = run_train(*TINY, "--data", text_file, "--out_dir", tmp_path / "o", "--max_iters", 2,
                  "--seed", 2**64 - 1, "--eval_interval", 10**20, "--log_interval", 10**20,
                  "--warmup_iters", 10**20, "--lr_decay_iters", 10**20, "--dropout", "1e-320",
                  "--grad_clip", "1e308")
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert load_checkpoint(str(tmp_path / "o" / "ckpt.npz"))[0]["config"]["seed"] == 2**64 - 1


@pytest.mark.parametrize("args, needles", [
    (["--n_layer", str(10**20)], ["the model needs about", "use a smaller --n_embd"]),
    (["--batch_size", str(10**20)], ["the model needs about", "batch 100000000000000000000"]),
    (["--block_size", str(10**20)], ["too short for block_size 100000000000000000000"]),
])
def test_sizes_beyond_the_machine_or_the_data_are_one_line_errors(tmp_path, text_file, args,
                                                                  needles):
    p = run_train(*TINY, "--data", text_file, "--out_dir", tmp_path / "o", *args)
    assert_one_line_error(p, 1, *needles)


@pytest.mark.parametrize("args, needles", [
    (["--accelerators", "yes"], ["accelerators must be 'auto', 'on' or 'off', got 'yes'"]),
    (["--mkl", "yes"], ["mkl must be 'auto', 'on' or 'off', got 'yes'"]),
    (["--bucket_mb", "-1"], ["bucket_mb must be a size in MB", "got -1.0"]),
    (["--threads_per_rank", "100000"], ["threads_per_rank must be 0 (automatic) to 4096"]),
    (["--dist_backend", "gloo"], ["dist_backend must be 'mpi' or 'nccl', got 'gloo'"]),
    (["--dist_backend", "nccl", "--device", "cpu"], ["dist_backend 'nccl' sums GPU gradients",
                                                     "--device cuda"]),
    (["--malloc_tuning", "sometimes"], ["--malloc_tuning", "'sometimes'", "bool"]),
    (["--collective_timeout", "0.5"],
     ["collective_timeout must be 0 (never) or at least 1 second, got 0.5"]),
    (["--collective_timeout", "nan"], ["collective_timeout must be 0 (never) or at least 1"]),
])
def test_bad_run_time_setting_is_a_one_line_error(tmp_path, text_file, args, needles):
    """The run-time settings (config fields, once environment variables) are checked with the
    config, before anything is built."""
    p = run_train(*TINY, "--data", text_file, "--out_dir", tmp_path / "o", *args)
    assert "Traceback" not in p.stderr, p.stderr
    assert_one_line_error(p, 2, *needles)
    assert not (tmp_path / "o").exists() or not os.listdir(tmp_path / "o")


def test_run_time_settings_are_in_the_header_and_the_checkpoint(tmp_path, text_file):
    p = run_train(*TINY, "--data", text_file, "--out_dir", tmp_path / "o", "--max_iters", 2,
                  "--accelerators", "off", "--overlap", "false", "--bucket_mb", "3")
    assert p.returncode == 0, p.stderr
    config_lines = {" ".join(line.split()) for line in p.stdout.splitlines()}  # alignment aside
    for line in ("accelerators = 'off'", "overlap = False", "bucket_mb = 3.0",
                 "malloc_tuning = True", "threads_per_rank = 0", "dist_backend = 'mpi'",
                 "tf32 = False", "gradient_accumulation_steps = 1", "tokenizer = 'char'"):
        assert line in config_lines, line
    assert "accelerators off (off: turned off; every fused op runs its reference)" in p.stdout
    meta = load_checkpoint(str(tmp_path / "o" / "ckpt.npz"))[0]
    assert {k: meta["config"][k] for k in ("accelerators", "overlap", "bucket_mb")} == \
        {"accelerators": "off", "overlap": False, "bucket_mb": 3.0}


def test_cuda_without_a_gpu_is_a_one_line_error(tmp_path, text_file):
    if backend.cuda_available():
        pytest.skip("a GPU is usable here; this checks the message on machines without one")
    p = run_train(*TINY, "--data", text_file, "--out_dir", tmp_path / "o", "--device", "cuda")
    assert_one_line_error(p, 2, "cuda", "no GPU")


def test_resume_without_a_checkpoint(tmp_path, text_file):
    p = run_train(*TINY, "--data", text_file, "--out_dir", tmp_path / "none", "--resume")
    assert_one_line_error(p, 1, "no checkpoint at", "none")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "no_meta"])
def test_resume_with_a_corrupt_checkpoint(tmp_path, trained, damage):
    out = copy_run(trained, tmp_path)
    ckpt = os.path.join(out, "ckpt.npz")
    data = open(ckpt, "rb").read()
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8))
    elif damage == "empty":
        data = b""
    else:
        np.savez(ckpt, x=np.zeros(3))
        data = open(ckpt, "rb").read()
    with open(ckpt, "wb") as f:
        f.write(data)
    metrics_before = sha256(os.path.join(out, "metrics.jsonl"))
    p = run_train("--out_dir", out, "--resume", "--max_iters", 30)
    assert_one_line_error(p, 1, "ckpt.npz")
    # nothing else was touched
    assert sha256(os.path.join(out, "metrics.jsonl")) == metrics_before
    assert open(ckpt, "rb").read() == data


def test_help_lists_every_option():
    p = run_train("--help")
    assert p.returncode == 0
    for f in C.field_types():
        assert f"--{f}" in p.stdout
    assert "presets: small, lecture" in p.stdout


def test_help_shows_the_presets_values_as_defaults():
    """--help's defaults are what a run would use: the small preset's (cosine decay, 2000
    steps), or another preset's when --config names one."""
    p = run_train("--help")
    assert re.search(r"--lr_decay .*\[default 'cosine'\]", p.stdout)
    assert re.search(r"--max_iters .*\[default 2000\]", p.stdout)
    p = run_train("--config", "lecture", "--help")
    assert p.returncode == 0
    assert re.search(r"--lr_decay .*\[default 'none'\]", p.stdout)
    assert re.search(r"--n_embd .*\[default 384\]", p.stdout)
    assert re.search(r"--dropout .*\[default 0.2\]", p.stdout)


def help_lines(preset):
    """Each option's --help line as usage() writes it: name, type, comment, the preset's default."""
    helps, cfg = C.field_help(), C.make_config(preset)
    return [f"  --{name} {kind.__name__.upper():5s} {helps[name]} [default {getattr(cfg, name)!r}]"
            for name, kind in C.field_types().items()]


def test_help_content_names_every_field_with_its_comment_and_default():
    p = run_train("--help")
    assert p.returncode == 0 and p.stderr == ""
    lines = p.stdout.splitlines()
    assert lines[0] == "usage: train.py [--config PRESET] [--key value | --key=value ...]"
    assert lines[1] == f"presets: {', '.join(C.PRESETS)} (default small)"
    assert lines[2].startswith("options (defaults: the 'small' preset;")
    assert lines[3:] == help_lines("small")
    assert "  --fused BOOL  fused attention and linear+ReLU ops (False: the ops as the lecture " \
           "writes them; same result, slower) [default True]" in lines


def test_help_of_another_preset_shows_its_defaults():
    p = run_train("--config", "lecture", "--help", "--max_iters", "7")
    assert p.returncode == 0 and p.stderr == ""
    assert p.stdout.splitlines()[2].startswith("options (defaults: the 'lecture' preset;")
    assert p.stdout.splitlines()[3:] == help_lines("lecture")
    assert help_lines("lecture") != help_lines("small")
    # a bad command line still gets the help (of the default preset), not an error
    p = run_train("--config", "tiny", "-h")
    assert p.returncode == 0 and p.stdout.splitlines()[3:] == help_lines("small")


# ----- config parsing (in process) ----------------------------------------------------------

def test_parse_key_value_and_key_equals_value():
    preset, o = C.parse_args(["--config", "lecture", "--n_layer", "2", "--dropout=0.5",
                              "--data", "x.txt", "--learning_rate=3e-4"])
    assert preset == "lecture"
    assert o == {"n_layer": 2, "dropout": 0.5, "data": "x.txt", "learning_rate": 3e-4}
    assert type(o["n_layer"]) is int and type(o["dropout"]) is float
    cfg = C.make_config(preset, o)
    assert (cfg.n_layer, cfg.n_embd, cfg.dropout, cfg.batch_size) == (2, 384, 0.5, 64)


@pytest.mark.parametrize("text, value", [("true", True), ("True", True), ("1", True),
                                         ("false", False), ("FALSE", False), ("0", False)])
def test_bool_values(text, value):
    assert C.parse_args(["--resume", text])[1] == {"resume": value}
    assert C.parse_args([f"--resume={text}"])[1] == {"resume": value}


def test_bare_bool_flag_means_true():
    assert C.parse_args(["--resume"])[1] == {"resume": True}
    assert C.parse_args(["--resume", "--max_iters", "5"])[1] == {"resume": True, "max_iters": 5}


def test_negative_numbers_are_values_not_options():
    assert C.parse_args(["--seed", "-3", "--min_lr", "-1e-3"])[1] == {"seed": -3, "min_lr": -1e-3}
    with pytest.raises(C.ConfigError, match="seed must be >= 0, got -3"):
        C.make_config(None, {"seed": -3}).validate()


@pytest.mark.parametrize("argv, pattern", [
    (["--n_embd", "1.5"], r"^--n_embd: '1.5' is not an int"),
    (["--learning_rate", "fast"], r"^--learning_rate: 'fast' is not a float"),
    (["--resume", "yes"], r"^--resume: 'yes' is not a bool \(expected true, false, 1 or 0\)$"),
    (["--nope", "1"], r"^unknown option --nope; valid options: --config, --model, "),
    (["--config", "tiny"], r"^unknown preset 'tiny'; presets: small, lecture, bigram"),
])
def test_bad_overrides(argv, pattern):
    with pytest.raises(C.ConfigError, match=pattern) as e:
        C.parse_args(argv)
    assert "\n" not in str(e.value)


def test_key_value_and_key_equals_value_are_the_same_for_every_field():
    samples = {int: "7", float: "0.25", bool: "false", str: "some-name.txt"}
    for name, kind in C.field_types().items():
        spaced = C.parse_args([f"--{name}", samples[kind]])
        assert spaced == C.parse_args([f"--{name}={samples[kind]}"]) == (None, {name: spaced[1][name]})
        assert type(spaced[1][name]) is kind
    assert C.parse_args(["--config", "bigram"]) == C.parse_args(["--config=bigram"]) == ("bigram", {})


def test_overrides_keep_command_line_order_and_the_last_value_wins():
    preset, o = C.parse_args(["--n_layer", "2", "--fused=0", "--config", "gpt", "--n_layer", "3"])
    assert preset == "gpt" and list(o.items()) == [("n_layer", 3), ("fused", False)]


@pytest.mark.parametrize("text, value", [("true", True), ("TRUE", True), ("1", True),
                                         ("false", False), ("False", False), ("0", False)])
def test_fused_is_a_bool_option(text, value):
    assert C.parse_args(["--fused", text])[1] == {"fused": value}
    assert C.parse_args([f"--fused={text}"])[1] == {"fused": value}
    assert C.make_config(None, {"fused": value}).fused is value
    assert C.make_config().fused is True and C.make_config("lecture").fused is True


def test_bare_bool_flags():
    assert C.parse_args(["--fused"])[1] == {"fused": True}
    assert C.parse_args(["--fused", "--resume"])[1] == {"fused": True, "resume": True}
    assert C.parse_args(["--resume", "--fused", "0", "--seed", "-1"])[1] == \
        {"resume": True, "fused": False, "seed": -1}


def test_the_parser_defaults_are_the_presets():
    for preset in (None, "lecture", "bigram"):
        args, extras = C.build_parser(preset).parse_known_args([])
        assert extras == [] and args.config == preset
        assert {k: getattr(args, k) for k in C.field_types()} == C.make_config(preset).to_dict()


VALID = ", ".join("--" + k for k in ["config", *C.field_types()])


@pytest.mark.parametrize("argv, message", [
    # a value that is not of the field's type: the option, the value and an example
    (["--n_embd", "1.5"], "--n_embd: '1.5' is not an int (e.g. --n_embd 128)"),
    (["--max_iters="], "--max_iters: '' is not an int (e.g. --max_iters 2000)"),
    (["--learning_rate=fast"], "--learning_rate: 'fast' is not a float (e.g. --learning_rate 0.001)"),
    (["--fused", "yes"], "--fused: 'yes' is not a bool (expected true, false, 1 or 0)"),
    (["--resume", "-1"], "--resume: '-1' is not a bool (expected true, false, 1 or 0)"),
    # a missing value
    (["--max_iters"], "--max_iters needs a value"),
    (["--data", "--seed", "3"], "--data needs a value"),
    (["--config"], "--config needs a value"),
    # an unknown option names the valid ones; no abbreviations
    (["--nope", "1"], f"unknown option --nope; valid options: {VALID}"),
    (["--nope=1"], f"unknown option --nope; valid options: {VALID}"),
    (["--max_it", "5"], f"unknown option --max_it; valid options: {VALID}"),
    (["--fuse"], f"unknown option --fuse; valid options: {VALID}"),
    (["--help"], f"unknown option --help; valid options: {VALID}"),  # train.py handles it first
    # an unknown preset lists the presets
    (["--config", "tiny"], f"unknown preset 'tiny'; presets: {', '.join(C.PRESETS)}"),
    (["--config=tiny", "--n_layer", "2"], f"unknown preset 'tiny'; presets: {', '.join(C.PRESETS)}"),
    # positional arguments
    (["foo"], "unexpected argument 'foo': options look like --key value"),
    (["--data", "x.txt", "extra"], "unexpected argument 'extra': options look like --key value"),
    (["-x"], "unexpected argument '-x': options look like --key value"),
    (["-h"], "unexpected argument '-h': options look like --key value"),
    (["--"], "unexpected argument '--': options look like --key value"),
    (["--resume", "--"], "unexpected argument '--': options look like --key value"),
])
def test_command_line_errors(argv, message):
    with pytest.raises(C.ConfigError) as e:
        C.parse_args(argv)
    assert str(e.value) == message


def test_values_may_start_with_one_dash():
    assert C.parse_args(["--data", "-file.txt", "--min_lr", "-.5"])[1] == \
        {"data": "-file.txt", "min_lr": -0.5}


def test_a_comment_may_continue_on_the_next_line():
    assert C.field_help()["fused"] == ("fused attention and linear+ReLU ops (False: the ops as the "
                                       "lecture writes them; same result, slower)")


@pytest.mark.parametrize("fused", [True, False])
def test_fused_reaches_the_model(tmp_path, text_file, fused):
    from gpt.model import CausalSelfAttention, FeedForward
    from train.guard import OutDirLock
    from train.train import prepare
    overrides = {"n_embd": 16, "n_head": 2, "n_layer": 2, "block_size": 8, "device": "cpu",
                 "data": text_file, "fused": fused, "out_dir": str(tmp_path)}
    lock = OutDirLock(str(tmp_path))
    try:
        _, _, _, model, _, _ = prepare(None, overrides, lock)
    finally:
        lock.release()
    layers = [m for m in model.modules() if isinstance(m, (CausalSelfAttention, FeedForward))]
    assert len(layers) == 4 and all(m.fused is fused for m in layers)


def test_default_preset_is_small():
    cfg = C.make_config()
    expect = dict(batch_size=12, block_size=64, n_embd=128, n_head=4, n_layer=4, dropout=0.0,
                  learning_rate=1e-3, max_iters=2000, eval_interval=250, eval_iters=20,
                  lr_decay="cosine", min_lr=1e-4)
    assert {k: getattr(cfg, k) for k in expect} == expect


def test_lecture_preset():
    cfg = C.make_config("lecture")
    expect = dict(batch_size=64, block_size=256, n_embd=384, n_head=6, n_layer=6, dropout=0.2,
                  learning_rate=3e-4, max_iters=6000, eval_interval=500, eval_iters=200)
    assert {k: getattr(cfg, k) for k in expect} == expect


def test_every_preset_is_valid_and_names_a_model():
    from gpt.model import MODELS
    for name in MODELS:  # one preset per lecture stage
        assert C.PRESETS[name]["model"] == name
    for name in C.PRESETS:
        C.make_config(name).validate(model_names=list(MODELS))


def test_every_field_has_a_comment():
    helps = C.field_help()
    assert set(helps) == set(C.field_types())
    assert all(h.strip() for h in helps.values())


def test_validate_checks_batch_split_across_ranks():
    cfg = C.make_config(None, {"batch_size": 12})
    cfg.validate(world_size=4)
    with pytest.raises(C.ConfigError, match=r"batch_size \(12\) must be divisible .* \(5\)"):
        cfg.validate(world_size=5)


def test_config_json_round_trip():
    cfg = C.make_config("lecture", {"seed": 5})
    assert C.config_from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(C.ConfigError, match="unknown fields"):
        C.config_from_dict({**cfg.to_dict(), "bogus": 1})


def test_learning_rate_schedule():
    from train.train import get_lr
    const = C.make_config(None, {"learning_rate": 1.0, "warmup_iters": 3, "lr_decay": "none"})
    assert [get_lr(s, const) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    cos = C.make_config(None, {"learning_rate": 1.0, "min_lr": 0.1, "lr_decay": "cosine",
                               "warmup_iters": 0, "max_iters": 100})
    assert get_lr(0, cos) == pytest.approx(1.0)
    assert get_lr(50, cos) == pytest.approx(0.55)
    assert get_lr(100, cos) == pytest.approx(0.1)
    lrs = [get_lr(s, cos) for s in range(101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


_MALLOC_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
import tinytensor.malloc as m
from train.train import main
untouched = m.tuned
code = main(sys.argv[2:])
print(untouched, m.automatic, m.tuned, code)
"""


def test_train_py_tunes_malloc_and_importing_does_not(tmp_path, text_file):
    """train.py's optimizer tunes malloc (tinytensor.malloc), and --malloc_tuning false turns
    that off before the optimizer is made."""
    import platform
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    args = [*TINY, "--data", text_file, "--max_iters", 1, "--eval_iters", 1]
    for setting, tuned in ((None, glibc), ("false", False)):
        extra = [] if setting is None else ["--malloc_tuning", setting]
        out = subprocess.run([sys.executable, "-c", _MALLOC_SCRIPT, ROOT, *map(str, args + extra),
                              "--out_dir", str(tmp_path / f"o{setting}")], capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[-4:] == ["False", str(setting is None), str(tuned), "0"], \
            out.stdout[-500:]


def test_weight_decay_only_on_2d_parameters():
    import tinytensor.nn as nn
    from train.train import make_optimizer
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    opt = make_optimizer(model, C.make_config(None, {"weight_decay": 0.1}))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert sorted(p.ndim for p in decay["params"]) == [2, 2]
    assert all(p.ndim == 1 for p in no_decay["params"]) and len(no_decay["params"]) == 4
