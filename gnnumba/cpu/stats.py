"""Group statistics and gradient sums, the reductions every CPU kernel shares.

Statistics: each chunk gets the corrected two-pass algorithm while it is in cache (mean, then
deviations and their sum, which removes the rounding error of the mean), summed in x's dtype;
chunks are merged in float64 with Chan's parallel formula, always in chunk order. Never
E[x^2] - E[x]^2.

Gradient sums: per channel, sum(dz) and sum(dz * (x - mean)) with dz = dy * act'(z); these are
the per-sample parameter gradients (``dbias_per_sample`` and ``dweight_per_sample / rstd``),
and the backward's dx needs exactly them, so both are computed by the same code.
"""

from __future__ import annotations

import numpy as np
from numba import carray, njit

from .activation import NONE, derivative
from .compile import kernel
from .storage import (FOLD_LANES, add_lane_sums, cast, fold_lanes, load, prefetch,
                      stack_zeros)

# Strict IEEE arithmetic everywhere (no fast-math flags): a result then depends only on the
# source, never on how LLVM chose to vectorise a loop in one compilation. (Separately compiled
# fast-math reduction helpers gave different bits after a fresh compile and after a load from
# Numba's on-disk cache.) Reductions are vectorised by hand instead: LANES independent
# accumulators in a stack array, lane j summing elements j, j + LANES, ..., then the lanes
# added in a fixed tree. LANES = 64 float32 accumulators are four AVX-512 registers; a 4096
# element float32 sum runs at 0.017 ns/element (fast-math: 0.012, one accumulator: 0.69).
LANES = FOLD_LANES  # the lanes are added up by storage.fold_lanes


@njit(inline="always")
def chunk_stats(a):
    """(mean, M2) of an L1-sized chunk, in float64: the shifted, corrected two-pass algorithm.

    Pass 1 sums x - k in x's dtype around the chunk's first element k (float32 lanes: twice
    the SIMD width of float64, and the chunk is short); a constant chunk then sums exact zeros
    and its mean is k exactly, and near-constant data keep their digits. Pass 2 sums
    d = x - m and d*d around that rounded mean m; the sum of d then removes m's rounding error
    to first order (Chan, Golub & LeVeque, 1983): mean = m + sum(d)/n, M2 = sum(d*d) -
    sum(d)**2/n, clamped at 0 (rounding can make it slightly negative; NaN stays NaN).
    Chunks are merged in float64."""
    n = a.shape[0]
    nl = n - n % LANES
    z = cast(a, 0)
    k = load(a, 0)
    acc = carray(stack_zeros(LANES, z), (LANES,))
    for i in range(0, nl, LANES):
        b = a[i:i + LANES]
        for j in range(LANES):
            acc[j] += load(b, j) - k
    s = fold_lanes(acc)
    for i in range(nl, n):
        s += load(a, i) - k
    m = cast(a, k + s / n)
    acc = carray(stack_zeros(LANES, z), (LANES,))
    acc2 = carray(stack_zeros(LANES, z), (LANES,))
    for i in range(0, nl, LANES):
        b = a[i:i + LANES]
        for j in range(LANES):
            d = load(b, j) - m
            acc[j] += d
            acc2[j] += d * d
    d1 = fold_lanes(acc)
    q = fold_lanes(acc2)
    for i in range(nl, n):
        d = load(a, i) - m
        d1 += d
        q += d * d
    m2 = q - d1 * d1 / n
    return m + d1 / n, 0.0 if m2 < 0 else m2


@njit(inline="always")
def merge(n_a, m_a, q_a, n_b, m_b, q_b):
    """Chan et al.'s merge of (count, mean, M2) partials; exact order-dependent, so callers
    always merge in a fixed order."""
    n = n_a + n_b
    if n_b == 0:
        return n_a, m_a, q_a
    d = m_b - m_a
    f = n_b / n
    return n, m_a + d * f, q_a + q_b + d * d * n_a * f


@njit(inline="always")
def rstd_of(m2, count, eps):
    """1/sqrt(var + eps); with eps = 0 and a constant group this is inf, as in torch (the
    kernels use error_model="numpy": no ZeroDivisionError)."""
    if count == 0:
        return 1.0 / np.sqrt(eps)
    return 1.0 / np.sqrt(m2 / count + eps)


@njit(inline="always")
def group_stats(xg, chunk, eps):
    """(mean, rstd) of one contiguous group: chunk statistics merged in chunk order (the
    split path does the same merges in the same order)."""
    cnt = 0
    mu = 0.0
    m2 = 0.0
    for lo in range(0, xg.shape[0], chunk):
        m, q = chunk_stats(xg[lo:lo + chunk])
        cnt, mu, m2 = merge(cnt, mu, m2, min(chunk, xg.shape[0] - lo), m, q)
    return mu, rstd_of(m2, xg.shape[0], eps)


