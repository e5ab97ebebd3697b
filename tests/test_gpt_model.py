"""gpt.model: config checks, every lecture stage forward/backward/training, the fused causal
softmax, and generate() (shapes, cropping, temperature, top_k, the KV cache)."""
import math
import re
import warnings

import numpy as np
import pytest

import tinytensor as tt
from gpt import MODELS, CharDataset, GPTConfig, GPTLanguageModel, KVCache, build_model, sample_next
from gpt.model import BigramLanguageModel
from tinytensor import backend
from torch_helper import rel_err

TINY = GPTConfig(vocab_size=11, block_size=8, n_embd=16, n_head=4, n_layer=2, dropout=0.0)
ATTENTION_MODELS = [n for n in MODELS if n not in ("bigram", "bigram_pos")]
CACHED_MODELS = ["blocks", "layernorm", "gpt"]  # the Head stages recompute, as the lecture's


def tokens(shape, vocab=11, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=shape)


# ---------------------------------------------------------------- config and registry
@pytest.mark.parametrize("changes, message", [
    (dict(n_embd=30, n_head=4), "n_embd (30) must be divisible by n_head (4)"),
    (dict(n_layer=0), "n_layer must be a positive integer, got 0"),
    (dict(block_size=-8), "block_size must be a positive integer, got -8"),
    (dict(vocab_size=2.5), "vocab_size must be a positive integer, got 2.5"),
    (dict(dropout=1.0), "dropout must be a probability in [0, 1), got 1.0"),
    (dict(dropout=-0.1), "dropout must be a probability in [0, 1), got -0.1"),
])
def test_config_validation(changes, message):
    cfg = GPTConfig(**{**TINY.__dict__, **changes})
    with pytest.raises(ValueError) as err:
        cfg.validate()
    assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError):
        GPTLanguageModel(cfg)


def test_defaults_are_the_lecture_hyperparameters():
    cfg = GPTConfig()
    assert (cfg.vocab_size, cfg.block_size, cfg.n_embd, cfg.n_head, cfg.n_layer, cfg.dropout) == \
        (65, 256, 384, 6, 6, 0.2)
    tt.manual_seed(0)
    assert GPTLanguageModel(cfg).num_parameters() == 10_788_929  # the lecture's "10.788929 M parameters"


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(ValueError) as err:
        build_model("transformer", TINY)
    assert str(err.value) == ("unknown model 'transformer': choose one of bigram, bigram_pos, "
                              "single_head, multi_head, ffwd, blocks, layernorm, gpt")


def test_init_is_normal_002_with_zero_biases_and_seeded():
    tt.manual_seed(3)
    a = GPTLanguageModel(GPTConfig(vocab_size=65, block_size=64, n_embd=128, n_head=4, n_layer=2))
    tt.manual_seed(3)
    b = GPTLanguageModel(GPTConfig(vocab_size=65, block_size=64, n_embd=128, n_head=4, n_layer=2))
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_array_equal(p.data, q.data)
        assert p.dtype == np.float32
        if name.endswith("bias") and "ln" not in name:
            assert not p.data.any(), name
        elif name.endswith("weight") and "ln" not in name:
            assert abs(p.data.std() - 0.02) < 0.002 and abs(p.data.mean()) < 0.002, name
    assert not np.array_equal(a.lm_head.weight.data, GPTLanguageModel(a.config).lm_head.weight.data)


# ---------------------------------------------------------------- every stage
@pytest.mark.parametrize("name", list(MODELS))
def test_every_stage_runs_forward_and_backward(name, device):
    tt.manual_seed(0)
    model = build_model(name, TINY).to(device)
    x, y = tokens((3, 8)), tokens((3, 8), seed=1)
    logits, loss = model(x, y)
    assert logits.shape == (3, 8, 11) and logits.device.type == device
    assert abs(loss.item() - math.log(11)) < 0.05  # the small init: nearly uniform predictions
    assert model(tt.Tensor(x))[1] is None
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, pname
        assert np.isfinite(backend.to_numpy(p.grad)).all(), pname
    assert sum(float(abs(backend.to_numpy(p.grad)).sum()) for p in model.parameters()) > 0
    # shorter contexts work, longer ones are a clear error
    assert model(x[:, :3])[0].shape == (3, 3, 11)
    if name != "bigram":
        with pytest.raises(ValueError, match="block_size is 8"):
            model(tokens((1, 9)))


