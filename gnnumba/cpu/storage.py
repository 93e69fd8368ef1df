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


def holds_compute_dtype(a):
    """True when a's elements are stored in the dtype the kernels compute in (float32,
    float64), False for half-precision bits: storing a value and reading it back is then
    exact. A compile-time constant."""


@overload(holds_compute_dtype, inline="always")
def _holds_compute_dtype_impl(a):
    exact = a.dtype not in (types.uint16, types.int16)
    return lambda a: exact


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

        elt = context.get_data_type(like)
        ptr = cgutils.alloca_once(builder, elt, size=size)
        # cache-line aligned: the lanes are stored and reloaded as whole vectors, and a
        # vector split across two lines is not forwarded from the store (3x slower sums)
        ptr.align = 64
        # one vector store of zeros: element-wise stores stayed 64 scalar stores per call
        # in some loop nests (~20 ns for each 7x7 row's sums)
        builder.store(ir.Constant(ir.VectorType(elt, size), None),
                      builder.bitcast(ptr, ir.VectorType(elt, size).as_pointer()),
                      align=context.get_abi_sizeof(elt))
        return ptr

    return types.CPointer(like)(n, like), codegen


@intrinsic
def fold_lanes(typingctx, acc):
    """The sum of a 64-element float array (the lane accumulators of the reductions), added
    pairwise in a fixed order: lanes j and j + 32, then j and j + 16, ... down to one.

    Written as vector IR (halves of one <64 x float> added together) because the same fold
    in Python source was scalarised by LLVM: 126 scalar adds per fold, which made a 7x7 row
    (one fold per channel row) cost 3x its own loads."""
    if not (isinstance(acc, types.Array) and isinstance(acc.dtype, types.Float)):
        return None

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        elt = context.get_data_type(sig.args[0].dtype)
        vec = builder.load(builder.bitcast(data, ir.VectorType(elt, FOLD_LANES).as_pointer()),
                           align=context.get_abi_sizeof(elt))
        width = FOLD_LANES
        while width > 1:
            half = width // 2
            lo = ir.Constant(ir.VectorType(ir.IntType(32), half), list(range(half)))
            hi = ir.Constant(ir.VectorType(ir.IntType(32), half), list(range(half, width)))
            vec = builder.fadd(builder.shuffle_vector(vec, vec, lo),
                               builder.shuffle_vector(vec, vec, hi))
            width = half
        return builder.extract_element(vec, ir.Constant(ir.IntType(32), 0))

    return acc.dtype(acc), codegen


FOLD_LANES = 64


def _splat(builder, value, vty):
    v = builder.insert_element(ir.Constant(vty, None), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), vty.count),
                                                    [0] * vty.count))


def _contiguous_1d(*arrays) -> bool:
    """The lane intrinsics address elements as pointer + index: 1-D contiguous arrays only
    (anything else fails to compile rather than reading the wrong elements)."""
    return all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" for a in arrays)


def _lanes_ptr(builder, context, aryty, ary, offset):
    """Pointer to element ``offset`` of a contiguous 1-D array."""
    data = context.make_array(aryty)(context, builder, ary).data
    return builder.gep(data, [offset])


