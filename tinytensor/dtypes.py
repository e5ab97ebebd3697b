"""Dtypes and torch's type promotion.

tinytensor's dtypes are NumPy's; the names torch uses are here too, so lecture code such as
`tt.tensor(data, dtype=tt.long)` reads as it does in torch:

    float16 half  float32 float  float64 double  int8 int16 int32 int  int64 long  uint8  bool

result_type(*operands) is torch.result_type: the dtype of an op on Tensors, arrays and Python
scalars, by torch's rules, which differ from NumPy's:

- categories rank bool < integer < floating; an operand of a higher category wins, whatever
  its size (int64 with float16 gives float16; NumPy gives float64);
- operands with dimensions decide first; a 0-d tensor counts only when its category is higher
  than theirs (float32 (3,) + float64 0-d stays float32), a Python scalar only when its category
  is higher than every tensor's, and then as the default dtype of its category (int64 (3,) + 0.5
  is float32, the default float dtype, not float64).

Within a category the wider dtype wins (NumPy's promotion of two dtypes of one kind).
The default float dtype (float32; set_default_dtype changes it) lives here too.
"""
import builtins
import numbers

import numpy as np

_BOOL, _INT, _FLOAT = 0, 1, 2
_default_dtype = np.float32


def set_default_dtype(dtype):
    """Set the float dtype for Python scalars/lists and new parameters (float32 or float64)."""
    global _default_dtype
    dtype = np.dtype(dtype).type
    if dtype not in (np.float16, np.float32, np.float64):
        raise ValueError(f"default dtype must be a float type (float32 or float64), got {dtype}")
    _default_dtype = dtype


def get_default_dtype():
    return _default_dtype


def _category(dtype):
    kind = dtype.kind
    if kind == "b":
        return _BOOL
    if kind in "iu":
        return _INT
    if kind == "f":
        return _FLOAT
    raise TypeError(f"dtype {dtype} is not supported: tinytensor has bool, integer and float tensors")


def is_floating_point(dtype):
    return np.dtype(dtype).kind == "f"


def promote_types(a, b):
    """torch.promote_types: the smallest dtype both a and b convert to; a float beats an
    integer or bool of any size."""
    a, b = np.dtype(a), np.dtype(b)
    if a == b:
        return a
    ca, cb = _category(a), _category(b)
    if ca != cb:
        return a if ca > cb else b
    return np.promote_types(a, b)


def scalar_dtype(x):
    """The dtype a Python (or NumPy) scalar takes when it decides a result, as torch's wrapped
    numbers: bool, int64, or the default float dtype."""
    if isinstance(x, (builtins.bool, np.bool_)):
        return np.dtype(np.bool_)
    if isinstance(x, numbers.Integral):
        return np.dtype(np.int64)
    if isinstance(x, numbers.Real):
        return np.dtype(_default_dtype)
    raise TypeError(f"unsupported scalar {x!r} of type {type(x).__name__}: tinytensor has bool, "
                    f"integer and float tensors")


def _combine(higher, lower):
    """torch's combine_categories: `higher` (operands of higher priority) wins unless `lower`
    is of a higher category."""
    if higher is None:
        return lower
    if lower is None or _category(higher) >= _category(lower):
        return higher
    return promote_types(higher, lower)


def result_type(*operands):
    """The dtype torch gives an op on these operands: arrays (a 0-d array counts as a 0-d
    tensor) and Python or NumPy scalars."""
    dims = zero = scalar = None
    for x in operands:
        if isinstance(x, (numbers.Number, np.generic)):
            d = scalar_dtype(x)
            scalar = d if scalar is None else promote_types(scalar, d)
        elif x.ndim:
            dims = x.dtype if dims is None else promote_types(dims, x.dtype)
        else:
            zero = x.dtype if zero is None else promote_types(zero, x.dtype)
    return _combine(dims, _combine(zero, scalar))


# torch's names for the dtypes (defined last: they shadow the builtins float, int and bool)
float16 = half = np.dtype(np.float16)
float32 = float = np.dtype(np.float32)  # noqa: A001
float64 = double = np.dtype(np.float64)
int8 = np.dtype(np.int8)
int16 = short = np.dtype(np.int16)
int32 = int = np.dtype(np.int32)  # noqa: A001
int64 = long = np.dtype(np.int64)
uint8 = np.dtype(np.uint8)
bool = np.dtype(np.bool_)  # noqa: A001
