"""tinytensor.optim against torch.optim: AdamW (parameter groups) and SGD (momentum, dampening,
Nesterov, weight decay) over 10 steps, gradient clipping, exact resume from a state dict, the
learning-rate schedule."""
import math

import numpy as np
import pytest
import torch

import tinytensor as tt
import tinytensor.nn as nn
import tinytensor.nn.functional as F
from tinytensor import backend
from torch_helper import _TORCH_DTYPE, assert_close, copy_module, dtypes


def twin_models(dtype, device):
    """The same small MLP in tinytensor and torch (torch's initial weights copied)."""
    torch.manual_seed(0)
    theirs = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.LayerNorm(16),
                                 torch.nn.Linear(16, 4)).to(_TORCH_DTYPE[np.dtype(dtype)])
    ours = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 4)).astype(dtype)
    copy_module(ours, theirs)
    return ours.to(device), theirs


def batches(n, dtype):
    rng = np.random.default_rng(1)
    return [(rng.standard_normal((8, 6)).astype(dtype), rng.integers(0, 4, 8)) for _ in range(n)]


def groups(params):
    """nanoGPT's split: weight decay on 2-D weights only."""
    params = list(params)
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def train_both(family, ours, theirs, opt, topt, data, device, dtype):
    for x, y in data:
        loss = F.cross_entropy(ours(tt.Tensor(x).to(device)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        tloss = torch.nn.functional.cross_entropy(theirs(torch.from_numpy(x)), torch.from_numpy(y))
        topt.zero_grad()
        tloss.backward()
        topt.step()
        assert_close(family, dtype, loss.numpy(), tloss.detach().numpy(), "loss")
        for (name, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
            assert_close(family, dtype, p.numpy(), q.detach().numpy(), f"{name} after a step")


@dtypes
def test_adamw_matches_torch_over_10_steps_with_groups(device, dtype):
    ours, theirs = twin_models(dtype, device)
    kw = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8)
    opt = tt.optim.AdamW(groups(ours.parameters()), **kw)
    topt = torch.optim.AdamW(groups(theirs.parameters()), **kw)
    assert [len(g["params"]) for g in opt.param_groups] == [2, 4]
    train_both("AdamW", ours, theirs, opt, topt, batches(10, dtype), device, dtype)
    # the moments too, tensor by tensor (llm.c style)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        st, tst = opt.state[id(p)], topt.state[q]
        assert st["step"] == int(tst["step"]) == 10
        assert_close("AdamW", dtype, backend.to_numpy(st["exp_avg"]), tst["exp_avg"].numpy(), "exp_avg")
        assert_close("AdamW", dtype, backend.to_numpy(st["exp_avg_sq"]), tst["exp_avg_sq"].numpy(),
                     "exp_avg_sq")


def test_adamw_defaults_match_torch():
    ours, theirs = twin_models(np.float64, "cpu")
    opt, topt = tt.optim.AdamW(ours.parameters()), torch.optim.AdamW(theirs.parameters())
    for k in ("lr", "betas", "eps", "weight_decay"):
        assert opt.param_groups[0][k] == topt.param_groups[0][k], k
    train_both("AdamW", ours, theirs, opt, topt, batches(3, np.float64), "cpu", np.float64)


@dtypes
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_matches_torch(device, dtype, momentum):
    ours, theirs = twin_models(dtype, device)
    opt = tt.optim.SGD(groups(ours.parameters()), lr=0.1, momentum=momentum)
    topt = torch.optim.SGD(groups(theirs.parameters()), lr=0.1, momentum=momentum)
    train_both("SGD", ours, theirs, opt, topt, batches(10, dtype), device, dtype)


SGD_VARIANTS = {
    "nesterov": dict(momentum=0.9, nesterov=True),
    "nesterov_wd": dict(momentum=0.9, nesterov=True, weight_decay=0.01),
    "dampening": dict(momentum=0.9, dampening=0.5),
    "dampening_wd": dict(momentum=0.5, dampening=0.2, weight_decay=0.1),
    "momentum_wd": dict(momentum=0.8, weight_decay=0.05),
    "wd_only": dict(weight_decay=0.1),
}


@dtypes
@pytest.mark.parametrize("variant", list(SGD_VARIANTS))
def test_sgd_variants_match_torch(device, dtype, variant):
    """Nesterov, dampening and weight decay: 10 steps and the momentum buffers against torch."""
    kw = SGD_VARIANTS[variant]
    ours, theirs = twin_models(dtype, device)
    opt = tt.optim.SGD(ours.parameters(), lr=0.05, **kw)
    topt = torch.optim.SGD(theirs.parameters(), lr=0.05, **kw)
    train_both("SGD", ours, theirs, opt, topt, batches(10, dtype), device, dtype)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        buf, tbuf = opt.state.get(id(p), {}).get("momentum_buffer"), topt.state[q].get("momentum_buffer")
        assert (buf is None) == (tbuf is None)
        if buf is not None:
            assert_close("SGD", dtype, backend.to_numpy(buf), tbuf.numpy(), "momentum_buffer")


@dtypes
def test_sgd_group_overrides_match_torch(device, dtype):
    """Per-group momentum, dampening, nesterov and weight decay, as torch's param groups."""
    ours, theirs = twin_models(dtype, device)

    def split(params):
        params = list(params)
        return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1, "nesterov": True},
                {"params": [p for p in params if p.ndim < 2], "momentum": 0.5, "dampening": 0.3}]
    opt = tt.optim.SGD(split(ours.parameters()), lr=0.05, momentum=0.9)
    topt = torch.optim.SGD(split(theirs.parameters()), lr=0.05, momentum=0.9)
    train_both("SGD", ours, theirs, opt, topt, batches(8, dtype), device, dtype)


