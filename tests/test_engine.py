"""The reverse-mode engine: graph shapes, accumulation, deep chains, no_grad, freeing the graph,
flat memory over a training loop, dtype rules and conversions."""
import gc
import sys
import tracemalloc
import weakref

import numpy as np
import pytest
import torch

import tinytensor as tt
import tinytensor.nn as nn
import tinytensor.nn.functional as F
from tinytensor import Function, backend, fused
from torch_helper import WORST, assert_close, check, randn


def test_diamond_graph(device):
    # x -> a, b -> c: both paths' gradients reach x
    check("engine", lambda x: (x * 2.0).tanh() * x.exp(), lambda x: (x * 2.0).tanh() * x.exp(),
          randn(3, 4), device=device)
    fn = lambda x, w: (x @ w).relu() @ (x @ w).T.tanh()  # noqa: E731 - x @ w computed twice
    check("engine", fn, fn, randn(3, 4, low=0.2), randn(4, 3, seed=1), device=device)


def test_reused_input(device):
    check("engine", lambda x: x * x, lambda x: x * x, randn(5), device=device)
    check("engine", lambda x: (x * x + x.exp()) / (x.sum() + 10.0) - x[0] * x.mean(),
          lambda x: (x * x + x.exp()) / (x.sum() + 10.0) - x[0] * x.mean(), randn(4, 3), device=device)
    x = tt.Tensor(np.array([3.0]), requires_grad=True).to(device)
    y = x
    for _ in range(5):  # y = x ** 32 by repeated squaring: every step reuses the previous node
        y = y * y
    y.sum().backward()
    np.testing.assert_allclose(backend.to_numpy(x.grad), [32 * 3.0 ** 31], rtol=1e-14)


def test_gradients_accumulate_across_backward_calls(device):
    x = tt.Tensor(randn(3), requires_grad=True).to(device)
    w = tt.Tensor(randn(3, seed=1)).to(device)
    (x * w).sum().backward()
    first = backend.to_numpy(x.grad).copy()
    (x * x).sum().backward()          # a new graph on the same leaf: gradients add up
    np.testing.assert_allclose(backend.to_numpy(x.grad), first + 2 * x.numpy(), rtol=1e-15)
    x.grad = None
    (x * 3.0).sum().backward()
    np.testing.assert_array_equal(backend.to_numpy(x.grad), 3.0)


def test_leaf_gradient_is_not_an_alias():
    # add returns the same gradient array for both inputs; the leaves must get copies
    a = tt.Tensor(randn(3), requires_grad=True)
    b = tt.Tensor(randn(3, seed=1), requires_grad=True)
    (a + b).backward(np.ones(3))
    a.grad += 1
    np.testing.assert_array_equal(b.grad, 1.0)


def test_ten_thousand_op_chain_has_no_recursion_error():
    limit = sys.getrecursionlimit()
    x = tt.Tensor(np.array([1.0, 2.0]), requires_grad=True)
    y = x
    for _ in range(10_000):
        y = y * 1.0001
    y.sum().backward()
    assert sys.getrecursionlimit() == limit            # the engine did not raise the limit
    np.testing.assert_allclose(x.grad, 1.0001 ** 10_000, rtol=1e-10)


def test_backward_arguments():
    x = tt.Tensor(randn(2, 3), requires_grad=True)
    y = x * 2.0
    with pytest.raises(RuntimeError, match="single-element"):
        y.backward()
    with pytest.raises(ValueError, match="does not match"):
        y.backward(np.ones(3))
    y.backward(tt.Tensor(np.full((2, 3), 0.5)))
    np.testing.assert_array_equal(x.grad, 1.0)
    with pytest.raises(RuntimeError, match="does not require grad"):
        tt.Tensor(randn(2)).sum().backward()


def test_no_grad_records_nothing():
    x = tt.Tensor(randn(3), requires_grad=True)
    with tt.no_grad():
        assert not tt.is_grad_enabled()
        y = (x * 2).exp().sum()
        with tt.no_grad():
            pass
        assert not tt.is_grad_enabled()                 # nested exit keeps it off
    assert tt.is_grad_enabled()
    assert not y.requires_grad and y._ctx is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.backward()

    @tt.no_grad()
    def f(a):
        """doc"""
        return a * 3

    @tt.no_grad
    def g(a):
        return a * 4

    assert not f(x).requires_grad and not g(x).requires_grad
    assert f.__name__ == "f" and f.__doc__ == "doc"
    assert tt.is_grad_enabled()
    with pytest.raises(ZeroDivisionError):
        with tt.no_grad():
            1 / 0
    assert tt.is_grad_enabled()                         # restored after an exception
    assert (x * 2).requires_grad


