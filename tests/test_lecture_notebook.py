"""The cells of the "Let's build GPT" notebook, typed as a reader types them, run side by side in
tinytensor and in torch.

Each cell is written once, as a function of the library `m` (tinytensor or torch), its `nn` and
its `F`: the text inside is the lecture's torch code, so tinytensor must accept it as it is and
give torch's values, dtypes and gradients. Random draws differ between the libraries, so the
inputs come from NumPy and the weights of torch's layers are copied into ours.
"""
import numpy as np
import pytest
import torch
import torch.nn as tnn
import torch.nn.functional as TF

import tinytensor as tt
import tinytensor.nn as ttnn
import tinytensor.nn.functional as F
from torch_helper import copy_module, rel_err

LIBS = {"tinytensor": (tt, ttnn, F), "torch": (torch, tnn, TF)}
RNG = np.random.default_rng(1337)
X_SMALL = RNG.standard_normal((4, 8, 2))           # B, T, C = 4, 8, 2
X_HEAD = RNG.standard_normal((4, 8, 32))           # B, T, C = 4, 8, 32


def both(cell, *arrays, dtype=np.float32):
    """cell(m, nn, F, *tensors) in each library; the tensors made by m.tensor from arrays."""
    out = {}
    for name, (m, nn, f) in LIBS.items():
        tensors = [m.tensor(a.astype(dtype) if a.dtype.kind == "f" else a) for a in arrays]
        out[name] = cell(m, nn, f, *tensors)
    return out["tinytensor"], out["torch"]


def assert_same(ours, ref, rtol):
    ref = ref.detach() if isinstance(ref, torch.Tensor) else ref
    assert str(ours.dtype) == str(ref.dtype).replace("torch.", ""), (ours.dtype, ref.dtype)
    assert ours.shape == tuple(ref.shape)
    close(ours.numpy(), ref.numpy(), rtol)


def close(ours, ref, rtol):
    """The suite's measure (torch_helper.rel_err): max |ours - ref| / max |ref| <= rtol."""
    err = rel_err(ours, ref)
    assert err <= rtol, f"relative error {err:.2e} > {rtol:.0e}"


# ---------------------------------------------------------------- the mathematical trick
def version1(m, nn, F, x):
    B, T, C = x.shape
    xbow = m.zeros((B, T, C))
    for b in range(B):
        for t in range(T):
            xprev = x[b, :t + 1]  # (t,C)
            xbow[b, t] = m.mean(xprev, 0)
    return xbow


def version2(m, nn, F, x):
    B, T, C = x.shape
    wei = m.tril(m.ones(T, T))
    wei = wei / wei.sum(1, keepdim=True)
    xbow2 = wei @ x  # (B, T, T) @ (B, T, C) ----> (B, T, C)
    return xbow2


def version2_torch_sum(m, nn, F, x):
    T = x.shape[1]
    a = m.tril(m.ones(3, 3))
    a = a / m.sum(a, 1, keepdim=True)
    b = m.tensor(np.arange(6, dtype=np.float32).reshape(3, 2))
    return m.cat([(a @ b).flatten(), (m.tril(m.ones(T, T)) @ x[0]).flatten()])


def version3(m, nn, F, x):
    B, T, C = x.shape
    tril = m.tril(m.ones(T, T))
    wei = m.zeros((T, T))
    wei = wei.masked_fill(tril == 0, float('-inf'))
    wei = F.softmax(wei, dim=-1)
    xbow3 = wei @ x
    return xbow3


@pytest.mark.parametrize("cell", [version1, version2, version2_torch_sum, version3])
def test_averaging_the_past(cell):
    ours, ref = both(cell, X_SMALL)
    assert_same(ours, ref, rtol=1e-6)


def test_the_three_versions_agree_in_tinytensor():
    x = tt.tensor(X_SMALL.astype(np.float32))
    xbow = version1(tt, ttnn, F, x)
    assert tt.allclose(xbow, version2(tt, ttnn, F, x), atol=1e-6)
    assert tt.allclose(xbow, version3(tt, ttnn, F, x), atol=1e-6)


# ---------------------------------------------------------------- self-attention, one head
def self_attention_head(m, nn, F, x, layers=None, scaled=False):
    B, T, C = x.shape
    head_size = 16
    key, query, value = layers
    k = key(x)   # (B, T, 16)
    q = query(x)  # (B, T, 16)
    wei = q @ k.transpose(-2, -1)  # (B, T, 16) @ (B, 16, T) ---> (B, T, T)
    if scaled:
        wei = q @ k.transpose(-2, -1) * head_size**-0.5
    tril = m.tril(m.ones(T, T))
    wei = wei.masked_fill(tril == 0, float('-inf'))
    wei = F.softmax(wei, dim=-1)
    v = value(x)
    out = wei @ v
    return out, wei


