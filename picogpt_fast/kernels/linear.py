"""Linear layers for few rows: y = x @ w.T + b with the weight stored [out, in].

Decoding is a matrix-vector product per token and is bound by memory bandwidth: every weight is
read once per step. Each prange iteration owns four output columns, i.e. four contiguous weight
rows, and computes their dot products with every input row while those weights sit in cache; so a
batch of M sequences reads the weights once per step, not M times. Every output is one dot product
whose summation order is fixed by this code, whatever M and the thread count: a sequence decoded in
a batch gets bitwise the same logits as decoded alone.

For prompts (many rows) a BLAS matrix-matrix product is faster; `engine.py` chooses.
"""

from numba import prange

from .activations import epilogue
from .dot import dot, dot4
from .jit import kernel


@kernel
def linear(x, w, b, out, mode):
    """out = epilogue(x @ w.T + b). x [M, K], w [N, K], b [N], out [M, N], mode STORE/GELU/ADD."""
    M = x.shape[0]
    N = w.shape[0]
    n4 = N // 4
    for blk in prange(n4 + N % 4):
        if blk < n4:
            j = 4 * blk
            w0, w1, w2, w3 = w[j], w[j + 1], w[j + 2], w[j + 3]
            for m in range(M):
                s0, s1, s2, s3 = dot4(w0, w1, w2, w3, x[m])
                epilogue(out, m, j, s0 + b[j], mode)
                epilogue(out, m, j + 1, s1 + b[j + 1], mode)
                epilogue(out, m, j + 2, s2 + b[j + 2], mode)
                epilogue(out, m, j + 3, s3 + b[j + 3], mode)
        else:  # the last N % 4 columns, one each
            j = 4 * n4 + (blk - n4)
            for m in range(M):
                epilogue(out, m, j, dot(w[j], x[m]) + b[j], mode)