def test_graph_is_freed_after_backward():
    x = tt.Tensor(randn(4, 4), requires_grad=True)
    h = x @ x                 # an intermediate: only the graph keeps it alive after `del`
    ref = weakref.ref(h)
    y = (h.tanh() * 2).sum()
    ctx = y._ctx
    del h
    gc.collect()
    assert ref() is not None  # still held by the graph
    y.backward()
    assert ref() is None      # backward released the links ...
    assert not vars(ctx)      # ... and the arrays the Function saved
    with pytest.raises(RuntimeError, match="already freed"):
        y.backward()          # a second pass cannot run (torch: retain_graph); it does not go silent
    z = x * 2
    (z * 3).sum().backward()
    with pytest.raises(RuntimeError, match="already freed"):
        (z * 5).sum().backward()   # z's graph went with the first backward


def test_no_grad_forward_is_told_no_input_wants_a_gradient_and_keeps_nothing(monkeypatch):
    seen = []

    class Probe(Function):
        def forward(self, a, b):
            seen.append(list(self.needs_grad))
            return a + b

    x, c = tt.Tensor(randn(3), requires_grad=True), tt.Tensor(randn(3))
    Probe.apply(x, c)
    with tt.no_grad():
        Probe.apply(x, c)
    assert seen == [[True, False], [False, False]]
    # a product keeps each operand only for the other's gradient: under no_grad, neither
    w = tt.Tensor(randn(4, 3), requires_grad=True)
    kept = []
    keep = fused.Linear.keep

    def spy(self, a, b):
        keep(self, a, b)
        kept.append((self.x is not None, self.w is not None))
    monkeypatch.setattr(fused.Linear, "keep", spy)
    fused.Linear.apply(x[None], w)
    with tt.no_grad():
        y = fused.Linear.apply(x[None], w)
    assert kept == [(True, True), (False, False)]
    assert y._ctx is None and not y.requires_grad


def test_no_grad_inputs_get_no_gradient_and_constants_stay_leaves():
    a = tt.Tensor(randn(3), requires_grad=True)
    c = tt.Tensor(randn(3, seed=1))
    (a * c).sum().backward()
    assert c.grad is None and a.grad is not None
    d = a.detach()
    assert not d.requires_grad and d.data is a.data and d.is_leaf


def _live(cls):
    return sum(1 for o in gc.get_objects() if issubclass(type(o), cls))


def test_memory_flat_over_a_training_loop():
    tt.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 10))
    opt = tt.optim.AdamW(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 16)).astype(np.float32)
    y = rng.integers(0, 10, 64)
    history = []  # kept on purpose, as a careless loop would: the graphs must not come with them
    counts, mem = {}, {}
    gc.collect()
    tracemalloc.start()
    try:
        for it in range(100):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append(loss)
            if it in (9, 99):
                gc.collect()
                counts[it] = _live(Function)
                mem[it] = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert counts[9] == counts[99] == 0, f"live Functions after backward: {counts}"
    # one retained graph holds > 40 KB of activations (64 x 32 float32 arrays); 90 retained
    # losses without their graphs take ~ 20 KB
    growth = mem[99] - mem[9]
    print(f"memory growth over 90 iterations: {growth} bytes")
    assert growth < 100_000, f"memory grew by {growth} bytes over 90 iterations"
    assert history[-1].item() < history[0].item()      # and it trained


# ---------------------------------------------------------------- dtypes and conversions
def test_default_dtype_rules():
    arr32 = np.ones(3, dtype=np.float32)
    assert tt.Tensor(np.ones(3)).dtype == np.float64           # an ndarray keeps its dtype
    assert tt.Tensor(arr32).dtype == np.float32
    assert tt.Tensor(np.arange(3)).dtype == np.int64
    assert tt.Tensor([1, 2, 3]).dtype == np.int64              # Python data as torch infers it:
    assert tt.Tensor([1, 2.0]).dtype == np.float32             # a float makes the default float,
    assert tt.Tensor([True]).dtype == np.bool_                 # bools stay bool
    assert tt.Tensor(2.5).dtype == np.float32
    assert tt.tensor([[1.0, 2.0]]).dtype == np.float32
    x = tt.Tensor(arr32, requires_grad=True)
    for y in (x * 2.5, 2.5 * x, x + 1, x / 3, 1 - x, x ** 2, x * np.float64(2.0)):
        assert y.dtype == np.float32                           # a Python scalar does not promote
    (x * 2.5).sum().backward()
    assert x.grad.dtype == np.float32
    assert (x * tt.Tensor(np.ones(3))).dtype == np.float64    # two tensors promote like torch
    tt.set_default_dtype(np.float64)
    assert tt.get_default_dtype() == np.float64
    assert tt.Tensor([1.0]).dtype == np.float64
    assert nn.Linear(2, 3).weight.dtype == np.float64
    assert nn.Embedding(4, 2).weight.dtype == np.float64
    assert nn.LayerNorm(3).bias.dtype == np.float64
    assert tt.randn(2, 2).dtype == np.float64
    tt.set_default_dtype(np.float32)
    assert nn.Linear(2, 3).weight.dtype == np.float32
    with pytest.raises(ValueError, match="float"):
        tt.set_default_dtype(np.int32)
    with pytest.raises(TypeError, match="floating point"):
        tt.Tensor(np.arange(3), requires_grad=True)


