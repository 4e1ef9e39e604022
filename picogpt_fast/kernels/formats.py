"""Weight storage formats and reading one row of a weight matrix as float32 in registers.

A weight matrix is stored [N, K]: one row per output, K inputs each (the transpose of GPT-2's Conv1D
layout), so that an output is the dot product of one contiguous row with the input vector and each
thread streams its rows sequentially from memory. A row is held in one of four formats:

    F32   float32
    F16   IEEE float16, stored as its uint16 bits (Numba has no float16 array on the CPU)
    BF16  bfloat16, stored as its uint16 bits (the high half of a float32)
    I8    int8 with one float32 scale per group of GROUP consecutive inputs: w[k] = scale[k // GROUP] * q[k],
          interleaved in blocks of INTERLEAVE rows (dtypes.interleave_int8, int8.py)

Activations, accumulation and results stay float32; float16 and bfloat16 values are widened in
registers as they are read (float_ir.py), and int8 rows are multiplied in integers with quantized
activations (int8.py). Here a weight is widened for lookups (the embedding, `widen`) and whole rows
for BLAS blocks (`widen_row`), picked by the array's type (and `fmt` for the two uint16 formats).
"""

import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic, overload

from .codes import F16, GROUP, INTERLEAVE
from .jit import helper

F32 = np.float32


@intrinsic
def f16_bits_to_f32(typingctx, bits):
    """The float32 value of a float16 given as its 16 bits (LLVM vectorises it to vcvtph2ps)."""
    if not isinstance(bits, types.Integer) or bits.bitwidth != 16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def bf16_bits_to_f32(typingctx, bits):
    """The float32 value of a bfloat16 given as its 16 bits: they are the float32's high half."""
    if not isinstance(bits, types.Integer) or bits.bitwidth != 16:
        return None

    def codegen(context, builder, signature, args):
        wide = builder.zext(args[0], ir.IntType(32))
        return builder.bitcast(builder.shl(wide, ir.Constant(ir.IntType(32), 16)), ir.FloatType())

    return types.float32(bits), codegen


@helper
def widen(w, scale, fmt, j, k):
    """Element [j, k] of a weight matrix as float32, exactly the value dtypes.dequantize gives (for
    lookups and conversions, not hot loops)."""
    return _widen(w, scale, fmt, j, k)


def _widen(w, scale, fmt, j, k):  # dispatched on the storage type by the overload below
    raise NotImplementedError


def widen_row(w, scale, fmt, j, out):  # dispatched on the storage type by the overload below
    """out[k] = widen(w, scale, fmt, j, k) for every k: row j as float32 (prompts' BLAS blocks)."""
    raise NotImplementedError


@overload(widen_row, inline="always")  # strict float semantics, as _widen
def _widen_row(w, scale, fmt, j, out):
    if w.dtype == types.int8:

        def by_group(w, scale, fmt, j, out):
            blk, r, K = j // INTERLEAVE, j % INTERLEAVE, out.shape[0]
            for g in range(w.shape[1]):
                s = scale[blk, g, r]
                q = w[blk, g]
                for k in range(min(GROUP, K - g * GROUP)):
                    out[g * GROUP + k] = s * F32(q[(k // 4) * (4 * INTERLEAVE) + 4 * r + k % 4])

        return by_group

    def by_value(w, scale, fmt, j, out):
        for k in range(out.shape[0]):
            out[k] = _widen(w, scale, fmt, j, k)

    return by_value


@overload(_widen)  # strict float semantics: the product is rounded on its own, never fused into a sum
def _widen_impl(w, scale, fmt, j, k):
    if w.dtype == types.float32:
        return lambda w, scale, fmt, j, k: w[j, k]
    if w.dtype == types.uint16:
        return lambda w, scale, fmt, j, k: f16_bits_to_f32(w[j, k]) if fmt == F16 else bf16_bits_to_f32(w[j, k])
    if w.dtype == types.int8:  # interleaved (dtypes.interleave_int8)

        def int8(w, scale, fmt, j, k):
            blk, r, g, i = j // INTERLEAVE, j % INTERLEAVE, k // GROUP, k % GROUP
            return scale[blk, g, r] * F32(w[blk, g, (i // 4) * (4 * INTERLEAVE) + 4 * r + i % 4])

        return int8
    return None
