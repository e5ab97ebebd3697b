"""The whole GPT against the lecture's PyTorch model (llm.c style), and gpt.interop.

Same weights through interop, dropout 0: logits, loss and every parameter gradient, with the
largest error printed per tensor (run with -s to see the tables; a failure shows them too),
then ten AdamW steps compared loss by loss. Errors are max|ours - torch| / max|torch| per
tensor: at most 1e-9 in float64 and 1e-4 in float32.
"""
import numpy as np
import pytest
import torch

import tinytensor as tt
from gpt import GPTConfig, GPTLanguageModel, build_model, lecture_state_dict, load_lecture_state_dict
from gpt.interop import to_lecture_names
from tinytensor import backend
from torch_gpt_reference import GPTLanguageModel as TorchGPT
from torch_helper import record, rel_err

# every test here runs with the accelerators off and on (conftest)
pytestmark = pytest.mark.usefixtures("accelerators")

CFG = dict(vocab_size=13, block_size=8, n_embd=16, n_head=4, n_layer=2)
TOL = {np.float64: 1e-9, np.float32: 1e-4}
TORCH_DTYPE = {np.float64: torch.float64, np.float32: torch.float32}
dtypes = pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])


def make_pair(dtype, device="cpu", seed=0):
    """The torch reference with perturbed weights (LayerNorms away from 1 and 0, larger
    activations than the small init gives) and our GPT loaded from it through interop."""
    torch.manual_seed(seed)
    ref = TorchGPT(**CFG, dropout=0.0).to(TORCH_DTYPE[dtype])
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.2 * torch.randn_like(p))
    tt.set_default_dtype(dtype)
    ours = GPTLanguageModel(GPTConfig(**CFG, dropout=0.0))
    load_lecture_state_dict(ours, ref.state_dict())
    return ours.to(device), ref


def batch(seed, B=4, T=8):
    rng = np.random.default_rng(seed)
    return rng.integers(0, CFG["vocab_size"], (B, T)), rng.integers(0, CFG["vocab_size"], (B, T))


class ErrorTable:
    """Collects (name, shape, max abs error, relative error) rows and prints them."""

    def __init__(self, title, dtype):
        self.title, self.dtype, self.rows = title, np.dtype(dtype).name, []

    def add(self, name, ours, ref):
        ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
        assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != torch's {ref.shape}"
        err = rel_err(ours, ref)
        self.rows.append((name, ours.shape, float(np.max(np.abs(ours - ref))), err))
        return err

    def worst(self):
        return max(r[3] for r in self.rows)

    def __str__(self):
        lines = [f"{self.title} ({self.dtype}): largest error per tensor",
                 f"  {'tensor':<40}{'shape':>14}{'max abs':>12}{'rel':>12}"]
        for name, shape, a, r in self.rows:
            lines.append(f"  {name:<40}{str(shape):>14}{a:>12.2e}{r:>12.2e}")
        return "\n".join(lines)

    def check(self, family, tol):
        print(self)
        worst = record(family, self.dtype, self.worst())
        assert worst <= tol, f"worst relative error {worst:.3e} > {tol:.0e}\n{self}"


# ---------------------------------------------------------------- forward and backward
@dtypes
@pytest.mark.parametrize("T", [8, 5])
def test_logits_loss_and_every_gradient_match_torch(dtype, T, device):
    ours, ref = make_pair(dtype, device)
    x, y = batch(1, T=T)
    logits, loss = ours(x, y)
    loss.backward()
    ref_logits, ref_loss = ref(torch.from_numpy(x), torch.from_numpy(y))
    ref_loss.backward()

    table = ErrorTable(f"GPT forward/backward, T={T}", dtype)
    table.add("logits", logits.numpy(), ref_logits.detach().numpy())
    table.add("loss", loss.item(), ref_loss.item())
    grads = to_lecture_names({n: backend.to_numpy(p.grad) for n, p in ours.named_parameters()},
                             CFG["n_head"])
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    assert sorted(grads) == sorted(ref_grads)
    for name, g in ref_grads.items():
        table.add(f"grad {name}", grads[name], g.numpy())
    assert abs(ref_loss.item() - np.log(CFG["vocab_size"])) > 0.05  # not a trivial model
    table.check("gpt model vs torch", TOL[dtype])


