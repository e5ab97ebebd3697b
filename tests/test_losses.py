"""F.cross_entropy, F.nll_loss and F.one_hot against PyTorch (values, gradients, dtypes, error
types), float64 finite-difference gradient checks of every loss path, and the errors for what
is not supported.

torch is the specification: logits (C,), (N, C) or (N, C, d1, ...) with the classes in
dimension 1 -- so the lecture's (B, T, C) logits passed as they are mean N=B, C=T, d1=C, as in
torch -- integer class targets with ignore_index, class-probability targets of the input's
shape, label smoothing, and reductions 'mean' | 'sum' | 'none'.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import tinytensor as tt
import tinytensor.nn.functional as F
from tinytensor.gradcheck import gradcheck
from torch_helper import Const, check, dtypes, randn

# every test here runs with the accelerators off and on (conftest)
pytestmark = pytest.mark.usefixtures("accelerators")

INF = math.inf
REDUCTIONS = ("mean", "sum", "none")


def ints(*shape, high, seed=1):
    return np.random.default_rng(seed).integers(0, high, size=shape)


def ignoring(t, every=3, ignore_index=-100):
    """t with every `every`-th entry (in flat order) set to ignore_index."""
    t = t.copy()
    t.reshape(-1)[::every] = ignore_index
    return t


def probs(*shape, dim=1, seed=2):
    """Class probabilities: positive, summing to 1 over dim."""
    e = np.exp(randn(*shape, seed=seed))
    return e / e.sum(axis=dim, keepdims=True)


def unnormalised(*shape, seed=3):
    """Soft targets that do not sum to 1 (torch does not require it)."""
    return 0.1 + np.random.default_rng(seed).random(shape)


def ce(**kw):
    """The same cross_entropy call on both sides."""
    return (lambda a, t: F.cross_entropy(a, t, **kw)), (lambda a, t: TF.cross_entropy(a, t, **kw))


def nll(**kw):
    return (lambda a, t: F.nll_loss(a, t, **kw)), (lambda a, t: TF.nll_loss(a, t, **kw))


CASES = []


def add(family, fns, *inputs, note=""):
    ours, theirs = fns
    CASES.append(pytest.param(family, ours, theirs, inputs, id=f"{family}-{len(CASES)}{note}"))


# ---------------------------------------------------------------- cross_entropy, class indices
for red in REDUCTIONS:
    add("cross_entropy", ce(reduction=red), randn(6, 5), ints(6, high=5))
    add("cross_entropy", ce(reduction=red), randn(6, 5), ignoring(ints(6, high=5)))
    add("cross_entropy", ce(reduction=red, ignore_index=2), randn(6, 5), ints(6, high=5))
    add("cross_entropy", ce(reduction=red, label_smoothing=0.1), randn(6, 5), ints(6, high=5))
    add("cross_entropy", ce(reduction=red, label_smoothing=0.25), randn(6, 5), ignoring(ints(6, high=5)))
    add("cross_entropy", ce(reduction=red, label_smoothing=1.0), randn(4, 3), ints(4, high=3))
    add("cross_entropy", ce(reduction=red), randn(5), np.array(3), note="-unbatched")
    add("cross_entropy", ce(reduction=red, label_smoothing=0.2), randn(5), np.array(1), note="-unbatched")
    # (N, C, d1): the classes are dimension 1
    add("cross_entropy", ce(reduction=red), randn(2, 3, 4), ignoring(ints(2, 4, high=3), every=5))
    add("cross_entropy", ce(reduction=red, label_smoothing=0.3), randn(2, 3, 4),
        ignoring(ints(2, 4, high=3), every=4))
    # the lecture's (B, T, C) logits passed directly: torch reads N=B=2, C=T=4, d1=C=5, so the
    # targets have shape (B, C) with values below T
    add("cross_entropy", ce(reduction=red), randn(2, 4, 5), ints(2, 5, high=4), note="-BTC")
    # ... and the lecture's reshape to (B*T, C) with targets (B*T,)
    add("cross_entropy", (lambda a, t, r=red: F.cross_entropy(a.view(-1, 5), t.reshape(-1), reduction=r),
                          lambda a, t, r=red: TF.cross_entropy(a.view(-1, 5), t.reshape(-1), reduction=r)),
        randn(2, 4, 5), ints(2, 4, high=5), note="-BT_C")
    add("cross_entropy", ce(reduction=red, ignore_index=0, label_smoothing=0.1), randn(2, 3, 2, 3),
        ints(2, 2, 3, high=3), note="-4d")
    add("cross_entropy", ce(reduction=red), randn(2, 3, 2, 1, 2), ints(2, 2, 1, 2, high=3), note="-5d")
    # edges: a mean over no rows is nan (gradient 0); -inf logits in ignored rows give 0
    add("cross_entropy", ce(reduction=red), randn(3, 4), np.full(3, -100), note="-all_ignored")
    add("cross_entropy", ce(reduction=red, label_smoothing=0.1), randn(3, 4), np.full(3, -100),
        note="-all_ignored")
    add("cross_entropy", ce(reduction=red), randn(0, 4), np.zeros(0, dtype=np.int64), note="-empty")
    add("cross_entropy", ce(reduction=red), np.array([[-INF, 0.5, 1.0], [2.0, -INF, 0.0]]),
        np.array([-100, 0]), note="-inf")
add("cross_entropy", ce(), randn(4, 3) * 30, np.array([2, 0, 1, 1]), note="-large")
add("cross_entropy", ce(label_smoothing=-0.5), randn(4, 3), np.array([2, 0, 1, 1]), note="-negative_ls")

# ---------------------------------------------------------------- cross_entropy, class probabilities
for red in REDUCTIONS:
    add("cross_entropy", ce(reduction=red), randn(4, 5), Const(probs(4, 5)), note="-probs")
    add("cross_entropy", ce(reduction=red), randn(4, 5), probs(4, 5), note="-probs_grad")
    add("cross_entropy", ce(reduction=red, label_smoothing=0.2), randn(4, 5), unnormalised(4, 5),
        note="-probs_grad")
    add("cross_entropy", ce(reduction=red), randn(2, 3, 4), probs(2, 3, 4), note="-probs_3d")
    add("cross_entropy", ce(reduction=red, label_smoothing=0.1), randn(2, 3, 2, 2),
        Const(probs(2, 3, 2, 2)), note="-probs_4d")
    add("cross_entropy", ce(reduction=red, label_smoothing=0.4), randn(5), probs(5, dim=0),
        note="-probs_unbatched")
    add("cross_entropy", ce(reduction=red), randn(0, 3), probs(0, 3), note="-probs_empty")
add("cross_entropy", ce(ignore_index=-1), randn(3, 4), probs(3, 4), note="-probs_neg_ignore")

# ---------------------------------------------------------------- nll_loss
for red in REDUCTIONS:
    add("nll_loss", nll(reduction=red), randn(6, 5), ints(6, high=5))
    add("nll_loss", nll(reduction=red), randn(6, 5), ignoring(ints(6, high=5)))
    add("nll_loss", nll(reduction=red, ignore_index=1), randn(6, 5), ints(6, high=5))
    add("nll_loss", nll(reduction=red), randn(2, 3, 4), ignoring(ints(2, 4, high=3), every=3))
    add("nll_loss", nll(reduction=red), randn(2, 3, 2, 2), ints(2, 2, 2, high=3), note="-4d")
    add("nll_loss", nll(reduction=red), randn(5), np.array(4), note="-unbatched")
    add("nll_loss", nll(reduction=red), randn(3, 4), np.full(3, -100), note="-all_ignored")
    add("nll_loss", nll(reduction=red), np.array([[-INF, 0.5], [-0.1, -INF]]), np.array([-100, 0]),
        note="-inf")
add("nll_loss", (lambda a, t: F.nll_loss(F.log_softmax(a, 1), t),
                 lambda a, t: TF.nll_loss(TF.log_softmax(a, 1), t)),
    randn(2, 3, 4), ints(2, 4, high=3), note="-log_softmax")


@dtypes
@pytest.mark.parametrize("family, ours, theirs, inputs", CASES)
def test_loss_against_torch(family, ours, theirs, inputs, device, dtype):
    check(family, ours, theirs, *inputs, dtype=dtype, device=device)


@dtypes
def test_probability_targets_promote_like_torch(dtype):
    """Logits and probability targets of different float dtypes give the wider one, as in torch."""
    other = np.float64 if dtype == np.float32 else np.float32
    x, q = randn(3, 4).astype(dtype), probs(3, 4).astype(other)
    out = F.cross_entropy(tt.Tensor(x, requires_grad=True), q)
    ref = TF.cross_entropy(torch.from_numpy(x), torch.from_numpy(q))
    assert out.dtype == np.float64 and ref.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-6)


def test_fused_cross_entropy_equals_the_composition():
    """The fused op against the composed formula it replaces (torch's definition)."""
    x = randn(2, 3, 4)
    t = ignoring(ints(2, 4, high=3), every=3)
    logp = F.log_softmax(tt.Tensor(x), 1)
    for eps in (0.0, 0.3):
        fused = F.cross_entropy(tt.Tensor(x), t, label_smoothing=eps, reduction="none").numpy()
        smooth = -logp.numpy().mean(axis=1) * (t != -100)
        composed = (1 - eps) * F.nll_loss(logp, t, reduction="none").numpy() + eps * smooth
        np.testing.assert_allclose(fused, composed, rtol=1e-13, atol=1e-15)
    q = probs(2, 3, 4)
    np.testing.assert_allclose(F.cross_entropy(tt.Tensor(x), q).numpy(),
                               -(q * logp.numpy()).sum(axis=1).mean(), rtol=1e-13)


@dtypes
@pytest.mark.parametrize("red", REDUCTIONS)
def test_unbatched_input_with_a_1_element_target(device, dtype, red):
    """torch takes a (1,) target for unbatched (C,) input in the forward pass, but its backward
    fails ("size mismatch (got input: [5], target: [1])"), and with label smoothing so does its
    forward. Here a (1,) target means what the 0-d target means: values against torch's
    forward, gradients against torch's with the 0-d target."""
    check("cross_entropy", ce(reduction=red)[0], ce(reduction=red)[1], randn(5), np.array([1]),
          dtype=dtype, device=device, grad=False)
    check("nll_loss", nll(reduction=red)[0], nll(reduction=red)[1], randn(5), np.array([0]),
          dtype=dtype, device=device, grad=False)
    for ls in (0.0, 0.2):
        check("cross_entropy", lambda a: F.cross_entropy(a, np.array([1]), reduction=red, label_smoothing=ls),
              lambda a: TF.cross_entropy(a, torch.tensor(1), reduction=red, label_smoothing=ls),
              randn(5), dtype=dtype, device=device)
    check("nll_loss", lambda a: F.nll_loss(a, np.array([2]), reduction=red),
          lambda a: TF.nll_loss(a, torch.tensor(2), reduction=red), randn(5), dtype=dtype, device=device)


def test_targets_as_tensors_and_lists():
    x = randn(3, 4)
    ref = TF.cross_entropy(torch.from_numpy(x), torch.tensor([0, 3, 1])).item()
    for t in (tt.Tensor(np.array([0, 3, 1])), [0, 3, 1]):
        assert F.cross_entropy(tt.Tensor(x), t).item() == pytest.approx(ref, rel=1e-12)
    q = probs(3, 4)
    out = F.cross_entropy(tt.Tensor(x), q.tolist())            # Python floats: the default dtype
    assert out.dtype == np.float64
    assert out.item() == pytest.approx(TF.cross_entropy(torch.from_numpy(x), torch.from_numpy(q)).item(),
                                       rel=1e-6)


# ---------------------------------------------------------------- one_hot
ONE_HOT = [
    (np.array([0, 2, 1, 2]), -1),
    (np.array([0, 2, 1]), 5),
    (np.array([[0, 3], [2, 0], [1, 1]]), -1),
    (np.array(2), 4),                                # 0-d: shape (num_classes,)
    (np.zeros(0, dtype=np.int64), 3),                # empty with num_classes given
    (np.zeros((2, 0), dtype=np.int64), 1),
]


@pytest.mark.parametrize("idx, num_classes", ONE_HOT)
def test_one_hot_matches_torch(idx, num_classes, device):
    ours = F.one_hot(tt.Tensor(idx).to(device), num_classes)
    ref = TF.one_hot(torch.from_numpy(idx), num_classes)
    assert isinstance(ours, tt.Tensor) and ours.device.type == device and not ours.requires_grad
    assert ours.dtype == np.int64 and ref.dtype == torch.int64
    assert ours.shape == tuple(ref.shape)
    np.testing.assert_array_equal(ours.numpy(), ref.numpy())
    np.testing.assert_array_equal(F.one_hot(idx, num_classes).numpy(), ref.numpy())      # an ndarray
    np.testing.assert_array_equal(F.one_hot(idx.tolist(), num_classes).numpy(), ref.numpy())  # a list


@dtypes
def test_one_hot_as_a_mask_against_torch(device, dtype):
    """one_hot cast to the logits' dtype picks each row's target log-probability."""
    t = ints(2, 3, high=5)
    check("one_hot",
          lambda a, i: -(F.log_softmax(a, -1) * F.one_hot(i, 5).astype(a.dtype)).sum(-1),
          lambda a, i: -(TF.log_softmax(a, -1) * TF.one_hot(i, 5).to(a.dtype)).sum(-1),
          randn(2, 3, 5), t, dtype=dtype, device=device)


# ---------------------------------------------------------------- float64 finite differences
GRADCHECKS = {
    **{f"ce_{red}": (lambda a, t, r=red: F.cross_entropy(a, t, reduction=r), randn(4, 3),
                     np.array([0, 2, 1, 2])) for red in REDUCTIONS},
    **{f"ce_3d_{red}": (lambda a, t, r=red: F.cross_entropy(a, t, reduction=r), randn(2, 3, 4),
                        ignoring(ints(2, 4, high=3), every=3)) for red in REDUCTIONS},
    **{f"ce_4d_{red}": (lambda a, t, r=red: F.cross_entropy(a, t, reduction=r, label_smoothing=0.2),
                        randn(2, 3, 2, 2), ints(2, 2, 2, high=3)) for red in REDUCTIONS},
    **{f"ce_smoothing_{red}": (lambda a, t, r=red: F.cross_entropy(a, t, reduction=r, label_smoothing=0.3),
                               randn(5, 4), ignoring(ints(5, high=4))) for red in REDUCTIONS},
    **{f"ce_ignore_index_{red}": (lambda a, t, r=red: F.cross_entropy(a, t, reduction=r, ignore_index=1),
                                  randn(5, 4), ints(5, high=4)) for red in REDUCTIONS},
    **{f"ce_probs_{red}": (lambda a, q, r=red: F.cross_entropy(a, q, reduction=r), randn(3, 4),
                           probs(3, 4)) for red in REDUCTIONS},
    **{f"ce_probs_smoothing_{red}": (lambda a, q, r=red: F.cross_entropy(a, q, reduction=r,
                                                                         label_smoothing=0.2),
                                     randn(2, 3, 2), unnormalised(2, 3, 2)) for red in REDUCTIONS},
    "ce_unbatched": (lambda a, t: F.cross_entropy(a, t, reduction="none", label_smoothing=0.1), randn(4),
                     np.array(2)),
    "ce_unbatched_probs": (lambda a, q: F.cross_entropy(a, q, reduction="none"), randn(4), probs(4, dim=0)),
    "ce_all_ignored": (lambda a, t: F.cross_entropy(a, t).masked_fill(np.array(True), 0.0), randn(3, 4),
                       np.full(3, -100)),
    **{f"nll_{red}": (lambda a, t, r=red: F.nll_loss(a, t, reduction=r), randn(5, 4),
                      ignoring(ints(5, high=4))) for red in REDUCTIONS},
    **{f"nll_3d_{red}": (lambda a, t, r=red: F.nll_loss(a, t, reduction=r, ignore_index=0), randn(2, 3, 4),
                         ints(2, 4, high=3)) for red in REDUCTIONS},
    "nll_unbatched": (lambda a, t: F.nll_loss(a, t), randn(4), np.array(3)),
    "nll_log_softmax": (lambda a, t: F.nll_loss(F.log_softmax(a, 1), t), randn(2, 3, 4), ints(2, 4, high=3)),
}


@pytest.mark.parametrize("name", list(GRADCHECKS))
def test_loss_gradcheck(name, device):
    fn, *inputs = GRADCHECKS[name]
    gradcheck(fn, *inputs, atol=1e-7, rtol=1e-6, device=device)


def test_mean_over_no_rows_is_nan_with_zero_gradient():
    for loss_fn in (F.cross_entropy, F.nll_loss):
        x = tt.Tensor(randn(3, 4), requires_grad=True)
        loss = loss_fn(x, np.full(3, -100))
        assert math.isnan(loss.item())
        loss.backward()
        np.testing.assert_array_equal(x.grad, 0.0)


# ---------------------------------------------------------------- errors: torch's types, clear words
X = randn(3, 4)
# (call, exception type, message pattern); each raises the same type in torch
SAME_AS_TORCH = [
    ("ce", (X, np.array([0, 1])), {}, ValueError,
     r"targets must have shape \(3,\).*got \(2,\).*batch size 2 != 3"),
    ("ce", (X, np.array(1)), {}, ValueError, r"batch size 0 != 3"),
    ("ce", (X, np.array([[0, 1, 1]])), {}, ValueError, r"batch size 1 != 3"),
    ("ce", (X, np.zeros((3, 2), dtype=np.int64)), {}, RuntimeError, r"must have shape \(3,\) .*\(3, 4\)"),
    ("ce", (X, np.zeros((3, 5))), {}, RuntimeError, r"got \(3, 5\)"),     # float targets, wrong shape
    ("ce", (X, np.zeros((4, 4))), {}, ValueError, r"batch size 4 != 3"),
    ("ce", (X, np.array([0.0, 1.0, 1.0])), {}, RuntimeError, "must be integers, got dtype float64"),
    ("ce", (X, np.array([True, False, True])), {}, RuntimeError, "must be integers, got dtype bool"),
    ("ce", (X, np.zeros((3, 4), dtype=np.int64)), {}, RuntimeError,
     r"targets of the input's shape \(3, 4\) are class probabilities and must be floating point"),
    ("ce", (X, probs(3, 4)), {"ignore_index": 1}, RuntimeError, "ignore_index=1 is not supported"),
    ("ce", (X, np.array([0, 4, 1])), {}, IndexError, r"target 4 is out of range.*\[0, 4\)"),
    ("ce", (X, np.array([0, -1, 1])), {}, IndexError, "target -1 is out of range"),
    ("ce", (X, np.array([0, 4, 1])), {"label_smoothing": 0.1}, IndexError, "target 4 is out of range"),
    ("ce", (X, np.array([0, 1, 1])), {"ignore_index": 1, "reduction": "avg"}, ValueError,
     "reduction must be 'mean', 'sum' or 'none', got 'avg'"),
    ("ce", (X, np.array([0, 1, 1])), {"label_smoothing": 1.5}, RuntimeError,
     "label_smoothing must be between 0.0 and 1.0, got 1.5"),
    ("ce", (X, probs(3, 4)), {"label_smoothing": 1.5}, RuntimeError, "label_smoothing must be between"),
    ("ce", (randn(2, 3, 4), np.zeros((2, 3), dtype=np.int64)), {}, RuntimeError,
     r"must have shape \(2, 4\).*got \(2, 3\)"),                          # the lecture's (B, T) targets
    ("ce", (randn(2, 3, 4), np.zeros((3, 4), dtype=np.int64)), {}, ValueError, "batch size 3 != 2"),
    ("ce", (randn(2, 3, 4), np.full((2, 4), 3)), {}, IndexError, r"target 3 is out of range.*\[0, 3\)"),
    ("ce", (randn(2, 3, 4, 5), np.zeros((2, 4), dtype=np.int64)), {}, RuntimeError,
     r"must have shape \(2, 4, 5\)"),
    ("ce", (randn(5), np.array([1, 2])), {}, ValueError, "unbatched input takes one target"),
    ("ce", (randn(5), np.array([[1]])), {}, RuntimeError, r"must have shape \(\)"),
    ("ce", (randn(5), np.array(5)), {}, IndexError, "target 5 is out of range"),
    ("ce", (np.ones((3, 4), dtype=np.int64), np.array([0, 1, 1])), {}, NotImplementedError,
     "needs floating point logits, got dtype int64"),
    ("nll", (X, np.array([0, 1])), {}, ValueError, r"nll_loss targets must have shape \(3,\)"),
    ("nll", (X, probs(3, 4)), {}, RuntimeError,
     r"nll_loss targets must have shape \(3,\) \(class indices\) for"),
    ("nll", (X, np.array([0.0, 1.0, 1.0])), {}, RuntimeError,
     "nll_loss class-index targets must be integers"),
    ("nll", (X, np.array([0, 4, 1])), {}, IndexError, "nll_loss target 4 is out of range"),
    ("nll", (randn(2, 3, 4), np.zeros((2, 5), dtype=np.int64)), {}, RuntimeError, r"got \(2, 5\)"),
    ("nll", (X, np.array([0, 1, 1])), {"reduction": "avg"}, ValueError, "reduction must be"),
    ("nll", (np.array(1.0), np.array(0)), {}, ValueError, "got a 0-d tensor"),
    ("nll", (randn(5), np.array([1, 2])), {}, ValueError, "unbatched input takes one target"),
    ("nll", (np.ones((3, 4), dtype=np.int64), np.array([0, 1, 1])), {}, NotImplementedError,
     "floating point log-probabilities"),
    ("one_hot", (np.array([0, -1]),), {}, RuntimeError, "non-negative, got -1"),
    ("one_hot", (np.array([0, 3]),), {"num_classes": 3}, RuntimeError, "smaller than num_classes=3, got 3"),
    ("one_hot", (np.array([0, 3]),), {"num_classes": 0}, RuntimeError, "smaller than num_classes=0"),
    ("one_hot", (np.zeros(0, dtype=np.int64),), {}, RuntimeError, "cannot infer the number of classes"),
]


def _call(lib, name, args, kwargs):
    if lib == "torch":
        args = [torch.from_numpy(a) if isinstance(a, np.ndarray) else a for a in args]
        fn = {"ce": TF.cross_entropy, "nll": TF.nll_loss, "one_hot": TF.one_hot}[name]
    else:
        args = [tt.Tensor(a) if isinstance(a, np.ndarray) and i == 0 and name != "one_hot" else a
                for i, a in enumerate(args)]
        fn = {"ce": F.cross_entropy, "nll": F.nll_loss, "one_hot": F.one_hot}[name]
    return fn(*args, **kwargs)


@pytest.mark.parametrize("name, args, kwargs, exc, match", SAME_AS_TORCH,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(SAME_AS_TORCH)])
def test_bad_input_raises_torchs_error_type(name, args, kwargs, exc, match):
    with pytest.raises(exc):
        _call("torch", name, args, kwargs)
    with pytest.raises(exc, match=match):
        _call("tinytensor", name, args, kwargs)


