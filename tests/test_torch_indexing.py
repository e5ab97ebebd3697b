"""Indexing, assignment, and the logical and bitwise ops, against PyTorch.

Most cases are written once as `lambda m, ...` and run with m = tinytensor and m = torch: the
same source text gives the same values, dtypes, shapes and errors in both libraries (reads also
the same float gradients, through torch_helper.check), as it does for a reader typing torch code
into tinytensor.
"""
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes

import tinytensor as tt
import tinytensor.nn.functional as F
from torch_helper import check, dtypes, randn

INT_DTYPES = ["int8", "uint8", "int32", "int64"]


def _name(dtype):
    return str(dtype).replace("torch.", "")


def outcome(fn, m):
    """fn(m) as (dtype name, shape, values), or the type of the exception it raises."""
    try:
        r = fn(m)
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        return type(e)
    return _name(r.dtype), tuple(r.shape), r.tolist()


def same_outcome(fn):
    ours, ref = outcome(fn, tt), outcome(fn, torch)
    assert ours == ref, f"tinytensor: {ours}\ntorch:      {ref}"
    return ref


def same_error(fn, match):
    """fn(torch) raises; fn(tt) raises the same exception type, with `match` in its message."""
    with pytest.raises(Exception) as theirs:
        fn(torch)
    with pytest.raises(theirs.type, match=match):
        fn(tt)


