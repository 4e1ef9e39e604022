"""Dot products: the inner loop of the linear layers and of attention.

Each is a plain loop over k that LLVM vectorises (fastmath 'reassoc' in jit.py). `dot4` computes
four dot products against one shared vector, so the shared vector is loaded once for four rows.
A given call site always sums in the same order, which keeps every result bitwise reproducible.
"""

import numpy as np

from .jit import helper

F32 = np.float32


@helper
def dot(a, x):
    """sum(a[k] * x[k]) for 1-D float32 arrays of equal length."""
    s = F32(0.0)
    for k in range(x.shape[0]):
        s += a[k] * x[k]
    return s


@helper
def dot4(a0, a1, a2, a3, x):
    """(a0 . x, a1 . x, a2 . x, a3 . x): four dot products sharing the vector x."""
    s0 = F32(0.0)
    s1 = F32(0.0)
    s2 = F32(0.0)
    s3 = F32(0.0)
    for k in range(x.shape[0]):
        xk = x[k]
        s0 += a0[k] * xk
        s1 += a1[k] * xk
        s2 += a2[k] * xk
        s3 += a3[k] * xk
    return s0, s1, s2, s3
