"""Parameters whose values and gradients live in two flat buffers, one contiguous array each.

    flat = FlatParameters(params)   # every p.data becomes a view into flat.data (values kept)
    loss.backward()                 # each p's first gradient is copied into its view of flat.grad
    flat.grads_in_place()           # True when every p.grad is that view: flat.grad holds them all

optim.AdamW builds one when it is constructed and keeps it as `optimizer.flat`, so a step is one
vector kernel per parameter group (kernels.adamw_step) over flat.data, flat.grad and flat moment
buffers instead of a dozen small array operations per parameter. The training loop hands the
same object to distributed.allreduce_gradients(optimizer.flat), which sums flat.grad over the
ranks in place, in a few large MPI calls, with no copy in or out. Nothing finds these buffers
behind the caller's back: whoever needs them is given them.

The engine (Tensor.backward) writes a leaf's first gradient into `p._grad_view` when one is
set, instead of allocating a copy; later gradients (accumulation) are added in place. So after
zero_grad() the next backward overwrites the arrays the previous p.grad pointed to: copy a
gradient you want to keep across steps (PyTorch's DDP with gradient_as_bucket_view alike).

The views last while nothing replaces p.data; Module.to() and astype() do, and `intact()` then
says False (AdamW then builds new buffers, see optim.AdamW.flat).
"""
import numpy as np

from . import backend


class FlatParameters:
    """params (distinct Tensors of one float dtype on one device) viewed into flat buffers."""

    def __init__(self, params):
        params = list(params)
        if not params:
            raise ValueError("FlatParameters needs at least one parameter")
        if len({id(p) for p in params}) != len(params):
            raise ValueError("FlatParameters got the same parameter twice")
        first = params[0]
        for p in params:
            if p.dtype != first.dtype or p.device != first.device or p.dtype.kind != "f":
                raise ValueError(f"FlatParameters needs float parameters of one dtype on one device, "
                                 f"got {p.dtype} on {p.device} and {first.dtype} on {first.device}")
        xp = backend.get_array_module(first.data)
        self.params = params
        # parameter i lives in [offsets[i], offsets[i + 1]) of the flat buffers
        self.offsets = np.cumsum([0] + [p.size for p in params]).tolist()
        n = self.offsets[-1]
        self.data = xp.empty(n, dtype=first.dtype)
        # the gradients, then one flag per parameter ("has a gradient"): an allreduce sums both
        self.grad_and_flags = xp.zeros(n + len(params), dtype=first.dtype)
        self.grad, self.flags = self.grad_and_flags[:n], self.grad_and_flags[n:]
        self.host_staging = None  # host copy of grad_and_flags, for GPU buffers summed over MPI
        self.data_views, self.grad_views = [], []
        for p, a, b in zip(params, self.offsets, self.offsets[1:]):
            dv = self.data[a:b].reshape(p.shape)
            gv = self.grad[a:b].reshape(p.shape)
            dv[...] = p.data
            p.data = dv
            if p.grad is not None:
                gv[...] = p.grad
                p.grad = gv
            p._grad_view = gv
            self.data_views.append(dv)
            self.grad_views.append(gv)

    def __len__(self):
        return len(self.params)

    def span(self, i, j):
        """(start, stop): the stretch of the flat buffers holding parameters i .. j-1."""
        return self.offsets[i], self.offsets[j]

    def intact(self):
        """True while every parameter's .data is still its view of self.data."""
        return all(p.data is v for p, v in zip(self.params, self.data_views))

    def grads_in_place(self, i=0, j=None):
        """True when parameters i .. j-1 all have their gradient in their view of self.grad."""
        j = len(self.params) if j is None else j
        return all(p.grad is v for p, v in zip(self.params[i:j], self.grad_views[i:j]))

    def release(self):
        """Stop the engine writing gradients into these buffers (the parameters keep their data)."""
        for p, v in zip(self.params, self.grad_views):
            if getattr(p, "_grad_view", None) is v:
                p._grad_view = None