@pytest.mark.parametrize("name", list(MODELS))
def test_every_stage_learns_a_repeated_text(name):
    ds = CharDataset("the quick brown fox jumps over the lazy dog. " * 20)
    cfg = GPTConfig(vocab_size=ds.vocab_size, block_size=16, n_embd=32, n_head=4, n_layer=2, dropout=0.1)
    tt.manual_seed(0)
    model = build_model(name, cfg)
    opt = tt.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(40):
        _, loss = model(*ds.get_batch("train", 8, 16, rng))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > math.log(ds.vocab_size) - 0.05
    assert np.mean(losses[-5:]) < losses[0] - 0.4, losses


@pytest.mark.parametrize("name", list(MODELS))
def test_no_stage_looks_into_the_future(name):
    tt.manual_seed(0)
    model = build_model(name, TINY)
    x = tokens((2, 8))
    x2 = x.copy()
    x2[:, 5:] = (x2[:, 5:] + 1) % 11  # change the last three tokens
    a, b = model(x)[0].numpy(), model(x2)[0].numpy()
    np.testing.assert_allclose(a[:, :5], b[:, :5], rtol=0, atol=1e-6)
    assert not np.allclose(a[:, 5:], b[:, 5:])


def test_stages_differ_as_the_lecture_builds_them():
    names = {n: [k for k, _ in build_model(n, TINY).named_parameters()] for n in MODELS}
    assert names["bigram"] == ["token_embedding_table.weight"]
    assert names["bigram_pos"] == ["token_embedding_table.weight", "position_embedding_table.weight",
                                   "lm_head.weight", "lm_head.bias"]
    assert names["single_head"][2:5] == ["sa_head.key.weight", "sa_head.query.weight",
                                         "sa_head.value.weight"]
    assert "sa_heads.heads.3.value.weight" in names["multi_head"]
    assert "sa_heads.proj.weight" not in names["multi_head"]            # no projection yet
    assert "ffwd.0.weight" in names["ffwd"]
    assert "blocks.1.sa.proj.weight" in names["blocks"] and "ln_f.weight" not in names["blocks"]
    assert names["layernorm"] == names["gpt"] and "blocks.1.ln2.bias" in names["gpt"]
    tt.manual_seed(0)
    single = build_model("single_head", TINY)
    multi = build_model("multi_head", TINY)
    assert single.sa_head.key.weight.shape == (16, 16) and single.sa_head.tril.shape == (8, 8)
    assert len(multi.sa_heads.heads) == 4 and multi.sa_heads.heads[0].key.weight.shape == (4, 16)
    assert "sa_head.tril" in single.state_dict()                        # a buffer, as in torch
    # only the final model has dropout
    cfg = GPTConfig(**{**TINY.__dict__, "dropout": 0.5})
    assert build_model("layernorm", cfg).config.dropout == 0.0
    assert build_model("blocks", cfg).config.dropout == 0.0
    assert build_model("gpt", cfg).config.dropout == 0.5
    assert isinstance(build_model("bigram", cfg), BigramLanguageModel)


def test_dropout_only_in_training_mode():
    tt.manual_seed(0)
    model = GPTLanguageModel(GPTConfig(**{**TINY.__dict__, "dropout": 0.3}))
    x = tokens((2, 8))
    a, b = model(x)[0].numpy(), model(x)[0].numpy()
    assert not np.allclose(a, b)
    model.eval()
    np.testing.assert_array_equal(model(x)[0].numpy(), model(x)[0].numpy())


