"""The lessons of "Let's build GPT" as tests, run on tinytensor.

1. The mathematical trick in self-attention: averaging the past with a for loop, with a
   lower-triangular matrix product and with a masked softmax gives the same result.
2. Scaled attention: for unit-variance q and k, q @ k.T has variance head_size; multiplying by
   head_size**-0.5 brings it back near 1, so softmax stays diffuse instead of one-hot.
3. A fresh model predicts nearly uniformly: its loss starts near -ln(1/vocab_size).
"""
import math

import numpy as np

import tinytensor as tt
from gpt import GPTConfig, GPTLanguageModel
from tinytensor.nn import functional as F


def test_three_ways_to_average_the_past_agree():
    tt.set_default_dtype(np.float64)
    rng = np.random.default_rng(1337)
    B, T, C = 4, 8, 2
    x = rng.standard_normal((B, T, C))

    # version 1: for loops, xbow[b, t] = mean of x[b, 0..t]
    xbow = np.zeros((B, T, C))
    for b in range(B):
        for t in range(T):
            xbow[b, t] = x[b, :t + 1].mean(axis=0)

    # version 2: a lower-triangular matrix of row-normalised ones, one batched matmul
    tril = np.tril(np.ones((T, T)))
    wei = tt.tensor(tril / tril.sum(axis=1, keepdims=True))
    xbow2 = (wei @ tt.tensor(x)).numpy()                              # (T, T) @ (B, T, C) -> (B, T, C)

    # version 3: softmax of zeros with the future masked to -inf (what attention generalises)
    wei3 = F.softmax(tt.zeros(T, T).masked_fill(tril == 0, float("-inf")), dim=-1)
    xbow3 = (wei3 @ tt.tensor(x)).numpy()

    # and the fused attention the model uses: queries and keys of zeros give every visible key
    # the same weight, so the values (x, one head) are averaged over the past
    zeros = tt.zeros(B, 1, T, C, dtype=tt.float64)
    xbow4 = F.scaled_dot_product_attention(zeros, zeros, tt.tensor(x)[:, None], is_causal=True)
    xbow4 = xbow4[:, 0].numpy()                                       # (B, T, C)

    np.testing.assert_allclose(xbow2, xbow, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(xbow3, xbow, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(xbow4, xbow, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(wei3.numpy(), wei.numpy(), rtol=1e-15)
    np.testing.assert_array_equal(xbow[:, 0], x[:, 0])                # the first token sees only itself


def test_scaling_keeps_attention_scores_at_unit_variance():
    rng = np.random.default_rng(0)
    B, T, head_size = 32, 64, 64
    q = tt.tensor(rng.standard_normal((B, T, head_size)))
    k = tt.tensor(rng.standard_normal((B, T, head_size)))
    raw = (q @ k.transpose(-2, -1)).numpy()                           # (B, T, T)
    scaled = (q @ k.transpose(-2, -1) * head_size ** -0.5).numpy()
    assert 0.95 < q.numpy().var() < 1.05 and 0.95 < k.numpy().var() < 1.05
    assert 0.9 * head_size < raw.var() < 1.1 * head_size, raw.var()   # near head_size = 64
    assert 0.9 < scaled.var() < 1.1, scaled.var()                     # near 1

    # why it matters: large scores make softmax peaky, close to one-hot, at initialisation
    tril = tt.tril(tt.ones(T, T))

    def weights(scores):  # the lecture's masked softmax
        return F.softmax(tt.tensor(scores).masked_fill(tril == 0, float("-inf")), dim=-1)
    peak_raw = weights(raw).numpy()[:, -1].max(axis=-1).mean()
    peak_scaled = weights(scaled).numpy()[:, -1].max(axis=-1).mean()
    assert peak_raw > 0.5 and peak_scaled < 0.25, (peak_raw, peak_scaled)
    sharp = F.softmax(tt.tensor([0.1, -0.2, 0.3, -0.2, 0.5]) * 8, dim=-1).numpy()
    assert sharp.max() > 0.7 and np.argmax(sharp) == 4


def test_a_fresh_model_starts_at_minus_log_one_over_vocab():
    tt.manual_seed(0)
    cfg = GPTConfig(vocab_size=65, block_size=32, n_embd=64, n_head=4, n_layer=2, dropout=0.0)
    model = GPTLanguageModel(cfg)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 65, (8, 32)), rng.integers(0, 65, (8, 32))
    _, loss = model(x, y)
    assert abs(loss.item() - math.log(65)) < 0.02, loss.item()       # -ln(1/65) = 4.174