def test_sgd_argument_errors():
    p = tt.Tensor(np.zeros(2), requires_grad=True)
    for kw in (dict(nesterov=True), dict(nesterov=True, momentum=0.9, dampening=0.1)):
        with pytest.raises(ValueError, match="Nesterov momentum requires a momentum and zero dampening"):
            tt.optim.SGD([p], **kw)
        with pytest.raises(ValueError, match="Nesterov momentum requires a momentum and zero dampening"):
            torch.optim.SGD([torch.zeros(2, requires_grad=True)], **kw)
    for kw, what in ((dict(lr=-0.1), "learning rate"), (dict(momentum=-0.5), "momentum value"),
                     (dict(weight_decay=-1.0), "weight_decay value")):
        with pytest.raises(ValueError, match=f"Invalid {what}"):
            tt.optim.SGD([p], **kw)
        with pytest.raises(ValueError, match=f"Invalid {what}"):
            torch.optim.SGD([torch.zeros(2, requires_grad=True)], **kw)


@dtypes
@pytest.mark.parametrize("max_norm", [0.05, 1e3])
def test_clip_grad_norm_matches_torch(device, dtype, max_norm):
    ours, theirs = twin_models(dtype, device)
    (x, y), = batches(1, dtype)
    F.cross_entropy(ours(tt.Tensor(x).to(device)), y).backward()
    torch.nn.functional.cross_entropy(theirs(torch.from_numpy(x)), torch.from_numpy(y)).backward()
    total = tt.optim.clip_grad_norm_(ours.parameters(), max_norm)
    ttotal = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm)
    assert isinstance(total, tt.Tensor) and total.shape == ()
    assert_close("clip_grad_norm_", dtype, total.numpy(), ttotal.numpy(), "total norm")
    if max_norm < 1:
        assert total.item() > max_norm                            # this case really clips
    for (name, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert_close("clip_grad_norm_", dtype, backend.to_numpy(p.grad), q.grad.numpy(), f"clipped {name}")


def test_clip_grad_norm_edges():
    p = tt.Tensor(np.array([3.0, 4.0]), requires_grad=True)
    p.grad = np.array([3.0, 4.0])
    assert tt.optim.clip_grad_norm_(p, 1.0).item() == pytest.approx(5.0)     # a single tensor
    np.testing.assert_allclose(p.grad, [0.6, 0.8], rtol=1e-6)
    q = tt.Tensor(np.zeros(2), requires_grad=True)
    assert tt.optim.clip_grad_norm_([q], 1.0).item() == 0.0                  # no gradients at all
    q.grad = np.array([np.inf, 0.0])
    with pytest.raises(RuntimeError, match="non-finite"):
        tt.optim.clip_grad_norm_([q], 1.0, error_if_nonfinite=True)


def test_adamw_state_dict_resumes_exactly():
    data = batches(10, np.float64)

    def steps(model, opt, part):
        for x, y in part:
            opt.zero_grad()
            F.cross_entropy(model(tt.Tensor(x)), y).backward()
            opt.step()

    a, _ = twin_models(np.float64, "cpu")
    opt_a = tt.optim.AdamW(groups(a.parameters()), lr=1e-2)
    steps(a, opt_a, data)

    b, _ = twin_models(np.float64, "cpu")
    opt_b = tt.optim.AdamW(groups(b.parameters()), lr=1e-2)
    steps(b, opt_b, data[:5])
    model_sd, opt_sd = b.state_dict(), opt_b.state_dict()
    for st in opt_sd["state"].values():                   # plain data: saveable without pickle
        assert isinstance(st["step"], int)
        assert all(isinstance(v, np.ndarray) for k, v in st.items() if k != "step")
    c, _ = twin_models(np.float64, "cpu")
    c.load_state_dict(model_sd)
    opt_c = tt.optim.AdamW(groups(c.parameters()), lr=0.5)  # the saved lr wins
    opt_c.load_state_dict(opt_sd)
    assert opt_c.param_groups[0]["lr"] == 1e-2 and opt_c.param_groups[1]["weight_decay"] == 0.0
    steps(c, opt_c, data[5:])
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(c.state_dict()[k], v, err_msg=k)
    with pytest.raises(ValueError, match="parameter groups"):
        tt.optim.AdamW(list(c.parameters()), lr=1e-2).load_state_dict(opt_sd)


NAN, INF = float("nan"), float("inf")
# AdamW's arguments written once for both libraries: m is tinytensor or torch
ADAMW_REFUSES = {
    "empty": lambda m, p: m.optim.AdamW([]),
    "lr nan": lambda m, p: m.optim.AdamW([p], lr=NAN),
    "lr negative": lambda m, p: m.optim.AdamW([p], lr=-1.0),
    "lr None": lambda m, p: m.optim.AdamW([p], lr=None),
    "eps nan": lambda m, p: m.optim.AdamW([p], eps=NAN),
    "eps negative": lambda m, p: m.optim.AdamW([p], eps=-1e-8),
    "weight_decay nan": lambda m, p: m.optim.AdamW([p], weight_decay=NAN),
    "weight_decay negative": lambda m, p: m.optim.AdamW([p], weight_decay=-0.1),
    "beta1 nan": lambda m, p: m.optim.AdamW([p], betas=(NAN, 0.999)),
    "beta1 negative": lambda m, p: m.optim.AdamW([p], betas=(-0.1, 0.999)),
    "beta2 one": lambda m, p: m.optim.AdamW([p], betas=(0.9, 1.0)),
    "beta2 int one": lambda m, p: m.optim.AdamW([p], betas=(0.9, 1)),
    "beta1 int": lambda m, p: m.optim.AdamW([p], betas=(0, 0.999)),
    "one beta": lambda m, p: m.optim.AdamW([p], betas=(0.9,)),
    "non-leaf": lambda m, p: m.optim.AdamW([p * 2]),
    "non-leaf in a group": lambda m, p: m.optim.AdamW([{"params": [p]}, {"params": [p + 1]}]),
    "a float": lambda m, p: m.optim.AdamW([p, 1.0]),
    "a tensor, not a list": lambda m, p: m.optim.AdamW(p),
    "a set in a group": lambda m, p: m.optim.AdamW([{"params": {p}}]),
    "a group twice": lambda m, p: m.optim.AdamW([{"params": [p]}, {"params": [p]}]),
    "a group without params": lambda m, p: m.optim.AdamW([{"lr": 0.1}]),
}


@pytest.mark.parametrize("name", list(ADAMW_REFUSES))
def test_adamw_refuses_what_torch_refuses(name):
    """torch's exception type and the start of its message (tinytensor's goes on to say what
    to give), in one line."""
    make = ADAMW_REFUSES[name]
    with pytest.raises(Exception) as theirs:
        make(torch, torch.nn.Parameter(torch.zeros(2)))
    with pytest.raises(theirs.type) as ours:
        make(tt, tt.nn.Parameter(tt.zeros(2)))
    assert str(ours.value).startswith(str(theirs.value)), (str(ours.value), str(theirs.value))
    assert "\n" not in str(ours.value)


@pytest.mark.parametrize("group", [{"lr": NAN}, {"lr": -1.0}, {"eps": NAN}, {"weight_decay": NAN},
                                   {"betas": (1.5, 0.9)}, {"betas": (0.9, NAN)}])
def test_adamw_refuses_bad_values_in_a_parameter_group(group):
    """torch 2.13 checks only the defaults (a group's lr=nan makes every parameter nan at the
    first step); tinytensor checks each group with the same words, naming the group."""
    (key, value), = group.items()
    torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(2))], **group}])
    with pytest.raises(ValueError, match=r"^Invalid .* in parameter group 1: give") as ours:
        tt.optim.AdamW([{"params": [tt.nn.Parameter(tt.zeros(2))]},
                        {"params": [tt.nn.Parameter(tt.zeros(2))], **group}])
    assert "\n" not in str(ours.value)


