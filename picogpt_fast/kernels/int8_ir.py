"""The int8 x int8 dot products of int8.py, written as LLVM IR so that they reach the CPU's integer
dot-product instructions: AVX2's `vpmaddubsw`/`vpmaddwd` and VNNI's `vpdpbusd` (AVX-VNNI, or AVX-512
VNNI with VL). `int8.py` holds the same arithmetic as a plain loop (`tile_plain`), which every path
here must match bitwise; tests/test_int8.py checks that they do.

One tile computes RM x RN outputs: input rows m0..m0+RM-1 (quantized activations) against weight rows
n0..n0+RN-1. Every output follows the same steps, whatever the tile, the path or the CPU:

    acc[0..7] = 0                                            8 float32 lanes
    for each group g of 32 inputs:
        isum[l] = sum of xq[32g + 4l + t] * w[32g + 4l + t] for t < 4     int32, exact
        acc[l] = fma(float(isum[l]), xs[g] * ws[g], acc[l])
    result = ((acc0 + acc4) + (acc2 + acc6)) + ((acc1 + acc5) + (acc3 + acc7))

The group sums are exact integers, so the instruction that forms them cannot change a result; the
float steps are spelled out (fused multiply-adds, a fixed lane order) so that nothing else can.

- AVX2: `vpmaddubsw` multiplies unsigned by signed bytes, so the activation's sign moves onto the
  weight (`vpsignb`) and its magnitude is the unsigned side: |x| * (w * sign(x)) = x * w. Pairs of
  products are summed into int16 (at most 2 * 127 * 127, no saturation), then `vpmaddwd` by ones sums
  pairs of those into the int32 lanes above.
- VNNI: `vpdpbusd` sums four unsigned-by-signed products into int32 with no saturation; the
  activation is offset to x + 128 (unsigned) and the accumulator starts at -128 * (sum of the
  weights), computed once per weight group and shared by the tile's rows.

A path the compile target lacks is never emitted: its tile falls back to the best path the target
has (int8.py never selects it, and kernels compiled for one CPU are cached for that CPU only).
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from .codes import GROUP, PACK, PATH_PLAIN, PATH_VNNI
from .cpu import target_paths

_F32, _I8, _I16, _I32, _I64 = ir.FloatType(), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_BYTES = ir.VectorType(_I8, 32)  # one group
_WORDS = ir.VectorType(_I16, 16)
_LANES = ir.VectorType(_I32, 8)
_FLOATS = ir.VectorType(_F32, 8)
# Numba adds the kernel's fast-math flags to every float operation that has none, which would let LLVM
# reorder the sums; 'arcp' (reciprocals in divisions) is a flag that changes nothing here but keeps them off.
_STRICT = ("arcp",)


@intrinsic
def fma32(typingctx, a, b, c):
    """a * b + c for float32, rounded once (LLVM's fma: the instruction where the CPU has it)."""
    if not all(isinstance(t, types.Float) and t.bitwidth == 32 for t in (a, b, c)):
        return None

    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F32, [_F32] * 3), "llvm.fma.f32")
        return builder.call(fn, args)

    return types.float32(a, b, c), codegen


def emitted_path(path: int) -> int:
    """The path a tile for `path` is compiled as on this target (the best it has, at most `path`)."""
    have = target_paths()
    return max((p for p in have if p <= path), default=PATH_PLAIN)


def _call(builder, name: str, result, operands):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(result, [o.type for o in operands]), name)
    return builder.call(fn, operands)


