"""The torch.nn Module API that nanoGPT-style code reaches, against torch: the same module tree
built in both libraries gives the same names, orders, shapes, values, gradients and errors
(traversal, apply, modes, registration, the containers, Module.to, tied weights)."""
from collections import OrderedDict

import numpy as np
import pytest
import torch

import tinytensor as tt
from tinytensor import backend

LIBS = {"ours": tt, "torch": torch}


def build(lib):
    """A module tree with every container, a shared child, a buffer and a tied weight, built
    from the library `lib` (tinytensor or torch)."""
    nn = lib.nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(4)
            self.ff = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4), nn.Dropout(0.1))
            self.register_buffer("mask", lib.tril(lib.ones(3, 3)))
            self.register_buffer("steps", lib.zeros(2, dtype=lib.int64))
            self.register_buffer("scratch", lib.zeros(2), persistent=False)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(lib.ones(4))
            self.wte = nn.Embedding(10, 4)
            self.blocks = nn.ModuleList([Block(), Block()])
            self.heads = nn.ModuleDict({"b": nn.Linear(4, 3), "a": nn.Linear(4, 2, bias=False)})
            self.extra = nn.ParameterList([nn.Parameter(lib.ones(3)), lib.zeros(2)])
            self.table = nn.ParameterDict(OrderedDict([("w", lib.ones(2, 2)), ("v", lib.zeros(1))]))
            self.skip = nn.Identity()
            act = nn.Tanh()
            self.act1, self.act2 = act, act                     # one child under two names
            self.lm_head = nn.Linear(4, 10, bias=False)
            self.lm_head.weight = self.wte.weight               # tied (nanoGPT)

    return Net()


def names(pairs):
    return [n for n, _ in pairs]


def shapes(pairs):
    return [(n, tuple(t.shape)) for n, t in pairs]


# ---------------------------------------------------------------- traversal
def test_traversal_matches_torch():
    ours, theirs = build(tt), build(torch)
    for remove in (True, False):
        assert names(ours.named_modules(remove_duplicate=remove)) == \
            names(theirs.named_modules(remove_duplicate=remove))
        assert shapes(ours.named_parameters(remove_duplicate=remove)) == \
            shapes(theirs.named_parameters(remove_duplicate=remove))
        assert shapes(ours.named_buffers(remove_duplicate=remove)) == \
            shapes(theirs.named_buffers(remove_duplicate=remove))
    assert [type(m).__name__ for m in ours.modules()] == [type(m).__name__ for m in theirs.modules()]
    assert names(ours.named_children()) == names(theirs.named_children())
    assert [type(m).__name__ for m in ours.children()] == [type(m).__name__ for m in theirs.children()]
    assert shapes(ours.named_parameters(prefix="net")) == shapes(theirs.named_parameters(prefix="net"))
    assert shapes(ours.named_parameters(recurse=False)) == shapes(theirs.named_parameters(recurse=False))
    assert shapes(ours.blocks[1].named_buffers(recurse=False)) == \
        shapes(theirs.blocks[1].named_buffers(recurse=False))
    assert len(list(ours.parameters())) == len(list(theirs.parameters()))
    assert len(list(ours.buffers())) == len(list(theirs.buffers()))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert ours.num_parameters() == sum(p.numel() for p in theirs.parameters())
    memo = set()
    assert names(ours.named_modules(memo, "m")) == names(theirs.named_modules(set(), "m"))
    assert ours in memo and ours.act1 in memo                   # torch's memo holds the modules


def test_apply_visits_children_first_as_torch():
    seen = {}
    for key, lib in LIBS.items():
        model, order = build(lib), []
        assert model.apply(lambda m: order.append(type(m).__name__)) is model
        seen[key] = order
    assert seen["ours"] == seen["torch"]
    assert seen["ours"][0] == "Embedding" and seen["ours"][-1] == "Net"


