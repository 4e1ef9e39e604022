"""Weight storage formats and reading one row of a weight matrix as float32 in registers.

A weight matrix is stored [N, K]: one row per output, K inputs each (the transpose of GPT-2's Conv1D
layout), so that an output is the dot product of one contiguous row with the input vector and each
thread streams its rows sequentially from memory. A row is held in one of four formats:

    F32   float32
    F16   IEEE float16, stored as its uint16 bits (Numba has no float16 array on the CPU)
    BF16  bfloat16, stored as its uint16 bits (the high half of a float32)
    I8    int8 with one float32 scale per group of GROUP consecutive inputs: w[k] = scale[k // GROUP] * q[k]

Activations, accumulation and results stay float32; float16 and bfloat16 values are widened in
registers as they are read. `row_dot` picks the format from the array's type (and `fmt` for the two
uint16 formats) when a kernel is compiled, so each kernel is written once for those formats. int8
rows are multiplied in integers with quantized activations (int8.py); here they are only widened
for lookups (the embedding) and for BLAS blocks (`widen_row`).
"""

import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic, overload

from .codes import BF16, F16, F32_FORMAT, GROUP, I8  # noqa: F401  (the format codes, shared with dtypes.py)
from .dot import dot
from .jit import FASTMATH, helper

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
def dot_f16(w, x):
    """sum(float16(w[k]) * x[k]) for a row of float16 bits."""
    s = F32(0.0)
    for k in range(x.shape[0]):
        s += f16_bits_to_f32(w[k]) * x[k]
    return s


@helper
def dot_bf16(w, x):
    """sum(bfloat16(w[k]) * x[k]) for a row of bfloat16 bits."""
    s = F32(0.0)
    for k in range(x.shape[0]):
        s += bf16_bits_to_f32(w[k]) * x[k]
    return s


# LLVM IR pieces of the int8 dequantization below: 16 lanes, what one AVX-512 register (two AVX ones) holds.
_F32, _I8, _I32, _I64 = ir.FloatType(), ir.IntType(8), ir.IntType(32), ir.IntType(64)
_VEC, _QVEC, _IVEC = ir.VectorType(_F32, 16), ir.VectorType(_I8, 16), ir.VectorType(_I32, 16)


def _int8x16_as_f32(builder, q, k):
    """The 16 int8 values q[k:k+16] (q an i8 pointer) as 16 float32 lanes."""
    wq = builder.load(builder.bitcast(builder.gep(q, [k]), _QVEC.as_pointer()), align=1)
    return builder.sitofp(builder.sext(wq, _IVEC), _VEC)


def _splat(builder, value):
    """A float32 value in all 16 lanes."""
    one = builder.insert_element(ir.Constant(_VEC, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, ir.Constant(_VEC, ir.Undefined), ir.Constant(_IVEC, [0] * 16))


@intrinsic
def _int8_groups_to_f32(typingctx, q, scale, out, n_groups):
    """out[k] = scale[k // 32] * float(q[k]) for k < 32 * n_groups (1-D C arrays q int8, scale and
    out float32), 16 lanes at a time. LLVM does not vectorise this loop written in Numba (per-value
    conversions: 1.8 G values/s per core, against 10 for float16's)."""
    if GROUP != 32:
        return None

    def codegen(context, builder, signature, args):
        qp, sp, op = (
            builder.bitcast(context.make_array(t)(context, builder, v).data, e.as_pointer())
            for t, v, e in zip(signature.args[:3], args[:3], (_I8, _F32, _F32))
        )
        n = builder.sext(args[3], _I64) if args[3].type.width < 64 else args[3]
        with cgutils.for_range(builder, n) as loop:
            g = loop.index
            splat = _splat(builder, builder.load(builder.gep(sp, [g])))
            for half in (0, 1):
                k = builder.add(builder.mul(g, ir.Constant(_I64, 32)), ir.Constant(_I64, 16 * half))
                value = builder.fmul(_int8x16_as_f32(builder, qp, k), splat)
                builder.store(value, builder.bitcast(builder.gep(op, [k]), _VEC.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.none(q, scale, out, n_groups), codegen


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
            q, s, K = w[j], scale[j], out.shape[0]
            full = K // GROUP
            _int8_groups_to_f32(q, s, out, full)
            for k in range(full * GROUP, K):
                out[k] = s[full] * F32(q[k])

        return by_group

    def by_value(w, scale, fmt, j, out):
        for k in range(out.shape[0]):
            out[k] = _widen(w, scale, fmt, j, k)

    return by_value


def row_dot(w, scale, fmt, j, x):  # dispatched on the storage type by the overload below
    """Row j of weight matrix w (float32, float16 or bfloat16 in format fmt) dotted with the float32 vector x."""
    raise NotImplementedError


@overload(row_dot, inline="always", jit_options={"fastmath": FASTMATH})
def _row_dot(w, scale, fmt, j, x):
    if w.dtype == types.float32:
        return lambda w, scale, fmt, j, x: dot(w[j], x)
    if w.dtype == types.uint16:

        def half(w, scale, fmt, j, x):
            return dot_f16(w[j], x) if fmt == F16 else dot_bf16(w[j], x)

        return half
    return None  # int8 weights are multiplied in integers (int8.py)


@overload(_widen)  # strict float semantics: the product is rounded on its own, never fused into a sum
def _widen_impl(w, scale, fmt, j, k):
    if w.dtype == types.float32:
        return lambda w, scale, fmt, j, k: w[j, k]
    if w.dtype == types.uint16:
        return lambda w, scale, fmt, j, k: f16_bits_to_f32(w[j, k]) if fmt == F16 else bf16_bits_to_f32(w[j, k])
    if w.dtype == types.int8:
        return lambda w, scale, fmt, j, k: scale[j, k // GROUP] * F32(w[j, k])
    return None