# ---------------------------------------------------------------- reads: values, shapes, gradients
# (shape of x, x -> x[...]): every kind of item, alone and mixed, as torch places their dims
READS = {
    "tinygrad_tuple": ((2, 3, 4), lambda m, x: x[1, :, (2, 1)]),       # (3, 2): the int first
    "int_then_list": ((2, 3, 4), lambda m, x: x[1, :, [2, 1]]),
    "int_list_int": ((2, 3, 4), lambda m, x: x[1, [0, 2, 2], 3]),
    "list_int_apart": ((2, 3, 4), lambda m, x: x[[1, 0], :, 3]),
    "list_first": ((2, 3, 4), lambda m, x: x[[1, 0]]),
    "repeats": ((2, 3, 4), lambda m, x: x[[0, 0, 1, 1, 1]]),
    "repeats_pair": ((2, 3, 4), lambda m, x: x[[1, 1], [2, 2]]),
    "nested_list": ((2, 3, 4), lambda m, x: x[:, [[0, 1], [2, 2]]]),
    "tuples_as_arrays": ((2, 3, 4), lambda m, x: x[(0, 1), (2, 2)]),
    "tuple_in_tuple": ((2, 3, 4), lambda m, x: x[(1, 0),]),
    "negative_ints": ((2, 3, 4), lambda m, x: x[-1, -2]),
    "negative_array": ((2, 3, 4), lambda m, x: x[:, [-1, -3, 0]]),
    "negative_both": ((2, 3, 4), lambda m, x: x[-1, ..., [-4, 1, 1]]),
    "none": ((2, 3, 4), lambda m, x: x[None, 1, None]),
    "none_and_arrays": ((2, 3, 4), lambda m, x: x[[0, 1], None, [0, 1]]),
    "int_array_none_array": ((2, 3, 4), lambda m, x: x[0, [0, 1], None, [0, 1]]),
    "ellipsis": ((2, 3, 4), lambda m, x: x[..., 2]),
    "ellipsis_array_int": ((2, 3, 4), lambda m, x: x[..., [0, 1], 1]),
    "int_ellipsis_array": ((2, 3, 4), lambda m, x: x[0, ..., [1, 2]]),
    "arrays_around_ellipsis": ((2, 3, 4), lambda m, x: x[[0, 1], ..., [0, 1]]),
    "steps": ((2, 3, 4), lambda m, x: x[::2, 1::2, ::3]),
    "steps_and_array": ((2, 3, 4), lambda m, x: x[:, ::2, [3, 0, 3]]),
    "array_then_slice": ((2, 3, 4), lambda m, x: x[[1, 0], :, 1:3]),
    "arrays_apart": ((2, 3, 4), lambda m, x: x[[1, 0], :, [3, 2]]),
    "arrays_adjacent": ((2, 3, 4), lambda m, x: x[:, [2, 0], [3, 3]]),
    "arrays_broadcast": ((2, 3, 4), lambda m, x: x[[[0], [1]], :, [0, 1, 2]]),
    "int_2d_array": ((2, 3, 4), lambda m, x: x[1, m.tensor([[0, 1], [1, 2]])]),
    "slice_2d_array": ((2, 3, 4), lambda m, x: x[:, 1:, m.tensor([[0, 1], [1, 2]])]),
    "tensor_int64": ((2, 3, 4), lambda m, x: x[m.tensor([1, 0, 1])]),
    "tensor_int32": ((2, 3, 4), lambda m, x: x[:, m.tensor([2, 0], dtype=m.int32)]),
    "tensor_0d_as_int": ((2, 3, 4), lambda m, x: x[m.tensor(1), :, [0, 1]]),
    "tensors_in_list": ((2, 3, 4), lambda m, x: x[:, [m.tensor(0), m.tensor(2)]]),
    "tensors_nested": ((2, 3, 4), lambda m, x: x[:, [[0, 1], [m.tensor(2), 0]]]),
    "mask_full": ((2, 3, 4), lambda m, x: x[x > 0]),
    "mask_leading": ((2, 3, 4), lambda m, x: x[m.tensor([[True, False, True], [False, True, True]])]),
    "mask_middle": ((2, 3, 4), lambda m, x: x[:, m.tensor([True, False, True])]),
    "mask_list": ((2, 3, 4), lambda m, x: x[[True, False]]),
    "mask_list_middle_int": ((2, 3, 4), lambda m, x: x[:, [True, False, True], 1]),
    "int_mask_list": ((2, 3, 4), lambda m, x: x[1, [True, False, True]]),
    "masks_apart": ((2, 3, 4), lambda m, x: x[[True, False], :, [True, False, True, True]]),
    "mask_of_a_row": ((2, 3, 4), lambda m, x: x[0][x[0] > 0]),
    "mask_all_false": ((2, 3, 4), lambda m, x: x[m.zeros(2, 3, dtype=m.bool)]),
    "python_true": ((2, 3, 4), lambda m, x: x[True]),
    "python_false": ((2, 3, 4), lambda m, x: x[False]),
    "int_true": ((2, 3, 4), lambda m, x: x[1, True]),
    "true_array": ((2, 3, 4), lambda m, x: x[True, [0, 1]]),
    "bool_0d_tensor": ((2, 3, 4), lambda m, x: x[:, m.tensor(True)]),
    "bools_and_ints_list": ((2, 3, 4), lambda m, x: x[:, [True, 1]]),  # ints, as in torch
    "float_list": ((2, 3, 4), lambda m, x: x[[1.7, 0.2]]),           # truncated, as in torch
    "empty_list": ((2, 3, 4), lambda m, x: x[[]]),
    "int_empty_list": ((2, 3, 4), lambda m, x: x[0, []]),
    "empty_tuple": ((2, 3, 4), lambda m, x: x[()]),
    "last_position": ((2, 3, 4), lambda m, x: x[:, [-1], :]),
    "last_position_int": ((2, 3, 4), lambda m, x: x[:, -1, :]),
    "topk_threshold": ((4, 5), lambda m, x: x[:, [-1]]),
    "rows_1d": ((5,), lambda m, x: x[[2, 2, 0, -1]]),
    "mask_1d": ((5,), lambda m, x: x[x < 0.5]),
    "scalar_none": ((), lambda m, x: x[None]),
    "scalar_ellipsis": ((), lambda m, x: x[...]),
    "scalar_true": ((), lambda m, x: x[True]),
    "scalar_empty": ((), lambda m, x: x[()]),
    "4d_mixed": ((2, 3, 4, 5), lambda m, x: x[1, [0, 2], :, [[4], [0]]]),
    "4d_mask_ellipsis": ((2, 3, 4, 5), lambda m, x: x[m.tensor([True, False]), ..., [1, 3]]),
}