def test_apply_initialises_like_nanogpt():
    """nanoGPT's _init_weights through apply and nn.init, under the same names as torch."""
    def init_weights(nn, module, log):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
            log.append("linear")
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            log.append("embedding")

    logs = {}
    for key, lib in LIBS.items():
        model, logs[key] = build(lib), []
        model.apply(lambda m: init_weights(lib.nn, m, logs[key]))
        if key == "ours":
            assert np.abs(model.wte.weight.numpy()).max() < 0.02 * 7
            assert not model.heads["b"].bias.numpy().any()
    assert logs["ours"] == logs["torch"]


# ---------------------------------------------------------------- modes and gradients
@pytest.mark.parametrize("mode", [False, True])
def test_train_and_eval_as_torch(mode):
    for lib in LIBS.values():
        model = build(lib)
        assert model.train(mode) is model
        assert all(m.training is mode for m in model.modules())
        assert model.eval() is model and not any(m.training for m in model.modules())


@pytest.mark.parametrize("mode", [1, 0, "yes", None, np.bool_(True)])
def test_train_takes_only_a_bool_as_torch(mode):
    with pytest.raises(ValueError, match="training mode is expected to be boolean"):
        build(torch).train(mode)
    with pytest.raises(ValueError, match="training mode is expected to be boolean"):
        build(tt).train(mode)


def forward(model, lib):
    """A scalar that reaches every parameter of build(lib)'s model."""
    idx = lib.tensor([[1, 2, 3], [4, 5, 6]])
    x = model.skip(model.wte(idx)) * model.scale
    for b in model.blocks:
        x = x + b.ff(b.ln(x))
    x = model.act2(model.act1(x))
    out = model.lm_head(x).sum() + model.heads["a"](x).sum() + (model.heads["b"](x) ** 2).sum()
    return out + model.extra[0].sum() * model.extra[1].sum() + (model.table["w"] ** 2).sum() \
        + model.table["v"].sum()


