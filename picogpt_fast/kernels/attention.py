"""Causal multi-head attention against a KV cache.

The cache of one layer holds, per sequence and head, keys and values as [C, D] rows (S sequences,
H heads, C positions, head size D), so that a new token's key and value are two contiguous writes.
For a query q: scores = K[:n] @ q (a dot product per cached row), a softmax, then
out = sum_t p_t V[t] (a scaled row added per cached position); both walk the cache rows in order.

Each input row m carries its own sequence seq[m] and position pos[m]; the same kernel serves a
prompt (many rows of one sequence), one new token, and a batch of sequences decoding together.
Row m attends to keys 0..pos[m] of its sequence: no mask array, and no work on masked keys.
"""

import numba
import numpy as np
from numba import prange

from .dot import dot
from .jit import helper, kernel
from .vecmath import exp

F32 = np.float32


@helper
def store_head(qkv, seq, pos, k_cache, v_cache, h):
    """Copy head h of each row's key and value into the cache.

    qkv [M, 3E] (q | k | v, heads side by side), seq/pos [M] int64, k_cache/v_cache [S, H, C, D].
    """
    M = qkv.shape[0]
    H, D = k_cache.shape[1], k_cache.shape[3]
    E = H * D
    for m in range(M):
        k, v = k_cache[seq[m], h, pos[m]], v_cache[seq[m], h, pos[m]]
        for d in range(D):
            k[d] = qkv[m, E + h * D + d]
            v[d] = qkv[m, 2 * E + h * D + d]


@kernel
def store_kv(qkv, seq, pos, k_cache, v_cache):
    """Every row's key and value into the cache, one head per work item (a prompt on BLAS)."""
    for h in prange(k_cache.shape[1]):
        store_head(qkv, seq, pos, k_cache, v_cache, h)


@kernel
def attention(qkv, seq, pos, k_cache, v_cache, scale, out, scores, first):
    """Store every row's key and value (on the calling thread: a few rows), then for rows
    m >= first: out[m, head h] = softmax(K[:n] @ q * scale) @ V[:n] with n = pos[m] + 1, all
    (row, head) pairs in parallel.

    qkv [M, 3E], seq/pos [M] int64, k_cache/v_cache [S, H, C, D], scale float32, out [M, E],
    scores [n_threads, C] scratch (one row per worker thread).
    """
    M = qkv.shape[0]
    H, D = k_cache.shape[1], k_cache.shape[3]
    for h in range(H):
        store_head(qkv, seq, pos, k_cache, v_cache, h)
    for item in prange((M - first) * H):
        m = first + item // H
        h = item % H
        n = pos[m] + 1
        q = qkv[m, h * D : (h + 1) * D]
        keys, values = k_cache[seq[m], h], v_cache[seq[m], h]
        att = scores[numba.get_thread_id(), :n]
        for t in range(n):
            att[t] = dot(keys[t], q) * scale
        best = att.max()
        total = F32(0.0)
        for t in range(n):
            e = exp(att[t] - best)
            att[t] = e
            total += e
        inv = F32(1.0) / total
        o = out[m, h * D : (h + 1) * D]
        o[:] = 0
        for t in range(n):
            p = att[t] * inv
            v = values[t]
            for d in range(D):
                o[d] += p * v[d]


@kernel
def causal_softmax(scores, start, scale):
    """Row i of scores [n, total] becomes softmax(scale * scores[i, :start + i + 1]), zeros after.

    For a prompt computed with BLAS (scores = Q @ K.T over all keys): row i is the token at
    position start + i, which sees keys 0..start + i.
    """
    n, total = scores.shape
    for i in prange(n):
        row = scores[i]
        visible = min(start + i + 1, total)
        best = row[:visible].max()
        s = F32(0.0)
        for t in range(visible):
            e = exp((row[t] - best) * scale)
            row[t] = e
            s += e
        inv = F32(1.0) / s
        for t in range(visible):
            row[t] *= inv
        for t in range(visible, total):
            row[t] = F32(0.0)