@dtypes
@pytest.mark.parametrize("name", list(READS))
def test_reads_and_their_gradients_as_torch(name, dtype, device):
    shape, fn = READS[name]
    check("index", lambda a: fn(tt, a), lambda a: fn(torch, a), np.asarray(randn(*shape)),
          dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", ["bool", "int8", "uint8", "int32", "int64", "float16"])
@pytest.mark.parametrize("name", ["tinygrad_tuple", "arrays_apart", "mask_leading", "python_true",
                                  "negative_both", "int_2d_array"])
def test_reads_keep_the_dtype(name, dtype):
    shape, fn = READS[name]
    same_outcome(lambda m: fn(m, m.arange(24).reshape(shape).to(getattr(m, dtype))))


def test_a_list_holding_sequences_is_read_as_a_tuple_with_torchs_warning():
    for idx in ([[0, 1], [1, 0]], [0, slice(None)], [[1], [0]], [None, 1]):
        with pytest.warns(UserWarning, match="non-tuple sequence"):
            ref = torch.arange(24).reshape(2, 3, 4)[idx]
        with pytest.warns(UserWarning, match="non-tuple sequence"):
            ours = tt.arange(24).reshape(2, 3, 4)[idx]
        assert ours.tolist() == ref.tolist()


def test_numpy_arrays_index_as_lists_and_uint8_masks_warn():
    x = np.arange(24).reshape(2, 3, 4)
    for idx in (np.array([1, 0]), np.array([1, 0], dtype=np.int8), np.array([1.7, 0.0]),
                np.array(1), np.array([[True, False, True]] * 2), np.int64(1)):
        same_outcome(lambda m: m.tensor(x)[idx])
    for m in (tt, torch):
        with pytest.warns(UserWarning, match="uint8"):
            m.tensor(x)[m.tensor([1, 0], dtype=m.uint8)]


def test_no_warnings_from_plain_reads():
    x = tt.arange(24).reshape(2, 3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x[1, :, (2, 1)], x[x > 3], x[[0, 1]], x[:, [-1]]


# ---------------------------------------------------------------- reads: random index tuples
SETTINGS = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def _dim_item(draw, n, list_len):
    """An item for one dim of size n: an int, a slice, a list or tuple of ints, a bool mask."""
    kind = draw(st.sampled_from(["int", "slice", "list", "tuple", "mask"]))
    if kind == "int":
        return draw(st.integers(-n, n - 1))
    if kind == "slice":
        ends = st.none() | st.integers(-n - 1, n + 1)
        return slice(draw(ends), draw(ends), draw(st.none() | st.integers(1, 3)))
    if kind == "mask":
        return draw(st.lists(st.booleans(), min_size=n, max_size=n))
    ints = draw(st.lists(st.integers(-n, n - 1), min_size=list_len, max_size=list_len))
    return ints if kind == "list" else tuple(ints)


@st.composite
def index_tuples(draw):
    """(shape, index): an item per dim, then maybe the last dims left out or a run of dims as
    ..., and Nones put in."""
    shape = draw(array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=4))
    list_len = draw(st.integers(1, 3))  # one length for all the lists: they broadcast
    items = [_dim_item(draw, n, list_len) for n in shape]
    start = draw(st.integers(0, len(items)))
    if draw(st.booleans()):
        items[start:start + draw(st.integers(0, len(items) - start))] = [Ellipsis]
    else:
        items = items[:start]
    for _ in range(draw(st.integers(0, 2))):
        items.insert(draw(st.integers(0, len(items))), None)
    return shape, tuple(items)


@SETTINGS
@given(case=index_tuples(), seed=st.integers(0, 2**32 - 1))
def test_random_index_tuples_read_as_torch(case, seed, device):
    shape, idx = case
    x = np.random.default_rng(seed).standard_normal(shape)
    try:
        torch.from_numpy(x)[idx]
    except Exception as e:  # noqa: BLE001 - ours must raise the same type (masks that do not broadcast)
        with pytest.raises(type(e)):
            tt.tensor(x).to(device)[idx]
        return
    check("index", lambda a: a[idx], lambda a: a[idx], x, device=device)


# ---------------------------------------------------------------- reads: errors
READ_ERRORS = {
    "int_out_of_range": (lambda m, x: x[2], "out of bounds"),
    "negative_out_of_range": (lambda m, x: x[-3], "out of bounds"),
    "list_out_of_range": (lambda m, x: x[[0, 2]], "out of bounds"),
    "list_negative_out_of_range": (lambda m, x: x[:, [-4]], "out of bounds"),
    "tensor_out_of_range": (lambda m, x: x[1, :, m.tensor([4])], "out of bounds"),
    "too_many": (lambda m, x: x[0, 0, 0, 0], "too many indices"),
    "too_many_arrays": (lambda m, x: x[[0], [0], [0], [0]], "too many indices"),
    "negative_step": (lambda m, x: x[::-1], "greater than zero"),
    "negative_step_with_array": (lambda m, x: x[[0, 1], 2:0:-1], "greater than zero"),
    "zero_step": (lambda m, x: x[::0], "cannot be zero"),
    "float": (lambda m, x: x[1.0], "valid indices"),
    "numpy_bool": (lambda m, x: x[np.bool_(True)], "valid indices"),
    "set": (lambda m, x: x[{1}], "valid indices"),
    "str": (lambda m, x: x["a"], "valid indices"),
    "float_tensor": (lambda m, x: x[m.tensor([1.0, 0.0])], "long, int, byte or bool"),
    "float_0d_tensor": (lambda m, x: x[m.tensor(1.0)], "long, int, byte or bool"),
    "int16_tensor": (lambda m, x: x[m.tensor([1, 0], dtype=m.int16)], "long, int, byte or bool"),
    "float_slice_end": (lambda m, x: x[0:1.0], "slice indices"),
    "mask_shape": (lambda m, x: x[m.tensor([True, False, True])], "shape of the mask"),
    "mask_list_shape": (lambda m, x: x[[True]], "shape of the mask"),
    "mask_at_dim_1": (lambda m, x: x[:, np.array([[True, False, True]] * 2)], "shape of the mask"),
    "no_broadcast": (lambda m, x: x[[0, 1], [0, 1, 2]], "shape mismatch"),
    "false_with_array": (lambda m, x: x[1, False, [0, 1]], "shape mismatch"),
    "scalar_int": (lambda m, x: m.tensor(5.0)[0], "too many indices"),
    "scalar_slice": (lambda m, x: m.tensor(5.0)[:], "too many indices"),
    "scalar_list": (lambda m, x: m.tensor(5.0)[[0]], "too many indices"),
}


@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence")  # torch, for x["a"]
@pytest.mark.parametrize("name", list(READ_ERRORS))
def test_read_errors_as_torch(name):
    fn, match = READ_ERRORS[name]
    same_error(lambda m: fn(m, m.arange(24.0).reshape(2, 3, 4)), match)


def test_two_ellipses_are_refused_where_torch_reads_them_its_own_way():
    assert torch.arange(24).reshape(2, 3, 4)[..., 0, ...].shape == (2, 3)
    with pytest.raises(IndexError, match="single ellipsis"):
        tt.arange(24).reshape(2, 3, 4)[..., 0, ...]


@pytest.mark.parametrize("idx", [0, -1, (0, 1), (slice(None), slice(1, 3)), (None, 1, slice(2)),
                                 (), (1, None, slice(-2, None), 0), (slice(None),) * 3])
def test_plain_indices_skip_the_general_reading_with_its_result(idx):
    """Ints, slices without a step and None (x[:, :, a:b]) skip _unwrap_index/_torch_order,
    which read them as the same basic index; anything else (a step, an array, a bool, ...,
    more indices than dims) is left to them."""
    from tinytensor.ops import shape
    items = idx if isinstance(idx, tuple) else (idx,)
    assert shape._plain_basic(idx, 3) == items == shape._torch_order(shape._unwrap_index(idx), 3)[0]
    assert shape._torch_order(shape._unwrap_index(idx), 3)[1] is None
    for other in [(slice(None, None, 2),), (True,), ([0, 1],), (Ellipsis, 0), (0, 0, 0, 0),
                  (np.int64(1),)]:
        assert shape._plain_basic(other, 3) is None


# ---------------------------------------------------------------- assignment
def _low(m, x):
    """The first five elements of x (arange(24) as (2, 3, 4)) as a mask, whatever x's dtype."""
    return m.arange(24).reshape(2, 3, 4) < 5


# (x -> index, x -> value): x is arange(24) as (2, 3, 4), in each dtype of the test
SETS = {
    "int": (lambda m, x: 0, lambda m, x: 7),
    "ints": (lambda m, x: (1, 2, 3), lambda m, x: -2),
    "negative_ints": (lambda m, x: (-1, -1, -1), lambda m, x: 3),
    "row_from_a_tensor": (lambda m, x: (0, slice(None)), lambda m, x: m.tensor([1, 2, 3, 4])),
    "leading_ones_dropped": (lambda m, x: 0, lambda m, x: m.ones(1, 1, 4)),
    "broadcast_column": (lambda m, x: 0, lambda m, x: m.ones(1, 3, 1)),
    "ellipsis": (lambda m, x: (Ellipsis, 0), lambda m, x: m.tensor([1, 2, 3])),
    "steps": (lambda m, x: (slice(None, None, 2), slice(1, None, 2)), lambda m, x: 4),
    "wraps_in_a_cast": (lambda m, x: (0, 0), lambda m, x: m.tensor([300, -1, 2, 3])),
    "float_truncates": (lambda m, x: (0, 0, 0), lambda m, x: 2.7),
    "negative_into_unsigned": (lambda m, x: (0, 0, 0), lambda m, x: -1),
    "bool_value": (lambda m, x: (0, 0, slice(0, 2)), lambda m, x: m.tensor([True, False])),
    "mask_of_x": (lambda m, x: x < 5, lambda m, x: 1),
    "mask_scalar": (_low, lambda m, x: -1),
    "mask_0d": (_low, lambda m, x: m.tensor(1)),
    "mask_one_element": (_low, lambda m, x: m.tensor([1.0])),
    "mask_values": (_low, lambda m, x: (m.arange(5) * 3).to(x.dtype)),
    "mask_values_leading_one": (_low, lambda m, x: m.ones(1, 5).to(x.dtype)),
    "mask_empty": (lambda m, x: x > 100, lambda m, x: m.ones(1).to(x.dtype)),
    "mask_leading": (lambda m, x: m.tensor([[True, False, True], [False, False, True]]),
                     lambda m, x: m.tensor([1, 2, 3, 4]).to(x.dtype)),
    "mask_leading_rows": (lambda m, x: m.tensor([[True, False, True], [False, False, True]]),
                          lambda m, x: m.arange(12).reshape(3, 4).to(x.dtype)),
    "mask_list": (lambda m, x: [True, False], lambda m, x: 5),
    "int_then_array": (lambda m, x: (1, slice(None), [0, 1]),
                       lambda m, x: m.tensor([[5], [6], [7]]).to(x.dtype)),
    "int_then_array_row": (lambda m, x: (1, slice(None), [0, 1]), lambda m, x: m.tensor([5, 6]).to(x.dtype)),
    "int_array_int": (lambda m, x: (1, [0, 2], 1), lambda m, x: m.tensor([5, 6]).to(x.dtype)),
    "int_array_slice": (lambda m, x: (1, [0, 2], slice(1, 3)), lambda m, x: m.tensor([[1, 2]]).to(x.dtype)),
    "array_int": (lambda m, x: ([1, 0], 2), lambda m, x: m.tensor([[5], [6]]).to(x.dtype)),
    "arrays_apart": (lambda m, x: ([0, 1], slice(None), [0, 1]), lambda m, x: m.tensor([[5], [6]]).to(x.dtype)),
    "arrays_apart_row": (lambda m, x: ([0, 1], slice(None), [0, 1]),
                         lambda m, x: m.tensor([5, 6, 7]).to(x.dtype)),
    "arrays_broadcast": (lambda m, x: ([[0], [1]], [0, 2]), lambda m, x: m.tensor([[1], [2]]).to(x.dtype)),
    "last_position": (lambda m, x: (slice(None), [-1], slice(None)), lambda m, x: m.zeros(2, 1, 4).to(x.dtype)),
    "last_position_scalar": (lambda m, x: (slice(None), [-1]), lambda m, x: 9),
    "repeated_indices": (lambda m, x: (slice(None), [0, 0, 2]), lambda m, x: 1),
    "tensor_0d_index": (lambda m, x: (m.tensor(1), slice(None), [0, 1]), lambda m, x: 0),
    "python_true": (lambda m, x: True, lambda m, x: 0),
    "python_false": (lambda m, x: False, lambda m, x: 1),
    "int_true_int": (lambda m, x: (0, True, 1), lambda m, x: 5),
}


@pytest.mark.parametrize("dtype", ["float32", "float64", "bool"] + INT_DTYPES)
@pytest.mark.parametrize("name", list(SETS))
def test_assignment_as_torch(name, dtype, device):
    index, value = SETS[name]

    def assign(m):
        x = m.arange(24).reshape(2, 3, 4).to(getattr(m, dtype))
        x = x.to(device) if m is tt else x
        x[index(m, x)] = value(m, x)
        return x
    ref = same_outcome(assign)
    assert not isinstance(ref, type), f"torch raised {ref.__name__}: the case is meant to assign"


SET_ERRORS = {  # (dtype of x, x -> index, x -> value, part of our message)
    "value_does_not_expand": ("float32", lambda m, x: 0, lambda m, x: m.ones(2, 1, 4), "shape mismatch"),
    "value_too_short": ("float32", lambda m, x: x < 5, lambda m, x: m.arange(4.0), "shape mismatch"),
    "value_column": ("float32", lambda m, x: x < 5, lambda m, x: m.ones(5, 1), "shape mismatch"),
    "value_into_no_elements": ("float32", lambda m, x: x > 100, lambda m, x: m.ones(3), "shape mismatch"),
    "value_for_int_array": ("float32", lambda m, x: (1, slice(None), [0, 1]), lambda m, x: m.ones(3),
                            "shape mismatch"),
    "dtypes_differ_with_arrays": ("int64", lambda m, x: [0, 1], lambda m, x: m.ones(3, 4), "dtypes match"),
    "dtypes_differ_with_a_mask": ("float32", lambda m, x: x < 5, lambda m, x: m.arange(5),
                                  "dtypes match"),
    "one_element_through_a_mask": ("uint8", lambda m, x: x < 5, lambda m, x: m.tensor(-1.0),
                                   "cannot be converted"),
    "int_over_uint8": ("uint8", lambda m, x: 0, lambda m, x: 256, "cannot be converted"),
    "int_under_uint8": ("uint8", lambda m, x: 0, lambda m, x: -256, "cannot be converted"),
    "negative_float_into_uint8": ("uint8", lambda m, x: 0, lambda m, x: -0.5, "cannot be converted"),
    "float_over_int8": ("int8", lambda m, x: 0, lambda m, x: 127.9, "cannot be converted"),
    "nan_into_int": ("int64", lambda m, x: 0, lambda m, x: math.nan, "cannot be converted"),
    "inf_into_int": ("int32", lambda m, x: x < 3, lambda m, x: -math.inf, "cannot be converted"),
    "float_over_float32": ("float32", lambda m, x: 0, lambda m, x: 1e300, "cannot be converted"),
    "int_over_int64": ("float64", lambda m, x: 0, lambda m, x: 2**63, "Overflow"),
    "list_value": ("float32", lambda m, x: 0, lambda m, x: [1, 2, 3, 4], "can't assign a list"),
    "array_value": ("float32", lambda m, x: 0, lambda m, x: np.ones(4), "can't assign a ndarray"),
    "none_value": ("float32", lambda m, x: 0, lambda m, x: None, "can't assign a NoneType"),
    "index_out_of_range": ("float32", lambda m, x: 5, lambda m, x: 1.0, "out of bounds"),
    "list_out_of_range": ("float32", lambda m, x: (0, [3]), lambda m, x: 1.0, "out of bounds"),
    "mask_shape": ("float32", lambda m, x: m.tensor([[True] * 4] * 3), lambda m, x: 0.0, "shape of the mask"),
}


@pytest.mark.parametrize("name", list(SET_ERRORS))
def test_assignment_errors_as_torch(name):
    dtype, index, value, match = SET_ERRORS[name]

    def assign(m):
        x = m.arange(24).reshape(2, 3, 4).to(getattr(m, dtype))
        x[index(m, x)] = value(m, x)
    same_error(assign, match)


def _top_k_probs(m, logits, k):
    """nanoGPT's sampling filter: the logits below the k-th largest of each row to -inf."""
    v, _ = m.topk(logits, min(k, logits.shape[-1]))
    logits[logits < v[:, [-1]]] = -float("Inf")
    return (F if m is tt else torch.nn.functional).softmax(logits, dim=-1)


@pytest.mark.parametrize("k", [1, 3, 7, 100])
def test_top_k_filter_of_nanogpt(k, device):
    logits = np.random.default_rng(k).standard_normal((4, 7)).astype(np.float32)
    ours = _top_k_probs(tt, tt.tensor(logits).to(device), k)
    ref = _top_k_probs(torch, torch.tensor(logits), k)
    assert ours.shape == tuple(ref.shape)
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=1e-6, atol=0)
    assert ((ours.numpy() > 0).sum(-1) == min(k, 7)).all()


