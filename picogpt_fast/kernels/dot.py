"""The dot product of two float32 rows: the inner loop of attention and of float32 linear layers.

A plain loop over k that LLVM vectorises (fastmath 'reassoc' in jit.py). A given call site always
sums in the same order, which keeps every result bitwise reproducible.
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
