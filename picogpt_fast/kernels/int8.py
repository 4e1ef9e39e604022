"""int8 weights times int8 activations: the products of every int8 linear layer, decoding and prompts.

An int8 weight row holds one float32 scale per group of 32 inputs (formats.py). The activations are
quantized the same way as they arrive, per row and group: scale = max|x| / 127, q = round(x / scale)
(`quantize_row`, the rule of dtypes.quantize_int8). A product of two groups is then an exact integer,
formed by the CPU's integer dot-product instructions (int8_ir.py), and scaled once per group:

    y[m, n] = sum over groups g of xs[m, g] * ws[n, g] * (xq[m, group g] . w[n, group g])

with the float steps in a fixed order, so that every path (`plain` here, `avx2`, `vnni`), tile
shape, thread count and batch size gives bitwise the same output.

- Decoding (`linear_i8`, `norm_linear_i8`): the few rows are quantized on the calling thread, then
  each thread streams its band of weight rows (linear.py's layout); a batch takes four rows at a time
  against each weight row, which is read once. Each group is summed in 8 lanes of 4 inputs, and the
  lanes are added at the end (`dot_plain`, int8_ir.make_tile).
- Prompts (`quantize` then `gemm_i8` per column block, run by the team's threads): with VNNI, blocks
  of weight rows that fit the L2 cache are repacked so that each int32 lane is one output, and a pack
  of 4 input rows meets 8 outputs at a time; a group's sum is complete in integers before its one
  float step (`dot_groups`, int8_ir.make_block_tile). That is 8 times fewer float steps than the
  decode order (measured in docs/performance.md); the two orders differ in float rounding only.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .activations import epilogue
from .codes import GROUP, PACK, PATH_AVX2, PATH_VNNI
from .cpu import target_paths
from .int8_ir import fma32, make_block_tile, make_tile
from .jit import exact_helper, helper, kernel, kernel_part, serial_kernel
from .layernorm import norm_row

F32 = np.float32
_PATHS = target_paths()  # fixed when the kernels compile (Numba caches them per CPU feature set)
HAS_AVX2, HAS_VNNI = PATH_AVX2 in _PATHS, PATH_VNNI in _PATHS
L2_BYTES = 1 << 18  # the weight block a prompt tile loop reuses (half a typical L2)

_t11_avx2, _t11_vnni = make_tile(1, 1, PATH_AVX2), make_tile(1, 1, PATH_VNNI)
_t41_avx2, _t41_vnni = make_tile(4, 1, PATH_AVX2), make_tile(4, 1, PATH_VNNI)
_block_vnni = make_block_tile(PATH_VNNI)


def packed_shapes(rows: int, inputs: int) -> tuple[tuple[int, int, int, int], tuple[int, int, int]]:
    """Shapes of the quantized activations of `rows` rows of `inputs` values: x8 int8 [packs, G,
    PACK, 64] (a row's group g: 32 bytes of q, then 32 of its unsigned form) and xs float32 [packs,
    G, PACK]. A tile of PACK rows reads each group of its rows from one place."""
    packs, groups = -(-rows // PACK), -(-inputs // GROUP)
    return (packs, groups, PACK, 2 * GROUP), (packs, groups, PACK)


@helper
def _vnni(path):
    """Whether `path` runs as VNNI here (on a CPU without it, VNNI runs as AVX2: int8_ir.emitted_path)."""
    return HAS_VNNI and path == PATH_VNNI


# --------------------------------------------------------------------------- activations
@helper
def group_scale(x, k0, k1):
    """max|x[k0:k1]| / 127, the scale of one group of activations (the rule of dtypes.quantize_int8);
    NaN if the group holds NaN or infinity, so that the outputs it feeds are NaN (a broken checkpoint
    is detected at the logits, as in every dtype)."""
    amax = F32(0.0)
    finite = True
    for k in range(k0, k1):
        a = abs(x[k])
        finite = finite and a < F32(np.inf)
        amax = a if a > amax else amax
    return amax / F32(127.0) if finite else F32(np.nan)


@helper
def quantized_value(v, d):
    """round(v / d) as an int in -127..127 (0 for a zero or NaN scale)."""
    if d > F32(0.0):
        r = np.rint(v / d)
        if abs(r) <= F32(127.0):
            return int(r)
    return 0


@helper
def quantize_row(x, x8, xs, m, path):
    """Row m of the activations, x float32 [K], into its pack (packed_shapes): per group g, the
    scale d (group_scale) in xs, q = round(x / d) (zeros past K) and its unsigned form (|q| for the
    plain and AVX2 paths, q + 128 for VNNI: int8_ir.py) in x8."""
    K = x.shape[0]
    pack, slot = m // PACK, m % PACK
    for g in range(xs.shape[1]):
        k0 = g * GROUP
        k1 = min(K, k0 + GROUP)
        d = group_scale(x, k0, k1)
        xs[pack, g, slot] = d
        row = x8[pack, g, slot]
        for k in range(GROUP):
            v = quantized_value(x[k0 + k], d) if k0 + k < k1 else 0
            row[k] = v
            row[GROUP + k] = v ^ -128 if _vnni(path) else abs(v)  # as int8 bits: v ^ -128 reads as v + 128 unsigned


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
                out[m, k] = d * F32(quantized_value(x[m, k], d))


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
def _integer_dot(x8, pack, g, slot, w, n, k0, k1):
    """sum of q[k] * w[n, k] over the inputs k0 <= k < k1 of group g of row (pack, slot), in int32:
    exact, so any order gives the same sum (integers only: the caller's float order is unaffected)."""
    t = np.int32(0)
    base = g * GROUP
    for k in range(k0, k1):
        t += np.int32(x8[pack, g, slot, k - base]) * np.int32(w[n, k])
    return t


@exact_helper
def dot_plain(x8, xs, m, w, ws, n):
    """Output [m, n] as a plain loop: the arithmetic int8_ir.py's tiles must match bitwise. Not
    inlined, and compiled without fast-math, so the order written here is the order computed."""
    K = w.shape[1]
    pack, slot = m // PACK, m % PACK
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = F32(0.0)
    for g in range(ws.shape[1]):
        d = xs[pack, g, slot] * ws[n, g]
        k = g * GROUP
        a0 = fma32(F32(_integer_dot(x8, pack, g, slot, w, n, min(K, k + 0), min(K, k + 4))), d, a0)
        a1 = fma32(F32(_integer_dot(x8, pack, g, slot, w, n, min(K, k + 4), min(K, k + 8))), d, a1)
        a2 = fma32(F32(_integer_dot(x8, pack, g, slot, w, n, min(K, k + 8), min(K, k + 12))), d, a2)
        a3 = fma32(F32(_integer_dot(x8, pack, g, slot, w, n, min(K, k + 12), min(K, k + 16))), d, a3)
        a4 = fma32(F32(_integer_dot(x8, pack, g, slot, w, n, min(K, k + 16), min(K, k + 20))), d, a4)
        a5 = fma32(F32(_integer_dot(x8, pack, g, slot, w, n, min(K, k + 20), min(K, k + 24))), d, a5)
        a6 = fma32(F32(_integer_dot(x8, pack, g, slot, w, n, min(K, k + 24), min(K, k + 28))), d, a6)
        a7 = fma32(F32(_integer_dot(x8, pack, g, slot, w, n, min(K, k + 28), min(K, k + 32))), d, a7)
    return ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))


