"""GroupNorm forward and backward as Numba CPU kernels.

Two memory layouts, each a fast path:

* NCHW (C-contiguous): a group (n, g) is one contiguous run of D = C/G * S elements.
  - "serial" path: inputs under ``config.CPU_SERIAL_MAX_ELEMENTS``, on the calling thread.
  - "fused" path: one task per group; the group's statistics are computed chunk by chunk and
    the group is normalised right away while it is still in L2 (one DRAM read, one write).
  - "split" path: when there are too few groups to keep every thread busy, or a group is
    larger than L2, the chunks of all groups are spread over the threads, merged per group
    in chunk order, then applied. Same arithmetic in the same order: bit-identical results.
* channels-last (memory order N, spatial..., C): a sample is cut into blocks of whole spatial
  positions; per-channel accumulators run vectorised along C, and the per-block partials are
  merged in block order. Parallel and serial kernels share the per-task helpers.

Statistics: each chunk (or block) gets the corrected two-pass algorithm while it is in cache
(mean, then deviations and their sum, which removes the rounding error of the mean), summed
in x's dtype; chunks are merged in float64 with Chan's parallel formula. Never
E[x^2] - E[x]^2.

dtypes: float32 and float64, and float16/bfloat16 stored as their bits and converted in
registers (``_load``/``_store``).

Backward uses the saved mean/rstd in closed form. Per (n, c) it forms
    db[n, c]  = sum(dy)                  (= per-sample dbeta)
    dxh[n, c] = sum(dy * (x - mu)) * rstd  (= per-sample dgamma)
then dx = rstd*gamma*dy + k1*(x - mu) + k0 per group, and dgamma/dbeta are sums over n in
order. With activation="silu" the pre-activation z is recomputed from x, mean and rstd, and
dz = dy * silu'(z) is parked in dx between the two passes (no extra buffer).

Inner loops always run over a slice from index 0 (``a = row[lo:hi]; for i in
range(a.shape[0])``): with ``range(lo, hi)`` Numba's negative-index wraparound check stops LLVM
from vectorising, measured 4x slower (1.7 vs 7.3 Gelem/s for a float64 sum of float32).

No atomics anywhere; every blocking is a constant from ``config``, so the result does not
depend on the number of threads.
"""

from __future__ import annotations

import os

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from . import config

# Fast-math is confined to the two reduction helpers, _chunk_stats and _row_sums: "reassoc"
# lets LLVM vectorise their float64 sums (several accumulators). They are separate compiled
# functions, so every kernel runs the same reduction code; everything else is strict IEEE.
# With reassoc on a whole kernel, LLVM re-associated the scalar merge formulas differently in
# the serial and parallel kernels and their results differed in the last bit. NaN/Inf
# semantics are kept (no "nnan"/"ninf"), so NaN input gives NaN output.
_FM = {"reassoc", "nsz"}


# --------------------------------------------------------------------------- storage types
# NumPy has no bfloat16 and Numba's CPU target no float16, so half-precision tensors reach the
# kernels as their bits: bfloat16 as uint16, float16 as int16 (``HALF_BITS``). Every element is
# read through ``_load`` and written through ``_store``, which convert to and from float32 in
# registers; for float32/float64 arrays they are plain indexing. So one set of kernels serves
# every dtype, and half tensors cost no extra pass over memory.

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


def _load(a, i):
    """a[i] as a number: float32 for half-precision bits, else the element itself."""


@overload(_load, inline="always")
def _load_impl(a, i):
    if a.dtype == types.uint16:  # bfloat16: the high half of a float32
        return lambda a, i: _u32_as_f32(np.uint32(a[i]) << np.uint32(16))
    if a.dtype == types.int16:  # float16
        return lambda a, i: _f16_bits_to_f32(a[i])
    return lambda a, i: a[i]


def _store(a, i, v):
    """a[i] = v, rounding to half precision (nearest even) for half-precision bits."""


@overload(_store, inline="always")
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


def _cast(a, v):
    """v converted to the type the kernels compute in for a's elements (float32 arithmetic
    stays float32 in Numba only when every operand is float32; Python numbers are float64)."""


@overload(_cast, inline="always")
def _cast_impl(a, v):
    dtype = types.float32 if a.dtype in (types.uint16, types.int16) else a.dtype

    def impl(a, v):
        return dtype(v)

    return impl


# --------------------------------------------------------------------------- helpers


