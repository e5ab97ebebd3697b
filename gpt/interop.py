"""Weights to and from the lecture's PyTorch gpt.py, name for name and shape for shape.

    sd = lecture_state_dict(model)                                   # {name: ndarray}
    torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})  # strict
    load_lecture_state_dict(model, {k: v.numpy() for k, v in torch_model.state_dict().items()})

The models here match the lecture's parameter for parameter, except that each block's
attention keeps its heads' query, key and value weights in one fused (3*C, C) matrix,
`blocks.{i}.sa.qkv.weight`: rows [0, C) the queries, [C, 2C) the keys, [2C, 3C) the values,
head h at rows h*hs:(h+1)*hs of each. The lecture has one Head module per head,
`blocks.{i}.sa.heads.{h}.{key,query,value}.weight` of shape (hs, C), plus a `tril` buffer
(block_size, block_size) of lower-triangular ones, which is written here and ignored on load.
"""
import re

import numpy as np

from .model import GPTLanguageModel

_QKV = re.compile(r"blocks\.(\d+)\.sa\.qkv\.weight")
_HEAD = re.compile(r"blocks\.(\d+)\.sa\.heads\.(\d+)\.(key|query|value|tril)(\.weight)?")


def _check_model(model):
    if not isinstance(model, GPTLanguageModel):
        raise TypeError(f"the lecture's state dict describes its GPTLanguageModel (the 'gpt' or "
                        f"'layernorm' stage), not a {type(model).__name__}")


def to_lecture_names(arrays, n_head, block_size=None):
    """{our name: array} -> {lecture name: array}, splitting each fused qkv weight by head.

    Works on any dict keyed like model.state_dict() (weights, gradients, optimizer moments).
    With block_size, each head's tril buffer is added too, as in the lecture's state_dict.
    """
    out = {}
    for name, a in arrays.items():
        m = _QKV.fullmatch(name)
        if m is None:
            out[name] = a
            continue
        prefix = f"blocks.{m.group(1)}.sa.heads"
        q, k, v = np.split(np.asarray(a), 3)                      # each (nh*hs, C)
        hs = q.shape[0] // n_head
        for h in range(n_head):
            rows = slice(h * hs, (h + 1) * hs)
            if block_size is not None:  # torch lists a module's own buffers before its children
                out[f"{prefix}.{h}.tril"] = np.tril(np.ones((block_size, block_size), dtype=a.dtype))
            out[f"{prefix}.{h}.key.weight"] = k[rows].copy()      # (hs, C)
            out[f"{prefix}.{h}.query.weight"] = q[rows].copy()
            out[f"{prefix}.{h}.value.weight"] = v[rows].copy()
    return out


def lecture_state_dict(model):
    """The model's weights under the names and shapes of the lecture's GPTLanguageModel."""
    _check_model(model)
    return to_lecture_names(model.state_dict(), model.config.n_head, model.config.block_size)


def _as_numpy(v):
    """An ndarray from an ndarray, a CPU torch tensor or anything array-like."""
    if hasattr(v, "detach"):  # a torch tensor
        v = v.detach().cpu().numpy()
    return np.asarray(v)


def load_lecture_state_dict(model, state_dict):
    """Load weights named as in the lecture's gpt.py (the inverse of lecture_state_dict).

    Every parameter must be present with the lecture's shape; tril buffers are ignored. Raises
    ValueError naming the missing or unexpected keys, or the first tensor whose shape differs,
    before anything is changed.
    """
    _check_model(model)
    n_head = model.config.n_head
    expected = to_lecture_names(model.state_dict(), n_head)       # names and shapes
    given = {k: v for k, v in state_dict.items() if not (_HEAD.fullmatch(k) and k.endswith(".tril"))}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    if missing or unexpected:
        parts = [f"{what} keys {keys[:6]}" + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
                 for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise ValueError("not the lecture's GPTLanguageModel for this config: " + "; ".join(parts))
    arrays = {}
    for k, ref in expected.items():
        a = _as_numpy(given[k])
        if a.shape != ref.shape:
            raise ValueError(f"shape mismatch for {k}: the state dict has {a.shape}, this model "
                             f"(n_embd={model.config.n_embd}, n_head={n_head}) needs {ref.shape}")
        arrays[k] = a
    ours = {}
    for name in model.state_dict():
        m = _QKV.fullmatch(name)
        if m is None:
            ours[name] = arrays[name]
            continue
        prefix = f"blocks.{m.group(1)}.sa.heads"
        ours[name] = np.concatenate([arrays[f"{prefix}.{h}.{kind}.weight"]
                                     for kind in ("query", "key", "value")
                                     for h in range(n_head)])     # (3*nh*hs, C)
    model.load_state_dict(ours)
