"""The int8 x int8 products of int8.py, written as LLVM IR so that they reach the CPU's integer
dot-product instructions: AVX2's `vpmaddubsw`/`vpmaddwd` and VNNI's `vpdpbusd` (AVX-VNNI, or AVX-512
VNNI with VL). `int8.py` holds the same arithmetic as a plain loop (`dot_groups`), which every path
here matches bitwise; tests/test_int8.py checks that they do.

The weights are stored interleaved (dtypes.interleave_int8): a block of 8 output rows, per group of
32 inputs, as 8 slices of 32 bytes, slice s holding inputs 4s..4s+3 of each of the 8 rows. One slice
is one 256-bit register in which int32 lane r belongs to output row r. A slice meets the 4 inputs of
an activation row broadcast to every lane, and 8 slices complete the group's exact integer sums of 8
outputs at once. The float step then runs once per group for 8 outputs:

    acc[r] = 0
    for each group g:
        isum[r] = sum of xq[32g + k] * w[r, 32g + k] for k < 32      int32, exact
        acc[r] = fma(float(isum[r]), xs[g] * ws[r, g], acc[r])

The group sums are exact integers, so the instructions that form them cannot change a result, and the
float steps are the same whatever the tile's shape: a row's outputs do not depend on how many rows
share the step.

- AVX2: `vpmaddubsw` multiplies unsigned by signed bytes, so the weight's sign moves onto the
  activation (`vpsignb`) and the weight's magnitude, shared by the tile's rows, is the unsigned side:
  |w| * (x * sign(w)) = x * w (measured 1.2x faster than |x| * (w * sign(x)) even for one row, which
  needs a second broadcast). Pairs of products are summed into int16 (at most 2 * 127 * 127, no saturation), then `vpmaddwd` by
  ones sums pairs of those into the int32 lanes.
- VNNI: `vpdpbusd` sums four unsigned-by-signed products into int32 with no saturation; the
  weight is offset to w + 128 (its sign bit flipped, once per slice for the tile's rows) and is the
  unsigned side, the activation q the signed one, so each lane holds sum(w * q) + 128 * sum(q).
  128 * sum(q), one integer per row and group (stored beside q by int8.quantize_row), is taken
  off every lane: one instruction per product, whatever the number of rows. Where the CPU lacks VNNI, `vpdpbusd` is written out in plain vector
  operations, so the VNNI path's arithmetic is tested on every machine (int8.py never chooses it there).

A path the compile target cannot run (AVX2 on a CPU without it) compiles to a stub that is never
called: int8.py takes the plain loop instead, and kernels compiled for one CPU are cached for it only.
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

from .codes import GROUP, INTERLEAVE, PACK, PATH_AVX2, PATH_VNNI
from .cpu import target_paths
from .ir import F32, FLOATS, I8, I16, I32, I64, STRICT, accumulate, call, const, fma8, load, row_pointer, splat

BYTES = ir.VectorType(I8, 32)  # one slice: 4 inputs of 8 rows
WORDS = ir.VectorType(I16, 16)
LANES = ir.VectorType(I32, 8)  # one int32 per output row
SLICE = 4 * INTERLEAVE  # bytes of one slice
BLOCK_GROUP = GROUP * INTERLEAVE  # bytes of one block's group: 8 slices


def emitted(path: int) -> bool:
    """Whether a tile for `path` is real code on this target (VNNI always is: emulated without it)."""
    return path == PATH_VNNI or (path == PATH_AVX2 and path in target_paths())


def _packed(context, builder, array_type, array, m0, slot_bytes):
    """(pointer to the slot of row m0 in group 0, bytes from one group to the next) of a packed
    activation array [packs, G, PACK, ...] (int8.py), as i8*."""
    a = context.make_array(array_type)(context, builder, array)
    pack = builder.sdiv(m0, ir.Constant(I64, PACK))
    slot = builder.sub(m0, builder.mul(pack, ir.Constant(I64, PACK)))
    offset = builder.add(builder.mul(pack, builder.extract_value(a.strides, 0)), builder.mul(slot, ir.Constant(I64, slot_bytes)))
    return builder.gep(builder.bitcast(a.data, I8.as_pointer()), [offset]), builder.extract_value(a.strides, 1)


def _broadcast4(builder, base, offset):
    """The 4 bytes at base + offset in every int32 lane, as 32 bytes."""
    four = builder.load(builder.bitcast(builder.gep(base, [offset]), I32.as_pointer()), align=1)
    return builder.bitcast(splat(builder, four, LANES), BYTES)


def _dpbusd(builder, acc, unsigned, signed):
    """VNNI's vpdpbusd: acc[i] + sum over t < 4 of unsigned[4i + t] * signed[4i + t], in int32. Written
    out in plain vector operations where the target lacks the instruction (same integers)."""
    if PATH_VNNI in target_paths():
        return call(builder, "llvm.x86.avx512.vpdpbusd.256", LANES, [acc, builder.bitcast(unsigned, LANES), builder.bitcast(signed, LANES)])
    wide = ir.VectorType(I32, 32)
    products = builder.mul(builder.zext(unsigned, wide), builder.sext(signed, wide))
    for t in range(4):
        acc = builder.add(acc, builder.shuffle_vector(products, products, ir.Constant(LANES, [4 * i + t for i in range(8)])))
    return acc


def make_tile(rows: int, path: int):
    """An intrinsic tile(x8, xs, m0, wp, wps, blk, out): out[8 * i + r] = output [m0 + i, 8 * blk + r]
    for i < rows, r < 8, each as in the module's docstring: one block of weights against a few rows.

    Rows m0..m0+rows-1 lie in one pack of the activations (int8.py: x8 int8 [packs, G, PACK, 64], each
    row's group as 32 bytes of q then, for VNNI, 128 * sum(q) as an int32; xs float32 [packs, G, PACK]); wp int8 [blocks, G,
    256] and wps float32 [blocks, G, 8] are one matrix's interleaved weights and scales."""
    real = emitted(path)

    @intrinsic
    def tile(typingctx, x8, xs, m0, wp, wps, blk, out):
        arrays = (x8, xs, wp, wps, out)
        if not all(isinstance(a, types.Array) and a.layout == "C" for a in arrays):
            return None
        if tuple(a.ndim for a in arrays) != (4, 3, 3, 3, 1):
            return None
        if tuple(a.dtype for a in arrays) != (types.int8, types.float32, types.int8, types.float32, types.float32):
            return None

        def codegen(context, builder, sig, args):
            if not real:  # never called (int8.py takes the plain loop), but must compile anywhere
                return context.get_dummy_value()
            a_x8, a_xs, a_m0, a_wp, a_wps, a_blk, a_out = args
            t_x8, t_xs, _, t_wp, t_wps, _, t_out = sig.args
            m0_, blk_ = (builder.sext(v, I64) if v.type.width < 64 else v for v in (a_m0, a_blk))
            G = builder.extract_value(context.make_array(t_wp)(context, builder, a_wp).shape, 1)
            xp, x_step = _packed(context, builder, t_x8, a_x8, m0_, 2 * GROUP)
            sp, s_step = _packed(context, builder, t_xs, a_xs, m0_, 4)
            wb = row_pointer(context, builder, t_wp, a_wp, blk_, I8)
            sb = row_pointer(context, builder, t_wps, a_wps, blk_, F32)

            def step(g, accs):
                """Every row's accumulator after group g, slice by slice, so that few values are live
                at once (no registers spilled)."""
                xg = builder.gep(xp, [builder.mul(g, x_step)])
                sg = builder.bitcast(builder.gep(sp, [builder.mul(g, s_step)]), F32.as_pointer())
                base = builder.mul(g, ir.Constant(I64, BLOCK_GROUP))
                isums = [ir.Constant(LANES, [0] * 8)] * rows
                for s in range(8):
                    w = load(builder, wb, builder.add(base, ir.Constant(I64, SLICE * s)), BYTES)
                    if path == PATH_VNNI:
                        unsigned = builder.xor(w, const(BYTES, -128))  # w + 128, as unsigned bytes
                        for i in range(rows):
                            x = _broadcast4(builder, xg, ir.Constant(I64, 2 * GROUP * i + 4 * s))  # q
                            isums[i] = _dpbusd(builder, isums[i], unsigned, x)
                    else:
                        magnitude = call(builder, "llvm.abs.v32i8", BYTES, [w, ir.Constant(ir.IntType(1), 0)])
                        for i in range(rows):
                            x = _broadcast4(builder, xg, ir.Constant(I64, 2 * GROUP * i + 4 * s))  # q
                            signed = call(builder, "llvm.x86.avx2.psign.b", BYTES, [x, w])  # x * sign(w)
                            pairs = call(builder, "llvm.x86.avx2.pmadd.ub.sw", WORDS, [magnitude, signed])
                            isums[i] = builder.add(isums[i], call(builder, "llvm.x86.avx2.pmadd.wd", LANES, [pairs, const(WORDS, 1)]))
                wscale = load(builder, sb, builder.mul(g, ir.Constant(I64, INTERLEAVE)), FLOATS, align=4)
                out = []
                for i in range(rows):
                    isum = isums[i]
                    if path == PATH_VNNI:  # less 128 * sum(q): exact, integer sums in any order
                        offset = _broadcast4(builder, xg, ir.Constant(I64, 2 * GROUP * i + GROUP))
                        isum = builder.sub(isum, builder.bitcast(offset, LANES))
                    xscale = splat(builder, builder.load(builder.gep(sg, [ir.Constant(I64, i)])), FLOATS)
                    d = builder.fmul(xscale, wscale, flags=STRICT)  # xs * ws, one product per output
                    out.append(fma8(builder, builder.sitofp(isum, FLOATS), d, accs[i]))
                return out

            finals = accumulate(builder, G, rows, step, "int8_groups")
            ob = row_pointer(context, builder, t_out, a_out, ir.Constant(I64, 0), F32)
            for i, acc in enumerate(finals):
                builder.store(acc, builder.bitcast(builder.gep(ob, [ir.Constant(I64, INTERLEAVE * i)]), FLOATS.as_pointer()), align=4)
            return context.get_dummy_value()

        return types.none(x8, xs, m0, wp, wps, blk, out), codegen

    return tile
