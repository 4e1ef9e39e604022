"""float32 exp and tanh written as plain arithmetic, so that LLVM vectorises the loops calling them.

Numba lowers np.exp / np.tanh on float32 to scalar libm calls (no SVML here), which made the
softmax loop of attention cost more than its dot products. These are the classic float32
approximations: Cephes' expf (Cody-Waite range reduction and a degree-6 polynomial, ~1 ulp), and
Eigen's 13/6-degree rational tanh (a couple of ulp on [-9, 9], +-1 outside in float32). They are
compiled without 'reassoc' (see jit.py) so that LLVM keeps the range reduction's exact splitting.
"""

import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

from .jit import precise_helper

F32 = np.float32


@intrinsic
def _float_from_bits(typingctx, bits):
    """The float32 whose IEEE-754 bit pattern is the low 32 bits of an integer."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        if bits.bitwidth > 32:
            value = builder.trunc(value, ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())

    return types.float32(bits), codegen


_LOG2E = F32(1.4426950408889634)
_LN2_HI = F32(0.693359375)  # ln 2 split in two so that n * _LN2_HI is exact
_LN2_LO = F32(-2.12194440e-4)
_E0, _E1, _E2 = F32(1.9875691500e-4), F32(1.3981999507e-3), F32(8.3334519073e-3)
_E3, _E4, _E5 = F32(4.1665795894e-2), F32(1.6666665459e-1), F32(5.0000001201e-1)


@precise_helper
def exp(x):
    """e**x for float32 x (inputs below -87 give ~1e-38; softmax only needs x <= 0)."""
    x = min(max(x, F32(-87.0)), F32(88.0))
    n = np.floor(x * _LOG2E + F32(0.5))
    r = x - n * _LN2_HI
    r = r - n * _LN2_LO
    p = (((((_E0 * r + _E1) * r + _E2) * r + _E3) * r + _E4) * r + _E5) * (r * r) + r + F32(1.0)
    return p * _float_from_bits((np.int64(n) + 127) << 23)  # p * 2**n


_A1, _A3, _A5 = F32(4.89352455891786e-03), F32(6.37261928875436e-04), F32(1.48572235717979e-05)
_A7, _A9 = F32(5.12229709037114e-08), F32(-8.60467152213735e-11)
_A11, _A13 = F32(2.00018790482477e-13), F32(-2.76076847742355e-16)
_B0, _B2 = F32(4.89352518554385e-03), F32(2.26843463243900e-03)
_B4, _B6 = F32(1.18534705686654e-04), F32(1.19825839466702e-06)


@precise_helper
def tanh(x):
    """tanh for float32 x."""
    x = min(max(x, F32(-9.0)), F32(9.0))
    x2 = x * x
    p = ((((((_A13 * x2 + _A11) * x2 + _A9) * x2 + _A7) * x2 + _A5) * x2 + _A3) * x2 + _A1) * x
    q = ((_B6 * x2 + _B4) * x2 + _B2) * x2 + _B0
    return p / q
