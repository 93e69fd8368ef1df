"""The activation table (``gnnumba.activations``) compiled for the CPU kernels.

``forward(act, z, one)`` and ``derivative(act, z, one)`` are the table's own scalar formulas,
inlined into each kernel loop. ``act`` is a run-time int there, but it does not change inside a
loop, so LLVM unswitches the loop on it: with ``act == NONE`` the loop is the plain vectorised
one (measured: 2.9 us for 65k float32 elements with or without the activation branch).

The formulas are compiled with one substitution: ``math.exp`` of a float32 is ``expf`` below,
plain arithmetic that LLVM can vectorise, where libm's ``expf`` is a call per element that
keeps the loop scalar (SiLU at 2x320x64x64: 2.6 ms of a 3.1 ms forward, against 0.5 ms for
GroupNorm alone). Everything else (float64 exp, erf, sqrt) is ``math``'s.
"""

import math
import types as pytypes

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from .. import activations

NONE = activations.NONE

# Cephes' expf: exp(x) = 2**n * exp(r), n = round(x / ln 2), r = x - n ln 2 in two parts
# (Cody-Waite), exp(r) by a degree-7 polynomial on |r| <= ln(2)/2. Measured over 3M float32
# inputs: at most 1 ulp from the correctly rounded exp (NumPy's float32 exp: 2 ulp); inf, 0,
# NaN and the denormal range as exp (tests/test_cpu_numerics.py).
_LOG2E = np.float32(1.44269504088896341)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_P0, _P1, _P2, _P3, _P4, _P5 = (np.float32(c) for c in (
    1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
    5.0000001201e-1))
_HI = np.float32(88.72283935546875)    # above: inf (the largest float32 is exp(88.7228...))
_LO = np.float32(-103.97207708)        # below: 0 (half the smallest denormal)
_HALF = np.float32(0.5)
_ONE = np.float32(1.0)
_ZERO = np.float32(0.0)
_INF = np.float32(np.inf)


@intrinsic
def _pow2(typingctx, n):
    """2.0**n as float32 for an integer -126 <= n <= 127 (its exponent bits)."""
    if not isinstance(n, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        v = args[0]
        v = builder.trunc(v, i32) if v.type.width > 32 else builder.sext(v, i32) \
            if v.type.width < 32 else v
        bits = builder.shl(builder.add(v, ir.Constant(i32, 127)), ir.Constant(i32, 23))
        return builder.bitcast(bits, ir.FloatType())

    return types.float32(n), codegen


@intrinsic
def _where(typingctx, cond, a, b):
    """``a if cond else b`` as one LLVM select (no branch in Numba's IR: conditional
    expressions inlined into the kernels tripped Numba's SSA checks)."""
    if not isinstance(cond, types.Boolean) or a != b:
        return None

    def codegen(context, builder, sig, args):
        return builder.select(args[0], args[1], args[2])

    return a(cond, a, b), codegen


@njit(inline="always")
def expf(x):
    """exp of a float32 in float32 arithmetic: IEEE operations in a fixed order (no fused
    multiply-adds), so the vectorised loop and a scalar remainder give the same bits."""
    xc = _where(x > _HI, _HI, _where(x < _LO, _LO, x))
    z = np.floor(xc * _LOG2E + _HALF)
    r = (xc - z * _LN2_HI) - z * _LN2_LO
    p = ((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5
    p = (p * r) * r + r + _ONE
    n = np.int32(z)
    n1 = n >> 1  # 2**n in two factors: n reaches -150 (denormal results) and 128
    y = (p * _pow2(n1)) * _pow2(n - n1)
    return _where(x != x, x, _where(x > _HI, _INF, _where(x < _LO, _ZERO, y)))


def exp(x):
    """``math.exp`` as the CPU kernels compile it (see the module doc)."""
    return math.exp(x)


@overload(exp, inline="always")
def _exp(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        return lambda x: expf(x)
    return lambda x: math.exp(x)


# the ``math`` the table's formulas see when compiled here
_cpu_math = pytypes.ModuleType("gnnumba.cpu.activation.math")
_cpu_math.exp = exp
for _name in ("erf", "sqrt", "acos"):
    setattr(_cpu_math, _name, getattr(math, _name))


def _compile(f):
    """``f`` from the table, compiled with ``math`` replaced by ``_cpu_math``."""
    g = pytypes.FunctionType(f.__code__, {**f.__globals__, "math": _cpu_math}, f.__name__,
                             f.__defaults__, f.__closure__)
    return njit(inline="always")(g)


forward = _compile(activations.forward)
derivative = _compile(activations.derivative)