def test_assignment_and_autograd():
    for m in (tt, torch):  # torch refuses a leaf; tinytensor every tensor that requires grad
        w = m.zeros(3, requires_grad=True)
        with pytest.raises(RuntimeError):
            w[0] = 1.0
    with pytest.raises(RuntimeError, match="requires grad cannot be assigned"):
        tt.zeros(3, requires_grad=True)[0] = 1.0

    def init(m):  # under no_grad() a leaf that requires grad takes values (initialising weights)
        w = m.nn.Parameter(m.zeros(2, 3))
        with m.no_grad():
            w[0] = 1.0
            w[w < 1] = m.tensor(2.0)
            w[1, [0, 2]] = m.tensor([5.0, 6.0])
        assert w.requires_grad and w.is_leaf
        return w.detach()
    assert same_outcome(init)[2] == [[1, 1, 1], [5, 2, 6]]

    def value_under_no_grad(m):  # a value that requires grad is only copied under no_grad()
        x, v = m.zeros(3), m.ones(3, requires_grad=True)[1:] * 2
        with m.no_grad():
            x[:2] = v
        assert v.requires_grad and not x.requires_grad
        return x
    same_outcome(value_under_no_grad)

    x, w = tt.zeros(3), tt.ones(3, requires_grad=True)
    with pytest.raises(NotImplementedError, match="in-place autograd"):
        x[0] = w[0] * 2
    y = w * 2
    with tt.no_grad(), pytest.raises(RuntimeError, match="computed from one that requires grad"):
        y[0] = 1.0  # not a leaf: its graph would see the new value