# --------------------------------------------------------------------------- tiles, on the chosen path
@helper
def tile11(x8, xs, m, w, ws, n, path):
    """Output [m, n]."""
    if _vnni(path):
        return _t11_vnni(x8, xs, m, w, ws, n)[0]
    if HAS_AVX2 and path >= PATH_AVX2:
        return _t11_avx2(x8, xs, m, w, ws, n)[0]
    return dot_plain(x8, xs, m, w, ws, n)


@helper
def tile41(x8, xs, m0, w, ws, n, path):
    """Outputs [m0..m0+3, n] (m0 a multiple of PACK): one weight row against a pack of input rows."""
    if _vnni(path):
        return _t41_vnni(x8, xs, m0, w, ws, n)
    if HAS_AVX2 and path >= PATH_AVX2:
        return _t41_avx2(x8, xs, m0, w, ws, n)
    return (
        dot_plain(x8, xs, m0, w, ws, n),
        dot_plain(x8, xs, m0 + 1, w, ws, n),
        dot_plain(x8, xs, m0 + 2, w, ws, n),
        dot_plain(x8, xs, m0 + 3, w, ws, n),
    )


# --------------------------------------------------------------------------- decoding: few rows
@kernel
def linear_i8(x, x8, xs, w, ws, b, out, mode, bands, path):
    """out = epilogue(x @ w.T + b) for the few rows of a decode step: x float32 [M, K] is quantized
    into x8, xs (packed_shapes, scratch) on the calling thread; w int8 [N, K] with scales ws [N, G];
    b [N]; out [M, N]; `bands` contiguous bands of weight rows, one per thread (linear.py)."""
    for m in range(x.shape[0]):
        quantize_row(x[m], x8, xs, m, path)
    _rows_times_int8(x.shape[0], x8, xs, w, ws, b, out, mode, bands, path)


@kernel
def norm_linear_i8(x, g, beta, eps, h, x8, xs, w, ws, b, out, mode, bands, path):
    """h = layer_norm(x), then out = epilogue(h @ w.T + b) as in `linear_i8`: one launch."""
    for m in range(x.shape[0]):
        norm_row(x[m], g, beta, eps, h[m])
        quantize_row(h[m], x8, xs, m, path)
    _rows_times_int8(x.shape[0], x8, xs, w, ws, b, out, mode, bands, path)