def _head_layers(dtype):
    torch.manual_seed(1337)
    theirs = [tnn.Linear(32, 16, bias=False).to(getattr(torch, np.dtype(dtype).name)) for _ in range(3)]
    ours = [ttnn.Linear(32, 16, bias=False) for _ in range(3)]
    for o, t in zip(ours, theirs):
        o.astype(dtype)
        copy_module(o, t)
    return ours, theirs


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 1e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("scaled", [False, True])
def test_self_attention_head_forward_and_backward(dtype, rtol, scaled):
    ours_layers, torch_layers = _head_layers(dtype)
    x_ours = tt.tensor(X_HEAD.astype(dtype), requires_grad=True)
    x_ref = torch.tensor(X_HEAD.astype(dtype), requires_grad=True)
    out, wei = self_attention_head(tt, ttnn, F, x_ours, ours_layers, scaled)
    out_ref, wei_ref = self_attention_head(torch, tnn, TF, x_ref, torch_layers, scaled)
    assert_same(out, out_ref, rtol)
    assert_same(wei, wei_ref, rtol)
    np.testing.assert_array_equal(wei.numpy()[0] == 0, np.triu(np.ones((8, 8)), 1) == 1)  # the future
    w = np.random.default_rng(0).standard_normal(out.shape).astype(dtype)
    (out * tt.tensor(w)).sum().backward()
    (out_ref * torch.tensor(w)).sum().backward()
    close(x_ours.grad, x_ref.grad.numpy(), rtol)
    for o, t in zip(ours_layers, torch_layers):
        close(o.weight.grad, t.weight.grad.numpy(), rtol)


def test_scaled_attention_variance_cells():
    """k.var(), q.var(), wei.var() of unit Gaussian k and q, unscaled and scaled."""
    k_np, q_np = RNG.standard_normal((4, 8, 16)), RNG.standard_normal((4, 8, 16))

    def cell(m, nn, F, k, q):
        head_size = 16
        wei = q @ k.transpose(-2, -1) * head_size**-0.5
        return m.stack([k.var(), q.var(), wei.var(), (q @ k.transpose(-2, -1)).var()])
    ours, ref = both(cell, k_np, q_np)
    assert_same(ours, ref, rtol=1e-5)


def test_softmax_temperature_cells():
    def cell(m, nn, F):
        return m.stack([m.softmax(m.tensor([0.1, -0.2, 0.3, -0.2, 0.5]), dim=-1),
                        m.softmax(m.tensor([0.1, -0.2, 0.3, -0.2, 0.5]) * 8, dim=-1)])  # gets too peaky
    ours, ref = both(cell)
    assert_same(ours, ref, rtol=1e-6)
    assert ours.numpy()[1].max() > 0.7


# ---------------------------------------------------------------- data and the bigram model
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 4


def data_cells(m):
    chars = sorted(list(set(TEXT)))
    vocab_size = len(chars)
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}
    encode = lambda s: [stoi[c] for c in s]  # noqa: E731 - as the lecture writes it
    decode = lambda l: ''.join([itos[i] for i in l])  # noqa: E731,E741
    data = m.tensor(encode(TEXT), dtype=m.long)
    n = int(0.9 * len(data))
    train_data, val_data = data[:n], data[n:]
    assert decode(encode("hear me")) == "hear me"
    return vocab_size, data, train_data, val_data, decode


def test_data_cells():
    ours, ref = data_cells(tt), data_cells(torch)
    assert ours[0] == ref[0]
    for a, b in zip(ours[1:4], ref[1:4]):
        assert_same(a, b, rtol=0)
    block_size, ix = 8, [0, 5, 17]
    for (m, _, _), (_, data, train_data, _, decode) in zip(LIBS.values(), (ours, ref)):
        x = m.stack([data[i:i + block_size] for i in ix])
        y = m.stack([data[i + 1:i + block_size + 1] for i in ix])
        assert x.shape == (3, 8) and str(x.dtype).endswith("int64")
        assert decode(x[0].tolist()) == TEXT[:8]
        assert (y[:, :-1] == x[:, 1:]).all()
        context = x[0, :3]
        assert str(m.randint(len(data) - block_size, (4,)).dtype).endswith("int64")
        assert context.tolist() == data[:3].tolist()