def copied_pair(dtype=np.float64):
    """build(tt) and build(torch) in dtype with torch's values copied into ours."""
    theirs = build(torch).to(getattr(torch, np.dtype(dtype).name)).eval()
    ours = build(tt).to(dtype).eval()
    ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
    return ours, theirs


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_as_torch(set_to_none):
    ours, theirs = copied_pair()
    forward(ours, tt).backward()
    forward(theirs, torch).backward()
    ours.zero_grad(set_to_none=set_to_none)
    theirs.zero_grad(set_to_none=set_to_none)
    for (n, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
        if set_to_none:
            assert p.grad is None and q.grad is None, n
        else:
            np.testing.assert_array_equal(p.grad, q.grad.numpy(), err_msg=n)


def test_requires_grad_as_torch():
    for lib in LIBS.values():
        model = build(lib)
        assert model.requires_grad_(False) is model
        assert not any(p.requires_grad for p in model.parameters())
        assert all(p.requires_grad for p in model.requires_grad_().parameters())
    with pytest.raises(TypeError, match="must be bool"):
        build(torch).requires_grad_(1)
    with pytest.raises(TypeError, match="must be bool, not int"):
        build(tt).requires_grad_(1)


# ---------------------------------------------------------------- registration
def bare(lib):
    m = lib.nn.Module()
    m.lin = lib.nn.Linear(2, 2)
    m.w = lib.nn.Parameter(lib.zeros(2))
    m.register_buffer("buf", lib.zeros(2))
    m.plain = 5
    return m


REGISTRATION_ERRORS = [  # (what to do with bare(lib), error type, part of our message)
    (lambda lib, m: m.add_module(1, lib.nn.ReLU()), TypeError, "module name should be a string. Got int"),
    (lambda lib, m: m.add_module("a.b", lib.nn.ReLU()), KeyError, r"name can\W+t contain"),
    (lambda lib, m: m.add_module("", lib.nn.ReLU()), KeyError, r"name can\W+t be empty string"),
    (lambda lib, m: m.add_module("training", lib.nn.ReLU()), KeyError, "attribute 'training' already exists"),
    (lambda lib, m: m.add_module("w", lib.nn.ReLU()), KeyError, "attribute 'w' already exists"),
    (lambda lib, m: m.add_module("x", 5), TypeError, "int is not a Module subclass"),
    (lambda lib, m: m.register_parameter(2, None), TypeError, "parameter name should be a string"),
    (lambda lib, m: m.register_parameter("a.b", None), KeyError, r"name can\W+t contain"),
    (lambda lib, m: m.register_parameter("", None), KeyError, r"name can\W+t be empty string"),
    (lambda lib, m: m.register_parameter("plain", None), KeyError, "attribute 'plain' already exists"),
    (lambda lib, m: m.register_parameter("lin", None), KeyError, "attribute 'lin' already exists"),
    (lambda lib, m: m.register_parameter("v", lib.zeros(2)), TypeError, "object to parameter 'v'"),
    (lambda lib, m: m.register_buffer("forward", lib.zeros(2)), KeyError, "attribute 'forward' already exists"),
    (lambda lib, m: m.register_buffer("w", lib.zeros(2)), KeyError, "already exists"),
    (lambda lib, m: setattr(m, "w", lib.zeros(2)), TypeError, "as parameter 'w'"),
    (lambda lib, m: setattr(m, "lin", 3), TypeError, "as child module 'lin'"),
    (lambda lib, m: setattr(m, "buf", [1.0]), TypeError, "buffer"),
    (lambda lib, m: m.get_submodule("lin.weight"), AttributeError, "`weight` is not an nn.Module"),
    (lambda lib, m: m.get_submodule("nope"), AttributeError, "has no attribute `nope`"),
    (lambda lib, m: m.get_parameter("lin.nope"), AttributeError, "has no attribute `nope`"),
    (lambda lib, m: m.get_parameter("buf"), AttributeError, "`buf` is not an nn.Parameter"),
    (lambda lib, m: m.nope, AttributeError, "'Module' object has no attribute 'nope'"),
]


@pytest.mark.parametrize("case", range(len(REGISTRATION_ERRORS)))
def test_registration_errors_as_torch(case):
    act, error, match = REGISTRATION_ERRORS[case]
    with pytest.raises(error):
        act(torch, bare(torch))
    with pytest.raises(error, match=match):
        act(tt, bare(tt))


def test_registration_as_torch():
    results = {}
    for key, lib in LIBS.items():
        m = bare(lib)
        m.add_module("none_child", None)
        m.register_parameter("none_param", None)
        m.register_module("relu", lib.nn.ReLU())
        m.w = None                                   # a registered parameter emptied
        m.plain = lib.nn.Parameter(lib.ones(3))      # a plain attribute becomes a parameter
        m.buf = None
        m.lin = lib.nn.Linear(2, 5)                  # replaced in place: its place is kept
        m.add_module("tail", lib.nn.Tanh())
        del m.relu
        results[key] = (shapes(m.named_parameters()), names(m.named_children()), names(m.named_buffers()),
                        list(m.state_dict()), m.none_child is None, m.none_param is None, m.w is None,
                        m.get_submodule("") is m, tuple(m.get_parameter("lin.weight").shape),
                        type(m.get_submodule("tail")).__name__)
    assert results["ours"] == results["torch"]


def test_parameter_as_torch():
    p = tt.nn.Parameter()
    assert p.shape == tuple(torch.nn.Parameter().shape) and p.dtype == tt.get_default_dtype()
    assert p.requires_grad and isinstance(p, tt.Tensor)
    t = tt.ones(3)
    q = tt.nn.Parameter(t)
    q.data[0] = 5.0
    ref = torch.ones(3)
    torch.nn.Parameter(ref).data[0] = 5.0
    np.testing.assert_array_equal(t.numpy(), ref.numpy())       # shares the tensor's data


# ---------------------------------------------------------------- containers
def signature(module):
    """What a container looks like from outside: its children (or entries) and parameters."""
    if hasattr(module, "keys"):
        entries = [(k, type(module[k]).__name__) for k in module]
    else:
        entries = [type(m).__name__ for m in module]
    return entries, len(module), shapes(module.named_parameters()), names(module.named_children())


def module_list_ops(lib):
    nn = lib.nn
    ml = nn.ModuleList([nn.Linear(1, 2), nn.ReLU()])
    steps = [signature(ml)]
    ml.append(nn.Linear(2, 3))
    ml.extend([nn.Tanh(), nn.GELU()])
    ml += [nn.Identity()]
    steps.append(signature(ml))
    ml.insert(1, nn.LayerNorm(3))
    ml.insert(len(ml), nn.Dropout())
    steps.append(signature(ml))
    steps.append([type(ml[i]).__name__ for i in (0, -1, -len(ml), 3)])
    steps.append(signature(ml[1:5]) + signature(ml[::-2]) + (type(ml[2:]).__name__,))
    ml[-2] = nn.Embedding(3, 2)
    del ml[0]
    steps.append(signature(ml))
    del ml[1:3]
    steps.append(signature(ml))
    steps.append(type(ml.pop(-1)).__name__)
    steps.append(signature(ml))
    return steps


def sequential_ops(lib):
    nn = lib.nn
    s = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    steps = [signature(s)]
    s.append(nn.Linear(4, 2)).extend([nn.Tanh()])
    s.insert(-1, nn.GELU())
    s.insert(0, nn.Identity())
    steps.append(signature(s))
    steps.append(signature(s[1:4]) + (type(s[1:4]).__name__, type(s[-1]).__name__))
    named = nn.Sequential(OrderedDict([("fc", nn.Linear(2, 2)), ("act", nn.ReLU()), ("out", nn.Linear(2, 1))]))
    steps.append(names(named.named_parameters()) + names(named[1:].named_children()))
    s[0] = nn.Linear(3, 3)
    del s[2]
    steps.append(signature(s))
    steps.append(type(s.pop(1)).__name__)
    steps.append(signature(s))
    return steps


def module_dict_ops(lib):
    nn = lib.nn
    d = nn.ModuleDict({"b": nn.Linear(1, 2), "a": nn.ReLU()})
    steps = [signature(d), "a" in d, "z" in d, list(d.keys())]
    d["c"] = nn.Linear(2, 2)
    d.update([("d", nn.Tanh()), ("a", nn.Linear(3, 1))])
    d.update(OrderedDict([("e", nn.GELU())]))
    d.update(nn.ModuleDict({"f": nn.Identity()}))
    steps.append(signature(d))
    steps.append([(k, type(v).__name__) for k, v in d.items()] + [type(v).__name__ for v in d.values()])
    del d["b"]
    steps.append(type(d.pop("c")).__name__)
    steps.append(signature(d))
    d.clear()
    steps.append(signature(d))
    return steps


def parameter_list_ops(lib):
    nn = lib.nn
    pl = nn.ParameterList([nn.Parameter(lib.ones(2)), lib.zeros(3)])
    steps = [signature(pl), [type(p).__name__ for p in pl], [p.requires_grad for p in pl]]
    pl.append(lib.ones(4, 1))
    pl.extend([nn.Parameter(lib.zeros(1))])
    pl += [lib.ones(5)]
    pl[0] = lib.zeros(7)
    steps.append(signature(pl) + (type(pl[0]).__name__, tuple(pl[-1].shape)))
    steps.append(signature(pl[1:4]) + (type(pl[1:4]).__name__,))
    pl.append("not a tensor")
    steps.append((len(pl), pl[-1], shapes(pl.named_parameters())))
    return steps


def parameter_dict_ops(lib):
    nn = lib.nn
    pd = nn.ParameterDict({"b": lib.ones(1), "a": nn.Parameter(lib.zeros(2))})   # a dict: sorted
    steps = [signature(pd), "a" in pd, list(pd.keys())]
    pd.update(OrderedDict([("z", lib.ones(3)), ("c", lib.ones(4))]))               # in order
    pd.update([("y", lib.ones(2, 2))])
    pd["x"] = nn.Parameter(lib.ones(1, 1))
    steps.append(signature(pd) + (type(pd["z"]).__name__, pd.get("q", 3)))
    steps.append([(k, tuple(v.shape)) for k, v in pd.items()] + [tuple(v.shape) for v in pd.values()])
    del pd["b"]
    steps.append(tuple(pd.pop("z").shape))
    steps.append(signature(pd))
    pd.clear()
    steps.append(signature(pd))
    return steps


@pytest.mark.parametrize("ops", [module_list_ops, sequential_ops, module_dict_ops, parameter_list_ops,
                                 parameter_dict_ops])
def test_container_api_as_torch(ops):
    assert ops(tt) == ops(torch)


def test_containers_register_their_entries_as_torch():
    found = {}
    for key, lib in LIBS.items():
        nn = lib.nn
        root = nn.Module()
        root.layers = nn.ModuleDict({"fc": nn.Linear(2, 3), "more": nn.ModuleList([nn.Linear(3, 1)])})
        root.ps = nn.ParameterList([lib.ones(2)])
        root.pd = nn.ParameterDict({"k": lib.ones(1)})
        found[key] = (shapes(root.named_parameters()), list(root.state_dict()), names(root.named_modules()))
    assert found["ours"] == found["torch"]
    assert "layers.more.0.bias" in found["ours"][1] and "pd.k" in found["ours"][1]


def test_sequential_runs_in_order_and_identity_returns_its_input():
    ours, theirs = tt.nn.Sequential(tt.nn.Linear(3, 4), tt.nn.Identity(7, k=2), tt.nn.Tanh()), \
        torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Identity(7, k=2), torch.nn.Tanh())
    ours[0].weight.data[...] = theirs[0].weight.detach().numpy()
    ours[0].bias.data[...] = theirs[0].bias.detach().numpy()
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_allclose(ours(tt.tensor(x)).numpy(), theirs(torch.tensor(x)).detach().numpy(),
                               rtol=1e-6, atol=1e-7)
    t = tt.ones(2)
    assert tt.nn.Identity()(t) is t


