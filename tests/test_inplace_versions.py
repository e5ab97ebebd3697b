"""In-place writes and autograd, against torch: every tensor's version counter (x._version,
shared with its views), and backward's RuntimeError when an array it needs was written in place
after the forward pass kept it. Each scenario runs the same code in torch and in tinytensor."""
import numpy as np
import pytest
import torch

import tinytensor as tt
import tinytensor.nn.functional  # noqa: F401 - lib.nn.functional below
from tinytensor import backend


def as_numpy(x):
    if isinstance(x, torch.Tensor):
        return x.detach().numpy()
    return backend.to_numpy(x.data if isinstance(x, tt.Tensor) else x)


def outcome(scenario, lib):
    """('ok', the scenario's result as an array) or (the error's type name, its message up to
    torch's 'Hint:', which tinytensor's replaces with its own)."""
    try:
        result = scenario(lib)
    except Exception as e:  # noqa: BLE001 - the outcome compared with torch's
        return type(e).__name__, str(e).split(" Hint:")[0]
    return "ok", None if result is None else as_numpy(result)


def same_outcome(scenario):
    ours, theirs = outcome(scenario, tt), outcome(scenario, torch)
    assert ours[0] == theirs[0], f"tinytensor: {ours}, torch: {theirs}"
    if ours[0] == "ok":
        if theirs[1] is not None:
            np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-6)
    else:
        assert ours[1] == theirs[1]
    return ours


def leaf(lib, values, dtype=None):
    return lib.tensor(values, requires_grad=True, dtype=dtype)


# ---------------------------------------------------------------- backward raises, as torch
def setitem_into_saved(lib):  # the issue's example: w.grad was silently [100, 4]
    w, c = leaf(lib, [1., 2.]), lib.tensor([3., 4.])
    y = (w * c).sum()
    c[0] = 100
    y.backward()
    return w.grad


def add_into_saved(lib):
    w, c = leaf(lib, [1., 2.]), lib.tensor([3., 4.])
    y = (w * c).sum()
    c.add_(1)
    y.backward()


def two_writes(lib):
    w, c = leaf(lib, [1., 2.]), lib.tensor([3., 4.])
    y = (w * c).sum()
    c.mul_(2)
    c.sub_(1)
    y.backward()


def write_through_a_slice(lib):
    w, c = leaf(lib, [1., 2.]), lib.tensor([3., 4.])
    y = (w * c).sum()
    c[0:1].fill_(7)
    y.backward()


def write_through_reshape(lib):
    w, c = leaf(lib, [[1., 2.], [3., 4.]]), lib.tensor([[3., 4.], [5., 6.]])
    y = (w * c).sum()
    c.reshape(4).zero_()
    y.backward()


def write_through_transpose(lib):
    w, c = leaf(lib, [[1., 2.], [3., 4.]]), lib.tensor([[3., 4.], [5., 6.]])
    y = (w @ c).sum()
    c.t()[1, 0] = 9
    y.backward()


def write_through_detach(lib):
    w = leaf(lib, [1., 2.])
    y = (w * w).sum()
    w.detach()[0] = 5
    y.backward()


def write_through_split_piece(lib):
    w, c = leaf(lib, [1., 2.]), lib.tensor([3., 4., 5., 6.])
    a, b = c.split(2)
    y = (w * a).sum()
    b.add_(1)  # another view of the same data: the counter is shared, as in torch
    y.backward()


def saved_view_base_written(lib):
    w, c = leaf(lib, [1., 2.]), lib.tensor([[3., 4.], [5., 6.]])
    y = (w * c[0]).sum()
    c[1, 0] = 7
    y.backward()


def saved_0d_view(lib):
    w, c = leaf(lib, [1., 2.]), lib.tensor([3., 4.])
    y = (w * c[0]).sum()
    c[1] = 9
    y.backward()


def leaf_written_under_no_grad(lib):
    w = leaf(lib, [1., 2.])
    y = (w * w).sum()
    with lib.no_grad():
        w[0] = 5
    y.backward()


def saved_output_of_exp(lib):
    w = leaf(lib, [1., 2.])
    h = w.exp()
    y = (h * 2).sum()
    with lib.no_grad():
        h.add_(1)
    y.backward()


def saved_output_of_tanh(lib):
    w = leaf(lib, [1., 2.])
    h = w.tanh()
    y = h.sum()
    with lib.no_grad():
        h.mul_(2)
    y.backward()


def saved_output_of_softmax(lib):
    w = leaf(lib, [1., 2.])
    p = lib.nn.functional.softmax(w, 0)
    y = (p * lib.tensor([1., 3.])).sum()
    with lib.no_grad():
        p.mul_(2)
    y.backward()


