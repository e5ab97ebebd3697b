"""Torch code run unmodified on tinytensor: the as_torch runner and aliases, a nanoGPT-style
model (tests/nanogpt_style.py) trained and sampled under both from the same weights, and the
torch API such code reaches (devices, tinytensor.cuda, __format__, size(), in-place ops)."""
import contextlib
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import tinytensor as tt
from tinytensor import as_torch, backend

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


# ---------------------------------------------------------------- the aliases and the runner
def test_aliases_name_tinytensor_modules_and_are_undone():
    real = sys.modules["torch"]
    with as_torch.aliases():
        import torch as aliased
        import torch.nn.functional as F
        from torch import nn, optim
        assert aliased is tt and nn is tt.nn and F is tt.nn.functional and optim is tt.optim
        assert aliased.cuda is tt.cuda and aliased.nn.init is tt.nn.init
    assert sys.modules["torch"] is real and sys.modules["torch.nn"] is real.nn


def _load_nanogpt(name, aliased):
    """tests/nanogpt_style.py as a fresh module, importing torch or (aliased) tinytensor."""
    spec = importlib.util.spec_from_file_location(name, HERE / "nanogpt_style.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    try:
        with as_torch.aliases() if aliased else contextlib.nullcontext():
            spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


SCRIPT = """
    import sys
    import torch
    import torch.nn as nn
    from torch.nn import functional as F

    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    print("args", sys.argv[1:], "device", device, torch.cuda.device_count())
    torch.manual_seed(1337)
    x = torch.arange(12, dtype=torch.float64).view(3, 4).to(device)
    loss = F.cross_entropy(x, torch.tensor([0, 3, 1]))
    print(f"loss {loss:.6f} size {x.size()} {x.size(-1)} dim {x.dim()} numel {x.numel()}")
    print(f"target {torch.tensor([5, 47])[1]} element_size {x.element_size()}")
    w = nn.Linear(4, 2)
    torch.nn.init.zeros_(w.weight)
    with torch.no_grad():
        w.bias.fill_(0.5)
        w.bias.add_(torch.ones(2), alpha=2)
    print("out", w(x.float()).sum().item())
    print("module", torch.__name__)
"""


def _run(argv, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_runner_runs_a_torch_script_as_torch_does(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(SCRIPT))
    theirs = _run([str(script), "a", "--b=1"], tmp_path)
    ours = _run(["-m", "tinytensor.as_torch", str(script), "a", "--b=1"], tmp_path)
    assert theirs.returncode == 0, theirs.stderr
    assert ours.returncode == 0, ours.stderr
    want, got = theirs.stdout.splitlines(), ours.stdout.splitlines()
    assert got[-1] == "module tinytensor" and want[-1] == "module torch"
    assert got[0] == want[0] and got[0].startswith("args ['a', '--b=1'] device cpu 0")
    # torch prints torch.Size([3, 4]) where tinytensor prints the shape tuple (3, 4)
    assert got[1] == want[1].replace("torch.Size([3, 4])", "(3, 4)")
    assert got[2:-1] == want[2:-1]


def test_runner_usage_and_missing_script(tmp_path):
    none = _run(["-m", "tinytensor.as_torch"], tmp_path)
    assert none.returncode == 2 and "usage: python -m tinytensor.as_torch" in none.stderr
    missing = _run(["-m", "tinytensor.as_torch", "nope.py"], tmp_path)
    assert missing.returncode == 2 and len(missing.stderr.splitlines()) == 1
    assert "no script 'nope.py'" in missing.stderr


def test_runner_reports_what_tinytensor_lacks_by_name(tmp_path):
    script = tmp_path / "lacks.py"
    script.write_text("import torch\ntorch.fft.rfft(torch.ones(4))\n")
    out = _run(["-m", "tinytensor.as_torch", str(script)], tmp_path)
    assert out.returncode == 1 and "has no attribute 'fft'" in out.stderr


# ---------------------------------------------------------------- a nanoGPT-style model
@contextlib.contextmanager
def _float64():
    before_tt, before_torch = tt.get_default_dtype(), torch.get_default_dtype()
    tt.set_default_dtype(tt.float64)
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        tt.set_default_dtype(before_tt)
        torch.set_default_dtype(before_torch)


def _twin_models(flash, dropout=0.0):
    """The same nanoGPT-style model in torch and in tinytensor, float64, with torch's initial
    weights copied into tinytensor's."""
    theirs_mod, ours_mod = _load_nanogpt("nanogpt_torch", False), _load_nanogpt("nanogpt_tt", True)
    with _float64():
        torch.manual_seed(0)
        theirs = theirs_mod.GPT(theirs_mod.GPTConfig(flash=flash, dropout=dropout))
        tt.manual_seed(0)
        ours = ours_mod.GPT(ours_mod.GPTConfig(flash=flash, dropout=dropout))
    ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
    return ours_mod, ours, theirs_mod, theirs


def _batches(n, B=4, T=16, V=32, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))) for _ in range(n)]