CONTAINER_ERRORS = [  # (what to do, error type, part of our message)
    (lambda nn, lib: nn.ModuleList([nn.ReLU()])[3], IndexError, "index 3 is out of range"),
    (lambda nn, lib: nn.ModuleList([nn.ReLU()])[-2], IndexError, "index -2 is out of range"),
    (lambda nn, lib: nn.ModuleList([nn.ReLU()])["a"], TypeError, "cannot be interpreted as an integer"),
    (lambda nn, lib: nn.ModuleList().append(5), TypeError, "int is not a Module subclass"),
    (lambda nn, lib: nn.ModuleList().extend(5), TypeError, "extend should be called with an iterable"),
    (lambda nn, lib: nn.ModuleList([nn.ReLU()]).__setitem__(0, 5), TypeError, "as child module '0'"),
    (lambda nn, lib: nn.Sequential(nn.ReLU())[1], IndexError, "index 1 is out of range"),
    (lambda nn, lib: nn.Sequential(5), TypeError, "int is not a Module subclass"),
    (lambda nn, lib: nn.Sequential(nn.ReLU()).insert(3, nn.ReLU()), IndexError, "Index out of range: 3"),
    (lambda nn, lib: nn.Sequential(nn.ReLU()).__delitem__(4), IndexError, "out of range"),
    (lambda nn, lib: nn.ModuleDict()["x"], KeyError, "x"),
    (lambda nn, lib: nn.ModuleDict().__setitem__(1, nn.ReLU()), TypeError, "module name should be a string"),
    (lambda nn, lib: nn.ModuleDict().__setitem__("keys", nn.ReLU()), KeyError, "attribute 'keys' already exists"),
    (lambda nn, lib: nn.ModuleDict().__setitem__("q", 5), TypeError, "int is not a Module subclass"),
    (lambda nn, lib: nn.ModuleDict().update(5), TypeError, "should be called with an iterable"),
    (lambda nn, lib: nn.ModuleDict().update([("a",)]), ValueError, "#0 has length 1; 2 is required"),
    (lambda nn, lib: nn.ModuleDict().update([5]), TypeError, "#0 should be Iterable"),
    (lambda nn, lib: nn.ModuleDict().pop("zz"), KeyError, "zz"),
    (lambda nn, lib: nn.ModuleDict()(1), NotImplementedError, "missing the required \"forward\" function"),
    (lambda nn, lib: nn.ParameterList([lib.ones(1)])[1], IndexError, "index 1 is out of range"),
    (lambda nn, lib: nn.ParameterList().extend(lib.ones(2)), TypeError, "should be called with an iterable"),
    (lambda nn, lib: nn.ParameterList()(1), RuntimeError, "ParameterList should not be called"),
    (lambda nn, lib: nn.ParameterDict()[1], TypeError, "not a string"),
    (lambda nn, lib: nn.ParameterDict()["zz"], AttributeError, "no attribute 'zz'"),
    (lambda nn, lib: nn.ParameterDict().__setitem__("a.b", lib.ones(1)), KeyError, r"name can\W+t contain"),
    (lambda nn, lib: nn.ParameterDict()(1), RuntimeError, "ParameterDict should not be called"),
]


