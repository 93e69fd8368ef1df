"""GroupNorm kernels for channels-last input: memory order (N, S, C), S = all spatial dims.

A sample is cut into blocks of whole spatial positions (about ``config.CPU_CL_BLOCK``
elements); per-channel accumulators run vectorised along C, and the per-block partials are
merged in block order, so the result does not depend on the thread count. Each kernel is a few
passes over tasks; a task body is an inline helper so that the parallel kernel (prange) and
the serial one for small inputs (range) share it and give the same bits.

Coefficient rows as in ``stats`` (``coef[n, row, c]``).
"""

from __future__ import annotations

import numpy as np
from numba import carray, njit, prange

from .activation import NONE, derivative, forward
from .compile import kernel
from .stats import merge, rstd_of, set_coefs, set_dx_coefs
from .storage import FOLD_LANES as LANES
from .storage import (add_channel_sums, add_lane_deviations, apply_channels, cast, dx_channels,
                      holds_compute_dtype, load, stack_zeros, store)


@njit(inline="always")
def blocking(S, C, block):
    """(positions per block, blocks per sample)."""
    sb = max(1, block // max(C, 1))
    return sb, (S + sb - 1) // sb


# --------------------------------------------------------------------------- statistics


# Positions summed into the per-channel accumulators in x's dtype before they are added into
# float64 ones: bounds the float32 rounding error of a block sum to FLUSH additions (a float32
# sum over all 4096 positions of a block gave wrong, even negative, variances for offsets
# near 1e4).
FLUSH = 128


@njit(inline="always")
def _flush(acc, s64, c0):
    """s64[c0 + l] += acc[l] for the lanes of one channel tile (float64 accumulators)."""
    for j in range(min(LANES, s64.shape[0] - c0)):
        s64[c0 + j] += acc[j]


@njit(inline="always")
def _tile_pass(xb, m, c0, s64, q64, squares):
    """Per-channel sums of d = x - m[c] (and of d*d when ``squares``) over the block's
    positions for channels c0 .. c0 + LANES - 1, into s64/q64: LANES float accumulators in
    vector registers, flushed into float64 every FLUSH positions."""
    P = xb.shape[0]
    cnt = xb.shape[1] - c0
    z = cast(m, 0)
    for f in range(0, P, FLUSH):
        acc = carray(stack_zeros(LANES, z), (LANES,))
        acc2 = carray(stack_zeros(LANES, z), (LANES,))
        for s in range(f, min(f + FLUSH, P)):
            add_lane_deviations(acc, acc2, xb[s], c0, m, c0, cnt)
        _flush(acc, s64, c0)
        if squares:
            _flush(acc2, q64, c0)


@njit(inline="always")
def _block_stats(xb, Cg, pm, pq, sc, sc64):
    """Per-group (mean, M2) of one block (positions, C) into pm[g], pq[g]: the shifted,
    corrected two-pass algorithm of ``stats.chunk_stats`` with per-channel accumulators
    (the block stays in L2 between passes), a tile of LANES channels at a time with its
    accumulators in registers (``_tile_pass``). The shift is the group's first element in
    the block, so a constant group sums exact zeros and gets variance 0. Each channel's sums
    run over the positions in order whatever the tiling. ``sc``: (4, C) scratch in x's
    compute dtype, ``sc64``: (2, C) float64 scratch."""
    P, C = xb.shape
    G = C // Cg
    mc, kc = sc[2], sc[3]
    s64, q64 = sc64[0], sc64[1]
    x0 = xb[0]
    for c in range(C):
        kc[c] = load(x0, c - c % Cg)
    s64[:] = 0.0
    q64[:] = 0.0
    for c0 in range(0, C, LANES):
        _tile_pass(xb, kc, c0, s64, q64, False)
    for g in range(G):
        mc[g * Cg:(g + 1) * Cg] = kc[g * Cg] + s64[g * Cg:(g + 1) * Cg].sum() / (P * Cg)
    s64[:] = 0.0
    for c0 in range(0, C, LANES):
        _tile_pass(xb, mc, c0, s64, q64, True)
    n = P * Cg
    for g in range(G):
        d1 = s64[g * Cg:(g + 1) * Cg].sum()
        pm[g] = mc[g * Cg] + d1 / n
        m2 = q64[g * Cg:(g + 1) * Cg].sum() - d1 * d1 / n
        pq[g] = 0.0 if m2 < 0 else m2  # rounding can make it slightly negative; NaN stays


@njit(inline="always")
def _stats_task(t, x3, sb, nb, Cg, pm, pq, scratch, scratch64):
    n = t // nb
    k = t - n * nb
    s0 = k * sb
    # this task's own scratch rows: no allocation inside the parallel loop
    _block_stats(x3[n, s0:min(s0 + sb, x3.shape[1])], Cg, pm[n, k], pq[n, k], scratch[t],
                 scratch64[t])


@njit(inline="always")
def _merge_group(pm, pq, n, g, sb, S, Cg, eps):
    """(mean, rstd) of group g of sample n from its per-block partials, in block order."""
    cnt = 0
    mu = 0.0
    m2 = 0.0
    for k in range(pm.shape[1]):
        s0 = k * sb
        cnt, mu, m2 = merge(cnt, mu, m2, (min(s0 + sb, S) - s0) * Cg, pm[n, k, g], pq[n, k, g])
    return mu, rstd_of(m2, S * Cg, eps)


# --------------------------------------------------------------------------- forward


@njit(inline="always")
def _merge_task(ng, pm, pq, sb, S, Cg, eps, w, b, mean, rstd, coef):
    """(mean, rstd) and coefficients of group ng. A parallel region of its own: folding the
    merges into the apply tasks repeats G*nb merges (each with a division) in every task,
    measured 0.70x at (2, 320, 64, 64) on one thread."""
    G = mean.shape[1]
    n = ng // G
    g = ng - n * G
    mu, r = _merge_group(pm, pq, n, g, sb, S, Cg, eps)
    mean[n, g] = mu
    rstd[n, g] = r
    set_coefs(coef, n, g, Cg, mu, r, w, b)


@njit(inline="always")
def _apply_task(t, x3, y3, sb, nb, coef, one, act):
    n = t // nb
    s0 = (t - n * nb) * sb
    sc = coef[n, 0]
    sh = coef[n, 1]
    m = coef[n, 2]
    C = x3.shape[2]
    if act == NONE or holds_compute_dtype(y3):
        # vector IR (the loop below stays scalar: ``storage.apply_channels``); an activation
        # then runs over the stored pre-activations, exact in y's dtype, in a loop LLVM
        # vectorises (one array)
        for s in range(s0, min(s0 + sb, x3.shape[1])):
            yr = y3[n, s]
            for c0 in range(0, C, LANES):
                apply_channels(yr, x3[n, s], c0, m, sc, sh, C - c0)
            if act != NONE:
                for c in range(C):
                    yr[c] = forward(act, yr[c], one)
        return
    for s in range(s0, min(s0 + sb, x3.shape[1])):
        xr = x3[n, s]
        yr = y3[n, s]
        for c in range(xr.shape[0]):
            store(yr, c, forward(act, (load(xr, c) - m[c]) * sc[c] + sh[c], one))


@kernel(parallel=True)
def fwd(x3, w, b, eps, act, one, block, y3, mean, rstd, coef):
    N, S, C = x3.shape
    G = mean.shape[1]
    sb, nb = blocking(S, C, block)
    pm = np.empty((N, nb, G))
    pq = np.empty((N, nb, G))
    scratch = np.empty((N * nb, 4, C), dtype=coef.dtype)  # x's compute dtype
    scratch64 = np.empty((N * nb, 2, C))
    for t in prange(N * nb):
        _stats_task(t, x3, sb, nb, C // G, pm, pq, scratch, scratch64)
    for ng in prange(N * G):
        _merge_task(ng, pm, pq, sb, S, C // G, eps, w, b, mean, rstd, coef)
    for t in prange(N * nb):
        _apply_task(t, x3, y3, sb, nb, coef, one, act)


@kernel(parallel=True)
def fwd_fused(x3, w, b, eps, act, one, block, y3, mean, rstd, coef):
    """``fwd`` with one task per sample (its blocks' statistics, its groups' merges, then its
    apply) in one parallel region instead of three: the same task bodies, the same bits.
    For batches that split evenly over the threads (``choose_path``)."""
    N, S, C = x3.shape
    G = mean.shape[1]
    sb, nb = blocking(S, C, block)
    pm = np.empty((N, nb, G))
    pq = np.empty((N, nb, G))
    scratch = np.empty((N * nb, 4, C), dtype=coef.dtype)
    scratch64 = np.empty((N * nb, 2, C))
    for n in prange(N):
        for t in range(n * nb, (n + 1) * nb):
            _stats_task(t, x3, sb, nb, C // G, pm, pq, scratch, scratch64)
        for ng in range(n * G, (n + 1) * G):
            _merge_task(ng, pm, pq, sb, S, C // G, eps, w, b, mean, rstd, coef)
        for t in range(n * nb, (n + 1) * nb):
            _apply_task(t, x3, y3, sb, nb, coef, one, act)


@kernel()
def fwd_serial(x3, w, b, eps, act, one, block, y3, mean, rstd, coef):
    """``fwd`` on the calling thread (small inputs)."""
    N, S, C = x3.shape
    G = mean.shape[1]
    sb, nb = blocking(S, C, block)
    pm = np.empty((N, nb, G))
    pq = np.empty((N, nb, G))
    scratch = np.empty((N * nb, 4, C), dtype=coef.dtype)
    scratch64 = np.empty((N * nb, 2, C))
    for t in range(N * nb):
        _stats_task(t, x3, sb, nb, C // G, pm, pq, scratch, scratch64)
    for ng in range(N * G):
        _merge_task(ng, pm, pq, sb, S, C // G, eps, w, b, mean, rstd, coef)
    for t in range(N * nb):
        _apply_task(t, x3, y3, sb, nb, coef, one, act)


# --------------------------------------------------------------------------- gradient sums


@njit(inline="always")
def _sums_task(t, dy3, x3, sb, nb, one, act, mean, rstd, w, b, cs, p):
    """Per-channel partial sum(dz) and sum(dz*(x - mean)) of one block, into p[n, k],
    dz = dy * act'(z) (not stored), each channel's positions added in order in float64.
    Without an activation a tile of LANES channels at a time, its accumulators in vector
    registers (``storage.add_channel_sums``; the same bits). The task forms its sample's
    coefficients itself in its (1, 3, C) rows ``cs`` (C values: less than a parallel region
    of their own costs)."""
    n = t // nb
    k = t - n * nb
    G = mean.shape[1]
    C = cs.shape[2]
    Cg = C // G
    for g in range(G):
        set_coefs(cs, 0, g, Cg, mean[n, g], rstd[n, g], w, b)
    s0 = k * sb
    s1 = min(s0 + sb, x3.shape[1])
    a1 = p[n, k, 0]
    a2 = p[n, k, 1]
    za = cs[0, 0]
    zc = cs[0, 1]
    m = cs[0, 2]
    if act == NONE:
        for c0 in range(0, C, LANES):
            acc1 = carray(stack_zeros(LANES, 0.0), (LANES,))
            acc2 = carray(stack_zeros(LANES, 0.0), (LANES,))
            for s in range(s0, s1):
                add_channel_sums(acc1, acc2, dy3[n, s], x3[n, s], c0, m, c0, C - c0)
            for j in range(min(LANES, C - c0)):
                a1[c0 + j] = acc1[j]
                a2[c0 + j] = acc2[j]
        return
    a1[:] = 0.0
    a2[:] = 0.0
    for s in range(s0, s1):
        xr = x3[n, s]
        gr = dy3[n, s]
        for c in range(xr.shape[0]):
            d = load(xr, c) - m[c]
            v = load(gr, c) * derivative(act, d * za[c] + zc[c], one)
            a1[c] += v
            a2[c] += v * d


@njit(inline="always")
def _reduce_task(ng, p, rstd, dweight_ps, dbias_ps):
    """Group ng's per-sample sums: block partials added in block order."""
    G = rstd.shape[1]
    C = dbias_ps.shape[1]
    Cg = C // G
    n = ng // G
    g = ng - n * G
    r = rstd[n, g]
    for c in range(g * Cg, (g + 1) * Cg):
        s1 = 0.0
        s2 = 0.0
        for k in range(p.shape[1]):
            s1 += p[n, k, 0, c]
            s2 += p[n, k, 1, c]
        dbias_ps[n, c] = s1
        dweight_ps[n, c] = s2 * r


@kernel(parallel=True)
def sums(dy3, x3, mean, rstd, w, b, act, one, block, dweight_ps, dbias_ps, coef):
    N, S, C = x3.shape
    sb, nb = blocking(S, C, block)
    p = np.empty((N, nb, 2, C))
    cs = np.empty((N * nb, 1, 3, C), dtype=coef.dtype)
    for t in prange(N * nb):
        _sums_task(t, dy3, x3, sb, nb, one, act, mean, rstd, w, b, cs[t], p)
    for ng in prange(mean.size):
        _reduce_task(ng, p, rstd, dweight_ps, dbias_ps)


@njit(inline="always")
def _sample_sums(n, dy3, x3, sb, nb, one, act, mean, rstd, w, b, cs, p, dweight_ps, dbias_ps):
    """Sample n's block sums, then its groups' per-sample gradients: the fused paths' task."""
    G = mean.shape[1]
    for t in range(n * nb, (n + 1) * nb):
        _sums_task(t, dy3, x3, sb, nb, one, act, mean, rstd, w, b, cs[t], p)
    for ng in range(n * G, (n + 1) * G):
        _reduce_task(ng, p, rstd, dweight_ps, dbias_ps)


@kernel(parallel=True)
def sums_fused(dy3, x3, mean, rstd, w, b, act, one, block, dweight_ps, dbias_ps, coef):
    """``sums`` with one task per sample in one parallel region (same bits)."""
    N, S, C = x3.shape
    sb, nb = blocking(S, C, block)
    p = np.empty((N, nb, 2, C))
    cs = np.empty((N * nb, 1, 3, C), dtype=coef.dtype)
    for n in prange(N):
        _sample_sums(n, dy3, x3, sb, nb, one, act, mean, rstd, w, b, cs, p, dweight_ps,
                     dbias_ps)


@kernel()
def sums_serial(dy3, x3, mean, rstd, w, b, act, one, block, dweight_ps, dbias_ps, coef):
    N, S, C = x3.shape
    sb, nb = blocking(S, C, block)
    p = np.empty((N, nb, 2, C))
    cs = np.empty((N * nb, 1, 3, C), dtype=coef.dtype)
    for t in range(N * nb):
        _sums_task(t, dy3, x3, sb, nb, one, act, mean, rstd, w, b, cs[t], p)
    for ng in range(mean.size):
        _reduce_task(ng, p, rstd, dweight_ps, dbias_ps)


# --------------------------------------------------------------------------- backward


@njit(inline="always")
def _dx_coef_task(ng, mean, rstd, w, b, S, dweight_ps, dbias_ps, coef):
    """All five coefficient rows of group ng for the dx pass (rows 0-2 as the sums tasks
    formed them)."""
    G = rstd.shape[1]
    Cg = coef.shape[2] // G
    n = ng // G
    g = ng - n * G
    set_coefs(coef, n, g, Cg, mean[n, g], rstd[n, g], w, b)
    set_dx_coefs(coef, n, g, Cg, Cg * S, rstd[n, g], w, dweight_ps, dbias_ps)


@njit(inline="always")
def _dx_task(t, dy3, x3, sb, nb, one, act, coef, dx3):
    """dx = scale*dz + k1*(x - mean) + k0 over one block, dz recomputed."""
    n = t // nb
    s0 = (t - n * nb) * sb
    a = coef[n, 0]
    zc = coef[n, 1]
    m = coef[n, 2]
    k1 = coef[n, 3]
    k0 = coef[n, 4]
    C = x3.shape[2]
    if act == NONE:  # vector IR: the loop below stays scalar (``storage.dx_channels``)
        for s in range(s0, min(s0 + sb, x3.shape[1])):
            for c0 in range(0, C, LANES):
                dx_channels(dx3[n, s], dy3[n, s], x3[n, s], c0, a, m, k1, k0, C - c0)
        return
    for s in range(s0, min(s0 + sb, x3.shape[1])):
        xr = x3[n, s]
        gr = dy3[n, s]
        dxr = dx3[n, s]
        for c in range(xr.shape[0]):
            d = load(xr, c) - m[c]
            v = load(gr, c)
            if act != NONE:
                v = v * derivative(act, d * a[c] + zc[c], one)
            store(dxr, c, a[c] * v + k1[c] * d + k0[c])


@kernel(parallel=True)
def bwd(dy3, x3, mean, rstd, w, b, act, one, block, dx3, dweight_ps, dbias_ps, coef):
    N, S, C = x3.shape
    sb, nb = blocking(S, C, block)
    p = np.empty((N, nb, 2, C))
    cs = np.empty((N * nb, 1, 3, C), dtype=coef.dtype)
    for t in prange(N * nb):
        _sums_task(t, dy3, x3, sb, nb, one, act, mean, rstd, w, b, cs[t], p)
    for ng in prange(mean.size):
        _reduce_task(ng, p, rstd, dweight_ps, dbias_ps)
        _dx_coef_task(ng, mean, rstd, w, b, S, dweight_ps, dbias_ps, coef)
    for t in prange(N * nb):
        _dx_task(t, dy3, x3, sb, nb, one, act, coef, dx3)


@kernel(parallel=True)
def bwd_fused(dy3, x3, mean, rstd, w, b, act, one, block, dx3, dweight_ps, dbias_ps, coef):
    """``bwd`` with one task per sample in one parallel region (same bits)."""
    N, S, C = x3.shape
    G = mean.shape[1]
    sb, nb = blocking(S, C, block)
    p = np.empty((N, nb, 2, C))
    cs = np.empty((N * nb, 1, 3, C), dtype=coef.dtype)
    for n in prange(N):
        _sample_sums(n, dy3, x3, sb, nb, one, act, mean, rstd, w, b, cs, p, dweight_ps,
                     dbias_ps)
        for ng in range(n * G, (n + 1) * G):
            _dx_coef_task(ng, mean, rstd, w, b, S, dweight_ps, dbias_ps, coef)
        for t in range(n * nb, (n + 1) * nb):
            _dx_task(t, dy3, x3, sb, nb, one, act, coef, dx3)


@kernel()
def bwd_serial(dy3, x3, mean, rstd, w, b, act, one, block, dx3, dweight_ps, dbias_ps, coef):
    """``bwd`` on the calling thread (small inputs)."""
    N, S, C = x3.shape
    sb, nb = blocking(S, C, block)
    p = np.empty((N, nb, 2, C))
    cs = np.empty((N * nb, 1, 3, C), dtype=coef.dtype)
    for t in range(N * nb):
        _sums_task(t, dy3, x3, sb, nb, one, act, mean, rstd, w, b, cs[t], p)
    for ng in range(mean.size):
        _reduce_task(ng, p, rstd, dweight_ps, dbias_ps)
        _dx_coef_task(ng, mean, rstd, w, b, S, dweight_ps, dbias_ps, coef)
    for t in range(N * nb):
        _dx_task(t, dy3, x3, sb, nb, one, act, coef, dx3)
