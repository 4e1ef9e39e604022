"""Matrix products for few rows in float32, float16 and bfloat16 (int8: int8.py): every linear layer
and the output projection while decoding.

Decoding multiplies one row per sequence by every weight matrix, so it is bound by memory
bandwidth: each weight must be read once per step, at full speed. Weights are stored [N, K], one row
per output (formats.py), and `linear` gives each thread a contiguous range of output rows, which it
reads front to back. A batch of M sequences shares that pass: a tile of one weight row and two
input rows (float_ir.py) uses each weight, once loaded into a register, for both, and with more than
4 rows the weights go a cache-sized block at a time past every pack of 4 rows.

Every output is one dot product of a weight row and an input row, computed by one thread, in the
order float_ir.py writes, whatever M, the tile, the row's position in the batch and the thread
count: a sequence decoded in a batch gets bitwise the logits it gets alone, on any number of threads.

For prompts (many rows) a BLAS matrix-matrix product is faster; `engine.py` chooses, and
`dequantize` turns low-precision rows into float32 for it.
"""

import numpy as np
from numba import prange

from .activations import epilogue
from .codes import PACK
from .float_ir import make_tile
from .formats import widen_row
from .jit import helper, kernel, kernel_part
from .layernorm import norm_row

F32 = np.float32
REUSE_BYTES = 1 << 17  # a batch of more than PACK rows goes over blocks of weight rows of this size at a time (L2)

_t1, _t2 = make_tile(1), make_tile(2)  # one weight row against one or two input rows (float_ir.py)


@kernel
def linear(x, w, scale, fmt, b, out, mode, bands):
    """out = epilogue(x @ w.T + b).

    x [M, K]; w [N, K] in format fmt (float32, or float16 / bfloat16 bits; scale unused: int8 has
    int8.py); b [N]; out [M, N]; mode STORE/GELU/ADD; the rows of w are split into `bands` contiguous
    bands, one per thread (the thread count, passed in: numba.get_num_threads() inside a kernel
    defeats caching).
    """
    _bands(x, w, fmt, b, out, mode, bands)


@kernel
def norm_linear(x, g, beta, eps, h, w, scale, fmt, b, out, mode, bands):
    """h = layer_norm(x) (g, beta [K], eps), then out = epilogue(h @ w.T + b) as in `linear`: one
    launch instead of two. The few rows of a decode step are normalised on the calling thread."""
    for m in range(x.shape[0]):
        norm_row(x[m], g, beta, eps, h[m])
    _bands(h, w, fmt, b, out, mode, bands)


@kernel_part
def _bands(x, w, fmt, b, out, mode, bands):
    N = w.shape[0]
    per = -(-N // bands)
    for t in prange(bands):
        rows_times_rows(x, w, fmt, b, out, mode, t * per, min(N, (t + 1) * per))


@helper
def rows_times_rows(x, w, fmt, b, out, mode, j0, j1):
    """out[:, j0:j1] = epilogue(x @ w[j0:j1].T + b[j0:j1]) by tiles (float_ir.py): with more rows than
    a pack, the weights go REUSE_BYTES at a time, so that every pack meets them while they are in cache."""
    M = x.shape[0]
    step = max(1, j1 - j0) if M <= PACK else max(1, REUSE_BYTES // (w.shape[1] * w.itemsize))
    tile = np.empty(2, F32)  # a tile's outputs
    for s0 in range(j0, j1, step):
        s1 = min(j1, s0 + step)
        for m0 in range(0, M, PACK):
            _pack_times_rows(x, m0, min(PACK, M - m0), w, fmt, b, out, mode, s0, s1, tile)


@helper
def _pack_times_rows(x, m0, rows, w, fmt, b, out, mode, j0, j1, t):
    """Outputs of input rows m0..m0+rows-1 for weight rows j0..j1-1, one weight row at a time, two
    input rows by two (t: the tile's scratch)."""
    for j in range(j0, j1):
        for i in range(0, rows - 1, 2):
            _t2(x, m0 + i, w, j, fmt, t)
            epilogue(out, m0 + i, j, t[0] + b[j], mode)
            epilogue(out, m0 + i + 1, j, t[1] + b[j], mode)
        if rows % 2:
            _t1(x, m0 + rows - 1, w, j, fmt, t)
            epilogue(out, m0 + rows - 1, j, t[0] + b[j], mode)


@kernel
def dequantize(w, scale, fmt, j0, out):
    """out[i] = row j0 + i of w as float32, for i < len(out). w [N, K] in format fmt (int8:
    interleaved), out [n, K]."""
    for i in prange(out.shape[0]):
        widen_row(w, scale, fmt, j0 + i, out[i])