def test_forward_input_errors():
    model = build_model("gpt", TINY)
    with pytest.raises(ValueError, match=r"idx must be a non-empty integer array of shape \(B, T\)"):
        model(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="idx must be"):
        model(np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match=r"targets must have the shape of idx, \(2, 3\)"):
        model(tokens((2, 3)), tokens((2, 4)))


# ---------------------------------------------------------------- generate
def test_generate_shapes_cropping_and_modes():
    tt.manual_seed(0)
    model = build_model("gpt", GPTConfig(**{**TINY.__dict__, "dropout": 0.2}))
    prompt = tokens((2, 3))
    out = model.generate(prompt, 20, rng=np.random.default_rng(0))
    assert out.shape == (2, 23) and out.dtype == np.int64
    assert out.min() >= 0 and out.max() < 11
    np.testing.assert_array_equal(out[:, :3], prompt)
    assert model.training  # generate samples in eval mode and restores the mode
    # a prompt longer than block_size is cropped to its last block_size tokens
    long_prompt = tokens((2, 30), seed=3)
    out = model.generate(long_prompt, 5, rng=np.random.default_rng(1))
    assert out.shape == (2, 35)
    cropped = model.generate(long_prompt[:, -8:], 5, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(out[:, 30:], cropped[:, 8:])
    np.testing.assert_array_equal(model.generate(prompt, 0), prompt)
    assert model.generate(tt.Tensor(prompt), 2, rng=np.random.default_rng(0)).shape == (2, 5)
    # the same rng draws the same tokens; tt.manual_seed seeds the default stream
    a = model.generate(prompt, 10, rng=np.random.default_rng(5))
    np.testing.assert_array_equal(a, model.generate(prompt, 10, rng=np.random.default_rng(5)))
    tt.manual_seed(9)
    b = model.generate(prompt, 10)
    tt.manual_seed(9)
    np.testing.assert_array_equal(b, model.generate(prompt, 10))


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=-1), "max_new_tokens must be a non-negative integer"),
    (dict(max_new_tokens=3, temperature=0.0), "temperature must be a positive number"),
    (dict(max_new_tokens=3, top_k=0), "top_k must be a positive integer or None"),
    (dict(max_new_tokens=3, top_p=0.0), r"top_p must be a number in \(0, 1\] or None"),
    (dict(max_new_tokens=3, top_p=1.5), r"top_p must be a number in \(0, 1\] or None"),
    (dict(max_new_tokens=3, top_p=float("nan")), r"top_p must be a number in \(0, 1\]"),
    (dict(max_new_tokens=3, top_p="0.9"), r"top_p must be a number in \(0, 1\]"),
])
def test_generate_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_model("gpt", TINY).generate(tokens((1, 2)), **kwargs)


def test_sample_next_follows_temperature_and_top_k():
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 20000
    batch = np.tile(logits, (n, 1))
    for temperature in (0.5, 1.0, 2.0):
        draws = sample_next(batch, temperature, None, np.random.default_rng(0))
        freq = np.bincount(draws, minlength=6) / n
        p = np.exp(logits / temperature) / np.exp(logits / temperature).sum()
        assert 0.5 * np.abs(freq - p).sum() < 0.015, (temperature, freq, p)  # total variation
    cold = np.bincount(sample_next(batch, 0.5, None, np.random.default_rng(1)), minlength=6)
    hot = np.bincount(sample_next(batch, 2.0, None, np.random.default_rng(1)), minlength=6)
    assert cold[0] > hot[0] and cold[3:].sum() < hot[3:].sum()
    draws = sample_next(batch, 1.0, 3, np.random.default_rng(2))
    assert set(draws.tolist()) == {0, 1, 2}
    freq = np.bincount(draws, minlength=3) / n
    p = np.exp(logits[:3]) / np.exp(logits[:3]).sum()
    assert 0.5 * np.abs(freq - p).sum() < 0.015
    greedy = sample_next(np.random.default_rng(3).standard_normal((50, 9)), 1.0, 1, np.random.default_rng(0))
    np.testing.assert_array_equal(greedy, np.random.default_rng(3).standard_normal((50, 9)).argmax(1))


