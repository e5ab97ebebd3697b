"""train/sample.py: text from a checkpoint, and its errors (subprocess runs)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train", "train.py")
SAMPLE = os.path.join(ROOT, "train", "sample.py")
SEPARATOR = "-" * 40


def make_text(n_lines=200, seed=0):
    words = "the king shall speak to thee and I will not go where thy good lord hath bid me".split()
    rng = np.random.default_rng(seed)
    return "\n".join(" ".join(rng.choice(words, size=8)).capitalize() + "." for _ in range(n_lines)) + "\n"


def run(script, *args):
    p = subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True,
                       timeout=300)
    assert "Traceback" not in p.stderr, p.stderr
    return p


def assert_one_line_error(p, code, *needles):
    assert p.returncode == code, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sample")
    text = d / "text.txt"
    text.write_text(make_text(), encoding="utf-8")
    out = d / "out"
    p = run(TRAIN, "--data", text, "--out_dir", out, "--n_embd", 16, "--n_head", 2, "--n_layer", 1,
            "--block_size", 8, "--batch_size", 4, "--max_iters", 30, "--eval_interval", 10,
            "--eval_iters", 2, "--learning_rate", "1e-2", "--device", "cpu")
    assert p.returncode == 0, p.stderr
    return out


def vocab(out_dir):
    with np.load(out_dir / "ckpt.npz", allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
    return set(json.loads(meta["tokenizer"])["chars"])


def test_sample_with_prompt(out_dir):
    p = run(SAMPLE, "--out_dir", out_dir, "--start", "The king", "--max_new_tokens", 40)
    assert p.returncode == 0, p.stderr
    text = p.stdout[:-1]  # print's newline
    assert text.startswith("The king") and len(text) == len("The king") + 40
    assert set(text) <= vocab(out_dir)


def test_default_start_and_lengths(out_dir):
    p = run(SAMPLE, "--out_dir", out_dir, "--max_new_tokens", 25)
    assert p.returncode == 0, p.stderr
    assert len(p.stdout) == 1 + 25 + 1  # token 0, the new tokens, print's newline


def test_seed_makes_samples_reproducible(out_dir):
    a = run(SAMPLE, "--out_dir", out_dir, "--seed", 1, "--max_new_tokens", 60).stdout
    b = run(SAMPLE, "--out_dir", out_dir, "--seed", 1, "--max_new_tokens", 60).stdout
    c = run(SAMPLE, "--out_dir", out_dir, "--seed", 2, "--max_new_tokens", 60).stdout
    assert a == b and a != c


def test_top_k_1_is_greedy_whatever_the_seed(out_dir):
    runs = [run(SAMPLE, "--out_dir", out_dir, "--top_k", 1, "--seed", s, "--start", "Th",
                "--max_new_tokens", 30, "--temperature", 0.7).stdout for s in (1, 2)]
    assert runs[0] == runs[1]


def test_top_p(out_dir):
    """--top_p 1 is the default; a tiny --top_p keeps only the likeliest token: greedy, as
    --top_k 1, whatever the seed."""
    args = ["--out_dir", out_dir, "--start", "Th", "--max_new_tokens", 30]
    plain = run(SAMPLE, *args, "--seed", 3).stdout
    assert run(SAMPLE, *args, "--seed", 3, "--top_p", 1).stdout == plain
    greedy = run(SAMPLE, *args, "--top_k", 1).stdout
    for seed in (1, 2):
        p = run(SAMPLE, *args, "--top_p", "1e-6", "--seed", seed)
        assert p.returncode == 0, p.stderr
        assert p.stdout == greedy
    p = run(SAMPLE, *args, "--top_p", 0.8, "--top_k", 10, "--temperature", 0.8)
    assert p.returncode == 0 and p.stdout.startswith("Th"), p.stderr


def test_num_samples_and_best(out_dir):
    p = run(SAMPLE, "--out_dir", out_dir, "--num_samples", 3, "--max_new_tokens", 20, "--best")
    assert p.returncode == 0, p.stderr
    samples = p.stdout.split(SEPARATOR + "\n")
    assert len(samples) == 3
    assert len(set(samples)) == 3  # different draws


def test_prompt_outside_the_vocabulary(out_dir):
    p = run(SAMPLE, "--out_dir", out_dir, "--start", "Thé kïng")
    assert_one_line_error(p, 2, "outside the checkpoint's vocabulary", "'é'", "'ï'")


@pytest.mark.parametrize("args, needle", [
    (["--temperature", "0"], "--temperature"),
    (["--temperature", "1e400"], "--temperature must be a positive number, got inf"),
    (["--top_k", "-1"], "--top_k"),
    (["--top_p", "0"], "--top_p must be in (0, 1]"),
    (["--top_p", "1.01"], "--top_p must be in (0, 1]"),
    (["--top_p", "nan"], "--top_p must be in (0, 1]"),
    (["--num_samples", "0"], "--num_samples"),
    (["--max_new_tokens", "many"], "--max_new_tokens"),
    (["--max_new_tokens", str(10**20)], "--max_new_tokens must be 0 to 1,000,000 (a sample is "
                                        "kept in memory and printed when complete), got 1000"),
    (["--seed", str(2**64)], "--seed must be in [0, 2**64 - 1] (64 bits, what "
                             "tinytensor.manual_seed and torch.manual_seed take), got 18446"),
    (["--seed", "-1"], "--seed must be in [0, 2**64 - 1]"),
    (["--bogus"], "--bogus"),
])
def test_bad_arguments(out_dir, args, needle):
    assert_one_line_error(run(SAMPLE, "--out_dir", out_dir, *args), 2, needle)


def test_numbers_at_the_ends_of_their_ranges_work(out_dir):
    """The largest seed; a top_k above the vocabulary (all tokens); a temperature so small that
    logits / temperature overflows picks the likeliest token (what --top_k 1 picks), without
    NumPy's overflow warnings."""
    common = ["--out_dir", out_dir, "--start", "Th", "--max_new_tokens", 30]
    p = run(SAMPLE, *common, "--seed", 2**64 - 1)
    assert p.returncode == 0 and len(p.stdout) == 2 + 30 + 1, p.stderr
    huge_k, no_k = (run(SAMPLE, *common, "--top_k", k).stdout for k in (10**20, 0))
    assert huge_k == no_k
    greedy = run(SAMPLE, *common, "--top_k", 1).stdout
    for temperature in ("1e-320", "5e-324", "1e-300"):
        p = run(SAMPLE, *common, "--temperature", temperature)
        assert p.returncode == 0 and p.stderr == "", p.stderr
        assert p.stdout == greedy, temperature


def test_missing_checkpoint(tmp_path):
    assert_one_line_error(run(SAMPLE, "--out_dir", tmp_path), 1, "checkpoint not found",
                          str(tmp_path))


def test_corrupt_checkpoint(tmp_path, out_dir):
    bad = tmp_path / "out"
    shutil.copytree(out_dir, bad)
    data = (bad / "ckpt.npz").read_bytes()
    (bad / "ckpt.npz").write_bytes(data[: len(data) // 3])
    assert_one_line_error(run(SAMPLE, "--out_dir", bad), 1, "corrupt", "ckpt.npz")
