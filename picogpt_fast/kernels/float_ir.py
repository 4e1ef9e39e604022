"""The float products of linear.py as LLVM IR: a tile of a few input rows times a few weight rows,
each weight read once for all the tile's input rows, in float32, float16 (F16C's `vcvtph2ps`) or
bfloat16 (a 16-bit shift), widened to float32 in registers.

Every output is summed the same way, whatever the tile's shape or the number of rows in the step:

    a_p[l] = 0, for p < 4, l < 8                              four vectors of 8 float32 lanes
    for each chunk c of 32 inputs (the last one zero-padded):
        a_p[l] = fma(w[32c + 8p + l], x[32c + 8p + l], a_p[l])    for p = 0..3
    s = (a_0 + a_2) + (a_1 + a_3), result = ((s0 + s4) + (s2 + s6)) + ((s1 + s5) + (s3 + s7))

A tile is one weight row against one or two input rows: one row's weights are one sequential stream,
which the CPU's prefetchers follow at full speed (measured: 4 weight rows read side by side, each a
short stream of its own, lost a third of the bandwidth where rows are 1.5-3 KB long), and the four
independent sums per output keep the multiply-adds from waiting on each other (with two, float16
decoding ran 8% slower than LLVM's own four-way loop). Two input rows use all 16 AVX registers' worth
of accumulators and operands; more would spill.
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from .codes import BF16, F16
from .ir import F32, FLOATS, I8, I16, I32, I64, STRICT, accumulate, fma8, load, row_pointer

HALVES = ir.VectorType(I16, 8)
PARTS = 4  # independent sums per output, each over every 4th group of 8 inputs
CHUNK = 8 * PARTS  # inputs per step of the loop


def _pairs(builder, parts):
    """(a_0 + a_2) + (a_1 + a_3): the parts added in a fixed order."""
    while len(parts) > 1:
        half = len(parts) // 2
        parts = [builder.fadd(parts[i], parts[i + half], flags=STRICT) for i in range(half)]
    return parts[0]


def _widen(builder, bits, fmt: int):
    """8 weights as float32 lanes: float32 as they are, float16 or bfloat16 from their 16 bits."""
    if bits.type == FLOATS:
        return bits
    if fmt == F16:
        return builder.fpext(builder.bitcast(bits, ir.VectorType(ir.HalfType(), 8)), FLOATS)
    wide = builder.zext(bits, ir.VectorType(I32, 8))
    return builder.bitcast(builder.shl(wide, ir.Constant(ir.VectorType(I32, 8), [16] * 8)), FLOATS)


def _reduce(builder, acc):
    """((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)): halving, in a fixed order."""
    width = 8
    while width > 1:
        width //= 2
        halves = [builder.shuffle_vector(acc, acc, ir.Constant(ir.VectorType(I32, width), list(range(o, o + width)))) for o in (0, width)]
        acc = builder.fadd(*halves, flags=STRICT)
    return builder.extract_element(acc, ir.Constant(I32, 0))


def _loads(builder, p, c, vector_type) -> list:
    """The PARTS vectors of chunk c of the row at p."""
    at = [builder.add(builder.mul(c, ir.Constant(I64, CHUNK)), ir.Constant(I64, 8 * part)) for part in range(PARTS)]
    return [load(builder, p, a, vector_type, align=4 if vector_type == FLOATS else 2) for a in at]


def _padded_loads(builder, p, c, tail, buffer, vector_type, nbytes) -> list:
    """The PARTS vectors of the last, partial chunk c of the row at p: its `tail` values copied
    through a zeroed stack buffer, so that nothing past the row is read."""
    zero = ir.Constant(vector_type, [0.0] * 8 if vector_type == FLOATS else [0] * 8)
    builder.store(ir.Constant(buffer.type.pointee, [zero] * PARTS), buffer)
    at = builder.bitcast(builder.gep(p, [builder.mul(c, ir.Constant(I64, CHUNK))]), I8.as_pointer())
    cgutils.raw_memcpy(builder, builder.bitcast(buffer, I8.as_pointer()), at, builder.mul(tail, ir.Constant(I64, nbytes)), 1)
    first = builder.bitcast(buffer, vector_type.as_pointer())
    return [builder.load(builder.gep(first, [ir.Constant(I32, part)])) for part in range(PARTS)]


def _dots(builder, form: int, wp, xs: list, K, vector, size: int, w_pad, x_pad) -> list:
    """x . w for each input row pointer of xs against the weight row at wp (K inputs), summed as in
    the module's docstring, for weights of format `form`: float32 scalars."""
    rows = len(xs)
    full = builder.sdiv(K, ir.Constant(I64, CHUNK))
    tail = builder.sub(K, builder.mul(full, ir.Constant(I64, CHUNK)))

    def step(c, accs, load_w, load_x):
        wv = [_widen(builder, v, form) for v in load_w(wp, c)]
        out = []
        for i in range(rows):
            xv = load_x(xs[i], c)
            out += [fma8(builder, wv[part], xv[part], accs[PARTS * i + part]) for part in range(PARTS)]
        return out

    def whole(c, accs):
        return step(c, accs, lambda p, c: _loads(builder, p, c, vector), lambda p, c: _loads(builder, p, c, FLOATS))

    accs = accumulate(builder, full, PARTS * rows, whole, "chunks")
    before = builder.block
    with builder.if_then(builder.icmp_signed(">", tail, ir.Constant(I64, 0)), likely=False):
        tails = step(
            full,
            accs,
            lambda p, c: _padded_loads(builder, p, c, tail, w_pad, vector, size),
            lambda p, c: _padded_loads(builder, p, c, tail, x_pad, FLOATS, 4),
        )
        then_end = builder.block
    merged = []
    for old, new in zip(accs, tails):  # every phi first: LLVM wants them at the top of the block
        merged.append(builder.phi(FLOATS))
        merged[-1].add_incoming(old, before)
        merged[-1].add_incoming(new, then_end)
    return [_reduce(builder, _pairs(builder, merged[PARTS * i : PARTS * (i + 1)])) for i in range(rows)]


