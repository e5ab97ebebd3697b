"""tinytensor.nn: every layer against its torch.nn twin with copied weights, and the Module API
(registration, names, state dicts, modes, initialisation, seeding)."""
import math

import numpy as np
import pytest
import torch

import tinytensor as tt
import tinytensor.nn as nn
from tinytensor import backend
from torch_helper import check_module, dtypes, randn

# every test here runs with the accelerators off and on (conftest)
pytestmark = pytest.mark.usefixtures("accelerators")


# ---------------------------------------------------------------- layers against torch.nn
LAYERS = {  # name: (op family, our layer, torch's layer, input)
    "linear": ("nn.Linear", lambda: nn.Linear(4, 3), lambda: torch.nn.Linear(4, 3), randn(2, 5, 4)),
    "linear_nobias": ("nn.Linear", lambda: nn.Linear(4, 3, bias=False),
                      lambda: torch.nn.Linear(4, 3, bias=False), randn(6, 4)),
    "embedding": ("nn.Embedding", lambda: nn.Embedding(7, 4), lambda: torch.nn.Embedding(7, 4),
                  np.array([[1, 6, 1], [0, 2, 6]])),
    "layer_norm": ("nn.LayerNorm", lambda: nn.LayerNorm(8), lambda: torch.nn.LayerNorm(8), randn(2, 3, 8)),
    "layer_norm_2d": ("nn.LayerNorm", lambda: nn.LayerNorm((3, 4), eps=1e-3),
                      lambda: torch.nn.LayerNorm((3, 4), eps=1e-3), randn(2, 3, 4)),
    "layer_norm_nobias": ("nn.LayerNorm", lambda: nn.LayerNorm(5, bias=False),
                          lambda: torch.nn.LayerNorm(5, bias=False), randn(3, 5)),
    "layer_norm_plain": ("nn.LayerNorm", lambda: nn.LayerNorm(5, elementwise_affine=False),
                         lambda: torch.nn.LayerNorm(5, elementwise_affine=False), randn(3, 5)),
    "dropout_eval": ("nn.Dropout", lambda: nn.Dropout(0.5).eval(), lambda: torch.nn.Dropout(0.5).eval(),
                     randn(3, 4)),
    "dropout_p0": ("nn.Dropout", lambda: nn.Dropout(0.0), lambda: torch.nn.Dropout(0.0), randn(3, 4)),
    "relu": ("nn.ReLU", lambda: nn.ReLU(), lambda: torch.nn.ReLU(), randn(3, 4, low=0.1)),
    "gelu": ("nn.GELU", lambda: nn.GELU(), lambda: torch.nn.GELU(), 2 * randn(3, 4)),
    "gelu_tanh": ("nn.GELU", lambda: nn.GELU("tanh"), lambda: torch.nn.GELU("tanh"), 2 * randn(3, 4)),
    "tanh": ("nn.Tanh", lambda: nn.Tanh(), lambda: torch.nn.Tanh(), randn(3, 4)),
    "sequential": ("nn.Sequential",
                   lambda: nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.LayerNorm(8), nn.Dropout(0.2),
                                         nn.Linear(8, 3), nn.ReLU()).eval(),
                   lambda: torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.LayerNorm(8),
                                               torch.nn.Dropout(0.2), torch.nn.Linear(8, 3),
                                               torch.nn.ReLU()).eval(), randn(4, 6)),
}


@dtypes
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_against_torch(name, device, dtype):
    family, ours, theirs, x = LAYERS[name]
    check_module(family, ours(), theirs(), x, dtype=dtype, device=device)


# ---------------------------------------------------------------- a nested model, like a GPT
class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(2 * d, d)
        self.act = nn.GELU()

    def forward(self, x):
        return x + self.proj(self.act(self.fc(self.ln(x))))