def test_float32_gradients_stay_float32_through_a_float64_op():
    x = tt.Tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    (x.double() * tt.Tensor(np.full(3, 1.0 / 3.0))).sum().backward()
    assert x.grad.dtype == np.float32
    y = tt.Tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    (y * tt.Tensor(np.full(3, 1.0 / 3.0))).sum().backward()   # float32 * float64 -> float64 output
    assert y.grad.dtype == np.float32


def test_conversions(device):
    data = randn(2, 3)
    x = tt.Tensor(data, requires_grad=True).to(device)
    assert x.device.type == device and x.shape == (2, 3) and x.ndim == 2 and x.dtype == np.float64
    assert x.requires_grad
    n = x.numpy()
    assert isinstance(n, np.ndarray)
    np.testing.assert_array_equal(n, data)
    assert x.sum().item() == pytest.approx(data.sum(), rel=1e-15)
    assert isinstance(x.sum().item(), float)
    assert isinstance(x.sum().data, type(x.data))             # a full reduction keeps an array
    with pytest.raises(ValueError, match="one element"):
        x.item()
    d = x.detach()
    assert not d.requires_grad and d.data is x.data
    c = x.to("cpu")
    assert c.device.type == "cpu" and isinstance(c.data, np.ndarray)
    np.testing.assert_array_equal(c.numpy(), data)
    if device == "cpu":
        assert c is x                                          # already there: no copy
    with pytest.raises(ValueError, match="unknown device"):
        x.to("tpu")
    assert tt.Tensor(np.int64(3)).item() == 3
    assert repr(tt.Tensor(np.array([1.0, 2.0]), requires_grad=True)).startswith("tensor([1., 2.]")


def test_factories(device):
    tt.manual_seed(0)
    z, o = tt.zeros(2, 3, device=device), tt.ones((2, 3), dtype=np.float64)
    r = tt.randn(4, 5, requires_grad=True)
    assert z.shape == o.shape == (2, 3) and z.device.type == device
    assert z.dtype == np.float32 and o.dtype == np.float64 and r.dtype == np.float32 and r.requires_grad
    assert np.all(z.numpy() == 0) and np.all(o.numpy() == 1)
    assert abs(tt.randn(10_000).numpy().std() - 1) < 0.05
    np.testing.assert_array_equal(tt.arange(5).numpy(), np.arange(5))


def test_cuda_device_request():
    x = tt.Tensor(np.ones(2))
    if backend.cuda_available():
        assert x.to("cuda").device.type == "cuda" and x.to("cuda").to("cpu").device.type == "cpu"
    else:
        with pytest.raises(RuntimeError, match="no GPU is usable"):
            x.to("cuda")


def test_reference_torch_check_fails_on_a_wrong_gradient():
    # the helper is strict: a gradient off by 1e-9 relative fails in float64
    class Sloppy(Function):
        def forward(self, x):
            return x * 2.0

        def backward(self, gy):
            return gy * (2.0 + 1e-9)

    try:
        with pytest.raises(AssertionError, match="gradient of input 0"):
            check("sloppy", lambda a: Sloppy.apply(a), lambda a: a * 2.0, randn(3))
        with pytest.raises(AssertionError, match="relative error"):
            assert_close("sloppy", np.float32, np.ones(2) * (1 + 2e-5), torch.ones(2).numpy(), "output")
    finally:
        WORST.pop("sloppy", None)  # not an op family: keep it out of the report


# ---------------------------------------------------------------- in-place assignment
def test_setitem_outside_autograd_and_refused_inside():
    x = tt.zeros(2, 3)
    x[0, 1] = 5.0
    x[1] = tt.tensor([1.0, 2.0, 3.0])
    np.testing.assert_array_equal(x.numpy(), [[0, 5, 0], [1, 2, 3]])
    w = tt.Tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    with pytest.raises(RuntimeError, match="requires grad cannot be assigned"):
        w[0] = 2.0
    with pytest.raises(NotImplementedError, match="in-place autograd"):
        x[0] = w * 2