@njit(inline="always")
def prefetch_rows(a2):
    """Request every cache line of a 2-D C-contiguous block of rows (``storage.prefetch``)
    before a pass whose short rows are masked loads: from each row's start, one request per
    64 bytes and one for its last element (rows need not start on a line)."""
    line = max(1, 64 // a2.itemsize)
    for r in range(a2.shape[0]):
        row = a2[r]
        for i in range(0, row.shape[0], line):
            prefetch(row, i)
        if row.shape[0]:
            prefetch(row, row.shape[0] - 1)


@njit(inline="always")
def row_sums(dyr, xr, m, a, c0, one, act, chunk):
    """float64 sum(dz) and sum(dz * (x - m)) over a row, dz = dy * act'(z) with the
    pre-activation z = (x - m)*a + c0 recomputed as the forward formed it. Each ``chunk``
    of the row is summed in x's dtype and the chunk sums are added in float64, in order, so
    summing a row here or its chunks one by one (the split path) gives the same bits.

    Without an activation a chunk runs in LANES lanes, its last partial block masked
    (a 7x7 row, 49 elements, is one masked block and one fold); with one, the scalar act'
    (exp, erf: no vector math library here) costs ~2 ns per element whatever the summation,
    so a plain loop keeps the compile time down (a lane loop per activation tripled it).
    The chunk loop lives here, not in the callers: a chunk loop around this call, or the
    coefficient stores of ``set_coefs`` in the same loop nest, made LLVM's code for it 3x
    slower (R50 b8 C2048 7x7 gradient sums, one thread)."""
    n = xr.shape[0]
    z = cast(xr, 0)
    s1 = 0.0
    s2 = 0.0
    if act != NONE:
        for lo in range(0, n, chunk):
            t1 = z
            t2 = z
            for i in range(lo, min(lo + chunk, n)):
                d = load(xr, i) - m
                v = load(dyr, i) * derivative(act, d * a + c0, one)
                t1 += v
                t2 += v * d
            s1 += t1
            s2 += t2
        return s1, s2
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        acc1 = carray(stack_zeros(LANES, z), (LANES,))
        acc2 = carray(stack_zeros(LANES, z), (LANES,))
        for i in range(lo, hi, LANES):
            add_lane_sums(acc1, acc2, dyr, xr, i, m, hi - i)
        s1 += fold_lanes(acc1)
        s2 += fold_lanes(acc2)
    return s1, s2


@kernel()
def reduce_params(dweight_per_sample, dbias_per_sample, dweight, dbias):
    """dweight[c] = sum_n dweight_per_sample[n, c] (and dbias alike), in order of n, in
    float64, rounded once on the store when the outputs are float32. Serial: N*C numbers,
    less work than waking the thread pool."""
    N, C = dbias_per_sample.shape
    for c in range(C):
        s1 = 0.0
        s2 = 0.0
        for n in range(N):
            s1 += dweight_per_sample[n, c]
            s2 += dbias_per_sample[n, c]
        dweight[c] = s1
        dbias[c] = s2


# --------------------------------------------------------------------------- coefficients
# coef[n, row, c], in x's compute dtype so the element loops run in that precision:
# 0 scale = rstd*weight, 1 shift = bias, 2 mean (z = (x - mean)*scale + shift is the
# pre-activation), and for the backward 3 k1, 4 k0 with dx = scale*dz + k1*(x - mean) + k0.


@njit(inline="always")
def set_coefs(coef, n, g, Cg, mean, rstd, w, b):
    """Rows 0-2 of group g: z = (x - mean) * scale + shift is the pre-activation."""
    for c in range(g * Cg, (g + 1) * Cg):
        coef[n, 0, c] = rstd * w[c]
        coef[n, 1, c] = b[c]
        coef[n, 2, c] = mean


@njit(inline="always")
def dx_coefs(n, g, Cg, M, rstd, w, dweight_ps, dbias_ps):
    """(k1, k0) of group g in float64: dx = scale*dz + k1*(x - mean) + k0."""
    A = 0.0
    B = 0.0
    for c in range(g * Cg, (g + 1) * Cg):
        A += w[c] * dbias_ps[n, c]
        B += w[c] * dweight_ps[n, c]
    k1 = -rstd * rstd * B / M if M > 0 else 0.0
    k0 = -rstd * A / M if M > 0 else 0.0
    return k1, k0


@njit(inline="always")
def set_dx_coefs(coef, n, g, Cg, M, rstd, w, dweight_ps, dbias_ps):
    """Rows 3-4 of group g: dx = scale*dz + k1*(x - mean) + k0, from the group's sums."""
    k1, k0 = dx_coefs(n, g, Cg, M, rstd, w, dweight_ps, dbias_ps)
    for c in range(g * Cg, (g + 1) * Cg):
        coef[n, 3, c] = k1
        coef[n, 4, c] = k0
