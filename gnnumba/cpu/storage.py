"""How the kernels read and write elements: float32/float64 directly, half precision as bits.

NumPy has no bfloat16 and Numba's CPU target no float16, so half-precision tensors reach the
kernels as their bits: bfloat16 as uint16, float16 as int16 (``HALF_BITS``). Every element is
read through ``load`` and written through ``store``, which convert to and from float32 in
registers; for float32/float64 arrays they are plain indexing. So one set of kernels serves
every dtype, and half tensors cost no extra pass over memory.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

HALF_BITS = {"bfloat16": np.dtype(np.uint16), "float16": np.dtype(np.int16)}


def compute_dtype(storage) -> np.dtype:
    """The dtype the kernels compute in for a storage dtype: float32 for the half types."""
    storage = np.dtype(storage)
    return np.dtype(np.float32) if storage.itemsize == 2 else storage


@intrinsic
def _u32_as_f32(typingctx, u):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def _f32_as_u32(typingctx, f):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _f16_bits_to_f32(typingctx, h):
    def codegen(context, builder, sig, args):  # LLVM half: F16C's vcvtph2ps on x86
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.int16), codegen


@intrinsic
def _f32_to_f16_bits(typingctx, f):
    def codegen(context, builder, sig, args):  # round to nearest even, as torch
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.int16(types.float32), codegen


def load(a, i):
    """a[i] as a number: float32 for half-precision bits, else the element itself."""


@overload(load, inline="always")
def _load_impl(a, i):
    if a.dtype == types.uint16:  # bfloat16: the high half of a float32
        return lambda a, i: _u32_as_f32(np.uint32(a[i]) << np.uint32(16))
    if a.dtype == types.int16:  # float16
        return lambda a, i: _f16_bits_to_f32(a[i])
    return lambda a, i: a[i]


def store(a, i, v):
    """a[i] = v, rounding to half precision (nearest even) for half-precision bits."""


@overload(store, inline="always")
def _store_impl(a, i, v):
    if a.dtype == types.uint16:
        def impl(a, i, v):
            u = _f32_as_u32(np.float32(v))
            if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):  # NaN stays a quiet NaN
                a[i] = np.uint16((u >> np.uint32(16)) | np.uint32(0x40))
            else:
                a[i] = np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
                                 >> np.uint32(16))
        return impl
    if a.dtype == types.int16:
        def impl(a, i, v):
            a[i] = _f32_to_f16_bits(np.float32(v))
        return impl

    def impl(a, i, v):
        a[i] = v
    return impl


def cast(a, v):
    """v converted to the type the kernels compute in for a's elements (float32 arithmetic
    stays float32 in Numba only when every operand is float32; Python numbers are float64)."""


@overload(cast, inline="always")
def _cast_impl(a, v):
    dtype = types.float32 if a.dtype in (types.uint16, types.int16) else a.dtype

    def impl(a, v):
        return dtype(v)

    return impl


@intrinsic
def stack_zeros(typingctx, n, like):
    """A pointer to ``n`` zeros of ``like``'s type on the stack (``n`` a literal int); wrap it
    with ``numba.carray(ptr, (n,))``. Used for the lane accumulators of the reductions: a
    fixed-size stack array whose elements LLVM keeps in vector registers (a heap array is not
    promoted, measured 8x slower)."""
    if not isinstance(n, types.IntegerLiteral) or not isinstance(like, types.Float):
        return None
    size = n.literal_value

    def codegen(context, builder, sig, args):
        from numba.core import cgutils

        ptr = cgutils.alloca_once(builder, context.get_data_type(like), size=size)
        zero = context.get_constant(like, 0)
        for j in range(size):
            builder.store(zero, builder.gep(ptr, [context.get_constant(types.intp, j)]))
        return ptr

    return types.CPointer(like)(n, like), codegen