def make_tile(rows: int):
    """An intrinsic tile(x, m0, w, n, fmt, out): out[i] = x[m0 + i] . w[n] for i < rows (1 or 2),
    summed as in the module's docstring. x float32 [M, K]; w [N, K] float32, or the uint16 bits of
    float16 (fmt F16) or bfloat16 (fmt BF16); out float32 [>= rows]."""

    @intrinsic
    def tile(typingctx, x, m0, w, n, fmt, out):
        arrays = (x, w, out)
        if not all(isinstance(a, types.Array) and a.layout == "C" for a in arrays):
            return None
        if (x.ndim, w.ndim, out.ndim) != (2, 2, 1) or x.dtype != types.float32 or out.dtype != types.float32:
            return None
        if w.dtype not in (types.float32, types.uint16):
            return None
        half = w.dtype == types.uint16
        element, vector, size = (I16, HALVES, 2) if half else (F32, FLOATS, 4)

        def codegen(context, builder, sig, args):
            a_x, a_m0, a_w, a_n, a_fmt, a_out = args
            t_x, _, t_w, _, _, t_out = sig.args
            m0_, n_ = (builder.sext(v, I64) if v.type.width < 64 else v for v in (a_m0, a_n))
            K = builder.extract_value(context.make_array(t_x)(context, builder, a_x).shape, 1)
            xs = [row_pointer(context, builder, t_x, a_x, builder.add(m0_, ir.Constant(I64, i)), F32) for i in range(rows)]
            wp = row_pointer(context, builder, t_w, a_w, n_, element)
            pads = cgutils.alloca_once(builder, ir.ArrayType(vector, PARTS)), cgutils.alloca_once(builder, ir.ArrayType(FLOATS, PARTS))
            if not half:
                results = _dots(builder, F16, wp, xs, K, vector, size, *pads)  # float32: no conversion (_widen)
            else:  # float16 or bfloat16, as fmt says: both compiled, one run
                with builder.if_else(builder.icmp_signed("==", a_fmt, ir.Constant(a_fmt.type, F16))) as (then, otherwise):
                    with then:
                        as_f16, f16_end = _dots(builder, F16, wp, xs, K, vector, size, *pads), builder.block
                    with otherwise:
                        as_bf16, bf16_end = _dots(builder, BF16, wp, xs, K, vector, size, *pads), builder.block
                results = []
                for a, b in zip(as_f16, as_bf16):
                    phi = builder.phi(F32)
                    phi.add_incoming(a, f16_end)
                    phi.add_incoming(b, bf16_end)
                    results.append(phi)
            o = row_pointer(context, builder, t_out, a_out, ir.Constant(I64, 0), F32)
            for i, value in enumerate(results):
                builder.store(value, builder.gep(o, [ir.Constant(I64, i)]))
            return context.get_dummy_value()

        return types.none(x, m0, w, n, fmt, out), codegen

    return tile
