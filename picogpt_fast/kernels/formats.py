"""Weight storage formats and reading one row of a weight matrix as float32 in registers.

A weight matrix is stored [N, K]: one row per output, K inputs each (the transpose of GPT-2's Conv1D
layout), so that an output is the dot product of one contiguous row with the input vector and each
thread streams its rows sequentially from memory. A row is held in one of four formats:

    F32   float32
    F16   IEEE float16, stored as its uint16 bits (Numba has no float16 array on the CPU)
    BF16  bfloat16, stored as its uint16 bits (the high half of a float32)
    I8    int8 with one float32 scale per group of GROUP consecutive inputs: w[k] = scale[k // GROUP] * q[k]

Activations, accumulation and results stay float32; low-precision values are widened in registers
as they are read. `row_dot` picks the format from the array's type (and `fmt` for the two uint16
formats) when a kernel is compiled, so each kernel is written once for all formats.
"""

import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic, overload

from ..dtypes import BF16, F16, F32_FORMAT, GROUP, I8  # noqa: F401  (the format codes, defined without Numba)
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


# LLVM IR pieces of the int8 intrinsics below: 16 lanes, what one AVX-512 register (two AVX ones) holds.
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


ACCUMULATORS = 4  # independent sums per row in the int8 dot
INPUTS = 4  # input rows that dot4_i8 takes at once


def _int8_dots(inputs: int):
    """An intrinsic: for one int8 row q [K] with scales [G] and each of `inputs` float32 rows
    x[m0], x[m0 + 1], ... of x [M, K] (or x itself if 1-D), the sum over groups g < n_groups of
    scale[g] * (q[32g:32g+32] . x[32g:32g+32]).

    Written as LLVM IR because the loop must keep its 16-lane accumulators in registers: from plain
    Numba code LLVM stores accumulators to memory on every group (it cannot prove they do not alias
    the inputs), and those stores halved the kernel's speed (measured: 18 vs 12 GB/s per core with
    the data in cache, 26 vs 17 GB/s from memory on 2 cores).

    Per group: acc = fma(fma(float(q_lo), x_lo, float(q_hi) * x_hi), scale[g], acc) on 16 lanes, as
    explicit fused multiply-adds so that every input row is summed by the same operations whether
    it comes alone or with others (a batch gets bitwise the results of one sequence). Group g goes
    to accumulator g % 4 (a last n_groups % 4 groups to the combined sum, in order): with one
    accumulator each group waited for the one before, and a row took 12.4 cycles per group on a
    Zen 4 core with the data in cache; with four, 4.7. With the helpers inlined as well (jit.py),
    `linear` on GPT-2's [50257, 768] output projection in int8 reads 32 GB/s from memory on 2 cores,
    against 16 GB/s before both changes, and float32 reads 27-28. At the end the accumulators are
    added pairwise, (a0 + a1) + (a2 + a3), and the 16 lanes likewise in a fixed order, so the result
    does not depend on the CPU's vector width. Several input rows (a batch) share each widening of
    q to float32, the larger part of the work. (Four weight rows at once, sharing x, were as fast in
    cache but read memory at 14 GB/s: four short interleaved streams defeat the prefetchers.)
    """

    @intrinsic
    def dots(typingctx, q, scale, x, m0, n_groups):
        if GROUP != 32 or not (isinstance(q, types.Array) and q.dtype == types.int8 and q.ndim == 1 and q.layout == "C"):
            return None
        if not (isinstance(x, types.Array) and x.layout == "C" and (x.ndim == 2 or inputs == 1)):
            return None

        def codegen(context, builder, signature, args):
            f32, i8, i32, i64, vec = _F32, _I8, _I32, _I64, _VEC
            qp, sp = (builder.bitcast(context.make_array(t)(context, builder, v).data, e.as_pointer())
                      for t, v, e in zip(signature.args[:2], args[:2], (i8, f32)))  # fmt: skip
            xa = context.make_array(signature.args[2])(context, builder, args[2])
            first, n = (builder.sext(a, i64) if a.type.width < 64 else a for a in args[3:])
            xps = []  # each input row's first float
            for i in range(inputs):
                if signature.args[2].ndim == 1:
                    xps.append(builder.bitcast(xa.data, f32.as_pointer()))
                    continue
                offset = builder.mul(builder.add(first, ir.Constant(i64, i)), builder.extract_value(xa.strides, 0))
                xps.append(builder.bitcast(builder.gep(builder.bitcast(xa.data, i8.as_pointer()), [offset]), f32.as_pointer()))
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec] * 3), "llvm.fma.v16f32")
            A, zero = ACCUMULATORS, ir.Constant(vec, [0.0] * 16)

            def add_group(g, accs):  # accs[i] + scale[g] * (q . x[i] over group g), for each input i
                ks = [builder.add(builder.mul(g, ir.Constant(i64, 32)), ir.Constant(i64, 16 * half)) for half in (0, 1)]
                qs = [_int8x16_as_f32(builder, qp, k) for k in ks]
                splat = _splat(builder, builder.load(builder.gep(sp, [g])))
                out = []
                for xp, acc in zip(xps, accs):
                    lo, hi = (builder.load(builder.bitcast(builder.gep(xp, [k]), vec.as_pointer()), align=4) for k in ks)
                    group = builder.call(fma, [qs[0], lo, builder.fmul(qs[1], hi)])
                    out.append(builder.call(fma, [group, splat, acc]))
                return out

            def loop(name, start, stop, step, inits, body):
                """for g in range(start, stop, step): values = body(g, values); the values after."""
                before, block, after = builder.block, builder.append_basic_block(name), builder.append_basic_block(name + "_end")
                builder.cbranch(builder.icmp_signed("<", start, stop), block, after)
                builder.position_at_end(block)
                g, phis = builder.phi(i64), [builder.phi(vec) for _ in inits]
                news = body(g, phis)
                g_next = builder.add(g, ir.Constant(i64, step))
                for phi, init, value in ((g, start, g_next), *zip(phis, inits, news)):
                    phi.add_incoming(init, before)
                    phi.add_incoming(value, block)
                builder.cbranch(builder.icmp_signed("<", g_next, stop), block, after)
                builder.position_at_end(after)
                outs = [builder.phi(vec) for _ in inits]
                for out, init, value in zip(outs, inits, news):
                    out.add_incoming(init, before)
                    out.add_incoming(value, block)
                return outs

            def main(g, accs):  # accs[a * inputs + i]: accumulator a of input i
                for a in range(A):
                    accs = accs[: a * inputs] + add_group(builder.add(g, ir.Constant(i64, a)), accs[a * inputs : (a + 1) * inputs]) + accs[(a + 1) * inputs :]
                return accs

            n_main = builder.mul(builder.sdiv(n, ir.Constant(i64, A)), ir.Constant(i64, A))
            accs = loop("groups", ir.Constant(i64, 0), n_main, A, [zero] * (A * inputs), main)
            totals = []
            for i in range(inputs):
                mine = accs[i::inputs]
                while len(mine) > 1:  # (a0 + a1) + (a2 + a3)
                    mine = [builder.fadd(mine[k], mine[k + 1]) for k in range(0, len(mine), 2)]
                totals.append(mine[0])
            totals = loop("last_groups", n_main, n, 1, totals, add_group)
            sums = []
            for total in totals:
                width = 16
                while width > 1:  # lanes 0..w/2-1 + lanes w/2..w-1, halving
                    width //= 2
                    halves = [builder.shuffle_vector(total, total, ir.Constant(ir.VectorType(i32, width), list(range(o, o + width)))) for o in (0, width)]
                    total = builder.fadd(*halves)
                sums.append(builder.extract_element(total, ir.Constant(i32, 0)))
            return context.make_tuple(builder, signature.return_type, sums)

        return types.UniTuple(types.float32, inputs)(q, scale, x, m0, n_groups), codegen

    return dots


