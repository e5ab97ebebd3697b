import numpy as np
from tinytensor.kernels import mkl


def test_zz_debug():
    mkl.use_mkl(True)
    g = np.random.default_rng(7).standard_normal((768, 384)).astype(np.float32)
    x = np.random.default_rng(5).standard_normal((768, 128)).astype(np.float32)
    ref = g.T.astype(np.float64) @ x.astype(np.float64)
    errs = [float(np.abs(mkl.product(g, x, ta=True) - ref).max()) for _ in range(40)]
    assert max(errs) < 1e-3, sum(e > 1e-3 for e in errs)