def _load_lanes(builder, context, aryty, ary, offset, mask):
    """FOLD_LANES elements of a 1-D array from ``offset`` as a float32/float64 vector, lanes
    off in ``mask`` read as 0 and never touched (AVX-512 masked loads); ``mask`` None: all
    lanes (a plain load)."""
    ptr = _lanes_ptr(builder, context, aryty, ary, offset)
    elt = context.get_data_type(aryty.dtype)
    vty = ir.VectorType(elt, FOLD_LANES)
    if mask is None:  # a full block
        v = builder.load(builder.bitcast(ptr, vty.as_pointer()),
                         align=aryty.dtype.bitwidth // 8)
    else:
        name = "llvm.masked.load.v%d%s.p0" % (FOLD_LANES, {"float": "f32", "double": "f64"}.get(
            str(elt), "i16"))
        fn = builder.module.globals.get(name)
        if fn is None:
            fn = ir.Function(builder.module, ir.FunctionType(
                vty, [ptr.type, ir.IntType(32), mask.type, vty]), name=name)
        v = builder.call(fn, [ptr, ir.Constant(ir.IntType(32), aryty.dtype.bitwidth // 8),
                              mask, ir.Constant(vty, None)])
    f32 = ir.VectorType(ir.FloatType(), FOLD_LANES)
    i32v = ir.VectorType(ir.IntType(32), FOLD_LANES)
    if aryty.dtype == types.uint16:  # bfloat16 bits: the high half of a float32
        v = builder.bitcast(builder.shl(builder.zext(v, i32v),
                                        _splat(builder, ir.Constant(ir.IntType(32), 16), i32v)),
                            f32)
    elif aryty.dtype == types.int16:  # float16 bits
        v = builder.fpext(builder.bitcast(v, ir.VectorType(ir.HalfType(), FOLD_LANES)), f32)
    return v


def _mask(builder, count):
    """<FOLD_LANES x i1>: lane j < count (count clamped to [0, FOLD_LANES], compared as
    bytes: one vector compare)."""
    i64 = ir.IntType(64)
    if count.type.width < 64:
        count = builder.sext(count, i64)
    lanes = ir.Constant(i64, FOLD_LANES)
    count = builder.select(builder.icmp_signed("<", count, lanes), count, lanes)
    count = builder.select(builder.icmp_signed("<", count, ir.Constant(i64, 0)),
                           ir.Constant(i64, 0), count)
    i8v = ir.VectorType(ir.IntType(8), FOLD_LANES)
    return builder.icmp_unsigned("<", ir.Constant(i8v, list(range(FOLD_LANES))),
                                 _splat(builder, builder.trunc(count, ir.IntType(8)), i8v))


def _blocks(builder, count, body):
    """Emit ``body(mask)`` twice: with ``mask`` None (plain vector loads and stores) when the
    block is full, ``count >= FOLD_LANES``, and with the lane mask otherwise. Masked loads
    measured 2.6x slower than plain ones on this machine's AMD EPYC (a float32 sum of
    products over 2.6M elements: 745 vs 282 us, one thread; BLAS sdot 277 us), and all but
    a row's last block are full. Both branches do the same arithmetic on the lanes they
    keep: the same bits."""
    i64 = ir.IntType(64)
    n = builder.sext(count, i64) if count.type.width < 64 else count
    full = builder.icmp_signed(">=", n, ir.Constant(i64, FOLD_LANES))
    with builder.if_else(full, likely=True) as (then, otherwise):
        with then:
            body(None)
        with otherwise:
            body(_mask(builder, count))


def _keep(builder, mask, vec):
    """``vec`` with the lanes off in ``mask`` set to 0 (all kept when ``mask`` is None)."""
    if mask is None:
        return vec
    return builder.select(mask, vec, ir.Constant(vec.type, None))


@intrinsic
def prefetch(typingctx, a, i):
    """Ask for the cache line that holds element i of a 1-D contiguous array, ahead of its
    use (``llvm.prefetch``: a read, kept in every cache level). No effect on any value.

    AVX-512 masked loads that miss the cache are slow on this machine's AMD EPYC: a
    backward at 8x2048x7x7, whose 49-element rows are one masked block each, took 736 us
    from a cold cache (195 us hot) and 392 us once its group's lines were fetched ahead with
    plain loads; with the lines requested ahead, the misses overlap."""
    if not _contiguous_1d(a):
        return None

    def codegen(context, builder, sig, args):
        ptr = builder.bitcast(_lanes_ptr(builder, context, sig.args[0], args[0], args[1]),
                              ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fn = builder.module.globals.get("llvm.prefetch.p0")
        if fn is None:
            fn = ir.Function(builder.module, ir.FunctionType(
                ir.VoidType(), [ptr.type, i32, i32, i32]), name="llvm.prefetch.p0")
        # read (0), highest locality (3), data cache (1)
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.none(a, i), codegen


@intrinsic
def add_lane_sums(typingctx, acc1, acc2, dyr, xr, i, m, count):
    """acc1 += dy, acc2 += dy * (x - m), lane j taking element i + j of the 1-D arrays
    ``dyr`` and ``xr`` for j < count (lanes past count add nothing and read nothing). One
    block of the lane reductions, written as vector IR: the same loop in Python source was
    vectorised or not depending on the code around it (3x apart between two kernels)."""
    if not _contiguous_1d(acc1, acc2, dyr, xr):
        return None

    def codegen(context, builder, sig, args):
        a1t, a2t, gt, xt = sig.args[:4]
        ct = context.get_data_type(a1t.dtype)
        vty = ir.VectorType(ct, FOLD_LANES)
        p1 = builder.bitcast(context.make_array(a1t)(context, builder, args[0]).data,
                             vty.as_pointer())
        p2 = builder.bitcast(context.make_array(a2t)(context, builder, args[1]).data,
                             vty.as_pointer())
        align = context.get_abi_sizeof(ct)

        def body(mask):
            g = _load_lanes(builder, context, gt, args[2], args[4], mask)
            x = _load_lanes(builder, context, xt, args[3], args[4], mask)
            d = _keep(builder, mask, builder.fsub(x, _splat(builder, args[5], vty)))
            builder.store(builder.fadd(builder.load(p1, align=align), g), p1, align=align)
            builder.store(builder.fadd(builder.load(p2, align=align), builder.fmul(g, d)), p2,
                          align=align)

        _blocks(builder, args[6], body)
        return context.get_dummy_value()

    return types.none(acc1, acc2, dyr, xr, i, m, count), codegen


def _store_lanes(builder, context, aryty, ary, offset, vec, mask):
    """Store a float32/float64 vector into FOLD_LANES elements of a 1-D array from
    ``offset``, lanes off in ``mask`` untouched; half types rounded exactly as ``store``."""
    data = _lanes_ptr(builder, context, aryty, ary, offset)
    n = FOLD_LANES
    if aryty.dtype == types.int16:  # float16: round to nearest even (vcvtps2ph)
        vec = builder.bitcast(builder.fptrunc(vec, ir.VectorType(ir.HalfType(), n)),
                              ir.VectorType(ir.IntType(16), n))
    elif aryty.dtype == types.uint16:  # bfloat16: the rounding of ``store``, lane-wise
        i32v = ir.VectorType(ir.IntType(32), n)

        def c(v):
            return _splat(builder, ir.Constant(ir.IntType(32), v), i32v)

        u = builder.bitcast(vec, i32v)
        is_nan = builder.icmp_unsigned(">", builder.and_(u, c(0x7FFFFFFF)), c(0x7F800000))
        rounded = builder.lshr(builder.add(builder.add(u, c(0x7FFF)),
                                           builder.and_(builder.lshr(u, c(16)), c(1))), c(16))
        quiet = builder.or_(builder.lshr(u, c(16)), c(0x40))
        vec = builder.trunc(builder.select(is_nan, quiet, rounded),
                            ir.VectorType(ir.IntType(16), n))
    if mask is None:  # a full block
        builder.store(vec, builder.bitcast(data, vec.type.as_pointer()),
                      align=aryty.dtype.bitwidth // 8)
        return
    name = "llvm.masked.store.v%d%s.p0" % (n, {"float": "f32", "double": "f64"}.get(
        str(vec.type.element), "i16"))
    fn = builder.module.globals.get(name)
    if fn is None:
        fn = ir.Function(builder.module, ir.FunctionType(
            ir.VoidType(), [vec.type, data.type, ir.IntType(32), mask.type]), name=name)
    builder.call(fn, [vec, data, ir.Constant(ir.IntType(32), aryty.dtype.bitwidth // 8),
                      mask])


@intrinsic
def dx_lanes(typingctx, dxr, dyr, xr, i, a, m, k1, k0, count):
    """dx = a*dy + k1*(x - m) + k0 for elements i .. i + min(count, FOLD_LANES) - 1 of the
    1-D arrays (the others neither read nor written), in that evaluation order and without
    fused multiply-adds, so it gives the bits of the scalar formula. Vector IR for the same
    reason as ``add_lane_sums``."""
    if not _contiguous_1d(dxr, dyr, xr):
        return None

    def codegen(context, builder, sig, args):
        dxt, gt, xt, _it, at = sig.args[:5]
        ct = context.get_data_type(at)
        vty = ir.VectorType(ct, FOLD_LANES)
        def body(mask):
            g = _load_lanes(builder, context, gt, args[1], args[3], mask)
            x = _load_lanes(builder, context, xt, args[2], args[3], mask)
            d = builder.fsub(x, _splat(builder, args[5], vty))
            out = builder.fadd(builder.fadd(builder.fmul(_splat(builder, args[4], vty), g),
                                            builder.fmul(_splat(builder, args[6], vty), d)),
                               _splat(builder, args[7], vty))
            _store_lanes(builder, context, dxt, args[0], args[3], out, mask)

        _blocks(builder, args[8], body)
        return context.get_dummy_value()

    return types.none(dxr, dyr, xr, i, a, m, k1, k0, count), codegen


@intrinsic
def add_lane_deviations(typingctx, acc1, acc2, xr, i, mr, j, count):
    """acc1 += d, acc2 += d*d with d = x[i + l] - m[j + l], lane l < count (the others
    unchanged, their elements not read): one position of a channels-last block, a tile of
    FOLD_LANES channels with one accumulator lane per channel."""
    if not _contiguous_1d(acc1, acc2, xr, mr):
        return None

    def codegen(context, builder, sig, args):
        a1t, a2t, xt, _it, mt = sig.args[:5]
        ct = context.get_data_type(a1t.dtype)
        vty = ir.VectorType(ct, FOLD_LANES)
        p1 = builder.bitcast(context.make_array(a1t)(context, builder, args[0]).data,
                             vty.as_pointer())
        p2 = builder.bitcast(context.make_array(a2t)(context, builder, args[1]).data,
                             vty.as_pointer())
        align = context.get_abi_sizeof(ct)

        def body(mask):
            x = _load_lanes(builder, context, xt, args[2], args[3], mask)
            m = _load_lanes(builder, context, mt, args[4], args[5], mask)
            d = _keep(builder, mask, builder.fsub(x, m))
            builder.store(builder.fadd(builder.load(p1, align=align), d), p1, align=align)
            builder.store(builder.fadd(builder.load(p2, align=align), builder.fmul(d, d)), p2,
                          align=align)

        _blocks(builder, args[6], body)
        return context.get_dummy_value()

    return types.none(acc1, acc2, xr, i, mr, j, count), codegen


@intrinsic
def add_channel_sums(typingctx, acc1, acc2, dyr, xr, i, mr, j, count):
    """acc1 += dy, acc2 += dy * (x - m) with x, dy elements i + l and m[j + l], lane l <
    count (the others unchanged, their elements not read); the products in x's compute
    dtype, the accumulators float64 (the order of the scalar loop it replaces: each
    channel's sums add its positions one by one, in float64). One position of a
    channels-last block, a tile of FOLD_LANES channels."""
    if not _contiguous_1d(acc1, acc2, dyr, xr, mr):
        return None

    def codegen(context, builder, sig, args):
        a1t, a2t, gt, xt, _it, mt = sig.args[:6]
        ct = context.get_data_type(mt.dtype)
        at = context.get_data_type(a1t.dtype)
        vty = ir.VectorType(ct, FOLD_LANES)
        aty = ir.VectorType(at, FOLD_LANES)
        p1 = builder.bitcast(context.make_array(a1t)(context, builder, args[0]).data,
                             aty.as_pointer())
        p2 = builder.bitcast(context.make_array(a2t)(context, builder, args[1]).data,
                             aty.as_pointer())
        align = context.get_abi_sizeof(at)

        def body(mask):
            g = _load_lanes(builder, context, gt, args[2], args[4], mask)
            x = _load_lanes(builder, context, xt, args[3], args[4], mask)
            m = _load_lanes(builder, context, mt, args[5], args[6], mask)
            g = _keep(builder, mask, g)
            gd = _keep(builder, mask, builder.fmul(g, builder.fsub(x, m)))
            if ct != at:
                g = builder.fpext(g, aty)
                gd = builder.fpext(gd, aty)
            builder.store(builder.fadd(builder.load(p1, align=align), g), p1, align=align)
            builder.store(builder.fadd(builder.load(p2, align=align), gd), p2, align=align)

        _blocks(builder, args[7], body)
        return context.get_dummy_value()

    return types.none(acc1, acc2, dyr, xr, i, mr, j, count), codegen


@intrinsic
def apply_channels(typingctx, yr, xr, c0, m, scale, shift, count):
    """y = (x - m) * scale + shift for channels c0 .. c0 + min(count, FOLD_LANES) - 1 of one
    channels-last position (``xr``/``yr`` its C elements, the coefficient rows indexed by
    channel too), in that order and without fused multiply-adds: the bits of the scalar
    formula. A loop over channels with four coefficient arrays stayed scalar in LLVM."""
    if not _contiguous_1d(yr, xr, m, scale, shift):
        return None

    def codegen(context, builder, sig, args):
        yt, xt, _ct, mt, st, ht = sig.args[:6]

        def body(mask):
            def lanes(t, a):
                return _load_lanes(builder, context, t, a, args[2], mask)

            z = builder.fmul(builder.fsub(lanes(xt, args[1]), lanes(mt, args[3])),
                             lanes(st, args[4]))
            _store_lanes(builder, context, yt, args[0], args[2],
                         builder.fadd(z, lanes(ht, args[5])), mask)

        _blocks(builder, args[6], body)
        return context.get_dummy_value()

    return types.none(yr, xr, c0, m, scale, shift, count), codegen


@intrinsic
def dx_channels(typingctx, dxr, dyr, xr, c0, a, m, k1, k0, count):
    """dx = a*dy + k1*(x - m) + k0 for channels c0 .. c0 + min(count, FOLD_LANES) - 1 of one
    channels-last position, coefficients per channel, in that evaluation order and without
    fused multiply-adds (the scalar formula's bits); the channels-last twin of
    ``dx_lanes``."""
    if not _contiguous_1d(dxr, dyr, xr, a, m, k1, k0):
        return None

    def codegen(context, builder, sig, args):
        dxt, gt, xt, _ct, at, mt, k1t, k0t = sig.args[:8]

        def body(mask):
            def lanes(t, v):
                return _load_lanes(builder, context, t, v, args[3], mask)

            d = builder.fsub(lanes(xt, args[2]), lanes(mt, args[5]))
            out = builder.fadd(builder.fadd(builder.fmul(lanes(at, args[4]), lanes(gt, args[1])),
                                            builder.fmul(lanes(k1t, args[6]), d)),
                               lanes(k0t, args[7]))
            _store_lanes(builder, context, dxt, args[0], args[3], out, mask)

        _blocks(builder, args[8], body)
        return context.get_dummy_value()

    return types.none(dxr, dyr, xr, c0, a, m, k1, k0, count), codegen
