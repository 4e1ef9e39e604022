"""Causal multi-head attention against a KV cache.

The cache of one layer holds, per sequence and head, keys as [C, D] rows and values transposed as
[D, C] rows (S sequences, H heads, C positions, head size D). Both products of attention are then
matrix-vector products over contiguous rows, computed by the same `dot4` as the linear layers:
scores = K[:n] @ q and out = V.T[:, :n] @ softmax(scores).

Each input row m carries its own sequence seq[m] and position pos[m]; the same kernel serves a
prompt (many rows of one sequence), one new token, and a batch of sequences decoding together.
Row m attends to keys 0..pos[m] of its sequence: no mask array, and no work on masked keys.
"""

import numba
import numpy as np
from numba import prange

from .dot import dot, dot4
from .jit import kernel
from .vecmath import exp

F32 = np.float32


@kernel
def store_kv(qkv, seq, pos, k_cache, vt_cache):
    """Copy each row's key and value into the cache, one head per work item.

    qkv [M, 3E] (q | k | v, heads side by side), seq/pos [M] int64,
    k_cache [S, H, C, D], vt_cache [S, H, D, C]. Values are written d-major, so the rows of a
    prompt (consecutive positions) fill contiguous runs of vt_cache.
    """
    M = qkv.shape[0]
    H, D = k_cache.shape[1], k_cache.shape[3]
    E = H * D
    for h in prange(H):
        for m in range(M):
            k = k_cache[seq[m], h, pos[m]]
            for d in range(D):
                k[d] = qkv[m, E + h * D + d]
        for d in range(D):
            for m in range(M):
                vt_cache[seq[m], h, d, pos[m]] = qkv[m, 2 * E + h * D + d]


@kernel
def attention(qkv, seq, pos, k_cache, vt_cache, scale, out, scores):
    """out[m, head h] = softmax(K[:n] @ q * scale) @ V[:n] with n = pos[m] + 1, all (row, head) pairs in parallel.

    qkv [M, 3E], seq/pos [M] int64, k_cache [S, H, C, D], vt_cache [S, H, D, C], scale float32,
    out [M, E], scores [n_threads, C] scratch (one row per worker thread).
    """
    M = qkv.shape[0]
    H, D = k_cache.shape[1], k_cache.shape[3]
    for item in prange(M * H):
        m = item // H
        h = item - m * H
        n = pos[m] + 1
        q = qkv[m, h * D : (h + 1) * D]
        keys = k_cache[seq[m], h]
        values_t = vt_cache[seq[m], h]
        att = scores[numba.get_thread_id(), :n]
        t = 0
        while t + 4 <= n:
            s0, s1, s2, s3 = dot4(keys[t], keys[t + 1], keys[t + 2], keys[t + 3], q)
            att[t], att[t + 1], att[t + 2], att[t + 3] = s0 * scale, s1 * scale, s2 * scale, s3 * scale
            t += 4
        for rest in range(t, n):
            att[rest] = dot(keys[rest], q) * scale
        best = att.max()
        total = F32(0.0)
        for t in range(n):
            e = exp(att[t] - best)
            att[t] = e
            total += e
        inv = F32(1.0) / total
        o = out[m, h * D : (h + 1) * D]
        d = 0
        while d + 4 <= D:
            v0, v1, v2, v3 = values_t[d, :n], values_t[d + 1, :n], values_t[d + 2, :n], values_t[d + 3, :n]
            s0, s1, s2, s3 = dot4(v0, v1, v2, v3, att)
            o[d], o[d + 1], o[d + 2], o[d + 3] = s0 * inv, s1 * inv, s2 * inv, s3 * inv
            d += 4
        for rest in range(d, D):
            o[rest] = dot(values_t[rest, :n], att) * inv


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