def test_unsupported_arguments():
    x, t = tt.Tensor(X, requires_grad=True), np.array([0, 1, 1])
    for loss_fn in (F.cross_entropy, F.nll_loss):
        with pytest.raises(NotImplementedError, match=r"weight= is not supported.*pass weight=None"):
            loss_fn(x, t, weight=np.ones(4))
        with pytest.raises(NotImplementedError, match=r"size_average= is not supported.*use reduction="):
            loss_fn(x, t, size_average=False)
        with pytest.raises(NotImplementedError, match=r"reduce= is not supported.*use reduction="):
            loss_fn(x, t, reduce=False)
    with pytest.raises(ValueError, match="got a 0-d tensor"):
        F.cross_entropy(tt.Tensor(np.array(1.0)), np.array(0))    # torch: an IndexError or RuntimeError


def test_one_hot_needs_integers():
    """torch raises a RuntimeError for any non-int64 index tensor; here integers of any width
    are fine and anything else is a TypeError."""
    for bad in (np.array([0.0, 1.0]), np.array([True]), tt.Tensor(np.array([1.0]))):
        with pytest.raises(TypeError, match="one_hot needs integer class indices, got dtype"):
            F.one_hot(bad)
    np.testing.assert_array_equal(F.one_hot(np.array([2, 0], dtype=np.int32)).numpy(), [[0, 0, 1], [1, 0, 0]])
