"""LLVM IR pieces shared by the hand-written tiles (int8_ir.py, float_ir.py): loads, broadcasts,
pointers into Numba arrays, and the loop that carries a tile's accumulators over K.

The tiles are written as IR rather than Numba loops so that the order of every sum is the order
written here, whatever the tile's shape: LLVM's vectoriser, free to reassociate under fast-math,
would pick a different order for a tile of one row than for a tile of four.
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

F32, I8, I16, I32, I64 = ir.FloatType(), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
FLOATS = ir.VectorType(F32, 8)  # one 256-bit register of float32
# Numba adds the kernel's fast-math flags to every float operation that has none, which would let LLVM
# reorder the sums; 'arcp' (reciprocals in divisions) is a flag that changes nothing here but keeps them off.
STRICT = ("arcp",)


@intrinsic
def fma32(typingctx, a, b, c):
    """a * b + c for float32, rounded once (LLVM's fma: the instruction where the CPU has it)."""
    if not all(isinstance(t, types.Float) and t.bitwidth == 32 for t in (a, b, c)):
        return None

    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(F32, [F32] * 3), "llvm.fma.f32")
        return builder.call(fn, args)

    return types.float32(a, b, c), codegen


def fma8(builder, a, b, c):
    """a * b + c in each of 8 float32 lanes, rounded once."""
    return call(builder, "llvm.fma.v8f32", FLOATS, [a, b, c])


def call(builder, name: str, result, operands):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(result, [o.type for o in operands]), name)
    return builder.call(fn, operands)


def const(vector_type, value):
    return ir.Constant(vector_type, [value] * vector_type.count)


def splat(builder, value, vector_type):
    one = builder.insert_element(ir.Constant(vector_type, ir.Undefined), value, ir.Constant(I32, 0))
    return builder.shuffle_vector(
        one, ir.Constant(vector_type, ir.Undefined), ir.Constant(ir.VectorType(I32, vector_type.count), [0] * vector_type.count)
    )


def row_pointer(context, builder, array_type, array, row, element):
    """A pointer to array[row, 0, ...] (any row stride) as element*."""
    a = context.make_array(array_type)(context, builder, array)
    offset = builder.mul(row, builder.extract_value(a.strides, 0))
    return builder.bitcast(builder.gep(builder.bitcast(a.data, I8.as_pointer()), [offset]), element.as_pointer())


def load(builder, base, offset, vector_type, align=1):
    return builder.load(builder.bitcast(builder.gep(base, [offset]), vector_type.as_pointer()), align=align)


def accumulate(builder, count, n: int, body, name: str):
    """for g in range(count): accs = body(g, accs), over n float32 x 8 accumulators that start at zero;
    returns them after the loop (zeros when count is 0)."""
    zero = ir.Constant(FLOATS, [0.0] * 8)
    before = builder.block
    loop, after = builder.append_basic_block(name), builder.append_basic_block(name + "_end")
    builder.cbranch(builder.icmp_signed(">", count, ir.Constant(I64, 0)), loop, after)
    builder.position_at_end(loop)
    g = builder.phi(I64)
    accs = [builder.phi(FLOATS) for _ in range(n)]
    news = body(g, accs)
    end = builder.block
    g_next = builder.add(g, ir.Constant(I64, 1))
    g.add_incoming(ir.Constant(I64, 0), before)
    g.add_incoming(g_next, end)
    for phi, new in zip(accs, news):
        phi.add_incoming(zero, before)
        phi.add_incoming(new, end)
    builder.cbranch(builder.icmp_signed("<", g_next, count), loop, after)
    builder.position_at_end(after)
    finals = [builder.phi(FLOATS) for _ in news]
    for phi, new in zip(finals, news):
        phi.add_incoming(zero, before)
        phi.add_incoming(new, end)
    return finals