class Model(nn.Module):
    def __init__(self, v=10, d=8, n=2):
        super().__init__()
        self.scale = nn.Parameter(np.ones(d, dtype=tt.get_default_dtype()))
        self.wte = nn.Embedding(v, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(n)])
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, v, bias=False))

    def forward(self, idx):
        x = self.wte(idx) * self.scale
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class TBlock(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln = torch.nn.LayerNorm(d)
        self.fc = torch.nn.Linear(d, 2 * d)
        self.proj = torch.nn.Linear(2 * d, d)
        self.act = torch.nn.GELU()

    def forward(self, x):
        return x + self.proj(self.act(self.fc(self.ln(x))))


class TModel(torch.nn.Module):
    def __init__(self, v=10, d=8, n=2):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(d))
        self.wte = torch.nn.Embedding(v, d)
        self.blocks = torch.nn.ModuleList([TBlock(d) for _ in range(n)])
        self.head = torch.nn.Sequential(torch.nn.LayerNorm(d), torch.nn.Linear(d, v, bias=False))

    def forward(self, idx):
        x = self.wte(idx) * self.scale
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def test_named_parameters_match_torch():
    ours, theirs = Model(), TModel()
    names = [(n, p.shape) for n, p in ours.named_parameters()]
    assert names == [(n, tuple(p.shape)) for n, p in theirs.named_parameters()]
    assert names[0][0] == "scale" and ("blocks.1.fc.weight", (16, 8)) in names
    assert "head.1.weight" in dict(names) and "head.1.bias" not in dict(names)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert ours.num_parameters() == sum(p.numel() for p in theirs.parameters())
    assert len(list(ours.parameters())) == len(names)
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]


@dtypes
def test_nested_model_against_torch(device, dtype):
    check_module("nn.Module (GPT-like)", Model(), TModel(), np.array([[1, 2, 9, 2], [0, 0, 5, 3]]),
                 dtype=dtype, device=device)


def test_shared_modules_and_tied_weights_match_torch():
    shared, tshared = nn.Linear(3, 3), torch.nn.Linear(3, 3)
    ours = nn.Sequential(shared, nn.ReLU(), shared)
    theirs = torch.nn.Sequential(tshared, torch.nn.ReLU(), tshared)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert list(ours.state_dict()) == list(theirs.state_dict())        # every name, as torch
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]

    emb, head = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)
    head.weight = emb.weight                                            # weight tying (nanoGPT)
    tied = nn.Sequential(emb, head)
    temb, thead = torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5, bias=False)
    thead.weight = temb.weight
    ttied = torch.nn.Sequential(temb, thead)
    assert [n for n, _ in tied.named_parameters()] == [n for n, _ in ttied.named_parameters()] == ["0.weight"]
    assert list(tied.state_dict()) == list(ttied.state_dict()) == ["0.weight", "1.weight"]
    tied.load_state_dict({k: v.numpy() for k, v in ttied.state_dict().items()})   # loads 1:1
    np.testing.assert_array_equal(tied[1].weight.numpy(), temb.weight.detach().numpy())
    assert tied[0].weight is tied[1].weight
    assert len(list(tt.optim.AdamW(tied.parameters()).param_groups[0]["params"])) == 1


# ---------------------------------------------------------------- registration
def test_registration_by_attribute():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 2)
            self.w = nn.Parameter(np.zeros(3))
            self.plain = tt.Tensor(np.zeros(3))       # a plain Tensor is not a parameter
            self.n = 5

    m = M()
    assert [n for n, _ in m.named_parameters()] == ["w", "a.weight", "a.bias"]
    m.a = nn.Linear(2, 4, bias=False)                 # reassignment replaces the registration
    assert [n for n, _ in m.named_parameters()] == ["w", "a.weight"]
    m.a = None                                        # and None removes it
    assert [n for n, _ in m.named_parameters()] == ["w"]
    del m.w
    assert list(m.named_parameters()) == []
    shared = nn.Linear(2, 2)
    s = nn.Sequential(shared, nn.ReLU(), shared)      # a shared layer counts once
    assert [n for n, _ in s.named_parameters()] == ["0.weight", "0.bias"]
    assert len(s) == 3 and s[1].__class__ is nn.ReLU and list(s)[2] is shared

    class Forgot(nn.Module):
        def __init__(self):
            self.a = nn.Linear(2, 2)

    with pytest.raises(RuntimeError, match=r"must call super\(\).__init__\(\)"):
        Forgot()
    ml = nn.ModuleList([nn.Linear(1, 1)])
    ml.append(nn.Linear(1, 2))
    assert len(ml) == 2 and [n for n, _ in ml.named_parameters()][-1] == "1.bias"


