"""Matrix products for few rows in float32, float16 and bfloat16 (int8: int8.py): every linear layer
and the output projection while decoding.

Decoding multiplies one row per sequence by every weight matrix, so it is bound by memory
bandwidth: each weight must be read once per step, at full speed. Weights are stored [N, K], one row
per output (formats.py), and `linear` gives each thread a contiguous range of output rows, which it
reads front to back: one sequential stream per thread, the pattern memory serves fastest (measured:
~30 GB/s on 2 cores where four interleaved row streams reach ~19). A batch of M sequences is handled
in the same pass: each weight row, once read, is used for every sequence while it sits in L1.

Every output is one dot product of a weight row and an input row, computed by one thread, in an
order fixed by the code, whatever M, the row's position in the batch and the thread count: a
sequence decoded in a batch gets bitwise the logits it gets alone, on any number of threads.

For prompts (many rows) a BLAS matrix-matrix product is faster; `engine.py` chooses, and
`dequantize` turns low-precision rows into float32 for it.
"""

from numba import prange

from .activations import epilogue
from .formats import row_dot, widen_row
from .jit import kernel, kernel_part
from .layernorm import norm_row


@kernel
def linear(x, w, scale, fmt, b, out, mode, bands):
    """out = epilogue(x @ w.T + b).

    x [M, K]; w [N, K] in format fmt (scale [N, ceil(K / GROUP)] for int8, else unused); b [N];
    out [M, N]; mode STORE/GELU/ADD; the rows of w are split into `bands` contiguous bands, one per
    thread (the thread count, passed in: numba.get_num_threads() inside a kernel defeats caching).
    """
    _rows_times_weights(x, w, scale, fmt, b, out, mode, bands)


@kernel
def norm_linear(x, g, beta, eps, h, w, scale, fmt, b, out, mode, bands):
    """h = layer_norm(x) (g, beta [K], eps), then out = epilogue(h @ w.T + b) as in `linear`: one
    launch instead of two. The few rows of a decode step are normalised on the calling thread."""
    for m in range(x.shape[0]):
        norm_row(x[m], g, beta, eps, h[m])
    _rows_times_weights(h, w, scale, fmt, b, out, mode, bands)


@kernel_part
def _rows_times_weights(x, w, scale, fmt, b, out, mode, bands):
    M = x.shape[0]
    N, K = w.shape
    per = -(-N // bands)
    # A batch takes each band's weight rows a few at a time, as many as fit in L1 (16 KiB), and
    # multiplies them by every input row before moving on: every weight is read from memory once,
    # and each input row stays in L1 while it meets those rows.
    block = max(1, 16384 // (K * w.itemsize)) if M > 1 else per
    for t in prange(bands):
        end = min(N, (t + 1) * per)
        for j0 in range(t * per, end, block):
            j1 = min(end, j0 + block)
            for m in range(M):
                xm = x[m]
                for j in range(j0, j1):
                    epilogue(out, m, j, row_dot(w, scale, fmt, j, xm) + b[j], mode)


@kernel
def dequantize(w, scale, fmt, j0, out):
    """out[i] = row j0 + i of w as float32, for i < len(out). w [N, K] in format fmt, out [n, K]."""
    for i in prange(out.shape[0]):
        widen_row(w, scale, fmt, j0 + i, out[i])