def non_leaf_saved_by_a_later_op(lib):
    w = leaf(lib, [1., 2.])
    h = w * 2
    y = (h * h).sum()
    with lib.no_grad():
        h.add_(1)
    y.backward()


def float64_saved(lib):
    w, c = leaf(lib, [[1., 2., 3.]]), lib.tensor([[1., 1., 1.]], dtype=lib.float64)
    y = (w * c).sum()
    c.add_(1)
    y.backward()


def divisor_saved(lib):
    w, c = leaf(lib, [1., 2.]), lib.tensor([3., 4.])
    y = (w / c).sum()
    c.add_(1)
    y.backward()


def dividend_saved(lib):
    w, c = leaf(lib, [1., 2.]), lib.tensor([3., 4.])
    y = (c / w).sum()
    c.add_(1)
    y.backward()


def matmul_operand_saved(lib):
    w, x = leaf(lib, [[1., 2.], [3., 4.], [5., 6.]]), lib.tensor([[1., 0., 2.], [0., 1., 3.]])
    y = (x @ w).sum()
    x[0, 0] = 5
    y.backward()


RAISES = [setitem_into_saved, add_into_saved, two_writes, write_through_a_slice,
          write_through_reshape, write_through_transpose, write_through_detach,
          write_through_split_piece, saved_view_base_written, saved_0d_view,
          leaf_written_under_no_grad, saved_output_of_exp, saved_output_of_tanh,
          saved_output_of_softmax, non_leaf_saved_by_a_later_op, float64_saved, divisor_saved,
          dividend_saved, matmul_operand_saved]


@pytest.mark.parametrize("scenario", RAISES, ids=[f.__name__ for f in RAISES])
def test_backward_after_a_write_into_a_saved_tensor_raises_as_torch(scenario):
    kind, message = same_outcome(scenario)
    assert kind == "RuntimeError"
    with pytest.raises(RuntimeError) as e:
        scenario(tt)
    assert "\n" not in str(e.value) and "Hint: the backward of" in str(e.value)


def test_the_issue_example_in_full():
    with pytest.raises(RuntimeError, match=r"^one of the variables needed for gradient "
                       r"computation has been modified by an inplace operation: "
                       r"\[torch.FloatTensor \[2\]\] is at version 1; expected version 0 "
                       r"instead\. Hint: the backward of Mul reads it"):
        setitem_into_saved(tt)


# ---------------------------------------------------------------- the fused ops, both paths
def linear_input(lib):
    layer = lib.nn.Linear(2, 2)
    x = lib.tensor([[1., 2.], [3., 4.], [5., 6.]])
    y = layer(x).sum()
    x.mul_(2)
    y.backward()


def layer_norm_weight(lib):  # torch's LayerNorm weight is at version 1 after its init
    ln = lib.nn.LayerNorm(4)
    x = leaf(lib, [[1., 2., 3., 5.], [0., 1., 0., 2.]])
    y = (ln(x) * lib.tensor([1., 2., 3., 4.])).sum()
    with lib.no_grad():
        ln.weight.add_(1)
    y.backward()


def embedding_indices(lib):
    emb = lib.nn.Embedding(4, 2)
    i = lib.tensor([0, 1])
    y = emb(i).sum()
    i[0] = 2
    y.backward()


def cross_entropy_targets(lib):
    x = leaf(lib, [[1., 2., 3., 4.], [0., 1., 0., 2.], [3., 1., 2., 0.]])
    t = lib.tensor([0, 1, 2])
    loss = lib.nn.functional.cross_entropy(x, t)
    t[0] = 3
    loss.backward()
    return x.grad


def cross_entropy_probabilities(lib):
    x = leaf(lib, [[1., 2., 3., 4.], [0., 1., 0., 2.]])
    t = lib.tensor([[0.5, 0.5, 0., 0.], [0., 0., 0.25, 0.75]])
    loss = lib.nn.functional.cross_entropy(x, t)
    t.mul_(2)
    loss.backward()


def backward_after_an_optimizer_step(lib):
    lib.manual_seed(0)
    model = lib.nn.Sequential(lib.nn.Linear(3, 4), lib.nn.ReLU(), lib.nn.Linear(4, 2))
    opt = lib.optim.AdamW(model.parameters(), lr=0.1)
    loss = model(lib.tensor([[1., 2., 3.]])).sum()
    loss.backward()
    opt.step()
    loss = model(lib.tensor([[1., 2., 3.]])).sum()
    opt.step()  # the parameters the graph saved are written (version 3 -> 5)
    loss.backward()


FUSED = [linear_input, layer_norm_weight, embedding_indices, cross_entropy_probabilities]


@pytest.mark.parametrize("scenario", FUSED, ids=[f.__name__ for f in FUSED])
def test_fused_ops_raise_as_torch(scenario, accelerators):
    assert same_outcome(scenario)[0] == "RuntimeError"