@njit(cache=True, fastmath=_FM)
def _chunk_stats(a):
    """(mean, M2) of an L1-sized chunk, in float64: the corrected two-pass algorithm.

    Pass 1 sums in x's dtype (float32 lanes: twice the SIMD width of float64, and the chunk
    is short), pass 2 sums d = x - m and d*d around that rounded mean m; the sum of d then
    removes m's rounding error exactly to first order (Chan, Golub & LeVeque, 1983):
    mean = m + sum(d)/n, M2 = sum(d*d) - sum(d)**2/n. Chunks are merged in float64."""
    n = a.shape[0]
    s = _cast(a, 0)
    for i in range(n):
        s += _load(a, i)
    m = _cast(a, s / n)
    d1 = _cast(a, 0)
    q = _cast(a, 0)
    for i in range(n):
        d = _load(a, i) - m
        d1 += d
        q += d * d
    return m + d1 / n, q - d1 * d1 / n


@njit(inline="always")
def _merge(n_a, m_a, q_a, n_b, m_b, q_b):
    """Chan et al.'s merge of (count, mean, M2) partials; exact order-dependent, so callers
    always merge in a fixed order."""
    n = n_a + n_b
    if n_b == 0:
        return n_a, m_a, q_a
    d = m_b - m_a
    f = n_b / n
    return n, m_a + d * f, q_a + q_b + d * d * n_a * f


@njit(inline="always")
def _rstd(m2, count, eps):
    if count == 0:
        return 1.0 / np.sqrt(eps)
    return 1.0 / np.sqrt(m2 / count + eps)


@njit(inline="always")
def _group_stats(xg, chunk, eps):
    """(mean, rstd) of one contiguous group: chunk statistics merged in chunk order (the
    split path does the same merges in the same order)."""
    cnt = 0
    mu = 0.0
    m2 = 0.0
    for lo in range(0, xg.shape[0], chunk):
        m, q = _chunk_stats(xg[lo:lo + chunk])
        cnt, mu, m2 = _merge(cnt, mu, m2, min(chunk, xg.shape[0] - lo), m, q)
    return mu, _rstd(m2, xg.shape[0], eps)


@njit(inline="always")
def _set_forward_coefs(coef, n, g, Cg, mean, rstd, w, b):
    """y = (x - mean) * scale + beta per channel of group g: coef[n, :, c] = (scale, beta,
    mean), stored in x's dtype so the apply loops run in that precision. The folded form
    x*scale + (beta - mean*scale) loses digits when |mean| * rstd is large (a near-constant
    group with an offset), so the subtraction stays."""
    for c in range(g * Cg, (g + 1) * Cg):
        coef[n, 0, c] = rstd * w[c]
        coef[n, 1, c] = b[c]
        coef[n, 2, c] = mean


@njit(inline="always")
def _apply_row(xr, yr, sc, sh, m, one, silu):
    if silu:
        for s in range(xr.shape[0]):
            v = (_load(xr, s) - m) * sc + sh
            _store(yr, s, v / (one + np.exp(-v)))
    else:
        for s in range(xr.shape[0]):
            _store(yr, s, (_load(xr, s) - m) * sc + sh)


@njit(inline="always")
def _silu_grad_row(xr, dyr, dzr, a, c0, m, one):
    """dz = dy * silu'(z) with z = (x - m)*a + c0 recomputed from the saved statistics."""
    for s in range(xr.shape[0]):
        z = (_load(xr, s) - m) * a + c0
        sg = one / (one + np.exp(-z))
        _store(dzr, s, _load(dyr, s) * (sg * (one + z * (one - sg))))


@njit(cache=True, fastmath=_FM)
def _row_sums(gr, xr, m):
    """sum(g) and sum(g * (x - m)) over one chunk of a row, accumulated in x's dtype (the
    chunk is short); callers add the chunk results up in float64."""
    s1 = _cast(xr, 0)
    s2 = _cast(xr, 0)
    for s in range(xr.shape[0]):
        v = _load(gr, s)
        s1 += v
        s2 += v * (_load(xr, s) - m)
    return s1, s2