def nucleus_reference(p, top_p):
    """The kept token set of each row, by the definition: sort the probabilities, likeliest
    first, and take the shortest prefix whose sum reaches top_p."""
    kept = []
    for row in p / p.sum(axis=1, keepdims=True):
        order, total, chosen = sorted(range(len(row)), key=lambda i: -row[i]), 0.0, set()
        for i in order:
            chosen.add(i)
            total += row[i]
            if total >= top_p:
                break
        kept.append(chosen)
    return kept


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.61, 0.75, 0.85, 0.99])  # off the boundaries
def test_top_p_keeps_the_nucleus_and_samples_it_in_proportion(top_p):
    logits = np.log(np.array([[0.4, 0.25, 0.15, 0.1, 0.06, 0.04],     # no ties
                              [0.04, 0.06, 0.1, 0.15, 0.25, 0.4],     # the same, reversed
                              [0.9, 0.05, 0.02, 0.015, 0.01, 0.005]]))  # one dominant token
    want = nucleus_reference(np.exp(logits), top_p)
    n = 12000
    batch = np.repeat(logits, n, axis=0)
    draws = sample_next(batch, 1.0, None, np.random.default_rng(0), top_p=top_p).reshape(3, n)
    for row, keep, d in zip(np.exp(logits), want, draws):
        assert set(d.tolist()) == keep, (top_p, keep, sorted(set(d.tolist())))
        idx = sorted(keep)
        p = row[idx] / row[idx].sum()  # renormalised over the nucleus
        freq = np.array([(d == i).mean() for i in idx])
        assert 0.5 * np.abs(freq - p).sum() < 0.02, (top_p, freq, p)


def test_top_p_combines_with_temperature_and_top_k_in_order():
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((40, 30)) * 2
    for temperature, top_k, top_p in [(0.7, None, 0.8), (1.5, 10, 0.6), (1.0, 3, 0.999)]:
        scaled = logits / temperature
        if top_k is not None:  # top_k first: the nucleus of the k likeliest
            kth = np.sort(scaled, axis=1)[:, -top_k, None]
            scaled = np.where(scaled < kth, -np.inf, scaled)
        want = nucleus_reference(np.exp(scaled - scaled.max(1, keepdims=True)), top_p)
        seen = [set() for _ in range(len(logits))]
        for seed in range(60):
            got = sample_next(logits, temperature, top_k, np.random.default_rng(seed), top_p=top_p)
            for s, g in zip(seen, got.tolist()):
                s.add(g)
        for s, w in zip(seen, want):
            assert s <= w, (temperature, top_k, top_p)
        assert sum(map(len, seen)) > 0.8 * sum(map(len, want))


def test_top_p_1_changes_nothing_and_tiny_top_p_is_greedy():
    tt.manual_seed(0)
    model = sharpened(build_model("gpt", TINY))
    prompt = tokens((3, 4))
    for use_cache in (True, False):
        a = model.generate(prompt, 12, rng=np.random.default_rng(7), use_cache=use_cache)
        b = model.generate(prompt, 12, rng=np.random.default_rng(7), use_cache=use_cache, top_p=1.0)
        np.testing.assert_array_equal(a, b)
        greedy = model.generate(prompt, 12, top_k=1, rng=np.random.default_rng(1), use_cache=use_cache)
        tiny = model.generate(prompt, 12, top_p=1e-9, rng=np.random.default_rng(2), use_cache=use_cache)
        np.testing.assert_array_equal(greedy, tiny)
    # with and without the cache: the same tokens for the same rng
    c = model.generate(prompt, 12, top_p=0.7, temperature=1.3, rng=np.random.default_rng(3))
    d = model.generate(prompt, 12, top_p=0.7, temperature=1.3, rng=np.random.default_rng(3),
                       use_cache=False)
    np.testing.assert_array_equal(c, d)