@pytest.mark.parametrize("flash", [False, True])
def test_nanogpt_style_model_trains_as_in_torch(flash):
    ours_mod, ours, theirs_mod, theirs = _twin_models(flash)
    # structure: names (the tied weight once, under its first name), counts, the state dict
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert ours.get_num_params() == theirs.get_num_params()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert ours.transformer.wte.weight is ours.lm_head.weight
    # the first step's gradients, the tied weight's being the sum of both uses
    x, y = _batches(1)[0]
    _, loss = ours(tt.tensor(x), tt.tensor(y))
    loss.backward()
    _, tloss = theirs(torch.from_numpy(x), torch.from_numpy(y))
    tloss.backward()
    assert abs(loss.item() - tloss.item()) <= 1e-12 * abs(tloss.item())
    for (name, p), (_, tp) in zip(ours.named_parameters(), theirs.named_parameters()):
        np.testing.assert_allclose(p.grad, tp.grad.numpy(), rtol=1e-9, atol=1e-13, err_msg=name)
    ours.zero_grad()
    theirs.zero_grad()
    # five steps of AdamW with weight-decay groups and gradient clipping
    batches = _batches(5, seed=1)
    got = ours_mod.train_steps(ours, [(tt.tensor(a), tt.tensor(b)) for a, b in batches])
    want = theirs_mod.train_steps(theirs, [(torch.from_numpy(a), torch.from_numpy(b))
                                           for a, b in batches])
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=0)
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-5  # what the issue asks, at least
    for (name, p), (_, tp) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        np.testing.assert_allclose(p, tp.numpy(), rtol=1e-8, atol=1e-12, err_msg=name)


def test_nanogpt_style_top_k_sampling_as_in_torch():
    ours_mod, ours, theirs_mod, theirs = _twin_models(flash=False)
    ours.eval()
    theirs.eval()
    idx = _batches(1, B=3, T=5)[0][0]
    for temperature, top_k in [(1.0, None), (0.8, 5), (1.3, 1), (1.0, 100)]:
        p = ours.next_token_probs(tt.tensor(idx), temperature, top_k)
        tp = theirs.next_token_probs(torch.from_numpy(idx), temperature, top_k)
        np.testing.assert_allclose(p.numpy(), tp.numpy(), rtol=1e-10, atol=1e-15)
        if top_k is not None and top_k < 32:
            assert ((p.numpy() > 0).sum(axis=1) == top_k).all()
    # top_k=1 leaves one token: generation is greedy and must match torch token for token,
    # also past block_size (the context is cropped)
    got = ours.generate(tt.tensor(idx), 20, top_k=1)
    want = theirs.generate(torch.from_numpy(idx), 20, top_k=1)
    np.testing.assert_array_equal(got.numpy(), want.numpy())
    sampled = ours.generate(tt.tensor(idx), 6, temperature=0.9, top_k=4)
    assert sampled.shape == (3, 11) and sampled.dtype == np.int64
    np.testing.assert_array_equal(sampled.numpy()[:, :5], idx)


def test_nanogpt_style_model_with_dropout_trains():
    ours_mod, ours, _, _ = _twin_models(flash=True, dropout=0.1)
    losses = ours_mod.train_steps(ours, [(tt.tensor(a), tt.tensor(b)) for a, b in _batches(3)])
    assert len(losses) == 3 and all(np.isfinite(losses))


# ---------------------------------------------------------------- devices and tinytensor.cuda
def test_cuda_module_answers_as_torch_does_without_a_gpu():
    assert tt.cuda.is_available() == backend.cuda_available()
    if not backend.cuda_available():
        assert tt.cuda.is_available() is torch.cuda.is_available() is False
        assert tt.cuda.device_count() == torch.cuda.device_count() == 0
        with pytest.raises(RuntimeError, match="no GPU is usable"):
            tt.cuda.synchronize()


@pytest.mark.parametrize("args", [("cpu",), ("cuda",), ("cuda:0",), ("cuda", 0), ("cpu", 0)])
def test_device_objects_as_torch(args):
    ours, theirs = tt.device(*args), torch.device(*args)
    assert (str(ours), repr(ours), ours.type, ours.index) == \
        (str(theirs), repr(theirs), theirs.type, theirs.index)
    assert ours == tt.device(str(ours)) and hash(ours) == hash(tt.device(str(ours)))
    assert (ours == str(ours)) is (theirs == str(theirs)) is False  # a device is not a string


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "cuda:-1", "", "cpu:0:1"])
def test_bad_device_strings_are_errors_as_in_torch(bad):
    with pytest.raises(RuntimeError):
        torch.device(bad)
    with pytest.raises(RuntimeError, match="device"):
        tt.device(bad)