def test_several_output_function_gets_all_gradients_in_one_backward():
    x = tt.Tensor(np.arange(6.0).reshape(2, 3), requires_grad=True)
    a, b, c = x.split(1, dim=1)
    (a * 2 + c * 3).sum().backward()                   # b unused: its gradient is zero
    np.testing.assert_array_equal(x.grad, [[2, 0, 3], [2, 0, 3]])
    with pytest.raises(RuntimeError, match="freed"):
        (a * 2).sum().backward()


# ----- post-accumulate-grad hooks (torch's Tensor.register_post_accumulate_grad_hook) ----------

def _hooked_run(lib, make, steps=2):
    """A chain in which each op brings one new leaf (so the order of the hooks is unique), one
    leaf used three times and one never used; returns [(name, grad seen inside the hook)]."""
    rng = np.random.default_rng(0)
    values = {k: rng.standard_normal(s).astype(np.float32)
              for k, s in [("x", (4, 3)), ("w1", (3, 5)), ("b1", (5,)), ("w2", (5, 2)),
                           ("s", (2,)), ("unused", (3,))]}
    x = values.pop("x")
    x = tt.Tensor(x) if lib is tt else torch.tensor(x)  # a constant input: one leaf per op
    leaves = {k: make(v) for k, v in values.items()}
    seen, handles = [], {}
    for k, p in leaves.items():
        handles[k] = p.register_post_accumulate_grad_hook(
            lambda t, k=k: seen.append((k, np.array(t.grad.numpy() if lib is torch else t.grad))))
    for step in range(steps):
        if step == 1:
            handles["b1"].remove()
            handles["b1"].remove()  # twice is harmless, as torch
        h = ((x @ leaves["w1"]) + leaves["b1"]).tanh()
        h = (h @ leaves["w2"]) * leaves["s"]
        (h * leaves["s"] + leaves["s"]).sum().backward()  # s: three consumers, one hook call
    return seen


def test_post_accumulate_grad_hooks_match_torch():
    ours = _hooked_run(tt, lambda v: tt.Tensor(v, requires_grad=True))
    ref = _hooked_run(torch, lambda v: torch.tensor(v, requires_grad=True))
    assert [k for k, _ in ours] == [k for k, _ in ref] == \
        ["s", "w2", "b1", "w1", "s", "w2", "w1"]  # the second backward accumulates
    for (k, got), (_, want) in zip(ours, ref):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=k)


def test_post_accumulate_grad_hook_fires_during_backward_in_reverse_layer_order():
    """A leaf's hook runs as soon as its last consumer's backward has run, not after the whole
    walk: the last layer's parameters come first (what gradient bucketing overlaps with)."""
    tt.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(4)])
    params = list(model.parameters())
    events = []
    for i, p in enumerate(params):
        p.register_post_accumulate_grad_hook(lambda t, i=i: events.append(("hook", i)))

    class Probe(Function):  # records when backward passes the input of each layer
        def forward(self, x, name):
            self.name = name
            return x

        def backward(self, gy):
            events.append(("backward", self.name))
            return gy
    h = tt.Tensor(np.ones((2, 4), np.float32), requires_grad=True)  # so layer 0's probe records
    for k, layer in enumerate(model):
        h = layer(Probe.apply(h, name=k))
    h.sum().backward()
    for k in range(4):  # layer k's weight and bias are ready before backward reaches layer k-1
        before = events.index(("backward", k - 1)) if k else len(events)
        assert {("hook", 2 * k), ("hook", 2 * k + 1)} <= set(events[:before]), events


def test_post_accumulate_grad_hook_only_on_leaves_that_require_grad():
    x = tt.Tensor(np.ones(3, np.float32), requires_grad=True)
    with pytest.raises(RuntimeError, match="cannot be registered on non-leaf tensors"):
        (x * 2.0).register_post_accumulate_grad_hook(lambda t: None)
    with pytest.raises(RuntimeError, match="doesn't require gradient"):
        tt.Tensor(np.ones(3, np.float32)).register_post_accumulate_grad_hook(lambda t: None)
    with pytest.raises(RuntimeError, match="cannot be registered on non-leaf tensors"):
        (torch.ones(3, requires_grad=True) * 2).register_post_accumulate_grad_hook(lambda t: None)


def test_post_accumulate_grad_hook_sees_the_root_leaf_and_runs_without_grad():
    v = tt.Tensor(np.zeros(3, np.float32), requires_grad=True)
    modes = []

    def sgd(p):
        modes.append(tt.is_grad_enabled())
        p.data -= 0.01 * p.grad
    v.register_post_accumulate_grad_hook(sgd)
    v.backward(np.array([1.0, 2.0, 3.0], np.float32))
    np.testing.assert_allclose(v.data, [-0.01, -0.02, -0.03])  # torch's docstring example
    assert modes == [False]