def test_cross_entropy_raises_where_it_reads_the_targets_and_is_right_where_it_copied_them(
        accelerators):
    """torch saves the class indices; the compiled cross-entropy reads them in backward (and
    raises as torch), the reference keeps a copy (its gradient stays right, and it runs)."""
    kind, _ = outcome(cross_entropy_targets, tt)
    assert kind == ("RuntimeError" if accelerators == "on" else "ok")
    if kind == "ok":
        def unchanged(lib):
            x = leaf(lib, [[1., 2., 3., 4.], [0., 1., 0., 2.], [3., 1., 2., 0.]])
            lib.nn.functional.cross_entropy(x, lib.tensor([0, 1, 2])).backward()
            return x.grad

        np.testing.assert_allclose(cross_entropy_targets(tt), as_numpy(unchanged(torch)), rtol=1e-6)


def test_backward_after_an_optimizer_step_raises(accelerators):
    ours, theirs = outcome(backward_after_an_optimizer_step, tt), \
        outcome(backward_after_an_optimizer_step, torch)
    assert ours[0] == theirs[0] == "RuntimeError"
    for message in (ours[1], theirs[1]):  # torch names the transposed weight its addmm saved
        assert "is at version 5; expected version 3 instead" in message, message


# ---------------------------------------------------------------- backward runs, as torch
def unsaved_operand_written(lib):  # add keeps nothing
    w, c = leaf(lib, [1., 2.]), lib.tensor([3., 4.])
    y = (w + c).sum()
    c[0] = 100
    y.backward()
    return w.grad


def factor_not_needed_written(lib):  # torch keeps w only for c's gradient, which is not wanted
    w, c = leaf(lib, [1., 2.]), lib.tensor([3., 4.])
    y = (w * c).sum()
    with lib.no_grad():
        w.add_(1)
    y.backward()
    return w.grad


def dividend_not_needed_written(lib):
    w, c = leaf(lib, [1., 2.]), lib.tensor([3., 4.])
    y = (w / c).sum()
    with lib.no_grad():
        w.add_(1)
    y.backward()
    return w.grad


def matmul_weight_not_needed_written(lib):
    w, x = leaf(lib, [[1., 2.], [3., 4.], [5., 6.]]), lib.tensor([[1., 0., 2.], [0., 1., 3.]])
    y = (x @ w).sum()
    with lib.no_grad():
        w.mul_(2)
    y.backward()
    return w.grad


def linear_weight_not_needed_written(lib):  # one layer on an input that needs no gradient
    layer = lib.nn.Linear(2, 2)
    y = layer(lib.tensor([[1., 2.], [3., 4.]])).sum()
    with lib.no_grad():
        layer.weight.mul_(2)
    y.backward()
    return layer.bias.grad


def copy_of_saved_written(lib):  # an index array copies: the copy is saved, not c
    w, c = leaf(lib, [1., 2.]), lib.tensor([3., 4.])
    y = (w * c[[0, 1]]).sum()
    c[0] = 100
    y.backward()
    return w.grad


def written_between_graphs(lib):
    w, c = leaf(lib, [1., 2.]), lib.tensor([3., 4.])
    (w * c).sum().backward()
    c[0] = 100
    (w * c).sum().backward()
    return w.grad


def embedding_table_written(lib):  # the lookup keeps the indices, not the table
    emb = lib.nn.Embedding(4, 2)
    y = emb(lib.tensor([0, 1, 1])).sum()
    with lib.no_grad():
        emb.weight.mul_(2)
    y.backward()
    return emb.weight.grad


RUNS = [unsaved_operand_written, factor_not_needed_written, dividend_not_needed_written,
        matmul_weight_not_needed_written, linear_weight_not_needed_written,
        copy_of_saved_written, written_between_graphs, embedding_table_written]


@pytest.mark.parametrize("scenario", RUNS, ids=[f.__name__ for f in RUNS])
def test_writes_into_tensors_backward_does_not_read_are_fine_as_torch(scenario, accelerators):
    assert same_outcome(scenario)[0] == "ok"