_int8_dot, _int8_dot4 = _int8_dots(1), _int8_dots(INPUTS)


@intrinsic
def _int8_groups_to_f32(typingctx, q, scale, out, n_groups):
    """out[k] = scale[k // 32] * float(q[k]) for k < 32 * n_groups (1-D C arrays q int8, scale and
    out float32), 16 lanes at a time. LLVM does not vectorise this loop written in Numba (per-value
    conversions: 1.8 G values/s per core, against 10 for float16's)."""
    if GROUP != 32:
        return None

    def codegen(context, builder, signature, args):
        qp, sp, op = (builder.bitcast(context.make_array(t)(context, builder, v).data, e.as_pointer())
                      for t, v, e in zip(signature.args[:3], args[:3], (_I8, _F32, _F32)))  # fmt: skip
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
def dot_i8(q, scale, x):
    """sum(scale[k // GROUP] * q[k] * x[k]) for a row of int8 with per-group scales."""
    K = x.shape[0]
    full = K // GROUP
    s = _int8_dot(q, scale, x, 0, full)[0]
    if full * GROUP < K:  # a last, partial group (a branch, not a loop: no cost for GPT-2's sizes)
        s += _partial_group(q, scale[full], x, full * GROUP)
    return s


@helper
def dot4_i8(q, scale, x, m0):
    """(dot_i8(q, scale, x[m0 + i]) for i < 4), bitwise, widening q once for the four."""
    K = x.shape[1]
    full = K // GROUP
    s = _int8_dot4(q, scale, x, m0, full)
    if full * GROUP < K:
        k0, sg = full * GROUP, scale[full]
        return (s[0] + _partial_group(q, sg, x[m0], k0), s[1] + _partial_group(q, sg, x[m0 + 1], k0),
                s[2] + _partial_group(q, sg, x[m0 + 2], k0), s[3] + _partial_group(q, sg, x[m0 + 3], k0))  # fmt: skip
    return s


@helper
def _partial_group(q, sg, x, k0):
    t = F32(0.0)
    for k in range(k0, x.shape[0]):
        t += sg * (F32(q[k]) * x[k])
    return t


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
    """Row j of weight matrix w (in format fmt, with int8 scales) dotted with the float32 vector x."""
    raise NotImplementedError


@overload(row_dot, inline="always", jit_options={"fastmath": FASTMATH})
def _row_dot(w, scale, fmt, j, x):
    if w.dtype == types.float32:
        return lambda w, scale, fmt, j, x: dot(w[j], x)
    if w.dtype == types.uint16:

        def half(w, scale, fmt, j, x):
            return dot_f16(w[j], x) if fmt == F16 else dot_bf16(w[j], x)

        return half
    if w.dtype == types.int8:
        return lambda w, scale, fmt, j, x: dot_i8(w[j], scale[j], x)
    return None


@overload(_widen)  # strict float semantics: the product is rounded on its own, never fused into a sum
def _widen_impl(w, scale, fmt, j, k):
    if w.dtype == types.float32:
        return lambda w, scale, fmt, j, k: w[j, k]
    if w.dtype == types.uint16:
        return lambda w, scale, fmt, j, k: f16_bits_to_f32(w[j, k]) if fmt == F16 else bf16_bits_to_f32(w[j, k])
    if w.dtype == types.int8:
        return lambda w, scale, fmt, j, k: scale[j, k // GROUP] * F32(w[j, k])
    return None
