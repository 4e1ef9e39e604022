"""GELU (GPT-2's tanh approximation) and the epilogue that finishes every linear layer."""

import numpy as np
from numba import prange

from .jit import helper, kernel
from .vecmath import tanh

F32 = np.float32
GELU_C = np.float32(0.7978845608028654)  # sqrt(2 / pi), rounded once to float32
GELU_A = np.float32(0.044715)

# Epilogue modes shared with the linear kernel: what happens to y = x @ w.T + b.
STORE = 0  # out = y
GELU = 1  # out = gelu(y)
ADD = 2  # out += y  (residual connection)


@helper
def gelu(x):
    """0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))), in float32."""
    return F32(0.5) * x * (F32(1.0) + tanh(GELU_C * (x + GELU_A * x * x * x)))


@helper
def epilogue(out, m, j, y, mode):
    """Write one output of a linear layer: store, store GELU, or add (residual)."""
    if mode == GELU:
        out[m, j] = gelu(y)
    elif mode == ADD:
        out[m, j] += y
    else:
        out[m, j] = y


@kernel
def bias_epilogue(y, b, out, mode, j0):
    """out[:, j0:j0 + n] = epilogue(y + b[j0:j0 + n]) row by row. y [M, n] (a BLAS product of output
    columns j0..j0+n-1), b [N], out [M, N]; y may be out when j0 = 0 and n = N."""
    M, n = y.shape
    for m in prange(M):
        for j in range(n):
            epilogue(out, m, j0 + j, y[m, j] + b[j0 + j], mode)