def test_a_tiny_temperature_is_greedy_without_warnings():
    """exp((logits - max) / temperature): a temperature whose logits / temperature overflows
    (1e-320 is a subnormal) picks the likeliest token, the limit as it goes to 0, where
    logits / temperature first gave inf - inf = nan and token 0 forever."""
    logits = np.random.default_rng(3).standard_normal((50, 9)) * 5
    for temperature in (1e-320, 5e-324, 1e-300, 1e-30):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            draws = sample_next(logits, temperature, None, np.random.default_rng(0))
        np.testing.assert_array_equal(draws, logits.argmax(1), err_msg=str(temperature))
    assert sample_next(logits, 1e-320, 20, np.random.default_rng(0)).tolist() == \
        logits.argmax(1).tolist()                        # a top_k above the vocabulary: all


@pytest.mark.parametrize("temperature, top_k, message", [
    (0.0, None, "temperature must be a positive number, got 0.0"),
    (-1.0, None, "temperature must be a positive number"),
    (float("inf"), None, "temperature must be a positive number, got inf"),
    (float("nan"), None, "temperature must be a positive number, got nan"),
    (True, None, "temperature must be a positive number, got True"),
    (1.0, 0, "top_k must be a positive integer or None, got 0"),
    (1.0, 2.5, "top_k must be a positive integer or None, got 2.5"),
])
def test_sample_next_argument_errors(temperature, top_k, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        sample_next(np.zeros((1, 4)), temperature, top_k, np.random.default_rng(0))


def test_generate_top_k_1_is_greedy():
    tt.manual_seed(0)
    model = build_model("gpt", TINY)
    prompt = tokens((3, 4))
    out = model.generate(prompt, 6, top_k=1, rng=np.random.default_rng(0))
    idx = prompt
    for _ in range(6):
        logits = model(idx[:, -8:])[0].numpy()
        idx = np.concatenate([idx, logits[:, -1].argmax(-1)[:, None]], axis=1)
    np.testing.assert_array_equal(out, idx)


def sharpened(model, seed=0, std=0.3):
    """The model with larger random weights than the N(0, 0.02) init: peaked, input-dependent
    predictions, so a wrong position or a stale key would change the sampled tokens."""
    rng = np.random.default_rng(seed)
    for p in model.parameters():
        p.data[...] = rng.normal(0.0, std, size=p.shape)
    return model


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", CACHED_MODELS)
def test_kv_cache_gives_the_same_tokens_as_recomputing(name, dtype):
    tt.set_default_dtype(dtype)
    tt.manual_seed(1)
    model = sharpened(build_model(name, GPTConfig(**{**TINY.__dict__, "n_embd": 32})))
    seen = []  # (T, cached?) of each forward pass: proof that the cached path is taken
    inner = model.forward

    def recording(idx, targets=None, kv_cache=None):
        seen.append((idx.shape[1], kv_cache is not None))
        return inner(idx, targets, kv_cache)

    model.forward = recording
    for prompt in (tokens((3, 3), seed=4), tokens((2, 12), seed=5)):
        seen.clear()
        cached = model.generate(prompt, 25, rng=np.random.default_rng(7))
        lengths = list(seen)
        seen.clear()
        recomputed = model.generate(prompt, 25, rng=np.random.default_rng(7), use_cache=False)
        np.testing.assert_array_equal(cached, recomputed)  # past block_size (8) too
        if prompt.shape[1] == 3:  # 3 prefilled, 5 single positions, then the window slides
            assert lengths[:6] == [(3, True)] + [(1, True)] * 5
            assert lengths[6:] == [(8, True)] * 19
        assert seen == [(min(prompt.shape[1] + i, 8), False) for i in range(25)]


@pytest.mark.parametrize("name", CACHED_MODELS)
def test_cached_logits_match_the_full_forward(name):
    tt.set_default_dtype(np.float64)
    tt.manual_seed(0)
    model = sharpened(build_model(name, TINY))
    x = tokens((2, 8))
    full = model(x)[0].numpy()
    cache = [KVCache(8) for _ in range(model.n_attention_layers)]
    with tt.no_grad():
        parts = [model(x[:, :3], kv_cache=cache)[0].numpy()]
        parts += [model(x[:, t:t + 1], kv_cache=cache)[0].numpy() for t in range(3, 8)]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=1e-12, atol=1e-12)
    assert full.std() > 0.2  # peaked logits: the comparison means something
    assert cache[0].length == 8 and cache[-1].k.shape[0] == 2 and cache[-1].k.shape[2] == 8
    with pytest.raises(ValueError, match="block_size is 8"), tt.no_grad():
        model(x[:, :1], kv_cache=cache)