@pytest.mark.parametrize("case", range(len(CONTAINER_ERRORS)))
def test_container_errors_as_torch(case):
    act, error, match = CONTAINER_ERRORS[case]
    with pytest.raises(error):
        act(torch.nn, torch)
    with pytest.raises(error, match=match):
        act(tt.nn, tt)


def test_module_list_insert_refuses_what_torch_cannot_do():
    ml = tt.nn.ModuleList([tt.nn.ReLU()])
    with pytest.raises(KeyError):                   # torch fails on a negative position
        torch.nn.ModuleList([torch.nn.ReLU()]).insert(-1, torch.nn.Tanh())
    for bad in (-1, 2):
        with pytest.raises(IndexError, match=f"index {bad} is out of range 0 .. 1"):
            ml.insert(bad, tt.nn.Tanh())
    assert [type(m).__name__ for m in ml] == ["ReLU"]


# ---------------------------------------------------------------- Module.to
def dtypes_of(model):
    return [(n, np.dtype(str(t.dtype).replace("torch.", "")).name) for n, t in
            list(model.named_parameters()) + list(model.named_buffers())]


TO_CALLS = [  # (our arguments, torch's arguments)
    ((np.float64,), (torch.float64,)), ((tt.float64,), (torch.float64,)), ((float,), (float,)),
    (("cpu", tt.float16), ("cpu", torch.float16)), ((), ()), (("cpu",), ("cpu",)),
    ((tt.zeros(1, dtype=tt.float64),), (torch.zeros(1, dtype=torch.float64),)),
    ((tt.float64, True), (torch.float64, True)),
]
TO_KWARGS = [({"dtype": tt.float64}, {"dtype": torch.float64}),
             ({"device": "cpu", "dtype": tt.float64}, {"device": "cpu", "dtype": torch.float64}),
             ({"device": "cpu", "non_blocking": True}, {"device": "cpu", "non_blocking": True})]