def test_tensors_and_factories_take_devices():
    cpu = tt.device("cpu")
    x = tt.zeros(2, 3, device=cpu)
    assert x.device == cpu and x.to(cpu) is x and x.to(device=cpu, dtype=tt.float64).dtype == np.float64
    assert tt.arange(4, device=x.device).device.type == torch.arange(4).device.type == "cpu"
    assert tt.ones_like(x, device=cpu).device == cpu and x.cpu().device == cpu
    with pytest.raises(NotImplementedError, match="one GPU per process"):
        x.to("cuda:1")
    with pytest.raises(ValueError, match="unknown device"):
        x.to("tpu")


# ---------------------------------------------------------------- __format__ and sizes
@pytest.mark.parametrize("value,dtype", [(1.23456, "float32"), (-2.5, "float64"), (47, "int64"),
                                         (True, "bool"), (7, "int32")])
@pytest.mark.parametrize("spec", ["", ".4f", ">10", ".2e", "+", "^9"])
def test_format_of_a_0d_tensor_is_its_number(value, dtype, spec):
    theirs = torch.tensor(value, dtype=getattr(torch, dtype))
    try:
        want = format(theirs, spec)
    except (TypeError, ValueError) as e:
        with pytest.raises(type(e)):
            format(tt.tensor(value, dtype=getattr(tt, dtype)), spec)
        return
    assert format(tt.tensor(value, dtype=getattr(tt, dtype)), spec) == want


@pytest.mark.parametrize("shape", [(1,), (2,), (1, 1), (2, 3)])
def test_format_of_other_tensors_as_torch(shape):
    ours, theirs = tt.ones(*shape), torch.ones(*shape)
    assert f"{ours}" == str(ours)
    for spec in [".4f", ">10"]:
        with pytest.raises(TypeError):
            format(theirs, spec)
        with pytest.raises(TypeError):
            format(ours, spec)


@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3), (2, 1, 4)])
@pytest.mark.parametrize("dtype", ["float32", "float64", "int64", "int32", "bool", "float16"])
def test_size_dim_numel_element_size_as_torch(shape, dtype):
    ours = tt.zeros(shape, dtype=getattr(tt, dtype))
    theirs = torch.zeros(shape, dtype=getattr(torch, dtype))
    assert ours.size() == tuple(theirs.size()) and ours.dim() == theirs.dim()
    assert ours.numel() == theirs.numel() and ours.element_size() == theirs.element_size()
    assert ours.nbytes == theirs.nbytes and ours.itemsize == theirs.itemsize
    for d in range(-len(shape) - 1, len(shape) + 1):
        try:
            want = theirs.size(d)
        except IndexError:
            with pytest.raises(IndexError, match="[Dd]imension"):
                ours.size(d)
            continue
        assert ours.size(d) == want and ours.size(dim=d) == want


def test_len_of_a_0d_tensor_is_a_type_error_as_in_torch():
    with pytest.raises(TypeError, match="0-d"):
        len(torch.tensor(1.0))
    with pytest.raises(TypeError, match="0-d"):
        len(tt.tensor(1.0))


# ---------------------------------------------------------------- in-place ops
INPLACE = [
    ("add_", lambda x, y: x.add_(y)),
    ("add_ alpha", lambda x, y: x.add_(y, alpha=2)),
    ("sub_", lambda x, y: x.sub_(y)),
    ("sub_ alpha", lambda x, y: x.sub_(y, alpha=3)),
    ("mul_", lambda x, y: x.mul_(y)),
    ("div_", lambda x, y: x.div_(y)),
    ("copy_", lambda x, y: x.copy_(y)),
]


def _operand(kind, lib):
    t = torch if lib == "torch" else tt
    return {"float": t.tensor([1.5, -2.0, 4.0]), "double row": t.tensor([[0.5, 2.0, -1.0]], dtype=t.float64),
            "int": t.tensor([1, 2, 3]), "bool": t.tensor([True, False, True]),
            "scalar": 2, "float scalar": 0.5, "0-d": t.tensor(3.0),
            "wide": t.ones(2, 3)}[kind]


OTHERS = ["float", "double row", "int", "bool", "scalar", "float scalar", "0-d", "wide"]


@pytest.mark.parametrize("name,op,other", [
    (name, op, other) for name, op in INPLACE for other in OTHERS
    if not (name == "copy_" and "scalar" in other)])  # copy_ takes a tensor
