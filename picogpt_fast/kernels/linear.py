"""Matrix products for few rows: the linear layers (weights [in, out]) and the output projection
(the embedding matrix [n_vocab, n_embd]).

Decoding multiplies one row per sequence by every weight matrix, so it is bound by memory
bandwidth: each weight must be read once per step, at full speed. `linear` gives each thread one
contiguous band of output columns and walks the weight rows k = 0..K-1, each thread reading its
part of each row; a batch of M sequences is handled in the same walk, so the weights are read
once per step for all of them. Every output sums its K products in the same order (k ascending,
eight at a time) whatever M, the band it falls in and the thread count: a sequence decoded in a
batch gets bitwise the logits it gets alone, on any number of threads.

For prompts (many rows) a BLAS matrix-matrix product is faster; `engine.py` chooses.
"""

import numba
from numba import prange

from .activations import epilogue
from .dot import dot, dot4
from .jit import helper, kernel

BAND = 64  # thread bands of columns start at multiples of this


@kernel
def linear(x, w, b, out, mode, scratch, bands):
    """out = epilogue(x @ w + b). x [M, K], w [K, N], b [N], out [M, N], mode STORE/GELU/ADD,
    scratch [n_threads, >= M * N] (each thread's accumulators), bands: the thread count (one band
    of columns each; passed in because numba.get_num_threads() inside a kernel defeats caching)."""
    N = w.shape[1]
    band = -(-N // (bands * BAND)) * BAND
    for t in prange(bands):
        j0 = t * band
        j1 = min(N, j0 + band)
        if j0 < j1:
            _band(x, w, b, out, mode, scratch[numba.get_thread_id()], j0, j1)


@helper
def _band(x, w, b, out, mode, scratch, j0, j1):
    """Columns j0..j1 of linear() for every row."""
    M, K = x.shape
    n = j1 - j0
    acc = scratch[: M * n].reshape((M, n))
    acc[:, :] = 0
    k = 0
    while k + 8 <= K:  # eight weight rows per pass over the accumulators
        w0, w1, w2, w3 = w[k, j0:j1], w[k + 1, j0:j1], w[k + 2, j0:j1], w[k + 3, j0:j1]
        w4, w5, w6, w7 = w[k + 4, j0:j1], w[k + 5, j0:j1], w[k + 6, j0:j1], w[k + 7, j0:j1]
        m = 0
        while m + 2 <= M:  # two input rows per pass share the weight loads (batched decoding)
            x0, x1, x2, x3, x4, x5, x6, x7 = x[m, k], x[m, k + 1], x[m, k + 2], x[m, k + 3], x[m, k + 4], x[m, k + 5], x[m, k + 6], x[m, k + 7]
            y0, y1, y2, y3, y4, y5, y6, y7 = x[m + 1, k], x[m + 1, k + 1], x[m + 1, k + 2], x[m + 1, k + 3], x[m + 1, k + 4], x[m + 1, k + 5], x[m + 1, k + 6], x[m + 1, k + 7]
            a, c = acc[m], acc[m + 1]
            for j in range(n):
                a[j] += (x0 * w0[j] + x1 * w1[j] + x2 * w2[j] + x3 * w3[j]) + (x4 * w4[j] + x5 * w5[j] + x6 * w6[j] + x7 * w7[j])
                c[j] += (y0 * w0[j] + y1 * w1[j] + y2 * w2[j] + y3 * w3[j]) + (y4 * w4[j] + y5 * w5[j] + y6 * w6[j] + y7 * w7[j])
            m += 2
        if m < M:  # the last row of an odd batch: the same sums alone
            x0, x1, x2, x3, x4, x5, x6, x7 = x[m, k], x[m, k + 1], x[m, k + 2], x[m, k + 3], x[m, k + 4], x[m, k + 5], x[m, k + 6], x[m, k + 7]
            a = acc[m]
            for j in range(n):
                a[j] += (x0 * w0[j] + x1 * w1[j] + x2 * w2[j] + x3 * w3[j]) + (x4 * w4[j] + x5 * w5[j] + x6 * w6[j] + x7 * w7[j])
        k += 8
    for rest in range(k, K):
        wk = w[rest, j0:j1]
        for m in range(M):
            xk = x[m, rest]
            a = acc[m]
            for j in range(n):
                a[j] += xk * wk[j]
    for m in range(M):
        for j in range(n):
            epilogue(out, m, j0 + j, acc[m, j] + b[j0 + j], mode)


@kernel
def logits(x, wte, out):
    """out = x @ wte.T: the output projection against the (tied) embedding matrix.

    x [M, E], wte [V, E], out [M, V]. Each work item owns four vocabulary rows (contiguous in
    wte) and takes their dot products with every input row while they sit in cache.
    """
    M = x.shape[0]
    V = wte.shape[0]
    v4 = V // 4
    for blk in prange(v4 + V % 4):
        if blk < v4:
            j = 4 * blk
            w0, w1, w2, w3 = wte[j], wte[j + 1], wte[j + 2], wte[j + 3]
            for m in range(M):
                out[m, j], out[m, j + 1], out[m, j + 2], out[m, j + 3] = dot4(w0, w1, w2, w3, x[m])
        else:  # the last V % 4 rows, one each
            j = 4 * v4 + (blk - v4)
            for m in range(M):
                out[m, j] = dot(wte[j], x[m])