@dtypes
def test_ten_adamw_steps_match_torch_loss_by_loss(dtype):
    ours, ref = make_pair(dtype, seed=1)
    # weight decay on 2-D tensors only (matrices and embeddings), as nanoGPT does, on both sides
    groups = [[p for p in ours.parameters() if p.ndim >= 2], [p for p in ours.parameters() if p.ndim < 2]]
    ref_groups = [[p for p in ref.parameters() if p.ndim >= 2], [p for p in ref.parameters() if p.ndim < 2]]
    opt = tt.optim.AdamW([{"params": groups[0], "weight_decay": 0.1},
                          {"params": groups[1], "weight_decay": 0.0}], lr=3e-3)
    ref_opt = torch.optim.AdamW([{"params": ref_groups[0], "weight_decay": 0.1},
                                 {"params": ref_groups[1], "weight_decay": 0.0}], lr=3e-3)
    table = ErrorTable("10 AdamW steps", dtype)
    losses = []
    for step in range(10):
        x, y = batch(100 + step)
        _, loss = ours(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        _, ref_loss = ref(torch.from_numpy(x), torch.from_numpy(y))
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_opt.step()
        table.add(f"loss at step {step}", loss.item(), ref_loss.item())
        losses.append(ref_loss.item())
    if dtype == np.float64:  # in float32, Adam's normalisation magnifies rounding in tiny gradients
        weights = lecture_state_dict(ours)
        for name, p in ref.state_dict().items():
            if not name.endswith("tril"):
                table.add(f"after: {name}", weights[name], p.numpy())
    assert losses[-1] < losses[0] - 0.1  # the steps did something
    table.check("gpt adamw vs torch", TOL[dtype])


# ---------------------------------------------------------------- interop
def test_lecture_state_dict_has_exactly_the_lecture_names_and_shapes():
    tt.manual_seed(0)
    ours = GPTLanguageModel(GPTConfig(**CFG))
    sd = lecture_state_dict(ours)
    ref_sd = TorchGPT(**CFG).state_dict()
    assert list(sd) == list(ref_sd)  # the same names in the same order
    for name, v in ref_sd.items():
        assert sd[name].shape == tuple(v.shape) and isinstance(sd[name], np.ndarray), name
    assert sd["blocks.1.sa.heads.3.key.weight"].shape == (4, 16)
    np.testing.assert_array_equal(sd["blocks.0.sa.heads.2.tril"], np.tril(np.ones((8, 8))))
    # head h's query/key/value are rows h*hs:(h+1)*hs of each third of the fused weight
    qkv = ours.blocks[1].sa.qkv.weight.data
    np.testing.assert_array_equal(sd["blocks.1.sa.heads.2.query.weight"], qkv[8:12])
    np.testing.assert_array_equal(sd["blocks.1.sa.heads.2.key.weight"], qkv[16 + 8:16 + 12])
    np.testing.assert_array_equal(sd["blocks.1.sa.heads.2.value.weight"], qkv[32 + 8:32 + 12])


def test_trained_model_goes_to_torch_strictly_and_back_exactly():
    tt.manual_seed(0)
    cfg = GPTConfig(**CFG, dropout=0.1)
    ours = GPTLanguageModel(cfg)
    opt = tt.optim.AdamW(ours.parameters(), lr=1e-2)
    for step in range(5):
        _, loss = ours(*batch(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    ours.eval()
    sd = lecture_state_dict(ours)
    ref = TorchGPT(**CFG, dropout=0.1)
    result = ref.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    ref.eval()
    x, _ = batch(9)
    err = rel_err(ours(x)[0].numpy(), ref(torch.from_numpy(x))[0].detach().numpy())
    assert err <= 1e-5, err
    # and back, into a model initialised differently: every parameter identical
    tt.manual_seed(123)
    back = GPTLanguageModel(cfg)
    load_lecture_state_dict(back, ref.state_dict())
    for (name, p), (_, q) in zip(ours.named_parameters(), back.named_parameters()):
        np.testing.assert_array_equal(p.data, q.data, err_msg=name)
    again = lecture_state_dict(back)
    assert list(again) == list(sd) and all(np.array_equal(again[k], sd[k]) for k in sd)


def test_load_lecture_state_dict_errors_change_nothing():
    tt.manual_seed(0)
    ours = GPTLanguageModel(GPTConfig(**CFG))
    before = {k: v.copy() for k, v in ours.state_dict().items()}
    good = {k: v + 1 for k, v in lecture_state_dict(ours).items()}

    missing = {k: v for k, v in good.items() if k != "blocks.0.sa.heads.1.value.weight"}
    with pytest.raises(ValueError, match=r"missing keys \['blocks.0.sa.heads.1.value.weight'\]"):
        load_lecture_state_dict(ours, missing)
    with pytest.raises(ValueError, match=r"unexpected keys \['extra.weight'\]"):
        load_lecture_state_dict(ours, {**good, "extra.weight": np.zeros(3)})
    bad_shape = {**good, "lm_head.weight": np.zeros((13, 17))}
    with pytest.raises(ValueError, match=r"shape mismatch for lm_head.weight: the state dict has \(13, 17\)"):
        load_lecture_state_dict(ours, bad_shape)
    two_heads = GPTLanguageModel(GPTConfig(**{**CFG, "n_head": 2}))
    first_extra_head = r"\['blocks.0.sa.heads.2.key.weight', .* and 6 more$"
    with pytest.raises(ValueError, match=r"missing keys " + first_extra_head):
        load_lecture_state_dict(ours, lecture_state_dict(two_heads))
    with pytest.raises(ValueError, match=r"unexpected keys " + first_extra_head):
        load_lecture_state_dict(two_heads, good)
    for k, v in ours.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    no_tril = {k: v for k, v in good.items() if not k.endswith("tril")}
    load_lecture_state_dict(ours, no_tril)  # the tril buffers are optional
    np.testing.assert_array_equal(ours.lm_head.bias.data, before["lm_head.bias"] + 1)
    with pytest.raises(TypeError, match="not a SingleHeadModel"):
        lecture_state_dict(build_model("single_head", GPTConfig(**CFG)))
