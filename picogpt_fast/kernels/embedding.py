"""Token + position embedding lookup."""

from numba import prange

from .formats import widen
from .jit import strict_kernel


@strict_kernel
def embed(ids, pos, wte, scale, fmt, wpe, out):
    """out[m] = wte[ids[m]] + wpe[pos[m]]. ids [M] int64, pos [M] int64, wte [V, E] in format fmt
    (see formats.py), wpe [P, E] float32, out [M, E]."""
    M, E = out.shape
    for m in prange(M):
        p = wpe[pos[m]]
        o = out[m]
        for e in range(E):
            o[e] = widen(wte, scale, fmt, ids[m], e) + p[e]