# ---------------------------------------------------------------- state dicts
def test_state_dict_is_a_copy():
    m = Model()
    sd = m.state_dict()
    assert all(isinstance(v, np.ndarray) for v in sd.values())
    before = m.wte.weight.numpy().copy()
    sd["wte.weight"][...] = 0.0
    np.testing.assert_array_equal(m.wte.weight.numpy(), before)       # editing the dict: no effect
    m.wte.weight.data += 1.0
    assert np.all(sd["wte.weight"] == 0.0)                            # and the other way round


def test_load_state_dict_round_trip_and_cast():
    a, b = Model(), Model()
    b.load_state_dict({k: v.astype(np.float64) for k, v in a.state_dict().items()})
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert q.dtype == np.float32, n                                  # cast into the existing dtype
        np.testing.assert_array_equal(p.numpy(), q.numpy())
    c = Model()
    c.load_state_dict({k: tt.Tensor(v) for k, v in a.state_dict().items()})   # Tensors work too
    np.testing.assert_array_equal(c.head[1].weight.numpy(), a.head[1].weight.numpy())


def test_load_state_dict_fails_clearly_and_changes_nothing():
    m = Model()
    before = {k: v.copy() for k, v in m.state_dict().items()}
    good = Model().state_dict()

    missing = dict(good)
    del missing["blocks.0.fc.bias"]
    with pytest.raises(KeyError, match=r"missing keys \['blocks.0.fc.bias'\]"):
        m.load_state_dict(missing)
    unexpected = dict(good, **{"blocks.2.fc.bias": np.zeros(16)})
    with pytest.raises(KeyError, match=r"unexpected keys \['blocks.2.fc.bias'\]"):
        m.load_state_dict(unexpected)
    wrong = dict(good)
    wrong["head.1.weight"] = np.zeros((10, 9))                 # the last key: earlier ones are fine
    with pytest.raises(ValueError, match=r"shape mismatch for head.1.weight.*\(10, 9\).*\(10, 8\)"):
        m.load_state_dict(wrong)
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=f"{k} changed by a failed load")
    miss, unexp = m.load_state_dict(missing, strict=False)
    assert miss == ["blocks.0.fc.bias"] and unexp == []
    np.testing.assert_array_equal(m.state_dict()["blocks.0.fc.weight"], good["blocks.0.fc.weight"])
    np.testing.assert_array_equal(m.state_dict()["blocks.0.fc.bias"], before["blocks.0.fc.bias"])


# ---------------------------------------------------------------- modes, grads, devices
def test_train_eval_propagate():
    m = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Dropout(0.9), nn.ReLU()))
    assert all(mod.training for mod in m.modules())
    assert m.eval() is m
    assert not any(mod.training for mod in m.modules())
    x = tt.Tensor(randn(50, 4).astype(np.float32))
    np.testing.assert_array_equal(m(x).numpy(), m(x).numpy())        # eval: dropout is off
    m.train()
    assert all(mod.training for mod in m.modules())
    assert not np.array_equal(m(x).numpy(), m(x).numpy())            # train: it drops
    m.train(False)
    assert not m[1][0].training


def test_zero_grad():
    m = Model()
    m(np.array([[1, 2]])).sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    m.zero_grad()
    assert all(p.grad is None for p in m.parameters())


def test_module_to_device(device):
    m = Model().to(device)
    assert all(p.device.type == device for p in m.parameters())
    out = m(np.array([[1, 2, 3]]))
    assert out.device.type == device
    out.sum().backward()
    assert all(backend.device_of(p.grad) == device for p in m.parameters())
    sd = m.state_dict()
    assert all(isinstance(v, np.ndarray) for v in sd.values())       # host copies from any device