# ---------------------------------------------------------------- CausalSelfAttention = heads
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 2e-6)])
def test_causal_self_attention_equals_multi_head_attention_of_heads(fused, dtype, tol):
    """The batched module equals the lecture's MultiHeadAttention of Heads when its q/k/v
    weight stacks the heads' query, key and value weights: forward, and every gradient."""
    from gpt.model import CausalSelfAttention, MultiHeadAttention
    tt.set_default_dtype(dtype)
    try:
        B, T, C, nh, block = 2, 6, 12, 3, 8
        hs = C // nh
        tt.manual_seed(0)
        mha = MultiHeadAttention(C, nh, hs, block, dropout=0.0, proj=True)
        csa = CausalSelfAttention(C, nh, block, dropout=0.0, fused=fused)
        rng = np.random.default_rng(0)
        for p in list(mha.parameters()):
            p.data[...] = rng.standard_normal(p.shape) * 0.5
        heads = mha.heads
        csa.qkv.weight.data[...] = np.concatenate(
            [h.query.weight.data for h in heads] + [h.key.weight.data for h in heads]
            + [h.value.weight.data for h in heads])                 # (3*nh*hs, C)
        csa.proj.weight.data[...] = mha.proj.weight.data
        csa.proj.bias.data[...] = mha.proj.bias.data
        x_np = rng.standard_normal((B, T, C)).astype(dtype)
        w = rng.standard_normal((B, T, C)).astype(dtype)
        outs = []
        for m in (mha, csa):
            x = tt.Tensor(x_np, requires_grad=True)
            y = m(x)
            (y * tt.Tensor(w)).sum().backward()
            outs.append((y.numpy(), x.grad))
        (y1, gx1), (y2, gx2) = outs
        assert rel_err(y2, y1) <= tol and rel_err(gx2, gx1) <= tol
        gq = np.concatenate([h.query.weight.grad for h in heads])
        gk = np.concatenate([h.key.weight.grad for h in heads])
        gv = np.concatenate([h.value.weight.grad for h in heads])
        assert rel_err(csa.qkv.weight.grad, np.concatenate([gq, gk, gv])) <= tol
        assert rel_err(csa.proj.weight.grad, mha.proj.weight.grad) <= tol
        assert rel_err(csa.proj.bias.grad, mha.proj.bias.grad) <= tol
    finally:
        tt.set_default_dtype(np.float32)


def test_the_model_uses_only_the_public_api():
    """gpt/model.py imports tinytensor, tinytensor.nn and tinytensor.nn.functional only (no
    fused ops, backend or engine internals): the fast paths sit behind F's names."""
    import ast
    import gpt.model as gm
    tree = ast.parse(open(gm.__file__).read())
    mods = {n.module if isinstance(n, ast.ImportFrom) else a.name
            for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
            for a in n.names}
    assert {m for m in mods if m.startswith("tinytensor")} <= {"tinytensor", "tinytensor.nn"}
    src = open(gm.__file__).read()
    assert "fused" not in {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert "masked_fill(self.tril[:T, :T] == 0, float('-inf'))" in src    # the lecture's line