@pytest.mark.parametrize("kwargs", [dict(lr=INF), dict(lr=0), dict(lr=1), dict(weight_decay=INF),
                                    dict(betas=[0.9, 0.99]), dict(betas=(0.0, 0.0))])
def test_adamw_takes_what_torch_takes(kwargs):
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], **kwargs)
    tt.optim.AdamW([tt.nn.Parameter(tt.zeros(2))], **kwargs)


def test_optimizer_takes_frozen_parameters_and_warns_of_duplicates_as_torch():
    p, frozen = tt.Tensor(np.zeros(2), requires_grad=True), tt.Tensor(np.zeros(2))
    opt = tt.optim.AdamW([p, frozen])             # torch takes a tensor that needs no gradient
    p.grad = np.ones(2)
    opt.step()
    assert (p.data != 0).all() and (frozen.data == 0).all()
    with pytest.warns(UserWarning, match="duplicate parameters"):
        tt.optim.AdamW([p, p])
    opt = tt.optim.AdamW([{"params": p}])        # a group's params may be one tensor
    assert opt.param_groups[0]["params"][0] is p and len(opt.param_groups[0]["params"]) == 1


def test_optimizer_argument_errors():
    p = tt.Tensor(np.zeros(2), requires_grad=True)
    opt = tt.optim.AdamW([p])
    opt.step()                                   # no gradient yet: nothing happens
    np.testing.assert_array_equal(p.data, 0.0)