# ---------------------------------------------------------------- logical ops
def _operand(m, dtype, shape):
    values = [0.0, 1.5, -2.0, math.nan, -0.0, 3.0] if "float" in dtype else [0, 1, 3, 0, 2, 1]
    if dtype == "bool":
        values = [False, True, True, False, True, False]
    n = math.prod(shape)
    return m.tensor(np.array((values * n)[:n]).reshape(shape)).to(getattr(m, dtype))


LOGICAL_DTYPES = ["bool", "int8", "uint8", "int32", "int64", "float32", "float64"]


@pytest.mark.parametrize("a_dtype", LOGICAL_DTYPES)
@pytest.mark.parametrize("b_dtype", ["bool", "int64", "float32"])
@pytest.mark.parametrize("op", ["logical_and", "logical_or", "logical_xor"])
def test_logical_binary_ops_give_bool_and_broadcast(op, a_dtype, b_dtype):
    for a_shape, b_shape in [((6,), (6,)), ((3, 1), (4,)), ((), (2, 3)), ((2, 3), ())]:
        ref = same_outcome(lambda m: getattr(m, op)(_operand(m, a_dtype, a_shape),
                                                    _operand(m, b_dtype, b_shape)))
        same_outcome(lambda m: getattr(_operand(m, a_dtype, a_shape), op)(_operand(m, b_dtype, b_shape)))
        assert ref[0] == "bool"