@njit(inline="always")
def _set_backward_coefs(coef, n, g, Cg, M, mean, rstd, w, db, dxh):
    """Per channel of group g: coef[n, :, c] = (rstd*gamma, k1, mean, k0) such that
    dx = rstd*gamma*dz + k1*(x - mean) + k0."""
    A = 0.0
    B = 0.0
    for c in range(g * Cg, (g + 1) * Cg):
        A += w[c] * db[n, c]
        B += w[c] * dxh[n, c]
    k1 = -rstd * rstd * B / M if M > 0 else 0.0
    k0 = -rstd * A / M if M > 0 else 0.0
    for c in range(g * Cg, (g + 1) * Cg):
        coef[n, 0, c] = rstd * w[c]
        coef[n, 1, c] = k1
        coef[n, 2, c] = mean
        coef[n, 3, c] = k0


@njit(inline="always")
def _dx_row(xr, gr, dxr, a, k1, m, k0):
    for s in range(xr.shape[0]):
        _store(dxr, s, a * _load(gr, s) + k1 * (_load(xr, s) - m) + k0)


# --------------------------------------------------------------------------- NCHW forward


@njit(inline="always")
def _fwd_group(t, x2, x3, w, b, eps, silu, one, chunk, y3, mean, rstd, coef):
    """Fused forward of group t = n*G + g: statistics, then normalise while it is in L2."""
    G = mean.shape[1]
    Cg = x3.shape[1] // G
    n = t // G
    g = t - n * G
    mu, r = _group_stats(x2[t], chunk, eps)
    mean[n, g] = mu
    rstd[n, g] = r
    _set_forward_coefs(coef, n, g, Cg, mu, r, w, b)
    for c in range(g * Cg, (g + 1) * Cg):
        _apply_row(x3[n, c], y3[n, c], coef[n, 0, c], coef[n, 1, c], coef[n, 2, c], one, silu)


@njit(parallel=True, cache=True)
def _fwd_nchw_fused(x2, x3, w, b, eps, silu, one, chunk, y3, mean, rstd, coef):
    for t in prange(x2.shape[0]):
        _fwd_group(t, x2, x3, w, b, eps, silu, one, chunk, y3, mean, rstd, coef)


@njit(cache=True)
def _fwd_nchw_serial(x2, x3, w, b, eps, silu, one, chunk, y3, mean, rstd, coef):
    """The fused kernel on the calling thread, for inputs too small to pay for waking the
    thread pool (or for waiting on a core another process holds)."""
    for t in range(x2.shape[0]):
        _fwd_group(t, x2, x3, w, b, eps, silu, one, chunk, y3, mean, rstd, coef)


@njit(parallel=True, cache=True)
def _fwd_nchw_split(x2, x3, w, b, eps, silu, one, chunk, y3, mean, rstd, coef):
    N, C, S = x3.shape
    G = mean.shape[1]
    Cg = C // G
    D = Cg * S
    nk = (D + chunk - 1) // chunk
    pm = np.empty((N * G, nk))
    pq = np.empty((N * G, nk))
    for t in prange(N * G * nk):
        ng = t // nk
        k = t - ng * nk
        lo = k * chunk
        hi = min(lo + chunk, D)
        pm[ng, k], pq[ng, k] = _chunk_stats(x2[ng, lo:hi])
    for ng in prange(N * G):
        n = ng // G
        g = ng - n * G
        cnt = 0
        mu = 0.0
        m2 = 0.0
        for k in range(nk):
            lo = k * chunk
            cnt, mu, m2 = _merge(cnt, mu, m2, min(lo + chunk, D) - lo, pm[ng, k], pq[ng, k])
        r = _rstd(m2, D, eps)
        mean[n, g] = mu
        rstd[n, g] = r
        _set_forward_coefs(coef, n, g, Cg, mu, r, w, b)
    ns = (S + chunk - 1) // chunk
    for t in prange(N * C * ns):
        nc = t // ns
        lo = (t - nc * ns) * chunk
        n = nc // C
        c = nc - n * C
        hi = min(lo + chunk, S)
        _apply_row(x3[n, c, lo:hi], y3[n, c, lo:hi], coef[n, 0, c], coef[n, 1, c],
                   coef[n, 2, c], one, silu)


# --------------------------------------------------------------------------- NCHW backward


@njit(inline="always")
def _dz_coefs(rstd, w, b, c):
    """z = (x - mean)*a + c0 reproduces the pre-activation of channel c."""
    return rstd * w[c], b[c]