def test_cosine_lr_schedule():
    lr, min_lr, warm, decay = 1e-3, 1e-4, 10, 100
    got = [tt.optim.lr_schedule(i, lr, min_lr, warm, decay) for i in range(120)]
    assert got[0] == pytest.approx(lr / 11) and got[9] == pytest.approx(lr * 10 / 11)
    assert all(a < b for a, b in zip(got[:10], got[1:11]))               # warmup rises ...
    assert got[10] == pytest.approx(lr)
    assert all(a >= b for a, b in zip(got[10:100], got[11:101]))         # ... then decays
    assert got[55] == pytest.approx(min_lr + 0.5 * (1 + math.cos(math.pi * 0.5)) * (lr - min_lr))
    assert got[100] == got[119] == min_lr


def _old_train_get_lr(step, lr, min_lr, warmup, decay_iters, decay):
    """train.py's get_lr and optim.cosine_lr before they became one lr_schedule, verbatim."""
    if decay == "cosine":
        if warmup > 0 and step < warmup:
            return lr * (step + 1) / (warmup + 1)
        if step >= decay_iters:
            return min_lr
        ratio = (step - warmup) / max(1, decay_iters - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    return lr


@pytest.mark.parametrize("decay", ["cosine", "none"])
@pytest.mark.parametrize("warmup, decay_iters", [(0, 100), (10, 100), (3, 3), (0, 0), (20, 10)])
def test_lr_schedule_equals_the_old_warmup_and_cosine(decay, warmup, decay_iters):
    lr, min_lr = 6e-4, 6e-5
    for step in range(130):
        want = _old_train_get_lr(step, lr, min_lr, warmup, decay_iters, decay)
        assert tt.optim.lr_schedule(step, lr, min_lr, warmup, decay_iters, decay=decay) == want, step
    with pytest.raises(ValueError, match="decay='linear', expected 'cosine' or 'none'"):
        tt.optim.lr_schedule(50, lr, min_lr, 0, 100, decay="linear")
