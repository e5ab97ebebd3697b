"""torch.nn.utils: gradient clipping, as torch.nn.utils.clip_grad_norm_ (the L2 norm)."""
from .. import optim


def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None):
    """Scale the gradients of `parameters` in place so that their global L2 norm is at most
    max_norm; returns the norm before clipping (a 0-d tensor), as torch. Only norm_type 2."""
    if float(norm_type) != 2.0:
        raise NotImplementedError(f"clip_grad_norm_ with norm_type={norm_type!r} is not "
                                  f"supported: tinytensor clips by the L2 norm (norm_type=2)")
    return optim.clip_grad_norm_(parameters, max_norm, error_if_nonfinite=error_if_nonfinite)