@njit(inline="always")
def _bwd_group(t, dy3, x3, mean, rstd, w, b, silu, one, chunk, dx3, db, dxh, coef):
    """Fused backward of group t = n*G + g: per-channel sums, then dx while it is in L2."""
    N, C, S = x3.shape
    G = mean.shape[1]
    Cg = C // G
    n = t // G
    g = t - n * G
    mu = mean[n, g]
    r = rstd[n, g]
    for c in range(g * Cg, (g + 1) * Cg):
        xr = x3[n, c]
        gr = dy3[n, c]
        coef[n, 2, c] = mu
        if silu:
            # park dz in dx; the second pass reads it back
            coef[n, 0, c], coef[n, 1, c] = _dz_coefs(r, w, b, c)
            _silu_grad_row(xr, gr, dx3[n, c], coef[n, 0, c], coef[n, 1, c], coef[n, 2, c], one)
            gr = dx3[n, c]
        s1 = 0.0
        s2 = 0.0
        for lo in range(0, S, chunk):
            hi = min(lo + chunk, S)
            a1, a2 = _row_sums(gr[lo:hi], xr[lo:hi], coef[n, 2, c])
            s1 += a1
            s2 += a2
        db[n, c] = s1
        dxh[n, c] = s2 * r
    _set_backward_coefs(coef, n, g, Cg, Cg * S, mu, r, w, db, dxh)
    for c in range(g * Cg, (g + 1) * Cg):
        gr = dx3[n, c] if silu else dy3[n, c]
        _dx_row(x3[n, c], gr, dx3[n, c], coef[n, 0, c], coef[n, 1, c], coef[n, 2, c],
                coef[n, 3, c])


@njit(parallel=True, cache=True)
def _bwd_nchw_fused(dy3, x3, mean, rstd, w, b, silu, one, chunk, dx3, db, dxh, coef):
    for t in prange(mean.size):
        _bwd_group(t, dy3, x3, mean, rstd, w, b, silu, one, chunk, dx3, db, dxh, coef)


@njit(cache=True)
def _bwd_nchw_serial(dy3, x3, mean, rstd, w, b, silu, one, chunk, dx3, db, dxh, coef):
    """The fused backward on the calling thread, for small inputs."""
    for t in range(mean.size):
        _bwd_group(t, dy3, x3, mean, rstd, w, b, silu, one, chunk, dx3, db, dxh, coef)


@njit(parallel=True, cache=True)
def _bwd_nchw_split(dy3, x3, mean, rstd, w, b, silu, one, chunk, dx3, db, dxh, coef):
    N, C, S = x3.shape
    G = mean.shape[1]
    Cg = C // G
    M = Cg * S
    ns = (S + chunk - 1) // chunk
    p1 = np.empty((N * C, ns))
    p2 = np.empty((N * C, ns))
    for nc in prange(N * C):
        n = nc // C
        c = nc - n * C
        g = c // Cg
        if silu:
            coef[n, 0, c], coef[n, 1, c] = _dz_coefs(rstd[n, g], w, b, c)
        coef[n, 2, c] = mean[n, g]
    for t in prange(N * C * ns):
        nc = t // ns
        k = t - nc * ns
        lo = k * chunk
        hi = min(lo + chunk, S)
        n = nc // C
        c = nc - n * C
        gr = dy3[n, c]
        if silu:
            _silu_grad_row(x3[n, c, lo:hi], gr[lo:hi], dx3[n, c, lo:hi], coef[n, 0, c],
                           coef[n, 1, c], coef[n, 2, c], one)
            gr = dx3[n, c]
        p1[nc, k], p2[nc, k] = _row_sums(gr[lo:hi], x3[n, c, lo:hi], coef[n, 2, c])
    for ng in prange(N * G):
        n = ng // G
        g = ng - n * G
        r = rstd[n, g]
        for c in range(g * Cg, (g + 1) * Cg):
            s1 = 0.0
            s2 = 0.0
            for k in range(ns):
                s1 += p1[n * C + c, k]
                s2 += p2[n * C + c, k]
            db[n, c] = s1
            dxh[n, c] = s2 * r
        _set_backward_coefs(coef, n, g, Cg, M, mean[n, g], r, w, db, dxh)
    for t in prange(N * C * ns):
        nc = t // ns
        lo = (t - nc * ns) * chunk
        n = nc // C
        c = nc - n * C
        hi = min(lo + chunk, S)
        gr = dx3[n, c, lo:hi] if silu else dy3[n, c, lo:hi]
        _dx_row(x3[n, c, lo:hi], gr, dx3[n, c, lo:hi], coef[n, 0, c], coef[n, 1, c],
                coef[n, 2, c], coef[n, 3, c])