def _splat(builder, value, vector_type):
    one = builder.insert_element(ir.Constant(vector_type, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(
        one, ir.Constant(vector_type, ir.Undefined), ir.Constant(ir.VectorType(_I32, vector_type.count), [0] * vector_type.count)
    )


def _row(context, builder, array_type, array, row, element):
    """A pointer to array[row, 0] (a 2-D array of any row stride) as element*."""
    a = context.make_array(array_type)(context, builder, array)
    offset = builder.mul(row, builder.extract_value(a.strides, 0))
    return builder.bitcast(builder.gep(builder.bitcast(a.data, _I8.as_pointer()), [offset]), element.as_pointer())


def _packed(context, builder, array_type, array, m0, slot_bytes):
    """(pointer to the slot of row m0 in group 0, bytes from one group to the next) of a packed
    activation array [packs, G, PACK, ...] (int8.py), as i8*."""
    a = context.make_array(array_type)(context, builder, array)
    pack = builder.sdiv(m0, ir.Constant(_I64, PACK))
    slot = builder.sub(m0, builder.mul(pack, ir.Constant(_I64, PACK)))
    offset = builder.add(builder.mul(pack, builder.extract_value(a.strides, 0)), builder.mul(slot, ir.Constant(_I64, slot_bytes)))
    return builder.gep(builder.bitcast(a.data, _I8.as_pointer()), [offset]), builder.extract_value(a.strides, 1)


def _load_bytes(builder, base, offset):
    """32 bytes at base + offset (unaligned)."""
    return builder.load(builder.bitcast(builder.gep(base, [offset]), _BYTES.as_pointer()), align=1)


def _load_group(builder, row, g):
    """32 bytes of a weight row, group g (unaligned)."""
    return _load_bytes(builder, row, builder.mul(g, ir.Constant(_I64, GROUP)))


def _load_tail(builder, row, g, count, scratch):
    """The last, partial group of a row: `count` (< 32) bytes from group g, zeros after. Copied
    through a zeroed stack buffer, so nothing past the row is read (a weight file may end there)."""
    builder.store(ir.Constant(_BYTES, [0] * GROUP), scratch)
    at = builder.gep(row, [builder.mul(g, ir.Constant(_I64, GROUP))])
    cgutils.raw_memcpy(builder, builder.bitcast(scratch, _I8.as_pointer()), at, count, 1)
    return builder.load(scratch, align=1)


def _group_sum(builder, path, xq, xu, w, start):
    """int32 lanes: isum[l] = sum_t xq[4l + t] * w[4l + t] (+ start, VNNI's compensation)."""
    if path == PATH_VNNI:
        as_lanes = [builder.bitcast(v, _LANES) for v in (xu, w)]
        return _call(builder, "llvm.x86.avx512.vpdpbusd.256", _LANES, [start, *as_lanes])
    signed = _call(builder, "llvm.x86.avx2.psign.b", _BYTES, [w, xq])
    pairs = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _WORDS, [xu, signed])
    return _call(builder, "llvm.x86.avx2.pmadd.wd", _LANES, [pairs, ir.Constant(_WORDS, [1] * 16)])


def _compensation(builder, path, w):
    """VNNI: -128 * (the sum of each lane's four weights), the starting value of that lane's sum."""
    if path != PATH_VNNI:
        return None
    offset = ir.Constant(_LANES, [0x80808080 - (1 << 32)] * 8)  # the byte 128 four times, as i32
    total = _call(builder, "llvm.x86.avx512.vpdpbusd.256", _LANES, [ir.Constant(_LANES, [0] * 8), offset, builder.bitcast(w, _LANES)])
    return builder.sub(ir.Constant(_LANES, [0] * 8), total)


def _reduce(builder, acc):
    """((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)): halving, in a fixed order."""
    width = 8
    while width > 1:
        width //= 2
        halves = [builder.shuffle_vector(acc, acc, ir.Constant(ir.VectorType(_I32, width), list(range(o, o + width)))) for o in (0, width)]
        acc = builder.fadd(*halves, flags=_STRICT)
    return builder.extract_element(acc, ir.Constant(_I32, 0))


def _accumulate(builder, count, n: int, body, name: str):
    """for g in range(count): accs = body(g, accs), over n float32 x 8 accumulators that start at zero;
    returns them after the loop (zeros when count is 0)."""
    zero = ir.Constant(_FLOATS, [0.0] * 8)
    before = builder.block
    loop, after = builder.append_basic_block(name), builder.append_basic_block(name + "_end")
    builder.cbranch(builder.icmp_signed(">", count, ir.Constant(_I64, 0)), loop, after)
    builder.position_at_end(loop)
    g = builder.phi(_I64)
    accs = [builder.phi(_FLOATS) for _ in range(n)]
    news = body(g, accs)
    end = builder.block
    g_next = builder.add(g, ir.Constant(_I64, 1))
    g.add_incoming(ir.Constant(_I64, 0), before)
    g.add_incoming(g_next, end)
    for phi, new in zip(accs, news):
        phi.add_incoming(zero, before)
        phi.add_incoming(new, end)
    builder.cbranch(builder.icmp_signed("<", g_next, count), loop, after)
    builder.position_at_end(after)
    finals = [builder.phi(_FLOATS) for _ in news]
    for phi, new in zip(finals, news):
        phi.add_incoming(zero, before)
        phi.add_incoming(new, end)
    return finals


def make_tile(rows: int, cols: int, path: int):
    """An intrinsic tile(x8, xs, m0, w, ws, n0) -> (out[m0][n0], out[m0][n0+1], ..., out[m0+1][n0], ...):
    rows x cols outputs, row-major, each as in the module's docstring. Rows m0..m0+rows-1 lie in one
    pack of the activations (int8.py: x8 int8 [packs, G, PACK, 64], each row's group as 32 bytes of
    q then 32 of its unsigned form, xs float32 [packs, G, PACK]); w int8 [N, K], ws float32 [N, G]."""
    emit = emitted_path(path)

    @intrinsic
    def tile(typingctx, x8, xs, m0, w, ws, n0):
        if not all(isinstance(a, types.Array) and a.layout == "C" for a in (x8, xs, w, ws)):
            return None
        if (x8.ndim, xs.ndim, w.ndim, ws.ndim) != (4, 3, 2, 2):
            return None
        if (x8.dtype, xs.dtype, w.dtype, ws.dtype) != (types.int8, types.float32, types.int8, types.float32):
            return None
        signature = types.UniTuple(types.float32, rows * cols)(x8, xs, m0, w, ws, n0)

        def codegen(context, builder, sig, args):
            a_x8, a_xs, a_m0, a_w, a_ws, a_n0 = args
            if emit == PATH_PLAIN:  # never called (int8.py takes the plain loop), but must compile anywhere
                return context.make_tuple(builder, sig.return_type, [ir.Constant(_F32, 0.0)] * (rows * cols))
            t_x8, t_xs, _, t_w, t_ws, _ = sig.args
            m0_, n0_ = (builder.sext(v, _I64) if v.type.width < 64 else v for v in (a_m0, a_n0))
            K = builder.extract_value(context.make_array(t_w)(context, builder, a_w).shape, 1)
            full = builder.sdiv(K, ir.Constant(_I64, GROUP))
            tail = builder.sub(K, builder.mul(full, ir.Constant(_I64, GROUP)))
            xp, x_step = _packed(context, builder, t_x8, a_x8, m0_, 2 * GROUP)
            sp, s_step = _packed(context, builder, t_xs, a_xs, m0_, 4)
            jt = [builder.add(n0_, ir.Constant(_I64, j)) for j in range(cols)]
            w_rows = [_row(context, builder, t_w, a_w, n, _I8) for n in jt]
            ws_rows = [_row(context, builder, t_ws, a_ws, n, _F32) for n in jt]
            scratch = cgutils.alloca_once(builder, _BYTES)
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_FLOATS, [_FLOATS] * 3), "llvm.fma.v8f32")

            def step(g, accs, wv):
                """Every output's accumulator after group g, given the weights' groups wv."""
                comps = [_compensation(builder, emit, v) for v in wv]
                wscale = [_splat(builder, builder.load(builder.gep(r, [g])), _FLOATS) for r in ws_rows]
                xg = builder.gep(xp, [builder.mul(g, x_step)])
                sg = builder.bitcast(builder.gep(sp, [builder.mul(g, s_step)]), _F32.as_pointer())
                out = []
                for i in range(rows):
                    xq = _load_bytes(builder, xg, ir.Constant(_I64, i * 2 * GROUP))
                    xu = _load_bytes(builder, xg, ir.Constant(_I64, i * 2 * GROUP + GROUP))
                    xscale = _splat(builder, builder.load(builder.gep(sg, [ir.Constant(_I64, i)])), _FLOATS)
                    for j in range(cols):
                        lanes = builder.sitofp(_group_sum(builder, emit, xq, xu, wv[j], comps[j]), _FLOATS)
                        d = builder.fmul(xscale, wscale[j], flags=_STRICT)  # xs * ws in every lane
                        out.append(builder.call(fma, [lanes, d, accs[i * cols + j]]))
                return out

            sums = _accumulate(
                builder, full, rows * cols, lambda g, accs: step(g, accs, [_load_group(builder, r, g) for r in w_rows]), "int8_groups"
            )

            cond_block = builder.block
            with builder.if_then(builder.icmp_signed(">", tail, ir.Constant(_I64, 0)), likely=False):
                tails = step(full, sums, [_load_tail(builder, r, full, tail, scratch) for r in w_rows])
                then_end = builder.block
            merged = []
            for old, new in zip(sums, tails):
                phi = builder.phi(_FLOATS)
                phi.add_incoming(old, cond_block)
                phi.add_incoming(new, then_end)
                merged.append(phi)
            return context.make_tuple(builder, sig.return_type, [_reduce(builder, acc) for acc in merged])

        return signature, codegen

    return tile


