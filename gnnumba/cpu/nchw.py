"""GroupNorm kernels for C-contiguous (N, C, S) input, where a group (n, g) is one contiguous
run of D = C/G * S elements.

Three paths, bit-identical (the same arithmetic in the same order):
  - "serial": inputs under ``config.CPU_SERIAL_MAX_ELEMENTS``, on the calling thread.
  - "fused": one task per group; the group's statistics (or gradient sums) are computed chunk
    by chunk and the group is normalised (or its dx written) right away while it is still in
    L2 (one DRAM read, one write).
  - "split": when there are too few groups to keep every thread busy, or a group is larger than
    L2, the chunks of all groups are spread over the threads, merged per group in chunk order,
    then applied.

Coefficient rows (``coef[n, row, c]``, in x's compute dtype, so the element loops run in that
precision): 0 scale = rstd*weight, 1 shift = bias, 2 mean (forward and backward), then for the
backward 3 k1 and 4 k0 with dx = scale*dz + k1*(x - mean) + k0. The folded form
x*scale + (shift - mean*scale) loses digits when |mean| * rstd is large (a near-constant group
with an offset), so the subtraction stays.

Inner loops always run over a slice from index 0 (``a = row[lo:hi]; for i in
range(a.shape[0])``): with ``range(lo, hi)`` Numba's negative-index wraparound check stops LLVM
from vectorising, measured 4x slower (1.7 vs 7.3 Gelem/s for a float64 sum of float32).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .activation import NONE, derivative, forward
from .compile import kernel
from .stats import (chunk_stats, dx_coefs, group_stats, merge, prefetch_rows, row_sums,
                    rstd_of, set_coefs, set_dx_coefs)
from .storage import FOLD_LANES as LANES
from .storage import cast, dx_lanes, load, store

# --------------------------------------------------------------------------- forward


@njit(inline="always")
def _apply_row(xr, yr, sc, sh, m, one, act):
    for s in range(xr.shape[0]):
        store(yr, s, forward(act, (load(xr, s) - m) * sc + sh, one))


@njit(inline="always")
def _fwd_group(t, x2, x3, w, b, eps, act, one, chunk, y3, mean, rstd, coef):
    """Fused forward of group t = n*G + g: statistics, then normalise while it is in L2."""
    G = mean.shape[1]
    Cg = x3.shape[1] // G
    n = t // G
    g = t - n * G
    mu, r = group_stats(x2[t], chunk, eps)
    mean[n, g] = mu
    rstd[n, g] = r
    set_coefs(coef, n, g, Cg, mu, r, w, b)
    for c in range(g * Cg, (g + 1) * Cg):
        _apply_row(x3[n, c], y3[n, c], coef[n, 0, c], coef[n, 1, c], coef[n, 2, c], one, act)


@kernel(parallel=True)
def fwd_fused(x2, x3, w, b, eps, act, one, chunk, y3, mean, rstd, coef):
    for t in prange(x2.shape[0]):
        _fwd_group(t, x2, x3, w, b, eps, act, one, chunk, y3, mean, rstd, coef)


@kernel()
def fwd_serial(x2, x3, w, b, eps, act, one, chunk, y3, mean, rstd, coef):
    """The fused kernel on the calling thread, for inputs too small to pay for waking the
    thread pool (or for waiting on a core another process holds)."""
    for t in range(x2.shape[0]):
        _fwd_group(t, x2, x3, w, b, eps, act, one, chunk, y3, mean, rstd, coef)


@kernel(parallel=True)
def fwd_split(x2, x3, w, b, eps, act, one, chunk, y3, mean, rstd, coef):
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
        pm[ng, k], pq[ng, k] = chunk_stats(x2[ng, lo:hi])
    for ng in prange(N * G):
        n = ng // G
        g = ng - n * G
        cnt = 0
        mu = 0.0
        m2 = 0.0
        for k in range(nk):
            lo = k * chunk
            cnt, mu, m2 = merge(cnt, mu, m2, min(lo + chunk, D) - lo, pm[ng, k], pq[ng, k])
        r = rstd_of(m2, D, eps)
        mean[n, g] = mu
        rstd[n, g] = r
        set_coefs(coef, n, g, Cg, mu, r, w, b)
    ns = (S + chunk - 1) // chunk
    for t in prange(N * C * ns):
        nc = t // ns
        lo = (t - nc * ns) * chunk
        n = nc // C
        c = nc - n * C
        hi = min(lo + chunk, S)
        _apply_row(x3[n, c, lo:hi], y3[n, c, lo:hi], coef[n, 0, c], coef[n, 1, c],
                   coef[n, 2, c], one, act)


# --------------------------------------------------------------------------- gradient sums
#
# dbias_per_sample[n, c] = sum(dz), dweight_per_sample[n, c] = rstd * sum(dz * (x - mean)),
# dz = dy * act'(z). The per-sample kernels stop here; the backward adds the dx pass.


@njit(inline="always")
def _group_sums(t, dy3, x3, mean, rstd, w, b, act, one, chunk, dweight_ps, dbias_ps, coef):
    """Gradient sums of every channel of group t = n*G + g (the split path adds the same
    chunk partials in the same order). The coefficients are formed as set_coefs rounds
    them, not stored: see ``row_sums``."""
    G = mean.shape[1]
    Cg = x3.shape[1] // G
    n = t // G
    g = t - n * G
    r = rstd[n, g]
    m = cast(coef, mean[n, g])
    if x3.shape[2] < LANES:
        # rows shorter than one lane block are all masked loads, which stall on cache misses:
        # the group's rows of dy and x (contiguous in NCHW) are requested first
        # (``storage.prefetch``; longer rows run on plain loads that the hardware prefetches)
        prefetch_rows(dy3[n, g * Cg:(g + 1) * Cg])
        prefetch_rows(x3[n, g * Cg:(g + 1) * Cg])
    for c in range(g * Cg, (g + 1) * Cg):
        s1, s2 = row_sums(dy3[n, c], x3[n, c], m, cast(coef, r * w[c]), cast(coef, b[c]),
                          one, act, chunk)
        dbias_ps[n, c] = s1
        dweight_ps[n, c] = s2 * r


@njit(inline="always")
def _split_partials_task(t, dy3, x3, mean, rstd, w, b, coef, chunk, one, act, p):
    """Partial gradient sums of chunk k of row (n, c), t = (n*C + c)*ns + k."""
    N, C, S = x3.shape
    G = mean.shape[1]
    ns = p.shape[1]
    nc = t // ns
    k = t - nc * ns
    lo = k * chunk
    n = nc // C
    c = nc - n * C
    g = c // (C // G)
    p[nc, k, 0], p[nc, k, 1] = row_sums(
        dy3[n, c, lo:min(lo + chunk, S)], x3[n, c, lo:min(lo + chunk, S)],
        cast(coef, mean[n, g]), cast(coef, rstd[n, g] * w[c]), cast(coef, b[c]), one, act,
        chunk)


@njit(inline="always")
def _split_reduce_task(nc, p, rstd, dweight_ps, dbias_ps):
    C = dbias_ps.shape[1]
    n = nc // C
    c = nc - n * C
    s1 = 0.0
    s2 = 0.0
    for k in range(p.shape[1]):
        s1 += p[nc, k, 0]
        s2 += p[nc, k, 1]
    dbias_ps[n, c] = s1
    dweight_ps[n, c] = s2 * rstd[n, c // (C // rstd.shape[1])]


@njit(inline="always")
def _split_coef_task(ng, mean, rstd, w, b, coef):
    G = mean.shape[1]
    n = ng // G
    g = ng - n * G
    set_coefs(coef, n, g, coef.shape[2] // G, mean[n, g], rstd[n, g], w, b)


@kernel(parallel=True)
def sums_fused(dy3, x3, mean, rstd, w, b, act, one, chunk, dweight_ps, dbias_ps, coef):
    for t in prange(mean.size):
        _group_sums(t, dy3, x3, mean, rstd, w, b, act, one, chunk, dweight_ps, dbias_ps, coef)


@kernel()
def sums_serial(dy3, x3, mean, rstd, w, b, act, one, chunk, dweight_ps, dbias_ps, coef):
    for t in range(mean.size):
        _group_sums(t, dy3, x3, mean, rstd, w, b, act, one, chunk, dweight_ps, dbias_ps, coef)


@kernel(parallel=True)
def sums_split(dy3, x3, mean, rstd, w, b, act, one, chunk, dweight_ps, dbias_ps, coef):
    N, C, S = x3.shape
    p = np.empty((N * C, (S + chunk - 1) // chunk, 2))
    for t in prange(p.shape[0] * p.shape[1]):
        _split_partials_task(t, dy3, x3, mean, rstd, w, b, coef, chunk, one, act, p)
    for nc in prange(N * C):
        _split_reduce_task(nc, p, rstd, dweight_ps, dbias_ps)


# --------------------------------------------------------------------------- backward


@njit(inline="always")
def _dx_row(dyr, xr, dxr, a, c0, m, k1, k0, one, act):
    """dx = a*dz + k1*(x - m) + k0, with dz = dy * act'(z) recomputed (never stored).
    Without an activation in masked vector blocks (``storage.dx_lanes``), the same bits."""
    n = xr.shape[0]
    if act == NONE:
        for i in range(0, n, LANES):
            dx_lanes(dxr, dyr, xr, i, a, m, k1, k0, n - i)
        return
    for s in range(n):
        d = load(xr, s) - m
        v = load(dyr, s) * derivative(act, d * a + c0, one)
        store(dxr, s, a * v + k1 * d + k0)


@njit(inline="always")
def _dx_chunk(dy3, x3, dx3, coef, n, c, lo, hi, one, act):
    _dx_row(dy3[n, c, lo:hi], x3[n, c, lo:hi], dx3[n, c, lo:hi], coef[n, 0, c],
            coef[n, 1, c], coef[n, 2, c], coef[n, 3, c], coef[n, 4, c], one, act)


@njit(inline="always")
def _bwd_group(t, dy3, x3, mean, rstd, w, b, act, one, chunk, dx3, dweight_ps, dbias_ps,
               coef):
    """Fused backward of group t = n*G + g: gradient sums, then dx while it is in L2. The
    coefficients are the split path's, rounded as it stores them, but kept in registers
    (see ``row_sums``)."""
    _group_sums(t, dy3, x3, mean, rstd, w, b, act, one, chunk, dweight_ps, dbias_ps, coef)
    N, C, S = x3.shape
    G = mean.shape[1]
    Cg = C // G
    n = t // G
    g = t - n * G
    r = rstd[n, g]
    k1, k0 = dx_coefs(n, g, Cg, Cg * S, r, w, dweight_ps, dbias_ps)
    m = cast(coef, mean[n, g])
    for c in range(g * Cg, (g + 1) * Cg):
        _dx_row(dy3[n, c], x3[n, c], dx3[n, c], cast(coef, r * w[c]), cast(coef, b[c]), m,
                cast(coef, k1), cast(coef, k0), one, act)


@kernel(parallel=True)
def bwd_fused(dy3, x3, mean, rstd, w, b, act, one, chunk, dx3, dweight_ps, dbias_ps, coef):
    for t in prange(mean.size):
        _bwd_group(t, dy3, x3, mean, rstd, w, b, act, one, chunk, dx3, dweight_ps, dbias_ps,
                   coef)


@kernel()
def bwd_serial(dy3, x3, mean, rstd, w, b, act, one, chunk, dx3, dweight_ps, dbias_ps, coef):
    """The fused backward on the calling thread, for small inputs."""
    for t in range(mean.size):
        _bwd_group(t, dy3, x3, mean, rstd, w, b, act, one, chunk, dx3, dweight_ps, dbias_ps,
                   coef)


@kernel(parallel=True)
def bwd_split(dy3, x3, mean, rstd, w, b, act, one, chunk, dx3, dweight_ps, dbias_ps, coef):
    N, C, S = x3.shape
    G = mean.shape[1]
    Cg = C // G
    ns = (S + chunk - 1) // chunk
    p = np.empty((N * C, ns, 2))
    for t in prange(N * C * ns):
        _split_partials_task(t, dy3, x3, mean, rstd, w, b, coef, chunk, one, act, p)
    for ng in prange(N * G):
        _split_coef_task(ng, mean, rstd, w, b, coef)  # rows 0-2 for the dx pass
        n = ng // G
        g = ng - n * G
        for c in range(g * Cg, (g + 1) * Cg):
            _split_reduce_task(n * C + c, p, rstd, dweight_ps, dbias_ps)
        set_dx_coefs(coef, n, g, Cg, Cg * S, rstd[n, g], w, dweight_ps, dbias_ps)
    for t in prange(N * C * ns):
        nc = t // ns
        lo = (t - nc * ns) * chunk
        n = nc // C
        _dx_chunk(dy3, x3, dx3, coef, n, nc - n * C, lo, min(lo + chunk, S), one, act)
