"""The memory bandwidth probe of `picogpt-fast bench` and bench/: a streaming read of a large array."""

import numpy as np
from numba import prange

from .jit import kernel

F32 = np.float32


@kernel
def stream_read(a, out):
    """Read every element of a [R, C] array (four rows per work item, as the linear kernel does).
    out [R // 4] receives the row sums, so that the reads cannot be optimised away."""
    for b in prange(a.shape[0] // 4):
        r0, r1, r2, r3 = a[4 * b], a[4 * b + 1], a[4 * b + 2], a[4 * b + 3]
        s0 = s1 = s2 = s3 = F32(0.0)
        for i in range(r0.shape[0]):
            s0 += r0[i]
            s1 += r1[i]
            s2 += r2[i]
            s3 += r3[i]
        out[b] = s0 + s1 + s2 + s3
