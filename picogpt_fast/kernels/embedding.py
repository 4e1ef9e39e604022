"""Token + position embedding lookup."""

from numba import prange

from .jit import kernel


@kernel
def embed(ids, pos, wte, wpe, out):
    """out[m] = wte[ids[m]] + wpe[pos[m]]. ids [M] int64, pos [M] int64, wte [V, E], wpe [P, E], out [M, E]."""
    M, E = out.shape
    for m in prange(M):
        t = wte[ids[m]]
        p = wpe[pos[m]]
        o = out[m]
        for e in range(E):
            o[e] = t[e] + p[e]