# ---------------------------------------------------------------- the version numbers
def versions_of_in_place_ops(lib):
    x = lib.tensor([1., 2., 3., 4.])
    seen = [x._version]
    for write in (lambda: x.__setitem__(0, 5.), lambda: x.__setitem__(lib.tensor([0, 1]), 2.),
                  lambda: x.__setitem__(x > 2, 3.), lambda: x.add_(1), lambda: x.sub_(1),
                  lambda: x.mul_(2), lambda: x.div_(2), lambda: x.zero_(), lambda: x.fill_(2),
                  lambda: x.copy_(lib.tensor([1., 2., 3., 4.])), lambda: x.clamp_(0, 3),
                  lambda: x.masked_fill_(x > 2, 0.)):
        write()
        seen.append(x._version)
    v = x[1:3]
    v.add_(1)                               # a view shares the counter both ways
    r = x.reshape(2, 2)
    r[0, 0] = 1
    x.view(2, 2).t().zero_()
    a, b = x.chunk(2)
    b.add_(1)
    x.unsqueeze(0)[0, 1] = 4
    x.detach().add_(1)
    x[2].add_(1)                            # x[2] is a 0-d view, as in torch
    c = x[[0, 1]]                           # an index array copies: a counter of its own
    c.add_(1)
    e = x.expand(3, 4)
    seen += [x._version, v._version, r._version, a._version, b._version, c._version, e._version]
    return np.array(seen)


def test_versions_match_torch_over_a_sequence_of_writes():
    assert same_outcome(versions_of_in_place_ops)[0] == "ok"


def test_a_fresh_tensor_and_a_computed_one_are_at_version_0():
    x = tt.tensor([1., 2.], requires_grad=True)
    assert x._version == 0 and (x * 2)._version == 0 and x.exp()._version == 0


def test_writing_into_a_view_writes_into_the_base_as_torch():
    for lib in (tt, torch):
        c = lib.tensor([1., 2.])
        c[0].add_(1)
        c[1:].mul_(3)
        assert as_numpy(c).tolist() == [2., 6.], lib.__name__


def optimizer_versions(lib, name, **kwargs):
    lib.manual_seed(0)
    model = lib.nn.Linear(3, 2)
    opt = getattr(lib.optim, name)(model.parameters(), lr=0.1, **kwargs)
    seen = [model.weight._version]
    for _ in range(3):
        model(lib.tensor([[1., 2., 3.]])).sum().backward()
        opt.step()
        seen.append(model.weight._version)
    model.bias.grad = None  # a parameter without a gradient is not written
    model(lib.tensor([[1., 2., 3.]])).sum().backward()
    model.bias.grad = None
    opt.step()
    seen += [model.weight._version, model.bias._version]
    return np.array(seen)


@pytest.mark.parametrize("name, kwargs", [("AdamW", {}), ("AdamW", {"weight_decay": 0.0}),
                                          ("SGD", {}), ("SGD", {"momentum": 0.9})])
def test_optimizer_steps_count_as_torch_counts_them(name, kwargs):
    assert same_outcome(lambda lib: optimizer_versions(lib, name, **kwargs))[0] == "ok"


def init_and_load_versions(lib):
    seen = []
    for make in (lambda: lib.nn.Linear(2, 3).weight, lambda: lib.nn.Linear(2, 3).bias,
                 lambda: lib.nn.Embedding(3, 2).weight, lambda: lib.nn.LayerNorm(3).weight,
                 lambda: lib.nn.LayerNorm(3).bias, lambda: lib.nn.Parameter(lib.zeros(2))):
        seen.append(make()._version)
    init = lib.nn.init
    for fill in (init.uniform_, init.normal_, init.zeros_, init.ones_, init.eye_,
                 init.xavier_uniform_, init.xavier_normal_, init.kaiming_uniform_,
                 init.kaiming_normal_, init.trunc_normal_, lambda t: init.constant_(t, 2.0)):
        t = lib.zeros(3, 4)
        fill(t)
        seen.append(t._version)
    model = lib.nn.Linear(2, 3)
    model.load_state_dict(model.state_dict())
    seen += [model.weight._version, model.bias._version]
    return np.array(seen)


def test_initialisers_and_load_state_dict_count_as_torch_counts_them():
    assert same_outcome(init_and_load_versions)[0] == "ok"


def test_a_parameter_of_a_tensor_shares_its_counter():
    for lib in (tt, torch):
        t = lib.zeros(2)
        p = lib.nn.Parameter(t)
        t.add_(1)
        assert p._version == 1, lib.__name__


def test_version_is_read_only_as_torch():
    for lib in (tt, torch):
        with pytest.raises(AttributeError):
            lib.tensor([1.])._version = 3


def test_on_the_device_views_share_the_counter_and_backward_names_a_cuda_tensor(fake_cuda):
    w = tt.tensor([1., 2.], requires_grad=True).to("cuda")
    w = w.detach().requires_grad_()
    c = tt.tensor([[3., 4.], [5., 6.]]).to("cuda")
    y = (w * c[0]).sum()
    c.reshape(4)[3] = 0.0
    assert c._version == 1 and c[0]._version == 1
    with pytest.raises(RuntimeError, match=r"\[torch\.cuda\.FloatTensor \[2\]\] is at version 1; "
                                           r"expected version 0 instead"):
        y.backward()
