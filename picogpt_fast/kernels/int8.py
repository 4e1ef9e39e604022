"""int8 weights times int8 activations: the products of every int8 linear layer, decoding and prompts.

An int8 weight matrix holds one float32 scale per group of 32 inputs of each output, and is stored
interleaved (dtypes.interleave_int8): blocks of 8 output rows, each group of a block as 8 slices of
4 inputs of the 8 rows, so that one int32 lane of a vector register accumulates one output
(int8_ir.py). The activations are quantized the same way as they arrive, per row and group:
scale = max|x| / 127, q = round(x / scale) (`quantize_row`, the rule of dtypes.quantize_int8). A
product of two groups is then an exact integer, formed by the CPU's integer dot-product instructions,
and scaled once per group:

    y[m, n] = fma(isum_g, xs[m, g] * ws[n, g], ...) over the groups g in order (`dot_groups`)

Every path (`plain` here, `avx2`, `vnni`), tile shape, thread count and number of rows gives bitwise
this order, so a row's result is the same decoded alone or with 15 others, and a prompt (the same
tiles over column blocks) gives bitwise what decoding its rows one by one would.

- `linear_i8`, `norm_linear_i8`: few rows (a decode step, a short prompt), quantized on the calling
  thread; each thread streams its band of weight blocks once, and every row meets each block while
  it is in cache.
- `quantize` then `gemm_i8` per column block: a prompt's rows, the blocks taken by the team's threads.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .activations import epilogue
from .codes import GROUP, INTERLEAVE, PACK, PATH_AVX2, PATH_PLAIN, PATH_VNNI
from .cpu import target_paths
from .int8_ir import make_tile
from .ir import fma32
from .jit import exact_helper, helper, kernel, kernel_part, serial_kernel
from .layernorm import norm_row

F32 = np.float32
HAS_AVX2 = PATH_AVX2 in target_paths()  # fixed when the kernels compile (Numba caches them per CPU feature set)
REUSE_BYTES = 1 << 17  # a batch of more than PACK rows goes over blocks of weights of this size at a time (L2)
SLICE_BYTES = GROUP * INTERLEAVE  # one block's group: 8 slices of 32 bytes

# One tile per number of rows in a pack, against one weight block: the block's bytes are one sequential
# stream, which the prefetchers follow at full speed (measured: four blocks side by side, each a short
# stream of its own, read 20.9 GB/s where one at a time read 37 on 768 x 3072 int8 products).
_avx2_1, _avx2_2, _avx2_3, _avx2_4 = (make_tile(rows, PATH_AVX2) for rows in range(1, PACK + 1))
_vnni_1, _vnni_2, _vnni_3, _vnni_4 = (make_tile(rows, PATH_VNNI) for rows in range(1, PACK + 1))


def packed_shapes(rows: int, inputs: int) -> tuple[tuple[int, int, int, int], tuple[int, int, int]]:
    """Shapes of the quantized activations of `rows` rows of `inputs` values: x8 int8 [packs, G,
    PACK, 64] (a row's group g: 32 bytes of q, then for VNNI 128 * the sum of q as an int32) and xs
    float32 [packs, G, PACK]. A tile of up to PACK rows reads each group of its rows from one place."""
    packs, groups = -(-rows // PACK), -(-inputs // GROUP)
    return (packs, groups, PACK, 2 * GROUP), (packs, groups, PACK)


# --------------------------------------------------------------------------- activations
@helper
def group_scale(x, k0, k1):
    """max|x[k0:k1]| / 127, the scale of one group of activations (the rule of dtypes.quantize_int8);
    NaN if the group holds NaN or infinity, so that the outputs it feeds are NaN (a broken checkpoint
    is detected at the logits, as in every dtype). Written to vectorise: x * 0 is NaN exactly when x
    is NaN or infinite."""
    amax = F32(0.0)
    probe = F32(0.0)
    for k in range(k0, k1):
        a = abs(x[k])
        amax = a if a > amax else amax
        probe += x[k] * F32(0.0)
    return amax / F32(127.0) if probe == F32(0.0) else F32(np.nan)


@helper
def quantized_value(v, d):
    """round(v / d) as an int8 in -127..127 for a scale d > 0 from group_scale (|v| <= 127 d)."""
    return np.int8(np.int32(np.rint(v / d)))


@helper
def quantize_row(x, x8, xs, m, path):
    """Row m of the activations, x float32 [K], into its pack (packed_shapes): per group g, the
    scale d (group_scale) in xs, q = round(x / d) (zeros past K, and everywhere for a zero or NaN
    scale) in x8, and for VNNI 128 * (the sum of the group's q) beside it (int8_ir.py)."""
    K = x.shape[0]
    pack, slot = m // PACK, m % PACK
    for g in range(xs.shape[1]):
        k0 = g * GROUP
        n = min(K, k0 + GROUP) - k0
        d = group_scale(x, k0, k0 + n)
        xs[pack, g, slot] = d
        row = x8[pack, g, slot]
        if d > F32(0.0):
            for k in range(n):
                row[k] = quantized_value(x[k0 + k], d)
        else:
            n = 0
        for k in range(n, GROUP):
            row[k] = 0
        if path == PATH_VNNI:  # 128 * the sum of q, as the int32 little-endian in the bytes after q
            total = np.int32(0)
            for k in range(GROUP):
                total += np.int32(row[k])
            total *= np.int32(128)
            for t in range(4):
                row[GROUP + t] = np.int8((total >> np.int32(8 * t)) & np.int32(255))


@kernel
def requantize(x, out, r0, r1):
    """out[r0:r1] = the values the quantization of x[r0:r1] stands for, d * q per group (x, out
    [M, K]): what a prompt multiplies with BLAS (on dequantized weights) where that is faster than
    the integer GEMM. Rows r0..r1-1 only: the team's threads take blocks of rows (threads.run_blocks)."""
    K = x.shape[1]
    for m in prange(r0, r1):
        for k0 in range(0, K, GROUP):
            k1 = min(K, k0 + GROUP)
            d = group_scale(x[m], k0, k1)
            for k in range(k0, k1):
                out[m, k] = d * F32(quantized_value(x[m, k], d)) if d > F32(0.0) else F32(0.0) * d


@kernel
def quantize(x, x8, xs, r0, r1, path):
    """Rows r0..r1-1 of x [M, K] quantized (quantize_row) into x8, xs (packed_shapes): a block of a prompt's rows."""
    for m in prange(r0, r1):
        quantize_row(x[m], x8, xs, m, path)


@kernel
def norm_quantize(x, g, beta, eps, h, x8, xs, r0, r1, path):
    """h = layer_norm(x) (layernorm.py), then h quantized as by `quantize`, for rows r0..r1-1."""
    for m in prange(r0, r1):
        norm_row(x[m], g, beta, eps, h[m])
        quantize_row(h[m], x8, xs, m, path)


# --------------------------------------------------------------------------- the plain path
@helper
def _integer_dot(x8, pack, g, slot, w, n):
    """sum of q[k] * w[n, k] over the 32 inputs of group g of row (pack, slot), in int32: exact, so
    any order gives the same sum. w interleaved: input 4s + t of row r of a block is at 32s + 4r + t."""
    t = np.int32(0)
    blk, r = n // INTERLEAVE, n % INTERLEAVE
    for k in range(GROUP):
        t += np.int32(x8[pack, g, slot, k]) * np.int32(w[blk, g, (k // 4) * (4 * INTERLEAVE) + 4 * r + k % 4])
    return t


@exact_helper
def dot_groups(x8, xs, m, w, ws, n):
    """Output [m, n] as a plain loop: per group, the exact integer sum of its products, then
    acc = fma(sum, xs * ws, acc), group after group. int8_ir's tiles match it bitwise. Not inlined,
    and compiled without fast-math, so the order written here is the order computed."""
    pack, slot = m // PACK, m % PACK
    blk, r = n // INTERLEAVE, n % INTERLEAVE
    acc = F32(0.0)
    for g in range(ws.shape[1]):
        acc = fma32(F32(_integer_dot(x8, pack, g, slot, w, n)), xs[pack, g, slot] * ws[blk, g, r], acc)
    return acc


# --------------------------------------------------------------------------- tiles
@helper
def _plain_blocks(M, x8, xs, w, ws, b, out, mode, c0, c1):
    N = out.shape[1]
    for blk in range(c0, c1):
        for j in range(blk * INTERLEAVE, min(N, (blk + 1) * INTERLEAVE)):
            for m in range(M):
                epilogue(out, m, j, dot_groups(x8, xs, m, w, ws, j) + b[j], mode)


@helper
def _pack_times_blocks(x8, xs, m0, rows, w, ws, b, out, mode, c0, c1, vnni, t):
    """Outputs of rows m0..m0+rows-1 (one pack) for weight blocks c0..c1-1, a block at a time (t:
    the tile's scratch)."""
    N = out.shape[1]
    for blk in range(c0, c1):
        if rows == 1:
            _vnni_1(x8, xs, m0, w, ws, blk, t) if vnni else _avx2_1(x8, xs, m0, w, ws, blk, t)
        elif rows == 2:
            _vnni_2(x8, xs, m0, w, ws, blk, t) if vnni else _avx2_2(x8, xs, m0, w, ws, blk, t)
        elif rows == 3:
            _vnni_3(x8, xs, m0, w, ws, blk, t) if vnni else _avx2_3(x8, xs, m0, w, ws, blk, t)
        else:
            _vnni_4(x8, xs, m0, w, ws, blk, t) if vnni else _avx2_4(x8, xs, m0, w, ws, blk, t)
        for i in range(rows):
            for r in range(min(INTERLEAVE, N - blk * INTERLEAVE)):
                j = blk * INTERLEAVE + r
                epilogue(out, m0 + i, j, t[i * INTERLEAVE + r] + b[j], mode)


@helper
def rows_times_blocks(M, x8, xs, w, ws, b, out, mode, c0, c1, path):
    """out[:M, 8 c0 : 8 c1] = epilogue(x @ w.T + b) for weight blocks c0..c1-1: with more rows than a
    pack, the blocks go REUSE_BYTES at a time, so that every pack meets them while they are in cache."""
    if path == PATH_PLAIN or (path == PATH_AVX2 and not HAS_AVX2):
        _plain_blocks(M, x8, xs, w, ws, b, out, mode, c0, c1)
        return
    step = max(1, c1 - c0) if M <= PACK else max(1, REUSE_BYTES // (w.shape[1] * (SLICE_BYTES + 4 * INTERLEAVE)))
    tile = np.empty(PACK * INTERLEAVE, F32)  # a tile's outputs (int8_ir.make_tile)
    for s0 in range(c0, c1, step):
        s1 = min(c1, s0 + step)
        for m0 in range(0, M, PACK):
            _pack_times_blocks(x8, xs, m0, min(PACK, M - m0), w, ws, b, out, mode, s0, s1, path == PATH_VNNI, tile)


# --------------------------------------------------------------------------- few rows: decoding
@kernel
def linear_i8(x, x8, xs, w, ws, b, out, mode, bands, path):
    """out = epilogue(x @ w.T + b) for few rows: x float32 [M, K] is quantized into x8, xs
    (packed_shapes, scratch) on the calling thread; w int8 [N / 8, G, 256] with scales ws [N / 8, G,
    8] (interleaved); b [N]; out [M, N]; `bands` contiguous bands of weight blocks, one per thread
    (the thread count, passed in: numba.get_num_threads() inside a kernel defeats caching)."""
    for m in range(x.shape[0]):
        quantize_row(x[m], x8, xs, m, path)
    _bands(x.shape[0], x8, xs, w, ws, b, out, mode, bands, path)


@kernel
def norm_linear_i8(x, g, beta, eps, h, x8, xs, w, ws, b, out, mode, bands, path):
    """h = layer_norm(x), then out = epilogue(h @ w.T + b) as in `linear_i8`: one launch."""
    for m in range(x.shape[0]):
        norm_row(x[m], g, beta, eps, h[m])
        quantize_row(h[m], x8, xs, m, path)
    _bands(x.shape[0], x8, xs, w, ws, b, out, mode, bands, path)


@kernel_part
def _bands(M, x8, xs, w, ws, b, out, mode, bands, path):
    blocks = w.shape[0]
    per = -(-blocks // bands)
    for t in prange(bands):
        rows_times_blocks(M, x8, xs, w, ws, b, out, mode, t * per, min(blocks, (t + 1) * per), path)


# --------------------------------------------------------------------------- many rows: prompts
@serial_kernel
def gemm_i8(M, x8, xs, w, ws, b, out, mode, j0, j1, path):
    """out[:, j0:j1] = epilogue(x @ w[j0:j1].T + b[j0:j1]) for M rows quantized into x8, xs by
    `quantize`, on the calling thread: one column block of a prompt's product (j0 a multiple of 8,
    j1 too unless it is N), which a thread of the team takes (threads.run_blocks)."""
    rows_times_blocks(M, x8, xs, w, ws, b, out, mode, j0 // INTERLEAVE, -(-j1 // INTERLEAVE), path)