# --------------------------------------------------------------------------- channels-last


@njit(inline="always")
def _cl_block_stats(xb, Cg, pm, pq, acc, acc2, mc):
    """Per-group (mean, M2) of one block (positions, C) of a channels-last sample, into
    pm[g], pq[g]: the corrected two-pass algorithm of ``_chunk_stats`` with per-channel
    accumulators in x's dtype, vectorised along C (the block stays in L2 between passes).
    ``acc``, ``acc2``, ``mc`` are (C,) scratch rows in x's dtype."""
    P, C = xb.shape
    G = C // Cg
    acc[:] = 0
    for s in range(P):
        xr = xb[s]
        for c in range(C):
            acc[c] += _load(xr, c)
    for g in range(G):
        mc[g * Cg:(g + 1) * Cg] = acc[g * Cg:(g + 1) * Cg].sum(dtype=np.float64) / (P * Cg)
    acc[:] = 0
    acc2[:] = 0
    for s in range(P):
        xr = xb[s]
        for c in range(C):
            d = _load(xr, c) - mc[c]
            acc[c] += d
            acc2[c] += d * d
    for g in range(G):
        n = P * Cg
        d1 = acc[g * Cg:(g + 1) * Cg].sum(dtype=np.float64)
        pm[g] = mc[g * Cg] + d1 / n
        pq[g] = acc2[g * Cg:(g + 1) * Cg].sum(dtype=np.float64) - d1 * d1 / n


@njit(inline="always")
def _cl_merge(pm, pq, g, sb, S, Cg, eps):
    """(mean, rstd) of group g from its per-block partials pm[k, g], pq[k, g], merged in
    block order."""
    cnt = 0
    mu = 0.0
    m2 = 0.0
    for k in range(pm.shape[0]):
        s0 = k * sb
        cnt, mu, m2 = _merge(cnt, mu, m2, (min(s0 + sb, S) - s0) * Cg, pm[k, g], pq[k, g])
    return mu, _rstd(m2, S * Cg, eps)


# Each channels-last kernel is a few passes over tasks; a task body is an inline helper so
# that the parallel kernel (prange) and the serial one for small inputs (range) share it.