@kernel_part
def _rows_times_int8(M, x8, xs, w, ws, b, out, mode, bands, path):
    N, K = w.shape
    per = -(-N // bands)
    block = max(1, 16384 // K) if M > 1 else per  # a batch meets each block of weight rows while it is in L1
    grouped = M - M % PACK
    for t in prange(bands):
        end = min(N, (t + 1) * per)
        for j0 in range(t * per, end, block):
            j1 = min(end, j0 + block)
            for m0 in range(0, grouped, PACK):
                for j in range(j0, j1):
                    s = tile41(x8, xs, m0, w, ws, j, path)
                    for i in range(PACK):
                        epilogue(out, m0 + i, j, s[i] + b[j], mode)
            for m in range(grouped, M):
                for j in range(j0, j1):
                    epilogue(out, m, j, tile11(x8, xs, m, w, ws, j, path) + b[j], mode)


# --------------------------------------------------------------------------- prompts: many rows
@exact_helper
def dot_groups(x8, xs, m, w, ws, n):
    """Output [m, n] of the prompt GEMM as a plain loop: per group, the exact integer sum of its
    products, then acc = fma(sum, xs * ws, acc), group after group. int8_ir.make_block_tile matches
    it bitwise. (Decoding sums each group in 8 lanes instead, `dot_plain`: the two orders differ in
    float rounding only.)"""
    K = w.shape[1]
    pack, slot = m // PACK, m % PACK
    acc = F32(0.0)
    for g in range(ws.shape[1]):
        t = _integer_dot(x8, pack, g, slot, w, n, g * GROUP, min(K, g * GROUP + GROUP))
        acc = fma32(F32(t), xs[pack, g, slot] * ws[n, g], acc)
    return acc


@helper
def repack(w, ws, j0, j1, wp, wps, wc):
    """Weight rows j0..j1-1 in blocks of 8, as int8_ir.make_block_tile reads them: wp [blocks, G, 256]
    (per group, 8 slices: slice s holds inputs 4s..4s+3 of each of the 8 rows), wps [blocks, G, 8]
    the rows' scales, wc [blocks, G, 8] VNNI's compensation, -128 * (the row's group sum). Rows past
    j1 and inputs past K are zeros."""
    K, G = w.shape[1], ws.shape[1]
    for bi in range((j1 - j0 + 7) // 8):
        for r in range(8):
            j = j0 + bi * 8 + r
            whole = j < j1 and K % GROUP == 0  # the common case: whole groups, copied 4 bytes at a time
            if whole:
                _move_whole_groups(w, j, wp, bi, r)
            for g in range(G):
                total = np.int32(0)
                if whole:
                    for k in range(GROUP):
                        total += np.int32(w[j, g * GROUP + k])
                else:
                    for k in range(GROUP):
                        v = w[j, g * GROUP + k] if j < j1 and g * GROUP + k < K else np.int8(0)
                        wp[bi, g, (k // 4) * 32 + r * 4 + k % 4] = v
                        total += np.int32(v)
                wc[bi, g, r] = np.int32(-128) * total
                wps[bi, g, r] = ws[j, g] if j < j1 else F32(0.0)


@helper
def _move_whole_groups(w, j, wp, bi, r):
    """repack's copy for K a multiple of the group: row j into slot r of block bi, 4 bytes at a time."""
    w32, p32 = w.view(np.int32), wp.view(np.int32)
    for g in range(wp.shape[1]):
        for s in range(8):
            p32[bi, g, s * 8 + r] = w32[j, g * 8 + s]


@serial_kernel
def gemm_i8(M, x8, xs, w, ws, b, out, mode, j0, j1, path):
    """out[:, j0:j1] = epilogue(x @ w[j0:j1].T + b[j0:j1]) for M rows quantized into x8, xs by
    `quantize`, on the calling thread: one column block of a prompt's product, which a thread of the
    team takes (threads.run_blocks). With VNNI, weight rows go by blocks that stay in L2, repacked
    (`repack`) so that each pack of input rows meets them 8 rows at a time; every path computes
    `dot_groups`' order."""
    K, G = w.shape[1], ws.shape[1]
    if not _vnni(path):
        for j in range(j0, j1):
            for m in range(M):
                epilogue(out, m, j, dot_groups(x8, xs, m, w, ws, j) + b[j], mode)
        return
    block = max(8, (L2_BYTES // max(K, 1)) // 8 * 8)
    wp = np.empty((block // 8, G, 8 * GROUP), np.int8)
    wps = np.empty((block // 8, G, 8), F32)
    wc = np.empty((block // 8, G, 8), np.int32)
    tile = np.empty((PACK, 8), F32)
    for jb in range(j0, j1, block):
        je = min(j1, jb + block)
        repack(w, ws, jb, je, wp, wps, wc)
        for m0 in range(0, M, PACK):
            rows = min(PACK, M - m0)
            for bi in range((je - jb + 7) // 8):
                _block_vnni(x8, xs, m0, wp, wps, wc, bi, tile)
                for c in range(min(8, je - jb - bi * 8)):
                    j = jb + bi * 8 + c
                    for i in range(rows):
                        epilogue(out, m0 + i, j, tile[i, c] + b[j], mode)