@pytest.mark.parametrize("dtype", LOGICAL_DTYPES)
def test_logical_not_is_true_where_zero(dtype):
    for shape in [(6,), (2, 3), ()]:
        assert same_outcome(lambda m: m.logical_not(_operand(m, dtype, shape)))[0] == "bool"
        same_outcome(lambda m: _operand(m, dtype, shape).logical_not())
    same_outcome(lambda m: m.tensor([2, 0]).logical_not())  # not ~: [False, True]


def test_logical_ops_have_no_gradient_and_torchs_errors():
    for m in (tt, torch):
        x = m.tensor([0.0, 1.0], requires_grad=True)
        assert not m.logical_and(x, x).requires_grad and not x.logical_not().requires_grad
    same_error(lambda m: m.logical_and(m.ones(2), 1), "must be Tensor, not int")
    same_error(lambda m: m.logical_xor(2, m.ones(2)), "must be Tensor, not int")
    same_error(lambda m: m.ones(2).logical_or(0.5), "must be Tensor, not float")
    same_error(lambda m: m.logical_not(3), "must be Tensor, not int")
    same_error(lambda m: m.logical_and(m.ones(2), m.ones(3)), "must match the size")


@pytest.mark.parametrize("dtype", ["bool"] + INT_DTYPES + ["float32"])
def test_invert_is_bitwise_not(dtype):
    if dtype == "float32":
        same_error(lambda m: ~_operand(m, dtype, (6,)), "only defined for bool and integer")
        return
    same_outcome(lambda m: ~_operand(m, dtype, (2, 3)))
    same_outcome(lambda m: ~m.tensor([-3, 0, 127, 1]).to(getattr(m, dtype)))