@njit(inline="always")
def _cl_blocking(S, C, block):
    sb = max(1, block // max(C, 1))  # whole spatial positions per block
    return sb, (S + sb - 1) // sb


@njit(inline="always")
def _fwd_cl_stats_task(t, x3, sb, nb, Cg, pm, pq, scratch):
    n = t // nb
    k = t - n * nb
    s0 = k * sb
    sc = scratch[t]  # this task's own rows: no allocation inside the parallel loop
    _cl_block_stats(x3[n, s0:min(s0 + sb, x3.shape[1])], Cg, pm[n, k], pq[n, k], sc[0],
                    sc[1], sc[2])


@njit(inline="always")
def _fwd_cl_merge_task(ng, pm, pq, sb, S, Cg, eps, w, b, mean, rstd, coef):
    G = mean.shape[1]
    n = ng // G
    g = ng - n * G
    mu, r = _cl_merge(pm[n], pq[n], g, sb, S, Cg, eps)
    mean[n, g] = mu
    rstd[n, g] = r
    _set_forward_coefs(coef, n, g, Cg, mu, r, w, b)


@njit(inline="always")
def _fwd_cl_apply_task(t, x3, y3, sb, nb, coef, one, silu):
    n = t // nb
    s0 = (t - n * nb) * sb
    for s in range(s0, min(s0 + sb, x3.shape[1])):
        _apply_cl_row(x3[n, s], y3[n, s], coef[n, 0], coef[n, 1], coef[n, 2], one, silu)


@njit(parallel=True, cache=True)
def _fwd_cl(x3, w, b, eps, silu, one, block, y3, mean, rstd, coef):
    N, S, C = x3.shape
    G = mean.shape[1]
    sb, nb = _cl_blocking(S, C, block)
    pm = np.empty((N, nb, G))
    pq = np.empty((N, nb, G))
    scratch = np.empty((N * nb, 3, C), dtype=coef.dtype)  # x's compute dtype
    for t in prange(N * nb):
        _fwd_cl_stats_task(t, x3, sb, nb, C // G, pm, pq, scratch)
    for ng in prange(N * G):
        _fwd_cl_merge_task(ng, pm, pq, sb, S, C // G, eps, w, b, mean, rstd, coef)
    for t in prange(N * nb):
        _fwd_cl_apply_task(t, x3, y3, sb, nb, coef, one, silu)


@njit(cache=True)
def _fwd_cl_serial(x3, w, b, eps, silu, one, block, y3, mean, rstd, coef):
    """``_fwd_cl`` on the calling thread (small inputs)."""
    N, S, C = x3.shape
    G = mean.shape[1]
    sb, nb = _cl_blocking(S, C, block)
    pm = np.empty((N, nb, G))
    pq = np.empty((N, nb, G))
    scratch = np.empty((N * nb, 3, C), dtype=coef.dtype)  # x's compute dtype
    for t in range(N * nb):
        _fwd_cl_stats_task(t, x3, sb, nb, C // G, pm, pq, scratch)
    for ng in range(N * G):
        _fwd_cl_merge_task(ng, pm, pq, sb, S, C // G, eps, w, b, mean, rstd, coef)
    for t in range(N * nb):
        _fwd_cl_apply_task(t, x3, y3, sb, nb, coef, one, silu)


@njit(inline="always")
def _apply_cl_row(xr, yr, sc, sh, m, one, silu):
    if silu:
        for c in range(xr.shape[0]):
            v = (_load(xr, c) - m[c]) * sc[c] + sh[c]
            _store(yr, c, v / (one + np.exp(-v)))
    else:
        for c in range(xr.shape[0]):
            _store(yr, c, (_load(xr, c) - m[c]) * sc[c] + sh[c])


@njit(inline="always")
def _bwd_cl_coef_task(nc, mean, rstd, w, b, coef):
    C = coef.shape[2]
    n = nc // C
    c = nc - n * C
    g = c // (C // mean.shape[1])
    coef[n, 0, c], coef[n, 1, c] = _dz_coefs(rstd[n, g], w, b, c)
    coef[n, 2, c] = mean[n, g]


@njit(inline="always")
def _bwd_cl_sums_task(t, dy3, x3, sb, nb, silu, one, coef, p, dx3, park):
    """Per-channel partial sum(dz) and sum(dz*(x - mean)) of one block, into p[n, k].
    With ``park`` the silu gradient dz is also stored in dx3 for the dx pass (the dp add-on,
    which has no dx, passes park=False)."""
    n = t // nb
    k = t - n * nb
    s0 = k * sb
    a1 = p[n, k, 0]
    a2 = p[n, k, 1]
    a1[:] = 0.0
    a2[:] = 0.0
    za = coef[n, 0]
    zc = coef[n, 1]
    m = coef[n, 2]
    for s in range(s0, min(s0 + sb, x3.shape[1])):
        xr = x3[n, s]
        gr = dy3[n, s]
        dzr = dx3[n, s]
        for c in range(xr.shape[0]):
            d = _load(xr, c) - m[c]
            v = _load(gr, c)
            if silu:
                z = d * za[c] + zc[c]
                sg = one / (one + np.exp(-z))
                v = v * (sg * (one + z * (one - sg)))
                if park:
                    _store(dzr, c, v)
            a1[c] += v
            a2[c] += v * d


@njit(inline="always")
def _sum_block_partials(p, n, c):
    """(sum_k p[n, k, 0, c], sum_k p[n, k, 1, c]) in block order."""
    s1 = 0.0
    s2 = 0.0
    for k in range(p.shape[1]):
        s1 += p[n, k, 0, c]
        s2 += p[n, k, 1, c]
    return s1, s2


@njit(inline="always")
def _bwd_cl_reduce_task(ng, p, mean, rstd, w, M, db, dxh, coef):
    G = mean.shape[1]
    Cg = coef.shape[2] // G
    n = ng // G
    g = ng - n * G
    r = rstd[n, g]
    for c in range(g * Cg, (g + 1) * Cg):
        s1, s2 = _sum_block_partials(p, n, c)
        db[n, c] = s1
        dxh[n, c] = s2 * r
    _set_backward_coefs(coef, n, g, Cg, M, mean[n, g], r, w, db, dxh)


@njit(inline="always")
def _bwd_cl_dx_task(t, dy3, x3, sb, nb, silu, coef, dx3):
    n = t // nb
    s0 = (t - n * nb) * sb
    a = coef[n, 0]
    k1 = coef[n, 1]
    m = coef[n, 2]
    k0 = coef[n, 3]
    for s in range(s0, min(s0 + sb, x3.shape[1])):
        xr = x3[n, s]
        gr = dx3[n, s] if silu else dy3[n, s]
        dxr = dx3[n, s]
        for c in range(xr.shape[0]):
            _store(dxr, c, a[c] * _load(gr, c) + k1[c] * (_load(xr, c) - m[c]) + k0[c])


@njit(parallel=True, cache=True)
def _bwd_cl(dy3, x3, mean, rstd, w, b, silu, one, block, dx3, db, dxh, coef):
    N, S, C = x3.shape
    sb, nb = _cl_blocking(S, C, block)
    p = np.empty((N, nb, 2, C))
    for nc in prange(N * C):
        _bwd_cl_coef_task(nc, mean, rstd, w, b, coef)
    for t in prange(N * nb):
        _bwd_cl_sums_task(t, dy3, x3, sb, nb, silu, one, coef, p, dx3, True)
    for ng in prange(mean.size):
        _bwd_cl_reduce_task(ng, p, mean, rstd, w, C // mean.shape[1] * S, db, dxh, coef)
    for t in prange(N * nb):
        _bwd_cl_dx_task(t, dy3, x3, sb, nb, silu, coef, dx3)


@njit(cache=True)
def _bwd_cl_serial(dy3, x3, mean, rstd, w, b, silu, one, block, dx3, db, dxh, coef):
    """``_bwd_cl`` on the calling thread (small inputs)."""
    N, S, C = x3.shape
    sb, nb = _cl_blocking(S, C, block)
    p = np.empty((N, nb, 2, C))
    for nc in range(N * C):
        _bwd_cl_coef_task(nc, mean, rstd, w, b, coef)
    for t in range(N * nb):
        _bwd_cl_sums_task(t, dy3, x3, sb, nb, silu, one, coef, p, dx3, True)
    for ng in range(mean.size):
        _bwd_cl_reduce_task(ng, p, mean, rstd, w, C // mean.shape[1] * S, db, dxh, coef)
    for t in range(N * nb):
        _bwd_cl_dx_task(t, dy3, x3, sb, nb, silu, coef, dx3)


@njit(cache=True)
def _reduce_params(dxh, db, dw_out, db_out):
    """dgamma[c] = sum_n dxh[n, c], dbeta[c] = sum_n db[n, c], in order of n. Serial: N*C
    numbers, less work than waking the thread pool."""
    N, C = db.shape
    for c in range(C):
        s1 = 0.0
        s2 = 0.0
        for n in range(N):
            s1 += dxh[n, c]
            s2 += db[n, c]
        dw_out[c] = s1
        db_out[c] = s2


# --------------------------------------------------------------------------- host side


# GNU OpenMP (Numba's "omp" layer, picked when TBB is absent) cannot run in a child forked
# after the parent used it: the child is terminated ("fork() called from a process already
# using GNU OpenMP"). torch DataLoader workers are such children, so there every call takes
# the serial kernels, which give the same bits.
_PARALLEL_SAFE = True
_PARENT_USED_OMP = False


def _before_fork():
    global _PARENT_USED_OMP
    try:
        _PARENT_USED_OMP = numba.threading_layer() == "omp"
    except ValueError:  # no parallel region has run yet: nothing to inherit
        _PARENT_USED_OMP = False


def _after_fork_in_child():
    global _PARALLEL_SAFE
    _PARALLEL_SAFE = _PARALLEL_SAFE and not _PARENT_USED_OMP


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def run_serially(x_size: int) -> bool:
    """Small inputs (below torch's grain size, 32768 elements: waking the pool costs more than
    the work, and a busy core would stall the call) and forked children of OpenMP users."""
    return x_size < config.CPU_SERIAL_MAX_ELEMENTS or not _PARALLEL_SAFE


def choose_path(x_size: int, num_groups_total: int, group_bytes: int) -> str:
    """NCHW path: "serial" (see ``run_serially``), "fused" when every thread gets several
    whole groups that fit in L2, else "split". All three give bit-identical results."""
    if run_serially(x_size):
        return "serial"  # decided first: numba.get_num_threads() costs ~1.4 us
    if (num_groups_total >= config.CPU_FUSED_MIN_TASKS_PER_THREAD * numba.get_num_threads()
            and group_bytes <= config.CPU_FUSED_MAX_BYTES):
        return "fused"
    return "split"


_FWD = {"serial": _fwd_nchw_serial, "fused": _fwd_nchw_fused, "split": _fwd_nchw_split}
_BWD = {"serial": _bwd_nchw_serial, "fused": _bwd_nchw_fused, "split": _bwd_nchw_split}


def forward(x3, num_groups, weight, bias, eps, silu, y3, channels_last, path=None):
    """Run the forward kernel on 3-D views: (N, C, S) for NCHW or (N, S, C) for channels-last.
    ``weight``/``bias``: contiguous (C,) arrays in x's compute dtype (``compute_dtype``;
    coefficients are formed in float64 from them, so no float64 copy is needed).

    ``weight``/``bias`` are float64 arrays of shape (C,). Returns float64 (mean, rstd) of
    shape (N, G). ``path`` ("serial"/"fused"/"split") forces an NCHW path.
    """
    if channels_last:
        N, S, C = x3.shape
    else:
        N, C, S = x3.shape
    G = num_groups
    mean = np.empty((N, G))
    rstd = np.empty((N, G))
    cdt = compute_dtype(x3.dtype)
    coef = np.empty((N, 3, C), dtype=cdt)
    one = cdt.type(1)
    if channels_last:
        kernel = _fwd_cl_serial if run_serially(x3.size) else _fwd_cl
        kernel(x3, weight, bias, eps, silu, one, config.CPU_CL_BLOCK, y3, mean, rstd, coef)
        return mean, rstd
    D = (C // G) * S
    x2 = x3.reshape(N * G, D)
    if path is None:
        path = choose_path(x3.size, N * G, D * x3.itemsize)
    _FWD[path](x2, x3, weight, bias, eps, silu, one, config.CPU_CHUNK, y3, mean, rstd, coef)
    return mean, rstd


def backward(dy3, x3, mean, rstd, weight, bias, silu, dx3, channels_last, path=None):
    """Backward on 3-D views. ``mean``/``rstd`` are float64 (N, G). Returns float64
    per-sample (dgamma, dbeta) of shape (N, C); dx is written into ``dx3``."""
    if channels_last:
        N, S, C = x3.shape
    else:
        N, C, S = x3.shape
    G = mean.shape[1]
    db = np.empty((N, C))
    dxh = np.empty((N, C))
    cdt = compute_dtype(x3.dtype)
    coef = np.empty((N, 4, C), dtype=cdt)
    one = cdt.type(1)
    if channels_last:
        kernel = _bwd_cl_serial if run_serially(x3.size) else _bwd_cl
        kernel(dy3, x3, mean, rstd, weight, bias, silu, one, config.CPU_CL_BLOCK, dx3, db,
                dxh, coef)
        return dxh, db
    if path is None:
        path = choose_path(x3.size, N * G, 2 * (C // G) * S * x3.itemsize)
    _BWD[path](dy3, x3, mean, rstd, weight, bias, silu, one, config.CPU_CHUNK, dx3, db, dxh, coef)
    return dxh, db


def reduce_params(dxh, db):
    C = db.shape[1]
    dw = np.empty(C)
    dbias = np.empty(C)
    _reduce_params(dxh, db, dw, dbias)
    return dw, dbias


# --------------------------------------------------------------------------- outputs


_DEFAULT_PARAMS: dict = {}


def default_param(C: int, dtype, value: float) -> np.ndarray:
    """The (C,) constant that stands for a missing weight (1) or bias (0); cached, never
    written by the kernels."""
    key = (C, np.dtype(dtype), value)
    a = _DEFAULT_PARAMS.get(key)
    if a is None:
        a = _DEFAULT_PARAMS[key] = np.full(C, value, dtype=dtype)
    return a


def empty(shape, dtype) -> np.ndarray:
    """``np.empty`` whose pages are already mapped, for kernel outputs.

    A fresh large array is mapped lazily, page by page, on first write. When the threads of a
    parallel kernel take those page faults together, they sometimes collapse on this kind of
    VM: at (8, 256, 64, 64) backward measured 4.5 ms at the median but 24-56 ms at the
    75th-90th percentile, and in ``gnnumba bench`` the allocating forward swung by +-118%.
    Touching one element per page first, on the calling thread (as ``np.empty`` followed by
    a copy does), costs about 1 ms per 32 MiB and made the same runs stable (+-4%). Arrays
    under 4 MiB come from the allocator's already mapped heap and are left alone."""
    a = np.empty(shape, dtype)
    if a.nbytes >= config.CPU_PREFAULT_MIN_BYTES:
        a.reshape(-1)[:: max(1, 4096 // a.itemsize)] = 0
    return a