# ---------------------------------------------------------------- initialisation, like PyTorch
def test_initialisation_statistics():
    tt.manual_seed(0)
    lin = nn.Linear(400, 300)
    bound = 1 / math.sqrt(400)
    w, b = lin.weight.numpy(), lin.bias.numpy()
    assert lin.weight.shape == (300, 400) and lin.bias.shape == (300,)
    assert w.dtype == np.float32
    assert np.abs(w).max() <= bound and np.abs(b).max() <= bound
    assert np.abs(w).max() > 0.99 * bound                              # fills the whole interval
    assert abs(w.mean()) < 0.01 * bound
    assert abs(w.var() / (bound ** 2 / 3) - 1) < 0.02                 # U(-a, a) has variance a^2/3
    emb = nn.Embedding(1000, 120).weight.numpy()
    assert abs(emb.mean()) < 0.01 and abs(emb.std() - 1) < 0.01        # N(0, 1)
    ln = nn.LayerNorm(16)
    np.testing.assert_array_equal(ln.weight.numpy(), np.ones(16))
    np.testing.assert_array_equal(ln.bias.numpy(), np.zeros(16))
    assert all(p.requires_grad for p in (lin.weight, lin.bias, ln.weight))
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="positive integer"):
            nn.Linear(bad, 3)
    with pytest.raises(ValueError, match="dropout probability"):
        nn.Dropout(1.5)


def test_manual_seed_reproducibility():
    def draw(seed):
        tt.manual_seed(seed)
        m = Model()
        drop = nn.functional.dropout(tt.Tensor(np.ones((8, 8))), 0.5).numpy()
        return m.state_dict(), drop, tt.randn(3).numpy()

    sd1, d1, r1 = draw(123)
    sd2, d2, r2 = draw(123)
    sd3, d3, r3 = draw(124)
    for k in sd1:
        np.testing.assert_array_equal(sd1[k], sd2[k])
    np.testing.assert_array_equal(d1, d2)
    np.testing.assert_array_equal(r1, r2)
    assert not np.array_equal(sd1["wte.weight"], sd3["wte.weight"])
    assert not np.array_equal(d1, d3)


# ---------------------------------------------------------------- buffers (the lecture's tril)
class _Head(nn.Module):
    def __init__(self, block_size):
        super().__init__()
        self.proj = nn.Linear(2, 2)
        self.register_buffer("tril", tt.tril(tt.ones(block_size, block_size)))
        self.register_buffer("scratch", tt.zeros(3), persistent=False)


def test_register_buffer_as_torch():
    m = _Head(4)
    ref = torch.nn.Module()
    ref.proj = torch.nn.Linear(2, 2)
    ref.register_buffer("tril", torch.tril(torch.ones(4, 4)))
    ref.register_buffer("scratch", torch.zeros(3), persistent=False)
    assert list(m.state_dict()) == list(ref.state_dict())          # persistent buffers only
    assert [n for n, _ in m.named_buffers()] == [n for n, _ in ref.named_buffers()]
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in ref.named_parameters()]
    sd = m.state_dict()
    sd["tril"] = np.triu(np.ones((4, 4)))
    m.load_state_dict(sd)
    np.testing.assert_array_equal(m.tril.numpy(), np.triu(np.ones((4, 4))))
    assert not m.tril.requires_grad and all(p is not m.tril for p in m.parameters())
    m.tril = tt.ones(2, 2)                                         # reassigning keeps it a buffer
    assert "tril" in m.state_dict()
    with pytest.raises(TypeError, match="expects a Tensor"):
        m.register_buffer("bad", np.ones(2))
    with pytest.raises(KeyError, match="already exists"):
        m.register_buffer("proj", tt.ones(1))


def test_zero_grad_set_to_none_false_zeroes_in_place():
    m = nn.Linear(2, 2)
    opt = tt.optim.AdamW(m.parameters())
    m(tt.ones(1, 2)).sum().backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in m.parameters())
    m.zero_grad()
    assert all(p.grad is None for p in m.parameters())