# --------------------------------------------------------------------------- prompts: 8 outputs per lane vector
CHAINS = 2  # a group's 8 vpdpbusd of one row as this many independent chains: less waiting on each one's latency


def make_block_tile(path: int):
    """An intrinsic block_tile(x8, xs, m0, wp, wps, wc, blk, out): the prompt GEMM's step, PACK input
    rows (a pack, from m0) against one block of 8 weight rows, into out float32 [PACK, 8].

    Here each int32 lane is one output (a weight row), not a quarter of a group: the weights are
    repacked (int8.py `repack`) so that wp [blocks, G, 256] holds, per group, 8 slices of 4 inputs,
    each slice the same 4 inputs of the 8 rows; one `vpdpbusd` of a slice against the row's 4 inputs
    (broadcast) adds them to all 8 outputs, and 8 of them complete the group's exact integer sums.
    The float steps then run once per group for 8 outputs, not once per lane of one output:

        acc = fma(float(group sum), xs[m, g] * ws[n, g], acc)      for g = 0, 1, ...

    the order of `dot_groups` (int8.py), which every path matches bitwise. wps [blocks, G, 8] are the
    block's weight scales; wc [blocks, G, 8] int32 the VNNI compensation, -128 * (the sum of the row's
    group), since the activations are offset to x + 128 as in `make_tile`."""
    emit = emitted_path(path)

    @intrinsic
    def block_tile(typingctx, x8, xs, m0, wp, wps, wc, blk, out):
        arrays = (x8, xs, wp, wps, wc, out)
        if not all(isinstance(a, types.Array) and a.layout == "C" for a in arrays):
            return None
        if tuple(a.ndim for a in arrays) != (4, 3, 3, 3, 3, 2):
            return None
        if tuple(a.dtype for a in arrays) != (types.int8, types.float32, types.int8, types.float32, types.int32, types.float32):
            return None
        signature = types.none(x8, xs, m0, wp, wps, wc, blk, out)

        def codegen(context, builder, sig, args):
            a_x8, a_xs, a_m0, a_wp, a_wps, a_wc, a_blk, a_out = args
            if emit != PATH_VNNI:  # never called (int8.py takes dot_groups), but must compile anywhere
                return context.get_dummy_value()
            t_x8, t_xs, _, t_wp, t_wps, t_wc, _, t_out = sig.args
            m0_, blk_ = (builder.sext(v, _I64) if v.type.width < 64 else v for v in (a_m0, a_blk))
            G = builder.extract_value(context.make_array(t_wp)(context, builder, a_wp).shape, 1)
            xp, x_step = _packed(context, builder, t_x8, a_x8, m0_, 2 * GROUP)
            sp, s_step = _packed(context, builder, t_xs, a_xs, m0_, 4)
            wb = _row(context, builder, t_wp, a_wp, blk_, _I8)
            sb = _row(context, builder, t_wps, a_wps, blk_, _F32)
            cb = _row(context, builder, t_wc, a_wc, blk_, _I32)
            ob = _row(context, builder, t_out, a_out, ir.Constant(_I64, 0), _F32)
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_FLOATS, [_FLOATS] * 3), "llvm.fma.v8f32")
            eight = ir.Constant(_I64, 8)

            def vector_at(base, g, vtype):
                return builder.load(builder.bitcast(builder.gep(base, [builder.mul(g, eight)]), vtype.as_pointer()), align=4)

            def step(g, accs):
                """Every row's accumulator after group g."""
                slices = [
                    _load_bytes(builder, wb, builder.add(builder.mul(g, ir.Constant(_I64, 8 * GROUP)), ir.Constant(_I64, 32 * s)))
                    for s in range(8)
                ]
                comp, wscale = vector_at(cb, g, _LANES), vector_at(sb, g, _FLOATS)
                xg = builder.gep(xp, [builder.mul(g, x_step)])
                sg = builder.bitcast(builder.gep(sp, [builder.mul(g, s_step)]), _F32.as_pointer())
                out = []
                for i in range(PACK):
                    unsigned = builder.gep(xg, [ir.Constant(_I64, i * 2 * GROUP + GROUP)])
                    chains = [comp] + [ir.Constant(_LANES, [0] * 8)] * (CHAINS - 1)  # independent sums, added at the end (exact)
                    for s in range(8):
                        four = builder.load(builder.bitcast(builder.gep(unsigned, [ir.Constant(_I64, 4 * s)]), _I32.as_pointer()), align=1)
                        operands = [chains[s % CHAINS], _splat(builder, four, _LANES), builder.bitcast(slices[s], _LANES)]
                        chains[s % CHAINS] = _call(builder, "llvm.x86.avx512.vpdpbusd.256", _LANES, operands)
                    lanes = chains[0]
                    for c in chains[1:]:
                        lanes = builder.add(lanes, c)
                    xscale = _splat(builder, builder.load(builder.gep(sg, [ir.Constant(_I64, i)])), _FLOATS)
                    d = builder.fmul(xscale, wscale, flags=_STRICT)
                    out.append(builder.call(fma, [builder.sitofp(lanes, _FLOATS), d, accs[i]]))
                return out

            finals = _accumulate(builder, G, PACK, step, "int8_blocks")
            for i, acc in enumerate(finals):
                builder.store(acc, builder.bitcast(builder.gep(ob, [ir.Constant(_I64, 8 * i)]), _FLOATS.as_pointer()), align=4)
            return context.get_dummy_value()

        return signature, codegen

    return block_tile
