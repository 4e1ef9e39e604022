"""The memory bandwidth probe of `picogpt-fast bench` and bench/: a plain streaming read.

Each thread sums one long contiguous range of a large array, front to back: the access pattern a
memory system serves best, and not the shape of any of the engine's kernels, so that a decode's
GB/s set against it says how close the kernels come to the memory's own speed.
"""

import numpy as np
from numba import prange

from .jit import kernel

F32 = np.float32


@kernel
def stream_read(a, out):
    """out[t] = the sum of range t of the 1-D array a, split into len(out) contiguous ranges (one
    per thread), so that the reads cannot be optimised away."""
    ranges = out.shape[0]
    per = a.shape[0] // ranges
    for t in prange(ranges):
        s = F32(0.0)
        for i in range(t * per, (t + 1) * per):
            s += a[i]
        out[t] = s