# ---------------------------------------------------------------- bitwise ops with Python ints
BITWISE_SCALARS = [300, -1, 2, 255, 256, -255, 2**63 - 1, 2**63, -2**63, 2**64, 2**64 - 1,
                   -2**63 - 1, True, False, 2.0]


@pytest.mark.parametrize("dtype", ["bool"] + INT_DTYPES)
@pytest.mark.parametrize("op", ["&", "|", "^"])
@pytest.mark.parametrize("scalar", BITWISE_SCALARS, ids=str)
def test_bitwise_ops_with_python_scalars(dtype, op, scalar):
    def values(m):
        return m.tensor([1, -3, 127, 0, 5]).to(getattr(m, dtype))
    fn = eval(f"lambda x, s: (x {op} s, s {op} x)")  # both sides
    for side in (0, 1):
        same_outcome(lambda m: fn(values(m), scalar)[side])


def test_bitwise_errors_as_torch():
    same_error(lambda m: m.tensor([1, 2]) & 2**64, "int too big")
    same_error(lambda m: m.tensor([1, 2], dtype=m.int8) | -2**63 - 1, "negative int")
    same_error(lambda m: m.tensor([True]) ^ 2**63, "uint64")
    same_error(lambda m: m.tensor([1, 2]) & 2.0, "only defined for bool and integer")
    same_error(lambda m: m.tensor([1.0]) | m.tensor([True]), "only defined for bool and integer")
    same_error(lambda m: m.tensor([1, 2]) & [1, 2], "unsupported operand")
    same_error(lambda m: m.tensor([1, 2]) ^ None, "unsupported operand")
    same_error(lambda m: m.ones(2, dtype=m.int8) & m.ones(3, dtype=m.int8), "must match the size")


@pytest.mark.parametrize("expr", [
    lambda m: m.tensor([5], dtype=m.int8) & m.tensor([300]),        # a tensor with dims: int64
    lambda m: m.tensor([5, -1], dtype=m.int8) & m.tensor(300),       # a 0-d tensor: wrapped
    lambda m: m.tensor([True, False]) & m.tensor(5),
    lambda m: m.tensor([True, False]) | m.tensor([True]),
    lambda m: m.tensor(5, dtype=m.uint8) ^ -1,
    lambda m: (m.arange(4)[:, None] & m.arange(3)),
])
def test_bitwise_ops_of_tensors_promote_and_broadcast_as_torch(expr):
    same_outcome(expr)

