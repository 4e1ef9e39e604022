"""Arrays that start on a 64-byte cache line.

NumPy's large arrays start 16 bytes past a line (the allocator's header), so a 32-byte vector load
of a row can straddle two lines, which costs a second load: measured, the batched float products ran
at 6.3 multiply-adds per cycle from 16-byte aligned rows and at 10 from aligned ones. The engine's
buffers and converted weights are made here; weights mapped from the cache are aligned by the file
(tensorfile.write).
"""

from __future__ import annotations

import numpy as np

ALIGN = 64


def zeros(shape, dtype=np.float32) -> np.ndarray:
    """np.zeros(shape, dtype), its data starting at a multiple of ALIGN bytes."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def empty(nbytes: int) -> np.ndarray:
    """A uint8 buffer of nbytes, uninitialised, its data starting at a multiple of ALIGN bytes."""
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start : start + nbytes]


def aligned(a: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of a that starts at a multiple of ALIGN bytes (a itself if it already does)."""
    if a.flags.c_contiguous and a.ctypes.data % ALIGN == 0:
        return a
    out = zeros(a.shape, a.dtype)
    out[...] = a
    return out