@pytest.mark.parametrize("target", ["float32", "float64", "int64", "int32", "bool"])
def test_inplace_ops_as_torch(name, op, other, target):
    values = [3, 0, 1]
    theirs = torch.tensor(values, dtype=getattr(torch, target))
    ours = tt.tensor(values, dtype=getattr(tt, target))
    try:
        want = op(theirs, _operand(other, "torch"))
    except RuntimeError:
        with pytest.raises(RuntimeError):
            op(ours, _operand(other, "tt"))
        np.testing.assert_array_equal(ours.numpy(), np.array(values, dtype=target))  # unchanged
        return
    got = op(ours, _operand(other, "tt"))
    assert got is ours and got.dtype == np.dtype(target)
    np.testing.assert_array_equal(got.numpy(), want.numpy())


@pytest.mark.parametrize("target", ["float32", "int64", "bool"])
@pytest.mark.parametrize("value", [2.7, -3, True, 0])
def test_fill_and_zero_as_torch(target, value):
    theirs = torch.ones(2, 2, dtype=getattr(torch, target))
    ours = tt.ones(2, 2, dtype=getattr(tt, target))
    assert ours.fill_(value) is ours
    np.testing.assert_array_equal(ours.numpy(), theirs.fill_(value).numpy())
    assert ours.fill_(tt.tensor(value)).numpy().tolist() == theirs.fill_(torch.tensor(value)).tolist()
    np.testing.assert_array_equal(ours.zero_().numpy(), theirs.zero_().numpy())
    with pytest.raises(RuntimeError, match="0-dim"):
        ours.fill_(tt.ones(2))


def test_clamp_and_masked_fill_in_place():
    data = [[-2.0, 0.5], [3.0, -0.1]]
    ours, theirs = tt.tensor(data), torch.tensor(data)
    np.testing.assert_array_equal(ours.clamp_(-1, 1).numpy(), theirs.clamp_(-1, 1).numpy())
    ours.masked_fill_(ours < 0, 7.0)
    theirs.masked_fill_(theirs < 0, 7.0)
    np.testing.assert_array_equal(ours.numpy(), theirs.numpy())


def test_inplace_writes_through_views():
    ours, theirs = tt.zeros(2, 4), torch.zeros(2, 4)
    ours[1, 1:3].add_(5)
    theirs[1, 1:3].add_(5)
    ours[0].fill_(2)
    theirs[0].fill_(2)
    np.testing.assert_array_equal(ours.numpy(), theirs.numpy())


OPS_ON_LEAVES = ["zero_()", "fill_(1.0)", "add_(1)", "sub_(1)", "mul_(2)", "div_(2)",
                 "copy_(lib.ones(3))", "clamp_(0, 1)"]


@pytest.mark.parametrize("call", OPS_ON_LEAVES)
def test_inplace_on_a_leaf_that_requires_grad_as_torch(call):
    for lib in (torch, tt):
        p = lib.zeros(3, requires_grad=True)
        with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
            eval("p." + call, {"p": p, "lib": lib})
        with lib.no_grad():
            eval("p." + call, {"p": p, "lib": lib})  # allowed, as initialisers and optimizers do
        assert p.requires_grad and p.grad is None
    a, b = torch.zeros(3, requires_grad=True), tt.zeros(3, requires_grad=True)
    with torch.no_grad(), tt.no_grad():
        eval("a." + call, {"a": a, "lib": torch})
        eval("b." + call, {"b": b, "lib": tt})
    np.testing.assert_array_equal(b.numpy(), a.detach().numpy())


def test_inplace_in_the_graph_is_refused_by_name():
    x = tt.ones(3, requires_grad=True)
    y = x * 2
    with pytest.raises(NotImplementedError, match="add_ on a tensor in the autograd graph"):
        y.add_(1)
    with pytest.raises(NotImplementedError, match="copy_ on a tensor in the autograd graph"):
        tt.zeros(3).copy_(y)
    with tt.no_grad():  # outside recording, nothing is in the graph
        assert tt.zeros(3).copy_(y).numpy().tolist() == [2.0, 2.0, 2.0]


def test_requires_grad_in_place_as_torch():
    for lib in (torch, tt):
        x = lib.zeros(2)
        assert x.requires_grad_() is x and x.requires_grad
        assert not x.requires_grad_(False).requires_grad
        with pytest.raises(RuntimeError):
            lib.zeros(2, dtype=lib.int64).requires_grad_()
        y = lib.ones(2, requires_grad=True) * 2
        with pytest.raises(RuntimeError, match="leaf"):
            y.requires_grad_(False)