@pytest.mark.parametrize("case", range(len(TO_CALLS) + len(TO_KWARGS)))
def test_module_to_casts_floating_arrays_as_torch(case):
    if case < len(TO_CALLS):
        (args, targs), (kwargs, tkwargs) = TO_CALLS[case], ({}, {})
    else:
        (args, targs), (kwargs, tkwargs) = ((), ()), TO_KWARGS[case - len(TO_CALLS)]
    ours, theirs = build(tt), build(torch)
    forward(ours, tt).backward()
    forward(theirs, torch).backward()
    before = {n: p for n, p in ours.named_parameters()}
    assert ours.to(*args, **kwargs) is ours
    theirs.to(*targs, **tkwargs)
    assert dtypes_of(ours) == dtypes_of(theirs)
    assert ours.blocks[0].steps.dtype == np.int64                           # integer buffers keep theirs
    for n, p in ours.named_parameters():
        assert p is before[n] and p.grad.dtype == p.dtype, n                # the same objects, grads cast
    assert ours.lm_head.weight is ours.wte.weight                           # the tie holds


@pytest.mark.parametrize("method,dtype", [("double", np.float64), ("float", np.float32), ("half", np.float16)])
def test_double_float_half_as_torch(method, dtype):
    ours, theirs = build(tt).double(), build(torch).double()
    assert getattr(ours, method)() is ours
    getattr(theirs, method)()
    assert dtypes_of(ours) == dtypes_of(theirs)
    assert ours.scale.dtype == dtype


