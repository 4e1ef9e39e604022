"""The memory bandwidth probe of `picogpt-fast bench` and bench/: a plain streaming read.

Each thread sums one long contiguous range of a large array, front to back: the access pattern a
memory system serves best, and not the shape of any of the engine's kernels, so that a decode's
GB/s set against it says how close the kernels come to the memory's own speed. The sum is written
as IR with eight independent vector sums, so that the adds never limit the reads (a plain Numba
loop, vectorised with one sum, read 7 GB/s per core where this reads the memory's 20 and more).
"""

import numpy as np
from llvmlite import ir
from numba import prange
from numba.core import types
from numba.extending import intrinsic

from .ir import FLOATS, I32, I64, STRICT, accumulate, load, row_pointer
from .jit import kernel

F32 = np.float32
SUMS = 8  # independent vector sums: 8 x 8 floats = 256 bytes a step


@intrinsic
def _range_sum(typingctx, a, start, steps):
    """The sum of a[start : start + 64 * steps] (a 1-D float32 C array), in eight vector sums."""
    if not (isinstance(a, types.Array) and a.ndim == 1 and a.dtype == types.float32 and a.layout == "C"):
        return None

    def codegen(context, builder, sig, args):
        base = row_pointer(context, builder, sig.args[0], args[0], ir.Constant(I64, 0), ir.FloatType())
        base = builder.gep(base, [args[1]])

        def step(k, sums):
            at = builder.mul(k, ir.Constant(I64, 8 * SUMS))
            return [
                builder.fadd(s, load(builder, base, builder.add(at, ir.Constant(I64, 8 * j)), FLOATS, 4), flags=STRICT)
                for j, s in enumerate(sums)
            ]

        sums = accumulate(builder, args[2], SUMS, step, "stream")
        total = sums[0]
        for s in sums[1:]:
            total = builder.fadd(total, s, flags=STRICT)
        lanes = [builder.extract_element(total, ir.Constant(I32, i)) for i in range(8)]
        value = lanes[0]
        for lane in lanes[1:]:
            value = builder.fadd(value, lane, flags=STRICT)
        return value

    return types.float32(a, types.int64, types.int64), codegen


@kernel
def stream_read(a, out):
    """out[t] = the sum of range t of the 1-D array a, split into len(out) contiguous ranges (one
    per thread; a remainder shorter than 64 elements per range is not read), so that the reads
    cannot be optimised away."""
    ranges = out.shape[0]
    steps = a.shape[0] // ranges // (8 * SUMS)
    for t in prange(ranges):
        out[t] = _range_sum(a, t * steps * 8 * SUMS, steps)