def make_bigram(m, nn, F):
    class BigramLanguageModel(nn.Module):

        def __init__(self, vocab_size):
            super().__init__()
            # each token directly reads off the logits for the next token from a lookup table
            self.token_embedding_table = nn.Embedding(vocab_size, vocab_size)

        def forward(self, idx, targets=None):
            # idx and targets are both (B,T) tensor of integers
            logits = self.token_embedding_table(idx)  # (B,T,C)
            if targets is None:
                loss = None
            else:
                B, T, C = logits.shape
                logits = logits.view(B * T, C)
                targets = targets.view(B * T)
                loss = F.cross_entropy(logits, targets)
            return logits, loss

        def generate(self, idx, max_new_tokens):
            # idx is (B, T) array of indices in the current context
            for _ in range(max_new_tokens):
                logits, loss = self(idx)
                logits = logits[:, -1, :]  # becomes (B, C)
                probs = F.softmax(logits, dim=-1)  # (B, C)
                idx_next = m.multinomial(probs, num_samples=1)  # (B, 1)
                idx = m.cat((idx, idx_next), dim=1)  # (B, T+1)
            return idx
    return BigramLanguageModel


def test_bigram_model_loss_gradients_and_training_steps():
    vocab_size = 65
    torch.manual_seed(1337)
    ref = make_bigram(torch, tnn, TF)(vocab_size)
    ours = make_bigram(tt, ttnn, F)(vocab_size)
    copy_module(ours, ref)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    opt = tt.optim.AdamW(ours.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    for step in range(3):
        xb, yb = rng.integers(0, vocab_size, (4, 8)), rng.integers(0, vocab_size, (4, 8))
        logits, loss = ours(tt.tensor(xb), tt.tensor(yb))
        logits_ref, loss_ref = ref(torch.tensor(xb), torch.tensor(yb))
        assert logits.shape == (32, 65)
        np.testing.assert_allclose(loss.item(), loss_ref.item(), rtol=1e-6)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt_ref.zero_grad(set_to_none=True)
        loss_ref.backward()
        w, w_ref = ours.token_embedding_table.weight, ref.token_embedding_table.weight
        np.testing.assert_allclose(w.grad, w_ref.grad.numpy(), rtol=1e-5, atol=1e-8)
        opt.step()
        opt_ref.step()
        np.testing.assert_allclose(w.numpy(), w_ref.detach().numpy(), rtol=1e-5, atol=1e-7)
    tt.manual_seed(0)
    idx = tt.zeros((1, 1), dtype=tt.long)
    out = ours.generate(idx, max_new_tokens=20)
    assert out.shape == (1, 21) and out.dtype == np.int64 and int(out.amax()) < vocab_size


def test_logits_without_view_follow_torch_class_dim():
    """Passing the (B, T, C) logits without the lecture's view: torch reads dim 1 as the classes
    (so it wants targets (B, C)); tinytensor does the same, or both refuse."""
    logits = RNG.standard_normal((4, 8, 5)).astype(np.float32)
    targets = RNG.integers(0, 8, (4, 5))
    ours = F.cross_entropy(tt.tensor(logits), tt.tensor(targets))
    ref = TF.cross_entropy(torch.tensor(logits), torch.tensor(targets))
    np.testing.assert_allclose(ours.item(), ref.item(), rtol=1e-6)
    with pytest.raises(Exception) as theirs:
        TF.cross_entropy(torch.tensor(logits), torch.tensor(RNG.integers(0, 5, (4, 8))))
    with pytest.raises(theirs.type):
        F.cross_entropy(tt.tensor(logits), tt.tensor(RNG.integers(0, 5, (4, 8))))


def test_estimate_loss_cell():
    def cell(m, nn, F, model):
        @m.no_grad()
        def estimate_loss():
            out = {}
            model.eval()
            for split in ['train', 'val']:
                losses = m.zeros(3)
                for k in range(3):
                    X = m.tensor(np.full((2, 4), k + (split == 'val')))
                    Y = m.tensor(np.full((2, 4), 2 * k))
                    logits, loss = model(X, Y)
                    losses[k] = loss.item()
                out[split] = losses.mean()
            model.train()
            return out
        return estimate_loss()
    torch.manual_seed(0)
    ref_model = make_bigram(torch, tnn, TF)(65)
    our_model = make_bigram(tt, ttnn, F)(65)
    copy_module(our_model, ref_model)
    ours, ref = cell(tt, ttnn, F, our_model), cell(torch, tnn, TF, ref_model)
    for split in ("train", "val"):
        assert_same(ours[split], ref[split], rtol=1e-6)
        assert not ours[split].requires_grad
    assert our_model.training