def test_module_to_device_and_dtype(device):
    model = build(tt)
    assert model.to(device=device, dtype=tt.float64) is model
    assert all(t.device.type == device for t in list(model.parameters()) + list(model.buffers()))
    assert {t.dtype for t in model.parameters()} == {np.dtype(np.float64)}
    assert forward(model, tt).device.type == device
    assert model.cpu() is model and all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.parametrize("args,kwargs,targs,tkwargs,error,match", [
    ((tt.int64,), {}, (torch.int64,), {}, TypeError, "only accepts floating point dtypes"),
    (("cpu", tt.int32), {}, ("cpu", torch.int32), {}, TypeError, "only accepts floating point dtypes"),
    ((), {"dtype": tt.bool}, (), {"dtype": torch.bool}, TypeError, "only accepts floating point dtypes"),
    ((tt.zeros(1, dtype=tt.int64),), {}, (torch.zeros(1, dtype=torch.int64),), {}, TypeError, "floating point"),
    (("cpu", "cpu"), {}, ("cpu", "cpu"), {}, TypeError, "invalid dtype 'cpu'"),
    ((tt.float64, tt.float32), {}, (torch.float64, torch.float32), {}, TypeError, "invalid combination"),
    (("cpu",), {"device": "cpu"}, ("cpu",), {"device": "cpu"}, TypeError, "multiple values for argument 'device'"),
    ((), {"colour": 1}, (), {"colour": 1}, TypeError, "unexpected keyword argument 'colour'"),
])
def test_module_to_errors_as_torch(args, kwargs, targs, tkwargs, error, match):
    with pytest.raises(error):
        build(torch).to(*targs, **tkwargs)
    with pytest.raises(error, match=match):
        build(tt).to(*args, **kwargs)


def test_optimizer_built_before_to_keeps_working_as_torch():
    ours, theirs = copied_pair(np.float32)
    opt = tt.optim.AdamW(ours.parameters(), lr=1e-2, weight_decay=0.1)
    topt = torch.optim.AdamW(theirs.parameters(), lr=1e-2, weight_decay=0.1)
    ours.to(tt.float64)
    theirs.to(torch.float64)
    for _ in range(2):
        opt.zero_grad()
        topt.zero_grad()
        forward(ours, tt).backward()
        forward(theirs, torch).backward()
        opt.step()
        topt.step()
    for (n, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert p.dtype == np.float64
        np.testing.assert_allclose(p.numpy(), q.detach().numpy(), rtol=1e-6, atol=1e-7, err_msg=n)


# ---------------------------------------------------------------- tied weights (nanoGPT)
def tied_lm(lib, vocab=7, n_embd=5):
    """nanoGPT's tie: transformer.wte.weight = lm_head.weight."""
    nn = lib.nn

    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(vocab, n_embd), wpe=nn.Embedding(4, n_embd),
                                                  ln_f=nn.LayerNorm(n_embd)))
            self.lm_head = nn.Linear(n_embd, vocab, bias=False)
            self.transformer.wte.weight = self.lm_head.weight

        def forward(self, idx, targets):
            x = self.transformer.wte(idx) + self.transformer.wpe(lib.arange(idx.shape[1]))
            logits = self.lm_head(self.transformer.ln_f(x))
            return nn.functional.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))

    return TinyLM()


def tied_pair():
    theirs = tied_lm(torch).double()
    ours = tied_lm(tt).double()
    ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
    return ours, theirs


IDX = np.array([[1, 3, 6, 0], [2, 2, 5, 4]])
TARGETS = np.array([[3, 6, 0, 1], [2, 5, 4, 4]])


def test_tied_names_as_torch():
    ours, theirs = tied_pair()
    assert ours.transformer.wte.weight is ours.lm_head.weight               # the tie survives the load
    assert names(ours.named_parameters()) == names(theirs.named_parameters())
    assert names(ours.named_parameters())[0] == "transformer.wte.weight"
    assert "lm_head.weight" not in names(ours.named_parameters())
    assert names(ours.named_parameters(remove_duplicate=False)) == \
        names(theirs.named_parameters(remove_duplicate=False))
    assert names(ours.named_parameters(remove_duplicate=False)).count("lm_head.weight") == 1
    assert len(list(ours.parameters())) == len(list(theirs.parameters())) == 4
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert {"transformer.wte.weight", "lm_head.weight"} <= set(ours.state_dict())


def test_tied_gradient_is_the_sum_of_both_uses_as_torch():
    ours, theirs = tied_pair()
    ours(tt.tensor(IDX), tt.tensor(TARGETS)).backward()
    theirs(torch.tensor(IDX), torch.tensor(TARGETS)).backward()
    for (n, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
        ref = q.grad.numpy()
        assert np.max(np.abs(p.grad - ref)) <= 1e-12 * np.max(np.abs(ref)), n
    # both uses count: the head's gradient alone (the embedding's use cut off) differs
    head_only = tied_lm(torch).double()
    head_only.load_state_dict(theirs.state_dict())
    head_only.transformer.wte.weight = torch.nn.Parameter(theirs.lm_head.weight.detach().clone())
    head_only(torch.tensor(IDX), torch.tensor(TARGETS)).backward()
    assert not np.allclose(ours.lm_head.weight.grad, head_only.lm_head.weight.grad.numpy())


def test_adamw_steps_a_tied_model_as_torch():
    ours, theirs = tied_pair()
    opt = tt.optim.AdamW(ours.parameters(), lr=3e-2, betas=(0.9, 0.95), weight_decay=0.1)
    topt = torch.optim.AdamW(theirs.parameters(), lr=3e-2, betas=(0.9, 0.95), weight_decay=0.1)
    assert len(opt.param_groups[0]["params"]) == len(topt.param_groups[0]["params"]) == 4
    for _ in range(3):
        opt.zero_grad()
        topt.zero_grad()
        ours(tt.tensor(IDX), tt.tensor(TARGETS)).backward()
        theirs(torch.tensor(IDX), torch.tensor(TARGETS)).backward()
        opt.step()
        topt.step()
    for (n, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
        ref = q.detach().numpy()
        assert np.max(np.abs(p.numpy() - ref)) <= 1e-12 * np.max(np.abs(ref)), n
    assert ours.transformer.wte.weight is ours.lm_head.weight


def test_load_state_dict_of_a_tied_model_as_torch():
    ours, theirs = tied_pair()
    sd = {k: v.clone() for k, v in theirs.state_dict().items()}
    sd["transformer.wte.weight"] += 1.0          # the two names disagree: the later one wins
    theirs.load_state_dict(sd)
    ours.load_state_dict({k: v.numpy() for k, v in sd.items()})
    assert ours.transformer.wte.weight is ours.lm_head.weight
    for k, v in theirs.state_dict().items():
        np.testing.assert_array_equal(ours.state_dict()[k], v.numpy(), err_msg=k)
    assert backend.to_numpy(ours.lm_head.weight.data).tolist() == theirs.lm_head.weight.tolist()
